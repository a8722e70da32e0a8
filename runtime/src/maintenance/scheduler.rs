//! Fires the `[[schedule]]` entries: sleeps until the next tick of any
//! schedule, then has the store advance each schedule that is due (see
//! [`crate::store::Store::advance_schedule`]). Every instance runs this; the
//! schedule's row lock makes one of them enqueue each tick and the others
//! find it done. At start every schedule is advanced once, which is when
//! ticks missed while no instance ran are caught up (`catch_up`).
//!
//! The config file is watched while `serve` runs: an edit of its
//! `[[schedule]]` entries takes effect without a restart (the only section
//! that does; handler modules reload on their own, see `wasm::reload`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::schedule::Schedule;
use crate::schema::Schemas;
use crate::store::Store;

/// How long to wait before trying again when the database failed a firing.
const RETRY: Duration = Duration::from_secs(1);

/// Advance every schedule once; returns how many events were enqueued.
/// Errors are logged per schedule (one broken row must not stop the rest);
/// the returned flag says whether any failed.
pub async fn run_once(
    store: &Store,
    schedules: &[Schedule],
    default_max_retry: i32,
) -> (u64, bool) {
    let mut enqueued = 0;
    let mut failed = false;
    for s in schedules {
        let now = Utc::now();
        match store.advance_schedule(s, now, default_max_retry).await {
            Ok(advanced) => {
                let Some(plan) = advanced.plan else { continue };
                for (tick, id) in plan.ticks.iter().zip(&advanced.ids) {
                    tracing::info!(schedule = s.name(), tick = %tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), event_id = %id, "scheduled event enqueued");
                }
                if plan.skipped > 0 {
                    tracing::warn!(schedule = s.name(), skipped = plan.skipped, catch_up = %s.spec.catch_up, reached = %plan.reached, "ticks missed while no instance ran were skipped");
                }
                if advanced.ids.is_empty() && plan.skipped == 0 {
                    tracing::debug!(schedule = s.name(), reached = %plan.reached, "schedule starts from now");
                }
                enqueued += advanced.ids.len() as u64;
                metrics::counter!("outrun_schedule_enqueued_total", "schedule" => s.name().to_string())
                    .increment(advanced.ids.len() as u64);
            }
            Err(e) => {
                failed = true;
                tracing::error!(schedule = s.name(), error = %e, "firing the schedule failed; will retry");
            }
        }
    }
    (enqueued, failed)
}

/// Validate the config's `[[schedule]]` entries for firing: each entry,
/// and each payload against its event's schema (a payload its schema
/// refuses would fail at every tick). Warns about schedules whose event no
/// handler or relay binds.
pub fn from_config(config: &Config, schemas: Option<&Schemas>) -> anyhow::Result<Vec<Schedule>> {
    let schedules = Schedule::all(&config.schedule)?;
    if let Some(schemas) = schemas {
        for s in &schedules {
            schemas
                .check(s.name(), &s.event(Utc::now()).payload)
                .map_err(|e| anyhow::anyhow!("[[schedule]] `{}`: `payload` {e}", s.name()))?;
        }
    }
    for s in &schedules {
        let bound = config
            .handler
            .iter()
            .any(|h| h.events.iter().any(|e| e == s.name()))
            || config
                .relay
                .iter()
                .any(|r| r.events.iter().any(|e| e == s.name()));
        if !bound {
            tracing::warn!(
                schedule = s.name(),
                "no [[handler]] or [[relay]] binds this schedule's event name: each of its events will be dead with 'no handler for event'"
            );
        }
    }
    Ok(schedules)
}

