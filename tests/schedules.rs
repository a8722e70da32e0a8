//! `[[schedule]]` end to end: real `outrun serve` processes on one database
//! (two at once, one of them killed with SIGKILL and started again), the
//! probe component recording each event it handles, and the schedulers'
//! own log lines naming each tick they enqueued. Each tick is enqueued
//! once, with no gaps; missed ticks follow `catch_up`; a changed or removed
//! schedule takes effect at the restart, and an edit of the running config
//! at once; `outrun schedules list` shows the
//! next run; bad entries are refused naming the entry and the field.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Serve, TestDb, fails, guest, ok, outrun_command, wait_for};

/// A config with the probe bound to `events` (with SQL granted) and the
/// given `[[schedule]]` entries.
fn write_config(dir: &Path, events: &[&str], schedules: &str) -> PathBuf {
    let config = dir.join("outrun.toml");
    let events = events
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nshutdown_grace = \"5s\"\n\n[[handler]]\nname = \"probe\"\nmodule = {:?}\nevents = [{events}]\n[handler.allow]\nsql = true\n\n{schedules}",
            guest("probe").display().to_string()
        ),
    )
    .unwrap();
    config
}

/// The ticks a log says its scheduler enqueued, per schedule.
fn enqueued_ticks(log: &str) -> Vec<(String, DateTime<Utc>)> {
    log.lines()
        .filter(|l| l.contains("scheduled event enqueued"))
        .map(|l| {
            let field = |name: &str| {
                let start = l.find(&format!("{name}=")).unwrap() + name.len() + 1;
                let rest = &l[start..];
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .trim_matches('"')
                    .to_string()
            };
            (
                field("schedule"),
                DateTime::parse_from_rfc3339(&field("tick"))
                    .unwrap()
                    .with_timezone(&Utc),
            )
        })
        .collect()
}

/// Ticks of `schedule` over all logs, oldest first, asserting none is
/// there twice.
fn ticks_once(logs: &[String], schedule: &str) -> Vec<DateTime<Utc>> {
    let mut seen: BTreeMap<DateTime<Utc>, usize> = BTreeMap::new();
    for log in logs {
        for (s, t) in enqueued_ticks(log) {
            if s == schedule {
                *seen.entry(t).or_default() += 1;
            }
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ticks enqueued twice: {twice:?}");
    seen.into_keys().collect()
}

const RECORD: &str =
    r#"payload = '{"execute":[{"sql":"INSERT INTO sched_seen (at) VALUES (1)"}]}'"#;

async fn one_event_per_tick_across_instances_and_kill_9(db: TestDb) {
    db.store().await;
    db.exec("CREATE TABLE sched_seen (at INTEGER)").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &["tick/probe.sql"],
        &format!("[[schedule]]\nname = \"tick/probe.sql\"\nevery = \"1s\"\n{RECORD}\n"),
    );
    let second = dir.path().join("second.toml");
    std::fs::copy(&config, &second).unwrap();
    let third = dir.path().join("third.toml");
    std::fs::copy(&config, &third).unwrap();

    let a = Serve::ready(&db, &config).await;
    let b = Serve::ready(&db, &second).await;
    let from = Utc::now();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // SIGKILL: no shutdown, leases and transactions cut off.
    a.send("KILL");
    let (_, log_a) = a.wait();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // A new instance in its place.
    let c = Serve::ready(&db, &third).await;
    let until = from + chrono::Duration::seconds(10);
    tokio::time::sleep((until - Utc::now()).to_std().unwrap_or_default()).await;
    let log_b = b.stop();
    let log_c = c.stop();

    let ticks = ticks_once(&[log_a, log_b, log_c], "tick/probe.sql");
    let window: Vec<_> = ticks
        .iter()
        .filter(|t| **t > from && **t <= until)
        .collect();
    assert!(
        (9..=11).contains(&window.len()),
        "{} ticks in 10 s: {window:?}",
        window.len()
    );
    // One every second from the first to the last: none missed while an
    // instance was killed and another started.
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::seconds(1),
            "a gap or a doubled tick: {ticks:?}"
        );
    }
    // Each enqueued event was handled once (the handler's own rows).
    wait_for("every scheduled event handled", || async {
        db.scalar("SELECT count(*) FROM outbox_events").await == 0
            || db.scalar("SELECT count(*) FROM sched_seen").await >= ticks.len() as i64 - 1
    })
    .await;
    let seen = db.scalar("SELECT count(*) FROM sched_seen").await;
    let left = db.scalar("SELECT count(*) FROM outbox_events").await;
    assert_eq!(
        seen + left,
        ticks.len() as i64,
        "handled {seen} + still queued {left} != enqueued {}",
        ticks.len()
    );
}

