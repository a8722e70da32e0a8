//! Event contracts end to end: the real `outrun` binary with `[schemas]` on
//! the shipped schemas (examples/schemas/), on SQLite and PostgreSQL. Every
//! entry point refuses a payload that breaks its schema (CLI enqueue, single
//! and NDJSON; the admin API; the Rust API; a handler's `emit`) and writes
//! nothing; a row inserted by plain SQL is dead before its handler runs,
//! with `last_error` starting `schema:`. `outrun schemas list|check` and
//! the bad schema files they report are here too.

mod common;

use std::path::{Path, PathBuf};

use common::{
    Serve, TestDb, fails, free_port, guest, http_as, ok, outrun, outrun_command, wait_for,
};

/// The admin token of the serve this file starts.
const TOKEN: &str = "test-admin-token";
use outrun::{NewEvent, Schemas, StoreError};
use serde_json::{Value, json};

/// The schemas shipped with the example config.
fn shipped_schemas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/schemas")
}

const EVENT_ID: &str = "90a91f4b-8e34-4a3c-bfc8-f6649597445e";

/// A valid `TaskSolved.v0` (the seed's example, with its event_version).
fn task_solved() -> Value {
    json!({
        "event_id": EVENT_ID,
        "event_name": "TaskSolved",
        "event_version": "0",
        "produced_at": "2025-02-13T17:11:30Z",
        "payload": {"task_uid": "uidf9g94ghiure", "task_manager_uid": "fihij8v4rei"}
    })
}

