//! Simulated devices that use biofeed as real ones do, through the real HTTP API: each signs a
//! person up, logs in, registers a device, and records sessions — open, stream at the device's
//! native rates in real time, then complete (with feedback) or abort — until the run ends.
//!
//! Device kinds, taken in turn: a chest strap (`hrv_biofeedback`: RR intervals and heart rate,
//! JSON), a pulse oximeter (`breath_hold`: SpO2 and heart rate at 1 Hz, two-channel PPG at 100 Hz,
//! JSON), an EEG headset (`alpha_neurofeedback`: 8 channels at 256 Hz, Avro). Signals: [`signals`].
//!
//! Architecture invariants: a client only — it knows biofeed through its HTTP API and the Avro
//! schema, nothing else (no storage driver, no `accounts`: `cargo tree -p biofeed-simulator`
//! shows none, which a test holds); every person it makes is synthetic (`sim-…@example.org`).

pub mod signals;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use biofeed_schema::{DataTypeName, SensorFrame};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::signals::{Eeg, Heart, Oximeter};

/// How long a simulated device keeps retrying a gateway that does not answer, or answers 429 or
/// 503, before it gives up: long enough to ride out a restart.
const RIDE_OUT: Duration = Duration::from_secs(60);

/// Settings of `biofeed simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateSettings {
    /// The gateway's base URL.
    #[arg(
        long = "url",
        id = "simulate_url",
        value_name = "URL",
        env = "BIOFEED_SIMULATE_URL",
        default_value = "http://127.0.0.1:8080",
        value_parser = parse_url
    )]
    pub url: reqwest::Url,

    /// PEM file of a CA to trust (besides the system's) for an https:// gateway URL, e.g. the
    /// local stack's `.state/tls/ca.pem`.
    #[arg(
        long = "ca-file",
        id = "simulate_ca_file",
        value_name = "PATH",
        env = "BIOFEED_SIMULATE_CA_FILE",
        value_parser = parse_ca_file
    )]
    pub ca_file: Option<reqwest::Certificate>,

    /// Simulated devices (each with its own person), streaming at once.
    #[arg(long = "devices", id = "simulate_devices", value_name = "N", env = "BIOFEED_SIMULATE_DEVICES",
          default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub devices: u32,

    /// How long to run; sessions still going at the end are completed or aborted then.
    #[arg(long = "duration", id = "simulate_duration", value_name = "DURATION", env = "BIOFEED_SIMULATE_DURATION",
          default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Typical session length (each is 50–150 % of it).
    #[arg(long = "session-length", id = "simulate_session_length", value_name = "DURATION", env = "BIOFEED_SIMULATE_SESSION_LENGTH",
          default_value = "12s", value_parser = parse_duration)]
    pub session_length: Duration,

    /// Share of sessions aborted instead of completed, 0 to 1.
    #[arg(long = "abort-share", id = "simulate_abort_share", value_name = "SHARE", env = "BIOFEED_SIMULATE_ABORT_SHARE",
          default_value_t = 0.2, value_parser = parse_share)]
    pub abort_share: f64,

    /// How often a device posts what it measured since its last post.
    #[arg(long = "frame-interval", id = "simulate_frame_interval", value_name = "DURATION", env = "BIOFEED_SIMULATE_FRAME_INTERVAL",
          default_value = "1s", value_parser = parse_duration)]
    pub frame_interval: Duration,

    /// A practitioner (user id) every simulated person proposes a practitioner_patient
    /// relationship to; the practitioner accepts them through the API.
    #[arg(
        long = "practitioner",
        id = "simulate_practitioner",
        value_name = "USER_ID",
        env = "BIOFEED_SIMULATE_PRACTITIONER"
    )]
    pub practitioner: Option<Uuid>,

    /// The terms version sign-up accepts (the gateway's BIOFEED_TERMS_VERSION).
    #[arg(
        long = "terms-version",
        id = "simulate_terms_version",
        value_name = "VERSION",
        env = "BIOFEED_TERMS_VERSION",
        default_value = "2026-11-01"
    )]
    pub terms_version: String,

    /// Watch the first device's sessions live while they record (`GET /v1/sessions/{id}/live`,
    /// as the person): print each feed's rolling metrics as it arrives. Needs a live member
    /// (`biofeed up` runs one).
    #[arg(long = "watch", id = "simulate_watch", env = "BIOFEED_SIMULATE_WATCH")]
    pub watch: bool,

    /// Seed of the random signals and choices (default: random).
    #[arg(
        long = "seed",
        id = "simulate_seed",
        value_name = "N",
        env = "BIOFEED_SIMULATE_SEED"
    )]
    pub seed: Option<u64>,
}

