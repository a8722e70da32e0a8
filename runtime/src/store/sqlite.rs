//! The outbox on SQLite: the embedded, zero-setup backend.
//!
//! Shape of the data (see `migrations/sqlite`): ids are lowercase UUIDv7
//! text, timestamps are INTEGER milliseconds since the Unix epoch, and
//! insertion order is the rowid. Time comes from the Rust clock, because
//! SQLite has no server clock and every writer of one file is on one host.
//!
//! SQLite has a single writer, and the runtime's writes go through one
//! connection, [`writer`] (rusqlite, called in the task that needs it): the
//! claims, acks and failures, and every handler's effects transaction. The
//! other connections (a sqlx pool) serve enqueues, admin reads and the
//! application. Every write transaction is `BEGIN IMMEDIATE`, which takes
//! the write lock up front: a deferred transaction that reads first and
//! writes later fails at once with `SQLITE_BUSY` (no busy wait) whenever
//! another connection committed in between. The busy timeout (30 s) makes
//! writers queue instead of failing.
//!
//! Batches (of leases, claimed rowids, enqueued rows) travel as one JSON
//! document bound to a single parameter and unpacked with `json_each`, so
//! each batch operation is one statement.
//!
//! As on PostgreSQL, a claim moves `available_at` to the end of the lease,
//! so leased rows leave the head of the claim index and a lapsed lease makes
//! its row claimable again; release puts it back to now.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    CancelTarget, Cancelled, ConnectOptions, Failure, ListFilter, NameStats, OpenMode, Result,
    SqlRows, SqlValue, Stats, StoreError, redact_url,
};
use crate::event::{Claimed, Event, Lease, NewEvent};

mod limits;
mod schedules;
mod writer;
pub use writer::{
    Writer, WriterConn, WriterGuard, WriterTx, insert_follow_up, rollback as rollback_writer,
};

/// Writers wait this long for the write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Columns of an [`Event`], plus the rowid for ordering a claimed batch.
const EVENT_COLUMNS: &str = "rowid AS seq, id, name, payload, group_id, retry, max_retry, \
     create_date, available_at, expires_at, locked_by, locked_until, last_error, idempotency_key, \
     dead_at, deferrals, traceparent";

#[derive(Clone, Debug)]
pub struct SqliteStore {
    /// Enqueues, admin reads and the application's transactions.
    pool: sqlx::Pool<sqlx::Sqlite>,
    /// The runtime's own writes (claim, extend, ack, fail, release, expiry,
    /// cleanup) and the handlers' effects, on one connection: SQLite has one
    /// writer at a time anyway, a connection whose page cache no other
    /// connection's commit just invalidated reads its B-tree pages from
    /// memory instead of the file, and a call costs no hand-off to another
    /// thread (see [`writer`]).
    writer: Writer,
    /// An in-memory store is a file in a temporary directory (one file, so
    /// the pool and the writer see the same database), removed with the
    /// last clone of the store.
    _scratch: Option<Arc<tempfile::TempDir>>,
    /// Bumped by this store's enqueues, replays and releases; see
    /// [`super::Store::wakeups`].
    wake: Arc<watch::Sender<u64>>,
    /// Checked by [`super::Store::enqueue`]; see [`super::Store::with_schemas`].
    pub(super) schemas: Option<Arc<crate::schema::Schemas>>,
}

