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
            "sqlx-core",
            "clickhouse",
            "rdkafka",
            "rdkafka-sys",
        ],
    );
}

#[test]
fn no_crate_but_the_gateway_links_the_http_server() {
    for package in [
        "biofeed-schema",
        "biofeed-backends",
        "biofeed-migrations",
        "biofeed-accounts",
        "biofeed-consumers",
        "biofeed-jobs",
        "biofeed-simulator",
        "biofeed-exports",
    ] {
        assert_links_none(package, &["axum"]);
    }
}

#[test]
fn the_consumers_link_no_migrations() {
    assert_links_none("biofeed-consumers", &["biofeed-migrations"]);
}

#[test]
fn the_live_members_use_no_clickhouse_and_the_arithmetic_no_io() {
    // ARCHITECTURE.md: the live members read Kafka and the data types, nothing else (backends,
    // which they link for connections, brings ClickHouse's client: they must not use it); the
    // metrics' arithmetic does no I/O at all.
    assert_links_none(
        "biofeed-live",
        &["biofeed-migrations", "biofeed-accounts", "axum"],
    );
    for (path, text) in sources("live/src") {
        for used in ["clickhouse", "reqwest", "hyper::"] {
            assert!(!text.contains(used), "{} uses {used}", path.display());
        }
    }
    assert_links_none(
        "biofeed-signals",
        &["tokio", "sqlx", "rdkafka", "clickhouse", "biofeed-schema"],
    );
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

/// Every `.rs` file under `dir` (relative to the repository), with its text.
fn sources(dir: &str) -> Vec<(std::path::PathBuf, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path, text));
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir),
        &mut out,
    );
    out
}

/// The production crates' sources (not the binary's, not the tests').
const CRATES: [&str; 12] = [
    "schema",
    "backends",
    "migrations",
    "accounts",
    "ingest-gateway",
    "consumers",
    "jobs",
    "signals",
    "live",
    "exports",
    "simulator",
    "bench",
];

#[test]
fn only_the_gateway_speaks_http_as_a_server_and_only_accounts_hashes_or_seals() {
    for krate in CRATES {
        for (path, text) in sources(&format!("{krate}/src")) {
            if krate != "ingest-gateway" {
                assert!(!text.contains("axum::"), "{} uses axum", path.display());
            }
            if krate != "accounts" {
                for path_prefix in ["argon2::", "aes_gcm::"] {
                    assert!(
                        !text.contains(path_prefix),
                        "{} uses {path_prefix}",
                        path.display()
                    );
                }
            }
        }
    }
}

#[test]
fn only_backends_makes_clients_of_the_services_so_every_one_is_secured_alike() {
    // ARCHITECTURE.md: every Kafka, ClickHouse and Postgres client is built from backends'
    // settings, so that TLS, SASL and the passwords apply to all of them.
    let makers = [
        "ClientConfig::new(",
        "clickhouse::Client::",
        "PgPoolOptions",
        "PgConnectOptions::",
    ];
    let mut dirs: Vec<String> = CRATES
        .iter()
        .filter(|k| **k != "backends")
        .map(|k| format!("{k}/src"))
        .collect();
    dirs.push("src".to_owned());
    for dir in dirs {
        for (path, text) in sources(&dir) {
            for maker in makers {
                assert!(
                    !text.contains(maker),
                    "{} makes its own client ({maker}): build it from backends' settings",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn the_binary_stays_thin_no_file_over_400_lines() {
    let files = sources("src");
    assert!(files.len() > 3, "the CLI is split by subcommand");
    for (path, text) in files {
        let lines = text.lines().count();
        assert!(lines <= 400, "{} has {lines} lines", path.display());
    }
}
