//! ClickHouse settings and a client that has proved the server answers.

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::failover::Failover;
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
    /// managed services) verifies the server's certificate and host name. For a cluster, the
    /// nodes' URLs separated by commas: a new connection goes to the first that answers, in
    /// this order, so give every service the same order (docs/operations.md, "Clusters").
    #[arg(
        long = "clickhouse-url", id = "clickhouse_url",
        value_name = "URL[,URL…]",
        env = "BIOFEED_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123",
        value_parser = crate::secret::refusing_url("BIOFEED_CLICKHOUSE_URL", "--clickhouse-url", parse_clickhouse_urls),
        hide_env_values = true
    )]
    pub url: ClickHouseNodes,

    /// The cluster (the servers' `<remote_servers>`) biofeed's tables are sharded and
    /// replicated over: `biofeed migrate` creates them `ON CLUSTER` as Replicated… local
    /// tables with Distributed tables over them, and every service then reads and writes
    /// through those. Unset: one server, plain tables.
    #[arg(
        long = "clickhouse-cluster", id = "clickhouse_cluster",
        value_name = "NAME",
        env = "BIOFEED_CLICKHOUSE_CLUSTER",
        value_parser = parse_identifier
    )]
    pub cluster: Option<String>,

    /// A cluster listing every replica of BIOFEED_CLICKHOUSE_CLUSTER as a shard of its own:
    /// purge and erasure count what is left on every replica through it. Default
    /// `<cluster>_replicas`.
    #[arg(
        long = "clickhouse-replicas-cluster", id = "clickhouse_replicas_cluster",
        value_name = "NAME",
        env = "BIOFEED_CLICKHOUSE_REPLICAS_CLUSTER",
        requires = "clickhouse_cluster",
        value_parser = parse_identifier
    )]
    pub replicas_cluster: Option<String>,

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
            .field("url", &self.url.redacted())
            .field("user", &self.user)
            .field("database", &self.database)
            .field("cluster", &self.cluster)
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
    cluster: Option<Cluster>,
}

/// The clusters a clustered deployment uses (BIOFEED_CLICKHOUSE_CLUSTER).
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The cluster the tables are sharded and replicated over.
    pub name: String,
    /// The cluster with every replica as a shard of its own.
    pub replicas: String,
}

/// Tables that a cluster keeps whole on every node (one replicated table, no Distributed
/// table over it): they are small, and the analysts' views filter the points of each shard by
/// them locally. Every other table is sharded: `<table>_local` on each node and a Distributed
/// `<table>` over them.
pub const ON_EVERY_NODE: &[&str] = &["session_facts", "schema_migrations"];

/// How long an `ON CLUSTER` statement waits for every node before it fails (it still runs on
/// the nodes that were down once they return).
const DDL_TASK_TIMEOUT_SECS: u32 = 60;

impl ClickHouse {
    /// A client whose queries run in biofeed's database. In a cluster, a client of a user who
    /// may change settings inserts into Distributed tables synchronously
    /// (`insert_distributed_sync`): an insert returns only when every shard holds its part, so
    /// that what is acknowledged (e.g. a Kafka offset committed) is really stored.
    pub fn client(&self) -> clickhouse::Client {
        self.server.clone().with_database(&self.database)
    }

    /// The cluster, if biofeed's tables are sharded over one.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// `ALTER TABLE … DELETE WHERE condition` for a table of biofeed's database: on a
    /// cluster, against the local table on every node (`ON CLUSTER` the replicas cluster), since
    /// a Distributed table cannot be altered. ClickHouse applies it in the background: check
    /// with [`ClickHouse::rows_left_sql`].
    ///
    /// Every replica issues the mutation itself (its replicas cluster has it as a shard of its
    /// own), so each shard's replicated table gets it twice, which deletes nothing more. Not
    /// `ON CLUSTER` the sharded cluster: there ClickHouse 18.16 lets one replica of a shard run
    /// the statement for both, and a replica that was down meanwhile stops with "Node exists"
    /// when it comes back and reads the statement from the queue.
    pub fn delete_sql(&self, table: &str, condition: &str) -> String {
        match &self.cluster {
            None => format!("ALTER TABLE {table} DELETE WHERE {condition}"),
            Some(cluster) => format!(
                "ALTER TABLE {db}.{local} ON CLUSTER {replicas} DELETE WHERE {condition}",
                db = self.database,
                local = local_table(table),
                replicas = cluster.replicas,
            ),
        }
    }

