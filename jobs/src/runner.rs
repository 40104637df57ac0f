//! The runner: a scheduler claiming due jobs from Postgres under a lease, workers running them
//! (at most `BIOFEED_JOBS_CONCURRENCY` at once), automatic retries with backoff, and the
//! operator's view of failed jobs.
//!
//! Claiming: `job_schedule` has one row per job; a runner takes a due, unleased row with
//! `FOR UPDATE SKIP LOCKED`, leases it, and records the run as `(job, instance_at)` in `job_runs`
//! (unique). The lease is renewed while the job runs; if the runner dies, the lease expires and
//! another runner takes the same instance over. A failure writes (or updates) a `failed_jobs` row
//! with the connection that failed and the error; it is retried automatically after
//! `BIOFEED_JOBS_RETRY_BACKOFF`, doubling, until `BIOFEED_JOBS_MAX_ATTEMPTS`, then waits for
//! `biofeed jobs retry`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::consumer_progress::ConsumerProgress;
use crate::jobs::{Context, Job, JobError};
use crate::metrics::JobMetrics;
use crate::{JobsOptions, JobsSettings};

/// How often the scheduler looks for due work.
const TICK: Duration = Duration::from_millis(500);

/// A failed job as operators see it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct FailedJob {
    /// Its id (for `biofeed jobs retry <id>`).
    pub id: i64,
    /// The job.
    pub job: String,
    /// The backend connection that failed.
    pub connection: String,
    /// What the job was doing.
    pub payload: serde_json::Value,
    /// The last error.
    pub error: String,
    /// When it first failed.
    pub failed_at: DateTime<Utc>,
    /// Attempts so far.
    pub attempts: i32,
    /// When it was last retried.
    pub retried_at: Option<DateTime<Utc>>,
    /// When a retry succeeded.
    pub resolved_at: Option<DateTime<Utc>>,
    /// When it is retried automatically next (None: waits for `biofeed jobs retry`).
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Connects to both stores.
pub async fn context(settings: &JobsSettings) -> anyhow::Result<Context> {
    let pool = settings.postgres.connect().await?;
    Ok(context_with(settings, pool).await?)
}

/// Connects to ClickHouse beside an open Postgres pool.
async fn context_with(
    settings: &JobsSettings,
    pool: PgPool,
) -> Result<Context, biofeed_backends::BackendError> {
    Ok(Context {
        clickhouse: settings.clickhouse.connect().await?,
        consumers: ConsumerProgress::new(
            &settings.kafka,
            &settings.topics.points,
            &settings.consumer_group,
        )
        .map_err(|e| biofeed_backends::BackendError::Failed {
            service: biofeed_backends::Service::Kafka,
            setting: "BIOFEED_KAFKA_BROKERS",
            address: settings.kafka.brokers.clone(),
            reason: e.message,
        })?,
        pool,
        settings: settings.options.clone(),
    })
}

/// Connects to ClickHouse for running `jobs` (each with its failed_jobs row, if a retry); when
/// ClickHouse does not answer, that is recorded as the jobs' failure before it is returned.
async fn context_recording(
    settings: &JobsSettings,
    pool: PgPool,
    jobs: &[(Job, Option<i64>)],
) -> anyhow::Result<Context> {
    match context_with(settings, pool.clone()).await {
        Ok(ctx) => Ok(ctx),
        Err(e) => {
            let error = JobError {
                connection: "clickhouse",
                message: e.to_string(),
            };
            for (job, failed) in jobs {
                if let Err(e) =
                    record_failure(&pool, &settings.options, *job, &error, *failed).await
                {
                    tracing::warn!(error = %e, "cannot record the failure");
                }
            }
            Err(e.into())
        }
    }
}

fn runner_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "runner".to_owned());
    format!(
        "{host}/{}/{}",
        std::process::id(),
        &Uuid::new_v4().simple().to_string()[..8]
    )
}

fn backoff(settings: &JobsOptions, attempts: i32) -> f64 {
    let doublings = attempts.clamp(1, 20) - 1;
    (settings.retry_backoff.as_secs_f64() * 2f64.powi(doublings)).min(1800.0)
}

