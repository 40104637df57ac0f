//! Test helpers: isolated stores per test, and running the real binary.

use std::fmt::Display;
use std::process::Output;
use std::time::Duration;

use biofeed::cli::{Cli, Command};
use biofeed_accounts::AccountKeys;
use biofeed_backends::clickhouse::ClickHouseSettings;
use biofeed_backends::kafka::KafkaSettings;
use biofeed_migrations::MigrateSettings;
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

/// Who a test acts as on the services. `compose/local` gives each part of biofeed its own
/// least-privileged users and writes each identity's `BIOFEED_…` settings (TLS, users, password
/// files) to `$BIOFEED_TEST_ENV_DIR/<role>.env`; `compose/local test` exports `up`'s and that
/// directory. Without it (services started some other way) every role is the environment's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `biofeed migrate` and the tests' own fixtures: the owner of the schemas, Kafka's admin.
    Migrate,
    /// `biofeed up`: gateway, consumer and jobs in one process.
    Up,
    /// `biofeed gateway`.
    Gateway,
    /// `biofeed consume`.
    Consume,
    /// `biofeed replay`.
    Replay,
    /// `biofeed jobs`.
    Jobs,
    /// `biofeed live`.
    Live,
    /// An analyst: ClickHouse's pseudonymous views only.
    Analyst,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Migrate => "migrate",
            Role::Up => "up",
            Role::Gateway => "gateway",
            Role::Consume => "consume",
            Role::Replay => "replay",
            Role::Jobs => "jobs",
            Role::Live => "live",
            Role::Analyst => "analyst",
        }
    }

    /// The identity a `biofeed <args>` command runs as.
    pub fn of_command(args: &[&str]) -> Role {
        match args.first().copied() {
            Some("migrate" | "bench") => Role::Migrate,
            Some("gateway") => Role::Gateway,
            Some("consume") => Role::Consume,
            Some("replay") => Role::Replay,
            Some("jobs") => Role::Jobs,
            Some("live") => Role::Live,
            _ => Role::Up,
        }
    }
}

/// The local stack's state directory (certificates, secrets): the parent of
/// BIOFEED_TEST_ENV_DIR, or the repository's `.state`.
pub fn state_dir() -> std::path::PathBuf {
    match std::env::var_os("BIOFEED_TEST_ENV_DIR") {
        Some(dir) => std::path::Path::new(&dir)
            .parent()
            .expect("BIOFEED_TEST_ENV_DIR has a parent")
            .to_path_buf(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".state"),
    }
}

/// The `BIOFEED_…` settings of `role` from `$BIOFEED_TEST_ENV_DIR/<role>.env` (empty without
/// that directory), read once.
pub fn role_env(role: Role) -> &'static [(&'static str, String)] {
    type Settings = &'static [(&'static str, String)];
    static ROLES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<Role, Settings>>> =
        std::sync::OnceLock::new();
    let mut roles = ROLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    roles.entry(role).or_insert_with(|| {
        let Some(dir) = std::env::var_os("BIOFEED_TEST_ENV_DIR") else {
            return &[];
        };
        let file = std::path::Path::new(&dir).join(format!("{}.env", role.name()));
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{} (BIOFEED_TEST_ENV_DIR): {e}", file.display()));
        let pairs: Vec<(&'static str, String)> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (key, value) = l.split_once('=').expect("KEY=VALUE lines");
                (
                    &*Box::leak(key.trim().to_owned().into_boxed_str()),
                    value.to_owned(),
                )
            })
            .collect();
        Box::leak(pairs.into_boxed_slice())
    })
}

