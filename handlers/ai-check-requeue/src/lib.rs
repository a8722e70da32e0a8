//! # ai-check-requeue
//!
//! Runs the AI check of an issuing application, but never more than a few at
//! a time: while too many checks are still `NEW`, the event puts itself back
//! in the outbox with a delay instead of calling the AI-check service (seed
//! 004, "processing of the issuings-ai-checks event").
//!
//! ## Event
//! `issuings-ai-checks`, payload `{"triggerId": "...", "applicationId": "..."}`
//! (both required, non-empty strings; other fields are kept but ignored).
//! A payload that does not fit is rejected (dead at once).
//!
//! ## What it does
//! 1. Expired event (`expires_at` passed): logged, done, no work.
//! 2. Counts `issuing_check` rows with `work_status = 'NEW'`.
//! 3. Count ≥ `requeue_threshold`: emits the same payload again as
//!    `issuings-ai-checks` after `requeue_delay_ms`, with the same group and
//!    the remaining expiry (so a requeue loop ends when the work expires),
//!    and finishes.
//! 4. Otherwise POSTs the payload to `ai_check_url` (with an
//!    `idempotency-key: <triggerId>:<applicationId>` header). 2xx: inserts an
//!    `issuing_check` row (`work_status = 'NEW'`) in the ack transaction, so
//!    the row exists exactly when the event is done; a redelivery inserts
//!    nothing twice (`ON CONFLICT DO NOTHING`). 5xx, 429, 408, timeouts and
//!    connection failures: retry. Other 4xx: reject.
//!
//! ## Config keys (`[handler.config]`)
//! | key | default | meaning |
//! |---|---|---|
//! | `ai_check_url` | required | URL of the AI-check endpoint (POST) |
//! | `requeue_threshold` | `2` | NEW checks at which new work is requeued |
//! | `requeue_delay_ms` | `1000` | delay of the requeued event |
//! | `ai_check_timeout_ms` | `10000` | timeout of the POST |
//!
//! ## Capabilities
//! `sql` (reads and inserts `issuing_check`, see
//! `migrations/apps/ai-check-requeue/`), `emit` of `issuings-ai-checks`,
//! outgoing HTTP to the host of `ai_check_url`, logging, config.
//!
//! ## Producers
//! Enqueue with group id `application:<applicationId>` so the checks of one
//! application run in order; set an expiry (e.g. 1 h) so a long queue of
//! requeues ends instead of looping forever.

use std::time::Duration;

use outrun_sdk::emit::{self, EmitOptions};
use outrun_sdk::http::Request;
use outrun_sdk::{Event, HandlerError, Outcome, config, log, sql};
use serde::{Deserialize, Serialize};

/// The event this handler serves and re-emits.
pub const EVENT: &str = "issuings-ai-checks";

const COUNT_NEW: &str = "SELECT count(*) AS n FROM issuing_check WHERE work_status = 'NEW'";
const INSERT_CHECK: &str = "INSERT INTO issuing_check (application_id, trigger_id, work_status) \
     VALUES ($1, $2, 'NEW') ON CONFLICT (trigger_id, application_id) DO NOTHING";

/// The payload, as the b3 consumer stores it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Check {
    /// The trigger that asked for the check.
    #[serde(rename = "triggerId")]
    pub trigger_id: String,
    /// The application to check.
    #[serde(rename = "applicationId")]
    pub application_id: String,
}

impl Check {
    /// Parse and validate the payload; anything off rejects the event.
    pub fn parse(ev: &Event) -> Result<Self, HandlerError> {
        if ev.name != EVENT {
            return Err(HandlerError::reject(format!(
                "ai-check-requeue handles `{EVENT}`, not `{}`; fix the handler binding in the config",
                ev.name
            )));
        }
        let check: Check = ev.json_object()?;
        for (field, value) in [
            ("triggerId", &check.trigger_id),
            ("applicationId", &check.application_id),
        ] {
            if value.trim().is_empty() {
                return Err(HandlerError::reject(format!(
                    "payload of `{EVENT}` ({}) has an empty `{field}`",
                    ev.id
                )));
            }
        }
        Ok(check)
    }
}

/// Tunables from the handler config.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    ai_check_url: String,
    threshold: i64,
    delay: Duration,
    timeout: Duration,
}

impl Settings {
    fn load() -> Result<Self, HandlerError> {
        Ok(Self {
            ai_check_url: config::require("ai_check_url")?,
            threshold: config::parse_or("requeue_threshold", 2)?,
            delay: Duration::from_millis(config::parse_or("requeue_delay_ms", 1000)?),
            timeout: Duration::from_millis(config::parse_or("ai_check_timeout_ms", 10_000)?),
        })
    }
}

/// Requeue options: same group, the configured delay, and whatever is left
/// of the original expiry so requeues stop when the work is stale. None when
/// what is left is no longer than the delay: the requeued event would
/// expire before it could run (and outrun refuses such an event), so the
/// work is as good as expired now.
fn requeue_options(ev: &Event, delay: Duration) -> Option<EmitOptions> {
    let mut options = EmitOptions::new().delay(delay);
    if let Some(group) = &ev.group_id {
        options = options.group_id(group.clone());
    }
    if let Some(left) = ev.time_left() {
        if left <= delay {
            return None;
        }
        options = options.expires_in(left);
    }
    Some(options)
}

