//! The WASM host through the library API: routing, every capability granted
//! and denied, effects committed with the ack or not at all, hostile guests,
//! bad modules and config, the artifact cache and hot reload. Runs the
//! `probe` guest (target/guests/probe.wasm, built by scripts/build-guests.sh)
//! against real SQLite, Redis and HTTP servers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use outrun::handler::{Effects, HandlerError, Outcome, Router};
use outrun::wasm::{HandlerSpec, HostServices, KvSettings, Registry, WasmError, check_file};
use outrun::{Event, Store};
use uuid::Uuid;

#[macro_use]
mod common;
use common::TestDb;

// ---------------------------------------------------------------- helpers

/// `guest("probe.wasm")` → target/guests/probe.wasm (panics with "run
/// scripts/build-guests.sh" when missing).
fn guest(file: &str) -> PathBuf {
    common::guest(file.trim_end_matches(".wasm"))
}

/// A `[[handler]]` entry from TOML, as the config file would give it.
fn spec(toml_text: &str) -> HandlerSpec {
    toml::from_str(toml_text).unwrap_or_else(|e| panic!("bad test spec: {e}\n{toml_text}"))
}

fn probe_spec(name: &str, module: &Path, extra: &str) -> HandlerSpec {
    spec(&format!(
        "name = \"{name}\"\nevents = [\"probe.echo\", \"probe.emit\", \"probe.emit-raw\", \"probe.sql\", \"probe.kv\", \"probe.http\", \
         \"probe.config\", \"probe.loop\", \"probe.oom\", \"probe.stack\", \"probe.trap\", \"probe.panic\", \"probe.fail\", \
         \"probe.retry-after\", \"probe.version\", \"probe.print\", \"probe.counter\"]\nmodule = {module:?}\n{timeout}{extra}",
        // 2 s unless the test sets its own (TOML rejects a repeated key).
        timeout = if extra.contains("timeout =") {
            ""
        } else {
            "timeout = \"2s\"\n"
        }
    ))
}

async fn load(specs: Vec<HandlerSpec>, dir: &Path) -> Arc<Registry> {
    load_with(specs, dir, HostServices::default())
        .await
        .unwrap_or_else(|e| panic!("load failed: {e}"))
}

/// Tests share one artifact cache (content-addressed, written by rename, so
/// concurrent tests are safe): compiling the probe in a debug build takes
/// seconds, loading it from the cache does not. The cache test uses its own.
async fn load_with(
    specs: Vec<HandlerSpec>,
    dir: &Path,
    mut services: HostServices,
) -> Result<Arc<Registry>, WasmError> {
    if services.cache_dir.is_none() {
        services.cache_dir =
            Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifact-cache"));
        // Shared by concurrent tests: a reload in one must not prune what
        // another just compiled.
        services.cache_keep = usize::MAX;
    }
    Registry::load(specs, dir, services).await
}

fn event(name: &str, payload: serde_json::Value) -> Event {
    let now = Utc::now();
    Event {
        id: Uuid::now_v7(),
        name: name.to_string(),
        payload: payload.to_string(),
        group_id: None,
        retry: 0,
        max_retry: 5,
        create_date: now,
        available_at: now,
        expires_at: None,
        locked_by: None,
        locked_until: None,
        last_error: None,
        idempotency_key: None,
        dead_at: None,
        deferrals: 0,
        traceparent: None,
    }
}

/// Route `ev` by name and run it with `effects`.
async fn run(reg: &Registry, ev: &Event, effects: &mut Effects) -> Result<Outcome, HandlerError> {
    let route = reg
        .route(&ev.name)
        .unwrap_or_else(|| panic!("no route for {}", ev.name));
    route.handler.handle(ev, effects).await
}

async fn run_plain(
    reg: &Registry,
    name: &str,
    payload: serde_json::Value,
) -> Result<Outcome, HandlerError> {
    run(reg, &event(name, payload), &mut Effects::default()).await
}

async fn redis_conn() -> redis::aio::MultiplexedConnection {
    let url = common::redis_url();
    let client = redis::Client::open(url.as_str()).unwrap();
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Redis at {url} unreachable ({e}); start it or set {}",
                common::REDIS_ENV
            )
        })
}

/// Log lines written while the guard lives (this thread only, which with
/// `#[tokio::test]`'s current-thread runtime includes spawned tasks).
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        let buf = self.0.lock().unwrap();
        String::from_utf8_lossy(&buf)
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    capture_logs_at(tracing::Level::INFO)
}

fn capture_logs_at(level: tracing::Level) -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(level)
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

/// Poll `f` until it is true; panic with `what` after a generous deadline.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn hash_of(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

// ---------------------------------------------------------------- routing

#[tokio::test]
async fn guest_stdout_and_stderr_go_to_the_debug_log_bounded_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let reg = load(
        vec![probe_spec(
            "printer",
            &guest("probe.wasm"),
            "timeout = \"20s\"\n",
        )],
        dir.path(),
    )
    .await;
    let (logs, _guard) = capture_logs_at(tracing::Level::DEBUG);
    let ev = event(
        "probe.print",
        serde_json::json!({"stdout": "hello out\nunfinished", "stderr": "hello err\n"}),
    );
    assert_eq!(
        run(&reg, &ev, &mut Effects::default()).await,
        Ok(Outcome::Done)
    );
    let id = ev.id.to_string();
    for (text, stream) in [
        ("hello out", "stdout"),
        ("unfinished", "stdout"),
        ("hello err", "stderr"),
    ] {
        let lines = logs.lines_with(text);
        assert_eq!(lines.len(), 1, "{text}: {lines:?}");
        let l = &lines[0];
        assert!(
            l.contains("DEBUG")
                && l.contains(&id)
                && l.contains("handler=\"printer\"")
                && l.contains(&format!("stream=\"{stream}\"")),
            "{l}"
        );
    }

    // 264 KB of output: at most LOG_CAP bytes of it is logged, then one
    // line says how much was dropped.
    let ev = event(
        "probe.print",
        serde_json::json!({"stdout": "0123456789abcdef0123456789abcdef\n", "repeat": 8_000}),
    );
    assert_eq!(
        run(&reg, &ev, &mut Effects::default()).await,
        Ok(Outcome::Done)
    );
    let lines = logs.lines_with(&ev.id.to_string());
    let cap = outrun::host::output::LOG_CAP;
    assert!(
        lines.len() > 100 && lines.len() <= cap / 33 + 2,
        "{} lines",
        lines.len()
    );
    let last = lines.last().unwrap();
    assert!(
        last.contains("bytes of guest stdout dropped"),
        "the drop is reported: {last}"
    );
}

