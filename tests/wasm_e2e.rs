//! WASM handlers end to end: the real `outrun serve` binary, the real probe
//! component, SQLite and the local PostgreSQL, a real HTTP server. Events are
//! routed by name; every capability works when granted and is denied (never
//! reaching the resource) when not; SQL writes and emitted events commit
//! with the ack or not at all; hostile guests fail only their own event; and
//! a handler is hot-reloaded while events flow without losing or splitting
//! any event.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Serve, TestDb, guest, wait_for};
use outrun::NewEvent;
use outrun::store::{ListFilter, Store};
use serde_json::json;

const FAST: &str = "[runtime]\npoll_interval = \"50ms\"\nbackoff_base = \"20ms\"\nbackoff_max = \"100ms\"\nbackoff_jitter = 0.0\nshutdown_grace = \"5s\"\n";

/// Store handle on the test database, migrated before serve starts.
async fn setup(db: &TestDb, table: &str) -> Store {
    let store = db.store().await;
    db.exec(&format!("CREATE TABLE {table} (event_id TEXT, v TEXT)"))
        .await;
    store
}

async fn dead_error(store: &Store, id: uuid::Uuid) -> Option<String> {
    store
        .get(id)
        .await
        .unwrap()
        .filter(|e| e.is_dead())
        .map(|e| e.last_error.unwrap_or_default())
}

/// A local HTTP server that counts the requests it gets.
async fn http_server() -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            "pong"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

