//! Group commit of effects: the lanes (see [`crate::store::lane`]) that
//! carry the effects of events that succeed, and when each lane commits.
//!
//! A handler's first SQL statement (or, for a handler that only emits, its
//! verdict) takes a free lane; the event gets a savepoint there, its
//! statements and emits run there, and on success it stays in the lane's
//! open transaction while the worker moves on (its row is deleted, fenced
//! by its token, with the others' just before the commit). A
//! lane commits when it holds [`MAX_KEPT`] events, when an event of a group
//! was kept (its successor waits for this commit to become claimable), or
//! [`LINGER`] after its first kept event, whichever comes first. A failed
//! event rolls back to its savepoint and leaves the others alone.
//!
//! On SQLite, events that bet on success (below) do not take the lane:
//! they join the one transaction the events running at once share (see
//! [`crate::store::shared`]), which commits on the same triggers; the lane
//! serves the events that need a savepoint.
//!
//! On PostgreSQL, the events of handlers trusted to interleave (below)
//! share pipelined transactions instead of taking a lane (see
//! [`crate::store::postgres::pipe`]): many events' statements are in
//! flight on one connection at once, where a lane waits for each reply.
//! A handler earns that trust in the lanes, with [`PROVEN`] events in a
//! row that ran at most one statement each without a savepoint.
//!
//! So an event's effects wait at most `LINGER` for their commit, plus the
//! rest of the attempt that holds the lane at that moment (a handler holds
//! its lane from its first statement to its verdict: handlers that call
//! slow services should call them before their SQL, which they usually
//! do anyway).
//!
//! Savepoints are a bet against failure. A savepoint costs a round trip
//! per event, most handlers never fail, and a failure without one can
//! still be undone: by rolling back the whole lane transaction and running
//! its other events again (without spending their retries). So with
//! `effect_savepoints = "auto"` a handler's events enter lanes bare until
//! one of them fails after entering; from then on (for the life of the
//! process) that handler's events get a savepoint each. A handler that
//! fails often costs one rolled-back batch, once.
//!
//! A commit that fails (the connection dropped, the server restarted)
//! loses no event: every event that was in the transaction is rescheduled
//! without spending a retry, or, if even that fails, runs again when its
//! lease lapses.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::SavepointMode;
use crate::handler::EffectsLanes;
use crate::store::lane::{Kept, Lane, LaneTx, Lingers};
use crate::store::postgres::pipe::{self, PipeTx, Pipes};
use crate::store::shared::{KeepOutcome, Shared};
use crate::store::{AckTx, Failure, Store, StoreError};

use super::DispatchObserver;
use super::backoff::Backoff;
use super::inflight::Inflight;

/// Most events in one lane transaction. PostgreSQL gives each event's
/// savepoint that writes a subtransaction id; past 64 per transaction the
/// server's subtransaction cache overflows and every other session's
/// visibility checks get slower.
pub const MAX_KEPT: usize = 60;

/// How long a lane waits for company after its first kept event.
pub const LINGER: Duration = Duration::from_millis(2);

/// Events in a row, each with at most one statement, before a handler's
/// events may interleave their statements with other events' (SQLite's
/// shared transaction, PostgreSQL's pipes). Until then they run them alone
/// (on PostgreSQL, in lanes): a handler that
/// reads and then writes never has its reads changed under it, and never
/// costs the others a rerun to find that out.
const PROVEN: u32 = 32;

/// Whether a handler's events may interleave (see `Committer::interleave`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// Events in a row that ran at most one statement.
    Proving(u32),
    Yes,
    /// One was caught interleaved: alone for the life of the process.
    Never,
}

impl Trust {
    /// After an event that ran alone succeeded having run at most one
    /// statement (`single`), or more.
    fn after(self, single: bool) -> Trust {
        match (self, single) {
            (Trust::Proving(_), false) => Trust::Proving(0),
            (Trust::Proving(n), true) if n + 1 >= PROVEN => Trust::Yes,
            (Trust::Proving(n), true) => Trust::Proving(n + 1),
            (settled, _) => settled,
        }
    }
}