async fn catch_up_reload_and_removal(db: TestDb) {
    db.store().await;
    db.exec("CREATE TABLE sched_seen (at INTEGER)").await;
    let dir = tempfile::tempdir().unwrap();
    let events = ["all/probe.sql", "none/probe.sql", "gone/probe.sql"];
    let both = format!(
        "[[schedule]]\nname = \"all/probe.sql\"\nevery = \"1s\"\ncatch_up = \"all\"\n{RECORD}\n\n\
         [[schedule]]\nname = \"none/probe.sql\"\nevery = \"1s\"\n{RECORD}\n\n\
         [[schedule]]\nname = \"gone/probe.sql\"\nevery = \"1s\"\n{RECORD}\n"
    );
    let config = write_config(dir.path(), &events, &both);
    let s = Serve::ready(&db, &config).await;
    wait_for("a tick of each schedule", || async {
        let log = s.log();
        ["all/", "none/", "gone/"]
            .iter()
            .all(|n| enqueued_ticks(&log).iter().any(|(s, _)| s.starts_with(n)))
    })
    .await;
    let first = s.stop();
    // Down for three ticks or more; then back without `gone`, and with
    // `none` changed to every 2 s.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let changed = format!(
        "[[schedule]]\nname = \"all/probe.sql\"\nevery = \"1s\"\ncatch_up = \"all\"\n{RECORD}\n\n\
         [[schedule]]\nname = \"none/probe.sql\"\nevery = \"2s\"\n{RECORD}\n"
    );
    let config = write_config(dir.path(), &events, &changed);
    let restarted_at = Utc::now();
    let s = Serve::ready(&db, &config).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let second = s.stop();
    let logs = [first.clone(), second.clone()];

    // catch_up = "all": the ticks of the downtime came at the restart.
    let all = ticks_once(&logs, "all/probe.sql");
    for pair in all.windows(2) {
        assert_eq!(pair[1] - pair[0], chrono::Duration::seconds(1), "{all:?}");
    }
    assert!(all.iter().any(|t| *t > restarted_at), "{all:?}");
    // Changed definition: starts afresh at the restart, every 2 s, nothing
    // from the downtime.
    let none_after: Vec<_> = ticks_once(&logs, "none/probe.sql")
        .into_iter()
        .filter(|t| *t > restarted_at - chrono::Duration::milliseconds(1100))
        .collect();
    assert!(!none_after.is_empty(), "{second}");
    assert!(
        none_after.iter().all(|t| t.timestamp() % 2 == 0),
        "{none_after:?}"
    );
    // Removed: no tick after the restart.
    let gone = ticks_once(&logs, "gone/probe.sql");
    assert!(gone.iter().all(|t| *t < restarted_at), "{gone:?}\n{second}");
    assert!(second.contains("schedule loaded"), "{second}");
}

