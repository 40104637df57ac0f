//! The clap definition of every subcommand, and how each one runs.
//!
//! Every setting is an argument with a `BIOFEED_…` environment variable and a loopback default
//! that matches `compose/local`.

use std::process::ExitCode;

use biofeed_accounts::{
    devices, erase, relationships, rotation, users, AccountKeys, Accounts, AccountsError,
};
use biofeed_backends::postgres::PostgresSettings;
use biofeed_backends::StoreSettings;
use biofeed_ingest_gateway::GatewaySettings;
use biofeed_migrations::{MigrateError, MigrateSettings, StepReport, TopicLayout};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

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

const AFTER_HELP: &str = "\
Every option can also be set by the environment variable shown beside it.

Exit codes: 0 ok, 1 failure, 2 bad arguments or settings, 3 a backing service is \
unreachable (retry later), 4 refused until an operator acts (e.g. an edited migration, an email that already has an account).";

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
    /// commits its batch, running jobs finish.
    #[command(after_help = AFTER_HELP)]
    Up(UpArgs),

    /// Run the HTTP ingest gateway: devices open sessions and post points, which are answered
    /// 202 only once Kafka has them. Serves /healthz, /readyz, /metrics and /openapi.json.
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

/// `biofeed bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Points per second through the gateway (JSON and Avro, 1 and 8 channels) against
    /// producing the same frames straight into Kafka; request latency p50/p99.
    ///
    /// Needs the PII keys; makes a Postgres database (migrated, holding the bench user) and a
    /// topic of its own, and drops them afterwards: nothing lands in the configured database.
    #[command(after_help = AFTER_HELP)]
    Gateway(Box<biofeed_ingest_gateway::bench::BenchGatewaySettings>),

    /// Points per second one consumer drains from Kafka into ClickHouse, against ClickHouse's
    /// own Kafka table engine with a materialized view on the same points; bytes per point on
    /// disk. Makes and afterwards drops Postgres and ClickHouse databases and topics of its own.
    #[command(after_help = AFTER_HELP)]
    Consume(Box<biofeed_consumers::bench::BenchConsumeSettings>),

    /// The whole pipeline under sustained load: many simulated devices post through HTTP to a
    /// `biofeed up` of its own (own Postgres and ClickHouse databases and topics, dropped
    /// afterwards: nothing lands in the configured ones) for a fixed time; reports
    /// points/s offered vs stored, end-to-end latency (device send → queryable in ClickHouse)
    /// p50/p99, gateway p99, peak RSS, bytes per point on disk; then runs `bench gateway` and
    /// `bench consume` as the peer comparisons; writes a markdown report (docs/bench-e2e.md).
    ///
    /// Needs the PII keys. Exit code 1 if a point was lost.
    #[command(after_help = AFTER_HELP)]
    E2e(Box<biofeed_simulator::bench::BenchE2eSettings>),
}

/// Arguments of `biofeed consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Address of the consumer's Prometheus endpoint (/metrics).
    #[arg(
        long,
        value_name = "ADDR",
        env = "BIOFEED_CONSUMER_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: std::net::SocketAddr,
    /// The consumer's settings.
    #[command(flatten)]
    pub settings: biofeed_consumers::ConsumeSettings,
}

/// Arguments of `biofeed up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address of the Prometheus endpoint of the consumer and the jobs runner (the gateway
    /// serves its own at /metrics).
    #[arg(
        long = "metrics-listen",
        id = "up_metrics_listen",
        value_name = "ADDR",
        env = "BIOFEED_UP_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: std::net::SocketAddr,
    /// The gateway's settings, and where every service is.
    #[command(flatten)]
    pub gateway: Box<GatewaySettings>,
    /// The consumer's settings.
    #[command(flatten, next_help_heading = "Consumer")]
    pub consumer: biofeed_consumers::ConsumerOptions,
    /// The jobs runner's settings.
    #[command(flatten, next_help_heading = "Jobs")]
    pub jobs: biofeed_jobs::JobsOptions,
}

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

