//! `outrun bench`: throughput and latency of the real runtime against a real
//! database — the real claim loop, the bench guest component (a fresh
//! instance per event) and real acks. Nothing is short-circuited: the
//! handler is loaded through the same [`Registry`] as any other.
//!
//! - `drain` (default): enqueue N events in batched transactions, then start
//!   the runtime and time until every one is acked.
//! - `latency`: start the runtime, then enqueue at a fixed rate, one event
//!   per transaction on a separate connection pool (as an application
//!   would), open loop (each enqueue is scheduled by the clock, not by the
//!   previous one finishing, so a stall shows up as latency instead of
//!   silently lowering the rate).
//!
//! Progress is observed through the dispatcher's [`DispatchObserver`] hook,
//! not by polling the table, so the measurement adds no queries.
//!
//! Handlers with effects (`--handler sql`, `--handler emit`) are checked
//! after the run, outside the measured time: a run only counts if every
//! event committed exactly its one effect (one row in [`SQL_TABLE`], one
//! [`FOLLOW_UP`] event). The bench creates and removes what they write.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Config, RuntimeConfig};
use crate::dispatch::{DispatchObserver, Dispatcher};
use crate::event::{Event, NewEvent};
use crate::handler::Router;
use crate::store::{Backend, ConnectOptions, Store, redact_url};
use crate::wasm::spec::Allow;
use crate::wasm::{HandlerSpec, HostServices, Registry};

/// Enqueue batch size in drain mode: large enough that the per-transaction
/// cost vanishes, small enough that memory stays flat at a million events.
const ENQUEUE_BATCH: usize = 1000;

/// The table the `bench.sql` handler inserts into (the guest's `SQL_TABLE`).
const SQL_TABLE: &str = "outrun_bench_rows";

/// Same columns and types on both backends; the primary key makes a second
/// row for one event an error in the handler, not a silent duplicate.
const CREATE_SQL_TABLE: &str = "CREATE TABLE outrun_bench_rows (
    event_id TEXT PRIMARY KEY,
    attempt BIGINT NOT NULL,
    payload TEXT NOT NULL)";

/// What the `bench.emit` handler emits (the guest's `FOLLOW_UP`). Nothing
/// binds it and the guest delays it by an hour, so follow-ups stay in the
/// outbox unhandled and are not counted as drained work.
const FOLLOW_UP: &str = "bench.followup";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Drain,
    Latency,
    /// Hot reload: a new version of the module renamed into place → the
    /// new version serving, `--events` times (default 20). No database.
    Reload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    /// `bench.noop`: returns Done at once.
    Noop,
    /// `bench.json`: parses the payload with serde_json.
    Json,
    /// `bench.sql`: one INSERT through the `sql` capability, committed with
    /// the ack.
    Sql,
    /// `bench.emit`: emits one follow-up event (delayed, never handled
    /// during the run), committed with the ack.
    Emit,
    /// `bench.publish`: publishes one message to the `[publish]` broker and
    /// waits for its acknowledgement before the ack.
    Publish,
}

