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
    leases: Arc<Mutex<HashMap<Uuid, Held>>>,
}

#[derive(Clone, Copy)]
struct Held {
    lease: Lease,
    /// Its row is deleted in a lane's open transaction (see
    /// `committer.rs`): the row lock holds it now, and the extender, which
    /// skips locked rows, must not count it as lost.
    in_lane: bool,
}

impl Inflight {
    pub fn insert(&self, lease: Lease) {
        self.leases.lock().expect("inflight lock").insert(
            lease.id,
            Held {
                lease,
                in_lane: false,
            },
        );
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
    /// Mark whether the event's row is held by a lane's transaction.
    pub fn set_in_lane(&self, id: &Uuid, in_lane: bool) {
        if let Some(h) = self.leases.lock().expect("inflight lock").get_mut(id) {
            h.in_lane = in_lane;
        }
    }
    /// How many of `leases` are still held and need extending.
    pub fn count_of(&self, leases: &[Lease]) -> usize {
        let l = self.leases.lock().expect("inflight lock");
        leases
            .iter()
            .filter(|x| l.get(&x.id).is_some_and(|h| !h.in_lane))
            .count()
    }

    /// Every lease held, for release at shutdown.
    pub fn snapshot(&self) -> Vec<Lease> {
        self.leases
            .lock()
            .expect("inflight lock")
            .values()
            .map(|h| h.lease)
            .collect()
    }
    /// The leases to extend: held, and not in a lane.
    pub fn extendable(&self) -> Vec<Lease> {
        self.leases
            .lock()
            .expect("inflight lock")
            .values()
            .filter(|h| !h.in_lane)
            .map(|h| h.lease)
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
        let held = inflight.extendable();
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
