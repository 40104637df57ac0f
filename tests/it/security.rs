//! Secure connections and least privilege (issue 15), against compose/local's secure stack:
//! what each server says about our connections, refusals that are quick, exit 2, name the setting
//! and the address and never the secret, and each identity able to do what it needs and nothing
//! more.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::gateway_app::TestGateway;
use crate::helpers::{role_env, state_dir, with, Isolated, Role, Run};

/// A file of the local stack's certificates (`.state/tls/…`).
fn tls_file(name: &str) -> String {
    state_dir().join("tls").join(name).display().to_string()
}

/// Fails the test unless the tests run against the secure stack (as `compose/local test` does).
fn require_secure_stack() {
    assert!(
        !role_env(Role::Migrate).is_empty(),
        "these tests need compose/local's secure stack: run them with `compose/local test`, or \
         export BIOFEED_TEST_ENV_DIR=<state>/env"
    );
}

/// A file holding `text`, removed with the returned guard's directory.
fn temp_file(name: &str, text: &str) -> (crate::helpers::ServerProcess, PathBuf) {
    let dir = crate::helpers::ServerProcess::new("secret");
    let path = dir.dir.join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The value of `key` in `env`.
fn value_of(env: &[(&'static str, String)], key: &str) -> String {
    env.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{key} is set"))
}

#[tokio::test]
async fn postgres_sees_every_session_of_biofeed_encrypted_and_as_the_service_role() {
    require_secure_stack();
    let gw = TestGateway::spawn(&[]).await;
    // The gateway has opened its pool; ask the server about every session in this database, as
    // the service role (pg_stat_ssl shows a role its own sessions, and the owner's connection
    // below is the test's own).
    let owner = gw
        .stores
        .settings_as(Role::Gateway)
        .stores
        .postgres
        .connect()
        .await
        .unwrap();
    let database = gw.stores.settings.stores.clickhouse.database.clone();
    // Client backends only: an autovacuum worker visiting this database has a row too, with no
    // user and no connection to encrypt (one failed CI run on it).
    let sessions: Vec<(String, Option<bool>, Option<String>)> = sqlx::query_as(
        "SELECT a.usename::text, s.ssl, s.version FROM pg_stat_activity a \
         LEFT JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.backend_type = 'client backend'",
    )
    .bind(&database)
    .fetch_all(&owner)
    .await
    .unwrap();
    assert!(
        sessions.iter().any(|(user, _, _)| user == "biofeed_app"),
        "the gateway's sessions are the service role's: {sessions:?}"
    );
    for (user, ssl, version) in &sessions {
        assert_eq!(
            *ssl,
            Some(true),
            "{user}'s session is encrypted: {sessions:?}"
        );
        assert!(
            version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")),
            "{sessions:?}"
        );
    }
}

#[tokio::test]
async fn clickhouse_answers_biofeed_over_https_only_and_knows_each_service_by_name() {
    require_secure_stack();
    let stores = Isolated::migrated().await;
    for (role, user) in [
        (Role::Consume, "biofeed_writer"),
        (Role::Jobs, "biofeed_jobs"),
        (Role::Gateway, "biofeed_reader"),
    ] {
        let settings = stores.settings_as(role).stores.clickhouse;
        assert_eq!(settings.url.scheme(), "https");
        let ch = settings.connect().await.unwrap();
        // 18.16 has no currentUser(): the server's list of running queries names who runs this one.
        let who: String = ch
            .client()
            .query("SELECT user FROM system.processes WHERE query LIKE '%biofeed-whoami%' LIMIT 1")
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(who, user);
    }
    // The same port in plain HTTP: the server does not answer it.
    let mut plain = stores.settings.stores.clickhouse.url.first().clone();
    plain.set_scheme("http").unwrap();
    let answer = reqwest::Client::new()
        .get(format!("{plain}?query=SELECT%201"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(answer.is_err(), "plain HTTP was answered: {answer:?}");
}

#[tokio::test]
async fn kafka_serves_biofeed_on_its_sasl_ssl_listener_and_the_plaintext_one_reads_no_points() {
    require_secure_stack();
    let stores = Isolated::migrated().await;
    let gateway = stores.settings_as(Role::Gateway).stores.kafka;
    let brokers = gateway.brokers.clone();
    // The broker answers with the address it advertises for the listener the request came in
    // on: the SASL_SSL one.
    let admin = gateway.connect_admin().await.unwrap();
    let metadata = tokio::task::spawn_blocking(move || {
        admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap()
    })
    .await
    .unwrap();
    let advertised: Vec<String> = metadata
        .brokers()
        .iter()
        .map(|b| format!("{}:{}", b.host(), b.port()))
        .collect();
    assert_eq!(advertised, std::slice::from_ref(&brokers));

    // A plaintext client at the SASL_SSL port gets no answer: the broker hangs up (exit 3, as a
    // restart would look), within the connect timeout.
    let mut plaintext = gateway.clone();
    plaintext.security_protocol = biofeed_backends::kafka::SecurityProtocol::Plaintext;
    plaintext.ca_file = None;
    let started = Instant::now();
    let refused = plaintext.probe().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15), "{refused}");

    // The loopback plaintext listener (ClickHouse's Kafka engine in `bench consume`) may read
    // only the bench's topics: biofeed's points are refused to it.
    let plain_brokers = role_env(Role::Migrate)
        .iter()
        .find(|(k, _)| *k == "BIOFEED_BENCH_PEER_KAFKA_BROKERS")
        .map(|(_, v)| v.clone())
        .expect("the owner's settings name the plaintext listener");
    let topic = stores.settings.stores.topics.points.clone();
    let denied = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &plain_brokers)
            .set("group.id", "biofeed-bench-peer-test")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        metadata.topics()[0].error()
    })
    .await
    .unwrap();
    assert_eq!(
        denied,
        Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED),
        "the plaintext listener sees the points topic"
    );
}

