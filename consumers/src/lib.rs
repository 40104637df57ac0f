//! Kafka to ClickHouse: the writer that turns frames into `points` rows.
//!
//! Data path: `biofeed.points.v1` → [`consume`] (a consumer group; each message judged by
//! [`checks`]: decoded, well shaped, known data type, values in range, user not erased) → a
//! batch bounded by rows, bytes and age → [`sink`] (one RowBinary INSERT through the `clickhouse`
//! crate, retried with backoff while ClickHouse fails) → offsets committed. Messages failing the
//! checks go to `biofeed.points.dlq` ([`dead_letters`]) before their offset is committed; frames of
//! erased users are dropped and counted. [`replay`] re-reads a time range or the dead letters.
//!
//! Owns the consumption of the points topic, the dead-letter topic's contents and the rows of
//! ClickHouse's `points` table (its SQL lives in `migrations/clickhouse`).
//!
//! Architecture invariants: the only crate that consumes Kafka; commits an offset only after
//! ClickHouse acknowledged the rows (or Kafka the dead letter) of every message before it; writes
//! a frame only if Postgres, asked just before the insert, holds its session as open or completed
//! and its person as not erased; reads Postgres (data types, erasure list, session status) but
//! never writes it; does not depend on `biofeed-migrations`; never speaks HTTP.

pub mod checks;
pub mod consume;
pub mod dead_letters;
pub mod metrics;
pub mod replay;
mod retry;
pub mod rows;
pub mod sink;

use std::time::Duration;

use biofeed_backends::shutdown::Shutdown;
use biofeed_backends::{parse_duration, BackendError, StoreSettings};
use prometheus_client::registry::Registry;

pub use consume::ConsumeSummary;
pub use replay::ReplaySummary;

use crate::checks::Checks;
use crate::dead_letters::DeadLetters;
use crate::metrics::ConsumerMetrics;
use crate::sink::PointsSink;

/// A consume or replay run failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// A backing service was unreachable at start.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(rdkafka::error::KafkaError),
    /// ClickHouse failed (replay gives up; consume retries instead).
    #[error("clickhouse: {0}")]
    ClickHouse(clickhouse::error::Error),
    /// Postgres failed while reading data types, the erasure list or sessions' status.
    #[error("postgres: {0}")]
    Postgres(sqlx::Error),
    /// The topic or partition to replay does not exist.
    #[error("kafka: {0}")]
    NoSuchPartition(String),
    /// Messages deleted by retention mid-range left a gap the replay waited for in vain.
    #[error("kafka: no messages for {} s before the end of the range", .0.as_secs())]
    Gap(std::time::Duration),
    /// The consume or replay thread panicked.
    #[error("kafka: the {0} thread failed: {1}")]
    Panicked(&'static str, String),
    /// Kafka failed for good (e.g. another member took this one's `group.instance.id`).
    #[error("kafka failed for good: {0}; if another consumer uses the same instance id, give each its own BIOFEED_CONSUMER_INSTANCE_ID")]
    Fatal(String),
    /// Shutdown came while ClickHouse was failing: the batch was not written and its offsets not
    /// committed; the frames will be read again.
    #[error("stopped while clickhouse was failing: {frames} frames not written; their offsets were not committed, so they will be read again")]
    Abandoned {
        /// Frames not written.
        frames: usize,
    },
}

// Written out rather than `#[from]`: the message already holds the cause, which would otherwise
// be printed twice by a `{:#}` chain.
impl From<rdkafka::error::KafkaError> for ConsumeError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        ConsumeError::Kafka(e)
    }
}

impl From<clickhouse::error::Error> for ConsumeError {
    fn from(e: clickhouse::error::Error) -> Self {
        ConsumeError::ClickHouse(e)
    }
}

impl From<sqlx::Error> for ConsumeError {
    fn from(e: sqlx::Error) -> Self {
        ConsumeError::Postgres(e)
    }
}

impl ConsumeError {
    /// Whether trying again later can help: a backend failing can recover, and a replay that
    /// waited in vain for messages (a broker away, or a gap retention left) is safe to repeat; a
    /// missing partition, a fenced instance id or a panic need an operator first.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ConsumeError::Backend(_)
                | ConsumeError::Kafka(_)
                | ConsumeError::ClickHouse(_)
                | ConsumeError::Postgres(_)
                | ConsumeError::Gap(_)
                | ConsumeError::Abandoned { .. }
        )
    }
}

