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

/// Artifacts kept besides the versions in use when the config says nothing
/// (`cache_keep`): enough to roll back a few rebuilds without compiling.
pub const DEFAULT_KEEP: usize = 3;

/// A temp file older than this is left over from a crash: pruned.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// What [`ArtifactCache::prune`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub files: usize,
    pub bytes: u64,
}

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

    /// The artifact file name of a version (whether or not it exists).
    pub fn file_name(&self, hash: &blake3::Hash) -> String {
        format!("{}-{}.cwasm", hash.to_hex(), self.compat)
    }

    /// Delete every artifact except the versions `in_use` and the `keep`
    /// most recently used others (a hit refreshes a file's mtime), and temp
    /// files a crash left behind. Artifacts of other outrun builds sharing
    /// the directory count as "others": a process whose artifact is pruned
    /// keeps running (components are read into memory, never mapped) and
    /// only compiles again at its next start.
    pub fn prune(&self, in_use: &[blake3::Hash], keep: usize) -> std::io::Result<Pruned> {
        let Some(dir) = &self.dir else {
            return Ok(Pruned::default());
        };
        let keep_names: Vec<String> = in_use.iter().map(|h| self.file_name(h)).collect();
        let mut others = Vec::new();
        let mut pruned = Pruned::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pruned),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            if name.starts_with(".tmp-") {
                if modified.elapsed().is_ok_and(|age| age > STALE_TMP) {
                    remove(&entry.path(), meta.len(), &mut pruned);
                }
            } else if name.ends_with(".cwasm") && !keep_names.contains(&name) {
                others.push((modified, entry.path(), meta.len()));
            }
        }
        others.sort_by_key(|o| std::cmp::Reverse(o.0));
        for (_, path, len) in others.into_iter().skip(keep) {
            remove(&path, len, &mut pruned);
        }
        Ok(pruned)
    }

    fn artifact(&self, dir: &Path, hash: &blake3::Hash) -> PathBuf {
        dir.join(self.file_name(hash))
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
                Ok(c) => {
                    // Recently used: pruning keeps it over older versions.
                    let _ = std::fs::File::options()
                        .append(true)
                        .open(&path)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    return Ok((c, Source::Cache));
                }
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

fn remove(path: &Path, len: u64, pruned: &mut Pruned) {
    // Another process may have pruned it first: not an error.
    if std::fs::remove_file(path).is_ok() {
        pruned.files += 1;
        pruned.bytes += len;
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
