//! The gateway's settings: where it listens, its limits, and the services it uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use biofeed_accounts::login::LoginSettings;
use biofeed_accounts::passwords::PasswordSettings;
use biofeed_accounts::policy::ConsentSettings;
use biofeed_accounts::AccountKeys;
use biofeed_backends::clickhouse::ClickHouseSettings;
use biofeed_backends::kafka::{KafkaSettings, TopicNames};
use biofeed_backends::parse_duration;
use biofeed_backends::postgres::PostgresSettings;

/// Everything `biofeed gateway` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewaySettings {
    /// Address the HTTP server listens on.
    #[arg(
        long = "listen",
        id = "gateway_listen",
        value_name = "ADDR",
        env = "BIOFEED_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,

    /// Largest request body, in bytes, after decompression; larger bodies get 413.
    #[arg(long = "max-body-bytes", id = "gateway_max_body", value_name = "BYTES", env = "BIOFEED_GATEWAY_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=(1 << 30)))]
    pub max_body_bytes: u64,

    /// Most samples in one frame; larger frames get 413.
    #[arg(long = "max-samples-per-frame", id = "gateway_max_samples", value_name = "N", env = "BIOFEED_GATEWAY_MAX_SAMPLES_PER_FRAME", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_samples_per_frame: u32,

    /// Most point requests handled at once; beyond it the gateway answers 429 (backpressure
    /// instead of unbounded memory: at most this many bodies of max-body-bytes are held).
    #[arg(long = "max-in-flight", id = "gateway_max_in_flight", value_name = "N", env = "BIOFEED_GATEWAY_MAX_IN_FLIGHT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight: u32,

    /// How far in the future a sample's timestamp may be (device clocks drift).
    #[arg(long = "max-clock-skew", id = "gateway_max_clock_skew", value_name = "DURATION", env = "BIOFEED_GATEWAY_MAX_CLOCK_SKEW", default_value = "5s", value_parser = parse_duration)]
    pub max_clock_skew: Duration,

    /// How long a session may stay open; after it, the jobs runner expires it and purges its points.
    #[arg(long = "session-deadline", id = "gateway_session_deadline", value_name = "DURATION", env = "BIOFEED_SESSION_DEADLINE", default_value = "4h", value_parser = parse_duration)]
    pub session_deadline: Duration,

    /// How long a device token's check is cached; a revoked token stops working within this time.
    #[arg(long = "auth-cache-ttl", id = "gateway_auth_cache_ttl", value_name = "DURATION", env = "BIOFEED_GATEWAY_AUTH_CACHE_TTL", default_value = "2s", value_parser = parse_duration)]
    pub auth_cache_ttl: Duration,

    /// How long a session's facts (owner, open or closed, data types) are cached for the frames
    /// that follow; another gateway's complete or abort reaches this one within it (this
    /// gateway's own act at once). Each expiry costs one Postgres query per streaming device.
    #[arg(long = "session-cache-ttl", id = "gateway_session_cache_ttl", value_name = "DURATION", env = "BIOFEED_GATEWAY_SESSION_CACHE_TTL", default_value = "2s", value_parser = parse_duration)]
    pub session_cache_ttl: Duration,

    /// How long to wait for Kafka to acknowledge a frame before answering 503.
    #[arg(long = "produce-timeout", id = "gateway_produce_timeout", value_name = "DURATION", env = "BIOFEED_GATEWAY_PRODUCE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub produce_timeout: Duration,

    /// The version of the terms of use that sign-up must accept (recorded with the time).
    #[arg(
        long = "terms-version",
        id = "terms_version",
        value_name = "VERSION",
        env = "BIOFEED_TERMS_VERSION",
        default_value = "2026-11-01"
    )]
    pub terms_version: String,

    /// Most raw points (or downsampled buckets) one read of a session's points returns; the
    /// answer says where to continue.
    #[arg(long = "max-read-points", id = "gateway_max_read_points", value_name = "N", env = "BIOFEED_GATEWAY_MAX_READ_POINTS", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_read_points: u32,

    /// Marks the web app's login cookie `Secure` although the gateway serves plain HTTP: set it
    /// when a TLS-terminating proxy is in front (a gateway serving HTTPS itself always does).
    #[arg(long = "secure-cookies", id = "gateway_secure_cookies", env = "BIOFEED_GATEWAY_SECURE_COOKIES", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub secure_cookies: bool,

    /// HTTPS: the certificate and key, and HSTS.
    #[command(flatten, next_help_heading = "HTTPS")]
    pub tls: TlsSettings,

    /// Logins: token lifetime and the failed-login throttle.
    #[command(flatten, next_help_heading = "Logins")]
    pub login: LoginSettings,

    /// Password hashing cost.
    #[command(flatten, next_help_heading = "Logins")]
    pub passwords: PasswordSettings,

    /// Consent ages.
    #[command(flatten, next_help_heading = "Minors")]
    pub consent: ConsentSettings,

    /// Where Postgres is.
    #[command(flatten, next_help_heading = "Postgres")]
    pub postgres: PostgresSettings,

    /// Where ClickHouse is (for reading points back).
    #[command(flatten, next_help_heading = "ClickHouse")]
    pub clickhouse: ClickHouseSettings,

    /// Where Kafka is.
    #[command(flatten, next_help_heading = "Kafka")]
    pub kafka: KafkaSettings,

    /// The topics' names.
    #[command(flatten, next_help_heading = "Kafka")]
    pub topics: TopicNames,

    /// How frames are framed on the points topic: `confluent` (magic byte 0 and the schema's
    /// registry id, what Kafka Connect, kcat, ClickHouse's AvroConfluent and Confluent clients
    /// read; needs the registry), `single-object` (Avro's C3 01 and the schema's fingerprint;
    /// needs nothing), or `auto`: confluent when a registry is configured. Consumers read both,
    /// so gateways can switch one at a time.
    #[arg(
        long = "framing",
        id = "gateway_framing",
        value_name = "FRAMING",
        env = "BIOFEED_GATEWAY_FRAMING",
        default_value = "auto",
        value_enum,
        help_heading = "Schema registry"
    )]
    pub framing: FramingChoice,

    /// The schema registry, where the gateway looks its schema's id up once at start.
    #[command(flatten, next_help_heading = "Schema registry")]
    pub registry: biofeed_backends::registry::RegistrySettings,

    /// PII keys.
    #[command(flatten, next_help_heading = "Keys")]
    pub keys: AccountKeys,
}

