//! `outrun_attempts`: the history of an event's failed, deferred and
//! interrupted attempts. A row is written by the same statement (SQLite:
//! transaction) that records the failure, which also drops the event's
//! oldest rows beyond the configured number, so a failure costs no extra
//! round trip and the success path none at all. Rows of events that are
//! gone (handled, purged) are deleted by the cleaner.
//!
//! With `[runtime] keep_done`, a handled event's last attempt is recorded
//! too (outcome `done`), by a batched insert right after the commit that
//! deleted its row, and kept with the event's other rows for that long:
//! "did my event run?" has an answer after the row is gone. Best effort: a
//! crash between that commit and the insert loses the record (never the
//! event or its effects).
//!
//! The history also answers "which dead letters did the previous version
//! of a handler produce?" (`outrun events replay --since-reload`, the `r`
//! key of `outrun dev`): the dead events whose last attempt ran on another
//! version than the one now in place.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{Failure, Result, Store, StoreError};

/// One recorded attempt.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Attempt {
    /// 1-based number of the attempt (the event's retry count + 1).
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub handler: Option<String>,
    /// blake3 (hex) of the handler's component that ran it.
    pub version: Option<String>,
    /// The instance that ran it (its `locked_by`).
    pub instance: Option<String>,
    /// `failed` (will retry), `dead`, `deferred` (retry-after) or
    /// `interrupted` (a database error; no retry spent).
    pub outcome: String,
    pub error: Option<String>,
}

/// What [`Store::fail_recorded`] writes besides the failure.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt: Attempt,
    /// Keep this many of the event's attempts (the newest); at least 1.
    pub keep: u32,
}

impl Attempt {
    /// The outcome and error a failure records.
    pub fn outcome_of(failure: &Failure, last: bool) -> (&'static str, Option<String>) {
        match failure {
            Failure::Retry { error, .. } if last => ("dead", Some(error.clone())),
            Failure::Retry { error, .. } => ("failed", Some(error.clone())),
            Failure::Dead { error } => ("dead", Some(error.clone())),
            Failure::Reschedule { at } => (
                "deferred",
                Some(format!("retry-after: runs again at {}", at.to_rfc3339())),
            ),
            Failure::Interrupted { error, .. } => ("interrupted", Some(error.clone())),
        }
    }
}

impl Store {
    /// [`Store::fail`], recording the attempt in the same statement.
    pub async fn fail_recorded(
        &self,
        lease: crate::event::Lease,
        failure: &Failure,
        record: &AttemptRecord,
    ) -> Result<bool> {
        match self {
            Store::Sqlite(s) => s.fail_with(lease, failure, Some(record)).await,
            Store::Postgres(s) => s.fail_with(lease, failure, Some(record)).await,
        }
    }

