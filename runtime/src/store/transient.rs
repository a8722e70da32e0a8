//! Which database errors are worth a retry.
//!
//! A transient error says nothing about the statement: the connection went
//! away (a failover, `pg_terminate_backend`, an admin shutdown, a reset),
//! the server is overloaded, or concurrency got in the way (deadlock,
//! serialization failure, lock timeout, `SQLITE_BUSY`/`SQLITE_LOCKED`). The
//! same statement may well succeed on the next attempt, so the event is
//! retried. Everything else (syntax, constraint violations, type errors) is
//! the statement's own fault and is reported as such.

use std::error::Error as _;
use std::fmt;

use sqlx::error::DatabaseError;
use sqlx::postgres::PgDatabaseError;
use sqlx::sqlite::SqliteError;

use super::StoreError;

impl StoreError {
    /// True when a retry of the same work may succeed; see the module docs.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Db(e) | StoreError::Connect { source: e, .. } => is_transient(e),
            StoreError::Sqlite(e) => sqlite_result_code(e).is_some_and(transient_sqlite_result),
            StoreError::Pg(e) => pg_is_transient(e),
            StoreError::PipeConnect(_) | StoreError::FollowUpsToLanes => true,
            StoreError::Poisoned | StoreError::RolledBack | StoreError::Interleaved => true,
            _ => false,
        }
    }

    /// The SQLSTATE (PostgreSQL) or extended result code (SQLite) of a
    /// database error, for logs.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Sqlite(e) => return sqlite_result_code(e).map(|c| c.to_string()),
            StoreError::Pg(e) => return e.code().map(|c| c.code().to_owned()),
            _ => {}
        }
        self.database_error()
            .and_then(|db| db.code().map(|c| c.into_owned()))
    }

    /// [`StoreError::sqlstate`] as a message shows it: `SQLSTATE 40P01` or
    /// `SQLite result code 517`.
    pub fn code_label(&self) -> Option<String> {
        match self {
            StoreError::Sqlite(e) => {
                return sqlite_result_code(e).map(|c| format!("SQLite result code {c}"));
            }
            StoreError::Pg(e) => return e.code().map(|c| format!("SQLSTATE {}", c.code())),
            _ => {}
        }
        let db = self.database_error()?;
        let code = db.code()?;
        Some(if db.try_downcast_ref::<SqliteError>().is_some() {
            format!("SQLite result code {code}")
        } else {
            format!("SQLSTATE {code}")
        })
    }

    fn database_error(&self) -> Option<&(dyn DatabaseError + 'static)> {
        match self {
            StoreError::Db(sqlx::Error::Database(db))
            | StoreError::Connect {
                source: sqlx::Error::Database(db),
                ..
            } => Some(&**db),
            _ => None,
        }
    }
}

/// See the module docs.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        // A closed or reset connection surfaces as an I/O error (sqlx reports
        // EOF mid-message as `UnexpectedEof`).
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            // The two backends' codes overlap as strings ("40001" is a
            // SQLSTATE, and would parse as a SQLite number), so ask which
            // backend spoke.
            match db.try_downcast_ref::<PgDatabaseError>() {
                Some(pg) => transient_sqlstate(pg.code()),
                None => is_sqlite_busy(e),
            }
        }
        // Protocol errors are sqlx's own complaints, mostly about the
        // statement (SQLite's "unsupported SQL parameter format", too many
        // arguments); retrying would repeat them.
        _ => false,
    }
}

/// SQLite's `SQLITE_BUSY` or `SQLITE_LOCKED` (any extended code): another
/// connection holds a lock this one needs.
pub(super) fn is_sqlite_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<SqliteError>()
            .and_then(|lite| lite.code())
            .is_some_and(|c| transient_sqlite_code(&c)),
        _ => false,
    }
}

/// [`is_transient`] for tokio-postgres (pipelined effects transactions),
/// which keeps the kind of its errors private: what shows is whether the
/// connection is closed, the server's error, and the cause.
fn pg_is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        return transient_sqlstate(db.code().code());
    }
    // A socket error, reading or writing or connecting. InvalidInput and
    // InvalidData are a message that does not encode (a NUL in the
    // statement, a value too large to send) or a reply that does not parse:
    // a retry repeats them.
    e.source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            )
        })
}

/// How [`StoreError::Pg`] reads. tokio-postgres's own Display says only
/// "db error" or "error communicating with the server" and leaves the
/// server's message or the cause to the error's source; this says them.
pub(super) struct PgErrorText<'a>(pub(super) &'a tokio_postgres::Error);

