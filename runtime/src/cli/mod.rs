//! The `outrun` command line: one file per subcommand. Errors reach the
//! user as one line on stderr and exit code 1.

mod bench;
mod demo;
mod enqueue;
pub(crate) mod events;
mod handlers;
mod migrate;
mod serve;
mod signals;

pub use events::event_json;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::store::{ConnectOptions, Store, redact_url};

#[derive(Debug, Parser)]
#[command(
    name = "outrun",
    version,
    about = "Transactional-outbox runtime with WebAssembly event handlers"
)]
pub struct Cli {
    /// Database URL (sqlite://PATH?mode=rwc or postgres://USER@HOST/DB).
    /// Overrides the config file. Default: sqlite://outrun.db?mode=rwc
    #[arg(long, global = true, env = "OUTRUN_DATABASE_URL", value_name = "URL")]
    pub database: Option<String>,
    /// Config file (TOML).
    #[arg(long, short, global = true, env = "OUTRUN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the outbox table.
    Migrate,
    /// Run the dispatch loop and the handlers until SIGINT, SIGTERM, SIGHUP
    /// or SIGQUIT (each a graceful shutdown).
    Serve(serve::Args),
    /// Enqueue one event; prints its id.
    Enqueue(enqueue::Args),
    /// Inspect and repair the outbox.
    #[command(subcommand)]
    Events(events::Command),
    /// List the configured handlers or check a component file.
    #[command(subcommand)]
    Handlers(handlers::Command),
    /// Run the three shipped handlers end to end on a throwaway embedded
    /// database with demo stand-in services; exit 0 only if all went as
    /// expected.
    Demo(demo::Args),
    /// Measure throughput or latency with the bench guest (empty outbox needed).
    Bench(bench::Args),
}

/// Parse the process arguments, run, and exit with 0 or 1.
pub fn main() -> ! {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("{}", one_line_usage_error(&e));
            std::process::exit(2)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            // `{:#}` puts the whole cause chain on one line.
            eprintln!("error: {e:#}");
            1
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code)
}

/// Clap's usage errors span several lines; scripts and log collectors want
/// one. Keep the first paragraph and point at --help for the rest.
fn one_line_usage_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    format!("{} (see --help)", first.join(" "))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(url) = &cli.database {
        config.database_url = url.clone();
    }
    if let Some(f) = cli.log_format {
        config.log.format = f;
    }
    if let Command::Demo(args) = cli.command {
        // The demo installs its own logging (it captures handler logs).
        return demo::run(&config, args).await;
    }
    let serving = matches!(cli.command, Command::Serve(_));
    init_logging(config.log.format, if serving { "info" } else { "warn" });
    match cli.command {
        Command::Migrate => migrate::run(&config).await,
        Command::Serve(args) => serve::run(config, args).await,
        Command::Enqueue(args) => enqueue::run(&config, args).await,
        Command::Events(cmd) => events::run(&config, cmd).await,
        Command::Handlers(cmd) => handlers::run(&config, cmd).await,
        Command::Demo(_) => unreachable!("handled above"),
        Command::Bench(args) => bench::run(&config, args).await,
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTRUN_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, not for files and collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Connect for a CLI command: few connections, quick failure.
pub(crate) async fn connect(config: &Config) -> anyhow::Result<Store> {
    let opts = ConnectOptions {
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
    };
    Store::connect(&config.database_url, &opts)
        .await
        .with_context(|| format!("database {}", redact_url(&config.database_url)))
}

/// Parse "500ms", "5s", "1h", "7d".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write a duration like 500ms, 30s, 5m, 7d)"))
}
