//! moto's EC2 server (PyPI `moto[server]`), run by tests/emulators/moto_serve.py with signature checking on
//! and instances whose private addresses are loopback addresses.

use std::{
    io::{BufRead, BufReader},
    process::{Child, ChildStdin, Command, Stdio},
};

use serde_json::Value;

use super::{PATIENCE, log::Log};

pub struct Moto {
    child: Child,
    _stdin: ChildStdin,
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// (instance id, private address), all stopped at first.
    pub instances: Vec<(String, String)>,
    pub events: Log,
}

impl Moto {
    pub fn start(instances: usize) -> Moto {
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/emulators/moto_serve.py"
            ))
            .arg(instances.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let ready: Value = serde_json::from_str(&first).unwrap_or_else(|_| {
            panic!("moto did not start (pip install 'moto[server]'); it printed {first:?}")
        });
        let text = |key: &str| ready[key].as_str().unwrap().to_owned();
        let instances = ready["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_owned(),
                    i["ip"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        Moto {
            endpoint: text("endpoint"),
            access_key_id: text("access_key_id"),
            secret_access_key: text("secret_access_key"),
            instances,
            events: Log::collect(stdout, "moto"),
            child,
            _stdin: stdin,
        }
    }

    /// The `[backends.aws]` section for this server; the credentials file is the `aws-credentials` credential.
    pub fn backend(&self) -> String {
        format!(
            "[backends.aws]\ntype = \"ec2\"\nregion = \"eu-central-1\"\nendpoint = \"{}\"\n",
            self.endpoint
        )
    }

    /// An AWS credentials file with this server's key and `secret`.
    pub fn credentials(&self, secret: &str) -> String {
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n",
            self.access_key_id
        )
    }

    pub fn actions(&self, kind: &str, id: &str) -> usize {
        let needle = format!("\"event\": \"{kind}\", \"id\": \"{id}\"");
        self.events
            .lines()
            .iter()
            .filter(|l| l.contains(&needle))
            .count()
    }

    pub fn wait_for_action(&self, kind: &str, id: &str) {
        let needle = format!("\"event\": \"{kind}\", \"id\": \"{id}\"");
        self.events.wait_for(PATIENCE, |l| l.contains(&needle));
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
