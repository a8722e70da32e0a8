//! One claimed event, from route lookup to its verdict in the table: ack
//! (with the handler's effects), retry with backoff, dead, reschedule, or
//! release at shutdown.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{Claimed, Lease};
use crate::handler::{Effects, HandlerError, Outcome, Route, Router};
use crate::store::lane::Kept;
use crate::store::{AckTx, Failure, Store};

use super::backoff::Backoff;
use super::inflight::Inflight;

/// What every worker shares.
pub struct WorkerContext {
    pub store: Store,
    pub router: Arc<dyn Router>,
    pub backoff: Backoff,
    pub default_max_retry: i32,
    pub inflight: Inflight,
    pub acks: mpsc::UnboundedSender<super::acker::Ack>,
    /// Where the effects of events that succeed wait for their commit.
    pub committer: Arc<super::committer::Committer>,
    /// Cancelled at shutdown: events that have not started are released.
    pub stopping: CancellationToken,
    pub observer: Option<Arc<dyn super::DispatchObserver>>,
    /// `[[limit]]` budgets; see `limiter.rs`.
    pub limiter: Option<Arc<super::limiter::Limiter>>,
    /// `[otel]`: a span per attempt. `None` costs one branch per event.
    pub otel: Option<Arc<crate::otel::Otel>>,
    /// Attempts kept per event in `outrun_attempts` (0: none recorded).
    pub attempt_history: u32,
    /// `[runtime] keep_done`: handled events' attempts are recorded too.
    pub keep_done: bool,
}

/// An attempt that ran its handler, for its row in the attempt history.
/// Borrows: nothing is copied unless the attempt fails.
struct Ran<'a> {
    /// When the handler started; its wall-clock time is derived only for a
    /// failure's record, so the success path reads no extra clock.
    started: Instant,
    elapsed: Duration,
    route: &'a Route,
    event: &'a crate::event::Event,
}

impl WorkerContext {
    /// Whether the verdict of an event named `name` should wake the
    /// claimer once it is recorded, as a group's does: the event held a
    /// per-key slot that is free again.
    fn frees_room(&self, name: &str) -> bool {
        self.limiter.as_ref().is_some_and(|l| l.frees_room(name))
    }
}

/// The reason recorded for an event that no handler is bound to.
pub fn no_handler_reason(name: &str) -> String {
    format!("no handler for event '{name}'")
}

/// Handle one claimed event to its verdict. Returns whether the verdict may
/// have made new work claimable: the event belonged to a group (its
/// successor may be ready) or its handler emitted follow-up events (which
/// wake nobody on SQLite, where there is no NOTIFY).
pub async fn run(cx: Arc<WorkerContext>, claimed: Claimed) -> bool {
    let grouped = claimed.event.group_id.is_some() || cx.frees_room(&claimed.event.name);
    let emitted = handle(&cx, claimed).await;
    grouped || emitted
}