/// Why events are rerun whose transaction another event's failure took.
const ROLLED_BACK_WITH_ANOTHER: &str =
    "rolled back with a batch in which another event failed without a savepoint";

/// SQLite's shared transaction, unless `OUTRUN_EFFECT_SHARED=off` asks for
/// lanes only (for comparing the two).
fn shared_effects(store: &Store) -> Option<Shared> {
    if std::env::var("OUTRUN_EFFECT_SHARED").is_ok_and(|v| v == "off") {
        return None;
    }
    store.shared_effects()
}

/// PostgreSQL's pipes, unless `OUTRUN_EFFECT_PIPES=off` asks for lanes only
/// (for comparing the two); `OUTRUN_EFFECT_PIPES=N` runs N pipes.
fn effect_pipes(store: &Store) -> Option<Pipes> {
    let count = match std::env::var("OUTRUN_EFFECT_PIPES") {
        Ok(v) if v == "off" => return None,
        Ok(v) => v.parse().unwrap_or(pipe::PIPES),
        Err(_) => pipe::PIPES,
    };
    store.effect_pipes(count)
}

/// Lanes when the config leaves it to the runtime: SQLite has one writer;
/// on PostgreSQL a few sessions keep the server's cores busy while each
/// lane waits for its round trips.
pub fn default_lanes(store: &Store, concurrency: usize) -> usize {
    match store {
        Store::Sqlite(_) => 1,
        Store::Postgres(_) => concurrency.clamp(1, 4),
    }
}

pub struct Committer {
    store: Store,
    lanes: Vec<Arc<Mutex<Lane>>>,
    /// SQLite: the one transaction that events betting on success share
    /// (see `store::shared`); events with savepoints use the lane.
    shared: Option<Arc<Shared>>,
    /// PostgreSQL: the pipelined transactions that trusted handlers' events
    /// share (see `store::postgres::pipe`); the others use the lanes.
    pipes: Option<Arc<Pipes>>,
    /// One permit per lane: waiting here is waiting for any free lane.
    free: Arc<Semaphore>,
    /// Wakes a lane's lingerer after its first kept event.
    kicks: Vec<Arc<Notify>>,
    inflight: Inflight,
    /// Tells the claimer that a commit may have made work claimable.
    unblocked: Arc<Notify>,
    observer: Option<Arc<dyn DispatchObserver>>,
    backoff: Backoff,
    savepoints: SavepointMode,
    /// Handlers that failed an event entered without a savepoint: their
    /// events get one from now on.
    failed_bare: std::sync::RwLock<HashSet<Arc<str>>>,
    /// Whether a handler's events may interleave their statements with
    /// other events' (SQLite: `store::shared`; PostgreSQL: the pipes). A
    /// handler starts alone (SQLite) or in lanes (PostgreSQL) and is
    /// trusted after [`PROVEN`] events in a row that ran at most one
    /// statement each; one caught interleaving makes it alone for good.
    interleave: std::sync::RwLock<std::collections::HashMap<Arc<str>, Trust>>,
    /// `[runtime] keep_done`: where committed events' records go.
    done: Option<tokio::sync::mpsc::UnboundedSender<super::done::Committed>>,
}

impl Committer {
    pub fn new(
        store: Store,
        lanes: usize,
        inflight: Inflight,
        unblocked: Arc<Notify>,
        observer: Option<Arc<dyn DispatchObserver>>,
        backoff: Backoff,
        savepoints: SavepointMode,
    ) -> Self {
        let n = lanes.max(1);
        Self {
            lanes: (0..n)
                .map(|_| Arc::new(Mutex::new(Lane::new(store.clone()))))
                .collect(),
            shared: shared_effects(&store).map(Arc::new),
            pipes: effect_pipes(&store).map(Arc::new),
            store,
            free: Arc::new(Semaphore::new(n)),
            kicks: (0..n).map(|_| Arc::new(Notify::new())).collect(),
            inflight,
            unblocked,
            observer,
            backoff,
            savepoints,
            failed_bare: Default::default(),
            interleave: Default::default(),
            done: None,
        }
    }

