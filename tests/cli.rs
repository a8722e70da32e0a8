//! The `outrun` binary, driven as a user would: migrate, enqueue, list,
//! stats, show, replay, purge, serve; and every bad input the CLI must refuse
//! with a one-line error, exit code 1 and nothing written.

mod common;

use std::process::{Command, Output};

use common::{TestDb, fails, ok, outrun, wait_for};
use serde_json::Value;

fn json(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).expect("stdout is JSON")
}

fn stats(db: &TestDb) -> Value {
    json(&outrun(db, &["events", "stats", "--json"]))
}

async fn enqueue_list_stats_show(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let id = ok(&outrun(
        &db,
        &[
            "enqueue",
            "order.created",
            "--payload",
            r#"{"order_id":42}"#,
            "--group",
            "order:42",
            "--max-retry",
            "7",
        ],
    ))
    .trim()
    .to_string();
    uuid::Uuid::parse_str(&id).expect("enqueue prints the id");
    ok(&outrun(
        &db,
        &[
            "enqueue",
            "later",
            "--payload",
            "{}",
            "--delay",
            "1h",
            "--expires-in",
            "2h",
        ],
    ));
    let s = stats(&db);
    for key in ["pending", "scheduled", "running", "dead"] {
        assert!(s[key].is_i64(), "stats lacks integer {key}: {s}");
    }
    assert_eq!(
        (
            s["pending"].as_i64(),
            s["scheduled"].as_i64(),
            s["dead"].as_i64()
        ),
        (Some(1), Some(1), Some(0))
    );
    let list = json(&outrun(&db, &["events", "list", "--json"]));
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let first = &rows[0];
    assert_eq!(first["id"], id.as_str());
    assert_eq!(first["name"], "order.created");
    assert_eq!(first["payload"]["order_id"], 42);
    assert_eq!(first["group_id"], "order:42");
    assert_eq!(
        (first["retry"].as_i64(), first["max_retry"].as_i64()),
        (Some(0), Some(7))
    );
    assert!(first["create_date"].is_string() && first.get("last_error").is_some());
    let only = json(&outrun(
        &db,
        &["events", "list", "--name", "later", "--json"],
    ));
    assert_eq!(only.as_array().unwrap().len(), 1);
    let shown = json(&outrun(&db, &["events", "show", &id, "--json"]));
    assert_eq!(shown["id"], id.as_str());
    assert!(
        ok(&outrun(&db, &["events", "list"])).contains("order.created"),
        "human listing"
    );
}

async fn idempotency_key_returns_the_same_id(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let a = ok(&outrun(
        &db,
        &["enqueue", "x", "--payload", "{}", "--key", "k-1"],
    ));
    let b = ok(&outrun(
        &db,
        &["enqueue", "x", "--payload", "{\"other\":1}", "--key", "k-1"],
    ));
    assert_eq!(a, b);
    assert_eq!(stats(&db)["pending"], 1);
}

async fn bad_input_writes_nothing(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let err = fails(&outrun(&db, &["enqueue", "x", "--payload", "{not json"]));
    assert!(err.contains("not valid JSON"), "{err}");
    let err = fails(&outrun(&db, &["enqueue", "", "--payload", "{}"]));
    assert!(err.contains("name is empty"), "{err}");
    let long = "n".repeat(101);
    let err = fails(&outrun(&db, &["enqueue", &long, "--payload", "{}"]));
    assert!(err.contains("101") && err.contains("100"), "{err}");
    let err = fails(&outrun(
        &db,
        &["enqueue", "x", "--payload", "{}", "--delay", "soon"],
    ));
    assert!(err.contains("soon") || err.contains("duration"), "{err}");
    let s = stats(&db);
    assert_eq!(
        s["pending"].as_i64().unwrap()
            + s["scheduled"].as_i64().unwrap()
            + s["dead"].as_i64().unwrap(),
        0,
        "nothing written"
    );
}

