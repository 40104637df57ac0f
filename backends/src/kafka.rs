//! Kafka settings — where the brokers are, and how we prove who we are to them (TLS, SASL) —
//! and a proof that the brokers answer a metadata request.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

use crate::secret::{readable_file, secret_file, Secret};
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

    /// How to talk to the brokers: plaintext, ssl (TLS), sasl_plaintext or sasl_ssl (SASL
    /// over TLS: what managed Kafka services want).
    #[arg(
        long = "kafka-security-protocol",
        id = "kafka_security_protocol",
        value_name = "PROTOCOL",
        env = "BIOFEED_KAFKA_SECURITY_PROTOCOL",
        default_value = "plaintext",
        ignore_case = true,
        value_enum
    )]
    pub security_protocol: SecurityProtocol,

    /// SASL mechanism, with sasl_plaintext or sasl_ssl.
    #[arg(
        long = "kafka-sasl-mechanism",
        id = "kafka_sasl_mechanism",
        value_name = "MECHANISM",
        env = "BIOFEED_KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-512",
        ignore_case = true,
        value_enum
    )]
    pub sasl_mechanism: SaslMechanism,

    /// SASL user name (needed with sasl_plaintext or sasl_ssl).
    #[arg(
        long = "kafka-user",
        id = "kafka_user",
        value_name = "USER",
        env = "BIOFEED_KAFKA_USER"
    )]
    pub user: Option<String>,

    /// SASL password. Never logged. Or give BIOFEED_KAFKA_PASSWORD_FILE.
    #[arg(
        long = "kafka-password",
        id = "kafka_password",
        value_name = "PASSWORD",
        env = "BIOFEED_KAFKA_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<Secret>,

    /// A file holding the SASL password (e.g. a mounted secret) instead of BIOFEED_KAFKA_PASSWORD.
    #[arg(
        long = "kafka-password-file",
        id = "kafka_password_file",
        value_name = "PATH",
        env = "BIOFEED_KAFKA_PASSWORD_FILE",
        conflicts_with = "kafka_password",
        value_parser = secret_file("BIOFEED_KAFKA_PASSWORD_FILE")
    )]
    pub password_file: Option<Secret>,

    /// PEM file of the CA certificate(s) that signed the brokers' certificates (ssl, sasl_ssl);
    /// without it, the system's roots. The brokers' host names are verified.
    #[arg(
        long = "kafka-ca-file", id = "kafka_ca_file",
        value_name = "PATH",
        env = "BIOFEED_KAFKA_CA_FILE",
        value_parser = readable_file("BIOFEED_KAFKA_CA_FILE")
    )]
    pub ca_file: Option<PathBuf>,

    /// PEM client certificate, for brokers that authenticate clients by certificate (mTLS).
    #[arg(
        long = "kafka-cert-file", id = "kafka_cert_file",
        value_name = "PATH",
        env = "BIOFEED_KAFKA_CERT_FILE",
        requires = "kafka_key_file",
        value_parser = readable_file("BIOFEED_KAFKA_CERT_FILE")
    )]
    pub cert_file: Option<PathBuf>,

    /// PEM private key of the client certificate (mTLS).
    #[arg(
        long = "kafka-key-file", id = "kafka_key_file",
        value_name = "PATH",
        env = "BIOFEED_KAFKA_KEY_FILE",
        requires = "kafka_cert_file",
        value_parser = readable_file("BIOFEED_KAFKA_KEY_FILE")
    )]
    pub key_file: Option<PathBuf>,
}

/// How a client talks to the brokers (Kafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecurityProtocol {
    /// Unencrypted, unauthenticated: a trusted network only.
    #[value(name = "plaintext")]
    Plaintext,
    /// TLS; the client is known by its certificate, if any.
    #[value(name = "ssl")]
    Ssl,
    /// SASL user and password over an unencrypted connection.
    #[value(name = "sasl_plaintext")]
    SaslPlaintext,
    /// SASL user and password over TLS.
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    /// Kafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// SASL mechanism (Kafka's `sasl.mechanism`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    /// SCRAM with SHA-512: the password never crosses the wire.
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
    /// SCRAM with SHA-256.
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    /// The password itself, sent to the broker: only over TLS.
    #[value(name = "PLAIN")]
    Plain,
}

impl SaslMechanism {
    /// Kafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::Plain => "PLAIN",
        }
    }
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

    /// Topic of the live feedback: open sessions' rolling metrics, written by the live members
    /// (`biofeed live`, or the live part of `biofeed up`) and read by every gateway.
    #[arg(long = "live-topic", id = "live_topic",
        value_name = "TOPIC", env = "BIOFEED_LIVE_TOPIC", default_value = biofeed_schema::topics::LIVE, value_parser = parse_topic)]
    pub live: String,
}

