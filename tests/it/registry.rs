//! The schema registry step of `biofeed migrate`, against the real registry `compose/local`
//! starts (Apicurio Registry, Confluent-compatible API): each test's own topic names make its
//! own subjects.

use biofeed_backends::registry::{Registry, RegistryError};
use serde_json::Value;

use crate::helpers::Isolated;

/// v1 of the frame schema with one more field, with or without a default.
fn v1_plus_field(default: bool) -> String {
    let mut schema: Value =
        serde_json::from_str(biofeed_schema::registry::SENSOR_FRAME_V1).unwrap();
    let mut field = serde_json::json!({ "name": "calibration", "type": "string" });
    if default {
        field["default"] = Value::String(String::new());
    }
    schema["fields"].as_array_mut().unwrap().push(field);
    schema.to_string()
}

#[tokio::test]
async fn migrate_registers_the_frame_schema_full_transitive_and_the_registry_refuses_an_incompatible_edit(
) {
    let stores = Isolated::new().await;
    let registry = Registry::new(&stores.settings.stores.registry)
        .unwrap()
        .expect("compose/local gives the migrate role a registry");
    let subject = format!("{}-value", stores.settings.stores.topics.points);
    let run = stores.biofeed(&["migrate"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains(&format!("{subject} v1")) && run.stdout.contains("FULL_TRANSITIVE"),
        "{run:?}"
    );
    assert_eq!(
        registry.compatibility(&subject).await.unwrap().as_deref(),
        Some("FULL_TRANSITIVE")
    );
    let id = registry
        .id_of(&subject, biofeed_schema::registry::SENSOR_FRAME_V1)
        .await
        .unwrap()
        .expect("v1 registered");
    // Again: nothing new, the same id.
    let again = stores.biofeed(&["migrate"]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stdout.contains(&format!("schema id {id}")),
        "{again:?}"
    );

    // A new field without a default: old frames cannot be read with it. Refused, with the
    // registry's reason; with a default it is accepted.
    match registry.register(&subject, &v1_plus_field(false)).await {
        Err(RegistryError::Incompatible { reason, .. }) => {
            assert!(reason.contains("calibration"), "{reason}")
        }
        other => panic!("an incompatible edit was not refused: {other:?}"),
    }
    let next = registry
        .register(&subject, &v1_plus_field(true))
        .await
        .expect("a new field with a default is compatible");
    assert_ne!(next, id);
}

#[tokio::test]
async fn a_schema_version_the_registry_refuses_stops_migrate_with_exit_4_and_its_reason() {
    let stores = Isolated::new().await;
    let registry = Registry::new(&stores.settings.stores.registry)
        .unwrap()
        .unwrap();
    let subject = format!("{}-value", stores.settings.stores.topics.points);
    // The subject already holds a version that biofeed's v1 cannot read all data of: v1 lacks a
    // field it requires.
    registry
        .set_compatibility(&subject, "FULL_TRANSITIVE")
        .await
        .unwrap();
    registry
        .register(&subject, &v1_plus_field(false))
        .await
        .unwrap();
    let run = stores.biofeed(&["migrate"]).await;
    assert_eq!(run.code, 4, "{run:?}");
    assert_eq!(stores.postgres_tables().await, 0, "no store was changed");
    assert!(
        run.stderr
            .contains(&format!("refused version 1 of {subject}"))
            && run.stderr.contains("Incompatible"),
        "{run:?}"
    );
}

#[tokio::test]
async fn a_registry_away_stops_migrate_before_any_store_changes_naming_the_setting() {
    let stores = Isolated::new().await;
    let away = crate::helpers::run_biofeed(
        &["migrate"],
        &crate::helpers::with(
            stores.env_as(crate::helpers::Role::Migrate),
            "BIOFEED_SCHEMA_REGISTRY_URL",
            format!(
                "https://127.0.0.1:{}/apis/ccompat/v7",
                crate::helpers::free_port()
            ),
        ),
    )
    .await;
    assert_eq!(away.code, 3, "{away:?}");
    assert!(
        away.stderr.contains("BIOFEED_SCHEMA_REGISTRY_URL"),
        "{away:?}"
    );
    assert_eq!(stores.postgres_tables().await, 0, "nothing was migrated");
}

/// The Python block of docs/schema-registry.md, as it stands there.
fn documented_python_reader() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/schema-registry.md")).unwrap();
    let start = doc.find("```python\n").expect("a python block") + "```python\n".len();
    let end = start + doc[start..].find("```").unwrap();
    doc[start..end].to_owned()
}

