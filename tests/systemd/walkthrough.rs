//! docs/first-login.md as a new user follows it: a fresh Debian 12 with its own sshd on port 22 (on a network
//! of its own, so that the walk's ports are free as on a real server), both packages installed and configured
//! by the document's commands, run as written; a login through the companion's command backend, which starts
//! the VM as `vm-dev.service`; `status` as another user; the idle stop; a session that outlives a restart of
//! the companion; and the switch to the daemon and back (docs/modes.md) with what the sockets refuse.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use libtest_mimic::{Arguments, Trial};
use ssh_on_demand::vm::lifecycle::LIFECYCLE_MESSAGE_ID;
use tempfile::TempDir;
use wait_timeout::ChildExt;

use crate::{
    common::{
        PATIENCE,
        container::{self, Container, Network, wait_for},
        log::Log,
        steps,
    },
    inspect::*,
    packages::{Booted, boot_with_packages, build_api_deb, build_deb, check_installed_api_package},
};

pub fn walkthrough(args: &Arguments) -> Vec<Trial> {
    steps::scenario(
        args,
        "walkthrough",
        stock_server,
        &[
            ("packages_install_as_written", packages_install_as_written),
            (
                "a_login_through_the_companion",
                a_login_through_the_companion,
            ),
            (
                "status_as_another_user_needs_root",
                status_as_another_user_needs_root,
            ),
            (
                "the_vm_stops_after_the_idle_timeout",
                the_vm_stops_after_the_idle_timeout,
            ),
            (
                "a_session_outlives_a_companion_restart",
                a_session_outlives_a_companion_restart,
            ),
            ("modes_switch_both_ways", modes_switch_both_ways),
        ],
    )
}

/// A stock server with both packages copied into /root, not yet installed.
pub struct Walk {
    container: Container,
    api_deb: PathBuf,
    _packages: TempDir,
}

fn stock_server() -> Result<Walk, String> {
    let build = |dir: &Path| vec![build_deb(dir), build_api_deb(dir, false)];
    let Booted {
        container,
        mut debs,
        dir,
    } = boot_with_packages(build, Network::Private, |root| {
        // A stock server: sshd on port 22, localhost in /etc/hosts, and the operator's key, which the
        // server's sshd (and so the VM's stand-in) accepts.
        container::enable_ssh(root);
        fs::write(
            root.join("etc/hosts"),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        )
        .unwrap();
        let ssh_dir = root.join("root/.ssh");
        fs::create_dir_all(&ssh_dir).unwrap();
        fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o700)).unwrap();
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(ssh_dir.join("id_ed25519"))
            .status()
            .unwrap();
        assert!(status.success());
        fs::copy(
            ssh_dir.join("id_ed25519.pub"),
            ssh_dir.join("authorized_keys"),
        )
        .unwrap();
    })?;
    Ok(Walk {
        container,
        api_deb: debs.pop().expect("the companion's package"),
        _packages: dir,
    })
}

/// The document's commands, from the line that says the test runs them.
fn walk() -> Vec<String> {
    shell_blocks(
        include_str!("../../docs/first-login.md"),
        Some("The container test runs every sh block below"),
    )
}

/// The first block installs both packages; the companion's installed what it should, needing no libvirt.
fn packages_install_as_written(walk: &Walk) {
    assert!(
        is_active(&walk.container, "ssh.service"),
        "the server's own sshd"
    );
    run_as_written(&walk.container, &self::walk()[0]);
    check_installed_api_package(&walk.container, &walk.api_deb);
}

/// The rest of the walk ends in a login through the companion, which started the VM's unit; both name the
/// VM in their records.
fn a_login_through_the_companion(walk: &Walk) {
    let container = &walk.container;
    let said: String = self::walk()[1..]
        .iter()
        .map(|block| run_as_written(container, block))
        .collect();
    assert!(said.contains("hello from the VM\n"), "{said}");
    assert!(is_active(container, "vm-dev.service"));
    let summary = newest_record(container, &[&summary_match(), "OUTCOME=relayed"]);
    assert_eq!(field(&summary, "VM"), "127.0.0.2:2222");
    let started = newest_record(
        container,
        &["SYSLOG_IDENTIFIER=ssh-on-demand-api", "VM=dev"],
    );
    assert!(field(&started, "MESSAGE").starts_with("dev: "), "{started}");
}

fn status_as_another_user_needs_root(walk: &Walk) {
    let status = walk.container.run(
        "runuser",
        &["-u", "nobody", "--", "ssh-on-demand", "status"],
    );
    let error = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{error}");
    assert!(
        error.contains("run it as root (sudo ssh-on-demand status)"),
        "{error}"
    );
}

/// 30 s after the logout (the walk's idle_timeout), the VM's unit is stopped.
fn the_vm_stops_after_the_idle_timeout(walk: &Walk) {
    let container = &walk.container;
    let stopped = wait_for("the idle stop", PATIENCE * 2, || {
        container
            .journal(&[
                &format!("MESSAGE_ID={LIFECYCLE_MESSAGE_ID}"),
                "DECISION=stopped",
            ])
            .pop()
            .ok_or_else(|| "no stop yet".to_owned())
    });
    assert!(number(&stopped, "IDLE_S") >= 29, "stopped early: {stopped}");
    assert_eq!(field(&stopped, "VM"), "127.0.0.2:2222");
    assert!(!is_active(container, "vm-dev.service"));
    journal_says(
        container,
        "ssh-on-demand-api.service",
        "dev: stop: off after a graceful shutdown",
    )
    .unwrap();
}

