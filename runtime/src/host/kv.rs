//! `outrun:handler/kv`: a key-value store with TTLs and sets, confined to the
//! handler's key prefix (`allow.kv`). The guest passes unprefixed keys.
//!
//! Backends: Redis ([`RedisKv`], one connection shared by every handler)
//! when `[kv] url` is set, else [`MemoryKv`], an embedded store that lives
//! in this process only: it is not shared between runtime instances and is
//! lost on restart. Use Redis for anything that must survive.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::bindings::outrun::handler::kv::Host;
use serde_json::Value as Json;

use super::{CapError, HostState};
use crate::wasm::{KvSettings, WasmError};

/// The kv backend of one runtime. Cheap to clone.
#[derive(Clone)]
pub enum KvStore {
    Redis(RedisKv),
    Memory(Arc<MemoryKv>),
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvStore::Redis(_) => f.write_str("KvStore::Redis"),
            KvStore::Memory(_) => f.write_str("KvStore::Memory"),
        }
    }
}

impl KvStore {
    /// Connect to Redis when `settings.url` is set, else an embedded store.
    pub async fn connect(settings: &KvSettings) -> Result<KvStore, WasmError> {
        match &settings.url {
            Some(url) => Ok(KvStore::Redis(
                RedisKv::connect(url, settings.timeout).await?,
            )),
            None => Ok(KvStore::memory()),
        }
    }

    pub fn memory() -> KvStore {
        KvStore::Memory(Arc::new(MemoryKv::default()))
    }
}

/// Redis behind the kv capability: one multiplexed connection shared by
/// every handler, replaced when it breaks.
///
/// Built so that a Redis outage costs the events that touch kv a retry and
/// nothing else. `redis`'s `ConnectionManager` by default retries a broken
/// connection six times with delays that grow by a factor of 100 up to a
/// minute each (several minutes in all), and every command waits for that
/// reconnect: a four-second outage used to hang every kv call until the
/// handler's timeout, long after Redis was back, with every worker held.
/// Here a reconnect is one attempt bounded by `timeout`; when it fails, the
/// calls waiting for it fail too (`unavailable`, so their events are
/// retried after a backoff) and the next call starts a new attempt, so the
/// connection comes back with the first call after Redis does. Each reply
/// is bounded by `timeout` as well, and each call as a whole by twice it
/// (one connection attempt plus one reply), whatever the client does inside.
#[derive(Clone)]
pub struct RedisKv {
    conn: ConnectionManager,
    /// Bounds each connection attempt and each reply.
    timeout: Duration,
    /// Redacted, for error messages.
    url: Arc<str>,
}

impl RedisKv {
    /// Connect once (an unreachable Redis fails start-up with the URL);
    /// later reconnects happen by themselves, see the type's docs.
    pub async fn connect(url: &str, timeout: Duration) -> Result<RedisKv, WasmError> {
        let redacted = crate::store::redact_url(url);
        let fail = |e: redis::RedisError| WasmError::KvConnect {
            url: redacted.clone(),
            reason: e.to_string(),
        };
        let client = redis::Client::open(url).map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            // One attempt per reconnect: calls must not wait out a backoff
            // schedule while Redis is down; the next call tries again.
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(fail)?;
        Ok(RedisKv {
            conn,
            timeout,
            url: redacted.into(),
        })
    }

    /// Run one command (or pipeline) on the shared connection, bounded by
    /// twice the timeout; errors mapped for the guest.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, CapError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let limit = self.timeout.saturating_mul(2);
        match tokio::time::timeout(limit, f(self.conn.clone())).await {
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(CapError::Unavailable(format!(
                "kv (Redis at {}) did not answer within {}; the event will be retried",
                self.url,
                humantime::format_duration(limit)
            ))),
        }
    }

    fn error(&self, e: redis::RedisError) -> CapError {
        if e.kind() == redis::ErrorKind::TypeError || e.code() == Some("WRONGTYPE") {
            CapError::Invalid(format!("kv: {e}"))
        } else {
            CapError::Unavailable(format!("kv (Redis at {}) unavailable: {e}", self.url))
        }
    }
}

/// A value of the embedded store, as [`MemoryKv::snapshot`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvValue {
    Bytes(Vec<u8>),
    /// Members sorted, for stable output.
    Set(std::collections::BTreeSet<String>),
}

enum Entry {
    Bytes(Vec<u8>),
    Set(HashSet<String>),
}

struct Slot {
    entry: Entry,
    expires: Option<Instant>,
}

