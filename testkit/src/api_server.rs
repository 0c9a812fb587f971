//! ssh-on-demand-api as systemd starts it: its listening socket passed as fd 3 (`LISTEN_FDS=1`), the token
//! in `$CREDENTIALS_DIRECTORY/api-token`, log records on stderr, which the test reads.

use std::{
    fs,
    net::TcpListener,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::OnceLock,
};

use command_fds::{CommandFdExt, FdMapping};
use serde_json::Value;
use tempfile::TempDir;

use super::{
    PATIENCE,
    log::{Log, spawn_logged},
};

/// ssh-on-demand-api as `cargo test` built it.
pub fn binary() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| super::workspace_binary("ssh-on-demand-api"))
}

pub struct Companion {
    child: Child,
    pub url: String,
    pub log: Log,
    pub dir: TempDir,
    pub token: String,
}

/// An answer: the status and the JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }

    pub fn vm_ip(&self) -> &str {
        assert_eq!(self.status, 200, "{self:?}");
        self.body["vm_ip"].as_str().unwrap_or_default()
    }

    /// How a start went: "running", "booted", "resumed" or "started".
    pub fn how(&self) -> &str {
        assert_eq!(self.status, 200, "{self:?}");
        self.body["how"].as_str().unwrap_or_default()
    }

    /// The "status" of a stop's answer: "off", "suspended", "stopping", "suspending".
    pub fn stop_status(&self) -> (u16, &str) {
        (
            self.status,
            self.body["status"].as_str().unwrap_or_default(),
        )
    }
}

impl Companion {
    /// Runs the companion with `config` (TOML) and these extra credentials (name, content).
    pub fn start(config: &str, credentials: &[(&str, &str)]) -> Companion {
        let dir = tempfile::tempdir().unwrap();
        let (config_file, credentials_dir, token) = prepare(dir.path(), config, credentials);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$@""#)
            .arg("sh")
            .arg(binary())
            .arg("--config")
            .arg(&config_file)
            .args(["--log-target=stderr", "--log-level=debug"])
            .env("CREDENTIALS_DIRECTORY", &credentials_dir)
            .fd_mappings(vec![FdMapping {
                parent_fd: OwnedFd::from(listener),
                child_fd: 3,
            }])
            .unwrap();
        spawn(command, url, dir, token)
    }

    /// Runs the companion listening on a unix socket it binds itself (`--listen unix:…`), and waits until
    /// it says it serves.
    pub fn start_on_unix_socket(config: &str) -> (Companion, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (config_file, credentials_dir, token) = prepare(dir.path(), config, &[]);
        let socket = dir.path().join("api.sock");
        let mut command = Command::new(binary());
        command
            .arg("--config")
            .arg(&config_file)
            .arg(format!("--listen=unix:{}", socket.display()))
            .args(["--log-target=stderr", "--log-level=debug"])
            .env("CREDENTIALS_DIRECTORY", &credentials_dir);
        let companion = spawn(command, "http://localhost".into(), dir, token);
        companion.log.wait_for(PATIENCE, |l| l.contains("serving"));
        (companion, socket)
    }

    /// POSTs `body` to `path` with the right token.
    pub fn post(&self, path: &str, body: Value) -> Reply {
        self.post_with(&client(), path, body, Some(&self.token))
    }

    pub fn post_with(
        &self,
        client: &reqwest::blocking::Client,
        path: &str,
        body: Value,
        token: Option<&str>,
    ) -> Reply {
        let mut request = client
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let response = request.send().expect("the companion answers");
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body }
    }

    /// A start as the proxy sends it, from client 203.0.113.9 unless `client` is given.
    pub fn start_vm(&self, profile: &str) -> Reply {
        self.post("/start", start_body(profile, "203.0.113.9"))
    }

    pub fn stop_vm(&self, profile: &str, vm_ip: &str) -> Reply {
        self.post(
            "/stop",
            serde_json::json!({"vm_ip": vm_ip, "port": 22, "profile": profile, "idle_seconds": 1}),
        )
    }

    /// Log lines containing `text` so far.
    pub fn count(&self, text: &str) -> usize {
        self.log.lines().iter().filter(|l| l.contains(text)).count()
    }
}

pub fn start_body(profile: &str, client: &str) -> Value {
    serde_json::json!({"client_addr": client, "client_port": 51234, "local_addr": "203.0.113.10",
                       "local_port": 22, "profile": profile})
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

fn prepare(dir: &Path, config: &str, credentials: &[(&str, &str)]) -> (PathBuf, PathBuf, String) {
    let config_file = dir.join("config.toml");
    fs::write(&config_file, config).unwrap();
    let credentials_dir = dir.join("credentials");
    fs::create_dir(&credentials_dir).unwrap();
    let token = format!("token-{}", std::process::id());
    fs::write(credentials_dir.join("api-token"), format!("{token}\n")).unwrap();
    for (name, content) in credentials {
        fs::write(credentials_dir.join(name), content).unwrap();
    }
    (config_file, credentials_dir, token)
}

fn spawn(mut command: Command, url: String, dir: TempDir, token: String) -> Companion {
    let (child, log) = spawn_logged(&mut command, "api", "ssh-on-demand-api");
    Companion {
        child,
        url,
        log,
        dir,
        token,
    }
}

impl Drop for Companion {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