#[tokio::test]
async fn routes_by_event_name_and_reports_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let probe = guest("probe.wasm");
    let other = spec(&format!(
        "name = \"other\"\nevents = [\"other.thing\"]\nmodule = {probe:?}\nconcurrency = 1\nmax_retry = 3\n"
    ));
    let reg = load(vec![probe_spec("probe", &probe, ""), other], dir.path()).await;

    let r = reg.route("probe.echo").expect("probe.echo routed");
    assert_eq!(&*r.handler_name, "probe");
    let r = reg.route("other.thing").expect("other.thing routed");
    assert_eq!(&*r.handler_name, "other");
    assert_eq!(r.max_retry, Some(3));
    assert!(reg.route("nobody.handles.this").is_none());

    assert_eq!(
        run_plain(&reg, "probe.echo", serde_json::json!({"hello": 1})).await,
        Ok(Outcome::Done)
    );

    let infos = reg.handlers();
    assert_eq!(infos.len(), 2);
    assert_eq!(infos[0].hash, hash_of(&probe));
    assert!(infos[1].events == vec!["other.thing".to_string()]);

    // The concurrency cap is one semaphore per handler; holding its only
    // permit saturates every event name bound to it.
    let permits = r
        .permits
        .clone()
        .expect("concurrency = 1 gives a semaphore");
    assert!(reg.saturated().is_empty());
    let _held = permits.try_acquire().unwrap();
    assert_eq!(reg.saturated(), vec!["other.thing".to_string()]);
}

#[tokio::test]
async fn outcomes_and_handler_errors_map_through() {
    let dir = tempfile::tempdir().unwrap();
    let reg = load(
        vec![probe_spec("probe", &guest("probe.wasm"), "")],
        dir.path(),
    )
    .await;
    assert_eq!(
        run_plain(&reg, "probe.retry-after", serde_json::json!({"ms": 1500})).await,
        Ok(Outcome::RetryAfter(Duration::from_millis(1500)))
    );
    let err = run_plain(
        &reg,
        "probe.fail",
        serde_json::json!({"message": "bad input x", "retryable": false}),
    )
    .await
    .unwrap_err();
    assert_eq!(err, HandlerError::reject("bad input x"));
    let err = run_plain(
        &reg,
        "probe.fail",
        serde_json::json!({"message": "try later", "retryable": true}),
    )
    .await
    .unwrap_err();
    assert_eq!(err, HandlerError::retry("try later"));
}

// ---------------------------------------------------------------- emit

#[tokio::test]
async fn emit_granted_is_buffered_and_denied_names_the_fix() {
    let (logs, _guard) = capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let reg = load(
        vec![probe_spec(
            "emitter",
            &guest("probe.wasm"),
            "[allow]\nemit = [\"follow.up\"]\n",
        )],
        dir.path(),
    )
    .await;

    let mut effects = Effects::default();
    let ev = event(
        "probe.emit",
        serde_json::json!({"name": "follow.up", "payload": {"n": 7}, "options": {"group_id": "g1", "delay_ms": 5000}}),
    );
    assert_eq!(run(&reg, &ev, &mut effects).await, Ok(Outcome::Done));
    let (_, emitted) = effects.into_parts();
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].name, "follow.up");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&emitted[0].payload).unwrap(),
        serde_json::json!({"n": 7})
    );
    assert_eq!(emitted[0].group_id.as_deref(), Some("g1"));
    assert_eq!(emitted[0].delay, Some(Duration::from_secs(5)));
    assert_eq!(
        emitted[0].max_retry,
        Some(outrun::store::DEFAULT_MAX_RETRY),
        "no max-retry option: the runtime default"
    );

    let mut effects = Effects::default();
    let ev = event(
        "probe.emit",
        serde_json::json!({"name": "not.granted", "payload": {}}),
    );
    let err = run(&reg, &ev, &mut effects).await.unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(
        err.message.contains("not.granted")
            && err.message.contains("[handler.allow] of handler emitter"),
        "{err:?}"
    );
    assert!(effects.is_empty(), "a denied emit must not be buffered");
    let denied = logs.lines_with("capability denied");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(
        denied[0].contains("WARN") && denied[0].contains("handler=emitter"),
        "{}",
        denied[0]
    );
}

#[tokio::test]
async fn emit_of_non_json_payload_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let reg = load(
        vec![probe_spec(
            "emitter",
            &guest("probe.wasm"),
            "[allow]\nemit = [\"follow.up\"]\n",
        )],
        dir.path(),
    )
    .await;
    let mut effects = Effects::default();
    let ev = event(
        "probe.emit-raw",
        serde_json::json!({"name": "follow.up", "raw": "{not json"}),
    );
    let err = run(&reg, &ev, &mut effects).await.unwrap_err();
    assert!(err.message.contains("not valid JSON"), "{err:?}");
    assert!(effects.is_empty());
}

// ---------------------------------------------------------------- sql (+ emit) with the ack

on_both_backends!(
    sql_and_emit_commit_with_the_ack_and_vanish_on_failure,
    in_flight_event_finishes_on_old_version_across_reload
);

/// Claim the event with id `id` (the test enqueued it) for an ack.
async fn claim(store: &Store, id: Uuid) -> outrun::Claimed {
    let claimed = store
        .claim("wasm-host-test", 100, Duration::from_secs(60), &[])
        .await
        .unwrap();
    claimed
        .into_iter()
        .find(|c| c.event.id == id)
        .expect("the test's event is claimable")
}

