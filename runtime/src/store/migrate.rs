//! outrun's own migration runner.
//!
//! outrun lives in the application's database, and the application usually
//! runs its own sqlx migrations there. sqlx records every migrator's history
//! in one table, `_sqlx_migrations`, and refuses to run when that table holds
//! a version its own folder does not have: with both histories in one table,
//! whichever of the two migrated second failed ("migration 20260101000000
//! was previously applied but is missing in the resolved migrations"). So
//! outrun keeps its history in a table of its own, [`TABLE`], and leaves
//! `_sqlx_migrations` to the application.
//!
//! The SQL is still embedded with `sqlx::migrate!` (files in
//! `migrations/<backend>/`, versions and SHA-384 checksums as sqlx computes
//! them); only the bookkeeping is ours:
//!
//! - each migration runs in its own transaction together with its row in
//!   [`TABLE`], so it is applied exactly once or not at all;
//! - an applied migration whose checksum no longer matches this binary's copy
//!   is an error (an edited migration would leave databases that differ
//!   while claiming the same version);
//! - concurrent runs (several instances starting at once, `outrun migrate`
//!   in a deploy script next to a starting `serve`) are serialised: on
//!   PostgreSQL by a session advisory lock with an outrun-specific key, on
//!   SQLite by taking the write lock (`BEGIN IMMEDIATE`) around each
//!   check-and-apply;
//! - databases migrated by earlier outrun releases (history in
//!   `_sqlx_migrations`) are upgraded in place: the rows whose version and
//!   checksum are exactly outrun's are moved to [`TABLE`], nothing else in
//!   `_sqlx_migrations` is touched.

use std::time::Instant;

use serde::Serialize;
use sqlx::migrate::{Migration, Migrator};
use sqlx::{Connection, Executor, Row};

use super::{Result, StoreError};

/// Where outrun records the migrations it applied.
pub const TABLE: &str = "outrun_migrations";

/// sqlx's history table: the application's. Read (and outrun's own rows
/// moved out of it) only to upgrade databases migrated by earlier outrun
/// releases.
pub const SQLX_TABLE: &str = "_sqlx_migrations";

pub(super) static POSTGRES: Migrator = sqlx::migrate!("../migrations/postgres");
pub(super) static SQLITE: Migrator = sqlx::migrate!("../migrations/sqlite");

/// The key of the PostgreSQL session advisory lock held while migrating
/// ("outrunmg" in ASCII). Advisory locks are per database, and sqlx's own
/// key is derived from the database name, so an application's `sqlx
/// migrate` neither waits for outrun nor collides with it.
pub const PG_LOCK_KEY: i64 = i64::from_be_bytes(*b"outrunmg");

/// Who applied a row of [`TABLE`].
const APPLIED_BY: &str = concat!("outrun ", env!("CARGO_PKG_VERSION"));
const MOVED_BY: &str = "an earlier outrun (moved from _sqlx_migrations)";

/// What one migrate run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MigrationReport {
    /// Migrations applied by this run: version and description.
    pub applied: Vec<(i64, String)>,
    /// Versions whose history was moved from `_sqlx_migrations` to
    /// [`TABLE`] (a database migrated by an earlier outrun release).
    pub moved: Vec<i64>,
    /// Versions in [`TABLE`] that this binary does not know: a newer
    /// outrun migrated this database.
    pub unknown: Vec<i64>,
}

/// The newest migration version in `m`: what a database must have applied
/// for this binary (readiness, [`super::Store::ping`]).
pub(super) fn newest(m: &'static Migrator) -> i64 {
    embedded(m).last().map_or(0, |m| m.version)
}

