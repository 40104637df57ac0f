//! Whether the consumers have written everything the points topic held at a moment: the barrier
//! a deletion waits behind.
//!
//! A consumer asks Postgres, just before each insert, which of its batch's sessions may still be
//! written, and drops the frames of sessions aborted, expired or purged and of erased people. A
//! batch asked *before* a session closed may still be inserted after. So purge and erasure first
//! note each partition's end, then wait until the consumer group's committed offsets reach it: by
//! then every batch read before the change is in ClickHouse (offsets are committed only after
//! the insert), and every later one was asked after the change and drops the frames — the
//! deletion that follows is final. Reads group offsets and partition ends only: never joins the
//! group, never consumes, never commits.

use std::sync::Arc;
use std::time::Duration;

use biofeed_backends::kafka::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::jobs::JobError;

/// How far the consumer group got on the points topic.
#[derive(Clone)]
pub struct ConsumerProgress {
    client: Arc<BaseConsumer>,
    topic: String,
    group: String,
}

impl ConsumerProgress {
    /// A client that reads `group`'s committed offsets on `topic`.
    pub fn new(kafka: &KafkaSettings, topic: &str, group: &str) -> Result<Self, JobError> {
        let client: BaseConsumer = kafka
            .client_config()?
            .set("client.id", "biofeed-jobs")
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Self {
            client: Arc::new(client),
            topic: topic.to_owned(),
            group: group.to_owned(),
        })
    }

    /// Waits until the group has committed, on every partition, the end the partition had when
    /// this was called (empty partitions need nothing). Fails after `timeout`, naming how far
    /// behind the group still is.
    pub async fn wait_until_written(&self, timeout: Duration) -> Result<(), JobError> {
        let ends = self.blocking(Self::ends).await?;
        if ends.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ends = ends.clone();
            let behind = self.blocking(move |me| me.behind(&ends)).await?;
            if behind == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(JobError::ConsumersBehind {
                    group: self.group.clone(),
                    behind,
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Self) -> Result<T, JobError> + Send + 'static,
    ) -> Result<T, JobError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || work(&me))
            .await
            .map_err(|e| JobError::Panicked(format!("the kafka query failed: {e}")))?
    }

    /// Each non-empty partition's end (next offset to be written).
    fn ends(&self) -> Result<Vec<(i32, i64)>, JobError> {
        let timeout = Duration::from_secs(10);
        let metadata = self.client.fetch_metadata(Some(&self.topic), timeout)?;
        let mut ends = Vec::new();
        for topic in metadata.topics() {
            for partition in topic.partitions() {
                let (low, high) =
                    self.client
                        .fetch_watermarks(&self.topic, partition.id(), timeout)?;
                if high > low {
                    ends.push((partition.id(), high));
                }
            }
        }
        Ok(ends)
    }

    /// Messages the group's committed offsets are short of `ends`.
    fn behind(&self, ends: &[(i32, i64)]) -> Result<i64, JobError> {
        let mut partitions = TopicPartitionList::new();
        for (partition, _) in ends {
            partitions.add_partition(&self.topic, *partition);
        }
        let committed = self
            .client
            .committed_offsets(partitions, Duration::from_secs(10))?;
        let mut behind = 0;
        for (partition, end) in ends {
            let at = committed
                .find_partition(&self.topic, *partition)
                .and_then(|p| match p.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                });
            // A partition the group never committed on: everything in it is still to write
            // (unless retention removed it all: then it was not in `ends`).
            behind += (end - at.unwrap_or(0)).max(0);
        }
        Ok(behind)
    }
}