async fn sql_and_emit_commit_with_the_ack_and_vanish_on_failure(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let store = db.store().await;
    db.exec("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        .await;
    let reg = load(
        vec![probe_spec(
            "writer",
            &guest("probe.wasm"),
            "[allow]\nsql = true\nemit = [\"follow.up\"]\n",
        )],
        dir.path(),
    )
    .await;

    // Success: the handler's row, its emitted event and the ack land together.
    let payload = serde_json::json!({
        "execute": [{"sql": "INSERT INTO notes (id, body) VALUES ($1, $2)", "params": [1, "kept"]}],
        "query": {"sql": "SELECT body FROM notes", "params": [], "expect_rows": [["kept"]]}
    });
    let id = store
        .enqueue(&outrun::NewEvent::new("probe.sql", payload.to_string()), 5)
        .await
        .unwrap();
    let claimed = claim(&store, id).await;
    let mut effects = Effects::new(store.clone());
    assert_eq!(
        run(&reg, &claimed.event, &mut effects).await,
        Ok(Outcome::Done)
    );
    let emit_ev = event(
        "probe.emit",
        serde_json::json!({"name": "follow.up", "payload": {"after": "sql"}}),
    );
    assert_eq!(run(&reg, &emit_ev, &mut effects).await, Ok(Outcome::Done));
    let (tx, emitted) = effects.into_parts();
    let mut tx = tx.expect("sql opened the ack transaction");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM notes").await,
        0,
        "nothing visible before the ack commits"
    );
    tx.enqueue_all(&emitted, 5).await.unwrap();
    assert!(tx.commit_ack(claimed.lease()).await.unwrap());
    assert!(
        store.get(id).await.unwrap().is_none(),
        "the acked event is deleted"
    );
    assert_eq!(db.scalar("SELECT COUNT(*) FROM notes").await, 1);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM outbox_events WHERE name = 'follow.up'")
            .await,
        1
    );

    // Failure after writing: the caller rolls the ack transaction back and
    // the row is gone with it.
    let ev = event(
        "probe.sql",
        serde_json::json!({"execute": [{"sql": "INSERT INTO notes (id, body) VALUES ($1, $2)", "params": [2, "lost"]}], "fail_after": true}),
    );
    let mut effects = Effects::new(store.clone());
    let err = run(&reg, &ev, &mut effects).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
    let (tx, _) = effects.into_parts();
    tx.expect("the transaction is handed back after a failed call")
        .rollback()
        .await
        .unwrap();
    assert_eq!(db.scalar("SELECT COUNT(*) FROM notes").await, 1);

    // Bad SQL is `invalid`: the guest gets the database's message.
    let bad = event(
        "probe.sql",
        serde_json::json!({"execute": [{"sql": "INSERT INTO no_such_table VALUES (1)", "params": []}]}),
    );
    let err = run(&reg, &bad, &mut Effects::new(store.clone()))
        .await
        .unwrap_err();
    assert!(err.message.contains("no_such_table"), "{err:?}");
    assert!(
        !err.retryable,
        "bad SQL will not get better on retry: {err:?}"
    );
}

#[tokio::test]
async fn sql_denied_without_grant_never_opens_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let reg = load(
        vec![probe_spec("nosql", &guest("probe.wasm"), "")],
        dir.path(),
    )
    .await;
    let mut effects = Effects::default();
    let ev = event(
        "probe.sql",
        serde_json::json!({"execute": [{"sql": "SELECT 1", "params": []}]}),
    );
    let err = run(&reg, &ev, &mut effects).await.unwrap_err();
    assert!(!err.retryable);
    assert!(
        err.message.contains("sql = true") && err.message.contains("handler nosql"),
        "{err:?}"
    );
    assert!(effects.is_empty());
}

// ---------------------------------------------------------------- kv

fn kv_ops_payload() -> serde_json::Value {
    serde_json::json!({"ops": [
        {"op": "get", "key": "a", "expect": null},
        {"op": "set", "key": "a", "value": "1"},
        {"op": "get", "key": "a", "expect": "1"},
        {"op": "exists", "key": "a", "expect": true},
        {"op": "expire", "key": "a", "ttl_ms": 60000, "expect": true},
        {"op": "expire", "key": "missing", "ttl_ms": 60000, "expect": false},
        {"op": "sadd", "key": "s", "members": ["x", "y", "x"], "expect": 2},
        {"op": "srem", "key": "s", "members": ["x", "z"], "expect": 1},
        {"op": "smembers", "key": "s", "expect": ["y"]},
        {"op": "delete", "key": "a", "expect": true},
        {"op": "delete", "key": "a", "expect": false},
        {"op": "set", "key": "short", "value": "v", "ttl_ms": 1}
    ]})
}

#[tokio::test]
async fn kv_embedded_store_works_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let reg = load(
        vec![probe_spec(
            "kvuser",
            &guest("probe.wasm"),
            "[allow]\nkv = \"kvuser:\"\n",
        )],
        dir.path(),
    )
    .await;
    assert_eq!(
        run_plain(&reg, "probe.kv", kv_ops_payload()).await,
        Ok(Outcome::Done)
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let after = serde_json::json!({"ops": [
        {"op": "get", "key": "short", "expect": null},
        {"op": "smembers", "key": "s", "expect": ["y"]}
    ]});
    assert_eq!(run_plain(&reg, "probe.kv", after).await, Ok(Outcome::Done));
    // A mismatch is reported (the probe rejects), so the checks above can fail.
    let wrong = serde_json::json!({"ops": [{"op": "smembers", "key": "s", "expect": ["nope"]}]});
    assert!(run_plain(&reg, "probe.kv", wrong).await.is_err());
}

#[tokio::test]
async fn kv_on_redis_is_confined_to_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = common::redis_prefix();
    let services = HostServices {
        kv: KvSettings {
            url: Some(common::redis_url()),
            ..Default::default()
        },
        ..Default::default()
    };
    let reg = load_with(
        vec![probe_spec(
            "kvuser",
            &guest("probe.wasm"),
            &format!("[allow]\nkv = \"{prefix}\"\n"),
        )],
        dir.path(),
        services,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "Redis at {} unreachable ({e}); start it or set {}",
            common::redis_url(),
            common::REDIS_ENV
        )
    });
    let mut conn = redis_conn().await;
    let result = run_plain(&reg, "probe.kv", kv_ops_payload()).await;
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{prefix}s"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let bare: bool = redis::cmd("EXISTS")
        .arg("s")
        .query_async(&mut conn)
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in &keys {
        let _: () = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(result, Ok(Outcome::Done));
    assert_eq!(
        members,
        vec!["y".to_string()],
        "the guest's key `s` lives at {prefix}s"
    );
    assert!(!bare || keys.iter().all(|k| k.starts_with(&prefix)));
}

