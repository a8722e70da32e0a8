//! `outrun handlers run`: one event through one handler, without the queue.
//! The handler test harness: it runs the component exactly as `serve` does
//! (same host, same capabilities), records every call it makes, and prints
//! the outcome with the SQL statements and their results, the emitted
//! events, kv operations, HTTP requests and log lines. SQL runs in a
//! transaction that is rolled back unless `--commit`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use serde::Serialize;

use crate::config::{Config, DEFAULT_DATABASE_URL};
use crate::event::{Event, NewEvent};
use crate::handler::{Effects, Handler as _, HandlerError, Outcome};
use crate::host::harness::{Call, Harness, HttpFixtures, Recorder};
use crate::store::Store;
use crate::wasm::{Allow, HandlerSpec, HostServices, KvSettings, Registry};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The component (.wasm), or the name of a [[handler]] in --config
    /// (then its grants, limits and config values apply).
    #[arg(value_name = "MODULE|HANDLER")]
    pub module: String,
    /// The event name the handler receives.
    #[arg(long, value_name = "NAME")]
    pub event: String,
    /// The event payload: JSON text, @FILE, or @- for stdin.
    #[arg(long, value_name = "JSON|@FILE")]
    pub payload: String,
    /// The event's group id.
    #[arg(long, value_name = "ID")]
    pub group: Option<String>,
    /// The attempt the handler sees (1 = first delivery).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub attempt: i32,
    /// Keep the handler's SQL writes and insert its emitted events into the
    /// outbox (only when it succeeds). Without it everything is rolled back.
    #[arg(long)]
    pub commit: bool,
    /// Redis URL for kv; without it an empty embedded store is used.
    #[arg(long, value_name = "URL")]
    pub kv: Option<String>,
    /// Key prefix of the handler's kv namespace (MODULE form only).
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub kv_prefix: String,
    /// Let the handler reach HOST (or HOST:PORT) over HTTP (MODULE form
    /// only; repeat for more hosts). With --http-fixtures the hosts of the
    /// fixtures are allowed.
    #[arg(long, value_name = "HOST")]
    pub allow_http: Vec<String>,
    /// Answer HTTP requests from this JSON file instead of the network: an
    /// array of {"method", "url", "status", "headers", "body"}.
    #[arg(long, value_name = "FILE")]
    pub http_fixtures: Option<PathBuf>,
    /// A wasi:config value for the handler, KEY=VALUE (MODULE form only;
    /// repeatable).
    #[arg(long = "config-value", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub config_values: Vec<(String, String)>,
    /// Wall-clock budget of the attempt (MODULE form only).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = super::super::parse_duration)]
    pub timeout: Duration,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// What the run prints with --json.
#[derive(Debug, Serialize)]
struct Report {
    handler: String,
    module: PathBuf,
    version: String,
    event: EventView,
    outcome: OutcomeView,
    duration_ms: f64,
    /// True when the SQL writes and emitted events were committed.
    committed: bool,
    database: Option<String>,
    sql: Vec<Call>,
    kv: Vec<Call>,
    http: Vec<Call>,
    logs: Vec<Call>,
    emitted: Vec<NewEvent>,
    /// `publish` calls: `sent` false when recorded only (without --commit
    /// or without a broker in the config).
    published: Vec<Call>,
}

#[derive(Debug, Serialize)]
struct EventView {
    id: String,
    name: String,
    payload: serde_json::Value,
    group_id: Option<String>,
    attempt: i32,
}

#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum OutcomeView {
    Done,
    RetryAfter { ms: u64 },
    Error { retryable: bool, message: String },
}

