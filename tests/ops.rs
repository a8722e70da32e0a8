//! `outrun serve` in someone else's ops stack, through the real binary:
//! every catchable stop signal is a graceful shutdown that leaves no lease
//! behind; `/livez` and `/readyz` answer without counting the table and say
//! why when not ready; `/metrics` passes `promtool check metrics`, with HELP
//! on every metric, the serving handler versions only, and no outbox counts
//! while the database is gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Serve, TestDb, free_port, guest, http, wait_for};
use serde_json::Value;

fn write_config(dir: &Path, admin: u16, extra_runtime: &str) -> PathBuf {
    // A copy of the probe, so a test can replace it (hot reload) without
    // touching the shared build.
    let module = dir.join("probe.wasm");
    std::fs::copy(guest("probe"), &module).unwrap();
    let path = dir.join("outrun.toml");
    std::fs::write(
        &path,
        format!(
            r#"[runtime]
{extra_runtime}

[admin]
listen = "127.0.0.1:{admin}"

[[handler]]
name = "probe"
events = ["probe.sleep", "probe.echo", "probe.fail", "probe.flaky", "probe.emit"]
module = "{module}"
timeout = "60s"
[handler.allow]
emit = ["probe.echo"]
"#,
            module = module.display(),
        ),
    )
    .unwrap();
    path
}

async fn insert(db: &TestDb, name: &str, payload: &str, n: i64) {
    db.exec(&format!(
        "INSERT INTO outbox_events (name, payload) SELECT '{name}', '{payload}' FROM ({}) g",
        series(db, n)
    ))
    .await;
}

/// A `FROM` item with `n` rows on either backend.
fn series(db: &TestDb, n: i64) -> String {
    if db.is_postgres() {
        format!("SELECT generate_series(1, {n}) AS i")
    } else {
        format!(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) SELECT i FROM s"
        )
    }
}

async fn leased(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM outbox_events WHERE locked_by IS NOT NULL")
        .await
}