/// The embedded kv store: a map behind a mutex. An expired key is dropped
/// when next touched, and every [`SWEEP_EVERY`] operations a sweep drops the
/// expired keys nobody touches again, so TTLs bound memory. Per process, not
/// durable.
#[derive(Default)]
pub struct MemoryKv {
    map: Mutex<HashMap<String, Slot>>,
    ops: std::sync::atomic::AtomicU64,
}

/// Operations between full sweeps of expired keys (amortised O(1)).
const SWEEP_EVERY: u64 = 1024;

const WRONG_TYPE: &str = "the key holds a set; use the set operations (or a different key)";
const WRONG_TYPE_SET: &str =
    "the key holds a plain value, not a set; use get/set (or a different key)";

impl MemoryKv {
    fn with<R>(&self, key: &str, f: impl FnOnce(&mut HashMap<String, Slot>) -> R) -> R {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % SWEEP_EVERY == SWEEP_EVERY - 1 {
            let now = Instant::now();
            map.retain(|_, s| s.expires.is_none_or(|t| t > now));
        }
        if map
            .get(key)
            .is_some_and(|s| s.expires.is_some_and(|t| t <= Instant::now()))
        {
            map.remove(key);
        }
        f(&mut map)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CapError> {
        self.with(key, |m| match m.get(key) {
            None => Ok(None),
            Some(Slot {
                entry: Entry::Bytes(b),
                ..
            }) => Ok(Some(b.clone())),
            Some(_) => Err(CapError::Invalid(WRONG_TYPE.into())),
        })
    }

    fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) {
        self.with(key, |m| {
            m.insert(
                key.to_string(),
                Slot {
                    entry: Entry::Bytes(value),
                    expires: ttl.map(|t| Instant::now() + t),
                },
            );
        })
    }

    fn delete(&self, key: &str) -> bool {
        self.with(key, |m| m.remove(key).is_some())
    }

    fn exists(&self, key: &str) -> bool {
        self.with(key, |m| m.contains_key(key))
    }

    fn expire(&self, key: &str, ttl: Option<Duration>) -> bool {
        self.with(key, |m| match m.get_mut(key) {
            Some(slot) => {
                slot.expires = ttl.map(|t| Instant::now() + t);
                true
            }
            None => false,
        })
    }

    fn set_add(&self, key: &str, members: Vec<String>) -> Result<u32, CapError> {
        self.with(key, |m| {
            let slot = m.entry(key.to_string()).or_insert_with(|| Slot {
                entry: Entry::Set(HashSet::new()),
                expires: None,
            });
            match &mut slot.entry {
                Entry::Set(s) => {
                    Ok(members.into_iter().filter(|x| s.insert(x.clone())).count() as u32)
                }
                Entry::Bytes(_) => Err(CapError::Invalid(WRONG_TYPE_SET.into())),
            }
        })
    }

    fn set_remove(&self, key: &str, members: Vec<String>) -> Result<u32, CapError> {
        self.with(key, |m| {
            let Some(slot) = m.get_mut(key) else {
                return Ok(0);
            };
            let (n, empty) = match &mut slot.entry {
                Entry::Set(s) => (
                    members.iter().filter(|x| s.remove(*x)).count() as u32,
                    s.is_empty(),
                ),
                Entry::Bytes(_) => return Err(CapError::Invalid(WRONG_TYPE_SET.into())),
            };
            // Redis deletes a set when its last member goes; match it.
            if empty {
                m.remove(key);
            }
            Ok(n)
        })
    }

