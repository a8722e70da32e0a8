//! # family-sharing
//!
//! The `/share-with-family` request of order-route-sharing as an event (seed
//! 002): a user switched the "share ride with family" toggle; start or stop
//! sharing the ride with the phones of their family. Both modes are
//! idempotent, so redelivery is harmless.
//!
//! ## Event
//! `share-with-family`, payload
//! `{"order_id": "...", "sharing_key": "...", "user_id": "...", "share_ride_with_family": {"value": true}}`
//! (all strings non-empty; `value` a boolean). A payload that does not fit is
//! rejected.
//!
//! ## Start (`value: true`)
//! 1. `GET {family_url}/v1/family?user_id=<user_id>` — the family service.
//! 2. Not in a family: done, nothing written.
//! 3. In the ack transaction: insert the sharing key (`ON CONFLICT DO
//!    NOTHING`), insert each member's phone id (idempotent), upsert
//!    `family_rides` (admin uid and name, `sharing_on = true`).
//!
//! ## Stop (`value: false`)
//! Delete the ride's phone ids and set `family_rides.sharing_on = false`
//! (nothing to do for a ride that never started sharing). No HTTP call.
//!
//! ## Family service contract
//! `GET {family_url}/v1/family?user_id=<id>` answers 200 with JSON:
//! ```json
//! {"in_family": true,
//!  "admin": {"uid": 393627008, "name": "Василий"},
//!  "members": [{"phone_id": "5db2bb01211473c8c34f358d"}]}
//! ```
//! or `{"in_family": false}` for a user without a family. The flag is
//! explicit on purpose: a 404 (e.g. a wrong `family_url`) must not read as
//! "no family" and silently drop the share. Errors: 5xx, 429, 408, timeouts
//! and connection failures retry; other statuses reject; a 200 body that does
//! not follow the shape above rejects with a message saying what was wrong.
//!
//! ## Config keys (`[handler.config]`)
//! | key | default | meaning |
//! |---|---|---|
//! | `family_url` | required | base URL of the family service |
//! | `table_prefix` | `order_route_sharing.` | prefix of the table names: the PostgreSQL schema; set `""` on SQLite |
//! | `family_timeout_ms` | `5000` | timeout of the family request |
//!
//! ## Capabilities
//! `sql` (tables of `migrations/apps/family-sharing/`), outgoing HTTP to the
//! host of `family_url`, logging, config. No `emit`, no `kv`.
//!
//! ## Producers
//! Enqueue with group id `ride:<sharing_key>`: start and stop of one ride
//! must run in the order the user toggled.

use std::time::Duration;

use outrun_sdk::http::{Request, encode_component};
use outrun_sdk::{Event, HandlerError, Outcome, config, log, sql};
use serde::Deserialize;

/// The event this handler serves.
pub const EVENT: &str = "share-with-family";

/// The `/share-with-family` request body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Share {
    /// The order being shared.
    pub order_id: String,
    /// The ride's sharing key (`order.rsk`).
    pub sharing_key: String,
    /// The user who switched the toggle.
    pub user_id: String,
    /// The new toggle value.
    pub share_ride_with_family: Toggle,
}

/// `{"value": bool}`, as the client sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Toggle {
    /// true: start sharing; false: stop.
    pub value: bool,
}

impl Share {
    /// Parse and validate the payload; anything off rejects the event.
    pub fn parse(ev: &Event) -> Result<Self, HandlerError> {
        let share: Share = ev.json_object()?;
        for (field, value) in [
            ("order_id", &share.order_id),
            ("sharing_key", &share.sharing_key),
            ("user_id", &share.user_id),
        ] {
            if value.trim().is_empty() {
                return Err(HandlerError::reject(format!(
                    "payload of `{}` ({}) has an empty `{field}`",
                    ev.name, ev.id
                )));
            }
        }
        Ok(share)
    }
}

/// What the family service says about a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Family {
    /// The user has no family: nothing to share.
    None,
    /// The user's family.
    Members {
        /// Uid of the family account's admin.
        admin_uid: i64,
        /// Display name of the admin.
        admin_name: String,
        /// Phone ids of the members to share the ride with.
        phone_ids: Vec<String>,
    },
}

#[derive(Deserialize)]
struct FamilyBody {
    in_family: bool,
    #[serde(default)]
    admin: Option<AdminBody>,
    #[serde(default)]
    members: Option<Vec<MemberBody>>,
}

#[derive(Deserialize)]
struct AdminBody {
    uid: i64,
    name: String,
}

#[derive(Deserialize)]
struct MemberBody {
    phone_id: String,
}

