//! SQLite's effects transaction, shared by the events that run at once.
//!
//! Why: SQLite has one writer. A [lane](super::lane) serves one event at a
//! time, from its first statement to its verdict, so every other event
//! that reached a statement parked behind it and was woken by a task
//! hand-off when its turn came. A handler that wrote one row ran at a third
//! of the no-op drain's rate, with a core idle most of the time.
//!
//! Here the events of handlers that bet on success (no savepoint; see
//! `dispatch::committer`) are *members* of one open transaction at the same
//! time. A statement takes the writer connection for that statement only
//! (a plain mutex held for microseconds, no task hand-off), so guest code
//! runs on every core while another member's statement runs:
//!
//! ```text
//! BEGIN IMMEDIATE                        -- the first member opens it
//!   e1: INSERT ...     e2: INSERT ...    -- members' statements interleave
//!   e1 kept            e3: UPDATE ...
//!   e2 kept            e3 kept
//!   -- closed: no new members; the last member to reach its verdict commits
//!   DELETE e1, e2, e3 fenced by their tokens
//! COMMIT                                 -- all three with all their effects
//! ```
//!
//! Members' statements interleave, so a member cannot be undone alone: one
//! that fails after writing rolls back the whole transaction. The other
//! members run again without spending a retry, and the failing handler's
//! events get savepoints from then on (they go to a lane, one at a time).
//! A member still running at that moment learns it at its next statement
//! (an `unavailable` error) or at its verdict, and runs again too. Nothing
//! that was in a rolled-back transaction is committed by halves.
//!
//! Each member still sees a serial world. A member that runs *alone* (the
//! dispatcher asks for that until its handler has shown that its events
//! run at most one statement) takes a savepoint at its first statement,
//! and no other member's statement or insert runs until its verdict: it
//! fails alone, like an event in a lane. Any other member whose statement
//! would follow another member's, between two of its own, is stopped
//! ([`StoreError::Interleaved`]) and the transaction rolled back.
//!
//! When it commits: the transaction closes after enough kept events, when a
//! group's event is kept (its successor becomes claimable at the commit),
//! or a linger after its first kept event (the dispatcher's lingerer).
//! Closing stops new members; the commit waits for the members still
//! running to reach their verdicts. So, as in a lane, a member holds the
//! writer for everyone from its first statement to its verdict: handlers
//! should call slow services before their SQL.
//!
//! The transaction holds the store's writer (its async mutex) from BEGIN to
//! COMMIT, so claims, acks and savepoint lanes wait for the commit, as they
//! wait for a lane's.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::lane::{Committed, Kept, Lingers};
use super::sqlite::{Writer, WriterGuard};
use super::{Result, SqlRows, SqlValue, StoreError};
use crate::event::NewEvent;

/// Most events kept in one transaction. SQLite has no subtransaction cache
/// to protect (the lanes' limit is PostgreSQL's); the linger ends most
/// transactions first.
pub const MAX_KEPT: usize = 512;

/// Tries for the lock before sleeping on it: a few tens of microseconds,
/// about one statement. Measured (SQLite, 20,000 events, concurrency 16):
/// emit 23.5k → 40k events/s, sql 47k → 52k, against sleeping at once.
const SPINS: usize = 2000;

/// The shared transaction of one SQLite store; see the module docs.
pub struct Shared {
    writer: Writer,
    state: Mutex<State>,
    /// Woken when a transaction opens or closes: would-be members wait here.
    changed: Notify,
    /// Wakes the lingerer: a first event was kept, or a member vanished and
    /// left work behind (events to reschedule, a transaction to close).
    kick: Notify,
}

#[derive(Default)]
struct State {
    /// The writer, while a transaction is open on it.
    conn: Option<WriterGuard>,
    /// Which transaction is (or was last) open. Members carry theirs, so a
    /// statement or verdict of a member of a transaction that is gone fails
    /// instead of landing in the next one.
    epoch: u64,
    phase: Phase,
    /// Members that have not reached their verdict.
    active: usize,
    kept: Vec<Kept>,
    /// Statements run in the transaction so far: a member whose next
    /// statement finds this moved on since its last one was interleaved.
    statements: u64,
    /// A member runs its statements alone (the one whose
    /// [`SharedTx::holds`] is set): the others' statements wait for its
    /// verdict.
    alone: bool,
    /// Kept events of a transaction that was rolled back where nobody could
    /// reschedule them (a member's attempt was dropped mid-way): the
    /// lingerer does.
    orphans: Vec<Kept>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// No transaction.
    #[default]
    Idle,
    /// A would-be member is waiting for the writer to open one.
    Opening,
    Open,
    /// No new members; the last one to reach its verdict commits.
    Closing,
}

