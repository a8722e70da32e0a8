//! The NATS JetStream backend: one client connection per runtime, a
//! JetStream publish per message, and the publish ack as the broker's
//! acknowledgement. The message's `message-id` becomes its `Nats-Msg-Id`,
//! so a stream with a duplicate window stores a republished message once
//! (its ack says `duplicate`), which gives teams without Kafka the same
//! contract with deduplication done by the server.
//!
//! Topics are subjects; a stream must capture them (created by the
//! operator, with the duplicate window the reruns need: the default is
//! 2 minutes).

use std::str::FromStr;
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;

use super::{MESSAGE_KEY_HEADER, Message, NatsSettings, PublishError, PublishSetupError};

pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    url: String,
}

impl NatsBackend {
    /// The server URL, as the config names it (for error messages).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Connects in the background: a server that is down at start-up makes
    /// publishes `unavailable` until it is up, it does not stop the start.
    pub async fn connect(
        settings: &NatsSettings,
        timeout: Duration,
    ) -> Result<Self, PublishSetupError> {
        let url = settings.url.trim().to_string();
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(timeout)
            .name("outrun")
            .connect(url.as_str())
            .await
            .map_err(|e| PublishSetupError::Nats {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let js = jetstream::context::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        Ok(Self { client, js, url })
    }

    /// Publish every message, then wait for every ack. Returns how many the
    /// server recognised as duplicates.
    pub async fn send_all(&self, messages: Vec<Message>) -> Result<usize, PublishError> {
        let mut acks = Vec::with_capacity(messages.len());
        for m in messages {
            let publish = self.build(&m)?;
            match self.js.send_publish(m.topic.clone(), publish).await {
                Ok(ack) => acks.push((m.topic, ack)),
                Err(e) => return Err(self.error(e.kind(), &e, &m.topic)),
            }
        }
        let mut duplicates = 0;
        for (topic, ack) in acks {
            match ack.await {
                Ok(a) => duplicates += usize::from(a.duplicate),
                Err(e) => return Err(self.error(e.kind(), &e, &topic)),
            }
        }
        Ok(duplicates)
    }

    /// The JetStream publish of `m`: its headers (checked: the client
    /// panics on names or values NATS cannot carry), the key as a header,
    /// the id as `Nats-Msg-Id`.
    fn build(&self, m: &Message) -> Result<PublishMessage, PublishError> {
        let mut headers = HeaderMap::new();
        let pairs = m
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(m.key.as_deref().map(|k| (MESSAGE_KEY_HEADER, k)))
            .chain(m.id().map(|id| ("Nats-Msg-Id", id)));
        for (k, v) in pairs {
            let name = HeaderName::from_str(k).map_err(|e| {
                PublishError::Invalid(format!(
                    "header name {k:?} of a message to subject {:?} cannot travel over NATS: {e}",
                    m.topic
                ))
            })?;
            let value = HeaderValue::from_str(v).map_err(|e| {
                PublishError::Invalid(format!(
                    "header {k:?} of a message to subject {:?} cannot travel over NATS: {e}",
                    m.topic
                ))
            })?;
            headers.insert(name, value);
        }
        Ok(PublishMessage::build()
            .payload(m.body.clone().into())
            .headers(headers))
    }

    fn error(
        &self,
        kind: PublishErrorKind,
        e: &dyn std::fmt::Display,
        subject: &str,
    ) -> PublishError {
        match kind {
            PublishErrorKind::MaxPayloadExceeded => PublishError::Invalid(format!(
                "nats ({}) rejected a message to subject {subject:?}: {e}",
                self.url
            )),
            PublishErrorKind::StreamNotFound => PublishError::Unavailable(format!(
                "nats ({}): no JetStream stream captures subject {subject:?} ({e}); create one with a duplicate window, \
                 e.g. `nats stream add --subjects {subject:?} --dupe-window 2m`; the event will be retried",
                self.url
            )),
            _ => PublishError::Unavailable(format!(
                "nats ({}) did not acknowledge a message to subject {subject:?}: {e}; the event will be retried",
                self.url
            )),
        }
    }

    /// Send what the client still buffers, for at most `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        match tokio::time::timeout(timeout, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(url = %self.url, "flushing the NATS connection at shutdown: {e}")
            }
            Err(_) => {
                tracing::warn!(url = %self.url, "flushing the NATS connection at shutdown took over {}", humantime::format_duration(timeout))
            }
        }
    }
}
