//! The integration tests' fixtures, for both crates' tests, all real parts: an OpenSSH `sshd` as the VM
//! ([`vm`]), an HTTP server as the start API ([`api`]), ssh-on-demand launched by `systemd-socket-activate`
//! the way systemd launches it ([`proxy`]), the OpenSSH client ([`ssh`]), real systemd in a container
//! ([`container`], [`steps`]), an etcd cluster ([`etcd`]), network faults ([`netns`]), a real guest
//! ([`guest`]); the companion for the proxy's tests ([`companion`]) and for its own ([`api_server`]), and
//! the platform emulators ([`emulator`], [`moto`], [`pve`]). A test binary takes it as its `common`
//! (`use testkit as common;`).

// A fixture's `new` starts processes and binds sockets: no `Default`, which would hide that.
#![allow(clippy::new_without_default)]

pub mod api;
pub mod api_server;
pub mod companion;
pub mod container;
pub mod emulator;
pub mod etcd;
pub mod guest;
pub mod log;
pub mod moto;
pub mod netns;
pub mod proxy;
pub mod pve;
pub mod ssh;
pub mod steps;
pub mod tls;
pub mod units;
pub mod vm;

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

/// A test of what users see, in both modes: `both_modes! { fn name(mode) { … } }` defines the tests
/// `name::activated` and `name::daemon`, which run the body with `mode` set to each.
#[macro_export]
macro_rules! both_modes {
    ($(#[$attr:meta])* fn $name:ident($mode:ident) $body:block $($rest:tt)*) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn case($mode: $crate::proxy::Mode) $body

            #[test]
            fn activated() {
                case($crate::proxy::Mode::Activated)
            }

            #[test]
            fn daemon() {
                case($crate::proxy::Mode::Daemon)
            }
        }
        $crate::both_modes! { $($rest)* }
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

/// The workspace's root directory.
pub fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The target directory the running test was built into (`$CARGO_TARGET_DIR`, or the workspace's
/// `target/`): the test binary is `TARGET/debug/deps/NAME-HASH`.
pub fn target_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        exe.ancestors()
            .nth(3)
            .expect("the test binary is in TARGET/debug/deps")
            .to_owned()
    })
}

/// A scratch directory for the tests, kept between runs (`TARGET/tmp`, as cargo's `CARGO_TARGET_TMPDIR`).
pub fn target_tmp() -> PathBuf {
    target_dir().join("tmp")
}

/// A program of the workspace, which `cargo test` builds beside the test binaries (`TARGET/debug/NAME`).
pub fn workspace_binary(name: &str) -> String {
    target_dir()
        .join("debug")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Runs `command` to completion with nothing on its stdin; panics with its stderr unless it succeeded.
pub fn output_ok(command: &mut Command) -> Output {
    let output = command.stdin(Stdio::null()).output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Writes an executable script.
pub fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A fresh 127.x.y prefix for a test, so that tests running at once never share an address.
pub fn loopback_net() -> String {
    format!(
        "127.{}.{}",
        100 + std::process::id() % 100,
        fastrand::u8(2..252)
    )
}

/// One of the emulators' scripts in ssh-on-demand-api/tests/emulators/.
pub fn emulator_script(name: &str) -> PathBuf {
    workspace()
        .join("ssh-on-demand-api/tests/emulators")
        .join(name)
}
