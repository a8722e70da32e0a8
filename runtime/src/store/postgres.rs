//! The outbox on PostgreSQL: the backend several runtime instances share.
//!
//! Time is always the database clock (`now()`), so instances with skewed
//! clocks agree on what is ready and whose lease has lapsed. Claims lock with
//! `FOR UPDATE SKIP LOCKED` so concurrent claimers split the ready rows
//! instead of queueing behind each other, and every batch operation binds
//! whole arrays (`unnest`) so it is one statement however large the batch.
//! Durations cross the wire as whole microseconds (`$n * interval '1
//! microsecond'`), PostgreSQL's timestamp resolution.
//!
//! A claim also moves the row's `available_at` to the end of its lease (a
//! visibility timeout): leased rows leave the head of the claim index, so a
//! claim never walks past the rows other workers hold, and a lapsed lease
//! makes its row claimable again with no separate rescue. Release puts it
//! back to now.
//!
//! The runtime's own bookkeeping (claim, extend, ack, fail, release,
//! expiry, cleanup) runs on a small second pool whose sessions use
//! `synchronous_commit = off`: a server crash can forget the last moments
//! of that bookkeeping, which only means those events are delivered again
//! (at least once, never lost), and no commit waits for a WAL flush.
//! Enqueues commit on the main pool, durably, as the server is configured.
//! A handler's effects and its ack commit in lanes (see `lane.rs`), on
//! dedicated sessions, also asynchronously: the delete and the effects are
//! forgotten together or not at all, so a crash means a rerun.
//!
//! A lane deletes its events' rows just before it commits; the lease
//! extender skips rows locked that way (`SKIP LOCKED`) rather than queue
//! behind the commit.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveTime, Utc};
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgListener, PgPoolOptions, PgRow, PgStatement, PgTypeInfo,
};
use sqlx::{Column, Either, Executor, PgConnection, Postgres, Row, Statement, ValueRef};
use uuid::Uuid;

use super::{
    CancelTarget, Cancelled, ConnectOptions, Failure, ListFilter, NameStats, OpenMode, Result,
    SqlRows, SqlValue, Stats, StoreError, redact_url,
};
use crate::event::{Claimed, Event, Lease, NewEvent};

mod limits;
mod params;
pub(crate) mod pipe;
mod schedules;

/// The LISTEN/NOTIFY channel the insert trigger and replays signal.
pub const CHANNEL: &str = "outrun_events";

/// The statement of [`Store::page`](super::Store::page) for `state`:
/// binds name, group, error text, since, cursor time, cursor seq, limit.
/// Public so tests/dashboard.rs can show its plan on a large table.
#[doc(hidden)]
pub fn page_sql(state: super::StateFilter) -> String {
    let (cond, key) = super::query::filter_cond(state, "now()", ["$1", "$2", "$3", "$4"], true);
    let (dir, cmp) = if state.is_dead() {
        ("DESC", "<")
    } else {
        ("ASC", ">")
    };
    format!(
        "SELECT {EVENT_COLUMNS} FROM outbox_events
         WHERE {cond}
           AND ($5::timestamptz IS NULL OR ({key}, seq) {cmp} ($5, $6))
         ORDER BY {key} {dir}, seq {dir}
         LIMIT $7"
    )
}

/// The statement of [`Store::count_matching`](super::Store::count_matching)
/// (a bulk dry run): binds name, group, error text, since.
#[doc(hidden)]
pub fn count_sql(state: super::StateFilter) -> String {
    let (cond, _) = super::query::filter_cond(state, "now()", ["$1", "$2", "$3", "$4"], true);
    format!("SELECT count(*) FROM outbox_events WHERE {cond}")
}

/// The statement `SELECT` of [`Store::get`](super::Store::get): binds the id.
#[doc(hidden)]
pub fn get_sql() -> String {
    format!("SELECT {EVENT_COLUMNS} FROM outbox_events WHERE id = $1")
}

const EVENT_COLUMNS: &str = "seq, id, name, payload, group_id, retry, max_retry, create_date, \
     available_at, expires_at, locked_by, locked_until, last_error, idempotency_key, dead_at, \
     deferrals, traceparent";

/// Connections of the bookkeeping pool: the claimer, the acker, the lease
/// extender and a worker recording a failure each hold one briefly.
const BOOKKEEPING_CONNECTIONS: u32 = 4;

/// Session settings of the bookkeeping pool. Asynchronous commit: see the
/// module docs. The planner settings pin the plans of these few statements
/// to what they are built for, small batches walked in index order:
/// without statistics (a table that filled up before autoanalyze ran, the
/// usual start of a backlog) the planner chose to sort every live row for
/// each claim and to hash-join the batch against a sequential scan: 57 ms
/// per claim of 256 at 100k pending instead of 2.4 ms. JIT never pays off
/// for statements this short.
const BOOKKEEPING_SETTINGS: [(&str, &str); 7] = [
    ("synchronous_commit", "off"),
    ("enable_sort", "off"),
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("jit", "off"),
];

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: sqlx::Pool<sqlx::Postgres>,
    /// Claims, acks, leases and verdicts; see the module docs.
    bookkeeping: sqlx::Pool<sqlx::Postgres>,
    /// How lanes connect (see `lane.rs`).
    lane_options: Arc<PgConnectOptions>,
    /// How pipes connect (see `pipe.rs`); `None` when tokio-postgres
    /// cannot read the URL.
    pipe_config: Option<Arc<tokio_postgres::Config>>,
    cursor: Arc<Mutex<ClaimCursor>>,
    /// The same for each limit's own claims (`store/postgres/limits.rs`),
    /// by limit id.
    pub(super) limit_cursors: Arc<Mutex<HashMap<String, ClaimCursor>>>,
    /// Checked by [`super::Store::enqueue`]; see [`super::Store::with_schemas`].
    pub(super) schemas: Option<Arc<crate::schema::Schemas>>,
}

/// Where the claims of this store left off in the claim index.
///
/// A claimed or acked row leaves a dead entry at the head of the claim index
/// until VACUUM removes it (autovacuum: about once a minute), and a claim
/// that starts at the head walks every one of them: at 30k events/s that
/// was 2-7 ms per claim, more than the claim itself. So while there is a
/// backlog (claims come back full), a claim resumes after the last row
/// claimed (`(available_at, seq) > after`). Rows can sort before the cursor:
/// an event committed by a transaction that started earlier (its
/// `available_at` is the transaction's start), one written with a past
/// `available_at`, a group's next event, a handler's follow-ups, events
/// skipped while their handler was at its cap. So a claim starts from the
/// head again whenever the last claim came back short (no backlog: the
/// usual case at moderate load), after [`PgStore::rewind`] (the dispatcher
/// calls it when a verdict may have unblocked a group or emitted events),
/// whenever names are skipped, and at least every [`RESCAN_EVERY`], which
/// bounds how long such a row waits behind a backlog.
#[derive(Debug, Default)]
pub(super) struct ClaimCursor {
    after: Option<(DateTime<Utc>, i64)>,
    scanned_from_head: Option<Instant>,
    /// Bumped by every rewind: a claim that was already running when the
    /// rewind came must not set the cursor again from its result.
    rewinds: u64,
}

impl ClaimCursor {
    /// Where the next claim starts (`None`: the head), and the rewinds so
    /// far for [`ClaimCursor::advance`]. `may_resume` is false when the
    /// claim skips names (rows it skipped sort before the cursor).
    pub(super) fn start(&self, may_resume: bool) -> (Option<(DateTime<Utc>, i64)>, u64) {
        let fresh = self
            .scanned_from_head
            .is_some_and(|t| t.elapsed() < RESCAN_EVERY);
        (self.after.filter(|_| fresh && may_resume), self.rewinds)
    }

    /// After a claim that started at the head (`from_head`) or after the
    /// cursor and took rows up to `last`: resume after them only while
    /// claims come back `full` (a backlog). A short claim means the
    /// claimable rows ran out, and the next claim starts from the head,
    /// where rows that sort before the cursor wait.
    pub(super) fn advance(
        &mut self,
        from_head: bool,
        rewinds: u64,
        last: Option<(DateTime<Utc>, i64)>,
        full: bool,
    ) {
        if from_head {
            self.scanned_from_head = Some(Instant::now());
        }
        self.after = match last {
            _ if self.rewinds != rewinds => None,
            Some(reached) if full => Some(self.after.map_or(reached, |a| a.max(reached))),
            _ => None,
        };
    }

    fn rewind(&mut self) {
        self.after = None;
        self.rewinds += 1;
    }
}

/// The claim, from the head of the claim index or after the cursor
/// (`$6, $7`). Built once: the statement text is also sqlx's key for its
/// prepared statement.
static CLAIM_FROM_HEAD: LazyLock<String> = LazyLock::new(|| claim_sql(""));
static CLAIM_AFTER_CURSOR: LazyLock<String> =
    LazyLock::new(|| claim_sql("AND (e.available_at, e.seq) > ($6, $7)"));