/// `env` as command-line arguments of `biofeed <subcommand>`: each `BIOFEED_…` variable the
/// subcommand reads becomes its `--long value` (arguments win over the process environment,
/// which `compose/local test` filled with another identity's settings).
pub fn as_arguments(subcommand: &[&str], env: &[(&str, String)]) -> Vec<String> {
    let mut command = <Cli as clap::CommandFactory>::command();
    for name in subcommand {
        command = command
            .find_subcommand(name)
            .unwrap_or_else(|| panic!("biofeed has a subcommand {name}"))
            .clone();
    }
    let mut args = Vec::new();
    for (key, value) in env {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == *key));
        if let Some(long) = arg.and_then(clap::Arg::get_long) {
            args.push(format!("--{long}"));
            args.push(value.clone());
        }
    }
    args
}

/// The settings `biofeed migrate` would use as `role`.
pub fn settings_as(role: Role) -> MigrateSettings {
    let mut args = vec!["biofeed".to_owned(), "migrate".to_owned()];
    args.extend(as_arguments(&["migrate"], role_env(role)));
    let cli = Cli::try_parse_from(args).expect("role settings parse");
    let Command::Migrate(args) = cli.command else {
        unreachable!("parsed a migrate command")
    };
    MigrateSettings {
        stores: args.stores,
        layout: args.layout,
    }
}

/// The settings of the tests' own fixtures: the owner's (`biofeed migrate`'s).
pub fn default_settings() -> MigrateSettings {
    settings_as(Role::Migrate)
}

/// A fresh Postgres database, ClickHouse database and pair of topic names for one test.
pub struct Isolated {
    /// The settings pointing at this test's own database and topics.
    pub settings: MigrateSettings,
    /// The suffix that makes this test's names unique.
    pub id: String,
}

