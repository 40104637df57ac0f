//! The audit log: who read or changed whose data, allowed or not. Ids only, never PII.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::AccountsError;

/// One audit record to write.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Who acted (None: an operator at the CLI).
    pub actor: Option<Uuid>,
    /// Whose data.
    pub subject: Uuid,
    /// What was done, e.g. `data.read`.
    pub action: &'static str,
    /// On what, e.g. `sessions`, `points`, `users.email`.
    pub resource: &'static str,
    /// Whether the policy allowed it.
    pub allowed: bool,
    /// Ids and reasons; never PII.
    pub detail: serde_json::Value,
}

/// Writes one audit record.
pub async fn record(pool: &PgPool, entry: &Entry) -> Result<(), AccountsError> {
    sqlx::query(
        "INSERT INTO audit_log (actor_id, subject_id, action, resource, allowed, detail)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(entry.actor)
    .bind(entry.subject)
    .bind(entry.action)
    .bind(entry.resource)
    .bind(entry.allowed)
    .bind(&entry.detail)
    .execute(pool)
    .await?;
    Ok(())
}

/// One line of a user's access log.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct AccessRecord {
    /// The record's id (page with `before`).
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who (None: an operator at the CLI).
    pub actor_id: Option<Uuid>,
    /// The actor's role when listed (None if the actor is gone).
    pub actor_role: Option<String>,
    /// What was done.
    pub action: String,
    /// On what.
    pub resource: String,
    /// Whether it was allowed.
    pub allowed: bool,
}

/// The newest `limit` records about `subject`, older than record `before` when given.
pub async fn access_log(
    pool: &PgPool,
    subject: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AccessRecord>, AccountsError> {
    Ok(sqlx::query_as(
        "SELECT a.id, a.at, a.actor_id, r.name AS actor_role, a.action, a.resource, a.allowed
         FROM audit_log a
         LEFT JOIN users u ON u.id = a.actor_id
         LEFT JOIN roles r ON r.id = u.role_id
         WHERE a.subject_id = $1 AND ($2::bigint IS NULL OR a.id < $2)
         ORDER BY a.id DESC LIMIT $3",
    )
    .bind(subject)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
