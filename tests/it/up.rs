//! `biofeed up` (gateway, consumer and jobs in one process) for the whole-pipeline tests: its
//! environment with short job intervals, its start, and what the simulator and ClickHouse report.

use std::collections::BTreeMap;
use std::time::Duration;

use biofeed_accounts::AccountKeys;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{free_port, key_env, BiofeedProcess, Isolated};

/// Where a `biofeed up` of a test listens, and the environment that makes it so.
pub struct UpSettings {
    /// The gateway's base URL.
    pub url: String,
    /// The base URL of its metrics endpoint.
    pub metrics: String,
    /// The environment: the test's stores and keys, free ports, a consumer group of the test's
    /// own (named after `group`), short batches and job intervals of a second.
    pub env: Vec<(&'static str, String)>,
}

impl UpSettings {
    /// Settings for a `biofeed up` on `stores` with `keys`.
    pub fn new(stores: &Isolated, keys: &AccountKeys, group: &str) -> Self {
        let (port, metrics_port) = (free_port(), free_port());
        let mut env = stores.env();
        env.extend(key_env(keys));
        env.extend([
            ("BIOFEED_GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
            (
                "BIOFEED_UP_METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            ),
            (
                "BIOFEED_CONSUMER_GROUP",
                format!("biofeed-test-{group}-{}", stores.id),
            ),
            (
                "BIOFEED_LIVE_GROUP",
                format!("biofeed-live-test-{group}-{}", stores.id),
            ),
            ("BIOFEED_BATCH_MAX_AGE", "200ms".to_owned()),
        ]);
        for key in [
            "BIOFEED_JOBS_SETTLE",
            "BIOFEED_JOBS_ROLLUPS_INTERVAL",
            "BIOFEED_JOBS_METRICS_INTERVAL",
            "BIOFEED_JOBS_PURGE_INTERVAL",
            "BIOFEED_JOBS_ERASURE_INTERVAL",
            "BIOFEED_JOBS_SYNC_INTERVAL",
            "BIOFEED_JOBS_RETRY_BACKOFF",
        ] {
            env.push((key, "1s".to_owned()));
        }
        env.push(("BIOFEED_JOBS_LEASE", "5s".to_owned()));
        Self {
            url: crate::helpers::gateway_url(port),
            metrics: format!("http://127.0.0.1:{metrics_port}"),
            env,
        }
    }
}

/// Starts `biofeed up` with `env` and waits until `{url}/readyz` answers 2xx.
pub async fn start_up(env: &[(&'static str, String)], url: &str) -> BiofeedProcess {
    let process = BiofeedProcess::start(&["up"], env);
    let http = crate::helpers::http_client();
    crate::helpers::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "biofeed up became ready",
        async || {
            http.get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
    process
}

/// The points per session that the simulator's summary reports, of the sessions whose status
/// `keep` accepts.
pub fn simulated_points(summary: &Value, keep: impl Fn(&str) -> bool) -> BTreeMap<Uuid, u64> {
    summary["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| keep(s["status"].as_str().unwrap_or_default()))
        .map(|s| {
            (
                s["session_id"].as_str().unwrap().parse().unwrap(),
                s["points"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The points per session ClickHouse holds now (`points FINAL`).
pub async fn stored_points(stores: &Isolated) -> BTreeMap<Uuid, u64> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Count {
        #[serde(with = "clickhouse::serde::uuid")]
        session_id: Uuid,
        points: u64,
    }
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    ch.client()
        .query("SELECT session_id, count() AS points FROM points FINAL GROUP BY session_id")
        .fetch_all::<Count>()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.session_id, c.points))
        .collect()
}
