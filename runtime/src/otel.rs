//! OpenTelemetry traces (`[otel]`): one span per attempt, a child of the
//! producer's context from the event's `traceparent` column, exported over
//! OTLP/HTTP (protobuf) by a batch processor on tokio.
//!
//! Without `[otel]` nothing here exists at run time: the dispatcher holds an
//! `Option<Arc<Otel>>`, and the per-event cost is that one branch. With it,
//! an attempt's span context is also what the events its handler emits
//! carry (their `traceparent`) and what its HTTP calls send (a
//! `traceparent` header), so a chain of events is one trace.
//!
//! The `traceparent` parser lives here, apart from the SDK, because enqueue
//! checks the value whether tracing is on or not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::OtelConfig;
use crate::event::Event;

/// Where spans go when neither `[otel] endpoint` nor the OTLP environment
/// variables name a collector: the OTLP/HTTP default.
pub const DEFAULT_ENDPOINT: &str = "http://localhost:4318";
const TRACES_PATH: &str = "/v1/traces";

/// A W3C trace context (`traceparent` header value):
/// `VERSION-TRACEID-PARENTID-FLAGS`, e.g.
/// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceParent {
    /// Parse as the W3C Trace Context spec says: lowercase hex, ids not
    /// all zeros, version `ff` invalid, version `00` exactly 55 characters,
    /// later versions may append `-...` fields (ignored). The error is the
    /// reason, for the message that names the value.
    pub fn parse(value: &str) -> Result<TraceParent, &'static str> {
        let b = value.as_bytes();
        let hex = |r: &[u8]| r.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if b.len() < 55 {
            return Err("shorter than the 55 characters of version 00");
        }
        if !hex(&b[0..2]) {
            return Err("the version is not two lowercase hex digits");
        }
        if &b[0..2] == b"ff" {
            return Err("version ff is invalid");
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err("its four fields are not separated by '-'");
        }
        if &b[0..2] == b"00" && b.len() != 55 {
            return Err("version 00 is exactly 55 characters");
        }
        if b.len() > 55 && b[55] != b'-' {
            return Err("the flags are not two hex digits followed by '-' or the end");
        }
        if !hex(&b[3..35]) {
            return Err("the trace id is not 32 lowercase hex digits");
        }
        if !hex(&b[36..52]) {
            return Err("the parent id is not 16 lowercase hex digits");
        }
        if !hex(&b[53..55]) {
            return Err("the flags are not two lowercase hex digits");
        }
        // The slices are ASCII hex digits: these parses cannot fail.
        let num = |r: &[u8]| u128::from_str_radix(std::str::from_utf8(r).unwrap_or("0"), 16);
        let trace_id = num(&b[3..35]).unwrap_or(0);
        let span_id = num(&b[36..52]).unwrap_or(0) as u64;
        let flags = num(&b[53..55]).unwrap_or(0) as u8;
        if trace_id == 0 {
            return Err("the trace id is all zeros");
        }
        if span_id == 0 {
            return Err("the parent id is all zeros");
        }
        Ok(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The version-00 header value.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }

    fn remote_context(&self) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.span_id),
            TraceFlags::new(self.flags),
            true,
            TraceState::NONE,
        ))
    }
}

/// Why `[otel]` could not start.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("[otel] could not build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The tracer of a running `serve`.
pub struct Otel {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    endpoint: String,
    /// Unix second of the last "invalid traceparent" warning, and how many
    /// were left out since: one bad producer must not flood the log.
    last_warning: AtomicU64,
    suppressed: AtomicU64,
}

/// The span of one attempt; end it with [`Attempt::end`].
pub struct Attempt {
    span: opentelemetry_sdk::trace::Span,
    /// The attempt's own context as a `traceparent` value: what emitted
    /// events and outgoing HTTP requests carry.
    pub traceparent: Arc<str>,
}