/// After [`Shared::keep`].
#[derive(Debug)]
pub enum KeepOutcome {
    /// Waiting for the commit; `first`: the first kept event of the
    /// transaction (start the linger).
    Waiting { first: bool },
    /// This verdict was the last the closed transaction waited for.
    Committed(Committed),
    /// The transaction had been rolled back (another member failed): the
    /// event runs again.
    Lost(Kept),
}

/// After [`Shared::undo`].
#[derive(Debug, Default)]
pub struct Undone {
    /// The whole transaction was rolled back: these kept events run again.
    pub lost: Vec<Kept>,
    /// It was rolled back because this member had written (not merely
    /// lost along with another's failure).
    pub rolled_back: bool,
    /// Leaving was the last thing the closed transaction waited for.
    pub committed: Option<Committed>,
}

impl Shared {
    pub fn new(writer: Writer) -> Self {
        Self {
            writer,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            kick: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Held for one statement at most (tens of microseconds), by the
        // one other worker thread: spinning that long is cheaper than
        // sleeping in the kernel and being woken.
        for _ in 0..SPINS {
            match self.state.try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => std::hint::spin_loop(),
            }
        }
        // A panic while holding it left no half-done state worth refusing:
        // the connection's transaction is checked at the commit.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A would-be member for an event of `handler`: it joins the open
    /// transaction at its first statement (in the same hold of the lock),
    /// or at [`SharedTx::join`].
    /// `alone`: the event runs its statements without another member's in
    /// between (its handler was seen to need that).
    pub fn enter(self: &Arc<Self>, handler: Arc<str>, alone: bool) -> SharedTx {
        SharedTx {
            shared: self.clone(),
            epoch: None,
            holds: false,
            alone,
            last: None,
            interleaved: false,
            statements: 0,
            handler,
            wrote: false,
            poisoned: false,
            transient: false,
            settled: false,
        }
    }

    /// Open a transaction for the caller, who set the phase to `Opening`,
    /// and make it its first member; returns the transaction's epoch.
    async fn open(&self) -> Result<u64> {
        // Cancelled while waiting for the writer: let the next one try.
        struct Opening<'a>(Option<&'a Shared>);
        impl Drop for Opening<'_> {
            fn drop(&mut self) {
                if let Some(shared) = self.0 {
                    shared.lock().phase = Phase::Idle;
                    shared.changed.notify_waiters();
                }
            }
        }
        let mut opening = Opening(Some(self));
        let conn = self.writer.lock().await;
        let begun = conn.execute_batch("BEGIN IMMEDIATE");
        opening.0 = None;
        let mut s = self.lock();
        let r = match begun {
            Ok(()) => {
                s.conn = Some(conn);
                s.epoch += 1;
                s.phase = Phase::Open;
                s.active = 1;
                s.statements = 0;
                s.alone = false;
                Ok(s.epoch)
            }
            Err(e) => {
                s.phase = Phase::Idle;
                Err(e.into())
            }
        };
        drop(s);
        self.changed.notify_waiters();
        r
    }

    /// A member's event succeeded: keep it for the commit.
    pub fn keep(&self, mut tx: SharedTx, kept: Kept) -> KeepOutcome {
        tx.settled = true;
        let s = self.lock();
        if !tx.is_member(&s) {
            return KeepOutcome::Lost(kept);
        }
        self.keep_locked(s, &tx, kept)
    }

    fn keep_locked(&self, mut s: MutexGuard<'_, State>, tx: &SharedTx, kept: Kept) -> KeepOutcome {
        if tx.holds {
            let conn = s.conn.as_ref().expect("a member's transaction is open");
            if let Err(e) = conn.execute_batch("RELEASE SAVEPOINT alone") {
                // Its work stays in the transaction either way.
                tracing::warn!(error = %e, "releasing an event's savepoint failed");
            }
        }
        s.active -= 1;
        if kept.grouped || s.kept.len() + 1 >= MAX_KEPT {
            s.phase = Phase::Closing;
        }
        s.kept.push(kept);
        if s.phase == Phase::Closing && s.active == 0 {
            return KeepOutcome::Committed(self.commit(s));
        }
        let first = s.kept.len() == 1;
        if tx.holds {
            s.alone = false;
            drop(s);
            self.changed.notify_waiters();
        }
        KeepOutcome::Waiting { first }
    }

    /// A member's event failed: if it wrote, roll back the whole
    /// transaction (see the module docs); otherwise it just leaves.
    pub fn undo(&self, mut tx: SharedTx) -> Undone {
        tx.settled = true;
        let mut s = self.lock();
        if !tx.is_member(&s) {
            return Undone::default();
        }
        if tx.wrote && !self.undo_alone(&mut s, tx.holds) {
            return Undone {
                lost: self.roll_back(s),
                rolled_back: true,
                committed: None,
            };
        }
        let committed = leave(&mut s).then(|| self.commit(s));
        self.changed.notify_waiters();
        Undone {
            committed,
            ..Undone::default()
        }
    }

    /// Undo the work of a member that runs alone (`holds`) back to its
    /// savepoint. False: it does not run alone, or the rollback failed (the
    /// whole transaction must go).
    fn undo_alone(&self, s: &mut State, holds: bool) -> bool {
        if !holds {
            return false;
        }
        s.alone = false;
        let conn = s.conn.as_ref().expect("a member's transaction is open");
        match conn.execute_batch("ROLLBACK TO SAVEPOINT alone; RELEASE SAVEPOINT alone") {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "rolling back to an event's savepoint failed; rolling back its whole transaction");
                false
            }
        }
    }

    /// Close the transaction (the linger is over, or shutdown): commit now
    /// if nobody is running in it, else when the last member finishes.
    pub fn close(&self) -> Option<Committed> {
        let mut s = self.lock();
        if !matches!(s.phase, Phase::Open | Phase::Closing) {
            return None;
        }
        s.phase = Phase::Closing;
        (s.active == 0).then(|| self.commit(s))
    }

    /// Start the linger (a first event was kept).
    pub fn start_linger(&self) {
        self.kick.notify_one();
    }

    /// Delete the kept events' rows, fenced by their tokens, and commit.
    /// New members wait for the next transaction, which opens once the
    /// writer is free again.
    fn commit(&self, mut s: MutexGuard<'_, State>) -> Committed {
        let conn = s.conn.take();
        let kept = std::mem::take(&mut s.kept);
        s.phase = Phase::Idle;
        s.active = 0;
        drop(s);
        let r = match &conn {
            Some(c) => match super::sqlite::finish_kept(c, &kept) {
                Ok(true) => Ok(()),
                Ok(false) => Err(StoreError::LeaseLost),
                Err(e) => {
                    super::sqlite::rollback_writer(c);
                    Err(e)
                }
            },
            None => Ok(()),
        };
        drop(conn);
        self.changed.notify_waiters();
        (kept, r)
    }

    /// Roll back the open transaction; returns its kept events, which must
    /// run again. Members still running find out at their next statement
    /// or verdict.
    fn roll_back(&self, mut s: MutexGuard<'_, State>) -> Vec<Kept> {
        let conn = s.conn.take();
        let kept = std::mem::take(&mut s.kept);
        s.phase = Phase::Idle;
        s.active = 0;
        drop(s);
        if let Some(c) = &conn {
            super::sqlite::rollback_writer(c);
        }
        drop(conn);
        self.changed.notify_waiters();
        kept
    }

    /// A member's attempt was dropped before its verdict (a timeout, or
    /// shutdown): undo it as [`Shared::undo`] would, leaving whatever needs
    /// an await to the lingerer.
    fn abandon(&self, epoch: Option<u64>, wrote: bool, holds: bool) {
        let mut s = self.lock();
        if Some(s.epoch) != epoch || s.conn.is_none() {
            return;
        }
        if wrote && self.undo_alone(&mut s, holds) {
            if leave(&mut s) {
                s.phase = Phase::Closing;
            }
            drop(s);
            self.changed.notify_waiters();
        } else if wrote {
            let lost = self.roll_back(s);
            self.lock().orphans.extend(lost);
        } else if leave(&mut s) {
            s.phase = Phase::Closing;
        } else {
            return;
        }
        self.kick.notify_one();
    }
}