/// The payload text from `--payload`, checked to be JSON.
fn read_payload(arg: &str) -> anyhow::Result<String> {
    let (text, origin) = match arg.strip_prefix('@') {
        Some("-") => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading the payload from stdin")?;
            (s, "stdin".to_string())
        }
        Some(file) => (
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the payload file {file}"))?,
            file.to_string(),
        ),
        None => (arg.to_string(), "--payload".to_string()),
    };
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
        anyhow::bail!(
            "the payload ({origin}) is not JSON: {e}; pass a JSON document, e.g. --payload '{{\"id\":1}}' or --payload @event.json"
        );
    }
    Ok(text)
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    let payload = read_payload(&args.payload)?;
    crate::event::validate_name(&args.event)
        .map_err(|e| anyhow::anyhow!("--event {:?}: {e}", args.event))?;
    let fixtures = match &args.http_fixtures {
        Some(path) => Some(Arc::new(HttpFixtures::load(path)?)),
        None => None,
    };
    let (spec, base_dir) = handler_spec(config, &args, fixtures.as_deref())?;
    // Messages go to the config's broker only with --commit (as SQL writes
    // are kept only then); otherwise publish calls are recorded and succeed.
    let publisher = if spec.allow.publish.is_empty() || !args.commit {
        None
    } else {
        crate::publish::Publisher::connect(&config.publish).await?
    };
    let bare = config.handler.iter().all(|h| h.name != args.module);
    let harness = Harness {
        recorder: Recorder::default(),
        fixtures,
        // A config handler keeps its own grants; a bare module may emit
        // and publish anything, and the report shows what it did.
        emit_any: bare,
        publish_any: bare,
        send_publish: publisher.is_some(),
    };
    let services = HostServices {
        kv: KvSettings {
            url: args.kv.clone().or_else(|| config.kv.url.clone()),
            timeout: config.kv.timeout,
        },
        default_max_retry: config.runtime.max_retry,
        cache_dir: config.artifact_cache_dir(),
        cache_keep: config.cache_keep,
        max_instances: 2,
        publisher,
        schemas: super::super::serve::load_schemas(config)?,
        harness: Some(harness.clone()),
    };
    let handler_name = spec.name.clone();
    let registry = Registry::load(vec![spec], &base_dir, services).await?;
    let version = registry
        .current(&handler_name)
        .expect("the registry holds the handler it loaded");
    let module = registry
        .handlers()
        .into_iter()
        .next()
        .map(|h| h.module)
        .unwrap_or_default();

    let store = open_database(config).await?;
    let now = Utc::now();
    let event = Event {
        id: uuid::Uuid::now_v7(),
        name: args.event.clone(),
        payload: payload.clone(),
        group_id: args.group.clone(),
        retry: args.attempt - 1,
        max_retry: config.runtime.max_retry.max(args.attempt),
        create_date: now,
        available_at: now,
        expires_at: None,
        locked_by: None,
        locked_until: None,
        last_error: None,
        idempotency_key: None,
        dead_at: None,
        deferrals: 0,
        traceparent: None,
    };
    let mut effects = store.clone().map(Effects::new).unwrap_or_default();
    let started = Instant::now();
    let result = version.handle(&event, &mut effects).await;
    let duration = started.elapsed();
    let (tx, emitted) = effects.into_parts();
    let succeeded = matches!(result, Ok(Outcome::Done));
    let committed = finish(
        store.as_ref(),
        tx,
        &emitted,
        args.commit && succeeded,
        config.runtime.max_retry,
    )
    .await?;

    let calls = harness.recorder.calls();
    let of = |kind: fn(&Call) -> bool| calls.iter().filter(|c| kind(c)).cloned().collect();
    let report = Report {
        handler: handler_name,
        module,
        version: version.hash(),
        event: EventView {
            id: event.id.to_string(),
            name: event.name.clone(),
            payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
            group_id: event.group_id.clone(),
            attempt: args.attempt,
        },
        outcome: match &result {
            Ok(Outcome::Done) => OutcomeView::Done,
            Ok(Outcome::RetryAfter(d)) => OutcomeView::RetryAfter {
                ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            },
            Err(e) => OutcomeView::Error {
                retryable: e.retryable,
                message: e.message.clone(),
            },
        },
        duration_ms: duration.as_secs_f64() * 1000.0,
        committed,
        database: store
            .as_ref()
            .map(|_| crate::store::redact_url(&config.database_url)),
        sql: of(|c| matches!(c, Call::Sql { .. })),
        kv: of(|c| matches!(c, Call::Kv { .. })),
        http: of(|c| matches!(c, Call::Http { .. })),
        logs: of(|c| matches!(c, Call::Log { .. })),
        emitted,
        published: of(|c| matches!(c, Call::Publish { .. })),
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &calls, args.commit)?;
    }
    match result {
        Err(HandlerError { message, retryable }) => anyhow::bail!(
            "handler {} failed ({}): {message}",
            report.handler,
            if retryable {
                "retryable: serve would retry it"
            } else {
                "rejected: serve would mark the event dead"
            }
        ),
        Ok(_) => Ok(()),
    }
}

