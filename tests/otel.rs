//! OpenTelemetry end to end: the real `outrun serve` with `[otel]` pointed
//! at an OTLP/HTTP receiver inside this test (protobuf decoded with the
//! `opentelemetry-proto` types), the probe component, a local HTTP server.
//! A producer's `traceparent` → the attempt's span is its child → the
//! follow-up event the handler emits runs as a child of that span → its
//! HTTP call carries the follow-up's context: one trace. A malformed
//! `traceparent` is ignored with a warning and the event still runs.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use common::{Serve, TestDb, guest, wait_for};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use outrun::{InvalidEvent, NewEvent, StoreError};
use prost::Message;
use serde_json::json;

const PRODUCER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

/// Spans received, with the `service.name` of their resource.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver on 127.0.0.1: `POST /v1/traces`, protobuf.
async fn otlp_receiver() -> (u16, Received) {
    let received: Received = Arc::default();
    let r = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let r = r.clone();
            async move {
                assert_eq!(
                    headers.get("content-type").and_then(|v| v.to_str().ok()),
                    Some("application/x-protobuf"),
                    "OTLP/HTTP with protobuf"
                );
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                let mut spans = r.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|res| &res.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            spans.push((service.clone(), s));
                        }
                    }
                }
                ExportTraceServiceResponse::default().encode_to_vec()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, received)
}

