//! The dispatch loop's behaviour, on SQLite and on the local PostgreSQL, with
//! native handlers (the WASM host has its own suite): delivery, retries and
//! dead letters, group FIFO under concurrency, expiry, retry-after, timeouts,
//! panics, per-handler caps, effects committed with the ack, lease rescue,
//! graceful shutdown, and two runtimes draining one PostgreSQL database.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, wait_for};
use outrun::config::{RuntimeConfig, SavepointMode};
use outrun::dispatch::Dispatcher;
use outrun::store::{SqlValue, Store};
use outrun::{
    Effects, Event, Handler, HandlerError, NewEvent, Outcome, Route, Router, StaticRouter,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Fast knobs so retries and polls happen within a test's patience.
fn fast() -> RuntimeConfig {
    RuntimeConfig {
        concurrency: 8,
        batch_size: 16,
        poll_interval: Duration::from_millis(50),
        lease_duration: Duration::from_secs(5),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        backoff_jitter: 0.0,
        shutdown_grace: Duration::from_secs(5),
        ..RuntimeConfig::default()
    }
}

/// A running dispatcher; stopped (gracefully) by `stop()`.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<outrun::dispatch::RunSummary>,
}

impl Running {
    fn start(store: &Store, router: impl Router, config: RuntimeConfig) -> Running {
        let stop = CancellationToken::new();
        let d = Dispatcher::new(store.clone(), Arc::new(router), config);
        let s = stop.clone();
        let task = tokio::spawn(async move { d.run_until(s).await.expect("dispatcher failed") });
        Running { stop, task }
    }
    async fn stop(self) -> outrun::dispatch::RunSummary {
        self.stop.cancel();
        self.task.await.expect("dispatcher panicked")
    }
}

async fn count_rows(store: &Store) -> i64 {
    let s = store.stats().await.unwrap();
    s.pending + s.scheduled + s.running + s.dead
}

async fn drained(store: &Store) -> bool {
    count_rows(store).await == 0
}

/// Records the ids it sees; fails according to a per-name script.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Event>>>,
}

#[async_trait::async_trait]
impl Handler for Recorder {
    async fn handle(&self, ev: &Event, _: &mut Effects) -> Result<Outcome, HandlerError> {
        self.seen.lock().unwrap().push(ev.clone());
        Ok(Outcome::Done)
    }
}

impl Recorder {
    fn names(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.payload.clone())
            .collect()
    }
}

/// A handler from a closure over the event and the attempt number.
struct FnHandler<F>(F);

#[async_trait::async_trait]
impl<F> Handler for FnHandler<F>
where
    F: Fn(&Event) -> Result<Outcome, HandlerError> + Send + Sync + 'static,
{
    async fn handle(&self, ev: &Event, _: &mut Effects) -> Result<Outcome, HandlerError> {
        (self.0)(ev)
    }
}

async fn delivers_and_deletes(db: TestDb) {
    let store = db.store().await;
    let rec = Recorder::default();
    let events: Vec<_> = (0..50)
        .map(|i| NewEvent::new("order.created", format!("{{\"n\":{i}}}")))
        .collect();
    store.enqueue_batch(&events, 5).await.unwrap();
    let run = Running::start(
        &store,
        StaticRouter::new().with("order.created", rec.clone()),
        fast(),
    );
    wait_for("all 50 events handled and deleted", || async {
        drained(&store).await
    })
    .await;
    let summary = run.stop().await;
    assert_eq!(rec.seen.lock().unwrap().len(), 50);
    assert_eq!(summary.claimed, 50);
    assert!(
        rec.seen
            .lock()
            .unwrap()
            .iter()
            .all(|e| e.retry == 0 && e.attempt() == 1)
    );
}

async fn retries_with_backoff_until_dead(db: TestDb) {
    let store = db.store().await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let h = FnHandler(move |_: &Event| {
        a.fetch_add(1, Ordering::SeqCst);
        Err(HandlerError::retry("upstream said 503"))
    });
    let id = store
        .enqueue(&NewEvent::new("flaky", "{}").with_max_retry(3), 5)
        .await
        .unwrap();
    let run = Running::start(&store, StaticRouter::new().with("flaky", h), fast());
    wait_for("event dead after 3 attempts", || async {
        store.get(id).await.unwrap().is_some_and(|e| e.is_dead())
    })
    .await;
    run.stop().await;
    let ev = store.get(id).await.unwrap().unwrap();
    assert_eq!((ev.retry, ev.max_retry), (3, 3));
    assert_eq!(ev.last_error.as_deref(), Some("upstream said 503"));
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "exactly max_retry attempts"
    );
    assert!(ev.locked_until.is_none(), "a dead event holds no lease");
}

async fn backoff_delays_the_next_attempt(db: TestDb) {
    let store = db.store().await;
    let times = Arc::new(Mutex::new(Vec::new()));
    let t = times.clone();
    let h = FnHandler(move |ev: &Event| {
        t.lock().unwrap().push(std::time::Instant::now());
        if ev.retry < 2 {
            Err(HandlerError::retry("not yet"))
        } else {
            Ok(Outcome::Done)
        }
    });
    let config = RuntimeConfig {
        backoff_base: Duration::from_millis(300),
        backoff_max: Duration::from_secs(5),
        ..fast()
    };
    store
        .enqueue(&NewEvent::new("slowly", "{}"), 5)
        .await
        .unwrap();
    let run = Running::start(&store, StaticRouter::new().with("slowly", h), config);
    wait_for("event succeeded on its third attempt", || async {
        drained(&store).await
    })
    .await;
    run.stop().await;
    let t = times.lock().unwrap();
    assert_eq!(t.len(), 3);
    // Backoff is 300 ms after the first failure and 600 ms after the second:
    // a lower bound, which no scheduling noise can make fail spuriously.
    assert!(
        t[1] - t[0] >= Duration::from_millis(290),
        "{:?}",
        t[1] - t[0]
    );
    assert!(
        t[2] - t[1] >= Duration::from_millis(590),
        "{:?}",
        t[2] - t[1]
    );
}

async fn unknown_name_is_dead_at_once(db: TestDb) {
    let store = db.store().await;
    let id = store
        .enqueue(&NewEvent::new("nobody.listens", "{}"), 5)
        .await
        .unwrap();
    let run = Running::start(
        &store,
        StaticRouter::new().with("other", Recorder::default()),
        fast(),
    );
    wait_for("unknown event dead", || async {
        store.get(id).await.unwrap().is_some_and(|e| e.is_dead())
    })
    .await;
    run.stop().await;
    let ev = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        ev.last_error.as_deref(),
        Some("no handler for event 'nobody.listens'")
    );
    assert_eq!(ev.retry, ev.max_retry);
}

