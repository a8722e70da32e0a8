//! # bonus-accrual
//!
//! The bonus service of seed 001: managers earn a bonus for each solved
//! task, paid exactly once per `TaskSolved` event however often the event is
//! delivered, to the manager the event names.
//!
//! ## Events (the seed's envelope: `event_id`, `event_name`,
//! `event_version`, `produced_at`, `payload`; schemas in examples/schemas/)
//! - `ManagerUpdated.v0` — payload `{manager_uid, account_id, login}`:
//!   upsert the manager. An update produced before the stored one (by
//!   `produced_at`) is ignored, so out-of-order delivery keeps the newest.
//! - `TaskSolved.v0` — payload `{task_uid, task_manager_uid}`: needs the
//!   manager (from `bonus_managers`) and the task's rating (from the task
//!   service over HTTP); accrues `rating × bonus_rate` to
//!   `task_manager_uid`, the manager when the task was solved (not the
//!   task's manager now: the seed's reason is a task reassigned for rework
//!   before the event arrives).
//! - `TaskSolved.v1` — as v0, with `task_rating` in the payload: no HTTP.
//! - `NewCandidate.v0` — payload `{candidate_uid, name, surname}`: recorded
//!   once per candidate (a delta event: a new candidate has no task yet).
//!
//! ## Exactly once
//! `bonus_accruals.event_id` is the primary key and the insert is `ON
//! CONFLICT (event_id) DO NOTHING`, in the ack transaction of the event: a
//! duplicate delivery (the same `event_id` in a second outbox row, or a
//! redelivery after a crash) adds nothing.
//!
//! ## Waiting for data (the seed's automatic dead-letter retry)
//! Manager unknown, or the task service answers 404 for the rating: the
//! data may still be on its way, so the handler answers `retry-after` with
//! a delay that grows with the event's age (`wait_first_ms`, doubling, at
//! most `wait_max_ms`). After `give_up_after_ms` from the event's creation,
//! or when the next try would fall after the event's expiry, the event is
//! rejected (dead) with a reason naming what was missing, for manual
//! handling. Other failures: a 5xx, 429, 408, timeout or connection error
//! from the task service retries (spending a retry); a malformed payload,
//! an envelope that does not match the event's name, or an answer of the
//! task service that is not the documented JSON rejects at once.
//!
//! ## Task service contract
//! `GET {task_url}/v1/tasks/{task_uid}/rating` → 200 `{"rating": N}` (N an
//! integer ≥ 0), 404 while the task has no rating.
//!
//! ## Config keys (`[handler.allow.config]`)
//! | key | default | meaning |
//! |---|---|---|
//! | `task_url` | required for v0 | base URL of the task service |
//! | `task_timeout_ms` | `5000` | timeout of the rating request |
//! | `bonus_rate` | `10` | bonus per rating point, in minor currency units |
//! | `wait_first_ms` | `1000` | first delay while data is missing |
//! | `wait_max_ms` | `600000` | longest delay while data is missing |
//! | `give_up_after_ms` | `86400000` | from the event's creation; then dead |
//!
//! ## Capabilities
//! `sql` (tables of `migrations/apps/bonus-accrual/`), outgoing HTTP to the
//! task service's host, logging, config.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outrun_sdk::http::{Request, encode_component};
use outrun_sdk::{Event, HandlerError, Outcome, config, log, sql};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The seed's envelope around each payload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<P> {
    pub event_id: String,
    pub event_name: String,
    pub event_version: String,
    pub produced_at: String,
    pub payload: P,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerUpdated {
    pub manager_uid: String,
    pub account_id: String,
    pub login: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSolved {
    pub task_uid: String,
    pub task_manager_uid: String,
    /// v1 only.
    #[serde(default)]
    pub task_rating: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCandidate {
    pub candidate_uid: String,
    pub name: String,
    pub surname: String,
}

/// Parse the envelope and check that it is the event it is delivered as:
/// `event_name` and `event_version` must spell the outrun event name
/// (`TaskSolved` + `0` = `TaskSolved.v0`). Anything off rejects.
pub fn parse<P: DeserializeOwned>(ev: &Event) -> Result<(Envelope<P>, i64), HandlerError> {
    let env: Envelope<P> = ev.json_object()?;
    let spelled = format!("{}.v{}", env.event_name, env.event_version);
    if spelled != ev.name {
        return Err(HandlerError::reject(format!(
            "event {} ({}) carries an envelope of {spelled} (event_name {:?}, event_version {:?}); \
             the producer must name the event by its envelope",
            ev.name, ev.id, env.event_name, env.event_version
        )));
    }
    if env.event_id.trim().is_empty() {
        return Err(HandlerError::reject(format!(
            "event {} ({}) has an empty event_id, the key that makes it count once",
            ev.name, ev.id
        )));
    }
    let produced_ms = produced_at_ms(&env.produced_at)
        .map_err(|why| HandlerError::reject(format!("event {} ({}): {why}", ev.name, ev.id)))?;
    Ok((env, produced_ms))
}

/// RFC 3339 → milliseconds since the epoch (the order of updates).
pub fn produced_at_ms(text: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("produced_at {text:?} is not an RFC 3339 date-time: {e}"))
}

/// A task rating from the task service's 200 body; the error says what was
/// wrong with the answer.
pub fn rating_from_body(body: &[u8]) -> Result<i64, String> {
    #[derive(Deserialize)]
    struct Body {
        rating: serde_json::Value,
    }
    let parsed: Body = serde_json::from_slice(body)
        .map_err(|e| format!("the answer is not the documented JSON {{\"rating\": N}}: {e}"))?;
    match parsed.rating.as_i64() {
        Some(r) if r >= 0 => Ok(r),
        _ => Err(format!(
            "`rating` is {}, not an integer of 0 or more",
            parsed.rating
        )),
    }
}

/// What [`wait`] decides when data is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Try again after this long.
    Retry(Duration),
    /// Stop waiting: the reason for the dead letter.
    GiveUp(String),
}

