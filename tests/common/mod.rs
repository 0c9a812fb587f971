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
pub mod tls;
pub mod units;
pub mod vm;

use std::time::Duration;

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

/// Panics with a useful message unless we are root: sshd must bind port 22 of its loopback address and
/// log users in.
pub fn require_root() {
    if !rustix::process::geteuid().is_root() {
        panic!(
            "these tests run a real sshd on port 22 of a 127.x.y.z address and need root; \
             run them as root (`sudo -E cargo test`, or `.ci/run` on a fresh machine)"
        );
    }
}
