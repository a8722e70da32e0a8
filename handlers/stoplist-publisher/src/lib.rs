//! # stoplist-publisher
//!
//! Seed 003: whenever products enter or leave a restaurant's (unit's) stop
//! list in the monolith, publish one `ProductStopListEvent` per product to
//! Kafka, so services outside the monolith can keep their own copy of the
//! stop list. A product can be stopped for several reasons at once (an
//! ingredient ran out, the oven is being cleaned); each stop has its own
//! `StopId`, and lifting one stop publishes `RemovedFromStop` for that
//! `StopId` only: consumers keep the product unavailable while any other
//! stop of it holds.
//!
//! ## Events (the monolith's outbox)
//! Enqueued by `StopListService` in the transaction that changes the stop
//! list, with **group id `unit:<UnitId>`**, so a stop and its removal are
//! handled in the order they happened. Ids are UUIDs; `At` is the unit's
//! local time as RFC 3339 with its offset (`2024-05-01T15:00:00+03:00`);
//! `Reason` as in the schema (0-4).
//!
//! | event | payload | products |
//! |---|---|---|
//! | `stoplist.stop` (`Stop`) | `{"StopId","UnitId","CountryId","MonolithId","At","Reason", "ProductId" or "IngredientId"}` | the product, or every product containing the ingredient (`stoplist_product_ingredient`) |
//! | `stoplist.stop-oven` (`StopOven`) | `{"StopId","UnitId","CountryId","MonolithId","At","Reason"?}` (`Reason` defaults to 2) | every baking product (`stoplist_baking_product`) on the unit's menu (`stoplist_unit_menu_product`) |
//! | `stoplist.remove-stop` (`RemoveStop`) | `{"StopId","UnitId","CountryId","MonolithId","At","Reason","ProductIds":[...]}` | exactly `ProductIds` |
//!
//! **The `RemoveStop` contract.** `RemoveStop(stoppedItemId)` knows only the
//! stop's id, and its SQL deletes the `stoppedproduct` rows. So the
//! producer's transaction first reads them, `SELECT ProductUUId FROM
//! stoppedproduct WHERE StoppedItemUUId = @stoppedItemUUId`, puts them in
//! `ProductIds` (with the stop's `Reason` from `stoppedItem`), enqueues the
//! event and only then runs the deletes: the outbox row and the deletion
//! commit together, and the handler never needs rows that are gone.
//!
//! The products of an ingredient or oven stop are read from the menu tables
//! when the event is handled, normally moments after the monolith's commit;
//! a menu change in between is not reflected. A producer that wants the
//! exact set it wrote to `stoppedproduct` can send `stoplist.stop` once per
//! product instead (same `StopId`).
//!
//! ## What is published
//! One message per product (duplicates in the input collapse), to topic
//! `topic` (config), key `<UnitId>:<ProductId>` (all events of one product
//! of one unit in one partition, in order), header `message-id` = `EventId`,
//! body the `ProductStopListEvent` JSON of `ProductStopListEvent.schema.json`
//! (the seed's schema, corrected). `EventId` = UUIDv5 in [`NAMESPACE`] of
//! (`StopId`, `ProductId`, `ActionType`) (`outrun_sdk::id::uuid_v5`): a rerun
//! of the event publishes the same ids, and consumers drop the duplicates.
//! `AtUtc` is `At` converted to UTC.
//!
//! Every message is built and validated against the schema before the
//! first is published: a payload that cannot make valid events is rejected
//! (dead at once) with nothing published. A stop that covers no product (an
//! ingredient no product contains, an oven with no baking product on the
//! menu, an empty `ProductIds`) publishes nothing and is done.
//!
//! ## Config keys (`[handler.allow.config]`)
//! | key | default | meaning |
//! |---|---|---|
//! | `topic` | `stoplist.products` | where the events go |
//!
//! ## Capabilities
//! `sql` (reads the tables of `migrations/apps/stoplist-publisher/`, which
//! stand for the monolith's menu data), `publish` to `topic`, logging,
//! config.

pub mod schema;

use std::collections::BTreeSet;

use outrun_sdk::id::{Uuid, uuid_v5};
use outrun_sdk::publish::{self, Message};
use outrun_sdk::sql::{self, Value};
use outrun_sdk::{Event, HandlerError, Outcome, config, log};
use serde::{Deserialize, Serialize};

/// `stoplist.stop`: a product or an ingredient is stopped.
pub const STOP: &str = "stoplist.stop";
/// `stoplist.stop-oven`: oven cleaning starts.
pub const STOP_OVEN: &str = "stoplist.stop-oven";
/// `stoplist.remove-stop`: a stop is lifted.
pub const REMOVE_STOP: &str = "stoplist.remove-stop";