async fn rejected_event_is_dead_at_once(db: TestDb) {
    let store = db.store().await;
    let h = FnHandler(|_: &Event| Err(HandlerError::reject("payload lacks order_id")));
    let id = store
        .enqueue(&NewEvent::new("strict", "{}").with_max_retry(10), 5)
        .await
        .unwrap();
    let run = Running::start(&store, StaticRouter::new().with("strict", h), fast());
    wait_for("rejected event dead", || async {
        store.get(id).await.unwrap().is_some_and(|e| e.is_dead())
    })
    .await;
    run.stop().await;
    let ev = store.get(id).await.unwrap().unwrap();
    assert_eq!((ev.retry, ev.max_retry), (10, 10));
    assert_eq!(ev.last_error.as_deref(), Some("payload lacks order_id"));
}

/// Tracks, per group, the order of handling and whether two events of one
/// group ever overlapped.
#[derive(Clone, Default)]
struct GroupWatcher {
    order: Arc<Mutex<HashMap<String, Vec<i64>>>>,
    active: Arc<Mutex<HashMap<String, usize>>>,
    overlaps: Arc<AtomicUsize>,
    /// (group, n) pairs that fail on their first `k` attempts.
    failing: Arc<HashMap<(String, i64), i32>>,
}

#[async_trait::async_trait]
impl Handler for GroupWatcher {
    async fn handle(&self, ev: &Event, _: &mut Effects) -> Result<Outcome, HandlerError> {
        let v: serde_json::Value = serde_json::from_str(&ev.payload).unwrap();
        let n = v["n"].as_i64().unwrap();
        let g = ev.group_id.clone().unwrap();
        {
            let mut active = self.active.lock().unwrap();
            let a = active.entry(g.clone()).or_default();
            *a += 1;
            if *a > 1 {
                self.overlaps.fetch_add(1, Ordering::SeqCst);
            }
        }
        tokio::time::sleep(Duration::from_millis((n % 3) as u64 * 3)).await;
        *self.active.lock().unwrap().get_mut(&g).unwrap() -= 1;
        if let Some(k) = self.failing.get(&(g.clone(), n))
            && ev.retry < *k
        {
            return Err(HandlerError::retry(format!(
                "{g}/{n} fails attempt {}",
                ev.attempt()
            )));
        }
        self.order.lock().unwrap().entry(g).or_default().push(n);
        Ok(Outcome::Done)
    }
}

async fn group_fifo_with_concurrency(db: TestDb) {
    let store = db.store().await;
    // Interleave 4 groups so a batch claim sees all of them at once.
    let mut events = Vec::new();
    for n in 0..15 {
        for g in ["a", "b", "c", "d"] {
            events.push(NewEvent::new("grouped", format!("{{\"n\":{n}}}")).with_group(g));
        }
    }
    store.enqueue_batch(&events, 5).await.unwrap();
    let failing = HashMap::from([(("b".to_string(), 0), 2), (("c".to_string(), 7), 1)]);
    let w = GroupWatcher {
        failing: Arc::new(failing),
        ..Default::default()
    };
    let run = Running::start(
        &store,
        StaticRouter::new().with("grouped", w.clone()),
        fast(),
    );
    wait_for("all grouped events handled", || async {
        drained(&store).await
    })
    .await;
    run.stop().await;
    assert_eq!(
        w.overlaps.load(Ordering::SeqCst),
        0,
        "two events of one group ran at the same time"
    );
    let order = w.order.lock().unwrap();
    for g in ["a", "b", "c", "d"] {
        assert_eq!(
            order[g],
            (0..15).collect::<Vec<_>>(),
            "group {g} out of order (failing heads included)"
        );
    }
}

async fn dead_head_does_not_block_its_group(db: TestDb) {
    let store = db.store().await;
    let head = store
        .enqueue(
            &NewEvent::new("poison", "{}")
                .with_group("g")
                .with_max_retry(2),
            5,
        )
        .await
        .unwrap();
    store
        .enqueue(&NewEvent::new("fine", "{\"n\":1}").with_group("g"), 5)
        .await
        .unwrap();
    let rec = Recorder::default();
    let router = StaticRouter::new()
        .with(
            "poison",
            FnHandler(|_: &Event| Err(HandlerError::retry("always"))),
        )
        .with("fine", rec.clone());
    let run = Running::start(&store, router, fast());
    wait_for("the successor of a dead head ran", || async {
        rec.seen.lock().unwrap().len() == 1
    })
    .await;
    run.stop().await;
    assert!(store.get(head).await.unwrap().unwrap().is_dead());
}

async fn expired_event_is_dead_not_run(db: TestDb) {
    let store = db.store().await;
    let rec = Recorder::default();
    // Available only after it has expired: it can never start in time.
    // Enqueueing refuses such an event, so insert it as plain SQL could.
    let id = uuid::Uuid::now_v7();
    if db.is_postgres() {
        db.exec(&format!(
            "INSERT INTO outbox_events (id, name, payload, available_at, expires_at)
             VALUES ('{id}', 'late', '{{}}', now() + interval '300 milliseconds',
                     now() + interval '100 milliseconds')"
        ))
        .await;
    } else {
        let now = chrono::Utc::now().timestamp_millis();
        db.exec(&format!(
            "INSERT INTO outbox_events (id, create_date, name, payload, available_at, expires_at)
             VALUES ('{id}', {now}, 'late', '{{}}', {}, {})",
            now + 300,
            now + 100
        ))
        .await;
    }
    let run = Running::start(
        &store,
        StaticRouter::new().with("late", rec.clone()),
        RuntimeConfig {
            cleanup_interval: Duration::from_millis(50),
            ..fast()
        },
    );
    let expirer = tokio::spawn(outrun::maintenance::expirer::run(
        store.clone(),
        Duration::from_millis(50),
        run.stop.clone(),
    ));
    wait_for("expired event dead", || async {
        store.get(id).await.unwrap().is_some_and(|e| e.is_dead())
    })
    .await;
    run.stop().await;
    expirer.await.unwrap();
    assert_eq!(
        store.get(id).await.unwrap().unwrap().last_error.as_deref(),
        Some("expired")
    );
    assert!(rec.seen.lock().unwrap().is_empty());
}

