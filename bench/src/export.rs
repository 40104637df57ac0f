//! `biofeed bench export`: how fast a long session exports, and in how much memory. It stores
//! synthetic EEG sessions (the `eeg` data type's 8 channels at 256 Hz, one of each length asked for) in
//! Postgres and ClickHouse databases of its own, runs the real `biofeed admin session export`
//! on each (a child process, writing a file), and reports MB/s and the child's peak RSS per
//! format and length, beside this disk's own sequential write speed for the same bytes.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use biofeed_accounts::{users, AccountKeys, Accounts};
use biofeed_backends::StoreSettings;
use serde::Serialize;
use uuid::Uuid;

use crate::harness::{peak_rss_mib, OwnStores};

/// Settings of `biofeed bench export`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchExportSettings {
    /// The sessions' lengths: one session of each (memory must not grow with the length).
    #[arg(long = "lengths", id = "export_lengths", value_name = "DURATION[,…]",
        env = "BIOFEED_BENCH_EXPORT_LENGTHS", value_delimiter = ',',
        value_parser = humantime::parse_duration, default_value = "10m,1h")]
    pub lengths: Vec<Duration>,

    /// The formats to time (csv, edf).
    #[arg(long = "formats", id = "export_formats", value_name = "FORMAT[,…]",
        env = "BIOFEED_BENCH_EXPORT_FORMATS", value_delimiter = ',', default_value = "edf,csv",
        value_parser = ["csv", "edf"])]
    pub formats: Vec<String>,

    /// Where the services are.
    #[command(flatten)]
    pub stores: StoreSettings,

    /// Replication of the bench's own topics (made by the migration; never written).
    #[command(flatten, next_help_heading = "Kafka")]
    pub replication: biofeed_migrations::kafka::Replication,

    /// PII keys (the bench's person is created with them, and the export runs with them).
    #[command(flatten, next_help_heading = "Keys")]
    pub keys: AccountKeys,
}

/// One export timed.
#[derive(Debug, Clone, Serialize)]
pub struct ExportRun {
    /// csv or edf.
    pub format: String,
    /// Seconds of signal in the session.
    pub session_seconds: u64,
    /// Samples (values) in it: seconds × 256 × channels.
    pub samples: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// Seconds the export took (the whole `biofeed admin session export` process).
    pub seconds: f64,
    /// Megabytes (10^6 bytes) per second written.
    pub mb_per_s: f64,
    /// Samples per second exported.
    pub samples_per_s: f64,
    /// Peak resident memory of the export process, MiB.
    pub peak_rss_mib: f64,
    /// CPU seconds (user + system) of the export process: the rest of `seconds` it waited,
    /// mostly for ClickHouse reading the points.
    pub cpu_seconds: f64,
}

/// The figures of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ExportFigures {
    /// Each export.
    pub runs: Vec<ExportRun>,
    /// This disk's sequential write speed (1 MiB writes, then fsync) for as many bytes as the
    /// largest export, MB/s.
    pub disk_mb_per_s: f64,
}

/// The seeded `eeg` data type: 8 channels at 256 Hz.
const RATE: u64 = 256;
/// See [`RATE`].
const CHANNELS: u16 = 8;

/// Runs the benchmark.
pub async fn run(
    settings: &BenchExportSettings,
    progress: impl Fn(&str),
) -> anyhow::Result<ExportFigures> {
    let mut own = OwnStores::new(&settings.stores.kafka, 10);
    let id = own.id.clone();
    let stores = own.all_stores(&settings.stores, "export").await?;
    let dir = std::env::temp_dir().join(format!("biofeed-bench-export-{id}"));
    let outcome = async {
        std::fs::create_dir_all(&dir)?;
        biofeed_migrations::migrate(&biofeed_migrations::MigrateSettings {
            stores: stores.clone(),
            layout: biofeed_migrations::TopicLayout {
                points_partitions: 1,
                points_retention: Duration::from_secs(3600),
                dlq_retention: Duration::from_secs(3600),
                live_retention: Duration::from_secs(600),
                replication: settings.replication.clone(),
            },
        })
        .await
        .context("migrating the bench's own databases and topics")?;
        measure(settings, &stores, &dir, &progress).await
    }
    .await;
    progress("cleaning up the bench's databases, topics and files");
    let _ = std::fs::remove_dir_all(&dir);
    own.clean_up().await;
    outcome
}

