//! The consume loop of `biofeed consume`: a consumer group on the points topic that writes
//! frames to ClickHouse in batches and commits offsets only after ClickHouse has the rows.
//!
//! The loop runs on a blocking thread with librdkafka's `BaseConsumer`, so that the rebalance
//! callback (which runs inside `poll`) can flush and commit the batch before partitions move to
//! another consumer. ClickHouse failing: the batch is held, fetching paused, the insert retried
//! with backoff; nothing is committed meanwhile, so nothing is lost, and rows written twice
//! collapse in the table.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use biofeed_backends::registry::WriterSchemas;
use biofeed_backends::shutdown::Shutdown;
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

/// A batch being inserted by a background task while the next one fills.
struct InFlight {
    /// Rows and frames written (frames of closed sessions are dropped first), or `None` when
    /// shutdown came while a backend was failing.
    task: tokio::task::JoinHandle<Option<(u64, usize)>>,
    frames: usize,
    offsets: HashMap<(String, i32), i64>,
    started: Instant,
}

/// Frames read but not yet in ClickHouse, and the offsets that become committable with them.
/// At most `inserts_in_flight` batches are being inserted (ClickHouse 18.16 parses and writes an
/// insert on one thread, so two in flight use both cores of a small machine) plus one filling.
struct Pipeline {
    rt: Handle,
    sink: PointsSink,
    dead: DeadLetters,
    checks: Checks,
    writers: WriterSchemas,
    pool: PgPool,
    metrics: ConsumerMetrics,
    limits: BatchLimits,
    shutdown: Shutdown,
    frames: Vec<SensorFrame>,
    rows: usize,
    bytes: usize,
    oldest: Option<Instant>,
    /// Next offset to commit per (topic, partition).
    pending: HashMap<(String, i32), i64>,
    /// Batches ClickHouse is taking, oldest first; their offsets are committed in this order.
    in_flight: std::collections::VecDeque<InFlight>,
    /// Set when ClickHouse (or Postgres) could not be reached at shutdown.
    abandoned: bool,
    /// Frames not written because of that (in batches handed to an insert).
    frames_abandoned: usize,
    /// Set when a frame needs a schema registry that is not configured or refuses us: the
    /// consumer stops (exit 2) rather than dead-letter every such frame.
    refused: Option<biofeed_backends::BackendError>,
}

