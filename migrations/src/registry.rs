//! The schema registry step of `biofeed migrate`: every version of the points topic's Avro
//! schema (`schema/avro/sensor_frame.vN.avsc`, oldest first) registered under the subject
//! `<points topic>-value`, whose compatibility is set to FULL_TRANSITIVE first.
//!
//! FULL_TRANSITIVE, the strictest level: a new version must read every older one's frames
//! (BACKWARD) and every older version must read the new one's (FORWARD), against all versions,
//! not just the last. BACKWARD_TRANSITIVE alone guarantees only the first: it would let a
//! version drop a field that has no default, and then readers not yet upgraded could not read
//! the new frames. biofeed needs both directions: gateways and consumers are upgraded one at a
//! time, so frames of a new version reach old readers while old frames reach new ones, and
//! consumers, replay and the analysts' tools read every version kept in Kafka (replay reads the
//! whole retention). It is the rule `schema/src/registry.rs` states for the repository (new
//! fields need defaults), now enforced where every tool can see it.
//!
//! The step runs before any store is changed: a version the registry refuses stops `migrate`
//! with exit 4 and the registry's reason (only registering gives one: the compatibility check
//! of Apicurio 3 answers a bare `false`), and nothing was migrated. A version registered by a
//! run whose stores then failed to migrate promises nothing about them: the next run registers
//! nothing new and migrates the stores.

use biofeed_backends::kafka::TopicNames;
use biofeed_backends::registry::{Registry, RegistryError};
use biofeed_schema::registry::Registry as KnownVersions;

use crate::{ItemState, MigrateError, State, StepReport};

/// The compatibility level biofeed's subjects have.
pub const COMPATIBILITY: &str = "FULL_TRANSITIVE";

/// The subject of a topic's values.
pub fn subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// Sets the points subject's compatibility and registers every known version (`apply`), or only
/// reports which versions the registry has (`!apply`).
pub async fn register(
    registry: &Registry,
    topics: &TopicNames,
    known: &KnownVersions,
    apply: bool,
) -> Result<StepReport, MigrateError> {
    let subject = subject(&topics.points);
    let mut items = Vec::new();
    let level = registry.compatibility(&subject).await?;
    if apply && level.as_deref() != Some(COMPATIBILITY) {
        registry.set_compatibility(&subject, COMPATIBILITY).await?;
    }
    for version in known.versions() {
        let name = format!("{subject} v{}", version.version);
        let had = registry.id_of(&subject, &version.text).await?;
        let (state, id) = match (had, apply) {
            (Some(id), _) => (State::Present, Some(id)),
            (None, false) => (State::Pending, None),
            (None, true) => {
                let id = registry
                    .register(&subject, &version.text)
                    .await
                    .map_err(|e| match e {
                        RegistryError::Backend(b) => MigrateError::Backend(b),
                        RegistryError::Incompatible { subject, reason } => {
                            MigrateError::IncompatibleSchema {
                                subject,
                                version: version.version,
                                reason,
                            }
                        }
                    })?;
                (State::Applied, Some(id))
            }
        };
        let detail = match id {
            Some(id) => format!("schema id {id}, {COMPATIBILITY}"),
            None => format!("compatibility {}", level.as_deref().unwrap_or("not set")),
        };
        items.push(ItemState {
            name,
            state,
            detail,
        });
    }
    Ok(StepReport {
        store: "schema registry",
        items,
    })
}
