//! Publishing to a message broker: the `[publish]` settings, the
//! [`Publisher`] every handler (through `outrun:handler/publish`) and every
//! `[[relay]]` of one runtime share, and its two backends, Kafka
//! ([`kafka`], rdkafka with librdkafka built in) and NATS JetStream
//! ([`nats`]). The outbox relay ([`relay`]) is a built-in handler on top.
//!
//! The contract (also in `wit/handler.wit` and the README): a publish call
//! returns only once the broker acknowledged every message, so a handler
//! that then returns `done` had its messages stored before its ack
//! transaction commits; a broker that refuses or does not answer in
//! `[publish] timeout` makes the call `unavailable` (the attempt is retried,
//! nothing is committed). Messages are not part of that transaction, so an
//! attempt that fails after publishing runs again and publishes again: every
//! message carries a deterministic id in its `message-id` header for
//! consumers (and JetStream) to drop duplicates.

pub mod kafka;
pub mod nats;
pub mod relay;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The header that carries a message's id. Required on every message.
pub const MESSAGE_ID_HEADER: &str = "message-id";
/// The header a relayed event's name travels in.
pub const EVENT_NAME_HEADER: &str = "event-name";
/// NATS has no message keys: the key travels in this header.
pub const MESSAGE_KEY_HEADER: &str = "message-key";

/// Longest a publish call waits for the broker when `[publish] timeout` is
/// not set.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// `[publish]`: the broker behind the `publish` capability and `[[relay]]`.
/// At most one backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSettings {
    /// Longest a publish call waits for the broker's acknowledgement (Kafka:
    /// also `message.timeout.ms`, so librdkafka gives up on the message
    /// then too). Bounded by the handler's own timeout.
    /// `OUTRUN_PUBLISH_TIMEOUT`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// `[publish.kafka]`.
    #[serde(default)]
    pub kafka: Option<KafkaSettings>,
    /// `[publish.nats]`.
    #[serde(default)]
    pub nats: Option<NatsSettings>,
}

impl Default for PublishSettings {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_PUBLISH_TIMEOUT,
            kafka: None,
            nats: None,
        }
    }
}

fn default_timeout() -> Duration {
    DEFAULT_PUBLISH_TIMEOUT
}

/// `[publish.kafka]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]` (librdkafka's `bootstrap.servers`).
    /// `OUTRUN_KAFKA_BROKERS`.
    pub brokers: String,
    /// librdkafka client properties, passed through as they are
    /// (`"compression.type" = "zstd"`, `"security.protocol"`, ...). They
    /// override outrun's defaults, except that `acks` and
    /// `enable.idempotence` cannot be weakened: the contract rests on them.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// `[publish.nats]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    /// `nats://host:port`. `OUTRUN_NATS_URL`.
    pub url: String,
}

impl PublishSettings {
    /// True when a backend is configured.
    pub fn configured(&self) -> bool {
        self.kafka.is_some() || self.nats.is_some()
    }

    /// What is wrong with the section, as `(key, message)`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.kafka.is_some() && self.nats.is_some() {
            return Err((
                "publish",
                "configures both [publish.kafka] and [publish.nats]; choose one".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err((
                "publish.timeout",
                "must be more than 0 (it bounds the wait for the broker's acknowledgement; the default is 10s)".into(),
            ));
        }
        if let Some(k) = &self.kafka
            && k.brokers.trim().is_empty()
        {
            return Err((
                "publish.kafka.brokers",
                "is empty; set host:port of at least one broker".into(),
            ));
        }
        if let Some(n) = &self.nats
            && n.url.trim().is_empty()
        {
            return Err(("publish.nats.url", "is empty; set nats://host:port".into()));
        }
        Ok(())
    }
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Message {
    /// The `message-id` header's value (header names compare
    /// case-insensitively).
    pub fn id(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(MESSAGE_ID_HEADER))
            .map(|(_, v)| v.as_str())
    }

