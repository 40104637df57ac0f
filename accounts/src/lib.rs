//! The Postgres-side domain of biofeed: people and who may see what.
//!
//! Owns the Postgres tables `users`, `roles`, `permissions`, `role_permissions`, `groups`,
//! `devices`, `audit_log` (their shape lives in `migrations/postgres`), PII encryption
//! (AES-256-GCM with per-user keys), password hashing (argon2id), the access policy and GDPR
//! export and erasure. Filled in by the accounts issue.
//!
//! Architecture invariants: the only crate that sees plaintext PII or uses argon2 and aes-gcm;
//! it never talks HTTP (the gateway calls it) and never writes to Kafka or ClickHouse.