/// Returns whether follow-up events were committed.
async fn handle(cx: &Arc<WorkerContext>, claimed: Claimed) -> bool {
    let lease = claimed.lease();
    let ev = &claimed.event;
    // Rows inserted by plain SQL never met the enqueue check. Before the
    // route: with schemas required, a name without one is a schema error
    // (say, an unknown version) even when no handler binds it.
    if let Some(error) = crate::schema::reason_to_bury(cx.store.schemas(), ev) {
        tracing::error!(event_id = %ev.id, name = %ev.name, "{error}; event is dead");
        crate::timeline::events_dead("schema", 1);
        settle(cx, lease, Failure::Dead { error }, None).await;
        return false;
    }
    let Some(route) = cx.router.route(&ev.name) else {
        let reason = no_handler_reason(&ev.name);
        tracing::error!(event_id = %ev.id, name = %ev.name, "{reason}; event is dead");
        crate::timeline::events_dead("no_handler", 1);
        settle(cx, lease, Failure::Dead { error: reason }, None).await;
        return false;
    };
    if ev.expires_at.is_some_and(|t| t <= Utc::now()) {
        expired(cx, lease, &route, ev.id, None).await;
        return false;
    }
    // Wait for the handler's concurrency cap; shutdown wins over waiting.
    let _permit = match &route.permits {
        Some(sem) => tokio::select! {
            p = sem.clone().acquire_owned() => p.ok(),
            _ = cx.stopping.cancelled() => None,
        },
        None => None,
    };
    if cx.stopping.is_cancelled() {
        release(cx, lease).await;
        return false;
    }

    if let Some(o) = &cx.observer {
        o.on_started(ev);
    }
    let mut effects = Effects::in_lanes(cx.committer.clone(), route.handler_name.clone());
    let span = cx.otel.as_ref().map(|o| {
        let attempt = o.attempt(ev, &route.handler_name, route.handler.version().as_deref());
        effects = std::mem::take(&mut effects).with_trace(attempt.traceparent.clone());
        attempt
    });
    let started = Instant::now();
    let result = invoke(&route, ev, &mut effects).await;
    let elapsed = started.elapsed();
    if let Some(span) = span {
        end_span(span, &route, ev, &result, &effects);
    }
    let ran = Ran {
        started,
        elapsed,
        route: &route,
        event: ev,
    };
    let ran = Some(&ran);
    metrics::histogram!("outrun_handler_duration_seconds", "handler" => route.handler_name.clone())
        .record(elapsed.as_secs_f64());
    crate::timeline::TIMELINE.attempt(elapsed);

    if effects.must_rerun() {
        // A statement failed where only rolling back the lane's whole
        // transaction undoes the event (no savepoint). Its handler gets
        // savepoints from now on; the next attempt sees that statement's
        // error with the usual semantics.
        discard(cx, effects).await;
        let why = match &result {
            Ok(_) => "a statement of the event failed outside a savepoint".to_string(),
            Err(e) => format!(
                "a statement of the event failed outside a savepoint: {}",
                e.message
            ),
        };
        tracing::info!(event_id = %ev.id, handler = %route.handler_name, "{why}; the event runs again without spending a retry");
        metrics::counter!("outrun_events_interrupted_total", "handler" => route.handler_name.clone()).increment(1);
        interrupted(cx, lease, why, ran).await;
        return false;
    }
    match result {
        Ok(Outcome::Done) => {
            metrics::counter!("outrun_events_handled_total", "handler" => route.handler_name.clone()).increment(1);
            if effects.is_empty() {
                // Nothing to commit with it: join the next batched DELETE.
                let ack = super::acker::Ack {
                    lease,
                    grouped: ev.group_id.is_some() || cx.frees_room(&ev.name),
                    done: ran.and_then(|r| done_record(cx, r)),
                };
                if cx.acks.send(ack).is_err() {
                    release(cx, lease).await;
                }
                return false;
            }
            let grouped = ev.group_id.is_some() || cx.frees_room(&ev.name);
            return commit(cx, lease, &route, effects, grouped, ran).await;
        }
        Ok(Outcome::RetryAfter(delay)) => {
            discard(cx, effects).await;
            let at =
                Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            if ev.expires_at.is_some_and(|exp| at > exp) {
                expired(cx, lease, &route, ev.id, ran).await;
            } else {
                tracing::debug!(event_id = %ev.id, handler = %route.handler_name, delay_ms = delay.as_millis() as u64, "handler asked to retry later");
                metrics::counter!("outrun_events_deferred_total", "handler" => route.handler_name.clone()).increment(1);
                settle(cx, lease, Failure::Reschedule { at }, ran).await;
            }
        }
        Err(err) => {
            let transient = effects.saw_transient();
            discard(cx, effects).await;
            if err.retryable && transient {
                // The database failed the attempt (a dropped connection,
                // a deadlock, a failover): not the event's fault, so no
                // retry is spent and no hiccup can make it dead.
                tracing::warn!(event_id = %ev.id, handler = %route.handler_name, error = %err.message, "a database error interrupted the event; it will run again without spending a retry");
                metrics::counter!("outrun_events_interrupted_total", "handler" => route.handler_name.clone()).increment(1);
                interrupted(cx, lease, err.message, ran).await;
                return false;
            }
            let kind = if err.retryable {
                "retryable"
            } else {
                "rejected"
            };
            metrics::counter!("outrun_events_failed_total", "handler" => route.handler_name.clone(), "kind" => kind).increment(1);
            crate::timeline::TIMELINE.failed();
            let failure = if err.retryable {
                let failures = ev.retry + 1;
                let max = route.max_retry.unwrap_or(ev.max_retry);
                if failures >= max {
                    tracing::error!(event_id = %ev.id, handler = %route.handler_name, attempt = failures, error = %err.message, "event failed its last attempt and is dead");
                    crate::timeline::events_dead("retries_exhausted", 1);
                } else {
                    tracing::warn!(event_id = %ev.id, handler = %route.handler_name, attempt = failures, error = %err.message, "event failed; will retry");
                }
                let retry_at = Utc::now()
                    + chrono::Duration::from_std(cx.backoff.delay(failures))
                        .unwrap_or(chrono::Duration::MAX);
                Failure::Retry {
                    error: err.message,
                    retry_at,
                    max_retry: route.max_retry,
                }
            } else {
                tracing::error!(event_id = %ev.id, handler = %route.handler_name, error = %err.message, "handler rejected the event; it is dead");
                crate::timeline::events_dead("rejected", 1);
                Failure::Dead { error: err.message }
            };
            settle(cx, lease, failure, ran).await;
        }
    }
    false
}

