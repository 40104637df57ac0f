//! The clap definition of every subcommand, and how each one runs: one file per subcommand
//! under `cli/`, each a struct of settings and a call into the crate that does the work.
//!
//! Every setting is an argument with a `BIOFEED_…` environment variable and a loopback default
//! that matches `compose/local`.

mod admin;
mod bench;
mod consume;
mod jobs;
mod live;
mod migrate;
mod simulate;
mod up;

use std::process::ExitCode;

use biofeed_accounts::AccountsError;
use biofeed_ingest_gateway::GatewaySettings;
use clap::{Parser, Subcommand};

pub use admin::{
    AccountStore, AdminCommand, DeviceCommand, KeysCommand, RelationshipCommand, UserCommand,
};
pub use bench::BenchCommand;
pub use consume::ConsumeArgs;
pub use jobs::{JobsArgs, JobsCommand};
pub use live::LiveArgs;
pub use migrate::MigrateArgs;
pub use up::UpArgs;

use crate::telemetry::{self, LogFormat};

/// Exit codes, so that scripts can tell failures apart.
pub mod exit {
    /// Everything worked.
    pub const OK: u8 = 0;
    /// An unexpected failure; the message says what.
    pub const FAILURE: u8 = 1;
    /// The command line or a `BIOFEED_…` variable was wrong (clap's own code).
    pub const USAGE: u8 = 2;
    /// A backing service (Postgres, ClickHouse, Kafka) was unreachable or failing: retrying
    /// later may help.
    pub const UNAVAILABLE: u8 = 3;
    /// Refused: something needs an operator (e.g. a migration edited after it was applied, or
    /// a user created with an email that already has a live account).
    pub const REFUSED: u8 = 4;
}

pub(crate) const AFTER_HELP: &str = "\
Every option can also be set by the environment variable shown beside it.

Exit codes: 0 ok, 1 a failure a retry cannot fix, 2 bad arguments or settings (including a \
password, user or certificate a backing service refused), 3 retry later (a backing service \
unreachable, failing or behind; also a server that hangs up on the wrong protocol, e.g. plain \
HTTP at an HTTPS port), 4 refused until an operator acts (e.g. an \
edited migration, an email that already has an account).";

