//! The handler author's path through the real binary: the handlers the
//! binary carries (demo, bench and `handlers export` from an empty
//! directory), `outrun new` (refusals, then a project that builds, passes
//! its unit tests and `handlers check`, runs through `handlers run`, and is
//! served and hot-reloaded by `outrun dev` after an edit, with a broken
//! build leaving the old version serving).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{FAST_ENV, TestDb, fails, ok};
use serde_json::Value;

const CACHE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-artifact-cache");

/// `outrun ARGS` in `dir`, with no config or database from the environment.
fn outrun_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outrun"))
        .current_dir(dir)
        .args(args)
        .env_remove("OUTRUN_CONFIG")
        .env_remove("OUTRUN_DATABASE_URL")
        .env_remove("OUTRUN_BENCH_MODULE")
        .env_remove("OUTRUN_LOG")
        .env_remove("RUST_LOG")
        .env("OUTRUN_CACHE_DIR", CACHE)
        .output()
        .expect("run outrun")
}

#[test]
fn demo_runs_from_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = outrun_in(dir.path(), &["demo"]);
    let stdout = ok(&out);
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
    assert!(stdout.contains("family-sharing"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "the demo leaves nothing behind: {left:?}");
}

#[test]
fn bench_runs_from_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::sqlite();
    let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .current_dir(dir.path())
        .args(["bench", "--events", "200", "--json", "--database", db.url()])
        .env_remove("OUTRUN_CONFIG")
        .env_remove("OUTRUN_BENCH_MODULE")
        .env("OUTRUN_CACHE_DIR", CACHE)
        .output()
        .unwrap();
    let r: Value = serde_json::from_str(ok(&out).trim()).unwrap();
    assert_eq!(r["events"], 200, "{r}");
}

/// `cargo install --path runtime` as the README says, then the installed
/// binary alone: `outrun demo` and `outrun bench` from an empty directory
/// under /tmp, with an environment that names nothing of the checkout (no
/// OUTRUN_* variables, a fresh HOME for the artifact cache). The install
/// reuses this workspace's debug build (CARGO_TARGET_DIR): it must not
/// compile wasmtime again. Its first run in a target directory compiles
/// the few small crates whose features the workspace build unifies
/// differently (the guests' host builds add some), about 3 minutes on 2
/// cores; later runs relink only what changed.
#[test]
fn cargo_install_runs_demo_and_bench_without_the_checkout() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let mut install = Command::new(cargo());
    install
        .current_dir(&workspace)
        .args([
            "install",
            "--path",
            "runtime",
            "--debug",
            "--locked",
            "--offline",
        ])
        .arg("--root")
        .arg(root.path());
    // The variables cargo and nextest set for this test would be new to the
    // build scripts and crates that read them, and each change relinks
    // outrun: the install runs in the environment of a person's shell.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("NEXTEST")
            || key.starts_with("__CARGO")
            || (key.starts_with("RUST") && key != "RUSTUP_HOME" && key != "RUSTUP_TOOLCHAIN")
            || key == "OUT_DIR"
        {
            install.env_remove(key.as_ref());
        }
    }
    // The target directory this test was built in (<target>/debug/deps/
    // holds the test binary), wherever CARGO_TARGET_DIR put it.
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| workspace.join("target"));
    let out = install
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo install");
    let log = assert_ok(&out, "cargo install --path runtime");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "cargo install took {:.1} s:\n{log}{stderr}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        !stderr.contains("Compiling wasmtime "),
        "cargo install rebuilt wasmtime instead of reusing the workspace's build:\n{stderr}"
    );
    let outrun = root.path().join("bin/outrun");
    assert!(outrun.is_file(), "{} not installed", outrun.display());

    let run = |dir: &Path, home: &Path, args: &[&str]| {
        Command::new(&outrun)
            .current_dir(dir)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", home)
            .output()
            .expect("run the installed outrun")
    };
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stdout = ok(&run(dir.path(), home.path(), &["demo"]));
    assert!(stdout.contains("checks passed"), "{stdout}");
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        home.path(),
        &["bench", "--events", "200", "--json"],
    );
    let r: Value = serde_json::from_str(ok(&out).trim()).unwrap();
    assert_eq!(r["events"], 200, "{r}");
}

