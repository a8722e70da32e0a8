//! Dead-letters live events whose `expires_at` passed before any runtime
//! started them (reason `expired`), so they stop blocking their group and
//! show up as dead in stats instead of lingering as pending.

use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

use super::BATCH;

/// Expire everything due now, in batches; returns the total.
pub async fn run_once(store: &Store) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = store.expire_due(BATCH).await?;
        total += n;
        if n < BATCH as u64 {
            break;
        }
    }
    if total > 0 {
        crate::timeline::events_dead("expired", total);
        tracing::warn!(
            events = total,
            "events expired before they could run; they are dead with reason 'expired'"
        );
    }
    Ok(total)
}

pub async fn run(store: Store, interval: std::time::Duration, stop: CancellationToken) {
    super::every("expirer", interval, stop, || run_once(&store)).await
}