async fn replay_and_purge(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let id = ok(&outrun(
        &db,
        &["enqueue", "nobody.handles.this", "--payload", "{}"],
    ))
    .trim()
    .to_string();
    // serve has no handler for it: the event is dead at once.
    let mut serve = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["serve"])
        .env("OUTRUN_DATABASE_URL", db.url())
        .env("OUTRUN_POLL_INTERVAL", "50ms")
        .spawn()
        .unwrap();
    wait_for("event dead", || async { stats(&db)["dead"] == 1 }).await;
    terminate(&mut serve);
    let dead = json(&outrun(&db, &["events", "list", "--dead", "--json"]));
    assert_eq!(
        dead[0]["last_error"],
        "no handler for event 'nobody.handles.this'"
    );
    assert!(dead[0]["dead_at"].is_string(), "{dead}");
    assert_eq!(dead[0]["deferrals"], 0);
    assert!(
        ok(&outrun(&db, &["events", "list", "--dead"])).contains("died"),
        "the human listing shows when it died"
    );

    let unknown = uuid::Uuid::now_v7().to_string();
    let err = fails(&outrun(&db, &["events", "replay", &unknown]));
    assert!(err.contains(&unknown), "{err}");
    assert_eq!(stats(&db)["dead"], 1, "a failed replay changes nothing");

    ok(&outrun(&db, &["events", "replay", &id]));
    let ev = json(&outrun(&db, &["events", "show", &id, "--json"]));
    assert_eq!(ev["retry"], 0);
    assert!(ev["dead_at"].is_null(), "replay clears dead_at: {ev}");
    assert_eq!(stats(&db)["pending"], 1);

    // Dead again, then purge: --older-than spares the fresh one.
    let mut serve = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["serve"])
        .env("OUTRUN_DATABASE_URL", db.url())
        .env("OUTRUN_POLL_INTERVAL", "50ms")
        .spawn()
        .unwrap();
    wait_for("event dead again", || async { stats(&db)["dead"] == 1 }).await;
    terminate(&mut serve);
    ok(&outrun(&db, &["enqueue", "live", "--payload", "{}"]));
    ok(&outrun(
        &db,
        &["events", "purge", "--dead", "--older-than", "1h"],
    ));
    assert_eq!(stats(&db)["dead"], 1);
    ok(&outrun(&db, &["events", "replay", "--all-dead"]));
    assert_eq!(stats(&db)["dead"], 0);
    assert_eq!(stats(&db)["pending"], 2);
    fails(&outrun(&db, &["events", "purge"])); // --dead is required
}

fn terminate(child: &mut std::process::Child) {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "serve should exit 0 on SIGTERM, got {status}"
    );
}

on_both_backends!(
    enqueue_list_stats_show,
    idempotency_key_returns_the_same_id,
    bad_input_writes_nothing,
    replay_and_purge,
    admin_api_enqueues_and_reports,
    cancel_one_or_by_name,
    cancel_refuses_bad_input,
    migrate_after_the_applications_sqlx_migrations,
    application_migrates_after_outrun,
    upgrade_moves_outruns_rows_out_of_sqlx_migrations,
    concurrent_migrate_processes_all_succeed,
    changed_migration_is_refused_by_name,
);

#[test]
fn unknown_config_key_names_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrun.toml");
    std::fs::write(&path, "[runtime]\nconcurency = 4\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["events", "stats", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("concurency") && err.contains("outrun.toml"),
        "{err}"
    );
}

#[test]
fn unreachable_database_is_one_line_with_redacted_url() {
    // Port 1 on loopback: nothing listens there.
    let url = "postgres://app:s3cret@127.0.0.1:1/app";
    let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["events", "stats", "--database", url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("127.0.0.1:1"), "names the URL: {err}");
    assert!(!err.contains("s3cret"), "password must be redacted: {err}");
}