impl GatewaySettings {
    /// Where the services are, as the other parts of one process (`biofeed up`) take them.
    pub fn stores(&self) -> biofeed_backends::StoreSettings {
        biofeed_backends::StoreSettings {
            postgres: self.postgres.clone(),
            clickhouse: self.clickhouse.clone(),
            kafka: self.kafka.clone(),
            topics: self.topics.clone(),
            registry: self.registry.clone(),
        }
    }
}

/// The `--framing` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FramingChoice {
    /// Confluent when a schema registry is configured, else single-object.
    Auto,
    /// The Confluent wire format (needs a schema registry).
    Confluent,
    /// Avro single-object encoding.
    SingleObject,
}

/// HTTPS served by the gateway itself. Without a certificate it serves plain HTTP, for a
/// terminating proxy (load balancer, ingress) in front of it: that proxy must then send HSTS.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsSettings {
    /// PEM file with the server certificate, then its intermediates; with it (and the key) the
    /// gateway serves HTTPS only, HTTP/1.1 and h2. Re-read, with the key, on SIGHUP: new
    /// connections get the new certificate, open ones keep theirs, nothing is dropped.
    #[arg(
        long = "tls-cert-file",
        id = "gateway_tls_cert_file",
        value_name = "FILE",
        env = "BIOFEED_GATEWAY_TLS_CERT_FILE",
        requires = "gateway_tls_key_file"
    )]
    pub cert_file: Option<PathBuf>,

    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long = "tls-key-file",
        id = "gateway_tls_key_file",
        value_name = "FILE",
        env = "BIOFEED_GATEWAY_TLS_KEY_FILE",
        requires = "gateway_tls_cert_file"
    )]
    pub key_file: Option<PathBuf>,

    /// The `max-age` of the Strict-Transport-Security header on every HTTPS answer (0s tells
    /// browsers to forget it). Sent only when the gateway serves HTTPS itself; behind a
    /// terminating proxy the proxy must set it.
    #[arg(long = "hsts-max-age", id = "gateway_hsts_max_age", value_name = "DURATION", env = "BIOFEED_GATEWAY_HSTS_MAX_AGE", default_value = "365days", value_parser = parse_max_age)]
    pub hsts_max_age: Duration,
}

impl TlsSettings {
    /// The certificate's and key's files, when HTTPS is configured (clap requires both or
    /// neither).
    pub fn files(&self) -> Option<crate::tls::TlsFiles> {
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

/// A duration that may be zero (HSTS's `max-age=0` withdraws it).
fn parse_max_age(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("'{value}' is not a duration ({e}); write e.g. 365days, 1h, 0s"))
}
