//! `outrun_schedules` on SQLite (see `store/schedules.rs`): the firing runs
//! in one transaction on the writer, which is the lock.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{SqliteStore, ms_to_time, parse_id, writer};
use crate::schedule::Schedule;
use crate::store::Result;
use crate::store::schedules::{Advanced, ScheduleState, reached};

impl SqliteStore {
    pub(crate) async fn advance_schedule(
        &self,
        schedule: Schedule,
        now: DateTime<Utc>,
        default_max_retry: i32,
    ) -> Result<Advanced> {
        let advanced = self
            .writer
            .run_tx(move |conn| {
                let name = schedule.name();
                conn.prepare_cached(
                    "INSERT INTO outrun_schedules (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
                )?
                .execute([name])?;
                let (spec, last): (Option<String>, Option<i64>) = conn
                    .prepare_cached("SELECT spec, last_tick FROM outrun_schedules WHERE name = ?1")?
                    .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let last = last.map(ms_to_time).transpose()?;
                let Some(plan) = schedule.plan(reached(spec.as_deref(), last, &schedule), now)
                else {
                    return Ok(Advanced::default());
                };
                let mut ids = Vec::with_capacity(plan.ticks.len());
                for tick in &plan.ticks {
                    ids.push(writer::enqueue(
                        conn,
                        &schedule.event(*tick),
                        default_max_retry,
                    )?);
                }
                conn.prepare_cached(
                    "UPDATE outrun_schedules
                     SET spec = ?2, last_tick = ?3,
                         fired_at = CASE WHEN ?4 IS NULL THEN fired_at ELSE ?5 END,
                         last_event = COALESCE(?4, last_event)
                     WHERE name = ?1",
                )?
                .execute(rusqlite::params![
                    name,
                    schedule.describe(),
                    plan.reached.timestamp_millis(),
                    ids.last().map(|id| id.to_string()),
                    Utc::now().timestamp_millis(),
                ])?;
                Ok(Advanced {
                    plan: Some(plan),
                    ids,
                })
            })
            .await?;
        if !advanced.ids.is_empty() {
            self.wake();
        }
        Ok(advanced)
    }

    pub(crate) async fn schedule_states(&self) -> Result<HashMap<String, ScheduleState>> {
        let rows =
            sqlx::query("SELECT name, spec, last_tick, fired_at, last_event FROM outrun_schedules")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                let time = |col: &str| -> Result<Option<DateTime<Utc>>> {
                    r.try_get::<Option<i64>, _>(col)?
                        .map(ms_to_time)
                        .transpose()
                };
                Ok((
                    r.try_get::<String, _>("name")?,
                    ScheduleState {
                        spec: r.try_get("spec")?,
                        last_tick: time("last_tick")?,
                        fired_at: time("fired_at")?,
                        last_event: r
                            .try_get::<Option<String>, _>("last_event")?
                            .map(|s| parse_id(&s))
                            .transpose()?,
                    },
                ))
            })
            .collect()
    }
}
