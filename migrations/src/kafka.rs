//! Kafka topics: the points topic, its dead letters and the live feedback, created when missing.

use std::sync::Arc;
use std::time::Duration;

use biofeed_backends::kafka::{KafkaSettings, TopicNames};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::{ItemState, MigrateError, State, StepReport};

/// How the topics are laid out: partitions, replication and retention.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicLayout {
    /// Partitions of the points topic: the most consumers that can share the work. Only used
    /// when the topic is created; growing it later would move sessions between partitions.
    #[arg(
        long = "points-partitions", id = "points_partitions",
        value_name = "N",
        env = "BIOFEED_POINTS_PARTITIONS",
        default_value_t = 6,
        value_parser = clap::value_parser!(i32).range(1..=10_000)
    )]
    pub points_partitions: i32,

    /// How long Kafka keeps points: the replay window (Kafka is not the archive).
    #[arg(
        long = "points-retention", id = "points_retention",
        value_name = "DURATION",
        env = "BIOFEED_POINTS_RETENTION",
        default_value = "7days",
        value_parser = biofeed_backends::parse_duration
    )]
    pub points_retention: Duration,

    /// How long Kafka keeps dead letters, time to fix and re-drive them.
    #[arg(
        long = "dlq-retention", id = "dlq_retention",
        value_name = "DURATION",
        env = "BIOFEED_DLQ_RETENTION",
        default_value = "30days",
        value_parser = biofeed_backends::parse_duration
    )]
    pub dlq_retention: Duration,

    /// How long Kafka keeps live feedback messages (a viewer reads them within a second; minutes
    /// are plenty).
    #[arg(
        long = "live-retention", id = "live_retention",
        value_name = "DURATION",
        env = "BIOFEED_LIVE_RETENTION",
        default_value = "10min",
        value_parser = biofeed_backends::parse_duration
    )]
    pub live_retention: Duration,

    /// How many brokers keep each partition.
    #[command(flatten)]
    pub replication: Replication,
}

/// How many brokers keep each partition of biofeed's topics.
#[derive(Debug, Clone, clap::Args)]
pub struct Replication {
    /// Replicas of each partition (1 for a single broker; 3 in production). Only used when a
    /// topic is created; `biofeed migrate --status` shows what each topic has.
    #[arg(
        long = "kafka-replication-factor", id = "kafka_replication_factor",
        value_name = "N",
        env = "BIOFEED_KAFKA_REPLICATION_FACTOR",
        default_value_t = 1,
        value_parser = clap::value_parser!(i32).range(1..=16)
    )]
    pub replication_factor: i32,

    /// Replicas that must hold a message before the broker acknowledges it (producers use
    /// acks=all): with a replication factor of 3 and 2 here, one broker may be down without
    /// losing or refusing writes. Default: a majority of the replicas (1 for 1 or 2 replicas).
    /// Set on every `biofeed migrate`.
    #[arg(
        long = "kafka-min-insync-replicas", id = "kafka_min_insync_replicas",
        value_name = "N",
        env = "BIOFEED_KAFKA_MIN_INSYNC_REPLICAS",
        value_parser = clap::value_parser!(i32).range(1..=16)
    )]
    pub min_insync_replicas: Option<i32>,
}

impl Replication {
    /// `min.insync.replicas` of the topics: the setting, or a majority of the replicas.
    pub fn min_insync_replicas(&self) -> Result<i32, MigrateError> {
        let replicas = self.replication_factor;
        let min =
            self.min_insync_replicas
                .unwrap_or(if replicas <= 2 { 1 } else { replicas / 2 + 1 });
        if min > replicas {
            return Err(MigrateError::Backend(
                biofeed_backends::BackendError::Misconfigured {
                    setting: "BIOFEED_KAFKA_MIN_INSYNC_REPLICAS",
                    reason: format!(
                        "{min} is more than the {replicas} replicas of BIOFEED_KAFKA_REPLICATION_FACTOR: no write could ever be acknowledged"
                    ),
                },
            ));
        }
        Ok(min)
    }
}

struct Wanted<'a> {
    name: &'a str,
    partitions: i32,
    retention_ms: String,
}

fn wanted<'a>(topics: &'a TopicNames, layout: &TopicLayout) -> [Wanted<'a>; 3] {
    [
        Wanted {
            name: &topics.points,
            partitions: layout.points_partitions,
            retention_ms: layout.points_retention.as_millis().to_string(),
        },
        Wanted {
            // Dead letters are few; one partition keeps them in arrival order for re-drive.
            name: &topics.dlq,
            partitions: 1,
            retention_ms: layout.dlq_retention.as_millis().to_string(),
        },
        Wanted {
            // Keyed by session like the points, as many partitions, so one session's feeds keep
            // their order.
            name: &topics.live,
            partitions: layout.points_partitions,
            retention_ms: layout.live_retention.as_millis().to_string(),
        },
    ]
}

