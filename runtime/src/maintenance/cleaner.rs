//! Deletes dead events whose retention has passed, counted from the moment
//! each one died (`dead_at`; rows that died before outrun recorded it count
//! from `create_date`, the seed's `retry >= max_retry and create_date <=
//! :before`). Live events are never touched, however old. Also deletes
//! the attempt history of events that no longer exist, except for those
//! `[runtime] keep_done` still keeps.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

use super::BATCH;

/// Delete dead events that died more than `retention` ago; returns the count.
pub async fn run_once(store: &Store, retention: Duration) -> Result<u64, StoreError> {
    run_once_keeping(store, retention, None).await
}

/// [`run_once`], keeping handled events' records for `keep_done`.
pub async fn run_once_keeping(
    store: &Store,
    retention: Duration,
    keep_done: Option<Duration>,
) -> Result<u64, StoreError> {
    let before =
        Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut total = 0;
    loop {
        let n = store.cleanup_dead(before, BATCH).await?;
        total += n;
        if n > 0 {
            tracing::info!(
                deleted = n,
                retention = %humantime::format_duration(retention),
                "deleted dead events past their retention"
            );
        }
        if n < BATCH as u64 {
            break;
        }
    }
    metrics::counter!("outrun_dead_cleaned_total").increment(total);
    // The attempt history of events that are gone (handled, purged,
    // cleaned): the ack does not delete it, to keep the success path one
    // statement.
    loop {
        let n = store.cleanup_attempts(BATCH, keep_done).await?;
        if n < BATCH as u64 {
            break;
        }
    }
    Ok(total)
}

pub async fn run(
    store: Store,
    retention: Duration,
    keep_done: Option<Duration>,
    interval: Duration,
    stop: CancellationToken,
) {
    super::every("cleaner", interval, stop, || {
        run_once_keeping(&store, retention, keep_done)
    })
    .await
}
