//! `[[relay]]`: the outbox relay without a handler. Events of the listed
//! names are published as they are (the payload is the message body) to a
//! topic, with the event id in the `message-id` header and the name in
//! `event-name`, and the key taken from the group id or a JSON pointer into
//! the payload: the job Debezium's outbox event router does, under the
//! same rule as a handler's publish (the broker acknowledges before the
//! event's ack commits; a failure retries the event).
//!
//! A relay is a built-in [`Handler`]; [`RelayRouter`] puts it in front of
//! the configured router, so the dispatch loop treats it like any handler
//! (retries, metrics under the name `relay:<topic>`, per-group order).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{EVENT_NAME_HEADER, MESSAGE_ID_HEADER, Message, PublishError, Publisher};
use crate::event::{Event, validate_name};
use crate::handler::{Effects, Handler, HandlerError, Outcome, Route, Router};

/// One `[[relay]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySpec {
    /// Event names published by this relay.
    pub events: Vec<String>,
    /// Kafka topic (NATS subject) they go to.
    pub topic: String,
    /// The message key: `"group_id"` (the default: the event's group id;
    /// none for an event without one), `"none"`, or a JSON pointer into the
    /// payload (`"/order/id"`; a string is used as it is, a number or
    /// boolean as its JSON text).
    #[serde(default = "default_key")]
    pub key: String,
    /// Overrides the events' `max_retry` when publishing them fails.
    #[serde(default)]
    pub max_retry: Option<i32>,
}

