//! `biofeed bench e2e`: sustained ingest through HTTP from many simulated devices into a real
//! `biofeed up` (its own process, on Postgres and ClickHouse databases and topics of the bench's own), measured from the
//! device's send to the point being queryable in ClickHouse; then the peer comparisons
//! (`biofeed bench gateway`: direct librdkafka produce; `biofeed bench consume`: ClickHouse's
//! Kafka engine) in the same run; a markdown report with the machine it ran on.

mod devices;
mod live;
mod report;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use biofeed_accounts::{AccountKeys, Accounts};
use biofeed_backends::clickhouse::ClickHouse;
use biofeed_backends::{parse_duration, StoreSettings};
use serde::Serialize;
use uuid::Uuid;

use crate::e2e::devices::{Devices, Probes};
use crate::harness::{peak_rss_mib, percentile, OwnStores};

/// Settings of `biofeed bench e2e`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchE2eSettings {
    /// Simulated devices posting at once, each in its own session. The default offers 10 % more
    /// than the 1,000,000 points/s target, so that storing at least that much can show.
    #[arg(long = "devices", id = "e2e_devices", value_name = "N", env = "BIOFEED_BENCH_E2E_DEVICES",
          default_value_t = 1100, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_DEVICES)))]
    pub devices: u32,

    /// Samples per second of each device (single-channel ECG-like stream).
    #[arg(long = "rate", id = "e2e_rate", value_name = "HZ", env = "BIOFEED_BENCH_E2E_RATE",
          default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rate_hz: u32,

    /// How often each device posts what it sampled since its last post.
    #[arg(long = "frame-interval", id = "e2e_frame_interval", value_name = "DURATION", env = "BIOFEED_BENCH_E2E_FRAME_INTERVAL",
          default_value = "1s", value_parser = parse_duration)]
    pub frame_interval: Duration,

    /// How long the sustained load runs (after a 10 s warm-up).
    #[arg(long = "duration", id = "e2e_duration", value_name = "DURATION", env = "BIOFEED_BENCH_E2E_DURATION",
          default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Where to write the markdown report.
    #[arg(
        long = "report",
        id = "e2e_report",
        value_name = "PATH",
        env = "BIOFEED_BENCH_E2E_REPORT",
        default_value = "docs/bench-e2e.md"
    )]
    pub report: std::path::PathBuf,

    /// Live sessions beside the load: RR-interval sessions, each watched on
    /// `GET /v1/sessions/{id}/live`; measures the sample-to-feedback latency (0: none).
    #[arg(long = "live-sessions", id = "e2e_live_sessions", value_name = "N", env = "BIOFEED_BENCH_E2E_LIVE_SESSIONS",
          default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub live_sessions: u32,

    /// Skip the peer comparisons (bench gateway, bench consume).
    #[arg(long = "no-peers", id = "e2e_no_peers")]
    pub no_peers: bool,

    /// Find the ceiling: the highest offered load the stack sustains for `--duration` with
    /// stored/offered ≥ 0.99, device-to-queryable p99 < 1 s and nothing lost. Starts at
    /// `--devices` (each run on fresh stores), raises the devices by a quarter while each run
    /// holds (up to the 100,000 devices the bench allows, where the ceiling is reported as "at
    /// least"), then halves the gap between the last load held and the first not held until it
    /// is under a tenth (while no load holds, it halves the devices). A probe that fails to run
    /// counts as not held (the first one ends the search). The report gives the first run (at
    /// `--devices`) in full and every probe. Exit code 1 if any probe lost a point.
    #[arg(long = "find-ceiling", id = "e2e_find_ceiling", env = "BIOFEED_BENCH_E2E_FIND_CEILING",
          action = clap::ArgAction::SetTrue)]
    pub find_ceiling: bool,

    /// A Python with chdb (compose/local makes one: .state/venv/bin/python): after the load, the
    /// bench runs `--storage-script` on its own stores, which measures bytes per point of the
    /// same rows on this ClickHouse and, via chdb, on a current one under each DDL it tries; the
    /// report gives both. Without it, only this ClickHouse's bytes per point are measured.
    #[arg(
        long = "chdb-python",
        id = "e2e_chdb_python",
        value_name = "PATH",
        env = "BIOFEED_BENCH_CHDB_PYTHON"
    )]
    pub chdb_python: Option<std::path::PathBuf>,

    /// The storage measurement `--chdb-python` runs.
    #[arg(
        long = "storage-script",
        id = "e2e_storage_script",
        value_name = "PATH",
        env = "BIOFEED_BENCH_STORAGE_SCRIPT",
        default_value = "compose/bench/storage-bytes"
    )]
    pub storage_script: std::path::PathBuf,

    /// Serve the bench's gateway over HTTPS: the CA (PEM) the simulated devices trust. The
    /// gateway then uses BIOFEED_GATEWAY_TLS_CERT_FILE and BIOFEED_GATEWAY_TLS_KEY_FILE, which
    /// must be set; without this setting it serves plain HTTP.
    #[arg(
        long = "gateway-ca-file",
        id = "e2e_gateway_ca_file",
        value_name = "PATH",
        env = "BIOFEED_BENCH_GATEWAY_CA_FILE"
    )]
    pub gateway_ca_file: Option<std::path::PathBuf>,

    /// Where the services are.
    #[command(flatten)]
    pub stores: StoreSettings,

    /// Replication of the bench's own topics (3 on a three-broker cluster).
    #[command(flatten, next_help_heading = "Kafka")]
    pub replication: biofeed_migrations::kafka::Replication,

    /// PII keys (the bench's users are created with them and `biofeed up` runs with them).
    #[command(flatten, next_help_heading = "Keys")]
    pub keys: AccountKeys,
}

