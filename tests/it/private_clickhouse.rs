//! A ClickHouse server of one test's own, for tests that stop it without disturbing the shared
//! one: the same binary and configuration template as `compose/local`, on free ports, in a
//! temporary directory: HTTPS with the local stack's certificate, and its users (the same
//! passwords, so every role's settings work against it).

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
        let state = crate::helpers::state_dir();
        let mut config = std::fs::read_to_string(repo.join("compose/clickhouse/config.xml.in"))
            .unwrap()
            .replace("@STATE@/tls/", &format!("{}/tls/", state.display()))
            .replace("@DIR@", &dir.join("clickhouse").display().to_string())
            .replace("@STATE@", &dir.display().to_string())
            .replace("@HTTPS_PORT@", &http_port.to_string())
            .replace("@TCP_PORT@", &free_port().to_string())
            .replace("@INTERSERVER_PORT@", &free_port().to_string())
            // compose/local's default (BIOFEED_LOCAL_CH_ZSTD_MIN_PART_BYTES).
            .replace("@ZSTD_MIN_PART_BYTES@", "1073741824");
        // Passwords the configuration names (`@PASSWORD_<user>@`), as compose/local fills them.
        let mut from = 0;
        while let Some(found) = config[from..].find("@PASSWORD_") {
            let start = from + found;
            let name_start = start + "@PASSWORD_".len();
            let name_len = config[name_start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(0);
            let end = name_start + name_len;
            if name_len == 0 || !config[end..].starts_with('@') {
                from = name_start; // prose such as `@PASSWORD_<user>@` in a comment
                continue;
            }
            let user = config[name_start..end].to_owned();
            let file = state.join(format!("secrets/clickhouse-{user}.password"));
            let password = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            config.replace_range(start..=end, password.trim_end());
            from = start;
        }
        std::fs::write(dir.join("clickhouse/config.xml"), config).unwrap();
        // The users as compose/local filled them in (password hashes of its secrets).
        let users = state.join("clickhouse/users.xml");
        std::fs::copy(&users, dir.join("clickhouse/users.xml"))
            .unwrap_or_else(|e| panic!("{} (made by compose/local up): {e}", users.display()));
        let mut server = Self { process, http_port };
        server.launch().await;
        server
    }

    /// The HTTPS URL (`localhost`: the name its certificate has).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.http_port)
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
        let mut settings = crate::helpers::default_settings().stores.clickhouse;
        settings.url = self.url().parse().unwrap();
        self.process
            .wait_started("private clickhouse", Duration::from_secs(60), async || {
                settings.connect().await.is_ok()
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