impl HandlerKind {
    fn event_name(self) -> &'static str {
        match self {
            HandlerKind::Noop => "bench.noop",
            HandlerKind::Json => "bench.json",
            HandlerKind::Sql => "bench.sql",
            HandlerKind::Emit => "bench.emit",
            HandlerKind::Publish => "bench.publish",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events to enqueue [default: 100000 in drain mode, 10 s worth at
    /// --rate in latency mode].
    #[arg(long)]
    pub events: Option<u64>,
    /// Events handled at once (the runtime's concurrency).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Most events per claim statement (and claimed events queued for the
    /// workers): the runtime's `batch_size`. Larger than the runtime's
    /// default because a drain is all backlog, where the fixed cost of a
    /// claim matters most.
    #[arg(long, default_value_t = 512)]
    pub batch_size: usize,
    /// Size of each event's JSON payload in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    #[arg(long, value_enum, default_value_t = HandlerKind::Noop)]
    pub handler: HandlerKind,
    #[arg(long, value_enum, default_value_t = Mode::Drain)]
    pub mode: Mode,
    /// Enqueues per second in latency mode.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// The bench guest component [default: the one this binary carries].
    /// Any component bound to the `bench.*` events can stand in: the
    /// Python and JavaScript bench guests (target/guests/bench_python.wasm,
    /// bench_js.wasm, built by scripts/build-polyglot-guests.sh) parse the
    /// payload of every event, so they serve `--handler noop|json`.
    #[arg(long, env = "OUTRUN_BENCH_MODULE", value_name = "PATH")]
    pub module: Option<PathBuf>,
    /// The handler's `instances`: `fresh` (a new instance per event) or
    /// `reuse` (a warm pool of `--concurrency` instances, each recycled
    /// after `--reuse-events` events).
    #[arg(long, value_enum, default_value_t = crate::wasm::InstanceMode::Fresh)]
    pub instances: crate::wasm::InstanceMode,
    /// `--instances reuse`: events a warm instance serves before it is
    /// replaced (the handler's `reuse_events`).
    #[arg(long, default_value_t = crate::wasm::spec::DEFAULT_REUSE_EVENTS)]
    pub reuse_events: u32,
    /// Compiled-artifact cache [default: outrun-bench-cache in the system
    /// temp directory], so repeated runs do not recompile the guest.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// `--handler publish`: the topic [default: a fresh `outrun-bench-*`
    /// per run, for brokers that create topics on first produce]. The
    /// broker is the config's `[publish]` (or `OUTRUN_KAFKA_BROKERS` /
    /// `OUTRUN_NATS_URL`).
    #[arg(long)]
    pub topic: Option<String>,
}

/// Where `--handler publish` publishes.
#[derive(Clone)]
struct PublishTarget {
    publisher: crate::publish::Publisher,
    topic: String,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.p50, self.p90, self.p99, self.max
        )
    }
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub backend: Backend,
    pub mode: Mode,
    pub handler: HandlerKind,
    /// The handler's instance mode (`fresh`, `reuse`).
    pub instances: crate::wasm::InstanceMode,
    pub events: u64,
    pub concurrency: usize,
    pub batch_size: usize,
    pub payload_bytes: usize,
    /// Target enqueue rate (latency mode).
    pub rate: Option<f64>,
    /// Wall time from starting the runtime until the last event was acked
    /// (drain), or from the first enqueue until the last ack (latency).
    pub seconds: f64,
    pub events_per_sec: f64,
    pub enqueue_seconds: f64,
    pub enqueue_per_sec: f64,
    /// Where `latency_ms` starts: `enqueue` (latency mode: the start of the
    /// enqueue call, so it includes the INSERT and its commit) or
    /// `handler_start` (drain mode, where every event waits behind the
    /// backlog by design: handler start → ack committed).
    pub latency_from: &'static str,
    /// `latency_from` → ack committed.
    pub latency_ms: Percentiles,
    /// Enqueue call start → handler start (latency mode only).
    pub start_latency_ms: Option<Percentiles>,
    /// The enqueue call itself: INSERT + COMMIT on the application's pool,
    /// including the commit's WAL flush (latency mode only). Part of
    /// `start_latency_ms`, but paid by the application, not the runtime.
    pub enqueue_call_ms: Option<Percentiles>,
    /// Enqueue call returned (committed) → handler start, 0 when the handler
    /// started before the commit acknowledgement reached the application
    /// (latency mode only): the delay the runtime adds.
    pub start_after_commit_ms: Option<Percentiles>,
    /// Rows found in the bench table after the run, one per event (`sql`
    /// handler only; the run fails otherwise).
    pub sql_rows: Option<u64>,
    /// Follow-up events found after the run, one per event (`emit` handler
    /// only; the run fails otherwise).
    pub follow_ups: Option<u64>,
    /// `publish` handler only: the broker (`kafka`, `nats`).
    pub publish_backend: Option<&'static str>,
    /// `publish` handler only: the producer alone against the same broker,
    /// `events` messages like the handler's, `concurrency` publish calls
    /// of one message at a time (what the handlers do, without outrun).
    pub producer_per_sec: Option<f64>,
    /// `publish` handler only: the same messages in calls of 1000 (the
    /// producer's ceiling).
    pub producer_batch_per_sec: Option<f64>,
    /// Peak resident set of this process (VmHWM), MiB.
    pub peak_rss_mb: Option<f64>,
    /// Loading the handler (compile or cache hit), ms; not in `seconds`.
    pub load_ms: f64,
    pub module_from_cache: bool,
}

