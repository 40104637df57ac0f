//! The live member (`biofeed live`, or the live part of `biofeed up`): a consumer group on the
//! points topic that keeps every assigned session's windows and feeds their metrics back.
//!
//! Rebuilding: no offset is ever committed. Each assignment (start, restart, rebalance) seeks
//! every partition to the first message at "now minus the lookback" (the longest window plus a
//! minute) and notes the partition's end; the gates of [`crate::windows`] then keep every feed
//! whole (nothing until the member has read up to that end; no window reaching back before what
//! the re-read holds). A member restarted under its static instance id gets its partitions back
//! at once; one that died for good loses them to the others after
//! `BIOFEED_LIVE_SESSION_TIMEOUT`.
//!
//! Memory: one window per session and data type, the longest of its metrics window and plot span
//! of samples (an RR window of 60 s: about 70 samples, ~1.6 KiB with the ring's spare capacity;
//! 8-channel 256 Hz EEG over a 10 s plot span: 2,560 samples, ~160 KiB);
//! `biofeed_live_window_bytes` shows the sum.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use biofeed_backends::shutdown::Shutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;

use crate::windows::Windows;
use crate::{now_us, LiveError, LiveOptions, LiveSettings};

/// The live member's metrics.
#[derive(Debug, Clone, Default)]
pub struct LiveMetrics {
    /// Windows held (sessions × data types).
    pub windows: Gauge,
    /// Bytes the windows' samples take, roughly.
    pub window_bytes: Gauge,
    /// Feeds written to the live topic.
    pub feeds: Counter,
    /// Feeds the producer could not queue (dropped: the next one follows within the interval).
    pub feeds_dropped: Counter,
    /// Points messages that could not be decoded (the consumers dead-letter them).
    pub undecodable: Counter,
    /// Partitions still being re-read after an assignment.
    pub rebuilding_partitions: Gauge,
}

impl LiveMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("biofeed_live");
        r.register(
            "windows",
            "Windows held (sessions times data types)",
            m.windows.clone(),
        );
        r.register(
            "window_bytes",
            "Bytes the windows' samples take, roughly",
            m.window_bytes.clone(),
        );
        r.register("feeds", "Feeds written to the live topic", m.feeds.clone());
        r.register(
            "feeds_dropped",
            "Feeds the producer could not queue",
            m.feeds_dropped.clone(),
        );
        r.register(
            "undecodable",
            "Points messages that could not be decoded",
            m.undecodable.clone(),
        );
        r.register(
            "rebuilding_partitions",
            "Partitions being re-read after an assignment",
            m.rebuilding_partitions.clone(),
        );
        m
    }
}

/// A device clock may run this far ahead of the gateway's (which refuses more than its
/// `BIOFEED_GATEWAY_MAX_CLOCK_SKEW`, 5 s by default): a sample this much after the lookback's
/// start was received after it, so the re-read holds it.
const CLOCK_MARGIN_US: i64 = 30_000_000;

/// How long an assignment's offset look-ups may take (each of the two).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The consumer's context: seeks every assigned partition back by the lookback.
struct Rebuild {
    state: Arc<Mutex<Windows>>,
    /// A consumer outside the group, for offset look-ups (not the group member itself, whose
    /// rebalance callback this runs in).
    lookup: BaseConsumer,
    lookback: Duration,
}

impl ClientContext for Rebuild {}

