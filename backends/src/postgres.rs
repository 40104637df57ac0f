//! Postgres settings and a connection pool that fails fast when Postgres is away.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use url::Url;

use crate::{redacted_address, BackendError, Service, Target};

/// The environment variable naming the Postgres URL; errors name it.
pub const URL_SETTING: &str = "BIOFEED_POSTGRES_URL";

/// Where Postgres is and how long to wait for it.
#[derive(Clone, clap::Args)]
pub struct PostgresSettings {
    /// Postgres URL (users, sessions, devices, failed jobs). Credentials in it are never logged.
    #[arg(
        long = "postgres-url", id = "postgres_url",
        value_name = "URL",
        env = "BIOFEED_POSTGRES_URL",
        default_value = "postgres://biofeed:biofeed@127.0.0.1:5432/biofeed",
        value_parser = parse_postgres_url,
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
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &redacted_address(&self.url))
            .field("connect_timeout", &self.connect_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
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

    /// Opens a pool and proves it works with one connection, within the connect timeout.
    #[tracing::instrument(skip(self), fields(address = %redacted_address(&self.url)))]
    pub async fn connect(&self) -> Result<PgPool, BackendError> {
        let target = Target::new(Service::Postgres, URL_SETTING, redacted_address(&self.url));
        let options = PgConnectOptions::from_url(&self.url).map_err(|e| target.failed(e))?;
        // One direct connection first: a pool retries until its timeout and then reports only
        // "timed out", while a single attempt tells "connection refused" or a bad password at once.
        let probe = target
            .within(self.connect_timeout, options.connect())
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
