//! The admin HTTP server: `/livez`, `/readyz` (and `/healthz`, its alias),
//! Prometheus `/metrics`, and a small JSON API to enqueue, inspect and
//! cancel events (`/v1/events`, `/v1/stats`). Probes and metrics never
//! count the table: the outbox counts behind the gauges are refreshed by a
//! poller ([`exposition::poll_outbox`]), so neither a probe nor a scrape runs
//! more than a trivial query.

pub mod auth;
pub mod dashboard;
pub mod error;
pub mod exposition;
pub mod health;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::event::{Event, NewEvent};
use crate::store::{Cursor, EventQuery, StateFilter, Store, StoreError};
use crate::wasm::HandlerInfo;
pub use auth::Auth;
use error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
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
    /// Who may change (and, optionally, read) events.
    pub auth: Auth,
    /// /metrics is served on its own listener (`[admin] metrics_listen`),
    /// not on this one.
    pub metrics_elsewhere: bool,
    /// Which names each configured handler and relay binds (for pause by
    /// handler, and to tell a typo from a name).
    pub bindings: Arc<Vec<crate::pause::Binding>>,
    /// The `[[limit]]`s of the config, shown with the handlers they cover.
    pub limits: Arc<Vec<crate::limits::Limit>>,
    /// The dashboard overview's per-name counts (see [`dashboard`]).
    pub overview: Arc<dashboard::OverviewCache>,
}

/// The admin API's description; the paths come from the routes themselves
/// (see [`api_router`]), so a route cannot be left out of it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "outrun admin API",
        description = "Inspect and repair the outbox of an outrun runtime. Every request that \
changes something (POST) needs `Authorization: Bearer <token>` with `[admin] token`; reads \
need it too when `[admin] token_for_reads` is set. Errors are `{\"error\": {\"code\", \"message\"}}`."
    ),
    modifiers(&BearerScheme),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The /v1 routes with their OpenAPI description.
fn api_router() -> OpenApiRouter<AdminState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(stats))
        .routes(routes!(dashboard::overview))
        .routes(routes!(list, enqueue))
        .routes(routes!(show))
        .routes(routes!(attempts))
        .routes(routes!(cancel))
        .routes(routes!(cancel_matching))
        .routes(routes!(replay_matching))
        .routes(routes!(purge_matching))
        .routes(routes!(replay))
        .routes(routes!(handlers))
        .routes(routes!(pauses, pause))
        .routes(routes!(resume))
}

/// The OpenAPI document `GET /v1/openapi.json` serves (and
/// docs/openapi.json holds a copy of).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = api_router().split_for_parts();
    doc.paths.paths.insert(
        "/v1/openapi.json".to_owned(),
        utoipa::openapi::PathItem::new(
            utoipa::openapi::HttpMethod::Get,
            utoipa::openapi::path::OperationBuilder::new()
                .operation_id(Some("openapi"))
                .summary(Some("This document."))
                .response(
                    "200",
                    utoipa::openapi::ResponseBuilder::new()
                        .description("The OpenAPI 3.1 document of the admin API.")
                        .content(
                            "application/json",
                            utoipa::openapi::ContentBuilder::new()
                                .schema(Some(utoipa::openapi::ObjectBuilder::new()))
                                .build(),
                        )
                        .build(),
                )
                .build(),
        ),
    );
    doc
}

/// The document as checked in (pretty JSON, one trailing newline).
pub fn openapi_json() -> String {
    let mut text = openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    text.push('\n');
    text
}

pub fn router(state: AdminState) -> axum::Router {
    let doc = Arc::new(openapi_json());
    let (api, _) = api_router().split_for_parts();
    let mut app = axum::Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        // The name before /livez and /readyz existed; it means ready.
        .route("/healthz", get(health::readyz))
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        doc.as_str().to_owned(),
                    )
                }
            }),
        )
        .merge(api)
        .merge(dashboard::routes());
    if !state.metrics_elsewhere {
        app = app.route("/metrics", get(metrics_text));
    }
    let auth = state.auth.clone();
    app.with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            auth,
            auth::require_token,
        ))
        .layer(axum::middleware::from_fn(error::shape_errors))
}

/// `/metrics` alone, for `[admin] metrics_listen`.
pub fn metrics_router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(state)
        .layer(axum::middleware::from_fn(error::shape_errors))
}