fn default_key() -> String {
    "group_id".into()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyFrom {
    GroupId,
    None,
    Pointer(String),
}

impl RelaySpec {
    /// The name the relay goes by in logs and metrics.
    pub fn name(&self) -> String {
        format!("relay:{}", self.topic)
    }

    /// Problems with the entry, as one message naming the fix.
    pub fn check(&self) -> Result<(), String> {
        if self.events.is_empty() {
            return Err(format!(
                "[[relay]] to topic {:?}: `events` is empty; list the event names to publish",
                self.topic
            ));
        }
        if self.topic.trim().is_empty() {
            return Err("[[relay]]: `topic` is empty".into());
        }
        for name in &self.events {
            validate_name(name).map_err(|e| format!("[[relay]] event name {name:?}: {e}"))?;
        }
        self.key_from()?;
        if self.max_retry.is_some_and(|m| m < 1) {
            return Err(format!(
                "[[relay]] to topic {:?}: max_retry must be at least 1",
                self.topic
            ));
        }
        Ok(())
    }

    fn key_from(&self) -> Result<KeyFrom, String> {
        match self.key.as_str() {
            "group_id" => Ok(KeyFrom::GroupId),
            "none" => Ok(KeyFrom::None),
            p if p.starts_with('/') => Ok(KeyFrom::Pointer(p.to_string())),
            other => Err(format!(
                "[[relay]] to topic {:?}: key = {other:?} is neither \"group_id\", \"none\" nor a JSON pointer such as \"/order_id\"",
                self.topic
            )),
        }
    }
}

/// One relay as a handler.
pub struct Relay {
    name: Arc<str>,
    topic: String,
    key: KeyFrom,
    publisher: Publisher,
}

impl Relay {
    fn key(&self, event: &Event) -> Result<Option<String>, HandlerError> {
        match &self.key {
            KeyFrom::None => Ok(None),
            KeyFrom::GroupId => Ok(event.group_id.clone()),
            KeyFrom::Pointer(p) => {
                let doc: serde_json::Value = serde_json::from_str(&event.payload).map_err(|e| {
                    HandlerError::reject(format!(
                        "{}: the payload is not JSON ({e}), so key {p:?} cannot be read from it",
                        self.name
                    ))
                })?;
                match doc.pointer(p) {
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                        Ok(Some(v.to_string()))
                    }
                    Some(other) => Err(HandlerError::reject(format!(
                        "{}: the key at {p:?} is {other}, not a string, number or boolean",
                        self.name
                    ))),
                    None => Err(HandlerError::reject(format!(
                        "{}: the payload has nothing at {p:?}, the relay's key; fix the producer or the relay's `key`",
                        self.name
                    ))),
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Handler for Relay {
    async fn handle(&self, event: &Event, _effects: &mut Effects) -> Result<Outcome, HandlerError> {
        let message = Message {
            topic: self.topic.clone(),
            key: self.key(event)?,
            headers: vec![
                (MESSAGE_ID_HEADER.into(), event.id.to_string()),
                (EVENT_NAME_HEADER.into(), event.name.clone()),
            ],
            body: event.payload.clone().into_bytes(),
        };
        match self
            .publisher
            .publish(&self.name, vec![message], None)
            .await
        {
            Ok(_) => Ok(Outcome::Done),
            Err(PublishError::Invalid(m)) => Err(HandlerError::reject(m)),
            Err(PublishError::Unavailable(m)) => Err(HandlerError::retry(m)),
        }
    }
}

/// The relays' event names in front of another router.
pub struct RelayRouter {
    inner: Arc<dyn Router>,
    relays: HashMap<String, Route>,
}

impl RelayRouter {
    /// Route the relays' events to them and everything else to `inner`. An
    /// event name both a relay and a handler claim is an error.
    pub fn new(
        inner: Arc<dyn Router>,
        specs: &[RelaySpec],
        publisher: &Publisher,
    ) -> Result<RelayRouter, String> {
        let mut relays = HashMap::new();
        for spec in specs {
            spec.check()?;
            let name: Arc<str> = Arc::from(spec.name());
            let relay = Arc::new(Relay {
                name: name.clone(),
                topic: spec.topic.clone(),
                key: spec.key_from()?,
                publisher: publisher.clone(),
            });
            for event in &spec.events {
                if let Some(r) = inner.route(event) {
                    return Err(format!(
                        "event {event:?} is bound to both handler {} and [[relay]] to topic {:?}; an event name may go to one of them only",
                        r.handler_name, spec.topic
                    ));
                }
                let route = Route {
                    handler_name: name.clone(),
                    handler: relay.clone(),
                    permits: None,
                    // The publisher bounds the wait itself; this is the
                    // dispatch loop's backstop.
                    timeout: Some(publisher.timeout() + Duration::from_secs(2)),
                    max_retry: spec.max_retry,
                };
                if relays.insert(event.clone(), route).is_some() {
                    return Err(format!(
                        "event {event:?} is listed by two [[relay]] entries; an event name may go to one of them only"
                    ));
                }
            }
        }
        Ok(RelayRouter { inner, relays })
    }
}

impl Router for RelayRouter {
    fn route(&self, name: &str) -> Option<Route> {
        match self.relays.get(name) {
            Some(r) => Some(r.clone()),
            None => self.inner.route(name),
        }
    }

    fn saturated(&self) -> Vec<String> {
        self.inner.saturated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &str) -> RelaySpec {
        toml::from_str(&format!(
            "events = [\"order.created\"]\ntopic = \"orders\"\nkey = {key:?}\n"
        ))
        .unwrap()
    }

    #[test]
    fn key_settings() {
        assert_eq!(spec("group_id").key_from(), Ok(KeyFrom::GroupId));
        assert_eq!(spec("none").key_from(), Ok(KeyFrom::None));
        assert_eq!(
            spec("/order/id").key_from(),
            Ok(KeyFrom::Pointer("/order/id".into()))
        );
        let err = spec("order_id").check().unwrap_err();
        assert!(err.contains("JSON pointer"), "{err}");
        let default: RelaySpec = toml::from_str("events = [\"a\"]\ntopic = \"t\"\n").unwrap();
        assert_eq!(default.key_from(), Ok(KeyFrom::GroupId));
        let empty: RelaySpec = toml::from_str("events = []\ntopic = \"t\"\n").unwrap();
        assert!(empty.check().unwrap_err().contains("events"));
    }
}
