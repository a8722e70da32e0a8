//! `outrun demo`: the four shipped handlers end to end on a fresh embedded
//! SQLite database and the embedded kv store, with no server to install.
//!
//! It starts demo stand-ins for the services the handlers call
//! ([`services`]), creates the application tables, binds the components from
//! the handlers directory, enqueues the story of [`scenario`], and runs the
//! real [`Dispatcher`] with the WASM [`Registry`] in-process until only the
//! dead letter is left. Then it checks the end state against the story and
//! renders the report ([`report`]); [`journal`] records what the handlers did
//! along the way.

pub mod journal;
pub mod report;
pub mod scenario;
pub mod services;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::RuntimeConfig;
use crate::dispatch::Dispatcher;
use crate::handler::Router;
use crate::host::KvStore;
use crate::store::{ConnectOptions, Store, StoreError};
use crate::wasm::{HostServices, KvSettings, Registry, WasmError};
pub use journal::Journal;
use report::{FinalState, Observed};
use scenario::{AI_EVENT, FINISHED_APPLICATION, MODULES, REQUEUED_TRIGGER};
use services::{Service, StandIns};

/// Why the demo could not run (as opposed to running and finding
/// mismatches, which is a [`DemoRun`] with failed checks).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "handlers directory {} does not exist; run scripts/build-guests.sh (it writes target/guests/*.wasm) or pass --handlers DIR",
        .0.display()
    )]
    NoHandlersDir(PathBuf),
    #[error(
        "handlers directory {} lacks {}; run scripts/build-guests.sh (it writes target/guests/*.wasm) or pass --handlers DIR",
        dir.display(),
        missing.join(", ")
    )]
    ModulesMissing { dir: PathBuf, missing: Vec<String> },
    #[error("cannot create the demo's temporary directory {}: {source}", path.display())]
    TempDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the demo stand-in services on 127.0.0.1: {0}")]
    StandIns(std::io::Error),
    #[error("demo database: {0}")]
    Store(#[from] StoreError),
    #[error("creating the demo's application tables: {0}")]
    AppTables(sqlx::Error),
    #[error(transparent)]
    Wasm(#[from] WasmError),
    #[error("the dispatch loop stopped: {0}")]
    Dispatch(String),
    #[error("the demo's event schemas: {0}")]
    Schemas(#[from] crate::schema::SchemaError),
}

/// Knobs of one demo run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where `ai_check_requeue.wasm`, `family_sharing.wasm`,
    /// `package_deletion.wasm` and `bonus_accrual.wasm` are.
    pub handlers_dir: PathBuf,
    /// Longest wait for the outbox to drain.
    pub deadline: Duration,
    /// Keep the temporary directory (database file) instead of deleting it.
    pub keep: bool,
    /// Compiled-artifact cache; `None` caches nothing. Never beside the
    /// modules (they may be on a read-only mount): the CLI passes the
    /// config's `cache_dir` or the user's cache directory.
    pub cache_dir: Option<PathBuf>,
}

/// A finished demo: the report, and whether everything was as expected.
#[derive(Debug)]
pub struct DemoRun {
    pub report: String,
    /// The checks that failed (their details are in the report); empty
    /// when the end state matched the story.
    pub mismatches: Vec<String>,
}

/// The runtime knobs of the demo: small delays so it finishes in seconds.
pub fn runtime_config() -> RuntimeConfig {
    RuntimeConfig {
        concurrency: 8,
        batch_size: 16,
        poll_interval: Duration::from_millis(100),
        lease_duration: Duration::from_secs(10),
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(5),
        ..RuntimeConfig::default()
    }
}

/// The shipped schemas (built into the binary) in `dir/schemas`, loaded.
fn write_schemas(dir: &Path) -> Result<Arc<crate::schema::Schemas>, DemoError> {
    let schemas = dir.join("schemas");
    let io = |source| DemoError::TempDir {
        path: schemas.clone(),
        source,
    };
    std::fs::create_dir_all(&schemas).map_err(io)?;
    for (file, text) in scenario::SCHEMAS {
        std::fs::write(schemas.join(file), text).map_err(io)?;
    }
    Ok(Arc::new(crate::schema::Schemas::load(&schemas, false)?))
}

/// Fail early, naming every missing file, before anything is started.
pub fn check_handlers_dir(dir: &Path) -> Result<PathBuf, DemoError> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    if !dir.is_dir() {
        return Err(DemoError::NoHandlersDir(dir));
    }
    let missing: Vec<String> = MODULES
        .iter()
        .filter(|m| !dir.join(m).is_file())
        .map(|m| (*m).to_owned())
        .collect();
    if !missing.is_empty() {
        return Err(DemoError::ModulesMissing { dir, missing });
    }
    Ok(dir)
}

