//! A real gateway for tests: started in-process on a free port against this test's own
//! Postgres database and topics, with a user, a device and a reader of the points topic.

use std::time::Duration;

use biofeed::cli::{Cli, Command};
use biofeed_accounts::{devices, users, AccountKeys, Accounts};
use biofeed_ingest_gateway::Application;
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::helpers::{as_arguments, gateway_url, http_client, with, Isolated, Role};
use biofeed_backends::kafka::KafkaSettings;

/// A running gateway and what it needs.
pub struct TestGateway {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The HTTP client.
    pub http: reqwest::Client,
    /// The test's stores.
    pub stores: Isolated,
    /// The keys the gateway uses.
    pub keys: AccountKeys,
    /// A user with a device.
    pub user: Uuid,
    /// That device's token.
    pub token: String,
    /// That device's id.
    pub device: Uuid,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
    }
}

/// Extra gateway options for one test, as command-line arguments.
pub type Options<'a> = &'a [&'a str];

impl TestGateway {
    /// Migrates a fresh set of stores and starts a gateway on them.
    pub async fn spawn(options: Options<'_>) -> Self {
        let stores = Isolated::new().await;
        biofeed_migrations::migrate(&stores.settings)
            .await
            .expect("migrate");
        let brokers = stores.settings.stores.kafka.brokers.clone();
        Self::spawn_on(stores, &brokers, options).await
    }

    /// Starts a gateway on migrated stores, with Kafka at `brokers`.
    pub async fn spawn_on(stores: Isolated, brokers: &str, options: Options<'_>) -> Self {
        let keys = AccountKeys::generate();
        let master = keys.master_key().to_base64();
        let blind = keys.blind_index_key.to_base64();
        // The gateway's own identity on the services (least privilege), at `brokers`.
        let env = with(
            stores.env_as(Role::Gateway),
            "BIOFEED_KAFKA_BROKERS",
            brokers.to_owned(),
        );
        let mut args: Vec<String> = ["biofeed", "gateway", "--listen", "127.0.0.1:0"]
            .map(str::to_owned)
            .into();
        // An option given overrides the identity's setting of the same name.
        let from_env: Vec<String> = as_arguments(&["gateway"], &env);
        for pair in from_env.chunks(2) {
            if !options.contains(&pair[0].as_str()) {
                args.extend(pair.iter().cloned());
            }
        }
        args.extend(
            [
                "--master-key",
                &master,
                "--blind-index-key",
                &blind,
                "--auth-cache-ttl",
                "200ms",
            ]
            .map(str::to_owned),
        );
        args.extend(options.iter().map(|o| (*o).to_owned()));
        let cli = Cli::try_parse_from(args).expect("gateway arguments parse");
        let Command::Gateway(settings) = cli.command else {
            unreachable!("parsed a gateway command")
        };
        let app = Application::build(*settings).await.expect("gateway starts");
        let url = gateway_url(app.local_addr().unwrap().port());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));

        let accounts = Accounts {
            pool: stores.settings.stores.postgres.connect().await.unwrap(),
            keys: keys.clone(),
        };
        let email =
            users::Email::parse(&format!("device-owner-{}@example.org", stores.id)).unwrap();
        let user = users::create_user(&accounts, &email, "user").await.unwrap();
        let device = devices::create_device(&accounts.pool, user, "test strap")
            .await
            .unwrap();
        Self {
            url,
            http: http_client(),
            stores,
            keys,
            user,
            token: device.token,
            device: device.id,
            shutdown: Some(stop),
        }
    }

    /// The test's accounts handle.
    pub async fn accounts(&self) -> Accounts {
        Accounts {
            pool: self
                .stores
                .settings
                .stores
                .postgres
                .connect()
                .await
                .unwrap(),
            keys: self.keys.clone(),
        }
    }

    /// A POST with the device's token.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    /// Opens a session streaming `data_types` for `exercise`; returns its id.
    pub async fn open_session(&self, exercise: &str, data_types: &[&str]) -> Uuid {
        let response = self
            .post("/v1/sessions")
            .json(&serde_json::json!({ "exercise": exercise, "data_types": data_types }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let body: serde_json::Value = response.json().await.unwrap();
        body["session_id"].as_str().unwrap().parse().unwrap()
    }

    /// Every message now in the points topic, as (key, value).
    pub async fn topic_messages(&self) -> Vec<(String, Vec<u8>)> {
        read_topic(
            &self.stores.settings.stores.kafka,
            &self.stores.settings.stores.topics.points,
        )
        .await
    }
}

/// A message read back from a topic.
pub struct TopicMessage {
    /// Its key, as text.
    pub key: String,
    /// Its value.
    pub payload: Vec<u8>,
    /// Its headers, as text.
    pub headers: Vec<(String, String)>,
}

/// How long [`read_messages`] may take to reach a topic's end: a watchdog, not a timing.
const READ_WATCHDOG: Duration = Duration::from_secs(60);

/// Reads a topic from the beginning to its end as it was when the read began: first each
/// partition's end (its high watermark), then messages until every partition's position (the
/// offset after the last message read from it) reached that end. Every message acknowledged
/// before the call is read; a pause in delivery is waited out, not taken for the end. Fails
/// the test, naming the partitions short of their end, after [`READ_WATCHDOG`].
pub async fn read_messages(kafka: &KafkaSettings, topic: &str) -> Vec<TopicMessage> {
    use rdkafka::message::Headers;
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka
            .client_config()
            .unwrap()
            .set(
                "group.id",
                format!("biofeed-test-reader-{}", Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .unwrap();
        // A missing topic must fail the test, not read as an empty one.
        let described = &metadata.topics()[0];
        assert!(
            described.error().is_none() && !described.partitions().is_empty(),
            "topic {topic} exists ({:?})",
            described.error()
        );
        // Each partition's end, and where reading it starts (its first offset still held). No
        // producer of the tests or of biofeed is transactional: no control record follows a
        // partition's last message, so the offset after that message is the end.
        let mut ends = std::collections::BTreeMap::new();
        let mut positions = std::collections::BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        for partition in described.partitions().iter().map(|p| p.id()) {
            let (low, high) = consumer
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("the end of {topic} [{partition}]: {e}"));
            ends.insert(partition, high);
            positions.insert(partition, low);
            assignment
                .add_partition_offset(&topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let deadline = std::time::Instant::now() + READ_WATCHDOG;
        let mut messages = Vec::new();
        loop {
            let short: Vec<String> = ends
                .iter()
                .filter(|(partition, end)| positions[*partition] < **end)
                .map(|(partition, end)| {
                    format!("partition {partition} at {} of {end}", positions[partition])
                })
                .collect();
            if short.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "read {topic} for {READ_WATCHDOG:?} without reaching its end: {}",
                short.join(", ")
            );
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = message.unwrap_or_else(|e| panic!("reading {topic}: {e}"));
            positions.insert(message.partition(), message.offset() + 1);
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_owned(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            messages.push(TopicMessage {
                key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                payload: message.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
        messages
    })
    .await
    .unwrap()
}

/// Every message of a topic as (key, value).
pub async fn read_topic(kafka: &KafkaSettings, topic: &str) -> Vec<(String, Vec<u8>)> {
    read_messages(kafka, topic)
        .await
        .into_iter()
        .map(|m| (m.key, m.payload))
        .collect()
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}