/// An edit of the config file while serve runs: a changed schedule ticks
/// on its new definition, a removed one stops, a new one starts, all
/// without a restart; an edit that does not load keeps the running
/// schedules and says why.
async fn config_edits_apply_without_restart(db: TestDb) {
    db.store().await;
    db.exec("CREATE TABLE sched_seen (at INTEGER)").await;
    let dir = tempfile::tempdir().unwrap();
    let events = ["slow/probe.sql", "gone/probe.sql", "new/probe.sql"];
    let before = format!(
        "[[schedule]]\nname = \"slow/probe.sql\"\nevery = \"1h\"\n{RECORD}\n\n\
         [[schedule]]\nname = \"gone/probe.sql\"\nevery = \"1s\"\n{RECORD}\n"
    );
    let config = write_config(dir.path(), &events, &before);
    let s = Serve::ready(&db, &config).await;
    wait_for("a tick of `gone`", || async {
        enqueued_ticks(&s.log())
            .iter()
            .any(|(n, _)| n == "gone/probe.sql")
    })
    .await;
    // Saved the way editors do: a new file renamed over the old one.
    let after = format!(
        "[[schedule]]\nname = \"slow/probe.sql\"\nevery = \"1s\"\n{RECORD}\n\n\
         [[schedule]]\nname = \"new/probe.sql\"\nevery = \"1s\"\n{RECORD}\n"
    );
    std::fs::create_dir(dir.path().join("staging")).unwrap();
    let staged = write_config(&dir.path().join("staging"), &events, &after);
    std::fs::rename(&staged, &config).unwrap();
    let edited_at = Utc::now();
    wait_for("ticks of the changed and the new schedule", || async {
        let log = s.log();
        let ticks = enqueued_ticks(&log);
        ["slow/probe.sql", "new/probe.sql"]
            .iter()
            .all(|n| ticks.iter().filter(|(s, _)| s == n).count() >= 2)
    })
    .await;
    // A broken edit: the running schedules stay.
    std::fs::write(
        &config,
        "[[schedule]]\nname = \"slow/probe.sql\"\ncron = \"0 25 * * *\"\n",
    )
    .unwrap();
    wait_for("the broken edit reported", || async {
        s.log().contains("does not load")
    })
    .await;
    let broken_at = Utc::now();
    wait_for("`slow` still ticking after the broken edit", || async {
        enqueued_ticks(&s.log())
            .iter()
            .any(|(n, t)| n == "slow/probe.sql" && *t > broken_at)
    })
    .await;
    let log = s.stop();
    assert!(log.contains("schedule changed (config reloaded)"), "{log}");
    assert!(log.contains("schedule removed (config reloaded)"), "{log}");
    assert!(log.contains("`cron`"), "{log}");
    // Removed: nothing after the edit was read (a tick in flight at the
    // edit may land within the debounce).
    let gone = ticks_once(std::slice::from_ref(&log), "gone/probe.sql");
    let late = edited_at + chrono::Duration::seconds(2);
    assert!(gone.iter().all(|t| *t < late), "{gone:?}");
    // Changed: every second now, and each tick once.
    let slow = ticks_once(std::slice::from_ref(&log), "slow/probe.sql");
    assert!(slow.len() >= 3, "{slow:?}");
}

/// catch_up = "none" skips the ticks of a downtime and says so; "last"
/// runs only the latest of them.
async fn missed_ticks_none_and_last(db: TestDb) {
    db.store().await;
    db.exec("CREATE TABLE sched_seen (at INTEGER)").await;
    let dir = tempfile::tempdir().unwrap();
    // A minute-long period whose last tick the database says is two
    // minutes old: both missed the latest tick by more than ON_TIME.
    let schedules = format!(
        "[[schedule]]\nname = \"n/probe.sql\"\nevery = \"1m\"\n{RECORD}\n\n\
         [[schedule]]\nname = \"l/probe.sql\"\nevery = \"1m\"\ncatch_up = \"last\"\n{RECORD}\n"
    );
    let config = write_config(dir.path(), &["n/probe.sql", "l/probe.sql"], &schedules);
    let s = Serve::ready(&db, &config).await;
    wait_for("both schedules anchored", || async {
        db.scalar("SELECT count(*) FROM outrun_schedules WHERE last_tick IS NOT NULL")
            .await
            == 2
    })
    .await;
    s.stop();
    // As if every instance had been down for five minutes.
    let back = if db.is_postgres() {
        "UPDATE outrun_schedules SET last_tick = last_tick - interval '5 minutes'"
    } else {
        "UPDATE outrun_schedules SET last_tick = last_tick - 300000"
    };
    db.exec(back).await;
    db.exec("DELETE FROM sched_seen").await;
    let restart = Utc::now();
    let s = Serve::ready(&db, &config).await;
    wait_for("the latest missed tick of `l` handled", || async {
        db.scalar("SELECT count(*) FROM sched_seen").await >= 1
    })
    .await;
    let log = s.stop();
    let ticks = enqueued_ticks(&log);
    // Ticks of the minute that may begin while the test runs are not
    // catch-up: count those up to the restart.
    let of = |n: &str| {
        ticks
            .iter()
            .filter(|(s, t)| s == n && *t <= restart)
            .count()
    };
    // The latest minute tick is at most a minute old: "none" ran it only if
    // it was less than ON_TIME late, so look at the skip message instead.
    assert_eq!(of("l/probe.sql"), 1, "{log}");
    assert!(of("n/probe.sql") <= 1, "{log}");
    assert!(
        log.contains("ticks missed while no instance ran were skipped"),
        "{log}"
    );
}