async fn retry_after_spends_no_retry(db: TestDb) {
    let store = db.store().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let h = FnHandler(move |ev: &Event| {
        assert_eq!(ev.retry, 0, "retry-after must not count as a failure");
        if c.fetch_add(1, Ordering::SeqCst) < 2 {
            Ok(Outcome::RetryAfter(Duration::from_millis(30)))
        } else {
            Ok(Outcome::Done)
        }
    });
    store
        .enqueue(&NewEvent::new("later", "{}").with_max_retry(1), 5)
        .await
        .unwrap();
    let run = Running::start(&store, StaticRouter::new().with("later", h), fast());
    wait_for("event done after two retry-afters", || async {
        drained(&store).await
    })
    .await;
    run.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

async fn retry_after_past_expiry_is_expired(db: TestDb) {
    let store = db.store().await;
    let h = FnHandler(|_: &Event| Ok(Outcome::RetryAfter(Duration::from_secs(3600))));
    let id = store
        .enqueue(
            &NewEvent::new("hopeless", "{}").with_expires_in(Duration::from_secs(60)),
            5,
        )
        .await
        .unwrap();
    let run = Running::start(&store, StaticRouter::new().with("hopeless", h), fast());
    wait_for("event dead", || async {
        store.get(id).await.unwrap().is_some_and(|e| e.is_dead())
    })
    .await;
    run.stop().await;
    assert_eq!(
        store.get(id).await.unwrap().unwrap().last_error.as_deref(),
        Some("expired")
    );
}

struct Sleeper(Duration);

#[async_trait::async_trait]
impl Handler for Sleeper {
    async fn handle(&self, _: &Event, _: &mut Effects) -> Result<Outcome, HandlerError> {
        tokio::time::sleep(self.0).await;
        Ok(Outcome::Done)
    }
}

fn route(name: &str, handler: impl Handler) -> Route {
    Route {
        handler_name: Arc::from(name),
        handler: Arc::new(handler),
        permits: None,
        timeout: None,
        max_retry: None,
    }
}

async fn timeout_and_panic_are_retryable_failures(db: TestDb) {
    let store = db.store().await;
    let slow = Route {
        timeout: Some(Duration::from_millis(100)),
        max_retry: Some(1),
        ..route("slow", Sleeper(Duration::from_secs(30)))
    };
    let panicky = Route {
        max_retry: Some(1),
        ..route("panicky", FnHandler(|_: &Event| panic!("guest exploded")))
    };
    let router = StaticRouter::new()
        .with_route("slow", slow)
        .with_route("panicky", panicky)
        .with("ok", Recorder::default());
    let a = store
        .enqueue(&NewEvent::new("slow", "{}"), 5)
        .await
        .unwrap();
    let b = store
        .enqueue(&NewEvent::new("panicky", "{}"), 5)
        .await
        .unwrap();
    let c = store.enqueue(&NewEvent::new("ok", "{}"), 5).await.unwrap();
    let run = Running::start(&store, router, fast());
    wait_for("both failures recorded", || async {
        store.get(a).await.unwrap().is_some_and(|e| e.is_dead())
            && store.get(b).await.unwrap().is_some_and(|e| e.is_dead())
    })
    .await;
    wait_for("the healthy event still ran", || async {
        store.get(c).await.unwrap().is_none()
    })
    .await;
    run.stop().await;
    // The route's max_retry (1) overrides the event's 5.
    let a = store.get(a).await.unwrap().unwrap();
    assert_eq!(a.last_error.as_deref(), Some("timeout after 100ms"));
    assert_eq!((a.retry, a.max_retry), (1, 1));
    assert_eq!(
        store.get(b).await.unwrap().unwrap().last_error.as_deref(),
        Some("handler panicked: guest exploded")
    );
}

/// Counts how many run at once.
#[derive(Clone, Default)]
struct Gauge {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    delay: Duration,
}

#[async_trait::async_trait]
impl Handler for Gauge {
    async fn handle(&self, _: &Event, _: &mut Effects) -> Result<Outcome, HandlerError> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.done.fetch_add(1, Ordering::SeqCst);
        Ok(Outcome::Done)
    }
}

async fn slow_handler_cap_does_not_starve_others(db: TestDb) {
    let store = db.store().await;
    let slow = Gauge {
        delay: Duration::from_millis(150),
        ..Default::default()
    };
    let fast_h = Gauge {
        delay: Duration::from_millis(1),
        ..Default::default()
    };
    let capped = Route {
        permits: Some(Arc::new(Semaphore::new(1))),
        ..route("slow", slow.clone())
    };
    let router = StaticRouter::new()
        .with_route("slow", capped)
        .with("quick", fast_h.clone());
    // Slow ones first, so a naive claimer would fill every slot with them.
    let mut events: Vec<_> = (0..12).map(|_| NewEvent::new("slow", "{}")).collect();
    events.extend((0..40).map(|_| NewEvent::new("quick", "{}")));
    store.enqueue_batch(&events, 5).await.unwrap();
    let run = Running::start(
        &store,
        router,
        RuntimeConfig {
            concurrency: 4,
            batch_size: 4,
            ..fast()
        },
    );
    wait_for("quick events all done", || async {
        fast_h.done.load(Ordering::SeqCst) == 40
    })
    .await;
    let slow_done = slow.done.load(Ordering::SeqCst);
    wait_for("slow events all done", || async { drained(&store).await }).await;
    run.stop().await;
    assert_eq!(
        slow.peak.load(Ordering::SeqCst),
        1,
        "the cap of 1 was exceeded"
    );
    assert!(
        slow_done < 12,
        "quick events waited for all slow ones ({slow_done} of 12 slow done first)"
    );
}

/// Writes through the ack transaction and emits a follow-up; fails when the
/// payload says so.
struct Writer;

#[async_trait::async_trait]
impl Handler for Writer {
    async fn handle(&self, ev: &Event, fx: &mut Effects) -> Result<Outcome, HandlerError> {
        let v: serde_json::Value = serde_json::from_str(&ev.payload).unwrap();
        let tx = fx
            .tx()
            .await
            .map_err(|e| HandlerError::retry(e.to_string()))?;
        tx.execute(
            "INSERT INTO ledger (event_id) VALUES ($1)",
            &[SqlValue::Text(ev.id.to_string())],
        )
        .await
        .map_err(|e| HandlerError::retry(e.to_string()))?;
        fx.emit(NewEvent::new(
            "followed",
            format!("{{\"from\":\"{}\"}}", ev.id),
        ))
        .map_err(|e| HandlerError::reject(e.to_string()))?;
        if v["fail"].as_bool() == Some(true) {
            return Err(HandlerError::reject("failing after writing"));
        }
        Ok(Outcome::Done)
    }
}

