//! Parameters of the `sql` capability, encoded for the type PostgreSQL
//! inferred for each placeholder.
//!
//! sqlx prepares a statement once per connection and caches it by its text.
//! Had the first call's values chosen the parameter types (int8 for an int,
//! OID 0 for a NULL, ...), a later call of the same text with another kind of
//! value would be bound against types it does not match: a NULL first let the
//! server settle on int4, and the next call's int8 failed with "incorrect
//! binary data format in bind parameter 2". So the statement is prepared with
//! no type hints, the server infers each parameter's type from the SQL, and
//! every value is converted here to exactly that type, whatever came before.
//! sqlx sends every parameter in binary, so each conversion writes the type's
//! binary format.
//!
//! Pipelined effects transactions run on tokio-postgres instead, which also
//! prepares without type hints and binds in binary; the same conversions
//! serve it ([`convert_for_pipe`]), through [`PgType`], so a value converts,
//! fails and is worded the same on either client.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgTypeKind, types::Oid};
use sqlx::{Encode, Postgres, TypeInfo};
use tokio_postgres::types::{self as pg, ToSql, to_sql_checked};
use uuid::Uuid;

use crate::store::{SqlValue, StoreError};

/// What the conversions here and the column decoder (`column_value` in
/// postgres.rs) need to know of a PostgreSQL type, from either client:
/// sqlx (the `sql` capability on pooled connections) or tokio-postgres
/// (pipelined effects transactions), so both convert and decode alike.
pub(crate) trait PgType: Sized {
    /// `None` only for a type declared by name, never one of a prepared
    /// statement.
    fn oid(&self) -> Option<u32>;
    fn kind(&self) -> TypeKind<'_, Self>;
    /// The name as sqlx spells it (`INT4`, `INTERVAL`, `INT4[]`, or a
    /// custom type's as `regtype` writes it, `app.mood`): what messages
    /// have always shown.
    fn shown_name(&self) -> Cow<'_, str>;
}

/// The kinds of type whose values the conversions treat specially.
pub(crate) enum TypeKind<'a, T> {
    /// Sent and received in the base type's format.
    Domain(&'a T),
    /// The binary format is the label.
    Enum,
    Other,
}

impl PgType for PgTypeInfo {
    fn oid(&self) -> Option<u32> {
        PgTypeInfo::oid(self).map(|o| o.0)
    }

    fn kind(&self) -> TypeKind<'_, Self> {
        match PgTypeInfo::kind(self) {
            PgTypeKind::Domain(base) => TypeKind::Domain(base),
            PgTypeKind::Enum(_) => TypeKind::Enum,
            _ => TypeKind::Other,
        }
    }

    fn shown_name(&self) -> Cow<'_, str> {
        Cow::Borrowed(TypeInfo::name(self))
    }
}

/// PostgreSQL's first OID for objects created after initdb: types below it
/// are built in.
const FIRST_NORMAL_OID: u32 = 16384;

impl PgType for pg::Type {
    fn oid(&self) -> Option<u32> {
        Some(pg::Type::oid(self))
    }

    fn kind(&self) -> TypeKind<'_, Self> {
        match pg::Type::kind(self) {
            pg::Kind::Domain(base) => TypeKind::Domain(base),
            pg::Kind::Enum(_) => TypeKind::Enum,
            _ => TypeKind::Other,
        }
    }

    /// tokio-postgres has the catalog name (`int4`, `_int4`, `bpchar`);
    /// sqlx upper-cases a built-in type's name, writes an array as its
    /// element's name and `[]`, and calls bpchar `CHAR` (and `"char"`
    /// `"CHAR"`). Other types sqlx looks up and names as PostgreSQL's
    /// `oid::regtype::text` does: quoted where needed, qualified by their
    /// schema unless it is on the search path, taken here to be `public`
    /// (asking the server would cost a round trip). Built-in types sqlx
    /// does not know (regclass, tsvector, ...) it names that way too, in
    /// lower case; those come out upper-cased here.
    fn shown_name(&self) -> Cow<'_, str> {
        let name = self.name();
        if pg::Type::oid(self) >= FIRST_NORMAL_OID {
            if let pg::Kind::Array(element) = pg::Type::kind(self) {
                return Cow::Owned(format!("{}[]", element.shown_name()));
            }
            return Cow::Owned(match self.schema() {
                "public" | "pg_catalog" => quote_ident(name),
                schema => format!("{}.{}", quote_ident(schema), quote_ident(name)),
            });
        }
        let upper = |n: &str| match n {
            "bpchar" => "CHAR".to_owned(),
            "char" => "\"CHAR\"".to_owned(),
            n => n.to_ascii_uppercase(),
        };
        Cow::Owned(match name.strip_prefix('_') {
            Some(element) => format!("{}[]", upper(element)),
            None => upper(name),
        })
    }
}

