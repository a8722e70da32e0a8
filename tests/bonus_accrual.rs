//! The bonus-accrual handler (seed 001) end to end: the real `outrun serve`
//! running target/guests/bonus_accrual.wasm on SQLite and PostgreSQL with
//! the app migrations applied and the shipped schemas checked, and a real
//! HTTP server on 127.0.0.1 standing in for the task service (ratings by
//! task uid; 404, 500, garbage or a slow answer where a test says so).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Serve, TestDb, eventually, guest, ok, outrun, wait_for};
use outrun::{NewEvent, Store};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// The task service stand-in

/// How the stand-in answers `GET /v1/tasks/{uid}/rating`.
#[derive(Clone)]
enum Rating {
    Is(i64),
    Status(u16),
    Body(&'static str),
    Slow(Duration),
}

#[derive(Clone, Default)]
struct Tasks {
    port: u16,
    ratings: Arc<Mutex<HashMap<String, Rating>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl Tasks {
    async fn start() -> Tasks {
        let tasks = Tasks::default();
        let state = tasks.clone();
        let app = axum::Router::new().route(
            "/v1/tasks/{uid}/rating",
            axum::routing::get(
                move |axum::extract::Path(uid): axum::extract::Path<String>| {
                    let state = state.clone();
                    async move {
                        state.asked.lock().unwrap().push(uid.clone());
                        let rule = state.ratings.lock().unwrap().get(&uid).cloned();
                        let (status, body) = match rule {
                            Some(Rating::Is(r)) => (200, json!({"rating": r}).to_string()),
                            Some(Rating::Status(s)) => (s, "{}".into()),
                            Some(Rating::Body(b)) => (200, b.to_owned()),
                            Some(Rating::Slow(d)) => {
                                tokio::time::sleep(d).await;
                                (200, r#"{"rating": 1}"#.into())
                            }
                            None => (404, r#"{"error":"no rating yet"}"#.into()),
                        };
                        (axum::http::StatusCode::from_u16(status).unwrap(), body)
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Tasks { port, ..tasks }
    }

    fn set(&self, task: &str, rating: Rating) {
        self.ratings.lock().unwrap().insert(task.into(), rating);
    }

    fn asked(&self, task: &str) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|t| *t == task)
            .count()
    }
}

// ---------------------------------------------------------------------------
// Setup

/// Migrate the outbox and apply migrations/apps/bonus-accrual/<backend>/.
async fn prepare(db: &TestDb) -> Store {
    ok(&outrun(db, &["migrate"]));
    let backend = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations/apps/bonus-accrual")
        .join(backend);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        db.exec_script(&std::fs::read_to_string(f).unwrap()).await;
    }
    let schemas = outrun::Schemas::load(&shipped_schemas(), false).unwrap();
    db.connect().await.with_schemas(Some(Arc::new(schemas)))
}

fn shipped_schemas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/schemas")
}

/// The handler as examples/outrun.toml binds it, with quick waits.
fn config(dir: &Path, tasks: &Tasks, extra: &str) -> PathBuf {
    let path = dir.join("outrun.toml");
    std::fs::write(
        &path,
        format!(
            r#"[schemas]
dir = {schemas:?}

[[handler]]
name = "bonus-accrual"
module = {module:?}
events = ["ManagerUpdated.v0", "TaskSolved.v0", "TaskSolved.v1", "NewCandidate.v0"]
timeout = "5s"
max_retry = 3
[handler.allow]
sql = true
http = ["127.0.0.1:{port}"]
[handler.allow.config]
task_url = "http://127.0.0.1:{port}"
task_timeout_ms = "300"
bonus_rate = "10"
wait_first_ms = "50"
wait_max_ms = "200"
{extra}
"#,
            schemas = shipped_schemas().display().to_string(),
            module = guest("bonus_accrual").display().to_string(),
            port = tasks.port,
        ),
    )
    .unwrap();
    path
}

fn envelope(
    name: &str,
    version: &str,
    event_id: &str,
    produced_at: &str,
    payload: Value,
) -> String {
    json!({
        "event_id": event_id,
        "event_name": name,
        "event_version": version,
        "produced_at": produced_at,
        "payload": payload,
    })
    .to_string()
}

fn manager(event_id: &str, uid: &str, account: &str, produced_at: &str) -> NewEvent {
    NewEvent::new(
        "ManagerUpdated.v0",
        envelope(
            "ManagerUpdated",
            "0",
            event_id,
            produced_at,
            json!({"manager_uid": uid, "account_id": account, "login": format!("{uid}-login")}),
        ),
    )
    .with_group(format!("manager:{uid}"))
}

fn solved(event_id: &str, task: &str, manager: &str) -> NewEvent {
    NewEvent::new(
        "TaskSolved.v0",
        envelope(
            "TaskSolved",
            "0",
            event_id,
            "2025-02-13T17:11:30Z",
            json!({"task_uid": task, "task_manager_uid": manager}),
        ),
    )
}

fn solved_v1(event_id: &str, task: &str, manager: &str, rating: i64) -> NewEvent {
    NewEvent::new(
        "TaskSolved.v1",
        envelope(
            "TaskSolved",
            "1",
            event_id,
            "2025-02-14T09:00:00Z",
            json!({"task_uid": task, "task_manager_uid": manager, "task_rating": rating}),
        ),
    )
}

fn uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// event_id → (event_name, manager, account, rating, amount) of every accrual.
async fn accruals(db: &TestDb) -> Vec<String> {
    let mut v = db
        .strings(
            "SELECT event_name || ' ' || task_uid || ' ' || manager_uid || ' ' || account_id || ' ' \
             || CAST(rating AS TEXT) || ' ' || CAST(amount AS TEXT) FROM bonus_accruals",
        )
        .await;
    v.sort();
    v
}

async fn wait_drained(store: &Store) {
    wait_for("every event handled or dead", || async {
        let s = store.stats().await.unwrap();
        s.pending == 0 && s.running == 0 && s.scheduled == 0
    })
    .await;
}

fn dead(db: &TestDb) -> Vec<(String, String)> {
    let out = ok(&outrun(db, &["events", "list", "--dead", "--json"]));
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["last_error"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// `outrun events stats --by-name --json`: name → (live, dead).
fn by_name(db: &TestDb) -> HashMap<String, (i64, i64)> {
    let out = ok(&outrun(db, &["events", "stats", "--by-name", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    v["by_name"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let c = |k: &str| n[k].as_i64().unwrap();
            (
                n["name"].as_str().unwrap().to_owned(),
                (c("live"), c("dead")),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests

/// Duplicate delivery (the same event_id in three outbox rows, one after the
/// others were handled) accrues once; v0 and v1 of TaskSolved are bound
/// together and counted per version; v1 needs no rating request.
async fn accrues_once_per_event_id_across_versions(db: TestDb) {
    let store = prepare(&db).await;
    let tasks = Tasks::start().await;
    tasks.set("task-1", Rating::Is(7));
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &tasks, "");
    let (e1, e2) = (uid(), uid());
    store
        .enqueue(&manager(&uid(), "m-1", "acc-1", "2025-02-01T00:00:00Z"), 5)
        .await
        .unwrap();
    for _ in 0..2 {
        store
            .enqueue(&solved(&e1, "task-1", "m-1"), 5)
            .await
            .unwrap();
    }
    store
        .enqueue(&solved_v1(&e2, "task-2", "m-1", 3), 5)
        .await
        .unwrap();
    let stats = by_name(&db);
    assert_eq!(stats["TaskSolved.v0"], (2, 0), "{stats:?}");
    assert_eq!(stats["TaskSolved.v1"], (1, 0), "{stats:?}");

    let serve = Serve::ready(&db, &config).await;
    wait_drained(&store).await;
    // A redelivery after the first ones were handled.
    store
        .enqueue(&solved(&e1, "task-1", "m-1"), 5)
        .await
        .unwrap();
    wait_drained(&store).await;
    let log = serve.stop();

    assert_eq!(
        accruals(&db).await,
        [
            "TaskSolved.v0 task-1 m-1 acc-1 7 70",
            "TaskSolved.v1 task-2 m-1 acc-1 3 30"
        ],
        "{log}"
    );
    assert!(dead(&db).is_empty(), "{:?}", dead(&db));
    assert_eq!(tasks.asked("task-2"), 0, "v1 carries its rating");
    assert!(tasks.asked("task-1") >= 1);
    assert!(log.contains("duplicate delivery ignored"), "{log}");
    let stats = by_name(&db);
    assert!(
        stats.values().all(|&(live, dead)| live == 0 && dead == 0),
        "{stats:?}"
    );
}

/// The seed's automatic dead-letter retry: the task event arrives before
/// its manager; the handler waits (retry-after) and accrues once the
/// manager is there. NewCandidate is recorded once however often it comes.
async fn manager_arriving_late_is_waited_for(db: TestDb) {
    let store = prepare(&db).await;
    let tasks = Tasks::start().await;
    tasks.set("task-3", Rating::Is(4));
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &tasks, "give_up_after_ms = \"60000\"");
    let id = store
        .enqueue(&solved(&uid(), "task-3", "m-late"), 5)
        .await
        .unwrap();
    let candidate = || {
        NewEvent::new(
            "NewCandidate.v0",
            envelope(
                "NewCandidate",
                "0",
                "90a91f4b-8e34-4a3c-bfc8-f6649597445e",
                "2025-02-13T17:11:30Z",
                json!({"candidate_uid": "c-1", "name": "Marlon", "surname": "Brando"}),
            ),
        )
    };
    store.enqueue(&candidate(), 5).await.unwrap();
    store.enqueue(&candidate(), 5).await.unwrap();
    let serve = Serve::ready(&db, &config).await;
    // Deferred at least twice (the waits grow), without spending a retry.
    let ev = eventually(
        "the task event to be deferred twice",
        Duration::from_secs(30),
        || {
            let store = store.clone();
            async move { store.get(id).await.unwrap().filter(|e| e.deferrals >= 2) }
        },
    )
    .await;
    assert_eq!(ev.retry, 0);
    assert!(accruals(&db).await.is_empty());
    store
        .enqueue(
            &manager(&uid(), "m-late", "acc-late", "2025-02-01T00:00:00Z"),
            5,
        )
        .await
        .unwrap();
    wait_drained(&store).await;
    let log = serve.stop();
    assert_eq!(
        accruals(&db).await,
        ["TaskSolved.v0 task-3 m-late acc-late 4 40"],
        "{log}"
    );
    assert!(
        log.contains("manager m-late is not known; trying again"),
        "{log}"
    );
    assert_eq!(
        db.strings("SELECT name || ' ' || surname FROM bonus_candidates")
            .await,
        ["Marlon Brando"]
    );
}

/// No manager, and no rating, within the give-up time: dead, naming what
/// was missing.
async fn missing_data_is_dead_after_the_give_up_time(db: TestDb) {
    let store = prepare(&db).await;
    let tasks = Tasks::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &tasks, "give_up_after_ms = \"700\"");
    store
        .enqueue(&manager(&uid(), "m-2", "acc-2", "2025-02-01T00:00:00Z"), 5)
        .await
        .unwrap();
    let no_manager = store
        .enqueue(&solved(&uid(), "task-4", "m-never"), 5)
        .await
        .unwrap()
        .to_string();
    // task-5 never gets a rating: the stand-in answers 404.
    let no_rating = store
        .enqueue(&solved(&uid(), "task-5", "m-2"), 5)
        .await
        .unwrap()
        .to_string();
    let serve = Serve::ready(&db, &config).await;
    wait_drained(&store).await;
    serve.stop();
    let dead = dead(&db);
    let error = |id: &str| dead.iter().find(|d| d.0 == id).unwrap().1.clone();
    let e = error(&no_manager);
    assert!(
        e.contains("gave up waiting") && e.contains("manager m-never is not known"),
        "{e}"
    );
    let e = error(&no_rating);
    assert!(
        e.contains("gave up waiting") && e.contains("rating of task task-5"),
        "{e}"
    );
    assert!(tasks.asked("task-5") >= 2, "the rating was asked for again");
    assert!(accruals(&db).await.is_empty());
}

/// ManagerUpdated out of order: an update produced before the stored one
/// changes nothing; a newer one wins.
async fn manager_updates_keep_the_newest(db: TestDb) {
    let store = prepare(&db).await;
    let tasks = Tasks::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &tasks, "");
    for (account, at) in [
        ("acc-new", "2025-02-10T12:00:00Z"),
        ("acc-old", "2025-02-10T11:59:59+00:00"),
        ("acc-older", "2025-02-10T14:00:00+03:00"),
    ] {
        store
            .enqueue(&manager(&uid(), "m-3", account, at), 5)
            .await
            .unwrap();
    }
    let serve = Serve::ready(&db, &config).await;
    wait_drained(&store).await;
    assert_eq!(
        db.strings("SELECT account_id FROM bonus_managers").await,
        ["acc-new"]
    );
    store
        .enqueue(
            &manager(&uid(), "m-3", "acc-newest", "2025-02-11T00:00:00Z"),
            5,
        )
        .await
        .unwrap();
    wait_drained(&store).await;
    let log = serve.stop();
    assert_eq!(
        db.strings("SELECT account_id || ' ' || login FROM bonus_managers")
            .await,
        ["acc-newest m-3-login"]
    );
    assert!(
        log.contains("is older than the stored one; ignored"),
        "{log}"
    );
}

/// The task service misbehaves: 500 and a timeout are retried (a retry
/// spent each), a 200 that is not the documented JSON and a 400 are dead at
/// once; a malformed event (by plain SQL, past the enqueue check) is dead
/// by its schema before the handler runs.
async fn task_service_failures(db: TestDb) {
    let store = prepare(&db).await;
    let tasks = Tasks::start().await;
    tasks.set("t-500", Rating::Status(500));
    tasks.set("t-slow", Rating::Slow(Duration::from_secs(3)));
    tasks.set("t-garbage", Rating::Body("<html>rating: seven</html>"));
    tasks.set("t-neg", Rating::Body(r#"{"rating": -3}"#));
    tasks.set("t-400", Rating::Status(400));
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &tasks, "");
    store
        .enqueue(&manager(&uid(), "m-4", "acc-4", "2025-02-01T00:00:00Z"), 5)
        .await
        .unwrap();
    let mut ids = HashMap::new();
    for task in ["t-500", "t-slow", "t-garbage", "t-neg", "t-400"] {
        let id = store
            .enqueue(&solved(&uid(), task, "m-4"), 5)
            .await
            .unwrap()
            .to_string();
        ids.insert(task, id);
    }
    let serve = Serve::ready(&db, &config).await;
    wait_drained(&store).await;
    serve.stop();
    let dead = dead(&db);
    let error = |task: &str| {
        dead.iter()
            .find(|d| d.0 == ids[task])
            .unwrap_or_else(|| panic!("{task} is not dead: {dead:?}"))
            .1
            .clone()
    };
    assert!(
        error("t-500").contains("answered 500"),
        "{}",
        error("t-500")
    );
    assert_eq!(tasks.asked("t-500"), 3, "max_retry = 3 attempts");
    assert!(
        error("t-slow").contains("no complete response"),
        "{}",
        error("t-slow")
    );
    assert!(
        error("t-garbage").contains("documented JSON"),
        "{}",
        error("t-garbage")
    );
    assert_eq!(tasks.asked("t-garbage"), 1, "dead at once");
    assert!(error("t-neg").contains("0 or more"), "{}", error("t-neg"));
    assert!(
        error("t-400").contains("answered 400"),
        "{}",
        error("t-400")
    );
    assert_eq!(tasks.asked("t-400"), 1, "dead at once");
    assert!(accruals(&db).await.is_empty());
}

/// `kill -9` in the middle of a run with duplicated deliveries: after a
/// restart every event_id is accrued exactly once and nothing is dead.
async fn accrues_once_across_kill_9(db: TestDb) {
    let store = prepare(&db).await;
    let tasks = Tasks::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &tasks, "");
    // Leases of the killed instance expire quickly.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("[runtime]\nlease_duration = \"2s\"\n\n{text}"),
    )
    .unwrap();
    store
        .enqueue(&manager(&uid(), "m-5", "acc-5", "2025-02-01T00:00:00Z"), 5)
        .await
        .unwrap();
    const N: usize = 150;
    let mut events = Vec::new();
    for i in 0..N {
        let e = solved_v1(&uid(), &format!("k-{i}"), "m-5", 1);
        events.push(e.clone());
        events.push(e);
    }
    store.enqueue_batch(&events, 5).await.unwrap();
    let serve = Serve::ready(&db, &config).await;
    wait_for("some accruals before the kill", || async {
        db.scalar("SELECT count(*) FROM bonus_accruals").await > 20
    })
    .await;
    serve.send("KILL");
    let (status, _) = serve.wait();
    assert!(!status.success());
    let before = db.scalar("SELECT count(*) FROM bonus_accruals").await;
    let serve = Serve::ready(&db, &config).await;
    wait_drained(&store).await;
    serve.stop();
    assert_eq!(
        db.scalar("SELECT count(*) FROM bonus_accruals").await,
        N as i64,
        "{before} accrued before the kill"
    );
    assert_eq!(
        db.scalar("SELECT count(DISTINCT task_uid) FROM bonus_accruals")
            .await,
        N as i64
    );
    assert_eq!(
        db.scalar("SELECT CAST(sum(amount) AS BIGINT) FROM bonus_accruals")
            .await,
        10 * N as i64
    );
    assert!(dead(&db).is_empty(), "{:?}", dead(&db));
}

on_both_backends!(
    accrues_once_across_kill_9,
    accrues_once_per_event_id_across_versions,
    manager_arriving_late_is_waited_for,
    missing_data_is_dead_after_the_give_up_time,
    manager_updates_keep_the_newest,
    task_service_failures,
);
