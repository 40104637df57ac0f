//! People's authentication: the login token of `POST /v1/auth/login`, sent as
//! `Authorization: Bearer <token>`, or the same token in the web app's `HttpOnly` cookie set by
//! `POST /v1/auth/session`. Checked on every request (no cache: expiry, logout, revocation and
//! erasure take effect at once), whichever way it came.
//!
//! A request that authenticates with the cookie and changes anything (any method but GET, HEAD
//! and OPTIONS) must carry an `Origin` header naming this site: with `SameSite=Strict` the
//! browser sends no cookie on another site's requests, and this check refuses them even where a
//! browser would.

use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, COOKIE, HOST, ORIGIN};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use biofeed_accounts::login;
use biofeed_accounts::policy::Actor;
use chrono::{DateTime, Utc};
use cookie::{Cookie, SameSite};

use crate::bearer::bearer;
use crate::people::PeopleState;
use crate::problem::ApiError;

/// The web app's login cookie over plain HTTP (a development gateway).
pub const LOGIN_COOKIE: &str = "biofeed_login";
/// Its name when `Secure`: the `__Host-` prefix makes browsers refuse it unless it was set by
/// this very host over HTTPS for the whole site, so a sibling subdomain cannot plant one.
pub const SECURE_LOGIN_COOKIE: &str = "__Host-biofeed_login";

/// The login cookie's name for this gateway.
pub(crate) fn cookie_name(secure: bool) -> &'static str {
    if secure {
        SECURE_LOGIN_COOKIE
    } else {
        LOGIN_COOKIE
    }
}

/// How a request's login token came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `Authorization: Bearer`.
    Bearer,
    /// The web app's cookie.
    Cookie,
}

/// The person a request speaks for, with their role's permissions, and the token used.
#[derive(Debug, Clone)]
pub struct UserAuth {
    /// Who.
    pub actor: Actor,
    /// The login token (for logout).
    pub token: String,
    /// How it came.
    pub via: Via,
}

impl FromRequestParts<PeopleState> for UserAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &PeopleState,
    ) -> Result<Self, Self::Rejection> {
        let (token, via) = if parts.headers.contains_key(AUTHORIZATION) {
            (bearer(parts, "login token")?.to_owned(), Via::Bearer)
        } else if let Some(token) = login_cookie(&parts.headers, state.inner.secure_cookies) {
            if !is_safe(&parts.method) {
                same_origin(&parts.headers, &parts.uri, state.inner.secure_cookies)?;
            }
            (token, Via::Cookie)
        } else {
            return Err(ApiError::Unauthorized(
                "no Authorization header: send `Bearer <login token>` (or log in to the web app)"
                    .to_owned(),
            ));
        };
        let actor = login::authenticate(&state.inner.accounts.pool, &token)
            .await?
            .ok_or_else(|| {
                ApiError::Unauthorized("the login token is unknown, expired or revoked".to_owned())
            })?;
        Ok(Self { actor, token, via })
    }
}

/// The login cookie's token, if the request has one.
fn login_cookie(headers: &HeaderMap, secure: bool) -> Option<String> {
    let name = cookie_name(secure);
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name && !c.value().is_empty())
        .map(|c| c.value().to_owned())
}

/// Methods that change nothing.
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Refuses (403) a request whose `Origin` is missing or names another site than the one it was
/// sent to: its `Host` header (HTTP/1.1) or its URI's authority (HTTP/2's `:authority`), and,
/// where the site is served over HTTPS (`secure`), an `http://` origin.
pub(crate) fn same_origin(headers: &HeaderMap, uri: &Uri, secure: bool) -> Result<(), ApiError> {
    let refuse = |why: &str| {
        Err(ApiError::Forbidden(format!(
            "{why}: a request that changes something with the login cookie must come from this site's own pages"
        )))
    };
    let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) else {
        return refuse("no Origin header");
    };
    let host = headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    let Some(host) = host else {
        return refuse("no Host header");
    };
    let authority = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://").filter(|_| !secure));
    match authority {
        Some(authority) if authority.eq_ignore_ascii_case(host) => Ok(()),
        _ => refuse("the Origin header names another site"),
    }
}

