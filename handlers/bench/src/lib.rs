//! `bench`: the guest `outrun bench` and the host-overhead benchmark run. It
//! is an ordinary handler built on the SDK like any other, so a measurement
//! includes everything a real handler pays (WIT lifting of the event, SDK
//! conversion, the outcome going back).
//!
//! | event | does |
//! |---|---|
//! | `bench.noop` | `Done` (measures the runtime's own cost per event) |
//! | `bench.json` | parses the payload into [`Order`] with serde_json, reads a field, `Done` |
//!
//! Any other name is rejected, so a misrouted benchmark shows up as dead
//! events instead of a suspiciously fast run.

use std::hint::black_box;

use outrun_sdk::{Event, HandlerError, Outcome};
use serde::Deserialize;

/// The payload shape `outrun bench --handler json` enqueues. Unknown fields
/// (the padding that brings a payload to `--payload-bytes`) are ignored, as a
/// real consumer of a growing schema would.
#[derive(Debug, Deserialize)]
pub struct Order {
    pub id: u64,
    pub customer: String,
    pub amount_cents: i64,
    pub items: Vec<Item>,
}

#[derive(Debug, Deserialize)]
pub struct Item {
    pub sku: String,
    pub qty: u32,
}

fn handle(ev: Event) -> Result<Outcome, HandlerError> {
    match ev.name.as_str() {
        "bench.noop" => Ok(Outcome::Done),
        "bench.json" => {
            let order: Order = ev.json()?;
            // Touch the data so the parse cannot be optimised away.
            let qty: u64 = order.items.iter().map(|i| u64::from(i.qty)).sum();
            black_box((order.id, order.customer.len(), order.amount_cents, qty));
            Ok(Outcome::Done)
        }
        other => Err(HandlerError::reject(format!(
            "the bench guest handles bench.noop and bench.json, not {other:?}"
        ))),
    }
}

outrun_sdk::export_handler!(handle);
