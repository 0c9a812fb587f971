//! fakepve (PyPI), an independent fake of the Proxmox VE API, run by tests/emulators/fakepve_serve.py.

use std::{
    io::{BufRead, BufReader},
    process::{Child, ChildStdin, Command, Stdio},
};

use serde_json::Value;
use tempfile::TempDir;

use super::{PATIENCE, log::Log};

pub const TOKEN_ID: &str = "ssh@pve!companion";
pub const TOKEN_SECRET: &str = "5b0f2f0c-2f4e-4d8e-9d3a-0c6a1f0e7b11";

pub struct Pve {
    child: Child,
    _stdin: ChildStdin,
    pub url: String,
    pub ca_file: String,
    pub fingerprint: String,
    /// Lines the fake prints: one per power action.
    pub events: Log,
    _dir: TempDir,
}

impl Pve {
    /// Serves `guests` (fakepve_serve.py's format).
    pub fn start(guests: Value) -> Pve {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("spec.json");
        let body = serde_json::json!({"token_id": TOKEN_ID, "token_secret": TOKEN_SECRET,
                                      "dir": dir.path(), "guests": guests});
        std::fs::write(&spec, body.to_string()).unwrap();
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/emulators/fakepve_serve.py"
            ))
            .arg(&spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let ready: Value = serde_json::from_str(&first).unwrap_or_else(|_| {
            panic!("fakepve did not start (pip install 'fakepve[crypto]'); it printed {first:?}")
        });
        let events = Log::collect(stdout, "fakepve");
        Pve {
            child,
            _stdin: stdin,
            url: ready["url"].as_str().unwrap().to_owned(),
            ca_file: ready["ca_file"].as_str().unwrap().to_owned(),
            fingerprint: ready["fingerprint"].as_str().unwrap().to_owned(),
            events,
            _dir: dir,
        }
    }

    /// The `[backends.pve]` section for this fake, trusted by `tls` (e.g. `fingerprint = "…"`).
    pub fn backend(&self, tls: &str) -> String {
        format!(
            "[backends.pve]\ntype = \"proxmox\"\nurl = \"{}\"\nnode = \"pve1\"\ntoken_id = \"{TOKEN_ID}\"\n{tls}\n",
            self.url
        )
    }

    /// Power actions of `kind` ("start", "shutdown", "stop") the fake received for `vmid`.
    pub fn actions(&self, kind: &str, vmid: u32) -> usize {
        let needle = format!("\"event\": \"{kind}\", \"vmid\": {vmid}}}");
        self.events
            .lines()
            .iter()
            .filter(|l| l.contains(&needle))
            .count()
    }

    pub fn wait_for_action(&self, kind: &str, vmid: u32) {
        let needle = format!("\"event\": \"{kind}\", \"vmid\": {vmid}}}");
        self.events.wait_for(PATIENCE, |l| l.contains(&needle));
    }
}

impl Drop for Pve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
