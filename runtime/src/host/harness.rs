//! The capabilities' side of `outrun handlers run`, the test harness: a
//! [`Harness`] attached to a handler's [`Capabilities`](super::Capabilities)
//! records every call the handler makes (SQL with its result, kv, HTTP, log
//! lines) and can answer HTTP requests from a fixtures file instead of the
//! network. `serve` attaches none, so nothing here runs on the queue's path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// What a handler run may do beyond its grants, and where its calls go.
#[derive(Clone, Default)]
pub struct Harness {
    pub recorder: Recorder,
    /// Answer `wasi:http` requests from here instead of the network.
    pub fixtures: Option<Arc<HttpFixtures>>,
    /// Every event name may be emitted (the run records, it does not route).
    pub emit_any: bool,
    /// Every topic may be published to (a bare module has no grants).
    pub publish_any: bool,
    /// Send `publish` calls to the broker; otherwise they are only
    /// recorded (and succeed), as SQL is rolled back unless `--commit`.
    pub send_publish: bool,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("fixtures", &self.fixtures.as_ref().map(|x| &x.source))
            .field("emit_any", &self.emit_any)
            .field("publish_any", &self.publish_any)
            .field("send_publish", &self.send_publish)
            .finish()
    }
}

/// One capability call, in the order the handler made them.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Call {
    Sql {
        /// `query` or `execute`.
        op: &'static str,
        statement: String,
        params: Vec<serde_json::Value>,
        /// `{"columns","rows"}` for a query, `{"affected"}` for an execute.
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<serde_json::Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Kv {
        op: &'static str,
        /// As the handler passed it (without the handler's prefix).
        key: String,
        #[serde(skip_serializing_if = "serde_json::Value::is_null")]
        args: serde_json::Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<serde_json::Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Http {
        method: String,
        url: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        /// `network` or `fixture`.
        source: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Log {
        level: &'static str,
        context: String,
        message: String,
    },
    Publish {
        topic: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        headers: Vec<(String, String)>,
        /// The body as text when it is UTF-8 (else `body_hex`).
        #[serde(skip_serializing_if = "Option::is_none")]
        body: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        body_hex: Option<String>,
        /// Whether it went to the broker (else recorded only).
        sent: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl Call {
    /// The record of one published message.
    pub fn publish(m: &crate::publish::Message, sent: bool, error: Option<String>) -> Call {
        let (body, body_hex) = match std::str::from_utf8(&m.body) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (
                None,
                Some(m.body.iter().map(|b| format!("{b:02x}")).collect()),
            ),
        };
        Call::Publish {
            topic: m.topic.clone(),
            key: m.key.clone(),
            headers: m.headers.clone(),
            body,
            body_hex,
            sent,
            error,
        }
    }
}

/// A capability error as the run prints it: `denied: ...`.
pub fn cap_error_text(e: &super::CapError) -> String {
    use super::CapError;
    match e {
        CapError::Denied(m) => format!("denied: {m}"),
        CapError::Invalid(m) => format!("invalid: {m}"),
        CapError::Unavailable(m) => format!("unavailable: {m}"),
    }
}

/// A capability result as the record keeps it: the value or the error text.
pub fn outcome<T: Serialize>(
    r: &Result<T, super::CapError>,
) -> (Option<serde_json::Value>, Option<String>) {
    match r {
        Ok(v) => (Some(serde_json::json!(v)), None),
        Err(e) => (None, Some(cap_error_text(e))),
    }
}

/// The calls of one run. Cheap to clone; all clones share the list.
#[derive(Clone, Default)]
pub struct Recorder {
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Recorder {
    pub fn push(&self, call: Call) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Recorded HTTP answers, read from a JSON file: an array of
/// `{"method"?, "url", "status"?, "headers"?, "body"?}`. `method` absent
/// matches any method; `status` defaults to 200; a string `body` is sent as
/// it is, any other JSON value as its JSON text (with
/// `content-type: application/json` unless `headers` set one).
#[derive(Debug)]
pub struct HttpFixtures {
    source: PathBuf,
    entries: Vec<Fixture>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    #[serde(default)]
    method: Option<String>,
    url: String,
    #[serde(default = "ok_status")]
    status: u16,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: serde_json::Value,
}

fn ok_status() -> u16 {
    200
}

/// The answer a fixture gives.
#[derive(Debug, Clone, PartialEq)]
pub struct FixtureResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A fixtures file that cannot be used; names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read HTTP fixtures {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "HTTP fixtures {} are not valid: {reason}; write a JSON array of {{\"method\", \"url\", \"status\", \"headers\", \"body\"}}",
        path.display()
    )]
    Invalid { path: PathBuf, reason: String },
}

impl HttpFixtures {
    pub fn load(path: &Path) -> Result<HttpFixtures, FixtureError> {
        let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<HttpFixtures, FixtureError> {
        let invalid = |reason: String| FixtureError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let entries: Vec<Fixture> =
            serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (i, f) in entries.iter().enumerate() {
            let uri: http::Uri = f
                .url
                .parse()
                .map_err(|e| invalid(format!("entry {i}: url {:?}: {e}", f.url)))?;
            if uri.scheme().is_none() || uri.host().is_none() {
                return Err(invalid(format!(
                    "entry {i}: url {:?} needs a scheme and a host, e.g. http://api.example.com/path",
                    f.url
                )));
            }
            if http::StatusCode::from_u16(f.status).is_err() {
                return Err(invalid(format!(
                    "entry {i}: status {} is not an HTTP status",
                    f.status
                )));
            }
        }
        Ok(HttpFixtures {
            source: path.to_path_buf(),
            entries,
        })
    }

    /// `host:port` of every fixture URL: a run with fixtures may reach them.
    pub fn hosts(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|f| {
                let uri: http::Uri = f.url.parse().ok()?;
                let default = if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                };
                Some(format!(
                    "{}:{}",
                    uri.host()?,
                    uri.port_u16().unwrap_or(default)
                ))
            })
            .collect()
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The first fixture for this method and URL (compared without a
    /// default port: `http://h/x` and `http://h:80/x` are the same).
    pub fn answer(&self, method: &str, url: &str) -> Option<FixtureResponse> {
        let want = normalize(url);
        let f = self.entries.iter().find(|f| {
            f.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && normalize(&f.url) == want
        })?;
        let mut headers: Vec<(String, String)> = f
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let body = match &f.body {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::String(s) => s.clone().into_bytes(),
            other => {
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                other.to_string().into_bytes()
            }
        };
        Some(FixtureResponse {
            status: f.status,
            headers,
            body,
        })
    }
}

fn normalize(url: &str) -> String {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return url.to_string();
    };
    let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
    let default = if scheme == "https" { 443 } else { 80 };
    let host = uri.host().unwrap_or("").to_ascii_lowercase();
    let port = uri
        .port_u16()
        .filter(|p| *p != default)
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("{scheme}://{host}{port}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures(text: &str) -> HttpFixtures {
        HttpFixtures::parse(Path::new("f.json"), text).unwrap()
    }

    #[test]
    fn matches_method_and_url() {
        let f = fixtures(
            r#"[{"method":"GET","url":"http://Api.local/a?x=1","body":{"ok":true}},
                {"url":"http://api.local:8080/b","status":404,"body":"gone","headers":{"x-why":"test"}}]"#,
        );
        let a = f.answer("get", "http://api.local:80/a?x=1").unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.body, br#"{"ok":true}"#);
        assert!(
            a.headers
                .contains(&("content-type".into(), "application/json".into()))
        );
        assert!(
            f.answer("POST", "http://api.local/a?x=1").is_none(),
            "method differs"
        );
        assert!(
            f.answer("GET", "http://api.local/a").is_none(),
            "query differs"
        );
        let b = f.answer("DELETE", "http://api.local:8080/b").unwrap();
        assert_eq!((b.status, b.body.as_slice()), (404, &b"gone"[..]));
        assert_eq!(b.headers, vec![("x-why".to_string(), "test".to_string())]);
        assert!(
            f.answer("GET", "http://api.local/b").is_none(),
            "port differs"
        );
    }

    #[test]
    fn bad_files_name_the_entry() {
        for (text, needle) in [
            ("[", "EOF"),
            ("{}", "expected a sequence"),
            (r#"[{"url":"/relative"}]"#, "entry 0"),
            (r#"[{"url":"http://a/","status":1000}]"#, "status 1000"),
            (r#"[{"url":"http://a/","stauts":200}]"#, "unknown field"),
        ] {
            let e = HttpFixtures::parse(Path::new("f.json"), text).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("f.json") && msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn recorder_keeps_order() {
        let r = Recorder::default();
        let clone = r.clone();
        clone.push(Call::Log {
            level: "info",
            context: String::new(),
            message: "one".into(),
        });
        r.push(Call::Log {
            level: "warn",
            context: String::new(),
            message: "two".into(),
        });
        let calls = r.calls();
        assert_eq!(calls.len(), 2);
        assert!(matches!(&calls[1], Call::Log { message, .. } if message == "two"));
    }
}
