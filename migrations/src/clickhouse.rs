//! ClickHouse migrations: SQL files applied in order, each recorded with its checksum.
//!
//! ClickHouse has no transactions, so a file is applied statement by statement and recorded in
//! `schema_migrations` only after its last statement succeeded; statements use `IF NOT EXISTS`
//! so that a file interrupted half-way can be run again. A file whose checksum differs from the
//! recorded one was edited after it was applied, and the runner refuses to go on.
//!
//! Every statement must run on Debian's ClickHouse 18.16 and on current releases: no
//! DateTime64, codecs, TTL or LowCardinality in these files.
//!
//! A clustered deployment (BIOFEED_CLICKHOUSE_CLUSTER) applies the files of
//! `migrations/clickhouse-cluster` instead: the same versions and names, each making the same
//! tables `ON CLUSTER` as replicated local tables with Distributed tables over them. The ledger
//! is then a replicated table on every node, every statement waits for every node, and the
//! runner checks that every replica holds the same ledger.

use std::path::Path;

use biofeed_backends::clickhouse::ClickHouse;
use sha2::{Digest, Sha256};

use crate::{ItemState, MigrateError, State, StepReport};

/// The migration files compiled into the binary, in the order they apply. A unit test checks
/// that this list and the `migrations/clickhouse` folder agree.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "0001_points.sql",
        include_str!("../clickhouse/0001_points.sql"),
    ),
    (
        "0002_session_facts.sql",
        include_str!("../clickhouse/0002_session_facts.sql"),
    ),
    (
        "0003_analyst_views.sql",
        include_str!("../clickhouse/0003_analyst_views.sql"),
    ),
    (
        "0004_rollups_and_metrics.sql",
        include_str!("../clickhouse/0004_rollups_and_metrics.sql"),
    ),
    (
        "0005_analyst_database.sql",
        include_str!("../clickhouse/0005_analyst_database.sql"),
    ),
];

/// The same migrations for a cluster (see the module's documentation). A unit test checks that
/// both series have the same files.
const EMBEDDED_CLUSTER: &[(&str, &str)] = &[
    (
        "0001_points.sql",
        include_str!("../clickhouse-cluster/0001_points.sql"),
    ),
    (
        "0002_session_facts.sql",
        include_str!("../clickhouse-cluster/0002_session_facts.sql"),
    ),
    (
        "0003_analyst_views.sql",
        include_str!("../clickhouse-cluster/0003_analyst_views.sql"),
    ),
    (
        "0004_rollups_and_metrics.sql",
        include_str!("../clickhouse-cluster/0004_rollups_and_metrics.sql"),
    ),
    (
        "0005_analyst_database.sql",
        include_str!("../clickhouse-cluster/0005_analyst_database.sql"),
    ),
];

/// The cluster (config.xml `<remote_servers>`) the analyst database's Distributed tables query
/// through, as the user `biofeed_analyst_source`.
const ANALYST_SOURCE_CLUSTER: &str = "biofeed_analyst_source";

/// How long the runner waits for every replica's ledger to agree.
const REPLICAS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The runner's own bookkeeping table, in biofeed's database.
const BOOKKEEPING: &str = "schema_migrations";

/// One migration file.
#[derive(Debug, Clone)]
pub struct Migration {
    /// The number the file name starts with.
    pub version: u32,
    /// The file name.
    pub name: String,
    /// The statements, in order.
    pub statements: Vec<String>,
    /// SHA-256 of the file's bytes, hex.
    pub checksum: String,
}

/// An ordered set of ClickHouse migrations.
#[derive(Debug, Clone)]
pub struct ClickHouseMigrations {
    migrations: Vec<Migration>,
    /// Whether these are the `ON CLUSTER` files.
    for_cluster: bool,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct AppliedRow {
    version: u32,
    name: String,
    checksum: String,
}

impl ClickHouseMigrations {
    /// The migrations compiled into this binary, for one server.
    pub fn embedded() -> Result<Self, MigrateError> {
        Self::from_files(
            EMBEDDED
                .iter()
                .map(|(name, sql)| (name.to_string(), sql.to_string())),
        )
    }

