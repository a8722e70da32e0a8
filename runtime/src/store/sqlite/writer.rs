//! The one writer of an SQLite outbox: a rusqlite connection that runs the
//! runtime's own writes (claims, lease extensions, acks, failures, expiry,
//! cleanup) and every effects transaction (lanes and [`WriterTx`]), called
//! directly from the task that needs it.
//!
//! Why not sqlx here: sqlx-sqlite runs each connection on a thread of its
//! own and hands every statement, and every result row, across with a
//! message and a wake-up. That hand-off cost more than SQLite's own work: a
//! handler that wrote one row paid two of them (its savepoint and its
//! INSERT) while holding the one connection every other event waits for. A
//! statement here is a function call on a cached prepared statement.
//!
//! Why in the calling task: SQLite has one writer, so the work needs the
//! write lock anyway, and it is short. An async mutex orders the callers
//! fairly, and a lane holds it across its handler's statements (its
//! transaction is open in between). The cost: a writer call blocks its tokio
//! worker thread while SQLite runs, including a busy wait behind another
//! process's write transaction (an application's), bounded by the busy
//! timeout. The mutex keeps that to one worker thread at a time.
//!
//! The application's own connections (sqlx, through [`super::SqliteStore`]'s
//! pool or its own) still write to the same file; WAL mode and the busy
//! timeout order them with this one.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, OpenFlags, ToSql};
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use crate::event::NewEvent;
use crate::store::{Result, SqlRows, SqlValue, StoreError};

/// The writer, shared by the store's clones.
#[derive(Clone)]
pub struct Writer(Arc<Mutex<WriterConn>>);

/// Exclusive use of the writer connection.
pub type WriterGuard = OwnedMutexGuard<WriterConn>;

/// The writer connection, and the handler statements it has checked.
pub struct WriterConn {
    conn: Connection,
    /// Statement texts known to hold a single statement; see [`prepare`].
    single: RefCell<HashSet<String>>,
}

impl Deref for WriterConn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// Distinct handler statements remembered as checked; past this the set
/// starts over (a handler that formats values into its SQL makes a new
/// text per call).
const CHECKED_STATEMENTS: usize = 1024;

/// Prepared statements kept per connection: the runtime's own (a dozen) and
/// the handlers' most recent.
const STATEMENT_CACHE: usize = 128;

impl Writer {
    /// Open the writer on an existing database file (the store's pool
    /// created it), with the settings the pool's connections have.
    pub fn open(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(busy_timeout)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // No checkpoint inline on the claim/ack path (copying the WAL into
        // the database and syncing it stalled everything waiting for the
        // writer); the dispatcher checkpoints in the background instead.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // Each event in a lane has a savepoint, whose journal of changed
        // pages would otherwise go to a temporary file: a write per page.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // As sqlx's connections (and so the application's) have it.
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // The concurrency key of a payload, for `[[limit]]` claims (see
        // `limits.rs`): NULL when the pointer does not resolve.
        conn.create_scalar_function(
            "outrun_json_pointer",
            2,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8
                | rusqlite::functions::FunctionFlags::SQLITE_DETERMINISTIC,
            |ctx| {
                let payload = ctx.get_raw(0).as_str().unwrap_or("");
                let pointer = ctx.get_raw(1).as_str().unwrap_or("");
                Ok(serde_json::from_str::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.pointer(pointer).and_then(crate::limits::json_key)))
            },
        )?;
        Ok(Self(Arc::new(Mutex::new(WriterConn {
            conn,
            single: RefCell::new(HashSet::new()),
        }))))
    }

    /// Wait for the writer (callers are served in order).
    pub async fn lock(&self) -> WriterGuard {
        self.0.clone().lock_owned().await
    }

    /// Run `f` on the writer on a blocking thread: for work that may take
    /// milliseconds (a claim of hundreds of rows, a batch of acks). Blocking
    /// a tokio worker thread that long held up the handlers queued on it:
    /// with two worker threads the no-op drain ran at half speed.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let conn = self.lock().await;
        match tokio::task::spawn_blocking(move || f(&conn)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// [`Writer::run`] inside `BEGIN IMMEDIATE` ... `COMMIT`; rolled back
    /// if `f` fails.
    pub async fn run_tx<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.run(move |conn| {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            let r = f(conn).and_then(|v| {
                conn.execute_batch("COMMIT")?;
                Ok(v)
            });
            if r.is_err() {
                rollback(conn);
            }
            r
        })
        .await
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

/// A `BEGIN IMMEDIATE` transaction on the writer; rolled back if dropped
/// open. What [`crate::store::AckTx::Sqlite`] holds.
pub struct WriterTx {
    conn: Option<WriterGuard>,
}

impl WriterTx {
    pub async fn begin(writer: &Writer) -> Result<Self> {
        let conn = writer.lock().await;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Self { conn: Some(conn) })
    }

    pub fn conn(&self) -> &WriterConn {
        self.conn.as_ref().expect("open until commit or rollback")
    }

    pub fn commit(mut self) -> Result<()> {
        let conn = self.conn.take().expect("open until commit or rollback");
        if let Err(e) = conn.execute_batch("COMMIT") {
            rollback(&conn);
            return Err(e.into());
        }
        Ok(())
    }

    pub fn rollback(mut self) -> Result<()> {
        let conn = self.conn.take().expect("open until commit or rollback");
        if conn.is_autocommit() {
            return Ok(());
        }
        Ok(conn.execute_batch("ROLLBACK")?)
    }
}