    /// A query counting the rows of `table` matching `condition` on every replica of every
    /// shard (on one server: in its table): a deletion is done when it answers 0. On a
    /// cluster it fails while a replica is down, since that replica may still hold the rows.
    pub fn rows_left_sql(&self, table: &str, condition: &str) -> String {
        match &self.cluster {
            None => format!("SELECT count() FROM {table} WHERE {condition}"),
            Some(cluster) => format!(
                "SELECT count() FROM cluster({replicas}, {db}, {local}) WHERE {condition}",
                replicas = cluster.replicas,
                db = self.database,
                local = local_table(table),
            ),
        }
    }

    /// Bytes on disk of one copy of `table` (biofeed's database, active parts): on a cluster,
    /// what every replica holds divided by the replicas per shard.
    pub async fn bytes_on_disk(&self, table: &str) -> Result<u64, clickhouse::error::Error> {
        let Some(cluster) = &self.cluster else {
            return self
                .server
                .query("SELECT sum(bytes_on_disk) FROM system.parts WHERE database = ? AND table = ? AND active")
                .bind(&self.database)
                .bind(table)
                .fetch_one()
                .await;
        };
        let all: u64 = self
            .server
            .query(&format!(
                "SELECT sum(bytes_on_disk) FROM cluster({}, system, parts) WHERE database = ? AND table = ? AND active",
                cluster.replicas
            ))
            .bind(&self.database)
            .bind(local_table(table))
            .fetch_one()
            .await?;
        let (nodes, shards): (u64, u64) = self
            .server
            .query("SELECT count(), uniqExact(shard_num) FROM system.clusters WHERE cluster = ?")
            .bind(&cluster.name)
            .fetch_one()
            .await?;
        Ok(all * shards / nodes.max(1))
    }

    /// `query` with the settings of a statement that may run `ON CLUSTER`: wait at most a
    /// minute for every node, and answer only at the end, so that a node's failure is an error
    /// and not a 200 with an exception in its body. Unchanged on one server.
    pub fn ddl(&self, query: clickhouse::query::Query) -> clickhouse::query::Query {
        if self.cluster.is_none() {
            return query;
        }
        query
            .with_setting(
                "distributed_ddl_task_timeout",
                DDL_TASK_TIMEOUT_SECS.to_string(),
            )
            .with_setting("wait_end_of_query", "1")
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
        let nodes = match self.url.all().len() {
            1 => String::new(),
            n => format!(" to {n} nodes"),
        };
        let trust = match (&self.ca_file, scheme) {
            (_, "http") => String::new(),
            (Some(ca), _) => format!(" (CA {})", ca.display()),
            (None, _) => " (system CAs)".to_owned(),
        };
        format!("{scheme}{trust}{nodes} as {}", self.user)
    }

