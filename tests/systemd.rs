//! ssh-on-demand under real systemd: the Debian package, built from the current sources, is installed into a
//! container that boots systemd 252 as PID 1, configured and enabled the way the README tells an operator, and
//! then used from the host: an ssh login through the socket unit to a VM (a real sshd started by a real start
//! API), a refused login, the journal's records, `systemctl status`, and systemd-analyze on the installed units.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Instant,
};

use clap::Args;
use common::{
    PATIENCE,
    api::{Answer, StartApi},
    container::{self, Container, wait_for},
    log::Log,
    ssh::{run, ssh},
    vm::Vm,
};
use serde_json::{Value, json};
use ssh_on_demand::{config::Settings, connection::SUMMARY_MESSAGE_ID};
use wait_timeout::ChildExt;

/// What the start API answers to every login after the first: a refusal with a reason for the user.
const REFUSAL: &str = "lab is full until 18:00";

#[test]
fn installed_package_serves_ssh_under_real_systemd() {
    if let Some(why) = container::unavailable() {
        return skipped(&why);
    }
    let packages = tempfile::tempdir().unwrap();
    let deb = build_deb(packages.path());
    let rootfs = container::cached_rootfs();
    if let Err(why) = Container::preflight(&rootfs) {
        return skipped(&why);
    }
    let host = Host::new();

    let started = Instant::now();
    let container = Container::boot(&rootfs, |root| {
        fs::copy(&deb, root.join("root/ssh-on-demand.deb")).unwrap();
    });
    eprintln!("container booted in {:?}", started.elapsed());
    // As the README tells an operator: install the package, configure, enable the socket.
    container.run_ok("dpkg", &["--install", "/root/ssh-on-demand.deb"]);
    check_installed_package(&container);
    configure(&container, &host);

    let client = login_held_open(&container, &host);
    check_login_summary(&container, &host, &client);
    refused_login(&container, &host);
    login_without_token(&container, &host);
    instances_are_collected(&container);

    // The token is in no journal record, whatever its field.
    let journal = container.run_ok("journalctl", &["--no-pager", "--output=export"]);
    assert!(!journal.contains(&host.token), "the token was logged");
}

/// What runs on the host: the VM, the start API and the address the socket unit is moved to.
struct Host {
    vm: Vm,
    api: StartApi,
    /// Lets the start API answer its first request.
    open_gate: mpsc::Sender<()>,
    token: String,
    listen: SocketAddr,
}

