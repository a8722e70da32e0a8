//! Limited claims on PostgreSQL (see `store/limits.rs`).
//!
//! The claim transaction locks the limit's row of `outrun_limits` first,
//! so the claims of one limit run one at a time across instances and each
//! sees the leases of the one before (committed), then refills and spends
//! the token bucket and counts the leased events per key in the same
//! transaction. Time in the bucket is `clock_timestamp()`: a claim that
//! waited for the row lock must not refill from its transaction's start.

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::Row;
use uuid::Uuid;

use super::{EVENT_COLUMNS, PgStore, duration_us, event_from_row, prefixed};
use crate::event::Claimed;
use crate::limits::{FALLBACK_KEY, KeySource, Limit, token_wait};
use crate::store::Result;
use crate::store::limits::{LimitState, LimitedClaim, SCAN_FACTOR};

/// `$7` is the pointer's path, `$8` the fallback key.
const POINTER_KEY: &str = "COALESCE(e.payload::jsonb #>> $7::text[], $8)";
const GROUP_KEY: &str = "COALESCE(e.group_id, $8)";

static CLAIM_NO_KEY: LazyLock<String> = LazyLock::new(|| limited_claim_sql(None));
static CLAIM_POINTER: LazyLock<String> = LazyLock::new(|| limited_claim_sql(Some(POINTER_KEY)));
static CLAIM_GROUP: LazyLock<String> = LazyLock::new(|| limited_claim_sql(Some(GROUP_KEY)));

/// The claim of a limit's names (`$2`), at most `$3` events; with a key,
/// at most `$6` leased events per key, looking at `$9` candidate rows.
fn limited_claim_sql(key: Option<&str>) -> String {
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
             SELECT e.id, e.available_at FROM outbox_events e
             WHERE {ready}
             ORDER BY e.available_at, e.seq
             LIMIT $3
             FOR UPDATE SKIP LOCKED)"
        ),
        // Leased rows have their lease's end as available_at (see the
        // module docs of postgres.rs), so the claim index finds them.
        Some(key) => format!(
            "running AS (
             SELECT {key} AS k, count(*) AS n FROM outbox_events e
             WHERE e.retry < e.max_retry AND e.available_at > now()
               AND e.lock_token IS NOT NULL AND e.locked_until > now()
               AND e.name = ANY($2::text[]) AND cardinality($7::text[]) >= 0
             GROUP BY 1),
         cand AS (
             SELECT e.id, e.seq, e.available_at, {key} AS k FROM outbox_events e
             WHERE {ready}
               AND NOT EXISTS (SELECT 1 FROM running r WHERE r.k = {key} AND r.n >= $6)
             ORDER BY e.available_at, e.seq
             LIMIT $9
             FOR UPDATE SKIP LOCKED),
         pick AS (
             SELECT c.id, c.available_at FROM (
                 SELECT cand.*, row_number() OVER (PARTITION BY cand.k ORDER BY cand.available_at, cand.seq) AS rn
                 FROM cand) c
             LEFT JOIN running r ON r.k = c.k
             WHERE c.rn + COALESCE(r.n, 0) <= $6
             ORDER BY c.available_at, c.seq
             LIMIT $3)"
        ),
    };
    format!(
        "WITH {pick}
         UPDATE outbox_events o
         SET locked_by = $1, lock_token = $5,
             locked_until = now() + $4 * interval '1 microsecond',
             available_at = now() + $4 * interval '1 microsecond'
         FROM pick WHERE o.id = pick.id
         RETURNING {}",
        prefixed("o", EVENT_COLUMNS).replace("o.available_at", "pick.available_at")
    )
}

impl PgStore {
    pub(crate) async fn claim_limited(
        &self,
        worker: &str,
        limit: &Limit,
        want: usize,
        lease: Duration,
    ) -> Result<LimitedClaim> {
        if want == 0 {
            return Ok(LimitedClaim::default());
        }
        let mut tx = self.bookkeeping.begin().await?;
        // A new bucket starts full.
        sqlx::query(
            "INSERT INTO outrun_limits (name, tokens, refilled_at) VALUES ($1, $2, clock_timestamp())
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&limit.id)
        .bind(limit.rate.map_or(0.0, |r| r.burst))
        .execute(&mut *tx)
        .await?;
        let budget = match &limit.rate {
            Some(rate) => {
                let tokens: f64 = sqlx::query_scalar(
                    "UPDATE outrun_limits
                     SET tokens = LEAST($2, tokens + $3 * GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp() - refilled_at))),
                         refilled_at = clock_timestamp()
                     WHERE name = $1
                     RETURNING tokens",
                )
                .bind(&limit.id)
                .bind(rate.burst)
                .bind(rate.per_second)
                .fetch_one(&mut *tx)
                .await?;
                let n = (tokens.floor().max(0.0) as usize).min(want);
                if n == 0 {
                    tx.commit().await?;
                    return Ok(LimitedClaim {
                        claimed: Vec::new(),
                        wait: Some(token_wait(tokens, rate.per_second)),
                    });
                }
                n
            }
            None => {
                sqlx::query("SELECT 1 FROM outrun_limits WHERE name = $1 FOR UPDATE")
                    .bind(&limit.id)
                    .execute(&mut *tx)
                    .await?;
                want
            }
        };
        let token = Uuid::new_v4();
        let (sql, segments, per_key) = match &limit.per_key {
            None => (&*CLAIM_NO_KEY, Vec::new(), 0),
            Some(p) => match &p.key {
                KeySource::Pointer { segments, .. } => {
                    (&*CLAIM_POINTER, segments.clone(), i64::from(p.n))
                }
                KeySource::Group => (&*CLAIM_GROUP, Vec::new(), i64::from(p.n)),
            },
        };
        let mut query = sqlx::query(sql)
            .bind(worker)
            .bind(&limit.names)
            .bind(i64::try_from(budget).unwrap_or(i64::MAX))
            .bind(duration_us(lease))
            .bind(token);
        if limit.per_key.is_some() {
            query = query
                .bind(per_key)
                .bind(segments)
                .bind(FALLBACK_KEY)
                .bind(i64::try_from(budget.saturating_mul(SCAN_FACTOR)).unwrap_or(i64::MAX));
        }
        let rows = query.fetch_all(&mut *tx).await?;
        if limit.rate.is_some() && !rows.is_empty() {
            sqlx::query("UPDATE outrun_limits SET tokens = tokens - $2 WHERE name = $1")
                .bind(&limit.id)
                .bind(rows.len() as f64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
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
        Ok(LimitedClaim {
            claimed,
            wait: None,
        })
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
