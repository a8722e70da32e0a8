//! All SQL of the outbox lives under this module: one file per backend
//! (`sqlite.rs`, `postgres.rs`) behind the [`Store`] enum, so the dispatch
//! loop, maintenance and CLI never write SQL and the same behaviour suite runs
//! against both backends.
//!
//! Batch operations take slices and run one statement per call: the claim
//! loop and the acker never make a per-event round trip that a batch could
//! replace.

pub mod attempts;
pub mod lane;
pub mod limits;
pub mod migrate;
pub mod pauses;
pub mod postgres;
pub mod query;
pub mod schedules;
pub mod shared;
pub mod sqlite;
mod transient;
mod value;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::event::{Claimed, Event, InvalidEvent, Lease, NewEvent};
pub use attempts::{Attempt, AttemptRecord};
pub use limits::Limited;
pub use migrate::MigrationReport;
pub use pauses::Pause;
pub use query::{Cursor, EventQuery, Filter, Page, StateFilter};
pub use value::{SqlRows, SqlValue};

/// Errors at the store boundary. Every variant names what failed and, where
/// the user can act, how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Invalid(#[from] InvalidEvent),
    #[error(
        "cannot connect to {url}: {source}; check the URL (--database or OUTRUN_DATABASE_URL) and that the server is running"
    )]
    Connect { url: String, source: sqlx::Error },
    #[error("unsupported database URL {0}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    /// [`OpenMode::create`] was off and the SQLite file does not exist.
    #[error(
        "no database file at {} ({url}); choose the database with --database URL or OUTRUN_DATABASE_URL, \
         or run `outrun migrate` first to create it",
        path.display()
    )]
    NoDatabase {
        path: std::path::PathBuf,
        url: String,
    },
    #[error(
        "outrun migration {version} ({description}) was changed after it was applied: its checksum in \
         outrun_migrations differs from this outrun's copy. An applied migration must never change: \
         run the outrun release that applied it, or restore the migration as released"
    )]
    MigrationChanged { version: i64, description: String },
    #[error(
        "outrun migration {version} ({description}) failed and was rolled back: {source}; \
         fix the cause and run `outrun migrate` again"
    )]
    MigrationFailed {
        version: i64,
        description: String,
        source: sqlx::Error,
    },
    #[error(
        "the database's outrun schema is at migration {applied} but this outrun needs {needed}: \
         run `outrun migrate` (serve migrates at start unless --no-migrate)"
    )]
    MigrationsPending { applied: i64, needed: i64 },
    #[error(
        "no event with id {0}: handled events are deleted at once, so it may have just finished \
         (or the id is wrong)"
    )]
    NotFound(Uuid),
    /// A bulk operation's filter that selects nothing it may act on.
    #[error("{0}")]
    BadFilter(String),
    #[error("event {0} is not dead; only dead events can be replayed")]
    NotDead(Uuid),
    #[error(
        "event {id} is already dead (last_error: {}); nothing to cancel (`outrun events replay {id}` runs it again)",
        last_error.as_deref().unwrap_or("none")
    )]
    AlreadyDead {
        id: Uuid,
        last_error: Option<String>,
    },
    #[error(
        "event {0} could not be cancelled: its handler's effects are being committed right now; \
         it is handled or failed within moments (check with `outrun events show {0}`)"
    )]
    CancelBusy(Uuid),
    #[error("no store attached to these effects")]
    NoStore,
    #[error(
        "the event's lease was lost (it ran longer than its lease and another runtime took it); its effects are discarded"
    )]
    LeaseLost,
    #[error("no event is in this lane (its effects were already committed or undone)")]
    NotInLane,
    #[error(
        "an earlier statement of this event failed, so its transaction can only be rolled back; \
         the event runs again (with a savepoint, so a failed statement no longer ends it)"
    )]
    Poisoned,
    #[error(
        "the transaction this event's statements ran in was rolled back because another event \
         in it failed; the event runs again, without spending a retry"
    )]
    RolledBack,
    #[error(
        "another event's statement ran between two statements of this event in the shared \
         effects transaction, so what it read may have changed under it; the event runs again, \
         without spending a retry, and its handler's events run their statements alone from now on"
    )]
    Interleaved,
    #[error(
        "column {column:?} has type {type_name}, which the sql capability cannot return; \
         cast it in the query (for example `{column}::text`)"
    )]
    UnsupportedColumn { column: String, type_name: String },
    /// A `sql` capability parameter that does not convert to the type the
    /// statement gives it.
    #[error("parameter ${index}: {reason}")]
    Param { index: usize, reason: String },
    #[error(
        "the statement has {expected} parameter(s) but {given} value(s) were given; pass one value per placeholder"
    )]
    ParamCount { expected: usize, given: usize },
    #[error("the store was closed; wake-ups end with it")]
    Closed,
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// From the SQLite writer (see `sqlite/writer.rs`).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// From a pipelined PostgreSQL effects connection (see
    /// `postgres/pipe.rs`).
    #[error("database error: {}", transient::PgErrorText(.0))]
    Pg(#[from] tokio_postgres::Error),
    /// A pipe could not connect (see `postgres/pipe.rs`). Transient
    /// whatever the cause: the runtime's other sessions use the same URL,
    /// so the event runs again rather than fail for it.
    #[error(
        "cannot open a pipelined effects connection: {}; the event runs again",
        transient::PgErrorText(.0)
    )]
    PipeConnect(tokio_postgres::Error),
    #[error(
        "a shared transaction's follow-up events could not be inserted, so this handler's events \
         run in lanes from now on (where the event at fault gets the error); the event runs again, \
         without spending a retry"
    )]
    FollowUpsToLanes,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn dead_only(filter: &Filter, what: &str) -> Result<()> {
    match filter.state {
        None | Some(StateFilter::Dead) => Ok(()),
        Some(s) => Err(StoreError::BadFilter(format!(
            "{what} acts on dead events only; state {} selects none (leave the state out or say dead)",
            serde_json::to_string(&s).unwrap_or_default()
        ))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Counts by state. `pending`: ready now; `scheduled`: waiting for
/// `available_at` (delay or backoff); `running`: leased; `dead`: `retry >= max_retry`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Stats {
    /// Events not handled yet: pending + scheduled + running ("has every
    /// old-version event been handled?" is `live == 0` for its name).
    pub live: i64,
    pub pending: i64,
    pub scheduled: i64,
    pub running: i64,
    pub dead: i64,
    /// Age in seconds of the oldest live, ready event (0 when none).
    pub oldest_pending_age_secs: f64,
}

impl Stats {
    /// The counts as the backends read them; `live` follows from them.
    pub fn new(pending: i64, scheduled: i64, running: i64, dead: i64, oldest_age: f64) -> Self {
        Stats {
            live: pending + scheduled + running,
            pending,
            scheduled,
            running,
            dead,
            oldest_pending_age_secs: oldest_age,
        }
    }

    /// Add `other`'s counts (the oldest pending age is the older one).
    pub fn add(&mut self, other: &Stats) {
        *self = Stats::new(
            self.pending + other.pending,
            self.scheduled + other.scheduled,
            self.running + other.running,
            self.dead + other.dead,
            self.oldest_pending_age_secs
                .max(other.oldest_pending_age_secs),
        );
    }
}

/// [`Stats`] of the events of one name (see [`Store::stats_by_name`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NameStats {
    pub name: String,
    #[serde(flatten)]
    pub stats: Stats,
}

/// Filter for [`Store::list`]. Live events come oldest first (by
/// `create_date`, then insertion order); dead ones newest dead first (by
/// `dead_at`, or `create_date` for rows without one).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only dead events (otherwise only live ones).
    pub dead: bool,
    pub name: Option<String>,
    /// At most this many rows; 0 or less means [`DEFAULT_LIST_LIMIT`].
    pub limit: i64,
}

