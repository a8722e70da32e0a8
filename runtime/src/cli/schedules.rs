//! `outrun schedules list`: the `[[schedule]]` entries of the config, when
//! each runs next, and (from the database) the tick each has reached.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::schedule::Schedule;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List every [[schedule]] of the config: name, when it ticks, its
    /// next run, and from the database the last tick it reached and when
    /// it last enqueued an event. Without a reachable database the last
    /// columns are empty (and a warning says why).
    #[command(after_help = "\
Examples:
  outrun schedules list --config outrun.toml
  outrun schedules list --config outrun.toml --json | jq '.[].next_run'")]
    List {
        /// Print a JSON array on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    /// `cron EXPR ZONE` or `every PERIOD`.
    when: String,
    catch_up: String,
    next_run: Option<DateTime<Utc>>,
    last_tick: Option<DateTime<Utc>>,
    last_enqueued_at: Option<DateTime<Utc>>,
    last_event_id: Option<uuid::Uuid>,
    payload: serde_json::Value,
    group: Option<String>,
}

pub async fn run(config: &Config, cmd: Command) -> anyhow::Result<()> {
    let Command::List { json } = cmd;
    if config.schedule.is_empty() {
        anyhow::bail!("no [[schedule]] entries to list; pass the config file with --config FILE");
    }
    let schedules = Schedule::all(&config.schedule)?;
    let states = match super::connect(config).await {
        Ok(store) => match store.schedule_states().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "warning: cannot read the schedules' progress ({e}); run `outrun migrate` if the database is older than this outrun"
                );
                Default::default()
            }
        },
        Err(e) => {
            eprintln!(
                "warning: {}; last runs are not shown",
                super::error_line(&e)
            );
            Default::default()
        }
    };
    let now = Utc::now();
    let rows: Vec<Row> = schedules
        .iter()
        .map(|s| {
            // Progress recorded under another definition is not this one's.
            let state = states
                .get(s.name())
                .filter(|st| st.spec.as_deref() == Some(s.describe().as_str()));
            Row {
                name: s.name().to_string(),
                when: s.describe(),
                catch_up: s.spec.catch_up.to_string(),
                next_run: s.next_after(now),
                last_tick: state.and_then(|st| st.last_tick),
                last_enqueued_at: state.and_then(|st| st.fired_at),
                last_event_id: state.and_then(|st| st.last_event),
                payload: serde_json::from_str(&s.event(now).payload)
                    .unwrap_or(serde_json::Value::Null),
                group: s.spec.group.clone(),
            }
        })
        .collect();
    if json {
        outln!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    let time = |t: Option<DateTime<Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into())
    };
    outln!(
        "{:<24}  {:<32}  {:<8}  {:<19}  {:<19}  last enqueued",
        "name",
        "when",
        "catch_up",
        "next run (UTC)",
        "last tick (UTC)"
    );
    for r in rows {
        outln!(
            "{:<24}  {:<32}  {:<8}  {:<19}  {:<19}  {}",
            r.name,
            r.when,
            r.catch_up,
            time(r.next_run),
            time(r.last_tick),
            time(r.last_enqueued_at)
        );
    }
    Ok(())
}
