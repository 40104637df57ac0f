//! The cluster's promises, against the local cluster `compose/local up --cluster` starts
//! (three Kafka brokers, ZooKeeper, ClickHouse as 2 shards × 2 replicas): nodes are killed with
//! SIGKILL while data flows, and what was accepted is stored exactly once on every replica.
//!
//! These tests need that cluster, so they are `#[ignore]`d in the single-node run;
//! `compose/local test` runs them after it, with
//! `cargo test --test it cluster:: -- --ignored`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use biofeed_accounts::AccountKeys;
use serde_json::Value;
use uuid::Uuid;

use crate::consumers::{
    clickhouse_count, committed_and_ends, consumer_env, frames, points_of, produce_frames,
    wait_for_points, ConsumerProcess,
};
use crate::gateway_app::TestGateway;
use crate::helpers::{eventually, free_port, metrics_text, run_biofeed, wait_until, with};
use crate::helpers::{state_dir, BiofeedProcess, Isolated};
use crate::up::{simulated_points, start_up, stored_points, UpSettings};

/// The ClickHouse nodes of each shard, as compose/local names them.
const SHARDS: [[&str; 2]; 2] = [
    ["clickhouse-1", "clickhouse-2"],
    ["clickhouse-3", "clickhouse-4"],
];

/// Fails unless the settings point at a ClickHouse cluster.
fn require_cluster(stores: &Isolated) {
    assert!(
        stores.settings.stores.clickhouse.cluster.is_some(),
        "these tests need the local cluster: compose/local up --cluster (compose/local test starts it)"
    );
}

/// SIGKILL to a node of the local cluster (its pid file in the state directory).
fn kill9(node: &str) {
    let pidfile = state_dir().join("cluster").join(node).join("pid");
    let pid =
        std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
    let status = std::process::Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -9 {node}");
}

/// Brings killed nodes back if the test fails before it does, so that the next test finds the
/// whole cluster.
struct Revive;

impl Drop for Revive {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("compose/local");
            let _ = std::process::Command::new(script)
                .args(["up", "--cluster"])
                .env("BIOFEED_STATE_DIR", state_dir())
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}

