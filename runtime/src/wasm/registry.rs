//! The [`Registry`]: which component handles which event name. It loads and
//! checks every `[[handler]]` at startup, implements
//! [`Router`](crate::handler::Router) for the dispatch loop, and holds each
//! handler's current [`HandlerVersion`] in an `ArcSwap` so hot reload can
//! replace it while in-flight events finish on the version they started
//! with.

use std::collections::{HashMap, HashSet};
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use wasmtime::component::Linker;
use wasmtime::{Engine, Trap, UpdateDeadline};

use super::cache::{ArtifactCache, Source};
use super::engine::{EngineLimits, EpochTicker, build_engine};
use super::needs::Needs;
use super::spec::{ByteSize, HandlerSpec, InstanceMode, KvSettings};
use super::{WasmError, resolve};
use crate::event::{Event, validate_name};
use crate::handler::{Effects, Handler, HandlerError, Outcome, Route, Router};
use crate::host::bindings::outrun::handler::types as wit;
use crate::host::bindings::{Handler as HandlerWorld, HandlerPre};
use crate::host::{Capabilities, HostState, KvStore, linker};
use crate::store::DEFAULT_MAX_RETRY;

/// Extra time the dispatch loop's backstop timeout (`Route::timeout`) allows
/// beyond the handler's own, so the host's precise message ("timeout after
/// 2s") wins the race.
const BACKSTOP_GRACE: Duration = Duration::from_secs(1);

/// One wasm page: nothing smaller can hold any linear memory.
const MIN_MEMORY: u64 = 64 * 1024;
/// The whole 32-bit address space of a wasm memory.
const MAX_MEMORY: u64 = 4 * 1024 * 1024 * 1024;

/// What the host needs from the rest of the runtime. There is no `Store`
/// here on purpose: a handler reaches the database only through the
/// [`Effects`] the dispatch loop passes with each event (its ack
/// transaction), never on a connection of its own.
#[derive(Debug, Clone)]
pub struct HostServices {
    /// `[kv]`: Redis URL or the embedded store.
    pub kv: KvSettings,
    /// `max_retry` for events a handler emits without one.
    pub default_max_retry: i32,
    /// Compiled-artifact cache; `None` = the user's cache directory
    /// ([`super::cache::user_cache_dir`]), never beside the config.
    pub cache_dir: Option<PathBuf>,
    /// Component instances alive at once: set it to at least the runtime's
    /// concurrency (one instance per in-flight event). Default 128. Each
    /// slot reserves address space (not memory) for its linear memories.
    pub max_instances: u32,
    /// Cached artifacts kept besides the versions in use (`cache_keep`).
    pub cache_keep: usize,
    /// The broker client behind `publish` (`[publish]`); a handler granted
    /// `publish` needs one.
    pub publisher: Option<crate::publish::Publisher>,
    /// `[schemas]`: what handlers' `emit` is checked against.
    pub schemas: Option<Arc<crate::schema::Schemas>>,
    /// `outrun handlers run`: record every handler's calls and answer its
    /// HTTP from fixtures (see [`crate::host::harness`]). `None` in serve.
    pub harness: Option<crate::host::harness::Harness>,
}

impl Default for HostServices {
    fn default() -> Self {
        Self {
            kv: KvSettings::default(),
            default_max_retry: DEFAULT_MAX_RETRY,
            cache_dir: None,
            cache_keep: super::cache::DEFAULT_KEEP,
            max_instances: 256,
            publisher: None,
            schemas: None,
            harness: None,
        }
    }
}

/// One loaded handler, for `outrun handlers list` and the admin API.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct HandlerInfo {
    pub name: String,
    #[schema(value_type = String)]
    pub module: PathBuf,
    /// blake3 of the `.wasm` currently serving (hex).
    pub hash: String,
    pub loaded_at: DateTime<Utc>,
    pub events: Vec<String>,
    /// Hot reloads of this handler in this process, oldest first (the
    /// last [`RELOADS_KEPT`]).
    pub reloads: Vec<ReloadRecord>,
    /// What its `[[handler]]` entry grants (`allow`).
    pub capabilities: Granted,
    /// The per-attempt limits of its `[[handler]]` entry.
    pub settings: HandlerSettings,
}

/// Reloads each handler remembers for the dashboard.
pub const RELOADS_KEPT: usize = 10;

/// One hot reload that swapped in a new version.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ReloadRecord {
    pub at: DateTime<Utc>,
    /// Short hash (12 hex digits) of the version replaced.
    pub old: String,
    /// Short hash of the version serving from then on.
    pub new: String,
    /// From noticing the change to serving, in milliseconds.
    pub elapsed_ms: u64,
}

/// A handler's capabilities. `config` values are left out (they may be
/// secrets); their keys are listed.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Granted {
    pub emit: Vec<String>,
    pub kv: Option<String>,
    pub http: Vec<String>,
    pub sql: bool,
    pub publish: Vec<String>,
    pub config_keys: Vec<String>,
}

