//! What the dispatch loop calls: the [`Handler`] trait, its result types, and
//! [`Effects`], the handler's view of the ack transaction. The WASM host
//! (`crate::wasm`) implements `Handler`; tests implement it natively.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::event::{Event, InvalidEvent, NewEvent};
use crate::store::{AckTx, Store, StoreError};

/// A handler's verdict on one event when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Delete the event; commit the handler's writes and emitted events.
    Done,
    /// Run again after this delay without spending a retry; writes and
    /// emits of this attempt are discarded. Bounded by the event's expiry.
    RetryAfter(Duration),
}

/// A failed attempt. Writes and emits of the attempt are discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    /// `true`: count a retry and back off. `false`: dead at once.
    pub retryable: bool,
}

impl HandlerError {
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }
    pub fn reject(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handle one event. Database writes go through `effects.tx()` and
    /// follow-up events through `effects.emit()`; both are committed with the
    /// ack, or not at all.
    async fn handle(&self, event: &Event, effects: &mut Effects) -> Result<Outcome, HandlerError>;

    /// The version that runs (a WASM component's blake3, hex): the
    /// attempt history stores it, the attempt's span shows its first 12
    /// characters (as the logs do); `None` for handlers without one.
    fn version(&self) -> Option<Arc<str>> {
        None
    }
}

/// Where an event name goes: the handler, and the limits of its binding.
#[derive(Clone)]
pub struct Route {
    /// The handler's name (the config's `[[handler]] name`), for logs and
    /// metrics; several event names may share it.
    pub handler_name: Arc<str>,
    pub handler: Arc<dyn Handler>,
    /// Per-handler concurrency cap, shared by all its event names and kept
    /// across hot reloads.
    pub permits: Option<Arc<Semaphore>>,
    /// Wall-clock budget of one attempt; exceeding it is a retryable failure.
    pub timeout: Option<Duration>,
    /// Overrides the event's `max_retry` when the event fails.
    pub max_retry: Option<i32>,
}

