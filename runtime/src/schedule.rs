//! `[[schedule]]` entries: periodic events. This module owns the config
//! entry, its validation, and the arithmetic of ticks (when a schedule is
//! due); [`crate::maintenance::scheduler`] fires them and the store records
//! which tick each schedule reached (`outrun_schedules`).
//!
//! Ticks are computed, never counted: a cron expression's occurrences in
//! its time zone, or for `every` the multiples of the period since the Unix
//! epoch. So every instance, with whatever start time, names the same tick
//! the same way, and the tick's time can be the event's idempotency key.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::event::NewEvent;

/// How many missed ticks `catch_up = "all"` enqueues at most after a
/// downtime; older ones are skipped (and logged).
pub const MAX_CATCH_UP: usize = 100;

/// With `catch_up = "none"` the latest tick still runs when it is at most
/// this late (a slow start, a database that answered late); older ticks
/// count as missed.
pub const ON_TIME: Duration = Duration::from_secs(60);

/// One `[[schedule]]` entry as written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// The name of the events it enqueues (and of the schedule).
    pub name: String,
    /// A cron expression: 5 fields (minute hour day month weekday) or 6
    /// (seconds first). Exactly one of `cron` and `every`.
    #[serde(default)]
    pub cron: Option<String>,
    /// A fixed period ("30s", "5m"), ticking at multiples of it since the
    /// Unix epoch.
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// IANA time zone of the cron expression ("Europe/Berlin"); UTC if
    /// absent. Only with `cron`.
    #[serde(default)]
    pub timezone: Option<String>,
    /// The payload: a TOML table (turned into a JSON object) or a string of
    /// JSON text. `{}` if absent.
    #[serde(default)]
    pub payload: Option<toml::Value>,
    /// Group id of every event (per-group FIFO).
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub max_retry: Option<i32>,
    /// Each event is dead with reason `expired` if not started within this.
    #[serde(default, with = "humantime_serde")]
    pub expires_in: Option<Duration>,
    /// Ticks missed while every instance was down.
    #[serde(default)]
    pub catch_up: CatchUp,
}

/// What to do with ticks that passed while no instance ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Skip them; the latest tick still runs if it is at most [`ON_TIME`]
    /// late.
    #[default]
    None,
    /// Run the latest missed tick once, however late.
    Last,
    /// Run every missed tick, at most [`MAX_CATCH_UP`] (the newest).
    All,
}

impl std::fmt::Display for CatchUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CatchUp::None => "none",
            CatchUp::Last => "last",
            CatchUp::All => "all",
        })
    }
}

/// When a schedule ticks.
#[derive(Debug, Clone)]
enum When {
    Cron {
        cron: Box<croner::Cron>,
        tz: chrono_tz::Tz,
    },
    /// Milliseconds.
    Every(i64),
}

/// A validated schedule, ready to compute ticks and build events.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub spec: ScheduleSpec,
    when: When,
    payload: String,
}

/// A bad `[[schedule]]` entry: which entry, which field, what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[[schedule]] `{name}`: `{field}` {message}")]
pub struct ScheduleError {
    pub name: String,
    pub field: &'static str,
    pub message: String,
}

