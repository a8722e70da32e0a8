//! The store's behaviour suite: every test body runs against SQLite and
//! PostgreSQL (`sqlite::name`, `postgres::name`), each on a fresh database.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use common::{TestDb, eventually};
use outrun::event::{InvalidEvent, Lease};
use outrun::store::{ConnectOptions, Failure, ListFilter, SqlValue, StoreError};
use outrun::{Claimed, NewEvent, Store};
use sqlx::Connection;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(600);
const SHORT: Duration = Duration::from_millis(150);
const WAIT: Duration = Duration::from_secs(20);
const NONE: &[String] = &[];

fn ev(name: &str) -> NewEvent {
    NewEvent::new(name, "{}")
}

fn ids(claimed: &[Claimed]) -> HashSet<Uuid> {
    claimed.iter().map(|c| c.event.id).collect()
}

fn past() -> chrono::DateTime<Utc> {
    Utc::now() - chrono::Duration::seconds(5)
}

fn future() -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::hours(1)
}

async fn count(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM outbox_events").await
}

/// Claim exactly one event, whatever else is (not) there.
async fn claim_one(store: &Store, lease: Duration) -> Claimed {
    let mut got = store.claim("w1", 10, lease, NONE).await.unwrap();
    assert_eq!(
        got.len(),
        1,
        "expected exactly one claimable event, got {got:?}"
    );
    got.remove(0)
}

/// Dead rows inserted the way another application (or an old runtime) would.
async fn insert_dead(db: &TestDb, name: &str) {
    db.exec(&format!(
        "INSERT INTO outbox_events (name, payload, retry, max_retry, last_error) VALUES ('{name}', '{{}}', 3, 3, 'boom')"
    ))
    .await;
}

crate::on_both_backends!(
    enqueue_stores_every_option,
    idempotent_enqueue_returns_existing_id,
    concurrent_enqueues_with_one_key_make_one_row,
    enqueue_in_caller_transaction_follows_it,
    batch_enqueue_is_one_transaction,
    plain_sql_insert_with_name_and_payload_works,
    claim_respects_limit_and_lease,
    claim_finds_events_that_sort_before_earlier_claims,
    claim_hands_out_every_field_as_stored,
    expired_lease_is_reclaimable_and_old_token_is_fenced,
    failure_counts_retries_and_respects_backoff,
    max_retry_override_applies_on_failure,
    dead_failure_is_final,
    reschedule_keeps_retry,
    group_runs_one_event_at_a_time_in_order,
    skip_names_are_left_alone,
    release_gives_events_back,
    expire_due_kills_unstarted_expired_events,
    cleanup_dead_leaves_live_events_alone,
    replay_revives_dead_events_only,
    replay_all_and_purge,
    stats_count_by_state,
    list_filters_and_orders,
    ack_tx_commits_handler_writes_emits_and_ack,
    ack_tx_with_stale_token_rolls_everything_back,
    sql_capability_values_round_trip,
    bad_input_writes_nothing,
    wakeups_fire_on_enqueue_and_replay,
    migrate_is_idempotent,
    every_death_records_dead_at,
    retention_counts_from_dead_at,
    cancel_pending_makes_it_dead_and_replayable,
    cancel_by_name_and_group_hits_only_those,
    cancel_of_a_running_event_fences_its_verdict,
    verdicts_never_touch_a_row_marked_dead,
    cancel_refuses_unknown_and_dead_events,
);

async fn enqueue_stores_every_option(db: TestDb) {
    let store = db.store().await;
    let before = Utc::now() - chrono::Duration::seconds(1);
    let id = store
        .enqueue(
            &NewEvent::new("order.created", r#"{"id": 1,  "x":[true]}"#)
                .with_group("order-1")
                .with_delay(Duration::from_secs(3600))
                .with_expires_in(Duration::from_secs(7200))
                .with_max_retry(7)
                .with_key("k-1"),
            5,
        )
        .await
        .unwrap();
    assert_eq!(id.get_version_num(), 7, "ids are UUIDv7");
    let e = store.get(id).await.unwrap().expect("the event is stored");
    assert_eq!(e.name, "order.created");
    assert_eq!(
        e.payload, r#"{"id": 1,  "x":[true]}"#,
        "payload is stored byte for byte"
    );
    assert_eq!(e.group_id.as_deref(), Some("order-1"));
    assert_eq!(e.idempotency_key.as_deref(), Some("k-1"));
    assert_eq!((e.retry, e.max_retry), (0, 7));
    assert!(e.create_date >= before);
    let delay = e.available_at - e.create_date;
    assert!(
        delay >= chrono::Duration::seconds(3599) && delay <= chrono::Duration::seconds(3601),
        "{delay}"
    );
    let ttl = e.expires_at.unwrap() - e.create_date;
    assert!(
        ttl >= chrono::Duration::seconds(7199) && ttl <= chrono::Duration::seconds(7201),
        "{ttl}"
    );
    assert!(e.locked_by.is_none() && e.locked_until.is_none() && e.last_error.is_none());

    // No max_retry on the event: the runtime default applies.
    let id = store.enqueue(&ev("plain"), 9).await.unwrap();
    assert_eq!(store.get(id).await.unwrap().unwrap().max_retry, 9);
    assert!(store.get(Uuid::now_v7()).await.unwrap().is_none());
}

async fn idempotent_enqueue_returns_existing_id(db: TestDb) {
    let store = db.store().await;
    let first = store
        .enqueue(&NewEvent::new("a", "1").with_key("same"), 5)
        .await
        .unwrap();
    let second = store
        .enqueue(&NewEvent::new("b", "2").with_key("same"), 5)
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(count(&db).await, 1);
    assert_eq!(
        store.get(first).await.unwrap().unwrap().payload,
        "1",
        "the first event is kept as it was"
    );
    // Through the caller's-connection path too.
    let third = match &store {
        Store::Sqlite(s) => {
            outrun::enqueue::<sqlx::Sqlite>(
                &mut *s.pool().acquire().await.unwrap(),
                &ev("c").with_key("same"),
            )
            .await
        }
        Store::Postgres(s) => {
            outrun::enqueue::<sqlx::Postgres>(
                &mut *s.pool().acquire().await.unwrap(),
                &ev("c").with_key("same"),
            )
            .await
        }
    }
    .unwrap();
    assert_eq!(third, first);
    // Once the event is acknowledged its key is free again.
    let c = claim_one(&store, LONG).await;
    assert_eq!(store.ack(&[c.lease()]).await.unwrap(), vec![first]);
    let fresh = store.enqueue(&ev("a").with_key("same"), 5).await.unwrap();
    assert_ne!(fresh, first);
}

async fn concurrent_enqueues_with_one_key_make_one_row(db: TestDb) {
    let store = db.store().await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .enqueue(
                        &NewEvent::new("race", format!("{i}")).with_key("one-key"),
                        5,
                    )
                    .await
            })
        })
        .collect();
    let mut got = HashSet::new();
    for t in tasks {
        got.insert(t.await.unwrap().unwrap());
    }
    assert_eq!(got.len(), 1, "every enqueue returned the same id: {got:?}");
    assert_eq!(count(&db).await, 1);
}

