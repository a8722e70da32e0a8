//! `outrun serve`: migrate, start the maintenance services and the admin
//! server, load the handlers, run the dispatch loop until a stop signal
//! (SIGINT, SIGTERM, SIGHUP, SIGQUIT; see [`super::signals`]), then shut
//! down gracefully.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use super::signals::StopSignals;
use crate::admin::{Health, Phase};

use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::handler::{Router, StaticRouter};
use crate::schema::Schemas;
use crate::store::{ConnectOptions, Store, redact_url};
use crate::wasm::{HostServices, Registry};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Do not apply migrations at start.
    #[arg(long)]
    pub no_migrate: bool,
    /// Admin server address (overrides admin.listen), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
}

/// What `outrun dev` adds to `serve`: a wrapper around the router (its
/// live event lines) and a handle on the registry once it is loaded.
#[derive(Default)]
pub(crate) struct Hooks {
    pub registry: Option<Arc<OnceLock<Arc<Registry>>>>,
    pub wrap_router: Option<WrapRouter>,
}

/// Wraps the router the dispatcher uses.
pub(crate) type WrapRouter = Box<dyn FnOnce(Arc<dyn Router>) -> Arc<dyn Router> + Send>;

pub async fn run(config: Config, args: Args) -> anyhow::Result<()> {
    run_with(config, args, Hooks::default()).await
}