#[tokio::test]
async fn kv_denied_without_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let reg = load(
        vec![probe_spec("nokv", &guest("probe.wasm"), "")],
        dir.path(),
    )
    .await;
    let err = run_plain(
        &reg,
        "probe.kv",
        serde_json::json!({"ops": [{"op": "get", "key": "a"}]}),
    )
    .await
    .unwrap_err();
    assert!(!err.retryable);
    assert!(
        err.message.contains("kv = ") && err.message.contains("handler nokv"),
        "{err:?}"
    );
}

// ---------------------------------------------------------------- config

#[tokio::test]
async fn config_values_come_from_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let reg = load(
        vec![probe_spec(
            "cfg",
            &guest("probe.wasm"),
            "[allow.config]\nstorage_url = \"http://storage\"\n",
        )],
        dir.path(),
    )
    .await;
    assert_eq!(
        run_plain(
            &reg,
            "probe.config",
            serde_json::json!({"key": "storage_url", "expect": "http://storage"})
        )
        .await,
        Ok(Outcome::Done)
    );
    assert_eq!(
        run_plain(
            &reg,
            "probe.config",
            serde_json::json!({"key": "absent", "expect": null})
        )
        .await,
        Ok(Outcome::Done)
    );
    assert!(
        run_plain(
            &reg,
            "probe.config",
            serde_json::json!({"key": "storage_url", "expect": "other"})
        )
        .await
        .is_err()
    );
}

// ---------------------------------------------------------------- http

/// A real HTTP server counting requests; `/slow` answers after 30 s.
async fn http_server() -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new()
        .route(
            "/ok",
            axum::routing::get(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    "ok"
                }
            }),
        )
        .route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

#[tokio::test]
async fn http_allow_list_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let (port, hits) = http_server().await;
    let probe = guest("probe.wasm");
    let allowed = spec(&format!(
        "name = \"web\"\nevents = [\"probe.http\"]\nmodule = {probe:?}\ntimeout = \"5s\"\n[allow]\nhttp = [\"127.0.0.1:{port}\"]\n"
    ));
    let denied = spec(&format!(
        "name = \"noweb\"\nevents = [\"noweb.http\"]\nmodule = {probe:?}\n[allow]\nhttp = [\"127.0.0.1:{}\"]\n",
        port.wrapping_add(1)
    ));
    let reg = load(vec![allowed, denied], dir.path()).await;
    let url = format!("http://127.0.0.1:{port}/ok");
    assert_eq!(
        run_plain(
            &reg,
            "probe.http",
            serde_json::json!({"method": "GET", "url": url, "expect_status": 200})
        )
        .await,
        Ok(Outcome::Done)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Same probe code under another handler whose allow-list lacks the port.
    // The probe dispatches on the event name: route through `noweb` but
    // hand it an event named probe.http.
    let route = reg.route("noweb.http").unwrap();
    let ev = event(
        "probe.http",
        serde_json::json!({"method": "GET", "url": url}),
    );
    let err = route
        .handler
        .handle(&ev, &mut Effects::default())
        .await
        .unwrap_err();
    assert!(
        err.message.contains("Denied") || err.message.contains("denied"),
        "{err:?}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a denied request never reaches the server"
    );
}

#[tokio::test]
async fn http_wait_is_bounded_by_the_handler_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _) = http_server().await;
    let probe = guest("probe.wasm");
    let s = spec(&format!(
        "name = \"web\"\nevents = [\"probe.http\", \"probe.echo\"]\nmodule = {probe:?}\ntimeout = \"1s\"\n[allow]\nhttp = [\"127.0.0.1\"]\n"
    ));
    let reg = load(vec![s], dir.path()).await;
    let url = format!("http://127.0.0.1:{port}/slow");
    let err = run_plain(
        &reg,
        "probe.http",
        serde_json::json!({"method": "GET", "url": url}),
    )
    .await
    .unwrap_err();
    assert!(err.retryable, "{err:?}");
    assert!(
        err.message.contains("timeout") || err.message.contains("Timeout"),
        "{err:?}"
    );
    assert_eq!(
        run_plain(&reg, "probe.echo", serde_json::json!({})).await,
        Ok(Outcome::Done)
    );
}

// ---------------------------------------------------------------- hostile guests

#[tokio::test]
async fn hostile_guests_fail_their_event_and_the_next_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(&format!(
        "name = \"hostile\"\nevents = [\"probe.loop\", \"probe.oom\", \"probe.stack\", \"probe.trap\", \"probe.panic\", \"probe.echo\"]\n\
         module = {:?}\ntimeout = \"1s\"\nmemory = \"16MiB\"\n",
        guest("probe.wasm")
    ));
    let reg = load(vec![s], dir.path()).await;
    let cases = [
        ("probe.loop", "timeout after 1s"),
        ("probe.oom", "memory limit 16 MiB exceeded"),
        ("probe.stack", "wasm trap: stack overflow"),
        ("probe.trap", "wasm trap"),
        ("probe.panic", "probe panic"),
    ];
    for (name, expected) in cases {
        let err = run_plain(&reg, name, serde_json::json!({}))
            .await
            .unwrap_err();
        eprintln!("{name} -> {}", err.message);
        assert!(err.retryable, "{name}: {err:?}");
        assert!(
            err.message.contains(expected),
            "{name}: expected {expected:?} in {:?}",
            err.message
        );
        assert_eq!(
            run_plain(&reg, "probe.echo", serde_json::json!({})).await,
            Ok(Outcome::Done),
            "after {name}"
        );
    }
}

#[tokio::test]
async fn effects_survive_a_trap_for_the_caller_to_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let reg = load(
        vec![probe_spec(
            "e",
            &guest("probe.wasm"),
            "[allow]\nemit = [\"x\"]\n",
        )],
        dir.path(),
    )
    .await;
    let mut effects = Effects::default();
    run(
        &reg,
        &event("probe.emit", serde_json::json!({"name": "x", "payload": 1})),
        &mut effects,
    )
    .await
    .unwrap();
    run(
        &reg,
        &event("probe.loop", serde_json::json!({})),
        &mut effects,
    )
    .await
    .unwrap_err();
    let (_, emitted) = effects.into_parts();
    assert_eq!(
        emitted.len(),
        1,
        "effects are handed back even when the call is cut off"
    );
}