    /// The migrations compiled into this binary, for a cluster.
    pub fn embedded_cluster() -> Result<Self, MigrateError> {
        let mut set = Self::from_files(
            EMBEDDED_CLUSTER
                .iter()
                .map(|(name, sql)| (name.to_string(), sql.to_string())),
        )?;
        set.for_cluster = true;
        Ok(set)
    }

    /// The compiled-in migrations for this deployment: the cluster's when
    /// BIOFEED_CLICKHOUSE_CLUSTER is set.
    pub fn embedded_for(ch: &ClickHouse) -> Result<Self, MigrateError> {
        if ch.cluster().is_some() {
            Self::embedded_cluster()
        } else {
            Self::embedded()
        }
    }

    /// The `*.sql` files of a folder, e.g. to check a folder before building it in.
    pub fn from_dir(dir: &Path) -> Result<Self, MigrateError> {
        let unreadable = |reason: String| MigrateError::BadFile {
            name: dir.display().to_string(),
            reason,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| unreadable(e.to_string()))? {
            let path = entry.map_err(|e| unreadable(e.to_string()))?.path();
            if path.extension().is_some_and(|e| e == "sql") {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let sql = std::fs::read_to_string(&path).map_err(|e| unreadable(e.to_string()))?;
                files.push((name, sql));
            }
        }
        Self::from_files(files)
    }

    fn from_files(files: impl IntoIterator<Item = (String, String)>) -> Result<Self, MigrateError> {
        let mut migrations = Vec::new();
        for (name, sql) in files {
            let bad = |reason: &str| MigrateError::BadFile {
                name: name.clone(),
                reason: reason.to_owned(),
            };
            let version = name
                .split_once('_')
                .and_then(|(number, _)| number.parse::<u32>().ok())
                .ok_or_else(|| bad("name must be <number>_<words>.sql"))?;
            let statements = split_statements(&sql);
            if statements.is_empty() {
                return Err(bad("holds no statement"));
            }
            let checksum = hex::encode(Sha256::digest(sql.as_bytes()));
            migrations.push(Migration {
                version,
                name,
                statements,
                checksum,
            });
        }
        migrations.sort_by_key(|m| m.version);
        if let Some(pair) = migrations.windows(2).find(|w| w[0].version == w[1].version) {
            return Err(MigrateError::BadFile {
                name: pair[1].name.clone(),
                reason: format!("has the same version as {}", pair[0].name),
            });
        }
        Ok(Self {
            migrations,
            for_cluster: false,
        })
    }

    /// The migrations, in the order they apply.
    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// Creates biofeed's database when missing and applies every pending migration in order.
    #[tracing::instrument(skip_all, fields(database = ch.database()))]
    pub async fn migrate(&self, ch: &ClickHouse) -> Result<StepReport, MigrateError> {
        let bookkeeping_failed = |source| MigrateError::ClickHouse {
            name: BOOKKEEPING.to_owned(),
            source,
        };
        let on_cluster = self.on_cluster(ch)?;
        check_ledger_layout(ch).await?;
        ch.ddl(ch.server_client().query(&format!(
            "CREATE DATABASE IF NOT EXISTS {}{on_cluster}",
            ch.database()
        )))
        .execute()
        .await
        .map_err(bookkeeping_failed)?;
        let client = ch.client();
        let engine = match ch.cluster() {
            None => "MergeTree".to_owned(),
            Some(_) => format!(
                "ReplicatedMergeTree('/clickhouse/tables/all/{}/{BOOKKEEPING}', '{{replica}}')",
                ch.database()
            ),
        };
        ch.ddl(client.query(&format!(
            "CREATE TABLE IF NOT EXISTS {}.{BOOKKEEPING}{on_cluster} \
             (version UInt32, name String, checksum String, applied_at DateTime) \
             ENGINE = {engine} ORDER BY version",
            ch.database()
        )))
        .execute()
        .await
        .map_err(bookkeeping_failed)?;
        // A replica behind (e.g. back from a restart) must not make us apply again what the
        // others have.
        self.check_replicas(ch).await?;
        let applied = self.check_applied(ch).await?;
        let mut items = Vec::new();
        for migration in &self.migrations {
            if applied.iter().any(|a| a.version == migration.version) {
                items.push(item(migration, State::Present));
                continue;
            }
            if migration.needs_analyst_cluster() && !has_analyst_cluster(ch).await? {
                // Left pending, so that it applies once the cluster exists.
                tracing::warn!(
                    migration = %migration.name,
                    cluster = ANALYST_SOURCE_CLUSTER,
                    "skipped: the server has no such cluster; analysts get SQL grants instead (docs/operations.md)"
                );
                let mut skipped = item(migration, State::Pending);
                skipped.detail = format!("skipped: no cluster {ANALYST_SOURCE_CLUSTER}");
                items.push(skipped);
                continue;
            }
            for statement in &migration.statements {
                let mut statement = statement
                    .replace("{database}", ch.database())
                    .replace("{analyst_database}", ch.analyst_database());
                if let Some(cluster) = ch.cluster() {
                    statement = statement.replace("{cluster}", &cluster.name);
                }
                let query = ch.ddl(client.query(&statement));
                query
                    .execute()
                    .await
                    .map_err(|source| MigrateError::ClickHouse {
                        name: migration.name.clone(),
                        source,
                    })?;
            }
            client
                .query(&format!(
                    "INSERT INTO {BOOKKEEPING} (version, name, checksum, applied_at) VALUES (?, ?, ?, now())"
                ))
                .bind(migration.version)
                .bind(&migration.name)
                .bind(&migration.checksum)
                .execute()
                .await
                .map_err(bookkeeping_failed)?;
            tracing::info!(migration = %migration.name, "applied clickhouse migration");
            items.push(item(migration, State::Applied));
        }
        self.check_replicas(ch).await?;
        Ok(StepReport {
            store: "clickhouse",
            items,
        })
    }