/// The gateway's Confluent framing: `00`, the schema id, the body.
fn confluent_id(message: &[u8]) -> u32 {
    assert_eq!(message[0], 0, "Confluent magic byte");
    u32::from_be_bytes(message[1..5].try_into().unwrap())
}

#[tokio::test]
async fn the_gateway_publishes_the_confluent_wire_format_which_a_confluent_client_reads_with_only_the_registry(
) {
    let gw = crate::gateway_app::TestGateway::spawn(&[]).await;
    let settings = &gw.stores.settings.stores;
    let registry = Registry::new(&settings.registry).unwrap().unwrap();
    let subject = format!("{}-value", settings.topics.points);
    let id = registry.current_id(&subject).await.unwrap();
    let session = gw.open_session("breath_hold", &["spo2", "ppg"]).await;
    let mut sent = Vec::new();
    for (data_type, channels) in [("ppg", 2), ("spo2", 1), ("ppg", 2)] {
        let (frame_id, body) = crate::gateway::json_frame(data_type, 6, channels, 90.0);
        let response = gw
            .post(&format!("/v1/sessions/{session}/points"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        sent.push((frame_id, body));
    }
    let messages = gw.topic_messages().await;
    assert_eq!(messages.len(), 3);
    for (_, value) in &messages {
        assert_eq!(confluent_id(value), id, "the registry's id for v1");
    }

    // An independent reader: Python's confluent-kafka, with the registry and the test's topic,
    // as the consumers' Kafka user.
    let mut env: Vec<(&str, String)> = gw.stores.env_as(crate::helpers::Role::Consume);
    env.push((
        "READER_GROUP",
        format!("biofeed-doc-reader-{}", gw.stores.id),
    ));
    let python = std::env::var("BIOFEED_TEST_PYTHON")
        .unwrap_or_else(|_| ".state/venv/bin/python".to_owned());
    let output = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(documented_python_reader())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap_or_else(|e| panic!("{python} runs (compose/local test installs it): {e}"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let decoded: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(decoded.len(), 3, "{decoded:?}");
    for (frame_id, body) in &sent {
        let frame = decoded
            .iter()
            .find(|d| d["frame_id"] == frame_id.to_string())
            .unwrap_or_else(|| panic!("frame {frame_id} read: {decoded:?}"));
        assert_eq!(frame["session_id"], session.to_string());
        assert_eq!(frame["user_id"], gw.user.to_string());
        assert_eq!(frame["data_type"], body["data_type"]);
        let values: Vec<f64> = frame["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let sent_values: Vec<f64> = body["values"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| match s {
                Value::Array(a) => a.iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>(),
                v => vec![v.as_f64().unwrap()],
            })
            .collect();
        assert_eq!(values, sent_values);
        let times: Vec<i64> = frame["offsets_us"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| frame["t0_us"].as_i64().unwrap() + o.as_i64().unwrap())
            .collect();
        let sent_times: Vec<i64> = body["timestamps_us"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect();
        assert_eq!(times, sent_times);
    }
}

/// A TCP forwarder to the registry that can be cut and restored: what the registry going away
/// looks like to its clients. Its listener stays bound throughout (no other socket can take the
/// port meanwhile); cut, it closes every connection and drops new ones at once.
struct Cuttable {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    async fn to(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = target.to_owned();
        let (cut, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *watch.borrow() {
                    continue; // dropped: closed at once
                }
                let target = target.clone();
                let mut watch = watch.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = watch.wait_for(|cut| *cut) => {}
                        }
                    }
                });
            }
        });
        Self { port, cut, task }
    }

    /// The registry is away from now on (until [`Cuttable::restore`]).
    fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// The registry is back.
    fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