impl Args {
    /// The bench guest's path, set at the start of [`run`].
    fn module(&self) -> &std::path::Path {
        self.module
            .as_deref()
            .expect("run() sets the module before use")
    }
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.instances == crate::wasm::InstanceMode::Reuse && args.reuse_events == 0 {
        bail!("--reuse-events must be at least 1 (the events a warm instance serves)");
    }
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of events per second");
    }
    let events = args.events.unwrap_or(match args.mode {
        Mode::Drain => 100_000,
        Mode::Latency => (args.rate * 10.0).ceil() as u64,
        Mode::Reload => 20,
    });
    if events == 0 {
        bail!("--events must be at least 1");
    }
    let payload = payload(args.handler, args.payload_bytes);
    let name = args.handler.event_name();
    NewEvent::new(name, payload.clone())
        .validate()
        .context("the generated bench event")?;
    // The shipped guest is written out for the run (the registry loads
    // files); the directory lives until the run ends.
    let _shipped: tempfile::TempDir;
    let args = match &args.module {
        Some(module) if !module.is_file() => bail!(
            "bench guest {} not found; run scripts/build-guests.sh, or leave out --module to use the bench guest this binary carries",
            module.display()
        ),
        Some(_) => args,
        None => {
            _shipped = tempfile::tempdir().context("a temporary directory for the bench guest")?;
            let path = _shipped.path().join("bench.wasm");
            std::fs::write(&path, crate::shipped::guest("bench")?)
                .with_context(|| format!("writing {}", path.display()))?;
            Args {
                module: Some(path),
                ..args
            }
        }
    };

    if args.mode == Mode::Reload {
        let report = reload(&args, events).await?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "reload of a {}-byte module, {} times: written → new version serving: {}",
                report.module_bytes, report.reloads, report.latency_ms
            );
        }
        return Ok(());
    }

    let url = &config.database_url;
    // Workers with effects, the claimer, the acker, the lease extender and
    // the LISTEN connection may each hold one.
    let opts = ConnectOptions {
        max_connections: (args.concurrency as u32 + 4).min(64),
        acquire_timeout: Duration::from_secs(30),
    };
    let store = Store::connect(url, &opts)
        .await
        .with_context(|| format!("database {}", redact_url(url)))?
        // `[schemas]` of the config: measures what checking events costs.
        .with_schemas(crate::schema::Schemas::from_config(config)?);
    store.migrate().await.context("applying migrations")?;
    let before = store.stats().await?;
    let present = before.pending + before.scheduled + before.running + before.dead;
    if present > 0 {
        bail!(
            "the outbox at {} already holds {present} events; the bench needs an empty outbox \
             so it measures only its own events (point --database at a fresh database)",
            redact_url(url)
        );
    }

    let mut runtime = config.runtime.clone();
    runtime.concurrency = args.concurrency;
    runtime.batch_size = args.batch_size;

    let target = match args.handler {
        HandlerKind::Publish => {
            let publisher = crate::publish::Publisher::connect(&config.publish)
                .await?
                .context(
                    "--handler publish needs a broker: set [publish.kafka] brokers (or [publish.nats] url)                      in --config, or OUTRUN_KAFKA_BROKERS",
                )?;
            let topic = args
                .topic
                .clone()
                .unwrap_or_else(|| format!("outrun-bench-{}", Uuid::new_v4().simple()));
            Some(PublishTarget { publisher, topic })
        }
        _ => None,
    };
    let baseline = match &target {
        Some(t) => Some(producer_baseline(t, events, args.concurrency, &payload).await?),
        None => None,
    };

    prepare(&store, args.handler).await?;
    let measured = async {
        let mut report = match args.mode {
            Mode::Drain => {
                // [[limit]]s of the config apply to the drain (a limit that
                // does not bind measures what limits cost).
                let limits = crate::limits::Limits::from_config(config)?;
                drain(
                    &args, &target, &store, runtime, limits, events, name, &payload,
                )
                .await?
            }
            Mode::Reload => unreachable!("handled above"),
            Mode::Latency => {
                let app = Store::connect(url, &ConnectOptions::default())
                    .await
                    .with_context(|| format!("database {}", redact_url(url)))?;
                latency(
                    &args, &target, &store, &app, runtime, events, name, &payload,
                )
                .await?
            }
        };
        let checked = verify(&store, args.handler, events).await?;
        report.sql_rows = checked.sql_rows;
        report.follow_ups = checked.follow_ups;
        if let (Some(t), Some((single, batch))) = (&target, baseline) {
            report.publish_backend = Some(t.publisher.backend_name());
            report.producer_per_sec = Some(single);
            report.producer_batch_per_sec = Some(batch);
        }
        anyhow::Ok(report)
    }
    .await;
    // Also after a failed run: what the bench created must not outlive it
    // (the events themselves stay, as evidence, in a failed run).
    let cleaned = clean_up(&store, args.handler).await;
    let report = measured?;
    cleaned?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

/// What `--mode reload --json` prints.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    pub mode: Mode,
    pub reloads: u64,
    pub module_bytes: usize,
    /// New module renamed into place → `Registry::current` serves it: file
    /// watcher, debounce, read, hash, compile (each version is new, so never
    /// from the artifact cache) and swap.
    pub latency_ms: Percentiles,
    pub peak_rss_mb: Option<f64>,
}

