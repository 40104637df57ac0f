//! The devices of `biofeed bench e2e`: each a user and device made straight in the bench's own
//! Postgres database (no sign-up, whose password hashing would dominate the start), one session
//! opened through the gateway, then Avro frames of a single-channel signal posted through HTTP
//! at its rate, retried after 429/503, until told to stop.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use biofeed_accounts::{devices, users, Accounts};
use biofeed_schema::{DataTypeName, SensorFrame};
use uuid::Uuid;

use super::BenchE2eSettings;
use crate::harness::now_us;

/// Devices whose accepted frames are probed for their end-to-end latency.
const PROBED_DEVICES: usize = 8;

/// Probe frames accepted and not yet seen in ClickHouse.
pub(super) type Probes = Mutex<VecDeque<Probe>>;

/// A probed frame accepted and not yet seen in ClickHouse.
pub(super) struct Probe {
    /// Its session.
    pub(super) session: Uuid,
    /// The time of its last sample (what the prober looks for).
    pub(super) last_t: i64,
    /// When the device first tried to post it.
    pub(super) sent: Instant,
    /// When the last probe query that asked for it and did not find it was sent.
    pub(super) missed: Option<Instant>,
}

/// A device made for the run, its session open.
pub(super) struct Registered {
    /// Its session.
    pub(super) session: Uuid,
    /// Its device token.
    pub(super) token: String,
    /// Its person.
    pub(super) user: Uuid,
}

/// Makes `settings.devices` users with a device each and opens one session per device through
/// the gateway at `url`.
pub(super) async fn register(
    settings: &BenchE2eSettings,
    accounts: &Accounts,
    http: &reqwest::Client,
    url: &str,
    id: &str,
) -> anyhow::Result<Vec<Registered>> {
    let mut registered = Vec::new();
    for i in 0..settings.devices {
        let email = users::Email::parse(&format!("e2e-{id}-{i}@example.org"))?;
        let user = users::create_user(accounts, &email, "user").await?;
        let device =
            devices::create_device(&accounts.pool, user, &format!("e2e-bench-{id}")).await?;
        let session = open_session(http, url, &device.token, "ecg").await?;
        registered.push(Registered {
            session,
            token: device.token,
            user,
        });
    }
    Ok(registered)
}