    /// Reports which migrations are applied, changing nothing.
    #[tracing::instrument(skip_all, fields(database = ch.database()))]
    pub async fn status(&self, ch: &ClickHouse) -> Result<StepReport, MigrateError> {
        self.on_cluster(ch)?;
        check_ledger_layout(ch).await?;
        let applied = self.check_applied(ch).await?;
        self.check_replicas(ch).await?;
        let items = self
            .migrations
            .iter()
            .map(|m| {
                let done = applied.iter().any(|a| a.version == m.version);
                item(m, if done { State::Present } else { State::Pending })
            })
            .collect();
        Ok(StepReport {
            store: "clickhouse",
            items,
        })
    }

    /// ` ON CLUSTER <name>` for a cluster, or nothing; refuses files made for the other layout.
    fn on_cluster(&self, ch: &ClickHouse) -> Result<String, MigrateError> {
        match (ch.cluster(), self.for_cluster) {
            (Some(cluster), true) => Ok(format!(" ON CLUSTER {}", cluster.name)),
            (None, false) => Ok(String::new()),
            (Some(_), false) => Err(MigrateError::WrongLayout {
                reason:
                    "these are the single-server migrations, but BIOFEED_CLICKHOUSE_CLUSTER is set"
                        .to_owned(),
            }),
            (None, true) => Err(MigrateError::WrongLayout {
                reason:
                    "these are the cluster's migrations, but BIOFEED_CLICKHOUSE_CLUSTER is not set"
                        .to_owned(),
            }),
        }
    }

