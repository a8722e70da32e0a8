//! The `[[handler]]` and `[kv]` sections of the config file, as the WASM host
//! reads them. Parsed with `deny_unknown_fields` so a typo is an error, not a
//! silently ignored capability.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Memory cap when a handler does not set `memory`.
pub const DEFAULT_MEMORY: ByteSize = ByteSize(64 * 1024 * 1024);
/// Wall-clock budget of one attempt when a handler does not set `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One `[[handler]]` entry: a component, the event names it handles, its
/// limits and the capabilities it is granted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSpec {
    /// Unique handler name, used in logs, metrics and capability errors.
    pub name: String,
    /// Event names routed to this handler (one or more).
    pub events: Vec<String>,
    /// Path of the `.wasm` component; relative paths resolve against the
    /// directory of the config file.
    pub module: PathBuf,
    /// Overrides an event's `max_retry` when it fails in this handler.
    #[serde(default)]
    pub max_retry: Option<i32>,
    /// Wall-clock budget of one attempt (humantime: "2s", "500ms").
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Linear memory cap of one instance ("64MiB", "512KiB", or bytes).
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// At most this many events of this handler run at once.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// `fresh` (default): a new instance per event. `reuse`: warm instances
    /// kept between events of this handler (faster, but a guest's global
    /// state carries over from one event to the next; see README).
    #[serde(default)]
    pub instances: InstanceMode,
    /// `instances = "reuse"`: an instance is dropped after this many events
    /// (and after any trap or error, and on reload).
    #[serde(default = "default_reuse_events")]
    pub reuse_events: u32,
    /// Capabilities; everything absent is denied.
    #[serde(default)]
    pub allow: Allow,
    /// `outrun dev`: the handler's source directory (relative to the config
    /// file), watched and rebuilt on change. Ignored by `serve`.
    #[serde(default)]
    pub source: Option<PathBuf>,
    /// `outrun dev`: the shell command that rebuilds `module` from
    /// `source`, run in `source`. Default for a Rust crate (a Cargo.toml in
    /// `source`): `cargo build --target wasm32-wasip2 --release`.
    #[serde(default)]
    pub build: Option<String>,
}

/// Events a reused instance serves before it is replaced, by default.
pub const DEFAULT_REUSE_EVENTS: u32 = 1000;

/// How a handler's events get their instance.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum InstanceMode {
    /// A new instance per event: nothing an event leaves in the guest's
    /// memory is seen by the next.
    #[default]
    Fresh,
    /// A bounded pool of warm instances, recycled after `reuse_events`
    /// events, after any trap or error, and on reload.
    Reuse,
}

fn default_reuse_events() -> u32 {
    DEFAULT_REUSE_EVENTS
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_memory() -> ByteSize {
    DEFAULT_MEMORY
}

/// `[handler.allow]`: what the handler may touch. Deny by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// Event names the handler may `emit`.
    #[serde(default)]
    pub emit: Vec<String>,
    /// Key prefix of the handler's kv namespace; absent = kv denied.
    #[serde(default)]
    pub kv: Option<String>,
    /// Hosts (`host` = any port, `host:port` = that port) reachable through
    /// `wasi:http`; empty = outgoing HTTP denied.
    #[serde(default)]
    pub http: Vec<String>,
    /// Parameterised SQL inside the ack transaction.
    #[serde(default)]
    pub sql: bool,
    /// Topics (Kafka) or subjects (NATS) the handler may publish to: exact
    /// names, or a prefix ending in `*`. Needs a `[publish]` backend.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Values exposed through `wasi:config/store`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// How long one Redis connection attempt, and one command's reply, may take
/// when `[kv] timeout` is not set.
pub const DEFAULT_KV_TIMEOUT: Duration = Duration::from_secs(1);

/// `[kv]`: where the `kv` capability keeps its data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSettings {
    /// `redis://host:port/db`. Absent: an embedded in-memory store, which is
    /// per process and lost on restart.
    #[serde(default)]
    pub url: Option<String>,
    /// Redis only: the longest one connection attempt and one command's
    /// reply may take. A kv call on a dead or reconnecting connection fails
    /// with `unavailable` within twice this, well inside a handler's
    /// timeout, instead of holding its worker. `OUTRUN_KV_TIMEOUT`.
    #[serde(default = "default_kv_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for KvSettings {
    fn default() -> Self {
        Self {
            url: None,
            timeout: DEFAULT_KV_TIMEOUT,
        }
    }
}