impl KafkaSettings {
    /// Client configuration shared by producers, consumers and admin clients: the brokers, TLS
    /// and SASL as set, and connection set-up bounded by the connect timeout. Fails when the
    /// settings contradict each other (SASL without a user or password).
    pub fn client_config(&self) -> Result<ClientConfig, BackendError> {
        let timeout_ms = self.connect_timeout.as_millis().max(1000).to_string();
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "biofeed")
            .set("socket.connection.setup.timeout.ms", &timeout_ms)
            .set("socket.timeout.ms", &timeout_ms)
            .set("security.protocol", self.security_protocol.as_str());
        let protocol = self.security_protocol;
        if protocol.uses_sasl() {
            let misconfigured = |setting, what: &str| BackendError::Misconfigured {
                setting,
                reason: format!(
                    "BIOFEED_KAFKA_SECURITY_PROTOCOL={} needs {what}",
                    protocol.as_str()
                ),
            };
            let user = self
                .user
                .as_deref()
                .filter(|u| !u.is_empty())
                .ok_or_else(|| misconfigured("BIOFEED_KAFKA_USER", "a user"))?;
            let password = self
                .password
                .as_ref()
                .or(self.password_file.as_ref())
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    misconfigured(
                        "BIOFEED_KAFKA_PASSWORD",
                        "a password (BIOFEED_KAFKA_PASSWORD or BIOFEED_KAFKA_PASSWORD_FILE)",
                    )
                })?;
            if self.sasl_mechanism == SaslMechanism::Plain && !protocol.uses_tls() {
                return Err(BackendError::Misconfigured {
                    setting: "BIOFEED_KAFKA_SASL_MECHANISM",
                    reason: "PLAIN sends the password itself: use it only with sasl_ssl".to_owned(),
                });
            }
            config
                .set("sasl.mechanism", self.sasl_mechanism.as_str())
                .set("sasl.username", user)
                .set("sasl.password", password.expose());
        }
        if protocol.uses_tls() {
            // Brokers' names are checked against their certificates (librdkafka's default,
            // stated so that nobody turns it off by accident).
            config.set("ssl.endpoint.identification.algorithm", "https");
            if let Some(ca) = &self.ca_file {
                config.set("ssl.ca.location", path_str(ca));
            }
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                config
                    .set("ssl.certificate.location", path_str(cert))
                    .set("ssl.key.location", path_str(key));
            }
        } else if self.ca_file.is_some() || self.cert_file.is_some() {
            return Err(BackendError::Misconfigured {
                setting: "BIOFEED_KAFKA_SECURITY_PROTOCOL",
                reason: format!(
                    "certificate files are set but the protocol is {}: choose ssl or sasl_ssl",
                    protocol.as_str()
                ),
            });
        }
        Ok(config)
    }

    /// How this process talks to Kafka, for reports: protocol, mechanism and user (never the
    /// password), e.g. `sasl_ssl SCRAM-SHA-512 as biofeed-gateway, CA /etc/ca.pem`.
    pub fn security_summary(&self) -> String {
        let mut summary = self.security_protocol.as_str().to_owned();
        if self.security_protocol.uses_sasl() {
            summary.push_str(&format!(
                " {} as {}",
                self.sasl_mechanism.as_str(),
                self.user.as_deref().unwrap_or("?")
            ));
        }
        if self.security_protocol.uses_tls() {
            match &self.ca_file {
                Some(ca) => summary.push_str(&format!(", CA {}", ca.display())),
                None => summary.push_str(", system CAs"),
            }
            if self.cert_file.is_some() {
                summary.push_str(", client certificate");
            }
        }
        summary
    }

    /// An admin client whose brokers answered a metadata request within the connect timeout.
    /// Shared (`Arc`) so that blocking librdkafka calls can run on the blocking pool.
    #[tracing::instrument(skip(self), fields(brokers = %self.brokers))]
    pub async fn connect_admin(
        &self,
    ) -> Result<Arc<AdminClient<DefaultClientContext>>, BackendError> {
        self.probe().await?;
        let target = Target::new(Service::Kafka, BROKERS_SETTING, self.brokers.clone());
        let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
            self.client_config()?
                .create()
                .map_err(|e| target.failed(e))?,
        );
        Ok(admin)
    }

    /// Proves, within the connect timeout, that the brokers answer a metadata request with
    /// these settings. A refusal (SASL authentication failed, the brokers' certificate not
    /// trusted, a broker's TLS alert, TLS met by a non-TLS answer) is
    /// [`BackendError::Rejected`], naming the setting to look at.
    pub async fn probe(&self) -> Result<(), BackendError> {
        let target = Target::new(Service::Kafka, BROKERS_SETTING, self.brokers.clone());
        // A producer, whose poll serves the events that carry refusals (SASL, TLS) to the
        // context; it never produces.
        let client: BaseProducer<ProbeContext> = self
            .client_config()?
            .create_with_context(ProbeContext::default())
            .map_err(|e| target.failed(e))?;
        let timeout = self.connect_timeout;
        // librdkafka's metadata call blocks; keep it off the async workers.
        let (answer, refusal) = tokio::task::spawn_blocking(move || {
            let answer = client.client().fetch_metadata(None, timeout).map(|_| ());
            if answer.is_err() {
                // The refusal may still be queued: serve the events for a moment.
                for _ in 0..10 {
                    client.poll(Duration::from_millis(50));
                    if client.context().refusal().is_some() {
                        break;
                    }
                }
            }
            (answer, client.context().refusal())
        })
        .await
        .map_err(|e| target.failed(e))?;
        match (answer, refusal) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some((setting, reason))) => Err(BackendError::Rejected {
                service: Service::Kafka,
                setting,
                address: self.brokers.clone(),
                reason,
            }),
            (Err(KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut)), None) => {
                Err(target.timed_out(timeout))
            }
            (Err(e), None) => Err(target.failed(e)),
        }
    }
}

