//! The event as the outbox stores it, and a new event as callers describe it.
//! Validation of caller input lives here so every entry point (Rust API, CLI,
//! HTTP, `emit` from a handler) rejects the same bad input the same way.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest event name and group id: the columns are `VARCHAR(100)`.
pub const MAX_NAME_LEN: usize = 100;
/// Payloads larger than this are refused at enqueue: an outbox row is a
/// message, not a blob store.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Largest `max_retry`: the column is a SMALLINT on PostgreSQL.
pub const MAX_RETRY_LIMIT: i32 = i16::MAX as i32;

/// Longest delay or expiry an event may be given: 100 years (of 365 days).
/// Anything longer is a typo, and would overflow the timestamp columns.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Why an event could not be enqueued. Nothing is written in any of these cases.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidEvent {
    #[error("event name is empty; give the event a name (at most {MAX_NAME_LEN} characters)")]
    EmptyName,
    #[error("event name is {0} characters long; the limit is {MAX_NAME_LEN}")]
    NameTooLong(usize),
    #[error("group id is {0} characters long; the limit is {MAX_NAME_LEN}")]
    GroupTooLong(usize),
    #[error("payload is not valid JSON: {0}")]
    PayloadNotJson(String),
    #[error("payload is {0} bytes; the limit is {MAX_PAYLOAD_BYTES}")]
    PayloadTooLarge(usize),
    #[error("max_retry must be between 1 and {MAX_RETRY_LIMIT} (got {0})")]
    MaxRetry(i64),
    #[error("idempotency key is empty; omit it or give a non-empty key")]
    EmptyKey,
    #[error(
        "{what} {} is longer than the limit of 100 years; give a shorter duration",
        human(.duration)
    )]
    DurationTooLong {
        what: &'static str,
        duration: Duration,
    },
    #[error(
        "the event would expire (expires_in {}) before it may run (delay {}), so it could never run; \
         make expires_in longer than the delay",
        human(.expires_in),
        human(.delay)
    )]
    ExpiresBeforeRun {
        delay: Duration,
        expires_in: Duration,
    },
    /// The payload breaks the event's contract (see [`crate::schema`]).
    /// Boxed: the violation's text is large, and every enqueue result
    /// carries this type.
    #[error(transparent)]
    Schema(Box<crate::schema::Violation>),
    /// Refused at enqueue so the producer hears of it; a row written by
    /// plain SQL with a bad value still runs (the value is ignored).
    #[error(
        "traceparent {value:?} is not a W3C trace context ({reason}); give \
         VERSION-TRACEID-PARENTID-FLAGS, e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01, or none"
    )]
    TraceParent { value: String, reason: &'static str },
}

impl From<crate::schema::Violation> for InvalidEvent {
    fn from(v: crate::schema::Violation) -> Self {
        InvalidEvent::Schema(Box::new(v))
    }
}

fn human(d: &Duration) -> humantime::FormattedDuration {
    humantime::format_duration(*d)
}

/// An event to enqueue as it arrives over the wire (`POST /v1/events`, a
/// line of `outrun enqueue --ndjson`): the payload is any JSON value, kept
/// byte for byte; durations are humantime strings (`"5s"`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    /// 1 to 100 characters.
    pub name: String,
    /// Any JSON value, at most 1 MiB, stored byte for byte.
    #[schema(value_type = serde_json::Value)]
    pub payload: Box<serde_json::value::RawValue>,
    pub group_id: Option<String>,
    /// Run no earlier than this from now, e.g. `5s`, `1h`.
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>)]
    pub delay: Option<Duration>,
    /// Dead (`expired`) if not handled within this, e.g. `1d`.
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>)]
    pub expires_in: Option<Duration>,
    pub max_retry: Option<i32>,
    pub idempotency_key: Option<String>,
    /// The producer's W3C trace context (`00-<trace id>-<span id>-<flags>`);
    /// with `[otel]` the event's attempts are spans of that trace.
    pub traceparent: Option<String>,
}

impl From<EventRequest> for NewEvent {
    fn from(r: EventRequest) -> Self {
        NewEvent {
            name: r.name,
            payload: r.payload.get().to_string(),
            group_id: r.group_id,
            delay: r.delay,
            expires_in: r.expires_in,
            max_retry: r.max_retry,
            idempotency_key: r.idempotency_key,
            traceparent: r.traceparent,
        }
    }
}