/// The lock, held by a member (`epoch` set): joins the open transaction
/// if `epoch` is not set yet, opening one or waiting for the closed one to
/// commit. A member of a transaction that is gone gets the lock too; the
/// caller compares epochs.
async fn member<'a>(shared: &'a Shared, epoch: &mut Option<u64>) -> Result<MutexGuard<'a, State>> {
    loop {
        // The guard lives in this block only: none is held across an await.
        let wait = {
            let mut s = shared.lock();
            if epoch.is_some() {
                return Ok(s);
            }
            match s.phase {
                Phase::Open => {
                    s.active += 1;
                    *epoch = Some(s.epoch);
                    return Ok(s);
                }
                Phase::Idle => {
                    s.phase = Phase::Opening;
                    None
                }
                // Created under the lock: `notify_waiters` reaches a
                // `Notified` from its creation on.
                Phase::Opening | Phase::Closing => Some(shared.changed.notified()),
            }
        };
        match wait {
            Some(notified) => notified.await,
            None => *epoch = Some(shared.open().await?),
        }
    }
}

/// [`member`], waiting while another member runs its statements alone.
async fn member_turn<'a>(
    shared: &'a Shared,
    epoch: &mut Option<u64>,
    holds: bool,
) -> Result<MutexGuard<'a, State>> {
    loop {
        let notified = {
            let s = member(shared, epoch).await?;
            if s.alone && !holds && *epoch == Some(s.epoch) {
                shared.changed.notified()
            } else {
                return Ok(s);
            }
        };
        notified.await;
    }
}