/// Rows [`Store::list`] returns when the filter sets no limit.
pub const DEFAULT_LIST_LIMIT: i64 = 100;

impl ListFilter {
    fn effective_limit(&self) -> i64 {
        if self.limit <= 0 {
            DEFAULT_LIST_LIMIT
        } else {
            self.limit
        }
    }
}

/// Which live events [`Store::cancel`] and [`Store::cancel_matching`] act on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CancelTarget<'a> {
    Id(Uuid),
    Name {
        name: &'a str,
        group_id: Option<&'a str>,
    },
    /// Live events only (a dead state is refused before).
    Filter(&'a Filter),
}

/// `last_error` of a cancelled event.
pub const CANCELLED: &str = "cancelled";

/// What a cancel did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Cancelled {
    /// Events now dead with `last_error = 'cancelled'`.
    pub cancelled: u64,
    /// Of those, events that were running: the attempt in progress ends
    /// without effects (its verdict finds the event dead).
    pub running: u64,
    /// Live events that matched but could not be cancelled because their
    /// handler's effects were being committed at that moment (PostgreSQL;
    /// they are handled or failed within moments).
    pub busy: u64,
}

/// What a failed attempt does to the row.
#[derive(Debug, Clone)]
pub enum Failure {
    /// `retry += 1`, `available_at = retry_at`; dead if `retry` reaches
    /// `max_retry` (the override replaces the row's `max_retry` first).
    Retry {
        error: String,
        retry_at: DateTime<Utc>,
        max_retry: Option<i32>,
    },
    /// Dead at once: `retry = max_retry`, `last_error = error`.
    Dead { error: String },
    /// Not a failure: release the lease and run again at `at`; `retry`
    /// unchanged. (`retry-after` from a handler.)
    Reschedule { at: DateTime<Utc> },
    /// Not the event's fault: the database dropped the connection, a
    /// deadlock or serialization failure aborted the attempt, or the
    /// effects' commit failed. Run again at `retry_at` without spending a
    /// retry; `last_error` records why.
    Interrupted {
        error: String,
        retry_at: DateTime<Utc>,
    },
}