/// The attempt's outcome as its span records it; the verdict below makes
/// the same distinctions.
fn end_span(
    span: crate::otel::Attempt,
    route: &Route,
    ev: &crate::event::Event,
    result: &Result<Outcome, HandlerError>,
    effects: &Effects,
) {
    let outcome = match result {
        _ if effects.must_rerun() => "interrupted",
        Ok(Outcome::Done) => "ok",
        Ok(Outcome::RetryAfter(_)) => "deferred",
        Err(e) if e.retryable && effects.saw_transient() => "interrupted",
        Err(e) if e.retryable && ev.retry + 1 < route.max_retry.unwrap_or(ev.max_retry) => "retry",
        Err(_) => "dead",
    };
    span.end(outcome, result.as_ref().err().map(|e| e.message.as_str()));
}

/// Run the handler with its timeout, turning a panic into a retryable error.
async fn invoke(
    route: &Route,
    ev: &crate::event::Event,
    effects: &mut Effects,
) -> Result<Outcome, HandlerError> {
    let call = AssertUnwindSafe(route.handler.handle(ev, effects)).catch_unwind();
    let outcome = match route.timeout {
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => {
                return Err(HandlerError::retry(format!(
                    "timeout after {}",
                    humantime::format_duration(round_ms(limit))
                )));
            }
        },
        None => call.await,
    };
    match outcome {
        Ok(r) => r,
        Err(panic) => Err(HandlerError::retry(format!(
            "handler panicked: {}",
            panic_message(&*panic)
        ))),
    }
}

/// The message a panic was raised with (`panic!("...")` carries a `&str`
/// or a `String`).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Keep the handler's writes and emitted events in its lane, to commit
/// with the delete of its event (see `committer.rs`). Returns false: the
/// committer wakes the claimer once the commit makes anything claimable.
async fn commit(
    cx: &WorkerContext,
    lease: Lease,
    route: &Route,
    effects: Effects,
    grouped: bool,
    ran: Option<&Ran<'_>>,
) -> bool {
    let (tx, emitted) = effects.into_parts();
    let tx = match tx {
        Some(tx @ (AckTx::Lane(_) | AckTx::Shared(_) | AckTx::Pipe(_))) => tx,
        None => match cx.committer.enter_lane(&route.handler_name).await {
            Ok(tx) => tx,
            Err(e) => {
                tracing::warn!(event_id = %lease.id, handler = %route.handler_name, error = %e, "could not start committing the handler's effects; the event will run again");
                interrupted(
                    cx,
                    lease,
                    format!("committing the handler's effects failed: {e}"),
                    ran,
                )
                .await;
                return false;
            }
        },
        Some(other) => {
            // Only `Effects::new` makes these, and the dispatcher does not.
            let _ = other.rollback().await;
            tracing::error!(event_id = %lease.id, "effects outside a lane reached the dispatcher; the event will run again");
            interrupted(cx, lease, "internal: effects outside a lane".into(), ran).await;
            return false;
        }
    };
    // Only follow-ups due now are worth waking the claimer for (a claim per
    // commit costs the bookkeeping connection, on SQLite the only one);
    // delayed ones are found by the poll.
    let due_now = emitted.iter().any(|e| e.delay.is_none_or(|d| d.is_zero()));
    let kept = Kept {
        lease,
        grouped,
        emitted: due_now,
        done: ran.and_then(|r| done_record(cx, r)),
    };
    let Err(e) = cx
        .committer
        .keep_with_emits(tx, emitted, cx.default_max_retry, kept)
        .await
    else {
        return false;
    };
    let error = format!("enqueueing the handler's follow-up events failed: {e}");
    tracing::warn!(event_id = %lease.id, handler = %route.handler_name, "{error}");
    if e.is_transient() {
        interrupted(cx, lease, error, ran).await;
    } else {
        let retry_at = Utc::now()
            + chrono::Duration::from_std(cx.backoff.delay(1)).unwrap_or(chrono::Duration::MAX);
        settle(
            cx,
            lease,
            Failure::Retry {
                error,
                retry_at,
                max_retry: route.max_retry,
            },
            ran,
        )
        .await;
    }
    false
}