#[test]
fn handlers_export_writes_checkable_components() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("handlers");
    let stdout = ok(&outrun_in(dir.path(), &["handlers", "export", "handlers"]));
    for stem in [
        "ai_check_requeue",
        "family_sharing",
        "package_deletion",
        "bonus_accrual",
        "stoplist_publisher",
        "bench",
    ] {
        let path = out_dir.join(format!("{stem}.wasm"));
        assert!(
            stdout.contains(&format!("wrote handlers/{stem}.wasm")),
            "{stdout}"
        );
        let check = ok(&outrun_in(
            dir.path(),
            &["handlers", "check", path.to_str().unwrap()],
        ));
        assert!(check.starts_with("ok: "), "{check}");
    }
    // The same bytes as the guests build-guests.sh writes.
    assert_eq!(
        std::fs::read(out_dir.join("family_sharing.wasm")).unwrap(),
        std::fs::read(common::guest("family_sharing")).unwrap()
    );
}

/// A module built against an older WIT of outrun (its `outrun:handler`
/// imports at version 0.0.9) is refused by `handlers check`, `handlers run`
/// and `serve` with a message naming each mismatching interface and the fix.
#[test]
fn module_built_against_an_older_wit_is_refused_naming_the_interface() {
    let dir = tempfile::tempdir().unwrap();
    // The bench guest with its sql and emit imports renamed to version
    // 0.0.9: the import names are length-prefixed strings, and the new ones
    // are as long as the old, so the component stays well-formed; the
    // names are all that tells a module built against another wit/ apart.
    let bytes = std::fs::read(common::guest("bench")).unwrap();
    let mut old = bytes.clone();
    for iface in ["sql", "emit"] {
        let (from, to) = (
            format!("outrun:handler/{iface}@0.1.0"),
            format!("outrun:handler/{iface}@0.0.9"),
        );
        let at: Vec<usize> = old
            .windows(from.len())
            .enumerate()
            .filter(|(_, w)| *w == from.as_bytes())
            .map(|(i, _)| i)
            .collect();
        assert!(!at.is_empty(), "the bench guest imports {from}");
        for i in at {
            old[i..i + to.len()].copy_from_slice(to.as_bytes());
        }
    }
    let module = dir.path().join("old.wasm");
    std::fs::write(&module, &old).unwrap();
    let module_s = module.to_str().unwrap();
    let says = |err: &str| {
        assert!(err.contains(module_s), "{err}");
        assert!(
            err.contains("built against an older version of outrun's WIT (outrun:handler@0.0.9)"),
            "{err}"
        );
        assert!(
            err.contains("imports outrun:handler/emit@0.0.9, outrun:handler/sql@0.0.9")
                || err.contains("imports outrun:handler/sql@0.0.9, outrun:handler/emit@0.0.9"),
            "{err}"
        );
        assert!(err.contains("provides outrun:handler@0.1.0"), "{err}");
        assert!(
            err.contains("rebuild the handler against this outrun's wit/"),
            "{err}"
        );
        assert!(
            !err.contains("wrong type"),
            "linking's error instead: {err}"
        );
    };
    says(&fails(&outrun_in(
        dir.path(),
        &["handlers", "check", module_s],
    )));
    says(&fails(&outrun_in(
        dir.path(),
        &[
            "handlers",
            "run",
            module_s,
            "--event",
            "bench.noop",
            "--payload",
            "{}",
        ],
    )));

    let db = TestDb::sqlite();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!("[[handler]]\nname = \"old\"\nevents = [\"bench.noop\"]\nmodule = {module_s:?}\n"),
    )
    .unwrap();
    let out = common::outrun_command(&db)
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    // serve logs its start-up before loading the handlers; the error is
    // its last line.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
    says(last);
}