/// One member fewer; true when that ends the transaction's wait: it is
/// closed (or holds nothing) and nobody is still running in it.
fn leave(s: &mut State) -> bool {
    s.active -= 1;
    s.active == 0 && (s.phase == Phase::Closing || s.kept.is_empty())
}

/// An event's membership of the shared transaction: its statements and
/// follow-up events run there. Dropped without [`Shared::keep`] or
/// [`Shared::undo`] (its attempt was cancelled), it is undone.
pub struct SharedTx {
    shared: Arc<Shared>,
    /// The transaction it is a member of, once it joined.
    epoch: Option<u64>,
    /// Runs its statements alone (see [`Shared::enter`]).
    alone: bool,
    /// It is the member running alone now (from its first statement to
    /// its verdict), with the savepoint.
    holds: bool,
    /// [`State::statements`] after its last statement.
    last: Option<u64>,
    /// Another member's statement ran between two of its own.
    interleaved: bool,
    /// Statements it ran.
    statements: u32,
    handler: Arc<str>,
    /// A statement or insert of this event ran (so leaving means rolling
    /// back everyone).
    wrote: bool,
    /// A statement of this event failed: its earlier statements cannot be
    /// taken back alone, so it must run again whatever its handler decides.
    poisoned: bool,
    transient: bool,
    settled: bool,
}

impl SharedTx {
    fn is_member(&self, s: &State) -> bool {
        self.epoch == Some(s.epoch) && s.conn.is_some()
    }

    /// The handler whose event this is.
    pub fn handler(&self) -> &Arc<str> {
        &self.handler
    }

    /// See [`super::lane::Lane::must_rerun`].
    pub fn must_rerun(&self) -> bool {
        self.poisoned
    }

    /// The event hit a transient database error (or lost its transaction
    /// to another member's failure): its failure is not its fault.
    pub fn saw_transient(&self) -> bool {
        self.transient
    }

    /// Become a member now if it is not one yet (waiting for a transaction
    /// to open, or for the closed one to commit).
    pub async fn join(&mut self) -> Result<()> {
        if self.epoch.is_some() {
            return Ok(());
        }
        let shared = self.shared.clone();
        drop(member(&shared, &mut self.epoch).await?);
        Ok(())
    }

