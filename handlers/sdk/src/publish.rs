//! Messages to the runtime's broker (Kafka or NATS JetStream), granted per
//! topic. A call returns once the broker acknowledged every message, so what
//! a handler published before returning `Done` is stored before its event's
//! ack commits; `?` on a failure retries the event.
//!
//! At least once: when an attempt fails after publishing (or its commit
//! does), the event runs again and publishes again. Give every message an id
//! derived from what it is about ([`crate::id::uuid_v5`]), never from the
//! attempt, so consumers (and NATS JetStream, by `Nats-Msg-Id`) drop the
//! duplicates. And publish only once everything that can reject the event
//! has been checked: a rejection after a publish leaves the messages out
//! there with the event dead.
//!
//! ```ignore
//! let id = outrun_sdk::id::uuid_v5(&NAMESPACE, &[&order_id, "paid"]);
//! let msg = Message::json("orders", id, &body)?.key(&order_id);
//! outrun_sdk::publish::publish(&msg)?;
//! ```

use serde::Serialize;

use crate::CapError;
use crate::bindings::outrun::handler::publish as wit;

/// The header that carries a message's id; every message has one.
pub const MESSAGE_ID_HEADER: &str = "message-id";

/// One message: topic, optional key, headers (with the id), body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    topic: String,
    key: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Message {
    /// A message to `topic` with id `id` (the `message-id` header) and
    /// `body` as it is.
    pub fn new(topic: impl Into<String>, id: impl ToString, body: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: topic.into(),
            key: None,
            headers: vec![(MESSAGE_ID_HEADER.to_string(), id.to_string())],
            body: body.into(),
        }
    }

    /// A message whose body is `value` as JSON, with a
    /// `content-type: application/json` header.
    pub fn json(
        topic: impl Into<String>,
        id: impl ToString,
        value: &impl Serialize,
    ) -> Result<Self, CapError> {
        let topic = topic.into();
        let body = serde_json::to_vec(value).map_err(|e| {
            CapError::Invalid(format!(
                "message to topic `{topic}` cannot be serialised as JSON: {e}"
            ))
        })?;
        Ok(Self::new(topic, id, body).header("content-type", "application/json"))
    }

    /// The partition key: messages with one key keep their order.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The message id.
    pub fn id(&self) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == MESSAGE_ID_HEADER)
            .map_or("", |(_, v)| v)
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    fn to_wit(&self) -> wit::Message {
        wit::Message {
            topic: self.topic.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
            body: self.body.clone(),
        }
    }
}

/// Publish one message; returns once the broker acknowledged it.
pub fn publish(message: &Message) -> Result<(), CapError> {
    Ok(wit::publish(
        &message.topic,
        message.key.as_deref(),
        &message.headers,
        &message.body,
    )?)
}

/// Publish all `messages` with one wait for the broker; `Ok` once every one
/// is acknowledged. An error leaves some possibly stored: the retry sends
/// them again under the same ids. Nothing is sent if any topic is denied.
pub fn publish_all(messages: &[Message]) -> Result<(), CapError> {
    if messages.is_empty() {
        return Ok(());
    }
    let wit: Vec<wit::Message> = messages.iter().map(Message::to_wit).collect();
    Ok(wit::publish_batch(&wit)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder() {
        let m = Message::json("t", "id-1", &serde_json::json!({"a": 1}))
            .unwrap()
            .key("k")
            .header("x", "y");
        assert_eq!(m.id(), "id-1");
        assert_eq!(m.body(), br#"{"a":1}"#);
        let w = m.to_wit();
        assert_eq!(w.key.as_deref(), Some("k"));
        assert_eq!(w.headers[0], ("message-id".to_string(), "id-1".to_string()));
        assert!(
            w.headers
                .contains(&("content-type".into(), "application/json".into()))
        );
    }
}
