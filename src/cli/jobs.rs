//! `biofeed jobs`: the runner, one job now, failed jobs and their retries.

use clap::{Args, Subcommand};

use biofeed_backends::shutdown::Shutdown;
use biofeed_ingest_gateway::metrics_endpoint::MetricsEndpoint;
use prometheus_client::registry::Registry;

use crate::cli::{print_rows, utc_or_dash, AFTER_HELP};

/// Arguments of `biofeed jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// One job now, or the failed jobs.
    #[command(subcommand)]
    pub command: Option<JobsCommand>,
    /// Address of the runner's Prometheus endpoint (/metrics).
    #[arg(
        long,
        value_name = "ADDR",
        env = "BIOFEED_JOBS_METRICS_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    pub metrics_listen: std::net::SocketAddr,
    /// The runner's settings.
    #[command(flatten)]
    pub settings: Box<biofeed_jobs::JobsSettings>,
}

/// `biofeed jobs …`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Run one job now (under the same lease as the runners, so never beside another run of it);
    /// a failure is recorded in failed_jobs. Prints how many items it handled. If the lease is
    /// lost meanwhile (taken over, or not renewable), the job is stopped and this exits 1.
    #[command(after_help = AFTER_HELP)]
    Run {
        /// The job.
        #[arg(value_enum)]
        job: biofeed_jobs::Job,
        /// The settings.
        #[command(flatten)]
        settings: Box<biofeed_jobs::JobsSettings>,
    },
    /// List failed jobs: id, job, connection, attempts, next automatic retry, error.
    #[command(after_help = AFTER_HELP)]
    Failed {
        /// Include resolved ones.
        #[arg(long)]
        all: bool,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// The settings.
        #[command(flatten)]
        settings: Box<biofeed_jobs::JobsSettings>,
    },
    /// Re-run failed jobs now: one by id, or every unresolved one with --all. A success marks
    /// the row resolved; a failure counts an attempt and keeps the error. Each runs under its
    /// job's lease, like a runner's run, so it waits for a running instance of that job to end.
    #[command(after_help = AFTER_HELP)]
    Retry {
        /// The failed job's id (from `biofeed jobs failed`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every unresolved failed job.
        #[arg(long)]
        all: bool,
        /// The settings.
        #[command(flatten)]
        settings: Box<biofeed_jobs::JobsSettings>,
    },
}

pub(crate) async fn run(args: JobsArgs) -> anyhow::Result<()> {
    match args.command {
        None => {
            let shutdown = Shutdown::on_signal();
            let endpoint = MetricsEndpoint::bind(args.metrics_listen).await?;
            let mut registry = Registry::default();
            let metrics = biofeed_jobs::metrics::JobMetrics::registered(&mut registry);
            let serving = endpoint.serve(registry);
            let outcome = biofeed_jobs::run_runner(*args.settings, metrics, shutdown).await;
            serving.stop().await;
            Ok(outcome?)
        }
        Some(JobsCommand::Run { job, settings }) => {
            let items = biofeed_jobs::run_once(&settings, job).await?;
            eprintln!("{}: done, {items} items", job.name());
            println!(
                "{}",
                serde_json::json!({ "job": job.name(), "items": items })
            );
            Ok(())
        }
        Some(JobsCommand::Failed {
            all,
            json,
            settings,
        }) => {
            let rows = biofeed_jobs::failed_jobs(&settings, all).await?;
            print_rows(
                &rows,
                json.then_some(serde_json::to_string),
                &format!(
                    "{:>6}  {:<16}  {:<10}  {:>8}  {:<20}  {:<20}  error",
                    "id", "job", "connection", "attempts", "failed", "next retry"
                ),
                |row| {
                    let next = if row.resolved_at.is_some() {
                        "resolved".to_owned()
                    } else {
                        utc_or_dash(row.next_attempt_at)
                    };
                    format!(
                        "{:>6}  {:<16}  {:<10}  {:>8}  {:<20}  {:<20}  {}",
                        row.id,
                        row.job,
                        row.connection,
                        row.attempts,
                        utc_or_dash(Some(row.failed_at)),
                        next,
                        row.error
                    )
                },
            )
        }
        Some(JobsCommand::Retry { id, settings, .. }) => {
            let (ok, failed) = biofeed_jobs::retry(&settings, id).await?;
            eprintln!(
                "retried {} failed jobs: {ok} succeeded, {failed} failed again",
                ok + failed
            );
            anyhow::ensure!(
                failed == 0,
                "{failed} of {} retries failed again (see `biofeed jobs failed`)",
                ok + failed
            );
            Ok(())
        }
    }
}
