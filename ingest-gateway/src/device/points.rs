//! `POST /v1/sessions/{id}/points`: a frame as JSON or as Avro, checked against the session and
//! the data type, then published to Kafka; answered 202 only after Kafka acknowledged it.

use std::sync::atomic::AtomicI64;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use biofeed_schema::{DataTypeName, SensorFrame};
use prometheus_client::metrics::gauge::Gauge;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, OwnedSemaphorePermit};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::body::{parse_json, read_body};
use crate::device::auth::DeviceAuth;
use crate::device::sessions::session_facts;
use crate::device::DeviceState;
use crate::metrics::ReasonLabels;
use crate::parse_session_id;
use crate::problem::{ApiError, Problem};

/// A frame as JSON: one data type's samples, one row of channel values per timestamp.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonFrame {
    /// Chosen by the device; re-posting a frame with the same id is accepted once.
    pub frame_id: Uuid,
    /// The data type, one the session declared.
    pub data_type: String,
    /// Each sample's time, µs since the Unix epoch, strictly ascending (each instant once).
    pub timestamps_us: Vec<i64>,
    /// One row per sample, one number per channel, e.g. `[[812.0], [798.5]]` for RR intervals.
    #[schema(value_type = Vec<Vec<f32>>)]
    pub values: SampleRows,
}

/// Sample rows parsed straight into one flat, sample-major vector.
#[derive(Debug, Default)]
pub struct SampleRows {
    /// The values, `width` per row.
    pub flat: Vec<f32>,
    /// Numbers per row (0 when there are no rows).
    pub width: usize,
    /// Number of rows.
    pub rows: usize,
}

impl<'de> Deserialize<'de> for SampleRows {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Rows;
        impl<'de> Visitor<'de> for Rows {
            type Value = SampleRows;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of rows, each an array of numbers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SampleRows, A::Error> {
                let mut rows = SampleRows::default();
                while let Some(row) = seq.next_element_seed(Row(&mut rows.flat))? {
                    if rows.rows == 0 {
                        rows.width = row;
                    } else if row != rows.width {
                        return Err(de::Error::custom(format_args!(
                            "values row {} has {row} numbers but row 0 has {}",
                            rows.rows, rows.width
                        )));
                    }
                    rows.rows += 1;
                }
                Ok(rows)
            }
        }
        struct Row<'a>(&'a mut Vec<f32>);
        impl<'de> de::DeserializeSeed<'de> for Row<'_> {
            type Value = usize;
            fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
                deserializer.deserialize_seq(self)
            }
        }
        impl<'de> Visitor<'de> for Row<'_> {
            type Value = usize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of numbers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
                let mut n = 0;
                while let Some(value) = seq.next_element::<f32>()? {
                    self.0.push(value);
                    n += 1;
                }
                Ok(n)
            }
        }
        deserializer.deserialize_seq(Rows)
    }
}

/// The answer to an accepted frame.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FrameAccepted {
    /// The frame.
    pub frame_id: Uuid,
    /// Sample instants (points) in it.
    pub points: usize,
    /// True when this frame id was accepted before; nothing was published again.
    pub duplicate: bool,
}

/// Accepts a frame of points for an open session of the device's user.
///
/// Send JSON (`application/json`, shape `JsonFrame`) or Avro (`application/avro`: a
/// single-object encoded `SensorFrame`, see `schema/avro/sensor_frame.v1.avsc`; its
/// `session_id` must be this session, and the gateway sets `user_id`, `device_id` and
/// `received_at_us`). Bodies may be compressed (`Content-Encoding: gzip` or `zstd`).
#[utoipa::path(
    post, path = "/v1/sessions/{id}/points", tag = "points",
    params(("id" = Uuid, Path, description = "the session")),
    request_body(content(
        (JsonFrame = "application/json"),
        (Vec<u8> = "application/avro"),
    )),
    responses(
        (status = 202, description = "Kafka has the frame", body = FrameAccepted),
        (status = 200, description = "this frame id was already accepted", body = FrameAccepted),
        (status = 400, description = "malformed JSON or Avro", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no, unknown or revoked device token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such session of this user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the session is closed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body or frame too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "unsupported content type or encoding", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a value breaks a rule; `field` names it", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "in-flight limit reached; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Kafka cannot take the frame; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("device_token" = []))
)]
pub async fn post_points(
    State(state): State<DeviceState>,
    DeviceAuth(device): DeviceAuth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<FrameAccepted>), ApiError> {
    let inner = &state.inner;
    let Ok(permit) = inner.in_flight.clone().try_acquire_owned() else {
        reject(&state, &ApiError::TooManyRequests, 0);
        return Err(ApiError::TooManyRequests);
    };
    let in_flight = InFlight::hold(permit, &inner.metrics.in_flight);
    let result = accept(&state, device, &id, &headers, body, in_flight).await;
    if let Err((e, points)) = &result {
        reject(&state, e, *points);
    }
    result.map_err(|(e, _)| e)
}