/// Settings of waiting for missing data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    pub first: Duration,
    pub max: Duration,
    pub give_up_after: Duration,
}

/// The delay grows with the event's age (each wait about as long as the
/// event has waited so far: a doubling), is at least `first` and at most
/// `max`, and never reaches past the give-up time, so the last try happens
/// at it. At or after the give-up time, or when the next try would come
/// after the event's expiry, give up.
pub fn wait(policy: WaitPolicy, missing: &str, ev: &Event, now_ms: u64) -> Wait {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let age = now_ms.saturating_sub(ev.created_at_ms);
    let give_up_at = ev.created_at_ms.saturating_add(ms(policy.give_up_after));
    if now_ms >= give_up_at {
        return Wait::GiveUp(format!(
            "gave up waiting: {missing} after {} (give_up_after_ms); replay the event once it is there",
            human(age)
        ));
    }
    let delay = age
        .max(ms(policy.first))
        .min(ms(policy.max))
        .min(give_up_at - now_ms)
        .max(1);
    if let Some(expires) = ev.expires_at_ms
        && now_ms.saturating_add(delay) >= expires
    {
        return Wait::GiveUp(format!(
            "gave up waiting: {missing} after {}, and the event expires before the next try; \
             replay the event once it is there",
            human(age)
        ));
    }
    Wait::Retry(Duration::from_millis(delay))
}

