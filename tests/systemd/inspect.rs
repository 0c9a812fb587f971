//! The container's systemd and journal as the tests look at them from outside: unit properties, `status
//! --json`, journal records and their fields.

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use serde_json::Value;
use ssh_on_demand::report::SUMMARY_MESSAGE_ID;

use crate::common::{
    PATIENCE,
    container::{Container, wait_for},
};

/// `dir/name` readable by root only, in a directory only root can enter.
pub fn write_private(dir: &Path, name: &str, text: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    let file = dir.join(name);
    fs::write(&file, text).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Waits until `systemctl status` of the running instance shows a `Status: "…"` line (the instance's
/// STATUS=) whose text `wanted` accepts, and returns the text.
pub fn wait_for_status(container: &Container, wanted: impl Fn(&str) -> bool) -> String {
    wait_for("the instance's STATUS=", PATIENCE, || {
        let output = container.run(
            "systemctl",
            &["status", "--no-pager", "--lines=0", "ssh-on-demand@*"],
        );
        let shown = String::from_utf8_lossy(&output.stdout).into_owned();
        let status = shown
            .lines()
            .find_map(|line| line.trim().strip_prefix("Status: \"")?.strip_suffix('"'))
            .filter(|text| wanted(text))
            .map(str::to_owned);
        status.ok_or(shown)
    })
}

/// `ssh-on-demand status --json` in the container, as the operator runs it.
pub fn status_json(container: &Container) -> Value {
    serde_json::from_str(&container.run_ok("ssh-on-demand", &["status", "--json"])).unwrap()
}

/// The VM `key` in a `status --json` document (`Null` if it has none).
pub fn vm<'a>(status: &'a Value, key: &str) -> &'a Value {
    status["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|vm| vm["key"] == key))
        .unwrap_or(&Value::Null)
}

/// A property of `unit` (`systemctl show -p NAME --value`).
pub fn show(container: &Container, unit: &str, property: &str) -> String {
    container
        .run_ok("systemctl", &["show", "-p", property, "--value", unit])
        .trim()
        .to_owned()
}

pub fn is_active(container: &Container, unit: &str) -> bool {
    let output = container.run("systemctl", &["is-active", unit]);
    String::from_utf8_lossy(&output.stdout).trim() == "active"
}

/// Waits for a journal record that `matches` select, and returns the newest.
pub fn newest_record(container: &Container, matches: &[&str]) -> Value {
    wait_for(&format!("a journal record {matches:?}"), PATIENCE, || {
        container
            .journal(matches)
            .pop()
            .ok_or_else(|| "no such record".to_owned())
    })
}

/// The newest record of `unit` whose message contains `text`.
pub fn journal_says(container: &Container, unit: &str, text: &str) -> Result<Value, String> {
    container
        .journal(&[&format!("_SYSTEMD_UNIT={unit}")])
        .into_iter()
        .rev()
        .find(|record| record["MESSAGE"].as_str().is_some_and(|m| m.contains(text)))
        .ok_or_else(|| format!("no record of {unit} says {text:?}"))
}

pub fn summary_match() -> String {
    format!("MESSAGE_ID={SUMMARY_MESSAGE_ID}")
}

/// A text field of a journal record (`journalctl -o json`), or a panic naming it.
pub fn field<'a>(record: &'a Value, name: &str) -> &'a str {
    record[name]
        .as_str()
        .unwrap_or_else(|| panic!("no text field {name} in {record}"))
}

pub fn number(record: &Value, name: &str) -> u64 {
    field(record, name)
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not a number ({e}) in {record}"))
}
