//! A Kafka broker of one test's own, for tests that stop and restart Kafka without disturbing
//! the shared one. Same jars (the classpath `compose/local up` resolved) and the same
//! configuration template as `compose/local`, on free ports, in a temporary directory: SASL_SSL
//! with the local stack's certificate and SCRAM users (the same passwords, so every role's
//! settings work against it). One difference: it has no ACLs and lets every authenticated user
//! do anything (`allow.everyone.if.no.acl.found=true`); the tests that use it are about faults,
//! and the shared broker's ACLs have tests of their own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::{free_port, ServerProcess};

use base64::Engine;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// The SCRAM users of compose/local's broker, which this one has too.
const SCRAM_USERS: &[&str] = &[
    "biofeed-broker",
    "biofeed-admin",
    "biofeed-gateway",
    "biofeed-consumer",
    "biofeed-jobs",
    "biofeed-service",
];

/// A broker process of this test's.
pub struct PrivateKafka {
    process: ServerProcess,
    port: u16,
    classpath: String,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

impl PrivateKafka {
    /// Formats storage and starts the broker; returns when it answers metadata requests.
    pub async fn start() -> Self {
        let classpath_file = std::env::var("BIOFEED_TEST_KAFKA_CLASSPATH")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join(".state/kafka/classpath"));
        let classpath = std::fs::read_to_string(&classpath_file)
            .unwrap_or_else(|e| {
                panic!(
                    "{} (written by compose/local up): {e}",
                    classpath_file.display()
                )
            })
            .trim()
            .to_owned();
        let process = ServerProcess::new("kafka");
        let dir = process.dir.clone();
        let (port, controller, plain) = (free_port(), free_port(), free_port());
        let state = crate::helpers::state_dir();
        let password = |user: &str| {
            let file = state.join(format!("secrets/kafka-{user}.password"));
            std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{} (made by compose/local up): {e}", file.display()))
                .trim_end()
                .to_owned()
        };
        // The broker's key and certificate in one PEM file, as compose/local writes it.
        let keystore = [
            std::fs::read_to_string(state.join("tls/kafka.key")).unwrap(),
            std::fs::read_to_string(state.join("tls/kafka.pem")).unwrap(),
        ]
        .concat();
        std::fs::write(dir.join("keystore.pem"), keystore).unwrap();
        let config = std::fs::read_to_string(repo().join("compose/kafka/server.properties.in"))
            .unwrap()
            .replace("@DIR@", &dir.display().to_string())
            .replace("@STATE@", &state.display().to_string())
            .replace("@NODE_ID@", "1")
            .replace("@VOTERS@", &format!("1@127.0.0.1:{controller}"))
            .replace("@RF@", "1")
            .replace("@MIN_ISR@", "1")
            .replace("@BROKER_PORT@", &port.to_string())
            .replace("@CONTROLLER_PORT@", &controller.to_string())
            .replace("@PLAIN_PORT@", &plain.to_string())
            .replace("@BROKER_PASSWORD@", &password("biofeed-broker"))
            .replace(
                "allow.everyone.if.no.acl.found=false",
                "allow.everyone.if.no.acl.found=true",
            );
        std::fs::write(dir.join("server.properties"), config).unwrap();
        let mut scram = Vec::new();
        for user in SCRAM_USERS {
            let pw = password(user);
            for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256"] {
                scram.push("--add-scram".to_owned());
                scram.push(format!("{mechanism}=[name={user},password={pw}]"));
            }
        }
        // As Kafka's own Uuid.randomUuid: never an id starting with '-', which the storage
        // tool's argument parser takes for an option (one failed CI run on it).
        let cluster_id = std::iter::repeat_with(|| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes())
        })
        .find(|id| !id.starts_with('-'))
        .unwrap();
        let format = Command::new("java")
            .args([
                "-cp",
                &classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                &cluster_id,
                "-c",
            ])
            .arg(dir.join("server.properties"))
            .args(&scram)
            .output()
            .unwrap();
        assert!(
            format.status.success(),
            "{}",
            String::from_utf8_lossy(&format.stderr)
        );
        let mut kafka = Self {
            process,
            port,
            classpath,
        };
        kafka.launch().await;
        kafka
    }

    /// `host:port` of the broker (`localhost`: the name its certificate has).
    pub fn brokers(&self) -> String {
        format!("localhost:{}", self.port)
    }

    async fn launch(&mut self) {
        let log = std::fs::File::create(self.process.dir.join("kafka.log")).unwrap();
        let mut command = Command::new("java");
        command
            .args(["-Xms128m", "-Xmx512m"])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                repo().join("compose/kafka/log4j2.properties").display()
            ))
            .args(["-cp", &self.classpath, "kafka.Kafka"])
            .arg(self.process.dir.join("server.properties"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        self.process.spawn(&mut command);
        let mut kafka = crate::helpers::default_settings().stores.kafka;
        kafka.brokers = self.brokers();
        let metadata = async || {
            let kafka = kafka.clone();
            tokio::task::spawn_blocking(move || {
                let consumer: BaseConsumer = kafka.client_config().unwrap().create().unwrap();
                consumer
                    .fetch_metadata(None, Duration::from_secs(1))
                    .is_ok_and(|m| !m.brokers().is_empty())
            })
            .await
            .unwrap()
        };
        self.process
            .wait_started("private kafka", Duration::from_secs(90), metadata)
            .await;
    }

    /// Kills the broker outright, as a crash or a pulled cable would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the broker again on the same port and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }
}