#[tokio::test]
async fn a_registry_away_stops_a_gateway_at_start_with_exit_3_and_not_once_it_has_the_id() {
    let stores = Isolated::migrated().await;
    let brokers = stores.settings.stores.kafka.brokers.clone();
    let url = stores.settings.stores.registry.url.clone().unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());

    // At start: nothing listens where the registry should be.
    let closed = crate::helpers::free_port();
    let mut away = url.clone();
    away.set_port(Some(closed)).unwrap();
    let mut env = stores.env_as(crate::helpers::Role::Gateway);
    env = crate::helpers::with(env, "BIOFEED_SCHEMA_REGISTRY_URL", away.to_string());
    env.extend(crate::helpers::key_env(
        &biofeed_accounts::AccountKeys::generate(),
    ));
    env.push(("BIOFEED_GATEWAY_LISTEN", "127.0.0.1:0".to_owned()));
    let run = crate::helpers::run_biofeed(&["gateway"], &env).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("BIOFEED_SCHEMA_REGISTRY_URL")
            && run.stderr.contains(&format!("localhost:{closed}")),
        "{run:?}"
    );

    // Once started through a registry that then goes away, it publishes on with the id it has.
    let proxy = Cuttable::to(&target).await;
    let mut through = url.clone();
    through.set_port(Some(proxy.port)).unwrap();
    let gw = crate::gateway_app::TestGateway::spawn_on(
        stores,
        &brokers,
        &["--schema-registry-url", through.as_str()],
    )
    .await;
    proxy.cut();
    let refused = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
        .get(through.clone())
        .send()
        .await;
    assert!(refused.is_err(), "the registry is away now");
    let session = gw.open_session("breath_hold", &["spo2"]).await;
    let (_, body) = crate::gateway::json_frame("spo2", 4, 1, 95.0);
    let response = gw
        .post(&format!("/v1/sessions/{session}/points"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let messages = gw.topic_messages().await;
    assert_eq!(messages.len(), 1);
    let real = Registry::new(&crate::helpers::default_settings().stores.registry)
        .unwrap()
        .unwrap();
    let subject = format!("{}-value", gw.stores.settings.stores.topics.points);
    assert_eq!(
        confluent_id(&messages[0].1),
        real.current_id(&subject).await.unwrap()
    );
}

#[tokio::test]
async fn consumers_and_replay_store_a_topic_of_both_framings_and_a_newer_writer_once_and_dead_letter_unknown_ids(
) {
    use biofeed_schema::{encode, encode_framed, Framing};

    use crate::consumers::*;
    let stores = migrated().await;
    let settings = &stores.settings.stores;
    let registry = Registry::new(&settings.registry).unwrap().unwrap();
    let subject = format!("{}-value", settings.topics.points);
    let v1 = registry.current_id(&subject).await.unwrap();
    // A newer version (a field with a default, at the end) registered by a newer build: this
    // build knows it only through the registry.
    let v2 = registry
        .register(&subject, &v1_plus_field(true))
        .await
        .unwrap();
    assert_ne!(v1, v2);

    let user = uuid::Uuid::new_v4();
    let sent = frames(user, 3, 60, 40);
    register_sessions(&stores, &sent).await;
    let framed = |i: usize, f: &biofeed_schema::SensorFrame| match i % 3 {
        0 => encode(f),
        1 => encode_framed(f, Framing::Confluent { schema_id: v1 }),
        _ => {
            // v2's body: v1's plus the new string field ("x").
            let mut bytes = encode_framed(f, Framing::Confluent { schema_id: v2 });
            bytes.extend_from_slice(&[2, b'x']);
            bytes
        }
    };
    let mut payloads: Vec<(String, Vec<u8>)> = sent
        .iter()
        .enumerate()
        .map(|(i, f)| (f.session_id.to_string(), framed(i, f)))
        .collect();
    // The first ten again in another framing: a gateway switched framing while devices retried.
    payloads.extend(
        sent[..10]
            .iter()
            .enumerate()
            .map(|(i, f)| (f.session_id.to_string(), framed(i + 1, f))),
    );
    // A schema id the registry never gave, and a magic byte of neither framing.
    let mut unknown_id = encode_framed(
        &sent[0],
        Framing::Confluent {
            schema_id: 2_147_483_000,
        },
    );
    unknown_id.truncate(40);
    payloads.push(("poison".to_owned(), unknown_id));
    let mut neither = encode(&sent[1]);
    neither[0] = b'{';
    payloads.push(("poison".to_owned(), neither));
    produce(&settings.kafka, &settings.topics.points, payloads).await;

    let group = format!("biofeed-test-group-{}", stores.id);
    let consumer = ConsumerProcess::start(&consumer_env(&stores, &[]));
    wait_for_points(&stores, points_of(&sent)).await;
    wait_until_committed(&stores, &group).await;
    let stderr = consumer.stop_ok().await;
    assert!(stderr.contains("2 frames dead-lettered"), "{stderr}");
    let dlq = dead_letters(&stores).await;
    let reasons: Vec<&str> = dlq.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown schema id 2147483000")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("neither Avro single-object encoding")),
        "{reasons:?}"
    );
    let distinct = "SELECT count() FROM (SELECT DISTINCT session_id, t_us FROM points)";
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points FINAL").await,
        points_of(&sent)
    );
    assert_eq!(clickhouse_count(&stores, distinct).await, points_of(&sent));

    // A replay of the whole topic: every frame in either framing written, the poison skipped,
    // still every point once and exactly as sent.
    let run = stores.biofeed(&["replay"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let summary: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            summary["messages"].as_u64(),
            summary["frames"].as_u64(),
            summary["skipped"].as_u64()
        ),
        (Some(72), Some(70), Some(2)),
        "{run:?}"
    );
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points FINAL").await,
        points_of(&sent)
    );
    let sum_sent: f64 = sent
        .iter()
        .flat_map(|f| f.values.iter().map(|v| f64::from(*v)))
        .sum();
    let ch = settings.clickhouse.connect().await.unwrap();
    let sum_stored: f64 = ch
        .client()
        .query("SELECT sum(toFloat64(arraySum(values))) FROM points FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert!(
        (sum_stored - sum_sent).abs() < 1e-6 * sum_sent.abs().max(1.0),
        "{sum_stored} vs {sum_sent}"
    );
}

