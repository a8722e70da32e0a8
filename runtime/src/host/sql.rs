//! `outrun:handler/sql`: parameterised statements on the application
//! database, run inside the ack transaction (opened lazily by
//! [`Effects::tx`](crate::handler::Effects::tx)) so a failed attempt leaves no
//! writes.

use super::bindings::outrun::handler::sql::{Host, Rows, Value};
use super::{CapError, HostState};
use crate::store::{SqlRows, SqlValue, StoreError};

impl HostState {
    fn sql_allowed(&self) -> Result<(), CapError> {
        if self.caps.sql {
            Ok(())
        } else {
            Err(self.caps.deny(&self.event_id, "sql", "sql = true"))
        }
    }
}

impl Host for HostState {
    async fn query(&mut self, statement: String, params: Vec<Value>) -> Result<Rows, CapError> {
        self.sql_allowed()?;
        let params: Vec<SqlValue> = params.into_iter().map(to_store).collect();
        let tx = self.effects.tx().await.map_err(store_error)?;
        let rows = tx.query(&statement, &params).await.map_err(store_error)?;
        Ok(to_wit(rows))
    }

    async fn execute(&mut self, statement: String, params: Vec<Value>) -> Result<u64, CapError> {
        self.sql_allowed()?;
        let params: Vec<SqlValue> = params.into_iter().map(to_store).collect();
        let tx = self.effects.tx().await.map_err(store_error)?;
        tx.execute(&statement, &params).await.map_err(store_error)
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

/// Errors the statement caused (syntax, constraint, type) are `invalid`: a
/// retry will not help. Connection and pool trouble is `unavailable`.
fn store_error(e: StoreError) -> CapError {
    match e {
        StoreError::Db(sqlx::Error::Database(db)) => CapError::Invalid(format!("SQL error: {db}")),
        StoreError::Db(
            e @ (sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::Encode(_)),
        ) => CapError::Invalid(format!("SQL error: {e}")),
        StoreError::Invalid(e) => CapError::Invalid(e.to_string()),
        other => CapError::Unavailable(format!("database unavailable: {other}")),
    }
}
