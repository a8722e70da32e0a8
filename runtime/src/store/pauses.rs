//! `outrun_paused`: the event names no instance claims (see
//! [`crate::pause`]). Small and outrun-owned; the claimers read it whole.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Result, Store, StoreError};

/// One paused name.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Pause {
    pub name: String,
    pub paused_at: DateTime<Utc>,
    /// `handler:NAME` when paused by handler.
    pub via: Option<String>,
}

impl Store {
    /// The paused names, sorted: what the claimers leave alone.
    pub async fn paused_names(&self) -> Result<Vec<String>> {
        const SQL: &str = "SELECT name FROM outrun_paused ORDER BY name";
        Ok(match self {
            Store::Sqlite(s) => sqlx::query_scalar(SQL).fetch_all(s.pool()).await?,
            Store::Postgres(s) => sqlx::query_scalar(SQL).fetch_all(s.pool()).await?,
        })
    }

    /// Every pause, by name.
    pub async fn pauses(&self) -> Result<Vec<Pause>> {
        const SQL: &str = "SELECT name, paused_at, via FROM outrun_paused ORDER BY name";
        match self {
            Store::Sqlite(s) => {
                let rows: Vec<(String, i64, Option<String>)> =
                    sqlx::query_as(SQL).fetch_all(s.pool()).await?;
                rows.into_iter()
                    .map(|(name, at, via)| {
                        let paused_at = DateTime::from_timestamp_millis(at).ok_or_else(|| {
                            StoreError::Db(sqlx::Error::Decode(
                                format!("outrun_paused.paused_at {at} is not Unix milliseconds")
                                    .into(),
                            ))
                        })?;
                        Ok(Pause {
                            name,
                            paused_at,
                            via,
                        })
                    })
                    .collect()
            }
            Store::Postgres(s) => {
                let rows: Vec<(String, DateTime<Utc>, Option<String>)> =
                    sqlx::query_as(SQL).fetch_all(s.pool()).await?;
                Ok(rows
                    .into_iter()
                    .map(|(name, paused_at, via)| Pause {
                        name,
                        paused_at,
                        via,
                    })
                    .collect())
            }
        }
    }

    /// Pause `names` (those already paused stay as they are); returns the
    /// names this call paused.
    pub async fn pause_names(&self, names: &[String], via: Option<&str>) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for name in names {
            crate::event::validate_name(name)?;
            let n = match self {
                Store::Sqlite(s) => sqlx::query(
                    "INSERT INTO outrun_paused (name, paused_at, via) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(Utc::now().timestamp_millis())
                .bind(via)
                .execute(s.pool())
                .await?
                .rows_affected(),
                Store::Postgres(s) => sqlx::query(
                    "INSERT INTO outrun_paused (name, via) VALUES ($1, $2)
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(via)
                .execute(s.pool())
                .await?
                .rows_affected(),
            };
            if n > 0 {
                done.push(name.clone());
            }
        }
        Ok(done)
    }

    /// Resume `names`; returns those that were paused.
    pub async fn resume_names(&self, names: &[String]) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for name in names {
            let n = match self {
                Store::Sqlite(s) => sqlx::query("DELETE FROM outrun_paused WHERE name = ?1")
                    .bind(name)
                    .execute(s.pool())
                    .await?
                    .rows_affected(),
                Store::Postgres(s) => sqlx::query("DELETE FROM outrun_paused WHERE name = $1")
                    .bind(name)
                    .execute(s.pool())
                    .await?
                    .rows_affected(),
            };
            if n > 0 {
                done.push(name.clone());
            }
        }
        if !done.is_empty()
            && let Store::Postgres(s) = self
        {
            // Wakes the claimers (they refresh their paused set within a
            // second, and claim again then).
            sqlx::query("SELECT pg_notify('outrun_events', '')")
                .execute(s.pool())
                .await?;
        }
        Ok(done)
    }

    /// Whether any event (live or dead) has this name. Used once per pause
    /// request to tell a typo from a name with no handler yet.
    pub async fn has_events_named(&self, name: &str) -> Result<bool> {
        const SQL: &str = "SELECT 1 FROM outbox_events WHERE name = $1 LIMIT 1";
        Ok(match self {
            Store::Sqlite(s) => sqlx::query_scalar::<_, i32>(SQL)
                .bind(name)
                .fetch_optional(s.pool())
                .await?
                .is_some(),
            Store::Postgres(s) => sqlx::query_scalar::<_, i32>(SQL)
                .bind(name)
                .fetch_optional(s.pool())
                .await?
                .is_some(),
        })
    }
}
