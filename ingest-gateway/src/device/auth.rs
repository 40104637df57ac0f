//! Device authentication: `Authorization: Bearer <device token>`, checked against the hashed
//! tokens in Postgres, with answers cached for the configured TTL (so a revocation takes effect
//! within it; the people half empties the cache when a person revokes a device or is erased).

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use biofeed_accounts::devices::{self, DeviceIdentity};
use moka::sync::Cache;

use crate::bearer::bearer;
use crate::device::DeviceState;
use crate::problem::ApiError;

/// The device (and its user) a request speaks for.
#[derive(Debug, Clone, Copy)]
pub struct DeviceAuth(pub DeviceIdentity);

impl FromRequestParts<DeviceState> for DeviceAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &DeviceState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts, "device token")?;
        let hash = devices::token_hash(token);
        let cache = &state.inner.device_tokens.answers;
        let identity = match cache.get(&hash) {
            Some(cached) => cached,
            None => {
                let found = devices::authenticate(&state.inner.accounts.pool, token).await?;
                cache.insert(hash, found);
                found
            }
        };
        identity.map(DeviceAuth).ok_or_else(|| {
            ApiError::Unauthorized("the device token is unknown or revoked".to_owned())
        })
    }
}

/// Recent answers about device tokens (by the token's SHA-256), shared by both halves: the
/// device half fills it, the people half forgets it all when a device is revoked or a person
/// erased, so that takes effect at once.
#[derive(Clone)]
pub struct DeviceTokenCache {
    answers: Cache<[u8; 32], Option<DeviceIdentity>>,
}

impl DeviceTokenCache {
    /// An empty cache whose answers live `ttl`.
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            answers: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Forgets every answer: the next request of each device asks Postgres again.
    pub(crate) fn forget_all(&self) {
        self.answers.invalidate_all();
    }
}
