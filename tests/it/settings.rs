//! Bad or unreachable settings fail fast, naming the setting and the address tried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::helpers::{run_biofeed, with, Isolated};

/// A loopback port where a socket accepts connections and never says a word: the worst kind of
/// unreachable server, which only a timeout can catch. Counts the connections it accepted.
async fn silent_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    (address, accepted)
}

/// A loopback port nobody listens on: connections are refused.
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    address
}

/// `biofeed migrate` with `env` exits 3 (a connection failure), naming `setting` and
/// `address`, and no password.
async fn migrate_fails_to_connect(env: &[(&str, String)], setting: &str, address: &str) {
    let run = run_biofeed(&["migrate"], env).await;
    assert_eq!(run.code, 3, "{setting}: {run:?}");
    assert!(run.stderr.contains(setting), "{setting} named: {run:?}");
    assert!(run.stderr.contains(address), "address named: {run:?}");
    assert!(
        !run.stderr.contains("hunter2"),
        "no password in errors: {run:?}"
    );
}

#[tokio::test]
async fn a_silent_service_fails_within_its_timeout_naming_the_setting() {
    let test = Isolated::new().await;
    let (silent, _) = silent_server().await;
    let cases = [
        (
            "BIOFEED_POSTGRES_URL",
            format!("postgres://biofeed:hunter2@{silent}/biofeed"),
            "BIOFEED_POSTGRES_CONNECT_TIMEOUT",
        ),
        (
            "BIOFEED_CLICKHOUSE_URL",
            format!("http://{silent}"),
            "BIOFEED_CLICKHOUSE_CONNECT_TIMEOUT",
        ),
        (
            "BIOFEED_KAFKA_BROKERS",
            silent.clone(),
            "BIOFEED_KAFKA_CONNECT_TIMEOUT",
        ),
    ];
    for (setting, value, timeout_setting) in cases {
        let env = with(test.env(), setting, value);
        let env = with(env, timeout_setting, "1s".to_owned());
        migrate_fails_to_connect(&env, setting, &silent).await;
    }
}

#[tokio::test]
async fn a_refused_connection_fails_at_once_naming_the_setting() {
    let test = Isolated::new().await;
    let closed = closed_port().await;
    let cases = [
        (
            "BIOFEED_POSTGRES_URL",
            format!("postgres://biofeed:hunter2@{closed}/biofeed"),
        ),
        ("BIOFEED_CLICKHOUSE_URL", format!("http://{closed}")),
        ("BIOFEED_KAFKA_BROKERS", closed.clone()),
    ];
    for (setting, value) in cases {
        migrate_fails_to_connect(&with(test.env(), setting, value), setting, &closed).await;
    }
}

