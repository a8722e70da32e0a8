//! The operator's dashboard: a single page at `/ui` (plain HTML, CSS and
//! JavaScript embedded in the binary; no CDN, no build step) over the /v1
//! JSON API, and the one route it adds, `GET /v1/overview`.
//!
//! The overview's per-name counts group the whole outbox, which on a large
//! table takes a while (300 ms for a million rows on 2 cores, growing with
//! the table). So a request never counts: [`poll_overview`] does, every
//! [`OVERVIEW_INTERVAL`] (longer when a count is slow), and only while
//! someone has asked for the overview in the last [`IDLE_AFTER`]; the
//! answer carries the count's age. An instance nobody looks at never runs
//! the query.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::AdminState;
use super::error::{ApiError, ErrorBody};
use crate::store::{NameStats, Stats, Store};

/// How often the per-name counts are refreshed while the overview is open.
pub const OVERVIEW_INTERVAL: Duration = Duration::from_secs(10);
/// The poller stops counting this long after the last overview request.
pub const IDLE_AFTER: Duration = Duration::from_secs(300);
/// A count slower than this is given up (and logged).
const COUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// The last per-name count, and when someone last wanted one.
#[derive(Debug, Default)]
pub struct OverviewCache {
    /// Unix seconds of the last overview request (0: never).
    wanted_at: AtomicI64,
    wake: Notify,
    counted: Mutex<Option<Counted>>,
}

#[derive(Debug, Clone)]
struct Counted {
    at: DateTime<Utc>,
    took: Duration,
    names: Vec<NameStats>,
}

impl OverviewCache {
    fn want(&self) {
        self.wanted_at
            .store(Utc::now().timestamp(), Ordering::Relaxed);
        let stale = self
            .counted
            .lock()
            .map(|c| {
                c.as_ref().is_none_or(|c| {
                    (Utc::now() - c.at).to_std().unwrap_or_default() > OVERVIEW_INTERVAL * 3
                })
            })
            .unwrap_or(true);
        if stale {
            // Back from idle (or the first request): count now, not at the
            // next tick.
            self.wake.notify_one();
        }
    }

    fn wanted_recently(&self) -> bool {
        let at = self.wanted_at.load(Ordering::Relaxed);
        at > 0 && Utc::now().timestamp() - at <= IDLE_AFTER.as_secs() as i64
    }

    fn last(&self) -> Option<Counted> {
        self.counted.lock().ok().and_then(|c| c.clone())
    }
}

/// Refresh the overview's per-name counts until `stop`, while wanted. The
/// pause after a count is at least [`OVERVIEW_INTERVAL`] and 20 times the
/// count's duration, so a slow table gets at most 5% of one connection.
pub async fn poll_overview(
    store: Store,
    cache: std::sync::Arc<OverviewCache>,
    stop: CancellationToken,
) {
    let mut pause = OVERVIEW_INTERVAL;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            _ = cache.wake.notified() => {}
        }
        if !cache.wanted_recently() {
            continue;
        }
        let started = Instant::now();
        match tokio::time::timeout(COUNT_TIMEOUT, store.stats_by_name()).await {
            Ok(Ok(names)) => {
                let took = started.elapsed();
                pause = OVERVIEW_INTERVAL.max(took * 20);
                if let Ok(mut c) = cache.counted.lock() {
                    *c = Some(Counted {
                        at: Utc::now(),
                        took,
                        names,
                    });
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "counting the outbox by name for the dashboard failed; the overview shows the last count");
            }
            Err(_) => {
                pause = COUNT_TIMEOUT;
                tracing::warn!(
                    "counting the outbox by name for the dashboard took over {} s; the overview shows the last count and the next count waits a minute",
                    COUNT_TIMEOUT.as_secs()
                );
            }
        }
    }
}

/// One event name in the overview.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NameOverview {
    pub name: String,
    #[serde(flatten)]
    pub stats: Stats,
    /// No instance claims its events (`outrun events pause`).
    pub paused: bool,
}

