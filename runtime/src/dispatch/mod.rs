//! The dispatch loop: claim events in batches, run them concurrently on
//! their handlers, and record each verdict.
//!
//! The claimer fills a bounded queue (one batch) of leased events; a fixed
//! set of `concurrency` worker tasks takes events from it. The claimer
//! claims when half the queue is free, with up to two claims in flight, so
//! the database round trip of a claim overlaps with handling instead of
//! alternating with it. It skips the names of handlers at their
//! concurrency cap and sleeps until a wake-up (PostgreSQL NOTIFY or an
//! in-process enqueue), room in the queue, a verdict that may have made
//! work claimable, or the poll interval. Acks of handlers that wrote
//! nothing go to the batched acker; leases are extended by one task for
//! all held events, queued ones included.
//!
//! Shutdown: stop claiming; events not yet started are released; running
//! handlers get `shutdown_grace` to finish, then are cancelled and their
//! events released; pending acks are flushed. No lease is left behind.

mod acker;
mod backoff;
mod committer;
mod done;
mod inflight;
mod limiter;
mod observer;
pub mod paused;
mod worker;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use backoff::Backoff;
pub use inflight::Inflight;
pub use observer::DispatchObserver;
pub use worker::no_handler_reason;

use crate::config::RuntimeConfig;
use crate::event::Claimed;
use crate::handler::Router;
use crate::store::{Store, StoreError};

/// Most claim statements in flight at once; see `run_until`.
const MAX_CLAIMS_IN_FLIGHT: usize = 2;

/// A runtime instance: one claimer, its workers, and their helpers.
pub struct Dispatcher {
    store: Store,
    router: Arc<dyn Router>,
    config: RuntimeConfig,
    worker_id: String,
    observer: Option<Arc<dyn DispatchObserver>>,
    limiter: Option<Arc<limiter::Limiter>>,
    otel: Option<Arc<crate::otel::Otel>>,
}

/// What a finished run did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunSummary {
    pub claimed: u64,
    /// Events whose handlers were still running when the grace period ran
    /// out; they were cancelled and released.
    pub cancelled: u64,
}

