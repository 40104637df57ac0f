//! The jobs themselves. Each is a sweep: it finds what is due, does it, and records that it did;
//! each is idempotent, so running it again — a retry, another runner after a crash — is safe.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biofeed_backends::clickhouse::ClickHouse;
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::consumer_progress::ConsumerProgress;
use crate::signals::{self, Metric, Sample};
use crate::JobsOptions;

/// Sessions handled per statement by the rollups and metrics jobs.
const BATCH: i64 = 100;

/// Sessions sent to `session_facts` per page by the analyst sync.
pub const SYNC_BATCH: u64 = 50_000;

/// How far before its watermark the analyst sync starts reading again: a session stamped
/// (`updated_at`, its transaction's start) before the watermark may commit after it.
const SYNC_OVERLAP: Duration = Duration::from_secs(5);

/// The jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Job {
    /// Per-second and per-minute rollups of completed sessions.
    Rollups,
    /// HRV, pulse-oximetry and EEG metrics of completed sessions.
    SessionMetrics,
    /// Aborted sessions, and open ones past their deadline: points, rollups and metrics deleted.
    Purge,
    /// Erased users' rows deleted from every ClickHouse table, verified.
    Erasure,
    /// Session status and pseudonymous facts mirrored to ClickHouse for the analysts' views.
    AnalystSync,
}

impl Job {
    /// Every job.
    pub const ALL: [Job; 5] = [
        Job::Rollups,
        Job::SessionMetrics,
        Job::Purge,
        Job::Erasure,
        Job::AnalystSync,
    ];

    /// Its name in tables, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Job::Rollups => "rollups",
            Job::SessionMetrics => "session_metrics",
            Job::Purge => "purge",
            Job::Erasure => "erasure",
            Job::AnalystSync => "analyst_sync",
        }
    }

    /// The job of a name.
    pub fn from_name(name: &str) -> Option<Job> {
        Job::ALL.into_iter().find(|j| j.name() == name)
    }
}

/// A job failed. [`JobError::connection`] names the backend involved (what `failed_jobs`
/// records), [`JobError::is_retryable`] whether running it again later can help.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(sqlx::Error),
    /// ClickHouse failed.
    #[error("clickhouse: {0}")]
    ClickHouse(clickhouse::error::Error),
    /// Kafka failed (reading the consumer group's progress).
    #[error("kafka: {0}")]
    Kafka(rdkafka::error::KafkaError),
    /// A backend could not be reached when the job started.
    #[error(transparent)]
    Unreachable(#[from] biofeed_backends::BackendError),
    /// A ClickHouse deletion did not finish in time.
    #[error("clickhouse: {left} rows still present {waited:?} after deleting them")]
    DeletionUnfinished {
        /// Rows left.
        left: u64,
        /// How long the job waited.
        waited: Duration,
    },
    /// The consumers had not yet written what the points topic held when the job started, so
    /// deleting now could let those rows land afterwards: the deletion waits.
    #[error("kafka: consumer group {group} is still {behind} messages short of what the points topic held when the job started, after {waited:?}; deleting now could let those rows land afterwards, so the deletion waits")]
    ConsumersBehind {
        /// The consumer group.
        group: String,
        /// Messages it still has to commit.
        behind: i64,
        /// How long the job waited.
        waited: Duration,
    },
    /// The job panicked: a bug, which a retry does not fix.
    #[error("panicked: {0}")]
    Panicked(String),
}

// Written out rather than `#[from]`: the message already holds the cause, which would otherwise
// be printed twice by a `{:#}` chain.
impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Postgres(e)
    }
}

impl From<clickhouse::error::Error> for JobError {
    fn from(e: clickhouse::error::Error) -> Self {
        JobError::ClickHouse(e)
    }
}

impl From<rdkafka::error::KafkaError> for JobError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        JobError::Kafka(e)
    }
}

impl JobError {
    /// What failed, without the backend's name in front (`failed_jobs` keeps that in its
    /// `connection` column).
    pub fn detail(&self) -> String {
        let message = self.to_string();
        let prefix = format!("{}: ", self.connection());
        match message.strip_prefix(&prefix) {
            Some(rest) => rest.to_owned(),
            None => message,
        }
    }