/// `GET /v1/overview`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// When the per-name counts were taken; `null` until the first count,
    /// which starts with the first request (ask again in a second).
    pub counted_at: Option<DateTime<Utc>>,
    /// Seconds since `counted_at`.
    pub age_secs: Option<f64>,
    /// How long that count took, in milliseconds.
    pub count_ms: Option<u64>,
    /// Every name with events, and every paused name, by name.
    pub names: Vec<NameOverview>,
    /// The sums over `names` (the oldest pending age is their maximum).
    pub totals: Stats,
    /// Paused event names (read now, not cached).
    pub paused: Vec<String>,
    /// The instance answering: `timeline` is its own handler outcomes only.
    pub instance: String,
    /// This instance's last hour, one entry per minute, oldest first.
    pub timeline: Vec<crate::timeline::Minute>,
}

/// Per-name counts (refreshed in the background, with their age), this
/// instance's throughput and handler latency over the last hour, and the
/// paused names: what the dashboard's overview shows.
#[utoipa::path(
    get,
    path = "/v1/overview",
    tag = "events",
    responses(
        (status = 200, description = "The overview. The per-name counts come from a background count at most a few intervals old (see `age_secs`); they are `[]` with `counted_at` null until the first count.", body = Overview),
        (status = 401, description = "Token required for reads.", body = ErrorBody),
        (status = 503, description = "The database does not answer.", body = ErrorBody),
    )
)]
pub(super) async fn overview(State(st): State<AdminState>) -> Result<Json<Overview>, ApiError> {
    st.overview.want();
    let paused = st.store.paused_names().await?;
    let counted = st.overview.last();
    let mut names: Vec<NameOverview> = counted
        .as_ref()
        .map(|c| {
            c.names
                .iter()
                .map(|n| NameOverview {
                    name: n.name.clone(),
                    stats: n.stats.clone(),
                    paused: paused.contains(&n.name),
                })
                .collect()
        })
        .unwrap_or_default();
    for p in &paused {
        if !names.iter().any(|n| &n.name == p) {
            names.push(NameOverview {
                name: p.clone(),
                stats: Stats::default(),
                paused: true,
            });
        }
    }
    names.sort_by(|a, b| a.name.cmp(&b.name));
    let mut totals = Stats::default();
    for n in &names {
        totals.add(&n.stats);
    }
    Ok(Json(Overview {
        counted_at: counted.as_ref().map(|c| c.at),
        age_secs: counted
            .as_ref()
            .map(|c| (Utc::now() - c.at).num_milliseconds() as f64 / 1000.0),
        count_ms: counted.as_ref().map(|c| c.took.as_millis() as u64),
        names,
        totals,
        paused,
        instance: instance_name(),
        timeline: crate::timeline::TIMELINE.last_hour(),
    }))
}

fn instance_name() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| format!("{h} (pid {})", std::process::id()))
        .unwrap_or_else(|| format!("pid {}", std::process::id()))
}

/// The dashboard's files, embedded at compile time.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("ui/style.css"),
    ),
];

/// Nothing but this server may be contacted: the page works offline from
/// the binary, and an injected script could not phone home.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(name: &str) -> Response {
    let Some((_, kind, body)) = ASSETS.iter().find(|(n, ..)| *n == name) else {
        return ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("no dashboard file {name:?}; the dashboard is at /ui"),
        )
        .into_response();
    };
    (
        [
            (header::CONTENT_TYPE, *kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        *body,
    )
        .into_response()
}

pub(super) async fn index() -> Response {
    asset("index.html")
}

pub(super) async fn file(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    asset(&name)
}

/// The `/ui` routes (not part of the /v1 API or its OpenAPI document).
pub(super) fn routes() -> axum::Router<AdminState> {
    use axum::routing::get;
    axum::Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{file}", get(file))
}