/// The endpoint spans are posted to: `[otel] endpoint`, else
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is), else
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, else [`DEFAULT_ENDPOINT`]. A base URL gets
/// `/v1/traces` appended, as the OTLP exporter spec says.
pub fn traces_endpoint(config: &OtelConfig, env: impl Fn(&str) -> Option<String>) -> String {
    let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    if let Some(e) =
        nonempty(env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")).filter(|_| config.endpoint.is_none())
    {
        return e;
    }
    let base = config
        .endpoint
        .clone()
        .or_else(|| nonempty(env("OTEL_EXPORTER_OTLP_ENDPOINT")))
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    if base.trim_end_matches('/').ends_with(TRACES_PATH) {
        base
    } else {
        format!("{}{TRACES_PATH}", base.trim_end_matches('/'))
    }
}

impl Otel {
    /// Build the exporter and the batch processor (on the current tokio
    /// runtime). Nothing connects yet: a collector that is down costs
    /// dropped spans (the SDK logs them), never events.
    pub fn start(config: &OtelConfig) -> Result<Otel, OtelError> {
        let endpoint = traces_endpoint(config, |k| std::env::var(k).ok());
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|source| OtelError::Exporter {
                endpoint: endpoint.clone(),
                source,
            })?;
        let processor =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        let mut resource = Resource::builder();
        // OTEL_SERVICE_NAME is read by the builder; "outrun" beats its
        // "unknown_service" fallback.
        match &config.service_name {
            Some(name) => resource = resource.with_service_name(name.clone()),
            None if std::env::var_os("OTEL_SERVICE_NAME").is_none() => {
                resource = resource.with_service_name("outrun")
            }
            None => {}
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("outrun");
        Ok(Otel {
            provider,
            tracer,
            endpoint,
            last_warning: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Start the span of `ev`'s attempt in `handler`: a child of the event's
    /// `traceparent`, or a new trace when it has none or a bad one.
    pub fn attempt(&self, ev: &Event, handler: &str, version: Option<&str>) -> Attempt {
        let parent = match ev.traceparent.as_deref() {
            None => Context::new(),
            Some(tp) => match TraceParent::parse(tp) {
                Ok(p) => p.remote_context(),
                Err(reason) => {
                    self.warn_invalid(ev, tp, reason);
                    Context::new()
                }
            },
        };
        let mut attributes = vec![
            KeyValue::new("messaging.system", "outrun"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", ev.name.clone()),
            KeyValue::new("messaging.message.id", ev.id.to_string()),
            KeyValue::new("outrun.event.id", ev.id.to_string()),
            KeyValue::new("outrun.event.name", ev.name.clone()),
            KeyValue::new("outrun.event.attempt", i64::from(ev.attempt())),
            KeyValue::new("outrun.handler.name", handler.to_string()),
        ];
        if let Some(v) = version {
            // The short form the logs use ("handler loaded ... version=").
            let short = v.get(..12).unwrap_or(v);
            attributes.push(KeyValue::new("outrun.handler.version", short.to_string()));
        }
        let span = self
            .tracer
            .span_builder(format!("process {}", ev.name))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        let c = span.span_context();
        let traceparent = TraceParent {
            trace_id: u128::from_be_bytes(c.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(c.span_id().to_bytes()),
            flags: c.trace_flags().to_u8(),
        }
        .header();
        Attempt {
            span,
            traceparent: Arc::from(traceparent),
        }
    }

    fn warn_invalid(&self, ev: &Event, value: &str, reason: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning.load(Ordering::Relaxed);
        let due = last == 0 || now >= last + 10;
        if due
            && self
                .last_warning
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            let value: String = value.chars().take(80).collect();
            tracing::warn!(
                event_id = %ev.id,
                name = %ev.name,
                traceparent = %value,
                suppressed,
                "the event's traceparent is not a W3C trace context ({reason}); it is ignored and the attempt starts a new trace (fix the producer; at most one such warning per 10s, `suppressed` counts the others)"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Export what is buffered and stop, within `timeout`. The SDK's
    /// shutdown blocks its thread until the batch task answers, so it runs
    /// on a blocking thread while the runtime keeps serving that task.
    pub async fn shutdown(&self, timeout: Duration) {
        let provider = self.provider.clone();
        let done = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, endpoint = %self.endpoint, "flushing the last spans failed")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the last spans failed"),
            Err(_) => tracing::warn!(
                endpoint = %self.endpoint,
                "flushing the last spans took longer than {}; they are dropped",
                humantime::format_duration(timeout)
            ),
        }
    }
}

impl Attempt {
    /// End the span with the attempt's outcome (`ok`, `deferred`, `retry`,
    /// `dead`, `interrupted`) and, for a failure, its error.
    pub fn end(mut self, outcome: &'static str, error: Option<&str>) {
        self.span
            .set_attribute(KeyValue::new("outrun.outcome", outcome));
        if let Some(e) = error {
            self.span.set_status(Status::error(e.to_string()));
        }
        self.span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_w3c_traceparent() {
        let p = TraceParent::parse(GOOD).unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert_eq!(p.flags, 1);
        assert_eq!(p.header(), GOOD);
        // A later version may append fields.
        assert!(TraceParent::parse(&format!("01{}-extra", &GOOD[2..])).is_ok());
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        for (bad, why) in [
            ("", "shorter"),
            ("garbage", "shorter"),
            (&GOOD.to_uppercase()[..], "lowercase"),
            (&format!("ff{}", &GOOD[2..]), "ff"),
            (&format!("{GOOD}-x"), "exactly 55"),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "all zeros",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "separated",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
                "trace id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                "flags",
            ),
        ] {
            let err = TraceParent::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn endpoint_from_config_then_environment() {
        let none = |_: &str| None;
        let cfg = |e: Option<&str>| OtelConfig {
            endpoint: e.map(str::to_string),
            service_name: None,
        };
        assert_eq!(
            traces_endpoint(&cfg(None), none),
            "http://localhost:4318/v1/traces"
        );
        assert_eq!(
            traces_endpoint(&cfg(Some("http://c:4318/")), none),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_endpoint(&cfg(Some("http://c:4318/v1/traces")), none),
            "http://c:4318/v1/traces"
        );
        let env = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://e:1".to_string());
        assert_eq!(traces_endpoint(&cfg(None), env), "http://e:1/v1/traces");
        assert_eq!(
            traces_endpoint(&cfg(Some("http://c:2")), env),
            "http://c:2/v1/traces"
        );
        let signal = |k: &str| {
            (k == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").then(|| "http://s:3/x".to_string())
        };
        assert_eq!(traces_endpoint(&cfg(None), signal), "http://s:3/x");
    }
}