fn default_kv_timeout() -> Duration {
    DEFAULT_KV_TIMEOUT
}

/// A size in bytes, written in config as "64MiB", "16 MiB", "512KiB", "1GiB",
/// "1MB" or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {text:?}: expected a number with a unit such as \"64MiB\"")
        })?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1024,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1024 * 1024,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1024 * 1024 * 1024,
            other => {
                return Err(format!(
                    "invalid size {text:?}: unknown unit {other:?} (use B, KiB, MiB or GiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {text:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1024 * 1024;
        const KIB: u64 = 1024;
        if self.0 >= MIB && self.0.is_multiple_of(MIB) {
            write!(f, "{} MiB", self.0 / MIB)
        } else if self.0 >= KIB && self.0.is_multiple_of(KIB) {
            write!(f, "{} KiB", self.0 / KIB)
        } else {
            write!(f, "{} bytes", self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(ByteSize::parse("64MiB").unwrap(), ByteSize(64 << 20));
        assert_eq!(ByteSize::parse("16 MiB").unwrap(), ByteSize(16 << 20));
        assert_eq!(ByteSize::parse("512KiB").unwrap(), ByteSize(512 << 10));
        assert_eq!(ByteSize::parse("1000").unwrap(), ByteSize(1000));
        assert!(
            ByteSize::parse("12 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(ByteSize::parse("MiB").is_err());
        assert_eq!(ByteSize(16 << 20).to_string(), "16 MiB");
    }

    #[test]
    fn spec_defaults_and_typos() {
        let spec: HandlerSpec =
            toml::from_str("name = \"a\"\nevents = [\"x\"]\nmodule = \"a.wasm\"\n").unwrap();
        assert_eq!(spec.timeout, DEFAULT_TIMEOUT);
        assert_eq!(spec.memory, DEFAULT_MEMORY);
        assert_eq!(spec.instances, InstanceMode::Fresh);
        let reuse: HandlerSpec = toml::from_str(
            "name = \"a\"\nevents = [\"x\"]\nmodule = \"a.wasm\"\ninstances = \"reuse\"\nreuse_events = 5\n",
        )
        .unwrap();
        assert_eq!(
            (reuse.instances, reuse.reuse_events),
            (InstanceMode::Reuse, 5)
        );
        let err = toml::from_str::<HandlerSpec>(
            "name = \"a\"\nevents = [\"x\"]\nmodule = \"a.wasm\"\ninstances = \"warm\"\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("fresh") && err.to_string().contains("reuse"),
            "{err}"
        );
        assert!(!spec.allow.sql && spec.allow.kv.is_none() && spec.allow.http.is_empty());

        let spec: HandlerSpec = toml::from_str(
            "name = \"a\"\nevents = [\"x\"]\nmodule = \"a.wasm\"\ntimeout = \"2s\"\nmemory = \"16MiB\"\n\
             [allow]\nemit = [\"y\"]\nkv = \"a:\"\nhttp = [\"localhost:8080\"]\nsql = true\nconfig = { k = \"v\" }\n",
        )
        .unwrap();
        assert_eq!(spec.timeout, Duration::from_secs(2));
        assert_eq!(spec.memory, ByteSize(16 << 20));
        assert_eq!(spec.allow.config.get("k").map(String::as_str), Some("v"));

        let err = toml::from_str::<HandlerSpec>(
            "name = \"a\"\nevents = [\"x\"]\nmodule = \"a.wasm\"\n[allow]\nsqll = true\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("sqll"), "{err}");
    }
}
