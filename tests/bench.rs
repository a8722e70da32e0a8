//! `outrun bench` through the real binary on both backends, with small N:
//! it runs the real runtime and the bench guest, drains everything it
//! enqueued, and reports every key of its JSON contract. No timing is
//! asserted (the numbers depend on the machine); only that they are
//! measured (positive, finite, ordered percentiles) and that the outbox is
//! left empty. Handlers with effects (sql, emit) are checked for one effect
//! per event. Bad input is refused with a one-line error and nothing written.

mod common;

use std::process::Output;

use common::{TestDb, guest};
use serde_json::Value;

fn outrun(db: &TestDb, args: &[&str]) -> Output {
    // Shared by the tests (the cache writes temp files and renames them, so
    // parallel runs are safe): the guest is compiled once, not per test.
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-cache");
    common::outrun_command(db)
        .args(args)
        .args(["--cache-dir", cache.to_str().expect("utf-8 target path")])
        .env("OUTRUN_BENCH_MODULE", guest("bench"))
        .output()
        .expect("run outrun")
}

fn report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "outrun bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone()).expect("utf-8 stdout");
    assert_eq!(stdout.trim().lines().count(), 1, "one JSON line: {stdout}");
    serde_json::from_str(stdout.trim()).expect("stdout is one JSON object")
}

