//! The claimer's side of `[[limit]]` (see [`crate::limits`]): before the
//! ordinary claim (which skips every limited name) it claims each limit's
//! events through [`Store::claim_limited`], within the limit's budget. A
//! rate limit that ran dry is not asked again until its next token is due:
//! the dispatch loop sleeps until [`Limiter::next_token_at`] instead of
//! polling the bucket.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::event::Claimed;
use crate::limits::{FALLBACK_KEY, KeySource, Limit, Limits};
use crate::store::{Store, StoreError};

/// What the claimer keeps per limit.
struct Held {
    limit: Limit,
    /// No claim of this limit before this: its bucket is empty until then.
    not_before: Mutex<Option<Instant>>,
    /// The missing-key warning was logged (once per limit and process).
    fallback_logged: AtomicBool,
}

pub struct Limiter {
    held: Vec<Held>,
    names: Vec<String>,
    /// Names of per-key limits: a finished event of one frees a slot of
    /// its key, so the claimer should look again at once.
    per_key: HashSet<String>,
    /// Which limit claims first next time, so none is always last.
    turn: AtomicUsize,
}

impl Limiter {
    pub fn new(limits: Limits) -> Option<Limiter> {
        if limits.is_empty() {
            return None;
        }
        for l in &limits.limits {
            if let Some(r) = &l.rate {
                metrics::gauge!("outrun_limit_rate_per_second", "limit" => l.id.clone())
                    .set(r.per_second);
            }
            if let Some(p) = &l.per_key {
                metrics::gauge!("outrun_limit_per_key", "limit" => l.id.clone()).set(p.n);
            }
            tracing::info!(limit = %l.id, events = %l.names.join(","), "limit loaded: {}", l.describe());
        }
        Some(Limiter {
            names: limits.names(),
            per_key: limits
                .limits
                .iter()
                .filter(|l| l.per_key.is_some())
                .flat_map(|l| l.names.clone())
                .collect(),
            held: limits
                .limits
                .into_iter()
                .map(|limit| Held {
                    limit,
                    not_before: Mutex::new(None),
                    fallback_logged: AtomicBool::new(false),
                })
                .collect(),
            turn: AtomicUsize::new(0),
        })
    }

    /// Every limited event name: the ordinary claim skips them.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether a finished event of `name` may have made room for another
    /// claim of its limit.
    pub fn frees_room(&self, name: &str) -> bool {
        self.per_key.contains(name)
    }

    /// The soonest moment a dry bucket has a token again (only moments
    /// still ahead: once one passed, the claimer was told).
    pub fn next_token_at(&self) -> Option<Instant> {
        let now = Instant::now();
        self.held
            .iter()
            .filter_map(|h| *h.not_before.lock().expect("limiter lock"))
            .filter(|t| *t > now)
            .min()
    }

    /// Claim up to `want` limited events, limit by limit. The events
    /// claimed so far are returned even when a later claim failed (they
    /// are leased), with the error.
    pub async fn claim(
        &self,
        store: &Store,
        worker: &str,
        want: usize,
        lease: Duration,
        paused: &[String],
    ) -> (Vec<Claimed>, Option<StoreError>) {
        let mut out = Vec::new();
        let first = self.turn.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.held.len() {
            let left = want.saturating_sub(out.len());
            if left == 0 {
                break;
            }
            let h = &self.held[(first + i) % self.held.len()];
            // Paused names are not claimed; a limit whose names are all
            // paused is not asked at all (its budget stays untouched).
            let unpaused;
            let limit = if paused.is_empty() || !h.limit.names.iter().any(|n| paused.contains(n)) {
                &h.limit
            } else {
                let names: Vec<String> = h
                    .limit
                    .names
                    .iter()
                    .filter(|n| !paused.contains(n))
                    .cloned()
                    .collect();
                if names.is_empty() {
                    continue;
                }
                unpaused = Limit {
                    names,
                    ..h.limit.clone()
                };
                &unpaused
            };
            if h.not_before
                .lock()
                .expect("limiter lock")
                .is_some_and(|t| t > Instant::now())
            {
                continue;
            }
            match store.claim_limited(worker, limit, left, lease).await {
                Ok(got) => {
                    *h.not_before.lock().expect("limiter lock") =
                        got.wait.map(|w| Instant::now() + w);
                    if let Some(w) = got.wait {
                        metrics::counter!("outrun_limit_throttled_milliseconds_total", "limit" => h.limit.id.clone())
                            .increment(w.as_millis() as u64);
                    }
                    if !got.claimed.is_empty() {
                        metrics::counter!("outrun_limit_claimed_total", "limit" => h.limit.id.clone())
                            .increment(got.claimed.len() as u64);
                        self.check_keys(h, &got.claimed);
                    }
                    out.extend(got.claimed);
                }
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    /// Log, once per limit, an event whose payload has no concurrency key.
    fn check_keys(&self, h: &Held, claimed: &[Claimed]) {
        let Some(p) = &h.limit.per_key else { return };
        if h.fallback_logged.load(Ordering::Relaxed) {
            return;
        }
        if let Some(c) = claimed.iter().find(|c| {
            p.key
                .key_of(&c.event.payload, c.event.group_id.as_deref())
                .is_none()
        }) && !h.fallback_logged.swap(true, Ordering::Relaxed)
        {
            let what = match &p.key {
                KeySource::Pointer { pointer, .. } => {
                    format!("its payload has nothing at JSON pointer {pointer}")
                }
                KeySource::Group => "it has no group id".to_string(),
            };
            tracing::warn!(limit = %h.limit.id, event_id = %c.event.id, name = %c.event.name, fallback_key = FALLBACK_KEY, "an event of a per-key limit has no key ({what}); it runs under the fallback key, shared by every such event (logged once per limit)");
        }
    }
}