/// Creates the topics that are missing and sets every topic's retention to the configured one.
/// An existing topic keeps its partitions.
#[tracing::instrument(skip_all)]
pub async fn ensure_topics(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topics: &TopicNames,
    layout: &TopicLayout,
    kafka: &KafkaSettings,
) -> Result<StepReport, MigrateError> {
    let options = AdminOptions::new().operation_timeout(Some(kafka.connect_timeout));
    let wanted = wanted(topics, layout);
    let min_insync = layout.replication.min_insync_replicas()?.to_string();
    let new_topics: Vec<NewTopic> = wanted
        .iter()
        .map(|w| {
            NewTopic::new(
                w.name,
                w.partitions,
                TopicReplication::Fixed(layout.replication.replication_factor),
            )
            .set("retention.ms", &w.retention_ms)
            .set("min.insync.replicas", &min_insync)
            .set("compression.type", "producer")
        })
        .collect();
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|e| kafka_error(&topics.points, e))?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            // More replicas than brokers: a setting to fix (exit 2), not a failure to retry.
            Err((name, RDKafkaErrorCode::InvalidReplicationFactor)) => {
                return Err(MigrateError::Backend(
                    biofeed_backends::BackendError::Misconfigured {
                        setting: "BIOFEED_KAFKA_REPLICATION_FACTOR",
                        reason: format!(
                            "Kafka refused {} replicas for topic {name}: fewer brokers are up than that (too few in the cluster, or some are down)",
                            layout.replication.replication_factor
                        ),
                    },
                ))
            }
            Err((name, code)) => return Err(kafka_error(&name, code)),
        }
    }
    // An existing topic keeps its replicas: more required in sync than it has would refuse
    // every write.
    let min_insync_n: usize = min_insync.parse().unwrap_or(1);
    for w in &wanted {
        if let Some((_, replicas)) = partition_layout(admin, w.name, kafka.connect_timeout).await? {
            if replicas < min_insync_n {
                return Err(MigrateError::Backend(
                    biofeed_backends::BackendError::Misconfigured {
                        setting: "BIOFEED_KAFKA_MIN_INSYNC_REPLICAS",
                        reason: format!(
                            "topic {} has {replicas} replica(s), fewer than {min_insync_n} in sync: every write would be refused. Raise its replication factor first (Kafka's partition reassignment) or lower the setting",
                            w.name
                        ),
                    },
                ));
            }
        }
    }
    // Retention and min.insync.replicas may have changed in the settings since the topic was
    // created. AlterConfigs replaces a topic's whole set of overrides: give all of them.
    let retention: Vec<AlterConfig> = wanted
        .iter()
        .map(|w| {
            AlterConfig::new(ResourceSpecifier::Topic(w.name))
                .set("retention.ms", &w.retention_ms)
                .set("min.insync.replicas", &min_insync)
                .set("compression.type", "producer")
        })
        .collect();
    for result in admin
        .alter_configs(&retention, &options)
        .await
        .map_err(|e| kafka_error(&topics.points, e))?
    {
        if let Err((resource, code)) = result {
            return Err(kafka_error(&format!("{resource:?}"), code));
        }
    }
    let mut report = topic_status(admin, topics, kafka).await?;
    for item in &mut report.items {
        if created.contains(&item.name) {
            item.state = State::Applied;
            tracing::info!(topic = %item.name, detail = %item.detail, "created kafka topic");
        }
    }
    Ok(report)
}

/// Reports whether each topic exists, with its partitions and retention.
#[tracing::instrument(skip_all)]
pub async fn topic_status(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topics: &TopicNames,
    kafka: &KafkaSettings,
) -> Result<StepReport, MigrateError> {
    let options = AdminOptions::new().request_timeout(Some(kafka.connect_timeout));
    let mut items = Vec::new();
    for name in [&topics.points, &topics.dlq, &topics.live] {
        let layout = partition_layout(admin, name, kafka.connect_timeout).await?;
        let item = match layout {
            None => ItemState {
                name: name.clone(),
                state: State::Pending,
                detail: "missing".to_owned(),
            },
            Some((partitions, replicas)) => {
                let configs = admin
                    .describe_configs(&[ResourceSpecifier::Topic(name)], &options)
                    .await
                    .map_err(|e| kafka_error(name, e))?;
                let entries: Vec<_> = configs
                    .into_iter()
                    .flatten()
                    .flat_map(|resource| resource.entries)
                    .collect();
                let value = |key: &str| {
                    entries
                        .iter()
                        .find(|entry| entry.name == key)
                        .and_then(|entry| entry.value.clone())
                };
                let retention = value("retention.ms")
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|ms| humanize(Duration::from_millis(ms)))
                    .unwrap_or_else(|| "unknown".to_owned());
                let min_insync =
                    value("min.insync.replicas").unwrap_or_else(|| "unknown".to_owned());
                ItemState {
                    name: name.clone(),
                    state: State::Present,
                    detail: format!(
                        "{partitions} partitions, {replicas} replicas, min.insync.replicas {min_insync}, retention {retention}"
                    ),
                }
            }
        };
        items.push(item);
    }
    Ok(StepReport {
        store: "kafka",
        items,
    })
}

/// The topic's partition count, or `None` when the topic does not exist.
pub async fn partition_count(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<usize>, MigrateError> {
    Ok(partition_layout(admin, topic, timeout)
        .await?
        .map(|(partitions, _)| partitions))
}

/// The topic's partition count and the replicas of its first partition, or `None` when the
/// topic does not exist.
pub async fn partition_layout(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<(usize, usize)>, MigrateError> {
    // librdkafka's metadata call blocks; keep it off the async workers.
    let (admin, name) = (Arc::clone(admin), topic.to_owned());
    let metadata =
        tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(Some(&name), timeout))
            .await
            .map_err(|e| kafka_error(topic, e))?
            .map_err(|e| kafka_error(topic, e))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None => Ok(Some((
            found.partitions().len(),
            found.partitions().first().map_or(0, |p| p.replicas().len()),
        ))),
        Some(code) if RDKafkaErrorCode::from(code) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            Ok(None)
        }
        Some(code) => Err(kafka_error(topic, RDKafkaErrorCode::from(code))),
    }
}

fn humanize(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

fn kafka_error(topic: &str, error: impl std::fmt::Display) -> MigrateError {
    MigrateError::Kafka {
        topic: topic.to_owned(),
        reason: error.to_string(),
    }
}
