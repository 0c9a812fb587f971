//! fakepve (PyPI), an independent fake of the Proxmox VE API, run by tests/emulators/fakepve_serve.py.

use std::process::Stdio;

use serde_json::Value;
use tempfile::TempDir;

use super::emulator::Emulator;

pub const TOKEN_ID: &str = "ssh@pve!companion";
pub const TOKEN_SECRET: &str = "5b0f2f0c-2f4e-4d8e-9d3a-0c6a1f0e7b11";

pub struct Pve {
    server: Emulator,
    pub url: String,
    pub ca_file: String,
    pub fingerprint: String,
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
        let server = Emulator::start(
            &super::emulator_script("fakepve_serve.py"),
            &[spec.as_os_str()],
            Stdio::inherit(),
            "fakepve",
        );
        Pve {
            url: server.text("url"),
            ca_file: server.text("ca_file"),
            fingerprint: server.text("fingerprint"),
            server,
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

    /// Power actions of `kind` ("start", "shutdown", "stop", "suspend", "hibernate", "resume") the fake
    /// received for `vmid`.
    pub fn actions(&self, kind: &str, vmid: u32) -> usize {
        self.server.events(&action(kind, vmid))
    }

    pub fn wait_for_action(&self, kind: &str, vmid: u32) {
        self.server.wait_for_event(&action(kind, vmid));
    }
}

fn action(kind: &str, vmid: u32) -> String {
    format!("\"event\": \"{kind}\", \"vmid\": {vmid}}}")
}
