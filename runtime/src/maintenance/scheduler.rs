//! Fires the `[[schedule]]` entries: sleeps until the next tick of any
//! schedule, then has the store advance each schedule that is due (see
//! [`crate::store::Store::advance_schedule`]). Every instance runs this; the
//! schedule's row lock makes one of them enqueue each tick and the others
//! find it done. At start every schedule is advanced once, which is when
//! ticks missed while no instance ran are caught up (`catch_up`).

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::schedule::Schedule;
use crate::store::Store;

/// How long to wait before trying again when the database failed a firing.
const RETRY: Duration = Duration::from_secs(1);

/// Advance every schedule once; returns how many events were enqueued.
/// Errors are logged per schedule (one broken row must not stop the rest);
/// the returned flag says whether any failed.
pub async fn run_once(
    store: &Store,
    schedules: &[Schedule],
    default_max_retry: i32,
) -> (u64, bool) {
    let mut enqueued = 0;
    let mut failed = false;
    for s in schedules {
        let now = Utc::now();
        match store.advance_schedule(s, now, default_max_retry).await {
            Ok(advanced) => {
                let Some(plan) = advanced.plan else { continue };
                for (tick, id) in plan.ticks.iter().zip(&advanced.ids) {
                    tracing::info!(schedule = s.name(), tick = %tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), event_id = %id, "scheduled event enqueued");
                }
                if plan.skipped > 0 {
                    tracing::warn!(schedule = s.name(), skipped = plan.skipped, catch_up = %s.spec.catch_up, reached = %plan.reached, "ticks missed while no instance ran were skipped");
                }
                if advanced.ids.is_empty() && plan.skipped == 0 {
                    tracing::debug!(schedule = s.name(), reached = %plan.reached, "schedule starts from now");
                }
                enqueued += advanced.ids.len() as u64;
                metrics::counter!("outrun_schedule_enqueued_total", "schedule" => s.name().to_string())
                    .increment(advanced.ids.len() as u64);
            }
            Err(e) => {
                failed = true;
                tracing::error!(schedule = s.name(), error = %e, "firing the schedule failed; will retry");
            }
        }
    }
    (enqueued, failed)
}

/// Until `stop`: fire every schedule at each of its ticks.
pub async fn run(
    store: Store,
    schedules: Vec<Schedule>,
    default_max_retry: i32,
    stop: CancellationToken,
) {
    if schedules.is_empty() {
        return;
    }
    for s in &schedules {
        let next = s.next_after(Utc::now());
        tracing::info!(schedule = s.name(), when = %s.describe(), catch_up = %s.spec.catch_up, next = ?next, "schedule loaded");
    }
    loop {
        let (_, failed) = run_once(&store, &schedules, default_max_retry).await;
        let now = Utc::now();
        let wait = if failed {
            RETRY
        } else {
            schedules
                .iter()
                .filter_map(|s| s.next_after(now))
                .min()
                .map(|t| (t - now).to_std().unwrap_or_default())
                // Only cron expressions with no future occurrence have
                // none; look again in an hour.
                .unwrap_or(Duration::from_secs(3600))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            // A hair after the tick: `latest(now)` then names it even if
            // the timer fires a moment early.
            _ = tokio::time::sleep(wait + Duration::from_millis(5)) => {}
        }
    }
}