/// An identifier as PostgreSQL writes it, in quotes unless plain lower
/// case (keywords, which it also quotes, are not told apart here).
fn quote_ident(ident: &str) -> String {
    let plain = ident.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && ident
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    match plain {
        true => ident.to_owned(),
        false => format!("\"{}\"", ident.replace('"', "\"\"")),
    }
}

/// One parameter, converted for its target type and ready to encode.
#[derive(Debug)]
pub(super) struct Param<'a> {
    /// The type the statement declares; also what sqlx sends as the type
    /// hint if it ever has to prepare the statement again (after the
    /// connection's statement cache evicted it).
    ty: PgTypeInfo,
    value: Encoded<'a>,
}

/// One parameter for tokio-postgres, converted for the type the server
/// inferred for its placeholder. tokio-postgres binds every parameter with
/// the statement's own type, so this writes that type's binary format
/// whatever the type (`accepts` is always true).
#[derive(Debug)]
pub(crate) struct PipeParam<'a>(Encoded<'a>);

#[derive(Debug)]
enum Encoded<'a> {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    /// The type's binary format is the UTF-8 text itself (text, varchar,
    /// json, enums, ...).
    Text(&'a str),
    Owned(String),
    /// jsonb: a version byte (1), then the JSON text.
    Jsonb(String),
    Bytes(&'a [u8]),
    Uuid(Uuid),
    Timestamptz(DateTime<Utc>),
    Timestamp(NaiveDateTime),
    Date(NaiveDate),
    Time(NaiveTime),
    /// PostgreSQL's binary NUMERIC, already laid out.
    Numeric(Vec<u8>),
}

/// Where PostgreSQL counts timestamps (in microseconds) and dates (in days)
/// from.
pub(super) const PG_EPOCH: NaiveDateTime = match NaiveDate::from_ymd_opt(2000, 1, 1) {
    Some(d) => d.and_time(NaiveTime::MIN),
    None => panic!("2000-01-01 is a date"),
};

impl Encoded<'_> {
    /// Append the value in its type's binary format, for either client;
    /// `false` for NULL, which writes nothing.
    fn write(&self, out: &mut impl BufMut) -> Result<bool, &'static str> {
        const OUT_OF_RANGE: &str = "out of range for PostgreSQL";
        let micros = |t: NaiveDateTime| {
            t.signed_duration_since(PG_EPOCH)
                .num_microseconds()
                .ok_or(OUT_OF_RANGE)
        };
        match self {
            Encoded::Null => return Ok(false),
            Encoded::Bool(v) => out.put_u8(u8::from(*v)),
            Encoded::Int2(v) => out.put_i16(*v),
            Encoded::Int4(v) => out.put_i32(*v),
            Encoded::Int8(v) => out.put_i64(*v),
            Encoded::Float4(v) => out.put_f32(*v),
            Encoded::Float8(v) => out.put_f64(*v),
            Encoded::Text(s) => out.put_slice(s.as_bytes()),
            Encoded::Owned(s) => out.put_slice(s.as_bytes()),
            Encoded::Jsonb(s) => {
                out.put_u8(1);
                out.put_slice(s.as_bytes());
            }
            Encoded::Bytes(b) => out.put_slice(b),
            Encoded::Numeric(b) => out.put_slice(b),
            Encoded::Uuid(v) => out.put_slice(v.as_bytes()),
            Encoded::Timestamptz(v) => out.put_i64(micros(v.naive_utc())?),
            Encoded::Timestamp(v) => out.put_i64(micros(*v)?),
            Encoded::Date(v) => {
                let days = v.signed_duration_since(PG_EPOCH.date()).num_days();
                out.put_i32(i32::try_from(days).map_err(|_| OUT_OF_RANGE)?);
            }
            Encoded::Time(v) => out.put_i64(
                v.signed_duration_since(NaiveTime::MIN)
                    .num_microseconds()
                    .ok_or(OUT_OF_RANGE)?,
            ),
        }
        Ok(true)
    }
}

