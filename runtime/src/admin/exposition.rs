//! Prometheus `/metrics`: every metric outrun exposes, with its type and
//! HELP text, is listed once here ([`RECORDED`] and [`STATE`]).
//!
//! Two kinds of series:
//! - *Recorded* ones (counters, histograms, the reload gauge) are recorded
//!   where things happen (`metrics::counter!` etc.) into the process-wide
//!   recorder that [`install`] sets up, with their HELP described there.
//! - *State* gauges describe what is true now: the build, whether the
//!   database answers, the handler versions serving, the outbox counts.
//!   They are written at scrape time from the current state ([`render`]),
//!   so a reloaded handler's old version disappears with the reload, the
//!   version is there from the first scrape, and the counts vanish (with
//!   `outrun_db_up 0`) when the database stops answering instead of
//!   repeating the last numbers it gave.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use crate::store::Store;
use crate::wasm::HandlerInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric recorded through the `metrics` macros in this crate: name,
/// type, HELP. A test checks that each `metrics::counter!`/`gauge!`/
/// `histogram!` in `src/` is listed here with its type.
pub const RECORDED: &[(&str, Kind, &str)] = &[
    (
        "outrun_claimed_total",
        Kind::Counter,
        "Events this instance claimed (leased) to run.",
    ),
    (
        "outrun_events_handled_total",
        Kind::Counter,
        "Events whose handler returned done, by handler.",
    ),
    (
        "outrun_events_failed_total",
        Kind::Counter,
        "Failed attempts, by handler and kind (retryable: runs again until max_retry; rejected: dead at once).",
    ),
    (
        "outrun_events_interrupted_total",
        Kind::Counter,
        "Attempts interrupted by a database error (dropped connection, deadlock, busy), by handler; they run again without spending a retry.",
    ),
    (
        "outrun_events_deferred_total",
        Kind::Counter,
        "Attempts that ended in retry-after (rescheduled without spending a retry), by handler.",
    ),
    (
        "outrun_events_dead_total",
        Kind::Counter,
        "Events that became dead, by reason (no_handler, retries_exhausted, rejected, expired, cancelled).",
    ),
    (
        "outrun_acks_total",
        Kind::Counter,
        "Events deleted after their handler succeeded (with their effects, if any).",
    ),
    (
        "outrun_effects_commit_events",
        Kind::Histogram,
        "Events committed together by one effects transaction (lane commit).",
    ),
    (
        "outrun_effects_bare_rollbacks_total",
        Kind::Counter,
        "Handlers whose event failed without a savepoint (runtime.effect_savepoints = auto), rolling back its lane's batch; their events get savepoints from then on.",
    ),
    (
        "outrun_effects_interleaved_total",
        Kind::Counter,
        "SQLite: handlers whose event ran a statement after another event's, between two of its own, in the shared effects transaction; their events run their statements alone from then on.",
    ),
    (
        "outrun_dead_cleaned_total",
        Kind::Counter,
        "Dead events deleted after runtime.dead_retention.",
    ),
    (
        "outrun_handler_duration_seconds",
        Kind::Histogram,
        "Wall-clock time of one handler attempt, by handler.",
    ),
    (
        "outrun_handler_reloads_total",
        Kind::Counter,
        "Hot reloads that swapped in a new version, by handler.",
    ),
    (
        "outrun_handler_reload_failures_total",
        Kind::Counter,
        "Changed module files rejected by hot reload (the old version kept serving), by handler.",
    ),
    (
        "outrun_handler_reload_seconds",
        Kind::Gauge,
        "Time the handler's last successful hot reload took, from file change to serving.",
    ),
    (
        "outrun_published_total",
        Kind::Counter,
        "Messages the broker acknowledged, by handler (or relay:<topic>) and backend (kafka, nats).",
    ),
    (
        "outrun_publish_errors_total",
        Kind::Counter,
        "Publish calls that failed, by handler, backend and kind (denied: topic not granted; invalid: the message is at fault; unavailable: the broker refused or did not answer in time).",
    ),
    (
        "outrun_publish_duplicates_total",
        Kind::Counter,
        "Published messages the broker recognised as duplicates of an earlier message id and stored once (NATS JetStream), by handler and backend.",
    ),
    (
        "outrun_publish_duration_seconds",
        Kind::Histogram,
        "Time from handing one publish call's messages to the broker client until the broker acknowledged all of them, by backend.",
    ),
    (
        "outrun_publish_producer_renewals_total",
        Kind::Counter,
        "Kafka producers replaced because their publish calls kept timing out while the broker was reachable again (5 failed calls spanning at least 3 x the publish timeout), by backend.",
    ),
    (
        "outrun_schedule_enqueued_total",
        Kind::Counter,
        "Events this instance enqueued for [[schedule]] ticks, by schedule (each tick is enqueued by one instance only).",
    ),
    (
        "outrun_limit_claimed_total",
        Kind::Counter,
        "Events this instance claimed through a [[limit]], by limit (handler:NAME or event:NAME).",
    ),
    (
        "outrun_limit_throttled_milliseconds_total",
        Kind::Counter,
        "Time this instance held back the claims of a rate limit because its token bucket was empty, by limit.",
    ),
    (
        "outrun_limit_rate_per_second",
        Kind::Gauge,
        "The configured rate of a [[limit]], in events per second, by limit.",
    ),
    (
        "outrun_limit_per_key",
        Kind::Gauge,
        "The configured per_key of a [[limit]]: events of one key that may run at once, by limit.",
    ),
];

