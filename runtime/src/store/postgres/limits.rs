//! Limits on PostgreSQL (see `store/limits.rs`).
//!
//! A grant refills and spends a bucket in one `UPDATE` of its row. A
//! per-key claim is one statement that first takes locks of the limit's
//! slots (`outrun_limit_slots`). A claim far enough from `per_key` holds
//! one of 4 slots and claims without keys beside up to 3 others (an
//! instance keeps two claims in flight; one at a time cost a per-key limit
//! that never binds ~20% of the drain), judging "far enough" by an upper
//! bound of the leased events that the claims keep in the slots (counting
//! them on every claim cost ~10%). Any other claim holds all 4, counts the
//! leased events with a fresh snapshot, so it sees the leases of every
//! claim that held a conflicting lock before it, resets the bound, and
//! counts per key when the limit can bind. The locking and counting happen
//! in outrun's PL/pgSQL functions (migrations 20261204000000,
//! 20261205000100 and 20261206000000, which say why the shared way cannot
//! overshoot):
//! a statement's own snapshot predates its wait for a lock; a function's
//! statements take fresh ones. A claim of a rate limit without a key needs
//! no lock: `SKIP LOCKED` keeps claims apart, and the tokens were granted
//! before.

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::Row;
use uuid::Uuid;

use super::{EVENT_COLUMNS, PgStore, duration_us, event_from_row, prefixed};
use crate::event::Claimed;
use crate::limits::{FALLBACK_KEY, KeySource, Limit, Rate};
use crate::store::Result;
use crate::store::limits::{LimitState, Limited, SCAN_FACTOR};

/// `$7` is the pointer's path, `$8` the fallback key.
const POINTER_KEY: &str = "COALESCE(e.payload::jsonb #>> $7::text[], $8)";
const GROUP_KEY: &str = "COALESCE(e.group_id, $8)";

/// Each claim from the head of the claim index, and after the limit's
/// cursor (as the ordinary claim: see `ClaimCursor` in store/postgres.rs;
/// a per-key limit that never binds walked the dead entries at the head
/// on every claim, ~20% of the drain).
static CLAIM_NO_KEY: [LazyLock<String>; 2] = [
    LazyLock::new(|| limited_claim_sql(None, false)),
    LazyLock::new(|| limited_claim_sql(None, true)),
];
static CLAIM_POINTER: [LazyLock<String>; 2] = [
    LazyLock::new(|| limited_claim_sql(Some((POINTER_KEY, false)), false)),
    LazyLock::new(|| limited_claim_sql(Some((POINTER_KEY, false)), true)),
];
static CLAIM_GROUP: [LazyLock<String>; 2] = [
    LazyLock::new(|| limited_claim_sql(Some((GROUP_KEY, true)), false)),
    LazyLock::new(|| limited_claim_sql(Some((GROUP_KEY, true)), true)),
];

