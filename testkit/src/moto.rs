//! moto's EC2 server (PyPI `moto[server]`), run by tests/emulators/moto_serve.py with signature checking on
//! and instances whose private addresses are loopback addresses.

use std::process::Stdio;

use super::emulator::Emulator;

pub struct Moto {
    server: Emulator,
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// (instance id, private address), all stopped at first.
    pub instances: Vec<(String, String)>,
}

impl Moto {
    pub fn start(instances: usize) -> Moto {
        Moto::start_with_hibernation(instances, &[])
    }

    /// `instances` stopped instances, those at the indices `hibernation` launched for hibernation.
    pub fn start_with_hibernation(instances: usize, hibernation: &[usize]) -> Moto {
        let count = instances.to_string();
        let indices: Vec<String> = hibernation.iter().map(usize::to_string).collect();
        let option = format!("--hibernation={}", indices.join(","));
        let server = Emulator::start(
            &super::emulator_script("moto_serve.py"),
            &[count.as_ref(), option.as_ref()],
            // moto logs every request there.
            Stdio::null(),
            "moto",
        );
        let instances = server.ready["instances"]
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
            endpoint: server.text("endpoint"),
            access_key_id: server.text("access_key_id"),
            secret_access_key: server.text("secret_access_key"),
            instances,
            server,
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
        self.server.events(&action(kind, id))
    }

    pub fn wait_for_action(&self, kind: &str, id: &str) {
        self.server.wait_for_event(&action(kind, id));
    }
}

fn action(kind: &str, id: &str) -> String {
    format!("\"event\": \"{kind}\", \"id\": \"{id}\"")
}
