//! The read API: a person's sessions, one session, its points (raw or downsampled on the server),
//! and the access log. Each read asks the accounts policy first with the data's owner as the
//! subject; a refusal is 404 (the caller may not know the thing exists), and every read of
//! someone else's data lands in the audit log.

use axum::extract::{Path, State};
use axum::http::Uri;
use axum::Json;
use biofeed_accounts::audit::{self, AccessRecord};
use biofeed_accounts::policy::{Action, Actor};
use biofeed_accounts::{relationships, users};
use chrono::{DateTime, Utc};
use clickhouse::{Row, RowOwned, RowRead};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::parse_session_id;
use crate::people::auth::UserAuth;
use crate::people::recordings::{reveal_locations, sessions_of, SessionView, SESSION_COLUMNS};
use crate::people::PeopleState;
use crate::problem::{ApiError, Problem};

/// Paging of lists: newest first.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// How many (1–1000, default 100).
    pub limit: Option<u32>,
    /// Only items older than this one (for sessions: a start time, RFC 3339; for the access
    /// log: a record id).
    pub before: Option<String>,
}

impl Page {
    fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(100),
            Some(n @ 1..=1000) => Ok(i64::from(n)),
            Some(_) => Err(ApiError::invalid("limit", "must be from 1 to 1000")),
        }
    }

    /// The limit and the `before` cursor of the query string, the cursor read by `before`.
    fn parse<B>(
        uri: &Uri,
        before: impl FnOnce(&str) -> Result<B, ApiError>,
    ) -> Result<(i64, Option<B>), ApiError> {
        let page: Page = query(uri)?;
        let limit = page.limit()?;
        Ok((limit, page.before.as_deref().map(before).transpose()?))
    }
}

pub(crate) fn query<T: serde::de::DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    axum::extract::Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::malformed(format!("query string: {}", e.body_text())))
}

pub(crate) fn parse_user_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(id).map_err(|_| ApiError::NotFound("user"))
}