// ---------------------------------------------------------------- bad input

#[tokio::test]
async fn startup_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let probe = guest("probe.wasm");

    let missing = spec("name = \"ghost\"\nevents = [\"a\"]\nmodule = \"handlers/nope.wasm\"\n");
    let err = load_with(vec![missing], dir.path(), HostServices::default())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&dir.path().join("handlers/nope.wasm").display().to_string())
            && err.contains("ghost"),
        "{err}"
    );

    let a = spec(&format!(
        "name = \"a\"\nevents = [\"x\", \"shared\"]\nmodule = {probe:?}\n"
    ));
    let b = spec(&format!(
        "name = \"b\"\nevents = [\"shared\"]\nmodule = {probe:?}\n"
    ));
    let err = load_with(vec![a.clone(), b], dir.path(), HostServices::default())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("\"shared\"") && err.contains("handler a") && err.contains("handler b"),
        "{err}"
    );

    let a2 = spec(&format!(
        "name = \"a\"\nevents = [\"y\"]\nmodule = {probe:?}\n"
    ));
    let err = load_with(vec![a, a2], dir.path(), HostServices::default())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("\"a\"") && err.contains("unique"), "{err}");

    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let err = load_with(
        vec![spec(
            "name = \"c\"\nevents = [\"c\"]\nmodule = \"core.wasm\"\n",
        )],
        dir.path(),
        HostServices::default(),
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("core.wasm") && err.contains("not a component"),
        "{err}"
    );

    // Limits and names are checked before anything compiles.
    for (extra, expected) in [
        ("events = [\"\"]\nmemory = \"16MiB\"", "event name \"\""),
        (
            "events = [\"e\"]\nmemory = \"1KiB\"",
            "memory = 1 KiB is out of range",
        ),
        (
            "events = [\"e\"]\nconcurrency = 0",
            "concurrency must be at least 1",
        ),
        ("events = []", "`events` is empty"),
        (
            "events = [\"e\"]\ninstances = \"reuse\"\nreuse_events = 0",
            "reuse_events must be at least 1",
        ),
    ] {
        let s = spec(&format!("name = \"lim\"\nmodule = {probe:?}\n{extra}\n"));
        let err = load_with(vec![s], dir.path(), HostServices::default())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("lim") && err.contains(expected),
            "{extra}: {err}"
        );
    }

    // A component of another world (an empty one: no `handle` export) and a
    // truncated copy of the probe.
    std::fs::write(dir.path().join("other.wasm"), b"\0asm\x0d\0\x01\0").unwrap();
    let bytes = std::fs::read(&probe).unwrap();
    std::fs::write(dir.path().join("cut.wasm"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    for (file, expected) in [
        ("other.wasm", "does not export `handle"),
        ("cut.wasm", "not a valid component"),
    ] {
        let s = spec(&format!(
            "name = \"h\"\nevents = [\"e\"]\nmodule = \"{file}\"\n"
        ));
        let err = load_with(vec![s], dir.path(), HostServices::default())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(file) && err.contains(expected),
            "{file}: {err}"
        );
    }
}