/// The group check sees an earlier live event whether it is pending,
/// backing off or leased by someone else (row locks do not hide rows from
/// a plain subquery), so a group never runs two events at once.
fn claim_sql(range: &str) -> String {
    format!(
        "WITH ready AS (
             SELECT e.id, e.available_at FROM outbox_events e
             WHERE e.retry < e.max_retry
               AND e.available_at <= now() {range}
               AND (e.expires_at IS NULL OR e.expires_at > now())
               AND e.name <> ALL($2::text[])
               AND (e.group_id IS NULL OR NOT EXISTS (
                   SELECT 1 FROM outbox_events p
                   WHERE p.group_id = e.group_id AND p.seq < e.seq
                     AND p.retry < p.max_retry))
             ORDER BY e.available_at, e.seq
             LIMIT $3
             FOR UPDATE SKIP LOCKED)
         UPDATE outbox_events o
         SET locked_by = $1, lock_token = $5,
             locked_until = now() + $4 * interval '1 microsecond',
             available_at = now() + $4 * interval '1 microsecond'
         FROM ready WHERE o.id = ready.id
         RETURNING {}",
        // The event as it was due, not its new lease-end available_at.
        prefixed("o", EVENT_COLUMNS).replace("o.available_at", "ready.available_at")
    )
}

/// One connection made directly, then closed: its error is the real cause
/// (`Connection refused`, a wrong password, an unknown database), at once.
/// With `wait`, a refused connection or a server that is starting up
/// (57P03) is tried again until `timeout`, and the last cause is returned.
/// Every attempt is bounded by what is left of `timeout`.
async fn first_connect(
    options: &PgConnectOptions,
    timeout: Duration,
    wait: bool,
) -> std::result::Result<(), sqlx::Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = <PgConnection as sqlx::Connection>::connect_with(options);
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok(conn)) => {
                let _ = sqlx::Connection::close(conn).await;
                return Ok(());
            }
            Ok(Err(e)) => {
                let starting = match &e {
                    sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
                    sqlx::Error::Database(db) => db.code().as_deref() == Some("57P03"),
                    _ => false,
                };
                if !(wait && starting && tokio::time::Instant::now() + pause < deadline) {
                    return Err(e);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(_) => {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                )));
            }
        }
    }
}

/// The longest a claim range goes without a scan from the head.
const RESCAN_EVERY: Duration = Duration::from_millis(500);

impl PgStore {
    /// Connect eagerly, so a wrong URL or a server that is down is reported
    /// here rather than at the first claim. A server that refuses
    /// connections (it may be starting) is tried again until the acquire
    /// timeout.
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Self> {
        Self::open(url, opts, OpenMode::SERVE).await
    }

    /// As [`PgStore::connect`]; without `mode.wait_for_server` a refused
    /// connection is an error at once.
    pub async fn open(url: &str, opts: &ConnectOptions, mode: OpenMode) -> Result<Self> {
        let connect_err = |source| StoreError::Connect {
            url: redact_url(url),
            source,
        };
        let options = PgConnectOptions::from_str(url).map_err(connect_err)?;
        first_connect(&options, opts.acquire_timeout, mode.wait_for_server)
            .await
            .map_err(connect_err)?;
        // Lazy: the server just answered. (An eager pool would retry a
        // refused connection until its acquire timeout and then report
        // only "pool timed out", without the cause.)
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            .connect_lazy_with(options.clone());
        // Lazy: the URL was just proven good, and commands that never claim
        // (enqueue, events list) open no second connection.
        let bookkeeping = PgPoolOptions::new()
            .max_connections(BOOKKEEPING_CONNECTIONS)
            .acquire_timeout(opts.acquire_timeout)
            .connect_lazy_with(options.clone().options(BOOKKEEPING_SETTINGS));
        let pipe_config = match tokio_postgres::Config::from_str(url) {
            Ok(mut c) => {
                c.connect_timeout(opts.acquire_timeout);
                // Tells operators (pg_stat_activity) which sessions these
                // are, unless the URL names the application.
                if c.get_application_name().is_none() {
                    c.application_name(pipe::APPLICATION_NAME);
                }
                Some(Arc::new(c))
            }
            Err(e) => {
                tracing::info!(error = %e, "this database URL cannot be used for pipelined effects transactions; lanes carry every handler's effects");
                None
            }
        };
        Ok(Self {
            pool,
            bookkeeping,
            pipe_config,
            lane_options: Arc::new(options.options(super::lane::lane_settings())),
            cursor: Arc::default(),
            limit_cursors: Arc::default(),
            schemas: None,
        })
    }

    /// Make the next claim scan from the head of the claim index: work may
    /// have become claimable before the cursor.
    pub fn rewind(&self) {
        self.cursor.lock().expect("claim cursor lock").rewind();
        for c in self
            .limit_cursors
            .lock()
            .expect("limit cursors lock")
            .values_mut()
        {
            c.rewind();
        }
    }

    pub(super) fn pipe_config(&self) -> Option<Arc<tokio_postgres::Config>> {
        self.pipe_config.clone()
    }

    pub fn pool(&self) -> &sqlx::Pool<sqlx::Postgres> {
        &self.pool
    }

