//! `wasi:logging/logging`: guest log lines become `tracing` events (target
//! `outrun::guest`) carrying the handler name, event id, version (content
//! hash prefix) and the guest's context string.

use super::HostState;
use super::bindings::wasi::logging::logging::{Host, Level};
use super::harness::Call;

impl Host for HostState {
    async fn log(&mut self, level: Level, context: String, message: String) {
        self.caps.record(|| Call::Log {
            level: match level {
                Level::Trace => "trace",
                Level::Debug => "debug",
                Level::Info => "info",
                Level::Warn => "warn",
                Level::Error => "error",
                Level::Critical => "critical",
            },
            context: context.clone(),
            message: message.clone(),
        });
        let handler = &*self.caps.handler;
        let event_id = self.event_id.as_str();
        let version = &*self.version;
        match level {
            Level::Trace => {
                tracing::trace!(target: "outrun::guest", handler, event_id, version, context, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "outrun::guest", handler, event_id, version, context, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "outrun::guest", handler, event_id, version, context, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "outrun::guest", handler, event_id, version, context, "{message}")
            }
            Level::Error | Level::Critical => {
                tracing::error!(target: "outrun::guest", handler, event_id, version, context, critical = matches!(level, Level::Critical), "{message}")
            }
        }
    }
}