/// A person's sessions, newest first.
#[utoipa::path(get, path = "/v1/users/{id}/sessions", tag = "reads",
    params(("id" = Uuid, Path, description = "the person"), Page),
    responses(
        (status = 200, description = "sessions, newest first", body = [SessionView]),
        (status = 404, description = "no such user whose data you may read", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn user_sessions(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    let owner = parse_user_id(&id)?;
    let (limit, before) = Page::parse(&uri, |b| {
        DateTime::parse_from_rfc3339(b)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ApiError::invalid("before", "must be an RFC 3339 time"))
    })?;
    let resource = "sessions";
    state
        .allow(&actor, Action::ReadData { resource }, owner)
        .await?;
    Ok(Json(
        sessions_of(&state.inner.accounts, owner, actor.user_id, before, limit).await?,
    ))
}

/// The session `id` names and its owner, once the policy lets `actor` read its `resource`: 404
/// if there is no such session.
pub(crate) async fn readable_session(
    state: &PeopleState,
    actor: &Actor,
    id: &str,
    resource: &'static str,
) -> Result<(Uuid, Uuid), ApiError> {
    let session_id = parse_session_id(id)?;
    let owner = sqlx::query_scalar("SELECT user_id FROM sessions WHERE id = $1")
        .bind(session_id)
        .fetch_optional(state.pool())
        .await?
        .ok_or(ApiError::NotFound("session"))?;
    state
        .allow(actor, Action::ReadData { resource }, owner)
        .await?;
    Ok((session_id, owner))
}

/// One session.
#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "reads",
    params(("id" = Uuid, Path, description = "the session")),
    responses(
        (status = 200, description = "the session", body = SessionView),
        (status = 404, description = "no such session whose data you may read", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn session(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let (session_id, _) = readable_session(&state, &actor, &id, "session").await?;
    let rows: Vec<SessionView> = sqlx::query_as(&format!(
        "SELECT {SESSION_COLUMNS} WHERE s.id = $1 GROUP BY s.id, e.name"
    ))
    .bind(session_id)
    .fetch_all(state.pool())
    .await?;
    reveal_locations(&state.inner.accounts, rows, actor.user_id)
        .await?
        .pop()
        .map(Json)
        .ok_or(ApiError::NotFound("session"))
}

/// Which points to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PointsQuery {
    /// The data type (one the session declared).
    pub data_type: String,
    /// From this sample time on (µs since the epoch, or RFC 3339); default: the beginning.
    pub from: Option<String>,
    /// Before this sample time (µs since the epoch, or RFC 3339); default: no end.
    pub to: Option<String>,
    /// Downsample into buckets of this length (e.g. `1s`, `1m`, `250ms`): count, min, max and
    /// mean per channel in each bucket. Without it, raw samples.
    pub step: Option<String>,
}

/// One raw sample.
#[derive(Debug, Clone, Serialize, Deserialize, Row, ToSchema)]
pub struct Sample {
    /// Sample time, µs since the epoch.
    pub t_us: i64,
    /// One value per channel.
    pub values: Vec<f32>,
}

/// One downsampled bucket.
#[derive(Debug, Clone, Serialize, Deserialize, Row, ToSchema)]
pub struct Bucket {
    /// Start of the bucket, µs since the epoch.
    pub t_us: i64,
    /// Samples in it.
    pub count: u64,
    /// Smallest value per channel.
    pub min: Vec<f32>,
    /// Largest value per channel.
    pub max: Vec<f32>,
    /// Mean per channel.
    pub mean: Vec<f64>,
}

/// A session's points.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Points {
    /// The session.
    pub session_id: Uuid,
    /// The data type.
    pub data_type: String,
    /// The bucket length in µs, when downsampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_us: Option<i64>,
    /// Raw samples, in time order (without `step`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<Sample>>,
    /// Buckets, in time order (with `step`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<Bucket>>,
    /// When the answer was cut at the read limit: pass this as `from` for the rest.
    pub next_from: Option<i64>,
}

fn parse_time(field: &'static str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    value
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .or_else(|| {
                    DateTime::parse_from_rfc3339(v)
                        .ok()
                        .map(|t| t.timestamp_micros())
                })
                .ok_or_else(|| {
                    ApiError::invalid(field, "must be µs since the epoch or an RFC 3339 time")
                })
        })
        .transpose()
}

/// A session's points of one data type, raw or downsampled.
#[utoipa::path(get, path = "/v1/sessions/{id}/points", tag = "reads",
    params(("id" = Uuid, Path, description = "the session"), PointsQuery),
    responses(
        (status = 200, description = "samples or buckets in time order", body = Points),
        (status = 404, description = "no such session whose data you may read", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad data_type, from, to or step", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the points store is unavailable", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn session_points(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<Points>, ApiError> {
    let (session_id, owner) = readable_session(&state, &actor, &id, "points").await?;
    let request: PointsQuery = query(&uri)?;
    let declared: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM session_data_types sd JOIN data_types d ON d.id = sd.data_type_id
                        WHERE sd.session_id = $1 AND d.name = $2)",
    )
    .bind(session_id)
    .bind(&request.data_type)
    .fetch_one(state.pool())
    .await?;
    if !declared {
        return Err(ApiError::invalid(
            "data_type",
            "is not a data type of this session",
        ));
    }
    let from = parse_time("from", request.from.as_deref())?.unwrap_or(i64::MIN);
    let to = parse_time("to", request.to.as_deref())?.unwrap_or(i64::MAX);
    if from >= to {
        return Err(ApiError::invalid("to", "must be after from"));
    }
    let step_us = request
        .step
        .as_deref()
        .map(|s| {
            humantime::parse_duration(s)
                .ok()
                .and_then(|d| i64::try_from(d.as_micros()).ok())
                .filter(|us| (1_000..=86_400_000_000).contains(us))
                .ok_or_else(|| {
                    ApiError::invalid("step", "must be a duration from 1ms to 24h, e.g. 1s or 1m")
                })
        })
        .transpose()?;
    let place = PointsPlace {
        owner,
        session_id,
        data_type: &request.data_type,
        from,
        to,
        limit: u64::from(state.inner.max_read_points),
    };
    let client = state.inner.clickhouse.client();
    let mut answer = Points {
        session_id,
        data_type: request.data_type.clone(),
        step_us,
        samples: None,
        buckets: None,
        next_from: None,
    };
    match step_us {
        None => {
            let sql = "SELECT t_us, values {filter} ORDER BY t_us LIMIT ?";
            let (samples, next_from) = place.fetch(&client, sql, |s: &Sample| s.t_us).await?;
            answer.samples = Some(samples);
            answer.next_from = next_from;
        }
        Some(step) => {
            let sql = format!(
                "SELECT intDiv(t_us, {step}) * {step} AS bucket, count() AS n,
                        minForEach(values) AS min, maxForEach(values) AS max,
                        avgForEach(values) AS mean
                 {{filter}} GROUP BY bucket ORDER BY bucket LIMIT ?"
            );
            let (buckets, next_from) = place.fetch(&client, &sql, |b: &Bucket| b.t_us).await?;
            answer.buckets = Some(buckets);
            answer.next_from = next_from;
        }
    }
    Ok(Json(answer))
}

/// Which points a read is about, and how many it answers at the most.
struct PointsPlace<'a> {
    owner: Uuid,
    session_id: Uuid,
    data_type: &'a str,
    from: i64,
    to: i64,
    limit: u64,
}