/// biofeed: ingest biofeedback sensor streams and keep them safe for years.
///
/// Devices post points to the ingest gateway, which publishes them to Kafka; consumers write
/// them to ClickHouse; people, access and jobs live in Postgres.
#[derive(Debug, Parser)]
#[command(name = "biofeed", version, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    /// Log filter: a level (error, warn, info, debug, trace) or per-crate directives.
    #[arg(long, env = "BIOFEED_LOG", default_value = "info", global = true)]
    pub log: String,

    /// Log format: text for people, json for log collectors.
    #[arg(
        long,
        env = "BIOFEED_LOG_FORMAT",
        default_value = "text",
        global = true,
        value_enum
    )]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database and topic migrations: Postgres, then ClickHouse, then Kafka topics.
    ///
    /// Idempotent: running it again applies nothing. A ClickHouse migration edited after it was
    /// applied is refused (exit 4). With --status, reports what is applied and changes nothing.
    #[command(after_help = AFTER_HELP)]
    Migrate(MigrateArgs),

    /// Run everything biofeed runs on one machine in one process: the gateway, a consumer and a
    /// jobs runner, sharing one set of settings. The default for a single machine; run
    /// `gateway`, `consume` and `jobs` separately to scale them apart.
    ///
    /// Stops on SIGTERM or Ctrl-C: the gateway finishes its requests, the consumer writes and
    /// commits its batch, running jobs finish. SIGHUP re-reads the gateway's TLS certificate and
    /// key (when it serves HTTPS) and stops nothing.
    #[command(after_help = AFTER_HELP)]
    Up(UpArgs),

    /// Run the HTTP ingest gateway: devices open sessions and post points, which are answered
    /// 202 only once Kafka has them. Serves /healthz, /readyz, /metrics and /openapi.json.
    ///
    /// Serves HTTPS (with HSTS) when given a certificate and key, else plain HTTP for a
    /// TLS-terminating proxy. SIGHUP re-reads the certificate and key: new connections get the
    /// new one, open ones are untouched (a bad new pair is logged and the old one keeps serving).
    ///
    /// Stops on SIGTERM or Ctrl-C after finishing the requests in flight.
    #[command(after_help = AFTER_HELP)]
    Gateway(Box<GatewaySettings>),

    /// Consume the points topic into ClickHouse: batches by rows, bytes and age; offsets
    /// committed only after ClickHouse has the rows; undecodable or invalid frames to the
    /// dead-letter topic; frames of erased users dropped. Run more for more throughput (up to
    /// the topic's partitions).
    ///
    /// On SIGTERM or Ctrl-C: writes and commits the batch in hand, then exits 0.
    #[command(after_help = AFTER_HELP)]
    Consume(ConsumeArgs),

    /// Read a time range of the points topic (or, with --dlq, the dead letters) again into
    /// ClickHouse. Safe beside running consumers: rows written again collapse into the
    /// originals. Prints progress and a summary.
    #[command(after_help = AFTER_HELP)]
    Replay(biofeed_consumers::ReplaySettings),

    /// Run a live member: reads the points topic in a consumer group of its own, keeps a window
    /// of every open session's samples per data type, and writes their rolling metrics (HRV and
    /// its coherence, SpO2, EEG band powers — the session metrics' arithmetic) with the newest
    /// samples for a plot to the live topic, at most once a second per data type; every gateway
    /// hands them to the viewers of GET /v1/sessions/{id}/live. Run several for more sessions
    /// (each member holds whole sessions); a restarted member rebuilds its windows from Kafka.
    ///
    /// Stops on SIGTERM or Ctrl-C.
    #[command(after_help = AFTER_HELP)]
    Live(LiveArgs),

    /// Run the job runner: rollups, session metrics, purge of failed sessions, erasure in
    /// ClickHouse and the analyst sync, each on its interval; or, with a subcommand, run one job
    /// now, list failed jobs, or retry them.
    ///
    /// Any number of runners may run side by side: each job instance runs on one of them only.
    /// On SIGTERM or Ctrl-C: takes no new work, lets running jobs finish, exits 0.
    #[command(after_help = AFTER_HELP, args_conflicts_with_subcommands = true)]
    Jobs(JobsArgs),

    /// Simulate devices through the real HTTP API: each signs a synthetic person up, registers a
    /// device and records sessions — RR intervals with respiratory sinus arrhythmia, pulse
    /// oximetry with desaturations, 8-channel EEG with an alpha rhythm — streamed at native
    /// rates in real time, most completed, some aborted. Shows progress; prints a summary, and
    /// as its last line the summary as JSON (with every session's id and status).
    ///
    /// Exit code 1 if the gateway refused any frame.
    #[command(after_help = AFTER_HELP)]
    Simulate(biofeed_simulator::SimulateSettings),

    /// Administration: users, relationships, devices and keys.
    #[command(subcommand)]
    Admin(AdminCommand),

    /// Benchmarks; each prints, as its last line, one JSON object with its figures.
    #[command(subcommand)]
    Bench(BenchCommand),
}

impl Cli {
    /// Runs the parsed command and returns the process exit code.
    pub async fn run(self) -> ExitCode {
        if let Err(e) = telemetry::init(self.log_format, &self.log) {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::USAGE);
        }
        match self.command {
            Command::Migrate(args) => migrate::run(args).await,
            Command::Up(args) => exit_with(up::run(args).await),
            Command::Simulate(settings) => exit_with(simulate::run(settings).await),
            Command::Gateway(settings) => exit_with(biofeed_ingest_gateway::run(*settings).await),
            Command::Consume(args) => exit_with(consume::run(args).await),
            Command::Replay(settings) => exit_with(consume::run_replay(settings).await),
            Command::Live(args) => exit_with(live::run(args).await),
            Command::Admin(command) => exit_with(admin::run(command).await),
            Command::Jobs(args) => exit_with(jobs::run(args).await),
            Command::Bench(BenchCommand::Gateway(settings)) => {
                exit_with(biofeed_bench::gateway::run(*settings).await)
            }
            Command::Bench(BenchCommand::Consume(settings)) => {
                exit_with(biofeed_bench::consume::run(*settings).await)
            }
            Command::Bench(BenchCommand::Export(settings)) => {
                exit_with(bench::run_export(*settings).await)
            }
            Command::Bench(BenchCommand::E2e(settings)) => {
                exit_with(bench::run_e2e(*settings).await)
            }
        }
    }
}