async fn capabilities_granted_and_denied(db: TestDb) {
    let store = setup(&db, "e2e_rows").await;
    let (port, hits) = http_server().await;
    let dir = tempfile::tempdir().unwrap();
    let probe = guest("probe");
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            r#"{FAST}
[[handler]]
name = "granted"
module = "{probe}"
events = ["probe.sql", "probe.emit", "probe.emit-raw", "probe.kv", "probe.config", "probe.http", "child/probe.sql", "probe.echo"]
max_retry = 1
[handler.allow]
sql = true
emit = ["child/probe.sql"]
kv = "granted:"
http = ["127.0.0.1:{port}"]
config = {{ greeting = "hello" }}

[[handler]]
name = "denied"
module = "{probe}"
events = ["denied/probe.sql", "denied/probe.emit", "denied/probe.kv", "denied/probe.http", "denied/probe.config"]
max_retry = 1
"#,
            probe = probe.display()
        ),
    )
    .unwrap();
    let insert = |v: &str| json!({"sql": "INSERT INTO e2e_rows (event_id, v) VALUES ($1, $2)", "params": ["-", v]});
    let enqueue = |name: &str, payload: serde_json::Value| {
        let store = store.clone();
        let ev = NewEvent::new(name, payload.to_string());
        async move { store.enqueue(&ev, 5).await.unwrap() }
    };
    let child = |v: &str| json!({"execute": [insert(v)]});
    let ok = vec![
        enqueue("probe.sql", json!({"execute": [insert("committed")], "query": {"sql": "SELECT v FROM e2e_rows WHERE v = 'committed'", "expect_rows": [["committed"]]}})).await,
        enqueue("probe.emit", json!({"name": "child/probe.sql", "payload": child("from-emit")})).await,
        enqueue("probe.kv", json!({"ops": [
            {"op": "set", "key": "a", "value": "1"}, {"op": "get", "key": "a", "expect": "1"},
            {"op": "sadd", "key": "s", "members": ["x", "y"], "expect": 2}, {"op": "smembers", "key": "s", "expect": ["y", "x"]},
            {"op": "delete", "key": "a", "expect": true}, {"op": "exists", "key": "a", "expect": false}]})).await,
        enqueue("probe.config", json!({"key": "greeting", "expect": "hello"})).await,
        enqueue("probe.http", json!({"url": format!("http://127.0.0.1:{port}/ping"), "expect_status": 200, "expect_body": "pong"})).await,
    ];
    let rolled_back = enqueue(
        "probe.sql",
        json!({"execute": [insert("rolled-back")], "fail_after": true}),
    )
    .await;
    let emit_failed = enqueue("probe.emit", json!({"name": "child/probe.sql", "payload": child("from-failed-emit"), "fail_after": true})).await;
    let not_json = enqueue(
        "probe.emit-raw",
        json!({"name": "child/probe.sql", "raw": "{not json"}),
    )
    .await;
    let denied = vec![
        enqueue("denied/probe.sql", json!({"execute": [insert("denied")]})).await,
        enqueue(
            "denied/probe.emit",
            json!({"name": "child/probe.sql", "payload": child("denied-emit")}),
        )
        .await,
        enqueue(
            "denied/probe.kv",
            json!({"ops": [{"op": "set", "key": "a", "value": "1"}]}),
        )
        .await,
        enqueue(
            "denied/probe.http",
            json!({"url": format!("http://127.0.0.1:{port}/denied")}),
        )
        .await,
    ];
    let serve = Serve::ready(&db, &config).await;

    for id in &ok {
        wait_for(&format!("granted event {id} handled"), || async {
            store.get(*id).await.unwrap().is_none()
        })
        .await;
    }
    for id in [rolled_back, emit_failed, not_json].iter().chain(&denied) {
        wait_for(&format!("event {id} dead"), || async {
            dead_error(&store, *id).await.is_some()
        })
        .await;
    }
    // The child of the successful emit ran too; give it a moment, then stop.
    wait_for("emitted child handled", || async {
        db.strings("SELECT v FROM e2e_rows WHERE v = 'from-emit'")
            .await
            .len()
            == 1
    })
    .await;
    let log = serve.stop();

    let mut rows = db.strings("SELECT v FROM e2e_rows").await;
    rows.sort();
    assert_eq!(
        rows,
        vec!["committed", "from-emit"],
        "only successful attempts' writes and emits were committed"
    );
    assert!(
        dead_error(&store, not_json).await.unwrap().contains("JSON"),
        "{:?}",
        dead_error(&store, not_json).await
    );
    for id in &denied {
        let err = dead_error(&store, *id).await.unwrap();
        // Host denials name the config section; the HTTP one is worded by
        // the SDK (wasi:http carries only an error code) and names the list.
        assert!(
            err.contains("denied")
                && (err.contains("[handler.allow]") || err.contains("allowed HTTP hosts")),
            "denial should say what to grant: {err}"
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the denied request never reached the server"
    );
    assert!(
        log.contains("capability denied") && log.contains("handler=denied"),
        "denials are logged with the handler name"
    );
    let live = store
        .list(&ListFilter {
            dead: false,
            name: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert!(live.is_empty(), "nothing left pending: {live:?}");
}

async fn hostile_guests_fail_only_their_event(db: TestDb) {
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            "{FAST}\n[[handler]]\nname = \"probe\"\nmodule = \"{}\"\nevents = [\"probe.loop\", \"probe.oom\", \"probe.stack\", \"probe.trap\", \"probe.panic\", \"probe.echo\"]\ntimeout = \"1s\"\nmemory = \"16MiB\"\nmax_retry = 2\n",
            guest("probe").display()
        ),
    )
    .unwrap();
    let mut hostile = Vec::new();
    for (name, expect) in [
        ("probe.loop", "timeout after 1s"),
        ("probe.oom", "memory"),
        ("probe.stack", "stack overflow"),
        ("probe.trap", "unreachable"),
        ("probe.panic", "probe panic"),
    ] {
        hostile.push((
            store.enqueue(&NewEvent::new(name, "{}"), 5).await.unwrap(),
            name,
            expect,
        ));
    }
    let serve = Serve::ready(&db, &config).await;
    for (id, name, _) in &hostile {
        wait_for(&format!("{name} dead after its retries"), || async {
            dead_error(&store, *id).await.is_some()
        })
        .await;
    }
    // The runtime is still serving: a healthy event after all of them runs.
    let healthy = store
        .enqueue(&NewEvent::new("probe.echo", "{\"after\":\"hostiles\"}"), 5)
        .await
        .unwrap();
    wait_for("a healthy event after the hostile ones", || async {
        store.get(healthy).await.unwrap().is_none()
    })
    .await;
    serve.stop();
    for (id, name, expect) in hostile {
        let ev = store.get(id).await.unwrap().unwrap();
        let err = ev.last_error.unwrap();
        assert!(
            err.to_lowercase().contains(expect),
            "{name}: last_error {err:?} should mention {expect:?}"
        );
        assert_eq!(ev.retry, 2, "{name} was retried like any failure");
    }
}

/// Replace `path` as an editor or deploy tool would: write a temp file in
/// the same directory, then rename it over the old one.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Overwrite `path` in place, in slow chunks, as `cp` over a slow disk would:
/// the watcher sees partial files and must not load one.
fn overwrite_slowly(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    for chunk in bytes.chunks(bytes.len() / 4 + 1) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(60));
    }
}