/// Runs `biofeed migrate --status` as the owner with `env` changes, with 5 s connect timeouts.
async fn status_with(stores: &Isolated, changes: &[(&'static str, String)]) -> (Run, Duration) {
    status_without(stores, changes, &[]).await
}

/// [`status_with`], and without the settings `removed`.
async fn status_without(
    stores: &Isolated,
    changes: &[(&'static str, String)],
    removed: &[&'static str],
) -> (Run, Duration) {
    let mut env = stores.env_as(Role::Migrate);
    env.retain(|(k, _)| !removed.contains(k));
    for (key, value) in changes {
        env = with(env, key, value.clone());
    }
    for key in [
        "BIOFEED_POSTGRES_CONNECT_TIMEOUT",
        "BIOFEED_CLICKHOUSE_CONNECT_TIMEOUT",
        "BIOFEED_KAFKA_CONNECT_TIMEOUT",
    ] {
        env = with(env, key, "5s".to_owned());
    }
    let started = Instant::now();
    let run = crate::helpers::run_biofeed_without(&["migrate", "--status"], &env, removed).await;
    (run, started.elapsed())
}

/// Asserts a refusal: exit 2 (fix the settings) or 3 where allowed, within the connect timeout
/// (and the time to start), naming `setting` and `address`, never `secret`.
fn assert_refused(
    what: &str,
    (run, took): &(Run, Duration),
    codes: &[i32],
    setting: &str,
    address: &str,
    secret: &str,
) {
    assert!(codes.contains(&run.code), "{what}: {run:?}");
    assert!(
        *took < Duration::from_secs(12),
        "{what} took {took:?}: {run:?}"
    );
    assert!(
        run.stderr.contains(setting),
        "{what} names {setting}: {run:?}"
    );
    assert!(
        run.stderr.contains(address),
        "{what} names {address}: {run:?}"
    );
    assert!(
        !run.stderr.contains(secret),
        "{what} shows the secret: {run:?}"
    );
    assert!(
        !run.stdout.contains(secret),
        "{what} shows the secret: {run:?}"
    );
}

#[tokio::test]
async fn postgres_refusals_are_quick_name_the_setting_and_never_the_secret() {
    require_secure_stack();
    let stores = Isolated::new().await;
    let env = stores.env_as(Role::Migrate);
    let url: reqwest::Url = value_of(&env, "BIOFEED_POSTGRES_URL").parse().unwrap();
    let address = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let wrong = "Wr0ng-pg-Passw0rd";
    let (_dir, wrong_file) = temp_file("pg.password", wrong);
    let real = std::fs::read_to_string(value_of(&env, "BIOFEED_POSTGRES_PASSWORD_FILE")).unwrap();

    let wrong_password = status_with(
        &stores,
        &[(
            "BIOFEED_POSTGRES_PASSWORD_FILE",
            wrong_file.display().to_string(),
        )],
    )
    .await;
    assert_refused(
        "a wrong password",
        &wrong_password,
        &[2],
        "BIOFEED_POSTGRES_URL",
        &address,
        wrong,
    );
    let mut stranger = url.clone();
    stranger.set_username("nobody_here").unwrap();
    let unknown_user =
        status_with(&stores, &[("BIOFEED_POSTGRES_URL", stranger.to_string())]).await;
    assert_refused(
        "an unknown user",
        &unknown_user,
        &[2],
        "BIOFEED_POSTGRES_URL",
        &address,
        real.trim(),
    );
    let untrusted = status_with(
        &stores,
        &[("BIOFEED_POSTGRES_SSLROOTCERT", tls_file("other-ca.pem"))],
    )
    .await;
    assert_refused(
        "an untrusted CA",
        &untrusted,
        &[2],
        "BIOFEED_POSTGRES_URL",
        &address,
        real.trim(),
    );
    assert!(untrusted.0.stderr.contains("TLS"), "{:?}", untrusted.0);
    let plaintext = status_with(
        &stores,
        &[("BIOFEED_POSTGRES_SSLMODE", "disable".to_owned())],
    )
    .await;
    assert_refused(
        "a client without TLS",
        &plaintext,
        &[2],
        "BIOFEED_POSTGRES_URL",
        &address,
        real.trim(),
    );
}

#[tokio::test]
async fn clickhouse_refusals_are_quick_name_the_setting_and_never_the_secret() {
    require_secure_stack();
    let stores = Isolated::new().await;
    let env = stores.env_as(Role::Migrate);
    let url: reqwest::Url = value_of(&env, "BIOFEED_CLICKHOUSE_URL").parse().unwrap();
    let address = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let wrong = "Wr0ng-ch-Passw0rd";
    let real = std::fs::read_to_string(value_of(&env, "BIOFEED_CLICKHOUSE_PASSWORD_FILE")).unwrap();
    let (_dir, wrong_file) = temp_file("ch.password", wrong);

    let wrong_password = status_with(
        &stores,
        &[(
            "BIOFEED_CLICKHOUSE_PASSWORD_FILE",
            wrong_file.display().to_string(),
        )],
    )
    .await;
    assert_refused(
        "a wrong password",
        &wrong_password,
        &[2],
        "BIOFEED_CLICKHOUSE_URL",
        &address,
        wrong,
    );
    let unknown_user = status_with(
        &stores,
        &[("BIOFEED_CLICKHOUSE_USER", "nobody_here".to_owned())],
    )
    .await;
    assert_refused(
        "an unknown user",
        &unknown_user,
        &[2],
        "BIOFEED_CLICKHOUSE_URL",
        &address,
        real.trim(),
    );
    let untrusted = status_with(
        &stores,
        &[("BIOFEED_CLICKHOUSE_CA_FILE", tls_file("other-ca.pem"))],
    )
    .await;
    assert_refused(
        "an untrusted CA",
        &untrusted,
        &[2],
        "BIOFEED_CLICKHOUSE_URL",
        &address,
        real.trim(),
    );
    let mut plain = url.clone();
    plain.set_scheme("http").unwrap();
    let plaintext = status_with(&stores, &[("BIOFEED_CLICKHOUSE_URL", plain.to_string())]).await;
    assert_refused(
        "plain HTTP at the HTTPS port",
        &plaintext,
        &[2, 3],
        "BIOFEED_CLICKHOUSE_URL",
        &address,
        real.trim(),
    );
}

#[tokio::test]
async fn kafka_refusals_are_quick_name_the_setting_and_never_the_secret() {
    require_secure_stack();
    let stores = Isolated::new().await;
    let env = stores.env_as(Role::Migrate);
    let address = value_of(&env, "BIOFEED_KAFKA_BROKERS");
    let wrong = "Wr0ng-kafka-Passw0rd";
    let real = std::fs::read_to_string(value_of(&env, "BIOFEED_KAFKA_PASSWORD_FILE")).unwrap();
    let (_dir, wrong_file) = temp_file("kafka.password", wrong);

    let wrong_password = status_with(
        &stores,
        &[(
            "BIOFEED_KAFKA_PASSWORD_FILE",
            wrong_file.display().to_string(),
        )],
    )
    .await;
    assert_refused(
        "a wrong password",
        &wrong_password,
        &[2],
        "BIOFEED_KAFKA_USER",
        &address,
        wrong,
    );
    let unknown_user =
        status_with(&stores, &[("BIOFEED_KAFKA_USER", "nobody-here".to_owned())]).await;
    assert_refused(
        "an unknown user",
        &unknown_user,
        &[2],
        "BIOFEED_KAFKA_USER",
        &address,
        real.trim(),
    );
    let untrusted = status_with(
        &stores,
        &[("BIOFEED_KAFKA_CA_FILE", tls_file("other-ca.pem"))],
    )
    .await;
    assert_refused(
        "an untrusted CA",
        &untrusted,
        &[2],
        "BIOFEED_KAFKA_CA_FILE",
        &address,
        real.trim(),
    );
    let plaintext = status_without(
        &stores,
        &[("BIOFEED_KAFKA_SECURITY_PROTOCOL", "plaintext".to_owned())],
        &["BIOFEED_KAFKA_CA_FILE"],
    )
    .await;
    assert_refused(
        "plaintext at the SASL_SSL port",
        &plaintext,
        &[2, 3],
        "BIOFEED_KAFKA",
        &address,
        real.trim(),
    );
}

#[tokio::test]
async fn the_service_role_cannot_change_the_schema_and_the_audit_log_is_append_only_to_it() {
    require_secure_stack();
    let stores = Isolated::migrated().await;
    let service = stores.settings_as(Role::Up).stores.postgres;
    assert_eq!(service.url.username(), "biofeed_app");
    let pool = service.connect().await.unwrap();
    let refused = |e: sqlx::Error| {
        e.as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned())
    };
    let insufficient = Some("42501".to_owned());
    let create = sqlx::query("CREATE TABLE intruder (i int)")
        .execute(&pool)
        .await
        .map_err(refused);
    assert_eq!(create.unwrap_err(), insufficient, "CREATE TABLE");
    let alter = sqlx::query("ALTER TABLE users ADD COLUMN intruder int")
        .execute(&pool)
        .await
        .map_err(refused);
    assert_eq!(alter.unwrap_err(), insufficient, "ALTER TABLE");

    sqlx::query("INSERT INTO audit_log (action, resource, allowed) VALUES ('test', 'test', true)")
        .execute(&pool)
        .await
        .expect("the services append to the audit log");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&pool)
        .await
        .expect("and read it");
    assert!(rows >= 1);
    for statement in [
        "UPDATE audit_log SET allowed = false",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let changed = sqlx::query(statement).execute(&pool).await.map_err(refused);
        assert_eq!(changed.unwrap_err(), insufficient, "{statement}");
    }
    // And `biofeed migrate` as a service is refused by the server.
    let run = stores.biofeed_as(Role::Up, &["migrate"]).await;
    assert_ne!(run.code, 0, "{run:?}");
}

#[tokio::test]
async fn each_clickhouse_user_can_do_its_work_and_not_more() {
    require_secure_stack();
    let stores = Isolated::migrated().await;
    let user = uuid::Uuid::new_v4();
    let session = uuid::Uuid::new_v4();
    let insert = format!(
        "INSERT INTO points (user_id, session_id, data_type, t_us, values, ingested_at) \
         VALUES (toUUID('{user}'), toUUID('{session}'), 'heart_rate', 1, [60.0], now())"
    );
    let delete = format!("ALTER TABLE points DELETE WHERE session_id = toUUID('{session}')");
    let ddl = "CREATE TABLE intruder (x UInt8) ENGINE = Memory";
    let run = async |role: Role, sql: &str| {
        let ch = stores
            .settings_as(role)
            .stores
            .clickhouse
            .connect()
            .await
            .unwrap();
        ch.client().query(sql).execute().await
    };
    // The consumer writes points, and may neither change tables nor delete.
    run(Role::Consume, &insert)
        .await
        .expect("the writer inserts");
    assert!(
        run(Role::Consume, ddl).await.is_err(),
        "the writer made a table"
    );
    assert!(
        run(Role::Consume, &delete).await.is_err(),
        "the writer deleted"
    );
    // The gateway only reads.
    assert!(
        run(Role::Gateway, &insert).await.is_err(),
        "the reader inserted"
    );
    run(Role::Gateway, "SELECT count() FROM points")
        .await
        .expect("the reader reads");
    // The jobs delete (purge, erasure).
    run(Role::Jobs, &delete).await.expect("the jobs delete");
}

#[tokio::test]
async fn the_analyst_reads_completed_sessions_through_the_views_and_points_are_refused() {
    require_secure_stack();
    // The analyst may use one fixed database beside the production one (users.xml): this test's.
    const ANALYST_DATABASE: &str = "biofeed_test_analyst";
    let owner = crate::helpers::default_settings().stores.clickhouse;
    let ch = owner.connect().await.unwrap();
    ch.server_client()
        .query(&format!("DROP DATABASE IF EXISTS {ANALYST_DATABASE}"))
        .execute()
        .await
        .unwrap();
    let stores = Isolated::migrated_with(|s| {
        s.stores.clickhouse.analyst_database = Some(ANALYST_DATABASE.to_owned());
    })
    .await;
    let (user, completed, open) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    let samples: Vec<(i64, Vec<f32>)> = (0..10).map(|i| (i, vec![60.0])).collect();
    stores
        .insert_points(user, completed, "heart_rate", &samples)
        .await;
    stores
        .insert_points(user, open, "heart_rate", &samples[..4])
        .await;
    let facts = stores.settings.stores.clickhouse.connect().await.unwrap();
    facts
        .client()
        .query(&format!(
            "INSERT INTO session_facts (session_id, user_id, exercise, status, started_at, ended_at, version) \
             VALUES (toUUID('{completed}'), toUUID('{user}'), 'hrv_biofeedback', 'completed', now(), now(), 1), \
                    (toUUID('{open}'), toUUID('{user}'), 'hrv_biofeedback', 'open', now(), NULL, 1)"
        ))
        .execute()
        .await
        .unwrap();

    let analyst = crate::helpers::settings_as(Role::Analyst).stores.clickhouse;
    assert_eq!(analyst.user, "biofeed_analyst");
    let analyst = analyst.connect().await.unwrap();
    let query = |sql: String| {
        let client = analyst.server_client().clone();
        async move { client.query(&sql).fetch_one::<u64>().await }
    };
    let seen = query(format!(
        "SELECT count() FROM {ANALYST_DATABASE}.analyst_points WHERE user_id = toUUID('{user}')"
    ))
    .await
    .expect("the analyst reads the pseudonymous points");
    assert_eq!(seen, 10, "only the completed session's points");
    let database = stores.settings.stores.clickhouse.database.clone();
    for table in ["points", "session_facts", "analyst_points"] {
        let refused = query(format!("SELECT count() FROM {database}.{table}")).await;
        let error = refused.expect_err("biofeed's own tables are refused to the analyst");
        assert!(error.to_string().contains("Code: 291"), "{table}: {error}");
    }
    let escape = query(format!(
        "SELECT count() FROM remote('127.0.0.1', {database}.points)"
    ))
    .await;
    assert!(escape.is_err(), "table functions are refused");
    ch.server_client()
        .query(&format!("DROP DATABASE IF EXISTS {ANALYST_DATABASE}"))
        .execute()
        .await
        .unwrap();
}

#[tokio::test]
async fn kafka_acls_let_each_service_touch_only_its_topics() {
    require_secure_stack();
    let stores = Isolated::migrated().await;
    let topics = stores.settings.stores.topics.clone();
    let produce = async |role: Role, topic: &str| {
        let kafka = stores.settings_as(role).stores.kafka;
        let producer: FutureProducer = kafka
            .client_config()
            .unwrap()
            .set("message.timeout.ms", "10000")
            .create()
            .unwrap();
        producer
            .send(
                FutureRecord::to(topic).key("k").payload("v"),
                Duration::from_secs(10),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.rdkafka_error_code())
    };
    let denied = Err(Some(
        rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed,
    ));
    produce(Role::Gateway, &topics.points)
        .await
        .expect("the gateway produces points");
    assert_eq!(
        produce(Role::Gateway, &topics.dlq).await,
        denied,
        "gateway → dlq"
    );
    produce(Role::Consume, &topics.dlq)
        .await
        .expect("the consumer writes dead letters");
    assert_eq!(
        produce(Role::Consume, &topics.points).await,
        denied,
        "consumer → points"
    );
    assert_eq!(
        produce(Role::Jobs, &topics.points).await,
        denied,
        "jobs → points"
    );
}

/// A TLS endpoint that shows a certificate the clients must refuse (expired, or for another
/// host name) — what an impostor on the network, or a server whose certificate ran out, looks
/// like to biofeed. With `postgres`, it first answers Postgres's SSLRequest as a server does.
struct Impostor {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Impostor {
    fn start(cert: &std::path::Path, key: &std::path::Path, postgres: bool) -> Self {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if postgres {
                        let mut request = [0u8; 8];
                        if stream.read_exact(&mut request).await.is_err() {
                            return;
                        }
                        let _ = stream.write_all(b"S").await;
                    }
                    // The client must break off the handshake.
                    let _ = acceptor.accept(stream).await;
                });
            }
        });
        Self { port, task }
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A certificate and key for `elsewhere.example`, signed by the local CA: trusted, but not for
/// `localhost`.
fn misnamed_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key, csr) = (
        dir.join("elsewhere.pem"),
        dir.join("elsewhere.key"),
        dir.join("elsewhere.csr"),
    );
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=elsewhere.example",
        "-addext",
        "subjectAltName=DNS:elsewhere.example",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        csr.to_str().unwrap(),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        &tls_file("ca.pem"),
        "-CAkey",
        &tls_file("ca.key"),
        "-set_serial",
        "4242",
        "-days",
        "2",
        "-copy_extensions",
        "copy",
        "-out",
        cert.to_str().unwrap(),
    ]);
    (cert, key)
}