#[tokio::test]
async fn malformed_settings_are_rejected_before_any_connection() {
    let test = Isolated::new().await;
    // Every service points at a server that counts connections; one setting is malformed.
    let (listening, accepted) = silent_server().await;
    let reachable = vec![
        (
            "BIOFEED_POSTGRES_URL",
            format!("postgres://biofeed:biofeed@{listening}/biofeed"),
        ),
        ("BIOFEED_CLICKHOUSE_URL", format!("http://{listening}")),
        ("BIOFEED_KAFKA_BROKERS", listening.clone()),
        ("BIOFEED_LOG", "warn".to_owned()),
    ];
    let cases = [
        ("BIOFEED_POSTGRES_URL", "postgres//nohost", "--postgres-url"),
        (
            "BIOFEED_POSTGRES_URL",
            "mysql://h:3306/db",
            "--postgres-url",
        ),
        (
            "BIOFEED_POSTGRES_URL",
            "postgres://127.0.0.1:5432",
            "--postgres-url",
        ),
        (
            "BIOFEED_CLICKHOUSE_URL",
            "127.0.0.1:8123",
            "--clickhouse-url",
        ),
        (
            "BIOFEED_CLICKHOUSE_URL",
            "tcp://127.0.0.1:9000",
            "--clickhouse-url",
        ),
        // A cluster's node list: every node checked, no mixed schemes, none twice.
        (
            "BIOFEED_CLICKHOUSE_URL",
            "https://127.0.0.1:8541,127.0.0.1:8542",
            "URL 2 of 2",
        ),
        (
            "BIOFEED_CLICKHOUSE_URL",
            "https://127.0.0.1:8541,http://127.0.0.1:8542",
            "mixes http:// and https://",
        ),
        (
            "BIOFEED_CLICKHOUSE_URL",
            "https://127.0.0.1:8541,https://127.0.0.1:8541",
            "twice",
        ),
        (
            "BIOFEED_CLICKHOUSE_CLUSTER",
            "biofeed cluster",
            "--clickhouse-cluster",
        ),
        (
            "BIOFEED_CLICKHOUSE_DATABASE",
            "biofeed; DROP TABLE points",
            "--clickhouse-database",
        ),
        ("BIOFEED_KAFKA_BROKERS", "kafka:", "--kafka-brokers"),
        (
            "BIOFEED_KAFKA_BROKERS",
            "127.0.0.1:70000",
            "--kafka-brokers",
        ),
        ("BIOFEED_POINTS_TOPIC", "points topic", "--points-topic"),
        ("BIOFEED_POINTS_PARTITIONS", "0", "--points-partitions"),
        ("BIOFEED_POINTS_RETENTION", "forever", "--points-retention"),
        (
            "BIOFEED_POSTGRES_CONNECT_TIMEOUT",
            "0s",
            "--postgres-connect-timeout",
        ),
        ("BIOFEED_LOG", "info,[", "BIOFEED_LOG"),
    ];
    for (setting, value, named) in cases {
        let run = run_biofeed(
            &["migrate"],
            &with(reachable.clone(), setting, value.to_owned()),
        )
        .await;
        assert_eq!(run.code, 2, "{setting}={value}: {run:?}");
        assert!(
            run.stderr.contains(named),
            "{setting}={value} names {named}: {run:?}"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no connection was tried"
    );
    drop(test);
}

#[tokio::test]
async fn the_services_refuse_bad_settings_before_contacting_anything() {
    let (listening, accepted) = silent_server().await;
    let good_key = biofeed_accounts::crypto::Key32::random().to_base64();
    let reachable = vec![
        (
            "BIOFEED_POSTGRES_URL",
            format!("postgres://biofeed:biofeed@{listening}/biofeed"),
        ),
        ("BIOFEED_CLICKHOUSE_URL", format!("http://{listening}")),
        ("BIOFEED_KAFKA_BROKERS", listening.clone()),
        ("BIOFEED_MASTER_KEY", good_key.clone()),
        ("BIOFEED_BLIND_INDEX_KEY", good_key),
    ];
    let cases: Vec<(&[&str], &'static str, &str, &str)> = vec![
        (
            &["gateway"],
            "BIOFEED_MASTER_KEYS_PREVIOUS",
            "1:c2hvcnQ=",
            "BIOFEED_MASTER_KEYS_PREVIOUS must be",
        ),
        (
            &["gateway"],
            "BIOFEED_PASSWORD_MEMORY_KIB",
            "1024",
            "--password-memory-kib",
        ),
        (
            &["gateway"],
            "BIOFEED_CONSENT_AGE_BY_COUNTRY",
            "Germany=16",
            "is not an ISO 3166-1 alpha-2 code",
        ),
        (
            &["gateway"],
            "BIOFEED_LOGIN_TOKEN_TTL",
            "0s",
            "--login-token-ttl",
        ),
        (
            &["simulate"],
            "BIOFEED_SIMULATE_URL",
            "localhost:8080",
            "is not an http(s) URL",
        ),
        (
            &["simulate"],
            "BIOFEED_SIMULATE_ABORT_SHARE",
            "1.5",
            "is not a share from 0 to 1",
        ),
        (&["jobs"], "BIOFEED_JOBS_LEASE", "0s", "--jobs-lease"),
        (
            &["gateway"],
            "BIOFEED_GATEWAY_MAX_READ_POINTS",
            "0",
            "--max-read-points",
        ),
        (
            &["gateway"],
            "BIOFEED_MASTER_KEY",
            "c2hvcnQ=",
            "BIOFEED_MASTER_KEY must be base64 of exactly 32",
        ),
        (
            &["gateway"],
            "BIOFEED_BLIND_INDEX_KEY",
            "not base64!",
            "BIOFEED_BLIND_INDEX_KEY must be base64",
        ),
        (
            &["gateway"],
            "BIOFEED_GATEWAY_LISTEN",
            "everywhere",
            "--listen",
        ),
        (
            &["gateway"],
            "BIOFEED_GATEWAY_MAX_IN_FLIGHT",
            "0",
            "--max-in-flight",
        ),
        (
            &["gateway"],
            "BIOFEED_GATEWAY_MAX_BODY_BYTES",
            "12",
            "--max-body-bytes",
        ),
        (
            &["consume"],
            "BIOFEED_BATCH_MAX_AGE",
            "0s",
            "--batch-max-age",
        ),
        (
            &["consume"],
            "BIOFEED_INSERTS_IN_FLIGHT",
            "0",
            "--inserts-in-flight",
        ),
        (
            &["consume"],
            "BIOFEED_CLICKHOUSE_COMPRESSION",
            "gzip",
            "--clickhouse-compression",
        ),
        (
            &["admin", "device", "list"],
            "BIOFEED_POSTGRES_URL",
            "postgres://h:5432",
            "--postgres-url",
        ),
    ];
    for (args, setting, value, named) in cases {
        let run = run_biofeed(args, &with(reachable.clone(), setting, value.to_owned())).await;
        assert_eq!(run.code, 2, "{args:?} {setting}={value}: {run:?}");
        assert!(
            run.stderr.contains(named),
            "{setting}={value} names {named}: {run:?}"
        );
        if setting.contains("_KEY") {
            assert!(
                !run.stderr.contains("c2hvcnQ") && !run.stderr.contains("not base64"),
                "key material echoed: {run:?}"
            );
        }
    }
    // A missing key is named too.
    let without_key: Vec<_> = reachable
        .iter()
        .filter(|(k, _)| *k != "BIOFEED_MASTER_KEY")
        .cloned()
        .collect();
    let run =
        crate::helpers::run_biofeed_without(&["gateway"], &without_key, &["BIOFEED_MASTER_KEY"])
            .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--master-key"), "{run:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no connection was tried"
    );

    // The master key from a file instead (a mounted secret); a bad file is named by its path,
    // never by its content; a key given both ways is refused.
    let dir = crate::helpers::ServerProcess::new("key-file");
    let bad = dir.dir.join("bad.key");
    std::fs::write(&bad, "c2hvcnQ=\n").unwrap();
    for (path, named) in [
        (bad.display().to_string(), "must hold base64 of exactly 32"),
        (
            dir.dir.join("missing.key").display().to_string(),
            "cannot read",
        ),
    ] {
        let mut env = without_key.clone();
        env.push(("BIOFEED_MASTER_KEY_FILE", path.clone()));
        let run =
            crate::helpers::run_biofeed_without(&["gateway"], &env, &["BIOFEED_MASTER_KEY"]).await;
        assert_eq!(run.code, 2, "{run:?}");
        assert!(
            run.stderr.contains(&path) && run.stderr.contains(named),
            "{run:?}"
        );
        assert!(!run.stderr.contains("c2hvcnQ"), "{run:?}");
    }
    let good = dir.dir.join("good.key");
    std::fs::write(&good, biofeed_accounts::crypto::Key32::random().to_base64()).unwrap();
    let mut both = reachable.clone();
    both.push(("BIOFEED_MASTER_KEY_FILE", good.display().to_string()));
    let run = run_biofeed(&["gateway"], &both).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("cannot be used with"), "{run:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no connection was tried"
    );
}