pub(crate) async fn run_with(mut config: Config, args: Args, hooks: Hooks) -> anyhow::Result<()> {
    // Catch the stop signals from the start: one during start-up ends serve
    // cleanly instead of killing it.
    let mut signals = StopSignals::listen()?;
    if let Some(a) = args.admin {
        config.admin.listen = Some(a);
    }
    // Before anything records a metric (handler loading does).
    let metrics = match config
        .admin
        .listen
        .as_ref()
        .or(config.admin.metrics_listen.as_ref())
    {
        Some(_) => Some(crate::admin::exposition::install()?),
        None => None,
    };
    let r = &config.runtime;
    // Workers, the claimer, the acker, the lease extender and maintenance
    // each may hold a connection at once.
    let opts = ConnectOptions {
        max_connections: (r.concurrency as u32 + 4).min(64),
        acquire_timeout: Duration::from_secs(30),
    };
    // Before connecting: a bad schema file is a config error.
    let schemas = load_schemas(&config)?;
    let store = Store::connect(&config.database_url, &opts)
        .await
        .with_context(|| format!("database {}", redact_url(&config.database_url)))?
        .with_schemas(schemas);
    if !args.no_migrate {
        store
            .migrate()
            .await
            .context("applying migrations (use --no-migrate to skip)")?;
    }
    let stop = CancellationToken::new();
    let health = Arc::new(Health::default());
    // Filled once the handlers are loaded; the admin server (up while they
    // compile, answering /livez) reads it.
    let loaded: Arc<OnceLock<Arc<Registry>>> = hooks.registry.unwrap_or_default();
    let services = start_services(&config, &store, metrics, &health, &loaded, stop.clone()).await?;
    // One broker client for every handler and relay; it does not wait for
    // the broker (a broker that is down costs retries, not the start).
    let publisher = crate::publish::Publisher::connect(&config.publish).await?;
    if let Some(p) = &publisher {
        tracing::info!(
            backend = p.backend_name(),
            "publishing to {} (acknowledged before each ack commits)",
            p.backend_name()
        );
    }
    // A handler that fails its first compile stops serve with that error.
    let (compile_failed_tx, mut compile_failed) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let (router, _watcher) = if config.handler.is_empty() && !config.relay.is_empty() {
        (Arc::new(StaticRouter::new()) as Arc<dyn Router>, None)
    } else if config.handler.is_empty() {
        tracing::warn!(
            "no [[handler]] in the config: every event will be dead with 'no handler for event'"
        );
        (Arc::new(StaticRouter::new()) as Arc<dyn Router>, None)
    } else {
        // Checked and read now; compiled in the background, each handler
        // serving as soon as it is ready (its events wait in the table).
        let registry = tokio::select! {
            r = prepare_registry(&config, publisher.clone(), store.schemas()) => {
                let (registry, compile) = r?;
                let compiled = registry.clone();
                let ready = health.clone();
                tokio::spawn(async move {
                    match compile.run().await {
                        // Only serve prunes (at start and after reloads):
                        // a one-off command must not evict what a server
                        // of another config uses.
                        Ok(()) => {
                            compiled.prune_cache();
                            // Ready once every handler runs: a rolling
                            // deploy that waits for /readyz must not stop
                            // the old instance while this one compiles.
                            ready.loaded();
                            tracing::info!("every handler compiled: ready");
                        }
                        Err(e) => {
                            let _ = compile_failed_tx.send(e.into());
                        }
                    }
                });
                registry
            }
            name = signals.recv() => {
                tracing::info!(signal = name, "{name} received while loading handlers; nothing was claimed; outrun stopped");
                stop.cancel();
                for s in services {
                    let _ = s.await;
                }
                return Ok(());
            }
        };
        // Dropping the watcher stops hot reload, so it lives as long as serve.
        let watcher = registry.watch()?;
        let _ = loaded.set(registry.clone());
        (registry as Arc<dyn Router>, Some(watcher))
    };
    let router = match &publisher {
        Some(p) if !config.relay.is_empty() => {
            let relays = crate::publish::relay::RelayRouter::new(router, &config.relay, p)
                .map_err(anyhow::Error::msg)?;
            for r in &config.relay {
                tracing::info!(relay = %r.name(), events = %r.events.join(","), "relay loaded: events published as they are to topic {}", r.topic);
            }
            Arc::new(relays) as Arc<dyn Router>
        }
        _ => router,
    };
    let router = match hooks.wrap_router {
        Some(wrap) => wrap(router),
        None => router,
    };
    let limits = crate::limits::Limits::from_config(&config)?;
    let mut dispatcher =
        Dispatcher::new(store.clone(), router, config.runtime.clone()).with_limits(limits);
    let otel = match &config.otel {
        Some(c) => {
            let otel = Arc::new(crate::otel::Otel::start(c)?);
            tracing::info!(
                endpoint = otel.endpoint(),
                "tracing every attempt (OTLP/HTTP)"
            );
            dispatcher = dispatcher.with_otel(otel.clone());
            Some(otel)
        }
        None => None,
    };
    tracing::info!(database = %redact_url(&config.database_url), worker = dispatcher.worker_id(), "outrun serving");
    if config.handler.is_empty() {
        health.loaded();
    }
    let stopping = health.clone();
    let failed = Arc::new(std::sync::Mutex::new(None));
    let failure = failed.clone();
    let summary = dispatcher
        .run(async move {
            tokio::select! {
                _ = signals.first() => {}
                Ok(e) = &mut compile_failed => {
                    tracing::error!("{e:#}; stopping");
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
            stopping.set_phase(Phase::Stopping);
        })
        .await?;
    if let Some(p) = &publisher {
        // Every acknowledged publish is delivered already; this sends what
        // calls that gave up waiting left queued in the client.
        p.flush(Duration::from_secs(5)).await;
    }
    if let Some(otel) = &otel {
        otel.shutdown(Duration::from_secs(5)).await;
    }
    stop.cancel();
    for s in services {
        let _ = s.await;
    }
    tracing::info!(
        claimed = summary.claimed,
        cancelled = summary.cancelled,
        "outrun stopped"
    );
    let failed = failed.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `[schemas]`, compiled; with `required`, every name a handler binds must
/// have a schema (an event of a name without one could never be enqueued).
pub(crate) fn load_schemas(config: &Config) -> anyhow::Result<Option<Arc<Schemas>>> {
    let Some(schemas) = Schemas::from_config(config)? else {
        return Ok(None);
    };
    if let Some(first) = schemas.unbound(&config.handler).into_iter().next() {
        return Err(first.into());
    }
    tracing::info!(dir = %schemas.dir().display(), schemas = schemas.list().len(), required = schemas.required(), "event schemas loaded");
    Ok(Some(schemas))
}

/// Compile (or load from the artifact cache) every configured handler.
pub(crate) async fn load_registry(
    config: &Config,
    publisher: Option<crate::publish::Publisher>,
    schemas: Option<&Arc<Schemas>>,
) -> anyhow::Result<Arc<Registry>> {
    let (registry, compile) = prepare_registry(config, publisher, schemas).await?;
    compile.run().await?;
    Ok(registry)
}

/// Check every configured handler and read its module; the returned
/// [`Compile`](crate::wasm::Compile) compiles them.
pub(crate) async fn prepare_registry(
    config: &Config,
    publisher: Option<crate::publish::Publisher>,
    schemas: Option<&Arc<Schemas>>,
) -> anyhow::Result<(Arc<Registry>, crate::wasm::Compile)> {
    let services = HostServices {
        kv: config.kv.clone(),
        default_max_retry: config.runtime.max_retry,
        cache_dir: config
            .cache_dir
            .as_ref()
            .map(|d| crate::wasm::resolve(&config.base_dir(), d)),
        cache_keep: config.cache_keep,
        // One instance per in-flight event, with headroom for a reload
        // overlapping a full house.
        max_instances: (config.runtime.concurrency as u32)
            .saturating_mul(2)
            .max(16),
        publisher,
        schemas: schemas.cloned(),
        harness: None,
    };
    Ok(Registry::prepare(config.handler.clone(), &config.base_dir(), services).await?)
}

/// Maintenance and, if configured, the admin server.
async fn start_services(
    config: &Config,
    store: &Store,
    metrics: Option<PrometheusHandle>,
    health: &Arc<Health>,
    loaded: &Arc<OnceLock<Arc<Registry>>>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let r = &config.runtime;
    let r_max_retry = r.max_retry;
    let mut tasks = vec![
        tokio::spawn(crate::maintenance::expirer::run(
            store.clone(),
            r.cleanup_interval.min(Duration::from_secs(10)),
            stop.clone(),
        )),
        tokio::spawn(crate::maintenance::cleaner::run(
            store.clone(),
            r.dead_retention,
            r.keep_done,
            r.cleanup_interval,
            stop.clone(),
        )),
    ];
    let schedules =
        crate::maintenance::scheduler::from_config(config, store.schemas().map(|s| &**s))?;
    let (updates, schedules_rx) = tokio::sync::watch::channel(Arc::new(schedules));
    // Edits of [[schedule]] take effect while serve runs; without a config
    // file there is nothing to watch.
    let watcher = match &config.source {
        Some(path) => Some(
            crate::maintenance::scheduler::watch_config(
                path.clone(),
                store.schemas().cloned(),
                updates,
            )
            .with_context(|| format!("watching the config file {}", path.display()))?,
        ),
        None => None,
    };
    let scheduler_store = store.clone();
    let scheduler_stop = stop.clone();
    tasks.push(tokio::spawn(async move {
        // The watcher lives as long as the scheduler.
        let _watcher = watcher;
        crate::maintenance::scheduler::run(
            scheduler_store,
            schedules_rx,
            r_max_retry,
            scheduler_stop,
        )
        .await
    }));
    if let Some(metrics) = metrics {
        let loaded = loaded.clone();
        let state = crate::admin::AdminState {
            store: store.clone(),
            metrics,
            health: health.clone(),
            default_max_retry: r.max_retry,
            handlers: Arc::new(move || loaded.get().map(|r| r.handlers()).unwrap_or_default()),
            auth: crate::admin::Auth::from_config(&config.admin),
            metrics_elsewhere: false,
            bindings: Arc::new(crate::pause::bindings(config)),
            // Already validated when the dispatcher was built.
            limits: Arc::new(
                crate::limits::Limits::from_config(config)
                    .map(|l| l.limits)
                    .unwrap_or_default(),
            ),
            overview: Default::default(),
        };
        tasks.push(
            crate::admin::serve(
                config.admin.listen.as_deref(),
                config.admin.metrics_listen.as_deref(),
                state,
                stop,
            )
            .await?,
        );
    }
    Ok(tasks)
}
