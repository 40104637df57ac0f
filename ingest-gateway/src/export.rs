//! Export (GDPR article 15 and 20): everything biofeed holds about a person, streamed as
//! newline-delimited JSON (`application/x-ndjson`), one object per line, each with a `type`:
//!
//! | `type` | what |
//! |---|---|
//! | `export` | first line: `format` (`biofeed-export/1`), `user_id`, `generated_at`, `erased` |
//! | `profile` | the profile, decrypted (absent for an erased user) |
//! | `relationship` | one relationship the person is part of |
//! | `device` | one registered device (no token) |
//! | `session` | one session, with the location decrypted |
//! | `points` | up to 10,000 samples of one session and data type: `t_us` and `values` arrays |
//! | `access` | one record of the access log about the person |
//! | `end` | last line: counts of each type. An export without it was cut short. |
//!
//! The same function serves `GET /v1/me/export` and `biofeed admin user export`.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use biofeed_accounts::policy::Action;
use biofeed_accounts::{audit, devices, relationships, users, Accounts, AccountsError};
use chrono::Utc;
use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::auth::UserAuth;
use crate::people::allow;
use crate::problem::ApiError;
use crate::reads::{Sample, SessionView};
use crate::AppState;

/// The format name on the first line.
pub const FORMAT: &str = "biofeed-export/1";
/// Samples per `points` line.
const SAMPLES_PER_LINE: usize = 10_000;

/// How many lines of each type an export wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportCounts {
    /// Profile lines (0 or 1).
    pub profile: u64,
    /// Relationships.
    pub relationships: u64,
    /// Devices.
    pub devices: u64,
    /// Sessions.
    pub sessions: u64,
    /// Samples in all `points` lines.
    pub points: u64,
    /// Access records.
    pub access: u64,
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Postgres or the keys failed.
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    /// ClickHouse failed.
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    /// The reader went away.
    #[error("the reader of the export went away")]
    Closed,
}

impl From<sqlx::Error> for ExportError {
    fn from(e: sqlx::Error) -> Self {
        ExportError::Accounts(e.into())
    }
}

struct Lines(mpsc::Sender<Bytes>);

impl Lines {
    async fn send(&self, kind: &str, value: impl Serialize) -> Result<(), ExportError> {
        let mut object = serde_json::to_value(value).map_err(|e| {
            ExportError::Accounts(AccountsError::Invalid {
                field: "export",
                reason: e.to_string(),
            })
        })?;
        let mut line = serde_json::Map::new();
        line.insert("type".to_owned(), kind.into());
        if let Some(fields) = object.as_object_mut() {
            line.append(fields);
        }
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        self.0
            .send(Bytes::from(bytes))
            .await
            .map_err(|_| ExportError::Closed)
    }
}

/// Writes the export of `user` as lines into `out`.
pub async fn export_user(
    accounts: &Accounts,
    clickhouse: &clickhouse::Client,
    user: Uuid,
    out: mpsc::Sender<Bytes>,
) -> Result<ExportCounts, ExportError> {
    let lines = Lines(out);
    let pool = &accounts.pool;
    let mut counts = ExportCounts::default();
    let profile = match users::profile(accounts, user).await {
        Ok(profile) => Some(profile),
        Err(AccountsError::NoSuchUser) => None,
        Err(e) => return Err(e.into()),
    };
    lines
        .send(
            "export",
            serde_json::json!({
                "format": FORMAT, "user_id": user, "generated_at": Utc::now(),
                "erased": profile.is_none(),
            }),
        )
        .await?;
    if let Some(profile) = profile {
        lines.send("profile", profile).await?;
        counts.profile = 1;
        for relationship in relationships::list(pool, Some(user)).await? {
            lines.send("relationship", relationship).await?;
            counts.relationships += 1;
        }
        for device in devices::list_devices(pool, Some(user)).await? {
            lines.send("device", device).await?;
            counts.devices += 1;
        }
    }
    let mut before = None;
    loop {
        let page = crate::reads::sessions_of_user(accounts, user, before, 500).await?;
        let Some(last) = page.last() else { break };
        before = Some(last.started_at);
        for session in page {
            counts.points += export_points(clickhouse, &lines, &session).await?;
            lines.send("session", &session).await?;
            counts.sessions += 1;
        }
    }
    let mut before = None;
    loop {
        let page = audit::access_log(pool, user, before, 1000).await?;
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        for record in page {
            lines.send("access", record).await?;
            counts.access += 1;
        }
    }
    lines.send("end", &counts).await?;
    Ok(counts)
}

async fn export_points(
    clickhouse: &clickhouse::Client,
    lines: &Lines,
    session: &SessionView,
) -> Result<u64, ExportError> {
    let mut written = 0;
    for data_type in &session.data_types {
        let mut cursor = clickhouse
            .query(
                "SELECT t_us, values FROM points FINAL
                 WHERE user_id = toUUID(?) AND session_id = toUUID(?) AND data_type = ?
                 ORDER BY t_us",
            )
            .bind(session.user_id.to_string())
            .bind(session.session_id.to_string())
            .bind(data_type)
            .fetch::<Sample>()?;
        let mut chunk: Vec<Sample> = Vec::with_capacity(SAMPLES_PER_LINE);
        loop {
            let next = cursor.next().await?;
            let done = next.is_none();
            if let Some(sample) = next {
                chunk.push(sample);
            }
            if chunk.len() == SAMPLES_PER_LINE || (done && !chunk.is_empty()) {
                written += chunk.len() as u64;
                let (t_us, values): (Vec<i64>, Vec<Vec<f32>>) =
                    chunk.drain(..).map(|s| (s.t_us, s.values)).unzip();
                lines
                    .send(
                        "points",
                        serde_json::json!({
                            "session_id": session.session_id, "data_type": data_type,
                            "t_us": t_us, "values": values,
                        }),
                    )
                    .await?;
            }
            if done {
                break;
            }
        }
    }
    Ok(written)
}

/// Streams everything held about the caller (see the module documentation for the format).
#[utoipa::path(get, path = "/v1/me/export", tag = "accounts",
    responses((status = 200, description = "newline-delimited JSON; complete when its last line has type `end`",
               content_type = "application/x-ndjson", body = String)),
    security(("login_token" = [])))]
pub async fn export_me(
    State(state): State<AppState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Response, ApiError> {
    let me = actor.user_id;
    allow(
        &state,
        &actor,
        Action::ManageProfile { resource: "export" },
        me,
    )
    .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let inner = state.inner.clone();
    tokio::spawn(async move {
        let client = inner.clickhouse.client();
        if let Err(e) = export_user(&inner.accounts, &client, me, tx).await {
            tracing::warn!(user_id = %me, error = %e, "export cut short");
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, std::io::Error>(bytes), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}