async fn enqueue_in_caller_transaction_follows_it(db: TestDb) {
    let store = db.store().await;
    let (rolled_back, committed) = match &store {
        Store::Sqlite(_) => {
            let mut conn = sqlx::SqliteConnection::connect(db.url()).await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            let a = outrun::enqueue::<sqlx::Sqlite>(&mut tx, &ev("app.rolled_back"))
                .await
                .unwrap();
            let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert_eq!(seen, 1, "visible inside the transaction");
            tx.rollback().await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            let b = outrun::enqueue::<sqlx::Sqlite>(&mut tx, &ev("app.committed"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            (a, b)
        }
        Store::Postgres(_) => {
            let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            let a = outrun::enqueue::<sqlx::Postgres>(&mut tx, &ev("app.rolled_back"))
                .await
                .unwrap();
            let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert_eq!(seen, 1, "visible inside the transaction");
            tx.rollback().await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            let b = outrun::enqueue::<sqlx::Postgres>(&mut tx, &ev("app.committed"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            (a, b)
        }
    };
    assert!(
        store.get(rolled_back).await.unwrap().is_none(),
        "rolled back with the caller"
    );
    assert_eq!(
        store.get(committed).await.unwrap().unwrap().name,
        "app.committed"
    );
    assert_eq!(count(&db).await, 1);
}

async fn batch_enqueue_is_one_transaction(db: TestDb) {
    let store = db.store().await;
    let existing = store
        .enqueue(&ev("old").with_key("k-old"), 5)
        .await
        .unwrap();
    let batch = vec![
        ev("b1"),
        ev("b2").with_key("k-new"),
        ev("b3").with_key("k-old"),
        ev("b4").with_key("k-new"),
        ev("b5").with_group("g").with_delay(Duration::from_secs(60)),
    ];
    let got = store.enqueue_batch(&batch, 4).await.unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(
        got[2], existing,
        "a key that already exists maps to its event"
    );
    assert_eq!(
        got[3], got[1],
        "a key repeated within the batch maps to its first event"
    );
    assert_eq!(count(&db).await, 4, "old + b1 + b2 + b5");
    for (i, name) in [(0, "b1"), (1, "b2"), (4, "b5")] {
        let e = store.get(got[i]).await.unwrap().unwrap();
        assert_eq!((e.name.as_str(), e.max_retry), (name, 4));
    }
    assert!(
        store.get(got[4]).await.unwrap().unwrap().available_at
            > Utc::now() + chrono::Duration::seconds(30)
    );

    // One invalid event: nothing of the batch is written.
    let err = store
        .enqueue_batch(&[ev("fine"), NewEvent::new("bad", "{nope")], 5)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(InvalidEvent::PayloadNotJson(_))),
        "{err}"
    );
    assert_eq!(count(&db).await, 4);
    assert!(store.enqueue_batch(&[], 5).await.unwrap().is_empty());
}

async fn plain_sql_insert_with_name_and_payload_works(db: TestDb) {
    let store = db.store().await;
    db.exec(r#"INSERT INTO outbox_events (name, payload) VALUES ('from.sql', '{"n": 1}')"#)
        .await;
    db.exec(r#"INSERT INTO outbox_events (name, payload) VALUES ('from.sql', '[2]'), ('from.sql', '3')"#).await;
    let claimed = store.claim("w1", 10, LONG, NONE).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let payloads: Vec<&str> = claimed.iter().map(|c| c.event.payload.as_str()).collect();
    assert_eq!(
        payloads,
        [r#"{"n": 1}"#, "[2]", "3"],
        "claimed in insertion order"
    );
    let mut seen = HashSet::new();
    for c in &claimed {
        let e = &c.event;
        assert_eq!(
            e.id.get_version_num(),
            7,
            "the column default makes UUIDv7 ids: {}",
            e.id
        );
        assert!(seen.insert(e.id));
        assert_eq!(
            (e.retry, e.max_retry),
            (0, outrun::store::DEFAULT_MAX_RETRY)
        );
        assert!(
            (Utc::now() - e.create_date).num_seconds().abs() < 60,
            "create_date defaults to now"
        );
        assert!(e.available_at <= Utc::now());
        assert!(e.group_id.is_none() && e.expires_at.is_none() && e.idempotency_key.is_none());
    }
    assert_eq!(
        store
            .ack(&claimed.iter().map(Claimed::lease).collect::<Vec<_>>())
            .await
            .unwrap()
            .len(),
        3
    );
}

/// The claim reads rows its own way (on SQLite, a batch comes back as one
/// JSON document): every field must reach the handler exactly as stored.
async fn claim_hands_out_every_field_as_stored(db: TestDb) {
    let store = db.store().await;
    let payload = "{\"t\": \"é \\u00e9 \\\" \\n tab\",\t \"n\": [1.50, -0, 1e3], \"z\": null}\n";
    let id = store
        .enqueue(
            &NewEvent::new("odd.event", payload)
                .with_group("g \"1\"")
                .with_expires_in(Duration::from_secs(7200))
                .with_max_retry(9)
                .with_key("k\u{1F600}"),
            5,
        )
        .await
        .unwrap();
    let stored = store.get(id).await.unwrap().unwrap();
    let claimed = store.claim("w\"x", 5, LONG, NONE).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let e = &claimed[0].event;
    assert_eq!(e.payload, payload, "payload byte for byte");
    assert_eq!(
        (
            &e.id,
            &e.name,
            &e.group_id,
            &e.idempotency_key,
            &e.last_error
        ),
        (
            &stored.id,
            &stored.name,
            &stored.group_id,
            &stored.idempotency_key,
            &stored.last_error
        )
    );
    assert_eq!(
        (
            e.retry,
            e.max_retry,
            e.create_date,
            e.available_at,
            e.expires_at
        ),
        (
            stored.retry,
            stored.max_retry,
            stored.create_date,
            stored.available_at,
            stored.expires_at
        ),
        "the event as it was due, not as leased"
    );
    assert_eq!(e.locked_by.as_deref(), Some("w\"x"));
    let leased = store.get(id).await.unwrap().unwrap();
    assert_eq!(leased.locked_until, e.locked_until);
    assert!(leased.locked_until.unwrap() > Utc::now() + chrono::Duration::seconds(500));
}

/// PostgreSQL claims resume where the last full claim ended while there is a
/// backlog; an event that sorts before that point (here: written with a
/// past `available_at`, as a long transaction's insert would be) must still
/// be claimed once the backlog runs dry, and a rewind finds it at once.
async fn claim_finds_events_that_sort_before_earlier_claims(db: TestDb) {
    let store = db.store().await;
    let past_insert = |name: &str| {
        if db.is_postgres() {
            format!(
                "INSERT INTO outbox_events (name, payload, available_at) VALUES ('{name}', '{{}}', now() - interval '1 hour')"
            )
        } else {
            let t = Utc::now().timestamp_millis() - 3_600_000;
            format!(
                "INSERT INTO outbox_events (name, payload, available_at) VALUES ('{name}', '{{}}', {t})"
            )
        }
    };
    for i in 0..6 {
        store.enqueue(&ev(&format!("e{i}")), 5).await.unwrap();
    }
    let full = store.claim("w", 3, LONG, NONE).await.unwrap();
    assert_eq!(full.len(), 3, "a full claim: a backlog remains");
    db.exec(&past_insert("late")).await;
    let mut seen = ids(&full);
    let mut late_claimed = false;
    // Within two more claims: at most one resumes after the cursor and comes
    // back short; the next starts from the head.
    for _ in 0..2 {
        let got = store.claim("w", 10, LONG, NONE).await.unwrap();
        assert!(ids(&got).is_disjoint(&seen), "no event is handed out twice");
        late_claimed |= got.iter().any(|c| c.event.name == "late");
        seen.extend(ids(&got));
    }
    assert!(late_claimed, "the late event was never claimed");
    assert_eq!(seen.len(), 7);

    // After a rewind, the very next claim finds it, backlog or not.
    for i in 0..6 {
        store.enqueue(&ev(&format!("f{i}")), 5).await.unwrap();
    }
    assert_eq!(store.claim("w", 3, LONG, NONE).await.unwrap().len(), 3);
    db.exec(&past_insert("late2")).await;
    store.rewind_claims();
    let got = store.claim("w", 1, LONG, NONE).await.unwrap();
    assert_eq!(got[0].event.name, "late2", "oldest first after a rewind");
}

async fn claim_respects_limit_and_lease(db: TestDb) {
    let store = db.store().await;
    for i in 0..5 {
        store.enqueue(&ev(&format!("e{i}")), 5).await.unwrap();
    }
    let first = store.claim("worker-a", 3, LONG, NONE).await.unwrap();
    assert_eq!(first.len(), 3);
    let names: Vec<&str> = first.iter().map(|c| c.event.name.as_str()).collect();
    assert_eq!(names, ["e0", "e1", "e2"], "oldest first");
    for c in &first {
        assert_eq!(c.event.locked_by.as_deref(), Some("worker-a"));
        assert!(c.event.locked_until.unwrap() > Utc::now() + chrono::Duration::seconds(500));
        assert_eq!(c.token, first[0].token);
    }
    let second = store.claim("worker-b", 10, LONG, NONE).await.unwrap();
    assert_eq!(second.len(), 2, "the leased three are not handed out again");
    assert!(ids(&first).is_disjoint(&ids(&second)));
    assert_ne!(
        second[0].token, first[0].token,
        "each claim has its own fencing token"
    );
    assert!(
        store
            .claim("worker-c", 10, LONG, NONE)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .claim("worker-c", 0, LONG, NONE)
            .await
            .unwrap()
            .is_empty()
    );

    // Extending a held lease pushes locked_until.
    let leases: Vec<Lease> = first.iter().map(Claimed::lease).collect();
    assert_eq!(
        store
            .extend(&leases, Duration::from_secs(3600))
            .await
            .unwrap(),
        3
    );
    let e = store.get(first[0].event.id).await.unwrap().unwrap();
    assert!(e.locked_until.unwrap() > Utc::now() + chrono::Duration::seconds(3000));
    let acked: HashSet<Uuid> = store.ack(&leases).await.unwrap().into_iter().collect();
    assert_eq!(acked, ids(&first));
    assert_eq!(count(&db).await, 2);
}

async fn expired_lease_is_reclaimable_and_old_token_is_fenced(db: TestDb) {
    let store = db.store().await;
    let id = store.enqueue(&ev("crashy"), 5).await.unwrap();
    let old = claim_one(&store, SHORT).await;
    let new = eventually("the lapsed lease to be claimable again", WAIT, || async {
        store.claim("rescuer", 10, LONG, NONE).await.unwrap().pop()
    })
    .await;
    assert_eq!(new.event.id, id);
    assert_ne!(new.token, old.token);
    assert_eq!(new.event.locked_by.as_deref(), Some("rescuer"));
    assert_eq!(
        new.event.retry, 0,
        "a lost lease does not count as a failure"
    );

    // The first worker wakes up late: nothing it does lands.
    assert!(store.ack(&[old.lease()]).await.unwrap().is_empty());
    assert!(
        !store
            .fail(
                old.lease(),
                &Failure::Dead {
                    error: "late".into()
                }
            )
            .await
            .unwrap()
    );
    assert!(
        !store
            .fail(old.lease(), &Failure::Reschedule { at: future() })
            .await
            .unwrap()
    );
    assert_eq!(store.extend(&[old.lease()], LONG).await.unwrap(), 0);
    assert_eq!(store.release(&[old.lease()]).await.unwrap(), 0);
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!((e.retry, e.locked_by.as_deref()), (0, Some("rescuer")));
    assert!(e.last_error.is_none());

    assert_eq!(store.ack(&[new.lease()]).await.unwrap(), vec![id]);
    assert!(store.get(id).await.unwrap().is_none());
}

async fn failure_counts_retries_and_respects_backoff(db: TestDb) {
    let store = db.store().await;
    let id = store
        .enqueue(&ev("flaky").with_max_retry(2), 5)
        .await
        .unwrap();
    let c = claim_one(&store, LONG).await;
    let retry = |error: &str, retry_at| Failure::Retry {
        error: error.into(),
        retry_at,
        max_retry: None,
    };
    assert!(
        store
            .fail(c.lease(), &retry("first", past()))
            .await
            .unwrap()
    );
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!((e.retry, e.last_error.as_deref()), (1, Some("first")));
    assert!(
        e.locked_by.is_none() && e.locked_until.is_none(),
        "the lease is cleared"
    );
    assert!(
        !store
            .fail(c.lease(), &retry("again", past()))
            .await
            .unwrap(),
        "the token died with the lease"
    );

    let c = claim_one(&store, LONG).await;
    assert_eq!(c.event.attempt(), 2);
    assert!(
        store
            .fail(c.lease(), &retry("second", past()))
            .await
            .unwrap()
    );
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!((e.retry, e.max_retry), (2, 2));
    assert!(e.is_dead(), "dead once retry reaches max_retry");
    assert!(
        store.claim("w1", 10, LONG, NONE).await.unwrap().is_empty(),
        "dead events are not claimed"
    );

    // Backoff: an event failed with a future retry_at waits for it.
    let later = store.enqueue(&ev("backoff"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    let at = future();
    assert!(store.fail(c.lease(), &retry("wait", at)).await.unwrap());
    assert!(
        store.claim("w1", 10, LONG, NONE).await.unwrap().is_empty(),
        "not before retry_at"
    );
    let e = store.get(later).await.unwrap().unwrap();
    assert_eq!(e.retry, 1);
    assert_eq!(e.available_at.timestamp_millis(), at.timestamp_millis());
    assert_eq!(store.stats().await.unwrap().scheduled, 1);
}

async fn max_retry_override_applies_on_failure(db: TestDb) {
    let store = db.store().await;
    let id = store
        .enqueue(&ev("strict").with_max_retry(5), 5)
        .await
        .unwrap();
    let c = claim_one(&store, LONG).await;
    let failure = Failure::Retry {
        error: "no".into(),
        retry_at: past(),
        max_retry: Some(1),
    };
    assert!(store.fail(c.lease(), &failure).await.unwrap());
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!((e.retry, e.max_retry), (1, 1));
    assert!(e.is_dead());
}

async fn dead_failure_is_final(db: TestDb) {
    let store = db.store().await;
    let id = store
        .enqueue(&ev("poison").with_max_retry(4), 5)
        .await
        .unwrap();
    let c = claim_one(&store, LONG).await;
    assert!(
        store
            .fail(
                c.lease(),
                &Failure::Dead {
                    error: "malformed".into()
                }
            )
            .await
            .unwrap()
    );
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        (e.retry, e.max_retry, e.last_error.as_deref()),
        (4, 4, Some("malformed"))
    );
    assert!(e.locked_by.is_none() && e.locked_until.is_none());
    assert!(store.claim("w1", 10, LONG, NONE).await.unwrap().is_empty());
    assert_eq!(store.stats().await.unwrap().dead, 1);
}

async fn reschedule_keeps_retry(db: TestDb) {
    let store = db.store().await;
    let id = store.enqueue(&ev("later"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    let failure = Failure::Retry {
        error: "once".into(),
        retry_at: past(),
        max_retry: None,
    };
    assert!(store.fail(c.lease(), &failure).await.unwrap());

    let c = claim_one(&store, LONG).await;
    assert!(
        store
            .fail(c.lease(), &Failure::Reschedule { at: past() })
            .await
            .unwrap()
    );
    let c = claim_one(&store, LONG).await;
    assert_eq!(c.event.retry, 1, "a reschedule spends no retry");
    let at = future();
    assert!(
        store
            .fail(c.lease(), &Failure::Reschedule { at })
            .await
            .unwrap()
    );
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!(e.retry, 1);
    assert_eq!(
        e.last_error.as_deref(),
        Some("once"),
        "the last real error is kept"
    );
    assert_eq!(e.available_at.timestamp_millis(), at.timestamp_millis());
    assert!(e.locked_by.is_none());
    assert_eq!(e.deferrals, 2, "each reschedule is counted");
    assert!(e.dead_at.is_none());
    assert!(
        store.claim("w1", 10, LONG, NONE).await.unwrap().is_empty(),
        "not before the new time"
    );
}

async fn group_runs_one_event_at_a_time_in_order(db: TestDb) {
    let store = db.store().await;
    let mut id = std::collections::HashMap::new();
    for (name, group) in [
        ("a1", "A"),
        ("a2", "A"),
        ("b1", "B"),
        ("b2", "B"),
        ("c1", "C"),
        ("c2", "C"),
        ("d1", "D"),
        ("d2", "D"),
    ] {
        id.insert(
            name,
            store.enqueue(&ev(name).with_group(group), 5).await.unwrap(),
        );
    }
    let solo = store.enqueue(&ev("solo"), 5).await.unwrap();
    // c1 stays pending (skipped), and a pending head blocks its group too.
    let skip = vec!["c1".to_string()];
    let first = store.claim("w1", 100, LONG, &skip).await.unwrap();
    assert_eq!(
        ids(&first),
        HashSet::from([id["a1"], id["b1"], id["d1"], solo]),
        "only group heads"
    );
    assert!(
        store
            .claim("w1", 100, LONG, &skip)
            .await
            .unwrap()
            .is_empty(),
        "leased heads block their groups"
    );

    let lease = |name: &str| {
        first
            .iter()
            .find(|c| c.event.id == id[name])
            .unwrap()
            .lease()
    };
    // A: head acknowledged (deleted). B: head backing off. D: head dead.
    assert_eq!(store.ack(&[lease("a1")]).await.unwrap().len(), 1);
    let backoff = Failure::Retry {
        error: "later".into(),
        retry_at: future(),
        max_retry: None,
    };
    assert!(store.fail(lease("b1"), &backoff).await.unwrap());
    assert!(
        store
            .fail(lease("d1"), &Failure::Dead { error: "x".into() })
            .await
            .unwrap()
    );

    let second = store.claim("w1", 100, LONG, &skip).await.unwrap();
    assert_eq!(
        ids(&second),
        HashSet::from([id["a2"], id["d2"]]),
        "deleted and dead heads unblock; a head scheduled for retry still blocks"
    );
    let third = store.claim("w1", 100, LONG, NONE).await.unwrap();
    assert_eq!(
        ids(&third),
        HashSet::from([id["c1"]]),
        "c2 waits behind c1 once c1 is claimed too"
    );
}

async fn skip_names_are_left_alone(db: TestDb) {
    let store = db.store().await;
    let x = store.enqueue(&ev("busy.handler"), 5).await.unwrap();
    let y = store.enqueue(&ev("free.handler"), 5).await.unwrap();
    let z = store.enqueue(&ev("other.busy"), 5).await.unwrap();
    let skip = vec!["busy.handler".to_string(), "other.busy".to_string()];
    let got = store.claim("w1", 10, LONG, &skip).await.unwrap();
    assert_eq!(ids(&got), HashSet::from([y]));
    let rest = store.claim("w1", 10, LONG, NONE).await.unwrap();
    assert_eq!(ids(&rest), HashSet::from([x, z]));
}

async fn release_gives_events_back(db: TestDb) {
    let store = db.store().await;
    let id = store.enqueue(&ev("unstarted"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    assert_eq!(store.release(&[c.lease()]).await.unwrap(), 1);
    let e = store.get(id).await.unwrap().unwrap();
    assert!(e.locked_by.is_none() && e.locked_until.is_none());
    assert_eq!(e.retry, 0);
    let again = claim_one(&store, LONG).await;
    assert_eq!(again.event.id, id);
    assert_eq!(
        store.release(&[c.lease()]).await.unwrap(),
        0,
        "the old token is fenced"
    );
}

async fn expire_due_kills_unstarted_expired_events(db: TestDb) {
    let store = db.store().await;
    let doomed = store
        .enqueue(&ev("doomed").with_expires_in(Duration::from_millis(1)), 5)
        .await
        .unwrap();
    let running = store
        .enqueue(
            &ev("running").with_expires_in(Duration::from_millis(300)),
            5,
        )
        .await
        .unwrap();
    let fine = store
        .enqueue(&ev("fine").with_expires_in(Duration::from_secs(3600)), 5)
        .await
        .unwrap();
    let forever = store.enqueue(&ev("forever"), 5).await.unwrap();
    let c = store
        .claim(
            "w1",
            10,
            LONG,
            &[
                "doomed".to_string(),
                "fine".to_string(),
                "forever".to_string(),
            ],
        )
        .await;
    assert_eq!(ids(&c.unwrap()), HashSet::from([running]));

    // Wait until both short expiries have passed on the clock.
    let running_expiry = store
        .get(running)
        .await
        .unwrap()
        .unwrap()
        .expires_at
        .unwrap();
    eventually("the short expiries to pass", WAIT, || async {
        (Utc::now() > running_expiry + chrono::Duration::milliseconds(20)).then_some(())
    })
    .await;
    let claimable = store
        .claim("w2", 10, LONG, &["fine".to_string(), "forever".to_string()])
        .await
        .unwrap();
    assert!(
        claimable.is_empty(),
        "an expired event is not claimed: {claimable:?}"
    );

    assert_eq!(
        store.expire_due(100).await.unwrap(),
        1,
        "only the unstarted one"
    );
    let e = store.get(doomed).await.unwrap().unwrap();
    assert!(e.is_dead());
    assert_eq!(e.last_error.as_deref(), Some("expired"));
    assert!(
        !store.get(running).await.unwrap().unwrap().is_dead(),
        "a leased event finishes"
    );
    assert!(!store.get(fine).await.unwrap().unwrap().is_dead());
    assert!(!store.get(forever).await.unwrap().unwrap().is_dead());
    assert_eq!(store.expire_due(100).await.unwrap(), 0);
}

async fn cleanup_dead_leaves_live_events_alone(db: TestDb) {
    let store = db.store().await;
    insert_dead(&db, "d1").await;
    insert_dead(&db, "d2").await;
    insert_dead(&db, "d3").await;
    store.enqueue(&ev("live"), 5).await.unwrap();
    let leased = store.enqueue(&ev("leased"), 5).await.unwrap();
    store
        .claim("w1", 1, LONG, &["live".to_string()])
        .await
        .unwrap();
    assert_eq!(
        store
            .cleanup_dead(past() - chrono::Duration::hours(1), 100)
            .await
            .unwrap(),
        0,
        "all too young"
    );
    let before = Utc::now() + chrono::Duration::seconds(5);
    assert_eq!(
        store.cleanup_dead(before, 2).await.unwrap(),
        2,
        "bounded batch"
    );
    assert_eq!(store.cleanup_dead(before, 2).await.unwrap(), 1);
    assert_eq!(store.cleanup_dead(before, 2).await.unwrap(), 0);
    assert_eq!(count(&db).await, 2);
    assert!(store.get(leased).await.unwrap().is_some());
}

async fn replay_revives_dead_events_only(db: TestDb) {
    let store = db.store().await;
    let id = store
        .enqueue(&ev("poison").with_expires_in(Duration::from_secs(3600)), 5)
        .await
        .unwrap();
    let c = claim_one(&store, LONG).await;
    store
        .fail(
            c.lease(),
            &Failure::Dead {
                error: "bad".into(),
            },
        )
        .await
        .unwrap();

    let live = store.enqueue(&ev("live"), 5).await.unwrap();
    let before = store.get(live).await.unwrap().unwrap();
    let err = store.replay(live).await.unwrap_err();
    assert!(matches!(err, StoreError::NotDead(x) if x == live), "{err}");
    assert_eq!(
        store.get(live).await.unwrap().unwrap(),
        before,
        "nothing changed"
    );
    let unknown = Uuid::now_v7();
    let err = store.replay(unknown).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(x) if x == unknown),
        "{err}"
    );
    assert!(err.to_string().contains(&unknown.to_string()));

    store.replay(id).await.unwrap();
    let e = store.get(id).await.unwrap().unwrap();
    assert_eq!(e.retry, 0);
    assert!(!e.is_dead());
    assert_eq!(e.last_error.as_deref(), Some("bad"), "kept for the record");
    assert!(
        e.expires_at.is_none(),
        "a replayed event does not expire again at once"
    );
    let got = store
        .claim("w1", 10, LONG, &["live".to_string()])
        .await
        .unwrap();
    assert_eq!(ids(&got), HashSet::from([id]));
}

async fn replay_all_and_purge(db: TestDb) {
    let store = db.store().await;
    for name in ["d1", "d2", "d3"] {
        insert_dead(&db, name).await;
    }
    store.enqueue(&ev("live"), 5).await.unwrap();
    assert_eq!(store.replay_all_dead().await.unwrap(), 3);
    assert_eq!(store.stats().await.unwrap().dead, 0);
    assert_eq!(store.replay_all_dead().await.unwrap(), 0);

    insert_dead(&db, "d4").await;
    insert_dead(&db, "d5").await;
    assert_eq!(
        store
            .purge_dead(Some(past() - chrono::Duration::hours(1)))
            .await
            .unwrap(),
        0,
        "too young"
    );
    assert_eq!(store.purge_dead(None).await.unwrap(), 2);
    assert_eq!(count(&db).await, 4, "live events stay");
}

async fn stats_count_by_state(db: TestDb) {
    let store = db.store().await;
    assert_eq!(store.stats().await.unwrap(), Default::default());
    // A ready event that has waited a minute.
    if db.is_postgres() {
        db.exec("INSERT INTO outbox_events (name, payload, available_at) VALUES ('old', '{}', now() - interval '60 seconds')")
            .await;
    } else {
        let t = Utc::now().timestamp_millis() - 60_000;
        db.exec(&format!(
            "INSERT INTO outbox_events (name, payload, available_at) VALUES ('old', '{{}}', {t})"
        ))
        .await;
    }
    store.enqueue(&ev("ready"), 5).await.unwrap();
    store
        .enqueue(&ev("delayed").with_delay(Duration::from_secs(3600)), 5)
        .await
        .unwrap();
    store.enqueue(&ev("running"), 5).await.unwrap();
    store
        .claim("w1", 1, LONG, &["old".to_string(), "ready".to_string()])
        .await
        .unwrap();
    insert_dead(&db, "dead").await;
    let s = store.stats().await.unwrap();
    assert_eq!(
        (s.pending, s.scheduled, s.running, s.dead),
        (2, 1, 1, 1),
        "{s:?}"
    );
    assert!(
        s.oldest_pending_age_secs >= 59.0 && s.oldest_pending_age_secs < 3600.0,
        "{s:?}"
    );
}

async fn list_filters_and_orders(db: TestDb) {
    let store = db.store().await;
    let a = store.enqueue(&ev("alpha"), 5).await.unwrap();
    let b = store.enqueue(&ev("beta"), 5).await.unwrap();
    let c = store.enqueue(&ev("alpha"), 5).await.unwrap();
    insert_dead(&db, "alpha").await;
    let live = store.list(&ListFilter::default()).await.unwrap();
    assert_eq!(
        live.iter().map(|e| e.id).collect::<Vec<_>>(),
        [a, b, c],
        "live, oldest first"
    );
    let alpha = store
        .list(&ListFilter {
            name: Some("alpha".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(alpha.iter().map(|e| e.id).collect::<Vec<_>>(), [a, c]);
    let one = store
        .list(&ListFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(one.iter().map(|e| e.id).collect::<Vec<_>>(), [a]);
    let dead = store
        .list(&ListFilter {
            dead: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].is_dead() && dead[0].name == "alpha");
    assert_eq!(dead[0].last_error.as_deref(), Some("boom"));
    let none = store
        .list(&ListFilter {
            dead: true,
            name: Some("beta".into()),
            limit: 10,
        })
        .await
        .unwrap();
    assert!(none.is_empty());
}

async fn ack_tx_commits_handler_writes_emits_and_ack(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE app_notes (id INTEGER, body TEXT)")
        .await;
    let id = store.enqueue(&ev("note.add"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    let mut tx = store.begin().await.unwrap();
    let n = tx
        .execute(
            "INSERT INTO app_notes (id, body) VALUES ($1, $2)",
            &[SqlValue::Int(1), SqlValue::Text("hi".into())],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let rows = tx
        .query(
            "SELECT id, body FROM app_notes WHERE id = $1",
            &[SqlValue::Int(1)],
        )
        .await
        .unwrap();
    assert_eq!(rows.columns, ["id", "body"]);
    assert_eq!(rows.rows, [[SqlValue::Int(1), SqlValue::Text("hi".into())]]);
    let emitted = tx
        .enqueue_all(&[ev("note.added"), ev("note.indexed").with_key("idx-1")], 3)
        .await
        .unwrap();
    assert_eq!(emitted.len(), 2);
    assert!(tx.commit_ack(c.lease()).await.unwrap());

    assert!(
        store.get(id).await.unwrap().is_none(),
        "the handled event is gone"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM app_notes").await, 1);
    let follow = store
        .get(emitted[0])
        .await
        .unwrap()
        .expect("emitted event committed");
    assert_eq!((follow.name.as_str(), follow.max_retry), ("note.added", 3));
    assert!(store.get(emitted[1]).await.unwrap().is_some());
}

async fn ack_tx_with_stale_token_rolls_everything_back(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE app_notes (id INTEGER, body TEXT)")
        .await;
    let id = store.enqueue(&ev("note.add"), 5).await.unwrap();
    let old = claim_one(&store, SHORT).await;
    let new = eventually(
        "another worker to take over the lapsed lease",
        WAIT,
        || async { store.claim("w2", 10, LONG, NONE).await.unwrap().pop() },
    )
    .await;
    let mut tx = store.begin().await.unwrap();
    tx.execute(
        "INSERT INTO app_notes (id, body) VALUES ($1, $2)",
        &[SqlValue::Int(1), SqlValue::Text("dup".into())],
    )
    .await
    .unwrap();
    let emitted = tx.enqueue_all(&[ev("note.added")], 5).await.unwrap();
    assert!(
        !tx.commit_ack(old.lease()).await.unwrap(),
        "the lease was lost"
    );

    assert_eq!(
        db.scalar("SELECT count(*) FROM app_notes").await,
        0,
        "the handler's write was rolled back"
    );
    assert!(
        store.get(emitted[0]).await.unwrap().is_none(),
        "the emitted event was rolled back"
    );
    let e = store
        .get(id)
        .await
        .unwrap()
        .expect("the event stays for its new owner");
    assert_eq!(e.locked_by.as_deref(), Some("w2"));

    // An explicit rollback leaves nothing either, and the new owner acks.
    let mut tx = store.begin().await.unwrap();
    tx.execute(
        "INSERT INTO app_notes (id, body) VALUES ($1, $2)",
        &[SqlValue::Int(2), SqlValue::Null],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(db.scalar("SELECT count(*) FROM app_notes").await, 0);
    let tx = store.begin().await.unwrap();
    assert!(tx.commit_ack(new.lease()).await.unwrap());
    assert!(store.get(id).await.unwrap().is_none());
}

async fn sql_capability_values_round_trip(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE app_kinds (i INTEGER, f DOUBLE PRECISION, t TEXT, b BOOLEAN, x BYTEA_OR_BLOB)".replace(
        "BYTEA_OR_BLOB",
        if db.is_postgres() { "BYTEA" } else { "BLOB" },
    ).as_str())
    .await;
    let mut tx = store.begin().await.unwrap();
    let params = [
        SqlValue::Int(-7),
        SqlValue::Float(2.5),
        SqlValue::Text("héllo".into()),
        SqlValue::Bool(true),
        SqlValue::Blob(vec![0, 159, 255]),
    ];
    tx.execute(
        "INSERT INTO app_kinds (i, f, t, b, x) VALUES ($1, $2, $3, $4, $5)",
        &params,
    )
    .await
    .unwrap();
    // NULL binds into any column type.
    let nulls = [
        SqlValue::Null,
        SqlValue::Null,
        SqlValue::Null,
        SqlValue::Null,
        SqlValue::Null,
    ];
    tx.execute(
        "INSERT INTO app_kinds (i, f, t, b, x) VALUES ($1, $2, $3, $4, $5)",
        &nulls,
    )
    .await
    .unwrap();
    let rows = tx
        .query(
            "SELECT i, f, t, b, x FROM app_kinds ORDER BY i NULLS LAST",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.columns, ["i", "f", "t", "b", "x"]);
    // SQLite has no boolean storage class: a BOOLEAN column reads as 0/1.
    let b = if db.is_postgres() {
        SqlValue::Bool(true)
    } else {
        SqlValue::Int(1)
    };
    assert_eq!(
        rows.rows[0],
        [
            params[0].clone(),
            params[1].clone(),
            params[2].clone(),
            b,
            params[4].clone()
        ]
    );
    assert_eq!(rows.rows[1], nulls);

    // No rows: the column names are still there.
    let empty = tx
        .query(
            "SELECT i AS first, t AS second FROM app_kinds WHERE i = $1",
            &[SqlValue::Int(99)],
        )
        .await
        .unwrap();
    assert_eq!(empty.columns, ["first", "second"]);
    assert!(empty.rows.is_empty());

    if db.is_postgres() {
        let rows = tx
            .query(
                "SELECT x::numeric AS n, x::numeric::text AS n_text FROM (VALUES ('12345.6789'), ('-0.0012'),
                 ('0.00000001'), ('1000000'), ('0'), ('NaN'), ('98765432109876543210.5')) AS v(x)",
                &[],
            )
            .await
            .unwrap();
        for row in &rows.rows {
            assert_eq!(row[0], row[1], "NUMERIC renders as PostgreSQL prints it");
        }
        let rows = tx
            .query(
                "SELECT '{\"a\": [1, 2]}'::jsonb AS jb, '{\"a\" : 1}'::json AS j, $1::uuid AS u,
                        '2026-01-02T03:04:05.123Z'::timestamptz AS ts, 3::int2 AS small, 1.5::float4 AS f4,
                        'c'::char(3) AS ch, '2026-01-02'::date AS d",
                &[SqlValue::Text("0191e0b2-57a0-7000-8000-000000000001".into())],
            )
            .await
            .unwrap();
        assert_eq!(
            rows.rows[0],
            [
                SqlValue::Text(r#"{"a": [1, 2]}"#.into()),
                SqlValue::Text(r#"{"a" : 1}"#.into()),
                SqlValue::Text("0191e0b2-57a0-7000-8000-000000000001".into()),
                SqlValue::Text("2026-01-02T03:04:05.123+00:00".into()),
                SqlValue::Int(3),
                SqlValue::Float(1.5),
                SqlValue::Text("c  ".into()),
                SqlValue::Text("2026-01-02".into()),
            ]
        );
        let err = tx
            .query("SELECT '1 day'::interval AS span", &[])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::UnsupportedColumn { column, .. } if column == "span"),
            "{err}"
        );
        assert!(
            err.to_string().contains("span::text"),
            "the error suggests the fix: {err}"
        );
    }
    tx.rollback().await.unwrap();
}

async fn bad_input_writes_nothing(db: TestDb) {
    let store = db.store().await;
    let bad = [
        NewEvent::new("x", "{not json"),
        NewEvent::new("x", ""),
        NewEvent::new("", "{}"),
        NewEvent::new("   ", "{}"),
        NewEvent::new("n".repeat(101), "{}"),
        ev("x").with_group("g".repeat(101)),
        ev("x").with_max_retry(0),
        ev("x").with_max_retry(40_000),
        ev("x").with_key(""),
    ];
    for e in &bad {
        let err = store.enqueue(e, 5).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{e:?} -> {err}");
        let err = store
            .enqueue_batch(std::slice::from_ref(e), 5)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{e:?} -> {err}");
    }
    let err = store
        .enqueue(&NewEvent::new("n".repeat(101), "{}"), 5)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("101") && err.to_string().contains("100"),
        "{err}"
    );
    assert!(matches!(
        store.enqueue(&ev("x"), 0).await,
        Err(StoreError::Invalid(InvalidEvent::MaxRetry(0)))
    ));
    assert!(
        store
            .enqueue(&NewEvent::new("n".repeat(100), "{}"), 5)
            .await
            .is_ok(),
        "100 characters is fine"
    );
    assert_eq!(count(&db).await, 1);

    // The table itself refuses what validation would: other languages insert directly.
    for sql in [
        "INSERT INTO outbox_events (name, payload) VALUES ('x', '{not json')",
        "INSERT INTO outbox_events (name, payload) VALUES ('', '{}')",
        "INSERT INTO outbox_events (name) VALUES ('x')",
    ] {
        let result = match &store {
            Store::Sqlite(s) => sqlx::query(sql).execute(s.pool()).await.map(|_| ()),
            Store::Postgres(s) => sqlx::query(sql).execute(s.pool()).await.map(|_| ()),
        };
        assert!(result.is_err(), "{sql} was accepted");
    }
    assert_eq!(count(&db).await, 1);
}

async fn wakeups_fire_on_enqueue_and_replay(db: TestDb) {
    let store = db.store().await;
    let mut wake = store.wakeups().await.unwrap();
    if db.is_postgres() {
        // Any writer wakes the runtime: a plain INSERT on another connection.
        db.exec("INSERT INTO outbox_events (name, payload) VALUES ('from.elsewhere', '{}')")
            .await;
    } else {
        store.enqueue(&ev("local"), 5).await.unwrap();
    }
    tokio::time::timeout(WAIT, wake.next())
        .await
        .expect("a wake-up after the enqueue")
        .unwrap();

    let id = store.enqueue(&ev("dies"), 5).await.unwrap();
    tokio::time::timeout(WAIT, wake.next())
        .await
        .expect("a wake-up after the second enqueue")
        .unwrap();
    let c = store.claim("w1", 10, LONG, NONE).await.unwrap();
    let lease = c.iter().find(|c| c.event.id == id).unwrap().lease();
    store
        .fail(lease, &Failure::Dead { error: "x".into() })
        .await
        .unwrap();
    store.replay(id).await.unwrap();
    tokio::time::timeout(WAIT, wake.next())
        .await
        .expect("a wake-up after the replay")
        .unwrap();
}

async fn migrate_is_idempotent(db: TestDb) {
    let store = db.store().await;
    store.enqueue(&ev("kept"), 5).await.unwrap();
    store.migrate().await.unwrap();
    db.store().await;
    assert_eq!(count(&db).await, 1);
}

/// Two runtimes starting at once on one PostgreSQL database both migrate;
/// outrun's advisory lock makes one wait for the other. The history is in
/// outrun's own table; `_sqlx_migrations` is the application's and outrun
/// does not create it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_migrations_are_safe() {
    let db = TestDb::postgres().await;
    let stores: Vec<Store> = futures::future::join_all((0..4).map(|_| db.connect())).await;
    let results = futures::future::join_all(stores.iter().map(|s| s.migrate())).await;
    for r in results {
        r.expect("every concurrent migrate succeeds");
    }
    let embedded = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../migrations/postgres"
    ))
    .unwrap()
    .count() as i64;
    assert_eq!(
        db.scalar("SELECT count(*) FROM outrun_migrations").await,
        embedded,
        "each migration applied once"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_tables WHERE tablename = '_sqlx_migrations'")
            .await,
        0
    );
    stores[0].enqueue(&ev("after"), 5).await.unwrap();
}

/// The concurrency a shared PostgreSQL sees: claimers racing never get the
/// same event twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_claims_are_disjoint() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    let batch: Vec<NewEvent> = (0..200).map(|i| ev(&format!("e{i}"))).collect();
    store.enqueue_batch(&batch, 5).await.unwrap();
    let tasks: Vec<_> = (0..6)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = store.claim(&format!("w{w}"), 7, LONG, NONE).await.unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.into_iter().map(|c| c.event.id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 200);
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        200,
        "no event was claimed twice"
    );
}

#[tokio::test]
async fn connect_errors_name_the_url_without_the_password() {
    // sqlx retries a refused connection until the acquire timeout.
    let quick = ConnectOptions {
        acquire_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let err = Store::connect("postgres://app:s3cret@127.0.0.1:1/outbox", &quick)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Connect { .. }), "{msg}");
    assert!(
        msg.contains("127.0.0.1:1") && !msg.contains("s3cret") && msg.contains("***"),
        "{msg}"
    );
    let err = Store::connect("mysql://localhost/x", &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedUrl(_)), "{err}");
    let err = Store::connect(
        "sqlite:///nonexistent-dir-outrun/sub/x.db",
        &ConnectOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Connect { .. }), "{err}");
}

#[tokio::test]
async fn sqlite_store_uses_wal_and_rejects_non_canonical_ids() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    let Store::Sqlite(s) = &store else {
        unreachable!()
    };
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert!(timeout >= 30_000, "busy_timeout {timeout} ms");
    // Ids are matched as text: an upper-case id could never be acknowledged,
    // so the table refuses it at INSERT.
    let upper = "INSERT INTO outbox_events (id, name, payload) \
                 VALUES ('0191E0B2-57A0-7000-8000-000000000001', 'x', '{}')";
    assert!(sqlx::query(upper).execute(s.pool()).await.is_err());
    let text_time =
        "INSERT INTO outbox_events (name, payload, available_at) VALUES ('x', '{}', '2026-01-01')";
    assert!(sqlx::query(text_time).execute(s.pool()).await.is_err());
    assert_eq!(count(&db).await, 0);
}

#[tokio::test]
async fn sqlite_in_memory_store_works() {
    let store = Store::connect("sqlite::memory:", &ConnectOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let id = store.enqueue(&ev("mem"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    assert_eq!(store.ack(&[c.lease()]).await.unwrap(), vec![id]);
}

/// Move a timestamp column of one row `secs` into the past.
async fn age(db: &TestDb, id: Uuid, column: &str, secs: i64) {
    let sql = if db.is_postgres() {
        format!(
            "UPDATE outbox_events SET {column} = {column} - interval '{secs} seconds' WHERE id = '{id}'"
        )
    } else {
        format!(
            "UPDATE outbox_events SET {column} = {column} - {} WHERE id = '{id}'",
            secs * 1000
        )
    };
    assert_eq!(db.exec(&sql).await, 1, "{sql}");
}

fn recent(t: Option<chrono::DateTime<Utc>>) -> bool {
    t.is_some_and(|t| (Utc::now() - t).num_seconds().abs() < 30)
}

/// Every way into death sets `dead_at`; a failure that leaves the event
/// live does not; replay clears it.
async fn every_death_records_dead_at(db: TestDb) {
    let store = db.store().await;
    // Retries exhausted (max_retry 2: the first failure leaves it live).
    let tired = store
        .enqueue(&ev("tired").with_max_retry(2), 5)
        .await
        .unwrap();
    let retry = || Failure::Retry {
        error: "503".into(),
        retry_at: past(),
        max_retry: None,
    };
    let c = claim_one(&store, LONG).await;
    assert!(store.fail(c.lease(), &retry()).await.unwrap());
    assert_eq!(store.get(tired).await.unwrap().unwrap().dead_at, None);
    let c = claim_one(&store, LONG).await;
    assert!(store.fail(c.lease(), &retry()).await.unwrap());
    let e = store.get(tired).await.unwrap().unwrap();
    assert!(e.is_dead() && recent(e.dead_at), "{e:?}");

    // Exhausted through the handler's max_retry override.
    let over = store.enqueue(&ev("override"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    let f = Failure::Retry {
        error: "503".into(),
        retry_at: past(),
        max_retry: Some(1),
    };
    assert!(store.fail(c.lease(), &f).await.unwrap());
    let e = store.get(over).await.unwrap().unwrap();
    assert!(e.is_dead() && recent(e.dead_at), "{e:?}");

    // Rejected, and no handler (both Failure::Dead).
    let rejected = store.enqueue(&ev("rejected"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    let f = Failure::Dead {
        error: "no handler for event 'rejected'".into(),
    };
    assert!(store.fail(c.lease(), &f).await.unwrap());
    assert!(recent(store.get(rejected).await.unwrap().unwrap().dead_at));

    // Interrupted and rescheduled events stay live without a dead_at.
    let live = store.enqueue(&ev("live"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    let f = Failure::Interrupted {
        error: "connection reset".into(),
        retry_at: past(),
    };
    assert!(store.fail(c.lease(), &f).await.unwrap());
    let c = claim_one(&store, LONG).await;
    assert!(
        store
            .fail(c.lease(), &Failure::Reschedule { at: future() })
            .await
            .unwrap()
    );
    let e = store.get(live).await.unwrap().unwrap();
    assert!(
        !e.is_dead() && e.dead_at.is_none() && e.deferrals == 1,
        "{e:?}"
    );

    // Expired.
    let expired = store
        .enqueue(&ev("expired").with_expires_in(Duration::from_millis(1)), 5)
        .await
        .unwrap();
    eventually("the expiry to pass", WAIT, || async {
        (store.expire_due(10).await.unwrap() == 1).then_some(())
    })
    .await;
    let e = store.get(expired).await.unwrap().unwrap();
    assert!(e.is_dead() && recent(e.dead_at), "{e:?}");

    // Replay clears it.
    store.replay(tired).await.unwrap();
    let e = store.get(tired).await.unwrap().unwrap();
    assert!(!e.is_dead() && e.dead_at.is_none(), "{e:?}");
    assert_eq!(store.replay_all_dead().await.unwrap(), 3);
    assert!(
        store
            .list(&ListFilter::default())
            .await
            .unwrap()
            .iter()
            .all(|e| e.dead_at.is_none())
    );
}

/// Retention counts from the moment an event died: one created long ago
/// that dies now is kept, one that died 31 s ago is not; rows that died
/// before `dead_at` existed count from `create_date`.
async fn retention_counts_from_dead_at(db: TestDb) {
    let store = db.store().await;
    let kill = |name: &'static str| {
        let store = store.clone();
        async move {
            let id = store.enqueue(&ev(name), 5).await.unwrap();
            let c = claim_one(&store, LONG).await;
            let f = Failure::Dead {
                error: "rejected".into(),
            };
            assert!(store.fail(c.lease(), &f).await.unwrap());
            id
        }
    };
    let old_dies_now = store.enqueue(&ev("old"), 5).await.unwrap();
    age(&db, old_dies_now, "create_date", 86_400).await;
    let c = claim_one(&store, LONG).await;
    assert_eq!(c.event.id, old_dies_now);
    let f = Failure::Dead {
        error: "rejected".into(),
    };
    assert!(store.fail(c.lease(), &f).await.unwrap());
    let died_31s_ago = kill("gone").await;
    age(&db, died_31s_ago, "dead_at", 31).await;
    // Dead rows without dead_at, as before the migration (or by hand).
    insert_dead(&db, "legacy_old").await;
    insert_dead(&db, "legacy_young").await;
    let legacy = |name: &str| {
        let name = name.to_string();
        let store = store.clone();
        async move {
            let dead = ListFilter {
                dead: true,
                name: Some(name),
                limit: 0,
            };
            store.list(&dead).await.unwrap().pop().map(|e| e.id)
        }
    };
    let legacy_old = legacy("legacy_old").await.unwrap();
    age(&db, legacy_old, "create_date", 86_400).await;
    let live = store
        .enqueue(&ev("live").with_delay(Duration::from_secs(3600)), 5)
        .await
        .unwrap();
    age(&db, live, "create_date", 86_400).await;

    let deleted = outrun::maintenance::cleaner::run_once(&store, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    assert!(
        store.get(old_dies_now).await.unwrap().is_some(),
        "created a day ago but dead only now: kept"
    );
    assert!(store.get(died_31s_ago).await.unwrap().is_none());
    assert!(
        legacy("legacy_old").await.is_none(),
        "no dead_at: create_date counts"
    );
    assert!(legacy("legacy_young").await.is_some());
    assert!(store.get(live).await.unwrap().is_some(), "live events stay");

    // `events purge --older-than` counts the same way.
    let thirty_s_ago = Utc::now() - chrono::Duration::seconds(30);
    assert_eq!(store.purge_dead(Some(thirty_s_ago)).await.unwrap(), 0);
    age(&db, old_dies_now, "dead_at", 31).await;
    assert_eq!(store.purge_dead(Some(thirty_s_ago)).await.unwrap(), 1);
    assert!(store.get(old_dies_now).await.unwrap().is_none());

    // Replay clears dead_at: dying again starts the retention afresh.
    let again = kill("again").await;
    age(&db, again, "dead_at", 31).await;
    store.replay(again).await.unwrap();
    assert_eq!(store.get(again).await.unwrap().unwrap().dead_at, None);
    let c = claim_one(&store, LONG).await;
    assert_eq!(c.event.id, again);
    assert!(store.fail(c.lease(), &f).await.unwrap());
    assert_eq!(
        outrun::maintenance::cleaner::run_once(&store, Duration::from_secs(30))
            .await
            .unwrap(),
        0
    );
    assert!(store.get(again).await.unwrap().is_some());
}

async fn cancel_pending_makes_it_dead_and_replayable(db: TestDb) {
    let store = db.store().await;
    let id = store.enqueue(&ev("job").with_group("g"), 5).await.unwrap();
    let next = store.enqueue(&ev("job").with_group("g"), 5).await.unwrap();
    let done = store.cancel(id).await.unwrap();
    assert_eq!((done.cancelled, done.running, done.busy), (1, 0, 0));
    let e = store.get(id).await.unwrap().unwrap();
    assert!(e.is_dead(), "{e:?}");
    assert_eq!(e.last_error.as_deref(), Some("cancelled"));
    assert!(recent(e.dead_at));
    assert_eq!(store.stats().await.unwrap().dead, 1);
    // A cancelled head no longer holds back its group.
    let c = claim_one(&store, LONG).await;
    assert_eq!(c.event.id, next);
    store.release(&[c.lease()]).await.unwrap();
    // Replayable like any dead event.
    store.replay(id).await.unwrap();
    let e = store.get(id).await.unwrap().unwrap();
    assert!(!e.is_dead() && e.dead_at.is_none() && e.retry == 0, "{e:?}");
}

async fn cancel_by_name_and_group_hits_only_those(db: TestDb) {
    let store = db.store().await;
    let a1 = store.enqueue(&ev("job").with_group("a"), 5).await.unwrap();
    let a2 = store.enqueue(&ev("job").with_group("a"), 5).await.unwrap();
    let b = store.enqueue(&ev("job").with_group("b"), 5).await.unwrap();
    let plain = store.enqueue(&ev("job"), 5).await.unwrap();
    let other = store
        .enqueue(&ev("other").with_group("a"), 5)
        .await
        .unwrap();
    let done = store.cancel_matching("job", Some("a")).await.unwrap();
    assert_eq!((done.cancelled, done.running, done.busy), (2, 0, 0));
    let dead = |id| {
        let store = store.clone();
        async move { store.get(id).await.unwrap().unwrap().is_dead() }
    };
    assert!(dead(a1).await && dead(a2).await);
    assert!(!dead(b).await && !dead(plain).await && !dead(other).await);
    // Without a group: every live event of the name; dead ones are not
    // counted again.
    let done = store.cancel_matching("job", None).await.unwrap();
    assert_eq!(done.cancelled, 2);
    assert!(dead(b).await && dead(plain).await && !dead(other).await);
    assert_eq!(
        store.cancel_matching("job", None).await.unwrap(),
        outrun::store::Cancelled::default()
    );
    assert_eq!(
        store
            .cancel_matching("nobody", None)
            .await
            .unwrap()
            .cancelled,
        0
    );
}

/// A leased event is cancelled at once; whatever its attempt then reports
/// (success, failure, deferral, an interruption) finds the lease gone and
/// changes nothing, and its effects are rolled back.
async fn cancel_of_a_running_event_fences_its_verdict(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE app_notes (id INTEGER)").await;
    let id = store.enqueue(&ev("job"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    let done = store.cancel(id).await.unwrap();
    assert_eq!((done.cancelled, done.running), (1, 1));
    let e = store.get(id).await.unwrap().unwrap();
    assert!(e.is_dead() && e.locked_by.is_none() && e.locked_until.is_none());
    assert_eq!(store.stats().await.unwrap().running, 0);

    assert!(store.ack(&[c.lease()]).await.unwrap().is_empty());
    for f in [
        Failure::Retry {
            error: "503".into(),
            retry_at: past(),
            max_retry: None,
        },
        Failure::Dead {
            error: "rejected".into(),
        },
        Failure::Reschedule { at: past() },
        Failure::Interrupted {
            error: "reset".into(),
            retry_at: past(),
        },
    ] {
        assert!(!store.fail(c.lease(), &f).await.unwrap(), "{f:?}");
    }
    let mut tx = store.begin().await.unwrap();
    tx.execute(
        "INSERT INTO app_notes (id) VALUES ($1)",
        &[SqlValue::Int(1)],
    )
    .await
    .unwrap();
    assert!(!tx.commit_ack(c.lease()).await.unwrap());
    assert_eq!(db.scalar("SELECT count(*) FROM app_notes").await, 0);
    let e = store.get(id).await.unwrap().unwrap();
    assert!(e.is_dead(), "{e:?}");
    assert_eq!(
        (e.last_error.as_deref(), e.deferrals),
        (Some("cancelled"), 0)
    );
    assert!(store.claim("w2", 10, LONG, NONE).await.unwrap().is_empty());
}

/// The table is a public contract: an application may mark an event dead
/// with plain SQL while it runs, lease and all. No verdict deletes it as
/// handled or brings it back.
async fn verdicts_never_touch_a_row_marked_dead(db: TestDb) {
    let store = db.store().await;
    let id = store.enqueue(&ev("job"), 5).await.unwrap();
    let c = claim_one(&store, LONG).await;
    db.exec("UPDATE outbox_events SET retry = max_retry, last_error = 'stopped by hand'")
        .await;
    assert!(store.ack(&[c.lease()]).await.unwrap().is_empty());
    let f = Failure::Interrupted {
        error: "reset".into(),
        retry_at: past(),
    };
    assert!(!store.fail(c.lease(), &f).await.unwrap());
    assert!(
        !store
            .fail(c.lease(), &Failure::Reschedule { at: past() })
            .await
            .unwrap()
    );
    let tx = store.begin().await.unwrap();
    assert!(!tx.commit_ack(c.lease()).await.unwrap());
    let e = store.get(id).await.unwrap().unwrap();
    assert!(e.is_dead());
    assert_eq!(e.last_error.as_deref(), Some("stopped by hand"));
}

async fn cancel_refuses_unknown_and_dead_events(db: TestDb) {
    let store = db.store().await;
    let unknown = Uuid::now_v7();
    let err = store.cancel(unknown).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(i) if i == unknown),
        "{err}"
    );
    insert_dead(&db, "dead").await;
    let dead = store
        .list(&ListFilter {
            dead: true,
            ..Default::default()
        })
        .await
        .unwrap()[0]
        .id;
    let err = store.cancel(dead).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::AlreadyDead { .. }), "{msg}");
    assert!(
        msg.contains("already dead") && msg.contains("boom"),
        "{msg}"
    );
    let e = store.get(dead).await.unwrap().unwrap();
    assert_eq!(
        (e.last_error.as_deref(), e.dead_at),
        (Some("boom"), None),
        "nothing changed"
    );
    let err = store.cancel_matching("", None).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}
