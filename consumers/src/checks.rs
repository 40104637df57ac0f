//! What a consumer checks before writing a frame: it decodes, it is well shaped, its data type is
//! known with that channel count and its values lie in range; and its user is not erased.
//! Frames failing a check are dead letters; frames of erased users are dropped.
//!
//! Just before a batch is inserted, [`writable_sessions`] asks Postgres which of its sessions
//! may still be written: a frame read before its session was aborted, expired or purged, or
//! before its person was erased, is dropped then rather than written after the deletion.

use std::collections::{HashMap, HashSet};

use biofeed_backends::registry::WriterSchemas;
use biofeed_schema::{SchemaIds, SensorFrame};
use sqlx::PgPool;
use uuid::Uuid;

/// A known data type's shape and range.
#[derive(Debug, Clone, Copy)]
struct Spec {
    channels: u16,
    min: f32,
    max: f32,
}

/// The data types and the erasure list, read from Postgres and refreshed periodically.
#[derive(Debug, Default)]
pub struct Checks {
    data_types: HashMap<String, Spec>,
    erased: HashSet<Uuid>,
}

/// What to do with a message.
#[derive(Debug)]
pub enum Verdict {
    /// Write it.
    Write(SensorFrame),
    /// Its user is erased: drop it, count it.
    Erased,
    /// Dead-letter it, with the reason (which names fields and values, never personal data).
    Dead(String),
}

impl Checks {
    /// Reads the data types and the erasure list.
    pub async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let rows: Vec<(String, i16, f32, f32)> =
            sqlx::query_as("SELECT name, channels, min_value, max_value FROM data_types")
                .fetch_all(pool)
                .await?;
        let data_types = rows
            .into_iter()
            .filter_map(|(name, channels, min, max)| {
                Some((
                    name,
                    Spec {
                        channels: u16::try_from(channels).ok()?,
                        min,
                        max,
                    },
                ))
            })
            .collect();
        let erased: Vec<Uuid> = sqlx::query_scalar("SELECT user_id FROM erased_users")
            .fetch_all(pool)
            .await?;
        Ok(Self {
            data_types,
            erased: erased.into_iter().collect(),
        })
    }

    /// How many users are on the erasure list.
    pub fn erased_users(&self) -> usize {
        self.erased.len()
    }

    /// Judges one message's payload, in either framing (Confluent: with the schema ids in `ids`).
    pub fn judge(&self, ids: &SchemaIds, payload: &[u8]) -> Verdict {
        let frame = match biofeed_schema::decode_framed(ids, payload) {
            Ok(frame) => frame,
            Err(e) => return Verdict::Dead(format!("undecodable: {e}")),
        };
        if self.erased.contains(&frame.user_id) {
            return Verdict::Erased;
        }
        if let Err(e) = frame.check_shape() {
            return Verdict::Dead(format!("misshapen: {e}"));
        }
        let Some(spec) = self.data_types.get(frame.data_type.as_str()) else {
            return Verdict::Dead(format!("unknown data type {}", frame.data_type));
        };
        if spec.channels != frame.channels {
            return Verdict::Dead(format!(
                "{} has {} channels, the frame {}",
                frame.data_type, spec.channels, frame.channels
            ));
        }
        if let Some(i) = frame.first_value_outside(spec.min, spec.max) {
            return Verdict::Dead(format!(
                "value {i} of {} is outside {}..={} or not finite",
                frame.data_type, spec.min, spec.max
            ));
        }
        Verdict::Write(frame)
    }
}

/// Why [`learn_writer`] did not learn.
pub(crate) enum NotLearnt {
    /// Shutdown came while the registry was away.
    GaveUp,
    /// No registry is configured, or it refuses us: a retry cannot help (exit 2).
    Refused(biofeed_backends::BackendError),
}

