//! `outrun dev`: `serve`, plus the author's loop. Each `[[handler]]` with a
//! `source` directory is rebuilt when a file in it changes (its `build`
//! command, or `cargo build --target wasm32-wasip2 --release` for a Rust
//! crate) and the result hot-reloaded; a failed build prints the compiler's
//! error and the old version keeps serving. Every event gets a live line
//! (name, id, outcome, duration, error) and every reload one (version, build
//! time, reload time). After a reload, the dead events earlier versions
//! left can be replayed with `r` + Enter (what `outrun events replay
//! --since-reload` does).
//!
//! The watcher owns the question "is this a source change?": build outputs,
//! logs, databases, editor swap files and dev's own redirected output are
//! not, or `outrun dev > dev.log` in the project would rebuild in a loop.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::event::Event;
use crate::handler::{Effects, Handler, HandlerError, Outcome, Route, Router};
use crate::store::Store;
use crate::wasm::{Registry, Reloaded};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Do not apply migrations at start.
    #[arg(long)]
    pub no_migrate: bool,
    /// Admin server address (overrides admin.listen), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
}

/// Changes closer together than this are one rebuild (an editor's save is
/// several file events; `cargo fmt` touches many files).
const DEBOUNCE: Duration = Duration::from_millis(300);

/// One handler `dev` rebuilds.
#[derive(Debug, Clone)]
struct Watched {
    name: String,
    events: Vec<String>,
    source: PathBuf,
    build: String,
    module: PathBuf,
}

/// The build command of a handler: its `build`, or cargo's for a crate.
fn build_command(spec: &crate::wasm::HandlerSpec, source: &Path) -> anyhow::Result<String> {
    if let Some(cmd) = &spec.build {
        return Ok(cmd.clone());
    }
    if source.join("Cargo.toml").is_file() {
        return Ok("cargo build --target wasm32-wasip2 --release".into());
    }
    bail!(
        "handler {}: {} has no Cargo.toml, so dev does not know how to build it; set build = \"COMMAND\" in its [[handler]]",
        spec.name,
        source.display()
    )
}

fn watched(config: &Config) -> anyhow::Result<Vec<Watched>> {
    let base = config.base_dir();
    let mut out = Vec::new();
    for spec in &config.handler {
        let Some(source) = &spec.source else { continue };
        let source = crate::wasm::resolve(&base, source);
        let source = source.canonicalize().with_context(|| {
            format!(
                "handler {}: source directory {} not found; check `source` in its [[handler]] (relative to the config file)",
                spec.name,
                source.display()
            )
        })?;
        out.push(Watched {
            name: spec.name.clone(),
            events: spec.events.clone(),
            build: build_command(spec, &source)?,
            module: crate::wasm::resolve(&base, &spec.module),
            source,
        });
    }
    if out.is_empty() {
        bail!(
            "no [[handler]] of the config has a `source` directory, so there is nothing to rebuild; add source = \"DIR\" (the handler's project, relative to the config file) to a [[handler]], or use `outrun serve`"
        );
    }
    Ok(out)
}

/// A line on stdout; a closed stdout is not worth stopping the server for.
fn say(line: String) {
    let _ = super::write_stdout(format_args!("{line}"));
}

/// Run the build; Ok(elapsed) or Err(the output's tail, for the person).
async fn build(w: &Watched) -> Result<Duration, String> {
    let started = Instant::now();
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&w.build)
        .current_dir(&w.source)
        // componentize-py reports a Python SyntaxError as an anyhow error,
        // which RUST_BACKTRACE=1 in the author's shell turns into 40 lines
        // of backtrace that push the error itself out of the tail shown.
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run `sh -c {}`: {e}", w.build))?;
    if output.status.success() {
        return Ok(started.elapsed());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
    Err(format!("`{}` failed ({}):\n{tail}", w.build, output.status))
}

