//! Blocking outgoing HTTP over `wasi:http/outgoing-handler`. The config grants
//! it per host (an allow-list); a host not on the list fails with
//! [`HttpError::Denied`].
//!
//! ```ignore
//! let resp = http::Request::post(url).json(&payload)?.timeout(Duration::from_secs(5)).send()?;
//! let resp = resp.error_for_status()?; // 5xx/429/408 retry, other non-2xx reject
//! ```

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::HandlerError;
use crate::bindings::wasi::clocks::monotonic_clock;
use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types as wit;
use crate::bindings::wasi::io::poll;
use crate::bindings::wasi::io::streams::StreamError;

/// Time allowed for a whole exchange (connect, send, response, body) unless
/// [`Request::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes written to the request body stream per call; wasi:io output streams
/// accept at most 4096 bytes per `blocking-write-and-flush`.
const WRITE_CHUNK: usize = 4096;
const READ_CHUNK: u64 = 64 * 1024;

/// An HTTP method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// HEAD
    Head,
    /// POST
    Post,
    /// PUT
    Put,
    /// PATCH
    Patch,
    /// DELETE
    Delete,
    /// OPTIONS
    Options,
    /// Any other method, by name.
    Other(String),
}

impl Method {
    /// Parse a method name, case-insensitively; unknown names become
    /// [`Method::Other`] in upper case.
    pub fn parse(name: &str) -> Self {
        match name.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        }
    }

    fn to_wit(&self) -> wit::Method {
        match self {
            Method::Get => wit::Method::Get,
            Method::Head => wit::Method::Head,
            Method::Post => wit::Method::Post,
            Method::Put => wit::Method::Put,
            Method::Patch => wit::Method::Patch,
            Method::Delete => wit::Method::Delete,
            Method::Options => wit::Method::Options,
            Method::Other(m) => wit::Method::Other(m.clone()),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Other(m) => m,
        })
    }
}

/// Why an exchange produced no response. (A response with an error status is
/// not an `HttpError`; see [`Response::error_for_status`].)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The handler's config does not allow this host.
    #[error(
        "{method} {url}: denied by the runtime (add the host to this handler's allowed HTTP hosts in the config)"
    )]
    Denied {
        /// The request method.
        method: String,
        /// The request URL.
        url: String,
    },
    /// The request cannot be sent as written (bad URL, header, method).
    #[error("{method} {url}: invalid request: {detail}")]
    InvalidRequest {
        /// The request method.
        method: String,
        /// The request URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// No complete response within the timeout.
    #[error("{method} {url}: no complete response within {timeout:?}")]
    Timeout {
        /// The request method.
        method: String,
        /// The request URL.
        url: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// DNS, connection, TLS or protocol failure.
    #[error("{method} {url}: {detail}")]
    Transport {
        /// The request method.
        method: String,
        /// The request URL.
        url: String,
        /// What failed.
        detail: String,
    },
}

/// A denied host or an invalid request will fail the same way next time, so
/// they reject; timeouts and transport failures retry.
impl From<HttpError> for HandlerError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Denied { .. } | HttpError::InvalidRequest { .. } => {
                HandlerError::reject(e.to_string())
            }
            HttpError::Timeout { .. } | HttpError::Transport { .. } => {
                HandlerError::retry(e.to_string())
            }
        }
    }
}

/// A response, read in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case, as wasi:http delivers them) and values;
    /// values that are not UTF-8 are converted lossily.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// `METHOD url` of the request, for error messages.
    request: String,
}

impl Response {
    /// Build a response by hand (for tests of code that consumes responses).
    pub fn new(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Self {
        Self {
            status,
            headers,
            body,
            request: "request".to_owned(),
        }
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text, lossily.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Parse the body as JSON. A body that does not parse is the other
    /// service's fault and will not improve on a retry: reject, naming the
    /// request and what did not parse.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            HandlerError::reject(format!(
                "{} answered {} with a body that is not the expected JSON: {e}; body: {}",
                self.request,
                self.status,
                self.snippet()
            ))
        })
    }

    /// `Ok(self)` for 2xx. 5xx, 429 (too many requests) and 408 (request
    /// timeout) are transient: retry. Any other status will be answered the
    /// same way next time: reject. The message carries the start of the body.
    pub fn error_for_status(self) -> Result<Self, HandlerError> {
        if self.is_success() {
            return Ok(self);
        }
        let message = format!(
            "{} answered {}: {}",
            self.request,
            self.status,
            self.snippet()
        );
        if is_transient_status(self.status) {
            Err(HandlerError::retry(message))
        } else {
            Err(HandlerError::reject(message))
        }
    }

    fn snippet(&self) -> String {
        const MAX: usize = 200;
        let text = String::from_utf8_lossy(&self.body);
        match text.char_indices().nth(MAX) {
            Some((i, _)) => format!("{}…", &text[..i]),
            None => text.into_owned(),
        }
    }
}

