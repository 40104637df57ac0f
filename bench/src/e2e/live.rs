//! The live sessions of `biofeed bench e2e --live-sessions N`: N RR-interval sessions of one
//! person (a device each, one frame a second with the beats since the last), each watched by a
//! viewer on `GET /v1/sessions/{id}/live` as that person; the sample-to-feedback latency is the
//! time from a frame's post to the first feed whose window reaches its last beat.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use biofeed_accounts::{devices, Accounts};
use uuid::Uuid;

use crate::harness::now_us;

/// Frames posted and not yet fed back: (last beat's time, when it was posted).
type Pending = Mutex<VecDeque<(i64, Instant)>>;

/// The running live sessions and what they measured.
pub(super) struct LiveLoad {
    stop: Arc<AtomicBool>,
    /// Set while the measured window runs: latencies are kept only then.
    pub(super) measuring: Arc<AtomicBool>,
    /// Sample-to-feedback latencies, ms.
    pub(super) latencies: Arc<Mutex<Vec<f64>>>,
    /// Feeds the viewers received.
    pub(super) feeds: Arc<AtomicU64>,
    /// Viewers whose stream ended or failed.
    pub(super) viewers_lost: Arc<AtomicU64>,
    /// Every session's frames posted and not yet fed back.
    pending: Vec<Arc<Pending>>,
    tasks: tokio::task::JoinSet<()>,
}