/// When a batch is written.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BatchLimits {
    /// Write the batch when it holds this many rows (points). Half a million rows or half a
    /// second: on two cores with every service beside it, device-to-queryable p99 stays under a
    /// second up to ~0.58 M points/s and is ~2 s at 1 M (docs/bench-e2e.md); smaller batches
    /// make more parts to merge and store less, larger ones wait longer.
    #[arg(
        long = "batch-max-rows",
        id = "batch_max_rows",
        value_name = "N",
        env = "BIOFEED_BATCH_MAX_ROWS",
        default_value_t = 500_000
    )]
    pub max_rows: usize,
    /// Write the batch when its frames take this many bytes (bounds memory).
    #[arg(long = "batch-max-bytes", id = "batch_max_bytes", value_name = "BYTES", env = "BIOFEED_BATCH_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_bytes: usize,
    /// Batches being inserted at once (their offsets are still committed in order).
    #[arg(long = "inserts-in-flight", id = "inserts_in_flight", value_name = "N", env = "BIOFEED_INSERTS_IN_FLIGHT", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub inserts_in_flight: u16,
    /// Write the batch when its oldest frame has waited this long.
    #[arg(long = "batch-max-age", id = "batch_max_age", value_name = "DURATION", env = "BIOFEED_BATCH_MAX_AGE", default_value = "500ms", value_parser = parse_duration)]
    pub max_age: Duration,
}

/// The consumer's own settings (without where the services are), shared by `biofeed consume`
/// and `biofeed up`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerOptions {
    /// Consumer group: consumers with the same group share the partitions.
    #[arg(
        long = "group",
        id = "consumer_group",
        value_name = "NAME",
        env = "BIOFEED_CONSUMER_GROUP",
        default_value = "biofeed-consumers"
    )]
    pub group: String,
    /// This member's static identity in the group (Kafka's `group.instance.id`): a member that
    /// restarts under the same id — after a crash or `kill -9` too — takes its partitions back at
    /// once, without waiting for the group to notice the old one died. Give every consumer of a
    /// group its own (a second member with the same id fences the first, which then stops with an
    /// error). Default: this host's name, which suits one consumer per host or container.
    #[arg(
        long = "instance-id",
        id = "consumer_instance_id",
        value_name = "ID",
        env = "BIOFEED_CONSUMER_INSTANCE_ID"
    )]
    pub instance_id: Option<String>,
    /// How long the group waits for a member that stopped heartbeating (crashed, or stopped and
    /// not restarted) before giving its partitions to the others. A static member that restarts
    /// within it takes them back at once.
    #[arg(long = "session-timeout", id = "consumer_session_timeout", value_name = "DURATION", env = "BIOFEED_CONSUMER_SESSION_TIMEOUT", default_value = "45s", value_parser = parse_duration)]
    pub session_timeout: Duration,
    /// How often the data types and the erasure list are re-read from Postgres.
    #[arg(long = "refresh", id = "consumer_refresh", value_name = "DURATION", env = "BIOFEED_CONSUMER_REFRESH", default_value = "10s", value_parser = parse_duration)]
    pub refresh: Duration,
    /// Batching.
    #[command(flatten)]
    pub batch: BatchLimits,
}

/// Settings of `biofeed consume`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumeSettings {
    /// The consumer's own settings.
    #[command(flatten)]
    pub options: ConsumerOptions,
    /// Where the services are, and the topics' names.
    #[command(flatten)]
    pub stores: StoreSettings,
}

/// Settings of `biofeed replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplaySettings {
    /// Replay messages from this time on (RFC 3339, e.g. 2026-11-24T08:00:00Z); default: the
    /// oldest retained.
    #[arg(long, value_name = "TIME", value_parser = replay::parse_time)]
    pub from: Option<i64>,
    /// Replay messages before this time (RFC 3339); default: up to the end at start.
    #[arg(long, value_name = "TIME", value_parser = replay::parse_time)]
    pub to: Option<i64>,
    /// Only this partition.
    #[arg(long, value_name = "N")]
    pub partition: Option<i32>,
    /// Re-drive the dead-letter topic instead of the points topic (after fixing what made the
    /// frames fail).
    #[arg(long)]
    pub dlq: bool,
    /// Batching.
    #[command(flatten)]
    pub batch: BatchLimits,
    /// Where the services are, and the topics' names.
    #[command(flatten)]
    pub stores: StoreSettings,
}