/// Statuses worth retrying: the server is overloaded, down or slow.
pub fn is_transient_status(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

/// An outgoing request, built then [`send`](Request::send)t.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Duration,
}

impl Request {
    /// A request with no headers, an empty body and [`DEFAULT_TIMEOUT`].
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Self {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// A GET request.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new(Method::Get, url)
    }

    /// A POST request.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new(Method::Post, url)
    }

    /// A DELETE request.
    pub fn delete(url: impl Into<String>) -> Self {
        Self::new(Method::Delete, url)
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Set the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Set the body to `value` as JSON, with `content-type: application/json`.
    pub fn json(self, value: &impl Serialize) -> Result<Self, HttpError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| self.invalid(format!("body cannot be serialised as JSON: {e}")))?;
        Ok(self.header("content-type", "application/json").body(body))
    }

    /// Time allowed for the whole exchange, including reading the body.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Send the request and read the whole response, blocking the handler.
    pub fn send(&self) -> Result<Response, HttpError> {
        let target = Target::parse(&self.url).map_err(|d| self.invalid(d))?;
        let deadline = monotonic_clock::now().saturating_add(nanos(self.timeout));

        let request = wit::OutgoingRequest::new(self.fields()?);
        request.set_method(&self.method.to_wit()).map_err(|()| {
            self.invalid(format!(
                "method `{}` is not a valid HTTP method",
                self.method
            ))
        })?;
        request
            .set_scheme(Some(&target.scheme))
            .map_err(|()| self.invalid("scheme rejected".to_owned()))?;
        request
            .set_authority(Some(&target.authority))
            .map_err(|()| {
                self.invalid(format!(
                    "host `{}` is not a valid authority",
                    target.authority
                ))
            })?;
        request
            .set_path_with_query(Some(&target.path_with_query))
            .map_err(|()| {
                self.invalid(format!("path `{}` is not valid", target.path_with_query))
            })?;
        let body = request
            .body()
            .map_err(|()| self.invalid("request body unavailable".to_owned()))?;

        // Ask the host to enforce the timeout too, so a stuck connection is
        // torn down on its side; hosts that refuse these options are still
        // bounded by our own deadline below.
        let options = wit::RequestOptions::new();
        let _ = options.set_connect_timeout(Some(nanos(self.timeout)));
        let _ = options.set_first_byte_timeout(Some(nanos(self.timeout)));
        let _ = options.set_between_bytes_timeout(Some(nanos(self.timeout)));

        let future = outgoing_handler::handle(request, Some(options))
            .map_err(|c| self.error_from_code(c))?;
        self.write_body(body)?;

        let timer = monotonic_clock::subscribe_instant(deadline);
        let response = self.await_response(&future, &timer)?;
        drop(future);
        self.read_response(response, &timer)
    }

    fn fields(&self) -> Result<wit::Fields, HttpError> {
        let mut entries: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone().into_bytes()))
            .collect();
        let has_length = entries.iter().any(|(n, _)| n == "content-length");
        // A request that may carry content states its length, 0 included:
        // without one the host streams the body chunked, ending it when
        // `write_body` finishes it, after the request went out; a server
        // that answers before that end (it reads no body for a DELETE)
        // may close the connection under its answer, and the handler sees
        // a protocol error for a request that was carried out.
        let may_carry = !matches!(self.method, Method::Get | Method::Head | Method::Options);
        if !has_length && (may_carry || !self.body.is_empty()) {
            entries.push((
                "content-length".to_owned(),
                self.body.len().to_string().into_bytes(),
            ));
        }
        wit::Fields::from_list(&entries).map_err(|e| {
            let why = match e {
                wit::HeaderError::InvalidSyntax => "a header name or value is not valid HTTP",
                wit::HeaderError::Forbidden => {
                    "a header is one the runtime does not allow guests to set"
                }
                wit::HeaderError::Immutable => "headers are immutable",
            };
            let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
            self.invalid(format!("{why} (headers: {})", names.join(", ")))
        })
    }

    fn write_body(&self, body: wit::OutgoingBody) -> Result<(), HttpError> {
        if !self.body.is_empty() {
            let stream = body
                .write()
                .map_err(|()| self.invalid("request body stream unavailable".to_owned()))?;
            for chunk in self.body.chunks(WRITE_CHUNK) {
                stream.blocking_write_and_flush(chunk).map_err(|e| {
                    self.transport(format!(
                        "writing the request body failed: {}",
                        stream_error(e)
                    ))
                })?;
            }
            // The stream is a child of the body: it must go before `finish`.
            drop(stream);
        }
        wit::OutgoingBody::finish(body, None).map_err(|c| self.error_from_code(c))
    }

    fn await_response(
        &self,
        future: &wit::FutureIncomingResponse,
        timer: &poll::Pollable,
    ) -> Result<wit::IncomingResponse, HttpError> {
        let ready = future.subscribe();
        loop {
            match future.get() {
                Some(Ok(Ok(response))) => return Ok(response),
                Some(Ok(Err(code))) => return Err(self.error_from_code(code)),
                Some(Err(())) => return Err(self.transport("response already taken".to_owned())),
                None if timer.ready() => return Err(self.timed_out()),
                None => {
                    poll::poll(&[&ready, timer]);
                }
            }
        }
    }

    fn read_response(
        &self,
        response: wit::IncomingResponse,
        timer: &poll::Pollable,
    ) -> Result<Response, HttpError> {
        let status = response.status();
        let headers = {
            // A child of the response: read and drop it before consuming.
            let fields = response.headers();
            fields
                .entries()
                .into_iter()
                .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
                .collect()
        };
        let incoming = response
            .consume()
            .map_err(|()| self.transport("response body unavailable".to_owned()))?;
        let stream = incoming
            .stream()
            .map_err(|()| self.transport("response body stream unavailable".to_owned()))?;
        let mut body = Vec::new();
        {
            let readable = stream.subscribe();
            loop {
                match stream.read(READ_CHUNK) {
                    Ok(chunk) if !chunk.is_empty() => body.extend_from_slice(&chunk),
                    Ok(_) if timer.ready() => return Err(self.timed_out()),
                    Ok(_) => {
                        poll::poll(&[&readable, timer]);
                    }
                    Err(StreamError::Closed) => break,
                    Err(e) => {
                        return Err(self.transport(format!(
                            "reading the response body failed: {}",
                            stream_error(e)
                        )));
                    }
                }
            }
        }
        drop(stream);
        drop(wit::IncomingBody::finish(incoming));
        Ok(Response {
            status,
            headers,
            body,
            request: format!("{} {}", self.method, self.url),
        })
    }

    fn invalid(&self, detail: String) -> HttpError {
        HttpError::InvalidRequest {
            method: self.method.to_string(),
            url: self.url.clone(),
            detail,
        }
    }

    fn transport(&self, detail: String) -> HttpError {
        HttpError::Transport {
            method: self.method.to_string(),
            url: self.url.clone(),
            detail,
        }
    }

    fn timed_out(&self) -> HttpError {
        HttpError::Timeout {
            method: self.method.to_string(),
            url: self.url.clone(),
            timeout: self.timeout,
        }
    }

    fn error_from_code(&self, code: wit::ErrorCode) -> HttpError {
        use wit::ErrorCode as C;
        match code {
            C::HttpRequestDenied => HttpError::Denied {
                method: self.method.to_string(),
                url: self.url.clone(),
            },
            C::HttpRequestUriInvalid | C::HttpRequestMethodInvalid => {
                self.invalid(format!("{code:?}"))
            }
            C::DnsTimeout
            | C::ConnectionTimeout
            | C::ConnectionReadTimeout
            | C::ConnectionWriteTimeout
            | C::HttpResponseTimeout => self.timed_out(),
            C::ConnectionRefused => self.transport("connection refused".to_owned()),
            C::DnsError(p) => self.transport(format!(
                "DNS lookup failed: {}",
                p.rcode
                    .or(p.info_code.map(|c| c.to_string()))
                    .unwrap_or_default()
            )),
            C::InternalError(Some(m)) => self.transport(m),
            other => self.transport(format!("{other:?}")),
        }
    }
}