impl Dispatcher {
    pub fn new(store: Store, router: Arc<dyn Router>, config: RuntimeConfig) -> Self {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "host".into());
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let worker_id = format!("{host}:{}:{}", std::process::id(), &suffix[..8]);
        Self {
            store,
            router,
            config,
            worker_id,
            observer: None,
            limiter: None,
            otel: None,
        }
    }

    /// Trace every attempt (`[otel]`, see [`crate::otel`]).
    pub fn with_otel(mut self, otel: Arc<crate::otel::Otel>) -> Self {
        self.otel = Some(otel);
        self
    }

    /// Hold the events of `limits` to their rate and per-key budgets,
    /// across every instance that shares the database (see
    /// [`crate::limits`]).
    pub fn with_limits(mut self, limits: crate::limits::Limits) -> Self {
        self.limiter = limiter::Limiter::new(limits).map(Arc::new);
        self
    }

    /// Report handler starts and acks to `observer` (see [`DispatchObserver`]).
    pub fn with_observer(mut self, observer: Arc<dyn DispatchObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The `locked_by` value of this instance's claims.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Run until `shutdown` resolves, then shut down gracefully.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunSummary, StoreError> {
        let stop = CancellationToken::new();
        let trigger = stop.clone();
        let run = self.run_until(stop);
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => return result,
            _ = shutdown => trigger.cancel(),
        }
        run.await
    }

    /// Run until `stop` is cancelled.
    pub async fn run_until(self, stop: CancellationToken) -> Result<RunSummary, StoreError> {
        let cfg = &self.config;
        let inflight = Inflight::default();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let unblocked = Arc::new(tokio::sync::Notify::new());
        let (done_tx, done_task) = match cfg.keep_done {
            Some(_) => {
                let (tx, rx) = mpsc::unbounded_channel();
                (
                    Some(tx),
                    Some(tokio::spawn(done::run(self.store.clone(), rx))),
                )
            }
            None => (None, None),
        };
        let acker = tokio::spawn(acker::run(
            self.store.clone(),
            inflight.clone(),
            ack_rx,
            unblocked.clone(),
            self.observer.clone(),
            done_tx.clone(),
        ));
        let extender_stop = CancellationToken::new();
        let extender = tokio::spawn(inflight::extend_leases(
            self.store.clone(),
            inflight.clone(),
            cfg.lease_duration,
            extender_stop.clone(),
        ));
        let checkpointer = self.store.checkpoint_interval().map(|every| {
            let store = self.store.clone();
            let stop = extender_stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    if let Err(e) = store.checkpoint().await {
                        tracing::warn!(error = %e, "checkpointing the write-ahead log failed; will retry");
                    }
                }
            })
        });
        let backoff = Backoff {
            base: cfg.backoff_base,
            max: cfg.backoff_max,
            jitter: cfg.backoff_jitter,
        };
        let lanes = match cfg.effect_lanes {
            0 => committer::default_lanes(&self.store, cfg.concurrency),
            n => n,
        };
        let committer = Arc::new(
            committer::Committer::new(
                self.store.clone(),
                lanes,
                inflight.clone(),
                unblocked.clone(),
                self.observer.clone(),
                backoff,
                cfg.effect_savepoints,
            )
            .with_done(done_tx),
        );
        let lingerers = tokio::spawn(committer.clone().run_lingerers(extender_stop.clone()));
        let cx = Arc::new(worker::WorkerContext {
            store: self.store.clone(),
            router: self.router.clone(),
            backoff,
            committer: committer.clone(),
            default_max_retry: cfg.max_retry,
            inflight: inflight.clone(),
            acks: ack_tx,
            stopping: stop.clone(),
            observer: self.observer.clone(),
            limiter: self.limiter.clone(),
            otel: self.otel.clone(),
            attempt_history: cfg.attempt_history,
            keep_done: cfg.keep_done.is_some(),
        });
        let mut wakeups = match self.store.wakeups().await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, poll_interval = ?cfg.poll_interval, "no wake-up channel; polling until it can be opened");
                None
            }
        };
        // Paused names are known before the first claim.
        let paused = Arc::new(paused::Paused::default());
        paused.refresh(&self.store).await;
        let paused_watch = tokio::spawn(paused::watch(
            self.store.clone(),
            paused.clone(),
            cfg.poll_interval.min(paused::REFRESH_MAX),
            stop.clone(),
        ));
        tracing::info!(worker = %self.worker_id, backend = ?self.store.backend(), concurrency = cfg.concurrency, batch_size = cfg.batch_size, effect_lanes = lanes, "dispatch loop started");

        // Claimed events wait here for a worker. The claimer runs up to one
        // batch ahead of the workers and never waits for them, nor they for
        // it: a claim is a database round trip (milliseconds), during which
        // the workers keep handling what is queued. Queued events are in
        // `inflight`: their leases are extended, and released at shutdown.
        let run_ahead = cfg.batch_size.max(1);
        let (queue_tx, queue_rx) = flume::bounded::<Claimed>(run_ahead);
        // Claim once at least this much room opened up, so a steady stream
        // of finishing workers still yields claims of half a batch or more
        // (each claim has a fixed cost; few large ones are cheaper).
        let refill = (run_ahead / 2).max(1);
        let room = Arc::new(tokio::sync::Notify::new());
        let mut workers: JoinSet<()> = JoinSet::new();
        // Workers running a handler right now (the others wait for work).
        let busy = Arc::new(AtomicUsize::new(0));
        for _ in 0..cfg.concurrency.max(1) {
            workers.spawn(worker_loop(
                cx.clone(),
                queue_rx.clone(),
                unblocked.clone(),
                room.clone(),
                run_ahead - refill,
                busy.clone(),
            ));
        }
        drop(queue_rx);
        let mut summary = RunSummary::default();
        // Claims in flight, each with the room it was sized for. Two may
        // overlap: one claim is a round trip of a few ms during which
        // the workers empty the queue, so a single claimer leaves them idle
        // (measured: ~1/3 of the CPU idle on 2 cores). SKIP LOCKED keeps
        // overlapping claims apart.
        let mut claims = FuturesUnordered::new();
        let mut claiming = 0usize;
        let claim = |want: usize, skip: Vec<String>, signals: u64| {
            let store = self.store.clone();
            let worker_id = self.worker_id.clone();
            let lease = cfg.lease_duration;
            let limiter = self.limiter.clone();
            let paused = paused.names();
            async move {
                // Limits first: each claims its names within its budget,
                // or (not binding) leaves them to the ordinary claim.
                let mut batch = Vec::new();
                let mut excluded = Vec::new();
                let mut reserved = limiter::Reserved::default();
                if let Some(limiter) = &limiter {
                    let prepared = limiter
                        .claim(&store, &worker_id, want, lease, &paused)
                        .await;
                    match prepared.error {
                        Some(e) if prepared.claimed.is_empty() => {
                            limiter.settle(prepared.reserved, &[]);
                            return (want, signals, Err(e));
                        }
                        Some(e) => {
                            tracing::error!(error = %e, "claiming limited events failed; will retry")
                        }
                        None => {}
                    }
                    batch = prepared.claimed;
                    excluded = prepared.excluded;
                    reserved = prepared.reserved;
                }
                let rest = want - batch.len();
                if rest == 0 {
                    if let Some(limiter) = &limiter {
                        limiter.settle(reserved, &[]);
                    }
                    return (want, signals, Ok(batch));
                }
                // Paused names join the exclusion.
                excluded.extend(paused.iter().cloned());
                let result = store
                    .claim_excluding(&worker_id, rest, lease, &skip, &excluded)
                    .await;
                if let Some(limiter) = &limiter {
                    limiter.settle(reserved, result.as_deref().unwrap_or_default());
                }
                let result = match result {
                    Ok(more) if batch.is_empty() => Ok(more),
                    Ok(more) => {
                        batch.extend(more);
                        Ok(batch)
                    }
                    // The limited events are leased: keep them.
                    Err(e) if !batch.is_empty() => {
                        tracing::error!(error = %e, "claiming events failed; will retry");
                        Ok(batch)
                    }
                    Err(e) => Err(e),
                };
                (want, signals, result)
            }
        };
        // Counts the signals that work may be claimable (wake-ups, verdicts,
        // polls). A claim that comes back short only clears `maybe_more` if
        // no signal arrived after it was issued: it may have run before
        // that work was committed, and the signal would otherwise be lost.
        let mut signals = 0u64;
        // Whether a claim now is likely to find work: the last claim was
        // full, a wake-up arrived, or a finished worker may have made work
        // claimable (a group successor, emitted follow-ups). Otherwise room
        // in the queue does not trigger a claim, so an idle outbox costs
        // one query per poll interval.
        let mut maybe_more = true;
        let mut claim_failures = 0u32;
        // After a failed claim: no new claim before this instant.
        let mut paused_until: Option<tokio::time::Instant> = None;
        // After the wake-up channel failed: when to open it again.
        let mut relisten_at: Option<tokio::time::Instant> = wakeups.is_none().then(|| {
            tokio::time::Instant::now()
                + cfg.poll_interval.max(std::time::Duration::from_secs(1)) * 5
        });
        while !stop.is_cancelled() {
            let free = run_ahead.saturating_sub(queue_tx.len() + claiming);
            if maybe_more
                && paused_until.is_none()
                && free >= refill
                && claims.len() < MAX_CLAIMS_IN_FLIGHT
            {
                let want = free.min(cfg.batch_size);
                claiming += want;
                claims.push(claim(want, self.router.saturated(), signals));
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                Some((want, issued_at, result)) = claims.next(), if !claims.is_empty() => {
                    claiming -= want;
                    match result {
                        Ok(batch) => {
                            if claim_failures > 0 {
                                tracing::info!(failures = claim_failures, "claiming events works again: the database is reachable");
                            }
                            claim_failures = 0;
                            maybe_more = batch.len() == want || issued_at != signals;
                            summary.claimed += batch.len() as u64;
                            metrics::counter!("outrun_claimed_total").increment(batch.len() as u64);
                            for claimed in batch {
                                inflight.insert(claimed.lease());
                                // Claims are sized to the free room, so
                                // this never waits.
                                let _ = queue_tx.send_async(claimed).await;
                            }
                        }
                        Err(e) => {
                            claim_failures += 1;
                            // Back off so a database outage is not hammered;
                            // the loop keeps going and recovers by itself.
                            let pause = cfg.poll_interval.saturating_mul(claim_failures.min(10));
                            tracing::error!(error = %e, retry_in = ?pause, "claiming events failed");
                            paused_until = Some(tokio::time::Instant::now() + pause);
                        }
                    }
                }
                _ = sleep_until(relisten_at) => {
                    relisten_at = None;
                    match self.store.wakeups().await {
                        Ok(w) => {
                            tracing::info!("wake-up channel is back");
                            wakeups = Some(w);
                            // Wake-ups sent while it was down are gone.
                            maybe_more = true;
                            signals += 1;
                        }
                        Err(e) => {
                            let retry_in = cfg.poll_interval.max(std::time::Duration::from_secs(1)) * 5;
                            tracing::warn!(error = %e, ?retry_in, "wake-up channel still down; polling");
                            relisten_at = Some(tokio::time::Instant::now() + retry_in);
                        }
                    }
                }
                _ = sleep_until(paused_until) => {
                    paused_until = None;
                    maybe_more = true;
                    signals += 1;
                }
                // Workers took enough from the queue for a claim worth making.
                _ = room.notified(), if maybe_more => {}
                woke = next_wakeup(&mut wakeups) => {
                    if let Err(e) = woke {
                        let retry_in = cfg.poll_interval.max(std::time::Duration::from_secs(1)) * 5;
                        tracing::warn!(error = %e, ?retry_in, "wake-up channel failed; polling until it is back");
                        wakeups = None;
                        relisten_at = Some(tokio::time::Instant::now() + retry_in);
                    }
                    maybe_more = true;
                    signals += 1;
                }
                // A verdict may have made work claimable: a group's next
                // event, or follow-ups a handler emitted.
                _ = unblocked.notified() => {
                    maybe_more = true;
                    signals += 1;
                    // It may sort before where the claims have got to.
                    self.store.rewind_claims();
                }
                // A paused name was resumed: its events may sort before
                // where claims got to (the refresh rewound them).
                _ = paused.resumed.notified() => {
                    maybe_more = true;
                    signals += 1;
                }
                // A rate limit's bucket has a token again.
                _ = sleep_until(self.limiter.as_ref().and_then(|l| l.next_token_at())) => {
                    maybe_more = true;
                    signals += 1;
                }
                _ = tokio::time::sleep(cfg.poll_interval) => {
                    maybe_more = true;
                    signals += 1;
                }
            }
        }
        paused_watch.abort();
        // Claims still in flight lease rows too: hold them, to be released
        // below with the rest.
        while let Some((_, _, result)) = claims.next().await {
            if let Ok(batch) = result {
                summary.claimed += batch.len() as u64;
                for claimed in batch {
                    inflight.insert(claimed.lease());
                }
            }
        }

        // Never started: their leases stay in `inflight` and are released
        // with the other leftovers below.
        let queued = queue_tx.len();
        drop(queue_tx);
        let running = busy.load(Ordering::Relaxed);
        tracing::info!(running, queued, grace = ?cfg.shutdown_grace, "shutting down: no new claims; waiting for running handlers");
        let drained = tokio::time::timeout(cfg.shutdown_grace, async {
            while let Some(done) = workers.join_next().await {
                reaped(done);
            }
        })
        .await;
        if drained.is_err() {
            summary.cancelled = workers.len() as u64;
            tracing::warn!(
                cancelled = workers.len(),
                "grace period over; cancelling handlers still running and releasing their events"
            );
            workers.abort_all();
            while workers.join_next().await.is_some() {}
        }
        // Commit what the lanes hold (events still in them after the
        // grace period were cancelled: their effects are undone).
        committer.flush().await;
        // Flush pending acks: dropping the last sender ends the acker.
        drop(cx);
        if let Err(e) = acker.await {
            tracing::error!(error = %e, "acker task failed");
        }
        extender_stop.cancel();
        let _ = extender.await;
        let _ = lingerers.await;
        // Anything a lingerer still had (it stopped mid-linger).
        committer.flush().await;
        // The keep_done records of the last commits: the task ends once the
        // acker and the committer, its senders, are gone.
        drop(committer);
        if let Some(task) = done_task
            && tokio::time::timeout(std::time::Duration::from_secs(5), task)
                .await
                .is_err()
        {
            tracing::warn!("the last keep_done records were not written within 5 s");
        }
        if let Some(checkpointer) = checkpointer {
            let _ = checkpointer.await;
        }
        let left = inflight.snapshot();
        if !left.is_empty() {
            let n = self.store.release(&left).await?;
            tracing::info!(
                released = n,
                "released leases of events that did not finish"
            );
        }
        tracing::info!(claimed = summary.claimed, "dispatch loop stopped");
        Ok(summary)
    }
}

