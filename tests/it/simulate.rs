//! The whole pipeline as one: `biofeed up` (gateway, consumer, jobs in one process) against the
//! real services, driven by `biofeed simulate` through the HTTP API; exactly the completed
//! sessions' points end up stored, and the aborted ones' are purged.

use std::collections::BTreeMap;
use std::time::Duration;

use biofeed_accounts::AccountKeys;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{
    eventually, key_env, metrics_text, run_biofeed, run_biofeed_within, Isolated,
};
use crate::up::{simulated_points, start_up, stored_points, UpSettings};

#[tokio::test]
async fn simulated_devices_leave_exactly_the_completed_sessions_points() {
    let stores = Isolated::migrated().await;
    let up = UpSettings::new(&stores, &AccountKeys::generate(), "up");
    let process = start_up(&up.env, &up.url).await;

    let run = run_biofeed(
        &[
            "simulate",
            "--url",
            &up.url,
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
        &up.env,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let summary: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    let of = |status: &str| simulated_points(&summary, |s| s == status);
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let stored = loop {
        let stored = stored_points(&stores).await;
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
    let statuses = eventually(
        Duration::from_secs(60),
        Duration::from_millis(500),
        async || {
            let statuses: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM sessions")
                .fetch_all(&pool)
                .await
                .unwrap();
            let purged = statuses
                .iter()
                .filter(|(id, st)| aborted.contains_key(id) && st == "purged")
                .count();
            if purged == aborted.len() {
                Ok(statuses)
            } else {
                Err(format!(
                    "aborted sessions were not all marked purged: {statuses:?}"
                ))
            }
        },
    )
    .await;
    assert!(statuses
        .iter()
        .filter(|(id, _)| completed.contains_key(id))
        .all(|(_, st)| st == "completed"));
    let metrics = metrics_text(&up.metrics).await;
    assert!(
        metrics.contains("biofeed_consumer_") && metrics.contains("biofeed_jobs_runs_total"),
        "{metrics}"
    );
    let (code, stderr) = process.stop().await;
    assert_eq!(code, 0, "{stderr}");
}

/// How long a `biofeed bench` run may take before the test calls it a hang (a watchdog, not a
/// timing): `bench e2e` alone warms up for 10 s and drains for up to 120 s around its
/// measurement, after starting `biofeed up` and migrating stores of its own.
const BENCH_WATCHDOG: Duration = Duration::from_secs(300);

/// Runs `biofeed bench <args>` on `stores` (left unmigrated: the bench makes and migrates its
/// own databases) with fresh keys; checks it succeeded and returns its last-line JSON.
async fn bench(stores: &Isolated, args: &[&str]) -> Value {
    // The bench makes databases and topics of its own: the owner's identity.
    let mut env = stores.env_as(crate::helpers::Role::Migrate);
    env.extend(key_env(&AccountKeys::generate()));
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    let run = run_biofeed_within(BENCH_WATCHDOG, &all, &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap()
}

#[tokio::test]
async fn bench_e2e_reports_its_figures_and_loses_no_point() {
    // The configured Postgres database is left empty: the bench makes and migrates its own.
    let stores = Isolated::new().await;
    let dir = crate::helpers::ServerProcess::new("e2e-report");
    let report = dir.dir.join("bench-e2e.md");
    let python = std::env::var("BIOFEED_TEST_PYTHON")
        .expect("BIOFEED_TEST_PYTHON: a Python with chdb (compose/local test sets it)");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/compose/bench/storage-bytes");
    let figures = bench(
        &stores,
        &[
            "e2e",
            "--devices",
            "4",
            "--rate",
            "100",
            "--duration",
            "2s",
            "--no-peers",
            "--chdb-python",
            &python,
            "--storage-script",
            script,
            "--report",
            report.to_str().unwrap(),
        ],
    )
    .await;
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
    // The same rows measured on this ClickHouse and, via chdb, on a current one: every way of
    // storing them has a size, and the integer codes gave every row back (the script refuses a
    // variant that loses one, and the bench then reports an error instead).
    let storage = &figures["storage"];
    assert!(storage["error"].is_null(), "{storage}");
    let ecg = &storage["data_types"][0];
    assert_eq!(ecg["data_type"], "ecg", "{storage}");
    assert_eq!(
        ecg["points"], figures["stored"],
        "every stored point measured: {storage}"
    );
    assert!(
        ecg["server"]["bytes_per_point"].as_f64().unwrap() > 0.0,
        "{storage}"
    );
    // The values as integer codes on this server too (no codecs there: a layout change).
    assert!(
        ecg["server_codes"]["bytes_per_value"].as_f64().unwrap() > 0.0,
        "{storage}"
    );
    let variants: Vec<&str> = ecg["current"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|v| assert!(v["bytes_per_value"].as_f64().unwrap() > 0.0, "{v}"))
        .map(|v| v["variant"].as_str().unwrap())
        .collect();
    assert!(
        variants.iter().any(|v| v.contains("integer codes")),
        "{variants:?}"
    );
    assert!(text.contains("## Bytes per point"), "{text}");
    assert!(text.contains("(chdb): DoubleDelta times"), "{text}");
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
    let summary = bench(
        &stores,
        &[
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
    )
    .await;
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

#[tokio::test]
async fn bench_export_times_whole_exports_and_leaves_nothing_behind() {
    let stores = Isolated::new().await;
    let figures = bench(
        &stores,
        &["export", "--lengths", "5s,20s", "--formats", "edf,csv"],
    )
    .await;
    let runs = figures["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "{figures}");
    for run in runs {
        let samples = run["session_seconds"].as_u64().unwrap() * 256 * 8;
        assert_eq!(run["samples"], samples, "{run}");
        // Whole files: at least two bytes a sample (EDF+), a line per sample time (CSV).
        assert!(run["bytes"].as_u64().unwrap() >= samples * 2, "{run}");
        for key in ["seconds", "mb_per_s", "peak_rss_mib"] {
            assert!(run[key].as_f64().unwrap() > 0.0, "{key}: {run}");
        }
    }
    assert!(
        figures["disk_mb_per_s"].as_f64().unwrap() > 0.0,
        "{figures}"
    );
    assert_eq!(
        crate::helpers::postgres_databases_like("biofeed_export_%").await,
        0,
        "the bench's own database is dropped"
    );
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    let left: u64 = ch
        .server_client()
        .query("SELECT count() FROM system.databases WHERE name LIKE 'biofeed_export_%'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(left, 0);
}