    /// Asks the server for its version within the connect timeout. A refused password or
    /// certificate is [`BackendError::Rejected`].
    #[tracing::instrument(skip(self), fields(address = %self.url.redacted()))]
    pub async fn connect(&self) -> Result<ClickHouse, BackendError> {
        let target = Target::new(Service::ClickHouse, URL_SETTING, self.url.redacted());
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
                .build(Failover::new(self.connector()?, &self.url));
        // Validation of row types is off: ClickHouse 18.16 (Debian's package) rejects the
        // setting the crate uses for it ("Unknown setting describe_include_subcolumns").
        let server = clickhouse::Client::with_http_client(http)
            .with_url(self.url.first().as_str())
            .with_user(&self.user)
            .with_password(self.password())
            .with_compression(match self.compression {
                WireCompression::Lz4 => clickhouse::Compression::Lz4,
                WireCompression::None => clickhouse::Compression::None,
            })
            .with_validation(false);
        let probe = server.query("SELECT version()").fetch_one::<String>();
        let version = target.within(self.connect_timeout, probe, refusal).await?;
        let (server, cluster) = match &self.cluster {
            None => (server, None),
            Some(name) => {
                let cluster = Cluster {
                    name: name.clone(),
                    replicas: self
                        .replicas_cluster
                        .clone()
                        .unwrap_or_else(|| format!("{name}_replicas")),
                };
                let may_set =
                    check_cluster(&server, &cluster, &target, self.connect_timeout).await?;
                // Reads and writes of the Distributed tables go to the replicas in the
                // cluster's order (the local one first), so that a read finds what this
                // process wrote a moment before rather than a replica still fetching it.
                // Users who may not set it (readonly=1) get it from their profile.
                let server = if may_set {
                    server
                        .with_setting("insert_distributed_sync", "1")
                        .with_setting("load_balancing", "in_order")
                } else {
                    server
                };
                (server, Some(cluster))
            }
        };
        Ok(ClickHouse {
            server,
            database: self.database.clone(),
            analyst_database,
            version,
            cluster,
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
        if matches!(server_code(message), Some(192..=195 | 516)) {
            // The server's text names the user but not the password.
            return Some(message.lines().next().unwrap_or_default().to_owned());
        }
    }
    None
}

/// Checks that both clusters exist and list the same nodes, and says whether this user may
/// change settings (readonly=1 users may not, and do not insert).
async fn check_cluster(
    server: &clickhouse::Client,
    cluster: &Cluster,
    target: &Target,
    timeout: Duration,
) -> Result<bool, BackendError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Node {
        cluster: String,
        host: String,
        port: u16,
    }
    let nodes = server
        .query(
            "SELECT cluster, host_name AS host, port FROM system.clusters \
             WHERE cluster IN (?, ?) ORDER BY host, port",
        )
        .bind(&cluster.name)
        .bind(&cluster.replicas)
        .fetch_all::<Node>();
    let nodes = target.within(timeout, nodes, refusal).await?;
    let of = |name: &str| -> Vec<(String, u16)> {
        nodes
            .iter()
            .filter(|n| n.cluster == name)
            .map(|n| (n.host.clone(), n.port))
            .collect()
    };
    let (sharded, replicas) = (of(&cluster.name), of(&cluster.replicas));
    if sharded.is_empty() {
        return Err(BackendError::Misconfigured {
            setting: "BIOFEED_CLICKHOUSE_CLUSTER",
            reason: format!(
                "the server knows no cluster '{}' (system.clusters; <remote_servers> in its configuration)",
                cluster.name
            ),
        });
    }
    if replicas != sharded {
        return Err(BackendError::Misconfigured {
            setting: "BIOFEED_CLICKHOUSE_REPLICAS_CLUSTER",
            reason: format!(
                "cluster '{}' must list exactly the {} nodes of cluster '{}', each as a shard of its own; the server has {} there",
                cluster.replicas,
                sharded.len(),
                cluster.name,
                replicas.len()
            ),
        });
    }
    let readonly = server
        .query("SELECT value FROM system.settings WHERE name = 'readonly'")
        .fetch_one::<String>();
    let readonly = target.within(timeout, readonly, refusal).await?;
    Ok(readonly != "1")
}

/// Whether a ClickHouse error may pass by itself: the server or a node behind it away, slow or
/// busy (timeouts, network errors, no replica of a shard answering, a replica read-only while it
/// lost ZooKeeper), as opposed to a refused statement.
pub fn is_transient(error: &clickhouse::error::Error) -> bool {
    use clickhouse::error::Error;
    match error {
        Error::Network(_) | Error::TimedOut => true,
        Error::BadResponse(message) => matches!(
            server_code(message),
            // ATTEMPT_TO_READ_AFTER_EOF, CANNOT_READ_ALL_DATA (a node died mid-answer),
            // TIMEOUT_EXCEEDED, TOO_MANY_SIMULTANEOUS_QUERIES, NO_FREE_CONNECTION,
            // SOCKET_TIMEOUT, NETWORK_ERROR, NO_ZOOKEEPER, ABORTED, TABLE_IS_READ_ONLY,
            // TOO_MANY_PARTS, ALL_CONNECTION_TRIES_FAILED, UNKNOWN_STATUS_OF_INSERT,
            // QUERY_WAS_CANCELLED, KEEPER_EXCEPTION
            Some(
                32 | 33
                    | 159
                    | 202
                    | 203
                    | 209
                    | 210
                    | 225
                    | 236
                    | 242
                    | 252
                    | 279
                    | 319
                    | 394
                    | 999
            )
        ),
        _ => false,
    }
}

/// The `Code: N` a server error starts with.
fn server_code(message: &str) -> Option<u32> {
    message
        .trim_start()
        .strip_prefix("Code: ")
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|code| code.parse::<u32>().ok())
}

