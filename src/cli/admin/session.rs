//! `biofeed admin session …`: a session's samples in formats other tools read.

use std::io::Write;
use std::path::PathBuf;

use biofeed_accounts::users;
use biofeed_exports::{Exporter, Format, Request};
use clap::Subcommand;
use uuid::Uuid;

use crate::cli::admin::AccountStore;
use crate::cli::AFTER_HELP;

/// `biofeed admin session …`.
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Write a completed session's samples in a format other tools read: `csv` (a header naming
    /// each channel and its unit; ISO 8601 UTC time with microseconds and µs since the epoch; one
    /// column per channel), `edf` (EDF+, for EEG, ECG, PPG, respiration, EDA, temperature, heart
    /// rate and SpO2; pseudonymous patient field; annotations for the session's start and end,
    /// its exercise and the person's ratings) or `rr` (RR intervals in ms, one per line, as
    /// Kubios reads them). A session with several data types in the format gives a zip of one
    /// file each.
    ///
    /// Audited: recorded in the person's access log (action `data.export`, resource
    /// `session_export`, actor none: an operator) before a sample is written. With --output the
    /// file appears only once complete; on standard output a failure midway exits non-zero.
    #[command(after_help = AFTER_HELP)]
    Export {
        /// The session's id.
        session_id: Uuid,
        /// csv, edf or rr.
        #[arg(long, value_parser = parse_format)]
        format: Format,
        /// Only this data type (e.g. eeg); default every one the format holds.
        #[arg(long)]
        data_type: Option<String>,
        /// Write to this file instead of standard output (written beside it, then renamed).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
        /// Where ClickHouse is (the points).
        #[command(flatten, next_help_heading = "ClickHouse")]
        clickhouse: biofeed_backends::clickhouse::ClickHouseSettings,
    },
}

fn parse_format(name: &str) -> Result<Format, String> {
    Format::parse(name).map_err(|e| e.to_string())
}

pub(crate) async fn run(command: SessionCommand) -> anyhow::Result<()> {
    match command {
        SessionCommand::Export {
            session_id,
            format,
            data_type,
            output,
            store,
            clickhouse,
        } => export(session_id, format, data_type, output, store, clickhouse).await,
    }
}

async fn export(
    session: Uuid,
    format: Format,
    data_type: Option<String>,
    output: Option<PathBuf>,
    store: AccountStore,
    clickhouse: biofeed_backends::clickhouse::ClickHouseSettings,
) -> anyhow::Result<()> {
    let accounts = store.connect().await?;
    let clickhouse = clickhouse.connect().await?.client();
    let exporter = Exporter::new(accounts.clone(), clickhouse);
    let prepared = exporter
        .prepare(&Request {
            session,
            format,
            data_type,
            identify: false,
        })
        .await?;
    users::audit_operator_session_export(
        &accounts,
        prepared.owner(),
        session,
        prepared.format_name(),
    )
    .await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let writer = prepared.clone();
    let export = tokio::spawn(async move { writer.write(tx).await });
    let partial = output.as_ref().map(|path| {
        path.with_extension(format!(
            "{}.partial",
            path.extension().and_then(|e| e.to_str()).unwrap_or("")
        ))
    });
    let mut out: Box<dyn Write> = match &partial {
        Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let written = async {
        while let Some(chunk) = rx.recv().await {
            out.write_all(&chunk)?;
        }
        out.flush()?;
        drop(out);
        anyhow::Ok(export.await??)
    }
    .await;
    match (written, &partial, &output) {
        (Ok(bytes), Some(partial), Some(path)) => {
            std::fs::rename(partial, path)?;
            eprintln!(
                "exported session {session} as {} into {} ({bytes} bytes)",
                prepared.filename(),
                path.display()
            );
            Ok(())
        }
        (Ok(bytes), _, _) => {
            eprintln!(
                "exported session {session} as {} ({bytes} bytes)",
                prepared.filename()
            );
            Ok(())
        }
        (Err(e), partial, _) => {
            if let Some(partial) = partial {
                let _ = std::fs::remove_file(partial);
            }
            Err(e.context("the export failed midway: what was written is incomplete"))
        }
    }
}