fn human(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn wait_policy() -> Result<WaitPolicy, HandlerError> {
    Ok(WaitPolicy {
        first: Duration::from_millis(config::parse_or("wait_first_ms", 1000)?),
        max: Duration::from_millis(config::parse_or("wait_max_ms", 600_000)?),
        give_up_after: Duration::from_millis(config::parse_or("give_up_after_ms", 86_400_000)?),
    })
}

/// Data missing: wait (retry-after) or give up (reject).
fn missing(ev: &Event, what: &str) -> Result<Outcome, HandlerError> {
    match wait(wait_policy()?, what, ev, now_ms()) {
        Wait::Retry(delay) => {
            log::info(format!(
                "event {} ({}): {what}; trying again in {}",
                ev.name,
                ev.id,
                human(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
            ));
            Ok(Outcome::RetryAfter(delay))
        }
        Wait::GiveUp(reason) => Err(HandlerError::reject(reason)),
    }
}

const UPSERT_MANAGER: &str = "INSERT INTO bonus_managers (manager_uid, account_id, login, produced_at_ms, event_id) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (manager_uid) DO UPDATE SET account_id = excluded.account_id, login = excluded.login, \
     produced_at_ms = excluded.produced_at_ms, event_id = excluded.event_id \
     WHERE bonus_managers.produced_at_ms < excluded.produced_at_ms";

const FIND_MANAGER: &str = "SELECT account_id FROM bonus_managers WHERE manager_uid = $1";

const ACCRUED: &str = "SELECT count(*) AS n FROM bonus_accruals WHERE event_id = $1";

const INSERT_ACCRUAL: &str = "INSERT INTO bonus_accruals \
     (event_id, event_name, task_uid, manager_uid, account_id, rating, amount, produced_at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING";

const INSERT_CANDIDATE: &str = "INSERT INTO bonus_candidates (candidate_uid, name, surname, event_id, produced_at_ms) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (candidate_uid) DO NOTHING";

fn manager_updated(ev: &Event) -> Result<Outcome, HandlerError> {
    let (env, produced) = parse::<ManagerUpdated>(ev)?;
    let m = &env.payload;
    let changed = sql::execute(
        UPSERT_MANAGER,
        &sql::params![
            &m.manager_uid,
            &m.account_id,
            &m.login,
            produced,
            &env.event_id
        ],
    )
    .map_err(|e| HandlerError::from(e).context("upserting the manager"))?;
    if changed == 0 {
        log::info(format!(
            "manager {}: update of {} is older than the stored one; ignored",
            m.manager_uid, env.produced_at
        ));
    } else {
        log::info(format!(
            "manager {} is account {} (login {}) as of {}",
            m.manager_uid, m.account_id, m.login, env.produced_at
        ));
    }
    Ok(Outcome::Done)
}

/// `GET {task_url}/v1/tasks/{uid}/rating`: `Some(rating)`, `None` on 404.
fn fetch_rating(task_uid: &str) -> Result<Option<i64>, HandlerError> {
    let base = config::require("task_url")?;
    let timeout = Duration::from_millis(config::parse_or("task_timeout_ms", 5000)?);
    let url = format!(
        "{}/v1/tasks/{}/rating",
        base.trim_end_matches('/'),
        encode_component(task_uid)
    );
    let resp = Request::get(&url).timeout(timeout).send()?;
    if resp.status == 404 {
        return Ok(None);
    }
    let resp = resp.error_for_status()?;
    rating_from_body(&resp.body)
        .map(Some)
        .map_err(|why| HandlerError::reject(format!("GET {url}: {why}")))
}

fn task_solved(ev: &Event) -> Result<Outcome, HandlerError> {
    let (env, produced) = parse::<TaskSolved>(ev)?;
    let t = &env.payload;
    let v1 = ev.name.ends_with(".v1");
    if v1 != t.task_rating.is_some() {
        return Err(HandlerError::reject(format!(
            "event {} ({}): `task_rating` belongs in TaskSolved.v1 and only there",
            ev.name, ev.id
        )));
    }
    // Already paid (a duplicate delivery): no need to ask anyone anything.
    let seen = sql::query(ACCRUED, &sql::params![&env.event_id])
        .map_err(|e| HandlerError::from(e).context("looking up the accrual"))?;
    if seen.scalar().ok().and_then(|v| v.as_i64()).unwrap_or(0) > 0 {
        log::info(format!(
            "event_id {} was accrued already; duplicate delivery ignored",
            env.event_id
        ));
        return Ok(Outcome::Done);
    }
    let managers = sql::query(FIND_MANAGER, &sql::params![&t.task_manager_uid])
        .map_err(|e| HandlerError::from(e).context("looking up the manager"))?;
    let Some(row) = managers.first() else {
        return missing(ev, &format!("manager {} is not known", t.task_manager_uid));
    };
    let account = row
        .str("account_id")
        .map_err(|e| HandlerError::retry(format!("reading bonus_managers.account_id: {e}")))?
        .to_owned();
    let rating = match t.task_rating {
        Some(r) => r,
        None => match fetch_rating(&t.task_uid)? {
            Some(r) => r,
            None => {
                return missing(
                    ev,
                    &format!("the rating of task {} is not there", t.task_uid),
                );
            }
        },
    };
    let rate: i64 = config::parse_or("bonus_rate", 10)?;
    let amount = rating.checked_mul(rate).ok_or_else(|| {
        HandlerError::reject(format!("rating {rating} × bonus_rate {rate} overflows"))
    })?;
    let added = sql::execute(
        INSERT_ACCRUAL,
        &sql::params![
            &env.event_id,
            &ev.name,
            &t.task_uid,
            &t.task_manager_uid,
            &account,
            rating,
            amount,
            produced
        ],
    )
    .map_err(|e| HandlerError::from(e).context("recording the accrual"))?;
    if added == 0 {
        log::info(format!(
            "event_id {} was accrued already; duplicate delivery ignored",
            env.event_id
        ));
    } else {
        log::info(format!(
            "accrued {amount} to manager {} (account {account}) for task {} (rating {rating}, event_id {})",
            t.task_manager_uid, t.task_uid, env.event_id
        ));
    }
    Ok(Outcome::Done)
}

fn new_candidate(ev: &Event) -> Result<Outcome, HandlerError> {
    let (env, produced) = parse::<NewCandidate>(ev)?;
    let c = &env.payload;
    let added = sql::execute(
        INSERT_CANDIDATE,
        &sql::params![
            &c.candidate_uid,
            &c.name,
            &c.surname,
            &env.event_id,
            produced
        ],
    )
    .map_err(|e| HandlerError::from(e).context("recording the candidate"))?;
    log::info(format!(
        "candidate {} {}",
        c.candidate_uid,
        if added == 0 {
            "was recorded already"
        } else {
            "recorded"
        }
    ));
    Ok(Outcome::Done)
}

fn handle(ev: Event) -> Result<Outcome, HandlerError> {
    match ev.name.as_str() {
        "ManagerUpdated.v0" => manager_updated(&ev),
        "TaskSolved.v0" | "TaskSolved.v1" => task_solved(&ev),
        "NewCandidate.v0" => new_candidate(&ev),
        other => Err(HandlerError::reject(format!(
            "bonus-accrual does not handle events named {other:?}; it handles ManagerUpdated.v0, \
             TaskSolved.v0, TaskSolved.v1 and NewCandidate.v0"
        ))),
    }
}

outrun_sdk::export_handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, payload: &str, created_at_ms: u64, expires_at_ms: Option<u64>) -> Event {
        Event {
            id: "0190-e".into(),
            name: name.into(),
            payload: payload.into(),
            group_id: None,
            attempt: 1,
            max_attempts: 5,
            created_at_ms,
            expires_at_ms,
        }
    }

    const SOLVED: &str = r#"{"event_id":"90a91f4b-8e34-4a3c-bfc8-f6649597445e","event_name":"TaskSolved","event_version":"0","produced_at":"2025-02-13T17:11:30Z","payload":{"task_uid":"uidf9g94ghiure","task_manager_uid":"fihij8v4rei"}}"#;

    #[test]
    fn parses_the_seed_event() {
        let (env, ms) = parse::<TaskSolved>(&event("TaskSolved.v0", SOLVED, 0, None)).unwrap();
        assert_eq!(env.payload.task_manager_uid, "fihij8v4rei");
        assert_eq!(ms, 1_739_466_690_000);
    }

    #[test]
    fn rejects_envelopes_of_another_event_and_bad_times() {
        let e = parse::<TaskSolved>(&event("TaskSolved.v1", SOLVED, 0, None)).unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.message().contains("TaskSolved.v0"), "{}", e.message());
        let bad = SOLVED.replace("2025-02-13T17:11:30Z", "yesterday");
        let e = parse::<TaskSolved>(&event("TaskSolved.v0", &bad, 0, None)).unwrap_err();
        assert!(e.message().contains("RFC 3339"), "{}", e.message());
        let extra = SOLVED.replace("\"task_uid\"", "\"x\":1,\"task_uid\"");
        let e = parse::<TaskSolved>(&event("TaskSolved.v0", &extra, 0, None)).unwrap_err();
        assert!(e.message().contains("unknown field"), "{}", e.message());
    }

    #[test]
    fn rating_bodies() {
        assert_eq!(rating_from_body(br#"{"rating": 7}"#), Ok(7));
        for (body, needle) in [
            (&b"<html>"[..], "documented JSON"),
            (br#"{"rating": -1}"#, "0 or more"),
            (br#"{"rating": 2.5}"#, "integer"),
            (br#"{"rating": "7"}"#, "integer"),
            (br#"{"score": 7}"#, "rating"),
        ] {
            let e = rating_from_body(body).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn waits_grow_and_end_at_the_give_up_time() {
        let p = WaitPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            give_up_after: Duration::from_millis(5000),
        };
        let ev = event("TaskSolved.v0", SOLVED, 10_000, None);
        let at = |now| wait(p, "manager m is not known", &ev, now);
        assert_eq!(at(10_000), Wait::Retry(Duration::from_millis(100)));
        assert_eq!(at(10_300), Wait::Retry(Duration::from_millis(300)));
        assert_eq!(at(10_700), Wait::Retry(Duration::from_millis(700)));
        assert_eq!(at(13_000), Wait::Retry(Duration::from_millis(1000)));
        // The last wait ends at the give-up time, which then gives up.
        assert_eq!(at(14_500), Wait::Retry(Duration::from_millis(500)));
        let Wait::GiveUp(reason) = at(15_000) else {
            panic!("should give up")
        };
        assert!(reason.contains("manager m is not known"), "{reason}");
        // An expiry before the next try ends the wait early.
        let expiring = event("TaskSolved.v0", SOLVED, 10_000, Some(10_500));
        let Wait::GiveUp(reason) = wait(p, "x", &expiring, 10_450) else {
            panic!("should give up before the expiry")
        };
        assert!(reason.contains("expires"), "{reason}");
    }
}
