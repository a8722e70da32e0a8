//! The capabilities a handler component imports, one file per capability
//! (emit, sql, kv, publish, http, log, config), and [`HostState`], the per-event store
//! data they all work on. Every capability is deny-by-default: the grants
//! come from the handler's `[handler.allow]` section ([`Capabilities`]), and a
//! denied call is answered with `cap-error::denied` plus a warn log; it never
//! reaches the resource.

pub mod config;
pub mod emit;
pub mod harness;
pub mod http;
pub mod kv;
pub mod log;
pub mod output;
pub mod publish;
pub mod sql;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_config::WasiConfigVariables;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::handler::Effects;
use crate::wasm::spec::HandlerSpec;
pub use kv::KvStore;

/// Generated from `wit/handler.wit`, world `handler`. wasi:http and wasi:io
/// map to wasmtime-wasi(-http)'s own types so their host implementations
/// apply; wasi:config's generated trait is unused (wasmtime-wasi-config
/// implements it).
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        imports: { default: async },
        exports: { default: async },
        require_store_data_send: true,
        with: {
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
        },
    });
}

pub use bindings::outrun::handler::types::CapError;

/// Bytes of guest stderr kept per event for the error report: enough for a
/// panic message (the text goes into the event's `last_error`).
const STDERR_CAPTURE: usize = 1024;

/// What one handler is allowed to do, shared by all its versions (hot reload
/// swaps code, not grants) and all its in-flight events.
pub struct Capabilities {
    pub handler: Arc<str>,
    pub emit: HashSet<String>,
    pub kv_prefix: Option<String>,
    pub http: Vec<String>,
    pub sql: bool,
    pub config: WasiConfigVariables,
    pub kv: KvStore,
    pub default_max_retry: i32,
    /// Topics the handler may publish to (exact, or a prefix ending in `*`).
    pub publish: Vec<String>,
    /// The runtime's broker client; `None` when `[publish]` configures none.
    pub publisher: Option<crate::publish::Publisher>,
    /// Emitted events are checked against these before they are buffered.
    pub schemas: Option<Arc<crate::schema::Schemas>>,
    /// `outrun handlers run` only: record calls, answer HTTP from fixtures.
    pub harness: Option<harness::Harness>,
}

impl Capabilities {
    pub fn new(
        spec: &HandlerSpec,
        kv: KvStore,
        default_max_retry: i32,
        publisher: Option<crate::publish::Publisher>,
        schemas: Option<Arc<crate::schema::Schemas>>,
    ) -> Self {
        Self {
            handler: Arc::from(spec.name.as_str()),
            emit: spec.allow.emit.iter().cloned().collect(),
            kv_prefix: spec.allow.kv.clone(),
            http: spec.allow.http.clone(),
            sql: spec.allow.sql,
            config: spec
                .allow
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            kv,
            default_max_retry,
            publish: spec.allow.publish.clone(),
            publisher,
            schemas,
            harness: None,
        }
    }

    /// Record one call when a harness is attached (`outrun handlers run`).
    pub(crate) fn record(&self, call: impl FnOnce() -> harness::Call) {
        if let Some(h) = &self.harness {
            h.recorder.push(call());
        }
    }

    /// The answer to a denied capability call, logged once here so every
    /// capability reports denials the same way.
    pub(crate) fn deny(&self, event_id: &str, what: &str, fix: &str) -> CapError {
        tracing::warn!(handler = %self.handler, event_id, "capability denied: {what}");
        CapError::Denied(format!(
            "{what} is not allowed: add {fix} to [handler.allow] of handler {}",
            self.handler
        ))
    }
}

/// The data of one per-event `Store`: WASI plumbing, the event's effects
/// (moved in for the call and back out afterwards) and its grants.
pub struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) http_ctx: WasiHttpCtx,
    pub(crate) http: http::HttpPolicy,
    pub(crate) caps: Arc<Capabilities>,
    pub(crate) effects: Effects,
    pub(crate) event_id: String,
    /// Short content hash of the running version, for logs.
    pub(crate) version: Arc<str>,
    pub(crate) deadline: Instant,
    pub(crate) limits: MemoryLimiter,
    pub(crate) stdout: output::GuestOutput,
    pub(crate) stderr: output::GuestOutput,
    /// Set by a transient `sql` failure: the ack transaction is lost (the
    /// connection is gone, or PostgreSQL aborted it), so the attempt's later
    /// `sql` calls fail the same way instead of as "transaction aborted",
    /// which would read as the statement's fault.
    pub(crate) sql_lost: Option<String>,
}