impl sqlx::Type<Postgres> for Param<'_> {
    fn type_info() -> PgTypeInfo {
        // Never consulted: `produces` names the real type of every value.
        PgTypeInfo::with_oid(Oid(0))
    }
}

impl Encode<'_, Postgres> for Param<'_> {
    fn produces(&self) -> Option<PgTypeInfo> {
        Some(self.ty.clone())
    }

    fn encode_by_ref(
        &self,
        buf: &mut PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, BoxDynError> {
        Ok(match self.value.write(&mut **buf)? {
            true => sqlx::encode::IsNull::No,
            false => sqlx::encode::IsNull::Yes,
        })
    }

    fn size_hint(&self) -> usize {
        match &self.value {
            Encoded::Text(s) => s.len(),
            Encoded::Owned(s) | Encoded::Jsonb(s) => s.len() + 1,
            Encoded::Bytes(b) => b.len(),
            Encoded::Numeric(b) => b.len(),
            _ => 16,
        }
    }
}

impl ToSql for PipeParam<'_> {
    fn to_sql(
        &self,
        _: &pg::Type,
        out: &mut BytesMut,
    ) -> Result<pg::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match self.0.write(out)? {
            true => pg::IsNull::No,
            false => pg::IsNull::Yes,
        })
    }

    fn accepts(_: &pg::Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Convert every value for the parameter types of the prepared statement
/// (`types`, as the server inferred them).
pub(super) fn convert<'a>(
    types: &[PgTypeInfo],
    params: &'a [SqlValue],
) -> Result<Vec<Param<'a>>, StoreError> {
    let values = encode_all(types, params)?;
    Ok(types
        .iter()
        .zip(values)
        .map(|(ty, value)| Param {
            ty: ty.clone(),
            value,
        })
        .collect())
}

/// [`convert`] for a statement tokio-postgres prepared (`types`:
/// `statement.params()`); run it with
/// `client.query_raw(&statement, params.iter())`.
pub(crate) fn convert_for_pipe<'a>(
    types: &[pg::Type],
    params: &'a [SqlValue],
) -> Result<Vec<PipeParam<'a>>, StoreError> {
    Ok(encode_all(types, params)?
        .into_iter()
        .map(PipeParam)
        .collect())
}

fn encode_all<'a, T: PgType>(
    types: &[T],
    params: &'a [SqlValue],
) -> Result<Vec<Encoded<'a>>, StoreError> {
    if types.len() != params.len() {
        return Err(StoreError::ParamCount {
            expected: types.len(),
            given: params.len(),
        });
    }
    types
        .iter()
        .zip(params)
        .enumerate()
        .map(|(i, (ty, v))| {
            encode(ty, v).map_err(|why| StoreError::Param {
                index: i + 1,
                reason: why.message(ty, v, i + 1),
            })
        })
        .collect()
}

/// Why a value did not convert; [`Mismatch::message`] words it.
enum Mismatch {
    /// This kind of value never goes into this type.
    Kind,
    /// The kind fits but this value does not (out of range, unparsable).
    Value(&'static str),
}

impl Mismatch {
    fn message(&self, ty: &impl PgType, v: &SqlValue, n: usize) -> String {
        let name = type_name(ty);
        let detail = match self {
            Mismatch::Kind => String::new(),
            Mismatch::Value(why) => format!(" ({why})"),
        };
        let in_sql = format!("pass text and convert it in the statement (`${n}::text::{name}`)");
        let fix = match accepted(ty) {
            Some(kinds) if target(ty) == Target::TextLike => format!("pass {kinds}"),
            Some(kinds) => format!("pass {kinds}, or {in_sql}"),
            None => format!("the sql capability has no value of type {name}: {in_sql}"),
        };
        format!(
            "cannot bind {} to a parameter of type {name}{detail}; {fix}",
            Shown(v)
        )
    }
}

/// A value as an error message shows it: its kind, then the value (long
/// text cut short).
struct Shown<'a>(&'a SqlValue);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            SqlValue::Null => f.write_str("null"),
            SqlValue::Bool(b) => write!(f, "boolean {b}"),
            SqlValue::Int(i) => write!(f, "int {i}"),
            SqlValue::Float(x) => write!(f, "float {}", float_text(*x)),
            SqlValue::Text(s) => {
                const MAX: usize = 40;
                match s.char_indices().nth(MAX) {
                    Some((cut, _)) => write!(f, "text {:?}...", &s[..cut]),
                    None => write!(f, "text {s:?}"),
                }
            }
            SqlValue::Blob(b) => {
                let s = if b.len() == 1 { "" } else { "s" };
                write!(f, "blob of {} byte{s}", b.len())
            }
        }
    }
}