/// Serve until `stop`, with the outbox poller behind the gauges: the admin
/// API on `listen`, /metrics there or on `metrics_listen`. Binding errors
/// are returned before serving starts.
pub async fn serve(
    listen: Option<&str>,
    metrics_listen: Option<&str>,
    mut state: AdminState,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    state.metrics_elsewhere = metrics_listen.is_some();
    let mut servers = Vec::new();
    if let Some(addr) = listen {
        let listener = bind(addr, "admin.listen").await?;
        servers.push(("admin server", listener, router(state.clone())));
    }
    if let Some(addr) = metrics_listen {
        let listener = bind(addr, "admin.metrics_listen").await?;
        servers.push(("metrics server", listener, metrics_router(state.clone())));
    }
    let poller = tokio::spawn(exposition::poll_outbox(
        state.store.clone(),
        state.health.clone(),
        stop.clone(),
    ));
    let counter = tokio::spawn(dashboard::poll_overview(
        state.store.clone(),
        state.overview.clone(),
        stop.clone(),
    ));
    Ok(tokio::spawn(async move {
        let runs = servers.into_iter().map(|(what, listener, app)| {
            let stop = stop.clone();
            async move {
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    tracing::error!(error = %e, "{what} failed");
                }
            }
        });
        futures::future::join_all(runs).await;
        poller.abort();
        counter.abort();
    }))
}

async fn bind(addr: &str, key: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let sock: SocketAddr = addr.parse().map_err(|e| {
        anyhow::anyhow!("{key} {addr:?} is not a socket address like 127.0.0.1:9464: {e}")
    })?;
    let listener = tokio::net::TcpListener::bind(sock)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {sock} ({key}): {e}"))?;
    tracing::info!(addr = %sock, "{key}: listening");
    Ok(listener)
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

/// An event as the API and `outrun events show --json` give it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventView {
    pub id: Uuid,
    pub name: String,
    /// The payload as JSON (as a string if the row holds text that is not JSON).
    pub payload: serde_json::Value,
    pub group_id: Option<String>,
    /// `pending`, `scheduled`, `running` or `dead`.
    pub state: &'static str,
    /// Failed attempts so far.
    pub retry: i32,
    pub max_retry: i32,
    pub dead: bool,
    pub create_date: DateTime<Utc>,
    pub available_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The instance holding the lease (while running).
    pub locked_by: Option<String>,
    pub locked_until: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub idempotency_key: Option<String>,
    pub dead_at: Option<DateTime<Utc>>,
    /// Times its handler answered retry-after.
    pub deferrals: i32,
}

impl From<&Event> for EventView {
    fn from(ev: &Event) -> Self {
        EventView {
            id: ev.id,
            name: ev.name.clone(),
            payload: serde_json::from_str(&ev.payload)
                .unwrap_or_else(|_| serde_json::Value::String(ev.payload.clone())),
            group_id: ev.group_id.clone(),
            state: crate::cli::events::event_state(ev, Utc::now()),
            retry: ev.retry,
            max_retry: ev.max_retry,
            dead: ev.is_dead(),
            create_date: ev.create_date,
            available_at: ev.available_at,
            expires_at: ev.expires_at,
            locked_by: ev.locked_by.clone(),
            locked_until: ev.locked_until,
            last_error: ev.last_error.clone(),
            idempotency_key: ev.idempotency_key.clone(),
            dead_at: ev.dead_at,
            deferrals: ev.deferrals,
        }
    }
}

/// `GET /v1/stats`: the counts and the paused names.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatsView {
    #[serde(flatten)]
    pub stats: crate::store::Stats,
    /// Event names no instance claims now (`outrun events pause`).
    pub paused: Vec<String>,
}

/// Counts by state, and the paused names.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "events",
    responses(
        (status = 200, description = "Counts by state (counts the table) and the paused names.", body = StatsView),
        (status = 401, description = "Token required for reads.", body = ErrorBody),
        (status = 503, description = "The database does not answer.", body = ErrorBody),
    )
)]
async fn stats(State(st): State<AdminState>) -> Result<Json<StatsView>, ApiError> {
    Ok(Json(StatsView {
        stats: st.store.stats().await?,
        paused: st.store.paused_names().await?,
    }))
}