/// The limits of one attempt, from the `[[handler]]` entry.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct HandlerSettings {
    pub timeout_ms: u64,
    pub memory_bytes: u64,
    /// Events of this handler running at once on this instance (none: no cap).
    pub concurrency: Option<usize>,
    /// Overrides the event's max_retry when set.
    pub max_retry: Option<i32>,
    /// `fresh` or `reuse`.
    pub instances: String,
}

/// The result of [`check_file`].
#[derive(Debug, Clone, Serialize)]
pub struct ComponentInfo {
    pub path: PathBuf,
    pub hash: String,
    pub size: u64,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// What an instance of it takes from the pool (see [`Needs`]).
    pub needs: Needs,
}

/// One `[[handler]]`: its grants, its limits and its current version. Lives
/// as long as the registry; reloads replace only `current`.
pub(crate) struct Slot {
    pub(crate) spec: HandlerSpec,
    pub(crate) module: PathBuf,
    pub(crate) caps: Arc<Capabilities>,
    pub(crate) permits: Option<Arc<Semaphore>>,
    pub(crate) current: Arc<Serving>,
    /// The last [`RELOADS_KEPT`] reloads, for the dashboard.
    pub(crate) reloads: std::sync::Mutex<std::collections::VecDeque<ReloadRecord>>,
}

/// The version a handler serves, empty while its first version compiles.
pub(crate) struct Serving {
    version: ArcSwapOption<HandlerVersion>,
    /// `None` while the first version compiles; then `Ok` (serving) or the
    /// compile error.
    state: watch::Sender<Option<Result<(), String>>>,
}

impl Serving {
    fn compiling() -> Self {
        Self {
            version: ArcSwapOption::empty(),
            state: watch::Sender::new(None),
        }
    }

    pub(crate) fn load_full(&self) -> Option<Arc<HandlerVersion>> {
        self.version.load_full()
    }

    pub(crate) fn store(&self, version: HandlerVersion) {
        self.version.store(Some(Arc::new(version)));
        self.state.send_replace(Some(Ok(())));
    }

    fn fail(&self, error: String) {
        self.state.send_replace(Some(Err(error)));
    }

    fn ready(&self) -> bool {
        self.version.load().is_some()
    }
}

/// What a route hands out for a handler whose first version still compiles:
/// the event waits for the compile, then runs on the new version. The claim
/// loop leaves such events in the table ([`Router::saturated`]), so only an
/// event claimed just before that is known ever waits here.
struct AwaitCompile {
    handler: Arc<str>,
    serving: Arc<Serving>,
}

#[async_trait::async_trait]
impl Handler for AwaitCompile {
    async fn handle(&self, event: &Event, effects: &mut Effects) -> Result<Outcome, HandlerError> {
        let mut rx = self.serving.state.subscribe();
        let state = rx
            .wait_for(Option::is_some)
            .await
            .map(|s| s.clone())
            .unwrap_or(Some(Err("the runtime stopped".into())));
        match (state, self.serving.load_full()) {
            (_, Some(version)) => version.handle(event, effects).await,
            (Some(Err(e)), None) => Err(HandlerError::retry(format!(
                "handler {} did not compile: {e}",
                self.handler
            ))),
            (_, None) => Err(HandlerError::retry(format!(
                "handler {} is not loaded",
                self.handler
            ))),
        }
    }
}

/// Name → handler component. See the module docs.
pub struct Registry {
    pub(crate) engine: Engine,
    pub(crate) linker: Arc<Linker<HostState>>,
    pub(crate) cache: ArtifactCache,
    /// What the pool gives each instance; a reload needing more is refused.
    pub(crate) room: Needs,
    pub(crate) cache_keep: usize,
    pub(crate) slots: Vec<Slot>,
    by_event: HashMap<String, usize>,
    _ticker: EpochTicker,
}

impl Registry {
    /// Check every spec, compile (or load from cache) every module, and
    /// return the registry. Fails on the first bad entry, naming it.
    pub async fn load(
        specs: Vec<HandlerSpec>,
        base_dir: &Path,
        services: HostServices,
    ) -> Result<Arc<Registry>, WasmError> {
        let (registry, compile) = Self::prepare(specs, base_dir, services).await?;
        compile.run().await?;
        Ok(registry)
    }

