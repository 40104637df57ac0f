//! `GET /v1/sessions/{id}/export`: one session in CSV, EDF+ or RR text (written by
//! [`biofeed_exports`]), for whoever may read the session, audited like every read.
//!
//! `GET /v1/me/export` (GDPR articles 15 and 20): everything biofeed holds about the caller,
//! streamed as newline-delimited JSON (`application/x-ndjson`) in the `biofeed-export/1` format.
//! The lines are written by [`biofeed_accounts::export::export_user`] (where the format is
//! documented), with the sessions and samples read by [`StoredRecordings`]; this handler asks
//! the policy and streams.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use biofeed_accounts::export::export_user;
use biofeed_exports::{BundleFormat, ExportError, Exporter, Format, Request};
use tokio::sync::mpsc;

use crate::people::auth::UserAuth;
use crate::people::recordings::StoredRecordings;
use crate::people::PeopleState;
use crate::problem::{ApiError, Problem};

/// Streams everything held about the caller (see the module documentation for the format).
#[utoipa::path(get, path = "/v1/me/export", tag = "accounts",
    responses((status = 200, description = "newline-delimited JSON; complete when its last line has type `end`",
               content_type = "application/x-ndjson", body = String)),
    security(("login_token" = [])))]
pub async fn export_me(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Response, ApiError> {
    let me = state.allow_own(&actor, "export").await?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
    let inner = state.inner.clone();
    tokio::spawn(async move {
        let recordings = StoredRecordings::new(inner.accounts.clone(), inner.clickhouse.client());
        if let Err(e) = export_user(&inner.accounts, &recordings, me, tx).await {
            tracing::warn!(user_id = %me, error = %e, "export cut short");
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::io::Error>(Bytes::from(line)), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The query of a session's export.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SessionExportQuery {
    /// `csv` (one file per data type), `edf` (EDF+, one file per sampled data type), `rr`
    /// (RR intervals in ms, one per line) or `bids` (a BIDS-EEG dataset of this session, zipped).
    pub format: String,
    /// Only this data type; without it, every data type of the session the format holds (a zip
    /// when there are several).
    pub data_type: Option<String>,
    /// `true`: the EDF+ patient field carries the person's name, sex and birth date instead of a
    /// pseudonymous code. Only for one's own sessions.
    #[serde(default)]
    pub identify: bool,
}

/// A completed session's samples in a format other tools read, streamed.
#[utoipa::path(get, path = "/v1/sessions/{id}/export", tag = "reads",
    params(("id" = Uuid, Path, description = "the session"), SessionExportQuery),
    responses(
        (status = 200, description = "the file: text/csv, EDF+ (application/octet-stream, its length announced), RR text (text/plain), or a zip of one file per data type; a transfer that ends early is incomplete",
         content_type = "application/octet-stream", body = String),
        (status = 404, description = "no such session whose data you may read", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the session is open, purged, aborted or expired", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "an unknown format, or a data type the format cannot hold", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the points store is unavailable; retry after the hint", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn export_session(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let q: SessionExportQuery = crate::people::reads::query(&uri)?;
    let bids = q.format == "bids";
    let format = if bids {
        Format::Edf
    } else {
        Format::parse(&q.format).map_err(|_| {
            ApiError::invalid(
                "format",
                format!(
                    "unknown format '{}': one of {}, bids",
                    q.format,
                    Format::NAMES
                ),
            )
        })?
    };
    // One answer whether the session does not exist or may not be read.
    let (session, owner) = crate::people::reads::readable_session(&state, &actor, &id, "export")
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::NotFound("session"),
            other => other,
        })?;
    if q.identify && owner != actor.user_id {
        return Err(ApiError::invalid(
            "identify",
            "only the person themselves may put their name in an export",
        ));
    }
    let exporter = Exporter::new(
        state.inner.accounts.clone(),
        state.inner.clickhouse.client(),
    );
    if bids {
        if q.identify || q.data_type.as_deref().is_some_and(|d| d != "eeg") {
            return Err(ApiError::invalid(
                if q.identify { "identify" } else { "data_type" },
                "a BIDS dataset holds pseudonymous EEG recordings only",
            ));
        }
        let bundle = exporter
            .prepare_session_bids(session)
            .await
            .map_err(export_problem)?;
        let writer = bundle.clone();
        return Ok(stream_response(
            session,
            "application/zip",
            &bundle.filename(),
            None,
            move |tx| async move { writer.write(tx).await },
        ));
    }
    let prepared = exporter
        .prepare(&Request {
            session,
            format,
            data_type: q.data_type,
            identify: q.identify,
        })
        .await
        .map_err(export_problem)?;
    let writer = prepared.clone();
    Ok(stream_response(
        session,
        prepared.content_type(),
        &prepared.filename(),
        prepared.content_length(),
        move |tx| async move { writer.write(tx).await },
    ))
}

/// The query of a person's bundle.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BundleQuery {
    /// `csv`, `edf` or `rr` (every completed session's files, a folder named by the person's
    /// pseudonymous code), or `bids` (the EEG sessions as a BIDS-EEG dataset).
    pub format: String,
}

/// Every completed session of a person in one format, zipped, streamed.
#[utoipa::path(get, path = "/v1/users/{id}/export", tag = "reads",
    params(("id" = Uuid, Path, description = "the person"), BundleQuery),
    responses(
        (status = 200, description = "a zip; a transfer that ends early is incomplete", content_type = "application/zip", body = String),
        (status = 404, description = "no such user whose data you may read", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "no completed session holds data this format can hold", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "an unknown format", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the points store is unavailable; retry after the hint", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn export_person(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let q: BundleQuery = crate::people::reads::query(&uri)?;
    let format = BundleFormat::parse(&q.format).map_err(export_problem)?;
    let owner = crate::people::reads::parse_user_id(&id)?;
    state
        .allow(
            &actor,
            biofeed_accounts::policy::Action::ReadData { resource: "export" },
            owner,
        )
        .await?;
    let bundle = Exporter::new(
        state.inner.accounts.clone(),
        state.inner.clickhouse.client(),
    )
    .prepare_bundle(&[owner], format)
    .await
    .map_err(export_problem)?;
    let writer = bundle.clone();
    Ok(stream_response(
        owner,
        "application/zip",
        &bundle.filename(),
        None,
        move |tx| async move { writer.write(tx).await },
    ))
}

/// Every completed session of everyone the caller leads and may read (a practitioner's consented
/// patients, a guardian's children) in one format, zipped: one BIDS dataset of them all with
/// `format=bids`.
#[utoipa::path(get, path = "/v1/me/followers/export", tag = "reads",
    params(BundleQuery),
    responses(
        (status = 200, description = "a zip; a transfer that ends early is incomplete", content_type = "application/zip", body = String),
        (status = 409, description = "no one the caller may read has a completed session of this format", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "an unknown format", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the points store is unavailable; retry after the hint", body = Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn export_followers(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
    uri: Uri,
) -> Result<Response, ApiError> {
    let q: BundleQuery = crate::people::reads::query(&uri)?;
    let format = BundleFormat::parse(&q.format).map_err(export_problem)?;
    // Candidates from the relationships; the policy decides (and audits) each one.
    let followers: Vec<uuid::Uuid> =
        biofeed_accounts::relationships::list(state.pool(), Some(actor.user_id))
            .await?
            .into_iter()
            .filter(|r| {
                r.lead_id == actor.user_id && r.consented_at.is_some() && r.revoked_at.is_none()
            })
            .map(|r| r.follower_id)
            .collect();
    // One person may be followed under two kinds (e.g. parent_child and guardian_ward): asked
    // about, and audited, once.
    let mut followers = followers;
    followers.sort_unstable();
    followers.dedup();
    let mut readable = Vec::with_capacity(followers.len());
    for follower in followers {
        let allowed = state
            .allow(
                &actor,
                biofeed_accounts::policy::Action::ReadData { resource: "export" },
                follower,
            )
            .await;
        match allowed {
            Ok(_) => readable.push(follower),
            Err(ApiError::NotFound(_) | ApiError::Forbidden(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let bundle = Exporter::new(
        state.inner.accounts.clone(),
        state.inner.clickhouse.client(),
    )
    .prepare_bundle(&readable, format)
    .await
    .map_err(export_problem)?;
    let writer = bundle.clone();
    Ok(stream_response(
        actor.user_id,
        "application/zip",
        &bundle.filename(),
        None,
        move |tx| async move { writer.write(tx).await },
    ))
}

/// Streams what `write` sends as the response body; a failure midway ends the body with an
/// error, so the transfer is aborted and the file never looks whole.
fn stream_response<F, Fut>(
    subject: uuid::Uuid,
    content_type: &'static str,
    filename: &str,
    length: Option<u64>,
    write: F,
) -> Response
where
    F: FnOnce(mpsc::Sender<Vec<u8>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<u64, ExportError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    // Whether the export completed: anything but a yes (an error, a panic) fails the body.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<bool>();
    tokio::spawn(async move {
        let done = match write(tx).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(%subject, error = %e, "export cut short");
                false
            }
        };
        let _ = done_tx.send(done);
    });
    let stream = futures_util::stream::unfold((rx, Some(done_rx)), |(mut rx, done)| async move {
        match rx.recv().await {
            Some(chunk) => Some((Ok(Bytes::from(chunk)), (rx, done))),
            None => match done?.await {
                Ok(true) => None,
                Ok(false) | Err(_) => Some((
                    Err(std::io::Error::other("the export failed midway")),
                    (rx, None),
                )),
            },
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    response
}

/// The problem answer of a refused or failed export.
fn export_problem(e: ExportError) -> ApiError {
    match e {
        ExportError::NotFound => ApiError::NotFound("session"),
        ExportError::NotExportable(detail) => ApiError::Conflict(detail),
        ExportError::Unsupported { field, reason } => ApiError::invalid(field, reason),
        ExportError::Accounts(e) => e.into(),
        ExportError::Points(e) => e.into(),
        e @ (ExportError::Write(_) | ExportError::Closed) => ApiError::Internal(e.into()),
    }
}