fn handle(ev: Event) -> Result<Outcome, HandlerError> {
    let check = Check::parse(&ev)?;
    if ev.is_expired() {
        log::info(format!(
            "{EVENT} {} (trigger {}, application {}) expired before it ran; skipped",
            ev.id, check.trigger_id, check.application_id
        ));
        return Ok(Outcome::Done);
    }
    let settings = Settings::load()?;

    let in_progress = sql::query(COUNT_NEW, &[])
        .map_err(|e| HandlerError::from(e).context("counting NEW issuing checks"))?
        .scalar()?
        .as_i64()
        .ok_or_else(|| {
            HandlerError::reject("count(*) of issuing_check did not return an integer")
        })?;

    if in_progress >= settings.threshold {
        log::info(format!(
            "{in_progress} issuing checks are NEW (threshold {}); requeueing application {} in {:?}",
            settings.threshold, check.application_id, settings.delay
        ));
        let Some(options) = requeue_options(&ev, settings.delay) else {
            log::info(format!(
                "{EVENT} {} (application {}) would expire before its requeue could run; skipped",
                ev.id, check.application_id
            ));
            return Ok(Outcome::Done);
        };
        // The payload goes back verbatim: fields this version ignores survive.
        emit::emit_raw(EVENT, &ev.payload, &options)
            .map_err(|e| HandlerError::from(e).context("requeueing"))?;
        return Ok(Outcome::Done);
    }

    Request::post(&settings.ai_check_url)
        .header(
            "idempotency-key",
            format!("{}:{}", check.trigger_id, check.application_id),
        )
        .json(&check)?
        .timeout(settings.timeout)
        .send()?
        .error_for_status()?;

    sql::execute(
        INSERT_CHECK,
        &sql::params![&check.application_id, &check.trigger_id],
    )
    .map_err(|e| HandlerError::from(e).context("recording the issuing check"))?;
    log::info(format!(
        "AI check started for application {} (trigger {})",
        check.application_id, check.trigger_id
    ));
    Ok(Outcome::Done)
}

outrun_sdk::export_handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, payload: &str) -> Event {
        Event {
            id: "0190-e".into(),
            name: name.into(),
            payload: payload.into(),
            group_id: Some("application:a-1".into()),
            attempt: 1,
            max_attempts: 5,
            created_at_ms: 0,
            expires_at_ms: None,
        }
    }

    #[test]
    fn parses_the_seed_payload() {
        let ev = event(
            EVENT,
            r#"{"triggerId":"t-1","applicationId":"a-1","extra":true}"#,
        );
        assert_eq!(
            Check::parse(&ev).unwrap(),
            Check {
                trigger_id: "t-1".into(),
                application_id: "a-1".into()
            }
        );
    }

    #[test]
    fn rejects_bad_payloads_naming_the_problem() {
        for (payload, needle) in [
            (r#"{"triggerId":"t"}"#, "applicationId"),
            (
                r#"{"triggerId":1,"applicationId":"a"}"#,
                "expected a string",
            ),
            (
                r#"{"triggerId":" ","applicationId":"a"}"#,
                "empty `triggerId`",
            ),
            ("not json", "must be a JSON object"),
            (r#"["t","a"]"#, "must be a JSON object"),
        ] {
            let err = Check::parse(&event(EVENT, payload)).unwrap_err();
            assert!(!err.is_retryable(), "{payload}");
            assert!(
                err.message().contains(needle),
                "{payload}: {}",
                err.message()
            );
        }
        let wrong = Check::parse(&event("other", "{}")).unwrap_err();
        assert!(wrong.message().contains("`other`"));
    }

    #[test]
    fn requeue_keeps_group_and_remaining_expiry() {
        let mut ev = event(EVENT, "{}");
        let o = requeue_options(&ev, Duration::from_millis(1000));
        assert_eq!(
            o,
            Some(
                EmitOptions::new()
                    .delay(Duration::from_millis(1000))
                    .group_id("application:a-1")
            )
        );
        ev.group_id = None;
        ev.expires_at_ms = Some(u64::MAX);
        let o = requeue_options(&ev, Duration::ZERO);
        assert_ne!(
            o,
            Some(EmitOptions::new().delay(Duration::ZERO)),
            "expiry carried over"
        );
    }

    #[test]
    fn no_requeue_that_would_expire_before_it_runs() {
        let mut ev = event(EVENT, "{}");
        // Expired long ago relative to any clock: nothing is left.
        ev.expires_at_ms = Some(1);
        assert_eq!(requeue_options(&ev, Duration::from_millis(1000)), None);
    }

    #[test]
    fn body_is_the_seed_shape() {
        let c = Check {
            trigger_id: "t".into(),
            application_id: "a".into(),
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"triggerId":"t","applicationId":"a"}"#
        );
    }
}
