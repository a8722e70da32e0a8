//! The claimer's side of `[[limit]]` (see [`crate::limits`]). Rate tokens
//! come from the shared bucket in grants of a few claims' worth
//! ([`Store::grant_tokens`]) and are spent locally. Before the ordinary
//! claim, each limit either lets the ordinary claim take its names (a rate
//! limit without a key whose tokens cover the whole claim: a limit that
//! does not bind costs no claim of its own) or claims them itself through
//! [`Store::claim_limited`] within its budget, and the ordinary claim skips
//! them. A rate limit that ran dry is not asked again until its next token
//! is due: the dispatch loop sleeps until [`Limiter::next_token_at`]
//! instead of polling the bucket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::event::Claimed;
use crate::limits::{FALLBACK_KEY, KeySource, Limit, Limits};
use crate::store::{Store, StoreError};

/// A grant asks for this many claims' worth of tokens, so a rate limit
/// that does not bind costs one small statement every few claims...
const GRANT_CLAIMS: u64 = 4;

/// ...or for up to this many claims' worth, as long as that is no more
/// than [`GRANT_SPAN_SECONDS`] of the rate. A grant is a round trip in the claim's
/// path: one every 4 claims cost a rate limit far above the drain's speed
/// ~4% of a PostgreSQL drain (0.95 of the plain drain; 0.99 with one every
/// 64). Tokens an instance holds are taken from the shared bucket but not
/// yet spent, so a rate the drain can reach is still granted in small
/// pieces that the instances share.
const GRANT_CLAIMS_MAX: u64 = 64;

/// The most of a rate's time one grant asks for beyond `GRANT_CLAIMS`.
const GRANT_SPAN_SECONDS: f64 = 0.1;

/// Tokens a grant asks for when the instance holds `have` and a claim
/// wants `want`.
fn grant_ask(rate: &crate::limits::Rate, want: u64, have: u64) -> u64 {
    let span = (rate.per_second * GRANT_SPAN_SECONDS) as u64;
    let target = want
        .saturating_mul(GRANT_CLAIMS)
        .max(span.min(want.saturating_mul(GRANT_CLAIMS_MAX)));
    target.saturating_sub(have)
}

/// What the claimer keeps per limit.
struct Held {
    limit: Limit,
    /// No claim of this limit before this: its bucket is empty until then.
    not_before: Mutex<Option<Instant>>,
    /// The missing-key warning was logged (once per limit and process).
    fallback_logged: AtomicBool,
    /// Rate tokens granted to this instance and not spent yet. Taken out
    /// before a claim (so two claims in flight cannot spend the same
    /// token) and the unspent part put back after.
    tokens: Mutex<u64>,
    /// A per-key limit's last claim counted keys: it was close enough to
    /// `per_key` to bind, so a finished event may free a slot that a
    /// held-back event waits for. After a claim too far from `per_key` to
    /// bind, nothing waits: finished events are acked in batches like any
    /// other (acking each at once and waking the claimer cost a per-key
    /// limit that never binds ~8% of the drain).
    keyed: AtomicBool,
}

impl Held {
    fn tokens(&self) -> std::sync::MutexGuard<'_, u64> {
        self.tokens.lock().expect("limiter tokens lock")
    }
}

pub struct Limiter {
    held: Vec<Held>,
    /// Names of per-key limits, and their limit: a finished event of one
    /// may free a slot of its key, so the claimer should look again at
    /// once (see [`Held::keyed`]).
    per_key: HashMap<String, usize>,
    /// Which limit claims first next time, so none is always last.
    turn: AtomicUsize,
}

/// Tokens taken out for the ordinary claim: (limit, tokens) pairs.
#[derive(Default)]
pub struct Reserved(Vec<(usize, u64)>);

