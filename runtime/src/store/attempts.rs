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
}
