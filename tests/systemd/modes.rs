//! The package's two modes under real systemd, each in a container of its own on the host's network, used
//! from the host: logins through the sockets to two profiles' VMs (real sshd started by real start APIs), a
//! burst that makes one start call, the idle stop, `ssh-on-demand status`, the journal's records, `systemctl
//! status`, and for the daemon its watchdog, reload and drain.

use std::{
    fs,
    io::Write,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use libtest_mimic::{Arguments, Trial};
use ssh_on_demand::vm::lifecycle::LIFECYCLE_MESSAGE_ID;
use tempfile::TempDir;
use wait_timeout::ChildExt;

use crate::{
    common::{
        self, PATIENCE,
        container::{Container, Network, wait_for},
        log::Log,
        ssh::{Burst, Session, assert_echo, run, ssh},
        steps,
    },
    host::{Host, REFUSAL, REFUSED_CLIENT},
    inspect::*,
    packages::{Booted, boot_with_packages, build_deb, check_installed_package},
};

/// Long enough for a second login to begin within it on a slow machine; every check is against it.
const IDLE: Duration = Duration::from_secs(5);
/// Logins in the burst.
const BURST: usize = 20;

/// The per-connection units (`ssh-on-demand.socket`, `Accept=yes`).
pub fn per_connection(args: &Arguments) -> Vec<Trial> {
    steps::scenario(
        args,
        "per_connection",
        lab,
        &[
            ("the_package_installs_enabling_nothing", |lab| {
                check_installed_package(&lab.container)
            }),
            ("enabled_as_the_readme_says", enable_per_connection),
            (
                "a_login_is_relayed_and_recorded",
                login_is_relayed_and_recorded,
            ),
            (
                "idle_stop_after_the_last_logout",
                idle_stop_after_the_last_logout,
            ),
            ("burst_makes_one_start_call", burst_makes_one_start_call),
            ("refused_login", refused_login),
            ("login_without_token", login_without_token),
            ("instances_are_collected", instances_are_collected),
            ("the_token_is_in_no_record", the_token_is_in_no_record),
        ],
    )
}

/// The daemon's units (`ssh-on-demand-daemon.socket`), with a short watchdog and drain.
pub fn daemon(args: &Arguments) -> Vec<Trial> {
    steps::scenario(
        args,
        "daemon",
        lab,
        &[
            ("enabled_as_the_readme_says", enable_daemon),
            (
                "a_login_is_relayed_and_recorded",
                login_is_relayed_and_recorded,
            ),
            ("the_status_counts_sessions", the_status_counts_sessions),
            ("watchdog_is_pinged", watchdog_is_pinged),
            (
                "idle_stop_after_the_last_logout",
                idle_stop_after_the_last_logout,
            ),
            ("burst_makes_one_start_call", burst_makes_one_start_call),
            ("refused_login", refused_login),
            ("reload", reload),
            ("drain_on_stop", drain_on_stop),
        ],
    )
}

/// A container with the package installed, and what runs on the host for it.
pub struct Lab {
    container: Container,
    host: Host,
    _packages: TempDir,
}

/// Builds the package, boots a container on the host's network and installs the package there, as the
/// README tells an operator.
fn lab() -> Result<Lab, String> {
    let Booted {
        container,
        debs,
        dir,
    } = boot_with_packages(|dir| vec![build_deb(dir)], Network::Host, |_| {})?;
    let deb = Path::new("/root").join(debs[0].file_name().unwrap());
    container.run_ok("dpkg", &["--install", &deb.to_string_lossy()]);
    Ok(Lab {
        container,
        host: Host::new(),
        _packages: dir,
    })
}

fn enable_per_connection(lab: &Lab) {
    configure(lab, "ssh-on-demand.socket", "");
    // Starting the socket started the sweep's timer with it (Wants=).
    let timer = lab
        .container
        .run("systemctl", &["is-active", "ssh-on-demand-sweep.timer"]);
    assert_eq!(String::from_utf8_lossy(&timer.stdout).trim(), "active");
}

fn enable_daemon(lab: &Lab) {
    // A short watchdog, so that its pings show within the test, and a short drain.
    let drop_in = lab
        .container
        .root()
        .join("etc/systemd/system/ssh-on-demand-daemon.service.d");
    fs::create_dir_all(&drop_in).unwrap();
    fs::write(drop_in.join("test.conf"), "[Service]\nWatchdogSec=2s\n").unwrap();
    configure(
        lab,
        "ssh-on-demand-daemon.socket",
        "drain_timeout = \"2s\"\n",
    );
}

const DAEMON: &str = "ssh-on-demand-daemon.service";

/// A login held open until the test has seen what systemd shows of it; then the start API's view of it and
/// its summary record.
fn login_is_relayed_and_recorded(lab: &Lab) {
    let client = login_held_open(lab);
    check_login_summary(lab, &client);
}

/// The daemon's STATUS= counts its sessions.
fn the_status_counts_sessions(lab: &Lab) {
    wait_for("the daemon's STATUS=", PATIENCE, || {
        let status = show(&lab.container, DAEMON, "StatusText");
        status.contains(" session").then_some(()).ok_or(status)
    });
}

/// The token is in no journal record, whatever its field.
fn the_token_is_in_no_record(lab: &Lab) {
    let journal = lab
        .container
        .run_ok("journalctl", &["--no-pager", "--output=export"]);
    assert!(!journal.contains(&lab.host.token), "the token was logged");
}

/// The operator's part: both profiles in the config file, the token in the credential store, `socket`
/// moved to the test's address and ports with a drop-in, then enabled. The VMs listen on the test's VM port,
/// which `vm_port` names as an operator would for VMs whose sshd is not on 22.
fn configure(lab: &Lab, socket: &str, extra: &str) {
    let Lab {
        container, host, ..
    } = lab;
    let root = container.root();
    fs::write(
        root.join("etc/ssh-on-demand/config.toml"),
        config(host, extra),
    )
    .unwrap();
    write_private(
        &root.join("etc/credstore"),
        "ssh-on-demand.api-token",
        &host.token,
    );
    let drop_in = root.join(format!("etc/systemd/system/{socket}.d"));
    fs::create_dir_all(&drop_in).unwrap();
    fs::write(
        drop_in.join("listen.conf"),
        format!(
            "[Socket]\nListenStream=\nListenStream={}\nListenStream={}\n",
            host.lab_addr(),
            host.ci_addr()
        ),
    )
    .unwrap();
    container.run_ok("ssh-on-demand", &["check-config"]);
    container.run_ok("systemctl", &["daemon-reload"]);
    container.run_ok("systemctl", &["enable", "--now", socket]);
}

fn config(host: &Host, extra: &str) -> String {
    format!(
        "api_url = \"{}\"\n\
         stop_url = \"{}\"\n\
         profile = \"lab\"\n\
         idle_timeout = \"{idle}s\"\n\
         vm_networks = [\"127.0.0.0/8\"]\n\
         vm_port = {vm_port}\n\
         {extra}\n\
         [profiles.ci]\n\
         ports = [{ci_port}]\n\
         api_url = \"{}\"\n\
         stop_url = \"{}\"\n\
         vm_scope = \"profile\"\n",
        host.lab_api.url(),
        host.lab_api.stop_url(),
        host.ci_api.url(),
        host.ci_api.stop_url(),
        idle = IDLE.as_secs(),
        vm_port = common::vm::port(),
        ci_port = host.ci_port,
    )
}

/// A login that runs a command, held open until the test has seen the instance's STATUS= texts in
/// `systemctl status` (per-connection units only). Returns the client's address as the proxy saw it.
fn login_held_open(lab: &Lab) -> String {
    let Lab {
        container, host, ..
    } = lab;
    let mut session = ssh(host.lab_addr(), &host.lab.client_key())
        .arg(r#"echo ready; read line; echo "got $line""#)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let said = Log::collect(session.stdout.take().unwrap(), "ssh");
    let _ = Log::collect(session.stderr.take().unwrap(), "ssh stderr");

    let per_connection = is_active(container, "ssh-on-demand.socket");
    if per_connection {
        wait_for_status(container, |s| {
            s.starts_with("starting the VM for 127.0.0.1:")
        });
    }
    host.open_gate.send(()).unwrap();
    let request = host.lab_api.wait_for_requests(1, PATIENCE)[0].json();
    let client = format!("127.0.0.1:{}", request["client_port"]);
    said.wait_for(PATIENCE, |line| line == "ready");
    if per_connection {
        let relaying = format!("relaying {client} <-> {}", host.lab.addr());
        wait_for_status(container, |s| s == relaying);
    }
    let status = status_json(container);
    assert_eq!(vm(&status, "lab@127.0.0.1")["state"], "up", "{status:#}");

    let mut stdin = session.stdin.take().unwrap();
    stdin.write_all(b"bye\n").unwrap();
    drop(stdin);
    let status = session.wait_timeout(PATIENCE).unwrap().expect("ssh ended");
    assert!(status.success(), "ssh: {status}");
    said.wait_for(PATIENCE, |line| line == "got bye");
    client
}

/// The start API's view of the login, and the login's summary record with every structured field.
fn check_login_summary(lab: &Lab, client: &str) {
    let Lab {
        container, host, ..
    } = lab;
    // The unit passed the token from /etc/credstore as its credential.
    let request = &host.lab_api.requests()[0];
    let authorization = format!("Bearer {}", host.token);
    assert_eq!(
        request.header("Authorization"),
        Some(authorization.as_str())
    );
    let body = request.json();
    assert_eq!(body["client_addr"], "127.0.0.1");
    assert_eq!(body["local_addr"], host.listen.to_string());
    assert_eq!(body["local_port"], host.lab_port);
    assert_eq!(body["profile"], "lab");

    let summary = newest_record(container, &[&summary_match(), "OUTCOME=relayed"]);
    assert_eq!(field(&summary, "SYSLOG_IDENTIFIER"), "ssh-on-demand");
    assert!(field(&summary, "_SYSTEMD_UNIT").starts_with("ssh-on-demand"));
    assert_eq!(field(&summary, "PRIORITY"), "5");
    assert_eq!(field(&summary, "CLIENT_ADDR"), "127.0.0.1");
    assert_eq!(
        format!("127.0.0.1:{}", field(&summary, "CLIENT_PORT")),
        client
    );
    assert_eq!(field(&summary, "PROFILE"), "lab");
    assert_eq!(field(&summary, "VM"), host.lab.addr().to_string());
    for name in ["API_MS", "VM_WAIT_MS", "DURATION_MS"] {
        number(&summary, name);
    }
    for name in ["BYTES_TO_VM", "BYTES_TO_CLIENT"] {
        assert!(number(&summary, name) > 0, "{name}: {summary}");
    }
}

/// A login, then a second one during the VM's idle wait, which keeps it up; it is stopped once, an idle
/// timeout after the second logout, and the journal tells each decision.
fn idle_stop_after_the_last_logout(lab: &Lab) {
    let Lab {
        container, host, ..
    } = lab;
    // Whether the VM had its idle stop since the step before or not, this login makes it idle anew.
    assert_echo(host.lab_addr(), &host.lab.client_key(), "first");
    wait_for("the lab VM's idle wait", PATIENCE, || {
        let status = status_json(container);
        let lab = vm(&status, "lab@127.0.0.1");
        (lab["state"] == "idle" && lab["stop_due"].is_u64())
            .then_some(())
            .ok_or_else(|| status.to_string())
    });
    let text = container.run_ok("ssh-on-demand", &["status"]);
    assert!(
        text.contains("state: idle since") && text.contains("stop due"),
        "{text}"
    );
    let stops = host.lab_api.requests_to("/stop").len();
    let lifecycle = format!("MESSAGE_ID={LIFECYCLE_MESSAGE_ID}");
    let stopped = [lifecycle.as_str(), "DECISION=stopped", "PROFILE=lab"];
    let records = container.journal(&stopped).len();

    assert_echo(host.lab_addr(), &host.lab.client_key(), "second");
    let logout = Instant::now();
    assert_eq!(
        host.lab_api.requests_to("/stop").len(),
        stops,
        "stopped during the idle wait"
    );
    let stop = &host
        .lab_api
        .wait_for_requests_to("/stop", stops + 1, PATIENCE)[stops];
    assert!(stop.at.duration_since(logout) >= IDLE - Duration::from_millis(500));
    let record = wait_for("the stop's record", PATIENCE, || {
        let mut found = container.journal(&stopped);
        (found.len() > records)
            .then(|| found.pop())
            .flatten()
            .ok_or_else(|| format!("{} records", found.len()))
    });
    assert_eq!(field(&record, "VM"), host.lab.addr().to_string());
    assert_eq!(field(&record, "VM_KEY"), "lab@127.0.0.1");
    assert!(number(&record, "IDLE_S") >= IDLE.as_secs() - 1);
    assert!(!host.lab.is_up());
    let status = status_json(container);
    assert_eq!(vm(&status, "lab@127.0.0.1")["state"], "stopped");
    assert_eq!(host.lab_api.requests_to("/stop").len(), stops + 1);
}

/// BURST logins to the ci profile while its VM boots: one start call, every login in, then one idle stop.
fn burst_makes_one_start_call(lab: &Lab) {
    let Lab {
        container, host, ..
    } = lab;
    let logins = Burst::start(BURST, &host.ci.client_key(), PATIENCE * 2, |_| {
        host.ci_addr()
    });
    wait_for(
        "every login of the burst to wait for the VM",
        PATIENCE * 2,
        || {
            let status = status_json(container);
            let waiting = vm(&status, "ci")["sessions"].as_array().map_or(0, Vec::len);
            (waiting == BURST)
                .then_some(())
                .ok_or_else(|| status.to_string())
        },
    );
    host.ci.start();
    logins.assert_all_in();
    assert_eq!(host.ci_api.requests_to("/start").len(), 1);
    let stop = &host.ci_api.wait_for_requests_to("/stop", 1, PATIENCE)[0];
    assert!(
        stop.json().get("client_addr").is_none(),
        "one VM for the profile"
    );
    // The API has the request before the proxy has its answer and records it.
    let lifecycle = format!("MESSAGE_ID={LIFECYCLE_MESSAGE_ID}");
    newest_record(container, &[&lifecycle, "DECISION=stopped", "PROFILE=ci"]);
    assert_eq!(vm(&status_json(container), "ci")["state"], "stopped");
}

/// The start API refuses: the user reads its reason, and the journal has it in a warning.
fn refused_login(lab: &Lab) {
    let Lab {
        container, host, ..
    } = lab;
    let output = run(
        ssh(host.lab_addr(), &host.lab.client_key()).args(["-b", REFUSED_CLIENT, "true"]),
        PATIENCE,
    );
    let seen = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(255), "{seen}");
    assert!(
        seen.contains(&format!(
            "Received disconnect from {} port {}",
            host.listen, host.lab_port
        )) && seen.contains("VM failed to start: ")
            && seen.contains(REFUSAL),
        "{seen}"
    );
    let refused = newest_record(container, &[&summary_match(), "OUTCOME=api_failed"]);
    assert_eq!(field(&refused, "PRIORITY"), "4");
    assert_eq!(field(&refused, "CLIENT_ADDR"), REFUSED_CLIENT);
    assert!(field(&refused, "REASON").contains(REFUSAL), "{refused}");
}

/// Without /etc/credstore/ssh-on-demand.api-token the unit still starts (systemd skips a `LoadCredential=`
/// by name that it cannot find), and asks the start API without a token.
fn login_without_token(lab: &Lab) {
    let Lab {
        container, host, ..
    } = lab;
    fs::remove_file(
        container
            .root()
            .join("etc/credstore/ssh-on-demand.api-token"),
    )
    .unwrap();
    let before = host.lab_api.requests_to("/start").len();
    assert_echo(host.lab_addr(), &host.lab.client_key(), "in");
    let requests = host
        .lab_api
        .wait_for_requests_to("/start", before + 1, PATIENCE);
    assert_eq!(requests[before].header("Authorization"), None);
}

/// Every instance ends and is collected (the last of a VM's once its idle stop is done), the failed ones
/// (exit status 1) too, and the socket listens on.
fn instances_are_collected(lab: &Lab) {
    let Lab { container, .. } = lab;
    wait_for("the instances to be gone", PATIENCE * 2, || {
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
    assert!(is_active(container, "ssh-on-demand.socket"));
}

/// systemd sees the daemon's watchdog pings: the timestamp of the last one moves.
fn watchdog_is_pinged(lab: &Lab) {
    let Lab { container, .. } = lab;
    let unit = DAEMON;
    let first = show(container, unit, "WatchdogTimestampMonotonic");
    assert_ne!(first, "0", "no watchdog ping yet");
    wait_for("a later watchdog ping", PATIENCE, || {
        let now = show(container, unit, "WatchdogTimestampMonotonic");
        (now != first).then_some(()).ok_or(now)
    });
}

/// `systemctl reload`: a good file applies to new connections; a broken one fails the reload (the unit's
/// `ExecReload=` checks it first) with the reason in the journal, and the old one stays in use.
fn reload(lab: &Lab) {
    let Lab {
        container, host, ..
    } = lab;
    let unit = DAEMON;
    let file = container.root().join("etc/ssh-on-demand/config.toml");
    let pid = show(container, unit, "MainPID");
    fs::write(
        &file,
        config(host, "drain_timeout = \"2s\"\nboot_timeout = \"90s\"\n"),
    )
    .unwrap();
    container.run_ok("systemctl", &["reload", unit]);
    wait_for("the reload's record", PATIENCE, || {
        journal_says(container, unit, "configuration reloaded")
    });
    fs::write(&file, "api_url = 5\n").unwrap();
    let refused = container.run("systemctl", &["reload", unit]);
    assert!(!refused.status.success(), "a broken file was reloaded");
    let said = wait_for("the refused reload's record", PATIENCE, || {
        journal_says(container, unit, "error: ")
    });
    assert!(field(&said, "MESSAGE").contains("api_url"), "{said}");
    fs::write(
        &file,
        config(host, "drain_timeout = \"2s\"\nboot_timeout = \"90s\"\n"),
    )
    .unwrap();
    assert_eq!(
        show(container, unit, "MainPID"),
        pid,
        "the daemon was restarted"
    );
    let output = run(
        ssh(host.lab_addr(), &host.lab.client_key()).arg("echo still"),
        PATIENCE,
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "still\n");
}

/// `systemctl stop` with a session open: the daemon drains for drain_timeout, closes the session, and stops
/// cleanly.
fn drain_on_stop(lab: &Lab) {
    let Lab {
        container, host, ..
    } = lab;
    let unit = DAEMON;
    let session = Session::open(host.lab_addr(), &host.lab.client_key(), &[]);
    let asked = Instant::now();
    container.run_ok("systemctl", &["stop", unit]);
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "stopped after {took:?}, before drain_timeout"
    );
    session.wait_closed(PATIENCE);
    assert_eq!(show(container, unit, "ActiveState"), "inactive");
    assert_eq!(show(container, unit, "Result"), "success");
    journal_says(container, unit, "closing the sessions left").unwrap();
    // The closed session's summary counts what it relayed, though its relay was cut short.
    let closed = container
        .journal(&[&summary_match(), "OUTCOME=relayed"])
        .into_iter()
        .rev()
        .find(|r| {
            r["REASON"]
                .as_str()
                .is_some_and(|r| r.contains("drain_timeout"))
        })
        .expect("the closed session's summary");
    assert!(number(&closed, "BYTES_TO_VM") > 0, "{closed}");
    assert!(number(&closed, "BYTES_TO_CLIENT") > 0, "{closed}");
}
