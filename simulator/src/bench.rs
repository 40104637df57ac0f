//! `biofeed bench e2e`: sustained ingest through HTTP from many simulated devices into a real
//! `biofeed up` (its own process, on Postgres and ClickHouse databases and topics of the bench's own), measured from the
//! device's send to the point being queryable in ClickHouse; then the peer comparisons
//! (`biofeed bench gateway`: direct librdkafka produce; `biofeed bench consume`: ClickHouse's
//! Kafka engine) in the same run; a markdown report with the machine it ran on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use biofeed_accounts::{devices, users, AccountKeys, Accounts};
use biofeed_backends::{parse_duration, StoreSettings};
use biofeed_migrations::postgres::OwnDatabase;
use biofeed_schema::{DataTypeName, SensorFrame};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use serde::Serialize;
use uuid::Uuid;

use crate::{now_us, percentile};

/// Settings of `biofeed bench e2e`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchE2eSettings {
    /// Simulated devices posting at once, each in its own session. The default offers 10 % more
    /// than the 1,000,000 points/s target, so that storing at least that much can show.
    #[arg(long = "devices", id = "e2e_devices", value_name = "N", env = "BIOFEED_BENCH_E2E_DEVICES",
          default_value_t = 1100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
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

    /// Skip the peer comparisons (bench gateway, bench consume).
    #[arg(long = "no-peers", id = "e2e_no_peers")]
    pub no_peers: bool,

    /// Where the services are.
    #[command(flatten)]
    pub stores: StoreSettings,

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
    /// Device send → queryable, 99th percentile, ms.
    pub e2e_p99_ms: f64,
    /// Gateway request latency, median, ms.
    pub gateway_p50_ms: f64,
    /// Gateway request latency, 99th percentile, ms.
    pub gateway_p99_ms: f64,
    /// Requests answered 429/503 and retried.
    pub retried: u64,
    /// Peak resident memory of the `biofeed up` process, MiB.
    pub peak_rss_mib: f64,
    /// Bytes per point on disk in ClickHouse.
    pub bytes_per_point: f64,
    /// `biofeed bench gateway`'s last line, if run.
    pub gateway_peer: Option<serde_json::Value>,
    /// `biofeed bench consume`'s last line, if run.
    pub consume_peer: Option<serde_json::Value>,
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
    vec![
        ("BIOFEED_POSTGRES_URL", stores.postgres.url.to_string()),
        ("BIOFEED_CLICKHOUSE_URL", stores.clickhouse.url.to_string()),
        ("BIOFEED_CLICKHOUSE_USER", stores.clickhouse.user.clone()),
        (
            "BIOFEED_CLICKHOUSE_PASSWORD",
            stores.clickhouse.password.clone(),
        ),
        (
            "BIOFEED_CLICKHOUSE_DATABASE",
            stores.clickhouse.database.clone(),
        ),
        ("BIOFEED_KAFKA_BROKERS", stores.kafka.brokers.clone()),
        ("BIOFEED_POINTS_TOPIC", stores.topics.points.clone()),
        ("BIOFEED_DLQ_TOPIC", stores.topics.dlq.clone()),
        ("BIOFEED_MASTER_KEY", keys.master_key().to_base64()),
        ("BIOFEED_BLIND_INDEX_KEY", keys.blind_index_key.to_base64()),
        (
            "BIOFEED_MASTER_KEY_VERSION",
            keys.master_key_version.to_string(),
        ),
    ]
}