/// The pool, and with it the first connection, which creates the file and
/// sets WAL mode. Several processes opening a new database at once (replicas
/// that all run `outrun migrate` on start) can get `SQLITE_BUSY` here
/// without the busy timeout applying: SQLite answers at once instead of
/// waiting where waiting could deadlock, e.g. a connection that holds a read
/// lock while it asks to write. Seen once in a test of six processes
/// migrating a new file. Such an error is transient, so it is retried
/// until the busy timeout would have run out.
async fn connect_pool(
    options: &SqliteConnectOptions,
    opts: &ConnectOptions,
) -> std::result::Result<sqlx::Pool<sqlx::Sqlite>, sqlx::Error> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    loop {
        let pool = SqlitePoolOptions::new()
            .acquire_timeout(opts.acquire_timeout)
            .max_connections(opts.max_connections.max(1))
            .connect_with(options.clone())
            .await;
        match pool {
            Err(e)
                if super::transient::is_sqlite_busy(&e) && std::time::Instant::now() < deadline =>
            {
                tracing::debug!(error = %e, "opening the SQLite database met a lock; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            pool => return pool,
        }
    }
}

impl SqliteStore {
    /// Open (creating if missing) the database file in WAL mode. An
    /// in-memory URL (`sqlite::memory:`) gets a new database in a temporary
    /// directory, gone when the store is: each SQLite connection to
    /// `:memory:` would be a separate, empty database.
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Self> {
        Self::open(url, opts, OpenMode::SERVE).await
    }

    /// As [`SqliteStore::connect`]; without `mode.create` a missing file is
    /// [`StoreError::NoDatabase`] (whatever `mode=` the URL says) and
    /// nothing is created.
    pub async fn open(url: &str, opts: &ConnectOptions, mode: OpenMode) -> Result<Self> {
        let connect_err = |source| StoreError::Connect {
            url: redact_url(url),
            source,
        };
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let scratch = if in_memory {
            Some(Arc::new(tempfile::tempdir().map_err(|e| {
                connect_err(sqlx::Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("creating a temporary directory for the in-memory database: {e}"),
                )))
            })?))
        } else {
            None
        };
        let options = match &scratch {
            Some(dir) => SqliteConnectOptions::new()
                .filename(dir.path().join("outrun.db"))
                .create_if_missing(true),
            None => SqliteConnectOptions::from_str(url)
                .map_err(connect_err)?
                .create_if_missing(mode.create),
        }
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT);
        if !mode.create && scratch.is_none() && !options.get_filename().exists() {
            return Err(StoreError::NoDatabase {
                path: options.get_filename().to_path_buf(),
                url: redact_url(url),
            });
        }
        let pool = connect_pool(&options, opts).await.map_err(connect_err)?;
        // The pool's first connection created the file and set WAL mode.
        let writer = Writer::open(options.get_filename(), BUSY_TIMEOUT).map_err(|e| {
            connect_err(sqlx::Error::Io(std::io::Error::other(format!(
                "opening the writer connection: {e}"
            ))))
        })?;
        Ok(Self {
            pool,
            writer,
            _scratch: scratch,
            wake: Arc::new(watch::Sender::new(0)),
            schemas: None,
        })
    }

    pub fn pool(&self) -> &sqlx::Pool<sqlx::Sqlite> {
        &self.pool
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    pub(super) fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub async fn enqueue(&self, event: &NewEvent, default_max_retry: i32) -> Result<Uuid> {
        let mut conn = self.pool.acquire().await?;
        let id = enqueue_with_default(&mut conn, event, default_max_retry).await?;
        self.wake();
        Ok(id)
    }

    pub async fn enqueue_batch(
        &self,
        events: &[NewEvent],
        default_max_retry: i32,
    ) -> Result<Vec<Uuid>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // One INSERT for the whole batch (one statement per event made the
        // batch ~20k/s). Rows are inserted in array order, so rowids keep
        // the batch's order (groups run in it). Every event is checked
        // before anything is written.
        let now = now_ms();
        let mut ids = Vec::with_capacity(events.len());
        let mut rows = Vec::with_capacity(events.len());
        for ev in events {
            ev.validate()?;
            let id = Uuid::now_v7();
            ids.push(id);
            rows.push(serde_json::json!([
                id.to_string(),
                ev.name,
                ev.payload,
                ev.group_id,
                super::effective_max_retry(ev, default_max_retry)?,
                now.saturating_add(ev.delay.map_or(0, duration_ms)),
                ev.expires_in
                    .map(|ttl| now.saturating_add(duration_ms(ttl))),
                ev.idempotency_key,
                ev.traceparent,
            ]));
        }
        // The traceparent column is named only when an event has one: see
        // ENQUEUE.
        let traced = events.iter().any(|e| e.traceparent.is_some());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let inserted = sqlx::query(if traced {
            "INSERT INTO outbox_events
                 (id, create_date, name, payload, group_id, max_retry, available_at, expires_at, idempotency_key,
                  traceparent)
             SELECT value ->> 0, ?2, value ->> 1, value ->> 2, value ->> 3, value ->> 4,
                    value ->> 5, value ->> 6, value ->> 7, value ->> 8
             FROM json_each(?1) WHERE true
             ON CONFLICT (idempotency_key) DO NOTHING"
        } else {
            "INSERT INTO outbox_events
                 (id, create_date, name, payload, group_id, max_retry, available_at, expires_at, idempotency_key)
             SELECT value ->> 0, ?2, value ->> 1, value ->> 2, value ->> 3, value ->> 4,
                    value ->> 5, value ->> 6, value ->> 7
             FROM json_each(?1) WHERE true
             ON CONFLICT (idempotency_key) DO NOTHING"
        })
        .bind(serde_json::Value::Array(rows).to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted < events.len() as u64 {
            // Some keys were taken (by a live or dead event, or earlier in
            // this batch): those events map to the id that holds the key.
            let keys: Vec<&str> = events
                .iter()
                .filter_map(|e| e.idempotency_key.as_deref())
                .collect();
            let holders: HashMap<String, String> = sqlx::query_as(
                "SELECT idempotency_key, id FROM outbox_events
                 WHERE idempotency_key IN (SELECT value FROM json_each(?1))",
            )
            .bind(serde_json::to_string(&keys).expect("strings serialise"))
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            for (id, ev) in ids.iter_mut().zip(events) {
                if let Some(holder) = ev.idempotency_key.as_ref().and_then(|k| holders.get(k)) {
                    *id = parse_id(holder)?;
                }
            }
        }
        tx.commit().await?;
        self.wake();
        Ok(ids)
    }

    /// Copy what it can of the write-ahead log into the database file
    /// without waiting for readers or writers (`PASSIVE`), on a main-pool
    /// connection. Keeps the WAL short while the bookkeeping connection,
    /// which does not checkpoint by itself, writes.
    pub async fn checkpoint(&self) -> Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        skip_names: &[String],
        excluded: &[String],
    ) -> Result<Vec<Claimed>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let locked_until = now.saturating_add(duration_ms(lease));
        let token = Uuid::new_v4();
        let skip =
            serde_json::to_string(&[skip_names, excluded].concat()).expect("strings serialise");
        let worker_name = worker.to_string();
        let rows = self
            .writer
            .run_tx(move |conn| {
                let mut rows: Vec<(i64, ClaimRow)> = Vec::new();
                {
                    let mut select = conn.prepare_cached(
                        "SELECT e.rowid, e.id, e.name, e.payload, e.group_id, e.retry, e.max_retry,
                        e.create_date, e.available_at, e.expires_at, e.last_error,
                        e.idempotency_key, e.deferrals, e.traceparent
                 FROM outbox_events e
                 WHERE e.retry < e.max_retry
                   AND e.available_at <= ?1
                   AND (e.expires_at IS NULL OR e.expires_at > ?1)
                   AND (e.locked_until IS NULL OR e.locked_until < ?1)
                   AND e.name NOT IN (SELECT value FROM json_each(?2))
                   AND (e.group_id IS NULL OR NOT EXISTS (
                       SELECT 1 FROM outbox_events p
                       WHERE p.group_id = e.group_id AND p.rowid < e.rowid
                         AND p.retry < p.max_retry))
                 ORDER BY e.available_at, e.rowid
                 LIMIT ?3",
                    )?;
                    let mut found = select.query(rusqlite::params![
                        now,
                        skip,
                        i64::try_from(limit).unwrap_or(i64::MAX),
                    ])?;
                    while let Some(r) = found.next()? {
                        rows.push((r.get(0)?, ClaimRow::read(r)?));
                    }
                }
                if rows.is_empty() {
                    return Ok(rows);
                }
                let rowids: Vec<i64> = rows.iter().map(|r| r.0).collect();
                conn.prepare_cached(
                    "UPDATE outbox_events
             SET locked_by = ?1, locked_until = ?2, lock_token = ?3, available_at = ?2
             WHERE rowid IN (SELECT value FROM json_each(?4))",
                )?
                .execute(rusqlite::params![
                    worker_name,
                    locked_until,
                    token.to_string(),
                    serde_json::to_string(&rowids).expect("integers serialise"),
                ])?;
                Ok(rows)
            })
            .await?;
        // Selected in claim order (available_at, rowid).
        rows.into_iter()
            .map(|(seq, r)| {
                Ok(Claimed {
                    event: r.into_event(worker, locked_until)?,
                    token,
                    seq,
                })
            })
            .collect()
    }

    pub async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE outbox_events SET locked_until = ?2, available_at = ?2 WHERE rowid IN ({LEASED_ROWIDS})"
        );
        let json = leases_json(leases);
        let until = now_ms().saturating_add(duration_ms(lease));
        let n = self
            .writer
            .run(move |conn| {
                Ok(conn
                    .prepare_cached(&sql)?
                    .execute(rusqlite::params![json, until])?)
            })
            .await?;
        Ok(n as u64)
    }

    pub async fn ack(&self, leases: &[Lease]) -> Result<Vec<Uuid>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        // All rows gone (the usual case) means every lease was held;
        // otherwise ask which of them another runtime still holds.
        // `retry < max_retry`: an event cancelled while it ran is not
        // deleted as handled.
        let sql = format!(
            "DELETE FROM outbox_events WHERE rowid IN ({LEASED_ROWIDS}) AND retry < max_retry"
        );
        let json = leases_json(leases);
        let all = leases.len();
        let kept = self
            .writer
            .run(move |conn| {
                let deleted = conn.prepare_cached(&sql)?.execute([&json])?;
                if deleted == all {
                    return Ok(None);
                }
                let mut still = conn.prepare_cached(
                    "SELECT e.rowid FROM json_each(?1) AS t, json_each(t.value) AS r
                     JOIN outbox_events e ON e.rowid = r.value",
                )?;
                let kept = still
                    .query_map([&json], |r| r.get::<_, i64>(0))?
                    .collect::<rusqlite::Result<std::collections::HashSet<i64>>>()?;
                Ok(Some(kept))
            })
            .await?;
        let Some(kept) = kept else {
            return Ok(leases.iter().map(|l| l.id).collect());
        };
        Ok(leases
            .iter()
            .filter(|l| !kept.contains(&l.seq))
            .map(|l| l.id)
            .collect())
    }

    pub async fn fail(&self, lease: Lease, failure: &Failure) -> Result<bool> {
        self.fail_with(lease, failure, None).await
    }

    /// [`Self::fail`], and with a record: the attempt's row inserted (and
    /// the event's rows beyond `keep` dropped) in the same transaction.
    pub(super) async fn fail_with(
        &self,
        lease: Lease,
        failure: &Failure,
        record: Option<&super::AttemptRecord>,
    ) -> Result<bool> {
        let id = lease.id.to_string();
        let token = lease.token.to_string();
        let conn = self.writer.lock().await;
        let tx = match record {
            Some(_) => Some(conn.unchecked_transaction()?),
            None => None,
        };
        // `retry < max_retry`: an event cancelled (or marked dead by hand)
        // while it ran stays dead whatever its attempt's verdict.
        let n = match failure {
            Failure::Retry {
                error,
                retry_at,
                max_retry,
            } => conn
                .prepare_cached(
                    // SET expressions see the old row, so `retry + 1` and the
                    // max_retry override are applied to the values before this update.
                    "UPDATE outbox_events
                     SET max_retry = COALESCE(?3, max_retry), retry = retry + 1, last_error = ?4,
                         available_at = ?5, locked_by = NULL, locked_until = NULL, lock_token = NULL,
                         dead_at = CASE WHEN retry + 1 >= COALESCE(?3, max_retry) THEN ?6 END
                     WHERE id = ?1 AND lock_token = ?2 AND retry < max_retry",
                )?
                .execute(rusqlite::params![
                    id,
                    token,
                    max_retry.map(i64::from),
                    error,
                    retry_at.timestamp_millis(),
                    now_ms(),
                ])?,
            Failure::Dead { error } => conn
                .prepare_cached(
                    "UPDATE outbox_events
                     SET retry = max_retry, last_error = ?3, dead_at = ?4,
                         locked_by = NULL, locked_until = NULL, lock_token = NULL
                     WHERE id = ?1 AND lock_token = ?2 AND retry < max_retry",
                )?
                .execute(rusqlite::params![id, token, error, now_ms()])?,
            Failure::Reschedule { at } => conn
                .prepare_cached(
                    "UPDATE outbox_events
                     SET available_at = ?3, deferrals = deferrals + 1,
                         locked_by = NULL, locked_until = NULL, lock_token = NULL
                     WHERE id = ?1 AND lock_token = ?2 AND retry < max_retry",
                )?
                .execute(rusqlite::params![id, token, at.timestamp_millis()])?,
            Failure::Interrupted { error, retry_at } => conn
                .prepare_cached(
                    "UPDATE outbox_events
                     SET last_error = ?3, available_at = ?4,
                         locked_by = NULL, locked_until = NULL, lock_token = NULL
                     WHERE id = ?1 AND lock_token = ?2 AND retry < max_retry",
                )?
                .execute(rusqlite::params![
                    id,
                    token,
                    error,
                    retry_at.timestamp_millis()
                ])?,
        };
        if let (Some(tx), Some(r)) = (tx, record) {
            if n == 1 {
                let a = &r.attempt;
                tx.prepare_cached(
                    "INSERT INTO outrun_attempts
                         (event_id, attempt, started_at, duration_ms, handler, version, instance,
                          outcome, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(rusqlite::params![
                    id,
                    a.attempt,
                    a.started_at.timestamp_millis(),
                    a.duration_ms,
                    a.handler,
                    a.version,
                    a.instance,
                    a.outcome,
                    a.error,
                ])?;
                tx.prepare_cached(
                    "DELETE FROM outrun_attempts
                     WHERE event_id = ?1
                       AND id NOT IN (SELECT id FROM outrun_attempts WHERE event_id = ?1
                                      ORDER BY id DESC LIMIT ?2)",
                )?
                .execute(rusqlite::params![id, i64::from(r.keep.max(1))])?;
            }
            tx.commit()?;
        }
        Ok(n == 1)
    }

    /// Insert `done` attempt records (a JSON array of
    /// `[event_id, attempt, started_at_ms, duration_ms, handler, version,
    /// instance]`) on the writer, as every runtime write goes.
    pub(super) async fn record_done(&self, rows: String) -> Result<()> {
        self.writer
            .run(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO outrun_attempts
                         (event_id, attempt, started_at, duration_ms, handler, version, instance, outcome)
                     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4,
                            value ->> 5, value ->> 6, 'done'
                     FROM json_each(?1)",
                )?
                .execute([rows])?;
                Ok(())
            })
            .await
    }

    pub async fn release(&self, leases: &[Lease]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE outbox_events
             SET locked_by = NULL, locked_until = NULL, lock_token = NULL, available_at = ?2
             WHERE rowid IN ({LEASED_ROWIDS})"
        );
        let json = leases_json(leases);
        let now = now_ms();
        let n = self
            .writer
            .run(move |conn| {
                Ok(conn
                    .prepare_cached(&sql)?
                    .execute(rusqlite::params![json, now])?)
            })
            .await?;
        if n > 0 {
            self.wake();
        }
        Ok(n as u64)
    }

    /// A transaction on the writer for a handler's effects, committed by
    /// [`commit_ack`].
    pub async fn begin(&self) -> Result<super::AckTx> {
        Ok(super::AckTx::Sqlite(WriterTx::begin(&self.writer).await?))
    }

    /// The writer, lent to a lane for one transaction (see `lane.rs`): the
    /// one writer serves claims, acks and effects in turn.
    /// The writer, for the shared effects transaction (`store::shared`).
    pub(super) fn writer(&self) -> Writer {
        self.writer.clone()
    }

    pub(super) async fn lane_connection(&self) -> WriterGuard {
        self.writer.lock().await
    }

    pub async fn expire_due(&self, limit: i64) -> Result<u64> {
        let n = self
            .writer
            .run(move |conn| {
                Ok(conn
                    .prepare_cached(
                        "UPDATE outbox_events
                 SET retry = max_retry, last_error = 'expired', dead_at = ?1,
                     locked_by = NULL, locked_until = NULL, lock_token = NULL
                 WHERE rowid IN (
                     SELECT rowid FROM outbox_events
                     WHERE expires_at IS NOT NULL AND expires_at <= ?1 AND retry < max_retry
                       AND (locked_until IS NULL OR locked_until < ?1)
                     ORDER BY expires_at
                     LIMIT ?2)",
                    )?
                    .execute(rusqlite::params![now_ms(), limit.max(0)])?)
            })
            .await?;
        Ok(n as u64)
    }

    pub async fn cleanup_dead(&self, before: DateTime<Utc>, limit: i64) -> Result<u64> {
        let before = before.timestamp_millis();
        let n = self
            .writer
            .run(move |conn| {
                Ok(conn
                    .prepare_cached(
                        "DELETE FROM outbox_events
                 WHERE rowid IN (
                     SELECT rowid FROM outbox_events
                     WHERE retry >= max_retry AND COALESCE(dead_at, create_date) <= ?1
                     ORDER BY COALESCE(dead_at, create_date)
                     LIMIT ?2)",
                    )?
                    .execute(rusqlite::params![before, limit.max(0)])?)
            })
            .await?;
        Ok(n as u64)
    }

    pub async fn stats(&self) -> Result<Stats> {
        let now = now_ms();
        let row = sqlx::query(&format!("SELECT {STATS_COLUMNS} FROM outbox_events"))
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
        stats_from_row(&row, now)
    }

    pub async fn stats_by_name(&self) -> Result<Vec<NameStats>> {
        let now = now_ms();
        let rows = sqlx::query(&format!(
            "SELECT name, {STATS_COLUMNS} FROM outbox_events GROUP BY name ORDER BY name"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(NameStats {
                    name: row.try_get("name")?,
                    stats: stats_from_row(row, now)?,
                })
            })
            .collect()
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Event>> {
        // Two literal conditions rather than `(retry >= max_retry) = ?` so the
        // planner can use the partial indexes. Dead events newest dead
        // first (the dead index is on this expression).
        let (state, order) = if filter.dead {
            (
                "retry >= max_retry",
                "COALESCE(dead_at, create_date) DESC, rowid DESC",
            )
        } else {
            ("retry < max_retry", "create_date, rowid")
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM outbox_events
             WHERE {state} AND (?1 IS NULL OR name = ?1)
             ORDER BY {order}
             LIMIT ?2"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.name.as_deref())
            .bind(filter.effective_limit())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    pub(super) async fn page(
        &self,
        q: &super::EventQuery,
        limit: i64,
    ) -> Result<Vec<(Event, i64)>> {
        // The time as a literal: a parameter left unused by some states
        // would be refused by SQLite's binding.
        let now = now_ms().to_string();
        let (cond, key) = super::query::filter_cond(q.state, &now, ["?1", "?2", "?3", "?4"], false);
        let (dir, cmp) = if q.state.is_dead() {
            ("DESC", "<")
        } else {
            ("ASC", ">")
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM outbox_events
             WHERE {cond}
               AND (?5 IS NULL OR ({key}, rowid) {cmp} (?5, ?6))
             ORDER BY {key} {dir}, rowid {dir}
             LIMIT ?7"
        );
        let rows = sqlx::query(&sql)
            .bind(q.name.as_deref())
            .bind(q.group_id.as_deref())
            .bind(q.error_contains.as_deref())
            .bind(q.since.map(|t| t.timestamp_millis()))
            .bind(q.after.map(|c| c.at.timestamp_millis()))
            .bind(q.after.map(|c| c.seq))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((event_from_row(row)?, row.try_get::<i64, _>("seq")?)))
            .collect()
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Event>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM outbox_events WHERE id = ?1");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(event_from_row).transpose()
    }

    pub async fn replay(&self, id: Uuid) -> Result<()> {
        let n = sqlx::query(&format!("{REPLAY} WHERE id = ?2 AND retry >= max_retry"))
            .bind(now_ms())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM outbox_events WHERE id = ?1")
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
            return Err(if exists.is_some() {
                StoreError::NotDead(id)
            } else {
                StoreError::NotFound(id)
            });
        }
        self.wake();
        Ok(())
    }

    pub async fn replay_all_dead(&self) -> Result<u64> {
        let n = sqlx::query(&format!("{REPLAY} WHERE retry >= max_retry"))
            .bind(now_ms())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n > 0 {
            self.wake();
        }
        Ok(n)
    }

    /// See [`super::Store::cancel`]. Under the write lock, so nothing
    /// changes between counting the running events and cancelling.
    pub(super) async fn cancel(&self, target: CancelTarget<'_>) -> Result<Cancelled> {
        let cond = match target {
            CancelTarget::Id(_) => "id = ?2".to_owned(),
            CancelTarget::Name { group_id: None, .. } => "name = ?2".to_owned(),
            CancelTarget::Name {
                group_id: Some(_), ..
            } => "name = ?2 AND group_id = ?3".to_owned(),
            CancelTarget::Filter(f) => {
                super::query::filter_cond(
                    f.state.unwrap_or(super::StateFilter::Live),
                    "?1",
                    ["?2", "?3", "?4", "?5"],
                    false,
                )
                .0
            }
        };
        let running = format!(
            "SELECT count(*) FROM outbox_events
             WHERE {cond} AND retry < max_retry AND lock_token IS NOT NULL AND locked_until >= ?1"
        );
        let cancel = format!(
            "UPDATE outbox_events
             SET retry = max_retry, last_error = '{}', dead_at = ?1,
                 locked_by = NULL, locked_until = NULL, lock_token = NULL
             WHERE {cond} AND retry < max_retry",
            super::CANCELLED
        );
        let now = now_ms();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let running: i64 = bind_target(sqlx::query(&running), now, target)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let n = bind_target(sqlx::query(&cancel), now, target)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        if n > 0 {
            // A cancelled head no longer holds back its group.
            self.wake();
        }
        Ok(Cancelled {
            cancelled: n,
            running: running as u64,
            busy: 0,
        })
    }

    /// How many events `f` selects (state: live unless given).
    pub(super) async fn count(&self, f: &super::Filter) -> Result<u64> {
        let now = now_ms().to_string();
        let (cond, _) = super::query::filter_cond(
            f.state.unwrap_or(super::StateFilter::Live),
            &now,
            ["?1", "?2", "?3", "?4"],
            false,
        );
        let n: i64 = bind_filter(
            sqlx::query(&format!("SELECT count(*) FROM outbox_events WHERE {cond}")),
            f,
        )
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        Ok(n as u64)
    }

    /// Replay the dead events `f` selects.
    pub(super) async fn replay_filtered(&self, f: &super::Filter) -> Result<u64> {
        let (cond, _) = super::query::filter_cond(
            super::StateFilter::Dead,
            "?1",
            ["?2", "?3", "?4", "?5"],
            false,
        );
        let n = bind_filter(
            sqlx::query(&format!("{REPLAY} WHERE {cond}")).bind(now_ms()),
            f,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n > 0 {
            self.wake();
        }
        Ok(n)
    }

    /// Delete the dead events `f` selects.
    pub(super) async fn purge_filtered(&self, f: &super::Filter) -> Result<u64> {
        let (cond, _) = super::query::filter_cond(
            super::StateFilter::Dead,
            "0",
            ["?1", "?2", "?3", "?4"],
            false,
        );
        let n = bind_filter(
            sqlx::query(&format!("DELETE FROM outbox_events WHERE {cond}")),
            f,
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }

    pub async fn purge_dead(&self, before: Option<DateTime<Utc>>) -> Result<u64> {
        let n = sqlx::query(
            "DELETE FROM outbox_events
             WHERE retry >= max_retry AND (?1 IS NULL OR COALESCE(dead_at, create_date) <= ?1)",
        )
        .bind(before.map(|t| t.timestamp_millis()))
        .execute(&self.pool)
        .await?;
        Ok(n.rows_affected())
    }
}

/// Rowids of the rows whose lease `?1` (see [`leases_json`]) still holds.
/// Found by rowid and checked by token: a rowid SQLite reused for another
/// row never carries this claim's token.
/// The counts of [`Stats`] (`?1` = now, ms), read by [`stats_from_row`].
const STATS_COLUMNS: &str = "
    COALESCE(SUM(retry < max_retry AND available_at <= ?1
                 AND (locked_until IS NULL OR locked_until < ?1)), 0) AS pending,
    COALESCE(SUM(retry < max_retry AND available_at > ?1
                 AND (locked_until IS NULL OR locked_until < ?1)), 0) AS scheduled,
    COALESCE(SUM(retry < max_retry AND locked_until >= ?1), 0) AS running,
    COALESCE(SUM(retry >= max_retry), 0) AS dead,
    MIN(CASE WHEN retry < max_retry AND available_at <= ?1
                  AND (locked_until IS NULL OR locked_until < ?1)
             THEN available_at END) AS oldest";

fn stats_from_row(row: &SqliteRow, now: i64) -> Result<Stats> {
    let oldest: Option<i64> = row.try_get("oldest")?;
    Ok(Stats::new(
        row.try_get("pending")?,
        row.try_get("scheduled")?,
        row.try_get("running")?,
        row.try_get("dead")?,
        oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0),
    ))
}

const LEASED_ROWIDS: &str = "SELECT e.rowid FROM json_each(?1) AS t, json_each(t.value) AS r
     JOIN outbox_events e ON e.rowid = r.value AND e.lock_token = t.key";

/// Bind now (`?1`) and the parameters of a [`CancelTarget`]'s condition.
fn bind_target<'q>(
    q: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    now: i64,
    target: CancelTarget<'q>,
) -> sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>> {
    let q = q.bind(now);
    match target {
        CancelTarget::Id(id) => q.bind(id.to_string()),
        CancelTarget::Name { name, group_id } => match group_id {
            None => q.bind(name),
            Some(g) => q.bind(name).bind(g),
        },
        CancelTarget::Filter(f) => bind_filter(q, f),
    }
}

