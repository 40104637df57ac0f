//! `biofeed migrate`: Postgres, ClickHouse and Kafka topics, or their status.

use std::process::ExitCode;

use biofeed_backends::StoreSettings;
use biofeed_migrations::{MigrateError, MigrateSettings, StepReport, TopicLayout};
use clap::Args;

use crate::cli::exit;

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

pub(crate) async fn run(args: MigrateArgs) -> ExitCode {
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

fn migrate_exit_code(error: &MigrateError) -> u8 {
    if error.needs_operator() {
        exit::REFUSED
    } else if error.is_retryable() {
        exit::UNAVAILABLE
    } else if let MigrateError::Backend(_) = error {
        // Credentials or certificates refused, or contradictory settings.
        exit::USAGE
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