/// The VM is a unit of its own, not in the companion's cgroup: a session outlives the companion's restart.
fn a_session_outlives_a_companion_restart(walk: &Walk) {
    let session = held_session(&walk.container);
    walk.container
        .run_ok("systemctl", &["restart", "ssh-on-demand-api.service"]);
    assert_eq!(session.finish(), "got bye");
}

/// Runs one of a document's command blocks in the container, as root (so `sudo` is a no-op), from /root, the
/// way the document says; returns what it printed on stdout.
fn run_as_written(container: &Container, block: &str) -> String {
    let script = format!("sudo() {{ \"$@\"; }}\ncd /root\n{block}");
    let output = container.run("sh", &["-eu", "-c", &script]);
    assert!(
        output.status.success(),
        "{}\nfailed ({}):\n{}\n{}",
        block,
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A login in the container, through the proxy on port 2200, that waits for a line on its stdin.
struct HeldSession {
    child: std::process::Child,
    said: Log,
}

fn held_session(container: &Container) -> HeldSession {
    let mut child = container
        .command("ssh")
        .args([
            "-p",
            "2200",
            "localhost",
            r#"echo ready; read line; echo "got $line""#,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let said = Log::collect(child.stdout.take().unwrap(), "ssh");
    let _ = Log::collect(child.stderr.take().unwrap(), "ssh stderr");
    said.wait_for(PATIENCE, |line| line == "ready");
    HeldSession { child, said }
}

impl HeldSession {
    /// Sends a line, and returns the session's answer once it has ended.
    fn finish(mut self) -> String {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"bye\n").unwrap();
        drop(stdin);
        let status = self
            .child
            .wait_timeout(PATIENCE)
            .unwrap()
            .expect("ssh ended");
        assert!(status.success(), "ssh: {status}");
        self.said.wait_for(PATIENCE, |line| line.starts_with("got"))
    }
}

/// The sockets refuse a second mode, with the reason; docs/modes.md switches to the daemon and back, and a
/// login works in each.
fn modes_switch_both_ways(walk: &Walk) {
    let container = &walk.container;
    let login = || {
        let said = container.run_ok("ssh", &["-p", "2200", "localhost", "echo in"]);
        assert_eq!(said, "in\n");
    };
    let refused = |socket: &str, why: &str| {
        let output = container.run("systemctl", &["start", socket]);
        assert!(
            !output.status.success(),
            "{socket} started beside the other mode"
        );
        let status = container.run("systemctl", &["status", "--no-pager", "--lines=10", socket]);
        let shown = String::from_utf8_lossy(&status.stdout);
        assert!(
            shown.contains(&format!("{socket} refused: {why}")),
            "{shown}"
        );
    };
    refused(
        "ssh-on-demand-daemon.socket",
        "the per-connection mode (ssh-on-demand.socket) is enabled or running",
    );
    // Both enabled, as a reboot would find them: neither starts.
    container.run_ok("systemctl", &["enable", "ssh-on-demand-daemon.socket"]);
    let restarted = container.run("systemctl", &["restart", "ssh-on-demand.socket"]);
    assert!(
        !restarted.status.success(),
        "started with both modes enabled"
    );
    container.run_ok("systemctl", &["disable", "ssh-on-demand-daemon.socket"]);
    container.run_ok("systemctl", &["start", "ssh-on-demand.socket"]);
    login();

    let modes = shell_blocks(include_str!("../../docs/modes.md"), None);
    let [to_daemon, back] = &modes[..] else {
        panic!("docs/modes.md has two command blocks: {modes:#?}");
    };
    run_as_written(container, to_daemon);
    assert!(is_active(container, "ssh-on-demand-daemon.socket"));
    login();
    newest_record(
        container,
        &[
            &summary_match(),
            "_SYSTEMD_UNIT=ssh-on-demand-daemon.service",
        ],
    );
    refused(
        "ssh-on-demand.socket",
        "the daemon mode (ssh-on-demand-daemon.socket) is enabled or running",
    );
    run_as_written(container, back);
    assert!(is_active(container, "ssh-on-demand.socket"));
    assert!(!is_active(container, "ssh-on-demand-daemon.service"));
    login();
    let failed = container.run_ok("systemctl", &["--failed", "--plain", "--no-legend"]);
    assert!(!failed.contains("ssh-on-demand"), "{failed}");
}

/// The ```sh blocks of a Markdown document, in order; with `after`, only those that follow the line that
/// holds it. For documents whose commands the tests run as an operator would.
fn shell_blocks(markdown: &str, after: Option<&str>) -> Vec<String> {
    let mut lines = markdown.lines();
    if let Some(marker) = after {
        assert!(
            lines.by_ref().any(|line| line.contains(marker)),
            "no line holds {marker:?}"
        );
    }
    let mut blocks = Vec::new();
    let mut block: Option<String> = None;
    for line in lines {
        match (&mut block, line.trim_end()) {
            (None, "```sh") => block = Some(String::new()),
            (Some(_), "```") => blocks.extend(block.take()),
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}
