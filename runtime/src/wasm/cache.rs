//! Compiled-artifact cache: `<dir>/<blake3 of the .wasm>-<engine compat
//! hash>.cwasm`. A restart with unchanged modules deserialises in well under
//! a millisecond instead of compiling for tens of milliseconds.
//!
//! Deserialising is `unsafe` (the bytes become executable code), so only
//! files this host wrote are loaded: the names are derived from content and
//! engine hashes, and files are written to a temp name and renamed into
//! place so a crash never leaves a half-written artifact under a real name.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Where compiled components go; see the module docs.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    compat: String,
}

/// How a component was obtained, for the load log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Compiled,
    Cache,
}

impl ArtifactCache {
    pub fn new(engine: &Engine, dir: PathBuf) -> Self {
        // DefaultHasher is deterministic for a given build of the binary,
        // which is all that matters: another build has another engine hash.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        Self {
            dir,
            compat: format!("{:016x}", h.finish()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn artifact(&self, hash: &blake3::Hash) -> PathBuf {
        self.dir
            .join(format!("{}-{}.cwasm", hash.to_hex(), self.compat))
    }

    /// The component for `bytes` (whose blake3 is `hash`): from the cache
    /// when present and loadable, else compiled and then cached. A cache
    /// that cannot be written only costs a warning.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        hash: &blake3::Hash,
    ) -> wasmtime::Result<(Component, Source)> {
        let path = self.artifact(hash);
        // Read into memory rather than `deserialize_file`: that one mmaps the
        // file, and anyone truncating or rewriting a cached artifact in
        // place (a cleanup script, a full disk) would then crash the runtime
        // with SIGBUS. Copying ~1 MB costs well under a millisecond.
        if let Ok(artifact) = std::fs::read(&path) {
            // SAFETY: the file name embeds the content hash and this engine's
            // compatibility hash, and only `store` below writes such names
            // (temp file + rename), so these are bytes this host produced for
            // this engine configuration. wasmtime still checks the header
            // and rejects artifacts of another engine or version.
            match unsafe { Component::deserialize(engine, &artifact) } {
                Ok(c) => return Ok((c, Source::Cache)),
                Err(e) => tracing::warn!(
                    "ignoring unreadable cached artifact {}: {e:#}; recompiling",
                    path.display()
                ),
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Err(e) = self.store(&component, &path) {
            tracing::warn!(
                "cannot write compiled artifact to {}: {e:#}; the next start will compile again",
                path.display()
            );
        }
        Ok((component, Source::Compiled))
    }

    fn store(&self, component: &Component, path: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = component.serialize()?;
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&tmp, &bytes)?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        Ok(())
    }
}