/// `biofeed admin …`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Users: create, list, export, erase.
    #[command(subcommand)]
    User(UserCommand),
    /// Relationships (guardian–child, practitioner–patient, …) and their consent.
    #[command(subcommand)]
    Relationship(RelationshipCommand),
    /// Devices and their tokens.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// The PII keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// Postgres and the PII keys: what most admin commands need.
#[derive(Debug, Args)]
pub struct AccountStore {
    /// Where Postgres is.
    #[command(flatten, next_help_heading = "Postgres")]
    pub postgres: PostgresSettings,
    /// PII keys.
    #[command(flatten, next_help_heading = "Keys")]
    pub keys: AccountKeys,
}

impl AccountStore {
    async fn connect(self) -> anyhow::Result<Accounts> {
        Ok(Accounts {
            pool: self.postgres.connect().await?,
            keys: self.keys,
        })
    }
}

/// `biofeed admin user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; prints the new user's id. The email is stored only encrypted and as a
    /// keyed blind index; the password (read from standard input) only as an argon2id hash.
    ///
    /// One live account per email: an email that already has one is refused (exit 4) and
    /// nothing is created; erase the other account first, or use another email.
    #[command(after_help = AFTER_HELP)]
    Create {
        /// The user's email.
        #[arg(long)]
        email: String,
        /// The role: user, guardian, practitioner, admin or analyst.
        #[arg(long, default_value = "user")]
        role: String,
        /// Read a password from the first line of standard input, so the user can log in.
        #[arg(long)]
        password_stdin: bool,
        /// Date of birth (YYYY-MM-DD): decides whether a guardian must consent.
        #[arg(long, value_name = "YYYY-MM-DD")]
        birth_date: Option<chrono::NaiveDate>,
        /// Country, ISO 3166-1 alpha-2 (decides the consent age).
        #[arg(long, value_name = "CC")]
        country: Option<String>,
        /// Password hashing cost.
        #[command(flatten, next_help_heading = "Logins")]
        passwords: biofeed_accounts::passwords::PasswordSettings,
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
    },
    /// List users: ids, roles and dates. No PII unless --show-pii, which decrypts each email
    /// and writes one audit record per user shown.
    #[command(after_help = AFTER_HELP)]
    List {
        /// Only users of this role.
        #[arg(long)]
        role: Option<String>,
        /// Show each live user's email (audited).
        #[arg(long)]
        show_pii: bool,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
    },
    /// Erase a user (GDPR article 17): destroy their data key, delete their PII, sessions,
    /// devices and relationships, put them on the erasure list the consumers honour and queue
    /// the deletion of their points from ClickHouse. Cannot be undone.
    #[command(after_help = AFTER_HELP)]
    Erase {
        /// The user's id.
        user_id: Uuid,
        /// Confirm: without it nothing is erased (exit 2).
        #[arg(long)]
        yes: bool,
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
    },
    /// Write everything held about a user (GDPR article 15) to standard output as
    /// newline-delimited JSON (format `biofeed-export/1`, see `GET /v1/me/export`).
    ///
    /// Audited: the export is recorded in the user's access log (action `data.export`, actor
    /// none: an operator) before anything is decrypted.
    #[command(after_help = AFTER_HELP)]
    Export {
        /// The user's id.
        user_id: Uuid,
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
        /// Where ClickHouse is (the points).
        #[command(flatten, next_help_heading = "ClickHouse")]
        clickhouse: biofeed_backends::clickhouse::ClickHouseSettings,
    },
}

