//! # package-deletion
//!
//! Deletes attachment packages that were requested for a draft or a ticket
//! but never uploaded, once the draft or ticket ends its life (seed 000).
//! Uploaded packages leave the map when they close and are deleted together
//! with their attachment elsewhere.
//!
//! ## Key-value maps (all keys under the handler's kv prefix)
//! | key | value | seed |
//! |---|---|---|
//! | `draft:<user_id>:packages` | set of package ids | user_id → pckg (drafts) |
//! | `ticket:<ticket_id>:packages` | set of package ids | ticket_id → pckg (tickets) |
//! | `package:<package_id>:owner` | `draft:<user_id>` or `ticket:<ticket_id>` | pckg → user_id / ticket_id |
//!
//! ## Events
//! - `package.requested` `{"package_id", "owner": {"kind": "draft"|"ticket", "id"}}`:
//!   add the package to the owner's set and record its owner.
//! - `package.closed` `{"package_id", "owner"?}`: the package was uploaded;
//!   remove it from its owner's set (the recorded owner, and `owner` if the
//!   payload names one) and forget its owner. Unknown package: nothing to do.
//! - `draft.finished` / `ticket.finished` `{"id"}`: for each package still in
//!   the owner's set, `DELETE {storage_url}/packages/<package_id>`. 2xx or 404
//!   (already gone) counts as deleted and the package leaves the set at once,
//!   so a retry only re-sends the rest. 5xx, 429, 408, timeouts, connection
//!   failures: retryable error after trying every package. Other statuses:
//!   rejected (dead), listing the packages. When every package is deleted the
//!   owner's set is removed.
//!
//! All four are idempotent: set operations and 404-as-deleted make a
//! redelivery harmless. The kv store is not transactional with the event, so
//! progress made by a failed attempt (packages already deleted) is kept.
//!
//! ## Config keys (`[handler.config]`)
//! | key | default | meaning |
//! |---|---|---|
//! | `storage_url` | required | base URL of the Storage service |
//! | `storage_timeout_ms` | `10000` | timeout of each DELETE |
//!
//! ## Capabilities
//! `kv`, outgoing HTTP to the host of `storage_url`, logging, config.
//!
//! ## Producers
//! Set group id = the owner, `draft:<user_id>` or `ticket:<ticket_id>`, on
//! all four events, so a package requested or closed before the owner
//! finished is in the map (or out of it) when the deletion runs. This is why
//! `package.closed` may carry the `owner`: the producer needs it for the group
//! id anyway.

use std::fmt;
use std::time::Duration;

use outrun_sdk::http::{Request, encode_component, is_transient_status};
use outrun_sdk::{Event, HandlerError, Outcome, config, kv, log};
use serde::Deserialize;

/// Whether a package belongs to a draft or a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerKind {
    /// A client's ticket draft, keyed by user id.
    Draft,
    /// A ticket, keyed by ticket id.
    Ticket,
}

impl OwnerKind {
    fn as_str(self) -> &'static str {
        match self {
            OwnerKind::Draft => "draft",
            OwnerKind::Ticket => "ticket",
        }
    }
}

/// The draft or ticket a package was requested for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Owner {
    /// Draft or ticket.
    pub kind: OwnerKind,
    /// User id (drafts) or ticket id (tickets).
    pub id: String,
}

impl Owner {
    /// Key of the set of packages still pending for this owner.
    pub fn packages_key(&self) -> String {
        format!("{self}:packages")
    }

    /// Parse the `draft:<id>` / `ticket:<id>` form stored under
    /// `package:<id>:owner` (and used as the group id).
    pub fn parse(tag: &str) -> Option<Self> {
        let (kind, id) = tag.split_once(':')?;
        let kind = match kind {
            "draft" => OwnerKind::Draft,
            "ticket" => OwnerKind::Ticket,
            _ => return None,
        };
        (!id.is_empty()).then(|| Owner {
            kind,
            id: id.to_owned(),
        })
    }
}

/// `draft:<id>` / `ticket:<id>`.
impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

/// Key recording which owner a package belongs to.
pub fn package_owner_key(package_id: &str) -> String {
    format!("package:{package_id}:owner")
}

/// A parsed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `package.requested`
    Requested {
        /// The package.
        package_id: String,
        /// Its draft or ticket.
        owner: Owner,
    },
    /// `package.closed`
    Closed {
        /// The package.
        package_id: String,
        /// Its owner, if the producer sent it.
        owner: Option<Owner>,
    },
    /// `draft.finished` / `ticket.finished`
    Finished(Owner),
}

#[derive(Deserialize)]
struct RequestedBody {
    package_id: String,
    owner: Owner,
}