    /// A listener on [`CHANNEL`], on a one-connection pool of its own: the
    /// listener reconnects inside `try_recv`, which the claim loop may
    /// cancel mid-`LISTEN`; a connection left listening must not return to
    /// a pool that runs statements (its notifications then surface as
    /// "unexpected message" errors in someone's transaction).
    pub(super) async fn listen(&self) -> Result<PgListener> {
        let own = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*self.lane_options).clone());
        let mut listener = PgListener::connect_with(&own).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }

    pub async fn enqueue(&self, event: &NewEvent, default_max_retry: i32) -> Result<Uuid> {
        let mut conn = self.pool.acquire().await?;
        enqueue_with_default(&mut conn, event, default_max_retry).await
    }

    /// One multi-row INSERT over `unnest` of column arrays. Rows whose
    /// idempotency key already exists (or repeats within the batch) map to
    /// the id that holds the key.
    pub async fn enqueue_batch(
        &self,
        events: &[NewEvent],
        default_max_retry: i32,
    ) -> Result<Vec<Uuid>> {
        let mut cols = BatchColumns::default();
        for ev in events {
            ev.validate()?;
            cols.push(ev, default_max_retry)?;
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let traced = cols.traceparents.iter().any(Option::is_some);
        let mut tx = self.pool.begin().await?;
        let mut insert = sqlx::query_scalar(if traced {
            &ENQUEUE_BATCH_TRACED
        } else {
            &ENQUEUE_BATCH
        })
        .bind(&cols.ids)
        .bind(&cols.names)
        .bind(&cols.payloads)
        .bind(&cols.groups)
        .bind(&cols.max_retries)
        .bind(&cols.delays_us)
        .bind(&cols.ttls_us)
        .bind(&cols.keys);
        if traced {
            insert = insert.bind(&cols.traceparents);
        }
        let inserted: Vec<Uuid> = insert.fetch_all(&mut *tx).await?;

        let mut ids = cols.ids.clone();
        if inserted.len() < events.len() {
            let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
            let conflicted: Vec<String> = events
                .iter()
                .zip(&ids)
                .filter(|(_, id)| !inserted.contains(id))
                .filter_map(|(ev, _)| ev.idempotency_key.clone())
                .collect();
            let holders: HashMap<String, Uuid> = sqlx::query_as::<_, (String, Uuid)>(
                "SELECT idempotency_key, id FROM outbox_events WHERE idempotency_key = ANY($1)",
            )
            .bind(&conflicted)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            for (ev, id) in events.iter().zip(ids.iter_mut()) {
                if inserted.contains(id) {
                    continue;
                }
                *id = match ev.idempotency_key.as_ref().and_then(|k| holders.get(k)) {
                    Some(holder) => *holder,
                    // The holder was acknowledged between the INSERT and the
                    // SELECT: insert this one on its own.
                    None => enqueue_with_default(&mut tx, ev, default_max_retry).await?,
                };
            }
        }
        tx.commit().await?;
        Ok(ids)
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
        let token = Uuid::new_v4();
        let (after, rewinds) = self
            .cursor
            .lock()
            .expect("claim cursor lock")
            .start(skip_names.is_empty());
        let sql = if after.is_some() {
            &*CLAIM_AFTER_CURSOR
        } else {
            &*CLAIM_FROM_HEAD
        };
        let mut query = sqlx::query(sql)
            .bind(worker)
            .bind(if excluded.is_empty() {
                skip_names.to_vec()
            } else {
                [skip_names, excluded].concat()
            })
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(duration_us(lease))
            .bind(token);
        if let Some((at, seq)) = after {
            query = query.bind(at).bind(seq);
        }
        let rows = query.fetch_all(&self.bookkeeping).await?;
        // RETURNING order is unspecified; hand the batch out oldest first.
        let mut claimed = rows
            .iter()
            .map(|r| Ok((event_from_row(r)?, r.try_get::<i64, _>("seq")?)))
            .collect::<Result<Vec<_>>>()?;
        claimed.sort_by_key(|(e, seq)| (e.available_at, *seq));
        self.cursor.lock().expect("claim cursor lock").advance(
            after.is_none(),
            rewinds,
            claimed.last().map(|(e, seq)| (e.available_at, *seq)),
            claimed.len() == limit,
        );
        Ok(claimed
            .into_iter()
            .map(|(event, seq)| Claimed { event, token, seq })
            .collect())
    }

    pub async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (ids, tokens) = split(leases);
        let n = sqlx::query(
            "UPDATE outbox_events o
             SET locked_until = now() + $3 * interval '1 microsecond',
                 available_at = now() + $3 * interval '1 microsecond'
             FROM (SELECT e.id FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
                   JOIN outbox_events e ON e.id = l.id AND e.lock_token = l.token
                   FOR UPDATE OF e SKIP LOCKED) AS held
             WHERE o.id = held.id",
        )
        .bind(ids)
        .bind(tokens)
        .bind(duration_us(lease))
        .execute(&self.bookkeeping)
        .await?;
        Ok(n.rows_affected())
    }

    pub async fn ack(&self, leases: &[Lease]) -> Result<Vec<Uuid>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens) = split(leases);
        Ok(sqlx::query_scalar(
            "DELETE FROM outbox_events o
             USING unnest($1::uuid[], $2::uuid[]) AS l(id, token)
             WHERE o.id = l.id AND o.lock_token = l.token AND o.retry < o.max_retry
             RETURNING o.id",
        )
        .bind(ids)
        .bind(tokens)
        .fetch_all(&self.bookkeeping)
        .await?)
    }

    pub async fn fail(&self, lease: Lease, failure: &Failure) -> Result<bool> {
        self.fail_with(lease, failure, None).await
    }

    /// [`Self::fail`], and with a record: the attempt's row inserted (and
    /// the event's rows beyond `keep` dropped) by the same statement.
    pub(super) async fn fail_with(
        &self,
        lease: Lease,
        failure: &Failure,
        record: Option<&super::AttemptRecord>,
    ) -> Result<bool> {
        // `retry < max_retry`: an event cancelled (or marked dead by hand)
        // while it ran stays dead whatever its attempt's verdict.
        let (update, params) = match failure {
            // SET expressions see the old row, so `retry + 1` and the
            // max_retry override are applied to the values before this update.
            Failure::Retry { .. } => (
                "UPDATE outbox_events
                 SET max_retry = COALESCE($3, max_retry), retry = retry + 1, last_error = $4,
                     available_at = $5, locked_by = NULL, locked_until = NULL, lock_token = NULL,
                     dead_at = CASE WHEN retry + 1 >= COALESCE($3, max_retry) THEN now() END
                 WHERE id = $1 AND lock_token = $2 AND retry < max_retry",
                5,
            ),
            Failure::Dead { .. } => (
                "UPDATE outbox_events
                 SET retry = max_retry, last_error = $3, dead_at = now(),
                     locked_by = NULL, locked_until = NULL, lock_token = NULL
                 WHERE id = $1 AND lock_token = $2 AND retry < max_retry",
                3,
            ),
            Failure::Reschedule { .. } => (
                "UPDATE outbox_events
                 SET available_at = $3, deferrals = deferrals + 1,
                     locked_by = NULL, locked_until = NULL, lock_token = NULL
                 WHERE id = $1 AND lock_token = $2 AND retry < max_retry",
                3,
            ),
            Failure::Interrupted { .. } => (
                "UPDATE outbox_events
                 SET last_error = $3, available_at = $4,
                     locked_by = NULL, locked_until = NULL, lock_token = NULL
                 WHERE id = $1 AND lock_token = $2 AND retry < max_retry",
                4,
            ),
        };
        let sql = match record {
            None => update.to_owned(),
            Some(_) => {
                let p = |i: usize| format!("${}", params + i);
                // Data-modifying CTEs see one snapshot: the DELETE sees the
                // rows before this INSERT, so it keeps `keep - 1` of them.
                format!(
                    "WITH upd AS ({update} RETURNING id),
                     ins AS (
                         INSERT INTO outrun_attempts
                             (event_id, attempt, started_at, duration_ms, handler, version,
                              instance, outcome, error)
                         SELECT id, {}, {}, {}, {}, {}, {}, {}, {} FROM upd),
                     old AS (
                         DELETE FROM outrun_attempts
                         WHERE event_id = $1 AND EXISTS (SELECT 1 FROM upd)
                           AND id NOT IN (SELECT id FROM outrun_attempts WHERE event_id = $1
                                          ORDER BY id DESC LIMIT {}))
                     SELECT count(*) FROM upd",
                    p(1),
                    p(2),
                    p(3),
                    p(4),
                    p(5),
                    p(6),
                    p(7),
                    p(8),
                    p(9)
                )
            }
        };
        let mut query = sqlx::query(&sql).bind(lease.id).bind(lease.token);
        query = match failure {
            Failure::Retry {
                error,
                retry_at,
                max_retry,
            } => query
                // The column is a SMALLINT; a larger override means
                // "practically never dead", which the largest SMALLINT
                // still says.
                .bind(max_retry.map(|m| m.min(i32::from(i16::MAX)) as i16))
                .bind(error.as_str())
                .bind(*retry_at),
            Failure::Dead { error } => query.bind(error.as_str()),
            Failure::Reschedule { at } => query.bind(*at),
            Failure::Interrupted { error, retry_at } => query.bind(error.as_str()).bind(*retry_at),
        };
        match record {
            None => Ok(query.execute(&self.bookkeeping).await?.rows_affected() == 1),
            Some(r) => {
                let a = &r.attempt;
                let n: i64 = query
                    .bind(a.attempt)
                    .bind(a.started_at)
                    .bind(a.duration_ms)
                    .bind(a.handler.as_deref())
                    .bind(a.version.as_deref())
                    .bind(a.instance.as_deref())
                    .bind(a.outcome.as_str())
                    .bind(a.error.as_deref())
                    .bind(i64::from(r.keep.max(1) - 1))
                    .fetch_one(&self.bookkeeping)
                    .await?
                    .try_get(0)?;
                Ok(n == 1)
            }
        }
    }

    pub async fn release(&self, leases: &[Lease]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (ids, tokens) = split(leases);
        let n = sqlx::query(
            "UPDATE outbox_events o
             SET locked_by = NULL, locked_until = NULL, lock_token = NULL, available_at = now()
             FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
             WHERE o.id = l.id AND o.lock_token = l.token",
        )
        .bind(ids)
        .bind(tokens)
        .execute(&self.bookkeeping)
        .await?
        .rows_affected();
        if n > 0 {
            self.notify().await?;
        }
        Ok(n)
    }

    pub async fn begin(&self) -> Result<super::AckTx> {
        Ok(super::AckTx::Postgres(self.pool.begin().await?))
    }

    /// A dedicated session for a lane (see `lane.rs`): outside the pool, so
    /// it is not pinged on every return and its lifetime is the lane's.
    pub(super) async fn lane_connection(&self) -> Result<PgConnection> {
        use sqlx::ConnectOptions as _;
        Ok(self.lane_options.connect().await?)
    }

    pub async fn expire_due(&self, limit: i64) -> Result<u64> {
        // The outer conditions repeat the inner ones: a row locked by a
        // concurrent claim or replay is re-checked against its new version.
        let n = sqlx::query(
            "UPDATE outbox_events
             SET retry = max_retry, last_error = 'expired', dead_at = now(),
                 locked_by = NULL, locked_until = NULL, lock_token = NULL
             WHERE id IN (
                 SELECT id FROM outbox_events
                 WHERE expires_at IS NOT NULL AND expires_at <= now() AND retry < max_retry
                   AND (locked_until IS NULL OR locked_until < now())
                 ORDER BY expires_at
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED)
               AND retry < max_retry AND (locked_until IS NULL OR locked_until < now())",
        )
        .bind(limit.max(0))
        .execute(&self.bookkeeping)
        .await?;
        Ok(n.rows_affected())
    }

    pub async fn cleanup_dead(&self, before: DateTime<Utc>, limit: i64) -> Result<u64> {
        let n = sqlx::query(
            "DELETE FROM outbox_events
             WHERE id IN (
                 SELECT id FROM outbox_events
                 WHERE retry >= max_retry AND COALESCE(dead_at, create_date) <= $1
                 ORDER BY COALESCE(dead_at, create_date)
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)
               AND retry >= max_retry",
        )
        .bind(before)
        .bind(limit.max(0))
        .execute(&self.bookkeeping)
        .await?;
        Ok(n.rows_affected())
    }

    pub async fn stats(&self) -> Result<Stats> {
        let row = sqlx::query(&format!("SELECT {STATS_COLUMNS} FROM outbox_events"))
            .fetch_one(&self.pool)
            .await?;
        stats_from_row(&row)
    }

    pub async fn stats_by_name(&self) -> Result<Vec<NameStats>> {
        let rows = sqlx::query(&format!(
            "SELECT name, {STATS_COLUMNS} FROM outbox_events GROUP BY name ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(NameStats {
                    name: row.try_get("name")?,
                    stats: stats_from_row(row)?,
                })
            })
            .collect()
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Event>> {
        // Two literal conditions rather than `(retry >= max_retry) = $1` so the
        // planner can use the partial indexes. Dead events newest dead
        // first (the dead index is on this expression).
        let (state, order) = if filter.dead {
            (
                "retry >= max_retry",
                "COALESCE(dead_at, create_date) DESC, seq DESC",
            )
        } else {
            ("retry < max_retry", "create_date, seq")
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM outbox_events
             WHERE {state} AND ($1::text IS NULL OR name = $1)
             ORDER BY {order}
             LIMIT $2"
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
        let sql = page_sql(q.state);
        let rows = sqlx::query(&sql)
            .bind(q.name.as_deref())
            .bind(q.group_id.as_deref())
            .bind(q.error_contains.as_deref())
            .bind(q.since)
            .bind(q.after.map(|c| c.at))
            .bind(q.after.map(|c| c.seq))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((event_from_row(row)?, row.try_get::<i64, _>("seq")?)))
            .collect()
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Event>> {
        let row = sqlx::query(&get_sql())
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(event_from_row).transpose()
    }

    pub async fn replay(&self, id: Uuid) -> Result<()> {
        let n = sqlx::query(&format!("{REPLAY} WHERE id = $1 AND retry >= max_retry"))
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            let exists: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM outbox_events WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            return Err(if exists.is_some() {
                StoreError::NotDead(id)
            } else {
                StoreError::NotFound(id)
            });
        }
        self.notify().await
    }

    pub async fn replay_all_dead(&self) -> Result<u64> {
        let n = sqlx::query(&format!("{REPLAY} WHERE retry >= max_retry"))
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n > 0 {
            self.notify().await?;
        }
        Ok(n)
    }

    /// See [`super::Store::cancel`]. Rows locked by someone else are
    /// skipped, not waited for: a lane holds the row of an event whose
    /// effects wait for their commit (a wait could last as long as the
    /// handler runs, and a bulk cancel that waited on a lane while holding
    /// rows that lane goes on to delete would deadlock with it). A claim or
    /// lease extension locks rows only for a moment, so skipped rows are
    /// tried again a few times before they count as busy.
    pub(super) async fn cancel(&self, target: CancelTarget<'_>) -> Result<Cancelled> {
        let cond = match target {
            CancelTarget::Id(_) => "id = $1".to_owned(),
            CancelTarget::Name { group_id: None, .. } => "name = $1".to_owned(),
            CancelTarget::Name {
                group_id: Some(_), ..
            } => "name = $1 AND group_id = $2".to_owned(),
            CancelTarget::Filter(f) => {
                super::query::filter_cond(
                    f.state.unwrap_or(super::StateFilter::Live),
                    "now()",
                    ["$1", "$2", "$3", "$4"],
                    true,
                )
                .0
            }
        };
        let cancel = format!(
            "WITH target AS (
                 SELECT id, (lock_token IS NOT NULL AND locked_until >= now()) AS running
                 FROM outbox_events
                 WHERE {cond} AND retry < max_retry
                 FOR UPDATE SKIP LOCKED),
             done AS (
                 UPDATE outbox_events o
                 SET retry = o.max_retry, last_error = '{}', dead_at = now(),
                     locked_by = NULL, locked_until = NULL, lock_token = NULL
                 FROM target WHERE o.id = target.id
                 RETURNING target.running)
             SELECT count(*), count(*) FILTER (WHERE running) FROM done",
            super::CANCELLED
        );
        let left = format!("SELECT count(*) FROM outbox_events WHERE {cond} AND retry < max_retry");
        let mut done = Cancelled::default();
        for pass in 0..CANCEL_PASSES {
            if pass > 0 {
                tokio::time::sleep(CANCEL_PAUSE).await;
            }
            let (n, running) = bind_target(sqlx::query_as::<_, (i64, i64)>(&cancel), target)
                .fetch_one(&self.pool)
                .await?;
            done.cancelled += n as u64;
            done.running += running as u64;
            let (left,) = bind_target(sqlx::query_as::<_, (i64,)>(&left), target)
                .fetch_one(&self.pool)
                .await?;
            done.busy = left as u64;
            if done.busy == 0 {
                break;
            }
        }
        if done.cancelled > 0 {
            // A cancelled head no longer holds back its group.
            self.notify().await?;
        }
        Ok(done)
    }

    /// How many events `f` selects (state: live unless given).
    pub(super) async fn count(&self, f: &super::Filter) -> Result<u64> {
        let sql = count_sql(f.state.unwrap_or(super::StateFilter::Live));
        let n: i64 = bind_filter(sqlx::query_as::<_, (i64,)>(&sql), f)
            .fetch_one(&self.pool)
            .await?
            .0;
        Ok(n as u64)
    }

    /// Replay the dead events `f` selects.
    pub(super) async fn replay_filtered(&self, f: &super::Filter) -> Result<u64> {
        let n = self.on_dead_filtered(REPLAY, f).await?;
        if n > 0 {
            self.notify().await?;
        }
        Ok(n)
    }

    /// Delete the dead events `f` selects.
    pub(super) async fn purge_filtered(&self, f: &super::Filter) -> Result<u64> {
        self.on_dead_filtered("DELETE FROM outbox_events", f).await
    }

    /// Run `dml` (an UPDATE or DELETE of `outbox_events`, without WHERE) on
    /// the dead events `f` selects; how many rows it touched.
    async fn on_dead_filtered(&self, dml: &str, f: &super::Filter) -> Result<u64> {
        let (cond, _) = super::query::filter_cond(
            super::StateFilter::Dead,
            "now()",
            ["$1", "$2", "$3", "$4"],
            true,
        );
        let n = bind_filter(
            sqlx::query_as::<_, (i64,)>(&format!(
                "WITH done AS ({dml} WHERE {cond} RETURNING 1) SELECT count(*) FROM done"
            )),
            f,
        )
        .fetch_one(&self.pool)
        .await?
        .0;
        Ok(n as u64)
    }

    pub async fn purge_dead(&self, before: Option<DateTime<Utc>>) -> Result<u64> {
        let n = sqlx::query(
            "DELETE FROM outbox_events
             WHERE retry >= max_retry
               AND ($1::timestamptz IS NULL OR COALESCE(dead_at, create_date) <= $1)",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(n.rows_affected())
    }

    /// Wake listeners for rows that became ready without an INSERT (the
    /// trigger covers inserts). Sent after the change committed.
    pub(super) async fn notify(&self) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Bind the four parameters of a [`super::query::filter_cond`].
fn bind_filter<'q, O>(
    q: sqlx::query::QueryAs<'q, Postgres, O, PgArguments>,
    f: &'q super::Filter,
) -> sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    q.bind(f.name.as_deref())
        .bind(f.group_id.as_deref())
        .bind(f.error_contains.as_deref())
        .bind(f.since)
}

