//! The demo's story: the handler bindings, the application tables and the
//! rows already in them, the events an application would enqueue, and the
//! one step the AI-check service takes on its own. The expected end state
//! that follows from all this is checked in [`super::report`].
//!
//! The story, per handler:
//! - ai-check-requeue: two checks (app-1, app-2) are already `NEW`, so the
//!   check of app-3 is requeued until the AI-check service finishes app-1;
//!   then app-3 is sent to the service and recorded.
//! - family-sharing: user u-1 shares ride rsk-1, then stops; shares rsk-3
//!   and keeps it on; user u-2 has no family, so rsk-2 shares nothing.
//! - package-deletion: draft u-7 requests packages d1, d2, d3 and uploads d3;
//!   when the draft finishes d1 and d2 are deleted in Storage (d2 after one
//!   503) and d3 is kept. Ticket t-9's package is already gone (404 counts as
//!   deleted). Draft u-8 is still open, so its package stays in the map.
//! - bonus-accrual (seed 001): task-1 is solved (TaskSolved.v0) before its
//!   manager m-anna is known; the handler waits (retry-after, growing
//!   delays) until ManagerUpdated.v0 arrives, then accrues rating 8 × 10.
//!   The same TaskSolved is delivered twice: one accrual. task-2 is solved
//!   as TaskSolved.v1 (rating in the event, no call to the task service).
//!   A TaskSolved.v0 without `task_uid` is refused at enqueue by its schema.
//! - One malformed `issuings-ai-checks` (no `applicationId`) ends dead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::event::NewEvent;
use crate::wasm::{Allow, HandlerSpec};

/// Guest files the demo binds, as `scripts/build-guests.sh` names them.
pub const MODULES: [&str; 4] = [
    "ai_check_requeue.wasm",
    "family_sharing.wasm",
    "package_deletion.wasm",
    "bonus_accrual.wasm",
];

/// The event schemas the demo checks against: the shipped files.
pub const SCHEMAS: [(&str, &str); 4] = [
    (
        "ManagerUpdated.v0.json",
        include_str!("../../../examples/schemas/ManagerUpdated.v0.json"),
    ),
    (
        "NewCandidate.v0.json",
        include_str!("../../../examples/schemas/NewCandidate.v0.json"),
    ),
    (
        "TaskSolved.v0.json",
        include_str!("../../../examples/schemas/TaskSolved.v0.json"),
    ),
    (
        "TaskSolved.v1.json",
        include_str!("../../../examples/schemas/TaskSolved.v1.json"),
    ),
];

/// The task whose manager arrives after it was solved.
pub const LATE_TASK: &str = "task-1";
pub const LATE_MANAGER: &str = "m-anna";
/// The task service stand-in's rating of [`LATE_TASK`].
pub const LATE_TASK_RATING: i64 = 8;
/// The bonus per rating point (`bonus_rate`).
pub const BONUS_RATE: i64 = 10;
/// event_id of the TaskSolved of [`LATE_TASK`] (delivered twice).
pub const LATE_EVENT_ID: &str = "90a91f4b-8e34-4a3c-bfc8-f6649597445e";
/// event_id of the TaskSolved.v1 of task-2.
pub const V1_EVENT_ID: &str = "2d0f6a3e-5b7c-4f1e-9a8d-0c1b2a3f4e5d";
/// How long after the start the late manager is enqueued.
pub const MANAGER_DELAY: Duration = Duration::from_millis(1200);

pub const AI_EVENT: &str = "issuings-ai-checks";
pub const SHARE_EVENT: &str = "share-with-family";
/// kv prefix of package-deletion; the report shows keys with it.
pub const PACKAGES_KV_PREFIX: &str = "package-deletion:";

/// The AI-check service finishes this check when it sees the queue backing
/// up (see [`finish_check`]).
pub const FINISHED_APPLICATION: &str = "app-1";
/// The check that gets requeued, then runs.
pub const REQUEUED_TRIGGER: &str = "trg-3";
pub const REQUEUED_APPLICATION: &str = "app-3";
/// The malformed event's trigger (its `applicationId` is missing).
pub const MALFORMED_TRIGGER: &str = "trg-4";