async fn effects_commit_with_ack_or_not_at_all(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE ledger (event_id TEXT PRIMARY KEY)")
        .await;
    let ok = store
        .enqueue(&NewEvent::new("write", "{\"fail\":false}"), 5)
        .await
        .unwrap();
    let bad = store
        .enqueue(&NewEvent::new("write", "{\"fail\":true}"), 5)
        .await
        .unwrap();
    let followed = Recorder::default();
    let run = Running::start(
        &store,
        StaticRouter::new()
            .with("write", Writer)
            .with("followed", followed.clone()),
        fast(),
    );
    wait_for("ok handled, bad dead, follow-up handled", || async {
        store.get(ok).await.unwrap().is_none()
            && store.get(bad).await.unwrap().is_some_and(|e| e.is_dead())
            && followed.seen.lock().unwrap().len() == 1
    })
    .await;
    run.stop().await;
    let ledger = db.strings("SELECT event_id FROM ledger").await;
    assert_eq!(
        ledger,
        vec![ok.to_string()],
        "only the successful attempt's write is committed"
    );
    assert_eq!(
        followed.names(),
        vec![format!("{{\"from\":\"{ok}\"}}")],
        "only the successful attempt's emit exists"
    );
}

/// With a poll interval of an hour, follow-ups, group successors and fresh
/// enqueues can only run if the loop wakes up by itself (emitted events and
/// finished group heads on both backends; NOTIFY or the in-process signal
/// for new events).
async fn wakes_up_without_polling(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE ledger (event_id TEXT PRIMARY KEY)")
        .await;
    let followed = Recorder::default();
    let grouped = Recorder::default();
    let router = StaticRouter::new()
        .with("write", Writer)
        .with("followed", followed.clone())
        .with("grouped", grouped.clone());
    let config = RuntimeConfig {
        poll_interval: Duration::from_secs(3600),
        ..fast()
    };
    store
        .enqueue(&NewEvent::new("write", "{}"), 5)
        .await
        .unwrap();
    let events: Vec<_> = (0..3)
        .map(|i| NewEvent::new("grouped", format!("{i}")).with_group("g"))
        .collect();
    store.enqueue_batch(&events, 5).await.unwrap();
    let run = Running::start(&store, router, config);
    wait_for("follow-up and group successors handled", || async {
        followed.seen.lock().unwrap().len() == 1 && grouped.seen.lock().unwrap().len() == 3
    })
    .await;
    // A new event while the loop sleeps.
    store
        .enqueue(&NewEvent::new("grouped", "3"), 5)
        .await
        .unwrap();
    wait_for("event enqueued while idle handled", || async {
        grouped.seen.lock().unwrap().len() == 4
    })
    .await;
    run.stop().await;
    assert_eq!(grouped.names(), vec!["0", "1", "2", "3"]);
}

async fn crashed_instance_events_are_rescued(db: TestDb) {
    let store = db.store().await;
    let id = store
        .enqueue(&NewEvent::new("orphan", "{}"), 5)
        .await
        .unwrap();
    // An instance claims it with a short lease and dies without a verdict.
    let claimed = store
        .claim("dead-instance", 10, Duration::from_millis(300), &[])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let rec = Recorder::default();
    let run = Running::start(
        &store,
        StaticRouter::new().with("orphan", rec.clone()),
        fast(),
    );
    wait_for("orphaned event handled after its lease expired", || async {
        store.get(id).await.unwrap().is_none()
    })
    .await;
    run.stop().await;
    assert_eq!(rec.seen.lock().unwrap().len(), 1);
    // The dead instance's late verdict is refused: its token is stale.
    assert!(
        !store
            .fail(
                claimed[0].lease(),
                &outrun::store::Failure::Dead {
                    error: "late".into()
                }
            )
            .await
            .unwrap()
    );
}

async fn graceful_shutdown_leaves_no_lease(db: TestDb) {
    let store = db.store().await;
    let h = Gauge {
        delay: Duration::from_millis(400),
        ..Default::default()
    };
    let events: Vec<_> = (0..20).map(|_| NewEvent::new("slow", "{}")).collect();
    store.enqueue_batch(&events, 5).await.unwrap();
    let run = Running::start(
        &store,
        StaticRouter::new().with("slow", h.clone()),
        RuntimeConfig {
            concurrency: 3,
            batch_size: 3,
            ..fast()
        },
    );
    wait_for("handlers running", || async {
        h.now.load(Ordering::SeqCst) > 0
    })
    .await;
    let summary = run.stop().await;
    assert_eq!(
        summary.cancelled, 0,
        "in-flight handlers should finish within the grace period"
    );
    let s = store.stats().await.unwrap();
    assert_eq!(s.running, 0, "no event may stay leased after shutdown");
    let done = h.done.load(Ordering::SeqCst) as i64;
    assert!(done >= 1);
    assert_eq!(
        s.pending + s.scheduled,
        20 - done,
        "unfinished events are live and free again"
    );
    let leased = store
        .list(&outrun::store::ListFilter {
            dead: false,
            name: None,
            limit: 100,
        })
        .await
        .unwrap();
    assert!(
        leased
            .iter()
            .all(|e| e.locked_until.is_none() && e.locked_by.is_none()),
        "released events carry no lease"
    );
}

async fn shutdown_grace_cancels_and_releases(db: TestDb) {
    let store = db.store().await;
    let id = store
        .enqueue(&NewEvent::new("stuck", "{}"), 5)
        .await
        .unwrap();
    let h = Gauge {
        delay: Duration::from_secs(60),
        ..Default::default()
    };
    let run = Running::start(
        &store,
        StaticRouter::new().with("stuck", h.clone()),
        RuntimeConfig {
            shutdown_grace: Duration::from_millis(100),
            ..fast()
        },
    );
    wait_for("handler running", || async {
        h.now.load(Ordering::SeqCst) == 1
    })
    .await;
    let summary = run.stop().await;
    assert_eq!(summary.cancelled, 1);
    let ev = store.get(id).await.unwrap().unwrap();
    assert!(
        ev.locked_until.is_none() && !ev.is_dead() && ev.retry == 0,
        "a cancelled event is released, not failed: {ev:?}"
    );
}

/// Inserts the payload's `k`; the table's CHECK refuses one value (`bad`).
/// A failed statement is the event's fault (`reject`); a transient database
/// error is a retry. Counts the attempts at `k = bad`. With `emit`, each
/// event also emits a follow-up `inserted` (delayed by an hour, so it stays
/// in the table to be counted).
#[derive(Clone)]
struct InsertK {
    bad: i64,
    bad_attempts: Arc<AtomicUsize>,
    emit: bool,
}

impl Default for InsertK {
    fn default() -> Self {
        Self {
            bad: 13,
            bad_attempts: Arc::default(),
            emit: false,
        }
    }
}

