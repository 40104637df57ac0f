//! Sessions: a device opens one, streams points into it, then completes or aborts it.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use biofeed_accounts::crypto::Place;
use biofeed_accounts::policy::{Action, Actor};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::body::{parse_json, read_body};
use crate::device::auth::DeviceAuth;
use crate::device::catalog::DataTypeSpec;
use crate::device::DeviceState;
use crate::parse_session_id;
use crate::problem::{ApiError, Problem};

/// Largest JSON body of the session endpoints.
const SESSION_BODY_LIMIT: usize = 64 * 1024;

/// What the point handler needs to know of a session, cached.
#[derive(Debug, Clone)]
pub struct SessionFacts {
    /// Whose session it is.
    pub user_id: Uuid,
    /// Whether it still takes points.
    pub open: bool,
    /// When it started, µs since the epoch.
    pub started_at_us: i64,
    /// The data types it declared.
    pub data_types: Vec<DataTypeSpec>,
}

/// A device's request to open a session.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenSession {
    /// The exercise's name, e.g. `hrv_biofeedback`.
    pub exercise: String,
    /// The data types the device will stream; each must be one the exercise tracks.
    pub data_types: Vec<String>,
    /// Where the session happens, free text; stored encrypted, never logged or sent to Kafka.
    #[serde(default)]
    pub location: Option<String>,
}

/// A session that was opened.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionOpened {
    /// The session's id: post points to `/v1/sessions/{id}/points`.
    pub session_id: Uuid,
    /// When the session expires if not completed (RFC 3339).
    pub deadline_at: String,
}

/// The user's feedback when completing a session.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteSession {
    /// The user's answers, e.g. `{"feeling": "calm", "rating": 4}`: a JSON object.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub feedback: Option<serde_json::Value>,
}

/// A session that was closed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionClosed {
    /// The session.
    pub session_id: Uuid,
    /// `completed` or `aborted`.
    pub status: String,
}