    /// Run `f` on the writer inside the transaction, joining it first if
    /// need be. `statement`: a handler's statement (which may read what
    /// other members wrote), not an insert of follow-up events.
    async fn with_conn<T>(
        &mut self,
        statement: bool,
        f: impl FnOnce(&super::sqlite::WriterConn) -> Result<T>,
    ) -> Result<T> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let mut s = match member_turn(&self.shared, &mut self.epoch, self.holds).await {
            Ok(s) => s,
            // Nothing written: the error (a busy database) is the
            // statement's, and the event is not poisoned.
            Err(e) => {
                self.transient |= e.is_transient();
                return Err(e);
            }
        };
        let mine = self.is_member(&s);
        if mine && statement {
            if self.alone {
                if !self.holds {
                    // Nobody else writes until its verdict, so a savepoint
                    // lets a failure undo its own work only.
                    let conn = s.conn.as_ref().expect("a member's transaction is open");
                    if let Err(e) = conn.execute_batch("SAVEPOINT alone") {
                        drop(s);
                        let e = StoreError::from(e);
                        self.transient |= e.is_transient();
                        return Err(e);
                    }
                    s.alone = true;
                    self.holds = true;
                }
            } else if self.last.is_some_and(|n| n != s.statements) {
                // What it read or wrote before may have changed under it,
                // and what it wrote was seen half-done: only a rollback of
                // everyone and a rerun alone make that right.
                drop(s);
                self.interleaved = true;
                self.poisoned = true;
                return Err(StoreError::Interleaved);
            }
        }
        let (r, gone) = match s.conn.as_ref().filter(|_| mine) {
            Some(conn) => {
                let r = f(conn);
                let gone = r.is_err() && conn.is_autocommit();
                (r, gone)
            }
            None => (Err(StoreError::RolledBack), false),
        };
        if mine && statement {
            s.statements += 1;
            self.last = Some(s.statements);
            self.statements += 1;
        }
        if gone {
            // The error took the whole transaction with it (SQLite does
            // that for some errors): nobody may write outside one, so it
            // ends here for every member.
            let lost = self.shared.roll_back(s);
            self.shared.lock().orphans.extend(lost);
            self.shared.kick.notify_one();
        } else {
            drop(s);
        }
        self.wrote |= mine;
        r.inspect_err(|e| {
            self.transient |= e.is_transient();
            // Alone, it has a savepoint: a failed statement undoes nothing
            // else, and its handler may carry on.
            self.poisoned |= gone || !self.alone || !mine;
        })
    }

    /// Another event's statement ran between two of this event's: its
    /// handler's events should run their statements alone.
    pub fn was_interleaved(&self) -> bool {
        self.interleaved
    }

    /// It runs its statements alone (see [`Shared::enter`]).
    pub fn runs_alone(&self) -> bool {
        self.alone
    }

    /// Statements it ran (inserts of follow-up events not counted).
    pub fn statements(&self) -> u32 {
        self.statements
    }

    pub async fn query(&mut self, statement: &str, params: &[SqlValue]) -> Result<SqlRows> {
        self.with_conn(true, |c| super::sqlite::query(c, statement, params))
            .await
    }

    pub async fn execute(&mut self, statement: &str, params: &[SqlValue]) -> Result<u64> {
        self.with_conn(true, |c| super::sqlite::execute(c, statement, params))
            .await
    }

    /// Insert the event's follow-up events now (SQLite: a call, not a
    /// round trip).
    pub async fn enqueue_all(&mut self, events: &[NewEvent], default_max_retry: i32) -> Result<()> {
        self.with_conn(false, |c| {
            for ev in events {
                super::sqlite::enqueue_in(c, ev, default_max_retry)?;
            }
            Ok(())
        })
        .await
    }
}

impl SharedTx {
    /// Insert the event's follow-up events and keep it, in one hold of
    /// the lock: a handler that only emits does all its writing at its
    /// verdict, and taking the lock twice in a row made the other worker
    /// thread wait out its inserts twice. On `Err` the event is still in
    /// the transaction, to be undone.
    pub async fn enqueue_and_keep(
        mut self,
        events: &[NewEvent],
        default_max_retry: i32,
        kept: Kept,
    ) -> std::result::Result<KeepOutcome, (StoreError, SharedTx)> {
        // Checked at their `emit` already; again here, outside the lock,
        // since the insert below does not.
        if let Err(e) = events.iter().try_for_each(NewEvent::validate) {
            return Err((e.into(), self));
        }
        let shared = self.shared.clone();
        // After another's savepoint its inserts would go if that one fails.
        let s = match member_turn(&shared, &mut self.epoch, self.holds).await {
            Ok(s) => s,
            Err(e) => {
                self.transient |= e.is_transient();
                return Err((e, self));
            }
        };
        if !self.is_member(&s) {
            self.settled = true;
            return Ok(KeepOutcome::Lost(kept));
        }
        self.wrote = true;
        let conn = s.conn.as_ref().expect("a member's transaction is open");
        let inserted = events
            .iter()
            .try_for_each(|ev| super::sqlite::insert_follow_up(conn, ev, default_max_retry));
        if let Err(e) = inserted {
            self.poisoned = true;
            self.transient |= e.is_transient();
            if conn.is_autocommit() {
                let lost = shared.roll_back(s);
                shared.lock().orphans.extend(lost);
                shared.kick.notify_one();
            }
            return Err((e, self));
        }
        self.settled = true;
        Ok(shared.keep_locked(s, &self, kept))
    }
}

#[async_trait::async_trait]
impl Lingers for Shared {
    async fn kicked(&self) {
        self.kick.notified().await
    }

    fn take_orphans(&self) -> Vec<Kept> {
        std::mem::take(&mut self.lock().orphans)
    }