/// Bind the four parameters of a [`super::query::filter_cond`] (name,
/// group, error text, since in ms), after those bound already.
fn bind_filter<'q>(
    q: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    f: &'q super::Filter,
) -> sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>> {
    q.bind(f.name.as_deref())
        .bind(f.group_id.as_deref())
        .bind(f.error_contains.as_deref())
        .bind(f.since.map(|t| t.timestamp_millis()))
}

/// Make dead rows live again; `?1` is now. `last_error` stays for the record.
pub(super) const REPLAY: &str = "UPDATE outbox_events
     SET retry = 0, available_at = ?1, expires_at = NULL, dead_at = NULL,
         locked_by = NULL, locked_until = NULL, lock_token = NULL";

/// Enqueue inside the caller's transaction or connection (`&mut *tx`).
/// Validates first; same idempotency key as a live event → that event's id.
pub async fn enqueue(conn: &mut SqliteConnection, event: &NewEvent) -> Result<Uuid> {
    enqueue_with_default(conn, event, super::DEFAULT_MAX_RETRY).await
}

/// Insert one event unless its idempotency key is taken; `?1`..`?9` as in
/// [`enqueue_with_default`]. Returns the id when it inserted. The
/// `traceparent` column is named only by [`ENQUEUE_TRACED`] (`?10`), for
/// events that have one, so enqueue keeps working against a database not
/// yet migrated to it (an application deploying before `outrun migrate`).
const ENQUEUE: &str = "INSERT INTO outbox_events
         (id, create_date, name, payload, group_id, max_retry, available_at, expires_at, idempotency_key)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
     ON CONFLICT (idempotency_key) DO NOTHING
     RETURNING id";
