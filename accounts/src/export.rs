//! Export (GDPR articles 15 and 20): everything biofeed holds about a person, as
//! newline-delimited JSON, one object per line, each with a `type`:
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
//! [`export_user`] writes the lines for `GET /v1/me/export` and `biofeed admin user export`
//! alike. It reads the person's own records here (profile, relationships, devices, access log);
//! what they recorded — sessions and their samples, kept in stores this crate does not talk to
//! (the samples are in ClickHouse) — comes through a [`Recordings`] given by the caller, so the
//! export decides the format and the order in one place while the reading of ClickHouse stays
//! where ClickHouse is read (the gateway's `people::recordings`).

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{audit, devices, relationships, users, Accounts, AccountsError};

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
    /// The store of the samples (ClickHouse) failed.
    #[error("clickhouse: {0}")]
    Points(Box<dyn std::error::Error + Send + Sync>),
    /// The reader went away.
    #[error("the reader of the export went away")]
    Closed,
}

impl From<sqlx::Error> for ExportError {
    fn from(e: sqlx::Error) -> Self {
        ExportError::Accounts(e.into())
    }
}

/// One session of the person, as the export needs it.
#[derive(Debug, Clone)]
pub struct RecordedSession {
    /// The session.
    pub session_id: Uuid,
    /// When it started: sessions are paged by it.
    pub started_at: DateTime<Utc>,
    /// The data types it streamed: one run of `points` lines each.
    pub data_types: Vec<String>,
    /// The session as its `session` line shows it, location included (the export goes only to
    /// the person).
    pub line: serde_json::Value,
}

/// One sample: its time and one value per channel.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Sample time, µs since the epoch.
    pub t_us: i64,
    /// One value per channel.
    pub values: Vec<f32>,
}

/// What a person recorded, read from where it is kept: the export's seam to the stores this
/// crate does not talk to. Implemented by the gateway over Postgres and ClickHouse.
pub trait Recordings: Sync {
    /// A reader of one session's samples of one data type.
    type Samples: SampleReader + Send;

    /// The person's sessions, newest first, started before `before` (all when `None`), at most
    /// `limit` of them.
    fn sessions(
        &self,
        user: Uuid,
        before: Option<DateTime<Utc>>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<RecordedSession>, ExportError>> + Send;

    /// The samples of `user`'s `session` of `data_type`, in time order.
    fn samples(
        &self,
        user: Uuid,
        session: Uuid,
        data_type: &str,
    ) -> Result<Self::Samples, ExportError>;
}

/// Samples in time order, one at a time.
pub trait SampleReader {
    /// The next sample, or `None` after the last.
    fn next(&mut self) -> impl Future<Output = Result<Option<Sample>, ExportError>> + Send;
}

/// Writes the export of `user` as lines into `out`, one `Vec` per line (newline included), and
/// returns the counts written on the last line. The caller decides who may ask (the policy, or
/// an operator with [`users::audit_operator_export`]).
pub async fn export_user(
    accounts: &Accounts,
    recordings: &impl Recordings,
    user: Uuid,
    out: mpsc::Sender<Vec<u8>>,
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
        let page = recordings.sessions(user, before, 500).await?;
        let Some(last) = page.last() else { break };
        before = Some(last.started_at);
        for session in page {
            counts.points += export_points(recordings, &lines, user, &session).await?;
            lines.send("session", &session.line).await?;
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

/// Writes the `points` lines of one session, [`SAMPLES_PER_LINE`] samples at most per line.
async fn export_points(
    recordings: &impl Recordings,
    lines: &Lines,
    user: Uuid,
    session: &RecordedSession,
) -> Result<u64, ExportError> {
    let mut written = 0;
    for data_type in &session.data_types {
        let mut samples = recordings.samples(user, session.session_id, data_type)?;
        let mut chunk: Vec<Sample> = Vec::with_capacity(SAMPLES_PER_LINE);
        loop {
            let next = samples.next().await?;
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

/// The export's output: each line is an object whose first key is its `type`.
struct Lines(mpsc::Sender<Vec<u8>>);

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
        self.0.send(bytes).await.map_err(|_| ExportError::Closed)
    }
}

/// A pseudonymous, stable label for `user` in exports meant for other tools (the EDF+ patient
/// code, a BIDS participant): 16 hex digits of a keyed hash of the user's id under the
/// blind-index key, so it cannot be traced back without the key and never changes with the
/// person's details.
pub fn participant_label(accounts: &Accounts, user: Uuid) -> String {
    use hmac::{Hmac, Mac};
    #[allow(clippy::expect_used)] // HMAC takes keys of any length
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(&accounts.keys.blind_index_key_bytes())
            .expect("hmac accepts 32-byte keys");
    mac.update(b"export-participant/");
    mac.update(user.as_bytes());
    mac.finalize().into_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
