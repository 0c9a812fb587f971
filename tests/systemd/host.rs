//! What runs on the host for the modes' containers: two VMs, each started and stopped by a start API of its
//! own, and the address and ports the sockets move to.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::mpsc,
};

use serde_json::json;

use crate::common::{
    self, PATIENCE,
    api::{Answer, StartApi},
    vm::Vm,
};

/// What the lab's start API tells a client it refuses (127.0.0.9).
pub const REFUSAL: &str = "lab is full until 18:00";
pub const REFUSED_CLIENT: &str = "127.0.0.9";

/// What runs on the host: two VMs with their start/stop APIs, and the address and ports the sockets are
/// moved to.
pub struct Host {
    /// The default profile, "lab": a VM per client address.
    pub lab: Vm,
    pub lab_api: StartApi,
    /// Lets the lab's start API answer its first request.
    pub open_gate: mpsc::Sender<()>,
    /// The profile "ci" on a port of its own: one VM for everyone, booted when the test says.
    pub ci: Vm,
    pub ci_api: StartApi,
    pub token: String,
    pub listen: Ipv4Addr,
    /// The ports of the two profiles, for `ListenStream=` (22 and 2222 in production).
    pub lab_port: u16,
    pub ci_port: u16,
}

impl Host {
    /// The lab's start API holds the first request until the test has seen the instance's "starting" status,
    /// then boots the VM and answers with its address; it refuses 127.0.0.9. Both stop APIs stop their VM.
    pub fn new() -> Host {
        let lab = Vm::new();
        let (open_gate, gate) = mpsc::channel::<()>();
        let lab_api = {
            let vm = lab.clone();
            let mut first = true;
            StartApi::serve(move |request| {
                if request.url == "/stop" {
                    vm.stop();
                    return Answer::text("stopped");
                }
                if request.json()["client_addr"] == REFUSED_CLIENT {
                    return Answer::reply(403, "text/plain", REFUSAL);
                }
                if std::mem::take(&mut first) {
                    let _ = gate.recv_timeout(PATIENCE);
                }
                vm.start();
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        let ci = Vm::new();
        let ci_api = {
            let vm = ci.clone();
            StartApi::serve(move |request| {
                if request.url == "/stop" {
                    vm.stop();
                    return Answer::text("stopped");
                }
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        // Its own loopback address and ports, like the VMs: port 22 is the host's own sshd's.
        let listen = Ipv4Addr::new(
            127,
            fastrand::u8(200..=254),
            fastrand::u8(1..255),
            fastrand::u8(1..255),
        );
        Host {
            lab,
            lab_api,
            open_gate,
            ci,
            ci_api,
            token: format!("t0ken-{:016x}", fastrand::u64(..)),
            listen,
            lab_port: common::reserved_port(),
            ci_port: common::reserved_port(),
        }
    }

    pub fn lab_addr(&self) -> SocketAddr {
        (self.listen, self.lab_port).into()
    }

    pub fn ci_addr(&self) -> SocketAddr {
        (self.listen, self.ci_port).into()
    }
}
