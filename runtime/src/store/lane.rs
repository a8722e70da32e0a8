//! A lane: one connection whose open transaction carries the effects of
//! many events, each inside its own savepoint, committed together.
//!
//! Why: an event's effects (its handler's SQL, its follow-up events and the
//! delete of the event itself) must commit together or not at all. One
//! transaction per event costs a BEGIN, a COMMIT (and on PostgreSQL a pool
//! round trip and a WAL flush) per event, which made a handler that writes
//! one row 15-30 times slower than one that writes nothing. A lane runs the
//! events one after another in one transaction:
//!
//! ```text
//! BEGIN
//!   SAVEPOINT e1; handler 1's SQL
//!   SAVEPOINT e2; handler 2's SQL ... handler 2 fails → ROLLBACK TO SAVEPOINT e2
//!   SAVEPOINT e3; ...
//!   INSERT events 1 and 3's follow-ups, DELETE events 1 and 3,
//!     fenced by their tokens                        -- one statement
//! COMMIT                      -- events 1 and 3 with all their effects
//! ```
//!
//! Follow-up events wait in memory for the commit (on PostgreSQL; SQLite
//! inserts them in place, a call rather than a round trip): no handler is
//! told an emitted event's id, so nothing needs them earlier, and an
//! emit-only handler's event costs the lane no round trip at all.
//!
//! The kept events' rows are deleted in one statement just before the
//! commit, checked against their fencing tokens: if any row is no longer
//! ours (its lease lapsed and another runtime took it, or it was
//! cancelled), the transaction rolls back whole and the other events run
//! again, so an event we no longer own never commits effects. That is rare
//! (a stall longer than the lease) and costs one rerun of a batch; the
//! common case costs one round trip per event (its savepoint) and one
//! statement per batch, instead of a delete planned per event. Only the
//! event in the lane at the moment can be rolled back (savepoints nest),
//! which is why a lane serves one event at a time.
//!
//! An event may also enter without a savepoint ([`Lane::enter_bare`]):
//! no round trip at all when the transaction is already open. Undoing such
//! an event rolls back the whole transaction and hands its other events
//! back to run again; the dispatcher decides which events take that bet
//! (see `dispatch::committer`).
//!
//! On SQLite most events never come here: those without a savepoint share
//! one transaction, statement by statement ([`super::shared`]); the lane
//! serves the events of handlers that need a savepoint.
//!
//! Which connection: on PostgreSQL a lane owns a dedicated session with
//! `synchronous_commit = off` (see [`lane_settings`]). On SQLite the lane
//! borrows the bookkeeping connection for the life of each transaction:
//! SQLite has one writer, and making claims wait for that connection (a
//! fair, async wait) is cheaper than letting them spin in SQLite's busy
//! handler (sleeps of 1-100 ms) behind an open write transaction.
//!
//! Any error that may have cost the connection its transaction abandons the
//! transaction: the connection is dropped and the events kept in it are
//! handed back to the caller, to be run again. Never lost, never committed
//! by halves.

use futures::future::BoxFuture;
use sqlx::PgConnection;

use super::{AckTx, Result, SqlRows, SqlValue, Store, StoreError};
use crate::event::{Lease, NewEvent};

/// A transaction that events share (SQLite's, or a PostgreSQL pipe's),
/// which the committer's lingerer closes a linger after its first kept
/// event.
#[async_trait::async_trait]
pub trait Lingers: Send + Sync {
    /// Wait for a kick: a first event was kept, or a member vanished and
    /// left work behind.
    async fn kicked(&self);
    /// Kept events of transactions rolled back behind a vanished member.
    fn take_orphans(&self) -> Vec<Kept>;
    /// Close it: what the commit came to, if nobody is running in it.
    async fn close_now(&self) -> Option<Committed>;
}

/// What became of kept events when a transaction ended.
pub type Committed = (Vec<Kept>, Result<()>);

/// An event whose effects sit in a lane's open transaction, waiting for the
/// commit.
#[derive(Debug, Clone)]
pub struct Kept {
    pub lease: Lease,
    /// Its group's next event becomes claimable once this commits.
    pub grouped: bool,
    /// It emitted follow-up events that are due now; they become claimable
    /// once this commits, so the claimer is woken.
    pub emitted: bool,
    /// Its attempt's record, with `[runtime] keep_done`.
    pub done: Option<Box<super::Attempt>>,
}

