//! Parameterised SQL on the application database, inside the transaction that
//! acknowledges the event: a failed attempt leaves no writes. Placeholders are
//! the backend's own (`$1` on PostgreSQL; `?` or `$1` on SQLite).
//!
//! On PostgreSQL each value is converted to the type the statement gives its
//! placeholder (an `Int` into a `smallint` or `numeric` column, `Text` into a
//! `uuid`, `jsonb` or `timestamptz` one, ...), whatever earlier calls passed.
//!
//! Errors: [`CapError::Invalid`] when the statement or a value is at fault
//! (bad SQL, a constraint, `parameter $2: cannot bind text "abc" to a
//! parameter of type integer`); `?` turns it into a rejection (the event is
//! dead). [`CapError::Unavailable`] when the database is (connection lost,
//! deadlock, serialization failure, lock timeout, SQLite busy); `?` turns it
//! into a retryable error, and the event runs again after a backoff.

use std::fmt;

use crate::bindings::outrun::handler::sql as wit;
use crate::{CapError, HandlerError};

/// One SQL value, as a parameter or a result cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL `NULL`.
    Null,
    /// A boolean (SQLite stores it as an integer and reads it back as `Int`).
    Bool(bool),
    /// Any integer column.
    Int(i64),
    /// Any floating-point column.
    Float(f64),
    /// Text (also how the host returns types it has no closer match for).
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    /// The value as an integer; SQLite booleans read back as 0/1 are accepted
    /// by [`Value::as_bool`] instead.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The value as a float (integers widen).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The value as a boolean; integers 0 and 1 count, because SQLite has no
    /// boolean type.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::Int(0) => Some(false),
            Value::Int(1) => Some(true),
            _ => None,
        }
    }

    /// The value as text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The value as bytes.
    pub fn as_blob(&self) -> Option<&[u8]> {
        match self {
            Value::Blob(b) => Some(b),
            _ => None,
        }
    }

    /// Whether the value is SQL `NULL`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Text(_) => "text",
            Value::Blob(_) => "blob",
        }
    }

    fn into_wit(self) -> wit::Value {
        match self {
            Value::Null => wit::Value::Null,
            Value::Bool(b) => wit::Value::Boolean(b),
            Value::Int(i) => wit::Value::Int(i),
            Value::Float(f) => wit::Value::Float(f),
            Value::Text(s) => wit::Value::Text(s),
            Value::Blob(b) => wit::Value::Blob(b),
        }
    }

    fn from_wit(v: wit::Value) -> Self {
        match v {
            wit::Value::Null => Value::Null,
            wit::Value::Boolean(b) => Value::Bool(b),
            wit::Value::Int(i) => Value::Int(i),
            wit::Value::Float(f) => Value::Float(f),
            wit::Value::Text(s) => Value::Text(s),
            wit::Value::Blob(b) => Value::Blob(b),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Blob(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self { Value::Int(i64::from(v)) }
        }
    )*};
}
from_int!(i8, i16, i32, i64, u8, u16, u32);

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Float(f64::from(v))
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Convert a JSON value into a parameter: numbers become `Int` when integral,
/// arrays and objects are passed as their JSON text.
impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Text(s),
            other => Value::Text(other.to_string()),
        }
    }
}

/// Build a `Vec<Value>` of parameters: `sql::params![order_id, 3, None::<i64>]`.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => {
        ::std::vec![$($crate::sql::Value::from($v)),*]
    };
}
pub use crate::params;

/// A column lookup that failed: no such column, or a value of another type.
/// Converts into a rejecting [`HandlerError`]: it is a bug in the handler's
/// SQL, which a retry would not fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ColumnError {
    /// The result set has no column of that name.
    #[error("query result has no column `{column}` (columns: {available})")]
    Missing {
        /// The name asked for.
        column: String,
        /// The columns the query returned, comma-separated.
        available: String,
    },
    /// The column holds a value of another type.
    #[error("column `{column}` holds {found} {value}, expected {expected}")]
    Type {
        /// The column.
        column: String,
        /// The type asked for.
        expected: &'static str,
        /// The type found.
        found: &'static str,
        /// The value found, for the message.
        value: String,
    },
}

impl From<ColumnError> for HandlerError {
    fn from(e: ColumnError) -> Self {
        HandlerError::reject(e.to_string())
    }
}

/// The result of [`query`]: column names and rows of values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
}

impl Rows {
    /// Build a result set by hand (for tests of code that consumes rows).
    pub fn new(columns: Vec<String>, rows: Vec<Vec<Value>>) -> Self {
        Self { columns, rows }
    }

    /// Column names, in select order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Position of column `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the query returned no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Row `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<Row<'_>> {
        self.rows.get(i).map(|values| Row {
            columns: &self.columns,
            values,
        })
    }

    /// The first row, if any.
    pub fn first(&self) -> Option<Row<'_>> {
        self.get(0)
    }

    /// The rows in order.
    pub fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(|values| Row {
            columns: &self.columns,
            values,
        })
    }

    /// The raw values, row by row.
    pub fn values(&self) -> &[Vec<Value>] {
        &self.rows
    }

    /// The single value of a one-row, one-column result (`SELECT count(*) ...`).
    pub fn scalar(&self) -> Result<&Value, ColumnError> {
        let column = self.columns.first().cloned().unwrap_or_default();
        match (self.rows.as_slice(), self.columns.len()) {
            ([row], 1) => Ok(&row[0]),
            _ => Err(ColumnError::Type {
                column,
                expected: "exactly one row and one column",
                found: "a result of",
                value: format!("{} rows x {} columns", self.rows.len(), self.columns.len()),
            }),
        }
    }
}