#[test]
fn new_refuses_a_non_empty_dir_and_unknown_languages() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("h");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep.txt"), "mine").unwrap();
    let err = fails(&outrun_in(dir.path(), &["new", "h", "--dir", "h"]));
    assert!(err.contains("is not empty; nothing was written"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 1);

    ok(&outrun_in(
        dir.path(),
        &["new", "h", "--dir", "h", "--force"],
    ));
    assert_eq!(
        std::fs::read_to_string(target.join("keep.txt")).unwrap(),
        "mine"
    );
    assert!(target.join("src/lib.rs").is_file());

    let err = fails(&outrun_in(dir.path(), &["new", "x", "--lang", "cobol"]));
    assert!(err.contains("invalid value 'cobol'"), "{err}");
    assert!(err.contains("rust"), "{err}");
    assert!(err.contains("python") && err.contains("js"), "{err}");
    let err = fails(&outrun_in(dir.path(), &["new", "9lives"]));
    assert!(err.contains("not a usable handler name"), "{err}");
    assert!(!dir.path().join("x").exists() && !dir.path().join("9lives").exists());
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Shared by runs of this test: the registry crates compile once.
fn project_target_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/new-project"
    ))
}

fn cargo_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(cargo())
        .current_dir(dir)
        .args(args)
        .env("CARGO_TARGET_DIR", project_target_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("run cargo")
}

fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A stand-in customer service on 127.0.0.1: answers every request with one
/// customer.
fn customer_service() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = r#"{"email":"grace@example.com","vip":false}"#;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// `outrun dev` as a child: stdout (the live lines) and stderr in files.
struct Dev {
    child: std::process::Child,
    out: PathBuf,
    err: PathBuf,
}

