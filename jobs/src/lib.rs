//! The job runner: rollups, session metrics, purge of failed sessions, erasure in ClickHouse,
//! the analyst sync, and failed jobs.
//!
//! Owns the Postgres tables `job_schedule`, `job_runs`, `session_computations` and `failed_jobs`,
//! the purge columns of `sessions`, `erased_users.clickhouse_deleted_at`, and the ClickHouse
//! tables `rollups_1s`, `rollups_1m`, `session_metrics` and `session_facts`.
//!
//! Architecture invariants: a runner claims a job with `FOR UPDATE SKIP LOCKED` and holds a
//! lease while it runs — stopping the job if it cannot renew the lease — and every run is a
//! unique `(job, instance)` row, so any number of runners can run side by side and never run the
//! same instance at once; every job is idempotent (computed from `points FINAL`, deletes
//! verified), so a retry, a re-run or stopping it anywhere is always safe; a job's panic is a
//! failure of that run, never of the runner.
//! Purge and erasure delete only after the consumer group's committed offsets passed the points
//! topic's end as it was after the sessions closed or the people were erased
//! ([`consumer_progress`]), so no row of theirs lands after the deletion.
//! Never speaks HTTP and never consumes Kafka (it reads the consumer group's offsets only).

pub mod consumer_progress;
pub mod jobs;
pub mod metrics;
pub mod runner;
/// The metrics' arithmetic lives in `biofeed-signals`, shared with the live feed.
pub use biofeed_signals as signals;

use std::time::Duration;

use biofeed_backends::clickhouse::ClickHouseSettings;
use biofeed_backends::kafka::{KafkaSettings, TopicNames};
use biofeed_backends::postgres::PostgresSettings;
use biofeed_backends::{parse_duration, StoreSettings};

pub use crate::jobs::Job;
pub use crate::runner::{failed_jobs, retry, run_once, run_runner, FailedJob, RunnerError};

/// The runner's own settings (without where the services are), shared by `biofeed jobs` and
/// `biofeed up`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsOptions {
    /// Jobs run at once by this runner.
    #[arg(long = "jobs-concurrency", id = "jobs_concurrency", value_name = "N", env = "BIOFEED_JOBS_CONCURRENCY",
          default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,

    /// How long a claimed job is leased; renewed every third of it while it runs, taken over by
    /// another runner if this one dies. A runner that finds its lease taken over, or cannot renew
    /// it for this long, stops the job.
    #[arg(long = "jobs-lease", id = "jobs_lease", value_name = "DURATION", env = "BIOFEED_JOBS_LEASE",
          default_value = "60s", value_parser = parse_duration)]
    pub lease: Duration,

    /// Attempts (the first run and its automatic retries) before a failed job waits for
    /// `biofeed jobs retry`.
    #[arg(long = "jobs-max-attempts", id = "jobs_max_attempts", value_name = "N", env = "BIOFEED_JOBS_MAX_ATTEMPTS",
          default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,

    /// First retry delay; doubled for each further attempt (at most 30 minutes).
    #[arg(long = "jobs-retry-backoff", id = "jobs_retry_backoff", value_name = "DURATION", env = "BIOFEED_JOBS_RETRY_BACKOFF",
          default_value = "10s", value_parser = parse_duration)]
    pub retry_backoff: Duration,

    /// How long after a session ended before its rollups, metrics or purge run, so that points
    /// still in flight (Kafka, consumer batches) have landed.
    #[arg(long = "jobs-settle", id = "jobs_settle", value_name = "DURATION", env = "BIOFEED_JOBS_SETTLE",
          default_value = "30s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Interval of the rollups job.
    #[arg(long = "rollups-interval", id = "rollups_interval", value_name = "DURATION", env = "BIOFEED_JOBS_ROLLUPS_INTERVAL",
          default_value = "30s", value_parser = parse_duration)]
    pub rollups_interval: Duration,

    /// Interval of the session-metrics job.
    #[arg(long = "metrics-interval", id = "metrics_interval", value_name = "DURATION", env = "BIOFEED_JOBS_METRICS_INTERVAL",
          default_value = "30s", value_parser = parse_duration)]
    pub metrics_interval: Duration,

    /// Interval of the purge job (aborted sessions, and open ones past their deadline).
    #[arg(long = "purge-interval", id = "purge_interval", value_name = "DURATION", env = "BIOFEED_JOBS_PURGE_INTERVAL",
          default_value = "1m", value_parser = parse_duration)]
    pub purge_interval: Duration,

    /// Interval of the erasure job (erased users' rows in ClickHouse).
    #[arg(long = "erasure-interval", id = "erasure_interval", value_name = "DURATION", env = "BIOFEED_JOBS_ERASURE_INTERVAL",
          default_value = "1m", value_parser = parse_duration)]
    pub erasure_interval: Duration,

    /// Interval of the analyst sync (session facts to ClickHouse).
    #[arg(long = "sync-interval", id = "sync_interval", value_name = "DURATION", env = "BIOFEED_JOBS_SYNC_INTERVAL",
          default_value = "10s", value_parser = parse_duration)]
    pub sync_interval: Duration,

    /// How long purge and erasure wait for the consumers to write everything the points topic
    /// held when they started (so that no row of a purged session or erased person can land
    /// after the deletion) before failing and being retried later.
    #[arg(long = "consumer-wait", id = "jobs_consumer_wait", value_name = "DURATION", env = "BIOFEED_JOBS_CONSUMER_WAIT",
          default_value = "30s", value_parser = parse_duration)]
    pub consumer_wait: Duration,

    /// How long to wait for a ClickHouse deletion (mutation) to finish before failing the job.
    #[arg(long = "mutation-timeout", id = "mutation_timeout", value_name = "DURATION", env = "BIOFEED_JOBS_MUTATION_TIMEOUT",
          default_value = "5m", value_parser = parse_duration)]
    pub mutation_timeout: Duration,
}

