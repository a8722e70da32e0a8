//! The event a handler receives, with typed access to its payload and times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;

use crate::HandlerError;
use crate::bindings::outrun::handler::types as wit;

/// One outbox event, as delivered to a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// UUID (v7) of the event row.
    pub id: String,
    /// Event name; the config binds names to handlers.
    pub name: String,
    /// The payload as stored: JSON text.
    pub payload: String,
    /// Events of one group run one at a time, in insertion order.
    pub group_id: Option<String>,
    /// 1 on the first delivery; failed attempts so far + 1.
    pub attempt: u32,
    /// Attempts allowed before the event is dead.
    pub max_attempts: u32,
    /// When the event was enqueued, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// After this instant (ms since the Unix epoch) the event is no longer
    /// worth doing.
    pub expires_at_ms: Option<u64>,
}

impl From<wit::Event> for Event {
    fn from(e: wit::Event) -> Self {
        Self {
            id: e.id,
            name: e.name,
            payload: e.payload,
            group_id: e.group_id,
            attempt: e.attempt,
            max_attempts: e.max_attempts,
            created_at_ms: e.created_at,
            expires_at_ms: e.expires_at,
        }
    }
}

impl Event {
    /// Parse the payload into `T`. A payload that does not fit is the
    /// producer's bug, not a transient failure, so the error rejects the event
    /// (dead at once) and names the event and what did not parse.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(&self.payload).map_err(|e| {
            HandlerError::reject(format!(
                "payload of event `{}` ({}) does not match {}: {e}",
                self.name,
                self.id,
                short_type_name::<T>(),
            ))
        })
    }

    /// Parse a payload that must be a JSON object into `T`. serde's derived
    /// structs also accept a JSON array (fields by position), so
    /// `["t","a"]` would pass for `{"triggerId":"t","applicationId":"a"}`;
    /// producers that send an array have a bug worth hearing about.
    pub fn json_object<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        if !self.payload.trim_start().starts_with('{') {
            return Err(HandlerError::reject(format!(
                "payload of event `{}` ({}) must be a JSON object, got {}",
                self.name,
                self.id,
                preview(&self.payload),
            )));
        }
        self.json()
    }

    /// Whether the event's expiry has passed by the guest's wall clock.
    /// Events without an expiry never expire.
    pub fn is_expired(&self) -> bool {
        self.is_expired_at(now_ms())
    }

    /// [`Event::is_expired`] against a given instant (ms since the Unix epoch).
    pub fn is_expired_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    /// Time left before expiry, `None` without an expiry, zero once expired.
    pub fn time_left(&self) -> Option<Duration> {
        let now = now_ms();
        self.expires_at_ms
            .map(|at| Duration::from_millis(at.saturating_sub(now)))
    }

    /// Whether a retryable failure now would make the event dead.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

/// Wall-clock time in ms since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(crate::duration_ms)
        .unwrap_or(0)
}

/// `my_crate::module::Type` → `Type`: error messages name the expected shape
/// without the handler's module layout.
fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let head = full.split('<').next().unwrap_or(full);
    match head.rfind("::") {
        Some(i) => &full[i + 2..],
        None => full,
    }
}

/// The start of a payload for an error message.
fn preview(payload: &str) -> String {
    let mut p: String = payload.trim().chars().take(40).collect();
    if payload.trim().chars().count() > 40 {
        p.push('…');
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn event(payload: &str, expires_at_ms: Option<u64>) -> Event {
        Event {
            id: "0190-test".into(),
            name: "order.created".into(),
            payload: payload.into(),
            group_id: None,
            attempt: 1,
            max_attempts: 3,
            created_at_ms: 1_000,
            expires_at_ms,
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Order {
        id: String,
    }

    #[test]
    fn json_parses_payload() {
        let ev = event(r#"{"id":"o-1"}"#, None);
        assert_eq!(ev.json::<Order>().unwrap(), Order { id: "o-1".into() });
    }

    #[test]
    fn json_object_rejects_arrays_and_scalars() {
        // Plain `json` would take the array positionally.
        assert_eq!(
            event(r#"["o-1"]"#, None).json::<Order>().unwrap(),
            Order { id: "o-1".into() }
        );
        for bad in [r#"["o-1"]"#, r#""o-1""#, "42", "null"] {
            let err = event(bad, None).json_object::<Order>().unwrap_err();
            assert!(!err.is_retryable());
            assert!(
                err.message().contains("must be a JSON object"),
                "{}",
                err.message()
            );
        }
        assert_eq!(
            event(r#" {"id":"o-2"}"#, None)
                .json_object::<Order>()
                .unwrap(),
            Order { id: "o-2".into() }
        );
    }

    #[test]
    fn json_mismatch_rejects_naming_event_and_field() {
        let ev = event(r#"{"other":1}"#, None);
        let err = ev.json::<Order>().unwrap_err();
        assert!(!err.is_retryable());
        let msg = err.message();
        assert!(msg.contains("order.created"), "{msg}");
        assert!(msg.contains("0190-test"), "{msg}");
        assert!(msg.contains("Order"), "{msg}");
        assert!(msg.contains("missing field `id`"), "{msg}");
    }

    #[test]
    fn expiry_compares_against_clock() {
        let ev = event("{}", Some(5_000));
        assert!(!ev.is_expired_at(4_999));
        assert!(ev.is_expired_at(5_000));
        assert!(!event("{}", None).is_expired_at(u64::MAX));
        // A real clock is far past 5 s after the epoch.
        assert!(ev.is_expired());
        assert_eq!(ev.time_left(), Some(Duration::ZERO));
    }

    #[test]
    fn last_attempt() {
        let mut ev = event("{}", None);
        assert!(!ev.is_last_attempt());
        ev.attempt = 3;
        assert!(ev.is_last_attempt());
    }
}