impl Isolated {
    /// Creates the Postgres database (ClickHouse's database and the topics are created by
    /// `biofeed migrate`, which is what the tests exercise).
    pub async fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let settings = default_settings();
        let admin = settings
            .stores
            .postgres
            .connect()
            .await
            .expect("postgres answers");
        let database = format!("biofeed_test_{id}");
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let settings = Self::retarget(settings, &id);
        Self { settings, id }
    }

    /// `settings` pointing at the databases and topics of the test `id`.
    fn retarget(mut settings: MigrateSettings, id: &str) -> MigrateSettings {
        let database = format!("biofeed_test_{id}");
        settings.stores.postgres = settings.stores.postgres.with_database(&database);
        settings.stores.clickhouse.database = database;
        settings.stores.clickhouse.analyst_database = None;
        (
            settings.stores.topics.points,
            settings.stores.topics.dlq,
            settings.stores.topics.live,
        ) = Self::topic_names(id);
        settings
    }

    /// This test's topic names. They start as biofeed's own do (`biofeed.points.`,
    /// `biofeed.points.dlq.`, `biofeed.live.`), so that Kafka's prefixed ACLs apply to them as
    /// to production's.
    fn topic_names(id: &str) -> (String, String, String) {
        (
            format!("biofeed.points.test-{id}"),
            format!("biofeed.points.dlq.test-{id}"),
            format!("biofeed.live.test-{id}"),
        )
    }

    /// The settings of `role`, pointing at this test's databases and topics — and at the servers
    /// `self.settings` points at now (a test may have moved ClickHouse or Kafka to a private one).
    pub fn settings_as(&self, role: Role) -> MigrateSettings {
        if role == Role::Migrate {
            // The owner's are the test's own settings, wherever the test pointed them.
            return self.settings.clone();
        }
        let mut settings = Self::retarget(settings_as(role), &self.id);
        let now = &self.settings.stores;
        settings.stores.clickhouse.url = now.clickhouse.url.clone();
        settings.stores.kafka.brokers = now.kafka.brokers.clone();
        settings
    }

    /// A fresh set of stores, migrated (`biofeed migrate`'s library call).
    pub async fn migrated() -> Self {
        Self::migrated_with(|_| {}).await
    }

    /// A fresh set of stores whose settings `adjust` changes (e.g. to point at a private
    /// server), then migrated.
    pub async fn migrated_with(adjust: impl FnOnce(&mut MigrateSettings)) -> Self {
        let mut stores = Self::new().await;
        adjust(&mut stores.settings);
        biofeed_migrations::migrate(&stores.settings)
            .await
            .expect("migrate");
        stores
    }

    /// Writes rows straight into ClickHouse's `points` (as the consumer writes them): one per
    /// `(t_us, values)` sample.
    pub async fn insert_points(
        &self,
        user: uuid::Uuid,
        session: uuid::Uuid,
        data_type: &str,
        samples: &[(i64, Vec<f32>)],
    ) {
        let ch = self.settings.stores.clickhouse.connect().await.unwrap();
        for chunk in samples.chunks(2000) {
            let rows: Vec<String> = chunk
                .iter()
                .map(|(t, values)| {
                    let values: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
                    format!(
                        "(toUUID('{user}'), toUUID('{session}'), '{data_type}', {t}, [{}], now())",
                        values.join(",")
                    )
                })
                .collect();
            ch.client()
                .query(&format!(
                    "INSERT INTO points (user_id, session_id, data_type, t_us, values, ingested_at) VALUES {}",
                    rows.join(",")
                ))
                .execute()
                .await
                .unwrap();
        }
    }

    /// How many tables this test's Postgres database has (0 before `biofeed migrate`).
    pub async fn postgres_tables(&self) -> i64 {
        let pool = self.settings.stores.postgres.connect().await.unwrap();
        let tables = sqlx::query_scalar(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        tables
    }

    /// The environment that points the binary at this test's stores, as `biofeed up`'s
    /// identity.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_as(Role::Up)
    }

    /// The environment that points the binary at this test's stores, as `role`.
    pub fn env_as(&self, role: Role) -> Vec<(&'static str, String)> {
        let settings = self.settings_as(role);
        let s = &settings.stores;
        let mut env: Vec<(&'static str, String)> = role_env(role).to_vec();
        let ours = [
            ("BIOFEED_POSTGRES_URL", s.postgres.url.to_string()),
            ("BIOFEED_CLICKHOUSE_URL", s.clickhouse.url.to_string()),
            ("BIOFEED_CLICKHOUSE_DATABASE", s.clickhouse.database.clone()),
            ("BIOFEED_KAFKA_BROKERS", s.kafka.brokers.clone()),
            ("BIOFEED_POINTS_TOPIC", s.topics.points.clone()),
            ("BIOFEED_DLQ_TOPIC", s.topics.dlq.clone()),
            ("BIOFEED_LIVE_TOPIC", s.topics.live.clone()),
            ("BIOFEED_LOG", "warn".to_owned()),
        ];
        for (key, value) in ours {
            env = with(env, key, value);
        }
        env
    }

    /// Runs `biofeed <args>` against this test's stores, as `role`.
    pub async fn biofeed_as(&self, role: Role, args: &[&str]) -> Run {
        run_biofeed(args, &self.env_as(role)).await
    }

    /// Runs `biofeed <args>` against this test's stores, as the identity that command has.
    pub async fn biofeed(&self, args: &[&str]) -> Run {
        run_biofeed(args, &self.env_as(Role::of_command(args))).await
    }
}

/// `env` with `key` set to `value` (replacing any value it had).
pub fn with(
    env: Vec<(&'static str, String)>,
    key: &'static str,
    value: String,
) -> Vec<(&'static str, String)> {
    env.into_iter()
        .filter(|(k, _)| *k != key)
        .chain([(key, value)])
        .collect()
}

/// The master and blind-index keys as the binary reads them from the environment.
pub fn key_env(keys: &AccountKeys) -> Vec<(&'static str, String)> {
    vec![
        ("BIOFEED_MASTER_KEY", keys.master_key().to_base64()),
        ("BIOFEED_BLIND_INDEX_KEY", keys.blind_index_key.to_base64()),
    ]
}

/// Tries `attempt` every `every` until it answers `Ok`, and returns that; fails the test with
/// the last `Err` once `limit` has passed (a watchdog, not a timing).
pub async fn eventually<T>(
    limit: Duration,
    every: Duration,
    mut attempt: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(why) => assert!(
                tokio::time::Instant::now() < deadline,
                "waited {limit:?} in vain: {why}"
            ),
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `condition` every `every` until it holds; fails the test, naming `what`, once `limit`
/// has passed (a watchdog, not a timing).
pub async fn wait_until(
    limit: Duration,
    every: Duration,
    what: impl Display,
    mut condition: impl AsyncFnMut() -> bool,
) {
    eventually(limit, every, async || {
        if condition().await {
            Ok(())
        } else {
            Err(format!("until {what}"))
        }
    })
    .await;
}

/// Sends `request` and asserts the answer's status (`expected`); returns the answer for more
/// checks.
pub async fn send_expecting(request: reqwest::RequestBuilder, expected: u16) -> reqwest::Response {
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), expected);
    response
}