/// What [`Limiter::claim`] did before the ordinary claim.
#[derive(Default)]
pub struct Prepared {
    /// Events claimed through their limits (leased).
    pub claimed: Vec<Claimed>,
    /// Names the ordinary claim must skip: their limit claimed them above
    /// within its budget, or has no budget now.
    pub excluded: Vec<String>,
    /// Rate limits whose names the ordinary claim may take: each holds
    /// tokens for a whole claim, taken out here; [`Limiter::settle`] puts
    /// back what the ordinary claim did not spend.
    pub reserved: Reserved,
    /// A claim or grant that failed (the rest went on).
    pub error: Option<StoreError>,
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
            per_key: limits
                .limits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.per_key.is_some())
                .flat_map(|(i, l)| l.names.iter().map(move |n| (n.clone(), i)))
                .collect(),
            held: limits
                .limits
                .into_iter()
                .map(|limit| Held {
                    limit,
                    not_before: Mutex::new(None),
                    fallback_logged: AtomicBool::new(false),
                    tokens: Mutex::new(0),
                    // Until the first claim says otherwise.
                    keyed: AtomicBool::new(true),
                })
                .collect(),
            turn: AtomicUsize::new(0),
        })
    }

    /// Whether a finished event of `name` may have made room for another
    /// claim of its limit.
    pub fn frees_room(&self, name: &str) -> bool {
        self.per_key
            .get(name)
            .is_some_and(|&i| self.held[i].keyed.load(Ordering::Relaxed))
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

    /// Prepare a claim of up to `want` events, limit by limit. A rate
    /// limit without a key that holds tokens for the whole claim does not
    /// bind: its names are left to the ordinary claim (the cheapest path;
    /// the tokens are reserved). Every other limit claims its names here,
    /// within its budget (tokens held, free slots per key), and the
    /// ordinary claim skips them.
    pub async fn claim(
        &self,
        store: &Store,
        worker: &str,
        want: usize,
        lease: Duration,
        paused: &[String],
    ) -> Prepared {
        let mut out = Prepared::default();
        let first = self.turn.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.held.len() {
            let idx = (first + i) % self.held.len();
            let h = &self.held[idx];
            // Paused names are not claimed (the ordinary claim skips them
            // too); a limit whose names are all paused is not asked at all
            // (its budget stays untouched).
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
                out.excluded.extend_from_slice(&h.limit.names);
                continue;
            }
            let left = want.saturating_sub(out.claimed.len());
            // What this limit may claim now, taken out of its tokens.
            let mut budget = left;
            if let Some(rate) = &h.limit.rate {
                let have = *h.tokens();
                if have < want as u64 {
                    let ask = grant_ask(rate, want as u64, have);
                    match store.grant_tokens(&h.limit, rate, ask).await {
                        Ok(g) => {
                            *h.tokens() += g.granted;
                            if let Some(w) = g.wait
                                && have == 0
                            {
                                *h.not_before.lock().expect("limiter lock") =
                                    Some(Instant::now() + w);
                                metrics::counter!("outrun_limit_throttled_milliseconds_total", "limit" => h.limit.id.clone())
                                    .increment(w.as_millis() as u64);
                            }
                        }
                        Err(e) => out.error = Some(e),
                    }
                }
                let mut tokens = h.tokens();
                if h.limit.per_key.is_none() && *tokens >= want as u64 {
                    *tokens -= want as u64;
                    out.reserved.0.push((idx, want as u64));
                    continue;
                }
                budget = budget.min(*tokens as usize);
                *tokens -= budget as u64;
            }
            out.excluded.extend_from_slice(&h.limit.names);
            if budget == 0 {
                continue;
            }
            match store.claim_limited(worker, limit, budget, lease).await {
                Ok(crate::store::Limited { events: got, keyed }) => {
                    // An empty claim may have found every key busy (on
                    // PostgreSQL it returns no row to say which way it
                    // went): keep finished events prompt.
                    h.keyed.store(keyed || got.is_empty(), Ordering::Relaxed);
                    if h.limit.rate.is_some() {
                        *h.tokens() += (budget - got.len()) as u64;
                    }
                    if !got.is_empty() {
                        metrics::counter!("outrun_limit_claimed_total", "limit" => h.limit.id.clone())
                            .increment(got.len() as u64);
                        if keyed {
                            self.check_keys(h, &got);
                        }
                    }
                    out.claimed.extend(got);
                }
                Err(e) => {
                    if h.limit.rate.is_some() {
                        *h.tokens() += budget as u64;
                    }
                    out.error = Some(e);
                }
            }
        }
        out
    }

    /// After the ordinary claim (`more`, or nothing if it failed): spend
    /// the reserved tokens of the events it took, put back the rest.
    pub fn settle(&self, reserved: Reserved, more: &[Claimed]) {
        for (idx, n) in reserved.0 {
            let h = &self.held[idx];
            let used = more
                .iter()
                .filter(|c| h.limit.names.contains(&c.event.name))
                .count() as u64;
            *h.tokens() += n.saturating_sub(used);
            if used > 0 {
                metrics::counter!("outrun_limit_claimed_total", "limit" => h.limit.id.clone())
                    .increment(used);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use crate::limits::PerKey;

    fn per_key(n: u32) -> Limits {
        Limits {
            limits: vec![Limit {
                id: "event:k".into(),
                names: vec!["k".into()],
                rate: None,
                per_key: Some(PerKey {
                    key: KeySource::parse("/c").unwrap(),
                    n,
                }),
            }],
        }
    }

    /// A finished event of a per-key limit wakes the claimer and skips the
    /// ack batch's linger only while the limit's claims count keys: after a
    /// claim too far from `per_key` to bind, it is acked like any other;
    /// after a claim that counted keys (or found nothing), promptly again.
    #[tokio::test]
    async fn finished_events_free_room_only_while_the_limit_can_bind() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::connect(&url, &Default::default()).await.unwrap();
        store.migrate().await.unwrap();
        let events: Vec<NewEvent> = (0..5).map(|_| NewEvent::new("k", r#"{"c":"a"}"#)).collect();
        store.enqueue_batch(&events, 5).await.unwrap();
        let lease = Duration::from_secs(60);

        let far = Limiter::new(per_key(1000)).unwrap();
        assert!(far.frees_room("k"), "before any claim: prompt");
        assert!(!far.frees_room("other"), "not a per-key name");
        let got = far.claim(&store, "w", 2, lease, &[]).await;
        assert_eq!(got.claimed.len(), 2);
        assert!(!far.frees_room("k"), "2 + 2 of 1000 cannot bind: batched");

        let near = Limiter::new(per_key(3)).unwrap();
        let got = near.claim(&store, "w", 2, lease, &[]).await;
        assert_eq!(got.claimed.len(), 1, "2 of key a leased, per_key 3");
        assert!(near.frees_room("k"), "keys counted: prompt");

        let got = far.claim(&store, "w", 2, lease, &[]).await;
        assert_eq!(got.claimed.len(), 2);
        assert!(!far.frees_room("k"));
        let got = far.claim(&store, "w", 2, lease, &[]).await;
        assert!(got.claimed.is_empty());
        assert!(far.frees_room("k"), "an empty claim may have met busy keys");
    }

    #[test]
    fn grants_cover_a_few_claims_or_a_tenth_of_a_second_of_a_fast_rate() {
        let rate = |r: &str| crate::limits::Rate::parse(r).unwrap();
        // A rate the drain can reach: 4 claims' worth, as before.
        assert_eq!(grant_ask(&rate("100/s"), 256, 0), 1024);
        assert_eq!(grant_ask(&rate("20000/s"), 256, 0), 2000);
        // Far above it: up to 64 claims' worth.
        assert_eq!(grant_ask(&rate("1000000/s"), 256, 0), 64 * 256);
        // What the instance holds counts.
        assert_eq!(grant_ask(&rate("100/s"), 256, 100), 924);
        assert_eq!(grant_ask(&rate("100/s"), 256, 5000), 0);
    }
}