#[tokio::test]
async fn expired_and_misnamed_certificates_are_refused_by_every_client() {
    require_secure_stack();
    let stores = Isolated::new().await;
    let dir = crate::helpers::ServerProcess::new("impostor");
    let (misnamed_cert, misnamed_key) = misnamed_certificate(&dir.dir);
    let expired = (
        PathBuf::from(tls_file("expired.pem")),
        PathBuf::from(tls_file("expired.key")),
    );
    let env = stores.env_as(Role::Migrate);
    let pg_url: reqwest::Url = value_of(&env, "BIOFEED_POSTGRES_URL").parse().unwrap();
    for (what, (cert, key), says) in [
        ("an expired certificate", &expired, "xpired"),
        (
            "another host's certificate",
            &(misnamed_cert, misnamed_key),
            "ame",
        ),
    ] {
        for (setting, postgres) in [
            ("BIOFEED_CLICKHOUSE_URL", false),
            ("BIOFEED_KAFKA_BROKERS", false),
            ("BIOFEED_POSTGRES_URL", true),
        ] {
            let impostor = Impostor::start(cert, key, postgres);
            let address = format!("localhost:{}", impostor.port);
            let value = match setting {
                "BIOFEED_CLICKHOUSE_URL" => format!("https://{address}"),
                "BIOFEED_KAFKA_BROKERS" => address.clone(),
                _ => {
                    let mut url = pg_url.clone();
                    url.set_port(Some(impostor.port)).unwrap();
                    url.to_string()
                }
            };
            let run = status_with(&stores, &[(setting, value)]).await;
            let context = format!("{what} at {setting}");
            assert_eq!(run.0.code, 2, "{context}: {:?}", run.0);
            assert!(
                run.1 < Duration::from_secs(12),
                "{context} took {:?}",
                run.1
            );
            assert!(run.0.stderr.contains(&address), "{context}: {:?}", run.0);
            // librdkafka (OpenSSL) says only that verification failed, not why.
            let why = if setting == "BIOFEED_KAFKA_BROKERS" {
                "certificate verify failed"
            } else {
                says
            };
            assert!(
                run.0.stderr.contains(why),
                "{context} says why ({why}): {:?}",
                run.0
            );
        }
    }
}

