//! Each backing service answers at the configured address.

use crate::helpers::default_settings;

#[tokio::test]
async fn postgres_answers_a_query() {
    let pool = default_settings()
        .stores
        .postgres
        .connect()
        .await
        .expect("postgres answers");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
}

#[tokio::test]
async fn clickhouse_answers_a_query() {
    let ch = default_settings()
        .stores
        .clickhouse
        .connect()
        .await
        .expect("clickhouse answers");
    assert!(ch.major_version() >= 18, "version {}", ch.version());
    let two = ch.server_client().query("SELECT 1 + 1").fetch_one::<u8>();
    assert_eq!(two.await.unwrap(), 2);
}

#[tokio::test]
async fn kafka_answers_a_metadata_request() {
    let settings = default_settings().stores.kafka;
    let admin = settings.connect_admin().await.expect("kafka answers");
    let metadata = tokio::task::spawn_blocking(move || {
        admin.inner().fetch_metadata(None, settings.connect_timeout)
    })
    .await
    .unwrap()
    .expect("metadata");
    assert!(!metadata.brokers().is_empty());
}