fn positive(r: &Value, key: &str) -> f64 {
    let v = r[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {r}"));
    assert!(v.is_finite() && v > 0.0, "{key} = {v} in {r}");
    v
}

/// p50 <= p90 <= p99 <= max, all finite and non-negative.
fn ordered(p: &Value, what: &str) {
    let get = |k: &str| {
        p[k].as_f64()
            .unwrap_or_else(|| panic!("{what}.{k} missing in {p}"))
    };
    let (p50, p90, p99, max) = (get("p50"), get("p90"), get("p99"), get("max"));
    assert!(
        0.0 <= p50 && p50 <= p90 && p90 <= p99 && p99 <= max && max.is_finite(),
        "{what} percentiles out of order: {p}"
    );
}

async fn outbox_total(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM outbox_events").await
}

fn common_keys(r: &Value, db: &TestDb, mode: &str, events: u64) {
    let backend = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(r["backend"], backend, "{r}");
    assert_eq!(r["mode"], mode, "{r}");
    assert_eq!(r["events"], events, "{r}");
    assert_eq!(r["concurrency"], 8, "{r}");
    for key in [
        "seconds",
        "events_per_sec",
        "enqueue_per_sec",
        "peak_rss_mb",
    ] {
        positive(r, key);
    }
    ordered(&r["latency_ms"], "latency_ms");
}

async fn drain_reports_all_keys(db: TestDb) {
    let out = outrun(
        &db,
        &[
            "bench",
            "--events",
            "300",
            "--concurrency",
            "8",
            "--handler",
            "json",
            "--json",
        ],
    );
    let r = report(&out);
    common_keys(&r, &db, "drain", 300);
    assert_eq!(r["handler"], "json", "{r}");
    assert_eq!(r["instances"], "fresh", "{r}");
    assert_eq!(r["payload_bytes"], 200, "{r}");
    assert_eq!(r["latency_from"], "handler_start", "{r}");
    // 300 events at `events_per_sec` take `seconds`: the two agree.
    let implied = 300.0 / positive(&r, "events_per_sec");
    assert!(
        (implied - positive(&r, "seconds")).abs() < 1e-6,
        "events_per_sec does not match seconds: {r}"
    );
    assert_eq!(outbox_total(&db).await, 0, "the bench left rows behind");
}

async fn latency_reports_all_keys(db: TestDb) {
    let out = outrun(
        &db,
        &[
            "bench",
            "--mode",
            "latency",
            "--rate",
            "200",
            "--events",
            "100",
            "--concurrency",
            "8",
            "--payload-bytes",
            "64",
            "--json",
        ],
    );
    let r = report(&out);
    common_keys(&r, &db, "latency", 100);
    assert_eq!(r["handler"], "noop", "{r}");
    assert_eq!(r["payload_bytes"], 64, "{r}");
    assert_eq!(r["rate"], 200.0, "{r}");
    assert_eq!(r["latency_from"], "enqueue", "{r}");
    ordered(&r["start_latency_ms"], "start_latency_ms");
    ordered(&r["enqueue_call_ms"], "enqueue_call_ms");
    ordered(&r["start_after_commit_ms"], "start_after_commit_ms");
    // An event is acked after its handler started.
    assert!(
        r["start_latency_ms"]["p50"].as_f64() <= r["latency_ms"]["p50"].as_f64(),
        "{r}"
    );
    assert_eq!(outbox_total(&db).await, 0, "the bench left rows behind");
}

/// The bench measures only its own events: a non-empty outbox is refused
/// before anything is enqueued, and the existing event is untouched.
async fn refuses_a_non_empty_outbox(db: TestDb) {
    let store = db.store().await;
    let id = store
        .enqueue(&outrun::NewEvent::new("order.created", "{}"), 5)
        .await
        .expect("enqueue");
    let out = outrun(&db, &["bench", "--events", "10", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    assert!(err.contains("already holds 1 events"), "{err}");
    assert!(err.contains("fresh database"), "{err}");
    assert_eq!(outbox_total(&db).await, 1);
    assert!(store.get(id).await.expect("get").is_some());
}

/// Whether the sql handler's table exists (the bench must drop it).
async fn bench_table_exists(db: &TestDb) -> bool {
    let sql = if db.is_postgres() {
        "SELECT count(*) FROM pg_tables WHERE tablename = 'outrun_bench_rows'"
    } else {
        "SELECT count(*) FROM sqlite_master WHERE name = 'outrun_bench_rows'"
    };
    db.scalar(sql).await > 0
}

fn effects_drain(db: &TestDb, handler: &str) -> Value {
    report(&outrun(
        db,
        &[
            "bench",
            "--events",
            "200",
            "--concurrency",
            "8",
            "--handler",
            handler,
            "--json",
        ],
    ))
}

/// One INSERT per event through the `sql` capability: the bench checks one
/// row per event, reports the count, and drops its table.
async fn sql_handler_writes_one_row_per_event(db: TestDb) {
    let r = effects_drain(&db, "sql");
    common_keys(&r, &db, "drain", 200);
    assert_eq!(r["handler"], "sql", "{r}");
    assert_eq!(r["sql_rows"], 200, "{r}");
    assert!(r["follow_ups"].is_null(), "{r}");
    assert!(!bench_table_exists(&db).await, "the bench table was left");
    assert_eq!(outbox_total(&db).await, 0, "the bench left rows behind");
}

/// One emit per event: the follow-ups are not drained work, the bench
/// counts one per original after the run and removes them.
async fn emit_handler_emits_one_follow_up_per_event(db: TestDb) {
    let r = effects_drain(&db, "emit");
    common_keys(&r, &db, "drain", 200);
    assert_eq!(r["handler"], "emit", "{r}");
    assert_eq!(r["follow_ups"], 200, "{r}");
    assert!(r["sql_rows"].is_null(), "{r}");
    assert_eq!(outbox_total(&db).await, 0, "the follow-ups were left");
}

/// A table named like the bench's may be someone's data: refused before
/// anything is enqueued, and left as it was.
async fn refuses_an_existing_bench_table(db: TestDb) {
    db.store().await;
    db.exec("CREATE TABLE outrun_bench_rows (event_id TEXT PRIMARY KEY)")
        .await;
    db.exec("INSERT INTO outrun_bench_rows (event_id) VALUES ('mine')")
        .await;
    let err = common::fails(&outrun(
        &db,
        &["bench", "--events", "10", "--handler", "sql", "--json"],
    ));
    assert!(err.contains("outrun_bench_rows"), "{err}");
    assert!(err.contains("fresh database"), "{err}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM outrun_bench_rows").await,
        1,
        "the existing table was touched"
    );
    assert_eq!(outbox_total(&db).await, 0, "events were enqueued");
}

/// A run whose effects do not add up is not a measurement: a trigger makes
/// the database lose each follow-up, or each row, behind the handler's
/// back, and the bench fails in one line instead of printing a number.
async fn lost_effects_fail_the_run(db: TestDb) {
    db.store().await;
    // (handler, trigger that loses its effect, what the error says). Each
    // trigger exists only for its own run: SQLite resolves a trigger's
    // tables whenever it fires, and the bench table exists only in a sql run.
    let (emit_trigger, sql_trigger) = if db.is_postgres() {
        db.exec(
            "CREATE FUNCTION lose() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                 IF TG_OP = 'INSERT' THEN
                     DELETE FROM outbox_events WHERE id = NEW.id;
                 ELSE
                     DELETE FROM outrun_bench_rows WHERE event_id = OLD.id::text;
                 END IF;
                 RETURN NULL; END $$",
        )
        .await;
        (
            "CREATE TRIGGER lose AFTER INSERT ON outbox_events FOR EACH ROW
             WHEN (NEW.name = 'bench.followup') EXECUTE FUNCTION lose()",
            "CREATE TRIGGER lose AFTER DELETE ON outbox_events FOR EACH ROW
             WHEN (OLD.name = 'bench.sql') EXECUTE FUNCTION lose()",
        )
    } else {
        (
            "CREATE TRIGGER lose AFTER INSERT ON outbox_events WHEN NEW.name = 'bench.followup'
             BEGIN DELETE FROM outbox_events WHERE rowid = NEW.rowid; END",
            "CREATE TRIGGER lose AFTER DELETE ON outbox_events WHEN OLD.name = 'bench.sql'
             BEGIN DELETE FROM outrun_bench_rows WHERE event_id = OLD.id; END",
        )
    };
    let drop_trigger = if db.is_postgres() {
        "DROP TRIGGER lose ON outbox_events"
    } else {
        "DROP TRIGGER lose"
    };
    for (handler, trigger, expect) in [
        ("emit", emit_trigger, "left 0 bench.followup events"),
        ("sql", sql_trigger, "left 0 rows"),
    ] {
        db.exec(trigger).await;
        let err = common::fails(&outrun(
            &db,
            &["bench", "--events", "20", "--handler", handler, "--json"],
        ));
        db.exec(drop_trigger).await;
        assert!(err.contains(expect), "{handler}: {err}");
        assert!(err.contains("exactly one"), "{handler}: {err}");
        // Cleaned up all the same, so the next run starts from scratch.
        assert_eq!(outbox_total(&db).await, 0, "{handler}");
        assert!(!bench_table_exists(&db).await, "{handler}");
    }
}

/// `--instances reuse`: the bench guest served from a warm pool drains
/// everything, and the report says which mode it measured.
async fn reuse_instances_drain(db: TestDb) {
    let r = report(&outrun(
        &db,
        &[
            "bench",
            "--events",
            "200",
            "--concurrency",
            "8",
            "--handler",
            "json",
            "--instances",
            "reuse",
            "--reuse-events",
            "7",
            "--json",
        ],
    ));
    common_keys(&r, &db, "drain", 200);
    assert_eq!(r["instances"], "reuse", "{r}");
    assert_eq!(outbox_total(&db).await, 0, "the bench left rows behind");
}

on_both_backends!(
    reuse_instances_drain,
    drain_reports_all_keys,
    latency_reports_all_keys,
    refuses_a_non_empty_outbox,
    sql_handler_writes_one_row_per_event,
    emit_handler_emits_one_follow_up_per_event,
    refuses_an_existing_bench_table,
    lost_effects_fail_the_run
);

/// Hot reload through the real file watcher, no database involved.
#[test]
fn reload_reports_all_keys() {
    let db = TestDb::sqlite();
    let r = report(&outrun(
        &db,
        &["bench", "--mode", "reload", "--events", "3", "--json"],
    ));
    assert_eq!(r["mode"], "reload", "{r}");
    assert_eq!(r["reloads"], 3, "{r}");
    let size = std::fs::metadata(guest("bench"))
        .expect("bench guest")
        .len();
    assert_eq!(r["module_bytes"], size, "{r}");
    ordered(&r["latency_ms"], "latency_ms");
    assert!(r["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{r}");
    positive(&r, "peak_rss_mb");
    assert!(
        !std::path::Path::new(&db.url()["sqlite://".len()..]).exists(),
        "reload mode touched the database"
    );
}

/// The Python and JavaScript bench guests (scripts/build-polyglot-guests.sh)
/// stand in for the Rust one through `--module`, fresh and reused: the
/// per-event cost of each language's engine is measured the same way.
#[test]
fn polyglot_bench_guests_drain_fresh_and_reused() {
    // Shared with tests/polyglot.rs: these components take the longest to
    // compile, so a warm artifact cache matters most here.
    let cache = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-artifact-cache");
    for stem in ["bench_python", "bench_js"] {
        let module = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/guests")
            .join(format!("{stem}.wasm"));
        assert!(
            module.exists(),
            "{} is missing: run scripts/build-polyglot-guests.sh",
            module.display()
        );
        for instances in ["fresh", "reuse"] {
            let db = TestDb::sqlite();
            let out = common::outrun_command(&db)
                .args(["bench", "--events", "20", "--concurrency", "4"])
                .args(["--handler", "json", "--instances", instances, "--json"])
                .args(["--cache-dir", cache])
                .arg("--module")
                .arg(&module)
                .output()
                .expect("run outrun");
            let r = report(&out);
            assert_eq!(r["events"], 20, "{stem} {instances}: {r}");
            assert_eq!(r["instances"], instances, "{stem} {instances}: {r}");
            positive(&r, "events_per_sec");
        }
    }
}

#[test]
fn bad_arguments_are_refused_in_one_line() {
    let db = TestDb::sqlite();
    for (args, expect) in [
        (vec!["bench", "--concurrency", "0"], "--concurrency"),
        (vec!["bench", "--rate", "0", "--mode", "latency"], "--rate"),
        (vec!["bench", "--events", "0"], "--events"),
        (
            vec!["bench", "--mode", "reload", "--events", "0"],
            "--events",
        ),
        (vec!["bench", "--mode", "sideways"], "sideways"),
        (vec!["bench", "--handler", "nope"], "nope"),
        (vec!["bench", "--instances", "shared"], "shared"),
        (
            vec!["bench", "--instances", "reuse", "--reuse-events", "0"],
            "--reuse-events",
        ),
        (
            vec!["bench", "--module", "/nonexistent/bench.wasm"],
            "build-guests.sh",
        ),
    ] {
        let err = common::fails(&outrun(&db, &args));
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    // Reload mode with a file that is not a component: refused, naming it.
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "not a component").unwrap();
    let text = text.to_str().unwrap();
    let err = common::fails(&outrun(
        &db,
        &[
            "bench", "--mode", "reload", "--events", "2", "--module", text,
        ],
    ));
    assert!(err.contains(text), "{err}");
    // Nothing was created: every refusal came before connecting.
    assert!(!std::path::Path::new(&db.url()["sqlite://".len()..]).exists());
}
