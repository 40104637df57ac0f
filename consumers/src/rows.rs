//! ClickHouse rows of the `points` table, borrowed from decoded frames (no copy per row).

use biofeed_schema::SensorFrame;
use serde::Serialize;
use uuid::Uuid;

/// One row of `points`: one sample instant of one data type in one session.
#[derive(Debug, clickhouse::Row, Serialize)]
pub struct PointRow<'a> {
    /// Pseudonymous user id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub user_id: Uuid,
    /// The session.
    #[serde(with = "clickhouse::serde::uuid")]
    pub session_id: Uuid,
    /// The data type's name.
    pub data_type: &'a str,
    /// Sample time, µs since the epoch.
    pub t_us: i64,
    /// One value per channel.
    pub values: &'a [f32],
    /// When the consumer wrote the row (seconds since the epoch); the newest copy of a replayed
    /// row wins in ReplacingMergeTree, and all copies hold the same values.
    pub ingested_at: u32,
}

/// The rows of a frame.
pub fn rows_of(frame: &SensorFrame, ingested_at: u32) -> impl Iterator<Item = PointRow<'_>> {
    (0..frame.samples()).filter_map(move |i| {
        Some(PointRow {
            user_id: frame.user_id,
            session_id: frame.session_id,
            data_type: frame.data_type.as_str(),
            t_us: frame.time_us(i)?,
            values: frame.sample(i)?,
            ingested_at,
        })
    })
}
