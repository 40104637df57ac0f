//! The dependency invariants ARCHITECTURE.md states, held by `cargo tree`: the simulator is a
//! client of the HTTP API only, and the consumers never link the migrations (the benchmarks,
//! which need storage of their own, live in `bench/`).

/// The crates `package` links in normal (non-dev, non-build) builds, as `cargo tree` names them.
fn linked_crates(package: &str) -> Vec<String> {
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--package",
            package,
            "--edges",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn assert_links_none(package: &str, forbidden: &[&str]) {
    let linked = linked_crates(package);
    assert!(
        linked.iter().any(|c| c == package),
        "cargo tree lists {package} itself: {linked:?}"
    );
    let found: Vec<&&str> = forbidden
        .iter()
        .filter(|f| linked.iter().any(|c| c == **f))
        .collect();
    assert!(found.is_empty(), "{package} links {found:?}");
}

#[test]
fn the_simulator_links_no_storage_and_no_accounts() {
    assert_links_none(
        "biofeed-simulator",
        &[
            "biofeed-accounts",
            "biofeed-migrations",
            "biofeed-backends",
            "sqlx",
            "clickhouse",
            "rdkafka",
        ],
    );
}

#[test]
fn the_consumers_link_no_migrations() {
    assert_links_none("biofeed-consumers", &["biofeed-migrations"]);
}

#[test]
fn the_gateway_links_no_migrations() {
    assert_links_none("biofeed-ingest-gateway", &["biofeed-migrations"]);
}

#[test]
fn no_production_crate_links_the_benchmarks() {
    for package in [
        "biofeed-ingest-gateway",
        "biofeed-consumers",
        "biofeed-jobs",
        "biofeed-simulator",
        "biofeed-accounts",
        "biofeed-migrations",
    ] {
        assert_links_none(package, &["biofeed-bench"]);
    }
}
