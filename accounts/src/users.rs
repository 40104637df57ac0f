//! Users: created with their email encrypted and blind-indexed, found by email.

use uuid::Uuid;

use crate::crypto::Place;
use crate::{Accounts, AccountsError};

/// A checked email address. Only its blind index and its ciphertext are stored.
#[derive(Clone)]
pub struct Email(String);

impl std::fmt::Debug for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Email(…)")
    }
}

impl Email {
    /// Accepts `local@domain` with a dot in the domain, at most 254 characters. The error never
    /// repeats the address (it is PII).
    pub fn parse(value: &str) -> Result<Self, AccountsError> {
        let value = value.trim();
        let invalid = |reason: &str| AccountsError::Invalid {
            field: "email",
            reason: reason.to_owned(),
        };
        if value.len() > 254 {
            return Err(invalid("is longer than 254 characters"));
        }
        let (local, domain) = value.split_once('@').ok_or_else(|| invalid("has no @"))?;
        if local.is_empty() || domain.len() < 3 || !domain.contains('.') || domain.contains('@') {
            return Err(invalid("is not of the form name@domain.tld"));
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains spaces or control characters"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The address, for sealing.
    fn as_str(&self) -> &str {
        &self.0
    }
}

/// Creates a user with `role` (`user`, `guardian`, `practitioner`, `admin`, `analyst`).
#[tracing::instrument(skip_all, fields(role = role))]
pub async fn create_user(
    accounts: &Accounts,
    email: &Email,
    role: &str,
) -> Result<Uuid, AccountsError> {
    let id = Uuid::new_v4();
    let (data_key, wrapped) = accounts.keys.new_data_key(id);
    let email_ct = data_key.seal(
        Place {
            table: "users",
            column: "email_ct",
            row: id,
        },
        email.as_str().as_bytes(),
    );
    let mut tx = accounts.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, role_id, email_blind_index, email_ct)
         SELECT $1, id, $3, $4 FROM roles WHERE name = $2",
    )
    .bind(id)
    .bind(role)
    .bind(accounts.keys.email_blind_index(email.as_str()))
    .bind(email_ct)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(AccountsError::Invalid {
            field: "role",
            reason: format!(
                "'{role}' is not a role (user, guardian, practitioner, admin, analyst)"
            ),
        });
    }
    sqlx::query(
        "INSERT INTO user_data_keys (user_id, wrapped_key, master_key_version) VALUES ($1, $2, $3)",
    )
    .bind(id)
    .bind(wrapped)
    .bind(accounts.keys.master_key_version)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(user_id = %id, "created user");
    Ok(id)
}

/// The live users with this email (equal emails under several users are allowed; each has its
/// own ciphertext, and the blind index finds all of them).
pub async fn find_by_email(accounts: &Accounts, email: &Email) -> Result<Vec<Uuid>, AccountsError> {
    let ids = sqlx::query_scalar(
        "SELECT id FROM users WHERE email_blind_index = $1 AND deleted_at IS NULL ORDER BY created_at",
    )
    .bind(accounts.keys.email_blind_index(email.as_str()))
    .fetch_all(&accounts.pool)
    .await?;
    Ok(ids)
}

/// The one live user with this email.
pub async fn one_by_email(accounts: &Accounts, email: &Email) -> Result<Uuid, AccountsError> {
    match find_by_email(accounts, email).await?.as_slice() {
        [] => Err(AccountsError::NoSuchUser),
        [one] => Ok(*one),
        many => Err(AccountsError::AmbiguousUser(many.len())),
    }
}

/// Decrypts a user's email (for the user themself, or an audited admin).
pub async fn email_of(accounts: &Accounts, user: Uuid) -> Result<String, AccountsError> {
    let row: Option<(Vec<u8>, Vec<u8>, i32)> = sqlx::query_as(
        "SELECT u.email_ct, k.wrapped_key, k.master_key_version
         FROM users u JOIN user_data_keys k ON k.user_id = u.id
         WHERE u.id = $1 AND u.deleted_at IS NULL",
    )
    .bind(user)
    .fetch_optional(&accounts.pool)
    .await?;
    let (email_ct, wrapped, version) = row.ok_or(AccountsError::NoSuchUser)?;
    let key = accounts.keys.unwrap_data_key(user, &wrapped, version)?;
    let plain = key.open(
        Place {
            table: "users",
            column: "email_ct",
            row: user,
        },
        &email_ct,
    )?;
    String::from_utf8(plain).map_err(|_| AccountsError::Invalid {
        field: "email",
        reason: "decrypted to invalid UTF-8".to_owned(),
    })
}

/// Encrypts a value under a user's data key, bound to its place (e.g. a session's location).
pub async fn seal_for_user(
    accounts: &Accounts,
    user: Uuid,
    place: Place<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, AccountsError> {
    let row: Option<(Vec<u8>, i32)> = sqlx::query_as(
        "SELECT wrapped_key, master_key_version FROM user_data_keys WHERE user_id = $1",
    )
    .bind(user)
    .fetch_optional(&accounts.pool)
    .await?;
    let (wrapped, version) = row.ok_or(AccountsError::NoSuchUser)?;
    let key = accounts.keys.unwrap_data_key(user, &wrapped, version)?;
    Ok(key.seal(place, plaintext))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_without_echoing_them() {
        assert!(Email::parse("ada@example.org").is_ok());
        for bad in [
            "ada",
            "ada@",
            "@example.org",
            "ada@example",
            "a da@example.org",
            "a@b@c.org",
        ] {
            let err = Email::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("email:"), "{err}");
            assert!(!err.contains(bad), "{err} repeats the address");
        }
        assert!(format!("{:?}", Email::parse("ada@example.org").unwrap())
            .find("ada")
            .is_none());
    }
}