const ENQUEUE_TRACED: &str = "INSERT INTO outbox_events
         (id, create_date, name, payload, group_id, max_retry, available_at, expires_at, idempotency_key,
          traceparent)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
     ON CONFLICT (idempotency_key) DO NOTHING
     RETURNING id";

/// [`ENQUEUE`] for an event without an idempotency key, whose id the
/// caller knows: nothing can conflict, nothing needs returning.
const INSERT: &str = "INSERT INTO outbox_events
         (id, create_date, name, payload, group_id, max_retry, available_at, expires_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const INSERT_TRACED: &str = "INSERT INTO outbox_events
         (id, create_date, name, payload, group_id, max_retry, available_at, expires_at, traceparent)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?10)";

/// The event that holds idempotency key `?1`.
const KEY_HOLDER: &str = "SELECT id FROM outbox_events WHERE idempotency_key = ?1";

fn key_kept_conflicting(event: &NewEvent) -> StoreError {
    StoreError::Db(sqlx::Error::Protocol(format!(
        "idempotency key {:?} kept conflicting but its event could not be read; retry the enqueue",
        event.idempotency_key
    )))
}

/// [`enqueue`] with the runtime's default `max_retry` for events that set none.
pub async fn enqueue_with_default(
    conn: &mut SqliteConnection,
    event: &NewEvent,
    default_max_retry: i32,
) -> Result<Uuid> {
    event.validate()?;
    let now = now_ms();
    let max_retry = super::effective_max_retry(event, default_max_retry)?;
    // A key can vanish between the conflicting INSERT and the SELECT (its
    // event was acknowledged meanwhile); the next INSERT then succeeds.
    for _ in 0..3 {
        let id = Uuid::now_v7();
        let sql = if event.traceparent.is_some() {
            ENQUEUE_TRACED
        } else {
            ENQUEUE
        };
        let insert = sqlx::query_scalar(sql)
            .bind(id.to_string())
            .bind(now)
            .bind(&event.name)
            .bind(&event.payload)
            .bind(event.group_id.as_deref())
            .bind(i64::from(max_retry))
            .bind(now.saturating_add(event.delay.map_or(0, duration_ms)))
            .bind(
                event
                    .expires_in
                    .map(|ttl| now.saturating_add(duration_ms(ttl))),
            )
            .bind(event.idempotency_key.as_deref());
        let insert = match &event.traceparent {
            Some(tp) => insert.bind(tp.as_str()),
            None => insert,
        };
        let inserted: Option<String> = insert.fetch_optional(&mut *conn).await?;
        if inserted.is_some() {
            return Ok(id);
        }
        let existing: Option<String> = sqlx::query_scalar(KEY_HOLDER)
            .bind(event.idempotency_key.as_deref())
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(existing) = existing {
            return parse_id(&existing);
        }
    }
    Err(key_kept_conflicting(event))
}

