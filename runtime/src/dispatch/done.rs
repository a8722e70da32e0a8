//! `[runtime] keep_done`: the records of handled events' last attempts
//! (see `store/attempts.rs`). The acker and the lanes hand over the records
//! of the events whose delete has just committed; this task inserts them in
//! batches, off the path of the next ack.

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::store::{Attempt, Store};

/// Records whose event's delete has committed.
pub type Committed = Vec<(Uuid, Attempt)>;

/// Most records in one insert.
const MAX_BATCH: usize = 2048;

/// Insert what arrives on `rx` until every sender is gone.
pub async fn run(store: Store, mut rx: mpsc::UnboundedReceiver<Committed>) {
    while let Some(mut batch) = rx.recv().await {
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        if let Err(e) = store.record_done(&batch).await {
            tracing::warn!(error = %e, records = batch.len(), "recording handled events for keep_done failed; `outrun events show` will not find these (the events themselves are handled)");
        }
    }
}

/// The records of `committed` events among `records` (all of them, in the
/// common case where every event of the batch committed).
pub fn of_committed(
    records: impl Iterator<Item = (Uuid, Attempt)>,
    committed: &[Uuid],
    batch_len: usize,
) -> Committed {
    if committed.len() == batch_len {
        return records.collect();
    }
    let committed: std::collections::HashSet<&Uuid> = committed.iter().collect();
    records.filter(|(id, _)| committed.contains(id)).collect()
}
