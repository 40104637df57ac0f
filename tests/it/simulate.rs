//! The whole pipeline as one: `biofeed up` (gateway, consumer, jobs in one process) against the
//! real services, driven by `biofeed simulate` through the HTTP API; exactly the completed
//! sessions' points end up stored, and the aborted ones' are purged.

use std::collections::BTreeMap;
use std::time::Duration;

use biofeed_accounts::AccountKeys;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{free_port, run_biofeed, BiofeedProcess, Isolated};

#[tokio::test]
async fn simulated_devices_leave_exactly_the_completed_sessions_points() {
    let stores = Isolated::new().await;
    biofeed_migrations::migrate(&stores.settings)
        .await
        .expect("migrate");
    let keys = AccountKeys::generate();
    let (port, metrics_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{port}");
    let mut env = stores.env();
    env.extend([
        ("BIOFEED_MASTER_KEY", keys.master_key().to_base64()),
        ("BIOFEED_BLIND_INDEX_KEY", keys.blind_index_key.to_base64()),
        ("BIOFEED_GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
        (
            "BIOFEED_UP_METRICS_LISTEN",
            format!("127.0.0.1:{metrics_port}"),
        ),
        ("BIOFEED_CONSUMER_GROUP", format!("test-up-{}", stores.id)),
        ("BIOFEED_BATCH_MAX_AGE", "200ms".to_owned()),
        ("BIOFEED_JOBS_SETTLE", "1s".to_owned()),
        ("BIOFEED_JOBS_ROLLUPS_INTERVAL", "1s".to_owned()),
        ("BIOFEED_JOBS_METRICS_INTERVAL", "1s".to_owned()),
        ("BIOFEED_JOBS_PURGE_INTERVAL", "1s".to_owned()),
        ("BIOFEED_JOBS_SYNC_INTERVAL", "1s".to_owned()),
    ]);
    let up = BiofeedProcess::start(&["up"], &env);
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
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let run = run_biofeed(
        &[
            "simulate",
            "--url",
            &url,
            "--devices",
            "4",
            "--duration",
            "14s",
            "--session-length",
            "3s",
            "--abort-share",
            "0.5",
            "--seed",
            "42",
        ],
        &env,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let summary: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    let sessions = summary["sessions"].as_array().unwrap();
    let of = |status: &str| -> BTreeMap<Uuid, u64> {
        sessions
            .iter()
            .filter(|s| s["status"] == status)
            .map(|s| {
                (
                    s["session_id"].as_str().unwrap().parse().unwrap(),
                    s["points"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let (completed, aborted) = (of("completed"), of("aborted"));
    assert!(!completed.is_empty() && !aborted.is_empty(), "{summary}");
    assert!(
        aborted.values().any(|p| *p > 0),
        "aborted sessions streamed points too: {summary}"
    );
    assert_eq!(summary["frames_refused"], 0);
    let expected: BTreeMap<Uuid, u64> = completed
        .iter()
        .filter(|(_, p)| **p > 0)
        .map(|(s, p)| (*s, *p))
        .collect();

    // The consumer stores the points, the jobs purge the aborted sessions': wait (a watchdog, not
    // a timing) until ClickHouse holds exactly the completed sessions' points.
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Count {
        #[serde(with = "clickhouse::serde::uuid")]
        session_id: Uuid,
        points: u64,
    }
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let stored = loop {
        let rows: Vec<Count> = ch
            .client()
            .query("SELECT session_id, count() AS points FROM points FINAL GROUP BY session_id")
            .fetch_all()
            .await
            .unwrap();
        let stored: BTreeMap<Uuid, u64> =
            rows.into_iter().map(|r| (r.session_id, r.points)).collect();
        if stored == expected || tokio::time::Instant::now() >= deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        stored, expected,
        "exactly the completed sessions' points, each exactly once"
    );

    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let statuses: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM sessions")
            .fetch_all(&pool)
            .await
            .unwrap();
        let purged = statuses
            .iter()
            .filter(|(id, st)| aborted.contains_key(id) && st == "purged")
            .count();
        if purged == aborted.len() {
            assert!(statuses
                .iter()
                .filter(|(id, _)| completed.contains_key(id))
                .all(|(_, st)| st == "completed"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "aborted sessions were not all marked purged: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let metrics = http
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("biofeed_consumer_") && metrics.contains("biofeed_jobs_runs_total"),
        "{metrics}"
    );
    let (code, stderr) = up.stop().await;
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test]
async fn bench_e2e_reports_its_figures_and_loses_no_point() {
    // The configured Postgres database is left empty: the bench makes and migrates its own.
    let stores = Isolated::new().await;
    let keys = AccountKeys::generate();
    let dir = crate::helpers::ServerProcess::new("e2e-report");
    let report = dir.dir.join("bench-e2e.md");
    let mut env = stores.env();
    env.extend([
        ("BIOFEED_MASTER_KEY", keys.master_key().to_base64()),
        ("BIOFEED_BLIND_INDEX_KEY", keys.blind_index_key.to_base64()),
    ]);
    let run = run_biofeed(
        &[
            "bench",
            "e2e",
            "--devices",
            "4",
            "--rate",
            "100",
            "--duration",
            "2s",
            "--no-peers",
            "--report",
            report.to_str().unwrap(),
        ],
        &env,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let figures: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(figures["lost"], 0, "{figures}");
    assert!(figures["accepted"].as_u64().unwrap() > 0, "{figures}");
    assert_eq!(figures["accepted"], figures["stored"], "{figures}");
    assert!(figures["e2e_p99_ms"].as_f64().unwrap() > 0.0, "{figures}");
    for key in [
        "offered_points_per_s",
        "stored_points_per_s",
        "gateway_p99_ms",
        "peak_rss_mib",
        "bytes_per_point",
    ] {
        assert!(figures[key].as_f64().unwrap() > 0.0, "{key}: {figures}");
    }
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(
        text.contains("points/s stored") && text.contains("none lost: met"),
        "{text}"
    );
    // The bench cleaned up after itself: no bench database is left.
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    let left: u64 = ch
        .server_client()
        .query("SELECT count() FROM system.databases WHERE name LIKE 'biofeed_e2e_%'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(left, 0);
    // Its users, sessions and job runs went to a Postgres database of its own, dropped at the
    // end: the configured database is as empty as before.
    assert_eq!(
        stores.postgres_tables().await,
        0,
        "the configured database was written"
    );
    assert_eq!(
        crate::helpers::postgres_databases_like("biofeed_e2e_%").await,
        0,
        "the bench's own database is dropped"
    );
}

#[tokio::test]
async fn bench_gateway_keeps_its_user_out_of_the_configured_database() {
    // The configured Postgres database is left empty: the bench makes and migrates its own.
    let stores = Isolated::new().await;
    let keys = AccountKeys::generate();
    let mut env = stores.env();
    env.extend([
        ("BIOFEED_MASTER_KEY", keys.master_key().to_base64()),
        ("BIOFEED_BLIND_INDEX_KEY", keys.blind_index_key.to_base64()),
    ]);
    let run = run_biofeed(
        &[
            "bench",
            "gateway",
            "--devices",
            "2",
            "--duration",
            "1s",
            "--channels",
            "1",
            "--formats",
            "avro",
        ],
        &env,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let summary: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert!(
        summary["gateway_points_per_s"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    assert_eq!(
        stores.postgres_tables().await,
        0,
        "the configured database was written"
    );
}
