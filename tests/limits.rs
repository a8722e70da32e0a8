//! `[[limit]]` end to end: real `outrun serve` processes sharing one
//! database, the probe component, and a real HTTP server standing in for
//! the fragile downstream service that counts the requests it is serving
//! at once, per key. A rate limit holds across instances; per-key
//! concurrency never exceeds its N for a key while other keys keep
//! flowing; a payload without the key runs under the fallback key, logged
//! once; bad limits are refused naming the limit and the field.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Serve, TestDb, fails, guest, outrun_command};
use outrun::NewEvent;
use serde_json::json;

fn write_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let config = dir.join(name);
    std::fs::write(
        &config,
        format!(
            "[runtime]\nshutdown_grace = \"5s\"\n\n[[handler]]\nname = \"probe\"\nmodule = {:?}\n{body}",
            guest("probe").display().to_string()
        ),
    )
    .unwrap();
    config
}

async fn drained(db: &TestDb) {
    common::eventually("the outbox to drain", Duration::from_secs(120), || async {
        (db.scalar("SELECT count(*) FROM outbox_events").await == 0).then_some(())
    })
    .await;
}

/// 1,000 events at 50/s (burst 50) through two instances: one bucket for
/// both, so at least 19 s however many instances claim.
async fn rate_limit_holds_across_instances(db: TestDb) {
    let store = db.store().await;
    let (events, rate, floor) = if db.is_postgres() {
        (1000, 50, 19.0)
    } else {
        // One SQLite file: the same bucket, a shorter run.
        (100, 25, 3.0)
    };
    let batch: Vec<NewEvent> = (0..events)
        .map(|i| NewEvent::new("r/probe.echo", json!({"i": i}).to_string()))
        .collect();
    store.enqueue_batch(&batch, 5).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "events = [\"r/probe.echo\"]\n\n[[limit]]\nhandler = \"probe\"\nrate = \"{rate}/s\"\n"
    );
    let a_config = write_config(dir.path(), "a.toml", &body);
    let b_config = write_config(dir.path(), "b.toml", &body);
    let started = Instant::now();
    let a = Serve::ready(&db, &a_config).await;
    let b = Serve::ready(&db, &b_config).await;
    drained(&db).await;
    let took = started.elapsed().as_secs_f64();
    let (log_a, log_b) = (a.stop(), b.stop());
    assert!(
        took >= floor,
        "{events} events at {rate}/s took {took:.1} s (< {floor} s)"
    );
    // Both instances claimed under the limit (the limit is announced).
    assert!(log_a.contains("limit loaded") && log_b.contains("limit loaded"));

    // The limit in `events stats` (its bucket) and `handlers list`.
    let stats = common::ok(
        &outrun_command(&db)
            .args(["events", "stats", "--json", "--config"])
            .arg(&a_config)
            .output()
            .unwrap(),
    );
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["limits"][0]["limit"], "handler:probe", "{stats}");
    let tokens = stats["limits"][0]["tokens"].as_f64().unwrap();
    assert!((0.0..=f64::from(rate)).contains(&tokens), "{stats}");
    assert_eq!(stats["limits"][0]["running"], 0, "{stats}");
    let listed = common::ok(
        &outrun_command(&db)
            .args(["handlers", "list", "--json", "--config"])
            .arg(&a_config)
            .envs(common::FAST_ENV)
            .output()
            .unwrap(),
    );
    assert!(
        listed.contains(&format!("handler:probe: {rate}/s burst {rate}")),
        "{listed}"
    );
}

/// The downstream service: answers after `hold`, recording per key how
/// many requests it was serving at once, and the order requests began.
#[derive(Default)]
struct Downstream {
    now: HashMap<String, usize>,
    max: HashMap<String, usize>,
    order: Vec<String>,
}

