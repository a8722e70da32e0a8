//! Hot reload: a `notify` watcher on the directories of the configured
//! modules. A change to a configured file is debounced, compiled off the
//! async threads, checked against the world and swapped in atomically
//! (`ArcSwap`); events already running keep the `Arc` of the version they
//! started on. A file that does not load (broken, incompatible, or caught
//! half-written by a plain overwrite) leaves the old version serving: if the
//! file is still changing it is retried quietly on the next change, else one
//! error line names the file and the reason.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::WasmError;
use super::registry::{Registry, compile_version};

/// Quiet time after the last change to a file before it is loaded: writers
/// emit several events per save (create, modify ×N, close).
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// How long a truncated file may stay truncated before it is reported: a
/// plain overwrite (`cp`, a slow upload) shows partial files for a while,
/// and those are not errors, just not done yet.
pub const TRUNCATED_GRACE: Duration = Duration::from_secs(2);

/// How often a handler whose first version is still compiling is looked at
/// again.
const COMPILING_RECHECK: Duration = Duration::from_millis(200);

/// How often a truncated file is looked at again while it is being written.
const TRUNCATED_RECHECK: Duration = Duration::from_millis(50);

/// What [`Registry::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The file's content hash equals the serving version.
    Unchanged,
    Swapped {
        old: String,
        new: String,
        elapsed: Duration,
    },
}

/// Stops watching when dropped.
pub struct ReloadWatcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReloadWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Registry {
    /// Reload one handler from its module file now. Errors leave the current
    /// version serving.
    pub async fn reload(&self, handler: &str) -> Result<Reloaded, WasmError> {
        let i = self
            .slot_index(handler)
            .ok_or_else(|| WasmError::UnknownHandler(handler.to_string()))?;
        self.reload_slot(i).await
    }

    async fn reload_slot(&self, i: usize) -> Result<Reloaded, WasmError> {
        let slot = &self.slots[i];
        let bytes = std::fs::read(&slot.module).map_err(|source| WasmError::Io {
            path: slot.module.clone(),
            source,
        })?;
        let Some(old) = slot.current.load_full() else {
            return Err(WasmError::Compiling(slot.spec.name.clone()));
        };
        if blake3::hash(&bytes) == old.hash {
            return Ok(Reloaded::Unchanged);
        }
        let started = Instant::now();
        let (version, _) = compile_version(
            &self.engine,
            &self.linker,
            &self.cache,
            &self.room,
            &slot.spec,
            &slot.caps,
            &slot.module,
            bytes,
        )
        .await?;
        let new = version.short.to_string();
        slot.current.store(version);
        let elapsed = started.elapsed();
        let name = slot.spec.name.clone();
        tracing::info!(handler = %name, version = %new, "handler {name} reloaded: {} -> {new} in {} ms", old.short, elapsed.as_millis());
        metrics::counter!("outrun_handler_reloads_total", "handler" => name.clone()).increment(1);
        metrics::gauge!("outrun_handler_reload_seconds", "handler" => name)
            .set(elapsed.as_secs_f64());
        if let Ok(mut kept) = slot.reloads.lock() {
            if kept.len() >= super::registry::RELOADS_KEPT {
                kept.pop_front();
            }
            kept.push_back(super::registry::ReloadRecord {
                at: chrono::Utc::now(),
                old: old.short.to_string(),
                new: new.clone(),
                elapsed_ms: elapsed.as_millis() as u64,
            });
        }
        self.prune_cache();
        Ok(Reloaded::Swapped {
            old: old.short.to_string(),
            new,
            elapsed,
        })
    }

    /// Watch the configured module files and reload on change until the
    /// returned watcher is dropped. Must run inside a tokio runtime.
    pub fn watch(self: &Arc<Self>) -> Result<ReloadWatcher, WasmError> {
        let (tx, rx) = mpsc::unbounded_channel::<PathBuf>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event) => {
                    for path in event.paths {
                        let _ = tx.send(path);
                    }
                }
                Err(e) => tracing::warn!("handler file watcher error: {e}"),
            })
            .map_err(|e| WasmError::Watch {
                path: PathBuf::from("."),
                reason: e.to_string(),
            })?;
        let dirs: HashSet<PathBuf> = self
            .slots
            .iter()
            .filter_map(|s| s.module.parent().map(PathBuf::from))
            .collect();
        for dir in &dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| WasmError::Watch {
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
        }
        let task = tokio::spawn(run(self.clone(), rx));
        Ok(ReloadWatcher {
            _watcher: watcher,
            task,
        })
    }
}

