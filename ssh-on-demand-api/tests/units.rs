//! The systemd units in units/: valid for systemd, and hardened as README.md says.

mod common;

use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

use common::companion::BINARY;

const UNITS: [&str; 2] = ["ssh-on-demand-api.socket", "ssh-on-demand-api.service"];

fn units_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/units"))
}

/// `systemd-analyze verify` checks ExecStart= against the file system: a root with the binary and units where
/// the units expect them, and systemd's own units from this machine.
#[test]
fn units_verify_clean() {
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p);
    fs::create_dir_all(path("usr/bin")).unwrap();
    fs::create_dir_all(path("etc/systemd/system")).unwrap();
    fs::create_dir_all(path("usr/lib/systemd")).unwrap();
    fs::copy(BINARY, path("usr/bin/ssh-on-demand-api")).unwrap();
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

#[test]
fn service_exposure_is_at_most_1_5_as_the_readme_says() {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=15"])
        .arg(units_dir().join("ssh-on-demand-api.service"))
        .output()
        .expect("running systemd-analyze (apt-get install systemd)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    let figure = report
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"));
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let readme = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    let claim = format!("rates ssh-on-demand-api.service at {figure}");
    assert!(readme.contains(&claim), "README.md should say {claim:?}");
}