impl Rebuild {
    /// The offsets of `partitions` at the time `at_ms` (ms since the epoch), by partition
    /// (`Offset::End`: no message since); `None` for a partition whose look-up failed (logged).
    fn offsets_at(&self, partitions: &[(String, i32)], at_ms: i64) -> HashMap<i32, Option<Offset>> {
        let mut query = TopicPartitionList::new();
        for (topic, partition) in partitions {
            let _ = query.add_partition_offset(topic, *partition, Offset::Offset(at_ms));
        }
        let found = self.lookup.offsets_for_times(query, LOOKUP_TIMEOUT);
        match found {
            Ok(found) => found
                .elements()
                .iter()
                .map(|e| {
                    let offset = match e.error() {
                        Ok(()) => Some(e.offset()),
                        Err(error) => {
                            tracing::warn!(%error, partition = e.partition(), "cannot look up an offset of an assigned partition; its sessions are fed again once a whole window of new samples arrived");
                            None
                        }
                    };
                    (e.partition(), offset)
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot look up the assigned partitions' offsets; their sessions are fed again once a whole window of new samples arrived");
                partitions.iter().map(|(_, p)| (*p, None)).collect()
            }
        }
    }
}

impl ConsumerContext for Rebuild {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let assigned: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                // First every partition's end, then the lookback's start: a message produced in
                // between is after the end, and read.
                let ends: HashMap<i32, Option<Offset>> = assigned
                    .iter()
                    .map(|(topic, partition)| {
                        let end = self
                            .lookup
                            .fetch_watermarks(topic, *partition, LOOKUP_TIMEOUT)
                            .map_err(|error| tracing::warn!(%error, partition, "cannot read the end of an assigned partition; its sessions are fed again once a whole window of new samples arrived"))
                            .ok()
                            .map(|(_, high)| Offset::Offset(high));
                        (*partition, end)
                    })
                    .collect();
                // After every end was read: a message received before then and not re-read has
                // samples at most a clock margin after it.
                let ends_read_at = now_us();
                let since_us = now_us() - self.lookback.as_micros() as i64;
                let starts = self.offsets_at(&assigned, since_us / 1000);
                let mut state = lock(&self.state);
                for (topic, partition) in assigned {
                    let end = ends.get(&partition).copied().flatten();
                    let start = starts.get(&partition).copied().flatten();
                    let (seek, rebuilding, complete_from) = match (end, start) {
                        (Some(Offset::Offset(end)), Some(Offset::Offset(from))) if from < end => {
                            tracing::info!(
                                partition,
                                from,
                                end,
                                "rebuilding the windows of an assigned partition"
                            );
                            (Offset::Offset(from), Some(end), since_us + CLOCK_MARGIN_US)
                        }
                        // Messages since the lookback's start all came after the end was read.
                        (_, Some(Offset::Offset(from))) => {
                            (Offset::Offset(from), None, since_us + CLOCK_MARGIN_US)
                        }
                        // Nothing since the lookback's start when it was looked up.
                        (Some(Offset::Offset(end)), Some(Offset::End)) => {
                            (Offset::Offset(end), None, since_us + CLOCK_MARGIN_US)
                        }
                        // The start unknown: from the end, fed once a whole window came after it.
                        (Some(Offset::Offset(end)), _) => {
                            (Offset::Offset(end), None, ends_read_at + CLOCK_MARGIN_US)
                        }
                        // Nothing known: from wherever the end is when fetching starts, fed once a
                        // whole window came after that (with a minute's slack for the start).
                        _ => (Offset::End, None, now_us() + 60_000_000 + CLOCK_MARGIN_US),
                    };
                    state.assigned(partition, rebuilding, complete_from);
                    let _ = tpl.set_partition_offset(&topic, partition, seek);
                }
                drop(state);
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "cannot take the assigned partitions");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut state = lock(&self.state);
                for e in tpl.elements() {
                    state.revoked(e.partition());
                }
                drop(state);
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "cannot give the revoked partitions back");
                }
            }
            other => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::error!(error = ?other, ?partitions, "kafka rebalance failed");
            }
        }
    }
}

/// A live member connected to its services, ready to run.
pub struct PreparedMember {
    options: LiveOptions,
    consumer: ClientConfig,
    lookup: ClientConfig,
    producer: ThreadedProducer<DefaultProducerContext>,
    points_topic: String,
    live_topic: String,
    pool: PgPool,
    shapes: HashMap<String, (u16, f64)>,
    writers: biofeed_backends::registry::WriterSchemas,
    metrics: LiveMetrics,
}

/// Connects to Postgres and Kafka (failing fast, naming the setting), reads the data types and
/// registers the member's metrics in `registry`.
pub async fn prepare(
    settings: LiveSettings,
    registry: &mut Registry,
    role: &str,
) -> Result<PreparedMember, LiveError> {
    let pool = settings.postgres.connect().await?;
    settings.kafka.connect_admin().await?;
    let shapes = load_shapes(&pool).await?;
    let writers = biofeed_backends::registry::WriterSchemas::load(
        biofeed_backends::registry::Registry::new(&settings.registry)?,
        &format!("{}-value", settings.topics.points),
    )
    .await?;
    let base = settings.kafka.client_config()?;
    let instance_id = settings
        .options
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("{}-{role}", biofeed_backends::host_name("biofeed")));
    tracing::info!(instance_id, group = settings.options.group, "live member");
    let mut consumer = base.clone();
    consumer
        .set("client.id", "biofeed-live")
        .set("group.id", &settings.options.group)
        .set("group.instance.id", &instance_id)
        .set(
            "session.timeout.ms",
            settings.options.session_timeout.as_millis().to_string(),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "10");
    let mut lookup = base.clone();
    lookup
        .set("client.id", "biofeed-live-lookup")
        .set("group.id", format!("{}-lookup", settings.options.group))
        .set("enable.auto.commit", "false");
    let producer: ThreadedProducer<DefaultProducerContext> = base
        .clone()
        .set("client.id", "biofeed-live")
        // A feed is superseded within the interval: low latency over durability.
        .set("acks", "1")
        .set("enable.idempotence", "false")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "10000")
        .set("compression.type", "lz4")
        .create()?;
    Ok(PreparedMember {
        options: settings.options,
        consumer,
        lookup,
        producer,
        points_topic: settings.topics.points,
        live_topic: settings.topics.live,
        pool,
        shapes,
        writers,
        metrics: LiveMetrics::register(registry),
    })
}

