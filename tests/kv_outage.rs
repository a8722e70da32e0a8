//! Redis going away in the middle of a drain, with the real `outrun serve`
//! and the probe guest doing one kv `set` per event while a feeder keeps
//! enqueueing: stopped for 4 s and started again (`shutdown nosave`, as a
//! crash or restart does), or frozen for 6 s (SIGSTOP: it accepts
//! connections but answers nothing, like a paused VM or a partition).
//! Afterwards every event is done and none is dead, no kv attempt took
//! longer than the kv bound (2 × `[kv] timeout`) instead of the handler's
//! timeout, and events of a handler without kv kept flowing during the
//! outage.
//!
//! Each test runs its own `redis-server` (the machine's binary with the
//! machine's flags, on a free port with its own directory) rather than
//! stopping the shared one at `OUTRUN_TEST_REDIS_URL`: the outage then
//! touches nothing but this test, so the rest of the suite (and anyone
//! else using that Redis) runs in parallel as usual and no nextest group
//! has to serialise it. A guard kills (and thaws) the private server
//! whatever happens.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::{Serve, TestDb, free_port, guest, http};

/// The kv bound the runtime promises with the default `[kv] timeout` (1 s):
/// one connection attempt plus one reply, and some slack for the guest.
const KV_BOUND_SECS: f64 = 2.5;