/// `compose/local up --cluster`: starts the nodes that are down and waits until they answer.
async fn restart_downed_nodes() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("compose/local");
    let output = tokio::process::Command::new(script)
        .args(["up", "--cluster"])
        .env("BIOFEED_STATE_DIR", state_dir())
        .stdout(std::process::Stdio::null())
        .output()
        .await
        .expect("compose/local runs");
    assert!(
        output.status.success(),
        "compose/local up --cluster: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The rows of `<table>_local` (`FINAL`) matching `condition` on each node, asked of each
/// node itself, in the order of the settings' URLs (compose/local lists clickhouse-1 to 4:
/// shard 1's replicas, then shard 2's).
async fn rows_per_replica(stores: &Isolated, table: &str, condition: &str) -> Vec<u64> {
    let settings = &stores.settings.stores.clickhouse;
    let mut rows = Vec::new();
    for node in settings.url.all() {
        let mut one = settings.clone();
        one.url = node.as_str().parse().unwrap();
        let ch = one.connect().await.unwrap();
        let local = biofeed_backends::clickhouse::local_table(table);
        rows.push(
            ch.client()
                .query(&format!(
                    "SELECT count() FROM {local} FINAL WHERE {condition}"
                ))
                .fetch_one::<u64>()
                .await
                .unwrap(),
        );
    }
    rows
}

/// Waits until each replica holds the same rows as the other replica of its shard and the two
/// shards together hold `total`; returns the rows per shard.
async fn replicas_agree(stores: &Isolated, table: &str, total: u64) -> Vec<u64> {
    eventually(
        Duration::from_secs(120),
        Duration::from_millis(500),
        async || {
            let rows = rows_per_replica(stores, table, "1").await;
            if rows.len() == 4
                && rows[0] == rows[1]
                && rows[2] == rows[3]
                && rows[0] + rows[2] == total
            {
                Ok(vec![rows[0], rows[2]])
            } else {
                Err(format!(
                    "replicas differ or miss rows (expected {total} in all): {rows:?}"
                ))
            }
        },
    )
    .await
}

/// Users whose rows land on shard 1 and on shard 2 (the sharding key of
/// migrations/clickhouse-cluster/0001_points.sql, asked of the server).
async fn one_user_per_shard(stores: &Isolated) -> [Uuid; 2] {
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    let mut found: [Option<Uuid>; 2] = [None, None];
    while found.iter().any(Option::is_none) {
        let user = Uuid::new_v4();
        let slot: u64 = ch
            .client()
            .query("SELECT toUInt64(cityHash64(toString(toUUID(?))) % 2)")
            .bind(user.to_string())
            .fetch_one()
            .await
            .unwrap();
        found[slot as usize].get_or_insert(user);
    }
    found.map(Option::unwrap)
}

#[tokio::test]
#[ignore = "needs the local cluster (compose/local up --cluster); compose/local test runs it"]
async fn a_broker_and_a_replica_killed_mid_stream_lose_and_double_nothing_on_any_replica() {
    let stores = Isolated::migrated().await;
    require_cluster(&stores);
    let _revive = Revive;
    let topic_layout = run_biofeed(
        &["migrate", "--status"],
        &stores.env_as(crate::helpers::Role::Migrate),
    )
    .await;
    assert!(
        topic_layout
            .stdout
            .contains("3 replicas, min.insync.replicas 2"),
        "the points topic is replicated on three brokers: {topic_layout:?}"
    );
    let UpSettings { url, env, .. } = UpSettings::new(&stores, &AccountKeys::generate(), "cluster");
    let env = with(env, "BIOFEED_LOG", "error".to_owned());
    let up = start_up(&env, &url).await;
    let simulate = BiofeedProcess::start(
        &[
            "simulate",
            "--url",
            &url,
            "--devices",
            "4",
            // Long enough that the devices still stream through every kill, the erasure and the
            // restart below, however slowly the broker and replica go down and come back.
            "--duration",
            "120s",
            "--session-length",
            "5s",
            "--abort-share",
            "0.3",
            "--seed",
            "16",
        ],
        &env,
    );
    let rows =
        async |stores: &Isolated| clickhouse_count(stores, "SELECT count() FROM points").await;
    let grows = async |stores: &Isolated, than: u64, what: &str| {
        // Generous: on two cores a restarted broker's JVM and compose/local's admin tools starve
        // the rest for a while (a watchdog, not a timing).
        eventually(
            Duration::from_secs(180),
            Duration::from_millis(200),
            async || match rows(stores).await {
                now if now > than => Ok(now),
                now => Err(format!("{what}: still {now} rows")),
            },
        )
        .await
    };

    let seen = grows(&stores, 0, "points arrive").await;

    // A broker dies: producers (acks=all, 2 of 3 in sync) and the consumer go on. It stays down
    // while a ClickHouse replica dies too, and both come back together below.
    kill9("kafka-2");
    let seen = grows(&stores, seen, "points arrive with a broker down").await;

    // The first ClickHouse node dies, the one every service's URL list names first: the
    // consumer's connections go to the next node, which writes its own shard locally.
    kill9("clickhouse-1");
    let seen = grows(&stores, seen, "points arrive with a replica down").await;

    // Erase a person, while that replica is down: the erasure
    // cannot be verified on every replica yet, so it must wait for the node to return.
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    // (One whose device streams if there is one; a device is between sessions now and then.)
    let erased: Uuid = eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || {
            sqlx::query_scalar(
                "SELECT user_id FROM sessions ORDER BY status = 'open' DESC, started_at LIMIT 1",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
            .ok_or_else(|| "no open session".to_owned())
        },
    )
    .await;
    let erase = run_biofeed(
        &["admin", "user", "erase", &erased.to_string(), "--yes"],
        &env,
    )
    .await;
    assert_eq!(erase.code, 0, "{erase:?}");
    grows(&stores, seen, "and go on arriving").await;
    let erasing: i64 =
        sqlx::query_scalar("SELECT count(*) FROM erased_users WHERE clickhouse_deleted_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        erasing, 1,
        "the erasure was reported done with a replica down"
    );
    // The broker and the replica come back (the replica fetches what it missed, the broker
    // catches up its partitions) while the devices still stream.
    restart_downed_nodes().await;

    let run = simulate.wait().await;
    let summary: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    // Every device rode out the failures; only the erased person's had its last frames refused
    // (401: its token went with the erasure).
    let refused = summary["frames_refused"].as_u64().unwrap();
    assert!(
        (run.code, refused) == (0, 0) || (run.code == 1 && refused <= 40),
        "{run:?}"
    );
    let accepted = simulated_points(&summary, |_| true);
    let statuses: BTreeMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT id, status FROM sessions")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let completed: BTreeSet<Uuid> = statuses
        .iter()
        .filter(|(_, status)| *status == "completed")
        .map(|(id, _)| *id)
        .collect();
    let expected: BTreeMap<Uuid, u64> = accepted
        .iter()
        .filter(|(id, points)| completed.contains(id) && **points > 0)
        .map(|(id, points)| (*id, *points))
        .collect();
    assert!(!expected.is_empty(), "{summary}");

    // Exactly the completed sessions' accepted points, once, through the Distributed table, after
    // the jobs purged what did not complete and worked off the erasure (on every replica: they
    // verify there, so they wait for the restarted node).
    eventually(Duration::from_secs(240), Duration::from_millis(500), async || {
        let unpurged: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sessions WHERE status IN ('aborted', 'expired')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let erasing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM erased_users WHERE clickhouse_deleted_at IS NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let stored = stored_points(&stores).await;
        if unpurged == 0 && erasing == 0 && stored == expected {
            return Ok(());
        }
        Err(format!("{unpurged} not purged, {erasing} erasures pending; stored {stored:?}, expected {expected:?}"))
    })
    .await;
    let (code, stderr) = up.stop().await;
    assert_eq!(code, 0, "{stderr}");

    // The killed replica caught up: both replicas of each shard hold the same rows, and the two
    // shards together hold exactly what is expected.
    let total: u64 = expected.values().sum();
    replicas_agree(&stores, "points", total).await;

    // Nothing purged or erased is left on any replica of any table.
    let gone: Vec<String> = accepted
        .keys()
        .filter(|id| !completed.contains(id))
        .map(|id| format!("toUUID('{id}')"))
        .collect();
    let gone = format!(
        "session_id IN ({}) OR user_id = toUUID('{erased}')",
        if gone.is_empty() {
            "toUUID('00000000-0000-0000-0000-000000000000')".to_owned()
        } else {
            gone.join(",")
        }
    );
    // (session_facts keeps the facts of sessions that did not complete, marked so; not the
    // erased person's.)
    let erased_only = format!("user_id = toUUID('{erased}')");
    for (table, condition) in [
        ("points", &gone),
        ("rollups_1s", &gone),
        ("rollups_1m", &gone),
        ("session_metrics", &gone),
        ("session_facts", &erased_only),
    ] {
        let per_replica = rows_per_replica(&stores, table, condition).await;
        assert_eq!(per_replica.len(), 4, "{table}: {per_replica:?}");
        assert!(
            per_replica.iter().all(|rows| *rows == 0),
            "{table} holds rows of sessions that did not complete or of the erased person: {per_replica:?}"
        );
    }

    // A replay of the whole topic into the cluster doubles nothing and brings nothing back.
    let replay = stores
        .biofeed(&["replay", "--from", "2020-01-01T00:00:00Z"])
        .await;
    assert_eq!(replay.code, 0, "{replay:?}");
    assert_eq!(stored_points(&stores).await, expected);
    replicas_agree(&stores, "points", total).await;
    assert!(
        rows_per_replica(&stores, "points", &gone)
            .await
            .iter()
            .all(|rows| *rows == 0),
        "a replay brought purged or erased points back"
    );
}

#[tokio::test]
#[ignore = "needs the local cluster (compose/local up --cluster); compose/local test runs it"]
async fn a_whole_shard_down_holds_the_batch_uncommitted_and_reads_answer_503_until_it_returns() {
    let gw = TestGateway::spawn(&[]).await;
    let stores = &gw.stores;
    require_cluster(stores);
    let _revive = Revive;
    assert_eq!(
        stores.settings.stores.clickhouse.url.all().len(),
        4,
        "2 shards × 2 replicas"
    );

    // A person with a stored session, readable while every shard is up.
    let person = gw.sign_up("user", 35).await;
    let (session, _) = gw.session_with_points(&person, &[61.0, 62.0, 63.0]).await;
    let path = format!("/v1/sessions/{session}/points?data_type=heart_rate");
    let (status, body) = gw.read(&person, &path).await;
    assert_eq!(status, 200, "{body}");

    // Frames of one person on each shard wait in Kafka.
    let users = one_user_per_shard(stores).await;
    let mut sent = frames(users[0], 2, 10, 50);
    sent.extend(frames(users[1], 2, 10, 50));
    produce_frames(stores, &sent).await;

    // Shard 2 goes down whole.
    for node in SHARDS[1] {
        kill9(node);
    }
    let metrics = format!("127.0.0.1:{}", free_port());
    let env = consumer_env(
        stores,
        &[("BIOFEED_CONSUMER_METRICS_LISTEN", metrics.clone())],
    );
    let consumer = ConsumerProcess::start(&env);
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "the consumer failed inserts into the missing shard",
        async || {
            let text = metrics_text(&format!("http://{metrics}")).await;
            text.lines().any(|l| {
                l.starts_with("biofeed_consumer_insert_failures_total ")
                    && l.split(' ').nth(1).is_some_and(|v| v != "0")
            })
        },
    )
    .await;
    // Nothing committed, nothing dead-lettered, nothing half-written to the other shard either
    // counts as stored: a read answers 503 with Retry-After, not a partial answer.
    for (partition, committed, end) in
        committed_and_ends(stores, &format!("biofeed-test-group-{}", stores.id)).await
    {
        assert_eq!(
            committed, 0,
            "partition {partition} committed with a shard down (end {end})"
        );
    }
    let response = gw
        .as_person(reqwest::Method::GET, &person, &path)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(
        response.headers().contains_key("retry-after"),
        "{response:?}"
    );

    // The shard returns: the batch is written once, committed, nothing in the dead letters.
    restart_downed_nodes().await;
    let expected = points_of(&sent) + 3;
    wait_for_points(stores, expected).await;
    eventually(
        Duration::from_secs(60),
        Duration::from_millis(200),
        async || {
            let offsets =
                committed_and_ends(stores, &format!("biofeed-test-group-{}", stores.id)).await;
            if offsets.iter().all(|(_, committed, end)| committed == end) {
                Ok(())
            } else {
                Err(format!("not committed yet: {offsets:?}"))
            }
        },
    )
    .await;
    consumer.stop_ok().await;
    let dlq = clickhouse_dead_letters(stores).await;
    assert_eq!(dlq, 0, "frames were dead-lettered while the shard was down");
    let (status, body) = gw.read(&person, &path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["samples"].as_array().map(Vec::len), Some(3), "{body}");
    let per_shard = replicas_agree(stores, "points", expected).await;
    assert!(
        per_shard.iter().all(|rows| *rows > 0),
        "both shards hold rows: {per_shard:?}"
    );
}

/// Messages in the test's dead-letter topic.
async fn clickhouse_dead_letters(stores: &Isolated) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let kafka = stores.settings.stores.kafka.clone();
    let topic = stores.settings.stores.topics.dlq.clone();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = kafka.client_config().unwrap().create().unwrap();
        let (low, high) = client
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .unwrap();
        high - low
    })
    .await
    .unwrap()
}