    fn check(&self) -> Result<(), PublishError> {
        if self.topic.trim().is_empty() {
            return Err(PublishError::Invalid("the topic is empty".into()));
        }
        match self.id() {
            Some(id) if !id.trim().is_empty() => Ok(()),
            _ => Err(PublishError::Invalid(format!(
                "a message to topic {:?} has no `{MESSAGE_ID_HEADER}` header: every message needs a deterministic id \
                 for consumers to drop the duplicates a rerun publishes (outrun_sdk::id::uuid_v5 makes one)",
                self.topic
            ))),
        }
    }
}

/// Why a publish failed, in the guest's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The message itself is at fault (too large, no id, bad topic name):
    /// a retry fails the same way.
    #[error("{0}")]
    Invalid(String),
    /// The broker refused, failed or did not answer: worth a retry.
    #[error("{0}")]
    Unavailable(String),
}

impl PublishError {
    fn kind(&self) -> &'static str {
        match self {
            PublishError::Invalid(_) => "invalid",
            PublishError::Unavailable(_) => "unavailable",
        }
    }
}

/// Errors setting a backend up; each names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum PublishSetupError {
    #[error("[publish.kafka]: {0}")]
    Kafka(String),
    #[error("[publish.nats] url {url}: {reason}")]
    Nats { url: String, reason: String },
}

enum Backend {
    Kafka(kafka::KafkaBackend),
    Nats(Box<nats::NatsBackend>),
}

/// The broker client of one runtime, shared by every handler and relay:
/// created once (connections and, on Kafka, the idempotent producer's id
/// are per client), flushed at shutdown. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    timeout: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Publisher({})", self.backend_name())
    }
}

/// The outcome of one successful publish call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Messages the broker acknowledged.
    pub messages: usize,
    /// Of them, how many the broker recognised as duplicates of an earlier
    /// message id (NATS JetStream only; Kafka does not say).
    pub duplicates: usize,
}

impl Publisher {
    /// The configured backend, or `None` when `[publish]` names none.
    /// Neither backend waits for the broker here: Kafka connects on the
    /// first message, NATS keeps trying in the background, so a broker that
    /// is down at start-up costs retries, not the start.
    pub async fn connect(
        settings: &PublishSettings,
    ) -> Result<Option<Publisher>, PublishSetupError> {
        let backend = if let Some(k) = &settings.kafka {
            Backend::Kafka(kafka::KafkaBackend::new(k, settings.timeout)?)
        } else if let Some(n) = &settings.nats {
            Backend::Nats(Box::new(
                nats::NatsBackend::connect(n, settings.timeout).await?,
            ))
        } else {
            return Ok(None);
        };
        Ok(Some(Publisher {
            inner: Arc::new(Inner {
                backend,
                timeout: settings.timeout,
            }),
        }))
    }

