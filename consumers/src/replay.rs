//! `biofeed replay`: read a time range of the points topic (or the dead-letter topic) again and
//! write it to ClickHouse. Safe beside the running consumers: it reads with a group of its own,
//! commits nothing, and rows it writes again collapse into the originals.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use biofeed_schema::SensorFrame;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::PgPool;
use tokio::runtime::Handle;
use uuid::Uuid;

use biofeed_backends::registry::WriterSchemas;

use crate::checks::{Checks, Verdict};
use crate::sink::PointsSink;
use crate::{ConsumeError, ReplaySettings};

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReplaySummary {
    /// Messages read.
    pub messages: u64,
    /// Frames written to ClickHouse.
    pub frames: u64,
    /// Points (rows) written.
    pub points: u64,
    /// Messages skipped because they still fail the checks (they are in the dead-letter topic
    /// already; replay does not dead-letter them twice).
    pub skipped: u64,
    /// Frames dropped because their user is erased.
    pub dropped_erased: u64,
    /// Frames dropped because their session is no longer open or completed (aborted, expired,
    /// purged, or deleted with an erased person).
    pub dropped_closed: u64,
}

/// Parses an RFC 3339 time (`2026-11-24T08:00:00Z`) into milliseconds since the epoch.
pub fn parse_time(value: &str) -> Result<i64, String> {
    let time = humantime::parse_rfc3339_weak(value).map_err(|e| {
        format!("'{value}' is not an RFC 3339 time such as 2026-11-24T08:00:00Z ({e})")
    })?;
    let millis = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("'{value}' is before 1970"))?
        .as_millis();
    i64::try_from(millis).map_err(|_| format!("'{value}' is too far in the future"))
}

/// The range of one partition to read: `[start, end)`.
struct Range {
    partition: i32,
    start: i64,
    end: i64,
}

/// Runs on a blocking thread; `progress` is told each message read out of the total.
pub(crate) fn replay_blocking(
    rt: Handle,
    settings: &ReplaySettings,
    sink: PointsSink,
    checks: Checks,
    mut writers: WriterSchemas,
    pool: PgPool,
    progress: &dyn Fn(u64, u64),
) -> Result<ReplaySummary, ConsumeError> {
    let topic = if settings.dlq {
        &settings.stores.topics.dlq
    } else {
        &settings.stores.topics.points
    };
    let consumer = replay_consumer(settings)?;
    let timeout = settings
        .stores
        .kafka
        .connect_timeout
        .max(Duration::from_secs(5));
    let partitions = partitions_to_read(&consumer, settings, topic, timeout)?;
    let ranges = ranges_to_read(&consumer, settings, topic, &partitions, timeout)?;
    if ranges.is_empty() {
        return Ok(ReplaySummary::default());
    }
    let mut assignment = TopicPartitionList::new();
    for r in &ranges {
        assignment.add_partition_offset(topic, r.partition, Offset::Offset(r.start))?;
    }
    consumer.assign(&assignment)?;
    read_ranges(
        &consumer,
        &ranges,
        &checks,
        (&rt, &mut writers),
        settings.batch.max_rows,
        progress,
        &mut |batch, summary| write(&rt, &pool, &sink, batch, summary),
    )
}