impl Drop for WriterTx {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            rollback(conn);
        }
    }
}

/// Leave no transaction open on the writer (after an error, or when its
/// holder went away): everything else waits for this connection.
pub fn rollback(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %e, "rolling back the SQLite writer's transaction failed");
    }
}

impl ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            SqlValue::Null => ToSqlOutput::Owned(Value::Null),
            SqlValue::Bool(b) => ToSqlOutput::Owned(Value::Integer(i64::from(*b))),
            SqlValue::Int(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            SqlValue::Float(f) => ToSqlOutput::Owned(Value::Real(*f)),
            SqlValue::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            SqlValue::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

/// Bind `params` to a prepared statement: `?NNN` and `$NNN` take value NNN,
/// plain `?` the next one; a placeholder with no value is NULL (as SQLite
/// itself and sqlx do). Other names (`:name`, `@name`, `$name`) have no
/// value to take and are an error naming them.
fn bind(stmt: &mut rusqlite::Statement<'_>, params: &[SqlValue]) -> Result<()> {
    let mut next = 0usize;
    for i in 1..=stmt.parameter_count() {
        let n = match stmt.parameter_name(i) {
            None => {
                next += 1;
                next
            }
            Some(name) => match name
                .strip_prefix('?')
                .or_else(|| name.strip_prefix('$'))
                .and_then(|digits| digits.parse::<usize>().ok())
            {
                Some(n) => n,
                None => {
                    return Err(StoreError::Param {
                        index: i,
                        reason: format!(
                            "placeholder {name} has no value: use $1, $2, ... (or ?1, ?) and pass the values in order"
                        ),
                    });
                }
            },
        };
        match params.get(n.wrapping_sub(1)) {
            Some(v) => stmt.raw_bind_parameter(i, v)?,
            None => stmt.raw_bind_parameter(i, Value::Null)?,
        }
    }
    Ok(())
}

/// Prepare (or take from the cache) a handler's statement. rusqlite
/// compiles the first statement of a text and ignores the rest, so a text
/// with two statements would run only the first: such a text is refused
/// instead. Checked once per distinct text.
fn prepare<'c>(conn: &'c WriterConn, statement: &str) -> Result<rusqlite::CachedStatement<'c>> {
    let stmt = conn.prepare_cached(statement)?;
    if !conn.single.borrow().contains(statement) {
        if let Some(rest) = trailing_statement(conn, statement) {
            return Err(StoreError::Param {
                index: 0,
                reason: format!(
                    "the text holds more than one statement (the next one starts at {rest:?}); send one statement per call"
                ),
            });
        }
        let mut single = conn.single.borrow_mut();
        if single.len() >= CHECKED_STATEMENTS {
            single.clear();
        }
        single.insert(statement.to_owned());
    }
    Ok(stmt)
}