/// The `Set-Cookie` value that hands the browser its login token: `HttpOnly` (no script reads
/// it), `SameSite=Strict`, `Secure` when `secure`, expiring with the token.
pub(crate) fn set_login_cookie(
    token: &str,
    expires_at: DateTime<Utc>,
    secure: bool,
) -> Result<HeaderValue, ApiError> {
    let max_age = (expires_at - Utc::now()).num_seconds().max(0);
    HeaderValue::from_str(&login_cookie_header(token, max_age, secure))
        .map_err(|e| ApiError::Internal(e.into()))
}

/// The `Set-Cookie` value that makes the browser forget its login cookie.
pub(crate) fn clear_login_cookie(secure: bool) -> HeaderValue {
    HeaderValue::from_str(&login_cookie_header("", 0, secure)).unwrap_or(HeaderValue::from_static(
        "biofeed_login=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict",
    ))
}

/// The login cookie with its attributes, holding `value` for `max_age` seconds.
fn login_cookie_header(value: &str, max_age: i64, secure: bool) -> String {
    Cookie::build((cookie_name(secure), value))
        .path("/")
        .http_only(true)
        .secure(secure)
        .same_site(SameSite::Strict)
        .max_age(cookie::time::Duration::seconds(max_age))
        .build()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn the_login_cookie_is_found_among_others_and_an_empty_one_is_none() {
        let h = headers(&[("cookie", "a=1; biofeed_login=tok123; b=2")]);
        assert_eq!(login_cookie(&h, false).as_deref(), Some("tok123"));
        let empty = headers(&[("cookie", "biofeed_login=")]);
        assert_eq!(login_cookie(&empty, false), None);
        assert_eq!(
            login_cookie(&headers(&[("cookie", "other=1")]), false),
            None
        );
        // Over HTTPS only the __Host- cookie counts: a plain one may have been planted.
        assert_eq!(login_cookie(&h, true), None);
        let both = headers(&[("cookie", "biofeed_login=x; __Host-biofeed_login=real")]);
        assert_eq!(login_cookie(&both, true).as_deref(), Some("real"));
    }

    #[test]
    fn only_this_sites_origin_passes() {
        let none = Uri::from_static("/v1/me");
        let ok = headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080"),
        ]);
        assert!(same_origin(&ok, &none, false).is_ok());
        // A site served over HTTPS takes no http:// origin.
        assert!(same_origin(&ok, &none, true).is_err());
        let tls = headers(&[
            ("origin", "https://Biofeed.example"),
            ("host", "biofeed.example"),
        ]);
        assert!(same_origin(&tls, &none, true).is_ok());
        // HTTP/2: no Host header, the authority is the URI's.
        let h2 = headers(&[("origin", "https://127.0.0.1:8443")]);
        let authority = Uri::from_static("https://127.0.0.1:8443/v1/me");
        assert!(same_origin(&h2, &authority, true).is_ok());
        assert!(same_origin(&h2, &none, true).is_err());
        for bad in [
            headers(&[("host", "127.0.0.1:8080")]),
            headers(&[("origin", "null"), ("host", "127.0.0.1:8080")]),
            headers(&[
                ("origin", "http://evil.example"),
                ("host", "127.0.0.1:8080"),
            ]),
            headers(&[
                ("origin", "http://127.0.0.1:8081"),
                ("host", "127.0.0.1:8080"),
            ]),
        ] {
            let refused = same_origin(&bad, &none, false);
            assert!(matches!(refused, Err(ApiError::Forbidden(_))));
        }
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_when_asked() {
        let later = Utc::now() + chrono::Duration::hours(1);
        let v = set_login_cookie("t", later, true).unwrap();
        let v = v.to_str().unwrap();
        for part in [
            "__Host-biofeed_login=t",
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/",
        ] {
            assert!(v.contains(part), "{v}");
        }
        let plain = set_login_cookie("t", later, false).unwrap();
        let plain = plain.to_str().unwrap();
        assert!(
            plain.starts_with("biofeed_login=t") && !plain.contains("Secure"),
            "{plain}"
        );
        assert!(clear_login_cookie(false)
            .to_str()
            .unwrap()
            .contains("Max-Age=0"));
        assert!(clear_login_cookie(true)
            .to_str()
            .unwrap()
            .starts_with("__Host-"));
    }
}