/// Creates a consumer in a group of its own that commits nothing, so a replay never moves the
/// running consumers' offsets.
fn replay_consumer(settings: &ReplaySettings) -> Result<BaseConsumer, ConsumeError> {
    Ok(settings
        .stores
        .kafka
        .client_config()?
        .set(
            "group.id",
            format!("biofeed-replay-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?)
}

/// Lists the topic's partitions to read (all, or only the one asked for), failing when there
/// is none so a typo in the topic or partition is not mistaken for an empty range.
fn partitions_to_read(
    consumer: &BaseConsumer,
    settings: &ReplaySettings,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, ConsumeError> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .filter(|p| settings.partition.is_none_or(|only| only == *p))
        .collect();
    if partitions.is_empty() {
        return Err(ConsumeError::NoSuchPartition(match settings.partition {
            Some(p) => format!("topic {topic} has no partition {p}"),
            None => format!("topic {topic} does not exist"),
        }));
    }
    Ok(partitions)
}

/// Asks Kafka for each partition's first offset at or after `millis` (`i64::MAX` when there
/// is none), so a time range can be turned into offset ranges.
fn offsets_at_time(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    millis: i64,
    timeout: Duration,
) -> Result<HashMap<i32, i64>, ConsumeError> {
    let mut query = TopicPartitionList::new();
    for p in partitions {
        query.add_partition_offset(topic, *p, Offset::Offset(millis))?;
    }
    let answer = consumer.offsets_for_times(query, timeout)?;
    Ok(answer
        .elements()
        .iter()
        .map(|e| {
            (
                e.partition(),
                match e.offset() {
                    Offset::Offset(o) => o,
                    _ => i64::MAX,
                },
            )
        })
        .collect())
}

/// Works out where each partition starts and ends: by timestamp, or the whole retained log,
/// kept within the watermarks; partitions with nothing to read are left out.
fn ranges_to_read(
    consumer: &BaseConsumer,
    settings: &ReplaySettings,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<Vec<Range>, ConsumeError> {
    let by_time = |millis| offsets_at_time(consumer, topic, partitions, millis, timeout);
    let starts = settings.from.map(by_time).transpose()?;
    let ends = settings.to.map(by_time).transpose()?;
    let mut ranges = Vec::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, *p, timeout)?;
        let start = starts
            .as_ref()
            .and_then(|s| s.get(p).copied())
            .unwrap_or(low)
            .clamp(low, high);
        let end = ends
            .as_ref()
            .and_then(|e| e.get(p).copied())
            .unwrap_or(high)
            .clamp(start, high);
        if end > start {
            ranges.push(Range {
                partition: *p,
                start,
                end,
            });
        }
    }
    Ok(ranges)
}

/// Hands a batch of frames on (to `write`), emptying it and counting what became of them.
type Flush<'a> =
    dyn FnMut(&mut Vec<SensorFrame>, &mut ReplaySummary) -> Result<(), ConsumeError> + 'a;

/// Reads the assigned ranges to their ends, judging each message and handing batches of
/// frames to `flush` (at `max_rows` rows, and once more at the end); gives up with
/// `ConsumeError::Gap` after 30 idle seconds, as retention may have deleted the range's tail.
fn read_ranges(
    consumer: &BaseConsumer,
    ranges: &[Range],
    checks: &Checks,
    (rt, writers): (&Handle, &mut WriterSchemas),
    max_rows: usize,
    progress: &dyn Fn(u64, u64),
    flush: &mut Flush<'_>,
) -> Result<ReplaySummary, ConsumeError> {
    let total: u64 = ranges.iter().map(|r| (r.end - r.start) as u64).sum();
    let mut summary = ReplaySummary::default();
    let mut done: HashMap<i32, bool> = ranges.iter().map(|r| (r.partition, false)).collect();
    let ends: HashMap<i32, i64> = ranges.iter().map(|r| (r.partition, r.end)).collect();
    let mut batch: Vec<SensorFrame> = Vec::new();
    let mut batch_rows = 0usize;
    let mut idle_since = std::time::Instant::now();
    while done.values().any(|d| !d) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                idle_since = std::time::Instant::now();
                let end = ends.get(&message.partition()).copied().unwrap_or(0);
                if message.offset() >= end {
                    done.insert(message.partition(), true);
                    continue;
                }
                if message.offset() + 1 >= end {
                    done.insert(message.partition(), true);
                }
                summary.messages += 1;
                let payload = message.payload().unwrap_or_default();
                // A replay stops (exit 3) rather than wait for a registry that is away.
                if let Some(id) = writers.unknown_id(payload) {
                    rt.block_on(writers.learn(id))?;
                }
                match checks.judge(writers.ids(), payload) {
                    Verdict::Write(frame) => {
                        batch_rows += frame.samples();
                        batch.push(frame);
                    }
                    Verdict::Erased => summary.dropped_erased += 1,
                    Verdict::Dead(reason) => {
                        tracing::info!(
                            reason,
                            partition = message.partition(),
                            offset = message.offset(),
                            "skipping a frame that still fails the checks"
                        );
                        summary.skipped += 1;
                    }
                }
                progress(summary.messages, total);
            }
            Some(Err(e)) => tracing::warn!(error = %e, "kafka error during replay"),
            None => {
                // Messages deleted by retention mid-range leave gaps; stop waiting eventually.
                if idle_since.elapsed() > Duration::from_secs(30) {
                    return Err(ConsumeError::Gap(Duration::from_secs(30)));
                }
            }
        }
        if batch_rows >= max_rows || (!batch.is_empty() && done.values().all(|d| *d)) {
            flush(&mut batch, &mut summary)?;
            batch_rows = 0;
        }
    }
    flush(&mut batch, &mut summary)?;
    Ok(summary)
}

/// Writes the batch's frames whose session may still be written (asked of Postgres now, as the
/// consumer does before each insert); drops the rest.
fn write(
    rt: &Handle,
    pool: &PgPool,
    sink: &PointsSink,
    batch: &mut Vec<SensorFrame>,
    summary: &mut ReplaySummary,
) -> Result<(), ConsumeError> {
    if batch.is_empty() {
        return Ok(());
    }
    let writable = rt.block_on(crate::checks::writable_sessions(
        pool,
        &crate::checks::sessions_of(batch),
    ))?;
    summary.dropped_closed += crate::checks::retain_writable(batch, &writable) as u64;
    let kept = std::mem::take(batch);
    if kept.is_empty() {
        return Ok(());
    }
    let rows = rt.block_on(sink.insert(&kept))?;
    summary.frames += kept.len() as u64;
    summary.points += rows;
    // A replay commits nothing, so purge and erasure cannot wait for it: a session closed or a
    // person erased while this insert ran is deleted again here, now that the rows are in.
    let written = crate::checks::sessions_of(&kept);
    let still = rt.block_on(crate::checks::writable_sessions(pool, &written))?;
    let closed: Vec<(Uuid, Uuid)> = written
        .into_iter()
        .filter(|pair| !still.contains(pair))
        .collect();
    if !closed.is_empty() {
        tracing::info!(
            sessions = closed.len(),
            "sessions closed or erased while the replay wrote them: deleting their rows again"
        );
        rt.block_on(sink.delete_sessions(&closed))?;
    }
    Ok(())
}
