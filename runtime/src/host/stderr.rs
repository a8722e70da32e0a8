//! The guest's stderr, kept only as a bounded tail for error reports: a Rust
//! guest prints its panic message there just before it traps, and that
//! message is what a person reading the event's `last_error` needs. Writes
//! never fail and never block, however much a guest prints; older bytes are
//! dropped.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Shared handle to the last `cap` bytes the guest wrote to stderr.
#[derive(Clone)]
pub struct StderrTail {
    cap: usize,
    buf: Arc<Mutex<Vec<u8>>>,
}

impl StderrTail {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            buf: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let overflow = (buf.len() + bytes.len()).saturating_sub(self.cap);
        buf.drain(..overflow);
        buf.extend_from_slice(bytes);
    }

    /// The tail as text, with blank lines and Rust's "note: run with
    /// RUST_BACKTRACE" hints removed and lines joined by spaces.
    pub fn summary(&self) -> String {
        let buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let text = String::from_utf8_lossy(&buf);
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: "))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl OutputStream for StderrTail {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        // Always room: the tail drops old bytes instead of refusing new ones.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for StderrTail {
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
    use super::StderrTail;

    #[test]
    fn keeps_the_tail() {
        let t = StderrTail::new(16);
        t.push(b"0123456789");
        t.push(b"abcdefghij");
        assert_eq!(t.summary(), "456789abcdefghij");
        t.push(&[b'x'; 40]);
        assert_eq!(t.summary(), "x".repeat(16));
        let t = StderrTail::new(4096);
        t.push(b"\nthread '<unnamed>' panicked at src/lib.rs:1:1:\nprobe panic\nnote: run with `RUST_BACKTRACE=1`\n");
        assert_eq!(
            t.summary(),
            "thread '<unnamed>' panicked at src/lib.rs:1:1: probe panic"
        );
    }
}
