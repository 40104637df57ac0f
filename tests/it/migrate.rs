//! `biofeed migrate` and `--status` against the real services.

use std::path::Path;

use biofeed_migrations::clickhouse::ClickHouseMigrations;
use biofeed_migrations::kafka::partition_count;
use biofeed_migrations::{MigrateError, State};

use crate::helpers::Isolated;

#[tokio::test]
async fn migrate_applies_everything_once_and_status_tells_the_truth() {
    let test = Isolated::new().await;
    let partitions = [
        ("BIOFEED_POINTS_PARTITIONS", "3".to_owned()),
        ("BIOFEED_POINTS_RETENTION", "2days".to_owned()),
    ];
    let env = || {
        test.env_as(crate::helpers::Role::Migrate)
            .into_iter()
            .chain(partitions.iter().cloned())
            .collect::<Vec<_>>()
    };

    let before = crate::helpers::run_biofeed(&["migrate", "--status"], &env()).await;
    assert_eq!(before.code, 0, "{before:?}");
    // Every migration of each store: Postgres's as the migrator counts them, five ClickHouse
    // ones and the three topics (points, dead letters, live feeds).
    let migrations = [
        (
            "postgres",
            biofeed_migrations::postgres::MIGRATOR.iter().count(),
        ),
        ("clickhouse", 5),
        ("kafka", 3),
    ];
    for (store, n) in migrations {
        let line = format!("{store}: {n} pending");
        assert!(before.stdout.contains(&line), "{before:?}");
    }
    for topic in [
        &test.settings.stores.topics.points,
        &test.settings.stores.topics.live,
    ] {
        assert!(before.stdout.contains(topic.as_str()), "{before:?}");
    }

    let first = crate::helpers::run_biofeed(&["migrate"], &env()).await;
    assert_eq!(first.code, 0, "{first:?}");
    for (store, n) in migrations {
        let line = format!("{store}: {n} applied now");
        assert!(first.stdout.contains(&line), "{first:?}");
    }

    let second = crate::helpers::run_biofeed(&["migrate"], &env()).await;
    assert_eq!(second.code, 0, "{second:?}");
    for store in ["postgres", "clickhouse", "kafka"] {
        assert!(
            second.stdout.contains(&format!("{store}: up to date")),
            "{second:?}"
        );
    }
    assert!(!second.stdout.contains("applied now"), "{second:?}");

    let after = crate::helpers::run_biofeed(&["migrate", "--status"], &env()).await;
    assert_eq!(after.code, 0, "{after:?}");
    for store in ["postgres", "clickhouse", "kafka"] {
        assert!(
            after.stdout.contains(&format!("{store}: 0 pending")),
            "{after:?}"
        );
    }
    assert!(
        after
            .stdout
            .contains("3 partitions, 1 replicas, min.insync.replicas 1, retention 2days"),
        "{after:?}"
    );

    // The Postgres seed model is there, with its seed rows, exactly once.
    let pg = test.settings.stores.postgres.connect().await.unwrap();
    let roles: Vec<String> = sqlx::query_scalar("SELECT name FROM roles ORDER BY id")
        .fetch_all(&pg)
        .await
        .unwrap();
    assert_eq!(
        roles,
        ["user", "guardian", "practitioner", "admin", "analyst"]
    );
    let data_types: Vec<String> = sqlx::query_scalar("SELECT name FROM data_types ORDER BY name")
        .fetch_all(&pg)
        .await
        .unwrap();
    for expected in ["eeg", "rr_interval", "spo2", "ppg"] {
        assert!(
            data_types.iter().any(|d| d == expected),
            "{expected} seeded: {data_types:?}"
        );
    }
    for table in [
        "users",
        "user_data_keys",
        "roles",
        "permissions",
        "role_permissions",
        "groups",
        "exercises",
        "data_types",
        "exercise_data_types",
        "sessions",
        "session_data_types",
        "devices",
        "failed_jobs",
        "audit_log",
        "erased_users",
    ] {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(table)
            .fetch_one(&pg)
            .await
            .unwrap();
        assert!(exists.is_some(), "table {table} exists");
    }

    // The ClickHouse tables and views are there.
    let ch = test.settings.stores.clickhouse.connect().await.unwrap();
    let tables: Vec<String> = ch
        .server_client()
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(ch.database())
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        tables,
        [
            "analyst_points",
            "completed_sessions",
            "points",
            "rollups_1m",
            "rollups_1s",
            "schema_migrations",
            "session_facts",
            "session_metrics"
        ]
    );

    // The topics exist with the configured partitions.
    let admin = test.settings.stores.kafka.connect_admin().await.unwrap();
    let timeout = test.settings.stores.kafka.connect_timeout;
    assert_eq!(
        partition_count(&admin, &test.settings.stores.topics.points, timeout)
            .await
            .unwrap(),
        Some(3)
    );
    assert_eq!(
        partition_count(&admin, &test.settings.stores.topics.dlq, timeout)
            .await
            .unwrap(),
        Some(1)
    );
}

