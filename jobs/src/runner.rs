//! The runner: a scheduler claiming due jobs from Postgres under a lease, workers running them
//! (at most `BIOFEED_JOBS_CONCURRENCY` at once), automatic retries with backoff, and the
//! operator's view of failed jobs.
//!
//! Claiming: `job_schedule` has one row per job; a runner takes a due, unleased row with
//! `FOR UPDATE SKIP LOCKED`, leases it, and records the run as `(job, instance_at)` in `job_runs`
//! (unique). The lease is renewed every third of `BIOFEED_JOBS_LEASE` while the job runs; if the
//! runner dies, the lease expires and another runner takes the job over. A runner that cannot
//! renew — another runner holds the lease now, or Postgres did not answer for a whole lease —
//! stops the job at once (it is idempotent, so stopping anywhere is safe): the run is finished
//! without an outcome, counted as `lease_lost`, and no `failed_jobs` row is written (losing the
//! lease is not the job's failure; the new holder runs it). A failure — an error, or a panic of
//! the job, whose message becomes the error — writes (or updates) a `failed_jobs` row with the
//! connection that failed (`none` for a panic) and the error; it is retried automatically after
//! `BIOFEED_JOBS_RETRY_BACKOFF`, doubling, until `BIOFEED_JOBS_MAX_ATTEMPTS`, then waits for
//! `biofeed jobs retry`. Either way the lease is released and the runner goes on serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use biofeed_backends::shutdown::Shutdown;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::consumer_progress::ConsumerProgress;
use crate::jobs::{Context, Job, JobError};
use crate::metrics::{JobMetrics, RunOutcome};
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