/// Where the events go unless `topic` is configured.
pub const DEFAULT_TOPIC: &str = "stoplist.products";

/// Namespace of the `EventId`s (a fixed random UUID; consumers can
/// recompute an id from it).
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_2c3a_8b4e_4f5a_9c7d_1e2f_3a4b_5c6d);

/// Reason of an oven stop when the payload gives none: equipment
/// maintenance.
const REASON_OVEN: i64 = 2;

/// `ActionType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    AddedToStop = 0,
    RemovedFromStop = 1,
}

/// The fields every stop-list event carries.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct StopPayload {
    pub stop_id: String,
    pub unit_id: String,
    pub country_id: i64,
    pub monolith_id: String,
    pub at: String,
    #[serde(default)]
    pub reason: Option<i64>,
    #[serde(default)]
    pub product_id: Option<String>,
    #[serde(default)]
    pub ingredient_id: Option<String>,
    #[serde(default)]
    pub product_ids: Option<Vec<String>>,
}

/// One message body: the seed's `ProductStopListEvent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProductStopListEvent {
    pub event_id: String,
    pub country_id: i64,
    pub monolith_id: String,
    pub at_utc: String,
    pub at: String,
    pub product_id: String,
    pub action_type: i64,
    pub unit_id: String,
    pub stop_id: String,
    pub reason: i64,
}

/// What one outbox event asks for: which action, and where the products
/// come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Products {
    Product(String),
    Ingredient(String),
    Oven,
    Listed(Vec<String>),
}

/// A validated request: the action, its product source and the common
/// fields, ids in canonical (lowercase, hyphenated) form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub action: Action,
    pub products: Products,
    pub stop_id: String,
    pub unit_id: String,
    pub country_id: i64,
    pub monolith_id: String,
    pub at: String,
    pub at_utc: String,
    pub reason: i64,
}

fn reject(ev: &Event, what: impl std::fmt::Display) -> HandlerError {
    HandlerError::reject(format!("`{}` event {}: {what}", ev.name, ev.id))
}

/// An id field as a canonical UUID, or a rejection naming the field.
fn uuid_field(ev: &Event, field: &str, value: &str) -> Result<String, HandlerError> {
    Uuid::parse_str(value.trim())
        .map(|u| u.hyphenated().to_string())
        .map_err(|e| reject(ev, format!("`{field}` {value:?} is not a UUID ({e})")))
}

impl Request {
    /// Parse the payload of `ev` (one of the three event names).
    pub fn parse(ev: &Event) -> Result<Request, HandlerError> {
        let p: StopPayload = ev.json_object()?;
        let only = |allowed: &[&str]| -> Result<(), HandlerError> {
            let present = [
                ("ProductId", p.product_id.is_some()),
                ("IngredientId", p.ingredient_id.is_some()),
                ("ProductIds", p.product_ids.is_some()),
            ];
            match present.iter().find(|(n, set)| *set && !allowed.contains(n)) {
                Some((n, _)) => Err(reject(ev, format!("`{n}` does not belong in this event"))),
                None => Ok(()),
            }
        };
        let (action, products, reason) = match ev.name.as_str() {
            STOP => {
                only(&["ProductId", "IngredientId"])?;
                let products = match (&p.product_id, &p.ingredient_id) {
                    (Some(id), None) => Products::Product(uuid_field(ev, "ProductId", id)?),
                    (None, Some(id)) => Products::Ingredient(uuid_field(ev, "IngredientId", id)?),
                    _ => {
                        return Err(reject(
                            ev,
                            "needs exactly one of `ProductId` and `IngredientId`",
                        ));
                    }
                };
                let reason = p.reason.ok_or_else(|| reject(ev, "`Reason` is missing"))?;
                (Action::AddedToStop, products, reason)
            }
            STOP_OVEN => {
                only(&[])?;
                (
                    Action::AddedToStop,
                    Products::Oven,
                    p.reason.unwrap_or(REASON_OVEN),
                )
            }
            REMOVE_STOP => {
                only(&["ProductIds"])?;
                let ids = p.product_ids.as_ref().ok_or_else(|| {
                    reject(
                        ev,
                        "`ProductIds` is missing: the producer reads them from stoppedproduct before deleting the stop",
                    )
                })?;
                let ids = ids
                    .iter()
                    .map(|id| uuid_field(ev, "ProductIds", id))
                    .collect::<Result<Vec<_>, _>>()?;
                let reason = p.reason.ok_or_else(|| reject(ev, "`Reason` is missing"))?;
                (Action::RemovedFromStop, Products::Listed(ids), reason)
            }
            other => {
                return Err(reject(
                    ev,
                    format!(
                        "stoplist-publisher does not handle {other:?}; bind only {STOP}, {STOP_OVEN}, {REMOVE_STOP}"
                    ),
                ));
            }
        };
        let at = chrono::DateTime::parse_from_rfc3339(p.at.trim()).map_err(|e| {
            reject(
                ev,
                format!(
                    "`At` {:?} is not an RFC 3339 date-time with an offset ({e})",
                    p.at
                ),
            )
        })?;
        Ok(Request {
            action,
            products,
            stop_id: uuid_field(ev, "StopId", &p.stop_id)?,
            unit_id: uuid_field(ev, "UnitId", &p.unit_id)?,
            country_id: p.country_id,
            monolith_id: uuid_field(ev, "MonolithId", &p.monolith_id)?,
            at: p.at.trim().to_string(),
            at_utc: at
                .with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            reason,
        })
    }

