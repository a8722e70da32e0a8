//! `/livez` and `/readyz` (and `/healthz`, an alias of `/readyz`), and the
//! state they and the metrics read: where `serve` is in its life, whether
//! the database answered last time, and the outbox counts of the last poll.
//!
//! Both probes are O(1): `/livez` does no I/O at all, `/readyz` one
//! primary-key lookup (the newest applied migration, compared with this
//! binary's) with a short timeout.
//! Neither counts the table; the counts come from a poller (see
//! [`super::exposition`]) and only feed the gauges and `/v1/stats`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AdminState;
use crate::store::{Stats, Store, StoreError};

/// How long `/readyz` (and the poller's liveness check of the database)
/// waits for the database. Below the 1 s a Kubernetes probe waits by default.
pub const DB_PING_TIMEOUT: Duration = Duration::from_millis(800);

/// Where `serve` is. Ready only while serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Migrated; the handlers are being compiled or loaded from the cache.
    Loading = 0,
    /// The dispatch loop runs.
    Serving = 1,
    /// A stop signal arrived: no new claims, running handlers finishing.
    Stopping = 2,
}

/// Shared by the admin routes, the poller and `serve`.
#[derive(Debug)]
pub struct Health {
    phase: AtomicU8,
    db_up: AtomicBool,
    /// The last poll's counts; `None` while the database is down or the
    /// last count failed, so the gauges never show stale numbers.
    stats: Mutex<Option<Stats>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Loading as u8),
            db_up: AtomicBool::new(false),
            stats: Mutex::new(None),
        }
    }
}

impl Health {
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Loading → Serving, unless serve is already stopping (a compile that
    /// finishes during shutdown must not make it ready again).
    pub fn loaded(&self) {
        let _ = self.phase.compare_exchange(
            Phase::Loading as u8,
            Phase::Serving as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Loading,
            1 => Phase::Serving,
            _ => Phase::Stopping,
        }
    }

    pub fn db_up(&self) -> bool {
        self.db_up.load(Ordering::Acquire)
    }

    /// Record a database check; a failed one also drops the counts.
    pub fn set_db(&self, up: bool) {
        self.db_up.store(up, Ordering::Release);
        if !up {
            self.set_stats(None);
        }
    }

    pub fn set_stats(&self, stats: Option<Stats>) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    pub fn stats(&self) -> Option<Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ping the database within [`DB_PING_TIMEOUT`] and record the result;
    /// `Err` says why it is down.
    pub async fn check_db(&self, store: &Store) -> Result<(), String> {
        let result = match tokio::time::timeout(DB_PING_TIMEOUT, store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e @ StoreError::MigrationsPending { .. })) => {
                Err(format!("database not migrated: {e}"))
            }
            Ok(Err(e)) => Err(format!("database unreachable: {e}")),
            Err(_) => Err(format!(
                "database did not answer within {} ms",
                DB_PING_TIMEOUT.as_millis()
            )),
        };
        self.set_db(result.is_ok());
        result
    }
}

/// The process is up and its HTTP server answers. No I/O: a slow or down
/// database must not get a healthy process restarted.
pub async fn livez() -> Response {
    (StatusCode::OK, Json(json!({ "status": "alive" }))).into_response()
}

/// Ready to work: handlers loaded, not shutting down, the database answers
/// and has this binary's migrations applied. 503 with
/// `{"status": "not ready", "reason": ...}` otherwise.
pub async fn readyz(State(st): State<AdminState>) -> Response {
    let not_ready = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": reason })),
        )
            .into_response()
    };
    match st.health.phase() {
        Phase::Loading => return not_ready("handlers are still loading".into()),
        Phase::Stopping => return not_ready("shutting down".into()),
        Phase::Serving => {}
    }
    if let Err(reason) = st.health.check_db(&st.store).await {
        return not_ready(reason);
    }
    let handlers = (st.handlers)().len();
    (
        StatusCode::OK,
        Json(json!({ "status": "ready", "database": "ok", "handlers": handlers })),
    )
        .into_response()
}
