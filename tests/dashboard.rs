//! The web dashboard (`/ui`): its queries use indexes on a million events
//! (the plans are printed), and the real `outrun serve` binary's dashboard
//! driven in Debian's headless chromium by playwright-core
//! (tests/ui/dashboard.spec.mjs): the overview counts match the CLI, a dead
//! letter is replayed from the UI and runs, a name is paused and resumed,
//! an action without the token and an action on an event another process
//! just deleted show clear messages. Screenshots of every page go to
//! `$CARGO_TARGET_DIR/ui-artifacts` (default `target/ui-artifacts`).
//!
//! Both are PostgreSQL tests (`OUTRUN_TEST_POSTGRES_URL`); the browser test
//! needs `/usr/bin/chromium`, node and `tests/ui/node_modules`, all from
//! `scripts/install-test-tools.sh`. Missing tools fail the test; it never
//! skips.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Serve, TestDb, free_port, guest, http_as, ok, outrun, wait_for};
use outrun::store::StateFilter;
use outrun::store::postgres::{count_sql, get_sql, page_sql};
use serde_json::{Value, json};
use sqlx::Connection;

const TOKEN: &str = "dashboard-test-token";
const ROWS: i64 = 1_000_000;
/// The live listing filtered by a name with 20 events among a million.
const RARE_LIVE_NAME: &str = "events: live, rare name (20 of 1M)";

// ---------------------------------------------------------------------------
// Plans on a million events

/// Bind values of one query the dashboard runs.
#[derive(Clone, Copy)]
enum Bind<'a> {
    Text(Option<&'a str>),
    Time(Option<chrono::DateTime<chrono::Utc>>),
    Int(Option<i64>),
    Id(uuid::Uuid),
}

struct Probe<'a> {
    what: &'a str,
    sql: String,
    binds: Vec<Bind<'a>>,
}

/// Binds of [`page_sql`]: name, group, error text, since, cursor, limit.
fn page_binds<'a>(
    name: Option<&'a str>,
    group: Option<&'a str>,
    error: Option<&'a str>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    cursor: Option<(chrono::DateTime<chrono::Utc>, i64)>,
) -> Vec<Bind<'a>> {
    vec![
        Bind::Text(name),
        Bind::Text(group),
        Bind::Text(error),
        Bind::Time(since),
        Bind::Time(cursor.map(|c| c.0)),
        Bind::Int(cursor.map(|c| c.1)),
        Bind::Int(Some(101)),
    ]
}

async fn explain(c: &mut sqlx::PgConnection, p: &Probe<'_>, analyze: bool) -> Value {
    let opts = if analyze {
        "ANALYZE, BUFFERS, FORMAT JSON"
    } else {
        "FORMAT JSON"
    };
    let sql = format!("EXPLAIN ({opts}) {}", p.sql);
    let mut q = sqlx::query_scalar::<_, Value>(&sql);
    for b in &p.binds {
        q = match *b {
            Bind::Text(v) => q.bind(v),
            Bind::Time(v) => q.bind(v),
            Bind::Int(v) => q.bind(v),
            Bind::Id(v) => q.bind(v),
        };
    }
    q.fetch_one(&mut *c)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN of {}: {e}\n{sql}", p.what))
}

/// The generic plan (no values known), as a prepared statement gets it
/// under `plan_cache_mode = force_generic_plan`: PREPARE with the bind
/// types, then EXPLAIN EXECUTE with the values as literals.
async fn explain_generic(c: &mut sqlx::PgConnection, p: &Probe<'_>) -> Value {
    let (types, args): (Vec<&str>, Vec<String>) = p
        .binds
        .iter()
        .map(|b| match *b {
            Bind::Text(v) => ("text", v.map_or("NULL".into(), |v| format!("'{v}'"))),
            Bind::Time(v) => (
                "timestamptz",
                v.map_or("NULL".into(), |v| format!("'{}'", v.to_rfc3339())),
            ),
            Bind::Int(v) => ("bigint", v.map_or("NULL".into(), |v| v.to_string())),
            Bind::Id(v) => ("uuid", format!("'{v}'")),
        })
        .unzip();
    for sql in [
        "SET plan_cache_mode = force_generic_plan".to_string(),
        format!("PREPARE probe ({}) AS {}", types.join(", "), p.sql),
    ] {
        sqlx::query(&sql)
            .execute(&mut *c)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{sql}", p.what));
    }
    let plan: Value = sqlx::query_scalar(&format!(
        "EXPLAIN (FORMAT JSON) EXECUTE probe ({})",
        args.join(", ")
    ))
    .fetch_one(&mut *c)
    .await
    .unwrap_or_else(|e| panic!("EXPLAIN EXECUTE of {}: {e}", p.what));
    for sql in ["DEALLOCATE probe", "RESET plan_cache_mode"] {
        sqlx::query(sql).execute(&mut *c).await.unwrap();
    }
    plan
}

