//! The one TOML config file, validated once at start-up. Every knob and its
//! default is declared here and nowhere else; `OUTRUN_*` environment
//! variables override the file, and command-line flags override both.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The database used when neither the file, `OUTRUN_DATABASE_URL` nor
/// `--database` names one: an SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://outrun.db?mode=rwc";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: `{key}` {message}")]
    Invalid {
        origin: String,
        key: &'static str,
        message: String,
    },
    #[error("{origin}: {source}")]
    Schedule {
        origin: String,
        source: crate::schedule::ScheduleError,
    },
    #[error("{origin}: {source}")]
    Limit {
        origin: String,
        source: crate::limits::LimitError,
    },
    #[error("environment variable {var}={value:?}: {message}")]
    Env {
        var: &'static str,
        value: String,
        message: String,
    },
}

/// The whole file. Unknown keys anywhere are errors that name the key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `sqlite://PATH?mode=rwc` or `postgres://USER@HOST/DB`.
    #[serde(default = "default_database_url")]
    pub database_url: String,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Where compiled handler artifacts are cached, so a restart with
    /// unchanged modules does not recompile. Default: the user's cache
    /// directory, `$XDG_CACHE_HOME/outrun` or `~/.cache/outrun` (nothing is
    /// written beside the config, which may be on a read-only mount). A
    /// relative path resolves against the config file's directory.
    /// `OUTRUN_CACHE_DIR`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Compiled artifacts kept in the cache besides the versions in use
    /// (the most recently used first); the rest is deleted at start and
    /// after each reload. `OUTRUN_CACHE_KEEP`.
    #[serde(default = "default_cache_keep")]
    pub cache_keep: usize,
    /// `[kv]`: the key-value store behind the `kv` capability.
    #[serde(default)]
    pub kv: crate::wasm::KvSettings,
    /// `[[handler]]` entries: which component handles which event names,
    /// with its limits and capabilities.
    #[serde(default)]
    pub handler: Vec<crate::wasm::HandlerSpec>,
    /// `[publish]`: the broker behind the `publish` capability and the
    /// relays.
    #[serde(default)]
    pub publish: crate::publish::PublishSettings,
    /// `[[relay]]` entries: event names published as they are to a topic,
    /// without a handler.
    #[serde(default)]
    pub relay: Vec<crate::publish::relay::RelaySpec>,
    /// `[schemas]`: the JSON Schemas events are checked against (see
    /// [`crate::schema`]).
    #[serde(default)]
    pub schemas: SchemasConfig,
    /// `[[schedule]]` entries: periodic events (see [`crate::schedule`]).
    #[serde(default)]
    pub schedule: Vec<crate::schedule::ScheduleSpec>,
    /// `[[limit]]` entries: rate limits and per-key concurrency of event
    /// names or handlers, held across instances (see [`crate::limits`]).
    #[serde(default)]
    pub limit: Vec<crate::limits::LimitSpec>,
    /// `[otel]`: OpenTelemetry traces over OTLP/HTTP; off without the
    /// section (see [`crate::otel`]).
    #[serde(default)]
    pub otel: Option<OtelConfig>,
    /// Where the file was read from; relative module paths resolve against
    /// its directory. `None` for the built-in defaults.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

fn default_database_url() -> String {
    DEFAULT_DATABASE_URL.to_string()
}