#[tokio::test]
async fn the_points_table_collapses_a_replayed_row_into_the_original() {
    let test = Isolated::new().await;
    let run = test.biofeed(&["migrate"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let ch = test.settings.stores.clickhouse.connect().await.unwrap();
    let client = ch.client();
    let insert = "INSERT INTO points (user_id, session_id, data_type, t_us, values, ingested_at) VALUES \
        ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-0000000000aa', 'eeg', 1000, [1.5, 2.5], now()), \
        ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-0000000000aa', 'eeg', 2000, [3.5, 4.5], now())";
    // The same frame twice, as a retry or a replay would write it.
    client.query(insert).execute().await.unwrap();
    client.query(insert).execute().await.unwrap();
    let exact: u64 = client
        .query("SELECT count() FROM points FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(exact, 2);

    // Analysts see only completed sessions.
    let in_view = async || -> u64 {
        let query = client.query("SELECT count() FROM analyst_points");
        query.fetch_one().await.unwrap()
    };
    assert_eq!(
        in_view().await,
        0,
        "the session is not known to be completed yet"
    );
    client
        .query(
            "INSERT INTO session_facts (session_id, user_id, exercise, status, started_at, ended_at, version) VALUES \
             ('00000000-0000-0000-0000-0000000000aa', '00000000-0000-0000-0000-000000000001', 'alpha_neurofeedback', \
              'completed', now(), now(), 1)",
        )
        .execute()
        .await
        .unwrap();
    assert_eq!(in_view().await, 2);
}

/// Copies `migrations/clickhouse` into a fresh folder of this test's.
fn copy_of_migrations(test: &Isolated, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("biofeed-{name}-{}", test.id));
    std::fs::create_dir_all(&dir).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/clickhouse");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn edit(file: &Path, from: &str, to: &str) {
    let sql = std::fs::read_to_string(file).unwrap();
    assert!(sql.contains(from), "{} contains {from}", file.display());
    std::fs::write(file, sql.replace(from, to)).unwrap();
}

#[tokio::test]
async fn an_edited_clickhouse_migration_is_refused_by_name() {
    let test = Isolated::new().await;
    let ch = test.settings.stores.clickhouse.connect().await.unwrap();
    let dir = copy_of_migrations(&test, "edited");
    let report = ClickHouseMigrations::from_dir(&dir)
        .unwrap()
        .migrate(&ch)
        .await
        .unwrap();
    assert!(report.items.iter().all(|i| i.state == State::Applied));

    edit(
        &dir.join("0002_session_facts.sql"),
        "ORDER BY session_id",
        "ORDER BY (session_id, user_id)",
    );
    let err = ClickHouseMigrations::from_dir(&dir)
        .unwrap()
        .migrate(&ch)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MigrateError::Tampered { ref name, .. } if name == "0002_session_facts.sql"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("0002_session_facts.sql was edited after it was applied"),
        "{err}"
    );
    // Status refuses too, rather than calling an edited database up to date.
    let err = ClickHouseMigrations::from_dir(&dir)
        .unwrap()
        .status(&ch)
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::Tampered { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_binary_refuses_a_database_migrated_from_other_files() {
    // A database migrated from a version of 0001_points.sql that differs from the one built
    // into the binary: for the binary, its file was edited after it was applied.
    let test = Isolated::new().await;
    let ch = test.settings.stores.clickhouse.connect().await.unwrap();
    let dir = copy_of_migrations(&test, "other");
    edit(
        &dir.join("0001_points.sql"),
        "ingested_at DateTime\n",
        "ingested_at DateTime DEFAULT now()\n",
    );
    ClickHouseMigrations::from_dir(&dir)
        .unwrap()
        .migrate(&ch)
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let run = test.biofeed(&["migrate"]).await;
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stderr
            .contains("0001_points.sql was edited after it was applied"),
        "{run:?}"
    );
    let status = test.biofeed(&["migrate", "--status"]).await;
    assert_eq!(status.code, 4, "{status:?}");
}

/// The migration that makes emails unique among live accounts does not pick a winner among
/// accounts already sharing an email: it refuses, says how many and how to resolve them, and
/// applies once they are resolved (an erased account holds no email).
#[tokio::test]
async fn the_one_account_per_email_migration_refuses_live_duplicates_until_resolved() {
    let test = Isolated::new().await;
    biofeed_migrations::migrate(&test.settings).await.unwrap();
    let pool = test.settings.stores.postgres.connect().await.unwrap();
    let migration = biofeed_migrations::postgres::MIGRATOR
        .iter()
        .find(|m| m.description.contains("one live account per email"))
        .expect("the migration exists");
    // Back to the state before it, with one email under two live accounts.
    sqlx::raw_sql(
        "DROP INDEX users_one_live_account_per_email;
         CREATE INDEX users_email_blind_index ON users (email_blind_index) WHERE deleted_at IS NULL;
         INSERT INTO users (role_id, email_blind_index, email_ct)
         SELECT id, '\\x01', '\\x02' FROM roles WHERE name = 'user';
         INSERT INTO users (role_id, email_blind_index, email_ct)
         SELECT id, '\\x01', '\\x03' FROM roles WHERE name = 'user';",
    )
    .execute(&pool)
    .await
    .unwrap();
    let refused = sqlx::raw_sql(&migration.sql)
        .execute(&pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("1 emails have more than one live account")
            && refused.contains("biofeed admin user erase"),
        "{refused}"
    );
    // Erase one of them (as `erase` leaves a row: no PII, deleted_at set) and it applies.
    sqlx::query(
        "UPDATE users SET email_blind_index = NULL, email_ct = NULL, deleted_at = now()
         WHERE email_ct = '\\x03'",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(&migration.sql).execute(&pool).await.unwrap();
    let unique: bool = sqlx::query_scalar(
        "SELECT indisunique FROM pg_index WHERE indexrelid = 'users_one_live_account_per_email'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(unique);
}

/// Replication settings the Kafka cluster cannot honour are refused as settings to fix (exit 2),
/// naming the setting, before or instead of creating a topic that could never take a write.
#[tokio::test]
async fn kafka_replication_the_cluster_cannot_honour_is_refused_naming_the_setting() {
    let test = Isolated::new().await;
    let with = |extra: &[(&'static str, &str)]| {
        let mut env = test.env_as(crate::helpers::Role::Migrate);
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, (*v).to_owned()));
        }
        env
    };
    // More in sync than replicas: refused before any store is touched.
    let run = crate::helpers::run_biofeed(
        &["migrate"],
        &with(&[
            ("BIOFEED_KAFKA_REPLICATION_FACTOR", "1"),
            ("BIOFEED_KAFKA_MIN_INSYNC_REPLICAS", "2"),
        ]),
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("BIOFEED_KAFKA_MIN_INSYNC_REPLICAS"),
        "{run:?}"
    );
    let status = crate::helpers::run_biofeed(&["migrate", "--status"], &with(&[])).await;
    assert!(
        status.stdout.contains("postgres: ") && !status.stdout.contains("postgres: up to date"),
        "nothing was migrated: {status:?}"
    );
    // More replicas than brokers: Kafka refuses, biofeed names the setting.
    let admin = test.settings.stores.kafka.connect_admin().await.unwrap();
    let timeout = test.settings.stores.kafka.connect_timeout;
    let brokers = admin
        .inner()
        .fetch_metadata(None, timeout)
        .unwrap()
        .brokers()
        .len();
    let too_many = (brokers + 1).to_string();
    let run = crate::helpers::run_biofeed(
        &["migrate"],
        &with(&[
            ("BIOFEED_KAFKA_REPLICATION_FACTOR", &too_many),
            ("BIOFEED_KAFKA_MIN_INSYNC_REPLICAS", "1"),
        ]),
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("BIOFEED_KAFKA_REPLICATION_FACTOR"),
        "{run:?}"
    );
    assert_eq!(
        partition_count(&admin, &test.settings.stores.topics.points, timeout)
            .await
            .unwrap(),
        None,
        "no topic was created"
    );
    // An existing one-replica topic cannot require two in sync.
    let ok = crate::helpers::run_biofeed(
        &["migrate"],
        &with(&[
            ("BIOFEED_KAFKA_REPLICATION_FACTOR", "1"),
            ("BIOFEED_KAFKA_MIN_INSYNC_REPLICAS", "1"),
        ]),
    )
    .await;
    assert_eq!(ok.code, 0, "{ok:?}");
    let run = crate::helpers::run_biofeed(
        &["migrate"],
        &with(&[
            ("BIOFEED_KAFKA_MIN_INSYNC_REPLICAS", "2"),
            ("BIOFEED_KAFKA_REPLICATION_FACTOR", "2"),
        ]),
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("has 1 replica(s), fewer than 2 in sync"),
        "{run:?}"
    );
}