/// The gateway could not be used: it did not answer its health check, or answered an error.
/// Retrying later may help (`biofeed simulate` exits 3, as for an unreachable backing service).
#[derive(Debug, thiserror::Error)]
#[error("the gateway at {address} (setting BIOFEED_SIMULATE_URL) failed: {reason}")]
pub struct GatewayUnavailable {
    /// The gateway's URL as configured.
    pub address: String,
    /// What went wrong, as the HTTP client said it.
    pub reason: String,
}

/// Parses a positive duration such as `5s`, `1500ms` or `2min`, with the same words as every
/// other `biofeed` duration setting (`biofeed_backends::parse_duration`, which this client does
/// not link: that crate brings the Postgres, ClickHouse and Kafka drivers).
fn parse_duration(value: &str) -> Result<Duration, String> {
    let parsed = humantime::parse_duration(value).map_err(|e| {
        format!("'{value}' is not a duration ({e}); write e.g. 5s, 1500ms, 2min, 7days")
    })?;
    if parsed.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(parsed)
}

fn parse_url(value: &str) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(value)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| format!("'{value}' is not an http(s) URL such as http://127.0.0.1:8080"))
}

fn parse_share(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| (0.0..=1.0).contains(s))
        .ok_or_else(|| format!("'{value}' is not a share from 0 to 1"))
}

/// One session as the simulator recorded it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRecord {
    /// The session.
    pub session_id: Uuid,
    /// Its person.
    pub user_id: Uuid,
    /// `completed` or `aborted`.
    pub status: String,
    /// Points the gateway accepted for it.
    pub points: u64,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Devices that ran.
    pub devices: u64,
    /// Sessions completed.
    pub completed: u64,
    /// Sessions aborted.
    pub aborted: u64,
    /// Points accepted (202) by the gateway.
    pub points_accepted: u64,
    /// Points of completed sessions.
    pub points_completed: u64,
    /// Frames refused (4xx other than 429).
    pub frames_refused: u64,
    /// Frames sent again after 429 or 503.
    pub frames_retried: u64,
    /// Seconds the run took.
    pub elapsed_s: f64,
    /// Points accepted per second.
    pub points_per_s: f64,
    /// Median latency of point requests, ms.
    pub latency_p50_ms: f64,
    /// 99th percentile latency of point requests, ms.
    pub latency_p99_ms: f64,
    /// Every session.
    pub sessions: Vec<SessionRecord>,
}

/// Live counters for progress output.
#[derive(Debug, Default)]
pub struct Progress {
    /// Points accepted so far.
    pub points: AtomicU64,
    /// Sessions finished so far.
    pub sessions: AtomicU64,
    /// Devices signed up and registered.
    pub ready: AtomicU64,
    /// With `--watch`: the live feeds' lines not yet printed.
    pub live: std::sync::Mutex<Vec<String>>,
}