    /// Check every spec and read every module (refusing what cannot work
    /// before anything compiles), and return the registry with no handler
    /// ready yet, plus the [`Compile`] that makes them ready: `serve` routes
    /// events while it runs, each handler as soon as its version is in.
    pub async fn prepare(
        specs: Vec<HandlerSpec>,
        base_dir: &Path,
        services: HostServices,
    ) -> Result<(Arc<Registry>, Compile), WasmError> {
        let mut names: HashSet<&str> = HashSet::new();
        let mut by_event: HashMap<String, usize> = HashMap::new();
        let mut modules = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if !names.insert(spec.name.as_str()) {
                return Err(WasmError::DuplicateHandler(spec.name.clone()));
            }
            if spec.name.trim().is_empty() {
                return Err(WasmError::BadSpec {
                    handler: spec.name.clone(),
                    reason: "`name` is empty".into(),
                });
            }
            if spec.events.is_empty() {
                return Err(WasmError::NoEvents(spec.name.clone()));
            }
            if spec.concurrency == Some(0) {
                return Err(WasmError::BadSpec {
                    handler: spec.name.clone(),
                    reason: "concurrency must be at least 1 (omit it for no cap)".into(),
                });
            }
            if spec.instances == InstanceMode::Reuse && spec.reuse_events == 0 {
                return Err(WasmError::BadSpec {
                    handler: spec.name.clone(),
                    reason: "reuse_events must be at least 1".into(),
                });
            }
            if spec.max_retry.is_some_and(|m| m < 1) {
                return Err(WasmError::BadSpec {
                    handler: spec.name.clone(),
                    reason: "max_retry must be at least 1".into(),
                });
            }
            let bad = |reason: String| WasmError::BadSpec {
                handler: spec.name.clone(),
                reason,
            };
            for name in spec.events.iter().chain(&spec.allow.emit) {
                validate_name(name).map_err(|e| bad(format!("event name {name:?}: {e}")))?;
            }
            if spec.memory.bytes() < MIN_MEMORY || spec.memory.bytes() > MAX_MEMORY {
                return Err(bad(format!(
                    "memory = {} is out of range: use between {} and {}",
                    spec.memory,
                    ByteSize(MIN_MEMORY),
                    ByteSize(MAX_MEMORY)
                )));
            }
            // `handlers run` records publish calls without a broker.
            let recording = services.harness.as_ref().is_some_and(|h| !h.send_publish);
            if !spec.allow.publish.is_empty() && services.publisher.is_none() && !recording {
                return Err(bad(
                    "is granted publish, but no broker is configured: add [publish.kafka] brokers or [publish.nats] url to the config".into(),
                ));
            }
            if let Some(t) = spec.allow.publish.iter().find(|t| t.trim().is_empty()) {
                return Err(bad(format!("publish topic {t:?} is empty")));
            }
            if spec.timeout.is_zero() {
                return Err(WasmError::BadSpec {
                    handler: spec.name.clone(),
                    reason: "timeout must be more than 0".into(),
                });
            }
            for event in &spec.events {
                if let Some(&j) = by_event.get(event) {
                    return Err(WasmError::DuplicateEvent {
                        event: event.clone(),
                        first: specs[j].name.clone(),
                        second: spec.name.clone(),
                    });
                }
                by_event.insert(event.clone(), i);
            }
            let path = resolve(base_dir, &spec.module);
            if !path.is_file() {
                return Err(WasmError::ModuleMissing {
                    handler: spec.name.clone(),
                    path,
                });
            }
            let module = canonical_module(&path)?;
            let bytes = std::fs::read(&module).map_err(|source| WasmError::Io {
                path: module.clone(),
                source,
            })?;
            // Before any compile: a cap the component cannot start under is
            // refused now, not after tens of seconds of compiling.
            let needs = read_needs(&module, &bytes)?;
            check_memory(spec, &needs)?;
            modules.push((module, bytes, needs));
        }

        let max_memory = specs
            .iter()
            .map(|s| s.memory.bytes())
            .max()
            .unwrap_or(super::spec::DEFAULT_MEMORY.bytes());
        // Idle warm instances hold pool slots too.
        let warm: usize = specs.iter().map(warm_pool_size).sum();
        let limits = EngineLimits {
            max_memory,
            instances: services
                .max_instances
                .saturating_add(u32::try_from(warm).unwrap_or(u32::MAX)),
            per_instance: modules
                .iter()
                .fold(Needs::default(), |acc, (_, _, n)| acc.max(n)),
        };
        let room = limits.room();
        let engine = build_engine(limits)?;
        let linker = Arc::new(
            linker(&engine)
                .map_err(|e| WasmError::Engine(format!("linking host functions: {e:#}")))?,
        );
        let cache = ArtifactCache::new(
            &engine,
            services
                .cache_dir
                .clone()
                .or_else(super::cache::user_cache_dir),
        );
        let kv = KvStore::connect(&services.kv).await?;