/// The types the conversions below and the column decoder know, by OID
/// (stable for built-in types).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Target {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    /// Binary format = the UTF-8 text: text, varchar, char(n), name, xml,
    /// unknown, enum labels, citext.
    TextLike,
    Json,
    Jsonb,
    Bytea,
    Uuid,
    Timestamptz,
    Timestamp,
    Date,
    Time,
    /// A function's "no result": a column of it reads as null, and no value
    /// binds to it.
    Void,
    Other,
}

pub(super) fn target(ty: &impl PgType) -> Target {
    match ty.oid() {
        Some(16) => Target::Bool,
        Some(17) => Target::Bytea,
        Some(20) => Target::Int8,
        Some(21) => Target::Int2,
        Some(23) => Target::Int4,
        // text, name, xml, unknown, bpchar, varchar
        Some(25 | 19 | 142 | 705 | 1042 | 1043) => Target::TextLike,
        Some(114) => Target::Json,
        Some(700) => Target::Float4,
        Some(701) => Target::Float8,
        Some(1082) => Target::Date,
        Some(1083) => Target::Time,
        Some(1114) => Target::Timestamp,
        Some(1184) => Target::Timestamptz,
        Some(1700) => Target::Numeric,
        Some(2278) => Target::Void,
        Some(2950) => Target::Uuid,
        Some(3802) => Target::Jsonb,
        _ => match ty.kind() {
            // A domain is sent in its base type's format.
            TypeKind::Domain(base) => target(base),
            TypeKind::Enum => Target::TextLike,
            // An extension type: its OID varies by database, its name does not.
            _ if ty.shown_name().eq_ignore_ascii_case("citext") => Target::TextLike,
            _ => Target::Other,
        },
    }
}

/// The value kinds a type accepts, for error messages; `None` when the
/// capability cannot produce that type at all.
fn accepted(ty: &impl PgType) -> Option<&'static str> {
    Some(match target(ty) {
        Target::Bool => "a boolean (or text such as 'true')",
        Target::Int2 | Target::Int4 | Target::Int8 => {
            "an int in range (or a whole float, or text of an integer)"
        }
        Target::Float4 | Target::Float8 | Target::Numeric => "an int, a float or text of a number",
        Target::TextLike => "text (ints, floats and booleans are written out as text)",
        Target::Json | Target::Jsonb => "JSON text (or an int, float or boolean)",
        Target::Bytea => "a blob",
        Target::Uuid => "text of a UUID",
        Target::Timestamptz => "RFC 3339 text such as '2024-05-01T12:00:00Z'",
        Target::Timestamp => "ISO 8601 text such as '2024-05-01T12:00:00'",
        Target::Date => "text such as '2024-05-01'",
        Target::Time => "text such as '12:00:00'",
        Target::Void | Target::Other => return None,
    })
}

/// The type as PostgreSQL's own messages name it.
fn type_name(ty: &impl PgType) -> String {
    let name = match ty.oid() {
        Some(16) => "boolean",
        Some(20) => "bigint",
        Some(21) => "smallint",
        Some(23) => "integer",
        Some(700) => "real",
        Some(701) => "double precision",
        Some(1042) => "character",
        Some(1043) => "character varying",
        Some(1083) => "time without time zone",
        Some(1114) => "timestamp without time zone",
        Some(1184) => "timestamp with time zone",
        _ => return ty.shown_name().to_ascii_lowercase(),
    };
    name.to_owned()
}