#[async_trait::async_trait]
impl Handler for InsertK {
    async fn handle(&self, ev: &Event, fx: &mut Effects) -> Result<Outcome, HandlerError> {
        let v: serde_json::Value = serde_json::from_str(&ev.payload).unwrap();
        let k = v["k"].as_i64().unwrap();
        if k == self.bad {
            self.bad_attempts.fetch_add(1, Ordering::SeqCst);
        }
        let fail = |e: outrun::store::StoreError| {
            if e.is_transient() {
                HandlerError::retry(e.to_string())
            } else {
                HandlerError::reject(e.to_string())
            }
        };
        if self.emit {
            let mut follow_up = NewEvent::new("inserted", format!("{{\"k\":{k}}}"));
            follow_up.delay = Some(Duration::from_secs(3600));
            fx.emit(follow_up)
                .map_err(|e| HandlerError::reject(e.to_string()))?;
        }
        let tx = fx.tx().await.map_err(fail)?;
        tx.execute(
            "INSERT INTO batch_rows (k) VALUES ($1)",
            &[SqlValue::Int(k)],
        )
        .await
        .map_err(fail)?;
        if let Some(sleep) = v["sleep"].as_str() {
            tx.query(sleep, &[]).await.map_err(fail)?;
        }
        Ok(Outcome::Done)
    }
}

/// Many events share a lane's transaction; one whose statement fails is
/// rolled back alone, and every other event's row and follow-up event are
/// there exactly once (follow-ups wait in memory for the lane's commit).
/// With `effect_savepoints = auto` (the default) the failing event first
/// ran without a savepoint, so its failure rolled back the batch it was in
/// (whose events ran again) and it ran again itself, with a savepoint.
async fn failing_statement_in_a_batch_fails_only_its_event(db: TestDb) {
    failing_statement_fails_only_its_event(db, SavepointMode::Auto, 13).await
}

/// As above with a savepoint for every event: the failure undoes its own
/// event alone, on the first attempt.
async fn failing_statement_with_savepoints_always(db: TestDb) {
    failing_statement_fails_only_its_event(db, SavepointMode::Always, 13).await
}

/// As above, failing late: by then the handler has shown that its events
/// run one statement each, so they share a transaction with other events'
/// (SQLite's shared one, PostgreSQL's pipelined ones). The failure rolls
/// that transaction back; the others run again, and the failing event
/// runs again in a lane, with a savepoint, where it fails alone.
async fn failing_statement_in_a_shared_transaction_fails_only_its_event(db: TestDb) {
    failing_statement_fails_only_its_event(db, SavepointMode::Auto, 250).await
}

async fn failing_statement_fails_only_its_event(db: TestDb, savepoints: SavepointMode, bad: i64) {
    let store = db.store().await;
    let handler = InsertK {
        bad,
        emit: true,
        ..Default::default()
    };
    db.exec(&format!(
        "CREATE TABLE batch_rows (k INTEGER NOT NULL CHECK (k <> {bad}))"
    ))
    .await;
    let events: Vec<_> = (0..300)
        .map(|k| NewEvent::new("insert", format!("{{\"k\":{k}}}")))
        .collect();
    let ids = store.enqueue_batch(&events, 5).await.unwrap();
    let run = Running::start(
        &store,
        StaticRouter::new().with("insert", handler.clone()),
        RuntimeConfig {
            concurrency: 16,
            batch_size: 64,
            effect_savepoints: savepoints,
            ..fast()
        },
    );
    wait_for("299 events done and one dead", || async {
        db.scalar("SELECT count(*) FROM outbox_events WHERE name = 'insert' AND retry < max_retry")
            .await
            == 0
            && store.stats().await.unwrap().dead == 1
    })
    .await;
    run.stop().await;
    let dead = store
        .get(ids[bad as usize])
        .await
        .unwrap()
        .expect("the bad event stays, dead");
    assert!(dead.is_dead(), "{dead:?}");
    assert!(
        dead.last_error
            .as_deref()
            .unwrap_or("")
            .to_lowercase()
            .contains("check"),
        "the dead event says why: {:?}",
        dead.last_error
    );
    assert_eq!(db.scalar("SELECT count(*) FROM batch_rows").await, 299);
    assert_eq!(
        db.scalar("SELECT count(DISTINCT k) FROM batch_rows").await,
        299
    );
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM batch_rows WHERE k = {bad}"))
            .await,
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM outbox_events WHERE name = 'inserted'")
            .await,
        299,
        "one follow-up per event done"
    );
    assert_eq!(
        db.scalar("SELECT count(DISTINCT payload) FROM outbox_events WHERE name = 'inserted'")
            .await,
        299
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM outbox_events WHERE name = 'inserted' AND payload = '{{\"k\":{bad}}}'"
        ))
        .await,
        0
    );
    // Without a savepoint the first failure is not the event's verdict:
    // it rolls back the batch and runs again, with one. On SQLite a
    // handler's first events run alone, with a savepoint, until it has
    // shown that its events run one statement each (store::shared): event
    // 13 fails at once then, or, if it ran after that, as on PostgreSQL.
    // Event 250 runs after the handler is trusted to share a transaction on
    // either backend: it fails there first, then in a lane.
    let attempts = handler.bad_attempts.load(Ordering::SeqCst);
    match savepoints {
        SavepointMode::Always => assert_eq!(attempts, 1),
        SavepointMode::Auto if db.is_postgres() || bad > 100 => assert_eq!(attempts, 2),
        SavepointMode::Auto => assert!((1..=2).contains(&attempts), "{attempts} attempts"),
    }
}

/// Effects of a group's events commit before the next event of the group
/// starts: each handler sees its predecessor's row.
async fn group_successor_sees_its_predecessors_effects(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE chain (g TEXT NOT NULL, n INTEGER NOT NULL)")
        .await;
    struct Chain;
    #[async_trait::async_trait]
    impl Handler for Chain {
        async fn handle(&self, ev: &Event, fx: &mut Effects) -> Result<Outcome, HandlerError> {
            let v: serde_json::Value = serde_json::from_str(&ev.payload).unwrap();
            let n = v["n"].as_i64().unwrap();
            let g = ev.group_id.clone().unwrap();
            let err = |e: outrun::store::StoreError| HandlerError::retry(e.to_string());
            let tx = fx.tx().await.map_err(err)?;
            let rows = tx
                .query(
                    "SELECT count(*) FROM chain WHERE g = $1",
                    &[SqlValue::Text(g.clone())],
                )
                .await
                .map_err(err)?;
            if rows.rows[0][0] != SqlValue::Int(n) {
                return Err(HandlerError::reject(format!(
                    "event {n} of {g} saw {:?} earlier rows",
                    rows.rows[0][0]
                )));
            }
            tx.execute(
                "INSERT INTO chain (g, n) VALUES ($1, $2)",
                &[SqlValue::Text(g), SqlValue::Int(n)],
            )
            .await
            .map_err(err)?;
            Ok(Outcome::Done)
        }
    }
    let mut events = Vec::new();
    for n in 0..20 {
        for g in 0..5 {
            let mut ev = NewEvent::new("chain", format!("{{\"n\":{n}}}"));
            ev.group_id = Some(format!("g{g}"));
            events.push(ev);
        }
    }
    store.enqueue_batch(&events, 1).await.unwrap();
    let run = Running::start(&store, StaticRouter::new().with("chain", Chain), fast());
    wait_for("100 grouped events drained", || async {
        drained(&store).await
    })
    .await;
    run.stop().await;
    assert_eq!(db.scalar("SELECT count(*) FROM chain").await, 100);
}