        let mut slots = Vec::with_capacity(specs.len());
        let mut pending = Vec::with_capacity(specs.len());
        for (i, (spec, (module, bytes, _))) in specs.into_iter().zip(modules).enumerate() {
            let mut caps = Capabilities::new(
                &spec,
                kv.clone(),
                services.default_max_retry,
                services.publisher.clone(),
                services.schemas.clone(),
            );
            caps.harness = services.harness.clone();
            let caps = Arc::new(caps);
            let permits = spec.concurrency.map(|n| Arc::new(Semaphore::new(n)));
            pending.push((i, bytes));
            slots.push(Slot {
                spec,
                module,
                caps,
                permits,
                current: Arc::new(Serving::compiling()),
                reloads: Default::default(),
            });
        }
        let ticker = EpochTicker::start(&engine)?;
        let registry = Arc::new(Registry {
            engine,
            linker,
            cache,
            room,
            cache_keep: services.cache_keep,
            slots,
            by_event,
            _ticker: ticker,
        });
        let compile = Compile {
            registry: registry.clone(),
            pending,
        };
        Ok((registry, compile))
    }

    /// Every handler with its current version (those still compiling
    /// their first version are left out).
    pub fn handlers(&self) -> Vec<HandlerInfo> {
        self.slots
            .iter()
            .filter_map(|s| {
                let v = s.current.load_full()?;
                let allow = &s.spec.allow;
                Some(HandlerInfo {
                    name: s.spec.name.clone(),
                    module: s.module.clone(),
                    hash: v.hash.to_hex().to_string(),
                    loaded_at: v.loaded_at,
                    events: s.spec.events.clone(),
                    reloads: s
                        .reloads
                        .lock()
                        .map(|r| r.iter().cloned().collect())
                        .unwrap_or_default(),
                    capabilities: Granted {
                        emit: allow.emit.clone(),
                        kv: allow.kv.clone(),
                        http: allow.http.clone(),
                        sql: allow.sql,
                        publish: allow.publish.clone(),
                        config_keys: allow.config.keys().cloned().collect(),
                    },
                    settings: HandlerSettings {
                        timeout_ms: s.spec.timeout.as_millis() as u64,
                        memory_bytes: s.spec.memory.bytes(),
                        concurrency: s.spec.concurrency,
                        max_retry: s.spec.max_retry,
                        instances: match s.spec.instances {
                            InstanceMode::Fresh => "fresh",
                            InstanceMode::Reuse => "reuse",
                        }
                        .to_owned(),
                    },
                })
            })
            .collect()
    }

    /// Where compiled artifacts are kept, if anywhere.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache.dir()
    }

    /// Delete cached artifacts other than the versions serving and the
    /// `cache_keep` most recent others; logged, never fatal.
    pub fn prune_cache(&self) {
        let in_use: Vec<blake3::Hash> = self
            .slots
            .iter()
            .filter_map(|s| s.current.load_full().map(|v| v.hash))
            .collect();
        match self.cache.prune(&in_use, self.cache_keep) {
            Ok(p) if p.files > 0 => tracing::info!(
                files = p.files,
                bytes = p.bytes,
                "artifact cache pruned: {} files, {:.1} MB (keeping the {} versions in use and {} more)",
                p.files,
                p.bytes as f64 / 1e6,
                in_use.len(),
                self.cache_keep
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "cannot prune the artifact cache {}: {e}",
                self.cache
                    .dir()
                    .map_or_else(String::new, |d| d.display().to_string())
            ),
        }
    }

    /// Whether every handler has a version (none still compiling).
    pub fn all_ready(&self) -> bool {
        self.slots.iter().all(|s| s.current.ready())
    }

    /// The version serving `handler` now (hot reload may replace it).
    pub fn current(&self, handler: &str) -> Option<Arc<HandlerVersion>> {
        self.slots
            .iter()
            .find(|s| s.spec.name == handler)
            .and_then(|s| s.current.load_full())
    }

    pub(crate) fn slot_index(&self, handler: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.spec.name == handler)
    }
}

impl Router for Registry {
    fn route(&self, name: &str) -> Option<Route> {
        let slot = &self.slots[*self.by_event.get(name)?];
        let (handler, timeout): (Arc<dyn Handler>, _) = match slot.current.load_full() {
            Some(version) => (version, Some(slot.spec.timeout + BACKSTOP_GRACE)),
            // No backstop while waiting: a compile may take longer than the
            // handler's timeout, and the version enforces its own once it
            // runs.
            None => (
                Arc::new(AwaitCompile {
                    handler: slot.caps.handler.clone(),
                    serving: slot.current.clone(),
                }),
                None,
            ),
        };
        Some(Route {
            handler_name: slot.caps.handler.clone(),
            handler,
            permits: slot.permits.clone(),
            timeout,
            max_retry: slot.spec.max_retry,
        })
    }

