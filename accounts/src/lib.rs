//! The Postgres-side domain of biofeed: people and who may see what.
//!
//! Owns the Postgres tables `users`, `user_data_keys`, `roles`, `permissions`,
//! `role_permissions`, `groups`, `devices`, `audit_log` (their shape lives in
//! `migrations/postgres`), PII encryption ([`crypto`]: AES-256-GCM with a data key per user,
//! wrapped by the master key; a keyed blind index for email lookup), users ([`users`]) and device
//! tokens ([`devices`]). Passwords, relationships, consent, the access policy and GDPR export and
//! erasure arrive with the accounts issue.
//!
//! Architecture invariants: the only crate that sees plaintext PII or uses aes-gcm (and, later,
//! argon2); plaintext PII never leaves it except to the person it belongs to. It never talks HTTP
//! (the gateway calls it) and never writes to Kafka or ClickHouse.

pub mod crypto;
pub mod devices;
pub mod users;

use sqlx::PgPool;

pub use crypto::{AccountKeys, KeyError};

/// An accounts operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    /// Postgres failed; retrying may help.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// A key is missing, malformed, or does not open what it should.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// No user matches.
    #[error("no such user")]
    NoSuchUser,
    /// Several users match an email; name one by id.
    #[error("{0} users have this email: name one with its id")]
    AmbiguousUser(usize),
    /// No device matches.
    #[error("no such device")]
    NoSuchDevice,
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
