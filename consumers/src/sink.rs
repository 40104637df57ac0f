//! Writing frames to ClickHouse's `points` table, RowBinary through the `clickhouse` crate.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use biofeed_backends::clickhouse::ClickHouse;
use biofeed_schema::SensorFrame;
use uuid::Uuid;

use crate::rows::{rows_of, PointRow};

/// How a ClickHouse server orders UUIDs in a sort key. Older servers (18.16 among them) compare
/// a UUID's last eight bytes before its first eight; newer ones compare them in text order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UuidOrder {
    /// Byte (text) order, as `Uuid`'s `Ord`.
    Text,
    /// The last eight bytes first, then the first eight.
    LastHalfFirst,
}

impl UuidOrder {
    /// Asks the server how it orders UUIDs.
    pub async fn of(client: &clickhouse::Client) -> Result<Self, clickhouse::error::Error> {
        let text_order: u8 = client
            .query("SELECT toUUID('00000000-0000-0000-0000-000000000001') < toUUID('00000000-0000-0001-0000-000000000000')")
            .fetch_one()
            .await?;
        Ok(if text_order == 1 {
            Self::Text
        } else {
            Self::LastHalfFirst
        })
    }

    /// A key that sorts UUIDs as the server does.
    pub fn key(self, id: &Uuid) -> (u64, u64) {
        let (first, last) = id.as_u64_pair();
        match self {
            Self::Text => (first, last),
            Self::LastHalfFirst => (last, first),
        }
    }
}

/// The `points` table of one database.
#[derive(Clone)]
pub struct PointsSink {
    ch: ClickHouse,
    client: clickhouse::Client,
    table: String,
    order: UuidOrder,
}

impl PointsSink {
    /// A sink writing to `table` with `client` (whose database is biofeed's); asks the server
    /// how it orders UUIDs, so that inserts arrive in the table's sort order.
    pub async fn connect(ch: &ClickHouse, table: &str) -> Result<Self, clickhouse::error::Error> {
        let client = ch.client();
        let order = UuidOrder::of(&client).await?;
        Ok(Self {
            ch: ch.clone(),
            client,
            table: table.to_owned(),
            order,
        })
    }

    /// Inserts every row of the frames in one INSERT. Either it succeeds, or it may be repeated:
    /// rows written twice collapse in the table.
    ///
    /// Rows go in the table's sort order (user, session, data type, time, with UUIDs ordered as
    /// the server orders them): ClickHouse then writes the part without sorting it, which is most
    /// of an insert's work on one core (`MergeTreeDataWriterBlocksAlreadySorted` counts these).
    #[tracing::instrument(skip_all, fields(frames = frames.len()))]
    pub async fn insert(&self, frames: &[SensorFrame]) -> Result<u64, clickhouse::error::Error> {
        let ingested_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let mut sorted: Vec<&SensorFrame> = frames.iter().collect();
        sorted.sort_by_cached_key(|f| {
            (
                self.order.key(&f.user_id),
                self.order.key(&f.session_id),
                f.data_type.as_str(),
                f.t0_us,
            )
        });
        let mut insert = self.client.insert::<PointRow<'_>>(&self.table).await?;
        let mut rows = 0u64;
        for frame in sorted {
            for row in rows_of(frame, ingested_at) {
                insert.write(&row).await?;
                rows += 1;
            }
        }
        insert.end().await?;
        Ok(rows)
    }

    /// Deletes the rows of these (session, user) pairs (`ALTER TABLE … DELETE`, on every shard
    /// of a cluster, which ClickHouse applies in the background; purge and erasure verify
    /// theirs).
    pub async fn delete_sessions(
        &self,
        sessions: &[(Uuid, Uuid)],
    ) -> Result<(), clickhouse::error::Error> {
        let list = |ids: Vec<String>| ids.join(",");
        let session_ids = list(
            sessions
                .iter()
                .map(|(s, _)| format!("toUUID('{s}')"))
                .collect(),
        );
        let user_ids = list(
            sessions
                .iter()
                .map(|(_, u)| format!("toUUID('{u}')"))
                .collect(),
        );
        let condition = format!("user_id IN ({user_ids}) AND session_id IN ({session_ids})");
        self.ch
            .ddl(
                self.client
                    .query(&self.ch.delete_sql(&self.table, &condition)),
            )
            .execute()
            .await
    }

    /// Inserts, retrying with exponential backoff (100 ms doubling to 5 s) until it succeeds or
    /// `give_up` says so. Returns the rows written, or `None` when it gave up.
    pub async fn insert_until_done(
        &self,
        frames: &[SensorFrame],
        give_up: impl FnMut() -> bool,
        on_failure: impl FnMut(&clickhouse::error::Error, u32),
    ) -> Option<u64> {
        let started = Instant::now();
        let rows = crate::retry::with_backoff(|| self.insert(frames), give_up, on_failure).await?;
        tracing::debug!(rows, elapsed = ?started.elapsed(), "inserted batch");
        Some(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_uuid_orders_differ_where_the_halves_disagree() {
        let first_half = Uuid::from_u64_pair(1, 0);
        let last_half = Uuid::from_u64_pair(0, 1);
        assert!(UuidOrder::Text.key(&last_half) < UuidOrder::Text.key(&first_half));
        assert!(
            UuidOrder::LastHalfFirst.key(&first_half) < UuidOrder::LastHalfFirst.key(&last_half)
        );
        let a = Uuid::from_u64_pair(3, 4);
        assert_eq!(UuidOrder::Text.key(&a), (3, 4));
        assert_eq!(UuidOrder::LastHalfFirst.key(&a), (4, 3));
    }
}