/// Runs `job` once, now, under the same lease as a scheduled run (so it never overlaps a
/// runner's run of it); a failure is recorded in `failed_jobs` like any other — including
/// ClickHouse not answering at all.
pub async fn run_once(settings: &JobsSettings, job: Job) -> anyhow::Result<u64> {
    let pool = settings.postgres.connect().await?;
    let ctx = context_recording(settings, pool, &[(job, None)]).await?;
    let metrics = JobMetrics::default();
    ensure_schedule(&ctx.pool).await?;
    let runner = runner_name();
    let lease = settings.options.lease.as_secs_f64();
    let deadline = Instant::now() + settings.options.lease * 2;
    let instance = loop {
        let claimed: Option<DateTime<Utc>> = sqlx::query_scalar(
            "UPDATE job_schedule SET leased_by = $2, lease_until = now() + make_interval(secs => $3)
             WHERE job = $1 AND (lease_until IS NULL OR lease_until < now()) RETURNING now()",
        )
        .bind(job.name())
        .bind(&runner)
        .bind(lease)
        .fetch_optional(&ctx.pool)
        .await?;
        if let Some(at) = claimed {
            break at;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "another runner has been running {} for too long",
            job.name()
        );
        tokio::time::sleep(TICK).await;
    };
    let outcome = execute(&ctx, &metrics, &runner, job, instance, None).await;
    sqlx::query("UPDATE job_schedule SET leased_by = NULL, lease_until = NULL WHERE job = $1 AND leased_by = $2")
        .bind(job.name())
        .bind(&runner)
        .execute(&ctx.pool)
        .await?;
    Ok(outcome?)
}

async fn ensure_schedule(pool: &PgPool) -> Result<(), sqlx::Error> {
    let names: Vec<&str> = Job::ALL.iter().map(|j| j.name()).collect();
    sqlx::query(
        "INSERT INTO job_schedule (job) SELECT unnest($1::text[]) ON CONFLICT (job) DO NOTHING",
    )
    .bind(&names)
    .execute(pool)
    .await?;
    Ok(())
}

/// Runs one instance of a claimed job: records the run, renews the lease meanwhile, and records
/// a failure (or the resolution of `failed`, the failed_jobs row being retried).
async fn execute(
    ctx: &Context,
    metrics: &JobMetrics,
    runner: &str,
    job: Job,
    instance: DateTime<Utc>,
    failed: Option<i64>,
) -> Result<u64, JobError> {
    let pool = &ctx.pool;
    let run: Option<i64> = sqlx::query_scalar(
        "INSERT INTO job_runs (job, instance_at, runner) VALUES ($1, $2, $3)
         ON CONFLICT (job, instance_at) DO UPDATE SET runner = EXCLUDED.runner, started_at = now()
           WHERE job_runs.outcome IS NULL
         RETURNING id",
    )
    .bind(job.name())
    .bind(instance)
    .bind(runner)
    .fetch_optional(pool)
    .await?;
    let Some(run) = run else {
        tracing::info!(job = job.name(), %instance, "instance already done by another runner");
        return Ok(0);
    };
    let started = Instant::now();
    let renew = {
        let pool = pool.clone();
        let runner = runner.to_owned();
        let lease = ctx.settings.lease;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                let _ = sqlx::query(
                    "UPDATE job_schedule SET lease_until = now() + make_interval(secs => $3)
                     WHERE job = $1 AND leased_by = $2",
                )
                .bind(job.name())
                .bind(&runner)
                .bind(lease.as_secs_f64())
                .execute(&pool)
                .await;
            }
        })
    };
    let outcome = ctx.run(job).await;
    renew.abort();
    let elapsed = started.elapsed();
    metrics.observe(job, outcome.is_ok(), elapsed);
    let (label, items) = match &outcome {
        Ok(items) => ("ok", Some(i64::try_from(*items).unwrap_or(i64::MAX))),
        Err(_) => ("failed", None),
    };
    sqlx::query("UPDATE job_runs SET finished_at = now(), outcome = $2, items = $3 WHERE id = $1")
        .bind(run)
        .bind(label)
        .bind(items)
        .execute(pool)
        .await?;
    match &outcome {
        Ok(items) => {
            tracing::info!(job = job.name(), items, elapsed = ?elapsed, "job done");
            if let Some(id) = failed {
                sqlx::query("UPDATE failed_jobs SET resolved_at = now(), retried_at = now(), next_attempt_at = NULL WHERE id = $1")
                    .bind(id)
                    .execute(pool)
                    .await?;
            }
        }
        Err(e) => {
            tracing::warn!(job = job.name(), error = %e, "job failed");
            record_failure(&ctx.pool, &ctx.settings, job, e, failed).await?;
        }
    }
    outcome
}