/// Run a row-returning statement for the `sql` capability, in the writer's
/// open transaction. Values come back by their SQLite storage class
/// (INTEGER, REAL, TEXT, BLOB, NULL), so a BOOLEAN column reads as an int.
/// Parameters bind to `?`, `?N` or `$N`, by their own kind (a boolean as an
/// INTEGER 0/1): SQLite types values, not placeholders, so no earlier call
/// can make a later one mismatch. The column's affinity then converts as
/// SQLite always does (text `'42'` into an INTEGER column is stored as 42,
/// `'abc'` stays text); only STRICT tables reject a kind. A placeholder
/// without a value is NULL.
pub fn query(conn: &WriterConn, statement: &str, params: &[SqlValue]) -> Result<SqlRows> {
    writer::query(conn, statement, params)
}

/// Run a statement for the `sql` capability; rows affected.
pub fn execute(conn: &WriterConn, statement: &str, params: &[SqlValue]) -> Result<u64> {
    writer::execute(conn, statement, params)
}

/// Insert a follow-up event in the writer's open transaction.
pub fn enqueue_in(
    conn: &rusqlite::Connection,
    event: &NewEvent,
    default_max_retry: i32,
) -> Result<Uuid> {
    writer::enqueue(conn, event, default_max_retry)
}

