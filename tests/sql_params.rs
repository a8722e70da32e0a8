//! The `sql` capability's parameters and errors, through the public store
//! API (`Store::begin` → `AckTx::execute/query`) and through the real
//! binary running the probe guest, on SQLite and PostgreSQL:
//!
//! - a statement runs with any kind of value in any order of calls (the
//!   PostgreSQL statement cache once kept the types of the first call);
//! - every value kind binds into the column types it should, and a value
//!   that cannot is an error naming the parameter, the kind and the type;
//! - connection loss, deadlocks and busy databases are transient (the event
//!   is retried), statement errors are not.

mod common;

use std::time::Duration;

use common::{Serve, TestDb, guest, wait_for};
use outrun::NewEvent;
use outrun::store::{AckTx, SqlValue, StoreError};
use serde_json::json;

use SqlValue::{Blob, Bool, Float, Int, Null, Text};

fn text(s: &str) -> SqlValue {
    Text(s.to_owned())
}

async fn exec(tx: &mut AckTx, sql: &str, params: &[SqlValue]) -> u64 {
    tx.execute(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql} with {params:?}: {e}"))
}

async fn rows(tx: &mut AckTx, sql: &str, params: &[SqlValue]) -> Vec<Vec<SqlValue>> {
    tx.query(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql} with {params:?}: {e}"))
        .rows
}

crate::on_both_backends!(
    null_then_value_on_one_transaction,
    value_kinds_into_column_types,
    statement_errors_are_not_transient,
    probe_alternating_nulls_all_land,
);

/// The bug of issue 9: on PostgreSQL the first call's NULL (bound untyped)
/// let the server type `$2` as int4 in the cached statement, and the next
/// call's int (int8) failed with "incorrect binary data format in bind
/// parameter 2". Both orders, statements and queries, one transaction.
async fn null_then_value_on_one_transaction(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE t (k INTEGER, g INTEGER)").await;
    let mut tx = store.begin().await.unwrap();
    let insert = "INSERT INTO t (k, g) VALUES ($1, $2)";
    for i in 0..40 {
        let g = if i % 2 == 0 { Null } else { Int(i) };
        exec(&mut tx, insert, &[Int(i), g]).await;
    }
    // Value first, then NULL.
    for i in 40..80 {
        let g = if i % 2 == 0 { Int(i) } else { Null };
        exec(&mut tx, insert, &[Int(i), g]).await;
    }
    let count = "SELECT count(*) AS n FROM t WHERE g IS NOT DISTINCT FROM $1";
    for (g, n) in [(Null, 40), (Int(1), 1), (Null, 40), (Int(40), 1)] {
        assert_eq!(
            rows(&mut tx, count, std::slice::from_ref(&g)).await,
            [[Int(n)]],
            "{g:?}"
        );
    }
    assert_eq!(
        rows(&mut tx, "SELECT count(*) FROM t", &[]).await,
        [[Int(80)]]
    );
    if db.is_postgres() {
        // One server-side statement ran all 80 calls: prepared once, never
        // again for another kind of value.
        let prepared = "SELECT count(*), sum(generic_plans + custom_plans)::bigint
                        FROM pg_prepared_statements WHERE statement = $1";
        assert_eq!(
            rows(&mut tx, prepared, &[text(insert)]).await,
            [[Int(1), Int(80)]]
        );
    }
    tx.rollback().await.unwrap();
}

/// One row per case: the value goes into one column of a fresh row (the
/// same statement text per column, so each column's statement sees every
/// kind in turn), then is read back.
async fn round_trip(
    tx: &mut AckTx,
    table: &str,
    cases: &[(&str, SqlValue, SqlValue)],
) -> Vec<String> {
    let mut wrong = Vec::new();
    for (id, (column, value, expected)) in cases.iter().enumerate() {
        let id = Int(id as i64);
        let insert = format!("INSERT INTO {table} (id, {column}) VALUES ($1, $2)");
        if let Err(e) = tx.execute(&insert, &[id.clone(), value.clone()]).await {
            wrong.push(format!("{column} <- {value:?}: {e}"));
            continue;
        }
        let select = format!("SELECT {column} FROM {table} WHERE id = $1");
        let got = rows(tx, &select, &[id]).await;
        if got != [[expected.clone()]] {
            wrong.push(format!(
                "{column} <- {value:?}: read back {got:?}, expected {expected:?}"
            ));
        }
    }
    wrong
}

