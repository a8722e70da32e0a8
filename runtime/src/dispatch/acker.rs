//! Batched acks for handlers that wrote nothing: one DELETE for every event
//! that finished since the last flush, instead of one per event.

use tokio::sync::mpsc;

use crate::event::Lease;
use crate::store::Store;

use super::inflight::Inflight;

/// Most leases in one DELETE.
const MAX_BATCH: usize = 512;

/// Drain `rx` until every sender is gone, acking in batches.
pub async fn run(store: Store, inflight: Inflight, mut rx: mpsc::UnboundedReceiver<Lease>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let ids: Vec<_> = batch.iter().map(|l| l.id).collect();
        match store.ack(&batch).await {
            Ok(acked) => {
                if acked.len() < batch.len() {
                    tracing::warn!(
                        lost = batch.len() - acked.len(),
                        "events finished after their lease was lost; another runtime may run them again"
                    );
                }
                metrics::counter!("outrun_acks_total").increment(acked.len() as u64);
            }
            // The events stay leased until their lease runs out, then run
            // again: at-least-once, never lost.
            Err(e) => {
                tracing::error!(error = %e, events = batch.len(), "ack failed; these events will run again after their lease expires")
            }
        }
        inflight.remove_all(&ids);
        batch.clear();
    }
}