/// Handlers that read a value and write it back changed, with other events'
/// handlers running at the same time, lose no update: on SQLite, where the
/// events share one transaction, a handler caught running a statement after
/// another event's, between two of its own, runs again, alone (PostgreSQL
/// lanes are separate transactions, so there it takes the row lock).
async fn read_modify_write_handlers_lose_no_update(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE counter (n BIGINT NOT NULL)").await;
    db.exec("INSERT INTO counter (n) VALUES (0)").await;
    db.exec("CREATE TABLE seen (n BIGINT NOT NULL)").await;
    struct Increment {
        read: &'static str,
    }
    #[async_trait::async_trait]
    impl Handler for Increment {
        async fn handle(&self, _: &Event, fx: &mut Effects) -> Result<Outcome, HandlerError> {
            let err = |e: outrun::store::StoreError| HandlerError::retry(e.to_string());
            let tx = fx.tx().await.map_err(err)?;
            let rows = tx.query(self.read, &[]).await.map_err(err)?;
            let SqlValue::Int(n) = rows.rows[0][0] else {
                return Err(HandlerError::reject("counter is not an integer"));
            };
            // Let the other events' handlers run their statements now.
            tokio::task::yield_now().await;
            tx.execute("UPDATE counter SET n = $1", &[SqlValue::Int(n + 1)])
                .await
                .map_err(err)?;
            tx.execute("INSERT INTO seen (n) VALUES ($1)", &[SqlValue::Int(n + 1)])
                .await
                .map_err(err)?;
            Ok(Outcome::Done)
        }
    }
    let read = if db.is_postgres() {
        "SELECT n FROM counter FOR UPDATE"
    } else {
        "SELECT n FROM counter"
    };
    let events: Vec<NewEvent> = (0..200).map(|_| NewEvent::new("inc", "{}")).collect();
    store.enqueue_batch(&events, 5).await.unwrap();
    let run = Running::start(
        &store,
        StaticRouter::new().with("inc", Increment { read }),
        fast(),
    );
    wait_for("200 increments drained", || async { drained(&store).await }).await;
    run.stop().await;
    assert_eq!(store.stats().await.unwrap().dead, 0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM counter WHERE n = 200")
            .await,
        1
    );
    assert_eq!(db.scalar("SELECT count(DISTINCT n) FROM seen").await, 200);
    assert_eq!(db.scalar("SELECT count(*) FROM seen").await, 200);
}

/// A handler trusted to share a transaction (its first events ran one
/// statement each) that then starts to read a value and write it back
/// changed: the first event caught running a statement after another
/// event's, between two of its own, rolls everyone back, and the handler's
/// events run alone from then on (SQLite: alone in the shared transaction;
/// PostgreSQL: in lanes, where `FOR UPDATE` takes the row lock). No update
/// is lost, nothing is dead, every row is there once.
async fn trusted_handler_that_starts_to_read_then_write_loses_no_update(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE counter (n BIGINT NOT NULL)").await;
    db.exec("INSERT INTO counter (n) VALUES (0)").await;
    db.exec("CREATE TABLE seen (n BIGINT NOT NULL)").await;
    db.exec("CREATE TABLE plain (k BIGINT NOT NULL)").await;
    struct Mixed {
        read: &'static str,
    }
    #[async_trait::async_trait]
    impl Handler for Mixed {
        async fn handle(&self, ev: &Event, fx: &mut Effects) -> Result<Outcome, HandlerError> {
            let err = |e: outrun::store::StoreError| HandlerError::retry(e.to_string());
            let v: serde_json::Value = serde_json::from_str(&ev.payload).unwrap();
            let tx = fx.tx().await.map_err(err)?;
            if let Some(k) = v["plain"].as_i64() {
                tx.execute("INSERT INTO plain (k) VALUES ($1)", &[SqlValue::Int(k)])
                    .await
                    .map_err(err)?;
                return Ok(Outcome::Done);
            }
            let rows = tx.query(self.read, &[]).await.map_err(err)?;
            let SqlValue::Int(n) = rows.rows[0][0] else {
                return Err(HandlerError::reject("counter is not an integer"));
            };
            tokio::task::yield_now().await;
            tx.execute("UPDATE counter SET n = $1", &[SqlValue::Int(n + 1)])
                .await
                .map_err(err)?;
            tx.execute("INSERT INTO seen (n) VALUES ($1)", &[SqlValue::Int(n + 1)])
                .await
                .map_err(err)?;
            Ok(Outcome::Done)
        }
    }
    let read = if db.is_postgres() {
        "SELECT n FROM counter FOR UPDATE"
    } else {
        "SELECT n FROM counter"
    };
    let plain: Vec<NewEvent> = (0..150)
        .map(|k| NewEvent::new("mixed", format!("{{\"plain\":{k}}}")))
        .collect();
    store.enqueue_batch(&plain, 5).await.unwrap();
    let run = Running::start(
        &store,
        StaticRouter::new().with("mixed", Mixed { read }),
        RuntimeConfig {
            concurrency: 16,
            ..fast()
        },
    );
    wait_for("150 plain events drained", || async {
        drained(&store).await
    })
    .await;
    let incs: Vec<NewEvent> = (0..200).map(|_| NewEvent::new("mixed", "{}")).collect();
    store.enqueue_batch(&incs, 5).await.unwrap();
    wait_for("200 increments drained", || async { drained(&store).await }).await;
    run.stop().await;
    assert_eq!(store.stats().await.unwrap().dead, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM plain").await, 150);
    assert_eq!(db.scalar("SELECT count(DISTINCT k) FROM plain").await, 150);
    assert_eq!(
        db.scalar("SELECT count(*) FROM counter WHERE n = 200")
            .await,
        1
    );
    assert_eq!(db.scalar("SELECT count(DISTINCT n) FROM seen").await, 200);
    assert_eq!(db.scalar("SELECT count(*) FROM seen").await, 200);
}

/// The database kills the connection a handler's statement runs on: the
/// event runs again without spending a retry (it has only one), and its
/// row is there exactly once in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_killed_during_a_statement_is_retried_not_dead() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    db.exec("CREATE TABLE batch_rows (k INTEGER NOT NULL)")
        .await;
    let events: Vec<_> = (0..4)
        .map(|k| {
            let mut ev = NewEvent::new(
                "insert",
                format!("{{\"k\":{k},\"sleep\":\"SELECT pg_sleep(0.3)::text\"}}"),
            );
            ev.max_retry = Some(1);
            ev
        })
        .collect();
    store.enqueue_batch(&events, 1).await.unwrap();
    let run = Running::start(
        &store,
        StaticRouter::new().with("insert", InsertK::default()),
        RuntimeConfig {
            concurrency: 4,
            ..fast()
        },
    );
    let killed = common::eventually(
        "a handler's backend killed",
        Duration::from_secs(20),
        || async {
            let n = db
                .scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND query LIKE 'SELECT pg_sleep(0.3)%'",
                )
                .await;
            (n > 0).then_some(n)
        },
    )
    .await;
    wait_for("every event done", || async { drained(&store).await }).await;
    run.stop().await;
    assert!(killed > 0);
    assert_eq!(db.scalar("SELECT count(*) FROM batch_rows").await, 4);
    assert_eq!(
        db.scalar("SELECT count(DISTINCT k) FROM batch_rows").await,
        4
    );
}