/// Opens an `hrv_biofeedback` session streaming `data_type` with a device token, through the
/// gateway at `url`; its id.
pub(super) async fn open_session(
    http: &reqwest::Client,
    url: &str,
    device_token: &str,
    data_type: &str,
) -> anyhow::Result<Uuid> {
    let opened: serde_json::Value = http
        .post(format!("{url}/v1/sessions"))
        .bearer_auth(device_token)
        .json(&serde_json::json!({ "exercise": "hrv_biofeedback", "data_types": [data_type] }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    opened["session_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("opening a session")
}

/// The running devices and what they counted.
pub(super) struct Devices {
    /// Set to stop every device.
    pub(super) stop: Arc<AtomicBool>,
    /// Points the devices offered.
    pub(super) offered: Arc<AtomicU64>,
    /// Points the gateway accepted.
    pub(super) accepted: Arc<AtomicU64>,
    /// Requests answered 429/503 (or not at all) and retried.
    pub(super) retried: Arc<AtomicU64>,
    /// Request latencies, ms (gathered as each device stops).
    pub(super) latencies: Arc<Mutex<Vec<f64>>>,
    /// The probed devices' accepted frames not yet seen in ClickHouse.
    pub(super) probes: Arc<Probes>,
    /// How many devices (the first ones) are probed.
    pub(super) probe_count: usize,
    tasks: tokio::task::JoinSet<()>,
}

impl Devices {
    /// Starts one task per registered device, posting to the gateway at `url`.
    pub(super) fn start(
        settings: &BenchE2eSettings,
        http: &reqwest::Client,
        url: &str,
        registered: &[Registered],
    ) -> Self {
        let mut devices = Self {
            stop: Arc::new(AtomicBool::new(false)),
            offered: Arc::new(AtomicU64::new(0)),
            accepted: Arc::new(AtomicU64::new(0)),
            retried: Arc::new(AtomicU64::new(0)),
            latencies: Arc::new(Mutex::new(Vec::new())),
            probes: Arc::new(Mutex::new(VecDeque::new())),
            probe_count: registered.len().min(PROBED_DEVICES),
            tasks: tokio::task::JoinSet::new(),
        };
        for (index, device) in registered.iter().enumerate() {
            let device = Device {
                http: http.clone(),
                endpoint: format!("{url}/v1/sessions/{}/points", device.session),
                session: device.session,
                token: device.token.clone(),
                probed: index < devices.probe_count,
                interval: settings.frame_interval,
                step_us: 1_000_000 / i64::from(settings.rate_hz),
                stop: Arc::clone(&devices.stop),
                offered: Arc::clone(&devices.offered),
                accepted: Arc::clone(&devices.accepted),
                retried: Arc::clone(&devices.retried),
                probes: Arc::clone(&devices.probes),
            };
            let latencies = Arc::clone(&devices.latencies);
            devices.tasks.spawn(async move {
                // Devices start spread over one interval, as real ones do.
                let delay = device.interval.mul_f64(index as f64 / 1000.0 % 1.0);
                tokio::time::sleep(delay).await;
                let local = device.run().await;
                if let Ok(mut all) = latencies.lock() {
                    all.extend(local);
                }
            });
        }
        devices
    }

    /// Stops every device and waits until all have.
    pub(super) async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One device's loop and its share of the counters.
struct Device {
    http: reqwest::Client,
    endpoint: String,
    session: Uuid,
    token: String,
    probed: bool,
    interval: Duration,
    step_us: i64,
    stop: Arc<AtomicBool>,
    offered: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    retried: Arc<AtomicU64>,
    probes: Arc<Probes>,
}

impl Device {
    /// Posts, every interval, what was sampled since the last post, until stopped; returns the
    /// request latencies (ms).
    async fn run(&self) -> Vec<f64> {
        let mut next_t = now_us();
        let mut latencies = Vec::new();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.stop.load(Ordering::Relaxed) {
            ticker.tick().await;
            let n = ((now_us() - next_t) / self.step_us).max(0) as usize;
            if n == 0 {
                continue;
            }
            let body = biofeed_schema::encode(&self.frame(next_t, n));
            let last_t = next_t + (n as i64 - 1) * self.step_us;
            next_t += n as i64 * self.step_us;
            self.offered.fetch_add(n as u64, Ordering::Relaxed);
            self.post(body, n as u64, last_t, &mut latencies).await;
        }
        latencies
    }

    /// `n` samples of the device's person's ECG from `t0_us` on, in whole µV as chest devices
    /// report it (`biofeed_simulator::signals::ecg_mv`).
    fn frame(&self, t0_us: i64, n: usize) -> SensorFrame {
        let step_us = self.step_us;
        let seed = self.session.as_u64_pair().0;
        SensorFrame {
            frame_id: Uuid::new_v4(),
            session_id: self.session,
            user_id: Uuid::nil(),
            device_id: Uuid::nil(),
            data_type: DataTypeName::parse("ecg").unwrap_or_else(|_| unreachable!()),
            channels: 1,
            received_at_us: 0,
            t0_us,
            offsets_us: (0..n as i64).map(|i| i * step_us).collect(),
            values: (0..n)
                .map(|i| biofeed_simulator::signals::ecg_mv(seed, t0_us + i as i64 * step_us))
                .collect(),
        }
    }

    /// Posts one frame of `points` points, up to 20 times while the gateway answers 429/503 or
    /// not at all; a probed device's accepted frame becomes a probe.
    async fn post(&self, body: Vec<u8>, points: u64, last_t: i64, latencies: &mut Vec<f64>) {
        // The device's latency runs from its first try: a frame retried after a 429 waited as
        // long as the retries took.
        let first_sent = Instant::now();
        for _ in 0..20 {
            let sent = Instant::now();
            let response = self
                .http
                .post(&self.endpoint)
                .bearer_auth(&self.token)
                .header("content-type", "application/avro")
                .body(body.clone())
                .send()
                .await;
            latencies.push(sent.elapsed().as_secs_f64() * 1e3);
            match response {
                Ok(r) if r.status().is_success() => {
                    self.accepted.fetch_add(points, Ordering::Relaxed);
                    if self.probed {
                        if let Ok(mut p) = self.probes.lock() {
                            p.push_back(Probe {
                                session: self.session,
                                last_t,
                                sent: first_sent,
                                missed: None,
                            });
                        }
                    }
                    return;
                }
                Ok(r) if r.status() == 429 || r.status() == 503 => {
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(r) => {
                    tracing::warn!(status = %r.status(), "a bench frame was refused");
                    return;
                }
                Err(_) => {
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