/// Process-wide SQLite settings, before any connection opens (they are
/// refused afterwards, harmlessly). Memory statistics off: with them on,
/// every allocation inside SQLite takes a global mutex, which cost about
/// 5% of the CPU of a handler that emits events (profiled).
pub fn tune_library() {
    // SAFETY: sqlite3_config is called before this process uses SQLite
    // (first thing in main), with an integer argument, as it requires.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int)
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        tracing::debug!(
            rc,
            "SQLite was already initialised; memory statistics stay on"
        );
    }
}

/// Delete the kept events' rows if every one is still ours, then COMMIT;
/// otherwise ROLLBACK. `Ok(false)`: rolled back, a lease was lost (see
/// [`super::lane`] on fencing).
pub fn finish_kept(c: &WriterConn, kept: &[super::lane::Kept]) -> Result<bool> {
    let deleted = if kept.is_empty() {
        0
    } else {
        let rowids: Vec<i64> = kept.iter().map(|k| k.lease.seq).collect();
        // One token per claim, so a handful for hundreds of events: the
        // statement parses this list on the writer, while everyone waits.
        let mut tokens: Vec<String> = kept.iter().map(|k| k.lease.token.to_string()).collect();
        tokens.sort_unstable();
        tokens.dedup();
        c.prepare_cached(
            "DELETE FROM outbox_events
             WHERE rowid IN (SELECT value FROM json_each(?1))
               AND lock_token IN (SELECT value FROM json_each(?2))
               AND retry < max_retry",
        )?
        .execute([
            serde_json::to_string(&rowids).expect("integers serialize"),
            serde_json::to_string(&tokens).expect("strings serialize"),
        ])?
    };
    let ok = deleted == kept.len();
    c.execute_batch(if ok { "COMMIT" } else { "ROLLBACK" })?;
    Ok(ok)
}

