//! `outrun migrate`: apply the embedded migrations of the configured backend.
//! outrun records them in its own table, `outrun_migrations`, and leaves
//! `_sqlx_migrations` to the application (see `store/migrate.rs`).

use crate::config::Config;
use crate::store::migrate::{SQLX_TABLE, TABLE};

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let store = super::connect_creating(config).await?;
    let report = store.migrate().await?;
    if !report.moved.is_empty() {
        eprintln!(
            "moved outrun's migration history ({} versions: {}) from {SQLX_TABLE} to {TABLE}; \
             the application's rows in {SQLX_TABLE} are untouched",
            report.moved.len(),
            join(report.moved.iter().map(i64::to_string))
        );
    }
    for (version, description) in &report.applied {
        eprintln!("applied {version} {description}");
    }
    if !report.unknown.is_empty() {
        eprintln!(
            "warning: {TABLE} lists migrations this outrun does not know ({}): a newer outrun migrated this database",
            join(report.unknown.iter().map(i64::to_string))
        );
    }
    eprintln!(
        "migrated {}",
        crate::store::redact_url(&config.database_url)
    );
    Ok(())
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}
