//! `biofeed bench consume`: how fast one consumer drains a topic into ClickHouse, against
//! ClickHouse's own Kafka table engine with a materialized view ingesting the same points.
//!
//! The run makes a Postgres database, a ClickHouse database and three topics of its own. It preloads the frames (Avro)
//! into one topic and the same points as JSONEachRow (the closest format ClickHouse 18.16's
//! Kafka engine reads; one message per frame, a row per line) into the other. Then it times one
//! `biofeed consume` pipeline from start until every row is in `points`, and the Kafka engine
//! from the moment its materialized view exists until every row is in an equivalent table. It
//! prints both rates, their ratio and the bytes per point on disk, and drops what it made.

use std::time::{Duration, Instant};

use biofeed_backends::clickhouse::ClickHouse;
use biofeed_consumers::ConsumeSettings;
use biofeed_schema::{DataTypeName, SensorFrame};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use uuid::Uuid;

use crate::harness::{framing_name, OwnStores};
use biofeed_ingest_gateway::settings::FramingChoice;
use biofeed_schema::Framing;

/// Settings of `biofeed bench consume`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchConsumeSettings {
    /// Frames to preload.
    #[arg(long, env = "BIOFEED_BENCH_FRAMES", default_value_t = 16_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub frames: u32,
    /// Samples per frame.
    #[arg(long, env = "BIOFEED_BENCH_SAMPLES", default_value_t = 250, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub samples: u32,
    /// Channels per sample: 1 (ECG) or 8 (EEG).
    #[arg(long, env = "BIOFEED_BENCH_CHANNEL_COUNT", default_value_t = 1)]
    pub channels: u16,
    /// Sessions the frames are spread over.
    #[arg(long, env = "BIOFEED_BENCH_SESSIONS", default_value_t = 64)]
    pub sessions: u32,
    /// Skip the Kafka-engine peer.
    #[arg(long)]
    pub no_peer: bool,
    /// How the preloaded frames are framed: `confluent` (the schema registered under the bench
    /// topic's subject, its id in each frame), `single-object`, or `auto` (confluent when a
    /// schema registry is configured). The peer reads JSON either way.
    #[arg(
        long,
        env = "BIOFEED_BENCH_FRAMING",
        value_enum,
        default_value = "auto"
    )]
    pub framing: FramingChoice,
    /// Brokers the Kafka-engine peer reads from. ClickHouse 18.16's Kafka engine speaks neither
    /// TLS nor SASL, so against a secured Kafka it needs a plaintext listener (compose/local has
    /// one on loopback whose ACLs let it read the bench's topics only); default
    /// BIOFEED_KAFKA_BROKERS when that is plaintext. Without either the peer is skipped.
    #[arg(long = "peer-kafka-brokers", env = "BIOFEED_BENCH_PEER_KAFKA_BROKERS",
          value_parser = biofeed_backends::kafka::parse_brokers)]
    pub peer_kafka_brokers: Option<String>,
    /// Where the services are and how the consumer batches.
    #[command(flatten)]
    pub consume: ConsumeSettings,
}

/// The figures.
#[derive(Debug, Serialize)]
pub struct ConsumeBenchReport {
    /// Points loaded.
    pub points: u64,
    /// Points per second through one biofeed consumer.
    pub consumer_points_per_s: f64,
    /// Points per second through the Kafka table engine and a materialized view.
    pub kafka_engine_points_per_s: Option<f64>,
    /// consumer / Kafka engine.
    pub ratio: Option<f64>,
    /// Bytes on disk per point in `points` (compressed, after the insert).
    pub bytes_per_point: f64,
    /// Avro bytes per point in Kafka.
    pub kafka_bytes_per_point: f64,
    /// The frames' framing in Kafka: `single-object` or `confluent`.
    pub framing: &'static str,
    /// Seconds the consumer took.
    pub consumer_seconds: f64,
    /// Seconds the Kafka engine took.
    pub kafka_engine_seconds: Option<f64>,
    /// How the Kafka-engine peer reached Kafka (or why it did not run).
    pub peer_kafka: String,
}

impl BenchConsumeSettings {
    /// The brokers the peer reads from, if it runs.
    fn peer_brokers(&self) -> Option<String> {
        if self.no_peer {
            return None;
        }
        let kafka = &self.consume.stores.kafka;
        self.peer_kafka_brokers.clone().or_else(|| {
            (kafka.security_protocol == biofeed_backends::kafka::SecurityProtocol::Plaintext)
                .then(|| kafka.brokers.clone())
        })
    }
}