async fn measure(
    settings: &BenchExportSettings,
    stores: &StoreSettings,
    dir: &std::path::Path,
    progress: &impl Fn(&str),
) -> anyhow::Result<ExportFigures> {
    let accounts = Accounts {
        pool: stores.postgres.connect().await?,
        keys: settings.keys.clone(),
    };
    let email = users::Email::parse(&format!("bench-{}@bench.invalid", Uuid::new_v4().simple()))?;
    let user = users::create_user(&accounts, &email, "user").await?;
    let ch = stores.clickhouse.connect().await?;
    let mut env = stores.child_env();
    env.extend([
        ("BIOFEED_MASTER_KEY", settings.keys.master_key().to_base64()),
        (
            "BIOFEED_BLIND_INDEX_KEY",
            settings.keys.blind_index_key.to_base64(),
        ),
        (
            "BIOFEED_MASTER_KEY_VERSION",
            settings.keys.master_key_version.to_string(),
        ),
    ]);
    let mut runs = Vec::new();
    for length in &settings.lengths {
        let seconds = length.as_secs().max(1);
        progress(&format!(
            "storing a {seconds} s session of {} EEG channels at {RATE} Hz",
            CHANNELS
        ));
        let session = Uuid::new_v4();
        let end = chrono::Utc::now() - chrono::Duration::minutes(1);
        let start = end - chrono::Duration::seconds(seconds as i64);
        sqlx::query(
            "INSERT INTO sessions (id, user_id, exercise_id, status, started_at, deadline_at, ended_at)
             SELECT $1, $2, id, 'completed', $3, $4 + interval '1 hour', $4 FROM exercises
             WHERE name = 'alpha_neurofeedback'",
        )
        .bind(session)
        .bind(user)
        .bind(start)
        .bind(end)
        .execute(&accounts.pool)
        .await?;
        sqlx::query(
            "INSERT INTO session_data_types (session_id, data_type_id)
             SELECT $1, id FROM data_types WHERE name = 'eeg'",
        )
        .bind(session)
        .execute(&accounts.pool)
        .await?;
        // Generated by ClickHouse itself: one row per sample time, 0.1 µV resolution.
        ch.client()
            .query(&format!(
                "INSERT INTO points SELECT toUUID('{user}'), toUUID('{session}'), 'eeg',
                    toInt64({t0} + intDiv(number * 1000000, {RATE})),
                    arrayMap(c -> toFloat32(round(sin(number / 7 + c) * 400 + cos(number / 131 + c) * 90, 1)), range({channels})),
                    now() FROM numbers({rows})",
                t0 = start.timestamp_micros(),
                channels = CHANNELS,
                rows = seconds * RATE,
            ))
            .execute()
            .await
            .context("storing the bench session's points")?;
        for format in &settings.formats {
            progress(&format!("exporting the {seconds} s session as {format}"));
            let path = dir.join(format!("{session}.{format}"));
            let run = export_once(&env, session, format, &path)?;
            let bytes = std::fs::metadata(&path)?.len();
            let samples = seconds * RATE * u64::from(CHANNELS);
            runs.push(ExportRun {
                format: format.clone(),
                session_seconds: seconds,
                samples,
                bytes,
                seconds: run.0,
                mb_per_s: bytes as f64 / 1e6 / run.0,
                samples_per_s: samples as f64 / run.0,
                peak_rss_mib: run.1,
                cpu_seconds: run.2,
            });
            std::fs::remove_file(&path)?;
        }
    }
    accounts.pool.close().await;
    let largest = runs.iter().map(|r| r.bytes).max().unwrap_or(0);
    progress("timing this disk's sequential writes for comparison");
    let disk_mb_per_s = disk_write_speed(&dir.join("disk.bin"), largest)?;
    Ok(ExportFigures {
        runs,
        disk_mb_per_s,
    })
}

/// Runs `biofeed admin session export` into `path`: its seconds, peak RSS (MiB) and CPU
/// seconds.
fn export_once(
    env: &[(&'static str, String)],
    session: Uuid,
    format: &str,
    path: &std::path::Path,
) -> anyhow::Result<(f64, f64, f64)> {
    let started = Instant::now();
    let mut command = std::process::Command::new(std::env::current_exe()?);
    // Its secrets come as values: the inherited *_FILE settings would conflict with them.
    for key in biofeed_backends::SECRET_FILE_SETTINGS {
        command.env_remove(key);
    }
    let mut child = command
        .args([
            "admin",
            "session",
            "export",
            &session.to_string(),
            "--format",
            format,
            "--output",
        ])
        .arg(path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("BIOFEED_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut peak = 0.0f64;
    let mut cpu = 0.0f64;
    let status = loop {
        peak = peak.max(peak_rss_mib(pid));
        cpu = cpu.max(cpu_seconds(pid));
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        anyhow::bail!("biofeed admin session export failed: {stderr}");
    }
    Ok((seconds, peak, cpu))
}

/// CPU seconds (user + system) process `pid` used so far (Linux `/proc/<pid>/stat`, at the
/// usual 100 ticks a second); 0 where unknown.
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The fields after the command's closing parenthesis: utime and stime are 12th and
            // 13th of them.
            let rest = &s[s.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 =
                fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

/// Writes `bytes` to `path` in 1 MiB writes, then fsync: MB/s.
fn disk_write_speed(path: &std::path::Path, bytes: u64) -> anyhow::Result<f64> {
    use std::io::Write;
    let chunk = vec![0x5a_u8; 1 << 20];
    let started = Instant::now();
    let mut file = std::fs::File::create(path)?;
    let mut left = bytes.max(1 << 20);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    let seconds = started.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(bytes.max(1 << 20) as f64 / 1e6 / seconds)
}