#[tokio::test]
async fn a_consumer_holds_a_frame_while_the_registry_is_away_and_stores_it_once_when_it_is_back() {
    use biofeed_schema::{encode_framed, Framing};

    use crate::consumers::*;
    let stores = migrated().await;
    let settings = &stores.settings.stores;
    let registry = Registry::new(&settings.registry).unwrap().unwrap();
    let subject = format!("{}-value", settings.topics.points);
    // A version the consumer learns only from the registry, when its first frame comes.
    let v2 = registry
        .register(&subject, &v1_plus_field(true))
        .await
        .unwrap();
    let url = settings.registry.url.clone().unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let proxy = Cuttable::to(&target).await;
    let mut through = url.clone();
    through.set_port(Some(proxy.port)).unwrap();
    let metrics = format!("127.0.0.1:{}", crate::helpers::free_port());
    let env = consumer_env(
        &stores,
        &[
            ("BIOFEED_SCHEMA_REGISTRY_URL", through.to_string()),
            ("BIOFEED_CONSUMER_METRICS_LISTEN", metrics.clone()),
        ],
    );
    let consumer = ConsumerProcess::start(&env);
    let every = std::time::Duration::from_millis(100);
    let minute = std::time::Duration::from_secs(60);
    crate::helpers::wait_until(minute, every, "the consumer serves", async || {
        !metrics_text(&metrics).await.is_empty()
    })
    .await;
    // The registry goes away; then frames of the new version come.
    proxy.cut();
    let sent = frames(uuid::Uuid::new_v4(), 2, 20, 30);
    register_sessions(&stores, &sent).await;
    let payloads = sent.iter().map(|f| {
        let mut bytes = encode_framed(f, Framing::Confluent { schema_id: v2 });
        bytes.extend_from_slice(&[0]); // the new field, an empty string
        (f.session_id.to_string(), bytes)
    });
    produce(
        &settings.kafka,
        &settings.topics.points,
        payloads.collect::<Vec<_>>(),
    )
    .await;
    crate::helpers::wait_until(minute, every, "the consumer asked in vain", async || {
        metrics_text(&metrics).await.lines().any(|l| {
            l.strip_prefix("biofeed_consumer_registry_failures_total ")
                .is_some_and(|n| n.trim().parse::<f64>().is_ok_and(|n| n >= 2.0))
        })
    })
    .await;
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points").await,
        0,
        "held, not written"
    );
    assert!(
        dead_letters(&stores).await.is_empty(),
        "held, not dead-lettered"
    );

    // The registry is back: every frame stored once, none dead-lettered.
    proxy.restore();
    wait_for_points(&stores, points_of(&sent)).await;
    wait_until_committed(&stores, &format!("biofeed-test-group-{}", stores.id)).await;
    consumer.stop_ok().await;
    assert!(dead_letters(&stores).await.is_empty());
    assert_eq!(
        clickhouse_count(&stores, "SELECT count() FROM points FINAL").await,
        points_of(&sent)
    );
}

