//! `outrun handlers list|check|run|export`: what the config binds, whether a
//! file is a component outrun can run, one event through a handler (`run`),
//! and the handlers the binary carries written out (`export`).

mod run;

use std::path::PathBuf;

use crate::config::Config;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Load every [[handler]] of the config (compiling or reading the
    /// artifact cache) and list name, module, content hash, load time and
    /// bound events. A running server lists its live versions at
    /// GET /v1/handlers. Compiled artifacts are cached in the user's cache
    /// directory (see `cache_dir`); nothing is written beside the config.
    #[command(after_help = "\
Examples:
  outrun handlers list --config outrun.toml
  outrun handlers list --config outrun.toml --json | jq '.[].hash'")]
    List {
        /// Print a JSON array of handlers on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check that FILE is a component implementing the `handler` world with
    /// imports outrun provides, and print what an instance needs (core
    /// instances, memories and their initial sizes, tables): the smallest
    /// `memory` cap it can run under. Exit 0 if so; otherwise the error
    /// names the missing or mismatched export or import. Writes nothing.
    #[command(after_help = "\
Examples:
  outrun handlers check target/wasm32-wasip2/release/my_handler.wasm")]
    Check {
        /// The component file (.wasm) to check.
        file: PathBuf,
    },
    /// Compile every [[handler]] of the config into the artifact cache
    /// (`cache_dir`), in parallel, so the next `serve` loads them in
    /// milliseconds instead of compiling (tens of seconds for a Python or
    /// JS component). Handlers already in the cache are only checked.
    #[command(after_help = "\
Examples:
  outrun handlers compile --config outrun.toml")]
    Compile,
    /// Run one event through a handler without the queue (the test
    /// harness) and print the outcome, SQL statements and results, emitted
    /// events, kv operations, HTTP requests and log lines. SQL runs in a
    /// transaction that is rolled back unless --commit. Exit 0 when the
    /// handler succeeds (done or retry-after), 1 when it returns an error.
    #[command(after_help = "\
Examples:
  outrun handlers run my_handler.wasm --event order.created --payload '{\"id\":42}'
  outrun handlers run my_handler.wasm --event order.created --payload @event.json \\
      --database sqlite://app.db --http-fixtures fixtures.json --json
  outrun handlers run family-sharing --config outrun.toml --event share.start --payload @share.json --commit")]
    Run(Box<run::Args>),
    /// Write the handlers this binary carries (the shipped seed handlers and
    /// the bench guest) to DIR as <name>.wasm, for a config's `module`.
    /// Existing files of the same names are replaced.
    #[command(after_help = "\
Examples:
  outrun handlers export ./handlers
  outrun handlers check ./handlers/family_sharing.wasm")]
    Export {
        /// The directory to write to (created if missing).
        dir: PathBuf,
    },
}

pub async fn run(config: &Config, cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::List { json } => {
            if config.handler.is_empty() {
                anyhow::bail!(
                    "no [[handler]] entries to list; pass the config file with --config FILE"
                );
            }
            // Neither backend waits for its broker: listing works without one.
            let publisher = crate::publish::Publisher::connect(&config.publish).await?;
            let registry = super::serve::load_registry(config, publisher, None).await?;
            let handlers = registry.handlers();
            let limits = crate::limits::Limits::from_config(config)?;
            // The [[limit]]s over a handler's events: "id: budget".
            let limits_of = |events: &[String]| -> Vec<String> {
                limits
                    .limits
                    .iter()
                    .filter(|l| l.names.iter().any(|n| events.contains(n)))
                    .map(|l| format!("{}: {}", l.id, l.describe()))
                    .collect()
            };
            if json {
                let mut rows = Vec::with_capacity(handlers.len());
                for h in &handlers {
                    let mut row = serde_json::to_value(h)?;
                    row["limits"] = serde_json::json!(limits_of(&h.events));
                    rows.push(row);
                }
                outln!("{}", serde_json::to_string(&rows)?);
            } else {
                outln!(
                    "{:<20}  {:<12}  {:<20}  {:<40}  {:<40}  limits",
                    "name",
                    "version",
                    "loaded at",
                    "events",
                    "module"
                );
                for h in handlers {
                    let limits = limits_of(&h.events);
                    outln!(
                        "{:<20}  {:<12}  {:<20}  {:<40}  {:<40}  {}",
                        h.name,
                        &h.hash[..12],
                        h.loaded_at.format("%Y-%m-%d %H:%M:%S"),
                        h.events.join(","),
                        h.module.display(),
                        if limits.is_empty() {
                            "-".to_string()
                        } else {
                            limits.join("; ")
                        }
                    );
                }
            }
        }
        Command::Run(args) => return run::run(config, *args).await,
        Command::Compile => {
            if config.handler.is_empty() {
                anyhow::bail!(
                    "no [[handler]] entries to compile; pass the config file with --config FILE"
                );
            }
            let started = std::time::Instant::now();
            let publisher = crate::publish::Publisher::connect(&config.publish).await?;
            let registry = super::serve::load_registry(config, publisher, None).await?;
            for h in registry.handlers() {
                let cached = registry.current(&h.name).is_some_and(|v| v.from_cache());
                outln!(
                    "{} {} (version {}, {})",
                    if cached { "cached  " } else { "compiled" },
                    h.name,
                    &h.hash[..12],
                    h.module.display()
                );
            }
            match registry.cache_dir() {
                Some(dir) => outln!(
                    "{} handlers in {} ({:.1} s)",
                    registry.handlers().len(),
                    dir.display(),
                    started.elapsed().as_secs_f64()
                ),
                None => anyhow::bail!(
                    "no artifact cache: neither cache_dir, OUTRUN_CACHE_DIR, XDG_CACHE_HOME nor HOME is set, so nothing was kept; set cache_dir in the config"
                ),
            }
        }
        Command::Export { dir } => {
            for path in crate::shipped::export(&dir)? {
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                outln!("wrote {} ({size} bytes)", path.display());
            }
        }
        Command::Check { file } => {
            let path = file.clone();
            // Compiling takes tens of milliseconds of CPU: off the runtime.
            let info =
                tokio::task::spawn_blocking(move || crate::wasm::check_file(&path)).await??;
            outln!(
                "ok: {} implements outrun:handler/handler@{} (version {}, {} bytes)",
                info.path.display(),
                crate::wasm::registry::WIT_VERSION,
                &info.hash[..12],
                info.size
            );
            let n = &info.needs;
            outln!("  {}", n.describe());
            outln!(
                "  memory: a [[handler]] `memory` below {} is refused at load",
                crate::wasm::ByteSize(n.min_memory)
            );
            for i in &info.imports {
                outln!("  imports {i}");
            }
        }
    }
    Ok(())
}