/// Bind the parameters of a [`CancelTarget`]'s condition.
fn bind_target<'q, O>(
    q: sqlx::query::QueryAs<'q, Postgres, O, PgArguments>,
    target: CancelTarget<'q>,
) -> sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    match target {
        CancelTarget::Id(id) => q.bind(id),
        CancelTarget::Name { name, group_id } => match group_id {
            None => q.bind(name),
            Some(g) => q.bind(name).bind(g),
        },
        CancelTarget::Filter(f) => bind_filter(q, f),
    }
}

/// Tries and pause of a cancel whose rows are locked (see `PgStore::cancel`).
const CANCEL_PASSES: usize = 5;
const CANCEL_PAUSE: Duration = Duration::from_millis(100);

/// The counts of [`Stats`], read by [`stats_from_row`].
const STATS_COLUMNS: &str = "
    count(*) FILTER (WHERE retry < max_retry AND available_at <= now()
                     AND (locked_until IS NULL OR locked_until < now())) AS pending,
    count(*) FILTER (WHERE retry < max_retry AND available_at > now()
                     AND (locked_until IS NULL OR locked_until < now())) AS scheduled,
    count(*) FILTER (WHERE retry < max_retry AND locked_until >= now()) AS running,
    count(*) FILTER (WHERE retry >= max_retry) AS dead,
    COALESCE(EXTRACT(EPOCH FROM now() - min(available_at) FILTER (
        WHERE retry < max_retry AND available_at <= now()
          AND (locked_until IS NULL OR locked_until < now())))::float8, 0) AS oldest";

fn stats_from_row(row: &PgRow) -> Result<Stats> {
    Ok(Stats::new(
        row.try_get("pending")?,
        row.try_get("scheduled")?,
        row.try_get("running")?,
        row.try_get("dead")?,
        row.try_get::<f64, _>("oldest")?.max(0.0),
    ))
}

/// Make dead rows live again. `last_error` stays for the record.
pub(super) const REPLAY: &str = "UPDATE outbox_events
     SET retry = 0, available_at = now(), expires_at = NULL, dead_at = NULL,
         locked_by = NULL, locked_until = NULL, lock_token = NULL";