impl Pipeline {
    fn handle(&mut self, message: &BorrowedMessage<'_>) {
        let payload = message.payload().unwrap_or_default();
        match crate::checks::learn_writer(
            &self.rt,
            &mut self.writers,
            payload,
            &self.shutdown,
            &self.metrics.registry_failures,
        ) {
            Ok(()) => {}
            // The message is neither judged nor marked committable, so it is read again (the
            // loop stops before taking another one).
            Err(crate::checks::NotLearnt::GaveUp) => return,
            Err(crate::checks::NotLearnt::Refused(e)) => {
                tracing::error!(error = %e, "a frame needs the schema registry; stopping");
                self.refused = Some(e);
                self.shutdown.fire();
                return;
            }
        }
        match self.checks.judge(self.writers.ids(), payload) {
            Verdict::Write(frame) => {
                self.rows += frame.samples();
                self.metrics.batch_pending_rows.set(self.rows as i64);
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

    /// Hands the batch to a background insert (retried while ClickHouse fails) and goes on
    /// reading; first waits for the previous batch's insert and commits its offsets. Returns
    /// false when shutdown came while ClickHouse was still failing: nothing more is committed.
    fn flush<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> bool {
        if self.abandoned {
            // A batch was given up: nothing after it may be committed (that would skip it).
            return false;
        }
        while self.in_flight.len() >= usize::from(self.limits.inserts_in_flight)
            || (self.frames.is_empty() && !self.in_flight.is_empty())
        {
            if !self.finish_in_flight(consumer) {
                return false;
            }
        }
        if self.frames.is_empty() {
            // Only dead letters or dropped frames since the last commit.
            let pending = std::mem::take(&mut self.pending);
            self.commit(consumer, pending);
            return true;
        }
        let frames = std::mem::take(&mut self.frames);
        let count = frames.len();
        let sink = self.sink.clone();
        let pool = self.pool.clone();
        let shutdown = self.shutdown.clone();
        let metrics = self.metrics.clone();
        let task = self.rt.spawn(async move {
            let give_up = || shutdown.is_fired();
            let frames = writable_frames(&pool, frames, &metrics, give_up).await?;
            if frames.is_empty() {
                return Some((0, 0));
            }
            let rows = sink
                .insert_until_done(&frames, give_up, |e, attempt| {
                    metrics.insert_failures.inc();
                    tracing::warn!(error = %e, attempt, "clickhouse insert failed; holding the batch and retrying");
                })
                .await?;
            Some((rows, frames.len()))
        });
        self.in_flight.push_back(InFlight {
            task,
            frames: count,
            offsets: std::mem::take(&mut self.pending),
            started: Instant::now(),
        });
        self.rows = 0;
        self.metrics.batch_pending_rows.set(0);
        self.bytes = 0;
        self.oldest = None;
        true
    }

    /// Writes everything held and commits it: before partitions move, and at shutdown.
    fn drain<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> bool {
        if !self.flush(consumer) {
            return false;
        }
        while !self.in_flight.is_empty() {
            if !self.finish_in_flight(consumer) {
                return false;
            }
        }
        true
    }

    /// Whether the oldest insert has finished, so that its offsets can be committed.
    fn oldest_finished(&self) -> bool {
        self.in_flight.front().is_some_and(|f| f.task.is_finished())
    }

    /// Waits for the oldest batch being inserted, pausing fetching meanwhile if it is slow
    /// (ClickHouse failing), then commits its offsets.
    fn finish_in_flight<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> bool {
        let Some(in_flight) = self.in_flight.pop_front() else {
            return true;
        };
        let paused = if in_flight.task.is_finished() {
            None
        } else {
            consumer
                .assignment()
                .ok()
                .filter(|a| consumer.pause(a).is_ok())
        };
        let written = self.rt.block_on(in_flight.task).unwrap_or(None);
        if let Some(assignment) = &paused {
            let _ = consumer.resume(assignment);
        }
        let Some((rows, frames)) = written else {
            self.abandoned = true;
            self.frames_abandoned +=
                in_flight.frames + self.in_flight.iter().map(|f| f.frames).sum::<usize>();
            return false;
        };
        self.metrics
            .insert_latency
            .observe(in_flight.started.elapsed().as_secs_f64());
        self.metrics.batch_rows.observe(rows as f64);
        self.metrics.rows_written.inc_by(rows);
        self.metrics.frames_written.inc_by(frames as u64);
        self.commit(consumer, in_flight.offsets);
        true
    }

    /// Commits `offsets` (next offset per partition). If the commit fails, they are kept and
    /// go with the next commit, so that a partition without new messages does not stay behind
    /// (purge and erasure wait for the group's committed offsets).
    fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        offsets: HashMap<(String, i32), i64>,
    ) {
        if offsets.is_empty() || self.abandoned {
            return;
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), next) in &offsets {
            let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
            // The rows are in ClickHouse; if the partitions move before the next commit, the
            // messages are read again and collapse there.
            tracing::warn!(error = %e, "offset commit failed; retrying it with the next commit");
            for (key, next) in offsets {
                // A newer offset read since supersedes this one.
                self.pending.entry(key).or_insert(next);
            }
        }
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
            lock(&self.pipeline).drain(consumer);
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
    /// Frames dropped because their session was no longer open or completed.
    pub dropped_closed: u64,
}

pub(crate) struct LoopParts {
    pub rt: Handle,
    pub sink: PointsSink,
    pub dead: DeadLetters,
    pub pool: PgPool,
    pub metrics: ConsumerMetrics,
    pub limits: BatchLimits,
    pub refresh: Duration,
    pub shutdown: Shutdown,
    pub writers: WriterSchemas,
}

/// Runs the loop on the current (blocking) thread until `shutdown` fires.
pub(crate) fn consume_loop(
    parts: LoopParts,
    config: rdkafka::ClientConfig,
    topic: &str,
) -> Result<ConsumeSummary, ConsumeError> {
    let checks = parts.rt.block_on(Checks::load(&parts.pool))?;
    let pipeline = Arc::new(Mutex::new(Pipeline {
        rt: parts.rt.clone(),
        sink: parts.sink,
        dead: parts.dead,
        checks,
        writers: parts.writers,
        pool: parts.pool.clone(),
        metrics: parts.metrics.clone(),
        limits: parts.limits,
        shutdown: parts.shutdown.clone(),
        frames: Vec::new(),
        rows: 0,
        bytes: 0,
        oldest: None,
        pending: HashMap::new(),
        in_flight: std::collections::VecDeque::new(),
        abandoned: false,
        frames_abandoned: 0,
        refused: None,
    }));
    let consumer: BaseConsumer<FlushOnRevoke> = config.create_with_context(FlushOnRevoke {
        pipeline: Arc::clone(&pipeline),
    })?;
    consumer.subscribe(&[topic])?;
    tracing::info!(topic, "consuming");

    let mut last_refresh = Instant::now();
    let mut last_lag = Instant::now();
    while !parts.shutdown.is_fired() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => lock(&pipeline).handle(&message),
            Some(Err(e)) => {
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    // E.g. another member took this one's group.instance.id: this consumer can
                    // no longer commit. Stop without writing or committing more (closing the
                    // consumer must not drain either); what is uncommitted is read again by the
                    // member that has the partitions now.
                    tracing::error!(?code, reason, "kafka consumer failed for good");
                    parts.shutdown.fire();
                    lock(&pipeline).abandoned = true;
                    return Err(ConsumeError::Fatal(reason));
                }
                tracing::warn!(error = %e, "kafka consumer error");
            }
        }
        {
            let mut p = lock(&pipeline);
            // Commit a finished insert at once; start the next one when its batch is due.
            let mut failed = false;
            while p.oldest_finished() {
                if !p.finish_in_flight(&consumer) {
                    failed = true;
                    break;
                }
            }
            if failed {
                break;
            }
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
    // Shutdown: the batch in hand is written and committed, and so is every batch still being
    // inserted — unless ClickHouse fails now, then nothing more is committed and the frames are
    // read again by whoever takes the partitions.
    let mut p = lock(&pipeline);
    if !p.abandoned && !p.drain(&consumer) {
        p.abandoned = true;
    }
    // The reason the consumer stopped first: a frame that needs a registry it cannot have.
    if let Some(e) = p.refused.take() {
        return Err(ConsumeError::Backend(e));
    }
    if p.abandoned {
        return Err(ConsumeError::Abandoned {
            frames: p.frames_abandoned + p.frames.len(),
        });
    }
    drop(p);
    consumer.unsubscribe();
    Ok(ConsumeSummary {
        rows: parts.metrics.rows_written.get(),
        dead_lettered: parts.metrics.dead_lettered.get(),
        dropped_erased: parts.metrics.dropped_erased.get(),
        dropped_closed: parts.metrics.dropped_closed.get(),
    })
}

/// The frames of a batch whose session may still be written, asked of Postgres just before the
/// insert ([`crate::checks::writable_sessions`]); retried with backoff while Postgres fails, as an
/// insert is while ClickHouse fails. `None` when `give_up` says so.
async fn writable_frames(
    pool: &PgPool,
    mut frames: Vec<SensorFrame>,
    metrics: &ConsumerMetrics,
    give_up: impl Fn() -> bool,
) -> Option<Vec<SensorFrame>> {
    let asked = crate::checks::sessions_of(&frames);
    let writable = crate::retry::with_backoff(
        || crate::checks::writable_sessions(pool, &asked),
        give_up,
        |e, attempt| {
            tracing::warn!(error = %e, attempt, "cannot ask postgres which sessions may be written; holding the batch and retrying");
        },
    )
    .await?;
    let dropped = crate::checks::retain_writable(&mut frames, &writable);
    if dropped > 0 {
        metrics.dropped_closed.inc_by(dropped as u64);
        tracing::info!(
            frames = dropped,
            "dropped frames of sessions no longer open or completed"
        );
    }
    Some(frames)
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