/// `biofeed admin relationship …`.
#[derive(Debug, Subcommand)]
pub enum RelationshipCommand {
    /// Record a relationship; prints its id. By default it is live at once (the operator
    /// records consent given outside biofeed); with --pending it waits for acceptance in the API.
    #[command(after_help = AFTER_HELP)]
    Add {
        /// The lead: the guardian or practitioner.
        #[arg(long)]
        lead: Uuid,
        /// The follower: the child or patient.
        #[arg(long)]
        follower: Uuid,
        /// parent_child, guardian_ward, practitioner_patient or coach_athlete.
        #[arg(long = "type", value_name = "TYPE")]
        kind: String,
        /// Leave it pending until the other party accepts.
        #[arg(long)]
        pending: bool,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
    /// Revoke a relationship: it stops granting access on the next request.
    #[command(after_help = AFTER_HELP)]
    Revoke {
        /// The relationship's id.
        id: Uuid,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
    /// List relationships (ids, types, dates; no PII).
    #[command(after_help = AFTER_HELP)]
    List {
        /// Only this user's relationships.
        #[arg(long)]
        user_id: Option<Uuid>,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
}

/// `biofeed admin keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-wrap every user's data key under the current master key (BIOFEED_MASTER_KEY, version
    /// BIOFEED_MASTER_KEY_VERSION), reading older ones with BIOFEED_MASTER_KEYS_PREVIOUS.
    ///
    /// Without downtime: first give every service the new key as current and the old one as
    /// previous, then run this, then drop the old key from the previous list. Safe to interrupt
    /// and to run again.
    #[command(after_help = AFTER_HELP)]
    Rotate {
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
    },
}

/// `biofeed admin device …`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device for a user and print its bearer token. The token is shown this once:
    /// only its hash is stored.
    #[command(after_help = AFTER_HELP)]
    Create {
        /// The user, by email.
        #[arg(long, conflicts_with = "user_id", required_unless_present = "user_id")]
        user: Option<String>,
        /// The user, by id.
        #[arg(long)]
        user_id: Option<Uuid>,
        /// The device's model, e.g. "Polar H10".
        #[arg(long, default_value = "")]
        model: String,
        /// Postgres and keys (the blind-index key finds the user by email).
        #[command(flatten)]
        store: AccountStore,
    },
    /// Revoke a device: its token stops working (within the gateway's auth cache TTL).
    #[command(after_help = AFTER_HELP)]
    Revoke {
        /// The device's id.
        device_id: Uuid,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
    /// List devices: ids, users, models and dates, no tokens.
    #[command(after_help = AFTER_HELP)]
    List {
        /// Only this user's devices.
        #[arg(long)]
        user_id: Option<Uuid>,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
}

/// Arguments of `biofeed migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Report what is applied and what is pending; change nothing.
    #[arg(long)]
    pub status: bool,

    /// Where the services are, and the topics' names.
    #[command(flatten)]
    pub stores: StoreSettings,

    /// The topics' partitions and retention.
    #[command(flatten, next_help_heading = "Kafka topics")]
    pub layout: TopicLayout,
}

impl Cli {
    /// Runs the parsed command and returns the process exit code.
    pub async fn run(self) -> ExitCode {
        if let Err(e) = telemetry::init(self.log_format, &self.log) {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::USAGE);
        }
        match self.command {
            Command::Migrate(args) => run_migrate(args).await,
            Command::Up(args) => exit_with(run_up(args).await),
            Command::Simulate(settings) => exit_with(run_simulate(settings).await),
            Command::Gateway(settings) => exit_with(biofeed_ingest_gateway::run(*settings).await),
            Command::Consume(args) => exit_with(run_consume(args).await),
            Command::Replay(settings) => exit_with(run_replay(settings).await),
            Command::Admin(command) => exit_with(run_admin(command).await),
            Command::Jobs(args) => exit_with(run_jobs(args).await),
            Command::Bench(BenchCommand::Gateway(settings)) => {
                exit_with(biofeed_ingest_gateway::bench::run(*settings).await)
            }
            Command::Bench(BenchCommand::Consume(settings)) => {
                exit_with(biofeed_consumers::bench::run(*settings).await)
            }
            Command::Bench(BenchCommand::E2e(settings)) => {
                exit_with(run_bench_e2e(*settings).await)
            }
        }
    }
}

async fn run_migrate(args: MigrateArgs) -> ExitCode {
    let settings = MigrateSettings {
        stores: args.stores,
        layout: args.layout,
    };
    let outcome = if args.status {
        biofeed_migrations::status(&settings).await
    } else {
        biofeed_migrations::migrate(&settings).await
    };
    match outcome {
        Ok(reports) => {
            print_reports(&reports, args.status);
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            tracing::error!(error = %e, "migrate failed");
            eprintln!("error: {e}");
            ExitCode::from(migrate_exit_code(&e))
        }
    }
}

/// Maps a command's outcome to an exit code, printing the error.
fn exit_with(outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            let unavailable = e.chain().any(|cause| {
                cause.is::<biofeed_backends::BackendError>()
                    || cause.is::<biofeed_jobs::jobs::JobError>()
                    || cause
                        .downcast_ref::<AccountsError>()
                        .is_some_and(|a| matches!(a, AccountsError::Postgres(_)))
            });
            let refused = e.chain().any(|cause| {
                cause
                    .downcast_ref::<AccountsError>()
                    .is_some_and(|a| matches!(a, AccountsError::EmailTaken))
            });
            let usage = e.chain().any(|cause| {
                cause.is::<Refused>()
                    || cause
                        .downcast_ref::<AccountsError>()
                        .is_some_and(|a| matches!(a, AccountsError::Invalid { .. }))
            });
            ExitCode::from(if unavailable {
                exit::UNAVAILABLE
            } else if refused {
                exit::REFUSED
            } else if usage {
                exit::USAGE
            } else {
                exit::FAILURE
            })
        }
    }
}