impl Progress {
    /// Takes the live feeds' lines not yet printed.
    pub fn take_live(&self) -> Vec<String> {
        std::mem::take(&mut *self.live.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn push_live(&self, line: String) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }
}

/// One line of a live feed (`biofeed-live`'s JSON): the data type, the window and its metrics
/// (EEG band powers averaged over the channels).
pub fn live_line(feed: &serde_json::Value) -> String {
    let data_type = feed["data_type"].as_str().unwrap_or("?");
    let session = feed["session_id"].as_str().unwrap_or("?");
    let mut sums: Vec<(String, f64, u32)> = Vec::new();
    for m in feed["metrics"].as_array().into_iter().flatten() {
        let (Some(name), Some(value)) = (m["name"].as_str(), m["value"].as_f64()) else {
            continue;
        };
        match sums.iter_mut().find(|(n, _, _)| n == name) {
            Some((_, sum, n)) => {
                *sum += value;
                *n += 1;
            }
            None => sums.push((name.to_owned(), value, 1)),
        }
    }
    let metrics: Vec<String> = sums
        .iter()
        .map(|(name, sum, n)| format!("{name} {:.1}", sum / f64::from(*n)))
        .collect();
    format!(
        "live {} {data_type} ({} samples in {:.0} s): {}",
        &session[..session.len().min(8)],
        feed["samples"].as_u64().unwrap_or(0),
        feed["window_us"].as_f64().unwrap_or(0.0) / 1e6,
        if metrics.is_empty() {
            "(too few samples yet)".to_owned()
        } else {
            metrics.join(", ")
        }
    )
}

/// The `q` quantile of sorted values (nearest rank), 0 for none.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round().max(0.0) as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Microseconds since the epoch, now.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Strap,
    Oximeter,
    Headset,
}

impl Kind {
    fn of(index: u32) -> Self {
        match index % 3 {
            0 => Kind::Strap,
            1 => Kind::Oximeter,
            _ => Kind::Headset,
        }
    }

