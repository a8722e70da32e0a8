//! `outrun events list|show|stats|replay|cancel|purge`: inspect and repair
//! the outbox. Every listing has `--json` for scripts.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::Config;
use crate::event::Event;
use crate::store::Store;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Counts by state: pending (ready now), scheduled (delay or backoff),
    /// running (leased), dead; and the age of the oldest pending event.
    #[command(after_help = "\
Examples:
  outrun events stats
  outrun events stats --by-name            one row per event name
  outrun events stats --json               {\"pending\":1,\"scheduled\":0,...}")]
    Stats {
        /// Also count per event name (with --json: a `by_name` array).
        #[arg(long)]
        by_name: bool,
        /// Print one JSON object on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Live events, oldest first, with their state and when they run; or
    /// dead ones (--dead, --state dead), newest dead first, with when they
    /// died. A page at a time: when more match, the command to get the next
    /// page is printed on stderr (`--cursor`).
    #[command(after_help = "\
Examples:
  outrun events list                       live events, oldest first
  outrun events list --dead --limit 10     the ten most recent dead letters
  outrun events list --state scheduled --name order.created --json
  outrun events list --dead --error-contains timeout --since 1h
  outrun events list --dead --limit 10 --cursor 63317c647c...   the next page")]
    List {
        /// Only dead events (retry >= max_retry), newest dead first; the
        /// same as --state dead.
        #[arg(long, conflicts_with = "state")]
        dead: bool,
        /// live (default), pending, scheduled, running or dead.
        #[arg(long)]
        state: Option<crate::store::StateFilter>,
        /// Only events with this name.
        #[arg(long)]
        name: Option<String>,
        /// Only events of this group.
        #[arg(long)]
        group: Option<String>,
        /// Only events whose last_error contains this text (case-sensitive).
        #[arg(long)]
        error_contains: Option<String>,
        /// Only events created (dead ones: died) at or after this: RFC 3339
        /// (2026-11-30T12:00:00Z) or an age (1h, 30m).
        #[arg(long, value_parser = parse_since_arg)]
        since: Option<DateTime<Utc>>,
        /// Most events to list.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Continue after the previous page: the cursor it printed.
        #[arg(long, value_parser = parse_cursor_arg)]
        cursor: Option<crate::store::Cursor>,
        /// Print a JSON array of events on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One event, all columns.
    #[command(after_help = "\
Examples:
  outrun events show 01934b7e-6f1c-7cc3-9a51-3f0d6c2b8e10
  outrun events show 01934b7e-6f1c-7cc3-9a51-3f0d6c2b8e10 --json | jq .last_error")]
    Show {
        /// The event's id (a UUID, as `enqueue` and `events list` print it).
        id: Uuid,
        /// Print the event as one line of JSON instead of indented.
        #[arg(long)]
        json: bool,
    },
    /// Make dead events live again with retry = 0: one by id, every dead
    /// event, or those a filter selects.
    #[command(after_help = "\
Examples:
  outrun events replay 01934b7e-6f1c-7cc3-9a51-3f0d6c2b8e10
  outrun events replay --all-dead
  outrun events replay --name order.created --error-contains timeout --since 1h
  outrun events replay --error-contains 'no handler' --dry-run   prints the count only
  outrun events replay --since-reload --config outrun.toml      what the previous versions killed
  outrun events replay --since-reload --handler billing --dry-run")]
    Replay {
        /// The event to replay: its id (a UUID, as `events list --dead`
        /// prints it).
        #[arg(conflicts_with_all = ["all_dead", "since_reload", "name", "since", "error_contains", "group", "state"])]
        id: Option<Uuid>,
        /// Replay every dead event.
        #[arg(long, conflicts_with_all = ["since_reload", "name", "since", "error_contains", "group", "state"])]
        all_dead: bool,
        /// Replay the dead events of each [[handler]]'s event names whose
        /// last attempt ran on another version of the handler than the
        /// module the config names now: after a reload, the dead letters
        /// the earlier versions produced.
        #[arg(long, conflicts_with_all = ["name", "since", "error_contains", "group", "state"])]
        since_reload: bool,
        /// With --since-reload: only this [[handler]] (default: every one).
        #[arg(long, requires = "since_reload")]
        handler: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print how many events would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Cancel live events: each becomes dead with last_error 'cancelled'
    /// (replay brings it back). A running event's attempt ends without
    /// effects.
    #[command(after_help = "\
Examples:
  outrun events cancel 01934b7e-6f1c-7cc3-9a51-3f0d6c2b8e10
  outrun events cancel --name order.created --group order:42
  outrun events cancel --state scheduled --error-contains 'HTTP 503' --dry-run")]
    Cancel {
        /// The event to cancel: its id (a UUID, as `events list` prints it).
        #[arg(
            required_unless_present_any = ["name", "since", "error_contains", "state", "group"],
            conflicts_with_all = ["name", "since", "error_contains", "state", "group"]
        )]
        id: Option<Uuid>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print how many events would be cancelled; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the counts as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Stop claiming the events of a name (or of every name a handler
    /// binds) on every instance, within a second; they wait untouched
    /// until `resume`. Running events finish.
    #[command(after_help = "\
Examples:
  outrun events pause --name order.created
  outrun events pause --handler billing          every name billing binds
  outrun events pause --name not.yet.written --force")]
    Pause {
        /// The event name to pause.
        #[arg(long, required_unless_present = "handler", conflicts_with = "handler")]
        name: Option<String>,
        /// Pause every event name this [[handler]] (or relay:TOPIC) binds.
        #[arg(long)]
        handler: Option<String>,
        /// Pause a name no handler binds and no event has yet.
        #[arg(long)]
        force: bool,
    },
    /// Claim the events of a paused name (or handler) again, from where
    /// they stopped.
    #[command(after_help = "\
Examples:
  outrun events resume --name order.created
  outrun events resume --handler billing")]
    Resume {
        /// The event name to resume.
        #[arg(long, required_unless_present = "handler", conflicts_with = "handler")]
        name: Option<String>,
        /// Resume every event name this handler binds.
        #[arg(long)]
        handler: Option<String>,
    },
    /// Delete dead events: all, those dead for longer than --older-than,
    /// or those a filter selects.
    #[command(after_help = "\
Examples:
  outrun events purge --dead                   every dead event
  outrun events purge --dead --older-than 7d   those dead for more than 7 days
  outrun events purge --dead --name order.created --error-contains cancelled --dry-run")]
    Purge {
        /// Required: only dead events are ever purged.
        #[arg(long, required = true)]
        dead: bool,
        /// Only those that died longer ago than this (e.g. 7d).
        #[arg(long, value_parser = super::parse_duration)]
        older_than: Option<Duration>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print how many events would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The filters of the bulk commands.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Only events with this name.
    #[arg(long)]
    name: Option<String>,
    /// Only events of this group (with --name).
    #[arg(long, requires = "name")]
    group: Option<String>,
    /// Only events created (dead ones: died) at or after this: RFC 3339
    /// (2026-11-30T12:00:00Z) or an age (1h, 30m).
    #[arg(long, value_parser = parse_since_arg)]
    since: Option<DateTime<Utc>>,
    /// Only events whose last_error contains this text.
    #[arg(long)]
    error_contains: Option<String>,
    /// live, pending, scheduled, running (cancel) or dead (replay, purge).
    #[arg(long)]
    state: Option<crate::store::StateFilter>,
}

fn parse_since_arg(s: &str) -> Result<DateTime<Utc>, String> {
    crate::store::query::parse_since(s)
}

fn parse_cursor_arg(s: &str) -> Result<crate::store::Cursor, String> {
    crate::store::Cursor::decode(s).ok_or_else(|| {
        "not a cursor outrun printed; pass the one printed after the previous page unchanged, \
         or leave --cursor out for the first page"
            .to_owned()
    })
}

/// A configured handler's event names and the version of its module file
/// now: the blake3 (hex) of its bytes, as the registry names versions.
#[derive(Debug)]
struct CurrentVersion {
    name: String,
    events: Vec<String>,
    version: String,
}

/// The handlers `--since-reload` acts on: every [[handler]] of the config,
/// or the one named.
fn current_versions(config: &Config, only: Option<&str>) -> anyhow::Result<Vec<CurrentVersion>> {
    let from = config
        .source
        .as_deref()
        .map_or_else(|| "the config".to_owned(), |p| p.display().to_string());
    if config.handler.is_empty() {
        anyhow::bail!(
            "--since-reload compares dead events with the handlers' modules, and {from} has no [[handler]]; \
             give the config that serves them with --config FILE (or OUTRUN_CONFIG)"
        );
    }
    let base = config.base_dir();
    let specs: Vec<_> = match only {
        None => config.handler.iter().collect(),
        Some(h) => {
            let found: Vec<_> = config.handler.iter().filter(|s| s.name == h).collect();
            if found.is_empty() {
                anyhow::bail!(
                    "--handler {h}: {from} has no [[handler]] named {h:?}; it has {}",
                    config
                        .handler
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            found
        }
    };
    specs
        .into_iter()
        .map(|spec| {
            let module = crate::wasm::resolve(&base, &spec.module);
            let bytes = std::fs::read(&module).with_context(|| {
                format!(
                    "handler {}: cannot read its module {} to learn its current version; \
                     check `module` in its [[handler]] (relative to the config file)",
                    spec.name,
                    module.display()
                )
            })?;
            Ok(CurrentVersion {
                name: spec.name.clone(),
                events: spec.events.clone(),
                version: blake3::hash(&bytes).to_hex().to_string(),
            })
        })
        .collect()
}

impl FilterArgs {
    fn filter(self) -> crate::store::Filter {
        crate::store::Filter {
            state: self.state,
            name: self.name,
            group_id: self.group,
            error_contains: self.error_contains,
            since: self.since,
        }
    }

    fn given(&self) -> bool {
        self.name.is_some()
            || self.group.is_some()
            || self.since.is_some()
            || self.error_contains.is_some()
            || self.state.is_some()
    }
}

pub async fn run(config: &Config, cmd: Command) -> anyhow::Result<()> {
    let store = super::connect(config).await?;
    let limits = crate::limits::Limits::from_config(config)?;
    run_on(
        &store,
        cmd,
        config,
        &limits.limits,
        &crate::pause::bindings(config),
    )
    .await
    .map_err(hint_migrate)
}

async fn run_on(
    store: &Store,
    cmd: Command,
    config: &Config,
    limits: &[crate::limits::Limit],
    bindings: &[crate::pause::Binding],
) -> anyhow::Result<()> {
    match cmd {
        Command::Pause {
            name,
            handler,
            force,
        } => {
            let target = crate::pause::Target::from_parts(name, handler)?;
            let done = crate::pause::pause(store, &target, bindings, force).await?;
            if done.is_empty() {
                eprintln!("already paused; nothing changed");
            } else {
                eprintln!(
                    "paused {} (no instance claims these events until `outrun events resume`)",
                    done.join(", ")
                );
            }
        }
        Command::Resume { name, handler } => {
            let target = crate::pause::Target::from_parts(name, handler)?;
            let done = crate::pause::resume(store, &target, bindings).await?;
            eprintln!("resumed {}", done.join(", "));
        }
        Command::Stats { by_name, json } => {
            let s = store.stats().await?;
            let paused = store.paused_names().await?;
            // The config's [[limit]]s, as the database holds them now.
            let limit_states = store.limit_states(limits).await?;
            let names = if by_name {
                Some(store.stats_by_name().await?)
            } else {
                None
            };
            let age = |secs: f64| humantime::format_duration(Duration::from_secs(secs as u64));
            if json {
                #[derive(serde::Serialize)]
                struct WithNames<'a> {
                    #[serde(flatten)]
                    stats: &'a crate::store::Stats,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    by_name: Option<&'a [crate::store::NameStats]>,
                    #[serde(skip_serializing_if = "<[_]>::is_empty")]
                    limits: &'a [crate::store::limits::LimitState],
                    paused: &'a [String],
                }
                let v = WithNames {
                    paused: &paused,
                    stats: &s,
                    by_name: names.as_deref(),
                    limits: &limit_states,
                };
                outln!("{}", serde_json::to_string(&v)?);
            } else {
                outln!(
                    "live {}  pending {}  scheduled {}  running {}  dead {}  oldest pending {}",
                    s.live,
                    s.pending,
                    s.scheduled,
                    s.running,
                    s.dead,
                    age(s.oldest_pending_age_secs)
                );
                if !paused.is_empty() {
                    outln!("paused: {}", paused.join(", "));
                }
                if let Some(names) = &names {
                    outln!();
                    outln!(
                        "{:<32}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  oldest pending",
                        "name",
                        "live",
                        "pending",
                        "scheduled",
                        "running",
                        "dead"
                    );
                    for n in names {
                        outln!(
                            "{:<32}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {}",
                            n.name,
                            n.stats.live,
                            n.stats.pending,
                            n.stats.scheduled,
                            n.stats.running,
                            n.stats.dead,
                            age(n.stats.oldest_pending_age_secs)
                        );
                    }
                }
                if !limit_states.is_empty() {
                    outln!();
                    outln!(
                        "{:<32}  {:<28}  {:>7}  {:>7}  {:>9}  {:>11}",
                        "limit",
                        "budget",
                        "tokens",
                        "running",
                        "busy keys",
                        "max per key"
                    );
                    for (l, st) in limits.iter().zip(&limit_states) {
                        outln!(
                            "{:<32}  {:<28}  {:>7}  {:>7}  {:>9}  {:>11}",
                            l.id,
                            l.describe(),
                            st.tokens.map_or("-".into(), |t| format!("{t:.1}")),
                            st.running,
                            if l.per_key.is_some() {
                                st.busy_keys.to_string()
                            } else {
                                "-".into()
                            },
                            if l.per_key.is_some() {
                                st.max_per_key.to_string()
                            } else {
                                "-".into()
                            }
                        );
                    }
                }
            }
        }
        Command::List {
            dead,
            state,
            name,
            group,
            error_contains,
            since,
            limit,
            cursor,
            json,
        } => {
            if limit < 1 {
                anyhow::bail!("--limit must be at least 1");
            }
            let state = if dead {
                crate::store::StateFilter::Dead
            } else {
                state.unwrap_or(crate::store::StateFilter::Live)
            };
            if let Some(c) = &cursor
                && c.dead != state.is_dead()
            {
                anyhow::bail!(
                    "--cursor belongs to a listing of {} events, and this one lists {} events; \
                     keep the filters of the page that printed it",
                    if c.dead { "dead" } else { "live" },
                    if state.is_dead() { "dead" } else { "live" }
                );
            }
            let mut query = crate::store::EventQuery {
                state,
                name,
                group_id: group,
                error_contains,
                since,
                limit: 0,
                after: cursor,
            };
            // The store's pages hold at most 1000 events; a larger --limit
            // is several pages, each continuing where the last ended.
            let mut events = Vec::new();
            let mut next = None;
            while (events.len() as i64) < limit {
                query.limit = (limit - events.len() as i64).min(1000);
                let page = store.page(&query).await?;
                events.extend(page.events);
                next = page.next;
                match next {
                    Some(c) => query.after = Some(c),
                    None => break,
                }
            }
            if json {
                let rows: Vec<Value> = events.iter().map(event_json).collect();
                outln!("{}", serde_json::to_string(&rows)?);
            } else {
                print_table(&events, state.is_dead())?;
            }
            if let Some(c) = next {
                // stderr, so stdout stays the table or the JSON array.
                eprintln!(
                    "more events match; the next page: the same command with --cursor {}",
                    c.encode()
                );
            }
        }
        Command::Show { id, json } => {
            let v = match store.get(id).await? {
                Some(ev) => {
                    let mut v = event_json(&ev);
                    v["attempts"] = serde_json::to_value(store.attempts(id).await?)?;
                    v
                }
                // Handled events are deleted; `[runtime] keep_done` keeps
                // their attempts for a while.
                None => {
                    let attempts = store.attempts(id).await?;
                    if !attempts.iter().any(|a| a.outcome == "done") {
                        anyhow::bail!(
                            "no event with id {id}: it was never enqueued, or it was handled (handled events are deleted at once; set [runtime] keep_done = \"1h\" to keep a record of them) or purged"
                        );
                    }
                    serde_json::json!({
                        "id": id,
                        "state": "done",
                        "attempts": attempts,
                    })
                }
            };
            if json {
                outln!("{}", serde_json::to_string(&v)?);
            } else {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        Command::Replay {
            id,
            all_dead,
            since_reload,
            handler,
            filter,
            dry_run,
        } => {
            let given = filter.given();
            let filter = filter.filter();
            if since_reload {
                let handlers = current_versions(config, handler.as_deref())?;
                let mut total = 0;
                for h in &handlers {
                    if dry_run {
                        total += store.count_other_versions(&h.events, &h.version).await?;
                    } else {
                        let n = store.replay_other_versions(&h.events, &h.version).await?;
                        eprintln!(
                            "replayed {n} dead events of {} (their last attempt ran on a version other than {})",
                            h.name,
                            &h.version[..12]
                        );
                    }
                }
                if dry_run {
                    outln!("{total}");
                }
            } else if let Some(id) = id {
                if dry_run {
                    let ev = store.get(id).await?;
                    outln!("{}", u64::from(ev.is_some_and(|e| e.is_dead())));
                } else {
                    store.replay(id).await?;
                    eprintln!("replayed {id}");
                }
            } else if !given && !all_dead {
                anyhow::bail!(
                    "give an event id, --all-dead, --since-reload, or a filter (--name, --since, --error-contains, --group)"
                );
            } else if dry_run {
                let f = crate::store::Filter {
                    state: Some(crate::store::StateFilter::Dead),
                    ..filter
                };
                outln!("{}", store.count_matching(&f).await?);
            } else if all_dead {
                let n = store.replay_all_dead().await?;
                eprintln!("replayed {n} dead events");
            } else {
                let n = store.replay_matching(&filter).await?;
                eprintln!("replayed {n} dead events");
            }
        }
        Command::Cancel {
            id,
            filter,
            dry_run,
            json,
        } => {
            let filter = filter.filter();
            if dry_run {
                let n = match id {
                    Some(id) => u64::from(store.get(id).await?.is_some_and(|e| !e.is_dead())),
                    None => {
                        let f = crate::store::Filter {
                            state: filter.state.or(Some(crate::store::StateFilter::Live)),
                            ..filter
                        };
                        store.count_matching(&f).await?
                    }
                };
                outln!("{n}");
                return Ok(());
            }
            let done = match id {
                Some(id) => store.cancel(id).await?,
                None => store.cancel_filtered(&filter).await?,
            };
            if json {
                let mut v = serde_json::to_value(done)?;
                if let Some(id) = id {
                    v["id"] = json!(id);
                }
                outln!("{v}");
            }
            match id {
                Some(id) if done.running > 0 => {
                    eprintln!("cancelled {id} (it was running: its attempt ends without effects)")
                }
                Some(id) => eprintln!("cancelled {id}"),
                None if done.running > 0 => eprintln!(
                    "cancelled {} events ({} were running: their attempts end without effects)",
                    done.cancelled, done.running
                ),
                None => eprintln!("cancelled {} events", done.cancelled),
            }
            if done.busy > 0 {
                eprintln!(
                    "{} matching events were committing their handlers' effects and were not cancelled; \
                     they are handled or failed within moments (run the command again for those that fail)",
                    done.busy
                );
            }
        }
        Command::Purge {
            older_than,
            filter,
            dry_run,
            ..
        } => {
            let given = filter.given();
            let filter = filter.filter();
            let before = older_than.map(|d| {
                Utc::now() - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
            });
            if given || dry_run {
                if before.is_some() {
                    anyhow::bail!(
                        "--older-than does not combine with the filters or --dry-run; \
                         select by --since, --name, --error-contains or --group instead"
                    );
                }
                if dry_run {
                    let f = crate::store::Filter {
                        state: Some(crate::store::StateFilter::Dead),
                        ..filter
                    };
                    outln!("{}", store.count_matching(&f).await?);
                } else {
                    let n = store.purge_matching(&filter).await?;
                    eprintln!("purged {n} dead events");
                }
                return Ok(());
            }
            let n = store.purge_dead(before).await?;
            eprintln!("purged {n} dead events");
        }
    }
    Ok(())
}

/// `pending` (ready now), `scheduled` (waiting for `available_at`),
/// `running` (leased) or `dead`, as [`crate::store::Stats`] counts them,
/// judged by this host's clock.
pub fn event_state(ev: &Event, now: DateTime<Utc>) -> &'static str {
    if ev.is_dead() {
        "dead"
    } else if ev.locked_until.is_some_and(|t| t >= now) {
        "running"
    } else if ev.available_at > now {
        "scheduled"
    } else {
        "pending"
    }
}

/// An event as JSON, with the payload embedded as JSON when it parses (it
/// should; rows inserted by hand may not) and as a string otherwise.
pub fn event_json(ev: &Event) -> Value {
    let mut v = serde_json::to_value(crate::admin::EventView::from(ev)).unwrap_or(Value::Null);
    // Only when set: most events carry none.
    if let Some(tp) = &ev.traceparent {
        v["traceparent"] = json!(tp);
    }
    v
}

/// The human listing. Live events show when they run (`available_at`:
/// in the past for a pending event, the end of the lease for a running
/// one), dead events when they died.
fn print_table(events: &[Event], dead: bool) -> anyhow::Result<()> {
    const TIME: &str = "%Y-%m-%d %H:%M:%S";
    let time = |t: Option<DateTime<Utc>>| {
        t.map_or_else(|| "-".to_string(), |t| t.format(TIME).to_string())
    };
    outln!(
        "{:<36}  {:<24}  {:<12}  {:<9}  {:>5}  {:<19}  {:<19}  last_error",
        "id",
        "name",
        "group",
        "state",
        "retry",
        if dead { "died" } else { "run at" },
        "created"
    );
    let now = Utc::now();
    for ev in events {
        outln!(
            "{:<36}  {:<24}  {:<12}  {:<9}  {:>2}/{:<2}  {:<19}  {:<19}  {}",
            ev.id,
            ev.name,
            ev.group_id.as_deref().unwrap_or("-"),
            event_state(ev, now),
            ev.retry,
            ev.max_retry,
            time(if dead {
                ev.dead_at
            } else {
                Some(ev.available_at)
            }),
            ev.create_date.format(TIME),
            ev.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// A missing table is the usual first-run mistake: say how to fix it.
pub(crate) fn hint_migrate(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("outbox_events")
        && (text.contains("no such table") || text.contains("does not exist"))
    {
        e.context("the outbox table does not exist yet; run `outrun migrate` first")
    } else {
        e
    }
}