/// An event to enqueue. Build with [`NewEvent::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub name: String,
    /// JSON text, stored as given (not re-serialised).
    pub payload: String,
    pub group_id: Option<String>,
    /// Do not run before now + delay.
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// Dead with reason `expired` if not started within this time.
    #[serde(default, with = "humantime_serde")]
    pub expires_in: Option<Duration>,
    /// Failed attempts allowed; `None` takes the runtime's default.
    pub max_retry: Option<i32>,
    /// Same key as a live event → that event's id, no second row.
    pub idempotency_key: Option<String>,
    /// The producer's W3C trace context (see [`crate::otel`]).
    #[serde(default)]
    pub traceparent: Option<String>,
}

impl NewEvent {
    pub fn new(name: impl Into<String>, payload: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            payload: payload.into(),
            group_id: None,
            delay: None,
            expires_in: None,
            max_retry: None,
            idempotency_key: None,
            traceparent: None,
        }
    }

    /// Serialise `payload` with serde_json.
    pub fn json<T: Serialize>(name: impl Into<String>, payload: &T) -> Result<Self, InvalidEvent> {
        let text = serde_json::to_string(payload)
            .map_err(|e| InvalidEvent::PayloadNotJson(e.to_string()))?;
        Ok(Self::new(name, text))
    }

    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group_id = Some(group.into());
        self
    }
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
    pub fn with_expires_in(mut self, ttl: Duration) -> Self {
        self.expires_in = Some(ttl);
        self
    }
    pub fn with_max_retry(mut self, max_retry: i32) -> Self {
        self.max_retry = Some(max_retry);
        self
    }
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
    /// The producer's trace context, a W3C `traceparent` header value.
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Check everything the database would otherwise reject (or silently
    /// accept): called by every enqueue path before any SQL runs.
    pub fn validate(&self) -> Result<(), InvalidEvent> {
        validate_name(&self.name)?;
        if let Some(g) = &self.group_id {
            let n = g.chars().count();
            if n > MAX_NAME_LEN {
                return Err(InvalidEvent::GroupTooLong(n));
            }
        }
        if self.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(InvalidEvent::PayloadTooLarge(self.payload.len()));
        }
        // IgnoredAny checks syntax without building a tree.
        serde_json::from_str::<serde::de::IgnoredAny>(&self.payload)
            .map_err(|e| InvalidEvent::PayloadNotJson(e.to_string()))?;
        if let Some(m) = self.max_retry
            && !(1..=MAX_RETRY_LIMIT).contains(&m)
        {
            return Err(InvalidEvent::MaxRetry(m.into()));
        }
        if self.idempotency_key.as_deref() == Some("") {
            return Err(InvalidEvent::EmptyKey);
        }
        if let Some(tp) = &self.traceparent
            && let Err(reason) = crate::otel::TraceParent::parse(tp)
        {
            return Err(InvalidEvent::TraceParent {
                value: tp.chars().take(80).collect(),
                reason,
            });
        }
        for (what, d) in [("delay", self.delay), ("expires_in", self.expires_in)] {
            if let Some(duration) = d
                && duration > MAX_DURATION
            {
                return Err(InvalidEvent::DurationTooLong { what, duration });
            }
        }
        // Not startable before now + delay, dead at now + expires_in: an
        // expiry at or before the start means the event can never run.
        if let Some(expires_in) = self.expires_in {
            let delay = self.delay.unwrap_or_default();
            if expires_in <= delay {
                return Err(InvalidEvent::ExpiresBeforeRun { delay, expires_in });
            }
        }
        Ok(())
    }
}

pub fn validate_name(name: &str) -> Result<(), InvalidEvent> {
    let n = name.chars().count();
    if name.trim().is_empty() {
        return Err(InvalidEvent::EmptyName);
    }
    if n > MAX_NAME_LEN {
        return Err(InvalidEvent::NameTooLong(n));
    }
    Ok(())
}

/// A row of `outbox_events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: Uuid,
    pub name: String,
    pub payload: String,
    pub group_id: Option<String>,
    /// Failed attempts so far.
    pub retry: i32,
    pub max_retry: i32,
    pub create_date: DateTime<Utc>,
    pub available_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub locked_by: Option<String>,
    pub locked_until: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub idempotency_key: Option<String>,
    /// When the event became dead (retries exhausted, rejected, no handler,
    /// expired, cancelled); `None` while it is live, and for events that
    /// died before outrun recorded it.
    pub dead_at: Option<DateTime<Utc>>,
    /// Times its handler answered `retry-after` (deferrals spend no retry).
    pub deferrals: i32,
    /// The producer's W3C trace context, as stored (not checked: a bad
    /// value is ignored when the event runs).
    #[serde(default)]
    pub traceparent: Option<String>,
}

impl Event {
    /// Dead exactly when `retry >= max_retry` (the seed's definition).
    pub fn is_dead(&self) -> bool {
        self.retry >= self.max_retry
    }
    /// 1-based number of the attempt a handler is running now.
    pub fn attempt(&self) -> i32 {
        self.retry + 1
    }
}