/// A temporary directory removed on drop unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new(keep: bool) -> Result<Self, DemoError> {
        let path = std::env::temp_dir().join(format!(
            "outrun-demo-{}",
            uuid::Uuid::new_v4().simple().to_string().split_at(12).0
        ));
        std::fs::create_dir_all(&path).map_err(|source| DemoError::TempDir {
            path: path.clone(),
            source,
        })?;
        Ok(TempDir { path, keep })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Run the whole demo. `journal` must be the one whose
/// [`Journal::guest_log_layer`] is installed in the tracing subscriber (the
/// report then quotes the handlers' log lines; without it they are missing,
/// nothing else changes).
pub async fn run(opts: &Options, journal: Journal) -> Result<DemoRun, DemoError> {
    let handlers_dir = check_handlers_dir(&opts.handlers_dir)?;
    let tmp = TempDir::new(opts.keep)?;
    let db_path = tmp.path.join("demo.db");
    let url = format!("sqlite://{}?mode=rwc", db_path.display());
    let config = runtime_config();
    let store = Store::connect(
        &url,
        &ConnectOptions {
            max_connections: config.concurrency as u32 + 4,
            acquire_timeout: Duration::from_secs(10),
        },
    )
    .await?;
    store.migrate().await?;
    let Store::Sqlite(sqlite) = &store else {
        unreachable!("the demo database URL is sqlite://")
    };
    let pool = sqlite.pool().clone();
    // The shipped event schemas, checked at enqueue, emit and dispatch.
    let schemas = write_schemas(&tmp.path)?;
    let store = store.with_schemas(Some(schemas.clone()));
    scenario::prepare_tables(&pool)
        .await
        .map_err(DemoError::AppTables)?;

    let stand_ins = StandIns::start().await.map_err(DemoError::StandIns)?;
    let specs = scenario::handler_specs(&handlers_dir, &stand_ins.urls);
    let loading = Instant::now();
    // A debug build compiles for seconds, a cached load takes milliseconds.
    let cache_dir = opts.cache_dir.clone();
    let registry = Registry::load(
        specs,
        &tmp.path,
        HostServices {
            kv: KvSettings::default(),
            default_max_retry: config.max_retry,
            cache_dir: cache_dir.clone(),
            cache_keep: crate::wasm::cache::DEFAULT_KEEP,
            max_instances: 32,
            publisher: None,
            schemas: Some(schemas.clone()),
            harness: None,
        },
    )
    .await?;

    let mut header = String::new();
    header.push_str(&format!(
        "outrun demo: four shipped handlers on a fresh embedded SQLite database and the embedded kv store\n\
         database: {}{}\n\
         demo stand-in services (local HTTP servers playing the real services):\n",
        db_path.display(),
        if opts.keep { " (kept)" } else { " (deleted at exit)" },
    ));
    for (service, url) in [
        (Service::AiCheck, &stand_ins.urls.ai_check),
        (Service::Family, &stand_ins.urls.family),
        (Service::Storage, &stand_ins.urls.storage),
        (Service::Tasks, &stand_ins.urls.tasks),
    ] {
        header.push_str(&format!(
            "  {:<17} (demo stand-in) {url}\n",
            service.label()
        ));
    }
    header.push_str(&format!(
        "handlers from {} (loaded in {:.1} s; {}):\n",
        handlers_dir.display(),
        loading.elapsed().as_secs_f64(),
        match &cache_dir {
            Some(d) => format!("compiled artifacts cached in {}", d.display()),
            None => "no artifact cache: set OUTRUN_CACHE_DIR to keep compiled handlers".into(),
        }
    ));
    for h in registry.handlers() {
        header.push_str(&format!(
            "  {:<17} v{}  {}\n",
            h.name,
            &h.hash[..12],
            h.events.join(", ")
        ));
    }

    header.push_str(&format!(
        "event schemas: {} ({}), checked at enqueue, emit and before dispatch\n",
        schemas
            .list()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        schemas.dir().display()
    ));
    // A producer getting the contract wrong is told at enqueue.
    let refused = match store
        .enqueue(&scenario::invalid_task_solved(), config.max_retry)
        .await
    {
        Err(StoreError::Invalid(e)) => Some(e.to_string()),
        Err(e) => return Err(e.into()),
        Ok(id) => {
            tracing::error!(%id, "the schema did not refuse the invalid TaskSolved.v0");
            None
        }
    };
    if let Some(r) = &refused {
        header.push_str(&format!("enqueue refused by its schema: {r}\n"));
    }
    let events = scenario::events();
    store.enqueue_batch(&events, config.max_retry).await?;
    header.push_str(&format!(
        "enqueued {} events; running the dispatcher until the outbox is drained (times below are since the start)",
        events.len()
    ));

    journal.start_clock();
    let router: Arc<dyn Router> = journal.recording(registry.clone());
    let stop = CancellationToken::new();
    let dispatcher = tokio::spawn(
        Dispatcher::new(store.clone(), router, config.clone()).run_until(stop.clone()),
    );

    let (check_finished_at, drained_at) = drive(
        &store,
        &pool,
        &journal,
        &stand_ins,
        opts.deadline,
        &dispatcher,
    )
    .await?;
    stop.cancel();
    match dispatcher.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(DemoError::Dispatch(e.to_string())),
        Err(e) => return Err(DemoError::Dispatch(e.to_string())),
    }

    let kv = match registry.slots.first().map(|s| &s.caps.kv) {
        Some(KvStore::Memory(m)) => m.snapshot(),
        _ => Vec::new(),
    };
    let seen = Observed {
        refused,
        kv,
        calls: stand_ins.log.calls(),
        attempts: journal.attempts(),
        check_finished_at,
        drained_at,
    };
    stand_ins.stop().await;
    let state = FinalState::read(&store, &pool, seen).await?;
    let checks = report::checks(&state);
    let text = report::render(&header, &state, &checks);
    pool.close().await;
    drop(tmp);
    Ok(DemoRun {
        report: text,
        mismatches: checks
            .into_iter()
            .filter(|c| c.mismatch.is_some())
            .map(|c| c.what)
            .collect(),
    })
}

