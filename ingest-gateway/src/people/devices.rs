//! One's own devices: register one (its token shown once), list them, revoke one.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use biofeed_accounts::devices;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::people::auth::UserAuth;
use crate::people::{created, json_body, PeopleState};
use crate::problem::{ApiError, Problem};

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
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<DeviceRegistered>), ApiError> {
    let request: RegisterDevice = json_body(&headers, body).await?;
    let me = state.allow_own(&actor, "devices").await?;
    let device = devices::create_device(state.pool(), me, &request.model).await?;
    Ok(created(DeviceRegistered {
        device_id: device.id,
        token: device.token,
    }))
}

/// One's own devices (no tokens).
#[utoipa::path(get, path = "/v1/me/devices", tag = "accounts",
    responses((status = 200, description = "the devices", body = Object)), security(("login_token" = [])))]
pub async fn list_devices(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Json<Vec<devices::DeviceRow>>, ApiError> {
    let me = state.allow_own(&actor, "devices").await?;
    Ok(Json(devices::list_devices(state.pool(), Some(me)).await?))
}

/// Revokes one of one's own devices: its token stops working.
#[utoipa::path(post, path = "/v1/me/devices/{id}/revoke", tag = "accounts",
    params(("id" = Uuid, Path, description = "the device")),
    responses(
        (status = 204, description = "revoked"),
        (status = 404, description = "no such device of yours", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn revoke_device(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let device = Uuid::try_parse(&id).map_err(|_| ApiError::NotFound("device"))?;
    let me = state.allow_own(&actor, "devices").await?;
    devices::revoke_device(state.pool(), device, Some(me)).await?;
    state.inner.device_tokens.forget_all();
    Ok(StatusCode::NO_CONTENT)
}
