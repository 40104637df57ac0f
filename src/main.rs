//! The `biofeed` binary: parse the command line, run it, exit with a code that means something.

use std::process::ExitCode;

use biofeed::cli::Cli;
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    Cli::parse().run().await
}