async fn load_shapes(pool: &PgPool) -> Result<HashMap<String, (u16, f64)>, sqlx::Error> {
    let rows: Vec<(String, i16, Option<f32>)> =
        sqlx::query_as("SELECT name, channels, sample_rate_hz FROM data_types")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(name, channels, rate)| {
            (
                name,
                (channels.max(1) as u16, f64::from(rate.unwrap_or(1.0))),
            )
        })
        .collect())
}

impl PreparedMember {
    /// The member's metrics.
    pub fn metrics(&self) -> &LiveMetrics {
        &self.metrics
    }

    /// Runs until `shutdown` fires.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), LiveError> {
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || self.run_loop(&rt, &shutdown))
            .await
            .map_err(|e| LiveError::Panicked(e.to_string()))?
    }

    fn run_loop(
        mut self,
        rt: &tokio::runtime::Handle,
        shutdown: &Shutdown,
    ) -> Result<(), LiveError> {
        let state = Arc::new(Mutex::new(Windows::new(self.options.clone())));
        let consumer: BaseConsumer<Rebuild> = self.consumer.create_with_context(Rebuild {
            state: Arc::clone(&state),
            lookup: self.lookup.create()?,
            lookback: self.options.lookback(),
        })?;
        consumer.subscribe(&[&self.points_topic])?;
        tracing::info!(topic = self.points_topic, "feeding back live metrics");
        // A window is kept at least as long as it spans.
        let idle = self.options.idle.max(self.options.lookback());
        let mut last_sweep = Instant::now();
        let mut last_shapes = Instant::now();
        while !shutdown.is_fired() {
            // What has arrived (up to a bound), then the feeds that are due.
            let mut wait = Duration::from_millis(20);
            for _ in 0..1000 {
                match consumer.poll(wait) {
                    None => break,
                    Some(Ok(message)) => self.take(rt, &state, &message),
                    Some(Err(e)) => {
                        if let Some((code, reason)) = consumer.client().fatal_error() {
                            tracing::error!(?code, reason, "kafka consumer failed for good");
                            return Err(LiveError::Fatal(reason));
                        }
                        tracing::warn!(error = %e, "kafka consumer error");
                    }
                }
                wait = Duration::ZERO;
            }
            let feeds = lock(&state).due(Instant::now(), now_us());
            for feed in feeds {
                self.send(&feed);
            }
            if last_sweep.elapsed() >= Duration::from_secs(1) {
                last_sweep = Instant::now();
                let mut s = lock(&state);
                let (windows, bytes) = s.evict_idle(Instant::now(), idle);
                self.metrics.windows.set(windows as i64);
                self.metrics.window_bytes.set(bytes as i64);
                self.metrics
                    .rebuilding_partitions
                    .set(s.rebuilding() as i64);
            }
            if last_shapes.elapsed() >= Duration::from_secs(60) {
                last_shapes = Instant::now();
                match rt.block_on(load_shapes(&self.pool)) {
                    Ok(shapes) => self.shapes = shapes,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot re-read the data types; keeping the old ones")
                    }
                }
            }
        }
        consumer.unsubscribe();
        let _ = self.producer.flush(Duration::from_secs(5));
        Ok(())
    }

    /// Adds a points message's samples to its window.
    fn take(
        &mut self,
        rt: &tokio::runtime::Handle,
        state: &Mutex<Windows>,
        message: &rdkafka::message::BorrowedMessage<'_>,
    ) {
        // Every message counts towards the end of a partition's re-read, whatever it holds.
        lock(state).seen(message.partition(), message.offset());
        let payload = message.payload().unwrap_or_default();
        // A schema id seen for the first time is asked of the registry once; live feedback
        // does not wait for a registry that is away (the consumers, which store, do).
        if let Some(id) = self.writers.unknown_id(payload) {
            if let Err(e) = rt.block_on(self.writers.learn(id)) {
                tracing::warn!(error = %e, schema_id = id, "cannot ask the schema registry for a frame's schema");
            }
        }
        let frame = match biofeed_schema::decode_framed(self.writers.ids(), payload) {
            Ok(frame) => frame,
            Err(_) => {
                self.metrics.undecodable.inc();
                return;
            }
        };
        let Some(&(_, rate_hz)) = self.shapes.get(frame.data_type.as_str()) else {
            return;
        };
        lock(state).take(
            message.partition(),
            message.offset(),
            &frame,
            rate_hz,
            Instant::now(),
        );
    }

    /// Writes a feed to the live topic (dropped when the producer's queue is full: the next one
    /// follows within the interval).
    fn send(&self, feed: &crate::feed::Feed) {
        let Ok(json) = serde_json::to_vec(feed) else {
            return;
        };
        let key = feed.key();
        match self
            .producer
            .send(BaseRecord::to(&self.live_topic).key(&key).payload(&json))
        {
            Ok(()) => {
                self.metrics.feeds.inc();
            }
            Err((e, _)) => {
                self.metrics.feeds_dropped.inc();
                tracing::warn!(error = %e, "cannot queue a live feed");
            }
        }
    }
}

fn lock(state: &Mutex<Windows>) -> MutexGuard<'_, Windows> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
