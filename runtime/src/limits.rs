//! `[[limit]]` entries: rate limits and per-key concurrency of the events of
//! one handler or one event name, held across every instance that shares
//! the database. This module owns the config entry and its validation; the
//! claimer enforces them ([`crate::dispatch`], `limiter.rs`) through claims
//! of their own in the store, which keeps one row per limit in
//! `outrun_limits` (the token bucket, and the lock that serialises the
//! limit's claims across instances).
//!
//! A limited event is only ever claimed within its budget: a rate limit
//! takes its tokens in the transaction that claims, and a per-key limit
//! counts the events of each key that are leased anywhere (running, or
//! claimed and about to run) in that same transaction. Events of names
//! without a limit are claimed as before, by a claim that skips the
//! limited names.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The key every event whose payload does not resolve the limit's
/// `concurrency_key` runs under: such events share one key (they are held
/// to `per_key` together), and the first of them is logged once.
pub const FALLBACK_KEY: &str = "(no key)";

/// The `concurrency_key` value that means the event's group id.
pub const GROUP_KEY: &str = "group_id";

/// One `[[limit]]` entry as written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// The events of this `[[handler]]` (all its event names, together).
    #[serde(default)]
    pub handler: Option<String>,
    /// The events of this name.
    #[serde(default)]
    pub event: Option<String>,
    /// "100/s", "30/m", "1000/h": events started at most at this rate,
    /// across all instances.
    #[serde(default)]
    pub rate: Option<String>,
    /// Events that may start at once after a quiet spell (the token
    /// bucket's size). Default: the rate's count (100 for "100/s").
    #[serde(default)]
    pub burst: Option<u32>,
    /// A JSON pointer into the payload ("/customer/id"), or "group_id":
    /// what makes two events "the same key" for `per_key`.
    #[serde(default)]
    pub concurrency_key: Option<String>,
    /// At most this many events of one key run at once, across instances.
    #[serde(default)]
    pub per_key: Option<u32>,
}

/// A bad `[[limit]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[[limit]] {target}: `{field}` {message}")]
pub struct LimitError {
    /// `handler "x"`, `event "y"`, or `#N` when neither is set.
    pub target: String,
    pub field: &'static str,
    pub message: String,
}

/// A token bucket: `per_second` tokens a second, at most `burst` saved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
    /// As written, for listings.
    #[serde(skip)]
    pub count: u64,
    #[serde(skip)]
    pub unit: &'static str,
}

impl Rate {
    /// Parse "N/s", "N/m" or "N/h" (also "N/sec", "N/min", "N/hour").
    pub fn parse(text: &str) -> Result<Rate, String> {
        let hint = "write a positive whole count per unit, like \"100/s\", \"30/m\" or \"1000/h\"";
        let Some((count, unit)) = text.trim().split_once('/') else {
            return Err(format!("{text:?} is not a rate; {hint}"));
        };
        let count: u64 = count
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {count:?} is not a whole number; {hint}"))?;
        if count == 0 {
            return Err(format!(
                "{text:?} would never let an event run; {hint} (to stop a handler, remove its binding)"
            ));
        }
        let (seconds, unit) = match unit.trim() {
            "s" | "sec" | "second" => (1.0, "s"),
            "m" | "min" | "minute" => (60.0, "m"),
            "h" | "hour" => (3600.0, "h"),
            other => return Err(format!("{text:?}: unknown unit {other:?}; {hint}")),
        };
        Ok(Rate {
            per_second: count as f64 / seconds,
            burst: count as f64,
            count,
            unit,
        })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} burst {}", self.count, self.unit, self.burst)
    }
}

/// Where an event's concurrency key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A JSON pointer into the payload, and its unescaped segments.
    Pointer {
        pointer: String,
        segments: Vec<String>,
    },
    /// The event's group id.
    Group,
}

impl KeySource {
    pub fn parse(text: &str) -> Result<KeySource, String> {
        if text == GROUP_KEY {
            return Ok(KeySource::Group);
        }
        if !text.starts_with('/') {
            return Err(format!(
                "{text:?} is neither a JSON pointer (it starts with '/', like \"/customer/id\") nor \"{GROUP_KEY}\""
            ));
        }
        let segments = text[1..]
            .split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        Ok(KeySource::Pointer {
            pointer: text.to_string(),
            segments,
        })
    }

    /// The key of an event, as the store computes it: the pointed-at string
    /// as it is, any other JSON value as its JSON text; `None` when the
    /// pointer does not resolve (or is JSON null), and the event runs
    /// under [`FALLBACK_KEY`].
    pub fn key_of(&self, payload: &str, group_id: Option<&str>) -> Option<String> {
        match self {
            KeySource::Group => group_id.map(str::to_string),
            KeySource::Pointer { pointer, .. } => {
                let value: serde_json::Value = serde_json::from_str(payload).ok()?;
                json_key(value.pointer(pointer)?)
            }
        }
    }
}

