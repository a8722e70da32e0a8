//! Python and JavaScript handlers through the real binary: `outrun new
//! --lang python|js` writes the example of handlers/example-{python,js}
//! with its SDK (so the component scripts/build-polyglot-guests.sh built
//! once stands for the project's build: 20-30 s each, not repeated here),
//! the project's own unit test passes against it, `handlers check` accepts
//! it, `handlers run` reports its sql, emit, kv and http calls, and `serve`
//! drains events with it on both backends. A Python handler that raises and
//! a JS handler that throws fail retryably with the error in last_error.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{FAST_ENV, TestDb, ok};
use serde_json::Value;

const CACHE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-artifact-cache");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// What differs between the two languages.
struct Lang {
    flag: &'static str,
    /// target/guests/<stem>.wasm
    stem: &'static str,
    example: &'static str,
    sdk: &'static str,
    /// (file in the project, file in the repository) that must be equal.
    same: &'static [(&'static str, &'static str)],
    unit_test: &'static [&'static str],
    /// A payload without customer_id, and what last_error then says.
    broken_says: &'static str,
}

const PYTHON: Lang = Lang {
    flag: "python",
    stem: "example_python",
    example: "handlers/example-python",
    sdk: "handlers/sdk-python",
    same: &[
        ("app.py", "handlers/example-python/app.py"),
        (
            "outrun_sdk/__init__.py",
            "handlers/sdk-python/outrun_sdk/__init__.py",
        ),
        (
            "outrun_sdk/_wit.py",
            "handlers/sdk-python/outrun_sdk/_wit.py",
        ),
        (
            "outrun_sdk/http.py",
            "handlers/sdk-python/outrun_sdk/http.py",
        ),
        ("outrun_sdk/sql.py", "handlers/sdk-python/outrun_sdk/sql.py"),
        ("outrun_sdk/kv.py", "handlers/sdk-python/outrun_sdk/kv.py"),
        ("outrun_sdk/log.py", "handlers/sdk-python/outrun_sdk/log.py"),
        (
            "outrun_sdk/config.py",
            "handlers/sdk-python/outrun_sdk/config.py",
        ),
        ("wit/handler.wit", "wit/handler.wit"),
    ],
    unit_test: &["python3", "-m", "unittest"],
    broken_says: "KeyError: 'customer_id' (at ",
};

const JS: Lang = Lang {
    flag: "js",
    stem: "example_js",
    example: "handlers/example-js",
    sdk: "handlers/sdk-js",
    same: &[
        ("app.js", "handlers/example-js/app.js"),
        ("logic.js", "handlers/example-js/logic.js"),
        ("outrun-sdk/index.js", "handlers/sdk-js/index.js"),
        ("outrun-sdk/index.d.ts", "handlers/sdk-js/index.d.ts"),
        ("wit/handler.wit", "wit/handler.wit"),
    ],
    unit_test: &["node", "--test"],
    broken_says: "Error: customer_id is missing (at ",
};

/// The example component built by scripts/build-polyglot-guests.sh.
fn example(lang: &Lang) -> PathBuf {
    let path = Path::new(ROOT)
        .join("target/guests")
        .join(format!("{}.wasm", lang.stem));
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-polyglot-guests.sh (it builds {} with {})",
        path.display(),
        lang.example,
        lang.sdk
    );
    path
}

fn outrun_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outrun"))
        .current_dir(dir)
        .args(args)
        .env_remove("OUTRUN_CONFIG")
        .env_remove("OUTRUN_DATABASE_URL")
        .env_remove("RUST_LOG")
        .env("OUTRUN_CACHE_DIR", CACHE)
        .output()
        .expect("run outrun")
}

