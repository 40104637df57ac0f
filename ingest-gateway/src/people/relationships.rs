//! Relationships (guardians and practitioners): invite, accept (consent), revoke, list.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use biofeed_accounts::policy::{Action, Actor, CARE_KINDS, GUARDIAN_KINDS};
use biofeed_accounts::relationships::{self, Relationship};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::people::auth::UserAuth;
use crate::people::{created, json_body, PeopleState};
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
        .allow(&actor, Action::InviteRelationship, other)
        .await?;
    let id =
        relationships::create(state.pool(), lead, follower, &request.kind, Some(me), false).await?;
    Ok(created(relationships::get(state.pool(), id).await?))
}

/// The relationships one is part of, and, for a guardian, the care relationships (practitioner,
/// coach) of their minor wards, which the guardian accepts or revokes in the ward's place.
#[utoipa::path(get, path = "/v1/relationships", tag = "relationships",
    responses((status = 200, description = "one's own and the minor wards' care relationships, newest first", body = Object)), security(("login_token" = [])))]
pub async fn list_relationships(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Json<Vec<Relationship>>, ApiError> {
    let me = state.allow_own(&actor, "relationships").await?;
    let mut all = relationships::list(state.pool(), Some(me)).await?;
    let mut wards: Vec<Uuid> = all
        .iter()
        .filter(|r| {
            r.lead_id == me
                && GUARDIAN_KINDS.contains(&r.relationship_type.as_str())
                && r.consented_at.is_some()
                && r.revoked_at.is_none()
        })
        .map(|r| r.follower_id)
        .collect();
    wards.sort_unstable();
    wards.dedup();
    for ward in wards {
        // A ward erased meanwhile has nothing to list.
        match state.inner.access.is_minor(ward).await {
            Ok(true) => {}
            Ok(false) | Err(ApiError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        }
        // A read of the ward's data, decided and audited by the policy like any other.
        let resource = "relationships";
        if !state
            .allows(&actor, Action::ReadData { resource }, ward)
            .await?
        {
            continue;
        }
        for r in relationships::list(state.pool(), Some(ward)).await? {
            let care = CARE_KINDS.contains(&r.relationship_type.as_str());
            if care && r.follower_id == ward && !all.iter().any(|x| x.id == r.id) {
                all.push(r);
            }
        }
    }
    // Newest first, one's own and the wards' alike.
    all.sort_by_key(|r| std::cmp::Reverse(r.invited_at));
    Ok(Json(all))
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
    let group = allowed_relationship(&state, &actor, &id, |group| Action::AcceptRelationship {
        group,
    })
    .await?;
    relationships::accept(state.pool(), group, actor.user_id).await?;
    Ok(Json(relationships::get(state.pool(), group).await?))
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
    let group = allowed_relationship(&state, &actor, &id, |group| Action::RevokeRelationship {
        group,
    })
    .await?;
    relationships::revoke(state.pool(), group, Some(actor.user_id)).await?;
    Ok(Json(relationships::get(state.pool(), group).await?))
}

/// The relationship `id` names, once the policy lets `actor` do `action` to it (the subject is
/// its follower): 404 if there is no such relationship.
async fn allowed_relationship(
    state: &PeopleState,
    actor: &Actor,
    id: &str,
    action: impl FnOnce(Uuid) -> Action,
) -> Result<Uuid, ApiError> {
    let group = Uuid::try_parse(id).map_err(|_| ApiError::NotFound("relationship"))?;
    let follower = biofeed_accounts::policy::follower_of(state.pool(), group)
        .await?
        .ok_or(ApiError::NotFound("relationship"))?;
    state.allow(actor, action(group), follower).await?;
    Ok(group)
}