/// One row of [`Rows`], with lookups by column name.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl<'a> Row<'a> {
    /// The value of column `name`.
    pub fn get(&self, name: &str) -> Result<&'a Value, ColumnError> {
        self.columns
            .iter()
            .position(|c| c == name)
            .and_then(|i| self.values.get(i))
            .ok_or_else(|| ColumnError::Missing {
                column: name.to_owned(),
                available: self.columns.join(", "),
            })
    }

    /// The values in column order.
    pub fn values(&self) -> &'a [Value] {
        self.values
    }

    /// Column `name` as an integer.
    pub fn i64(&self, name: &str) -> Result<i64, ColumnError> {
        self.typed(name, "int", Value::as_i64)
    }

    /// Column `name` as a float (integers widen).
    pub fn f64(&self, name: &str) -> Result<f64, ColumnError> {
        self.typed(name, "float", Value::as_f64)
    }

    /// Column `name` as a boolean (0/1 accepted for SQLite).
    pub fn bool(&self, name: &str) -> Result<bool, ColumnError> {
        self.typed(name, "bool", Value::as_bool)
    }

    /// Column `name` as text.
    pub fn str(&self, name: &str) -> Result<&'a str, ColumnError> {
        let v = self.get(name)?;
        v.as_str().ok_or_else(|| type_error(name, "text", v))
    }

    /// Column `name` as text, `None` when NULL.
    pub fn opt_str(&self, name: &str) -> Result<Option<&'a str>, ColumnError> {
        let v = self.get(name)?;
        if v.is_null() {
            return Ok(None);
        }
        v.as_str()
            .map(Some)
            .ok_or_else(|| type_error(name, "text or null", v))
    }

    /// Column `name` as an integer, `None` when NULL.
    pub fn opt_i64(&self, name: &str) -> Result<Option<i64>, ColumnError> {
        let v = self.get(name)?;
        if v.is_null() {
            return Ok(None);
        }
        v.as_i64()
            .map(Some)
            .ok_or_else(|| type_error(name, "int or null", v))
    }

    fn typed<T>(
        &self,
        name: &str,
        expected: &'static str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<T, ColumnError> {
        let v = self.get(name)?;
        f(v).ok_or_else(|| type_error(name, expected, v))
    }
}

fn type_error(column: &str, expected: &'static str, v: &Value) -> ColumnError {
    ColumnError::Type {
        column: column.to_owned(),
        expected,
        found: v.kind(),
        value: v.to_string(),
    }
}

/// Run a statement that returns rows. See the module docs for the errors.
pub fn query(statement: &str, params: &[Value]) -> Result<Rows, CapError> {
    let params: Vec<wit::Value> = params.iter().cloned().map(Value::into_wit).collect();
    let rows = wit::query(statement, &params)?;
    Ok(Rows {
        columns: rows.columns,
        rows: rows
            .rows
            .into_iter()
            .map(|r| r.into_iter().map(Value::from_wit).collect())
            .collect(),
    })
}

/// Run a statement; returns the number of rows it affected. See the module
/// docs for the errors.
pub fn execute(statement: &str, params: &[Value]) -> Result<u64, CapError> {
    let params: Vec<wit::Value> = params.iter().cloned().map(Value::into_wit).collect();
    Ok(wit::execute(statement, &params)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Rows {
        Rows::new(
            vec!["id".into(), "n".into(), "on".into(), "note".into()],
            vec![vec![
                Value::Text("a".into()),
                Value::Int(2),
                Value::Int(1),
                Value::Null,
            ]],
        )
    }

    #[test]
    fn params_macro_converts() {
        let p = params!["a", 3_i32, Some(2_i64), None::<String>, true, 1.5];
        assert_eq!(
            p,
            vec![
                Value::Text("a".into()),
                Value::Int(3),
                Value::Int(2),
                Value::Null,
                Value::Bool(true),
                Value::Float(1.5),
            ]
        );
    }

    #[test]
    fn row_lookups_by_name() {
        let r = rows();
        let row = r.first().unwrap();
        assert_eq!(row.str("id").unwrap(), "a");
        assert_eq!(row.i64("n").unwrap(), 2);
        assert!(row.bool("on").unwrap());
        assert_eq!(row.opt_str("note").unwrap(), None);
        assert_eq!(r.column_index("n"), Some(1));
    }

    #[test]
    fn column_errors_name_the_column() {
        let r = rows();
        let row = r.first().unwrap();
        let missing = row.i64("nope").unwrap_err().to_string();
        assert!(
            missing.contains("`nope`") && missing.contains("id, n, on, note"),
            "{missing}"
        );
        let wrong = row.i64("id").unwrap_err().to_string();
        assert!(
            wrong.contains("`id`") && wrong.contains("text") && wrong.contains("int"),
            "{wrong}"
        );
        assert!(!HandlerError::from(row.i64("id").unwrap_err()).is_retryable());
    }

    #[test]
    fn scalar_needs_one_cell() {
        let one = Rows::new(vec!["count".into()], vec![vec![Value::Int(4)]]);
        assert_eq!(one.scalar().unwrap(), &Value::Int(4));
        assert!(rows().scalar().is_err());
    }

    #[test]
    fn json_values_become_params() {
        let v: Value = serde_json::json!(5).into();
        assert_eq!(v, Value::Int(5));
        let v: Value = serde_json::json!({"a": 1}).into();
        assert_eq!(v, Value::Text(r#"{"a":1}"#.into()));
    }
}
