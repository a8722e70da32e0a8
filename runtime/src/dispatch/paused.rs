//! The claimer's copy of `outrun_paused` (see [`crate::pause`]): re-read
//! at least once a second (one small query), so a pause made on any
//! instance holds on every instance within that. The ordinary claim
//! excludes these names and the limiter skips them; a resume rewinds the
//! claims and wakes the claimer, since the resumed events may sort before
//! where claims got to.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Longest time between two reads of `outrun_paused`.
pub const REFRESH_MAX: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Paused {
    names: ArcSwap<Vec<String>>,
    /// Told when a name left the set.
    pub resumed: Notify,
}

impl Paused {
    /// The names no claim may take now, sorted.
    pub fn names(&self) -> Arc<Vec<String>> {
        self.names.load_full()
    }

    /// Read the table once; a failed read keeps the last set (the claim
    /// would fail on the same database anyway).
    pub async fn refresh(&self, store: &Store) {
        match store.paused_names().await {
            Ok(now) => {
                let before = self.names.load();
                if **before == now {
                    return;
                }
                let resumed = before.iter().any(|n| !now.contains(n));
                if !now.is_empty() || !before.is_empty() {
                    tracing::info!(paused = %now.join(","), "paused event names changed");
                }
                self.names.store(Arc::new(now));
                if resumed {
                    store.rewind_claims();
                    self.resumed.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the paused event names failed; keeping the last ones")
            }
        }
    }
}

/// Refresh `paused` every `every` until `stop`.
pub async fn watch(store: Store, paused: Arc<Paused>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        paused.refresh(&store).await;
    }
}
