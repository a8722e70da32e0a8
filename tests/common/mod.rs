//! Shared helpers of the end-to-end tests: a fresh database per test on
//! either backend, and a macro that runs one test body against both.
//!
//! PostgreSQL tests read `OUTRUN_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), create a database
//! `outrun_t_<uuid>` on that server and drop it when the [`TestDb`] is
//! dropped. An unreachable server fails the test; it is never skipped.
#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::time::Duration;

use outrun::Store;
use outrun::store::ConnectOptions;
use sqlx::Connection;

pub const POSTGRES_ENV: &str = "OUTRUN_TEST_POSTGRES_URL";
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const REDIS_ENV: &str = "OUTRUN_TEST_REDIS_URL";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The server URL PostgreSQL tests use (databases are created on it).
pub fn postgres_admin_url() -> String {
    std::env::var(POSTGRES_ENV).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string())
}

pub fn redis_url() -> String {
    std::env::var(REDIS_ENV).unwrap_or_else(|_| DEFAULT_REDIS_URL.to_string())
}

/// A fresh key prefix for one test on the shared Redis; the test deletes its
/// keys when done.
pub fn redis_prefix() -> String {
    format!("outrun_t_{}:", uuid::Uuid::new_v4().simple())
}

/// A guest component built by `scripts/build-guests.sh`, e.g. `guest("probe")`
/// for `target/guests/probe.wasm`.
pub fn guest(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guests")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-guests.sh",
        path.display()
    );
    path
}

/// A database that exists for one test.
pub enum TestDb {
    Sqlite {
        dir: tempfile::TempDir,
        url: String,
    },
    Postgres {
        admin_url: String,
        name: String,
        url: String,
    },
}

/// The real `outrun` binary against `db` (through `OUTRUN_DATABASE_URL`),
/// with no config file from the environment; add arguments and run it.
pub fn outrun_command(db: &TestDb) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_outrun"));
    c.env("OUTRUN_DATABASE_URL", db.url())
        .env_remove("OUTRUN_CONFIG");
    c
}

/// Run `outrun ARGS` against `db` to completion.
pub fn outrun(db: &TestDb, args: &[&str]) -> std::process::Output {
    outrun_command(db).args(args).output().expect("run outrun")
}

/// A success; returns stdout.
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "outrun failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// A failure: a non-zero exit code (1 for errors, 2 for usage errors) and
/// exactly one line on stderr; returns it.
pub fn fails(out: &std::process::Output) -> String {
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "expected exit 1 or 2, got {:?}; stdout: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8(out.stderr.clone()).expect("utf-8 stderr");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected a one-line error, got:\n{err}"
    );
    err
}

/// Open a fresh connection of the test database's backend as `$c`, run
/// `$body` (a `Result`), close the connection, and panic naming the SQL on
/// error. The connection types differ per backend, hence a macro.
macro_rules! on_conn {
    ($db:expr, $sql:expr, $c:ident => $body:expr) => {{
        use sqlx::Connection;
        let result = match $db {
            TestDb::Sqlite { url, .. } => {
                let mut $c = sqlx::SqliteConnection::connect(url)
                    .await
                    .expect("open the SQLite test database");
                let r = $body;
                $c.close().await.ok();
                r
            }
            TestDb::Postgres { url, .. } => {
                let mut $c = sqlx::PgConnection::connect(url)
                    .await
                    .expect("connect to the PostgreSQL test database");
                let r = $body;
                $c.close().await.ok();
                r
            }
        };
        result.unwrap_or_else(|e| panic!("{}: {e}", $sql))
    }};
}

impl TestDb {
    /// A SQLite file in a fresh temporary directory.
    pub fn sqlite() -> TestDb {
        let dir =
            tempfile::tempdir().expect("create a temporary directory for the SQLite test database");
        let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
        TestDb::Sqlite { dir, url }
    }

