//! What the dispatch-time schema check costs per event: parse the payload
//! text and validate it against its cached schema (the check every claimed
//! event of a name with a schema gets, because rows inserted by plain SQL
//! never met the enqueue check). Compared with the parse alone, and with a
//! name that has no schema (one hash lookup).
//!
//! `cargo bench -p outrun --bench schema_check`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use outrun::Schemas;

/// The bench guest's payload shape: an id and padding up to 200 bytes.
fn payload() -> String {
    let pad = "x".repeat(180);
    format!("{{\"id\":12345,\"pad\":\"{pad}\"}}")
}

fn schemas() -> (tempfile::TempDir, Schemas) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("bench.noop.json"),
        r#"{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "type": "object",
  "required": ["id", "pad"],
  "additionalProperties": false,
  "properties": {"id": {"type": "integer"}, "pad": {"type": "string"}}
}"#,
    )
    .expect("write schema");
    let schemas = Schemas::load(dir.path(), false).expect("load schemas");
    (dir, schemas)
}

fn bench(c: &mut Criterion) {
    let (_dir, schemas) = schemas();
    let text = payload();
    let mut g = c.benchmark_group("schema_check_per_event");
    g.bench_function("parse_only", |b| {
        b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(&text)).unwrap()))
    });
    g.bench_function("parse_and_validate", |b| {
        b.iter(|| {
            schemas
                .check(black_box("bench.noop"), black_box(&text))
                .unwrap()
        })
    });
    g.bench_function("name_without_schema", |b| {
        b.iter(|| {
            schemas
                .check(black_box("other.event"), black_box(&text))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
