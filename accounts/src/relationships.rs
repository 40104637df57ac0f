//! Relationships (the `groups` table): a lead (guardian, practitioner) and a follower (child,
//! patient), proposed by one party, accepted (consented to) by the other — or, for a minor's
//! practitioner, by the minor's guardian — and revocable by either at any time. Who may do what
//! is [`crate::policy`]'s decision; this module only records it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::policy::{CARE_KINDS, GUARDIAN_KINDS};
use crate::AccountsError;

/// A relationship as listed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Relationship {
    /// Its id.
    pub id: Uuid,
    /// The lead (guardian, practitioner).
    pub lead_id: Uuid,
    /// The follower (child, patient).
    pub follower_id: Uuid,
    /// `parent_child`, `guardian_ward`, `practitioner_patient` or `coach_athlete`.
    pub relationship_type: String,
    /// Who proposed it (None: an operator, or that person was erased).
    pub invited_by: Option<Uuid>,
    /// When.
    pub invited_at: DateTime<Utc>,
    /// Who consented (None: an operator recorded consent, or that person was erased).
    pub consented_by: Option<Uuid>,
    /// When consent was given; None while pending.
    pub consented_at: Option<DateTime<Utc>>,
    /// Who revoked it.
    pub revoked_by: Option<Uuid>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The role a relationship kind's lead must have.
pub fn lead_role_of(kind: &str) -> Result<&'static str, AccountsError> {
    if GUARDIAN_KINDS.contains(&kind) {
        Ok("guardian")
    } else if CARE_KINDS.contains(&kind) {
        Ok("practitioner")
    } else {
        Err(AccountsError::Invalid {
            field: "relationship_type",
            reason: "must be parent_child, guardian_ward, practitioner_patient or coach_athlete"
                .to_owned(),
        })
    }
}

/// Records a proposed relationship (pending until accepted). With `consented` (an operator
/// recording consent given outside biofeed) it is live at once.
pub async fn create(
    pool: &PgPool,
    lead: Uuid,
    follower: Uuid,
    kind: &str,
    invited_by: Option<Uuid>,
    consented: bool,
) -> Result<Uuid, AccountsError> {
    let lead_role = lead_role_of(kind)?;
    if lead == follower {
        return Err(AccountsError::Invalid {
            field: "follower_id",
            reason: "a relationship needs two different people".to_owned(),
        });
    }
    let roles: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT u.id, r.name FROM users u JOIN roles r ON r.id = u.role_id
         WHERE u.id = ANY($1) AND u.deleted_at IS NULL",
    )
    .bind(&[lead, follower][..])
    .fetch_all(pool)
    .await?;
    let role_of = |id: Uuid| {
        roles
            .iter()
            .find(|(u, _)| *u == id)
            .map(|(_, r)| r.as_str())
    };
    match (role_of(lead), role_of(follower)) {
        (Some(role), Some(_)) if role == lead_role => {}
        (Some(_), Some(_)) => {
            return Err(AccountsError::Invalid {
                field: "lead_id",
                reason: format!("the lead of a {kind} relationship must have the role {lead_role}"),
            })
        }
        _ => return Err(AccountsError::NoSuchUser),
    }
    let id: Result<Uuid, sqlx::Error> = sqlx::query_scalar(
        "INSERT INTO groups (lead_id, follower_id, relationship_type, invited_by, consented_at)
         VALUES ($1, $2, $3, $4, CASE WHEN $5 THEN now() END) RETURNING id",
    )
    .bind(lead)
    .bind(follower)
    .bind(kind)
    .bind(invited_by)
    .bind(consented)
    .fetch_one(pool)
    .await;
    match id {
        Ok(id) => {
            tracing::info!(group_id = %id, kind, consented, "relationship created");
            Ok(id)
        }
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(AccountsError::Conflict(
            format!("a {kind} relationship between these two people already exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Records consent: the relationship becomes live.
pub async fn accept(pool: &PgPool, group: Uuid, by: Uuid) -> Result<(), AccountsError> {
    let updated = sqlx::query(
        "UPDATE groups SET consented_by = $2, consented_at = now()
         WHERE id = $1 AND consented_at IS NULL AND revoked_at IS NULL",
    )
    .bind(group)
    .bind(by)
    .execute(pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(AccountsError::Conflict(
            "the relationship was accepted or revoked meanwhile".to_owned(),
        ));
    }
    tracing::info!(group_id = %group, "relationship accepted");
    Ok(())
}

/// Revokes a relationship; it stops granting anything on the next request.
pub async fn revoke(pool: &PgPool, group: Uuid, by: Option<Uuid>) -> Result<(), AccountsError> {
    let updated = sqlx::query(
        "UPDATE groups SET revoked_by = $2, revoked_at = greatest(now(), invited_at)
         WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(group)
    .bind(by)
    .execute(pool)
    .await?;
    if updated.rows_affected() == 0 {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM groups WHERE id = $1)")
            .bind(group)
            .fetch_one(pool)
            .await?;
        return Err(if exists {
            AccountsError::Conflict("the relationship is already revoked".to_owned())
        } else {
            AccountsError::NoSuchRelationship
        });
    }
    tracing::info!(group_id = %group, "relationship revoked");
    Ok(())
}

/// One relationship.
pub async fn get(pool: &PgPool, group: Uuid) -> Result<Relationship, AccountsError> {
    sqlx::query_as("SELECT * FROM groups WHERE id = $1")
        .bind(group)
        .fetch_optional(pool)
        .await?
        .ok_or(AccountsError::NoSuchRelationship)
}

/// The relationships `user` is part of (or all, for operators), newest first.
pub async fn list(pool: &PgPool, user: Option<Uuid>) -> Result<Vec<Relationship>, AccountsError> {
    Ok(sqlx::query_as(
        "SELECT * FROM groups WHERE $1::uuid IS NULL OR lead_id = $1 OR follower_id = $1
         ORDER BY invited_at DESC, id",
    )
    .bind(user)
    .fetch_all(pool)
    .await?)
}
