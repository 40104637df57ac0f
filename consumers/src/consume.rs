//! The consume loop of `biofeed consume`: a consumer group on the points topic that writes
//! frames to ClickHouse in batches and commits offsets only after ClickHouse has the rows.
//!
//! The loop runs on a blocking thread with librdkafka's `BaseConsumer`, so that the rebalance
//! callback (which runs inside `poll`) can flush and commit the batch before partitions move to
//! another consumer. ClickHouse failing: the batch is held, fetching paused, the insert retried
//! with backoff; nothing is committed meanwhile, so nothing is lost, and rows written twice
//! collapse in the table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use biofeed_schema::SensorFrame;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;

use crate::checks::{Checks, Verdict};
use crate::dead_letters::{DeadLetters, Source};
use crate::metrics::{ConsumerMetrics, PartitionLabels};
use crate::sink::PointsSink;
use crate::{BatchLimits, ConsumeError};

/// Frames read but not yet in ClickHouse, and the offsets that become committable with them.
struct Pipeline {
    rt: Handle,
    sink: PointsSink,
    dead: DeadLetters,
    checks: Checks,
    metrics: ConsumerMetrics,
    limits: BatchLimits,
    shutdown: Arc<AtomicBool>,
    frames: Vec<SensorFrame>,
    rows: usize,
    bytes: usize,
    oldest: Option<Instant>,
    /// Next offset to commit per (topic, partition).
    pending: HashMap<(String, i32), i64>,
    /// Set when ClickHouse could not be reached at shutdown.
    abandoned: bool,
}

impl Pipeline {
    fn handle(&mut self, message: &BorrowedMessage<'_>) {
        let payload = message.payload().unwrap_or_default();
        match self.checks.judge(payload) {
            Verdict::Write(frame) => {
                self.rows += frame.samples();
                self.bytes += payload.len();
                self.oldest.get_or_insert_with(Instant::now);
                self.frames.push(frame);
            }
            Verdict::Erased => {
                self.metrics.dropped_erased.inc();
            }
            Verdict::Dead(reason) => {
                let source = Source {
                    topic: message.topic(),
                    partition: message.partition(),
                    offset: message.offset(),
                };
                self.rt
                    .block_on(self.dead.send(message.key(), payload, &reason, source));
                self.metrics.dead_lettered.inc();
            }
        }
        self.pending.insert(
            (message.topic().to_owned(), message.partition()),
            message.offset() + 1,
        );
    }

    fn due(&self) -> bool {
        self.rows >= self.limits.max_rows
            || self.bytes >= self.limits.max_bytes
            || self
                .oldest
                .is_some_and(|t| t.elapsed() >= self.limits.max_age)
            || (self.frames.is_empty() && !self.pending.is_empty())
    }

    /// Writes the batch (retrying while ClickHouse fails) and commits its offsets. Returns false
    /// when shutdown came while ClickHouse was still failing: nothing is committed then.
    fn flush<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> bool {
        if !self.frames.is_empty() {
            let started = Instant::now();
            let paused = consumer.assignment().ok();
            let mut paused_fetching = false;
            let shutdown = Arc::clone(&self.shutdown);
            let metrics = self.metrics.clone();
            let written = self.rt.block_on(self.sink.insert_until_done(
                &self.frames,
                || shutdown.load(Ordering::Relaxed),
                |e, attempt| {
                    metrics.insert_failures.inc();
                    tracing::warn!(error = %e, attempt, "clickhouse insert failed; holding the batch and retrying");
                    // Stop fetching while the batch is held, so memory stays bounded.
                    if !paused_fetching {
                        if let Some(assignment) = &paused {
                            paused_fetching = consumer.pause(assignment).is_ok();
                        }
                    }
                },
            ));
            if paused_fetching {
                if let Some(assignment) = &paused {
                    let _ = consumer.resume(assignment);
                }
            }
            let Some(rows) = written else {
                self.abandoned = true;
                return false;
            };
            self.metrics
                .insert_latency
                .observe(started.elapsed().as_secs_f64());
            self.metrics.batch_rows.observe(rows as f64);
            self.metrics.rows_written.inc_by(rows);
            self.metrics.frames_written.inc_by(self.frames.len() as u64);
        }
        if !self.pending.is_empty() {
            let mut offsets = TopicPartitionList::new();
            for ((topic, partition), next) in &self.pending {
                let _ = offsets.add_partition_offset(topic, *partition, Offset::Offset(*next));
            }
            if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                // The rows are in ClickHouse; the messages will be read again and collapse there.
                tracing::warn!(error = %e, "offset commit failed; the batch will be re-read and deduplicated");
            }
        }
        self.frames.clear();
        self.pending.clear();
        self.rows = 0;
        self.bytes = 0;
        self.oldest = None;
        true
    }
}

