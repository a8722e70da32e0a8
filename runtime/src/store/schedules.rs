//! The store's side of `[[schedule]]`: `outrun_schedules`, the tick each
//! schedule has reached. See [`crate::schedule`] for the ticks and
//! [`crate::maintenance::scheduler`] for the service that fires them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{Result, Store};
use crate::schedule::{Plan, Schedule};

/// What one [`Store::advance_schedule`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advanced {
    /// What was decided under the row lock; `None`: the schedule had
    /// already reached its latest tick (another instance fired it).
    pub plan: Option<Plan>,
    /// The events enqueued, one per tick of the plan.
    pub ids: Vec<Uuid>,
}

/// A schedule's row of `outrun_schedules`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScheduleState {
    /// The definition its progress belongs to (`Schedule::describe`).
    pub spec: Option<String>,
    /// The tick it has reached (enqueued, or skipped as missed).
    pub last_tick: Option<DateTime<Utc>>,
    /// When it last enqueued an event, and which.
    pub fired_at: Option<DateTime<Utc>>,
    pub last_event: Option<Uuid>,
}

impl Store {
    /// Under the schedule's row lock (so one instance at a time, whatever
    /// their number): read the tick it reached, enqueue the events of the
    /// ticks [`Schedule::plan`] picks for `now`, and record the new tick,
    /// in one transaction. A tick is thereby enqueued once, even after its
    /// event was handled and deleted.
    pub async fn advance_schedule(
        &self,
        schedule: &Schedule,
        now: DateTime<Utc>,
        default_max_retry: i32,
    ) -> Result<Advanced> {
        match self {
            Store::Sqlite(s) => {
                s.advance_schedule(schedule.clone(), now, default_max_retry)
                    .await
            }
            Store::Postgres(s) => s.advance_schedule(schedule, now, default_max_retry).await,
        }
    }

    /// Every row of `outrun_schedules`, by name.
    pub async fn schedule_states(
        &self,
    ) -> Result<std::collections::HashMap<String, ScheduleState>> {
        match self {
            Store::Sqlite(s) => s.schedule_states().await,
            Store::Postgres(s) => s.schedule_states().await,
        }
    }
}

/// The tick a schedule reached, if it belongs to the same definition: a
/// changed definition (or a schedule never fired) starts from now.
pub(super) fn reached(
    state_spec: Option<&str>,
    last: Option<DateTime<Utc>>,
    schedule: &Schedule,
) -> Option<DateTime<Utc>> {
    (state_spec == Some(schedule.describe().as_str()))
        .then_some(last)
        .flatten()
}