async fn record_failure(
    pool: &PgPool,
    settings: &JobsOptions,
    job: Job,
    error: &JobError,
    failed: Option<i64>,
) -> Result<(), sqlx::Error> {
    let max = i32::try_from(settings.max_attempts).unwrap_or(i32::MAX);
    match failed {
        Some(id) => {
            let attempts: i32 = sqlx::query_scalar(
                "UPDATE failed_jobs SET attempts = attempts + 1, error = $2, connection = $3, retried_at = now()
                 WHERE id = $1 RETURNING attempts",
            )
            .bind(id)
            .bind(&error.message)
            .bind(error.connection)
            .fetch_one(pool)
            .await?;
            let next = (attempts < max).then(|| backoff(settings, attempts));
            sqlx::query("UPDATE failed_jobs SET next_attempt_at = now() + make_interval(secs => $2) WHERE id = $1")
                .bind(id)
                .bind(next)
                .execute(pool)
                .await?;
        }
        None => {
            let next = (1 < max).then(|| backoff(settings, 1));
            sqlx::query(
                "INSERT INTO failed_jobs (job, connection, payload, error, next_attempt_at)
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
            )
            .bind(job.name())
            .bind(error.connection)
            .bind(serde_json::json!({ "job": job.name(), "sweep": true }))
            .bind(&error.message)
            .bind(next)
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

/// The failed jobs, unresolved only unless `all`.
pub async fn failed_jobs(settings: &JobsSettings, all: bool) -> anyhow::Result<Vec<FailedJob>> {
    let pool = settings.postgres.connect().await?;
    Ok(sqlx::query_as(
        "SELECT id, job, connection, payload, error, failed_at, attempts, retried_at, resolved_at, next_attempt_at
         FROM failed_jobs WHERE $1 OR resolved_at IS NULL ORDER BY failed_at DESC, id DESC",
    )
    .bind(all)
    .fetch_all(&pool)
    .await?)
}

/// Retries failed jobs now (one by id, or every unresolved one); returns (succeeded, failed).
pub async fn retry(settings: &JobsSettings, id: Option<i64>) -> anyhow::Result<(u64, u64)> {
    let pool = settings.postgres.connect().await?;
    ensure_schedule(&pool).await?;
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, job FROM failed_jobs WHERE resolved_at IS NULL AND ($1::bigint IS NULL OR id = $1) ORDER BY id",
    )
    .bind(id)
    .fetch_all(&pool)
    .await?;
    if let (Some(id), true) = (id, rows.is_empty()) {
        anyhow::bail!("no unresolved failed job with id {id}");
    }
    let known: Vec<(Job, Option<i64>)> = rows
        .iter()
        .filter_map(|(id, name)| Job::from_name(name).map(|job| (job, Some(*id))))
        .collect();
    let ctx = context_recording(settings, pool, &known).await?;
    let metrics = JobMetrics::default();
    let runner = runner_name();
    let (mut ok, mut failed) = (0, 0);
    for (id, name) in rows {
        let Some(job) = Job::from_name(&name) else {
            tracing::warn!(id, job = %name, "unknown job in failed_jobs; skipped");
            failed += 1;
            continue;
        };
        let instance: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&ctx.pool)
            .await?;
        match execute(&ctx, &metrics, &runner, job, instance, Some(id)).await {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    Ok((ok, failed))
}

/// Runs the scheduler and workers until `stop` is set; then waits for running jobs to finish.
pub async fn run_runner(
    settings: JobsSettings,
    metrics: JobMetrics,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let ctx = context(&settings).await?;
    ensure_schedule(&ctx.pool).await?;
    let runner = runner_name();
    let slots = Arc::new(Semaphore::new(settings.options.concurrency as usize));
    tracing::info!(runner = %runner, concurrency = settings.options.concurrency, "jobs runner started");
    let mut tasks = tokio::task::JoinSet::new();
    while !stop.load(Ordering::SeqCst) {
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::time::sleep(TICK).await;
            continue;
        };
        match claim(&ctx, &runner).await {
            Ok(Some(work)) => {
                let ctx = ctx.clone();
                let metrics = metrics.clone();
                let runner = runner.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let (job, instance, failed) = work;
                    let _ = execute(&ctx, &metrics, &runner, job, instance, failed).await;
                    release(&ctx, &runner, job).await;
                });
            }
            Ok(None) => {
                drop(permit);
                tokio::time::sleep(TICK).await;
            }
            Err(e) => {
                drop(permit);
                tracing::warn!(error = %e, "cannot claim jobs; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    tracing::info!(
        running = tasks.len(),
        "stopping: letting running jobs finish"
    );
    while tasks.join_next().await.is_some() {}
    tracing::info!("jobs runner stopped");
    Ok(())
}

type Work = (Job, DateTime<Utc>, Option<i64>);

/// Claims one due thing: a failed job due for its automatic retry, else a scheduled job.
async fn claim(ctx: &Context, runner: &str) -> Result<Option<Work>, sqlx::Error> {
    let lease = ctx.settings.lease.as_secs_f64();
    let mut tx = ctx.pool.begin().await?;
    // A due retry: it runs under its job's lease, like a scheduled run.
    let retry: Option<(i64, String)> = sqlx::query_as(
        "SELECT f.id, f.job FROM failed_jobs f JOIN job_schedule s ON s.job = f.job
         WHERE f.resolved_at IS NULL AND f.next_attempt_at <= now()
           AND (s.lease_until IS NULL OR s.lease_until < now())
         ORDER BY f.next_attempt_at LIMIT 1 FOR UPDATE OF f, s SKIP LOCKED",
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((id, name)) = retry {
        if let Some(job) = Job::from_name(&name) {
            sqlx::query("UPDATE failed_jobs SET next_attempt_at = NULL WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let instance: DateTime<Utc> = sqlx::query_scalar(
                "UPDATE job_schedule SET leased_by = $2, lease_until = now() + make_interval(secs => $3)
                 WHERE job = $1 RETURNING clock_timestamp()",
            )
            .bind(&name)
            .bind(runner)
            .bind(lease)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Some((job, instance, Some(id))));
        }
    }
    let due: Option<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT job, next_run_at FROM job_schedule
         WHERE next_run_at <= now() AND (lease_until IS NULL OR lease_until < now())
         ORDER BY next_run_at LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some((name, instance)) = due else {
        return Ok(None);
    };
    let Some(job) = Job::from_name(&name) else {
        return Ok(None);
    };
    sqlx::query(
        "UPDATE job_schedule SET leased_by = $2, lease_until = now() + make_interval(secs => $3),
                next_run_at = now() + make_interval(secs => $4)
         WHERE job = $1",
    )
    .bind(&name)
    .bind(runner)
    .bind(lease)
    .bind(ctx.settings.interval(job).as_secs_f64())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some((job, instance, None)))
}

async fn release(ctx: &Context, runner: &str, job: Job) {
    if let Err(e) = sqlx::query(
        "UPDATE job_schedule SET leased_by = NULL, lease_until = NULL WHERE job = $1 AND leased_by = $2",
    )
    .bind(job.name())
    .bind(runner)
    .execute(&ctx.pool)
    .await
    {
        tracing::warn!(job = job.name(), error = %e, "cannot release the lease; it expires by itself");
    }
}