    /// The event's recorded attempts, oldest first.
    pub async fn attempts(&self, event: Uuid) -> Result<Vec<Attempt>> {
        const COLS: &str =
            "attempt, started_at, duration_ms, handler, version, instance, outcome, error";
        match self {
            Store::Sqlite(s) => {
                type Row = (
                    i64,
                    i64,
                    i64,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    String,
                    Option<String>,
                );
                let rows: Vec<Row> = sqlx::query_as(&format!(
                    "SELECT {COLS} FROM outrun_attempts WHERE event_id = ?1 ORDER BY id"
                ))
                .bind(event.to_string())
                .fetch_all(s.pool())
                .await?;
                rows.into_iter()
                    .map(|r| {
                        Ok(Attempt {
                            attempt: r.0 as i32,
                            started_at: DateTime::from_timestamp_millis(r.1).ok_or_else(|| {
                                StoreError::Db(sqlx::Error::Decode(
                                    format!("outrun_attempts.started_at {} is not Unix ms", r.1)
                                        .into(),
                                ))
                            })?,
                            duration_ms: r.2,
                            handler: r.3,
                            version: r.4,
                            instance: r.5,
                            outcome: r.6,
                            error: r.7,
                        })
                    })
                    .collect()
            }
            Store::Postgres(s) => {
                type Row = (
                    i32,
                    DateTime<Utc>,
                    i64,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    String,
                    Option<String>,
                );
                let rows: Vec<Row> = sqlx::query_as(&format!(
                    "SELECT {COLS} FROM outrun_attempts WHERE event_id = $1 ORDER BY id"
                ))
                .bind(event)
                .fetch_all(s.pool())
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|r| Attempt {
                        attempt: r.0,
                        started_at: r.1,
                        duration_ms: r.2,
                        handler: r.3,
                        version: r.4,
                        instance: r.5,
                        outcome: r.6,
                        error: r.7,
                    })
                    .collect())
            }
        }
    }

    /// Record handled events' last attempts (outcome `done`; see the
    /// module docs), in one statement.
    pub async fn record_done(&self, done: &[(Uuid, Attempt)]) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        match self {
            Store::Sqlite(s) => {
                let rows: Vec<serde_json::Value> = done
                    .iter()
                    .map(|(id, a)| {
                        serde_json::json!([
                            id.to_string(),
                            a.attempt,
                            a.started_at.timestamp_millis(),
                            a.duration_ms,
                            a.handler,
                            a.version,
                            a.instance,
                        ])
                    })
                    .collect();
                s.record_done(serde_json::Value::Array(rows).to_string())
                    .await?;
            }
            Store::Postgres(s) => {
                let mut ids = Vec::with_capacity(done.len());
                let mut attempts = Vec::with_capacity(done.len());
                let mut started = Vec::with_capacity(done.len());
                let mut durations = Vec::with_capacity(done.len());
                let mut handlers = Vec::with_capacity(done.len());
                let mut versions = Vec::with_capacity(done.len());
                let mut instances = Vec::with_capacity(done.len());
                for (id, a) in done {
                    ids.push(*id);
                    attempts.push(a.attempt);
                    started.push(a.started_at);
                    durations.push(a.duration_ms);
                    handlers.push(a.handler.clone());
                    versions.push(a.version.clone());
                    instances.push(a.instance.clone());
                }
                sqlx::query(
                    "INSERT INTO outrun_attempts
                         (event_id, attempt, started_at, duration_ms, handler, version, instance, outcome)
                     SELECT t.*, 'done' FROM unnest($1::uuid[], $2::int4[], $3::timestamptz[],
                                                    $4::int8[], $5::text[], $6::text[], $7::text[]) AS t",
                )
                .bind(ids)
                .bind(attempts)
                .bind(started)
                .bind(durations)
                .bind(handlers)
                .bind(versions)
                .bind(instances)
                .execute(s.pool())
                .await?;
            }
        }
        Ok(())
    }

    /// Delete the attempts of events that no longer exist (handled or
    /// purged), at most `limit`; returns how many. Those of an event with
    /// a `done` record younger than `keep_done` stay; older `done` records
    /// go with the rest of their event's rows.
    pub async fn cleanup_attempts(&self, limit: i64, keep_done: Option<Duration>) -> Result<u64> {
        let keep_us = keep_done.map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let keep_ms = keep_us / 1000;
        Ok(match self {
            Store::Sqlite(s) => {
                let before = super::sqlite::now_ms().saturating_sub(keep_ms);
                let expired = sqlx::query(
                    "DELETE FROM outrun_attempts WHERE event_id IN (
                         SELECT event_id FROM outrun_attempts
                         WHERE outcome = 'done' AND started_at < ?2
                         LIMIT ?1)",
                )
                .bind(limit)
                .bind(before)
                .execute(s.pool())
                .await?
                .rows_affected();
                expired
                    + sqlx::query(
                        "DELETE FROM outrun_attempts WHERE id IN (
                             SELECT a.id FROM outrun_attempts a
                             WHERE a.outcome <> 'done'
                               AND NOT EXISTS (SELECT 1 FROM outbox_events e WHERE e.id = a.event_id)
                               AND NOT EXISTS (SELECT 1 FROM outrun_attempts d
                                               WHERE d.event_id = a.event_id AND d.outcome = 'done')
                             LIMIT ?1)",
                    )
                    .bind(limit)
                    .execute(s.pool())
                    .await?
                    .rows_affected()
            }
            Store::Postgres(s) => {
                let expired = sqlx::query(
                    "DELETE FROM outrun_attempts WHERE event_id IN (
                         SELECT event_id FROM outrun_attempts
                         WHERE outcome = 'done' AND started_at < now() - $2 * interval '1 microsecond'
                         LIMIT $1)",
                )
                .bind(limit)
                .bind(keep_us)
                .execute(s.pool())
                .await?
                .rows_affected();
                expired
                    + sqlx::query(
                        "DELETE FROM outrun_attempts WHERE id IN (
                             SELECT a.id FROM outrun_attempts a
                             WHERE a.outcome <> 'done'
                               AND NOT EXISTS (SELECT 1 FROM outbox_events e WHERE e.id = a.event_id)
                               AND NOT EXISTS (SELECT 1 FROM outrun_attempts d
                                               WHERE d.event_id = a.event_id AND d.outcome = 'done')
                             LIMIT $1)",
                    )
                    .bind(limit)
                    .execute(s.pool())
                    .await?
                    .rows_affected()
            }
        })
    }

    /// How many dead events named one of `names` had their last recorded
    /// attempt run on a handler version (blake3 hex of the module) other
    /// than `current`: what [`Store::replay_other_versions`] would replay.
    pub async fn count_other_versions(&self, names: &[String], current: &str) -> Result<u64> {
        if names.is_empty() {
            return Ok(0);
        }
        let n: i64 = match self {
            Store::Sqlite(s) => {
                sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM outbox_events WHERE {}",
                    other_versions_cond(false)
                ))
                .bind(serde_json::to_string(names).unwrap_or_default())
                .bind(current)
                .fetch_one(s.pool())
                .await?
            }
            Store::Postgres(s) => {
                sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM outbox_events WHERE {}",
                    other_versions_cond(true)
                ))
                .bind(names)
                .bind(current)
                .fetch_one(s.pool())
                .await?
            }
        };
        Ok(n as u64)
    }

    /// Replay (as [`Store::replay`] does one) the dead events that
    /// [`Store::count_other_versions`] counts, in one statement; returns how
    /// many.
    pub async fn replay_other_versions(&self, names: &[String], current: &str) -> Result<u64> {
        if names.is_empty() {
            return Ok(0);
        }
        let n = match self {
            Store::Sqlite(s) => {
                // REPLAY binds the time as ?1.
                let cond = other_versions_cond(false)
                    .replace("?2", "?3")
                    .replace("?1", "?2");
                let n = sqlx::query(&format!("{} WHERE {cond}", super::sqlite::REPLAY))
                    .bind(super::sqlite::now_ms())
                    .bind(serde_json::to_string(names).unwrap_or_default())
                    .bind(current)
                    .execute(s.pool())
                    .await?
                    .rows_affected();
                if n > 0 {
                    s.wake();
                }
                n
            }
            Store::Postgres(s) => {
                let n = sqlx::query(&format!(
                    "{} WHERE {}",
                    super::postgres::REPLAY,
                    other_versions_cond(true)
                ))
                .bind(names)
                .bind(current)
                .execute(s.pool())
                .await?
                .rows_affected();
                if n > 0 {
                    s.notify().await?;
                }
                n
            }
        };
        Ok(n)
    }
}