    /// The backend involved — `postgres`, `clickhouse` or `kafka` — or `none` when the job
    /// itself failed (it panicked).
    pub fn connection(&self) -> &'static str {
        match self {
            JobError::Postgres(_) => "postgres",
            JobError::ClickHouse(_) | JobError::DeletionUnfinished { .. } => "clickhouse",
            JobError::Kafka(_) | JobError::ConsumersBehind { .. } => "kafka",
            JobError::Unreachable(e) => match e.service() {
                Some(biofeed_backends::Service::Postgres) => "postgres",
                Some(biofeed_backends::Service::ClickHouse) => "clickhouse",
                Some(biofeed_backends::Service::Kafka) => "kafka",
                Some(biofeed_backends::Service::SchemaRegistry) => "schema_registry",
                None => "none",
            },
            JobError::Panicked(_) => "none",
        }
    }

    /// Whether running the job again later can help: a backend failing, slow or behind may
    /// recover; a panic is a bug that needs a fix first.
    pub fn is_retryable(&self) -> bool {
        match self {
            JobError::Panicked(_) => false,
            JobError::Unreachable(e) => e.is_retryable(),
            _ => true,
        }
    }
}

/// What the jobs work with.
#[derive(Clone)]
pub struct Context {
    /// Postgres.
    pub pool: PgPool,
    /// ClickHouse.
    pub clickhouse: ClickHouse,
    /// How far the consumers got: purge and erasure delete only behind it.
    pub consumers: ConsumerProgress,
    /// The settings.
    pub settings: JobsOptions,
}

/// The Postgres advisory lock the erasure takes alone and the derived-data jobs share.
const DERIVED_DATA_LOCK: i64 = 0x6269_6f66_6565_6401;

