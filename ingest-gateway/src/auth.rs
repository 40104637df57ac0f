//! Device authentication: `Authorization: Bearer <device token>`, checked against the hashed
//! tokens in Postgres, with answers cached for the configured TTL (so a revocation takes effect
//! within it).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use biofeed_accounts::devices::{self, DeviceIdentity};

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
        let value = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized(
                "no Authorization header: send `Bearer <device token>`".to_owned(),
            )
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "the Authorization header is not `Bearer <device token>`".to_owned(),
                )
            })?;
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
