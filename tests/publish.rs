//! Publishing end to end: the real `outrun serve` with the probe guest, the
//! shipped `stoplist-publisher` handler and `[[relay]]` entries, against a
//! real Kafka-protocol broker, read back by a real consumer (rdkafka with
//! explicit partition assignment, so no consumer-group join to wait for).
//!
//! The broker is Tansu (`tansu`, in-memory storage), started by each test on
//! a free port, so a test can stop and restart it; each test uses fresh
//! topics. `OUTRUN_TEST_TANSU` names the binary (default: `tansu` on PATH,
//! then `~/.cargo/bin/tansu`). With `OUTRUN_TEST_KAFKA_BROKERS` set, the
//! tests that do not stop the broker use that one instead; one that does not
//! answer fails the test naming its address and the variable.
//!
//! "Nothing else was published" is checked without waiting for silence:
//! after the events are done (so everything they published was
//! acknowledged), the test produces a sentinel into every partition and
//! reads up to it.
//!
//! The NATS test uses the JetStream at `OUTRUN_TEST_NATS_URL` (default
//! `nats://127.0.0.1:4222`) with a stream of its own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Serve, TestDb, free_port, guest, wait_for};
use outrun::{NewEvent, Store};
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

const KAFKA_ENV: &str = "OUTRUN_TEST_KAFKA_BROKERS";
const TANSU_ENV: &str = "OUTRUN_TEST_TANSU";
const NATS_ENV: &str = "OUTRUN_TEST_NATS_URL";

// ---------------------------------------------------------------------------
// The broker

/// A Kafka-protocol broker for one test: a private Tansu (stoppable) or the
/// one `OUTRUN_TEST_KAFKA_BROKERS` names.
struct Broker {
    addr: String,
    tansu: Option<Tansu>,
}

struct Tansu {
    port: u16,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var(TANSU_ENV) {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("tansu"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        let p = home.join(".cargo/bin/tansu");
        assert!(
            p.is_file(),
            "no Tansu broker binary: install it with `cargo install tansu --locked --no-default-features --features dynostore` \
             (.ci/run does), point {TANSU_ENV} at one, or point {KAFKA_ENV} at a running Kafka-protocol broker"
        );
        p
    })
}

impl Tansu {
    fn start() -> Tansu {
        let mut t = Tansu {
            port: free_port(),
            child: None,
            log: tempfile::NamedTempFile::new().unwrap(),
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(self.log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} ({e})", tansu_binary().display()));
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_answers(&addr, || {
            format!(
                "the private Tansu on {addr} did not answer within 20 s; its log:\n{}",
                std::fs::read_to_string(self.log.path()).unwrap_or_default()
            )
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait until the broker at `addr` answers a metadata request.
fn wait_answers(addr: &str, why: impl Fn() -> String) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", addr)
            .set("log_level", "0")
            .create()
            .expect("create a metadata client");
        if consumer
            .fetch_metadata(None, Duration::from_millis(500))
            .is_ok()
        {
            return;
        }
        assert!(Instant::now() < end, "{}", why());
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Broker {
    /// `OUTRUN_TEST_KAFKA_BROKERS` if set, else a private Tansu.
    fn any() -> Broker {
        match std::env::var(KAFKA_ENV) {
            Ok(addr) => {
                wait_answers(&addr, || {
                    format!(
                        "the Kafka broker at {addr} ({KAFKA_ENV}) does not answer; start it or unset {KAFKA_ENV} to let the tests start Tansu"
                    )
                });
                Broker { addr, tansu: None }
            }
            Err(_) => Broker::private(),
        }
    }

    /// A Tansu of this test's own, which it may stop and start.
    fn private() -> Broker {
        let tansu = Tansu::start();
        Broker {
            addr: format!("127.0.0.1:{}", tansu.port),
            tansu: Some(tansu),
        }
    }

    fn stop(&mut self) {
        self.tansu.as_mut().expect("a private broker").stop();
    }

    fn start(&mut self) {
        self.tansu.as_mut().expect("a private broker").spawn();
    }

    /// What a private broker wrote to stderr (warnings and errors).
    fn log(&self) -> String {
        self.tansu
            .as_ref()
            .map(|t| std::fs::read_to_string(t.log.path()).unwrap_or_default())
            .unwrap_or_default()
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.addr);
        c
    }

    /// A fresh topic with `partitions` partitions.
    async fn topic(&self, partitions: i32) -> String {
        let name = format!("t-{}", uuid::Uuid::new_v4().simple());
        self.create_topic(&name, partitions).await;
        name
    }

    async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.client().create().unwrap();
        let result = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap_or_else(|e| panic!("create topic {name} on {}: {e}", self.addr));
        for r in result {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t} on {}: {e}", self.addr));
        }
    }

    /// Everything in `topic` (all `partitions`), read up to a sentinel this
    /// produces into each partition now.
    async fn read_all(&self, topic: &str, partitions: i32) -> Vec<Record> {
        let producer: FutureProducer = self.client().create().unwrap();
        for p in 0..partitions {
            producer
                .send(
                    FutureRecord::<str, str>::to(topic)
                        .partition(p)
                        .payload("sentinel")
                        .headers(rdkafka::message::OwnedHeaders::new().insert(
                            rdkafka::message::Header {
                                key: "sentinel",
                                value: Some("1"),
                            },
                        )),
                    Duration::from_secs(10),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("produce the sentinel to {topic}/{p}: {e}"));
        }
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", format!("g-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut done = BTreeSet::new();
            let end = Instant::now() + Duration::from_secs(30);
            while done.len() < partitions as usize {
                assert!(
                    Instant::now() < end,
                    "reading {topic}: no sentinel from partitions other than {done:?} within 30 s; read so far: {out:?}"
                );
                let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let m = m.unwrap_or_else(|e| panic!("consuming {topic}: {e}"));
                let mut headers = Vec::new();
                if let Some(h) = m.headers() {
                    for hdr in h.iter() {
                        headers.push((
                            hdr.key.to_string(),
                            String::from_utf8_lossy(hdr.value.unwrap_or_default()).into_owned(),
                        ));
                    }
                }
                if headers.iter().any(|(k, _)| k == "sentinel") {
                    done.insert(m.partition());
                    continue;
                }
                out.push(Record {
                    partition: m.partition(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    headers,
                    body: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                });
            }
            out
        })
        .await
        .unwrap()
    }
}

/// One consumed message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    partition: i32,
    key: Option<String>,
    headers: Vec<(String, String)>,
    body: String,
}

