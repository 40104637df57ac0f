//! Kafka settings and a proof that the brokers answer a metadata request.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

use crate::{BackendError, Service, Target};

/// The environment variable naming the Kafka brokers; errors name it.
pub const BROKERS_SETTING: &str = "BIOFEED_KAFKA_BROKERS";

/// Where Kafka is and how long to wait for it.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaSettings {
    /// Kafka bootstrap brokers, comma-separated host:port pairs.
    #[arg(
        long = "kafka-brokers", id = "kafka_brokers",
        value_name = "HOST:PORT[,…]",
        env = "BIOFEED_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092",
        value_parser = parse_brokers
    )]
    pub brokers: String,

    /// How long to wait for Kafka to answer a metadata request before failing.
    #[arg(
        long = "kafka-connect-timeout", id = "kafka_connect_timeout",
        value_name = "DURATION",
        env = "BIOFEED_KAFKA_CONNECT_TIMEOUT",
        default_value = "5s",
        value_parser = crate::parse_duration
    )]
    pub connect_timeout: Duration,
}

/// The names of biofeed's topics; tests give each run its own.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicNames {
    /// Topic the gateway publishes frames to and consumers read from.
    #[arg(long = "points-topic", id = "points_topic",
        value_name = "TOPIC", env = "BIOFEED_POINTS_TOPIC", default_value = biofeed_schema::topics::POINTS, value_parser = parse_topic)]
    pub points: String,

    /// Dead-letter topic for frames that cannot be decoded or stored.
    #[arg(long = "dlq-topic", id = "dlq_topic",
        value_name = "TOPIC", env = "BIOFEED_DLQ_TOPIC", default_value = biofeed_schema::topics::POINTS_DLQ, value_parser = parse_topic)]
    pub dlq: String,
}

impl KafkaSettings {
    /// Client configuration shared by producers, consumers and admin clients, with connection
    /// set-up bounded by the connect timeout.
    pub fn client_config(&self) -> ClientConfig {
        let timeout_ms = self.connect_timeout.as_millis().max(1000).to_string();
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "biofeed")
            .set("socket.connection.setup.timeout.ms", &timeout_ms)
            .set("socket.timeout.ms", &timeout_ms);
        config
    }

    /// An admin client whose brokers answered a metadata request within the connect timeout.
    /// Shared (`Arc`) so that blocking librdkafka calls can run on the blocking pool.
    #[tracing::instrument(skip(self), fields(brokers = %self.brokers))]
    pub async fn connect_admin(
        &self,
    ) -> Result<Arc<AdminClient<DefaultClientContext>>, BackendError> {
        let target = Target::new(Service::Kafka, BROKERS_SETTING, self.brokers.clone());
        let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
            self.client_config()
                .create()
                .map_err(|e| target.failed(e))?,
        );
        let timeout = self.connect_timeout;
        // librdkafka's metadata call blocks; keep it off the async workers.
        let probe = Arc::clone(&admin);
        let answer = tokio::task::spawn_blocking(move || {
            probe.inner().fetch_metadata(None, timeout).map(|_| ())
        })
        .await
        .map_err(|e| target.failed(e))?;
        match answer {
            Ok(()) => Ok(admin),
            Err(rdkafka::error::KafkaError::MetadataFetch(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            )) => Err(target.timed_out(timeout)),
            Err(e) => Err(target.failed(e)),
        }
    }
}

/// Accepts a comma-separated list of `host:port` pairs.
pub fn parse_brokers(value: &str) -> Result<String, String> {
    let brokers: Vec<&str> = value.split(',').map(str::trim).collect();
    for broker in &brokers {
        let (host, port) = broker
            .rsplit_once(':')
            .ok_or_else(|| format!("'{broker}' is not host:port"))?;
        if host.is_empty() || host.contains('/') {
            return Err(format!("'{broker}' has no valid host"));
        }
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("'{broker}' has no valid port"))?;
    }
    Ok(brokers.join(","))
}

/// Accepts a legal Kafka topic name: 1–249 of ASCII letters, digits, `.`, `_` and `-`.
pub fn parse_topic(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 249
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "'{value}' is not a legal topic name (1-249 of letters, digits, '.', '_', '-')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_lists_are_checked_before_use() {
        assert_eq!(parse_brokers("a:1, b:2").unwrap(), "a:1,b:2");
        assert!(parse_brokers("localhost")
            .unwrap_err()
            .contains("host:port"));
        assert!(parse_brokers("kafka://h:9092")
            .unwrap_err()
            .contains("host"));
        assert!(parse_brokers("h:99999").unwrap_err().contains("port"));
        assert!(parse_brokers(":9092").unwrap_err().contains("host"));
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(parse_topic("biofeed.points.v1").is_ok());
        assert!(parse_topic("bad topic").is_err());
        assert!(parse_topic("..").is_err());
        assert!(parse_topic(&"x".repeat(250)).is_err());
    }
}