pub async fn run(config: Config, args: Args) -> anyhow::Result<()> {
    let handlers = watched(&config)?;
    // Build once before serving, so the modules are current.
    for w in &handlers {
        say(format!("dev: building {} ({})", w.name, w.build));
        match build(w).await {
            Ok(t) => say(format!("dev: built {} in {:.1} s", w.name, t.as_secs_f64())),
            Err(e) if w.module.is_file() => say(format!(
                "dev: build of {} failed; serving the module that is there ({}):\n{e}",
                w.name,
                w.module.display()
            )),
            Err(e) => bail!(
                "the first build of handler {} failed and there is no {} to serve yet: {e}",
                w.name,
                w.module.display()
            ),
        }
    }

    let registry: Arc<OnceLock<Arc<Registry>>> = Arc::default();
    let hooks = super::serve::Hooks {
        registry: Some(registry.clone()),
        wrap_router: Some(Box::new(|inner| {
            Arc::new(LiveFeed { inner }) as Arc<dyn Router>
        })),
    };
    let serve_args = super::serve::Args {
        no_migrate: args.no_migrate,
        admin: args.admin,
    };
    let store_config = config.clone();
    let serving = tokio::spawn(super::serve::run_with(config, serve_args, hooks));

    let (tx, mut changes) = mpsc::unbounded_channel::<usize>();
    let own = OwnOutput::of_stdio();
    let mut watcher = notify::recommended_watcher({
        let handlers = handlers.clone();
        // Each ignored path is logged once: a log on stderr that is itself
        // redirected into the watched directory must not feed itself.
        let mut told: HashSet<PathBuf> = HashSet::new();
        move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            for path in &event.paths {
                for (i, w) in handlers.iter().enumerate() {
                    match classify(w, path, &own) {
                        Change::Source => {
                            let _ = tx.send(i);
                        }
                        Change::Ignored(why) => {
                            if told.insert(path.clone()) {
                                tracing::debug!(
                                    handler = %w.name,
                                    "dev: not a source, no rebuild: {} ({why})",
                                    path.display()
                                );
                            }
                        }
                        Change::Elsewhere => {}
                    }
                }
            }
        }
    })
    .context("starting the source watcher")?;
    for w in &handlers {
        watcher
            .watch(&w.source, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", w.source.display()))?;
        say(format!(
            "dev: watching {} for handler {} (events {})",
            w.source.display(),
            w.name,
            w.events.join(", ")
        ));
    }

    // Connected once serve has loaded the handlers (it has migrated, and
    // created a SQLite file, by then).
    let mut store: Option<Store> = None;

    let mut serving = serving;
    loop {
        tokio::select! {
            result = &mut serving => {
                return result.context("the server task failed")?;
            }
            Some(first) = changes.recv() => {
                let mut due = vec![first];
                let deadline = tokio::time::Instant::now() + DEBOUNCE;
                while let Ok(Some(i)) = tokio::time::timeout_at(deadline, changes.recv()).await {
                    if !due.contains(&i) {
                        due.push(i);
                    }
                }
                for i in due {
                    let Some(registry) = registry.get().cloned() else {
                        // Still loading: the first load picks the new file up.
                        continue;
                    };
                    if store.is_none() {
                        match super::connect(&store_config).await {
                            Ok(s) => {
                                tokio::spawn(replay_on_key(s.clone(), handlers.clone(), registry.clone()));
                                store = Some(s);
                            }
                            Err(e) => say(format!("dev: no replay of dead events: {}", super::error_line(&e))),
                        }
                    }
                    rebuild(&handlers[i], &registry, store.as_ref()).await;
                }
            }
        }
    }
}

/// What a changed path is to one watched handler.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// A source of the handler: rebuild.
    Source,
    /// Inside its `source` directory, but not a source (why).
    Ignored(&'static str),
    /// Not inside its `source` directory.
    Elsewhere,
}

/// The files dev's own stdout and stderr are redirected to (device and
/// inode), whatever their names: `outrun dev > dev.out` in the project
/// writes a line per event, and each line would otherwise be a change.
#[derive(Debug, Default)]
struct OwnOutput(Vec<(u64, u64)>);

impl OwnOutput {
    fn of_stdio() -> OwnOutput {
        #[cfg(unix)]
        {
            use std::os::fd::AsFd;
            use std::os::unix::fs::MetadataExt;
            let id = |fd: std::os::fd::BorrowedFd<'_>| {
                let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
                let m = file.metadata().ok()?;
                m.is_file().then(|| (m.dev(), m.ino()))
            };
            OwnOutput(
                [id(std::io::stdout().as_fd()), id(std::io::stderr().as_fd())]
                    .into_iter()
                    .flatten()
                    .collect(),
            )
        }
        #[cfg(not(unix))]
        OwnOutput::default()
    }

    fn is(&self, path: &Path) -> bool {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            !self.0.is_empty()
                && std::fs::metadata(path).is_ok_and(|m| self.0.contains(&(m.dev(), m.ino())))
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            false
        }
    }
}

