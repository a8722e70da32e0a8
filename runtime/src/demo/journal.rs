//! What the handlers did during the demo, as the runtime saw it: a
//! [`Router`] wrapper that records every attempt's verdict, and a `tracing`
//! layer that keeps the handlers' own log lines (`wasi:logging`, target
//! `outrun::guest`) so the report can tell each attempt in the handler's
//! words. Nothing here changes what the runtime does.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

use crate::event::Event;
use crate::handler::{Effects, Handler, HandlerError, Outcome, Route, Router};

/// One finished attempt of one event.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Since the journal was made.
    pub at: Duration,
    pub handler: String,
    pub event_id: uuid::Uuid,
    pub name: String,
    pub payload: String,
    /// 1-based.
    pub attempt: i32,
    pub verdict: Result<Outcome, HandlerError>,
    /// The handler's log lines during this attempt (info and above).
    pub logs: Vec<String>,
}

impl Attempt {
    pub fn is_done(&self) -> bool {
        matches!(self.verdict, Ok(Outcome::Done))
    }
}

/// A guest log line as captured by [`GuestLogLayer`].
#[derive(Debug, Clone)]
struct GuestLine {
    event_id: String,
    message: String,
}

#[derive(Default)]
struct Inner {
    attempts: Vec<Attempt>,
    guest_lines: Vec<GuestLine>,
}

/// Shared record of attempts and guest log lines. Cheap to clone.
#[derive(Clone, Default)]
pub struct Journal {
    /// Time zero of the report; set by [`Journal::start_clock`].
    started: Arc<OnceLock<Instant>>,
    inner: Arc<Mutex<Inner>>,
}

impl Journal {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every attempt so far, in the order they finished.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.lock().attempts.clone()
    }

    /// Start the demo's clock (once; later calls do nothing).
    pub fn start_clock(&self) {
        self.started.get_or_init(Instant::now);
    }

    /// Time since [`Journal::start_clock`] (the demo's clock).
    pub fn elapsed(&self) -> Duration {
        self.started.get_or_init(Instant::now).elapsed()
    }

    /// A `tracing` layer feeding guest log lines into this journal.
    pub fn guest_log_layer(&self) -> GuestLogLayer {
        GuestLogLayer {
            journal: self.clone(),
        }
    }

    /// Wrap `router` so every attempt it routes is recorded here.
    pub fn recording(&self, router: Arc<dyn Router>) -> Arc<dyn Router> {
        Arc::new(RecordingRouter {
            inner: router,
            journal: self.clone(),
        })
    }
}

struct RecordingRouter {
    inner: Arc<dyn Router>,
    journal: Journal,
}

impl Router for RecordingRouter {
    fn route(&self, name: &str) -> Option<Route> {
        let mut route = self.inner.route(name)?;
        route.handler = Arc::new(RecordingHandler {
            inner: route.handler,
            handler: route.handler_name.to_string(),
            journal: self.journal.clone(),
        });
        Some(route)
    }

    fn saturated(&self) -> Vec<String> {
        self.inner.saturated()
    }
}

struct RecordingHandler {
    inner: Arc<dyn Handler>,
    handler: String,
    journal: Journal,
}

#[async_trait::async_trait]
impl Handler for RecordingHandler {
    async fn handle(&self, event: &Event, effects: &mut Effects) -> Result<Outcome, HandlerError> {
        // Attempts of one event never overlap, so the lines logged under its
        // id after this point belong to this attempt.
        let first_line = self.journal.lock().guest_lines.len();
        let verdict = self.inner.handle(event, effects).await;
        let at = self.journal.elapsed();
        let id = event.id.to_string();
        let mut inner = self.journal.lock();
        let logs = inner.guest_lines[first_line.min(inner.guest_lines.len())..]
            .iter()
            .filter(|l| l.event_id == id)
            .map(|l| l.message.clone())
            .collect();
        inner.attempts.push(Attempt {
            at,
            handler: self.handler.clone(),
            event_id: event.id,
            name: event.name.clone(),
            payload: event.payload.clone(),
            attempt: event.attempt(),
            verdict: verdict.clone(),
            logs,
        });
        verdict
    }
}

/// Keeps `outrun::guest` events at info level and above.
pub struct GuestLogLayer {
    journal: Journal,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for GuestLogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _cx: Context<'_, S>) {
        let meta = event.metadata();
        if meta.target() != "outrun::guest" || *meta.level() > tracing::Level::INFO {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.journal.lock().guest_lines.push(GuestLine {
            event_id: fields.event_id,
            message: fields.message,
        });
    }
}

#[derive(Default)]
struct Fields {
    event_id: String,
    message: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "event_id" => self.event_id = value.to_owned(),
            "message" => self.message = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "event_id" => self.event_id = format!("{value:?}"),
            // `message` arrives as format_args!, whose Debug is its text.
            "message" => self.message = format!("{value:?}"),
            _ => {}
        }
    }
}
