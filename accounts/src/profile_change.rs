//! Changing one's own profile in one request (`PATCH /v1/me`): profile fields, the email, and
//! the password — the last only with the current password, checked under the failed-login
//! throttle, and logging out every other login token of the person.

use std::net::IpAddr;

use uuid::Uuid;

use crate::login::{self, LoginError, LoginSettings};
use crate::passwords::Passwords;
use crate::users::{self, Email, Profile, ProfileFields};
use crate::{Accounts, AccountsError};

/// Changes to a profile: only what is given changes.
#[derive(Default)]
pub struct ProfileChange {
    /// A new email (login name), unparsed.
    pub email: Option<String>,
    /// Profile fields to change, merged over the stored ones (`null` clears a field).
    pub fields: Option<serde_json::Map<String, serde_json::Value>>,
    /// A new password; needs `current_password`.
    pub password: Option<String>,
    /// The current password, for a password change.
    pub current_password: Option<String>,
}

/// Applies `change` to `user`'s profile and returns the changed profile.
///
/// Everything is checked before anything is written: the merged fields, the email, and for a
/// password change the current password — under the same throttle as a login
/// ([`login::check_password`]: [`LoginError::BadCredentials`] if wrong, [`LoginError::Throttled`]
/// once the account or `address` used up its failures) — and the new one's rules and hash. Then
/// the profile is written (a taken email refuses it, nothing changed) and only after it the new
/// password hash, which revokes every other login token of the person but `keep_token`.
pub async fn change_profile(
    accounts: &Accounts,
    passwords: &Passwords,
    settings: &LoginSettings,
    user: Uuid,
    change: ProfileChange,
    address: Option<IpAddr>,
    keep_token: &str,
) -> Result<Profile, LoginError> {
    let current = users::profile(accounts, user).await?;
    let fields = match change.fields {
        None => current.fields,
        Some(changes) => merge_fields(&current.fields, changes)?,
    };
    let email = change.email.as_deref().map(Email::parse).transpose()?;
    let new_password_hash = match change.password {
        None => None,
        Some(password) => {
            let current_password = change.current_password.ok_or(AccountsError::Invalid {
                field: "current_password",
                reason: "is required to change the password".to_owned(),
            })?;
            login::check_password(
                accounts,
                passwords,
                settings,
                user,
                &current_password,
                address,
            )
            .await?;
            Some(passwords.hash_off_thread(password).await?)
        }
    };
    users::update_profile(accounts, user, email.as_ref(), &fields).await?;
    if let Some(hash) = new_password_hash {
        login::change_password(&accounts.pool, user, &hash, keep_token).await?;
    }
    Ok(users::profile(accounts, user).await?)
}

/// The stored fields with `changes` laid over them, checked as a whole.
fn merge_fields(
    stored: &ProfileFields,
    changes: serde_json::Map<String, serde_json::Value>,
) -> Result<ProfileFields, AccountsError> {
    let invalid = |e: serde_json::Error| AccountsError::Invalid {
        field: "profile",
        reason: e.to_string(),
    };
    let mut merged = serde_json::to_value(stored).map_err(invalid)?;
    if let Some(object) = merged.as_object_mut() {
        object.extend(changes);
    }
    serde_json::from_value::<ProfileFields>(merged).map_err(invalid)
}