async fn run_consume(args: ConsumeArgs) -> anyhow::Result<()> {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use biofeed_ingest_gateway::metrics_endpoint;

    let stop = Arc::new(AtomicBool::new(false));
    biofeed_consumers::stop_on_signal(Arc::clone(&stop));
    let listener = metrics_endpoint::bind(args.metrics_listen).await?;
    let mut registry = prometheus_client::registry::Registry::default();
    // Prepared first: it registers the consumer's metrics before the registry is shared.
    let consumer = biofeed_consumers::prepare(args.settings, &mut registry).await?;
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let endpoint = tokio::spawn(metrics_endpoint::serve(
        listener,
        Arc::new(registry),
        async move {
            let _ = metrics_stopped.await;
        },
    ));
    let outcome = consumer.run(stop).await;
    let _ = metrics_stop.send(());
    if let Ok(Err(e)) = endpoint.await {
        tracing::warn!(error = %format!("{e:#}"), "the metrics endpoint failed");
    }
    let summary = outcome?;
    eprintln!(
        "stopped: {} rows written, {} frames dead-lettered, {} frames of erased users and {} of closed sessions dropped",
        summary.rows, summary.dead_lettered, summary.dropped_erased, summary.dropped_closed
    );
    Ok(())
}

async fn run_bench_e2e(settings: biofeed_simulator::bench::BenchE2eSettings) -> anyhow::Result<()> {
    let figures =
        biofeed_simulator::bench::run(&settings, |step| eprintln!("bench e2e: {step}")).await?;
    eprintln!(
        "end to end: {:.0} points/s offered, {:.0} stored (ratio {:.3}); latency device → queryable p50 {:.0} ms, p99 {:.0} ms; \
         gateway p99 {:.1} ms; peak RSS {:.0} MiB; {:.2} bytes/point; {} accepted, {} stored; report in {}",
        figures.offered_points_per_s,
        figures.stored_points_per_s,
        figures.ratio,
        figures.e2e_p50_ms,
        figures.e2e_p99_ms,
        figures.gateway_p99_ms,
        figures.peak_rss_mib,
        figures.bytes_per_point,
        figures.accepted,
        figures.stored,
        settings.report.display()
    );
    println!("{}", serde_json::to_string(&figures)?);
    anyhow::ensure!(
        figures.lost == 0,
        "{} accepted points never became queryable",
        figures.lost
    );
    Ok(())
}