/// The state gauges [`render`] writes at scrape time: name, HELP.
pub const STATE: &[(&str, &str)] = &[
    (
        "outrun_build_info",
        "Always 1; the version label is the outrun release serving.",
    ),
    (
        "outrun_db_up",
        "1 when the outbox database answered the last check (at most 5 s ago or the last /readyz), else 0.",
    ),
    (
        "outrun_handler_version",
        "1 for each handler and the version (content hash prefix) it serves now.",
    ),
    (
        "outrun_events_pending",
        "Live events ready to run now and not leased. Absent while the database is down.",
    ),
    (
        "outrun_events_scheduled",
        "Live events waiting for their available_at (delay, backoff, retry-after). Absent while the database is down.",
    ),
    (
        "outrun_events_running",
        "Live events leased by some instance. Absent while the database is down.",
    ),
    (
        "outrun_events_dead",
        "Dead events kept for inspection and replay. Absent while the database is down.",
    ),
    (
        "outrun_oldest_pending_age_seconds",
        "Age of the oldest event ready to run (0 when none). Absent while the database is down.",
    ),
];

/// How often the outbox counts behind the state gauges are refreshed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Histogram buckets of the `_seconds` histograms.
const SECONDS_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of `outrun_effects_commit_events` (a lane commits at most 60).
const COMMIT_BUCKETS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0];

/// Install the process-wide Prometheus recorder and describe every recorded
/// metric. Call it before anything records (before the handlers load), at
/// most once per process.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("outrun_effects_commit_events".into()),
            &COMMIT_BUCKETS,
        )?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the Prometheus metrics recorder: {e}"))?;
    for &(name, kind, help) in RECORDED {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
    Ok(handle)
}

/// The whole exposition: the recorded series, then the state gauges.
pub fn render(handle: &PrometheusHandle, health: &Health, handlers: &[HandlerInfo]) -> String {
    let mut out = handle.render();
    let help = |name: &str| {
        STATE
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, h)| h)
    };
    let family = |out: &mut String, name: &str, series: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {}", help(name));
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, value) in series {
            let _ = writeln!(out, "{name}{labels} {}", number(*value));
        }
        out.push('\n');
    };
    family(
        &mut out,
        "outrun_build_info",
        &[(labels(&[("version", env!("CARGO_PKG_VERSION"))]), 1.0)],
    );
    let up = health.db_up();
    family(
        &mut out,
        "outrun_db_up",
        &[(String::new(), if up { 1.0 } else { 0.0 })],
    );
    let versions: Vec<(String, f64)> = handlers
        .iter()
        .map(|h| {
            let short = &h.hash[..h.hash.len().min(12)];
            (labels(&[("handler", &h.name), ("version", short)]), 1.0)
        })
        .collect();
    if !versions.is_empty() {
        family(&mut out, "outrun_handler_version", &versions);
    }
    if let Some(s) = health.stats().filter(|_| up) {
        let counts = [
            ("outrun_events_pending", s.pending as f64),
            ("outrun_events_scheduled", s.scheduled as f64),
            ("outrun_events_running", s.running as f64),
            ("outrun_events_dead", s.dead as f64),
            (
                "outrun_oldest_pending_age_seconds",
                s.oldest_pending_age_secs,
            ),
        ];
        for (name, value) in counts {
            family(&mut out, name, &[(String::new(), value)]);
        }
    }
    out
}