    /// Names whose handler has no free permit, or is still compiling: the
    /// claimer leaves their events in the table until it can run them.
    fn saturated(&self) -> Vec<String> {
        self.by_event
            .iter()
            .filter(|(_, i)| {
                let slot = &self.slots[**i];
                !slot.current.ready()
                    || slot
                        .permits
                        .as_ref()
                        .is_some_and(|p| p.available_permits() == 0)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// The first compile of every handler of a [`Registry::prepare`]d registry:
/// in parallel, at most one per core (each compile already uses several
/// threads for large components, so more would only compete).
pub struct Compile {
    registry: Arc<Registry>,
    pending: Vec<(usize, Vec<u8>)>,
}

impl Compile {
    /// Compile (or load from the cache) every pending handler; each serves
    /// as soon as its own version is in. Returns the first error (the
    /// others still finish).
    pub async fn run(self) -> Result<(), WasmError> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let permits = Arc::new(Semaphore::new(cores));
        let started = Instant::now();
        let count = self.pending.len();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, bytes) in self.pending {
            let registry = self.registry.clone();
            let permits = permits.clone();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let slot = &registry.slots[i];
                let began = Instant::now();
                let result = compile_version(
                    &registry.engine,
                    &registry.linker,
                    &registry.cache,
                    &registry.room,
                    &slot.spec,
                    &slot.caps,
                    &slot.module,
                    bytes,
                )
                .await;
                match result {
                    Ok((version, source)) => {
                        tracing::info!(
                            handler = %slot.spec.name,
                            version = %version.short,
                            "handler {} v{} {} from {} in {} ms",
                            slot.spec.name,
                            version.short,
                            match source { Source::Cache => "loaded from cache", Source::Compiled => "compiled" },
                            slot.module.display(),
                            began.elapsed().as_millis()
                        );
                        tracing::info!(handler = %slot.spec.name, module = %slot.module.display(), version = %version.short, events = %slot.spec.events.join(","), "handler loaded");
                        slot.current.store(version);
                        Ok(())
                    }
                    Err(e) => {
                        slot.current.fail(e.to_string());
                        Err(e)
                    }
                }
            });
        }
        let mut first = None;
        while let Some(done) = tasks.join_next().await {
            let result = done
                .map_err(|e| WasmError::Engine(format!("compile task failed: {e}")))
                .and_then(|r| r);
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => {
                if count > 1 {
                    tracing::info!(
                        "all {count} handlers ready in {} ms",
                        started.elapsed().as_millis()
                    );
                }
                Ok(())
            }
        }
    }
}

/// Frames wasmtime keeps in a trap backtrace (its default).
const BACKTRACE_FRAMES: usize = 20;

/// A Rust (LLVM) guest keeps large locals on a stack inside its linear
/// memory; exhausting it surfaces as an out-of-bounds access, not as
/// wasmtime's `StackOverflow`. When every frame of the (full) backtrace but
/// a couple is the same function, that is what happened: name the function.
fn deep_recursion(err: &wasmtime::Error) -> Option<String> {
    let bt = err.downcast_ref::<wasmtime::WasmBacktrace>()?;
    let frames = bt.frames();
    if frames.len() < BACKTRACE_FRAMES {
        return None;
    }
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for f in frames {
        *counts.entry(f.func_index()).or_default() += 1;
    }
    let (&func, &n) = counts.iter().max_by_key(|(_, n)| **n)?;
    (n + 3 >= frames.len()).then(|| {
        let frame = frames.iter().find(|f| f.func_index() == func)?;
        Some(frame.func_name().map_or_else(
            || format!("function #{func}"),
            |n| format!("`{:#}`", rustc_demangle::demangle(n)),
        ))
    })?
}

/// Resolve the module's directory (so paths match what the file watcher
/// reports) while keeping its file name.
fn canonical_module(path: &Path) -> Result<PathBuf, WasmError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir.canonicalize().map_err(|source| WasmError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(dir.join(path.file_name().unwrap_or_default()))
}

/// [`sniff`], then the component's [`Needs`]; a binary wasmparser cannot
/// read is not a valid component.
fn read_needs(path: &Path, bytes: &[u8]) -> Result<Needs, WasmError> {
    let invalid = |reason: String| WasmError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    sniff(bytes).map_err(invalid)?;
    Needs::of(bytes).map_err(|e| invalid(format!("not a valid component: {e}")))
}

/// The handler's `memory` cap must hold the component's largest initial
/// memory, or every instantiation would fail.
fn check_memory(spec: &HandlerSpec, needs: &Needs) -> Result<(), WasmError> {
    if needs.min_memory > spec.memory.bytes() {
        return Err(WasmError::MemoryTooSmall {
            handler: spec.name.clone(),
            need: ByteSize(needs.min_memory),
            cap: spec.memory,
        });
    }
    Ok(())
}

