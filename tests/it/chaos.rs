//! The pipeline's promises under crashes: simulated devices stream while `biofeed up` (gateway,
//! consumer and jobs in one process) is killed with SIGKILL twice and restarted, and a person is
//! erased mid-stream. Afterwards every point accepted in a completed session is stored exactly
//! once, and aborted, expired or purged sessions and the erased person have no rows in ClickHouse.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use biofeed_accounts::AccountKeys;
use serde_json::Value;
use uuid::Uuid;

use crate::consumers::clickhouse_count;
use crate::helpers::{free_port, run_biofeed, BiofeedProcess, Isolated};

/// Starts `biofeed up` and waits until it is ready.
async fn up(env: &[(&'static str, String)], url: &str) -> BiofeedProcess {
    let process = BiofeedProcess::start(&["up"], env);
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "biofeed up never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    process
}

/// Waits until ClickHouse holds more than `than` rows (a watchdog, not a timing).
async fn rows_beyond(stores: &Isolated, than: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = clickhouse_count(stores, "SELECT count() FROM points").await;
        if now > than {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new rows beyond {than}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct Count {
    #[serde(with = "clickhouse::serde::uuid")]
    session_id: Uuid,
    points: u64,
}

#[tokio::test]
async fn killed_twice_mid_stream_nothing_accepted_is_lost_or_doubled_nothing_deleted_comes_back() {
    let stores = Isolated::migrated().await;
    let keys = AccountKeys::generate();
    let (port, metrics_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{port}");
    let mut env = stores.env();
    env.retain(|(k, _)| *k != "BIOFEED_LOG");
    env.extend([
        ("BIOFEED_LOG", "error".to_owned()),
        ("BIOFEED_MASTER_KEY", keys.master_key().to_base64()),
        ("BIOFEED_BLIND_INDEX_KEY", keys.blind_index_key.to_base64()),
        ("BIOFEED_GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
        (
            "BIOFEED_UP_METRICS_LISTEN",
            format!("127.0.0.1:{metrics_port}"),
        ),
        (
            "BIOFEED_CONSUMER_GROUP",
            format!("test-chaos-{}", stores.id),
        ),
        ("BIOFEED_BATCH_MAX_AGE", "300ms".to_owned()),
        ("BIOFEED_JOBS_SETTLE", "1s".to_owned()),
        ("BIOFEED_JOBS_ROLLUPS_INTERVAL", "1s".to_owned()),
        ("BIOFEED_JOBS_METRICS_INTERVAL", "1s".to_owned()),
        ("BIOFEED_JOBS_PURGE_INTERVAL", "1s".to_owned()),
        ("BIOFEED_JOBS_ERASURE_INTERVAL", "1s".to_owned()),
        ("BIOFEED_JOBS_SYNC_INTERVAL", "1s".to_owned()),
        ("BIOFEED_JOBS_RETRY_BACKOFF", "1s".to_owned()),
        ("BIOFEED_JOBS_LEASE", "5s".to_owned()),
    ]);
    let first = up(&env, &url).await;
    let simulate = BiofeedProcess::start(
        &[
            "simulate",
            "--url",
            &url,
            "--devices",
            "6",
            "--duration",
            "30s",
            "--session-length",
            "4s",
            "--abort-share",
            "0.4",
            "--seed",
            "7",
        ],
        &env,
    );

    // Kill while points stream in, restart, and again.
    let seen = rows_beyond(&stores, 0).await;
    first.kill9().await;
    let second = up(&env, &url).await;
    rows_beyond(&stores, seen).await;

    // Erase one simulated person while their device streams.
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let erased: Uuid = sqlx::query_scalar(
        "SELECT user_id FROM sessions WHERE status = 'open' ORDER BY started_at LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let erase = run_biofeed(
        &["admin", "user", "erase", &erased.to_string(), "--yes"],
        &env,
    )
    .await;
    assert_eq!(erase.code, 0, "{erase:?}");

    let seen = clickhouse_count(&stores, "SELECT count() FROM points").await;
    rows_beyond(&stores, seen).await;
    second.kill9().await;
    let last = up(&env, &url).await;

    let run = simulate.wait().await;
    let summary: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    // Only the erased person's device stopped, after its remaining frames were refused (401:
    // its token went with the erasure; a few seconds of frames at most); every other device rode
    // out both restarts.
    assert_eq!(summary["devices"], 5, "{run:?}");
    let refused = summary["frames_refused"].as_u64().unwrap();
    assert!(
        (run.code, refused) == (0, 0) || (run.code == 1 && refused <= 40),
        "{run:?}"
    );
    let accepted: BTreeMap<Uuid, u64> = summary["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["session_id"].as_str().unwrap().parse().unwrap(),
                s["points"].as_u64().unwrap(),
            )
        })
        .collect();

    // Postgres says what became of each session (an erased person's are gone from it).
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
    assert!(
        statuses.values().any(|s| s != "completed" && s != "open"),
        "some sessions were aborted: {statuses:?}"
    );
    let expected: BTreeMap<Uuid, u64> = accepted
        .iter()
        .filter(|(id, points)| completed.contains(id) && **points > 0)
        .map(|(id, points)| (*id, *points))
        .collect();
    assert!(!expected.is_empty(), "{summary}");

    // Wait (a watchdog, not a timing) until the jobs purged every session that did not complete
    // (open ones expire only at their deadline: the simulator closed all of its) and worked off
    // the erasure; then ClickHouse must hold exactly the completed sessions' points.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    loop {
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
        let stored: BTreeMap<Uuid, u64> = ch
            .client()
            .query("SELECT session_id, count() AS points FROM points FINAL GROUP BY session_id")
            .fetch_all::<Count>()
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.session_id, c.points))
            .collect();
        if unpurged == 0 && erasing == 0 && stored == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{unpurged} sessions not purged, {erasing} erasures pending; stored {stored:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Nothing comes back once the jobs are done, and no derived table holds what is gone.
    let (code, stderr) = last.stop().await;
    assert_eq!(code, 0, "{stderr}");
    let gone: Vec<Uuid> = accepted
        .keys()
        .filter(|id| !completed.contains(id))
        .copied()
        .collect();
    let list = gone
        .iter()
        .map(|id| format!("toUUID('{id}')"))
        .collect::<Vec<_>>()
        .join(",");
    for table in ["points", "rollups_1s", "rollups_1m", "session_metrics"] {
        let left = clickhouse_count(
            &stores,
            &format!(
                "SELECT count() FROM {table} WHERE session_id IN ({list}) OR user_id = toUUID('{erased}')"
            ),
        )
        .await;
        assert_eq!(
            left, 0,
            "{table} holds rows of sessions that did not complete or of the erased person"
        );
    }
    let facts = clickhouse_count(
        &stores,
        &format!("SELECT count() FROM session_facts WHERE user_id = toUUID('{erased}')"),
    )
    .await;
    assert_eq!(facts, 0, "session_facts holds the erased person");
}
