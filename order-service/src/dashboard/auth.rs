//! Who may read the dashboard: with `ADMIN_TOKEN` set, a request must carry
//! it as `Authorization: Bearer <token>`, or carry the session cookie a
//! browser gets by opening any dashboard URL once with `?token=<token>`.
//! Without `ADMIN_TOKEN` the dashboard is open (it only reads).
//!
//! The cookie holds a digest of the token, not the token: it lets a browser
//! read the dashboard, but it is no use against the admin API. Every
//! comparison takes the same time whatever the bytes (digests of equal
//! length, compared with `subtle`).

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, COOKIE, LOCATION, SET_COOKIE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::html::{esc, page};
use crate::config::AdminToken;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "saga_dashboard";

/// What a request must present, derived once from `ADMIN_TOKEN`.
#[derive(Clone)]
pub struct Access {
    /// SHA-256 of the token (`None`: the dashboard is open).
    token_digest: Option<[u8; 32]>,
    /// The cookie value that stands for the token.
    session: String,
}

impl Access {
    /// Access guarded by `token`, or open when it is `None`.
    pub fn new(token: Option<&AdminToken>) -> Self {
        match token {
            None => Self {
                token_digest: None,
                session: String::new(),
            },
            Some(token) => Self {
                token_digest: Some(digest(token.expose().as_bytes())),
                session: session_value(token.expose()),
            },
        }
    }

    /// Whether the dashboard asks for the token at all.
    pub fn is_open(&self) -> bool {
        self.token_digest.is_none()
    }

    fn token_matches(&self, presented: &str) -> bool {
        self.token_digest
            .is_some_and(|expected| bool::from(digest(presented.as_bytes()).ct_eq(&expected)))
    }

    fn session_matches(&self, presented: &str) -> bool {
        !self.session.is_empty() && bool::from(presented.as_bytes().ct_eq(self.session.as_bytes()))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The session cookie's value for `token`: a digest under a label of its own,
/// so it is never the token, nor its plain digest.
fn session_value(token: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"saga-dashboard-session\0");
    hasher.update(token.as_bytes());
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Lets a request through when the dashboard is open or it presents the
/// token (header or cookie); answers `?token=` with the cookie and a
/// redirect to the same URL without the token; otherwise 401.
pub async fn require_token(State(access): State<Access>, request: Request, next: Next) -> Response {
    if access.is_open() {
        return next.run(request).await;
    }
    let headers = request.headers();
    let bearer = bearer(headers).is_some_and(|token| access.token_matches(token));
    let cookie = cookies(headers).any(|(name, value)| name == SESSION_COOKIE && access.session_matches(value));
    if bearer || cookie {
        return next.run(request).await;
    }
    let query = request.uri().query().unwrap_or_default();
    if let Some(token) = query_token(query)
        && access.token_matches(&token)
    {
        return login(&access, request.uri().path(), query);
    }
    unauthorized()
}

/// `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
}

/// The `token` parameter of a query string, percent-decoded.
fn query_token(query: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "token")
        .and_then(|(_, value)| percent_decode(value))
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = value.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Sets the session cookie and sends the browser back to `path` with the
/// rest of `query`, so the token leaves the address bar and the history.
fn login(access: &Access, path: &str, query: &str) -> Response {
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("token"))
        .collect();
    let location = if rest.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", rest.join("&"))
    };
    let cookie = format!("{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", access.session);
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    // The path and query came in a valid request line, so they are valid here.
    if let Ok(location) = HeaderValue::from_str(&location) {
        headers.insert(LOCATION, location);
    }
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        headers.insert(SET_COOKIE, cookie);
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn unauthorized() -> Response {
    let body = page(
        "Sign in",
        &format!(
            "<h1>The dashboard needs the admin token</h1>\
             <p>This service has <code>ADMIN_TOKEN</code> set. Open this page once as \
             <code>{}</code> (a session cookie keeps you in), or send \
             <code>Authorization: Bearer &lt;token&gt;</code>.</p>",
            esc("/?token=<token>")
        ),
    );
    let mut response = (StatusCode::UNAUTHORIZED, axum::response::Html(body)).into_response();
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"saga dashboard\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_neither_the_token_nor_its_plain_digest() {
        let token = AdminToken::new("s3cret");
        let access = Access::new(Some(&token));
        assert_eq!(access.session.len(), 64);
        assert!(!access.session.contains("s3cret"));
        let plain: String = digest(b"s3cret").iter().map(|b| format!("{b:02x}")).collect();
        assert_ne!(access.session, plain);
        assert!(access.token_matches("s3cret"));
        assert!(!access.token_matches("s3cre"));
        assert!(!access.token_matches(""));
        assert!(access.session_matches(&session_value("s3cret")));
        assert!(!access.session_matches(&session_value("other")));
    }

    #[test]
    fn an_open_dashboard_accepts_nothing_as_a_token() {
        let access = Access::new(None);
        assert!(access.is_open());
        assert!(!access.token_matches(""));
        assert!(!access.session_matches(""));
    }

    #[test]
    fn reads_bearer_cookies_and_the_query_token() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer  abc "));
        headers.insert(COOKIE, HeaderValue::from_static("a=1; saga_dashboard=xyz"));
        assert_eq!(bearer(&headers), Some("abc"));
        assert!(cookies(&headers).any(|(n, v)| n == SESSION_COOKIE && v == "xyz"));
        assert_eq!(query_token("q=1&token=a%2Bb+c"), Some("a+b c".to_owned()));
        assert_eq!(query_token("q=1"), None);
        assert_eq!(query_token("token=%zz"), None);
    }
}
