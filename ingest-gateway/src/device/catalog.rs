//! The catalog of data types and exercises, read from Postgres and kept in memory: it changes
//! rarely and every frame consults it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use biofeed_schema::DataTypeName;
use sqlx::PgPool;

/// What the gateway checks a data type's values against.
#[derive(Debug, Clone, PartialEq)]
pub struct DataTypeSpec {
    /// Its id in Postgres.
    pub id: i16,
    /// Its name.
    pub name: DataTypeName,
    /// Values per sample.
    pub channels: u16,
    /// Smallest valid value.
    pub min_value: f32,
    /// Largest valid value.
    pub max_value: f32,
}

/// Data types and exercises by name.
#[derive(Debug, Default)]
pub struct Catalog {
    data_types: HashMap<String, DataTypeSpec>,
    by_id: HashMap<i16, String>,
    exercises: HashMap<String, (i32, Vec<i16>)>,
}

impl Catalog {
    /// Reads the catalog.
    pub async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let rows: Vec<(i16, String, i16, f32, f32)> =
            sqlx::query_as("SELECT id, name, channels, min_value, max_value FROM data_types")
                .fetch_all(pool)
                .await?;
        let mut catalog = Catalog::default();
        for (id, name, channels, min_value, max_value) in rows {
            // The Postgres checks guarantee both; a row breaking them is skipped, not trusted.
            let (Ok(parsed), Ok(channels)) = (DataTypeName::parse(&name), u16::try_from(channels))
            else {
                tracing::warn!(
                    data_type_id = id,
                    "skipping a data type that breaks the name or channel rules"
                );
                continue;
            };
            catalog.by_id.insert(id, name.clone());
            catalog.data_types.insert(
                name,
                DataTypeSpec {
                    id,
                    name: parsed,
                    channels,
                    min_value,
                    max_value,
                },
            );
        }
        let exercises: Vec<(i32, String, Vec<i16>)> = sqlx::query_as(
            "SELECT e.id, e.name, coalesce(array_agg(l.data_type_id) FILTER (WHERE l.data_type_id IS NOT NULL), '{}')
             FROM exercises e LEFT JOIN exercise_data_types l ON l.exercise_id = e.id GROUP BY e.id, e.name",
        )
        .fetch_all(pool)
        .await?;
        for (id, name, data_types) in exercises {
            catalog.exercises.insert(name, (id, data_types));
        }
        Ok(catalog)
    }

    /// A data type by name.
    pub fn data_type(&self, name: &str) -> Option<&DataTypeSpec> {
        self.data_types.get(name)
    }

    /// A data type by id.
    pub fn data_type_by_id(&self, id: i16) -> Option<&DataTypeSpec> {
        self.by_id
            .get(&id)
            .and_then(|name| self.data_types.get(name))
    }

    /// An exercise's id and the data types it tracks.
    pub fn exercise(&self, name: &str) -> Option<&(i32, Vec<i16>)> {
        self.exercises.get(name)
    }
}

/// The shared catalog, reloaded when a name is missing (at most once per second), so that data
/// types added to Postgres are picked up without a restart.
pub struct CatalogHandle {
    current: RwLock<(Arc<Catalog>, Instant)>,
}

const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(1);

impl CatalogHandle {
    /// Loads the catalog.
    pub async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self {
            current: RwLock::new((Arc::new(Catalog::load(pool).await?), Instant::now())),
        })
    }

    /// The catalog as it is now.
    pub fn get(&self) -> Arc<Catalog> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard.0),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().0),
        }
    }

    /// The catalog, reloaded first if it is older than a second: for lookups that missed.
    pub async fn fresh(&self, pool: &PgPool) -> Result<Arc<Catalog>, sqlx::Error> {
        let stale = match self.current.read() {
            Ok(guard) => guard.1.elapsed() >= RELOAD_AT_MOST_EVERY,
            Err(_) => true,
        };
        if !stale {
            return Ok(self.get());
        }
        let catalog = Arc::new(Catalog::load(pool).await?);
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = (Arc::clone(&catalog), Instant::now());
        Ok(catalog)
    }
}