impl Schedule {
    pub fn new(spec: ScheduleSpec) -> Result<Schedule, ScheduleError> {
        let name = spec.name.clone();
        let bad = |field: &'static str, message: String| ScheduleError {
            name: name.clone(),
            field,
            message,
        };
        crate::event::validate_name(&spec.name).map_err(|e| bad("name", e.to_string()))?;
        let when = match (&spec.cron, spec.every) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "every",
                    "and `cron` are both set; keep one of them".into(),
                ));
            }
            (None, None) => {
                return Err(bad(
                    "cron",
                    "is missing: set `cron = \"*/5 * * * *\"` or `every = \"30s\"`".into(),
                ));
            }
            (Some(expr), None) => {
                let fields = expr.split_whitespace().count();
                if !(5..=6).contains(&fields) {
                    return Err(bad(
                        "cron",
                        format!(
                            "{expr:?} has {fields} fields; write 5 (minute hour day month weekday) or 6 (seconds first)"
                        ),
                    ));
                }
                let cron = croner::parser::CronParser::builder()
                    .seconds(croner::parser::Seconds::Optional)
                    .year(croner::parser::Year::Disallowed)
                    .build()
                    .parse(expr)
                    .map_err(|e| bad("cron", format!("{expr:?} is not a cron expression: {e}")))?;
                let tz = match &spec.timezone {
                    None => chrono_tz::UTC,
                    Some(name) => chrono_tz::Tz::from_str(name).map_err(|_| {
                        bad(
                            "timezone",
                            format!(
                                "{name:?} is not an IANA time zone; write one like \"Europe/Berlin\" or \"UTC\""
                            ),
                        )
                    })?,
                };
                When::Cron {
                    cron: Box::new(cron),
                    tz,
                }
            }
            (None, Some(every)) => {
                if spec.timezone.is_some() {
                    return Err(bad(
                        "timezone",
                        "only applies to `cron`; `every` ticks at multiples of its period since the Unix epoch".into(),
                    ));
                }
                let ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
                if ms < 1000 || every.subsec_millis() != 0 {
                    return Err(bad(
                        "every",
                        "must be whole seconds, at least 1s (\"30s\", \"5m\", \"1h\")".into(),
                    ));
                }
                When::Every(ms)
            }
        };
        let payload = match &spec.payload {
            None => "{}".to_string(),
            Some(toml::Value::String(text)) => {
                serde_json::from_str::<serde_json::Value>(text).map_err(|e| {
                    bad(
                        "payload",
                        format!("is a string but not JSON text ({e}); write a TOML table or a JSON string like '{{\"a\":1}}'"),
                    )
                })?;
                text.clone()
            }
            Some(value) => serde_json::to_string(value)
                .map_err(|e| bad("payload", format!("cannot be turned into JSON: {e}")))?,
        };
        let schedule = Schedule {
            spec,
            when,
            payload,
        };
        schedule
            .event(Utc::now())
            .validate()
            .map_err(|e| bad("payload", e.to_string()))?;
        if let Some(m) = schedule.spec.max_retry
            && !(1..=i32::from(i16::MAX)).contains(&m)
        {
            return Err(bad("max_retry", "must be between 1 and 32767".into()));
        }
        Ok(schedule)
    }

    /// Validate every entry, and that no two share a name.
    pub fn all(specs: &[ScheduleSpec]) -> Result<Vec<Schedule>, ScheduleError> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            if !seen.insert(spec.name.as_str()) {
                return Err(ScheduleError {
                    name: spec.name.clone(),
                    field: "name",
                    message: "is used by two [[schedule]] entries; each schedule needs its own name (it is also the event name and the key of its ticks)".into(),
                });
            }
            out.push(Schedule::new(spec.clone())?);
        }
        Ok(out)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// What the schedule is, as stored with its progress: a change of it
    /// (a new cron, another time zone) starts the schedule afresh from now.
    pub fn describe(&self) -> String {
        match &self.when {
            When::Cron { tz, .. } => format!(
                "cron {} {}",
                self.spec
                    .cron
                    .as_deref()
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
                tz.name()
            ),
            When::Every(ms) => format!(
                "every {}",
                humantime::format_duration(Duration::from_millis(*ms as u64))
            ),
        }
    }

    /// The latest tick at or before `t`.
    pub fn latest(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(ms) => {
                let at = t.timestamp_millis().div_euclid(*ms) * ms;
                Utc.timestamp_millis_opt(at).single()
            }
            When::Cron { cron, tz } => {
                let local = truncate_secs(t).with_timezone(tz);
                cron.find_previous_occurrence(&local, true)
                    .ok()
                    .map(|d| d.with_timezone(&Utc))
            }
        }
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.when {
            When::Every(ms) => {
                let at = (t.timestamp_millis().div_euclid(*ms) + 1) * ms;
                Utc.timestamp_millis_opt(at).single()
            }
            When::Cron { cron, tz } => {
                let local = truncate_secs(t).with_timezone(tz);
                cron.find_next_occurrence(&local, false)
                    .ok()
                    .map(|d| d.with_timezone(&Utc))
            }
        }
    }

    /// Ticks in `(after, upto]`, oldest first: the newest `limit` of them,
    /// and how many older ones there were beyond that.
    pub fn ticks_between(
        &self,
        after: DateTime<Utc>,
        upto: DateTime<Utc>,
        limit: usize,
    ) -> (Vec<DateTime<Utc>>, u64) {
        let mut ticks = Vec::new();
        let mut at = self.latest(upto);
        while let Some(t) = at {
            if t <= after || ticks.len() == limit {
                break;
            }
            ticks.push(t);
            at = match &self.when {
                When::Every(ms) => Utc.timestamp_millis_opt(t.timestamp_millis() - ms).single(),
                When::Cron { cron, tz } => cron
                    .find_previous_occurrence(&t.with_timezone(tz), false)
                    .ok()
                    .map(|d| d.with_timezone(&Utc)),
            };
        }
        let skipped = match at {
            Some(t) if t > after => match &self.when {
                When::Every(ms) => ((t.timestamp_millis() - after.timestamp_millis()) / ms) as u64,
                // Counting cron occurrences one by one could take long
                // after a long downtime; "at least one" is what the log says.
                When::Cron { .. } => 1,
            },
            _ => 0,
        };
        ticks.reverse();
        (ticks, skipped)
    }

    /// The idempotency key of the event of tick `tick`: the same on every
    /// instance, so a tick never has two events while its first is live.
    pub fn key(&self, tick: DateTime<Utc>) -> String {
        format!(
            "outrun:schedule:{}:{}",
            self.spec.name,
            tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    }

    /// The event of tick `tick`.
    pub fn event(&self, tick: DateTime<Utc>) -> NewEvent {
        NewEvent {
            name: self.spec.name.clone(),
            payload: self.payload.clone(),
            group_id: self.spec.group.clone(),
            delay: None,
            expires_in: self.spec.expires_in,
            max_retry: self.spec.max_retry,
            idempotency_key: Some(self.key(tick)),
            traceparent: None,
        }
    }

    /// Which ticks to enqueue now, given the tick the schedule reached
    /// (`last`, from the table; `None` for a schedule never seen or whose
    /// definition changed) and the time: the ticks, and the tick to record.
    /// `None` when there is nothing to do.
    pub fn plan(&self, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<Plan> {
        let due = self.latest(now)?;
        let Some(last) = last else {
            // A new (or changed) schedule starts from now: its first
            // event is the next tick, not one that passed before it existed.
            return Some(Plan {
                ticks: Vec::new(),
                reached: due,
                skipped: 0,
            });
        };
        if due <= last {
            return None;
        }
        let late = (now - due).to_std().unwrap_or_default();
        let (ticks, skipped) = match self.spec.catch_up {
            CatchUp::None if late > ON_TIME => (Vec::new(), 1),
            CatchUp::None | CatchUp::Last => {
                let (_, older) = self.ticks_between(last, due, 1);
                (vec![due], older)
            }
            CatchUp::All => self.ticks_between(last, due, MAX_CATCH_UP),
        };
        Some(Plan {
            ticks,
            reached: due,
            skipped,
        })
    }
}

/// What one firing of a schedule does (see [`Schedule::plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Ticks whose events to enqueue, oldest first.
    pub ticks: Vec<DateTime<Utc>>,
    /// The tick the schedule has reached afterwards.
    pub reached: DateTime<Utc>,
    /// Missed ticks left out (at least this many).
    pub skipped: u64,
}