/// Run busy handlers with more events leased in the queue, send `signal`,
/// and check: not ready while stopping, exit 0, a log line naming the
/// signal, and not one lease left.
async fn stop_with(db: TestDb, signal: &str) {
    db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let config = write_config(
        dir.path(),
        admin,
        "concurrency = 4\nbatch_size = 8\nshutdown_grace = \"3s\"",
    );
    // Events outlast the grace period, so stopping interrupts them.
    insert(&db, "probe.sleep", r#"{"ms":8000}"#, 40).await;
    let serve = Serve::ready(&db, &config).await;
    wait_for(
        "4 running and more queued events to hold leases",
        || async { leased(&db).await >= 8 },
    )
    .await;
    let held = leased(&db).await;
    serve.send(signal);
    // Within the grace period the process still answers, and is not ready
    // (the signal arrives asynchronously: poll within the grace period; a
    // loaded CI machine once took over 1 s to show it).
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2500);
    let mut seen = Vec::new();
    let body = loop {
        let (status, body) = http(admin, "GET", "/readyz", None).await;
        if status == 503 {
            break Some(body);
        }
        seen.push(status);
        if tokio::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (status, log) = serve.wait();
    let Some(body) = body else {
        seen.dedup();
        panic!(
            "/readyz never said 503 while stopping (statuses seen: {seen:?}); serve exited {status}; log:\n{log}"
        );
    };
    assert!(body.contains("shutting down"), "{body}");
    assert!(
        status.success(),
        "serve must exit 0 on SIG{signal}, got {status}; log:\n{log}"
    );
    assert!(
        log.contains(&format!("SIG{signal} received: shutting down gracefully")),
        "no log line names SIG{signal}:\n{log}"
    );
    assert_eq!(
        leased(&db).await,
        0,
        "SIG{signal} left leases behind ({held} were held); log:\n{log}"
    );
    // The events that did not finish are still there to run again.
    assert!(db.scalar("SELECT count(*) FROM outbox_events").await > 0);
}

async fn sighup_stops_gracefully_and_releases_every_lease(db: TestDb) {
    stop_with(db, "HUP").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_stops_gracefully_and_releases_every_lease() {
    stop_with(TestDb::sqlite(), "QUIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_gracefully_and_releases_every_lease() {
    stop_with(TestDb::sqlite(), "INT").await;
}

/// `nohup outrun serve`: SIGHUP stays ignored, the runtime keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_left_ignored_under_nohup() {
    let db = TestDb::sqlite();
    db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), free_port(), "");
    let log_path = dir.path().join("serve.log");
    let mut child = Command::new("nohup")
        .arg(env!("CARGO_BIN_EXE_outrun"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--database", db.url()])
        .envs(common::FAST_ENV)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("run nohup");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for("serve under nohup to start", || async {
        log().contains("dispatch loop started")
    })
    .await;
    assert!(log().contains("SIGHUP is ignored (nohup)"), "{}", log());
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    insert(&db, "probe.echo", "{}", 1).await;
    wait_for("an event enqueued after SIGHUP to run", || async {
        db.scalar("SELECT count(*) FROM outbox_events").await == 0
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped serve");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}; log:\n{}", log());
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `/livez`, `/readyz` and `/healthz` answer 200 with JSON while serving;
/// `/readyz` says 503 when the schema lags behind the binary.
async fn probes_answer_while_serving(db: TestDb) {
    db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let serve = Serve::ready(&db, &write_config(dir.path(), admin, "")).await;
    let (status, body) = http(admin, "GET", "/livez", None).await;
    assert_eq!(
        (status, json(&body)["status"].as_str()),
        (200, Some("alive"))
    );
    for path in ["/readyz", "/healthz"] {
        let (status, body) = http(admin, "GET", path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        let v = json(&body);
        assert_eq!(
            (
                v["status"].as_str(),
                v["database"].as_str(),
                v["handlers"].as_i64()
            ),
            (Some("ready"), Some("ok"), Some(1)),
            "{path}: {body}"
        );
    }
    // A schema behind this binary's migrations (as after `--no-migrate`
    // against an old database) is not ready, and says what to run.
    db.exec(
        "DELETE FROM outrun_migrations WHERE version = (SELECT max(version) FROM outrun_migrations)",
    )
    .await;
    let (status, body) = http(admin, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    let reason = json(&body)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.starts_with("database not migrated") && reason.contains("run `outrun migrate`"),
        "{body}"
    );
    serve.stop();
}

/// A database that goes away: `/readyz` says so (503, JSON reason), while
/// `/livez` stays 200 and the metrics show `outrun_db_up 0` and no counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_with_a_reason_when_the_database_is_gone() {
    let db = TestDb::postgres().await;
    db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let _serve = Serve::ready(&db, &write_config(dir.path(), admin, "")).await;
    wait_for("the outbox gauges", || async {
        let (_, body) = http(admin, "GET", "/metrics", None).await;
        body.contains("\noutrun_events_pending 0\n") && body.contains("\noutrun_db_up 1\n")
    })
    .await;

    let TestDb::Postgres {
        admin_url, name, ..
    } = &db
    else {
        unreachable!()
    };
    let mut pg = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url)
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut pg)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let (status, body) = http(admin, "GET", "/readyz", None).await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    let v = json(&body);
    assert_eq!(v["status"].as_str(), Some("not ready"), "{body}");
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("database"), "{body}");
    assert!(took < Duration::from_secs(2), "readyz took {took:?}");
    let (status, _) = http(admin, "GET", "/livez", None).await;
    assert_eq!(status, 200, "livez must not depend on the database");
    let (status, body) = http(admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("\noutrun_db_up 0\n"), "{body}");
    for gone in [
        "outrun_events_pending",
        "outrun_events_dead",
        "outrun_oldest_pending_age_seconds",
    ] {
        assert!(
            !body.contains(&format!("\n{gone} ")),
            "{gone} still exposed while the database is gone:\n{body}"
        );
    }
}

/// `promtool check metrics` on `text`; fails loudly if promtool is missing.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is needed to check the /metrics exposition but cannot run ({e}); \
                 install it with `apt-get install -y prometheus` (.ci/run does when it is missing)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics failed ({}):\n{said}\non:\n{text}",
        out.status
    );
}

