//! The systemd units in units/: valid for systemd, and hardened.

mod common;

use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

use common::proxy::BINARY;

const UNITS: [&str; 2] = ["ssh-on-demand.socket", "ssh-on-demand@.service"];

fn units_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/units"))
}

/// `systemd-analyze verify` checks ExecStart= against the file system, so it runs against a root that holds
/// the units and the binary where the units expect them, and systemd's own units from this machine.
#[test]
fn units_verify_clean() {
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p);
    fs::create_dir_all(path("usr/bin")).unwrap();
    fs::create_dir_all(path("etc/systemd/system")).unwrap();
    fs::create_dir_all(path("usr/lib/systemd")).unwrap();
    fs::copy(BINARY, path("usr/bin/ssh-on-demand")).unwrap();
    for unit in UNITS {
        fs::copy(
            units_dir().join(unit),
            path("etc/systemd/system").join(unit),
        )
        .unwrap();
    }
    symlink("/lib/systemd/system", path("usr/lib/systemd/system")).unwrap();

    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .args(UNITS)
        .output()
        .expect("running systemd-analyze (apt-get install systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success() && said.is_empty(), "{said}");
}

/// The figure README.md quotes; `--threshold=15` fails above 1.5.
#[test]
fn service_exposure_is_at_most_1_5() {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=15"])
        .arg(units_dir().join("ssh-on-demand@.service"))
        .output()
        .expect("running systemd-analyze (apt-get install systemd)");
    let report = String::from_utf8_lossy(&output.stdout);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default();
    assert!(output.status.success(), "{overall}\n{report}");
    assert!(overall.contains(": 1.1 "), "update README.md: {overall}");
}
