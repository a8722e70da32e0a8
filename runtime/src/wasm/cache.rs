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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Where compiled components go; see the module docs.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    /// `None`: no cache (no user cache directory could be found).
    dir: Option<PathBuf>,
    compat: String,
    /// A cache that cannot be written is said once, not per component.
    warned: Arc<AtomicBool>,
}

/// The user's cache directory for outrun: `$XDG_CACHE_HOME/outrun`, else
/// `$HOME/.cache/outrun`; `None` when neither is set (absolute). Never a
/// shared directory such as /tmp: cached artifacts become executable code,
/// so only this user may be able to write them.
pub fn user_cache_dir() -> Option<PathBuf> {
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    absolute("XDG_CACHE_HOME")
        .or_else(|| absolute("HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("outrun"))
}

/// How a component was obtained, for the load log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Compiled,
    Cache,
}

impl ArtifactCache {
    /// A cache in `dir`; `None` caches nothing.
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        // DefaultHasher is deterministic for a given build of the binary,
        // which is all that matters: another build has another engine hash.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        Self {
            dir,
            compat: format!("{:016x}", h.finish()),
            warned: Arc::default(),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn artifact(&self, dir: &Path, hash: &blake3::Hash) -> PathBuf {
        dir.join(format!("{}-{}.cwasm", hash.to_hex(), self.compat))
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
        let Some(dir) = &self.dir else {
            return Ok((Component::new(engine, bytes)?, Source::Compiled));
        };
        let path = self.artifact(dir, hash);
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
        if let Err(e) = store(dir, &component, &path)
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "cannot write compiled artifacts to {}: {e}; handlers still load, but compile again \
                 at every start (set cache_dir or OUTRUN_CACHE_DIR to a writable directory)",
                dir.display()
            );
        }
        Ok((component, Source::Compiled))
    }
}

fn store(dir: &Path, component: &Component, path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = component.serialize()?;
    let tmp = dir.join(format!(
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