fn encode<'a>(ty: &impl PgType, v: &'a SqlValue) -> Result<Encoded<'a>, Mismatch> {
    use Encoded as E;
    use SqlValue as V;
    use Target as T;
    let t = target(ty);
    Ok(match (v, t) {
        (V::Null, _) => E::Null,

        (V::Bool(b), T::Bool) => E::Bool(*b),
        (V::Text(s), T::Bool) => E::Bool(parse_bool(s).ok_or(Mismatch::Value("not a boolean"))?),

        (V::Int(i), T::Int2) => E::Int2(int_in_range(*i)?),
        (V::Int(i), T::Int4) => E::Int4(int_in_range(*i)?),
        (V::Int(i), T::Int8) => E::Int8(*i),
        (V::Float(f), T::Int2) => E::Int2(int_in_range(whole(*f)?)?),
        (V::Float(f), T::Int4) => E::Int4(int_in_range(whole(*f)?)?),
        (V::Float(f), T::Int8) => E::Int8(whole(*f)?),
        (V::Text(s), T::Int2) => E::Int2(int_in_range(parse_int(s)?)?),
        (V::Text(s), T::Int4) => E::Int4(int_in_range(parse_int(s)?)?),
        (V::Text(s), T::Int8) => E::Int8(parse_int(s)?),

        (V::Int(i), T::Float8) => E::Float8(*i as f64),
        (V::Float(f), T::Float8) => E::Float8(*f),
        (V::Text(s), T::Float8) => E::Float8(parse_float(s)?),
        (V::Int(i), T::Float4) => E::Float4(*i as f32),
        (V::Float(f), T::Float4) => E::Float4(narrow(*f)?),
        (V::Text(s), T::Float4) => E::Float4(narrow(parse_float(s)?)?),

        (V::Int(i), T::Numeric) => E::Numeric(numeric(&i.to_string())?),
        (V::Float(f), T::Numeric) => E::Numeric(numeric(&float_text(*f))?),
        (V::Text(s), T::Numeric) => E::Numeric(numeric(s)?),

        (V::Text(s), T::TextLike | T::Json) => E::Text(s),
        (V::Text(s), T::Jsonb) => E::Jsonb(s.clone()),
        // Written out the way PostgreSQL's own casts to text would.
        (V::Int(i), T::TextLike | T::Json) => E::Owned(i.to_string()),
        (V::Bool(b), T::TextLike | T::Json) => E::Owned(b.to_string()),
        (V::Float(f), T::TextLike) => E::Owned(float_text(*f)),
        (V::Float(f), T::Json) => E::Owned(json_number(*f)?),
        (V::Int(i), T::Jsonb) => E::Jsonb(i.to_string()),
        (V::Bool(b), T::Jsonb) => E::Jsonb(b.to_string()),
        (V::Float(f), T::Jsonb) => E::Jsonb(json_number(*f)?),

        (V::Blob(b), T::Bytea) => E::Bytes(b),

        (V::Text(s), T::Uuid) => {
            E::Uuid(Uuid::parse_str(s.trim()).map_err(|_| Mismatch::Value("not a UUID"))?)
        }
        (V::Text(s), T::Timestamptz) => E::Timestamptz(parse_timestamptz(s)?),
        (V::Text(s), T::Timestamp) => E::Timestamp(parse_timestamp(s)?),
        (V::Text(s), T::Date) => E::Date(
            NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
                .map_err(|_| Mismatch::Value("not a date: expected YYYY-MM-DD"))?,
        ),
        (V::Text(s), T::Time) => E::Time(parse_time(s)?),

        _ => return Err(Mismatch::Kind),
    })
}

fn int_in_range<T: TryFrom<i64>>(i: i64) -> Result<T, Mismatch> {
    T::try_from(i).map_err(|_| Mismatch::Value("out of range"))
}

fn whole(f: f64) -> Result<i64, Mismatch> {
    // i64::MAX as f64 rounds up to 2^63, which does not fit.
    if f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64 {
        Ok(f as i64)
    } else {
        Err(Mismatch::Value("not a whole number in range"))
    }
}

fn narrow(f: f64) -> Result<f32, Mismatch> {
    let n = f as f32;
    if n.is_infinite() && f.is_finite() {
        Err(Mismatch::Value("out of range for real"))
    } else {
        Ok(n)
    }
}

fn parse_int(s: &str) -> Result<i64, Mismatch> {
    s.trim()
        .parse()
        .map_err(|_| Mismatch::Value("not an integer"))
}

fn parse_float(s: &str) -> Result<f64, Mismatch> {
    s.trim()
        .parse()
        .map_err(|_| Mismatch::Value("not a number"))
}

/// PostgreSQL's boolean input words.
fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Like PostgreSQL's float8 output: the shortest text that reads back as the
/// same number, with an exponent when very large or small, and `Infinity`,
/// `-Infinity`, `NaN`.
fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if f != 0.0 && !(1e-4..1e15).contains(&f.abs()) {
        format!("{f:e}")
    } else {
        f.to_string()
    }
}

fn json_number(f: f64) -> Result<String, Mismatch> {
    if f.is_finite() {
        Ok(float_text(f))
    } else {
        Err(Mismatch::Value("JSON has no NaN or infinity"))
    }
}

