//! Postgres settings and a connection pool that fails fast when Postgres is away.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection};
use url::Url;

use crate::secret::{readable_file, secret_file, Secret};
use crate::{redacted_address, BackendError, Service, Target};

/// The environment variable naming the Postgres URL; errors name it.
pub const URL_SETTING: &str = "BIOFEED_POSTGRES_URL";

/// Where Postgres is and how long to wait for it.
#[derive(Clone, clap::Args)]
pub struct PostgresSettings {
    /// Postgres URL (users, sessions, devices, failed jobs), libpq style: `sslmode` and
    /// `sslrootcert` may be given in its query (`?sslmode=verify-full&sslrootcert=/ca.pem`).
    /// Credentials in it are never logged.
    #[arg(
        long = "postgres-url", id = "postgres_url",
        value_name = "URL",
        env = "BIOFEED_POSTGRES_URL",
        default_value = "postgres://biofeed:biofeed@127.0.0.1:5432/biofeed",
        value_parser = crate::secret::refusing_url("BIOFEED_POSTGRES_URL", "--postgres-url", parse_postgres_url),
        hide_env_values = true,
        hide_default_value = true
    )]
    pub url: Url,

    /// How long to wait for Postgres to accept a connection before failing.
    #[arg(
        long = "postgres-connect-timeout", id = "postgres_connect_timeout",
        value_name = "DURATION",
        env = "BIOFEED_POSTGRES_CONNECT_TIMEOUT",
        default_value = "5s",
        value_parser = crate::parse_duration
    )]
    pub connect_timeout: Duration,

    /// Largest number of pooled Postgres connections this process holds.
    #[arg(
        long = "postgres-max-connections", id = "postgres_max_connections",
        value_name = "N",
        env = "BIOFEED_POSTGRES_MAX_CONNECTIONS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub max_connections: u32,

    /// TLS towards Postgres, as libpq's sslmode: disable, prefer, require, verify-ca or
    /// verify-full (certificate and host name checked: what a managed Postgres wants).
    /// Overrides `sslmode` in the URL; without either, prefer.
    #[arg(
        long = "postgres-sslmode",
        id = "postgres_sslmode",
        value_name = "MODE",
        env = "BIOFEED_POSTGRES_SSLMODE",
        value_enum
    )]
    pub sslmode: Option<SslMode>,

    /// PEM file of the CA certificate(s) that signed the server's certificate (verify-ca,
    /// verify-full). Overrides `sslrootcert` in the URL.
    #[arg(
        long = "postgres-sslrootcert", id = "postgres_sslrootcert",
        value_name = "PATH",
        env = "BIOFEED_POSTGRES_SSLROOTCERT",
        value_parser = readable_file("BIOFEED_POSTGRES_SSLROOTCERT")
    )]
    pub sslrootcert: Option<PathBuf>,

    /// A file holding the Postgres password (e.g. a mounted secret) instead of one in the URL.
    #[arg(
        long = "postgres-password-file", id = "postgres_password_file",
        value_name = "PATH",
        env = "BIOFEED_POSTGRES_PASSWORD_FILE",
        value_parser = secret_file("BIOFEED_POSTGRES_PASSWORD_FILE")
    )]
    pub password_file: Option<Secret>,
}

/// libpq's `sslmode`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, unverified.
    Prefer,
    /// TLS or nothing, unverified.
    Require,
    /// TLS with the server's certificate checked against the root certificate.
    VerifyCa,
    /// TLS with the certificate and the host name checked.
    VerifyFull,
}

impl SslMode {
    /// libpq's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn to_sqlx(self) -> PgSslMode {
        match self {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        }
    }
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &redacted_address(&self.url))
            .field("connect_timeout", &self.connect_timeout)
            .field("max_connections", &self.max_connections)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .finish_non_exhaustive()
    }
}

impl PostgresSettings {
    /// The same settings pointing at another database on the same server (tests and
    /// `CREATE DATABASE` use this).
    pub fn with_database(&self, database: &str) -> Self {
        let mut url = self.url.clone();
        url.set_path(&format!("/{database}"));
        Self {
            url,
            ..self.clone()
        }
    }

    /// The connection options: the URL, with the TLS and password settings laid over it.
    pub fn connect_options(&self) -> Result<PgConnectOptions, BackendError> {
        let target = Target::new(Service::Postgres, URL_SETTING, redacted_address(&self.url));
        let mut options = PgConnectOptions::from_url(&self.url).map_err(|e| target.failed(e))?;
        if let Some(mode) = self.sslmode {
            options = options.ssl_mode(mode.to_sqlx());
        }
        if let Some(root) = &self.sslrootcert {
            options = options.ssl_root_cert(root);
        }
        if let Some(password) = &self.password_file {
            options = options.password(password.expose());
        }
        Ok(options)
    }

    /// How this process talks to Postgres, for reports, e.g. `sslmode verify-full as
    /// biofeed_app` (never the password).
    pub fn security_summary(&self) -> String {
        let mode = match self.sslmode {
            Some(mode) => mode.as_str().to_owned(),
            None => self
                .url
                .query_pairs()
                .find(|(k, _)| k == "sslmode")
                .map_or_else(|| "prefer".to_owned(), |(_, v)| v.into_owned()),
        };
        format!("sslmode {mode} as {}", self.url.username())
    }

    /// Opens a pool and proves it works with one connection, within the connect timeout. A
    /// refused password or role, a refused certificate, or a server that will not speak TLS
    /// when we require it (or insists when we won't) is [`BackendError::Rejected`].
    #[tracing::instrument(skip(self), fields(address = %redacted_address(&self.url)))]
    pub async fn connect(&self) -> Result<PgPool, BackendError> {
        let target = Target::new(Service::Postgres, URL_SETTING, redacted_address(&self.url));
        let options = self.connect_options()?;
        // One direct connection first: a pool retries until its timeout and then reports only
        // "timed out", while a single attempt tells "connection refused" or a bad password at once.
        let probe = target
            .within(self.connect_timeout, options.connect(), refusal)
            .await?;
        probe.close().await.map_err(|e| target.failed(e))?;
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.connect_timeout)
            .connect_with(options)
            .await
            .map_err(|e| match e {
                sqlx::Error::PoolTimedOut => target.timed_out(self.connect_timeout),
                e => target.failed(e),
            })
    }
}

/// Why Postgres refused us, if it did: TLS (an untrusted or misnamed certificate, a server
/// without TLS when we require it), or authentication and `pg_hba.conf` refusals (SQLSTATE class
/// 28), which include a client without TLS where the server wants TLS only.
fn refusal(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Tls(e) => Some(format!("TLS refused: {e}")),
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("28")) => {
            Some(db.message().to_owned())
        }
        other => crate::tls::refusal(other),
    }
}

/// Accepts only `postgres://` or `postgresql://` URLs with a host and a database.
pub fn parse_postgres_url(value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "scheme must be postgres:// or postgresql://, not {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    if url.path().trim_start_matches('/').is_empty() {
        return Err("names no database: end it with /<database>".to_owned());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_are_checked_before_use() {
        assert!(parse_postgres_url("postgres://u:p@127.0.0.1:5432/biofeed").is_ok());
        assert!(parse_postgres_url("postgresql://h/db").is_ok());
        assert!(parse_postgres_url("not a url")
            .unwrap_err()
            .contains("not a URL"));
        assert!(parse_postgres_url("http://h/db")
            .unwrap_err()
            .contains("scheme"));
        assert!(parse_postgres_url("postgres://h")
            .unwrap_err()
            .contains("database"));
    }
}
