//! Prometheus metrics of the runner: runs by job and outcome (ok, failed, lease_lost), and run
//! durations.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::Job;

/// Labels of a run.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    /// The job.
    pub job: &'static str,
    /// `ok`, `failed` or `lease_lost`.
    pub outcome: &'static str,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The job succeeded.
    Ok,
    /// The job returned an error or panicked.
    Failed,
    /// The runner lost the lease and stopped the job (another runner holds it).
    LeaseLost,
}

impl RunOutcome {
    /// Its label in metrics (and, for `ok` and `failed`, in `job_runs.outcome`).
    pub fn label(self) -> &'static str {
        match self {
            RunOutcome::Ok => "ok",
            RunOutcome::Failed => "failed",
            RunOutcome::LeaseLost => "lease_lost",
        }
    }
}

/// Labels of a duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// The job.
    pub job: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// The runner's metrics.
#[derive(Clone)]
pub struct JobMetrics {
    /// Runs by job and outcome.
    pub runs: Family<RunLabels, Counter>,
    /// Seconds per run, by job.
    pub durations: Family<JobLabels, Histogram, fn() -> Histogram>,
}

impl Default for JobMetrics {
    fn default() -> Self {
        Self {
            runs: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl JobMetrics {
    /// Metrics registered in `registry` under `biofeed_jobs_…`.
    pub fn registered(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry_with_prefix("biofeed_jobs");
        sub.register(
            "runs",
            "job runs by job and outcome (ok, failed, lease_lost)",
            metrics.runs.clone(),
        );
        sub.register(
            "run_duration_seconds",
            "how long job runs took, by job",
            metrics.durations.clone(),
        );
        metrics
    }

    /// Records one run.
    pub fn observe(&self, job: Job, outcome: RunOutcome, elapsed: Duration) {
        self.runs
            .get_or_create(&RunLabels {
                job: job.name(),
                outcome: outcome.label(),
            })
            .inc();
        self.durations
            .get_or_create(&JobLabels { job: job.name() })
            .observe(elapsed.as_secs_f64());
    }
}