#[tokio::test]
async fn scram_sha_256_a_password_given_directly_and_verify_ca_connect_too() {
    require_secure_stack();
    let stores = Isolated::migrated().await;
    let mut kafka = stores.settings_as(Role::Gateway).stores.kafka;
    kafka.sasl_mechanism = biofeed_backends::kafka::SaslMechanism::ScramSha256;
    kafka.password = kafka.password_file.take();
    kafka
        .probe()
        .await
        .expect("SCRAM-SHA-256 with the password itself");
    let mut postgres = stores.settings_as(Role::Gateway).stores.postgres;
    postgres.sslmode = Some(biofeed_backends::postgres::SslMode::VerifyCa);
    let pool = postgres.connect().await.expect("verify-ca");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl);
}

#[tokio::test]
async fn a_malformed_url_with_a_password_is_refused_without_repeating_it() {
    for (setting, url) in [
        (
            "BIOFEED_POSTGRES_URL",
            "postgres://app:S3cr3t-in-url@db.example",
        ),
        (
            "BIOFEED_CLICKHOUSE_URL",
            "ftp://app:S3cr3t-in-url@ch.example",
        ),
    ] {
        let run =
            crate::helpers::run_biofeed(&["migrate", "--status"], &[(setting, url.to_owned())])
                .await;
        assert_eq!(run.code, 2, "{run:?}");
        assert!(run.stderr.contains(setting), "{run:?}");
        assert!(!run.stderr.contains("S3cr3t"), "{run:?}");
    }
}