/// Query of `GET /v1/events`. Every field is a string so a bad value is
/// reported by its parameter's name.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// `live` (default), `pending`, `scheduled`, `running` or `dead`.
    state: Option<String>,
    /// Same as `state=dead` (the older form).
    dead: Option<String>,
    /// Only events with this name.
    name: Option<String>,
    /// Only events of this group.
    group: Option<String>,
    /// Only events whose last_error contains this text.
    error_contains: Option<String>,
    /// Only events created at or after this moment: RFC 3339
    /// (`2026-11-30T12:00:00Z`) or an age (`1h`, `30m`).
    since: Option<String>,
    /// Events per page, 1 to 1000 (default 100).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of events.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl ListParams {
    fn query(self) -> Result<EventQuery, ApiError> {
        let mut state = match self.state.as_deref() {
            None | Some("") => StateFilter::Live,
            Some(s) => s.parse().map_err(|e| ApiError::bad_param("state", e))?,
        };
        match self.dead.as_deref() {
            None | Some("false") => {}
            Some("true") => state = StateFilter::Dead,
            Some(other) => {
                return Err(ApiError::bad_param(
                    "dead",
                    format!("{other:?} is not true or false"),
                ));
            }
        }
        let limit = match self.limit.as_deref() {
            None | Some("") => 100,
            Some(l) => match l.parse::<i64>() {
                Ok(n) if (1..=1000).contains(&n) => n,
                _ => {
                    return Err(ApiError::bad_param(
                        "limit",
                        format!("{l:?} is not a number from 1 to 1000"),
                    ));
                }
            },
        };
        let since = match self.since.as_deref() {
            None | Some("") => None,
            Some(s) => Some(
                crate::store::query::parse_since(s).map_err(|e| ApiError::bad_param("since", e))?,
            ),
        };
        let after = match self.cursor.as_deref() {
            None | Some("") => None,
            Some(c) => {
                let cursor = Cursor::decode(c).ok_or_else(|| {
                    ApiError::bad_param(
                        "cursor",
                        "not a cursor this server gave out; pass `next_cursor` of the previous page unchanged, or leave it out for the first page",
                    )
                })?;
                if cursor.dead != state.is_dead() {
                    return Err(ApiError::bad_param(
                        "cursor",
                        "this cursor belongs to a listing of another state; keep the filters of the page that gave it",
                    ));
                }
                Some(cursor)
            }
        };
        let text = |v: Option<String>| v.filter(|s| !s.is_empty());
        Ok(EventQuery {
            state,
            name: text(self.name),
            group_id: text(self.group),
            error_contains: text(self.error_contains),
            since,
            limit,
            after,
        })
    }
}

/// List events, filtered, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(ListParams),
    responses(
        (status = 200, description = "A page of events: live ones oldest first, dead ones newest dead first.", body = EventPage),
        (status = 400, description = "A malformed parameter; the message names it.", body = ErrorBody),
        (status = 401, description = "Token required for reads.", body = ErrorBody),
        (status = 503, description = "The database does not answer.", body = ErrorBody),
    )
)]
async fn list(
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<EventPage>, ApiError> {
    let page = st.store.page(&q.query()?).await?;
    Ok(Json(EventPage {
        events: page.events.iter().map(EventView::from).collect(),
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

/// One event with its attempt history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventDetail {
    #[serde(flatten)]
    pub event: EventView,
    /// Its failed, deferred and interrupted attempts, oldest first (the
    /// last `[runtime] attempt_history`).
    pub attempts: Vec<crate::store::Attempt>,
}

/// One event, with its attempt history.
#[utoipa::path(
    get,
    path = "/v1/events/{id}",
    tag = "events",
    params(("id" = Uuid, Path, description = "The event's id")),
    responses(
        (status = 200, description = "The event and its attempts.", body = EventDetail),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 401, description = "Token required for reads.", body = ErrorBody),
        (status = 404, description = "No such event (it may have been handled and deleted).", body = ErrorBody),
    )
)]
async fn show(
    State(st): State<AdminState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<EventDetail>, ApiError> {
    let ev = st.store.get(id).await?.ok_or(StoreError::NotFound(id))?;
    Ok(Json(EventDetail {
        event: EventView::from(&ev),
        attempts: st.store.attempts(id).await?,
    }))
}

/// An event's recorded attempts, also after its row is gone: a handled
/// event's (outcome `done`) for as long as `[runtime] keep_done` keeps it.
#[utoipa::path(
    get,
    path = "/v1/events/{id}/attempts",
    tag = "events",
    params(("id" = Uuid, Path, description = "The event's id")),
    responses(
        (status = 200, description = "Its attempts, oldest first.", body = Vec<crate::store::Attempt>),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 401, description = "Token required for reads.", body = ErrorBody),
        (status = 404, description = "No such event and no record of it.", body = ErrorBody),
    )
)]
async fn attempts(
    State(st): State<AdminState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Vec<crate::store::Attempt>>, ApiError> {
    let attempts = st.store.attempts(id).await?;
    if attempts.is_empty() && st.store.get(id).await?.is_none() {
        return Err(StoreError::NotFound(id).into());
    }
    Ok(Json(attempts))
}

/// What cancelling one event did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CancelledOne {
    pub id: Uuid,
    pub cancelled: bool,
    /// It was running: that attempt ends without effects.
    pub running: bool,
}

