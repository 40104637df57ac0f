//! Authentication. Devices: `Authorization: Bearer <device token>`, checked against the hashed
//! tokens in Postgres, with answers cached for the configured TTL (so a revocation takes effect
//! within it). People: `Authorization: Bearer <login token>` from `POST /v1/auth/login`, checked
//! on every request (logout and erasure take effect at once).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use biofeed_accounts::devices::{self, DeviceIdentity};
use biofeed_accounts::login;
use biofeed_accounts::policy::Actor;

use crate::problem::ApiError;
use crate::AppState;

/// The device (and its user) a request speaks for.
#[derive(Debug, Clone, Copy)]
pub struct DeviceAuth(pub DeviceIdentity);

impl FromRequestParts<AppState> for DeviceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts, "device token")?;
        let hash = devices::token_hash(token);
        let identity = match state.inner.auth_cache.get(&hash) {
            Some(cached) => cached,
            None => {
                let found = devices::authenticate(&state.inner.accounts.pool, token).await?;
                state.inner.auth_cache.insert(hash, found);
                found
            }
        };
        identity.map(DeviceAuth).ok_or_else(|| {
            ApiError::Unauthorized("the device token is unknown or revoked".to_owned())
        })
    }
}

/// The bearer token of a request, or 401 naming what kind of token is expected.
fn bearer<'a>(parts: &'a Parts, kind: &str) -> Result<&'a str, ApiError> {
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

/// The person a request speaks for, with their role's permissions, and the token used.
#[derive(Debug, Clone)]
pub struct UserAuth {
    /// Who.
    pub actor: Actor,
    /// The login token (for logout).
    pub token: String,
}

impl FromRequestParts<AppState> for UserAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts, "login token")?;
        let actor = login::authenticate(&state.inner.accounts.pool, token)
            .await?
            .ok_or_else(|| {
                ApiError::Unauthorized("the login token is unknown, expired or revoked".to_owned())
            })?;
        Ok(Self {
            actor,
            token: token.to_owned(),
        })
    }
}