/// One of the `concurrency` long-lived worker tasks: take the next claimed
/// event from the queue and handle it to its verdict, until shutdown or the
/// queue closes. Long-lived tasks rather than a task per event: spawning
/// moved the whole worker future on every event.
async fn worker_loop(
    cx: Arc<worker::WorkerContext>,
    queue: flume::Receiver<Claimed>,
    unblocked: Arc<tokio::sync::Notify>,
    room: Arc<tokio::sync::Notify>,
    low_water: usize,
    busy: Arc<AtomicUsize>,
) {
    loop {
        let claimed = tokio::select! {
            biased;
            _ = cx.stopping.cancelled() => return,
            next = queue.recv_async() => match next {
                Ok(c) => c,
                Err(_) => return,
            },
        };
        if queue.len() <= low_water {
            room.notify_one();
        }
        let lease = claimed.lease();
        busy.fetch_add(1, Ordering::Relaxed);
        // A bug in the verdict path must not cost the runtime a worker:
        // forget the lease (the event runs again once it expires) and go on.
        let done = AssertUnwindSafe(worker::run(cx.clone(), claimed))
            .catch_unwind()
            .await;
        busy.fetch_sub(1, Ordering::Relaxed);
        match done {
            Ok(true) => unblocked.notify_one(),
            Ok(false) => {}
            Err(panic) => {
                cx.inflight.remove(&lease.id);
                tracing::error!(event_id = %lease.id, panic = %worker::panic_message(&*panic), "worker panicked; the event runs again after its lease expires");
            }
        }
        // A receive from a non-empty queue does not yield, so without this
        // one worker would run the whole queue while the claimer's finished
        // round trip waits behind it, and claiming would not overlap with
        // handling.
        tokio::task::yield_now().await;
    }
}

/// Log a worker task that failed.
fn reaped(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "worker task panicked");
    }
}

/// Pending forever when there is no pause.
async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn next_wakeup(w: &mut Option<crate::store::Wakeups>) -> Result<(), StoreError> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}