#[tokio::test]
async fn a_handler_still_compiling_is_not_claimed_and_its_claimed_events_wait() {
    let dir = tempfile::tempdir().unwrap();
    let services = HostServices {
        // Its own cache: the compile must not be a cache hit.
        cache_dir: Some(dir.path().join("cache")),
        ..HostServices::default()
    };
    let (reg, compile) = Registry::prepare(
        vec![probe_spec("slow", &guest("probe.wasm"), "")],
        dir.path(),
        services,
    )
    .await
    .unwrap();
    assert!(!reg.all_ready());
    assert!(reg.handlers().is_empty(), "nothing serves yet");
    let mut held = reg.saturated();
    held.sort();
    assert!(
        held.contains(&"probe.echo".to_string()) && held.contains(&"probe.counter".to_string()),
        "the claimer leaves a compiling handler's events in the table: {held:?}"
    );
    // One claimed anyway (just before the compile started) waits for it
    // instead of failing.
    let route = reg.route("probe.counter").expect("routed while compiling");
    assert_eq!(
        route.timeout, None,
        "no backstop while waiting for a compile"
    );
    let ev = event("probe.counter", serde_json::json!({}));
    let waiting =
        tokio::spawn(async move { route.handler.handle(&ev, &mut Effects::default()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "it waits for the compile");
    compile.run().await.unwrap();
    assert_eq!(
        waiting.await.unwrap(),
        Ok(Outcome::RetryAfter(Duration::from_millis(1)))
    );
    assert!(reg.all_ready() && reg.saturated().is_empty());
    assert_eq!(reg.handlers().len(), 1);
}

#[tokio::test]
async fn the_artifact_cache_keeps_the_versions_in_use_plus_n_and_does_not_grow_per_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    // Leftovers: old artifacts (of other versions or builds) and a temp file
    // a crash left behind.
    let old = std::time::SystemTime::now() - Duration::from_secs(7200);
    let mut leftovers = Vec::new();
    for i in 0..5 {
        let path = cache.join(format!("{i:064x}-0000000000000000.cwasm"));
        std::fs::write(&path, b"old").unwrap();
        let f = std::fs::File::options().append(true).open(&path).unwrap();
        f.set_modified(old + Duration::from_secs(i)).unwrap();
        leftovers.push(path);
    }
    let tmp = cache.join(".tmp-1-crash");
    std::fs::write(&tmp, b"half").unwrap();
    std::fs::File::options()
        .append(true)
        .open(&tmp)
        .unwrap()
        .set_modified(old)
        .unwrap();
    std::fs::write(cache.join("unrelated.txt"), b"not ours").unwrap();

    let module = dir.path().join("probe.wasm");
    let probe = std::fs::read(guest("probe.wasm")).unwrap();
    std::fs::write(&module, &probe).unwrap();
    let services = HostServices {
        cache_dir: Some(cache.clone()),
        cache_keep: 2,
        ..HostServices::default()
    };
    let reg = load_with(
        vec![probe_spec("pruned", &module, "")],
        dir.path(),
        services,
    )
    .await
    .unwrap();
    let artifacts = || -> Vec<String> {
        std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cwasm"))
            .collect()
    };
    assert_eq!(artifacts().len(), 6, "five leftovers and the new one");
    reg.prune_cache();
    let left = artifacts();
    assert_eq!(left.len(), 3, "in use + 2: {left:?}");
    let serving = reg.current("pruned").unwrap().hash();
    assert!(left.iter().any(|n| n.starts_with(&serving)), "{left:?}");
    // The two most recent leftovers stay, the older ones go.
    assert!(leftovers[4].exists() && leftovers[3].exists() && !leftovers[0].exists());
    assert!(!tmp.exists(), "a stale temp file is pruned");
    assert!(
        cache.join("unrelated.txt").exists(),
        "only artifacts are touched"
    );

    // Every rebuild adds an artifact and a reload prunes: the count stays.
    for i in 0..5u8 {
        let next = outrun::wasm::with_custom_section(&probe, "rebuild", &[i]);
        std::fs::write(&module, &next).unwrap();
        assert!(matches!(
            reg.reload("pruned").await.unwrap(),
            outrun::wasm::Reloaded::Swapped { .. }
        ));
        let left = artifacts();
        assert_eq!(left.len(), 3, "after rebuild {i}: {left:?}");
        let serving = reg.current("pruned").unwrap().hash();
        assert!(left.iter().any(|n| n.starts_with(&serving)));
    }
    assert_eq!(
        run_plain(&reg, "probe.echo", serde_json::json!({})).await,
        Ok(Outcome::Done)
    );
}

/// `probe.counter` answers `RetryAfter(n ms)`, n = the instance's count.
async fn count(reg: &Registry) -> u64 {
    match run_plain(reg, "probe.counter", serde_json::json!({})).await {
        Ok(Outcome::RetryAfter(d)) => d.as_millis() as u64,
        other => panic!("probe.counter: {other:?}"),
    }
}

#[tokio::test]
async fn reused_instances_keep_state_and_are_recycled_after_n_events_errors_traps_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("probe.wasm");
    std::fs::copy(guest("probe.wasm"), &module).unwrap();
    let reg = load(
        vec![
            probe_spec("fresh", &module, ""),
            spec(&format!(
                "name = \"warm\"\nevents = [\"warm/probe.counter\", \"warm/probe.fail\", \"warm/probe.trap\", \"warm/probe.retry-after\"]\n\
                 module = {module:?}\ntimeout = \"2s\"\ninstances = \"reuse\"\nreuse_events = 4\n"
            )),
        ],
        dir.path(),
    )
    .await;
    // Fresh (the default): every event sees a new instance.
    for _ in 0..3 {
        assert_eq!(count(&reg).await, 1, "a fresh instance per event");
    }
    let warm = |name: &str| format!("warm/{name}");
    let count_warm = || async {
        match run_plain(&reg, &warm("probe.counter"), serde_json::json!({})).await {
            Ok(Outcome::RetryAfter(d)) => d.as_millis() as u64,
            other => panic!("warm/probe.counter: {other:?}"),
        }
    };
    // Reused: the static counter grows across events, and the instance is
    // replaced after reuse_events = 4.
    let seen: Vec<u64> = futures_seq(&count_warm, 6).await;
    assert_eq!(
        seen,
        [1, 2, 3, 4, 1, 2],
        "reused, then recycled after 4 events"
    );
    // A retry-after is a success: the instance stays.
    assert!(matches!(
        run_plain(
            &reg,
            &warm("probe.retry-after"),
            serde_json::json!({"ms": 5})
        )
        .await,
        Ok(Outcome::RetryAfter(_))
    ));
    assert_eq!(count_warm().await, 3, "the same instance");
    // An error the guest returns recycles the instance.
    let failed = run_plain(
        &reg,
        &warm("probe.fail"),
        serde_json::json!({"message": "no", "retryable": true}),
    )
    .await;
    assert_eq!(failed, Err(HandlerError::retry("no")));
    assert_eq!(count_warm().await, 1, "a new instance after an error");
    assert_eq!(count_warm().await, 2);
    // So does a trap.
    assert!(
        run_plain(&reg, &warm("probe.trap"), serde_json::json!({}))
            .await
            .is_err()
    );
    assert_eq!(count_warm().await, 1, "a new instance after a trap");
    assert_eq!(count_warm().await, 2);
    // And a reload: the new version starts from fresh instances.
    let probe = std::fs::read(&module).unwrap();
    std::fs::write(
        &module,
        outrun::wasm::with_custom_section(&probe, "v", b"2"),
    )
    .unwrap();
    reg.reload("warm").await.unwrap();
    assert_eq!(count_warm().await, 1, "a new instance after a reload");
    assert_eq!(count_warm().await, 2);

    // A debug-build figure, for the report (not asserted).
    let started = std::time::Instant::now();
    for _ in 0..200 {
        count(&reg).await;
    }
    let fresh = started.elapsed();
    let started = std::time::Instant::now();
    for _ in 0..200 {
        count_warm().await;
    }
    eprintln!(
        "probe.counter, debug build: fresh {:?}/event, reuse {:?}/event",
        fresh / 200,
        started.elapsed() / 200
    );
}

/// `f` awaited `n` times in order.
async fn futures_seq<F, Fut>(f: &F, n: usize) -> Vec<u64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(f().await);
    }
    out
}

