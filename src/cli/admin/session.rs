//! `biofeed admin session …`: a session's samples in formats other tools read.

use std::io::Write;
use std::path::PathBuf;

use biofeed_accounts::users;
use biofeed_exports::{BundleFormat, Exporter, Request};
use clap::Subcommand;
use uuid::Uuid;

use crate::cli::admin::AccountStore;
use crate::cli::{Refused, AFTER_HELP};

/// `biofeed admin session …`.
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Write a completed session's samples in a format other tools read: `csv` (a header naming
    /// each channel and its unit; ISO 8601 UTC time with microseconds and µs since the epoch; one
    /// column per channel), `edf` (EDF+, for EEG, ECG, PPG, respiration, EDA, temperature, heart
    /// rate and SpO2; pseudonymous patient field; annotations for the session's start and end,
    /// its exercise and the person's ratings) or `rr` (RR intervals in ms, one per line, as
    /// Kubios reads them) or `bids` (its EEG as a BIDS-EEG dataset of one recording, zipped). A
    /// session with several data types in the format gives a zip of one file each.
    ///
    /// Audited: recorded in the person's access log (action `data.export`, resource
    /// `session_export`, actor none: an operator) before a sample is written. With --output the
    /// file appears only once complete; on standard output a failure midway exits non-zero.
    #[command(after_help = AFTER_HELP)]
    Export {
        /// The session's id.
        session_id: Uuid,
        /// csv, edf, rr or bids (a BIDS-EEG dataset of this session, zipped).
        #[arg(long, value_parser = parse_bundle_format)]
        format: BundleFormat,
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
    /// Write every completed session of one or more people in one format, zipped: `csv`, `edf`
    /// or `rr` (a folder per person, named by their pseudonymous code), or `bids` (their EEG
    /// sessions as one BIDS-EEG dataset: `dataset_description.json`, `participants.tsv`, and
    /// per session `sub-*/ses-*/eeg/*_eeg.edf`, `*_eeg.json`, `*_channels.tsv`, `*_events.tsv`).
    ///
    /// Audited in each person's access log (resource `bundle_export`) before a sample is
    /// written. Exit 4 when no completed session holds data the format can hold.
    #[command(after_help = AFTER_HELP)]
    Bundle {
        /// The people's ids.
        #[arg(required = true)]
        user_ids: Vec<Uuid>,
        /// csv, edf, rr or bids.
        #[arg(long, value_parser = parse_bundle_format)]
        format: BundleFormat,
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

fn parse_bundle_format(name: &str) -> Result<BundleFormat, String> {
    BundleFormat::parse(name).map_err(|e| e.to_string())
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
        SessionCommand::Bundle {
            user_ids,
            format,
            output,
            store,
            clickhouse,
        } => {
            let accounts = store.connect().await?;
            let exporter = Exporter::new(accounts.clone(), clickhouse.connect().await?.client());
            let bundle = exporter.prepare_bundle(&user_ids, format).await?;
            for user in &user_ids {
                users::audit_operator_bundle_export(&accounts, *user, format.name()).await?;
            }
            let what = format!("{} sessions as {}", bundle.sessions(), bundle.filename());
            write_out(
                output,
                &what,
                move |tx| async move { bundle.write(tx).await },
            )
            .await
        }
    }
}

async fn export(
    session: Uuid,
    format: BundleFormat,
    data_type: Option<String>,
    output: Option<PathBuf>,
    store: AccountStore,
    clickhouse: biofeed_backends::clickhouse::ClickHouseSettings,
) -> anyhow::Result<()> {
    let accounts = store.connect().await?;
    let clickhouse = clickhouse.connect().await?.client();
    let exporter = Exporter::new(accounts.clone(), clickhouse);
    let format = match format {
        BundleFormat::Files(format) => format,
        BundleFormat::Bids => {
            anyhow::ensure!(
                data_type.as_deref().is_none_or(|d| d == "eeg"),
                Refused("a BIDS dataset holds EEG recordings only: leave out --data-type".into())
            );
            let bundle = exporter.prepare_session_bids(session).await?;
            for owner in bundle.people() {
                users::audit_operator_session_export(&accounts, owner, session, "bids").await?;
            }
            let what = format!("session {session} as {}", bundle.filename());
            return write_out(
                output,
                &what,
                move |tx| async move { bundle.write(tx).await },
            )
            .await;
        }
    };
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
    let writer = prepared.clone();
    let what = format!("session {session} as {}", prepared.filename());
    write_out(
        output,
        &what,
        move |tx| async move { writer.write(tx).await },
    )
    .await
}

/// Runs `write`, writing what it sends to `output` (beside it first, renamed once complete: a
/// failure midway leaves no file) or to standard output (a failure midway exits non-zero).
pub(crate) async fn write_out<F, Fut>(
    output: Option<PathBuf>,
    what: &str,
    write: F,
) -> anyhow::Result<()>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Vec<u8>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<u64, biofeed_exports::ExportError>> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let export = tokio::spawn(write(tx));
    let partial = output.as_ref().map(|path| {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        path.with_file_name(name)
    });
    let mut file = match &partial {
        Some(path) => Some(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => None,
    };
    let written = async {
        let mut stdout = std::io::stdout().lock();
        while let Some(chunk) = rx.recv().await {
            match &mut file {
                Some(f) => f.write_all(&chunk)?,
                None => stdout.write_all(&chunk)?,
            }
        }
        stdout.flush()?;
        let bytes = export.await??;
        // On disk before it takes its name: a file under its name is whole, crash or not.
        if let Some(f) = file.take() {
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        anyhow::Ok(bytes)
    }
    .await;
    match (written, &partial, &output) {
        (Ok(bytes), Some(partial), Some(path)) => {
            std::fs::rename(partial, path)?;
            eprintln!("exported {what} into {} ({bytes} bytes)", path.display());
            Ok(())
        }
        (Ok(bytes), _, _) => {
            eprintln!("exported {what} ({bytes} bytes)");
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
