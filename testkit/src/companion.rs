//! ssh-on-demand-api, the companion start/stop API (a workspace member), built with cargo and run on a
//! loopback port it binds itself; and the platform emulators its own tests use (moto, fakepve), from
//! ssh-on-demand-api/tests/emulators/.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
};

use serde_json::Value;
use tempfile::TempDir;

use super::{
    emulator::Emulator,
    log::{Log, spawn_logged},
};

/// Builds ssh-on-demand-api once per test binary, the way tests/systemd/ builds the package. As the whole
/// workspace with every target, as `cargo test --workspace` builds it: `-p ssh-on-demand-api` alone would
/// leave out the dev-dependencies' features, and so rebuild much of the dependency tree (50 s in CI) into
/// the same directory, for the next `cargo test` to rebuild again.
pub fn binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cargo = Command::new(env!("CARGO"));
        // As from a shell: without what `cargo test` set for this test (LD_LIBRARY_PATH, CARGO_PKG_*, the
        // [env] of .cargo/config.toml). Build scripts watch some of it, so with it this build redid their
        // crates (35 s), and the next `cargo test` redid them again.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let ours = key == "CARGO_HOME" || key == "CARGO_TARGET_DIR";
            if (key.starts_with("CARGO_") && !ours) || key == "LD_LIBRARY_PATH" {
                cargo.env_remove(&*key);
            }
        }
        let status = cargo
            .args(["build", "--quiet", "--workspace", "--all-targets"])
            .current_dir(super::workspace())
            .status()
            .expect("running cargo");
        assert!(status.success(), "building ssh-on-demand-api failed");
        PathBuf::from(super::workspace_binary("ssh-on-demand-api"))
    })
}

pub fn emulator(name: &str) -> PathBuf {
    super::emulator_script(name)
}

/// The companion, serving on 127.0.0.1:PORT with a fresh bearer token.
pub struct Companion {
    child: Child,
    pub url: String,
    pub log: Log,
    /// The token file, for the proxy's `--api-token-file`.
    pub token_file: PathBuf,
    _dir: TempDir,
}

impl Companion {
    /// Runs it with `config` (TOML, without `listen`) and these credentials (name, content).
    pub fn start(config: &str, credentials: &[(&str, &str)]) -> Companion {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        fs::create_dir(&creds).unwrap();
        let token_file = creds.join("api-token");
        fs::write(&token_file, format!("companion-{}\n", std::process::id())).unwrap();
        for (name, content) in credentials {
            fs::write(creds.join(name), content).unwrap();
        }
        // A free port, given up just before the companion binds it; it says when it serves.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config_file = dir.path().join("config.toml");
        fs::write(
            &config_file,
            format!("listen = \"127.0.0.1:{port}\"\n{config}"),
        )
        .unwrap();
        let (child, log) = spawn_logged(
            Command::new(binary())
                .arg("--config")
                .arg(&config_file)
                .args(["--log-target=stderr", "--log-level=debug"])
                .env("CREDENTIALS_DIRECTORY", &creds),
            "api",
            "ssh-on-demand-api",
        );
        log.wait_for(super::PATIENCE, |l| {
            l.contains("serving") || l.contains("ERROR")
        });
        Companion {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            token_file,
            _dir: dir,
        }
    }

    pub fn start_url(&self) -> String {
        format!("{}/start", self.url)
    }

    pub fn stop_url(&self) -> String {
        format!("{}/stop", self.url)
    }

    /// A stop as the proxy sends it, by hand: the status and the JSON body of the answer.
    pub fn stop_vm(&self, profile: &str, vm_ip: &str) -> (u16, Value) {
        let body =
            serde_json::json!({"vm_ip": vm_ip, "port": 22, "profile": profile, "idle_seconds": 1});
        self.post("/stop", &body.to_string())
    }

    /// One HTTP/1.1 POST with the bearer token, over a connection the answer closes.
    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let host = self.url.trim_start_matches("http://");
        let token = fs::read_to_string(&self.token_file).unwrap();
        let mut stream = TcpStream::connect(host).unwrap();
        stream.set_read_timeout(Some(super::PATIENCE)).unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            token.trim(),
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
        (
            status,
            serde_json::from_str(body).unwrap_or(Value::String(body.into())),
        )
    }
}

impl Drop for Companion {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's EC2 server with one stopped instance at `ip`.
pub fn moto(ip: &str) -> Emulator {
    Emulator::start(
        &emulator("moto_serve.py"),
        &["1".as_ref(), ip.as_ref()],
        Stdio::null(),
        "moto",
    )
}

/// fakepve with a stopped QEMU VM 100 whose guest agent reports `ip` on eth0; the directory holds its state.
pub fn fakepve(ip: &str, token_id: &str, secret: &str) -> (Emulator, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let agent = serde_json::json!({"interfaces": [{"name": "eth0", "ip-addresses": [
        {"ip-address": ip, "ip-address-type": "ipv4", "prefix": 24}]}]});
    let spec = serde_json::json!({"token_id": token_id, "token_secret": secret, "dir": dir.path(),
        "guests": [{"vmid": 100, "name": "dev", "agent": agent, "agent_after_start": 0.2}]});
    let path = dir.path().join("spec.json");
    fs::write(&path, spec.to_string()).unwrap();
    let pve = Emulator::start(
        &emulator("fakepve_serve.py"),
        &[path.as_os_str()],
        Stdio::null(),
        "fakepve",
    );
    (pve, dir)
}
