//! `outrun_attempts`: the history of an event's failed, deferred and
//! interrupted attempts. A row is written by the same statement (SQLite:
//! transaction) that records the failure, which also drops the event's
//! oldest rows beyond the configured number, so a failure costs no extra
//! round trip and the success path none at all. Rows of events that are
//! gone (handled, purged) are deleted by the cleaner.

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

    /// Delete the attempts of events that no longer exist (handled or
    /// purged), at most `limit`; returns how many.
    pub async fn cleanup_attempts(&self, limit: i64) -> Result<u64> {
        Ok(match self {
            Store::Sqlite(s) => sqlx::query(
                "DELETE FROM outrun_attempts WHERE id IN (
                     SELECT a.id FROM outrun_attempts a
                     WHERE NOT EXISTS (SELECT 1 FROM outbox_events e WHERE e.id = a.event_id)
                     LIMIT ?1)",
            )
            .bind(limit)
            .execute(s.pool())
            .await?
            .rows_affected(),
            Store::Postgres(s) => sqlx::query(
                "DELETE FROM outrun_attempts WHERE id IN (
                     SELECT a.id FROM outrun_attempts a
                     WHERE NOT EXISTS (SELECT 1 FROM outbox_events e WHERE e.id = a.event_id)
                     LIMIT $1)",
            )
            .bind(limit)
            .execute(s.pool())
            .await?
            .rows_affected(),
        })
    }
}
