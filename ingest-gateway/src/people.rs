//! The people-facing account endpoints: sign-up, login and logout, one's own profile (read,
//! change, erase), and relationships (invite, accept, revoke, list). Every decision about whose
//! data may be touched is the accounts policy's ([`Policy::authorize`]); these handlers only
//! parse, ask, and answer.
//!
//! [`Policy::authorize`]: biofeed_accounts::policy::Policy::authorize

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use biofeed_accounts::devices;
use biofeed_accounts::erase::{self, Erased};
use biofeed_accounts::login;
use biofeed_accounts::policy::{Action, Actor, Denied};
use biofeed_accounts::relationships::{self, Relationship};
use biofeed_accounts::users::{self, Email, NewUser, Profile, ProfileFields};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::UserAuth;
use crate::body::{parse_json, read_body};
use crate::metrics::OutcomeLabels;
use crate::problem::{ApiError, Problem};
use crate::AppState;

/// Largest JSON body of these endpoints.
const BODY_LIMIT: usize = 64 * 1024;

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

/// A relationship invitation: name the other person by id, as `lead_id` (you follow them) or
/// `follower_id` (you lead them).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Invite {
    /// `parent_child`, `guardian_ward`, `practitioner_patient` or `coach_athlete`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The lead (guardian, practitioner), when you are the follower.
    #[serde(default)]
    pub lead_id: Option<Uuid>,
    /// The follower (child, patient), when you are the lead.
    #[serde(default)]
    pub follower_id: Option<Uuid>,
}

async fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<T, ApiError> {
    parse_json(&read_body(headers, body, BODY_LIMIT).await?)
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
    State(state): State<AppState>,
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
    let password_hash = hash_password(&state, request.password).await?;
    let user_id = users::create(
        &inner.accounts,
        &NewUser {
            email,
            role,
            password_hash: Some(password_hash),
            fields: request.profile,
            terms_version: Some(inner.terms_version.clone()),
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(SignedUp {
            user_id,
            terms_version: inner.terms_version.clone(),
        }),
    ))
}

async fn hash_password(state: &AppState, password: String) -> Result<String, ApiError> {
    let passwords = state.inner.passwords.clone();
    tokio::task::spawn_blocking(move || passwords.hash(&password))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(ApiError::from)
}