impl PointsPlace<'_> {
    /// At most `limit` rows of `sql` (whose `{filter}` this place fills in, ending in `LIMIT ?`),
    /// and where the rest starts when there are more (`t_us` of the first row left out).
    async fn fetch<T: RowOwned + RowRead>(
        &self,
        client: &clickhouse::Client,
        sql: &str,
        t_us: fn(&T) -> i64,
    ) -> Result<(Vec<T>, Option<i64>), ApiError> {
        let filter = "FROM points FINAL WHERE user_id = toUUID(?) AND session_id = toUUID(?)
                  AND data_type = ? AND t_us >= ? AND t_us < ?";
        let mut rows: Vec<T> = client
            .query(&sql.replace("{filter}", filter))
            .bind(self.owner.to_string())
            .bind(self.session_id.to_string())
            .bind(self.data_type)
            .bind(self.from)
            .bind(self.to)
            .bind(self.limit + 1)
            .fetch_all()
            .await?;
        let next_from = if rows.len() as u64 > self.limit {
            rows.pop().as_ref().map(t_us)
        } else {
            None
        };
        Ok((rows, next_from))
    }
}

/// One metric of a session.
#[derive(Debug, Clone, Serialize, Deserialize, Row, ToSchema)]
pub struct SessionMetric {
    /// e.g. `rmssd_ms`, `spo2_below_90_s`, `eeg_alpha_uv2`.
    pub metric: String,
    /// The channel (0 for single-stream metrics; the EEG channel's index otherwise).
    pub channel: u16,
    /// The value.
    pub value: f64,
    /// Samples (or intervals, segments) it rests on.
    pub samples: u64,
}

/// A session's metrics, as the jobs runner computed them once the session completed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionMetrics {
    /// The session.
    pub session_id: Uuid,
    /// Its status.
    pub status: String,
    /// When the metrics were computed (None: not yet, or the session did not complete).
    pub computed_at: Option<DateTime<Utc>>,
    /// The metrics; a metric that could not be computed (too few samples) is absent.
    pub metrics: Vec<SessionMetric>,
}

