//! The admin HTTP server: `/livez`, `/readyz` (and `/healthz`, its alias),
//! Prometheus `/metrics`, and a small JSON API to enqueue, inspect and
//! cancel events (`/v1/events`, `/v1/stats`). Probes and metrics never
//! count the table: the outbox counts behind the gauges are refreshed by a
//! poller ([`exposition::poll_outbox`]), so neither a probe nor a scrape runs
//! more than a trivial query.

pub mod exposition;
pub mod health;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::event::NewEvent;
use crate::store::{ListFilter, Store, StoreError};
use crate::wasm::HandlerInfo;
pub use health::{Health, Phase};

#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    /// From [`exposition::install`].
    pub metrics: PrometheusHandle,
    /// Where serve is, whether the database answers, the last counts.
    pub health: Arc<Health>,
    pub default_max_retry: i32,
    /// The handlers serving now (empty until they are loaded).
    pub handlers: Arc<dyn Fn() -> Vec<HandlerInfo> + Send + Sync>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        // The name before /livez and /readyz existed; it means ready.
        .route("/healthz", get(health::readyz))
        .route("/metrics", get(metrics_text))
        .route("/v1/stats", get(stats))
        .route("/v1/events", get(list).post(enqueue))
        .route("/v1/events/{id}", get(show))
        .route("/v1/events/{id}/cancel", post(cancel))
        .route("/v1/events/cancel", post(cancel_matching))
        .route("/v1/handlers", get(handlers))
        .with_state(state)
}

/// Serve until `stop`, with the outbox poller behind the gauges. Binding
/// errors are returned before serving starts.
pub async fn serve(
    addr: &str,
    state: AdminState,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr: SocketAddr = addr.parse().map_err(|e| {
        anyhow::anyhow!("admin.listen {addr:?} is not a socket address like 127.0.0.1:9464: {e}")
    })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (admin.listen): {e}"))?;
    tracing::info!(%addr, "admin server listening");
    let poller = tokio::spawn(exposition::poll_outbox(
        state.store.clone(),
        state.health.clone(),
        stop.clone(),
    ));
    let app = router(state);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "admin server failed");
        }
        poller.abort();
    }))
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::NotDead(_) | StoreError::AlreadyDead { .. } | StoreError::CancelBusy(_) => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

async fn metrics_text(State(st): State<AdminState>) -> Response {
    let body = exposition::render(&st.metrics, &st.health, &(st.handlers)());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn stats(State(st): State<AdminState>) -> Result<Json<crate::store::Stats>, ApiError> {
    Ok(Json(st.store.stats().await?))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    dead: bool,
    name: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(st): State<AdminState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let filter = ListFilter {
        dead: q.dead,
        name: q.name,
        limit: q.limit.unwrap_or(100).clamp(1, 10_000),
    };
    let events = st.store.list(&filter).await?;
    Ok(Json(events.iter().map(crate::cli::event_json).collect()))
}

async fn show(
    State(st): State<AdminState>,
    Path(id): Path<Uuid>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ev = st.store.get(id).await?.ok_or(StoreError::NotFound(id))?;
    Ok(Json(crate::cli::event_json(&ev)))
}

/// `POST /v1/events/{id}/cancel`: the event becomes dead with `last_error
/// = 'cancelled'`; 404 if unknown, 409 if already dead (or its effects are
/// being committed right now).
async fn cancel(
    State(st): State<AdminState>,
    Path(id): Path<Uuid>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let done = st.store.cancel(id).await?;
    metrics::counter!("outrun_events_dead_total", "reason" => "cancelled").increment(1);
    Ok(Json(
        json!({ "id": id, "cancelled": true, "running": done.running > 0 }),
    ))
}

/// Body of `POST /v1/events/cancel`: which live events to cancel.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    name: String,
    group_id: Option<String>,
}

/// `POST /v1/events/cancel`: cancel every live event with a name (and
/// group); returns the counts.
async fn cancel_matching(
    State(st): State<AdminState>,
    body: Result<Json<CancelBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<crate::store::Cancelled>, ApiError> {
    let Json(b) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let done = st
        .store
        .cancel_matching(&b.name, b.group_id.as_deref())
        .await?;
    metrics::counter!("outrun_events_dead_total", "reason" => "cancelled")
        .increment(done.cancelled);
    Ok(Json(done))
}

/// `POST /v1/events`: 201 with the id; 413 for a body or payload over the
/// limit, 415 without `Content-Type: application/json`, 400 for a body
/// that is not an event, 422 for an event that is not valid.
async fn enqueue(
    State(st): State<AdminState>,
    body: Result<Json<crate::event::EventRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    use axum::extract::rejection::JsonRejection;
    let Json(b) = body.map_err(|e| match e {
        JsonRejection::MissingJsonContentType(_) => ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the event as JSON with the header `Content-Type: application/json`".into(),
        ),
        e if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is too large: an event's payload is limited to {} bytes (1 MiB)",
                crate::event::MAX_PAYLOAD_BYTES
            ),
        ),
        e => ApiError(StatusCode::BAD_REQUEST, e.body_text()),
    })?;
    let event = NewEvent::from(b);
    if let Err(e @ crate::event::InvalidEvent::PayloadTooLarge(_)) = event.validate() {
        return Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()));
    }
    let id = st.store.enqueue(&event, st.default_max_retry).await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
}

async fn handlers(State(st): State<AdminState>) -> Json<Vec<HandlerInfo>> {
    Json((st.handlers)())
}