/// A person for every live session: signed up with a password (one hash) and logged in through
/// the gateway, for the viewers' login token.
async fn person(http: &reqwest::Client, url: &str, id: &str) -> anyhow::Result<(Uuid, String)> {
    let email = format!("live-{id}@example.org");
    let password = format!("bench-{}", Uuid::new_v4().simple());
    let signed_up: serde_json::Value = http
        .post(format!("{url}/v1/users"))
        .json(&serde_json::json!({ "email": email, "password": password, "accept_terms": "2026-11-01", "profile": { "birth_date": "1980-01-01", "country": "DE" } }))
        .send()
        .await?
        .error_for_status()
        .context("signing the live sessions' person up")?
        .json()
        .await?;
    let user: Uuid = signed_up["user_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("a user id")?;
    let login: serde_json::Value = http
        .post(format!("{url}/v1/auth/login"))
        .json(&serde_json::json!({ "email": email, "password": password }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = login["token"].as_str().context("a login token")?.to_owned();
    Ok((user, token))
}

impl LiveLoad {
    /// Opens `n` RR sessions of one person, connects a viewer to each, and starts their devices.
    pub(super) async fn start(
        accounts: &Accounts,
        http: &reqwest::Client,
        url: &str,
        id: &str,
        n: u32,
    ) -> anyhow::Result<Self> {
        let (user, login) = person(http, url, id).await?;
        let mut load = Self {
            stop: Arc::new(AtomicBool::new(false)),
            measuring: Arc::new(AtomicBool::new(false)),
            latencies: Arc::new(Mutex::new(Vec::new())),
            feeds: Arc::new(AtomicU64::new(0)),
            viewers_lost: Arc::new(AtomicU64::new(0)),
            pending: Vec::new(),
            tasks: tokio::task::JoinSet::new(),
        };
        for index in 0..n {
            let device =
                devices::create_device(&accounts.pool, user, &format!("live-bench-{id}")).await?;
            let session =
                super::devices::open_session(http, url, &device.token, "rr_interval").await?;
            let pending: Arc<Pending> = Arc::new(Mutex::new(VecDeque::new()));
            load.pending.push(Arc::clone(&pending));
            let viewer = http
                .get(format!("{url}/v1/sessions/{session}/live"))
                .bearer_auth(&login)
                .timeout(Duration::from_secs(24 * 3600))
                .send()
                .await?
                .error_for_status()
                .context("opening a live feed")?;
            load.tasks.spawn(watch(
                viewer,
                Arc::clone(&pending),
                Arc::clone(&load.measuring),
                Arc::clone(&load.latencies),
                Arc::clone(&load.feeds),
                Arc::clone(&load.viewers_lost),
            ));
            let device = Device {
                http: http.clone(),
                endpoint: format!("{url}/v1/sessions/{session}/points"),
                token: device.token,
                pending,
                stop: Arc::clone(&load.stop),
                // Start spread over a second, as real devices do.
                delay: Duration::from_millis(u64::from(index) * 1000 / u64::from(n.max(1))),
                seed: u64::from(index) * 7_919 + 1,
            };
            load.tasks.spawn(async move { device.run().await });
        }
        Ok(load)
    }

    /// Frames posted in the measured window that no feed answered within `limit` (counted in
    /// the latencies as `limit`, so that they raise the percentiles rather than vanish); how
    /// many.
    pub(super) fn settle_unanswered(&self, limit: Duration) -> u64 {
        let now = Instant::now();
        let mut late = Vec::new();
        for pending in &self.pending {
            if let Ok(p) = pending.lock() {
                late.extend(
                    p.iter()
                        .filter(|(_, sent)| now.duration_since(*sent) > limit)
                        .map(|(_, sent)| now.duration_since(*sent).as_secs_f64() * 1e3),
                );
            }
        }
        if let Ok(mut l) = self.latencies.lock() {
            l.extend(&late);
        }
        late.len() as u64
    }

    /// Stops every device and viewer.
    pub(super) async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Reads one viewer's Server-Sent Events: each feed settles the frames its window reaches.
async fn watch(
    mut response: reqwest::Response,
    pending: Arc<Pending>,
    measuring: Arc<AtomicBool>,
    latencies: Arc<Mutex<Vec<f64>>>,
    feeds: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
) {
    let mut buffer = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(at) = buffer.find("\n\n") {
            let block: String = buffer.drain(..at + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue;
            };
            if !block.starts_with("event: feed") && !block.contains("\nevent: feed") {
                continue;
            }
            let Ok(feed) = serde_json::from_str::<serde_json::Value>(data.trim_start()) else {
                continue;
            };
            let Some(through) = feed["through_us"].as_i64() else {
                continue;
            };
            feeds.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let mut settled = Vec::new();
            if let Ok(mut p) = pending.lock() {
                while p.front().is_some_and(|(last, _)| *last <= through) {
                    if let Some((_, sent)) = p.pop_front() {
                        settled.push(now.duration_since(sent).as_secs_f64() * 1e3);
                    }
                }
            }
            if measuring.load(Ordering::Relaxed) {
                if let Ok(mut l) = latencies.lock() {
                    l.extend(settled);
                }
            }
        }
    }
    lost.fetch_add(1, Ordering::Relaxed);
}

/// A chest strap: one frame a second with the beats since the last.
struct Device {
    http: reqwest::Client,
    endpoint: String,
    token: String,
    pending: Arc<Pending>,
    stop: Arc<AtomicBool>,
    delay: Duration,
    seed: u64,
}

impl Device {
    async fn run(mut self) {
        tokio::time::sleep(self.delay).await;
        let mut next_beat = now_us();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.stop.load(Ordering::Relaxed) {
            ticker.tick().await;
            let now = now_us();
            let (mut times, mut values) = (Vec::new(), Vec::new());
            while next_beat <= now {
                self.seed = self
                    .seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let rr = 800.0 + ((self.seed >> 33) % 200) as f32;
                times.push(next_beat);
                values.push([rr]);
                next_beat += (rr as i64) * 1000;
            }
            let Some(&last) = times.last() else {
                continue;
            };
            let body = serde_json::json!({ "frame_id": Uuid::new_v4(), "data_type": "rr_interval", "timestamps_us": times, "values": values });
            let sent = Instant::now();
            if let Ok(mut p) = self.pending.lock() {
                p.push_back((last, sent));
            }
            let accepted = self
                .http
                .post(&self.endpoint)
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !accepted {
                // Never fed back: not a latency to wait for.
                if let Ok(mut p) = self.pending.lock() {
                    p.retain(|(t, _)| *t != last);
                }
            }
        }
    }
}
