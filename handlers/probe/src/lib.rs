//! `probe`: the test guest. Each `probe.*` event name triggers one capability
//! call or failure mode, with parameters in the JSON payload, so end-to-end
//! tests can drive the runtime through every path without a guest per case.
//!
//! | event | payload | does |
//! |---|---|---|
//! | `probe.echo` | anything | logs the event, `Done` |
//! | `probe.emit` | `{"name","payload","options"?,"fail_after"?}` | emits `payload` (any JSON) as `name`; then a retryable error if `fail_after` |
//! | `probe.emit-raw` | `{"name","raw"}` | emits the text `raw` unchanged (e.g. not JSON → the host's `invalid` → reject) |
//! | `probe.sql` | `{"execute":[{"sql","params"?}]?,"query"?:{"sql","params"?,"expect_rows"?},"fail_after"?}` | runs the statements, then the query, compares rows |
//! | `probe.kv` | `{"ops":[{"op","key",…,"expect"?}]}` | runs kv ops in order, rejects on the first `expect` mismatch |
//! | `probe.http` | `{"method"?,"url","headers"?,"body"?,"timeout_ms"?,"expect_status"?,"expect_body"?}` | one request |
//! | `probe.publish` | `{"messages":[{"topic","id","key"?,"headers"?,"body"}],"batch"?,"fail_until_attempt"?}` | publishes each message (`body`: JSON, sent as its text; `id`: the `message-id`), one call each or one `publish_all` with `batch`; then a retryable error while the event's attempt is below `fail_until_attempt` (a commit failing after the publish) |
//! | `probe.config` | `{"key","expect"}` | compares `config::get(key)` with `expect` (string or null) |
//! | `probe.fail` | `{"message","retryable"}` | returns that error |
//! | `probe.retry-after` | `{"ms"}` | `RetryAfter(ms)` |
//! | `probe.flaky` | `{"succeed_on_attempt"}` | retryable error until the event's attempt reaches the number |
//! | `probe.sleep` | `{"ms"}` | busy-waits, then `Done` |
//! | `probe.version` | `{"sleep_ms"?}` | busy-waits, then `INSERT INTO probe_seen (event_id, version) VALUES ($1, $2)` with [`VERSION`] |
//! | `probe.print` | `{"stdout"?,"stderr"?,"repeat"?}` | writes the texts (`repeat` times, default 1) to stdout/stderr, `Done` |
//! | `probe.counter` | — | adds 1 to a static counter and returns `RetryAfter(counter ms)`: a reused instance counts up, a fresh one answers 1 |
//! | `probe.loop` | — | never returns (epoch deadline test) |
//! | `probe.oom` | — | allocates until the memory cap traps it |
//! | `probe.stack` | — | unbounded recursion until the stack overflows |
//! | `probe.trap` | — | executes `unreachable` |
//! | `probe.panic` | — | `panic!("probe panic")` (a trap on wasm32) |
//!
//! A name may carry a prefix ending in `/` (`denied/probe.sql` runs
//! `probe.sql`), so one config can bind the same operation to handlers with
//! different grants. Any other name is rejected; so is a payload with unknown fields, so a typo
//! in a test shows up as a dead event naming the field, not as a silent pass.
//! Kv `op`s: `set` (`value`, `ttl_ms`?), `get` (`expect`: string|null),
//! `delete`/`exists` (`expect`: bool), `expire` (`ttl_ms`?, `expect`: bool),
//! `sadd`/`srem` (`members`, `expect`: count), `smembers` (`expect`: list, any order).

use std::hint::black_box;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outrun_sdk::emit::{self, EmitOptions};
use outrun_sdk::http::{Method, Request};
use outrun_sdk::publish::{self, Message};
use outrun_sdk::sql::{self, Value};
use outrun_sdk::{Event, HandlerError, Outcome, config, kv, log};
use serde::Deserialize;
use serde_json::Value as Json;

/// The version this build reports through `probe.version`.
#[cfg(not(feature = "v2"))]
pub const VERSION: &str = "1";
/// The version this build reports through `probe.version`.
#[cfg(feature = "v2")]
pub const VERSION: &str = "2";