/// Handlers whose events run one statement each share pipelined
/// transactions on PostgreSQL (once trusted), and a backend killed under
/// them loses nothing: every pipe backend is terminated again and again
/// while 3,000 events drain; every event's row is there exactly once and
/// nothing is dead. The rows say which session wrote them, so the test
/// also shows that the pipes carried most of the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_transactions_survive_killed_backends() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    db.exec("CREATE TABLE piped (k BIGINT NOT NULL, app TEXT NOT NULL)")
        .await;
    struct Insert;
    #[async_trait::async_trait]
    impl Handler for Insert {
        async fn handle(&self, ev: &Event, fx: &mut Effects) -> Result<Outcome, HandlerError> {
            let v: serde_json::Value = serde_json::from_str(&ev.payload).unwrap();
            let fail = |e: outrun::store::StoreError| {
                if e.is_transient() {
                    HandlerError::retry(e.to_string())
                } else {
                    HandlerError::reject(e.to_string())
                }
            };
            let tx = fx.tx().await.map_err(fail)?;
            tx.execute(
                "INSERT INTO piped (k, app) VALUES ($1, current_setting('application_name'))",
                &[SqlValue::Int(v["k"].as_i64().unwrap())],
            )
            .await
            .map_err(fail)?;
            Ok(Outcome::Done)
        }
    }
    let events: Vec<_> = (0..3000)
        .map(|k| {
            let mut ev = NewEvent::new("piped", format!("{{\"k\":{k}}}"));
            // Two attempts only: a kill must never cost one.
            ev.max_retry = Some(2);
            ev
        })
        .collect();
    store.enqueue_batch(&events, 2).await.unwrap();
    let run = Running::start(
        &store,
        StaticRouter::new().with("piped", Insert),
        RuntimeConfig {
            concurrency: 16,
            batch_size: 64,
            ..fast()
        },
    );
    let mut kills = 0;
    while !drained(&store).await {
        kills += db
            .scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'outrun effects pipe'",
            )
            .await;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    run.stop().await;
    assert_eq!(store.stats().await.unwrap().dead, 0);
    assert_eq!(db.scalar("SELECT count(*) FROM piped").await, 3000);
    assert_eq!(db.scalar("SELECT count(DISTINCT k) FROM piped").await, 3000);
    let piped = db
        .scalar("SELECT count(*) FROM piped WHERE app = 'outrun effects pipe'")
        .await;
    assert!(kills > 0, "no pipe backend was ever seen to kill");
    assert!(
        piped > 0,
        "no event ran in a pipe ({kills} pipe backends killed)"
    );
}

/// Two handlers lock the same rows in opposite orders: PostgreSQL aborts
/// one (deadlock detected), which runs again without spending its only
/// retry; both finish, each update applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlock_between_two_handlers_is_retried() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    db.exec("CREATE TABLE locks (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        .await;
    db.exec("INSERT INTO locks VALUES (1, 0), (2, 0)").await;
    struct LockPair;
    #[async_trait::async_trait]
    impl Handler for LockPair {
        async fn handle(&self, ev: &Event, fx: &mut Effects) -> Result<Outcome, HandlerError> {
            let v: serde_json::Value = serde_json::from_str(&ev.payload).unwrap();
            let err = |e: outrun::store::StoreError| HandlerError::retry(e.to_string());
            let tx = fx.tx().await.map_err(err)?;
            for (i, key) in ["first", "second"].iter().enumerate() {
                tx.execute(
                    "UPDATE locks SET v = v + 1 WHERE id = $1",
                    &[SqlValue::Int(v[key].as_i64().unwrap())],
                )
                .await
                .map_err(err)?;
                if i == 0 {
                    tx.query("SELECT pg_sleep(0.3)::text", &[])
                        .await
                        .map_err(err)?;
                }
            }
            Ok(Outcome::Done)
        }
    }
    let mut a = NewEvent::new("pair", r#"{"first":1,"second":2}"#);
    a.max_retry = Some(1);
    let mut b = NewEvent::new("pair", r#"{"first":2,"second":1}"#);
    b.max_retry = Some(1);
    store.enqueue_batch(&[a, b], 1).await.unwrap();
    let run = Running::start(
        &store,
        StaticRouter::new().with("pair", LockPair),
        RuntimeConfig {
            concurrency: 2,
            effect_lanes: 2,
            ..fast()
        },
    );
    wait_for("both done", || async { drained(&store).await }).await;
    run.stop().await;
    assert_eq!(db.scalar("SELECT sum(v) FROM locks").await, 4);
    assert_eq!(db.scalar("SELECT count(*) FROM locks WHERE v = 2").await, 2);
}

on_both_backends!(
    delivers_and_deletes,
    retries_with_backoff_until_dead,
    backoff_delays_the_next_attempt,
    unknown_name_is_dead_at_once,
    rejected_event_is_dead_at_once,
    group_fifo_with_concurrency,
    dead_head_does_not_block_its_group,
    expired_event_is_dead_not_run,
    retry_after_spends_no_retry,
    retry_after_past_expiry_is_expired,
    timeout_and_panic_are_retryable_failures,
    slow_handler_cap_does_not_starve_others,
    effects_commit_with_ack_or_not_at_all,
    crashed_instance_events_are_rescued,
    wakes_up_without_polling,
    graceful_shutdown_leaves_no_lease,
    shutdown_grace_cancels_and_releases,
    failing_statement_in_a_batch_fails_only_its_event,
    failing_statement_with_savepoints_always,
    failing_statement_in_a_shared_transaction_fails_only_its_event,
    group_successor_sees_its_predecessors_effects,
    read_modify_write_handlers_lose_no_update,
    trusted_handler_that_starts_to_read_then_write_loses_no_update,
    cancelling_running_events_discards_their_attempts,
);

/// Waits at a gate, then does what its payload's `mode` says: write a
/// ledger row (`sql`), emit a follow-up (`emit`) or nothing (`none`), and
/// succeeds.
#[derive(Clone)]
struct Gated {
    started: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

#[async_trait::async_trait]
impl Handler for Gated {
    async fn handle(&self, ev: &Event, fx: &mut Effects) -> Result<Outcome, HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let _pass = self.gate.acquire().await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&ev.payload).unwrap();
        let result = async {
            match v["mode"].as_str() {
                Some("sql") => {
                    let tx = fx
                        .tx()
                        .await
                        .map_err(|e| HandlerError::retry(e.to_string()))?;
                    tx.execute(
                        "INSERT INTO ledger (event_id) VALUES ($1)",
                        &[SqlValue::Text(ev.id.to_string())],
                    )
                    .await
                    .map_err(|e| HandlerError::retry(e.to_string()))?;
                }
                Some("emit") => fx
                    .emit(NewEvent::new("followed", "{}"))
                    .map_err(|e| HandlerError::reject(e.to_string()))?,
                _ => {}
            }
            Ok(Outcome::Done)
        }
        .await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        result
    }
}