#[tokio::test]
async fn a_memory_cap_below_the_components_initial_memory_is_refused_before_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let probe = guest("probe.wasm");
    let needs = check_file(&probe).unwrap().needs;
    // A Rust guest starts with ~1 MiB of linear memory, in one memory.
    assert!(
        needs.min_memory >= 1 << 20 && needs.memories >= 1 && needs.core_instances >= 1,
        "{needs:?}"
    );
    assert!(
        needs.tables >= 1 && needs.min_table_elements > 0,
        "{needs:?}"
    );

    let cache = dir.path().join("cache");
    let s = spec(&format!(
        "name = \"small\"\nevents = [\"e\"]\nmodule = {probe:?}\nmemory = \"512KiB\"\n"
    ));
    let services = HostServices {
        cache_dir: Some(cache.clone()),
        ..HostServices::default()
    };
    let err = load_with(vec![s], dir.path(), services)
        .await
        .err()
        .expect("a cap below the initial memory cannot load");
    let text = err.to_string();
    let need = outrun::wasm::ByteSize(needs.min_memory).to_string();
    assert!(
        text.contains("handler small")
            && text.contains(&need)
            && text.contains("`memory` = 512 KiB")
            && text.contains("raise `memory`"),
        "{text}"
    );
    // Refused before the compile: nothing reached the artifact cache.
    assert!(!cache.exists(), "nothing was compiled");

    // Exactly the need is enough.
    let s = spec(&format!(
        "name = \"fits\"\nevents = [\"probe.counter\"]\nmodule = {probe:?}\nmemory = {}\n",
        needs.min_memory
    ));
    let reg = load(vec![s], dir.path()).await;
    assert!(matches!(
        run_plain(&reg, "probe.counter", serde_json::json!({})).await,
        Ok(Outcome::RetryAfter(_))
    ));
}