/// The text after the first statement of `sql`, if it holds another
/// statement (not just whitespace, semicolons or comments). `sql` has
/// already compiled, so its first statement is valid.
fn trailing_statement(conn: &Connection, sql: &str) -> Option<String> {
    let mut rest = sql;
    // Each pass compiles one statement and moves past it; a pass that
    // compiles nothing (only comments or whitespace left) ends the text.
    for pass in 0.. {
        let (compiled, used) = compile_one(conn, rest)?;
        if pass > 0 && compiled {
            return Some(rest.chars().take(40).collect());
        }
        if used == 0 || used >= rest.len() {
            return None;
        }
        rest = &rest[used..];
    }
    None
}

/// Compile the first statement of `sql` and throw it away: whether there
/// was one, and how many bytes it used. `None` if it does not compile.
fn compile_one(conn: &Connection, sql: &str) -> Option<(bool, usize)> {
    let len = std::os::raw::c_int::try_from(sql.len()).ok()?;
    let mut stmt = std::ptr::null_mut();
    let mut tail = std::ptr::null();
    // SAFETY: the handle is the live connection `conn` borrows (no other
    // thread uses it: the writer's mutex is held); `sql` outlives the
    // call and its length is passed, so SQLite reads no further; the
    // statement is finalized before returning, and `tail` points into
    // `sql` (or is null).
    unsafe {
        let rc = rusqlite::ffi::sqlite3_prepare_v2(
            conn.handle(),
            sql.as_ptr().cast(),
            len,
            &mut stmt,
            &mut tail,
        );
        let compiled = !stmt.is_null();
        rusqlite::ffi::sqlite3_finalize(stmt);
        if rc != rusqlite::ffi::SQLITE_OK {
            return None;
        }
        let used = if tail.is_null() {
            sql.len()
        } else {
            usize::try_from(tail.cast::<u8>().offset_from(sql.as_ptr())).ok()?
        };
        Some((compiled, used))
    }
}

/// Run a statement for the `sql` capability and return its rows. Values
/// come back by their storage class (INTEGER, REAL, TEXT, BLOB, NULL): a
/// BOOLEAN column reads as an int. See [`super::query`] for how kinds bind.
pub fn query(conn: &WriterConn, statement: &str, params: &[SqlValue]) -> Result<SqlRows> {
    let mut stmt = prepare(conn, statement)?;
    bind(&mut stmt, params)?;
    let columns: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns.len());
        for (i, column) in columns.iter().enumerate() {
            values.push(match row.get_ref(i)? {
                ValueRef::Null => SqlValue::Null,
                ValueRef::Integer(v) => SqlValue::Int(v),
                ValueRef::Real(v) => SqlValue::Float(v),
                ValueRef::Text(t) => match std::str::from_utf8(t) {
                    Ok(s) => SqlValue::Text(s.to_owned()),
                    Err(_) => {
                        return Err(StoreError::UnsupportedColumn {
                            column: column.clone(),
                            type_name: "TEXT that is not UTF-8".into(),
                        });
                    }
                },
                ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
            });
        }
        out.push(values);
    }
    Ok(SqlRows { columns, rows: out })
}

/// Run a statement for the `sql` capability; rows it inserted, updated or
/// deleted (0 for a statement that changes nothing, such as a SELECT; rows
/// it returns are read and dropped).
pub fn execute(conn: &WriterConn, statement: &str, params: &[SqlValue]) -> Result<u64> {
    let mut stmt = prepare(conn, statement)?;
    bind(&mut stmt, params)?;
    let readonly = stmt.readonly();
    let mut rows = stmt.raw_query();
    while rows.next()?.is_some() {}
    Ok(if readonly { 0 } else { conn.changes() })
}

