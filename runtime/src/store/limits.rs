//! The store's side of `[[limit]]`: `outrun_limits` holds each rate
//! limit's token bucket, from which instances take grants of tokens
//! ([`Store::grant_tokens`], one statement); per-key claims count the
//! leased events under a lock (PostgreSQL: the limit's rows in
//! `outrun_limit_slots`; SQLite: the one writer), so no two claims of a
//! limit count past each other across instances
//! ([`Store::claim_limited`]). See [`crate::limits`] and
//! `dispatch/limiter.rs` for how the claimer spends grants.

use std::time::Duration;

use serde::Serialize;

use super::{Result, Store};
use crate::event::Claimed;
use crate::limits::{Limit, Rate, token_wait};

/// Rows a per-key claim looks at for each event it may take: rows of keys
/// that are at their limit are skipped before this window, so a busy key
/// does not hold back the others.
pub(super) const SCAN_FACTOR: usize = 4;

/// What [`Store::grant_tokens`] took from a bucket.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Grant {
    /// Whole tokens taken (each allows claiming one event).
    pub granted: u64,
    /// The bucket ran dry (nothing granted): no token for this long.
    pub wait: Option<Duration>,
}

/// What [`Store::claim_limited`] claimed.
#[derive(Debug, Default)]
pub struct Limited {
    /// Leased, oldest first.
    pub events: Vec<Claimed>,
    /// The claim computed keys (a per-key limit that could bind): only
    /// then did an event's missing key matter, so only then is it worth
    /// parsing payloads to warn about one.
    pub keyed: bool,
}

/// A limit's state in the database, for listings.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LimitState {
    pub limit: String,
    /// Tokens in the bucket (rate limits), not counting tokens that
    /// instances hold in grants they have not spent yet (at most a few
    /// claims' worth each).
    pub tokens: Option<f64>,
    /// Events of the limit leased now (running, or claimed to run).
    pub running: i64,
    /// Keys with events running now, and the most running under one key.
    pub busy_keys: i64,
    pub max_per_key: i64,
}

impl Store {
    /// Take up to `want` whole tokens from `limit`'s bucket (refilled to
    /// now first; a new bucket starts full), in one statement. The tokens
    /// are spent by the caller's claims; unspent ones are the caller's to
    /// keep for its next claims, never given back, so the bucket's rate
    /// bounds every instance's claims together.
    pub async fn grant_tokens(&self, limit: &Limit, rate: &Rate, want: u64) -> Result<Grant> {
        if want == 0 {
            return Ok(Grant::default());
        }
        let (granted, left) = match self {
            Store::Sqlite(s) => s.grant_tokens(limit, rate, want).await?,
            Store::Postgres(s) => s.grant_tokens(limit, rate, want).await?,
        };
        let granted = granted.max(0.0) as u64;
        Ok(Grant {
            granted,
            wait: (granted == 0).then(|| token_wait(left, rate.per_second)),
        })
    }

    /// Claim up to `budget` ready events of `limit`'s names; for a per-key
    /// limit no more events of a key than `per_key` minus those leased
    /// already, anywhere (the claims of one per-key limit hold locks of
    /// its slots while they count, so each counts the leases of every
    /// claim that could push a key past `per_key`).
    /// Otherwise as [`Store::claim`] (ready, live, group heads, oldest
    /// first). Rate tokens are not touched: `budget` is what the caller
    /// may spend.
    pub async fn claim_limited(
        &self,
        worker: &str,
        limit: &Limit,
        budget: usize,
        lease: Duration,
    ) -> Result<Limited> {
        if budget == 0 {
            return Ok(Limited::default());
        }
        match self {
            Store::Sqlite(s) => s.claim_limited(worker, limit, budget, lease).await,
            Store::Postgres(s) => s.claim_limited(worker, limit, budget, lease).await,
        }
    }

    /// The state of each limit in `limits` (tokens, events running now).
    pub async fn limit_states(&self, limits: &[Limit]) -> Result<Vec<LimitState>> {
        let mut out = Vec::with_capacity(limits.len());
        for l in limits {
            out.push(match self {
                Store::Sqlite(s) => s.limit_state(l).await?,
                Store::Postgres(s) => s.limit_state(l).await?,
            });
        }
        Ok(out)
    }
}
