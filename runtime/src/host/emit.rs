//! `outrun:handler/emit`: follow-up events, buffered in the attempt's
//! [`Effects`](crate::handler::Effects) and inserted by the ack transaction,
//! so they exist exactly when the current event succeeded.

use std::time::Duration;

use super::bindings::outrun::handler::emit::{EmitOptions, Host};
use super::{CapError, HostState};
use crate::event::{InvalidEvent, NewEvent};

impl Host for HostState {
    async fn emit(
        &mut self,
        name: String,
        payload: String,
        options: EmitOptions,
    ) -> Result<(), CapError> {
        let any = self.caps.harness.as_ref().is_some_and(|h| h.emit_any);
        if !any && !self.caps.emit.contains(&name) {
            return Err(self.caps.deny(
                &self.event_id,
                &format!("emit of event {name:?}"),
                &format!("{name:?} to emit"),
            ));
        }
        let max_retry = match options.max_retry {
            Some(m) => Some(
                i32::try_from(m)
                    .map_err(|_| CapError::Invalid(format!("max-retry {m} is too large")))?,
            ),
            // Fixed now rather than at ack time so the buffered event says
            // exactly what will be inserted.
            None => Some(self.caps.default_max_retry),
        };
        let event = NewEvent {
            name,
            payload,
            group_id: options.group_id,
            delay: options.delay_ms.map(Duration::from_millis),
            expires_in: options.expires_in_ms.map(Duration::from_millis),
            max_retry,
            idempotency_key: options.idempotency_key,
            // Effects gives it the attempt's context when it is traced.
            traceparent: None,
        };
        // The contract is checked now, so the handler sees the violation
        // (and can say what it was) rather than its event failing at ack.
        self.effects
            .emit_checked(event, self.caps.schemas.as_deref())
            .map_err(|e: InvalidEvent| CapError::Invalid(e.to_string()))
    }
}
