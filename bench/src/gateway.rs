//! `biofeed bench gateway`: how many points per second the gateway takes, against the ceiling of
//! producing the same frames straight into Kafka with librdkafka.
//!
//! The run starts a gateway in this process on a free port, makes a bench
//! user with one device and one session per simulated device, and a topic of its own. Each
//! device posts 1 kHz-style frames back to back, waiting for each answer, for the duration; then
//! the same number of producers send the same Avro frames to Kafka directly, each waiting for
//! its acknowledgement as the gateway does; and one producer keeps up to 10,000 frames in
//! flight, which is Kafka's throughput ceiling when nobody waits per frame. Frames differ only in their frame id (patched into a
//! pre-encoded body), so the load generator spends little CPU of its own. The bench user, its
//! device and sessions live in a Postgres database of the bench's own (created and migrated at
//! the start, dropped whole at the end, so nothing lands in the configured database), and the
//! topic is the bench's own too, deleted at the end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use biofeed_accounts::{devices, users, Accounts};
use biofeed_ingest_gateway::{Application, GatewaySettings};
use biofeed_schema::{DataTypeName, Framing, SensorFrame};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use uuid::Uuid;

use crate::harness::{now_us, percentile, OwnStores};

/// Frame encodings a bench scenario can post.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchFormat {
    /// `application/json`.
    Json,
    /// `application/avro` (single-object SensorFrame).
    Avro,
}

/// Settings of `biofeed bench gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchGatewaySettings {
    /// Simulated devices posting at once (each waits for its answer before the next frame). Each
    /// answer waits for Kafka, whose producer gathers frames for up to 5 ms: fewer devices
    /// measure that wait rather than throughput.
    #[arg(long, env = "BIOFEED_BENCH_DEVICES", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub devices: u32,

    /// How long each side of each scenario runs.
    #[arg(long, env = "BIOFEED_BENCH_DURATION", default_value = "10s", value_parser = biofeed_backends::parse_duration)]
    pub duration: Duration,

    /// Samples per frame (250 = a quarter second at 1 kHz).
    #[arg(long, env = "BIOFEED_BENCH_SAMPLES", default_value_t = 250, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub samples: u32,

    /// Channel counts to run, comma-separated: 1 posts single-lead ECG, 8 posts 8-channel EEG.
    #[arg(long, env = "BIOFEED_BENCH_CHANNELS", value_delimiter = ',', default_values_t = [1u16, 8])]
    pub channels: Vec<u16>,

    /// Encodings to run, comma-separated.
    #[arg(long, env = "BIOFEED_BENCH_FORMATS", value_delimiter = ',', value_enum, default_values_t = [BenchFormat::Avro, BenchFormat::Json])]
    pub formats: Vec<BenchFormat>,

    /// The gateway under test (its settings are also used to reach Postgres and Kafka).
    #[command(flatten)]
    pub gateway: GatewaySettings,
}

/// Figures of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// How the gateway framed the frames in Kafka (and the direct producer too).
    pub framing: &'static str,
    /// Encoding posted.
    pub format: BenchFormat,
    /// Values per sample.
    pub channels: u16,
    /// Samples per frame.
    pub samples_per_frame: u32,
    /// Points (sample instants) per second accepted by the gateway.
    pub gateway_points_per_s: f64,
    /// Points per second produced straight to Kafka with the same concurrency.
    pub direct_points_per_s: f64,
    /// gateway / direct.
    pub ratio: f64,
    /// Points per second produced straight to Kafka by one producer that keeps up to 10,000
    /// frames in flight instead of waiting for each: Kafka's throughput ceiling on this machine.
    pub pipelined_points_per_s: f64,
    /// gateway / pipelined.
    pub ratio_to_pipelined: f64,
    /// Median request latency, ms.
    pub latency_p50_ms: f64,
    /// 99th percentile request latency, ms.
    pub latency_p99_ms: f64,
    /// Request body bytes per point.
    pub request_bytes_per_point: f64,
    /// Kafka message bytes per point (Avro, before Kafka's compression).
    pub kafka_bytes_per_point: f64,
    /// Requests not answered 202.
    pub errors: u64,
}