/// RFC 3339 (`T` or a space between date and time; `Z`, `+01:00` or
/// `+01`), or a date and time with no offset, taken as UTC.
fn parse_timestamptz(s: &str) -> Result<DateTime<Utc>, Mismatch> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    parse_timestamp(s)
        .map(|t| t.and_utc())
        .map_err(|_| Mismatch::Value("not an RFC 3339 timestamp"))
}

/// `YYYY-MM-DD[T| ]HH:MM[:SS[.fff]]`, or a date alone (midnight).
fn parse_timestamp(s: &str) -> Result<NaiveDateTime, Mismatch> {
    let s = s.trim();
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(t);
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_time(NaiveTime::MIN))
        .map_err(|_| Mismatch::Value("not an ISO 8601 timestamp"))
}

fn parse_time(s: &str) -> Result<NaiveTime, Mismatch> {
    let s = s.trim();
    NaiveTime::parse_from_str(s, "%H:%M:%S%.f")
        .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M"))
        .map_err(|_| Mismatch::Value("not a time: expected HH:MM[:SS[.ffffff]]"))
}

/// Largest display scale PostgreSQL accepts in a binary NUMERIC.
const NUMERIC_DSCALE_MAX: i64 = 0x3FFF;

/// PostgreSQL's binary NUMERIC for a decimal number in text (`-12.50`,
/// `1e-3`, `NaN`, `Infinity`): base-10000 digit groups with a weight (the
/// power of 10000 of the first group), a sign and a display scale (digits
/// after the point). The inverse of `numeric_to_string` in postgres.rs.
fn numeric(text: &str) -> Result<Vec<u8>, Mismatch> {
    const NOT_A_NUMBER: Mismatch = Mismatch::Value("not a decimal number");
    let header = |ndigits: u16, weight: i16, sign: u16, dscale: u16| {
        let mut b = Vec::with_capacity(8 + 2 * usize::from(ndigits));
        for w in [ndigits, weight as u16, sign, dscale] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        b
    };
    let s = text.trim();
    match s.to_ascii_lowercase().as_str() {
        "nan" => return Ok(header(0, 0, 0xC000, 0)),
        "infinity" | "+infinity" | "inf" | "+inf" => return Ok(header(0, 0, 0xD000, 0)),
        "-infinity" | "-inf" => return Ok(header(0, 0, 0xF000, 0)),
        _ => {}
    }
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(at) => (
            &s[..at],
            s[at + 1..].parse::<i32>().map_err(|_| NOT_A_NUMBER)?,
        ),
        None => (s, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |p: &str| p.bytes().all(|c| c.is_ascii_digit());
    if int_part.len() + frac_part.len() == 0 || !all_digits(int_part) || !all_digits(frac_part) {
        return Err(NOT_A_NUMBER);
    }
    let exponent = i64::from(exponent);
    let dscale = (frac_part.len() as i64 - exponent).max(0);
    if dscale > NUMERIC_DSCALE_MAX {
        return Err(Mismatch::Value("too many digits after the decimal point"));
    }
    // Digit k of int_part+frac_part is worth 10^(point - 1 - k).
    let point = int_part.len() as i64 + exponent;
    let digits: Vec<u16> = int_part
        .bytes()
        .chain(frac_part.bytes())
        .map(|c| u16::from(c - b'0'))
        .collect();
    let power = |k: usize| point - 1 - k as i64;
    let (Some(first), Some(last)) = (
        digits.iter().position(|&d| d != 0),
        digits.iter().rposition(|&d| d != 0),
    ) else {
        return Ok(header(0, 0, 0, dscale as u16));
    };
    let weight = power(first).div_euclid(4);
    let lowest = power(last).div_euclid(4);
    let weight16 = i16::try_from(weight).map_err(|_| Mismatch::Value("out of range"))?;
    if i16::try_from(lowest).is_err() {
        return Err(Mismatch::Value("out of range"));
    }
    let ndigits = (weight - lowest + 1) as usize;
    let mut groups = vec![0u16; ndigits];
    for (k, &d) in digits.iter().enumerate().take(last + 1).skip(first) {
        let p = power(k);
        groups[(weight - p.div_euclid(4)) as usize] += d * 10u16.pow(p.rem_euclid(4) as u32);
    }
    let ndigits = u16::try_from(ndigits).map_err(|_| Mismatch::Value("out of range"))?;
    let sign = if negative { 0x4000 } else { 0 };
    let mut b = header(ndigits, weight16, sign, dscale as u16);
    for g in groups {
        b.extend_from_slice(&g.to_be_bytes());
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::numeric_to_string;

    fn round_trip(s: &str) -> String {
        let Ok(b) = numeric(s) else {
            panic!("{s} did not encode")
        };
        numeric_to_string(&b).unwrap()
    }

    #[test]
    fn numeric_round_trips_through_the_decoder() {
        for (input, printed) in [
            ("0", "0"),
            ("-0", "0"),
            ("0.00", "0.00"),
            ("1", "1"),
            ("-1", "-1"),
            ("12345.6789", "12345.6789"),
            ("-0.0012", "-0.0012"),
            ("0.00000001", "0.00000001"),
            ("1000000", "1000000"),
            ("10000", "10000"),
            ("9999.9999", "9999.9999"),
            ("123.45000", "123.45000"),
            ("+7.5", "7.5"),
            ("1e3", "1000"),
            ("1.5E-3", "0.0015"),
            ("12e-1", "1.2"),
            (".5", "0.5"),
            ("5.", "5"),
            ("  42 ", "42"),
            ("9223372036854775807", "9223372036854775807"),
            ("-9223372036854775808", "-9223372036854775808"),
            (
                "123456789012345678901234567890.123456789",
                "123456789012345678901234567890.123456789",
            ),
            ("NaN", "NaN"),
            ("Infinity", "Infinity"),
            ("-Infinity", "-Infinity"),
        ] {
            assert_eq!(round_trip(input), printed, "{input}");
        }
    }

    #[test]
    fn numeric_groups_are_postgres_layout() {
        // 12345.6789 = [1, 2345, 6789] at weight 1, dscale 4.
        let b = numeric("12345.6789").ok().unwrap();
        let words: Vec<u16> = b
            .chunks(2)
            .map(|w| u16::from_be_bytes([w[0], w[1]]))
            .collect();
        assert_eq!(words, [3, 1, 0, 4, 1, 2345, 6789]);
        // 1000000 = [100] at weight 1: trailing zero groups are left out.
        let b = numeric("1000000").ok().unwrap();
        assert_eq!(&b[..8], &[0, 1, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn numeric_rejects_what_is_not_a_number() {
        for bad in [
            "",
            "-",
            ".",
            "abc",
            "1.2.3",
            "1e",
            "1e99999999999",
            "0x10",
            "1,5",
        ] {
            assert!(numeric(bad).is_err(), "{bad:?} should not encode");
        }
    }

    /// The type as a statement would carry it (resolved, with its name);
    /// by bare OID for the few without a Rust type here (json, jsonb,
    /// numeric), whose names the tests do not look at.
    fn ty(oid: u32) -> PgTypeInfo {
        fn of<T: sqlx::Type<Postgres>>() -> PgTypeInfo {
            T::type_info()
        }
        match oid {
            16 => of::<bool>(),
            17 => of::<Vec<u8>>(),
            20 => of::<i64>(),
            21 => of::<i16>(),
            23 => of::<i32>(),
            25 => of::<String>(),
            700 => of::<f32>(),
            701 => of::<f64>(),
            1082 => of::<NaiveDate>(),
            1083 => of::<NaiveTime>(),
            1114 => of::<NaiveDateTime>(),
            1184 => of::<DateTime<Utc>>(),
            2950 => of::<Uuid>(),
            _ => PgTypeInfo::with_oid(Oid(oid)),
        }
    }

    fn error(oid: u32, v: SqlValue) -> String {
        match convert(&[ty(23), ty(oid)], &[SqlValue::Int(1), v]) {
            Err(e) => e.to_string(),
            Ok(p) => panic!("converted: {p:?}"),
        }
    }

    #[test]
    fn mismatches_name_parameter_kind_and_type() {
        let e = error(23, SqlValue::Text("abc".into()));
        assert!(
            e.starts_with(r#"parameter $2: cannot bind text "abc" to a parameter of type integer"#),
            "{e}"
        );
        let e = error(21, SqlValue::Int(70000));
        assert!(
            e.contains("int 70000") && e.contains("smallint") && e.contains("out of range"),
            "{e}"
        );
        let e = error(17, SqlValue::Text("x".into()));
        assert!(e.contains("type bytea") && e.contains("pass a blob"), "{e}");
        let e = error(16, SqlValue::Int(1));
        assert!(e.contains("int 1 to a parameter of type boolean"), "{e}");
        let interval = <sqlx::postgres::types::PgInterval as sqlx::Type<Postgres>>::type_info();
        let e = match convert(&[interval], &[SqlValue::Text("1 day".into())]) {
            Err(e) => e.to_string(),
            Ok(p) => panic!("converted: {p:?}"),
        };
        assert!(
            e.contains("interval") && e.contains("$1::text::interval"),
            "{e}"
        );
        let long = "x".repeat(100);
        let e = error(2950, SqlValue::Text(long));
        assert!(e.contains(&format!("{:?}...", "x".repeat(40))), "{e}");
    }

    /// Messages name a type the same whichever client described it.
    #[test]
    fn tokio_postgres_types_are_named_as_sqlx_names_them() {
        fn of<T: sqlx::Type<Postgres>>() -> PgTypeInfo {
            T::type_info()
        }
        for (tokio, sqlx) in [
            (pg::Type::INT4, of::<i32>()),
            (pg::Type::INT4_ARRAY, of::<Vec<i32>>()),
            (pg::Type::TEXT_ARRAY, of::<Vec<String>>()),
            (pg::Type::BYTEA, of::<Vec<u8>>()),
            (pg::Type::TIMESTAMPTZ, of::<DateTime<Utc>>()),
            (pg::Type::UUID_ARRAY, of::<Vec<Uuid>>()),
            (
                pg::Type::INTERVAL,
                of::<sqlx::postgres::types::PgInterval>(),
            ),
            (pg::Type::CHAR, of::<i8>()),
        ] {
            assert_eq!(tokio.shown_name(), sqlx.shown_name(), "{tokio}");
        }
        assert_eq!(pg::Type::BPCHAR.shown_name(), "CHAR");
        let custom = |name: &str, schema: &str| {
            pg::Type::new(name.into(), 40000, pg::Kind::Enum(vec![]), schema.into())
        };
        assert_eq!(custom("mood", "public").shown_name(), "mood");
        assert_eq!(custom("mood", "app").shown_name(), "app.mood");
        assert_eq!(custom("Mood", "My App").shown_name(), r#""My App"."Mood""#);
        let array = pg::Type::new(
            "_mood".into(),
            40001,
            pg::Kind::Array(custom("mood", "app")),
            "app".into(),
        );
        assert_eq!(array.shown_name(), "app.mood[]");
    }

    #[test]
    fn counts_must_match() {
        let e = convert(&[ty(23)], &[]).unwrap_err().to_string();
        assert!(e.contains("1 parameter") && e.contains("0 value"), "{e}");
    }

    #[test]
    fn converts_across_kinds() {
        let one = |oid: u32, v: SqlValue| {
            let v = [v];
            match convert(&[ty(oid)], &v) {
                Ok(mut p) => format!("{:?}", p.remove(0).value),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(one(20, SqlValue::Float(3.0)), "Int8(3)");
        assert_eq!(one(21, SqlValue::Text(" 12 ".into())), "Int2(12)");
        assert_eq!(one(701, SqlValue::Int(2)), "Float8(2.0)");
        assert_eq!(one(16, SqlValue::Text("yes".into())), "Bool(true)");
        assert_eq!(one(25, SqlValue::Int(5)), r#"Owned("5")"#);
        assert_eq!(one(25, SqlValue::Float(f64::NAN)), r#"Owned("NaN")"#);
        assert_eq!(one(25, SqlValue::Float(2.0)), r#"Owned("2")"#);
        assert_eq!(one(25, SqlValue::Float(1e300)), r#"Owned("1e300")"#);
        assert_eq!(one(25, SqlValue::Float(-1.5e-7)), r#"Owned("-1.5e-7")"#);
        assert_eq!(one(3802, SqlValue::Bool(true)), r#"Jsonb("true")"#);
        assert_eq!(
            one(1184, SqlValue::Text("2024-05-01 12:00:00+02".into())),
            "Timestamptz(2024-05-01T10:00:00Z)"
        );
        assert_eq!(
            one(1114, SqlValue::Text("2024-05-01".into())),
            "Timestamp(2024-05-01T00:00:00)"
        );
        assert_eq!(one(1083, SqlValue::Text("07:30".into())), "Time(07:30:00)");
        assert!(matches!(
            convert(&[ty(20)], &[SqlValue::Float(2.5)]),
            Err(StoreError::Param { index: 1, .. })
        ));
        assert!(convert(&[ty(700)], &[SqlValue::Float(1e300)]).is_err());
        assert!(convert(&[ty(114)], &[SqlValue::Float(f64::INFINITY)]).is_err());
    }
}