/// Connection knobs. Defaults suit the CLI; the runtime sizes the pool from
/// its concurrency.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// How [`Store::open`] treats a database that is missing or not answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenMode {
    /// Create a missing SQLite file (otherwise [`StoreError::NoDatabase`]).
    pub create: bool,
    /// Keep trying a PostgreSQL server that refuses connections (it may be
    /// starting) until the acquire timeout; otherwise one attempt, bounded
    /// by the acquire timeout, whose error is the real cause.
    pub wait_for_server: bool,
}

impl OpenMode {
    /// [`Store::connect`]'s: create the file, wait for a starting server.
    pub const SERVE: OpenMode = OpenMode {
        create: true,
        wait_for_server: true,
    };
    /// For commands that act on an existing outbox: no file created, one
    /// quick attempt at the server.
    pub const EXISTING: OpenMode = OpenMode {
        create: false,
        wait_for_server: false,
    };
    /// For `outrun migrate`: create the file, one quick attempt.
    pub const CREATE: OpenMode = OpenMode {
        create: true,
        wait_for_server: false,
    };
}

/// The outbox table on one backend. Cheap to clone (pools are `Arc`s).
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// Redact the password of a database URL for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Connect by URL scheme: `sqlite:` or `postgres:`/`postgresql:`. Does
    /// not migrate. A connection failure is reported with the password
    /// redacted.
    ///
    /// A missing SQLite file is created, and a PostgreSQL server that
    /// refuses connections is tried again until `opts.acquire_timeout`
    /// ([`OpenMode::SERVE`]); see [`Store::open`] for other choices.
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Store> {
        Self::open(url, opts, OpenMode::SERVE).await
    }

    /// [`Store::connect`], with `mode` choosing whether a missing SQLite
    /// file is created and whether a refusing server is waited for.
    pub async fn open(url: &str, opts: &ConnectOptions, mode: OpenMode) -> Result<Store> {
        if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(
                sqlite::SqliteStore::open(url, opts, mode).await?,
            ))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Store::Postgres(
                postgres::PgStore::open(url, opts, mode).await?,
            ))
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Store::Sqlite(_) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    /// Apply the embedded migrations of this backend (idempotent, safe to
    /// run from several processes at once). outrun records them in its own
    /// table, `outrun_migrations`; see [`migrate`].
    pub async fn migrate(&self) -> Result<MigrationReport> {
        match self {
            Store::Sqlite(s) => migrate::sqlite(s.pool()).await,
            Store::Postgres(s) => migrate::postgres(s.pool()).await,
        }
    }

    /// Enqueue on a connection of the store's own pool, in its own
    /// transaction. To enqueue inside an application transaction use
    /// [`sqlite::enqueue`] / [`postgres::enqueue`] (or [`crate::enqueue`]).
    ///
    /// With a schema registry attached ([`Store::with_schemas`]) the payload
    /// is checked against its schema first; a violation writes nothing.
    pub async fn enqueue(&self, event: &NewEvent, default_max_retry: i32) -> Result<Uuid> {
        if let Some(schemas) = self.schemas() {
            event.validate()?;
            schemas
                .check(&event.name, &event.payload)
                .map_err(InvalidEvent::from)?;
        }
        each!(self, s => s.enqueue(event, default_max_retry).await)
    }

    /// Check every enqueue of this store (and of its clones made after
    /// this) against `schemas`. `None`: no checks, no cost.
    pub fn with_schemas(
        mut self,
        schemas: Option<std::sync::Arc<crate::schema::Schemas>>,
    ) -> Store {
        match &mut self {
            Store::Sqlite(s) => s.schemas = schemas,
            Store::Postgres(s) => s.schemas = schemas,
        }
        self
    }

    /// The schema registry attached with [`Store::with_schemas`]; the
    /// dispatcher checks claimed events against it too.
    pub fn schemas(&self) -> Option<&std::sync::Arc<crate::schema::Schemas>> {
        each!(self, s => s.schemas.as_ref())
    }

    /// Enqueue several events in one transaction; ids in input order.
    /// Schemas are checked as [`Store::enqueue`] does; one violation and
    /// nothing of the batch is written.
    pub async fn enqueue_batch(
        &self,
        events: &[NewEvent],
        default_max_retry: i32,
    ) -> Result<Vec<Uuid>> {
        if let Some(schemas) = self.schemas() {
            for event in events {
                event.validate()?;
                schemas
                    .check(&event.name, &event.payload)
                    .map_err(InvalidEvent::from)?;
            }
        }
        each!(self, s => s.enqueue_batch(events, default_max_retry).await)
    }

    /// Claim up to `limit` ready events in one statement: ready
    /// (`available_at <= now`), live, not expired, not leased (or lease
    /// expired), not behind an earlier live event of the same group, and
    /// not named in `skip_names`. Each gets `locked_by = worker`,
    /// `locked_until = now + lease` and a fresh fencing token. Oldest
    /// `available_at` first.
    pub async fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        skip_names: &[String],
    ) -> Result<Vec<Claimed>> {
        self.claim_excluding(worker, limit, lease, skip_names, &[])
            .await
    }

    /// [`Store::claim`], also leaving out `excluded`: names this claimer
    /// never takes this way (the `[[limit]]`ed ones, claimed by
    /// [`Store::claim_limited`]). Unlike `skip_names` (names skipped for
    /// now, whose rows may then sort before where claims got to), they do
    /// not make a PostgreSQL claim start again from the head of the claim
    /// index.
    pub async fn claim_excluding(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        skip_names: &[String],
        excluded: &[String],
    ) -> Result<Vec<Claimed>> {
        each!(self, s => s.claim(worker, limit, lease, skip_names, excluded).await)
    }

    /// How often the dispatcher should call [`Store::checkpoint`], if the
    /// backend needs it (SQLite's write-ahead log; see `sqlite.rs`).
    pub fn checkpoint_interval(&self) -> Option<Duration> {
        match self {
            Store::Sqlite(_) => Some(Duration::from_millis(500)),
            Store::Postgres(_) => None,
        }
    }

    /// Background upkeep of the backend's log; see
    /// [`Store::checkpoint_interval`].
    pub async fn checkpoint(&self) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.checkpoint().await,
            Store::Postgres(_) => Ok(()),
        }
    }

    /// Tell the next claim that work may have become claimable anywhere in
    /// the queue, not only after where the last claim ended (PostgreSQL
    /// claims resume from a cursor; SQLite has nothing to rewind).
    pub fn rewind_claims(&self) {
        if let Store::Postgres(s) = self {
            s.rewind();
        }
    }

    /// Push `locked_until` to now + lease for the leases still held; returns
    /// how many were extended (a lease that was lost is not).
    pub async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<u64> {
        each!(self, s => s.extend(leases, lease).await)
    }

    /// Delete the events whose lease is still held, in one statement.
    /// Returns the ids actually deleted.
    pub async fn ack(&self, leases: &[Lease]) -> Result<Vec<Uuid>> {
        each!(self, s => s.ack(leases).await)
    }

    /// Record a failed (or rescheduled) attempt if the lease is still held.
    /// Returns false when the lease was lost (nothing changed).
    pub async fn fail(&self, lease: Lease, failure: &Failure) -> Result<bool> {
        each!(self, s => s.fail(lease, failure).await)
    }

    /// Give claimed-but-unstarted events back: clear the lease, keep
    /// `retry` and `available_at`.
    pub async fn release(&self, leases: &[Lease]) -> Result<u64> {
        each!(self, s => s.release(leases).await)
    }

    /// Open a transaction for a handler's effects and its ack.
    pub async fn begin(&self) -> Result<AckTx> {
        each!(self, s => s.begin().await)
    }

    /// The statement that opens a lane's transaction (see [`lane`]),
    /// followed by `; ` so the event's first statement can share its round
    /// trip. SQLite takes the write lock up front (see `sqlite.rs`).
    /// SQLite's shared effects transaction (see [`shared`]); none on
    /// PostgreSQL, whose lanes are sessions of their own.
    pub(crate) fn shared_effects(&self) -> Option<shared::Shared> {
        match self {
            Store::Sqlite(s) => Some(shared::Shared::new(s.writer())),
            Store::Postgres(_) => None,
        }
    }

    /// PostgreSQL's pipelined effects transactions (see
    /// [`postgres::pipe`]), unless the URL is one tokio-postgres cannot
    /// read (then lanes carry every event).
    pub(crate) fn effect_pipes(&self, count: usize) -> Option<postgres::pipe::Pipes> {
        match self {
            Store::Postgres(s) => s
                .pipe_config()
                .map(|c| postgres::pipe::Pipes::new(c, count)),
            Store::Sqlite(_) => None,
        }
    }

    pub(crate) fn lane_begin(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "BEGIN IMMEDIATE; ",
            Store::Postgres(_) => "BEGIN; ",
        }
    }

    /// Mark live, unleased events whose `expires_at` passed as dead with
    /// `last_error = 'expired'`; at most `limit` rows. Returns the count.
    pub async fn expire_due(&self, limit: i64) -> Result<u64> {
        each!(self, s => s.expire_due(limit).await)
    }

    /// Delete dead events that died before `before` (`dead_at`, or
    /// `create_date` for rows that died before outrun recorded `dead_at`),
    /// at most `limit` rows. Never touches live events.
    pub async fn cleanup_dead(&self, before: DateTime<Utc>, limit: i64) -> Result<u64> {
        each!(self, s => s.cleanup_dead(before, limit).await)
    }

    /// Readiness, in one primary-key lookup whatever the outbox's size: the
    /// database answers and has every migration this binary knows applied
    /// (`/readyz`, `outrun_db_up`). [`StoreError::MigrationsPending`] when
    /// it lags behind.
    pub async fn ping(&self) -> Result<()> {
        const NEWEST: &str = "SELECT max(version) FROM outrun_migrations";
        let (applied, needed) = match self {
            Store::Sqlite(s) => (
                sqlx::query_scalar::<_, Option<i64>>(NEWEST)
                    .fetch_one(s.pool())
                    .await?,
                migrate::newest(&migrate::SQLITE),
            ),
            Store::Postgres(s) => (
                sqlx::query_scalar::<_, Option<i64>>(NEWEST)
                    .fetch_one(s.pool())
                    .await?,
                migrate::newest(&migrate::POSTGRES),
            ),
        };
        let applied = applied.unwrap_or(0);
        if applied < needed {
            return Err(StoreError::MigrationsPending { applied, needed });
        }
        Ok(())
    }

    pub async fn stats(&self) -> Result<Stats> {
        each!(self, s => s.stats().await)
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Event>> {
        each!(self, s => s.list(filter).await)
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Event>> {
        each!(self, s => s.get(id).await)
    }

    /// One page of the events `query` selects, in one statement (keyset
    /// pagination; see [`query`]).
    pub async fn page(&self, query: &EventQuery) -> Result<Page> {
        let dead = query.state.is_dead();
        let limit = query.limit.clamp(1, 1000);
        // One row more than asked tells whether a next page exists.
        let mut rows = each!(self, s => s.page(query, limit + 1).await)?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next = more
            .then(|| rows.last().map(|(ev, seq)| Cursor::of(ev, *seq, dead)))
            .flatten();
        Ok(Page {
            events: rows.into_iter().map(|(ev, _)| ev).collect(),
            next,
        })
    }

    /// [`Stats`] per event name, by name, in one `GROUP BY` statement.
    pub async fn stats_by_name(&self) -> Result<Vec<NameStats>> {
        each!(self, s => s.stats_by_name().await)
    }

    /// Make one dead event live again: `retry = 0`, `available_at = now`,
    /// `last_error` kept for the record, expiry and `dead_at` cleared.
    /// Errors if the id is unknown or the event is not dead.
    pub async fn replay(&self, id: Uuid) -> Result<()> {
        each!(self, s => s.replay(id).await)
    }

    /// Replay every dead event; returns how many.
    pub async fn replay_all_dead(&self) -> Result<u64> {
        each!(self, s => s.replay_all_dead().await)
    }

    /// Cancel one live event: it becomes dead at once with `last_error =
    /// 'cancelled'` (and `dead_at`), so it can be inspected and replayed.
    /// A running event's lease is taken away with it: whatever its attempt
    /// then does (succeed, fail, defer) finds the event dead, and the
    /// attempt's effects are discarded as for a lost lease.
    ///
    /// Errors: [`StoreError::NotFound`], [`StoreError::AlreadyDead`], and on
    /// PostgreSQL [`StoreError::CancelBusy`] while the event's effects are
    /// being committed (its row is locked by the commit).
    pub async fn cancel(&self, id: Uuid) -> Result<Cancelled> {
        let done = each!(self, s => s.cancel(CancelTarget::Id(id)).await)?;
        if done.cancelled > 0 {
            return Ok(done);
        }
        Err(match self.get(id).await? {
            None => StoreError::NotFound(id),
            Some(ev) if ev.is_dead() => StoreError::AlreadyDead {
                id,
                last_error: ev.last_error,
            },
            Some(_) => StoreError::CancelBusy(id),
        })
    }

    /// Cancel every live event named `name` (and of group `group_id`, if
    /// given), as [`Store::cancel`] does one.
    pub async fn cancel_matching(&self, name: &str, group_id: Option<&str>) -> Result<Cancelled> {
        crate::event::validate_name(name)?;
        let target = CancelTarget::Name { name, group_id };
        each!(self, s => s.cancel(target).await)
    }

    /// How many events `filter` selects now (live ones unless its state
    /// says otherwise): the count a bulk operation's dry run reports.
    pub async fn count_matching(&self, filter: &Filter) -> Result<u64> {
        each!(self, s => s.count(filter).await)
    }

    /// Replay the dead events `filter` selects (its state must be dead or
    /// unset); returns how many.
    pub async fn replay_matching(&self, filter: &Filter) -> Result<u64> {
        dead_only(filter, "replay")?;
        each!(self, s => s.replay_filtered(filter).await)
    }

    /// Delete the dead events `filter` selects (its state must be dead or
    /// unset); returns how many.
    pub async fn purge_matching(&self, filter: &Filter) -> Result<u64> {
        dead_only(filter, "purge")?;
        each!(self, s => s.purge_filtered(filter).await)
    }

    /// Cancel the live events `filter` selects, as [`Store::cancel`] does
    /// one. Refuses a dead state, and a filter that selects every live
    /// event (give at least one condition).
    pub async fn cancel_filtered(&self, filter: &Filter) -> Result<Cancelled> {
        if filter.state == Some(StateFilter::Dead) {
            return Err(StoreError::BadFilter(
                "cancel acts on live events; state dead selects none (replay or purge them)".into(),
            ));
        }
        if filter.group_id.is_some() && filter.name.is_none() {
            return Err(StoreError::BadFilter(
                "a group is only unique within an event name: give the name with the group".into(),
            ));
        }
        if !filter.narrows() && filter.state.is_none() {
            return Err(StoreError::BadFilter(
                "cancel needs a condition (name, group, error text, since or a live state); \
                 it does not cancel every live event"
                    .into(),
            ));
        }
        if let Some(n) = &filter.name {
            crate::event::validate_name(n)?;
        }
        let target = CancelTarget::Filter(filter);
        each!(self, s => s.cancel(target).await)
    }

    /// Delete dead events (that died before `before`, if given; see
    /// [`Store::cleanup_dead`]).
    pub async fn purge_dead(&self, before: Option<DateTime<Utc>>) -> Result<u64> {
        each!(self, s => s.purge_dead(before).await)
    }

    /// A source of "new work may exist" hints for the claim loop. PostgreSQL:
    /// `LISTEN outrun_events` (the table's insert trigger and replay notify),
    /// so inserts from any process wake it. SQLite: enqueues, replays and
    /// releases made through this store (any clone of it); writes by other
    /// processes are only seen by the caller's polling.
    pub async fn wakeups(&self) -> Result<Wakeups> {
        match self {
            Store::Sqlite(s) => Ok(Wakeups(WakeupSource::Local(s.subscribe()))),
            Store::Postgres(s) => Ok(Wakeups(WakeupSource::Listen(Box::new(s.listen().await?)))),
        }
    }
}

/// Wake-up hints from [`Store::wakeups`]. A hint is not a promise: the work
/// may already be taken, so the caller claims and, on errors, falls back to
/// polling.
pub struct Wakeups(WakeupSource);

enum WakeupSource {
    Local(tokio::sync::watch::Receiver<u64>),
    Listen(Box<sqlx::postgres::PgListener>),
}

impl Wakeups {
    /// Resolve when new work may exist since the previous call (or since
    /// this `Wakeups` was made). On SQLite this is cancel-safe (a hint that
    /// arrives while nobody waits is kept for the next call); on PostgreSQL
    /// it is as cancel-safe as sqlx's `PgListener::try_recv`, and the caller
    /// polls anyway.
    ///
    /// On PostgreSQL a lost listener connection resolves `Ok` (notifications
    /// sent while it was down are gone, so the caller should look) and the
    /// next call reconnects; an error means the listener cannot reconnect and
    /// the caller should poll.
    pub async fn next(&mut self) -> Result<()> {
        match &mut self.0 {
            WakeupSource::Local(rx) => {
                // The sender lives in the store; if every clone of it is gone
                // there is nothing left to wait for.
                rx.changed().await.map_err(|_| StoreError::Closed)
            }
            WakeupSource::Listen(listener) => {
                listener.try_recv().await?;
                Ok(())
            }
        }
    }
}

impl std::fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            WakeupSource::Local(_) => f.write_str("Wakeups(local)"),
            WakeupSource::Listen(_) => f.write_str("Wakeups(LISTEN outrun_events)"),
        }
    }
}