/// The figures of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct E2eFigures {
    /// Devices.
    pub devices: u32,
    /// Samples per second per device.
    pub rate_hz: u32,
    /// Seconds of sustained load measured.
    pub seconds: f64,
    /// Points per second the devices offered.
    pub offered_points_per_s: f64,
    /// Points per second the gateway accepted.
    pub accepted_points_per_s: f64,
    /// Points per second that became queryable in ClickHouse.
    pub stored_points_per_s: f64,
    /// stored / offered.
    pub ratio: f64,
    /// Points accepted in the whole run.
    pub accepted: u64,
    /// Points in ClickHouse at the end (`FINAL`).
    pub stored: u64,
    /// accepted − stored after draining (0: nothing lost).
    pub lost: i64,
    /// Device send → queryable, median, ms.
    pub e2e_p50_ms: f64,
    /// Device send → queryable, 99th percentile, ms: an upper bound (each probe row counts as
    /// queryable when the query that found it answered).
    pub e2e_p99_ms: f64,
    /// The same, a lower bound (counted from when the query before it was sent, which did not
    /// find the row yet): the gap is the probing's own resolution under load.
    pub e2e_p99_lower_ms: f64,
    /// Gateway request latency, median, ms.
    pub gateway_p50_ms: f64,
    /// Gateway request latency, 99th percentile, ms.
    pub gateway_p99_ms: f64,
    /// Requests answered 429/503 and retried.
    pub retried: u64,
    /// Rows written beyond the distinct points (retries, redeliveries): taken off the stored
    /// count of the window (None: they could not be counted).
    pub duplicates: Option<u64>,
    /// Peak resident memory of the `biofeed up` process, MiB.
    pub peak_rss_mib: f64,
    /// Bytes per point on disk in ClickHouse (on a cluster: of one replica's copy).
    pub bytes_per_point: f64,
    /// How the run talked to each service and how devices reached the gateway (never a
    /// secret).
    pub security: String,
    /// One ClickHouse server or a cluster's shards and replicas, and the Kafka brokers.
    pub topology: String,
    /// Live sessions watched beside the load (`--live-sessions`).
    pub live_sessions: u32,
    /// Feeds their viewers received in the measured window and after.
    pub live_feeds: u64,
    /// Device send → a feed whose window holds that frame's last sample, median, ms.
    pub live_p50_ms: f64,
    /// The same, 99th percentile, ms.
    pub live_p99_ms: f64,
    /// Viewers whose stream ended before the run did (0: none).
    pub live_viewers_lost: u64,
    /// Frames no feed had answered 5 s after their post at the end (counted in the latencies as
    /// that late).
    pub live_unanswered: u64,
    /// Windows the live member held at the end (every session's data types: the live sessions'
    /// and the load's).
    pub live_windows: u64,
    /// Bytes those windows' samples took.
    pub live_window_bytes: u64,
    /// `--chdb-python`: compose/bench/storage-bytes' last line (bytes per point of the run's
    /// rows on this ClickHouse and on a current one, per DDL), if run.
    pub storage: Option<serde_json::Value>,
    /// `biofeed bench gateway`'s last line, if run.
    pub gateway_peer: Option<serde_json::Value>,
    /// `biofeed bench consume`'s last line, if run.
    pub consume_peer: Option<serde_json::Value>,
    /// `--find-ceiling`: the offered points/s of the highest load sustained (None: not even the
    /// lowest probe was).
    pub ceiling_points_per_s: Option<f64>,
    /// `--find-ceiling`: the ceiling was held at the most devices the bench allows, so the
    /// stack's true ceiling is at least that (not measured above it).
    pub ceiling_at_device_cap: bool,
    /// `--find-ceiling`: every probe, in the order run.
    pub probes: Vec<Probe>,
}

/// One run of the ceiling search.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// Devices posting.
    pub devices: u32,
    /// Points/s offered, stored, and their ratio.
    pub offered_points_per_s: f64,
    /// Points/s that became queryable.
    pub stored_points_per_s: f64,
    /// stored / offered.
    pub ratio: f64,
    /// Device send → queryable, 99th percentile, ms (upper bound: what `sustained` judges).
    pub e2e_p99_ms: f64,
    /// The same, lower bound (from the start of the probe query before the one that found it).
    pub e2e_p99_lower_ms: f64,
    /// Gateway request latency, 99th percentile, ms.
    pub gateway_p99_ms: f64,
    /// Points accepted but never queryable (None: the probe failed before they were counted).
    pub lost: Option<i64>,
    /// Whether the load was sustained (ratio ≥ 0.99, p99 < 1 s, nothing lost).
    pub sustained: bool,
    /// Why the probe could not run (it then counts as not sustained).
    pub error: Option<String>,
}