/// A point request being handled: its in-flight permit and its count in the gauge, given back
/// together when the request's work ends however it ends (answered, failed, or dropped because
/// the client went away). A publication outlives its request if the client goes away: the
/// permit goes with it, so memory stays bounded by the permits times the body limit.
struct InFlight {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge<i64, AtomicI64>,
}

impl InFlight {
    fn hold(permit: OwnedSemaphorePermit, gauge: &Gauge<i64, AtomicI64>) -> Self {
        gauge.inc();
        Self {
            _permit: permit,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

fn reject(state: &DeviceState, error: &ApiError, points: usize) {
    let (_, code) = error.status_and_code();
    state
        .inner
        .metrics
        .points_rejected
        .get_or_create(&ReasonLabels {
            reason: code.to_owned(),
        })
        .inc_by(points.max(1) as u64);
}

/// The work of `post_points`; errors carry how many points they cost (for the metrics).
///
/// Kept as three steps — reading the frame, checking it, publishing it — so each step's
/// errors and their point counts can be read in one place.
async fn accept(
    state: &DeviceState,
    device: biofeed_accounts::devices::DeviceIdentity,
    id: &str,
    headers: &HeaderMap,
    body: axum::body::Body,
    in_flight: InFlight,
) -> Result<(StatusCode, Json<FrameAccepted>), (ApiError, usize)> {
    let session_id = parse_session_id(id).map_err(|e| (e, 0))?;
    let (frame, received_at_us) = read_frame(state, device, session_id, headers, body).await?;
    let points = frame.samples();
    check_frame(state, device, session_id, &frame, received_at_us)
        .await
        .map_err(|e| (e, points))?;
    publish_frame(state, session_id, &frame, in_flight)
        .await
        .map_err(|e| (e, points))
}

/// Tells from the `Content-Type` whether the body is Avro (`true`) or JSON (`false`), so an
/// unsupported type is refused before the body is read at all.
fn is_avro_body(headers: &HeaderMap) -> Result<bool, (ApiError, usize)> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match content_type.as_str() {
        "application/json" => Ok(false),
        "application/avro" | "avro/binary" | "application/vnd.apache.avro+binary" => Ok(true),
        other => Err((
            ApiError::UnsupportedMediaType(format!(
                "Content-Type '{}' is not supported: send application/json or application/avro",
                other.escape_debug()
            )),
            0,
        )),
    }
}

/// Reads the body and decodes it into a `SensorFrame` stamped with the device's user, the
/// device and the time it was received (returned too, as the clock-skew checks need it), so
/// the later checks see one shape whichever encoding the device chose.
async fn read_frame(
    state: &DeviceState,
    device: biofeed_accounts::devices::DeviceIdentity,
    session_id: Uuid,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<(SensorFrame, i64), (ApiError, usize)> {
    let is_avro = is_avro_body(headers)?;
    let bytes = read_body(headers, body, state.inner.limits.max_body_bytes)
        .await
        .map_err(|e| (e, 0))?;
    let received_at_us = now_us();
    let frame = if is_avro {
        from_avro(&bytes, session_id, device, received_at_us)?
    } else {
        let json: JsonFrame = parse_json(&bytes).map_err(|e| (e, 0))?;
        from_json(json, session_id, device, received_at_us)?
    };
    Ok((frame, received_at_us))
}

/// Decodes an Avro body and sets the fields the gateway owns, so a device cannot post into
/// another session nor pose as another user or device.
fn from_avro(
    bytes: &[u8],
    session_id: Uuid,
    device: biofeed_accounts::devices::DeviceIdentity,
    received_at_us: i64,
) -> Result<SensorFrame, (ApiError, usize)> {
    let mut frame = biofeed_schema::decode(bytes).map_err(|e| {
        let detail = match e {
            biofeed_schema::DecodeError::UnknownSchemaId(_) => {
                "the Avro body is in the Confluent wire format; devices post Avro single-object encoding (C3 01 and the schema's fingerprint)".to_owned()
            }
            e => format!("the Avro body is not a SensorFrame: {e}"),
        };
        (ApiError::malformed(detail), 0)
    })?;
    if frame.session_id != session_id {
        return Err((
            ApiError::invalid("session_id", "differs from the session in the path"),
            frame.samples(),
        ));
    }
    frame.user_id = device.user_id;
    frame.device_id = device.device_id;
    frame.received_at_us = received_at_us;
    Ok(frame)
}

/// Checks a decoded frame against the limits, the session (it must be the user's and open)
/// and the declared data type, so nothing Kafka receives breaks a rule the session set.
async fn check_frame(
    state: &DeviceState,
    device: biofeed_accounts::devices::DeviceIdentity,
    session_id: Uuid,
    frame: &SensorFrame,
    received_at_us: i64,
) -> Result<(), ApiError> {
    let inner = &state.inner;
    let points = frame.samples();
    if points > inner.limits.max_samples_per_frame {
        return Err(ApiError::TooLarge(format!(
            "the frame has {points} samples; at most {} are allowed",
            inner.limits.max_samples_per_frame
        )));
    }
    let facts = session_facts(state, device.user_id, session_id)
        .await?
        .ok_or(ApiError::NotFound("session"))?;
    if !facts.open {
        return Err(ApiError::Conflict(
            "the session is closed: it takes no more points".to_owned(),
        ));
    }
    let spec = facts
        .data_types
        .iter()
        .find(|d| d.name == frame.data_type)
        .ok_or_else(|| {
            ApiError::invalid(
                "data_type",
                "is not one of the data types the session declared",
            )
        })?;
    frame
        .check_shape()
        .and_then(|()| frame.check_distinct_times())
        .map_err(|e| shape_problem(e, frame.channels))?;
    if frame.channels != spec.channels {
        return Err(ApiError::invalid(
            "values",
            format!(
                "has {} channels per sample; {} has {}",
                frame.channels, spec.name, spec.channels
            ),
        ));
    }
    check_values(frame, spec.min_value, spec.max_value)?;
    let skew_us = i64::try_from(inner.limits.max_clock_skew.as_micros()).unwrap_or(i64::MAX);
    check_times(
        frame,
        facts.started_at_us.saturating_sub(skew_us),
        received_at_us.saturating_add(skew_us),
    )
}

/// Publishes a checked frame once per frame id and answers 202 (published now) or 200 (a
/// duplicate), counting it in the matching metric.
async fn publish_frame(
    state: &DeviceState,
    session_id: Uuid,
    frame: &SensorFrame,
    in_flight: InFlight,
) -> Result<(StatusCode, Json<FrameAccepted>), ApiError> {
    let metrics = &state.inner.metrics;
    let points = frame.samples();
    let payload = state.inner.publisher.encode(frame);
    let (status, duplicate) =
        match publish_once(state, session_id, frame.frame_id, payload, in_flight).await? {
            Publication::Published => {
                metrics.points_accepted.inc_by(points as u64);
                (StatusCode::ACCEPTED, false)
            }
            Publication::AlreadyAccepted => {
                metrics.duplicate_frames.inc();
                (StatusCode::OK, true)
            }
        };
    Ok((
        status,
        Json(FrameAccepted {
            frame_id: frame.frame_id,
            points,
            duplicate,
        }),
    ))
}

/// What the gateway knows of a frame id it saw in the last minutes.
#[derive(Debug, Clone)]
pub(crate) enum FrameState {
    /// A request is publishing it; the channel says how that ended (`Some(true)`: Kafka has it).
    Publishing(watch::Receiver<Option<bool>>),
    /// Kafka acknowledged it.
    Accepted,
}

/// How a frame id's publication ended for this request.
enum Publication {
    /// This request published it and Kafka acknowledged it.
    Published,
    /// Kafka had acknowledged it for an earlier request (perhaps one still in flight when this
    /// one came, which was waited for).
    AlreadyAccepted,
}

/// Publishes a frame once per frame id: the first request for an id claims it and publishes;
/// a re-post while that publication is still waiting for Kafka waits for its outcome, and is
/// answered "duplicate" only once Kafka acknowledged the frame — never before. If the first
/// publication fails, the id is released (a later retry publishes again) and a re-post that
/// waited for it is told to retry.
///
/// The publication runs in a task of its own, so a client that goes away mid-request neither
/// cancels it nor leaves its frame id claimed: the outcome is recorded either way.
async fn publish_once(
    state: &DeviceState,
    session_id: Uuid,
    frame_id: Uuid,
    payload: Vec<u8>,
    in_flight: InFlight,
) -> Result<Publication, ApiError> {
    let inner = &state.inner;
    let seen_key = (session_id, frame_id);
    let (outcome_tx, outcome_rx) = watch::channel(None);
    let entry = inner
        .frames_seen
        .entry(seen_key)
        .or_insert_with(|| FrameState::Publishing(outcome_rx));
    let claimed = entry.is_fresh();
    let mut outcome = match entry.into_value() {
        FrameState::Accepted => return Ok(Publication::AlreadyAccepted),
        FrameState::Publishing(outcome) => outcome,
    };
    if !claimed {
        // The first post of this frame is still waiting for Kafka: its outcome is ours.
        let acknowledged = outcome
            .wait_for(Option::is_some)
            .await
            .is_ok_and(|answer| *answer == Some(true));
        return if acknowledged {
            Ok(Publication::AlreadyAccepted)
        } else {
            Err(ApiError::Unavailable {
                detail: "an earlier post of this frame failed to reach kafka; post it again"
                    .to_owned(),
                retry_after_secs: 1,
            })
        };
    }
    let claim = Claim {
        state: state.clone(),
        key: seen_key,
        outcome: outcome_tx,
        _in_flight: in_flight,
    };
    let publication = tokio::spawn(async move {
        let inner = &claim.state.inner;
        let mut key = Uuid::encode_buffer();
        let key = session_id.hyphenated().encode_lower(&mut key);
        let result = inner.publisher.publish(key, &payload, &inner.metrics).await;
        claim.settle(result.is_ok());
        result
    });
    match publication.await {
        Ok(Ok(())) => Ok(Publication::Published),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(ApiError::Internal(anyhow::anyhow!(
            "the publishing task failed: {e}"
        ))),
    }
}

/// A frame id claimed by the request publishing it, and that request's in-flight place. Settled
/// with the outcome once Kafka answered; dropped unsettled (the publishing task panicked), it
/// frees the id, so that a retry can publish, and its waiters are told to post again.
struct Claim {
    state: DeviceState,
    key: (Uuid, Uuid),
    outcome: watch::Sender<Option<bool>>,
    _in_flight: InFlight,
}

impl Claim {
    /// Records the outcome before telling the waiters, so that a waiter told "failed" and
    /// posting again finds the id free.
    fn settle(self, acknowledged: bool) {
        let frames_seen = &self.state.inner.frames_seen;
        if acknowledged {
            frames_seen.insert(self.key, FrameState::Accepted);
        } else {
            frames_seen.invalidate(&self.key);
        }
        self.outcome.send_replace(Some(acknowledged));
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.outcome.borrow().is_none() {
            self.state.inner.frames_seen.invalidate(&self.key);
        }
    }
}

fn from_json(
    json: JsonFrame,
    session_id: Uuid,
    device: biofeed_accounts::devices::DeviceIdentity,
    received_at_us: i64,
) -> Result<SensorFrame, (ApiError, usize)> {
    let points = json.timestamps_us.len();
    let data_type = DataTypeName::parse(&json.data_type).map_err(|_| {
        (
            ApiError::invalid("data_type", "is not a data type name"),
            points,
        )
    })?;
    if json.values.rows != points {
        return Err((
            ApiError::invalid(
                "values",
                format!(
                    "has {} rows but timestamps_us has {points}: one row per timestamp",
                    json.values.rows
                ),
            ),
            points,
        ));
    }
    let t0_us = json.timestamps_us.first().copied().unwrap_or(0);
    let offsets_us = json
        .timestamps_us
        .iter()
        .map(|t| t.checked_sub(t0_us))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            (
                ApiError::invalid("timestamps_us", "spans more than an i64 of microseconds"),
                points,
            )
        })?;
    let channels = u16::try_from(json.values.width).map_err(|_| {
        (
            ApiError::invalid("values", "has more than 65535 channels per sample"),
            points,
        )
    })?;
    Ok(SensorFrame {
        frame_id: json.frame_id,
        session_id,
        user_id: device.user_id,
        device_id: device.device_id,
        data_type,
        channels: if points == 0 { 1 } else { channels },
        received_at_us,
        t0_us,
        offsets_us,
        values: json.values.flat,
    })
}

fn shape_problem(error: biofeed_schema::FrameError, channels: u16) -> ApiError {
    use biofeed_schema::FrameError;
    match error {
        FrameError::Empty => ApiError::invalid("timestamps_us", "the frame has no samples"),
        FrameError::NoChannels => ApiError::invalid("values", "samples have no values"),
        FrameError::ShapeMismatch { .. } => {
            ApiError::invalid("values", format!("{error} (channels {channels})"))
        }
        FrameError::Unordered { index, .. } | FrameError::Repeated { index, .. } => {
            ApiError::invalid(format!("timestamps_us/{index}"), error.to_string())
        }
        FrameError::TimeOverflow { index } => {
            ApiError::invalid(format!("timestamps_us/{index}"), error.to_string())
        }
    }
}

/// Values must be finite and inside the data type's range.
fn check_values(frame: &SensorFrame, min: f32, max: f32) -> Result<(), ApiError> {
    let Some(i) = frame.first_value_outside(min, max) else {
        return Ok(());
    };
    let channels = usize::from(frame.channels);
    let v = frame.values[i];
    let field = format!("values/{}/{}", i / channels, i % channels);
    if v.is_finite() {
        Err(ApiError::invalid(
            field,
            format!(
                "{v} is outside the valid range {min}..={max} of {}",
                frame.data_type
            ),
        ))
    } else {
        Err(ApiError::invalid(field, "is not a finite number"))
    }
}

/// Sample times must lie inside the session: not before it started, not in the future (both
/// with the allowed clock skew).
fn check_times(frame: &SensorFrame, earliest_us: i64, latest_us: i64) -> Result<(), ApiError> {
    let first = frame.t0_us;
    let last = frame
        .time_us(frame.samples().saturating_sub(1))
        .unwrap_or(first);
    if first < earliest_us {
        return Err(ApiError::invalid(
            "timestamps_us/0",
            "is before the session started",
        ));
    }
    if last > latest_us {
        return Err(ApiError::invalid(
            format!("timestamps_us/{}", frame.samples().saturating_sub(1)),
            "is in the future beyond the allowed clock skew",
        ));
    }
    Ok(())
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_rows_flatten_and_insist_on_equal_widths() {
        let rows: SampleRows = serde_json::from_str("[[1, 2], [3, 4.5], [5, 6]]").unwrap();
        assert_eq!(
            (rows.flat, rows.width, rows.rows),
            (vec![1.0, 2.0, 3.0, 4.5, 5.0, 6.0], 2, 3)
        );
        let err = serde_json::from_str::<SampleRows>("[[1, 2], [3]]")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("values row 1 has 1 numbers but row 0 has 2"),
            "{err}"
        );
        assert!(serde_json::from_str::<SampleRows>("[[1, \"x\"]]").is_err());
    }
}
