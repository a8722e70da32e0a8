//! The leases this runtime holds, from claim until the event is acked,
//! failed or released; and the one task that keeps them alive.
//!
//! Extending every lease in one statement per tick (rather than a heartbeat
//! per handler) keeps the database cost independent of concurrency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::event::Lease;
use crate::store::Store;

#[derive(Default, Clone)]
pub struct Inflight {
    leases: Arc<Mutex<HashMap<Uuid, Lease>>>,
}

impl Inflight {
    pub fn insert(&self, lease: Lease) {
        self.leases
            .lock()
            .expect("inflight lock")
            .insert(lease.id, lease);
    }
    pub fn remove(&self, id: &Uuid) {
        self.leases.lock().expect("inflight lock").remove(id);
    }
    pub fn remove_all(&self, ids: &[Uuid]) {
        let mut l = self.leases.lock().expect("inflight lock");
        for id in ids {
            l.remove(id);
        }
    }
    /// How many of `leases` are still held.
    pub fn count_of(&self, leases: &[Lease]) -> usize {
        let l = self.leases.lock().expect("inflight lock");
        leases.iter().filter(|x| l.contains_key(&x.id)).count()
    }

    pub fn snapshot(&self) -> Vec<Lease> {
        self.leases
            .lock()
            .expect("inflight lock")
            .values()
            .copied()
            .collect()
    }
    pub fn len(&self) -> usize {
        self.leases.lock().expect("inflight lock").len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Extend all held leases every third of the lease duration until `stop`.
pub async fn extend_leases(
    store: Store,
    inflight: Inflight,
    lease: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held = inflight.snapshot();
        if held.is_empty() {
            continue;
        }
        match store.extend(&held, lease).await {
            Ok(n) if (n as usize) < held.len() => {
                // Rows acked or failed while the UPDATE ran are gone, not
                // lost: only leases still held afterwards and not extended
                // were taken over by another runtime (a stall longer than
                // the lease), and their acks will be no-ops.
                let still = inflight.count_of(&held);
                if (n as usize) < still {
                    tracing::warn!(
                        held = still,
                        extended = n,
                        "some leases were lost before they could be extended"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "extending leases failed; will retry next tick"),
        }
    }
}