/// A session's metrics: HRV, pulse oximetry, EEG band power.
#[utoipa::path(get, path = "/v1/sessions/{id}/metrics", tag = "reads",
    params(("id" = Uuid, Path, description = "the session")),
    responses(
        (status = 200, description = "the metrics (empty until computed)", body = SessionMetrics),
        (status = 404, description = "no such session whose data you may read", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the points store is unavailable", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn session_metrics(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
) -> Result<Json<SessionMetrics>, ApiError> {
    let (session_id, owner) = readable_session(&state, &actor, &id, "metrics").await?;
    let (status, computed_at): (String, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT s.status, c.metrics_at FROM sessions s
         LEFT JOIN session_computations c ON c.session_id = s.id WHERE s.id = $1",
    )
    .bind(session_id)
    .fetch_one(state.pool())
    .await?;
    let metrics: Vec<SessionMetric> = state
        .inner
        .clickhouse
        .client()
        .query(
            "SELECT metric, channel, value, samples FROM session_metrics FINAL
             WHERE user_id = toUUID(?) AND session_id = toUUID(?) ORDER BY metric, channel",
        )
        .bind(owner.to_string())
        .bind(session_id.to_string())
        .fetch_all()
        .await?;
    Ok(Json(SessionMetrics {
        session_id,
        status,
        computed_at,
        metrics,
    }))
}

/// Who read or tried to read a person's data, newest first.
#[utoipa::path(get, path = "/v1/users/{id}/access-log", tag = "reads",
    params(("id" = Uuid, Path, description = "the person"), Page),
    responses(
        (status = 200, description = "records, newest first", body = Object),
        (status = 404, description = "no such user whose log you may read", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn access_log(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<Vec<AccessRecord>>, ApiError> {
    let subject = parse_user_id(&id)?;
    let (limit, before) = Page::parse(&uri, |b| {
        b.parse::<i64>()
            .map_err(|_| ApiError::invalid("before", "must be a record id"))
    })?;
    state.allow(&actor, Action::ReadAccessLog, subject).await?;
    Ok(Json(
        audit::access_log(state.pool(), subject, before, limit).await?,
    ))
}

/// Someone whose data the caller may read: themself, or a follower of an accepted relationship.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Person {
    /// Their id.
    pub user_id: Uuid,
    /// Their first name, decrypted (None if they gave none).
    pub first_name: Option<String>,
    /// `self`, or the relationship's kind (`parent_child`, `practitioner_patient`, …).
    pub relationship: String,
    /// Below their consent age: a care relationship of theirs is accepted by their guardian.
    pub minor: bool,
}

/// The caller and everyone whose data they may read (a guardian's children, a practitioner's
/// consented patients), each with their first name. Each follower is a read of their profile,
/// decided and audited by the policy; one the policy refuses is left out.
#[utoipa::path(get, path = "/v1/me/people", tag = "reads",
    responses((status = 200, description = "the caller first, then followers", body = [Person])),
    security(("login_token" = [])))]
pub async fn people(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Json<Vec<Person>>, ApiError> {
    let me = state.allow_own(&actor, "profile").await?;
    let inner = &state.inner;
    let mut people = vec![Person {
        user_id: me,
        first_name: users::profile(&inner.accounts, me).await?.fields.first_name,
        relationship: "self".to_owned(),
        minor: inner.access.is_minor(me).await?,
    }];
    let mut seen = std::collections::HashSet::from([me]);
    for r in relationships::list(state.pool(), Some(me)).await? {
        let active = r.lead_id == me && r.consented_at.is_some() && r.revoked_at.is_none();
        if !active || !seen.insert(r.follower_id) {
            continue;
        }
        let resource = "profile";
        if !state
            .allows(&actor, Action::ReadData { resource }, r.follower_id)
            .await?
        {
            continue;
        }
        people.push(Person {
            user_id: r.follower_id,
            first_name: users::profile(&inner.accounts, r.follower_id)
                .await?
                .fields
                .first_name,
            relationship: r.relationship_type,
            minor: inner.access.is_minor(r.follower_id).await?,
        });
    }
    Ok(Json(people))
}

/// Which metric a trend follows.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TrendQuery {
    /// The metric, as in a session's metrics (`rmssd_ms`, `spo2_mean_pct`, `eeg_alpha_uv2`, …).
    pub metric: String,
    /// Its channel (default 0).
    pub channel: Option<u16>,
    /// Sessions started at or after this time (RFC 3339; default 90 days ago).
    pub since: Option<String>,
}

/// One session's value of a metric.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TrendPoint {
    /// The session.
    pub session_id: Uuid,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its exercise.
    pub exercise: String,
    /// The metric's value in it.
    pub value: f64,
}