async fn run_simulate(settings: biofeed_simulator::SimulateSettings) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let progress = Arc::new(biofeed_simulator::Progress::default());
    let bar = indicatif::ProgressBar::new(settings.duration.as_secs().max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} simulate [{bar:30}] {elapsed}/{len}s  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let ticker = {
        let (bar, progress) = (bar.clone(), Arc::clone(&progress));
        let devices = settings.devices;
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                let elapsed = started.elapsed().as_secs_f64();
                let points = progress.points.load(Ordering::Relaxed);
                bar.set_position(elapsed as u64);
                bar.set_message(format!(
                    "{}/{devices} devices ready, {} sessions done, {points} points ({:.0}/s)",
                    progress.ready.load(Ordering::Relaxed),
                    progress.sessions.load(Ordering::Relaxed),
                    points as f64 / elapsed.max(1e-3)
                ));
            }
        })
    };
    let outcome = biofeed_simulator::simulate(&settings, Arc::clone(&progress)).await;
    ticker.abort();
    bar.finish_and_clear();
    let summary = outcome?;
    eprintln!(
        "simulated {} devices for {:.1} s: {} sessions completed, {} aborted; {} points accepted \
         ({:.0} points/s, {} of them in completed sessions); request latency p50 {:.1} ms, p99 {:.1} ms; \
         {} frames refused, {} retried",
        summary.devices,
        summary.elapsed_s,
        summary.completed,
        summary.aborted,
        summary.points_accepted,
        summary.points_per_s,
        summary.points_completed,
        summary.latency_p50_ms,
        summary.latency_p99_ms,
        summary.frames_refused,
        summary.frames_retried
    );
    println!("{}", serde_json::to_string(&summary)?);
    anyhow::ensure!(
        summary.frames_refused == 0,
        "the gateway refused {} frames (see the warnings above)",
        summary.frames_refused
    );
    Ok(())
}