#[test]
fn commands_before_migrate_say_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("o.db").display());
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_outrun"))
            .args(args)
            .args(["--database", &url])
            .output()
            .unwrap()
    };
    let out = run(&["enqueue", "x", "--payload", "{}"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run `outrun migrate` first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for _ in 0..2 {
        let out = run(&["migrate"]);
        assert!(
            out.status.success(),
            "migrate must be idempotent: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(run(&["enqueue", "x", "--payload", "{}"]).status.success());
}

/// One HTTP/1.1 request over a fresh connection; returns (status, body).
async fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // axum sends these bodies with a Content-Length, not chunked.
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn admin_api_enqueues_and_reports(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["serve", "--admin", &format!("127.0.0.1:{port}")])
        .env("OUTRUN_DATABASE_URL", db.url())
        .env("OUTRUN_POLL_INTERVAL", "50ms")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The admin server answers from before the dispatch loop runs; ready
    // (200) once it does.
    wait_for("admin server up and ready", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
            && http(port, "GET", "/healthz", None).await.0 == 200
    })
    .await;
    let (status, body) = http(port, "GET", "/healthz", None).await;
    assert_eq!((status, body.contains("ok")), (200, true), "{body}");

    let (status, body) = http(
        port,
        "POST",
        "/v1/events",
        Some(r#"{"name":"later","payload":{"a":1},"delay":"1h","group_id":"g"}"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = http(port, "GET", &format!("/v1/events/{id}"), None).await;
    assert_eq!(status, 200, "{body}");
    let ev: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            ev["name"].as_str(),
            ev["payload"]["a"].as_i64(),
            ev["group_id"].as_str()
        ),
        (Some("later"), Some(1), Some("g"))
    );

    // Bad input: clear errors, nothing written.
    let (status, body) = http(
        port,
        "POST",
        "/v1/events",
        Some(r#"{"name":"","payload":{}}"#),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("name is empty"), "{body}");
    let (status, body) = http(
        port,
        "POST",
        "/v1/events",
        Some(r#"{"name":"x","payload":{},"priority":1}"#),
    )
    .await;
    assert_eq!(status, 400, "unknown field: {body}");
    assert!(body.contains("priority"), "{body}");
    let (status, _) = http(port, "POST", "/v1/events", Some("{not json")).await;
    assert_eq!(status, 400);
    let (status, _) = http(
        port,
        "GET",
        &format!("/v1/events/{}", uuid::Uuid::now_v7()),
        None,
    )
    .await;
    assert_eq!(status, 404);

    let (status, body) = http(port, "GET", "/v1/stats", None).await;
    assert_eq!(status, 200);
    let s: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (s["scheduled"].as_i64(), s["pending"].as_i64()),
        (Some(1), Some(0)),
        "{s}"
    );

    // Cancel: one by id, then in bulk by name and group.
    let (status, body) = http(port, "POST", &format!("/v1/events/{id}/cancel"), None).await;
    assert_eq!(status, 200, "{body}");
    let c: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (c["cancelled"].as_bool(), c["running"].as_bool()),
        (Some(true), Some(false))
    );
    let (_, body) = http(port, "GET", &format!("/v1/events/{id}"), None).await;
    let ev: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (ev["dead"].as_bool(), ev["last_error"].as_str()),
        (Some(true), Some("cancelled"))
    );
    assert!(ev["dead_at"].is_string() && ev["deferrals"] == 0, "{ev}");
    let (status, body) = http(port, "POST", &format!("/v1/events/{id}/cancel"), None).await;
    assert_eq!(status, 409, "already dead: {body}");
    assert!(body.contains("already dead"), "{body}");
    let (status, _) = http(
        port,
        "POST",
        &format!("/v1/events/{}/cancel", uuid::Uuid::now_v7()),
        None,
    )
    .await;
    assert_eq!(status, 404);
    for group in ["g", "h", "g"] {
        let body = format!(r#"{{"name":"bulk","payload":{{}},"delay":"1h","group_id":"{group}"}}"#);
        assert_eq!(http(port, "POST", "/v1/events", Some(&body)).await.0, 201);
    }
    let (status, body) = http(
        port,
        "POST",
        "/v1/events/cancel",
        Some(r#"{"name":"bulk","group_id":"g"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let c: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (c["cancelled"].as_i64(), c["busy"].as_i64()),
        (Some(2), Some(0)),
        "{c}"
    );
    let (status, body) = http(
        port,
        "POST",
        "/v1/events/cancel",
        Some(r#"{"group_id":"g"}"#),
    )
    .await;
    assert_eq!(status, 400, "the name is required: {body}");
    let (status, body) = http(port, "POST", "/v1/events/cancel", Some(r#"{"name":""}"#)).await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = http(port, "POST", "/v1/events/not-a-uuid/cancel", None).await;
    assert_eq!(status, 400);
    let (_, body) = http(port, "GET", "/v1/stats", None).await;
    let s: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (s["scheduled"].as_i64(), s["dead"].as_i64()),
        (Some(1), Some(3)),
        "{s}"
    );

    // The gauges refresh on a timer; wait for the first refresh.
    wait_for("metrics exported", || async {
        let (status, body) = http(port, "GET", "/metrics", None).await;
        status == 200 && body.contains("outrun_events_scheduled")
    })
    .await;
    terminate(&mut serve);
}

// ------------------------------------------------------------ migrations
//
// outrun shares the database with an application that runs its own sqlx
// migrations; sqlx keeps every history in `_sqlx_migrations`, so outrun
// keeps its own in `outrun_migrations`.

/// Versions of the version-numbered files in `migrations/<backend>/`.
fn outrun_versions(db: &TestDb) -> Vec<i64> {
    let backend = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(backend);
    let mut v: Vec<i64> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.split('_').next().unwrap().parse().unwrap()
        })
        .collect();
    v.sort();
    v
}

/// A folder of sqlx migrations, as an application keeps one.
fn app_migrations(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, sql) in files {
        std::fs::write(dir.path().join(name), sql).unwrap();
    }
    dir
}

const APP_V1: (&str, &str) = (
    "20240101000000_app_users.sql",
    "CREATE TABLE app_users (id INTEGER PRIMARY KEY, name TEXT NOT NULL);",
);
const APP_V2: (&str, &str) = (
    "20270101000000_app_orders.sql",
    "CREATE TABLE app_orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL);",
);

/// Run the application's sqlx migrator (sqlx's own `Migrator`, its
/// history in `_sqlx_migrations`) over `dir`.
async fn app_migrate(
    db: &TestDb,
    dir: &std::path::Path,
    ignore_missing: bool,
) -> Result<(), sqlx::migrate::MigrateError> {
    let mut m = sqlx::migrate::Migrator::new(dir).await?;
    m.set_ignore_missing(ignore_missing);
    match db {
        TestDb::Sqlite { .. } => {
            // The application may well be first: create the file.
            let opts =
                <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(db.url())?
                    .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(opts).await?;
            let r = m.run(&pool).await;
            pool.close().await;
            r
        }
        TestDb::Postgres { .. } => {
            let pool = sqlx::PgPool::connect(db.url()).await?;
            let r = m.run(&pool).await;
            pool.close().await;
            r
        }
    }
}

async fn versions_in(db: &TestDb, table: &str) -> Vec<i64> {
    let sql = format!("SELECT version FROM {table} ORDER BY version");
    match db {
        TestDb::Sqlite { url, .. } => {
            let pool = sqlx::SqlitePool::connect(url).await.unwrap();
            let v = sqlx::query_scalar(&sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            v
        }
        TestDb::Postgres { url, .. } => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let v = sqlx::query_scalar(&sql).fetch_all(&pool).await.unwrap();
            pool.close().await;
            v
        }
    }
}

/// The application migrated first: outrun's migrate used to fail with
/// "migration 20240101000000 was previously applied but is missing".
async fn migrate_after_the_applications_sqlx_migrations(db: TestDb) {
    let app = app_migrations(&[APP_V1]);
    app_migrate(&db, app.path(), false).await.unwrap();
    let app_row = db
        .strings("SELECT description FROM _sqlx_migrations WHERE version = 20240101000000")
        .await;

    let out = outrun(&db, &["migrate"]);
    ok(&out);
    assert_eq!(
        versions_in(&db, "outrun_migrations").await,
        outrun_versions(&db)
    );
    assert_eq!(
        versions_in(&db, "_sqlx_migrations").await,
        vec![20240101000000],
        "the application's history is untouched"
    );
    assert_eq!(
        db.strings("SELECT description FROM _sqlx_migrations WHERE version = 20240101000000")
            .await,
        app_row
    );
    // Both keep working: the application's next migration, outrun again.
    ok(&outrun(&db, &["migrate"]));
    let app = app_migrations(&[APP_V1, APP_V2]);
    app_migrate(&db, app.path(), false).await.unwrap();
    ok(&outrun(&db, &["migrate"]));
    assert_eq!(
        versions_in(&db, "_sqlx_migrations").await,
        vec![20240101000000, 20270101000000]
    );
    ok(&outrun(&db, &["enqueue", "x", "--payload", "{}"]));
    db.exec("INSERT INTO app_orders (id, user_id) VALUES (1, 1)")
        .await;
}

/// outrun migrated first: the application's own sqlx migrator must not
/// find outrun's versions in its history.
async fn application_migrates_after_outrun(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let app = app_migrations(&[APP_V1]);
    app_migrate(&db, app.path(), false)
        .await
        .expect("the application's sqlx migrate runs beside outrun's");
    assert_eq!(
        versions_in(&db, "_sqlx_migrations").await,
        vec![20240101000000]
    );
    app_migrate(&db, app.path(), false).await.unwrap();
    ok(&outrun(&db, &["migrate"]));
    assert_eq!(
        versions_in(&db, "outrun_migrations").await,
        outrun_versions(&db)
    );
}

/// A database migrated by an earlier outrun has outrun's history in
/// `_sqlx_migrations` (here beside an application's row, as an application
/// that set `ignore_missing` would have had it): migrate moves exactly
/// outrun's rows, keeps the application's and the events.
async fn upgrade_moves_outruns_rows_out_of_sqlx_migrations(db: TestDb) {
    // The earlier outrun: sqlx's migrator over the migrations outrun
    // shipped while it kept its history in `_sqlx_migrations`.
    let versions = outrun_versions(&db);
    let old: Vec<i64> = versions
        .iter()
        .copied()
        .filter(|v| *v < 20261201000000)
        .collect();
    let backend = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(backend);
    let old_dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let v: i64 = name.split('_').next().unwrap().parse().unwrap();
        if old.contains(&v) {
            std::fs::copy(e.path(), old_dir.path().join(&name)).unwrap();
        }
    }
    app_migrate(&db, old_dir.path(), false).await.unwrap();
    let app = app_migrations(&[APP_V1]);
    app_migrate(&db, app.path(), true).await.unwrap();
    let mut both = old.clone();
    both.push(20240101000000);
    both.sort();
    assert_eq!(versions_in(&db, "_sqlx_migrations").await, both);
    let id = ok(&outrun(&db, &["enqueue", "kept", "--payload", "{}"]))
        .trim()
        .to_string();

    let out = outrun(&db, &["migrate"]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("moved outrun's migration history") && err.contains(&old[0].to_string()),
        "migrate says what it moved: {err}"
    );
    assert_eq!(
        versions_in(&db, "_sqlx_migrations").await,
        vec![20240101000000],
        "exactly outrun's rows left _sqlx_migrations"
    );
    assert_eq!(versions_in(&db, "outrun_migrations").await, versions);
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM outrun_migrations WHERE applied_by LIKE 'an earlier outrun%'"
        )
        .await,
        old.len() as i64
    );
    // The application's migrator no longer trips over outrun's versions.
    app_migrate(&db, app.path(), false)
        .await
        .expect("the application's sqlx migrate runs after the upgrade");
    let shown = json(&outrun(&db, &["events", "show", &id, "--json"]));
    assert_eq!(shown["name"], "kept");
    // Idempotent: nothing left to move.
    let out = outrun(&db, &["migrate"]);
    ok(&out);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("moved"));
}