impl Probe {
    /// The probe a run's figures make.
    fn of(f: &E2eFigures) -> Self {
        Self {
            devices: f.devices,
            offered_points_per_s: f.offered_points_per_s,
            stored_points_per_s: f.stored_points_per_s,
            ratio: f.ratio,
            e2e_p99_ms: f.e2e_p99_ms,
            e2e_p99_lower_ms: f.e2e_p99_lower_ms,
            gateway_p99_ms: f.gateway_p99_ms,
            lost: Some(f.lost),
            sustained: sustained(f),
            error: None,
        }
    }

    /// A probe that failed to run at `devices`.
    fn failed(devices: u32, error: &anyhow::Error) -> Self {
        Self {
            devices,
            offered_points_per_s: 0.0,
            stored_points_per_s: 0.0,
            ratio: 0.0,
            e2e_p99_ms: 0.0,
            e2e_p99_lower_ms: 0.0,
            gateway_p99_ms: 0.0,
            lost: None,
            sustained: false,
            error: Some(format!("{error:#}")),
        }
    }
}

/// Whether a run held its load: stored/offered ≥ 0.99, device-to-queryable p99 under 1 s, and
/// every accepted point queryable.
pub fn sustained(f: &E2eFigures) -> bool {
    f.ratio >= 0.99 && f.e2e_p99_ms > 0.0 && f.e2e_p99_ms < 1_000.0 && f.lost == 0
}

/// The most devices `bench e2e` simulates.
pub const MAX_DEVICES: u32 = 100_000;

/// The devices of the next probe, or None when the search is over: up by a quarter while every
/// probe held (the last step clamped to [`MAX_DEVICES`], where the search ends), halved while
/// none did, then halving the gap between the highest held (`held`) and the lowest not held
/// (`failed`) until it is at most a tenth of `held`.
pub fn next_probe(held: Option<u32>, failed: Option<u32>) -> Option<u32> {
    match (held, failed) {
        (Some(h), None) => (h < MAX_DEVICES).then(|| (h + h / 4).clamp(h + 1, MAX_DEVICES)),
        (None, Some(f)) => (f > 1).then_some(f / 2),
        (Some(h), Some(f)) => (f.saturating_sub(h) > (h / 10).max(1)).then(|| h + (f - h) / 2),
        (None, None) => None,
    }
}

/// Removing several variables from a child's environment.
trait EnvRemoveAll {
    fn env_remove_all(&mut self, keys: &[&str]) -> &mut Self;
}

impl EnvRemoveAll for std::process::Command {
    fn env_remove_all(&mut self, keys: &[&str]) -> &mut Self {
        for key in keys {
            self.env_remove(key);
        }
        self
    }
}

/// A child `biofeed` process, stopped with SIGTERM when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The environment a child `biofeed` needs to use `stores` and `keys`.
fn child_env(stores: &StoreSettings, keys: &AccountKeys) -> Vec<(&'static str, String)> {
    let mut env = stores.child_env();
    env.extend([
        ("BIOFEED_MASTER_KEY", keys.master_key().to_base64()),
        ("BIOFEED_BLIND_INDEX_KEY", keys.blind_index_key.to_base64()),
        (
            "BIOFEED_MASTER_KEY_VERSION",
            keys.master_key_version.to_string(),
        ),
    ]);
    env
}