/// Delete the handled event if its lease still holds and commit; otherwise
/// roll back everything the handler did.
pub fn commit_ack(tx: WriterTx, lease: Lease) -> Result<bool> {
    let n = tx
        .conn()
        .prepare_cached(
            "DELETE FROM outbox_events WHERE id = ?1 AND lock_token = ?2 AND retry < max_retry",
        )?
        .execute([lease.id.to_string(), lease.token.to_string()])?;
    if n == 1 {
        tx.commit()?;
        Ok(true)
    } else {
        tx.rollback()?;
        Ok(false)
    }
}

/// One claimed row as `claim` selects it.
struct ClaimRow {
    id: String,
    name: String,
    payload: String,
    group_id: Option<String>,
    retry: i64,
    max_retry: i64,
    create_date: i64,
    available_at: i64,
    expires_at: Option<i64>,
    last_error: Option<String>,
    idempotency_key: Option<String>,
    deferrals: i64,
    traceparent: Option<String>,
}

impl ClaimRow {
    /// Columns 1 to 13 of a claim's SELECT (column 0 is the rowid).
    fn read(r: &rusqlite::Row) -> rusqlite::Result<ClaimRow> {
        Ok(ClaimRow {
            id: r.get(1)?,
            name: r.get(2)?,
            payload: r.get(3)?,
            group_id: r.get(4)?,
            retry: r.get(5)?,
            max_retry: r.get(6)?,
            create_date: r.get(7)?,
            available_at: r.get(8)?,
            expires_at: r.get(9)?,
            last_error: r.get(10)?,
            idempotency_key: r.get(11)?,
            deferrals: r.get(12)?,
            traceparent: r.get(13)?,
        })
    }