/// Cancel one live event: it becomes dead with `last_error = 'cancelled'`.
#[utoipa::path(
    post,
    path = "/v1/events/{id}/cancel",
    tag = "events",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The event's id")),
    responses(
        (status = 200, description = "Cancelled.", body = CancelledOne),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 404, description = "No such event (handled and deleted, or never existed).", body = ErrorBody),
        (status = 409, description = "Already dead, or its effects are being committed right now.", body = ErrorBody),
    )
)]
async fn cancel(
    State(st): State<AdminState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<CancelledOne>, ApiError> {
    let done = st.store.cancel(id).await?;
    metrics::counter!("outrun_events_dead_total", "reason" => "cancelled").increment(1);
    Ok(Json(CancelledOne {
        id,
        cancelled: true,
        running: done.running > 0,
    }))
}

/// Body of the bulk operations (`POST /v1/events/cancel|replay|purge`):
/// which events; every field narrows the selection.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    /// cancel: `live` (default), `pending`, `scheduled` or `running`;
    /// replay and purge: `dead` (default).
    state: Option<StateFilter>,
    name: Option<String>,
    /// Only with `name`.
    group_id: Option<String>,
    /// Only events whose last_error contains this text.
    error_contains: Option<String>,
    /// Created (dead events: died) at or after: RFC 3339 or an age (`1h`).
    since: Option<String>,
    /// Count what would change; change nothing.
    #[serde(default)]
    dry_run: bool,
}

impl BulkBody {
    fn filter(&self) -> Result<crate::store::Filter, ApiError> {
        let since = match self.since.as_deref() {
            None | Some("") => None,
            Some(s) => Some(
                crate::store::query::parse_since(s)
                    .map_err(|e| ApiError::bad_request(format!("request body: `since`: {e}")))?,
            ),
        };
        if self.group_id.is_some() && self.name.is_none() {
            return Err(ApiError::bad_request(
                "request body: `group_id` needs `name` (a group is only unique within an event name)",
            ));
        }
        Ok(crate::store::Filter {
            state: self.state,
            name: self.name.clone(),
            group_id: self.group_id.clone(),
            error_contains: self.error_contains.clone(),
            since,
        })
    }
}

/// What a bulk replay or purge did (or, dry, would do).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BulkOutcome {
    pub dry_run: bool,
    /// Events replayed or deleted (dry run: that would be).
    pub matched: u64,
}

/// What a bulk cancel did (or, dry, would do).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CancelOutcome {
    pub dry_run: bool,
    /// Events cancelled (dry run: that would be).
    pub matched: u64,
    #[serde(flatten)]
    pub done: crate::store::Cancelled,
}

/// Cancel the live events a filter selects (at least one condition).
#[utoipa::path(
    post,
    path = "/v1/events/cancel",
    tag = "events",
    security(("bearer" = [])),
    request_body = BulkBody,
    responses(
        (status = 200, description = "The counts.", body = CancelOutcome),
        (status = 400, description = "Not a filter, no condition, or state dead.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 415, description = "Not sent as application/json.", body = ErrorBody),
        (status = 422, description = "The name is not valid.", body = ErrorBody),
    )
)]
async fn cancel_matching(
    State(st): State<AdminState>,
    ApiJson(b): ApiJson<BulkBody>,
) -> Result<Json<CancelOutcome>, ApiError> {
    let filter = b.filter()?;
    if b.dry_run {
        if filter.state == Some(StateFilter::Dead) {
            return Err(StoreError::BadFilter(
                "cancel acts on live events; state dead selects none".into(),
            )
            .into());
        }
        let f = crate::store::Filter {
            state: filter.state.or(Some(StateFilter::Live)),
            ..filter
        };
        let matched = st.store.count_matching(&f).await?;
        return Ok(Json(CancelOutcome {
            dry_run: true,
            matched,
            done: Default::default(),
        }));
    }
    let done = st.store.cancel_filtered(&filter).await?;
    metrics::counter!("outrun_events_dead_total", "reason" => "cancelled")
        .increment(done.cancelled);
    Ok(Json(CancelOutcome {
        dry_run: false,
        matched: done.cancelled,
        done,
    }))
}

