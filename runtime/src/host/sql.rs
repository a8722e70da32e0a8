//! `outrun:handler/sql`: parameterised statements on the application
//! database, run inside the ack transaction (opened lazily by
//! [`Effects::tx`](crate::handler::Effects::tx)) so a failed attempt leaves no
//! writes.

use super::bindings::outrun::handler::sql::{Host, Rows, Value};
use super::harness::Call;
use super::{CapError, HostState};
use crate::store::{SqlRows, SqlValue, StoreError};

impl HostState {
    fn sql_allowed(&self) -> Result<(), CapError> {
        if let Some(lost) = &self.sql_lost {
            return Err(CapError::Unavailable(lost.clone()));
        }
        if self.caps.sql {
            Ok(())
        } else {
            Err(self.caps.deny(&self.event_id, "sql", "sql = true"))
        }
    }

    /// [`store_error`], and a warning for the transient ones (the handler
    /// may swallow the error; the operator should still see it).
    fn sql_error(&mut self, e: StoreError) -> CapError {
        let cap = store_error(&e);
        if let CapError::Unavailable(message) = &cap {
            tracing::warn!(
                event_id = %self.event_id,
                sqlstate = e.sqlstate().as_deref().unwrap_or("none"),
                "sql capability: transient database error, the event will be retried: {e}"
            );
            self.sql_lost = Some(format!(
                "{message} (the transaction of this attempt is gone; return the error)"
            ));
        }
        cap
    }
}

impl Host for HostState {
    async fn query(&mut self, statement: String, params: Vec<Value>) -> Result<Rows, CapError> {
        self.sql_allowed()?;
        let params: Vec<SqlValue> = params.into_iter().map(to_store).collect();
        let rows = match self.effects.tx().await {
            Ok(tx) => tx.query(&statement, &params).await,
            Err(e) => Err(e),
        };
        let rows = rows.map_err(|e| self.sql_error(e));
        self.caps.record(|| {
            sql_call(
                "query",
                statement,
                &params,
                rows.as_ref().map(|r| serde_json::json!(r)),
            )
        });
        rows.map(to_wit)
    }

    async fn execute(&mut self, statement: String, params: Vec<Value>) -> Result<u64, CapError> {
        self.sql_allowed()?;
        let params: Vec<SqlValue> = params.into_iter().map(to_store).collect();
        let affected = match self.effects.tx().await {
            Ok(tx) => tx.execute(&statement, &params).await,
            Err(e) => Err(e),
        };
        let affected = affected.map_err(|e| self.sql_error(e));
        self.caps.record(|| {
            sql_call(
                "execute",
                statement,
                &params,
                affected
                    .as_ref()
                    .map(|n| serde_json::json!({ "affected": n })),
            )
        });
        affected
    }
}

/// The harness's record of one statement (see [`super::harness`]).
fn sql_call(
    op: &'static str,
    statement: String,
    params: &[SqlValue],
    result: Result<serde_json::Value, &CapError>,
) -> Call {
    let (result, error) = match result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(super::harness::cap_error_text(e))),
    };
    Call::Sql {
        op,
        statement,
        params: params.iter().map(|p| serde_json::json!(p)).collect(),
        result,
        error,
    }
}

fn to_store(v: Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Boolean(b) => SqlValue::Bool(b),
        Value::Int(i) => SqlValue::Int(i),
        Value::Float(f) => SqlValue::Float(f),
        Value::Text(s) => SqlValue::Text(s),
        Value::Blob(b) => SqlValue::Blob(b),
    }
}

fn to_wit(rows: SqlRows) -> Rows {
    let rows_out = rows
        .rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| match v {
                    SqlValue::Null => Value::Null,
                    SqlValue::Bool(b) => Value::Boolean(b),
                    SqlValue::Int(i) => Value::Int(i),
                    SqlValue::Float(f) => Value::Float(f),
                    SqlValue::Text(s) => Value::Text(s),
                    SqlValue::Blob(b) => Value::Blob(b),
                })
                .collect()
        })
        .collect();
    Rows {
        columns: rows.columns,
        rows: rows_out,
    }
}