/// Undo a failed attempt's writes (its savepoint, or its own transaction).
async fn discard(cx: &WorkerContext, effects: Effects) {
    match effects.into_parts() {
        (Some(tx @ (AckTx::Lane(_) | AckTx::Shared(_) | AckTx::Pipe(_))), _) => {
            cx.committer.undo(tx).await
        }
        (Some(tx), _) => {
            if let Err(e) = tx.rollback().await {
                tracing::warn!(error = %e, "rolling back a failed attempt's transaction failed (the connection drops it anyway)");
            }
        }
        (None, _) => {}
    }
}

/// Run the event again after a backoff without spending a retry.
async fn interrupted(cx: &WorkerContext, lease: Lease, error: String, ran: Option<&Ran<'_>>) {
    let retry_at = Utc::now()
        + chrono::Duration::from_std(cx.backoff.delay(1)).unwrap_or(chrono::Duration::MAX);
    settle(cx, lease, Failure::Interrupted { error, retry_at }, ran).await;
}

async fn expired(
    cx: &WorkerContext,
    lease: Lease,
    route: &Route,
    id: uuid::Uuid,
    ran: Option<&Ran<'_>>,
) {
    tracing::warn!(event_id = %id, handler = %route.handler_name, "event expired before it could run; it is dead");
    crate::timeline::events_dead("expired", 1);
    settle(
        cx,
        lease,
        Failure::Dead {
            error: "expired".into(),
        },
        ran,
    )
    .await;
}

/// The record of a handled event's attempt, with `[runtime] keep_done`.
fn done_record(cx: &WorkerContext, r: &Ran<'_>) -> Option<Box<crate::store::Attempt>> {
    if !cx.keep_done {
        return None;
    }
    Some(Box::new(attempt_of(r, "done", None)))
}

fn attempt_of(r: &Ran<'_>, outcome: &str, error: Option<String>) -> crate::store::Attempt {
    crate::store::Attempt {
        attempt: r.event.attempt(),
        started_at: Utc::now()
            - chrono::Duration::from_std(r.started.elapsed()).unwrap_or_default(),
        duration_ms: r.elapsed.as_millis().min(i64::MAX as u128) as i64,
        handler: Some(r.route.handler_name.to_string()),
        version: r.route.handler.version().map(|v| v.to_string()),
        instance: r.event.locked_by.clone(),
        outcome: outcome.to_owned(),
        error,
    }
}

/// Record a verdict other than success; the lease goes with it.
async fn settle(cx: &WorkerContext, lease: Lease, failure: Failure, ran: Option<&Ran<'_>>) {
    let recorded = match ran {
        Some(r) if cx.attempt_history > 0 => {
            let ev = r.event;
            let last = ev.retry + 1 >= r.route.max_retry.unwrap_or(ev.max_retry);
            let (outcome, error) = crate::store::Attempt::outcome_of(&failure, last);
            let record = crate::store::AttemptRecord {
                attempt: attempt_of(r, outcome, error),
                keep: cx.attempt_history,
            };
            cx.store.fail_recorded(lease, &failure, &record).await
        }
        _ => cx.store.fail(lease, &failure).await,
    };
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(event_id = %lease.id, "the event was cancelled, or its lease lost to another runtime, before its verdict could be recorded")
        }
        Err(e) => {
            tracing::error!(event_id = %lease.id, error = %e, "recording the failure failed; the event runs again after its lease expires")
        }
    }
    cx.inflight.remove(&lease.id);
}

pub async fn release(cx: &WorkerContext, lease: Lease) {
    if let Err(e) = cx.store.release(&[lease]).await {
        tracing::error!(event_id = %lease.id, error = %e, "releasing the lease failed; the event runs again after its lease expires");
    }
    cx.inflight.remove(&lease.id);
}