/// Settings of `biofeed jobs`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsSettings {
    /// The runner's own settings.
    #[command(flatten)]
    pub options: JobsOptions,

    /// Where Postgres is.
    #[command(flatten, next_help_heading = "Postgres")]
    pub postgres: PostgresSettings,

    /// Where ClickHouse is.
    #[command(flatten, next_help_heading = "ClickHouse")]
    pub clickhouse: ClickHouseSettings,

    /// Where Kafka is: purge and erasure read the consumer group's progress.
    #[command(flatten, next_help_heading = "Kafka")]
    pub kafka: KafkaSettings,

    /// The points topic's name.
    #[command(flatten, next_help_heading = "Kafka")]
    pub topics: TopicNames,

    /// The consumers' group, whose committed offsets purge and erasure wait for.
    #[arg(
        long = "consumer-group",
        id = "jobs_consumer_group",
        value_name = "NAME",
        env = "BIOFEED_CONSUMER_GROUP",
        default_value = "biofeed-consumers",
        help_heading = "Kafka"
    )]
    pub consumer_group: String,
}

impl JobsSettings {
    /// A runner's settings beside the other parts of one process (`biofeed up`): the same
    /// stores, and the consumer group whose progress purge and erasure wait for.
    pub fn beside(options: JobsOptions, stores: &StoreSettings, consumer_group: &str) -> Self {
        Self {
            options,
            postgres: stores.postgres.clone(),
            clickhouse: stores.clickhouse.clone(),
            kafka: stores.kafka.clone(),
            topics: stores.topics.clone(),
            consumer_group: consumer_group.to_owned(),
        }
    }
}

impl JobsOptions {
    /// The interval of a job.
    pub fn interval(&self, job: Job) -> Duration {
        match job {
            Job::Rollups => self.rollups_interval,
            Job::SessionMetrics => self.metrics_interval,
            Job::Purge => self.purge_interval,
            Job::Erasure => self.erasure_interval,
            Job::AnalystSync => self.sync_interval,
        }
    }
}