async fn downstream(hold: Duration) -> (u16, Arc<Mutex<Downstream>>) {
    let state = Arc::new(Mutex::new(Downstream::default()));
    let s = state.clone();
    let app = axum::Router::new().route(
        "/k/{key}",
        axum::routing::get(
            move |axum::extract::Path(key): axum::extract::Path<String>| {
                let s = s.clone();
                async move {
                    {
                        let mut d = s.lock().unwrap();
                        let n = {
                            let n = d.now.entry(key.clone()).or_default();
                            *n += 1;
                            *n
                        };
                        let m = d.max.entry(key.clone()).or_default();
                        *m = (*m).max(n);
                        d.order.push(key.clone());
                    }
                    tokio::time::sleep(hold).await;
                    *s.lock().unwrap().now.get_mut(&key).unwrap() -= 1;
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, state)
}

/// per_key = 2 over a hot key, a warm key, ten one-off keys and events
/// without a key, through two instances: never 3 of a key at the service,
/// and the one-off keys all start while the hot key's backlog waits.
async fn per_key_concurrency_without_head_of_line_blocking(db: TestDb) {
    let store = db.store().await;
    let (port, state) = downstream(Duration::from_millis(300)).await;
    let request = |key: Option<&str>| {
        let url = format!("http://127.0.0.1:{port}/k/{}", key.unwrap_or("nokey"));
        let payload = match key {
            Some(k) => json!({"url": url, "headers": [["x-key", k]], "expect_status": 200}),
            None => json!({"url": url, "expect_status": 200}),
        };
        NewEvent::new("k/probe.http", payload.to_string())
    };
    // The hot key first: its backlog is at the head of the queue.
    let mut batch: Vec<NewEvent> = (0..12).map(|_| request(Some("hot"))).collect();
    batch.extend((0..6).map(|_| request(Some("warm"))));
    batch.extend((0..10).map(|i| request(Some(&format!("one{i}")))));
    batch.extend((0..3).map(|_| request(None)));
    store.enqueue_batch(&batch, 5).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "events = [\"k/probe.http\"]\n[handler.allow]\nhttp = [\"127.0.0.1:{port}\"]\n\n\
         [[limit]]\nevent = \"k/probe.http\"\nconcurrency_key = \"/headers/0/1\"\nper_key = 2\n"
    );
    let a_config = write_config(dir.path(), "a.toml", &body);
    let b_config = write_config(dir.path(), "b.toml", &body);
    let a = Serve::ready(&db, &a_config).await;
    let b = Serve::ready(&db, &b_config).await;
    drained(&db).await;
    let (log_a, log_b) = (a.stop(), b.stop());
    let d = state.lock().unwrap();
    assert_eq!(d.order.len(), batch.len(), "every request made once");
    for (key, max) in &d.max {
        assert!(
            *max <= 2,
            "{max} requests of key {key} at once: {:?}",
            d.max
        );
    }
    // The limit is 2, not 1: the hot key did run two at a time.
    assert_eq!(d.max["hot"], 2, "{:?}", d.max);
    // No head-of-line blocking: every one-off key began before the hot
    // key's last request did.
    let last_hot = d.order.iter().rposition(|k| k == "hot").unwrap();
    let last_one = d.order.iter().rposition(|k| k.starts_with("one")).unwrap();
    assert!(last_one < last_hot, "order: {:?}", d.order);
    // Events without the key: the fallback key, logged once per instance
    // that met one.
    let warned = |log: &str| log.matches("has no key").count();
    assert!(
        warned(&log_a) <= 1 && warned(&log_b) <= 1,
        "{log_a}\n{log_b}"
    );
    assert!(warned(&log_a) + warned(&log_b) >= 1, "{log_a}\n{log_b}");
    assert!(
        log_a.contains("/headers/0/1") || log_b.contains("/headers/0/1"),
        "the warning names the pointer"
    );
}

fn refused(dir: &Path, limit: &str) -> String {
    let config = write_config(dir, "bad.toml", &format!("events = [\"a\"]\n\n{limit}"));
    let db = TestDb::sqlite();
    fails(
        &outrun_command(&db)
            .args(["events", "stats", "--config"])
            .arg(&config)
            .output()
            .unwrap(),
    )
}

#[test]
fn bad_limits_name_the_limit_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(
        dir.path(),
        "[[limit]]\nhandler = \"probe\"\nrate = \"0/s\"\n",
    );
    assert!(
        err.contains("handler \"probe\"") && err.contains("`rate`") && err.contains("0/s"),
        "{err}"
    );
    let err = refused(dir.path(), "[[limit]]\nevent = \"a\"\nrate = \"lots\"\n");
    assert!(err.contains("`rate`") && err.contains("lots"), "{err}");
    let err = refused(
        dir.path(),
        "[[limit]]\nevent = \"a\"\nrate = \"5/fortnight\"\n",
    );
    assert!(err.contains("fortnight"), "{err}");
    let err = refused(
        dir.path(),
        "[[limit]]\nevent = \"a\"\nconcurrency_key = \"customer\"\nper_key = 2\n",
    );
    assert!(
        err.contains("`concurrency_key`") && err.contains("JSON pointer"),
        "{err}"
    );
    let err = refused(
        dir.path(),
        "[[limit]]\nhandler = \"nope\"\nrate = \"1/s\"\n",
    );
    assert!(err.contains("nope"), "{err}");
}

/// The claim itself, as two instances would run it: with room for the
/// whole budget whatever the keys (no key computed), with keys that bind
/// (never more than `per_key` of a key leased, counted across claims), and
/// many claims racing on one limit from two stores (each sees the leases
/// of the claim before it).
async fn per_key_claims_count_the_leases_of_every_claim(db: TestDb) {
    use outrun::limits::{KeySource, Limit, PerKey};
    let a = db.store().await;
    let b = db.connect().await;
    let lease = Duration::from_secs(60);
    let limit = |n: u32| Limit {
        id: format!("event:k{n}"),
        names: vec![format!("k{n}")],
        rate: None,
        per_key: Some(PerKey {
            key: KeySource::parse("/c").unwrap(),
            n,
        }),
    };
    let enqueue = |name: String, keys: Vec<&'static str>| {
        let a = a.clone();
        async move {
            let events: Vec<NewEvent> = keys
                .iter()
                .map(|k| NewEvent::new(name.clone(), json!({ "c": k }).to_string()))
                .collect();
            a.enqueue_batch(&events, 5).await.unwrap();
        }
    };
    let key_counts = |claimed: &[outrun::event::Claimed]| {
        let mut m: HashMap<String, usize> = HashMap::new();
        for c in claimed {
            let v: serde_json::Value = serde_json::from_str(&c.event.payload).unwrap();
            *m.entry(v["c"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        m
    };

    // Room for all: 5 of one key under per_key 10.
    enqueue("k10".into(), vec!["a"; 5]).await;
    let got = a
        .claim_limited("w1", &limit(10), 5, lease)
        .await
        .unwrap()
        .events;
    assert_eq!(got.len(), 5, "{got:?}");

    // Keys bind: 5 of a, 3 of b, per_key 2 → 2 + 2, then nothing more.
    enqueue("k2".into(), vec!["a", "a", "a", "a", "a", "b", "b", "b"]).await;
    let got = a
        .claim_limited("w1", &limit(2), 10, lease)
        .await
        .unwrap()
        .events;
    assert_eq!(
        key_counts(&got),
        HashMap::from([("a".to_owned(), 2), ("b".to_owned(), 2)]),
        "{got:?}"
    );
    let more = b
        .claim_limited("w2", &limit(2), 10, lease)
        .await
        .unwrap()
        .events;
    assert!(
        more.is_empty(),
        "the other instance sees the leases: {more:?}"
    );

    // Racing claims from two stores, one key, per_key 3, budget 2 each:
    // never more than 3 leased, whatever the interleaving.
    for round in 0..10 {
        let name = format!("k3r{round}");
        enqueue(name.clone(), vec!["x"; 12]).await;
        let lim = Limit {
            names: vec![name.clone()],
            id: format!("event:{name}"),
            ..limit(3)
        };
        let (x, y, z) = tokio::join!(
            a.claim_limited("w1", &lim, 2, lease),
            b.claim_limited("w2", &lim, 2, lease),
            a.claim_limited("w3", &lim, 2, lease),
        );
        let total = x.unwrap().events.len() + y.unwrap().events.len() + z.unwrap().events.len();
        assert_eq!(
            total, 3,
            "round {round}: per_key 3 of one key, claimed {total}"
        );
    }

    // The lost-update case, made certain on PostgreSQL: another instance's
    // claim holds the limit's lock and has leased 3 events of key y when
    // ours starts; ours must wait for it and count those 3 (a count from
    // the statement's own snapshot would see none and take 2 more).
    if db.is_postgres() {
        use sqlx::Connection;
        enqueue("k3y".into(), vec!["y"; 6]).await;
        let lim = Limit {
            names: vec!["k3y".into()],
            id: "event:k3y".into(),
            ..limit(3)
        };
        // The limit's row exists once any claim of it ran.
        assert!(
            b.claim_limited("w2", &lim, 1, lease)
                .await
                .unwrap()
                .events
                .len()
                == 1
        );
        let mut other = sqlx::PgConnection::connect(db.url()).await.unwrap();
        sqlx::query("BEGIN").execute(&mut other).await.unwrap();
        sqlx::query("SELECT outrun_limit_lock('event:k3y')")
            .execute(&mut other)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE outbox_events SET locked_by = 'other', lock_token = gen_random_uuid(),
                 locked_until = now() + interval '1 minute', available_at = now() + interval '1 minute'
             WHERE id IN (SELECT id FROM outbox_events WHERE name = 'k3y' AND lock_token IS NULL
                          ORDER BY seq LIMIT 2)",
        )
        .execute(&mut other)
        .await
        .unwrap();
        let ours = {
            let a = a.clone();
            let lim = lim.clone();
            tokio::spawn(async move { a.claim_limited("w1", &lim, 2, lease).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!ours.is_finished(), "our claim waits for the other's lock");
        sqlx::query("COMMIT").execute(&mut other).await.unwrap();
        let got = ours.await.unwrap().unwrap().events;
        assert!(
            got.is_empty(),
            "3 of y leased already (1 + the other's 2): {got:?}"
        );

        // Claims far from per_key share: one that holds a slot does not
        // make another wait, and neither computes keys.
        let far = Limit {
            names: vec!["k3y".into()],
            id: "event:k3y".into(),
            ..limit(100_000)
        };
        sqlx::query("BEGIN").execute(&mut other).await.unwrap();
        sqlx::query(
            "SELECT 1 FROM outrun_limit_slots WHERE name = 'event:k3y' AND slot = 0 FOR UPDATE",
        )
        .execute(&mut other)
        .await
        .unwrap();
        let shared = tokio::time::timeout(
            Duration::from_secs(10),
            a.claim_limited("w1", &far, 2, lease),
        )
        .await
        .expect("a claim far from per_key takes a free slot, it does not wait for slot 0")
        .unwrap();
        assert_eq!(
            (shared.events.len(), shared.keyed),
            (2, false),
            "{shared:?}"
        );
        // One that could bind needs every slot: it waits.
        let near = {
            let a = a.clone();
            let lim = lim.clone();
            tokio::spawn(async move { a.claim_limited("w1", &lim, 1, lease).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !near.is_finished(),
            "a claim that can bind waits for every slot"
        );
        sqlx::query("COMMIT").execute(&mut other).await.unwrap();
        let got = near.await.unwrap().unwrap();
        assert!(got.events.is_empty(), "5 of y leased: {got:?}");

        // With every slot held elsewhere, a far claim waits too: sharing is
        // bounded (that bound is what keeps it from overshooting per_key).
        sqlx::query("BEGIN").execute(&mut other).await.unwrap();
        sqlx::query("SELECT outrun_limit_lock('event:k3y')")
            .execute(&mut other)
            .await
            .unwrap();
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move { a.claim_limited("w1", &far, 1, lease).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "no free slot: the claim waits for all"
        );
        sqlx::query("COMMIT").execute(&mut other).await.unwrap();
        let got = waiting.await.unwrap().unwrap();
        assert_eq!((got.events.len(), got.keyed), (1, false), "{got:?}");

        // Shared claims judge by an upper bound of the leased events that
        // the claims keep in the slots: each adds its budget, and a claim
        // that would bring it within 4 x 1024 of per_key counts instead,
        // which resets the bound to what is leased (acks lower it).
        enqueue("kb".into(), vec!["z"; 20]).await;
        let bounded = Limit {
            names: vec!["kb".into()],
            id: "event:kb".into(),
            ..limit(4096 + 6)
        };
        let bound = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT sum(bound)::int8 FROM outrun_limit_slots WHERE name = 'event:kb'",
            )
            .fetch_one(&mut sqlx::PgConnection::connect(db.url()).await.unwrap())
            .await
            .unwrap()
        };
        let mut bounds = Vec::new();
        for _ in 0..4 {
            let got = a.claim_limited("w1", &bounded, 2, lease).await.unwrap();
            assert_eq!((got.events.len(), got.keyed), (2, false), "{got:?}");
            bounds.push(bound().await);
        }
        // The first claim counted (no bound yet): 0 leased + its 2; then
        // +2 each while 4096 + the bound fit 4102.
        assert_eq!(bounds, vec![2, 4, 6, 8]);
        // Six of the eight leased events are acked.
        sqlx::query(
            "DELETE FROM outbox_events WHERE id IN (
                 SELECT id FROM outbox_events WHERE name = 'kb' AND lock_token IS NOT NULL
                 ORDER BY seq LIMIT 6)",
        )
        .execute(&mut other)
        .await
        .unwrap();
        let got = b.claim_limited("w2", &bounded, 2, lease).await.unwrap();
        assert_eq!(got.events.len(), 2, "{got:?}");
        assert_eq!(bound().await, 2 + 2, "8 + 4096 > 4102: counted 2 leased");

        // A claim that locks every slot without a budget (a binary of the
        // previous version) leaves the bound unknown: the next claim counts.
        sqlx::query("SELECT outrun_limit_lock('event:kb')")
            .execute(&mut other)
            .await
            .unwrap();
        assert!(bound().await > 1 << 59, "poisoned");
        a.claim_limited("w1", &bounded, 2, lease).await.unwrap();
        assert_eq!(bound().await, 4 + 2, "counted 4 leased, plus its 2");
    }
}

on_both_backends!(
    rate_limit_holds_across_instances,
    per_key_concurrency_without_head_of_line_blocking,
    per_key_claims_count_the_leases_of_every_claim,
);
