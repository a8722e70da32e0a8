//! The Kafka backend: one rdkafka `FutureProducer` per runtime with
//! `acks=all` and `enable.idempotence=true`, so a delivery report means
//! every in-sync replica has the message, and librdkafka's own retries
//! neither duplicate nor reorder messages within a partition.
//!
//! rdkafka (librdkafka 2.12, built from the crate's bundled source) rather
//! than a pure-Rust client: librdkafka is the reference client outside the
//! JVM, with the idempotent producer, every compression codec and the
//! whole property set operators already know; the measured cost is a
//! longer first build (cmake, ~7 min at low priority) and two apt packages
//! at build time. See the README, "Publishing".

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{KafkaSettings, Message, PublishError, PublishSetupError};

/// outrun's producer settings; `[publish.kafka.properties]` may override
/// all but the two the contract rests on (checked in [`KafkaBackend::new`]).
const DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // Batch the messages of concurrent handlers a little.
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
    // librdkafka backs off reconnects up to 10 s by default: a broker back
    // from a restart would wait that long for the first retried event.
    ("reconnect.backoff.max.ms", "1000"),
    // Each broker restart is logged once per connection otherwise, at error.
    ("log.connection.close", "false"),
];

pub struct KafkaBackend {
    config: ClientConfig,
    /// Replaced after a fatal error (an idempotent producer that lost its
    /// sequence state refuses everything from then on).
    producer: ArcSwap<FutureProducer>,
    brokers: String,
}

impl KafkaBackend {
    /// The brokers, as the config names them (for error messages).
    pub(crate) fn brokers(&self) -> &str {
        &self.brokers
    }

    pub fn new(settings: &KafkaSettings, timeout: Duration) -> Result<Self, PublishSetupError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", settings.brokers.trim());
        for (k, v) in DEFAULTS {
            config.set(*k, *v);
        }
        config.set("message.timeout.ms", timeout.as_millis().max(1).to_string());
        for (k, v) in &settings.properties {
            if k == "bootstrap.servers" {
                return Err(PublishSetupError::Kafka(
                    "set the brokers with `brokers`, not with the property bootstrap.servers"
                        .into(),
                ));
            }
            config.set(k, v);
        }
        let acks = config.get("acks").unwrap_or("all");
        if !matches!(acks, "all" | "-1") {
            return Err(PublishSetupError::Kafka(format!(
                "property acks = {acks:?} would let a publish return before every in-sync replica has the message; \
                 outrun needs acks = \"all\" (remove the property)"
            )));
        }
        let idempotent = config.get("enable.idempotence").unwrap_or("true");
        if idempotent != "true" {
            return Err(PublishSetupError::Kafka(format!(
                "property enable.idempotence = {idempotent:?}: outrun needs the idempotent producer, so that \
                 librdkafka's retries neither duplicate nor reorder messages (remove the property)"
            )));
        }
        let producer = create(&config)?;
        Ok(Self {
            config,
            producer: ArcSwap::from_pointee(producer),
            brokers: settings.brokers.trim().to_string(),
        })
    }

    /// Hand every message to the producer, then wait for every delivery
    /// report. Returns the number of duplicates the broker reported (Kafka
    /// reports none).
    pub async fn send_all(&self, messages: Vec<Message>) -> Result<usize, PublishError> {
        let producer = self.producer.load_full();
        let mut pending = Vec::with_capacity(messages.len());
        let mut failed = None;
        for m in &messages {
            let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
            for (k, v) in &m.headers {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_bytes()),
                });
            }
            let mut record = FutureRecord::<str, [u8]>::to(&m.topic)
                .payload(m.body.as_slice())
                .headers(headers);
            if let Some(key) = &m.key {
                record = record.key(key.as_str());
            }
            match producer.send_result(record) {
                Ok(delivery) => pending.push((m.topic.as_str(), delivery)),
                Err((e, _)) => {
                    // Those already queued are delivered anyway; the retry
                    // publishes them again under the same ids.
                    failed = Some(self.error(&e, &m.topic));
                    break;
                }
            }
        }
        for (topic, delivery) in pending {
            let outcome = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => self.error(&e, topic),
                Err(_cancelled) => PublishError::Unavailable(format!(
                    "kafka (brokers {}): the producer dropped a message to topic {topic:?} without a delivery report; the event will be retried",
                    self.brokers
                )),
            };
            failed.get_or_insert(outcome);
        }
        match failed {
            None => Ok(0),
            Some(e) => {
                self.renew_if_fatal(&producer);
                Err(e)
            }
        }
    }

    fn error(&self, e: &KafkaError, topic: &str) -> PublishError {
        use RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(
                C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::InvalidTopic,
            ) => PublishError::Invalid(format!(
                "kafka (brokers {}) rejected a message to topic {topic:?}: {e}",
                self.brokers
            )),
            _ => PublishError::Unavailable(format!(
                "kafka (brokers {}) did not acknowledge a message to topic {topic:?}: {e}; the event will be retried",
                self.brokers
            )),
        }
    }

    /// After a fatal error the producer refuses everything: replace it
    /// (once; concurrent failures see the new one already in place).
    fn renew_if_fatal(&self, failed: &Arc<FutureProducer>) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        if !Arc::ptr_eq(&self.producer.load(), failed) {
            return;
        }
        match create(&self.config) {
            Ok(p) => {
                tracing::error!(brokers = %self.brokers, "the Kafka producer hit a fatal error ({code:?}: {reason}); replaced it with a new one");
                self.producer.store(Arc::new(p));
            }
            Err(e) => {
                tracing::error!(brokers = %self.brokers, "the Kafka producer hit a fatal error ({code:?}: {reason}) and a new one cannot be created: {e}")
            }
        }
    }

    /// Deliver what is still queued (messages whose publish call stopped
    /// waiting), for at most `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.producer.load_full();
        let queued = producer.in_flight_count();
        let brokers = self.brokers.clone();
        let result = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        match result {
            Ok(Ok(())) => {
                if queued > 0 {
                    tracing::info!(brokers = %brokers, queued, "the Kafka producer delivered its queued messages");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(brokers = %brokers, queued, "flushing the Kafka producer at shutdown: {e}; their events run again (they were not acknowledged)")
            }
            Err(e) => tracing::warn!("flushing the Kafka producer failed: {e}"),
        }
    }
}

fn create(config: &ClientConfig) -> Result<FutureProducer, PublishSetupError> {
    config
        .create()
        .map_err(|e| PublishSetupError::Kafka(format!("cannot create the producer: {e}")))
}
