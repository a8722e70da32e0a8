//! `bench`: the guest `outrun bench` and the host-overhead benchmark run. It
//! is an ordinary handler built on the SDK like any other, so a measurement
//! includes everything a real handler pays (WIT lifting of the event, SDK
//! conversion, the outcome going back).
//!
//! | event | does |
//! |---|---|
//! | `bench.noop` | `Done` (measures the runtime's own cost per event) |
//! | `bench.json` | parses the payload into [`Order`] with serde_json, reads a field, `Done` |
//! | `bench.sql` | one `INSERT` into [`SQL_TABLE`] through the `sql` capability, `Done` |
//! | `bench.emit` | emits one [`FOLLOW_UP`] event through the `emit` capability, `Done` |
//! | `bench.publish` | publishes the payload as one message (id and key: the event id) to the topic of config key `topic`, waits for the broker's ack, `Done` |
//!
//! Any other name is rejected, so a misrouted benchmark shows up as dead
//! events instead of a suspiciously fast run.

use std::hint::black_box;
use std::time::Duration;

use outrun_sdk::emit::{EmitOptions, emit_raw};
use outrun_sdk::publish::{Message, publish};
use outrun_sdk::{Event, HandlerError, Outcome, config, sql};
use serde::Deserialize;

/// The table `bench.sql` writes to. `outrun bench --handler sql` creates it
/// before the run and drops it after checking it holds one row per event.
pub const SQL_TABLE: &str = "outrun_bench_rows";

/// The event `bench.emit` emits. Nothing binds it and it is delayed by
/// [`FOLLOW_UP_DELAY`], so the follow-ups stay in the outbox, unhandled,
/// while the bench measures the originals; it counts them afterwards.
pub const FOLLOW_UP: &str = "bench.followup";

/// Far beyond any bench run, so no follow-up becomes due during one.
pub const FOLLOW_UP_DELAY: Duration = Duration::from_secs(3600);

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
        "bench.sql" => {
            // The row is as large as the event, as a handler that records
            // what it received would write. `$n` works on both backends.
            sql::execute(
                &format!(
                    "INSERT INTO {SQL_TABLE} (event_id, attempt, payload) VALUES ($1, $2, $3)"
                ),
                &sql::params![ev.id.as_str(), ev.attempt, ev.payload.as_str()],
            )?;
            Ok(Outcome::Done)
        }
        "bench.emit" => {
            // `of` lets the bench check there is one follow-up per original;
            // the original payload keeps the follow-up a realistic size.
            let payload = format!(r#"{{"of":"{}","data":{}}}"#, ev.id, ev.payload);
            emit_raw(
                FOLLOW_UP,
                &payload,
                &EmitOptions::new().delay(FOLLOW_UP_DELAY),
            )?;
            Ok(Outcome::Done)
        }
        "bench.publish" => {
            let topic = config::require("topic")?;
            let message =
                Message::new(topic, ev.id.as_str(), ev.payload.as_str()).key(ev.id.as_str());
            publish(&message)?;
            Ok(Outcome::Done)
        }
        other => Err(HandlerError::reject(format!(
            "the bench guest handles bench.noop, bench.json, bench.sql, bench.emit and bench.publish, not {other:?}"
        ))),
    }
}

outrun_sdk::export_handler!(handle);