/// Knobs of the dispatch loop and the maintenance services.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Events handled at the same time by this runtime. `OUTRUN_CONCURRENCY`.
    pub concurrency: usize,
    /// Most events claimed by one claim statement, and the most claimed
    /// events waiting for a free worker (they are leased while they wait).
    /// Larger batches claim more cheaply per event; smaller ones leave more
    /// work to other instances when handlers are slow. `OUTRUN_BATCH_SIZE`.
    pub batch_size: usize,
    /// How often to look for work when no wake-up arrives (PostgreSQL
    /// NOTIFY or an in-process enqueue). `OUTRUN_POLL_INTERVAL`.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a claim holds an event; extended while the handler runs.
    /// An instance that dies loses its leases after this. `OUTRUN_LEASE_DURATION`.
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    /// Failed attempts allowed for events enqueued without `max_retry`.
    /// `OUTRUN_MAX_RETRY`.
    pub max_retry: i32,
    /// First retry delay; doubles per failed attempt. `OUTRUN_BACKOFF_BASE`.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay. `OUTRUN_BACKOFF_MAX`.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Random spread of each delay, as a fraction (0.2 = ±20%), so failed
    /// events do not retry in lockstep. `OUTRUN_BACKOFF_JITTER`.
    pub backoff_jitter: f64,
    /// Dead events older than this are deleted. `OUTRUN_DEAD_RETENTION`.
    #[serde(with = "humantime_serde")]
    pub dead_retention: Duration,
    /// How often expiry and dead-event cleanup run. `OUTRUN_CLEANUP_INTERVAL`.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// On a stop signal (SIGINT, SIGTERM, SIGHUP, SIGQUIT), how long running
    /// handlers may take to finish before their events are released.
    /// `OUTRUN_SHUTDOWN_GRACE`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Transactions that commit handlers' effects in groups, each on its
    /// own connection (see the README's "Effects" section). 0: the runtime
    /// picks (SQLite 1, its one writer; PostgreSQL up to 4).
    /// `OUTRUN_EFFECT_LANES`.
    pub effect_lanes: usize,
    /// Whether each event in a lane gets a savepoint of its own
    /// (`always`), or only the events of handlers that have failed after
    /// touching the database (`auto`, the default): see the README's
    /// "Effects" section. `OUTRUN_EFFECT_SAVEPOINTS`.
    pub effect_savepoints: SavepointMode,
    /// Failed, deferred and interrupted attempts kept per event in
    /// `outrun_attempts` (0: none recorded). `OUTRUN_ATTEMPT_HISTORY`.
    pub attempt_history: u32,
    /// Keep a record of each handled event's last attempt (and its failed
    /// ones) in `outrun_attempts` for this long after its row is deleted,
    /// so `outrun events show ID` can answer "did my event run?". Off by
    /// default: it costs an insert per handled event. `OUTRUN_KEEP_DONE`
    /// (`off` turns it off).
    #[serde(with = "humantime_serde")]
    pub keep_done: Option<Duration>,
}

/// See [`RuntimeConfig::effect_savepoints`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SavepointMode {
    /// A handler's events run without a savepoint until one of them fails
    /// after touching the database; from then on that handler's events get
    /// one. A failure without a savepoint rolls the lane's transaction back
    /// and runs its other events again, without spending their retries.
    #[default]
    Auto,
    /// Every event gets a savepoint: a failure undoes that event alone.
    Always,
}

impl std::str::FromStr for SavepointMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            other => Err(format!(
                "unknown savepoint mode {other:?}; use auto or always"
            )),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            concurrency: 32,
            batch_size: 64,
            poll_interval: Duration::from_secs(1),
            lease_duration: Duration::from_secs(30),
            max_retry: crate::store::DEFAULT_MAX_RETRY,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            backoff_jitter: 0.2,
            dead_retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            effect_lanes: 0,
            effect_savepoints: SavepointMode::Auto,
            attempt_history: 20,
            keep_done: None,
        }
    }
}

/// The admin HTTP server (metrics, health, events API).
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// e.g. "127.0.0.1:9464"; none = no admin server. `OUTRUN_ADMIN_LISTEN`.
    pub listen: Option<String>,
    /// The bearer token every mutating request (POST, PUT, DELETE) must
    /// carry; without one they are refused. `OUTRUN_ADMIN_TOKEN`.
    pub token: Option<String>,
    /// Reads (GET under /v1) need the token too. Probes, /metrics and
    /// /v1/openapi.json never do. `OUTRUN_ADMIN_TOKEN_FOR_READS`.
    pub token_for_reads: bool,
    /// Serve /metrics on this address instead of `listen` (e.g. a port the
    /// scraper may reach while the admin API stays private).
    /// `OUTRUN_ADMIN_METRICS_LISTEN`.
    pub metrics_listen: Option<String>,
}

