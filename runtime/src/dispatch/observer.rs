//! An optional hook into the dispatch loop for measuring it from outside
//! (`outrun bench` uses it for latency percentiles). Both callbacks run on
//! the dispatch path, so an implementation must be cheap and must not block.

use uuid::Uuid;

use crate::event::Event;

/// Told when a handler starts on an event and when events are acked.
pub trait DispatchObserver: Send + Sync + 'static {
    /// A worker is about to call the event's handler (after route lookup and
    /// any concurrency permit).
    fn on_started(&self, _event: &Event) {}
    /// These events' acks committed (the rows are gone): one call per
    /// batched DELETE, or one id for a handler that committed effects.
    fn on_acked(&self, _ids: &[Uuid]) {}
}
