//! Pause and resume by event name or by handler (`outrun events pause`,
//! `POST /v1/pauses`). A paused name stays in the outbox untouched: no
//! instance claims its events (the claimers read `outrun_paused` at least
//! once a second, see [`crate::dispatch`]), and resuming deletes the pause
//! so they run from where they stopped. Events already running finish.

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// What to pause or resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Name(String),
    /// Every event name the handler (or relay) binds.
    Handler(String),
}

/// Who binds which names: a `[[handler]]`'s name and events (relays as
/// `relay:TOPIC`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub handler: String,
    pub events: Vec<String>,
}

/// From the config: the handlers and relays, as bound there.
pub fn bindings(config: &crate::config::Config) -> Vec<Binding> {
    config
        .handler
        .iter()
        .map(|h| Binding {
            handler: h.name.clone(),
            events: h.events.clone(),
        })
        .chain(config.relay.iter().map(|r| Binding {
            handler: format!("relay:{}", r.topic),
            events: r.events.clone(),
        }))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error(
        "no event name {0:?}: no handler binds it and no event has it; check the spelling, \
         or pause it anyway with --force (`\"force\": true` over the API) to hold events not yet written"
    )]
    UnknownName(String),
    #[error("no handler named {name:?}; the handlers are: {known}")]
    UnknownHandler { name: String, known: String },
    #[error("{0} is not paused; `outrun events stats` lists the paused names")]
    NotPaused(String),
    #[error("give an event name or a handler, not both")]
    Ambiguous,
    #[error("give the event name (--name) or the handler (--handler) to pause or resume")]
    Missing,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Target {
    pub fn from_parts(name: Option<String>, handler: Option<String>) -> Result<Target, PauseError> {
        match (name, handler) {
            (Some(n), None) => Ok(Target::Name(n)),
            (None, Some(h)) => Ok(Target::Handler(h)),
            (Some(_), Some(_)) => Err(PauseError::Ambiguous),
            (None, None) => Err(PauseError::Missing),
        }
    }

    fn names(&self, bindings: &[Binding]) -> Result<(Vec<String>, Option<String>), PauseError> {
        match self {
            Target::Name(n) => Ok((vec![n.clone()], None)),
            Target::Handler(h) => {
                let b = bindings.iter().find(|b| &b.handler == h).ok_or_else(|| {
                    PauseError::UnknownHandler {
                        name: h.clone(),
                        known: if bindings.is_empty() {
                            "none (no [[handler]] in the config)".to_owned()
                        } else {
                            bindings
                                .iter()
                                .map(|b| b.handler.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                    }
                })?;
                Ok((b.events.clone(), Some(format!("handler:{h}"))))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Name(n) => format!("event name {n:?}"),
            Target::Handler(h) => format!("handler {h:?}"),
        }
    }
}

/// Pause; returns the names now paused by this call (already paused ones
/// are not repeated). An unknown name is refused unless `force`.
pub async fn pause(
    store: &Store,
    target: &Target,
    bindings: &[Binding],
    force: bool,
) -> Result<Vec<String>, PauseError> {
    let (names, via) = target.names(bindings)?;
    if let Target::Name(n) = target {
        crate::event::validate_name(n).map_err(StoreError::from)?;
        let bound = bindings.iter().any(|b| b.events.contains(n));
        if !force && !bound && !store.has_events_named(n).await? {
            return Err(PauseError::UnknownName(n.clone()));
        }
    }
    let done = store.pause_names(&names, via.as_deref()).await?;
    tracing::info!(target = %target.describe(), paused = %done.join(","), "paused");
    Ok(done)
}

/// Resume; returns the names this call resumed. Refused when none of the
/// target's names was paused.
pub async fn resume(
    store: &Store,
    target: &Target,
    bindings: &[Binding],
) -> Result<Vec<String>, PauseError> {
    let (names, _) = target.names(bindings)?;
    let done = store.resume_names(&names).await?;
    if done.is_empty() {
        return Err(PauseError::NotPaused(target.describe()));
    }
    tracing::info!(target = %target.describe(), resumed = %done.join(","), "resumed");
    Ok(done)
}
