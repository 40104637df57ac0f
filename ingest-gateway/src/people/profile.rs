//! One's own profile: read it, change it (a password change included), erase the account.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::Json;
use biofeed_accounts::erase;
use biofeed_accounts::login;
use biofeed_accounts::profile_change::{change_profile, ProfileChange};
use biofeed_accounts::users::{self, Profile};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::people::auth::{clear_login_cookie, UserAuth, Via};
use crate::people::{json_body, peer_address, PeopleState};
use crate::problem::{ApiError, Problem};

/// Changes to one's profile: only what is given changes; `null` clears a field.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    /// A new email (login name).
    #[serde(default)]
    pub email: Option<String>,
    /// Profile fields to change, e.g. `{"location": "Berlin", "gender": null}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub profile: Option<serde_json::Map<String, serde_json::Value>>,
    /// A new password; needs `current_password`.
    #[serde(default)]
    pub password: Option<String>,
    /// The current password, for a password change.
    #[serde(default)]
    pub current_password: Option<String>,
}

/// Confirmation of an erasure request.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseMe {
    /// The current password.
    pub password: String,
}

/// One's own profile, decrypted.
#[utoipa::path(get, path = "/v1/me", tag = "accounts",
    responses((status = 200, description = "the profile", body = Object)), security(("login_token" = [])))]
pub async fn get_me(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Json<Profile>, ApiError> {
    let me = state.allow_own(&actor, "profile").await?;
    Ok(Json(users::profile(&state.inner.accounts, me).await?))
}

/// Changes one's own profile. A password change needs the current password, checked under the
/// failed-login throttle, and logs out every other login token of the person (the token the
/// change was made with stays valid).
#[utoipa::path(patch, path = "/v1/me", tag = "accounts", request_body = ProfilePatch,
    responses(
        (status = 200, description = "the changed profile", body = Object),
        (status = 403, description = "wrong current password", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the new email already has an account", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field breaks a rule (named in `field`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many failed password checks (logins included) for this account or address; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn patch_me(
    State(state): State<PeopleState>,
    UserAuth { actor, token, .. }: UserAuth,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Profile>, ApiError> {
    let request: ProfilePatch = json_body(&headers, body).await?;
    let me = state.allow_own(&actor, "profile").await?;
    let inner = &state.inner;
    let change = ProfileChange {
        email: request.email,
        fields: request.profile,
        password: request.password,
        current_password: request.current_password,
    };
    let changed = change_profile(
        &inner.accounts,
        &inner.passwords,
        &inner.login,
        me,
        change,
        peer_address(&extensions),
        &token,
    )
    .await
    .map_err(wrong_password_is_forbidden("the current password is wrong"))?;
    Ok(Json(changed))
}

/// Erases one's own account (GDPR article 17): the data key is destroyed, personal data and
/// sessions deleted, and the points queued for deletion from ClickHouse. Cannot be undone. The
/// password is checked under the failed-login throttle.
#[utoipa::path(delete, path = "/v1/me", tag = "accounts", request_body = EraseMe,
    responses(
        (status = 200, description = "erased", body = Object),
        (status = 403, description = "wrong password", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many failed password checks (logins included) for this account or address; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn delete_me(
    State(state): State<PeopleState>,
    UserAuth { actor, via, .. }: UserAuth,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<axum::response::Response, ApiError> {
    let request: EraseMe = json_body(&headers, body).await?;
    let me = state.allow_own(&actor, "account").await?;
    let inner = &state.inner;
    // Checked under the login throttle: 403 if wrong, 429 with `Retry-After` once the account or
    // the address has used up its failures (even if right).
    login::check_password(
        &inner.accounts,
        &inner.passwords,
        &inner.login,
        me,
        &request.password,
        peer_address(&extensions),
    )
    .await
    .map_err(wrong_password_is_forbidden("the password is wrong"))?;
    let erased = erase::erase_user(&inner.accounts, me, Some(me)).await?;
    inner.device_tokens.forget_all();
    // The web app's cookie names a token erasure revoked: the browser forgets it too.
    let mut response = Json(erased).into_response();
    if via == Via::Cookie {
        response.headers_mut().insert(
            axum::http::header::SET_COOKIE,
            clear_login_cookie(inner.secure_cookies),
        );
    }
    Ok(response)
}

/// A wrong password is 403 with `message`; any other login error keeps its own answer.
fn wrong_password_is_forbidden(
    message: &'static str,
) -> impl FnOnce(login::LoginError) -> ApiError {
    move |e| match e {
        login::LoginError::BadCredentials => ApiError::Forbidden(message.to_owned()),
        e => e.into(),
    }
}