enum LaneConn {
    Postgres(PgConnection),
    /// The SQLite writer, held for the life of each transaction.
    Sqlite(super::sqlite::WriterGuard),
}

/// See the module docs. Not `Clone`: the dispatcher keeps each lane behind
/// a mutex and lends it to one event at a time.
pub struct Lane {
    store: Store,
    conn: Option<LaneConn>,
    /// A transaction is open on `conn`.
    open: bool,
    next_savepoint: u64,
    /// The event in the lane now, if any.
    current: Option<Current>,
    /// The event in the lane hit a transient database error.
    current_transient: bool,
    /// Statements the event in the lane ran.
    current_statements: u32,
    /// A statement of the event in the lane (one without a savepoint)
    /// failed: the transaction can only be rolled back whole, and the
    /// event must run again whatever its handler decides.
    poisoned: bool,
    kept: Vec<Kept>,
    /// Follow-up events of the kept events (and of the one in the lane,
    /// from `current_emits_from` on), inserted by the commit's one
    /// statement (PostgreSQL): an emit costs no round trip of its own.
    deferred: Vec<(NewEvent, i32)>,
    current_emits_from: usize,
    /// Emits wait for the commit. Turned off for the life of the lane if a
    /// commit with emits fails for a reason that is not transient: the
    /// events then insert their emits one by one, so the one at fault gets
    /// the error instead of every batch running again.
    defer_emits: bool,
}

/// How the event in the lane can be undone.
#[derive(Debug, Clone)]
enum Current {
    /// Back to its savepoint; the other events stay.
    Savepoint(u64),
    /// Only by rolling back the whole transaction (the other events run
    /// again). Saves the savepoint's round trip for handlers that do not
    /// fail; the handler's name tells the dispatcher whose events need a
    /// savepoint from then on.
    Bare(std::sync::Arc<str>),
}

impl Lane {
    pub fn new(store: Store) -> Self {
        Self {
            conn: None,
            open: false,
            next_savepoint: 0,
            current: None,
            current_transient: false,
            current_statements: 0,
            poisoned: false,
            kept: Vec::new(),
            deferred: Vec::new(),
            current_emits_from: 0,
            defer_emits: matches!(store, Store::Postgres(_)),
            store,
        }
    }

    /// A transaction is open (it may hold nothing yet).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Events whose effects wait for [`Lane::commit`].
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// An event is in the lane (entered, not yet kept or undone).
    pub fn in_event(&self) -> bool {
        self.current.is_some()
    }

    /// The event in the lane hit a transient database error (a dropped
    /// connection, a deadlock, ...): its failure should not count against it.
    pub fn saw_transient(&self) -> bool {
        self.current_transient
    }

    /// Let an event in: open the transaction if none is open and set the
    /// event's savepoint, in one round trip. On `Err` the event is not in
    /// the lane; see [`Lane::take_abandoned`].
    pub async fn enter(&mut self) -> Result<()> {
        self.enter_as(None).await
    }

    /// [`Lane::enter`] without a savepoint: no round trip unless the
    /// transaction has to be opened. If the event then fails, undoing it
    /// rolls back the whole transaction and the other events in it run
    /// again (see [`Lane::undo`]); `handler` is named in that report.
    pub async fn enter_bare(&mut self, handler: std::sync::Arc<str>) -> Result<()> {
        self.enter_as(Some(handler)).await
    }

    async fn enter_as(&mut self, bare: Option<std::sync::Arc<str>>) -> Result<()> {
        debug_assert!(self.current.is_none(), "one event at a time");
        let begin = if self.open {
            ""
        } else {
            self.store.lane_begin()
        };
        let (sql, current) = match bare {
            Some(handler) => (begin.to_string(), Current::Bare(handler)),
            None => {
                self.next_savepoint += 1;
                let sp = self.next_savepoint;
                (format!("{begin}SAVEPOINT e{sp}"), Current::Savepoint(sp))
            }
        };
        let result = async {
            let conn = self.connection().await?;
            if !sql.is_empty() {
                simple(conn, sql).await?;
            }
            Ok::<_, StoreError>(())
        }
        .await;
        match result {
            Ok(()) => {
                self.open = true;
                self.current = Some(current);
                self.current_emits_from = self.deferred.len();
                self.current_transient = false;
                self.current_statements = 0;
                self.poisoned = false;
                Ok(())
            }
            Err(e) => {
                self.abandon();
                Err(e)
            }
        }
    }

