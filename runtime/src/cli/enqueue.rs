//! `outrun enqueue NAME --payload JSON`: one event, id on stdout. The
//! payload can come from a file or stdin (`--payload-file PATH`,
//! `--payload -`) for payloads beyond the shell's argument limit, and
//! `--ndjson FILE` enqueues a batch in one transaction.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::config::Config;
use crate::event::{MAX_PAYLOAD_BYTES, NewEvent};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  outrun enqueue order.created --payload '{\"order_id\":42}' --group order:42
  outrun enqueue report.requested --payload-file big.json --delay 5m
  produce-json | outrun enqueue report.requested --payload -
  outrun enqueue --ndjson events.ndjson --json

NDJSON: one JSON object per line, e.g.
  {\"name\":\"order.created\",\"payload\":{\"order_id\":42},\"group_id\":\"order:42\",\"delay\":\"5s\"}
with `name` and `payload` (any JSON value) and optional `group_id`, `delay`,
`expires_in`, `max_retry`, `idempotency_key`, `traceparent`. Blank lines are skipped. Every
line is checked before anything is written; the whole batch is one
transaction.")]
pub struct Args {
    /// Event name (routes to the handler bound to it).
    #[arg(required_unless_present = "ndjson", conflicts_with = "ndjson")]
    pub name: Option<String>,
    /// JSON payload, or `-` to read it from stdin.
    #[arg(
        long,
        value_name = "JSON",
        required_unless_present_any = ["payload_file", "ndjson"],
        conflicts_with_all = ["payload_file", "ndjson"]
    )]
    pub payload: Option<String>,
    /// Read the JSON payload from this file (`-`: stdin); for payloads too
    /// large for a command line (the limit is 1 MiB).
    #[arg(long, value_name = "PATH", conflicts_with = "ndjson")]
    pub payload_file: Option<PathBuf>,
    /// Enqueue every event of this NDJSON file (`-`: stdin) in one
    /// transaction; prints one id per line. See the format below.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["group", "delay", "expires_in", "max_retry", "key", "traceparent"])]
    pub ndjson: Option<PathBuf>,
    /// Group id: events of one group run one at a time, in order.
    #[arg(long)]
    pub group: Option<String>,
    /// Do not run before this delay (e.g. 5s).
    #[arg(long, value_parser = super::parse_duration)]
    pub delay: Option<Duration>,
    /// Dead (reason `expired`) if not started within this time (e.g. 1h);
    /// must be longer than --delay.
    #[arg(long, value_parser = super::parse_duration)]
    pub expires_in: Option<Duration>,
    /// Failed attempts allowed (default: the config's runtime.max_retry).
    #[arg(long)]
    pub max_retry: Option<i32>,
    /// Idempotency key: while an event with this key exists, enqueueing
    /// again returns its id instead of adding a second one.
    #[arg(long)]
    pub key: Option<String>,
    /// The producer's W3C trace context
    /// (00-<32 hex trace id>-<16 hex span id>-<2 hex flags>): with [otel],
    /// the event's attempts are spans of that trace.
    #[arg(long, value_name = "TRACEPARENT")]
    pub traceparent: Option<String>,
    /// Print JSON on stdout: {"id": ...}, or for --ndjson
    /// {"enqueued": N, "ids": [...]}.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    if let Some(path) = &args.ndjson {
        return run_batch(config, path, args.json).await;
    }
    let payload = match (&args.payload, &args.payload_file) {
        (Some(p), _) if p == "-" => read_payload(Path::new("-"))?,
        (Some(p), _) => p.clone(),
        (None, Some(path)) => read_payload(path)?,
        (None, None) => {
            anyhow::bail!("give the payload with --payload JSON or --payload-file PATH")
        }
    };
    let event = NewEvent {
        name: args.name.unwrap_or_default(),
        payload,
        group_id: args.group,
        delay: args.delay,
        expires_in: args.expires_in,
        max_retry: args.max_retry,
        idempotency_key: args.key,
        traceparent: args.traceparent,
    };
    // Validate before connecting so bad input is reported as such even
    // when the database is down.
    event.validate()?;
    if let Some(schemas) = crate::schema::Schemas::from_config(config)? {
        schemas.check(&event.name, &event.payload)?;
    }
    let store = super::connect(config).await?;
    let id = store
        .enqueue(&event, config.runtime.max_retry)
        .await
        .map_err(|e| super::events::hint_migrate(e.into()))?;
    if args.json {
        outln!("{}", json!({ "id": id }));
    } else {
        outln!("{id}");
    }
    Ok(())
}

/// `--ndjson`: parse and check every line, then one batch insert.
async fn run_batch(config: &Config, path: &Path, as_json: bool) -> anyhow::Result<()> {
    let source = describe(path);
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot read NDJSON file {source}"))?;
        Box::new(std::io::BufReader::new(file))
    };
    let schemas = crate::schema::Schemas::from_config(config)?;
    let mut events = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{source} line {n}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let event = parse_line(&line).map_err(|e| anyhow::anyhow!("{source} line {n}: {e}"))?;
        if let Some(schemas) = &schemas {
            schemas
                .check(&event.name, &event.payload)
                .map_err(|e| anyhow::anyhow!("{source} line {n}: {e}; nothing was enqueued"))?;
        }
        events.push(event);
    }
    let store = super::connect(config).await?;
    let ids = store
        .enqueue_batch(&events, config.runtime.max_retry)
        .await
        .map_err(|e| super::events::hint_migrate(e.into()))?;
    if as_json {
        outln!("{}", json!({ "enqueued": ids.len(), "ids": ids }));
    } else {
        for id in &ids {
            outln!("{id}");
        }
    }
    eprintln!("enqueued {} events from {source}", ids.len());
    Ok(())
}

/// One NDJSON line as a checked event; the error says what is wrong with it.
fn parse_line(line: &str) -> Result<NewEvent, String> {
    let l: crate::event::EventRequest = serde_json::from_str(line).map_err(|e| {
        // serde_json ends with "at line 1 column N": the line is ours.
        let text = e.to_string();
        match text.rsplit_once(" at line ") {
            Some((msg, _)) => format!("{msg} (column {})", e.column()),
            None => text,
        }
    })?;
    let event = NewEvent::from(l);
    event.validate().map_err(|e| e.to_string())?;
    Ok(event)
}

/// The payload of `--payload-file PATH` or `--payload -`, without the
/// trailing newline editors and `echo` add.
fn read_payload(path: &Path) -> anyhow::Result<String> {
    let source = describe(path);
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .context("cannot read the payload from stdin")?;
    } else {
        bytes =
            std::fs::read(path).with_context(|| format!("cannot read payload file {source}"))?;
    }
    let mut text = String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!("the payload in {source} is not UTF-8 text; a payload is JSON text")
    })?;
    text.truncate(text.trim_end().len());
    if text.len() > MAX_PAYLOAD_BYTES {
        anyhow::bail!(
            "the payload in {source} is {} bytes; the limit is {MAX_PAYLOAD_BYTES} (1 MiB)",
            text.len()
        );
    }
    Ok(text)
}

fn describe(path: &Path) -> String {
    if path == Path::new("-") {
        "stdin".to_string()
    } else {
        path.display().to_string()
    }
}