/// The watcher loop: collect changed paths, wait for [`DEBOUNCE`] of quiet
/// per file, then reload.
async fn run(registry: Arc<Registry>, mut rx: mpsc::UnboundedReceiver<PathBuf>) {
    let by_path: HashMap<PathBuf, Vec<usize>> =
        registry
            .slots
            .iter()
            .enumerate()
            .fold(HashMap::new(), |mut m, (i, s)| {
                m.entry(s.module.clone()).or_default().push(i);
                m
            });
    // Catch up once at start: a module replaced between its load and the
    // watcher's start produced no event we could see. Unchanged files cost
    // one read and hash.
    let mut due: HashMap<usize, tokio::time::Instant> = (0..registry.slots.len())
        .map(|i| (i, tokio::time::Instant::now()))
        .collect();
    // Content that already failed (and was reported): not reported twice.
    let mut failed: HashMap<usize, blake3::Hash> = HashMap::new();
    // Truncated content first seen when: reported only if it stays so.
    let mut truncated_since: HashMap<usize, (blake3::Hash, tokio::time::Instant)> = HashMap::new();
    loop {
        let next = due.values().min().copied();
        tokio::select! {
            path = rx.recv() => {
                let Some(path) = path else { return };
                for &i in by_path.get(&path).into_iter().flatten() {
                    due.insert(i, tokio::time::Instant::now() + DEBOUNCE);
                }
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)), if next.is_some() => {
                let now = tokio::time::Instant::now();
                let ready: Vec<usize> = due.iter().filter(|(_, t)| **t <= now).map(|(i, _)| *i).collect();
                for i in ready {
                    due.remove(&i);
                    if let Some(retry_at) = reload_once(&registry, i, &mut failed, &mut truncated_since).await {
                        due.insert(i, retry_at);
                    }
                }
            }
        }
    }
}

/// Try one reload; returns when to try again if the file was still being
/// written.
async fn reload_once(
    registry: &Registry,
    i: usize,
    failed: &mut HashMap<usize, blake3::Hash>,
    truncated_since: &mut HashMap<usize, (blake3::Hash, tokio::time::Instant)>,
) -> Option<tokio::time::Instant> {
    let slot = &registry.slots[i];
    if slot.current.load_full().is_none() {
        // The first version is still compiling: look again once it is in
        // (a change meanwhile is caught by comparing hashes then).
        return Some(tokio::time::Instant::now() + COMPILING_RECHECK);
    }
    let (before, is_truncated) = match std::fs::read(&slot.module) {
        Ok(b) => (blake3::hash(&b), truncated(&b)),
        // Mid-rename or deleted: the old version keeps serving; a new file
        // under the name produces another event.
        Err(_) => return None,
    };
    if failed.get(&i) == Some(&before) {
        return None;
    }
    if is_truncated {
        let now = tokio::time::Instant::now();
        let since = match truncated_since.get(&i) {
            Some((h, t)) if *h == before => *t,
            _ => {
                truncated_since.insert(i, (before, now));
                now
            }
        };
        if now.duration_since(since) < TRUNCATED_GRACE {
            tracing::debug!(handler = %slot.spec.name, "{} is truncated, probably still being written; waiting", slot.module.display());
            return Some(now + TRUNCATED_RECHECK);
        }
    }
    truncated_since.remove(&i);
    match registry.reload_slot(i).await {
        Ok(_) => {
            failed.remove(&i);
            None
        }
        Err(e) => {
            let now = std::fs::read(&slot.module).map(|b| blake3::hash(&b)).ok();
            if now != Some(before) {
                // Still being written (plain overwrite): try again once quiet.
                return Some(tokio::time::Instant::now() + DEBOUNCE);
            }
            failed.insert(i, before);
            let name = &slot.spec.name;
            let serving = slot
                .current
                .load_full()
                .map_or_else(|| "(none)".into(), |v| v.short.clone());
            tracing::error!(handler = %name, "handler {name}: reload of {} rejected: {e}; version {serving} keeps serving", slot.module.display());
            metrics::counter!("outrun_handler_reload_failures_total", "handler" => name.clone())
                .increment(1);
            None
        }
    }
}

/// Whether `bytes` look like the beginning of a WebAssembly binary that is
/// still being written: a prefix of the header, or a top-level section that
/// runs past the end. Anything else (garbage, a complete file of the wrong
/// kind) is judged by the compiler at once.
fn truncated(bytes: &[u8]) -> bool {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 {
        return MAGIC.starts_with(&bytes[..bytes.len().min(4)]);
    }
    if &bytes[..4] != MAGIC {
        return false;
    }
    let mut pos = 8;
    while pos < bytes.len() {
        pos += 1; // section id
        let mut size: u64 = 0;
        let mut shift = 0;
        loop {
            let Some(&b) = bytes.get(pos) else {
                return true;
            };
            pos += 1;
            size |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 35 {
                return false; // not a LEB128 u32: malformed, not truncated
            }
        }
        match pos.checked_add(size as usize) {
            Some(end) if end <= bytes.len() => pos = end,
            _ => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::truncated;

    #[test]
    fn truncation_is_told_from_garbage() {
        // A component header, then a custom section of 3 bytes.
        let whole = [
            b"\0asm".as_slice(),
            &[0x0d, 0x00, 0x01, 0x00],
            &[0x00, 0x03, 0x01, b'a', 0x7f],
        ]
        .concat();
        assert!(!truncated(&whole));
        for cut in (0..whole.len()).filter(|&c| c != 8) {
            assert!(
                truncated(&whole[..cut]),
                "a {cut}-byte prefix is still being written"
            );
        }
        // A bare header is a complete (empty) binary as far as structure goes.
        assert!(!truncated(&whole[..8]));
        assert!(!truncated(b"not wasm at all"));
        // Garbage behind a valid magic cannot be told from a file still being
        // written; it is reported once TRUNCATED_GRACE has passed.
        assert!(truncated(b"\0asm\x0d\0\x01\0\x01\x7f"));
        assert!(!truncated(b"x"));
    }
}