/// Runs a peer benchmark as a child process and returns its last line.
fn peer(args: &[&str], env: &[(&'static str, String)]) -> anyhow::Result<serde_json::Value> {
    let output = std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("BIOFEED_LOG", "warn")
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
    let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let mut stores = settings.stores.clone();
    stores.clickhouse.database = format!("biofeed_e2e_{id}");
    stores.topics.points = format!("biofeed.e2e.{id}.points");
    stores.topics.dlq = format!("biofeed.e2e.{id}.dlq");
    // The devices' users, sessions and the jobs' bookkeeping go to a Postgres database of the
    // bench's own, dropped whole at the end: nothing lands in the configured one.
    let database = OwnDatabase::create(&stores.postgres, &format!("biofeed_e2e_{id}"))
        .await
        .context("creating the bench's own Postgres database")?;
    stores.postgres = database.settings.clone();
    let outcome = async {
        biofeed_migrations::migrate(&biofeed_migrations::MigrateSettings {
            stores: stores.clone(),
            layout: biofeed_migrations::TopicLayout {
                points_partitions: 6,
                points_retention: Duration::from_secs(86_400),
                dlq_retention: Duration::from_secs(86_400),
                replication_factor: 1,
            },
        })
        .await
        .context("migrating the bench's own databases and topics")?;
        let accounts = Accounts {
            pool: stores.postgres.connect().await?,
            keys: settings.keys.clone(),
        };
        let outcome = measure(settings, &stores, &accounts, &id, &progress).await;
        accounts.pool.close().await;
        outcome
    }
    .await;

    // Clean up whatever happened.
    progress("cleaning up the bench's databases and topics");
    if let Err(e) = database.drop().await {
        tracing::warn!(error = %e, "cannot drop the bench's own postgres database");
    }
    if let Ok(ch) = stores.clickhouse.connect().await {
        let _ = ch
            .server_client()
            .query(&format!(
                "DROP DATABASE IF EXISTS {}",
                stores.clickhouse.database
            ))
            .execute()
            .await;
    }
    if let Ok(admin) = stores
        .kafka
        .client_config()
        .create::<AdminClient<DefaultClientContext>>()
    {
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let _ = admin
            .delete_topics(&[&stores.topics.points, &stores.topics.dlq], &options)
            .await;
    }
    let mut figures = outcome?;
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
    write_report(settings, &figures)?;
    Ok(figures)
}

#[allow(clippy::too_many_lines)]
async fn measure(
    settings: &BenchE2eSettings,
    stores: &StoreSettings,
    accounts: &Accounts,
    id: &str,
    progress: &(impl Fn(&str) + Send + Sync),
) -> anyhow::Result<E2eFigures> {
    let (port, metrics_port) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{port}");
    progress("starting biofeed up on the bench's own database and topics");
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args(["up", "--log", "warn"])
        .envs(
            child_env(stores, &settings.keys)
                .iter()
                .map(|(k, v)| (*k, v.as_str())),
        )
        .env("BIOFEED_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "BIOFEED_UP_METRICS_LISTEN",
            format!("127.0.0.1:{metrics_port}"),
        )
        .env("BIOFEED_CONSUMER_GROUP", format!("biofeed-e2e-{id}"))
        .env("BIOFEED_GATEWAY_MAX_IN_FLIGHT", "4096")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    let up = Child(command.spawn()?);
    let pid = up.0.id();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.devices as usize)
        .timeout(Duration::from_secs(30))
        .build()?;
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

    progress(&format!(
        "registering {} devices and opening their sessions",
        settings.devices
    ));
    let mut sessions = Vec::new();
    for i in 0..settings.devices {
        let email = users::Email::parse(&format!("e2e-{id}-{i}@example.org"))?;
        let user = users::create_user(accounts, &email, "user").await?;
        let device =
            devices::create_device(&accounts.pool, user, &format!("e2e-bench-{id}")).await?;
        let opened: serde_json::Value = http
            .post(format!("{url}/v1/sessions"))
            .bearer_auth(&device.token)
            .json(&serde_json::json!({ "exercise": "hrv_biofeedback", "data_types": ["ecg"] }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let session: Uuid = opened["session_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("opening a session")?;
        sessions.push((session, device.token, user));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let offered = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    // Probe devices' frames in flight to ClickHouse: (last sample time, sent at).
    let probes: Arc<Mutex<VecDeque<(Uuid, i64, Instant)>>> = Arc::new(Mutex::new(VecDeque::new()));
    let probe_count = sessions.len().min(8);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (session, token, _)) in sessions.iter().cloned().enumerate() {
        let (http, url, stop) = (http.clone(), url.clone(), Arc::clone(&stop));
        let (offered, accepted, retried) = (
            Arc::clone(&offered),
            Arc::clone(&accepted),
            Arc::clone(&retried),
        );
        let (latencies, probes) = (Arc::clone(&latencies), Arc::clone(&probes));
        let interval = settings.frame_interval;
        let step_us = 1_000_000 / i64::from(settings.rate_hz);
        tasks.spawn(async move {
            // Devices start spread over one interval, as real ones do.
            tokio::time::sleep(interval.mul_f64(index as f64 / 1000.0 % 1.0)).await;
            let mut next_t = now_us();
            let mut local = Vec::new();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                let now = now_us();
                let n = ((now - next_t) / step_us).max(0) as usize;
                if n == 0 {
                    continue;
                }
                let frame = SensorFrame {
                    frame_id: Uuid::new_v4(),
                    session_id: session,
                    user_id: Uuid::nil(),
                    device_id: Uuid::nil(),
                    data_type: DataTypeName::parse("ecg").unwrap_or_else(|_| unreachable!()),
                    channels: 1,
                    received_at_us: 0,
                    t0_us: next_t,
                    offsets_us: (0..n as i64).map(|i| i * step_us).collect(),
                    values: (0..n)
                        .map(|i| ((next_t / step_us + i as i64) % 2000) as f32 / 200.0 - 5.0)
                        .collect(),
                };
                let last_t = next_t + (n as i64 - 1) * step_us;
                next_t += n as i64 * step_us;
                let body = biofeed_schema::encode(&frame);
                offered.fetch_add(n as u64, Ordering::Relaxed);
                for _ in 0..20 {
                    let sent = Instant::now();
                    let response = http
                        .post(format!("{url}/v1/sessions/{session}/points"))
                        .bearer_auth(&token)
                        .header("content-type", "application/avro")
                        .body(body.clone())
                        .send()
                        .await;
                    local.push(sent.elapsed().as_secs_f64() * 1e3);
                    match response {
                        Ok(r) if r.status().is_success() => {
                            accepted.fetch_add(n as u64, Ordering::Relaxed);
                            if index < probe_count {
                                if let Ok(mut p) = probes.lock() {
                                    p.push_back((session, last_t, sent));
                                }
                            }
                            break;
                        }
                        Ok(r) if r.status() == 429 || r.status() == 503 => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok(r) => {
                            tracing::warn!(status = %r.status(), "a bench frame was refused");
                            break;
                        }
                        Err(_) => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            if let Ok(mut all) = latencies.lock() {
                all.extend(local);
            }
        });
    }

    // The prober: when a probe frame's last sample is queryable, its end-to-end latency is known.
    let ch = stores.clickhouse.connect().await?;
    let probe_sessions: Vec<(Uuid, Uuid)> = sessions
        .iter()
        .take(probe_count)
        .map(|(s, _, u)| (*s, *u))
        .collect();
    let e2e = Arc::new(Mutex::new(Vec::<f64>::new()));
    let prober = {
        let (client, probes, stop, e2e) = (
            ch.client(),
            Arc::clone(&probes),
            Arc::clone(&stop),
            Arc::clone(&e2e),
        );
        let users: std::collections::HashMap<Uuid, Uuid> = probe_sessions.iter().copied().collect();
        tokio::spawn(async move {
            #[derive(clickhouse::Row, serde::Deserialize)]
            struct Stored {
                #[serde(with = "clickhouse::serde::uuid")]
                session_id: Uuid,
                t_us: i64,
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Each pending probe's last sample by its whole sort key (user, session, data
                // type, time): ClickHouse reads one granule per probe, so probing does not
                // compete with the load it measures.
                let wanted = probes.lock().map_or_else(
                    |_| String::new(),
                    |p| {
                        p.iter()
                            .filter_map(|(session, last_t, _)| {
                                users.get(session).map(|user| {
                                    format!("(user_id = toUUID('{user}') AND session_id = toUUID('{session}') AND data_type = 'ecg' AND t_us = {last_t})")
                                })
                            })
                            .collect::<Vec<_>>()
                            .join(" OR ")
                    },
                );
                if wanted.is_empty() {
                    continue;
                }
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
                let seen = Instant::now();
                if let (Ok(mut probes), Ok(mut e2e)) = (probes.lock(), e2e.lock()) {
                    probes.retain(|(session, last_t, sent)| {
                        let found = stored
                            .iter()
                            .any(|r| r.session_id == *session && r.t_us == *last_t);
                        if found {
                            e2e.push((seen - *sent).as_secs_f64() * 1e3);
                        }
                        !found
                    });
                }
            }
        })
    };

    let count = |sql: &'static str| {
        let client = ch.client();
        async move { client.query(sql).fetch_one::<u64>().await }
    };
    progress("warming up for 10 s");
    tokio::time::sleep(Duration::from_secs(10)).await;
    if let Ok(mut e2e) = e2e.lock() {
        e2e.clear();
    }
    if let Ok(mut l) = latencies.lock() {
        l.clear();
    }
    let (offered0, accepted0, stored0, t0) = (
        offered.load(Ordering::Relaxed),
        accepted.load(Ordering::Relaxed),
        count("SELECT count() FROM points").await?,
        Instant::now(),
    );
    progress(&format!("sustained load for {:?}", settings.duration));
    let secs = settings.duration.as_secs();
    for s in 1..=secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if s % 10 == 0 || s == secs {
            let stored = count("SELECT count() FROM points").await.unwrap_or(stored0);
            progress(&format!(
                "{s}/{secs} s: {:.0} points/s accepted, {:.0} stored",
                (accepted.load(Ordering::Relaxed) - accepted0) as f64 / t0.elapsed().as_secs_f64(),
                (stored.saturating_sub(stored0)) as f64 / t0.elapsed().as_secs_f64()
            ));
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (offered1, accepted1, stored1) = (
        offered.load(Ordering::Relaxed),
        accepted.load(Ordering::Relaxed),
        count("SELECT count() FROM points").await?,
    );
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    prober.abort();

    progress("draining: waiting until every accepted point is queryable");
    let total_accepted = accepted.load(Ordering::Relaxed);
    let drain = Instant::now() + Duration::from_secs(120);
    let mut stored = 0;
    while Instant::now() < drain {
        stored = count("SELECT count() FROM points FINAL").await?;
        if stored >= total_accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let peak_rss_mib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0);
    let bytes: u64 = ch
        .server_client()
        .query("SELECT sum(bytes_on_disk) FROM system.parts WHERE database = ? AND table = 'points' AND active")
        .bind(&stores.clickhouse.database)
        .fetch_one()
        .await
        .unwrap_or(0);
    drop(up);

    let mut gateway = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    gateway.sort_by(f64::total_cmp);
    let mut e2e = e2e.lock().map(|l| l.clone()).unwrap_or_default();
    e2e.sort_by(f64::total_cmp);
    let offered_rate = (offered1 - offered0) as f64 / elapsed;
    let stored_rate = stored1.saturating_sub(stored0) as f64 / elapsed;
    Ok(E2eFigures {
        devices: settings.devices,
        rate_hz: settings.rate_hz,
        seconds: elapsed,
        offered_points_per_s: offered_rate,
        accepted_points_per_s: (accepted1 - accepted0) as f64 / elapsed,
        stored_points_per_s: stored_rate,
        ratio: stored_rate / offered_rate.max(1e-9),
        accepted: total_accepted,
        stored,
        lost: total_accepted as i64 - stored as i64,
        e2e_p50_ms: percentile(&e2e, 0.5),
        e2e_p99_ms: percentile(&e2e, 0.99),
        gateway_p50_ms: percentile(&gateway, 0.5),
        gateway_p99_ms: percentile(&gateway, 0.99),
        retried: retried.load(Ordering::Relaxed),
        peak_rss_mib,
        bytes_per_point: bytes as f64 / stored.max(1) as f64,
        gateway_peer: None,
        consume_peer: None,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {memory:.0} GiB memory, Linux {}",
        kernel.trim()
    )
}

/// The settings of the `biofeed up` child that shape these figures, as it saw them: each as
/// `NAME=value`, and whether it was set (differs from the default).
fn tuning() -> Vec<(String, bool)> {
    [
        ("BIOFEED_CLICKHOUSE_COMPRESSION", "lz4"),
        ("BIOFEED_GATEWAY_AUTH_CACHE_TTL", "2s"),
        ("BIOFEED_GATEWAY_SESSION_CACHE_TTL", "2s"),
        ("BIOFEED_BATCH_MAX_AGE", "500ms"),
        ("BIOFEED_BATCH_MAX_ROWS", "500000"),
        ("BIOFEED_INSERTS_IN_FLIGHT", "3"),
    ]
    .iter()
    .map(|(name, default)| match std::env::var(name) {
        Ok(value) if value != *default => (format!("{name}={value}"), true),
        _ => (format!("{name}={default}"), false),
    })
    .collect()
}

fn write_report(settings: &BenchE2eSettings, f: &E2eFigures) -> anyhow::Result<()> {
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let number = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let gateway_peer = match &f.gateway_peer {
        Some(v) => format!(
            "| `biofeed bench gateway`: the gateway vs producing the same Avro frames straight into Kafka (librdkafka) | {:.0} points/s | {:.0} points/s | {:.2} | gateway p99 {:.1} ms |\n",
            number(v, "gateway_points_per_s"),
            number(v, "direct_points_per_s"),
            number(v, "ratio"),
            number(v, "latency_p99_ms"),
        ),
        None => "| `biofeed bench gateway` | not run | | | |\n".to_owned(),
    };
    let consume_peer = match &f.consume_peer {
        Some(v) => format!(
            "| `biofeed bench consume`: one consumer vs ClickHouse's Kafka engine + materialized view | {:.0} points/s | {:.0} points/s | {:.2} | {:.2} bytes/point on disk |\n",
            number(v, "consumer_points_per_s"),
            number(v, "kafka_engine_points_per_s"),
            number(v, "ratio"),
            number(v, "bytes_per_point"),
        ),
        None => "| `biofeed bench consume` | not run | | | |\n".to_owned(),
    };
    let report = format!(
        "# biofeed end-to-end benchmark\n\n\
         Written by `biofeed bench e2e` on {date}, on {machine}, with PostgreSQL, ClickHouse \
         and Kafka on the same machine (`compose/local up`).\n\n\
         Load: {devices} simulated devices, each one session streaming a single-channel signal at \
         {rate} Hz, posting Avro frames every {interval:?} through HTTP to `biofeed up` (gateway, \
         consumer and jobs in one process); {secs:.0} s measured after a 10 s warm-up. Settings that \
         matter here: {tuning}.\n\n\
         | figure | value | target |\n|---|---|---|\n\
         | points/s offered | {offered:.0} | |\n\
         | points/s accepted (202) | {accepted_rate:.0} | |\n\
         | points/s stored (queryable in ClickHouse) | {stored_rate:.0} | ≥ 1,000,000: {t1} |\n\
         | stored / offered | {ratio:.3} | |\n\
         | end-to-end latency p50 / p99 (device send → queryable) | {e50:.0} ms / {e99:.0} ms | p99 < 2 s: {t2} |\n\
         | gateway request latency p50 / p99 | {g50:.1} ms / {g99:.1} ms | |\n\
         | points accepted / stored after draining | {acc} / {sto} | none lost: {t3} |\n\
         | requests retried after 429/503 | {retried} | |\n\
         | peak RSS of `biofeed up` | {rss:.0} MiB | |\n\
         | bytes per point on disk | {bpp:.2} | |\n\n\
         ## Peers, same run\n\n| benchmark | biofeed | peer | ratio | |\n|---|---|---|---|---|\n{gp}{cp}\n\
         Reproduce: `compose/local up && biofeed migrate && {env}biofeed bench e2e --devices {devices} --rate {rate} --duration {duration:?}`.\n",
        env = tuning().iter().filter(|(_, set)| *set).map(|(s, _)| format!("{s} ")).collect::<String>(),
        duration = settings.duration,
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        tuning = tuning().iter().map(|(s, _)| format!("`{s}`")).collect::<Vec<_>>().join(", "),
        machine = machine(),
        devices = f.devices,
        rate = f.rate_hz,
        interval = settings.frame_interval,
        secs = f.seconds,
        offered = f.offered_points_per_s,
        accepted_rate = f.accepted_points_per_s,
        stored_rate = f.stored_points_per_s,
        t1 = verdict(f.stored_points_per_s >= 1_000_000.0),
        ratio = f.ratio,
        e50 = f.e2e_p50_ms,
        e99 = f.e2e_p99_ms,
        t2 = verdict(f.e2e_p99_ms < 2_000.0 && f.e2e_p99_ms > 0.0),
        g50 = f.gateway_p50_ms,
        g99 = f.gateway_p99_ms,
        acc = f.accepted,
        sto = f.stored,
        t3 = verdict(f.lost == 0),
        retried = f.retried,
        rss = f.peak_rss_mib,
        bpp = f.bytes_per_point,
        gp = gateway_peer,
        cp = consume_peer,
    );
    if let Some(dir) = settings
        .report
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&settings.report, report)
        .with_context(|| format!("writing the report to {}", settings.report.display()))?;
    Ok(())
}