#[tokio::test]
async fn a_consumer_without_a_registry_stops_with_exit_2_at_a_confluent_frame_and_dead_letters_nothing(
) {
    use biofeed_schema::{encode_framed, Framing};

    use crate::consumers::*;
    let stores = migrated().await;
    let settings = &stores.settings.stores;
    let registry = Registry::new(&settings.registry).unwrap().unwrap();
    let subject = format!("{}-value", settings.topics.points);
    let v1 = registry.current_id(&subject).await.unwrap();
    let sent = frames(uuid::Uuid::new_v4(), 1, 5, 20);
    register_sessions(&stores, &sent).await;
    let payloads = sent.iter().map(|f| {
        (
            f.session_id.to_string(),
            encode_framed(f, Framing::Confluent { schema_id: v1 }),
        )
    });
    produce(
        &settings.kafka,
        &settings.topics.points,
        payloads.collect::<Vec<_>>(),
    )
    .await;

    let registry_settings = [
        "BIOFEED_SCHEMA_REGISTRY_URL",
        "BIOFEED_SCHEMA_REGISTRY_USER",
        "BIOFEED_SCHEMA_REGISTRY_PASSWORD",
        "BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE",
        "BIOFEED_SCHEMA_REGISTRY_CA_FILE",
    ];
    let mut env = consumer_env(&stores, &[]);
    env.retain(|(k, _)| !registry_settings.contains(k));
    let run = crate::helpers::BiofeedProcess::start_without(&["consume"], &env, &registry_settings)
        .wait_within(std::time::Duration::from_secs(60), "the consumer stops")
        .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("BIOFEED_SCHEMA_REGISTRY_URL")
            && run.stderr.contains("Confluent wire format"),
        "{run:?}"
    );
    assert!(dead_letters(&stores).await.is_empty());
    // Configured, a consumer of the same group then stores every frame.
    let consumer = ConsumerProcess::start(&consumer_env(&stores, &[]));
    wait_for_points(&stores, points_of(&sent)).await;
    consumer.stop_ok().await;
    assert!(dead_letters(&stores).await.is_empty());
}

/// The first SQL block of docs/schema-registry.md that reads a file, as it stands there.
fn documented_clickhouse_query() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/schema-registry.md")).unwrap();
    doc.split("```sql\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap())
        .find(|block| block.contains("FROM file("))
        .expect("a SQL block reading a file")
        .to_owned()
}

