//! The clap definition of every subcommand, and how each one runs.
//!
//! Every setting is an argument with a `BIOFEED_…` environment variable and a loopback default
//! that matches `compose/local`.

use std::process::ExitCode;

use biofeed_accounts::{devices, users, AccountKeys, Accounts, AccountsError};
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
    /// Refused: something needs an operator (e.g. a migration edited after it was applied).
    pub const REFUSED: u8 = 4;
}

const AFTER_HELP: &str = "\
Every option can also be set by the environment variable shown beside it.

Exit codes: 0 ok, 1 failure, 2 bad arguments or settings, 3 a backing service is \
unreachable (retry later), 4 refused until an operator acts (e.g. an edited migration).";

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

    /// Run the HTTP ingest gateway: devices open sessions and post points, which are answered
    /// 202 only once Kafka has them. Serves /healthz, /readyz, /metrics and /openapi.json.
    ///
    /// Stops on SIGTERM or Ctrl-C after finishing the requests in flight.
    #[command(after_help = AFTER_HELP)]
    Gateway(GatewaySettings),

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

    /// Administration: users and devices.
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
    /// Needs Postgres and Kafka migrated (`biofeed migrate`); makes and afterwards deletes a
    /// bench user and topic of its own.
    #[command(after_help = AFTER_HELP)]
    Gateway(biofeed_ingest_gateway::bench::BenchGatewaySettings),

    /// Points per second one consumer drains from Kafka into ClickHouse, against ClickHouse's
    /// own Kafka table engine with a materialized view on the same points; bytes per point on
    /// disk. Makes and afterwards drops a database and topics of its own.
    #[command(after_help = AFTER_HELP)]
    Consume(biofeed_consumers::bench::BenchConsumeSettings),
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

/// `biofeed admin …`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Users (the accounts issue adds list and erase).
    #[command(subcommand)]
    User(UserCommand),
    /// Devices and their tokens.
    #[command(subcommand)]
    Device(DeviceCommand),
}

/// `biofeed admin user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; prints the new user's id. The email is stored only encrypted and as a
    /// keyed blind index.
    #[command(after_help = AFTER_HELP)]
    Create {
        /// The user's email.
        #[arg(long)]
        email: String,
        /// The role: user, guardian, practitioner, admin or analyst.
        #[arg(long, default_value = "user")]
        role: String,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
        /// PII keys.
        #[command(flatten, next_help_heading = "Keys")]
        keys: AccountKeys,
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
        /// The user, by id (when several users share an email).
        #[arg(long)]
        user_id: Option<Uuid>,
        /// The device's model, e.g. "Polar H10".
        #[arg(long, default_value = "")]
        model: String,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
        /// PII keys (the blind-index key finds the user by email).
        #[command(flatten, next_help_heading = "Keys")]
        keys: AccountKeys,
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
            Command::Gateway(settings) => exit_with(biofeed_ingest_gateway::run(settings).await),
            Command::Consume(args) => exit_with(run_consume(args).await),
            Command::Replay(settings) => exit_with(run_replay(settings).await),
            Command::Admin(command) => exit_with(run_admin(command).await),
            Command::Bench(BenchCommand::Gateway(settings)) => {
                exit_with(biofeed_ingest_gateway::bench::run(settings).await)
            }
            Command::Bench(BenchCommand::Consume(settings)) => {
                exit_with(biofeed_consumers::bench::run(settings).await)
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
                    || cause
                        .downcast_ref::<AccountsError>()
                        .is_some_and(|a| matches!(a, AccountsError::Postgres(_)))
            });
            ExitCode::from(if unavailable {
                exit::UNAVAILABLE
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
        "stopped: {} rows written, {} frames dead-lettered, {} frames of erased users dropped",
        summary.rows, summary.dead_lettered, summary.dropped_erased
    );
    Ok(())
}

async fn run_replay(settings: biofeed_consumers::ReplaySettings) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {pos}/{len} messages ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress_bar = bar.clone();
    let summary = biofeed_consumers::replay(settings, move |done, total| {
        progress_bar.set_length(total);
        progress_bar.set_position(done);
    })
    .await?;
    bar.finish_and_clear();
    eprintln!(
        "replayed {} messages: {} frames and {} points written, {} skipped (still failing the checks), {} frames of erased users dropped",
        summary.messages, summary.frames, summary.points, summary.skipped, summary.dropped_erased
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

async fn run_admin(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::User(UserCommand::Create {
            email,
            role,
            postgres,
            keys,
        }) => {
            let accounts = Accounts {
                pool: postgres.connect().await?,
                keys,
            };
            let email = users::Email::parse(&email)?;
            let id = users::create_user(&accounts, &email, &role).await?;
            println!("{id}");
        }
        AdminCommand::Device(DeviceCommand::Create {
            user,
            user_id,
            model,
            postgres,
            keys,
        }) => {
            let accounts = Accounts {
                pool: postgres.connect().await?,
                keys,
            };
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
            devices::revoke_device(&postgres.connect().await?, device_id).await?;
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