/// Runs the benchmark; the last line printed is one JSON object.
pub async fn run(settings: BenchConsumeSettings) -> anyhow::Result<()> {
    let mut own = OwnStores::new(&settings.consume.stores.kafka, 12);
    let id = own.id.clone();
    let mut consume = settings.consume.clone();
    consume.stores.clickhouse.database = format!("biofeed_bench_{id}");
    // Its analysts' database beside it (`<database>_analyst`), never a configured one.
    consume.stores.clickhouse.analyst_database = None;
    consume.stores.topics.points = format!("biofeed.bench.{id}.points");
    consume.stores.topics.dlq = format!("biofeed.bench.{id}.dlq");
    consume.options.group = format!("biofeed-bench-{id}");
    let json_topic = format!("biofeed.bench.{id}.json");
    // The consumer reads its checks (data types, erased people) from Postgres: a database of the
    // bench's own, so the bench neither needs nor touches the configured one.
    consume.stores.postgres = own
        .postgres(&consume.stores.postgres, &format!("biofeed_bench_{id}"))
        .await?;
    own.clickhouse(&consume.stores.clickhouse);
    let outcome = async {
        own.create_topics(&[
            consume.stores.topics.points.as_str(),
            consume.stores.topics.dlq.as_str(),
            json_topic.as_str(),
        ])
        .await?;
        let framing = own
            .framing(
                settings.framing,
                &consume.stores.registry,
                &consume.stores.topics.points,
            )
            .await?;
        let ch = consume.stores.clickhouse.connect().await?;
        biofeed_migrations::clickhouse::ClickHouseMigrations::embedded_for(&ch)?
            .migrate(&ch)
            .await?;
        measure(&settings, &consume, &json_topic, &ch, framing).await
    }
    .await;
    own.clean_up().await;
    let report = outcome?;
    eprintln!(
        "one consumer: {:.0} points/s ({:.2} s); kafka engine + materialized view: {}; ratio {}; {:.2} bytes/point on disk, {:.2} in Kafka",
        report.consumer_points_per_s,
        report.consumer_seconds,
        report.kafka_engine_points_per_s.map_or("skipped".to_owned(), |p| format!("{p:.0} points/s")),
        report.ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
        report.bytes_per_point,
        report.kafka_bytes_per_point,
    );
    println!(
        "{}",
        serde_json::json!({ "bench": "consume", "report": report,
        "consumer_points_per_s": report.consumer_points_per_s,
        "kafka_engine_points_per_s": report.kafka_engine_points_per_s,
        "ratio": report.ratio, "bytes_per_point": report.bytes_per_point })
    );
    Ok(())
}

fn bench_frames(settings: &BenchConsumeSettings) -> anyhow::Result<Vec<SensorFrame>> {
    let (data_type, channels) = match settings.channels {
        1 => ("ecg", 1u16),
        8 => ("eeg", 8),
        other => anyhow::bail!("--channels {other}: the bench loads 1 (ecg) or 8 (eeg)"),
    };
    let user = Uuid::new_v4();
    let sessions: Vec<Uuid> = (0..settings.sessions.max(1))
        .map(|_| Uuid::new_v4())
        .collect();
    let t0 = 1_764_000_000_000_000i64;
    let samples = settings.samples as usize;
    Ok((0..settings.frames as usize)
        .map(|i| {
            let t0_us = t0 + (i / sessions.len()) as i64 * samples as i64 * 1_000;
            let seed = sessions[i % sessions.len()].as_u64_pair().0;
            // One channel: a person's ECG in whole µV, as chest devices report it. Eight: the
            // same waves at EEG scale (×20: tens of µV) in a 24-bit EEG front end's steps (the
            // simulator's EEG costs too much per sample for millions of them).
            let values = (0..samples as i64)
                .flat_map(|s| {
                    (0..u64::from(channels)).map(move |c| {
                        let mv = biofeed_simulator::signals::ecg_mv(seed ^ c, t0_us + s * 1_000);
                        if channels == 1 {
                            mv
                        } else {
                            use biofeed_simulator::signals::{quantise, resolution};
                            quantise(f64::from(mv) * 20.0, resolution::EEG_UV)
                        }
                    })
                })
                .collect();
            SensorFrame {
                frame_id: Uuid::new_v4(),
                session_id: sessions[i % sessions.len()],
                user_id: user,
                device_id: Uuid::nil(),
                data_type: DataTypeName::parse(data_type)
                    .unwrap_or_else(|_| unreachable!("constant names are valid")),
                channels,
                received_at_us: t0,
                t0_us,
                offsets_us: (0..samples as i64).map(|s| s * 1_000).collect(),
                values,
            }
        })
        .collect())
}

