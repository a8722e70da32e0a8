//! `outrun_schedules` on PostgreSQL (see `store/schedules.rs`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::{PgStore, enqueue_with_default};
use crate::schedule::Schedule;
use crate::store::Result;
use crate::store::schedules::{Advanced, ScheduleState, reached};

impl PgStore {
    pub(crate) async fn advance_schedule(
        &self,
        schedule: &Schedule,
        now: DateTime<Utc>,
        default_max_retry: i32,
    ) -> Result<Advanced> {
        let name = schedule.name();
        // On the main pool: the enqueue must be as durable as any other.
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO outrun_schedules (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .execute(&mut *tx)
        .await?;
        // The lock every instance's firing of this schedule takes in turn.
        let row =
            sqlx::query("SELECT spec, last_tick FROM outrun_schedules WHERE name = $1 FOR UPDATE")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        let spec: Option<String> = row.try_get("spec")?;
        let last: Option<DateTime<Utc>> = row.try_get("last_tick")?;
        let Some(plan) = schedule.plan(reached(spec.as_deref(), last, schedule), now) else {
            tx.rollback().await?;
            return Ok(Advanced::default());
        };
        let mut ids = Vec::with_capacity(plan.ticks.len());
        for tick in &plan.ticks {
            ids.push(
                enqueue_with_default(&mut tx, &schedule.event(*tick), default_max_retry).await?,
            );
        }
        sqlx::query(
            "UPDATE outrun_schedules
             SET spec = $2, last_tick = $3,
                 fired_at = CASE WHEN $4::uuid IS NULL THEN fired_at ELSE now() END,
                 last_event = COALESCE($4, last_event)
             WHERE name = $1",
        )
        .bind(name)
        .bind(schedule.describe())
        .bind(plan.reached)
        .bind(ids.last().copied())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Advanced {
            plan: Some(plan),
            ids,
        })
    }

    pub(crate) async fn schedule_states(&self) -> Result<HashMap<String, ScheduleState>> {
        let rows =
            sqlx::query("SELECT name, spec, last_tick, fired_at, last_event FROM outrun_schedules")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("name")?,
                    ScheduleState {
                        spec: r.try_get("spec")?,
                        last_tick: r.try_get("last_tick")?,
                        fired_at: r.try_get("fired_at")?,
                        last_event: r.try_get::<Option<Uuid>, _>("last_event")?,
                    },
                ))
            })
            .collect()
    }
}
