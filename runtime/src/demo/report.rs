//! The end of the demo: read the final state (application tables, kv, what
//! is left in the outbox), compare it with what the story in
//! [`super::scenario`] must produce, and render the report a person reads.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use sqlx::Row;

use super::journal::Attempt;
use super::scenario::{
    AI_EVENT, FAMILY_ADMIN_NAME, FAMILY_ADMIN_UID, FAMILY_PHONES, FINISHED_APPLICATION,
    FLAKY_PACKAGE, GONE_PACKAGE, LATE_EVENT_ID, LATE_MANAGER, LATE_TASK, LATE_TASK_RATING,
    MALFORMED_TRIGGER, PACKAGES_KV_PREFIX, REQUEUED_APPLICATION, REQUEUED_TRIGGER, V1_EVENT_ID,
};
use super::services::{HttpCall, Service};
use crate::event::Event;
use crate::handler::{HandlerError, Outcome};
use crate::host::kv::KvValue;
use crate::store::{ListFilter, Store, StoreError};

/// Everything the demo observed, for the checks and the report.
#[derive(Debug, Clone)]
pub struct FinalState {
    pub issuing_check: Vec<(String, String, String)>,
    pub sharing_keys: Vec<(String, String)>,
    pub phone_ids: Vec<(String, String)>,
    pub family_rides: Vec<(String, i64, String, bool)>,
    /// event_id, event_name, task_uid, manager_uid, account_id, rating, amount.
    pub bonus_accruals: Vec<(String, String, String, String, String, i64, i64)>,
    /// manager_uid, account_id, login.
    pub bonus_managers: Vec<(String, String, String)>,
    /// candidate_uid, name, surname.
    pub bonus_candidates: Vec<(String, String, String)>,
    /// Why the schema refused the invalid TaskSolved.v0 at enqueue.
    pub refused: Option<String>,
    pub kv: Vec<(String, KvValue)>,
    pub live: Vec<Event>,
    pub dead: Vec<Event>,
    pub calls: Vec<HttpCall>,
    pub attempts: Vec<Attempt>,
    /// When the AI-check stand-in finished a check (demo clock).
    pub check_finished_at: Option<Duration>,
    /// When the outbox had no live event left; `None`: not within the deadline.
    pub drained_at: Option<Duration>,
}

/// What the demo run observed besides the database; see [`FinalState::read`].
pub struct Observed {
    pub refused: Option<String>,
    pub kv: Vec<(String, KvValue)>,
    pub calls: Vec<HttpCall>,
    pub attempts: Vec<Attempt>,
    pub check_finished_at: Option<Duration>,
    pub drained_at: Option<Duration>,
}

fn rows<T>(
    rows: Vec<sqlx::sqlite::SqliteRow>,
    f: impl Fn(&sqlx::sqlite::SqliteRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, sqlx::Error> {
    rows.iter().map(f).collect()
}

impl FinalState {
    /// Read the application tables and the outbox, and add what was observed.
    pub async fn read(
        store: &Store,
        pool: &sqlx::SqlitePool,
        seen: Observed,
    ) -> Result<FinalState, StoreError> {
        let q = |sql: &'static str| sqlx::query(sql).fetch_all(pool);
        let issuing_check = rows(
            q("SELECT application_id, trigger_id, work_status FROM issuing_check ORDER BY application_id").await?,
            |r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)),
        )?;
        let sharing_keys = rows(
            q("SELECT sharing_key, order_id FROM sharing_keys ORDER BY sharing_key").await?,
            |r| Ok((r.try_get(0)?, r.try_get(1)?)),
        )?;
        let phone_ids = rows(
            q("SELECT sharing_key, phone_id FROM phone_ids ORDER BY sharing_key, phone_id").await?,
            |r| Ok((r.try_get(0)?, r.try_get(1)?)),
        )?;
        let family_rides = rows(
            q("SELECT sharing_key, admin_uid, admin_name, sharing_on FROM family_rides ORDER BY sharing_key").await?,
            |r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)),
        )?;
        let bonus_accruals = rows(
            q("SELECT event_id, event_name, task_uid, manager_uid, account_id, rating, amount FROM bonus_accruals ORDER BY task_uid").await?,
            |r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                    r.try_get(6)?,
                ))
            },
        )?;
        let bonus_managers = rows(
            q("SELECT manager_uid, account_id, login FROM bonus_managers ORDER BY manager_uid")
                .await?,
            |r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)),
        )?;
        let bonus_candidates = rows(
            q("SELECT candidate_uid, name, surname FROM bonus_candidates ORDER BY candidate_uid")
                .await?,
            |r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)),
        )?;
        let list = |dead| ListFilter {
            dead,
            limit: 1000,
            ..ListFilter::default()
        };
        Ok(FinalState {
            issuing_check,
            sharing_keys,
            phone_ids,
            family_rides,
            bonus_accruals,
            bonus_managers,
            bonus_candidates,
            refused: seen.refused,
            kv: seen.kv,
            live: store.list(&list(false)).await?,
            dead: store.list(&list(true)).await?,
            calls: seen.calls,
            attempts: seen.attempts,
            check_finished_at: seen.check_finished_at,
            drained_at: seen.drained_at,
        })
    }
}