/// Six processes migrating one database at once (on SQLite 3-4 of 6 used to
/// fail with "table outbox_events already exists").
async fn concurrent_migrate_processes_all_succeed(db: TestDb) {
    let children: Vec<_> = (0..6)
        .map(|_| {
            common::outrun_command(&db)
                .arg("migrate")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        ok(&c.wait_with_output().unwrap());
    }
    assert_eq!(
        versions_in(&db, "outrun_migrations").await,
        outrun_versions(&db)
    );
    ok(&outrun(&db, &["enqueue", "x", "--payload", "{}"]));
    assert_eq!(stats(&db)["pending"], 1);
}

/// An applied migration whose SQL changed is refused, naming the version
/// and what to do.
async fn changed_migration_is_refused_by_name(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let first = outrun_versions(&db)[0];
    let zero = if db.is_postgres() {
        "'\\x00'::bytea"
    } else {
        "X'00'"
    };
    db.exec(&format!(
        "UPDATE outrun_migrations SET checksum = {zero} WHERE version = {first}"
    ))
    .await;
    let err = fails(&outrun(&db, &["migrate"]));
    assert!(
        err.contains(&first.to_string()) && err.contains("changed after it was applied"),
        "{err}"
    );
    assert!(err.contains("restore"), "says what to do: {err}");
}

// ---------------------------------------------------------------- cancel

fn enqueue_id(db: &TestDb, args: &[&str]) -> String {
    let mut all = vec!["enqueue"];
    all.extend_from_slice(args);
    ok(&outrun(db, &all)).trim().to_string()
}

async fn cancel_one_or_by_name(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let a = enqueue_id(&db, &["job", "--payload", "{}", "--group", "g1"]);
    let b = enqueue_id(&db, &["job", "--payload", "{}", "--group", "g2"]);
    let c = enqueue_id(&db, &["job", "--payload", "{}", "--group", "g1"]);
    let other = enqueue_id(&db, &["other", "--payload", "{}", "--group", "g1"]);

    let out = outrun(&db, &["events", "cancel", &a]);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("cancelled {a}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = json(&outrun(&db, &["events", "show", &a, "--json"]));
    assert_eq!(
        (ev["dead"].as_bool(), ev["last_error"].as_str()),
        (Some(true), Some("cancelled"))
    );
    assert!(ev["dead_at"].is_string(), "{ev}");

    // Again: already dead, says so, changes nothing.
    let err = fails(&outrun(&db, &["events", "cancel", &a]));
    assert!(err.contains("already dead") && err.contains(&a), "{err}");

    // Bulk by name and group: only c (a is dead already, b and other differ).
    let out = outrun(
        &db,
        &[
            "events", "cancel", "--name", "job", "--group", "g1", "--json",
        ],
    );
    let counts = json(&out);
    assert_eq!(
        (counts["cancelled"].as_i64(), counts["running"].as_i64()),
        (Some(1), Some(0))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled 1 events"));
    let dead = |id: &str| json(&outrun(&db, &["events", "show", id, "--json"]))["dead"] == true;
    assert!(dead(&c) && !dead(&b) && !dead(&other));
    assert_eq!(stats(&db)["dead"], 2);

    // By name alone.
    let out = outrun(&db, &["events", "cancel", "--name", "job"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled 1 events"));
    assert!(dead(&b) && !dead(&other));

    // Replayable.
    ok(&outrun(&db, &["events", "replay", &a]));
    let ev = json(&outrun(&db, &["events", "show", &a, "--json"]));
    assert_eq!(
        (ev["dead"].as_bool(), ev["retry"].as_i64()),
        (Some(false), Some(0))
    );
    assert!(ev["dead_at"].is_null());
}

async fn cancel_refuses_bad_input(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let id = enqueue_id(&db, &["job", "--payload", "{}"]);
    let unknown = uuid::Uuid::now_v7().to_string();
    let out = outrun(&db, &["events", "cancel", &unknown]);
    let err = fails(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains(&unknown) && err.contains("no event"), "{err}");
    for args in [
        &["events", "cancel", "not-a-uuid"][..],
        &["events", "cancel"],
        &["events", "cancel", "--group", "g1"],
        &["events", "cancel", &id, "--name", "job"],
    ] {
        let err = fails(&outrun(&db, args));
        assert!(err.contains("--help"), "{args:?}: {err}");
    }
    let err = fails(&outrun(&db, &["events", "cancel", "--name", ""]));
    assert!(err.contains("name is empty"), "{err}");
    assert_eq!(
        (stats(&db)["pending"].as_i64(), stats(&db)["dead"].as_i64()),
        (Some(1), Some(0))
    );
}