    /// `kafka` or `nats`, for logs and metrics.
    pub fn backend_name(&self) -> &'static str {
        match self.inner.backend {
            Backend::Kafka(_) => "kafka",
            Backend::Nats(_) => "nats",
        }
    }

    /// `[publish] timeout`.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Publish `messages` for `source` (a handler or relay name, for metrics
    /// and logs) and wait until the broker acknowledged all of them, at most
    /// `[publish] timeout` and never past `deadline`. Nothing is sent when
    /// any message is malformed.
    pub async fn publish(
        &self,
        source: &str,
        messages: Vec<Message>,
        deadline: Option<Instant>,
    ) -> Result<Published, PublishError> {
        let backend = self.backend_name();
        let fail = |e: PublishError| {
            metrics::counter!("outrun_publish_errors_total", "handler" => source.to_string(), "backend" => backend, "kind" => e.kind())
                .increment(1);
            tracing::warn!(handler = source, backend, "publish failed: {e}");
            Err(e)
        };
        if messages.is_empty() {
            return Ok(Published::default());
        }
        if let Some(e) = messages.iter().find_map(|m| m.check().err()) {
            return fail(e);
        }
        let now = Instant::now();
        let mut limit = self.inner.timeout;
        if let Some(d) = deadline {
            limit = limit.min(d.saturating_duration_since(now));
        }
        let count = messages.len();
        let sent = async {
            match &self.inner.backend {
                Backend::Kafka(k) => k.send_all(messages).await,
                Backend::Nats(n) => n.send_all(messages).await,
            }
        };
        // Kafka's own message timeout is the same length and normally
        // answers first, with its reason; this bounds everything else.
        let slack = Duration::from_millis(500);
        let result = match tokio::time::timeout(limit + slack, sent).await {
            Ok(r) => r,
            Err(_) => {
                // Named as the backends' own errors name it, so an operator
                // (and a test) finds the same broker in every message.
                let target = match &self.inner.backend {
                    Backend::Kafka(k) => format!("kafka (brokers {})", k.brokers()),
                    Backend::Nats(n) => format!("nats ({})", n.url()),
                };
                Err(PublishError::Unavailable(format!(
                    "{target}: the broker did not acknowledge {count} message(s) within {}; the event will be retried",
                    humantime::format_duration(limit)
                )))
            }
        };
        match result {
            Ok(duplicates) => {
                metrics::histogram!("outrun_publish_duration_seconds", "backend" => backend)
                    .record(now.elapsed().as_secs_f64());
                metrics::counter!("outrun_published_total", "handler" => source.to_string(), "backend" => backend)
                    .increment(count as u64);
                if duplicates > 0 {
                    metrics::counter!("outrun_publish_duplicates_total", "handler" => source.to_string(), "backend" => backend)
                        .increment(duplicates as u64);
                }
                Ok(Published {
                    messages: count,
                    duplicates,
                })
            }
            Err(e) => fail(e),
        }
    }

    /// Wait (up to `timeout`) until messages still queued in the client are
    /// delivered: those whose publish call gave up waiting. At shutdown.
    pub async fn flush(&self, timeout: Duration) {
        match &self.inner.backend {
            Backend::Kafka(k) => k.flush(timeout).await,
            Backend::Nats(n) => n.flush(timeout).await,
        }
    }
}

/// Whether `topic` is in `allow`: exact names, or a prefix ending in `*`
/// (`"stoplist.*"`).
pub fn topic_allowed(allow: &[String], topic: &str) -> bool {
    allow.iter().any(|a| match a.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => a == topic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_allow_list() {
        let allow = vec!["orders".to_string(), "stoplist.*".to_string()];
        assert!(topic_allowed(&allow, "orders"));
        assert!(topic_allowed(&allow, "stoplist.products"));
        assert!(!topic_allowed(&allow, "orders.v2"));
        assert!(!topic_allowed(&allow, "stoplist"));
        assert!(!topic_allowed(&[], "orders"));
    }

    #[test]
    fn messages_need_an_id() {
        let mut m = Message {
            topic: "t".into(),
            key: None,
            headers: vec![],
            body: b"{}".to_vec(),
        };
        let err = m.check().unwrap_err();
        assert!(
            matches!(&err, PublishError::Invalid(s) if s.contains("message-id") && s.contains("uuid_v5")),
            "{err}"
        );
        m.headers.push(("Message-ID".into(), "abc".into()));
        assert_eq!(m.id(), Some("abc"));
        assert!(m.check().is_ok());
        m.topic = " ".into();
        assert!(m.check().is_err());
    }

    #[test]
    fn settings_check() {
        let s: PublishSettings = toml::from_str(
            "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[kafka.properties]\n\"linger.ms\" = \"1\"\n",
        )
        .unwrap();
        assert!(s.check().is_ok() && s.configured());
        assert_eq!(s.timeout, DEFAULT_PUBLISH_TIMEOUT);
        let s: PublishSettings =
            toml::from_str("[kafka]\nbrokers = \"a:1\"\n[nats]\nurl = \"nats://b:2\"\n").unwrap();
        assert_eq!(s.check().unwrap_err().0, "publish");
        let s: PublishSettings = toml::from_str("timeout = \"0s\"\n").unwrap();
        assert_eq!(s.check().unwrap_err().0, "publish.timeout");
        assert!(!PublishSettings::default().configured());
        let err = toml::from_str::<PublishSettings>("[kafka]\nbroker = \"a:1\"\n").unwrap_err();
        assert!(err.to_string().contains("broker"), "{err}");
    }
}