    /// The lane's connection, connecting (PostgreSQL) or borrowing the
    /// bookkeeping connection (SQLite) when there is none.
    async fn connection(&mut self) -> Result<&mut LaneConn> {
        if self.conn.is_none() {
            self.conn = Some(match &self.store {
                Store::Postgres(s) => LaneConn::Postgres(s.lane_connection().await?),
                Store::Sqlite(s) => LaneConn::Sqlite(s.lane_connection().await),
            });
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    fn conn_for_event(&mut self) -> Result<&mut LaneConn> {
        if self.current.is_none() {
            return Err(StoreError::NotInLane);
        }
        self.conn.as_mut().ok_or(StoreError::NotInLane)
    }

    fn note(&mut self, e: StoreError) -> StoreError {
        if e.is_transient() {
            self.current_transient = true;
        }
        if matches!(self.current, Some(Current::Bare(_))) {
            // PostgreSQL refuses every later statement of the transaction,
            // and SQLite cannot take back the event's earlier statements:
            // only a rollback of the whole transaction undoes the event.
            self.poisoned = true;
        }
        e
    }

    /// The handler of the event in the lane, if it entered without a
    /// savepoint, and the statements that event ran: whether the handler's
    /// events may share a pipelined transaction (see `dispatch::committer`).
    pub fn bare_statements(&self) -> Option<(&std::sync::Arc<str>, u32)> {
        match &self.current {
            Some(Current::Bare(handler)) => Some((handler, self.current_statements)),
            _ => None,
        }
    }

    /// The event in the lane must run again whatever its handler decides: a
    /// statement of it failed where only rolling back the whole transaction
    /// can undo it (it had no savepoint).
    pub fn must_rerun(&self) -> bool {
        self.poisoned
    }

    fn refuse_if_poisoned(&self) -> Result<()> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        Ok(())
    }

    /// A statement of the event in the lane that returns rows.
    pub async fn query(&mut self, statement: &str, params: &[SqlValue]) -> Result<SqlRows> {
        self.refuse_if_poisoned()?;
        self.current_statements += 1;
        let r = match self.conn_for_event()? {
            LaneConn::Postgres(c) => super::postgres::query(c, statement, params).await,
            LaneConn::Sqlite(c) => super::sqlite::query(c, statement, params),
        };
        r.map_err(|e| self.note(e))
    }

    /// A statement of the event in the lane; rows affected.
    pub async fn execute(&mut self, statement: &str, params: &[SqlValue]) -> Result<u64> {
        self.refuse_if_poisoned()?;
        self.current_statements += 1;
        let r = match self.conn_for_event()? {
            LaneConn::Postgres(c) => super::postgres::execute(c, statement, params).await,
            LaneConn::Sqlite(c) => super::sqlite::execute(c, statement, params),
        };
        r.map_err(|e| self.note(e))
    }

    /// The event's follow-up events: validated now, inserted by the
    /// commit (PostgreSQL), or inserted now (SQLite, where an insert is a
    /// call, not a round trip; and after a failed deferred commit).
    pub async fn enqueue_all(
        &mut self,
        events: Vec<NewEvent>,
        default_max_retry: i32,
    ) -> Result<()> {
        self.refuse_if_poisoned()?;
        self.conn_for_event()?;
        if self.defer_emits {
            for ev in &events {
                ev.validate()?;
                super::effective_max_retry(ev, default_max_retry)?;
            }
            self.deferred
                .extend(events.into_iter().map(|ev| (ev, default_max_retry)));
            return Ok(());
        }
        let mut result = Ok(());
        for ev in &events {
            let r = match self.conn_for_event()? {
                LaneConn::Postgres(c) => {
                    super::postgres::enqueue_with_default(c, ev, default_max_retry)
                        .await
                        .map(|_| ())
                }
                LaneConn::Sqlite(c) => {
                    super::sqlite::enqueue_in(c, ev, default_max_retry).map(|_| ())
                }
            };
            if let Err(e) = r {
                result = Err(self.note(e));
                break;
            }
        }
        result
    }

    /// The event in the lane succeeded: its effects stay in the transaction
    /// and commit with the next [`Lane::commit`].
    pub fn keep(&mut self, kept: Kept) {
        debug_assert!(self.current.is_some());
        debug_assert!(!self.poisoned, "a poisoned event is undone, not kept");
        self.current = None;
        self.kept.push(kept);
    }

    /// Undo everything the event in the lane did (its delete included).
    /// An event without a savepoint is undone by rolling back the whole
    /// transaction: the other events in it are then handed back by
    /// [`Lane::take_abandoned`], to run again, and its handler's name is
    /// returned. If the rollback fails the transaction is abandoned; see
    /// [`Lane::take_abandoned`].
    pub async fn undo(&mut self) -> Option<std::sync::Arc<str>> {
        let current = self.current.take()?;
        self.poisoned = false;
        let (sql, bare) = match current {
            Current::Savepoint(sp) => (format!("ROLLBACK TO SAVEPOINT e{sp}"), None),
            Current::Bare(handler) => ("ROLLBACK".to_string(), Some(handler)),
        };
        let r = match self.conn.as_mut() {
            Some(c) => simple(c, sql).await,
            None => Ok(()),
        };
        match (&r, &bare) {
            (Err(e), _) => {
                tracing::warn!(error = %e, "rolling back a failed event failed; abandoning the lane's transaction");
                self.abandon();
            }
            (Ok(()), Some(_)) => {
                self.open = false;
                self.next_savepoint = 0;
                self.deferred.clear();
                if matches!(self.conn, Some(LaneConn::Sqlite(_))) {
                    self.conn = None;
                }
            }
            (Ok(()), None) => self.deferred.truncate(self.current_emits_from),
        }
        bare
    }

    /// Delete the kept events' rows, fenced by their tokens, and commit
    /// everything. Returns the kept events with the outcome. On `Err`
    /// nothing of them was committed as far as anyone can tell, and they
    /// must run again (a commit whose reply was lost may in fact have
    /// committed: their rows are then gone and a retry finds nothing to
    /// do). [`StoreError::LeaseLost`]: a row was no longer ours (its lease
    /// lapsed and another runtime took it, or it was cancelled), so the
    /// whole transaction was rolled back rather than commit effects of an
    /// event we no longer own; recording the others' retry is token-checked
    /// and skips that one.
    pub async fn commit(&mut self) -> Committed {
        debug_assert!(self.current.is_none(), "an event is still in the lane");
        let kept = std::mem::take(&mut self.kept);
        let deferred = std::mem::take(&mut self.deferred);
        if !self.open {
            return (kept, Ok(()));
        }
        let r = match self.conn.as_mut() {
            Some(c) => finish(c, &kept, &deferred).await,
            None => Ok(true),
        };
        match r {
            Ok(committed) => {
                self.open = false;
                self.next_savepoint = 0;
                // The SQLite writer is free between transactions; claims
                // and acks wait for it.
                if matches!(self.conn, Some(LaneConn::Sqlite(_))) {
                    self.conn = None;
                }
                if committed {
                    (kept, Ok(()))
                } else {
                    (kept, Err(StoreError::LeaseLost))
                }
            }
            Err(e) => {
                if !deferred.is_empty() && !e.is_transient() && self.defer_emits {
                    tracing::warn!(error = %e, "a lane commit with {} follow-up events failed; this lane inserts follow-ups one by one from now on, so the event at fault gets the error", deferred.len());
                    self.defer_emits = false;
                }
                self.abandon();
                (kept, Err(e))
            }
        }
    }

    /// Events that were kept in a transaction that has just been abandoned
    /// (after an error from [`Lane::enter`] or [`Lane::undo`]): they are not
    /// committed and must run again.
    pub fn take_abandoned(&mut self) -> Vec<Kept> {
        if self.open {
            Vec::new()
        } else {
            std::mem::take(&mut self.kept)
        }
    }

    /// Give up the transaction: drop the connection (the server rolls back
    /// whatever it held). The kept events stay listed for
    /// [`Lane::take_abandoned`].
    fn abandon(&mut self) {
        self.open = false;
        self.current = None;
        self.poisoned = false;
        self.next_savepoint = 0;
        self.deferred.clear();
        match self.conn.take() {
            // The writer is the only one: it stays, without the
            // transaction.
            Some(LaneConn::Sqlite(c)) => super::sqlite::rollback_writer(&c),
            Some(LaneConn::Postgres(c)) => drop(c),
            None => {}
        }
    }
}

/// Delete the kept events' rows if every one is still ours, then COMMIT;
/// otherwise ROLLBACK. `Ok(false)`: rolled back, a lease was lost. One
/// prepared statement for the whole batch: `id = ANY` walks the primary
/// key whatever the planner's statistics say. Tokens are per claim, so
/// `lock_token = ANY` is as strict a fence as pairing them: a row another
/// runtime claimed since carries a token none of our claims issued.
fn finish<'c>(
    conn: &'c mut LaneConn,
    kept: &'c [Kept],
    emitted: &'c [(NewEvent, i32)],
) -> BoxFuture<'c, Result<bool>> {
    match conn {
        LaneConn::Postgres(c) => Box::pin(async move {
            let (ids, tokens): (Vec<uuid::Uuid>, Vec<uuid::Uuid>) =
                kept.iter().map(|k| (k.lease.id, k.lease.token)).unzip();
            let deleted = if !emitted.is_empty() {
                super::postgres::lane_finish_with_emits(c, emitted, ids, tokens).await?
            } else if kept.is_empty() {
                0
            } else {
                sqlx::Executor::execute(
                    &mut *c,
                    sqlx::query(
                        "DELETE FROM outbox_events
                         WHERE id = ANY($1) AND lock_token = ANY($2) AND retry < max_retry",
                    )
                    .bind(ids)
                    .bind(tokens),
                )
                .await?
                .rows_affected()
            };
            let ok = deleted == kept.len() as u64;
            sqlx::Executor::execute(&mut *c, if ok { "COMMIT" } else { "ROLLBACK" }).await?;
            Ok(ok)
        }),
        LaneConn::Sqlite(c) => {
            debug_assert!(emitted.is_empty(), "SQLite lanes insert emits at once");
            Box::pin(std::future::ready(super::sqlite::finish_kept(c, kept)))
        }
    }
}