#[tokio::test]
async fn a_current_clickhouse_reads_the_gateways_messages_as_avro_confluent_with_the_registry() {
    let gw = crate::gateway_app::TestGateway::spawn(&[]).await;
    let session = gw.open_session("breath_hold", &["spo2", "ppg"]).await;
    let mut sent = Vec::new();
    for (data_type, channels) in [("spo2", 1), ("ppg", 2)] {
        let (frame_id, body) = crate::gateway::json_frame(data_type, 5, channels, 80.0);
        let response = gw
            .post(&format!("/v1/sessions/{session}/points"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let values: Vec<f64> = body["values"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|sample| {
                sample
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
            })
            .collect();
        sent.push((frame_id, data_type, channels, values));
    }
    // The topic's raw values, one after another, as any Kafka client dumps them.
    let dir = std::env::temp_dir().join(format!("biofeed-avroconfluent-{}", gw.stores.id));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("points.avro");
    let values: Vec<u8> = gw
        .topic_messages()
        .await
        .into_iter()
        .flat_map(|(_, v)| v)
        .collect();
    std::fs::write(&file, values).unwrap();

    let settings = &gw.stores.settings.stores.registry;
    let password = std::fs::read_to_string(
        crate::helpers::role_env(crate::helpers::Role::Consume)
            .iter()
            .find(|(k, _)| *k == "BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE")
            .map(|(_, v)| v.clone())
            .expect("the registry's password file"),
    )
    .unwrap();
    let url = settings.url.as_ref().unwrap();
    let query = documented_clickhouse_query()
        .replace("'points.avro'", &format!("'{}'", file.display()))
        .replace("PASSWORD", password.trim())
        .replace(
            "https://biofeed:",
            &format!("{}://{}:", url.scheme(), settings.user.as_deref().unwrap()),
        )
        .replace(
            "@localhost:8081/apis/ccompat/v7",
            &format!(
                "@{}:{}{}",
                url.host_str().unwrap(),
                url.port().unwrap(),
                url.path().trim_end_matches('/')
            ),
        );
    let python = std::env::var("BIOFEED_TEST_PYTHON")
        .unwrap_or_else(|_| ".state/venv/bin/python".to_owned());
    let output = tokio::process::Command::new(&python)
        .args([
            "-c",
            "import chdb, os\nprint(chdb.query(os.environ['QUERY'], 'JSONEachRow'), end='')",
        ])
        // In the environment, not the command line: the query holds the registry's password.
        .env("QUERY", &query)
        .env("SSL_CERT_FILE", settings.ca_file.as_ref().unwrap())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{python} runs (compose/local test installs chdb): {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !stdout.trim().is_empty(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), sent.len(), "{rows:?}");
    for (frame_id, data_type, channels, values) in &sent {
        let row = rows
            .iter()
            .find(|r| r["frame_id"] == frame_id.to_string())
            .unwrap_or_else(|| panic!("{frame_id} in {rows:?}"));
        assert_eq!(row["session_id"], session.to_string());
        assert_eq!(row["data_type"], *data_type);
        assert_eq!(row["channels"], *channels);
        let read: Vec<f32> = row["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let values: Vec<f32> = values.iter().map(|v| *v as f32).collect();
        assert_eq!(read, values);
    }
}

#[tokio::test]
async fn a_registry_away_at_start_stops_consume_replay_and_live_with_exit_3_naming_the_setting() {
    let stores = crate::consumers::migrated().await;
    let url = stores.settings.stores.registry.url.clone().unwrap();
    let closed = crate::helpers::free_port();
    let mut away = url.clone();
    away.set_port(Some(closed)).unwrap();
    for (role, args) in [
        (crate::helpers::Role::Consume, &["consume"][..]),
        (crate::helpers::Role::Replay, &["replay"][..]),
        (crate::helpers::Role::Live, &["live"][..]),
    ] {
        let env = crate::helpers::with(
            stores.env_as(role),
            "BIOFEED_SCHEMA_REGISTRY_URL",
            away.to_string(),
        );
        let run = crate::helpers::run_biofeed(args, &env).await;
        assert_eq!(run.code, 3, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("BIOFEED_SCHEMA_REGISTRY_URL")
                && run.stderr.contains(&format!("localhost:{closed}")),
            "{args:?}: {run:?}"
        );
    }
}

/// The `n`th properties block of docs/schema-registry.md, as it stands there.
fn documented_properties(n: usize) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/schema-registry.md")).unwrap();
    doc.split("```properties\n")
        .nth(n + 1)
        .and_then(|block| block.split("```").next())
        .unwrap_or_else(|| panic!("properties block {n}"))
        .to_owned()
}

/// The password in the file a role's setting names.
fn role_secret(role: crate::helpers::Role, setting: &str) -> String {
    let path = crate::helpers::role_env(role)
        .iter()
        .find(|(k, _)| *k == setting)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{setting} in the role's settings"));
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

#[tokio::test]
async fn kafka_connect_reads_the_gateways_messages_with_apicurios_converter_and_the_registry() {
    use crate::helpers::Role;
    let classpath = std::fs::read_to_string(
        std::env::var("BIOFEED_TEST_CONNECT_CLASSPATH")
            .expect("BIOFEED_TEST_CONNECT_CLASSPATH (compose/local test sets it)"),
    )
    .expect("Kafka Connect's classpath (compose/local test resolves it)");
    let gw = crate::gateway_app::TestGateway::spawn(&[]).await;
    let session = gw.open_session("breath_hold", &["spo2", "ppg"]).await;
    let mut sent = Vec::new();
    for (data_type, channels) in [("spo2", 1), ("ppg", 2)] {
        let (frame_id, body) = crate::gateway::json_frame(data_type, 4, channels, 70.0);
        let response = gw
            .post(&format!("/v1/sessions/{session}/points"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        sent.push((frame_id, data_type));
    }

    let stores = &gw.stores.settings.stores;
    let registry_url = stores.registry.url.as_ref().unwrap();
    let registry_base = format!(
        "{}://{}:{}",
        registry_url.scheme(),
        registry_url.host_str().unwrap(),
        registry_url.port().unwrap()
    );
    let ca = stores
        .registry
        .ca_file
        .as_ref()
        .unwrap()
        .display()
        .to_string();
    // The worker's files hold passwords: a directory only we may read, gone however the test ends.
    let own = crate::helpers::ServerProcess::new("connect");
    let dir = own.dir.clone();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = dir.join("points.txt");
    let truststore = dir.join("registry-ca.p12");
    let keytool = std::process::Command::new("keytool")
        .args([
            "-importcert",
            "-noprompt",
            "-alias",
            "biofeed-local-ca",
            "-file",
        ])
        .arg(&ca)
        .arg("-keystore")
        .arg(&truststore)
        .args(["-storetype", "PKCS12", "-storepass", "changeit"])
        .output()
        .expect("keytool runs (it comes with Java)");
    assert!(
        keytool.status.success(),
        "{}",
        String::from_utf8_lossy(&keytool.stderr)
    );
    let fill = |text: String| {
        text.replace(
            "KAFKA-PASSWORD",
            &role_secret(Role::Consume, "BIOFEED_KAFKA_PASSWORD_FILE"),
        )
        .replace(
            "REGISTRY-PASSWORD",
            &role_secret(Role::Consume, "BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE"),
        )
        .replace(".state/tls/ca.pem", &ca)
        .replace("localhost:9092", &stores.kafka.brokers)
        .replace("https://localhost:8081", &registry_base)
        .replace("=biofeed.points.v1", &format!("={}", stores.topics.points))
        .replace(
            "connect.offsets",
            &dir.join("connect.offsets").display().to_string(),
        )
        .replace("=points.txt", &format!("={}", out.display()))
        .replace("=registry-ca.p12", &format!("={}", truststore.display()))
        .replace("127.0.0.1:8083", "127.0.0.1:0")
        .replace(
            "biofeed-connect-points-to-file",
            &format!("biofeed-connect-points-to-file-{}", gw.stores.id),
        )
    };
    let worker = dir.join("connect-worker.properties");
    let connector = dir.join("points-to-file.properties");
    for (path, text) in [
        (&worker, fill(documented_properties(0))),
        (&connector, fill(documented_properties(1))),
    ] {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }
    let log = dir.join("connect.log");
    let mut java = tokio::process::Command::new("java")
        .arg("-cp")
        .arg(classpath.trim())
        .arg("org.apache.kafka.connect.cli.ConnectStandalone")
        .arg(&worker)
        .arg(&connector)
        .current_dir(&dir)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("connect.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("java runs (compose/local installs it)");
    let logs = || {
        let text = ["connect.log", "connect.err"]
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
            .join("\n");
        // The end says why.
        let start = text.len().saturating_sub(4000);
        let start = (start..=text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    };
    let lines = crate::helpers::eventually(
        std::time::Duration::from_secs(120),
        std::time::Duration::from_millis(250),
        async || {
            if let Ok(Some(status)) = java.try_wait() {
                return Ok(Err(status));
            }
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.len() >= sent.len() {
                Ok(Ok(lines))
            } else {
                Err(format!(
                    "{} of {} frames written; the worker's log ends:\n{}",
                    lines.len(),
                    sent.len(),
                    logs()
                ))
            }
        },
    )
    .await;
    let _ = java.kill().await;
    let lines =
        lines.unwrap_or_else(|status| panic!("Kafka Connect stopped ({status}):\n{}", logs()));
    assert_eq!(lines.len(), sent.len(), "{lines:?}");
    for (frame_id, data_type) in &sent {
        let line = lines
            .iter()
            .find(|l| l.contains(&frame_id.to_string()))
            .unwrap_or_else(|| panic!("{frame_id} in {lines:?}"));
        assert!(line.starts_with("Struct{"), "{line}");
        assert!(line.contains(&format!("data_type={data_type}")), "{line}");
        assert!(line.contains(&format!("session_id={session}")), "{line}");
    }
    drop(own);
}