/// Every node of a plan, depth first.
fn nodes(plan: &Value, out: &mut Vec<Value>) {
    out.push(plan.clone());
    if let Some(children) = plan["Plans"].as_array() {
        for c in children {
            nodes(c, out);
        }
    }
}

/// One line per node: `Index Scan using outbox_events_live_created on outbox_events`.
fn outline(plan: &Value, depth: usize, out: &mut String) {
    let mut line = format!(
        "{}{}",
        "  ".repeat(depth),
        plan["Node Type"].as_str().unwrap_or("?")
    );
    if let Some(i) = plan["Index Name"].as_str() {
        line.push_str(&format!(" using {i}"));
    }
    if let Some(r) = plan["Relation Name"].as_str() {
        line.push_str(&format!(" on {r}"));
    }
    for key in ["Index Cond", "Filter", "Sort Key", "Presorted Key"] {
        if !plan[key].is_null() {
            line.push_str(&format!("  [{key}: {}]", plan[key]));
        }
    }
    if let Some(t) = plan["Actual Total Time"].as_f64() {
        line.push_str(&format!("  ({t:.2} ms, {} rows)", plan["Actual Rows"]));
    }
    out.push_str(&line);
    out.push('\n');
    if let Some(children) = plan["Plans"].as_array() {
        for c in children {
            outline(c, depth + 1, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_use_indexes_on_a_million_events() {
    let db = TestDb::postgres().await;
    let _store = db.store().await;
    // Server-side: 20 names (plus one rare name) over ~6 days; 5% dead, 10%
    // scheduled, 1% running, a third grouped, some with an error text.
    let started = Instant::now();
    db.exec(&format!(
        "INSERT INTO outbox_events (create_date, name, payload, group_id, retry, max_retry,
                                    available_at, locked_by, locked_until, last_error, dead_at)
         SELECT now() - make_interval(secs => ({ROWS} - i) * 0.5),
                CASE WHEN i % 50000 = 7 THEN 'rare.name' ELSE 'order.' || (i % 20) END,
                '{{\"n\":' || i || '}}',
                CASE WHEN i % 3 = 0 THEN 'g' || (i % 5000) END,
                CASE WHEN i % 20 = 0 THEN 5 WHEN i % 7 = 0 THEN 1 ELSE 0 END,
                5,
                CASE WHEN i % 10 = 1 THEN now() + interval '1 hour'
                     WHEN i % 100 = 3 THEN now() + interval '10 minutes'
                     ELSE now() - make_interval(secs => ({ROWS} - i) * 0.5) END,
                CASE WHEN i % 100 = 3 THEN 'host-a' END,
                CASE WHEN i % 100 = 3 THEN now() + interval '10 minutes' END,
                CASE WHEN i % 20 = 0 THEN 'boom: handler trapped ' || (i % 13)
                     WHEN i % 7 = 0 THEN 'timeout after 5s' END,
                CASE WHEN i % 20 = 0 THEN now() - make_interval(secs => ({ROWS} - i) * 0.5) END
         FROM generate_series(1, {ROWS}) AS i"
    ))
    .await;
    db.exec("ANALYZE outbox_events").await;
    println!(
        "inserted {ROWS} events server-side and analysed in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut c = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect to the test database");
    // An event id, a cursor of a first page, and a recent time.
    let (some_id, cursor_at, cursor_seq): (uuid::Uuid, chrono::DateTime<chrono::Utc>, i64) =
        sqlx::query_as(
            "SELECT id, create_date, seq FROM outbox_events WHERE retry < max_retry
             ORDER BY create_date, seq OFFSET 100 LIMIT 1",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
    let (dead_at, dead_seq): (chrono::DateTime<chrono::Utc>, i64) = sqlx::query_as(
        "SELECT COALESCE(dead_at, create_date), seq FROM outbox_events WHERE retry >= max_retry
         ORDER BY COALESCE(dead_at, create_date) DESC, seq DESC OFFSET 100 LIMIT 1",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);

    use StateFilter::*;
    let probes = vec![
        // The events browser: GET /v1/events with each filter the page has.
        Probe { what: "events: live, first page", sql: page_sql(Live), binds: page_binds(None, None, None, None, None) },
        Probe { what: "events: live, next page (cursor)", sql: page_sql(Live), binds: page_binds(None, None, None, None, Some((cursor_at, cursor_seq))) },
        Probe { what: "events: pending", sql: page_sql(Pending), binds: page_binds(None, None, None, None, None) },
        Probe { what: "events: scheduled", sql: page_sql(Scheduled), binds: page_binds(None, None, None, None, None) },
        Probe { what: "events: running", sql: page_sql(Running), binds: page_binds(None, None, None, None, None) },
        Probe { what: "events: live, name", sql: page_sql(Live), binds: page_binds(Some("order.3"), None, None, None, None) },
        Probe { what: RARE_LIVE_NAME, sql: page_sql(Live), binds: page_binds(Some("rare.name"), None, None, None, None) },
        Probe { what: "events: live, name and group", sql: page_sql(Live), binds: page_binds(Some("order.3"), Some("g33"), None, None, None) },
        Probe { what: "events: live, group", sql: page_sql(Live), binds: page_binds(None, Some("g33"), None, None, None) },
        Probe { what: "events: live, error text", sql: page_sql(Live), binds: page_binds(None, None, Some("timeout"), None, None) },
        Probe { what: "events: live, since 1h", sql: page_sql(Live), binds: page_binds(None, None, None, Some(hour_ago), None) },
        // Dead letters: GET /v1/events?state=dead and the bulk dry runs.
        Probe { what: "dead letters: first page", sql: page_sql(Dead), binds: page_binds(None, None, None, None, None) },
        Probe { what: "dead letters: next page (cursor)", sql: page_sql(Dead), binds: page_binds(None, None, None, None, Some((dead_at, dead_seq))) },
        Probe { what: "dead letters: name", sql: page_sql(Dead), binds: page_binds(Some("order.0"), None, None, None, None) },
        Probe { what: "dead letters: rare name", sql: page_sql(Dead), binds: page_binds(Some("rare.name"), None, None, None, None) },
        Probe { what: "dead letters: error text", sql: page_sql(Dead), binds: page_binds(None, None, Some("trapped 3"), None, None) },
        Probe { what: "dead letters: bulk dry run, name and error text", sql: count_sql(Dead), binds: vec![Bind::Text(Some("order.0")), Bind::Text(None), Bind::Text(Some("trapped")), Bind::Time(None)] },
        Probe { what: "dead letters: bulk dry run, all", sql: count_sql(Dead), binds: vec![Bind::Text(None), Bind::Text(None), Bind::Text(None), Bind::Time(None)] },
        // The event page: GET /v1/events/{id} (row and attempts) and its actions.
        Probe { what: "event page: the event", sql: get_sql(), binds: vec![Bind::Id(some_id)] },
        Probe { what: "event page: its attempts", sql: "SELECT attempt, started_at, duration_ms, handler, version, instance, outcome, error FROM outrun_attempts WHERE event_id = $1 ORDER BY id".into(), binds: vec![Bind::Id(some_id)] },
        Probe { what: "event page: replay", sql: "UPDATE outbox_events SET retry = 0 WHERE id = $1 AND retry >= max_retry".into(), binds: vec![Bind::Id(some_id)] },
    ];

    let mut report = String::new();
    let mut seq_scans = Vec::new();
    for p in &probes {
        // The plan a request gets (custom, with its values), and the generic
        // plan PostgreSQL may switch a prepared statement to after five runs.
        let custom = explain(&mut c, p, !p.sql.starts_with("UPDATE")).await;
        let generic = explain_generic(&mut c, p).await;
        for (kind, plan) in [("custom", &custom), ("generic", &generic)] {
            let root = &plan[0]["Plan"];
            let mut all = Vec::new();
            nodes(root, &mut all);
            let mut text = String::new();
            outline(root, 2, &mut text);
            let time = plan[0]["Execution Time"]
                .as_f64()
                .map(|t| format!(", executed in {t:.2} ms"))
                .unwrap_or_default();
            report.push_str(&format!("{} ({kind} plan{time}):\n{text}", p.what));
            let scans = all
                .iter()
                .any(|n| n["Node Type"] == "Seq Scan" && n["Relation Name"] == "outbox_events");
            if scans && p.what == RARE_LIVE_NAME {
                // Documented (docs/operations.md, "Dashboard"): the index
                // that would serve it costs ~50% of bulk insert speed.
                report.push_str(
                    "    ^ the one documented exception: a rare name in the live listing\n",
                );
            } else if scans {
                seq_scans.push(format!("{} ({kind})", p.what));
            }
        }
    }

    // The overview's per-name counts: deliberately not a request's query.
    // The background poller (admin/dashboard.rs) runs it every 10 s or more
    // while someone looks; it reads the whole table, so its time is shown.
    let by_name =
        "SELECT name, count(*) FILTER (WHERE retry < max_retry) FROM outbox_events GROUP BY name";
    let t = Instant::now();
    let store = db.connect().await;
    let names = store.stats_by_name().await.unwrap();
    let count_ms = t.elapsed().as_millis();
    let plan: Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {by_name}"))
        .fetch_one(&mut c)
        .await
        .unwrap();
    let mut text = String::new();
    outline(&plan[0]["Plan"], 2, &mut text);
    report.push_str(&format!(
        "overview per-name counts (background poller only, never per request; {} names counted in {count_ms} ms):\n{text}",
        names.len()
    ));
    println!("{report}");
    c.close().await.ok();

    assert!(
        seq_scans.is_empty(),
        "these dashboard queries scan outbox_events sequentially on {ROWS} rows: {seq_scans:?}\n{report}"
    );
}

// ---------------------------------------------------------------------------
// The page's files and the overview route, without a browser

/// One GET; the whole answer (status line, headers, body).
async fn get_raw(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the admin port");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

async fn files_and_overview(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("outrun.toml");
    // Reads need the token here too: the page's files must not.
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\ntoken_for_reads = true\n"
        ),
    )
    .unwrap();
    let serve = Serve::ready(&db, &config).await;
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let raw = get_raw(port, path).await.to_lowercase();
        assert!(raw.starts_with("http/1.1 200"), "{path}: {raw}");
        assert!(
            raw.contains(&format!("content-type: {kind}")),
            "{path}: {raw}"
        );
        // Nothing but this server: no CDN, no inline script.
        assert!(
            raw.contains("content-security-policy: default-src 'none'; script-src 'self'"),
            "{path}: {raw}"
        );
        for outside in [
            "src=\"http",
            "href=\"http",
            "url(http",
            "@import",
            "fetch(\"http",
        ] {
            assert!(
                !raw.contains(outside),
                "{path} loads from another server: {outside}"
            );
        }
    }
    let raw = get_raw(port, "/ui/secrets.txt").await;
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    assert!(
        raw.contains(r#""code":"not_found""#),
        "the error shape: {raw}"
    );

    // The overview: the first request starts a count, a later one has it.
    let (status, _) = common::http(port, "GET", "/v1/overview", None).await;
    assert_eq!(status, 401, "token_for_reads guards the overview");
    let (status, body) = http_as(
        port,
        "POST",
        "/v1/events",
        Some(r#"{"name": "later", "payload": {}, "delay": "1h"}"#),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let overview = common::eventually("a counted overview", Duration::from_secs(30), || async {
        let (status, body) = http_as(port, "GET", "/v1/overview", None, Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        (!v["counted_at"].is_null()).then_some((v, body))
    })
    .await;
    let (overview, raw) = overview;
    assert_eq!(overview["names"][0]["name"], "later", "{overview}");
    assert_eq!(overview["names"][0]["scheduled"], 1, "{overview}");
    assert_eq!(overview["totals"]["scheduled"], 1, "{overview}");
    // live (pending + scheduled + running) in the name's row and in the
    // totals, once each: serde_json would keep the last of two keys.
    assert_eq!(overview["names"][0]["live"], 1, "{overview}");
    assert_eq!(overview["totals"]["live"], 1, "{overview}");
    assert_eq!(raw.matches("\"live\":").count(), 2, "{raw}");
    assert!(overview["age_secs"].as_f64().unwrap() < 30.0, "{overview}");
    assert_eq!(
        overview["timeline"].as_array().unwrap().len(),
        60,
        "{overview}"
    );
    assert!(
        overview["instance"].as_str().unwrap().contains("pid"),
        "{overview}"
    );
    serve.stop();
}

on_both_backends!(files_and_overview);

// ---------------------------------------------------------------------------
// In a browser

fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("ui-artifacts");
    // Screenshots of an earlier run must not pass for this one's.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Node, chromium and playwright-core, or a failure naming the install script.
fn browser_tools() -> (PathBuf, PathBuf) {
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/ui");
    let fix =
        "run scripts/install-test-tools.sh (apt chromium, node, npm; npm ci --prefix tests/ui)";
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: {fix}"
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is missing ({node:?}): {fix}"
    );
    assert!(
        ui.join("node_modules/playwright-core").exists(),
        "tests/ui/node_modules/playwright-core is missing: {fix}"
    );
    (ui.join("dashboard.spec.mjs"), ui)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_browser() {
    let (spec, ui_dir) = browser_tools();
    let db = TestDb::postgres().await;
    ok(&outrun(&db, &["migrate"]));
    db.exec("CREATE TABLE probe_seen (event_id TEXT PRIMARY KEY, version TEXT NOT NULL)")
        .await;

    // The handler's module is a copy, so the test can reload it (v2).
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("probe.wasm");
    std::fs::copy(guest("probe"), &module).unwrap();
    let port = free_port();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n\n\
             [runtime]\nkeep_done = \"1h\"\n\n\
             [[handler]]\nname = \"probe\"\nmodule = {module:?}\n\
             events = [\"probe.version\", \"probe.fail\"]\nmax_retry = 1\ntimeout = \"5s\"\n\
             [handler.allow]\nsql = true\nemit = [\"probe.version\"]\n\n\
             [[limit]]\nevent = \"probe.version\"\nrate = \"100/s\"\n"
        ),
    )
    .unwrap();
    // A name no handler binds, paused before its events arrive: they stay
    // pending, so the counts hold still while the browser compares them.
    ok(&outrun(
        &db,
        &["events", "pause", "--name", "report.nightly", "--force"],
    ));
    let serve = Serve::ready(&db, &config).await;

    let post = |path: String, body: Value| async move {
        let (status, answer) =
            http_as(port, "POST", &path, Some(&body.to_string()), Some(TOKEN)).await;
        assert!(
            (200..300).contains(&status),
            "POST {path}: {status} {answer}"
        );
        serde_json::from_str::<Value>(&answer).unwrap()
    };
    for i in 0..3 {
        post(
            "/v1/events".into(),
            json!({"name": "report.nightly", "payload": {"i": i}}),
        )
        .await;
    }
    for i in 0..4 {
        post(
            "/v1/events".into(),
            json!({"name": "probe.version", "payload": {"i": i}, "delay": "1h", "group_id": format!("g{i}")}),
        )
        .await;
    }
    // A dead letter made by the handler (rejected), and two written dead
    // as another application would find them after an outage.
    post(
        "/v1/events".into(),
        json!({"name": "probe.fail", "payload": {"retryable": false, "message": "card declined"}}),
    )
    .await;
    for i in 0..2 {
        db.exec(&format!(
            "INSERT INTO outbox_events (name, payload, retry, max_retry, dead_at, last_error)
             VALUES ('probe.version', '{{\"sleep_ms\":{i}}}', 1, 1, now() - interval '{i} minutes', 'inventory service unavailable (HTTP 503)')"
        ))
        .await;
    }
    wait_for("the probe.fail event to die", || async {
        db.scalar(
            "SELECT count(*) FROM outbox_events WHERE name = 'probe.fail' AND retry >= max_retry",
        )
        .await
            == 1
    })
    .await;
    // A hot reload, for the handlers page's history.
    std::fs::copy(guest("probe_v2"), &module).unwrap();
    wait_for("the reload to v2", || async {
        serve.log().contains("handler probe reloaded")
    })
    .await;

    let dead: Vec<String> = db
        .strings("SELECT id::text FROM outbox_events WHERE name = 'probe.version' AND retry >= max_retry ORDER BY dead_at DESC")
        .await;
    let (replay_id, deleted_dead_id) = (dead[0].clone(), dead[1].clone());
    let scheduled: Vec<String> = db
        .strings("SELECT id::text FROM outbox_events WHERE name = 'probe.version' AND retry < max_retry ORDER BY seq")
        .await;
    let stats: Value = serde_json::from_str(&ok(&outrun(
        &db,
        &["events", "stats", "--json", "--by-name"],
    )))
    .expect("events stats --json is JSON");
    println!("outrun events stats --json --by-name: {stats}");

    let artifacts = artifacts_dir();
    let mut child = tokio::process::Command::new("node")
        .arg(&spec)
        .current_dir(&ui_dir)
        .env("DASHBOARD_URL", format!("http://127.0.0.1:{port}/ui"))
        .env("API_URL", format!("http://127.0.0.1:{port}"))
        .env("ADMIN_TOKEN", TOKEN)
        .env("CLI_STATS", stats.to_string())
        .env("REPLAY_ID", &replay_id)
        .env("DELETED_DEAD_ID", &deleted_dead_id)
        .env("VANISHING_ID", &scheduled[0])
        .env("ARTIFACTS", &artifacts)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start node (run scripts/install-test-tools.sh)");
    // The spec asks for "another process" to delete an event mid-test:
    // `DELETE <id>` on its stdout, answered with `DELETED` on its stdin.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            println!("spec: {line}");
            if let Some(id) = line.strip_prefix("DELETE ") {
                let n = db
                    .exec(&format!(
                        "DELETE FROM outbox_events WHERE id = '{}'",
                        id.trim()
                    ))
                    .await;
                assert_eq!(n, 1, "the spec asked to delete {id}, which was not there");
                stdin.write_all(b"DELETED\n").await.unwrap();
                stdin.flush().await.unwrap();
            }
        }
        child.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser spec did not finish within 240 s");
    let log = serve.stop();
    assert!(
        status.success(),
        "tests/ui/dashboard.spec.mjs failed ({status}); screenshots in {}; serve log:\n{log}",
        artifacts.display()
    );

    // What the spec did, seen from the database.
    let seen = db
        .strings(&format!(
            "SELECT version FROM probe_seen WHERE event_id = '{replay_id}'"
        ))
        .await;
    assert_eq!(
        seen.len(),
        1,
        "the replayed dead letter did not run its handler"
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM outbox_events WHERE id = '{replay_id}'"
        ))
        .await,
        0,
        "the replayed event was handled and deleted"
    );
    let paused = db
        .strings("SELECT name FROM outrun_paused ORDER BY name")
        .await;
    assert_eq!(
        paused,
        vec!["report.nightly".to_string()],
        "pause and resume from the UI left {paused:?}"
    );
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM outbox_events WHERE name = 'probe.version' AND retry < max_retry"
        )
        .await,
        3,
        "the token-less cancel changed nothing; one scheduled event was deleted by 'another process'"
    );
    for page in ["overview", "events", "event", "dead-letters", "handlers"] {
        let shot = artifacts.join(format!("{page}.png"));
        assert!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
            "no screenshot {}",
            shot.display()
        );
    }
}