async fn value_kinds_into_column_types(db: TestDb) {
    let store = db.store().await;
    let mut tx = store.begin().await.unwrap();
    let wrong = if db.is_postgres() {
        pg_kinds(&mut tx).await
    } else {
        sqlite_kinds(&mut tx).await
    };
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    tx.rollback().await.unwrap();
}

async fn pg_kinds(tx: &mut AckTx) -> Vec<String> {
    exec(
        tx,
        "CREATE DOMAIN positive AS integer CHECK (VALUE > 0)",
        &[],
    )
    .await;
    exec(tx, "CREATE TYPE mood AS ENUM ('ok', 'sad')", &[]).await;
    exec(
        tx,
        "CREATE TABLE kinds (id bigint PRIMARY KEY, i2 smallint, i4 integer, i8 bigint,
             n numeric, n2 numeric(10, 2), f4 real, f8 double precision, t text, vc varchar(20),
             ch char(5), u uuid, j json, jb jsonb, tz timestamptz, ts timestamp, d date,
             tm time, by bytea, bo boolean, pos positive, m mood)",
        &[],
    )
    .await;
    let uuid = "0191e0b2-57a0-7000-8000-000000000001";
    let mut cases = vec![
        ("i2", Int(-7), Int(-7)),
        ("i2", Float(8.0), Int(8)),
        ("i2", text("9"), Int(9)),
        ("i4", Int(-70_000), Int(-70_000)),
        ("i4", Float(2.0), Int(2)),
        ("i4", text("42"), Int(42)),
        ("i8", Int(i64::MAX), Int(i64::MAX)),
        ("i8", Int(i64::MIN), Int(i64::MIN)),
        ("i8", Float(-3.0), Int(-3)),
        ("i8", text(" 5 "), Int(5)),
        ("n", Int(12), text("12")),
        ("n", Int(i64::MIN), text("-9223372036854775808")),
        ("n", Float(2.5), text("2.5")),
        ("n", Float(0.1), text("0.1")),
        ("n", Float(1.5e-7), text("0.00000015")),
        ("n", Float(2e20), text("200000000000000000000")),
        ("n", text("12345.6789"), text("12345.6789")),
        ("n", text("-1e-3"), text("-0.001")),
        (
            "n",
            text("100000000000000000000.5"),
            text("100000000000000000000.5"),
        ),
        ("n", text("0.00"), text("0.00")),
        ("n", text("NaN"), text("NaN")),
        // The column's scale applies, as for any value assigned to it.
        ("n2", text("1.005"), text("1.01")),
        ("n2", Int(3), text("3.00")),
        ("f4", Float(1.5), Float(1.5)),
        ("f4", Int(3), Float(3.0)),
        ("f4", text("0.25"), Float(0.25)),
        ("f8", Float(0.1), Float(0.1)),
        ("f8", Int(-2), Float(-2.0)),
        ("f8", text("1e10"), Float(1e10)),
        ("t", text("héllo"), text("héllo")),
        ("t", Int(5), text("5")),
        ("t", Float(1.5), text("1.5")),
        ("t", Float(1e300), text("1e300")),
        ("t", Bool(true), text("true")),
        ("vc", text("v"), text("v")),
        ("vc", Int(6), text("6")),
        ("ch", text("ab"), text("ab   ")),
        ("u", text(uuid), text(uuid)),
        ("u", text(&uuid.to_uppercase()), text(uuid)),
        ("j", text(r#"{"a" : 1}"#), text(r#"{"a" : 1}"#)),
        ("j", Int(5), text("5")),
        ("j", Bool(false), text("false")),
        ("jb", text(r#"{"a":1}"#), text(r#"{"a": 1}"#)),
        ("jb", Float(1.5), text("1.5")),
        ("jb", text(r#""s""#), text(r#""s""#)),
        (
            "tz",
            text("2024-05-01T12:00:00+02:00"),
            text("2024-05-01T10:00:00+00:00"),
        ),
        (
            "tz",
            text("2024-05-01 12:00:00Z"),
            text("2024-05-01T12:00:00+00:00"),
        ),
        (
            "tz",
            text("2024-05-01 12:00:00.5+00"),
            text("2024-05-01T12:00:00.500+00:00"),
        ),
        (
            "tz",
            text("2024-05-01T12:00:00"),
            text("2024-05-01T12:00:00+00:00"),
        ),
        (
            "ts",
            text("2024-05-01T12:00:00"),
            text("2024-05-01T12:00:00"),
        ),
        (
            "ts",
            text("2024-05-01 12:00:00.25"),
            text("2024-05-01T12:00:00.250"),
        ),
        ("ts", text("2024-05-01"), text("2024-05-01T00:00:00")),
        ("d", text("2024-05-01"), text("2024-05-01")),
        ("tm", text("07:30"), text("07:30:00")),
        ("tm", text("23:59:59.5"), text("23:59:59.500")),
        ("by", Blob(vec![0, 1, 255]), Blob(vec![0, 1, 255])),
        ("by", Blob(vec![]), Blob(vec![])),
        ("bo", Bool(true), Bool(true)),
        ("bo", text("f"), Bool(false)),
        ("pos", Int(3), Int(3)),
        ("m", text("sad"), text("sad")),
    ];
    for column in [
        "i2", "i4", "i8", "n", "f4", "f8", "t", "vc", "ch", "u", "j", "jb", "tz", "ts", "d", "tm",
        "by", "bo", "pos", "m",
    ] {
        cases.push((column, Null, Null));
    }
    round_trip(tx, "kinds", &cases).await
}

/// SQLite stores what it is given, converted only by the column's affinity:
/// these are the storage classes that result (`typeof`), documented in the
/// README.
async fn sqlite_kinds(tx: &mut AckTx) -> Vec<String> {
    exec(
        tx,
        "CREATE TABLE kinds (id INTEGER PRIMARY KEY, i INTEGER, r REAL, t TEXT, b BLOB, n NUMERIC)",
        &[],
    )
    .await;
    let mut wrong = Vec::new();
    // (value, what INTEGER, REAL, TEXT, BLOB (no affinity) and NUMERIC
    // columns store), as (typeof, value).
    let table: Vec<(SqlValue, [(&str, SqlValue); 5])> = vec![
        (
            Int(5),
            [
                ("integer", Int(5)),
                ("real", Float(5.0)),
                ("text", text("5")),
                ("integer", Int(5)),
                ("integer", Int(5)),
            ],
        ),
        (
            Float(2.0),
            [
                ("integer", Int(2)),
                ("real", Float(2.0)),
                ("text", text("2.0")),
                ("real", Float(2.0)),
                ("integer", Int(2)),
            ],
        ),
        (
            Float(2.5),
            [
                ("real", Float(2.5)),
                ("real", Float(2.5)),
                ("text", text("2.5")),
                ("real", Float(2.5)),
                ("real", Float(2.5)),
            ],
        ),
        (
            text("42"),
            [
                ("integer", Int(42)),
                ("real", Float(42.0)),
                ("text", text("42")),
                ("text", text("42")),
                ("integer", Int(42)),
            ],
        ),
        (
            text("abc"),
            [
                ("text", text("abc")),
                ("text", text("abc")),
                ("text", text("abc")),
                ("text", text("abc")),
                ("text", text("abc")),
            ],
        ),
        (
            Bool(true),
            [
                ("integer", Int(1)),
                ("real", Float(1.0)),
                ("text", text("1")),
                ("integer", Int(1)),
                ("integer", Int(1)),
            ],
        ),
        (
            Blob(vec![1, 2]),
            [
                ("blob", Blob(vec![1, 2])),
                ("blob", Blob(vec![1, 2])),
                ("blob", Blob(vec![1, 2])),
                ("blob", Blob(vec![1, 2])),
                ("blob", Blob(vec![1, 2])),
            ],
        ),
        (
            Null,
            [
                ("null", Null),
                ("null", Null),
                ("null", Null),
                ("null", Null),
                ("null", Null),
            ],
        ),
    ];
    let mut id = 0;
    for (value, stored) in &table {
        for (column, (class, expected)) in ["i", "r", "t", "b", "n"].into_iter().zip(stored) {
            id += 1;
            let insert = format!("INSERT INTO kinds (id, {column}) VALUES ($1, $2)");
            exec(tx, &insert, &[Int(id), value.clone()]).await;
            let select = format!("SELECT typeof({column}), {column} FROM kinds WHERE id = $1");
            let got = rows(tx, &select, &[Int(id)]).await;
            let want = [[text(class), expected.clone()]];
            if got != want {
                wrong.push(format!(
                    "{column} <- {value:?}: stored {got:?}, expected {want:?}"
                ));
            }
        }
    }
    wrong
}

/// The error of a statement expected to fail, checked to be a
/// statement/argument error (`invalid` in the capability), never transient.
async fn fails(tx: &mut AckTx, sql: &str, params: &[SqlValue]) -> StoreError {
    let Err(e) = tx.execute(sql, params).await else {
        panic!("{sql} with {params:?} should fail")
    };
    assert!(
        !e.is_transient(),
        "{sql} with {params:?}: {e} is not transient"
    );
    e
}

async fn statement_errors_are_not_transient(db: TestDb) {
    let store = db.store().await;
    if db.is_postgres() {
        pg_wrong_kinds(&db, &store).await;
    } else {
        sqlite_statement_errors(&store).await;
    }
}

async fn pg_wrong_kinds(db: &TestDb, store: &outrun::Store) {
    db.exec(
        "CREATE TABLE kinds (id bigint PRIMARY KEY, i2 smallint, i4 integer, i8 bigint,
             n numeric, f4 real, f8 double precision, t text, u uuid, j json, jb jsonb,
             tz timestamptz, ts timestamp, d date, tm time, by bytea, bo boolean,
             span interval, CHECK (i4 IS NULL OR i4 >= 0))",
    )
    .await;
    let mut tx = store.begin().await.unwrap();
    let cases = [
        ("i4", text("abc"), r#"text "abc""#, "integer"),
        ("i4", Blob(vec![1]), "blob of 1 byte", "integer"),
        ("i4", Bool(true), "boolean true", "integer"),
        ("i2", Int(70_000), "int 70000", "smallint"),
        ("i8", Float(2.5), "float 2.5", "bigint"),
        ("i8", text("1.5"), r#"text "1.5""#, "bigint"),
        ("n", text("1,5"), r#"text "1,5""#, "numeric"),
        ("n", Bool(false), "boolean false", "numeric"),
        ("f4", Float(1e300), "float 1e300", "real"),
        ("f8", text("x"), r#"text "x""#, "double precision"),
        ("t", Blob(vec![1, 2]), "blob of 2 bytes", "text"),
        ("u", text("not-a-uuid"), r#"text "not-a-uuid""#, "uuid"),
        ("u", Int(1), "int 1", "uuid"),
        ("j", Blob(vec![]), "blob of 0 bytes", "json"),
        ("jb", Float(f64::NAN), "float NaN", "jsonb"),
        (
            "tz",
            text("yesterday"),
            r#"text "yesterday""#,
            "timestamp with time zone",
        ),
        ("tz", Int(0), "int 0", "timestamp with time zone"),
        (
            "ts",
            text("2024-13-01"),
            r#"text "2024-13-01""#,
            "timestamp without time zone",
        ),
        ("d", text("May 1"), r#"text "May 1""#, "date"),
        (
            "tm",
            text("25:00"),
            r#"text "25:00""#,
            "time without time zone",
        ),
        ("by", text("x"), r#"text "x""#, "bytea"),
        ("bo", Int(1), "int 1", "boolean"),
        ("bo", text("maybe"), r#"text "maybe""#, "boolean"),
        ("span", text("1 day"), r#"text "1 day""#, "interval"),
    ];
    for (column, value, kind, type_name) in cases {
        let sql = format!("INSERT INTO kinds (id, {column}) VALUES ($1, $2)");
        let e = fails(&mut tx, &sql, &[Int(1), value]).await;
        let message = e.to_string();
        let expected =
            format!("parameter $2: cannot bind {kind} to a parameter of type {type_name}");
        assert!(
            matches!(e, StoreError::Param { index: 2, .. }) && message.starts_with(&expected),
            "{column}: got {message:?}, expected it to start with {expected:?}"
        );
    }
    let e = fails(
        &mut tx,
        "INSERT INTO kinds (id, span) VALUES ($1, $2)",
        &[Int(1), text("1 day")],
    )
    .await;
    assert!(
        e.to_string().contains("`$2::text::interval`"),
        "the fix is named: {e}"
    );

    // Caught before anything reached the server: the transaction goes on.
    exec(
        &mut tx,
        "INSERT INTO kinds (id, i4) VALUES ($1, $2)",
        &[Int(1), text("7")],
    )
    .await;
    let e = fails(
        &mut tx,
        "INSERT INTO kinds (id) VALUES ($1)",
        &[Int(2), Int(3)],
    )
    .await;
    assert!(
        matches!(
            e,
            StoreError::ParamCount {
                expected: 1,
                given: 2
            }
        ),
        "{e}"
    );
    let e = fails(&mut tx, "SELECT $1 IS NULL", &[Int(1)]).await;
    assert!(
        matches!(e, StoreError::Param { index: 1, .. }) && e.to_string().contains("$1::bigint"),
        "{e}"
    );
    tx.rollback().await.unwrap();

    // Errors the server reports: each aborts its transaction, so one each.
    for (sql, params, sqlstate) in [
        (
            "INSERT INTO kinds (id, j) VALUES ($1, $2)",
            vec![Int(1), text("{not json")],
            "22P02",
        ),
        (
            "INSERT INTO kinds (id, i4) VALUES ($1, $2)",
            vec![Int(1), Int(-1)],
            "23514",
        ),
        (
            "INSERT INTO no_such_table VALUES ($1)",
            vec![Int(1)],
            "42P01",
        ),
        (
            "INSERT INTO kinds (id) VALUES ($1), ($1)",
            vec![Int(1)],
            "23505",
        ),
        ("SELEC 1", vec![], "42601"),
    ] {
        let mut tx = store.begin().await.unwrap();
        let e = fails(&mut tx, sql, &params).await;
        assert_eq!(e.sqlstate().as_deref(), Some(sqlstate), "{sql}: {e}");
        tx.rollback().await.unwrap();
    }
}

async fn sqlite_statement_errors(store: &outrun::Store) {
    let mut tx = store.begin().await.unwrap();
    // A STRICT table is where SQLite checks kinds: a value that does not
    // fit the column is SQLITE_CONSTRAINT_DATATYPE (3091).
    exec(
        &mut tx,
        "CREATE TABLE s (id INTEGER PRIMARY KEY, i INTEGER, t TEXT) STRICT",
        &[],
    )
    .await;
    let e = fails(
        &mut tx,
        "INSERT INTO s (id, i) VALUES ($1, $2)",
        &[Int(1), text("abc")],
    )
    .await;
    assert_eq!(e.sqlstate().as_deref(), Some("3091"), "{e}");
    assert!(
        e.to_string()
            .contains("cannot store TEXT value in INTEGER column"),
        "{e}"
    );
    let e = fails(
        &mut tx,
        "INSERT INTO s (id, t) VALUES ($1, $2)",
        &[Int(1), Blob(vec![1])],
    )
    .await;
    assert_eq!(e.sqlstate().as_deref(), Some("3091"), "{e}");
    // Affinity still converts what converts losslessly.
    exec(
        &mut tx,
        "INSERT INTO s (id, i) VALUES ($1, $2)",
        &[Int(1), text("42")],
    )
    .await;
    assert_eq!(rows(&mut tx, "SELECT i FROM s", &[]).await, [[Int(42)]]);
    let e = fails(&mut tx, "INSERT INTO s (id) VALUES ($1)", &[Int(1)]).await;
    assert_eq!(e.sqlstate().as_deref(), Some("1555"), "primary key: {e}");
    let e = fails(&mut tx, "INSERT INTO no_such_table VALUES ($1)", &[Int(1)]).await;
    assert_eq!(e.sqlstate().as_deref(), Some("1"), "{e}");
    // sqlx binds by `?`, `?N` or `$N` only.
    fails(&mut tx, "SELECT :name", &[Int(1)]).await;
    // SQLite keeps going after a failed statement.
    exec(
        &mut tx,
        "INSERT INTO s (id, i) VALUES ($1, $2)",
        &[Int(2), Int(2)],
    )
    .await;
    tx.rollback().await.unwrap();
}

// ------------------------------------------------------------ transient

/// `pg_terminate_backend` on the connection of an open transaction: the
/// next statement fails, and the failure is transient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_terminated_backend_is_transient() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    db.exec("CREATE TABLE t (k integer)").await;
    let mut tx = store.begin().await.unwrap();
    exec(&mut tx, "INSERT INTO t (k) VALUES ($1)", &[Int(1)]).await;
    let pid = rows(&mut tx, "SELECT pg_backend_pid()", &[]).await;
    let [Int(pid)] = pid[0][..] else {
        panic!("no backend pid: {pid:?}")
    };
    db.exec(&format!("SELECT pg_terminate_backend({pid}, 5000)"))
        .await;
    let e = tx
        .execute("INSERT INTO t (k) VALUES ($1)", &[Int(2)])
        .await
        .expect_err("the connection was terminated");
    // The server's goodbye (57P01) when it is still in the socket, an I/O
    // error when the kernel already dropped it with the connection.
    assert!(
        e.sqlstate().as_deref() == Some("57P01") || matches!(e, StoreError::Db(sqlx::Error::Io(_))),
        "{e:?}"
    );
    assert!(e.is_transient(), "{e:?}");
    drop(tx);
    assert_eq!(db.scalar("SELECT count(*) FROM t").await, 0);
}

/// Two transactions lock two rows in opposite orders: PostgreSQL kills one
/// with a deadlock (40P01), which is transient; the other goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_deadlock_is_transient() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    db.exec("CREATE TABLE t (k integer PRIMARY KEY, v integer)")
        .await;
    db.exec("INSERT INTO t VALUES (1, 0), (2, 0)").await;
    let update = "UPDATE t SET v = v + 1 WHERE k = $1";
    let mut a = store.begin().await.unwrap();
    let mut b = store.begin().await.unwrap();
    exec(&mut a, update, &[Int(1)]).await;
    exec(&mut b, update, &[Int(2)]).await;
    // Each rolls back as soon as its statement returns, so the loser's
    // locks go and the winner's statement completes.
    let second = |mut tx: AckTx, k: i64| async move {
        let r = tx.execute(update, &[Int(k)]).await;
        tx.rollback().await.ok();
        r
    };
    let (ra, rb) = tokio::join!(second(a, 2), second(b, 1));
    let (won, lost) = match (ra, rb) {
        (Ok(n), Err(e)) | (Err(e), Ok(n)) => (n, e),
        other => panic!("expected one deadlock victim, got {other:?}"),
    };
    assert_eq!(won, 1);
    assert_eq!(lost.sqlstate().as_deref(), Some("40P01"), "{lost}");
    assert!(lost.is_transient(), "{lost}");
}

/// A write while another connection holds SQLite's write lock fails with
/// SQLITE_BUSY once the busy timeout runs out: transient. (The store's own
/// connections wait 30 s, so the waiting side is a plain connection with a
/// short timeout; the lock is held by an ack transaction, which begins
/// IMMEDIATE.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_busy_is_transient() {
    use sqlx::ConnectOptions;
    let db = TestDb::sqlite();
    let store = db.store().await;
    db.exec("CREATE TABLE t (k INTEGER)").await;
    let mut tx = store.begin().await.unwrap();
    exec(&mut tx, "INSERT INTO t (k) VALUES ($1)", &[Int(1)]).await;
    let mut other = db
        .url()
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .unwrap()
        .busy_timeout(Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let e = StoreError::from(
        sqlx::query("INSERT INTO t (k) VALUES (2)")
            .execute(&mut other)
            .await
            .expect_err("the write lock is held"),
    );
    assert!(e.is_transient(), "{e}");
    assert_eq!(e.sqlstate().as_deref(), Some("5"), "SQLITE_BUSY: {e}");
    assert_eq!(e.code_label().as_deref(), Some("SQLite result code 5"));
    tx.rollback().await.unwrap();
}

// ------------------------------------------------------------ end to end

/// The real binary and the probe guest, one event at a time. Each event
/// runs the same statement twice, even events NULL first and then a value,
/// odd ones the other way round: whichever pool connection an event lands
/// on, a connection whose statement was first prepared for a NULL gets a
/// value (the pool hands out its connections in turn, so a NULL and a value
/// in alternate events alone could stay on separate connections). Every row
/// lands, no event dies or even retries.
async fn probe_alternating_nulls_all_land(db: TestDb) {
    let store = db.store().await;
    db.exec("CREATE TABLE t (k INTEGER, g INTEGER)").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nconcurrency = 1\n\n[[handler]]\nname = \"probe\"\nmodule = {:?}\nevents = [\"probe.sql\"]\n[handler.allow]\nsql = true\n",
            guest("probe")
        ),
    )
    .unwrap();
    let insert = "INSERT INTO t (k, g) VALUES ($1, $2)";
    let events: Vec<NewEvent> = (0..40)
        .map(|i| {
            let (first, second) = if i % 2 == 0 {
                (json!([i, null]), json!([i + 100, i]))
            } else {
                (json!([i, i]), json!([i + 100, null]))
            };
            let payload = json!({"execute": [
                {"sql": insert, "params": first},
                {"sql": insert, "params": second},
            ]});
            NewEvent::new("probe.sql", payload.to_string())
        })
        .collect();
    store.enqueue_batch(&events, 5).await.unwrap();
    let serve = Serve::ready(&db, &config).await;
    wait_for("all 40 probe.sql events handled or dead", || async {
        let s = store.stats().await.unwrap();
        s.pending + s.running + s.scheduled == 0
    })
    .await;
    let log = serve.stop();
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.dead, 0, "log:\n{log}");
    assert_eq!(db.scalar("SELECT count(*) FROM t").await, 80);
    assert_eq!(
        db.scalar("SELECT count(*) FROM t WHERE g IS NULL").await,
        40
    );
    assert!(!log.contains("event failed"), "no attempt failed:\n{log}");
}

/// The handler's own connection is terminated mid-attempt (the statement
/// kills its backend, once: the sequence is not transactional). The guest
/// gets `unavailable`, the SDK's `?` makes that a retryable error, and the
/// event succeeds on its second attempt instead of dying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_terminated_connection_retries_the_event() {
    let db = TestDb::postgres().await;
    let store = db.store().await;
    db.exec("CREATE SEQUENCE kills").await;
    db.exec("CREATE TABLE t (k integer)").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outrun.toml");
    std::fs::write(
        &config,
        format!(
            "[[handler]]\nname = \"probe\"\nmodule = {:?}\nevents = [\"probe.sql\"]\nmax_retry = 3\n[handler.allow]\nsql = true\n",
            guest("probe")
        ),
    )
    .unwrap();
    let payload = json!({"execute": [
        {"sql": "SELECT CASE WHEN nextval('kills') = 1 THEN pg_terminate_backend(pg_backend_pid()) END"},
        {"sql": "INSERT INTO t (k) VALUES ($1)", "params": [1]},
    ]});
    let id = store
        .enqueue(&NewEvent::new("probe.sql", payload.to_string()), 5)
        .await
        .unwrap();
    let serve = Serve::ready(&db, &config).await;
    wait_for("the event handled or dead", || async {
        let s = store.stats().await.unwrap();
        s.pending + s.running + s.scheduled == 0
    })
    .await;
    let log = serve.stop();
    assert!(
        store.get(id).await.unwrap().is_none(),
        "the event should have succeeded on its retry: {:?}\nlog:\n{log}",
        store.get(id).await.unwrap()
    );
    assert_eq!(db.scalar("SELECT count(*) FROM t").await, 1);
    assert_eq!(db.scalar("SELECT last_value FROM kills").await, 2);
    assert!(
        log.contains("57P01") && log.contains("transient database error"),
        "the transient error is logged with its SQLSTATE:\n{log}"
    );
}
