//! Per-event host overhead of a WebAssembly handler: everything
//! [`Handler::handle`] does for one event — a fresh `Store` and host state,
//! instantiation from the pre-linked component, the `handle` call, and the
//! teardown that returns the instance's slot to the pooling allocator — with
//! no database (the bench guest writes nothing, so no transaction opens).
//!
//! The handler comes from the real [`Registry`] with the bench guest built by
//! `scripts/build-guests.sh`, exactly as `outrun serve` would load it.
//!
//! `cargo bench -p outrun --bench host_overhead`

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use outrun::wasm::{HandlerSpec, HostServices, Registry};
use outrun::{Effects, Event, Outcome, Router};

fn guest() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guests/bench.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-guests.sh",
        path.display()
    );
    path
}

fn event(name: &str, payload: &str) -> Event {
    let now = chrono::Utc::now();
    Event {
        id: uuid::Uuid::now_v7(),
        name: name.into(),
        payload: payload.into(),
        group_id: None,
        retry: 0,
        max_retry: 5,
        create_date: now,
        available_at: now,
        expires_at: None,
        locked_by: Some("bench".into()),
        locked_until: Some(now),
        last_error: None,
        idempotency_key: None,
        dead_at: None,
        deferrals: 0,
        traceparent: None,
    }
}

/// The 200-byte payload `outrun bench --handler json` sends.
const JSON_PAYLOAD: &str = r#"{"id":4711,"customer":"c-0042","amount_cents":12999,"items":[{"sku":"sku-1","qty":2},{"sku":"sku-2","qty":1}],"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;

fn host_overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cache = tempfile::tempdir().expect("temp dir");
    let registry: Arc<Registry> = rt
        .block_on(Registry::load(
            vec![HandlerSpec {
                name: "bench".into(),
                events: vec!["bench.noop".into(), "bench.json".into()],
                module: guest(),
                max_retry: None,
                timeout: Duration::from_secs(30),
                memory: outrun::wasm::spec::DEFAULT_MEMORY,
                concurrency: None,
                instances: outrun::wasm::InstanceMode::Fresh,
                reuse_events: outrun::wasm::spec::DEFAULT_REUSE_EVENTS,
                allow: Default::default(),
                source: None,
                build: None,
            }],
            cache.path(),
            HostServices {
                cache_dir: Some(cache.path().to_path_buf()),
                max_instances: 64,
                ..HostServices::default()
            },
        ))
        .expect("load the bench guest");

    let mut group = c.benchmark_group("fresh_instance_per_event");
    for (name, payload) in [("bench.noop", r#"{"id":1}"#), ("bench.json", JSON_PAYLOAD)] {
        let route = registry.route(name).expect("route");
        let ev = event(name, payload);
        group.bench_function(name, |b| {
            // One block_on per sample batch, not per event, so the numbers
            // are the handler's and not the executor's.
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let mut effects = Effects::default();
                        let out = route.handler.handle(black_box(&ev), &mut effects).await;
                        assert!(matches!(out, Ok(Outcome::Done)), "{out:?}");
                    }
                    started.elapsed()
                })
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(2));
    targets = host_overhead
}
criterion_main!(benches);
