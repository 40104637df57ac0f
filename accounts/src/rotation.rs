//! Master key rotation: every data key wrapped under an older master key version is unwrapped
//! (with `BIOFEED_MASTER_KEYS_PREVIOUS`) and wrapped again under the current one, in small
//! transactions, while the services keep running: they read both versions meanwhile.

use uuid::Uuid;

use crate::{Accounts, AccountsError};

/// Data keys re-wrapped per transaction.
const BATCH: i64 = 500;

/// What a rotation did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Rotated {
    /// Data keys re-wrapped now.
    pub rewrapped: u64,
    /// Data keys already under the current version.
    pub already_current: u64,
}

/// Re-wraps every data key not under the current master key version; `progress(done, total)`
/// is called after each batch. Safe to interrupt and to run again.
pub async fn rotate_master_key(
    accounts: &Accounts,
    mut progress: impl FnMut(u64, u64),
) -> Result<Rotated, AccountsError> {
    let current = accounts.keys.master_key_version;
    let (total, already_current): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE master_key_version <> $1), count(*) FILTER (WHERE master_key_version = $1)
         FROM user_data_keys",
    )
    .bind(current)
    .fetch_one(&accounts.pool)
    .await?;
    let total = u64::try_from(total).unwrap_or(0);
    let mut done = 0u64;
    progress(0, total);
    loop {
        let mut tx = accounts.pool.begin().await?;
        let rows: Vec<(Uuid, Vec<u8>, i32)> = sqlx::query_as(
            "SELECT user_id, wrapped_key, master_key_version FROM user_data_keys
             WHERE master_key_version <> $1 ORDER BY user_id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(current)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            break;
        }
        for (user, wrapped, version) in &rows {
            let rewrapped = accounts.keys.rewrap_data_key(*user, wrapped, *version)?;
            sqlx::query(
                "UPDATE user_data_keys SET wrapped_key = $2, master_key_version = $3, rotated_at = now()
                 WHERE user_id = $1",
            )
            .bind(user)
            .bind(rewrapped)
            .bind(current)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        done += rows.len() as u64;
        progress(done, total.max(done));
    }
    tracing::info!(rewrapped = done, version = current, "master key rotated");
    Ok(Rotated {
        rewrapped: done,
        already_current: u64::try_from(already_current).unwrap_or(0),
    })
}