/// The values of an event's row that are not the event's own fields.
struct Row {
    id: Uuid,
    id_text: String,
    now: i64,
    max_retry: i64,
    available_at: i64,
    expires_at: Option<i64>,
}

impl Row {
    fn new(event: &NewEvent, default_max_retry: i32) -> Result<Self> {
        let now = super::now_ms();
        let max_retry = crate::store::effective_max_retry(event, default_max_retry)?;
        let id = Uuid::now_v7();
        Ok(Self {
            id,
            id_text: id.to_string(),
            now,
            max_retry: i64::from(max_retry),
            available_at: now.saturating_add(event.delay.map_or(0, super::duration_ms)),
            expires_at: event
                .expires_in
                .map(|ttl| now.saturating_add(super::duration_ms(ttl))),
        })
    }

    /// `?1`..`?10` of [`super::ENQUEUE_TRACED`]; [`super::ENQUEUE`] takes
    /// the first 9, [`super::INSERT`] the first 8 (and
    /// [`super::INSERT_TRACED`] all, `?9` unused).
    fn params<'a>(&'a self, event: &'a NewEvent) -> [&'a dyn ToSql; 10] {
        [
            &self.id_text,
            &self.now,
            &event.name,
            &event.payload,
            &event.group_id,
            &self.max_retry,
            &self.available_at,
            &self.expires_at,
            &event.idempotency_key,
            &event.traceparent,
        ]
    }
}

/// Insert a handler's follow-up event, already validated (at its `emit`),
/// whose id nobody reads, in the writer's open transaction. Without an
/// idempotency key nothing can conflict: a plain INSERT, with neither the
/// conflict clause nor RETURNING, and no second parse of the payload while
/// every other event waits for the writer.
pub fn insert_follow_up(conn: &Connection, event: &NewEvent, default_max_retry: i32) -> Result<()> {
    if event.idempotency_key.is_some() {
        return enqueue(conn, event, default_max_retry).map(drop);
    }
    let row = Row::new(event, default_max_retry)?;
    let params = row.params(event);
    // The traceparent column only when the event has one (see ENQUEUE).
    match &event.traceparent {
        Some(_) => conn.prepare_cached(super::INSERT_TRACED)?.execute(params)?,
        None => conn.prepare_cached(super::INSERT)?.execute(&params[..8])?,
    };
    Ok(())
}

