//! `outrun enqueue NAME --payload JSON`: one event, id on stdout.

use std::time::Duration;

use crate::config::Config;
use crate::event::NewEvent;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Event name (routes to the handler bound to it).
    pub name: String,
    /// JSON payload.
    #[arg(long)]
    pub payload: String,
    /// Group id: events of one group run one at a time, in order.
    #[arg(long)]
    pub group: Option<String>,
    /// Do not run before this delay (e.g. 5s).
    #[arg(long, value_parser = super::parse_duration)]
    pub delay: Option<Duration>,
    /// Dead (reason `expired`) if not started within this time (e.g. 1h).
    #[arg(long, value_parser = super::parse_duration)]
    pub expires_in: Option<Duration>,
    /// Failed attempts allowed (default: the config's runtime.max_retry).
    #[arg(long)]
    pub max_retry: Option<i32>,
    /// Idempotency key: while an event with this key exists, enqueueing
    /// again returns its id instead of adding a second one.
    #[arg(long)]
    pub key: Option<String>,
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    let event = NewEvent {
        name: args.name,
        payload: args.payload,
        group_id: args.group,
        delay: args.delay,
        expires_in: args.expires_in,
        max_retry: args.max_retry,
        idempotency_key: args.key,
    };
    // Validate before connecting so bad input is reported as such even
    // when the database is down.
    event.validate()?;
    let store = super::connect(config).await?;
    let id = store
        .enqueue(&event, config.runtime.max_retry)
        .await
        .map_err(|e| super::events::hint_migrate(e.into()))?;
    println!("{id}");
    Ok(())
}
