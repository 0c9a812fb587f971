//! The command line an operator types: `check-config`, and what happens when the binary is run by hand.

use testkit as common;

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output, Stdio},
};

use common::proxy::binary;
use ssh_on_demand::{
    cli::{Settings, settings_reference},
    config::Config,
};

fn ssh_on_demand(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, content).unwrap();
    path.display().to_string()
}

#[test]
fn check_config_prints_the_effective_settings_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(dir.path(), "token", "very-secret-token\n");
    let config = write(
        dir.path(),
        "config.toml",
        &format!(
            "api_url = \"http://127.0.0.1:8080/start\"\n\
             api_token_file = \"{token}\"\n\
             api_headers = [\"X-Api-Key: header-secret\"]\n\
             profile = \"from-file\"\n\
             vm_port = 2222\n\
             boot_timeout = \"2m\"\n"
        ),
    );
    let output = ssh_on_demand(
        &["check-config", "--config", &config, "--boot-timeout", "3m"],
        &[
            ("SSH_ON_DEMAND_PROFILE", "from-env"),
            ("SSH_ON_DEMAND_BOOT_TIMEOUT", "90s"),
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let shown = text(&output.stdout);
    assert!(!shown.contains("secret"), "a secret was printed:\n{shown}");
    for expected in [
        "api_url = \"http://127.0.0.1:8080/start\"",
        "# token: ***",
        "api_headers = [\"x-api-key: ***\"]",
        "profile = \"from-env\"", // environment beats file
        "boot_timeout = \"3m\"",  // flag beats environment and file
        "vm_port = 2222",         // file beats default
        "api_timeout = \"10s\"",  // default
        "vm_connect_timeout = \"1s\"",
    ] {
        assert!(
            shown.contains(expected),
            "{expected:?} missing in:\n{shown}"
        );
    }
    // What it prints is itself a valid configuration file.
    let again = write(dir.path(), "again.toml", &shown.replace("# token: ***", ""));
    let output = ssh_on_demand(&["check-config", "--config", &again], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// `check-config` shows every setting there is (config/display.rs is written by hand; the list is
/// `settings_reference()`): with each key of the local store set, each appears as `key = …`. The etcd
/// keys need a cluster (tests/cluster.rs), and a secret's credential is the alternative to its file, shown
/// as the file it came from.
#[test]
fn check_config_shows_every_setting() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(dir.path(), "token", "t0ken\n");
    let headers = write(dir.path(), "headers", "X-Api-Key: k3y\n");
    let https = common::tls::HttpsApi::serve("{}");
    let ca = https.ca_file.display().to_string();
    let settings = format!(
        "api_url = \"https://127.0.0.1:9/start\"\n\
         api_token_file = \"{token}\"\n\
         api_ca_file = \"{ca}\"\n\
         api_headers = [\"X-Trace: 1\"]\n\
         api_headers_file = \"{headers}\"\n\
         api_timeout = \"9s\"\n\
         profile = \"lab\"\n\
         stop_url = \"https://127.0.0.1:9/stop\"\n\
         idle_timeout = \"11m\"\n\
         stop_timeout = \"2m\"\n\
         min_run_time = \"5m\"\n\
         keep_warm = [\"Mon-Fri 08:00-18:00 UTC\"]\n\
         pre_wake = true\n\
         vm_scope = \"profile\"\n\
         vm_port = 2222\n\
         boot_timeout = \"4m\"\n\
         vm_connect_timeout = \"2s\"\n\
         vm_banner_timeout = \"6s\"\n\
         client_banner_timeout = \"4s\"\n\
         silent_clients = \"close\"\n\
         vm_networks = [\"10.0.0.0/8\"]\n\
         client_networks = [\"192.0.2.0/24\"]\n\
         source_start_limit = \"5 per 1m\"\n\
         penalty_strikes = 4\n\
         penalty_max = \"2h\"\n\
         state_dir = \"{state}\"\n\
         state_store = \"local\"\n\
         max_sessions = 100\n\
         max_sessions_per_source = 10\n\
         max_pending_per_vm = 20\n\
         drain_timeout = \"40s\"\n\
         metrics_listen = \"127.0.0.1:9100\"\n\
         [profiles.ci]\n\
         ports = [2200]\n",
        state = dir.path().join("state").display(),
    );
    let config = write(dir.path(), "config.toml", &settings);
    let output = ssh_on_demand(&["check-config", "--config", &config], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let shown = text(&output.stdout);
    let given: BTreeSet<String> = settings
        .lines()
        .filter_map(|line| Some(line.split_once(" = ")?.0.to_owned()))
        .collect();
    let elsewhere =
        |key: &str| key.starts_with("etcd_") || key == "host_id" || key.ends_with("_credential");
    assert_eq!(
        given,
        documented_keys()
            .into_iter()
            .filter(|key| !elsewhere(key))
            .collect(),
        "the configuration above sets every setting but the etcd ones and the credentials"
    );
    for key in &given {
        assert!(
            shown
                .lines()
                .any(|line| line.starts_with(&format!("{key} = "))),
            "check-config does not show {key}:\n{shown}"
        );
    }
}

#[test]
fn check_config_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "api_url = \"http://x/\"\nboot_timout = \"1s\"\n",
            "unknown field `boot_timout`",
        ),
        ("profile = \"lab\"\n", "api_url is not set"),
        ("api_url = \"ftp://x/\"\n", "not ftp://"),
        (
            "api_url = \"http://x/\"\nboot_timeout = \"soon\"\n",
            "boot_timeout",
        ),
        (
            "api_url = \"http://x/\"\napi_token_file = \"/nonexistent/token\"\n",
            "/nonexistent/token",
        ),
        (
            "api_url = \"https://x/\"\napi_ca_file = \"/etc/hostname\"\n",
            "no PEM certificate",
        ),
    ];
    for (content, expected) in cases {
        let config = write(dir.path(), "config.toml", content);
        let output = ssh_on_demand(&["check-config", "--config", &config], &[]);
        assert_eq!(output.status.code(), Some(1), "{content}");
        let error = text(&output.stderr);
        assert!(error.contains(expected), "{expected:?} missing in: {error}");
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn the_token_is_never_taken_from_the_command_line() {
    let output = ssh_on_demand(&["check-config", "--api-token", "x"], &[]);
    assert_eq!(output.status.code(), Some(2));
}

/// Header values are secrets: not taken from the command line (an operator who still passes one learns where
/// they go), never shown by a TOML error (toml quotes the offending line) or a malformed entry.
#[test]
fn header_values_never_reach_the_command_line_or_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "config.toml", "api_url = \"http://x/\"\n");
    let output = ssh_on_demand(
        &[
            "check-config",
            "--config",
            &config,
            "--api-header",
            "X-Api-Key: s3cret",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let error = text(&output.stderr);
    assert!(error.contains("--api-header is not accepted"), "{error}");
    assert!(error.contains("api_headers_file"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");

    for (content, expected) in [
        (
            "api_url = \"http://x/\"\napi_headers = \"X-Api-Key: s3cret\"\n",
            "config.toml, line 2, column 15 (api_headers): invalid type: string \"***\", expected a sequence",
        ),
        (
            "api_url = \"http://x/\"\napi_headers = [\"X-Api-Key: s3cret\" \"X-Other: s3cret\"]\n",
            "config.toml, line 2, column 36 (api_headers): ",
        ),
        (
            "api_url = \"http://x/\"\napi_headers = [\"X-Api-Key s3cret\"]\n",
            "api_headers entry 1: not of the form \"Name: value\"",
        ),
    ] {
        let config = write(dir.path(), "config.toml", content);
        let output = ssh_on_demand(&["check-config", "--config", &config], &[]);
        assert_eq!(output.status.code(), Some(1), "{content}");
        let error = text(&output.stderr);
        assert!(error.contains(expected), "{expected:?} missing in: {error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    let config = write(dir.path(), "good.toml", "api_url = \"http://x/\"\n");
    let headers = write(dir.path(), "headers", "X-Api-Key: s3cret\n");
    let output = ssh_on_demand(
        &[
            "check-config",
            "--config",
            &config,
            "--api-headers-file",
            &headers,
        ],
        &[],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let shown = text(&output.stdout);
    assert!(shown.contains("# x-api-key: ***"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

#[test]
fn run_by_hand_it_explains_what_it_is_for() {
    let output = ssh_on_demand(&["--api-url", "http://127.0.0.1:9/"], &[]);
    assert_eq!(output.status.code(), Some(2));
    let error = text(&output.stderr);
    assert!(
        error.contains("fd 0 is not a connected TCP socket"),
        "{error}"
    );
    assert!(error.contains("Accept=yes"), "{error}");
}

/// `status` as a user other than root, against a state directory only root may enter (as the units' is): one
/// plain line that says it needs root.
#[test]
fn status_as_another_user_says_it_needs_root() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    fs::create_dir(&state).unwrap();
    // The test's own directory is the root's only; nobody must reach the binary and the state's parent. A
    // copy of the binary, since the checkout may be where only root may go (/root).
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    let copy = dir.path().join("ssh-on-demand");
    fs::copy(binary(), &copy).unwrap();
    let output = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&copy)
        .args(["status", "--config=/dev/null"])
        .arg("--api-url=http://127.0.0.1:9/start")
        .arg(format!("--state-dir={}", state.display()))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .output()
        .expect("running runuser (util-linux)");
    assert_eq!(output.status.code(), Some(1));
    let error = text(&output.stderr);
    assert!(
        error.starts_with("ssh-on-demand status: reading ")
            && error.contains("only root may read the service's state; run it as root")
            && error.lines().count() == 1,
        "{error}"
    );
}

/// The keys of the settings' list that the man page ssh-on-demand.toml(5) is generated from.
fn documented_keys() -> BTreeSet<String> {
    settings_reference().into_iter().map(|s| s.key).collect()
}

/// That list is every key the file accepts: serde names them all when it refuses an unknown one.
#[test]
fn the_settings_list_is_every_key_the_file_takes() {
    let refused = toml::from_str::<Settings>("no_such_key = 1").unwrap_err();
    let message = refused.message();
    let expected = message
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("{message}"))
        .1;
    let mut accepted: BTreeSet<String> = expected
        .split(", ")
        .map(|key| key.trim().trim_matches('`').to_owned())
        .collect();
    // The one key that is not a setting: the tables of the profiles.
    assert!(accepted.remove("profiles"), "{accepted:?}");
    assert_eq!(accepted, documented_keys());
}

/// docs/configuration.md has a row for each setting there is, and for nothing else.
#[test]
fn the_configuration_reference_documents_every_setting() {
    let reference = include_str!("../docs/configuration.md");
    let rows: BTreeSet<String> = reference
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|line| line.split_once(" |"))
        // A row may name two keys: `etcd_cert_file`, `etcd_key_file`.
        .flat_map(|(keys, _)| keys.split(", ").map(|key| key.trim_matches('`').to_owned()))
        .filter(|key| key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert_eq!(rows, documented_keys());
}

/// packaging/config.toml is both the conffile and the documentation of every setting: as shipped it sets
/// nothing, and with its `#key = value` lines uncommented it sets each setting there is, by its right name.
#[test]
fn example_config_documents_every_setting() {
    let text = include_str!("../packaging/config.toml");
    let shipped: Settings = toml::from_str(text).unwrap();
    assert!(shipped.api_url.is_none(), "the conffile must set nothing");

    // Prose comments start with "# ", commented-out settings with "#" and the key (or a table header).
    let uncommented: String = text
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .filter(|line| line.starts_with(|c: char| c.is_ascii_lowercase() || c == '['))
        .map(|line| format!("{line}\n"))
        .collect();
    let example: Settings = toml::from_str(&uncommented)
        .unwrap_or_else(|e| panic!("the uncommented example is not valid: {e}\n{uncommented}"));
    assert!(!example.profiles.is_empty(), "the example shows a profile");
    let keys: BTreeSet<String> = example_lines(&uncommented).map(|(key, _)| key).collect();
    assert_eq!(keys, documented_keys());
}

/// `key = value` lines of a TOML text, as (key, the line).
fn example_lines(text: &str) -> impl Iterator<Item = (String, &str)> {
    text.lines()
        .filter(|line| !line.starts_with('['))
        .filter_map(|line| Some((line.split_once('=')?.0.trim().to_owned(), line)))
}

/// Every setting the reference marks as the host's ("Host:", "Daemon:") is refused in a profile's table,
/// each with the value the shipped file shows for it.
#[test]
fn a_profile_may_not_set_what_belongs_to_the_host() {
    let text = include_str!("../packaging/config.toml");
    let uncommented: String = text
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .filter(|line| line.starts_with(|c: char| c.is_ascii_lowercase()))
        .map(|line| format!("{line}\n"))
        .collect();
    let host_only: Vec<String> = settings_reference()
        .into_iter()
        .filter(|s| s.host_only())
        .map(|s| s.key)
        .collect();
    assert!(host_only.len() > 10, "{host_only:?}");
    let dir = tempfile::tempdir().unwrap();
    for (key, line) in example_lines(&uncommented).filter(|(key, _)| host_only.contains(key)) {
        let path = dir.path().join("config.toml");
        fs::write(
            &path,
            format!("api_url = \"http://127.0.0.1/\"\n[profiles.ci]\nports = [2222]\n{line}\n"),
        )
        .unwrap();
        let error = Config::resolve(Some(&path), Settings::default(), None).unwrap_err();
        assert!(
            format!("{error:#}").contains(&format!("{key} is a setting of the host")),
            "{key}: {error:#}"
        );
    }
}
