//! The systemd units in units/: valid for systemd, and hardened.

mod common;

use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

use common::proxy::BINARY;

/// Every unit the package installs, by its path under units/.
const UNITS: [&str; 6] = [
    "ssh-on-demand.socket",
    "ssh-on-demand@.service",
    "sweep/ssh-on-demand-sweep.service",
    "sweep/ssh-on-demand-sweep.timer",
    "daemon/ssh-on-demand-daemon.socket",
    "daemon/ssh-on-demand-daemon.service",
];

fn units_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/units"))
}

fn name(unit: &str) -> &str {
    unit.rsplit('/').next().unwrap_or(unit)
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
    // The daemon's ExecReload=, from procps (a dependency of the package).
    fs::create_dir_all(path("bin")).unwrap();
    fs::copy("/bin/kill", path("bin/kill")).unwrap();
    for unit in UNITS {
        fs::copy(
            units_dir().join(unit),
            path("etc/systemd/system").join(name(unit)),
        )
        .unwrap();
    }
    symlink("/lib/systemd/system", path("usr/lib/systemd/system")).unwrap();

    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .args(UNITS.map(name))
        .output()
        .expect("running systemd-analyze (apt-get install systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success() && said.is_empty(), "{said}");
}

/// Every service at most 1.5 (`--threshold=15` fails above), with the figures README.md quotes.
#[test]
fn service_exposure_is_at_most_1_5_as_the_readme_says() {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let readme = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    for unit in UNITS.iter().filter(|u| u.ends_with(".service")) {
        let figure = exposure(unit);
        let claim = format!("{} at {figure}", name(unit));
        assert!(readme.contains(&claim), "README.md should say {claim:?}");
    }
}

fn exposure(unit: &str) -> String {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=15"])
        .arg(units_dir().join(unit))
        .output()
        .expect("running systemd-analyze (apt-get install systemd)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{unit}: {report}");
    report
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"))
        .to_owned()
}