/// Insert one event (`$1`..`$8`; `$9` the traceparent in the traced
/// variant). The `traceparent` column is named only when the event has one,
/// so enqueue keeps working against a database that has not yet been
/// migrated to it (an application deploying before `outrun migrate`).
static ENQUEUE: LazyLock<String> = LazyLock::new(|| enqueue_sql(false));
static ENQUEUE_TRACED: LazyLock<String> = LazyLock::new(|| enqueue_sql(true));
static ENQUEUE_BATCH: LazyLock<String> = LazyLock::new(|| enqueue_batch_sql(false));
static ENQUEUE_BATCH_TRACED: LazyLock<String> = LazyLock::new(|| enqueue_batch_sql(true));

fn enqueue_sql(traced: bool) -> String {
    let (col, val) = if traced {
        (", traceparent", ", $9")
    } else {
        ("", "")
    };
    format!(
        "INSERT INTO outbox_events
             (id, name, payload, group_id, max_retry, available_at, expires_at, idempotency_key{col})
         VALUES ($1, $2, $3, $4, $5, now() + $6 * interval '1 microsecond',
                 now() + $7 * interval '1 microsecond', $8{val})
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING id"
    )
}

/// One multi-row INSERT over `unnest` of column arrays; see [`ENQUEUE`]
/// for the traced variant.
fn enqueue_batch_sql(traced: bool) -> String {
    let (col, val, arr, name) = if traced {
        (
            ", traceparent",
            ", t.traceparent",
            ", $9::text[]",
            " traceparent,",
        )
    } else {
        ("", "", "", "")
    };
    format!(
        "INSERT INTO outbox_events
             (id, name, payload, group_id, max_retry, available_at, expires_at, idempotency_key{col})
         SELECT t.id, t.name, t.payload, t.group_id, t.max_retry,
                now() + t.delay_us * interval '1 microsecond',
                now() + t.ttl_us * interval '1 microsecond',
                t.key{val}
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int2[], $6::int8[],
                     $7::int8[], $8::text[]{arr})
              WITH ORDINALITY AS t(id, name, payload, group_id, max_retry, delay_us, ttl_us, key,{name} ord)
         ORDER BY t.ord
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING id"
    )
}

/// A lane's commit with the follow-up events its kept handlers emitted:
/// one statement inserts them all (as [`ENQUEUE_BATCH`] does, without
/// reporting ids, which no handler is told) and deletes the kept events'
/// rows, fenced by their tokens. Rows affected: the deleted ones.
static LANE_FINISH: LazyLock<String> = LazyLock::new(|| lane_finish_sql(false));
static LANE_FINISH_TRACED: LazyLock<String> = LazyLock::new(|| lane_finish_sql(true));

fn lane_finish_sql(traced: bool) -> String {
    let insert = enqueue_batch_sql(traced);
    let insert = insert
        .strip_suffix("RETURNING id")
        .expect("the batch insert ends in RETURNING id")
        .trim_end();
    let (ids, tokens) = if traced {
        ("$10", "$11")
    } else {
        ("$9", "$10")
    };
    format!(
        "WITH emitted AS ({insert})
         DELETE FROM outbox_events
         WHERE id = ANY({ids}::uuid[]) AND lock_token = ANY({tokens}::uuid[]) AND retry < max_retry"
    )
}

/// Insert `emitted` (validated when they were deferred) and delete the
/// kept events' rows in one statement; the number of rows deleted.
pub(super) async fn lane_finish_with_emits(
    conn: &mut PgConnection,
    emitted: &[(NewEvent, i32)],
    ids: Vec<Uuid>,
    tokens: Vec<Uuid>,
) -> Result<u64> {
    let mut cols = BatchColumns::default();
    for (ev, default_max_retry) in emitted {
        cols.push(ev, *default_max_retry)?;
    }
    let traced = cols.traceparents.iter().any(Option::is_some);
    let mut q = sqlx::query(if traced {
        &LANE_FINISH_TRACED
    } else {
        &LANE_FINISH
    })
    .bind(&cols.ids)
    .bind(&cols.names)
    .bind(&cols.payloads)
    .bind(&cols.groups)
    .bind(&cols.max_retries)
    .bind(&cols.delays_us)
    .bind(&cols.ttls_us)
    .bind(&cols.keys);
    if traced {
        q = q.bind(&cols.traceparents);
    }
    Ok(q.bind(ids)
        .bind(tokens)
        .execute(conn)
        .await?
        .rows_affected())
}

/// Enqueue inside the caller's transaction or connection (`&mut *tx`).
/// Validates first; same idempotency key as a live event → that event's id.
pub async fn enqueue(conn: &mut PgConnection, event: &NewEvent) -> Result<Uuid> {
    enqueue_with_default(conn, event, super::DEFAULT_MAX_RETRY).await
}

/// [`enqueue`] with the runtime's default `max_retry` for events that set none.
///
/// Concurrent enqueues with one key are safe: the second INSERT waits on the
/// first's uncommitted row, then does nothing, and the follow-up SELECT (a
/// fresh snapshot under READ COMMITTED) sees the winner. Under REPEATABLE
/// READ or SERIALIZABLE the caller gets PostgreSQL's serialization error
/// instead and should retry its transaction.
pub async fn enqueue_with_default(
    conn: &mut PgConnection,
    event: &NewEvent,
    default_max_retry: i32,
) -> Result<Uuid> {
    event.validate()?;
    let max_retry = super::effective_max_retry(event, default_max_retry)?;
    // A key can vanish between the conflicting INSERT and the SELECT (its
    // event was acknowledged meanwhile); the next INSERT then succeeds.
    for _ in 0..3 {
        let insert = sqlx::query_scalar(match event.traceparent {
            Some(_) => &ENQUEUE_TRACED,
            None => &ENQUEUE,
        })
        .bind(Uuid::now_v7())
        .bind(&event.name)
        .bind(&event.payload)
        .bind(event.group_id.as_deref())
        .bind(max_retry)
        .bind(event.delay.map_or(0, duration_us))
        .bind(event.expires_in.map(duration_us))
        .bind(event.idempotency_key.as_deref());
        let insert = match &event.traceparent {
            Some(tp) => insert.bind(tp.as_str()),
            None => insert,
        };
        let inserted: Option<Uuid> = insert.fetch_optional(&mut *conn).await?;
        if let Some(id) = inserted {
            return Ok(id);
        }
        let existing: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM outbox_events WHERE idempotency_key = $1")
                .bind(event.idempotency_key.as_deref())
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(id) = existing {
            return Ok(id);
        }
    }
    Err(StoreError::Db(sqlx::Error::Protocol(format!(
        "idempotency key {:?} kept conflicting but its event could not be read; retry the enqueue",
        event.idempotency_key
    ))))
}

/// Run a row-returning statement for the `sql` capability.
///
/// Each parameter is converted to the type PostgreSQL infers for its
/// placeholder (see [`params`]); a placeholder whose type the statement does
/// not determine needs a cast in the SQL (`$1::bigint`). Results: bool,
/// int2/4/8, float4/8, text-like and bytea map to their variant; uuid,
/// numeric, json/jsonb, date, time, timestamp, timestamptz (RFC 3339) and
/// enums come back as text (domains as their base type; an infinite date or
/// timestamp as `infinity`); void as null; any other type is an error that
/// names the column and suggests a cast. [`pipe_rows`] returns the same.
pub async fn query(
    conn: &mut PgConnection,
    statement: &str,
    params: &[SqlValue],
) -> Result<SqlRows> {
    let (prepared, args) = prepare(conn, statement, params).await?;
    let rows = bind_all(sqlx::query(statement), args)
        .fetch_all(&mut *conn)
        .await?;
    // From the statement, so an empty result still has its column names,
    // and its column types are resolved (a row's own type of a custom column
    // is only an OID unless the connection looked it up before).
    let columns = prepared.columns();
    let types: Vec<&PgTypeInfo> = columns.iter().map(|c| c.type_info()).collect();
    let rows = rows
        .iter()
        .map(|row| row_values(row, &types))
        .collect::<Result<_>>()?;
    let columns = columns.iter().map(|c| c.name().to_string()).collect();
    Ok(SqlRows { columns, rows })
}

/// Run a statement for the `sql` capability; rows affected.
pub async fn execute(conn: &mut PgConnection, statement: &str, params: &[SqlValue]) -> Result<u64> {
    let (_, args) = prepare(conn, statement, params).await?;
    Ok(bind_all(sqlx::query(statement), args)
        .execute(&mut *conn)
        .await?
        .rows_affected())
}

/// The statement, prepared with no type hints, and the parameters converted
/// to the types the server inferred. sqlx caches the prepared statement per
/// connection by its text, and `sqlx::query` of the same text then reuses
/// it, so a cached statement costs no round trip here and one to run.
async fn prepare<'q>(
    conn: &mut PgConnection,
    statement: &'q str,
    values: &'q [SqlValue],
) -> Result<(PgStatement<'q>, Vec<params::Param<'q>>)> {
    let prepared = conn
        .prepare_with(statement, &[])
        .await
        .map_err(undetermined_type)?;
    let types = match prepared.parameters() {
        Some(Either::Left(types)) => types,
        _ => &[],
    };
    let args = params::convert(types, values)?;
    Ok((prepared, args))
}