async fn schedules_list_shows_the_next_run(db: TestDb) {
    db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &["probe.echo"],
        "[[schedule]]\nname = \"probe.echo\"\ncron = \"0 9 * * 1-5\"\ntimezone = \"Europe/Berlin\"\npayload = { hello = \"world\" }\n\n\
         [[schedule]]\nname = \"fast/probe.echo\"\nevery = \"1s\"\n",
    );
    let out = ok(&outrun_command(&db)
        .args(["schedules", "list", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap());
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0]["name"], "probe.echo");
    assert_eq!(rows[0]["when"], "cron 0 9 * * 1-5 Europe/Berlin");
    assert_eq!(rows[0]["payload"], serde_json::json!({"hello": "world"}));
    let next: DateTime<Utc> = serde_json::from_value(rows[0]["next_run"].clone()).unwrap();
    let berlin = next.with_timezone(&chrono_tz::Europe::Berlin);
    assert_eq!(berlin.format("%H:%M").to_string(), "09:00", "{out}");
    assert!(next > Utc::now());
    let fast: DateTime<Utc> = serde_json::from_value(rows[1]["next_run"].clone()).unwrap();
    assert!(fast <= Utc::now() + chrono::Duration::seconds(1));
    assert!(rows[1]["last_tick"].is_null());
    let table = ok(&outrun_command(&db)
        .args(["schedules", "list", "--config"])
        .arg(&config)
        .output()
        .unwrap());
    assert!(
        table.contains("every 1s") && table.contains("next run"),
        "{table}"
    );
}

fn refused(dir: &Path, schedules: &str) -> String {
    let config = write_config(dir, &["probe.echo"], schedules);
    let db = TestDb::sqlite();
    fails(
        &outrun_command(&db)
            .args(["schedules", "list", "--config"])
            .arg(&config)
            .output()
            .unwrap(),
    )
}

#[test]
fn bad_schedules_name_the_entry_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(
        dir.path(),
        "[[schedule]]\nname = \"nightly\"\ncron = \"0 25 * * *\"\n",
    );
    assert!(err.contains("`nightly`") && err.contains("`cron`"), "{err}");
    let err = refused(
        dir.path(),
        "[[schedule]]\nname = \"nightly\"\ncron = \"0 3 * * *\"\ntimezone = \"Europe/Atlantis\"\n",
    );
    assert!(
        err.contains("`nightly`") && err.contains("`timezone`") && err.contains("Europe/Atlantis"),
        "{err}"
    );
    let err = refused(
        dir.path(),
        "[[schedule]]\nname = \"twice\"\nevery = \"1m\"\n\n[[schedule]]\nname = \"twice\"\nevery = \"2m\"\n",
    );
    assert!(
        err.contains("`twice`") && err.contains("two [[schedule]]"),
        "{err}"
    );
    let err = refused(
        dir.path(),
        "[[schedule]]\nname = \"x\"\nevery = \"1m\"\ncatch_up = \"some\"\n",
    );
    assert!(err.contains("some"), "{err}");
    let err = refused(
        dir.path(),
        "[[schedule]]\nname = \"x\"\nevery = \"1m\"\ncrontab = \"* * * * *\"\n",
    );
    assert!(err.contains("crontab"), "{err}");
}

on_both_backends!(
    one_event_per_tick_across_instances_and_kill_9,
    catch_up_reload_and_removal,
    config_edits_apply_without_restart,
    missed_ticks_none_and_last,
    schedules_list_shows_the_next_run,
);