impl Family {
    /// Validate a 200 body of the family service. Errors say what was wrong;
    /// they reject, since the same answer will come back on a retry.
    pub fn from_body(body: &[u8]) -> Result<Self, String> {
        let parsed: FamilyBody = serde_json::from_slice(body).map_err(|e| {
            format!(
                "family service answer is not the documented JSON \
                 ({{\"in_family\", \"admin\": {{\"uid\", \"name\"}}, \"members\": [{{\"phone_id\"}}]}}): {e}"
            )
        })?;
        if !parsed.in_family {
            return Ok(Family::None);
        }
        let admin = parsed
            .admin
            .ok_or("family service answer has `in_family: true` but no `admin`")?;
        if admin.name.trim().is_empty() {
            return Err("family service answer has an empty `admin.name`".to_owned());
        }
        let members = parsed
            .members
            .ok_or("family service answer has `in_family: true` but no `members` list")?;
        let mut phone_ids = Vec::with_capacity(members.len());
        for (i, m) in members.into_iter().enumerate() {
            if m.phone_id.trim().is_empty() {
                return Err(format!(
                    "family service answer has an empty `members[{i}].phone_id`"
                ));
            }
            phone_ids.push(m.phone_id);
        }
        Ok(Family::Members {
            admin_uid: admin.uid,
            admin_name: admin.name,
            phone_ids,
        })
    }
}

/// The statements, with the table prefix applied.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Statements {
    insert_sharing_key: String,
    insert_phone_id: String,
    upsert_family_ride: String,
    delete_phone_ids: String,
    stop_family_ride: String,
}

impl Statements {
    fn new(prefix: &str) -> Self {
        Self {
            insert_sharing_key: format!(
                "INSERT INTO {prefix}sharing_keys (sharing_key, order_id) VALUES ($1, $2) \
                 ON CONFLICT (sharing_key) DO NOTHING"
            ),
            insert_phone_id: format!(
                "INSERT INTO {prefix}phone_ids (sharing_key, phone_id) VALUES ($1, $2) \
                 ON CONFLICT (sharing_key, phone_id) DO NOTHING"
            ),
            upsert_family_ride: format!(
                "INSERT INTO {prefix}family_rides (sharing_key, admin_uid, admin_name, sharing_on) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (sharing_key) DO UPDATE SET \
                 admin_uid = excluded.admin_uid, admin_name = excluded.admin_name, sharing_on = excluded.sharing_on"
            ),
            delete_phone_ids: format!("DELETE FROM {prefix}phone_ids WHERE sharing_key = $1"),
            stop_family_ride: format!(
                "UPDATE {prefix}family_rides SET sharing_on = $2 WHERE sharing_key = $1"
            ),
        }
    }
}