async fn hot_reload_while_events_flow(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE probe_seen (event_id TEXT, version TEXT)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("versioned.wasm");
    let v1 = std::fs::read(guest("probe")).unwrap();
    let v2 = std::fs::read(guest("probe_v2")).unwrap();
    std::fs::write(&module, &v1).unwrap();
    let config = dir.path().join("outrun.toml");
    // A relative module path: resolved against the config file's directory.
    std::fs::write(&config, format!("{FAST}\n[[handler]]\nname = \"versioned\"\nmodule = \"versioned.wasm\"\nevents = [\"probe.version\"]\n[handler.allow]\nsql = true\n")).unwrap();
    let serve = Serve::ready(&db, &config).await;
    let mut ids = Vec::new();
    let flow = |n: usize| {
        let store = store.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(
                    store
                        .enqueue(&NewEvent::new("probe.version", "{\"sleep_ms\":3}"), 5)
                        .await
                        .unwrap(),
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            out
        }
    };
    let reloads = |serve: &Serve| serve.log().matches("reloaded:").count();
    let version_of = |id: uuid::Uuid| {
        let db = &db;
        async move {
            db.strings(&format!(
                "SELECT version FROM probe_seen WHERE event_id = '{id}'"
            ))
            .await
        }
    };

    ids.extend(flow(30).await);
    // v2 by atomic rename, while events keep coming.
    let writer = std::thread::spawn({
        let module = module.clone();
        let v2 = v2.clone();
        move || write_atomically(&module, &v2)
    });
    ids.extend(flow(30).await);
    writer.join().unwrap();
    wait_for("reload to v2 logged", || async { reloads(&serve) >= 1 }).await;
    let after_v2 = flow(1).await[0];
    ids.push(after_v2);
    wait_for("marker after v2 handled", || async {
        !version_of(after_v2).await.is_empty()
    })
    .await;
    assert_eq!(
        version_of(after_v2).await,
        vec!["2"],
        "new events use the new version"
    );

    // v1 again by a slow plain overwrite, while events keep coming.
    let writer = std::thread::spawn({
        let module = module.clone();
        let v1 = v1.clone();
        move || overwrite_slowly(&module, &v1)
    });
    ids.extend(flow(30).await);
    writer.join().unwrap();
    wait_for("reload back to v1 logged", || async {
        reloads(&serve) >= 2 && version_of_last(&serve) == short_hash(&v1)
    })
    .await;
    let after_v1 = flow(1).await[0];
    ids.push(after_v1);
    wait_for("marker after v1 handled", || async {
        !version_of(after_v1).await.is_empty()
    })
    .await;
    assert_eq!(version_of(after_v1).await, vec!["1"]);

    // A corrupt file: rejected, v1 keeps serving.
    write_atomically(&module, b"\0asm garbage that is not a component");
    wait_for("corrupt file rejected", || async {
        serve.log().contains("rejected")
    })
    .await;
    let after_bad = flow(1).await[0];
    ids.push(after_bad);
    wait_for("marker after corrupt file handled", || async {
        !version_of(after_bad).await.is_empty()
    })
    .await;
    assert_eq!(
        version_of(after_bad).await,
        vec!["1"],
        "the previous version keeps serving"
    );

    wait_for("all events handled", || async {
        store.stats().await.unwrap().pending == 0 && store.stats().await.unwrap().running == 0
    })
    .await;
    let log = serve.stop();
    let seen = db.strings("SELECT event_id FROM probe_seen").await;
    assert_eq!(
        seen.len(),
        ids.len(),
        "every event handled exactly once by exactly one version (no loss, no duplicate)"
    );
    let mut unique: Vec<_> = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len());
    let rejected = log
        .lines()
        .filter(|l| l.contains("rejected"))
        .collect::<Vec<_>>();
    assert_eq!(
        rejected.len(),
        1,
        "one clear log line for the corrupt file: {rejected:?}"
    );
    assert!(
        rejected[0].contains("versioned.wasm"),
        "names the file: {}",
        rejected[0]
    );
    assert_eq!(store.stats().await.unwrap().dead, 0);
}

fn short_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..12].to_string()
}

/// The version named by the last reload line of the log.
fn version_of_last(serve: &Serve) -> String {
    serve
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("reloaded:"))
        .and_then(|l| l.split(" -> ").nth(1))
        .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_default()
}

on_both_backends!(
    capabilities_granted_and_denied,
    hostile_guests_fail_only_their_event,
    hot_reload_while_events_flow
);

