//! Follow-up events. They are inserted in the transaction that acknowledges
//! the current event, so they exist exactly when the current event succeeded.
//! The config grants `emit` per event name.

use std::time::Duration;

use serde::Serialize;

use crate::CapError;
use crate::bindings::outrun::handler::emit as wit;

/// Options of an emitted event; every field defaults to the runtime's choice.
///
/// ```ignore
/// EmitOptions::new().group_id("order:42").delay(Duration::from_secs(5))
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmitOptions {
    group_id: Option<String>,
    delay: Option<Duration>,
    expires_in: Option<Duration>,
    max_retry: Option<u32>,
    idempotency_key: Option<String>,
}

impl EmitOptions {
    /// No options: no group, run at once, never expire, default max retry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Run after the earlier live events of this group, one at a time.
    pub fn group_id(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = Some(group_id.into());
        self
    }

    /// Do not run before this long from now.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Dead (reason `expired`) if not started within this long.
    pub fn expires_in(mut self, expires_in: Duration) -> Self {
        self.expires_in = Some(expires_in);
        self
    }

    /// Failed attempts allowed before the event is dead.
    pub fn max_retry(mut self, max_retry: u32) -> Self {
        self.max_retry = Some(max_retry);
        self
    }

    /// While a live event has this key, emitting it again adds no second event.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    fn to_wit(&self) -> wit::EmitOptions {
        wit::EmitOptions {
            group_id: self.group_id.clone(),
            delay_ms: self.delay.map(crate::duration_ms),
            expires_in_ms: self.expires_in.map(crate::duration_ms),
            max_retry: self.max_retry,
            idempotency_key: self.idempotency_key.clone(),
        }
    }
}

/// Enqueue event `name` with `payload` serialised as JSON.
pub fn emit(name: &str, payload: &impl Serialize, options: &EmitOptions) -> Result<(), CapError> {
    let json = serde_json::to_string(payload).map_err(|e| {
        CapError::Invalid(format!(
            "payload of emitted event `{name}` cannot be serialised as JSON: {e}"
        ))
    })?;
    emit_raw(name, &json, options)
}

/// Enqueue event `name` with `payload` passed through as text. The host
/// checks it is JSON and answers [`CapError::Invalid`] if not.
pub fn emit_raw(name: &str, payload: &str, options: &EmitOptions) -> Result<(), CapError> {
    wit::emit(name, payload, &options.to_wit()).map_err(CapError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_fills_wit_options() {
        let o = EmitOptions::new()
            .group_id("draft:1")
            .delay(Duration::from_millis(1500))
            .expires_in(Duration::from_secs(60))
            .max_retry(7)
            .idempotency_key("k")
            .to_wit();
        assert_eq!(o.group_id.as_deref(), Some("draft:1"));
        assert_eq!(o.delay_ms, Some(1500));
        assert_eq!(o.expires_in_ms, Some(60_000));
        assert_eq!(o.max_retry, Some(7));
        assert_eq!(o.idempotency_key.as_deref(), Some("k"));
        let d = EmitOptions::new().to_wit();
        assert!(d.group_id.is_none() && d.delay_ms.is_none() && d.max_retry.is_none());
    }

    #[test]
    fn unserialisable_payload_is_invalid_before_reaching_host() {
        use std::collections::HashMap;
        let mut bad = HashMap::new();
        bad.insert((1, 2), "tuple keys are not JSON object keys");
        let err = emit("x", &bad, &EmitOptions::new()).unwrap_err();
        assert!(
            matches!(err, CapError::Invalid(ref m) if m.contains("`x`")),
            "{err}"
        );
    }
}
