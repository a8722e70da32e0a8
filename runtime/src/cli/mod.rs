//! The `outrun` command line: one file per subcommand. Errors reach the
//! user as one line on stderr (a JSON log line with `--log-format json`)
//! and exit code 1.
//!
//! Output goes through [`outln!`]: when the reader of stdout goes away
//! (`outrun events list | head -1`) the command stops quietly with exit
//! code 0, as `rg` and `fd` do. outrun keeps Rust's default of ignoring
//! SIGPIPE rather than restoring the C default (death by signal): that
//! disposition is process-wide, and a write to a closed *socket* (a
//! database or HTTP connection, which some libraries make with plain
//! `write`/`writev`) must stay an error outrun reports, not a silent kill.

/// `println!` that returns an error instead of panicking when stdout
/// fails; a closed reader becomes [`StdoutClosed`] (a quiet exit 0).
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))?
    };
}

mod bench;
mod demo;
mod dev;
mod enqueue;
pub(crate) mod events;
mod handlers;
mod migrate;
mod new;
mod schedules;
mod schemas;
mod serve;
mod signals;

pub use events::event_json;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{Config, DEFAULT_DATABASE_URL, LogFormat};
use crate::store::{ConnectOptions, OpenMode, Store, StoreError};

const EXAMPLES: &str = "\
Examples:
  outrun migrate --database postgres://app@db/app     create or upgrade the outbox table
  outrun serve --config outrun.toml                   run the handlers until SIGINT/SIGTERM
  outrun enqueue order.created --payload '{\"id\":42}' --group order:42
  outrun events stats --by-name                       counts per state and per event name
  outrun events list --dead                           dead events, newest first, with last_error
  outrun handlers list --config outrun.toml           configured handlers and their versions
  outrun new my-handler --lang python                 a new handler project (rust, python or js)
  outrun handlers run my_handler.wasm --event order.created --payload @event.json
  outrun completions bash > /etc/bash_completion.d/outrun

Every command takes --database URL (or OUTRUN_DATABASE_URL); the default is
sqlite://outrun.db?mode=rwc in the working directory. Only `migrate` and
`serve` create a missing SQLite file.";

#[derive(Debug, Parser)]
#[command(
    name = "outrun",
    version,
    about = "Transactional-outbox runtime with WebAssembly event handlers",
    after_help = EXAMPLES
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
    /// Create or upgrade the outbox table (creating a missing SQLite file).
    #[command(after_help = "\
Examples:
  outrun migrate                                       sqlite://outrun.db in this directory
  outrun migrate --database postgres://app@db/app")]
    Migrate,
    /// Run the dispatch loop and the handlers until SIGINT, SIGTERM, SIGHUP
    /// or SIGQUIT (each a graceful shutdown).
    #[command(after_help = "\
Examples:
  outrun serve --config outrun.toml
  outrun serve --config outrun.toml --admin 127.0.0.1:9464 --log-format json
  OUTRUN_DATABASE_URL=postgres://app@db/app outrun serve --config outrun.toml --no-migrate")]
    Serve(serve::Args),
    /// Serve, rebuild each handler's `source` on change and hot-reload it,
    /// with a live line per event and per reload (the author's loop).
    #[command(after_help = "\
Examples:
  outrun dev --config outrun.toml
  (a [[handler]] with source = \"handlers/my-handler\" is rebuilt when its files change;
   type r + Enter to replay the dead events the previous version left)")]
    Dev(dev::Args),
    /// Enqueue one event (prints its id), or a batch from NDJSON.
    Enqueue(enqueue::Args),
    /// Inspect and repair the outbox.
    #[command(
        subcommand,
        after_help = "\
Examples:
  outrun events stats --by-name
  outrun events list --dead
  outrun events show ID
  outrun events replay --all-dead
  outrun events cancel --name order.created
  outrun events purge --dead --older-than 7d"
    )]
    Events(events::Command),
    /// List the configured handlers or check a component file.
    #[command(
        subcommand,
        after_help = "\
Examples:
  outrun handlers list --config outrun.toml
  outrun handlers check my_handler.wasm"
    )]
    Handlers(handlers::Command),
    /// List and check the event schemas of `[schemas] dir`.
    #[command(
        subcommand,
        after_help = "\
Examples:
  outrun schemas list --config outrun.toml
  outrun schemas check --config outrun.toml"
    )]
    Schemas(schemas::Command),
    /// List the [[schedule]] entries and when each runs next.
    #[command(
        subcommand,
        after_help = "\
Examples:
  outrun schedules list --config outrun.toml
  outrun schedules list --config outrun.toml --json"
    )]
    Schedules(schedules::Command),
    /// Run the four shipped handlers end to end on a throwaway embedded
    /// database with demo stand-in services; exit 0 only if all went as
    /// expected.
    Demo(demo::Args),
    /// Measure throughput or latency with the bench guest (empty outbox needed).
    Bench(bench::Args),
    /// Write a new handler project (source with a commented example, the
    /// build command, a unit test, fixtures and the [[handler]] to paste).
    #[command(after_help = "\
Examples:
  outrun new order-welcome                       writes ./order-welcome (Rust)
  outrun new order-welcome --lang rust --dir handlers/order-welcome")]
    New(new::Args),
    /// Print a shell completion script on stdout.
    #[command(after_help = "\