// By hand: the token must never reach a log line or an error message.
impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_for_reads", &self.token_for_reads)
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[schemas]`: a directory of JSON Schemas, one file per event name and
/// version (`TaskSolved.v0.json` is the schema of events named
/// `TaskSolved.v0`). Without `dir` no event is checked and checking costs
/// nothing.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemasConfig {
    /// The directory; relative paths resolve against the config file's
    /// directory. `OUTRUN_SCHEMAS_DIR`.
    pub dir: Option<PathBuf>,
    /// Every event must have a schema: an event whose name has none is
    /// refused at enqueue and `emit`, and dead before dispatch.
    /// `OUTRUN_SCHEMAS_REQUIRED`.
    pub required: bool,
}

/// `[otel]`: present = one span per attempt, exported over OTLP/HTTP
/// (protobuf). An empty section takes everything from the standard OTLP
/// environment variables.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`;
    /// `/v1/traces` is appended unless the URL ends with it). Default:
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, then `http://localhost:4318`.
    pub endpoint: Option<String>,
    /// The spans' `service.name`. Default: `OTEL_SERVICE_NAME`, then
    /// `outrun`.
    pub service_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`. `OUTRUN_LOG_FORMAT`.
    pub format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: default_database_url(),
            runtime: RuntimeConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            cache_dir: None,
            cache_keep: crate::wasm::cache::DEFAULT_KEEP,
            kv: Default::default(),
            handler: Vec::new(),
            publish: Default::default(),
            relay: Vec::new(),
            schemas: SchemasConfig::default(),
            schedule: Vec::new(),
            limit: Vec::new(),
            otel: None,
            source: None,
        }
    }
}

impl Config {
    /// Read `path` (or take the defaults), apply `OUTRUN_*` overrides from
    /// the process environment, and validate.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |k| std::env::var(k).ok())
    }

    /// As [`Config::load`], with the environment given as a lookup (tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                let mut c = Self::parse(&text, p)?;
                c.source = Some(p.to_path_buf());
                c
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's Display draws a multi-line snippet; one line reads
            // better in logs: "line 4: unknown field `handlr`, expected ...".
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let message = e.message().trim_end().replace('\n', " ");
            ConfigError::Parse {
                path: path.to_path_buf(),
                message: match line {
                    Some(l) => format!("line {l}: {message}"),
                    None => message,
                },
            }
        })
    }

    /// The artifact cache to use: `cache_dir` (relative to the config
    /// file's directory) or the user's cache directory; `None` when there
    /// is neither (no `HOME`): handlers then compile at every start.
    pub fn artifact_cache_dir(&self) -> Option<PathBuf> {
        match &self.cache_dir {
            Some(d) => Some(crate::wasm::resolve(&self.base_dir(), d)),
            None => crate::wasm::cache::user_cache_dir(),
        }
    }

    /// The schema directory (`[schemas] dir`, relative to the config
    /// file's directory), if one is configured.
    pub fn schema_dir(&self) -> Option<PathBuf> {
        self.schemas
            .dir
            .as_ref()
            .map(|d| crate::wasm::resolve(&self.base_dir(), d))
    }

    /// Directory that relative paths in the file resolve against.
    pub fn base_dir(&self) -> PathBuf {
        self.source
            .as_deref()
            .and_then(Path::parent)
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
                .to_path_buf()
            })
            .unwrap_or_else(|| PathBuf::from("."))
    }

    fn origin(&self) -> String {
        match &self.source {
            Some(p) => format!("config file {}", p.display()),
            None => "config".to_string(),
        }
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &'static str, value: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                var,
                value: value.into(),
                message: e.to_string(),
            })
        }
        fn duration(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
            humantime::parse_duration(value.trim()).map_err(|e| ConfigError::Env {
                var,
                value: value.into(),
                message: format!("{e} (write a duration like 500ms, 30s, 5m, 7d)"),
            })
        }
        let r = &mut self.runtime;
        macro_rules! over {
            ($var:literal, $field:expr, $conv:ident) => {
                if let Some(v) = env($var) {
                    $field = $conv($var, &v)?;
                }
            };
        }
        if let Some(v) = env("OUTRUN_DATABASE_URL") {
            self.database_url = v;
        }
        over!("OUTRUN_CONCURRENCY", r.concurrency, parse);
        over!("OUTRUN_BATCH_SIZE", r.batch_size, parse);
        over!("OUTRUN_POLL_INTERVAL", r.poll_interval, duration);
        over!("OUTRUN_LEASE_DURATION", r.lease_duration, duration);
        over!("OUTRUN_MAX_RETRY", r.max_retry, parse);
        over!("OUTRUN_BACKOFF_BASE", r.backoff_base, duration);
        over!("OUTRUN_BACKOFF_MAX", r.backoff_max, duration);
        over!("OUTRUN_BACKOFF_JITTER", r.backoff_jitter, parse);
        over!("OUTRUN_DEAD_RETENTION", r.dead_retention, duration);
        over!("OUTRUN_CLEANUP_INTERVAL", r.cleanup_interval, duration);
        over!("OUTRUN_SHUTDOWN_GRACE", r.shutdown_grace, duration);
        over!("OUTRUN_EFFECT_LANES", r.effect_lanes, parse);
        over!("OUTRUN_EFFECT_SAVEPOINTS", r.effect_savepoints, parse);
        over!("OUTRUN_ATTEMPT_HISTORY", r.attempt_history, parse);
        if let Some(v) = env("OUTRUN_KEEP_DONE") {
            r.keep_done = match v.trim() {
                "" | "off" => None,
                d => Some(duration("OUTRUN_KEEP_DONE", d)?),
            };
        }
        if let Some(v) = env("OUTRUN_ADMIN_LISTEN") {
            self.admin.listen = (!v.trim().is_empty()).then_some(v);
        }
        if let Some(v) = env("OUTRUN_CACHE_KEEP") {
            self.cache_keep = parse("OUTRUN_CACHE_KEEP", &v)?;
        }
        if let Some(v) = env("OUTRUN_ADMIN_TOKEN") {
            self.admin.token = (!v.trim().is_empty()).then_some(v);
        }
        over!(
            "OUTRUN_ADMIN_TOKEN_FOR_READS",
            self.admin.token_for_reads,
            parse
        );
        if let Some(v) = env("OUTRUN_ADMIN_METRICS_LISTEN") {
            self.admin.metrics_listen = (!v.trim().is_empty()).then_some(v);
        }
        if let Some(v) = env("OUTRUN_CACHE_DIR") {
            self.cache_dir = (!v.trim().is_empty()).then(|| PathBuf::from(v));
        }
        if let Some(v) = env("OUTRUN_KV_URL") {
            self.kv.url = (!v.trim().is_empty()).then_some(v);
        }
        over!("OUTRUN_KV_TIMEOUT", self.kv.timeout, duration);
        over!("OUTRUN_PUBLISH_TIMEOUT", self.publish.timeout, duration);
        if let Some(v) = env("OUTRUN_KAFKA_BROKERS") {
            match &mut self.publish.kafka {
                Some(k) => k.brokers = v,
                None => {
                    self.publish.kafka = Some(crate::publish::KafkaSettings {
                        brokers: v,
                        properties: Default::default(),
                    })
                }
            }
        }
        if let Some(v) = env("OUTRUN_NATS_URL") {
            self.publish.nats = Some(crate::publish::NatsSettings { url: v });
        }
        if let Some(v) = env("OUTRUN_SCHEMAS_DIR") {
            self.schemas.dir = (!v.trim().is_empty()).then(|| PathBuf::from(v));
        }
        over!("OUTRUN_SCHEMAS_REQUIRED", self.schemas.required, parse);
        if let Some(v) = env("OUTRUN_LOG_FORMAT") {
            self.log.format = match v.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        var: "OUTRUN_LOG_FORMAT",
                        value: v,
                        message: "expected text or json".into(),
                    });
                }
            };
        }
        Ok(())
    }

    /// Reject values that would make the runtime misbehave rather than fail.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.runtime;
        let bad = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                origin: self.origin(),
                key,
                message: message.to_string(),
            })
        };
        if r.concurrency == 0 {
            return bad("runtime.concurrency", "must be at least 1");
        }
        if r.batch_size == 0 {
            return bad("runtime.batch_size", "must be at least 1");
        }
        if r.max_retry < 1 || r.max_retry > i16::MAX as i32 {
            return bad(
                "runtime.max_retry",
                "must be between 1 and 32767 (the column is a SMALLINT)",
            );
        }
        if r.lease_duration < Duration::from_secs(1) {
            return bad(
                "runtime.lease_duration",
                "must be at least 1s (leases are extended every third of it)",
            );
        }
        if r.poll_interval.is_zero() {
            return bad("runtime.poll_interval", "must be more than 0");
        }
        if r.keep_done.is_some_and(|d| d < Duration::from_secs(1)) {
            return bad(
                "runtime.keep_done",
                "must be at least 1s (leave it out to keep no record of handled events)",
            );
        }
        if !(0.0..=1.0).contains(&r.backoff_jitter) {
            return bad("runtime.backoff_jitter", "must be between 0.0 and 1.0");
        }
        if r.backoff_base.is_zero() || r.backoff_base > r.backoff_max {
            return bad(
                "runtime.backoff_base",
                "must be more than 0 and at most runtime.backoff_max",
            );
        }
        if r.cleanup_interval.is_zero() {
            return bad("runtime.cleanup_interval", "must be more than 0");
        }
        if let Err((key, message)) = self.publish.check() {
            return bad(key, &message);
        }
        if !self.relay.is_empty() && !self.publish.configured() {
            return bad(
                "relay",
                "needs a broker: add [publish.kafka] brokers or [publish.nats] url",
            );
        }
        for relay in &self.relay {
            if let Err(message) = relay.check() {
                return Err(ConfigError::Invalid {
                    origin: self.origin(),
                    key: "relay",
                    message,
                });
            }
        }
        if self.schemas.required && self.schemas.dir.is_none() {
            return bad(
                "schemas.required",
                "is true but no schema directory is set: add `dir = \"schemas\"` to [schemas] (or set OUTRUN_SCHEMAS_DIR)",
            );
        }
        if let Err(source) = crate::schedule::Schedule::all(&self.schedule) {
            return Err(ConfigError::Schedule {
                origin: self.origin(),
                source,
            });
        }
        if let Err(source) = crate::limits::Limits::from_config(self) {
            return Err(ConfigError::Limit {
                origin: self.origin(),
                source,
            });
        }
        if self.kv.timeout.is_zero() {
            return bad(
                "kv.timeout",
                "must be more than 0 (it bounds each Redis connection attempt and reply; the default is 1s)",
            );
        }
        if let Some(endpoint) = self.otel.as_ref().and_then(|o| o.endpoint.as_deref()) {
            let ok = url::Url::parse(endpoint)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            if !ok {
                return bad(
                    "otel.endpoint",
                    &format!(
                        "{endpoint:?} is not an http(s) URL; give the collector's OTLP/HTTP address, e.g. \"http://localhost:4318\""
                    ),
                );
            }
        }
        Ok(())
    }
}

