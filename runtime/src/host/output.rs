//! The guest's stdout and stderr. Each complete line goes to the log at
//! debug level (target `outrun::guest`, tagged with the handler, event id,
//! version and stream), up to [`LOG_CAP`] bytes per stream per event; the
//! rest is counted and reported as dropped. stderr also keeps a bounded tail
//! for error reports: a Rust guest prints its panic message there just
//! before it traps, and that message is what a person reading the event's
//! `last_error` needs. Writes never fail and never block, however much a
//! guest prints.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes of one stream logged per event; a chatty guest costs at most this
/// much log (and memory) per event.
pub const LOG_CAP: usize = 64 * 1024;
/// A line longer than this is logged in pieces of this size, so the line
/// buffer stays bounded too.
const LINE_CAP: usize = 4096;

/// One guest output stream; clones share it. See the module docs.
#[derive(Clone)]
pub struct GuestOutput {
    stream: &'static str,
    handler: Arc<str>,
    version: Arc<str>,
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    event_id: String,
    line: Vec<u8>,
    logged: usize,
    dropped: usize,
    tail_cap: usize,
    tail: Vec<u8>,
}

impl GuestOutput {
    /// `stream` names it in the log ("stdout", "stderr"); `tail_cap` bytes
    /// of the latest output are kept for [`GuestOutput::summary`] (0: none).
    pub fn new(
        stream: &'static str,
        handler: Arc<str>,
        version: Arc<str>,
        event_id: &str,
        tail_cap: usize,
    ) -> Self {
        Self {
            stream,
            handler,
            version,
            inner: Arc::new(Mutex::new(Inner {
                event_id: event_id.to_string(),
                line: Vec::new(),
                logged: 0,
                dropped: 0,
                tail_cap,
                tail: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn logging() -> bool {
        tracing::enabled!(target: "outrun::guest", tracing::Level::DEBUG)
    }

    fn push(&self, bytes: &[u8]) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if inner.tail_cap > 0 {
            let bytes = &bytes[bytes.len().saturating_sub(inner.tail_cap)..];
            let overflow = (inner.tail.len() + bytes.len()).saturating_sub(inner.tail_cap);
            inner.tail.drain(..overflow);
            inner.tail.extend_from_slice(bytes);
        }
        if !Self::logging() {
            return;
        }
        let room = LOG_CAP.saturating_sub(inner.logged + inner.line.len());
        let (kept, dropped) = bytes.split_at(bytes.len().min(room));
        inner.dropped += dropped.len();
        for piece in kept.split_inclusive(|b| *b == b'\n') {
            inner.line.extend_from_slice(piece);
            if piece.ends_with(b"\n") || inner.line.len() >= LINE_CAP {
                self.emit(inner);
            }
        }
    }

    fn emit(&self, inner: &mut Inner) {
        let line = std::mem::take(&mut inner.line);
        inner.logged += line.len();
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        tracing::debug!(
            target: "outrun::guest",
            handler = &*self.handler,
            event_id = inner.event_id.as_str(),
            version = &*self.version,
            stream = self.stream,
            "{text}"
        );
    }

    /// End of an event: log an unfinished last line and what was dropped,
    /// then start counting afresh for `next_event` (a reused instance).
    pub fn finish(&self, next_event: Option<&str>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if !inner.line.is_empty() {
            self.emit(inner);
        }
        if inner.dropped > 0 {
            tracing::debug!(
                target: "outrun::guest",
                handler = &*self.handler,
                event_id = inner.event_id.as_str(),
                version = &*self.version,
                stream = self.stream,
                "{} more bytes of guest {} dropped (logged at most {LOG_CAP} per event)",
                inner.dropped,
                self.stream
            );
        }
        inner.logged = 0;
        inner.dropped = 0;
        inner.tail.clear();
        if let Some(id) = next_event {
            inner.event_id = id.to_string();
        }
    }

    /// The tail as text, with blank lines and Rust's "note: run with
    /// RUST_BACKTRACE" hints removed and lines joined by spaces.
    pub fn summary(&self) -> String {
        let inner = self.lock();
        let text = String::from_utf8_lossy(&inner.tail);
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: "))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        // Always room: output past the caps is dropped, never refused.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::GuestOutput;

    fn stderr(cap: usize) -> GuestOutput {
        GuestOutput::new("stderr", "h".into(), "v".into(), "e", cap)
    }

    #[test]
    fn keeps_the_tail() {
        let t = stderr(16);
        t.push(b"0123456789");
        t.push(b"abcdefghij");
        assert_eq!(t.summary(), "456789abcdefghij");
        t.push(&[b'x'; 40]);
        assert_eq!(t.summary(), "x".repeat(16));
        t.finish(Some("next"));
        assert_eq!(t.summary(), "", "a reused instance starts a new tail");
        let t = stderr(4096);
        t.push(b"\nthread '<unnamed>' panicked at src/lib.rs:1:1:\nprobe panic\nnote: run with `RUST_BACKTRACE=1`\n");
        assert_eq!(
            t.summary(),
            "thread '<unnamed>' panicked at src/lib.rs:1:1: probe panic"
        );
    }
}