    /// A new, empty database on the test PostgreSQL server.
    pub async fn postgres() -> TestDb {
        let admin_url = postgres_admin_url();
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach the test PostgreSQL server at {} ({e}); start it or point {POSTGRES_ENV} at one",
                outrun::store::redact_url(&admin_url)
            )
        });
        let name = format!("outrun_t_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| {
                panic!("CREATE DATABASE {name} on {POSTGRES_ENV}'s server failed: {e}")
            });
        admin.close().await.ok();
        let mut url = url::Url::parse(&admin_url)
            .unwrap_or_else(|e| panic!("{POSTGRES_ENV} is not a URL: {e}"));
        url.set_path(&name);
        TestDb::Postgres {
            admin_url,
            name,
            url: url.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        match self {
            TestDb::Sqlite { url, .. } | TestDb::Postgres { url, .. } => url,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, TestDb::Postgres { .. })
    }

    /// A store on this database, connected and migrated.
    pub async fn store(&self) -> Store {
        let store = self.connect().await;
        store.migrate().await.expect("migrate the test database");
        store
    }

    /// A store on this database, connected but not migrated.
    pub async fn connect(&self) -> Store {
        Store::connect(self.url(), &ConnectOptions::default())
            .await
            .unwrap_or_else(|e| panic!("connect to the test database: {e}"))
    }

    /// Run one SQL statement outside the store, as another application would.
    /// Run a multi-statement script (a migration file) on a connection
    /// of its own.
    pub async fn exec_script(&self, sql: &str) {
        use sqlx::Connection;
        match self {
            TestDb::Sqlite { url, .. } => {
                let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
                c.close().await.ok();
            }
            TestDb::Postgres { url, .. } => {
                let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
                c.close().await.ok();
            }
        }
    }

    pub async fn exec(&self, sql: &str) -> u64 {
        on_conn!(self, sql, c => sqlx::query(sql).execute(&mut c).await.map(|r| r.rows_affected()))
    }

    /// Run a query returning one text column, outside the store.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        on_conn!(self, sql, c => sqlx::query_scalar(sql).fetch_all(&mut c).await)
    }

    /// Run a query returning one integer, outside the store.
    pub async fn scalar(&self, sql: &str) -> i64 {
        on_conn!(self, sql, c => sqlx::query_scalar(sql).fetch_one(&mut c).await)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let TestDb::Postgres {
            admin_url, name, ..
        } = self
        else {
            return;
        };
        let (admin_url, name) = (admin_url.clone(), name.clone());
        let dropped = name.clone();
        // Drop may run inside a runtime (where blocking on another is not
        // allowed), so the cleanup gets its own thread and runtime. FORCE
        // ends connections a store of the test may still hold.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {dropped} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await
            })
        });
        if let Ok(Err(e)) = cleanup.join() {
            eprintln!("warning: could not drop test database {name}: {e}");
        }
    }
}

/// Poll `check` until it returns `Some`, or panic after `deadline` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Poll `check` every 25 ms until it is true; panic after 30 s naming `what`.
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(what, Duration::from_secs(30), || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// `outrun serve --config CONFIG --database DB` as a child process, its log
/// in a file next to the config, with fast polls and retries (every knob
/// can still be set in the config file).
pub struct Serve {
    child: std::process::Child,
    log: std::path::PathBuf,
}

/// Knobs that keep end-to-end tests quick: retries within a test's patience,
/// no jitter so a retry is never pushed past a polling deadline. The
/// environment overrides the config file, so a test that needs other values
/// passes them to the command itself.
pub const FAST_ENV: [(&str, &str); 6] = [
    ("OUTRUN_POLL_INTERVAL", "50ms"),
    ("OUTRUN_BACKOFF_BASE", "50ms"),
    ("OUTRUN_BACKOFF_MAX", "200ms"),
    ("OUTRUN_BACKOFF_JITTER", "0"),
    ("OUTRUN_LOG", "info"),
    // One artifact cache for every test's serve: each component compiles
    // once per test run, not once per test (writes are atomic renames).
    (
        "OUTRUN_CACHE_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-artifact-cache"),
    ),
];

impl Serve {
    /// Start serve on `config` and wait until its dispatch loop runs and
    /// every handler has compiled (handlers compile in parallel after the
    /// loop starts; `/readyz` is ready from then on).
    pub async fn ready(db: &TestDb, config: &std::path::Path) -> Serve {
        let log = config.with_extension("log");
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_outrun"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--database", db.url()])
            .envs(FAST_ENV)
            .env_remove("RUST_LOG")
            .env_remove("OUTRUN_DATABASE_URL")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start outrun serve");
        let serve = Serve { child, log };
        let has_handlers = std::fs::read_to_string(config)
            .map(|c| c.contains("[[handler]]"))
            .unwrap_or(false);
        wait_for("outrun serve to start serving", || async {
            let log = serve.log();
            log.contains("dispatch loop started")
                && (!has_handlers || log.contains("every handler compiled"))
        })
        .await;
        serve
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, assert a clean exit 0, return the log.
    pub fn stop(mut self) -> String {
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        let log = self.log();
        assert!(status.success(), "serve exited with {status}; log:\n{log}");
        log
    }
}

impl Serve {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `signal` (`HUP`, `INT`, `QUIT`, ...) without waiting.
    pub fn send(&self, signal: &str) {
        std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// Wait for the exit; its status and the log.
    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        (status, self.log())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run each listed `async fn name(db: TestDb)` as two tests,
/// `sqlite::name` and `postgres::name`, each on its own fresh database.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::TestDb::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::TestDb::postgres().await).await
                }
            )*
        }
    };
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// One HTTP/1.1 request to 127.0.0.1:`port` over a fresh connection;
/// (status, body). 0 when nothing answers.
pub async fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_as(port, method, path, body, None).await
}

/// [`http`] with `Authorization: Bearer <token>` when a token is given.
pub async fn http_as(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new());
    };
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut raw = Vec::new();
    if s.write_all(req.as_bytes()).await.is_err() || s.read_to_end(&mut raw).await.is_err() {
        return (0, String::new());
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // axum sends these bodies with a Content-Length, not chunked.
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
