//! `outrun:handler/publish`: messages to the runtime's broker
//! ([`crate::publish::Publisher`]), confined to the topics of
//! `allow.publish`. Every topic of a call is checked before anything is
//! produced, so a denied call publishes nothing. The call returns once the
//! broker acknowledged every message (see the interface's docs in
//! `wit/handler.wit` for the at-least-once contract).

use super::bindings::outrun::handler::publish::{Host, Message as WitMessage};
use super::{CapError, HostState};
use crate::publish::{Message, PublishError, topic_allowed};

impl HostState {
    async fn publish_messages(&mut self, messages: Vec<Message>) -> Result<(), CapError> {
        for m in &messages {
            if !topic_allowed(&self.caps.publish, &m.topic) {
                let publisher = self
                    .caps
                    .publisher
                    .as_ref()
                    .map_or("none", |p| p.backend_name());
                metrics::counter!("outrun_publish_errors_total", "handler" => self.caps.handler.to_string(), "backend" => publisher, "kind" => "denied")
                    .increment(1);
                return Err(self.caps.deny(
                    &self.event_id,
                    &format!("publish to topic {:?}", m.topic),
                    &format!("{:?} to publish", m.topic),
                ));
            }
        }
        let Some(publisher) = &self.caps.publisher else {
            // The registry refuses a publish grant without a backend; an
            // empty grant list denies above.
            return Err(CapError::Unavailable(
                "no broker is configured: add [publish.kafka] or [publish.nats] to the config"
                    .into(),
            ));
        };
        match publisher
            .publish(&self.caps.handler, messages, Some(self.deadline))
            .await
        {
            Ok(_) => Ok(()),
            Err(PublishError::Invalid(m)) => Err(CapError::Invalid(m)),
            Err(PublishError::Unavailable(m)) => Err(CapError::Unavailable(m)),
        }
    }
}

impl Host for HostState {
    async fn publish(
        &mut self,
        topic: String,
        key: Option<String>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<(), CapError> {
        self.publish_messages(vec![Message {
            topic,
            key,
            headers,
            body,
        }])
        .await
    }

    async fn publish_batch(&mut self, messages: Vec<WitMessage>) -> Result<(), CapError> {
        let messages = messages
            .into_iter()
            .map(|m| Message {
                topic: m.topic,
                key: m.key,
                headers: m.headers,
                body: m.body,
            })
            .collect();
        self.publish_messages(messages).await
    }
}
