//! A Kafka broker of one test's own, for tests that stop and restart Kafka without disturbing
//! the shared one. Same jars (the classpath `compose/local up` resolved) and the same
//! configuration template as `compose/local`, on free ports, in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::free_port;

use base64::Engine;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// A broker process of this test's.
pub struct PrivateKafka {
    dir: PathBuf,
    port: u16,
    classpath: String,
    child: Option<Child>,
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
        let dir =
            std::env::temp_dir().join(format!("biofeed-kafka-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (port, controller) = (free_port(), free_port());
        let config = std::fs::read_to_string(repo().join("compose/kafka/server.properties.in"))
            .unwrap()
            .replace(
                "@STATE@/kafka/data",
                &dir.join("data").display().to_string(),
            )
            .replace("@BROKER_PORT@", &port.to_string())
            .replace("@CONTROLLER_PORT@", &controller.to_string());
        std::fs::write(dir.join("server.properties"), config).unwrap();
        let cluster_id = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(uuid::Uuid::new_v4().as_bytes());
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
            .output()
            .unwrap();
        assert!(
            format.status.success(),
            "{}",
            String::from_utf8_lossy(&format.stderr)
        );
        let mut kafka = Self {
            dir,
            port,
            classpath,
            child: None,
        };
        kafka.launch().await;
        kafka
    }

    /// `host:port` of the broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("kafka.log")).unwrap();
        let child = Command::new("java")
            .args(["-Xms128m", "-Xmx512m"])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                repo().join("compose/kafka/log4j2.properties").display()
            ))
            .args(["-cp", &self.classpath, "kafka.Kafka"])
            .arg(self.dir.join("server.properties"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let brokers = self.brokers();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let brokers = brokers.clone();
            let up = tokio::task::spawn_blocking(move || {
                let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .create()
                    .unwrap();
                consumer
                    .fetch_metadata(None, Duration::from_secs(1))
                    .is_ok_and(|m| !m.brokers().is_empty())
            })
            .await
            .unwrap();
            if up {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "private kafka did not start; see {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Kills the broker outright, as a crash or a pulled cable would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
