//! Users: created with their email encrypted and blind-indexed, found by email.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use uuid::Uuid;

use crate::crypto::{DataKey, Place};
use crate::passwords::Passwords;
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
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// The personal fields of a profile besides the email: all optional, all PII, all stored only
/// as ciphertext under the user's data key.
#[derive(Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFields {
    /// Given name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    /// Family name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    /// Date of birth; decides whether the user is a minor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birth_date: Option<NaiveDate>,
    /// Country of residence, ISO 3166-1 alpha-2 (e.g. `DE`); decides the consent age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Gender, as the user states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    /// Where the user lives, free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Other demographics, a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demographics: Option<serde_json::Value>,
}

impl std::fmt::Debug for ProfileFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProfileFields(…)")
    }
}

/// The `*_ct` column of each profile field, and the field's name.
const FIELD_COLUMNS: [(&str, &str); 7] = [
    ("first_name", "first_name_ct"),
    ("last_name", "last_name_ct"),
    ("birth_date", "birth_date_ct"),
    ("country", "country_ct"),
    ("gender", "gender_ct"),
    ("location", "location_ct"),
    ("demographics", "demographics_ct"),
];

impl ProfileFields {
    /// Checks every field; the error names the field and never repeats its value.
    pub fn validate(&self) -> Result<(), AccountsError> {
        let text = |field: &'static str, value: &Option<String>, max: usize| match value {
            Some(v) if v.chars().count() > max || v.chars().any(char::is_control) => {
                Err(AccountsError::Invalid {
                    field,
                    reason: format!("must be at most {max} printable characters"),
                })
            }
            _ => Ok(()),
        };
        text("first_name", &self.first_name, 200)?;
        text("last_name", &self.last_name, 200)?;
        text("gender", &self.gender, 100)?;
        text("location", &self.location, 1000)?;
        if let Some(date) = self.birth_date {
            let today = chrono::Utc::now().date_naive();
            if date > today || date.year() < 1900 {
                return Err(AccountsError::Invalid {
                    field: "birth_date",
                    reason: "must be a date between 1900-01-01 and today".to_owned(),
                });
            }
        }
        if let Some(country) = &self.country {
            if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(AccountsError::Invalid {
                    field: "country",
                    reason: "must be an ISO 3166-1 alpha-2 code such as DE or US".to_owned(),
                });
            }
        }
        if let Some(demographics) = &self.demographics {
            if !demographics.is_object() || demographics.to_string().len() > 16 * 1024 {
                return Err(AccountsError::Invalid {
                    field: "demographics",
                    reason: "must be a JSON object of at most 16 KiB".to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Each field as (column, plaintext bytes or None).
    fn plaintexts(&self) -> Vec<(&'static str, Option<Vec<u8>>)> {
        let values = [
            self.first_name.as_ref().map(|v| v.as_bytes().to_vec()),
            self.last_name.as_ref().map(|v| v.as_bytes().to_vec()),
            self.birth_date.map(|d| d.to_string().into_bytes()),
            self.country.as_ref().map(|v| v.as_bytes().to_vec()),
            self.gender.as_ref().map(|v| v.as_bytes().to_vec()),
            self.location.as_ref().map(|v| v.as_bytes().to_vec()),
            self.demographics
                .as_ref()
                .map(|v| v.to_string().into_bytes()),
        ];
        FIELD_COLUMNS
            .iter()
            .zip(values)
            .map(|((_, column), value)| (*column, value))
            .collect()
    }

    /// Builds the fields back from decrypted column values.
    fn from_plaintexts(values: &[Option<String>; 7]) -> Result<Self, AccountsError> {
        let corrupt = |field: &'static str| AccountsError::Invalid {
            field,
            reason: "decrypted to an unreadable value".to_owned(),
        };
        Ok(Self {
            first_name: values[0].clone(),
            last_name: values[1].clone(),
            birth_date: values[2]
                .as_deref()
                .map(|d| d.parse().map_err(|_| corrupt("birth_date")))
                .transpose()?,
            country: values[3].clone(),
            gender: values[4].clone(),
            location: values[5].clone(),
            demographics: values[6]
                .as_deref()
                .map(|d| serde_json::from_str(d).map_err(|_| corrupt("demographics")))
                .transpose()?,
        })
    }
}

/// A user to create.
pub struct NewUser {
    /// The email.
    pub email: Email,
    /// The role: `user`, `guardian`, `practitioner`, `admin` or `analyst`.
    pub role: String,
    /// An argon2id hash from [`crate::passwords::Passwords::hash`], if the user may log in.
    pub password_hash: Option<String>,
    /// The rest of the profile.
    pub fields: ProfileFields,
    /// The terms version the user accepted, recorded with the time of acceptance.
    pub terms_version: Option<String>,
}

/// A user's profile, decrypted, for the user themself (or an audited admin).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Profile {
    /// The user's id.
    pub user_id: Uuid,
    /// The role's name.
    pub role: String,
    /// The email.
    pub email: String,
    /// The rest of the profile.
    #[serde(flatten)]
    pub fields: ProfileFields,
    /// The terms version accepted.
    pub terms_version: Option<String>,
    /// When the terms were accepted.
    pub terms_accepted_at: Option<DateTime<Utc>>,
    /// When the account was created.
    pub created_at: DateTime<Utc>,
    /// When the user last logged in.
    pub last_login_at: Option<DateTime<Utc>>,
}

/// Creates a user with just an email and a role (admin tools and tests).
pub async fn create_user(
    accounts: &Accounts,
    email: &Email,
    role: &str,
) -> Result<Uuid, AccountsError> {
    create(
        accounts,
        &NewUser {
            email: email.clone(),
            role: role.to_owned(),
            password_hash: None,
            fields: ProfileFields::default(),
            terms_version: None,
        },
    )
    .await
}

/// Creates a user who logs in with `password`, for sign-up and `biofeed admin user create`
/// alike: the password is checked against the rules and hashed (off the async threads) into
/// `user.password_hash` before anything else, so a sign-up refused for a taken email costs what
/// a real one does; then [`create`].
pub async fn create_with_password(
    accounts: &Accounts,
    passwords: &Passwords,
    mut user: NewUser,
    password: String,
) -> Result<Uuid, AccountsError> {
    user.password_hash = Some(passwords.hash_off_thread(password).await?);
    create(accounts, &user).await
}

/// Creates a user: a fresh data key wrapped by the master key, every PII field sealed under it.
/// An email that already has a live account is refused ([`AccountsError::EmailTaken`]) and
/// creates nothing; the caller has done its password hashing by then, so a refused sign-up costs
/// what a real one does.
#[tracing::instrument(skip_all, fields(role = %user.role))]
pub async fn create(accounts: &Accounts, user: &NewUser) -> Result<Uuid, AccountsError> {
    user.fields.validate()?;
    let id = Uuid::new_v4();
    let blind_index = accounts.keys.email_blind_index(user.email.as_str());
    let (data_key, wrapped) = accounts.keys.new_data_key(id);
    let sealed = |column: &'static str, value: Option<&[u8]>| {
        value.map(|v| {
            data_key.seal(
                Place {
                    table: "users",
                    column,
                    row: id,
                },
                v,
            )
        })
    };
    let email_ct = sealed("email_ct", Some(user.email.as_str().as_bytes()));
    let fields: Vec<Option<Vec<u8>>> = user
        .fields
        .plaintexts()
        .into_iter()
        .map(|(column, value)| sealed(column, value.as_deref()))
        .collect();
    let mut tx = accounts.pool.begin().await?;
    refuse_taken_email(&mut tx, &blind_index, None).await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, role_id, email_blind_index, email_ct, first_name_ct, last_name_ct,
                            birth_date_ct, country_ct, gender_ct, location_ct, demographics_ct,
                            password_hash, terms_version, terms_accepted_at)
         SELECT $1, id, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                CASE WHEN $13::text IS NULL THEN NULL ELSE now() END
         FROM roles WHERE name = $2",
    )
    .bind(id)
    .bind(&user.role)
    .bind(&blind_index)
    .bind(email_ct)
    .bind(&fields[0])
    .bind(&fields[1])
    .bind(&fields[2])
    .bind(&fields[3])
    .bind(&fields[4])
    .bind(&fields[5])
    .bind(&fields[6])
    .bind(&user.password_hash)
    .bind(&user.terms_version)
    .execute(&mut *tx)
    .await
    .map_err(email_taken_or)?;
    if inserted.rows_affected() == 0 {
        return Err(AccountsError::Invalid {
            field: "role",
            reason: format!(
                "'{}' is not a role (user, guardian, practitioner, admin, analyst)",
                user.role
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

/// The name of the unique index that holds one live account per email.
const ONE_LIVE_ACCOUNT_PER_EMAIL: &str = "users_one_live_account_per_email";

/// Refuses an email blind index that a live user other than `except` already has. The unique
/// index decides races between two concurrent sign-ups ([`email_taken_or`]); this check gives
/// the same answer without relying on the error of a failed insert.
async fn refuse_taken_email(
    tx: &mut sqlx::PgConnection,
    blind_index: &[u8],
    except: Option<Uuid>,
) -> Result<(), AccountsError> {
    let taken: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM users
                        WHERE email_blind_index = $1 AND deleted_at IS NULL
                          AND ($2::uuid IS NULL OR id <> $2))",
    )
    .bind(blind_index)
    .bind(except)
    .fetch_one(tx)
    .await?;
    if taken {
        tracing::info!("refused an email that already has a live account");
        return Err(AccountsError::EmailTaken);
    }
    Ok(())
}

/// Maps a violation of the one-live-account-per-email index to [`AccountsError::EmailTaken`].
fn email_taken_or(e: sqlx::Error) -> AccountsError {
    match &e {
        sqlx::Error::Database(db)
            if db.is_unique_violation() && db.constraint() == Some(ONE_LIVE_ACCOUNT_PER_EMAIL) =>
        {
            AccountsError::EmailTaken
        }
        _ => e.into(),
    }
}

/// The user's data key, unwrapped.
pub async fn data_key(accounts: &Accounts, user: Uuid) -> Result<DataKey, AccountsError> {
    let row: Option<(Vec<u8>, i32)> = sqlx::query_as(
        "SELECT wrapped_key, master_key_version FROM user_data_keys WHERE user_id = $1",
    )
    .bind(user)
    .fetch_optional(&accounts.pool)
    .await?;
    let (wrapped, version) = row.ok_or(AccountsError::NoSuchUser)?;
    Ok(accounts.keys.unwrap_data_key(user, &wrapped, version)?)
}

fn open_text(
    key: &DataKey,
    user: Uuid,
    column: &'static str,
    sealed: Option<&[u8]>,
) -> Result<Option<String>, AccountsError> {
    sealed
        .map(|ct| {
            let plain = key.open(
                Place {
                    table: "users",
                    column,
                    row: user,
                },
                ct,
            )?;
            String::from_utf8(plain).map_err(|_| AccountsError::Invalid {
                field: "profile",
                reason: format!("{column} decrypted to invalid UTF-8"),
            })
        })
        .transpose()
}

#[derive(sqlx::FromRow)]
struct ProfileRow {
    role: String,
    email_ct: Option<Vec<u8>>,
    first_name_ct: Option<Vec<u8>>,
    last_name_ct: Option<Vec<u8>>,
    birth_date_ct: Option<Vec<u8>>,
    country_ct: Option<Vec<u8>>,
    gender_ct: Option<Vec<u8>>,
    location_ct: Option<Vec<u8>>,
    demographics_ct: Option<Vec<u8>>,
    terms_version: Option<String>,
    terms_accepted_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    last_login_at: Option<DateTime<Utc>>,
}

/// A live user's profile, decrypted.
pub async fn profile(accounts: &Accounts, user: Uuid) -> Result<Profile, AccountsError> {
    let row: Option<ProfileRow> = sqlx::query_as(
        "SELECT r.name AS role, email_ct, first_name_ct, last_name_ct, birth_date_ct, country_ct,
                gender_ct, location_ct, demographics_ct, terms_version, terms_accepted_at,
                created_at, last_login_at
         FROM users u JOIN roles r ON r.id = u.role_id
         WHERE u.id = $1 AND u.deleted_at IS NULL",
    )
    .bind(user)
    .fetch_optional(&accounts.pool)
    .await?;
    let row = row.ok_or(AccountsError::NoSuchUser)?;
    let key = data_key(accounts, user).await?;
    let sealed = [
        &row.first_name_ct,
        &row.last_name_ct,
        &row.birth_date_ct,
        &row.country_ct,
        &row.gender_ct,
        &row.location_ct,
        &row.demographics_ct,
    ];
    let mut values: [Option<String>; 7] = Default::default();
    for (i, ((_, column), ct)) in FIELD_COLUMNS.iter().zip(sealed).enumerate() {
        values[i] = open_text(&key, user, column, ct.as_deref())?;
    }
    Ok(Profile {
        user_id: user,
        role: row.role,
        email: open_text(&key, user, "email_ct", row.email_ct.as_deref())?.unwrap_or_default(),
        fields: ProfileFields::from_plaintexts(&values)?,
        terms_version: row.terms_version,
        terms_accepted_at: row.terms_accepted_at,
        created_at: row.created_at,
        last_login_at: row.last_login_at,
    })
}

/// Changes a live user's profile: the fields given replace the stored ones (`None` clears a
/// field); a new email also gets a new blind index, and is refused
/// ([`AccountsError::EmailTaken`], nothing changed) if another live account has it.
pub async fn update_profile(
    accounts: &Accounts,
    user: Uuid,
    email: Option<&Email>,
    fields: &ProfileFields,
) -> Result<(), AccountsError> {
    fields.validate()?;
    let key = data_key(accounts, user).await?;
    let seal = |column: &'static str, value: &[u8]| {
        key.seal(
            Place {
                table: "users",
                column,
                row: user,
            },
            value,
        )
    };
    let mut tx = accounts.pool.begin().await?;
    for (column, value) in fields.plaintexts() {
        let sealed = value.map(|v| seal(column, &v));
        // `column` comes from FIELD_COLUMNS, never from the request.
        sqlx::query(&format!(
            "UPDATE users SET {column} = $2, updated_at = now() WHERE id = $1 AND deleted_at IS NULL"
        ))
        .bind(user)
        .bind(sealed)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(email) = email {
        let blind_index = accounts.keys.email_blind_index(email.as_str());
        refuse_taken_email(&mut tx, &blind_index, Some(user)).await?;
        sqlx::query(
            "UPDATE users SET email_ct = $2, email_blind_index = $3, updated_at = now()
             WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(user)
        .bind(seal("email_ct", email.as_str().as_bytes()))
        .bind(&blind_index)
        .execute(&mut *tx)
        .await
        .map_err(email_taken_or)?;
    }
    tx.commit().await?;
    tracing::info!(user_id = %user, "updated profile");
    Ok(())
}

/// Age in whole years on `today`.
pub fn age_on(birth_date: NaiveDate, today: NaiveDate) -> u32 {
    today.years_since(birth_date).unwrap_or(0)
}

/// A user as listed for admins: ids and dates; the email only when revealed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UserListing {
    /// The user's id.
    pub user_id: Uuid,
    /// The role's name.
    pub role: String,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// When erased, if erased.
    pub deleted_at: Option<DateTime<Utc>>,
    /// The email, decrypted: only with an explicit, audited reveal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// Lists users, optionally of one role. With `reveal`, decrypts each live user's email and
/// writes one audit row per user revealed (`actor` is the admin, or None for the CLI).
pub async fn list_users(
    accounts: &Accounts,
    role: Option<&str>,
    reveal: Option<Option<Uuid>>,
) -> Result<Vec<UserListing>, AccountsError> {
    type Row = (Uuid, String, DateTime<Utc>, Option<DateTime<Utc>>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT u.id, r.name, u.created_at, u.deleted_at FROM users u JOIN roles r ON r.id = u.role_id
         WHERE $1::text IS NULL OR r.name = $1 ORDER BY u.created_at, u.id",
    )
    .bind(role)
    .fetch_all(&accounts.pool)
    .await?;
    let mut listing = Vec::with_capacity(rows.len());
    for (user_id, role, created_at, deleted_at) in rows {
        let email = match reveal {
            Some(actor) if deleted_at.is_none() => {
                crate::audit::record(
                    &accounts.pool,
                    &crate::audit::Entry {
                        actor,
                        subject: user_id,
                        action: "pii.reveal",
                        resource: "users.email",
                        allowed: true,
                        detail: serde_json::json!({ "via": "admin user list --show-pii" }),
                    },
                )
                .await?;
                Some(email_of(accounts, user_id).await?)
            }
            _ => None,
        };
        listing.push(UserListing {
            user_id,
            role,
            created_at,
            deleted_at,
            email,
        });
    }
    Ok(listing)
}

/// Records in `user`'s access log that an operator exported everything held about them
/// (`biofeed admin user export`), the way `--show-pii` records each reveal: actor None (an
/// operator at the CLI). Called before anything is decrypted, so an export that could not be
/// audited does not happen.
pub async fn audit_operator_export(accounts: &Accounts, user: Uuid) -> Result<(), AccountsError> {
    audit_operator_data_export(
        accounts,
        user,
        "export",
        serde_json::json!({ "via": "admin user export" }),
    )
    .await
}

/// Records in `user`'s access log that an operator exported their `session` in `format`
/// (`biofeed admin session export`), before a sample is written.
pub async fn audit_operator_session_export(
    accounts: &Accounts,
    user: Uuid,
    session: Uuid,
    format: &str,
) -> Result<(), AccountsError> {
    let detail = serde_json::json!({ "via": "admin session export", "session_id": session, "format": format });
    audit_operator_data_export(accounts, user, "session_export", detail).await
}

/// Records in `user`'s access log that an operator exported their completed sessions in one
/// bundle (`biofeed admin session bundle`), before a sample is written.
pub async fn audit_operator_bundle_export(
    accounts: &Accounts,
    user: Uuid,
    format: &str,
) -> Result<(), AccountsError> {
    let detail = serde_json::json!({ "via": "admin session bundle", "format": format });
    audit_operator_data_export(accounts, user, "bundle_export", detail).await
}

/// An operator's `data.export` of `resource` in `user`'s access log (actor None).
async fn audit_operator_data_export(
    accounts: &Accounts,
    user: Uuid,
    resource: &'static str,
    detail: serde_json::Value,
) -> Result<(), AccountsError> {
    crate::audit::record(
        &accounts.pool,
        &crate::audit::Entry {
            actor: None,
            subject: user,
            action: "data.export",
            resource,
            allowed: true,
            detail,
        },
    )
    .await
}

/// The live user with this email, if any (there is at most one: one live account per email).
pub async fn find_by_email(
    accounts: &Accounts,
    email: &Email,
) -> Result<Option<Uuid>, AccountsError> {
    let id = sqlx::query_scalar(
        "SELECT id FROM users WHERE email_blind_index = $1 AND deleted_at IS NULL",
    )
    .bind(accounts.keys.email_blind_index(email.as_str()))
    .fetch_optional(&accounts.pool)
    .await?;
    Ok(id)
}

/// The live user with this email, or [`AccountsError::NoSuchUser`].
pub async fn one_by_email(accounts: &Accounts, email: &Email) -> Result<Uuid, AccountsError> {
    find_by_email(accounts, email)
        .await?
        .ok_or(AccountsError::NoSuchUser)
}

/// Decrypts a user's email (for the user themself, or an audited admin).
pub async fn email_of(accounts: &Accounts, user: Uuid) -> Result<String, AccountsError> {
    let email_ct: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT email_ct FROM users WHERE id = $1 AND deleted_at IS NULL")
            .bind(user)
            .fetch_optional(&accounts.pool)
            .await?;
    let email_ct = email_ct.ok_or(AccountsError::NoSuchUser)?;
    let key = data_key(accounts, user).await?;
    Ok(open_text(&key, user, "email_ct", email_ct.as_deref())?.unwrap_or_default())
}

/// Encrypts a value under a user's data key, bound to its place (e.g. a session's location).
pub async fn seal_for_user(
    accounts: &Accounts,
    user: Uuid,
    place: Place<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, AccountsError> {
    Ok(data_key(accounts, user).await?.seal(place, plaintext))
}

/// Decrypts a value sealed by [`seal_for_user`].
pub async fn open_for_user(
    accounts: &Accounts,
    user: Uuid,
    place: Place<'_>,
    sealed: &[u8],
) -> Result<Vec<u8>, AccountsError> {
    Ok(data_key(accounts, user).await?.open(place, sealed)?)
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