/// One expectation and whether it held.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: String,
    /// `None`: as expected. `Some`: what was found instead.
    pub mismatch: Option<String>,
}

fn expect<T: std::fmt::Debug + PartialEq>(what: &str, expected: T, got: T) -> Check {
    Check {
        what: what.to_owned(),
        mismatch: (expected != got).then(|| format!("expected {expected:?}, got {got:?}")),
    }
}

fn strs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// Attempts on events whose payload mentions `needle`.
fn attempts_on<'a>(state: &'a FinalState, name: &str, needle: &str) -> Vec<&'a Attempt> {
    state
        .attempts
        .iter()
        .filter(|a| a.name == name && a.payload.contains(needle))
        .collect()
}

/// Compare the final state with the story's expected outcome.
pub fn checks(state: &FinalState) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(Check {
        what: "the outbox drained (no live event left)".into(),
        mismatch: match (state.drained_at, state.live.len()) {
            (Some(_), 0) => None,
            (_, n) => Some(format!(
                "{n} live events left: {}",
                state
                    .live
                    .iter()
                    .map(|e| format!("{} {}", e.name, e.payload))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        },
    });

    // ai-check-requeue
    let runs = attempts_on(state, AI_EVENT, REQUEUED_TRIGGER);
    let done = runs.iter().filter(|a| a.is_done()).count();
    out.push(Check {
        what: format!(
            "the check of {REQUEUED_APPLICATION} was requeued while 2 checks were NEW, then ran"
        ),
        mismatch: (done < 2 || state.check_finished_at.is_none()).then(|| {
            format!(
                "{done} successful runs (expected a requeue, then the real check); \
                 AI-check stand-in finished a check: {}",
                state.check_finished_at.is_some()
            )
        }),
    });
    let ai_calls: Vec<String> = calls_of(state, Service::AiCheck)
        .map(|c| format!("{} {} {}", c.method, c.target, c.status))
        .collect();
    out.push(expect(
        "the AI-check service received exactly one POST (after the requeue)",
        vec!["POST /v1/checks 202".to_owned()],
        ai_calls,
    ));
    out.push(expect(
        "the POST carried the idempotency key trigger:application",
        true,
        calls_of(state, Service::AiCheck).all(|c| {
            c.detail
                .as_deref()
                .is_some_and(|d| d.contains(&format!("{REQUEUED_TRIGGER}:{REQUEUED_APPLICATION}")))
        }),
    ));
    out.push(expect(
        "issuing_check rows",
        vec![
            (
                FINISHED_APPLICATION.to_owned(),
                "trg-1".to_owned(),
                "DONE".to_owned(),
            ),
            ("app-2".into(), "trg-2".into(), "NEW".into()),
            (
                REQUEUED_APPLICATION.into(),
                REQUEUED_TRIGGER.into(),
                "NEW".into(),
            ),
        ],
        state.issuing_check.clone(),
    ));

    // family-sharing
    let mut family_calls: Vec<String> = calls_of(state, Service::Family)
        .map(|c| format!("{} {}", c.method, c.target))
        .collect();
    family_calls.sort();
    out.push(expect(
        "the family service was asked once per start (u-1 twice, u-2 once), never on stop",
        vec![
            "GET /v1/family?user_id=u-1".to_owned(),
            "GET /v1/family?user_id=u-1".to_owned(),
            "GET /v1/family?user_id=u-2".to_owned(),
        ],
        family_calls,
    ));
    out.push(expect(
        "sharing_keys (rsk-2: user without a family, nothing written)",
        strs(&[("rsk-1", "o-1"), ("rsk-3", "o-3")]),
        state.sharing_keys.clone(),
    ));
    out.push(expect(
        "phone_ids (rsk-1 cleared by the stop, rsk-3 shared)",
        FAMILY_PHONES
            .iter()
            .map(|p| ("rsk-3".to_owned(), (*p).to_owned()))
            .collect(),
        state.phone_ids.clone(),
    ));
    out.push(expect(
        "family_rides (rsk-1 off after start then stop, rsk-3 on)",
        vec![
            (
                "rsk-1".to_owned(),
                FAMILY_ADMIN_UID,
                FAMILY_ADMIN_NAME.to_owned(),
                false,
            ),
            (
                "rsk-3".to_owned(),
                FAMILY_ADMIN_UID,
                FAMILY_ADMIN_NAME.to_owned(),
                true,
            ),
        ],
        state.family_rides.clone(),
    ));

    // package-deletion
    let mut deletes: Vec<String> = calls_of(state, Service::Storage)
        .map(|c| format!("{} {} {}", c.method, c.target, c.status))
        .collect();
    deletes.sort();
    out.push(expect(
        "Storage deleted the never-uploaded packages only (pkg-d3 was uploaded, draft u-8 is open)",
        vec![
            "DELETE /packages/pkg-d1 204".to_owned(),
            format!("DELETE /packages/{FLAKY_PACKAGE} 204"),
            format!("DELETE /packages/{FLAKY_PACKAGE} 503"),
            format!("DELETE /packages/{GONE_PACKAGE} 404"),
        ],
        deletes,
    ));
    let finished = attempts_on(state, "draft.finished", "u-7");
    out.push(expect(
        "draft.finished of u-7 failed once on Storage's 503, then succeeded on retry",
        vec![false, true],
        finished.iter().map(|a| a.is_done()).collect::<Vec<_>>(),
    ));
    out.push(expect(
        "kv holds only the open draft's package map",
        vec![
            (
                format!("{PACKAGES_KV_PREFIX}draft:u-8:packages"),
                KvValue::Set(BTreeSet::from(["pkg-o1".to_owned()])),
            ),
            (
                format!("{PACKAGES_KV_PREFIX}package:pkg-o1:owner"),
                KvValue::Bytes(b"draft:u-8".to_vec()),
            ),
        ],
        state.kv.clone(),
    ));

    // bonus-accrual
    let late = attempts_on(state, "TaskSolved.v0", LATE_TASK);
    let waits = late
        .iter()
        .filter(|a| matches!(a.verdict, Ok(Outcome::RetryAfter(_))))
        .count();
    out.push(Check {
        what: format!(
            "TaskSolved of {LATE_TASK} waited for its manager {LATE_MANAGER} (retry-after), then was accrued"
        ),
        mismatch: (waits == 0 || !late.iter().any(|a| a.is_done())).then(|| {
            format!(
                "{waits} waits, {} successful attempts",
                late.iter().filter(|a| a.is_done()).count()
            )
        }),
    });
    let accrual = |id: &str, name: &str, task: &str, manager: &str, account: &str, rating: i64| {
        (
            id.to_owned(),
            name.to_owned(),
            task.to_owned(),
            manager.to_owned(),
            account.to_owned(),
            rating,
            rating * super::scenario::BONUS_RATE,
        )
    };
    out.push(expect(
        "bonus_accruals: one per event_id (task-1 delivered twice), v1 with its own rating",
        vec![
            accrual(
                LATE_EVENT_ID,
                "TaskSolved.v0",
                LATE_TASK,
                LATE_MANAGER,
                "acc-anna",
                LATE_TASK_RATING,
            ),
            accrual(
                V1_EVENT_ID,
                "TaskSolved.v1",
                "task-2",
                "m-boris",
                "acc-boris",
                5,
            ),
        ],
        state.bonus_accruals.clone(),
    ));
    out.push(expect(
        "the task service was asked only for task-1's rating (v1 carries it)",
        true,
        calls_of(state, Service::Tasks)
            .all(|c| c.target == format!("/v1/tasks/{LATE_TASK}/rating") && c.status == 200)
            && calls_of(state, Service::Tasks).count() >= 1,
    ));
    out.push(expect(
        "bonus_candidates: c-1 once",
        vec![("c-1".to_owned(), "Marlon".to_owned(), "Brando".to_owned())],
        state.bonus_candidates.clone(),
    ));
    out.push(expect(
        "the schema refused a TaskSolved.v0 without task_uid at enqueue (`required` at /payload)",
        true,
        state.refused.as_deref().is_some_and(|r| {
            r.contains("TaskSolved.v0") && r.contains("\"/payload\"") && r.contains("`required`")
        }),
    ));

    // The dead letter.
    let dead: Vec<(String, bool, bool)> = state
        .dead
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.payload.contains(MALFORMED_TRIGGER),
                e.last_error
                    .as_deref()
                    .is_some_and(|r| r.contains("applicationId")),
            )
        })
        .collect();
    out.push(expect(
        "one dead letter: the malformed issuings-ai-checks, its reason naming `applicationId`",
        vec![(AI_EVENT.to_owned(), true, true)],
        dead,
    ));
    let malformed = attempts_on(state, AI_EVENT, MALFORMED_TRIGGER);
    out.push(expect(
        "the malformed event was rejected on its first attempt (not retried)",
        vec![(1, false)],
        malformed
            .iter()
            .map(|a| {
                (
                    a.attempt,
                    matches!(&a.verdict, Err(e) if e.retryable) || a.is_done(),
                )
            })
            .collect::<Vec<_>>(),
    ));
    out
}

