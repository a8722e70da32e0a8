//! Which database errors are worth a retry.
//!
//! A transient error says nothing about the statement: the connection went
//! away (a failover, `pg_terminate_backend`, an admin shutdown, a reset),
//! the server is overloaded, or concurrency got in the way (deadlock,
//! serialization failure, lock timeout, `SQLITE_BUSY`/`SQLITE_LOCKED`). The
//! same statement may well succeed on the next attempt, so the event is
//! retried. Everything else (syntax, constraint violations, type errors) is
//! the statement's own fault and is reported as such.

use super::StoreError;

impl StoreError {
    /// True when a retry of the same work may succeed; see the module docs.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Db(e) | StoreError::Connect { source: e, .. } => is_transient(e),
            _ => false,
        }
    }

    /// The SQLSTATE (PostgreSQL) or extended result code (SQLite) of a
    /// database error, for logs.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Db(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

/// See the module docs.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        // sqlx reports a connection closed mid-message as a protocol error.
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| transient_code(&c)),
        _ => false,
    }
}

/// PostgreSQL SQLSTATEs and SQLite (extended) result codes that are
/// transient.
fn transient_code(code: &str) -> bool {
    // SQLite reports its numeric result code; the low byte is the primary
    // code: 5 SQLITE_BUSY, 6 SQLITE_LOCKED (extended codes add bits above).
    // SQLSTATEs are always five characters (and may be all digits, like
    // 40001); SQLite's codes are shorter numbers.
    if code.len() != 5 {
        return code.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6));
    }
    matches!(
        code,
        // Class 08: connection exception.
        c if c.starts_with("08")
    ) || matches!(
        code,
        "40001" // serialization_failure
            | "40P01" // deadlock_detected
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
            | "25P04" // transaction_timeout
            | "40003" // statement_completion_unknown
    )
}

#[cfg(test)]
mod tests {
    use super::transient_code;

    #[test]
    fn classifies_codes() {
        for c in [
            "08006", "08003", "40001", "40P01", "55P03", "57P01", "53300", "5", "6", "517", "262",
        ] {
            assert!(transient_code(c), "{c} should be transient");
        }
        for c in [
            "42601", "23505", "22P02", "42804", "1", "19", "2067", "42P01",
        ] {
            assert!(!transient_code(c), "{c} should not be transient");
        }
    }
}