impl HostState {
    pub(crate) fn new(
        caps: Arc<Capabilities>,
        effects: Effects,
        event_id: String,
        version: Arc<str>,
        deadline: Instant,
        memory_cap: usize,
    ) -> Self {
        // No files, env, args or network sockets: a handler reaches the world
        // only through its granted capabilities. stdout and stderr go to the
        // debug log (bounded); stderr's tail is also kept so a guest panic
        // message can be reported as the event's error.
        let handler = caps.handler.clone();
        let stdout =
            output::GuestOutput::new("stdout", handler.clone(), version.clone(), &event_id, 0);
        let stderr = output::GuestOutput::new(
            "stderr",
            handler,
            version.clone(),
            &event_id,
            STDERR_CAPTURE,
        );
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            http_ctx: WasiHttpCtx::new(),
            http: http::HttpPolicy {
                caps: caps.clone(),
                event_id: event_id.clone(),
                deadline,
                traceparent: effects.trace().cloned(),
            },
            caps,
            effects,
            event_id,
            version,
            deadline,
            limits: MemoryLimiter {
                cap: memory_cap,
                hit: false,
            },
            stdout,
            stderr,
            sql_lost: None,
        }
    }
}

impl HostState {
    /// Ready a reused instance's state for its next event: that event's
    /// effects, id and deadline, and nothing left from the last one.
    pub(crate) fn next_event(&mut self, effects: Effects, event_id: String, deadline: Instant) {
        self.stdout.finish(Some(&event_id));
        self.stderr.finish(Some(&event_id));
        self.http.event_id = event_id.clone();
        self.http.deadline = deadline;
        self.effects = effects;
        self.event_id = event_id;
        self.deadline = deadline;
        self.limits.hit = false;
        self.sql_lost = None;
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http_ctx,
            table: &mut self.table,
            hooks: &mut self.http,
        }
    }
}

/// Enforces the handler's memory cap and remembers that it did, so the
/// resulting trap (a Rust guest aborts on allocation failure) is reported as
/// "memory limit exceeded" rather than a bare `unreachable`.
pub(crate) struct MemoryLimiter {
    pub(crate) cap: usize,
    pub(crate) hit: bool,
}

/// Tables are small in practice; this bounds a guest that grows one forever.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.cap && maximum.is_none_or(|m| desired <= m);
        if !ok {
            self.hit = true;
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|m| desired <= m))
    }
}

/// Every import outrun provides, added once per engine: WASI p2 (empty
/// context), wasi:http outgoing, wasi:config, wasi:logging and outrun's own
/// emit/sql/kv/publish. Built once; per event only a `Store` is created.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    wasmtime_wasi_config::add_to_linker(&mut linker, config::view)?;
    bindings::wasi::logging::logging::add_to_linker::<HostState, HasSelf<HostState>>(
        &mut linker,
        |s| s,
    )?;
    bindings::outrun::handler::types::add_to_linker::<HostState, HasSelf<HostState>>(
        &mut linker,
        |s| s,
    )?;
    bindings::outrun::handler::emit::add_to_linker::<HostState, HasSelf<HostState>>(
        &mut linker,
        |s| s,
    )?;
    bindings::outrun::handler::sql::add_to_linker::<HostState, HasSelf<HostState>>(
        &mut linker,
        |s| s,
    )?;
    bindings::outrun::handler::kv::add_to_linker::<HostState, HasSelf<HostState>>(
        &mut linker,
        |s| s,
    )?;
    bindings::outrun::handler::publish::add_to_linker::<HostState, HasSelf<HostState>>(
        &mut linker,
        |s| s,
    )?;
    Ok(linker)
}

impl bindings::outrun::handler::types::Host for HostState {}
