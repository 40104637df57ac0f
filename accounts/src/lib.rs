//! The Postgres-side domain of biofeed: people and who may see what.
//!
//! Owns the Postgres tables `users`, `user_data_keys`, `roles`, `permissions`,
//! `role_permissions`, `groups`, `devices`, `audit_log` (their shape lives in
//! `migrations/postgres`), PII encryption ([`crypto`]: AES-256-GCM with a data key per user,
//! wrapped by the master key, rotated by [`rotation`]; a keyed blind index for email lookup),
//! users and profiles ([`users`]), passwords ([`passwords`], argon2id), login tokens and the
//! failed-login throttle ([`login`]), relationships and consent ([`relationships`]), the one access
//! policy ([`policy`]) and its audit log ([`audit`]), erasure by crypto-shredding ([`erase`]),
//! device tokens ([`devices`]), changes of one's own profile and password ([`profile_change`]),
//! and the `biofeed-export/1` export of everything held about a person ([`export`], with the
//! samples read through a [`export::Recordings`] its caller gives). Also owns `login_tokens`, `login_throttle` and `erased_users`.
//!
//! Architecture invariants: the only crate that sees plaintext PII or uses aes-gcm and argon2;
//! plaintext PII never leaves it except to the person it belongs to (or an audited admin). Access
//! to anyone's data is decided only by [`policy::Policy::authorize`]. It never talks HTTP (the
//! gateway calls it) and never writes to Kafka or ClickHouse.

pub mod audit;
pub mod crypto;
pub mod devices;
pub mod erase;
pub mod export;
pub mod login;
pub mod passwords;
pub mod policy;
pub mod profile_change;
pub mod relationships;
pub mod rotation;
pub mod users;

use sqlx::PgPool;

pub use crypto::{AccountKeys, KeyError};

impl From<sqlx::Error> for AccountsError {
    fn from(e: sqlx::Error) -> Self {
        AccountsError::Postgres(e)
    }
}

/// An accounts operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    /// Postgres failed; retrying may help. (The message holds the cause; it is not also the
    /// error's source, so that a `{:#}` chain prints it once.)
    #[error("postgres: {0}")]
    Postgres(sqlx::Error),
    /// A key is missing, malformed, or does not open what it should.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// No user matches.
    #[error("no such user")]
    NoSuchUser,
    /// The email already has a live account: one live account per email (the database holds
    /// a unique index on the email's blind index for live users). The message never repeats
    /// the address.
    #[error("this email already has an account")]
    EmailTaken,
    /// No device matches.
    #[error("no such device")]
    NoSuchDevice,
    /// No relationship matches.
    #[error("no such relationship")]
    NoSuchRelationship,
    /// The thing is in a state that forbids the change.
    #[error("{0}")]
    Conflict(String),
    /// A value was rejected; the message names the field.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// What the accounts functions need: the pool and the keys.
#[derive(Clone)]
pub struct Accounts {
    /// Postgres.
    pub pool: PgPool,
    /// The master and blind-index keys.
    pub keys: AccountKeys,
}
