//! `outrun demo`: run the shipped handlers end to end on a throwaway
//! embedded database (see [`crate::demo`]), print the report, and exit 0
//! only when the end state is the expected one.

use std::path::PathBuf;
use std::time::Duration;

use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{Config, LogFormat};
use crate::demo::{self, Journal, Options};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory with ai_check_requeue.wasm, family_sharing.wasm,
    /// package_deletion.wasm and bonus_accrual.wasm (scripts/build-guests.sh
    /// writes them) [default: the handlers this binary carries].
    #[arg(long, value_name = "DIR")]
    pub handlers: Option<PathBuf>,
    /// Longest wait for the outbox to drain, e.g. 30s.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// Keep the temporary directory with the demo database.
    #[arg(long)]
    pub keep: bool,
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    let journal = Journal::default();
    init_logging(config.log.format, &journal);
    // The shipped handlers are written out for the run (the registry loads
    // files, and the compiled-artifact cache keys them by content).
    let _shipped: tempfile::TempDir;
    let handlers_dir = match args.handlers {
        Some(dir) => dir,
        None => {
            _shipped = tempfile::tempdir()?;
            crate::shipped::export(_shipped.path())?;
            _shipped.path().to_path_buf()
        }
    };
    let opts = Options {
        handlers_dir,
        deadline: args.timeout,
        keep: args.keep,
        cache_dir: config.artifact_cache_dir(),
    };
    let run = demo::run(&opts, journal).await?;
    super::write_stdout_bytes(run.report.as_bytes())?;
    if run.mismatches.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "demo: {} check(s) failed (details in the MISMATCH lines above): {}",
            run.mismatches.len(),
            run.mismatches.join("; ")
        )
    }
}

/// The report is the demo's output; runtime logs stay off unless asked for
/// with OUTRUN_LOG (or RUST_LOG), since the demo's expected failures (a 503,
/// the dead letter) would read as problems. The journal layer always sees
/// the handlers' own log lines.
fn init_logging(format: LogFormat, journal: &Journal) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTRUN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(journal.guest_log_layer())
        .try_init();
}
