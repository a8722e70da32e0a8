//! {{name}}: an outrun event handler, built as a WebAssembly component.
//!
//! It handles `order.created` and shows each capability once: the event
//! payload, `kv` (a cache), outgoing HTTP, `sql` (written in the transaction
//! that acknowledges the event), `emit` (a follow-up event, inserted by that
//! same transaction) and logging. Replace the example with your own logic.
//!
//!   cargo build --target wasm32-wasip2 --release
//!   outrun handlers check target/wasm32-wasip2/release/{{crate}}.wasm
//!   outrun handlers run target/wasm32-wasip2/release/{{crate}}.wasm \
//!       --event order.created --payload @events/order.created.json \
//!       --http-fixtures fixtures/http.json --database sqlite://app.db
//!   cargo test                     # the unit tests below, on the host
//!   outrun serve --config outrun.toml

use std::time::Duration;

use outrun_sdk::emit::{self, EmitOptions};
use outrun_sdk::{Event, HandlerError, Outcome, config, http, kv, log, sql};
use serde::{Deserialize, Serialize};

/// The payload of `order.created`. Fields the producer adds later are
/// ignored, so producers can move first.
#[derive(Debug, Deserialize)]
pub struct OrderCreated {
    pub order_id: i64,
    pub customer_id: i64,
    pub amount_cents: i64,
}

/// What the customer service answers.
#[derive(Debug, Deserialize, Serialize)]
pub struct Customer {
    pub email: String,
    #[serde(default)]
    pub vip: bool,
}

/// The payload of the follow-up event.
#[derive(Debug, Serialize, PartialEq)]
pub struct Welcomed {
    pub order_id: i64,
    pub email: String,
    pub tier: &'static str,
}

/// Pure logic lives in plain functions: `cargo test` checks them on the
/// host, no runtime needed (capability calls only work inside outrun; test
/// those with `outrun handlers run`).
pub fn tier(amount_cents: i64, vip: bool) -> &'static str {
    if vip || amount_cents >= 10_000 {
        "gold"
    } else {
        "standard"
    }
}

fn handle(ev: Event) -> Result<Outcome, HandlerError> {
    // The payload: one that does not parse is rejected (the event is dead at
    // once), since retrying cannot fix it.
    let order: OrderCreated = ev.json()?;

    // kv: a cache of customers, shared by all events of this handler. Keys
    // are confined to the handler's prefix (`kv` in [handler.allow]).
    let cache_key = format!("customer:{}", order.customer_id);
    let customer: Customer = match kv::get_string(&cache_key)? {
        Some(cached) => serde_json::from_str(&cached)
            .map_err(|e| HandlerError::retry(format!("cached customer: {e}")))?,
        None => {
            // HTTP: hosts must be listed in `http` of [handler.allow]. A 5xx,
            // 429 or timeout is retried with backoff; another error status
            // rejects the event.
            let base = config::get("customers_url")
                .unwrap_or_else(|| "http://customers.local".to_string());
            let url = format!("{base}/customers/{}", order.customer_id);
            let customer: Customer = http::get(&url)?.error_for_status()?.json()?;
            let text = serde_json::to_string(&customer)
                .map_err(|e| HandlerError::reject(e.to_string()))?;
            kv::set(&cache_key, text, Some(Duration::from_secs(600)))?;
            customer
        }
    };

    // sql: runs inside the transaction that acknowledges the event, so the
    // row exists exactly when the event is done. Delivery is at least once:
    // ON CONFLICT makes a second delivery a no-op.
    let tier = tier(order.amount_cents, customer.vip);
    let inserted = sql::execute(
        "INSERT INTO order_tiers (order_id, tier) VALUES ($1, $2) ON CONFLICT (order_id) DO NOTHING",
        &[order.order_id.into(), tier.into()],
    )?;
    if inserted == 0 {
        log::info(format!("order {} was handled before", order.order_id));
        return Ok(Outcome::Done);
    }

    // emit: a follow-up event, inserted by the same transaction.
    let welcomed = Welcomed {
        order_id: order.order_id,
        email: customer.email,
        tier,
    };
    emit::emit(
        "customer.welcomed",
        &welcomed,
        &EmitOptions::new().group_id(format!("customer:{}", order.customer_id)),
    )?;

    // Logging: lines go to outrun's log with the handler, event id and
    // version attached.
    log::info(format!("order {} is {tier}", order.order_id));
    Ok(Outcome::Done)
}

outrun_sdk::export_handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_orders_and_vips_are_gold() {
        assert_eq!(tier(10_000, false), "gold");
        assert_eq!(tier(500, true), "gold");
        assert_eq!(tier(9_999, false), "standard");
    }

    #[test]
    fn the_example_payload_parses() {
        let order: OrderCreated =
            serde_json::from_str(include_str!("../events/order.created.json")).unwrap();
        assert_eq!(order.order_id, 1001);
    }
}