/// Sends `request` and returns the JSON body of the answer, whatever its status.
pub async fn send_json(request: reqwest::RequestBuilder) -> serde_json::Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// One JSON value a line of `text` (JSON lines, as `--json` prints them).
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The base URL of a gateway this test started on `port`: `https://` when the environment gives
/// gateways a certificate (`compose/local test` does: BIOFEED_GATEWAY_TLS_CERT_FILE), else
/// `http://`.
pub fn gateway_url(port: u16) -> String {
    let scheme = if std::env::var_os("BIOFEED_GATEWAY_TLS_CERT_FILE").is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://127.0.0.1:{port}")
}

/// The local stack's CA certificate (PEM), which signed every service's certificate, if the
/// stack has one (`compose/local` exports it as BIOFEED_CLICKHOUSE_CA_FILE among others).
pub fn local_ca() -> Option<std::path::PathBuf> {
    std::env::var_os("BIOFEED_CLICKHOUSE_CA_FILE").map(Into::into)
}

/// An HTTP client that trusts the local stack's CA (besides the system's roots), for the
/// gateway's HTTPS and ClickHouse's.
pub fn http_client() -> reqwest::Client {
    let mut builder = reqwest::Client::builder();
    if let Some(ca) = local_ca() {
        let pem = std::fs::read(&ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

/// The Prometheus text an HTTP server serves at `{base}/metrics` (`base` like
/// `http://127.0.0.1:9000`); empty while it does not answer.
pub async fn metrics_text(base: &str) -> String {
    match http_client().get(format!("{base}/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// How long removing a test's stores may take: a test that stopped a private service must not
/// hang on removing what that service held (its directory goes with it anyway).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

impl Drop for Isolated {
    /// Drops the test's Postgres and ClickHouse databases and deletes its three topics — by the
    /// names `new` gave them, on whichever servers the settings point at now — each within
    /// [`CLEANUP_TIMEOUT`]; failures are ignored (the names are the test's own, so a leftover
    /// harms no other test). `Drop` cannot await and may run on the test's own single-threaded
    /// runtime, so the removal runs on a thread with a runtime of its own.
    fn drop(&mut self) {
        let database = format!("biofeed_test_{}", self.id);
        let (points, dlq, live) = Self::topic_names(&self.id);
        let topics = [points, dlq, live];
        let stores = self.settings.stores.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            // A timeout only means something is left behind; nothing to report.
            let _timeouts = runtime.block_on(async {
                tokio::join!(
                    tokio::time::timeout(CLEANUP_TIMEOUT, drop_postgres(&database)),
                    tokio::time::timeout(
                        CLEANUP_TIMEOUT,
                        drop_clickhouse(&stores.clickhouse, &database)
                    ),
                    tokio::time::timeout(CLEANUP_TIMEOUT, delete_topics(&stores.kafka, &topics)),
                    tokio::time::timeout(
                        CLEANUP_TIMEOUT,
                        delete_subject(&stores.registry, &topics[0])
                    ),
                )
            });
        });
        let _ = cleanup.join();
    }
}

/// Drops a test's Postgres database, closing whatever connections the test left open.
async fn drop_postgres(database: &str) {
    let Ok(admin) = default_settings().stores.postgres.connect().await else {
        return;
    };
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .execute(&admin)
        .await;
    admin.close().await;
}

/// Drops a test's ClickHouse database.
async fn drop_clickhouse(settings: &ClickHouseSettings, database: &str) {
    let Ok(ch) = settings.connect().await else {
        return;
    };
    // The analyst database's Distributed tables first, then biofeed's; on every node of a
    // cluster (its replicated tables leave ZooKeeper with the last replica).
    let on_cluster = ch
        .cluster()
        .map(|c| format!(" ON CLUSTER {}", c.name))
        .unwrap_or_default();
    for database in [format!("{database}_analyst"), database.to_owned()] {
        let _ = ch
            .ddl(
                ch.server_client()
                    .query(&format!("DROP DATABASE IF EXISTS {database}{on_cluster}")),
            )
            .execute()
            .await;
    }
}

/// Deletes the registry subject of a test's points topic (`biofeed migrate` registered it).
async fn delete_subject(
    settings: &biofeed_backends::registry::RegistrySettings,
    points_topic: &str,
) {
    if let Ok(Some(registry)) = biofeed_backends::registry::Registry::new(settings) {
        let _ = registry
            .delete_subject(&format!("{points_topic}-value"))
            .await;
    }
}

/// Decodes a points message as any reader would: either framing, a Confluent schema id looked
/// up in the registry the tests' settings name (once per id).
pub fn decode_frame(bytes: &[u8]) -> biofeed_schema::SensorFrame {
    use std::sync::{Mutex, OnceLock};
    static WRITERS: OnceLock<Mutex<biofeed_backends::registry::WriterSchemas>> = OnceLock::new();
    let writers = WRITERS.get_or_init(|| {
        let registry =
            biofeed_backends::registry::Registry::new(&default_settings().stores.registry)
                .expect("registry settings");
        Mutex::new(biofeed_backends::registry::WriterSchemas::from_registry(
            registry,
        ))
    });
    let mut writers = writers.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(id) = writers.unknown_id(bytes) {
        // A runtime of its own on a thread of its own: callers are async tests.
        let writers = &mut *writers;
        std::thread::scope(|s| {
            s.spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(writers.learn(id))
                    .expect("the registry answers")
            })
            .join()
            .unwrap()
        });
    }
    biofeed_schema::decode_framed(writers.ids(), bytes).expect("a points message decodes")
}

/// Deletes a test's topics.
async fn delete_topics(settings: &KafkaSettings, topics: &[String]) {
    let Ok(admin) = settings
        .client_config()
        .expect("kafka settings")
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(CLEANUP_TIMEOUT));
    let _ = admin.delete_topics(&names, &options).await;
}

/// How many databases on the configured Postgres server have a name `LIKE pattern`.
pub async fn postgres_databases_like(pattern: &str) -> i64 {
    let pool = default_settings().stores.postgres.connect().await.unwrap();
    let count = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE $1")
        .bind(pattern)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    count
}

/// What a run of the binary did.
pub struct Run {
    /// The exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// How long any single run may take before the test calls it a hang. Far above every connect
/// timeout the tests set; it is a watchdog, not a speed assertion.
const WATCHDOG: Duration = Duration::from_secs(60);

/// Runs the real binary with extra environment variables.
pub async fn run_biofeed(args: &[&str], env: &[(&str, String)]) -> Run {
    run_biofeed_without(args, env, &[]).await
}

/// Runs the real binary with extra environment variables and without `removed` ones (which
/// `compose/local test` may have exported).
pub async fn run_biofeed_without(args: &[&str], env: &[(&str, String)], removed: &[&str]) -> Run {
    run_biofeed_watched(WATCHDOG, args, env, removed).await
}

/// Runs the real binary with extra environment variables, calling it a hang only after `limit`
/// instead of [`WATCHDOG`]: for runs that take minutes by design (`biofeed bench`: a warm-up,
/// the measurement, then draining until every point is stored).
pub async fn run_biofeed_within(limit: Duration, args: &[&str], env: &[(&str, String)]) -> Run {
    run_biofeed_watched(limit, args, env, &[]).await
}

/// Runs the real binary with `env` and without `removed`; fails the test after `limit`.
async fn run_biofeed_watched(
    limit: Duration,
    args: &[&str],
    env: &[(&str, String)],
    removed: &[&str],
) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_biofeed"));
    command.args(args).kill_on_drop(true);
    for key in removed {
        command.env_remove(key);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let output: Output = tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("biofeed {args:?} hung for {limit:?}"))
        .expect("biofeed runs");
    Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A loopback port free at the moment of asking, for a private server of a test's.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process a test started, with a temporary directory of its own: killed, and the
/// directory removed, when dropped.
pub struct ServerProcess {
    /// The directory (configuration, data, logs).
    pub dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl ServerProcess {
    /// A fresh directory named after `kind`; no process yet.
    pub fn new(kind: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("biofeed-{kind}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir, child: None }
    }

    /// Starts the process.
    pub fn spawn(&mut self, command: &mut std::process::Command) {
        self.child = Some(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("{command:?} starts: {e}")),
        );
    }

    /// Waits until `started` (a probe of the server) holds, polling every 200 ms; fails the test,
    /// naming `name` and the directory (its logs), after `limit`.
    pub async fn wait_started(
        &self,
        name: &str,
        limit: Duration,
        started: impl AsyncFnMut() -> bool,
    ) {
        let what = format!("{name} started; see {}", self.dir.display());
        wait_until(limit, Duration::from_millis(200), what, started).await;
    }

    /// Kills the process outright, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A long-running `biofeed` subcommand (consume, jobs, up) as a child process, killed if dropped.
pub struct BiofeedProcess(tokio::process::Child);

impl BiofeedProcess {
    /// Starts `biofeed <args>` with `env`.
    pub fn start(args: &[&str], env: &[(&'static str, String)]) -> Self {
        Self::start_without(args, env, &[])
    }

    /// Starts `biofeed <args>` with `env` and without `removed` (which `compose/local test`
    /// may have exported).
    pub fn start_without(args: &[&str], env: &[(&'static str, String)], removed: &[&str]) -> Self {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_biofeed"));
        for key in removed {
            command.env_remove(key);
        }
        command
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        Self(command.spawn().expect("biofeed starts"))
    }

    /// Sends the signal `name` (e.g. `HUP`) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.0.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Whether the process is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        self.0.try_wait().expect("process state").is_none()
    }

    /// [`Self::stop`], and the process must exit 0; its standard error.
    pub async fn stop_ok(self) -> String {
        let (code, stderr) = self.stop().await;
        assert_eq!(code, 0, "{stderr}");
        stderr
    }

    /// SIGTERM (unless it already exited), then the exit code and standard error (a watchdog,
    /// not a timing: 90 s).
    pub async fn stop(self) -> (i32, String) {
        if let Some(pid) = self.0.id() {
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .expect("kill runs");
        }
        let output = tokio::time::timeout(Duration::from_secs(90), self.0.wait_with_output())
            .await
            .expect("the process stops after SIGTERM")
            .expect("waited");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Waits for the process to end by itself (a watchdog: 5 minutes); its exit code and output.
    pub async fn wait(self) -> Run {
        self.wait_within(Duration::from_secs(300), "the process ends by itself")
            .await
    }

    /// Waits for the process to end, failing the test, naming `what`, after `limit`.
    pub async fn wait_within(self, limit: Duration, what: &str) -> Run {
        let output = tokio::time::timeout(limit, self.0.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{what} within {limit:?}"))
            .expect("waited");
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// SIGKILL: no chance to flush or commit.
    pub async fn kill9(mut self) {
        self.0.kill().await.expect("killed");
    }
}