/// Insert a follow-up event in the writer's open transaction. Same key as a
/// live event: that event's id, nothing inserted.
pub fn enqueue(conn: &Connection, event: &NewEvent, default_max_retry: i32) -> Result<Uuid> {
    event.validate()?;
    // A key can vanish between the conflicting INSERT and the SELECT (its
    // event was acknowledged meanwhile); the next INSERT then succeeds.
    for _ in 0..3 {
        let row = Row::new(event, default_max_retry)?;
        let params = row.params(event);
        // The traceparent column only when the event has one (see ENQUEUE).
        let inserted = match &event.traceparent {
            Some(_) => conn
                .prepare_cached(super::ENQUEUE_TRACED)?
                .query(params)?
                .next()?
                .is_some(),
            None => conn
                .prepare_cached(super::ENQUEUE)?
                .query(&params[..9])?
                .next()?
                .is_some(),
        };
        if inserted {
            return Ok(row.id);
        }
        let mut holder = conn.prepare_cached(super::KEY_HOLDER)?;
        let existing: Option<String> = holder
            .query([event.idempotency_key.as_deref()])?
            .next()?
            .map(|r| r.get(0))
            .transpose()?;
        if let Some(existing) = existing {
            return super::parse_id(&existing);
        }
    }
    Err(super::key_kept_conflicting(event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use SqlValue::{Int, Null, Text};

    fn writer() -> (tempfile::TempDir, WriterConn) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        Connection::open(&path).unwrap();
        let w = Writer::open(&path, Duration::from_millis(50)).unwrap();
        let conn = Arc::try_unwrap(w.0).ok().unwrap().into_inner();
        conn.execute_batch("CREATE TABLE t (a, b)").unwrap();
        (dir, conn)
    }

    fn all(conn: &WriterConn) -> Vec<Vec<SqlValue>> {
        query(conn, "SELECT a, b FROM t ORDER BY rowid", &[])
            .unwrap()
            .rows
    }

    #[test]
    fn numbered_placeholders_take_their_value_and_missing_ones_are_null() {
        let (_dir, conn) = writer();
        let n = execute(&conn, "INSERT INTO t VALUES ($2, $1)", &[Int(1), Int(2)]).unwrap();
        assert_eq!(n, 1);
        execute(&conn, "INSERT INTO t VALUES (?2, ?1)", &[Int(3), Int(4)]).unwrap();
        execute(&conn, "INSERT INTO t VALUES (?, ?)", &[Int(5), Int(6)]).unwrap();
        execute(&conn, "INSERT INTO t VALUES ($1, $2)", &[text("x")]).unwrap();
        assert_eq!(
            all(&conn),
            [
                vec![Int(2), Int(1)],
                vec![Int(4), Int(3)],
                vec![Int(5), Int(6)],
                vec![text("x"), Null],
            ]
        );
    }

    #[test]
    fn named_placeholders_are_refused_by_name() {
        let (_dir, conn) = writer();
        let e = execute(&conn, "INSERT INTO t VALUES (:a, 1)", &[Int(1)]).unwrap_err();
        assert!(
            matches!(&e, StoreError::Param { index: 1, reason } if reason.contains(":a")),
            "{e}"
        );
        assert!(all(&conn).is_empty());
    }

    #[test]
    fn execute_counts_changed_rows_not_selected_ones() {
        let (_dir, conn) = writer();
        execute(&conn, "INSERT INTO t VALUES (1, 1), (2, 2)", &[]).unwrap();
        assert_eq!(execute(&conn, "SELECT * FROM t", &[]).unwrap(), 0);
        assert_eq!(
            execute(&conn, "UPDATE t SET b = b + 1 RETURNING a", &[]).unwrap(),
            2
        );
        assert_eq!(
            execute(&conn, "DELETE FROM t WHERE a = $1", &[Int(1)]).unwrap(),
            1
        );
    }

    #[test]
    fn statement_errors_carry_sqlites_result_code() {
        let (_dir, conn) = writer();
        let e = execute(&conn, "INSERT INTO nowhere VALUES (1)", &[]).unwrap_err();
        assert_eq!(e.sqlstate().as_deref(), Some("1"), "{e}");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("no such table: nowhere"), "{e}");
        // Several statements in one string: refused, nothing run.
        let e = execute(
            &conn,
            "INSERT INTO t VALUES (1, 1); INSERT INTO t VALUES (2, 2)",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("more than one statement"), "{e}");
        assert!(all(&conn).is_empty());
        // A trailing semicolon, whitespace or comment is one statement.
        for one in [
            "INSERT INTO t VALUES (1, 1);",
            "INSERT INTO t VALUES (2, 2) ;  \n",
            "INSERT INTO t VALUES (3, 3); -- done",
            "INSERT INTO t VALUES (4, 4); /* done */ ;",
        ] {
            assert_eq!(execute(&conn, one, &[]).unwrap(), 1, "{one}");
        }
    }

    #[test]
    fn text_that_is_not_utf8_names_its_column() {
        let (_dir, conn) = writer();
        conn.execute_batch("INSERT INTO t VALUES (CAST(x'ff' AS TEXT), 1)")
            .unwrap();
        let e = query(&conn, "SELECT a AS bad FROM t", &[]).unwrap_err();
        assert!(
            matches!(&e, StoreError::UnsupportedColumn { column, .. } if column == "bad"),
            "{e}"
        );
    }

    #[test]
    fn a_busy_database_is_transient() {
        let (dir, conn) = writer();
        let other = Connection::open(dir.path().join("w.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let e = execute(&conn, "INSERT INTO t VALUES (1, 1)", &[]).unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert_eq!(e.code_label().as_deref(), Some("SQLite result code 5"));
    }

    fn text(s: &str) -> SqlValue {
        Text(s.into())
    }
}