fn embedded(m: &'static Migrator) -> Vec<&'static Migration> {
    let mut v: Vec<_> = m
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .collect();
    v.sort_by_key(|m| m.version);
    v
}

/// Rows of `_sqlx_migrations` that are outrun's: version and checksum of
/// one of `ours`, applied successfully.
fn ours_in_sqlx(ours: &[&'static Migration], rows: &[(i64, Vec<u8>, bool)]) -> Vec<i64> {
    ours.iter()
        .filter(|m| {
            rows.iter()
                .any(|(v, c, ok)| *ok && *v == m.version && c.as_slice() == &*m.checksum)
        })
        .map(|m| m.version)
        .collect()
}

/// Compare the recorded history with the embedded migrations: an error for
/// an applied migration that changed, the versions this binary does not
/// know (a warning), and the migrations still to apply.
fn plan(
    ours: &[&'static Migration],
    applied: &[(i64, Vec<u8>)],
    report: &mut MigrationReport,
) -> Result<Vec<&'static Migration>> {
    for (version, checksum) in applied {
        match ours.iter().find(|m| m.version == *version) {
            Some(m) if checksum.as_slice() != &*m.checksum => return Err(changed(m)),
            Some(_) => {}
            None => {
                tracing::warn!(
                    version,
                    table = TABLE,
                    "the database has an outrun migration this outrun does not know: a newer outrun migrated it; running anyway"
                );
                report.unknown.push(*version);
            }
        }
    }
    Ok(ours
        .iter()
        .filter(|m| !applied.iter().any(|(v, _)| *v == m.version))
        .copied()
        .collect())
}

fn changed(m: &Migration) -> StoreError {
    StoreError::MigrationChanged {
        version: m.version,
        description: m.description.to_string(),
    }
}

fn failed(m: &Migration, source: sqlx::Error) -> StoreError {
    StoreError::MigrationFailed {
        version: m.version,
        description: m.description.to_string(),
        source,
    }
}

fn log_moved(moved: &[i64]) {
    if !moved.is_empty() {
        tracing::info!(
            versions = ?moved,
            "moved outrun's migration history from {SQLX_TABLE} to {TABLE}; the application's rows in {SQLX_TABLE} are untouched"
        );
    }
}

fn log_applied(m: &Migration, ms: i64) {
    tracing::info!(
        version = m.version,
        description = %m.description,
        elapsed_ms = ms,
        "applied outrun migration"
    );
}

fn elapsed_ms(start: Instant) -> i64 {
    i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------- PostgreSQL

/// Apply outrun's PostgreSQL migrations under the advisory lock.
pub(super) async fn postgres(pool: &sqlx::PgPool) -> Result<MigrationReport> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(PG_LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    let result = postgres_locked(&mut conn).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(PG_LOCK_KEY)
        .execute(&mut *conn)
        .await;
    if unlocked.is_err() {
        // The session may still hold the lock: it must not go back to the
        // pool (closing it releases the lock).
        conn.close_on_drop();
    }
    result
}

async fn postgres_locked(conn: &mut sqlx::PgConnection) -> Result<MigrationReport> {
    let ours = embedded(&POSTGRES);
    let mut report = MigrationReport::default();
    let exists = |table: &'static str| {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL").bind(table)
    };
    if !exists(TABLE).fetch_one(&mut *conn).await? {
        (&mut *conn)
            .execute(
                "CREATE TABLE outrun_migrations (
                 version      bigint      PRIMARY KEY,
                 description  text        NOT NULL,
                 checksum     bytea       NOT NULL,
                 applied_at   timestamptz NOT NULL DEFAULT now(),
                 execution_ms bigint      NOT NULL,
                 applied_by   text        NOT NULL
             )",
            )
            .await?;
    }

    if exists(SQLX_TABLE).fetch_one(&mut *conn).await? {
        let rows: Vec<(i64, Vec<u8>, bool)> =
            sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations")
                .fetch_all(&mut *conn)
                .await?;
        let moving = ours_in_sqlx(&ours, &rows);
        if !moving.is_empty() {
            let mut tx = Connection::begin(&mut *conn).await?;
            for version in &moving {
                let m = ours.iter().find(|m| m.version == *version).expect("ours");
                sqlx::query(
                    "INSERT INTO outrun_migrations
                         (version, description, checksum, applied_at, execution_ms, applied_by)
                     SELECT version, description, checksum, installed_on,
                            GREATEST(execution_time, 0) / 1000000, $3
                     FROM _sqlx_migrations WHERE version = $1 AND checksum = $2
                     ON CONFLICT (version) DO NOTHING",
                )
                .bind(m.version)
                .bind(&*m.checksum)
                .bind(MOVED_BY)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1 AND checksum = $2")
                    .bind(m.version)
                    .bind(&*m.checksum)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            log_moved(&moving);
            report.moved = moving;
        }
    }

    let applied: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM outrun_migrations ORDER BY version")
            .fetch_all(&mut *conn)
            .await?;
    for m in plan(&ours, &applied, &mut report)? {
        let start = Instant::now();
        let record = |ms: i64| {
            sqlx::query(
                "INSERT INTO outrun_migrations (version, description, checksum, execution_ms, applied_by)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(m.version)
            .bind(&*m.description)
            .bind(&*m.checksum)
            .bind(ms)
            .bind(APPLIED_BY)
        };
        if m.no_tx {
            (&mut *conn)
                .execute(&*m.sql)
                .await
                .map_err(|e| failed(m, e))?;
            record(elapsed_ms(start)).execute(&mut *conn).await?;
        } else {
            let mut tx = Connection::begin(&mut *conn).await?;
            (&mut *tx)
                .execute(&*m.sql)
                .await
                .map_err(|e| failed(m, e))?;
            record(elapsed_ms(start)).execute(&mut *tx).await?;
            tx.commit().await?;
        }
        log_applied(m, elapsed_ms(start));
        report.applied.push((m.version, m.description.to_string()));
    }
    Ok(report)
}

// -------------------------------------------------------------------- SQLite

/// Apply outrun's SQLite migrations. SQLite has one writer: every step
/// that looks at the history and changes it runs under the write lock
/// (`BEGIN IMMEDIATE`), so of several processes migrating one file at once
/// exactly one applies each migration and the others see it applied.
pub(super) async fn sqlite(pool: &sqlx::SqlitePool) -> Result<MigrationReport> {
    let ours = embedded(&SQLITE);
    let mut report = MigrationReport::default();
    let mut conn = pool.acquire().await?;

    // The history table, the upgrade and the check, in one write transaction.
    let pending = {
        let mut tx = Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
        (&mut *tx)
            .execute(
                "CREATE TABLE IF NOT EXISTS outrun_migrations (
                 version      INTEGER NOT NULL PRIMARY KEY,
                 description  TEXT    NOT NULL,
                 checksum     BLOB    NOT NULL,
                 -- Unix milliseconds, like every outrun timestamp on SQLite.
                 applied_at   INTEGER NOT NULL,
                 execution_ms INTEGER NOT NULL,
                 applied_by   TEXT    NOT NULL
             )",
            )
            .await?;
        let sqlx_exists: bool = sqlx::query_scalar(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        )
        .bind(SQLX_TABLE)
        .fetch_one(&mut *tx)
        .await?;
        if sqlx_exists {
            let rows: Vec<(i64, Vec<u8>, bool)> =
                sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations")
                    .fetch_all(&mut *tx)
                    .await?;
            let moving = ours_in_sqlx(&ours, &rows);
            for version in &moving {
                let m = ours.iter().find(|m| m.version == *version).expect("ours");
                // sqlx's installed_on is 'YYYY-MM-DD HH:MM:SS' in UTC.
                sqlx::query(
                    "INSERT INTO outrun_migrations
                         (version, description, checksum, applied_at, execution_ms, applied_by)
                     SELECT version, description, checksum,
                            COALESCE(CAST(ROUND((julianday(installed_on) - 2440587.5) * 86400000.0) AS INTEGER),
                                     CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)),
                            max(execution_time, 0) / 1000000, ?3
                     FROM _sqlx_migrations WHERE version = ?1 AND checksum = ?2
                     ON CONFLICT (version) DO NOTHING",
                )
                .bind(m.version)
                .bind(&*m.checksum)
                .bind(MOVED_BY)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ?1 AND checksum = ?2")
                    .bind(m.version)
                    .bind(&*m.checksum)
                    .execute(&mut *tx)
                    .await?;
            }
            report.moved = moving;
        }
        let applied: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT version, checksum FROM outrun_migrations ORDER BY version")
                .fetch_all(&mut *tx)
                .await?;
        let pending = plan(&ours, &applied, &mut report)?;
        tx.commit().await?;
        log_moved(&report.moved);
        pending
    };

    for m in pending {
        let start = Instant::now();
        let record = |ms: i64| {
            sqlx::query(
                "INSERT INTO outrun_migrations
                     (version, description, checksum, applied_at, execution_ms, applied_by)
                 VALUES (?1, ?2, ?3, CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER), ?4, ?5)",
            )
            .bind(m.version)
            .bind(&*m.description)
            .bind(&*m.checksum)
            .bind(ms)
            .bind(APPLIED_BY)
        };
        if m.no_tx {
            // Statements that cannot run in a transaction (VACUUM) cannot
            // be serialised by one either; outrun ships none.
            (&mut *conn)
                .execute(&*m.sql)
                .await
                .map_err(|e| failed(m, e))?;
            record(elapsed_ms(start)).execute(&mut *conn).await?;
        } else {
            let mut tx = Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
            // Another process may have applied it since the check above.
            let done: Option<Vec<u8>> =
                sqlx::query("SELECT checksum FROM outrun_migrations WHERE version = ?1")
                    .bind(m.version)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?;
            match done {
                Some(c) if c.as_slice() == &*m.checksum => {
                    tx.rollback().await?;
                    continue;
                }
                Some(_) => return Err(changed(m)),
                None => {}
            }
            (&mut *tx)
                .execute(&*m.sql)
                .await
                .map_err(|e| failed(m, e))?;
            record(elapsed_ms(start)).execute(&mut *tx).await?;
            tx.commit().await?;
        }
        log_applied(m, elapsed_ms(start));
        report.applied.push((m.version, m.description.to_string()));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_migrations_are_sorted_and_distinct() {
        for m in [&POSTGRES, &SQLITE] {
            let v: Vec<i64> = embedded(m).iter().map(|m| m.version).collect();
            let mut sorted = v.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(v, sorted);
            assert!(!v.is_empty());
        }
    }

    #[test]
    fn only_exact_rows_are_outruns() {
        let ours = embedded(&SQLITE);
        let first = ours[0];
        let rows = vec![
            (first.version, first.checksum.to_vec(), true),
            // An application migration with another version.
            (20240101000000, vec![1, 2, 3], true),
        ];
        assert_eq!(ours_in_sqlx(&ours, &rows), vec![first.version]);
        // Same version, other SQL: the application's, not ours.
        let rows = vec![(first.version, vec![9; 48], true)];
        assert!(ours_in_sqlx(&ours, &rows).is_empty());
        // A failed (dirty) row is not a record of an applied migration.
        let rows = vec![(first.version, first.checksum.to_vec(), false)];
        assert!(ours_in_sqlx(&ours, &rows).is_empty());
    }

    #[test]
    fn a_changed_migration_is_an_error_naming_it() {
        let ours = embedded(&SQLITE);
        let first = ours[0];
        let mut report = MigrationReport::default();
        let err = plan(&ours, &[(first.version, vec![0; 48])], &mut report).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&first.version.to_string()), "{msg}");
        let pending = plan(&ours, &[(1, vec![])], &mut report).unwrap();
        assert_eq!(pending.len(), ours.len());
        assert_eq!(report.unknown, vec![1]);
    }
}
