//! The dispatch loop: claim events in batches, run them concurrently on
//! their handlers, and record each verdict.
//!
//! One claimer task owns the worker set. It claims in batches and runs at
//! most one batch ahead of the workers (a short, bounded queue of leased
//! events waiting for a slot), skips the names of handlers at their
//! concurrency cap, and sleeps
//! until a wake-up (PostgreSQL NOTIFY or an in-process enqueue), a finished
//! worker, or the poll interval. Acks of handlers that wrote nothing go to
//! the batched acker; leases are extended by one task for all workers.
//!
//! Shutdown: stop claiming; events not yet started are released; running
//! handlers get `shutdown_grace` to finish, then are cancelled and their
//! events released; pending acks are flushed. No lease is left behind.

mod acker;
mod backoff;
mod inflight;
mod observer;
mod worker;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use backoff::Backoff;
pub use inflight::Inflight;
pub use observer::DispatchObserver;
pub use worker::no_handler_reason;

use crate::config::RuntimeConfig;
use crate::handler::Router;
use crate::store::{Store, StoreError};

/// A runtime instance: one claimer, its workers, and their helpers.
pub struct Dispatcher {
    store: Store,
    router: Arc<dyn Router>,
    config: RuntimeConfig,
    worker_id: String,
    observer: Option<Arc<dyn DispatchObserver>>,
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
        }
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
        let acker = tokio::spawn(acker::run(
            self.store.clone(),
            inflight.clone(),
            ack_rx,
            unblocked.clone(),
            self.observer.clone(),
        ));
        let extender_stop = CancellationToken::new();
        let extender = tokio::spawn(inflight::extend_leases(
            self.store.clone(),
            inflight.clone(),
            cfg.lease_duration,
            extender_stop.clone(),
        ));
        let cx = Arc::new(worker::WorkerContext {
            store: self.store.clone(),
            router: self.router.clone(),
            backoff: Backoff {
                base: cfg.backoff_base,
                max: cfg.backoff_max,
                jitter: cfg.backoff_jitter,
            },
            default_max_retry: cfg.max_retry,
            inflight: inflight.clone(),
            acks: ack_tx,
            stopping: stop.clone(),
            observer: self.observer.clone(),
        });
        let mut wakeups = match self.store.wakeups().await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, poll_interval = ?cfg.poll_interval, "no wake-up channel; polling only");
                None
            }
        };
        tracing::info!(worker = %self.worker_id, backend = ?self.store.backend(), concurrency = cfg.concurrency, batch_size = cfg.batch_size, "dispatch loop started");

        let mut workers: JoinSet<bool> = JoinSet::new();
        // Claimed events waiting for a worker slot. The claimer runs up to
        // one batch ahead of the workers, so claims are full batches issued
        // while the workers are busy, instead of one small claim per
        // finished worker (each claim walks past every leased row at the
        // head of the queue, so many small claims cost the database far
        // more than few large ones). Queued events are in `inflight`: their
        // leases are extended, and released at shutdown.
        let mut ready: VecDeque<crate::event::Claimed> = VecDeque::new();
        let run_ahead = cfg.batch_size.min(cfg.concurrency).max(1);
        let capacity = cfg.concurrency + run_ahead;
        // Claim once at least this much room opened up (or at once when
        // idle), so a steady stream of finishing workers still yields
        // claims of half a batch or more.
        let refill = (run_ahead / 2).max(1);
        let mut summary = RunSummary::default();
        // Whether a claim now is likely to find work: the last claim was
        // full, a wake-up arrived, or a finished worker may have made work
        // claimable (a group successor, emitted follow-ups). Otherwise a finished worker does not
        // trigger a claim, so an idle queue costs one query per poll.
        let mut maybe_more = true;
        let mut claim_failures = 0u32;
        while !stop.is_cancelled() {
            while workers.len() < cfg.concurrency {
                let Some(claimed) = ready.pop_front() else {
                    break;
                };
                workers.spawn(worker::run(cx.clone(), claimed));
            }
            let room = capacity.saturating_sub(workers.len() + ready.len());
            if maybe_more && (room >= refill || (workers.is_empty() && room > 0)) {
                let want = room.min(cfg.batch_size);
                match self
                    .store
                    .claim(
                        &self.worker_id,
                        want,
                        cfg.lease_duration,
                        &self.router.saturated(),
                    )
                    .await
                {
                    Ok(batch) => {
                        claim_failures = 0;
                        maybe_more = batch.len() == want;
                        summary.claimed += batch.len() as u64;
                        metrics::counter!("outrun_claimed_total").increment(batch.len() as u64);
                        for claimed in batch {
                            inflight.insert(claimed.lease());
                            ready.push_back(claimed);
                        }
                        if maybe_more {
                            continue;
                        }
                        if !ready.is_empty() {
                            continue;
                        }
                    }
                    Err(e) => {
                        claim_failures += 1;
                        // Back off so a database outage is not hammered; the
                        // loop keeps going and recovers by itself.
                        let pause = cfg.poll_interval.saturating_mul(claim_failures.min(10));
                        tracing::error!(error = %e, retry_in = ?pause, "claiming events failed");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        maybe_more = true;
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(done) = workers.join_next(), if !workers.is_empty() => {
                    // A verdict may have made work claimable; a full house
                    // may have hidden more work.
                    maybe_more |= reaped(done);
                    while let Some(done) = workers.try_join_next() {
                        maybe_more |= reaped(done);
                    }
                }
                woke = next_wakeup(&mut wakeups) => {
                    if let Err(e) = woke {
                        tracing::warn!(error = %e, "wake-up channel failed; polling only");
                        wakeups = None;
                    }
                    maybe_more = true;
                }
                _ = unblocked.notified() => maybe_more = true,
                _ = tokio::time::sleep(cfg.poll_interval) => maybe_more = true,
            }
        }

        tracing::info!(running = workers.len(), queued = ready.len(), grace = ?cfg.shutdown_grace, "shutting down: no new claims; waiting for running handlers");
        // Never started: released with the other leftovers below.
        ready.clear();
        let drained = tokio::time::timeout(cfg.shutdown_grace, async {
            while workers.join_next().await.is_some() {}
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
        // Flush pending acks: dropping the last sender ends the acker.
        drop(cx);
        if let Err(e) = acker.await {
            tracing::error!(error = %e, "acker task failed");
        }
        extender_stop.cancel();
        let _ = extender.await;
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

/// Log a worker that panicked; true if its verdict may have made work
/// claimable.
fn reaped(done: Result<bool, tokio::task::JoinError>) -> bool {
    match done {
        Ok(grouped) => grouped,
        Err(e) => {
            if e.is_panic() {
                tracing::error!(error = %e, "worker task panicked");
            }
            false
        }
    }
}

async fn next_wakeup(w: &mut Option<crate::store::Wakeups>) -> Result<(), StoreError> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}
