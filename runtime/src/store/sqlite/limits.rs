//! Limits on SQLite (see `store/limits.rs`): a grant and a limited claim
//! are each one transaction on the writer, which already serialises every
//! claim, so a per-key claim counts the leased events per key without a
//! lock of its own. The key of a payload
//! comes from `outrun_json_pointer(payload, pointer)`, a function the
//! writer connection registers (RFC 6901 pointers, which `json_extract`
//! paths cannot express exactly: "/0" may be a key or an index).

use std::time::Duration;

use rusqlite::OptionalExtension;

use super::{ClaimRow, SqliteStore, duration_ms, now_ms};
use crate::event::Claimed;
use crate::limits::{FALLBACK_KEY, KeySource, Limit, Rate};
use crate::store::Result;
use crate::store::limits::{LimitState, Limited, SCAN_FACTOR};

/// `?5` is the pointer, `?6` the fallback key.
const POINTER_KEY: &str = "COALESCE(outrun_json_pointer(e.payload, ?5), ?6)";
const GROUP_KEY: &str = "COALESCE(e.group_id, ?6)";

/// The events to claim: ready events of the names `?2`, at most `?3`;
/// with a key (row ids only) at most `?4` leased per key, among `?7`
/// candidates; without one, the claimed rows themselves, as the ordinary
/// claim selects them (one statement fewer on the path a limit that does
/// not bind takes every time).
fn pick_sql(key: Option<&str>) -> String {
    let ready = "e.retry < e.max_retry
           AND e.available_at <= ?1
           AND (e.expires_at IS NULL OR e.expires_at > ?1)
           AND (e.locked_until IS NULL OR e.locked_until < ?1)
           AND e.name IN (SELECT value FROM json_each(?2))
           AND (e.group_id IS NULL OR NOT EXISTS (
               SELECT 1 FROM outbox_events p
               WHERE p.group_id = e.group_id AND p.rowid < e.rowid
                 AND p.retry < p.max_retry))";
    match key {
        None => format!(
            "SELECT e.rowid, e.id, e.name, e.payload, e.group_id, e.retry, e.max_retry,
                    e.create_date, e.available_at, e.expires_at, e.last_error,
                    e.idempotency_key, e.deferrals, e.traceparent
             FROM outbox_events e WHERE {ready}
             ORDER BY e.available_at, e.rowid LIMIT ?3"
        ),
        Some(key) => format!(
            "WITH running AS (
                 SELECT {key} AS k, count(*) AS n FROM outbox_events e
                 WHERE e.retry < e.max_retry AND e.available_at >= ?1
                   AND e.lock_token IS NOT NULL AND e.locked_until >= ?1
                   AND e.name IN (SELECT value FROM json_each(?2))
                 GROUP BY 1),
             cand AS (
                 SELECT e.rowid AS rid, e.available_at AS av, {key} AS k FROM outbox_events e
                 WHERE {ready}
                   AND NOT EXISTS (SELECT 1 FROM running r WHERE r.k = {key} AND r.n >= ?4)
                 ORDER BY e.available_at, e.rowid LIMIT ?7),
             ranked AS (
                 SELECT rid, av, k, row_number() OVER (PARTITION BY k ORDER BY av, rid) AS rn FROM cand)
             SELECT ranked.rid FROM ranked LEFT JOIN running r ON r.k = ranked.k
             WHERE ranked.rn + COALESCE(r.n, 0) <= ?4
             ORDER BY ranked.av, ranked.rid LIMIT ?3"
        ),
    }
}

impl SqliteStore {
    pub(crate) async fn grant_tokens(
        &self,
        limit: &Limit,
        rate: &Rate,
        want: u64,
    ) -> Result<(f64, f64)> {
        let id = limit.id.clone();
        let rate = *rate;
        let now = now_ms();
        self.writer
            .run_tx(move |conn| {
                let stored: Option<(f64, i64)> = conn
                    .prepare_cached("SELECT tokens, refilled_at FROM outrun_limits WHERE name = ?1")?
                    .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let (tokens, at) = match stored {
                    // A new bucket starts full.
                    None => (rate.burst, now),
                    Some((tokens, at)) => (
                        (tokens + rate.per_second * ((now - at).max(0) as f64 / 1000.0))
                            .min(rate.burst),
                        at.max(now),
                    ),
                };
                let granted = tokens.floor().max(0.0).min(want as f64);
                let left = tokens - granted;
                conn.prepare_cached(
                    "INSERT INTO outrun_limits (name, tokens, refilled_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET tokens = excluded.tokens, refilled_at = excluded.refilled_at",
                )?
                .execute(rusqlite::params![id, left, at])?;
                Ok((granted, left))
            })
            .await
    }