impl fmt::Display for PgErrorText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        if let Some(db) = e.as_db_error() {
            return write!(f, "{} (SQLSTATE {})", db.message(), db.code().code());
        }
        write!(f, "{e}")?;
        match e.source() {
            Some(cause) => write!(f, ": {cause}"),
            None => Ok(()),
        }
    }
}

/// PostgreSQL SQLSTATEs that are transient.
fn transient_sqlstate(code: &str) -> bool {
    // Class 08, connection exception, except 08P01 (protocol_violation: a
    // client bug that a retry repeats).
    (code.starts_with("08") && code != "08P01")
        || matches!(
            code,
            "40001" // serialization_failure
            | "40P01" // deadlock_detected
            | "40003" // statement_completion_unknown
            | "55P03" // lock_not_available (lock_timeout, NOWAIT)
            | "57P01" // admin_shutdown (pg_terminate_backend, smart/fast shutdown)
            | "57P02" // crash_shutdown
            | "57P03" // cannot_connect_now (starting up, recovery)
            | "57P05" // idle_session_timeout
            | "53000" // insufficient_resources
            | "53100" // disk_full
            | "53200" // out_of_memory
            | "53300" // too_many_connections
            | "58000" // system_error
            | "58030" // io_error
            | "25P03" // idle_in_transaction_session_timeout
            | "25P04" // transaction_timeout
        )
}

/// The extended result code of an error SQLite itself reported (not one
/// of rusqlite's own, such as a parameter it could not convert).
pub(crate) fn sqlite_result_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.extended_code),
        _ => None,
    }
}

fn transient_sqlite_result(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6)
}

/// SQLite extended result codes whose primary code (the low byte) is
/// `SQLITE_BUSY` (5) or `SQLITE_LOCKED` (6): another connection holds the
/// lock (the busy timeout ran out), or a snapshot went stale.
fn transient_sqlite_code(code: &str) -> bool {
    code.parse::<i32>().is_ok_and(transient_sqlite_result)
}

#[cfg(test)]
mod tests {
    use super::{transient_sqlite_code, transient_sqlstate};

    #[test]
    fn classifies_sqlstates() {
        for c in [
            "08006", "08003", "08000", "40001", "40P01", "55P03", "57P01", "53300", "58030",
        ] {
            assert!(transient_sqlstate(c), "{c} should be transient");
        }
        // Syntax, unique violation, bad input, datatype mismatch, unknown
        // table, not-null, check, protocol violation, aborted transaction.
        for c in [
            "42601", "23505", "22P02", "42804", "42P01", "23502", "23514", "08P01", "25P02",
        ] {
            assert!(!transient_sqlstate(c), "{c} should not be transient");
        }
    }

    /// What gates the SQLite connect retry: a real lock conflict is busy, a
    /// file that cannot be opened is not (it must fail at once, not after
    /// the busy timeout).
    #[tokio::test]
    async fn sqlite_busy_is_told_from_a_file_that_cannot_open() {
        use sqlx::ConnectOptions;
        use sqlx::sqlite::SqliteConnectOptions;
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("busy.db"))
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::ZERO);
        let mut holder = options.connect().await.unwrap();
        sqlx::query("CREATE TABLE t (k INTEGER)")
            .execute(&mut holder)
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .unwrap();
        let mut other = options.connect().await.unwrap();
        let busy = sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap_err();
        assert!(super::is_sqlite_busy(&busy), "{busy}");
        assert!(super::is_transient(&busy), "{busy}");

        let missing = SqliteConnectOptions::new()
            .filename(dir.path().join("no-such-dir").join("x.db"))
            .create_if_missing(true)
            .connect()
            .await
            .unwrap_err();
        assert!(!super::is_sqlite_busy(&missing), "{missing}");
        assert!(!super::is_transient(&missing), "{missing}");
    }

    #[test]
    fn classifies_sqlite_codes() {
        // BUSY, LOCKED, BUSY_SNAPSHOT, LOCKED_SHAREDCACHE, BUSY_TIMEOUT.
        for c in ["5", "6", "517", "262", "773"] {
            assert!(transient_sqlite_code(c), "{c} should be transient");
        }
        // ERROR, CONSTRAINT, CONSTRAINT_UNIQUE, CONSTRAINT_DATATYPE, MISMATCH.
        for c in ["1", "19", "2067", "3091", "20"] {
            assert!(!transient_sqlite_code(c), "{c} should not be transient");
        }
    }
}