fn truncate_secs(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_opt(t.timestamp(), 0).single().unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> ScheduleSpec {
        toml::from_str(text).unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn every_ticks_at_multiples_of_the_period() {
        let s = Schedule::new(spec("name = \"t\"\nevery = \"30s\"\n")).unwrap();
        assert_eq!(
            s.latest(at("2026-01-01T00:00:47.5Z")),
            Some(at("2026-01-01T00:00:30Z"))
        );
        assert_eq!(
            s.next_after(at("2026-01-01T00:00:30Z")),
            Some(at("2026-01-01T00:01:00Z"))
        );
        assert_eq!(s.describe(), "every 30s");
        assert_eq!(
            s.key(at("2026-01-01T00:00:30Z")),
            "outrun:schedule:t:2026-01-01T00:00:30.000Z"
        );
    }

    #[test]
    fn cron_in_a_time_zone() {
        let s = Schedule::new(spec(
            "name = \"daily\"\ncron = \"0 9 * * *\"\ntimezone = \"Europe/Berlin\"\n",
        ))
        .unwrap();
        // 09:00 in Berlin in January is 08:00 UTC.
        assert_eq!(
            s.next_after(at("2026-01-10T12:00:00Z")),
            Some(at("2026-01-11T08:00:00Z"))
        );
        assert_eq!(
            s.latest(at("2026-01-10T12:00:00Z")),
            Some(at("2026-01-10T08:00:00Z"))
        );
        let six = Schedule::new(spec("name = \"s\"\ncron = \"*/10 * * * * *\"\n")).unwrap();
        assert_eq!(
            six.next_after(at("2026-01-10T12:00:05Z")),
            Some(at("2026-01-10T12:00:10Z"))
        );
    }

    #[test]
    fn bad_entries_name_the_entry_and_the_field() {
        let err = Schedule::new(spec("name = \"n\"\ncron = \"61 * * * *\"\n")).unwrap_err();
        assert_eq!((err.name.as_str(), err.field), ("n", "cron"));
        let err = Schedule::new(spec("name = \"n\"\ncron = \"* * *\"\n")).unwrap_err();
        assert_eq!(err.field, "cron");
        let err = Schedule::new(spec(
            "name = \"n\"\ncron = \"* * * * *\"\ntimezone = \"Mars/Olympus\"\n",
        ))
        .unwrap_err();
        assert_eq!(err.field, "timezone");
        assert!(err.to_string().contains("Mars/Olympus"), "{err}");
        let err = Schedule::new(spec("name = \"n\"\n")).unwrap_err();
        assert_eq!(err.field, "cron");
        let err = Schedule::new(spec("name = \"n\"\nevery = \"1s\"\ncron = \"* * * * *\"\n"))
            .unwrap_err();
        assert_eq!(err.field, "every");
        let err = Schedule::new(spec("name = \"n\"\nevery = \"1500ms\"\n")).unwrap_err();
        assert_eq!(err.field, "every");
        let err =
            Schedule::new(spec("name = \"n\"\nevery = \"1s\"\npayload = \"{nope\"\n")).unwrap_err();
        assert_eq!(err.field, "payload");
        let twice = vec![
            spec("name = \"n\"\nevery = \"1s\"\n"),
            spec("name = \"n\"\nevery = \"2s\"\n"),
        ];
        let err = Schedule::all(&twice).unwrap_err();
        assert_eq!((err.name.as_str(), err.field), ("n", "name"));
        assert!(err.to_string().contains("two [[schedule]]"), "{err}");
    }

    #[test]
    fn payload_from_a_table_or_json_text() {
        let s = Schedule::new(spec(
            "name = \"n\"\nevery = \"1m\"\ngroup = \"g\"\nmax_retry = 3\nexpires_in = \"30s\"\npayload = { kind = \"sweep\", n = 2 }\n",
        ))
        .unwrap();
        let ev = s.event(at("2026-01-01T00:00:00Z"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&ev.payload).unwrap(),
            serde_json::json!({"kind": "sweep", "n": 2})
        );
        assert_eq!(ev.group_id.as_deref(), Some("g"));
        assert_eq!(ev.max_retry, Some(3));
        assert_eq!(ev.expires_in, Some(Duration::from_secs(30)));
        let s = Schedule::new(spec(
            "name = \"n\"\nevery = \"1m\"\npayload = '{\"a\":[1]}'\n",
        ))
        .unwrap();
        assert_eq!(s.event(Utc::now()).payload, "{\"a\":[1]}");
    }

    #[test]
    fn catch_up_policies() {
        let base = "name = \"n\"\nevery = \"1m\"\n";
        let last = at("2026-01-01T00:00:00Z");
        // Down for ten minutes and a half.
        let now = at("2026-01-01T00:10:30Z");
        let none = Schedule::new(spec(base)).unwrap();
        // The latest tick is 30 s late (within ON_TIME): it runs, the nine
        // before it are skipped.
        let p = none.plan(Some(last), now).unwrap();
        assert_eq!(p.ticks, vec![at("2026-01-01T00:10:00Z")]);
        assert_eq!(p.skipped, 9);
        // An hourly schedule whose tick is five minutes late: nothing runs.
        let hourly = Schedule::new(spec("name = \"h\"\nevery = \"1h\"\n")).unwrap();
        let p = hourly
            .plan(Some(at("2026-01-01T00:00:00Z")), at("2026-01-01T03:05:00Z"))
            .unwrap();
        assert!(p.ticks.is_empty(), "{p:?}");
        assert_eq!(p.reached, at("2026-01-01T03:00:00Z"));
        // On time: the tick just passed runs.
        let p = none.plan(Some(at("2026-01-01T00:09:00Z")), now).unwrap();
        assert_eq!(p.ticks, vec![at("2026-01-01T00:10:00Z")]);
        assert_eq!(none.plan(Some(at("2026-01-01T00:10:00Z")), now), None);
        // First sight: start from now, enqueue nothing.
        let p = none.plan(None, now).unwrap();
        assert!(p.ticks.is_empty());
        assert_eq!(p.reached, at("2026-01-01T00:10:00Z"));

        let lastp = Schedule::new(spec(&format!("{base}catch_up = \"last\"\n"))).unwrap();
        let p = lastp.plan(Some(last), now).unwrap();
        assert_eq!(p.ticks, vec![at("2026-01-01T00:10:00Z")]);
        assert_eq!(p.skipped, 9);

        let all = Schedule::new(spec(&format!("{base}catch_up = \"all\"\n"))).unwrap();
        let p = all.plan(Some(last), now).unwrap();
        assert_eq!(p.ticks.len(), 10);
        assert_eq!(p.ticks[0], at("2026-01-01T00:01:00Z"));
        assert_eq!(p.skipped, 0);
        // Bounded: a year down enqueues the newest MAX_CATCH_UP.
        let p = all.plan(Some(last), at("2027-01-01T00:00:30Z")).unwrap();
        assert_eq!(p.ticks.len(), MAX_CATCH_UP);
        assert_eq!(*p.ticks.last().unwrap(), at("2027-01-01T00:00:00Z"));
        assert!(p.skipped > 500_000, "{p:?}");
    }
}