/// Runs the benchmark, printing a line per scenario and, last, one JSON object.
pub async fn run(settings: BenchGatewaySettings) -> anyhow::Result<()> {
    let mut own = OwnStores::new(&settings.gateway.kafka, 12);
    let topic = format!("biofeed.bench.{}", own.id);
    // The bench's user, device and sessions go to a database of its own, dropped at the end.
    let postgres = own
        .postgres(
            &settings.gateway.postgres,
            &format!("biofeed_bench_{}", own.id),
        )
        .await?;
    let outcome = async {
        own.create_topics(&[&topic]).await?;
        let framing = own
            .framing(settings.gateway.framing, &settings.gateway.registry, &topic)
            .await?;
        run_on(&settings, postgres, &topic, framing).await
    }
    .await;
    own.clean_up().await;
    let reports = outcome?;

    let best = reports
        .iter()
        .max_by(|a, b| a.gateway_points_per_s.total_cmp(&b.gateway_points_per_s))
        .cloned();
    let summary = serde_json::json!({
        "bench": "gateway",
        "framing": best.as_ref().map(|b| b.framing),
        "devices": settings.devices,
        "duration_s": settings.duration.as_secs_f64(),
        "gateway_points_per_s": best.as_ref().map(|b| b.gateway_points_per_s),
        "direct_points_per_s": best.as_ref().map(|b| b.direct_points_per_s),
        "ratio": best.as_ref().map(|b| b.ratio),
        "pipelined_points_per_s": best.as_ref().map(|b| b.pipelined_points_per_s),
        "ratio_to_pipelined": best.as_ref().map(|b| b.ratio_to_pipelined),
        "latency_p50_ms": best.as_ref().map(|b| b.latency_p50_ms),
        "latency_p99_ms": best.as_ref().map(|b| b.latency_p99_ms),
        "bytes_per_point": best.as_ref().map(|b| b.kafka_bytes_per_point),
        "best": best,
        "scenarios": reports,
    });
    println!("{summary}");
    Ok(())
}

/// Starts a gateway on the bench's own database and topic, runs the scenarios as one bench user,
/// and stops the gateway.
async fn run_on(
    settings: &BenchGatewaySettings,
    postgres: biofeed_backends::postgres::PostgresSettings,
    topic: &str,
    framing: Framing,
) -> anyhow::Result<Vec<ScenarioReport>> {
    let mut gateway_settings = settings.gateway.clone();
    gateway_settings.postgres = postgres.clone();
    gateway_settings.topics.points = topic.to_owned();
    gateway_settings.listen = "127.0.0.1:0".parse()?;
    // Plain HTTP on loopback: this bench measures the gateway's own work per request; what TLS
    // costs on top shows in `bench e2e --gateway-ca-file`.
    gateway_settings.tls.cert_file = None;
    gateway_settings.tls.key_file = None;
    gateway_settings.max_in_flight = gateway_settings.max_in_flight.max(settings.devices * 2);
    let app = Application::build(gateway_settings.clone()).await?;
    let url = format!("http://{}", app.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));

    let accounts = Accounts {
        pool: postgres.connect().await?,
        keys: settings.gateway.keys.clone(),
    };
    let email = users::Email::parse(&format!("bench-{}@bench.invalid", Uuid::new_v4().simple()))?;
    let outcome = match users::create_user(&accounts, &email, "user").await {
        Ok(user) => run_scenarios(settings, &accounts, user, &url, topic, framing).await,
        Err(e) => Err(e.into()),
    };
    let _ = stop.send(());
    let _ = server.await;
    accounts.pool.close().await;
    outcome
}

/// What every scenario of a run posts with and to.
struct Target<'a> {
    settings: &'a BenchGatewaySettings,
    http: reqwest::Client,
    token: String,
    url: &'a str,
    topic: &'a str,
    producer: FutureProducer,
    /// The gateway's framing, which the direct producer uses too.
    framing: Framing,
}

