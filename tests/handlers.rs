//! The three shipped handlers end to end: the real `outrun serve` binary
//! running target/guests/{ai_check_requeue,family_sharing,package_deletion}.wasm
//! on SQLite and the local PostgreSQL (with the handlers' app migrations
//! applied), the local Redis behind `kv`, and real HTTP servers standing in
//! for the AI-check, family and Storage services. The stand-ins record every
//! request and answer by a switchable rule (5xx for the first calls, 404,
//! malformed bodies), so the tests can check exactly what each service was
//! asked, and how often.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use common::{Serve, TestDb, guest, ok, outrun, wait_for};
use outrun::{NewEvent, Store};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// The binary

/// `outrun events list --dead --json`: dead event id → last_error.
fn dead_events(db: &TestDb) -> BTreeMap<String, String> {
    let out = ok(&outrun(db, &["events", "list", "--dead", "--json"]));
    let rows: Vec<Value> = serde_json::from_str(&out).expect("events list --json prints JSON");
    rows.iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["last_error"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// `outrun events list --json`: the live (pending or scheduled) events.
fn live_events(db: &TestDb) -> Vec<Value> {
    let out = ok(&outrun(db, &["events", "list", "--json"]));
    serde_json::from_str(&out).expect("events list --json prints JSON")
}

/// Migrate the outbox through the binary and apply one handler's app
/// migrations (migrations/apps/<app>/<backend>/*.sql, in name order).
async fn prepare(db: &TestDb, apps: &[&str]) -> Store {
    ok(&outrun(db, &["migrate"]));
    for app in apps {
        let backend = if db.is_postgres() {
            "postgres"
        } else {
            "sqlite"
        };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../migrations/apps")
            .join(app)
            .join(backend);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no migrations in {}", dir.display());
        for file in files {
            let sql = std::fs::read_to_string(&file).unwrap();
            db.exec_script(&sql).await;
        }
    }
    db.connect().await
}

async fn enqueue(store: &Store, ev: NewEvent) -> String {
    store.enqueue(&ev, 5).await.unwrap().to_string()
}

/// Wait until no event is pending, scheduled or running.
async fn wait_drained(store: &Store) {
    wait_for("every event handled or dead", || async {
        let s = store.stats().await.unwrap();
        s.pending == 0 && s.running == 0 && s.scheduled == 0
    })
    .await;
}

/// Wait until every event of `ids` is dead; on timeout, show what is not.
async fn wait_dead<'a>(db: &TestDb, ids: impl IntoIterator<Item = &'a String> + Clone) {
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dead = dead_events(db);
        if ids.clone().into_iter().all(|id| dead.contains_key(id)) {
            return;
        }
        if tokio::time::Instant::now() > end {
            panic!(
                "timed out waiting for events to be dead; dead: {dead:?}; live: {:?}",
                live_events(db)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_gone(store: &Store, id: &str) {
    let uuid = uuid::Uuid::parse_str(id).unwrap();
    wait_for(&format!("event {id} done"), || async {
        store.get(uuid).await.unwrap().is_none()
    })
    .await;
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("outrun.toml");
    std::fs::write(&path, body).unwrap();
    path
}

// ---------------------------------------------------------------------------
// Stand-in services

/// One request a stand-in service received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Path and query, e.g. `/v1/family?user_id=u-1`.
    uri: String,
    idempotency_key: Option<String>,
    body: String,
}

/// How a stand-in answers: given the request and how many requests with the
/// same method and URI came before it (0 for the first).
type Rule = Arc<dyn Fn(&Seen, usize) -> (StatusCode, String) + Send + Sync>;

/// An HTTP server on 127.0.0.1 recording every request.
#[derive(Clone)]
struct Service {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    rule: Arc<Mutex<Rule>>,
}

impl Service {
    async fn start(
        rule: impl Fn(&Seen, usize) -> (StatusCode, String) + Send + Sync + 'static,
    ) -> Service {
        let svc = Service {
            port: 0,
            seen: Arc::default(),
            rule: Arc::new(Mutex::new(Arc::new(rule))),
        };
        let state = svc.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let state = state.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
                let seen = Seen {
                    method: parts.method.to_string(),
                    uri: parts
                        .uri
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    idempotency_key: parts
                        .headers
                        .get("idempotency-key")
                        .map(|v| v.to_str().unwrap().to_owned()),
                    body: String::from_utf8_lossy(&body).into_owned(),
                };
                let rule = state.rule.lock().unwrap().clone();
                let mut log = state.seen.lock().unwrap();
                let before = log
                    .iter()
                    .filter(|s| s.method == seen.method && s.uri == seen.uri)
                    .count();
                let answer = rule(&seen, before);
                log.push(seen);
                answer
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Service { port, ..svc }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// `METHOD uri` of every request, sorted.
    fn calls(&self) -> Vec<String> {
        let mut v: Vec<_> = self
            .seen()
            .iter()
            .map(|s| format!("{} {}", s.method, s.uri))
            .collect();
        v.sort();
        v
    }
}

fn answer(status: u16, body: &str) -> (StatusCode, String) {
    (StatusCode::from_u16(status).unwrap(), body.to_owned())
}

// ---------------------------------------------------------------------------
// ai-check-requeue

fn ai_config(dir: &Path, module: &Path, svc: &Service, extra: &str) -> PathBuf {
    write_config(
        dir,
        &format!(
            r#"[[handler]]
name = "ai-check-requeue"
module = "{module}"
events = ["issuings-ai-checks"]
max_retry = 6
[handler.allow]
sql = true
emit = ["issuings-ai-checks"]
http = ["{host}"]
[handler.allow.config]
ai_check_url = "{url}/v1/ai-checks"
{extra}
"#,
            module = module.display(),
            host = svc.host(),
            url = svc.url(),
        ),
    )
}

fn check(trigger: &str, app: &str) -> NewEvent {
    NewEvent::new(
        "issuings-ai-checks",
        json!({"triggerId": trigger, "applicationId": app}).to_string(),
    )
    .with_group(format!("application:{app}"))
    .with_expires_in(Duration::from_secs(3600))
}

async fn checks(db: &TestDb) -> Vec<String> {
    let mut v = db
        .strings(
            "SELECT trigger_id || '/' || application_id || '/' || work_status FROM issuing_check",
        )
        .await;
    v.sort();
    v
}

/// Seed 004: below the threshold the check is started through the service
/// (POST with the payload and an idempotency key) and recorded as NEW; a
/// duplicated event records nothing twice and repeats the same key, so the
/// service can de-duplicate the call.
async fn ai_check_happy_path_and_duplicate(db: TestDb) {
    let store = prepare(&db, &["ai-check-requeue"]).await;
    let svc = Service::start(|_, _| answer(200, r#"{"status":"started"}"#)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ai_config(dir.path(), &guest("ai_check_requeue"), &svc, "");
    let payload = json!({"triggerId": "t-1", "applicationId": "a-1", "source": "b3"});
    let ev =
        || NewEvent::new("issuings-ai-checks", payload.to_string()).with_group("application:a-1");
    let first = enqueue(&store, ev()).await;
    let second = enqueue(&store, ev()).await;
    let serve = Serve::ready(&db, &config).await;
    wait_gone(&store, &first).await;
    wait_gone(&store, &second).await;
    serve.stop();

    assert_eq!(checks(&db).await, vec!["t-1/a-1/NEW"], "one check row");
    let seen = svc.seen();
    assert_eq!(seen.len(), 2, "one POST per delivery: {seen:?}");
    for s in &seen {
        assert_eq!(
            (s.method.as_str(), s.uri.as_str()),
            ("POST", "/v1/ai-checks")
        );
        assert_eq!(s.idempotency_key.as_deref(), Some("t-1:a-1"));
        let body: Value = serde_json::from_str(&s.body).unwrap();
        assert_eq!(body, json!({"triggerId": "t-1", "applicationId": "a-1"}));
    }
    assert!(dead_events(&db).is_empty());
    assert!(live_events(&db).is_empty());
}

/// The service is down (503, then 500) and comes back: the event succeeds on
/// its third attempt, the row is written once, every attempt used the same
/// idempotency key.
async fn ai_check_retries_until_the_service_is_up(db: TestDb) {
    let store = prepare(&db, &["ai-check-requeue"]).await;
    let svc = Service::start(|_, n| match n {
        0 => answer(503, "down"),
        1 => answer(500, "still down"),
        _ => answer(202, ""),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = ai_config(dir.path(), &guest("ai_check_requeue"), &svc, "");
    let id = enqueue(&store, check("t-2", "a-2")).await;
    let serve = Serve::ready(&db, &config).await;
    wait_gone(&store, &id).await;
    let log = serve.stop();

    assert_eq!(svc.count(), 3, "two failed attempts, one success");
    assert!(
        svc.seen()
            .iter()
            .all(|s| s.idempotency_key.as_deref() == Some("t-2:a-2"))
    );
    assert_eq!(checks(&db).await, vec!["t-2/a-2/NEW"]);
    assert!(
        log.contains("will retry") && log.contains("503"),
        "the failed attempts are logged with the status"
    );
    assert!(dead_events(&db).is_empty());
}

/// Payloads that do not fit, and a 4xx from the service, are dead at once
/// with a last_error naming the problem; nothing is written.
async fn ai_check_bad_payloads_are_dead(db: TestDb) {
    let store = prepare(&db, &["ai-check-requeue"]).await;
    let svc = Service::start(|s, _| {
        if s.body.contains("refused") {
            answer(422, "unknown application")
        } else {
            answer(200, "")
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = ai_config(dir.path(), &guest("ai_check_requeue"), &svc, "");
    let mut cases = Vec::new();
    for (payload, needle) in [
        (json!({"triggerId": "t"}), "applicationId"),
        (
            json!({"triggerId": 1, "applicationId": "a"}),
            "expected a string",
        ),
        (
            json!({"triggerId": " ", "applicationId": "a"}),
            "empty `triggerId`",
        ),
        (json!("t-1 a-1"), "must be a JSON object"),
        (json!(["t-2", "a-2"]), "must be a JSON object"),
        (
            json!({"triggerId": "t-3", "applicationId": "refused"}),
            "422",
        ),
    ] {
        let id = enqueue(
            &store,
            NewEvent::new("issuings-ai-checks", payload.to_string()),
        )
        .await;
        cases.push((id, payload, needle));
    }
    let serve = Serve::ready(&db, &config).await;
    wait_dead(&db, cases.iter().map(|c| &c.0)).await;
    let log = serve.stop();
    let dead = dead_events(&db);
    for (id, payload, needle) in &cases {
        let err = &dead[id];
        assert!(
            err.contains(needle),
            "{payload}: last_error {err:?} should mention {needle:?}"
        );
    }
    // Dead at the first attempt: no retry was ever scheduled.
    assert!(
        !log.contains("will retry"),
        "rejections are not retried; log:\n{log}"
    );
    assert_eq!(
        svc.count(),
        1,
        "only the well-formed payload reached the service"
    );
    assert!(checks(&db).await.is_empty());
}

/// Seed 004's requeue branch: with 2 checks NEW the event puts the same
/// payload back (verbatim, same group, delayed, expiry carried over) and
/// calls nobody; once the running checks move on, the requeued event does
/// the check.
async fn ai_check_requeues_while_two_checks_are_new(db: TestDb) {
    let store = prepare(&db, &["ai-check-requeue"]).await;
    db.exec("INSERT INTO issuing_check (application_id, trigger_id, work_status) VALUES ('x-1', 't-x', 'NEW'), ('x-2', 't-x', 'NEW'), ('x-3', 't-x', 'DONE')").await;
    let svc = Service::start(|_, _| answer(200, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ai_config(
        dir.path(),
        &guest("ai_check_requeue"),
        &svc,
        "requeue_delay_ms = \"400\"",
    );
    let payload = json!({"triggerId": "t-9", "applicationId": "a-9", "note": "kept verbatim"});
    let original = NewEvent::new("issuings-ai-checks", payload.to_string())
        .with_group("application:a-9")
        .with_expires_in(Duration::from_secs(3600));
    let id = enqueue(&store, original).await;
    let before =
        serde_json::from_str::<Value>(&ok(&outrun(&db, &["events", "show", &id, "--json"])))
            .unwrap();
    let serve = Serve::ready(&db, &config).await;
    wait_gone(&store, &id).await;

    let live = live_events(&db);
    assert_eq!(live.len(), 1, "exactly one requeued event: {live:?}");
    let requeued = &live[0];
    assert_ne!(requeued["id"], before["id"]);
    assert_eq!(requeued["name"], "issuings-ai-checks");
    assert_eq!(requeued["payload"], payload, "payload requeued verbatim");
    assert_eq!(requeued["group_id"], "application:a-9");
    let at =
        |v: &Value, k: &str| chrono::DateTime::parse_from_rfc3339(v[k].as_str().unwrap()).unwrap();
    assert!(
        at(requeued, "available_at") > at(requeued, "create_date"),
        "requeued with a delay: {requeued}"
    );
    let drift = (at(requeued, "expires_at") - at(&before, "expires_at"))
        .num_seconds()
        .abs();
    assert!(
        drift <= 5,
        "the remaining expiry is carried over: {requeued} vs {before}"
    );
    assert_eq!(svc.count(), 0, "no AI check while two are NEW");
    assert_eq!(checks(&db).await.len(), 3, "nothing recorded");

    // The running checks finish: the next requeued delivery does the work.
    db.exec("UPDATE issuing_check SET work_status = 'DONE'")
        .await;
    wait_drained(&store).await;
    let log = serve.stop();
    assert_eq!(
        svc.count(),
        1,
        "exactly one AI check once below the threshold"
    );
    assert_eq!(svc.seen()[0].idempotency_key.as_deref(), Some("t-9:a-9"));
    assert!(checks(&db).await.contains(&"t-9/a-9/NEW".to_owned()));
    assert!(
        log.contains("requeueing application a-9"),
        "the requeue is logged"
    );
    assert!(dead_events(&db).is_empty());
}

/// Expired work is not done: no AI check, no row. (The runtime itself
/// refuses to run an event past its `expires_at` and marks it dead with
/// `expired`, so the handler's own expiry check is a second line only.)
async fn ai_check_expired_work_is_skipped(db: TestDb) {
    let store = prepare(&db, &["ai-check-requeue"]).await;
    let svc = Service::start(|_, _| answer(200, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = ai_config(dir.path(), &guest("ai_check_requeue"), &svc, "");
    let id = enqueue(
        &store,
        check("t-e", "a-e").with_expires_in(Duration::from_millis(1)),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let serve = Serve::ready(&db, &config).await;
    wait_for("expired event settled", || async {
        dead_events(&db).contains_key(&id)
    })
    .await;
    serve.stop();
    assert_eq!(dead_events(&db)[&id], "expired");
    assert_eq!(svc.count(), 0, "no AI check for expired work");
    assert!(checks(&db).await.is_empty());
}

// ---------------------------------------------------------------------------
// family-sharing

const FAMILY: &str = r#"{"in_family":true,"admin":{"uid":393627008,"name":"Василий"},"members":[{"phone_id":"5db2bb01211473c8c34f358d"},{"phone_id":"5db2bb01211473c8c34f3590"}]}"#;

/// The family service: answers by user id.
async fn family_service(fail_first: usize) -> Service {
    Service::start(move |s, n| {
        let user = s.uri.split("user_id=").nth(1).unwrap_or("");
        if n < fail_first {
            return answer(503, "family service restarting");
        }
        match user {
            "u-family" => answer(200, FAMILY),
            "u-alone" => answer(200, r#"{"in_family":false}"#),
            "u-no-admin" => answer(200, r#"{"in_family":true,"members":[]}"#),
            "u-html" => answer(200, "<html>maintenance</html>"),
            "u-bad-phone" => answer(
                200,
                r#"{"in_family":true,"admin":{"uid":1,"name":"A"},"members":[{"phone_id":""}]}"#,
            ),
            _ => answer(404, "no such route"),
        }
    })
    .await
}

fn family_config(dir: &Path, db: &TestDb, svc: &Service) -> PathBuf {
    let prefix = if db.is_postgres() {
        "order_route_sharing."
    } else {
        ""
    };
    write_config(
        dir,
        &format!(
            r#"[[handler]]
name = "family-sharing"
module = "{module}"
events = ["share-with-family"]
max_retry = 6
[handler.allow]
sql = true
http = ["{host}"]
[handler.allow.config]
family_url = "{url}"
table_prefix = "{prefix}"
"#,
            module = guest("family_sharing").display(),
            host = svc.host(),
            url = svc.url(),
        ),
    )
}

fn share(key: &str, user: &str, on: bool) -> NewEvent {
    NewEvent::new(
        "share-with-family",
        json!({"order_id": format!("order-{key}"), "sharing_key": key, "user_id": user,
               "share_ride_with_family": {"value": on}})
        .to_string(),
    )
    .with_group(format!("ride:{key}"))
}

/// The three tables, as sorted text rows.
async fn sharing_rows(db: &TestDb) -> (Vec<String>, Vec<String>, Vec<String>) {
    let p = if db.is_postgres() {
        "order_route_sharing."
    } else {
        ""
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    (
        sorted(db.strings(&format!("SELECT sharing_key || '/' || order_id FROM {p}sharing_keys")).await),
        sorted(db.strings(&format!("SELECT sharing_key || '/' || phone_id FROM {p}phone_ids")).await),
        sorted(
            db.strings(&format!(
                "SELECT sharing_key || '/' || CAST(admin_uid AS TEXT) || '/' || admin_name || '/' || \
                 CASE WHEN sharing_on THEN 'on' ELSE 'off' END FROM {p}family_rides"
            ))
            .await,
        ),
    )
}

/// Seed 002: start shares the ride with the family's phones (twice: same
/// rows), a user without a family shares nothing, stop clears the phones and
/// switches sharing off without asking the family service (twice: same rows).
async fn family_start_then_stop(db: TestDb) {
    let store = prepare(&db, &["family-sharing"]).await;
    let svc = family_service(0).await;
    let dir = tempfile::tempdir().unwrap();
    let config = family_config(dir.path(), &db, &svc);
    let serve = Serve::ready(&db, &config).await;

    enqueue(&store, share("rk-1", "u-family", true)).await;
    enqueue(&store, share("rk-1", "u-family", true)).await;
    enqueue(&store, share("rk-2", "u-alone", true)).await;
    wait_drained(&store).await;
    let (keys, phones, rides) = sharing_rows(&db).await;
    assert_eq!(keys, vec!["rk-1/order-rk-1"]);
    assert_eq!(
        phones,
        vec![
            "rk-1/5db2bb01211473c8c34f358d",
            "rk-1/5db2bb01211473c8c34f3590"
        ]
    );
    assert_eq!(rides, vec!["rk-1/393627008/Василий/on"]);
    assert_eq!(
        svc.calls(),
        vec![
            "GET /v1/family?user_id=u-alone",
            "GET /v1/family?user_id=u-family",
            "GET /v1/family?user_id=u-family",
        ]
    );

    enqueue(&store, share("rk-1", "u-family", false)).await;
    enqueue(&store, share("rk-1", "u-family", false)).await;
    enqueue(&store, share("rk-2", "u-alone", false)).await;
    wait_drained(&store).await;
    serve.stop();
    let (keys, phones, rides) = sharing_rows(&db).await;
    assert_eq!(keys, vec!["rk-1/order-rk-1"], "the key stays");
    assert!(phones.is_empty(), "phones cleared: {phones:?}");
    assert_eq!(rides, vec!["rk-1/393627008/Василий/off"]);
    assert_eq!(svc.count(), 3, "stop asks nobody");
    assert!(dead_events(&db).is_empty());
}

/// The family service is down twice: the start succeeds on the third
/// attempt and writes its rows once.
async fn family_retries_until_the_service_is_up(db: TestDb) {
    let store = prepare(&db, &["family-sharing"]).await;
    let svc = family_service(2).await;
    let dir = tempfile::tempdir().unwrap();
    let config = family_config(dir.path(), &db, &svc);
    let id = enqueue(&store, share("rk-3", "u-family", true)).await;
    let serve = Serve::ready(&db, &config).await;
    wait_gone(&store, &id).await;
    serve.stop();
    assert_eq!(svc.count(), 3);
    let (keys, phones, rides) = sharing_rows(&db).await;
    assert_eq!(keys, vec!["rk-3/order-rk-3"]);
    assert_eq!(phones.len(), 2);
    assert_eq!(rides, vec!["rk-3/393627008/Василий/on"]);
    assert!(dead_events(&db).is_empty());
}

/// Bad requests and malformed family answers are dead at once, saying what
/// was wrong; a 404 (wrong URL) is not read as "no family"; nothing written.
async fn family_bad_input_is_dead(db: TestDb) {
    let store = prepare(&db, &["family-sharing"]).await;
    let svc = family_service(0).await;
    let dir = tempfile::tempdir().unwrap();
    let config = family_config(dir.path(), &db, &svc);
    let raw = |payload: Value| NewEvent::new("share-with-family", payload.to_string());
    let mut cases = Vec::new();
    for (ev, needle) in [
        (
            raw(json!({"order_id": "o", "sharing_key": "k", "user_id": "u"})),
            "share_ride_with_family",
        ),
        (
            raw(
                json!({"order_id": "o", "sharing_key": "k", "user_id": "u", "share_ride_with_family": {"value": "yes"}}),
            ),
            "expected a boolean",
        ),
        (
            raw(
                json!({"order_id": "o", "sharing_key": "", "user_id": "u", "share_ride_with_family": {"value": true}}),
            ),
            "empty `sharing_key`",
        ),
        (share("rk-a", "u-no-admin", true), "no `admin`"),
        (share("rk-b", "u-html", true), "documented JSON"),
        (share("rk-c", "u-bad-phone", true), "members[0].phone_id"),
        (share("rk-d", "u-unknown", true), "404"),
    ] {
        cases.push((enqueue(&store, ev).await, needle));
    }
    let serve = Serve::ready(&db, &config).await;
    wait_dead(&db, cases.iter().map(|c| &c.0)).await;
    serve.stop();
    let dead = dead_events(&db);
    for (id, needle) in &cases {
        assert!(
            dead[id].contains(needle),
            "last_error {:?} should mention {needle:?}",
            dead[id]
        );
    }
    assert!(
        dead.values()
            .any(|e| e.contains("/v1/family?user_id=u-html")),
        "a malformed answer names the request: {dead:?}"
    );
    assert_eq!(
        svc.count(),
        4,
        "each malformed answer fetched once, not retried"
    );
    let (keys, phones, rides) = sharing_rows(&db).await;
    assert!(keys.is_empty() && phones.is_empty() && rides.is_empty());
}

// ---------------------------------------------------------------------------
// package-deletion

/// A Redis namespace for one test, deleted when dropped.
struct Kv {
    prefix: String,
    conn: redis::aio::MultiplexedConnection,
}

impl Kv {
    async fn new() -> Kv {
        let url = common::redis_url();
        let client = redis::Client::open(url.as_str())
            .unwrap_or_else(|e| panic!("{} ({url}) is not a Redis URL: {e}", common::REDIS_ENV));
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot reach the test Redis at {url} ({e}); start it or point {} at one",
                    common::REDIS_ENV
                )
            });
        Kv {
            prefix: common::redis_prefix(),
            conn,
        }
    }

    /// Every key of the namespace (without the prefix) and its value:
    /// strings as is, sets as their sorted members joined by ','.
    async fn dump(&self) -> BTreeMap<String, String> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut out = BTreeMap::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let value = if kind == "set" {
                let mut m: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                m.sort();
                m.join(",")
            } else {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap()
            };
            out.insert(key[self.prefix.len()..].to_owned(), value);
        }
        out
    }
}

/// The namespace's keys go even when the test fails. Drop cannot await, so
/// this uses a plain blocking connection.
impl Drop for Kv {
    fn drop(&mut self) {
        let pattern = format!("{}*", self.prefix);
        let cleanup = || -> redis::RedisResult<()> {
            let mut c = redis::Client::open(common::redis_url())?.get_connection()?;
            let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut c)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(&keys).query::<i64>(&mut c)?;
            }
            Ok(())
        };
        if let Err(e) = cleanup() {
            eprintln!("warning: could not delete the Redis keys {pattern}: {e}");
        }
    }
}

fn package_config(dir: &Path, kv: &Kv, svc: &Service) -> PathBuf {
    write_config(
        dir,
        &format!(
            r#"[kv]
url = "{redis}"

[[handler]]
name = "package-deletion"
module = "{module}"
events = ["package.requested", "package.closed", "draft.finished", "ticket.finished"]
max_retry = 6
[handler.allow]
kv = "{prefix}"
http = ["{host}"]
[handler.allow.config]
storage_url = "{url}/storage/"
"#,
            redis = common::redis_url(),
            module = guest("package_deletion").display(),
            prefix = kv.prefix,
            host = svc.host(),
            url = svc.url(),
        ),
    )
}

fn requested(package: &str, kind: &str, owner: &str) -> NewEvent {
    NewEvent::new(
        "package.requested",
        json!({"package_id": package, "owner": {"kind": kind, "id": owner}}).to_string(),
    )
    .with_group(format!("{kind}:{owner}"))
}

fn closed(package: &str, kind: &str, owner: &str) -> NewEvent {
    NewEvent::new(
        "package.closed",
        json!({"package_id": package, "owner": {"kind": kind, "id": owner}}).to_string(),
    )
    .with_group(format!("{kind}:{owner}"))
}

fn finished(kind: &str, owner: &str) -> NewEvent {
    NewEvent::new(format!("{kind}.finished"), json!({"id": owner}).to_string())
        .with_group(format!("{kind}:{owner}"))
}

/// Seed 000: three packages requested for a draft (one request duplicated),
/// one uploaded (closed, kept), the draft finishes: Storage gets a DELETE
/// for the two never-uploaded ones only, once each, and the draft's keys are
/// gone; a duplicated `draft.finished` deletes nothing again; another owner's
/// map is untouched.
async fn package_draft_lifecycle(db: TestDb) {
    let kv = Kv::new().await;
    let store = prepare(&db, &[]).await;
    let svc = Service::start(|_, _| answer(204, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = package_config(dir.path(), &kv, &svc);
    let serve = Serve::ready(&db, &config).await;
    for ev in [
        requested("pk-1", "draft", "u-1"),
        requested("pk-2", "draft", "u-1"),
        requested("pk-3", "draft", "u-1"),
        requested("pk-1", "draft", "u-1"),
        requested("pk-9", "ticket", "tk-1"),
    ] {
        enqueue(&store, ev).await;
    }
    wait_drained(&store).await;
    let mut expect = BTreeMap::from([
        ("draft:u-1:packages".to_owned(), "pk-1,pk-2,pk-3".to_owned()),
        ("package:pk-1:owner".to_owned(), "draft:u-1".to_owned()),
        ("package:pk-2:owner".to_owned(), "draft:u-1".to_owned()),
        ("package:pk-3:owner".to_owned(), "draft:u-1".to_owned()),
        ("ticket:tk-1:packages".to_owned(), "pk-9".to_owned()),
        ("package:pk-9:owner".to_owned(), "ticket:tk-1".to_owned()),
    ]);
    assert_eq!(kv.dump().await, expect, "the reverse maps");

    enqueue(&store, closed("pk-2", "draft", "u-1")).await;
    enqueue(&store, finished("draft", "u-1")).await;
    enqueue(&store, finished("draft", "u-1")).await;
    wait_drained(&store).await;
    serve.stop();
    assert_eq!(
        svc.calls(),
        vec![
            "DELETE /storage/packages/pk-1",
            "DELETE /storage/packages/pk-3"
        ],
        "only the never-uploaded packages, once each"
    );
    for key in [
        "draft:u-1:packages",
        "package:pk-1:owner",
        "package:pk-2:owner",
        "package:pk-3:owner",
    ] {
        expect.remove(key);
    }
    assert_eq!(
        kv.dump().await,
        expect,
        "the draft's keys are gone, the ticket's stay"
    );
    assert!(dead_events(&db).is_empty());
}

/// Storage fails one package (503) on the first attempt and answers 404
/// for another: the retry re-sends only the failed one; 404 counts as
/// deleted; the ticket's keys are gone at the end.
async fn package_retry_resends_only_the_rest(db: TestDb) {
    let kv = Kv::new().await;
    let store = prepare(&db, &[]).await;
    let svc = Service::start(|s, n| match (s.uri.as_str(), n) {
        ("/storage/packages/pk-b", 0) => answer(503, "busy"),
        ("/storage/packages/pk-c", _) => answer(404, "no such package"),
        _ => answer(200, ""),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = package_config(dir.path(), &kv, &svc);
    for p in ["pk-a", "pk-b", "pk-c"] {
        enqueue(&store, requested(p, "ticket", "tk-7")).await;
    }
    let fin = enqueue(&store, finished("ticket", "tk-7")).await;
    let serve = Serve::ready(&db, &config).await;
    wait_gone(&store, &fin).await;
    let log = serve.stop();
    assert_eq!(
        svc.calls(),
        vec![
            "DELETE /storage/packages/pk-a",
            "DELETE /storage/packages/pk-b",
            "DELETE /storage/packages/pk-b",
            "DELETE /storage/packages/pk-c",
        ]
    );
    assert!(
        log.contains("2 of 3 packages deleted; will retry pk-b"),
        "the partial failure is logged"
    );
    assert!(
        kv.dump().await.is_empty(),
        "every key gone: {:?}",
        kv.dump().await
    );
    assert!(dead_events(&db).is_empty());
}

/// Bad events are dead naming the problem; a Storage refusal (403) is dead
/// listing the package and leaves it in the map for an operator.
async fn package_bad_input_is_dead(db: TestDb) {
    let kv = Kv::new().await;
    let store = prepare(&db, &[]).await;
    let svc = Service::start(|s, _| {
        if s.uri.ends_with("pk-locked") {
            answer(403, "forbidden")
        } else {
            answer(204, "")
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = package_config(dir.path(), &kv, &svc);
    enqueue(&store, requested("pk-locked", "draft", "u-5")).await;
    enqueue(&store, requested("pk-free", "draft", "u-5")).await;
    let mut cases = vec![(
        enqueue(&store, finished("draft", "u-5")).await,
        "pk-locked (Storage answered 403)",
    )];
    for (name, payload, needle) in [
        (
            "package.requested",
            json!({"package_id": "p", "owner": {"kind": "user", "id": "u"}}),
            "unknown variant `user`",
        ),
        (
            "package.requested",
            json!({"package_id": "", "owner": {"kind": "draft", "id": "u"}}),
            "empty `package_id`",
        ),
        (
            "package.closed",
            json!({"package_id": "p", "owner": {"kind": "draft", "id": " "}}),
            "empty `owner.id`",
        ),
        ("draft.finished", json!({}), "missing field `id`"),
    ] {
        cases.push((
            enqueue(&store, NewEvent::new(name, payload.to_string())).await,
            needle,
        ));
    }
    let serve = Serve::ready(&db, &config).await;
    wait_dead(&db, cases.iter().map(|c| &c.0)).await;
    serve.stop();
    let dead = dead_events(&db);
    for (id, needle) in &cases {
        assert!(
            dead[id].contains(needle),
            "last_error {:?} should mention {needle:?}",
            dead[id]
        );
    }
    assert_eq!(
        kv.dump().await,
        BTreeMap::from([
            ("draft:u-5:packages".to_owned(), "pk-locked".to_owned()),
            ("package:pk-locked:owner".to_owned(), "draft:u-5".to_owned()),
        ]),
        "the refused package stays for an operator, the deleted one is gone"
    );
    assert_eq!(
        svc.calls(),
        vec![
            "DELETE /storage/packages/pk-free",
            "DELETE /storage/packages/pk-locked"
        ]
    );
}

// ---------------------------------------------------------------------------
// Hot reload of a shipped handler

/// ai-check-requeue is replaced (atomic rename) by a new version while
/// events flow: the reload is logged with the new hash, and every event is
/// handled exactly once: one POST and one row per event, none lost, none
/// dead.
async fn ai_check_hot_reload_while_events_flow(db: TestDb) {
    let store = prepare(&db, &["ai-check-requeue"]).await;
    let svc = Service::start(|_, _| answer(200, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("ai_check_requeue.wasm");
    let v1 = std::fs::read(guest("ai_check_requeue")).unwrap();
    let v2 = outrun::wasm::with_custom_section(&v1, "outrun-test", b"version 2");
    std::fs::write(&module, &v1).unwrap();
    // Never requeue: every event must reach the service exactly once.
    let config = ai_config(dir.path(), &module, &svc, "requeue_threshold = \"1000000\"");
    let serve = Serve::ready(&db, &config).await;
    let short = |b: &[u8]| blake3::hash(b).to_hex()[..12].to_owned();
    assert!(serve.log().contains(&short(&v1)), "v1 loaded with its hash");

    let total = 60;
    let mut ids = Vec::new();
    for i in 0..total {
        if i == total / 2 {
            let tmp = module.with_extension("tmp");
            std::fs::write(&tmp, &v2).unwrap();
            std::fs::rename(&tmp, &module).unwrap();
        }
        ids.push(enqueue(&store, check(&format!("t-{i}"), &format!("hr-{i}"))).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for("reload to v2 logged", || async {
        serve.log().contains(&format!("-> {}", short(&v2)))
    })
    .await;
    // One more after the reload is certain, so v2 surely handles something.
    ids.push(enqueue(&store, check("t-last", "hr-last")).await);
    wait_drained(&store).await;
    let log = serve.stop();

    let reload = log
        .lines()
        .find(|l| l.contains("reloaded:"))
        .expect("a reload line");
    assert!(
        reload.contains(&format!("{} -> {}", short(&v1), short(&v2))),
        "{reload}"
    );
    assert_eq!(log.matches("reloaded:").count(), 1, "one reload");
    let mut keys: Vec<String> = svc
        .seen()
        .into_iter()
        .map(|s| s.idempotency_key.unwrap_or_default())
        .collect();
    keys.sort();
    let n = keys.len();
    keys.dedup();
    assert_eq!(
        (n, keys.len()),
        (ids.len(), ids.len()),
        "one POST per event"
    );
    assert_eq!(checks(&db).await.len(), ids.len(), "one row per event");
    assert!(dead_events(&db).is_empty());
}

// ---------------------------------------------------------------------------
// The example config

/// examples/outrun.toml loads: every handler compiles and binds its events.
#[test]
fn example_config_loads() {
    for name in [
        "ai_check_requeue",
        "family_sharing",
        "package_deletion",
        "stoplist_publisher",
    ] {
        guest(name);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["handlers", "list", "--json", "--config"])
        .arg(root.join("examples/outrun.toml"))
        .env(
            "OUTRUN_DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.path().join("x.db").display()),
        )
        .env_remove("OUTRUN_CONFIG")
        // Not the default cache next to the example: the repo stays clean.
        .envs(common::FAST_ENV)
        .output()
        .unwrap();
    let list: Vec<Value> = serde_json::from_str(&ok(&out)).unwrap();
    let mut names: Vec<&str> = list.iter().map(|h| h["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ai-check-requeue",
            "bonus-accrual",
            "family-sharing",
            "package-deletion",
            "stoplist-publisher"
        ]
    );
}

on_both_backends!(
    ai_check_happy_path_and_duplicate,
    ai_check_retries_until_the_service_is_up,
    ai_check_bad_payloads_are_dead,
    ai_check_requeues_while_two_checks_are_new,
    ai_check_expired_work_is_skipped,
    ai_check_hot_reload_while_events_flow,
    family_start_then_stop,
    family_retries_until_the_service_is_up,
    family_bad_input_is_dead,
    package_draft_lifecycle,
    package_retry_resends_only_the_rest,
    package_bad_input_is_dead,
);
