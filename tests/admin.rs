//! The admin API through the real binary: the token on every change (and
//! on reads when asked), one error shape for every failure (axum's own
//! rejections included), filtered cursor pagination, /metrics on its own
//! listener, and the OpenAPI document — served, complete, and the same as
//! the checked-in docs/openapi.json.

mod common;

use std::path::{Path, PathBuf};

use common::{Serve, TestDb, fails, free_port, guest, http, http_as, ok, outrun, wait_for};
use serde_json::{Value, json};

const TOKEN: &str = "admin-test-token";

fn write_config(dir: &Path, admin: u16, admin_extra: &str) -> PathBuf {
    let path = dir.join("outrun.toml");
    std::fs::write(
        &path,
        format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n{admin_extra}\n"),
    )
    .unwrap();
    path
}

async fn start(db: &TestDb, admin_extra: &str) -> (Serve, u16, tempfile::TempDir) {
    ok(&outrun(db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let serve = Serve::ready(db, &write_config(dir.path(), port, admin_extra)).await;
    (serve, port, dir)
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The error shape: `{"error": {"code", "message"}}`; returns the message.
fn error_of(status: u16, body: &str, want_status: u16, want_code: &str) -> String {
    assert_eq!(status, want_status, "{body}");
    let v = parse(body);
    assert_eq!(v["error"]["code"], want_code, "{body}");
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {body}"))
        .to_owned()
}

async fn stats(port: u16) -> Value {
    let (status, body) = http_as(port, "GET", "/v1/stats", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

async fn enqueue(port: u16, event: Value) -> String {
    let (status, body) = http_as(
        port,
        "POST",
        "/v1/events",
        Some(&event.to_string()),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    parse(&body)["id"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------

async fn token_guards_every_change(db: TestDb) {
    let (serve, port, _dir) = start(&db, &format!("token = \"{TOKEN}\"")).await;
    let id = enqueue(port, json!({"name": "a", "payload": {}, "delay": "1h"})).await;
    let before = stats(port).await;

    // Missing or wrong token: 401 in the error shape, nothing changed.
    let event = r#"{"name":"a","payload":{}}"#;
    for token in [None, Some("wrong"), Some("")] {
        for (path, body) in [
            ("/v1/events".to_owned(), Some(event)),
            (format!("/v1/events/{id}/cancel"), None),
            ("/v1/events/cancel".to_owned(), Some(r#"{"name":"a"}"#)),
        ] {
            let (status, answer) = http_as(port, "POST", &path, body, token).await;
            let message = error_of(status, &answer, 401, "unauthorized");
            assert!(message.contains("token"), "{path}: {message}");
        }
    }
    assert_eq!(stats(port).await, before);
    let (_, body) = http(port, "GET", &format!("/v1/events/{id}"), None).await;
    assert_eq!(parse(&body)["state"], "scheduled", "{body}");

    // Reads need no token unless token_for_reads.
    assert_eq!(http(port, "GET", "/v1/events", None).await.0, 200);
    assert_eq!(http(port, "GET", "/v1/stats", None).await.0, 200);
    serve.stop();

    let (serve, port, _dir) =
        start(&db, &format!("token = \"{TOKEN}\"\ntoken_for_reads = true")).await;
    for path in [
        "/v1/events",
        "/v1/stats",
        "/v1/handlers",
        &format!("/v1/events/{id}"),
    ] {
        let (status, body) = http(port, "GET", path, None).await;
        error_of(status, &body, 401, "unauthorized");
        let (status, body) = http_as(port, "GET", path, None, Some(TOKEN)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // Probes, metrics and the API's description stay open.
    for path in ["/livez", "/readyz", "/metrics", "/v1/openapi.json"] {
        assert_eq!(http(port, "GET", path, None).await.0, 200, "{path}");
    }
    serve.stop();

    // No token configured: changes are refused, saying how to allow them.
    let (serve, port, _dir) = start(&db, "").await;
    let (status, body) = http(port, "POST", "/v1/events", Some(event)).await;
    let message = error_of(status, &body, 401, "unauthorized");
    assert!(
        message.contains("[admin] token") && message.contains("OUTRUN_ADMIN_TOKEN"),
        "{message}"
    );
    let (status, body) = http(port, "GET", "/v1/stats", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(parse(&body), before);
    serve.stop();
}

async fn errors_have_one_shape_and_name_the_parameter(db: TestDb) {
    let (serve, port, _dir) = start(&db, &format!("token = \"{TOKEN}\"")).await;
    let get = |path: &'static str| async move { http(port, "GET", path, None).await };

    for (path, param) in [
        ("/v1/events?cursor=not-a-cursor", "cursor"),
        ("/v1/events?cursor=6331", "cursor"),
        ("/v1/events?state=sleeping", "state"),
        ("/v1/events?limit=0", "limit"),
        ("/v1/events?limit=ten", "limit"),
        ("/v1/events?limit=1001", "limit"),
        ("/v1/events?since=yesterday", "since"),
        ("/v1/events?dead=maybe", "dead"),
    ] {
        let (status, body) = get(path).await;
        let message = error_of(status, &body, 400, "bad_request");
        assert!(message.contains(&format!("`{param}`")), "{path}: {message}");
    }
    // A dead listing's cursor is refused by a live listing.
    for _ in 0..2 {
        let id = enqueue(port, json!({"name": "d", "payload": {}})).await;
        let (status, body) = http_as(
            port,
            "POST",
            &format!("/v1/events/{id}/cancel"),
            None,
            Some(TOKEN),
        )
        .await;
        assert!(status == 200 || status == 409, "{body}");
    }
    let (_, body) = get("/v1/events?state=dead&limit=1").await;
    let cursor = parse(&body)["next_cursor"].as_str().unwrap().to_owned();
    let (status, body) = http(port, "GET", &format!("/v1/events?cursor={cursor}"), None).await;
    let message = error_of(status, &body, 400, "bad_request");
    assert!(message.contains("`cursor`"), "{message}");

    // axum's rejections: path, body, content type, unknown route, method.
    let (status, body) = get("/v1/events/not-a-uuid").await;
    let message = error_of(status, &body, 400, "bad_request");
    assert!(message.contains("UUID"), "{message}");
    let (status, body) = http_as(port, "POST", "/v1/events", Some("{not json"), Some(TOKEN)).await;
    error_of(status, &body, 400, "bad_request");
    let (status, body) = http_as(
        port,
        "POST",
        "/v1/events",
        Some(r#"{"name":"x","payload":{},"delay":5}"#),
        Some(TOKEN),
    )
    .await;
    let message = error_of(status, &body, 400, "bad_request");
    assert!(message.contains("delay"), "{message}");
    let (status, body) = get("/v1/nothing-here").await;
    let message = error_of(status, &body, 404, "not_found");
    assert!(message.contains("/v1/openapi.json"), "{message}");
    let (status, body) = http_as(port, "DELETE", "/v1/stats", None, Some(TOKEN)).await;
    error_of(status, &body, 405, "method_not_allowed");
    let (status, body) = get("/v1/events/01936a1e-0000-7000-8000-000000000000").await;
    error_of(status, &body, 404, "not_found");
    assert_eq!(stats(port).await["pending"], 0);
    serve.stop();
}

async fn list_filters_and_pages(db: TestDb) {
    let (serve, port, _dir) = start(&db, &format!("token = \"{TOKEN}\"")).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let group = if i % 2 == 0 { "even" } else { "odd" };
        ids.push(
            enqueue(
                port,
                json!({"name": "page.me", "payload": {"i": i}, "group_id": group, "delay": "1h"}),
            )
            .await,
        );
    }
    enqueue(port, json!({"name": "other", "payload": {}, "delay": "1h"})).await;

    // Pages of 3 walk the whole listing once, in insertion order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/v1/events?name=page.me&limit=3".to_owned(),
            Some(c) => format!("/v1/events?name=page.me&limit=3&cursor={c}"),
        };
        let (status, body) = http(port, "GET", &path, None).await;
        assert_eq!(status, 200, "{body}");
        let page = parse(&body);
        pages += 1;
        for ev in page["events"].as_array().unwrap() {
            seen.push(ev["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10, "the cursor does not advance");
    }
    assert_eq!((seen, pages), (ids.clone(), 3));

    let count = |path: String| async move {
        let (status, body) = http(port, "GET", &path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        parse(&body)["events"].as_array().unwrap().len()
    };
    assert_eq!(count("/v1/events?group=odd".into()).await, 3);
    assert_eq!(count("/v1/events?state=scheduled".into()).await, 8);
    assert_eq!(count("/v1/events?state=pending".into()).await, 0);
    assert_eq!(count("/v1/events?since=1h".into()).await, 8);
    assert_eq!(
        count("/v1/events?since=2999-01-01T00:00:00Z".into()).await,
        0
    );

    // error_contains: cancel two, then find them by their last_error.
    for id in &ids[..2] {
        let (status, body) = http_as(
            port,
            "POST",
            &format!("/v1/events/{id}/cancel"),
            None,
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        count("/v1/events?state=dead&error_contains=cancel".into()).await,
        2
    );
    assert_eq!(
        count("/v1/events?dead=true&error_contains=nope".into()).await,
        0
    );
    assert_eq!(count("/v1/events?name=page.me".into()).await, 5);
    serve.stop();
}

async fn metrics_on_their_own_listener(db: TestDb) {
    let metrics = free_port();
    let (serve, port, _dir) =
        start(&db, &format!("metrics_listen = \"127.0.0.1:{metrics}\"")).await;
    wait_for("metrics on their own port", || async {
        let (status, body) = http(metrics, "GET", "/metrics", None).await;
        status == 200 && body.contains("outrun_build_info")
    })
    .await;
    let (status, body) = http(port, "GET", "/metrics", None).await;
    error_of(status, &body, 404, "not_found");
    let (status, _) = http(metrics, "GET", "/v1/stats", None).await;
    assert_eq!(status, 404, "the API is not on the metrics port");
    serve.stop();
}

/// Every route the admin API has, as the OpenAPI document must list it.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/stats"),
    ("get", "/v1/overview"),
    ("get", "/v1/events"),
    ("post", "/v1/events"),
    ("get", "/v1/events/{id}"),
    ("get", "/v1/events/{id}/attempts"),
    ("post", "/v1/events/{id}/cancel"),
    ("post", "/v1/events/cancel"),
    ("post", "/v1/events/replay"),
    ("post", "/v1/events/purge"),
    ("post", "/v1/events/{id}/replay"),
    ("get", "/v1/handlers"),
    ("get", "/v1/pauses"),
    ("post", "/v1/pauses"),
    ("post", "/v1/pauses/resume"),
    ("get", "/v1/openapi.json"),
];

async fn openapi_is_served_and_complete(db: TestDb) {
    let (serve, port, _dir) = start(&db, "").await;
    let (status, body) = http(port, "GET", "/v1/openapi.json", None).await;
    assert_eq!(status, 200, "{body}");
    let doc = parse(&body);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    let documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(p, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), p.clone()))
        })
        .collect();
    for (method, path) in ROUTES {
        assert!(
            documented.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is not in the OpenAPI document"
        );
    }
    assert_eq!(documented.len(), ROUTES.len(), "{documented:?}");
    // Every documented route answers (no 404 for a missing route; path
    // parameters get a well-formed id).
    for (method, path) in ROUTES {
        let path = path.replace("{id}", "01936a1e-0000-7000-8000-000000000000");
        let (status, body) = http(port, &method.to_uppercase(), &path, Some("{}")).await;
        assert!(
            !(status == 404 && body.contains("no route")) && status != 405 && status != 0,
            "{method} {path}: {status} {body}"
        );
    }
    // Changing routes declare the bearer token.
    for (method, path) in ROUTES.iter().filter(|(m, _)| *m == "post") {
        assert_eq!(
            doc["paths"][path][method]["security"][0]["bearer"],
            json!([]),
            "{method} {path}"
        );
    }
    assert_eq!(body, outrun::admin::openapi_json());
    serve.stop();
}

/// docs/openapi.json is the document the code generates. Regenerate with
/// `OUTRUN_WRITE_OPENAPI=1 cargo nextest run --test admin -E 'test(checked_in)'`.
#[test]
fn checked_in_openapi_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let generated = outrun::admin::openapi_json();
    if std::env::var_os("OUTRUN_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/openapi.json is stale (the admin API changed): regenerate it with \
         `OUTRUN_WRITE_OPENAPI=1 cargo nextest run --test admin -E 'test(checked_in)'` and commit it"
    );
}

// ---------------------------------------------------------------------------
// Pause and resume

/// Two handlers on the probe: `held` binds probe.echo, `free` probe.sleep.
fn pause_config(dir: &Path, admin: Option<u16>) -> PathBuf {
    let module = guest("probe");
    let admin = admin
        .map(|p| format!("[admin]\nlisten = \"127.0.0.1:{p}\"\ntoken = \"{TOKEN}\"\n"))
        .unwrap_or_default();
    let path = dir.join(format!("outrun-{}.toml", admin.len()));
    std::fs::write(
        &path,
        format!(
            "{admin}\n[[handler]]\nname = \"held\"\nmodule = {module:?}\nevents = [\"probe.echo\"]\n\n\
             [[handler]]\nname = \"free\"\nmodule = {module:?}\nevents = [\"probe.sleep\"]\n"
        ),
    )
    .unwrap();
    path
}

async fn insert(db: &TestDb, name: &str, payload: &str, n: usize) {
    for _ in 0..n {
        db.exec(&format!(
            "INSERT INTO outbox_events (name, payload) VALUES ('{name}', '{payload}')"
        ))
        .await;
    }
}

async fn rows(db: &TestDb, name: &str) -> i64 {
    db.scalar(&format!(
        "SELECT count(*) FROM outbox_events WHERE name = '{name}'"
    ))
    .await
}

async fn pause_holds_on_every_instance(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config_a = pause_config(dir.path(), Some(port));
    let a = Serve::ready(&db, &config_a).await;
    let b = Serve::ready(&db, &pause_config(dir.path(), None)).await;
    let body = |v: Value| v.to_string();

    // Refused: no token, unknown name, unknown handler, both or neither.
    let (status, answer) = http(port, "POST", "/v1/pauses", Some(r#"{"name":"probe.echo"}"#)).await;
    error_of(status, &answer, 401, "unauthorized");
    let (status, answer) = http_as(
        port,
        "POST",
        "/v1/pauses",
        Some(r#"{"name":"probe.ecoh"}"#),
        Some(TOKEN),
    )
    .await;
    let message = error_of(status, &answer, 404, "not_found");
    assert!(
        message.contains("probe.ecoh") && message.contains("force"),
        "{message}"
    );
    let (status, answer) = http_as(
        port,
        "POST",
        "/v1/pauses",
        Some(r#"{"handler":"nope"}"#),
        Some(TOKEN),
    )
    .await;
    let message = error_of(status, &answer, 404, "not_found");
    assert!(message.contains("held, free"), "{message}");
    for bad in [
        r#"{"name":"probe.echo","handler":"held"}"#,
        "{}",
        r#"{"name":"x","hold":1}"#,
    ] {
        let (status, answer) = http_as(port, "POST", "/v1/pauses", Some(bad), Some(TOKEN)).await;
        error_of(status, &answer, 400, "bad_request");
    }
    let (status, answer) = http_as(
        port,
        "POST",
        "/v1/pauses/resume",
        Some(r#"{"name":"probe.echo"}"#),
        Some(TOKEN),
    )
    .await;
    let message = error_of(status, &answer, 404, "not_found");
    assert!(message.contains("not paused"), "{message}");
    let (_, answer) = http(port, "GET", "/v1/pauses", None).await;
    assert_eq!(
        parse(&answer),
        json!([]),
        "nothing paused by refused requests"
    );

    // Pause the handler `held` on instance A (over the API).
    let (status, answer) = http_as(
        port,
        "POST",
        "/v1/pauses",
        Some(&body(json!({"handler": "held"}))),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(parse(&answer)["names"], json!(["probe.echo"]));
    let (_, answer) = http(port, "GET", "/v1/stats", None).await;
    assert_eq!(parse(&answer)["paused"], json!(["probe.echo"]), "{answer}");
    let (_, answer) = http(port, "GET", "/v1/pauses", None).await;
    assert_eq!(parse(&answer)[0]["via"], "handler:held", "{answer}");
    // Within a second every instance holds it.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    insert(&db, "probe.echo", "{}", 20).await;
    insert(&db, "probe.sleep", r#"{"ms":1}"#, 10).await;
    wait_for("the unpaused events to be handled", || async {
        rows(&db, "probe.sleep").await == 0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        rows(&db, "probe.echo").await,
        20,
        "a paused event was claimed"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM outbox_events WHERE name = 'probe.echo' AND (locked_by IS NOT NULL OR retry > 0)")
            .await,
        0,
        "paused events are untouched"
    );

    // The CLI sees it; refuses an unknown name unless --force.
    let out = ok(&outrun(&db, &["events", "stats", "--json"]));
    assert_eq!(parse(&out)["paused"], json!(["probe.echo"]), "{out}");
    let err = fails(&outrun(&db, &["events", "pause", "--name", "never.seen"]));
    assert!(
        err.contains("never.seen") && err.contains("--force"),
        "{err}"
    );
    ok(&outrun(
        &db,
        &["events", "pause", "--name", "never.seen", "--force"],
    ));
    let out = ok(&outrun(&db, &["events", "stats"]));
    assert!(out.contains("paused: never.seen, probe.echo"), "{out}");
    ok(&outrun(&db, &["events", "resume", "--name", "never.seen"]));
    let err = fails(&outrun(&db, &["events", "resume", "--name", "never.seen"]));
    assert!(err.contains("not paused"), "{err}");

    // Resume (by name, from the CLI): every paused event runs, none lost.
    let one = db
        .strings("SELECT CAST(id AS TEXT) FROM outbox_events WHERE name = 'probe.echo'")
        .await
        .remove(0);
    ok(&outrun(&db, &["events", "resume", "--name", "probe.echo"]));
    wait_for("the resumed events to be handled", || async {
        rows(&db, "probe.echo").await == 0
    })
    .await;
    // Acting on an event an instance just finished: a clear 404.
    for action in ["cancel", "replay"] {
        let (status, answer) = http_as(
            port,
            "POST",
            &format!("/v1/events/{one}/{action}"),
            None,
            Some(TOKEN),
        )
        .await;
        let message = error_of(status, &answer, 404, "not_found");
        assert!(
            message.contains(&one) && message.contains("just finished"),
            "{message}"
        );
    }
    let (_, answer) = http(port, "GET", "/v1/stats", None).await;
    assert_eq!(parse(&answer)["paused"], json!([]), "{answer}");
    let handled =
        a.stop().matches("probe.echo id=").count() + b.stop().matches("probe.echo id=").count();
    assert_eq!(handled, 20, "each paused event ran once after resume");
}

/// A limited name is claimed by the limiter, not the ordinary claim: a
/// pause holds there too, and the limit's other names keep running.
async fn pause_holds_for_limited_names(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let config = pause_config(dir.path(), None);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace(
        "events = [\"probe.echo\"]",
        "events = [\"probe.echo\", \"probe.sleep\"]",
    );
    text = text.replace("name = \"free\"", "name = \"unused\"");
    text = text.replace("events = [\"probe.sleep\"]", "events = [\"probe.unused\"]");
    text.push_str("\n[[limit]]\nhandler = \"held\"\nrate = \"1000/s\"\n");
    std::fs::write(&config, text).unwrap();
    ok(&outrun(
        &db,
        &["events", "pause", "--name", "probe.echo", "--force"],
    ));
    let serve = Serve::ready(&db, &config).await;
    insert(&db, "probe.echo", "{}", 5).await;
    insert(&db, "probe.sleep", r#"{"ms":1}"#, 5).await;
    wait_for("the limit's unpaused name to run", || async {
        rows(&db, "probe.sleep").await == 0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        rows(&db, "probe.echo").await,
        5,
        "a paused limited event was claimed"
    );
    ok(&outrun(&db, &["events", "resume", "--name", "probe.echo"]));
    wait_for("the resumed limited events to run", || async {
        rows(&db, "probe.echo").await == 0
    })
    .await;
    serve.stop();
}

// ---------------------------------------------------------------------------
// Bulk operations

async fn post(port: u16, path: &str, body: Value) -> (u16, Value) {
    let (status, answer) = http_as(port, "POST", path, Some(&body.to_string()), Some(TOKEN)).await;
    (status, parse(&answer))
}

async fn bulk_operations_with_filters(db: TestDb) {
    let (serve, port, _dir) = start(&db, &format!("token = \"{TOKEN}\"")).await;
    for i in 0..3 {
        enqueue(
            port,
            json!({"name": "bulk.a", "payload": {"i": i}, "delay": "1h"}),
        )
        .await;
    }
    for i in 0..2 {
        enqueue(
            port,
            json!({"name": "bulk.b", "payload": {"i": i}, "delay": "1h", "group_id": "g"}),
        )
        .await;
    }
    let before = stats(port).await;

    // Dry runs count and change nothing.
    let (status, v) = post(
        port,
        "/v1/events/cancel",
        json!({"name": "bulk.a", "dry_run": true}),
    )
    .await;
    assert_eq!(
        (status, &v["matched"], &v["dry_run"]),
        (200, &json!(3), &json!(true)),
        "{v}"
    );
    let (status, v) = post(
        port,
        "/v1/events/cancel",
        json!({"state": "scheduled", "dry_run": true}),
    )
    .await;
    assert_eq!((status, &v["matched"]), (200, &json!(5)), "{v}");
    assert_eq!(stats(port).await, before);

    let (status, v) = post(port, "/v1/events/cancel", json!({"name": "bulk.a"})).await;
    assert_eq!(
        (status, &v["matched"], &v["cancelled"]),
        (200, &json!(3), &json!(3)),
        "{v}"
    );
    // No handler binds bulk.c: its events die at once.
    for _ in 0..2 {
        enqueue(port, json!({"name": "bulk.c", "payload": {}})).await;
    }
    wait_for("bulk.c to die", || async { stats(port).await["dead"] == 5 }).await;

    let (_, v) = post(
        port,
        "/v1/events/replay",
        json!({"error_contains": "no handler", "dry_run": true}),
    )
    .await;
    assert_eq!(v["matched"], 2, "{v}");
    let (_, v) = post(port, "/v1/events/purge", json!({"dry_run": true})).await;
    assert_eq!(v["matched"], 5, "{v}");
    let (_, v) = post(
        port,
        "/v1/events/purge",
        json!({"since": "1h", "error_contains": "cancel", "dry_run": true}),
    )
    .await;
    assert_eq!(v["matched"], 3, "{v}");
    let (_, v) = post(
        port,
        "/v1/events/purge",
        json!({"since": "2999-01-01T00:00:00Z", "dry_run": true}),
    )
    .await;
    assert_eq!(v["matched"], 0, "{v}");

    // Bad filters: 400 naming the problem; no token: 401; nothing changed.
    let before = stats(port).await;
    for (path, body, needle) in [
        ("/v1/events/replay", json!({"state": "pending"}), "dead"),
        (
            "/v1/events/purge",
            json!({"state": "live", "dry_run": true}),
            "dead",
        ),
        ("/v1/events/cancel", json!({}), "condition"),
        ("/v1/events/cancel", json!({"state": "dead"}), "live"),
        ("/v1/events/cancel", json!({"group_id": "g"}), "name"),
        (
            "/v1/events/cancel",
            json!({"name": "bulk.b", "since": "last week"}),
            "since",
        ),
        ("/v1/events/replay", json!({"state": "asleep"}), "state"),
        ("/v1/events/purge", json!({"nmae": "bulk.a"}), "nmae"),
    ] {
        let (status, answer) =
            http_as(port, "POST", path, Some(&body.to_string()), Some(TOKEN)).await;
        let message = error_of(status, &answer, 400, "bad_request");
        assert!(message.contains(needle), "{path} {body}: {message}");
    }
    for path in ["/v1/events/replay", "/v1/events/purge", "/v1/events/cancel"] {
        let (status, answer) = http(port, "POST", path, Some(r#"{"name":"bulk.b"}"#)).await;
        error_of(status, &answer, 401, "unauthorized");
    }
    assert_eq!(stats(port).await, before);

    // The CLI: same filters, --dry-run prints the count only.
    let count = |args: &[&str]| ok(&outrun(&db, args)).trim().to_owned();
    assert_eq!(
        count(&[
            "events",
            "replay",
            "--error-contains",
            "no handler",
            "--dry-run"
        ]),
        "2"
    );
    assert_eq!(
        count(&[
            "events",
            "cancel",
            "--name",
            "bulk.b",
            "--group",
            "g",
            "--dry-run"
        ]),
        "2"
    );
    assert_eq!(
        count(&[
            "events",
            "purge",
            "--dead",
            "--name",
            "bulk.c",
            "--since",
            "1h",
            "--dry-run"
        ]),
        "2"
    );
    let err = fails(&outrun(&db, &["events", "cancel", "--state", "dead"]));
    assert!(err.contains("live"), "{err}");
    let err = fails(&outrun(&db, &["events", "replay", "--state", "running"]));
    assert!(err.contains("dead"), "{err}");
    let err = fails(&outrun(&db, &["events", "replay", "--since", "soon"]));
    assert!(err.contains("since") && err.contains("RFC 3339"), "{err}");
    assert_eq!(stats(port).await, before);

    // And for real: replay the cancelled ones, purge bulk.c.
    let out = outrun(
        &db,
        &[
            "events",
            "replay",
            "--name",
            "bulk.a",
            "--error-contains",
            "cancelled",
        ],
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("replayed 3"));
    let out = outrun(&db, &["events", "purge", "--dead", "--name", "bulk.c"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("purged 2"));
    assert_eq!(rows(&db, "bulk.c").await, 0);
    // bulk.a ran again (and, with no handler, died again for that reason).
    wait_for("the replayed events to run again", || async {
        db.scalar(
            "SELECT count(*) FROM outbox_events WHERE name = 'bulk.a' AND last_error LIKE 'no handler%'",
        )
        .await
            == 3
    })
    .await;
    assert_eq!(stats(port).await["scheduled"], 2);

    // One event by id: 409 for a live event.
    let id = db
        .strings("SELECT CAST(id AS TEXT) FROM outbox_events WHERE name = 'bulk.b'")
        .await
        .remove(0);
    let (status, answer) = http_as(
        port,
        "POST",
        &format!("/v1/events/{id}/replay"),
        None,
        Some(TOKEN),
    )
    .await;
    let message = error_of(status, &answer, 409, "conflict");
    assert!(message.contains("not dead"), "{message}");
    serve.stop();
}

// ---------------------------------------------------------------------------
// Attempt history

async fn attempt_history_is_recorded_and_bounded(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nattempt_history = 3\ncleanup_interval = \"100ms\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n\n\
             [[handler]]\nname = \"probe\"\nmodule = {:?}\nevents = [\"probe.fail\", \"probe.retry-after\", \"probe.echo\"]\n",
            guest("probe")
        ),
    )
    .unwrap();
    let serve = Serve::ready(&db, &config).await;
    let failing = enqueue(
        port,
        json!({"name": "probe.fail", "payload": {"message": "boom", "retryable": true}, "max_retry": 5}),
    )
    .await;
    let deferring = enqueue(
        port,
        json!({"name": "probe.retry-after", "payload": {"ms": 30}}),
    )
    .await;
    let fine = enqueue(port, json!({"name": "probe.echo", "payload": {}})).await;
    wait_for("the failing event to die", || async {
        let (_, body) = http(port, "GET", &format!("/v1/events/{failing}"), None).await;
        parse(&body)["dead"] == true
    })
    .await;

    // The last 3 of its 5 attempts, oldest first, with all they record.
    let (status, body) = http(port, "GET", &format!("/v1/events/{failing}"), None).await;
    assert_eq!(status, 200, "{body}");
    let ev = parse(&body);
    let attempts = ev["attempts"].as_array().unwrap();
    let numbers: Vec<i64> = attempts
        .iter()
        .map(|a| a["attempt"].as_i64().unwrap())
        .collect();
    let outcomes: Vec<&str> = attempts
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        (numbers, outcomes),
        (vec![3, 4, 5], vec!["failed", "failed", "dead"]),
        "{ev}"
    );
    for a in attempts {
        assert_eq!(a["error"], "boom", "{a}");
        assert_eq!(a["handler"], "probe", "{a}");
        assert_eq!(a["version"].as_str().unwrap().len(), 64, "{a}");
        assert!(a["instance"].as_str().is_some_and(|i| !i.is_empty()), "{a}");
        assert!(
            a["duration_ms"].as_i64().unwrap() >= 0 && a["started_at"].is_string(),
            "{a}"
        );
    }
    // The CLI shows the same.
    let out = ok(&outrun(&db, &["events", "show", &failing, "--json"]));
    assert_eq!(parse(&out)["attempts"], ev["attempts"], "{out}");

    // Deferrals are attempts too, bounded the same way.
    wait_for("the deferring event to defer a few times", || async {
        let (_, body) = http(port, "GET", &format!("/v1/events/{deferring}"), None).await;
        parse(&body)["deferrals"].as_i64().unwrap_or(0) >= 4
    })
    .await;
    let (_, body) = http(port, "GET", &format!("/v1/events/{deferring}"), None).await;
    let attempts = parse(&body)["attempts"].as_array().unwrap().clone();
    assert!(
        attempts.len() == 3 && attempts.iter().all(|a| a["outcome"] == "deferred"),
        "{attempts:?}"
    );
    // A handled event leaves no history; a purged one loses it to the cleaner.
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM outrun_attempts WHERE CAST(event_id AS TEXT) = '{fine}'"
        ))
        .await,
        0
    );
    ok(&outrun(
        &db,
        &["events", "purge", "--dead", "--name", "probe.fail"],
    ));
    wait_for("the purged event's attempts to be cleaned", || async {
        db.scalar(&format!(
            "SELECT count(*) FROM outrun_attempts WHERE CAST(event_id AS TEXT) = '{failing}'"
        ))
        .await
            == 0
    })
    .await;
    serve.stop();
}

/// `[runtime] keep_done`: a handled event's last attempt (and its failed
/// ones) stays queryable for that long, whether it was acked in a batch
/// (no effects) or committed in a lane (it emitted), then the cleaner
/// drops them.
async fn keep_done_answers_did_my_event_run(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nkeep_done = \"4s\"\ncleanup_interval = \"200ms\"\n\
             backoff_base = \"100ms\"\nbackoff_max = \"200ms\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n\n\
             [[handler]]\nname = \"probe\"\nmodule = {:?}\n\
             events = [\"probe.flaky\", \"probe.emit\", \"probe.echo\"]\n\
             [handler.allow]\nemit = [\"keep.follow-up\"]\n",
            guest("probe")
        ),
    )
    .unwrap();
    let serve = Serve::ready(&db, &config).await;
    let flaky = enqueue(
        port,
        json!({"name": "probe.flaky", "payload": {"succeed_on_attempt": 2}}),
    )
    .await;
    let emitting = enqueue(
        port,
        json!({"name": "probe.emit", "payload": {"name": "keep.follow-up", "payload": {},
                "options": {"delay_ms": 3600000}}}),
    )
    .await;
    let gone = |id: String| async move {
        let (status, _) = http(port, "GET", &format!("/v1/events/{id}"), None).await;
        status == 404
    };
    wait_for("both events handled", || async {
        gone(flaky.clone()).await && gone(emitting.clone()).await
    })
    .await;
    let outcomes = |out: &str| -> Vec<(i64, String)> {
        parse(out)["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["attempt"].as_i64().unwrap(),
                    a["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    // The records are written just after the commit: wait for them.
    wait_for("the records of both", || async {
        let f = outrun(&db, &["events", "show", &flaky, "--json"]);
        let e = outrun(&db, &["events", "show", &emitting, "--json"]);
        f.status.success() && e.status.success()
    })
    .await;
    let out = ok(&outrun(&db, &["events", "show", &flaky, "--json"]));
    assert_eq!(parse(&out)["state"], "done", "{out}");
    assert_eq!(
        outcomes(&out),
        vec![(1, "failed".to_owned()), (2, "done".to_owned())],
        "{out}"
    );
    let done = &parse(&out)["attempts"][1];
    assert_eq!(done["handler"], "probe", "{done}");
    assert_eq!(done["version"].as_str().unwrap().len(), 64, "{done}");
    let out = ok(&outrun(&db, &["events", "show", &emitting, "--json"]));
    assert_eq!(outcomes(&out), vec![(1, "done".to_owned())], "{out}");
    // The API has them too.
    let (status, body) = http(port, "GET", &format!("/v1/events/{flaky}/attempts"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(parse(&body).as_array().unwrap().len(), 2, "{body}");
    let (status, body) = http(
        port,
        "GET",
        &format!("/v1/events/{}/attempts", uuid::Uuid::now_v7()),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // Past keep_done the cleaner drops them, and show says why it knows nothing.
    wait_for("the records to expire", || async {
        !outrun(&db, &["events", "show", &flaky, "--json"])
            .status
            .success()
    })
    .await;
    let err = fails(&outrun(&db, &["events", "show", &emitting]));
    assert!(err.contains("keep_done"), "{err}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM outrun_attempts").await,
        0,
        "nothing left behind"
    );
    serve.stop();
}

on_both_backends!(
    keep_done_answers_did_my_event_run,
    token_guards_every_change,
    errors_have_one_shape_and_name_the_parameter,
    list_filters_and_pages,
    metrics_on_their_own_listener,
    openapi_is_served_and_complete,
    pause_holds_on_every_instance,
    pause_holds_for_limited_names,
    bulk_operations_with_filters,
    attempt_history_is_recorded_and_bounded,
);