/// `outrun new` writes the example and SDK byte for byte, the built example
/// passes `handlers check`, and the project's own unit test (which runs the
/// component through `outrun handlers run`) passes.
fn new_project_tests_green(lang: &Lang) {
    let wasm = example(lang);
    let tmp = tempfile::tempdir().unwrap();
    let created = ok(&outrun_in(
        tmp.path(),
        &["new", "order-welcome", "--lang", lang.flag],
    ));
    assert!(
        created.contains("[[handler]]\nname = \"order-welcome\""),
        "{created}"
    );
    assert!(
        created.contains("-o target/order_welcome.wasm"),
        "{created}"
    );
    let project = tmp.path().join("order-welcome");
    for (mine, theirs) in lang.same {
        assert_eq!(
            std::fs::read_to_string(project.join(mine)).unwrap(),
            std::fs::read_to_string(Path::new(ROOT).join(theirs)).unwrap(),
            "{mine} of the new project differs from {theirs}"
        );
    }
    let config: toml::Table = std::fs::read_to_string(project.join("outrun.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let build = config["handler"][0]["build"].as_str().unwrap();
    assert!(build.contains("componentize-"), "{build}");

    // The component the project's build command makes is the example's.
    std::fs::create_dir_all(project.join("target")).unwrap();
    std::fs::copy(&wasm, project.join("target/order_welcome.wasm")).unwrap();
    let check = ok(&outrun_in(
        &project,
        &["handlers", "check", "target/order_welcome.wasm"],
    ));
    assert!(check.contains("imports outrun:handler/sql"), "{check}");

    let out = Command::new(lang.unit_test[0])
        .args(&lang.unit_test[1..])
        .current_dir(&project)
        .env("OUTRUN", env!("CARGO_BIN_EXE_outrun"))
        .env("OUTRUN_CACHE_DIR", CACHE)
        .env_remove("OUTRUN_CONFIG")
        .env_remove("OUTRUN_DATABASE_URL")
        .output()
        .unwrap();
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the project's unit test failed:\n{all}"
    );
    match lang.flag {
        "python" => assert!(all.contains("Ran 4 tests") && all.contains("OK"), "{all}"),
        _ => assert!(
            all.contains("# pass 3") && all.contains("# fail 0"),
            "{all}"
        ),
    }
}

#[test]
fn python_new_project_is_the_example_and_its_tests_pass() {
    new_project_tests_green(&PYTHON);
}

#[test]
fn js_new_project_is_the_example_and_its_tests_pass() {
    new_project_tests_green(&JS);
}

/// A stand-in customer service on 127.0.0.1: one customer for every request.
fn customer_service() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = r#"{"email":"grace@example.com","vip":true}"#;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

const SCHEMA: &str = "CREATE TABLE order_tiers (order_id BIGINT PRIMARY KEY, tier TEXT NOT NULL)";

/// `handlers run` with real capabilities: the database, the local HTTP
/// server, the embedded kv store; the report lists each call.
fn run_reports_every_capability(lang: &Lang, db: &TestDb, port: u16) {
    let wasm = example(lang);
    let base = format!("customers_url=http://127.0.0.1:{port}");
    let host = format!("127.0.0.1:{port}");
    let out = common::outrun_command(db)
        .env("OUTRUN_CACHE_DIR", CACHE)
        .env_remove("RUST_LOG")
        .args(["handlers", "run"])
        .arg(&wasm)
        .args(["--event", "order.created", "--json"])
        .args([
            "--payload",
            r#"{"order_id":5,"customer_id":9,"amount_cents":100}"#,
        ])
        .args(["--allow-http", &host, "--config-value", &base])
        .output()
        .unwrap();
    let r: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(r["outcome"]["status"], "done", "{r}");
    assert_eq!(r["http"][0]["status"], 200, "{r}");
    assert_eq!(
        r["http"][0]["url"],
        format!("http://127.0.0.1:{port}/customers/9"),
        "{r}"
    );
    assert_eq!(r["sql"][0]["params"], serde_json::json!([5, "gold"]), "{r}");
    assert_eq!(r["sql"][0]["result"]["affected"], 1, "{r}");
    assert_eq!(r["kv"][0]["op"], "get", "{r}");
    assert_eq!(r["kv"][1]["op"], "set", "{r}");
    assert_eq!(r["emitted"][0]["name"], "customer.welcomed", "{r}");
    assert_eq!(r["emitted"][0]["group_id"], "customer:9", "{r}");
    let welcomed: Value =
        serde_json::from_str(r["emitted"][0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        welcomed,
        serde_json::json!({"order_id": 5, "email": "grace@example.com", "tier": "gold"})
    );
    assert!(
        r["logs"][0]["message"]
            .as_str()
            .unwrap()
            .contains("order 5 is gold (order #1)"),
        "{r}"
    );
    assert_eq!(r["committed"], false, "{r}");
}

/// `outrun serve` on its own log file, started with a patience that covers
/// compiling a 15-19 MB component in a debug build.
struct Serve {
    child: std::process::Child,
    log: PathBuf,
}

impl Serve {
    async fn ready(db: &TestDb, config: &Path) -> Serve {
        let log = config.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_outrun"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--database", db.url()])
            .envs(FAST_ENV)
            .env_remove("RUST_LOG")
            .env_remove("OUTRUN_DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let serve = Serve { child, log };
        common::eventually("serve to start", Duration::from_secs(300), || async {
            serve.log().contains("dispatch loop started").then_some(())
        })
        .await;
        serve
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve` drains orders with the example: rows written, follow-ups
/// emitted, the kv counter bumped; a broken order fails retryably with the
/// language's error in last_error.
async fn serve_drains(lang: &Lang, db: TestDb) {
    ok(&common::outrun(&db, &["migrate"]));
    db.exec(SCHEMA).await;
    let port = customer_service();
    run_reports_every_capability(lang, &db, port);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM order_tiers").await,
        0,
        "handlers run rolled back"
    );

    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[handler]]
name = "orders"
events = ["order.created"]
module = {module:?}
timeout = "30s"

[handler.allow]
sql = true
kv = "orders:"
http = ["127.0.0.1:{port}"]
emit = ["customer.welcomed"]
config = {{ customers_url = "http://127.0.0.1:{port}" }}
"#,
            module = example(lang).to_str().unwrap()
        ),
    )
    .unwrap();
    let serve = Serve::ready(&db, &config).await;
    for order in [1, 2] {
        let payload = format!(r#"{{"order_id":{order},"customer_id":7,"amount_cents":500}}"#);
        ok(&common::outrun(
            &db,
            &["enqueue", "order.created", "--payload", &payload],
        ));
    }
    ok(&common::outrun(
        &db,
        &[
            "enqueue",
            "order.created",
            "--payload",
            r#"{"order_id":3,"amount_cents":500}"#,
            "--max-retry",
            "3",
        ],
    ));
    common::eventually("both orders tiered", Duration::from_secs(120), || async {
        (db.scalar("SELECT COUNT(*) FROM order_tiers").await == 2).then_some(())
    })
    .await;
    // vip: true from the customer service makes both gold.
    assert_eq!(
        db.strings("SELECT tier FROM order_tiers ORDER BY order_id")
            .await,
        ["gold", "gold"]
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM outbox_events WHERE name = 'customer.welcomed'")
            .await,
        2,
        "one follow-up per order"
    );
    // The kv counter went 1 then 2 (the log lines carry it).
    common::eventually(
        "the counter in the log",
        Duration::from_secs(30),
        || async { serve.log().contains("(order #2)").then_some(()) },
    )
    .await;

    let last_error = common::eventually(
        "the broken order to fail",
        Duration::from_secs(120),
        || async {
            db.strings(
                "SELECT last_error FROM outbox_events WHERE name = 'order.created' AND retry >= 1 AND last_error IS NOT NULL",
            )
            .await
            .into_iter()
            .next()
        },
    )
    .await;
    assert!(
        last_error.contains(lang.broken_says),
        "last_error: {last_error}\nlog:\n{}",
        serve.log()
    );
    // Retryable: it runs again until its 3 attempts are spent, then is dead.
    common::eventually(
        "the broken order to be dead",
        Duration::from_secs(120),
        || async {
            (db.scalar(
                "SELECT COUNT(*) FROM outbox_events WHERE name = 'order.created' AND retry = 3",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    assert!(!serve.log().contains("trap"), "{}", serve.log());
}

async fn python_serve_drains(db: TestDb) {
    serve_drains(&PYTHON, db).await;
}

async fn js_serve_drains(db: TestDb) {
    serve_drains(&JS, db).await;
}

on_both_backends!(python_serve_drains, js_serve_drains);

/// The directory of the pinned toolchains (installed when missing).
fn toolchain_bin() -> String {
    let out = Command::new(Path::new(ROOT).join("scripts/install-guest-toolchains.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install-guest-toolchains.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A host test suite of an SDK; its output when it passed.
fn sdk_suite(program: &str, args: &[&str]) -> String {
    let path = format!(
        "{}:{}",
        toolchain_bin(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .env("PATH", path)
        .output()
        .unwrap();
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{all}");
    all
}

/// The Python SDK against the real generated bindings (values, errors,
/// emit options, tracebacks), on the host.
#[test]
fn python_sdk_host_tests_pass() {
    let all = sdk_suite(
        "python3",
        &[
            "-m",
            "unittest",
            "discover",
            "-s",
            "handlers/sdk-python/tests",
        ],
    );
    assert!(
        all.contains("Ran 12 tests") && all.contains("\nOK"),
        "{all}"
    );
}

/// The JS SDK with recorders for the component's imports (values, BigInt,
/// errors, emit options), on the host with node.
#[test]
fn js_sdk_host_tests_pass() {
    let all = sdk_suite(
        "node",
        &[
            "--import",
            "./handlers/sdk-js/test/register.mjs",
            "--test",
            "handlers/sdk-js/test/sdk.test.mjs",
        ],
    );
    assert!(
        all.contains("# pass 10") && all.contains("# fail 0"),
        "{all}"
    );
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
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the hot-reload test edits in a language's new project.
struct Edit {
    /// The file with the tier logic.
    file: &'static str,
    /// (what, replacement): VIP customers become "platinum".
    from: &'static str,
    to: &'static str,
    /// Appended to `file`: a syntax error.
    broken: &'static str,
    /// What the toolchain's error says about it.
    error_says: &'static str,
}

async fn tier_of(db: &TestDb, order: i64) -> Option<String> {
    db.strings(&format!(
        "SELECT tier FROM order_tiers WHERE order_id = {order}"
    ))
    .await
    .into_iter()
    .next()
}

/// `outrun new --lang L` → `outrun dev` builds it with the language's
/// toolchain and serves it; an edit is rebuilt and hot-reloaded; a broken
/// edit prints the toolchain's error and the last good version serves on.
async fn dev_hot_reloads(lang: &Lang, edit: &Edit) {
    let tmp = tempfile::tempdir().unwrap();
    ok(&outrun_in(
        tmp.path(),
        &["new", "order-welcome", "--lang", lang.flag],
    ));
    let project = tmp.path().join("order-welcome");
    let db = TestDb::sqlite();
    ok(&common::outrun(&db, &["migrate"]));
    db.exec(SCHEMA).await;
    let port = customer_service();
    let config = std::fs::read_to_string(project.join("outrun.toml")).unwrap();
    let patched = config
        .replace("sqlite://app.db?mode=rwc", db.url())
        .replace(
            "\"http://customers.local\"",
            &format!("\"http://127.0.0.1:{port}\""),
        )
        .replace("[\"customers.local\"]", &format!("[\"127.0.0.1:{port}\"]"));
    assert_ne!(config, patched, "the template's outrun.toml changed shape");
    std::fs::write(project.join("outrun.toml"), patched).unwrap();

    let path = format!(
        "{}:{}",
        toolchain_bin(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (out, err) = (tmp.path().join("dev.out"), tmp.path().join("dev.err"));
    let child = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .current_dir(&project)
        .args(["dev", "--config", "outrun.toml"])
        .envs(FAST_ENV)
        .env("PATH", path)
        .env_remove("OUTRUN_DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let dev = Dev { child, out, err };
    dev.wait_for_line("dev: built order-welcome", Duration::from_secs(300))
        .await;
    common::eventually("dev to serve", Duration::from_secs(300), || async {
        dev.stderr().contains("dispatch loop started").then_some(())
    })
    .await;

    let enqueue = |order: i64| {
        let payload = format!(r#"{{"order_id":{order},"customer_id":7,"amount_cents":500}}"#);
        ok(&common::outrun(
            &db,
            &["enqueue", "order.created", "--payload", &payload],
        ));
    };
    enqueue(1);
    let first = common::eventually("order 1 handled", Duration::from_secs(120), || {
        tier_of(&db, 1)
    })
    .await;
    assert_eq!(first, "gold", "the customer service says vip");
    dev.wait_for_line("-> order-welcome attempt 1 done", Duration::from_secs(10))
        .await;

    // An edit is rebuilt with the toolchain and hot-reloaded.
    let file = project.join(edit.file);
    let source = std::fs::read_to_string(&file).unwrap();
    assert!(source.contains(edit.from), "{} changed shape", edit.file);
    std::fs::write(&file, source.replace(edit.from, edit.to)).unwrap();
    dev.wait_for_line("dev: reloaded order-welcome", Duration::from_secs(300))
        .await;
    enqueue(2);
    let second = common::eventually("order 2 handled", Duration::from_secs(120), || {
        tier_of(&db, 2)
    })
    .await;
    assert_eq!(second, "platinum", "the edited version serves");

    // A broken edit: the toolchain's error is shown, the old version serves.
    let edited = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{edited}{}", edit.broken)).unwrap();
    dev.wait_for_line(
        "dev: build of order-welcome failed",
        Duration::from_secs(300),
    )
    .await;
    let stdout = dev.stdout();
    assert!(stdout.contains("keeps serving"), "{stdout}");
    assert!(
        stdout.contains(edit.error_says),
        "the toolchain's error is shown: {stdout}"
    );
    enqueue(3);
    let third = common::eventually("order 3 handled", Duration::from_secs(120), || {
        tier_of(&db, 3)
    })
    .await;
    assert_eq!(third, "platinum", "the last good version keeps serving");
    // Build outputs (target/, __pycache__) did not trigger builds of their
    // own: one start-up build, the edit, the broken edit.
    let stdout = dev.stdout();
    assert_eq!(
        stdout.matches("changed; building").count(),
        2,
        "rebuilt in a loop: {stdout}"
    );

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_dev_hot_reloads_an_edit_and_survives_a_broken_one() {
    dev_hot_reloads(
        &PYTHON,
        &Edit {
            file: "app.py",
            from: r#"return "gold" if vip"#,
            to: r#"return "platinum" if vip"#,
            broken: "\ndef broken(:\n",
            error_says: "SyntaxError: invalid syntax (app.py, line",
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_dev_hot_reloads_an_edit_and_survives_a_broken_one() {
    dev_hot_reloads(
        &JS,
        &Edit {
            file: "logic.js",
            from: "? 'gold'",
            to: "? 'platinum'",
            broken: "\nfunction broken( {\n",
            error_says: "SyntaxError",
        },
    )
    .await;
}
