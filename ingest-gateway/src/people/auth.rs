//! People's authentication: `Authorization: Bearer <login token>` from `POST /v1/auth/login`,
//! checked on every request (no cache: logout and erasure take effect at once).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use biofeed_accounts::login;
use biofeed_accounts::policy::Actor;

use crate::bearer::bearer;
use crate::people::PeopleState;
use crate::problem::ApiError;

/// The person a request speaks for, with their role's permissions, and the token used.
#[derive(Debug, Clone)]
pub struct UserAuth {
    /// Who.
    pub actor: Actor,
    /// The login token (for logout).
    pub token: String,
}

impl FromRequestParts<PeopleState> for UserAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &PeopleState,
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