/// Wait for the outbox to drain, playing the AI-check service's part on the
/// way: once the requeue has happened, finish one running check so the
/// requeued check can go through. Returns (when the check was finished,
/// when the outbox drained); the second is `None` past the deadline.
async fn drive(
    store: &Store,
    pool: &sqlx::SqlitePool,
    journal: &Journal,
    stand_ins: &StandIns,
    deadline: Duration,
    dispatcher: &tokio::task::JoinHandle<Result<crate::dispatch::RunSummary, StoreError>>,
) -> Result<(Option<Duration>, Option<Duration>), DemoError> {
    let until = Instant::now() + deadline;
    let mut finished = None;
    loop {
        if finished.is_none() {
            // A successful run of the check that did not reach the service
            // is a requeue.
            let runs = journal
                .attempts()
                .iter()
                .filter(|a| a.name == AI_EVENT && a.payload.contains(REQUEUED_TRIGGER))
                .filter(|a| a.is_done())
                .count();
            let posts = stand_ins.log.of(Service::AiCheck).len();
            if runs > posts {
                scenario::finish_check(pool, FINISHED_APPLICATION)
                    .await
                    .map_err(|e| DemoError::Store(e.into()))?;
                finished = Some(journal.elapsed());
            }
        }
        let s = store.stats().await?;
        if s.pending + s.scheduled + s.running == 0 {
            return Ok((finished, Some(journal.elapsed())));
        }
        if dispatcher.is_finished() || Instant::now() >= until {
            return Ok((finished, None));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