/// A transaction that carries a handler's SQL and emitted events and, on
/// commit, deletes the event it handled: all of it happens, or none of it.
pub enum AckTx {
    /// A transaction on the SQLite writer.
    Sqlite(sqlite::WriterTx),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    /// The event's savepoint in a lane the dispatcher commits in groups
    /// (see [`lane`]); its row is deleted with the others' at the commit.
    Lane(lane::LaneTx),
    /// The event's membership of SQLite's shared effects transaction (see
    /// [`shared`]); committed in groups like a lane's.
    Shared(shared::SharedTx),
    /// The event's membership of a PostgreSQL pipe's transaction (see
    /// [`postgres::pipe`]); committed in groups like a lane's.
    Pipe(postgres::pipe::PipeTx),
}

impl AckTx {
    /// Run a statement that returns rows (the `sql` capability).
    pub async fn query(&mut self, statement: &str, params: &[SqlValue]) -> Result<SqlRows> {
        match self {
            AckTx::Sqlite(tx) => sqlite::query(tx.conn(), statement, params),
            AckTx::Postgres(tx) => postgres::query(tx, statement, params).await,
            AckTx::Lane(tx) => tx.query(statement, params).await,
            AckTx::Shared(tx) => tx.query(statement, params).await,
            AckTx::Pipe(tx) => tx.query(statement, params).await,
        }
    }

