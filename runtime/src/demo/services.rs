//! Demo stand-ins for the four services the shipped handlers call: the
//! AI-check service, the family service, Storage and the task service. Each is a real HTTP
//! server on 127.0.0.1 (an ephemeral port) that follows the contract in the
//! handler's docs and records every request it receives, so the report can
//! show them and the checks can compare them with what should have happened.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::scenario::{
    FAMILY_ADMIN_NAME, FAMILY_ADMIN_UID, FAMILY_PHONES, FAMILY_USER, FLAKY_PACKAGE, GONE_PACKAGE,
    LATE_TASK, LATE_TASK_RATING, ServiceUrls,
};

/// Which stand-in received a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    AiCheck,
    Family,
    Storage,
    Tasks,
}

impl Service {
    pub fn label(self) -> &'static str {
        match self {
            Service::AiCheck => "AI-check service",
            Service::Family => "family service",
            Service::Storage => "Storage service",
            Service::Tasks => "task service",
        }
    }
}

/// One request a stand-in received, and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub service: Service,
    pub method: String,
    /// Path and query.
    pub target: String,
    /// What else matters about the request (a header, the body).
    pub detail: Option<String>,
    pub status: u16,
}

/// The requests received so far, in arrival order. Cheap to clone.
#[derive(Clone, Default)]
pub struct CallLog(Arc<Mutex<Vec<HttpCall>>>);

impl CallLog {
    fn push(&self, call: HttpCall) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(call);
    }

    pub fn calls(&self) -> Vec<HttpCall> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn of(&self, service: Service) -> Vec<HttpCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.service == service)
            .collect()
    }
}

#[derive(Clone)]
struct Ctx {
    service: Service,
    log: CallLog,
    /// DELETEs received per package (Storage).
    deletes: Arc<Mutex<HashMap<String, u32>>>,
}

impl Ctx {
    fn record(&self, method: &Method, uri: &Uri, detail: Option<String>, status: StatusCode) {
        self.log.push(HttpCall {
            service: self.service,
            method: method.to_string(),
            target: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_owned(), |p| p.to_string()),
            detail,
            status: status.as_u16(),
        });
    }
}

/// The four running stand-ins.
pub struct StandIns {
    pub urls: ServiceUrls,
    pub log: CallLog,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl StandIns {
    /// Bind and start all four.
    pub async fn start() -> std::io::Result<StandIns> {
        let log = CallLog::default();
        let stop = CancellationToken::new();
        let ctx = |service| Ctx {
            service,
            log: log.clone(),
            deletes: Arc::default(),
        };
        let ai = Router::new()
            .route("/v1/checks", post(ai_check))
            .fallback(unknown)
            .with_state(ctx(Service::AiCheck));
        let family = Router::new()
            .route("/v1/family", get(family))
            .fallback(unknown)
            .with_state(ctx(Service::Family));
        let storage = Router::new()
            .route("/packages/{id}", delete(delete_package))
            .fallback(unknown)
            .with_state(ctx(Service::Storage));
        let task_service = Router::new()
            .route("/v1/tasks/{uid}/rating", get(task_rating))
            .fallback(unknown)
            .with_state(ctx(Service::Tasks));
        let mut tasks = Vec::new();
        let mut urls = Vec::new();
        for app in [ai, family, storage, task_service] {
            let (addr, task) = serve(app, stop.clone()).await?;
            urls.push(format!("http://{addr}"));
            tasks.push(task);
        }
        let [ai_check, family, storage, task_url] =
            <[String; 4]>::try_from(urls).expect("four services");
        Ok(StandIns {
            urls: ServiceUrls {
                ai_check,
                family,
                storage,
                tasks: task_url,
            },
            log,
            stop,
            tasks,
        })
    }

    /// Stop the servers and wait for them.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn serve(
    app: Router,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "demo stand-in service on {addr} failed");
        }
    });
    Ok((addr, task))
}

/// `POST /v1/checks`: accepts the check (202). The service owns
/// `work_status` from here on.
async fn ai_check(
    State(ctx): State<Ctx>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)");
    let status = StatusCode::ACCEPTED;
    ctx.record(
        &method,
        &uri,
        Some(format!("idempotency-key {key}, body {body}")),
        status,
    );
    (status, axum::Json(json!({"accepted": true}))).into_response()
}

/// `GET /v1/family?user_id=`: u-1 has a family, everyone else has none.
async fn family(
    State(ctx): State<Ctx>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let body = if q.get("user_id").map(String::as_str) == Some(FAMILY_USER) {
        json!({
            "in_family": true,
            "admin": {"uid": FAMILY_ADMIN_UID, "name": FAMILY_ADMIN_NAME},
            "members": FAMILY_PHONES.iter().map(|p| json!({"phone_id": p})).collect::<Vec<_>>(),
        })
    } else {
        json!({"in_family": false})
    };
    let in_family = body["in_family"].as_bool().unwrap_or(false);
    ctx.record(
        &method,
        &uri,
        Some(format!("in_family: {in_family}")),
        StatusCode::OK,
    );
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// `DELETE /packages/{id}`: 204, except the flaky package's first DELETE
/// (503) and the package that is already gone (404).
async fn delete_package(
    State(ctx): State<Ctx>,
    method: Method,
    uri: Uri,
    Path(id): Path<String>,
) -> StatusCode {
    let nth = {
        let mut d = ctx.deletes.lock().unwrap_or_else(|p| p.into_inner());
        let n = d.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    let status = if id == GONE_PACKAGE {
        StatusCode::NOT_FOUND
    } else if id == FLAKY_PACKAGE && nth == 1 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    };
    ctx.record(&method, &uri, None, status);
    status
}

/// `GET /v1/tasks/{uid}/rating`: the late task's rating; 404 (no rating)
/// for any other task.
async fn task_rating(
    State(ctx): State<Ctx>,
    method: Method,
    uri: Uri,
    Path(uid): Path<String>,
) -> Response {
    if uid == LATE_TASK {
        ctx.record(
            &method,
            &uri,
            Some(format!("rating {LATE_TASK_RATING}")),
            StatusCode::OK,
        );
        (
            StatusCode::OK,
            axum::Json(json!({"rating": LATE_TASK_RATING})),
        )
            .into_response()
    } else {
        ctx.record(
            &method,
            &uri,
            Some("no rating".into()),
            StatusCode::NOT_FOUND,
        );
        StatusCode::NOT_FOUND.into_response()
    }
}

/// Anything off-contract is recorded (and shows up in the checks) and
/// answered 404.
async fn unknown(State(ctx): State<Ctx>, method: Method, uri: Uri) -> StatusCode {
    ctx.record(
        &method,
        &uri,
        Some("not part of the service contract".into()),
        StatusCode::NOT_FOUND,
    );
    StatusCode::NOT_FOUND
}
