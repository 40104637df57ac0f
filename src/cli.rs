//! The clap definition of every subcommand, and how each one runs.
//!
//! Every setting is an argument with a `BIOFEED_…` environment variable and a loopback default
//! that matches `compose/local`.

use std::process::ExitCode;

use biofeed_backends::clickhouse::ClickHouseSettings;
use biofeed_backends::kafka::{KafkaSettings, TopicNames};
use biofeed_backends::postgres::PostgresSettings;
use biofeed_migrations::{MigrateError, MigrateSettings, StepReport, TopicLayout};
use clap::{Args, Parser, Subcommand};

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
}

/// Arguments of `biofeed migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Report what is applied and what is pending; change nothing.
    #[arg(long)]
    pub status: bool,

    /// Where Postgres is.
    #[command(flatten, next_help_heading = "Postgres")]
    pub postgres: PostgresSettings,

    /// Where ClickHouse is.
    #[command(flatten, next_help_heading = "ClickHouse")]
    pub clickhouse: ClickHouseSettings,

    /// Where Kafka is.
    #[command(flatten, next_help_heading = "Kafka")]
    pub kafka: KafkaSettings,

    /// The topics' names.
    #[command(flatten, next_help_heading = "Kafka")]
    pub topics: TopicNames,

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
        }
    }
}

async fn run_migrate(args: MigrateArgs) -> ExitCode {
    let settings = MigrateSettings {
        postgres: args.postgres,
        clickhouse: args.clickhouse,
        kafka: args.kafka,
        topics: args.topics,
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
