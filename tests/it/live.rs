//! Live feedback against the real services: a device streams RR intervals and EEG through the
//! gateway into Kafka, a `biofeed live` member (a child process) keeps the windows, and viewers
//! read `GET /v1/sessions/{id}/live` from the gateway. Every feed is checked against the session
//! metrics' arithmetic (`biofeed-signals`) over the samples sent in its window.

use std::time::Duration;

use biofeed_signals::Sample;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use crate::gateway_app::{now_us, TestGateway};
use crate::helpers::{free_port, BiofeedProcess, Role};
use crate::people::Person;

const RR_WINDOW_US: i64 = 10_000_000;
const EEG_WINDOW_US: i64 = 4_000_000;
const EEG_RATE: f64 = 256.0;
/// The longest gap between two feeds of a streaming session the tests accept: ten intervals, as a
/// loaded two-core machine may starve the member, the gateway or the viewer for seconds; a feed
/// that stopped (or never started) still fails.
const MAX_FEED_GAP_US: i64 = 10_000_000;
/// How soon after a revocation the practitioner's streams must have ended: ten of the gateway's
/// re-checks (one a second), room for a loaded machine, yet far from "never".
const PROMPTLY: Duration = Duration::from_secs(10);
/// How soon after a member's restart its feeds must be back: seconds, on a loaded machine (the
/// process starts, takes its partitions back under its static id and re-reads the lookback).
const RESUME_WITHIN_US: i64 = 20_000_000;

/// A `biofeed live` member on the test's topics, in a group of the test's own.
fn start_member(gw: &TestGateway, instance: &str) -> BiofeedProcess {
    let group = format!("biofeed-live-test-{}", gw.stores.id);
    let port = free_port().to_string();
    BiofeedProcess::start(
        &[
            "live",
            "--live-window",
            "10s",
            "--live-eeg-window",
            "4s",
            "--live-group",
            &group,
            "--live-instance-id",
            instance,
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
        &gw.stores.env_as(Role::Live),
    )
}

/// What a viewer received: `(event, data)` in order; the channel ends when the stream does.
struct Viewer {
    events: mpsc::UnboundedReceiver<(String, Value)>,
    feeds: Vec<Value>,
    ended: Option<String>,
}

impl Viewer {
    /// Takes what has arrived so far (and notes an `end` event).
    fn drain(&mut self) {
        while let Ok((event, data)) = self.events.try_recv() {
            match event.as_str() {
                "feed" => self.feeds.push(data),
                "end" => self.ended = data["reason"].as_str().map(str::to_owned),
                other => panic!("unexpected event {other}: {data}"),
            }
        }
    }

    /// Waits (a watchdog, not a timing) for the stream's `end` event; its reason.
    async fn end(&mut self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            self.drain();
            if let Some(reason) = &self.ended {
                return reason.clone();
            }
            assert!(Instant::now() < deadline, "no end event within {within:?}");
            match tokio::time::timeout(Duration::from_millis(100), self.events.recv()).await {
                Ok(Some((event, data))) => {
                    if event == "end" {
                        self.ended = data["reason"].as_str().map(str::to_owned);
                    } else {
                        self.feeds.push(data);
                    }
                }
                Ok(None) => panic!("the stream closed without an end event"),
                Err(_) => {}
            }
        }
    }
}

/// Opens the live feed as `person`: the viewer, or the refusal's status and problem.
async fn watch(gw: &TestGateway, person: &Person, session: Uuid) -> Result<Viewer, (u16, Value)> {
    let response = gw
        .as_person(
            reqwest::Method::GET,
            person,
            &format!("/v1/sessions/{session}/live"),
        )
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    if status != 200 {
        let content_type = response.headers().get("content-type").cloned();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(
            content_type.unwrap().to_str().unwrap(),
            "application/problem+json",
            "{body}"
        );
        return Err((status, body));
    }
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let (tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(at) = buffer.find("\n\n") {
                let block: String = buffer.drain(..at + 2).collect();
                let (mut event, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if event.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = serde_json::from_str(&data).expect("event data is JSON");
                if tx.send((event, data)).is_err() {
                    return;
                }
            }
        }
    });
    Ok(Viewer {
        events,
        feeds: Vec::new(),
        ended: None,
    })
}

/// A device of `person` streaming RR intervals and 8-channel EEG in two open sessions, as the
/// samples' real times come; remembers every sample it sent.
struct Device<'a> {
    gw: &'a TestGateway,
    token: String,
    rr_session: Uuid,
    eeg_session: Uuid,
    rr: Vec<Sample>,
    eeg: Vec<Sample>,
    next_beat: i64,
    next_eeg: i64,
    seed: u64,
}