/// Whether a change at `path` is a source change of `w`. Not sources:
/// build outputs (`target/`, the module, any `.wasm`, componentize-py's
/// `__pycache__`, npm's `node_modules`), dot files and directories (`.git`,
/// editors' `.#x` locks), editor swap and backup files (`x.swp`, `x~`,
/// `#x#`, vim's `4913` probe), logs, SQLite databases (the templates'
/// `app.db`, which serve writes all the time) and dev's own redirected
/// output. A denylist, not an allowlist: a handler may be built from any
/// kind of file, and a missed rebuild is worse than a spurious one.
fn classify(w: &Watched, path: &Path, own: &OwnOutput) -> Change {
    let Ok(rel) = path.strip_prefix(&w.source) else {
        return Change::Elsewhere;
    };
    if path == w.module {
        return Change::Ignored("the handler's module");
    }
    if rel.components().any(|c| {
        let c = c.as_os_str().to_string_lossy();
        c == "target" || c == "__pycache__" || c == "node_modules"
    }) {
        return Change::Ignored("build output");
    }
    if rel
        .components()
        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
    {
        return Change::Ignored("a dot file");
    }
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let database = [".db", ".sqlite", ".sqlite3"].iter().any(|ext| {
        file.ends_with(ext)
            || ["-wal", "-shm", "-journal"]
                .iter()
                .any(|s| file.ends_with(&format!("{ext}{s}")))
    });
    if database {
        return Change::Ignored("a database");
    }
    if file.ends_with(".wasm") || file.ends_with(".pyc") {
        return Change::Ignored("build output");
    }
    if file.ends_with(".log") {
        return Change::Ignored("a log");
    }
    let swap = [".swp", ".swo", ".swx", ".tmp", ".bak", ".orig"]
        .iter()
        .any(|ext| file.ends_with(ext))
        || file.ends_with('~')
        || (file.len() > 1 && file.starts_with('#') && file.ends_with('#'))
        || file == "4913";
    if swap {
        return Change::Ignored("an editor's swap or backup file");
    }
    if own.is(path) {
        return Change::Ignored("dev's own output");
    }
    Change::Source
}

async fn rebuild(w: &Watched, registry: &Arc<Registry>, store: Option<&Store>) {
    let Some(before) = registry.current(&w.name) else {
        return;
    };
    say(format!("dev: {} changed; building", w.name));
    let built = match build(w).await {
        Ok(t) => t,
        Err(e) => {
            say(format!(
                "dev: build of {} failed; version {} keeps serving\n{e}",
                w.name,
                &before.hash()[..12]
            ));
            return;
        }
    };
    let started = Instant::now();
    let outcome = registry.reload(&w.name).await;
    let after = registry.current(&w.name).unwrap_or(before.clone());
    match outcome {
        Ok(Reloaded::Swapped { old, new, elapsed }) => say(format!(
            "dev: reloaded {}: {old} -> {new} (build {:.1} s, reload {} ms)",
            w.name,
            built.as_secs_f64(),
            elapsed.as_millis()
        )),
        // The module watcher of serve was quicker; same result.
        Ok(Reloaded::Unchanged) if after.hash() != before.hash() => say(format!(
            "dev: reloaded {}: {} -> {} (build {:.1} s, reload {} ms)",
            w.name,
            &before.hash()[..12],
            &after.hash()[..12],
            built.as_secs_f64(),
            started.elapsed().as_millis()
        )),
        Ok(_) => {
            say(format!(
                "dev: rebuilt {} in {:.1} s; the module did not change",
                w.name,
                built.as_secs_f64()
            ));
            return;
        }
        Err(e) => {
            say(format!(
                "dev: the new {} was not loaded; version {} keeps serving: {}",
                w.name,
                &before.hash()[..12],
                super::error_line(&e.into())
            ));
            return;
        }
    }
    if let Some(store) = store {
        match store.count_other_versions(&w.events, &after.hash()).await {
            Ok(0) => {}
            Ok(n) => say(format!(
                "dev: {n} dead event(s) of {} from earlier versions; press r + Enter to replay them",
                w.name
            )),
            Err(e) => say(format!(
                "dev: cannot count dead events: {}",
                super::error_line(&e.into())
            )),
        }
    }
}