fn handle(ev: Event) -> Result<Outcome, HandlerError> {
    // Dispatch on the part after the last '/', so a test can bind
    // `denied/probe.sql` to a second handler of the same module with other
    // grants (one event name goes to one handler only).
    match ev.name.rsplit('/').next().unwrap_or_default() {
        "probe.echo" => echo(&ev),
        "probe.emit" => emit_event(ev.json()?),
        "probe.emit-raw" => emit_raw(ev.json()?),
        "probe.sql" => run_sql(ev.json()?),
        "probe.kv" => run_kv(ev.json()?),
        "probe.http" => run_http(ev.json()?),
        "probe.config" => check_config(ev.json()?),
        "probe.publish" => publish_messages(&ev, ev.json()?),
        "probe.fail" => fail(ev.json()?),
        "probe.retry-after" => {
            let p: Millis = ev.json()?;
            Ok(Outcome::RetryAfter(Duration::from_millis(p.ms)))
        }
        "probe.flaky" => flaky(&ev, ev.json()?),
        "probe.sleep" => {
            let p: Millis = ev.json()?;
            busy_wait(Duration::from_millis(p.ms));
            Ok(Outcome::Done)
        }
        "probe.version" => version(&ev, ev.json()?),
        "probe.print" => print(ev.json()?),
        "probe.counter" => {
            // The outcome carries the count so a test reads it without a
            // capability: instance state is what `instances = "reuse"` keeps.
            let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
            Ok(Outcome::RetryAfter(Duration::from_millis(n)))
        }
        "probe.loop" => spin_forever(),
        "probe.oom" => exhaust_memory(),
        "probe.stack" => {
            let depth = recurse(black_box(0));
            Err(HandlerError::retry(format!(
                "stack did not overflow at depth {depth}"
            )))
        }
        "probe.trap" => trap(),
        "probe.panic" => panic!("probe panic"),
        other => Err(HandlerError::reject(format!(
            "probe does not know event `{other}`; see handlers/probe/src/lib.rs for the names"
        ))),
    }
}

outrun_sdk::export_handler!(handle);

/// Events this instance has counted (`probe.counter`).
static COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrintParams {
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
    #[serde(default)]
    repeat: Option<usize>,
}

fn print(p: PrintParams) -> Result<Outcome, HandlerError> {
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    for _ in 0..p.repeat.unwrap_or(1) {
        out.write_all(p.stdout.as_bytes())
            .and_then(|()| err.write_all(p.stderr.as_bytes()))
            .map_err(|e| HandlerError::retry(format!("write: {e}")))?;
    }
    let _ = out.flush();
    Ok(Outcome::Done)
}

