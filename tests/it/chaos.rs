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
use crate::helpers::{eventually, run_biofeed, with, BiofeedProcess, Isolated};
use crate::up::{simulated_points, start_up, stored_points, UpSettings};

/// Waits until ClickHouse holds more than `than` rows (a watchdog, not a timing).
async fn rows_beyond(stores: &Isolated, than: u64) -> u64 {
    eventually(
        Duration::from_secs(60),
        Duration::from_millis(100),
        async || match clickhouse_count(stores, "SELECT count() FROM points").await {
            now if now > than => Ok(now),
            _ => Err(format!("no new rows beyond {than}")),
        },
    )
    .await
}

#[tokio::test]
async fn killed_twice_mid_stream_nothing_accepted_is_lost_or_doubled_nothing_deleted_comes_back() {
    let stores = Isolated::migrated().await;
    let UpSettings { url, env, .. } = UpSettings::new(&stores, &AccountKeys::generate(), "chaos");
    let env = with(env, "BIOFEED_LOG", "error".to_owned());
    let env = with(env, "BIOFEED_BATCH_MAX_AGE", "300ms".to_owned());
    let first = start_up(&env, &url).await;
    let simulate = BiofeedProcess::start(
        &[
            "simulate",
            "--url",
            &url,
            "--devices",
            "6",
            // Long enough for the whole scenario below (two kills and restarts until ready, an
            // erasure mid-stream) to happen while every device still streams, on a busy machine.
            "--duration",
            "90s",
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
    let second = start_up(&env, &url).await;
    rows_beyond(&stores, seen).await;

    // Erase one simulated person while their device streams: one with an open session (a device
    // is between two sessions now and then; a watchdog, not a timing).
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let erased: Uuid = eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || {
            sqlx::query_scalar(
                "SELECT user_id FROM sessions WHERE status = 'open' ORDER BY started_at LIMIT 1",
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

    let seen = clickhouse_count(&stores, "SELECT count() FROM points").await;
    rows_beyond(&stores, seen).await;
    second.kill9().await;
    let last = start_up(&env, &url).await;

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
    let accepted = simulated_points(&summary, |_| true);

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
    eventually(
        Duration::from_secs(180),
        Duration::from_millis(500),
        async || {
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
            Err(format!("{unpurged} sessions not purged, {erasing} erasures pending; stored {stored:?}, expected {expected:?}"))
        },
    )
    .await;
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
