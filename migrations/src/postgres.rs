//! Postgres migrations: the SQL files of `migrations/postgres`, embedded and applied by sqlx.

use biofeed_backends::postgres::PostgresSettings;
use biofeed_backends::{BackendError, Service};
use sqlx::migrate::Migrator;
use sqlx::PgPool;

use crate::{ItemState, MigrateError, State, StepReport};

/// The Postgres migrations compiled into this binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./postgres");

/// Applies pending Postgres migrations. sqlx takes an advisory lock, so concurrent runs are
/// safe, and refuses a migration whose file changed after it was applied.
#[tracing::instrument(skip_all)]
pub async fn migrate(pool: &PgPool) -> Result<StepReport, MigrateError> {
    let before = applied_versions(pool).await?;
    MIGRATOR.run(pool).await?;
    let items = MIGRATOR
        .iter()
        .map(|m| ItemState {
            name: format!("{}_{}", m.version, m.description.replace(' ', "_")),
            state: if before.iter().any(|(v, _)| *v == m.version) {
                State::Present
            } else {
                State::Applied
            },
            detail: String::new(),
        })
        .collect();
    Ok(StepReport {
        store: "postgres",
        items,
    })
}

/// A migrated Postgres database of a run's own, beside the configured one on the same server:
/// what the benchmarks use so that their users, devices and sessions never land in the
/// configured database. Created empty by [`OwnDatabase::create`], dropped whole (with every
/// row in it) by [`OwnDatabase::drop`].
#[derive(Debug)]
pub struct OwnDatabase {
    /// Settings pointing at the new database.
    pub settings: PostgresSettings,
    server: PostgresSettings,
    name: String,
}

impl OwnDatabase {
    /// Creates the database `name` (a plain identifier: letters, digits and `_`) on the server of
    /// `configured`, through a connection to the configured database, and applies the
    /// migrations to it. A failed migration drops the new database again.
    #[tracing::instrument(skip(configured))]
    pub async fn create(configured: &PostgresSettings, name: &str) -> Result<Self, MigrateError> {
        biofeed_backends::clickhouse::parse_identifier(name).map_err(|reason| {
            MigrateError::Backend(BackendError::Failed {
                service: Service::Postgres,
                setting: biofeed_backends::postgres::URL_SETTING,
                address: biofeed_backends::redacted_address(&configured.url),
                reason: format!("database name: {reason}"),
            })
        })?;
        let admin = configured.connect().await?;
        let created = sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await;
        admin.close().await;
        created?;
        let own = Self {
            settings: configured.with_database(name),
            server: configured.clone(),
            name: name.to_owned(),
        };
        let migrated = async {
            let pool = own.settings.connect().await?;
            let report = migrate(&pool).await;
            pool.close().await;
            report
        }
        .await;
        match migrated {
            Ok(_) => Ok(own),
            Err(e) => {
                if let Err(dropped) = own.drop().await {
                    tracing::warn!(error = %dropped, "cannot drop a database whose migration failed");
                }
                Err(e)
            }
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops the database and everything in it, closing connections still open to it.
    #[tracing::instrument(skip(self), fields(name = %self.name))]
    pub async fn drop(self) -> Result<(), MigrateError> {
        let admin = self.server.connect().await?;
        let dropped = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&admin)
        .await;
        admin.close().await;
        dropped?;
        Ok(())
    }
}

/// Reports which Postgres migrations are applied, changing nothing (not even creating sqlx's
/// bookkeeping table). A migration whose file changed since it was applied is an error.
#[tracing::instrument(skip_all)]
pub async fn status(pool: &PgPool) -> Result<StepReport, MigrateError> {
    let applied = applied_versions(pool).await?;
    let mut items = Vec::new();
    for m in MIGRATOR.iter() {
        let recorded = applied.iter().find(|(v, _)| *v == m.version);
        if let Some((_, checksum)) = recorded {
            if checksum.as_slice() != &*m.checksum {
                return Err(sqlx::migrate::MigrateError::VersionMismatch(m.version).into());
            }
        }
        items.push(ItemState {
            name: format!("{}_{}", m.version, m.description.replace(' ', "_")),
            state: if recorded.is_some() {
                State::Present
            } else {
                State::Pending
            },
            detail: String::new(),
        });
    }
    Ok(StepReport {
        store: "postgres",
        items,
    })
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<(i64, Vec<u8>)>, MigrateError> {
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    if table.is_none() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query_as(
        "SELECT version, checksum FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}
