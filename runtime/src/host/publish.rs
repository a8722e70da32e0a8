//! `outrun:handler/publish`: messages to the runtime's broker
//! ([`crate::publish::Publisher`]), confined to the topics of
//! `allow.publish`. Every topic of a call is checked before anything is
//! produced, so a denied call publishes nothing. The call returns once the
//! broker acknowledged every message (see the interface's docs in
//! `wit/handler.wit` for the at-least-once contract).

use super::bindings::outrun::handler::publish::{Host, Message as WitMessage};
use super::harness::Call;
use super::{CapError, HostState};
use crate::publish::{Message, PublishError, topic_allowed};

impl HostState {
    async fn publish_messages(&mut self, messages: Vec<Message>) -> Result<(), CapError> {
        let harness = self.caps.harness.as_ref();
        let any = harness.is_some_and(|h| h.publish_any);
        for m in &messages {
            if !any && !topic_allowed(&self.caps.publish, &m.topic) {
                let publisher = self
                    .caps
                    .publisher
                    .as_ref()
                    .map_or("none", |p| p.backend_name());
                metrics::counter!("outrun_publish_errors_total", "handler" => self.caps.handler.to_string(), "backend" => publisher, "kind" => "denied")
                    .increment(1);
                let err = self.caps.deny(
                    &self.event_id,
                    &format!("publish to topic {:?}", m.topic),
                    &format!("{:?} to publish", m.topic),
                );
                self.caps
                    .record(|| Call::publish(m, false, Some(super::harness::cap_error_text(&err))));
                return Err(err);
            }
        }
        // `outrun handlers run` without sending: the calls are the result.
        if harness.is_some_and(|h| !h.send_publish) {
            for m in &messages {
                self.caps.record(|| Call::publish(m, false, None));
            }
            return Ok(());
        }
        let Some(publisher) = &self.caps.publisher else {
            // The registry refuses a publish grant without a backend; an
            // empty grant list denies above.
            return Err(CapError::Unavailable(
                "no broker is configured: add [publish.kafka] or [publish.nats] to the config"
                    .into(),
            ));
        };
        // Kept only for the harness's record (the publisher takes them).
        let recorded = self.caps.harness.is_some().then(|| messages.clone());
        let result = match publisher
            .publish(&self.caps.handler, messages, Some(self.deadline))
            .await
        {
            Ok(_) => Ok(()),
            Err(PublishError::Invalid(m)) => Err(CapError::Invalid(m)),
            Err(PublishError::Unavailable(m)) => Err(CapError::Unavailable(m)),
        };
        for m in recorded.iter().flatten() {
            let error = result.as_ref().err().map(super::harness::cap_error_text);
            self.caps
                .record(|| Call::publish(m, result.is_ok(), error.clone()));
        }
        result
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