/// Runs compose/bench/storage-bytes on the run's own ClickHouse database (40 sessions of it:
/// whole runs of samples, a few million points) and returns its last line.
fn storage_bytes(
    python: &std::path::Path,
    script: &std::path::Path,
    env: &[(&'static str, String)],
) -> anyhow::Result<serde_json::Value> {
    let output = std::process::Command::new(python)
        .arg(script)
        .args(["--sessions", "40"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Its progress and warnings, as they would have been shown.
    eprint!("{stderr}");
    anyhow::ensure!(
        output.status.success(),
        "{} {} failed ({}): {}",
        python.display(),
        script.display(),
        output.status,
        stderr.lines().last().unwrap_or("no message")
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .with_context(|| format!("reading the last line of {}", script.display()))
}

/// Runs a peer benchmark as a child process and returns its last line.
fn peer(args: &[&str], env: &[(&'static str, String)]) -> anyhow::Result<serde_json::Value> {
    let output = std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("BIOFEED_LOG", "warn")
        .env_remove_all(biofeed_backends::SECRET_FILE_SETTINGS)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(output.status.success(), "biofeed {args:?} failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(serde_json::from_str(stdout.lines().last().unwrap_or("{}"))?)
}

/// Runs the benchmark; returns its figures (and writes the report).
pub async fn run(
    settings: &BenchE2eSettings,
    progress: impl Fn(&str) + Send + Sync + 'static,
) -> anyhow::Result<E2eFigures> {
    // Refused before an hour of load, not after it.
    if let Some(python) = &settings.chdb_python {
        anyhow::ensure!(
            python.is_file(),
            "BIOFEED_BENCH_CHDB_PYTHON: {} is not a file (compose/local makes .state/venv/bin/python)",
            python.display()
        );
        anyhow::ensure!(
            settings.storage_script.is_file(),
            "BIOFEED_BENCH_STORAGE_SCRIPT: {} is not a file (run the bench from the repository's root, or point this at compose/bench/storage-bytes)",
            settings.storage_script.display()
        );
    }
    let mut figures = if settings.find_ceiling {
        find_ceiling(settings, &progress).await?
    } else {
        run_once(settings, &progress).await?
    };
    if !settings.no_peers {
        let env = child_env(&settings.stores, &settings.keys);
        progress(
            "peer 1/2: biofeed bench gateway (the gateway against producing straight into Kafka)",
        );
        figures.gateway_peer = peer(
            &[
                "bench",
                "gateway",
                "--formats",
                "avro",
                "--channels",
                "1",
                "--duration",
                "10s",
            ],
            &env,
        )
        .ok();
        progress(
            "peer 2/2: biofeed bench consume (one consumer against ClickHouse's Kafka engine)",
        );
        figures.consume_peer = peer(&["bench", "consume"], &env).ok();
    }
    report::write_report(settings, &figures)?;
    Ok(figures)
}

/// The ceiling search (`--find-ceiling`): runs at one load after another ([`next_probe`]), each
/// on fresh stores; the figures of the first (at `--devices`) with the ceiling and every probe.
async fn find_ceiling(
    settings: &BenchE2eSettings,
    progress: &(impl Fn(&str) + Send + Sync),
) -> anyhow::Result<E2eFigures> {
    let (mut held, mut failed) = (None::<u32>, None::<u32>);
    let mut first: Option<E2eFigures> = None;
    let mut ceiling: Option<f64> = None;
    let mut probes = Vec::new();
    let mut devices = Some(settings.devices);
    while let Some(n) = devices {
        let probe_settings = BenchE2eSettings {
            devices: n,
            // Bytes per point are reported for the first probe, whose figures the report gives.
            chdb_python: settings.chdb_python.clone().filter(|_| first.is_none()),
            ..settings.clone()
        };
        progress(&format!(
            "ceiling probe {}: {n} devices, {:.2} M points/s offered",
            probes.len() + 1,
            f64::from(n) * f64::from(settings.rate_hz) / 1e6
        ));
        let figures = match run_once(&probe_settings, progress).await {
            Ok(figures) => figures,
            // The first probe failing is the bench failing; a later one is a load not held.
            Err(e) if first.is_none() => return Err(e),
            Err(e) => {
                progress(&format!(
                    "ceiling probe {}: failed to run ({e:#}): not sustained",
                    probes.len() + 1
                ));
                failed = Some(failed.map_or(n, |f: u32| f.min(n)));
                probes.push(Probe::failed(n, &e));
                devices = next_probe(held, failed);
                continue;
            }
        };
        let probe = Probe::of(&figures);
        progress(&format!(
            "ceiling probe {}: {:.0} points/s offered, {:.0} stored (ratio {:.3}), p99 {:.0} ms (≥ {:.0} ms), {} lost: {}",
            probes.len() + 1,
            probe.offered_points_per_s,
            probe.stored_points_per_s,
            probe.ratio,
            probe.e2e_p99_ms,
            probe.e2e_p99_lower_ms,
            probe.lost.unwrap_or_default(),
            if probe.sustained { "sustained" } else { "not sustained" }
        ));
        if probe.sustained {
            held = Some(n);
            ceiling = Some(ceiling.map_or(probe.offered_points_per_s, |c: f64| {
                c.max(probe.offered_points_per_s)
            }));
        } else {
            failed = Some(failed.map_or(n, |f: u32| f.min(n)));
        }
        probes.push(probe);
        first.get_or_insert(figures);
        devices = next_probe(held, failed);
    }
    let mut figures = first.context("the ceiling search ran no probe")?;
    figures.ceiling_points_per_s = ceiling;
    figures.ceiling_at_device_cap = held == Some(MAX_DEVICES);
    figures.probes = probes;
    Ok(figures)
}

/// One measured run on stores of its own, dropped at the end (no peers, no report).
async fn run_once(
    settings: &BenchE2eSettings,
    progress: &(impl Fn(&str) + Send + Sync),
) -> anyhow::Result<E2eFigures> {
    let mut own = OwnStores::new(&settings.stores.kafka, 10);
    let id = own.id.clone();
    // The devices' users, sessions and the jobs' bookkeeping, the points and the topics go to
    // stores of the bench's own, dropped whole at the end: nothing lands in the configured ones.
    let stores = own.all_stores(&settings.stores, "e2e").await?;
    let outcome = async {
        biofeed_migrations::migrate(&biofeed_migrations::MigrateSettings {
            stores: stores.clone(),
            layout: biofeed_migrations::TopicLayout {
                points_partitions: 6,
                points_retention: Duration::from_secs(86_400),
                dlq_retention: Duration::from_secs(86_400),
                live_retention: Duration::from_secs(600),
                replication: settings.replication.clone(),
            },
        })
        .await
        .context("migrating the bench's own databases and topics")?;
        let accounts = Accounts {
            pool: stores.postgres.connect().await?,
            keys: settings.keys.clone(),
        };
        let outcome = measure(settings, &stores, &accounts, &id, progress).await;
        accounts.pool.close().await;
        outcome
    }
    .await;

    // Clean up whatever happened.
    progress("cleaning up the bench's databases and topics");
    own.clean_up().await;
    outcome
}

/// Starts `biofeed up` on the bench's own stores, drives the devices through a warm-up and the
/// measured load, waits until every accepted point is queryable, and gathers the figures.
async fn measure(
    settings: &BenchE2eSettings,
    stores: &StoreSettings,
    accounts: &Accounts,
    id: &str,
    progress: &(impl Fn(&str) + Send + Sync),
) -> anyhow::Result<E2eFigures> {
    progress("starting biofeed up on the bench's own database and topics");
    let (up, url, metrics_url) = start_up(settings, stores, id).await?;
    let pid = up.0.id();
    let mut http = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.devices as usize)
        .timeout(Duration::from_secs(30));
    if let Some(ca) = &settings.gateway_ca_file {
        let pem = std::fs::read(ca).map_err(|e| {
            anyhow::anyhow!(
                "BIOFEED_BENCH_GATEWAY_CA_FILE: cannot read {}: {e}",
                ca.display()
            )
        })?;
        http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let http = http.build()?;
    wait_ready(&http, &url).await?;

    progress(&format!(
        "registering {} devices and opening their sessions",
        settings.devices
    ));
    let sessions = devices::register(settings, accounts, &http, &url, id).await?;
    let mut live_load = if settings.live_sessions > 0 {
        progress(&format!(
            "opening {} live sessions, each with a viewer",
            settings.live_sessions
        ));
        Some(live::LiveLoad::start(accounts, &http, &url, id, settings.live_sessions).await?)
    } else {
        None
    };
    let mut load = Devices::start(settings, &http, &url, &sessions);

    // The prober: when a probe frame's last sample is queryable, its end-to-end latency is known.
    let ch = stores.clickhouse.connect().await?;
    let probe_users: HashMap<Uuid, Uuid> = sessions
        .iter()
        .take(load.probe_count)
        .map(|d| (d.session, d.user))
        .collect();
    let e2e = Arc::new(Mutex::new(Vec::<(f64, f64)>::new()));
    let prober = tokio::spawn(probe(
        ch.clone(),
        Arc::clone(&load.probes),
        Arc::clone(&load.stop),
        Arc::clone(&e2e),
        probe_users,
    ));

    let window = sustain(settings, &load, live_load.as_ref(), &ch, &e2e, progress).await?;
    let live_gauges = live_gauges(&http, &metrics_url).await;
    load.stop().await;
    prober.abort();
    let (live_feeds, live_viewers_lost, live_unanswered, mut live_latencies) =
        match live_load.as_mut() {
            Some(l) => {
                // A frame posted more than 5 s ago and not fed back yet counts as that late.
                let unanswered = l.settle_unanswered(Duration::from_secs(5));
                l.measuring.store(false, Ordering::Relaxed);
                l.stop().await;
                (
                    l.feeds.load(Ordering::Relaxed),
                    l.viewers_lost.load(Ordering::Relaxed),
                    unanswered,
                    l.latencies.lock().map(|v| v.clone()).unwrap_or_default(),
                )
            }
            None => (0, 0, 0, Vec::new()),
        };
    live_latencies.sort_by(f64::total_cmp);

    progress("draining: waiting until every accepted point is queryable");
    let total_accepted = load.accepted.load(Ordering::Relaxed);
    let stored = drain(&ch, total_accepted).await?;
    // Rows the consumer wrote beyond the distinct points there are (a frame retried after its
    // answer was lost, a batch redelivered): the window's count, taken without `FINAL`, holds
    // them, so they are taken off it below — all of them, as if every one fell in the window.
    // Two ways, the larger taken: the copies not merged away yet (the load's rows counted
    // without and with `FINAL`), and the rows the consumer counts as written beyond the distinct
    // ones (copies merged away already; not a copy an insert retry left behind).
    let unmerged = ch
        .client()
        .query("SELECT count() FROM points WHERE data_type = 'ecg'")
        .fetch_one::<u64>()
        .await
        .map(|raw| raw.saturating_sub(stored));
    let counted = match ch
        .client()
        .query("SELECT count() FROM points FINAL")
        .fetch_one::<u64>()
        .await
    {
        Ok(distinct) => metrics(
            &http,
            &metrics_url,
            &["biofeed_consumer_rows_written_total"],
        )
        .await[0]
            .map(|written| written.saturating_sub(distinct))
            .ok_or(()),
        Err(_) => Err(()),
    };
    let duplicates = match (unmerged, counted) {
        (Ok(a), Ok(b)) => Some(a.max(b)),
        (Ok(a), Err(_)) | (Err(_), Ok(a)) => Some(a),
        (Err(_), Err(_)) => None,
    };
    let peak_rss_mib = peak_rss_mib(pid);
    let bytes: u64 = ch.bytes_on_disk("points").await.unwrap_or(0);
    let topology = topology(&ch, stores, settings.replication.replication_factor).await;
    drop(up);
    // A side measurement: its failure is reported, and never costs the run its figures.
    let storage = match &settings.chdb_python {
        Some(python) => {
            progress("measuring bytes per point on this ClickHouse and (chdb) a current one");
            let (python, script, env) = (
                python.clone(),
                settings.storage_script.clone(),
                stores.child_env(),
            );
            let measured =
                tokio::task::spawn_blocking(move || storage_bytes(&python, &script, &env))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
            Some(measured.unwrap_or_else(|e| {
                progress(&format!("measuring bytes per point failed: {e:#}"));
                serde_json::json!({ "error": format!("{e:#}") })
            }))
        }
        None => None,
    };

    let mut gateway = load.latencies.lock().map(|l| l.clone()).unwrap_or_default();
    gateway.sort_by(f64::total_cmp);
    let pairs = e2e.lock().map(|l| l.clone()).unwrap_or_default();
    let mut e2e: Vec<f64> = pairs.iter().map(|(_, upper)| *upper).collect();
    e2e.sort_by(f64::total_cmp);
    let mut e2e_lower: Vec<f64> = pairs.iter().map(|(lower, _)| *lower).collect();
    e2e_lower.sort_by(f64::total_cmp);
    let offered_rate = window.offered as f64 / window.seconds;
    // Unknown duplicates: the window's count as it was, flagged in the report.
    let stored_rate = window.stored.saturating_sub(duplicates.unwrap_or(0)) as f64 / window.seconds;
    Ok(E2eFigures {
        topology,
        security: format!(
            "devices → gateway {}; {}",
            if settings.gateway_ca_file.is_some() {
                "https"
            } else {
                "http"
            },
            stores.security_summary()
        ),
        devices: settings.devices,
        rate_hz: settings.rate_hz,
        seconds: window.seconds,
        offered_points_per_s: offered_rate,
        accepted_points_per_s: window.accepted as f64 / window.seconds,
        stored_points_per_s: stored_rate,
        ratio: stored_rate / offered_rate.max(1e-9),
        accepted: total_accepted,
        stored,
        lost: total_accepted as i64 - stored as i64,
        e2e_p50_ms: percentile(&e2e, 0.5),
        e2e_p99_ms: percentile(&e2e, 0.99),
        e2e_p99_lower_ms: percentile(&e2e_lower, 0.99),
        gateway_p50_ms: percentile(&gateway, 0.5),
        gateway_p99_ms: percentile(&gateway, 0.99),
        retried: load.retried.load(Ordering::Relaxed),
        duplicates,
        peak_rss_mib,
        bytes_per_point: bytes as f64 / stored.max(1) as f64,
        live_sessions: settings.live_sessions,
        live_feeds,
        live_p50_ms: percentile(&live_latencies, 0.5),
        live_p99_ms: percentile(&live_latencies, 0.99),
        live_viewers_lost,
        live_unanswered,
        live_windows: live_gauges.0,
        live_window_bytes: live_gauges.1,
        storage,
        gateway_peer: None,
        consume_peer: None,
        ceiling_points_per_s: None,
        ceiling_at_device_cap: false,
        probes: Vec::new(),
    })
}

/// The live member's `biofeed_live_windows` and `biofeed_live_window_bytes` gauges from the
/// `biofeed up` child's metrics endpoint (0 when it does not answer).
async fn live_gauges(http: &reqwest::Client, metrics_url: &str) -> (u64, u64) {
    let values = metrics(
        http,
        metrics_url,
        &["biofeed_live_windows", "biofeed_live_window_bytes"],
    )
    .await;
    (values[0].unwrap_or(0), values[1].unwrap_or(0))
}

/// The values of unlabelled metrics `names` on the `biofeed up` child's metrics endpoint (None
/// for each it does not give).
async fn metrics(http: &reqwest::Client, metrics_url: &str, names: &[&str]) -> Vec<Option<u64>> {
    let text = match http.get(format!("{metrics_url}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    names
        .iter()
        .map(|name| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(name)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .map(|v| v as u64)
        })
        .collect()
}

/// Spawns `biofeed up` on `stores`, on free ports; returns it and its gateway's URL.
async fn start_up(
    settings: &BenchE2eSettings,
    stores: &StoreSettings,
    id: &str,
) -> anyhow::Result<(Child, String, String)> {
    let (port, metrics_port) = (free_port()?, free_port()?);
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args(["up", "--log", "warn"])
        .envs(
            child_env(stores, &settings.keys)
                .iter()
                .map(|(k, v)| (*k, v.as_str())),
        )
        .env_remove_all(biofeed_backends::SECRET_FILE_SETTINGS)
        .env("BIOFEED_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "BIOFEED_UP_METRICS_LISTEN",
            format!("127.0.0.1:{metrics_port}"),
        )
        .env("BIOFEED_CONSUMER_GROUP", format!("biofeed-e2e-{id}"))
        .env("BIOFEED_LIVE_GROUP", format!("biofeed-e2e-{id}-live"))
        .env("BIOFEED_GATEWAY_MAX_IN_FLIGHT", "4096")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    let scheme = if settings.gateway_ca_file.is_some() {
        "https"
    } else {
        for setting in [
            "BIOFEED_GATEWAY_TLS_CERT_FILE",
            "BIOFEED_GATEWAY_TLS_KEY_FILE",
        ] {
            command.env_remove(setting);
        }
        "http"
    };
    Ok((
        Child(command.spawn()?),
        format!("{scheme}://localhost:{port}"),
        format!("http://127.0.0.1:{metrics_port}"),
    ))
}

/// Waits up to a minute for the gateway at `url` to say it is ready.
async fn wait_ready(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let ready = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        anyhow::ensure!(
            Instant::now() < ready,
            "biofeed up did not become ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Looks for the probe frames' last samples in ClickHouse every 100 ms until `stop`, recording
/// each one's device send → queryable latency (ms) in `e2e`.
async fn probe(
    ch: ClickHouse,
    probes: Arc<Probes>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    e2e: Arc<Mutex<Vec<(f64, f64)>>>,
    users: HashMap<Uuid, Uuid>,
) {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Stored {
        #[serde(with = "clickhouse::serde::uuid")]
        session_id: Uuid,
        t_us: i64,
    }
    let client = ch.client();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Each pending probe's last sample by its whole sort key (user, session, data type,
        // time): ClickHouse reads one granule per probe, so probing does not compete with the
        // load it measures.
        let asked_for: Vec<(Uuid, i64)> = probes.lock().map_or_else(
            |_| Vec::new(),
            |p| {
                p.iter()
                    .map(|probe| (probe.session, probe.last_t))
                    .collect()
            },
        );
        let wanted = asked_for
            .iter()
            .filter_map(|(session, last_t)| {
                users.get(session).map(|user| {
                    format!("(user_id = toUUID('{user}') AND session_id = toUUID('{session}') AND data_type = 'ecg' AND t_us = {last_t})")
                })
            })
            .collect::<Vec<_>>()
            .join(" OR ");
        if wanted.is_empty() {
            continue;
        }
        let asked = Instant::now();
        let stored: Vec<Stored> = match client
            .query(&format!(
                "SELECT session_id, t_us FROM points WHERE {wanted}"
            ))
            .fetch_all()
            .await
        {
            Ok(rows) => rows,
            Err(_) => continue,
        };
        // When the answer is back: an upper bound, so that p99 < 1 s is never measured in our
        // favour. The lower bound is the start of the last query that asked for the row and did
        // not find it (ClickHouse reads the parts there are when a query starts): the row became
        // queryable after that.
        let seen = Instant::now();
        if let (Ok(mut probes), Ok(mut e2e)) = (probes.lock(), e2e.lock()) {
            probes.retain_mut(|probe| {
                if !asked_for.contains(&(probe.session, probe.last_t)) {
                    return true;
                }
                let found = stored
                    .iter()
                    .any(|r| r.session_id == probe.session && r.t_us == probe.last_t);
                if found {
                    e2e.push((
                        probe
                            .missed
                            .unwrap_or(probe.sent)
                            .saturating_duration_since(probe.sent)
                            .as_secs_f64()
                            * 1e3,
                        (seen - probe.sent).as_secs_f64() * 1e3,
                    ));
                } else {
                    probe.missed = Some(asked);
                }
                !found
            });
        }
    }
}

/// What the measured window saw: points offered, accepted and stored in it, and its length.
struct Window {
    offered: u64,
    accepted: u64,
    stored: u64,
    seconds: f64,
}

/// Warms up for 10 s (latencies so far forgotten), then measures for `settings.duration`,
/// reporting progress every 10 s.
async fn sustain(
    settings: &BenchE2eSettings,
    load: &Devices,
    live: Option<&live::LiveLoad>,
    ch: &ClickHouse,
    e2e: &Mutex<Vec<(f64, f64)>>,
    progress: &(impl Fn(&str) + Send + Sync),
) -> anyhow::Result<Window> {
    // Rows as inserted, without `FINAL`: on ClickHouse 18.16 a `FINAL` count over tens of
    // millions of rows in many parts takes minutes on one thread, and the window would measure
    // it. A copy can only be doubled by a device retrying a frame whose answer it lost (counted
    // in `retried`); the drain below counts with `FINAL`, so `lost` is exact.
    let count = || async {
        ch.client()
            .query("SELECT count() FROM points WHERE data_type = 'ecg'")
            .fetch_one::<u64>()
            .await
    };
    progress("warming up for 10 s");
    tokio::time::sleep(Duration::from_secs(10)).await;
    if let Ok(mut e2e) = e2e.lock() {
        e2e.clear();
    }
    if let Ok(mut l) = load.latencies.lock() {
        l.clear();
    }
    if let Some(live) = live {
        if let Ok(mut l) = live.latencies.lock() {
            l.clear();
        }
        live.measuring.store(true, Ordering::Relaxed);
    }
    // Stored points are counted over a window as long as the offered one but `STORED_LAG`
    // later: what was in flight at either edge (the pipeline's latency) then counts alike at
    // both, and stored / offered measures whether the stack keeps up, not its latency.
    const STORED_LAG: u64 = 2;
    let (offered0, accepted0, t0) = (
        load.offered.load(Ordering::Relaxed),
        load.accepted.load(Ordering::Relaxed),
        Instant::now(),
    );
    progress(&format!("sustained load for {:?}", settings.duration));
    let secs = settings.duration.as_secs().max(1);
    // A window of a second or two (tests) lags by half of it at most.
    let lag = STORED_LAG.min(secs / 2);
    let mut stored0 = if lag == 0 { count().await? } else { 0 };
    for s in 1..=secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if s == lag {
            stored0 = count().await?;
        }
        if s > lag && (s % 10 == 0 || s == secs) {
            let stored = count().await.unwrap_or(stored0);
            progress(&format!(
                "{s}/{secs} s: {:.0} points/s accepted, {:.0} stored",
                (load.accepted.load(Ordering::Relaxed) - accepted0) as f64
                    / t0.elapsed().as_secs_f64(),
                (stored.saturating_sub(stored0)) as f64 / (t0.elapsed().as_secs_f64() - lag as f64)
            ));
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let (offered, accepted) = (
        load.offered.load(Ordering::Relaxed) - offered0,
        load.accepted.load(Ordering::Relaxed) - accepted0,
    );
    tokio::time::sleep(Duration::from_secs(lag)).await;
    Ok(Window {
        offered,
        accepted,
        stored: count().await?.saturating_sub(stored0),
        seconds,
    })
}

/// Waits up to two minutes until `accepted` points are queryable (`FINAL`); returns how many are.
async fn drain(ch: &ClickHouse, accepted: u64) -> anyhow::Result<u64> {
    let drain = Instant::now() + Duration::from_secs(120);
    let mut stored = 0;
    while Instant::now() < drain {
        stored = ch
            .client()
            .query("SELECT count() FROM points FINAL WHERE data_type = 'ecg'")
            .fetch_one::<u64>()
            .await?;
        if stored >= accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(stored)
}

/// "ClickHouse cluster biofeed (2 shards × 2 replicas); Kafka 3 brokers", or one server.
async fn topology(ch: &ClickHouse, stores: &StoreSettings, replicas: i32) -> String {
    let brokers = stores.kafka.brokers.split(',').count();
    let kafka = format!(
        "Kafka {brokers} broker{}, topics with {replicas} replica{}",
        if brokers == 1 { "" } else { "s" },
        if replicas == 1 { "" } else { "s" },
    );
    let Some(cluster) = ch.cluster() else {
        return format!("one ClickHouse server; {kafka}");
    };
    let shape: Result<(u64, u64), _> = ch
        .server_client()
        .query(
            "SELECT toUInt64(uniqExact(shard_num)), toUInt64(max(replica_num)) FROM system.clusters WHERE cluster = ?",
        )
        .bind(&cluster.name)
        .fetch_one()
        .await;
    match shape {
        Ok((shards, replicas)) => format!(
            "ClickHouse cluster {} ({shards} shards × {replicas} replicas); {kafka}",
            cluster.name
        ),
        Err(_) => format!("ClickHouse cluster {}; {kafka}", cluster.name),
    }
}

#[cfg(test)]
mod tests {
    use super::{next_probe, MAX_DEVICES};

    /// The search against a stack whose true ceiling is `limit` devices: the probes it makes
    /// and the highest load it found held.
    fn search(start: u32, limit: u32) -> (Vec<u32>, Option<u32>) {
        let (mut held, mut failed, mut probes) = (None, None, Vec::new());
        let mut next = Some(start);
        while let Some(n) = next {
            probes.push(n);
            if n <= limit {
                held = Some(held.map_or(n, |h: u32| h.max(n)));
            } else {
                failed = Some(failed.map_or(n, |f: u32| f.min(n)));
            }
            next = next_probe(held, failed);
            assert!(probes.len() < 16, "the search ends soon: {probes:?}");
        }
        (probes, held)
    }

    #[test]
    fn the_search_ends_within_a_tenth_below_the_ceiling() {
        for (start, limit) in [
            (1100, 1600),
            (1100, 1100),
            (1100, 5000),
            (1100, 300),
            (10, 11),
        ] {
            let (probes, held) = search(start, limit);
            let held = held.expect("a load held");
            assert!(held <= limit, "{probes:?}");
            assert!(
                limit - held <= (held / 10).max(1) || probes.contains(&(held + 1)),
                "{start}→{limit}: held {held} after {probes:?}"
            );
        }
    }

    #[test]
    fn a_stack_that_holds_nothing_ends_at_one_device() {
        let (probes, held) = search(1100, 0);
        assert_eq!(held, None);
        assert_eq!(probes.last(), Some(&1));
    }

    #[test]
    fn the_search_stops_at_the_devices_the_bench_allows() {
        let (probes, held) = search(90_000, u32::MAX);
        assert_eq!(held, probes.last().copied());
        assert!(probes.iter().all(|d| *d <= MAX_DEVICES), "{probes:?}");
        // The last step is clamped to the cap, not skipped: the cap itself is probed.
        assert_eq!(held, Some(MAX_DEVICES), "{probes:?}");
        assert_eq!(next_probe(Some(MAX_DEVICES), None), None);
    }
}
