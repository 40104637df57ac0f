//! The `biofeed` command line: a thin layer that parses arguments, starts telemetry, builds the
//! typed settings and calls the library crates.
//!
//! Architecture invariant: no business logic lives here. A subcommand is a clap struct and a
//! call into the crate that owns the work.

pub mod cli;
pub mod telemetry;
