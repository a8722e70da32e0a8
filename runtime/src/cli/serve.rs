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
    let router: Arc<dyn Router> = Arc::new(StaticRouter::new());
    let stop = CancellationToken::new();
    let services = start_services(&config, &store, stop.clone()).await?;
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

/// Maintenance and, if configured, the admin server.
async fn start_services(
    config: &Config,
    store: &Store,
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
            handlers: Arc::new(|| serde_json::json!([])),
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