/// Makes sure `writers` knows the schema id a Confluent-framed `payload` names, asking the
/// registry once (an id it does not have is then an unknown id, a dead letter). While the
/// registry cannot be asked, asks again with backoff: the frame waits, as a batch waits for
/// ClickHouse — a registry away never turns valid frames into dead letters.
pub(crate) fn learn_writer(
    rt: &tokio::runtime::Handle,
    writers: &mut WriterSchemas,
    payload: &[u8],
    shutdown: &biofeed_backends::shutdown::Shutdown,
    failures: &prometheus_client::metrics::counter::Counter,
) -> Result<(), NotLearnt> {
    let Some(id) = writers.unknown_id(payload) else {
        return Ok(());
    };
    let mut backoff = std::time::Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        // A registry that does not answer must not keep shutdown waiting either.
        let answer = rt.block_on(async {
            tokio::select! {
                answer = writers.learn(id) => Some(answer),
                () = shutdown.fired() => None,
            }
        });
        let Some(answer) = answer else {
            return Err(NotLearnt::GaveUp);
        };
        match answer {
            Ok(()) => return Ok(()),
            Err(e) if !e.is_retryable() => return Err(NotLearnt::Refused(e)),
            Err(e) => {
                attempt += 1;
                failures.inc();
                tracing::warn!(error = %e, schema_id = id, attempt, "cannot ask the schema registry for a frame's schema; holding the frame and retrying");
                // Sleep in short steps, so that shutdown is not kept waiting.
                let waited = rt.block_on(async {
                    tokio::time::timeout(backoff, shutdown.fired())
                        .await
                        .is_ok()
                });
                if waited {
                    return Err(NotLearnt::GaveUp);
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

/// Of `sessions` (session id, the frame's user id), those that may still be written: sessions
/// Postgres holds as `open` or `completed`, of that user, who is not on the erasure list.
/// Aborted, expired and purged sessions are refused, and so are sessions Postgres no longer
/// holds (an erasure deletes them).
///
/// Asked just before every insert — after the batch was read — so that a deletion whose
/// session changed status before the question never sees the batch's rows arrive after it (the
/// jobs wait until the consumer group's committed offsets pass the topic's end as it was after
/// the change, so every batch asked before the change is in ClickHouse before they delete).
pub async fn writable_sessions(
    pool: &PgPool,
    sessions: &[(Uuid, Uuid)],
) -> Result<HashSet<(Uuid, Uuid)>, sqlx::Error> {
    let ids: Vec<Uuid> = sessions.iter().map(|(session, _)| *session).collect();
    let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT s.id, s.user_id FROM sessions s
         WHERE s.id = ANY($1) AND s.status IN ('open', 'completed')
           AND NOT EXISTS (SELECT 1 FROM erased_users e WHERE e.user_id = s.user_id)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The (session, user) pairs of `frames`, each once: what [`writable_sessions`] is asked.
pub fn sessions_of(frames: &[SensorFrame]) -> Vec<(Uuid, Uuid)> {
    let mut pairs: Vec<(Uuid, Uuid)> = frames.iter().map(|f| (f.session_id, f.user_id)).collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

/// Keeps the frames whose (session, user) is in `writable`; returns how many were dropped.
pub fn retain_writable(frames: &mut Vec<SensorFrame>, writable: &HashSet<(Uuid, Uuid)>) -> usize {
    let before = frames.len();
    frames.retain(|f| writable.contains(&(f.session_id, f.user_id)));
    before - frames.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(offsets_us: Vec<i64>) -> SensorFrame {
        SensorFrame {
            frame_id: Uuid::nil(),
            session_id: Uuid::nil(),
            user_id: Uuid::nil(),
            device_id: Uuid::nil(),
            data_type: biofeed_schema::DataTypeName::parse("rr_interval").unwrap(),
            channels: 1,
            received_at_us: 0,
            t0_us: 1_000_000,
            values: vec![800.0; offsets_us.len()],
            offsets_us,
        }
    }

    fn checks() -> Checks {
        let mut checks = Checks::default();
        checks.data_types.insert(
            "rr_interval".to_owned(),
            Spec {
                channels: 1,
                min: 300.0,
                max: 2000.0,
            },
        );
        checks
    }

    #[test]
    fn a_frame_accepted_with_a_repeated_instant_before_the_gateway_refused_them_is_still_written() {
        let payload = biofeed_schema::encode(&frame(vec![0, 1_000, 1_000]));
        assert!(matches!(
            checks().judge(&SchemaIds::default(), &payload),
            Verdict::Write(_)
        ));
        let payload = biofeed_schema::encode(&frame(vec![0, 1_000, 500]));
        assert!(matches!(
            checks().judge(&SchemaIds::default(), &payload),
            Verdict::Dead(_)
        ));
    }
}