/// Events cancelled while their handlers run: each attempt then succeeds
/// (or would have), and none of its effects lands: no ledger row, no
/// follow-up event; the events stay dead 'cancelled' and replay runs them
/// for real.
async fn cancelling_running_events_discards_their_attempts(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE ledger (event_id TEXT PRIMARY KEY)")
        .await;
    let mut ids = Vec::new();
    for mode in ["sql", "emit", "none"] {
        let payload = format!("{{\"mode\":\"{mode}\"}}");
        ids.push(
            store
                .enqueue(&NewEvent::new("gated", payload), 5)
                .await
                .unwrap(),
        );
    }
    let gated = Gated {
        started: Arc::default(),
        finished: Arc::default(),
        gate: Arc::new(Semaphore::new(0)),
    };
    let followed = Recorder::default();
    let router = || {
        StaticRouter::new()
            .with("gated", gated.clone())
            .with("followed", followed.clone())
    };
    let run = Running::start(&store, router(), fast());
    wait_for("three handlers running", || async {
        gated.started.load(Ordering::SeqCst) == 3
    })
    .await;
    let done = store.cancel_matching("gated", None).await.unwrap();
    assert_eq!((done.cancelled, done.running, done.busy), (3, 3, 0));
    gated.gate.add_permits(3);
    wait_for("three handlers finished", || async {
        gated.finished.load(Ordering::SeqCst) == 3
    })
    .await;
    run.stop().await;

    for id in &ids {
        let e = store.get(*id).await.unwrap().expect("still there");
        assert!(e.is_dead(), "{e:?}");
        assert_eq!(e.last_error.as_deref(), Some("cancelled"));
        assert!(e.dead_at.is_some() && e.locked_by.is_none(), "{e:?}");
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM ledger").await,
        0,
        "the cancelled attempt's write was discarded"
    );
    let s = store.stats().await.unwrap();
    assert_eq!(
        (s.dead, s.pending + s.scheduled + s.running),
        (3, 0),
        "no follow-up event was committed: {s:?}"
    );
    assert!(followed.seen.lock().unwrap().is_empty());

    // Replayed, they run for real.
    assert_eq!(store.replay_all_dead().await.unwrap(), 3);
    gated.gate.add_permits(100);
    let run = Running::start(&store, router(), fast());
    wait_for("replayed events handled", || async {
        drained(&store).await
    })
    .await;
    run.stop().await;
    assert_eq!(
        db.strings("SELECT event_id FROM ledger").await,
        vec![ids[0].to_string()]
    );
    assert_eq!(followed.seen.lock().unwrap().len(), 1);
}

/// Two runtimes with their own pools drain one PostgreSQL database: every
/// event is handled exactly once (no lease expires in this test, so
/// at-least-once delivery never needs a second run).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runtimes_share_one_postgres_database() {
    let db = TestDb::postgres().await;
    let seed = db.store().await;
    let events: Vec<_> = (0..5000)
        .map(|i| NewEvent::new("count", format!("{{\"i\":{i}}}")))
        .collect();
    for chunk in events.chunks(1000) {
        seed.enqueue_batch(chunk, 5).await.unwrap();
    }
    let seen: Arc<Mutex<HashMap<uuid::Uuid, (usize, usize)>>> = Arc::default();
    let mut runs = Vec::new();
    for instance in 0..2 {
        let store = db.store().await; // a separate pool per runtime
        let seen = seen.clone();
        struct Count(usize, Arc<Mutex<HashMap<uuid::Uuid, (usize, usize)>>>);
        #[async_trait::async_trait]
        impl Handler for Count {
            async fn handle(&self, ev: &Event, _: &mut Effects) -> Result<Outcome, HandlerError> {
                self.1.lock().unwrap().entry(ev.id).or_insert((0, self.0)).0 += 1;
                Ok(Outcome::Done)
            }
        }
        runs.push(Running::start(
            &store,
            StaticRouter::new().with("count", Count(instance, seen)),
            RuntimeConfig {
                concurrency: 16,
                batch_size: 32,
                ..fast()
            },
        ));
    }
    wait_for("5000 events drained by two runtimes", || async {
        drained(&seed).await
    })
    .await;
    for r in runs {
        r.stop().await;
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 5000);
    let twice: Vec<_> = seen.iter().filter(|(_, (n, _))| *n != 1).collect();
    assert!(twice.is_empty(), "events handled more than once: {twice:?}");
    let by_first = seen.values().filter(|(_, i)| *i == 0).count();
    assert!(
        by_first > 0 && by_first < 5000,
        "both runtimes should have taken part ({by_first} by the first)"
    );
}
