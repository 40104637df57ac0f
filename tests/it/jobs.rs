//! `biofeed jobs`, run as the real binary against the real Postgres and ClickHouse: rollups
//! against an independent aggregate (also after a full replay), session metrics against values
//! computed by hand and served through the API's policy, purge, the analyst views, erasure,
//! failures with ClickHouse down and their retry, two runners side by side, a runner losing its
//! lease, a panicking job, and an analyst sync of more sessions than one page.

use std::collections::BTreeMap;
use std::time::Duration;

use biofeed_accounts::{users, AccountKeys, Accounts};
use biofeed_schema::{DataTypeName, SensorFrame};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::consumers::{consumer_env, produce_frames, wait_for_points, ConsumerProcess};
use crate::gateway_app::{now_us, TestGateway};
use crate::helpers::{
    eventually, json_lines, run_biofeed, send_expecting, send_json, wait_until, BiofeedProcess,
    Isolated, Run,
};

/// The environment of a jobs command against `stores`, as the jobs' own identity: sessions
/// settle at once.
fn jobs_env(stores: &Isolated) -> Vec<(&'static str, String)> {
    let mut env = stores.env_as(crate::helpers::Role::Jobs);
    env.push(("BIOFEED_JOBS_SETTLE", "1ms".to_owned()));
    env
}

/// [`jobs_env`] with `extra` settings.
fn jobs_env_with(stores: &Isolated, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = jobs_env(stores);
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    env
}

async fn jobs(stores: &Isolated, args: &[&str]) -> Run {
    let mut all = vec!["jobs"];
    all.extend_from_slice(args);
    run_biofeed(&all, &jobs_env(stores)).await
}

/// Polls the SQL `condition` (one boolean) against `pool` until it holds; fails the test,
/// naming `what`, after 30 s.
async fn wait_for_sql(pool: &PgPool, what: &str, condition: &str) {
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || match sqlx::query_scalar::<_, bool>(condition)
            .fetch_one(pool)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("until {what}")),
            Err(e) => Err(format!("until {what}: {e}")),
        },
    )
    .await;
}

async fn migrated() -> Isolated {
    Isolated::migrated().await
}

async fn new_user(pool: &PgPool) -> Uuid {
    let accounts = Accounts {
        pool: pool.clone(),
        keys: AccountKeys::generate(),
    };
    let email =
        users::Email::parse(&format!("jobs-{}@example.org", Uuid::new_v4().simple())).unwrap();
    users::create_user(&accounts, &email, "user").await.unwrap()
}

/// A session row as the gateway would leave it: `status`, ended (if closed) a minute ago.
async fn session(
    pool: &PgPool,
    user: Uuid,
    exercise: &str,
    data_types: &[&str],
    status: &str,
    deadline_in: &str,
) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO sessions (id, user_id, exercise_id, status, started_at, deadline_at, ended_at)
         SELECT $1, $2, e.id, $4, now() - interval '3 hours', now() + $5::interval,
                CASE WHEN $4 = 'open' THEN NULL ELSE now() - interval '1 minute' END
         FROM exercises e WHERE e.name = $3",
    )
    .bind(id)
    .bind(user)
    .bind(exercise)
    .bind(status)
    .bind(deadline_in)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO session_data_types (session_id, data_type_id) SELECT $1, id FROM data_types WHERE name = ANY($2)",
    )
    .bind(id)
    .bind(data_types)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// A heart-rate session of the HRV exercise, as [`session`] leaves it.
async fn heart_rate_session(pool: &PgPool, user: Uuid, status: &str, deadline_in: &str) -> Uuid {
    session(
        pool,
        user,
        "hrv_biofeedback",
        &["heart_rate"],
        status,
        deadline_in,
    )
    .await
}

/// The number of items a `biofeed jobs run` reports on its standard output.
fn items(run: &Run) -> Value {
    serde_json::from_str::<Value>(run.stdout.trim()).unwrap()["items"].clone()
}

async fn count(stores: &Isolated, sql: &str) -> u64 {
    crate::consumers::clickhouse_count(stores, sql).await
}

type Aggregate = BTreeMap<(u16, i64), (u64, f32, f32, f64)>;