/// A consumer connected to its services with its metrics registered, ready to run.
pub struct PreparedConsumer {
    parts: consume::LoopParts,
    config: rdkafka::ClientConfig,
    topic: String,
}

/// Connects to Postgres, ClickHouse and Kafka (failing fast, naming the setting) and registers
/// the consumer's metrics in `registry`.
pub async fn prepare(
    settings: ConsumeSettings,
    registry: &mut Registry,
) -> Result<PreparedConsumer, ConsumeError> {
    let pool = settings.stores.postgres.connect().await?;
    let ch = settings.stores.clickhouse.connect().await?;
    settings.stores.kafka.connect_admin().await?;
    let writers = writer_schemas(&settings.stores).await?;
    let parts = consume::LoopParts {
        rt: tokio::runtime::Handle::current(),
        sink: PointsSink::connect(&ch, "points").await?,
        dead: DeadLetters::new(&settings.stores.kafka, &settings.stores.topics.dlq)?,
        pool,
        metrics: ConsumerMetrics::register(registry),
        limits: settings.options.batch,
        refresh: settings.options.refresh,
        shutdown: Shutdown::new(),
        writers,
    };
    let mut config = settings.stores.kafka.client_config()?;
    let instance_id = settings
        .options
        .instance_id
        .clone()
        .unwrap_or_else(|| biofeed_backends::host_name("biofeed-consumer"));
    tracing::info!(instance_id, "static group member");
    config
        .set("client.id", "biofeed-consumer")
        .set("group.id", &settings.options.group)
        .set("group.instance.id", &instance_id)
        .set(
            "session.timeout.ms",
            settings.options.session_timeout.as_millis().to_string(),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("max.poll.interval.ms", "600000")
        .set("queued.max.messages.kbytes", "65536")
        .set("fetch.max.bytes", "52428800")
        // Let the broker gather up to 1 MiB or 50 ms per fetch rather than answer each message
        // alone: far fewer fetch requests at high rates, at most 50 ms more latency at low ones.
        .set("fetch.min.bytes", "1048576")
        .set("fetch.wait.max.ms", "50");
    Ok(PreparedConsumer {
        parts,
        config,
        topic: settings.stores.topics.points.clone(),
    })
}

impl PreparedConsumer {
    /// The consumer's metrics (shared with the registry it was prepared with).
    pub fn metrics(&self) -> &ConsumerMetrics {
        &self.parts.metrics
    }

    /// Consumes until `shutdown` fires, then writes and commits what it holds.
    pub async fn run(mut self, shutdown: Shutdown) -> Result<ConsumeSummary, ConsumeError> {
        self.parts.shutdown = shutdown;
        let (parts, config, topic) = (self.parts, self.config, self.topic);
        tokio::task::spawn_blocking(move || consume::consume_loop(parts, config, &topic))
            .await
            .map_err(|e| ConsumeError::Panicked("consume", e.to_string()))?
    }
}

/// The schema ids of the points topic's subject that the registry holds for the versions this
/// build knows (none without a registry); a registry that cannot be asked stops the start.
async fn writer_schemas(
    stores: &StoreSettings,
) -> Result<biofeed_backends::registry::WriterSchemas, ConsumeError> {
    let registry = biofeed_backends::registry::Registry::new(&stores.registry)?;
    Ok(biofeed_backends::registry::WriterSchemas::load(
        registry,
        &format!("{}-value", stores.topics.points),
    )
    .await?)
}

/// Replays, reporting progress as (messages read, messages in range).
pub async fn replay(
    settings: ReplaySettings,
    progress: impl Fn(u64, u64) + Send + 'static,
) -> Result<ReplaySummary, ConsumeError> {
    let pool = settings.stores.postgres.connect().await?;
    let ch = settings.stores.clickhouse.connect().await?;
    settings.stores.kafka.connect_admin().await?;
    let writers = writer_schemas(&settings.stores).await?;
    let checks = Checks::load(&pool).await?;
    let sink = PointsSink::connect(&ch, "points").await?;
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        replay::replay_blocking(rt, &settings, sink, checks, writers, pool, &progress)
    })
    .await
    .map_err(|e| ConsumeError::Panicked("replay", e.to_string()))?
}
