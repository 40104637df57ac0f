//! What a person recorded, as people read it: sessions from Postgres, their location opened
//! for their owner only; and, for the export, the samples from ClickHouse. The read endpoints
//! ([`super::reads`]) use the sessions; [`StoredRecordings`] is the export's
//! [`Recordings`] — `accounts` writes the export, this reads the stores it does not talk to.
//! No HTTP here: `biofeed admin user export` uses [`StoredRecordings`] too.

use biofeed_accounts::crypto::Place;
use biofeed_accounts::export::{self, ExportError, RecordedSession, Recordings, SampleReader};
use biofeed_accounts::{Accounts, AccountsError};
use chrono::{DateTime, Utc};
use clickhouse::query::RowCursor;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::people::reads::Sample;

/// A session as people read it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct SessionView {
    /// The session.
    pub session_id: Uuid,
    /// Whose.
    pub user_id: Uuid,
    /// Recorded by which device (None if the device was deleted).
    pub device_id: Option<Uuid>,
    /// The exercise's name.
    pub exercise: String,
    /// `open`, `completed`, `aborted`, `expired` or `purged`.
    pub status: String,
    /// The data types it streams.
    pub data_types: Vec<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it expires if still open.
    pub deadline_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// The user's feedback after the session.
    #[schema(value_type = Object)]
    pub feedback: Option<serde_json::Value>,
    /// Where it happened: shown to its owner only.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[sqlx(skip)]
    pub location: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    location_ct: Option<Vec<u8>>,
}

pub(crate) const SESSION_COLUMNS: &str = "s.id AS session_id, s.user_id, s.device_id, e.name AS exercise, s.status,
    coalesce(array_agg(d.name ORDER BY d.name) FILTER (WHERE d.name IS NOT NULL), '{}') AS data_types,
    s.started_at, s.deadline_at, s.ended_at, s.feedback, s.location_ct
    FROM sessions s JOIN exercises e ON e.id = s.exercise_id
    LEFT JOIN session_data_types sd ON sd.session_id = s.id
    LEFT JOIN data_types d ON d.id = sd.data_type_id";

/// Sessions of `owner`, newest first; the location decrypted for the owner only.
pub(crate) async fn sessions_of(
    accounts: &Accounts,
    owner: Uuid,
    reader: Uuid,
    before: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<SessionView>, AccountsError> {
    let rows: Vec<SessionView> = sqlx::query_as(&format!(
        "SELECT {SESSION_COLUMNS} WHERE s.user_id = $1 AND ($2::timestamptz IS NULL OR s.started_at < $2)
         GROUP BY s.id, e.name ORDER BY s.started_at DESC LIMIT $3"
    ))
    .bind(owner)
    .bind(before)
    .bind(limit)
    .fetch_all(&accounts.pool)
    .await?;
    reveal_locations(accounts, rows, reader).await
}

pub(crate) async fn reveal_locations(
    accounts: &Accounts,
    mut rows: Vec<SessionView>,
    reader: Uuid,
) -> Result<Vec<SessionView>, AccountsError> {
    for row in &mut rows {
        if let (Some(ct), true) = (row.location_ct.take(), row.user_id == reader) {
            let plain = biofeed_accounts::users::open_for_user(
                accounts,
                row.user_id,
                Place {
                    table: "sessions",
                    column: "location_ct",
                    row: row.session_id,
                },
                &ct,
            )
            .await?;
            row.location = Some(String::from_utf8_lossy(&plain).into_owned());
        }
    }
    Ok(rows)
}

/// A person's sessions from Postgres and their samples from ClickHouse, for the export.
pub struct StoredRecordings {
    accounts: Accounts,
    clickhouse: clickhouse::Client,
}

impl StoredRecordings {
    /// Reads sessions through `accounts` (whose keys open the locations) and samples through
    /// `clickhouse`.
    pub fn new(accounts: Accounts, clickhouse: clickhouse::Client) -> Self {
        Self {
            accounts,
            clickhouse,
        }
    }
}

impl Recordings for StoredRecordings {
    type Samples = StoredSamples;

    async fn sessions(
        &self,
        user: Uuid,
        before: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<RecordedSession>, ExportError> {
        // The location is opened: the export only ever goes to the person.
        let sessions = sessions_of(&self.accounts, user, user, before, limit).await?;
        sessions
            .into_iter()
            .map(|session| {
                let line = serde_json::to_value(&session).map_err(|e| AccountsError::Invalid {
                    field: "export",
                    reason: e.to_string(),
                })?;
                Ok(RecordedSession {
                    session_id: session.session_id,
                    started_at: session.started_at,
                    data_types: session.data_types,
                    line,
                })
            })
            .collect()
    }

    fn samples(
        &self,
        user: Uuid,
        session: Uuid,
        data_type: &str,
    ) -> Result<StoredSamples, ExportError> {
        let cursor = self
            .clickhouse
            .query(
                "SELECT t_us, values FROM points FINAL
                 WHERE user_id = toUUID(?) AND session_id = toUUID(?) AND data_type = ?
                 ORDER BY t_us",
            )
            .bind(user.to_string())
            .bind(session.to_string())
            .bind(data_type)
            .fetch::<Sample>()
            .map_err(|e| ExportError::Points(e.into()))?;
        Ok(StoredSamples(cursor))
    }
}

/// One session's samples of one data type, streamed from ClickHouse.
pub struct StoredSamples(RowCursor<Sample>);

impl SampleReader for StoredSamples {
    async fn next(&mut self) -> Result<Option<export::Sample>, ExportError> {
        let sample = self
            .0
            .next()
            .await
            .map_err(|e| ExportError::Points(e.into()))?;
        Ok(sample.map(|s| export::Sample {
            t_us: s.t_us,
            values: s.values,
        }))
    }
}
