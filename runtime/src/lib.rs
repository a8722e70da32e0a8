//! outrun: a transactional-outbox runtime whose event handlers are
//! WebAssembly components.
//!
//! The data path reads top to bottom: an application enqueues ([`event`],
//! [`store`]) → the dispatch loop claims a batch ([`dispatch`]) → a
//! [`handler::Router`] picks the handler ([`wasm`] for components) → the
//! handler runs with its capabilities ([`host`]) → the ack commits the
//! handler's effects and deletes the event. [`maintenance`] runs the
//! background duties (expiry, dead-event cleanup); [`publish`] talks to the
//! message broker (the `publish` capability and `[[relay]]`); [`otel`]
//! traces attempts; [`admin`] serves metrics and the HTTP API; [`cli`] is the `outrun` binary.

pub mod admin;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod event;
pub mod handler;
pub mod host;
pub mod limits;
pub mod maintenance;
pub mod otel;
pub mod pause;
pub mod publish;
pub mod schedule;
pub mod schema;
pub mod shipped;
pub mod store;
pub mod timeline;
pub mod wasm;

pub use event::{Claimed, Event, InvalidEvent, Lease, NewEvent};
pub use handler::{Effects, Handler, HandlerError, Outcome, Route, Router, StaticRouter};
pub use schema::Schemas;
pub use store::{Backend, OutboxDatabase, Store, StoreError};

/// Enqueue `event` inside the caller's transaction or connection, on either
/// backend: `outrun::enqueue::<sqlx::Postgres>(&mut *tx, &event)`. Rolled back
/// with the caller's transaction. No schema is checked here (there is no
/// registry in reach): check first with [`Schemas::check`], or use
/// [`enqueue_checked`].
pub async fn enqueue<DB: OutboxDatabase>(
    conn: &mut DB::Connection,
    event: &NewEvent,
) -> Result<uuid::Uuid, StoreError> {
    DB::enqueue(conn, event).await
}

/// [`enqueue`] after checking the payload against its schema: a violation
/// is [`StoreError::Invalid`] and nothing is written.
pub async fn enqueue_checked<DB: OutboxDatabase>(
    conn: &mut DB::Connection,
    event: &NewEvent,
    schemas: &Schemas,
) -> Result<uuid::Uuid, StoreError> {
    schemas
        .check(&event.name, &event.payload)
        .map_err(InvalidEvent::from)?;
    DB::enqueue(conn, event).await
}