/// Transient errors (see `store::transient`: the connection was lost, a
/// deadlock, a serialization failure, a lock timeout, `SQLITE_BUSY`) are
/// `unavailable`, which the SDK turns into a retryable error. Errors the
/// statement or its arguments caused (syntax, constraint, type, a parameter
/// that does not convert) are `invalid`: a retry would fail the same way.
/// Anything else is `unavailable`: not the statement's fault as far as we
/// can tell, so the event gets its retries.
fn store_error(e: &StoreError) -> CapError {
    let code = e
        .code_label()
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    if e.is_transient() {
        // The server's own words, without sqlx's "error returned from
        // database" wrapping.
        let what = match e {
            StoreError::Db(sqlx::Error::Database(db)) => db.message().to_owned(),
            StoreError::Pg(pg) if let Some(db) = pg.as_db_error() => db.message().to_owned(),
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, Some(m))) => format!("{m} ({f})"),
            other => other.to_string(),
        };
        return CapError::Unavailable(format!(
            "database unavailable{code}: {what}; the event will be retried"
        ));
    }
    match e {
        StoreError::Db(sqlx::Error::Database(db)) => {
            CapError::Invalid(format!("SQL error{code}: {db}"))
        }
        // The server's message alone, as sqlx's PostgreSQL errors print;
        // without one, tokio-postgres's own complaint about the statement or
        // its values (encoding, decoding, counts), not the connection's
        // (those are transient, above).
        StoreError::Pg(pg) => CapError::Invalid(match pg.as_db_error() {
            Some(db) => format!("SQL error{code}: {}", db.message()),
            None => format!("SQL error: {e}"),
        }),
        // SQLite's verdict on the statement (syntax, constraint, ...) or
        // rusqlite's on its arguments (a value that does not convert, a
        // string of several statements): the statement's fault either way.
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, m)) => CapError::Invalid(format!(
            "SQL error{code}: {}",
            m.as_deref().map_or_else(|| f.to_string(), str::to_owned)
        )),
        StoreError::Sqlite(e) => CapError::Invalid(format!("SQL error: {e}")),
        StoreError::Db(
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::Encode(_)
            | sqlx::Error::Protocol(_),
        ) => CapError::Invalid(format!("SQL error: {e}")),
        StoreError::Param { .. }
        | StoreError::ParamCount { .. }
        | StoreError::UnsupportedColumn { .. }
        | StoreError::Invalid(_) => CapError::Invalid(e.to_string()),
        other => CapError::Unavailable(format!("database unavailable: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> StoreError {
        StoreError::Db(sqlx::Error::Io(std::io::Error::new(kind, "gone")))
    }

    fn is_unavailable(e: &CapError) -> bool {
        matches!(e, CapError::Unavailable(_))
    }

    fn is_invalid(e: &CapError) -> bool {
        matches!(e, CapError::Invalid(_))
    }

    #[test]
    fn lost_connections_and_pool_trouble_are_unavailable() {
        for e in [
            io(std::io::ErrorKind::UnexpectedEof),
            io(std::io::ErrorKind::ConnectionReset),
            io(std::io::ErrorKind::BrokenPipe),
            StoreError::Db(sqlx::Error::PoolTimedOut),
            StoreError::Db(sqlx::Error::PoolClosed),
            StoreError::NoStore,
        ] {
            let cap = store_error(&e);
            assert!(is_unavailable(&cap), "{e} -> {cap:?}");
        }
    }

    #[test]
    fn statement_and_argument_errors_are_invalid() {
        for e in [
            StoreError::Param {
                index: 2,
                reason: "cannot bind text \"abc\" to a parameter of type integer".into(),
            },
            StoreError::ParamCount {
                expected: 1,
                given: 2,
            },
            StoreError::UnsupportedColumn {
                column: "c".into(),
                type_name: "INTERVAL".into(),
            },
            StoreError::Db(sqlx::Error::ColumnNotFound("x".into())),
            StoreError::Db(sqlx::Error::Protocol(
                "unsupported SQL parameter format: :name".into(),
            )),
        ] {
            let cap = store_error(&e);
            assert!(is_invalid(&cap), "{e} -> {cap:?}");
        }
        let cap = store_error(&StoreError::Param {
            index: 2,
            reason: "cannot bind".into(),
        });
        assert!(
            matches!(&cap, CapError::Invalid(m) if m.starts_with("parameter $2: ")),
            "{cap:?}"
        );
    }

    /// A constraint violation through tokio-postgres (a pipe) is the
    /// statement's fault, worded as through sqlx.
    #[tokio::test]
    async fn pipe_constraint_violation_is_invalid_like_sqlx() {
        use crate::store::postgres::test_db::{pipe_client, pipe_query, sqlx_conn};
        use crate::store::postgres::{execute, query};
        let (client, _connection) = pipe_client().await;
        let mut conn = sqlx_conn().await;
        let create = "CREATE TEMP TABLE t (k int4 PRIMARY KEY)";
        let insert = "INSERT INTO t VALUES ($1) RETURNING k";
        let one = [SqlValue::Int(1)];
        pipe_query(&client, create, &[]).await.unwrap();
        pipe_query(&client, insert, &one).await.unwrap();
        let piped = pipe_query(&client, insert, &one).await.unwrap_err();
        execute(&mut conn, create, &[]).await.unwrap();
        execute(&mut conn, insert, &one).await.unwrap();
        let by_sqlx = query(&mut conn, insert, &one).await.unwrap_err();

        assert!(matches!(piped, StoreError::Pg(_)), "{piped:?}");
        assert!(!piped.is_transient());
        assert_eq!(piped.sqlstate().as_deref(), Some("23505"));
        assert_eq!(piped.code_label().as_deref(), Some("SQLSTATE 23505"));
        assert_eq!(
            piped.to_string(),
            r#"database error: duplicate key value violates unique constraint "t_pkey" (SQLSTATE 23505)"#
        );
        let cap = store_error(&piped);
        assert!(
            matches!(&cap, CapError::Invalid(m) if m == r#"SQL error (SQLSTATE 23505): duplicate key value violates unique constraint "t_pkey""#),
            "{cap:?}"
        );
        assert_eq!(format!("{cap:?}"), format!("{:?}", store_error(&by_sqlx)));
    }

    /// A pipe whose backend was terminated: the next statement's error is
    /// transient and reaches the handler as `unavailable`.
    #[tokio::test]
    async fn pipe_terminated_backend_is_unavailable() {
        use crate::store::postgres::query;
        use crate::store::postgres::test_db::{pipe_client, pipe_query, sqlx_conn};
        let (client, connection) = pipe_client().await;
        let mut conn = sqlx_conn().await;
        let pid = pipe_query(&client, "SELECT pg_backend_pid()::int8", &[])
            .await
            .unwrap()
            .rows[0][0]
            .clone();
        let killed = query(&mut conn, "SELECT pg_terminate_backend($1::int4)", &[pid])
            .await
            .unwrap();
        assert_eq!(killed.rows, [[SqlValue::Bool(true)]]);
        // The connection ends on the server's notice (57P01); until it
        // has, a statement may get that notice itself instead.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), connection).await;

        let e = pipe_query(&client, "SELECT 1", &[]).await.unwrap_err();
        assert!(matches!(e, StoreError::Pg(_)), "{e:?}");
        assert!(e.is_transient(), "{e:?}");
        assert_eq!(e.to_string(), "database error: connection closed");
        let cap = store_error(&e);
        assert!(
            matches!(&cap, CapError::Unavailable(m)
                if m == "database unavailable: database error: connection closed; the event will be retried"),
            "{cap:?}"
        );
    }

    /// tokio-postgres's own complaint about a statement (it cannot send a
    /// NUL) carries an I/O error as its cause, yet is no lost connection.
    #[tokio::test]
    async fn pipe_unsendable_statement_is_invalid() {
        use crate::store::postgres::test_db::{pipe_client, pipe_query};
        let (client, _connection) = pipe_client().await;
        let e = pipe_query(&client, "SELECT 1 \0", &[]).await.unwrap_err();
        assert!(matches!(e, StoreError::Pg(_)), "{e:?}");
        assert!(!e.is_transient(), "{e:?}");
        let cap = store_error(&e);
        assert!(
            matches!(&cap, CapError::Invalid(m) if m.starts_with("SQL error: database error: error encoding message to server: ")),
            "{cap:?}"
        );
        // The connection is fine.
        pipe_query(&client, "SELECT 1", &[]).await.unwrap();
    }

    /// Real SQLite errors: a syntax error is invalid, a busy database is
    /// unavailable with its result code in the message.
    #[tokio::test]
    async fn sqlite_errors_by_result_code() {
        use sqlx::{ConnectOptions, Connection};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::from_millis(10));
        let mut a = opts.connect().await.unwrap();
        let mut b = opts.connect().await.unwrap();
        sqlx::query("CREATE TABLE t (k INTEGER)")
            .execute(&mut a)
            .await
            .unwrap();

        let syntax = sqlx::query("INSERT INTO")
            .execute(&mut a)
            .await
            .unwrap_err();
        let cap = store_error(&StoreError::Db(syntax));
        assert!(is_invalid(&cap), "{cap:?}");

        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut a)
            .await
            .unwrap();
        let busy = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut b)
            .await
            .unwrap_err();
        let cap = store_error(&StoreError::Db(busy));
        assert!(
            matches!(&cap, CapError::Unavailable(m) if m.contains("SQLite result code 5")),
            "{cap:?}"
        );
        sqlx::query("ROLLBACK").execute(&mut a).await.unwrap();
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
}