/// Replay the dead events a filter selects (all dead events for `{}`).
#[utoipa::path(
    post,
    path = "/v1/events/replay",
    tag = "events",
    security(("bearer" = [])),
    request_body = BulkBody,
    responses(
        (status = 200, description = "How many were replayed (or would be).", body = BulkOutcome),
        (status = 400, description = "Not a filter, or a live state.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 415, description = "Not sent as application/json.", body = ErrorBody),
    )
)]
async fn replay_matching(
    State(st): State<AdminState>,
    ApiJson(b): ApiJson<BulkBody>,
) -> Result<Json<BulkOutcome>, ApiError> {
    let filter = b.filter()?;
    let matched = if b.dry_run {
        dead_count(&st.store, filter).await?
    } else {
        st.store.replay_matching(&filter).await?
    };
    Ok(Json(BulkOutcome {
        dry_run: b.dry_run,
        matched,
    }))
}

/// Delete the dead events a filter selects (all dead events for `{}`).
#[utoipa::path(
    post,
    path = "/v1/events/purge",
    tag = "events",
    security(("bearer" = [])),
    request_body = BulkBody,
    responses(
        (status = 200, description = "How many were deleted (or would be).", body = BulkOutcome),
        (status = 400, description = "Not a filter, or a live state.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 415, description = "Not sent as application/json.", body = ErrorBody),
    )
)]
async fn purge_matching(
    State(st): State<AdminState>,
    ApiJson(b): ApiJson<BulkBody>,
) -> Result<Json<BulkOutcome>, ApiError> {
    let filter = b.filter()?;
    let matched = if b.dry_run {
        dead_count(&st.store, filter).await?
    } else {
        st.store.purge_matching(&filter).await?
    };
    Ok(Json(BulkOutcome {
        dry_run: b.dry_run,
        matched,
    }))
}

async fn dead_count(store: &Store, filter: crate::store::Filter) -> Result<u64, ApiError> {
    if filter.state.is_some_and(|s| s != StateFilter::Dead) {
        return Err(StoreError::BadFilter(
            "replay and purge act on dead events only; leave the state out or say dead".into(),
        )
        .into());
    }
    let f = crate::store::Filter {
        state: Some(StateFilter::Dead),
        ..filter
    };
    Ok(store.count_matching(&f).await?)
}

/// Make one dead event live again (retry 0).
#[utoipa::path(
    post,
    path = "/v1/events/{id}/replay",
    tag = "events",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The event's id")),
    responses(
        (status = 200, description = "Replayed.", body = Enqueued),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 404, description = "No such event (handled and deleted, or never existed).", body = ErrorBody),
        (status = 409, description = "Not dead (it is live: it runs anyway).", body = ErrorBody),
    )
)]
async fn replay(
    State(st): State<AdminState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Enqueued>, ApiError> {
    st.store.replay(id).await?;
    Ok(Json(Enqueued { id }))
}

/// The id of an enqueued event.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Enqueued {
    pub id: Uuid,
}

/// Enqueue an event.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    security(("bearer" = [])),
    request_body = crate::event::EventRequest,
    responses(
        (status = 201, description = "Enqueued (or the event that holds its idempotency key).", body = Enqueued),
        (status = 400, description = "The body is not an event.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 413, description = "Payload over 1 MiB or body over 2 MiB.", body = ErrorBody),
        (status = 415, description = "Not sent as application/json.", body = ErrorBody),
        (status = 422, description = "Not a valid event (empty name, schema refused, ...).", body = ErrorBody),
    )
)]
async fn enqueue(
    State(st): State<AdminState>,
    ApiJson(b): ApiJson<crate::event::EventRequest>,
) -> Result<(StatusCode, Json<Enqueued>), ApiError> {
    let event = NewEvent::from(b);
    if let Err(e @ crate::event::InvalidEvent::PayloadTooLarge(_)) = event.validate() {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()));
    }
    let id = st.store.enqueue(&event, st.default_max_retry).await?;
    Ok((StatusCode::CREATED, Json(Enqueued { id })))
}

/// A handler as `GET /v1/handlers` gives it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HandlerView {
    #[serde(flatten)]
    pub info: HandlerInfo,
    /// The `[[limit]]`s covering some of its events (rate and per-key
    /// concurrency, across instances).
    pub rate_limits: Vec<LimitView>,
}

