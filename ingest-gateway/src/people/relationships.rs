//! Relationships (guardians and practitioners): invite, accept (consent), revoke, list.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use biofeed_accounts::policy::Action;
use biofeed_accounts::relationships::{self, Relationship};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::people::auth::UserAuth;
use crate::people::{json_body, PeopleState};
use crate::problem::{ApiError, Problem};

/// A relationship invitation: name the other person by id, as `lead_id` (you follow them) or
/// `follower_id` (you lead them).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Invite {
    /// `parent_child`, `guardian_ward`, `practitioner_patient` or `coach_athlete`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The lead (guardian, practitioner), when you are the follower.
    #[serde(default)]
    pub lead_id: Option<Uuid>,
    /// The follower (child, patient), when you are the lead.
    #[serde(default)]
    pub follower_id: Option<Uuid>,
}

/// Proposes a relationship with another person; it grants nothing until they (or, for a
/// minor's practitioner, the minor's guardian) accept it.
#[utoipa::path(post, path = "/v1/relationships", tag = "relationships", request_body = Invite,
    responses(
        (status = 201, description = "proposed", body = Object),
        (status = 404, description = "no such user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "such a relationship already exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad type, or the lead's role does not match it", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn invite(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Relationship>), ApiError> {
    let request: Invite = json_body(&headers, body).await?;
    let me = actor.user_id;
    let (lead, follower, other) = match (request.lead_id, request.follower_id) {
        (Some(lead), None) => (lead, me, lead),
        (None, Some(follower)) => (me, follower, follower),
        _ => {
            return Err(ApiError::invalid(
                "lead_id",
                "give exactly one of lead_id and follower_id: the other party is you",
            ))
        }
    };
    state
        .inner
        .access
        .allow(&actor, Action::InviteRelationship, other)
        .await?;
    let pool = &state.inner.accounts.pool;
    let id = relationships::create(pool, lead, follower, &request.kind, Some(me), false).await?;
    Ok((
        StatusCode::CREATED,
        Json(relationships::get(pool, id).await?),
    ))
}

/// The relationships one is part of.
#[utoipa::path(get, path = "/v1/relationships", tag = "relationships",
    responses((status = 200, description = "newest first", body = Object)), security(("login_token" = [])))]
pub async fn list_relationships(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Json<Vec<Relationship>>, ApiError> {
    let me = actor.user_id;
    state
        .inner
        .access
        .allow(
            &actor,
            Action::ManageProfile {
                resource: "relationships",
            },
            me,
        )
        .await?;
    Ok(Json(
        relationships::list(&state.inner.accounts.pool, Some(me)).await?,
    ))
}

/// Accepts (consents to) a relationship.
#[utoipa::path(post, path = "/v1/relationships/{id}/accept", tag = "relationships",
    params(("id" = Uuid, Path, description = "the relationship")),
    responses(
        (status = 200, description = "accepted", body = Object),
        (status = 403, description = "not yours to accept (the reason says why)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such relationship of yours", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn accept(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
) -> Result<Json<Relationship>, ApiError> {
    let (group, follower) = relationship_and_follower(&state, &id).await?;
    state
        .inner
        .access
        .allow(&actor, Action::AcceptRelationship { group }, follower)
        .await?;
    let pool = &state.inner.accounts.pool;
    relationships::accept(pool, group, actor.user_id).await?;
    Ok(Json(relationships::get(pool, group).await?))
}

/// Revokes a relationship: it stops granting access on the next request.
#[utoipa::path(post, path = "/v1/relationships/{id}/revoke", tag = "relationships",
    params(("id" = Uuid, Path, description = "the relationship")),
    responses(
        (status = 200, description = "revoked", body = Object),
        (status = 404, description = "no such relationship of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already revoked", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn revoke(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
) -> Result<Json<Relationship>, ApiError> {
    let (group, follower) = relationship_and_follower(&state, &id).await?;
    state
        .inner
        .access
        .allow(&actor, Action::RevokeRelationship { group }, follower)
        .await?;
    let pool = &state.inner.accounts.pool;
    relationships::revoke(pool, group, Some(actor.user_id)).await?;
    Ok(Json(relationships::get(pool, group).await?))
}

async fn relationship_and_follower(
    state: &PeopleState,
    id: &str,
) -> Result<(Uuid, Uuid), ApiError> {
    let group = Uuid::try_parse(id).map_err(|_| ApiError::NotFound("relationship"))?;
    let follower = biofeed_accounts::policy::follower_of(&state.inner.accounts.pool, group)
        .await?
        .ok_or(ApiError::NotFound("relationship"))?;
    Ok((group, follower))
}