/// A reload must fit the pool sized at start.
fn check_room(handler: &str, needs: &Needs, room: &Needs) -> Result<(), WasmError> {
    let checks: [(&'static str, u64, u64); 5] = [
        (
            "core instances",
            needs.core_instances.into(),
            room.core_instances.into(),
        ),
        ("memories", needs.memories.into(), room.memories.into()),
        ("tables", needs.tables.into(), room.tables.into()),
        (
            "memories in one core module",
            needs.memories_per_module.into(),
            room.memories_per_module.into(),
        ),
        (
            "tables in one core module",
            needs.tables_per_module.into(),
            room.tables_per_module.into(),
        ),
    ];
    for (what, need, room) in checks {
        if need > room {
            return Err(WasmError::PoolTooSmall {
                handler: handler.to_string(),
                what,
                need,
                room,
            });
        }
    }
    if needs.min_table_elements > room.min_table_elements {
        return Err(WasmError::PoolTooSmall {
            handler: handler.to_string(),
            what: "initial table elements",
            need: needs.min_table_elements,
            room: room.min_table_elements,
        });
    }
    Ok(())
}

/// Check `bytes` against the handler's cap and the pool, compile it (off
/// the async threads) and check it against the world.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn compile_version(
    engine: &Engine,
    linker: &Arc<Linker<HostState>>,
    cache: &ArtifactCache,
    room: &Needs,
    spec: &HandlerSpec,
    caps: &Arc<Capabilities>,
    module: &Path,
    bytes: Vec<u8>,
) -> Result<(HandlerVersion, Source), WasmError> {
    let needs = read_needs(module, &bytes)?;
    check_memory(spec, &needs)?;
    check_room(&spec.name, &needs, room)?;
    let (engine2, linker2, cache2, path) = (
        engine.clone(),
        linker.clone(),
        cache.clone(),
        module.to_path_buf(),
    );
    let (hash, pre, source) = tokio::task::spawn_blocking(move || {
        prepare(&engine2, &linker2, Some(&cache2), &path, &bytes)
    })
    .await
    .map_err(|e| WasmError::Engine(format!("compile task failed: {e}")))??;
    let hex = hash.to_hex();
    let version = HandlerVersion {
        pre,
        from_cache: source == Source::Cache,
        hash,
        short: Arc::from(&hex.as_str()[..12]),
        loaded_at: Utc::now(),
        caps: caps.clone(),
        timeout: spec.timeout,
        memory: usize::try_from(spec.memory.bytes()).unwrap_or(usize::MAX),
        max_retry: spec.max_retry,
        pool: (spec.instances == InstanceMode::Reuse).then(|| WarmPool {
            idle: std::sync::Mutex::new(Vec::new()),
            max_idle: warm_pool_size(spec),
            reuse_events: spec.reuse_events,
        }),
    };
    Ok((version, source))
}

/// Validate, compile and link one component. Blocking (compiles).
pub(crate) fn prepare(
    engine: &Engine,
    linker: &Linker<HostState>,
    cache: Option<&ArtifactCache>,
    path: &Path,
    bytes: &[u8],
) -> Result<(blake3::Hash, HandlerPre<HostState>, Source), WasmError> {
    let invalid = |reason: String| WasmError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    sniff(bytes).map_err(invalid)?;
    let hash = blake3::hash(bytes);
    let (component, source) = match cache {
        Some(c) => c.load_or_compile(engine, bytes, &hash),
        None => wasmtime::component::Component::new(engine, bytes).map(|c| (c, Source::Compiled)),
    }
    .map_err(|e| invalid(format!("not a valid component: {e:#}")))?;
    let instance_pre = linker.instantiate_pre(&component).map_err(|e| {
        let imports = component
            .component_type()
            .imports(engine)
            .map(|(name, _)| name.to_string())
            .collect::<Vec<_>>();
        invalid(
            wit_version_mismatch(&imports).unwrap_or_else(|| {
                format!("does not fit outrun's `handler` world (outrun:handler@{WIT_VERSION}): {e:#}; handlers may import only wasi:cli/io/clocks/random, wasi:http/outgoing-handler, wasi:config/store, wasi:logging and outrun:handler/{{emit,sql,kv,publish}}")
            }),
        )
    })?;
    let pre = HandlerPre::new(instance_pre).map_err(|e| {
        invalid(format!("does not export `handle: func(event) -> result<outcome, handler-error>` of world outrun:handler/handler@{WIT_VERSION}: {e:#}"))
    })?;
    Ok((hash, pre, source))
}

/// The version of the `outrun:handler` package (wit/handler.wit) this
/// outrun provides.
pub const WIT_VERSION: &str = "0.1.0";

/// When a component imports `outrun:handler` interfaces of another version
/// than [`WIT_VERSION`] (it was built against an older or newer wit/), a
/// message naming each such interface and the fix; linking's own error
/// ("instance export `execute` has the wrong type") does not say why.
fn wit_version_mismatch(imports: &[String]) -> Option<String> {
    let mut versions = Vec::new();
    let mismatched: Vec<&str> = imports
        .iter()
        .filter_map(|name| {
            let (_, version) = name.strip_prefix("outrun:handler/")?.split_once('@')?;
            if version == WIT_VERSION {
                return None;
            }
            if !versions.contains(&version) {
                versions.push(version);
            }
            Some(name.as_str())
        })
        .collect();
    if mismatched.is_empty() {
        return None;
    }
    let key = |v: &str| -> Vec<u64> {
        v.split(['-', '+'])
            .next()
            .unwrap_or(v)
            .split('.')
            .map(|n| n.parse().unwrap_or(0))
            .collect()
    };
    let age = if versions.iter().all(|v| key(v) < key(WIT_VERSION)) {
        "an older"
    } else if versions.iter().all(|v| key(v) > key(WIT_VERSION)) {
        "a newer"
    } else {
        "another"
    };
    Some(format!(
        "was built against {age} version of outrun's WIT (outrun:handler@{}): it imports {}, but this outrun provides outrun:handler@{WIT_VERSION}; rebuild the handler against this outrun's wit/ (the wit/ of its checkout, or of a project made by `outrun new`)",
        versions.join(", outrun:handler@"),
        mismatched.join(", "),
    ))
}

