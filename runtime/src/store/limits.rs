//! The store's side of `[[limit]]`: claims of limited event names that
//! never exceed the limit's budget, with `outrun_limits` holding each
//! limit's token bucket and serving as the lock that makes the claims of
//! one limit take turns across instances. See [`crate::limits`].

use std::time::Duration;

use serde::Serialize;

use super::{Result, Store};
use crate::event::Claimed;
use crate::limits::Limit;

/// Rows a per-key claim looks at for each event it may take: rows of keys
/// that are at their limit are skipped before this window, so a busy key
/// does not hold back the others.
pub(super) const SCAN_FACTOR: usize = 4;

/// What [`Store::claim_limited`] did.
#[derive(Debug, Default)]
pub struct LimitedClaim {
    pub claimed: Vec<Claimed>,
    /// The rate limit ran dry: no claim of it is worth making for this long.
    pub wait: Option<Duration>,
}

/// A limit's state in the database, for listings.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LimitState {
    pub limit: String,
    /// Tokens in the bucket as of the last claim (rate limits).
    pub tokens: Option<f64>,
    /// Events of the limit leased now (running, or claimed to run).
    pub running: i64,
    /// Keys with events running now, and the most running under one key.
    pub busy_keys: i64,
    pub max_per_key: i64,
}

impl Store {
    /// Claim up to `want` ready events of `limit`'s names, within its
    /// budget: no more than the tokens its bucket holds (taken in the same
    /// transaction), and for a per-key limit no more events of a key than
    /// `per_key` minus those leased already, anywhere. Otherwise as
    /// [`Store::claim`] (ready, live, group heads, oldest first).
    pub async fn claim_limited(
        &self,
        worker: &str,
        limit: &Limit,
        want: usize,
        lease: Duration,
    ) -> Result<LimitedClaim> {
        match self {
            Store::Sqlite(s) => s.claim_limited(worker, limit, want, lease).await,
            Store::Postgres(s) => s.claim_limited(worker, limit, want, lease).await,
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
