//! Writing frames to ClickHouse's `points` table, RowBinary through the `clickhouse` crate.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use biofeed_schema::SensorFrame;

use crate::rows::{rows_of, PointRow};

/// The `points` table of one database.
#[derive(Clone)]
pub struct PointsSink {
    client: clickhouse::Client,
    table: String,
}

impl PointsSink {
    /// A sink writing to `table` with `client` (whose database is biofeed's).
    pub fn new(client: clickhouse::Client, table: &str) -> Self {
        Self {
            client,
            table: table.to_owned(),
        }
    }

    /// Inserts every row of the frames in one INSERT. Either it succeeds, or it may be repeated:
    /// rows written twice collapse in the table.
    #[tracing::instrument(skip_all, fields(frames = frames.len()))]
    pub async fn insert(&self, frames: &[SensorFrame]) -> Result<u64, clickhouse::error::Error> {
        let ingested_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let mut insert = self.client.insert::<PointRow<'_>>(&self.table).await?;
        let mut rows = 0u64;
        for frame in frames {
            for row in rows_of(frame, ingested_at) {
                insert.write(&row).await?;
                rows += 1;
            }
        }
        insert.end().await?;
        Ok(rows)
    }

    /// Inserts, retrying with exponential backoff (100 ms doubling to 5 s) until it succeeds or
    /// `give_up` says so. Returns the rows written, or `None` when it gave up.
    pub async fn insert_until_done(
        &self,
        frames: &[SensorFrame],
        mut give_up: impl FnMut() -> bool,
        mut on_failure: impl FnMut(&clickhouse::error::Error, u32),
    ) -> Option<u64> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            match self.insert(frames).await {
                Ok(rows) => {
                    tracing::debug!(rows, elapsed = ?started.elapsed(), "inserted batch");
                    return Some(rows);
                }
                Err(e) => {
                    attempt += 1;
                    on_failure(&e, attempt);
                    if give_up() {
                        return None;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