#[tokio::test]
async fn the_master_key_can_come_from_a_file() {
    let stores = crate::helpers::Isolated::new().await;
    biofeed_migrations::migrate(&stores.settings).await.unwrap();
    let keys = biofeed_accounts::AccountKeys::generate();
    let dir = crate::helpers::ServerProcess::new("key-file");
    let file = dir.dir.join("master.key");
    std::fs::write(&file, format!("{}\n", keys.master_key().to_base64())).unwrap();
    let mut env = stores.env();
    env.push(("BIOFEED_MASTER_KEY_FILE", file.display().to_string()));
    env.push(("BIOFEED_BLIND_INDEX_KEY", keys.blind_index_key.to_base64()));
    let run = crate::helpers::run_biofeed_without(
        &["admin", "user", "create", "--email", "file@example.org"],
        &env,
        &["BIOFEED_MASTER_KEY"],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let id: uuid::Uuid = run.stdout.trim().parse().unwrap();
    let accounts = biofeed_accounts::Accounts {
        pool: stores.settings.stores.postgres.connect().await.unwrap(),
        keys,
    };
    assert_eq!(
        biofeed_accounts::users::email_of(&accounts, id)
            .await
            .unwrap(),
        "file@example.org"
    );
}

#[tokio::test]
async fn simulate_against_an_unreachable_gateway_fails_as_retryable_naming_the_setting() {
    let closed = closed_port().await;
    let run = run_biofeed(
        &["simulate", "--duration", "1s"],
        &[("BIOFEED_SIMULATE_URL", format!("http://{closed}"))],
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("the gateway at")
            && run.stderr.contains("BIOFEED_SIMULATE_URL")
            && run.stderr.contains(&closed),
        "{run:?}"
    );
}
