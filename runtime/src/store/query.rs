//! Filtered, cursor-paginated listings of events (the admin API's
//! `GET /v1/events`). Keyset pagination, not OFFSET: a page costs the same
//! however deep it is, and events inserted or deleted between two pages
//! neither repeat nor shift the next one.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::Event;

/// Which events a listing holds, by state (as `outrun events stats` counts
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StateFilter {
    /// Every live event (pending, scheduled or running).
    Live,
    /// Live, ready now, not leased.
    Pending,
    /// Live, waiting for `available_at` (delay, backoff, retry-after).
    Scheduled,
    /// Leased by some instance.
    Running,
    /// `retry >= max_retry`.
    Dead,
}

impl StateFilter {
    pub const NAMES: &'static str = "live, pending, scheduled, running, dead";

    pub(crate) fn is_dead(self) -> bool {
        self == StateFilter::Dead
    }
}

impl FromStr for StateFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "live" => StateFilter::Live,
            "pending" => StateFilter::Pending,
            "scheduled" => StateFilter::Scheduled,
            "running" => StateFilter::Running,
            "dead" => StateFilter::Dead,
            other => {
                return Err(format!(
                    "unknown state {other:?}: use one of {}",
                    StateFilter::NAMES
                ));
            }
        })
    }
}

/// Which events a bulk operation (`replay`, `cancel`, `purge`, or a
/// count) acts on; every field narrows it. The same conditions as
/// [`EventQuery`] without the paging.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub state: Option<StateFilter>,
    pub name: Option<String>,
    pub group_id: Option<String>,
    /// `last_error` contains this text (case-sensitive).
    pub error_contains: Option<String>,
    /// Created at or after this moment; for dead events, died at or after.
    pub since: Option<DateTime<Utc>>,
}

impl Filter {
    /// Whether it narrows anything beyond the state.
    pub fn narrows(&self) -> bool {
        self.name.is_some()
            || self.group_id.is_some()
            || self.error_contains.is_some()
            || self.since.is_some()
    }
}

/// RFC 3339, or an age (`1h`, `30m`) counted back from now.
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = humantime::parse_duration(s).map_err(|_| {
        format!("{s:?} is neither an RFC 3339 time (2026-11-30T12:00:00Z) nor an age (1h, 30m)")
    })?;
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|d| Utc::now().checked_sub_signed(d))
        .ok_or_else(|| format!("{s:?} reaches back too far"))
}

/// The SQL condition of `state` and the four filter parameters `p` (name,
/// group, error text, since), on either backend; `now` is the backend's
/// expression for the current time. Also returns the listing's sort key.
pub(crate) fn filter_cond(
    state: StateFilter,
    now: &str,
    p: [&str; 4],
    postgres: bool,
) -> (String, &'static str) {
    let free = format!("(locked_until IS NULL OR locked_until < {now})");
    let cond = match state {
        StateFilter::Live => "retry < max_retry".to_owned(),
        StateFilter::Pending => format!("retry < max_retry AND available_at <= {now} AND {free}"),
        StateFilter::Scheduled => {
            format!("retry < max_retry AND available_at > {now} AND {free}")
        }
        StateFilter::Running => format!("retry < max_retry AND locked_until >= {now}"),
        StateFilter::Dead => "retry >= max_retry".to_owned(),
    };
    // The dead index is on this expression.
    let key = if state.is_dead() {
        "COALESCE(dead_at, create_date)"
    } else {
        "create_date"
    };
    let (text, time) = if postgres {
        ("::text", "::timestamptz")
    } else {
        ("", "")
    };
    let [n, g, e, t] = p;
    let contains = if postgres {
        format!("strpos(last_error, {e}) > 0")
    } else {
        format!("instr(last_error, {e}) > 0")
    };
    (
        format!(
            "{cond} AND ({n}{text} IS NULL OR name = {n}) AND ({g}{text} IS NULL OR group_id = {g}) \
             AND ({e}{text} IS NULL OR {contains}) AND ({t}{time} IS NULL OR {key} >= {t})"
        ),
        key,
    )
}

/// Filter of [`crate::Store::page`]. Live states come oldest first (by
/// `create_date`, then insertion order), dead events newest dead first.
#[derive(Debug, Clone)]
pub struct EventQuery {
    pub state: StateFilter,
    pub name: Option<String>,
    pub group_id: Option<String>,
    /// Only events whose `last_error` contains this text (case-sensitive).
    pub error_contains: Option<String>,
    /// Only events created at or after this moment (dead ones: died).
    pub since: Option<DateTime<Utc>>,
    /// At most this many events (1..=1000).
    pub limit: i64,
    /// Continue after this position (from [`Page::next`]).
    pub after: Option<Cursor>,
}

impl Default for EventQuery {
    fn default() -> Self {
        Self {
            state: StateFilter::Live,
            name: None,
            group_id: None,
            error_contains: None,
            since: None,
            limit: 100,
            after: None,
        }
    }
}

/// One page of events and where the next begins (`None`: this was the last).
#[derive(Debug, Clone)]
pub struct Page {
    pub events: Vec<Event>,
    pub next: Option<Cursor>,
}

/// A position in a listing: the sort key of the last event of a page.
/// Opaque to clients (hex of a small text), so its layout may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Dead listings sort by another key; a cursor of one is refused by the other.
    pub dead: bool,
    /// `create_date`, or for dead events `COALESCE(dead_at, create_date)`.
    pub at: DateTime<Utc>,
    /// Insertion order (`seq`, SQLite's `rowid`): ties of `at` are common.
    pub seq: i64,
}

const CURSOR_VERSION: &str = "c1";

impl Cursor {
    pub(crate) fn of(ev: &Event, seq: i64, dead: bool) -> Cursor {
        let at = if dead {
            ev.dead_at.unwrap_or(ev.create_date)
        } else {
            ev.create_date
        };
        Cursor { dead, at, seq }
    }

    pub fn encode(&self) -> String {
        let text = format!(
            "{CURSOR_VERSION}|{}|{}|{}",
            if self.dead { "d" } else { "l" },
            self.at.timestamp_micros(),
            self.seq
        );
        text.bytes().map(|b| format!("{b:02x}")).collect()
    }

    /// `None` for anything [`Cursor::encode`] did not produce.
    pub fn decode(s: &str) -> Option<Cursor> {
        if s.is_empty() || !s.len().is_multiple_of(2) || s.len() > 200 {
            return None;
        }
        let bytes = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.split('|');
        if parts.next()? != CURSOR_VERSION {
            return None;
        }
        let dead = match parts.next()? {
            "d" => true,
            "l" => false,
            _ => return None,
        };
        let at = DateTime::from_timestamp_micros(parts.next()?.parse().ok()?)?;
        let seq = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Cursor { dead, at, seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_refuses_garbage() {
        let c = Cursor {
            dead: true,
            at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            seq: 42,
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in ["", "zz", "abc", "6331", "not-a-cursor", &c.encode()[2..]] {
            assert_eq!(Cursor::decode(bad), None, "{bad:?}");
        }
    }
}
