//! The gateway serving HTTPS itself: the real binary with certificates of a test CA made here
//! (rcgen), reached by a client that trusts that CA alone; HSTS; the certificate replaced on
//! SIGHUP while points keep flowing; and the start refused (exit 2) for a bad certificate or key.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use biofeed_accounts::{devices, users, AccountKeys, Accounts};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SerialNumber};
use serde_json::json;
use uuid::Uuid;

use crate::gateway_app::now_us;
use crate::helpers::{
    free_port, key_env, run_biofeed, run_biofeed_without, wait_until, BiofeedProcess, Isolated,
};
use crate::up::UpSettings;

const CERT_SETTING: &str = "BIOFEED_GATEWAY_TLS_CERT_FILE";
const KEY_SETTING: &str = "BIOFEED_GATEWAY_TLS_KEY_FILE";

/// A certificate authority of one test, and the directory its files go to (removed on drop).
struct TestCa {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A server certificate for `localhost` and `127.0.0.1`, with its key.
struct Leaf {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("biofeed-tls-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self { dir, cert, key }
    }

    /// A leaf certificate signed by this CA, named `name` with serial `serial`.
    fn leaf(&self, name: &str, serial: u64) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf { cert, key }
    }

    fn cert_path(&self) -> PathBuf {
        self.dir.join("gateway.crt")
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("gateway.key")
    }

    /// Puts `leaf` in the gateway's two files the way an operator's tooling does: each file
    /// written beside and renamed into place.
    fn install(&self, leaf: &Leaf) {
        replace(&self.cert_path(), leaf.cert.pem().as_bytes());
        replace(&self.key_path(), leaf.key.serialize_pem().as_bytes());
    }

    /// A client that trusts this CA only.
    fn client(&self) -> reqwest::Client {
        trusting(&self.cert.pem())
    }
}