/// The table that holds a table's rows on each node of a cluster.
pub fn local_table(table: &str) -> String {
    if ON_EVERY_NODE.contains(&table) {
        table.to_owned()
    } else {
        format!("{table}_local")
    }
}

/// One ClickHouse URL, or the URLs of several nodes of a cluster, in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseNodes(Vec<Url>);

impl ClickHouseNodes {
    /// The first node's URL, the one requests are addressed to (the connector may take them to
    /// another node when it does not answer).
    pub fn first(&self) -> &Url {
        &self.0[0]
    }

    /// Every node's URL, in order.
    pub fn all(&self) -> &[Url] {
        &self.0
    }

    /// The nodes' scheme (all share one).
    pub fn scheme(&self) -> &str {
        self.0[0].scheme()
    }

    /// The addresses, without anything secret, for logs and errors.
    pub fn redacted(&self) -> String {
        self.0
            .iter()
            .map(redacted_address)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl std::fmt::Display for ClickHouseNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self.0.iter().map(Url::as_str).collect();
        f.write_str(&urls.join(","))
    }
}

impl std::str::FromStr for ClickHouseNodes {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        parse_clickhouse_urls(value)
    }
}

/// Accepts one ClickHouse URL or several separated by commas (the nodes of a cluster), all
/// with the same scheme, none twice.
pub fn parse_clickhouse_urls(value: &str) -> Result<ClickHouseNodes, String> {
    let parts: Vec<&str> = value.split(',').map(str::trim).collect();
    let mut urls: Vec<Url> = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let url = parse_clickhouse_url(part).map_err(|reason| {
            if parts.len() == 1 {
                reason
            } else {
                format!("URL {} of {}: {reason}", i + 1, parts.len())
            }
        })?;
        if urls.iter().any(|u| u.scheme() != url.scheme()) {
            return Err("mixes http:// and https:// nodes: give every node the same".to_owned());
        }
        if urls.contains(&url) {
            return Err(format!("names {} twice", redacted_address(&url)));
        }
        urls.push(url);
    }
    Ok(ClickHouseNodes(urls))
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
    fn a_cluster_is_given_as_its_nodes_urls_in_order() {
        let nodes = parse_clickhouse_urls("https://a:8443, https://b:8443,https://c:8444").unwrap();
        assert_eq!(nodes.all().len(), 3);
        assert_eq!(nodes.first().host_str(), Some("a"));
        assert_eq!(
            nodes.to_string(),
            "https://a:8443/,https://b:8443/,https://c:8444/"
        );
        assert_eq!(nodes.to_string().parse::<ClickHouseNodes>().unwrap(), nodes);
        let mixed = parse_clickhouse_urls("https://a:8443,http://b:8123").unwrap_err();
        assert!(mixed.contains("mixes"), "{mixed}");
        let twice = parse_clickhouse_urls("https://a:8443,https://a:8443").unwrap_err();
        assert!(twice.contains("twice"), "{twice}");
        let bad = parse_clickhouse_urls("https://a:8443,b:8443").unwrap_err();
        assert!(bad.starts_with("URL 2 of 2"), "{bad}");
    }

    #[test]
    fn transient_errors_are_told_from_refused_statements() {
        use clickhouse::error::Error;
        let bad = |text: &str| Error::BadResponse(text.to_owned());
        assert!(is_transient(&bad(
            "Code: 279, e.displayText() = DB::NetException: All connection tries failed."
        )));
        assert!(is_transient(&bad("Code: 159, e.displayText() = DB::Exception: Watching task /clickhouse/task_queue/ddl/query-0000000001 is executing longer than distributed_ddl_task_timeout")));
        assert!(is_transient(&Error::TimedOut));
        assert!(!is_transient(&bad(
            "Code: 62, e.displayText() = DB::Exception: Syntax error"
        )));
        assert!(!is_transient(&bad(
            "Code: 60, e.displayText() = DB::Exception: Table biofeed.points doesn't exist."
        )));
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