/// Logs in: an opaque bearer token for the people-facing endpoints.
#[utoipa::path(post, path = "/v1/auth/login", tag = "accounts", request_body = Login,
    responses(
        (status = 200, description = "logged in", body = Token),
        (status = 401, description = "wrong email or password", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many failed logins for this account or address; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn log_in(
    State(state): State<AppState>,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Token>, ApiError> {
    let request: Login = json_body(&headers, body).await?;
    let inner = &state.inner;
    let attempt = login::login(
        &inner.accounts,
        &inner.passwords,
        &inner.login,
        &request.email,
        &request.password,
        peer_address(&extensions),
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
    let logged_in = attempt?;
    Ok(Json(Token {
        token: logged_in.token,
        token_type: "Bearer".to_owned(),
        expires_at: logged_in.expires_at.to_rfc3339(),
        user_id: logged_in.user_id,
    }))
}

/// The peer's address, for the per-address throttle (absent when the router runs without
/// connection info, e.g. in a test calling it directly; then only the per-account throttle
/// applies).
fn peer_address(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip())
}

/// Checks the caller's current password under the login throttle: 403 if wrong, 429 with
/// `Retry-After` once the account or the address has used up its failures (even if right).
async fn check_current_password(
    state: &AppState,
    user: Uuid,
    password: &str,
    extensions: &axum::http::Extensions,
    wrong: &str,
) -> Result<(), ApiError> {
    let inner = &state.inner;
    match login::check_password(
        &inner.accounts,
        &inner.passwords,
        &inner.login,
        user,
        password,
        peer_address(extensions),
    )
    .await
    {
        Ok(()) => Ok(()),
        Err(login::LoginError::BadCredentials) => Err(ApiError::Forbidden(wrong.to_owned())),
        Err(e) => Err(e.into()),
    }
}

/// Logs out: the token stops working at once.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "accounts",
    responses((status = 204, description = "logged out")), security(("login_token" = [])))]
pub async fn log_out(
    State(state): State<AppState>,
    auth: UserAuth,
) -> Result<StatusCode, ApiError> {
    login::logout(&state.inner.accounts.pool, &auth.token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Asks the policy, and maps a refusal to its answer (404 or 403).
pub(crate) async fn allow(
    state: &AppState,
    actor: &Actor,
    action: Action,
    subject: Uuid,
) -> Result<(), ApiError> {
    let inner = &state.inner;
    let decision = inner
        .policy
        .authorize(&inner.accounts, actor, action, subject)
        .await?;
    let outcome = match &decision {
        Ok(()) => "allowed",
        Err(Denied::NotFound(_)) => "not_found",
        Err(Denied::Forbidden(_)) => "forbidden",
    };
    inner
        .metrics
        .access_decisions
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    Ok(decision?)
}

/// One's own profile, decrypted.
#[utoipa::path(get, path = "/v1/me", tag = "accounts",
    responses((status = 200, description = "the profile", body = Object)), security(("login_token" = [])))]
pub async fn get_me(
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Json<Profile>, ApiError> {
    let me = actor.user_id;
    allow(
        &state,
        &actor,
        Action::ManageProfile {
            resource: "profile",
        },
        me,
    )
    .await?;
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
    State(state): State<AppState>,
    UserAuth { actor, token }: UserAuth,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Profile>, ApiError> {
    let request: ProfilePatch = json_body(&headers, body).await?;
    let me = actor.user_id;
    allow(
        &state,
        &actor,
        Action::ManageProfile {
            resource: "profile",
        },
        me,
    )
    .await?;
    let inner = &state.inner;
    let current = users::profile(&inner.accounts, me).await?;
    let fields = match request.profile {
        None => current.fields,
        Some(changes) => {
            let mut merged =
                serde_json::to_value(&current.fields).map_err(|e| ApiError::Internal(e.into()))?;
            if let Some(object) = merged.as_object_mut() {
                object.extend(changes);
            }
            serde_json::from_value::<ProfileFields>(merged)
                .map_err(|e| ApiError::invalid("profile", e.to_string()))?
        }
    };
    let email = request.email.as_deref().map(Email::parse).transpose()?;
    let new_password_hash = match request.password {
        None => None,
        Some(password) => {
            let current_password = request.current_password.ok_or_else(|| {
                ApiError::invalid("current_password", "is required to change the password")
            })?;
            check_current_password(
                &state,
                me,
                &current_password,
                &extensions,
                "the current password is wrong",
            )
            .await?;
            Some(hash_password(&state, password).await?)
        }
    };
    users::update_profile(&inner.accounts, me, email.as_ref(), &fields).await?;
    if let Some(hash) = new_password_hash {
        login::change_password(&inner.accounts.pool, me, &hash, &token).await?;
    }
    Ok(Json(users::profile(&inner.accounts, me).await?))
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
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Erased>, ApiError> {
    let request: EraseMe = json_body(&headers, body).await?;
    let me = actor.user_id;
    allow(
        &state,
        &actor,
        Action::ManageProfile {
            resource: "account",
        },
        me,
    )
    .await?;
    let inner = &state.inner;
    check_current_password(
        &state,
        me,
        &request.password,
        &extensions,
        "the password is wrong",
    )
    .await?;
    let erased = erase::erase_user(&inner.accounts, me, Some(me)).await?;
    inner.auth_cache.invalidate_all();
    Ok(Json(erased))
}

/// A device to register.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDevice {
    /// The device's model, e.g. `Polar H10` (at most 200 printable characters).
    #[serde(default)]
    pub model: String,
}

/// A registered device and its token, shown this once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceRegistered {
    /// The device's id.
    pub device_id: Uuid,
    /// Its bearer token for `POST /v1/sessions` and the points: stored only hashed, shown once.
    pub token: String,
}

/// Registers a device of one's own; the answer holds its token, shown this once.
#[utoipa::path(post, path = "/v1/me/devices", tag = "accounts", request_body = RegisterDevice,
    responses(
        (status = 201, description = "registered", body = DeviceRegistered),
        (status = 422, description = "bad model", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn register_device(
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<DeviceRegistered>), ApiError> {
    let request: RegisterDevice = json_body(&headers, body).await?;
    let me = actor.user_id;
    allow(
        &state,
        &actor,
        Action::ManageProfile {
            resource: "devices",
        },
        me,
    )
    .await?;
    let device = devices::create_device(&state.inner.accounts.pool, me, &request.model).await?;
    Ok((
        StatusCode::CREATED,
        Json(DeviceRegistered {
            device_id: device.id,
            token: device.token,
        }),
    ))
}

/// One's own devices (no tokens).
#[utoipa::path(get, path = "/v1/me/devices", tag = "accounts",
    responses((status = 200, description = "the devices", body = Object)), security(("login_token" = [])))]
pub async fn list_devices(
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Json<Vec<devices::DeviceRow>>, ApiError> {
    let me = actor.user_id;
    allow(
        &state,
        &actor,
        Action::ManageProfile {
            resource: "devices",
        },
        me,
    )
    .await?;
    Ok(Json(
        devices::list_devices(&state.inner.accounts.pool, Some(me)).await?,
    ))
}

/// Revokes one of one's own devices: its token stops working.
#[utoipa::path(post, path = "/v1/me/devices/{id}/revoke", tag = "accounts",
    params(("id" = Uuid, Path, description = "the device")),
    responses(
        (status = 204, description = "revoked"),
        (status = 404, description = "no such device of yours", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn revoke_device(
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let device = Uuid::try_parse(&id).map_err(|_| ApiError::NotFound("device"))?;
    let me = actor.user_id;
    allow(
        &state,
        &actor,
        Action::ManageProfile {
            resource: "devices",
        },
        me,
    )
    .await?;
    devices::revoke_device(&state.inner.accounts.pool, device, Some(me)).await?;
    state.inner.auth_cache.invalidate_all();
    Ok(StatusCode::NO_CONTENT)
}

/// Proposes a relationship with another person; it grants nothing until they (or, for a
/// minor's practitioner, the minor's guardian) accept it.
#[utoipa::path(post, path = "/v1/relationships", tag = "relationships", request_body = Invite,
    responses(
        (status = 201, description = "proposed", body = Object),
        (status = 404, description = "no such user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "such a relationship already exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad type, or the lead's role does not match it", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn invite(
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Relationship>), ApiError> {
    let request: Invite = json_body(&headers, body).await?;
    let me = actor.user_id;
    let (lead, follower, other) = match (request.lead_id, request.follower_id) {
        (Some(lead), None) => (lead, me, lead),
        (None, Some(follower)) => (me, follower, follower),
        _ => {
            return Err(ApiError::invalid(
                "lead_id",
                "give exactly one of lead_id and follower_id: the other party is you",
            ))
        }
    };
    allow(&state, &actor, Action::InviteRelationship, other).await?;
    let pool = &state.inner.accounts.pool;
    let id = relationships::create(pool, lead, follower, &request.kind, Some(me), false).await?;
    Ok((
        StatusCode::CREATED,
        Json(relationships::get(pool, id).await?),
    ))
}

/// The relationships one is part of.
#[utoipa::path(get, path = "/v1/relationships", tag = "relationships",
    responses((status = 200, description = "newest first", body = Object)), security(("login_token" = [])))]
pub async fn list_relationships(
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Json<Vec<Relationship>>, ApiError> {
    let me = actor.user_id;
    allow(
        &state,
        &actor,
        Action::ManageProfile {
            resource: "relationships",
        },
        me,
    )
    .await?;
    Ok(Json(
        relationships::list(&state.inner.accounts.pool, Some(me)).await?,
    ))
}

/// Accepts (consents to) a relationship.
#[utoipa::path(post, path = "/v1/relationships/{id}/accept", tag = "relationships",
    params(("id" = Uuid, Path, description = "the relationship")),
    responses(
        (status = 200, description = "accepted", body = Object),
        (status = 403, description = "not yours to accept (the reason says why)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such relationship of yours", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn accept(
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
) -> Result<Json<Relationship>, ApiError> {
    let (group, follower) = relationship_and_follower(&state, &id).await?;
    allow(
        &state,
        &actor,
        Action::AcceptRelationship { group },
        follower,
    )
    .await?;
    let pool = &state.inner.accounts.pool;
    relationships::accept(pool, group, actor.user_id).await?;
    Ok(Json(relationships::get(pool, group).await?))
}

/// Revokes a relationship: it stops granting access on the next request.
#[utoipa::path(post, path = "/v1/relationships/{id}/revoke", tag = "relationships",
    params(("id" = Uuid, Path, description = "the relationship")),
    responses(
        (status = 200, description = "revoked", body = Object),
        (status = 404, description = "no such relationship of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already revoked", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
) -> Result<Json<Relationship>, ApiError> {
    let (group, follower) = relationship_and_follower(&state, &id).await?;
    allow(
        &state,
        &actor,
        Action::RevokeRelationship { group },
        follower,
    )
    .await?;
    let pool = &state.inner.accounts.pool;
    relationships::revoke(pool, group, Some(actor.user_id)).await?;
    Ok(Json(relationships::get(pool, group).await?))
}

async fn relationship_and_follower(state: &AppState, id: &str) -> Result<(Uuid, Uuid), ApiError> {
    let group = Uuid::try_parse(id).map_err(|_| ApiError::NotFound("relationship"))?;
    let follower = biofeed_accounts::policy::follower_of(&state.inner.accounts.pool, group)
        .await?
        .ok_or(ApiError::NotFound("relationship"))?;
    Ok((group, follower))
}
