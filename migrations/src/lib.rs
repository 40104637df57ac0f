//! Versioned migrations for everything biofeed stores: Postgres tables, ClickHouse tables and
//! views, and the Kafka topics.
//!
//! `biofeed migrate` runs [`migrate`]: Postgres first (sqlx, the SQL files of
//! `migrations/postgres` embedded in the binary), then ClickHouse (the SQL files of
//! `migrations/clickhouse`, applied in order by [`clickhouse::ClickHouseMigrations`], which records
//! each file's version and checksum and refuses a file edited after it was applied), then Kafka
//! (the points topic and its dead-letter topic, created when missing). Every step is idempotent.
//!
//! Architecture invariants: this crate changes the *shape* of storage and never reads or writes
//! data rows (seed rows in SQL files aside). A crate owns its tables; the SQL for them lives here
//! so that the order of all changes is in one place.

pub mod clickhouse;
pub mod kafka;
pub mod postgres;
pub mod registry;

use biofeed_backends::{BackendError, StoreSettings};

use crate::clickhouse::ClickHouseMigrations;

pub use kafka::TopicLayout;

/// Everything `biofeed migrate` needs to know.
#[derive(Debug, Clone)]
pub struct MigrateSettings {
    /// Where the services are, and the topics' names.
    pub stores: StoreSettings,
    /// The topics' partitions and retention.
    pub layout: TopicLayout,
}

/// A migration could not be applied or inspected.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A backing service was unreachable or failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// sqlx refused or failed a Postgres migration.
    #[error("postgres migration failed: {0}")]
    Postgres(#[from] sqlx::migrate::MigrateError),
    /// A Postgres query failed while reading migration state.
    #[error("postgres query failed: {0}")]
    PostgresQuery(#[from] sqlx::Error),
    /// The schema registry refused a schema version as incompatible with the subject's
    /// earlier ones (exit 4: the schema file needs fixing, e.g. a default for the new field).
    #[error(
        "the schema registry refused version {version} of {subject}: {reason} \
         (a new field needs a default; a field without one is never removed; none is retyped)"
    )]
    IncompatibleSchema {
        /// The subject.
        subject: String,
        /// The schema version (`vN` of its file).
        version: u32,
        /// The registry's own words.
        reason: String,
    },
    /// A ClickHouse migration file was changed after it was applied.
    #[error(
        "clickhouse migration {name} was edited after it was applied (recorded checksum {recorded}, \
         file now {current}): restore the file and put the change in a new migration"
    )]
    Tampered {
        /// The file name.
        name: String,
        /// The checksum recorded when it was applied.
        recorded: String,
        /// The checksum of the file now.
        current: String,
    },
    /// ClickHouse has a migration applied that this build does not know.
    #[error("clickhouse has migration {version} ({name}) applied, which this build does not know: run a newer biofeed")]
    UnknownApplied {
        /// The recorded version.
        version: u32,
        /// The recorded name.
        name: String,
    },
    /// A ClickHouse migration file is malformed (bad name, empty, duplicate version).
    #[error("clickhouse migration file {name}: {reason}")]
    BadFile {
        /// The file name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A ClickHouse statement failed.
    #[error("clickhouse migration {name} failed: {source}")]
    ClickHouse {
        /// The file name, or `schema_migrations` for the runner's own bookkeeping.
        name: String,
        /// What ClickHouse said.
        source: ::clickhouse::error::Error,
    },
    /// The migration files do not match the deployment (one server or a cluster).
    #[error("clickhouse migrations: {reason}")]
    WrongLayout {
        /// What does not match.
        reason: String,
    },
    /// Some replica of the cluster has not recorded the same migrations (it is catching up
    /// after a restart, or missed `ON CLUSTER` statements): retry when it has.
    #[error("clickhouse replicas are behind: expected versions {expected} on every replica, but {behind}")]
    ReplicasBehind {
        /// The versions the node we asked has.
        expected: String,
        /// Which replicas differ, and what they have.
        behind: String,
    },
    /// A Kafka topic could not be created or inspected.
    #[error("kafka topic {topic}: {reason}")]
    Kafka {
        /// The topic.
        topic: String,
        /// What Kafka said.
        reason: String,
    },
}

impl MigrateError {
    /// Whether a retry may succeed without anyone changing anything: a replica behind, or
    /// ClickHouse timing out or away (e.g. a node down during an `ON CLUSTER` statement).
    pub fn is_retryable(&self) -> bool {
        match self {
            MigrateError::Backend(backend) => backend.is_retryable(),
            MigrateError::ReplicasBehind { .. } => true,
            MigrateError::ClickHouse { source, .. } => {
                biofeed_backends::clickhouse::is_transient(source)
            }
            _ => false,
        }
    }