fn outrun(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(args)
        .env_remove("OUTRUN_CONFIG")
        .output()
        .unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn handlers_check_accepts_components_and_explains_rejections() {
    for name in [
        "probe",
        "ai_check_requeue",
        "family_sharing",
        "package_deletion",
    ] {
        let path = guest(name);
        let out = outrun(&["handlers", "check", path.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("implements outrun:handler/handler"));
        assert!(
            text.contains("core instances") && text.contains("is refused at load"),
            "{name}: the pool needs and the smallest memory cap: {text}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let probe = std::fs::read(guest("probe")).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "text.wasm",
            b"hello, not wasm".to_vec(),
            "not a WebAssembly file",
        ),
        (
            "truncated.wasm",
            probe[..probe.len() / 2].to_vec(),
            "not a valid component",
        ),
        // A core module (the smallest one), not a component.
        ("core.wasm", b"\0asm\x01\0\0\0".to_vec(), "core"),
    ];
    for (file, bytes, expect) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        let out = outrun(&["handlers", "check", path.to_str().unwrap()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{file}: one line: {err}");
        assert!(
            err.contains(file) && err.to_lowercase().contains(&expect.to_lowercase()),
            "{file}: {err}"
        );
    }
}

#[test]
fn handlers_compile_fills_the_cache_and_serve_stops_on_a_handler_that_does_not_compile() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("o.db").display());
    let config = dir.path().join("outrun.toml");
    let cfg = config.to_str().unwrap();
    std::fs::write(
        &config,
        format!(
            "cache_dir = \"cache\"\n[[handler]]\nname = \"probe\"\nmodule = \"{}\"\nevents = [\"probe.echo\"]\n\
             [[handler]]\nname = \"bench\"\nmodule = \"{}\"\nevents = [\"bench.noop\"]\n",
            guest("probe").display(),
            guest("bench").display()
        ),
    )
    .unwrap();
    let cached = || {
        std::fs::read_dir(dir.path().join("cache"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
                    .count()
            })
            .unwrap_or(0)
    };
    let out = outrun(&["handlers", "compile", "--config", cfg, "--database", &db]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("compiled probe") && text.contains("compiled bench"),
        "{text}"
    );
    assert_eq!(cached(), 2, "one artifact per handler");
    let out = outrun(&["handlers", "compile", "--config", cfg, "--database", &db]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("cached   probe") && text.contains("cached   bench"),
        "the second run compiles nothing: {text}"
    );
    assert_eq!(cached(), 2);

    // A component of another world passes every check before the compile
    // (serve is already routing the other handler's events by then) and
    // fails it: serve stops with the error, exit 1.
    std::fs::write(dir.path().join("other.wasm"), b"\0asm\x0d\0\x01\0").unwrap();
    std::fs::write(
        &config,
        format!(
            "cache_dir = \"cache\"\n[[handler]]\nname = \"probe\"\nmodule = \"{}\"\nevents = [\"probe.echo\"]\n\
             [[handler]]\nname = \"other\"\nmodule = \"other.wasm\"\nevents = [\"x\"]\n",
            guest("probe").display()
        ),
    )
    .unwrap();
    let out = outrun(&["serve", "--config", cfg, "--database", &db]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("other.wasm") && err.contains("does not export `handle"),
        "{err}"
    );
}

#[test]
fn handlers_list_and_startup_errors_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("o.db").display());
    let probe = guest("probe");
    let config = dir.path().join("outrun.toml");
    let write = |body: String| std::fs::write(&config, body).unwrap();
    write(format!(
        "[[handler]]\nname = \"probe\"\nmodule = \"{}\"\nevents = [\"probe.echo\", \"probe.sql\"]\n",
        probe.display()
    ));
    let out = outrun(&[
        "handlers",
        "list",
        "--json",
        "--config",
        config.to_str().unwrap(),
        "--database",
        &db,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "probe");
    assert_eq!(list[0]["events"], json!(["probe.echo", "probe.sql"]));
    assert_eq!(
        list[0]["hash"].as_str().unwrap(),
        blake3::hash(&std::fs::read(&probe).unwrap())
            .to_hex()
            .as_str()
    );
    assert!(list[0]["loaded_at"].is_string());

    // A missing module: serve refuses to start and names the path.
    write(
        "[[handler]]\nname = \"gone\"\nmodule = \"nowhere/gone.wasm\"\nevents = [\"x\"]\n"
            .to_string(),
    );
    let out = outrun(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--database",
        &db,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("nowhere/gone.wasm") && err.contains("not found"),
        "{err}"
    );

    // Two handlers bound to one event name.
    write(format!(
        "[[handler]]\nname = \"a\"\nmodule = \"{p}\"\nevents = [\"same\"]\n[[handler]]\nname = \"b\"\nmodule = \"{p}\"\nevents = [\"same\"]\n",
        p = probe.display()
    ));
    let out = outrun(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--database",
        &db,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("\"same\"") && err.contains("handler a") && err.contains("handler b"),
        "{err}"
    );

    // A typo in a handler entry is an error naming the key.
    write(format!(
        "[[handler]]\nname = \"a\"\nmodule = \"{}\"\nevents = [\"x\"]\n[handler.allow]\nhttps = [\"x\"]\n",
        probe.display()
    ));
    let out = outrun(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--database",
        &db,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("https"), "{}", stderr(&out));
}