/// Hot reload through the real file watcher: each round writes the module
/// plus a custom section that makes it a new version (new hash, same code)
/// to a temporary name, renames it over the watched file, as a deploy
/// would, and waits until the registry serves it.
async fn reload(args: &Args, rounds: u64) -> anyhow::Result<ReloadReport> {
    // Checked where the user put it, so an error names that file rather
    // than the temporary copy the rounds rewrite.
    crate::wasm::check_file(args.module()).context("the bench guest")?;
    let original = std::fs::read(args.module())
        .with_context(|| format!("reading {}", args.module().display()))?;
    let dir = std::env::temp_dir().join(format!("outrun-bench-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = reload_rounds(&dir, &original, rounds).await;
    let _ = std::fs::remove_dir_all(&dir);
    let mut us = result?;
    Ok(ReloadReport {
        mode: Mode::Reload,
        reloads: rounds,
        module_bytes: original.len(),
        latency_ms: percentiles_us(&mut us),
        peak_rss_mb: peak_rss_mb(),
    })
}

async fn reload_rounds(
    dir: &std::path::Path,
    original: &[u8],
    rounds: u64,
) -> anyhow::Result<Vec<u32>> {
    let module = dir.join("bench.wasm");
    std::fs::write(&module, original)?;
    let spec = bench_spec(module.clone(), HandlerKind::Noop, None);
    let services = HostServices {
        cache_dir: Some(dir.join("cache")),
        max_instances: 4,
        ..HostServices::default()
    };
    let registry = Registry::load(vec![spec], dir, services)
        .await
        .context("loading the bench guest")?;
    let _watcher = registry.watch()?;
    // Let the watcher's start-up catch-up pass finish first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut us = Vec::with_capacity(rounds as usize);
    for round in 0..rounds {
        let bytes =
            crate::wasm::with_custom_section(original, "outrun-bench-reload", &round.to_le_bytes());
        let want = blake3::hash(&bytes).to_hex().to_string();
        let tmp = dir.join(".bench.wasm.tmp");
        std::fs::write(&tmp, &bytes)?;
        let written = Instant::now();
        std::fs::rename(&tmp, &module)?;
        loop {
            if registry.current("bench").is_some_and(|v| v.hash() == want) {
                break;
            }
            if written.elapsed() > Duration::from_secs(30) {
                bail!("version {round} was not serving 30 s after it was written");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        us.push(micros(written.elapsed()));
    }
    Ok(us)
}

/// A JSON payload of exactly `bytes` bytes (or the smallest the handler
/// accepts, if `bytes` is smaller): an [`Order`]-shaped object padded with
/// a `pad` string.
fn payload(kind: HandlerKind, bytes: usize) -> String {
    let base = match kind {
        HandlerKind::Noop | HandlerKind::Sql | HandlerKind::Emit | HandlerKind::Publish => {
            r#"{"id":1,"pad":""}"#.to_string()
        }
        HandlerKind::Json => r#"{"id":4711,"customer":"c-0042","amount_cents":12999,"items":[{"sku":"sku-1","qty":2},{"sku":"sku-2","qty":1}],"pad":""}"#.to_string(),
    };
    let pad = bytes.saturating_sub(base.len());
    base.replacen(r#""pad":"""#, &format!(r#""pad":"{}""#, "x".repeat(pad)), 1)
}

/// The bench guest bound to all of its events, with default limits and only
/// the capability `kind` uses (as a deployment would grant it), so the noop
/// and json runs measure a handler with none.
fn bench_spec(module: PathBuf, kind: HandlerKind, topic: Option<&str>) -> HandlerSpec {
    let mut allow = Allow::default();
    match kind {
        HandlerKind::Noop | HandlerKind::Json => {}
        HandlerKind::Sql => allow.sql = true,
        HandlerKind::Emit => allow.emit = vec![FOLLOW_UP.into()],
        HandlerKind::Publish => {
            let topic = topic.unwrap_or_default().to_string();
            allow.publish = vec![topic.clone()];
            allow.config.insert("topic".into(), topic);
        }
    }
    HandlerSpec {
        name: "bench".into(),
        events: [
            HandlerKind::Noop,
            HandlerKind::Json,
            HandlerKind::Sql,
            HandlerKind::Emit,
            HandlerKind::Publish,
        ]
        .iter()
        .map(|k| k.event_name().into())
        .collect(),
        module,
        max_retry: None,
        timeout: crate::wasm::spec::DEFAULT_TIMEOUT,
        memory: crate::wasm::spec::DEFAULT_MEMORY,
        concurrency: None,
        instances: crate::wasm::InstanceMode::Fresh,
        reuse_events: crate::wasm::spec::DEFAULT_REUSE_EVENTS,
        allow,
        source: None,
        build: None,
    }
}

async fn load_handler(
    args: &Args,
    target: &Option<PublishTarget>,
) -> anyhow::Result<(Arc<Registry>, f64, bool)> {
    let mut spec = bench_spec(
        args.module().to_path_buf(),
        args.handler,
        target.as_ref().map(|t| t.topic.as_str()),
    );
    spec.instances = args.instances;
    spec.reuse_events = args.reuse_events;
    if args.instances == crate::wasm::InstanceMode::Reuse {
        // The warm pool keeps `concurrency` idle instances (8 without it):
        // one per worker, so no event waits for a fresh one in steady state.
        spec.concurrency = Some(args.concurrency);
    }
    let services = HostServices {
        cache_dir: Some(
            args.cache_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("outrun-bench-cache")),
        ),
        max_instances: u32::try_from(args.concurrency).unwrap_or(u32::MAX),
        publisher: target.as_ref().map(|t| t.publisher.clone()),
        ..HostServices::default()
    };
    let started = Instant::now();
    let registry = Registry::load(vec![spec], std::path::Path::new("."), services)
        .await
        .context("loading the bench guest")?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let from_cache = registry.current("bench").is_some_and(|v| v.from_cache());
    Ok((registry, load_ms, from_cache))
}

/// Records handler starts and acks. In drain mode only events in flight are
/// kept (a million-event run must not grow with N); latency mode keeps one
/// start and one ack instant per event for the join with the enqueue times.
struct Recorder {
    keep_all: bool,
    started: Mutex<HashMap<Uuid, Instant>>,
    acked: Mutex<Vec<(Uuid, Instant)>>,
    /// Drain mode: handler start → ack, µs.
    service_us: Mutex<Vec<u32>>,
    acked_count: AtomicU64,
    target: u64,
    all_acked: Notify,
}

impl Recorder {
    fn new(target: u64, keep_all: bool) -> Self {
        Self {
            keep_all,
            started: Mutex::new(HashMap::new()),
            acked: Mutex::new(Vec::new()),
            service_us: Mutex::new(Vec::with_capacity(if keep_all {
                0
            } else {
                target.min(10_000_000) as usize
            })),
            acked_count: AtomicU64::new(0),
            target,
            all_acked: Notify::new(),
        }
    }

    async fn wait_all_acked(&self, deadline: Duration) -> anyhow::Result<()> {
        let wait = async {
            loop {
                let notified = self.all_acked.notified();
                if self.acked_count.load(Ordering::Acquire) >= self.target {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.map_err(|_| {
            anyhow::anyhow!(
                "only {} of {} events were acked within {deadline:?}; check the log (OUTRUN_LOG=info) for handler errors",
                self.acked_count.load(Ordering::Acquire),
                self.target
            )
        })
    }
}

impl DispatchObserver for Recorder {
    fn on_started(&self, event: &Event) {
        self.started
            .lock()
            .expect("recorder lock")
            .insert(event.id, Instant::now());
    }

    fn on_acked(&self, ids: &[Uuid]) {
        let now = Instant::now();
        if self.keep_all {
            self.acked
                .lock()
                .expect("recorder lock")
                .extend(ids.iter().map(|id| (*id, now)));
        } else {
            let mut started = self.started.lock().expect("recorder lock");
            let mut service = self.service_us.lock().expect("recorder lock");
            for id in ids {
                if let Some(t) = started.remove(id) {
                    service.push(micros(now.duration_since(t)));
                }
            }
        }
        let n = self
            .acked_count
            .fetch_add(ids.len() as u64, Ordering::AcqRel)
            + ids.len() as u64;
        if n >= self.target {
            self.all_acked.notify_waiters();
        }
    }
}

/// How long a run may take before it is declared stuck: generous (500
/// events/s is below the slowest handler, sql with one transaction per
/// event, on a busy machine) so only a real stall trips it.
fn run_deadline(events: u64) -> Duration {
    Duration::from_secs(60 + events / 500)
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn drain(
    args: &Args,
    target: &Option<PublishTarget>,
    store: &Store,
    runtime: RuntimeConfig,
    limits: crate::limits::Limits,
    events: u64,
    name: &str,
    payload: &str,
) -> anyhow::Result<Report> {
    let max_retry = runtime.max_retry;
    let enqueue_started = Instant::now();
    let mut left = events;
    while left > 0 {
        let n = left.min(ENQUEUE_BATCH as u64) as usize;
        let batch: Vec<NewEvent> = (0..n).map(|_| NewEvent::new(name, payload)).collect();
        store.enqueue_batch(&batch, max_retry).await?;
        left -= n as u64;
    }
    let enqueue_seconds = enqueue_started.elapsed().as_secs_f64();

    let (registry, load_ms, from_cache) = load_handler(args, target).await?;
    let recorder = Arc::new(Recorder::new(events, false));
    let router: Arc<dyn Router> = registry.clone();
    let dispatcher = Dispatcher::new(store.clone(), router, runtime)
        .with_observer(recorder.clone())
        .with_limits(limits);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(dispatcher.run_until(stop.clone()));
    let waited = recorder.wait_all_acked(run_deadline(events)).await;
    let seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    run.await.context("dispatch task")??;
    waited?;

    let mut service = std::mem::take(&mut *recorder.service_us.lock().expect("recorder lock"));
    Ok(Report {
        backend: store.backend(),
        mode: Mode::Drain,
        handler: args.handler,
        instances: args.instances,
        events,
        concurrency: args.concurrency,
        batch_size: args.batch_size,
        payload_bytes: payload.len(),
        rate: None,
        seconds,
        events_per_sec: events as f64 / seconds,
        enqueue_seconds,
        enqueue_per_sec: events as f64 / enqueue_seconds,
        latency_from: "handler_start",
        latency_ms: percentiles_us(&mut service),
        start_latency_ms: None,
        enqueue_call_ms: None,
        start_after_commit_ms: None,
        sql_rows: None,
        follow_ups: None,
        publish_backend: None,
        producer_per_sec: None,
        producer_batch_per_sec: None,
        peak_rss_mb: peak_rss_mb(),
        load_ms,
        module_from_cache: from_cache,
    })
}

#[allow(clippy::too_many_arguments)]
async fn latency(
    args: &Args,
    target: &Option<PublishTarget>,
    store: &Store,
    app: &Store,
    runtime: RuntimeConfig,
    events: u64,
    name: &str,
    payload: &str,
) -> anyhow::Result<Report> {
    let max_retry = runtime.max_retry;
    let (registry, load_ms, from_cache) = load_handler(args, target).await?;
    let recorder = Arc::new(Recorder::new(events, true));
    let router: Arc<dyn Router> = registry.clone();
    let dispatcher =
        Dispatcher::new(store.clone(), router, runtime).with_observer(recorder.clone());
    let stop = CancellationToken::new();
    let run = tokio::spawn(dispatcher.run_until(stop.clone()));
    // Let the claimer reach its wait (LISTEN registered, first empty claim
    // done) so the first events do not measure start-up.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let first = tokio::time::Instant::now();
    let mut enqueues = tokio::task::JoinSet::new();
    let mut sent: HashMap<Uuid, Instant> = HashMap::with_capacity(events as usize);
    let mut committed: HashMap<Uuid, Instant> = HashMap::with_capacity(events as usize);
    let mut record = |done: Result<_, tokio::task::JoinError>| -> anyhow::Result<()> {
        let (id, t0, t1) = done.context("enqueue task")??;
        sent.insert(id, t0);
        committed.insert(id, t1);
        Ok(())
    };
    for i in 0..events {
        tokio::time::sleep_until(first + interval.mul_f64(i as f64)).await;
        let (app, ev) = (app.clone(), NewEvent::new(name, payload));
        enqueues.spawn(async move {
            let t0 = Instant::now();
            let id = app.enqueue(&ev, max_retry).await?;
            Ok::<_, crate::store::StoreError>((id, t0, Instant::now()))
        });
        // Reap as we go so the set stays small.
        while let Some(done) = enqueues.try_join_next() {
            record(done)?;
        }
    }
    while let Some(done) = enqueues.join_next().await {
        record(done)?;
    }
    // The last enqueue call returned: the offered rate is what was achieved.
    let enqueue_seconds = first.elapsed().as_secs_f64();
    let waited = recorder.wait_all_acked(run_deadline(events)).await;
    let seconds = first.elapsed().as_secs_f64();
    stop.cancel();
    run.await.context("dispatch task")??;
    waited?;

    let started = std::mem::take(&mut *recorder.started.lock().expect("recorder lock"));
    let acked: HashMap<Uuid, Instant> =
        std::mem::take(&mut *recorder.acked.lock().expect("recorder lock"))
            .into_iter()
            .collect();
    let mut to_start = gaps_us(&sent, &started);
    let mut after_commit = gaps_us(&committed, &started);
    let mut enqueue_call = gaps_us(&sent, &committed);
    let mut to_ack = gaps_us(&sent, &acked);
    if to_start.len() as u64 != events || to_ack.len() as u64 != events {
        bail!(
            "latency join incomplete: {} enqueued, {} starts and {} acks matched; \
             was another runtime draining the same outbox?",
            sent.len(),
            to_start.len(),
            to_ack.len()
        );
    }
    Ok(Report {
        backend: store.backend(),
        mode: Mode::Latency,
        handler: args.handler,
        instances: args.instances,
        events,
        concurrency: args.concurrency,
        batch_size: args.batch_size,
        payload_bytes: payload.len(),
        rate: Some(args.rate),
        seconds,
        events_per_sec: events as f64 / seconds,
        enqueue_seconds,
        enqueue_per_sec: events as f64 / enqueue_seconds,
        latency_from: "enqueue",
        latency_ms: percentiles_us(&mut to_ack),
        start_latency_ms: Some(percentiles_us(&mut to_start)),
        enqueue_call_ms: Some(percentiles_us(&mut enqueue_call)),
        start_after_commit_ms: Some(percentiles_us(&mut after_commit)),
        sql_rows: None,
        follow_ups: None,
        publish_backend: None,
        producer_per_sec: None,
        producer_batch_per_sec: None,
        peak_rss_mb: peak_rss_mb(),
        load_ms,
        module_from_cache: from_cache,
    })
}

/// For each event in both maps, µs from its instant in `from` to its
/// instant in `to` (0 if `to` came first).
fn gaps_us(from: &HashMap<Uuid, Instant>, to: &HashMap<Uuid, Instant>) -> Vec<u32> {
    from.iter()
        .filter_map(|(id, t0)| to.get(id).map(|t| micros(t.saturating_duration_since(*t0))))
        .collect()
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Creates what the handler writes to, before anything is enqueued. A bench
/// table that already exists is refused rather than dropped: it may not be
/// the bench's.
async fn prepare(store: &Store, kind: HandlerKind) -> anyhow::Result<()> {
    if kind == HandlerKind::Sql {
        execute(store, CREATE_SQL_TABLE).await.with_context(|| {
            format!(
                "creating the bench table {SQL_TABLE} (if an interrupted bench left it, drop it \
                 or point --database at a fresh database)"
            )
        })?;
    }
    Ok(())
}

/// Removes what [`prepare`] created and what the handler wrote outside the
/// outbox's own lifecycle (follow-ups), so the database is left as found.
async fn clean_up(store: &Store, kind: HandlerKind) -> anyhow::Result<()> {
    match kind {
        HandlerKind::Noop | HandlerKind::Json | HandlerKind::Publish => {}
        HandlerKind::Sql => {
            execute(store, &format!("DROP TABLE {SQL_TABLE}"))
                .await
                .with_context(|| format!("dropping the bench table {SQL_TABLE}"))?;
        }
        HandlerKind::Emit => {
            execute(
                store,
                &format!("DELETE FROM outbox_events WHERE name = '{FOLLOW_UP}'"),
            )
            .await
            .context("deleting the follow-up events")?;
        }
    }
    Ok(())
}

/// Effects found after a run, one per event.
#[derive(Debug, Default, PartialEq)]
struct Checked {
    sql_rows: Option<u64>,
    follow_ups: Option<u64>,
}

/// The run must leave nothing behind but its effects (every event acked,
/// none dead or stuck in a lease), and exactly one effect per event: a
/// handler that lost or doubled writes must not produce a number.
async fn verify(store: &Store, kind: HandlerKind, events: u64) -> anyhow::Result<Checked> {
    // `follow_ups`: scheduled events that are the emit handler's effects.
    let left_behind = |s: &crate::store::Stats, follow_ups: u64| {
        format!(
            "the bench left events behind (pending {}, scheduled {}, running {}, dead {}); \
             see `outrun events list --dead` for handler errors",
            s.pending,
            s.scheduled - follow_ups as i64,
            s.running,
            s.dead
        )
    };
    // Failed events first: they explain missing effects.
    let s = store.stats().await?;
    if s.pending + s.running + s.dead > 0 {
        bail!(left_behind(&s, 0));
    }
    let mut checked = Checked::default();
    match kind {
        // Every event acked means every message acknowledged by the broker.
        HandlerKind::Noop | HandlerKind::Json | HandlerKind::Publish => {}
        HandlerKind::Sql => {
            let (rows, distinct) = counts(
                store,
                &format!("SELECT count(*), count(DISTINCT event_id) FROM {SQL_TABLE}"),
            )
            .await
            .with_context(|| format!("counting the rows of {SQL_TABLE}"))?;
            if rows != events || distinct != events {
                bail!(
                    "the sql handler left {rows} rows for {distinct} distinct events in \
                     {SQL_TABLE} after {events} events were acked; each ack must commit \
                     exactly one row"
                );
            }
            checked.sql_rows = Some(rows);
        }
        HandlerKind::Emit => {
            let of = match store.backend() {
                Backend::Postgres => "payload::json->>'of'",
                Backend::Sqlite => "json_extract(payload, '$.of')",
            };
            let (rows, distinct) = counts(
                store,
                &format!(
                    "SELECT count(*), count(DISTINCT {of}) FROM outbox_events \
                     WHERE name = '{FOLLOW_UP}'"
                ),
            )
            .await
            .context("counting the follow-up events")?;
            if rows != events || distinct != events {
                bail!(
                    "the emit handler left {rows} {FOLLOW_UP} events for {distinct} distinct \
                     originals after {events} events were acked; each ack must commit \
                     exactly one"
                );
            }
            checked.follow_ups = Some(rows);
        }
    }
    let follow_ups = checked.follow_ups.unwrap_or(0);
    if s.scheduled.max(0) as u64 != follow_ups {
        bail!(left_behind(&s, follow_ups));
    }
    Ok(checked)
}

/// The producer alone against the bench's broker and topic: `events`
/// messages like the handler's, first as `concurrency` concurrent calls of
/// one message each, then in calls of 1000. Messages per second of each.
async fn producer_baseline(
    target: &PublishTarget,
    events: u64,
    concurrency: usize,
    payload: &str,
) -> anyhow::Result<(f64, f64)> {
    use crate::publish::{MESSAGE_ID_HEADER, Message};
    fn message(topic: &str, payload: &str, i: u64) -> Message {
        Message {
            topic: topic.to_string(),
            key: Some(format!("baseline-{i}")),
            headers: vec![(MESSAGE_ID_HEADER.into(), format!("baseline-{i}"))],
            body: payload.as_bytes().to_vec(),
        }
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (next, target, payload) = (next.clone(), target.clone(), payload.to_string());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= events {
                    return anyhow::Ok(());
                }
                target
                    .publisher
                    .publish(
                        "bench-baseline",
                        vec![message(&target.topic, &payload, i)],
                        None,
                    )
                    .await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("baseline task")?
            .context("the producer baseline")?;
    }
    let single = events as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let n = (events - i).min(1000);
        let batch = (i..i + n)
            .map(|i| message(&target.topic, payload, i))
            .collect();
        target
            .publisher
            .publish("bench-baseline", batch, None)
            .await
            .context("the producer baseline")?;
        i += n;
    }
    let batch = events as f64 / started.elapsed().as_secs_f64();
    Ok((single, batch))
}

/// One statement on the outbox's database, outside the runtime (setup and
/// checks, never in the measured time).
async fn execute(store: &Store, sql: &str) -> anyhow::Result<u64> {
    let done = match store {
        Store::Sqlite(s) => sqlx::query(sql).execute(s.pool()).await?.rows_affected(),
        Store::Postgres(s) => sqlx::query(sql).execute(s.pool()).await?.rows_affected(),
    };
    Ok(done)
}

/// A query returning one row of two counts.
async fn counts(store: &Store, sql: &str) -> anyhow::Result<(u64, u64)> {
    let (a, b): (i64, i64) = match store {
        Store::Sqlite(s) => sqlx::query_as(sql).fetch_one(s.pool()).await?,
        Store::Postgres(s) => sqlx::query_as(sql).fetch_one(s.pool()).await?,
    };
    Ok((a.max(0) as u64, b.max(0) as u64))
}

fn percentiles_us(us: &mut [u32]) -> Percentiles {
    us.sort_unstable();
    let at = |q: f64| -> f64 {
        if us.is_empty() {
            return 0.0;
        }
        let i = ((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1;
        f64::from(us[i]) / 1e3
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// VmHWM from /proc/self/status (Linux); `None` elsewhere.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn print_text(r: &Report) {
    println!(
        "{:?} {:?}, handler {:?} ({:?} instances): {} events, {}-byte payload, concurrency {}, batch {}",
        r.backend,
        r.mode,
        r.handler,
        r.instances,
        r.events,
        r.payload_bytes,
        r.concurrency,
        r.batch_size
    );
    println!(
        "enqueue: {:.0} events/s ({:.2} s)",
        r.enqueue_per_sec, r.enqueue_seconds
    );
    println!(
        "handled: {:.0} events/s ({:.2} s)",
        r.events_per_sec, r.seconds
    );
    if let Some(s) = &r.start_latency_ms {
        println!("enqueue → handler start: {s}");
    }
    if let Some(s) = &r.enqueue_call_ms {
        println!("  of which the enqueue call (INSERT + COMMIT): {s}");
    }
    if let Some(s) = &r.start_after_commit_ms {
        println!("committed → handler start: {s}");
    }
    println!("{} → acked: {}", r.latency_from, r.latency_ms);
    if let Some(n) = r.sql_rows {
        println!("verified: {n} rows in {SQL_TABLE}, one per event");
    }
    if let Some(n) = r.follow_ups {
        println!("verified: {n} {FOLLOW_UP} events, one per event");
    }
    if let (Some(b), Some(single), Some(batch)) = (
        r.publish_backend,
        r.producer_per_sec,
        r.producer_batch_per_sec,
    ) {
        println!(
            "the {b} producer alone, same broker: {single:.0} msg/s in {} concurrent one-message calls, {batch:.0} msg/s in calls of 1000",
            r.concurrency
        );
    }
    if let Some(rss) = r.peak_rss_mb {
        println!("peak RSS: {rss:.1} MiB");
    }
    println!(
        "handler load: {:.1} ms ({})",
        r.load_ms,
        if r.module_from_cache {
            "artifact cache hit"
        } else {
            "compiled"
        }
    );
}
