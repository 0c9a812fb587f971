//! Shared fixtures for the integration tests, all real parts: an OpenSSH `sshd` as the VM ([`vm`]), an HTTP
//! server as the start API ([`api`]), ssh-on-demand launched by `systemd-socket-activate` the way systemd
//! launches it ([`proxy`]), and the OpenSSH client ([`ssh`]).
#![allow(dead_code)]

pub mod api;
pub mod companion;
pub mod container;
#[path = "../../ssh-on-demand-api/tests/common/emulator.rs"]
pub mod emulator;
pub mod etcd;
pub mod guest;
pub mod log;
pub mod netns;
pub mod proxy;
pub mod ssh;
pub mod steps;
pub mod tls;
pub mod units;
pub mod vm;

use std::{net::SocketAddr, sync::Mutex, time::Duration};

use socket2::{Domain, Socket, Type};

/// A test of what users see, in both modes: `both_modes! { fn name(mode) { … } }` defines the tests
/// `name::activated` and `name::daemon`, which run the body with `mode` set to each.
#[allow(unused_macros)]
macro_rules! both_modes {
    ($(#[$attr:meta])* fn $name:ident($mode:ident) $body:block $($rest:tt)*) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn case($mode: $crate::common::proxy::Mode) $body

            #[test]
            fn activated() {
                case($crate::common::proxy::Mode::Activated)
            }

            #[test]
            fn daemon() {
                case($crate::common::proxy::Mode::Daemon)
            }
        }
        both_modes! { $($rest)* }
    };
    () => {};
}

/// Upper bound for anything a test waits on that should take milliseconds; reaching it is a failure, so it
/// only has to be generous, never precise.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Panics with a useful message unless we are root: sshd must run as root to log users in.
pub fn require_root() {
    if !rustix::process::geteuid().is_root() {
        panic!(
            "these tests run a real sshd on a 127.x.y.z address as the VM, which logs users in, and need \
             root; run them as root (`sudo -E cargo test`, or `.ci/run` on a fresh machine)"
        );
    }
}

/// A TCP port of this test process's own, for listeners on 127.x.y.z addresses (VMs, sockets of units).
/// Port 22 is no good: a stock Debian server's own sshd holds it on 0.0.0.0, which takes it on every
/// 127.x.y.z too. The port is bound on 127.0.0.1, not listening, until the process ends: no other process
/// can then have it on 127.0.0.1 or 0.0.0.0, nor as the local port of a connection, while a listener on any
/// other 127.x.y.z still can.
pub fn reserved_port() -> u16 {
    static HELD: Mutex<Vec<Socket>> = Mutex::new(Vec::new());
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    HELD.lock().unwrap().push(socket);
    port
}
