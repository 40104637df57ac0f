//! `biofeed consume` and `biofeed replay`, run as the real binary against real Kafka and
//! ClickHouse (private instances where a test stops one).

use std::time::Duration;

use biofeed_schema::{DataTypeName, SensorFrame};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

use crate::helpers::{eventually, wait_until, BiofeedProcess, Isolated};

/// A consumer process of the real binary (batches written after at most 200 ms).
pub(crate) struct ConsumerProcess;

impl ConsumerProcess {
    pub(crate) fn start(env: &[(&'static str, String)]) -> BiofeedProcess {
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "BIOFEED_BATCH_MAX_AGE") {
            env.push(("BIOFEED_BATCH_MAX_AGE", "200ms".to_owned()));
        }
        BiofeedProcess::start(&["consume"], &env)
    }
}

/// The environment for this test's consumer: its stores plus its own consumer group.
pub(crate) fn consumer_env(
    stores: &Isolated,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    // The consumer's own identity: it may insert, never change tables or delete.
    let mut env = stores.env_as(crate::helpers::Role::Consume);
    env.push((
        "BIOFEED_CONSUMER_GROUP",
        format!("biofeed-test-group-{}", stores.id),
    ));
    env.push(("BIOFEED_CONSUMER_REFRESH", "1s".to_owned()));
    env.push(("BIOFEED_CONSUMER_METRICS_LISTEN", "127.0.0.1:0".to_owned()));
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k, v.clone()));
    }
    env
}

/// `count` frames of `samples` RR intervals each, in `sessions` sessions, values distinct.
pub(crate) fn frames(
    user: Uuid,
    sessions: usize,
    count: usize,
    samples: usize,
) -> Vec<SensorFrame> {
    let session_ids: Vec<Uuid> = (0..sessions).map(|_| Uuid::new_v4()).collect();
    let t0 = 1_764_000_000_000_000i64;
    (0..count)
        .map(|i| SensorFrame {
            frame_id: Uuid::new_v4(),
            session_id: session_ids[i % sessions],
            user_id: user,
            device_id: Uuid::nil(),
            data_type: DataTypeName::parse("rr_interval").unwrap(),
            channels: 1,
            received_at_us: t0,
            t0_us: t0 + (i / sessions) as i64 * 1_000_000_000,
            offsets_us: (0..samples as i64).map(|s| s * 1_000).collect(),
            values: (0..samples)
                .map(|s| 300.0 + ((i * samples + s) % 2000) as f32)
                .collect(),
        })
        .collect()
}

