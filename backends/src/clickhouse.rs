//! ClickHouse settings and a client that has proved the server answers.

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::secret::{readable_file, secret_file, Secret};
use crate::{redacted_address, BackendError, Service, Target};

/// How long an idle connection to ClickHouse is kept for reuse: below the server's own
/// keep-alive timeout (3 s by default), so that we never send on a connection it closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The environment variable naming the ClickHouse URL; errors name it.
pub const URL_SETTING: &str = "BIOFEED_CLICKHOUSE_URL";

/// Where ClickHouse is, who we are there, and how long to wait for it.
#[derive(Clone, clap::Args)]
pub struct ClickHouseSettings {
    /// ClickHouse HTTP interface URL (points, rollups, session metrics): https:// (port 8443 on
    /// managed services) verifies the server's certificate and host name.
    #[arg(
        long = "clickhouse-url", id = "clickhouse_url",
        value_name = "URL",
        env = "BIOFEED_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123",
        value_parser = crate::secret::refusing_url("BIOFEED_CLICKHOUSE_URL", "--clickhouse-url", parse_clickhouse_url),
        hide_env_values = true
    )]
    pub url: Url,

    /// ClickHouse user.
    #[arg(
        long = "clickhouse-user",
        id = "clickhouse_user",
        value_name = "USER",
        env = "BIOFEED_CLICKHOUSE_USER",
        default_value = "default"
    )]
    pub user: String,

    /// ClickHouse password (empty for none). Never logged. Or give BIOFEED_CLICKHOUSE_PASSWORD_FILE.
    #[arg(
        long = "clickhouse-password",
        id = "clickhouse_password",
        value_name = "PASSWORD",
        env = "BIOFEED_CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub password: String,

    /// A file holding the ClickHouse password (e.g. a mounted secret) instead of
    /// BIOFEED_CLICKHOUSE_PASSWORD.
    #[arg(
        long = "clickhouse-password-file",
        id = "clickhouse_password_file",
        value_name = "PATH",
        env = "BIOFEED_CLICKHOUSE_PASSWORD_FILE",
        conflicts_with = "clickhouse_password",
        value_parser = secret_file("BIOFEED_CLICKHOUSE_PASSWORD_FILE")
    )]
    pub password_file: Option<Secret>,

    /// PEM file of the CA certificate(s) that signed ClickHouse's certificate, for https://
    /// URLs; without it, the system's roots.
    #[arg(
        long = "clickhouse-ca-file", id = "clickhouse_ca_file",
        value_name = "PATH",
        env = "BIOFEED_CLICKHOUSE_CA_FILE",
        value_parser = readable_file("BIOFEED_CLICKHOUSE_CA_FILE")
    )]
    pub ca_file: Option<PathBuf>,

    /// ClickHouse database that holds biofeed's tables; `biofeed migrate` creates it.
    #[arg(
        long = "clickhouse-database", id = "clickhouse_database",
        value_name = "NAME",
        env = "BIOFEED_CLICKHOUSE_DATABASE",
        default_value = "biofeed",
        value_parser = parse_identifier
    )]
    pub database: String,

    /// The database analysts may read (ClickHouse 18.16: Distributed tables over biofeed's
    /// pseudonymous views, made by `biofeed migrate`); default `<database>_analyst`.
    #[arg(
        long = "clickhouse-analyst-database", id = "clickhouse_analyst_database",
        value_name = "NAME",
        env = "BIOFEED_CLICKHOUSE_ANALYST_DATABASE",
        value_parser = parse_identifier
    )]
    pub analyst_database: Option<String>,

    /// Compression of inserts and results on the wire: lz4 saves network on real links, none
    /// saves CPU on loopback.
    #[arg(
        long = "clickhouse-compression",
        id = "clickhouse_compression",
        value_name = "KIND",
        env = "BIOFEED_CLICKHOUSE_COMPRESSION",
        default_value = "lz4",
        value_enum
    )]
    pub compression: WireCompression,

    /// How long to wait for ClickHouse to answer before failing.
    #[arg(
        long = "clickhouse-connect-timeout", id = "clickhouse_connect_timeout",
        value_name = "DURATION",
        env = "BIOFEED_CLICKHOUSE_CONNECT_TIMEOUT",
        default_value = "5s",
        value_parser = crate::parse_duration
    )]
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ClickHouseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseSettings")
            .field("url", &redacted_address(&self.url))
            .field("user", &self.user)
            .field("database", &self.database)
            .field("ca_file", &self.ca_file)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Compression of data between biofeed and ClickHouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireCompression {
    /// LZ4 (ClickHouse's native block compression).
    Lz4,
    /// None.
    None,
}

/// A ClickHouse server that answered, with the version it reported.
#[derive(Clone)]
pub struct ClickHouse {
    server: clickhouse::Client,
    database: String,
    analyst_database: String,
    version: String,
}

impl ClickHouse {
    /// A client whose queries run in biofeed's database.
    pub fn client(&self) -> clickhouse::Client {
        self.server.clone().with_database(&self.database)
    }

    /// A client without a default database, for statements such as `CREATE DATABASE`.
    pub fn server_client(&self) -> &clickhouse::Client {
        &self.server
    }

    /// biofeed's database name.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The analysts' database (never biofeed's own).
    pub fn analyst_database(&self) -> &str {
        &self.analyst_database
    }

    /// The server's version string, e.g. `18.16.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The server's major version (18 for the Debian package, 24+ for current releases).
    pub fn major_version(&self) -> u32 {
        self.version
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or(0)
    }
}

