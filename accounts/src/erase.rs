//! Erasure (GDPR article 17) by crypto-shredding: the user's data key is destroyed, so every
//! ciphertext sealed under it is unreadable for good; the PII columns, login tokens, devices,
//! sessions and relationships are deleted; the user goes on the erasure list that consumers honour
//! and whose pending rows are the jobs runner's queue of ClickHouse deletions. The `users` row
//! stays as a tombstone with no PII, so ids in the audit log keep meaning "an erased user".

use uuid::Uuid;

use crate::{Accounts, AccountsError};

/// What an erasure removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Erased {
    /// The user.
    pub user_id: Uuid,
    /// Sessions deleted from Postgres (their points wait for the ClickHouse deletion).
    pub sessions: u64,
    /// Devices deleted.
    pub devices: u64,
    /// Relationships deleted.
    pub relationships: u64,
}

/// Erases a user in one transaction. `actor` is who asked (the user, or None for an operator);
/// the act is audited.
pub async fn erase_user(
    accounts: &Accounts,
    user: Uuid,
    actor: Option<Uuid>,
) -> Result<Erased, AccountsError> {
    let mut tx = accounts.pool.begin().await?;
    let live: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE")
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?;
    if live.is_none() {
        return Err(AccountsError::NoSuchUser);
    }
    sqlx::query("DELETE FROM user_data_keys WHERE user_id = $1")
        .bind(user)
        .execute(&mut *tx)
        .await?;
    let sessions = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
        .bind(user)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let devices = sqlx::query("DELETE FROM devices WHERE user_id = $1")
        .bind(user)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let relationships = sqlx::query("DELETE FROM groups WHERE lead_id = $1 OR follower_id = $1")
        .bind(user)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM login_tokens WHERE user_id = $1")
        .bind(user)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE users SET email_blind_index = NULL, email_ct = NULL, first_name_ct = NULL,
                last_name_ct = NULL, birth_date_ct = NULL, country_ct = NULL, location_ct = NULL,
                gender_ct = NULL, demographics_ct = NULL, password_hash = NULL,
                deleted_at = now(), updated_at = now()
         WHERE id = $1",
    )
    .bind(user)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO erased_users (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING")
        .bind(user)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO audit_log (actor_id, subject_id, action, resource, allowed, detail)
         VALUES ($1, $2, 'profile.erase', 'users', true, $3)",
    )
    .bind(actor)
    .bind(user)
    .bind(serde_json::json!({ "via": if actor.is_some() { "api" } else { "cli" } }))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(user_id = %user, sessions, devices, relationships, "erased user");
    Ok(Erased {
        user_id: user,
        sessions,
        devices,
        relationships,
    })
}