/// The spec to run: the config's [[handler]] of that name, or one built
/// from the flags around a module file.
fn handler_spec(
    config: &Config,
    args: &Args,
    fixtures: Option<&HttpFixtures>,
) -> anyhow::Result<(HandlerSpec, PathBuf)> {
    if let Some(spec) = config.handler.iter().find(|h| h.name == args.module) {
        let mut spec = spec.clone();
        // The run routes by hand: whatever --event names goes to it.
        spec.events = vec![args.event.clone()];
        return Ok((spec, config.base_dir()));
    }
    let path = Path::new(&args.module);
    if !path.is_file() {
        let names: Vec<&str> = config.handler.iter().map(|h| h.name.as_str()).collect();
        anyhow::bail!(
            "{} is neither a .wasm file nor a [[handler]] of the config{}; pass the component's path (e.g. target/wasm32-wasip2/release/my_handler.wasm) or a handler name with --config FILE",
            args.module,
            if names.is_empty() {
                " (no config with handlers given)".to_string()
            } else {
                format!(" (handlers: {})", names.join(", "))
            }
        );
    }
    let mut http = args.allow_http.clone();
    if let Some(f) = fixtures {
        http.extend(f.hosts());
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "handler".into());
    let spec = HandlerSpec {
        name,
        events: vec![args.event.clone()],
        module: std::path::absolute(path)?,
        max_retry: None,
        timeout: args.timeout,
        memory: crate::wasm::spec::DEFAULT_MEMORY,
        concurrency: None,
        instances: crate::wasm::InstanceMode::Fresh,
        reuse_events: crate::wasm::spec::DEFAULT_REUSE_EVENTS,
        allow: Allow {
            emit: Vec::new(),
            kv: Some(args.kv_prefix.clone()),
            http,
            sql: true,
            publish: Vec::new(),
            config: args.config_values.iter().cloned().collect(),
        },
        source: None,
        build: None,
    };
    Ok((spec, PathBuf::from(".")))
}

/// The database for `sql`: the one given by --database, OUTRUN_DATABASE_URL
/// or the config. When none was chosen and the default SQLite file does not
/// exist, the run has no database: `sql` calls fail (the report says so).
async fn open_database(config: &Config) -> anyhow::Result<Option<Store>> {
    if config.database_url == DEFAULT_DATABASE_URL && !Path::new("outrun.db").exists() {
        return Ok(None);
    }
    Ok(Some(super::super::connect(config).await?))
}

/// Commit or roll back the handler's transaction; inserting its emitted
/// events first when committing. Returns whether anything was committed.
async fn finish(
    store: Option<&Store>,
    tx: Option<crate::store::AckTx>,
    emitted: &[NewEvent],
    commit: bool,
    default_max_retry: i32,
) -> anyhow::Result<bool> {
    if !commit {
        if let Some(tx) = tx {
            tx.rollback()
                .await
                .context("rolling back the handler's SQL")?;
        }
        return Ok(false);
    }
    let mut tx = match (tx, store) {
        (Some(tx), _) => tx,
        (None, Some(store)) if !emitted.is_empty() => store.begin().await?,
        (None, _) if emitted.is_empty() => return Ok(false),
        (None, _) => anyhow::bail!(
            "--commit: the handler emitted {} event(s) but there is no database to insert them into; pass --database URL",
            emitted.len()
        ),
    };
    tx.enqueue_all(emitted, default_max_retry)
        .await
        .context("--commit: inserting the emitted events into the outbox (run `outrun migrate` on this database first)")?;
    tx.commit().await.context("--commit: committing")?;
    Ok(true)
}