/// `r` + Enter on stdin: replay the dead events of every watched handler
/// whose last attempt ran on a version other than the one serving now, as
/// `outrun events replay --since-reload` does.
async fn replay_on_key(store: Store, handlers: Vec<Watched>, registry: Arc<Registry>) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() != "r" {
            continue;
        }
        for w in &handlers {
            let Some(current) = registry.current(&w.name) else {
                continue;
            };
            match store
                .replay_other_versions(&w.events, &current.hash())
                .await
            {
                Ok(n) => say(format!(
                    "dev: replayed {n} dead event(s) of {} from earlier versions",
                    w.name
                )),
                Err(e) => say(format!(
                    "dev: replay failed: {}",
                    super::error_line(&e.into())
                )),
            }
        }
    }
}

/// Wraps every route's handler in [`Fed`], for the live event lines.
struct LiveFeed {
    inner: Arc<dyn Router>,
}

impl Router for LiveFeed {
    fn route(&self, name: &str) -> Option<Route> {
        let mut route = self.inner.route(name)?;
        route.handler = Arc::new(Fed {
            inner: route.handler,
            handler: route.handler_name.clone(),
        });
        Some(route)
    }
    fn saturated(&self) -> Vec<String> {
        self.inner.saturated()
    }
}

struct Fed {
    inner: Arc<dyn Handler>,
    handler: Arc<str>,
}

#[async_trait::async_trait]
impl Handler for Fed {
    async fn handle(&self, event: &Event, effects: &mut Effects) -> Result<Outcome, HandlerError> {
        let started = Instant::now();
        let result = self.inner.handle(event, effects).await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let outcome = match &result {
            Ok(Outcome::Done) => "done".to_string(),
            Ok(Outcome::RetryAfter(d)) => format!("retry-after {} ms", d.as_millis()),
            Err(e) if e.retryable => format!("failed (will retry): {}", e.message),
            Err(e) => format!("rejected: {}", e.message),
        };
        say(format!(
            "event {} {} -> {} attempt {} {outcome} ({ms:.1} ms)",
            event.name,
            event.id,
            self.handler,
            event.attempt()
        ));
        result
    }

    // The attempt history records it; the `r` key and `--since-reload`
    // compare it with the version serving now.
    fn version(&self) -> Option<Arc<str>> {
        self.inner.version()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_outputs_are_not_source_changes() {
        let w = Watched {
            name: "h".into(),
            events: vec![],
            source: PathBuf::from("/p"),
            build: "true".into(),
            module: PathBuf::from("/p/out/h.wasm"),
        };
        for output in [
            "/p/target/h.wasm",
            "/p/outrun_sdk/__pycache__/sql.cpython-314.pyc",
            "/p/node_modules/x/index.js",
            "/p/.git/index",
            "/p/out/h.wasm",
            "/elsewhere/app.py",
            "/p/app.db",
            "/p/app.db-wal",
            "/p/app.db-shm",
            "/p/data/x.sqlite3-journal",
            "/p/dev.log",
            "/p/src/.lib.rs.swp",
            "/p/src/lib.rs.swp",
            "/p/src/lib.rs~",
            "/p/src/#lib.rs#",
            "/p/src/4913",
            "/p/dist/h.wasm",
        ] {
            assert!(
                matches!(
                    classify(&w, Path::new(output), &OwnOutput::default()),
                    Change::Ignored(_) | Change::Elsewhere
                ),
                "{output}"
            );
        }
        for source in [
            "/p/app.py",
            "/p/outrun_sdk/sql.py",
            "/p/src/lib.rs",
            "/p/Cargo.toml",
        ] {
            assert_eq!(
                classify(&w, Path::new(source), &OwnOutput::default()),
                Change::Source,
                "{source}"
            );
        }
    }
}