impl Record {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn id(&self) -> &str {
        self.header("message-id").expect("every message has an id")
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

// ---------------------------------------------------------------------------
// outrun

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("outrun.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// A config with the probe bound to `probe.publish` (and `denied/...` with
/// no topic granted) publishing to `brokers`.
fn probe_config(dir: &Path, publish: &str, topics: &[&str]) -> PathBuf {
    write_config(
        dir,
        &format!(
            r#"
{publish}

[[handler]]
name = "probe"
module = "{probe}"
events = ["probe.publish"]
max_retry = 50
[handler.allow]
publish = {topics:?}

[[handler]]
name = "ungranted"
module = "{probe}"
events = ["denied/probe.publish"]
"#,
            probe = guest("probe").display(),
        ),
    )
}

fn kafka_section(broker: &Broker, timeout: &str) -> String {
    format!(
        "[publish]\ntimeout = \"{timeout}\"\n[publish.kafka]\nbrokers = \"{}\"\n",
        broker.addr
    )
}

async fn enqueue(store: &Store, ev: NewEvent) -> uuid::Uuid {
    store.enqueue(&ev, 5).await.unwrap()
}

async fn wait_gone(store: &Store, serve: &Serve, id: uuid::Uuid) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        match store.get(id).await.unwrap() {
            None => return,
            Some(e) if e.is_dead() => panic!(
                "event {id} is dead: {:?}; log:\n{}",
                e.last_error,
                serve.log()
            ),
            Some(e) => assert!(
                Instant::now() < end,
                "event {id} not done within 60 s: {e:?}; log:\n{}",
                serve.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_dead(store: &Store, id: uuid::Uuid) -> String {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let e = store
            .get(id)
            .await
            .unwrap()
            .expect("the event stays in the table");
        if e.is_dead() {
            return e.last_error.unwrap_or_default();
        }
        assert!(
            Instant::now() < end,
            "event {id} not dead within 30 s: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn probe_message(topic: &str, id: &str, key: Option<&str>, body: Value) -> Value {
    let mut m = json!({"topic": topic, "id": id, "body": body});
    if let Some(k) = key {
        m["key"] = json!(k);
    }
    m
}

// ---------------------------------------------------------------------------
// The capability

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_messages_arrive_with_key_headers_and_body() {
    let broker = Broker::any();
    let topic = broker.topic(3).await;
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let config = probe_config(dir.path(), &kafka_section(&broker, "10s"), &[&topic]);
    let serve = Serve::ready(&db, &config).await;

    // One call per message, then one batch (the same group, so the second
    // event starts after the first is done): same key → same partition, in
    // order.
    let single = enqueue(
        &store,
        NewEvent::new(
            "probe.publish",
            json!({"messages": [
                {"topic": topic, "id": "m-1", "key": "unit-1:p-1", "body": {"n": 1}, "headers": [["x-trace", "abc"]]},
                probe_message(&topic, "m-2", None, json!({"n": 2})),
            ]})
            .to_string(),
        )
        .with_group("g"),
    )
    .await;
    let batch = enqueue(
        &store,
        NewEvent::new(
            "probe.publish",
            json!({"batch": true, "messages": (3..=12).map(|n| probe_message(&topic, &format!("m-{n}"), Some("unit-1:p-1"), json!({"n": n}))).collect::<Vec<_>>()})
                .to_string(),
        )
        .with_group("g"),
    )
    .await;
    wait_gone(&store, &serve, single).await;
    wait_gone(&store, &serve, batch).await;

    let records = broker.read_all(&topic, 3).await;
    assert_eq!(records.len(), 12, "{records:#?}");
    let first = records.iter().find(|r| r.id() == "m-1").unwrap();
    assert_eq!(first.key.as_deref(), Some("unit-1:p-1"));
    assert_eq!(first.header("x-trace"), Some("abc"));
    assert_eq!(first.json(), json!({"n": 1}));
    let unkeyed = records.iter().find(|r| r.id() == "m-2").unwrap();
    assert_eq!(unkeyed.key, None);
    let keyed: Vec<&Record> = records.iter().filter(|r| r.key.is_some()).collect();
    let partition = keyed[0].partition;
    assert!(
        keyed.iter().all(|r| r.partition == partition),
        "one key, one partition: {keyed:#?}"
    );
    let order: Vec<i64> = keyed
        .iter()
        .map(|r| r.json()["n"].as_i64().unwrap())
        .collect();
    assert_eq!(
        order,
        (1..=12).filter(|n| *n != 2).collect::<Vec<_>>(),
        "in publish order"
    );

    let log = serve.stop();
    assert!(log.contains("publishing to kafka"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_not_granted_is_denied_and_nothing_is_produced() {
    let broker = Broker::any();
    let topic = broker.topic(1).await;
    let other = broker.topic(1).await;
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let config = probe_config(dir.path(), &kafka_section(&broker, "10s"), &[&topic]);
    let serve = Serve::ready(&db, &config).await;

    // A granted topic first, then one that is not, in one batch: the call is
    // checked whole, so not even the granted message goes out.
    let mixed = enqueue(
        &store,
        NewEvent::new(
            "probe.publish",
            json!({"batch": true, "messages": [
                probe_message(&topic, "ok-1", None, json!(1)),
                probe_message(&other, "no-1", None, json!(2)),
            ]})
            .to_string(),
        ),
    )
    .await;
    let ungranted = enqueue(
        &store,
        NewEvent::new(
            "denied/probe.publish",
            json!({"messages": [probe_message(&topic, "no-2", None, json!(3))]}).to_string(),
        ),
    )
    .await;
    let no_id = enqueue(
        &store,
        NewEvent::new(
            "probe.publish",
            json!({"messages": [probe_message(&topic, " ", None, json!(4))]}).to_string(),
        ),
    )
    .await;
    let err = wait_dead(&store, mixed).await;
    assert!(
        err.contains(&format!("publish to topic \"{other}\" is not allowed"))
            && err.contains("[handler.allow] of handler probe"),
        "{err}"
    );
    let err = wait_dead(&store, ungranted).await;
    assert!(
        err.contains("is not allowed") && err.contains("handler ungranted"),
        "{err}"
    );
    let err = wait_dead(&store, no_id).await;
    assert!(
        err.contains("message-id") && err.contains("uuid_v5"),
        "{err}"
    );

    assert_eq!(broker.read_all(&topic, 1).await, vec![]);
    assert_eq!(broker.read_all(&other, 1).await, vec![]);
    let log = serve.stop();
    assert!(log.contains("capability denied"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_is_down_makes_the_event_retry_until_it_is_back() {
    let mut broker = Broker::private();
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let topic = broker.topic(1).await;
    let config = probe_config(dir.path(), &kafka_section(&broker, "1s"), &[&topic]);
    let serve = Serve::ready(&db, &config).await;

    broker.stop();
    let id = enqueue(
        &store,
        NewEvent::new(
            "probe.publish",
            json!({"messages": [probe_message(&topic, "down-1", Some("k"), json!({"n": 1}))]})
                .to_string(),
        ),
    )
    .await;
    // Failed attempts while the broker is down: retryable, the event live.
    let failed = common::eventually("two failed attempts", Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            let e = store.get(id).await.unwrap()?;
            (e.retry >= 2).then_some(e)
        }
    })
    .await;
    assert!(!failed.is_dead(), "{failed:?}");
    let err = failed.last_error.unwrap_or_default();
    assert!(
        err.contains("kafka") && err.contains(&broker.addr) && err.contains("retried"),
        "{err}"
    );

    broker.start();
    // memory:// forgot every topic: make it again, as it was.
    broker.create_topic(&topic, 1).await;
    let done = std::panic::AssertUnwindSafe(wait_gone(&store, &serve, id));
    if let Err(panic) = futures::FutureExt::catch_unwind(done).await {
        eprintln!("the broker's log:\n{}", broker.log());
        std::panic::resume_unwind(panic);
    }
    let records = broker.read_all(&topic, 1).await;
    let ids: Vec<&str> = records.iter().map(Record::id).collect();
    assert!(
        ids.iter().all(|i| *i == "down-1") && !ids.is_empty(),
        "the message, possibly more than once (a timed-out send may land later), nothing else: {records:#?}"
    );
    serve.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_publishing_republishes_under_the_same_id() {
    let broker = Broker::any();
    let topic = broker.topic(1).await;
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let config = probe_config(dir.path(), &kafka_section(&broker, "10s"), &[&topic]);
    let serve = Serve::ready(&db, &config).await;
    // Attempt 1 publishes and then fails (as a failed ack commit would):
    // attempt 2 publishes again and succeeds.
    let id = enqueue(
        &store,
        NewEvent::new(
            "probe.publish",
            json!({"fail_until_attempt": 2, "messages": [probe_message(&topic, "again-1", Some("k"), json!({"n": 1}))]})
                .to_string(),
        ),
    )
    .await;
    wait_gone(&store, &serve, id).await;
    let records = broker.read_all(&topic, 1).await;
    assert_eq!(records.len(), 2, "{records:#?}");
    assert!(
        records
            .iter()
            .all(|r| r.id() == "again-1" && r.json() == json!({"n": 1}))
    );
    serve.stop();
}

// ---------------------------------------------------------------------------
// The relay

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_events_as_they_are() {
    let broker = Broker::any();
    let orders = broker.topic(1).await;
    let audit = broker.topic(1).await;
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            r#"{}
[[relay]]
events = ["order.created", "order.paid"]
topic = "{orders}"

[[relay]]
events = ["audit.entry"]
topic = "{audit}"
key = "/user/id"
"#,
            kafka_section(&broker, "10s")
        ),
    );
    let serve = Serve::ready(&db, &config).await;
    let created = enqueue(
        &store,
        NewEvent::new("order.created", r#"{"order_id": 42, "total": "9.90"}"#)
            .with_group("order:42"),
    )
    .await;
    let paid = enqueue(
        &store,
        NewEvent::new("order.paid", r#"{"order_id": 42}"#).with_group("order:42"),
    )
    .await;
    let entry = enqueue(
        &store,
        NewEvent::new("audit.entry", r#"{"user": {"id": 7}, "what": "login"}"#),
    )
    .await;
    let keyless = enqueue(
        &store,
        NewEvent::new("audit.entry", r#"{"what": "no user"}"#),
    )
    .await;
    for id in [created, paid, entry] {
        wait_gone(&store, &serve, id).await;
    }
    let err = wait_dead(&store, keyless).await;
    assert!(err.contains("/user/id") && err.contains("relay:"), "{err}");

    let records = broker.read_all(&orders, 1).await;
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(
        records[0].body, r#"{"order_id": 42, "total": "9.90"}"#,
        "the payload byte for byte"
    );
    assert_eq!(records[0].key.as_deref(), Some("order:42"));
    assert_eq!(records[0].header("event-name"), Some("order.created"));
    assert_eq!(records[0].id(), created.to_string());
    assert_eq!(records[1].header("event-name"), Some("order.paid"));
    assert_eq!(records[1].id(), paid.to_string());
    let records = broker.read_all(&audit, 1).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0].key.as_deref(), Some("7"));
    assert_eq!(records[0].id(), entry.to_string());
    serve.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publish_config_is_refused_at_start() {
    let db = TestDb::sqlite();
    db.store().await;
    let dir = tempfile::tempdir().unwrap();
    // A grant without a broker.
    let config = probe_config(dir.path(), "", &["t"]);
    let out = common::outrun(&db, &["serve", "--config", config.to_str().unwrap()]);
    let err = common::fails(&out);
    assert!(
        err.contains("handler probe") && err.contains("[publish.kafka]"),
        "{err}"
    );
    // A relay without a broker; a weakened producer.
    let config = write_config(dir.path(), "[[relay]]\nevents = [\"a\"]\ntopic = \"t\"\n");
    let err = common::fails(&common::outrun(
        &db,
        &["serve", "--config", config.to_str().unwrap()],
    ));
    assert!(
        err.contains("relay") && err.contains("needs a broker"),
        "{err}"
    );
    let config = write_config(
        dir.path(),
        "[publish.kafka]\nbrokers = \"127.0.0.1:9\"\n[publish.kafka.properties]\nacks = \"1\"\n",
    );
    let err = common::fails(&common::outrun(
        &db,
        &["serve", "--config", config.to_str().unwrap()],
    ));
    assert!(err.contains("acks") && err.contains("all"), "{err}");
}

// ---------------------------------------------------------------------------
// NATS JetStream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_drops_the_republished_duplicate() {
    let url = std::env::var(NATS_ENV).unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(url.as_str()).await.unwrap_or_else(|e| {
        panic!("cannot reach NATS at {url} ({e}); start it or point {NATS_ENV} at one")
    });
    let js = async_nats::jetstream::new(client);
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let subject = format!("outrun-test.{suffix}");
    let stream_name = format!("OUTRUN_TEST_{suffix}");
    let mut stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create JetStream stream on {url}: {e}"));

    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let config = probe_config(
        dir.path(),
        &format!("[publish]\ntimeout = \"5s\"\n[publish.nats]\nurl = \"{url}\"\n"),
        &["outrun-test.*"],
    );
    let serve = Serve::ready(&db, &config).await;
    // Published on attempt 1, which fails; published again on attempt 2.
    let id = enqueue(
        &store,
        NewEvent::new(
            "probe.publish",
            json!({"fail_until_attempt": 2, "messages": [
                probe_message(&subject, "nats-1", Some("k-1"), json!({"n": 1})),
                probe_message(&subject, "nats-2", None, json!({"n": 2})),
            ]})
            .to_string(),
        ),
    )
    .await;
    wait_gone(&store, &serve, id).await;
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.state.messages, 2,
        "two ids, each stored once: {info:?}"
    );
    let first = stream.get_raw_message(1).await.unwrap();
    assert_eq!(
        first.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("nats-1")
    );
    assert_eq!(
        first.headers.get("message-key").map(|v| v.as_str()),
        Some("k-1")
    );
    assert_eq!(&first.payload[..], br#"{"n":1}"#);
    js.delete_stream(&stream_name).await.unwrap();
    serve.stop();
}

// ---------------------------------------------------------------------------
// stoplist-publisher (seed 003)

const UNIT: &str = "22222222-2222-2222-2222-222222222222";
const MONOLITH: &str = "11111111-1111-1111-1111-111111111111";
const PEPPERONI: &str = "a0000000-0000-4000-8000-000000000001";
const MARGHERITA: &str = "a0000000-0000-4000-8000-000000000002";
const CALZONE: &str = "a0000000-0000-4000-8000-000000000003";
const SALAD: &str = "a0000000-0000-4000-8000-000000000004";
const SAUSAGE: &str = "b0000000-0000-4000-8000-000000000001";
const CHEESE: &str = "b0000000-0000-4000-8000-000000000002";
const TRUFFLE: &str = "b0000000-0000-4000-8000-000000000003";

/// The handler's tables, filled with a small menu: pepperoni and calzone
/// contain sausage; pepperoni, margherita and calzone contain cheese; the
/// three pizzas are baked, the salad is not; calzone is not on this unit's
/// menu.
async fn stoplist_db(db: &TestDb) -> Store {
    let store = db.store().await;
    let backend = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations/apps/stoplist-publisher")
        .join(backend)
        .join("0001_stoplist.sql");
    let sql = std::fs::read_to_string(&file).unwrap();
    db.exec_script(&sql).await;
    for (product, ingredient) in [
        (PEPPERONI, SAUSAGE),
        (CALZONE, SAUSAGE),
        (PEPPERONI, CHEESE),
        (MARGHERITA, CHEESE),
        (CALZONE, CHEESE),
    ] {
        db.exec(&format!(
            "INSERT INTO stoplist_product_ingredient (product_id, ingredient_id) VALUES ('{product}', '{ingredient}')"
        ))
        .await;
    }
    for p in [PEPPERONI, MARGHERITA, CALZONE] {
        db.exec(&format!(
            "INSERT INTO stoplist_baking_product (product_id) VALUES ('{p}')"
        ))
        .await;
    }
    for p in [PEPPERONI, MARGHERITA, SALAD] {
        db.exec(&format!(
            "INSERT INTO stoplist_unit_menu_product (unit_id, product_id) VALUES ('{UNIT}', '{p}')"
        ))
        .await;
    }
    store
}

fn stoplist_config(dir: &Path, broker: &Broker, topic: &str) -> PathBuf {
    write_config(
        dir,
        &format!(
            r#"{}
[[handler]]
name = "stoplist-publisher"
module = "{}"
events = ["stoplist.stop", "stoplist.stop-oven", "stoplist.remove-stop"]
[handler.allow]
sql = true
publish = ["{topic}"]
[handler.allow.config]
topic = "{topic}"
"#,
            kafka_section(broker, "10s"),
            guest("stoplist_publisher").display()
        ),
    )
}

fn stop_event(name: &str, stop_id: &str, extra: Value) -> NewEvent {
    let mut p = json!({
        "StopId": stop_id,
        "UnitId": UNIT,
        "CountryId": 643,
        "MonolithId": MONOLITH,
        "At": "2024-05-01T15:00:00+03:00",
    });
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    NewEvent::new(name, p.to_string()).with_group(format!("unit:{UNIT}"))
}

/// (ProductId, StopId, ActionType) of each record, in order.
fn actions(records: &[Record]) -> Vec<(String, String, i64)> {
    records
        .iter()
        .map(|r| {
            let v = r.json();
            (
                v["ProductId"].as_str().unwrap().to_string(),
                v["StopId"].as_str().unwrap().to_string(),
                v["ActionType"].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn stoplist_one_event_per_product(db: TestDb) {
    let broker = Broker::any();
    let topic = broker.topic(1).await;
    let store = stoplist_db(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::ready(&db, &stoplist_config(dir.path(), &broker, &topic)).await;

    let cheese_stop = "c0000000-0000-4000-8000-000000000001";
    let product_stop = "c0000000-0000-4000-8000-000000000002";
    let oven_stop = "c0000000-0000-4000-8000-000000000003";
    let mut ids = Vec::new();
    for ev in [
        stop_event(
            "stoplist.stop",
            cheese_stop,
            json!({"Reason": 1, "IngredientId": CHEESE}),
        ),
        stop_event(
            "stoplist.stop",
            product_stop,
            json!({"Reason": 0, "ProductId": SALAD.to_uppercase()}),
        ),
        stop_event("stoplist.stop-oven", oven_stop, json!({})),
    ] {
        ids.push(enqueue(&store, ev).await);
    }
    for id in ids {
        wait_gone(&store, &serve, id).await;
    }
    let records = broker.read_all(&topic, 1).await;
    let mut got = actions(&records);
    got.sort();
    let mut want = vec![
        (PEPPERONI.to_string(), cheese_stop.to_string(), 0),
        (MARGHERITA.to_string(), cheese_stop.to_string(), 0),
        (CALZONE.to_string(), cheese_stop.to_string(), 0),
        (SALAD.to_string(), product_stop.to_string(), 0),
        // Calzone is baked but not on this unit's menu; the salad is not baked.
        (PEPPERONI.to_string(), oven_stop.to_string(), 0),
        (MARGHERITA.to_string(), oven_stop.to_string(), 0),
    ];
    want.sort();
    assert_eq!(got, want);

    let oven = records
        .iter()
        .find(|r| r.json()["StopId"] == oven_stop && r.json()["ProductId"] == PEPPERONI)
        .unwrap();
    let body = oven.json();
    assert_eq!(
        oven.key.as_deref(),
        Some(format!("{UNIT}:{PEPPERONI}").as_str())
    );
    assert_eq!(oven.id(), body["EventId"].as_str().unwrap());
    assert_eq!(body["Reason"], 2, "an oven stop is equipment maintenance");
    assert_eq!(body["CountryId"], 643);
    assert_eq!(body["MonolithId"], MONOLITH);
    assert_eq!(body["UnitId"], UNIT);
    assert_eq!(body["At"], "2024-05-01T15:00:00+03:00");
    assert_eq!(body["AtUtc"], "2024-05-01T12:00:00Z");
    let event_id = uuid::Uuid::parse_str(body["EventId"].as_str().unwrap()).unwrap();
    assert_eq!(event_id.get_version_num(), 5);
    let all_ids: BTreeSet<&str> = records.iter().map(Record::id).collect();
    assert_eq!(all_ids.len(), records.len(), "every event has its own id");
    serve.stop();
}

async fn stoplist_pepperoni(db: TestDb) {
    let broker = Broker::any();
    let topic = broker.topic(1).await;
    let store = stoplist_db(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::ready(&db, &stoplist_config(dir.path(), &broker, &topic)).await;
    let oven_stop = "d0000000-0000-4000-8000-000000000001";
    let sausage_stop = "d0000000-0000-4000-8000-000000000002";
    // Oven cleaning starts; sausage runs out; cleaning ends. The producer
    // read the oven stop's products from stoppedproduct before deleting them.
    let mut ids = Vec::new();
    for ev in [
        stop_event("stoplist.stop-oven", oven_stop, json!({"Reason": 2})),
        stop_event(
            "stoplist.stop",
            sausage_stop,
            json!({"Reason": 1, "IngredientId": SAUSAGE}),
        ),
        stop_event(
            "stoplist.remove-stop",
            oven_stop,
            json!({"Reason": 2, "ProductIds": [PEPPERONI, MARGHERITA]}),
        ),
    ] {
        ids.push(enqueue(&store, ev).await);
    }
    for id in ids {
        wait_gone(&store, &serve, id).await;
    }
    let records = broker.read_all(&topic, 1).await;
    let pepperoni: Vec<(String, i64)> = actions(&records)
        .into_iter()
        .filter(|(p, ..)| p == PEPPERONI)
        .map(|(_, s, a)| (s, a))
        .collect();
    assert_eq!(
        pepperoni,
        vec![
            (oven_stop.to_string(), 0),
            (sausage_stop.to_string(), 0),
            (oven_stop.to_string(), 1),
        ],
        "in order; the oven's removal names the oven's StopId only, so the sausage stop still holds"
    );
    let removed: Vec<_> = actions(&records)
        .into_iter()
        .filter(|(.., a)| *a == 1)
        .collect();
    assert_eq!(
        removed.len(),
        2,
        "pepperoni and margherita leave the oven stop: {removed:?}"
    );
    serve.stop();
}

async fn stoplist_empty_and_invalid(db: TestDb) {
    let broker = Broker::any();
    let topic = broker.topic(1).await;
    let store = stoplist_db(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::ready(&db, &stoplist_config(dir.path(), &broker, &topic)).await;
    // An ingredient no product contains: nothing to publish, done.
    let truffle = enqueue(
        &store,
        stop_event(
            "stoplist.stop",
            "e0000000-0000-4000-8000-000000000001",
            json!({"Reason": 1, "IngredientId": TRUFFLE}),
        ),
    )
    .await;
    // A Reason outside the schema's 0-4: dead, nothing published (not even
    // the first of its two products).
    let bad_reason = enqueue(
        &store,
        stop_event(
            "stoplist.remove-stop",
            "e0000000-0000-4000-8000-000000000002",
            json!({"Reason": 9, "ProductIds": [PEPPERONI, MARGHERITA]}),
        ),
    )
    .await;
    // A RemoveStop without the product ids the producer must include.
    let no_ids = enqueue(
        &store,
        stop_event(
            "stoplist.remove-stop",
            "e0000000-0000-4000-8000-000000000003",
            json!({"Reason": 2}),
        ),
    )
    .await;
    wait_gone(&store, &serve, truffle).await;
    let err = wait_dead(&store, bad_reason).await;
    assert!(
        err.contains("violates its schema") && err.contains("/Reason: 9"),
        "{err}"
    );
    let err = wait_dead(&store, no_ids).await;
    assert!(
        err.contains("ProductIds") && err.contains("stoppedproduct"),
        "{err}"
    );
    assert_eq!(broker.read_all(&topic, 1).await, vec![]);
    let log = serve.stop();
    assert!(log.contains("covers no product"), "{log}");
}

on_both_backends!(
    stoplist_one_event_per_product,
    stoplist_pepperoni,
    stoplist_empty_and_invalid,
);

/// `kill -9` in the middle of a drain of 300 stops: after a restart every
/// event is done, and the topic holds exactly the expected EventIds, some
/// possibly twice, every duplicate identical to its first copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stoplist_duplicates_after_kill_9_carry_the_same_event_id() {
    let broker = Broker::any();
    let topic = broker.topic(3).await;
    let db = TestDb::postgres().await;
    let store = stoplist_db(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let config = stoplist_config(dir.path(), &broker, &topic);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text + "\n[runtime]\nlease_duration = \"2s\"\n").unwrap();
    let n = 300;
    let mut expected = BTreeSet::new();
    for i in 0..n {
        let product = format!("f0000000-0000-4000-8000-{i:012}");
        let stop = format!("f1000000-0000-4000-8000-{i:012}");
        expected.insert((product.clone(), stop.clone()));
        let mut ev = stop_event(
            "stoplist.stop",
            &stop,
            json!({"Reason": 0, "ProductId": product}),
        );
        // Spread over groups so the drain runs in parallel.
        ev.group_id = Some(format!("unit:{UNIT}:{}", i % 16));
        enqueue(&store, ev).await;
    }
    let first = Serve::ready(&db, &config).await;
    wait_for("some events handled", || async {
        let s = store.stats().await.unwrap();
        (s.pending + s.running + s.scheduled) < (n as i64) * 2 / 3
    })
    .await;
    first.send("KILL");
    let (_, _) = first.wait();
    // The killed instance's leases run out (2 s), then the rest runs.
    let restarted = Serve::ready(&db, &config).await;
    wait_for("every event done", || async {
        let s = store.stats().await.unwrap();
        s.pending == 0 && s.running == 0 && s.scheduled == 0 && s.dead == 0
    })
    .await;
    let records = broker.read_all(&topic, 3).await;
    let mut first_copy: BTreeMap<String, &Record> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for r in &records {
        let v = r.json();
        seen.insert((
            v["ProductId"].as_str().unwrap().to_string(),
            v["StopId"].as_str().unwrap().to_string(),
        ));
        if let Some(prev) = first_copy.get(r.id()) {
            assert_eq!(prev.body, r.body, "a duplicate is the same event");
            assert_eq!(prev.partition, r.partition);
        } else {
            first_copy.insert(r.id().to_string(), r);
        }
    }
    assert_eq!(seen, expected, "every product's event, nothing else");
    assert_eq!(first_copy.len(), n);
    eprintln!(
        "{} messages for {n} events ({} duplicates after kill -9)",
        records.len(),
        records.len() - n
    );
    restarted.stop();
}

// ---------------------------------------------------------------------------
// outrun bench --handler publish

/// The bench drains events that each publish one message, and measures the
/// producer alone against the same broker; every message lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_publish_reports_the_handler_and_the_producer_alone() {
    let broker = Broker::any();
    let topic = broker.topic(1).await;
    let db = TestDb::sqlite();
    let events = 300u64;
    let out = common::outrun_command(&db)
        .args([
            "bench",
            "--handler",
            "publish",
            "--json",
            "--concurrency",
            "8",
        ])
        .args(["--events", &events.to_string(), "--topic", &topic])
        .env("OUTRUN_BENCH_MODULE", guest("bench"))
        .env("OUTRUN_KAFKA_BROKERS", &broker.addr)
        .output()
        .unwrap();
    let report: Value = serde_json::from_str(&common::ok(&out)).unwrap();
    assert_eq!(report["handler"], "publish");
    assert_eq!(report["publish_backend"], "kafka");
    for key in [
        "events_per_sec",
        "producer_per_sec",
        "producer_batch_per_sec",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report}");
    }
    // The handler's messages plus the baseline's two rounds.
    let records = broker.read_all(&topic, 1).await;
    let handled = records
        .iter()
        .filter(|r| !r.id().starts_with("baseline-"))
        .count();
    assert_eq!(handled as u64, events, "one message per event");
    assert_eq!(records.len() as u64, events * 3);
    // Without a broker the bench says what to configure.
    let err = common::fails(
        &common::outrun_command(&TestDb::sqlite())
            .args(["bench", "--handler", "publish", "--events", "10"])
            .env("OUTRUN_BENCH_MODULE", guest("bench"))
            .env_remove("OUTRUN_KAFKA_BROKERS")
            .output()
            .unwrap(),
    );
    assert!(err.contains("OUTRUN_KAFKA_BROKERS"), "{err}");
}

/// `outrun handlers run` of a configured handler: without --commit its
/// publish calls are recorded and nothing reaches the broker; with --commit
/// they are sent to the config's broker, and the report says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_run_sends_publish_calls_only_with_commit() {
    let broker = Broker::any();
    let topic = broker.topic(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = probe_config(dir.path(), &kafka_section(&broker, "10s"), &[&topic]);
    let run = |id: &str, commit: bool| {
        let payload = json!({"messages": [probe_message(&topic, id, Some("k"), json!({"n": 1}))]})
            .to_string();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrun"));
        cmd.current_dir(dir.path())
            .env_remove("OUTRUN_DATABASE_URL")
            .arg("--config")
            .arg(&config)
            .args(["handlers", "run", "probe", "--event", "probe.publish"])
            .args(["--payload", &payload, "--json"]);
        if commit {
            cmd.arg("--commit");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let recorded = run("m-recorded", false);
    assert_eq!(
        recorded["published"][0]["topic"],
        topic.as_str(),
        "{recorded}"
    );
    assert_eq!(recorded["published"][0]["sent"], false, "{recorded}");
    let sent = run("m-sent", true);
    assert_eq!(sent["published"][0]["sent"], true, "{sent}");
    assert!(sent["published"][0]["error"].is_null(), "{sent}");

    let records = broker.read_all(&topic, 1).await;
    let ids: Vec<&str> = records.iter().map(|r| r.id()).collect();
    assert_eq!(ids, ["m-sent"], "only the --commit run reached the broker");
}
