//! The ingest gateway over HTTP, against the real Postgres and Kafka.

use biofeed_schema::{DataTypeName, SensorFrame};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::gateway_app::{now_us, TestGateway};
use crate::helpers::{metrics_text, send_expecting};

/// A JSON frame of `n` samples, 1 ms apart, ending now, with `channels` values each.
pub(crate) fn json_frame(data_type: &str, n: usize, channels: usize, value: f32) -> (Uuid, Value) {
    let frame_id = Uuid::new_v4();
    let end = now_us();
    let timestamps: Vec<i64> = (0..n as i64)
        .map(|i| end - (n as i64 - i) * 1_000)
        .collect();
    let values: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            (0..channels)
                .map(|c| value + (i * channels + c) as f32 * 0.001)
                .collect()
        })
        .collect();
    (
        frame_id,
        json!({ "frame_id": frame_id, "data_type": data_type, "timestamps_us": timestamps, "values": values }),
    )
}

async fn problem(response: reqwest::Response) -> (u16, Value, reqwest::header::HeaderMap) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let content_type = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert_eq!(content_type, "application/problem+json", "{status} {body}");
        assert_eq!(body["status"], status, "{body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
    }
    (status, body, headers)
}

#[tokio::test]
async fn posted_frames_reach_kafka_exactly_as_sent_keyed_by_session() {
    let gw = TestGateway::spawn(&[]).await;
    let session = gw.open_session("alpha_neurofeedback", &["eeg"]).await;

    // JSON: 250 samples of 8 channels.
    let (json_id, body) = json_frame("eeg", 250, 8, -10.0);
    let response = gw
        .post(&format!("/v1/sessions/{session}/points"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, accepted, _) = problem(response).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["points"], 250);

    // Avro, gzip-compressed: the device's own user/device ids are replaced by the gateway's.
    let t0 = now_us() - 1_000_000;
    let avro = SensorFrame {
        frame_id: Uuid::new_v4(),
        session_id: session,
        user_id: Uuid::nil(),
        device_id: Uuid::nil(),
        data_type: DataTypeName::parse("eeg").unwrap(),
        channels: 8,
        received_at_us: 0,
        t0_us: t0,
        offsets_us: (0..100).map(|i| i * 3_906).collect(),
        values: (0..800).map(|i| i as f32 * 0.5 - 200.0).collect(),
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &biofeed_schema::encode(&avro)).unwrap();
    let response = gw
        .post(&format!("/v1/sessions/{session}/points"))
        .header("content-type", "application/avro")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());

    let messages = gw.topic_messages().await;
    assert_eq!(messages.len(), 2);
    let frames: Vec<SensorFrame> = messages
        .iter()
        .map(|(key, value)| {
            assert_eq!(key, &session.to_string(), "keyed by session");
            crate::helpers::decode_frame(value)
        })
        .collect();
    let from_json = frames
        .iter()
        .find(|f| f.frame_id == json_id)
        .expect("the JSON frame");
    assert_eq!(from_json.session_id, session);
    assert_eq!(
        (from_json.user_id, from_json.device_id),
        (gw.user, gw.device)
    );
    assert_eq!(from_json.channels, 8);
    let sent_values: Vec<f32> = body["values"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    assert_eq!(from_json.values, sent_values);
    let sent_times: Vec<i64> = body["timestamps_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    let got_times: Vec<i64> = (0..from_json.samples())
        .map(|i| from_json.time_us(i).unwrap())
        .collect();
    assert_eq!(got_times, sent_times);

    let from_avro = frames
        .iter()
        .find(|f| f.frame_id == avro.frame_id)
        .expect("the Avro frame");
    assert_eq!(
        (from_avro.user_id, from_avro.device_id),
        (gw.user, gw.device)
    );
    assert!(from_avro.received_at_us > 0);
    assert_eq!(
        SensorFrame {
            user_id: Uuid::nil(),
            device_id: Uuid::nil(),
            received_at_us: 0,
            ..from_avro.clone()
        },
        avro
    );
}

#[tokio::test]
async fn a_message_from_the_topic_decodes_with_python_fastavro_using_only_the_avsc() {
    // Single-object framing names its schema by fingerprint: no registry needed to read it.
    let gw = TestGateway::spawn(&["--framing", "single-object"]).await;
    let session = gw.open_session("breath_hold", &["spo2", "ppg"]).await;
    let (frame_id, body) = json_frame("ppg", 5, 2, 100.0);
    let response = gw
        .post(&format!("/v1/sessions/{session}/points"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let messages = gw.topic_messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(&messages[0].1[..2], &[0xC3, 0x01], "single-object framing");

    let dir = std::env::temp_dir().join(format!("biofeed-fastavro-{}", gw.stores.id));
    std::fs::create_dir_all(&dir).unwrap();
    let message = dir.join("message.bin");
    std::fs::write(&message, &messages[0].1).unwrap();
    let python = std::env::var("BIOFEED_TEST_PYTHON")
        .unwrap_or_else(|_| ".state/venv/bin/python".to_owned());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(&python)
        .arg(root.join("tests/python/decode_frame.py"))
        .arg(root.join("schema/avro/sensor_frame.v1.avsc"))
        .arg(&message)
        .output()
        .unwrap_or_else(|e| panic!("{python} runs (compose/local test installs it): {e}"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let decoded: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(decoded["frame_id"], frame_id.to_string());
    assert_eq!(decoded["session_id"], session.to_string());
    assert_eq!(decoded["user_id"], gw.user.to_string());
    assert_eq!(decoded["data_type"], "ppg");
    assert_eq!(decoded["channels"], 2);
    let times: Vec<i64> = decoded["offsets_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| decoded["t0_us"].as_i64().unwrap() + o.as_i64().unwrap())
        .collect();
    assert_eq!(
        times,
        body["timestamps_us"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect::<Vec<_>>()
    );
    let values: Vec<f32> = decoded["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let sent: Vec<f32> = body["values"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    assert_eq!(values, sent);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn every_bad_input_gets_its_problem_and_produces_nothing() {
    let gw = TestGateway::spawn(&[
        "--max-body-bytes",
        "65536",
        "--max-samples-per-frame",
        "1000",
    ])
    .await;
    let session = gw
        .open_session("hrv_biofeedback", &["rr_interval", "heart_rate"])
        .await;
    let points = format!("/v1/sessions/{session}/points");

    // One good frame first: it must stay untouched by everything below.
    let (good_id, good) = json_frame("rr_interval", 10, 1, 800.0);
    assert_eq!(
        gw.post(&points).json(&good).send().await.unwrap().status(),
        202
    );

    let now = now_us();
    let frame = |data_type: &str, times: Vec<i64>, values: Value| json!({ "frame_id": Uuid::new_v4(), "data_type": data_type, "timestamps_us": times, "values": values });
    let raw = |body: &str| body.as_bytes().to_vec();
    let json_ct = ("content-type", "application/json");
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, Option<&str>)> = vec![
        (
            "no token",
            gw.http.post(format!("{}{points}", gw.url)).json(&good),
            401,
            None,
        ),
        (
            "unknown token",
            gw.http
                .post(format!("{}{points}", gw.url))
                .bearer_auth("bfd_nope")
                .json(&good),
            401,
            None,
        ),
        (
            "malformed JSON",
            gw.post(&points)
                .header(json_ct.0, json_ct.1)
                .body(raw("{\"frame_id\": ")),
            400,
            None,
        ),
        (
            "wrong shape",
            gw.post(&points)
                .header(json_ct.0, json_ct.1)
                .body(raw("{\"frame_id\": 3}")),
            400,
            None,
        ),
        (
            "ragged rows",
            gw.post(&points).json(&frame(
                "rr_interval",
                vec![now - 2, now - 1],
                json!([[800.0], [800.0, 1.0]]),
            )),
            400,
            None,
        ),
        (
            "unknown session",
            gw.post(&format!("/v1/sessions/{}/points", Uuid::new_v4()))
                .json(&good),
            404,
            None,
        ),
        (
            "malformed session id",
            gw.post("/v1/sessions/not-a-uuid/points").json(&good),
            404,
            None,
        ),
        (
            "undeclared data type",
            gw.post(&points)
                .json(&frame("eeg", vec![now - 1], json!([vec![1.0; 8]]))),
            422,
            Some("data_type"),
        ),
        (
            "wrong channel count",
            gw.post(&points)
                .json(&frame("rr_interval", vec![now - 1], json!([[800.0, 1.0]]))),
            422,
            Some("values"),
        ),
        (
            "out of range",
            gw.post(&points).json(&frame(
                "rr_interval",
                vec![now - 2, now - 1],
                json!([[800.0], [9000.0]]),
            )),
            422,
            Some("values/1/0"),
        ),
        (
            "not finite",
            gw.post(&points)
                .json(&frame("heart_rate", vec![now - 1], json!([[1e39]]))),
            422,
            Some("values/0/0"),
        ),
        (
            "unordered",
            gw.post(&points).json(&frame(
                "rr_interval",
                vec![now - 1, now - 2],
                json!([[800.0], [800.0]]),
            )),
            422,
            Some("timestamps_us/1"),
        ),
        (
            "before the session",
            gw.post(&points).json(&frame(
                "rr_interval",
                vec![now - 3_600_000_000],
                json!([[800.0]]),
            )),
            422,
            Some("timestamps_us/0"),
        ),
        (
            "in the future",
            gw.post(&points).json(&frame(
                "rr_interval",
                vec![now + 60_000_000],
                json!([[800.0]]),
            )),
            422,
            Some("timestamps_us/0"),
        ),
        (
            "rows and times differ",
            gw.post(&points).json(&frame(
                "rr_interval",
                vec![now - 1],
                json!([[800.0], [800.0]]),
            )),
            422,
            Some("values"),
        ),
        (
            "empty",
            gw.post(&points)
                .json(&frame("rr_interval", vec![], json!([]))),
            422,
            Some("timestamps_us"),
        ),
        (
            "too many samples",
            gw.post(&points).json(&frame(
                "heart_rate",
                (0..1001).map(|i| now - 2000 + i).collect(),
                json!(vec![[60.0]; 1001]),
            )),
            413,
            None,
        ),
        (
            "too large a body",
            gw.post(&points)
                .header(json_ct.0, json_ct.1)
                .body(vec![b' '; 70_000]),
            413,
            None,
        ),
        (
            "unsupported type",
            gw.post(&points)
                .header("content-type", "text/csv")
                .body(raw("t,v\n1,2")),
            415,
            None,
        ),
        (
            "unsupported encoding",
            gw.post(&points)
                .header(json_ct.0, json_ct.1)
                .header("content-encoding", "br")
                .body(raw("{}")),
            415,
            None,
        ),
        (
            "corrupt gzip",
            gw.post(&points)
                .header(json_ct.0, json_ct.1)
                .header("content-encoding", "gzip")
                .body(raw("not gzip")),
            400,
            None,
        ),
        (
            "truncated avro",
            gw.post(&points)
                .header("content-type", "application/avro")
                .body(vec![0xC3, 0x01, 1, 2]),
            400,
            None,
        ),
        (
            "not avro",
            gw.post(&points)
                .header("content-type", "application/avro")
                .body(raw("{\"frame_id\": 1}")),
            400,
            None,
        ),
    ];
    for (name, request, expected, field) in cases {
        let (status, body, headers) = problem(request.send().await.unwrap()).await;
        assert_eq!(status, expected, "{name}: {body}");
        if let Some(field) = field {
            assert_eq!(body["field"], field, "{name}: {body}");
        }
        if expected == 401 {
            assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer", "{name}");
        }
    }

    // A gzip bomb: 64 KiB limit, 10 MB of zeros compressed to a few KiB.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &vec![b' '; 10_000_000]).unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 65536);
    let response = gw
        .post(&points)
        .header(json_ct.0, json_ct.1)
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(problem(response).await.0, 413);

    // Avro for another session is refused too.
    let other = gw.open_session("hrv_biofeedback", &["rr_interval"]).await;
    let avro = SensorFrame {
        frame_id: Uuid::new_v4(),
        session_id: other,
        user_id: Uuid::nil(),
        device_id: Uuid::nil(),
        data_type: DataTypeName::parse("rr_interval").unwrap(),
        channels: 1,
        received_at_us: 0,
        t0_us: now - 1000,
        offsets_us: vec![0],
        values: vec![800.0],
    };
    let response = gw
        .post(&points)
        .header("content-type", "application/avro")
        .body(biofeed_schema::encode(&avro))
        .send()
        .await
        .unwrap();
    let (status, body, _) = problem(response).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("session_id")),
        "{body}"
    );

    // Nothing but the good frame reached Kafka, and the gateway still serves.
    let (later_id, later) = json_frame("heart_rate", 3, 1, 70.0);
    assert_eq!(
        gw.post(&points).json(&later).send().await.unwrap().status(),
        202
    );
    let frames: Vec<SensorFrame> = gw
        .topic_messages()
        .await
        .iter()
        .map(|(_, v)| crate::helpers::decode_frame(v))
        .collect();
    let ids: Vec<Uuid> = frames.iter().map(|f| f.frame_id).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&good_id) && ids.contains(&later_id));
    assert_eq!(
        frames
            .iter()
            .find(|f| f.frame_id == good_id)
            .unwrap()
            .values
            .len(),
        10
    );

    // The metrics counted the refusals by reason.
    let metrics = metrics_text(&gw.url).await;
    assert!(
        metrics.contains("biofeed_gateway_points_rejected_total{reason=\"invalid-value\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("biofeed_gateway_points_accepted_total 13"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sessions_close_once_and_then_take_no_points() {
    let gw = TestGateway::spawn(&[]).await;
    let session = gw.open_session("relaxation", &["eda"]).await;
    let response = gw
        .post(&format!("/v1/sessions/{session}/complete"))
        .json(&json!({ "feedback": { "feeling": "calm", "rating": 4 } }))
        .send()
        .await
        .unwrap();
    let (status, body, _) = problem(response).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("completed")),
        "{body}"
    );
    let (status, body, _) = problem(
        gw.post(&format!("/v1/sessions/{session}/abort"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (_, frame) = json_frame("eda", 2, 1, 5.0);
    let (status, _, _) = problem(
        gw.post(&format!("/v1/sessions/{session}/points"))
            .json(&frame)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409);

    let pool = gw.stores.settings.stores.postgres.connect().await.unwrap();
    let (status, feedback): (String, Value) =
        sqlx::query_as("SELECT status, feedback FROM sessions WHERE id = $1")
            .bind(session)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), &feedback["rating"]),
        ("completed", &json!(4))
    );

    let aborted = gw.open_session("relaxation", &["eda"]).await;
    let (status, body, _) = problem(
        gw.post(&format!("/v1/sessions/{aborted}/abort"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("aborted")));

    // Opening needs a known exercise and data types it tracks.
    for (body, field) in [
        (
            json!({ "exercise": "juggling", "data_types": ["eeg"] }),
            "exercise",
        ),
        (
            json!({ "exercise": "relaxation", "data_types": ["eeg"] }),
            "data_types/0",
        ),
        (
            json!({ "exercise": "relaxation", "data_types": ["nonsense"] }),
            "data_types/0",
        ),
        (
            json!({ "exercise": "relaxation", "data_types": [] }),
            "data_types",
        ),
    ] {
        let (status, problem_body, _) =
            problem(gw.post("/v1/sessions").json(&body).send().await.unwrap()).await;
        assert_eq!(
            (status, problem_body["field"].as_str()),
            (422, Some(field)),
            "{problem_body}"
        );
    }
}

#[tokio::test]
async fn a_repost_of_an_accepted_frame_is_accepted_once() {
    let gw = TestGateway::spawn(&[]).await;
    let session = gw.open_session("breath_hold", &["spo2"]).await;
    let (frame_id, frame) = json_frame("spo2", 4, 1, 97.0);
    let points = format!("/v1/sessions/{session}/points");
    send_expecting(gw.post(&points).json(&frame), 202).await;
    let second = send_expecting(gw.post(&points).json(&frame), 200).await;
    let body: Value = second.json().await.unwrap();
    assert_eq!(
        (body["frame_id"].as_str(), body["duplicate"].as_bool()),
        (Some(frame_id.to_string().as_str()), Some(true))
    );
    assert_eq!(gw.topic_messages().await.len(), 1);
}

#[tokio::test]
async fn a_revoked_token_gets_401_and_another_users_session_404() {
    let gw = TestGateway::spawn(&[]).await;
    let session = gw.open_session("hrv_biofeedback", &["rr_interval"]).await;

    // Another user's device cannot see the session.
    let accounts = gw.accounts().await;
    let email =
        biofeed_accounts::users::Email::parse(&format!("other-{}@example.org", gw.stores.id))
            .unwrap();
    let other = biofeed_accounts::users::create_user(&accounts, &email, "user")
        .await
        .unwrap();
    let other_device = biofeed_accounts::devices::create_device(&accounts.pool, other, "")
        .await
        .unwrap();
    let (_, frame) = json_frame("rr_interval", 2, 1, 800.0);
    for (path, body) in [
        ("points", frame.clone()),
        ("complete", json!({})),
        ("abort", json!({})),
    ] {
        let response = gw
            .http
            .post(format!("{}/v1/sessions/{session}/{path}", gw.url))
            .bearer_auth(&other_device.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(problem(response).await.0, 404, "{path}");
    }

    // Revoked through the CLI: the token stops working (within the auth cache TTL).
    let run = gw
        .stores
        .biofeed(&["admin", "device", "revoke", &gw.device.to_string()])
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let response = gw
            .post(&format!("/v1/sessions/{session}/points"))
            .json(&frame)
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            401 => break,
            202 | 200 => assert!(
                tokio::time::Instant::now() < deadline,
                "revocation never took effect"
            ),
            other => panic!("unexpected {other}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_cli_makes_users_and_devices_whose_tokens_work() {
    let gw = TestGateway::spawn(&[]).await;
    let keys = [
        ("BIOFEED_MASTER_KEY", gw.keys.master_key().to_base64()),
        (
            "BIOFEED_BLIND_INDEX_KEY",
            gw.keys.blind_index_key.to_base64(),
        ),
    ];
    let env: Vec<(&str, String)> = gw
        .stores
        .env()
        .into_iter()
        .chain(keys.iter().cloned())
        .collect();
    let email = format!("Grace-{}@Example.org", gw.stores.id);
    let created =
        crate::helpers::run_biofeed(&["admin", "user", "create", "--email", &email], &env).await;
    assert_eq!(created.code, 0, "{created:?}");
    let user: Uuid = created.stdout.trim().parse().unwrap();
    assert!(
        !created.stderr.contains(&email) && !created.stdout.contains(&email),
        "no plaintext email in output"
    );

    // Found by email, whatever its case.
    let device = crate::helpers::run_biofeed(
        &[
            "admin",
            "device",
            "create",
            "--user",
            &email.to_lowercase(),
            "--model",
            "Polar H10",
        ],
        &env,
    )
    .await;
    assert_eq!(device.code, 0, "{device:?}");
    let token = device.stdout.trim().to_owned();
    assert!(token.starts_with("bfd_") && token.len() > 40, "{token}");

    let response = gw
        .http
        .post(format!("{}/v1/sessions", gw.url))
        .bearer_auth(&token)
        .json(&json!({ "exercise": "hrv_biofeedback", "data_types": ["rr_interval"], "location": "Kitchen table, 12 Elm St" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    // Postgres holds neither the token nor the email nor the location in clear.
    let pool = gw.stores.settings.stores.postgres.connect().await.unwrap();
    let dump: String = sqlx::query_scalar(
        "SELECT string_agg(t::text, ' ') FROM (SELECT u::text AS t FROM users u UNION ALL SELECT d::text FROM devices d
         UNION ALL SELECT s::text FROM sessions s) x",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    for secret in [token.as_str(), "Elm St", &email.to_lowercase(), "Grace"] {
        assert!(!dump.contains(secret), "{secret} stored in clear");
    }
    assert_eq!(
        biofeed_accounts::users::email_of(&gw.accounts().await, user)
            .await
            .unwrap(),
        email
    );

    let list = crate::helpers::run_biofeed(
        &["admin", "device", "list", "--user-id", &user.to_string()],
        &env,
    )
    .await;
    assert_eq!(list.code, 0, "{list:?}");
    assert!(
        list.stdout.contains("Polar H10") && !list.stdout.contains(&token),
        "{list:?}"
    );

    let bad = crate::helpers::run_biofeed(
        &["admin", "user", "create", "--email", "not-an-email"],
        &env,
    )
    .await;
    assert_eq!(bad.code, 2, "a bad argument: {bad:?}");
    assert!(
        bad.stderr.contains("email:") && !bad.stderr.contains("not-an-email"),
        "{bad:?}"
    );
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi_are_served() {
    let gw = TestGateway::spawn(&[]).await;
    let get = |path: &str| gw.http.get(format!("{}{path}", gw.url)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({ "postgres": "ok", "kafka": "ok", "clickhouse": "ok" })
    );
    let openapi: Value = get("/openapi.json").await.unwrap().json().await.unwrap();
    for path in [
        "/v1/sessions",
        "/v1/sessions/{id}/points",
        "/v1/sessions/{id}/complete",
        "/v1/sessions/{id}/abort",
    ] {
        assert!(
            openapi["paths"][path]["post"].is_object(),
            "{path} documented"
        );
    }
    for (path, method) in [
        ("/v1/users", "post"),
        ("/v1/auth/login", "post"),
        ("/v1/auth/logout", "post"),
        ("/v1/me", "get"),
        ("/v1/me", "patch"),
        ("/v1/me", "delete"),
        ("/v1/me/export", "get"),
        ("/v1/relationships", "post"),
        ("/v1/relationships", "get"),
        ("/v1/relationships/{id}/accept", "post"),
        ("/v1/relationships/{id}/revoke", "post"),
        ("/v1/users/{id}/sessions", "get"),
        ("/v1/sessions/{id}", "get"),
        ("/v1/sessions/{id}/points", "get"),
        ("/v1/users/{id}/access-log", "get"),
    ] {
        assert!(
            openapi["paths"][path][method].is_object(),
            "{method} {path} documented"
        );
    }
    assert!(openapi["components"]["schemas"]["JsonFrame"].is_object());
    assert!(openapi["components"]["securitySchemes"]["login_token"].is_object());
    let (status, _, _) = problem(get("/nowhere").await.unwrap()).await;
    assert_eq!(status, 404);
    // A known route with a method it does not answer: a problem too, listing the methods it has.
    let (status, body, headers) = problem(
        gw.http
            .delete(format!("{}/v1/sessions", gw.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(
        body["type"],
        "https://biofeed.dev/problems/method-not-allowed"
    );
    assert_eq!(
        headers.get("allow").map(|v| v.to_str().unwrap()),
        Some("POST")
    );
    let (status, _, headers) = problem(
        gw.http
            .put(format!("{}/v1/me", gw.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405);
    let allow = headers.get("allow").unwrap().to_str().unwrap();
    for method in ["GET", "PATCH", "DELETE"] {
        assert!(allow.contains(method), "{allow}");
    }
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains("biofeed_gateway_http_requests_total{route=\"/healthz\",method=\"GET\",status=\"200\"} 1"), "{metrics}");
}

/// The served OpenAPI document passes an independent validator (openapi-spec-validator, the
/// reference implementation generated clients are checked with), and the reads' query
/// parameters are declared in the query.
#[tokio::test]
async fn the_served_openapi_document_is_valid() {
    let gw = TestGateway::spawn(&[]).await;
    let document = gw
        .http
        .get(format!("{}/openapi.json", gw.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("biofeed-openapi-{}", gw.stores.id));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("openapi.json");
    std::fs::write(&path, &document).unwrap();
    let python = std::env::var("BIOFEED_TEST_PYTHON")
        .unwrap_or_else(|_| ".state/venv/bin/python".to_owned());
    let output = std::process::Command::new(&python)
        .args([
            "-c",
            "import json, sys\n\
             from openapi_spec_validator import validate\n\
             validate(json.load(open(sys.argv[1])))\n\
             print('valid')",
        ])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{python} runs (compose/local test installs it): {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "valid",
        "openapi-spec-validator refused /openapi.json:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let openapi: Value = serde_json::from_slice(&document).unwrap();
    for (path, names) in [
        ("/v1/users/{id}/sessions", &["limit", "before"][..]),
        ("/v1/users/{id}/access-log", &["limit", "before"][..]),
        (
            "/v1/sessions/{id}/points",
            &["data_type", "from", "to", "step"][..],
        ),
    ] {
        let params = openapi["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{path} has parameters"));
        for name in names {
            let param = params
                .iter()
                .find(|p| p["name"] == *name)
                .unwrap_or_else(|| panic!("{path} documents {name}"));
            assert_eq!(param["in"], "query", "{path} {name}");
        }
    }
}

#[tokio::test]
async fn kafka_away_means_503_and_the_gateway_recovers_when_it_returns() {
    let mut kafka = crate::private_kafka::PrivateKafka::start().await;
    let mut stores = crate::helpers::Isolated::new().await;
    stores.settings.stores.kafka.brokers = kafka.brokers();
    biofeed_migrations::migrate(&stores.settings)
        .await
        .expect("migrate");
    let brokers = kafka.brokers();
    // A request waiting for the killed Kafka stays in flight for the produce timeout: long
    // enough, on a busy machine, to see it in flight and send the next request meanwhile.
    let gw = TestGateway::spawn_on(
        stores,
        &brokers,
        &["--produce-timeout", PRODUCE_TIMEOUT, "--max-in-flight", "1"],
    )
    .await;
    let session = gw.open_session("hrv_biofeedback", &["rr_interval"]).await;
    let points = format!("/v1/sessions/{session}/points");
    let (before_id, before) = json_frame("rr_interval", 5, 1, 800.0);
    assert_eq!(
        gw.post(&points)
            .json(&before)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );

    kafka.kill();
    // While one request waits for Kafka, the in-flight budget (1) is used up: the other gets
    // 429. The second is sent once the gateway reports the first in flight.
    let (_, waiting) = json_frame("rr_interval", 5, 1, 810.0);
    let pending = tokio::spawn(gw.post(&points).json(&waiting).send());
    wait_for_in_flight(&gw, 1).await;
    let (_, extra) = json_frame("rr_interval", 5, 1, 820.0);
    let (overloaded, body, headers) =
        problem(gw.post(&points).json(&extra).send().await.unwrap()).await;
    let (unavailable, body2, headers2) = problem(pending.await.unwrap().unwrap()).await;
    assert_eq!((overloaded, unavailable), (429, 503), "{body} {body2}");
    assert!(
        headers.contains_key("retry-after"),
        "429 says when to retry"
    );
    assert!(
        headers2.contains_key("retry-after"),
        "503 says when to retry"
    );

    // More attempts while Kafka is away: never a 2xx.
    for _ in 0..2 {
        let (_, frame) = json_frame("rr_interval", 5, 1, 830.0);
        let (status, body, _) = problem(gw.post(&points).json(&frame).send().await.unwrap()).await;
        assert_eq!(status, 503, "{body}");
    }
    let ready = gw
        .http
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    // Kafka back: the same gateway accepts again, without a restart.
    kafka.restart().await;
    let (after_id, after) = json_frame("rr_interval", 5, 1, 840.0);
    // (A watchdog: an attempt may wait a whole produce timeout while the producer reconnects.)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let status = gw
            .post(&points)
            .json(&after)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 202 {
            break;
        }
        assert!(matches!(status, 503 | 429), "unexpected {status}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never recovered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let ids: Vec<Uuid> = crate::gateway_app::read_topic(
        &gw.stores.settings.stores.kafka,
        &gw.stores.settings.stores.topics.points,
    )
    .await
    .iter()
    .map(|(_, v)| crate::helpers::decode_frame(v).frame_id)
    .collect();
    assert!(
        ids.contains(&before_id) && ids.contains(&after_id),
        "{ids:?}"
    );
}

#[tokio::test]
async fn repeated_sample_times_are_refused_naming_the_index_as_json_and_as_avro() {
    let gw = TestGateway::spawn(&[]).await;
    let session = gw.open_session("hrv_biofeedback", &["rr_interval"]).await;
    let points = format!("/v1/sessions/{session}/points");
    let t = now_us() - 1_000_000;
    let json = json!({
        "frame_id": Uuid::new_v4(), "data_type": "rr_interval",
        "timestamps_us": [t, t + 800_000, t + 800_000], "values": [[800.0], [810.0], [790.0]]
    });
    let (status, body, _) = problem(gw.post(&points).json(&json).send().await.unwrap()).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("timestamps_us/2")),
        "{body}"
    );
    let avro = SensorFrame {
        frame_id: Uuid::new_v4(),
        session_id: session,
        user_id: Uuid::nil(),
        device_id: Uuid::nil(),
        data_type: DataTypeName::parse("rr_interval").unwrap(),
        channels: 1,
        received_at_us: 0,
        t0_us: t,
        offsets_us: vec![0, 0, 900_000],
        values: vec![800.0, 810.0, 790.0],
    };
    let response = gw
        .post(&points)
        .header("content-type", "application/avro")
        .body(biofeed_schema::encode(&avro))
        .send()
        .await
        .unwrap();
    let (status, body, _) = problem(response).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (422, Some("timestamps_us/1")),
        "{body}"
    );
    assert!(gw.topic_messages().await.is_empty(), "nothing published");
}

/// How long the gateway waits for Kafka's acknowledgement in the tests that stop Kafka while a
/// request waits: they must see that request in flight and send another before it times out,
/// which a loaded machine cannot promise within 2 or 3 s.
const PRODUCE_TIMEOUT: &str = "10s";

/// The gateway's `biofeed_gateway_in_flight_requests` gauge, read with the test's own client
/// (one client for every poll: no new TLS set-up each time).
async fn in_flight(gw: &TestGateway) -> i64 {
    let text = match gw.http.get(format!("{}/metrics", gw.url)).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .find_map(|l| l.strip_prefix("biofeed_gateway_in_flight_requests "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no in-flight gauge in {text}"))
}

async fn wait_for_in_flight(gw: &TestGateway, expected: i64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now = in_flight(gw).await;
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "in-flight gauge stayed at {now}, not {expected}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_retry_while_the_first_post_waits_for_kafka_is_never_told_duplicate_before_kafka_has_it()
{
    let mut kafka = crate::private_kafka::PrivateKafka::start().await;
    let mut stores = crate::helpers::Isolated::new().await;
    stores.settings.stores.kafka.brokers = kafka.brokers();
    biofeed_migrations::migrate(&stores.settings)
        .await
        .expect("migrate");
    let brokers = kafka.brokers();
    // (See PRODUCE_TIMEOUT: the retry must reach the gateway while the first still waits.)
    let gw = TestGateway::spawn_on(stores, &brokers, &["--produce-timeout", PRODUCE_TIMEOUT]).await;
    let session = gw.open_session("hrv_biofeedback", &["rr_interval"]).await;
    let points = format!("/v1/sessions/{session}/points");

    kafka.kill();
    let (frame_id, frame) = json_frame("rr_interval", 5, 1, 800.0);
    let first = tokio::spawn(gw.post(&points).json(&frame).send());
    wait_for_in_flight(&gw, 1).await;
    // The device gives up waiting and posts the same frame again while the first still waits.
    let (retry_status, retry_body, _) =
        problem(gw.post(&points).json(&frame).send().await.unwrap()).await;
    let (first_status, first_body, _) = problem(first.await.unwrap().unwrap()).await;
    assert_eq!(first_status, 503, "{first_body}");
    assert_eq!(
        retry_status, 503,
        "a 2xx means Kafka has the frame, and it does not: {retry_body}"
    );
    wait_for_in_flight(&gw, 0).await;

    // A request whose client goes away while it waits gives its in-flight place back once its
    // publication ended (Kafka's answer, here a timeout): the gauge does not stay high.
    let (_, other) = json_frame("rr_interval", 5, 1, 805.0);
    let abandoned = tokio::spawn(gw.post(&points).json(&other).send());
    wait_for_in_flight(&gw, 1).await;
    abandoned.abort();
    wait_for_in_flight(&gw, 0).await;

    // Kafka back: the frame is accepted (202, published now), then a re-post is a duplicate.
    kafka.restart().await;
    // (A watchdog: an attempt may wait a whole produce timeout while the producer reconnects.)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let status = gw
            .post(&points)
            .json(&frame)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 202 {
            break;
        }
        assert!(matches!(status, 503 | 429), "unexpected {status}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never recovered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let again = gw.post(&points).json(&frame).send().await.unwrap();
    assert_eq!(again.status(), 200);
    let ids: Vec<Uuid> = crate::gateway_app::read_topic(
        &gw.stores.settings.stores.kafka,
        &gw.stores.settings.stores.topics.points,
    )
    .await
    .iter()
    .map(|(_, v)| crate::helpers::decode_frame(v).frame_id)
    .collect();
    assert!(ids.contains(&frame_id), "{ids:?}");
}
