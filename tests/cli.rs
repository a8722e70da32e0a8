//! The `outrun` binary, driven as a user would: migrate, enqueue, list,
//! stats, show, replay, purge, serve; and every bad input the CLI must refuse
//! with a one-line error, exit code 1 and nothing written.

mod common;

use std::process::{Command, Output};

use common::{TestDb, fails, http, http_as, ok, outrun, wait_for};

/// The admin token of the serve processes these tests start.
const TOKEN: &str = "test-admin-token";
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
    enqueue_large_payload_from_file_and_stdin,
    enqueue_ndjson_batch,
    enqueue_refuses_events_that_cannot_run,
    list_shows_state_and_run_at_dead_newest_first,
    stats_by_name,
    serve_logs_in_json,
    list_filters_and_pages,
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
        .env("OUTRUN_ADMIN_TOKEN", TOKEN)
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

    let (status, body) = http_as(
        port,
        "POST",
        "/v1/events",
        Some(r#"{"name":"later","payload":{"a":1},"delay":"1h","group_id":"g"}"#),
        Some(TOKEN),
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
    let (status, body) = http_as(
        port,
        "POST",
        "/v1/events",
        Some(r#"{"name":"","payload":{}}"#),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("name is empty"), "{body}");
    let (status, body) = http_as(
        port,
        "POST",
        "/v1/events",
        Some(r#"{"name":"x","payload":{},"priority":1}"#),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 400, "unknown field: {body}");
    assert!(body.contains("priority"), "{body}");
    let (status, _) = http_as(port, "POST", "/v1/events", Some("{not json"), Some(TOKEN)).await;
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
    let (status, body) = http_as(
        port,
        "POST",
        &format!("/v1/events/{id}/cancel"),
        None,
        Some(TOKEN),
    )
    .await;
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
    let (status, body) = http_as(
        port,
        "POST",
        &format!("/v1/events/{id}/cancel"),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 409, "already dead: {body}");
    assert!(body.contains("already dead"), "{body}");
    let (status, _) = http_as(
        port,
        "POST",
        &format!("/v1/events/{}/cancel", uuid::Uuid::now_v7()),
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404);
    for group in ["g", "h", "g"] {
        let body = format!(r#"{{"name":"bulk","payload":{{}},"delay":"1h","group_id":"{group}"}}"#);
        assert_eq!(
            http_as(port, "POST", "/v1/events", Some(&body), Some(TOKEN))
                .await
                .0,
            201
        );
    }
    let (status, body) = http_as(
        port,
        "POST",
        "/v1/events/cancel",
        Some(r#"{"name":"bulk","group_id":"g"}"#),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let c: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (c["cancelled"].as_i64(), c["busy"].as_i64()),
        (Some(2), Some(0)),
        "{c}"
    );
    let (status, body) = http_as(
        port,
        "POST",
        "/v1/events/cancel",
        Some(r#"{"group_id":"g"}"#),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 400, "the name is required: {body}");
    let (status, body) = http_as(
        port,
        "POST",
        "/v1/events/cancel",
        Some(r#"{"name":""}"#),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = http_as(
        port,
        "POST",
        "/v1/events/not-a-uuid/cancel",
        None,
        Some(TOKEN),
    )
    .await;
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

// ------------------------------------------------- large and batch enqueue

/// `outrun ARGS` against `db` with `input` on stdin.
fn outrun_stdin(db: &TestDb, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = common::outrun_command(db)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run outrun");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn live_and_dead(db: &TestDb) -> i64 {
    let s = stats(db);
    ["pending", "scheduled", "running", "dead"]
        .iter()
        .map(|k| s[k].as_i64().unwrap())
        .sum()
}

async fn enqueue_large_payload_from_file_and_stdin(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    // 600 KiB: well over what a command line takes (~128 KiB per argument).
    let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(600 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.json");
    std::fs::write(&file, format!("{big}\n")).unwrap();
    let id = ok(&outrun(
        &db,
        &[
            "enqueue",
            "big.file",
            "--payload-file",
            file.to_str().unwrap(),
        ],
    ))
    .trim()
    .to_string();
    let ev = json(&outrun(&db, &["events", "show", &id, "--json"]));
    assert_eq!(
        ev["payload"]["blob"].as_str().map(str::len),
        Some(600 * 1024),
        "the whole payload, without the file's trailing newline"
    );
    let out = outrun_stdin(
        &db,
        &["enqueue", "big.stdin", "--payload", "-", "--json"],
        big.as_bytes(),
    );
    let id = json(&out)["id"].as_str().unwrap().to_string();
    let ev = json(&outrun(&db, &["events", "show", &id, "--json"]));
    assert_eq!(ev["name"], "big.stdin");
    assert_eq!(
        ev["payload"]["blob"].as_str().map(str::len),
        Some(600 * 1024)
    );

    // Over the limit: the error names it, nothing is written.
    let huge = format!("{{\"blob\":\"{}\"}}", "x".repeat(2 * 1024 * 1024));
    std::fs::write(&file, &huge).unwrap();
    let err = fails(&outrun(
        &db,
        &["enqueue", "huge", "--payload-file", file.to_str().unwrap()],
    ));
    assert!(err.contains("1048576"), "{err}");
    let err = fails(&outrun_stdin(
        &db,
        &["enqueue", "huge", "--payload", "-"],
        huge.as_bytes(),
    ));
    assert!(err.contains("1048576"), "{err}");
    let missing = dir.path().join("missing.json");
    let err = fails(&outrun(
        &db,
        &["enqueue", "x", "--payload-file", missing.to_str().unwrap()],
    ));
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert_eq!(live_and_dead(&db), 2);
}

async fn enqueue_ndjson_batch(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.ndjson");
    std::fs::write(
        &file,
        concat!(
            r#"{"name":"order.created","payload":{"order_id": 1, "items": [1, 2]},"group_id":"order:1"}"#,
            "\n\n",
            r#"{"name":"order.created","payload":"text","delay":"1h","expires_in":"2h","max_retry":3,"idempotency_key":"k-2"}"#,
            "\n",
            r#"{"name":"report","payload":[1,2,3]}"#,
            "\n",
        ),
    )
    .unwrap();
    let out = outrun(
        &db,
        &["enqueue", "--ndjson", file.to_str().unwrap(), "--json"],
    );
    let v = json(&out);
    assert_eq!(v["enqueued"], 3, "{v}");
    let ids: Vec<String> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let first = json(&outrun(&db, &["events", "show", &ids[0], "--json"]));
    assert_eq!(first["group_id"], "order:1");
    assert_eq!(first["payload"]["items"][1], 2);
    let second = json(&outrun(&db, &["events", "show", &ids[1], "--json"]));
    assert_eq!(
        (
            second["payload"].as_str(),
            second["max_retry"].as_i64(),
            second["idempotency_key"].as_str(),
            second["state"].as_str()
        ),
        (Some("text"), Some(3), Some("k-2"), Some("scheduled"))
    );
    assert!(second["expires_at"].is_string());
    let s = stats(&db);
    assert_eq!(
        (s["pending"].as_i64(), s["scheduled"].as_i64()),
        (Some(2), Some(1))
    );

    // From stdin, ids one per line.
    let out = outrun_stdin(
        &db,
        &["enqueue", "--ndjson", "-"],
        b"{\"name\":\"a\",\"payload\":{}}\n{\"name\":\"b\",\"payload\":null}\n",
    );
    let text = ok(&out);
    assert_eq!(text.lines().count(), 2, "{text}");
    for line in text.lines() {
        uuid::Uuid::parse_str(line).expect("one id per line");
    }
    assert_eq!(live_and_dead(&db), 5);

    // A bad line anywhere: an error naming it, and nothing of the batch.
    for (lines, needle) in [
        (
            "{\"name\":\"a\",\"payload\":{}}\n{\"name\":\"a\",\"payload\":{}}\n{\"name\":\"a\"}\n",
            "line 3",
        ),
        (
            "{\"name\":\"a\",\"payload\":{}}\n{\"name\":\"a\",\"payload\":{},\"delay\":\"3s\",\"expires_in\":\"1s\"}\n",
            "line 2",
        ),
        ("{\"name\":\"\",\"payload\":{}}\n", "line 1"),
        ("{\"name\":\"a\",\"payload\":{}} trailing\n", "line 1"),
        ("{\"name\":\"a\",\"payload\":{},\"priority\":1}\n", "line 1"),
    ] {
        std::fs::write(&file, lines).unwrap();
        let err = fails(&outrun(
            &db,
            &["enqueue", "--ndjson", file.to_str().unwrap()],
        ));
        assert!(
            err.contains(needle) && err.contains("events.ndjson"),
            "{needle}: {err}"
        );
    }
    let err = fails(&outrun(
        &db,
        &["enqueue", "--ndjson", "/nonexistent/e.ndjson"],
    ));
    assert!(err.contains("/nonexistent/e.ndjson"), "{err}");
    assert_eq!(live_and_dead(&db), 5, "nothing of a bad batch is written");
    // A name and --ndjson do not mix.
    fails(&outrun(
        &db,
        &["enqueue", "x", "--ndjson", file.to_str().unwrap()],
    ));
}

// ----------------------------------------------------- events that cannot run

async fn enqueue_refuses_events_that_cannot_run(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let err = fails(&outrun(
        &db,
        &[
            "enqueue",
            "x",
            "--payload",
            "{}",
            "--expires-in",
            "1s",
            "--delay",
            "3s",
        ],
    ));
    assert!(
        err.contains("could never run") && err.contains("delay"),
        "{err}"
    );
    let err = fails(&outrun(
        &db,
        &[
            "enqueue",
            "x",
            "--payload",
            "{}",
            "--delay",
            "100000000000d",
        ],
    ));
    assert!(err.contains("100 years"), "{err}");
    assert!(
        !err.contains("out of range") && !err.contains("database"),
        "{err}"
    );
    // The same check on every entry point: a batch line.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("e.ndjson");
    std::fs::write(
        &file,
        "{\"name\":\"x\",\"payload\":{},\"expires_in\":\"100000000000d\"}\n",
    )
    .unwrap();
    let err = fails(&outrun(
        &db,
        &["enqueue", "--ndjson", file.to_str().unwrap()],
    ));
    assert!(err.contains("line 1") && err.contains("100 years"), "{err}");
    let err = fails(&outrun(
        &db,
        &["events", "purge", "--dead", "--older-than", "100000000000d"],
    ));
    assert!(err.contains("100 years"), "{err}");
    assert_eq!(live_and_dead(&db), 0);
    // Listing still works (a far-future row once broke it).
    ok(&outrun(&db, &["events", "list"]));
}

// ------------------------------------------------------ list and stats

async fn list_shows_state_and_run_at_dead_newest_first(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    enqueue_id(&db, &["ready", "--payload", "{}"]);
    enqueue_id(&db, &["later", "--payload", "{}", "--delay", "1h"]);
    let text = ok(&outrun(&db, &["events", "list"]));
    let header = text.lines().next().unwrap();
    assert!(
        header.contains("state") && header.contains("run at"),
        "{text}"
    );
    let row = |name: &str| {
        text.lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no row for {name}: {text}"))
            .to_string()
    };
    assert!(row("ready").contains("pending"), "{text}");
    assert!(row("later").contains("scheduled"), "{text}");
    let rows = json(&outrun(&db, &["events", "list", "--json"]));
    assert_eq!(rows[0]["state"], "pending");
    assert_eq!(rows[1]["state"], "scheduled");

    // Dead: newest dead first, whatever the order they were created in.
    let a = enqueue_id(&db, &["job", "--payload", "{}"]);
    let b = enqueue_id(&db, &["job", "--payload", "{}"]);
    let c = enqueue_id(&db, &["job", "--payload", "{}"]);
    for id in [&b, &c, &a] {
        ok(&outrun(&db, &["events", "cancel", id]));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let dead = json(&outrun(&db, &["events", "list", "--dead", "--json"]));
    let order: Vec<&str> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(order, [a.as_str(), c.as_str(), b.as_str()], "{dead}");
    assert_eq!(dead[0]["state"], "dead");
    let text = ok(&outrun(&db, &["events", "list", "--dead", "--limit", "1"]));
    assert!(text.lines().next().unwrap().contains("died"), "{text}");
    assert!(text.contains(&a) && !text.contains(&c), "{text}");
}

/// `events list` filters by state, name, group, error text and age, and
/// pages with the cursor it prints on stderr; `events show` prints the
/// traceparent. Bad filter input names the flag.
async fn list_filters_and_pages(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let a1 = enqueue_id(
        &db,
        &["a", "--payload", "{}", "--group", "g1", "--traceparent", tp],
    );
    let a2 = enqueue_id(&db, &["a", "--payload", "{}", "--group", "g2"]);
    let b = enqueue_id(&db, &["b", "--payload", "{}", "--delay", "1h"]);
    let c = enqueue_id(&db, &["c", "--payload", "{}"]);
    let d = enqueue_id(&db, &["d", "--payload", "{}"]);
    for id in [&c, &d] {
        ok(&outrun(&db, &["events", "cancel", id]));
    }
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["events", "list", "--json"];
        all.extend_from_slice(args);
        json(&outrun(&db, &all))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&[]), [a1.as_str(), a2.as_str(), b.as_str()]);
    assert_eq!(
        ids(&["--state", "live"]),
        [a1.as_str(), a2.as_str(), b.as_str()]
    );
    assert_eq!(ids(&["--state", "scheduled"]), [b.as_str()]);
    assert_eq!(ids(&["--state", "pending"]), [a1.as_str(), a2.as_str()]);
    assert!(ids(&["--state", "running"]).is_empty());
    assert_eq!(ids(&["--name", "a", "--group", "g2"]), [a2.as_str()]);
    assert_eq!(ids(&["--group", "g1"]), [a1.as_str()]);
    assert_eq!(ids(&["--state", "dead"]).len(), 2);
    assert_eq!(
        ids(&["--dead", "--name", "d", "--error-contains", "cancel"]),
        [d.as_str()]
    );
    assert!(ids(&["--dead", "--error-contains", "timeout"]).is_empty());
    assert_eq!(ids(&["--since", "1h"]).len(), 3);
    assert!(ids(&["--since", "2099-01-01T00:00:00Z"]).is_empty());

    // Pages of one: each names the next with --cursor on stderr; the last
    // names none. Together they are the whole listing, in order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = vec!["events", "list", "--json", "--limit", "1"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let out = outrun(&db, &args);
        let page = json(&out);
        assert_eq!(page.as_array().unwrap().len(), 1, "{page}");
        seen.push(page[0]["id"].as_str().unwrap().to_string());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match stderr.split("--cursor ").nth(1) {
            Some(next) => cursor = Some(next.trim().to_string()),
            None => {
                assert!(stderr.is_empty(), "{stderr}");
                break;
            }
        }
        assert!(seen.len() <= 3, "the listing never ends: {seen:?}");
    }
    assert_eq!(seen, [a1.as_str(), a2.as_str(), b.as_str()]);

    // show: the traceparent, when the event has one.
    let shown = json(&outrun(&db, &["events", "show", &a1, "--json"]));
    assert_eq!(shown["traceparent"], tp, "{shown}");
    assert!(ok(&outrun(&db, &["events", "show", &a1])).contains(tp));
    let shown = json(&outrun(&db, &["events", "show", &a2, "--json"]));
    assert!(shown.get("traceparent").is_none(), "{shown}");

    // Bad input: one line naming the flag.
    let err = fails(&outrun(&db, &["events", "list", "--state", "limbo"]));
    assert!(
        err.contains("--state") && err.contains("unknown state \"limbo\""),
        "{err}"
    );
    assert!(
        err.contains("live, pending, scheduled, running, dead"),
        "{err}"
    );
    let err = fails(&outrun(
        &db,
        &["events", "list", "--cursor", "not-a-cursor"],
    ));
    assert!(
        err.contains("--cursor") && err.contains("not a cursor outrun printed"),
        "{err}"
    );
    let out = outrun(&db, &["events", "list", "--dead", "--limit", "1"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let dead_cursor = stderr
        .split("--cursor ")
        .nth(1)
        .expect("a next page")
        .trim();
    let err = fails(&outrun(&db, &["events", "list", "--cursor", dead_cursor]));
    assert!(
        err.contains("--cursor belongs to a listing of dead events"),
        "{err}"
    );
    let err = fails(&outrun(
        &db,
        &["events", "list", "--dead", "--state", "live"],
    ));
    assert!(err.contains("--dead") && err.contains("--state"), "{err}");
    let err = fails(&outrun(&db, &["events", "list", "--limit", "0"]));
    assert!(err.contains("--limit"), "{err}");
}

async fn stats_by_name(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    enqueue_id(&db, &["alpha", "--payload", "{}"]);
    let doomed = enqueue_id(&db, &["alpha", "--payload", "{}"]);
    enqueue_id(&db, &["beta", "--payload", "{}", "--delay", "1h"]);
    ok(&outrun(&db, &["events", "cancel", &doomed]));
    let v = json(&outrun(&db, &["events", "stats", "--by-name", "--json"]));
    assert_eq!(
        (v["pending"].as_i64(), v["dead"].as_i64()),
        (Some(1), Some(1)),
        "{v}"
    );
    let by = v["by_name"].as_array().expect("by_name array");
    assert_eq!(by.len(), 2, "{v}");
    assert_eq!(
        (
            by[0]["name"].as_str(),
            by[0]["pending"].as_i64(),
            by[0]["scheduled"].as_i64(),
            by[0]["dead"].as_i64()
        ),
        (Some("alpha"), Some(1), Some(0), Some(1))
    );
    assert_eq!(
        (
            by[1]["name"].as_str(),
            by[1]["pending"].as_i64(),
            by[1]["scheduled"].as_i64(),
            by[1]["dead"].as_i64()
        ),
        (Some("beta"), Some(0), Some(1), Some(0))
    );
    // live = pending + scheduled + running: "is every event of a name handled?"
    assert_eq!(
        (
            by[0]["live"].as_i64(),
            by[1]["live"].as_i64(),
            v["live"].as_i64()
        ),
        (Some(1), Some(1), Some(2)),
        "{v}"
    );
    let text = ok(&outrun(&db, &["events", "stats", "--by-name"]));
    let alpha = text.lines().find(|l| l.starts_with("alpha")).expect(&text);
    assert_eq!(
        alpha.split_whitespace().take(6).collect::<Vec<_>>(),
        ["alpha", "1", "1", "0", "0", "1"],
        "{text}"
    );
    // Without --by-name, the JSON is as before.
    assert!(stats(&db).get("by_name").is_none());
}

// --------------------------------------------- wrong directory, no database

/// `outrun ARGS` in `cwd` with no database or config from the environment.
fn outrun_in(cwd: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outrun"));
    c.current_dir(cwd)
        .args(args)
        .env_remove("OUTRUN_DATABASE_URL")
        .env_remove("OUTRUN_CONFIG")
        .env_remove("OUTRUN_LOG_FORMAT");
    c
}

#[test]
fn commands_outside_the_database_directory_create_nothing() {
    let cwd = tempfile::tempdir().unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    for args in [
        &["events", "list"][..],
        &["events", "stats"],
        &["events", "stats", "--by-name", "--json"],
        &["events", "show", &id],
        &["events", "replay", "--all-dead"],
        &["events", "purge", "--dead"],
        &["enqueue", "x", "--payload", "{}"],
    ] {
        let out = outrun_in(cwd.path(), args).output().unwrap();
        let err = fails(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let expected = cwd.path().canonicalize().unwrap().join("outrun.db");
        assert!(
            err.contains(&expected.display().to_string())
                || err.contains(&cwd.path().join("outrun.db").display().to_string()),
            "{args:?} names the file it tried: {err}"
        );
        assert!(
            err.contains("--database") && err.contains("OUTRUN_DATABASE_URL"),
            "{args:?} says how to choose: {err}"
        );
        assert!(err.contains("the default"), "{args:?}: {err}");
        let left: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
        assert!(left.is_empty(), "{args:?} created {left:?}");
    }
    // An explicit URL to a missing file: the same, without "the default".
    let url = format!("sqlite://{}?mode=rwc", cwd.path().join("app.db").display());
    let err = fails(
        &outrun_in(cwd.path(), &["events", "stats", "--database", &url])
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("app.db") && !err.contains("the default"),
        "{err}"
    );
    assert!(std::fs::read_dir(cwd.path()).unwrap().next().is_none());
    // migrate creates it.
    ok(&outrun_in(cwd.path(), &["migrate"]).output().unwrap());
    assert!(cwd.path().join("outrun.db").exists());
    ok(&outrun_in(cwd.path(), &["events", "stats"])
        .output()
        .unwrap());
}

// ------------------------------------------------- artifact cache location

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn handler_commands_write_nothing_beside_the_config() {
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("conf");
    let cwd = root.path().join("cwd");
    let xdg = root.path().join("xdg");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::copy(common::guest("probe"), conf.join("probe.wasm")).unwrap();
    let config = conf.join("outrun.toml");
    std::fs::write(
        &config,
        "[[handler]]\nname = \"probe\"\nmodule = \"probe.wasm\"\nevents = [\"probe.echo\"]\n",
    )
    .unwrap();
    let run = |args: &[&str], xdg: &std::path::Path| {
        outrun_in(&cwd, args)
            .env_remove("OUTRUN_CACHE_DIR")
            .env("XDG_CACHE_HOME", xdg)
            .env("HOME", root.path().join("home"))
            .output()
            .unwrap()
    };
    let config_arg = config.to_str().unwrap();
    let out = run(
        &["handlers", "list", "--config", config_arg, "--json"],
        &xdg,
    );
    let list: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(list[0]["name"], "probe");
    assert_eq!(files_in(&conf), ["outrun.toml", "probe.wasm"]);
    assert!(files_in(&cwd).is_empty(), "no database either");
    let cached = files_in(&xdg.join("outrun"));
    assert!(
        cached.iter().any(|f| f.ends_with(".cwasm")),
        "the artifact is in $XDG_CACHE_HOME/outrun: {cached:?}"
    );
    ok(&run(
        &[
            "handlers",
            "check",
            conf.join("probe.wasm").to_str().unwrap(),
        ],
        &xdg,
    ));
    assert_eq!(files_in(&conf), ["outrun.toml", "probe.wasm"]);

    // A cache that cannot be written (its parent is a file): a warning, once.
    let blocker = root.path().join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    let out = run(
        &["handlers", "list", "--config", config_arg],
        &blocker.join("sub"),
    );
    let listing = ok(&out);
    assert!(listing.contains("probe"), "{listing}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("cannot write compiled artifacts").count(),
        1,
        "one warning: {err}"
    );
    assert_eq!(files_in(&conf), ["outrun.toml", "probe.wasm"]);

    // cache_dir in the config still chooses (relative to the config file).
    std::fs::write(
        &config,
        "cache_dir = \"../artifacts\"\n[[handler]]\nname = \"probe\"\nmodule = \"probe.wasm\"\nevents = [\"probe.echo\"]\n",
    )
    .unwrap();
    ok(&run(&["handlers", "list", "--config", config_arg], &xdg));
    assert!(
        files_in(&root.path().join("artifacts"))
            .iter()
            .any(|f| f.ends_with(".cwasm"))
    );
}

// ------------------------------------------------------------ broken pipe

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, Read};
    let db = TestDb::sqlite();
    ok(&outrun(&db, &["migrate"]));
    let lines: String = (0..3000)
        .map(|i| format!("{{\"name\":\"bulk.{i}\",\"payload\":{{\"i\":{i}}}}}\n"))
        .collect();
    ok(&outrun_stdin(
        &db,
        &["enqueue", "--ndjson", "-"],
        lines.as_bytes(),
    ));
    for args in [
        &["events", "list", "--limit", "3000"][..],
        &["events", "list", "--limit", "3000", "--json"],
    ] {
        let mut child = common::outrun_command(&db)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // `| head -c 100`: read a little, then close the pipe.
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 100];
        stdout.read_exact(&mut first).unwrap();
        drop(stdout);
        let mut err = String::new();
        std::io::BufReader::new(child.stderr.take().unwrap())
            .lines()
            .for_each(|l| err.push_str(&l.unwrap()));
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}: {status}; stderr: {err}");
        assert!(err.is_empty(), "{args:?}: nothing on stderr, got {err}");
    }
}

// ------------------------------------------------------- error messages

#[test]
fn error_chains_name_each_cause_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["events", "stats", "--config", "/nonexistent/outrun.toml"])
        .output()
        .unwrap();
    let err = fails(&out);
    assert!(err.contains("/nonexistent/outrun.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");

    // An SQLite file without the outbox table.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.db");
    std::fs::write(&file, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["events", "stats", "--database"])
        .arg(format!("sqlite://{}", file.display()))
        .output()
        .unwrap();
    let err = fails(&out);
    assert!(err.contains("run `outrun migrate` first"), "{err}");
    assert_eq!(err.matches("no such table").count(), 1, "{err}");
}

#[test]
fn refused_connection_fails_at_once_with_the_cause() {
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args([
            "events",
            "stats",
            "--database",
            "postgres://app:s3cret@127.0.0.1:1/app",
        ])
        .env_remove("OUTRUN_LOG_FORMAT")
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let err = fails(&out);
    assert!(
        elapsed < std::time::Duration::from_secs(2),
        "took {elapsed:?}: {err}"
    );
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
    assert!(
        !err.contains("pool timed out") && !err.contains("s3cret"),
        "{err}"
    );
    assert_eq!(err.matches("127.0.0.1:1").count(), 1, "the URL once: {err}");
}

#[test]
fn json_logs_make_the_fatal_error_a_json_line() {
    let check = |out: Output, needle: &str| {
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let line: Value = serde_json::from_str(err.trim_end())
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {err}"));
        assert_eq!(line["level"], "ERROR", "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
        let message = line["message"].as_str().unwrap();
        assert!(message.to_lowercase().contains(needle), "{line}");
    };
    check(
        Command::new(env!("CARGO_BIN_EXE_outrun"))
            .args(["events", "stats", "--log-format", "json", "--database"])
            .arg("postgres://127.0.0.1:1/app")
            .output()
            .unwrap(),
        "connection refused",
    );
    // Before the config is read: the format comes from the environment.
    check(
        Command::new(env!("CARGO_BIN_EXE_outrun"))
            .args(["events", "stats", "--config", "/nonexistent/outrun.toml"])
            .env("OUTRUN_LOG_FORMAT", "json")
            .output()
            .unwrap(),
        "/nonexistent/outrun.toml",
    );
}

/// JSON log lines of serve: the handler's events as one string, a line when
/// claiming works again after an outage, and `running` counting handlers.
async fn serve_logs_in_json(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(common::guest("probe"), dir.path().join("probe.wasm")).unwrap();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        "[log]\nformat = \"json\"\n[runtime]\nconcurrency = 4\n\n[[handler]]\nname = \"probe\"\nmodule = \"probe.wasm\"\nevents = [\"probe.echo\", \"probe.trap\"]\n",
    )
    .unwrap();
    let serve = common::Serve::ready(&db, &config).await;
    let lines = |log: &str, message: &str| -> Vec<Value> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(message)))
            .collect()
    };
    // Serve routes while its handlers compile: the line may follow
    // "dispatch loop started".
    wait_for("the handler loaded", || async {
        !lines(&serve.log(), "handler loaded").is_empty()
    })
    .await;
    let loaded = lines(&serve.log(), "handler loaded");
    assert_eq!(loaded.len(), 1, "{}", serve.log());
    assert_eq!(
        loaded[0]["events"], "probe.echo,probe.trap",
        "{}",
        loaded[0]
    );

    // An outage of the outbox table: claims fail, then work again.
    db.exec("ALTER TABLE outbox_events RENAME TO outbox_events_away")
        .await;
    wait_for("a failed claim", || async {
        !lines(&serve.log(), "claiming events failed").is_empty()
    })
    .await;
    db.exec("ALTER TABLE outbox_events_away RENAME TO outbox_events")
        .await;
    wait_for("claims working again", || async {
        !lines(&serve.log(), "claiming events works again").is_empty()
    })
    .await;
    let back = lines(&serve.log(), "claiming events works again");
    assert_eq!(back.len(), 1, "one line per recovery: {back:?}");
    assert!(back[0]["failures"].as_i64() >= Some(1), "{}", back[0]);

    let log = serve.stop();
    let down = lines(&log, "shutting down: no new claims");
    assert_eq!(down.len(), 1, "{log}");
    assert_eq!(
        down[0]["running"], 0,
        "no handler was running (4 worker slots): {}",
        down[0]
    );
}

// ---------------------------------------------------- help and completions

#[test]
fn help_explains_every_option_with_examples_and_completions_exist() {
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // Every option and argument has a line of help after it.
    for cmd in [
        &["events", "list", "--help"][..],
        &["events", "stats", "--help"],
        &["events", "show", "--help"],
        &["events", "replay", "--help"],
        &["events", "cancel", "--help"],
        &["events", "purge", "--help"],
        &["handlers", "list", "--help"],
        &["handlers", "check", "--help"],
        &["handlers", "compile", "--help"],
        &["enqueue", "--help"],
        &["migrate", "--help"],
    ] {
        let text = help(cmd);
        assert!(text.contains("Examples:"), "{cmd:?}:\n{text}");
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let indent = line.len() - t.len();
            let is_item = (2..=6).contains(&indent)
                && (t.starts_with("--")
                    || t.starts_with('<')
                    || t.starts_with('[')
                    || t.starts_with("-c"));
            if is_item && !t.starts_with("-h") {
                // Help on the same line after the name, or on the next.
                let own = t.split_once("  ").map(|(_, h)| h.trim());
                let next = lines.get(i + 1).map_or("", |l| l.trim());
                assert!(
                    own.is_some_and(|h| !h.is_empty())
                        || (!next.is_empty() && !next.starts_with('-') && !next.starts_with('<')),
                    "{cmd:?}: no help for `{t}`:\n{text}"
                );
            }
        }
    }
    assert!(help(&["--help"]).contains("Examples:"));
    assert!(help(&["events", "list", "--help"]).contains("Most events to list"));
    assert!(help(&["events", "show", "--help"]).contains("UUID"));

    let bash = help(&["completions", "bash"]);
    assert!(
        bash.contains("_outrun") && bash.contains("enqueue"),
        "{bash}"
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        assert!(help(&["completions", shell]).contains("outrun"), "{shell}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

// ------------------------------------------------------------ admin limits

/// A raw `POST /v1/events` with the given headers; (status, body). The
/// response is read while the body is still being sent: a server refusing
/// a large body answers before reading it all, then closes.
async fn http_raw(port: u16, head: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut rx, mut tx) = s.into_split();
    let mut req = format!(
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\n{head}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let writer = tokio::spawn(async move {
        let _ = tx.write_all(&req).await;
        tx
    });
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Until the head and its Content-Length of body are in.
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if rest.len() >= len {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                writer.abort();
                return (status, rest.to_string());
            }
        }
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    panic!("incomplete response: {:?}", String::from_utf8_lossy(&raw));
}

#[tokio::test]
async fn admin_api_refuses_oversized_and_non_json_bodies() {
    let db = TestDb::sqlite();
    ok(&outrun(&db, &["migrate"]));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    /// Killed if the test fails before it stops it.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut serve = Child(
        Command::new(env!("CARGO_BIN_EXE_outrun"))
            .args(["serve", "--admin", &format!("127.0.0.1:{port}")])
            .env("OUTRUN_DATABASE_URL", db.url())
            .env("OUTRUN_ADMIN_TOKEN", TOKEN)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("admin server up", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let json_type = "Content-Type: application/json\r\n";
    let event = |payload_len: usize| {
        format!(
            "{{\"name\":\"x\",\"payload\":\"{}\",\"delay\":\"1h\"}}",
            "x".repeat(payload_len)
        )
        .into_bytes()
    };
    // Payload just over the limit (body under the body limit).
    let (status, body) = http_raw(port, json_type, &event(1024 * 1024 + 10)).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("1048576"), "{body}");
    // A body far over the limit.
    let (status, body) = http_raw(port, json_type, &event(3 * 1024 * 1024)).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("1048576"), "{body}");
    // No or another content type.
    let (status, body) = http_raw(port, "", &event(10)).await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("application/json"), "{body}");
    let (status, _) = http_raw(port, "Content-Type: text/plain\r\n", &event(10)).await;
    assert_eq!(status, 415);
    // Under the limit: fine.
    let (status, body) = http_raw(port, json_type, &event(1000 * 1024)).await;
    assert_eq!(status, 201, "{body}");
    terminate(&mut serve.0);
    assert_eq!(live_and_dead(&db), 1);
}