/// Each bad input of the issue: the payload, and what the error must name
/// (JSON pointer, keyword).
fn bad_payloads() -> Vec<(&'static str, Value, &'static str, &'static str)> {
    let mut missing = task_solved();
    missing["payload"]
        .as_object_mut()
        .unwrap()
        .remove("task_manager_uid");
    let mut extra = task_solved();
    extra["payload"]["bonus"] = json!(100);
    let mut date = task_solved();
    date["produced_at"] = json!("13.02.2025 17:11");
    let mut other = task_solved();
    other["event_name"] = json!("NewCandidate");
    let mut uuid = task_solved();
    uuid["event_id"] = json!("not-a-uuid");
    vec![
        ("missing field", missing, "\"/payload\"", "`required`"),
        (
            "extra field",
            extra,
            "\"/payload\"",
            "`additionalProperties`",
        ),
        ("bad date-time", date, "\"/produced_at\"", "`format`"),
        ("other event's name", other, "\"/event_name\"", "`enum`"),
        ("bad uuid", uuid, "\"/event_id\"", "`format`"),
    ]
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("outrun.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn schemas_section(dir: &Path, required: bool) -> String {
    format!(
        "[schemas]\ndir = {:?}\nrequired = {required}\n",
        dir.display().to_string()
    )
}

/// `outrun --config CONFIG ARGS` against `db`.
fn outrun_with(db: &TestDb, config: &Path, args: &[&str]) -> std::process::Output {
    outrun_command(db)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

async fn live_and_dead(db: &TestDb) -> (i64, i64) {
    let out = ok(&outrun(db, &["events", "stats", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let n = |k: &str| v[k].as_i64().unwrap();
    (n("pending") + n("scheduled") + n("running"), n("dead"))
}

/// An event as another application's plain SQL would insert it.
async fn insert_raw(db: &TestDb, name: &str, payload: &str) -> String {
    let id = uuid::Uuid::now_v7();
    let payload = payload.replace('\'', "''");
    if db.is_postgres() {
        db.exec(&format!(
            "INSERT INTO outbox_events (id, name, payload) VALUES ('{id}', '{name}', '{payload}')"
        ))
        .await;
    } else {
        let now = chrono::Utc::now().timestamp_millis();
        db.exec(&format!(
            "INSERT INTO outbox_events (id, create_date, name, payload, available_at)
             VALUES ('{id}', {now}, '{name}', '{payload}', {now})"
        ))
        .await;
    }
    id.to_string()
}

fn dead_errors(db: &TestDb) -> Vec<(String, String, String)> {
    let out = ok(&outrun(db, &["events", "list", "--dead", "--json"]));
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["name"].as_str().unwrap().to_owned(),
                r["last_error"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// schemas list / check

#[test]
fn schemas_list_shows_the_shipped_schemas_with_versions_and_bindings() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "{}\n[[handler]]\nname = \"bonus-accrual\"\nmodule = \"x.wasm\"\nevents = [\"TaskSolved.v0\", \"TaskSolved.v1\"]\n",
            schemas_section(&shipped_schemas(), true)
        ),
    );
    let db = TestDb::sqlite();
    let out = ok(&outrun_with(&db, &config, &["schemas", "list", "--json"]));
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = list.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "ManagerUpdated.v0",
            "NewCandidate.v0",
            "TaskSolved.v0",
            "TaskSolved.v1"
        ]
    );
    let v1 = &list[3];
    assert_eq!(v1["event"], "TaskSolved");
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["draft"], "draft-07");
    assert_eq!(v1["handlers"], json!(["bonus-accrual"]));
    let text = ok(&outrun_with(&db, &config, &["schemas", "list"]));
    assert!(
        text.lines()
            .any(|l| l.starts_with("TaskSolved.v0") && l.contains("bonus-accrual")),
        "{text}"
    );
    let check = ok(&outrun_with(&db, &config, &["schemas", "check"]));
    assert!(check.starts_with("ok: 4 schema(s)"), "{check}");
}

#[test]
fn schemas_check_names_each_bad_file_and_keyword() {
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    // The seed's NewCandidate as written: a comma is missing.
    std::fs::write(
        schemas.join("NewCandidate.v0.json"),
        r#"{"type": "object", "required": ["event_id", "event_version" "produced_at"]}"#,
    )
    .unwrap();
    std::fs::write(
        schemas.join("TaskSolved.v0.json"),
        r#"{"$schema": "http://json-schema.org/draft-07/schema#", "properties": {"event_id": {"type": "uuid"}}}"#,
    )
    .unwrap();
    std::fs::write(schemas.join("Fine.v0.json"), r#"{"type": "object"}"#).unwrap();
    let config = write_config(
        dir.path(),
        "[schemas]\ndir = \"schemas\"\nrequired = true\n\n[[handler]]\nname = \"h\"\nmodule = \"x.wasm\"\nevents = [\"Fine.v0\", \"TaskSolved.v7\"]\n",
    );
    let db = TestDb::sqlite();
    let out = outrun_with(&db, &config, &["schemas", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    let line = |needle: &str| {
        err.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line about {needle}:\n{err}"))
            .to_owned()
    };
    assert!(
        line("NewCandidate.v0.json").contains("is not JSON"),
        "{err}"
    );
    let bad = line("TaskSolved.v0.json");
    assert!(
        bad.contains("not a valid JSON Schema")
            && bad.contains("/properties/event_id/type")
            && bad.contains("`type`"),
        "{bad}"
    );
    let unbound = line("TaskSolved.v7");
    assert!(
        unbound.contains("handler h") && unbound.contains("required"),
        "{unbound}"
    );
    assert!(err.contains("3 problem(s)"), "{err}");

    // serve refuses to start on them, naming the first bad file.
    let out = outrun_with(&db, &config, &["serve"]);
    let err = fails(&out);
    assert!(err.contains("NewCandidate.v0.json"), "{err}");

    // Without a directory there is nothing to list.
    let bare = write_config(dir.path(), "");
    let err = fails(&outrun_with(&db, &bare, &["schemas", "list"]));
    assert!(err.contains("[schemas] dir"), "{err}");
}

// ---------------------------------------------------------------------------
// CLI enqueue

async fn cli_enqueue_checks_payloads(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &schemas_section(&shipped_schemas(), false));
    let good = task_solved().to_string();
    ok(&outrun_with(
        &db,
        &config,
        &["enqueue", "TaskSolved.v0", "--payload", &good],
    ));
    for (what, payload, pointer, keyword) in bad_payloads() {
        let err = fails(&outrun_with(
            &db,
            &config,
            &[
                "enqueue",
                "TaskSolved.v0",
                "--payload",
                &payload.to_string(),
            ],
        ));
        assert!(
            err.contains("TaskSolved.v0") && err.contains(pointer) && err.contains(keyword),
            "{what}: {err}"
        );
    }
    // Names without a schema pass while schemas are not required.
    ok(&outrun_with(
        &db,
        &config,
        &["enqueue", "order.created", "--payload", "{}"],
    ));

    // NDJSON: one bad line and nothing of the batch is written.
    let mut bad = task_solved();
    bad["produced_at"] = json!("yesterday");
    let lines = [
        json!({"name": "TaskSolved.v0", "payload": task_solved()}),
        json!({"name": "TaskSolved.v0", "payload": bad}),
        json!({"name": "TaskSolved.v0", "payload": task_solved()}),
    ];
    let file = dir.path().join("batch.ndjson");
    std::fs::write(
        &file,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let err = fails(&outrun_with(
        &db,
        &config,
        &["enqueue", "--ndjson", file.to_str().unwrap()],
    ));
    assert!(
        err.contains("line 2") && err.contains("\"/produced_at\"") && err.contains("`format`"),
        "{err}"
    );
    assert_eq!(
        live_and_dead(&db).await,
        (2, 0),
        "only the two good single enqueues"
    );

    // Required: a version without a schema is refused.
    let required = write_config(dir.path(), &schemas_section(&shipped_schemas(), true));
    let err = fails(&outrun_with(
        &db,
        &required,
        &["enqueue", "TaskSolved.v7", "--payload", &good],
    ));
    assert!(
        err.contains("TaskSolved.v7") && err.contains("no schema") && err.contains("required"),
        "{err}"
    );
    assert_eq!(live_and_dead(&db).await, (2, 0));
}

// ---------------------------------------------------------------------------
// Rust API

async fn rust_api_checks_payloads(db: TestDb) {
    let schemas = std::sync::Arc::new(Schemas::load(&shipped_schemas(), false).unwrap());
    let store = db.store().await.with_schemas(Some(schemas.clone()));
    store
        .enqueue(
            &NewEvent::new("TaskSolved.v0", task_solved().to_string()),
            5,
        )
        .await
        .unwrap();
    for (what, payload, pointer, keyword) in bad_payloads() {
        let err = store
            .enqueue(&NewEvent::new("TaskSolved.v0", payload.to_string()), 5)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{what}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(pointer) && text.contains(keyword),
            "{what}: {text}"
        );
    }
    // A batch with one bad event writes nothing.
    let mut bad = task_solved();
    bad["payload"]["x"] = json!(1);
    let batch = [
        NewEvent::new("TaskSolved.v0", task_solved().to_string()),
        NewEvent::new("TaskSolved.v0", bad.to_string()),
    ];
    assert!(store.enqueue_batch(&batch, 5).await.is_err());
    // Inside the application's own transaction.
    let err = match &store {
        outrun::Store::Sqlite(s) => {
            let mut c = s.pool().acquire().await.unwrap();
            outrun::enqueue_checked::<sqlx::Sqlite>(&mut *c, &batch[1], &schemas).await
        }
        outrun::Store::Postgres(s) => {
            let mut c = s.pool().acquire().await.unwrap();
            outrun::enqueue_checked::<sqlx::Postgres>(&mut *c, &batch[1], &schemas).await
        }
    }
    .unwrap_err();
    assert!(err.to_string().contains("additionalProperties"), "{err}");
    assert_eq!(store.stats().await.unwrap().pending, 1);
}

// ---------------------------------------------------------------------------
// Admin API, emit, and the check before dispatch (one serve)

async fn serve_checks_api_emit_and_dispatch(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(
        dir.path(),
        &format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n\n\
             [[handler]]\nname = \"probe\"\nmodule = {:?}\nevents = [\"probe.emit\", \"probe.echo\", \"TaskSolved.v0\"]\n\
             [handler.allow]\nemit = [\"TaskSolved.v0\"]\n",
            schemas_section(&shipped_schemas(), false),
            guest("probe").display().to_string()
        ),
    );
    let serve = Serve::ready(&db, &config).await;

    // Admin API: 422 naming the rule; 201 for a good event.
    for (what, payload, pointer, keyword) in bad_payloads() {
        let body = json!({"name": "TaskSolved.v0", "payload": payload}).to_string();
        let (status, answer) = http_as(port, "POST", "/v1/events", Some(&body), Some(TOKEN)).await;
        assert_eq!(status, 422, "{what}: {answer}");
        let error = serde_json::from_str::<Value>(&answer).unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            error.contains("TaskSolved.v0") && error.contains(pointer) && error.contains(keyword),
            "{what}: {error}"
        );
    }

    // emit: a bad follow-up is `invalid`, and the probe rejects its event.
    let mut bad = task_solved();
    bad["payload"].as_object_mut().unwrap().remove("task_uid");
    let emit_bad = NewEvent::new(
        "probe.emit",
        json!({"name": "TaskSolved.v0", "payload": bad}).to_string(),
    );
    let emit_good = NewEvent::new(
        "probe.emit",
        json!({"name": "TaskSolved.v0", "payload": task_solved()}).to_string(),
    );
    let store = db.connect().await;
    let bad_id = store.enqueue(&emit_bad, 3).await.unwrap().to_string();
    store.enqueue(&emit_good, 3).await.unwrap();

    // Plain SQL: dead before the handler runs.
    let mut sql_bad = task_solved();
    sql_bad["event_name"] = json!("ManagerUpdated");
    let raw_id = insert_raw(&db, "TaskSolved.v0", &sql_bad.to_string()).await;
    let raw_ok = insert_raw(&db, "probe.echo", "{}").await;

    wait_for("the probe events to settle", || async {
        let dead = dead_errors(&db);
        dead.iter().any(|d| d.0 == bad_id) && dead.iter().any(|d| d.0 == raw_id)
    })
    .await;
    let dead = dead_errors(&db);
    let error_of = |id: &str| dead.iter().find(|d| d.0 == id).unwrap().2.clone();
    let emit_error = error_of(&bad_id);
    assert!(
        emit_error.contains("TaskSolved.v0")
            && emit_error.contains("\"/payload\"")
            && emit_error.contains("`required`"),
        "{emit_error}"
    );
    let raw_error = error_of(&raw_id);
    assert!(
        raw_error.starts_with("schema: ")
            && raw_error.contains("\"/event_name\"")
            && raw_error.contains("`enum`"),
        "{raw_error}"
    );
    assert!(!dead.iter().any(|d| d.0 == raw_ok), "{dead:?}");
    // The good emit went through: its TaskSolved.v0 reached the probe,
    // which rejects names it does not know (so it is dead, not by schema).
    wait_for("the emitted TaskSolved.v0 to run", || async {
        dead_errors(&db)
            .iter()
            .any(|d| d.1 == "TaskSolved.v0" && !d.2.starts_with("schema:"))
    })
    .await;
    let log = serve.stop();
    assert!(log.contains("event schemas loaded"), "{log}");
}

/// `[schemas] required = true`: a name with no schema is dead before
/// dispatch when inserted by plain SQL.
async fn required_schema_buries_unknown_versions(db: TestDb) {
    ok(&outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    std::fs::copy(
        shipped_schemas().join("TaskSolved.v0.json"),
        schemas.join("TaskSolved.v0.json"),
    )
    .unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[schemas]\ndir = \"schemas\"\nrequired = true\n\n\
             [[handler]]\nname = \"probe\"\nmodule = {:?}\nevents = [\"TaskSolved.v0\"]\n",
            guest("probe").display().to_string()
        ),
    );
    let serve = Serve::ready(&db, &config).await;
    let id = insert_raw(&db, "TaskSolved.v7", &task_solved().to_string()).await;
    wait_for("TaskSolved.v7 to be dead", || async {
        dead_errors(&db).iter().any(|d| d.0 == id)
    })
    .await;
    let dead = dead_errors(&db);
    let error = &dead.iter().find(|d| d.0 == id).unwrap().2;
    assert!(
        error.starts_with("schema: ") && error.contains("TaskSolved.v7.json"),
        "{error}"
    );
    serve.stop();
}

on_both_backends!(
    cli_enqueue_checks_payloads,
    rust_api_checks_payloads,
    serve_checks_api_emit_and_dispatch,
    required_schema_buries_unknown_versions,
);