/// The prefix is pasted into SQL, so only identifier characters and a
/// trailing dot are allowed.
fn validate_prefix(prefix: &str) -> Result<(), HandlerError> {
    let ok = prefix.is_empty()
        || (prefix.ends_with('.')
            && prefix.len() > 1
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'));
    if ok {
        Ok(())
    } else {
        Err(HandlerError::retry(format!(
            "config key `table_prefix` is {prefix:?}; use \"\" (SQLite) or a schema name followed by a dot, e.g. \"order_route_sharing.\""
        )))
    }
}

fn family_request_url(base: &str, user_id: &str) -> String {
    format!(
        "{}/v1/family?user_id={}",
        base.trim_end_matches('/'),
        encode_component(user_id)
    )
}

fn fetch_family(base: &str, user_id: &str, timeout: Duration) -> Result<Family, HandlerError> {
    let url = family_request_url(base, user_id);
    let resp = Request::get(&url)
        .timeout(timeout)
        .send()?
        .error_for_status()?;
    Family::from_body(&resp.body).map_err(|why| HandlerError::reject(format!("GET {url}: {why}")))
}

fn start(share: &Share, st: &Statements, family: Family) -> Result<Outcome, HandlerError> {
    let Family::Members {
        admin_uid,
        admin_name,
        phone_ids,
    } = family
    else {
        log::info(format!(
            "user {} is not in a family; ride {} not shared",
            share.user_id, share.sharing_key
        ));
        return Ok(Outcome::Done);
    };
    let key = &share.sharing_key;
    sql::execute(&st.insert_sharing_key, &sql::params![key, &share.order_id])
        .map_err(|e| HandlerError::from(e).context("inserting the sharing key"))?;
    for phone_id in &phone_ids {
        sql::execute(&st.insert_phone_id, &sql::params![key, phone_id])
            .map_err(|e| HandlerError::from(e).context("inserting a phone id"))?;
    }
    sql::execute(
        &st.upsert_family_ride,
        &sql::params![key, admin_uid, &admin_name, true],
    )
    .map_err(|e| HandlerError::from(e).context("upserting family_rides"))?;
    log::info(format!(
        "ride {key} shared with the family of admin {admin_uid} ({} phones)",
        phone_ids.len()
    ));
    Ok(Outcome::Done)
}

fn stop(share: &Share, st: &Statements) -> Result<Outcome, HandlerError> {
    let key = &share.sharing_key;
    let removed = sql::execute(&st.delete_phone_ids, &sql::params![key])
        .map_err(|e| HandlerError::from(e).context("deleting phone ids"))?;
    let rides = sql::execute(&st.stop_family_ride, &sql::params![key, false])
        .map_err(|e| HandlerError::from(e).context("switching sharing off"))?;
    log::info(format!(
        "ride {key}: sharing stopped ({removed} phones removed, {rides} family ride updated)"
    ));
    Ok(Outcome::Done)
}

fn handle(ev: Event) -> Result<Outcome, HandlerError> {
    let share = Share::parse(&ev)?;
    let prefix = config::get("table_prefix").unwrap_or_else(|| "order_route_sharing.".to_owned());
    validate_prefix(&prefix)?;
    let statements = Statements::new(&prefix);
    if share.share_ride_with_family.value {
        let base = config::require("family_url")?;
        let timeout = Duration::from_millis(config::parse_or("family_timeout_ms", 5000)?);
        let family = fetch_family(&base, &share.user_id, timeout)?;
        start(&share, &statements, family)
    } else {
        stop(&share, &statements)
    }
}

outrun_sdk::export_handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload: &str) -> Event {
        Event {
            id: "0190-e".into(),
            name: EVENT.into(),
            payload: payload.into(),
            group_id: None,
            attempt: 1,
            max_attempts: 5,
            created_at_ms: 0,
            expires_at_ms: None,
        }
    }

    #[test]
    fn parses_the_seed_request() {
        let s = Share::parse(&event(
            r#"{"order_id":"e481","sharing_key":"e1c6","user_id":"u1","share_ride_with_family":{"value":true}}"#,
        ))
        .unwrap();
        assert_eq!(s.sharing_key, "e1c6");
        assert!(s.share_ride_with_family.value);
    }

    #[test]
    fn rejects_bad_requests() {
        for (payload, needle) in [
            (
                r#"{"order_id":"o","sharing_key":"k","user_id":"u"}"#,
                "share_ride_with_family",
            ),
            (
                r#"{"order_id":"o","sharing_key":"k","user_id":"u","share_ride_with_family":{"value":"yes"}}"#,
                "expected a boolean",
            ),
            (
                r#"{"order_id":"o","sharing_key":"","user_id":"u","share_ride_with_family":{"value":true}}"#,
                "empty `sharing_key`",
            ),
        ] {
            let e = Share::parse(&event(payload)).unwrap_err();
            assert!(!e.is_retryable());
            assert!(e.message().contains(needle), "{}", e.message());
        }
    }

    #[test]
    fn family_body_shapes() {
        assert_eq!(
            Family::from_body(br#"{"in_family":false}"#).unwrap(),
            Family::None
        );
        assert_eq!(
            Family::from_body(
                r#"{"in_family":true,"admin":{"uid":393627008,"name":"Василий"},"members":[{"phone_id":"p1"},{"phone_id":"p2"}]}"#.as_bytes()
            )
            .unwrap(),
            Family::Members {
                admin_uid: 393627008,
                admin_name: "Василий".into(),
                phone_ids: vec!["p1".into(), "p2".into()],
            }
        );
    }

    #[test]
    fn malformed_family_bodies_say_what_is_wrong() {
        for (body, needle) in [
            (
                &br#"{"admin":{"uid":1,"name":"a"},"members":[]}"#[..],
                "in_family",
            ),
            (br#"{"in_family":true,"members":[]}"#, "no `admin`"),
            (
                br#"{"in_family":true,"admin":{"uid":"x","name":"a"},"members":[]}"#,
                "expected i64",
            ),
            (
                br#"{"in_family":true,"admin":{"uid":1,"name":" "},"members":[]}"#,
                "admin.name",
            ),
            (
                br#"{"in_family":true,"admin":{"uid":1,"name":"a"}}"#,
                "`members`",
            ),
            (
                br#"{"in_family":true,"admin":{"uid":1,"name":"a"},"members":[{"phone_id":""}]}"#,
                "members[0]",
            ),
            (b"<html>", "documented JSON"),
        ] {
            let e = Family::from_body(body).unwrap_err();
            assert!(e.contains(needle), "{}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn statements_use_prefix() {
        let pg = Statements::new("order_route_sharing.");
        assert!(
            pg.insert_phone_id
                .starts_with("INSERT INTO order_route_sharing.phone_ids ")
        );
        let lite = Statements::new("");
        assert!(lite.stop_family_ride.starts_with("UPDATE family_rides SET"));
    }

    #[test]
    fn prefix_is_validated() {
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("order_route_sharing.").is_ok());
        for bad in ["order_route_sharing", ".", "x; DROP TABLE y; --."] {
            let e = validate_prefix(bad).unwrap_err();
            assert!(e.message().contains("table_prefix"), "{bad}");
        }
    }

    #[test]
    fn user_id_is_escaped_in_the_url() {
        assert_eq!(
            family_request_url("http://family:8080/", "a b&c=1"),
            "http://family:8080/v1/family?user_id=a%20b%26c%3D1"
        );
    }
}