/// The claim of a limit's names (`$2`), at most `$3` events; with a key
/// (its expression, and whether it is the group id), at most `$6` leased
/// events per key, looking at `$9` candidate rows, under the locks of the
/// limit `$10`. When the events leased now plus `$3` cannot exceed `$6`,
/// even were they all one key, no key is computed (no payload parsed):
/// `outrun_limit_gate` decides, and takes the locks. With `after_cursor`,
/// a claim without keys starts after `($6, $7)` (no key) or `($11, $12)`;
/// a keyed claim always starts at the head (rows of busy keys it skipped
/// sort before any cursor).
fn limited_claim_sql(key: Option<(&str, bool)>, after_cursor: bool) -> String {
    let range = match (after_cursor, key) {
        (false, _) => "",
        (true, None) => "AND (e.available_at, e.seq) > ($6, $7)",
        (true, Some(_)) => "AND (e.available_at, e.seq) > ($11, $12)",
    };
    let ready = "e.retry < e.max_retry
               AND e.available_at <= now()
               AND (e.expires_at IS NULL OR e.expires_at > now())
               AND e.name = ANY($2::text[])
               AND (e.group_id IS NULL OR NOT EXISTS (
                   SELECT 1 FROM outbox_events p
                   WHERE p.group_id = e.group_id AND p.seq < e.seq
                     AND p.retry < p.max_retry))";
    let pick = match key {
        None => format!(
            "pick AS (
             SELECT e.id, e.available_at, false AS keyed FROM outbox_events e
             WHERE {ready} {range}
             ORDER BY e.available_at, e.seq
             LIMIT $3
             FOR UPDATE SKIP LOCKED)"
        ),
        // `gate` and `running` are evaluated once each, `running` (and
        // everything keyed) only when the gate is shut: a one-time filter
        // false skips the subplan.
        Some((key, by_group)) => format!(
            "gate AS MATERIALIZED (
             SELECT outrun_limit_gate($10, $2::text[], $3, $6) AS open),
         running AS MATERIALIZED (
             SELECT r.k, r.n FROM outrun_limit_running($10, $2::text[], $7::text[], {by_group}, $8) r
             WHERE NOT (SELECT open FROM gate)),
         unkeyed AS (
             SELECT e.id, e.available_at FROM outbox_events e
             WHERE (SELECT open FROM gate) AND {ready} {range}
             ORDER BY e.available_at, e.seq
             LIMIT $3
             FOR UPDATE SKIP LOCKED),
         cand AS (
             SELECT e.id, e.seq, e.available_at, {key} AS k FROM outbox_events e
             WHERE NOT (SELECT open FROM gate) AND {ready}
               AND NOT EXISTS (SELECT 1 FROM running r WHERE r.k = {key} AND r.n >= $6)
             ORDER BY e.available_at, e.seq
             LIMIT $9
             FOR UPDATE SKIP LOCKED),
         keyed AS (
             SELECT c.id, c.available_at FROM (
                 SELECT cand.*, row_number() OVER (PARTITION BY cand.k ORDER BY cand.available_at, cand.seq) AS rn
                 FROM cand) c
             LEFT JOIN running r ON r.k = c.k
             WHERE c.rn + COALESCE(r.n, 0) <= $6
             ORDER BY c.available_at, c.seq
             LIMIT $3),
         pick AS (
             SELECT id, available_at, false AS keyed FROM unkeyed
             UNION ALL
             SELECT id, available_at, true FROM keyed)"
        ),
    };
    format!(
        "WITH {pick}
         UPDATE outbox_events o
         SET locked_by = $1, lock_token = $5,
             locked_until = now() + $4 * interval '1 microsecond',
             available_at = now() + $4 * interval '1 microsecond'
         FROM pick WHERE o.id = pick.id
         RETURNING {}, pick.keyed",
        prefixed("o", EVENT_COLUMNS).replace("o.available_at", "pick.available_at")
    )
}

/// Refill to now, then take up to `$4` whole tokens. SET sees the row as
/// it was, so `granted` and `tokens` both start from the old balance.
/// `refilled_at` never moves back: a grant that waited for the row lock
/// behind another must not refill the other's interval twice.
const GRANT: &str = "UPDATE outrun_limits l SET
         granted = LEAST($4, floor(LEAST($2, l.tokens + $3 * GREATEST(0, EXTRACT(EPOCH FROM n.t - l.refilled_at))))),
         tokens = LEAST($2, l.tokens + $3 * GREATEST(0, EXTRACT(EPOCH FROM n.t - l.refilled_at)))
                  - LEAST($4, floor(LEAST($2, l.tokens + $3 * GREATEST(0, EXTRACT(EPOCH FROM n.t - l.refilled_at))))),
         refilled_at = GREATEST(l.refilled_at, n.t)
     FROM (SELECT clock_timestamp() AS t) n
     WHERE l.name = $1
     RETURNING l.granted, l.tokens";