    /// `[runtime] keep_done`: send the records of committed events here.
    pub fn with_done(
        mut self,
        done: Option<tokio::sync::mpsc::UnboundedSender<super::done::Committed>>,
    ) -> Self {
        self.done = done;
        self
    }

    /// Whether an event of `handler` enters its lane with a savepoint.
    fn wants_savepoint(&self, handler: &Arc<str>) -> bool {
        match self.savepoints {
            SavepointMode::Always => true,
            SavepointMode::Auto => self
                .failed_bare
                .read()
                .expect("savepoint policy lock")
                .contains(handler),
        }
    }

    /// An event of `handler` without a savepoint was undone, which rolled
    /// back its lane's transaction: give the handler's events savepoints.
    fn failed_without_savepoint(&self, handler: Arc<str>) {
        let mut set = self.failed_bare.write().expect("savepoint policy lock");
        if set.insert(handler.clone()) {
            tracing::info!(handler = %handler, "an event of this handler failed after touching the database; its events get a savepoint each from now on, so a failure undoes only its own event");
            metrics::counter!("outrun_effects_bare_rollbacks_total").increment(1);
        }
    }

    /// An event of `handler` was interleaved with another's in SQLite's
    /// shared transaction: its events run their statements alone.
    fn runs_alone(&self, handler: Arc<str>) {
        let mut map = self.interleave.write().expect("policy lock");
        if map.insert(handler.clone(), Trust::Never) != Some(Trust::Never) {
            tracing::info!(handler = %handler, "an event of this handler ran a statement after another event's, between two of its own; its events run their statements alone from now on, so what they read cannot change under them");
            metrics::counter!("outrun_effects_interleaved_total").increment(1);
        }
    }

    /// A member of a shared transaction (SQLite's or a pipe's) was undone:
    /// caught interleaving, its handler runs alone; if its own failure
    /// rolled everyone back (not a database fault), its handler's events
    /// get savepoints.
    fn learn_from_undo(&self, handler: Arc<str>, interleaved: bool, its_fault: bool) {
        if interleaved {
            self.runs_alone(handler);
        } else if its_fault {
            self.failed_without_savepoint(handler);
        }
    }

    /// An event of a handler not yet trusted to interleave (see
    /// `interleave`) succeeded: count it toward the trust, or start over.
    fn note_statements(&self, tx: &crate::store::shared::SharedTx) {
        if tx.runs_alone() {
            self.note_trust(tx.handler(), tx.statements());
        }
    }

    /// An event of `handler` that ran alone (in SQLite's shared transaction,
    /// or in a PostgreSQL lane without a savepoint) succeeded after running
    /// `statements`: count it toward the handler's trust, or start over.
    fn note_trust(&self, handler: &Arc<str>, statements: u32) {
        let single = statements <= 1;
        if !single
            && matches!(
                self.interleave.read().expect("policy lock").get(handler),
                None | Some(Trust::Never | Trust::Proving(0))
            )
        {
            // Nothing to count or reset: skip the write lock (a handler
            // that reads and writes keeps landing here).
            return;
        }
        let mut map = self.interleave.write().expect("policy lock");
        let trust = map.entry(handler.clone()).or_insert(Trust::Proving(0));
        *trust = trust.after(single);
    }