fn undetermined_type(e: sqlx::Error) -> StoreError {
    let found = match &e {
        sqlx::Error::Database(db) => undetermined_param(db.code().as_deref(), db.message()),
        _ => None,
    };
    found.unwrap_or(StoreError::Db(e))
}

/// What preparing a statement with tokio-postgres failed with (a pipelined
/// effects transaction), worded as [`prepare`] words it.
pub(crate) fn pipe_prepare_error(e: tokio_postgres::Error) -> StoreError {
    e.as_db_error()
        .and_then(|db| undetermined_param(Some(db.code().code()), db.message()))
        .unwrap_or(StoreError::Pg(e))
}

/// PostgreSQL's "could not determine data type of parameter $N" (42P18),
/// with the fix: the statement must say what the parameter is.
fn undetermined_param(sqlstate: Option<&str>, message: &str) -> Option<StoreError> {
    if sqlstate != Some("42P18") {
        return None;
    }
    let index = message
        .rsplit_once('$')
        .and_then(|(_, n)| n.parse::<usize>().ok())?;
    Some(StoreError::Param {
        index,
        reason: format!(
            "PostgreSQL cannot tell its type from the statement; cast it there (`${index}::bigint`, `${index}::text`, ...)"
        ),
    })
}

/// Delete the handled event if its lease still holds and commit; otherwise
/// roll back everything the handler did.
pub async fn commit_ack(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    lease: Lease,
) -> Result<bool> {
    let n = sqlx::query(
        "DELETE FROM outbox_events WHERE id = $1 AND lock_token = $2 AND retry < max_retry",
    )
    .bind(lease.id)
    .bind(lease.token)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 1 {
        tx.commit().await?;
        Ok(true)
    } else {
        tx.rollback().await?;
        Ok(false)
    }
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Postgres, PgArguments>,
    params: Vec<params::Param<'q>>,
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    for p in params {
        q = q.bind(p);
    }
    q
}

/// `types`: the statement's column types.
fn row_values(row: &PgRow, types: &[&PgTypeInfo]) -> Result<Vec<SqlValue>> {
    (0..row.len())
        .map(|i| {
            let Some(ty) = types.get(i) else {
                return Err(StoreError::Db(sqlx::Error::ColumnIndexOutOfBounds {
                    index: i,
                    len: types.len(),
                }));
            };
            let raw = row.try_get_raw(i)?;
            let bytes = match raw.is_null() {
                true => None,
                false => Some(raw.as_bytes().map_err(sqlx::Error::Decode)?),
            };
            column_value(*ty, row.columns()[i].name(), bytes)
        })
        .collect()
}

/// The rows of a statement tokio-postgres ran (a pipelined effects
/// transaction), as [`query`] returns them: the same values for the same
/// columns. Column names come from the statement, so an empty result still
/// has them.
pub(crate) fn pipe_rows(
    statement: &tokio_postgres::Statement,
    rows: &[tokio_postgres::Row],
) -> Result<SqlRows> {
    let columns = statement.columns();
    let rows = rows
        .iter()
        .map(|row| {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let raw: Option<Raw<'_>> = row.try_get(i)?;
                    column_value(c.type_(), c.name(), raw.map(|r| r.0))
                })
                .collect()
        })
        .collect::<Result<_>>()?;
    let columns = columns.iter().map(|c| c.name().to_owned()).collect();
    Ok(SqlRows { columns, rows })
}

/// A column's bytes as the server sent them (tokio-postgres asks for every
/// result in binary), for [`column_value`] to decode whatever the type.
struct Raw<'a>(&'a [u8]);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw<'a> {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// One value of column `column` of type `ty`, in PostgreSQL's binary format
/// (`None`: NULL), as the `sql` capability returns it, whichever client
/// read it. Bytes that are not a well-formed value of the type are a
/// decode error naming the column; a type the capability has no value for
/// is [`StoreError::UnsupportedColumn`].
fn column_value(ty: &impl params::PgType, column: &str, raw: Option<&[u8]>) -> Result<SqlValue> {
    use params::Target as T;
    let Some(b) = raw else {
        return Ok(SqlValue::Null);
    };
    let undecodable = |why: &str| {
        StoreError::Db(sqlx::Error::ColumnDecode {
            index: format!("{column:?}"),
            source: format!("{why} ({} bytes of type {})", b.len(), ty.shown_name()).into(),
        })
    };
    let malformed = || undecodable("malformed value");
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| undecodable("not UTF-8"));
    // A fixed-size value: exactly its size.
    macro_rules! be {
        ($t:ty) => {
            <$t>::from_be_bytes(b.try_into().map_err(|_| malformed())?)
        };
    }
    let target = params::target(ty);
    Ok(match target {
        T::Bool => SqlValue::Bool(be!(u8) != 0),
        T::Int2 => SqlValue::Int(be!(i16).into()),
        T::Int4 => SqlValue::Int(be!(i32).into()),
        T::Int8 => SqlValue::Int(be!(i64)),
        T::Float4 => SqlValue::Float(be!(f32).into()),
        T::Float8 => SqlValue::Float(be!(f64)),
        T::TextLike | T::Json => SqlValue::Text(text(b)?),
        // A version byte (1), then the text.
        T::Jsonb => SqlValue::Text(text(b.get(1..).unwrap_or_default())?),
        T::Bytea => SqlValue::Blob(b.to_vec()),
        T::Uuid => SqlValue::Text(
            Uuid::from_slice(b)
                .map_err(|_| malformed())?
                .hyphenated()
                .to_string(),
        ),
        T::Numeric => SqlValue::Text(numeric_to_string(b).ok_or_else(malformed)?),
        // Microseconds since 2000-01-01, i64::MAX and MIN for PostgreSQL's
        // `infinity` and `-infinity`, which the text says as PostgreSQL does.
        T::Timestamptz | T::Timestamp => SqlValue::Text(match be!(i64) {
            i64::MAX => "infinity".into(),
            i64::MIN => "-infinity".into(),
            us => {
                let t = params::PG_EPOCH
                    .checked_add_signed(chrono::TimeDelta::microseconds(us))
                    .ok_or_else(|| undecodable("beyond the dates this runtime can show"))?;
                match target {
                    T::Timestamptz => t.and_utc().to_rfc3339(),
                    _ => t.format("%Y-%m-%dT%H:%M:%S%.f").to_string(),
                }
            }
        }),
        // Days since 2000-01-01, with i32::MAX and MIN for the infinities.
        T::Date => SqlValue::Text(match be!(i32) {
            i32::MAX => "infinity".into(),
            i32::MIN => "-infinity".into(),
            d => params::PG_EPOCH
                .date()
                .checked_add_signed(chrono::TimeDelta::days(d.into()))
                .ok_or_else(|| undecodable("beyond the dates this runtime can show"))?
                .to_string(),
        }),
        // Microseconds since midnight; PostgreSQL allows 24:00:00, which
        // chrono cannot hold.
        T::Time => SqlValue::Text(match be!(i64) {
            DAY_US => "24:00:00".into(),
            us @ 0..DAY_US => (NaiveTime::MIN + chrono::TimeDelta::microseconds(us)).to_string(),
            _ => return Err(malformed()),
        }),
        T::Void => SqlValue::Null,
        T::Other => {
            return Err(StoreError::UnsupportedColumn {
                column: column.to_owned(),
                type_name: ty.shown_name().into_owned(),
            });
        }
    })
}

const DAY_US: i64 = 86_400_000_000;

/// Render PostgreSQL's binary NUMERIC (base-10000 digit groups) as the text
/// PostgreSQL itself would print, without pulling in a decimal crate.
/// `None` if the bytes are not a well-formed NUMERIC.
fn numeric_to_string(b: &[u8]) -> Option<String> {
    let word = |k: usize| {
        b.get(2 * k..2 * k + 2)
            .map(|w| u16::from_be_bytes([w[0], w[1]]))
    };
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = usize::from(word(3)?);
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        _ => return None,
    }
    let digits: Vec<u16> = (0..ndigits).map(|k| word(4 + k)).collect::<Option<_>>()?;
    // digits[k] is worth 10000^(weight - k); missing groups are zero.
    let group = |k: i64| {
        if k < 0 {
            0
        } else {
            digits.get(k as usize).copied().unwrap_or(0)
        }
    };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for k in 0..=weight {
            if k == 0 {
                write!(s, "{}", group(k)).ok()?;
            } else {
                write!(s, "{:04}", group(k)).ok()?;
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut k = weight + 1;
        while frac.len() < dscale {
            write!(frac, "{:04}", group(k)).ok()?;
            k += 1;
        }
        frac.truncate(dscale);
        s.push('.');
        s.push_str(&frac);
    }
    Some(s)
}