impl ClickHouseSettings {
    /// The password: from BIOFEED_CLICKHOUSE_PASSWORD_FILE if given, else
    /// BIOFEED_CLICKHOUSE_PASSWORD. For clients other than [`ClickHouseSettings::connect`]'s.
    pub fn password(&self) -> &str {
        self.password_file
            .as_ref()
            .map_or(self.password.as_str(), Secret::expose)
    }

    /// How this process talks to ClickHouse, for reports, e.g. `https (CA /etc/ca.pem) as
    /// biofeed_writer` (never the password).
    pub fn security_summary(&self) -> String {
        let scheme = self.url.scheme();
        let trust = match (&self.ca_file, scheme) {
            (_, "http") => String::new(),
            (Some(ca), _) => format!(" (CA {})", ca.display()),
            (None, _) => " (system CAs)".to_owned(),
        };
        format!("{scheme}{trust} as {}", self.user)
    }

    /// Asks the server for its version within the connect timeout. A refused password or
    /// certificate is [`BackendError::Rejected`].
    #[tracing::instrument(skip(self), fields(address = %redacted_address(&self.url)))]
    pub async fn connect(&self) -> Result<ClickHouse, BackendError> {
        let target = Target::new(
            Service::ClickHouse,
            URL_SETTING,
            redacted_address(&self.url),
        );
        let analyst_database = self
            .analyst_database
            .clone()
            .unwrap_or_else(|| format!("{}_analyst", self.database));
        if analyst_database == self.database {
            return Err(BackendError::Misconfigured {
                setting: "BIOFEED_CLICKHOUSE_ANALYST_DATABASE",
                reason: "must differ from BIOFEED_CLICKHOUSE_DATABASE: analysts may not read biofeed's own tables".to_owned(),
            });
        }
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .build(self.connector()?);
        // Validation of row types is off: ClickHouse 18.16 (Debian's package) rejects the
        // setting the crate uses for it ("Unknown setting describe_include_subcolumns").
        let server = clickhouse::Client::with_http_client(http)
            .with_url(self.url.as_str())
            .with_user(&self.user)
            .with_password(self.password())
            .with_compression(match self.compression {
                WireCompression::Lz4 => clickhouse::Compression::Lz4,
                WireCompression::None => clickhouse::Compression::None,
            })
            .with_validation(false);
        let probe = server.query("SELECT version()").fetch_one::<String>();
        let version = target.within(self.connect_timeout, probe, refusal).await?;
        Ok(ClickHouse {
            server,
            database: self.database.clone(),
            analyst_database,
            version,
        })
    }
}

impl ClickHouseSettings {
    /// The HTTP client: rustls (ring) for https:// URLs, trusting BIOFEED_CLICKHOUSE_CA_FILE or
    /// the system's roots; plain HTTP for http:// ones.
    fn connector(
        &self,
    ) -> Result<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        BackendError,
    > {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.set_connect_timeout(Some(self.connect_timeout));
        http.enforce_http(false);
        let tls = if self.url.scheme() == "https" {
            crate::tls::client_config(self.ca_file.as_deref(), "BIOFEED_CLICKHOUSE_CA_FILE")
                .map_err(|reason| BackendError::Misconfigured {
                    setting: "BIOFEED_CLICKHOUSE_CA_FILE",
                    reason,
                })?
        } else {
            // Never used for http:// URLs (https_or_http picks by scheme), but the connector
            // wants one.
            crate::tls::empty_client_config()
        };
        Ok(hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http))
    }
}

/// Why ClickHouse refused us, if it did: a TLS refusal, or the server's "unknown user" (192),
/// "wrong password" (193), "required password" (194), "IP address not allowed" (195) or
/// "authentication failed" (516).
fn refusal(error: &clickhouse::error::Error) -> Option<String> {
    if let Some(reason) = crate::tls::refusal(error) {
        return Some(reason);
    }
    if let clickhouse::error::Error::BadResponse(message) = error {
        let code = message
            .trim_start()
            .strip_prefix("Code: ")
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|code| code.parse::<u32>().ok());
        if matches!(code, Some(192..=195 | 516)) {
            // The server's text names the user but not the password.
            return Some(message.lines().next().unwrap_or_default().to_owned());
        }
    }
    None
}

/// Accepts only `http://` or `https://` URLs with a host.
pub fn parse_clickhouse_url(value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http:// or https:// (ClickHouse's HTTP interface), not {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "carries a user or password: give them as BIOFEED_CLICKHOUSE_USER and \
             BIOFEED_CLICKHOUSE_PASSWORD(_FILE) instead"
                .to_owned(),
        );
    }
    Ok(url)
}

/// Accepts a plain SQL identifier: ASCII letters, digits and `_`, not starting with a digit.
pub fn parse_identifier(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with(|c: char| c.is_ascii_digit())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "'{value}' is not a plain identifier (letters, digits and _, at most 64, not starting with a digit)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_urls_are_checked_before_use() {
        assert!(parse_clickhouse_url("http://127.0.0.1:8123").is_ok());
        assert!(parse_clickhouse_url("tcp://127.0.0.1:9000")
            .unwrap_err()
            .contains("scheme"));
        assert!(parse_clickhouse_url("127.0.0.1:8123").is_err());
    }

    #[test]
    fn identifiers_keep_sql_out() {
        assert!(parse_identifier("biofeed_test_1").is_ok());
        assert!(parse_identifier("bio-feed").is_err());
        assert!(parse_identifier("x; DROP TABLE points").is_err());
        assert!(parse_identifier("1abc").is_err());
        assert!(parse_identifier("").is_err());
    }
}