/// A local HTTP server that records each request's `traceparent` header.
async fn http_server() -> (u16, Arc<Mutex<Vec<Option<String>>>>) {
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(
                headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            );
            "pong"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, seen)
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The span's attributes as text (ints in decimal).
fn attrs(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

async fn spans_one_trace_across_emits_and_http(db: TestDb) {
    let store = db.store().await;
    let (otlp_port, received) = otlp_receiver().await;
    let (http_port, seen) = http_server().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
poll_interval = "50ms"
shutdown_grace = "5s"

[otel]
endpoint = "http://127.0.0.1:{otlp_port}"
service_name = "outrun-otel-test"

[[handler]]
name = "probe"
module = "{probe}"
events = ["probe.emit", "probe.http", "probe.echo"]
max_retry = 1
[handler.allow]
emit = ["probe.http"]
http = ["127.0.0.1:{http_port}"]
"#,
            probe = guest("probe").display()
        ),
    )
    .unwrap();

    // Bad input at enqueue: refused with the value and the fix, nothing
    // written.
    let err = store
        .enqueue(
            &NewEvent::new("probe.echo", "{}").with_traceparent("00-abc-01"),
            5,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(InvalidEvent::TraceParent { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("00-abc-01"), "{err}");
    assert_eq!(db.scalar("SELECT count(*) FROM outbox_events").await, 0);

    let producer = format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01");
    let url = format!("http://127.0.0.1:{http_port}/hook");
    let first = store
        .enqueue(
            &NewEvent::new(
                "probe.emit",
                json!({"name": "probe.http", "payload": {"url": url, "expect_status": 200}})
                    .to_string(),
            )
            .with_traceparent(&producer),
            5,
        )
        .await
        .unwrap();
    // A producer in another language writes the column with plain SQL,
    // where nothing checks it: a malformed value must not stop the event.
    let bad = store
        .enqueue(&NewEvent::new("probe.echo", "{}"), 5)
        .await
        .unwrap();
    db.exec(&format!(
        "UPDATE outbox_events SET traceparent = 'not-a-traceparent' WHERE id = '{bad}'"
    ))
    .await;

    let serve = Serve::ready(&db, &config).await;
    for id in [first, bad] {
        wait_for(&format!("event {id} handled"), || async {
            store.get(id).await.unwrap().is_none()
        })
        .await;
    }
    wait_for("the follow-up's HTTP call", || async {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    wait_for("the follow-up handled", || async {
        db.scalar("SELECT count(*) FROM outbox_events").await == 0
    })
    .await;
    // A clean stop exports what the batch processor still holds.
    let log = serve.stop();
    assert!(
        log.contains("is not a W3C trace context") && log.contains("not-a-traceparent"),
        "a warning names the bad value; log:\n{log}"
    );

    let spans = received.lock().unwrap().clone();
    let named = |name: &str| -> Span {
        let found: Vec<&(String, Span)> = spans.iter().filter(|(_, s)| s.name == name).collect();
        assert_eq!(
            found.len(),
            1,
            "one span {name:?} in {spans:#?}; log:\n{log}"
        );
        assert_eq!(found[0].0, "outrun-otel-test", "service.name");
        found[0].1.clone()
    };
    let emit = named("process probe.emit");
    let follow = named("process probe.http");
    let echo = named("process probe.echo");

    // The attempt is the producer's child, in its trace.
    assert_eq!(hex(&emit.trace_id), PRODUCER_TRACE);
    assert_eq!(hex(&emit.parent_span_id), PRODUCER_SPAN);
    // The follow-up's attempt: same trace, child of the first attempt.
    assert_eq!(hex(&follow.trace_id), PRODUCER_TRACE);
    assert_eq!(follow.parent_span_id, emit.span_id);
    assert_ne!(follow.span_id, emit.span_id);
    // Its HTTP call carried the follow-up attempt's context.
    let header = seen.lock().unwrap()[0]
        .clone()
        .expect("a traceparent header");
    assert_eq!(
        header,
        format!("00-{PRODUCER_TRACE}-{}-01", hex(&follow.span_id)),
        "the HTTP call's traceparent"
    );

    let a = attrs(&emit);
    assert_eq!(a["outrun.event.id"], first.to_string());
    assert_eq!(a["outrun.event.name"], "probe.emit");
    assert_eq!(a["outrun.event.attempt"], "1");
    assert_eq!(a["outrun.handler.name"], "probe");
    assert_eq!(a["outrun.outcome"], "ok");
    assert_eq!(a["messaging.system"], "outrun");
    let version = &a["outrun.handler.version"];
    assert!(
        version.len() == 12 && version.chars().all(|c| c.is_ascii_hexdigit()),
        "handler version {version:?}"
    );
    let f = attrs(&follow);
    assert_eq!(f["outrun.event.name"], "probe.http");
    assert_eq!(f["outrun.outcome"], "ok");
    assert_eq!(&f["outrun.handler.version"], version);

    // The malformed context was ignored: a new trace, and the event ran.
    assert!(echo.parent_span_id.is_empty(), "{echo:?}");
    assert_ne!(hex(&echo.trace_id), PRODUCER_TRACE);
    assert_eq!(attrs(&echo)["outrun.event.id"], bad.to_string());
    assert_eq!(attrs(&echo)["outrun.outcome"], "ok");
}

/// A failing attempt's span says so: outcome and error status.
async fn failed_attempts_record_outcome(db: TestDb) {
    let store = db.store().await;
    let (otlp_port, received) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
poll_interval = "50ms"

[otel]
endpoint = "http://127.0.0.1:{otlp_port}/v1/traces"

[[handler]]
name = "probe"
module = "{probe}"
events = ["probe.fail"]
"#,
            probe = guest("probe").display()
        ),
    )
    .unwrap();
    let id = store
        .enqueue(
            &NewEvent::new(
                "probe.fail",
                json!({"message": "no such account", "retryable": false}).to_string(),
            ),
            5,
        )
        .await
        .unwrap();
    let serve = Serve::ready(&db, &config).await;
    wait_for("the event dead", || async {
        store.get(id).await.unwrap().is_some_and(|e| e.is_dead())
    })
    .await;
    let log = serve.stop();
    let spans = received.lock().unwrap().clone();
    assert_eq!(spans.len(), 1, "{spans:#?}; log:\n{log}");
    let (service, span) = &spans[0];
    assert_eq!(service, "outrun", "the default service.name");
    assert_eq!(attrs(span)["outrun.outcome"], "dead");
    let status = span.status.clone().expect("a status");
    // STATUS_CODE_ERROR
    assert_eq!(status.code, 2);
    assert!(status.message.contains("no such account"), "{status:?}");
}

/// A native handler (the Rust API): "parent" records its attempt's trace
/// context and emits "child"; "child" records the event it got.
#[derive(Clone, Default)]
struct Chain {
    parent_trace: Arc<Mutex<Vec<Option<String>>>>,
    children: Arc<Mutex<Vec<outrun::Event>>>,
}

#[async_trait::async_trait]
impl outrun::Handler for Chain {
    async fn handle(
        &self,
        ev: &outrun::Event,
        effects: &mut outrun::Effects,
    ) -> Result<outrun::Outcome, outrun::HandlerError> {
        if ev.name == "parent" {
            self.parent_trace
                .lock()
                .unwrap()
                .push(effects.trace().map(|t| t.to_string()));
            effects
                .emit(NewEvent::new("child", "{}"))
                .map_err(|e| outrun::HandlerError::reject(e.to_string()))?;
        } else {
            self.children.lock().unwrap().push(ev.clone());
        }
        Ok(outrun::Outcome::Done)
    }
}

/// Run "parent" (with the producer's context) to its child, with or
/// without `[otel]`; the parent's trace context and the child as run.
async fn run_chain(db: &TestDb, otel: bool) -> (Option<String>, outrun::Event) {
    let store = db.store().await;
    let chain = Chain::default();
    let router = outrun::StaticRouter::new()
        .with("parent", chain.clone())
        .with("child", chain.clone());
    let config = outrun::config::RuntimeConfig {
        poll_interval: std::time::Duration::from_millis(50),
        ..Default::default()
    };
    let mut dispatcher = outrun::dispatch::Dispatcher::new(store.clone(), Arc::new(router), config);
    let tracer = otel.then(|| {
        // Nothing listens there: exports fail in the background, which
        // must not touch the events.
        let port = common::free_port();
        Arc::new(
            outrun::otel::Otel::start(&outrun::config::OtelConfig {
                endpoint: Some(format!("http://127.0.0.1:{port}")),
                service_name: None,
            })
            .unwrap(),
        )
    });
    if let Some(t) = &tracer {
        dispatcher = dispatcher.with_otel(t.clone());
    }
    let producer = format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01");
    store
        .enqueue(
            &NewEvent::new("parent", "{}").with_traceparent(&producer),
            5,
        )
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { dispatcher.run_until(s).await.unwrap() });
    wait_for("the child handled", || async {
        !chain.children.lock().unwrap().is_empty()
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    if let Some(t) = tracer {
        t.shutdown(std::time::Duration::from_secs(2)).await;
    }
    let parent = chain.parent_trace.lock().unwrap()[0].clone();
    let child = chain.children.lock().unwrap()[0].clone();
    (parent, child)
}

/// With `[otel]`, `Effects::emit` gives a follow-up the attempt's context;
/// without it there is no context at all (nothing is traced, nothing is
/// propagated: the per-event cost is one branch).
async fn rust_api_emits_carry_the_attempt_context(db: TestDb) {
    let (parent, child) = run_chain(&db, true).await;
    let parent = parent.expect("the traced attempt has a context");
    assert_eq!(child.traceparent.as_deref(), Some(parent.as_str()));
    assert!(
        parent.starts_with(&format!("00-{PRODUCER_TRACE}-")) && !parent.contains(PRODUCER_SPAN),
        "a child span of the producer's trace: {parent}"
    );

    let off = match &db {
        TestDb::Sqlite { .. } => TestDb::sqlite(),
        TestDb::Postgres { .. } => TestDb::postgres().await,
    };
    let (parent, child) = run_chain(&off, false).await;
    assert_eq!(parent, None);
    assert_eq!(child.traceparent, None);
}

/// An application may deploy a new outrun before `outrun migrate` adds the
/// column: enqueue without a traceparent does not name it, so it still
/// works (one event, a batch, inside the caller's transaction).
async fn enqueue_without_traceparent_works_before_the_migration(db: TestDb) {
    let store = db.store().await;
    db.exec("ALTER TABLE outbox_events DROP COLUMN traceparent")
        .await;
    store
        .enqueue(&NewEvent::new("a", "{}"), 5)
        .await
        .expect("a plain enqueue does not need the column");
    store
        .enqueue_batch(&[NewEvent::new("b", "{}"), NewEvent::new("c", "{}")], 5)
        .await
        .expect("a plain batch does not need the column");
    let traced = NewEvent::new("d", "{}")
        .with_traceparent(format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01"));
    let err = store.enqueue(&traced, 5).await.unwrap_err();
    assert!(err.to_string().contains("traceparent"), "{err}");
    assert_eq!(db.scalar("SELECT count(*) FROM outbox_events").await, 3);
}

/// The column round-trips through every enqueue path and `get`.
async fn traceparent_is_stored_as_given(db: TestDb) {
    let store = db.store().await;
    let tp = format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-00");
    let ids = store
        .enqueue_batch(
            &[
                NewEvent::new("a", "{}").with_traceparent(&tp),
                NewEvent::new("b", "{}"),
            ],
            5,
        )
        .await
        .unwrap();
    let one = store
        .enqueue(&NewEvent::new("c", "{}").with_traceparent(&tp), 5)
        .await
        .unwrap();
    let got = |id| {
        let store = store.clone();
        async move { store.get(id).await.unwrap().unwrap().traceparent }
    };
    assert_eq!(got(ids[0]).await.as_deref(), Some(tp.as_str()));
    assert_eq!(got(ids[1]).await, None);
    assert_eq!(got(one).await.as_deref(), Some(tp.as_str()));
}

on_both_backends!(
    traceparent_is_stored_as_given,
    enqueue_without_traceparent_works_before_the_migration,
    spans_one_trace_across_emits_and_http,
    failed_attempts_record_outcome,
    rust_api_emits_carry_the_attempt_context
);

/// `outrun enqueue --traceparent` and an NDJSON line's `traceparent` store
/// the producer's context.
#[tokio::test]
async fn cli_enqueue_stores_the_traceparent() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let tp = format!("00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01");
    let id = common::ok(&common::outrun(
        &db,
        &["enqueue", "a", "--payload", "{}", "--traceparent", &tp],
    ));
    let dir = tempfile::tempdir().unwrap();
    let ndjson = dir.path().join("events.ndjson");
    std::fs::write(
        &ndjson,
        format!(
            "{}\n",
            json!({"name": "b", "payload": {}, "traceparent": tp})
        ),
    )
    .unwrap();
    let batch = common::ok(&common::outrun(
        &db,
        &["enqueue", "--ndjson", ndjson.to_str().unwrap()],
    ));
    for id in [id.trim(), batch.trim()] {
        let ev = store.get(id.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(ev.traceparent.as_deref(), Some(tp.as_str()), "{id}");
    }
}

/// `outrun enqueue --traceparent` refuses a malformed value before it
/// connects, naming the value and the expected form.
#[test]
fn cli_refuses_a_malformed_traceparent() {
    let db = TestDb::sqlite();
    let out = common::outrun(
        &db,
        &[
            "enqueue",
            "probe.echo",
            "--payload",
            "{}",
            "--traceparent",
            "00-xyz",
        ],
    );
    let err = common::fails(&out);
    assert!(
        err.contains("00-xyz") && err.contains("W3C") && err.contains("00-4bf92f"),
        "{err}"
    );
}