fn event_from_row(row: &PgRow) -> Result<Event> {
    Ok(Event {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        payload: row.try_get("payload")?,
        group_id: row.try_get("group_id")?,
        retry: row.try_get::<i16, _>("retry")?.into(),
        max_retry: row.try_get::<i16, _>("max_retry")?.into(),
        create_date: row.try_get("create_date")?,
        available_at: row.try_get("available_at")?,
        expires_at: row.try_get("expires_at")?,
        locked_by: row.try_get("locked_by")?,
        locked_until: row.try_get("locked_until")?,
        last_error: row.try_get("last_error")?,
        idempotency_key: row.try_get("idempotency_key")?,
        dead_at: row.try_get("dead_at")?,
        deferrals: row.try_get("deferrals")?,
        traceparent: row.try_get("traceparent")?,
    })
}

/// Column arrays for the `unnest` batch insert.
#[derive(Default)]
struct BatchColumns {
    ids: Vec<Uuid>,
    names: Vec<String>,
    payloads: Vec<String>,
    groups: Vec<Option<String>>,
    max_retries: Vec<i16>,
    delays_us: Vec<i64>,
    ttls_us: Vec<Option<i64>>,
    keys: Vec<Option<String>>,
    traceparents: Vec<Option<String>>,
}

impl BatchColumns {
    fn push(&mut self, ev: &NewEvent, default_max_retry: i32) -> Result<()> {
        self.ids.push(Uuid::now_v7());
        self.names.push(ev.name.clone());
        self.payloads.push(ev.payload.clone());
        self.groups.push(ev.group_id.clone());
        self.max_retries
            .push(super::effective_max_retry(ev, default_max_retry)?);
        self.delays_us.push(ev.delay.map_or(0, duration_us));
        self.ttls_us.push(ev.expires_in.map(duration_us));
        self.keys.push(ev.idempotency_key.clone());
        self.traceparents.push(ev.traceparent.clone());
        Ok(())
    }
}

/// Ids and tokens as two arrays for `unnest`, sorted by id. The batch
/// statements (ack, extend, release) lock their rows in array order (the
/// bookkeeping sessions' plans are nested loops over the arrays), so one
/// order for all keeps two of them from deadlocking: the lease extender and
/// the acker, each holding half of the other's rows, did ("deadlock
/// detected" after 1 s, and the ack's 460 events ran again after their
/// leases lapsed).
fn split(leases: &[Lease]) -> (Vec<Uuid>, Vec<Uuid>) {
    let mut sorted: Vec<(Uuid, Uuid)> = leases.iter().map(|l| (l.id, l.token)).collect();
    sorted.sort_unstable();
    sorted.into_iter().unzip()
}

fn duration_us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn prefixed(alias: &str, columns: &str) -> String {
    columns
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::numeric_to_string;

    fn numeric(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [ndigits, weight as u16, sign, dscale].iter().chain(digits) {
            b.extend_from_slice(&w.to_be_bytes());
        }
        b
    }

    #[test]
    fn renders_numeric_like_postgres() {
        // 12345.6789 = [1, 2345, 6789] with weight 1, dscale 4
        assert_eq!(
            numeric_to_string(&numeric(3, 1, 0, 4, &[1, 2345, 6789])).unwrap(),
            "12345.6789"
        );
        // -0.0012 = [12] at weight -1, dscale 4
        assert_eq!(
            numeric_to_string(&numeric(1, -1, 0x4000, 4, &[12])).unwrap(),
            "-0.0012"
        );
        // 0.00000001 = [1] at weight -2, dscale 8
        assert_eq!(
            numeric_to_string(&numeric(1, -2, 0, 8, &[1])).unwrap(),
            "0.00000001"
        );
        // 1000000 = [100] at weight 1 (trailing zero groups are omitted)
        assert_eq!(
            numeric_to_string(&numeric(1, 1, 0, 0, &[100])).unwrap(),
            "1000000"
        );
        assert_eq!(
            numeric_to_string(&numeric(0, 0, 0, 2, &[])).unwrap(),
            "0.00"
        );
        assert_eq!(
            numeric_to_string(&numeric(0, 0, 0xC000, 0, &[])).unwrap(),
            "NaN"
        );
        assert_eq!(numeric_to_string(&[0, 1]), None);
    }
}

/// A PostgreSQL server for tests that need one: `OUTRUN_TEST_POSTGRES_URL`
/// (default `postgres://postgres@127.0.0.1:5432/postgres`). An unreachable
/// server fails the test; it is never skipped.
#[cfg(test)]
pub(crate) mod test_db {
    use futures::TryStreamExt as _;
    use sqlx::Connection as _;

    use super::{PgConnection, Result, SqlRows, SqlValue, params, pipe_prepare_error, pipe_rows};

    const ENV: &str = "OUTRUN_TEST_POSTGRES_URL";

    pub(crate) fn url() -> String {
        std::env::var(ENV).unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    fn unreachable(e: impl std::fmt::Display) -> ! {
        panic!(
            "PostgreSQL at {} is unreachable ({e}); start it or point {ENV} at one",
            url()
        )
    }

    pub(crate) async fn sqlx_conn() -> PgConnection {
        PgConnection::connect(&url())
            .await
            .unwrap_or_else(|e| unreachable(e))
    }

    /// The task driving a tokio-postgres connection; it ends when the
    /// connection does.
    pub(crate) type Connection = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

    pub(crate) async fn pipe_client() -> (tokio_postgres::Client, Connection) {
        let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| unreachable(e));
        (client, tokio::spawn(connection))
    }

    /// A statement through tokio-postgres the way a pipe runs it.
    pub(crate) async fn pipe_query(
        client: &tokio_postgres::Client,
        statement: &str,
        values: &[SqlValue],
    ) -> Result<SqlRows> {
        let statement = client
            .prepare(statement)
            .await
            .map_err(pipe_prepare_error)?;
        run(client, &statement, values).await
    }

    pub(crate) async fn run(
        client: &tokio_postgres::Client,
        statement: &tokio_postgres::Statement,
        values: &[SqlValue],
    ) -> Result<SqlRows> {
        let params = params::convert_for_pipe(statement.params(), values)?;
        let rows: Vec<tokio_postgres::Row> = client
            .query_raw(statement, params.iter())
            .await?
            .try_collect()
            .await?;
        pipe_rows(statement, &rows)
    }

    /// Run `body` with a schema of its own (its name), dropped afterwards
    /// with everything in it, whether `body` passed or panicked.
    pub(crate) async fn in_schema<F, Fut>(body: F)
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut admin = sqlx_conn().await;
        let schema = format!("outrun_t_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut admin)
            .await
            .expect("create the test schema");
        let outcome = tokio::spawn(body(schema.clone())).await;
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut admin)
            .await
            .expect("drop the test schema");
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// The `sql` capability through tokio-postgres (pipelined effects
/// transactions) against sqlx (everything else), on one table.
#[cfg(test)]
mod pipe_tests {
    use super::test_db::{in_schema, pipe_client, pipe_query, run, sqlx_conn};
    use super::{SqlRows, SqlValue, StoreError, execute, query};

    fn text(s: &str) -> SqlValue {
        SqlValue::Text(s.into())
    }

    /// A column, its type, and values to bind with what reads back.
    type Case = (&'static str, &'static str, Vec<(SqlValue, SqlValue)>);