/// One `[[limit]]`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LimitView {
    /// `handler:NAME` or `event:NAME`.
    pub id: String,
    /// The event names it covers.
    pub names: Vec<String>,
    /// "100/s burst 100, 2 per /customer".
    pub describe: String,
}

/// The handlers serving now: versions, reload history, limits and granted
/// capabilities.
#[utoipa::path(
    get,
    path = "/v1/handlers",
    tag = "handlers",
    responses(
        (status = 200, description = "The handlers serving now (empty while they load).", body = Vec<HandlerView>),
        (status = 401, description = "Token required for reads.", body = ErrorBody),
    )
)]
async fn handlers(State(st): State<AdminState>) -> Json<Vec<HandlerView>> {
    let views = (st.handlers)()
        .into_iter()
        .map(|info| {
            let rate_limits = st
                .limits
                .iter()
                .filter(|l| l.names.iter().any(|n| info.events.contains(n)))
                .map(|l| LimitView {
                    id: l.id.clone(),
                    names: l.names.clone(),
                    describe: l.describe(),
                })
                .collect();
            HandlerView { info, rate_limits }
        })
        .collect();
    Json(views)
}

impl From<crate::pause::PauseError> for ApiError {
    fn from(e: crate::pause::PauseError) -> Self {
        use crate::pause::PauseError as P;
        match e {
            P::Store(e) => e.into(),
            P::UnknownName(_) | P::UnknownHandler { .. } | P::NotPaused(_) => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string())
            }
            P::Ambiguous | P::Missing => ApiError::bad_request(e.to_string()),
        }
    }
}

/// Body of `POST /v1/pauses` and `POST /v1/pauses/resume`: an event name
/// or a handler (every name it binds).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    name: Option<String>,
    handler: Option<String>,
    /// Pause a name no handler binds and no event has (yet).
    #[serde(default)]
    force: bool,
}

/// The names a pause or resume changed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PauseResult {
    /// Names this request paused (or resumed); already paused names are
    /// not repeated.
    pub names: Vec<String>,
}

/// The paused event names.
#[utoipa::path(
    get,
    path = "/v1/pauses",
    tag = "pauses",
    responses(
        (status = 200, description = "Every pause.", body = Vec<crate::store::Pause>),
        (status = 401, description = "Token required for reads.", body = ErrorBody),
    )
)]
async fn pauses(State(st): State<AdminState>) -> Result<Json<Vec<crate::store::Pause>>, ApiError> {
    Ok(Json(st.store.pauses().await?))
}

/// Pause an event name, or every name a handler binds: no instance claims
/// their events (within a second) until resumed.
#[utoipa::path(
    post,
    path = "/v1/pauses",
    tag = "pauses",
    security(("bearer" = [])),
    request_body = PauseBody,
    responses(
        (status = 200, description = "Paused.", body = PauseResult),
        (status = 400, description = "Neither or both of name and handler, or not JSON.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 415, description = "Not sent as application/json.", body = ErrorBody),
        (status = 404, description = "Unknown name (no handler, no event; `force` pauses it anyway) or handler.", body = ErrorBody),
        (status = 422, description = "Not a valid event name.", body = ErrorBody),
    )
)]
async fn pause(
    State(st): State<AdminState>,
    ApiJson(b): ApiJson<PauseBody>,
) -> Result<Json<PauseResult>, ApiError> {
    let target = crate::pause::Target::from_parts(b.name, b.handler)?;
    let names = crate::pause::pause(&st.store, &target, &st.bindings, b.force).await?;
    Ok(Json(PauseResult { names }))
}

/// Resume a paused event name, or the names a handler binds.
#[utoipa::path(
    post,
    path = "/v1/pauses/resume",
    tag = "pauses",
    security(("bearer" = [])),
    request_body = PauseBody,
    responses(
        (status = 200, description = "Resumed: their events run from where they stopped.", body = PauseResult),
        (status = 400, description = "Neither or both of name and handler, or not JSON.", body = ErrorBody),
        (status = 401, description = "Missing or wrong token.", body = ErrorBody),
        (status = 415, description = "Not sent as application/json.", body = ErrorBody),
        (status = 404, description = "Not paused, or no such handler.", body = ErrorBody),
    )
)]
async fn resume(
    State(st): State<AdminState>,
    ApiJson(b): ApiJson<PauseBody>,
) -> Result<Json<PauseResult>, ApiError> {
    let target = crate::pause::Target::from_parts(b.name, b.handler)?;
    let names = crate::pause::resume(&st.store, &target, &st.bindings).await?;
    Ok(Json(PauseResult { names }))
}