fn print_report(r: &Report, calls: &[Call], asked_commit: bool) -> anyhow::Result<()> {
    outln!(
        "handler {} ({}, version {})",
        r.handler,
        r.module.display(),
        &r.version[..12]
    );
    outln!(
        "event   {} {} attempt {}{}",
        r.event.name,
        r.event.id,
        r.event.attempt,
        r.event
            .group_id
            .as_ref()
            .map(|g| format!(" group {g}"))
            .unwrap_or_default()
    );
    for c in calls {
        match c {
            Call::Sql {
                op,
                statement,
                params,
                result,
                error,
            } => {
                let params = if params.is_empty() {
                    String::new()
                } else {
                    format!(" {}", serde_json::Value::Array(params.clone()))
                };
                outln!("sql     {op}: {statement}{params}");
                match (result, error) {
                    (_, Some(e)) => outln!("          -> error: {e}"),
                    (Some(v), None) if *op == "execute" => {
                        outln!("          -> {} row(s) affected", v["affected"])
                    }
                    (Some(v), None) => {
                        let rows = v["rows"].as_array().map_or(0, Vec::len);
                        outln!("          -> {rows} row(s), columns {}", v["columns"]);
                        for row in v["rows"].as_array().into_iter().flatten() {
                            outln!("             {row}");
                        }
                    }
                    (None, None) => {}
                }
            }
            Call::Kv {
                op,
                key,
                args,
                result,
                error,
            } => {
                let args = if args.is_null() {
                    String::new()
                } else {
                    format!(" {args}")
                };
                let answer = match (result, error) {
                    (_, Some(e)) => format!("error: {e}"),
                    // `set` returns nothing.
                    (Some(v), None) if v.is_null() && *op == "set" => "ok".to_string(),
                    (Some(v), None) => v.to_string(),
                    (None, None) => String::new(),
                };
                outln!("kv      {op} {key:?}{args} -> {answer}");
            }
            Call::Http {
                method,
                url,
                status,
                source,
                error,
            } => {
                let answer = match (status, error) {
                    (_, Some(e)) => format!("error: {e}"),
                    (Some(s), None) => s.to_string(),
                    (None, None) => String::new(),
                };
                outln!("http    {method} {url} -> {answer} ({source})");
            }
            Call::Log {
                level,
                context,
                message,
            } => {
                let context = if context.is_empty() {
                    String::new()
                } else {
                    format!(" [{context}]")
                };
                outln!("log     {level}{context}: {message}");
            }
            Call::Publish {
                topic,
                key,
                headers,
                body,
                body_hex,
                sent,
                error,
            } => {
                let key = key
                    .as_ref()
                    .map(|k| format!(" key {k:?}"))
                    .unwrap_or_default();
                let headers = if headers.is_empty() {
                    String::new()
                } else {
                    format!(" headers {headers:?}")
                };
                let body = match (body, body_hex) {
                    (Some(text), _) => text.clone(),
                    (None, Some(hex)) => format!("0x{hex}"),
                    (None, None) => String::new(),
                };
                let what = match (error, sent) {
                    (Some(e), _) => format!("error: {e}"),
                    (None, true) => "sent".into(),
                    (None, false) => "recorded, not sent".into(),
                };
                outln!("publish {topic}{key}{headers} {body} -> {what}");
            }
        }
    }
    for e in &r.emitted {
        outln!(
            "emit    {} {}{}",
            e.name,
            e.payload,
            e.group_id
                .as_ref()
                .map(|g| format!(" group {g}"))
                .unwrap_or_default()
        );
    }
    match &r.outcome {
        OutcomeView::Done => outln!("outcome done in {:.1} ms", r.duration_ms),
        OutcomeView::RetryAfter { ms } => {
            outln!("outcome retry-after {ms} ms (in {:.1} ms)", r.duration_ms)
        }
        OutcomeView::Error { retryable, message } => outln!(
            "outcome {} error in {:.1} ms: {message}",
            if *retryable {
                "retryable"
            } else {
                "non-retryable"
            },
            r.duration_ms
        ),
    }
    let has_writes = calls.iter().any(|c| matches!(c, Call::Sql { .. })) || !r.emitted.is_empty();
    if r.committed {
        outln!("commit  the SQL writes and emitted events were committed");
    } else if r.database.is_none() && calls.iter().any(|c| matches!(c, Call::Sql { .. })) {
        outln!(
            "note    no database was given, so sql calls fail; pass --database URL (sqlite://FILE or postgres://...)"
        );
    } else if has_writes && asked_commit {
        outln!("commit  nothing committed: the handler did not succeed");
    } else if has_writes {
        outln!("commit  rolled back (pass --commit to keep the writes and emitted events)");
    }
    Ok(())
}