fn stream_error(e: StreamError) -> String {
    match e {
        StreamError::Closed => "stream closed".to_owned(),
        StreamError::LastOperationFailed(err) => err.to_debug_string(),
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The parts of a URL that wasi:http wants separately.
#[derive(Debug)]
struct Target {
    scheme: wit::Scheme,
    authority: String,
    path_with_query: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            "URL has no scheme; write http://host/path or https://host/path".to_owned()
        })?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => wit::Scheme::Http,
            "https" => wit::Scheme::Https,
            other => {
                return Err(format!(
                    "scheme `{other}` is not supported; use http or https"
                ));
            }
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.is_empty() {
            return Err("URL has no host".to_owned());
        }
        if authority.contains('@') {
            return Err(
                "credentials in the URL are not supported; send an authorization header".to_owned(),
            );
        }
        let path_with_query = match path.chars().next() {
            None => "/".to_owned(),
            Some('?') => format!("/{path}"),
            Some(_) => path.to_owned(),
        };
        Ok(Self {
            scheme,
            authority: authority.to_owned(),
            path_with_query,
        })
    }
}

/// Percent-encode `s` for use as one path segment or query value: everything
/// but RFC 3986 unreserved characters is escaped, so ids with `/`, `?`, `&`
/// or spaces cannot change the URL's shape.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Send `method url` with `headers` and an optional body.
pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, HttpError> {
    let mut req = Request::new(method, url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    req.send()
}

/// GET `url`.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

/// POST `value` as JSON to `url`.
pub fn post_json(url: &str, value: &impl Serialize) -> Result<Response, HttpError> {
    Request::post(url).json(value)?.send()
}

/// DELETE `url`.
pub fn delete(url: &str) -> Result<Response, HttpError> {
    Request::delete(url).send()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts() {
        let t = Target::parse("http://127.0.0.1:8080/v1/family?user_id=7#frag").unwrap();
        assert!(matches!(t.scheme, wit::Scheme::Http));
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path_with_query, "/v1/family?user_id=7");
        assert_eq!(
            Target::parse("HTTPS://storage").unwrap().path_with_query,
            "/"
        );
        assert_eq!(
            Target::parse("http://h?x=1").unwrap().path_with_query,
            "/?x=1"
        );
    }

    #[test]
    fn bad_urls_say_why() {
        assert!(
            Target::parse("storage/packages")
                .unwrap_err()
                .contains("no scheme")
        );
        assert!(Target::parse("ftp://h/").unwrap_err().contains("`ftp`"));
        assert!(Target::parse("http:///x").unwrap_err().contains("no host"));
        assert!(
            Target::parse("http://u:p@h/")
                .unwrap_err()
                .contains("credentials")
        );
        let err = Request::get("nope").send().unwrap_err();
        assert!(matches!(err, HttpError::InvalidRequest { .. }), "{err}");
        assert!(!HandlerError::from(err).is_retryable());
    }

    #[test]
    fn status_classes() {
        let ok = Response::new(204, vec![], vec![]);
        assert!(ok.error_for_status().is_ok());
        let down = Response::new(503, vec![], b"maintenance".to_vec())
            .error_for_status()
            .unwrap_err();
        assert!(
            down.is_retryable()
                && down.message().contains("503")
                && down.message().contains("maintenance")
        );
        assert!(
            Response::new(429, vec![], vec![])
                .error_for_status()
                .unwrap_err()
                .is_retryable()
        );
        assert!(
            !Response::new(400, vec![], vec![])
                .error_for_status()
                .unwrap_err()
                .is_retryable()
        );
    }

    #[test]
    fn header_lookup_ignores_case() {
        let r = Response::new(
            200,
            vec![("content-type".into(), "text/plain".into())],
            vec![],
        );
        assert_eq!(r.header("Content-Type"), Some("text/plain"));
        assert_eq!(r.header("x"), None);
    }

    #[test]
    fn malformed_json_body_rejects() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Family {
            admin: String,
        }
        let e = Response::new(200, vec![], b"<html>".to_vec())
            .json::<Family>()
            .unwrap_err();
        assert!(!e.is_retryable() && e.message().contains("<html>"));
    }

    #[test]
    fn transport_errors_retry() {
        let req = Request::get("http://h/");
        assert!(
            HandlerError::from(req.error_from_code(wit::ErrorCode::ConnectionRefused))
                .is_retryable()
        );
        assert!(matches!(
            req.error_from_code(wit::ErrorCode::HttpResponseTimeout),
            HttpError::Timeout { .. }
        ));
        let denied = req.error_from_code(wit::ErrorCode::HttpRequestDenied);
        assert!(matches!(denied, HttpError::Denied { .. }));
        assert!(!HandlerError::from(denied).is_retryable());
    }

    #[test]
    fn components_are_escaped() {
        assert_eq!(
            encode_component("a b/c?d&e=ф~._-"),
            "a%20b%2Fc%3Fd%26e%3D%D1%84~._-"
        );
    }

    #[test]
    fn methods_parse() {
        assert_eq!(Method::parse("delete"), Method::Delete);
        assert_eq!(Method::parse("purge"), Method::Other("PURGE".into()));
        assert_eq!(Method::Other("PURGE".into()).to_string(), "PURGE");
    }
}
