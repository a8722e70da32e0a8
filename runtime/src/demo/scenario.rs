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
//! - One malformed `issuings-ai-checks` (no `applicationId`) ends dead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::event::NewEvent;
use crate::wasm::{Allow, HandlerSpec};

/// Guest files the demo binds, as `scripts/build-guests.sh` names them.
pub const MODULES: [&str; 3] = [
    "ai_check_requeue.wasm",
    "family_sharing.wasm",
    "package_deletion.wasm",
];

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

/// Base URLs of the three demo stand-in services.
#[derive(Debug, Clone)]
pub struct ServiceUrls {
    pub ai_check: String,
    pub family: String,
    pub storage: String,
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
        allow,
    }
}

fn config(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// The three `[[handler]]` entries, with exactly the grants each needs.
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
    ]
}

/// The application tables the handlers write, as the app migrations create
/// them on SQLite.
pub const APP_MIGRATIONS: [(&str, &str); 2] = [
    (
        "migrations/apps/ai-check-requeue/sqlite/0001_issuing_check.sql",
        include_str!("../../../migrations/apps/ai-check-requeue/sqlite/0001_issuing_check.sql"),
    ),
    (
        "migrations/apps/family-sharing/sqlite/0001_family_sharing.sql",
        include_str!("../../../migrations/apps/family-sharing/sqlite/0001_family_sharing.sql"),
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
        };
        let specs = handler_specs(Path::new("/g"), &urls);
        assert_eq!(specs[0].allow.http, ["127.0.0.1:1001"]);
        assert_eq!(specs[2].allow.http, ["127.0.0.1:1003"]);
        assert_eq!(
            specs[0].allow.config["ai_check_url"],
            "http://127.0.0.1:1001/v1/checks"
        );
        assert_eq!(specs[1].module, Path::new("/g/family_sharing.wasm"));
    }
}