#[tokio::test]
async fn check_file_accepts_the_probe_and_explains_rejections() {
    let dir = tempfile::tempdir().unwrap();
    // The shipped handlers fit the host as well.
    for shipped in ["ai_check_requeue", "family_sharing", "package_deletion"] {
        let path = common::guest(shipped);
        if let Err(e) = check_file(&path) {
            panic!("{shipped}: {e}");
        }
    }
    let info = check_file(&guest("probe.wasm")).expect("probe implements the handler world");
    assert!(
        info.exports.iter().any(|e| e == "handle"),
        "{:?}",
        info.exports
    );
    assert!(
        info.imports
            .iter()
            .any(|i| i.starts_with("outrun:handler/emit")),
        "{:?}",
        info.imports
    );

    // An empty component: valid, but it exports nothing.
    let other_world = dir.path().join("other.wasm");
    std::fs::write(&other_world, b"\0asm\x0d\0\x01\0").unwrap();
    let err = check_file(&other_world).unwrap_err().to_string();
    assert!(
        err.contains("other.wasm") && err.contains("handle"),
        "{err}"
    );

    let bytes = std::fs::read(guest("probe.wasm")).unwrap();
    let truncated = dir.path().join("truncated.wasm");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = check_file(&truncated).unwrap_err().to_string();
    assert!(
        err.contains("truncated.wasm") && err.contains("not a valid component"),
        "{err}"
    );

    let text = dir.path().join("text.wasm");
    std::fs::write(&text, "hello").unwrap();
    let err = check_file(&text).unwrap_err().to_string();
    assert!(err.contains("not a WebAssembly file"), "{err}");

    let err = check_file(&dir.path().join("absent.wasm"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("absent.wasm") && err.contains("not found"),
        "{err}"
    );
}

// ---------------------------------------------------------------- cache

#[tokio::test]
async fn restart_with_unchanged_module_loads_from_cache() {
    let dir = tempfile::tempdir().unwrap();
    let probe = guest("probe.wasm");
    let cache = dir.path().join("cache");
    let services = || HostServices {
        cache_dir: Some(cache.clone()),
        ..Default::default()
    };
    let reg = load_with(vec![probe_spec("p", &probe, "")], dir.path(), services())
        .await
        .unwrap();
    assert!(
        !reg.current("p").unwrap().from_cache(),
        "first start compiles"
    );
    let artifacts: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(artifacts.len(), 1, "one .cwasm, no temp files left behind");
    assert!(
        artifacts[0]
            .file_name()
            .to_string_lossy()
            .starts_with(&hash_of(&probe))
    );
    drop(reg);

    let reg = load_with(vec![probe_spec("p", &probe, "")], dir.path(), services())
        .await
        .unwrap();
    assert!(
        reg.current("p").unwrap().from_cache(),
        "restart loads from cache"
    );
    assert_eq!(
        run_plain(&reg, "probe.echo", serde_json::json!({})).await,
        Ok(Outcome::Done)
    );

    // A damaged artifact is ignored and replaced, not trusted; rewriting it
    // in place while a registry that loaded it still runs is harmless.
    std::fs::write(artifacts[0].path(), b"garbage").unwrap();
    assert_eq!(
        run_plain(&reg, "probe.echo", serde_json::json!({})).await,
        Ok(Outcome::Done)
    );
    let reg = load_with(vec![probe_spec("p", &probe, "")], dir.path(), services())
        .await
        .unwrap();
    assert!(!reg.current("p").unwrap().from_cache());
    assert_eq!(
        run_plain(&reg, "probe.echo", serde_json::json!({})).await,
        Ok(Outcome::Done)
    );
}

// ---------------------------------------------------------------- hot reload

struct ReloadFixture {
    dir: tempfile::TempDir,
    module: PathBuf,
    v1: String,
    v2: String,
}

fn reload_fixture() -> ReloadFixture {
    let dir = tempfile::tempdir().unwrap();
    let handlers = dir.path().join("handlers");
    std::fs::create_dir(&handlers).unwrap();
    let module = handlers.join("probe.wasm");
    std::fs::copy(guest("probe.wasm"), &module).unwrap();
    let (v1, v2) = (
        hash_of(&guest("probe.wasm")),
        hash_of(&guest("probe_v2.wasm")),
    );
    assert_ne!(v1, v2, "probe and probe_v2 must differ");
    ReloadFixture {
        dir,
        module,
        v1,
        v2,
    }
}

#[tokio::test]
async fn reload_on_atomic_rename_keeps_in_flight_version() {
    let f = reload_fixture();
    let reg = load(
        vec![probe_spec("p", Path::new("handlers/probe.wasm"), "")],
        f.dir.path(),
    )
    .await;
    let _watch = reg.watch().unwrap();
    let old = reg.current("p").unwrap();
    assert_eq!(old.hash(), f.v1);

    let tmp = f.dir.path().join("handlers/.probe.wasm.tmp");
    std::fs::copy(guest("probe_v2.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, &f.module).unwrap();
    eventually("v2 serving after rename", || reg.handlers()[0].hash == f.v2).await;

    // The old Arc (an in-flight event's) still runs the old code.
    assert_eq!(old.hash(), f.v1);
    assert_eq!(
        old.handle(&event("probe.echo", serde_json::json!({})))
            .await,
        Ok(Outcome::Done)
    );
    assert_eq!(
        run_plain(&reg, "probe.echo", serde_json::json!({})).await,
        Ok(Outcome::Done)
    );
}

trait HandleOnce {
    async fn handle(&self, ev: &Event) -> Result<Outcome, HandlerError>;
}
impl HandleOnce for Arc<outrun::wasm::HandlerVersion> {
    async fn handle(&self, ev: &Event) -> Result<Outcome, HandlerError> {
        outrun::handler::Handler::handle(&**self, ev, &mut Effects::default()).await
    }
}

async fn in_flight_event_finishes_on_old_version_across_reload(db: TestDb) {
    let f = reload_fixture();
    let store = db.store().await;
    db.exec("CREATE TABLE probe_seen (event_id TEXT, version TEXT)")
        .await;
    let reg = load(
        vec![probe_spec(
            "p",
            Path::new("handlers/probe.wasm"),
            "timeout = \"10s\"\n[allow]\nsql = true\n",
        )],
        f.dir.path(),
    )
    .await;
    let _watch = reg.watch().unwrap();

    // Start a slow event on v1, swap in v2 while it runs, then run another.
    let route = reg.route("probe.version").unwrap();
    let slow_id = store
        .enqueue(
            &outrun::NewEvent::new("probe.version", r#"{"sleep_ms": 1500}"#),
            5,
        )
        .await
        .unwrap();
    let slow = claim(&store, slow_id).await;
    let (store2, slow2) = (store.clone(), slow.clone());
    let in_flight = tokio::spawn(async move {
        let mut effects = Effects::new(store2);
        let r = route.handler.handle(&slow2.event, &mut effects).await;
        (r, effects)
    });
    let tmp = f.dir.path().join("handlers/.tmp");
    std::fs::copy(guest("probe_v2.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, &f.module).unwrap();
    eventually("v2 serving", || reg.handlers()[0].hash == f.v2).await;
    let (r, effects) = in_flight.await.unwrap();
    assert_eq!(r, Ok(Outcome::Done));
    assert!(
        effects
            .into_parts()
            .0
            .unwrap()
            .commit_ack(slow.lease())
            .await
            .unwrap()
    );

    let fresh_id = store
        .enqueue(&outrun::NewEvent::new("probe.version", "{}"), 5)
        .await
        .unwrap();
    let fresh = claim(&store, fresh_id).await;
    let mut effects = Effects::new(store.clone());
    assert_eq!(
        run(&reg, &fresh.event, &mut effects).await,
        Ok(Outcome::Done)
    );
    assert!(
        effects
            .into_parts()
            .0
            .unwrap()
            .commit_ack(fresh.lease())
            .await
            .unwrap()
    );

    let seen = |id: Uuid| format!("SELECT version FROM probe_seen WHERE event_id = '{id}'");
    assert_eq!(
        db.strings(&seen(slow_id)).await,
        vec!["1".to_string()],
        "the in-flight event ran on v1"
    );
    assert_eq!(
        db.strings(&seen(fresh_id)).await,
        vec!["2".to_string()],
        "the next event runs on v2"
    );
}

#[tokio::test]
async fn reload_survives_a_plain_overwrite_in_slow_chunks() {
    let f = reload_fixture();
    let reg = load(
        vec![probe_spec("p", Path::new("handlers/probe.wasm"), "")],
        f.dir.path(),
    )
    .await;
    let _watch = reg.watch().unwrap();
    let v2 = std::fs::read(guest("probe_v2.wasm")).unwrap();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&f.module)
            .unwrap();
        // Pauses longer than the debounce: the watcher sees a truncated file
        // several times and must not swap it in.
        for chunk in v2.chunks(v2.len() / 4 + 1) {
            file.write_all(chunk).unwrap();
            file.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            let serving = reg.handlers()[0].hash.clone();
            assert!(
                serving == f.v1 || serving == f.v2,
                "only complete versions serve"
            );
            assert_eq!(
                run_plain(&reg, "probe.echo", serde_json::json!({})).await,
                Ok(Outcome::Done)
            );
        }
    }
    eventually("v2 serving after the overwrite completes", || {
        reg.handlers()[0].hash == f.v2
    })
    .await;
    assert_eq!(
        run_plain(&reg, "probe.echo", serde_json::json!({})).await,
        Ok(Outcome::Done)
    );
}

#[tokio::test]
async fn corrupt_file_keeps_old_version_serving() {
    let (logs, _guard) = capture_logs();
    let f = reload_fixture();
    let reg = load(
        vec![probe_spec("p", Path::new("handlers/probe.wasm"), "")],
        f.dir.path(),
    )
    .await;
    let _watch = reg.watch().unwrap();
    let tmp = f.dir.path().join("handlers/.tmp");
    std::fs::write(&tmp, b"\0asm\x0d\0\x01\0garbage").unwrap();
    std::fs::rename(&tmp, &f.module).unwrap();

    // One error line naming the file and the reason; the old version serves.
    eventually("the rejection is logged", || {
        !logs.lines_with("reload of").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rejected = logs.lines_with("reload of");
    assert_eq!(rejected.len(), 1, "exactly one error line: {rejected:?}");
    assert!(
        rejected[0].contains("ERROR")
            && rejected[0].contains(&f.module.display().to_string())
            && rejected[0].contains("not a valid component")
            && rejected[0].contains("keeps serving"),
        "{}",
        rejected[0]
    );
    assert_eq!(reg.handlers()[0].hash, f.v1);
    assert_eq!(
        run_plain(&reg, "probe.echo", serde_json::json!({})).await,
        Ok(Outcome::Done)
    );
    // Reloading by hand reports the same reason.
    let err = reg.reload("p").await.unwrap_err().to_string();
    assert!(err.contains("not a valid component"), "{err}");

    // A later good file is picked up: one bad write does not wedge the watcher.
    std::fs::copy(guest("probe_v2.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, &f.module).unwrap();
    eventually("v2 after the corrupt file", || {
        reg.handlers()[0].hash == f.v2
    })
    .await;
    let expected = format!("handler p reloaded: {} -> {} in ", &f.v1[..12], &f.v2[..12]);
    eventually("the reload is logged", || {
        !logs.lines_with(&expected).is_empty()
    })
    .await;
}
