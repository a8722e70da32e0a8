//! `outrun events list|show|stats|replay|cancel|purge`: inspect and repair
//! the outbox. Every listing has `--json` for scripts.

use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::Config;
use crate::event::Event;
use crate::store::{ListFilter, Store};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Counts by state: pending, scheduled, running, dead.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Live events (or dead ones with --dead), oldest first.
    List {
        /// Only dead events (retry >= max_retry).
        #[arg(long)]
        dead: bool,
        /// Only events with this name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One event, all columns.
    Show {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Make dead events live again with retry = 0.
    Replay {
        /// The event to replay.
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        id: Option<Uuid>,
        /// Replay every dead event.
        #[arg(long)]
        all_dead: bool,
    },
    /// Cancel live events: each becomes dead with last_error 'cancelled'
    /// (replay brings it back). A running event's attempt ends without
    /// effects.
    Cancel {
        /// The event to cancel.
        #[arg(required_unless_present = "name", conflicts_with = "name")]
        id: Option<Uuid>,
        /// Cancel every live event with this name.
        #[arg(long)]
        name: Option<String>,
        /// With --name: only the events of this group.
        #[arg(long, requires = "name")]
        group: Option<String>,
        /// Print the counts as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead events.
    Purge {
        /// Required: only dead events are ever purged.
        #[arg(long, required = true)]
        dead: bool,
        /// Only those that died longer ago than this (e.g. 7d).
        #[arg(long, value_parser = super::parse_duration)]
        older_than: Option<Duration>,
    },
}

pub async fn run(config: &Config, cmd: Command) -> anyhow::Result<()> {
    let store = super::connect(config).await?;
    run_on(&store, cmd).await.map_err(hint_migrate)
}

async fn run_on(store: &Store, cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Stats { json } => {
            let s = store.stats().await?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "pending {}  scheduled {}  running {}  dead {}  oldest pending {}",
                    s.pending,
                    s.scheduled,
                    s.running,
                    s.dead,
                    humantime::format_duration(Duration::from_secs(
                        s.oldest_pending_age_secs as u64
                    ))
                );
            }
        }
        Command::List {
            dead,
            name,
            limit,
            json,
        } => {
            if limit < 1 {
                anyhow::bail!("--limit must be at least 1");
            }
            let events = store.list(&ListFilter { dead, name, limit }).await?;
            if json {
                let rows: Vec<Value> = events.iter().map(event_json).collect();
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                print_table(&events);
            }
        }
        Command::Show { id, json } => {
            let ev = store
                .get(id)
                .await?
                .with_context(|| format!("no event with id {id}"))?;
            if json {
                println!("{}", serde_json::to_string(&event_json(&ev))?);
            } else {
                println!("{}", serde_json::to_string_pretty(&event_json(&ev))?);
            }
        }
        Command::Replay { id: Some(id), .. } => {
            store.replay(id).await?;
            eprintln!("replayed {id}");
        }
        Command::Replay { id: None, .. } => {
            let n = store.replay_all_dead().await?;
            eprintln!("replayed {n} dead events");
        }
        Command::Cancel {
            id,
            name,
            group,
            json,
        } => {
            let done = match (id, name) {
                (Some(id), _) => store.cancel(id).await?,
                (None, Some(name)) => store.cancel_matching(&name, group.as_deref()).await?,
                (None, None) => anyhow::bail!("give an event id or --name (see --help)"),
            };
            if json {
                let mut v = serde_json::to_value(done)?;
                if let Some(id) = id {
                    v["id"] = json!(id);
                }
                println!("{v}");
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
        Command::Purge { older_than, .. } => {
            let before = older_than.map(|d| {
                Utc::now() - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
            });
            let n = store.purge_dead(before).await?;
            eprintln!("purged {n} dead events");
        }
    }
    Ok(())
}

/// An event as JSON, with the payload embedded as JSON when it parses (it
/// should; rows inserted by hand may not) and as a string otherwise.
pub fn event_json(ev: &Event) -> Value {
    let payload = serde_json::from_str::<Value>(&ev.payload)
        .unwrap_or_else(|_| Value::String(ev.payload.clone()));
    json!({
        "id": ev.id,
        "name": ev.name,
        "payload": payload,
        "group_id": ev.group_id,
        "retry": ev.retry,
        "max_retry": ev.max_retry,
        "dead": ev.is_dead(),
        "create_date": ev.create_date,
        "available_at": ev.available_at,
        "expires_at": ev.expires_at,
        "locked_by": ev.locked_by,
        "locked_until": ev.locked_until,
        "last_error": ev.last_error,
        "idempotency_key": ev.idempotency_key,
        "dead_at": ev.dead_at,
        "deferrals": ev.deferrals,
    })
}

fn print_table(events: &[Event]) {
    const TIME: &str = "%Y-%m-%d %H:%M:%S";
    println!(
        "{:<36}  {:<24}  {:<12}  {:>5}  {:<19}  {:<19}  last_error",
        "id", "name", "group", "retry", "created", "died"
    );
    for ev in events {
        println!(
            "{:<36}  {:<24}  {:<12}  {:>2}/{:<2}  {:<19}  {:<19}  {}",
            ev.id,
            ev.name,
            ev.group_id.as_deref().unwrap_or("-"),
            ev.retry,
            ev.max_retry,
            ev.create_date.format(TIME),
            ev.dead_at
                .map_or_else(|| "-".to_string(), |t| t.format(TIME).to_string()),
            ev.last_error.as_deref().unwrap_or("")
        );
    }
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