fn default_cache_keep() -> usize {
    crate::wasm::cache::DEFAULT_KEEP
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outrun.toml");
        std::fs::write(&path, text).unwrap();
        Config::load_with_env(Some(&path), no_env)
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_with_env(None, no_env).unwrap();
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(c.runtime, RuntimeConfig::default());
    }

    #[test]
    fn reads_knobs_from_file() {
        let c = load_text("database_url = \"postgres://x@h/db\"\n[runtime]\nconcurrency = 4\nbackoff_base = \"250ms\"\ndead_retention = \"2d\"\n").unwrap();
        assert_eq!(c.database_url, "postgres://x@h/db");
        assert_eq!(c.runtime.concurrency, 4);
        assert_eq!(c.runtime.backoff_base, Duration::from_millis(250));
        assert_eq!(c.runtime.dead_retention, Duration::from_secs(2 * 86400));
        assert_eq!(c.runtime.batch_size, RuntimeConfig::default().batch_size);
    }

    #[test]
    fn keep_done_is_off_unless_set_and_bounded() {
        assert_eq!(load_text("").unwrap().runtime.keep_done, None);
        let c = load_text("[runtime]\nkeep_done = \"1h\"\n").unwrap();
        assert_eq!(c.runtime.keep_done, Some(Duration::from_secs(3600)));
        let err = load_text("[runtime]\nkeep_done = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("runtime.keep_done"), "{err}");
        let err = load_text("[runtime]\nkeep_done = \"forever\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("keep_done") || err.contains("forever"),
            "{err}"
        );
        let env = |k: &str| (k == "OUTRUN_KEEP_DONE").then(|| "off".to_string());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outrun.toml");
        std::fs::write(&path, "[runtime]\nkeep_done = \"1h\"\n").unwrap();
        assert_eq!(
            Config::load_with_env(Some(&path), env)
                .unwrap()
                .runtime
                .keep_done,
            None
        );
    }

    #[test]
    fn otel_section() {
        assert_eq!(Config::load_with_env(None, no_env).unwrap().otel, None);
        let c = load_text("[otel]\n").unwrap();
        assert_eq!(c.otel, Some(OtelConfig::default()));
        let c = load_text("[otel]\nendpoint = \"http://c:4318\"\nservice_name = \"billing\"\n")
            .unwrap();
        let o = c.otel.unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://c:4318"));
        assert_eq!(o.service_name.as_deref(), Some("billing"));
        let err = load_text("[otel]\nendpoint = \"c:4318\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("otel.endpoint") && err.contains("http://localhost:4318"),
            "{err}"
        );
        let err = load_text("[otel]\nendpiont = \"http://c\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("endpiont"), "{err}");
    }

    #[test]
    fn schemas_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outrun.toml");
        std::fs::write(&path, "[schemas]\ndir = \"schemas\"\nrequired = true\n").unwrap();
        let c = Config::load_with_env(Some(&path), no_env).unwrap();
        assert!(c.schemas.required);
        assert_eq!(c.schema_dir(), Some(dir.path().join("schemas")));
        let err = load_text("[schemas]\nrequired = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("schemas.required") && err.contains("dir"),
            "{err}"
        );
        let err = load_text("[schemas]\ndirectory = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("directory"), "{err}");
        assert_eq!(Config::default().schema_dir(), None);
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let err = load_text("[runtime]\nconcurency = 4\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("concurency"), "{err}");
        assert!(err.contains("outrun.toml"), "{err}");
        let err = load_text("databse_url = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("databse_url"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected() {
        let err = load_text("[runtime]\nconcurrency = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("runtime.concurrency"), "{err}");
        let err = load_text("[runtime]\nbackoff_jitter = 1.5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("backoff_jitter"), "{err}");
        let err = load_text("[runtime]\npoll_interval = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("poll_interval") || err.contains("soon"),
            "{err}"
        );
        let err = load_text("[kv]\ntimeout = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kv.timeout"), "{err}");
        assert!(matches!(
            Config::load_with_env(Some(Path::new("/nonexistent/outrun.toml")), no_env),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn publish_and_relay_sections() {
        let c = load_text(
            "[publish]\ntimeout = \"3s\"\n[publish.kafka]\nbrokers = \"127.0.0.1:9092\"\n\
             [[relay]]\nevents = [\"order.created\"]\ntopic = \"orders\"\nkey = \"/id\"\n",
        )
        .unwrap();
        assert_eq!(c.publish.timeout, Duration::from_secs(3));
        assert_eq!(c.relay.len(), 1);
        let err = load_text("[[relay]]\nevents = [\"a\"]\ntopic = \"t\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("relay") && err.contains("[publish.kafka]"),
            "{err}"
        );
        let err = load_text("[publish.kafka]\nbrokers = \"\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("publish.kafka.brokers"), "{err}");
        let env = |k: &str| (k == "OUTRUN_KAFKA_BROKERS").then(|| "b:9092".to_string());
        let c = Config::load_with_env(None, env).unwrap();
        assert_eq!(c.publish.kafka.unwrap().brokers, "b:9092");
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[runtime]\nconcurrency = 4\n").unwrap();
        let env = |k: &str| match k {
            "OUTRUN_CONCURRENCY" => Some("9".to_string()),
            "OUTRUN_LEASE_DURATION" => Some("2m".to_string()),
            "OUTRUN_DATABASE_URL" => Some("sqlite://x.db".to_string()),
            "OUTRUN_CACHE_DIR" => Some("/var/cache/outrun".to_string()),
            "OUTRUN_CACHE_KEEP" => Some("7".to_string()),
            "OUTRUN_KV_URL" => Some("redis://127.0.0.1:6379".to_string()),
            "OUTRUN_KV_TIMEOUT" => Some("250ms".to_string()),
            _ => None,
        };
        let c = Config::load_with_env(Some(&path), env).unwrap();
        assert_eq!(c.runtime.concurrency, 9);
        assert_eq!(c.runtime.lease_duration, Duration::from_secs(120));
        assert_eq!(c.database_url, "sqlite://x.db");
        assert_eq!(c.cache_dir.as_deref(), Some(Path::new("/var/cache/outrun")));
        assert_eq!(c.cache_keep, 7);
        assert_eq!(c.kv.url.as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(c.kv.timeout, Duration::from_millis(250));
        assert_eq!(c.base_dir(), dir.path());
        let env = |k: &str| (k == "OUTRUN_BATCH_SIZE").then(|| "lots".to_string());
        let err = Config::load_with_env(Some(&path), env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("OUTRUN_BATCH_SIZE"), "{err}");
    }

    #[test]
    fn effect_savepoints_from_file_and_env() {
        assert_eq!(
            RuntimeConfig::default().effect_savepoints,
            SavepointMode::Auto
        );
        let c = load_text("[runtime]\neffect_savepoints = \"always\"\n").unwrap();
        assert_eq!(c.runtime.effect_savepoints, SavepointMode::Always);
        let err = load_text("[runtime]\neffect_savepoints = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes") && err.contains("always"), "{err}");
        let env = |k: &str| (k == "OUTRUN_EFFECT_SAVEPOINTS").then(|| "never".to_string());
        let err = Config::load_with_env(None, env).unwrap_err().to_string();
        assert!(
            err.contains("OUTRUN_EFFECT_SAVEPOINTS") && err.contains("auto or always"),
            "{err}"
        );
    }
}