    /// Every live key with its value, sorted by key: lets the embedding
    /// process (`outrun demo`) show and check what handlers left behind.
    pub fn snapshot(&self) -> Vec<(String, KvValue)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut out: Vec<(String, KvValue)> = map
            .iter()
            .filter(|(_, s)| s.expires.is_none_or(|t| t > now))
            .map(|(k, s)| {
                let v = match &s.entry {
                    Entry::Bytes(b) => KvValue::Bytes(b.clone()),
                    Entry::Set(set) => KvValue::Set(set.iter().cloned().collect()),
                };
                (k.clone(), v)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn set_members(&self, key: &str) -> Result<Vec<String>, CapError> {
        self.with(key, |m| match m.get(key) {
            None => Ok(Vec::new()),
            Some(Slot {
                entry: Entry::Set(s),
                ..
            }) => Ok(s.iter().cloned().collect()),
            Some(_) => Err(CapError::Invalid(WRONG_TYPE_SET.into())),
        })
    }
}

fn ttl_ms(ms: u64) -> Result<i64, CapError> {
    if ms == 0 {
        return Err(CapError::Invalid(
            "ttl-ms must be at least 1 (omit it for no expiry)".into(),
        ));
    }
    i64::try_from(ms).map_err(|_| CapError::Invalid(format!("ttl-ms {ms} is too large")))
}

impl HostState {
    /// The full key, or a denial when the handler has no kv prefix.
    fn kv_key(&self, key: &str) -> Result<String, CapError> {
        match &self.caps.kv_prefix {
            Some(prefix) => Ok(format!("{prefix}{key}")),
            None => Err(self
                .caps
                .deny(&self.event_id, "kv", "kv = \"<key prefix>\"")),
        }
    }
}

impl HostState {
    async fn kv_get(&mut self, key: String) -> Result<Option<Vec<u8>>, CapError> {
        let key = self.kv_key(&key)?;
        match &self.caps.kv {
            KvStore::Memory(m) => m.get(&key),
            KvStore::Redis(r) => r.call(|mut c| async move { c.get(&key).await }).await,
        }
    }

    async fn kv_set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl: Option<u64>,
    ) -> Result<(), CapError> {
        let key = self.kv_key(&key)?;
        let ttl = ttl.map(ttl_ms).transpose()?;
        match &self.caps.kv {
            KvStore::Memory(m) => {
                m.set(&key, value, ttl.map(|t| Duration::from_millis(t as u64)));
                Ok(())
            }
            KvStore::Redis(r) => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(&key).arg(value);
                if let Some(t) = ttl {
                    cmd.arg("PX").arg(t);
                }
                r.call(|mut c| async move { cmd.query_async::<()>(&mut c).await })
                    .await
            }
        }
    }

    async fn kv_delete(&mut self, key: String) -> Result<bool, CapError> {
        let key = self.kv_key(&key)?;
        match &self.caps.kv {
            KvStore::Memory(m) => Ok(m.delete(&key)),
            KvStore::Redis(r) => r
                .call(|mut c| async move { c.del::<_, i64>(&key).await })
                .await
                .map(|n| n > 0),
        }
    }

    async fn kv_exists(&mut self, key: String) -> Result<bool, CapError> {
        let key = self.kv_key(&key)?;
        match &self.caps.kv {
            KvStore::Memory(m) => Ok(m.exists(&key)),
            KvStore::Redis(r) => {
                r.call(|mut c| async move { c.exists::<_, bool>(&key).await })
                    .await
            }
        }
    }

    async fn kv_expire(&mut self, key: String, ttl: Option<u64>) -> Result<bool, CapError> {
        let key = self.kv_key(&key)?;
        let ttl = ttl.map(ttl_ms).transpose()?;
        match &self.caps.kv {
            KvStore::Memory(m) => Ok(m.expire(&key, ttl.map(|t| Duration::from_millis(t as u64)))),
            KvStore::Redis(r) => match ttl {
                Some(t) => {
                    r.call(|mut c| async move { c.pexpire::<_, bool>(&key, t).await })
                        .await
                }
                // PERSIST says 0 both for "no key" and "had no TTL"; the
                // contract is "false only if no such key".
                None => {
                    let (exists, _): (bool, i64) = r
                        .call(|mut c| async move {
                            redis::pipe()
                                .exists(&key)
                                .persist(&key)
                                .query_async(&mut c)
                                .await
                        })
                        .await?;
                    Ok(exists)
                }
            },
        }
    }

    async fn kv_set_add(&mut self, key: String, members: Vec<String>) -> Result<u32, CapError> {
        let key = self.kv_key(&key)?;
        if members.is_empty() {
            return Ok(0);
        }
        match &self.caps.kv {
            KvStore::Memory(m) => m.set_add(&key, members),
            KvStore::Redis(r) => {
                r.call(|mut c| async move { c.sadd::<_, _, u32>(&key, members).await })
                    .await
            }
        }
    }

    async fn kv_set_remove(&mut self, key: String, members: Vec<String>) -> Result<u32, CapError> {
        let key = self.kv_key(&key)?;
        if members.is_empty() {
            return Ok(0);
        }
        match &self.caps.kv {
            KvStore::Memory(m) => m.set_remove(&key, members),
            KvStore::Redis(r) => {
                r.call(|mut c| async move { c.srem::<_, _, u32>(&key, members).await })
                    .await
            }
        }
    }

    async fn kv_set_members(&mut self, key: String) -> Result<Vec<String>, CapError> {
        let key = self.kv_key(&key)?;
        match &self.caps.kv {
            KvStore::Memory(m) => m.set_members(&key),
            KvStore::Redis(r) => {
                r.call(|mut c| async move { c.smembers::<_, Vec<String>>(&key).await })
                    .await
            }
        }
    }
}