/// Sessions a computation (rollups, metrics) handles in one go.
struct Batch {
    /// `(session, user)` of each.
    due: Vec<(Uuid, Uuid)>,
    /// The sessions alone.
    sessions: Vec<Uuid>,
    /// Their fingerprints, recorded with the computation.
    fingerprints: Vec<(Uuid, String)>,
    /// The version the computation's rows carry.
    version: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn uuid_list(ids: &[Uuid]) -> String {
    ids.iter()
        .map(|id| format!("toUUID('{id}')"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Context {
    /// Runs one sweep of `job`; returns how many items (sessions, users) it handled.
    pub async fn run(&self, job: Job) -> Result<u64, JobError> {
        // The erasure deletes what the derived-data jobs write: it runs alone, after every
        // rollups, metrics or sync run that may have read an erased person's sessions before the
        // erasure committed has written; any that starts later no longer sees them. A
        // transaction-level lock, so a stopped or panicking job cannot leave it held.
        let mut lock = self.pool.begin().await?;
        match job {
            Job::Erasure => {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(DERIVED_DATA_LOCK)
                    .execute(&mut *lock)
                    .await?;
            }
            Job::Rollups | Job::SessionMetrics | Job::AnalystSync => {
                sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
                    .bind(DERIVED_DATA_LOCK)
                    .execute(&mut *lock)
                    .await?;
            }
            Job::Purge => {}
        }
        let outcome = self.run_unlocked(job).await;
        lock.rollback().await?;
        outcome
    }

    async fn run_unlocked(&self, job: Job) -> Result<u64, JobError> {
        match job {
            Job::Rollups => self.rollups().await,
            Job::SessionMetrics => self.session_metrics().await,
            Job::Purge => self.purge().await,
            Job::Erasure => self.erasure().await,
            Job::AnalystSync => self.analyst_sync().await,
        }
    }

    /// The fingerprint of each session's rows in ClickHouse: its distinct sample instants and the
    /// newest ingest second. New points change the first, rows written again (a replay) the
    /// second; merges change neither. Sessions without rows: "0:0". `due` holds (session, user)
    /// pairs: filtering by user too reads only those sessions' granules (the sort key's prefix),
    /// not the whole `session_id` column of the table.
    async fn fingerprints(&self, due: &[(Uuid, Uuid)]) -> Result<Vec<(Uuid, String)>, JobError> {
        #[derive(Row, Deserialize)]
        struct Fingerprint {
            #[serde(with = "clickhouse::serde::uuid")]
            session_id: Uuid,
            rows: u64,
            ingested: u32,
        }
        let mut out: Vec<(Uuid, String)> = Vec::with_capacity(due.len());
        for chunk in due.chunks(500) {
            let sessions: Vec<Uuid> = chunk.iter().map(|(s, _)| *s).collect();
            let users: Vec<Uuid> = chunk.iter().map(|(_, u)| *u).collect();
            let rows: Vec<Fingerprint> = self
                .clickhouse
                .client()
                .query(&format!(
                    "SELECT session_id, uniqExact(data_type, t_us) AS rows, toUInt32(max(ingested_at)) AS ingested FROM points
                     WHERE user_id IN ({}) AND session_id IN ({}) GROUP BY session_id",
                    uuid_list(&users),
                    uuid_list(&sessions)
                ))
                .fetch_all()
                .await?;
            for id in &sessions {
                let fingerprint = rows.iter().find(|r| r.session_id == *id).map_or_else(
                    || "0:0".to_owned(),
                    |r| format!("{}:{}", r.rows, r.ingested),
                );
                out.push((*id, fingerprint));
            }
        }
        Ok(out)
    }

    /// The next sessions due for the `what` computation, leaving out `done`, or `None` when none
    /// is left. Their fingerprints are taken before the points are read: a row landing meanwhile
    /// changes the fingerprint, and the session is computed again at the next run.
    async fn next_batch(&self, what: &str, done: &[Uuid]) -> Result<Option<Batch>, JobError> {
        let due = self.due_sessions(what, done).await?;
        if due.is_empty() {
            return Ok(None);
        }
        let sessions = due.iter().map(|(s, _)| *s).collect();
        let fingerprints = self.fingerprints(&due).await?;
        Ok(Some(Batch {
            due,
            sessions,
            fingerprints,
            version: now_us(),
        }))
    }

    /// Completed, settled sessions whose `what` computation is missing, or whose rows in
    /// ClickHouse changed since it was made (a late frame, a replay), leaving out `done`.
    async fn due_sessions(&self, what: &str, done: &[Uuid]) -> Result<Vec<(Uuid, Uuid)>, JobError> {
        let (at, fingerprint) = (format!("{what}_at"), format!("{what}_fingerprint"));
        let computed: Vec<(Uuid, Uuid, Option<String>)> = sqlx::query_as(&format!(
            "SELECT s.id, s.user_id, c.{fingerprint} FROM sessions s JOIN session_computations c ON c.session_id = s.id
             WHERE s.status = 'completed' AND c.{at} IS NOT NULL AND c.{at} > now() - interval '1 day'
               AND NOT (s.id = ANY($1))"
        ))
        .bind(done)
        .fetch_all(&self.pool)
        .await?;
        let pairs: Vec<(Uuid, Uuid)> = computed.iter().map(|(s, u, _)| (*s, *u)).collect();
        let changed: Vec<Uuid> = self
            .fingerprints(&pairs)
            .await?
            .into_iter()
            .zip(&computed)
            .filter(|((_, now), (_, _, then))| then.as_deref() != Some(now.as_str()))
            .map(|((id, _), _)| id)
            .collect();
        Ok(sqlx::query_as(&format!(
            "SELECT s.id, s.user_id FROM sessions s
             LEFT JOIN session_computations c ON c.session_id = s.id
             WHERE s.status = 'completed' AND s.ended_at < now() - make_interval(secs => $1)
               AND (c.{at} IS NULL OR s.id = ANY($2)) AND NOT (s.id = ANY($3))
             ORDER BY s.ended_at LIMIT $4"
        ))
        .bind(secs(self.settings.settle))
        .bind(&changed)
        .bind(done)
        .bind(BATCH)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn mark_computed(
        &self,
        what: &str,
        fingerprints: &[(Uuid, String)],
    ) -> Result<(), JobError> {
        let (at, fingerprint) = (format!("{what}_at"), format!("{what}_fingerprint"));
        let ids: Vec<Uuid> = fingerprints.iter().map(|(id, _)| *id).collect();
        let prints: Vec<&str> = fingerprints.iter().map(|(_, f)| f.as_str()).collect();
        sqlx::query(&format!(
            "INSERT INTO session_computations (session_id, {at}, {fingerprint})
             SELECT id, now(), print FROM unnest($1::uuid[], $2::text[]) AS t (id, print)
             ON CONFLICT (session_id) DO UPDATE SET {at} = EXCLUDED.{at}, {fingerprint} = EXCLUDED.{fingerprint}"
        ))
        .bind(&ids)
        .bind(&prints)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Rollups at 1 s and 1 min from `points FINAL`, replacing earlier ones of the same keys.
    async fn rollups(&self) -> Result<u64, JobError> {
        let mut done: Vec<Uuid> = Vec::new();
        while let Some(batch) = self.next_batch("rollups", &done).await? {
            let users: Vec<Uuid> = batch.due.iter().map(|(_, u)| *u).collect();
            for (table, step) in [("rollups_1s", 1_000_000i64), ("rollups_1m", 60_000_000)] {
                self.clickhouse
                    .client()
                    .query(&format!(
                        "INSERT INTO {table} (user_id, session_id, data_type, channel, bucket_us, count, min, max, sum, mean, version)
                         SELECT user_id, session_id, data_type, toUInt16(channel - 1), intDiv(t_us, {step}) * {step} AS bucket,
                                count(), min(v), max(v), sum(toFloat64(v)), avg(toFloat64(v)), toUInt64({version})
                         FROM (SELECT user_id, session_id, data_type, t_us, values FROM points FINAL
                               WHERE user_id IN ({users}) AND session_id IN ({sessions}))
                         ARRAY JOIN values AS v, arrayEnumerate(values) AS channel
                         GROUP BY user_id, session_id, data_type, channel, bucket",
                        users = uuid_list(&users),
                        sessions = uuid_list(&batch.sessions),
                        version = batch.version,
                    ))
                    .execute()
                    .await?;
            }
            self.mark_computed("rollups", &batch.fingerprints).await?;
            tracing::info!(sessions = batch.sessions.len(), "rolled up sessions");
            done.extend(batch.sessions);
        }
        Ok(done.len() as u64)
    }

    /// Session metrics of completed sessions.
    async fn session_metrics(&self) -> Result<u64, JobError> {
        #[derive(Row, Deserialize)]
        struct PointRow {
            t_us: i64,
            values: Vec<f32>,
        }
        #[derive(Row, Serialize)]
        struct MetricRow {
            #[serde(with = "clickhouse::serde::uuid")]
            user_id: Uuid,
            #[serde(with = "clickhouse::serde::uuid")]
            session_id: Uuid,
            metric: String,
            channel: u16,
            value: f64,
            samples: u64,
            version: u64,
        }
        let mut done: Vec<Uuid> = Vec::new();
        while let Some(batch) = self.next_batch("metrics", &done).await? {
            let mut rows = Vec::new();
            for (session, user) in &batch.due {
                let types: Vec<(String, i16, Option<f32>)> = sqlx::query_as(
                    "SELECT d.name, d.channels, d.sample_rate_hz FROM session_data_types sd
                     JOIN data_types d ON d.id = sd.data_type_id
                     WHERE sd.session_id = $1 AND d.name IN ('rr_interval', 'spo2', 'eeg')",
                )
                .bind(session)
                .fetch_all(&self.pool)
                .await?;
                for (data_type, channels, rate) in types {
                    let points: Vec<PointRow> = self
                        .clickhouse
                        .client()
                        .query(
                            "SELECT t_us, values FROM points FINAL
                             WHERE user_id = toUUID(?) AND session_id = toUUID(?) AND data_type = ?
                             ORDER BY t_us",
                        )
                        .bind(user.to_string())
                        .bind(session.to_string())
                        .bind(&data_type)
                        .fetch_all()
                        .await?;
                    let samples: Vec<Sample> =
                        points.into_iter().map(|p| (p.t_us, p.values)).collect();
                    let rate = f64::from(rate.unwrap_or(1.0));
                    let metrics: Vec<Metric> = signals::for_data_type(
                        &data_type,
                        channels.max(1) as usize,
                        rate,
                        &samples,
                    );
                    rows.extend(
                        metrics
                            .into_iter()
                            .filter(|m| m.value.is_finite())
                            .map(|m| MetricRow {
                                user_id: *user,
                                session_id: *session,
                                metric: m.name.to_owned(),
                                channel: m.channel,
                                value: m.value,
                                samples: m.samples,
                                version: batch.version,
                            }),
                    );
                }
            }
            if !rows.is_empty() {
                let mut insert = self
                    .clickhouse
                    .client()
                    .insert::<MetricRow>("session_metrics")
                    .await?;
                for row in &rows {
                    insert.write(row).await?;
                }
                insert.end().await?;
            }
            self.mark_computed("metrics", &batch.fingerprints).await?;
            tracing::info!(
                sessions = batch.sessions.len(),
                metrics = rows.len(),
                "computed session metrics"
            );
            done.extend(batch.sessions);
        }
        Ok(done.len() as u64)
    }

    /// Deletes rows from every ClickHouse table holding per-session data and waits until the
    /// deletion is done and no row is left (on a cluster: on every replica of every shard).
    ///
    /// First it waits for the consumers to have written what the points topic held: rows read
    /// by a consumer before the sessions closed (or the person was erased) may still be on their
    /// way to ClickHouse; later ones are dropped by the consumer.
    async fn delete_and_verify(&self, tables: &[&str], condition: &str) -> Result<(), JobError> {
        self.consumers
            .wait_until_written(self.settings.consumer_wait)
            .await?;
        let ch = &self.clickhouse;
        let client = ch.client();
        for table in tables {
            ch.ddl(client.query(&ch.delete_sql(table, condition)))
                .execute()
                .await?;
        }
        let deadline = tokio::time::Instant::now() + self.settings.mutation_timeout;
        loop {
            let mut left = 0u64;
            for table in tables {
                left += client
                    .query(&ch.rows_left_sql(table, condition))
                    .fetch_one::<u64>()
                    .await?;
            }
            if left == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(JobError::DeletionUnfinished {
                    left,
                    waited: self.settings.mutation_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Purges aborted sessions, and expires and purges open sessions past their deadline.
    async fn purge(&self) -> Result<u64, JobError> {
        sqlx::query(
            "UPDATE sessions SET status = 'expired', ended_at = deadline_at, updated_at = now()
             WHERE status = 'open' AND deadline_at < now()",
        )
        .execute(&self.pool)
        .await?;
        let due: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
            "SELECT id, user_id, status FROM sessions
             WHERE status IN ('aborted', 'expired') AND ended_at < now() - make_interval(secs => $1)
             ORDER BY ended_at LIMIT $2",
        )
        .bind(secs(self.settings.settle))
        .bind(BATCH)
        .fetch_all(&self.pool)
        .await?;
        if due.is_empty() {
            return Ok(0);
        }
        let users: Vec<Uuid> = due.iter().map(|(_, u, _)| *u).collect();
        let sessions: Vec<Uuid> = due.iter().map(|(s, _, _)| *s).collect();
        let condition = format!(
            "user_id IN ({}) AND session_id IN ({})",
            uuid_list(&users),
            uuid_list(&sessions)
        );
        self.delete_and_verify(
            &["points", "rollups_1s", "rollups_1m", "session_metrics"],
            &condition,
        )
        .await?;
        for (session, _, status) in &due {
            sqlx::query(
                "UPDATE sessions SET status = 'purged', purge_reason = $2, purged_at = now(), updated_at = now()
                 WHERE id = $1 AND status = $2",
            )
            .bind(session)
            .bind(status)
            .execute(&self.pool)
            .await?;
        }
        tracing::info!(sessions = due.len(), "purged sessions");
        Ok(due.len() as u64)
    }

    /// Deletes erased users' rows from every ClickHouse table and records completion.
    async fn erasure(&self) -> Result<u64, JobError> {
        let pending: Vec<Uuid> = sqlx::query_scalar(
            "SELECT user_id FROM erased_users WHERE clickhouse_deleted_at IS NULL ORDER BY erased_at LIMIT $1",
        )
        .bind(BATCH)
        .fetch_all(&self.pool)
        .await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let condition = format!("user_id IN ({})", uuid_list(&pending));
        self.delete_and_verify(
            &[
                "points",
                "rollups_1s",
                "rollups_1m",
                "session_metrics",
                "session_facts",
            ],
            &condition,
        )
        .await?;
        sqlx::query(
            "UPDATE erased_users SET clickhouse_deleted_at = now() WHERE user_id = ANY($1)",
        )
        .bind(&pending)
        .execute(&self.pool)
        .await?;
        tracing::info!(
            users = pending.len(),
            "erased users' rows deleted from ClickHouse"
        );
        Ok(pending.len() as u64)
    }

    /// Mirrors sessions changed since the last sync to `session_facts`, however many: it pages
    /// through them in `(updated_at, id)` order, [`SYNC_BATCH`] at a time, until none is left,
    /// saving its progress after each page.
    ///
    /// The watermark `synced_through` is where the next run starts, less [`SYNC_OVERLAP`]: a row
    /// stamped a little earlier may commit later (its transaction was still open), and re-sending
    /// a fact is harmless (the newest version wins). After a page it is that page's last
    /// `updated_at`; after the last page, the time this run began (rows stamped before then and
    /// committed later are within the overlap), so a burst of changes is not sent again and again.
    async fn analyst_sync(&self) -> Result<u64, JobError> {
        let began: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await?;
        let watermark: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT (watermark->>'synced_through')::timestamptz FROM job_schedule WHERE job = 'analyst_sync'",
        )
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        let overlap = chrono::Duration::from_std(SYNC_OVERLAP).unwrap_or_default();
        let mut after: Option<(chrono::DateTime<chrono::Utc>, Uuid)> =
            watermark.map(|w| (w - overlap, Uuid::nil()));
        let mut synced = 0u64;
        loop {
            let page = self.sync_page(after, SYNC_BATCH).await?;
            synced += page.sent;
            match page.last {
                Some(last) if page.sent == SYNC_BATCH => {
                    self.save_sync_watermark(last.0).await?;
                    after = Some(last);
                }
                _ => {
                    self.save_sync_watermark(began).await?;
                    return Ok(synced);
                }
            }
        }
    }

    /// Sends the facts of at most `limit` sessions changed after `after` (`(updated_at, id)`,
    /// exclusive; every session if None) to `session_facts`, in that order.
    async fn sync_page(
        &self,
        after: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
        limit: u64,
    ) -> Result<SyncPage, JobError> {
        #[derive(Row, Serialize)]
        struct Fact {
            #[serde(with = "clickhouse::serde::uuid")]
            session_id: Uuid,
            #[serde(with = "clickhouse::serde::uuid")]
            user_id: Uuid,
            exercise: String,
            status: String,
            started_at: u32,
            ended_at: Option<u32>,
            version: u64,
        }
        type SessionRow = (
            Uuid,
            Uuid,
            String,
            String,
            i64,
            Option<i64>,
            i64,
            chrono::DateTime<chrono::Utc>,
        );
        let rows: Vec<SessionRow> = sqlx::query_as(
            "SELECT s.id, s.user_id, e.name, s.status, extract(epoch FROM s.started_at)::bigint,
                    extract(epoch FROM s.ended_at)::bigint,
                    (extract(epoch FROM s.updated_at) * 1000000)::bigint, s.updated_at
             FROM sessions s JOIN exercises e ON e.id = s.exercise_id
             WHERE $1::timestamptz IS NULL OR (s.updated_at, s.id) > ($1::timestamptz, $2::uuid)
             ORDER BY s.updated_at, s.id LIMIT $3",
        )
        .bind(after.map(|(at, _)| at))
        .bind(after.map(|(_, id)| id))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let Some(last) = rows.last().map(|r| (r.7, r.0)) else {
            return Ok(SyncPage {
                sent: 0,
                last: None,
            });
        };
        let mut insert = self
            .clickhouse
            .client()
            .insert::<Fact>("session_facts")
            .await?;
        for (session_id, user_id, exercise, status, started, ended, version, _) in &rows {
            insert
                .write(&Fact {
                    session_id: *session_id,
                    user_id: *user_id,
                    exercise: exercise.clone(),
                    status: status.clone(),
                    started_at: u32::try_from(*started).unwrap_or(0),
                    ended_at: ended.and_then(|e| u32::try_from(e).ok()),
                    version: u64::try_from(*version).unwrap_or(0),
                })
                .await?;
        }
        insert.end().await?;
        Ok(SyncPage {
            sent: rows.len() as u64,
            last: Some(last),
        })
    }

    /// Moves the analyst sync's watermark forward to `through` (never back).
    async fn save_sync_watermark(
        &self,
        through: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), JobError> {
        sqlx::query(
            "UPDATE job_schedule SET watermark = jsonb_set(watermark, '{synced_through}',
                    to_jsonb(greatest($1::timestamptz, (watermark->>'synced_through')::timestamptz)))
             WHERE job = 'analyst_sync'",
        )
        .bind(through)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// One page of the analyst sync: how many facts it sent, and the `(updated_at, id)` of the last.
struct SyncPage {
    sent: u64,
    last: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
}
