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

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Failed calls in a row, with nothing delivered in between, after which
/// the producer is replaced (when they also span [`KafkaBackend::stuck_after`]).
const STUCK_FAILURES: u32 = 5;

pub struct KafkaBackend {
    config: ClientConfig,
    /// Replaced after a fatal error (an idempotent producer that lost its
    /// sequence state refuses everything from then on), and when it has
    /// delivered nothing for a while (see [`KafkaBackend::note_failure`]).
    producer: ArcSwap<FutureProducer>,
    brokers: String,
    /// Calls that failed since the last one that delivered.
    failures: AtomicU32,
    /// When the current run of failures began.
    failing_since: Mutex<Option<Instant>>,
    /// How long a run of failures must last before the producer counts as
    /// stuck: a few message timeouts, so a broker that is merely down for a
    /// moment keeps its producer.
    stuck_after: Duration,
    /// Producers replaced because they delivered nothing for a while.
    renewals: AtomicU32,
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
            failures: AtomicU32::new(0),
            failing_since: Mutex::new(None),
            stuck_after: (timeout * 3).max(Duration::from_secs(5)),
            renewals: AtomicU32::new(0),
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
        let result = match failed {
            None => {
                self.note_success();
                Ok(0)
            }
            Some(e) => {
                if !self.renew_if_fatal(&producer) && matches!(e, PublishError::Unavailable(_)) {
                    self.note_failure(&producer);
                }
                Err(e)
            }
        };
        // A replaced producer's last owner drops it: that purges and
        // flushes (up to 0.5 s) and joins its polling thread, which must
        // not hold up an async worker.
        if !Arc::ptr_eq(&self.producer.load(), &producer) {
            tokio::task::spawn_blocking(move || drop(producer));
        }
        result
    }

    fn note_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            *self.failing_since.lock().expect("not poisoned") = None;
        }
    }

    /// A producer can stay wedged after its broker comes back: an
    /// idempotent producer whose broker restarted without its state (a
    /// producer id the broker no longer knows) has been seen to time out
    /// every message for good. So when nothing has been delivered for
    /// [`STUCK_FAILURES`] calls in a row spanning `stuck_after`, start
    /// afresh (new connections, metadata and producer id). While the
    /// broker is really down that costs a client every `stuck_after`;
    /// messages the old one still held are retried by their events, under
    /// the same message ids.
    fn note_failure(&self, failed: &Arc<FutureProducer>) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let since = *self
            .failing_since
            .lock()
            .expect("not poisoned")
            .get_or_insert(now);
        if n < STUCK_FAILURES || now.duration_since(since) < self.stuck_after {
            return;
        }
        if !Arc::ptr_eq(&self.producer.load(), failed) {
            return;
        }
        match create(&self.config) {
            Ok(p) => {
                tracing::warn!(brokers = %self.brokers, failures = n, "the Kafka producer has delivered nothing for {} s ({n} calls in a row); replaced it with a new one", now.duration_since(since).as_secs());
                self.producer.store(Arc::new(p));
                self.renewals.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("outrun_publish_producer_renewals_total", "backend" => "kafka")
                    .increment(1);
                self.failures.store(0, Ordering::Relaxed);
                *self.failing_since.lock().expect("not poisoned") = None;
            }
            Err(e) => {
                tracing::error!(brokers = %self.brokers, "the Kafka producer has delivered nothing for {n} calls and a new one cannot be created: {e}")
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
    /// True when it had a fatal error.
    fn renew_if_fatal(&self, failed: &Arc<FutureProducer>) -> bool {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return false;
        };
        if !Arc::ptr_eq(&self.producer.load(), failed) {
            return true;
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
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer that delivers nothing is replaced once failures have
    /// lasted `stuck_after` (5 s at least), not before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_producer_that_delivers_nothing_is_replaced() {
        // Nothing listens on a port just bound and dropped.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let settings = KafkaSettings {
            brokers: format!("127.0.0.1:{port}"),
            properties: Default::default(),
        };
        let backend = KafkaBackend::new(&settings, Duration::from_millis(200)).unwrap();
        let first = backend.producer.load_full();
        let started = Instant::now();
        let message = || Message {
            topic: "t".into(),
            key: None,
            headers: vec![("message-id".into(), "m1".into())],
            body: b"{}".to_vec(),
        };
        while backend.renewals.load(Ordering::Relaxed) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "not replaced after 30 s of failures"
            );
            let err = backend.send_all(vec![message()]).await.unwrap_err();
            assert!(matches!(err, PublishError::Unavailable(_)), "{err:?}");
        }
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "replaced after {:?}, before failures had lasted 5 s",
            started.elapsed()
        );
        assert!(!Arc::ptr_eq(&first, &backend.producer.load_full()));
    }
}