/// A `redis-server` of this test's own, started with the flags the
/// machine's Redis runs with (no persistence), in the foreground.
struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    frozen: bool,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let mut r = PrivateRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            frozen: false,
        };
        r.spawn();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start the server (again) and wait until it answers PING.
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--daemonize", "no", "--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): this test needs the Redis server binary on PATH \
                     (Debian: apt-get install redis-server)"
                )
            });
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return;
            }
            assert!(
                Instant::now() < end,
                "the private redis-server on port {} did not answer within 10 s: {:?}; its log: {}",
                self.port,
                pong,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis-cli shutdown nosave`: the server closes every connection and
    /// exits, as in a restart.
    fn shutdown(&mut self) {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "nosave"])
            .output()
            .expect("run redis-cli (Debian: apt-get install redis-tools)");
        let mut child = self.child.take().expect("redis is running");
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "redis-server did not exit cleanly on shutdown ({status}); redis-cli said {out:?}"
        );
    }

    fn signal(&mut self, sig: &str) {
        let pid = self.child.as_ref().expect("redis is running").id();
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        self.frozen = sig == "-STOP";
    }

    fn dbsize(&self) -> i64 {
        let mut c = redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .unwrap();
        redis::cmd("DBSIZE").query(&mut c).unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.frozen {
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outage {
    /// Stopped, then started again (its data is gone).
    Restart,
    /// SIGSTOP, then SIGCONT.
    Freeze,
}

fn config(dir: &std::path::Path, redis: &PrivateRedis, admin: u16, kv_cap: &str) -> PathBuf {
    let probe = guest("probe");
    let path = dir.join("outrun.toml");
    std::fs::write(
        &path,
        format!(
            r#"[admin]
listen = "127.0.0.1:{admin}"

[kv]
url = "{url}"

[[handler]]
name = "kv"
events = ["probe.kv"]
module = "{probe}"
timeout = "20s"
max_retry = 10000
{kv_cap}
[handler.allow]
kv = "outage:"

[[handler]]
name = "plain"
events = ["plain/probe.sleep"]
module = "{probe}"
"#,
            url = redis.url(),
            probe = probe.display(),
        ),
    )
    .unwrap();
    path
}

/// Enqueues `per_tick` kv events every 100 ms (each sets its own key
/// `outage:k<n>`) until stopped; counts what it enqueued.
struct Feeder {
    stop: Arc<AtomicBool>,
    enqueued: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl Feeder {
    async fn start(db: &TestDb, per_tick: i64) -> Feeder {
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let enqueued = Arc::new(AtomicI64::new(0));
        let (s, n) = (stop.clone(), enqueued.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Acquire) {
                let from = n.load(Ordering::Acquire);
                sqlx::query(
                    "INSERT INTO outbox_events (name, payload, max_retry)
                     SELECT 'probe.kv',
                            '{\"ops\":[{\"op\":\"set\",\"key\":\"k' || g || '\",\"value\":\"v\"}]}',
                            10000
                     FROM generate_series($1::bigint, $2::bigint) g",
                )
                .bind(from)
                .bind(from + per_tick - 1)
                .execute(&pool)
                .await
                .expect("the feeder's INSERT");
                n.fetch_add(per_tick, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            pool.close().await;
        });
        Feeder {
            stop,
            enqueued,
            task,
        }
    }

    fn enqueued(&self) -> i64 {
        self.enqueued.load(Ordering::Acquire)
    }

    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Release);
        self.task.await.unwrap();
        self.enqueued.load(Ordering::Acquire)
    }
}

/// The value of the series whose line starts with `series` (name and
/// labels as the exporter writes them), if exposed.
fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn outage(kind: Outage) {
    let mut redis = PrivateRedis::start();
    let db = TestDb::postgres().await;
    db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    // A frozen Redis holds each kv attempt for up to the kv bound, so the
    // kv handler gets a concurrency cap there, as a handler that depends on
    // a slow service should. (The cap leaves the other handler fewer
    // workers than it says: claimed kv events waiting for a permit hold
    // workers too.) A stopped Redis refuses at once; there the runtime
    // needs no cap to keep the other handler's events flowing.
    let cap = match kind {
        Outage::Restart => "",
        Outage::Freeze => "concurrency = 16",
    };
    let serve = Serve::ready(&db, &config(dir.path(), &redis, admin, cap)).await;
    let feeder = Feeder::start(&db, 50).await;

    // Mid-drain: some kv events done, more arriving.
    common::wait_for("the first 300 kv events to be handled", || async {
        feeder.enqueued() - db.scalar("SELECT count(*) FROM outbox_events").await >= 300
    })
    .await;
    // How long Redis stays away: 4 s stopped, as in the report; 6 s frozen,
    // where each kv attempt holds its worker for up to the reply timeout and
    // the other handler's events wait longer for a worker.
    let outage = match kind {
        Outage::Restart => Duration::from_secs(4),
        Outage::Freeze => Duration::from_secs(6),
    };
    let down_at = Instant::now();
    match kind {
        Outage::Restart => redis.shutdown(),
        Outage::Freeze => redis.signal("-STOP"),
    }

    // During the outage, events of a handler without kv still run.
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.exec(
        "INSERT INTO outbox_events (name, payload) \
         SELECT 'plain/probe.sleep', '{\"ms\":0}' FROM generate_series(1, 50)",
    )
    .await;
    let plain_at = Instant::now();
    common::eventually(
        "the 50 events of the handler without kv to run while Redis is away",
        outage - Duration::from_millis(500),
        || async {
            (db.scalar("SELECT count(*) FROM outbox_events WHERE name = 'plain/probe.sleep'")
                .await
                == 0)
                .then_some(())
        },
    )
    .await;
    let plain_latency = plain_at.elapsed();
    assert!(
        down_at.elapsed() < outage,
        "the check ran past the outage; it proves nothing"
    );

    tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;
    match kind {
        Outage::Restart => redis.spawn(),
        Outage::Freeze => redis.signal("-CONT"),
    }
    let up_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let total = feeder.stop().await;

    common::eventually(
        "every kv event to be done after Redis came back",
        Duration::from_secs(60),
        || async { (db.scalar("SELECT count(*) FROM outbox_events").await == 0).then_some(()) },
    )
    .await;
    let drained_after = up_at.elapsed();

    let (status, body) = http(admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    let attempts = metric(
        &body,
        r#"outrun_handler_duration_seconds_count{handler="kv"}"#,
    )
    .unwrap_or_else(|| panic!("no kv attempts in /metrics:\n{body}"));
    let within = |le: &str| {
        metric(
            &body,
            &format!(r#"outrun_handler_duration_seconds_bucket{{handler="kv",le="{le}"}}"#),
        )
        .unwrap_or(0.0)
    };
    let failed = metric(
        &body,
        r#"outrun_events_failed_total{handler="kv",kind="retryable"}"#,
    )
    .unwrap_or(0.0);
    eprintln!(
        "{kind:?}: {total} kv events, {attempts} attempts, {failed} failed with unavailable; \
         attempts within 0.1 s: {}, 1 s: {}, 2.5 s: {}, 5 s: {}; \
         50 plain events done {} ms after enqueue during the outage; \
         backlog drained {} ms after Redis came back",
        within("0.1"),
        within("1"),
        within("2.5"),
        within("5"),
        plain_latency.as_millis(),
        drained_after.as_millis(),
    );
    let log = serve.stop();
    assert!(
        failed > 0.0,
        "no kv attempt failed: the outage missed the drain\n{log}"
    );
    assert_eq!(
        within(&KV_BOUND_SECS.to_string()),
        attempts,
        "some kv attempts took longer than {KV_BOUND_SECS} s (kv calls must fail fast while Redis is away)\n{body}"
    );
    assert!(
        !log.contains("timeout after"),
        "an attempt ran into the handler timeout"
    );
    assert!(
        log.contains("kv (Redis at redis://127.0.0.1:"),
        "the kv failures should name Redis and its URL"
    );
    if kind == Outage::Freeze {
        // Nothing was lost: every event's key is there once.
        assert_eq!(redis.dbsize(), total, "one key per kv event");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_drain_costs_retries_not_the_runtime() {
    outage(Outage::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_mid_drain_fails_kv_calls_within_the_bound() {
    outage(Outage::Freeze).await;
}
