//! Background duties that keep the table healthy, one service per file:
//! [`expirer`] turns events that outlived `expires_at` into dead letters, and
//! [`cleaner`] deletes dead letters past their retention, and [`scheduler`]
//! enqueues the events of `[[schedule]]` entries at their ticks.
//!
//! There is no separate "rescuer" for crashed instances: the claim query
//! itself treats an expired lease as free, so a dead instance's events are
//! picked up by the next claim anywhere, with a fresh fencing token.

pub mod cleaner;
pub mod expirer;
pub mod scheduler;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Rows touched by one statement of a maintenance pass, so a large backlog
/// is worked off in short transactions that never block claims for long.
pub const BATCH: i64 = 1000;

/// Run `pass` every `interval` until `stop`; each pass loops while it fills
/// whole batches.
pub(crate) async fn every<F, Fut>(
    name: &'static str,
    interval: Duration,
    stop: CancellationToken,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, crate::store::StoreError>>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match pass().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(service = name, rows = n, "maintenance pass"),
            Err(e) => {
                tracing::error!(service = name, error = %e, "maintenance pass failed; will retry next interval")
            }
        }
    }
}