/// Maps event names to handlers. Implemented by the WASM registry (which hot
/// reloads) and by a fixed map for embedding and tests.
pub trait Router: Send + Sync + 'static {
    fn route(&self, name: &str) -> Option<Route>;
    /// Event names whose handler has no free permit: the claimer leaves them
    /// in the table so a slow handler cannot fill every worker slot.
    fn saturated(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A fixed name → route map.
#[derive(Default, Clone)]
pub struct StaticRouter {
    routes: std::collections::HashMap<String, Route>,
}

impl StaticRouter {
    pub fn new() -> Self {
        Self::default()
    }
    /// Bind `event_name` to `handler`, with no limits.
    pub fn with(mut self, event_name: &str, handler: impl Handler) -> Self {
        let route = Route {
            handler_name: Arc::from(event_name),
            handler: Arc::new(handler),
            permits: None,
            timeout: None,
            max_retry: None,
        };
        self.routes.insert(event_name.to_string(), route);
        self
    }
    pub fn with_route(mut self, event_name: &str, route: Route) -> Self {
        self.routes.insert(event_name.to_string(), route);
        self
    }
}

impl Router for StaticRouter {
    fn route(&self, name: &str) -> Option<Route> {
        self.routes.get(name).cloned()
    }
    fn saturated(&self) -> Vec<String> {
        self.routes
            .iter()
            .filter(|(_, r)| {
                r.permits
                    .as_ref()
                    .is_some_and(|p| p.available_permits() == 0)
            })
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Where the dispatcher keeps the effects of events that succeed: lanes
/// whose transactions it commits many events at a time (see
/// `crate::store::lane`). Implemented by the dispatcher; a trait so this
/// module does not reach into it.
#[async_trait::async_trait]
pub trait EffectsLanes: Send + Sync + 'static {
    /// A lane for the attempt's effects, for an event of `handler`: its
    /// statements run there, inside a savepoint of its own unless the
    /// dispatcher bets on its success (the lane fences the event's lease
    /// when it commits).
    async fn enter(&self, handler: &Arc<str>) -> Result<AckTx, StoreError>;
}

enum Source {
    None,
    /// A transaction of its own, committed by whoever holds the effects
    /// (embedding, tests).
    Store(Store),
    /// A lane of the dispatcher, for an event of the named handler.
    Lanes(Arc<dyn EffectsLanes>, Arc<str>),
}

/// The side effects of one attempt, committed with its ack or not at all.
///
/// The transaction is opened lazily on the first `tx()` call so a handler
/// that never touches SQL holds no connection (and on SQLite, no lock) while
/// it runs; emitted events are buffered and inserted at ack time.
pub struct Effects {
    source: Source,
    tx: Option<AckTx>,
    emitted: Vec<NewEvent>,
    transient: bool,
    /// The attempt's trace context (`traceparent`) when `[otel]` traces it:
    /// emitted events without one of their own carry it.
    trace: Option<Arc<str>>,
}

impl Default for Effects {
    fn default() -> Self {
        Self {
            source: Source::None,
            tx: None,
            emitted: Vec::new(),
            transient: false,
            trace: None,
        }
    }
}

impl Effects {
    /// Effects in a transaction of their own on `store`; the caller commits
    /// them with [`AckTx::commit_ack`] (see [`Effects::into_parts`]).
    pub fn new(store: Store) -> Self {
        Self {
            source: Source::Store(store),
            ..Self::default()
        }
    }

    /// Effects kept in the dispatcher's lanes, for an event of `handler`.
    pub fn in_lanes(lanes: Arc<dyn EffectsLanes>, handler: Arc<str>) -> Self {
        Self {
            source: Source::Lanes(lanes, handler),
            ..Self::default()
        }
    }

    /// Run inside the trace context `traceparent` (the attempt's span).
    pub fn with_trace(mut self, traceparent: Arc<str>) -> Self {
        self.trace = Some(traceparent);
        self
    }

    /// The attempt's trace context, if it is traced.
    pub fn trace(&self) -> Option<&Arc<str>> {
        self.trace.as_ref()
    }

    /// The ack transaction, opened on first use.
    pub async fn tx(&mut self) -> Result<&mut AckTx, StoreError> {
        if self.tx.is_none() {
            let opened = match &self.source {
                Source::None => Err(StoreError::NoStore),
                Source::Store(store) => store.begin().await,
                Source::Lanes(lanes, handler) => lanes.enter(handler).await,
            };
            match opened {
                Ok(tx) => self.tx = Some(tx),
                Err(e) => {
                    self.transient |= e.is_transient();
                    return Err(e);
                }
            }
        }
        Ok(self.tx.as_mut().expect("just opened"))
    }

    /// Buffer a follow-up event; validated now so the handler sees the error.
    pub fn emit(&mut self, event: NewEvent) -> Result<(), InvalidEvent> {
        self.emit_checked(event, None)
    }

    /// [`Effects::emit`], also checking the payload against its schema
    /// (`[schemas]`), so the handler sees a violation at its `emit` call.
    pub fn emit_checked(
        &mut self,
        mut event: NewEvent,
        schemas: Option<&crate::schema::Schemas>,
    ) -> Result<(), InvalidEvent> {
        if event.traceparent.is_none()
            && let Some(t) = &self.trace
        {
            event.traceparent = Some(t.to_string());
        }
        event.validate()?;
        if let Some(schemas) = schemas {
            schemas.check(&event.name, &event.payload)?;
        }
        self.emitted.push(event);
        Ok(())
    }

    /// True when the attempt wrote nothing: its ack can join a batch.
    pub fn is_empty(&self) -> bool {
        self.tx.is_none() && self.emitted.is_empty()
    }

    /// The attempt hit a transient database error (a dropped connection, a
    /// deadlock, a serialization failure, a busy database): if it failed, it
    /// was not the event's fault.
    pub fn saw_transient(&self) -> bool {
        self.transient
            || match &self.tx {
                Some(AckTx::Lane(t)) => t.lane.saw_transient(),
                Some(AckTx::Shared(t)) => t.saw_transient(),
                Some(AckTx::Pipe(t)) => t.saw_transient(),
                _ => false,
            }
    }

    /// The attempt must run again whatever its handler decided: one of its
    /// statements failed in a lane transaction that can now only be rolled
    /// back whole (see `crate::store::lane`).
    pub fn must_rerun(&self) -> bool {
        match &self.tx {
            Some(AckTx::Lane(t)) => t.lane.must_rerun(),
            Some(AckTx::Shared(t)) => t.must_rerun(),
            Some(AckTx::Pipe(t)) => t.must_rerun(),
            _ => false,
        }
    }

    /// Take the transaction (if any) and the emitted events, for the ack.
    pub fn into_parts(self) -> (Option<AckTx>, Vec<NewEvent>) {
        (self.tx, self.emitted)
    }
}