async fn run_scenarios(
    settings: &BenchGatewaySettings,
    accounts: &Accounts,
    user: Uuid,
    url: &str,
    topic: &str,
    framing: Framing,
) -> anyhow::Result<Vec<ScenarioReport>> {
    let device = devices::create_device(&accounts.pool, user, "bench").await?;
    let target = Target {
        settings,
        http: reqwest_client(settings.devices as usize)?,
        token: device.token,
        url,
        topic,
        producer: direct_producer(&settings.gateway)?,
        framing,
    };
    let mut reports = Vec::new();
    for &channels in &settings.channels {
        let (exercise, data_type) = match channels {
            1 => ("hrv_biofeedback", "ecg"),
            8 => ("alpha_neurofeedback", "eeg"),
            other => anyhow::bail!("--channels {other}: the bench posts 1 (ecg) or 8 (eeg)"),
        };
        let sessions = target.open_sessions(exercise, data_type).await?;
        for &format in &settings.formats {
            let report = target
                .scenario(&sessions, format, channels, data_type)
                .await?;
            eprintln!(
                "{:>4} × {} ch × {} samples: gateway {:>9.0} points/s, direct {:>9.0} points/s (ratio {:.2}), pipelined {:>9.0} points/s (ratio {:.2}), p50 {:.1} ms, p99 {:.1} ms, {:.2} B/point to Kafka, {} errors",
                format!("{:?}", report.format).to_lowercase(),
                report.channels,
                report.samples_per_frame,
                report.gateway_points_per_s,
                report.direct_points_per_s,
                report.ratio,
                report.pipelined_points_per_s,
                report.ratio_to_pipelined,
                report.latency_p50_ms,
                report.latency_p99_ms,
                report.kafka_bytes_per_point,
                report.errors
            );
            reports.push(report);
        }
    }
    Ok(reports)
}

fn reqwest_client(connections: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .build()?)
}

fn direct_producer(settings: &GatewaySettings) -> anyhow::Result<FutureProducer> {
    Ok(biofeed_ingest_gateway::publisher::frame_producer_config(
        &settings.kafka,
        "biofeed-bench-direct",
    )?
    .create()?)
}

/// Frames per device with different values, cycled, so that Kafka's compression sees data as
/// varied as a real signal's rather than one frame repeated: 64 frames of even one channel
/// (≈2 KB each) span more than LZ4's 64 KiB match window, so no frame compresses against a copy
/// of itself.
const VARIANTS: u64 = 64;

/// Where a frame id sits in a single-object Avro frame (after the 10-byte header and the
/// string's length byte).
const AVRO_FRAME_ID_AT: usize = 11;

/// A frame of `samples` × `channels` values at 1 kHz, starting one second ago: a sine wave plus
/// noise from `seed`.
fn bench_frame(
    session: Uuid,
    data_type: &str,
    samples: u32,
    channels: u16,
    seed: u64,
) -> anyhow::Result<SensorFrame> {
    let n = samples as usize * usize::from(channels);
    Ok(SensorFrame {
        frame_id: Uuid::new_v4(),
        session_id: session,
        user_id: Uuid::nil(),
        device_id: Uuid::nil(),
        data_type: DataTypeName::parse(data_type).map_err(anyhow::Error::msg)?,
        channels,
        received_at_us: 0,
        t0_us: now_us() - 1_000_000,
        offsets_us: (0..i64::from(samples)).map(|i| i * 1_000).collect(),
        values: noisy_sine(n, seed),
    })
}

fn noisy_sine(n: usize, seed: u64) -> Vec<f32> {
    // xorshift64*: cheap, deterministic noise; values stay inside every data type's range.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let noise =
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            ((i as f32) * 0.37).sin() * 5.0 + noise - 0.5
        })
        .collect()
}

/// The body of a frame, and where its frame id's 36 characters sit in it.
fn template(frame: &SensorFrame, format: BenchFormat) -> anyhow::Result<(Vec<u8>, usize)> {
    let id = frame.frame_id.to_string();
    let body = match format {
        BenchFormat::Avro => biofeed_schema::encode(frame),
        BenchFormat::Json => {
            let c = usize::from(frame.channels);
            let rows: Vec<&[f32]> = frame.values.chunks(c).collect();
            let times: Vec<i64> = frame.offsets_us.iter().map(|o| frame.t0_us + o).collect();
            serde_json::to_vec(&serde_json::json!({
                "frame_id": id, "data_type": frame.data_type.as_str(), "timestamps_us": times, "values": rows
            }))?
        }
    };
    let at = body
        .windows(36)
        .position(|w| w == id.as_bytes())
        .ok_or_else(|| anyhow::anyhow!("frame id not found in the template"))?;
    Ok((body, at))
}

