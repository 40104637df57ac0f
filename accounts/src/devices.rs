//! Devices and their bearer tokens: 256 random bits, shown once, stored only as a SHA-256 hash,
//! revocable.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::AccountsError;

/// Every device token starts with this, so leaked tokens are easy to recognise and scan for.
pub const TOKEN_PREFIX: &str = "bfd_";

/// A device just created, with the token it will authenticate with. The token is never stored
/// and cannot be shown again.
pub struct NewDevice {
    /// The device's id.
    pub id: Uuid,
    /// The bearer token.
    pub token: String,
}

/// Who a valid device token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The device.
    pub device_id: Uuid,
    /// The user it belongs to.
    pub user_id: Uuid,
}

/// A device as listed for admins and its owner.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct DeviceRow {
    /// The device's id.
    pub id: Uuid,
    /// Its user.
    pub user_id: Uuid,
    /// Model name, as registered.
    pub model: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it last posted (RFC 3339), if ever.
    pub last_seen_at: Option<String>,
    /// When it was revoked (RFC 3339), if it was.
    pub revoked_at: Option<String>,
}

/// SHA-256 of a token: what is stored and looked up.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Registers a device for a user and returns its token.
#[tracing::instrument(skip(pool))]
pub async fn create_device(
    pool: &PgPool,
    user: Uuid,
    model: &str,
) -> Result<NewDevice, AccountsError> {
    if model.len() > 200 || model.chars().any(char::is_control) {
        return Err(AccountsError::Invalid {
            field: "model",
            reason: "must be at most 200 printable characters".to_owned(),
        });
    }
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let id: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO devices (user_id, token_hash, model)
         SELECT id, $2, $3 FROM users WHERE id = $1 AND deleted_at IS NULL
         RETURNING id",
    )
    .bind(user)
    .bind(&token_hash(&token)[..])
    .bind(model)
    .fetch_optional(pool)
    .await?;
    let id = id.ok_or(AccountsError::NoSuchUser)?;
    tracing::info!(device_id = %id, "created device");
    Ok(NewDevice { id, token })
}

/// Revokes a device — of `owner` only, when given: its token stops working at once. Another
/// user's device is [`AccountsError::NoSuchDevice`], like a missing one.
#[tracing::instrument(skip(pool))]
pub async fn revoke_device(
    pool: &PgPool,
    device: Uuid,
    owner: Option<Uuid>,
) -> Result<(), AccountsError> {
    let revoked = sqlx::query(
        "UPDATE devices SET revoked_at = coalesce(revoked_at, now())
         WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)",
    )
    .bind(device)
    .bind(owner)
    .execute(pool)
    .await?;
    if revoked.rows_affected() == 0 {
        return Err(AccountsError::NoSuchDevice);
    }
    Ok(())
}

/// Devices, of one user or of all.
pub async fn list_devices(
    pool: &PgPool,
    user: Option<Uuid>,
) -> Result<Vec<DeviceRow>, AccountsError> {
    Ok(sqlx::query_as(
        "SELECT id, user_id, model,
                to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS created_at,
                to_char(last_seen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS last_seen_at,
                to_char(revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS revoked_at
         FROM devices WHERE $1::uuid IS NULL OR user_id = $1 ORDER BY created_at",
    )
    .bind(user)
    .fetch_all(pool)
    .await?)
}

/// The device and user a token speaks for, if the token is known, unrevoked, and its user live.
pub async fn authenticate(
    pool: &PgPool,
    token: &str,
) -> Result<Option<DeviceIdentity>, AccountsError> {
    if !token.starts_with(TOKEN_PREFIX) {
        return Ok(None);
    }
    let row: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT d.id, d.user_id FROM devices d JOIN users u ON u.id = d.user_id
         WHERE d.token_hash = $1 AND d.revoked_at IS NULL AND u.deleted_at IS NULL",
    )
    .bind(&token_hash(token)[..])
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(device_id, user_id)| DeviceIdentity { device_id, user_id }))
}