fn echo(ev: &Event) -> Result<Outcome, HandlerError> {
    log::info(format!(
        "probe.echo id={} attempt={}/{} group={:?} payload={}",
        ev.id, ev.attempt, ev.max_attempts, ev.group_id, ev.payload
    ));
    Ok(Outcome::Done)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmitParams {
    name: String,
    payload: Json,
    #[serde(default)]
    options: Option<OptionsParams>,
    #[serde(default)]
    fail_after: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OptionsParams {
    group_id: Option<String>,
    delay_ms: Option<u64>,
    expires_in_ms: Option<u64>,
    max_retry: Option<u32>,
    idempotency_key: Option<String>,
}

impl OptionsParams {
    fn build(self) -> EmitOptions {
        let mut o = EmitOptions::new();
        if let Some(g) = self.group_id {
            o = o.group_id(g);
        }
        if let Some(ms) = self.delay_ms {
            o = o.delay(Duration::from_millis(ms));
        }
        if let Some(ms) = self.expires_in_ms {
            o = o.expires_in(Duration::from_millis(ms));
        }
        if let Some(n) = self.max_retry {
            o = o.max_retry(n);
        }
        if let Some(k) = self.idempotency_key {
            o = o.idempotency_key(k);
        }
        o
    }
}

fn emit_event(p: EmitParams) -> Result<Outcome, HandlerError> {
    let options = p.options.unwrap_or_default().build();
    emit::emit(&p.name, &p.payload, &options)?;
    if p.fail_after {
        return Err(HandlerError::retry(format!(
            "probe.emit: failing after emitting `{}`, as asked",
            p.name
        )));
    }
    Ok(Outcome::Done)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishParams {
    messages: Vec<PublishMessage>,
    #[serde(default)]
    batch: bool,
    #[serde(default)]
    fail_until_attempt: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishMessage {
    topic: String,
    id: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    body: Json,
}

fn publish_messages(ev: &Event, p: PublishParams) -> Result<Outcome, HandlerError> {
    let messages: Vec<Message> = p
        .messages
        .into_iter()
        .map(|m| {
            let mut msg = Message::new(m.topic, m.id, m.body.to_string());
            if let Some(k) = m.key {
                msg = msg.key(k);
            }
            for (k, v) in m.headers {
                msg = msg.header(k, v);
            }
            msg
        })
        .collect();
    if p.batch {
        publish::publish_all(&messages)?;
    } else {
        for m in &messages {
            publish::publish(m)?;
        }
    }
    if ev.attempt < p.fail_until_attempt {
        return Err(HandlerError::retry(format!(
            "probe.publish: failing after publishing {} message(s) on attempt {}, as asked",
            messages.len(),
            ev.attempt
        )));
    }
    Ok(Outcome::Done)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmitRawParams {
    name: String,
    raw: String,
    #[serde(default)]
    options: Option<OptionsParams>,
}

fn emit_raw(p: EmitRawParams) -> Result<Outcome, HandlerError> {
    let options = p.options.unwrap_or_default().build();
    emit::emit_raw(&p.name, &p.raw, &options)?;
    Ok(Outcome::Done)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlParams {
    #[serde(default)]
    execute: Vec<Statement>,
    #[serde(default)]
    query: Option<QueryParams>,
    #[serde(default)]
    fail_after: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    sql: String,
    #[serde(default)]
    params: Vec<Json>,
    /// Rows the statement must report as affected.
    #[serde(default)]
    expect_affected: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryParams {
    sql: String,
    #[serde(default)]
    params: Vec<Json>,
    #[serde(default)]
    expect_rows: Option<Vec<Vec<Json>>>,
}

fn to_params(params: Vec<Json>) -> Vec<Value> {
    params.into_iter().map(Value::from).collect()
}

fn run_sql(p: SqlParams) -> Result<Outcome, HandlerError> {
    for (i, st) in p.execute.into_iter().enumerate() {
        let affected = sql::execute(&st.sql, &to_params(st.params))
            .map_err(|e| HandlerError::from(e).context(format!("execute #{i}")))?;
        if let Some(want) = st.expect_affected
            && want != affected
        {
            return Err(HandlerError::reject(format!(
                "execute #{i} ({}) affected {affected} rows, expected {want}",
                st.sql
            )));
        }
    }
    if let Some(q) = p.query {
        let rows = sql::query(&q.sql, &to_params(q.params))
            .map_err(|e| HandlerError::from(e).context("query"))?;
        let got: Vec<Vec<Json>> = rows
            .values()
            .iter()
            .map(|r| r.iter().map(to_json).collect())
            .collect();
        log::info(format!(
            "probe.sql: {} returned {}",
            q.sql,
            Json::from(got.clone())
        ));
        if let Some(want) = q.expect_rows
            && !rows_match(&want, &got)
        {
            return Err(HandlerError::reject(format!(
                "query ({}) returned rows {}, expected {}",
                q.sql,
                Json::from(got),
                Json::from(want)
            )));
        }
    }
    if p.fail_after {
        return Err(HandlerError::retry(
            "probe.sql: failing after the writes, as asked",
        ));
    }
    Ok(Outcome::Done)
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => Json::from(*f),
        Value::Text(s) => Json::String(s.clone()),
        Value::Blob(b) => Json::from(b.clone()),
    }
}

/// Equal, except that an expected `true`/`false` also matches 1/0: SQLite
/// has no boolean type, and tests run one expectation against both backends.
/// Numbers compare by value, so an expected `2` matches a `2.0` float.
fn rows_match(want: &[Vec<Json>], got: &[Vec<Json>]) -> bool {
    want.len() == got.len()
        && want
            .iter()
            .zip(got)
            .all(|(w, g)| w.len() == g.len() && w.iter().zip(g).all(|(w, g)| cell_matches(w, g)))
}

fn cell_matches(want: &Json, got: &Json) -> bool {
    match (want, got) {
        (Json::Bool(b), Json::Number(n)) => n.as_i64() == Some(i64::from(*b)),
        (Json::Number(a), Json::Number(b)) => a.as_f64() == b.as_f64(),
        _ => want == got,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KvParams {
    ops: Vec<KvOp>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum KvOp {
    Set {
        key: String,
        value: String,
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    Get {
        key: String,
        #[serde(default, deserialize_with = "present")]
        expect: Option<Option<String>>,
    },
    Delete {
        key: String,
        #[serde(default)]
        expect: Option<bool>,
    },
    Exists {
        key: String,
        #[serde(default)]
        expect: Option<bool>,
    },
    Expire {
        key: String,
        #[serde(default)]
        ttl_ms: Option<u64>,
        #[serde(default)]
        expect: Option<bool>,
    },
    Sadd {
        key: String,
        members: Vec<String>,
        #[serde(default)]
        expect: Option<u32>,
    },
    Srem {
        key: String,
        members: Vec<String>,
        #[serde(default)]
        expect: Option<u32>,
    },
    Smembers {
        key: String,
        #[serde(default)]
        expect: Option<Vec<String>>,
    },
}

/// `"expect": null` means "expect absent", which plain `Option<Option<_>>`
/// cannot tell from a missing `expect`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn run_kv(p: KvParams) -> Result<Outcome, HandlerError> {
    for (i, op) in p.ops.into_iter().enumerate() {
        run_kv_op(op).map_err(|e| e.context(format!("kv op #{i}")))?;
    }
    Ok(Outcome::Done)
}

fn expect<T: PartialEq + std::fmt::Debug>(
    what: &str,
    key: &str,
    want: Option<T>,
    got: T,
) -> Result<(), HandlerError> {
    match want {
        Some(w) if w != got => Err(HandlerError::reject(format!(
            "{what} `{key}` returned {got:?}, expected {w:?}"
        ))),
        _ => Ok(()),
    }
}

fn ttl(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

fn run_kv_op(op: KvOp) -> Result<(), HandlerError> {
    match op {
        KvOp::Set { key, value, ttl_ms } => kv::set(&key, value, ttl(ttl_ms))?,
        KvOp::Get { key, expect: want } => {
            let got = kv::get_string(&key)?;
            expect("get", &key, want, got)?;
        }
        KvOp::Delete { key, expect: want } => expect("delete", &key, want, kv::delete(&key)?)?,
        KvOp::Exists { key, expect: want } => expect("exists", &key, want, kv::exists(&key)?)?,
        KvOp::Expire {
            key,
            ttl_ms,
            expect: want,
        } => expect("expire", &key, want, kv::expire(&key, ttl(ttl_ms))?)?,
        KvOp::Sadd {
            key,
            members,
            expect: want,
        } => expect("sadd", &key, want, kv::set_add(&key, &members)?)?,
        KvOp::Srem {
            key,
            members,
            expect: want,
        } => expect("srem", &key, want, kv::set_remove(&key, &members)?)?,
        KvOp::Smembers { key, expect: want } => {
            let mut got = kv::set_members(&key)?;
            got.sort();
            let want = want.map(|mut w| {
                w.sort();
                w
            });
            expect("smembers", &key, want, got)?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpParams {
    #[serde(default)]
    method: Option<String>,
    url: String,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    expect_status: Option<u16>,
    #[serde(default)]
    expect_body: Option<String>,
}

fn run_http(p: HttpParams) -> Result<Outcome, HandlerError> {
    let method = Method::parse(p.method.as_deref().unwrap_or("GET"));
    let mut req = Request::new(method, &p.url);
    for (n, v) in p.headers {
        req = req.header(n, v);
    }
    if let Some(b) = p.body {
        req = req.body(b);
    }
    if let Some(ms) = p.timeout_ms {
        req = req.timeout(Duration::from_millis(ms));
    }
    let resp = req.send()?;
    log::info(format!("probe.http: {} answered {}", p.url, resp.status));
    expect("status of", &p.url, p.expect_status, resp.status)?;
    expect("body of", &p.url, p.expect_body, resp.text())?;
    Ok(Outcome::Done)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigParams {
    key: String,
    expect: Option<String>,
}

fn check_config(p: ConfigParams) -> Result<Outcome, HandlerError> {
    let got = config::try_get(&p.key)?;
    expect("config", &p.key, Some(p.expect), got)?;
    Ok(Outcome::Done)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailParams {
    message: String,
    retryable: bool,
}

fn fail(p: FailParams) -> Result<Outcome, HandlerError> {
    Err(if p.retryable {
        HandlerError::retry(p.message)
    } else {
        HandlerError::reject(p.message)
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Millis {
    ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlakyParams {
    succeed_on_attempt: u32,
}

fn flaky(ev: &Event, p: FlakyParams) -> Result<Outcome, HandlerError> {
    if ev.attempt < p.succeed_on_attempt {
        return Err(HandlerError::retry(format!(
            "probe.flaky: attempt {} fails, {} will succeed",
            ev.attempt, p.succeed_on_attempt
        )));
    }
    Ok(Outcome::Done)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VersionParams {
    #[serde(default)]
    sleep_ms: Option<u64>,
}

fn version(ev: &Event, p: VersionParams) -> Result<Outcome, HandlerError> {
    if let Some(ms) = p.sleep_ms {
        busy_wait(Duration::from_millis(ms));
    }
    sql::execute(
        "INSERT INTO probe_seen (event_id, version) VALUES ($1, $2)",
        &sql::params![&ev.id, VERSION],
    )?;
    Ok(Outcome::Done)
}

/// Spin on the clock rather than sleep: the guest has no sleep that yields,
/// and a busy guest is what epoch deadlines and overlapping reloads must cope with.
fn busy_wait(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        black_box(());
    }
}

fn spin_forever() -> ! {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn exhaust_memory() -> Result<Outcome, HandlerError> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // Non-zero fill so the pages are really written, not lazily zeroed.
        hoard.push(vec![0xA5; 1 << 20]);
        black_box(&hoard);
    }
}

/// Recurse with a live stack array and work after the call, so the compiler
/// can neither drop the frame nor turn the recursion into a loop.
fn recurse(depth: u64) -> u64 {
    // Unreachable in practice; it keeps the recursion formally conditional so
    // neither rustc nor LLVM may treat it as an infinite loop without effects.
    if depth == u64::MAX {
        return 0;
    }
    let frame = black_box([depth; 32]);
    let below = recurse(black_box(depth + 1));
    below.wrapping_add(frame[(depth % 32) as usize])
}

fn trap() -> Result<Outcome, HandlerError> {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_match_bool_as_int_and_numbers_by_value() {
        let want = vec![vec![json!(true), json!(2), json!("a"), json!(null)]];
        let got = vec![vec![json!(1), json!(2.0), json!("a"), json!(null)]];
        assert!(rows_match(&want, &got));
        assert!(!rows_match(
            &want,
            &[vec![json!(0), json!(2), json!("a"), json!(null)]]
        ));
        assert!(!rows_match(&want, &[]));
    }

    #[test]
    fn kv_ops_parse_and_reject_typos() {
        let p: KvParams = serde_json::from_value(json!({"ops": [
            {"op": "set", "key": "k", "value": "v", "ttl_ms": 10},
            {"op": "get", "key": "k", "expect": null},
            {"op": "smembers", "key": "s", "expect": ["a"]},
        ]}))
        .unwrap();
        assert!(matches!(
            p.ops[1],
            KvOp::Get {
                expect: Some(None),
                ..
            }
        ));
        let typo = serde_json::from_value::<KvParams>(json!({"ops": [{"op": "get", "kye": "k"}]}));
        assert!(typo.is_err());
    }

    #[test]
    fn expect_mismatch_says_what_differed() {
        let e = expect("get", "k", Some(Some("a".to_owned())), None).unwrap_err();
        assert!(!e.is_retryable());
        assert!(
            e.message().contains("`k`")
                && e.message().contains("None")
                && e.message().contains("\"a\"")
        );
        assert!(expect::<u32>("sadd", "k", None, 3).is_ok());
    }
}
