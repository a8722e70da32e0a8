//! The admin token: `Authorization: Bearer <token>` on every request that
//! changes something (POST, PUT, PATCH, DELETE), and on reads under /v1
//! when `[admin] token_for_reads` is set. Without a configured token the
//! changing requests are refused: an admin port reachable by mistake must
//! not let anyone cancel or purge events.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

#[derive(Clone, Default)]
pub struct Auth {
    pub token: Option<Arc<str>>,
    pub token_for_reads: bool,
}

impl Auth {
    pub fn from_config(c: &crate::config::AdminConfig) -> Auth {
        Auth {
            token: c.token.as_deref().map(Arc::from),
            token_for_reads: c.token_for_reads,
        }
    }
}

/// Paths any caller may read: probes, metrics, the API's description and
/// the dashboard's files (they hold no data; the page asks for the token
/// when the API wants it).
fn always_open(path: &str) -> bool {
    matches!(
        path,
        "/livez" | "/readyz" | "/healthz" | "/metrics" | "/v1/openapi.json"
    ) || path == "/ui"
        || path.starts_with("/ui/")
}

pub async fn require_token(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let needed = if mutating {
        true
    } else {
        auth.token_for_reads && !always_open(req.uri().path())
    };
    if !needed {
        return next.run(req).await;
    }
    let Some(token) = auth.token.as_deref() else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this request changes events, and no admin token is configured: set `[admin] token` \
             (or OUTRUN_ADMIN_TOKEN) and send it as `Authorization: Bearer <token>`",
        )
        .into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same(g.trim().as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => {
            unauthorized("the bearer token is wrong; use `[admin] token` (OUTRUN_ADMIN_TOKEN)")
        }
        None => unauthorized(
            "this request needs the admin token: send `Authorization: Bearer <token>` with `[admin] token` (OUTRUN_ADMIN_TOKEN)",
        ),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"outrun\""),
    );
    res
}

/// Compares in time independent of where the first difference is, so the
/// token cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_compares_whole_tokens() {
        assert!(super::same(b"secret", b"secret"));
        assert!(!super::same(b"secret", b"secreT"));
        assert!(!super::same(b"secret", b"secret2"));
        assert!(!super::same(b"", b"x"));
    }
}