impl Host for HostState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, CapError> {
        let r = self.kv_get(key.clone()).await;
        self.caps.record(|| {
            let text = r
                .as_ref()
                .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
                .map_err(Clone::clone);
            kv_call("get", key, Json::Null, &text)
        });
        r
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl: Option<u64>) -> Result<(), CapError> {
        let args = self.caps.harness.is_some().then(
            || serde_json::json!({ "value": String::from_utf8_lossy(&value), "ttl_ms": ttl }),
        );
        let r = self.kv_set(key.clone(), value, ttl).await;
        self.caps
            .record(|| kv_call("set", key, args.unwrap_or_default(), &r));
        r
    }

    async fn delete(&mut self, key: String) -> Result<bool, CapError> {
        let r = self.kv_delete(key.clone()).await;
        self.caps.record(|| kv_call("delete", key, Json::Null, &r));
        r
    }

    async fn exists(&mut self, key: String) -> Result<bool, CapError> {
        let r = self.kv_exists(key.clone()).await;
        self.caps.record(|| kv_call("exists", key, Json::Null, &r));
        r
    }

    async fn expire(&mut self, key: String, ttl: Option<u64>) -> Result<bool, CapError> {
        let r = self.kv_expire(key.clone(), ttl).await;
        self.caps
            .record(|| kv_call("expire", key, serde_json::json!({ "ttl_ms": ttl }), &r));
        r
    }

    async fn set_add(&mut self, key: String, members: Vec<String>) -> Result<u32, CapError> {
        let args = self
            .caps
            .harness
            .is_some()
            .then(|| serde_json::json!(members));
        let r = self.kv_set_add(key.clone(), members).await;
        self.caps
            .record(|| kv_call("set_add", key, args.unwrap_or_default(), &r));
        r
    }

    async fn set_remove(&mut self, key: String, members: Vec<String>) -> Result<u32, CapError> {
        let args = self
            .caps
            .harness
            .is_some()
            .then(|| serde_json::json!(members));
        let r = self.kv_set_remove(key.clone(), members).await;
        self.caps
            .record(|| kv_call("set_remove", key, args.unwrap_or_default(), &r));
        r
    }

    async fn set_members(&mut self, key: String) -> Result<Vec<String>, CapError> {
        let r = self.kv_set_members(key.clone()).await;
        self.caps
            .record(|| kv_call("set_members", key, Json::Null, &r));
        r
    }
}

/// The harness's record of one kv call (see [`super::harness`]).
fn kv_call<T: serde::Serialize>(
    op: &'static str,
    key: String,
    args: Json,
    r: &Result<T, CapError>,
) -> super::harness::Call {
    let (result, error) = super::harness::outcome(r);
    super::harness::Call::Kv {
        op,
        key,
        args,
        result,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists_live_keys_sorted() {
        let kv = MemoryKv::default();
        kv.set("z", b"1".to_vec(), None);
        kv.set("gone", b"x".to_vec(), Some(Duration::from_millis(1)));
        kv.set_add("a", vec!["y".into(), "x".into()]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            kv.snapshot(),
            vec![
                (
                    "a".to_string(),
                    KvValue::Set(["x".to_string(), "y".to_string()].into())
                ),
                ("z".to_string(), KvValue::Bytes(b"1".to_vec())),
            ]
        );
    }

    #[test]
    fn memory_kv_ttl_and_sets() {
        let kv = MemoryKv::default();
        kv.set("a", b"1".to_vec(), Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(kv.get("a").unwrap(), None, "expired key must vanish");
        kv.set("b", b"2".to_vec(), None);
        assert!(kv.expire("b", Some(Duration::from_secs(60))));
        assert!(!kv.expire("nope", None));
        assert_eq!(
            kv.set_add("s", vec!["x".into(), "y".into(), "x".into()])
                .unwrap(),
            2
        );
        assert!(matches!(kv.get("s"), Err(CapError::Invalid(_))));
        assert!(matches!(
            kv.set_add("b", vec!["x".into()]),
            Err(CapError::Invalid(_))
        ));
        assert_eq!(kv.set_remove("s", vec!["x".into(), "z".into()]).unwrap(), 1);
        assert_eq!(kv.set_members("s").unwrap(), vec!["y".to_string()]);
        assert_eq!(kv.set_remove("s", vec!["y".into()]).unwrap(), 1);
        assert!(!kv.exists("s"), "an emptied set is deleted, as in Redis");

        // Expired keys that are never touched again are swept.
        for i in 0..100 {
            kv.set(&format!("tmp{i}"), vec![0], Some(Duration::from_millis(1)));
        }
        std::thread::sleep(Duration::from_millis(5));
        for _ in 0..SWEEP_EVERY {
            kv.exists("b");
        }
        assert_eq!(
            kv.map.lock().unwrap().len(),
            1,
            "only the live key `b` is left"
        );
    }
}
