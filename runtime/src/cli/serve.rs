//! `outrun serve`: migrate, load the handlers, run the dispatch loop, the
//! maintenance services and the admin server until SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::handler::{Router, StaticRouter};
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

pub async fn run(mut config: Config, args: Args) -> anyhow::Result<()> {
    if let Some(a) = args.admin {
        config.admin.listen = Some(a);
    }
    let r = &config.runtime;
    // Workers, the claimer, the acker, the lease extender and maintenance
    // each may hold a connection at once.
    let opts = ConnectOptions {
        max_connections: (r.concurrency as u32 + 4).min(64),
        acquire_timeout: Duration::from_secs(30),
    };
    let store = Store::connect(&config.database_url, &opts)
        .await
        .with_context(|| format!("database {}", redact_url(&config.database_url)))?;
    if !args.no_migrate {
        store
            .migrate()
            .await
            .context("applying migrations (use --no-migrate to skip)")?;
    }
    let stop = CancellationToken::new();
    let (router, registry, _watcher) = if config.handler.is_empty() {
        tracing::warn!(
            "no [[handler]] in the config: every event will be dead with 'no handler for event'"
        );
        (Arc::new(StaticRouter::new()) as Arc<dyn Router>, None, None)
    } else {
        let registry = load_registry(&config).await?;
        // Dropping the watcher stops hot reload, so it lives as long as serve.
        let watcher = registry.watch()?;
        (
            registry.clone() as Arc<dyn Router>,
            Some(registry),
            Some(watcher),
        )
    };
    let services = start_services(&config, &store, registry, stop.clone()).await?;
    let dispatcher = Dispatcher::new(store.clone(), router, config.runtime.clone());
    tracing::info!(database = %redact_url(&config.database_url), worker = dispatcher.worker_id(), "outrun serving");
    let summary = dispatcher.run(shutdown_signal()).await?;
    stop.cancel();
    for s in services {
        let _ = s.await;
    }
    tracing::info!(
        claimed = summary.claimed,
        cancelled = summary.cancelled,
        "outrun stopped"
    );
    Ok(())
}

/// Compile (or load from the artifact cache) every configured handler.
pub(crate) async fn load_registry(config: &Config) -> anyhow::Result<Arc<Registry>> {
    let services = HostServices {
        kv: config.kv.clone(),
        default_max_retry: config.runtime.max_retry,
        cache_dir: config
            .cache_dir
            .as_ref()
            .map(|d| crate::wasm::resolve(&config.base_dir(), d)),
        // One instance per in-flight event, with headroom for a reload
        // overlapping a full house.
        max_instances: (config.runtime.concurrency as u32)
            .saturating_mul(2)
            .max(16),
    };
    let registry = Registry::load(config.handler.clone(), &config.base_dir(), services).await?;
    for h in registry.handlers() {
        tracing::info!(handler = %h.name, module = %h.module.display(), version = &h.hash[..12], events = %h.events.join(","), "handler loaded");
    }
    Ok(registry)
}

/// Maintenance and, if configured, the admin server.
async fn start_services(
    config: &Config,
    store: &Store,
    registry: Option<Arc<Registry>>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let r = &config.runtime;
    let mut tasks = vec![
        tokio::spawn(crate::maintenance::expirer::run(
            store.clone(),
            r.cleanup_interval.min(Duration::from_secs(10)),
            stop.clone(),
        )),
        tokio::spawn(crate::maintenance::cleaner::run(
            store.clone(),
            r.dead_retention,
            r.cleanup_interval,
            stop.clone(),
        )),
    ];
    if let Some(addr) = &config.admin.listen {
        let state = crate::admin::AdminState {
            store: store.clone(),
            metrics: crate::admin::install_metrics()?,
            default_max_retry: r.max_retry,
            handlers: Arc::new(move || match &registry {
                Some(r) => serde_json::to_value(r.handlers()).unwrap_or_default(),
                None => serde_json::json!([]),
            }),
        };
        tasks.push(crate::admin::serve(addr, state, stop).await?);
    }
    Ok(tasks)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
