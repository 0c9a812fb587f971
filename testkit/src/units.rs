//! Checks of systemd units with `systemd-analyze`, for both crates' tests/units.rs (the companion's tests
//! include this file by path, like log.rs).

use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

/// `systemd-analyze verify` of `units` (paths under `units_dir`), with no complaint at all. It checks
/// ExecStart= against the file system, so it runs against a root that holds `files` (what, where) and the
/// units where the units expect them, and systemd's own units from this machine.
pub fn verify_clean(units_dir: &Path, units: &[&str], files: &[(&str, &str)]) {
    let root = tempfile::tempdir().unwrap();
    let path = |p: &str| root.path().join(p.trim_start_matches('/'));
    fs::create_dir_all(path("etc/systemd/system")).unwrap();
    fs::create_dir_all(path("usr/lib/systemd")).unwrap();
    for (from, to) in files {
        fs::create_dir_all(path(to).parent().unwrap()).unwrap();
        fs::copy(from, path(to)).unwrap();
    }
    let names: Vec<&str> = units.iter().map(|u| file_name(u)).collect();
    for (unit, name) in units.iter().zip(&names) {
        fs::copy(units_dir.join(unit), path("etc/systemd/system").join(name)).unwrap();
    }
    symlink("/lib/systemd/system", path("usr/lib/systemd/system")).unwrap();

    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .args(&names)
        .output()
        .expect("running systemd-analyze (apt-get install systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success() && said.is_empty(), "{said}");
}

/// `systemd-analyze security`'s overall exposure of the service `unit` ("1.1"), which must be at most 1.5.
pub fn exposure(unit: &Path) -> String {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=15"])
        .arg(unit)
        .output()
        .expect("running systemd-analyze (apt-get install systemd)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}: {report}", unit.display());
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

/// `readme` says `claim`, however its lines are wrapped.
pub fn assert_readme_says(readme: &Path, claim: &str) {
    let text = fs::read_to_string(readme).unwrap();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        text.contains(claim),
        "{} should say {claim:?}",
        readme.display()
    );
}

/// A unit's file name, from its path under units/.
pub fn file_name(unit: &str) -> &str {
    unit.rsplit('/').next().unwrap_or(unit)
}