/// Opens a session for the device's user.
#[utoipa::path(
    post, path = "/v1/sessions", tag = "sessions",
    request_body = OpenSession,
    responses(
        (status = 201, description = "opened", body = SessionOpened),
        (status = 400, description = "malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no or bad device token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the user may not record: e.g. below the consent age without a guardian's consent", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "unknown exercise or data type", body = Problem, content_type = "application/problem+json"),
    ),
    security(("device_token" = []))
)]
pub async fn open_session(
    State(state): State<DeviceState>,
    DeviceAuth(device): DeviceAuth,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<SessionOpened>), ApiError> {
    let request: OpenSession = parse_json(&read_body(&headers, body, SESSION_BODY_LIMIT).await?)?;
    let inner = &state.inner;
    // The device acts for its user: may this user record (a minor needs a guardian's consent)?
    let actor = Actor::load(&inner.accounts.pool, device.user_id).await?;
    inner
        .access
        .allow(&actor, Action::OpenSession, device.user_id)
        .await?;
    let mut catalog = inner.catalog.get();
    if catalog.exercise(&request.exercise).is_none() {
        catalog = inner.catalog.fresh(&inner.accounts.pool).await?;
    }
    let (exercise_id, tracked) = catalog
        .exercise(&request.exercise)
        .ok_or_else(|| ApiError::invalid("exercise", "is not a known exercise"))?
        .clone();
    if request.data_types.is_empty() {
        return Err(ApiError::invalid(
            "data_types",
            "must name at least one data type",
        ));
    }
    let mut data_type_ids = Vec::new();
    for (i, name) in request.data_types.iter().enumerate() {
        let spec = catalog.data_type(name).ok_or_else(|| {
            ApiError::invalid(format!("data_types/{i}"), "is not a known data type")
        })?;
        if !tracked.contains(&spec.id) {
            return Err(ApiError::invalid(
                format!("data_types/{i}"),
                format!("is not tracked by the exercise {}", request.exercise),
            ));
        }
        if !data_type_ids.contains(&spec.id) {
            data_type_ids.push(spec.id);
        }
    }
    if request.location.as_ref().is_some_and(|l| l.len() > 1000) {
        return Err(ApiError::invalid("location", "is longer than 1000 bytes"));
    }

    let session_id = Uuid::new_v4();
    let location_ct = match &request.location {
        Some(location) => Some(
            biofeed_accounts::users::seal_for_user(
                &inner.accounts,
                device.user_id,
                Place {
                    table: "sessions",
                    column: "location_ct",
                    row: session_id,
                },
                location.as_bytes(),
            )
            .await?,
        ),
        None => None,
    };
    let deadline_secs = inner.limits.session_deadline.as_secs_f64();
    let mut tx = inner.accounts.pool.begin().await?;
    let deadline_at: String = sqlx::query_scalar(
        "INSERT INTO sessions (id, user_id, device_id, exercise_id, location_ct, deadline_at)
         VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
         RETURNING to_char(deadline_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .bind(session_id)
    .bind(device.user_id)
    .bind(device.device_id)
    .bind(exercise_id)
    .bind(location_ct)
    .bind(deadline_secs)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO session_data_types (session_id, data_type_id) SELECT $1, unnest($2::smallint[])")
        .bind(session_id)
        .bind(&data_type_ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(session_id = %session_id, device_id = %device.device_id, "opened session");
    Ok((
        StatusCode::CREATED,
        Json(SessionOpened {
            session_id,
            deadline_at,
        }),
    ))
}

/// Completes a session, recording the user's feedback.
#[utoipa::path(
    post, path = "/v1/sessions/{id}/complete", tag = "sessions",
    params(("id" = Uuid, Path, description = "the session")),
    request_body(content = CompleteSession, description = "optional feedback"),
    responses(
        (status = 200, description = "completed", body = SessionClosed),
        (status = 404, description = "no such session of this user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the session is already closed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("device_token" = []))
)]
pub async fn complete_session(
    State(state): State<DeviceState>,
    DeviceAuth(device): DeviceAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<SessionClosed>, ApiError> {
    let session_id = parse_session_id(&id)?;
    let bytes = read_body(&headers, body, SESSION_BODY_LIMIT).await?;
    let request: CompleteSession = if bytes.is_empty() {
        CompleteSession::default()
    } else {
        parse_json(&bytes)?
    };
    if request.feedback.as_ref().is_some_and(|f| !f.is_object()) {
        return Err(ApiError::invalid("feedback", "must be a JSON object"));
    }
    close(
        &state,
        device.user_id,
        session_id,
        "completed",
        request.feedback,
    )
    .await
}

/// Aborts a session: its points will be purged.
#[utoipa::path(
    post, path = "/v1/sessions/{id}/abort", tag = "sessions",
    params(("id" = Uuid, Path, description = "the session")),
    responses(
        (status = 200, description = "aborted", body = SessionClosed),
        (status = 404, description = "no such session of this user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the session is already closed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("device_token" = []))
)]
pub async fn abort_session(
    State(state): State<DeviceState>,
    DeviceAuth(device): DeviceAuth,
    Path(id): Path<String>,
) -> Result<Json<SessionClosed>, ApiError> {
    let session_id = parse_session_id(&id)?;
    close(&state, device.user_id, session_id, "aborted", None).await
}

async fn close(
    state: &DeviceState,
    user: Uuid,
    session_id: Uuid,
    status: &str,
    feedback: Option<serde_json::Value>,
) -> Result<Json<SessionClosed>, ApiError> {
    let inner = &state.inner;
    let current: Option<String> =
        sqlx::query_scalar("SELECT status FROM sessions WHERE id = $1 AND user_id = $2")
            .bind(session_id)
            .bind(user)
            .fetch_optional(&inner.accounts.pool)
            .await?;
    match current.as_deref() {
        None => return Err(ApiError::NotFound("session")),
        Some("open") => {}
        Some(other) => {
            return Err(ApiError::Conflict(format!(
                "the session is already {other}"
            )))
        }
    }
    let updated = sqlx::query(
        "UPDATE sessions SET status = $3, ended_at = now(), updated_at = now(), feedback = $4
         WHERE id = $1 AND user_id = $2 AND status = 'open'",
    )
    .bind(session_id)
    .bind(user)
    .bind(status)
    .bind(feedback)
    .execute(&inner.accounts.pool)
    .await?;
    inner.sessions.invalidate(&session_id);
    if updated.rows_affected() == 0 {
        return Err(ApiError::Conflict(
            "the session was closed meanwhile".to_owned(),
        ));
    }
    tracing::info!(session_id = %session_id, status, "closed session");
    Ok(Json(SessionClosed {
        session_id,
        status: status.to_owned(),
    }))
}

/// The facts of a session of `user`, from the cache or Postgres; `None` when there is no such
/// session of this user.
pub async fn session_facts(
    state: &DeviceState,
    user: Uuid,
    session_id: Uuid,
) -> Result<Option<Arc<SessionFacts>>, ApiError> {
    let inner = &state.inner;
    if let Some(facts) = inner.sessions.get(&session_id) {
        return Ok((facts.user_id == user).then_some(facts));
    }
    let row: Option<(Uuid, String, i64, Vec<i16>)> = sqlx::query_as(
        "SELECT s.user_id, s.status, (extract(epoch FROM s.started_at) * 1000000)::bigint,
                coalesce(array_agg(d.data_type_id) FILTER (WHERE d.data_type_id IS NOT NULL), '{}')
         FROM sessions s LEFT JOIN session_data_types d ON d.session_id = s.id
         WHERE s.id = $1 GROUP BY s.id",
    )
    .bind(session_id)
    .fetch_optional(&inner.accounts.pool)
    .await?;
    let Some((owner, status, started_at_us, ids)) = row else {
        return Ok(None);
    };
    let mut catalog = inner.catalog.get();
    if ids.iter().any(|id| catalog.data_type_by_id(*id).is_none()) {
        catalog = inner.catalog.fresh(&inner.accounts.pool).await?;
    }
    let facts = Arc::new(SessionFacts {
        user_id: owner,
        open: status == "open",
        started_at_us,
        data_types: ids
            .iter()
            .filter_map(|id| catalog.data_type_by_id(*id).cloned())
            .collect(),
    });
    inner.sessions.insert(session_id, Arc::clone(&facts));
    Ok((owner == user).then_some(facts))
}
