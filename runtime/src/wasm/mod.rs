//! The WebAssembly component host: one [`wasmtime::Engine`] ([`engine`]),
//! the [`Registry`] that maps event names to handler components and
//! implements [`Router`](crate::handler::Router) ([`registry`]), hot reload
//! ([`reload`]), the compiled-artifact cache ([`cache`]) and the config
//! sections the host reads ([`spec`]). What a handler may do once running is
//! in [`crate::host`].

pub mod cache;
pub mod engine;
pub mod needs;
pub mod registry;
pub mod reload;
pub mod spec;

use std::path::{Path, PathBuf};

pub use registry::{
    Compile, ComponentInfo, HandlerInfo, HandlerVersion, HostServices, Registry, check_file,
};
pub use reload::{ReloadWatcher, Reloaded};
pub use spec::{Allow, ByteSize, HandlerSpec, InstanceMode, KvSettings};

/// `module` with a custom section (id 0) appended: the same code under a
/// new content hash, i.e. a new version to the registry. For hot-reload
/// benchmarks and tests.
pub fn with_custom_section(module: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = Vec::new();
    leb128(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(payload);
    let mut out = module.to_vec();
    out.push(0);
    leb128(body.len(), &mut out);
    out.extend(body);
    out
}

/// Errors of loading, checking and reloading handler components. Each names
/// the handler or file and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("handler {handler}: module file {} not found; check `module` in its [[handler]] entry (relative paths resolve against the config file's directory)", path.display())]
    ModuleMissing { handler: String, path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("two [[handler]] entries are named {0:?}; handler names must be unique")]
    DuplicateHandler(String),
    #[error(
        "event {event:?} is bound to both handler {first} and handler {second}; an event name may go to one handler only"
    )]
    DuplicateEvent {
        event: String,
        first: String,
        second: String,
    },
    #[error("handler {0}: `events` is empty; bind at least one event name")]
    NoEvents(String),
    #[error("handler {handler}: {reason}")]
    BadSpec { handler: String, reason: String },
    #[error("handler {0} is still compiling its first version; try again once it is loaded")]
    Compiling(String),
    #[error("no handler named {0:?}")]
    UnknownHandler(String),
    #[error(
        "cannot connect to the kv store at {url}: {reason}; check [kv] url and that Redis is running"
    )]
    KvConnect { url: String, reason: String },
    #[error("cannot watch {} for handler changes: {reason}", path.display())]
    Watch { path: PathBuf, reason: String },
    #[error(
        "handler {handler}: its component needs at least {need} of linear memory to start (the initial size of its largest memory), but `memory` = {cap}; raise `memory` in its [[handler]] entry to at least {need}"
    )]
    MemoryTooSmall {
        handler: String,
        need: ByteSize,
        cap: ByteSize,
    },
    #[error(
        "handler {handler}: this version needs {need} {what} per instance, but the instance pool was sized at start for {room}; restart outrun to load it"
    )]
    PoolTooSmall {
        handler: String,
        what: &'static str,
        need: u64,
        room: u64,
    },
    #[error("wasm engine setup failed: {0}")]
    Engine(String),
}

/// `path` relative to `base` unless already absolute (config paths resolve
/// against the config file's directory).
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}