/// The series lines of `name` (not its HELP/TYPE lines).
fn series_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_follow_reloads() {
    let db = TestDb::sqlite();
    db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let config = write_config(dir.path(), admin, "");
    let serve = Serve::ready(&db, &config).await;
    let short =
        |wasm: &Path| blake3::hash(&std::fs::read(wasm).unwrap()).to_hex()[..12].to_string();
    let v1 = short(&guest("probe"));

    // Before any event or reload: the version serving, the build, the database.
    let (status, text) = http(admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        series_of(&text, "outrun_handler_version"),
        vec![format!(r#"outrun_handler_version{{handler="probe",version="{v1}"}} 1"#).as_str()],
        "{text}"
    );
    assert_eq!(
        series_of(&text, "outrun_build_info"),
        vec![
            format!(
                r#"outrun_build_info{{version="{}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            )
            .as_str()
        ]
    );
    promtool_check(&text);

    // Every kind of outcome, so most families are exposed.
    let store = db.connect().await;
    let events = [
        ("probe.echo", "{}".to_string()),
        ("probe.fail", r#"{"message":"no","retryable":false}"#.into()),
        ("probe.flaky", r#"{"succeed_on_attempt":2}"#.into()),
        ("probe.emit", r#"{"name":"probe.echo","payload":{}}"#.into()),
        ("nobody.home", "{}".into()),
    ];
    for (name, payload) in &events {
        store
            .enqueue(&outrun::NewEvent::new(*name, payload.clone()), 5)
            .await
            .unwrap();
    }
    wait_for("every event to be done or dead", || async {
        db.scalar("SELECT count(*) FROM outbox_events WHERE retry < max_retry")
            .await
            == 0
    })
    .await;

    // A hot reload replaces the version series instead of adding one.
    let module = dir.path().join("probe.wasm");
    let staged = dir.path().join("probe.wasm.new");
    std::fs::copy(guest("probe_v2"), &staged).unwrap();
    std::fs::rename(&staged, &module).unwrap();
    let v2 = short(&module);
    wait_for("the reload", || async {
        serve.log().contains(&format!("-> {v2}"))
    })
    .await;
    wait_for("the outbox gauges", || async {
        http(admin, "GET", "/metrics", None)
            .await
            .1
            .contains("\noutrun_events_dead 2\n")
    })
    .await;

    let (_, text) = http(admin, "GET", "/metrics", None).await;
    std::fs::write(dir.path().join("metrics.txt"), &text).unwrap();
    promtool_check(&text);
    assert_eq!(
        series_of(&text, "outrun_handler_version"),
        vec![format!(r#"outrun_handler_version{{handler="probe",version="{v2}"}} 1"#).as_str()],
        "only the serving version, after a reload:\n{text}"
    );
    // HELP on every family, and the ones this run must have produced.
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for f in &families {
        assert!(
            text.contains(&format!("# HELP {f} ")),
            "{f} has no HELP:\n{text}"
        );
    }
    for expected in [
        "outrun_build_info",
        "outrun_db_up",
        "outrun_handler_version",
        "outrun_events_pending",
        "outrun_events_scheduled",
        "outrun_events_running",
        "outrun_events_dead",
        "outrun_oldest_pending_age_seconds",
        "outrun_claimed_total",
        "outrun_events_handled_total",
        "outrun_events_failed_total",
        "outrun_events_dead_total",
        "outrun_acks_total",
        "outrun_effects_commit_events",
        "outrun_handler_duration_seconds",
        "outrun_handler_reloads_total",
        "outrun_handler_reload_seconds",
    ] {
        assert!(families.contains(&expected), "{expected} missing:\n{text}");
    }
    assert!(text.contains("\noutrun_db_up 1\n"), "{text}");
    serve.stop();
}

on_both_backends!(
    sighup_stops_gracefully_and_releases_every_lease,
    probes_answer_while_serving,
);
