//! Session exports (CSV, EDF+, RR text) over HTTP and from the CLI, read back with other
//! languages' tools (Python's csv module, EDFlib through pyedflib) and compared with what was
//! sent; refusals answered as problems before any byte of a file.

use std::path::Path;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::gateway_app::{now_us, TestGateway};
use crate::people::Person;

const EEG_LABELS: [&str; 8] = ["Fp1", "Fp2", "C3", "C4", "P3", "P4", "O1", "O2"];

/// Opens a session of `exercise` streaming `data_types` with the device `token`.
async fn open(gw: &TestGateway, token: &str, exercise: &str, data_types: &[&str]) -> Uuid {
    let response = gw
        .http
        .post(format!("{}/v1/sessions", gw.url))
        .bearer_auth(token)
        .json(&json!({ "exercise": exercise, "data_types": data_types }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().await.unwrap();
    body["session_id"].as_str().unwrap().parse().unwrap()
}

async fn complete(gw: &TestGateway, token: &str, session: Uuid, feedback: Value) {
    let response = gw
        .http
        .post(format!("{}/v1/sessions/{session}/complete", gw.url))
        .bearer_auth(token)
        .json(&json!({ "feedback": feedback }))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{:?}",
        response.text().await
    );
}

/// GET an export as `person`: status, headers and body.
async fn export(
    gw: &TestGateway,
    person: &Person,
    path: &str,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let response = gw
        .as_person(reqwest::Method::GET, person, path)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

/// Runs tests/python/read_export.py on `file` against `sent`.
fn read_back(kind: &str, file: &Path, sent: &Value) -> String {
    let sent_path = file.with_extension("sent.json");
    std::fs::write(&sent_path, sent.to_string()).unwrap();
    let python = std::env::var("BIOFEED_TEST_PYTHON")
        .unwrap_or_else(|_| ".state/venv/bin/python".to_owned());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(&python)
        .arg(root.join("tests/python/read_export.py"))
        .args([kind, file.to_str().unwrap(), sent_path.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("{python} runs (compose/local test installs it): {e}"));
    assert!(
        output.status.success(),
        "{kind}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn problem(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

#[tokio::test]
async fn eeg_and_rr_exports_read_back_by_other_tools_equal_what_was_sent() {
    let gw = TestGateway::spawn(Default::default()).await;
    let person = gw
        .sign_up_with(
            "user",
            json!({ "first_name": "Annabel", "last_name": "Exportova", "birth_date": "1990-05-17" }),
        )
        .await;
    let token = gw.device_for(&person).await;
    let dir = std::env::temp_dir().join(format!("biofeed-exports-{}", gw.stores.id));
    std::fs::create_dir_all(&dir).unwrap();

    // EEG, 8 channels at 256 Hz: 3 s, nothing for 2 s, then 2 s and a half (EDF+D).
    let eeg = open(&gw, &token, "alpha_neurofeedback", &["eeg"]).await;
    let t0 = (now_us() / 60_000_000 - 10) * 60_000_000 + 250_000;
    let mut samples: Vec<(i64, Vec<f32>)> = Vec::new();
    for i in (0..3 * 256).chain(5 * 256..(7 * 256 + 128)) {
        let t = t0 + i * 1_000_000 / 256;
        let values = (0..8)
            .map(|c| ((i as f32 * 0.37 + c as f32).sin() * 150.0 + c as f32 * 10.0).round() / 4.0)
            .collect();
        samples.push((t, values));
    }
    gw.stores
        .insert_points(person.id, eeg, "eeg", &samples)
        .await;
    complete(
        &gw,
        &token,
        eeg,
        json!({ "rating": 4, "calm": true, "note": "with Annabel's coach" }),
    )
    .await;

    let (status, headers, body) = export(
        &gw,
        &person,
        &format!("/v1/sessions/{eeg}/export?format=edf"),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        headers["content-length"].to_str().unwrap(),
        body.len().to_string(),
        "the EDF+ file's length is announced"
    );
    assert!(headers["content-disposition"]
        .to_str()
        .unwrap()
        .contains(&format!("{eeg}_eeg.edf")));
    let edf = dir.join("eeg.edf");
    std::fs::write(&edf, &body).unwrap();
    // The birth date as a whole (read_export.py looks for it in every form a date is written
    // in): its year alone turns up by chance in samples, labels and onsets.
    let absent = json!(["Annabel", "Exportova", "1990-05-17", person.email, "coach"]);
    let sent = json!({
        "t_us": samples.iter().map(|s| s.0).collect::<Vec<_>>(),
        "values": samples.iter().map(|s| s.1.clone()).collect::<Vec<_>>(),
        "labels": EEG_LABELS, "kind": "EEG", "unit": "µV", "dimension": "uV",
        "rate": 256, "min": -2000.0, "max": 2000.0,
        "absent": absent,
    });
    // Records of a second from the first sample: 0-2 and 5-7 hold samples: EDF+D of 6 records.
    let out = read_back("edf", &edf, &sent);
    assert!(out.contains("EDF+D, 6 records, 8 signals"), "{out}");

    let (status, headers, body) = export(
        &gw,
        &person,
        &format!("/v1/sessions/{eeg}/export?format=csv"),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = dir.join("eeg.csv");
    std::fs::write(&csv, &body).unwrap();
    read_back("csv", &csv, &sent);

    // RR intervals (and heart rate) of an HRV session: rr alone, csv of both in a zip.
    let hrv = open(
        &gw,
        &token,
        "hrv_biofeedback",
        &["rr_interval", "heart_rate"],
    )
    .await;
    let rr: Vec<(i64, Vec<f32>)> = (0..300)
        .scan(t0, |t, i| {
            let interval = 800.0 + (i as f32 * 0.9).sin() * 60.0 + (i % 7) as f32 * 0.125;
            *t += (interval * 1000.0) as i64;
            Some((*t, vec![interval]))
        })
        .collect();
    gw.stores
        .insert_points(person.id, hrv, "rr_interval", &rr)
        .await;
    // At 1 Hz, 0.9 s into a second: still one continuous record per second.
    let hr: Vec<(i64, Vec<f32>)> = (0..60)
        .map(|i| (t0 + 650_000 + i * 1_000_000, vec![70.0 + i as f32 / 8.0]))
        .collect();
    gw.stores
        .insert_points(person.id, hrv, "heart_rate", &hr)
        .await;
    complete(
        &gw,
        &token,
        hrv,
        json!({ "rating": 4, "calm": true, "note": "with Annabel's coach", "talked with Annabel": 5 }),
    )
    .await;
    let (status, _, body) = export(
        &gw,
        &person,
        &format!("/v1/sessions/{hrv}/export?format=rr"),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let rr_file = dir.join("rr.txt");
    std::fs::write(&rr_file, &body).unwrap();
    let sent_rr = json!({ "values": rr.iter().map(|s| s.1.clone()).collect::<Vec<_>>() });
    assert!(read_back("rr", &rr_file, &sent_rr).contains("300 intervals"));
    let (status, headers, body) = export(
        &gw,
        &person,
        &format!("/v1/sessions/{hrv}/export?format=csv"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/zip");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(body)).unwrap();
    let mut names: Vec<String> = (0..zip.len())
        .map(|i| zip.by_index(i).unwrap().name().unwrap().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("{hrv}_heart_rate.csv"),
            format!("{hrv}_rr_interval.csv")
        ]
    );
    let mut heart_rate = Vec::new();
    std::io::Read::read_to_end(
        &mut zip.by_name(&format!("{hrv}_heart_rate.csv")).unwrap(),
        &mut heart_rate,
    )
    .unwrap();
    let hr_file = dir.join("hr.csv");
    std::fs::write(&hr_file, heart_rate).unwrap();
    let sent_hr = json!({
        "t_us": hr.iter().map(|s| s.0).collect::<Vec<_>>(),
        "values": hr.iter().map(|s| s.1.clone()).collect::<Vec<_>>(),
        "labels": ["hr"], "unit": "bpm",
    });
    read_back("csv", &hr_file, &sent_hr);
    let (status, _, body) = export(
        &gw,
        &person,
        &format!("/v1/sessions/{hrv}/export?format=edf"),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let hr_edf = dir.join("hr.edf");
    std::fs::write(&hr_edf, &body).unwrap();
    let started: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT started_at FROM sessions WHERE id = $1")
            .bind(hrv)
            .fetch_one(&gw.accounts().await.pool)
            .await
            .unwrap();
    let code = biofeed_accounts::export::participant_label(&gw.accounts().await, person.id);
    let mut sent_hr = sent_hr;
    sent_hr["kind"] = json!("HR");
    sent_hr["dimension"] = json!("bpm");
    sent_hr["rate"] = json!(1);
    sent_hr["min"] = json!(20.0);
    sent_hr["max"] = json!(250.0);
    sent_hr["patient_code"] = json!(code);
    sent_hr["started_us"] = json!(started.timestamp_micros());
    sent_hr["annotations"] = json!([
        "session start",
        "exercise hrv_biofeedback",
        "session end",
        "feedback rating=4",
        "feedback calm=true"
    ]);
    sent_hr["absent"] = absent.clone();
    let out = read_back("edf", &hr_edf, &sent_hr);
    assert!(out.contains("EDF+C, 60 records, 1 signals"), "{out}");
    // Their own export, with their name asked for: in the EDF+ patient field.
    let (status, _, body) = export(
        &gw,
        &person,
        &format!("/v1/sessions/{hrv}/export?format=edf&identify=true"),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let patient = String::from_utf8_lossy(&body[8..88]).into_owned();
    assert!(
        patient.contains("Annabel_Exportova") && patient.contains("17-MAY-1990"),
        "{patient}"
    );

    // The operator's export from the CLI: the same file, written whole, and audited.
    let out = dir.join("cli.txt");
    let run = gw
        .stores
        .biofeed(&[
            "admin",
            "session",
            "export",
            &hrv.to_string(),
            "--format",
            "rr",
            "--output",
            out.to_str().unwrap(),
        ])
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&rr_file).unwrap()
    );
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE subject_id = $1 AND actor_id IS NULL AND resource = 'session_export' AND detail->>'session_id' = $2",
    )
    .bind(person.id)
    .bind(hrv.to_string())
    .fetch_one(&gw.accounts().await.pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn exports_refuse_what_they_cannot_hold_and_whom_they_may_not_serve() {
    let gw = TestGateway::spawn(Default::default()).await;
    let person = gw.sign_up("user", 30).await;
    let stranger = gw.sign_up("user", 30).await;
    let practitioner = gw.operator_made("practitioner").await;
    let token = gw.device_for(&person).await;
    let t0 = (now_us() / 60_000_000 - 10) * 60_000_000;
    let eeg = open(&gw, &token, "alpha_neurofeedback", &["eeg"]).await;
    let samples: Vec<(i64, Vec<f32>)> = (0..256)
        .map(|i| (t0 + i * 1_000_000 / 256, vec![1.0; 8]))
        .collect();
    gw.stores
        .insert_points(person.id, eeg, "eeg", &samples)
        .await;
    let hrv = open(&gw, &token, "hrv_biofeedback", &["rr_interval"]).await;
    gw.stores
        .insert_points(person.id, hrv, "rr_interval", &[(t0, vec![800.0])])
        .await;

    // Open sessions are not exported yet.
    let path = format!("/v1/sessions/{eeg}/export?format=edf");
    let (status, headers, body) = export(&gw, &person, &path).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(problem(&body)["detail"]
        .as_str()
        .unwrap()
        .contains("still open"));
    complete(&gw, &token, eeg, json!({})).await;
    complete(&gw, &token, hrv, json!({})).await;

    for (path, field, says) in [
        (
            format!("/v1/sessions/{eeg}/export?format=xlsx"),
            "format",
            "unknown format 'xlsx'",
        ),
        (
            format!("/v1/sessions/{eeg}/export?format=rr"),
            "format",
            "eeg is not rr_interval",
        ),
        (
            format!("/v1/sessions/{hrv}/export?format=bids"),
            "format",
            "a BIDS dataset holds EEG recordings",
        ),
        (
            format!("/v1/sessions/{hrv}/export?format=edf"),
            "format",
            "rr_interval is an event stream",
        ),
        (
            format!("/v1/sessions/{eeg}/export?format=csv&data_type=spo2"),
            "data_type",
            "streamed no spo2",
        ),
    ] {
        let (status, headers, body) = export(&gw, &person, &path).await;
        assert_eq!(status, 422, "{path}: {}", String::from_utf8_lossy(&body));
        assert_eq!(headers["content-type"], "application/problem+json");
        let p = problem(&body);
        assert_eq!(p["field"], field, "{path}: {p}");
        assert!(p["detail"].as_str().unwrap().contains(says), "{path}: {p}");
    }
    let (status, _, body) = export(&gw, &person, &format!("/v1/sessions/{eeg}/export")).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    // Strangers and practitioners without consent learn nothing; with consent they export,
    // pseudonymously, and the person's access log says so.
    for who in [&stranger, &practitioner] {
        let (status, _, body) = export(&gw, who, &path).await;
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    }
    gw.relate(&practitioner, &person, "practitioner_patient")
        .await;
    let (status, _, body) = export(&gw, &practitioner, &path).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = export(&gw, &practitioner, &format!("{path}&identify=true")).await;
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    let (status, log) = gw
        .read(&person, &format!("/v1/users/{}/access-log", person.id))
        .await;
    assert_eq!(status, 200);
    let exports = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["resource"] == "export"
                && r["actor_id"] == json!(practitioner.id)
                && r["allowed"] == true
        })
        .count();
    assert_eq!(exports, 2, "{log}");

    // The person may put their own name in.
    let (status, _, body) = export(&gw, &person, &format!("{path}&identify=true")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // The CLI refuses the same way, with exit codes that say why.
    let run = gw
        .stores
        .biofeed(&[
            "admin",
            "session",
            "export",
            &hrv.to_string(),
            "--format",
            "edf",
        ])
        .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("event stream"), "{run:?}");
    let run = gw
        .stores
        .biofeed(&[
            "admin",
            "session",
            "export",
            &Uuid::new_v4().to_string(),
            "--format",
            "csv",
        ])
        .await;
    assert_eq!(run.code, 4, "{run:?}");
}

/// Unpacks the zip `bytes` into `dir`.
fn unzip(bytes: Vec<u8>, dir: &Path) {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    zip.extract(dir).unwrap();
}

/// `seconds` of continuous 8-channel EEG at 256 Hz from `t0`.
fn eeg(t0: i64, seconds: i64) -> Vec<(i64, Vec<f32>)> {
    (0..seconds * 256)
        .map(|i| {
            let values = (0..8).map(|c| ((i + c) % 97) as f32 - 48.0).collect();
            (t0 + i * 1_000_000 / 256, values)
        })
        .collect()
}

#[tokio::test]
async fn a_persons_sessions_bundle_as_a_bids_dataset_the_validator_accepts() {
    let gw = TestGateway::spawn(Default::default()).await;
    let person = gw
        .sign_up_with(
            "user",
            json!({ "first_name": "Bidsina", "birth_date": "1991-02-03" }),
        )
        .await;
    let other = gw.sign_up("user", 30).await;
    let stranger = gw.sign_up("user", 30).await;
    let t0 = (now_us() / 60_000_000 - 30) * 60_000_000;
    let mut eeg_sessions = Vec::new();
    for (who, n) in [(&person, 2), (&other, 1)] {
        let token = gw.device_for(who).await;
        for k in 0..n {
            let session = open(&gw, &token, "alpha_neurofeedback", &["eeg"]).await;
            gw.stores
                .insert_points(who.id, session, "eeg", &eeg(t0 + k * 600_000_000, 3))
                .await;
            complete(&gw, &token, session, json!({ "rating": 3 })).await;
            eeg_sessions.push(session);
        }
    }
    // An HRV session of the person: in the CSV bundle, not in BIDS.
    let token = gw.device_for(&person).await;
    let hrv = open(&gw, &token, "hrv_biofeedback", &["rr_interval"]).await;
    gw.stores
        .insert_points(person.id, hrv, "rr_interval", &[(t0, vec![812.5])])
        .await;
    complete(&gw, &token, hrv, json!({})).await;
    // An open EEG session is left out.
    let open_session = open(&gw, &token, "alpha_neurofeedback", &["eeg"]).await;
    gw.stores
        .insert_points(person.id, open_session, "eeg", &eeg(t0, 1))
        .await;

    let accounts = gw.accounts().await;
    let label = biofeed_accounts::export::participant_label(&accounts, person.id);
    let other_label = biofeed_accounts::export::participant_label(&accounts, other.id);
    let dir = std::env::temp_dir().join(format!("biofeed-bids-{}", gw.stores.id));
    let path = format!("/v1/users/{}/export?format=bids", person.id);
    let (status, headers, body) = export(&gw, &person, &path).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/zip");
    unzip(body, &dir.join("person"));
    let sent = json!({
        "sessions": { label.clone(): 2 },
        "labels": EEG_LABELS, "rate": 256, "task": "alphaneurofeedback",
        "samples_per_recording": 3 * 256,
        "absent": ["Bidsina", "1991-02-03", person.email],
    });
    let out = read_back("bids", &dir.join("person"), &sent);
    assert!(out.contains("1 participants"), "{out}");

    // One session as a dataset of its own, from the API and from the CLI.
    let (status, _, body) = export(
        &gw,
        &person,
        &format!("/v1/sessions/{}/export?format=bids", eeg_sessions[1]),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    unzip(body, &dir.join("one"));
    let mut one = sent.clone();
    one["sessions"] = json!({ label.clone(): 1 });
    read_back("bids", &dir.join("one"), &one);
    let one_file = dir.join("one.zip");
    let run = gw
        .stores
        .biofeed(&[
            "admin",
            "session",
            "export",
            &eeg_sessions[1].to_string(),
            "--format",
            "bids",
            "--output",
            one_file.to_str().unwrap(),
            "--master-key",
            &gw.keys.master_key().to_base64(),
            "--blind-index-key",
            &gw.keys.blind_index_key.to_base64(),
        ])
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    unzip(std::fs::read(&one_file).unwrap(), &dir.join("one-cli"));
    read_back("bids", &dir.join("one-cli"), &one);

    // The CSV bundle holds every completed session's files, the open one's none.
    let (status, _, body) = export(
        &gw,
        &person,
        &format!("/v1/users/{}/export?format=csv", person.id),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(body)).unwrap();
    let mut names: Vec<String> = (0..zip.len())
        .map(|i| zip.by_index(i).unwrap().name().unwrap().into_owned())
        .collect();
    names.sort();
    let mut want = vec![
        format!("{label}/{}_eeg.csv", eeg_sessions[0]),
        format!("{label}/{}_eeg.csv", eeg_sessions[1]),
        format!("{label}/{hrv}_rr_interval.csv"),
    ];
    want.sort();
    assert_eq!(names, want);

    // Refusals: a format it does not know, nothing of the format, people one may not read.
    let (status, _, body) = export(
        &gw,
        &person,
        &format!("/v1/users/{}/export?format=xlsx", person.id),
    )
    .await;
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    assert_eq!(problem(&body)["field"], "format");
    let (status, _, body) = export(
        &gw,
        &stranger,
        &format!("/v1/users/{}/export?format=bids", stranger.id),
    )
    .await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert!(problem(&body)["detail"]
        .as_str()
        .unwrap()
        .contains("no completed EEG session"));
    let (status, _, _) = export(&gw, &stranger, &path).await;
    assert_eq!(status, 404);

    // A practitioner's dataset of their consented patients, each read audited; the person
    // whose consent is pending is not in it.
    let practitioner = gw.operator_made("practitioner").await;
    let (status, _, body) = export(&gw, &practitioner, "/v1/me/followers/export?format=bids").await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    gw.relate(&practitioner, &person, "practitioner_patient")
        .await;
    gw.relate(&practitioner, &other, "practitioner_patient")
        .await;
    let (status, body) = gw
        .send(
            &practitioner,
            "/v1/relationships",
            json!({ "type": "practitioner_patient", "follower_id": stranger.id }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, _, body) = export(&gw, &practitioner, "/v1/me/followers/export?format=bids").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    unzip(body, &dir.join("patients"));
    let mut both = sent.clone();
    both["sessions"] = json!({ label.clone(): 2, other_label.clone(): 1 });
    let out = read_back("bids", &dir.join("patients"), &both);
    assert!(out.contains("2 participants"), "{out}");
    let (status, log) = gw
        .read(&person, &format!("/v1/users/{}/access-log", person.id))
        .await;
    assert_eq!(status, 200);
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|r| r["resource"] == "export"
                && r["actor_id"] == json!(practitioner.id)
                && r["allowed"] == true),
        "{log}"
    );

    // Revoked: that patient is no longer in it, and a patient gets nothing of their
    // practitioner's through the endpoint.
    let relationships = biofeed_accounts::relationships::list(&accounts.pool, Some(other.id))
        .await
        .unwrap();
    for r in relationships
        .iter()
        .filter(|r| r.lead_id == practitioner.id && r.revoked_at.is_none())
    {
        let (status, body) = gw
            .send(
                &other,
                &format!("/v1/relationships/{}/revoke", r.id),
                json!({}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _, body) = export(&gw, &practitioner, "/v1/me/followers/export?format=bids").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    unzip(body, &dir.join("patients-after"));
    let mut one_patient = sent.clone();
    one_patient["sessions"] = json!({ label.clone(): 2 });
    let out = read_back("bids", &dir.join("patients-after"), &one_patient);
    assert!(out.contains("1 participants"), "{out}");
    let (status, _, body) = export(&gw, &person, "/v1/me/followers/export?format=bids").await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));

    // An operator's dataset of two people, audited.
    let file = dir.join("both.zip");
    let run = gw
        .stores
        .biofeed(&[
            "admin",
            "session",
            "bundle",
            &person.id.to_string(),
            &other.id.to_string(),
            "--format",
            "bids",
            "--output",
            file.to_str().unwrap(),
            "--master-key",
            &gw.keys.master_key().to_base64(),
            "--blind-index-key",
            &gw.keys.blind_index_key.to_base64(),
        ])
        .await;
    assert_eq!(run.code, 0, "{run:?}");
    unzip(std::fs::read(&file).unwrap(), &dir.join("both"));
    let mut sent = sent;
    sent["sessions"] = json!({ label: 2, other_label: 1 });
    let out = read_back("bids", &dir.join("both"), &sent);
    assert!(out.contains("2 participants"), "{out}");
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE actor_id IS NULL AND resource = 'bundle_export' AND subject_id = ANY($1)",
    )
    .bind(vec![person.id, other.id])
    .fetch_one(&accounts.pool)
    .await
    .unwrap();
    assert_eq!(audited, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// ClickHouse dies while a long export streams: the transfer ends in an error, never as a
/// shorter file that looks whole (CSV: no last chunk; EDF+: fewer bytes than announced).
#[tokio::test]
async fn an_export_cut_short_by_clickhouse_dying_ends_in_an_error_not_a_short_file() {
    let mut clickhouse = crate::private_clickhouse::PrivateClickHouse::start().await;
    let url = clickhouse.url().parse().unwrap();
    let stores = crate::helpers::Isolated::migrated_with(|s| s.stores.clickhouse.url = url).await;
    let brokers = stores.settings.stores.kafka.brokers.clone();
    let gw = TestGateway::spawn_on(stores, &brokers, Default::default()).await;
    let person = gw.sign_up("user", 30).await;
    let token = gw.device_for(&person).await;
    let session = open(&gw, &token, "alpha_neurofeedback", &["eeg"]).await;
    // An hour of 8-channel EEG of little redundancy: far more than the sockets between
    // ClickHouse, the gateway and the client hold.
    let t0 = (now_us() / 60_000_000 - 90) * 60_000_000;
    let ch = gw
        .stores
        .settings
        .stores
        .clickhouse
        .connect()
        .await
        .unwrap();
    ch.client()
        .query(&format!(
            "INSERT INTO points SELECT toUUID('{}'), toUUID('{session}'), 'eeg',
                toInt64({t0} + intDiv(number * 1000000, 256)),
                arrayMap(c -> toFloat32((rand(c) % 40000) / 10 - 2000), range(8)), now()
             FROM numbers(921600)",
            person.id
        ))
        .execute()
        .await
        .unwrap();
    complete(&gw, &token, session, json!({})).await;
    for format in ["csv", "edf"] {
        let mut response = gw
            .as_person(
                reqwest::Method::GET,
                &person,
                &format!("/v1/sessions/{session}/export?format={format}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{format}");
        let announced = response.content_length();
        let mut received = response.chunk().await.unwrap().map_or(0, |c| c.len());
        assert!(received > 0, "{format}: the export started");
        clickhouse.kill();
        let ended = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => received += chunk.len(),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        assert!(
            ended.is_err(),
            "{format}: the transfer ended cleanly after {received} bytes (announced {announced:?}) although ClickHouse died"
        );
        clickhouse.restart().await;
    }
}