/// Reject what is obviously not a component with a message that says what
/// it is instead.
fn sniff(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Err("file is empty".into());
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(
            "not a WebAssembly file (no \\0asm header); point `module` at a .wasm component".into(),
        );
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err("is a core WebAssembly module, not a component; build the handler for wasm32-wasip2 (or wrap it with `wasm-tools component new`)".into());
    }
    Ok(())
}

/// `outrun handlers check FILE`: Ok when the file is a component that
/// implements world `handler` with only imports outrun provides.
pub fn check_file(path: &Path) -> Result<ComponentInfo, WasmError> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => WasmError::Invalid {
            path: path.to_path_buf(),
            reason: "file not found".into(),
        },
        _ => WasmError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let needs = read_needs(path, &bytes)?;
    let engine = build_engine(EngineLimits {
        max_memory: super::spec::DEFAULT_MEMORY.bytes().max(needs.min_memory),
        instances: 1,
        per_instance: needs,
    })?;
    let linker = linker(&engine).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
    let (hash, pre, _) = prepare(&engine, &linker, None, path, &bytes)?;
    let ty = pre.instance_pre().component().component_type();
    Ok(ComponentInfo {
        path: path.to_path_buf(),
        hash: hash.to_hex().to_string(),
        size: bytes.len() as u64,
        imports: ty.imports(&engine).map(|(n, _)| n.to_string()).collect(),
        exports: ty.exports(&engine).map(|(n, _)| n.to_string()).collect(),
        needs,
    })
}

/// One compiled version of a handler: what a `Route` hands to the dispatch
/// loop. Each event gets a fresh instance of it.
pub struct HandlerVersion {
    pre: HandlerPre<HostState>,
    from_cache: bool,
    pub(crate) hash: blake3::Hash,
    /// First 12 hex digits of `hash`, for logs.
    pub(crate) short: Arc<str>,
    pub(crate) loaded_at: DateTime<Utc>,
    caps: Arc<Capabilities>,
    timeout: Duration,
    memory: usize,
    max_retry: Option<i32>,
    /// `instances = "reuse"`: its warm instances; `None`: fresh per event.
    pool: Option<WarmPool>,
}

impl HandlerVersion {
    pub fn hash(&self) -> String {
        self.hash.to_hex().to_string()
    }
    pub fn loaded_at(&self) -> DateTime<Utc> {
        self.loaded_at
    }
    /// True when the compiled code came from the artifact cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    fn wit_event(&self, event: &Event) -> wit::Event {
        let ms = |t: DateTime<Utc>| u64::try_from(t.timestamp_millis()).unwrap_or(0);
        wit::Event {
            id: event.id.to_string(),
            name: event.name.clone(),
            payload: event.payload.clone(),
            group_id: event.group_id.clone(),
            attempt: u32::try_from(event.attempt()).unwrap_or(1),
            max_attempts: u32::try_from(self.max_retry.unwrap_or(event.max_retry)).unwrap_or(0),
            created_at: ms(event.create_date),
            expires_at: event.expires_at.map(ms),
        }
    }

    /// A trap (or host error) as the event's error: retryable, and worded
    /// for the person reading `last_error`.
    fn describe(&self, err: wasmtime::Error, state: &HostState) -> HandlerError {
        let mut message = if state.limits.hit {
            format!(
                "memory limit {} exceeded",
                ByteSize(state.limits.cap as u64)
            )
        } else {
            match err.downcast_ref::<Trap>() {
                Some(Trap::Interrupt) => {
                    format!("timeout after {}", humantime::format_duration(self.timeout))
                }
                Some(Trap::StackOverflow) => "wasm trap: stack overflow".to_string(),
                Some(Trap::MemoryOutOfBounds) if let Some(func) = deep_recursion(&err) => format!(
                    "wasm trap: stack overflow (out of bounds memory access deep in a recursion of {func}: \
                     the guest's in-memory stack is exhausted)"
                ),
                Some(trap) => trap.to_string(),
                None => format!("handler failed: {err:#}"),
            }
        };
        let stderr = state.stderr.summary();
        if !stderr.is_empty() {
            message.push_str(" (guest stderr: ");
            message.push_str(&stderr);
            message.push(')');
        }
        HandlerError::retry(message)
    }
}

/// A warm instance of `instances = "reuse"`, with the store it lives in.
struct Warm {
    store: wasmtime::Store<HostState>,
    instance: HandlerWorld,
    /// Events it has served.
    uses: u32,
}

/// The idle warm instances of one version (`instances = "reuse"`). Dropped
/// with the version, so a reload starts from fresh instances.
pub(crate) struct WarmPool {
    idle: std::sync::Mutex<Vec<Warm>>,
    /// Most idle instances kept; more in flight are dropped after use.
    max_idle: usize,
    reuse_events: u32,
}

impl WarmPool {
    fn take(&self) -> Option<Warm> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give_back(&self, warm: Warm) {
        if warm.uses >= self.reuse_events {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(warm);
        }
    }
}