    /// Whether an operator must change something before a retry can succeed (an edited or
    /// unknown migration), as opposed to a service being away or failing.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            MigrateError::Tampered { .. }
                | MigrateError::UnknownApplied { .. }
                | MigrateError::BadFile { .. }
                | MigrateError::WrongLayout { .. }
                | MigrateError::IncompatibleSchema { .. }
                | MigrateError::Postgres(
                    sqlx::migrate::MigrateError::VersionMismatch(_)
                        | sqlx::migrate::MigrateError::VersionMissing(_)
                        | sqlx::migrate::MigrateError::Dirty(_)
                )
        )
    }
}

/// What one store's migration step did or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// `postgres`, `clickhouse` or `kafka`.
    pub store: &'static str,
    /// One line per migration or topic.
    pub items: Vec<ItemState>,
}

/// The state of one migration or topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemState {
    /// The migration's `version_name`, or the topic's name.
    pub name: String,
    /// What happened to it, or what it is.
    pub state: State,
    /// A detail for people, e.g. a topic's partitions and retention.
    pub detail: String,
}

/// Whether a migration or topic was applied now, was there already, or still waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Applied (or created) by this run.
    Applied,
    /// Already applied (or present) before this run.
    Present,
    /// Not applied (or missing); only `--status` reports this.
    Pending,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Applied => "applied now",
            State::Present => "applied",
            State::Pending => "pending",
        })
    }
}

impl StepReport {
    /// How many items this run applied or created.
    pub fn applied(&self) -> usize {
        self.items
            .iter()
            .filter(|i| i.state == State::Applied)
            .count()
    }

    /// How many items still wait.
    pub fn pending(&self) -> usize {
        self.items
            .iter()
            .filter(|i| i.state == State::Pending)
            .count()
    }
}

/// The three services, each of which answered within its connect timeout.
struct Connected {
    pg: sqlx::PgPool,
    ch: biofeed_backends::clickhouse::ClickHouse,
    admin: std::sync::Arc<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>>,
}

impl Connected {
    /// Connects to Postgres, ClickHouse and Kafka, in that order, before anything is read or
    /// changed anywhere.
    async fn to(stores: &StoreSettings) -> Result<Self, MigrateError> {
        Ok(Self {
            pg: stores.postgres.connect().await?,
            ch: stores.clickhouse.connect().await?,
            admin: stores.kafka.connect_admin().await?,
        })
    }
}

/// Applies every pending migration: Postgres, then ClickHouse, then Kafka. Idempotent.
///
/// Each service is connected to (and must answer within its connect timeout) before anything
/// is changed anywhere, so that a wrong address fails fast and leaves nothing half done.
#[tracing::instrument(skip_all)]
pub async fn migrate(settings: &MigrateSettings) -> Result<Vec<StepReport>, MigrateError> {
    each_store(settings, Step::Apply).await
}

/// Reports what is applied and what is pending, changing nothing.
#[tracing::instrument(skip_all)]
pub async fn status(settings: &MigrateSettings) -> Result<Vec<StepReport>, MigrateError> {
    each_store(settings, Step::Report).await
}

/// What [`each_store`] does in each store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Apply what is pending (`migrate`).
    Apply,
    /// Only report (`status`).
    Report,
}

/// Connects to every service first, then takes the step in Postgres, ClickHouse and Kafka, in
/// that order.
async fn each_store(
    settings: &MigrateSettings,
    step: Step,
) -> Result<Vec<StepReport>, MigrateError> {
    let stores = &settings.stores;
    // Contradictory replication settings are refused before any store is touched.
    if step == Step::Apply {
        settings.layout.replication.min_insync_replicas()?;
    }
    // The registry's step comes first, so that the registry being away, or refusing a schema
    // version, stops migrate before any store changed (registering again is a no-op).
    let registry = match biofeed_backends::registry::Registry::new(&settings.stores.registry)? {
        Some(registry) => Some(
            registry::register(
                &registry,
                &stores.topics,
                biofeed_schema::registry::builtin(),
                step == Step::Apply,
            )
            .await?,
        ),
        None => None,
    };
    let Connected { pg, ch, admin } = Connected::to(stores).await?;
    let postgres = match step {
        Step::Apply => postgres::migrate(&pg).await?,
        Step::Report => postgres::status(&pg).await?,
    };
    pg.close().await;
    let migrations = ClickHouseMigrations::embedded_for(&ch)?;
    let clickhouse = match step {
        Step::Apply => migrations.migrate(&ch).await?,
        Step::Report => migrations.status(&ch).await?,
    };
    let kafka = match step {
        Step::Apply => {
            kafka::ensure_topics(&admin, &stores.topics, &settings.layout, &stores.kafka).await?
        }
        Step::Report => kafka::topic_status(&admin, &stores.topics, &stores.kafka).await?,
    };
    let mut reports = vec![postgres, clickhouse, kafka];
    reports.extend(registry);
    Ok(reports)
}