impl Host {
    /// The start API holds the first request until the test has seen the instance's "starting" status, then
    /// boots the VM and answers with its address; it refuses every later request.
    fn new() -> Host {
        let vm = Vm::new();
        let (open_gate, gate) = mpsc::channel::<()>();
        let api = {
            let vm = vm.clone();
            let mut served = 0;
            StartApi::serve(move |_| {
                served += 1;
                if served > 1 {
                    return Answer::reply(403, "text/plain", REFUSAL);
                }
                let _ = gate.recv_timeout(PATIENCE);
                vm.start();
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        // Its own loopback address on port 22, like the VMs: port 22 of 0.0.0.0 would collide with them.
        let listen = SocketAddr::from((
            Ipv4Addr::new(
                127,
                fastrand::u8(200..=254),
                fastrand::u8(1..255),
                fastrand::u8(1..255),
            ),
            22,
        ));
        Host {
            vm,
            api,
            open_gate,
            token: format!("t0ken-{:016x}", fastrand::u64(..)),
            listen,
        }
    }
}

/// The operator's part: the start API in the config file, the token in the credential store, the socket
/// moved to the test's address with a drop-in, then enabled.
fn configure(container: &Container, host: &Host) {
    let root = container.root();
    fs::write(
        root.join("etc/ssh-on-demand/config.toml"),
        format!("api_url = \"{}\"\nprofile = \"lab\"\n", host.api.url()),
    )
    .unwrap();
    write_private(
        &root.join("etc/credstore"),
        "ssh-on-demand.api-token",
        &host.token,
    );
    let drop_in = root.join("etc/systemd/system/ssh-on-demand.socket.d");
    fs::create_dir_all(&drop_in).unwrap();
    fs::write(
        drop_in.join("listen.conf"),
        format!("[Socket]\nListenStream=\nListenStream={}\n", host.listen),
    )
    .unwrap();
    container.run_ok("systemctl", &["daemon-reload"]);
    container.run_ok("systemctl", &["enable", "--now", "ssh-on-demand.socket"]);
}

/// A login that runs a command, held open until the test has seen the instance's STATUS= texts in
/// `systemctl status`. Returns the client's address as the instance saw it.
fn login_held_open(container: &Container, host: &Host) -> String {
    let mut session = ssh(host.listen, &host.vm.client_key())
        .arg(r#"echo ready; read line; echo "got $line""#)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let said = Log::collect(session.stdout.take().unwrap(), "ssh");
    let _ = Log::collect(session.stderr.take().unwrap(), "ssh stderr");

    let starting = wait_for_status(container, |s| {
        s.starts_with("starting the VM for 127.0.0.1:")
    });
    let client = starting
        .trim_start_matches("starting the VM for ")
        .to_owned();
    host.open_gate.send(()).unwrap();
    said.wait_for(PATIENCE, |line| line == "ready");
    let relaying = format!("relaying {client} <-> {}", host.vm.addr());
    wait_for_status(container, |s| s == relaying);

    let mut stdin = session.stdin.take().unwrap();
    stdin.write_all(b"bye\n").unwrap();
    drop(stdin);
    let status = session.wait_timeout(PATIENCE).unwrap().expect("ssh ended");
    assert!(status.success(), "ssh: {status}");
    said.wait_for(PATIENCE, |line| line == "got bye");
    client
}

/// The start API's view of the login, and the login's summary record with every structured field.
fn check_login_summary(container: &Container, host: &Host, client: &str) {
    // The unit passed the token from /etc/credstore as its credential.
    let request = &host.api.requests()[0];
    let authorization = format!("Bearer {}", host.token);
    assert_eq!(
        request.header("Authorization"),
        Some(authorization.as_str())
    );
    let body = request.json();
    assert_eq!(body["client_addr"], "127.0.0.1");
    assert_eq!(body["local_addr"], host.listen.ip().to_string());
    assert_eq!(body["local_port"], 22);
    assert_eq!(body["profile"], "lab");

    let summary = wait_for("the login's summary record", PATIENCE, || {
        container
            .journal(&[&summary_match(), "OUTCOME=relayed"])
            .pop()
            .ok_or_else(|| "no such record".to_owned())
    });
    assert_eq!(field(&summary, "SYSLOG_IDENTIFIER"), "ssh-on-demand");
    assert!(field(&summary, "_SYSTEMD_UNIT").starts_with("ssh-on-demand@"));
    assert_eq!(field(&summary, "PRIORITY"), "5");
    assert_eq!(field(&summary, "CLIENT_ADDR"), "127.0.0.1");
    assert_eq!(
        format!("127.0.0.1:{}", field(&summary, "CLIENT_PORT")),
        client
    );
    assert_eq!(field(&summary, "PROFILE"), "lab");
    assert_eq!(field(&summary, "VM"), host.vm.addr().to_string());
    for name in ["API_MS", "VM_WAIT_MS", "DURATION_MS"] {
        number(&summary, name);
    }
    for name in ["BYTES_TO_VM", "BYTES_TO_CLIENT"] {
        assert!(number(&summary, name) > 0, "{name}: {summary}");
    }
}

/// The start API refuses: the user reads its reason, and the journal has it in a warning.
fn refused_login(container: &Container, host: &Host) {
    let output = run(
        ssh(host.listen, &host.vm.client_key()).arg("true"),
        PATIENCE,
    );
    let seen = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(255), "{seen}");
    assert!(
        seen.contains(&format!(
            "Received disconnect from {} port 22",
            host.listen.ip()
        )) && seen.contains("VM failed to start: ")
            && seen.contains(REFUSAL),
        "{seen}"
    );
    let refused = wait_for("the refused login's summary record", PATIENCE, || {
        container
            .journal(&[&summary_match(), "OUTCOME=api_failed"])
            .pop()
            .ok_or_else(|| "no such record".to_owned())
    });
    assert_eq!(field(&refused, "PRIORITY"), "4");
    assert_eq!(field(&refused, "CLIENT_ADDR"), "127.0.0.1");
    assert!(field(&refused, "REASON").contains(REFUSAL), "{refused}");
}

/// Without /etc/credstore/ssh-on-demand.api-token the unit still starts (systemd skips a `LoadCredential=`
/// by name that it cannot find), and asks the start API without a token.
fn login_without_token(container: &Container, host: &Host) {
    fs::remove_file(
        container
            .root()
            .join("etc/credstore/ssh-on-demand.api-token"),
    )
    .unwrap();
    let output = run(
        ssh(host.listen, &host.vm.client_key()).arg("true"),
        PATIENCE,
    );
    let seen = String::from_utf8_lossy(&output.stderr);
    assert!(seen.contains(REFUSAL), "{seen}");
    let requests = host.api.wait_for_requests(3, PATIENCE);
    assert_eq!(requests[2].header("Authorization"), None);
}

/// Every instance ends and is collected, the failed ones (exit status 1) too, and the socket listens on.
fn instances_are_collected(container: &Container) {
    wait_for("the instances to be gone", PATIENCE, || {
        let units = container.run_ok(
            "systemctl",
            &[
                "list-units",
                "--all",
                "--plain",
                "--no-legend",
                "ssh-on-demand@*",
            ],
        );
        if units.trim().is_empty() {
            Ok(())
        } else {
            Err(units)
        }
    });
    let failed = container.run_ok("systemctl", &["--failed", "--plain", "--no-legend"]);
    assert!(!failed.contains("ssh-on-demand"), "{failed}");
    let socket = container.run("systemctl", &["is-active", "ssh-on-demand.socket"]);
    assert_eq!(String::from_utf8_lossy(&socket.stdout).trim(), "active");
}

/// Writes a loud notice where `cargo test` shows it (not the captured test output) and lets the test pass:
/// only for a machine that cannot run containers at all.
fn skipped(why: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: installed_package_serves_ssh_under_real_systemd: {why}"
    );
}

/// Builds the package from the current sources with packaging/build-deb, as a maintainer would, into `dir`
/// (ours alone, so that another test run building at the same time cannot swap it under us). Cargo rebuilds
/// only what changed: a few seconds when nothing did, and never a stale binary. Returns the .deb's path.
fn build_deb(dir: &Path) -> PathBuf {
    let started = Instant::now();
    let output = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/build-deb"))
        .arg(format!("--output={}", dir.display()))
        // Lighter compression of the same files: a second less per run.
        .arg("--fast")
        .env("CARGO", env!("CARGO"))
        .stdin(Stdio::null())
        .output()
        .expect("running packaging/build-deb");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "packaging/build-deb failed ({}); is cargo-deb installed (cargo install --locked cargo-deb)?\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let deb = stdout.lines().last().expect("build-deb prints the path");
    eprintln!("built {deb} in {:?}", started.elapsed());
    PathBuf::from(deb)
}

/// What the package installed, before the operator touches anything.
fn check_installed_package(container: &Container) {
    let files = container.run_ok("dpkg", &["--listfiles", "ssh-on-demand"]);
    for expected in [
        "/usr/bin/ssh-on-demand",
        "/etc/ssh-on-demand/config.toml",
        "/usr/share/doc/ssh-on-demand/examples/config.toml",
        "/usr/share/doc/ssh-on-demand/README.md",
        "/usr/share/man/man8/ssh-on-demand.8.gz",
    ] {
        assert!(files.lines().any(|f| f == expected), "{expected}:\n{files}");
    }
    let units: Vec<&str> = files
        .lines()
        .filter(|f| f.contains("/systemd/system/ssh-on-demand"))
        .collect();
    assert_eq!(units.len(), 2, "{files}");

    // Neither enabled nor started: port 22 is usually the host's own sshd.
    let enabled = container.run("systemctl", &["is-enabled", "ssh-on-demand.socket"]);
    assert_eq!(String::from_utf8_lossy(&enabled.stdout).trim(), "disabled");
    let active = container.run("systemctl", &["is-active", "ssh-on-demand.socket"]);
    assert_eq!(String::from_utf8_lossy(&active.stdout).trim(), "inactive");

    // The conffile has every setting commented out, and says what is missing.
    let check = container.run("ssh-on-demand", &["check-config"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stderr).contains("api_url is not set"));

    // systemd's own check of the units as installed; with man-db in the container it also finds the man
    // page that Documentation= names.
    let verify = container.run("systemd-analyze", &[&["verify"], &units[..]].concat());
    let said = [verify.stdout, verify.stderr].concat();
    assert!(
        verify.status.success() && said.is_empty(),
        "systemd-analyze verify: {}\n{}",
        verify.status,
        String::from_utf8_lossy(&said)
    );

    // Exposure of the service at most 1.5 (--threshold is in tenths: it fails above 15).
    let service = units.iter().find(|u| u.ends_with("@.service")).unwrap();
    let security = container.run(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            "--threshold=15",
            "--no-pager",
            service,
        ],
    );
    let report = String::from_utf8_lossy(&security.stdout);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    eprintln!("systemd-analyze security: {overall}");
    assert!(security.status.success(), "{report}");
}

/// `dir/name` readable by root only, in a directory only root can enter.
fn write_private(dir: &Path, name: &str, text: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    let file = dir.join(name);
    fs::write(&file, text).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Waits until `systemctl status` of the running instance shows a `Status: "…"` line (the instance's
/// STATUS=) whose text `wanted` accepts, and returns the text.
fn wait_for_status(container: &Container, wanted: impl Fn(&str) -> bool) -> String {
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

fn summary_match() -> String {
    format!("MESSAGE_ID={SUMMARY_MESSAGE_ID}")
}

/// A text field of a journal record (`journalctl -o json`), or a panic naming it.
fn field<'a>(record: &'a Value, name: &str) -> &'a str {
    record[name]
        .as_str()
        .unwrap_or_else(|| panic!("no text field {name} in {record}"))
}

fn number(record: &Value, name: &str) -> u64 {
    field(record, name)
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not a number ({e}) in {record}"))
}

/// packaging/config.toml is both the conffile and the documentation of every setting: as shipped it sets
/// nothing, and with its `#key = value` lines uncommented it sets each setting there is, by its right name.
#[test]
fn example_config_documents_every_setting() {
    let text = include_str!("../packaging/config.toml");
    let shipped: Settings = toml::from_str(text).unwrap();
    assert!(shipped.api_url.is_none(), "the conffile must set nothing");

    // Prose comments start with "# ", commented-out settings with "#" and the key.
    let uncommented: String = text
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .filter(|line| line.starts_with(|c: char| c.is_ascii_lowercase()))
        .map(|line| format!("{line}\n"))
        .collect();
    toml::from_str::<Settings>(&uncommented)
        .unwrap_or_else(|e| panic!("the uncommented example is not valid: {e}\n{uncommented}"));
    let keys: BTreeSet<String> = uncommented
        .lines()
        .map(|line| line.split('=').next().unwrap().trim().to_owned())
        .collect();
    // The TOML keys are the names of the settings' fields, which clap uses as argument ids.
    let settings: BTreeSet<String> = Settings::augment_args(clap::Command::new("settings"))
        .get_arguments()
        .map(|arg| arg.get_id().to_string())
        .collect();
    assert_eq!(keys, settings);
}