    /// Commit each lane [`LINGER`] after its first kept event, and recover
    /// lanes whose holder was cancelled mid-event, until `stop`.
    pub async fn run_lingerers(self: Arc<Self>, stop: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.lanes.len() {
            let this = self.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = this.kicks[i].notified() => {}
                    }
                    tokio::time::sleep(LINGER).await;
                    let mut lane = this.lanes[i].clone().lock_owned().await;
                    this.recover(&mut lane).await;
                    if lane.is_open() {
                        this.commit(&mut lane).await;
                    }
                }
            });
        }
        let groups = self.shared.iter().map(|s| s.clone() as Arc<dyn Lingers>);
        let pipes = self.pipes.iter().flat_map(|p| p.pipes().iter());
        for group in groups.chain(pipes.map(|p| p.clone() as Arc<dyn Lingers>)) {
            let this = self.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = group.kicked() => {}
                    }
                    this.reschedule_orphans(&*group).await;
                    tokio::time::sleep(LINGER).await;
                    if let Some((kept, result)) = group.close_now().await {
                        this.settle(kept, result).await;
                    }
                    this.reschedule_orphans(&*group).await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Take a free lane, waiting for one if all are busy.
    async fn acquire(&self) -> LaneTx {
        let permit = self
            .free
            .clone()
            .acquire_owned()
            .await
            .expect("the lane semaphore is never closed");
        // A permit means some lane has no event in it; a lingerer may be
        // committing it for a moment.
        let mut found = None;
        for (i, lane) in self.lanes.iter().enumerate() {
            if let Ok(g) = lane.clone().try_lock_owned() {
                found = Some((i, g));
                break;
            }
        }
        let (index, mut lane) = match found {
            Some(f) => f,
            None => {
                let i = rand::random_range(..self.lanes.len());
                (i, self.lanes[i].clone().lock_owned().await)
            }
        };
        self.recover(&mut lane).await;
        LaneTx {
            lane,
            index,
            permit: Some(permit),
            on_abandon: Some(self.kicks[index].clone()),
        }
    }

    /// A holder that vanished mid-event (its task was aborted) left its
    /// savepoint behind: undo it before anyone else uses the lane.
    async fn recover(&self, lane: &mut OwnedMutexGuard<Lane>) {
        if lane.in_event() {
            if let Some(handler) = lane.undo().await {
                self.failed_without_savepoint(handler);
            }
            self.reschedule(lane.take_abandoned(), "the lane's transaction was lost")
                .await;
        }
    }

    /// Hand a lane back. A transaction that holds nothing is closed at
    /// once (on SQLite it holds the one writer connection); one that holds
    /// events commits after [`LINGER`].
    async fn release(&self, mut tx: LaneTx) {
        if tx.lane.is_open() {
            if tx.lane.kept() == 0 {
                self.commit(&mut tx.lane).await;
            } else {
                self.kicks[tx.index].notify_one();
            }
        }
    }

    /// The event in `tx` succeeded: keep its effects for the lane's next
    /// commit (now, if the lane is full or a group waits for it).
    pub async fn keep(&self, tx: AckTx, kept: Kept) {
        let mut tx = match tx {
            AckTx::Lane(tx) => tx,
            AckTx::Pipe(tx) => {
                // Without follow-ups there is nothing to refuse.
                let _ = self.keep_piped(tx, kept, Vec::new(), 0).await;
                return;
            }
            AckTx::Shared(mut tx) => {
                let shared = self.shared.as_ref().expect("shared members come from it");
                self.note_statements(&tx);
                // An event that kept nothing there yet (its statements
                // failed to start and its handler carried on) still needs
                // its delete committed.
                if let Err(e) = tx.join().await {
                    let why = format!("committing the handler's effects failed: {e}");
                    self.reschedule(vec![kept], &why).await;
                    return;
                }
                let outcome = shared.keep(tx, kept);
                self.kept_shared(outcome).await;
                return;
            }
            other => {
                drop(other);
                unreachable!("only the committer's transactions are kept")
            }
        };
        if self.pipes.is_some()
            && let Some((handler, statements)) = tx.lane.bare_statements()
        {
            let handler = handler.clone();
            self.note_trust(&handler, statements);
        }
        let grouped = kept.grouped;
        tx.lane.keep(kept);
        if grouped || tx.lane.kept() >= MAX_KEPT {
            self.commit(&mut tx.lane).await;
        }
        self.release(tx).await;
    }

    async fn kept_shared(&self, outcome: KeepOutcome) {
        match outcome {
            KeepOutcome::Waiting { first } => {
                if first && let Some(shared) = &self.shared {
                    shared.start_linger();
                }
            }
            KeepOutcome::Committed((kept, result)) => self.settle(kept, result).await,
            KeepOutcome::Lost(kept) => self.reschedule(vec![kept], ROLLED_BACK_WITH_ANOTHER).await,
        }
    }

    /// The event in `tx` succeeded: insert its follow-up events and keep
    /// it (see [`Committer::keep`]). On `Err` (inserting a follow-up
    /// failed) its effects are undone, and the caller decides its verdict.
    pub async fn keep_with_emits(
        &self,
        tx: AckTx,
        emitted: Vec<crate::event::NewEvent>,
        default_max_retry: i32,
        kept: Kept,
    ) -> Result<(), StoreError> {
        let mut tx = match tx {
            AckTx::Pipe(t) => return self.keep_piped(t, kept, emitted, default_max_retry).await,
            AckTx::Shared(t) if !emitted.is_empty() => {
                self.note_statements(&t);
                return match t.enqueue_and_keep(&emitted, default_max_retry, kept).await {
                    Ok(outcome) => {
                        self.kept_shared(outcome).await;
                        Ok(())
                    }
                    Err((e, t)) => {
                        self.undo(AckTx::Shared(t)).await;
                        Err(e)
                    }
                };
            }
            tx => tx,
        };
        if !emitted.is_empty() {
            let inserted = match &mut tx {
                AckTx::Lane(t) => t.lane.enqueue_all(emitted, default_max_retry).await,
                other => other
                    .enqueue_all(&emitted, default_max_retry)
                    .await
                    .map(drop),
            };
            if let Err(e) = inserted {
                self.undo(tx).await;
                return Err(e);
            }
        }
        self.keep(tx, kept).await;
        Ok(())
    }

    /// The event in `tx` failed: undo its effects, keep the others'.
    pub async fn undo(&self, tx: AckTx) {
        let mut tx = match tx {
            AckTx::Lane(tx) => tx,
            AckTx::Pipe(tx) => return self.undo_piped(tx).await,
            AckTx::Shared(tx) => {
                let shared = self.shared.as_ref().expect("shared members come from it");
                let (handler, interleaved, fault) = (
                    tx.handler().clone(),
                    tx.was_interleaved(),
                    tx.saw_transient(),
                );
                let undone = shared.undo(tx);
                self.learn_from_undo(handler, interleaved, undone.rolled_back && !fault);
                self.reschedule(undone.lost, ROLLED_BACK_WITH_ANOTHER).await;
                if let Some((kept, result)) = undone.committed {
                    self.settle(kept, result).await;
                }
                return;
            }
            other => {
                drop(other);
                unreachable!("only the committer's transactions are undone")
            }
        };
        // A dropped connection or a deadlock says nothing about the
        // handler: its events keep betting on success.
        let database_fault = tx.lane.saw_transient();
        let why = match tx.lane.undo().await {
            Some(handler) => {
                if !database_fault {
                    self.failed_without_savepoint(handler);
                }
                ROLLED_BACK_WITH_ANOTHER
            }
            None => "the lane's transaction was lost",
        };
        let lost = tx.lane.take_abandoned();
        self.release(tx).await;
        self.reschedule(lost, why).await;
    }

    /// A lane for an event of `handler`: for its first statement, or for
    /// its emits when it reached its verdict without one.
    pub async fn enter_lane(&self, handler: &Arc<str>) -> Result<AckTx, StoreError> {
        let savepoint = self.wants_savepoint(handler);
        if let Some(shared) = &self.shared
            && !savepoint
        {
            let trusted = matches!(
                self.interleave.read().expect("policy lock").get(handler),
                Some(Trust::Yes)
            );
            return Ok(AckTx::Shared(shared.enter(handler.clone(), !trusted)));
        }
        if let Some(pipes) = &self.pipes
            && !savepoint
            && matches!(
                self.interleave.read().expect("policy lock").get(handler),
                Some(Trust::Yes)
            )
        {
            return Ok(AckTx::Pipe(pipes.enter(handler.clone())));
        }
        let mut tx = self.acquire().await;
        let entered = if savepoint {
            tx.lane.enter().await
        } else {
            tx.lane.enter_bare(handler.clone()).await
        };
        match entered {
            Ok(()) => Ok(AckTx::Lane(tx)),
            Err(e) => {
                let lost = tx.lane.take_abandoned();
                self.release(tx).await;
                self.reschedule(lost, "the lane's transaction was lost")
                    .await;
                Err(e)
            }
        }
    }

    async fn commit(&self, lane: &mut Lane) {
        let (kept, result) = lane.commit().await;
        self.settle(kept, result).await;
    }

    /// Tell everyone what a commit of `kept` came to; events whose effects
    /// did not commit run again.
    async fn settle(&self, kept: Vec<Kept>, result: Result<(), StoreError>) {
        if kept.is_empty() {
            if let Err(e) = result {
                tracing::warn!(error = %e, "closing an empty effects transaction failed");
            }
            return;
        }
        match result {
            Ok(()) => {
                let ids: Vec<_> = kept.iter().map(|k| k.lease.id).collect();
                self.inflight.remove_all(&ids);
                crate::timeline::events_acked(ids.len() as u64);
                metrics::histogram!("outrun_effects_commit_events").record(ids.len() as f64);
                if let Some(o) = &self.observer {
                    o.on_acked(&ids);
                }
                if kept.iter().any(|k| k.grouped || k.emitted) {
                    self.unblocked.notify_one();
                }
                if let Some(done) = &self.done {
                    let records: super::done::Committed = kept
                        .into_iter()
                        .filter_map(|k| k.done.map(|r| (k.lease.id, *r)))
                        .collect();
                    if !records.is_empty() {
                        let _ = done.send(records);
                    }
                }
            }
            Err(StoreError::LeaseLost) => {
                tracing::warn!(
                    events = kept.len(),
                    "an event's lease was lost while its effects waited in a lane (a stall longer than the lease, or a cancel); the lane's transaction was rolled back and its other events run again"
                );
                self.reschedule(
                    kept,
                    "rolled back with a batch in which another event's lease was lost",
                )
                .await;
            }
            Err(e) => {
                tracing::error!(error = %e, sqlstate = e.sqlstate().as_deref().unwrap_or(""), events = kept.len(), "committing handlers' effects failed; the events run again");
                self.reschedule(
                    kept,
                    &format!("committing the handler's effects failed: {e}"),
                )
                .await;
            }
        }
    }

    /// Events whose effects were lost with their transaction: run them
    /// again soon, without spending a retry.
    async fn reschedule(&self, events: Vec<Kept>, why: &str) {
        if events.is_empty() {
            return;
        }
        let retry_at = Utc::now()
            + chrono::Duration::from_std(self.backoff.delay(1)).unwrap_or(chrono::Duration::MAX);
        for k in events {
            let failure = Failure::Interrupted {
                error: why.to_string(),
                retry_at,
            };
            if let Err(e) = self.store.fail(k.lease, &failure).await {
                tracing::warn!(event_id = %k.lease.id, error = %e, "rescheduling an event whose effects were lost failed; it runs again when its lease lapses");
            }
            self.inflight.remove(&k.lease.id);
        }
    }

    /// Events of shared transactions (SQLite's, or a pipe's) rolled back
    /// behind a member whose attempt was dropped: run them again.
    async fn reschedule_orphans(&self, group: &dyn Lingers) {
        self.reschedule(
            group.take_orphans(),
            "the transaction was rolled back when an event in it was cancelled",
        )
        .await;
    }

    /// A pipe member's event succeeded: keep it with its follow-ups (see
    /// [`Committer::keep`]); on `Err` it was undone.
    async fn keep_piped(
        &self,
        mut tx: PipeTx,
        kept: Kept,
        emitted: Vec<crate::event::NewEvent>,
        default_max_retry: i32,
    ) -> Result<(), StoreError> {
        // An event that ran no statement (it only emits) joins now.
        if let Err(e) = tx.join().await {
            let why = format!("committing the handler's effects failed: {e}");
            self.reschedule(vec![kept], &why).await;
            return Ok(());
        }
        if !emitted.is_empty() && tx.emits_refused() {
            self.failed_without_savepoint(tx.handler().clone());
            self.undo_piped(tx).await;
            return Err(StoreError::FollowUpsToLanes);
        }
        let follow_ups = match pipe::follow_ups(&emitted, default_max_retry) {
            Ok(f) => f,
            Err(e) => {
                self.undo_piped(tx).await;
                return Err(e);
            }
        };
        let pipe = tx.pipe().expect("joined").clone();
        match pipe.keep(tx, kept, follow_ups) {
            pipe::KeepOutcome::Waiting { first } => {
                if first {
                    pipe.start_linger();
                }
            }
            pipe::KeepOutcome::Committing(committing) => {
                let (kept, result) = committing.await;
                self.settle(kept, result).await;
            }
            pipe::KeepOutcome::Lost(kept) => {
                self.reschedule(vec![kept], ROLLED_BACK_WITH_ANOTHER).await
            }
        }
        Ok(())
    }

    /// A pipe member's event failed (see [`Committer::undo`]).
    async fn undo_piped(&self, tx: PipeTx) {
        let Some(pipe) = tx.pipe().cloned() else {
            // It never joined: nothing to undo.
            return;
        };
        let (handler, interleaved, fault) = (
            tx.handler().clone(),
            tx.was_interleaved(),
            tx.saw_transient(),
        );
        let undone = pipe.undo(tx);
        self.learn_from_undo(handler, interleaved, undone.rolled_back && !fault);
        self.reschedule(undone.lost, ROLLED_BACK_WITH_ANOTHER).await;
        if let Some(committing) = undone.committing {
            let (kept, result) = committing.await;
            self.settle(kept, result).await;
        }
    }

    /// Commit whatever the lanes hold (shutdown), undoing events still in
    /// them.
    pub async fn flush(&self) {
        let groups = self.shared.iter().map(|s| &**s as &dyn Lingers);
        let pipes = self.pipes.iter().flat_map(|p| p.pipes().iter());
        for group in groups.chain(pipes.map(|p| &**p as &dyn Lingers)) {
            if let Some((kept, result)) = group.close_now().await {
                self.settle(kept, result).await;
            }
            self.reschedule_orphans(group).await;
        }
        for lane in &self.lanes {
            let mut lane = lane.clone().lock_owned().await;
            self.recover(&mut lane).await;
            if lane.is_open() {
                self.commit(&mut lane).await;
            }
        }
    }
}

#[async_trait::async_trait]
impl EffectsLanes for Committer {
    async fn enter(&self, handler: &Arc<str>) -> Result<AckTx, StoreError> {
        self.enter_lane(handler).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_interleaves_after_enough_single_statement_events_in_a_row() {
        let mut t = Trust::Proving(0);
        for _ in 0..PROVEN - 1 {
            t = t.after(true);
        }
        assert_eq!(t, Trust::Proving(PROVEN - 1));
        // One event with two statements: start over.
        t = t.after(false);
        assert_eq!(t, Trust::Proving(0));
        for _ in 0..PROVEN {
            t = t.after(true);
        }
        assert_eq!(t, Trust::Yes);
        assert_eq!(t.after(false), Trust::Yes, "trusted stays trusted");
        assert_eq!(Trust::Never.after(true), Trust::Never, "caught stays alone");
    }
}