/// A JSON value as a concurrency key (see [`KeySource::key_of`]).
pub fn json_key(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Pointer { pointer, .. } => f.write_str(pointer),
            KeySource::Group => f.write_str(GROUP_KEY),
        }
    }
}

/// At most `n` events of one key at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerKey {
    pub key: KeySource,
    pub n: u32,
}

/// One validated limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    /// `handler:NAME` or `event:NAME`: its row in `outrun_limits` and its
    /// label in metrics.
    pub id: String,
    /// The event names it covers.
    pub names: Vec<String>,
    pub rate: Option<Rate>,
    pub per_key: Option<PerKey>,
}

impl Limit {
    /// "100/s burst 100, 2 per /customer" for listings.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = &self.rate {
            parts.push(r.to_string());
        }
        if let Some(p) = &self.per_key {
            parts.push(format!("{} per {}", p.n, p.key));
        }
        parts.join(", ")
    }
}

/// Every limit of a config, each event name in at most one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub limits: Vec<Limit>,
}

impl Limits {
    pub fn from_config(config: &Config) -> Result<Limits, LimitError> {
        let mut limits = Vec::new();
        let mut owner: HashMap<String, String> = HashMap::new();
        for (i, spec) in config.limit.iter().enumerate() {
            let target = match (&spec.handler, &spec.event) {
                (Some(h), None) => format!("handler {h:?}"),
                (None, Some(e)) => format!("event {e:?}"),
                _ => format!("#{}", i + 1),
            };
            let bad = |field: &'static str, message: String| LimitError {
                target: target.clone(),
                field,
                message,
            };
            let (id, names) = match (&spec.handler, &spec.event) {
                (Some(h), None) => {
                    let Some(handler) = config.handler.iter().find(|x| &x.name == h) else {
                        return Err(bad(
                            "handler",
                            format!("{h:?} is not the name of any [[handler]] in the config"),
                        ));
                    };
                    (format!("handler:{h}"), handler.events.clone())
                }
                (None, Some(e)) => {
                    crate::event::validate_name(e).map_err(|err| bad("event", err.to_string()))?;
                    (format!("event:{e}"), vec![e.clone()])
                }
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "event",
                        "and `handler` are both set; a limit covers one handler or one event name"
                            .into(),
                    ));
                }
                (None, None) => {
                    return Err(bad(
                        "handler",
                        "is missing: say which events the limit covers, `handler = \"NAME\"` or `event = \"NAME\"`".into(),
                    ));
                }
            };
            let rate = match &spec.rate {
                Some(text) => {
                    let mut rate = Rate::parse(text).map_err(|m| bad("rate", m))?;
                    if let Some(b) = spec.burst {
                        if b == 0 {
                            return Err(bad(
                                "burst",
                                "must be at least 1 (no event could ever start)".into(),
                            ));
                        }
                        rate.burst = f64::from(b);
                    }
                    Some(rate)
                }
                None if spec.burst.is_some() => {
                    return Err(bad("burst", "needs a `rate` to go with it".into()));
                }
                None => None,
            };
            let per_key = match (&spec.concurrency_key, spec.per_key) {
                (Some(k), Some(n)) => {
                    if n == 0 {
                        return Err(bad(
                            "per_key",
                            "must be at least 1 (no event could ever start)".into(),
                        ));
                    }
                    Some(PerKey {
                        key: KeySource::parse(k).map_err(|m| bad("concurrency_key", m))?,
                        n,
                    })
                }
                (Some(_), None) => {
                    return Err(bad(
                        "per_key",
                        "is missing: `concurrency_key` needs `per_key = N` (events of one key at once)".into(),
                    ));
                }
                (None, Some(_)) => {
                    return Err(bad(
                        "concurrency_key",
                        "is missing: `per_key` needs a key, a JSON pointer like \"/customer/id\" or \"group_id\"".into(),
                    ));
                }
                (None, None) => None,
            };
            if rate.is_none() && per_key.is_none() {
                return Err(bad(
                    "rate",
                    "is missing: a limit sets `rate`, or `concurrency_key` with `per_key`, or both"
                        .into(),
                ));
            }
            for name in &names {
                if let Some(other) = owner.insert(name.clone(), id.clone()) {
                    return Err(bad(
                        "event",
                        format!(
                            "event name {name:?} is already limited by [[limit]] {other}; an event name may have one limit"
                        ),
                    ));
                }
            }
            limits.push(Limit {
                id,
                names,
                rate,
                per_key,
            });
        }
        Ok(Limits { limits })
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Every event name that has a limit.
    pub fn names(&self) -> Vec<String> {
        self.limits.iter().flat_map(|l| l.names.clone()).collect()
    }

    /// The limit of event `name`, if it has one.
    pub fn of(&self, name: &str) -> Option<&Limit> {
        self.limits
            .iter()
            .find(|l| l.names.iter().any(|n| n == name))
    }
}