    /// On a cluster: every replica holds the same ledger as the node we asked (a node that was
    /// down while a migration ran applies it from the DDL queue when it returns, and its
    /// replicated ledger catches up). Replication takes a moment, so this waits up to
    /// [`REPLICAS_WAIT`] before a replica that is down or behind is an error to retry.
    async fn check_replicas(&self, ch: &ClickHouse) -> Result<(), MigrateError> {
        let deadline = tokio::time::Instant::now() + REPLICAS_WAIT;
        loop {
            match self.replicas_agree(ch).await {
                Err(MigrateError::ReplicasBehind { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                outcome => return outcome,
            }
        }
    }

    async fn replicas_agree(&self, ch: &ClickHouse) -> Result<(), MigrateError> {
        let Some(cluster) = ch.cluster() else {
            return Ok(());
        };
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Ledger {
            host: String,
            versions: Vec<u32>,
        }
        let failed = |source| MigrateError::ClickHouse {
            name: format!("{BOOKKEEPING} on cluster {}", cluster.replicas),
            source,
        };
        // One row per replica: each aggregates its own ledger, and the answers are not merged.
        let ledgers: Vec<Ledger> = ch
            .client()
            .query(&format!(
                "SELECT any(hostName()) AS host, arraySort(groupArray(version)) AS versions \
                 FROM cluster({}, {}, {BOOKKEEPING})",
                cluster.replicas,
                ch.database()
            ))
            .with_setting("distributed_group_by_no_merge", "1")
            .fetch_all()
            .await
            .map_err(failed)?;
        let nodes: u64 = ch
            .client()
            .query("SELECT count() FROM system.clusters WHERE cluster = ?")
            .bind(&cluster.replicas)
            .fetch_one()
            .await
            .map_err(failed)?;
        let here: Vec<u32> = {
            let mut applied: Vec<u32> = self
                .check_applied(ch)
                .await?
                .iter()
                .map(|a| a.version)
                .collect();
            applied.sort_unstable();
            applied
        };
        let mut behind: Vec<String> = ledgers
            .iter()
            .filter(|l| l.versions != here)
            .map(|l| format!("a replica on {} has {:?}", l.host, l.versions))
            .collect();
        if ledgers.len() as u64 != nodes {
            behind.push(format!("{} of {nodes} replicas answered", ledgers.len()));
        }
        if !behind.is_empty() {
            return Err(MigrateError::ReplicasBehind {
                expected: format!("{here:?}"),
                behind: behind.join("; "),
            });
        }
        Ok(())
    }

    /// Reads what is recorded and refuses edited or unknown migrations.
    async fn check_applied(&self, ch: &ClickHouse) -> Result<Vec<AppliedRow>, MigrateError> {
        let failed = |source| MigrateError::ClickHouse {
            name: BOOKKEEPING.to_owned(),
            source,
        };
        let exists: u8 = ch
            .server_client()
            .query("SELECT count() > 0 FROM system.tables WHERE database = ? AND name = ?")
            .bind(ch.database())
            .bind(BOOKKEEPING)
            .fetch_one()
            .await
            .map_err(failed)?;
        if exists == 0 {
            return Ok(Vec::new());
        }
        let applied: Vec<AppliedRow> = ch
            .client()
            .query(&format!(
                "SELECT version, name, checksum FROM {BOOKKEEPING} ORDER BY version"
            ))
            .fetch_all()
            .await
            .map_err(failed)?;
        for row in &applied {
            match self.migrations.iter().find(|m| m.version == row.version) {
                None => {
                    return Err(MigrateError::UnknownApplied {
                        version: row.version,
                        name: row.name.clone(),
                    })
                }
                Some(m) if m.checksum != row.checksum => {
                    return Err(MigrateError::Tampered {
                        name: m.name.clone(),
                        recorded: row.checksum.clone(),
                        current: m.checksum.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(applied)
    }
}

fn item(migration: &Migration, state: State) -> ItemState {
    ItemState {
        name: migration.name.trim_end_matches(".sql").to_owned(),
        state,
        detail: String::new(),
    }
}

impl Migration {
    /// Whether the file makes the analyst database (its Distributed tables need the cluster).
    fn needs_analyst_cluster(&self) -> bool {
        self.statements
            .iter()
            .any(|s| s.contains("{analyst_database}"))
    }
}

/// Refuses a database made for the other layout: a ledger that is replicated on a single
/// server's settings, or plain on a cluster's (moving from one server to a cluster is a
/// migration of its own: docs/operations.md, "Clusters").
async fn check_ledger_layout(ch: &ClickHouse) -> Result<(), MigrateError> {
    let engines: Vec<String> = ch
        .server_client()
        .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
        .bind(ch.database())
        .bind(BOOKKEEPING)
        .fetch_all()
        .await
        .map_err(|source| MigrateError::ClickHouse {
            name: BOOKKEEPING.to_owned(),
            source,
        })?;
    let Some(engine) = engines.first() else {
        return Ok(());
    };
    let replicated = engine.starts_with("Replicated");
    match (ch.cluster(), replicated) {
        (Some(_), false) => Err(MigrateError::WrongLayout {
            reason: format!(
                "database {} on this server was made for one server (its {BOOKKEEPING} is {engine}), but BIOFEED_CLICKHOUSE_CLUSTER is set: see docs/operations.md, \"From one node to a cluster\"",
                ch.database()
            ),
        }),
        (None, true) => Err(MigrateError::WrongLayout {
            reason: format!(
                "database {} was made for a cluster (its {BOOKKEEPING} is {engine}): set BIOFEED_CLICKHOUSE_CLUSTER",
                ch.database()
            ),
        }),
        _ => Ok(()),
    }
}

/// Whether the server knows the analyst source cluster.
async fn has_analyst_cluster(ch: &ClickHouse) -> Result<bool, MigrateError> {
    let count: u64 = ch
        .server_client()
        .query("SELECT count() FROM system.clusters WHERE cluster = ?")
        .bind(ANALYST_SOURCE_CLUSTER)
        .fetch_one()
        .await
        .map_err(|source| MigrateError::ClickHouse {
            name: "system.clusters".to_owned(),
            source,
        })?;
    Ok(count > 0)
}

/// Splits a file into statements at `;` outside quotes and comments, dropping comment-only
/// pieces. ClickHouse's HTTP interface takes one statement per request.
fn split_statements(sql: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                current.push(c);
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        current.push(escaped);
                    }
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' | '`' => {
                    quote = Some(c);
                    current.push(c);
                }
                '-' if chars.peek() == Some(&'-') => {
                    // A comment runs to the end of the line; keep the line break.
                    for skipped in chars.by_ref() {
                        if skipped == '\n' {
                            current.push('\n');
                            break;
                        }
                    }
                }
                ';' => statements.push(std::mem::take(&mut current)),
                _ => current.push(c),
            },
        }
    }
    statements.push(current);
    statements
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_quotes_and_comments() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (x String DEFAULT ';');\n\nSELECT 'it''s';\n-- trailing\n";
        assert_eq!(
            split_statements(sql),
            vec!["CREATE TABLE a (x String DEFAULT ';')", "SELECT 'it''s'"]
        );
    }

    #[test]
    fn embedded_list_matches_the_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clickhouse");
        let on_disk = ClickHouseMigrations::from_dir(&dir).unwrap();
        let embedded = ClickHouseMigrations::embedded().unwrap();
        let names = |set: &ClickHouseMigrations| {
            set.migrations()
                .iter()
                .map(|m| (m.name.clone(), m.checksum.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&on_disk),
            names(&embedded),
            "add new files to EMBEDDED"
        );
    }

    #[test]
    fn the_cluster_series_has_the_same_files_and_runs_every_statement_on_the_cluster() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clickhouse-cluster");
        let on_disk = ClickHouseMigrations::from_dir(&dir).unwrap();
        let cluster = ClickHouseMigrations::embedded_cluster().unwrap();
        let single = ClickHouseMigrations::embedded().unwrap();
        let names = |set: &ClickHouseMigrations| {
            set.migrations()
                .iter()
                .map(|m| (m.version, m.name.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&cluster),
            names(&single),
            "every migration needs its cluster version in migrations/clickhouse-cluster"
        );
        assert_eq!(
            on_disk.migrations().len(),
            cluster.migrations().len(),
            "add new files to EMBEDDED_CLUSTER"
        );
        for migration in cluster.migrations() {
            for statement in &migration.statements {
                assert!(
                    statement.contains("ON CLUSTER {cluster}"),
                    "{}: a statement without ON CLUSTER {{cluster}} would change one node only: {statement}",
                    migration.name
                );
            }
        }
    }

    #[test]
    fn bad_files_are_named() {
        let err =
            ClickHouseMigrations::from_files([("points.sql".to_owned(), "SELECT 1".to_owned())])
                .unwrap_err();
        assert!(err.to_string().contains("points.sql"));
        let err = ClickHouseMigrations::from_files([
            ("0001_a.sql".to_owned(), "SELECT 1".to_owned()),
            ("0001_b.sql".to_owned(), "SELECT 2".to_owned()),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("same version"));
        let err =
            ClickHouseMigrations::from_files([("0002_c.sql".to_owned(), "-- nothing".to_owned())])
                .unwrap_err();
        assert!(err.to_string().contains("no statement"));
    }
}
