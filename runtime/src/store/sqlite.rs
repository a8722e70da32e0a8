//! The outbox on Sqlite. (Skeleton: the store work fills this in.)

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;
use uuid::Uuid;

use super::{ConnectOptions, Failure, ListFilter, Result, SqlRows, SqlValue, Stats};
use crate::event::{Claimed, Event, Lease, NewEvent};

#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: sqlx::Pool<sqlx::Sqlite>,
}

impl SqliteStore {
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Self> {
        todo!()
    }
    pub fn pool(&self) -> &sqlx::Pool<sqlx::Sqlite> {
        &self.pool
    }
    pub async fn migrate(&self) -> Result<()> {
        todo!()
    }
    pub async fn enqueue(&self, event: &NewEvent, default_max_retry: i32) -> Result<Uuid> {
        todo!()
    }
    pub async fn enqueue_batch(
        &self,
        events: &[NewEvent],
        default_max_retry: i32,
    ) -> Result<Vec<Uuid>> {
        todo!()
    }
    pub async fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        skip_names: &[String],
    ) -> Result<Vec<Claimed>> {
        todo!()
    }
    pub async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<u64> {
        todo!()
    }
    pub async fn ack(&self, leases: &[Lease]) -> Result<Vec<Uuid>> {
        todo!()
    }
    pub async fn fail(&self, lease: Lease, failure: &Failure) -> Result<bool> {
        todo!()
    }
    pub async fn release(&self, leases: &[Lease]) -> Result<u64> {
        todo!()
    }
    pub async fn begin(&self) -> Result<super::AckTx> {
        todo!()
    }
    pub async fn expire_due(&self, limit: i64) -> Result<u64> {
        todo!()
    }
    pub async fn cleanup_dead(&self, before: DateTime<Utc>, limit: i64) -> Result<u64> {
        todo!()
    }
    pub async fn stats(&self) -> Result<Stats> {
        todo!()
    }
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Event>> {
        todo!()
    }
    pub async fn get(&self, id: Uuid) -> Result<Option<Event>> {
        todo!()
    }
    pub async fn replay(&self, id: Uuid) -> Result<()> {
        todo!()
    }
    pub async fn replay_all_dead(&self) -> Result<u64> {
        todo!()
    }
    pub async fn purge_dead(&self, before: Option<DateTime<Utc>>) -> Result<u64> {
        todo!()
    }
}

/// Enqueue inside the caller's transaction or connection (`&mut *tx`).
/// Validates first; same idempotency key as a live event → that event's id.
pub async fn enqueue(conn: &mut SqliteConnection, event: &NewEvent) -> Result<Uuid> {
    enqueue_with_default(conn, event, super::DEFAULT_MAX_RETRY).await
}

pub async fn enqueue_with_default(
    conn: &mut SqliteConnection,
    event: &NewEvent,
    default_max_retry: i32,
) -> Result<Uuid> {
    todo!()
}

pub async fn query(
    conn: &mut SqliteConnection,
    statement: &str,
    params: &[SqlValue],
) -> Result<SqlRows> {
    todo!()
}

pub async fn execute(
    conn: &mut SqliteConnection,
    statement: &str,
    params: &[SqlValue],
) -> Result<u64> {
    todo!()
}

pub async fn commit_ack(
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    lease: Lease,
) -> Result<bool> {
    todo!()
}