/// An event claimed by one runtime: it holds the lease while `token` is the
/// row's `lock_token`. Ack, fail and extend only act when the token still
/// matches, so a worker whose lease expired cannot touch an event another
/// worker now owns.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub event: Event,
    pub token: Uuid,
    /// The row's place in insertion order (PostgreSQL's `seq`, SQLite's
    /// rowid): lets the store find the row without a lookup by id.
    pub seq: i64,
}

impl Claimed {
    pub fn lease(&self) -> Lease {
        Lease {
            id: self.event.id,
            token: self.token,
            seq: self.seq,
        }
    }
}

/// What ack/fail/extend/release act on: the event, the fencing token its
/// claim set, and the row's `seq` (see [`Claimed::seq`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub id: Uuid,
    pub token: Uuid,
    pub seq: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            NewEvent::new("", "{}").validate(),
            Err(InvalidEvent::EmptyName)
        );
        assert_eq!(
            NewEvent::new("x".repeat(101), "{}").validate(),
            Err(InvalidEvent::NameTooLong(101))
        );
        assert!(NewEvent::new("x".repeat(100), "{}").validate().is_ok());
        assert!(matches!(
            NewEvent::new("a", "{not json").validate(),
            Err(InvalidEvent::PayloadNotJson(_))
        ));
        assert!(matches!(
            NewEvent::new("a", "").validate(),
            Err(InvalidEvent::PayloadNotJson(_))
        ));
        assert_eq!(
            NewEvent::new("a", "1").with_max_retry(0).validate(),
            Err(InvalidEvent::MaxRetry(0))
        );
        assert_eq!(
            NewEvent::new("a", "1").with_max_retry(40_000).validate(),
            Err(InvalidEvent::MaxRetry(40_000))
        );
        assert!(
            NewEvent::new("a", "1")
                .with_max_retry(MAX_RETRY_LIMIT)
                .validate()
                .is_ok()
        );
        assert_eq!(
            NewEvent::new("a", "1").with_key("").validate(),
            Err(InvalidEvent::EmptyKey)
        );
        let big = format!("\"{}\"", "x".repeat(MAX_PAYLOAD_BYTES));
        assert!(matches!(
            NewEvent::new("a", big).validate(),
            Err(InvalidEvent::PayloadTooLarge(_))
        ));
        assert!(matches!(
            NewEvent::new("a", "{}")
                .with_group("g".repeat(101))
                .validate(),
            Err(InvalidEvent::GroupTooLong(101))
        ));
    }

    #[test]
    fn traceparent_is_checked_at_enqueue() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(
            NewEvent::new("a", "{}")
                .with_traceparent(good)
                .validate()
                .is_ok()
        );
        let err = NewEvent::new("a", "{}")
            .with_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01")
            .validate()
            .unwrap_err();
        assert!(matches!(err, InvalidEvent::TraceParent { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("4BF92F") && text.contains("lowercase"),
            "{text}"
        );
        // Over the wire (POST /v1/events, NDJSON) the field carries through.
        let req: EventRequest = serde_json::from_str(&format!(
            r#"{{"name":"a","payload":{{}},"traceparent":"{good}"}}"#
        ))
        .unwrap();
        assert_eq!(NewEvent::from(req).traceparent.as_deref(), Some(good));
    }

    #[test]
    fn rejects_events_that_cannot_run_and_absurd_durations() {
        let s = Duration::from_secs;
        let ev = NewEvent::new("a", "{}")
            .with_delay(s(3))
            .with_expires_in(s(1));
        let err = ev.validate().unwrap_err();
        assert_eq!(
            err,
            InvalidEvent::ExpiresBeforeRun {
                delay: s(3),
                expires_in: s(1)
            }
        );
        assert!(err.to_string().contains("could never run"), "{err}");
        assert!(
            NewEvent::new("a", "{}")
                .with_delay(s(3))
                .with_expires_in(s(3))
                .validate()
                .is_err()
        );
        assert!(
            NewEvent::new("a", "{}")
                .with_expires_in(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            NewEvent::new("a", "{}")
                .with_delay(s(3))
                .with_expires_in(s(4))
                .validate()
                .is_ok()
        );
        let err = NewEvent::new("a", "{}")
            .with_delay(s(100_000_000_000 * 86_400))
            .validate()
            .unwrap_err();
        assert!(
            matches!(err, InvalidEvent::DurationTooLong { what: "delay", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("100 years"), "{err}");
        assert!(
            NewEvent::new("a", "{}")
                .with_expires_in(MAX_DURATION)
                .validate()
                .is_ok()
        );
    }
}
