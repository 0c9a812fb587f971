//! Shared fixtures for ssh-on-demand-api's integration tests: the companion itself, started the way systemd
//! starts it ([`companion`]), and independent platform emulators: libvirt's own test driver, fakepve for
//! Proxmox VE ([`pve`]) and moto's EC2 server ([`moto`]), each from its own project.
#![allow(dead_code)]

pub mod companion;
// One copy for both crates' tests, like log.rs.
pub mod emulator;
// The proxy's own helper: one copy for both crates' tests.
#[path = "../../../tests/common/log.rs"]
pub mod log;
pub mod moto;
pub mod pve;
// The proxy's: one copy for both crates' tests/units.rs.
#[path = "../../../tests/common/units.rs"]
pub mod units;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

/// Upper bound for anything a test waits on that should take milliseconds; reaching it is a failure.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Writes an executable script.
pub fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A fresh 127.x.y.z address for a test, so that tests running at once never share one.
pub fn loopback_net() -> String {
    format!("127.{}.{}", 100 + std::process::id() % 100, fastrand_u8())
}

fn fastrand_u8() -> u8 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos % 250) as u8 + 2
}

/// One of the emulators' scripts in tests/emulators/.
pub fn emulator_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/emulators")
        .join(name)
}