#[derive(Deserialize)]
struct ClosedBody {
    package_id: String,
    #[serde(default)]
    owner: Option<Owner>,
}

#[derive(Deserialize)]
struct FinishedBody {
    id: String,
}

impl Command {
    /// Parse and validate an event; anything off rejects it.
    pub fn parse(ev: &Event) -> Result<Self, HandlerError> {
        let cmd = match ev.name.as_str() {
            "package.requested" => {
                let b: RequestedBody = ev.json_object()?;
                Command::Requested {
                    package_id: b.package_id,
                    owner: b.owner,
                }
            }
            "package.closed" => {
                let b: ClosedBody = ev.json_object()?;
                Command::Closed {
                    package_id: b.package_id,
                    owner: b.owner,
                }
            }
            "draft.finished" | "ticket.finished" => {
                let b: FinishedBody = ev.json_object()?;
                let kind = if ev.name == "draft.finished" {
                    OwnerKind::Draft
                } else {
                    OwnerKind::Ticket
                };
                Command::Finished(Owner { kind, id: b.id })
            }
            other => {
                return Err(HandlerError::reject(format!(
                    "package-deletion handles package.requested, package.closed, draft.finished \
                     and ticket.finished, not `{other}`; fix the handler binding in the config"
                )));
            }
        };
        cmd.validate().map_err(|field| {
            HandlerError::reject(format!(
                "payload of `{}` ({}) has an empty `{field}`",
                ev.name, ev.id
            ))
        })?;
        Ok(cmd)
    }

    fn validate(&self) -> Result<(), &'static str> {
        let (package, owner) = match self {
            Command::Requested { package_id, owner } => (Some(package_id), Some(owner)),
            Command::Closed { package_id, owner } => (Some(package_id), owner.as_ref()),
            Command::Finished(owner) => (None, Some(owner)),
        };
        if package.is_some_and(|p| p.trim().is_empty()) {
            return Err("package_id");
        }
        if owner.is_some_and(|o| o.id.trim().is_empty()) {
            return Err(if matches!(self, Command::Finished(_)) {
                "id"
            } else {
                "owner.id"
            });
        }
        Ok(())
    }
}

/// What one DELETE to Storage came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    /// Gone (2xx, or 404: already gone).
    Deleted,
    /// Try again later.
    Transient(String),
    /// Storage refuses; a retry will not help.
    Permanent(String),
}

/// Classify Storage's answer to a DELETE.
pub fn classify(status: u16) -> Deletion {
    match status {
        200..=299 | 404 => Deletion::Deleted,
        s if is_transient_status(s) => Deletion::Transient(format!("Storage answered {s}")),
        s => Deletion::Permanent(format!("Storage answered {s}")),
    }
}

fn requested(package_id: &str, owner: &Owner) -> Result<Outcome, HandlerError> {
    kv::set_add(&owner.packages_key(), &[package_id])?;
    kv::set(&package_owner_key(package_id), owner.to_string(), None)?;
    Ok(Outcome::Done)
}

fn closed(package_id: &str, owner: Option<&Owner>) -> Result<Outcome, HandlerError> {
    let owner_key = package_owner_key(package_id);
    let mut owners: Vec<Owner> = owner.cloned().into_iter().collect();
    if let Some(tag) = kv::get_string(&owner_key)? {
        match Owner::parse(&tag) {
            Some(recorded) if !owners.contains(&recorded) => owners.push(recorded),
            Some(_) => {}
            None => log::warn(format!(
                "`{owner_key}` holds {tag:?}, not draft:<id> or ticket:<id>; ignored"
            )),
        }
    }
    if owners.is_empty() {
        log::debug(format!(
            "package {package_id} closed but was never requested here; nothing to do"
        ));
    }
    for o in &owners {
        kv::set_remove(&o.packages_key(), &[package_id])?;
    }
    kv::delete(&owner_key)?;
    Ok(Outcome::Done)
}