pub(crate) async fn produce(
    kafka: &biofeed_backends::kafka::KafkaSettings,
    topic: &str,
    payloads: impl IntoIterator<Item = (String, Vec<u8>)>,
) {
    let producer: FutureProducer = kafka
        .client_config()
        .unwrap()
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut deliveries = Vec::new();
    for (key, payload) in payloads {
        let delivery = producer
            .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
            .map_err(|(e, _)| e)
            .unwrap();
        deliveries.push(delivery);
    }
    for delivery in deliveries {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Makes the frames' users and sessions known to Postgres (users without PII, sessions open),
/// as the gateway would have before accepting them: a consumer writes only frames of sessions
/// Postgres holds as open or completed. Known ones are left as they are.
pub(crate) async fn register_sessions(stores: &Isolated, frames: &[SensorFrame]) {
    let pg = stores.settings.stores.postgres.connect().await.unwrap();
    biofeed_bench::consume::register_sessions(&pg, frames)
        .await
        .unwrap();
}

/// Produces the frames to the test's points topic, their sessions registered first.
pub(crate) async fn produce_frames(stores: &Isolated, frames: &[SensorFrame]) {
    register_sessions(stores, frames).await;
    produce_unregistered(stores, frames).await;
}

/// Produces the frames as they are, whatever Postgres knows of their sessions.
pub(crate) async fn produce_unregistered(stores: &Isolated, frames: &[SensorFrame]) {
    produce(
        &stores.settings.stores.kafka,
        &stores.settings.stores.topics.points,
        frames
            .iter()
            .map(|f| (f.session_id.to_string(), biofeed_schema::encode(f))),
    )
    .await;
}

pub(crate) async fn clickhouse_count(stores: &Isolated, sql: &str) -> u64 {
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    ch.client().query(sql).fetch_one::<u64>().await.unwrap()
}

/// Waits until `SELECT count() FROM points FINAL` reaches `expected` (a watchdog, not a timing).
pub(crate) async fn wait_for_points(stores: &Isolated, expected: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let now = clickhouse_count(stores, "SELECT count() FROM points FINAL").await;
        if now == expected {
            return;
        }
        assert!(now < expected, "more points than sent: {now} > {expected}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {now} of {expected} points arrived"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Produces `frames`, starts a consumer with `env` and waits until it stored them all.
async fn consume(
    stores: &Isolated,
    frames: &[SensorFrame],
    env: &[(&'static str, String)],
) -> BiofeedProcess {
    produce_frames(stores, frames).await;
    let consumer = ConsumerProcess::start(env);
    wait_for_points(stores, points_of(frames)).await;
    consumer
}

/// How many frames [`first_half_stored`] stores before the test disturbs a service.
const HALF: usize = 100;

/// 200 frames in 4 sessions; a consumer started that has stored the first [`HALF`] of them.
async fn first_half_stored(stores: &Isolated) -> (Vec<SensorFrame>, BiofeedProcess) {
    let sent = frames(Uuid::new_v4(), 4, 2 * HALF, 250);
    let consumer = consume(stores, &sent[..HALF], &consumer_env(stores, &[])).await;
    (sent, consumer)
}

/// Stops `consumer` (exit 0), which says it wrote `rows` rows at the stop.
async fn stop_after_writing(consumer: BiofeedProcess, rows: u64) {
    let stderr = consumer.stop_ok().await;
    assert!(
        stderr.contains(&format!("stopped: {rows} rows written")),
        "{stderr}"
    );
}

/// How many points ClickHouse holds whose `column` is `id`.
async fn points_with(stores: &Isolated, column: &str, id: Uuid) -> u64 {
    let sql = format!("SELECT count() FROM points WHERE {column} = toUUID('{id}')");
    clickhouse_count(stores, &sql).await
}

/// The status of `session` in Postgres.
async fn session_status(pg: &sqlx::PgPool, session: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM sessions WHERE id = $1")
        .bind(session)
        .fetch_one(pg)
        .await
        .unwrap()
}

pub(crate) fn points_of(frames: &[SensorFrame]) -> u64 {
    frames.iter().map(|f| f.samples() as u64).sum()
}

pub(crate) async fn migrated() -> Isolated {
    Isolated::migrated().await
}

#[derive(clickhouse::Row, serde::Deserialize, Debug, PartialEq)]
struct StoredRow {
    #[serde(with = "clickhouse::serde::uuid")]
    user_id: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    session_id: Uuid,
    data_type: String,
    t_us: i64,
    values: Vec<f32>,
}

#[tokio::test]
async fn every_point_sent_is_stored_once_and_exactly_as_sent() {
    let stores = migrated().await;
    let user = Uuid::new_v4();
    let sent = frames(user, 3, 30, 100);
    produce_frames(&stores, &sent).await;
    let metrics = format!("127.0.0.1:{}", crate::helpers::free_port());
    let consumer = ConsumerProcess::start(&consumer_env(
        &stores,
        &[("BIOFEED_CONSUMER_METRICS_LISTEN", metrics.clone())],
    ));
    wait_for_points(&stores, points_of(&sent)).await;
    // The consumer's own count, at its Prometheus endpoint.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let expected = format!("biofeed_consumer_rows_written_total {}", points_of(&sent));
    loop {
        let text = reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // Lag is sampled every 5 s; the row count as soon as the insert returns.
        if text.contains(&expected) && text.contains("biofeed_consumer_lag{") {
            assert!(
                text.contains("biofeed_consumer_dead_lettered_total 0"),
                "{text}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{expected} never shown: {text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    consumer.stop_ok().await;

    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    let mut stored: Vec<StoredRow> = ch
        .client()
        .query("SELECT user_id, session_id, data_type, t_us, values FROM points FINAL")
        .fetch_all()
        .await
        .unwrap();
    let mut expected: Vec<StoredRow> = sent
        .iter()
        .flat_map(|f| {
            (0..f.samples()).map(move |i| StoredRow {
                user_id: f.user_id,
                session_id: f.session_id,
                data_type: f.data_type.to_string(),
                t_us: f.time_us(i).unwrap(),
                values: f.sample(i).unwrap().to_vec(),
            })
        })
        .collect();
    let key = |r: &StoredRow| (r.session_id, r.t_us);
    stored.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(stored, expected);
}

#[tokio::test]
async fn a_consumer_killed_mid_batch_and_restarted_still_stores_exactly_n() {
    let stores = migrated().await;
    let sent = frames(Uuid::new_v4(), 6, 400, 250);
    produce_frames(&stores, &sent).await;
    // Small batches so that the kill lands between an insert and its commit, or mid-insert.
    let env = consumer_env(&stores, &[("BIOFEED_BATCH_MAX_ROWS", "5000".to_owned())]);
    let mut consumer = ConsumerProcess::start(&env);
    // A watchdog, not a timing: under CI's load a first join and write can take long.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while clickhouse_count(&stores, "SELECT count() FROM points").await == 0 {
        if !consumer.is_running() || tokio::time::Instant::now() >= deadline {
            let (code, stderr) = consumer.stop().await;
            panic!("the consumer never wrote (exit {code}):\n{stderr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.kill9().await;
    let partial = clickhouse_count(&stores, "SELECT count() FROM points FINAL").await;
    assert!(
        partial < points_of(&sent),
        "killed before the end ({partial})"
    );

    let consumer = ConsumerProcess::start(&env);
    wait_for_points(&stores, points_of(&sent)).await;
    consumer.stop_ok().await;
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points FINAL").await,
        points_of(&sent)
    );
}

#[tokio::test]
async fn clickhouse_away_for_twenty_seconds_loses_nothing_and_dead_letters_nothing() {
    let mut clickhouse = crate::private_clickhouse::PrivateClickHouse::start().await;
    let url = clickhouse.url().parse().unwrap();
    let stores = Isolated::migrated_with(|s| s.stores.clickhouse.url = url).await;
    let (sent, consumer) = first_half_stored(&stores).await;

    clickhouse.kill();
    produce_frames(&stores, &sent[HALF..]).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    clickhouse.restart().await;

    wait_for_points(&stores, points_of(&sent)).await;
    let stderr = consumer.stop_ok().await;
    assert!(stderr.contains("0 frames dead-lettered"), "{stderr}");
    // An empty read proves nothing if the reader cannot see the topic: put a marker of the
    // test's own in it, and the marker must be all the reader finds.
    let marker = format!("marker-{}", stores.id);
    produce(
        &stores.settings.stores.kafka,
        &stores.settings.stores.topics.dlq,
        [(marker.clone(), b"marker".to_vec())],
    )
    .await;
    let dlq = crate::gateway_app::read_topic(
        &stores.settings.stores.kafka,
        &stores.settings.stores.topics.dlq,
    )
    .await;
    let keys: Vec<&str> = dlq.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(
        keys,
        [marker.as_str()],
        "the dead-letter topic held only the marker"
    );
}

#[tokio::test]
async fn a_kafka_restart_mid_stream_loses_nothing() {
    let mut kafka = crate::private_kafka::PrivateKafka::start().await;
    let brokers = kafka.brokers();
    let stores = Isolated::migrated_with(|s| s.stores.kafka.brokers = brokers).await;
    let (sent, consumer) = first_half_stored(&stores).await;

    kafka.restart().await;
    produce_frames(&stores, &sent[HALF..]).await;
    wait_for_points(&stores, points_of(&sent)).await;
    consumer.stop_ok().await;
}

#[tokio::test]
async fn poison_goes_to_the_dlq_with_its_reason_and_replay_dlq_brings_it_in_once_after_the_fix() {
    let stores = migrated().await;
    let user = Uuid::new_v4();
    let good = frames(user, 2, 20, 50);
    // A frame of a data type nobody registered yet, and bytes that are no frame at all.
    let mut unknown = frames(user, 1, 1, 10).remove(0);
    unknown.data_type = DataTypeName::parse("emg").unwrap();
    let mut payloads: Vec<(String, Vec<u8>)> = good
        .iter()
        .map(|f| (f.session_id.to_string(), biofeed_schema::encode(f)))
        .collect();
    payloads.insert(
        7,
        (
            unknown.session_id.to_string(),
            biofeed_schema::encode(&unknown),
        ),
    );
    payloads.insert(12, ("garbage".to_owned(), b"not a frame".to_vec()));
    register_sessions(&stores, &good).await;
    register_sessions(&stores, std::slice::from_ref(&unknown)).await;
    produce(
        &stores.settings.stores.kafka,
        &stores.settings.stores.topics.points,
        payloads,
    )
    .await;

    let consumer = ConsumerProcess::start(&consumer_env(&stores, &[]));
    wait_for_points(&stores, points_of(&good)).await;
    // The good frames stored says nothing of the poison in other partitions: stop once the
    // consumer has been through the whole topic.
    wait_until_committed(&stores, &format!("biofeed-test-group-{}", stores.id)).await;
    let stderr = consumer.stop_ok().await;
    assert!(stderr.contains("2 frames dead-lettered"), "{stderr}");

    // Both poison messages are in the DLQ, with their reasons and origin.
    let dlq = dead_letters(&stores).await;
    assert_eq!(dlq.len(), 2);
    let reasons: Vec<&str> = dlq.iter().map(|d| d.0.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("unknown data type emg")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("undecodable")),
        "{reasons:?}"
    );
    assert!(dlq
        .iter()
        .all(|d| d.1 == stores.settings.stores.topics.points && d.2.is_some()));

    // The fix: register the data type. Then re-drive the dead letters, twice.
    let pg = stores.settings.stores.postgres.connect().await.unwrap();
    sqlx::query("INSERT INTO data_types (id, name, description, unit, channels, min_value, max_value) VALUES (100, 'emg', 'electromyogram', 'µV', 1, 0, 5000)")
        .execute(&pg)
        .await
        .unwrap();
    for _ in 0..2 {
        let run = stores.biofeed(&["replay", "--dlq"]).await;
        assert_eq!(run.code, 0, "{run:?}");
        let summary: serde_json::Value =
            serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
        assert_eq!(
            (
                summary["messages"].as_u64(),
                summary["frames"].as_u64(),
                summary["skipped"].as_u64()
            ),
            (Some(2), Some(1), Some(1)),
            "{run:?}"
        );
    }
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points FINAL").await,
        points_of(&good) + 10
    );
    assert_eq!(
        clickhouse_count(
            &stores,
            "SELECT count() FROM points FINAL WHERE data_type = 'emg'"
        )
        .await,
        10
    );
}

/// (reason, source topic, source offset) of each dead letter.
pub(crate) async fn dead_letters(stores: &Isolated) -> Vec<(String, String, Option<i64>)> {
    crate::gateway_app::read_messages(
        &stores.settings.stores.kafka,
        &stores.settings.stores.topics.dlq,
    )
    .await
    .into_iter()
    .map(|m| {
        let header = |name: &str| {
            m.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        (
            header("biofeed.error").unwrap_or_default(),
            header("biofeed.source.topic").unwrap_or_default(),
            header("biofeed.source.offset").and_then(|o| o.parse().ok()),
        )
    })
    .collect()
}

#[tokio::test]
async fn replaying_the_whole_topic_changes_no_count_and_no_value() {
    let stores = migrated().await;
    let sent = frames(Uuid::new_v4(), 3, 60, 200);
    let consumer = consume(&stores, &sent, &consumer_env(&stores, &[])).await;

    let fingerprint = "SELECT count(), sum(arraySum(values)), min(t_us), max(t_us), uniqExact(session_id) FROM points FINAL";
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    let before: (u64, f64, i64, i64, u64) =
        ch.client().query(fingerprint).fetch_one().await.unwrap();
    // Replay while the consumer still runs.
    let run = stores
        .biofeed(&["replay", "--from", "2020-01-01T00:00:00Z"])
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("replayed {} messages", sent.len())),
        "{run:?}"
    );
    consumer.stop_ok().await;
    let after: (u64, f64, i64, i64, u64) =
        ch.client().query(fingerprint).fetch_one().await.unwrap();
    assert_eq!(before, after);
    assert_eq!(after.0, points_of(&sent));

    // Bad replay arguments are refused before anything is read.
    for (args, named) in [
        (vec!["replay", "--from", "yesterday"], "--from"),
        (vec!["replay", "--partition", "x"], "--partition"),
    ] {
        let run = stores.biofeed(&args).await;
        assert_eq!(run.code, 2, "{run:?}");
        assert!(run.stderr.contains(named), "{run:?}");
    }
    let run = stores.biofeed(&["replay", "--partition", "99"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no partition 99"), "{run:?}");
}

#[tokio::test]
async fn frames_of_erased_users_are_dropped_on_consume_and_on_replay() {
    let stores = migrated().await;
    let (kept, erased) = (Uuid::new_v4(), Uuid::new_v4());
    let pg = stores.settings.stores.postgres.connect().await.unwrap();
    sqlx::query("INSERT INTO erased_users (user_id) VALUES ($1)")
        .bind(erased)
        .execute(&pg)
        .await
        .unwrap();
    let keep = frames(kept, 2, 10, 50);
    let drop = frames(erased, 2, 10, 50);
    produce_frames(&stores, &keep).await;
    produce_frames(&stores, &drop).await;
    let consumer = ConsumerProcess::start(&consumer_env(&stores, &[]));
    wait_for_points(&stores, points_of(&keep)).await;
    // (The dropped frames may sit in other partitions than the kept ones: the whole topic read.)
    wait_until_committed(&stores, &format!("biofeed-test-group-{}", stores.id)).await;
    let stderr = consumer.stop_ok().await;
    assert!(
        stderr.contains("10 frames of erased users and 0 of closed sessions dropped"),
        "{stderr}"
    );
    let run = stores.biofeed(&["replay"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let summary: serde_json::Value =
        serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["dropped_erased"], 10);
    let erased_rows = clickhouse_count(
        &stores,
        &format!("SELECT count() FROM points WHERE user_id = toUUID('{erased}')"),
    )
    .await;
    assert_eq!(erased_rows, 0);
}

/// The consumer writes each batch in the table's sort order so that ClickHouse stores it without
/// sorting; that only works if its UUID order is the server's, which differs between versions.
#[tokio::test]
async fn the_consumers_uuid_order_is_the_servers() {
    use biofeed_consumers::sink::UuidOrder;

    let stores = migrated().await;
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    let client = ch.client();
    let order = UuidOrder::of(&client).await.unwrap();
    // Random ids, plus ids that differ only in their first or only in their last eight bytes.
    let mut ids: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
    ids.push(Uuid::from_u64_pair(1, 0));
    ids.push(Uuid::from_u64_pair(0, 1));
    ids.push(Uuid::from_u64_pair(0, 2));
    ids.push(Uuid::from_u64_pair(2, 0));
    let list = ids
        .iter()
        .map(|id| format!("toUUID('{id}')"))
        .collect::<Vec<_>>()
        .join(",");
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Id {
        #[serde(with = "clickhouse::serde::uuid")]
        id: Uuid,
    }
    let by_server: Vec<Uuid> = client
        .query(&format!(
            "SELECT id FROM (SELECT arrayJoin([{list}]) AS id) ORDER BY id"
        ))
        .fetch_all::<Id>()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let mut ours = ids.clone();
    ours.sort_by_key(|id| order.key(id));
    assert_eq!(
        ours, by_server,
        "the server orders UUIDs as {order:?} does not"
    );
}

/// The consumer's Prometheus text at `addr`, or empty while it is not serving yet.
pub(crate) async fn metrics_text(addr: &str) -> String {
    match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The group's committed offset and the end of every partition of the points topic.
pub(crate) async fn committed_and_ends(stores: &Isolated, group: &str) -> Vec<(i32, i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let kafka = stores.settings.stores.kafka.clone();
    let topic = stores.settings.stores.topics.points.clone();
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = kafka
            .client_config()
            .unwrap()
            .set("group.id", &group)
            .create()
            .unwrap();
        let timeout = Duration::from_secs(10);
        let metadata = client.fetch_metadata(Some(&topic), timeout).unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            list.add_partition(&topic, p.id());
        }
        let committed = client.committed_offsets(list, timeout).unwrap();
        committed
            .elements()
            .iter()
            .map(|e| {
                let (_, end) = client
                    .fetch_watermarks(&topic, e.partition(), timeout)
                    .unwrap();
                let at = match e.offset() {
                    rdkafka::Offset::Offset(o) => o,
                    _ => 0,
                };
                (e.partition(), at, end)
            })
            .collect()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn sigterm_mid_batch_writes_and_commits_the_batch_in_hand() {
    let stores = migrated().await;
    let sent = frames(Uuid::new_v4(), 3, 60, 100);
    produce_frames(&stores, &sent).await;
    let metrics = format!("127.0.0.1:{}", crate::helpers::free_port());
    // A batch that is never due by itself: only the shutdown writes it.
    let env = consumer_env(
        &stores,
        &[
            ("BIOFEED_CONSUMER_METRICS_LISTEN", metrics.clone()),
            ("BIOFEED_BATCH_MAX_AGE", "1h".to_owned()),
            ("BIOFEED_BATCH_MAX_ROWS", "100000000".to_owned()),
        ],
    );
    let consumer = ConsumerProcess::start(&env);
    let held = format!("biofeed_consumer_batch_pending_rows {}", points_of(&sent));
    let every = Duration::from_millis(100);
    let what = "the consumer held the whole batch";
    wait_until(Duration::from_secs(60), every, what, async || {
        metrics_text(&metrics).await.contains(&held)
    })
    .await;
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points").await,
        0,
        "nothing written before the signal"
    );
    stop_after_writing(consumer, points_of(&sent)).await;
    // Exactly the batch, once, and its offsets committed: the next member re-reads nothing.
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points").await,
        points_of(&sent)
    );
    let group = format!("biofeed-test-group-{}", stores.id);
    for (partition, committed, end) in committed_and_ends(&stores, &group).await {
        assert_eq!(committed, end, "partition {partition} committed");
    }
    // One more frame: a member started now writes it and nothing of the batch before.
    let more = frames(sent[0].user_id, 1, 1, 10);
    produce_frames(&stores, &more).await;
    let again = ConsumerProcess::start(&env);
    let held = format!("biofeed_consumer_batch_pending_rows {}", points_of(&more));
    wait_until(
        Duration::from_secs(60),
        every,
        "the new frame read",
        async || metrics_text(&metrics).await.contains(&held),
    )
    .await;
    stop_after_writing(again, points_of(&more)).await;
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points").await,
        points_of(&sent) + points_of(&more)
    );
}

#[tokio::test]
async fn a_consumer_restarted_after_sigkill_takes_its_partitions_back_at_once() {
    let stores = migrated().await;
    let sent = frames(Uuid::new_v4(), 6, 120, 50);
    let (first, second) = sent.split_at(60);
    produce_frames(&stores, first).await;
    let env = consumer_env(&stores, &[]);
    let consumer = ConsumerProcess::start(&env);
    wait_for_points(&stores, points_of(first)).await;
    consumer.kill9().await;
    produce_frames(&stores, second).await;

    // The group still counts the killed member until its session times out (45 s by default);
    // the restarted one, under the same static id, must not wait for that.
    let restarted = tokio::time::Instant::now();
    let consumer = ConsumerProcess::start(&env);
    wait_for_points(&stores, points_of(&sent)).await;
    let gap = restarted.elapsed();
    eprintln!("restart to all points stored: {gap:?}");
    assert!(
        gap < Duration::from_secs(20),
        "the restarted consumer waited {gap:?} for its partitions"
    );
    consumer.stop_ok().await;
}

#[tokio::test]
async fn frames_of_sessions_no_longer_open_or_completed_are_dropped_on_consume_and_replay() {
    let stores = migrated().await;
    let sent = frames(Uuid::new_v4(), 5, 25, 40);
    let user = sent[0].user_id;
    register_sessions(&stores, &sent).await;
    let mut sessions: Vec<Uuid> = sent.iter().map(|f| f.session_id).collect();
    sessions.dedup();
    sessions.sort_unstable();
    sessions.dedup();
    let pg = stores.settings.stores.postgres.connect().await.unwrap();
    let [open, completed, aborted, expired, purged] = sessions[..] else {
        panic!("five sessions")
    };
    for (session, status) in [
        (completed, "completed"),
        (aborted, "aborted"),
        (expired, "expired"),
    ] {
        sqlx::query("UPDATE sessions SET status = $2, ended_at = now() WHERE id = $1")
            .bind(session)
            .bind(status)
            .execute(&pg)
            .await
            .unwrap();
    }
    sqlx::query(
        "UPDATE sessions SET status = 'purged', ended_at = now(), purged_at = now(), purge_reason = 'aborted' WHERE id = $1",
    )
    .bind(purged)
    .execute(&pg)
    .await
    .unwrap();
    // And a session Postgres never heard of (or that an erasure deleted).
    let unknown = frames(user, 1, 3, 40);
    produce_unregistered(&stores, &sent).await;
    produce_unregistered(&stores, &unknown).await;

    let kept: Vec<SensorFrame> = sent
        .iter()
        .filter(|f| f.session_id == open || f.session_id == completed)
        .cloned()
        .collect();
    let dropped = sent.len() - kept.len() + unknown.len();
    let consumer = ConsumerProcess::start(&consumer_env(&stores, &[]));
    wait_for_points(&stores, points_of(&kept)).await;
    // (The dropped frames may sit in other partitions than the kept ones: the whole topic read.)
    wait_until_committed(&stores, &format!("biofeed-test-group-{}", stores.id)).await;
    let stderr = consumer.stop_ok().await;
    assert!(
        stderr.contains(&format!("{dropped} of closed sessions dropped")),
        "{stderr}"
    );
    let run = stores.biofeed(&["replay"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let summary: serde_json::Value =
        serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["dropped_closed"], dropped, "{summary}");
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points FINAL").await,
        points_of(&kept),
        "only the open and the completed session's rows, each once"
    );
    assert_eq!(
        clickhouse_count(
            &stores,
            &format!("SELECT count() FROM points WHERE session_id NOT IN (toUUID('{open}'), toUUID('{completed}'))")
        )
        .await,
        0
    );
}

#[tokio::test]
async fn frames_of_a_person_erased_while_they_waited_in_kafka_never_land() {
    let stores = migrated().await;
    let (stays, erased) = (Uuid::new_v4(), Uuid::new_v4());
    let first = frames(stays, 1, 5, 20);
    let in_flight = frames(erased, 2, 10, 20);
    register_sessions(&stores, &in_flight).await;
    produce_frames(&stores, &first).await;
    // The erasure list is read once an hour here: only the check before each insert can
    // notice the erasure in time.
    let consumer = ConsumerProcess::start(&consumer_env(
        &stores,
        &[("BIOFEED_CONSUMER_REFRESH", "1h".to_owned())],
    ));
    wait_for_points(&stores, points_of(&first)).await;

    let accounts = biofeed_accounts::Accounts {
        pool: stores.settings.stores.postgres.connect().await.unwrap(),
        keys: biofeed_accounts::AccountKeys::generate(),
    };
    biofeed_accounts::erase::erase_user(&accounts, erased, None)
        .await
        .unwrap();
    let mut env = stores.env();
    env.push((
        "BIOFEED_CONSUMER_GROUP",
        format!("biofeed-test-group-{}", stores.id),
    ));
    let run = crate::helpers::run_biofeed(&["jobs", "run", "erasure"], &env).await;
    assert_eq!(run.code, 0, "{run:?}");

    // The person's frames were accepted before the erasure and reach the consumer after it.
    let later = frames(stays, 1, 5, 20)
        .into_iter()
        .map(|mut f| {
            f.session_id = first[0].session_id;
            f.t0_us += 3_600_000_000;
            f
        })
        .collect::<Vec<_>>();
    produce_unregistered(&stores, &in_flight).await;
    produce_frames(&stores, &later).await;
    wait_for_points(&stores, points_of(&first) + points_of(&later)).await;
    wait_until_committed(&stores, &format!("biofeed-test-group-{}", stores.id)).await;
    consumer.stop_ok().await;
    assert_eq!(
        points_with(&stores, "user_id", erased).await,
        0,
        "no row of the erased person after the erasure"
    );
}

/// Waits until the group committed the end of every partition (a watchdog, not a timing).
pub(crate) async fn wait_until_committed(stores: &Isolated, group: &str) {
    eventually(
        Duration::from_secs(60),
        Duration::from_millis(200),
        async || {
            let offsets = committed_and_ends(stores, group).await;
            if offsets.iter().all(|(_, committed, end)| committed == end) {
                Ok(())
            } else {
                Err(format!("the group to catch up: {offsets:?}"))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_purge_waits_for_a_lagging_consumer_and_the_purged_session_stays_empty() {
    let stores = migrated().await;
    let sent = frames(Uuid::new_v4(), 2, 20, 50);
    produce_frames(&stores, &sent).await;
    let (aborted, completed) = (sent[0].session_id, sent[1].session_id);
    let pg = stores.settings.stores.postgres.connect().await.unwrap();
    for (session, status) in [(aborted, "aborted"), (completed, "completed")] {
        sqlx::query(
            "UPDATE sessions SET status = $2, ended_at = now() - interval '1 hour' WHERE id = $1",
        )
        .bind(session)
        .bind(status)
        .execute(&pg)
        .await
        .unwrap();
    }
    let group = format!("biofeed-test-group-{}", stores.id);
    let mut jobs_env = stores.env();
    jobs_env.extend([
        ("BIOFEED_CONSUMER_GROUP", group.clone()),
        ("BIOFEED_JOBS_CONSUMER_WAIT", "1s".to_owned()),
    ]);
    // No consumer has read the aborted session's frames yet: the purge must not call it done.
    let early = crate::helpers::run_biofeed(&["jobs", "run", "purge"], &jobs_env).await;
    assert_ne!(early.code, 0, "{early:?}");
    assert!(early.stderr.contains("kafka"), "{early:?}");
    assert_eq!(session_status(&pg, aborted).await, "aborted");

    let consumer = ConsumerProcess::start(&consumer_env(&stores, &[]));
    let kept: Vec<SensorFrame> = sent
        .iter()
        .filter(|f| f.session_id == completed)
        .cloned()
        .collect();
    wait_for_points(&stores, points_of(&kept)).await;
    wait_until_committed(&stores, &group).await;
    let purge = crate::helpers::run_biofeed(&["jobs", "run", "purge"], &jobs_env).await;
    assert_eq!(purge.code, 0, "{purge:?}");
    assert_eq!(session_status(&pg, aborted).await, "purged");
    // A replay after the purge brings nothing of it back either.
    let replay = stores.biofeed(&["replay"]).await;
    assert_eq!(replay.code, 0, "{replay:?}");
    consumer.stop_ok().await;
    assert_eq!(points_with(&stores, "session_id", aborted).await, 0);
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points FINAL").await,
        points_of(&kept)
    );
}