/// The family of user u-1 as the family stand-in returns it.
pub const FAMILY_USER: &str = "u-1";
pub const FAMILY_ADMIN_UID: i64 = 393627008;
pub const FAMILY_ADMIN_NAME: &str = "Василий";
pub const FAMILY_PHONES: [&str; 2] = ["5db2bb01211473c8c34f358d", "5db2bb01211473c8c34f358e"];

/// Storage stand-in: answers 503 to the first DELETE of this package.
pub const FLAKY_PACKAGE: &str = "pkg-d2";
/// Storage stand-in: this package is already gone (404).
pub const GONE_PACKAGE: &str = "pkg-t1";

/// Delay of a requeued AI check: short, so the demo stays quick.
const REQUEUE_DELAY_MS: u64 = 300;

/// Base URLs of the four demo stand-in services.
#[derive(Debug, Clone)]
pub struct ServiceUrls {
    pub ai_check: String,
    pub family: String,
    pub storage: String,
    pub tasks: String,
}

/// `host:port` of a base URL, for `allow.http`.
fn authority(url: &str) -> String {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn spec(name: &str, events: &[&str], module: PathBuf, allow: Allow) -> HandlerSpec {
    HandlerSpec {
        name: name.to_owned(),
        events: events.iter().map(|e| (*e).to_owned()).collect(),
        module,
        max_retry: None,
        timeout: Duration::from_secs(5),
        memory: crate::wasm::spec::DEFAULT_MEMORY,
        concurrency: None,
        instances: crate::wasm::InstanceMode::Fresh,
        reuse_events: crate::wasm::spec::DEFAULT_REUSE_EVENTS,
        allow,
        source: None,
        build: None,
    }
}

fn config(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// The four `[[handler]]` entries, with exactly the grants each needs.
pub fn handler_specs(dir: &Path, urls: &ServiceUrls) -> Vec<HandlerSpec> {
    vec![
        spec(
            "ai-check-requeue",
            &[AI_EVENT],
            dir.join(MODULES[0]),
            Allow {
                emit: vec![AI_EVENT.to_owned()],
                sql: true,
                http: vec![authority(&urls.ai_check)],
                config: config(&[
                    ("ai_check_url", format!("{}/v1/checks", urls.ai_check)),
                    ("requeue_threshold", "2".into()),
                    ("requeue_delay_ms", REQUEUE_DELAY_MS.to_string()),
                    ("ai_check_timeout_ms", "3000".into()),
                ]),
                ..Allow::default()
            },
        ),
        spec(
            "family-sharing",
            &[SHARE_EVENT],
            dir.join(MODULES[1]),
            Allow {
                sql: true,
                http: vec![authority(&urls.family)],
                config: config(&[
                    ("family_url", urls.family.clone()),
                    // SQLite has no schemas.
                    ("table_prefix", String::new()),
                    ("family_timeout_ms", "3000".into()),
                ]),
                ..Allow::default()
            },
        ),
        spec(
            "package-deletion",
            &[
                "package.requested",
                "package.closed",
                "draft.finished",
                "ticket.finished",
            ],
            dir.join(MODULES[2]),
            Allow {
                kv: Some(PACKAGES_KV_PREFIX.to_owned()),
                http: vec![authority(&urls.storage)],
                config: config(&[
                    ("storage_url", urls.storage.clone()),
                    ("storage_timeout_ms", "3000".into()),
                ]),
                ..Allow::default()
            },
        ),
        spec(
            "bonus-accrual",
            &[
                "ManagerUpdated.v0",
                "TaskSolved.v0",
                "TaskSolved.v1",
                "NewCandidate.v0",
            ],
            dir.join(MODULES[3]),
            Allow {
                sql: true,
                http: vec![authority(&urls.tasks)],
                config: config(&[
                    ("task_url", urls.tasks.clone()),
                    ("task_timeout_ms", "3000".into()),
                    ("bonus_rate", BONUS_RATE.to_string()),
                    ("wait_first_ms", "200".into()),
                    ("wait_max_ms", "400".into()),
                    ("give_up_after_ms", "20000".into()),
                ]),
                ..Allow::default()
            },
        ),
    ]
}

/// The application tables the handlers write, as the app migrations create
/// them on SQLite.
pub const APP_MIGRATIONS: [(&str, &str); 3] = [
    (
        "migrations/apps/ai-check-requeue/sqlite/0001_issuing_check.sql",
        include_str!("../../../migrations/apps/ai-check-requeue/sqlite/0001_issuing_check.sql"),
    ),
    (
        "migrations/apps/family-sharing/sqlite/0001_family_sharing.sql",
        include_str!("../../../migrations/apps/family-sharing/sqlite/0001_family_sharing.sql"),
    ),
    (
        "migrations/apps/bonus-accrual/sqlite/0001_bonus_accrual.sql",
        include_str!("../../../migrations/apps/bonus-accrual/sqlite/0001_bonus_accrual.sql"),
    ),
];

/// Checks the AI-check service is already running when the demo starts.
pub const SEED_SQL: &str = "INSERT INTO issuing_check (application_id, trigger_id, work_status) \
     VALUES ('app-1', 'trg-1', 'NEW'), ('app-2', 'trg-2', 'NEW')";

/// The AI-check service finishing a check: the step that lets the requeued
/// check through.
pub const FINISH_CHECK_SQL: &str =
    "UPDATE issuing_check SET work_status = 'DONE' WHERE application_id = $1";

/// Apply the app migrations and the seed rows.
pub async fn prepare_tables(pool: &sqlx::SqlitePool) -> Result<(), sqlx::Error> {
    for (_, sql) in APP_MIGRATIONS {
        sqlx::raw_sql(sql).execute(pool).await?;
    }
    sqlx::query(SEED_SQL).execute(pool).await?;
    Ok(())
}

/// What the AI-check service does on its own: finish a running check.
pub async fn finish_check(pool: &sqlx::SqlitePool, application: &str) -> Result<(), sqlx::Error> {
    sqlx::query(FINISH_CHECK_SQL)
        .bind(application)
        .execute(pool)
        .await?;
    Ok(())
}

fn event(name: &str, payload: serde_json::Value, group: Option<String>) -> NewEvent {
    let ev = NewEvent::new(name, payload.to_string());
    match group {
        Some(g) => ev.with_group(g),
        None => ev,
    }
}

fn share(order: &str, key: &str, user: &str, on: bool) -> NewEvent {
    event(
        SHARE_EVENT,
        json!({"order_id": order, "sharing_key": key, "user_id": user,
               "share_ride_with_family": {"value": on}}),
        Some(format!("ride:{key}")),
    )
}

fn requested(package: &str, kind: &str, owner: &str) -> NewEvent {
    event(
        "package.requested",
        json!({"package_id": package, "owner": {"kind": kind, "id": owner}}),
        Some(format!("{kind}:{owner}")),
    )
}

/// The seed's envelope around a payload.
fn envelope(
    name: &str,
    version: &str,
    event_id: &str,
    payload: serde_json::Value,
) -> serde_json::Value {
    json!({"event_id": event_id, "event_name": name, "event_version": version,
           "produced_at": "2025-02-13T17:11:30Z", "payload": payload})
}

/// The manager of [`LATE_TASK`], enqueued [`MANAGER_DELAY`] after the start
/// (the tasks service streams it late).
pub fn late_manager() -> NewEvent {
    event(
        "ManagerUpdated.v0",
        envelope(
            "ManagerUpdated",
            "0",
            "6c1e8f0a-3d2b-4c5e-8f7a-1b2c3d4e5f60",
            json!({"manager_uid": LATE_MANAGER, "account_id": "acc-anna", "login": "anna"}),
        ),
        Some(format!("manager:{LATE_MANAGER}")),
    )
}

/// A TaskSolved.v0 that breaks its schema (no `task_uid`): refused at
/// enqueue, nothing written.
pub fn invalid_task_solved() -> NewEvent {
    event(
        "TaskSolved.v0",
        envelope(
            "TaskSolved",
            "0",
            "0b6c2d1e-7f8a-4b9c-8d0e-1f2a3b4c5d6e",
            json!({"task_manager_uid": LATE_MANAGER}),
        ),
        None,
    )
}

fn bonus_events() -> Vec<NewEvent> {
    let solved_late = || {
        event(
            "TaskSolved.v0",
            envelope(
                "TaskSolved",
                "0",
                LATE_EVENT_ID,
                json!({"task_uid": LATE_TASK, "task_manager_uid": LATE_MANAGER}),
            ),
            None,
        )
    };
    vec![
        solved_late(),
        // At-least-once delivery: the same event_id again.
        solved_late(),
        late_manager().with_delay(MANAGER_DELAY),
        event(
            "ManagerUpdated.v0",
            envelope(
                "ManagerUpdated",
                "0",
                "5a0d7e9f-2c1b-4b4d-9e6f-0a1b2c3d4e5f",
                json!({"manager_uid": "m-boris", "account_id": "acc-boris", "login": "boris"}),
            ),
            Some("manager:m-boris".into()),
        ),
        event(
            "TaskSolved.v1",
            json!({"event_id": V1_EVENT_ID, "event_name": "TaskSolved", "event_version": "1",
                   "produced_at": "2025-02-14T09:00:00Z",
                   "payload": {"task_uid": "task-2", "task_manager_uid": "m-boris", "task_rating": 5}}),
            None,
        ),
        event(
            "NewCandidate.v0",
            envelope(
                "NewCandidate",
                "0",
                "3e4f5a6b-7c8d-4e9f-a0b1-c2d3e4f5a6b7",
                json!({"candidate_uid": "c-1", "name": "Marlon", "surname": "Brando"}),
            ),
            None,
        ),
    ]
}

/// The events, in the order an application would enqueue them. Group ids
/// follow each handler's producer notes, so start/stop of a ride and the
/// life of a draft run in order.
pub fn events() -> Vec<NewEvent> {
    vec![
        event(
            AI_EVENT,
            json!({"triggerId": REQUEUED_TRIGGER, "applicationId": REQUEUED_APPLICATION}),
            Some(format!("application:{REQUEUED_APPLICATION}")),
        )
        .with_expires_in(Duration::from_secs(3600)),
        share("o-1", "rsk-1", FAMILY_USER, true),
        share("o-2", "rsk-2", "u-2", true),
        share("o-3", "rsk-3", FAMILY_USER, true),
        requested("pkg-d1", "draft", "u-7"),
        requested("pkg-d2", "draft", "u-7"),
        requested("pkg-d3", "draft", "u-7"),
        requested(GONE_PACKAGE, "ticket", "t-9"),
        requested("pkg-o1", "draft", "u-8"),
        share("o-1", "rsk-1", FAMILY_USER, false),
        event(
            "package.closed",
            json!({"package_id": "pkg-d3", "owner": {"kind": "draft", "id": "u-7"}}),
            Some("draft:u-7".into()),
        ),
        event(
            "draft.finished",
            json!({"id": "u-7"}),
            Some("draft:u-7".into()),
        ),
        event(
            "ticket.finished",
            json!({"id": "t-9"}),
            Some("ticket:t-9".into()),
        ),
        event(AI_EVENT, json!({"triggerId": MALFORMED_TRIGGER}), None),
    ]
    .into_iter()
    .chain(bonus_events())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_valid_and_grants_match_the_urls() {
        for ev in events() {
            ev.validate().unwrap();
        }
        let urls = ServiceUrls {
            ai_check: "http://127.0.0.1:1001".into(),
            family: "http://127.0.0.1:1002".into(),
            storage: "http://127.0.0.1:1003".into(),
            tasks: "http://127.0.0.1:1004".into(),
        };
        let specs = handler_specs(Path::new("/g"), &urls);
        assert_eq!(specs[0].allow.http, ["127.0.0.1:1001"]);
        assert_eq!(specs[2].allow.http, ["127.0.0.1:1003"]);
        assert_eq!(
            specs[0].allow.config["ai_check_url"],
            "http://127.0.0.1:1001/v1/checks"
        );
        assert_eq!(specs[1].module, Path::new("/g/family_sharing.wasm"));
        assert_eq!(specs[3].allow.http, ["127.0.0.1:1004"]);
    }

    #[test]
    fn events_follow_the_shipped_schemas() {
        let dir = tempfile::tempdir().unwrap();
        for (file, text) in SCHEMAS {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        let schemas = crate::schema::Schemas::load(dir.path(), false).unwrap();
        schemas.check_all(&events()).unwrap();
        let err = schemas.check_all(&[invalid_task_solved()]).unwrap_err();
        assert!(err.to_string().contains("task_uid"), "{err}");
    }
}