/// Count, min, max and sum per channel and bucket, computed here from the frames sent.
fn aggregate(frames: &[SensorFrame], step_us: i64) -> Aggregate {
    let mut out: Aggregate = BTreeMap::new();
    for frame in frames {
        let channels = usize::from(frame.channels);
        for (i, offset) in frame.offsets_us.iter().enumerate() {
            let t = frame.t0_us + offset;
            let bucket = t.div_euclid(step_us) * step_us;
            for c in 0..channels {
                let v = frame.values[i * channels + c];
                let entry = out
                    .entry((c as u16, bucket))
                    .or_insert((0, f32::MAX, f32::MIN, 0.0));
                entry.0 += 1;
                entry.1 = entry.1.min(v);
                entry.2 = entry.2.max(v);
                entry.3 += f64::from(v);
            }
        }
    }
    out
}

async fn rollups(stores: &Isolated, table: &str, session: Uuid) -> Aggregate {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct RollupRow {
        channel: u16,
        bucket_us: i64,
        count: u64,
        min: f32,
        max: f32,
        sum: f64,
    }
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    let rows: Vec<RollupRow> = ch
        .client()
        .query(&format!(
            "SELECT channel, bucket_us, count, min, max, sum FROM {table} FINAL
             WHERE session_id = toUUID(?) AND data_type = 'eeg' ORDER BY channel, bucket_us"
        ))
        .bind(session.to_string())
        .fetch_all()
        .await
        .unwrap();
    rows.into_iter()
        .map(|r| ((r.channel, r.bucket_us), (r.count, r.min, r.max, r.sum)))
        .collect()
}

fn assert_same(actual: &Aggregate, expected: &Aggregate, what: &str) {
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "{what}: the same buckets"
    );
    for (key, (n, min, max, sum)) in expected {
        let got = actual[key];
        assert_eq!((got.0, got.1, got.2), (*n, *min, *max), "{what} {key:?}");
        assert!(
            (got.3 - sum).abs() <= 1e-9 * sum.abs().max(1.0),
            "{what} {key:?}: {} vs {sum}",
            got.3
        );
    }
}

