//! `outrun migrate`: apply the embedded migrations of the configured backend.

use crate::config::Config;

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let store = super::connect(config).await?;
    store.migrate().await?;
    eprintln!(
        "migrated {}",
        crate::store::redact_url(&config.database_url)
    );
    Ok(())
}