    /// The event for one product.
    pub fn event_for(&self, product_id: &str) -> ProductStopListEvent {
        let action = (self.action as i64).to_string();
        ProductStopListEvent {
            event_id: uuid_v5(&NAMESPACE, &[&self.stop_id, product_id, &action]).to_string(),
            country_id: self.country_id,
            monolith_id: self.monolith_id.clone(),
            at_utc: self.at_utc.clone(),
            at: self.at.clone(),
            product_id: product_id.to_string(),
            action_type: self.action as i64,
            unit_id: self.unit_id.clone(),
            stop_id: self.stop_id.clone(),
            reason: self.reason,
        }
    }
}

/// Build every message for `products`, validating each against the
/// schema; the first invalid one rejects the whole event.
pub fn messages(
    ev: &Event,
    req: &Request,
    products: &BTreeSet<String>,
    topic: &str,
) -> Result<Vec<Message>, HandlerError> {
    let schema: serde_json::Value =
        serde_json::from_str(schema::SCHEMA).expect("the embedded schema is JSON");
    let mut out = Vec::with_capacity(products.len());
    for product in products {
        let event = req.event_for(product);
        let value = serde_json::to_value(&event).expect("the event serialises");
        let errors = schema::validate(&schema, &value);
        if !errors.is_empty() {
            return Err(reject(
                ev,
                format!(
                    "the ProductStopListEvent for product {product} violates its schema, nothing was published: {}",
                    errors.join("; ")
                ),
            ));
        }
        let message = Message::json(topic, &event.event_id, &event)?
            .key(format!("{}:{}", req.unit_id, product));
        out.push(message);
    }
    Ok(out)
}

fn product_ids(rows: &sql::Rows) -> Result<BTreeSet<String>, HandlerError> {
    rows.iter()
        .map(|r| {
            r.str("product_id")
                .map(|s| s.to_ascii_lowercase())
                .map_err(|e| HandlerError::retry(format!("reading product ids: {e}")))
        })
        .collect()
}

/// The products the request covers, read from the menu tables when needed.
fn resolve(req: &Request) -> Result<BTreeSet<String>, HandlerError> {
    Ok(match &req.products {
        Products::Product(id) => BTreeSet::from([id.clone()]),
        Products::Listed(ids) => ids.iter().cloned().collect(),
        Products::Ingredient(id) => product_ids(&sql::query(
            "SELECT product_id FROM stoplist_product_ingredient WHERE ingredient_id = $1",
            &[Value::from(id.as_str())],
        )?)?,
        Products::Oven => product_ids(&sql::query(
            "SELECT b.product_id FROM stoplist_baking_product b \
             JOIN stoplist_unit_menu_product m ON m.product_id = b.product_id \
             WHERE m.unit_id = $1",
            &[Value::from(req.unit_id.as_str())],
        )?)?,
    })
}

fn handle(ev: Event) -> Result<Outcome, HandlerError> {
    let req = Request::parse(&ev)?;
    let topic = config::get("topic").unwrap_or_else(|| DEFAULT_TOPIC.to_string());
    let products = resolve(&req)?;
    let messages = messages(&ev, &req, &products, &topic)?;
    if messages.is_empty() {
        log::info(format!(
            "stop {} of unit {} covers no product: nothing to publish",
            req.stop_id, req.unit_id
        ));
        return Ok(Outcome::Done);
    }
    publish::publish_all(&messages)?;
    log::info(format!(
        "published {} {:?} event(s) of stop {} to {topic}",
        messages.len(),
        req.action,
        req.stop_id
    ));
    Ok(Outcome::Done)
}