/// Remembers the first refusal librdkafka reported while the probe ran (it reports errors to
/// the client's context, and the metadata request itself only times out).
#[derive(Default)]
struct ProbeContext {
    refusal: Mutex<Option<(&'static str, String)>>,
}

impl ProbeContext {
    fn refusal(&self) -> Option<(&'static str, String)> {
        self.refusal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// The setting to blame when librdkafka's error is a refusal a retry cannot fix: the broker
/// turned our credentials down, or TLS refused the broker's certificate (or the broker ours).
/// Everything else — connections reset or timed out during a handshake, a broker restarting —
/// is not a refusal: librdkafka reports those with the same codes, so the text decides.
fn refusal_setting(code: Option<RDKafkaErrorCode>, reason: &str) -> Option<&'static str> {
    match code {
        Some(RDKafkaErrorCode::Authentication)
            if reason.contains("SASL authentication error")
                || reason.contains("invalid credentials") =>
        {
            Some("BIOFEED_KAFKA_USER")
        }
        Some(RDKafkaErrorCode::SSL) if reason.contains("certificate verify failed") => {
            Some("BIOFEED_KAFKA_CA_FILE")
        }
        // The broker's TLS alert: it refused our certificate (or lack of one) or our protocol.
        Some(RDKafkaErrorCode::SSL) if reason.contains("alert") => Some("BIOFEED_KAFKA_CERT_FILE"),
        // TLS from us met a listener that does not speak it.
        Some(RDKafkaErrorCode::SSL) if reason.contains("wrong version number") => {
            Some("BIOFEED_KAFKA_SECURITY_PROTOCOL")
        }
        _ => None,
    }
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(setting) = refusal_setting(error.rdkafka_error_code(), reason) {
            let mut refusal = self
                .refusal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            refusal.get_or_insert_with(|| (setting, reason.to_owned()));
        }
    }
}

fn path_str(path: &std::path::Path) -> &str {
    // Paths come from settings, which clap read as UTF-8 strings.
    path.to_str().unwrap_or_default()
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
    fn only_refusals_a_retry_cannot_fix_are_refusals() {
        use RDKafkaErrorCode::{Authentication, BrokerTransportFailure, SSL};
        let refused = [
            (Authentication, "sasl_ssl://h:9092/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"),
            (SSL, "ssl://h:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified"),
            (SSL, "ssl://h:9093/bootstrap: SSL handshake failed: ssl/record/ssl3_record.c:354: error:0A00010B:SSL routines::wrong version number"),
        ];
        for (code, reason) in refused {
            assert!(refusal_setting(Some(code), reason).is_some(), "{reason}");
        }
        let transient = [
            (SSL, "ssl://h:9093/bootstrap: SSL handshake failed: Disconnected: connection reset by peer"),
            (SSL, "ssl://h:9093/bootstrap: SSL transport error: Connection timed out (after 5001ms)"),
            (Authentication, "sasl_ssl://h:9092/bootstrap: Failed to initialize SASL authentication: SASL Handshake not supported by broker (timed out)"),
            (BrokerTransportFailure, "h:9092/bootstrap: Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?) or broker version is < 0.10"),
        ];
        for (code, reason) in transient {
            assert_eq!(refusal_setting(Some(code), reason), None, "{reason}");
        }
    }

    /// Settings as written here, whatever `BIOFEED_…` the environment of the test holds.
    fn kafka(protocol: SecurityProtocol, mechanism: SaslMechanism) -> KafkaSettings {
        KafkaSettings {
            brokers: "h:9092".to_owned(),
            connect_timeout: Duration::from_secs(5),
            security_protocol: protocol,
            sasl_mechanism: mechanism,
            user: Some("u".to_owned()),
            password: Some(Secret::from("p".to_owned())),
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    #[test]
    fn plain_passwords_never_cross_the_wire_in_the_clear() {
        let clear = kafka(SecurityProtocol::SaslPlaintext, SaslMechanism::Plain);
        let refused = clear.client_config().unwrap_err();
        assert!(refused.to_string().contains("PLAIN"), "{refused}");
        let tls = kafka(SecurityProtocol::SaslSsl, SaslMechanism::Plain);
        assert!(tls.client_config().is_ok());
        let scram = kafka(SecurityProtocol::SaslSsl, SaslMechanism::ScramSha512);
        assert_eq!(
            scram.security_summary(),
            "sasl_ssl SCRAM-SHA-512 as u, system CAs"
        );
        let mut nameless = scram.clone();
        nameless.user = None;
        assert!(nameless.client_config().is_err(), "SASL without a user");
    }

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