    fn exercise(self) -> (&'static str, &'static [&'static str], &'static str) {
        match self {
            Kind::Strap => (
                "hrv_biofeedback",
                &["rr_interval", "heart_rate"],
                "Simulated chest strap",
            ),
            Kind::Oximeter => (
                "breath_hold",
                &["spo2", "heart_rate", "ppg"],
                "Simulated pulse oximeter",
            ),
            Kind::Headset => ("alpha_neurofeedback", &["eeg"], "Simulated EEG headset"),
        }
    }
}

/// What a device measured in one interval, per data type.
struct Measured {
    series: Vec<(&'static str, u16, Vec<i64>, Vec<f32>)>,
}

struct Body {
    heart: Heart,
    oximeter: Oximeter,
    eeg: Eeg,
}

impl Body {
    fn measure(&mut self, kind: Kind, from_us: i64, to_us: i64) -> Measured {
        let mut series = Vec::new();
        let per_second = |from: i64, to: i64, rate: i64| -> Vec<i64> {
            let step = 1_000_000 / rate;
            let first = (from / step + 1) * step;
            (0..)
                .map(|i| first + i * step)
                .take_while(|t| *t <= to)
                .collect()
        };
        match kind {
            Kind::Strap => {
                let beats = self.heart.beats_until(to_us);
                series.push((
                    "rr_interval",
                    1,
                    beats.iter().map(|(t, _)| *t).collect(),
                    beats.iter().map(|(_, rr)| *rr).collect(),
                ));
                let times = per_second(from_us, to_us, 1);
                let values = times.iter().map(|t| self.heart.rate_bpm(*t)).collect();
                series.push(("heart_rate", 1, times, values));
            }
            Kind::Oximeter => {
                let _ = self.heart.beats_until(to_us);
                let seconds = per_second(from_us, to_us, 1);
                let spo2 = seconds.iter().map(|t| self.oximeter.spo2(*t)).collect();
                let rate = seconds.iter().map(|t| self.heart.rate_bpm(*t)).collect();
                series.push(("spo2", 1, seconds.clone(), spo2));
                series.push(("heart_rate", 1, seconds, rate));
                let times = per_second(from_us, to_us, 100);
                let bpm = self.heart.rate_bpm(to_us);
                let values = times
                    .iter()
                    .flat_map(|t| self.oximeter.ppg(*t, bpm))
                    .collect();
                series.push(("ppg", 2, times, values));
            }
            Kind::Headset => {
                let times = per_second(from_us, to_us, 256);
                let values = times.iter().flat_map(|t| self.eeg.sample(*t)).collect();
                series.push(("eeg", 8, times, values));
            }
        }
        Measured { series }
    }
}

/// Reads the CA certificate of BIOFEED_SIMULATE_CA_FILE (PEM).
fn parse_ca_file(value: &str) -> Result<reqwest::Certificate, String> {
    let pem = std::fs::read(value)
        .map_err(|e| format!("BIOFEED_SIMULATE_CA_FILE: cannot read {value}: {e}"))?;
    reqwest::Certificate::from_pem(&pem)
        .map_err(|e| format!("BIOFEED_SIMULATE_CA_FILE: {value} is not a PEM certificate: {e}"))
}

/// Runs the simulation; `progress` is updated as it goes.
pub async fn simulate(
    settings: &SimulateSettings,
    progress: Arc<Progress>,
) -> anyhow::Result<Summary> {
    let url = settings.url.clone();
    let mut http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(settings.devices as usize);
    if let Some(ca) = &settings.ca_file {
        http = http.add_root_certificate(ca.clone());
    }
    let http = http.build()?;
    http.get(url.join("/healthz")?)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| GatewayUnavailable {
            address: url.to_string(),
            reason: e.to_string(),
        })?;
    let seed = settings.seed.unwrap_or_else(|| rand::thread_rng().gen());
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let started = Instant::now();
    let deadline = started + settings.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..settings.devices {
        let device = Device {
            http: http.clone(),
            url: url.clone(),
            settings: settings.clone(),
            kind: Kind::of(index),
            seed: seed.wrapping_add(u64::from(index) * 7_919),
            email: format!("sim-{run}-{index}@example.org"),
            progress: Arc::clone(&progress),
            watch: settings.watch && index == 0,
        };
        tasks.spawn(async move { device.run(deadline).await });
    }
    let mut summary = Summary::default();
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    while let Some(outcome) = tasks.join_next().await {
        match outcome {
            Ok((device, stopped)) => {
                match stopped {
                    None => summary.devices += 1,
                    Some(e) => failures.push(format!("{e:#}")),
                }
                summary.frames_refused += device.refused;
                summary.frames_retried += device.retried;
                latencies.extend(device.latencies_ms);
                summary.sessions.extend(device.sessions);
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    if summary.devices == 0 {
        anyhow::bail!(
            "no simulated device ran: {}",
            failures.first().map_or("unknown", String::as_str)
        );
    }
    for failure in &failures {
        tracing::warn!(error = %failure, "a simulated device stopped");
    }
    for session in &summary.sessions {
        summary.points_accepted += session.points;
        if session.status == "completed" {
            summary.completed += 1;
            summary.points_completed += session.points;
        } else {
            summary.aborted += 1;
        }
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.points_per_s = summary.points_accepted as f64 / summary.elapsed_s.max(1e-9);
    latencies.sort_by(f64::total_cmp);
    summary.latency_p50_ms = percentile(&latencies, 0.5);
    summary.latency_p99_ms = percentile(&latencies, 0.99);
    Ok(summary)
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Device {
    http: reqwest::Client,
    url: reqwest::Url,
    settings: SimulateSettings,
    kind: Kind,
    seed: u64,
    email: String,
    progress: Arc<Progress>,
    /// Watches its sessions live (`--watch`, the first device).
    watch: bool,
}

/// Who a simulated device records for, and the token it records with.
struct Enrolled {
    user_id: Uuid,
    device_token: String,
    login_token: String,
}

#[derive(Default)]
struct DeviceOutcome {
    sessions: Vec<SessionRecord>,
    latencies_ms: Vec<f64>,
    refused: u64,
    retried: u64,
}

impl Device {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        // A real device rides out a gateway restart: it retries unreachable gateways and 429/503
        // answers for up to a minute.
        let url = self.url.join(path)?;
        let give_up = Instant::now() + RIDE_OUT;
        let mut retried_unanswered = false;
        loop {
            let mut request = self.http.request(method.clone(), url.clone());
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = &body {
                request = request.json(body);
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) if Instant::now() < give_up => {
                    tracing::warn!(error = %e, path, "the gateway did not answer; retrying");
                    retried_unanswered = true;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            if (status == 429 || status == 503) && Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            // A close whose first try landed but whose answer was lost finds the session closed.
            if status == 409 && retried_unanswered && method == reqwest::Method::POST {
                return Ok(Value::Null);
            }
            anyhow::ensure!(status.is_success(), "{method} {path}: {status} {text}");
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
    }

    /// Runs the device until `deadline`; what it recorded is kept when it stops early, with the
    /// reason.
    async fn run(self, deadline: Instant) -> (DeviceOutcome, Option<anyhow::Error>) {
        let mut outcome = DeviceOutcome::default();
        let stopped = self.record(deadline, &mut outcome).await.err();
        (outcome, stopped)
    }

    /// Signs the simulated person up, registers the device and records sessions back to back
    /// until `deadline`; each finished session is added to `outcome` as it ends.
    async fn record(&self, deadline: Instant, outcome: &mut DeviceOutcome) -> anyhow::Result<()> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let enrolled = self.enrol(&mut rng).await?;
        self.progress.ready.fetch_add(1, Ordering::Relaxed);

        let mut body = Body {
            heart: Heart::new(self.seed, now_us()),
            oximeter: Oximeter::new(self.seed),
            eeg: Eeg::new(self.seed),
        };
        while Instant::now() + Duration::from_secs(1) < deadline {
            let session = self
                .record_session(&mut rng, &mut body, &enrolled, deadline, outcome)
                .await?;
            self.progress.sessions.fetch_add(1, Ordering::Relaxed);
            outcome.sessions.push(session);
        }
        Ok(())
    }

    /// Signs up and logs in as a new person with a made-up profile, registers this device and,
    /// when a practitioner is set, links the person to them; draws from `rng` in a fixed order
    /// so a seed always makes the same person.
    async fn enrol(&self, rng: &mut StdRng) -> anyhow::Result<Enrolled> {
        let password = format!("sim-{}", Uuid::new_v4().simple());
        let years = rng.gen_range(20..70);
        let countries = ["DE", "FR", "NL", "SE", "GB", "US", "ES", "IT"];
        let signed_up = self
            .call(
                reqwest::Method::POST,
                "/v1/users",
                None,
                Some(json!({
                    "email": self.email, "password": password, "accept_terms": self.settings.terms_version,
                    "profile": {
                        "first_name": format!("Sim{}", rng.gen_range(1000..9999)),
                        "birth_date": format!("{}-0{}-1{}", 2026 - years, rng.gen_range(1..9), rng.gen_range(0..9)),
                        "country": countries[rng.gen_range(0..countries.len())],
                    },
                })),
            )
            .await?;
        let login = self
            .call(
                reqwest::Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({ "email": self.email, "password": password })),
            )
            .await?;
        // The login names the user too: a sign-up whose answer was lost in a gateway restart
        // (its retry answered 409, the account exists) has no body to read it from.
        let user_id: Uuid = signed_up["user_id"]
            .as_str()
            .or_else(|| login["user_id"].as_str())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("neither sign-up nor login answered with a user id"))?;
        let token = login["token"].as_str().unwrap_or_default().to_owned();
        let (_, _, model) = self.kind.exercise();
        let device = self
            .call(
                reqwest::Method::POST,
                "/v1/me/devices",
                Some(&token),
                Some(json!({ "model": model })),
            )
            .await?;
        let device_token = device["token"].as_str().unwrap_or_default().to_owned();
        if let Some(practitioner) = self.settings.practitioner {
            self.call(
                reqwest::Method::POST,
                "/v1/relationships",
                Some(&token),
                Some(json!({ "type": "practitioner_patient", "lead_id": practitioner })),
            )
            .await?;
        }
        Ok(Enrolled {
            user_id,
            device_token,
            login_token: token,
        })
    }

    /// Records one session: opens it, posts what `body` measures every frame interval until a
    /// randomly drawn length (or `deadline`) has passed, then aborts or completes it; returns
    /// the session's record, its points being those the gateway accepted.
    async fn record_session(
        &self,
        rng: &mut StdRng,
        body: &mut Body,
        enrolled: &Enrolled,
        deadline: Instant,
        outcome: &mut DeviceOutcome,
    ) -> anyhow::Result<SessionRecord> {
        let device_token = enrolled.device_token.as_str();
        let (exercise, data_types, _) = self.kind.exercise();
        let length = self.settings.session_length.as_secs_f64();
        let opened = self
            .call(
                reqwest::Method::POST,
                "/v1/sessions",
                Some(device_token),
                Some(json!({ "exercise": exercise, "data_types": data_types })),
            )
            .await?;
        let session: Uuid = opened["session_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("opening a session answered without its id"))?;
        let ends = (Instant::now() + Duration::from_secs_f64(length * rng.gen_range(0.5..1.5)))
            .min(deadline);
        // Aborted when the session ends, or when recording fails (dropped with it).
        let _watcher = self.watch.then(|| {
            AbortOnDrop(tokio::spawn(
                self.watch_live(session, enrolled.login_token.clone()),
            ))
        });
        let mut last = now_us();
        // Skip what happened before the session opened.
        let _ = body.measure(self.kind, last - 1, last);
        let mut points = 0u64;
        while Instant::now() < ends {
            tokio::time::sleep(self.settings.frame_interval.min(ends - Instant::now())).await;
            let now = now_us();
            let measured = body.measure(self.kind, last, now);
            last = now;
            points += self.post(session, device_token, measured, outcome).await?;
        }
        let status = self.end_session(rng, session, device_token).await?;
        Ok(SessionRecord {
            session_id: session,
            user_id: enrolled.user_id,
            status: status.to_owned(),
            points,
        })
    }

    /// Reads a session's live feed (Server-Sent Events) as the person and queues each feed's
    /// line for printing, until the feed ends or the task is aborted.
    fn watch_live(
        &self,
        session: Uuid,
        token: String,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (http, url, progress) = (
            self.http.clone(),
            self.url.clone(),
            Arc::clone(&self.progress),
        );
        async move {
            let Ok(live) = url.join(&format!("/v1/sessions/{session}/live")) else {
                return;
            };
            let response = match http
                .get(live)
                .bearer_auth(&token)
                .timeout(Duration::from_secs(24 * 3600))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    progress.push_live(format!("live: the gateway answered {}", r.status()));
                    return;
                }
                Err(e) => {
                    progress.push_live(format!("live: {e}"));
                    return;
                }
            };
            let mut response = response;
            let mut buffer = String::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(at) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..at + 2).collect();
                    let mut event = "";
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            event = if v.trim() == "end" { "end" } else { "feed" };
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        }
                    }
                    let Ok(json) = serde_json::from_str::<serde_json::Value>(&data) else {
                        continue;
                    };
                    if event == "end" {
                        progress.push_live(format!(
                            "live: the feed ended ({})",
                            json["reason"].as_str().unwrap_or("?")
                        ));
                        return;
                    }
                    progress.push_live(live_line(&json));
                }
            }
        }
    }

    /// Ends a session the way `abort_share` says (aborted, or completed with random feedback)
    /// and returns the status it ended in.
    async fn end_session(
        &self,
        rng: &mut StdRng,
        session: Uuid,
        device_token: &str,
    ) -> anyhow::Result<&'static str> {
        if rng.gen_bool(self.settings.abort_share) {
            self.call(
                reqwest::Method::POST,
                &format!("/v1/sessions/{session}/abort"),
                Some(device_token),
                None,
            )
            .await?;
            Ok("aborted")
        } else {
            let feelings = ["calm", "focused", "relaxed", "tired", "alert"];
            self.call(
                reqwest::Method::POST,
                &format!("/v1/sessions/{session}/complete"),
                Some(device_token),
                Some(json!({ "feedback": { "feeling": feelings[rng.gen_range(0..feelings.len())], "rating": rng.gen_range(1..=5) } })),
            )
            .await?;
            Ok("completed")
        }
    }

    /// Posts each series as a frame (the headset's as Avro, the rest as JSON); returns the points
    /// accepted.
    async fn post(
        &self,
        session: Uuid,
        token: &str,
        measured: Measured,
        outcome: &mut DeviceOutcome,
    ) -> anyhow::Result<u64> {
        let path = self.url.join(&format!("/v1/sessions/{session}/points"))?;
        let mut accepted = 0;
        for (data_type, channels, times, values) in measured.series {
            if times.is_empty() {
                continue;
            }
            let frame_id = Uuid::new_v4();
            let (content_type, bytes) = if data_type == "eeg" {
                let t0 = times[0];
                let frame = SensorFrame {
                    frame_id,
                    session_id: session,
                    user_id: Uuid::nil(),
                    device_id: Uuid::nil(),
                    data_type: DataTypeName::parse(data_type).map_err(anyhow::Error::msg)?,
                    channels,
                    received_at_us: 0,
                    t0_us: t0,
                    offsets_us: times.iter().map(|t| t - t0).collect(),
                    values,
                };
                ("application/avro", biofeed_schema::encode(&frame))
            } else {
                let rows: Vec<&[f32]> = values.chunks(usize::from(channels)).collect();
                let body = json!({ "frame_id": frame_id, "data_type": data_type, "timestamps_us": times, "values": rows });
                ("application/json", serde_json::to_vec(&body)?)
            };
            let samples = times.len() as u64;
            let give_up = Instant::now() + RIDE_OUT;
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let sent = Instant::now();
                let response = self
                    .http
                    .post(path.clone())
                    .bearer_auth(token)
                    .header("content-type", content_type)
                    .body(bytes.clone())
                    .send()
                    .await;
                outcome
                    .latencies_ms
                    .push(sent.elapsed().as_secs_f64() * 1e3);
                match response {
                    Ok(r) if r.status().is_success() => {
                        accepted += samples;
                        self.progress.points.fetch_add(samples, Ordering::Relaxed);
                        break;
                    }
                    Ok(r) if r.status() == 429 || r.status() == 503 => {
                        outcome.retried += 1;
                        if attempt >= 10 {
                            outcome.refused += 1;
                            tracing::warn!(
                                data_type,
                                "a frame was refused ten times; giving it up"
                            );
                            break;
                        }
                        let wait = r
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(1);
                        tokio::time::sleep(
                            Duration::from_millis(200 * u64::from(attempt))
                                .min(Duration::from_secs(wait)),
                        )
                        .await;
                    }
                    Ok(r) => {
                        outcome.refused += 1;
                        let status = r.status();
                        let problem = r.text().await.unwrap_or_default();
                        tracing::warn!(%status, data_type, %problem, "a frame was refused");
                        break;
                    }
                    Err(e) if Instant::now() < give_up => {
                        outcome.retried += 1;
                        tracing::warn!(error = %e, "posting a frame failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(accepted)
    }
}