    /// Run a statement; rows affected.
    pub async fn execute(&mut self, statement: &str, params: &[SqlValue]) -> Result<u64> {
        match self {
            AckTx::Sqlite(tx) => sqlite::execute(tx.conn(), statement, params),
            AckTx::Postgres(tx) => postgres::execute(tx, statement, params).await,
            AckTx::Lane(tx) => tx.execute(statement, params).await,
            AckTx::Shared(tx) => tx.execute(statement, params).await,
            AckTx::Pipe(tx) => tx.execute(statement, params).await,
        }
    }

    /// Insert follow-up events in this transaction.
    pub async fn enqueue_all(
        &mut self,
        events: &[NewEvent],
        default_max_retry: i32,
    ) -> Result<Vec<Uuid>> {
        if let AckTx::Lane(tx) = self {
            // The lane returns no ids: nobody reads them on this path.
            tx.lane
                .enqueue_all(events.to_vec(), default_max_retry)
                .await?;
            return Ok(Vec::new());
        }
        if let AckTx::Shared(tx) = self {
            tx.enqueue_all(events, default_max_retry).await?;
            return Ok(Vec::new());
        }
        if let AckTx::Pipe(_) = self {
            // A pipe's follow-ups go with its event's verdict
            // (`Committer::keep_with_emits`), inserted by the commit.
            return Err(StoreError::NotInLane);
        }
        let mut ids = Vec::with_capacity(events.len());
        for ev in events {
            ids.push(match self {
                AckTx::Sqlite(tx) => sqlite::enqueue_in(tx.conn(), ev, default_max_retry)?,
                AckTx::Postgres(tx) => {
                    postgres::enqueue_with_default(tx, ev, default_max_retry).await?
                }
                AckTx::Lane(_) | AckTx::Shared(_) | AckTx::Pipe(_) => {
                    unreachable!("handled above")
                }
            });
        }
        Ok(ids)
    }

