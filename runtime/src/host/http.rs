//! Outgoing `wasi:http`: wasmtime-wasi-http does the protocol work; this file
//! is the policy in front of it. A request whose authority is not in
//! `allow.http` fails with `HttpRequestDenied` (and a warn log) before any
//! connection is made, and connect/first-byte timeouts never outlive the
//! handler's own deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use super::Capabilities;
use super::harness::{Call, HttpFixtures, Recorder};

/// Per-event hook state for wasmtime-wasi-http.
pub struct HttpPolicy {
    pub(crate) caps: Arc<Capabilities>,
    pub(crate) event_id: String,
    pub(crate) deadline: Instant,
    /// The attempt's trace context (`[otel]`), sent as the `traceparent`
    /// header unless the handler set one itself.
    pub(crate) traceparent: Option<Arc<str>>,
}

/// `allow` entries: `host` admits every port of that host, `host:port` only
/// that port. Host names compare case-insensitively.
pub fn authority_allowed(
    allow: &[String],
    host: &str,
    port: Option<u16>,
    default_port: u16,
) -> bool {
    let port = port.unwrap_or(default_port);
    allow.iter().any(|entry| match entry.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => {
            h.eq_ignore_ascii_case(host) && p.parse::<u16>() == Ok(port)
        }
        _ => entry.eq_ignore_ascii_case(host),
    })
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                ),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> ResponseFuture {
        if let Some(tp) = &self.traceparent
            && !request.headers().contains_key("traceparent")
            && let Ok(value) = http::HeaderValue::from_str(tp)
        {
            request.headers_mut().insert("traceparent", value);
        }
        let uri = request.uri();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri.host().unwrap_or("");
        let allowed = authority_allowed(
            &self.caps.http,
            host,
            uri.port_u16(),
            if https { 443 } else { 80 },
        );
        let method = request.method().to_string();
        let url = uri.to_string();
        if !allowed {
            let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
            self.caps.record(|| Call::Http {
                method: method.clone(),
                url: url.clone(),
                status: None,
                source: "network",
                error: Some(format!(
                    "denied: {authority} is not in the handler's allowed hosts"
                )),
            });
            tracing::warn!(
                handler = %self.caps.handler,
                event_id = %self.event_id,
                "capability denied: HTTP request to {authority} is not allowed: add \"{authority}\" to http in [handler.allow] of handler {}",
                self.caps.handler
            );
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        if let Some(harness) = &self.caps.harness
            && let Some(fixtures) = &harness.fixtures
        {
            return answer_from_fixtures(fixtures, &harness.recorder, method, url);
        }
        let recorder = self.caps.harness.as_ref().map(|h| h.recorder.clone());
        let remaining = self
            .deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let cap = |t: Option<Duration>| Some(t.map_or(remaining, |t| t.min(remaining)));
        let opts = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: cap(opts.connect_timeout),
            first_byte_timeout: cap(opts.first_byte_timeout),
            between_bytes_timeout: cap(opts.between_bytes_timeout),
        };
        Box::new(async move {
            use http_body_util::BodyExt;
            let sent = wasmtime_wasi_http::default_send_request(request, Some(options)).await;
            if let Some(recorder) = recorder {
                recorder.push(Call::Http {
                    method,
                    url,
                    status: sent.as_ref().ok().map(|(r, _)| r.status().as_u16()),
                    source: "network",
                    error: sent.as_ref().err().map(|e| e.to_string()),
                });
            }
            let (response, io) = sent?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
    }
}

/// `outrun handlers run --http-fixtures`: the answer comes from the file
/// (recorded), and a request without a fixture fails with a message that
/// names it, so the author knows which entry to add.
fn answer_from_fixtures(
    fixtures: &HttpFixtures,
    recorder: &Recorder,
    method: String,
    url: String,
) -> ResponseFuture {
    let Some(answer) = fixtures.answer(&method, &url) else {
        let message = format!(
            "no HTTP fixture for {method} {url} in {}; add an entry for it",
            fixtures.source().display()
        );
        recorder.push(Call::Http {
            method,
            url,
            status: None,
            source: "fixture",
            error: Some(message.clone()),
        });
        return Box::new(async move { Err(HttpError::InternalError(Some(message))) });
    };
    recorder.push(Call::Http {
        method,
        url,
        status: Some(answer.status),
        source: "fixture",
        error: None,
    });
    Box::new(async move {
        use http_body_util::BodyExt;
        let mut builder = http::Response::builder().status(answer.status);
        for (k, v) in &answer.headers {
            builder = builder.header(k, v);
        }
        let body = http_body_util::Full::new(bytes::Bytes::from(answer.body))
            .map_err(|never| match never {})
            .boxed_unsync();
        let response = builder
            .body(body)
            .map_err(|e| HttpError::InternalError(Some(format!("HTTP fixture response: {e}"))))?;
        Ok((
            response,
            Box::new(async { Ok(()) }) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::authority_allowed;

    #[test]
    fn allow_list_matching() {
        let allow = vec!["api.example.com".to_string(), "localhost:8080".to_string()];
        assert!(authority_allowed(&allow, "api.example.com", None, 443));
        assert!(authority_allowed(&allow, "API.example.com", Some(9000), 80));
        assert!(authority_allowed(&allow, "localhost", Some(8080), 80));
        assert!(!authority_allowed(&allow, "localhost", Some(8081), 80));
        assert!(!authority_allowed(&allow, "localhost", None, 80));
        assert!(!authority_allowed(&allow, "evil.example.com", None, 443));
        assert!(!authority_allowed(&[], "api.example.com", None, 443));
    }
}
