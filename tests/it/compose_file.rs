//! The Docker path and the docs only use settings the CLI knows.

use std::collections::BTreeSet;
use std::path::Path;

use biofeed::cli::Cli;
use clap::CommandFactory;

/// Every `BIOFEED_…` variable any subcommand reads.
fn known_settings() -> BTreeSet<String> {
    fn walk(command: &clap::Command, into: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                into.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, into);
        }
    }
    let mut known = BTreeSet::new();
    walk(&Cli::command(), &mut known);
    known
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[test]
fn docker_compose_sets_only_settings_the_cli_knows() {
    let mut compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&repo_file("compose/docker-compose.yml")).unwrap();
    // `<<: *biofeed-env` merges the shared settings into a service's environment.
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().expect("services");
    let known = known_settings();
    let mut used = BTreeSet::new();
    for (name, service) in services {
        let Some(environment) = service.get("environment") else {
            continue;
        };
        let keys: Vec<String> = match environment {
            serde_yaml_ng::Value::Mapping(map) => map
                .keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect(),
            serde_yaml_ng::Value::Sequence(list) => list
                .iter()
                .filter_map(|v| v.as_str())
                .map(|v| v.split('=').next().unwrap_or_default().to_owned())
                .collect(),
            other => panic!("{name:?}: environment is {other:?}"),
        };
        for key in keys.into_iter().filter(|k| k.starts_with("BIOFEED_")) {
            assert!(
                known.contains(&key),
                "{name:?} sets {key}, which no biofeed subcommand reads"
            );
            used.insert(key);
        }
    }
    for needed in [
        "BIOFEED_POSTGRES_URL",
        "BIOFEED_CLICKHOUSE_URL",
        "BIOFEED_KAFKA_BROKERS",
        "BIOFEED_SCHEMA_REGISTRY_URL",
    ] {
        assert!(used.contains(needed), "compose sets {needed}");
    }
}

#[test]
fn compose_local_prints_only_settings_the_cli_knows() {
    let script = repo_file("compose/local");
    let known = known_settings();
    let printed: BTreeSet<&str> = script
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| {
            word.starts_with("BIOFEED_")
                && !word.starts_with("BIOFEED_LOCAL_")
                && !word.starts_with("BIOFEED_TEST_")
                && *word != "BIOFEED_STATE_DIR"
        })
        .collect();
    assert!(!printed.is_empty());
    for setting in printed {
        assert!(
            known.contains(setting),
            "compose/local uses {setting}, which no subcommand reads"
        );
    }
}

#[test]
fn the_readme_documents_every_setting() {
    let readme = repo_file("README.md");
    for setting in known_settings() {
        assert!(
            readme.contains(&format!("`{setting}`")),
            "README.md's settings table lists {setting}"
        );
    }
}