    fn into_event(self, worker: &str, locked_until: i64) -> Result<Event> {
        Ok(Event {
            id: parse_id(&self.id)?,
            name: self.name,
            payload: self.payload,
            group_id: self.group_id,
            retry: clamp_i32(self.retry),
            max_retry: clamp_i32(self.max_retry),
            create_date: ms_to_time(self.create_date)?,
            available_at: ms_to_time(self.available_at)?,
            expires_at: self.expires_at.map(ms_to_time).transpose()?,
            locked_by: Some(worker.to_string()),
            locked_until: Some(ms_to_time(locked_until)?),
            last_error: self.last_error,
            idempotency_key: self.idempotency_key,
            // Claimed events are live.
            dead_at: None,
            deferrals: clamp_i32(self.deferrals),
            traceparent: self.traceparent,
        })
    }
}

fn event_from_row(row: &SqliteRow) -> Result<Event> {
    Ok(Event {
        id: parse_id(row.try_get("id")?)?,
        name: row.try_get("name")?,
        payload: row.try_get("payload")?,
        group_id: row.try_get("group_id")?,
        retry: clamp_i32(row.try_get("retry")?),
        max_retry: clamp_i32(row.try_get("max_retry")?),
        create_date: ms_to_time(row.try_get("create_date")?)?,
        available_at: ms_to_time(row.try_get("available_at")?)?,
        expires_at: row
            .try_get::<Option<i64>, _>("expires_at")?
            .map(ms_to_time)
            .transpose()?,
        locked_by: row.try_get("locked_by")?,
        locked_until: row
            .try_get::<Option<i64>, _>("locked_until")?
            .map(ms_to_time)
            .transpose()?,
        last_error: row.try_get("last_error")?,
        idempotency_key: row.try_get("idempotency_key")?,
        dead_at: row
            .try_get::<Option<i64>, _>("dead_at")?
            .map(ms_to_time)
            .transpose()?,
        deferrals: clamp_i32(row.try_get("deferrals")?),
        traceparent: row.try_get("traceparent")?,
    })
}

fn parse_id(text: &str) -> Result<Uuid> {
    Uuid::parse_str(text).map_err(|e| {
        StoreError::Db(sqlx::Error::Decode(
            format!("outbox_events.id {text:?} is not a UUID ({e}); fix or delete that row").into(),
        ))
    })
}

fn ms_to_time(ms: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| {
        StoreError::Db(sqlx::Error::Decode(
            format!("timestamp {ms} ms is out of range; outbox_events stores Unix milliseconds")
                .into(),
        ))
    })
}

fn clamp_i32(v: i64) -> i32 {
    v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}

pub(super) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Leases as `{"token": [rowid, ...], ...}`: a batch usually comes from a
/// few claims, so this is short, and SQLite joins it without parsing a
/// pair per row.
fn leases_json(leases: &[Lease]) -> String {
    let mut by_token: HashMap<String, Vec<i64>> = HashMap::new();
    for l in leases {
        by_token.entry(l.token.to_string()).or_default().push(l.seq);
    }
    serde_json::to_string(&by_token).expect("strings and integers serialise")
}
