//! Postgres migrations: the SQL files of `migrations/postgres`, embedded and applied by sqlx.

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