#[tokio::test]
async fn rollups_equal_an_independent_aggregate_also_after_a_full_replay() {
    let stores = migrated().await;
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let user = new_user(&pool).await;
    let session = session(
        &pool,
        user,
        "alpha_neurofeedback",
        &["eeg"],
        "completed",
        "1 hour",
    )
    .await;
    // 4 s of 8-channel EEG at 256 Hz, straddling a minute boundary, in 4 frames.
    let minute = (now_us() / 60_000_000 - 5) * 60_000_000;
    let frames: Vec<SensorFrame> = (0..4)
        .map(|k| SensorFrame {
            frame_id: Uuid::new_v4(),
            session_id: session,
            user_id: user,
            device_id: Uuid::new_v4(),
            data_type: DataTypeName::parse("eeg").unwrap(),
            channels: 8,
            received_at_us: now_us(),
            t0_us: minute - 2_000_000 + k * 1_000_000,
            offsets_us: (0..256).map(|i| i * 3_906).collect(),
            values: (0..256 * 8)
                .map(|i| (((i as i64 * 7_919 + k * 104_729) % 4_000) as f32 - 2_000.0) / 2.0)
                .collect(),
        })
        .collect();
    produce_frames(&stores, &frames).await;
    let consumer = ConsumerProcess::start(&consumer_env(&stores, &[]));
    wait_for_points(&stores, 1024).await;
    let (code, stderr) = consumer.stop().await;
    assert_eq!(code, 0, "{stderr}");

    let run = jobs(&stores, &["run", "rollups"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(items(&run), 1, "{run:?}");
    let (per_second, per_minute) = (
        aggregate(&frames, 1_000_000),
        aggregate(&frames, 60_000_000),
    );
    assert_eq!(per_second.len(), 8 * 4);
    assert_eq!(per_minute.len(), 8 * 2);
    let expected = [("rollups_1s", &per_second), ("rollups_1m", &per_minute)];
    for (table, aggregate) in expected {
        assert_same(&rollups(&stores, table, session).await, aggregate, table);
    }

    // A full replay writes every row again; the rollups are recomputed and count nothing twice.
    // (Ingest times have a resolution of one second: the replay's must differ from the first.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let replay = run_biofeed(&["replay", "--from", "2000-01-01T00:00:00Z"], &stores.env()).await;
    assert_eq!(replay.code, 0, "{replay:?}");
    assert!(
        count(
            &stores,
            &format!("SELECT count() FROM points WHERE session_id = toUUID('{session}')")
        )
        .await
            >= 1024
    );
    let again = jobs(&stores, &["run", "rollups"]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(items(&again), 1, "recomputed after the replay");
    for (table, aggregate) in expected {
        let what = format!("{table} after replay");
        assert_same(&rollups(&stores, table, session).await, aggregate, &what);
    }
    // Nothing due now: a third run handles nothing.
    let idle = jobs(&stores, &["run", "rollups"]).await;
    assert_eq!(items(&idle), 0, "{idle:?}");
}

#[tokio::test]
async fn session_metrics_equal_hand_computed_values_and_are_read_through_the_policy() {
    let gw = TestGateway::spawn(&[]).await;
    let (owner, stranger) = (gw.sign_up("user", 35).await, gw.sign_up("user", 35).await);
    let practitioner = gw.sign_up("practitioner", 50).await;
    gw.relate(&practitioner, &owner, "practitioner_patient")
        .await;
    let device = gw.device_for(&owner).await;
    let open = |exercise: &'static str, data_type: &'static str| {
        let (http, url, device) = (gw.http.clone(), gw.url.clone(), device.clone());
        async move {
            let open = http
                .post(format!("{url}/v1/sessions"))
                .bearer_auth(&device)
                .json(&json!({ "exercise": exercise, "data_types": [data_type] }));
            send_json(open).await["session_id"]
                .as_str()
                .unwrap()
                .parse::<Uuid>()
                .unwrap()
        }
    };
    let (hrv, oximetry, eeg) = (
        open("hrv_biofeedback", "rr_interval").await,
        open("breath_hold", "spo2").await,
        open("alpha_neurofeedback", "eeg").await,
    );
    let t0 = now_us() - 600_000_000;
    // RR with an ectopic beat (400) and an out-of-range value (3000): accepted 800, 820, 810,
    // 790 → mean 805, SDNN √(500/3), one successive pair (800, 820) → RMSSD 20, pNN50 0.
    let mut t = t0;
    let rr: Vec<(i64, Vec<f32>)> = [800.0f32, 820.0, 400.0, 810.0, 3000.0, 790.0]
        .iter()
        .map(|v| {
            t += (*v as i64) * 1000;
            (t, vec![*v])
        })
        .collect();
    gw.stores
        .insert_points(owner.id, hrv, "rr_interval", &rr)
        .await;
    // SpO2 at 1 Hz with a 60 s gap: mean 91.8, min 88, 4 s below 90 %.
    let spo2: Vec<(i64, Vec<f32>)> = [(0, 97.0), (1, 89.0), (2, 88.0), (62, 89.0), (63, 96.0)]
        .iter()
        .map(|(s, v)| (t0 + s * 1_000_000, vec![*v]))
        .collect();
    gw.stores
        .insert_points(owner.id, oximetry, "spo2", &spo2)
        .await;
    // 8 s of a 10 Hz, 20 µV rhythm on all 8 channels: alpha power 200 µV².
    let eeg_samples: Vec<(i64, Vec<f32>)> = (0..8 * 256)
        .map(|i| {
            let s = f64::from(i) / 256.0;
            let v = (20.0 * (2.0 * std::f64::consts::PI * 10.0 * s).sin()) as f32;
            (t0 + (s * 1e6) as i64, vec![v; 8])
        })
        .collect();
    gw.stores
        .insert_points(owner.id, eeg, "eeg", &eeg_samples)
        .await;
    for session in [hrv, oximetry, eeg] {
        let complete = format!("{}/v1/sessions/{session}/complete", gw.url);
        send_expecting(gw.http.post(complete).bearer_auth(&device), 200).await;
    }
    // Before the job: an empty answer, not an error.
    let (status, before) = gw
        .read(&owner, &format!("/v1/sessions/{hrv}/metrics"))
        .await;
    assert_eq!(status, 200, "{before}");
    assert!(before["metrics"].as_array().unwrap().is_empty() && before["computed_at"].is_null());

    let run = jobs(&gw.stores, &["run", "session-metrics"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let metric = |body: &Value, name: &str, channel: u64| {
        body["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["metric"] == name && m["channel"] == channel)
            .map(|m| m["value"].as_f64().unwrap())
    };
    let (status, body) = gw
        .read(&owner, &format!("/v1/sessions/{hrv}/metrics"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["computed_at"].is_string(), "{body}");
    let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
    assert!(close(metric(&body, "mean_rr_ms", 0), 805.0), "{body}");
    assert!(
        close(metric(&body, "sdnn_ms", 0), (500.0f64 / 3.0).sqrt()),
        "{body}"
    );
    assert!(close(metric(&body, "rmssd_ms", 0), 20.0), "{body}");
    assert!(close(metric(&body, "pnn50_pct", 0), 0.0), "{body}");
    assert!(
        close(metric(&body, "mean_hr_bpm", 0), 60_000.0 / 805.0),
        "{body}"
    );
    let (_, body) = gw
        .read(&owner, &format!("/v1/sessions/{oximetry}/metrics"))
        .await;
    assert!(close(metric(&body, "spo2_mean_pct", 0), 91.8), "{body}");
    assert!(close(metric(&body, "spo2_min_pct", 0), 88.0), "{body}");
    assert!(close(metric(&body, "spo2_below_90_s", 0), 4.0), "{body}");
    let (_, body) = gw
        .read(&practitioner, &format!("/v1/sessions/{eeg}/metrics"))
        .await;
    for channel in 0..8 {
        let alpha = metric(&body, "eeg_alpha_uv2", channel).unwrap();
        assert!(
            (alpha - 200.0).abs() < 4.0,
            "channel {channel}: {alpha} {body}"
        );
        assert!(
            metric(&body, "eeg_beta_uv2", channel).unwrap() < 1.0,
            "{body}"
        );
    }
    // The same policy as every other read: a stranger learns nothing, not even that it exists.
    assert_eq!(
        gw.read(&stranger, &format!("/v1/sessions/{hrv}/metrics"))
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn purge_removes_exactly_the_failed_sessions_points_and_analysts_see_completed_only() {
    let stores = migrated().await;
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let user = new_user(&pool).await;
    let completed = heart_rate_session(&pool, user, "completed", "1 hour").await;
    let aborted = heart_rate_session(&pool, user, "aborted", "1 hour").await;
    let overdue = heart_rate_session(&pool, user, "open", "-1 hour").await;
    let running = heart_rate_session(&pool, user, "open", "1 hour").await;
    let t0 = now_us() - 3_600_000_000;
    for (k, s) in [completed, aborted, overdue, running]
        .into_iter()
        .enumerate()
    {
        let samples: Vec<(i64, Vec<f32>)> = (0..10 + k as i64)
            .map(|i| (t0 + i * 1_000_000, vec![60.0 + i as f32]))
            .collect();
        stores.insert_points(user, s, "heart_rate", &samples).await;
    }
    // The analyst views show the completed session only, before any purge.
    let sync = jobs(&stores, &["run", "analyst-sync"]).await;
    assert_eq!(sync.code, 0, "{sync:?}");
    assert_eq!(
        count(&stores, "SELECT count() FROM completed_sessions").await,
        1
    );
    assert_eq!(
        count(
            &stores,
            &format!(
                "SELECT count() FROM completed_sessions WHERE session_id = toUUID('{completed}')"
            )
        )
        .await,
        1
    );
    assert_eq!(
        count(&stores, "SELECT count() FROM analyst_points").await,
        10
    );
    // Rollups exist for the completed session, and a stray one for the aborted.
    let rolled = jobs(&stores, &["run", "rollups"]).await;
    assert_eq!(rolled.code, 0, "{rolled:?}");
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    ch.client()
        .query(&format!(
            "INSERT INTO rollups_1s (user_id, session_id, data_type, channel, bucket_us, count, min, max, sum, mean, version)
             VALUES (toUUID('{user}'), toUUID('{aborted}'), 'heart_rate', 0, 0, 1, 1, 1, 1, 1, 1)"
        ))
        .execute()
        .await
        .unwrap();

    let purge = jobs(&stores, &["run", "purge"]).await;
    assert_eq!(purge.code, 0, "{purge:?}");
    assert_eq!(items(&purge), 2, "{purge:?}");
    let points_of =
        |s: Uuid| format!("SELECT count() FROM points WHERE session_id = toUUID('{s}')");
    assert_eq!(count(&stores, &points_of(completed)).await, 10);
    assert_eq!(count(&stores, &points_of(aborted)).await, 0);
    assert_eq!(count(&stores, &points_of(overdue)).await, 0);
    assert_eq!(count(&stores, &points_of(running)).await, 13);
    assert_eq!(
        count(
            &stores,
            &format!("SELECT count() FROM rollups_1s WHERE session_id = toUUID('{aborted}')")
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &stores,
            &format!("SELECT count() FROM rollups_1s WHERE session_id = toUUID('{completed}')")
        )
        .await,
        10
    );
    let statuses: Vec<(Uuid, String, Option<String>)> =
        sqlx::query_as("SELECT id, status, purge_reason FROM sessions WHERE user_id = $1")
            .bind(user)
            .fetch_all(&pool)
            .await
            .unwrap();
    let status_of = |s: Uuid| {
        statuses
            .iter()
            .find(|(id, _, _)| *id == s)
            .map(|(_, st, r)| (st.as_str(), r.as_deref()))
            .unwrap()
    };
    assert_eq!(status_of(completed), ("completed", None));
    assert_eq!(status_of(aborted), ("purged", Some("aborted")));
    assert_eq!(status_of(overdue), ("purged", Some("expired")));
    assert_eq!(status_of(running), ("open", None));
    // Running it again purges nothing more.
    let again = jobs(&stores, &["run", "purge"]).await;
    assert_eq!(items(&again), 0);
    assert_eq!(count(&stores, &points_of(completed)).await, 10);
}

#[tokio::test]
async fn with_clickhouse_down_a_job_leaves_a_failed_row_and_retry_resolves_it() {
    let mut clickhouse = crate::private_clickhouse::PrivateClickHouse::start().await;
    let stores = Isolated::migrated_with(|settings| {
        settings.stores.clickhouse.url = clickhouse.url().parse().unwrap();
    })
    .await;
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let (erased, kept) = (new_user(&pool).await, new_user(&pool).await);
    for user in [erased, kept] {
        let samples: Vec<(i64, Vec<f32>)> = (0..5)
            .map(|i| (now_us() - i * 1_000_000, vec![70.0]))
            .collect();
        stores
            .insert_points(user, Uuid::new_v4(), "heart_rate", &samples)
            .await;
    }
    sqlx::query("INSERT INTO erased_users (user_id) VALUES ($1)")
        .bind(erased)
        .execute(&pool)
        .await
        .unwrap();

    clickhouse.kill();
    let failed = jobs(&stores, &["run", "erasure"]).await;
    assert_eq!(failed.code, 3, "ClickHouse unavailable: {failed:?}");
    assert!(failed.stderr.contains("clickhouse"), "{failed:?}");
    let listed = jobs(&stores, &["failed", "--json"]).await;
    assert_eq!(listed.code, 0, "{listed:?}");
    let rows = json_lines(&listed.stdout);
    assert_eq!(rows.len(), 1, "{listed:?}");
    assert_eq!(
        (rows[0]["job"].as_str(), rows[0]["connection"].as_str()),
        (Some("erasure"), Some("clickhouse"))
    );
    assert!(!rows[0]["error"].as_str().unwrap().is_empty());
    assert!(rows[0]["resolved_at"].is_null());
    // Still down: a retry fails again and counts the attempt.
    let still = jobs(&stores, &["retry", "--all"]).await;
    assert_ne!(still.code, 0, "{still:?}");
    let table = jobs(&stores, &["failed"]).await;
    assert!(
        table.stdout.contains("erasure") && table.stdout.contains("clickhouse"),
        "{table:?}"
    );

    clickhouse.restart().await;
    let id = rows[0]["id"].as_i64().unwrap().to_string();
    let retried = jobs(&stores, &["retry", &id]).await;
    assert_eq!(retried.code, 0, "{retried:?}");
    let all = jobs(&stores, &["failed", "--all", "--json"]).await;
    let row: Value = serde_json::from_str(all.stdout.lines().next().unwrap()).unwrap();
    assert!(row["resolved_at"].is_string(), "marked resolved: {row}");
    assert_eq!(row["attempts"], 2, "{row}");
    assert!(jobs(&stores, &["failed", "--json"])
        .await
        .stdout
        .trim()
        .is_empty());
    // And the erasure really happened: the erased user's rows are gone, the other's are not.
    assert_eq!(
        count(
            &stores,
            &format!("SELECT count() FROM points WHERE user_id = toUUID('{erased}')")
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &stores,
            &format!("SELECT count() FROM points WHERE user_id = toUUID('{kept}')")
        )
        .await,
        5
    );
    let done: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT clickhouse_deleted_at FROM erased_users WHERE user_id = $1")
            .bind(erased)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(done.is_some());
    // Bad arguments are named.
    let bad = jobs(&stores, &["retry", "x"]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    let unknown = jobs(&stores, &["retry", "999999"]).await;
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(
        unknown
            .stderr
            .contains("no unresolved failed job with id 999999"),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn two_runners_side_by_side_never_run_the_same_job_at_once() {
    let stores = migrated().await;
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let user = new_user(&pool).await;
    for _ in 0..3 {
        let s = heart_rate_session(&pool, user, "completed", "1 hour").await;
        stores
            .insert_points(user, s, "heart_rate", &[(now_us(), vec![60.0])])
            .await;
    }
    let mut env = jobs_env_with(
        &stores,
        &[
            ("BIOFEED_JOBS_METRICS_LISTEN", "127.0.0.1:0"),
            ("BIOFEED_JOBS_ROLLUPS_INTERVAL", "20ms"),
            ("BIOFEED_JOBS_METRICS_INTERVAL", "20ms"),
            ("BIOFEED_JOBS_PURGE_INTERVAL", "20ms"),
            ("BIOFEED_JOBS_ERASURE_INTERVAL", "20ms"),
            ("BIOFEED_JOBS_SYNC_INTERVAL", "20ms"),
            ("BIOFEED_JOBS_CONCURRENCY", "3"),
        ],
    );
    let b = BiofeedProcess::start(&["jobs"], &env);
    let port = crate::helpers::free_port();
    env.retain(|(k, _)| *k != "BIOFEED_JOBS_METRICS_LISTEN");
    env.push(("BIOFEED_JOBS_METRICS_LISTEN", format!("127.0.0.1:{port}")));
    let a = BiofeedProcess::start(&["jobs"], &env);
    // Until both runners have worked: every job finished twice at least, by either runner, the
    // three sessions computed, and runner a's metrics show it.
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "both runners ran every job twice and computed the sessions",
        async || {
            let (jobs, runners, computed): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM (SELECT job FROM job_runs WHERE finished_at IS NOT NULL
                                               GROUP BY job HAVING count(*) >= 2) AS twice),
                        (SELECT count(DISTINCT runner) FROM job_runs),
                        (SELECT count(*) FROM session_computations
                         WHERE rollups_at IS NOT NULL AND metrics_at IS NOT NULL)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            let metrics = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            jobs == 5
                && runners == 2
                && computed == 3
                && metrics.contains("biofeed_jobs_runs_total{job=\"rollups\",outcome=\"ok\"}")
                && metrics.contains("biofeed_jobs_run_duration_seconds_bucket")
        },
    )
    .await;
    let ((code_a, log_a), (code_b, log_b)) = (a.stop().await, b.stop().await);
    assert_eq!((code_a, code_b), (0, 0), "{log_a}\n{log_b}");

    #[derive(Debug, sqlx::FromRow)]
    struct JobRun {
        job: String,
        runner: String,
        started_at: chrono::DateTime<chrono::Utc>,
        finished_at: Option<chrono::DateTime<chrono::Utc>>,
        outcome: Option<String>,
    }
    let runs: Vec<JobRun> = sqlx::query_as(
        "SELECT job, runner, started_at, finished_at, outcome FROM job_runs ORDER BY job, started_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(runs.len() >= 10, "both runners worked: {runs:?}");
    for job in [
        "rollups",
        "session_metrics",
        "purge",
        "erasure",
        "analyst_sync",
    ] {
        let of_job: Vec<_> = runs.iter().filter(|r| r.job == job).collect();
        assert!(of_job.len() >= 2, "{job} ran on its interval: {of_job:?}");
        for pair in of_job.windows(2) {
            let finished = pair[0]
                .finished_at
                .expect("every run finished before the runners stopped");
            assert!(
                finished <= pair[1].started_at,
                "{job}: a run started before the previous one finished: {pair:?}"
            );
        }
    }
    assert!(
        runs.iter().all(|r| r.outcome.as_deref() == Some("ok")),
        "{runs:?}"
    );
    let runners: std::collections::BTreeSet<&str> =
        runs.iter().map(|r| r.runner.as_str()).collect();
    assert_eq!(runners.len(), 2, "both runners took work: {runners:?}");
    let computed = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM session_computations WHERE rollups_at IS NOT NULL AND metrics_at IS NOT NULL");
    assert_eq!(computed.fetch_one(&pool).await.unwrap(), 3);
}

#[tokio::test]
async fn a_runner_whose_lease_is_taken_over_stops_its_job() {
    let stores = migrated().await;
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let user = new_user(&pool).await;
    heart_rate_session(&pool, user, "completed", "1 hour").await;
    // The analyst sync blocks on its read of `sessions` for as long as this transaction holds
    // the table: a job that runs for as long as the test wants, with nothing in it for tests.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let env = jobs_env_with(&stores, &[("BIOFEED_JOBS_LEASE", "3s")]);
    let child = BiofeedProcess::start(&["jobs", "run", "analyst-sync"], &env);
    // Asked as the jobs' own role: pg_stat_activity shows a role the query text of its own
    // sessions only.
    let as_jobs = stores
        .settings_as(crate::helpers::Role::Jobs)
        .stores
        .postgres
        .connect()
        .await
        .unwrap();
    wait_for_sql(
        &as_jobs,
        "the sync waits for the sessions",
        "SELECT EXISTS (SELECT 1 FROM job_runs WHERE job = 'analyst_sync')
                    AND EXISTS (SELECT 1 FROM pg_stat_activity
                                WHERE datname = current_database() AND wait_event_type = 'Lock'
                                  AND query LIKE '%FROM sessions s JOIN exercises%')",
    )
    .await;
    // Another runner takes the lease over (as if this one's had expired and been claimed).
    let stolen = sqlx::query(
        "UPDATE job_schedule SET leased_by = 'another-runner', lease_until = now() + interval '1 hour'
         WHERE job = 'analyst_sync'",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(stolen.rows_affected(), 1);

    // The runner notices at its next renewal (a second here) and stops the job, which would
    // otherwise wait for the lock as long as the test holds it.
    let run = child
        .wait_within(
            Duration::from_secs(30),
            "the job was stopped when its lease was taken over",
        )
        .await;
    let stderr = run.stderr;
    assert_eq!(run.code, 1, "{stderr}");
    assert!(
        stderr.contains("lease of analyst_sync was taken over by another runner"),
        "{stderr}"
    );
    let (finished, outcome): (Option<chrono::DateTime<chrono::Utc>>, Option<String>) =
        sqlx::query_as("SELECT finished_at, outcome FROM job_runs WHERE job = 'analyst_sync'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        finished.is_some() && outcome.is_none(),
        "stopped, neither done nor failed: {finished:?} {outcome:?}"
    );
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM failed_jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failed, 0, "losing the lease is not the job's failure");
    let holder: Option<String> =
        sqlx::query_scalar("SELECT leased_by FROM job_schedule WHERE job = 'analyst_sync'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        holder.as_deref(),
        Some("another-runner"),
        "left to its holder"
    );
    lock.rollback().await.unwrap();
    assert_eq!(
        count(&stores, "SELECT count() FROM session_facts").await,
        0,
        "the stopped job sent nothing"
    );
}

#[tokio::test]
async fn a_panicking_job_is_recorded_as_failed_its_lease_released_and_the_runner_goes_on() {
    let stores = migrated().await;
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let env = jobs_env_with(
        &stores,
        &[
            ("BIOFEED_JOBS_METRICS_LISTEN", "127.0.0.1:0"),
            // Held for an hour unless released; no automatic retry nor second run meanwhile.
            ("BIOFEED_JOBS_LEASE", "1h"),
            ("BIOFEED_JOBS_RETRY_BACKOFF", "1h"),
            ("BIOFEED_JOBS_SYNC_INTERVAL", "1h"),
            ("BIOFEED_JOBS_ROLLUPS_INTERVAL", "100ms"),
            // The `testsuite` feature's fault injection: every analyst sync in this runner panics.
            ("BIOFEED_TESTSUITE_PANIC_JOB", "analyst_sync"),
        ],
    );
    let runner = BiofeedProcess::start(&["jobs"], &env);
    wait_for_sql(
        &pool,
        "the panic is a failed job and the lease is free",
        "SELECT EXISTS (SELECT 1 FROM failed_jobs WHERE job = 'analyst_sync')
                    AND (SELECT leased_by IS NULL FROM job_schedule WHERE job = 'analyst_sync')",
    )
    .await;
    let (connection, error, attempts): (String, String, i32) = sqlx::query_as(
        "SELECT connection, error, attempts FROM failed_jobs WHERE job = 'analyst_sync'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((connection.as_str(), attempts), ("none", 1), "{error}");
    assert!(
        error.starts_with("panicked: testsuite: analyst_sync panics"),
        "{error}"
    );
    let outcome: Option<String> =
        sqlx::query_scalar("SELECT outcome FROM job_runs WHERE job = 'analyst_sync'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(outcome.as_deref(), Some("failed"));

    // Another claim takes the job at once (a held lease would make it wait for an hour).
    let once = jobs_env_with(&stores, &[("BIOFEED_JOBS_LEASE", "1h")]);
    let run = tokio::time::timeout(
        Duration::from_secs(30),
        run_biofeed(&["jobs", "run", "analyst-sync"], &once),
    )
    .await
    .expect("the lease was free");
    assert_eq!(run.code, 0, "{run:?}");

    // The runner goes on serving: its rollups keep running after the panic.
    wait_for_sql(&pool, "the runner runs jobs after the panic", "SELECT EXISTS (SELECT 1 FROM job_runs WHERE job = 'rollups' AND outcome = 'ok'
                                  AND started_at > (SELECT failed_at FROM failed_jobs WHERE job = 'analyst_sync'))").await;
    let (code, log) = runner.stop().await;
    assert_eq!(code, 0, "{log}");
}

#[tokio::test]
async fn analyst_sync_sends_every_session_changed_inside_its_overlap_window_however_many() {
    let stores = migrated().await;
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let user = new_user(&pool).await;
    // One more session than a page holds, all stamped within 60 ms: inside one overlap window.
    let sessions = biofeed_jobs::jobs::SYNC_BATCH + 1;
    sqlx::query(
        "INSERT INTO sessions (id, user_id, exercise_id, status, started_at, deadline_at, ended_at, updated_at)
         SELECT gen_random_uuid(), $1, e.id, 'completed', now() - interval '3 hours',
                now() + interval '1 hour', now() - interval '1 minute',
                now() + i * interval '1 microsecond'
         FROM exercises e, generate_series(1, $2) AS i WHERE e.name = 'hrv_biofeedback'",
    )
    .bind(user)
    .bind(i64::try_from(sessions).unwrap())
    .execute(&pool)
    .await
    .unwrap();
    let sync = jobs(&stores, &["run", "analyst-sync"]).await;
    assert_eq!(sync.code, 0, "{sync:?}");
    assert_eq!(items(&sync), sessions, "{sync:?}");
    assert_eq!(
        count(&stores, "SELECT uniqExact(session_id) FROM session_facts").await,
        sessions
    );
    // And it goes on from there: a session that changes afterwards is mirrored by the next run.
    let changed: Uuid = sqlx::query_scalar(
        "UPDATE sessions SET status = 'purged', purge_reason = 'aborted', purged_at = now(),
                updated_at = clock_timestamp()
         WHERE id = (SELECT id FROM sessions ORDER BY updated_at LIMIT 1) RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let again = jobs(&stores, &["run", "analyst-sync"]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(
        count(
            &stores,
            &format!(
                "SELECT count() FROM session_facts FINAL
                 WHERE session_id = toUUID('{changed}') AND status = 'purged'"
            )
        )
        .await,
        1
    );
    assert_eq!(
        count(&stores, "SELECT count() FROM completed_sessions").await,
        sessions - 1
    );
}