fn with_new_id(template: &[u8], at: usize) -> Vec<u8> {
    let mut body = template.to_vec();
    let mut buffer = Uuid::encode_buffer();
    let id = Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    body[at..at + 36].copy_from_slice(id.as_bytes());
    body
}

/// One variant of a device's frame: the request body, where its frame id sits, and the same
/// frame as the Kafka payload.
#[derive(Clone)]
struct Variant {
    body: Vec<u8>,
    id_at: usize,
    avro: Vec<u8>,
}

/// A device's session and the frames it cycles through.
type DeviceFrames = (Uuid, Vec<Variant>);

impl Target<'_> {
    /// Opens one session per simulated device through the gateway.
    async fn open_sessions(&self, exercise: &str, data_type: &str) -> anyhow::Result<Vec<Uuid>> {
        let mut sessions = Vec::new();
        for _ in 0..self.settings.devices {
            let response = self
                .http
                .post(format!("{}/v1/sessions", self.url))
                .bearer_auth(&self.token)
                .json(&serde_json::json!({ "exercise": exercise, "data_types": [data_type] }))
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == 201,
                "opening a bench session: {}",
                response.text().await?
            );
            let body: serde_json::Value = response.json().await?;
            sessions.push(
                body["session_id"]
                    .as_str()
                    .unwrap_or_default()
                    .parse::<Uuid>()?,
            );
        }
        Ok(sessions)
    }

    /// One scenario: the gateway, then Kafka directly with the same concurrency, then Kafka
    /// pipelined.
    async fn scenario(
        &self,
        sessions: &[Uuid],
        format: BenchFormat,
        channels: u16,
        data_type: &str,
    ) -> anyhow::Result<ScenarioReport> {
        let samples = f64::from(self.settings.samples);
        let frames = self.frames(sessions, format, channels, data_type)?;
        let first = &frames[0].1[0];
        let request_bytes = first.body.len() as f64 / samples;
        let kafka_bytes = first.avro.len() as f64 / samples;

        let (mut latencies_ms, errors, gateway_elapsed) =
            self.through_gateway(frames.clone(), format).await?;
        let gateway_points = latencies_ms.len() as f64 * samples;
        latencies_ms.sort_by(f64::total_cmp);
        // No accepted request, no latency: `null` in the JSON rather than a made-up 0.
        let latency = |q: f64| {
            if latencies_ms.is_empty() {
                f64::NAN
            } else {
                percentile(&latencies_ms, q)
            }
        };
        let pipelined_frames = frames[0].clone();
        let (direct_frames, direct_elapsed) = self.direct(frames).await?;
        let (pipelined, pipelined_elapsed) = self.pipelined(&pipelined_frames).await;

        let gateway_points_per_s = gateway_points / gateway_elapsed;
        let direct_points_per_s = direct_frames as f64 * samples / direct_elapsed;
        let pipelined_points_per_s = pipelined as f64 * samples / pipelined_elapsed;
        Ok(ScenarioReport {
            framing: crate::harness::framing_name(self.framing),
            format,
            channels,
            samples_per_frame: self.settings.samples,
            gateway_points_per_s,
            direct_points_per_s,
            ratio: gateway_points_per_s / direct_points_per_s,
            pipelined_points_per_s,
            ratio_to_pipelined: gateway_points_per_s / pipelined_points_per_s,
            latency_p50_ms: latency(0.50),
            latency_p99_ms: latency(0.99),
            request_bytes_per_point: request_bytes,
            kafka_bytes_per_point: kafka_bytes,
            errors,
        })
    }

    /// Per device: its session and [`VARIANTS`] frames of it.
    fn frames(
        &self,
        sessions: &[Uuid],
        format: BenchFormat,
        channels: u16,
        data_type: &str,
    ) -> anyhow::Result<Vec<DeviceFrames>> {
        let mut devices = Vec::new();
        for (index, session) in sessions.iter().enumerate() {
            let mut variants = Vec::new();
            for variant in 0..VARIANTS {
                let seed = index as u64 * VARIANTS + variant;
                let frame =
                    bench_frame(*session, data_type, self.settings.samples, channels, seed)?;
                let (body, id_at) = template(&frame, format)?;
                let avro = biofeed_schema::encode_framed(&frame, self.framing);
                variants.push(Variant { body, id_at, avro });
            }
            devices.push((*session, variants));
        }
        Ok(devices)
    }

    /// Every device posts through the gateway, waiting for each answer, for the duration;
    /// returns the latencies of the frames accepted (ms), the requests not answered 202, and
    /// the seconds taken.
    async fn through_gateway(
        &self,
        frames: Vec<DeviceFrames>,
        format: BenchFormat,
    ) -> anyhow::Result<(Vec<f64>, u64, f64)> {
        let content_type = match format {
            BenchFormat::Json => "application/json",
            BenchFormat::Avro => "application/avro",
        };
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (session, variants) in frames {
            let (http, stop, errors) = (self.http.clone(), Arc::clone(&stop), Arc::clone(&errors));
            let endpoint = format!("{}/v1/sessions/{session}/points", self.url);
            let token = self.token.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                for variant in variants.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let request = http
                        .post(&endpoint)
                        .bearer_auth(&token)
                        .header("content-type", content_type)
                        .body(with_new_id(&variant.body, variant.id_at));
                    let sent = Instant::now();
                    match request.send().await {
                        Ok(response) if response.status() == 202 => {
                            latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            }));
        }
        tokio::time::sleep(self.settings.duration).await;
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await?);
        }
        let elapsed = started.elapsed().as_secs_f64();
        Ok((latencies, errors.load(Ordering::Relaxed), elapsed))
    }

    /// Straight into Kafka, same concurrency, same wait for the acknowledgement; returns the
    /// frames acknowledged and the seconds taken.
    async fn direct(&self, frames: Vec<DeviceFrames>) -> anyhow::Result<(u64, f64)> {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (session, variants) in frames {
            let (producer, stop) = (self.producer.clone(), Arc::clone(&stop));
            let (topic, key) = (self.topic.to_owned(), session.to_string());
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u64;
                for variant in variants.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let payload = with_new_id(&variant.avro, AVRO_FRAME_ID_AT);
                    let record = FutureRecord::to(&topic).key(&key).payload(&payload);
                    if producer.send(record, Duration::from_secs(5)).await.is_ok() {
                        sent += 1;
                    }
                }
                sent
            }));
        }
        tokio::time::sleep(self.settings.duration).await;
        stop.store(true, Ordering::Relaxed);
        let mut sent = 0;
        for task in tasks {
            sent += task.await?;
        }
        Ok((sent, started.elapsed().as_secs_f64()))
    }

    /// One producer, many frames in flight: what Kafka takes when nobody waits per frame;
    /// returns the frames acknowledged and the seconds taken.
    async fn pipelined(&self, (session, variants): &DeviceFrames) -> (u64, f64) {
        let key = session.to_string();
        let started = Instant::now();
        let mut in_flight = std::collections::VecDeque::new();
        let mut acknowledged = 0u64;
        for variant in variants.iter().cycle() {
            if started.elapsed() >= self.settings.duration {
                break;
            }
            let payload = with_new_id(&variant.avro, AVRO_FRAME_ID_AT);
            let record = FutureRecord::to(self.topic).key(&key).payload(&payload);
            match self.producer.send_result(record) {
                Ok(delivery) => in_flight.push_back(delivery),
                Err(_) => {
                    // The local queue is full: wait for the oldest frame.
                    if let Some(oldest) = in_flight.pop_front() {
                        acknowledged += u64::from(matches!(oldest.await, Ok(Ok(_))));
                    }
                }
            }
            if in_flight.len() >= 10_000 {
                if let Some(oldest) = in_flight.pop_front() {
                    acknowledged += u64::from(matches!(oldest.await, Ok(Ok(_))));
                }
            }
        }
        for delivery in in_flight {
            acknowledged += u64::from(matches!(delivery.await, Ok(Ok(_))));
        }
        (acknowledged, started.elapsed().as_secs_f64())
    }
}