/// Maps a command's outcome to an exit code, printing the error.
pub(crate) fn exit_with(outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code of a failure: the first error in the chain that knows whether a retry can help
/// decides 3 (retry later) or 1; refusals an operator must resolve are 4, bad input 2.
fn exit_code(e: &anyhow::Error) -> u8 {
    // Credentials or certificates refused, or contradictory settings, however deep the wrapping:
    // the settings need fixing, a retry cannot help.
    let settings_refused = e
        .chain()
        .any(|cause| backend_error(cause).is_some_and(|b| !b.is_retryable()));
    if settings_refused {
        return exit::USAGE;
    }
    for cause in e.chain() {
        if let Some(a) = cause.downcast_ref::<AccountsError>() {
            match a {
                AccountsError::EmailTaken => return exit::REFUSED,
                AccountsError::Invalid { .. } => return exit::USAGE,
                AccountsError::Postgres(_) => return exit::UNAVAILABLE,
                _ => {}
            }
        }
        if let Some(e) = cause.downcast_ref::<biofeed_exports::ExportError>() {
            use biofeed_exports::ExportError as E;
            match e {
                E::Unsupported { .. } => return exit::USAGE,
                E::NotFound | E::NotExportable(_) => return exit::REFUSED,
                E::Points(_) => return exit::UNAVAILABLE,
                E::Accounts(AccountsError::Postgres(_)) => return exit::UNAVAILABLE,
                _ => return exit::FAILURE,
            }
        }
        // A certificate or key that cannot serve is a setting to fix, like a bad argument.
        if cause.is::<Refused>() || cause.is::<biofeed_ingest_gateway::tls::TlsError>() {
            return exit::USAGE;
        }
        let retryable = retry_hint(cause);
        match retryable {
            Some(true) => return exit::UNAVAILABLE,
            Some(false) => return exit::FAILURE,
            None => {}
        }
    }
    exit::FAILURE
}

/// The backend error `cause` is, or wraps transparently (a transparent wrapper hands its
/// inner error's source on, so the chain never shows the inner error itself).
fn backend_error<'a>(
    cause: &'a (dyn std::error::Error + 'static),
) -> Option<&'a biofeed_backends::BackendError> {
    use biofeed_consumers::ConsumeError;
    use biofeed_jobs::jobs::JobError;
    use biofeed_jobs::RunnerError;
    use biofeed_migrations::MigrateError;
    if let Some(b) = cause.downcast_ref::<biofeed_backends::BackendError>() {
        return Some(b);
    }
    match cause.downcast_ref::<MigrateError>() {
        Some(MigrateError::Backend(b)) => return Some(b),
        Some(_) => return None,
        None => {}
    }
    match cause.downcast_ref::<ConsumeError>() {
        Some(ConsumeError::Backend(b)) => return Some(b),
        Some(_) => return None,
        None => {}
    }
    match cause.downcast_ref::<biofeed_live::LiveError>() {
        Some(biofeed_live::LiveError::Backend(b)) => return Some(b),
        Some(_) => return None,
        None => {}
    }
    let job = match cause.downcast_ref::<RunnerError>() {
        Some(RunnerError::Unreachable(b)) => return Some(b),
        Some(RunnerError::Job(job)) => Some(job),
        Some(_) => return None,
        None => cause.downcast_ref::<JobError>(),
    };
    match job {
        Some(JobError::Unreachable(b)) => Some(b),
        _ => None,
    }
}

/// Whether this error knows that a retry can help (`Some(true)`), cannot (`Some(false)`), or
/// does not say (`None`).
fn retry_hint(cause: &(dyn std::error::Error + 'static)) -> Option<bool> {
    if let Some(b) = cause.downcast_ref::<biofeed_backends::BackendError>() {
        return Some(b.is_retryable());
    }
    if cause.is::<biofeed_simulator::GatewayUnavailable>() {
        return Some(true);
    }
    if let Some(r) = cause.downcast_ref::<biofeed_jobs::RunnerError>() {
        return Some(r.is_retryable());
    }
    if let Some(j) = cause.downcast_ref::<biofeed_jobs::jobs::JobError>() {
        return Some(j.is_retryable());
    }
    if let Some(l) = cause.downcast_ref::<biofeed_live::LiveError>() {
        return Some(l.is_retryable());
    }
    cause
        .downcast_ref::<biofeed_consumers::ConsumeError>()
        .map(biofeed_consumers::ConsumeError::is_retryable)
}

/// A time for the CLI's tables (RFC 3339, to the second, UTC), or `-`.
pub(crate) fn utc_or_dash(time: Option<chrono::DateTime<chrono::Utc>>) -> String {
    time.map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// Rows as JSON lines (with `--json`: `to_json` is `serde_json::to_string`), or as a table:
/// `header`, then each row's `line`.
pub(crate) fn print_rows<T>(
    rows: &[T],
    to_json: Option<fn(&T) -> serde_json::Result<String>>,
    header: &str,
    line: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    if let Some(to_json) = to_json {
        for row in rows {
            println!("{}", to_json(row)?);
        }
    } else {
        println!("{header}");
        for row in rows {
            println!("{}", line(row));
        }
    }
    Ok(())
}

/// A progress bar on standard error for long admin work.
pub(crate) fn progress_bar(verb: &str, things: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {verb} [{{bar:40}}] {{pos}}/{{len}} {things} ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// A command refused until the operator says more (exit 2, nothing done).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(String);

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
