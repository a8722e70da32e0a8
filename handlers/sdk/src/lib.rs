//! The guest side of outrun: everything a handler crate needs to turn a plain
//! Rust function into a WebAssembly component that targets the `handler` world
//! of `wit/handler.wit`.
//!
//! ```ignore
//! use outrun_sdk::{Event, HandlerError, Outcome};
//!
//! fn handle(ev: Event) -> Result<Outcome, HandlerError> {
//!     let order: Order = ev.json()?;
//!     outrun_sdk::sql::execute("INSERT INTO seen (id) VALUES ($1)", &[order.id.into()])?;
//!     Ok(Outcome::Done)
//! }
//! outrun_sdk::export_handler!(handle);
//! ```
//!
//! One module per capability (`emit`, `sql`, `kv`, `publish`, `http`, `log`,
//! `config`), each a thin typed layer over the generated imports; `id` makes
//! the deterministic message ids publishing needs. A capability the
//! handler's config does not grant fails with [`CapError::Denied`]; `?` turns
//! capability errors into a [`HandlerError`] with the right retry semantics.
//!
//! Off wasm32 the crate still compiles (wit-bindgen emits native stubs that
//! panic when called), so handler crates can unit-test their pure logic with a
//! plain `cargo test`.

pub mod config;
pub mod emit;
mod event;
pub mod http;
pub mod id;
pub mod kv;
pub mod log;
pub mod publish;
pub mod sql;

pub use event::Event;

use std::fmt;
use std::time::Duration;

/// Bindings generated from `wit/handler.wit`. Public only so that
/// [`export_handler!`] can reach them from the handler crate; use the typed
/// modules of this crate instead.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // generated ABI glue for `handle(event)`
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "outrun_sdk::bindings",
        generate_all,
    });
}

use bindings::outrun::handler::types as wit;

/// What a handler reports when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event is handled: its row is deleted and this attempt's `sql`
    /// writes and emitted events are committed in one transaction.
    Done,
    /// Not now: run the event again after this long without spending a retry.
    /// This attempt's writes and emits are discarded. The runtime bounds the
    /// delay by the event's expiry; sub-millisecond parts are rounded down.
    RetryAfter(Duration),
}

/// A failed attempt. This attempt's writes and emits are discarded.
///
/// `retry` errors count an attempt and back off (the event is dead once its
/// attempts are spent); `reject` errors make the event dead at once, for input
/// that can never succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    message: String,
    retryable: bool,
}

impl HandlerError {
    /// A transient failure (a service down, a timeout): try again later.
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A permanent failure (malformed payload, a request the other side
    /// refuses): the event goes dead at once and waits for an operator.
    pub fn reject(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }

    /// The message recorded as the event's `last_error`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the runtime will try the event again.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Prefix the message with what the handler was doing, keeping the retry
    /// semantics: `sql::execute(..).map_err(|e| HandlerError::from(e).context("insert order"))`.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable {
            "retryable"
        } else {
            "rejected"
        };
        write!(f, "{} ({kind})", self.message)
    }
}

impl std::error::Error for HandlerError {}

/// Why a capability call failed, as reported by the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    /// The handler's config does not grant this capability (or this event
    /// name, key, host). The message says what to add to the config.
    #[error("capability denied: {0}")]
    Denied(String),
    /// The arguments were rejected (payload not JSON, bad SQL, ...).
    #[error("invalid capability call: {0}")]
    Invalid(String),
    /// The resource failed (database, Redis, ...); usually worth a retry.
    #[error("resource unavailable: {0}")]
    Unavailable(String),
}

impl From<wit::CapError> for CapError {
    fn from(e: wit::CapError) -> Self {
        match e {
            wit::CapError::Denied(m) => CapError::Denied(m),
            wit::CapError::Invalid(m) => CapError::Invalid(m),
            wit::CapError::Unavailable(m) => CapError::Unavailable(m),
        }
    }
}

/// Denied and invalid calls cannot succeed on a retry (the config or the
/// handler must change), so they reject; an unavailable resource retries.
impl From<CapError> for HandlerError {
    fn from(e: CapError) -> Self {
        match &e {
            CapError::Denied(_) | CapError::Invalid(_) => HandlerError::reject(e.to_string()),
            CapError::Unavailable(_) => HandlerError::retry(e.to_string()),
        }
    }
}

/// Milliseconds in `d`, saturating: WIT carries durations as `u64` ms.
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Run `handler` on a raw event and convert the result for the host. Called by
/// the code [`export_handler!`] expands to; not part of the public API.
#[doc(hidden)]
pub fn __run(
    handler: fn(Event) -> Result<Outcome, HandlerError>,
    event: wit::Event,
) -> Result<wit::Outcome, wit::HandlerError> {
    match handler(Event::from(event)) {
        Ok(Outcome::Done) => Ok(wit::Outcome::Done),
        Ok(Outcome::RetryAfter(d)) => Ok(wit::Outcome::RetryAfter(duration_ms(d))),
        Err(e) => Err(wit::HandlerError {
            message: e.message,
            retryable: e.retryable,
        }),
    }
}

/// Export `fn(Event) -> Result<Outcome, HandlerError>` as the component's
/// `handle` function. Use it once, at the top level of a `cdylib` crate.
#[macro_export]
macro_rules! export_handler {
    ($handler:path) => {
        #[doc(hidden)]
        struct __OutrunHandler;

        impl $crate::bindings::Guest for __OutrunHandler {
            fn handle(
                event: $crate::bindings::Event,
            ) -> ::core::result::Result<$crate::bindings::Outcome, $crate::bindings::HandlerError>
            {
                $crate::__run($handler, event)
            }
        }

        $crate::bindings::export!(__OutrunHandler with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_errors_map_to_retry_semantics() {
        let denied: HandlerError = CapError::Denied("grant emit `x`".into()).into();
        assert!(!denied.is_retryable());
        assert!(denied.message().contains("grant emit `x`"));
        let invalid: HandlerError = CapError::Invalid("payload is not JSON".into()).into();
        assert!(!invalid.is_retryable());
        let down: HandlerError = CapError::Unavailable("database closed".into()).into();
        assert!(down.is_retryable());
    }

    #[test]
    fn context_keeps_retryability() {
        let e = HandlerError::retry("timeout").context("POST /check");
        assert_eq!(e.message(), "POST /check: timeout");
        assert!(e.is_retryable());
    }

    #[test]
    fn duration_ms_saturates() {
        assert_eq!(duration_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(duration_ms(Duration::MAX), u64::MAX);
    }
}
