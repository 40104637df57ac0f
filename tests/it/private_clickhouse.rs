//! A ClickHouse server of one test's own, for tests that stop it without disturbing the shared
//! one: the same binary and configuration template as `compose/local`, on free ports, in a
//! temporary directory.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::{free_port, ServerProcess};

/// A ClickHouse server process of this test's.
pub struct PrivateClickHouse {
    process: ServerProcess,
    http_port: u16,
}

impl PrivateClickHouse {
    /// Starts a server; returns when it answers queries.
    pub async fn start() -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let process = ServerProcess::new("clickhouse");
        let dir = process.dir.clone();
        for sub in [
            "clickhouse/data",
            "clickhouse/tmp",
            "clickhouse/user_files",
            "clickhouse/format_schemas",
            "clickhouse/log",
        ] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let http_port = free_port();
        let config = std::fs::read_to_string(repo.join("compose/clickhouse/config.xml.in"))
            .unwrap()
            .replace("@STATE@", &dir.display().to_string())
            .replace("@HTTP_PORT@", &http_port.to_string())
            .replace("@TCP_PORT@", &free_port().to_string())
            .replace("@INTERSERVER_PORT@", &free_port().to_string());
        std::fs::write(dir.join("clickhouse/config.xml"), config).unwrap();
        std::fs::copy(
            repo.join("compose/clickhouse/users.xml"),
            dir.join("clickhouse/users.xml"),
        )
        .unwrap();
        let mut server = Self { process, http_port };
        server.launch().await;
        server
    }

    /// The HTTP URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    async fn launch(&mut self) {
        let config = self.process.dir.join("clickhouse/config.xml");
        let mut command = Command::new("clickhouse-server");
        command
            .arg(format!("--config-file={}", config.display()))
            .current_dir(self.process.dir.join("clickhouse"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.process.spawn(&mut command);
        let client = reqwest::Client::new();
        let url = self.url();
        self.process
            .wait_started("private clickhouse", Duration::from_secs(60), async || {
                let answer = client.get(format!("{url}/?query=SELECT%201")).send().await;
                answer.is_ok_and(|r| r.status().is_success())
            })
            .await;
    }

    /// Kills the server outright.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }
}