/// Run `sql` (one or more statements, no parameters). Boxed with concrete
/// lifetimes: sqlx's executor futures are otherwise not provably `Send`
/// inside the dispatcher's `async_trait` and spawned tasks.
fn simple(conn: &mut LaneConn, sql: String) -> BoxFuture<'_, Result<()>> {
    match conn {
        LaneConn::Postgres(c) => Box::pin(async move {
            sqlx::Executor::fetch_all(&mut *c, sqlx::raw_sql(&sql)).await?;
            Ok(())
        }),
        LaneConn::Sqlite(c) => Box::pin(std::future::ready(
            c.execute_batch(&sql).map_err(StoreError::from),
        )),
    }
}

impl Drop for Lane {
    /// The SQLite writer outlives the lane: leave no transaction on it.
    fn drop(&mut self) {
        if let Some(LaneConn::Sqlite(c)) = &self.conn {
            super::sqlite::rollback_writer(c);
        }
    }
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("open", &self.open)
            .field("current", &self.current)
            .field("kept", &self.kept.len())
            .finish()
    }
}

/// The handler's view of its event's lane: the `sql` capability's
/// statements run here.
pub struct LaneTx {
    pub lane: tokio::sync::OwnedMutexGuard<Lane>,
    /// Which of the dispatcher's lanes this is.
    pub index: usize,
    /// The dispatcher's count of lanes in use.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Told when this is dropped with its event still in the lane (the
    /// attempt was cancelled by a timeout or shutdown), so the dispatcher
    /// undoes the event's work and frees its row without waiting for the
    /// next event to come along.
    pub on_abandon: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl Drop for LaneTx {
    fn drop(&mut self) {
        if self.lane.in_event()
            && let Some(n) = &self.on_abandon
        {
            n.notify_one();
        }
    }
}

impl LaneTx {
    pub async fn query(&mut self, statement: &str, params: &[SqlValue]) -> Result<SqlRows> {
        self.lane.query(statement, params).await
    }
    pub async fn execute(&mut self, statement: &str, params: &[SqlValue]) -> Result<u64> {
        self.lane.execute(statement, params).await
    }
}

impl From<LaneTx> for AckTx {
    fn from(t: LaneTx) -> Self {
        AckTx::Lane(t)
    }
}

/// Session settings of a PostgreSQL lane. Asynchronous commit: a commit
/// returns once its WAL record is written, not flushed. A server crash can
/// forget the last few hundred milliseconds of lane commits, but each
/// forgets the event's delete together with its effects (one transaction,
/// replayed whole or not at all, in commit order), so the event is still
/// in the table and runs again: a crash means a rerun, never a lost or half
/// effect. A later synchronous commit (the application's own) flushes the
/// WAL up to itself, lane commits before it included, so nothing the
/// application committed durably can depend on a forgotten effect.
pub fn lane_settings() -> [(&'static str, &'static str); 1] {
    [("synchronous_commit", "off")]
}