    /// Delete the event if `lease` still holds and commit everything; if the
    /// lease was lost, roll back (the handler's writes and emits vanish) and
    /// return false.
    pub async fn commit_ack(self, lease: Lease) -> Result<bool> {
        match self {
            AckTx::Sqlite(tx) => sqlite::commit_ack(tx, lease),
            AckTx::Postgres(tx) => postgres::commit_ack(tx, lease).await,
            // The lane commits for many events at once; the dispatcher
            // keeps the event in it instead (see `lane`).
            AckTx::Lane(mut tx) => {
                let _ = tx.lane.undo().await;
                Err(StoreError::NotInLane)
            }
            // Dropped: undone (the dispatcher's lingerer reschedules
            // whatever that rolls back with it).
            AckTx::Shared(_) | AckTx::Pipe(_) => Err(StoreError::NotInLane),
        }
    }

    /// Commit the statements and inserted events without acking any event:
    /// `outrun handlers run --commit`, whose event never was in the outbox.
    pub async fn commit(self) -> Result<()> {
        match self {
            AckTx::Sqlite(tx) => tx.commit()?,
            AckTx::Postgres(tx) => tx.commit().await?,
            AckTx::Lane(mut tx) => {
                tx.lane.undo().await;
                return Err(StoreError::NotInLane);
            }
            AckTx::Shared(_) | AckTx::Pipe(_) => return Err(StoreError::NotInLane),
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        match self {
            AckTx::Sqlite(tx) => tx.rollback()?,
            AckTx::Postgres(tx) => tx.rollback().await?,
            AckTx::Lane(mut tx) => {
                let _ = tx.lane.undo().await;
            }
            AckTx::Shared(tx) => drop(tx),
            AckTx::Pipe(tx) => drop(tx),
        }
        Ok(())
    }
}

/// Backends on which an application can enqueue inside its own transaction.
pub trait OutboxDatabase: sqlx::Database {
    fn enqueue<'c>(
        conn: &'c mut Self::Connection,
        event: &'c NewEvent,
    ) -> futures::future::BoxFuture<'c, Result<Uuid>>;
}

impl OutboxDatabase for sqlx::Sqlite {
    fn enqueue<'c>(
        conn: &'c mut Self::Connection,
        event: &'c NewEvent,
    ) -> futures::future::BoxFuture<'c, Result<Uuid>> {
        Box::pin(sqlite::enqueue(conn, event))
    }
}

impl OutboxDatabase for sqlx::Postgres {
    fn enqueue<'c>(
        conn: &'c mut Self::Connection,
        event: &'c NewEvent,
    ) -> futures::future::BoxFuture<'c, Result<Uuid>> {
        Box::pin(postgres::enqueue(conn, event))
    }
}

/// Default `max_retry` when neither the event nor the config sets one; the
/// column default in both migrations matches it.
pub const DEFAULT_MAX_RETRY: i32 = 5;

/// The event's `max_retry`, or the runtime default, checked against the
/// column's range (the event's own value is already checked by `validate`;
/// this also catches a bad default before any SQL runs).
fn effective_max_retry(event: &NewEvent, default_max_retry: i32) -> Result<i16> {
    let m = event.max_retry.unwrap_or(default_max_retry);
    match i16::try_from(m) {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(InvalidEvent::MaxRetry(m.into()).into()),
    }
}
