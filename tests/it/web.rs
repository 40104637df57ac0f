//! The people's web app, in a real browser: Debian's headless Chromium driven through
//! chromedriver (WebDriver), against `biofeed up` (gateway, consumer, jobs, live) on the real
//! services. A person signs up with a name that is HTML, registers a device in the app, the
//! device records a session through the device API, and the person opens it: the plotted series
//! are compared with the API's numbers and a screenshot is saved. A practitioner, invited and
//! accepted in the app, sees the session until the patient revokes. Every page passes axe-core's
//! WCAG 2.1 A/AA checks. And, over plain HTTP: the cookie's flags, the Origin check, the headers.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use biofeed_accounts::AccountKeys;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::time::Instant;
use uuid::Uuid;

use crate::gateway_app::{now_us, TestGateway};
use crate::helpers::{free_port, http_client, wait_until, Isolated};
use crate::people::PASSWORD;
use crate::up::{start_up, UpSettings};

/// A name a person may give that is also HTML: it must show as these characters.
const XSS_NAME: &str = "<img src=x onerror=alert(1)>";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the tests leave what a person looks at afterwards (the screenshot).
fn artefacts() -> PathBuf {
    let dir = std::env::var_os("BIOFEED_TEST_ARTEFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/test-artefacts"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Debian's Chromium, as found on the PATH (compose/local test installs it).
fn chromium() -> String {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
        .expect("chromium on the PATH (compose/local test installs Debian's chromium)")
        .display()
        .to_string()
}

/// chromedriver on a port of its own, stopped when dropped.
struct Driver {
    process: std::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> Self {
        let port = free_port();
        let process = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (compose/local test installs Debian's chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "chromedriver answers",
            async || {
                http.get(format!("{url}/status"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
        Self { process, url }
    }

    /// A new browser (its own profile: its own cookies), phone-wide when `phone`.
    async fn browser(&self, phone: bool) -> Browser {
        let size = if phone { "390,844" } else { "1280,1800" };
        let capabilities = json!({
            "browserName": "chrome",
            // The gateway's certificate is the local test CA's.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         format!("--window-size={size}"), "--lang=en-US"],
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a Chromium session");
        Browser { client }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

struct Browser {
    client: Client,
}

impl Browser {
    /// Runs `script` (a function body) and returns what it returns.
    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Waits (a watchdog, not a timing) until `expression` is truthy in the page.
    async fn until(&self, expression: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let value = self
                .client
                .execute(&format!("return Boolean({expression});"), Vec::new())
                .await
                .unwrap_or(Value::Bool(false));
            if value == Value::Bool(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 60 s; the page says: {}",
                self.main_text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn main_text(&self) -> String {
        self.client
            .execute(
                "return document.querySelector('main')?.innerText || '';",
                Vec::new(),
            )
            .await
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    }

    /// Opens `route` of the app and waits for its heading to be `heading`.
    async fn open(&self, base: &str, route: &str, heading: &str) {
        let target = format!("{base}/{route}");
        // The same address again changes no hash: a reload, as a person pressing F5.
        let here = self.client.current_url().await.unwrap();
        if here.as_str() == target {
            self.client.refresh().await.unwrap();
        } else {
            self.client.goto(&target).await.unwrap();
        }
        self.wait_heading(heading).await;
    }

    async fn wait_heading(&self, heading: &str) {
        let expression = format!(
            "document.querySelector('main h1')?.textContent === {}",
            json!(heading)
        );
        self.until(&expression, &format!("the page headed {heading:?}"))
            .await;
    }

    /// Types `text` into the form control labelled `label`.
    async fn fill(&self, label: &str, text: &str) {
        let id = self
            .js(&format!(
                "const l = [...document.querySelectorAll('main label')].find(l => l.textContent === {});
                 return l ? l.htmlFor : null;",
                json!(label)
            ))
            .await;
        let id = id
            .as_str()
            .unwrap_or_else(|| panic!("a field labelled {label:?}"));
        let input = self
            .client
            .find(Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        input.clear().await.ok();
        input.send_keys(text).await.unwrap();
    }

    /// Clicks the button whose text is `text`.
    async fn click(&self, text: &str) {
        let button = self
            .client
            .find(Locator::XPath(&format!(
                "//main//button[normalize-space(.)={}]",
                json!(text)
            )))
            .await
            .unwrap_or_else(|e| panic!("a button {text:?}: {e}"));
        button.click().await.unwrap();
    }

    /// Runs axe-core's WCAG 2.1 A and AA rules on the page; panics naming every violation.
    async fn accessible(&self, page: &str) {
        let axe = std::fs::read_to_string(repo().join("web/node_modules/axe-core/axe.min.js"))
            .expect("axe-core is installed in web/node_modules (npm ci)");
        // Injected by the driver, not by the page: the page's CSP allows no such script.
        self.client.execute(&axe, Vec::new()).await.unwrap();
        let result = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } })
                    .then(r => done(r.violations.map(v => ({ id: v.id, impact: v.impact, help: v.help,
                        nodes: v.nodes.slice(0, 3).map(n => n.html) }))))
                    .catch(e => done([{ id: 'axe-error', help: String(e) }]));",
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(
            result,
            json!([]),
            "accessibility violations on the {page} page"
        );
    }

    /// Saves a screenshot as a test artefact; its path.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = artefacts().join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

/// The number in a table cell's text such as `42.3 ms`.
fn leading_number(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|n| n.replace(',', "").parse().ok())
        .unwrap_or_else(|| panic!("a number in {text:?}"))
}

/// A person's login token through the API (for the test's own checks of the numbers).
async fn bearer(http: &reqwest::Client, url: &str, email: &str) -> String {
    let body: Value = http
        .post(format!("{url}/v1/auth/login"))
        .json(&json!({ "email": email, "password": PASSWORD }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["token"].as_str().unwrap().to_owned()
}

/// A device of the person, streaming in real time as a strap and a headset would: RR intervals
/// and a heart rate each second into an HRV session, 8-channel 256 Hz EEG into a neurofeedback
/// session.
struct Device {
    http: reqwest::Client,
    url: String,
    token: String,
    hrv: Uuid,
    eeg: Uuid,
    next_beat: i64,
    next_hr: i64,
    next_eeg: i64,
    beats: u32,
    /// Samples posted (and acknowledged) per data type.
    posted: std::collections::BTreeMap<&'static str, usize>,
}

impl Device {
    async fn open(http: &reqwest::Client, url: &str, token: &str) -> Device {
        let open = |exercise: &'static str, data_types: Value| async move {
            let opened: Value = http
                .post(format!("{url}/v1/sessions"))
                .bearer_auth(token)
                .json(&json!({ "exercise": exercise, "data_types": data_types }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            opened["session_id"]
                .as_str()
                .unwrap_or_else(|| panic!("{opened}"))
                .parse::<Uuid>()
                .unwrap()
        };
        let hrv = open("hrv_biofeedback", json!(["rr_interval", "heart_rate"])).await;
        let eeg = open("alpha_neurofeedback", json!(["eeg"])).await;
        let now = now_us();
        Device {
            http: http.clone(),
            url: url.to_owned(),
            token: token.to_owned(),
            hrv,
            eeg,
            next_beat: now,
            next_hr: now,
            next_eeg: now,
            beats: 0,
            posted: std::collections::BTreeMap::new(),
        }
    }

    async fn post(
        &mut self,
        session: Uuid,
        data_type: &'static str,
        samples: Vec<(i64, Vec<f32>)>,
    ) {
        if samples.is_empty() {
            return;
        }
        *self.posted.entry(data_type).or_default() += samples.len();
        let response = self
            .http
            .post(format!("{}/v1/sessions/{session}/points", self.url))
            .bearer_auth(&self.token)
            .json(&json!({
                "frame_id": Uuid::new_v4(), "data_type": data_type,
                "timestamps_us": samples.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
                "values": samples.iter().map(|(_, v)| v).collect::<Vec<_>>(),
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    }

    /// Posts every sample whose time has come.
    async fn stream_until_now(&mut self) {
        let now = now_us();
        let mut beats = Vec::new();
        while self.next_beat <= now {
            let i = f64::from(self.beats);
            let rr = 850.0 + 60.0 * (i * 0.6).sin() + f64::from(self.beats % 7) * 4.0;
            beats.push((self.next_beat, vec![rr as f32]));
            self.next_beat += (rr as i64) * 1000;
            self.beats += 1;
        }
        let mut heart = Vec::new();
        while self.next_hr <= now {
            heart.push((
                self.next_hr,
                vec![62.0 + (self.next_hr / 1_000_000 % 11) as f32],
            ));
            self.next_hr += 1_000_000;
        }
        let mut eeg = Vec::new();
        while self.next_eeg <= now {
            let t = self.next_eeg as f64 / 1e6;
            let values = (0..8)
                .map(|c| {
                    (20.0 * (2.0 * std::f64::consts::PI * 10.0 * t + f64::from(c)).sin()
                        + 6.0 * (2.0 * std::f64::consts::PI * 5.0 * t).sin())
                        as f32
                })
                .collect();
            eeg.push((self.next_eeg, values));
            self.next_eeg += 3906; // 256 Hz
        }
        let (hrv, eeg_session) = (self.hrv, self.eeg);
        self.post(hrv, "rr_interval", beats).await;
        self.post(hrv, "heart_rate", heart).await;
        self.post(eeg_session, "eeg", eeg).await;
    }

    async fn complete(&self, session: Uuid) {
        let done = self
            .http
            .post(format!("{}/v1/sessions/{session}/complete", self.url))
            .bearer_auth(&self.token)
            .json(&json!({ "feedback": { "feeling": XSS_NAME } }))
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 200, "{}", done.text().await.unwrap());
    }
}

/// A session's metrics once the jobs computed them, read through the API.
async fn computed_metrics(http: &reqwest::Client, url: &str, token: &str, session: Uuid) -> Value {
    crate::helpers::eventually(
        Duration::from_secs(90),
        Duration::from_millis(250),
        async || {
            let m: Value = http
                .get(format!("{url}/v1/sessions/{session}/metrics"))
                .bearer_auth(token)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            if m["computed_at"].is_string() {
                Ok(m)
            } else {
                Err(format!("the session's metrics: {m}"))
            }
        },
    )
    .await
}

/// A session's points of `data_type` read through the API (`query` adds e.g. `&step=17ms`).
async fn api_points(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    session: Uuid,
    query: &str,
) -> Value {
    http.get(format!("{url}/v1/sessions/{session}/points?{query}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The whole journey of the issue, in Chromium.
#[tokio::test]
async fn people_use_the_web_app_in_a_real_browser() {
    let stores = Isolated::migrated().await;
    let keys = AccountKeys::generate();
    let up = UpSettings::new(&stores, &keys, "web");
    let process = start_up(&up.env, &up.url).await;
    let url = up.url.clone();
    let http = http_client();
    let driver = Driver::start().await;
    let patient = driver.browser(false).await;

    // Sign-up, with a first name that is HTML.
    let email = format!("web-{}@example.org", Uuid::new_v4().simple());
    patient.open(&url, "#/signup", "Sign up").await;
    patient.accessible("sign-up").await;
    patient.fill("Email", &email).await;
    patient.fill("Password", PASSWORD).await;
    patient.fill("First name", XSS_NAME).await;
    // A date input types in the browser's locale format; the value is set as the form holds it.
    patient
        .js("document.querySelector('input[name=birth_date]').value = '1990-05-17';")
        .await;
    patient.fill("Country", "DE").await;
    patient
        .js("document.getElementById('accept').click();")
        .await;
    patient.click("Create my account").await;
    patient.wait_heading(&format!("Hello, {XSS_NAME}")).await;
    // Shown as text: no element was made of it, no script ran.
    assert_eq!(
        patient
            .js("return document.querySelectorAll('main img, header img').length;")
            .await,
        json!(0)
    );
    assert!(
        patient.client.get_alert_text().await.is_err(),
        "no alert ran"
    );
    // The login token is not readable by script.
    assert_eq!(patient.js("return document.cookie;").await, json!(""));
    patient.accessible("home").await;

    // A device registered in the app; its token shown once.
    patient.open(&url, "#/devices", "Devices").await;
    patient.accessible("devices").await;
    patient.fill("Model", "Polar H10 <b>strap</b>").await;
    patient.click("Register").await;
    patient
        .until(
            "document.querySelector('input[name=token]')",
            "the new token",
        )
        .await;
    let token = patient
        .js("return document.querySelector('input[name=token]').value;")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    assert!(patient.main_text().await.contains("Polar H10 <b>strap</b>"));

    // The device records two sessions in real time; the person follows the HRV one live.
    let mut device = Device::open(&http, &url, &token).await;
    let (session, eeg_session) = (device.hrv, device.eeg);
    let api_token = bearer(&http, &url, &email).await;
    patient
        .client
        .goto(&format!("{url}/#/sessions/{session}"))
        .await
        .unwrap();
    patient
        .until("document.querySelector('.live-status')", "the live section")
        .await;
    let fed = "document.querySelector('.live-feed[data-data-type=rr_interval] dl')?.innerText.includes('RMSSD')";
    let started = Instant::now();
    let mut live_seen = false;
    while !(live_seen && started.elapsed() >= Duration::from_secs(25)) {
        device.stream_until_now().await;
        live_seen =
            live_seen || patient.js(&format!("return Boolean({fed});")).await == json!(true);
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no live feed on the page within 90 s: {}",
            patient.main_text().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    patient.accessible("live session").await;
    device.complete(session).await;
    device.complete(eeg_session).await;
    patient
        .until(
            "document.querySelector('.live-status').textContent === 'The session has ended.'",
            "the live feed's end",
        )
        .await;

    // Every posted sample is stored (the consumer), and the jobs computed the metrics over all of
    // them; then the session page shows the API's numbers.
    for (session, data_type) in [
        (session, "rr_interval"),
        (session, "heart_rate"),
        (eeg_session, "eeg"),
    ] {
        let posted = device.posted[data_type];
        crate::helpers::wait_until(
            Duration::from_secs(60),
            Duration::from_millis(250),
            format!("the {posted} {data_type} samples stored"),
            async || {
                let points = api_points(
                    &http,
                    &url,
                    &api_token,
                    session,
                    &format!("data_type={data_type}&step=24h"),
                )
                .await;
                let stored: u64 = points["buckets"]
                    .as_array()
                    .map(|b| b.iter().map(|b| b["count"].as_u64().unwrap_or(0)).sum())
                    .unwrap_or(0);
                stored == posted as u64
            },
        )
        .await;
    }
    let beats = device.posted["rr_interval"] as u64;
    let metrics: Value = crate::helpers::eventually(
        Duration::from_secs(90),
        Duration::from_millis(250),
        async || {
            let m = computed_metrics(&http, &url, &api_token, session).await;
            let over_all = m["metrics"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["metric"] == "mean_rr_ms" && m["samples"].as_u64() == Some(beats));
            if over_all {
                Ok(m)
            } else {
                Err(format!("metrics over all {beats} beats: {m}"))
            }
        },
    )
    .await;
    let rmssd = metrics["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "rmssd_ms")
        .unwrap_or_else(|| panic!("an RMSSD: {metrics}"))["value"]
        .as_f64()
        .unwrap();
    patient
        .open(&url, "#/", &format!("Hello, {XSS_NAME}"))
        .await;
    patient
        .until(
            &format!("document.querySelector('a[href=\"#/sessions/{session}\"]')"),
            "the session on the home page",
        )
        .await;
    patient
        .client
        .find(Locator::Css(&format!("a[href=\"#/sessions/{session}\"]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    patient
        .until(
            &format!("document.querySelector('main').dataset.ready === '{session}'"),
            "the plots",
        )
        .await;
    // The RR tachogram plotted is the API's RR intervals, one by one.
    let plotted = patient
        .js(
            "const p = document.querySelector('figure[data-data-type=rr_interval] .plot');
             return { data: p.uplot.data, step: p.closest('figure').dataset.step };",
        )
        .await;
    assert_eq!(
        plotted["step"], "raw",
        "a few dozen RR intervals are plotted raw"
    );
    // Drawn: the plot's canvas has ink on it.
    let ink = patient
        .js(
            "const c = document.querySelector('figure[data-data-type=rr_interval] canvas');
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
             return { ink: n, width: c.width, height: c.height };",
        )
        .await;
    assert!(
        ink["ink"].as_u64().unwrap() > 1000,
        "the RR plot is drawn: {ink}"
    );
    let points = api_points(&http, &url, &api_token, session, "data_type=rr_interval").await;
    let samples = points["samples"].as_array().unwrap();
    let xs = plotted["data"][0].as_array().unwrap();
    let ys = plotted["data"][1].as_array().unwrap();
    assert_eq!(samples.len(), device.posted["rr_interval"], "{points}");
    assert_eq!(xs.len(), samples.len());
    for ((x, y), sample) in xs.iter().zip(ys).zip(samples) {
        let t = sample["t_us"].as_i64().unwrap() as f64 / 1e6;
        assert!((x.as_f64().unwrap() - t).abs() < 1e-6, "{x} vs {t}");
        assert_eq!(y.as_f64().unwrap(), sample["values"][0].as_f64().unwrap());
    }
    // The heart rate: as many points as the API holds.
    let heart = patient
        .js("return document.querySelector('figure[data-data-type=heart_rate] .plot').uplot.data[1].length;")
        .await;
    let api_heart = api_points(&http, &url, &api_token, session, "data_type=heart_rate").await;
    assert_eq!(heart, json!(api_heart["samples"].as_array().unwrap().len()));
    // The HRV table shows the API's RMSSD.
    let shown = patient
        .js("const row = [...document.querySelectorAll('main tr')].find(r => r.cells[0]?.textContent === 'RMSSD');
             return row.cells[1].textContent;")
        .await;
    assert!(
        (leading_number(shown.as_str().unwrap()) - rmssd).abs() < 0.051,
        "{shown} vs {rmssd}"
    );
    // The feedback, HTML too, is text.
    assert!(patient.main_text().await.contains(XSS_NAME));
    assert_eq!(
        patient
            .js("return document.querySelectorAll('main img').length;")
            .await,
        json!(0)
    );
    patient.accessible("session").await;
    let shot = patient.screenshot("session-page.png").await;
    eprintln!("screenshot of the session page: {}", shot.display());

    // The EEG session: 6400 samples a channel, plotted as bucket means the API computed (never
    // more points than the screen shows), one stacked plot per channel, band powers as bars.
    computed_metrics(&http, &url, &api_token, eeg_session).await;
    patient
        .client
        .goto(&format!("{url}/#/sessions/{eeg_session}"))
        .await
        .unwrap();
    patient
        .until(
            &format!("document.querySelector('main').dataset.ready === '{eeg_session}'"),
            "the EEG plots",
        )
        .await;
    let eeg = patient
        .js("const f = document.querySelector('figure[data-data-type=eeg]');
             const plots = [...f.querySelectorAll('.plot')];
             return { step: f.dataset.step, plots: plots.length,
                      lengths: plots.map(p => p.uplot.data[0].length),
                      channel0: plots[0].uplot.data, meters: document.querySelectorAll('main meter').length };")
        .await;
    assert_eq!(eeg["plots"], 8, "{eeg}");
    assert_eq!(eeg["meters"], 32, "8 channels × 4 bands: {eeg}");
    let step_us: i64 = eeg["step"]
        .as_str()
        .unwrap()
        .parse()
        .expect("downsampled, not raw");
    for length in eeg["lengths"].as_array().unwrap() {
        assert!(length.as_u64().unwrap() <= 1600, "{eeg}");
    }
    let buckets = api_points(
        &http,
        &url,
        &api_token,
        eeg_session,
        &format!("data_type=eeg&step={}ms", step_us / 1000),
    )
    .await;
    let buckets = buckets["buckets"].as_array().unwrap();
    let (xs, ys) = (&eeg["channel0"][0], &eeg["channel0"][1]);
    assert_eq!(xs.as_array().unwrap().len(), buckets.len());
    for ((x, y), bucket) in xs
        .as_array()
        .unwrap()
        .iter()
        .zip(ys.as_array().unwrap())
        .zip(buckets)
    {
        let t = bucket["t_us"].as_i64().unwrap() as f64 / 1e6;
        assert!((x.as_f64().unwrap() - t).abs() < 1e-6);
        assert!((y.as_f64().unwrap() - bucket["mean"][0].as_f64().unwrap()).abs() < 1e-9);
    }
    patient.accessible("EEG session").await;
    patient.screenshot("eeg-session-page.png").await;
    // Zooming in asks the API again, at a finer step, and draws what it answered.
    patient.click("+ Zoom in").await;
    patient
        .until(
            &format!("(() => {{ const f = document.querySelector('figure[data-data-type=eeg]');
                      return f.dataset.view === 'zoomed' && f.dataset.from !== ''
                          && (f.dataset.step === 'raw' || Number(f.dataset.step) < {step_us}); }})()"),
            "the zoomed view at a finer step",
        )
        .await;
    let zoomed = patient
        .js(
            "const f = document.querySelector('figure[data-data-type=eeg]');
             const u = f.querySelector('.plot').uplot;
             return { from: f.dataset.from, to: f.dataset.to, step: f.dataset.step,
                      data: u.data, idxs: u.series[0].idxs };",
        )
        .await;
    let step = match zoomed["step"].as_str().unwrap() {
        "raw" => String::new(),
        us => format!("&step={}ms", us.parse::<i64>().unwrap() / 1000),
    };
    let answer = api_points(
        &http,
        &url,
        &api_token,
        eeg_session,
        &format!(
            "data_type=eeg&from={}&to={}{step}",
            zoomed["from"].as_str().unwrap(),
            zoomed["to"].as_str().unwrap()
        ),
    )
    .await;
    let rows = answer["buckets"]
        .as_array()
        .or(answer["samples"].as_array())
        .unwrap();
    let plotted_t = zoomed["data"][0].as_array().unwrap();
    assert_eq!(
        plotted_t.len(),
        rows.len(),
        "the zoomed view holds the API's answer"
    );
    for (x, row) in plotted_t.iter().zip(rows) {
        assert!((x.as_f64().unwrap() - row["t_us"].as_i64().unwrap() as f64 / 1e6).abs() < 1e-6);
    }
    // Drawn: what uPlot found in view is (nearly) all of the new data, not the old data's indices.
    let idxs = zoomed["idxs"].as_array().unwrap();
    let (i0, i1) = (idxs[0].as_u64().unwrap(), idxs[1].as_u64().unwrap());
    assert!(
        i0 <= 1 && i1 + 2 >= rows.len() as u64,
        "{idxs:?} of {}",
        rows.len()
    );

    // Trends, the access log, the account page.
    patient.open(&url, "#/trends", "Trends").await;
    patient
        .until("document.querySelector('main table')", "the RMSSD trend")
        .await;
    patient.accessible("trends").await;
    patient.open(&url, "#/access-log", "Who saw my data").await;
    patient.accessible("access log").await;
    patient.open(&url, "#/account", "Account").await;
    patient.accessible("account").await;

    // A practitioner signs up; the patient invites them in the app, they accept in theirs.
    let practitioner = driver.browser(true).await; // on a phone's width
    let terms: Value = http
        .get(format!("{url}/v1/terms"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let terms = terms["version"].as_str().unwrap().to_owned();
    let p_email = format!("web-practitioner-{}@example.org", Uuid::new_v4().simple());
    let signed_up: Value = http
        .post(format!("{url}/v1/users"))
        .json(&json!({ "email": p_email, "password": PASSWORD, "role": "practitioner",
                       "accept_terms": terms, "profile": { "birth_date": "1970-01-01", "country": "DE", "first_name": "Dana" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let p_id = signed_up["user_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{signed_up}"))
        .to_owned();
    practitioner.open(&url, "#/login", "Log in").await;
    practitioner.accessible("login").await;
    practitioner.fill("Email", &p_email).await;
    practitioner.fill("Password", PASSWORD).await;
    practitioner.click("Log in").await;
    practitioner.wait_heading("Hello, Dana").await;

    patient.open(&url, "#/people", "People").await;
    patient.fill("Their id", &p_id).await;
    let select = patient
        .client
        .find(Locator::Css("main select[name=kind]"))
        .await
        .unwrap();
    select
        .select_by_value("lead:practitioner_patient")
        .await
        .unwrap();
    patient.click("Send invitation").await;
    patient
        .until(
            "document.querySelector('main').innerText.includes('waiting for acceptance')",
            "the invitation",
        )
        .await;
    patient.accessible("people").await;

    practitioner.open(&url, "#/people", "People").await;
    practitioner.click("Accept").await;
    practitioner
        .until(
            "document.querySelector('main').innerText.includes('accepted')",
            "the acceptance",
        )
        .await;
    practitioner.accessible("people (phone width)").await;
    practitioner.open(&url, "#/", "Hello, Dana").await;
    practitioner
        .until(
            &format!("document.querySelector('a[href=\"#/sessions/{session}\"]')"),
            "the patient's session on the practitioner's home",
        )
        .await;
    // The patient's first name, decrypted by the API, shown as text.
    assert!(practitioner.main_text().await.contains(XSS_NAME));
    practitioner.accessible("home (phone width)").await;
    practitioner
        .client
        .goto(&format!("{url}/#/sessions/{session}"))
        .await
        .unwrap();
    practitioner
        .until(
            &format!("document.querySelector('main').dataset.ready === '{session}'"),
            "the practitioner's plots",
        )
        .await;

    // The patient revokes; the practitioner's next page load no longer shows the session.
    patient.open(&url, "#/people", "People").await;
    patient.click("Revoke").await;
    patient
        .until(
            "document.querySelector('main').innerText.includes('ended')",
            "the revocation",
        )
        .await;
    // A link inside the app (no reload): home no longer lists the patient or the session …
    practitioner
        .client
        .find(Locator::Css("nav a[href='#/']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    practitioner.wait_heading("Hello, Dana").await;
    assert_eq!(
        practitioner
            .js(&format!(
                "return document.querySelectorAll('a[href=\"#/sessions/{session}\"]').length;"
            ))
            .await,
        json!(0)
    );
    assert!(!practitioner.main_text().await.contains(XSS_NAME));
    // … and the session's address answers as for a stranger.
    practitioner
        .client
        .goto(&format!("{url}/#/sessions/{session}"))
        .await
        .unwrap();
    practitioner.wait_heading("Something went wrong").await;
    assert!(practitioner.main_text().await.contains("session not found"));

    // Erasure, after the warning, with the password: the login is gone.
    patient.open(&url, "#/account", "Account").await;
    patient.fill("Your password", PASSWORD).await;
    patient
        .js("document.getElementById('understand').click();")
        .await;
    patient.click("Erase my account").await;
    patient.wait_heading("Log in").await;
    let login = http
        .post(format!("{url}/v1/auth/login"))
        .json(&json!({ "email": email, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 401);

    patient.client.close().await.unwrap();
    practitioner.client.close().await.unwrap();
    drop(driver);
    process.stop_ok().await;
}

/// The login cookie over plain HTTP: its flags, the Origin check on changes, logout clearing it,
/// and the page's hardening headers.
#[tokio::test]
async fn the_login_cookie_is_http_only_strict_and_changes_need_this_sites_origin() {
    let gw = TestGateway::spawn(&[]).await;
    let person = gw.sign_up("user", 30).await;
    let origin = gw.url.clone();
    let http = http_client();
    let login = |origin: Option<&str>| {
        let mut request = http
            .post(format!("{}/v1/auth/session", gw.url))
            .json(&json!({ "email": person.email, "password": PASSWORD }));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    // Another site's page cannot log a browser in.
    for bad in [None, Some("https://evil.example")] {
        let refused = login(bad).await.unwrap();
        assert_eq!(refused.status(), 403, "{bad:?}");
        assert!(refused.headers().get("set-cookie").is_none());
    }
    let response = login(Some(&origin)).await.unwrap();
    assert_eq!(response.status(), 200);
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set_cookie.contains(flag), "{set_cookie}");
    }
    assert_eq!(
        set_cookie.contains("Secure"),
        gw.url.starts_with("https://"),
        "Secure exactly when served over HTTPS: {set_cookie}"
    );
    assert_eq!(
        set_cookie.starts_with("__Host-biofeed_login="),
        gw.url.starts_with("https://"),
        "the __Host- name exactly when Secure: {set_cookie}"
    );
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    assert!(
        body.get("token").is_none(),
        "the token is only in the cookie: {body}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    // Reads with the cookie alone.
    let me = http
        .get(format!("{}/v1/me", gw.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    assert_eq!(
        me.headers()["cache-control"],
        "no-store",
        "people's data is not cached"
    );
    if gw.url.starts_with("https://") {
        // Over HTTPS a cookie without the __Host- prefix (one a sibling host could plant) is none.
        let planted = cookie.replacen("__Host-", "", 1);
        let refused = http
            .get(format!("{}/v1/me", gw.url))
            .header("cookie", planted)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
    }
    // A change with the cookie needs this site's Origin.
    let register = |origin: Option<&str>| {
        let mut request = http
            .post(format!("{}/v1/me/devices", gw.url))
            .header("cookie", &cookie)
            .json(&json!({ "model": "strap" }));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    // Over HTTPS, this host's address over plain http is another origin too.
    let plain_origin = origin.replacen("https://", "http://", 1);
    let mut bad_origins = vec![None, Some("https://evil.example"), Some("null")];
    if origin.starts_with("https://") {
        bad_origins.push(Some(plain_origin.as_str()));
    }
    for bad in bad_origins {
        let refused = register(bad).await.unwrap();
        assert_eq!(refused.status(), 403, "{bad:?}");
        assert_eq!(
            refused.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(register(Some(&origin)).await.unwrap().status(), 201);
    // Bearer clients (devices' apps, scripts) are not asked for an Origin.
    let (status, _) = gw
        .send(&person, "/v1/me/devices", json!({ "model": "strap 2" }))
        .await;
    assert_eq!(status, 201);

    // Logout clears the cookie, and the token in it stops working at once.
    let out = http
        .post(format!("{}/v1/auth/logout", gw.url))
        .header("cookie", &cookie)
        .header("origin", &origin)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    assert!(out.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let after = http
        .get(format!("{}/v1/me", gw.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);

    // The page and every answer carry the hardening headers.
    let page = http.get(format!("{}/", gw.url)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("http"),
        "{csp}"
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let html = page.text().await.unwrap();
    assert!(html.contains("/assets/app.js"));
    assert!(!html.contains("<script>"), "no inline script");
    let script = http
        .get(format!("{}/assets/app.js", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), 200);
    assert!(script.headers()["content-type"]
        .to_str()
        .unwrap()
        .ends_with("javascript"));
    let etag = script.headers()["etag"].clone();
    let again = http
        .get(format!("{}/assets/app.js", gw.url))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let missing = http
        .get(format!("{}/assets/nope.js", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
}

/// A guardian decides a minor ward's care invitations: the web app's People page lists them
/// (`GET /v1/relationships`), the guardian accepts, and the practitioner may then read; nobody
/// else sees them, nor an adult ward's.
#[tokio::test]
async fn a_guardian_sees_and_decides_a_minor_wards_care_invitations() {
    let gw = TestGateway::spawn(&[]).await;
    let guardian = gw.sign_up("guardian", 40).await;
    let child = gw.sign_up("user", 10).await;
    let grown = gw.sign_up("user", 30).await;
    let practitioner = gw.sign_up("practitioner", 50).await;
    let stranger = gw.sign_up("guardian", 40).await;
    gw.relate(&guardian, &child, "parent_child").await;
    gw.relate(&guardian, &grown, "parent_child").await;
    let invite = |follower: Uuid| {
        gw.send(
            &practitioner,
            "/v1/relationships",
            json!({ "type": "practitioner_patient", "follower_id": follower }),
        )
    };
    let (status, for_child) = invite(child.id).await;
    assert_eq!(status, 201, "{for_child}");
    let (status, for_grown) = invite(grown.id).await;
    assert_eq!(status, 201, "{for_grown}");
    let listed = |person: &crate::people::Person| {
        let person = person.clone();
        let gw = &gw;
        async move {
            let (status, body) = gw.read(&person, "/v1/relationships").await;
            assert_eq!(status, 200, "{body}");
            body.as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let child_invitation = for_child["id"].as_str().unwrap().to_owned();
    let grown_invitation = for_grown["id"].as_str().unwrap().to_owned();
    let guardians = listed(&guardian).await;
    assert!(guardians.contains(&child_invitation), "{guardians:?}");
    assert!(
        !guardians.contains(&grown_invitation),
        "an adult decides for themself: {guardians:?}"
    );
    assert!(!listed(&stranger).await.contains(&child_invitation));
    // Not yet accepted: the practitioner reads nothing of the child's.
    let sessions = format!("/v1/users/{}/sessions", child.id);
    assert_eq!(gw.read(&practitioner, &sessions).await.0, 404);
    // The child cannot accept it alone; the guardian can.
    let accept = format!("/v1/relationships/{child_invitation}/accept");
    assert_eq!(gw.send(&child, &accept, json!({})).await.0, 403);
    let (status, accepted) = gw.send(&guardian, &accept, json!({})).await;
    assert_eq!(status, 200, "{accepted}");
    assert_eq!(gw.read(&practitioner, &sessions).await.0, 200);
}

/// Bad input to the app's new reads: a malformed metric name or time is a 422 naming the field,
/// a person one may not see is a 404, and the gateway keeps serving.
#[tokio::test]
async fn the_trend_read_answers_bad_input_with_a_problem_naming_it() {
    let gw = TestGateway::spawn(&[]).await;
    let person = gw.sign_up("user", 30).await;
    let stranger = gw.sign_up("user", 30).await;
    let base = format!("/v1/users/{}/trend", person.id);
    for (query, field) in [
        ("metric=RMSSD%3B%20DROP", "metric"),
        ("metric=", "metric"),
        ("metric=rmssd_ms&since=last%20week", "since"),
    ] {
        let (status, body) = gw.read(&person, &format!("{base}?{query}")).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    let (status, body) = gw
        .read(&person, &format!("{base}?metric=rmssd_ms&nope=1"))
        .await;
    assert_eq!(status, 400, "an unknown parameter: {body}");
    let (status, _) = gw.read(&stranger, &format!("{base}?metric=rmssd_ms")).await;
    assert_eq!(
        status, 404,
        "another person's trend does not exist for a stranger"
    );
    let (status, body) = gw.read(&person, &format!("{base}?metric=rmssd_ms")).await;
    assert_eq!((status, body), (200, json!([])), "no completed session yet");
}