    async fn close_now(&self) -> Option<Committed> {
        self.close()
    }
}

impl Drop for SharedTx {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.abandon(self.epoch, self.wrote, self.holds);
        }
    }
}

impl std::fmt::Debug for SharedTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTx")
            .field("epoch", &self.epoch)
            .field("handler", &self.handler)
            .field("wrote", &self.wrote)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::event::Lease;
    use crate::store::Store;

    /// A migrated SQLite store with `n` claimed events and a table `t`.
    async fn setup(n: usize) -> (tempfile::TempDir, Store, Arc<Shared>, Vec<Lease>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let store = Store::connect(&url, &Default::default()).await.unwrap();
        store.migrate().await.unwrap();
        let Store::Sqlite(s) = &store else {
            unreachable!()
        };
        sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY)")
            .execute(s.pool())
            .await
            .unwrap();
        let events: Vec<NewEvent> = (0..n).map(|_| NewEvent::new("e", "{}")).collect();
        store.enqueue_batch(&events, 5).await.unwrap();
        let leases = store
            .claim("w", n, Duration::from_secs(60), &[])
            .await
            .unwrap()
            .iter()
            .map(|c| c.lease())
            .collect();
        let shared = Arc::new(store.shared_effects().unwrap());
        (dir, store, shared, leases)
    }

    fn kept(lease: Lease) -> Kept {
        Kept {
            lease,
            grouped: false,
            emitted: false,
            done: None,
        }
    }

    /// Committed rows of `t`, and events left, as another connection sees them.
    async fn committed(store: &Store) -> (Vec<i64>, i64) {
        let Store::Sqlite(s) = store else {
            unreachable!()
        };
        let rows = sqlx::query_scalar("SELECT k FROM t ORDER BY k")
            .fetch_all(s.pool())
            .await
            .unwrap();
        let events = sqlx::query_scalar("SELECT count(*) FROM outbox_events")
            .fetch_one(s.pool())
            .await
            .unwrap();
        (rows, events)
    }

    fn insert(k: i64) -> (String, Vec<SqlValue>) {
        (
            "INSERT INTO t (k) VALUES (?1)".into(),
            vec![SqlValue::Int(k)],
        )
    }

    async fn write(tx: &mut SharedTx, k: i64) -> Result<u64> {
        let (sql, params) = insert(k);
        tx.execute(&sql, &params).await
    }

    #[tokio::test]
    async fn members_interleave_and_commit_together_once_the_last_one_is_done() {
        let (_dir, store, shared, leases) = setup(3).await;
        let mut a = shared.enter("h".into(), false);
        let mut b = shared.enter("h".into(), false);
        write(&mut a, 1).await.unwrap();
        write(&mut b, 2).await.unwrap();
        write(&mut b, 3).await.unwrap();
        assert!(matches!(
            shared.keep(a, kept(leases[0])),
            KeepOutcome::Waiting { first: true }
        ));
        // Closed while b still runs: the commit waits for b's verdict.
        assert!(shared.close().is_none());
        assert_eq!(committed(&store).await, (vec![], 3));

        // A would-be member waits for the next transaction.
        let mut c = shared.enter("h".into(), false);
        let waiter = tokio::spawn(async move { write(&mut c, 4).await.map(|_| c) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "joined a closed transaction");

        let KeepOutcome::Committed((done, result)) = shared.keep(b, kept(leases[1])) else {
            panic!("the last member's verdict commits a closed transaction");
        };
        result.unwrap();
        assert_eq!(done.len(), 2);
        let c = waiter.await.unwrap().unwrap();
        assert_eq!(committed(&store).await, (vec![1, 2, 3], 1));

        assert!(matches!(
            shared.keep(c, kept(leases[2])),
            KeepOutcome::Waiting { first: true }
        ));
        let (done, result) = shared.close().expect("nobody is running in it");
        result.unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(committed(&store).await, (vec![1, 2, 3, 4], 0));
    }

    #[tokio::test]
    async fn a_member_that_wrote_and_failed_takes_everyone_back() {
        let (_dir, store, shared, leases) = setup(3).await;
        let (mut a, mut b, mut c) = (
            shared.enter("h".into(), false),
            shared.enter("bad".into(), false),
            shared.enter("h".into(), false),
        );
        write(&mut a, 1).await.unwrap();
        write(&mut c, 3).await.unwrap();
        assert!(matches!(
            shared.keep(a, kept(leases[0])),
            KeepOutcome::Waiting { .. }
        ));
        write(&mut b, 2).await.unwrap();
        // b's statement fails: b is poisoned, the others are not touched yet.
        let e = write(&mut b, 2).await.unwrap_err();
        assert!(matches!(e, StoreError::Sqlite(_)), "{e}");
        assert!(b.must_rerun());
        let undone = shared.undo(b);
        assert!(undone.rolled_back);
        assert_eq!(undone.lost.len(), 1, "a's kept event runs again");
        assert_eq!(undone.lost[0].lease.id, leases[0].id);

        // c was running: its next statement says so, and it must run again.
        let e = write(&mut c, 4).await.unwrap_err();
        assert!(matches!(e, StoreError::RolledBack));
        assert!(e.is_transient());
        assert!(c.must_rerun() && c.saw_transient());
        assert!(matches!(
            shared.keep(c, kept(leases[2])),
            KeepOutcome::Lost(_)
        ));
        assert_eq!(committed(&store).await, (vec![], 3));

        // The next transaction starts clean.
        let mut d = shared.enter("h".into(), false);
        write(&mut d, 1).await.unwrap();
        assert!(matches!(
            shared.keep(d, kept(leases[0])),
            KeepOutcome::Waiting { .. }
        ));
        shared.close().unwrap().1.unwrap();
        assert_eq!(committed(&store).await, (vec![1], 2));
    }

    #[tokio::test]
    async fn a_member_that_wrote_nothing_leaves_alone() {
        let (_dir, store, shared, leases) = setup(2).await;
        let mut a = shared.enter("h".into(), false);
        let mut b = shared.enter("h".into(), false);
        write(&mut a, 1).await.unwrap();
        b.join().await.unwrap();
        let undone = shared.undo(b);
        assert!(!undone.rolled_back && undone.lost.is_empty());
        assert!(undone.committed.is_none(), "a still runs");
        assert!(matches!(
            shared.keep(a, kept(leases[0])),
            KeepOutcome::Waiting { first: true }
        ));
        shared.close().unwrap().1.unwrap();
        assert_eq!(committed(&store).await, (vec![1], 1));
        let _ = leases;
    }

    #[tokio::test]
    async fn a_member_dropped_mid_way_leaves_its_fellows_to_the_lingerer() {
        let (_dir, store, shared, leases) = setup(2).await;
        let mut a = shared.enter("h".into(), false);
        let mut b = shared.enter("h".into(), false);
        write(&mut a, 1).await.unwrap();
        shared.keep(a, kept(leases[0]));
        write(&mut b, 2).await.unwrap();
        // b's attempt is cancelled (a timeout): its write cannot be undone
        // alone, so the transaction goes, and a is handed to the lingerer.
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), shared.kicked())
            .await
            .expect("the lingerer is woken");
        let orphans = shared.take_orphans();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].lease.id, leases[0].id);
        assert!(shared.close().is_none(), "nothing is open");
        assert_eq!(committed(&store).await, (vec![], 2));
    }

    #[tokio::test]
    async fn a_lost_lease_rolls_back_the_whole_commit() {
        let (_dir, store, shared, leases) = setup(2).await;
        // b's lease lapsed and another runtime claimed its row.
        let Store::Sqlite(s) = &store else {
            unreachable!()
        };
        sqlx::query("UPDATE outbox_events SET lock_token = ?1 WHERE rowid = ?2")
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(leases[1].seq)
            .execute(s.pool())
            .await
            .unwrap();
        let mut a = shared.enter("h".into(), false);
        let mut b = shared.enter("h".into(), false);
        write(&mut a, 1).await.unwrap();
        write(&mut b, 2).await.unwrap();
        shared.keep(a, kept(leases[0]));
        let KeepOutcome::Waiting { .. } = shared.keep(b, kept(leases[1])) else {
            panic!("not closed yet");
        };
        let (done, result) = shared.close().unwrap();
        assert!(matches!(result, Err(StoreError::LeaseLost)));
        assert_eq!(done.len(), 2);
        assert_eq!(committed(&store).await, (vec![], 2));
    }

    #[tokio::test]
    async fn a_group_event_closes_the_transaction() {
        let (_dir, store, shared, leases) = setup(2).await;
        let mut a = shared.enter("h".into(), false);
        let mut b = shared.enter("h".into(), false);
        write(&mut a, 1).await.unwrap();
        write(&mut b, 2).await.unwrap();
        let grouped = Kept {
            grouped: true,
            ..kept(leases[0])
        };
        assert!(matches!(
            shared.keep(a, grouped),
            KeepOutcome::Waiting { .. }
        ));
        let KeepOutcome::Committed((done, result)) = shared.keep(b, kept(leases[1])) else {
            panic!("a group's event closed it; b was the last member");
        };
        result.unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(committed(&store).await, (vec![1, 2], 0));
    }

    #[tokio::test]
    async fn interleaved_statements_are_caught_and_a_member_alone_is_not_interleaved() {
        let (_dir, store, shared, leases) = setup(3).await;
        let mut a = shared.enter("h".into(), false);
        let mut b = shared.enter("h".into(), false);
        write(&mut a, 1).await.unwrap();
        write(&mut a, 2).await.unwrap();
        write(&mut b, 3).await.unwrap();
        // a's second statement ran right after its first: fine. Its third
        // comes after b's: what a read or wrote may have changed under it.
        let e = write(&mut a, 4).await.unwrap_err();
        assert!(matches!(e, StoreError::Interleaved), "{e}");
        assert!(e.is_transient() && a.must_rerun() && a.was_interleaved());
        let undone = shared.undo(a);
        assert!(undone.rolled_back, "a wrote: everyone goes");
        assert!(matches!(
            shared.keep(b, kept(leases[1])),
            KeepOutcome::Lost(_)
        ));
        assert_eq!(committed(&store).await, (vec![], 3));

        // Alone, a's statements wait for nobody and nobody runs between them.
        let mut a = shared.enter("h".into(), true);
        let mut b = shared.enter("h".into(), false);
        write(&mut b, 3).await.unwrap();
        write(&mut a, 1).await.unwrap();
        let b_again = tokio::spawn(async move { write(&mut b, 5).await.map(|_| b) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!b_again.is_finished(), "b ran while a was alone");
        write(&mut a, 2).await.unwrap();
        assert!(matches!(
            shared.keep(a, kept(leases[0])),
            KeepOutcome::Waiting { first: true }
        ));
        // b resumes after a's verdict; a ran between b's statements.
        let e = b_again.await.unwrap().unwrap_err();
        assert!(matches!(e, StoreError::Interleaved), "{e}");
    }

    #[tokio::test]
    async fn follow_ups_are_inserted_and_kept_in_one_go() {
        let (_dir, store, shared, leases) = setup(3).await;
        let mut a = shared.enter("h".into(), false);
        write(&mut a, 1).await.unwrap();
        shared.keep(a, kept(leases[0]));

        // A follow-up that is not an event is refused before anything is
        // written: the others' work stands.
        let bad = shared.enter("h".into(), false);
        let (e, bad) = bad
            .enqueue_and_keep(&[NewEvent::new("", "{}")], 5, kept(leases[1]))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Invalid(_)), "{e}");
        assert!(!shared.undo(bad).rolled_back);

        let b = shared.enter("h".into(), false);
        let mut follow_up = NewEvent::new("f", r#"{"of":1}"#);
        follow_up.delay = Some(Duration::from_secs(3600));
        let outcome = b
            .enqueue_and_keep(&[follow_up], 5, kept(leases[2]))
            .await
            .unwrap();
        assert!(matches!(outcome, KeepOutcome::Waiting { first: false }));
        let (done, result) = shared.close().unwrap();
        result.unwrap();
        assert_eq!(done.len(), 2);
        // Events 0 and 2 are gone, 1 is left, and the follow-up is there.
        assert_eq!(committed(&store).await, (vec![1], 2));
    }

    #[tokio::test]
    async fn a_member_alone_that_fails_undoes_only_its_own_work() {
        let (_dir, store, shared, leases) = setup(3).await;
        let mut a = shared.enter("h".into(), false);
        let mut b = shared.enter("h".into(), false);
        let mut c = shared.enter("multi".into(), true);
        write(&mut a, 1).await.unwrap();
        shared.keep(a, kept(leases[0]));
        write(&mut b, 3).await.unwrap();
        write(&mut c, 2).await.unwrap();
        // A failed statement of c undoes only that statement: it carries on.
        write(&mut c, 2).await.unwrap_err();
        assert!(!c.must_rerun());
        write(&mut c, 4).await.unwrap();
        let undone = shared.undo(c);
        assert!(!undone.rolled_back && undone.lost.is_empty());
        assert!(matches!(
            shared.keep(b, kept(leases[1])),
            KeepOutcome::Waiting { first: false }
        ));
        shared.close().unwrap().1.unwrap();
        assert_eq!(committed(&store).await, (vec![1, 3], 1));
    }
}
