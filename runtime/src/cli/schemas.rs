//! `outrun schemas list|check`: the event contracts of `[schemas] dir`.

use serde_json::json;

use crate::config::Config;
use crate::schema::Schemas;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List the schemas of `[schemas] dir`: event name, version, draft,
    /// file, and the handlers that bind the name.
    #[command(after_help = "\
Examples:
  outrun schemas list --config outrun.toml
  outrun schemas list --config outrun.toml --json | jq '.[].name'")]
    List {
        /// Print a JSON array on stdout instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check every schema file (JSON, a valid draft-07 or 2020-12 schema)
    /// and, with `[schemas] required = true`, that every event name a
    /// handler binds has one. Exit 0 if all is well; otherwise every
    /// problem is printed on stderr, naming the file and the keyword.
    #[command(after_help = "\
Examples:
  outrun schemas check --config outrun.toml")]
    Check,
}

pub async fn run(config: &Config, cmd: Command) -> anyhow::Result<()> {
    let Some(dir) = config.schema_dir() else {
        anyhow::bail!(
            "no schema directory: add `[schemas] dir = \"schemas\"` to the config (pass it with --config FILE) or set OUTRUN_SCHEMAS_DIR"
        );
    };
    match cmd {
        Command::List { json } => {
            let schemas = Schemas::load(&dir, config.schemas.required)?;
            let bound = schemas.bound_by(&config.handler);
            let rows: Vec<_> = schemas
                .list()
                .into_iter()
                .map(|s| {
                    let handlers = bound.get(&s.name).cloned().unwrap_or_default();
                    (s, handlers)
                })
                .collect();
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(s, handlers)| {
                        json!({
                            "name": s.name,
                            "event": s.base,
                            "version": s.version,
                            "draft": s.draft,
                            "file": s.file,
                            "handlers": handlers,
                        })
                    })
                    .collect();
                outln!("{}", serde_json::to_string(&list)?);
            } else {
                outln!(
                    "{:<32}  {:<7}  {:<8}  {:<40}  handlers",
                    "name",
                    "version",
                    "draft",
                    "file"
                );
                for (s, handlers) in rows {
                    let version = s.version.map_or_else(|| "-".to_string(), |v| v.to_string());
                    let handlers = if handlers.is_empty() {
                        "-".to_string()
                    } else {
                        handlers.join(",")
                    };
                    outln!(
                        "{:<32}  {:<7}  {:<8}  {:<40}  {}",
                        s.name,
                        version,
                        s.draft,
                        s.file,
                        handlers
                    );
                }
            }
        }
        Command::Check => {
            let (schemas, mut problems) = Schemas::scan(&dir, config.schemas.required)?;
            problems.extend(schemas.unbound(&config.handler));
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("{p}");
                }
                anyhow::bail!(
                    "{} problem(s) in the schemas of {}; see above",
                    problems.len(),
                    dir.display()
                );
            }
            let bound = schemas.bound_by(&config.handler);
            let unchecked: Vec<&String> = bound.keys().filter(|n| !schemas.contains(n)).collect();
            outln!(
                "ok: {} schema(s) in {} compile{}",
                schemas.list().len(),
                dir.display(),
                if schemas.required() {
                    "; every bound event name has one"
                } else {
                    ""
                }
            );
            if !unchecked.is_empty() {
                let names: Vec<&str> = unchecked.iter().map(|s| s.as_str()).collect();
                outln!(
                    "note: bound event names without a schema (not checked): {}",
                    names.join(", ")
                );
            }
        }
    }
    Ok(())
}
