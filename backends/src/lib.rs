//! Connection settings and bounded-time connections to the three backing services.
//!
//! Every biofeed process talks to some of Postgres, ClickHouse and Kafka. This crate owns how:
//! the settings (clap arguments, each with its `BIOFEED_…` environment variable and a loopback
//! plaintext default; `compose/local env` prints those of its secure stack), TLS, SASL and
//! passwords from files, their validation before any connection is tried, and connecting with a
//! bounded timeout so that a wrong address fails within seconds with an error that names the
//! setting and the address tried — and tells a refusal (credentials, certificates: exit 2) from
//! a service away (exit 3).
//!
//! It also holds the process's stop signal ([`shutdown`]), which every long-running part shares.
//!
//! Architecture invariants: owns no table and no topic and knows nothing of the data; it hands
//! out connected clients and the stop signal, nothing else. Credentials never appear in its errors or logs.

mod address;
pub mod clickhouse;
mod failover;
pub mod kafka;
pub mod postgres;
pub mod registry;
pub mod secret;
pub mod shutdown;
pub mod tls;

use std::time::Duration;

pub use address::redacted_address;
pub use secret::Secret;

/// Where all three backing services are, and the topics' names: what a process that touches
/// every store (migrate, consume, replay) is given.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreSettings {
    /// Where Postgres is.
    #[command(flatten, next_help_heading = "Postgres")]
    pub postgres: postgres::PostgresSettings,
    /// Where ClickHouse is.
    #[command(flatten, next_help_heading = "ClickHouse")]
    pub clickhouse: clickhouse::ClickHouseSettings,
    /// Where Kafka is.
    #[command(flatten, next_help_heading = "Kafka")]
    pub kafka: kafka::KafkaSettings,
    /// The topics' names.
    #[command(flatten, next_help_heading = "Kafka")]
    pub topics: kafka::TopicNames,
    /// The schema registry (none: frames are single-object framed only).
    #[command(flatten, next_help_heading = "Schema registry")]
    pub registry: registry::RegistrySettings,
}

impl StoreSettings {
    /// These settings as the `BIOFEED_…` environment of a child `biofeed` process (the benches
    /// start `biofeed up`), secrets as values: the child must not also inherit the
    /// [`SECRET_FILE_SETTINGS`], which would conflict with them.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        let (pg, ch, kafka) = (&self.postgres, &self.clickhouse, &self.kafka);
        let mut url = pg.url.clone();
        if let Some(password) = &pg.password_file {
            // A child's environment, never logged: the URL carries the password there.
            let _ = url.set_password(Some(password.expose()));
        }
        let mut env = vec![
            ("BIOFEED_POSTGRES_URL", url.to_string()),
            ("BIOFEED_CLICKHOUSE_URL", ch.url.to_string()),
            ("BIOFEED_CLICKHOUSE_USER", ch.user.clone()),
            ("BIOFEED_CLICKHOUSE_PASSWORD", ch.password().to_owned()),
            ("BIOFEED_CLICKHOUSE_DATABASE", ch.database.clone()),
            ("BIOFEED_KAFKA_BROKERS", kafka.brokers.clone()),
            (
                "BIOFEED_KAFKA_SECURITY_PROTOCOL",
                kafka.security_protocol.as_str().to_owned(),
            ),
            (
                "BIOFEED_KAFKA_SASL_MECHANISM",
                kafka.sasl_mechanism.as_str().to_owned(),
            ),
            ("BIOFEED_POINTS_TOPIC", self.topics.points.clone()),
            ("BIOFEED_DLQ_TOPIC", self.topics.dlq.clone()),
            ("BIOFEED_LIVE_TOPIC", self.topics.live.clone()),
        ];
        let path = |p: &std::path::PathBuf| p.display().to_string();
        let optional = [
            (
                "BIOFEED_POSTGRES_SSLMODE",
                pg.sslmode.map(|m| m.as_str().to_owned()),
            ),
            (
                "BIOFEED_POSTGRES_SSLROOTCERT",
                pg.sslrootcert.as_ref().map(path),
            ),
            ("BIOFEED_CLICKHOUSE_CA_FILE", ch.ca_file.as_ref().map(path)),
            ("BIOFEED_CLICKHOUSE_CLUSTER", ch.cluster.clone()),
            (
                "BIOFEED_CLICKHOUSE_REPLICAS_CLUSTER",
                ch.replicas_cluster.clone(),
            ),
            ("BIOFEED_KAFKA_USER", kafka.user.clone()),
            (
                "BIOFEED_KAFKA_PASSWORD",
                kafka
                    .password
                    .as_ref()
                    .or(kafka.password_file.as_ref())
                    .map(|p| p.expose().to_owned()),
            ),
            ("BIOFEED_KAFKA_CA_FILE", kafka.ca_file.as_ref().map(path)),
            (
                "BIOFEED_KAFKA_CERT_FILE",
                kafka.cert_file.as_ref().map(path),
            ),
            ("BIOFEED_KAFKA_KEY_FILE", kafka.key_file.as_ref().map(path)),
        ];
        env.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        env.extend(self.registry.child_env());
        env
    }

    /// How this process talks to each service, for reports (never a secret).
    pub fn security_summary(&self) -> String {
        format!(
            "postgres {}; clickhouse {}; kafka {}",
            self.postgres.security_summary(),
            self.clickhouse.security_summary(),
            self.kafka.security_summary()
        )
    }
}