/// A client that trusts only the CA certificate `ca_pem`, reports the server's certificate, and
/// speaks h2 when the server offers it.
fn trusting(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .tls_info(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn replace(path: &Path, contents: &[u8]) {
    let beside = path.with_extension("new");
    std::fs::write(&beside, contents).unwrap();
    std::fs::rename(&beside, path).unwrap();
}

/// The certificate (DER) the server presented on the connection that carried `response`.
fn peer_certificate(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("the response carries the server's certificate")
        .to_vec()
}

/// A `biofeed gateway` serving HTTPS with the CA's current files, on this test's stores, with a
/// device that has an open session.
struct HttpsGateway {
    process: BiofeedProcess,
    device: Device,
    _stores: Isolated,
}

/// What posting points takes: the gateway's base URL, a device's token and its open session.
#[derive(Clone)]
struct Device {
    url: String,
    token: String,
    session: Uuid,
}

impl HttpsGateway {
    async fn start(ca: &TestCa) -> Self {
        let stores = Isolated::migrated().await;
        let keys = AccountKeys::generate();
        let port = free_port();
        let mut env = stores.env();
        env.extend(key_env(&keys));
        env.extend([
            ("BIOFEED_GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
            (CERT_SETTING, ca.cert_path().display().to_string()),
            (KEY_SETTING, ca.key_path().display().to_string()),
        ]);
        let process = BiofeedProcess::start(&["gateway"], &env);
        let url = format!("https://127.0.0.1:{port}");
        let client = ca.client();
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(100),
            "the gateway answers /readyz over https",
            async || {
                client
                    .get(format!("{url}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;

        let accounts = Accounts {
            pool: stores.settings.stores.postgres.connect().await.unwrap(),
            keys,
        };
        let email = users::Email::parse(&format!("tls-{}@example.org", stores.id)).unwrap();
        let user = users::create_user(&accounts, &email, "user").await.unwrap();
        let device = devices::create_device(&accounts.pool, user, "test strap")
            .await
            .unwrap();
        let response = client
            .post(format!("{url}/v1/sessions"))
            .bearer_auth(&device.token)
            .json(&json!({ "exercise": "alpha_neurofeedback", "data_types": ["eeg"] }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let opened: serde_json::Value = response.json().await.unwrap();
        Self {
            process,
            device: Device {
                url,
                token: device.token,
                session: opened["session_id"].as_str().unwrap().parse().unwrap(),
            },
            _stores: stores,
        }
    }
}

impl Device {
    /// Posts a frame of ten 8-channel EEG samples with `client`.
    async fn post_points(&self, client: &reqwest::Client) -> reqwest::Result<reqwest::Response> {
        let end = now_us();
        let timestamps: Vec<i64> = (0..10).map(|i| end - (10 - i) * 1_000).collect();
        let values: Vec<Vec<f32>> = (0..10).map(|i| vec![i as f32; 8]).collect();
        client
            .post(format!("{}/v1/sessions/{}/points", self.url, self.session))
            .bearer_auth(&self.token)
            .json(&json!({
                "frame_id": Uuid::new_v4(),
                "data_type": "eeg",
                "timestamps_us": timestamps,
                "values": values,
            }))
            .send()
            .await
    }
}

#[tokio::test]
async fn https_serves_points_with_hsts_and_refuses_plain_http() {
    let ca = TestCa::new("biofeed test ca");
    ca.install(&ca.leaf("gateway", 1));
    let gateway = HttpsGateway::start(&ca).await;
    let client = ca.client();

    let ready = client
        .get(format!("{}/readyz", gateway.device.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.version(), reqwest::Version::HTTP_2, "h2 by ALPN");
    assert_eq!(
        ready.headers()["strict-transport-security"],
        "max-age=31536000"
    );

    let posted = gateway.device.post_points(&client).await.unwrap();
    assert_eq!(posted.status(), 202);
    assert_eq!(
        posted.headers()["strict-transport-security"],
        "max-age=31536000"
    );

    let plain = reqwest::Client::new()
        .get(gateway.device.url.replace("https://", "http://") + "/readyz")
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(plain.is_err(), "plain http answered: {plain:?}");
    gateway.process.stop_ok().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_gateways_ca_refuses_it() {
    let ca = TestCa::new("biofeed test ca");
    ca.install(&ca.leaf("gateway", 1));
    let gateway = HttpsGateway::start(&ca).await;

    let stranger = TestCa::new("another ca");
    let refused = stranger
        .client()
        .get(format!("{}/readyz", gateway.device.url))
        .send()
        .await;
    let error = refused.expect_err("a certificate of an untrusted CA is refused");
    assert!(error.is_connect(), "{error:?}");
    gateway.process.stop_ok().await;
}

#[tokio::test]
async fn sighup_replaces_the_certificate_for_new_connections_and_drops_nothing() {
    let ca = TestCa::new("biofeed test ca");
    let (a, b) = (ca.leaf("gateway-a", 1), ca.leaf("gateway-b", 2));
    ca.install(&a);
    let mut gateway = HttpsGateway::start(&ca).await;
    let url = gateway.device.url.clone();

    // A connection opened before the reload, kept open by the client's pool.
    let kept = ca.client();
    let before = kept.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(peer_certificate(&before), a.cert.der().to_vec());

    // Points posted all along, each on a new connection, so that handshakes race the reload.
    let posted = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let poster = {
        let (posted, device, ca_pem) = (Arc::clone(&posted), gateway.device.clone(), ca.cert.pem());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !*stopped.borrow() {
                match device.post_points(&trusting(&ca_pem)).await {
                    Ok(r) if r.status() == 202 => {}
                    Ok(r) => failures.push(format!("{}: {}", r.status(), r.text().await.unwrap())),
                    Err(e) => failures.push(format!("{e:?}")),
                }
                posted.fetch_add(1, Ordering::SeqCst);
            }
            failures
        })
    };
    let posted_now = || posted.load(Ordering::SeqCst);
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        "points posted before the reload",
        async || posted_now() >= 3,
    )
    .await;

    ca.install(&b);
    gateway.process.signal("HUP");
    let fresh = || ca.client();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "a new connection presents certificate b",
        async || match fresh().get(format!("{url}/readyz")).send().await {
            Ok(r) => peer_certificate(&r) == b.cert.der().to_vec(),
            Err(_) => false,
        },
    )
    .await;
    let at_reload = posted_now();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        "points posted after the reload",
        async || posted_now() >= at_reload + 3,
    )
    .await;

    // The connection opened before still works, and still carries certificate a.
    let after = kept.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(after.status(), 200);
    assert_eq!(peer_certificate(&after), a.cert.der().to_vec());
    let metrics = fresh()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"biofeed_gateway_tls_reloads_total{outcome="ok"} 1"#),
        "{metrics}"
    );

    // A broken new pair is refused: the certificate that serves stays b.
    replace(&ca.cert_path(), b"not a certificate");
    gateway.process.signal("HUP");
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the failed reload is counted",
        async || {
            let metrics = fresh()
                .get(format!("{url}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metrics.contains(r#"biofeed_gateway_tls_reloads_total{outcome="failed"} 1"#)
        },
    )
    .await;
    let still_b = fresh().get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(peer_certificate(&still_b), b.cert.der().to_vec());

    stop.send(true).unwrap();
    let failures = poster.await.unwrap();
    assert!(
        failures.is_empty(),
        "posts failed around the reload: {failures:?}"
    );
    assert!(
        gateway.process.is_running(),
        "SIGHUP did not stop the gateway"
    );
    gateway.process.stop_ok().await;
}

/// The environment of a gateway with the test's TLS files whose start must fail before it
/// reaches any service.
fn refused_env(cert: &Path, key: &Path) -> Vec<(&'static str, String)> {
    let mut env = key_env(&AccountKeys::generate());
    env.extend([
        (
            "BIOFEED_GATEWAY_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("BIOFEED_LOG", "warn".to_owned()),
        (CERT_SETTING, cert.display().to_string()),
        (KEY_SETTING, key.display().to_string()),
    ]);
    env
}

#[tokio::test]
async fn a_bad_certificate_or_key_is_refused_at_start_naming_the_setting_and_the_file() {
    let ca = TestCa::new("biofeed test ca");
    let (a, b) = (ca.leaf("gateway-a", 1), ca.leaf("gateway-b", 2));
    let (cert, key) = (ca.cert_path(), ca.key_path());
    std::fs::write(&cert, a.cert.pem()).unwrap();
    let other_key = ca.dir.join("other.key");
    std::fs::write(&other_key, b.key.serialize_pem()).unwrap();
    std::fs::write(&key, a.key.serialize_pem()).unwrap();
    let garbage = ca.dir.join("garbage.crt");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = ca.dir.join("missing.key");
    // A key's base64 must never be printed.
    let key_body = |pem: String| pem.lines().nth(1).unwrap().to_owned();

    for (cert, key, named, why) in [
        (
            &garbage,
            &key,
            vec![(CERT_SETTING, &garbage)],
            "garbage certificate",
        ),
        (
            &cert,
            &missing,
            vec![(KEY_SETTING, &missing)],
            "missing key",
        ),
        (
            &cert,
            &other_key,
            vec![(KEY_SETTING, &other_key), (CERT_SETTING, &cert)],
            "another certificate's key",
        ),
    ] {
        let run = run_biofeed(&["gateway"], &refused_env(cert, key)).await;
        assert_eq!(run.code, 2, "{why}: {run:?}");
        for (setting, path) in named {
            assert!(run.stderr.contains(setting), "{why}: {run:?}");
            assert!(
                run.stderr.contains(&path.display().to_string()),
                "{why}: {run:?}"
            );
        }
        for secret in [
            key_body(a.key.serialize_pem()),
            key_body(b.key.serialize_pem()),
        ] {
            assert!(!run.stderr.contains(&secret), "{why}: a key in {run:?}");
        }
    }

    // Both or neither.
    let mut only_cert = refused_env(&cert, &key);
    only_cert.retain(|(k, _)| *k != KEY_SETTING);
    let run = run_biofeed_without(&["gateway"], &only_cert, &[KEY_SETTING]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--tls-key-file"), "{run:?}");
}

#[tokio::test]
async fn biofeed_up_reloads_the_gateways_certificate_on_sighup_and_keeps_running() {
    let ca = TestCa::new("biofeed test ca");
    let (a, b) = (ca.leaf("up-a", 1), ca.leaf("up-b", 2));
    ca.install(&a);
    let stores = Isolated::migrated().await;
    let up = UpSettings::new(&stores, &AccountKeys::generate(), "tls");
    let mut env = up.env;
    env.extend([
        (CERT_SETTING, ca.cert_path().display().to_string()),
        (KEY_SETTING, ca.key_path().display().to_string()),
    ]);
    let url = up.url.replace("http://", "https://");
    let mut process = BiofeedProcess::start(&["up"], &env);
    let presents = async |leaf: &Leaf| match ca.client().get(format!("{url}/readyz")).send().await {
        Ok(r) => r.status().is_success() && peer_certificate(&r) == leaf.cert.der().to_vec(),
        Err(_) => false,
    };
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "biofeed up serves https with certificate a",
        async || presents(&a).await,
    )
    .await;

    ca.install(&b);
    process.signal("HUP");
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "biofeed up presents certificate b",
        async || presents(&b).await,
    )
    .await;
    assert!(process.is_running(), "SIGHUP did not stop biofeed up");
    process.stop_ok().await;
}

#[tokio::test]
async fn plain_http_serving_sends_no_hsts() {
    // Behind a terminating proxy, HSTS is the proxy's to send. A gateway given no certificate
    // (the local stack's, which `compose/local test` exports, removed) serves plain HTTP.
    let stores = Isolated::migrated().await;
    let keys = AccountKeys::generate();
    let port = free_port();
    let mut env: Vec<(&'static str, String)> = stores
        .env()
        .into_iter()
        .filter(|(k, _)| *k != CERT_SETTING && *k != KEY_SETTING)
        .collect();
    env.extend(key_env(&keys));
    env.push(("BIOFEED_GATEWAY_LISTEN", format!("127.0.0.1:{port}")));
    let _process = BiofeedProcess::start_without(&["gateway"], &env, &[CERT_SETTING, KEY_SETTING]);
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let response = crate::helpers::eventually(
        Duration::from_secs(60),
        Duration::from_millis(100),
        async || {
            client
                .get(format!("{url}/healthz"))
                .send()
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("strict-transport-security")
        .is_none());
}

#[tokio::test]
async fn sigterm_over_https_lets_the_request_in_flight_finish() {
    let ca = TestCa::new("biofeed test ca");
    ca.install(&ca.leaf("gateway", 1));
    let gateway = HttpsGateway::start(&ca).await;
    let device = gateway.device.clone();

    // A frame whose body arrives in two halves, the second only after SIGTERM.
    let end = now_us();
    let frame = json!({
        "frame_id": Uuid::new_v4(),
        "data_type": "eeg",
        "timestamps_us": [end - 2_000, end - 1_000],
        "values": [vec![1.0_f32; 8], vec![2.0_f32; 8]],
    })
    .to_string()
    .into_bytes();
    let (first, rest) = frame.split_at(frame.len() / 2);
    let (chunks, received) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(2);
    chunks.send(Ok(first.to_vec())).await.unwrap();
    let body = futures_util::stream::unfold(received, |mut received| async move {
        received.recv().await.map(|chunk| (chunk, received))
    });
    let posting = {
        let client = ca.client();
        let url = format!("{}/v1/sessions/{}/points", device.url, device.session);
        let token = device.token.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await
        })
    };
    let fresh = || ca.client();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the point request is in flight",
        async || {
            let metrics = match fresh().get(format!("{}/metrics", device.url)).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            metrics.contains("biofeed_gateway_in_flight_requests 1")
        },
    )
    .await;

    gateway.process.signal("TERM");
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the stopping gateway takes no new connections",
        async || {
            fresh()
                .get(format!("{}/healthz", device.url))
                .send()
                .await
                .is_err()
        },
    )
    .await;
    chunks.send(Ok(rest.to_vec())).await.unwrap();
    drop(chunks);
    let answered = posting.await.unwrap().unwrap();
    assert_eq!(answered.status(), 202, "{}", answered.text().await.unwrap());
    let run = gateway
        .process
        .wait_within(Duration::from_secs(60), "the gateway stops after SIGTERM")
        .await;
    assert_eq!(run.code, 0, "{run:?}");
}