/// The condition of [`Store::count_other_versions`]: parameter 1 the names
/// (PostgreSQL: a text array; SQLite: a JSON array), 2 the current
/// version. `retry >= max_retry` is the predicate of the partial index
/// `outbox_events_dead`, so the rows come from that index and live events
/// are never read; each candidate's last attempt is one probe of
/// `outrun_attempts_event`. An event with no recorded attempt (dead with no
/// handler, expired, or cancelled before it ran) or whose last attempt
/// recorded no version is not counted: no version of the handler produced
/// it.
fn other_versions_cond(postgres: bool) -> String {
    let (names, current) = if postgres {
        ("name = ANY($1)", "$2")
    } else {
        ("name IN (SELECT value FROM json_each(?1))", "?2")
    };
    format!(
        "retry >= max_retry AND {names}
         AND (SELECT a.version FROM outrun_attempts a
              WHERE a.event_id = outbox_events.id ORDER BY a.id DESC LIMIT 1) <> {current}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `--since-reload` query reads dead rows through the dead partial
    /// index, never the live ones, and each candidate's last attempt
    /// through `outrun_attempts_event`. (PostgreSQL picks the same plan
    /// once the table has statistics; its planner's choice on a test's
    /// empty table would prove nothing.)
    #[tokio::test]
    async fn other_versions_read_the_dead_index() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::connect(&url, &Default::default()).await.unwrap();
        store.migrate().await.unwrap();
        let Store::Sqlite(s) = &store else {
            unreachable!()
        };
        let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(&format!(
            "EXPLAIN QUERY PLAN SELECT count(*) FROM outbox_events WHERE {}",
            other_versions_cond(false)
        ))
        .bind(r#"["a"]"#)
        .bind("v")
        .fetch_all(s.pool())
        .await
        .unwrap();
        let plan: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
        assert!(
            plan.iter()
                .any(|l| l.contains("USING INDEX outbox_events_dead")),
            "{plan:?}"
        );
        assert!(
            plan.iter()
                .any(|l| l.contains("USING INDEX outrun_attempts_event")),
            "{plan:?}"
        );
        assert_eq!(
            store
                .count_other_versions(&["a".into()], "v")
                .await
                .unwrap(),
            0
        );
    }
}