async fn preload(
    producer: &FutureProducer,
    topic: &str,
    messages: impl Iterator<Item = (String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let mut in_flight = std::collections::VecDeque::new();
    for (key, payload) in messages {
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&payload)) {
                Ok(delivery) => {
                    in_flight.push_back(delivery);
                    break;
                }
                Err(_) => match in_flight.pop_front() {
                    Some(oldest) => {
                        oldest.await?.map_err(|(e, _)| e)?;
                    }
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                },
            }
        }
    }
    for delivery in in_flight {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

fn json_rows(frame: &SensorFrame) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..frame.samples() {
        let row = serde_json::json!({
            "user_id": frame.user_id, "session_id": frame.session_id, "data_type": frame.data_type.as_str(),
            "t_us": frame.time_us(i), "values": frame.sample(i), "ingested_at": "2026-11-24 00:00:00",
        });
        if serde_json::to_writer(&mut out, &row).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// Records the frames' person and sessions (open) in the bench's own Postgres database, as the
/// gateway would have before accepting them: the consumer writes only frames of sessions Postgres
/// holds as open or completed. (The bench writes these rows only to a database it made and
/// drops; the integration tests use it for theirs.)
pub async fn register_sessions(
    pool: &sqlx::PgPool,
    frames: &[SensorFrame],
) -> Result<(), sqlx::Error> {
    let mut pairs: Vec<(Uuid, Uuid)> = frames.iter().map(|f| (f.user_id, f.session_id)).collect();
    pairs.sort_unstable();
    pairs.dedup();
    for (user, session) in pairs {
        sqlx::query(
            "INSERT INTO users (id, role_id, email_blind_index, email_ct)
             SELECT $1, id, uuid_send($1), uuid_send($1) FROM roles WHERE name = 'user'
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(user)
        .execute(pool)
        .await?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, exercise_id, started_at, deadline_at)
             SELECT $1, $2, min(id), now() - interval '1 day', now() + interval '1 day' FROM exercises
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(session)
        .bind(user)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Loads the topics, then times one biofeed consumer and (unless skipped) the Kafka engine.
async fn measure(
    settings: &BenchConsumeSettings,
    consume: &ConsumeSettings,
    json_topic: &str,
    ch: &ClickHouse,
    framing: Framing,
) -> anyhow::Result<ConsumeBenchReport> {
    let (points, kafka_bytes) = load(settings, consume, json_topic, framing).await?;
    let consumer_seconds = time_consumer(consume, ch, points).await?;
    let bytes: u64 = ch.bytes_on_disk("points").await?;
    let peer_brokers = settings.peer_brokers();
    let (kafka_engine_seconds, kafka_engine_points_per_s) = match &peer_brokers {
        None => (None, None),
        Some(brokers) => {
            let (seconds, loaded) = time_kafka_engine(brokers, json_topic, ch, points).await?;
            (Some(seconds), Some(loaded as f64 / seconds))
        }
    };
    let peer_kafka = match (&peer_brokers, settings.no_peer) {
        (Some(brokers), _) if consume.stores.kafka.security_protocol
            != biofeed_backends::kafka::SecurityProtocol::Plaintext =>
        {
            format!("plaintext loopback listener {brokers} (ClickHouse 18.16's Kafka engine has no TLS or SASL); the consumer used {}", consume.stores.kafka.security_summary())
        }
        (Some(brokers), _) => format!("plaintext {brokers}, as the consumer"),
        (None, true) => "not run (--no-peer)".to_owned(),
        (None, false) => "not run: Kafka is secured and no BIOFEED_BENCH_PEER_KAFKA_BROKERS names a plaintext listener".to_owned(),
    };
    let consumer_points_per_s = points as f64 / consumer_seconds;
    Ok(ConsumeBenchReport {
        points,
        consumer_points_per_s,
        kafka_engine_points_per_s,
        ratio: kafka_engine_points_per_s.map(|p| consumer_points_per_s / p),
        peer_kafka,
        bytes_per_point: bytes as f64 / points as f64,
        kafka_bytes_per_point: kafka_bytes,
        framing: framing_name(framing),
        consumer_seconds,
        kafka_engine_seconds,
    })
}

/// Registers the frames' sessions and preloads the frames as Avro (and, for the peer, as
/// JSONEachRow); returns the points loaded and the Avro bytes per point.
async fn load(
    settings: &BenchConsumeSettings,
    consume: &ConsumeSettings,
    json_topic: &str,
    framing: Framing,
) -> anyhow::Result<(u64, f64)> {
    let frames = bench_frames(settings)?;
    let pool = consume.stores.postgres.connect().await?;
    register_sessions(&pool, &frames).await?;
    pool.close().await;
    let points: u64 = frames.iter().map(|f| f.samples() as u64).sum();
    let producer: FutureProducer = consume
        .stores
        .kafka
        .client_config()?
        .set("linger.ms", "20")
        .set("batch.size", "4194304")
        .set("compression.type", "lz4")
        .set("message.max.bytes", "16000000")
        .create()?;
    let encoded: Vec<(String, Vec<u8>)> = frames
        .iter()
        .map(|f| {
            (
                f.session_id.to_string(),
                biofeed_schema::encode_framed(f, framing),
            )
        })
        .collect();
    let kafka_bytes = encoded.iter().map(|(_, v)| v.len() as f64).sum::<f64>() / points as f64;
    eprintln!("preloading {} frames ({points} points)", frames.len());
    preload(
        &producer,
        &consume.stores.topics.points,
        encoded.into_iter(),
    )
    .await?;
    if settings.peer_brokers().is_some() {
        preload(
            &producer,
            json_topic,
            frames
                .iter()
                .map(|f| (f.session_id.to_string(), json_rows(f))),
        )
        .await?;
    }
    Ok((points, kafka_bytes))
}

/// One biofeed consumer, from its start until all `points` are in `points`; returns the seconds.
async fn time_consumer(
    consume: &ConsumeSettings,
    ch: &ClickHouse,
    points: u64,
) -> anyhow::Result<f64> {
    let mut registry = prometheus_client::registry::Registry::default();
    let started = Instant::now();
    let prepared = biofeed_consumers::prepare(consume.clone(), &mut registry).await?;
    let written = prepared.metrics().rows_written.clone();
    let stop = biofeed_backends::shutdown::Shutdown::new();
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while written.get() < points {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.fire();
        })
    };
    prepared.run(stop).await?;
    watcher.await?;
    let seconds = started.elapsed().as_secs_f64();
    let stored: u64 = ch
        .client()
        .query("SELECT count() FROM points")
        .fetch_one()
        .await?;
    anyhow::ensure!(
        stored >= points,
        "only {stored} of {points} rows reached ClickHouse"
    );
    Ok(seconds)
}

/// The peer: ClickHouse reads the JSON topic itself, through a Kafka table and a materialized
/// view into a table like `points`; returns the seconds to its last progress and the rows it
/// loaded by then.
async fn time_kafka_engine(
    brokers: &str,
    json_topic: &str,
    ch: &ClickHouse,
    points: u64,
) -> anyhow::Result<(f64, u64)> {
    let client = ch.client();
    client
        .query("CREATE TABLE points_peer AS points ENGINE = MergeTree PARTITION BY toYYYYMM(toDateTime(intDiv(t_us, 1000000))) ORDER BY (user_id, session_id, data_type, t_us)")
        .execute()
        .await?;
    client
        .query(&format!(
            "CREATE TABLE points_queue (user_id UUID, session_id UUID, data_type String, t_us Int64, values Array(Float32), ingested_at DateTime) \
             ENGINE = Kafka('{}', '{json_topic}', 'biofeed-bench-peer-{}', 'JSONEachRow')",
            brokers,
            Uuid::new_v4().simple()
        ))
        .execute()
        .await?;
    let started = Instant::now();
    client
        .query(
            "CREATE MATERIALIZED VIEW points_peer_mv TO points_peer AS SELECT * FROM points_queue",
        )
        .execute()
        .await?;
    // ClickHouse 18.16's Kafka engine may hold its last partial block until more messages
    // come; so the peer is done when every row arrived, or when 99% did and nothing more
    // arrives for 5 s. Its rate counts the rows it loaded up to its last progress.
    let deadline = Duration::from_secs(600);
    let (mut loaded, mut last_progress) = (0u64, started.elapsed());
    loop {
        let n: u64 = client
            .query("SELECT count() FROM points_peer")
            .fetch_one()
            .await?;
        if n > loaded {
            (loaded, last_progress) = (n, started.elapsed());
        }
        let stalled = started.elapsed() - last_progress > Duration::from_secs(5);
        if loaded >= points || (stalled && loaded * 100 >= points * 99) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < deadline,
            "the Kafka engine loaded only {loaded} of {points} points in {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if loaded < points {
        eprintln!(
            "the Kafka engine held back its last {} rows; its rate counts the {loaded} it loaded",
            points - loaded
        );
    }
    client.query("DROP TABLE points_peer_mv").execute().await?;
    client.query("DROP TABLE points_queue").execute().await?;
    Ok((last_progress.as_secs_f64(), loaded))
}
