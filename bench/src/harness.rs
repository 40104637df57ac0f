//! What every benchmark does around its measurement: the stores of its own (a Postgres database,
//! a ClickHouse database, topics) and their removal however the run ended, and the small
//! measures they share (the clock, percentiles, peak memory).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use biofeed_backends::clickhouse::ClickHouseSettings;
use biofeed_backends::kafka::KafkaSettings;
use biofeed_backends::postgres::PostgresSettings;
use biofeed_backends::registry::{Registry, RegistrySettings};
use biofeed_ingest_gateway::settings::FramingChoice;
use biofeed_migrations::postgres::OwnDatabase;
use biofeed_schema::Framing;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use uuid::Uuid;

/// Partitions of every topic a benchmark makes for itself.
const TOPIC_PARTITIONS: i32 = 6;

/// The stores a run made for itself, all removed by [`OwnStores::clean_up`]: the configured
/// databases and topics are never written.
pub(crate) struct OwnStores {
    /// The run's random id, part of every name it makes.
    pub(crate) id: String,
    kafka: KafkaSettings,
    postgres: Option<OwnDatabase>,
    clickhouse: Option<ClickHouseSettings>,
    topics: Vec<String>,
    /// Registry subjects of the run's topics.
    subjects: Vec<(Registry, String)>,
}

impl OwnStores {
    /// Nothing made yet; `id_len` hex characters of a random id name what will be.
    pub(crate) fn new(kafka: &KafkaSettings, id_len: usize) -> Self {
        Self {
            id: Uuid::new_v4().simple().to_string()[..id_len].to_owned(),
            kafka: kafka.clone(),
            postgres: None,
            clickhouse: None,
            topics: Vec::new(),
            subjects: Vec::new(),
        }
    }

    /// Creates and migrates the Postgres database `name` beside the configured one; returns
    /// the settings that reach it.
    pub(crate) async fn postgres(
        &mut self,
        configured: &PostgresSettings,
        name: &str,
    ) -> anyhow::Result<PostgresSettings> {
        let database = OwnDatabase::create(configured, name)
            .await
            .context("creating the bench's own Postgres database")?;
        let settings = database.settings.clone();
        self.postgres = Some(database);
        Ok(settings)
    }

    /// The configured stores with a Postgres database (created and migrated), a ClickHouse
    /// database and its analysts' database, and topics of the run's own, all named
    /// `<kind>_<id>`: whatever the run writes lands in none of the configured ones.
    pub(crate) async fn all_stores(
        &mut self,
        configured: &biofeed_backends::StoreSettings,
        kind: &str,
    ) -> anyhow::Result<biofeed_backends::StoreSettings> {
        let id = self.id.clone();
        let mut stores = configured.clone();
        stores.clickhouse.database = format!("biofeed_{kind}_{id}");
        // Its analysts' database beside it (`<database>_analyst`), never a configured one.
        stores.clickhouse.analyst_database = None;
        stores.topics.points = format!("biofeed.{kind}.{id}.points");
        stores.topics.dlq = format!("biofeed.{kind}.{id}.dlq");
        stores.topics.live = format!("biofeed.{kind}.{id}.live");
        stores.postgres = self
            .postgres(&stores.postgres, &format!("biofeed_{kind}_{id}"))
            .await?;
        self.clickhouse(&stores.clickhouse);
        // `biofeed migrate` registers the run's points subject when a registry is configured.
        if let Some(registry) = Registry::new(&stores.registry)? {
            self.subjects
                .push((registry, format!("{}-value", stores.topics.points)));
        }
        self.topics(&[
            &stores.topics.points,
            &stores.topics.dlq,
            &stores.topics.live,
        ]);
        Ok(stores)
    }

    /// The framing a run's frames on `topic` take: with a registry configured and `choice` not
    /// single-object, the current schema registered under `<topic>-value` (deleted at the
    /// end) and its id, as `biofeed migrate` and a gateway would do for the real topic.
    pub(crate) async fn framing(
        &mut self,
        choice: FramingChoice,
        registry: &RegistrySettings,
        topic: &str,
    ) -> anyhow::Result<Framing> {
        if let (Some(client), true) = (
            Registry::new(registry)?,
            choice != FramingChoice::SingleObject,
        ) {
            let subject = format!("{topic}-value");
            self.subjects.push((client.clone(), subject.clone()));
            client
                .register(&subject, &biofeed_schema::registry::current().text)
                .await
                .map_err(|e| anyhow::anyhow!("registering the bench's schema: {e}"))?;
        }
        biofeed_ingest_gateway::device::publisher::framing(choice, registry, topic).await
    }

    /// Records that the ClickHouse database of `settings` is the run's own, to be dropped.
    pub(crate) fn clickhouse(&mut self, settings: &ClickHouseSettings) {
        self.clickhouse = Some(settings.clone());
    }

    /// Records that `topics` are the run's own, to be deleted (whoever creates them).
    pub(crate) fn topics(&mut self, topics: &[&str]) {
        self.topics.extend(topics.iter().map(|t| (*t).to_owned()));
    }

    /// Creates `topics` (kept for an hour at most, should the deletion fail) and records them.
    pub(crate) async fn create_topics(&mut self, topics: &[&str]) -> anyhow::Result<()> {
        self.topics(topics);
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| {
                NewTopic::new(t, TOPIC_PARTITIONS, TopicReplication::Fixed(1))
                    .set("retention.ms", "3600000")
            })
            .collect();
        self.admin()?
            .create_topics(&new, &admin_options())
            .await
            .context("creating the bench topics")?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
        Ok(())
    }

    /// Drops and deletes whatever the run made; failures are logged, never returned, so that
    /// the run's own outcome is what the caller sees.
    pub(crate) async fn clean_up(mut self) {
        if let Some(database) = self.postgres.take() {
            if let Err(e) = database.drop().await {
                tracing::warn!(error = %e, "cannot drop the bench's own postgres database");
            }
        }
        if let Some(settings) = &self.clickhouse {
            if let Ok(ch) = settings.connect().await {
                // The analysts' database (Distributed tables over this one's views) first.
                for database in [ch.analyst_database(), ch.database()] {
                    let _ = ch
                        .server_client()
                        .query(&format!("DROP DATABASE IF EXISTS {database}"))
                        .execute()
                        .await;
                }
            }
        }
        for (registry, subject) in &self.subjects {
            if let Err(e) = registry.delete_subject(subject).await {
                tracing::warn!(error = %e, subject, "cannot delete the bench's registry subject");
            }
        }
        if !self.topics.is_empty() {
            if let Ok(admin) = self.admin() {
                let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
                let _ = admin.delete_topics(&topics, &admin_options()).await;
            }
        }
    }

    fn admin(&self) -> anyhow::Result<AdminClient<DefaultClientContext>> {
        Ok(self.kafka.client_config()?.create()?)
    }
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

/// A framing's name in the reports.
pub(crate) fn framing_name(framing: Framing) -> &'static str {
    match framing {
        Framing::SingleObject => "single-object",
        Framing::Confluent { .. } => "confluent",
    }
}

/// The `q` quantile of sorted values (nearest rank), 0 for none.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round().max(0.0) as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Microseconds since the epoch, now.
pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Peak resident memory of process `pid` so far (Linux `VmHWM`), MiB; 0 where unknown.
pub(crate) fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 51.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