impl Dev {
    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
    async fn wait_for_line(&self, what: &str, deadline: Duration) {
        common::eventually(what, deadline, || async {
            self.stdout().contains(what).then_some(())
        })
        .await;
    }
    async fn wait_for_log(&self, what: &str, deadline: Duration) {
        common::eventually(what, deadline, || async {
            self.stderr().contains(what).then_some(())
        })
        .await;
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn tier(db: &TestDb, order: i64) -> Option<String> {
    db.strings(&format!(
        "SELECT tier FROM order_tiers WHERE order_id = {order}"
    ))
    .await
    .into_iter()
    .next()
}

fn enqueue(db: &TestDb, order: i64) {
    let payload = format!(r#"{{"order_id":{order},"customer_id":7,"amount_cents":500}}"#);
    ok(&common::outrun(
        db,
        &["enqueue", "order.created", "--payload", &payload],
    ));
}

/// `outrun new` → cargo build → cargo test → handlers check → handlers run
/// (fixtures, a real database) → `outrun dev` serving it, an edit
/// hot-reloaded, a broken build that leaves the old version serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_project_builds_runs_and_hot_reloads_under_dev() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("order-welcome");
    let created = ok(&outrun_in(
        tmp.path(),
        &[
            "new",
            "order-welcome",
            "--lang",
            "rust",
            "--dir",
            "order-welcome",
        ],
    ));
    assert!(
        created.contains("[[handler]]\nname = \"order-welcome\""),
        "{created}"
    );
    assert!(
        created.contains("cargo build --target wasm32-wasip2 --release"),
        "{created}"
    );

    assert_ok(
        &cargo_in(
            &project,
            &["build", "--target", "wasm32-wasip2", "--release"],
        ),
        "cargo build of the new project",
    );
    let tests = cargo_in(&project, &["test"]);
    assert_ok(&tests, "cargo test of the new project");
    assert!(
        String::from_utf8_lossy(&tests.stdout).contains("2 passed"),
        "{}",
        String::from_utf8_lossy(&tests.stdout)
    );
    let wasm = project_target_dir().join("wasm32-wasip2/release/order_welcome.wasm");
    let wasm_s = wasm.to_str().unwrap();
    let check = ok(&outrun_in(&project, &["handlers", "check", wasm_s]));
    assert!(check.contains("imports outrun:handler/sql"), "{check}");

    // One event through it: real database, recorded HTTP, rolled back.
    let db = TestDb::sqlite();
    ok(&common::outrun(&db, &["migrate"]));
    db.exec_script(&std::fs::read_to_string(project.join("schema.sql")).unwrap())
        .await;
    let out = common::outrun_command(&db)
        .current_dir(&project)
        .env("OUTRUN_CACHE_DIR", CACHE)
        .args(["handlers", "run", wasm_s, "--event", "order.created"])
        .args(["--payload", "@events/order.created.json"])
        .args(["--http-fixtures", "fixtures/http.json", "--json"])
        .output()
        .unwrap();
    let r: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(r["outcome"]["status"], "done", "{r}");
    assert_eq!(r["http"][0]["status"], 200, "{r}");
    assert_eq!(r["http"][0]["source"], "fixture", "{r}");
    assert_eq!(r["kv"][0]["op"], "get", "{r}");
    assert_eq!(r["kv"][1]["op"], "set", "{r}");
    assert!(
        r["sql"][0]["statement"]
            .as_str()
            .unwrap()
            .starts_with("INSERT INTO order_tiers"),
        "{r}"
    );
    assert_eq!(r["sql"][0]["result"]["affected"], 1, "{r}");
    assert_eq!(r["emitted"][0]["name"], "customer.welcomed", "{r}");
    let welcomed: Value =
        serde_json::from_str(r["emitted"][0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(welcomed["tier"], "gold", "{r}");
    assert_eq!(welcomed["email"], "ada@example.com", "{r}");
    assert!(
        r["logs"][0]["message"]
            .as_str()
            .unwrap()
            .contains("order 1001 is gold"),
        "{r}"
    );
    assert!(tier(&db, 1001).await.is_none(), "rolled back");

    // `outrun dev`: the project's config, pointed at this test's database,
    // a stand-in customer service and the shared cargo target directory.
    let port = customer_service();
    let config = std::fs::read_to_string(project.join("outrun.toml"))
        .unwrap()
        .replace("sqlite://app.db?mode=rwc", db.url())
        .replace(
            "module = \"target/wasm32-wasip2/release/order_welcome.wasm\"",
            &format!("module = {wasm_s:?}"),
        )
        .replace(
            "\"http://customers.local\"",
            &format!("\"http://127.0.0.1:{port}\""),
        )
        .replace("[\"customers.local\"]", &format!("[\"127.0.0.1:{port}\"]"));
    let config_path = project.join("dev.toml");
    std::fs::write(&config_path, config).unwrap();
    let out_path = tmp.path().join("dev.out");
    let err_path = tmp.path().join("dev.err");
    let child = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .current_dir(&project)
        .args(["dev", "--config", "dev.toml"])
        .envs(FAST_ENV)
        .env_remove("OUTRUN_DATABASE_URL")
        .env_remove("RUST_LOG")
        .env("CARGO_TARGET_DIR", project_target_dir())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let dev = Dev {
        child,
        out: out_path,
        err: err_path,
    };
    dev.wait_for_line("dev: watching", Duration::from_secs(300))
        .await;
    common::eventually("dev to serve", Duration::from_secs(120), || async {
        dev.stderr().contains("dispatch loop started").then_some(())
    })
    .await;

    enqueue(&db, 1);
    let first =
        common::eventually("order 1 handled", Duration::from_secs(60), || tier(&db, 1)).await;
    assert_eq!(first, "standard");
    dev.wait_for_line("event order.created", Duration::from_secs(10))
        .await;
    assert!(
        dev.stdout().contains("-> order-welcome attempt 1 done"),
        "{}",
        dev.stdout()
    );

    // An edit is rebuilt and hot-reloaded.
    let lib = project.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(
        &lib,
        source.replace("        \"standard\"\n", "        \"silver\"\n"),
    )
    .unwrap();
    dev.wait_for_line("dev: reloaded order-welcome", Duration::from_secs(300))
        .await;
    enqueue(&db, 2);
    let second =
        common::eventually("order 2 handled", Duration::from_secs(60), || tier(&db, 2)).await;
    assert_eq!(second, "silver", "the edited version serves");

    // A broken build prints the compiler's error; the old version serves on.
    let edited = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, format!("{edited}\nfn broken( {{\n")).unwrap();
    dev.wait_for_line(
        "dev: build of order-welcome failed",
        Duration::from_secs(300),
    )
    .await;
    let stdout = dev.stdout();
    assert!(stdout.contains("keeps serving"), "{stdout}");
    assert!(
        stdout.contains("error"),
        "the compiler's error is shown: {stdout}"
    );
    enqueue(&db, 3);
    let third =
        common::eventually("order 3 handled", Duration::from_secs(60), || tier(&db, 3)).await;
    assert_eq!(third, "silver", "the last good version keeps serving");

    Command::new("kill")
        .args(["-TERM", &dev.child.id().to_string()])
        .status()
        .unwrap();
    let mut dev = dev;
    let status = dev.child.wait().unwrap();
    assert!(
        status.success(),
        "dev exited with {status}; stderr:\n{}",
        dev.stderr()
    );
}

/// `outrun dev` with a `build` command of its own (no cargo: it copies one
/// of the probe's two builds into place): the dead events of the previous
/// version are offered for replay and replayed with `r`, and a failing
/// build, or a module the check rejects, leaves the running version serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_replays_dead_letters_and_survives_a_broken_build() {
    let db = TestDb::sqlite();
    ok(&common::outrun(&db, &["migrate"]));
    db.exec("CREATE TABLE probe_seen (event_id TEXT PRIMARY KEY, version TEXT NOT NULL)")
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(tmp.path().join("mod")).unwrap();
    let v1 = common::guest("probe");
    let v2 = common::guest("probe_v2");
    std::fs::write(src.join("version.txt"), v1.to_str().unwrap()).unwrap();
    std::fs::write(
        tmp.path().join("dev.toml"),
        r#"
[[handler]]
name = "p"
events = ["probe.fail", "probe.version"]
module = "mod/probe.wasm"
source = "src"
build = 'cp "$(cat version.txt)" ../mod/probe.wasm'
[handler.allow]
sql = true
"#,
    )
    .unwrap();
    let out_path = tmp.path().join("dev.out");
    let err_path = tmp.path().join("dev.err");
    let child = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .current_dir(tmp.path())
        .args(["dev", "--config", "dev.toml", "--database", db.url()])
        .envs(FAST_ENV)
        .env_remove("OUTRUN_DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let mut dev = Dev {
        child,
        out: out_path,
        err: err_path,
    };
    let mut stdin = dev.child.stdin.take().unwrap();
    dev.wait_for_line("dev: built p", Duration::from_secs(60))
        .await;
    common::eventually("dev to serve", Duration::from_secs(120), || async {
        dev.stderr().contains("dispatch loop started").then_some(())
    })
    .await;

    ok(&common::outrun(
        &db,
        &[
            "enqueue",
            "probe.fail",
            "--payload",
            r#"{"message":"boom","retryable":false}"#,
        ],
    ));
    dev.wait_for_line("rejected: boom", Duration::from_secs(30))
        .await;
    let dead = "SELECT COUNT(*) FROM outbox_events WHERE retry >= max_retry";
    common::wait_for("the event to be dead", || async {
        db.scalar(dead).await == 1
    })
    .await;

    std::fs::write(src.join("version.txt"), v2.to_str().unwrap()).unwrap();
    dev.wait_for_line("dev: reloaded p", Duration::from_secs(60))
        .await;
    dev.wait_for_line(
        "1 dead event(s) of p from earlier versions; press r + Enter",
        Duration::from_secs(10),
    )
    .await;
    stdin.write_all(b"r\n").unwrap();
    dev.wait_for_line(
        "dev: replayed 1 dead event(s) of p from earlier versions",
        Duration::from_secs(10),
    )
    .await;
    common::eventually(
        "the replayed event to run again",
        Duration::from_secs(30),
        || async { (dev.stdout().matches("rejected: boom").count() == 2).then_some(()) },
    )
    .await;

    std::fs::write(src.join("version.txt"), "broken").unwrap();
    dev.wait_for_line("dev: build of p failed", Duration::from_secs(60))
        .await;
    let stdout = dev.stdout();
    assert!(stdout.contains("keeps serving"), "{stdout}");
    assert!(
        stdout.contains("cp: "),
        "the command's error is shown: {stdout}"
    );

    // A build that succeeds but yields no component: the check rejects it.
    let junk = tmp.path().join("junk.wasm");
    std::fs::write(&junk, "not a component").unwrap();
    std::fs::write(src.join("version.txt"), junk.to_str().unwrap()).unwrap();
    dev.wait_for_line("dev: the new p was not loaded", Duration::from_secs(60))
        .await;
    let stdout = dev.stdout();
    assert!(stdout.contains("not a WebAssembly file"), "{stdout}");

    ok(&common::outrun(
        &db,
        &["enqueue", "probe.version", "--payload", "{}"],
    ));
    let version = common::eventually("probe.version handled", Duration::from_secs(30), || async {
        db.strings("SELECT version FROM probe_seen")
            .await
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(version, "2", "the last good build keeps serving");
    drop(stdin);
}

// --------------------------------------------- replay --since-reload

on_both_backends!(replay_since_reload_replays_what_earlier_versions_killed);

/// Enqueue `name` with a payload that makes the probe reject it; its id.
fn enqueue_rejected(db: &TestDb, name: &str) -> String {
    ok(&common::outrun(
        db,
        &[
            "enqueue",
            name,
            "--payload",
            r#"{"message":"boom","retryable":false}"#,
        ],
    ))
    .trim()
    .to_string()
}

/// Whether event `id` is dead now.
async fn is_dead(db: &TestDb, id: &str) -> bool {
    db.scalar(&format!(
        "SELECT COUNT(*) FROM outbox_events WHERE id = '{id}' AND retry >= max_retry"
    ))
    .await
        == 1
}

/// Serve `config` until `dead` dead events exist, then stop.
async fn serve_until_dead(db: &TestDb, config: &Path, dead: i64) {
    let serve = common::Serve::ready(db, config).await;
    common::wait_for(&format!("{dead} dead events"), || async {
        db.scalar("SELECT COUNT(*) FROM outbox_events WHERE retry >= max_retry")
            .await
            == dead
    })
    .await;
    serve.stop();
}

/// Two handlers run version A of the probe and kill events; both modules
/// are replaced by version B, which kills one more. `replay --since-reload`
/// replays exactly the events A killed: per handler with --handler, not
/// B's, not an event that died without an attempt (no handler ran it).
async fn replay_since_reload_replays_what_earlier_versions_killed(db: TestDb) {
    ok(&common::outrun(&db, &["migrate"]));
    let dir = tempfile::tempdir().unwrap();
    let (p_module, q_module) = (dir.path().join("p.wasm"), dir.path().join("q.wasm"));
    for m in [&p_module, &q_module] {
        std::fs::copy(common::guest("probe"), m).unwrap();
    }
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        r#"
[[handler]]
name = "p"
events = ["probe.fail"]
module = "p.wasm"

[[handler]]
name = "q"
events = ["q/probe.fail"]
module = "q.wasm"
"#,
    )
    .unwrap();
    let config_s = config.to_str().unwrap();
    let p_a: Vec<String> = (0..2)
        .map(|_| enqueue_rejected(&db, "probe.fail"))
        .collect();
    let q_a = enqueue_rejected(&db, "q/probe.fail");
    // Cancelled before any version ran it: no attempt, never replayed.
    let cancelled = enqueue_rejected(&db, "probe.fail");
    ok(&common::outrun(&db, &["events", "cancel", &cancelled]));
    serve_until_dead(&db, &config, 4).await;

    for m in [&p_module, &q_module] {
        std::fs::copy(common::guest("probe_v2"), m).unwrap();
    }
    let p_b = enqueue_rejected(&db, "probe.fail");
    serve_until_dead(&db, &config, 5).await;

    let replay = |extra: &[&str]| {
        let mut args = vec!["events", "replay", "--since-reload", "--config", config_s];
        args.extend_from_slice(extra);
        common::outrun(&db, &args)
    };
    assert_eq!(ok(&replay(&["--dry-run"])).trim(), "3");
    assert_eq!(ok(&replay(&["--handler", "p", "--dry-run"])).trim(), "2");
    for id in p_a.iter().chain([&q_a, &p_b, &cancelled]) {
        assert!(is_dead(&db, id).await, "a dry run changes nothing");
    }

    let out = replay(&["--handler", "p"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("replayed 2 dead events of p"), "{stderr}");
    for id in &p_a {
        assert!(!is_dead(&db, id).await, "{id}: killed by p's version A");
    }
    for id in [&q_a, &p_b, &cancelled] {
        assert!(is_dead(&db, id).await, "{id} stays dead");
    }

    // Every handler: q's event of version A too, and nothing else.
    let out = replay(&[]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("replayed 0 dead events of p"), "{stderr}");
    assert!(stderr.contains("replayed 1 dead events of q"), "{stderr}");
    assert!(!is_dead(&db, &q_a).await);
    for id in [&p_b, &cancelled] {
        assert!(is_dead(&db, id).await, "{id} stays dead");
    }

    // Bad input names the flag and the fix.
    let err = fails(&replay(&["--handler", "nope"]));
    assert!(err.contains("--handler nope"), "{err}");
    assert!(err.contains("it has p, q"), "{err}");
    std::fs::remove_file(&q_module).unwrap();
    let err = fails(&replay(&["--dry-run"]));
    assert!(err.contains("handler q: cannot read its module"), "{err}");
    let err = fails(&common::outrun(
        &db,
        &["events", "replay", "--handler", "p"],
    ));
    assert!(err.contains("--since-reload"), "{err}");
}

/// `outrun dev > dev.out` run inside the project: its own output, logs,
/// editor swap files, build outputs and databases in the watched directory
/// do not rebuild (each is logged as not a source, once); a source change
/// does, once. Each reload prunes the artifact cache down to `cache_keep`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_ignores_what_is_not_a_source_and_prunes_the_cache() {
    let db = TestDb::sqlite();
    ok(&common::outrun(&db, &["migrate"]));
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(&project).unwrap();
    let (v1, v2) = (common::guest("probe"), common::guest("probe_v2"));
    std::fs::write(project.join("version.txt"), v1.to_str().unwrap()).unwrap();
    std::fs::write(
        project.join("outrun.toml"),
        r#"
[[handler]]
name = "p"
events = ["probe.echo"]
module = "target/probe.wasm"
source = "."
build = 'mkdir -p target && cp "$(cat version.txt)" target/probe.wasm'
"#,
    )
    .unwrap();
    // Both of dev's outputs go into the watched directory, under names no
    // pattern knows: only "this is dev's own output" keeps them out.
    let out_path = project.join("dev.out");
    let err_path = project.join("dev.err");
    let child = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .current_dir(&project)
        .args(["dev", "--config", "outrun.toml", "--database", db.url()])
        .envs(FAST_ENV)
        .env("OUTRUN_LOG", "info,outrun::cli::dev=debug")
        .env("OUTRUN_CACHE_DIR", &cache)
        .env("OUTRUN_CACHE_KEEP", "0")
        .env_remove("OUTRUN_DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let dev = Dev {
        child,
        out: out_path,
        err: err_path,
    };
    dev.wait_for_line("dev: watching", Duration::from_secs(60))
        .await;
    let root = project.canonicalize().unwrap();
    let ignored = |file: &str, why: &str| {
        format!(
            "not a source, no rebuild: {} ({why})",
            root.join(file).display()
        )
    };
    dev.wait_for_log(
        &ignored("dev.out", "dev's own output"),
        Duration::from_secs(30),
    )
    .await;
    common::eventually("dev to serve", Duration::from_secs(120), || async {
        dev.stderr()
            .contains("every handler compiled")
            .then_some(())
    })
    .await;
    dev.wait_for_log(
        &ignored("dev.err", "dev's own output"),
        Duration::from_secs(30),
    )
    .await;

    for (file, why) in [
        ("notes.log", "a log"),
        (".lib.rs.swp", "a dot file"),
        ("lib.rs.swp", "an editor's swap or backup file"),
        ("lib.rs~", "an editor's swap or backup file"),
        ("4913", "an editor's swap or backup file"),
        ("app.db", "a database"),
        ("copy.wasm", "build output"),
    ] {
        std::fs::write(project.join(file), "x").unwrap();
        dev.wait_for_log(&ignored(file, why), Duration::from_secs(30))
            .await;
    }
    let artifacts = || {
        std::fs::read_dir(&cache)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
                    .count()
            })
            .unwrap_or(0)
    };
    common::wait_for("one artifact in the cache", || async { artifacts() == 1 }).await;

    // A source change rebuilds, once; each reload prunes the other version.
    for (i, version) in [&v2, &v1].into_iter().enumerate() {
        std::fs::write(project.join("version.txt"), version.to_str().unwrap()).unwrap();
        common::eventually("the reload", Duration::from_secs(60), || async {
            (dev.stdout().matches("dev: reloaded p").count() == i + 1).then_some(())
        })
        .await;
        common::wait_for("the cache pruned to the version in use", || async {
            artifacts() == 1
        })
        .await;
    }
    let stdout = dev.stdout();
    assert_eq!(
        stdout.matches("dev: p changed; building").count(),
        2,
        "one build per source change, none for the rest:\n{stdout}"
    );
}