/// A metric across a person's completed sessions, oldest first (at most 1000 sessions).
#[utoipa::path(get, path = "/v1/users/{id}/trend", tag = "reads",
    params(("id" = Uuid, Path, description = "the person"), TrendQuery),
    responses(
        (status = 200, description = "the metric per session, oldest first", body = [TrendPoint]),
        (status = 404, description = "no such user whose data you may read", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a malformed metric name or time", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn trend(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<Vec<TrendPoint>>, ApiError> {
    let owner = parse_user_id(&id)?;
    let q: TrendQuery = query(&uri)?;
    let metric_ok = (1..=64).contains(&q.metric.len())
        && q.metric
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !metric_ok {
        return Err(ApiError::invalid(
            "metric",
            "must be a metric's name: 1 to 64 of a-z, 0-9 and _",
        ));
    }
    let since = match q.since.as_deref() {
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map_err(|_| ApiError::invalid("since", "must be an RFC 3339 time"))?
            .with_timezone(&Utc),
        None => Utc::now() - chrono::Duration::days(90),
    };
    let resource = "metrics";
    state
        .allow(&actor, Action::ReadData { resource }, owner)
        .await?;
    let sessions: Vec<(Uuid, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT s.id, s.started_at, e.name FROM sessions s JOIN exercises e ON e.id = s.exercise_id
         WHERE s.user_id = $1 AND s.status = 'completed' AND s.started_at >= $2
         ORDER BY s.started_at DESC LIMIT 1000",
    )
    .bind(owner)
    .bind(since)
    .fetch_all(state.pool())
    .await?;
    if sessions.is_empty() {
        return Ok(Json(Vec::new()));
    }
    #[derive(Row, Deserialize)]
    struct Value {
        #[serde(with = "clickhouse::serde::uuid")]
        session_id: Uuid,
        value: f64,
    }
    let values: Vec<Value> = state
        .inner
        .clickhouse
        .client()
        .query(
            "SELECT session_id, value FROM session_metrics FINAL
             WHERE user_id = toUUID(?) AND metric = ? AND channel = ?",
        )
        .bind(owner.to_string())
        .bind(&q.metric)
        .bind(q.channel.unwrap_or(0))
        .fetch_all()
        .await?;
    let by_session: std::collections::HashMap<Uuid, f64> = values
        .into_iter()
        .map(|v| (v.session_id, v.value))
        .collect();
    let mut points: Vec<TrendPoint> = sessions
        .into_iter()
        .filter_map(|(session_id, started_at, exercise)| {
            by_session.get(&session_id).map(|&value| TrendPoint {
                session_id,
                started_at,
                exercise,
                value,
            })
        })
        .collect();
    points.reverse();
    Ok(Json(points))
}

/// A data type of the catalog, as the web app plots it.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct DataTypeView {
    /// Its name.
    pub name: String,
    /// What it measures.
    pub description: String,
    /// The unit of its values.
    pub unit: String,
    /// Values per sample.
    pub channels: i16,
    /// The channels' names.
    #[schema(value_type = Vec<String>)]
    pub channel_names: sqlx::types::Json<Vec<String>>,
    /// Nominal samples per second (None for event streams such as RR intervals).
    pub sample_rate_hz: Option<f32>,
    /// Smallest valid value.
    pub min_value: f32,
    /// Largest valid value.
    pub max_value: f32,
}

/// The catalog of data types (no personal data: it needs no login).
#[utoipa::path(get, path = "/v1/data-types", tag = "reads",
    responses((status = 200, description = "every data type", body = [DataTypeView])))]
pub async fn data_types(
    State(state): State<PeopleState>,
) -> Result<Json<Vec<DataTypeView>>, ApiError> {
    Ok(Json(
        sqlx::query_as(
            "SELECT name, description, unit, channels,
                    coalesce(metadata -> 'channels', '[]'::jsonb) AS channel_names,
                    sample_rate_hz, min_value, max_value
             FROM data_types ORDER BY id",
        )
        .fetch_all(state.pool())
        .await?,
    ))
}