fn finished(owner: &Owner) -> Result<Outcome, HandlerError> {
    let storage = config::require("storage_url")?;
    let timeout = Duration::from_millis(config::parse_or("storage_timeout_ms", 10_000)?);
    let key = owner.packages_key();
    let packages = kv::set_members(&key)?;

    let (mut deleted, mut transient, mut permanent) = (0, Vec::new(), Vec::new());
    for package in &packages {
        let url = format!(
            "{}/packages/{}",
            storage.trim_end_matches('/'),
            encode_component(package)
        );
        let outcome = match Request::delete(&url).timeout(timeout).send() {
            Ok(resp) => classify(resp.status),
            Err(e) => {
                let e = HandlerError::from(e);
                if e.is_retryable() {
                    Deletion::Transient(e.message().to_owned())
                } else {
                    Deletion::Permanent(e.message().to_owned())
                }
            }
        };
        match outcome {
            Deletion::Deleted => {
                // Leave the set at once: a later retry re-sends only the rest.
                kv::set_remove(&key, &[package])?;
                kv::delete(&package_owner_key(package))?;
                deleted += 1;
            }
            Deletion::Transient(why) => transient.push(format!("{package} ({why})")),
            Deletion::Permanent(why) => permanent.push(format!("{package} ({why})")),
        }
    }

    if !transient.is_empty() {
        return Err(HandlerError::retry(format!(
            "{owner}: {deleted} of {} packages deleted; will retry {}",
            packages.len(),
            transient.join(", ")
        )));
    }
    if !permanent.is_empty() {
        return Err(HandlerError::reject(format!(
            "{owner}: Storage refused to delete {}; {deleted} others deleted; \
             the rest stay in `{key}` for an operator",
            permanent.join(", ")
        )));
    }
    kv::delete(&key)?;
    log::info(format!(
        "{owner} finished: {deleted} never-uploaded packages deleted"
    ));
    Ok(Outcome::Done)
}

fn handle(ev: Event) -> Result<Outcome, HandlerError> {
    match Command::parse(&ev)? {
        Command::Requested { package_id, owner } => requested(&package_id, &owner),
        Command::Closed { package_id, owner } => closed(&package_id, owner.as_ref()),
        Command::Finished(owner) => finished(&owner),
    }
}

outrun_sdk::export_handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, payload: &str) -> Event {
        Event {
            id: "0190-e".into(),
            name: name.into(),
            payload: payload.into(),
            group_id: None,
            attempt: 1,
            max_attempts: 5,
            created_at_ms: 0,
            expires_at_ms: None,
        }
    }

    fn draft(id: &str) -> Owner {
        Owner {
            kind: OwnerKind::Draft,
            id: id.into(),
        }
    }

    #[test]
    fn key_names() {
        assert_eq!(draft("u1").packages_key(), "draft:u1:packages");
        let t = Owner {
            kind: OwnerKind::Ticket,
            id: "t9".into(),
        };
        assert_eq!(t.packages_key(), "ticket:t9:packages");
        assert_eq!(package_owner_key("p1"), "package:p1:owner");
    }

    #[test]
    fn owner_tags_round_trip() {
        let o = draft("u:1");
        assert_eq!(Owner::parse(&o.to_string()), Some(o));
        assert_eq!(Owner::parse("user:1"), None);
        assert_eq!(Owner::parse("draft:"), None);
        assert_eq!(Owner::parse("draft"), None);
    }

    #[test]
    fn parses_every_event() {
        assert_eq!(
            Command::parse(&event(
                "package.requested",
                r#"{"package_id":"p1","owner":{"kind":"draft","id":"u1"}}"#
            ))
            .unwrap(),
            Command::Requested {
                package_id: "p1".into(),
                owner: draft("u1")
            }
        );
        assert_eq!(
            Command::parse(&event("package.closed", r#"{"package_id":"p1"}"#)).unwrap(),
            Command::Closed {
                package_id: "p1".into(),
                owner: None
            }
        );
        assert_eq!(
            Command::parse(&event("ticket.finished", r#"{"id":"t1"}"#)).unwrap(),
            Command::Finished(Owner {
                kind: OwnerKind::Ticket,
                id: "t1".into()
            })
        );
    }

    #[test]
    fn rejects_bad_events() {
        for (name, payload, needle) in [
            (
                "package.requested",
                r#"{"package_id":"p","owner":{"kind":"user","id":"u"}}"#,
                "unknown variant `user`",
            ),
            (
                "package.requested",
                r#"{"package_id":"","owner":{"kind":"draft","id":"u"}}"#,
                "empty `package_id`",
            ),
            (
                "package.closed",
                r#"{"package_id":"p","owner":{"kind":"draft","id":" "}}"#,
                "empty `owner.id`",
            ),
            ("draft.finished", r#"{"id":""}"#, "empty `id`"),
            ("draft.finished", r#"{}"#, "missing field `id`"),
            ("draft.deleted", r#"{}"#, "`draft.deleted`"),
        ] {
            let e = Command::parse(&event(name, payload)).unwrap_err();
            assert!(!e.is_retryable());
            assert!(
                e.message().contains(needle),
                "{name} {payload}: {}",
                e.message()
            );
        }
    }

    #[test]
    fn storage_answers() {
        assert_eq!(classify(204), Deletion::Deleted);
        assert_eq!(classify(404), Deletion::Deleted);
        assert!(matches!(classify(503), Deletion::Transient(_)));
        assert!(matches!(classify(429), Deletion::Transient(_)));
        assert!(matches!(classify(403), Deletion::Permanent(m) if m.contains("403")));
    }
}
