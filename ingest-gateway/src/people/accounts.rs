//! Accounts: sign-up, login and logout.

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, SET_COOKIE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use biofeed_accounts::login;
use biofeed_accounts::users::{self, Email, NewUser, ProfileFields};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::metrics::OutcomeLabels;
use crate::people::auth::{clear_login_cookie, same_origin, set_login_cookie, UserAuth, Via};
use crate::people::{created, json_body, peer_address, PeopleState};
use crate::problem::{ApiError, Problem};

/// Roles people may give themselves at sign-up; admins and analysts are made by an operator.
const SELF_SERVICE_ROLES: [&str; 3] = ["user", "guardian", "practitioner"];

/// A sign-up.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignUp {
    /// Email address, the login name; stored only encrypted and as a keyed blind index.
    pub email: String,
    /// Password, at least 10 characters; stored only as an argon2id hash.
    pub password: String,
    /// `user` (default), `guardian` or `practitioner`.
    #[serde(default)]
    pub role: Option<String>,
    /// The terms version being accepted; must equal the current one (`BIOFEED_TERMS_VERSION`).
    pub accept_terms: String,
    /// The profile; `birth_date` is required (it decides whether a guardian must consent).
    #[schema(value_type = Object)]
    pub profile: ProfileFields,
}

/// A created account.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignedUp {
    /// The new user's id: others name you by it in relationship invitations.
    pub user_id: Uuid,
    /// The terms version accepted.
    pub terms_version: String,
}

/// Credentials.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// Email address.
    pub email: String,
    /// Password.
    pub password: String,
}

/// A login token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Token {
    /// Send it as `Authorization: Bearer <token>`.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// When it stops working (RFC 3339).
    pub expires_at: String,
    /// Whose it is.
    pub user_id: Uuid,
}

/// Creates an account. One live account per email: an email that already has one is refused
/// with 409 and nothing is created (the password is hashed all the same, so a refused sign-up
/// costs what a real one does).
#[utoipa::path(post, path = "/v1/users", tag = "accounts", request_body = SignUp,
    responses(
        (status = 201, description = "created", body = SignedUp),
        (status = 409, description = "this email already has an account", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field breaks a rule (named in `field`)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn sign_up(
    State(state): State<PeopleState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<SignedUp>), ApiError> {
    let request: SignUp = json_body(&headers, body).await?;
    let inner = &state.inner;
    let role = request.role.unwrap_or_else(|| "user".to_owned());
    if !SELF_SERVICE_ROLES.contains(&role.as_str()) {
        return Err(ApiError::invalid(
            "role",
            "must be user, guardian or practitioner; admins and analysts are created by an operator",
        ));
    }
    if request.accept_terms != inner.terms_version {
        return Err(ApiError::invalid(
            "accept_terms",
            format!("must be the current terms version, {}", inner.terms_version),
        ));
    }
    if request.profile.birth_date.is_none() {
        return Err(ApiError::invalid(
            "profile/birth_date",
            "is required at sign-up",
        ));
    }
    let email = Email::parse(&request.email)?;
    request.profile.validate()?;
    // Hashed before the email is checked, so that a taken email costs a whole sign-up's work.
    let user_id = users::create_with_password(
        &inner.accounts,
        &inner.passwords,
        NewUser {
            email,
            role,
            password_hash: None,
            fields: request.profile,
            terms_version: Some(inner.terms_version.clone()),
        },
        request.password,
    )
    .await?;
    Ok(created(SignedUp {
        user_id,
        terms_version: inner.terms_version.clone(),
    }))
}

/// Logs in: an opaque bearer token for the people-facing endpoints.
#[utoipa::path(post, path = "/v1/auth/login", tag = "accounts", request_body = Login,
    responses(
        (status = 200, description = "logged in", body = Token),
        (status = 401, description = "wrong email or password", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many failed logins for this account or address; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn log_in(
    State(state): State<PeopleState>,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Token>, ApiError> {
    let logged_in = attempt_login(&state, &extensions, &headers, body).await?;
    Ok(Json(Token {
        token: logged_in.token,
        token_type: "Bearer".to_owned(),
        expires_at: logged_in.expires_at.to_rfc3339(),
        user_id: logged_in.user_id,
    }))
}

/// One login attempt from a request's body, under the failed-login throttle, counted in the
/// metrics by outcome: what `/v1/auth/login` and the web login share.
async fn attempt_login(
    state: &PeopleState,
    extensions: &axum::http::Extensions,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<login::LoggedIn, ApiError> {
    let request: Login = json_body(headers, body).await?;
    let inner = &state.inner;
    let attempt = login::login(
        &inner.accounts,
        &inner.passwords,
        &inner.login,
        &request.email,
        &request.password,
        peer_address(extensions),
    )
    .await;
    let outcome = match &attempt {
        Ok(_) => "ok",
        Err(login::LoginError::Throttled { .. }) => "throttled",
        Err(_) => "refused",
    };
    inner
        .metrics
        .logins
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    Ok(attempt?)
}

/// A web app login: who, until when (the token itself is only in the cookie).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebSession {
    /// Whose it is.
    pub user_id: Uuid,
    /// When it stops working (RFC 3339).
    pub expires_at: String,
}

/// Logs in for the web app: the same login token as `/v1/auth/login`, under the same rules and
/// throttle, handed over only as an `HttpOnly`, `SameSite=Strict` cookie (`Secure` over HTTPS),
/// never in the body where a script could read it. The request must come from this site's own
/// pages (`Origin`).
#[utoipa::path(post, path = "/v1/auth/session", tag = "accounts", request_body = Login,
    responses(
        (status = 200, description = "logged in; the token is in the `biofeed_login` cookie", body = WebSession),
        (status = 401, description = "wrong email or password", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "no Origin header, or another site's", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many failed logins for this account or address; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn web_log_in(
    State(state): State<PeopleState>,
    extensions: axum::http::Extensions,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<([(HeaderName, HeaderValue); 2], Json<WebSession>), ApiError> {
    same_origin(&headers, &uri, state.inner.secure_cookies)?;
    let logged_in = attempt_login(&state, &extensions, &headers, body).await?;
    Ok((
        [
            (
                SET_COOKIE,
                set_login_cookie(
                    &logged_in.token,
                    logged_in.expires_at,
                    state.inner.secure_cookies,
                )?,
            ),
            (CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Json(WebSession {
            user_id: logged_in.user_id,
            expires_at: logged_in.expires_at.to_rfc3339(),
        }),
    ))
}

/// Logs out: the token stops working at once (and the web app's cookie is cleared).
#[utoipa::path(post, path = "/v1/auth/logout", tag = "accounts",
    responses((status = 204, description = "logged out")), security(("login_token" = [])))]
pub async fn log_out(
    State(state): State<PeopleState>,
    auth: UserAuth,
) -> Result<axum::response::Response, ApiError> {
    login::logout(state.pool(), &auth.token).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    if auth.via == Via::Cookie {
        response
            .headers_mut()
            .insert(SET_COOKIE, clear_login_cookie(state.inner.secure_cookies));
    }
    Ok(response)
}

/// The terms of use that sign-up must accept.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Terms {
    /// The current version: send it as `accept_terms`.
    pub version: String,
}

/// The current terms version (sign-up accepts exactly this one).
#[utoipa::path(get, path = "/v1/terms", tag = "accounts",
    responses((status = 200, description = "the current terms", body = Terms)))]
pub async fn terms(State(state): State<PeopleState>) -> Json<Terms> {
    Json(Terms {
        version: state.inner.terms_version.clone(),
    })
}
