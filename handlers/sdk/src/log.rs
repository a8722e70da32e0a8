//! Log lines through `wasi:logging`; the runtime adds them to its own log
//! with the handler and event they came from.

use crate::bindings::wasi::logging::logging as wit;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Variables and control flow.
    Trace,
    /// Of interest to someone debugging the handler.
    Debug,
    /// Of interest to someone monitoring the handler.
    Info,
    /// A hazardous situation.
    Warn,
    /// A failure.
    Error,
}

/// Log `message` at `level`; `context` is a short tag naming what the message
/// is about (empty for none).
pub fn log(level: Level, context: &str, message: &str) {
    let level = match level {
        Level::Trace => wit::Level::Trace,
        Level::Debug => wit::Level::Debug,
        Level::Info => wit::Level::Info,
        Level::Warn => wit::Level::Warn,
        Level::Error => wit::Level::Error,
    };
    wit::log(level, context, message);
}

/// Log at trace level.
pub fn trace(message: impl AsRef<str>) {
    log(Level::Trace, "", message.as_ref());
}

/// Log at debug level.
pub fn debug(message: impl AsRef<str>) {
    log(Level::Debug, "", message.as_ref());
}

/// Log at info level.
pub fn info(message: impl AsRef<str>) {
    log(Level::Info, "", message.as_ref());
}

/// Log at warn level.
pub fn warn(message: impl AsRef<str>) {
    log(Level::Warn, "", message.as_ref());
}

/// Log at error level.
pub fn error(message: impl AsRef<str>) {
    log(Level::Error, "", message.as_ref());
}