outrun_sdk::export_handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, payload: serde_json::Value) -> Event {
        Event {
            id: "0191d1f0-0000-7000-8000-000000000001".into(),
            name: name.into(),
            payload: payload.to_string(),
            group_id: Some("unit:u".into()),
            attempt: 1,
            max_attempts: 5,
            created_at_ms: 0,
            expires_at_ms: None,
        }
    }

    fn base() -> serde_json::Value {
        json!({
            "StopId": "33333333-3333-3333-3333-33333333AAAA",
            "UnitId": "22222222-2222-2222-2222-222222222222",
            "CountryId": 643,
            "MonolithId": "11111111-1111-1111-1111-111111111111",
            "At": "2024-05-01T15:00:00+03:00",
            "Reason": 0
        })
    }

    #[test]
    fn stop_of_a_product() {
        let mut p = base();
        p["ProductId"] = json!("44444444-4444-4444-4444-444444444444");
        let req = Request::parse(&event(STOP, p)).unwrap();
        assert_eq!(req.action, Action::AddedToStop);
        assert_eq!(
            req.stop_id, "33333333-3333-3333-3333-33333333aaaa",
            "canonical form"
        );
        assert_eq!(req.at_utc, "2024-05-01T12:00:00Z");
        let e = req.event_for("44444444-4444-4444-4444-444444444444");
        assert_eq!(e.action_type, 0);
        assert_eq!(
            e.event_id,
            uuid_v5(
                &NAMESPACE,
                &[&req.stop_id, "44444444-4444-4444-4444-444444444444", "0"]
            )
            .to_string()
        );
    }

    #[test]
    fn event_ids_differ_by_stop_product_and_action() {
        let mut p = base();
        p["ProductIds"] = json!([]);
        let remove = Request::parse(&event(REMOVE_STOP, p)).unwrap();
        let mut p = base();
        p["ProductId"] = json!("44444444-4444-4444-4444-444444444444");
        let add = Request::parse(&event(STOP, p)).unwrap();
        let a = add
            .event_for("44444444-4444-4444-4444-444444444444")
            .event_id;
        let r = remove
            .event_for("44444444-4444-4444-4444-444444444444")
            .event_id;
        assert_ne!(a, r);
        assert_ne!(
            a,
            add.event_for("55555555-5555-5555-5555-555555555555")
                .event_id
        );
        assert_eq!(
            a,
            add.event_for("44444444-4444-4444-4444-444444444444")
                .event_id
        );
    }

    #[test]
    fn bad_payloads_are_rejected_naming_the_field() {
        let cases = [
            (STOP, json!({}), "StopId"),
            (STOP, base(), "exactly one of"),
            (REMOVE_STOP, base(), "ProductIds"),
            (
                STOP_OVEN,
                {
                    let mut p = base();
                    p["ProductId"] = json!("x");
                    p
                },
                "ProductId",
            ),
            (
                STOP,
                {
                    let mut p = base();
                    p["ProductId"] = json!("nope");
                    p
                },
                "not a UUID",
            ),
            (
                STOP,
                {
                    let mut p = base();
                    p["ProductId"] = json!("44444444-4444-4444-4444-444444444444");
                    p["At"] = json!("yesterday");
                    p
                },
                "RFC 3339",
            ),
            ("stoplist.other", base(), "does not handle"),
        ];
        for (name, payload, needle) in cases {
            let err = Request::parse(&event(name, payload)).unwrap_err();
            assert!(!err.is_retryable());
            assert!(
                err.message().contains(needle),
                "{needle}: {}",
                err.message()
            );
        }
    }

    #[test]
    fn schema_violations_reject_before_anything_is_built() {
        let mut p = base();
        p["ProductIds"] = json!(["44444444-4444-4444-4444-444444444444"]);
        p["Reason"] = json!(9);
        let ev = event(REMOVE_STOP, p);
        let req = Request::parse(&ev).unwrap();
        let products = BTreeSet::from(["44444444-4444-4444-4444-444444444444".to_string()]);
        let err = messages(&ev, &req, &products, "t").unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.message().contains("/Reason: 9 is not one of"),
            "{}",
            err.message()
        );

        let mut p = base();
        p["ProductIds"] = json!(["44444444-4444-4444-4444-444444444444"]);
        let ev = event(REMOVE_STOP, p);
        let req = Request::parse(&ev).unwrap();
        let msgs = messages(&ev, &req, &products, "t").unwrap();
        assert_eq!(msgs.len(), 1);
        let body: serde_json::Value = serde_json::from_slice(msgs[0].body()).unwrap();
        assert_eq!(body["ActionType"], 1);
        assert_eq!(body["EventId"], msgs[0].id());
    }
}