fn calls_of(state: &FinalState, service: Service) -> impl Iterator<Item = &HttpCall> {
    state.calls.iter().filter(move |c| c.service == service)
}

fn secs(d: Duration) -> String {
    format!("+{:.2}s", d.as_secs_f64())
}

fn verdict(v: &Result<Outcome, HandlerError>) -> String {
    match v {
        Ok(Outcome::Done) => "done".into(),
        Ok(Outcome::RetryAfter(d)) => format!("retry after {d:?} (no retry spent)"),
        Err(e) if e.retryable => format!("failed, will retry: {}", e.message),
        Err(e) => format!("rejected, dead: {}", e.message),
    }
}

/// The report a person reads. `header` comes first (setup lines).
pub fn render(header: &str, state: &FinalState, checks: &[Check]) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "{header}");
    match state.drained_at {
        Some(t) => {
            let _ = writeln!(w, "outbox drained at {}", secs(t));
        }
        None => {
            let _ = writeln!(w, "outbox NOT drained before the deadline");
        }
    }

    let _ = writeln!(w, "\n== What each handler did");
    for handler in [
        "ai-check-requeue",
        "family-sharing",
        "package-deletion",
        "bonus-accrual",
    ] {
        let _ = writeln!(w, "{handler}");
        let mut lines: Vec<(Duration, String)> = state
            .attempts
            .iter()
            .filter(|a| a.handler == handler)
            .map(|a| {
                let mut line = format!(
                    "  {}  {} {} (attempt {}): {}",
                    secs(a.at),
                    a.name,
                    a.payload,
                    a.attempt,
                    verdict(&a.verdict)
                );
                for l in &a.logs {
                    let _ = write!(line, "\n           log: {l}");
                }
                (a.at, line)
            })
            .collect();
        if handler == "ai-check-requeue"
            && let Some(t) = state.check_finished_at
        {
            lines.push((
                t,
                format!(
                    "  {}  AI-check service (demo stand-in) finished the check of {FINISHED_APPLICATION}: work_status NEW -> DONE",
                    secs(t)
                ),
            ));
        }
        lines.sort_by_key(|(t, _)| *t);
        let requeues = attempts_on(state, AI_EVENT, REQUEUED_TRIGGER)
            .iter()
            .filter(|a| a.is_done())
            .count()
            .saturating_sub(1);
        for (_, l) in lines {
            let _ = writeln!(w, "{l}");
        }
        if handler == "ai-check-requeue" {
            let _ = writeln!(
                w,
                "  -> check of {REQUEUED_APPLICATION} requeued {requeues} time(s) before it ran"
            );
        }
        if handler == "bonus-accrual" {
            let waits = attempts_on(state, "TaskSolved.v0", LATE_TASK)
                .iter()
                .filter(|a| matches!(a.verdict, Ok(Outcome::RetryAfter(_))))
                .count();
            let _ = writeln!(
                w,
                "  -> TaskSolved of {LATE_TASK} (delivered twice) retried automatically {waits} time(s) in all while manager {LATE_MANAGER} was unknown, then accrued once"
            );
        }
    }

    let _ = writeln!(w, "\n== HTTP calls the demo stand-in services received");
    for c in &state.calls {
        let _ = writeln!(
            w,
            "  {:<17} {} {} -> {}{}",
            c.service.label(),
            c.method,
            c.target,
            c.status,
            c.detail
                .as_deref()
                .map(|d| format!("  ({d})"))
                .unwrap_or_default()
        );
    }

    let _ = writeln!(w, "\n== Final application tables (SQLite)");
    let _ = writeln!(w, "issuing_check (application_id, trigger_id, work_status)");
    for (a, t, st) in &state.issuing_check {
        let _ = writeln!(w, "  {a}  {t}  {st}");
    }
    let _ = writeln!(w, "sharing_keys (sharing_key, order_id)");
    for (k, o) in &state.sharing_keys {
        let _ = writeln!(w, "  {k}  {o}");
    }
    let _ = writeln!(w, "phone_ids (sharing_key, phone_id)");
    for (k, p) in &state.phone_ids {
        let _ = writeln!(w, "  {k}  {p}");
    }
    let _ = writeln!(
        w,
        "family_rides (sharing_key, admin_uid, admin_name, sharing_on)"
    );
    for (k, uid, name, on) in &state.family_rides {
        let _ = writeln!(w, "  {k}  {uid}  {name}  {on}");
    }

    let _ = writeln!(w, "bonus_managers (manager_uid, account_id, login)");
    for (m, a, l) in &state.bonus_managers {
        let _ = writeln!(w, "  {m}  {a}  {l}");
    }
    let _ = writeln!(
        w,
        "bonus_accruals (event_id, event_name, task_uid, manager_uid, account_id, rating, amount)"
    );
    for (id, name, task, m, a, rating, amount) in &state.bonus_accruals {
        let _ = writeln!(
            w,
            "  accrual {id}  {name}  {task}  {m}  {a}  {rating}  {amount}"
        );
    }
    let _ = writeln!(w, "bonus_candidates (candidate_uid, name, surname)");
    for (c, n, sn) in &state.bonus_candidates {
        let _ = writeln!(w, "  {c}  {n}  {sn}");
    }

    let _ = writeln!(w, "\n== kv state (embedded store)");
    if state.kv.is_empty() {
        let _ = writeln!(w, "  (empty)");
    }
    for (k, v) in &state.kv {
        let shown = match v {
            KvValue::Set(m) => format!("{{{}}}", m.iter().cloned().collect::<Vec<_>>().join(", ")),
            KvValue::Bytes(b) => format!("{:?}", String::from_utf8_lossy(b)),
        };
        let _ = writeln!(w, "  {k} = {shown}");
    }

    let _ = writeln!(w, "\n== Outbox");
    let _ = writeln!(w, "live events: {}", state.live.len());
    for e in &state.live {
        let _ = writeln!(w, "  {} {} {}", e.id, e.name, e.payload);
    }
    let _ = writeln!(w, "dead letters: {}", state.dead.len());
    for e in &state.dead {
        let _ = writeln!(
            w,
            "  dead letter {} {} {} (retry {} of {})\n    reason: {}",
            e.id,
            e.name,
            e.payload,
            e.retry,
            e.max_retry,
            e.last_error.as_deref().unwrap_or("(none)")
        );
    }

    let _ = writeln!(w, "\n== Checks");
    for c in checks {
        match &c.mismatch {
            None => {
                let _ = writeln!(w, "  ok        {}", c.what);
            }
            Some(m) => {
                let _ = writeln!(w, "  MISMATCH  {}: {m}", c.what);
            }
        }
    }
    let failed = checks.iter().filter(|c| c.mismatch.is_some()).count();
    if failed == 0 {
        let _ = writeln!(
            w,
            "\nAll {} checks passed: every handler behaved as expected.",
            checks.len()
        );
    } else {
        let _ = writeln!(
            w,
            "\n{failed} of {} checks FAILED (see MISMATCH above).",
            checks.len()
        );
    }
    s
}