/// How long until a bucket holding `tokens` holds one whole token: the
/// claimer of a limit that ran dry sleeps this long instead of asking
/// again (at least a millisecond).
pub fn token_wait(tokens: f64, per_second: f64) -> Duration {
    let missing = (1.0 - tokens).max(0.0);
    Duration::from_secs_f64((missing / per_second).max(0.001))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(text: &str) -> Result<Limits, LimitError> {
        let c: Config = toml::from_str(text).unwrap();
        Limits::from_config(&c)
    }

    #[test]
    fn rates() {
        let r = Rate::parse("100/s").unwrap();
        assert_eq!((r.per_second, r.burst), (100.0, 100.0));
        assert_eq!(Rate::parse("30/m").unwrap().per_second, 0.5);
        assert_eq!(Rate::parse(" 7200 / hour ").unwrap().per_second, 2.0);
        assert!(Rate::parse("0/s").unwrap_err().contains("never"));
        assert!(Rate::parse("100").unwrap_err().contains("not a rate"));
        assert!(Rate::parse("x/s").unwrap_err().contains("whole number"));
        assert!(Rate::parse("1.5/s").is_err());
        assert!(Rate::parse("5/fortnight").unwrap_err().contains("unit"));
    }

    #[test]
    fn pointers_and_keys() {
        let k = KeySource::parse("/a~1b/0").unwrap();
        assert_eq!(
            k,
            KeySource::Pointer {
                pointer: "/a~1b/0".into(),
                segments: vec!["a/b".into(), "0".into()]
            }
        );
        assert_eq!(k.key_of(r#"{"a/b":["x"]}"#, None).as_deref(), Some("x"));
        let k = KeySource::parse("/n").unwrap();
        assert_eq!(k.key_of(r#"{"n":7}"#, None).as_deref(), Some("7"));
        assert_eq!(k.key_of(r#"{"m":7}"#, None), None);
        assert_eq!(k.key_of(r#"{"n":null}"#, None), None);
        assert_eq!(
            KeySource::parse("group_id")
                .unwrap()
                .key_of("{}", Some("g"))
                .as_deref(),
            Some("g")
        );
        assert!(KeySource::parse("customer").is_err());
    }

    #[test]
    fn config_entries() {
        let l = limits(
            "[[handler]]\nname = \"h\"\nevents = [\"a\", \"b\"]\nmodule = \"h.wasm\"\n\
             [[limit]]\nhandler = \"h\"\nrate = \"50/s\"\nburst = 5\n\
             [[limit]]\nevent = \"c\"\nconcurrency_key = \"/k\"\nper_key = 2\n",
        )
        .unwrap();
        assert_eq!(l.limits.len(), 2);
        assert_eq!(l.limits[0].names, vec!["a", "b"]);
        assert_eq!(l.limits[0].rate.unwrap().burst, 5.0);
        assert_eq!(l.of("c").unwrap().id, "event:c");
        assert_eq!(l.limits[1].describe(), "2 per /k");
        assert_eq!(l.names(), vec!["a", "b", "c"]);
    }

    #[test]
    fn bad_entries() {
        let err = |t: &str| limits(t).unwrap_err();
        let e = err("[[limit]]\nevent = \"a\"\nrate = \"0/s\"\n");
        assert_eq!(e.field, "rate");
        assert!(e.to_string().contains("event \"a\""), "{e}");
        assert_eq!(
            err("[[limit]]\nevent = \"a\"\nrate = \"fast\"\n").field,
            "rate"
        );
        assert_eq!(err("[[limit]]\nevent = \"a\"\n").field, "rate");
        assert_eq!(err("[[limit]]\nrate = \"1/s\"\n").field, "handler");
        assert_eq!(
            err("[[limit]]\nhandler = \"nope\"\nrate = \"1/s\"\n").field,
            "handler"
        );
        assert_eq!(
            err("[[limit]]\nevent = \"a\"\nconcurrency_key = \"/k\"\n").field,
            "per_key"
        );
        assert_eq!(
            err("[[limit]]\nevent = \"a\"\nconcurrency_key = \"k\"\nper_key = 1\n").field,
            "concurrency_key"
        );
        assert_eq!(
            err("[[limit]]\nevent = \"a\"\nconcurrency_key = \"/k\"\nper_key = 0\n").field,
            "per_key"
        );
        assert_eq!(err("[[limit]]\nevent = \"a\"\nburst = 3\n").field, "burst");
        let e = err(
            "[[limit]]\nevent = \"a\"\nrate = \"1/s\"\n[[limit]]\nevent = \"a\"\nper_key = 1\nconcurrency_key = \"/k\"\n",
        );
        assert!(e.to_string().contains("already limited"), "{e}");
    }
}