/// The settings that name files holding secrets; a child given [`StoreSettings::child_env`]
/// must not inherit them.
pub const SECRET_FILE_SETTINGS: &[&str] = &[
    "BIOFEED_POSTGRES_PASSWORD_FILE",
    "BIOFEED_CLICKHOUSE_PASSWORD_FILE",
    "BIOFEED_KAFKA_PASSWORD_FILE",
    "BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE",
];

/// Which backing service an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// PostgreSQL: users, sessions, failed jobs.
    Postgres,
    /// ClickHouse: points and rollups.
    ClickHouse,
    /// Kafka: the points topic and its dead letters.
    Kafka,
    /// The schema registry: the topics' Avro schemas and their ids.
    SchemaRegistry,
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Service::Postgres => "postgres",
            Service::ClickHouse => "clickhouse",
            Service::Kafka => "kafka",
            Service::SchemaRegistry => "the schema registry",
        })
    }
}

/// A backing service could not be used. The message names the service, the setting that chose
/// its address, and the address tried (without credentials).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The service did not answer within the connect timeout.
    #[error("{service} at {address} (setting {setting}) did not answer within {timeout:?}")]
    Timeout {
        /// The service.
        service: Service,
        /// The environment variable that holds the address.
        setting: &'static str,
        /// The address tried, credentials removed.
        address: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The service answered with an error, or the connection failed outright.
    #[error("{service} at {address} (setting {setting}) failed: {reason}")]
    Failed {
        /// The service.
        service: Service,
        /// The environment variable that holds the address.
        setting: &'static str,
        /// The address tried, credentials removed.
        address: String,
        /// What went wrong, as the client library said it.
        reason: String,
    },
    /// The service answered and refused us: wrong user or password, or its certificate is not
    /// trusted (unknown CA, expired, another host's name), or it answered TLS with something
    /// that is not TLS (a plaintext port where the settings chose TLS). Retrying with the
    /// same settings cannot help. A server that just hangs up on the wrong protocol is
    /// [`BackendError::Failed`]: that looks the same as one restarting.
    #[error("{service} at {address} (setting {setting}) refused the connection: {reason}")]
    Rejected {
        /// The service.
        service: Service,
        /// The setting to look at first.
        setting: &'static str,
        /// The address tried, credentials removed.
        address: String,
        /// Why, as the client library or the server said it (never a secret).
        reason: String,
    },
    /// The settings contradict each other, e.g. SASL without a password.
    #[error("{setting}: {reason}")]
    Misconfigured {
        /// The setting to fix.
        setting: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl BackendError {
    /// The service the error is about (none for contradictory settings).
    pub fn service(&self) -> Option<Service> {
        match self {
            BackendError::Timeout { service, .. }
            | BackendError::Failed { service, .. }
            | BackendError::Rejected { service, .. } => Some(*service),
            BackendError::Misconfigured { .. } => None,
        }
    }

    /// Whether trying again with the same settings can help: a service away or slow, yes; a
    /// refusal of our credentials or certificates, or contradictory settings, no.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BackendError::Timeout { .. } | BackendError::Failed { .. }
        )
    }
}

/// A backing service as its errors name it: which one, the setting that chose its address, and
/// the address (credentials removed).
pub(crate) struct Target {
    service: Service,
    setting: &'static str,
    address: String,
}

impl Target {
    pub(crate) fn new(service: Service, setting: &'static str, address: String) -> Self {
        Self {
            service,
            setting,
            address,
        }
    }

    /// The service failed, for `reason` (as the client library said it).
    pub(crate) fn failed(&self, reason: impl std::fmt::Display) -> BackendError {
        BackendError::Failed {
            service: self.service,
            setting: self.setting,
            address: self.address.clone(),
            reason: reason.to_string(),
        }
    }

    /// The service refused us, for `reason` (credentials, certificate, protocol).
    pub(crate) fn rejected(&self, reason: impl std::fmt::Display) -> BackendError {
        BackendError::Rejected {
            service: self.service,
            setting: self.setting,
            address: self.address.clone(),
            reason: reason.to_string(),
        }
    }

    /// The service did not answer within `timeout`.
    pub(crate) fn timed_out(&self, timeout: Duration) -> BackendError {
        BackendError::Timeout {
            service: self.service,
            setting: self.setting,
            address: self.address.clone(),
            timeout,
        }
    }

    /// Runs `attempt` for at most `timeout`: running out of time is [`Target::timed_out`]; its
    /// error is [`Target::rejected`] when `refusal` finds a reason in it, else [`Target::failed`].
    pub(crate) async fn within<T, E: std::fmt::Display>(
        &self,
        timeout: Duration,
        attempt: impl std::future::Future<Output = Result<T, E>>,
        refusal: impl FnOnce(&E) -> Option<String>,
    ) -> Result<T, BackendError> {
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| self.timed_out(timeout))?
            .map_err(|e| match refusal(&e) {
                Some(reason) => self.rejected(reason),
                None => self.failed(e),
            })
    }
}

/// This host's name (the kernel's, else `$HOSTNAME`), or `fallback`: the default static group
/// member id of the consumers and the live members.
pub fn host_name(fallback: &str) -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| fallback.to_owned())
}

/// Parses a positive duration such as `5s`, `1500ms`, `2min` or `7days` for duration settings.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let parsed = humantime::parse_duration(value).map_err(|e| {
        format!("'{value}' is not a duration ({e}); write e.g. 5s, 1500ms, 2min, 7days")
    })?;
    if parsed.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_units() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7days"), Ok(Duration::from_secs(7 * 86_400)));
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse_duration("soon")
            .unwrap_err()
            .contains("not a duration"));
        assert!(parse_duration("0s")
            .unwrap_err()
            .contains("longer than zero"));
    }
}