/// Until `stop`: fire every schedule at each of its ticks. A new set of
/// schedules from `updates` (a reloaded config) replaces the old at once:
/// removed entries stop, new and changed ones are advanced right away (a
/// changed definition starts afresh from now, see
/// [`Schedule::describe`]).
pub async fn run(
    store: Store,
    mut updates: watch::Receiver<Arc<Vec<Schedule>>>,
    default_max_retry: i32,
    stop: CancellationToken,
) {
    let mut schedules = updates.borrow_and_update().clone();
    for s in schedules.iter() {
        let next = s.next_after(Utc::now());
        tracing::info!(schedule = s.name(), when = %s.describe(), catch_up = %s.spec.catch_up, next = ?next, "schedule loaded");
    }
    let mut watching = true;
    loop {
        let (_, failed) = run_once(&store, &schedules, default_max_retry).await;
        let now = Utc::now();
        let wait = if failed {
            RETRY
        } else {
            schedules
                .iter()
                .filter_map(|s| s.next_after(now))
                .min()
                .map(|t| (t - now).to_std().unwrap_or_default())
                // No schedule, or only cron expressions with no future
                // occurrence: look again in an hour (or at a reload).
                .unwrap_or(Duration::from_secs(3600))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            // A hair after the tick: `latest(now)` then names it even if
            // the timer fires a moment early.
            _ = tokio::time::sleep(wait + Duration::from_millis(5)) => {}
            changed = updates.changed(), if watching => {
                if changed.is_err() {
                    // The watcher is gone (serve is stopping); keep firing.
                    watching = false;
                    continue;
                }
                let new = updates.borrow_and_update().clone();
                log_changes(&schedules, &new);
                schedules = new;
            }
        }
    }
}

/// One line per schedule the reload added, changed or removed.
fn log_changes(old: &[Schedule], new: &[Schedule]) {
    for s in new {
        match old.iter().find(|o| o.name() == s.name()) {
            None => {
                tracing::info!(schedule = s.name(), when = %s.describe(), next = ?s.next_after(Utc::now()), "schedule loaded (config reloaded)")
            }
            Some(o) if o.spec != s.spec => {
                tracing::info!(schedule = s.name(), when = %s.describe(), was = %o.describe(), next = ?s.next_after(Utc::now()), "schedule changed (config reloaded)")
            }
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|s| s.name() == o.name()) {
            tracing::info!(
                schedule = o.name(),
                "schedule removed (config reloaded): no more ticks"
            );
        }
    }
}

/// How long the config file must stay quiet before it is read again:
/// editors write a file in several steps (truncate, write, rename).
const CONFIG_DEBOUNCE: Duration = Duration::from_millis(200);

/// Stops watching the config file when dropped.
pub struct ConfigWatcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watch the config file `path`: when it changes and still loads (with the
/// `OUTRUN_*` overrides, as at start), its `[[schedule]]` entries replace
/// the running ones through `updates`. A config that does not load keeps
/// the running schedules and logs why; the other sections take effect at
/// the next start only, which the log says once per change.
pub fn watch_config(
    path: PathBuf,
    schemas: Option<Arc<Schemas>>,
    updates: watch::Sender<Arc<Vec<Schedule>>>,
) -> notify::Result<ConfigWatcher> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let file_name = path.file_name().map(|f| f.to_os_string());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|f| f.to_os_string()) == file_name)
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(());
        }
    })?;
    // The directory, not the file: an editor that saves by renaming a new
    // file over the old one would leave a watch on the file orphaned.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let task = tokio::spawn(async move {
        let mut last_text: Option<String> = std::fs::read_to_string(&path).ok();
        while rx.recv().await.is_some() {
            // Debounce: wait until the file has been quiet for a while.
            loop {
                match tokio::time::timeout(CONFIG_DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(config = %path.display(), error = %e, "the config file changed but cannot be read; the running schedules stay");
                    continue;
                }
            };
            if last_text.as_deref() == Some(text.as_str()) {
                continue;
            }
            last_text = Some(text);
            let loaded = Config::load(Some(&path))
                .map_err(anyhow::Error::from)
                .and_then(|c| from_config(&c, schemas.as_deref()));
            match loaded {
                Ok(new) => {
                    tracing::info!(config = %path.display(), schedules = new.len(), "config file changed: [[schedule]] entries reloaded; other settings take effect at the next start");
                    if updates.send(Arc::new(new)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(config = %path.display(), error = %format!("{e:#}"), "the changed config file does not load; the running schedules stay until it is fixed");
                }
            }
        }
    });
    Ok(ConfigWatcher {
        _watcher: watcher,
        task,
    })
}