/// Claimed rows, oldest first (RETURNING order is unspecified).
fn finish(rows: Vec<sqlx::postgres::PgRow>, token: Uuid) -> Result<Limited> {
    let keyed = match rows.first() {
        Some(r) => r.try_get::<bool, _>("keyed")?,
        None => false,
    };
    let mut claimed = rows
        .iter()
        .map(|r| {
            Ok(Claimed {
                event: event_from_row(r)?,
                token,
                seq: r.try_get::<i64, _>("seq")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    claimed.sort_by_key(|c| (c.event.available_at, c.seq));
    Ok(Limited {
        events: claimed,
        keyed,
    })
}

impl PgStore {
    pub(crate) async fn grant_tokens(
        &self,
        limit: &Limit,
        rate: &Rate,
        want: u64,
    ) -> Result<(f64, f64)> {
        let grant = || {
            sqlx::query_as::<_, (f64, f64)>(GRANT)
                .bind(&limit.id)
                .bind(rate.burst)
                .bind(rate.per_second)
                .bind(want as f64)
        };
        if let Some(row) = grant().fetch_optional(&self.bookkeeping).await? {
            return Ok(row);
        }
        // A new bucket starts full.
        self.ensure_limit_row(&limit.id, rate.burst).await?;
        Ok(grant().fetch_one(&self.bookkeeping).await?)
    }

    async fn ensure_limit_row(&self, id: &str, tokens: f64) -> Result<()> {
        sqlx::query(
            "INSERT INTO outrun_limits (name, tokens, refilled_at) VALUES ($1, $2, clock_timestamp())
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(id)
        .bind(tokens)
        .execute(&self.bookkeeping)
        .await?;
        Ok(())
    }

    pub(crate) async fn claim_limited(
        &self,
        worker: &str,
        limit: &Limit,
        budget: usize,
        lease: Duration,
    ) -> Result<Limited> {
        let token = Uuid::new_v4();
        let budget_i64 = i64::try_from(budget).unwrap_or(i64::MAX);
        let (after, rewinds) = self
            .limit_cursors
            .lock()
            .expect("limit cursors lock")
            .entry(limit.id.clone())
            .or_default()
            .start(true);
        let at = usize::from(after.is_some());
        let query = match &limit.per_key {
            None => sqlx::query(&CLAIM_NO_KEY[at])
                .bind(worker)
                .bind(&limit.names)
                .bind(budget_i64)
                .bind(duration_us(lease))
                .bind(token),
            Some(p) => {
                let (sql, segments) = match &p.key {
                    KeySource::Pointer { segments, .. } => (&CLAIM_POINTER[at], segments.clone()),
                    KeySource::Group => (&CLAIM_GROUP[at], Vec::new()),
                };
                sqlx::query(sql)
                    .bind(worker)
                    .bind(&limit.names)
                    .bind(budget_i64)
                    .bind(duration_us(lease))
                    .bind(token)
                    .bind(i64::from(p.n))
                    .bind(segments)
                    .bind(FALLBACK_KEY)
                    .bind(i64::try_from(budget.saturating_mul(SCAN_FACTOR)).unwrap_or(i64::MAX))
                    .bind(&limit.id)
            }
        };
        let query = match after {
            Some((at, seq)) => query.bind(at).bind(seq),
            None => query,
        };
        let claimed = finish(query.fetch_all(&self.bookkeeping).await?, token)?;
        // A keyed claim skipped the rows of busy keys: they sort before
        // any cursor it could set, so it sets none.
        let last = claimed
            .events
            .last()
            .filter(|_| !claimed.keyed)
            .map(|c| (c.event.available_at, c.seq));
        if let Some(c) = self
            .limit_cursors
            .lock()
            .expect("limit cursors lock")
            .get_mut(&limit.id)
        {
            c.advance(
                after.is_none(),
                rewinds,
                last,
                claimed.events.len() == budget,
            );
        }
        Ok(claimed)
    }

    pub(crate) async fn limit_state(&self, limit: &Limit) -> Result<LimitState> {
        let tokens: Option<f64> = match &limit.rate {
            Some(rate) => sqlx::query_scalar(
                "SELECT LEAST($2, tokens + $3 * GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp() - refilled_at)))
                 FROM outrun_limits WHERE name = $1",
            )
            .bind(&limit.id)
            .bind(rate.burst)
            .bind(rate.per_second)
            .fetch_optional(&self.pool)
            .await?
            .or(Some(rate.burst)),
            None => None,
        };
        let key = match limit.per_key.as_ref().map(|p| &p.key) {
            Some(KeySource::Pointer { .. }) => POINTER_KEY,
            Some(KeySource::Group) => GROUP_KEY,
            None => "''",
        };
        let segments = match limit.per_key.as_ref().map(|p| &p.key) {
            Some(KeySource::Pointer { segments, .. }) => segments.clone(),
            _ => Vec::new(),
        };
        let row = sqlx::query(&format!(
            "SELECT COALESCE(sum(n), 0)::int8 AS running, count(*) AS keys, COALESCE(max(n), 0)::int8 AS max_n FROM (
                 SELECT {key} AS k, count(*) AS n FROM outbox_events e
                 WHERE e.retry < e.max_retry AND e.lock_token IS NOT NULL AND e.locked_until > now()
                   AND e.name = ANY($1::text[]) AND cardinality($7::text[]) >= 0 AND $8::text IS NOT NULL
                 GROUP BY 1) per_key"
        )
        .replace("$7", "$2")
        .replace("$8", "$3"))
        .bind(&limit.names)
        .bind(segments)
        .bind(FALLBACK_KEY)
        .fetch_one(&self.pool)
        .await?;
        Ok(LimitState {
            limit: limit.id.clone(),
            tokens,
            running: row.try_get("running")?,
            busy_keys: if limit.per_key.is_some() {
                row.try_get("keys")?
            } else {
                0
            },
            max_per_key: if limit.per_key.is_some() {
                row.try_get("max_n")?
            } else {
                0
            },
        })
    }
}