Examples:
  outrun completions bash > ~/.local/share/bash-completion/completions/outrun
  outrun completions zsh > ~/.zfunc/_outrun
  outrun completions fish > ~/.config/fish/completions/outrun.fish")]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The log format of this run, once the config is read: the fatal error
/// line follows it.
static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Writing to stdout failed because its reader went away (a closed pipe):
/// the command stops quietly, see the module docs.
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// One line on stdout (see [`outln!`]).
pub(crate) fn write_stdout(args: std::fmt::Arguments) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(stdout_error)
}

/// Bytes on stdout as they are (see [`outln!`]).
pub(crate) fn write_stdout_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
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
    // Until the config is read: the flag, then the environment.
    let early_format =
        cli.log_format
            .or_else(|| match std::env::var("OUTRUN_LOG_FORMAT").ok()?.trim() {
                "json" => Some(LogFormat::Json),
                _ => None,
            });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(e) if e.chain().any(|c| c.is::<StdoutClosed>()) => 0,
        Err(e) => {
            let format = LOG_FORMAT
                .get()
                .copied()
                .or(early_format)
                .unwrap_or_default();
            report_fatal(&e, format);
            1
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code)
}

/// The error and its causes on one line, each cause once. thiserror
/// messages often embed their source (`cannot read {path}: {source}`) and
/// also return it from `source()`, so printing every link of the chain
/// (anyhow's `{:#}`) would repeat it; a link whose text is already part of
/// the line is left out.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The fatal error on stderr: `error: ...` in text mode, a JSON log line
/// (as the JSON logs are: timestamp, level, message, target) in JSON mode.
fn report_fatal(e: &anyhow::Error, format: LogFormat) {
    let message = error_line(e);
    match format {
        LogFormat::Text => eprintln!("error: {message}"),
        LogFormat::Json => {
            // Fields in the order tracing's JSON lines have them.
            #[derive(serde::Serialize)]
            struct Line<'a> {
                timestamp: String,
                level: &'a str,
                message: &'a str,
                target: &'a str,
            }
            let line = Line {
                timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                level: "ERROR",
                message: &message,
                target: "outrun",
            };
            eprintln!(
                "{}",
                serde_json::to_string(&line).expect("strings serialise")
            );
        }
    }
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
    if let Command::Completions { shell } = cli.command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "outrun", &mut script);
        return write_stdout_bytes(&script);
    }
    if let Command::New(args) = cli.command {
        // Needs no config or database.
        return new::run(args).await;
    }
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(url) = &cli.database {
        config.database_url = url.clone();
    }
    if let Some(f) = cli.log_format {
        config.log.format = f;
    }
    let _ = LOG_FORMAT.set(config.log.format);
    if let Command::Demo(args) = cli.command {
        // The demo installs its own logging (it captures handler logs).
        return demo::run(&config, args).await;
    }
    let serving = matches!(cli.command, Command::Serve(_) | Command::Dev(_));
    init_logging(config.log.format, if serving { "info" } else { "warn" });
    match cli.command {
        Command::Migrate => migrate::run(&config).await,
        Command::Serve(args) => serve::run(config, args).await,
        Command::Dev(args) => dev::run(config, args).await,
        Command::Enqueue(args) => enqueue::run(&config, args).await,
        Command::Events(cmd) => events::run(&config, cmd).await,
        Command::Handlers(cmd) => handlers::run(&config, cmd).await,
        Command::Schemas(cmd) => schemas::run(&config, cmd).await,
        Command::Schedules(cmd) => schedules::run(&config, cmd).await,
        Command::Demo(_) | Command::Completions { .. } | Command::New(_) => {
            unreachable!("handled above")
        }
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

/// Connect for a CLI command that acts on an existing outbox: few
/// connections, quick failure with the real cause, and no SQLite file
/// created (a command run in the wrong directory must not leave an empty
/// `outrun.db` behind).
pub(crate) async fn connect(config: &Config) -> anyhow::Result<Store> {
    open(config, OpenMode::EXISTING).await
}

/// As [`connect`], creating a missing SQLite file (`outrun migrate`).
pub(crate) async fn connect_creating(config: &Config) -> anyhow::Result<Store> {
    open(config, OpenMode::CREATE).await
}

async fn open(config: &Config, mode: OpenMode) -> anyhow::Result<Store> {
    let opts = ConnectOptions {
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
    };
    // Every error names the URL (password redacted) already.
    match Store::open(&config.database_url, &opts, mode).await {
        Ok(store) => Ok(store),
        Err(StoreError::NoDatabase { path, url }) => {
            let path = std::path::absolute(&path).unwrap_or(path);
            let origin = if config.database_url == DEFAULT_DATABASE_URL {
                ", the default"
            } else {
                ""
            };
            anyhow::bail!(
                "no database file at {} ({url}{origin}); nothing was created. Choose the database \
                 with --database URL or OUTRUN_DATABASE_URL, or run `outrun migrate` first to create it",
                path.display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// Parse "500ms", "5s", "1h", "7d": at most 100 years.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write a duration like 500ms, 30s, 5m, 7d)"))?;
    if d > crate::event::MAX_DURATION {
        return Err(format!(
            "{s} is longer than the limit of 100 years; give a shorter duration"
        ));
    }
    Ok(d)
}
