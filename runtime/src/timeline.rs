//! The dashboard's throughput and latency charts: this instance's handler
//! outcomes of the last hour in per-minute buckets. A fixed ring of
//! atomics, so recording an attempt is a clock read and a few relaxed
//! adds: no lock, no allocation, nothing per handler. The numbers are
//! per instance (each `serve` keeps its own ring; nothing is stored), which
//! the dashboard says next to the charts.
//!
//! A bucket is reused an hour later: the first recorder of a new minute
//! swaps the bucket's minute and clears it. An attempt recorded by another
//! thread in the instant between the swap and the clear can be lost; the
//! charts are for reading trends, not for accounting.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Minutes kept.
pub const MINUTES: usize = 60;

/// Latency histogram bounds in milliseconds (the last bucket is open).
pub const LATENCY_BOUNDS_MS: [u64; 7] = [1, 5, 25, 100, 500, 2500, 10_000];

struct Bucket {
    /// Unix minute this bucket counts, or 0 before first use.
    minute: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
    attempts: AtomicU64,
    latency_us_sum: AtomicU64,
    latency: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
}

impl Bucket {
    const fn new() -> Self {
        Bucket {
            minute: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            latency_us_sum: AtomicU64::new(0),
            latency: [const { AtomicU64::new(0) }; LATENCY_BOUNDS_MS.len() + 1],
        }
    }

    fn clear(&self) {
        for c in [
            &self.acked,
            &self.failed,
            &self.dead,
            &self.attempts,
            &self.latency_us_sum,
        ] {
            c.store(0, Relaxed);
        }
        for c in &self.latency {
            c.store(0, Relaxed);
        }
    }
}

pub struct Timeline {
    buckets: [Bucket; MINUTES],
}

/// The process's ring, fed by the dispatcher.
pub static TIMELINE: Timeline = Timeline::new();

/// `n` events became dead for `reason`: the Prometheus counter and this
/// minute of the ring, together, so neither misses a path.
pub fn events_dead(reason: &'static str, n: u64) {
    metrics::counter!("outrun_events_dead_total", "reason" => reason).increment(n);
    TIMELINE.dead(n);
}

/// `n` events were acknowledged (deleted after their handler succeeded).
pub fn events_acked(n: u64) {
    metrics::counter!("outrun_acks_total").increment(n);
    TIMELINE.acked(n);
}

fn unix_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

/// One minute of outcomes, for `GET /v1/overview`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Minute {
    /// The minute's start (RFC 3339, UTC).
    pub at: chrono::DateTime<chrono::Utc>,
    /// Events deleted after their handler succeeded.
    pub acked: u64,
    /// Failed attempts (retried or rejected).
    pub failed: u64,
    /// Events that became dead.
    pub dead: u64,
    /// Handler attempts timed.
    pub attempts: u64,
    /// Mean handler time of those attempts, in milliseconds (0 without any).
    pub latency_ms_mean: f64,
    /// Attempts per latency bucket: at most 1, 5, 25, 100, 500, 2500,
    /// 10000 ms, and over 10000 ms.
    pub latency_ms_histogram: Vec<u64>,
}

impl Timeline {
    pub const fn new() -> Self {
        Timeline {
            buckets: [const { Bucket::new() }; MINUTES],
        }
    }

    /// The bucket of `minute`, cleared if it last counted an older minute.
    fn bucket(&self, minute: u64) -> &Bucket {
        let b = &self.buckets[(minute % MINUTES as u64) as usize];
        let seen = b.minute.load(Relaxed);
        if seen < minute
            && b.minute
                .compare_exchange(seen, minute, Relaxed, Relaxed)
                .is_ok()
        {
            b.clear();
        }
        b
    }

    pub fn acked(&self, n: u64) {
        self.bucket(unix_minute()).acked.fetch_add(n, Relaxed);
    }

    pub fn failed(&self) {
        self.bucket(unix_minute()).failed.fetch_add(1, Relaxed);
    }

    pub fn dead(&self, n: u64) {
        self.bucket(unix_minute()).dead.fetch_add(n, Relaxed);
    }

    /// One handler attempt took `elapsed`.
    pub fn attempt(&self, elapsed: std::time::Duration) {
        let b = self.bucket(unix_minute());
        let us = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        b.attempts.fetch_add(1, Relaxed);
        b.latency_us_sum.fetch_add(us, Relaxed);
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|&bound| us <= bound * 1000)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        b.latency[i].fetch_add(1, Relaxed);
    }

    /// The last hour, oldest minute first, the current minute last; minutes
    /// without a record are zeros.
    pub fn last_hour(&self) -> Vec<Minute> {
        let now = unix_minute();
        (0..MINUTES as u64)
            .rev()
            .map(|ago| {
                let minute = now.saturating_sub(ago);
                let at =
                    chrono::DateTime::from_timestamp((minute * 60) as i64, 0).unwrap_or_default();
                let b = &self.buckets[(minute % MINUTES as u64) as usize];
                if b.minute.load(Relaxed) != minute {
                    return Minute {
                        at,
                        latency_ms_histogram: vec![0; LATENCY_BOUNDS_MS.len() + 1],
                        ..Default::default()
                    };
                }
                let attempts = b.attempts.load(Relaxed);
                let sum = b.latency_us_sum.load(Relaxed);
                Minute {
                    at,
                    acked: b.acked.load(Relaxed),
                    failed: b.failed.load(Relaxed),
                    dead: b.dead.load(Relaxed),
                    attempts,
                    latency_ms_mean: if attempts == 0 {
                        0.0
                    } else {
                        sum as f64 / attempts as f64 / 1000.0
                    },
                    latency_ms_histogram: b.latency.iter().map(|c| c.load(Relaxed)).collect(),
                }
            })
            .collect()
    }
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_current_minute_counts_and_old_minutes_are_cleared() {
        let t = Timeline::new();
        t.acked(3);
        t.failed();
        t.dead(1);
        t.attempt(Duration::from_millis(2));
        t.attempt(Duration::from_millis(40));
        t.attempt(Duration::from_secs(20));
        let hour = t.last_hour();
        assert_eq!(hour.len(), MINUTES);
        let now = hour.last().unwrap();
        assert_eq!(
            (now.acked, now.failed, now.dead, now.attempts),
            (3, 1, 1, 3)
        );
        assert_eq!(now.latency_ms_histogram, vec![0, 1, 0, 1, 0, 0, 0, 1]);
        assert!(
            (now.latency_ms_mean - 20042.0 / 3.0).abs() < 0.01,
            "{now:?}"
        );
        assert!(hour[..MINUTES - 1].iter().all(|m| m.attempts == 0));

        // The same slot an hour later starts from zero.
        let later = unix_minute() + MINUTES as u64;
        let b = t.bucket(later);
        assert_eq!(b.acked.load(Relaxed), 0);
        assert_eq!(b.minute.load(Relaxed), later);
    }
}
