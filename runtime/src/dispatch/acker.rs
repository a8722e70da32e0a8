//! Batched acks for handlers that wrote nothing: one DELETE for every event
//! that finished since the last flush, instead of one per event.

use std::sync::Arc;

use tokio::sync::{Notify, mpsc};

use crate::event::Lease;
use crate::store::{Attempt, Store};

use super::DispatchObserver;
use super::inflight::Inflight;

/// Most leases in one DELETE.
const MAX_BATCH: usize = 512;

/// How long the first ack of a batch waits for company.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// A finished event waiting for its DELETE.
#[derive(Debug, Clone)]
pub struct Ack {
    pub lease: Lease,
    /// Its group's next event becomes claimable once this DELETE commits.
    pub grouped: bool,
    /// Its attempt's record, with `[runtime] keep_done`.
    pub done: Option<Box<Attempt>>,
}

/// Drain `rx` until every sender is gone, acking in batches. After a batch
/// that freed a group, `unblocked` wakes the claimer: the successor became
/// claimable only now, after the worker that handled the head had finished.
pub async fn run(
    store: Store,
    inflight: Inflight,
    mut rx: mpsc::UnboundedReceiver<Ack>,
    unblocked: Arc<Notify>,
    observer: Option<Arc<dyn DispatchObserver>>,
    done: Option<mpsc::UnboundedSender<super::done::Committed>>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut records = Vec::new();
    let mut grouped = false;
    let take = |a: Ack, batch: &mut Vec<Lease>, records: &mut Vec<(uuid::Uuid, Attempt)>| {
        if let Some(r) = a.done {
            records.push((a.lease.id, *r));
        }
        batch.push(a.lease);
        a.grouped
    };
    while let Some(first) = rx.recv().await {
        grouped |= take(first, &mut batch, &mut records);
        // Linger briefly for more: a DELETE costs about as much for one row
        // as for dozens, and at full speed acks arrive every few µs. Not
        // when a group's successor waits for this DELETE to become
        // claimable.
        // One timer per batch, not one per ack received.
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < MAX_BATCH && !grouped {
            tokio::select! {
                biased;
                next = rx.recv() => match next {
                    Some(a) => grouped |= take(a, &mut batch, &mut records),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(a) => grouped |= take(a, &mut batch, &mut records),
                Err(_) => break,
            }
        }
        let ids: Vec<_> = batch.iter().map(|l| l.id).collect();
        match store.ack(&batch).await {
            Ok(acked) => {
                if acked.len() < batch.len() {
                    tracing::warn!(
                        lost = batch.len() - acked.len(),
                        "events finished after they were cancelled or their lease was lost (another runtime may run them again)"
                    );
                }
                crate::timeline::events_acked(acked.len() as u64);
                if let Some(done) = &done
                    && !records.is_empty()
                {
                    let _ = done.send(super::done::of_committed(
                        records.drain(..),
                        &acked,
                        batch.len(),
                    ));
                }
                if let Some(o) = &observer {
                    o.on_acked(&acked);
                }
            }
            // The events stay leased until their lease runs out, then run
            // again: at-least-once, never lost.
            Err(e) => {
                tracing::error!(error = %e, events = batch.len(), "ack failed; these events will run again after their lease expires")
            }
        }
        inflight.remove_all(&ids);
        batch.clear();
        records.clear();
        if std::mem::take(&mut grouped) {
            unblocked.notify_one();
        }
    }
}
