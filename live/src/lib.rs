//! Live feedback: the rolling metrics of an **open** session, fed back while the exercise runs.
//!
//! Data path: `biofeed.points.v1` → [`member`] (a consumer group of its own, `biofeed-live`:
//! the points topic is keyed by session, so one member holds a session's whole stream) keeps a
//! [`window::Window`] per session and data type in memory and, at most once per interval while
//! new samples arrive, computes the window's metrics with the session metrics' own arithmetic
//! (`biofeed-signals`) → `biofeed.live.v1` (JSON [`feed::Feed`], key `<session>/<data type>`,
//! kept minutes) → every gateway's [`hub::Hub`] (reads every partition from its end, no group)
//! → the viewers connected to that gateway (`GET /v1/sessions/{id}/live`, Server-Sent Events).
//!
//! A member commits no offsets: on every assignment — start, restart, rebalance — it seeks each
//! partition to the offset of "now minus the longest window (and a margin)" and reads up to the
//! partition's end as it was before it feeds anything back, so a rebuilt window is whole and
//! never yields a metric over part of it.
//!
//! Architecture invariant: reads the points topic, writes only the live topic, reads only the
//! data types from Postgres; no ClickHouse, no HTTP, nothing personal (a feed names a session).

pub mod feed;
pub mod hub;
pub mod member;
pub mod window;
pub mod windows;

use std::time::Duration;

use biofeed_backends::kafka::{KafkaSettings, TopicNames};
use biofeed_backends::parse_duration;
use biofeed_backends::postgres::PostgresSettings;
use biofeed_backends::BackendError;

/// The live member's own settings, shared by `biofeed live` and `biofeed up`.
#[derive(Debug, Clone, clap::Args)]
pub struct LiveOptions {
    /// Consumer group of the live members: members of one group share the points topic's
    /// partitions (and with them the sessions).
    #[arg(
        long = "live-group",
        id = "live_group",
        value_name = "NAME",
        env = "BIOFEED_LIVE_GROUP",
        default_value = "biofeed-live"
    )]
    pub group: String,
    /// This member's static identity in its group: a member restarted under the same id — after
    /// a crash or `kill -9` too — takes its partitions back at once. Give every member of a group
    /// its own (a second with the same id fences the first). Default: this host's name with
    /// `-live` (`biofeed live`) or `-up` (`biofeed up`).
    #[arg(
        long = "live-instance-id",
        id = "live_instance_id",
        value_name = "ID",
        env = "BIOFEED_LIVE_INSTANCE_ID"
    )]
    pub instance_id: Option<String>,
    /// How long the group waits for a member that stopped heartbeating before giving its
    /// sessions to another member (which rebuilds their windows from Kafka).
    #[arg(long = "live-session-timeout", id = "live_session_timeout", value_name = "DURATION", env = "BIOFEED_LIVE_SESSION_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub session_timeout: Duration,
    /// The metrics' window for every data type but EEG (e.g. HRV over the last minute).
    #[arg(long = "live-window", id = "live_window", value_name = "DURATION", env = "BIOFEED_LIVE_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub window: Duration,
    /// The EEG band powers' window (neurofeedback wants seconds, not a minute).
    #[arg(long = "live-eeg-window", id = "live_eeg_window", value_name = "DURATION", env = "BIOFEED_LIVE_EEG_WINDOW", default_value = "4s", value_parser = parse_duration)]
    pub eeg_window: Duration,
    /// At most one feed per session and data type per this interval (one as soon as new samples
    /// arrive after it).
    #[arg(long = "live-interval", id = "live_interval", value_name = "DURATION", env = "BIOFEED_LIVE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// How much of the newest samples a feed carries for a live plot.
    #[arg(long = "live-plot-span", id = "live_plot_span", value_name = "DURATION", env = "BIOFEED_LIVE_PLOT_SPAN", default_value = "10s", value_parser = parse_duration)]
    pub plot_span: Duration,
    /// At most this many plot points per feed (bucket means beyond).
    #[arg(long = "live-plot-points", id = "live_plot_points", value_name = "N", env = "BIOFEED_LIVE_PLOT_POINTS", default_value_t = 300, value_parser = clap::value_parser!(u32).range(2..=5000))]
    pub plot_points: u32,
    /// A session's window is forgotten after this long without a new sample (at least the
    /// longest window plus a minute).
    #[arg(long = "live-idle", id = "live_idle", value_name = "DURATION", env = "BIOFEED_LIVE_IDLE", default_value = "2min", value_parser = parse_duration)]
    pub idle: Duration,
}

impl LiveOptions {
    /// The longest window a member must rebuild after an assignment.
    pub fn lookback(&self) -> Duration {
        self.window.max(self.eeg_window).max(self.plot_span) + Duration::from_secs(60)
    }
}

/// Settings of `biofeed live`.
#[derive(Debug, Clone, clap::Args)]
pub struct LiveSettings {
    /// The member's own settings.
    #[command(flatten)]
    pub options: LiveOptions,
    /// Where Postgres is (the data types' rates).
    #[command(flatten, next_help_heading = "Postgres")]
    pub postgres: PostgresSettings,
    /// Where Kafka is.
    #[command(flatten, next_help_heading = "Kafka")]
    pub kafka: KafkaSettings,
    /// The topics' names.
    #[command(flatten, next_help_heading = "Kafka")]
    pub topics: TopicNames,
    /// The schema registry, for frames in the Confluent wire format.
    #[command(flatten, next_help_heading = "Schema registry")]
    pub registry: biofeed_backends::registry::RegistrySettings,
}

/// Why the live member or the hub stopped.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// A service could not be reached or refused.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Kafka failed for good (e.g. another member took this one's instance id).
    #[error("kafka failed for good: {0}; give every live member its own BIOFEED_LIVE_INSTANCE_ID")]
    Fatal(String),
    /// The loop's thread panicked.
    #[error("the live member's loop panicked: {0}")]
    Panicked(String),
}

impl LiveError {
    /// Whether a retry could help (exit 3) rather than an operator (exit 1).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LiveError::Kafka(_) | LiveError::Postgres(_))
            || matches!(self, LiveError::Backend(e) if e.is_retryable())
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}