/// What the runner's entry points can fail with (a job's own failure is a [`JobError`]).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The job failed.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The job's lease was lost and the job stopped; another runner runs it.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
    /// A backend could not be reached at start.
    #[error(transparent)]
    Unreachable(#[from] biofeed_backends::BackendError),
    /// Postgres failed (the runner's own bookkeeping).
    #[error("postgres: {0}")]
    Postgres(sqlx::Error),
    /// Another runner held the job's lease for longer than two leases.
    #[error("another runner has been running {0} for too long")]
    Busy(&'static str),
    /// No unresolved failed job has this id.
    #[error("no unresolved failed job with id {0}")]
    NoSuchFailedJob(i64),
}

impl From<sqlx::Error> for RunnerError {
    fn from(e: sqlx::Error) -> Self {
        RunnerError::Postgres(e)
    }
}

impl RunnerError {
    /// Whether trying again later can help (a backend failing, a busy lease) or not (a job that
    /// panicked, a lease another runner took over, an unknown id).
    pub fn is_retryable(&self) -> bool {
        match self {
            RunnerError::Job(e) => e.is_retryable(),
            RunnerError::Unreachable(_) | RunnerError::Postgres(_) | RunnerError::Busy(_) => true,
            // Another runner holds the job now and runs it: nothing for this caller to retry.
            RunnerError::LeaseLost(_) | RunnerError::NoSuchFailedJob(_) => false,
        }
    }
}

/// Connects to both stores.
pub async fn context(settings: &JobsSettings) -> Result<Context, RunnerError> {
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
            reason: e.detail(),
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
) -> Result<Context, RunnerError> {
    match context_with(settings, pool.clone()).await {
        Ok(ctx) => Ok(ctx),
        Err(e) => {
            let error = JobError::Unreachable(e);
            for (job, failed) in jobs {
                if let Err(e) =
                    record_failure(&pool, &settings.options, *job, &error, *failed).await
                {
                    tracing::warn!(error = %e, "cannot record the failure");
                }
            }
            Err(RunnerError::Job(error))
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

/// Why a run did not end with its job's success.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The job failed (an error or a panic); recorded in `failed_jobs`.
    #[error(transparent)]
    Failed(#[from] JobError),
    /// The runner lost the job's lease and stopped the job; not recorded in `failed_jobs`.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
}

impl From<sqlx::Error> for RunError {
    fn from(e: sqlx::Error) -> Self {
        RunError::Failed(e.into())
    }
}

/// Why a runner stopped holding a job's lease, and so stopped the job.
#[derive(Debug, thiserror::Error)]
pub enum LeaseLost {
    /// The renewal matched no row: another runner holds the lease now (it expired and was
    /// claimed again), or it was released.
    #[error("the lease of {job} was taken over by another runner; the job was stopped")]
    TakenOver {
        /// The job.
        job: &'static str,
    },
    /// No renewal succeeded for a whole lease, so another runner may hold it by now.
    #[error(
        "the lease of {job} could not be renewed for {lease:?} ({error}); the job was stopped"
    )]
    Unrenewable {
        /// The job.
        job: &'static str,
        /// The lease.
        lease: Duration,
        /// The last renewal's error.
        error: String,
    },
}

/// A job claimed under a lease.
#[derive(Debug, Clone, Copy)]
struct Claim {
    job: Job,
    /// The instance, unique per job in `job_runs`.
    instance: DateTime<Utc>,
    /// The failed_jobs row this run retries.
    failed: Option<i64>,
    /// Taken just before the claiming statement: the lease runs at least from then.
    leased_at: Instant,
}

/// Runs `job` once, now, under the same lease as a scheduled run (so it never overlaps a
/// runner's run of it); a failure is recorded in `failed_jobs` like any other — including
/// ClickHouse not answering at all. Losing the lease stops the job and is returned as
/// [`RunError::LeaseLost`].
pub async fn run_once(settings: &JobsSettings, job: Job) -> Result<u64, RunnerError> {
    let pool = settings.postgres.connect().await?;
    let ctx = context_recording(settings, pool, &[(job, None)]).await?;
    let metrics = JobMetrics::default();
    ensure_schedule(&ctx.pool).await?;
    let runner = runner_name();
    let (instance, leased_at) =
        lease_when_free(&ctx.pool, &runner, job, ctx.settings.lease).await?;
    let claim = Claim {
        job,
        instance,
        failed: None,
        leased_at,
    };
    let outcome = execute(&ctx, &metrics, &runner, &claim).await;
    release(&ctx, &runner, job).await;
    // The inner error itself, so that callers find a `JobError` in the chain (the binary's exit
    // code tells a backend's failure by it).
    outcome.map_err(|e| match e {
        RunError::Failed(e) => RunnerError::Job(e),
        RunError::LeaseLost(e) => RunnerError::LeaseLost(e),
    })
}

/// Leases `job` to `runner` as soon as no other runner holds it, waiting at most two leases;
/// returns the instance (the claim's time) and when the lease began at the earliest.
async fn lease_when_free(
    pool: &PgPool,
    runner: &str,
    job: Job,
    lease: Duration,
) -> Result<(DateTime<Utc>, Instant), RunnerError> {
    let deadline = Instant::now().checked_add(lease.saturating_mul(2));
    loop {
        let leased_at = Instant::now();
        let claimed: Option<DateTime<Utc>> = sqlx::query_scalar(
            "UPDATE job_schedule SET leased_by = $2, lease_until = now() + make_interval(secs => $3)
             WHERE job = $1 AND (lease_until IS NULL OR lease_until < now()) RETURNING clock_timestamp()",
        )
        .bind(job.name())
        .bind(runner)
        .bind(lease.as_secs_f64())
        .fetch_optional(pool)
        .await?;
        if let Some(at) = claimed {
            return Ok((at, leased_at));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(RunnerError::Busy(job.name()));
        }
        tokio::time::sleep(TICK).await;
    }
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

/// Runs one instance of a claimed job: records the run, renews the lease meanwhile (stopping
/// the job if the lease is lost), and records a failure — an error or a panic — or the
/// resolution of `claim.failed`, the failed_jobs row being retried.
async fn execute(
    ctx: &Context,
    metrics: &JobMetrics,
    runner: &str,
    claim: &Claim,
) -> Result<u64, RunError> {
    let Claim {
        job,
        instance,
        failed,
        leased_at,
    } = *claim;
    let pool = &ctx.pool;
    let run: Option<i64> = sqlx::query_scalar(
        "INSERT INTO job_runs (job, instance_at, runner) VALUES ($1, $2, $3)
         ON CONFLICT (job, instance_at) DO UPDATE
           SET runner = EXCLUDED.runner, started_at = now(), finished_at = NULL
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
    let ending = run_leased(ctx, runner, job, leased_at).await;
    let elapsed = started.elapsed();
    let outcome = match ending {
        Ending::Finished(outcome) => outcome,
        Ending::Panicked(message) => {
            tracing::error!(job = job.name(), panic = %message, "job panicked");
            Err(JobError::Panicked(message))
        }
        Ending::LeaseLost(lost) => {
            metrics.observe(job, RunOutcome::LeaseLost, elapsed);
            tracing::warn!(job = job.name(), %instance, error = %lost, "lease lost; job stopped");
            abandon(pool, run, failed).await;
            return Err(lost.into());
        }
    };
    let result = if outcome.is_ok() {
        RunOutcome::Ok
    } else {
        RunOutcome::Failed
    };
    metrics.observe(job, result, elapsed);
    let items = match &outcome {
        Ok(items) => Some(i64::try_from(*items).unwrap_or(i64::MAX)),
        Err(_) => None,
    };
    sqlx::query("UPDATE job_runs SET finished_at = now(), outcome = $2, items = $3 WHERE id = $1")
        .bind(run)
        .bind(result.label())
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
    Ok(outcome?)
}

/// How a job's task ended, as the runner sees it.
enum Ending {
    /// It returned.
    Finished(Result<u64, JobError>),
    /// It panicked, with this message.
    Panicked(String),
    /// The lease was lost and the task aborted.
    LeaseLost(LeaseLost),
}

/// Runs `job` in a task of its own while keeping `runner`'s lease of it: a panic ends the task
/// only (and is reported), and losing the lease aborts the task before this returns.
async fn run_leased(ctx: &Context, runner: &str, job: Job, leased_at: Instant) -> Ending {
    let mut task = AbortOnDrop(tokio::spawn({
        let ctx = ctx.clone();
        async move {
            #[cfg(feature = "testsuite")]
            testsuite::panic_if_asked(job);
            ctx.run(job).await
        }
    }));
    tokio::select! {
        biased;
        joined = &mut task.0 => match joined {
            Ok(outcome) => Ending::Finished(outcome),
            Err(e) => Ending::Panicked(panic_message(e)),
        },
        lost = keep_lease(&ctx.pool, runner, job, ctx.settings.lease, leased_at) => {
            task.0.abort();
            // Wait until the job is really gone: it stops at its next await point.
            let _ = (&mut task.0).await;
            Ending::LeaseLost(lost)
        }
    }
}

/// A job's task, aborted when dropped, so that no job outlives the run that started it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned()),
        Err(e) => e.to_string(),
    }
}

/// Renews `runner`'s lease of `job` every third of a lease, and returns only when the lease is
/// lost: a renewal matched no row, or none succeeded for a whole lease since the last success
/// (since `leased_at` at first) — the lease may have expired and been claimed again by then.
async fn keep_lease(
    pool: &PgPool,
    runner: &str,
    job: Job,
    lease: Duration,
    leased_at: Instant,
) -> LeaseLost {
    let mut renewed = leased_at;
    let mut wait = lease / 3;
    let mut last_error = "no renewal answered".to_owned();
    loop {
        tokio::time::sleep(wait).await;
        let attempt = Instant::now();
        // A tenth of the lease short of its end, so that this runner stops before another one
        // can claim the job (clocks and the stop itself take a moment).
        let left = renewed
            .checked_add(lease - lease / 10)
            .map_or(Duration::MAX, |until| {
                until.saturating_duration_since(attempt)
            });
        if left.is_zero() {
            return LeaseLost::Unrenewable {
                job: job.name(),
                lease,
                error: last_error,
            };
        }
        match tokio::time::timeout(left, renew(pool, runner, job, lease)).await {
            Ok(Ok(true)) => {
                renewed = attempt;
                wait = lease / 3;
            }
            Ok(Ok(false)) => return LeaseLost::TakenOver { job: job.name() },
            Ok(Err(e)) => {
                tracing::warn!(job = job.name(), error = %e, "cannot renew the lease; retrying");
                last_error = e.to_string();
                // Sooner than usual, and never past the lease's end.
                wait = (lease / 10).min(left.saturating_sub(attempt.elapsed()));
            }
            Err(_) => {
                return LeaseLost::Unrenewable {
                    job: job.name(),
                    lease,
                    error: "the renewal did not answer in time".to_owned(),
                }
            }
        }
    }
}

/// Extends `runner`'s lease of `job`; false if `runner` does not hold it.
async fn renew(
    pool: &PgPool,
    runner: &str,
    job: Job,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let renewed = sqlx::query(
        "UPDATE job_schedule SET lease_until = now() + make_interval(secs => $3)
         WHERE job = $1 AND leased_by = $2",
    )
    .bind(job.name())
    .bind(runner)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(renewed.rows_affected() == 1)
}

/// The bookkeeping of a run stopped because its lease was lost: finished without an outcome
/// (the instance is not done, and may be run again), and a retried failed job due again at once
/// (its retry did not happen; it runs when the lease is free).
async fn abandon(pool: &PgPool, run: i64, failed: Option<i64>) {
    let bookkeeping = async {
        sqlx::query("UPDATE job_runs SET finished_at = now() WHERE id = $1")
            .bind(run)
            .execute(pool)
            .await?;
        if let Some(id) = failed {
            sqlx::query(
                "UPDATE failed_jobs SET next_attempt_at = now() WHERE id = $1 AND resolved_at IS NULL",
            )
            .bind(id)
            .execute(pool)
            .await?;
        }
        Ok::<(), sqlx::Error>(())
    };
    if let Err(e) = bookkeeping.await {
        tracing::warn!(run, error = %e, "cannot record the stopped run");
    }
}

/// Fault injection for the integration tests, compiled only with the `testsuite` feature (the
/// root package enables it for its tests through a dev-dependency; release builds never have
/// it): `BIOFEED_TESTSUITE_PANIC_JOB=<job name>` makes every run of that job panic, which no real
/// input is known to do.
#[cfg(feature = "testsuite")]
mod testsuite {
    use crate::jobs::Job;

    pub(super) fn panic_if_asked(job: Job) {
        if std::env::var("BIOFEED_TESTSUITE_PANIC_JOB").is_ok_and(|name| name == job.name()) {
            panic!(
                "testsuite: {} panics as BIOFEED_TESTSUITE_PANIC_JOB asks",
                job.name()
            );
        }
    }
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
            .bind(error.detail())
            .bind(error.connection())
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
            .bind(error.connection())
            .bind(serde_json::json!({ "job": job.name(), "sweep": true }))
            .bind(error.detail())
            .bind(next)
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

/// The failed jobs, unresolved only unless `all`.
pub async fn failed_jobs(
    settings: &JobsSettings,
    all: bool,
) -> Result<Vec<FailedJob>, RunnerError> {
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
pub async fn retry(settings: &JobsSettings, id: Option<i64>) -> Result<(u64, u64), RunnerError> {
    let pool = settings.postgres.connect().await?;
    ensure_schedule(&pool).await?;
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, job FROM failed_jobs WHERE resolved_at IS NULL AND ($1::bigint IS NULL OR id = $1) ORDER BY id",
    )
    .bind(id)
    .fetch_all(&pool)
    .await?;
    if let (Some(id), true) = (id, rows.is_empty()) {
        return Err(RunnerError::NoSuchFailedJob(id));
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
        // Under the job's lease, like any run: never beside a runner's run of the same job.
        let (instance, leased_at) = match lease_when_free(
            &ctx.pool,
            &runner,
            job,
            ctx.settings.lease,
        )
        .await
        {
            Ok(leased) => leased,
            Err(e) => {
                tracing::warn!(id, job = job.name(), error = %format!("{e:#}"), "cannot lease the job; not retried");
                failed += 1;
                continue;
            }
        };
        let claim = Claim {
            job,
            instance,
            failed: Some(id),
            leased_at,
        };
        let outcome = execute(&ctx, &metrics, &runner, &claim).await;
        release(&ctx, &runner, job).await;
        match outcome {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    Ok((ok, failed))
}

/// Runs the scheduler and workers until `stop` fires; then waits for running jobs to finish.
/// A job that fails, panics or loses its lease ends its run only: the runner goes on serving.
pub async fn run_runner(
    settings: JobsSettings,
    metrics: JobMetrics,
    stop: Shutdown,
) -> Result<(), RunnerError> {
    let ctx = context(&settings).await?;
    ensure_schedule(&ctx.pool).await?;
    let runner = runner_name();
    let slots = Arc::new(Semaphore::new(settings.options.concurrency as usize));
    tracing::info!(runner = %runner, concurrency = settings.options.concurrency, "jobs runner started");
    let mut tasks = tokio::task::JoinSet::new();
    while !stop.is_fired() {
        while let Some(joined) = tasks.try_join_next() {
            if let Err(e) = joined {
                tracing::error!(error = %e, "a worker ended abnormally");
            }
        }
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::time::sleep(TICK).await;
            continue;
        };
        match claim(&ctx, &runner).await {
            Ok(Some(claim)) => {
                let ctx = ctx.clone();
                let metrics = metrics.clone();
                let runner = runner.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let _ = execute(&ctx, &metrics, &runner, &claim).await;
                    release(&ctx, &runner, claim.job).await;
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

/// Claims one due thing: a failed job due for its automatic retry, else a scheduled job.
async fn claim(ctx: &Context, runner: &str) -> Result<Option<Claim>, sqlx::Error> {
    let leased_at = Instant::now();
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
            return Ok(Some(Claim {
                job,
                instance,
                failed: Some(id),
                leased_at,
            }));
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
    Ok(Some(Claim {
        job,
        instance,
        failed: None,
        leased_at,
    }))
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