/// Idle warm instances a `reuse` handler keeps: its `concurrency`, else
/// this many. Each holds an instance slot of the pool while idle.
pub(crate) fn warm_pool_size(spec: &HandlerSpec) -> usize {
    match spec.instances {
        InstanceMode::Fresh => 0,
        InstanceMode::Reuse => spec.concurrency.unwrap_or(DEFAULT_WARM_POOL),
    }
}

/// Idle warm instances of a `reuse` handler without a `concurrency` cap.
const DEFAULT_WARM_POOL: usize = 8;

impl HandlerVersion {
    /// A new store for an event, with the limits and the deadline check.
    fn new_store(&self, state: HostState) -> wasmtime::Store<HostState> {
        let mut store = wasmtime::Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        // Check the clock on every epoch tick: trap past the deadline,
        // otherwise yield so a busy guest does not hog a tokio worker.
        store.epoch_deadline_callback(|ctx| {
            Ok(if Instant::now() >= ctx.data().deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        store
    }
}

#[async_trait::async_trait]
impl Handler for HandlerVersion {
    async fn handle(&self, event: &Event, effects: &mut Effects) -> Result<Outcome, HandlerError> {
        let deadline = Instant::now() + self.timeout;
        let warm = self.pool.as_ref().and_then(WarmPool::take);
        let (mut store, instance, uses) = match warm {
            Some(mut w) => {
                w.store
                    .data_mut()
                    .next_event(mem::take(effects), event.id.to_string(), deadline);
                (w.store, Some(w.instance), w.uses)
            }
            None => {
                let state = HostState::new(
                    self.caps.clone(),
                    mem::take(effects),
                    event.id.to_string(),
                    self.short.clone(),
                    deadline,
                    self.memory,
                );
                (self.new_store(state), None, 0)
            }
        };
        store.set_epoch_deadline(1);
        let wit_event = self.wit_event(event);
        // The epoch deadline only fires while guest code runs; a guest
        // waiting on a host future (HTTP, SQL) is bounded by this timeout.
        let result = tokio::time::timeout(self.timeout, async {
            let instance: HandlerWorld = match instance {
                Some(i) => i,
                None => self.pre.instantiate_async(&mut store).await?,
            };
            let r = instance.call_handle(&mut store, &wit_event).await?;
            wasmtime::Result::Ok((instance, r))
        })
        .await;
        *effects = mem::take(&mut store.data_mut().effects);
        let data = store.data();
        let (result, instance) = match result {
            Err(_elapsed) => (
                Err(HandlerError::retry(format!(
                    "timeout after {}",
                    humantime::format_duration(self.timeout)
                ))),
                None,
            ),
            Ok(Err(err)) => (Err(self.describe(err, data)), None),
            Ok(Ok((instance, Ok(wit::Outcome::Done)))) => (Ok(Outcome::Done), Some(instance)),
            Ok(Ok((instance, Ok(wit::Outcome::RetryAfter(ms))))) => (
                Ok(Outcome::RetryAfter(Duration::from_millis(ms))),
                Some(instance),
            ),
            // An error the guest returned: it may have left its state
            // half-updated, so its instance is not reused either.
            Ok(Ok((_, Err(e)))) => (
                Err(HandlerError {
                    message: e.message,
                    retryable: e.retryable,
                }),
                None,
            ),
        };
        data.stdout.finish(None);
        data.stderr.finish(None);
        if let (Some(pool), Some(instance)) = (&self.pool, instance) {
            pool.give_back(Warm {
                store,
                instance,
                uses: uses + 1,
            });
        }
        result
    }

    fn version(&self) -> Option<Arc<str>> {
        Some(Arc::from(self.hash.to_hex().as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_version_is_the_one_of_wit_handler() {
        let wit = include_str!("../../../wit/handler.wit");
        assert!(
            wit.contains(&format!("package outrun:handler@{WIT_VERSION};")),
            "WIT_VERSION {WIT_VERSION} is not the package version of wit/handler.wit"
        );
    }

    #[test]
    fn wit_version_mismatch_names_each_interface() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let current = format!("outrun:handler/sql@{WIT_VERSION}");
        assert_eq!(
            wit_version_mismatch(&names(&[&current, "wasi:io/poll@0.2.0"])),
            None
        );
        let old = wit_version_mismatch(&names(&[
            "outrun:handler/sql@0.0.9",
            "outrun:handler/emit@0.0.9",
            &format!("outrun:handler/kv@{WIT_VERSION}"),
        ]))
        .unwrap();
        assert!(old.contains("an older version"), "{old}");
        assert!(
            old.contains("imports outrun:handler/sql@0.0.9, outrun:handler/emit@0.0.9,"),
            "{old}"
        );
        assert!(!old.contains("outrun:handler/kv"), "{old}");
        let new = wit_version_mismatch(&names(&["outrun:handler/sql@2.0.0-rc.1"])).unwrap();
        assert!(new.contains("a newer version"), "{new}");
    }
}