    /// Per column: values to bind (a NULL first, then others, all through
    /// one prepared statement) and what reads back.
    fn cases() -> Vec<Case> {
        use SqlValue::{Blob, Bool, Float, Int, Null};
        vec![
            (
                "i2",
                "int2",
                vec![
                    (Int(7), Int(7)),
                    (Float(3.0), Int(3)),
                    (text(" 12 "), Int(12)),
                    (Int(-32768), Int(-32768)),
                ],
            ),
            (
                "i4",
                "int4",
                vec![(Int(-5), Int(-5)), (text("42"), Int(42))],
            ),
            (
                "i8",
                "int8",
                vec![
                    (Int(i64::MAX), Int(i64::MAX)),
                    (Float(-2.0), Int(-2)),
                    (text("-9"), Int(-9)),
                ],
            ),
            (
                "num",
                "numeric",
                vec![
                    (Int(12), text("12")),
                    (Float(1.5), text("1.5")),
                    (text("-0.0012"), text("-0.0012")),
                    (
                        text("12345678901234567890.123"),
                        text("12345678901234567890.123"),
                    ),
                    (text("NaN"), text("NaN")),
                ],
            ),
            (
                "r",
                "real",
                vec![
                    (Float(1.5), Float(1.5)),
                    (Int(2), Float(2.0)),
                    (text("0.25"), Float(0.25)),
                ],
            ),
            (
                "d",
                "double precision",
                vec![
                    (Float(-0.125), Float(-0.125)),
                    (text("1e300"), Float(1e300)),
                    (Int(3), Float(3.0)),
                ],
            ),
            (
                "t",
                "text",
                vec![
                    (text("héllo"), text("héllo")),
                    (Int(5), text("5")),
                    (Bool(true), text("true")),
                    (Float(2.5), text("2.5")),
                ],
            ),
            (
                "vc",
                "varchar(20)",
                vec![(text("abc"), text("abc")), (Int(-1), text("-1"))],
            ),
            (
                "u",
                "uuid",
                vec![
                    (
                        text("67e55044-10b1-426f-9247-bb680e5fe0c8"),
                        text("67e55044-10b1-426f-9247-bb680e5fe0c8"),
                    ),
                    (
                        text(" 67E55044-10B1-426F-9247-BB680E5FE0C8 "),
                        text("67e55044-10b1-426f-9247-bb680e5fe0c8"),
                    ),
                ],
            ),
            (
                "j",
                "json",
                vec![
                    (text(r#"{"a": 1}"#), text(r#"{"a": 1}"#)),
                    (Int(3), text("3")),
                    (Bool(false), text("false")),
                ],
            ),
            (
                "jb",
                "jsonb",
                vec![
                    (
                        text(r#"{"a":1,"b":[true]}"#),
                        text(r#"{"a": 1, "b": [true]}"#),
                    ),
                    (Float(0.5), text("0.5")),
                ],
            ),
            (
                "tz",
                "timestamptz",
                vec![
                    (
                        text("2024-05-01T12:00:00+02:00"),
                        text("2024-05-01T10:00:00+00:00"),
                    ),
                    (
                        text("2024-05-01 12:00:00.123456Z"),
                        text("2024-05-01T12:00:00.123456+00:00"),
                    ),
                    (text("1970-01-01"), text("1970-01-01T00:00:00+00:00")),
                ],
            ),
            (
                "ts",
                "timestamp",
                vec![
                    (
                        text("2024-05-01T12:34:56.5"),
                        text("2024-05-01T12:34:56.500"),
                    ),
                    (text("1999-12-31 23:59"), text("1999-12-31T23:59:00")),
                ],
            ),
            (
                "dt",
                "date",
                vec![
                    (text("2024-02-29"), text("2024-02-29")),
                    (text("1900-01-01"), text("1900-01-01")),
                ],
            ),
            (
                "tm",
                "time",
                vec![
                    (text("07:30"), text("07:30:00")),
                    (text("23:59:59.25"), text("23:59:59.250")),
                ],
            ),
            (
                "b",
                "bytea",
                vec![
                    (Blob(vec![0, 1, 255]), Blob(vec![0, 1, 255])),
                    (Blob(vec![]), Blob(vec![])),
                ],
            ),
            (
                "bo",
                "bool",
                vec![(Bool(true), Bool(true)), (text("off"), Bool(false))],
            ),
        ]
        .into_iter()
        .map(|(c, ty, values)| {
            let mut with_null = vec![(Null, Null)];
            with_null.extend(values);
            (c, ty, with_null)
        })
        .collect()
    }

    #[tokio::test]
    async fn pipe_binds_and_reads_like_sqlx() {
        in_schema(|schema| async move {
            let (client, _connection) = pipe_client().await;
            let mut conn = sqlx_conn().await;
            let cases = cases();
            let columns: Vec<String> = cases.iter().map(|(c, ty, _)| format!("{c} {ty}")).collect();
            let table = format!("{schema}.t");
            execute(
                &mut conn,
                &format!(
                    "CREATE TABLE {table} (id int4 PRIMARY KEY, {})",
                    columns.join(", ")
                ),
                &[],
            )
            .await
            .unwrap();

            // Each column's values through one prepared statement per client
            // (sqlx caches it by its text), the NULL first: odd ids through
            // tokio-postgres, even ones through sqlx.
            let mut id = 0;
            for (column, _, values) in &cases {
                let insert = format!("INSERT INTO {table} (id, {column}) VALUES ($1, $2)");
                let prepared = client.prepare(&insert).await.unwrap();
                for (value, expected) in values {
                    for through_pipe in [true, false] {
                        id += 1;
                        let params = [SqlValue::Int(id), value.clone()];
                        match through_pipe {
                            true => run(&client, &prepared, &params).await.map(drop),
                            false => execute(&mut conn, &insert, &params).await.map(drop),
                        }
                        .unwrap_or_else(|e| panic!("{column} <- {value:?}: {e}"));

                        let select = format!("SELECT {column} FROM {table} WHERE id = $1");
                        let id = [SqlValue::Int(id)];
                        let piped = pipe_query(&client, &select, &id).await.unwrap();
                        let by_sqlx = query(&mut conn, &select, &id).await.unwrap();
                        let want = SqlRows {
                            columns: vec![column.to_string()],
                            rows: vec![vec![expected.clone()]],
                        };
                        assert_eq!(piped, want, "{column} <- {value:?} through the pipe");
                        assert_eq!(by_sqlx, want, "{column} <- {value:?} through sqlx");
                    }
                }
            }

            // Whole rows, and an empty result, which still names its columns.
            for select in [
                format!("SELECT * FROM {table} ORDER BY id"),
                format!("SELECT * FROM {table} WHERE false"),
            ] {
                let piped = pipe_query(&client, &select, &[]).await.unwrap();
                let by_sqlx = query(&mut conn, &select, &[]).await.unwrap();
                assert_eq!(piped, by_sqlx, "{select}");
                assert_eq!(piped.columns.len(), cases.len() + 1);
            }
        })
        .await;
    }

    /// Values only a statement produces (the capability binds no infinity),
    /// and types by kind: an enum, a domain, void.
    #[tokio::test]
    async fn pipe_reads_special_values_like_sqlx() {
        in_schema(|schema| async move {
            let (client, _connection) = pipe_client().await;
            let mut conn = sqlx_conn().await;
            for ddl in [
                format!("CREATE TYPE {schema}.mood AS ENUM ('sad', 'ok')"),
                format!("CREATE DOMAIN {schema}.pos AS int4 CHECK (VALUE > 0)"),
            ] {
                execute(&mut conn, &ddl, &[]).await.unwrap();
            }
            let select = format!(
                "SELECT 'infinity'::timestamptz AS a, '-infinity'::timestamp AS b,
                        'infinity'::date AS c, '24:00:00'::time AS d,
                        'ok'::{schema}.mood AS e, $1::{schema}.mood AS f,
                        $2::{schema}.pos AS g, pg_sleep(0) AS h, NULL::interval AS i"
            );
            let params = [text("sad"), SqlValue::Int(5)];
            let piped = pipe_query(&client, &select, &params).await.unwrap();
            let by_sqlx = query(&mut conn, &select, &params).await.unwrap();
            assert_eq!(piped, by_sqlx);
            assert_eq!(
                piped.rows,
                [[
                    text("infinity"),
                    text("-infinity"),
                    text("infinity"),
                    text("24:00:00"),
                    text("ok"),
                    text("sad"),
                    SqlValue::Int(5),
                    SqlValue::Null,
                    SqlValue::Null,
                ]]
            );
        })
        .await;
    }

    /// A value of the wrong kind, a count that does not match, a parameter
    /// the statement does not type, a column the capability cannot return:
    /// the same error, word for word, through either client.
    #[tokio::test]
    async fn pipe_errors_read_like_sqlx() {
        in_schema(|schema| async move {
            let (client, _connection) = pipe_client().await;
            let mut conn = sqlx_conn().await;
            for ddl in [
                format!("CREATE TYPE {schema}.mood AS ENUM ('sad', 'ok')"),
                format!(r#"CREATE TYPE {schema}."Pair" AS (a int4, b text)"#),
            ] {
                execute(&mut conn, &ddl, &[]).await.unwrap();
            }
            let mood = format!("SELECT $1::{schema}.mood");
            let pair = format!(r#"SELECT $1::{schema}."Pair""#);
            let moods = format!("SELECT ARRAY['sad'::{schema}.mood] AS moods");
            let pairs = format!(r#"SELECT ROW(1, 'x')::{schema}."Pair" AS p"#);
            for (statement, values) in [
                ("SELECT $1::int4", vec![text("abc")]),
                ("SELECT $1::int2", vec![SqlValue::Int(70000)]),
                ("SELECT $1::bytea", vec![text("x")]),
                ("SELECT $1::bool", vec![SqlValue::Int(1)]),
                ("SELECT $1::interval", vec![text("1 day")]),
                ("SELECT $1::int4[]", vec![SqlValue::Int(1)]),
                ("SELECT $1::bpchar", vec![SqlValue::Blob(vec![1])]),
                (&mood, vec![SqlValue::Blob(vec![1])]),
                (&pair, vec![text("(1,x)")]),
                (&moods, vec![]),
                (&pairs, vec![]),
                ("SELECT $1::int4, $2::text", vec![SqlValue::Int(1)]),
                ("SELECT $1 IS NULL", vec![SqlValue::Int(1)]),
                ("SELECT '1 day'::interval AS span", vec![]),
                ("SELECT ARRAY[1, 2] AS list", vec![]),
                ("SELECT 'x'::\"char\" AS c", vec![]),
            ] {
                let piped = pipe_query(&client, statement, &values).await.unwrap_err();
                let by_sqlx = query(&mut conn, statement, &values).await.unwrap_err();
                assert!(
                    matches!(
                        piped,
                        StoreError::Param { .. }
                            | StoreError::ParamCount { .. }
                            | StoreError::UnsupportedColumn { .. }
                    ),
                    "{statement}: {piped:?}"
                );
                assert_eq!(piped.to_string(), by_sqlx.to_string(), "{statement}");
            }
        })
        .await;
    }
}
