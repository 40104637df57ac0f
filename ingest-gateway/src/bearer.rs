//! The `Authorization: Bearer <token>` header, read the same way for device tokens and login
//! tokens.

use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::problem::ApiError;

/// The bearer token of a request, or 401 naming what kind of token is expected.
pub(crate) fn bearer<'a>(parts: &'a Parts, kind: &str) -> Result<&'a str, ApiError> {
    let value = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized(format!("no Authorization header: send `Bearer <{kind}>`"))
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized(format!("the Authorization header is not `Bearer <{kind}>`"))
        })
}