impl<'a> Device<'a> {
    async fn new(gw: &'a TestGateway, person: &Person) -> Device<'a> {
        let token = gw.device_for(person).await;
        let open = |exercise: &'static str, data_type: &'static str| {
            let token = token.clone();
            async move {
                let response = gw
                    .http
                    .post(format!("{}/v1/sessions", gw.url))
                    .bearer_auth(&token)
                    .json(&json!({ "exercise": exercise, "data_types": [data_type] }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
                let body: Value = response.json().await.unwrap();
                body["session_id"]
                    .as_str()
                    .unwrap()
                    .parse::<Uuid>()
                    .unwrap()
            }
        };
        let rr_session = open("hrv_biofeedback", "rr_interval").await;
        let eeg_session = open("alpha_neurofeedback", "eeg").await;
        let start = now_us() - 1_000_000;
        Device {
            gw,
            token,
            rr_session,
            eeg_session,
            rr: Vec::new(),
            eeg: Vec::new(),
            next_beat: start,
            next_eeg: start,
            seed: 17,
        }
    }

    fn noise(&mut self) -> f64 {
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5
    }

    /// Posts the beats and EEG samples whose time has come (202 each).
    async fn stream_until_now(&mut self) {
        let now = now_us();
        let mut beats = Vec::new();
        while self.next_beat <= now {
            let t = self.next_beat as f64 / 1e6;
            let rr = (850.0
                + 60.0 * (2.0 * std::f64::consts::PI * 0.1 * t).sin()
                + 40.0 * self.noise()) as f32;
            beats.push((self.next_beat, vec![rr]));
            self.next_beat += (rr as i64) * 1000;
        }
        let mut eeg = Vec::new();
        while self.next_eeg <= now {
            let t = self.next_eeg as f64 / 1e6;
            let values: Vec<f32> = (0..8)
                .map(|c| {
                    (20.0 * (2.0 * std::f64::consts::PI * 10.0 * t + f64::from(c)).sin()
                        + 5.0 * (2.0 * std::f64::consts::PI * 6.0 * t).sin()
                        + 8.0 * self.noise()) as f32
                })
                .collect();
            eeg.push((self.next_eeg, values));
            self.next_eeg += (1e6 / EEG_RATE).round() as i64;
        }
        for (session, data_type, samples) in [
            (self.rr_session, "rr_interval", beats),
            (self.eeg_session, "eeg", eeg),
        ] {
            if samples.is_empty() {
                continue;
            }
            let times: Vec<i64> = samples.iter().map(|(t, _)| *t).collect();
            let values: Vec<&Vec<f32>> = samples.iter().map(|(_, v)| v).collect();
            let response = self
                .gw
                .http
                .post(format!("{}/v1/sessions/{session}/points", self.gw.url))
                .bearer_auth(&self.token)
                .json(&json!({ "frame_id": Uuid::new_v4(), "data_type": data_type, "timestamps_us": times, "values": values }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
            if data_type == "eeg" {
                self.eeg.extend(samples);
            } else {
                self.rr.extend(samples);
            }
        }
    }

    /// Streams for `how_long`, in steps of 250 ms, handing each step to `each`.
    async fn stream_for(&mut self, how_long: Duration, mut each: impl FnMut()) {
        let until = Instant::now() + how_long;
        while Instant::now() < until {
            self.stream_until_now().await;
            each();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Checks a feed against the arithmetic over the samples sent in its window.
fn check_feed(feed: &Value, sent: &[Sample], window_us: i64, channels: usize) {
    let through = feed["through_us"].as_i64().unwrap();
    assert!(
        sent.iter().any(|(t, _)| *t == through),
        "the feed's newest sample was sent: {feed}"
    );
    let window: Vec<Sample> = sent
        .iter()
        .filter(|(t, _)| *t > through - window_us && *t <= through)
        .cloned()
        .collect();
    assert_eq!(
        feed["samples"].as_u64(),
        Some(window.len() as u64),
        "{feed}"
    );
    let expected: Vec<biofeed_signals::Metric> = if channels == 1 {
        biofeed_signals::hrv(&window)
    } else {
        biofeed_signals::eeg_band_power(&window, channels, EEG_RATE)
    };
    let got = feed["metrics"].as_array().unwrap();
    assert_eq!(got.len(), expected.len(), "{feed}");
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g["name"], e.name);
        assert_eq!(g["channel"], e.channel);
        assert_eq!(g["samples"], e.samples);
        let value = g["value"].as_f64().unwrap();
        assert!(
            (value - e.value).abs() <= 1e-9 * e.value.abs().max(1.0),
            "{}: live {value} vs arithmetic {}",
            e.name,
            e.value
        );
    }
    let plot = &feed["plot"];
    assert_eq!(plot["values"].as_array().unwrap().len(), channels);
    assert!(plot["t_us"].as_array().unwrap().len() <= 300);
}

/// Checks every feed and that they came about once a second once they started: never more often
/// than every 0.9 s, and never more than [`MAX_FEED_GAP_US`] apart.
fn check_feeds(feeds: &[Value], sent: &[Sample], window_us: i64, channels: usize, at_least: usize) {
    assert!(
        feeds.len() >= at_least,
        "{} feeds, expected {at_least}",
        feeds.len()
    );
    for feed in feeds {
        check_feed(feed, sent, window_us, channels);
    }
    // (A first feed may come before the window holds enough for a metric; the last has them.)
    let last = &feeds[feeds.len() - 1]["metrics"];
    assert!(last.as_array().is_some_and(|m| !m.is_empty()), "{last}");
    let times: Vec<i64> = feeds
        .iter()
        .map(|f| f["computed_at_us"].as_i64().unwrap())
        .collect();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (900_000..=MAX_FEED_GAP_US).contains(&gap),
            "feeds {gap} µs apart"
        );
    }
}

#[tokio::test]
async fn viewers_get_the_session_arithmetic_every_second_until_access_or_the_session_ends() {
    let gw = TestGateway::spawn(&[]).await;
    let member = start_member(&gw, &format!("member-{}", gw.stores.id));
    let person = gw.sign_up("user", 30).await;
    let practitioner = gw.sign_up("practitioner", 45).await;
    let stranger = gw.sign_up("user", 30).await;
    let link = gw
        .relate(&practitioner, &person, "practitioner_patient")
        .await;
    let mut device = Device::new(&gw, &person).await;
    let (rr_session, eeg_session) = (device.rr_session, device.eeg_session);

    // A stranger, and anyone for a session that does not exist, learn nothing.
    for (who, session) in [(&stranger, rr_session), (&person, Uuid::new_v4())] {
        let (status, body) = watch(&gw, who, session).await.err().expect("refused");
        assert_eq!(status, 404, "{body}");
    }
    let mut own = watch(&gw, &person, rr_session).await.unwrap();
    let mut theirs = watch(&gw, &practitioner, rr_session).await.unwrap();
    let mut eeg = watch(&gw, &practitioner, eeg_session).await.unwrap();

    // Long enough for five feeds even with the member slow to start and feeds up to
    // MAX_FEED_GAP_US apart.
    device
        .stream_for(Duration::from_secs(30), || {
            own.drain();
            theirs.drain();
            eeg.drain();
        })
        .await;
    own.drain();
    theirs.drain();
    eeg.drain();
    check_feeds(&own.feeds, &device.rr, RR_WINDOW_US, 1, 5);
    check_feeds(&theirs.feeds, &device.rr, RR_WINDOW_US, 1, 5);
    check_feeds(&eeg.feeds, &device.eeg, EEG_WINDOW_US, 8, 5);
    // The window moves: the last feeds cover the last 10 s, not everything sent.
    let last = own.feeds.last().unwrap();
    assert!(
        last["samples"].as_u64().unwrap() < device.rr.len() as u64,
        "{last}"
    );
    // A metric of the alpha rhythm: channel 0's alpha power dominates its theta power.
    let alpha = |name: &str| {
        eeg.feeds.last().unwrap()["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name && m["channel"] == 0)
            .unwrap()["value"]
            .as_f64()
            .unwrap()
    };
    assert!(alpha("eeg_alpha_uv2") > alpha("eeg_theta_uv2"));
    assert!(own.ended.is_none() && theirs.ended.is_none());

    // The practitioner's opening was audited as a read of the patient's data.
    let (_, log) = gw
        .read(&person, &format!("/v1/users/{}/access-log", person.id))
        .await;
    // Opened twice (the RR and the EEG session): two rows, however many seconds of re-checks.
    let opened = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["actor_id"] == practitioner.id.to_string()
                && r["resource"] == "live"
                && r["allowed"] == true
        })
        .count();
    assert_eq!(opened, 2, "{log}");

    // The patient revokes: the practitioner's streams end at once, the patient's goes on.
    let (status, body) = gw
        .send(
            &person,
            &format!("/v1/relationships/{link}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let revoked_at = Instant::now();
    assert_eq!(theirs.end(PROMPTLY).await, "access_ended");
    assert_eq!(eeg.end(PROMPTLY).await, "access_ended");
    assert!(
        revoked_at.elapsed() < PROMPTLY,
        "ended {:?} after the revocation",
        revoked_at.elapsed()
    );
    let (status, _) = watch(&gw, &practitioner, rr_session)
        .await
        .err()
        .expect("refused now");
    assert_eq!(status, 404);
    let before = own.feeds.len();
    device
        .stream_for(Duration::from_secs(6), || own.drain())
        .await;
    own.drain();
    assert!(own.feeds.len() > before, "the patient's own feed goes on");
    // (Checked apart: streaming paused meanwhile, so the gap between the two parts is longer.)
    check_feeds(&own.feeds[before..], &device.rr, RR_WINDOW_US, 1, 1);

    // A second login of the person watches the EEG; logging it out ends that feed at once.
    let second = Person {
        token: gw
            .log_in(&person.email, crate::people::PASSWORD)
            .await
            .unwrap(),
        ..person.clone()
    };
    let mut other_login = watch(&gw, &second, eeg_session).await.unwrap();
    let response = gw
        .as_person(reqwest::Method::POST, &second, "/v1/auth/logout")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    assert_eq!(other_login.end(Duration::from_secs(10)).await, "logged_out");
    // After a re-check or two, the first login's feed is still open.
    device
        .stream_for(Duration::from_secs(2), || own.drain())
        .await;
    own.drain();
    assert!(own.ended.is_none(), "the first login's feed goes on");

    // The session completes: the feed ends, and a new one is refused with 409.
    let response = gw
        .http
        .post(format!("{}/v1/sessions/{rr_session}/complete", gw.url))
        .bearer_auth(&device.token)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    assert_eq!(own.end(Duration::from_secs(10)).await, "session_closed");
    let (status, body) = watch(&gw, &person, rr_session)
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 409, "{body}");
    member.stop_ok().await;
}

#[tokio::test]
async fn a_live_member_killed_mid_session_is_back_within_seconds_with_whole_windows() {
    let gw = TestGateway::spawn(&[]).await;
    let instance = format!("member-{}", gw.stores.id);
    let member = start_member(&gw, &instance);
    let person = gw.sign_up("user", 30).await;
    let mut device = Device::new(&gw, &person).await;
    let mut viewer = watch(&gw, &person, device.rr_session).await.unwrap();
    // Long enough for three feeds even with the member slow to start.
    device
        .stream_for(Duration::from_secs(20), || viewer.drain())
        .await;
    viewer.drain();
    check_feeds(&viewer.feeds, &device.rr, RR_WINDOW_US, 1, 3);
    let before = viewer.feeds.len();

    member.kill9().await;
    let restarted = now_us();
    let member = start_member(&gw, &instance);
    // Resumed: the first feed the new member computed (a feed of the killed one still on its way
    // does not count).
    let by_new = |feeds: &[Value]| {
        feeds[before..]
            .iter()
            .filter(|f| f["computed_at_us"].as_i64().unwrap() > restarted)
            .count()
    };
    // Resuming within RESUME_WITHIN_US, then three feeds, fit in the stream.
    let mut resumed_after = None;
    device
        .stream_for(Duration::from_secs(35), || {
            viewer.drain();
            if resumed_after.is_none() && by_new(&viewer.feeds) > 0 {
                resumed_after = Some(now_us() - restarted);
            }
        })
        .await;
    viewer.drain();
    if resumed_after.is_none_or(|us| us >= RESUME_WITHIN_US) {
        // The member's log says why: e.g. an offset look-up that failed at the assignment,
        // after which it holds its feeds until a whole window arrived past a clock margin.
        let (_, log) = member.stop().await;
        panic!(
            "the feed did not resume within {RESUME_WITHIN_US} µs of the restart \
             (resumed after {resumed_after:?} µs); the new member's log:\n{log}"
        );
    }
    // Every feed, before and after — the new member's first included — is the arithmetic over
    // the whole window (check_feed counts its samples): the new member rebuilt it from Kafka
    // before feeding anything back.
    assert!(
        by_new(&viewer.feeds) >= 3,
        "{} feeds after the restart",
        by_new(&viewer.feeds)
    );
    for feed in &viewer.feeds {
        check_feed(feed, &device.rr, RR_WINDOW_US, 1);
    }
    assert!(viewer.ended.is_none());
    member.stop_ok().await;
}

#[tokio::test]
async fn biofeed_up_feeds_back_and_simulate_watch_prints_the_feed() {
    let stores = crate::helpers::Isolated::migrated().await;
    let up =
        crate::up::UpSettings::new(&stores, &biofeed_accounts::AccountKeys::generate(), "live");
    let env = crate::helpers::with(up.env.clone(), "BIOFEED_LIVE_WINDOW", "10s".to_owned());
    let process = crate::up::start_up(&env, &up.url).await;
    let run = crate::helpers::run_biofeed(
        &[
            "simulate",
            "--url",
            &up.url,
            "--devices",
            "1",
            "--duration",
            "12s",
            "--session-length",
            "30s",
            "--watch",
        ],
        &env,
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    // The strap's RR session, watched as its person: lines with the HRV metrics.
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("live ") && l.contains(" rr_interval ("))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("rmssd_ms") && l.contains("mean_hr_bpm")),
        "{run:?}"
    );
    assert!(lines.len() >= 3, "{run:?}");
    // The summary stays the last line of standard output.
    let summary: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["devices"], 1);
    process.stop_ok().await;
}
