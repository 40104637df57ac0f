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
    let registry = Registry::new(&stores.settings.registry)
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
    let registry = Registry::new(&stores.settings.registry).unwrap().unwrap();
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