/// `{a="x",b="y"}` with the values escaped as the text format requires.
fn labels(pairs: &[(&str, &str)]) -> String {
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// Every [`POLL_INTERVAL`]: check that the database answers (cheap, with a
/// short timeout) and, if it does, count the outbox for the state gauges.
/// Either failing drops the counts, so the gauges never repeat numbers the
/// database no longer backs. The count scans the table; scraping never does.
pub async fn poll_outbox(store: Store, health: Arc<Health>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(reason) = health.check_db(&store).await {
            if was_up {
                tracing::warn!(%reason, "the outbox database does not answer; outrun_db_up = 0 and the outbox gauges are dropped until it does");
            }
            was_up = false;
            continue;
        }
        if !was_up {
            tracing::info!("the outbox database answers again; outrun_db_up = 1");
        }
        was_up = true;
        match tokio::time::timeout(POLL_INTERVAL * 6, store.stats()).await {
            Ok(Ok(s)) => health.set_stats(Some(s)),
            Ok(Err(e)) => {
                health.set_stats(None);
                tracing::warn!(error = %e, "counting the outbox for the gauges failed; they are dropped until a count succeeds");
            }
            Err(_) => {
                health.set_stats(None);
                tracing::warn!(
                    "counting the outbox for the gauges took over 30 s; they are dropped until a count succeeds"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `metrics::counter!/gauge!/histogram!("name"` in `src/`, with
    /// the kind of macro.
    fn recorded_in_source() -> Vec<(String, Kind, String)> {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
            &mut files,
        );
        let mut found = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (macro_name, kind) in [
                ("metrics::counter!(", Kind::Counter),
                ("metrics::gauge!(", Kind::Gauge),
                ("metrics::histogram!(", Kind::Histogram),
            ] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = text[at + macro_name.len()..].trim_start();
                    let Some(rest) = rest.strip_prefix('"') else {
                        continue;
                    };
                    let name = &rest[..rest.find('"').unwrap_or(0)];
                    // (The macro names quoted in this test are not calls.)
                    if name.is_empty()
                        || !name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    {
                        continue;
                    }
                    found.push((name.to_string(), kind, file.display().to_string()));
                }
            }
        }
        found
    }

    #[test]
    fn every_recorded_metric_has_help_and_its_type() {
        let found = recorded_in_source();
        assert!(
            found
                .iter()
                .any(|(n, ..)| n == "outrun_events_handled_total"),
            "the source scan found nothing: {found:?}"
        );
        for (name, kind, file) in found {
            let listed = RECORDED.iter().find(|(n, ..)| *n == name);
            assert!(
                listed.is_some(),
                "{file} records {name}, which has no HELP: add it to RECORDED in admin/exposition.rs"
            );
            assert_eq!(
                listed.unwrap().1,
                kind,
                "{file} records {name} as a {kind:?}; RECORDED says otherwise"
            );
            assert!(
                !STATE.iter().any(|(n, _)| *n == name),
                "{file} records the state gauge {name}; it is written at scrape time (admin/exposition.rs render)"
            );
            if kind == Kind::Counter {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                );
            }
        }
    }

    #[test]
    fn state_gauges_drop_the_counts_while_the_database_is_down() {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let health = Health::default();
        health.set_db(true);
        health.set_stats(Some(crate::store::Stats {
            pending: 3,
            ..Default::default()
        }));
        let handlers = vec![HandlerInfo {
            name: "a\"b".into(),
            module: "m.wasm".into(),
            hash: "0123456789abcdef".into(),
            loaded_at: chrono::Utc::now(),
            events: vec![],
            ..Default::default()
        }];
        let up = render(&handle, &health, &handlers);
        assert!(up.contains("outrun_db_up 1\n"), "{up}");
        assert!(up.contains("outrun_events_pending 3\n"), "{up}");
        assert!(
            up.contains("outrun_handler_version{handler=\"a\\\"b\",version=\"0123456789ab\"} 1\n"),
            "{up}"
        );
        assert!(up.contains("# HELP outrun_events_pending "), "{up}");
        health.set_db(false);
        let down = render(&handle, &health, &handlers);
        assert!(down.contains("outrun_db_up 0\n"), "{down}");
        assert!(!down.contains("outrun_events_pending"), "{down}");
        assert!(
            !down.contains("outrun_oldest_pending_age_seconds"),
            "{down}"
        );
    }
}