/// Flushes and commits before partitions are taken away.
struct FlushOnRevoke {
    pipeline: Arc<Mutex<Pipeline>>,
}

fn lock(pipeline: &Mutex<Pipeline>) -> MutexGuard<'_, Pipeline> {
    pipeline
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClientContext for FlushOnRevoke {}

impl ConsumerContext for FlushOnRevoke {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            tracing::info!(
                partitions = partitions.count(),
                "partitions revoked: flushing the batch first"
            );
            lock(&self.pipeline).flush(consumer);
        }
    }
}

/// What a consume run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsumeSummary {
    /// Rows written.
    pub rows: u64,
    /// Frames dead-lettered.
    pub dead_lettered: u64,
    /// Frames dropped for erased users.
    pub dropped_erased: u64,
}

pub(crate) struct LoopParts {
    pub rt: Handle,
    pub sink: PointsSink,
    pub dead: DeadLetters,
    pub pool: PgPool,
    pub metrics: ConsumerMetrics,
    pub limits: BatchLimits,
    pub refresh: Duration,
    pub shutdown: Arc<AtomicBool>,
}

/// Runs the loop on the current (blocking) thread until `shutdown` is set.
pub(crate) fn consume_loop(
    parts: LoopParts,
    config: rdkafka::ClientConfig,
    topic: &str,
) -> Result<ConsumeSummary, ConsumeError> {
    let checks = parts
        .rt
        .block_on(Checks::load(&parts.pool))
        .map_err(ConsumeError::Postgres)?;
    let pipeline = Arc::new(Mutex::new(Pipeline {
        rt: parts.rt.clone(),
        sink: parts.sink,
        dead: parts.dead,
        checks,
        metrics: parts.metrics.clone(),
        limits: parts.limits,
        shutdown: Arc::clone(&parts.shutdown),
        frames: Vec::new(),
        rows: 0,
        bytes: 0,
        oldest: None,
        pending: HashMap::new(),
        abandoned: false,
    }));
    let consumer: BaseConsumer<FlushOnRevoke> = config
        .create_with_context(FlushOnRevoke {
            pipeline: Arc::clone(&pipeline),
        })
        .map_err(|e| ConsumeError::Kafka(e.to_string()))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| ConsumeError::Kafka(e.to_string()))?;
    tracing::info!(topic, "consuming");

    let mut last_refresh = Instant::now();
    let mut last_lag = Instant::now();
    while !parts.shutdown.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => lock(&pipeline).handle(&message),
            Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
        }
        {
            let mut p = lock(&pipeline);
            if p.due() && !p.flush(&consumer) {
                break;
            }
        }
        if last_refresh.elapsed() >= parts.refresh {
            last_refresh = Instant::now();
            match parts.rt.block_on(Checks::load(&parts.pool)) {
                Ok(checks) => lock(&pipeline).checks = checks,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh data types and the erasure list; keeping the old ones")
                }
            }
        }
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            record_lag(&consumer, &parts.metrics);
        }
    }
    let mut p = lock(&pipeline);
    if !p.abandoned && !p.flush(&consumer) {
        p.abandoned = true;
    }
    if p.abandoned {
        return Err(ConsumeError::Abandoned {
            frames: p.frames.len(),
        });
    }
    drop(p);
    consumer.unsubscribe();
    Ok(ConsumeSummary {
        rows: parts.metrics.rows_written.get(),
        dead_lettered: parts.metrics.dead_lettered.get(),
        dropped_erased: parts.metrics.dropped_erased.get(),
    })
}

fn record_lag<C: ConsumerContext>(consumer: &BaseConsumer<C>, metrics: &ConsumerMetrics) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    for element in positions.elements() {
        let Offset::Offset(position) = element.offset() else {
            continue;
        };
        if let Ok((_, high)) =
            consumer.fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(1))
        {
            metrics
                .lag
                .get_or_create(&PartitionLabels {
                    topic: element.topic().to_owned(),
                    partition: element.partition(),
                })
                .set(high - position);
        }
    }
}