    pub(crate) async fn claim_limited(
        &self,
        worker: &str,
        limit: &Limit,
        budget: usize,
        lease: Duration,
    ) -> Result<Limited> {
        let limit = limit.clone();
        let worker_name = worker.to_string();
        let now = now_ms();
        let locked_until = now.saturating_add(duration_ms(lease));
        let token = uuid::Uuid::new_v4();
        let (rows, keyed) = self
            .writer
            .run_tx(move |conn| {
                let n = budget;
                let mut keyed = false;
                let mut rows: Vec<(i64, ClaimRow)> = Vec::new();
                if n > 0 {
                    let names = serde_json::to_string(&limit.names).expect("strings serialise");
                    // As on PostgreSQL: a claim that cannot take any key
                    // past `per_key`, were all leased events one key, needs
                    // no keys.
                    let cannot_bind = match &limit.per_key {
                        Some(p) => {
                            let leased: i64 = conn
                                .prepare_cached(
                                    "SELECT count(*) FROM outbox_events e
                                     WHERE e.retry < e.max_retry AND e.available_at >= ?1
                                       AND e.lock_token IS NOT NULL AND e.locked_until >= ?1
                                       AND e.name IN (SELECT value FROM json_each(?2))",
                                )?
                                .query_row(rusqlite::params![now, names], |r| r.get(0))?;
                            leased.saturating_add(n as i64) <= i64::from(p.n)
                        }
                        None => true,
                    };
                    let (sql, pointer, per_key) = match limit.per_key.as_ref().filter(|_| !cannot_bind) {
                        None => (pick_sql(None), String::new(), 0),
                        Some(p) => match &p.key {
                            KeySource::Pointer { pointer, .. } => {
                                (pick_sql(Some(POINTER_KEY)), pointer.clone(), i64::from(p.n))
                            }
                            KeySource::Group => {
                                (pick_sql(Some(GROUP_KEY)), String::new(), i64::from(p.n))
                            }
                        },
                    };
                    keyed = !cannot_bind;
                    let rowids: Vec<i64> = {
                        let mut stmt = conn.prepare_cached(&sql)?;
                        let mut ids = Vec::new();
                        if !cannot_bind {
                            let mut found = stmt.query(rusqlite::params![
                                now,
                                names,
                                n as i64,
                                per_key,
                                pointer,
                                FALLBACK_KEY,
                                (n * SCAN_FACTOR) as i64,
                            ])?;
                            while let Some(r) = found.next()? {
                                ids.push(r.get(0)?);
                            }
                        } else {
                            let mut found = stmt.query(rusqlite::params![now, names, n as i64])?;
                            while let Some(r) = found.next()? {
                                let rowid: i64 = r.get(0)?;
                                ids.push(rowid);
                                rows.push((rowid, ClaimRow::read(r)?));
                            }
                        }
                        ids
                    };
                    if !rowids.is_empty() {
                        let ids = serde_json::to_string(&rowids).expect("integers serialise");
                        // The keyed pick found row ids only.
                        if rows.is_empty() {
                            let mut select = conn.prepare_cached(
                                "SELECT e.rowid, e.id, e.name, e.payload, e.group_id, e.retry, e.max_retry,
                                        e.create_date, e.available_at, e.expires_at, e.last_error,
                                        e.idempotency_key, e.deferrals, e.traceparent
                                 FROM outbox_events e
                                 WHERE e.rowid IN (SELECT value FROM json_each(?1))
                                 ORDER BY e.available_at, e.rowid",
                            )?;
                            let mut found = select.query([&ids])?;
                            while let Some(r) = found.next()? {
                                rows.push((r.get(0)?, ClaimRow::read(r)?));
                            }
                        }
                        conn.prepare_cached(
                            "UPDATE outbox_events
                             SET locked_by = ?1, locked_until = ?2, lock_token = ?3, available_at = ?2
                             WHERE rowid IN (SELECT value FROM json_each(?4))",
                        )?
                        .execute(rusqlite::params![
                            worker_name,
                            locked_until,
                            token.to_string(),
                            ids,
                        ])?;
                    }
                }
                Ok((rows, keyed))
            })
            .await?;
        let events = rows
            .into_iter()
            .map(|(seq, r)| {
                Ok(Claimed {
                    event: r.into_event(worker, locked_until)?,
                    token,
                    seq,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Limited { events, keyed })
    }

    pub(crate) async fn limit_state(&self, limit: &Limit) -> Result<LimitState> {
        let limit = limit.clone();
        let now = now_ms();
        self.writer
            .run(move |conn| {
                let tokens = match &limit.rate {
                    Some(rate) => Some(
                        conn.prepare_cached(
                            "SELECT tokens, refilled_at FROM outrun_limits WHERE name = ?1",
                        )?
                        .query_row([&limit.id], |r| Ok((r.get::<_, f64>(0)?, r.get::<_, i64>(1)?)))
                        .optional()?
                        .map_or(rate.burst, |(t, at)| {
                            (t + rate.per_second * ((now - at).max(0) as f64 / 1000.0))
                                .min(rate.burst)
                        }),
                    ),
                    None => None,
                };
                let (key, pointer) = match limit.per_key.as_ref().map(|p| &p.key) {
                    Some(KeySource::Pointer { pointer, .. }) => (POINTER_KEY, pointer.clone()),
                    Some(KeySource::Group) => (GROUP_KEY, String::new()),
                    None => ("''", String::new()),
                };
                let sql = format!(
                    "SELECT COALESCE(sum(n), 0), count(*), COALESCE(max(n), 0) FROM (
                         SELECT {key} AS k, count(*) AS n FROM outbox_events e
                         WHERE e.retry < e.max_retry AND e.lock_token IS NOT NULL AND e.locked_until >= ?1
                           AND e.name IN (SELECT value FROM json_each(?2))
                           AND ?5 IS NOT NULL AND ?6 IS NOT NULL
                         GROUP BY 1)"
                )
                .replace("?5", "?3")
                .replace("?6", "?4");
                let names = serde_json::to_string(&limit.names).expect("strings serialise");
                let (running, keys, max_n): (i64, i64, i64) = conn.prepare(&sql)?.query_row(
                    rusqlite::params![now, names, pointer, FALLBACK_KEY],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                let keyed = limit.per_key.is_some();
                Ok(LimitState {
                    limit: limit.id.clone(),
                    tokens,
                    running,
                    busy_keys: if keyed { keys } else { 0 },
                    max_per_key: if keyed { max_n } else { 0 },
                })
            })
            .await
    }
}