async fn run_up(args: UpArgs) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use biofeed_ingest_gateway::metrics_endpoint;

    let stop = Arc::new(AtomicBool::new(false));
    biofeed_consumers::stop_on_signal(Arc::clone(&stop));
    let gateway = *args.gateway;
    let stores = StoreSettings {
        postgres: gateway.postgres.clone(),
        clickhouse: gateway.clickhouse.clone(),
        kafka: gateway.kafka.clone(),
        topics: gateway.topics.clone(),
    };
    let jobs = biofeed_jobs::JobsSettings {
        options: args.jobs,
        postgres: stores.postgres.clone(),
        clickhouse: stores.clickhouse.clone(),
        kafka: stores.kafka.clone(),
        topics: stores.topics.clone(),
        consumer_group: args.consumer.group.clone(),
    };
    let listener = metrics_endpoint::bind(args.metrics_listen).await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let consumer = biofeed_consumers::prepare(
        biofeed_consumers::ConsumeSettings {
            options: args.consumer,
            stores,
        },
        &mut registry,
    )
    .await?;
    let job_metrics = biofeed_jobs::metrics::JobMetrics::registered(&mut registry);
    let app = biofeed_ingest_gateway::Application::build(gateway).await?;
    eprintln!(
        "biofeed up: gateway on http://{}, consumer and jobs metrics on http://{}/metrics",
        app.local_addr()?,
        listener.local_addr()?
    );
    let stopped = {
        let stop = Arc::clone(&stop);
        async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    let metrics_stopped = {
        let stop = Arc::clone(&stop);
        async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    let endpoint = tokio::spawn(metrics_endpoint::serve(
        listener,
        Arc::new(registry),
        metrics_stopped,
    ));
    let mut parts = tokio::task::JoinSet::new();
    parts.spawn(async move { ("gateway", app.run_until(stopped).await) });
    {
        let stop = Arc::clone(&stop);
        parts.spawn(async move {
            let outcome = consumer.run(stop).await;
            if let Ok(summary) = &outcome {
                eprintln!(
                    "consumer stopped: {} rows written, {} frames dead-lettered, {} frames of erased users and {} of closed sessions dropped",
                    summary.rows, summary.dead_lettered, summary.dropped_erased, summary.dropped_closed
                );
            }
            ("consumer", outcome.map(|_| ()).map_err(anyhow::Error::from))
        });
    }
    {
        let stop = Arc::clone(&stop);
        parts.spawn(async move {
            (
                "jobs",
                biofeed_jobs::run_runner(jobs, job_metrics, stop).await,
            )
        });
    }
    // The first part to end (a failure, or the signal) stops the others.
    let mut failure = None;
    while let Some(ended) = parts.join_next().await {
        stop.store(true, Ordering::SeqCst);
        match ended {
            Ok((_, Ok(()))) => {}
            Ok((part, Err(e))) => {
                eprintln!("error: the {part} failed: {e:#}");
                failure.get_or_insert(e.context(format!("the {part} failed")));
            }
            Err(e) => {
                failure.get_or_insert(anyhow::anyhow!("a part panicked: {e}"));
            }
        }
    }
    if let Ok(Err(e)) = endpoint.await {
        tracing::warn!(error = %format!("{e:#}"), "the metrics endpoint failed");
    }
    failure.map_or(Ok(()), Err)
}

async fn run_jobs(args: JobsArgs) -> anyhow::Result<()> {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use biofeed_ingest_gateway::metrics_endpoint;

    match args.command {
        None => {
            let stop = Arc::new(AtomicBool::new(false));
            biofeed_consumers::stop_on_signal(Arc::clone(&stop));
            let listener = metrics_endpoint::bind(args.metrics_listen).await?;
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = biofeed_jobs::metrics::JobMetrics::registered(&mut registry);
            let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
            let endpoint = tokio::spawn(metrics_endpoint::serve(
                listener,
                Arc::new(registry),
                async move {
                    let _ = metrics_stopped.await;
                },
            ));
            let outcome = biofeed_jobs::run_runner(*args.settings, metrics, stop).await;
            let _ = metrics_stop.send(());
            if let Ok(Err(e)) = endpoint.await {
                tracing::warn!(error = %format!("{e:#}"), "the metrics endpoint failed");
            }
            outcome
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
            if json {
                for row in &rows {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else {
                println!(
                    "{:>6}  {:<16}  {:<10}  {:>8}  {:<20}  {:<20}  error",
                    "id", "job", "connection", "attempts", "failed", "next retry"
                );
                for row in &rows {
                    let next = if row.resolved_at.is_some() {
                        "resolved".to_owned()
                    } else {
                        utc_or_dash(row.next_attempt_at)
                    };
                    println!(
                        "{:>6}  {:<16}  {:<10}  {:>8}  {:<20}  {:<20}  {}",
                        row.id,
                        row.job,
                        row.connection,
                        row.attempts,
                        utc_or_dash(Some(row.failed_at)),
                        next,
                        row.error
                    );
                }
            }
            Ok(())
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

async fn run_replay(settings: biofeed_consumers::ReplaySettings) -> anyhow::Result<()> {
    let bar = progress_bar("replay", "messages");
    let progress = bar.clone();
    let summary = biofeed_consumers::replay(settings, move |done, total| {
        progress.set_length(total);
        progress.set_position(done);
    })
    .await?;
    bar.finish_and_clear();
    eprintln!(
        "replayed {} messages: {} frames and {} points written, {} skipped (still failing the checks), {} frames of erased users and {} of closed sessions dropped",
        summary.messages, summary.frames, summary.points, summary.skipped, summary.dropped_erased, summary.dropped_closed
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

async fn run_admin(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::User(command) => run_admin_user(command).await?,
        AdminCommand::Relationship(command) => run_admin_relationship(command).await?,
        AdminCommand::Keys(KeysCommand::Rotate { store }) => {
            let accounts = store.connect().await?;
            let bar = progress_bar("rotate", "data keys");
            let progress = bar.clone();
            let rotated = rotation::rotate_master_key(&accounts, move |done, total| {
                progress.set_length(total);
                progress.set_position(done);
            })
            .await?;
            bar.finish_and_clear();
            eprintln!(
                "re-wrapped {} data keys under master key version {}; {} were already under it",
                rotated.rewrapped, accounts.keys.master_key_version, rotated.already_current
            );
        }
        AdminCommand::Device(DeviceCommand::Create {
            user,
            user_id,
            model,
            store,
        }) => {
            let accounts = store.connect().await?;
            let user_id = match (user_id, user) {
                (Some(id), _) => id,
                (None, Some(email)) => {
                    users::one_by_email(&accounts, &users::Email::parse(&email)?).await?
                }
                (None, None) => anyhow::bail!("name the user with --user or --user-id"),
            };
            let device = devices::create_device(&accounts.pool, user_id, &model).await?;
            eprintln!(
                "device {} created for user {user_id}; its token is shown only now:",
                device.id
            );
            println!("{}", device.token);
        }
        AdminCommand::Device(DeviceCommand::Revoke {
            device_id,
            postgres,
        }) => {
            devices::revoke_device(&postgres.connect().await?, device_id, None).await?;
            eprintln!("device {device_id} revoked");
        }
        AdminCommand::Device(DeviceCommand::List { user_id, postgres }) => {
            let rows = devices::list_devices(&postgres.connect().await?, user_id).await?;
            println!(
                "{:<36}  {:<36}  {:<20}  {:<20}  {:<20}  model",
                "device", "user", "created", "last seen", "revoked"
            );
            for d in rows {
                println!(
                    "{:<36}  {:<36}  {:<20}  {:<20}  {:<20}  {}",
                    d.id,
                    d.user_id,
                    d.created_at,
                    d.last_seen_at.as_deref().unwrap_or("-"),
                    d.revoked_at.as_deref().unwrap_or("-"),
                    d.model
                );
            }
        }
    }
    Ok(())
}

async fn run_admin_user(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Create {
            email,
            role,
            password_stdin,
            birth_date,
            country,
            passwords,
            store,
        } => {
            let email = users::Email::parse(&email)?;
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                let password = line.trim_end_matches(['\r', '\n']).to_owned();
                // A password the rules refuse is refused before Postgres is reached.
                biofeed_accounts::passwords::check_new_password(&password)?;
                let hasher = biofeed_accounts::passwords::Passwords::new(&passwords)?;
                Some((hasher, password))
            } else {
                None
            };
            let accounts = store.connect().await?;
            let user = users::NewUser {
                email,
                role,
                password_hash: None,
                fields: users::ProfileFields {
                    birth_date,
                    country,
                    ..Default::default()
                },
                terms_version: None,
            };
            let id = match password {
                Some((hasher, password)) => {
                    users::create_with_password(&accounts, &hasher, user, password).await?
                }
                None => users::create(&accounts, &user).await?,
            };
            println!("{id}");
        }
        UserCommand::List {
            role,
            show_pii,
            json,
            store,
        } => {
            let accounts = store.connect().await?;
            let listing =
                users::list_users(&accounts, role.as_deref(), show_pii.then_some(None)).await?;
            if show_pii {
                eprintln!(
                    "showing emails of {} users; each reveal is in the audit log",
                    listing.len()
                );
            }
            if json {
                for user in &listing {
                    println!("{}", serde_json::to_string(user)?);
                }
            } else {
                println!(
                    "{:<36}  {:<12}  {:<20}  {:<20}  email",
                    "user", "role", "created", "erased"
                );
                for u in &listing {
                    println!(
                        "{:<36}  {:<12}  {:<20}  {:<20}  {}",
                        u.user_id,
                        u.role,
                        utc_or_dash(Some(u.created_at)),
                        utc_or_dash(u.deleted_at),
                        u.email.as_deref().unwrap_or("(hidden: --show-pii)")
                    );
                }
            }
        }
        UserCommand::Erase {
            user_id,
            yes,
            store,
        } => {
            if !yes {
                return Err(Refused(format!(
                    "erasing user {user_id} cannot be undone: run again with --yes"
                ))
                .into());
            }
            let accounts = store.connect().await?;
            let erased = erase::erase_user(&accounts, user_id, None).await?;
            eprintln!(
                "erased user {user_id}: data key destroyed; {} sessions, {} devices and {} relationships deleted; \
                 ClickHouse deletion queued for the jobs runner",
                erased.sessions, erased.devices, erased.relationships
            );
            println!("{}", serde_json::to_string(&erased)?);
        }
        UserCommand::Export {
            user_id,
            store,
            clickhouse,
        } => {
            use std::io::Write;
            let accounts = store.connect().await?;
            let clickhouse = clickhouse.connect().await?.client();
            users::audit_operator_export(&accounts, user_id).await?;
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            let export = tokio::spawn(async move {
                let recordings = biofeed_ingest_gateway::people::recordings::StoredRecordings::new(
                    accounts.clone(),
                    clickhouse,
                );
                biofeed_accounts::export::export_user(&accounts, &recordings, user_id, tx).await
            });
            let mut stdout = std::io::stdout().lock();
            while let Some(line) = rx.recv().await {
                stdout.write_all(&line)?;
            }
            stdout.flush()?;
            let counts = export.await??;
            eprintln!(
                "exported user {user_id}: {} sessions, {} points, {} relationships, {} access records",
                counts.sessions, counts.points, counts.relationships, counts.access
            );
        }
    }
    Ok(())
}

async fn run_admin_relationship(command: RelationshipCommand) -> anyhow::Result<()> {
    match command {
        RelationshipCommand::Add {
            lead,
            follower,
            kind,
            pending,
            postgres,
        } => {
            let pool = postgres.connect().await?;
            let id = relationships::create(&pool, lead, follower, &kind, None, !pending).await?;
            println!("{id}");
        }
        RelationshipCommand::Revoke { id, postgres } => {
            relationships::revoke(&postgres.connect().await?, id, None).await?;
            eprintln!("relationship {id} revoked");
        }
        RelationshipCommand::List { user_id, postgres } => {
            let rows = relationships::list(&postgres.connect().await?, user_id).await?;
            println!(
                "{:<36}  {:<20}  {:<36}  {:<36}  {:<9}  revoked",
                "relationship", "type", "lead", "follower", "consented"
            );
            for r in rows {
                println!(
                    "{:<36}  {:<20}  {:<36}  {:<36}  {:<9}  {}",
                    r.id,
                    r.relationship_type,
                    r.lead_id,
                    r.follower_id,
                    if r.consented_at.is_some() {
                        "yes"
                    } else {
                        "pending"
                    },
                    utc_or_dash(r.revoked_at)
                );
            }
        }
    }
    Ok(())
}

/// A time for the CLI's tables (RFC 3339, to the second, UTC), or `-`.
fn utc_or_dash(time: Option<chrono::DateTime<chrono::Utc>>) -> String {
    time.map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// A progress bar on standard error for long admin work.
fn progress_bar(verb: &str, things: &str) -> indicatif::ProgressBar {
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
struct Refused(String);

fn migrate_exit_code(error: &MigrateError) -> u8 {
    if error.needs_operator() {
        exit::REFUSED
    } else if matches!(error, MigrateError::Backend(_)) {
        exit::UNAVAILABLE
    } else {
        exit::FAILURE
    }
}

fn print_reports(reports: &[StepReport], status: bool) {
    for report in reports {
        let summary = if status {
            format!("{} pending", report.pending())
        } else if report.applied() == 0 {
            "up to date".to_owned()
        } else {
            format!("{} applied now", report.applied())
        };
        println!("{}: {summary}", report.store);
        for item in &report.items {
            if item.detail.is_empty() {
                println!("  {:<40} {}", item.name, item.state);
            } else {
                println!("  {:<40} {} ({})", item.name, item.state, item.detail);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
