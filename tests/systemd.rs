//! ssh-on-demand under real systemd: the Debian package, built from the current sources, is installed into a
//! container that boots systemd 252 as PID 1, configured and enabled the way the README tells an operator, and
//! then used from the host, once with the per-connection units and once with the daemon's: logins through
//! the sockets to two profiles' VMs (real sshd started by real start APIs), a burst that makes one start call,
//! the idle stop, `ssh-on-demand status`, the journal's records, `systemctl status`, reload and drain, and
//! systemd-analyze on the installed units. And both packages, the proxy's and the companion's, on a stock
//! server as docs/first-login.md walks it, run as written, and the switch between the modes both ways.

mod common;

use std::{
    fs,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::{
    PATIENCE,
    api::{Answer, StartApi},
    container::{self, Container, Network, wait_for},
    log::Log,
    ssh::{Session, assert_echo, run, ssh},
    vm::Vm,
};
use serde_json::{Value, json};
use ssh_on_demand::{report::SUMMARY_MESSAGE_ID, vm::lifecycle::LIFECYCLE_MESSAGE_ID};
use wait_timeout::ChildExt;

/// What the lab's start API tells a client it refuses (127.0.0.9).
const REFUSAL: &str = "lab is full until 18:00";
const REFUSED_CLIENT: &str = "127.0.0.9";
/// Long enough for a second login to begin within it on a slow machine; every check is against it.
const IDLE: Duration = Duration::from_secs(5);
/// Logins in the burst.
const BURST: usize = 20;

#[test]
fn per_connection_units_under_real_systemd() {
    let Some((container, host)) = setup() else {
        return;
    };
    configure(&container, &host, "ssh-on-demand.socket", "");
    // Starting the socket started the sweep's timer with it (Wants=).
    let timer = container.run("systemctl", &["is-active", "ssh-on-demand-sweep.timer"]);
    assert_eq!(String::from_utf8_lossy(&timer.stdout).trim(), "active");

    let client = login_held_open(&container, &host);
    check_login_summary(&container, &host, &client);
    idle_stop_after_the_last_logout(&container, &host);
    burst_makes_one_start_call(&container, &host);
    refused_login(&container, &host);
    login_without_token(&container, &host);
    instances_are_collected(&container);

    // The token is in no journal record, whatever its field.
    let journal = container.run_ok("journalctl", &["--no-pager", "--output=export"]);
    assert!(!journal.contains(&host.token), "the token was logged");
}

#[test]
fn daemon_units_under_real_systemd() {
    let Some((container, host)) = setup() else {
        return;
    };
    // A short watchdog, so that its pings show within the test, and a short drain.
    let drop_in = container
        .root()
        .join("etc/systemd/system/ssh-on-demand-daemon.service.d");
    fs::create_dir_all(&drop_in).unwrap();
    fs::write(drop_in.join("test.conf"), "[Service]\nWatchdogSec=2s\n").unwrap();
    configure(
        &container,
        &host,
        "ssh-on-demand-daemon.socket",
        "drain_timeout = \"2s\"\n",
    );

    let client = login_held_open(&container, &host);
    check_login_summary(&container, &host, &client);
    let unit = "ssh-on-demand-daemon.service";
    wait_for("the daemon's STATUS=", PATIENCE, || {
        let status = show(&container, unit, "StatusText");
        status.contains(" session").then_some(()).ok_or(status)
    });
    watchdog_is_pinged(&container, unit);
    idle_stop_after_the_last_logout(&container, &host);
    burst_makes_one_start_call(&container, &host);
    refused_login(&container, &host);
    reload(&container, &host, unit);
    drain_on_stop(&container, &host, unit);
}

/// docs/first-login.md as a new user follows it: a fresh Debian 12 with its own sshd on port 22 (on a network
/// of its own, so that the walk's ports are free as on a real server), both packages installed and configured
/// by the document's commands, run as written; a login through the companion's command backend, which starts
/// the VM as `vm-dev.service`; a session that outlives a restart of the companion; the idle stop; `status`
/// as another user; and the switch to the daemon and back (docs/modes.md) with what the sockets refuse.
#[test]
fn walkthrough_from_a_stock_server() {
    if let Some(why) = container::unavailable() {
        skipped(&why);
        return;
    }
    let packages = tempfile::tempdir().unwrap();
    let debs = [
        build_deb(packages.path()),
        build_api_deb(packages.path(), false),
    ];
    let rootfs = container::cached_rootfs();
    if let Err(why) = Container::preflight(&rootfs) {
        skipped(&why);
        return;
    }
    let started = Instant::now();
    let container = Container::boot_on(&rootfs, Network::Private, |root| {
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
        for deb in &debs {
            fs::copy(deb, root.join("root").join(deb.file_name().unwrap())).unwrap();
        }
    });
    eprintln!("container booted in {:?}", started.elapsed());
    assert!(
        is_active(&container, "ssh.service"),
        "the server's own sshd"
    );

    let walk = container::shell_blocks(
        include_str!("../docs/first-login.md"),
        Some("The container test runs every sh block below"),
    );
    let (install, rest) = walk
        .split_first()
        .expect("docs/first-login.md has commands");
    run_as_written(&container, install);
    check_installed_api_package(&container, &debs[1]);
    let said: String = rest
        .iter()
        .map(|block| run_as_written(&container, block))
        .collect();
    assert!(said.contains("hello from the VM\n"), "{said}");

    // The login went through the companion, which started the VM's unit; both name the VM in their records.
    assert!(is_active(&container, "vm-dev.service"));
    let summary = newest_record(&container, &[&summary_match(), "OUTCOME=relayed"]);
    assert_eq!(field(&summary, "VM"), "127.0.0.2:2222");
    let started = newest_record(
        &container,
        &["SYSLOG_IDENTIFIER=ssh-on-demand-api", "VM=dev"],
    );
    assert!(field(&started, "MESSAGE").starts_with("dev: "), "{started}");

    // `status` as another user says it needs root.
    let status = container.run(
        "runuser",
        &["-u", "nobody", "--", "ssh-on-demand", "status"],
    );
    let error = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{error}");
    assert!(
        error.contains("run it as root (sudo ssh-on-demand status)"),
        "{error}"
    );

    // 30 s after the logout (the walk's idle_timeout), the VM's unit is stopped.
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
    assert!(!is_active(&container, "vm-dev.service"));
    journal_says(
        &container,
        "ssh-on-demand-api.service",
        "dev: stop: off after a graceful shutdown",
    )
    .unwrap();

    // The VM is a unit of its own, not in the companion's cgroup: a session outlives the companion's restart.
    let session = held_session(&container);
    container.run_ok("systemctl", &["restart", "ssh-on-demand-api.service"]);
    assert_eq!(session.finish(), "got bye");

    switch_modes_both_ways(&container);
}

/// The companion's two flavours: the libvirt one depends on libvirt0, and each replaces the other under dpkg,
/// handing over the conffile with the operator's edits (in a copy of the container's rootfs, without systemd:
/// the maintainer scripts then leave the units alone).
#[test]
fn companion_flavours_replace_each_other_keeping_the_configuration() {
    if let Some(why) = container::unavailable() {
        skipped(&why);
        return;
    }
    let packages = tempfile::tempdir().unwrap();
    let plain = build_api_deb(packages.path(), false);
    let libvirt = build_api_deb(packages.path(), true);
    let control = |deb: &Path, field: &str| {
        let output = Command::new("dpkg-deb")
            .arg("--field")
            .arg(deb)
            .arg(field)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    assert!(control(&libvirt, "Depends").contains("libvirt0"));
    for field in ["Conflicts", "Replaces", "Provides"] {
        assert_eq!(control(&libvirt, field), "ssh-on-demand-api", "{field}");
    }
    for field in ["Conflicts", "Replaces"] {
        assert_eq!(
            control(&plain, field),
            "ssh-on-demand-api-libvirt",
            "{field}"
        );
    }

    let root = container::copy(&container::cached_rootfs());
    let conffile = root.path().join("etc/ssh-on-demand-api/config.toml");
    let dpkg = |deb: &Path| {
        fs::copy(deb, root.path().join("root/flavour.deb")).unwrap();
        // libvirt0 is not in the rootfs; the dependency was checked above.
        let output = Command::new("chroot")
            .arg(root.path())
            .args(["dpkg", "--install", "--force-depends", "/root/flavour.deb"])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "dpkg --install {}:\n{}",
            deb.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let owner = Command::new("chroot")
            .arg(root.path())
            .args(["dpkg", "--search", "/etc/ssh-on-demand-api/config.toml"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&owner.stdout).into_owned()
    };
    dpkg(&plain);
    let edited = format!(
        "{}# the operator's\n",
        fs::read_to_string(&conffile).unwrap()
    );
    fs::write(&conffile, &edited).unwrap();
    assert!(dpkg(&libvirt).starts_with("ssh-on-demand-api-libvirt: "));
    assert_eq!(fs::read_to_string(&conffile).unwrap(), edited);
    assert!(dpkg(&plain).starts_with("ssh-on-demand-api: "));
    assert_eq!(fs::read_to_string(&conffile).unwrap(), edited);
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
fn switch_modes_both_ways(container: &Container) {
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

    let modes = container::shell_blocks(include_str!("../docs/modes.md"), None);
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

/// Builds the package, boots a container and installs it there, checking what it installed. `None` (after a
/// loud notice) only on a machine that cannot run containers at all.
fn setup() -> Option<(Container, Host)> {
    if let Some(why) = container::unavailable() {
        skipped(&why);
        return None;
    }
    let packages = tempfile::tempdir().unwrap();
    let deb = build_deb(packages.path());
    let rootfs = container::cached_rootfs();
    if let Err(why) = Container::preflight(&rootfs) {
        skipped(&why);
        return None;
    }
    let host = Host::new();
    let started = Instant::now();
    let container = Container::boot(&rootfs, |root| {
        fs::copy(&deb, root.join("root/ssh-on-demand.deb")).unwrap();
    });
    eprintln!("container booted in {:?}", started.elapsed());
    // As the README tells an operator: install the package, configure, enable a socket.
    container.run_ok("dpkg", &["--install", "/root/ssh-on-demand.deb"]);
    check_installed_package(&container);
    Some((container, host))
}

/// What runs on the host: two VMs with their start/stop APIs, and the address and ports the sockets are
/// moved to.
struct Host {
    /// The default profile, "lab": a VM per client address.
    lab: Vm,
    lab_api: StartApi,
    /// Lets the lab's start API answer its first request.
    open_gate: mpsc::Sender<()>,
    /// The profile "ci" on a port of its own: one VM for everyone, booted when the test says.
    ci: Vm,
    ci_api: StartApi,
    token: String,
    listen: Ipv4Addr,
    /// The ports of the two profiles, for `ListenStream=` (22 and 2222 in production).
    lab_port: u16,
    ci_port: u16,
}

impl Host {
    /// The lab's start API holds the first request until the test has seen the instance's "starting" status,
    /// then boots the VM and answers with its address; it refuses 127.0.0.9. Both stop APIs stop their VM.
    fn new() -> Host {
        let lab = Vm::new();
        let (open_gate, gate) = mpsc::channel::<()>();
        let lab_api = {
            let vm = lab.clone();
            let mut first = true;
            StartApi::serve(move |request| {
                if request.url == "/stop" {
                    vm.stop();
                    return Answer::text("stopped");
                }
                if request.json()["client_addr"] == REFUSED_CLIENT {
                    return Answer::reply(403, "text/plain", REFUSAL);
                }
                if std::mem::take(&mut first) {
                    let _ = gate.recv_timeout(PATIENCE);
                }
                vm.start();
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        let ci = Vm::new();
        let ci_api = {
            let vm = ci.clone();
            StartApi::serve(move |request| {
                if request.url == "/stop" {
                    vm.stop();
                    return Answer::text("stopped");
                }
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        // Its own loopback address and ports, like the VMs: port 22 is the host's own sshd's.
        let listen = Ipv4Addr::new(
            127,
            fastrand::u8(200..=254),
            fastrand::u8(1..255),
            fastrand::u8(1..255),
        );
        Host {
            lab,
            lab_api,
            open_gate,
            ci,
            ci_api,
            token: format!("t0ken-{:016x}", fastrand::u64(..)),
            listen,
            lab_port: common::reserved_port(),
            ci_port: common::reserved_port(),
        }
    }

    fn lab_addr(&self) -> SocketAddr {
        (self.listen, self.lab_port).into()
    }

    fn ci_addr(&self) -> SocketAddr {
        (self.listen, self.ci_port).into()
    }
}

/// The operator's part: both profiles in the config file, the token in the credential store, `socket`
/// moved to the test's address and ports with a drop-in, then enabled. The VMs listen on the test's VM port,
/// which `vm_port` names as an operator would for VMs whose sshd is not on 22.
fn configure(container: &Container, host: &Host, socket: &str, extra: &str) {
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
fn login_held_open(container: &Container, host: &Host) -> String {
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
fn check_login_summary(container: &Container, host: &Host, client: &str) {
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

/// The lab VM is idle after the held login: a second login during the idle wait keeps it up, and it is
/// stopped once, an idle timeout after that second logout; the journal tells each decision.
fn idle_stop_after_the_last_logout(container: &Container, host: &Host) {
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

    assert_echo(host.lab_addr(), &host.lab.client_key(), "in");
    let logout = Instant::now();
    assert!(
        host.lab_api.requests_to("/stop").is_empty(),
        "stopped during the idle wait"
    );
    let stop = &host.lab_api.wait_for_requests_to("/stop", 1, PATIENCE)[0];
    assert!(stop.at.duration_since(logout) >= IDLE - Duration::from_millis(500));
    let lifecycle = format!("MESSAGE_ID={LIFECYCLE_MESSAGE_ID}");
    let stopped = newest_record(container, &[&lifecycle, "DECISION=stopped", "PROFILE=lab"]);
    assert_eq!(field(&stopped, "VM"), host.lab.addr().to_string());
    assert_eq!(field(&stopped, "VM_KEY"), "lab@127.0.0.1");
    assert!(number(&stopped, "IDLE_S") >= IDLE.as_secs() - 1);
    assert!(!host.lab.is_up());
    let status = status_json(container);
    assert_eq!(vm(&status, "lab@127.0.0.1")["state"], "stopped");
    assert_eq!(host.lab_api.requests_to("/stop").len(), 1);
}

/// BURST logins to the ci profile while its VM boots: one start call, every login in, then one idle stop.
fn burst_makes_one_start_call(container: &Container, host: &Host) {
    let logins: Vec<_> = (0..BURST)
        .map(|i| {
            let (addr, key) = (host.ci_addr(), host.ci.client_key());
            thread::spawn(move || run(ssh(addr, &key).arg(format!("echo {i}")), PATIENCE * 2))
        })
        .collect();
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
    for (i, login) in logins.into_iter().enumerate() {
        let output = login.join().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{i}\n"));
    }
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
fn refused_login(container: &Container, host: &Host) {
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
fn login_without_token(container: &Container, host: &Host) {
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
fn instances_are_collected(container: &Container) {
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
fn watchdog_is_pinged(container: &Container, unit: &str) {
    let first = show(container, unit, "WatchdogTimestampMonotonic");
    assert_ne!(first, "0", "no watchdog ping yet");
    wait_for("a later watchdog ping", PATIENCE, || {
        let now = show(container, unit, "WatchdogTimestampMonotonic");
        (now != first).then_some(()).ok_or(now)
    });
}

/// `systemctl reload`: a good file applies to new connections; a broken one fails the reload (the unit's
/// `ExecReload=` checks it first) with the reason in the journal, and the old one stays in use.
fn reload(container: &Container, host: &Host, unit: &str) {
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
fn drain_on_stop(container: &Container, host: &Host, unit: &str) {
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

fn skipped(why: &str) {
    // Where `cargo test` shows it (not the captured test output): only for a machine that cannot run
    // containers at all.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: real systemd in a container: {why}"
    );
}

/// The packages under test are built as released, but without the release profile's link-time optimisation
/// and with parallel code generation: the same code and behaviour, built in about half the time (three
/// release builds were most of this test's minutes). The benchmark measures the optimised build.
const QUICK_RELEASE: [(&str, &str); 2] = [
    ("CARGO_PROFILE_RELEASE_LTO", "false"),
    ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16"),
];

/// Builds the package from the current sources with packaging/build-deb, as a maintainer would, into `dir`
/// (ours alone, so that another test run building at the same time cannot swap it under us). Cargo rebuilds
/// only what changed: a few seconds when nothing did, and never a stale binary. Returns the .deb's path.
fn build_deb(dir: &Path) -> PathBuf {
    build_package("build-deb", &[], dir)
}

/// Builds the companion's package with packaging/build-deb-api into `dir`: ssh-on-demand-api, or with
/// `libvirt` ssh-on-demand-api-libvirt.
fn build_api_deb(dir: &Path, libvirt: bool) -> PathBuf {
    build_package(
        "build-deb-api",
        if libvirt { &["--libvirt"] } else { &[] },
        dir,
    )
}

/// Runs packaging/`script` with `args` into `dir`; returns the path it prints last.
fn build_package(script: &str, args: &[&str], dir: &Path) -> PathBuf {
    let started = Instant::now();
    let output = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("packaging")
            .join(script),
    )
    .args(args)
    .arg(format!("--output={}", dir.display()))
    // Lighter compression of the same files: a second less per run.
    .arg("--fast")
    .env("CARGO", env!("CARGO"))
    .envs(QUICK_RELEASE)
    .stdin(Stdio::null())
    .output()
    .unwrap_or_else(|e| panic!("running packaging/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "packaging/{script} failed ({}); is cargo-deb installed (cargo install --locked cargo-deb)?\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let deb = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("packaging/{script} prints the path"));
    eprintln!("built {deb} in {:?}", started.elapsed());
    PathBuf::from(deb)
}

/// What the companion's package installed, before the operator touches anything: its files, units that
/// systemd finds clean and hardened, and no need of libvirt, whose backend it refuses with the reason.
fn check_installed_api_package(container: &Container, deb: &Path) {
    let files = container.run_ok("dpkg", &["--listfiles", "ssh-on-demand-api"]);
    for expected in [
        "/usr/bin/ssh-on-demand-api",
        "/usr/libexec/ssh-on-demand-api/start-unit",
        "/etc/ssh-on-demand-api/config.toml",
        "/usr/share/doc/ssh-on-demand-api/examples/config.toml",
        "/usr/share/doc/ssh-on-demand-api/README.md",
        "/usr/share/doc/ssh-on-demand-api/docs/command-backend.md",
        "/usr/share/man/man8/ssh-on-demand-api.8.gz",
        "/usr/lib/systemd/system/ssh-on-demand-api.socket",
        "/usr/lib/systemd/system/ssh-on-demand-api.service",
    ] {
        assert!(files.lines().any(|f| f == expected), "{expected}:\n{files}");
    }
    let depends = Command::new("dpkg-deb")
        .args(["--field"])
        .arg(deb)
        .arg("Depends")
        .output()
        .unwrap();
    let depends = String::from_utf8_lossy(&depends.stdout);
    assert!(
        depends.contains("libc6") && !depends.contains("libvirt"),
        "{depends}"
    );
    let linked = container.run_ok("ldd", &["/usr/bin/ssh-on-demand-api"]);
    assert!(
        !linked.contains("libvirt") && !linked.contains("not found"),
        "{linked}"
    );
    assert!(!is_active(container, "ssh-on-demand-api.socket"));

    // The conffile sets nothing, and check-config says what is missing; a libvirt backend is refused.
    let check = container.run("ssh-on-demand-api", &["check-config"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stderr).contains("no [profiles.NAME] section"));
    fs::write(
        container.root().join("root/libvirt.toml"),
        "[backends.host]\ntype = \"libvirt\"\n[profiles.lab]\nbackend = \"host\"\nvm = \"dev\"\n",
    )
    .unwrap();
    let check = container.run(
        "ssh-on-demand-api",
        &["--config", "/root/libvirt.toml", "check-config"],
    );
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        !check.status.success() && said.contains("install the package ssh-on-demand-api-libvirt"),
        "{said}"
    );

    let units = ["ssh-on-demand-api.socket", "ssh-on-demand-api.service"];
    let verify = container.run("systemd-analyze", &[&["verify"], &units[..]].concat());
    let said = [verify.stdout, verify.stderr].concat();
    assert!(
        verify.status.success() && said.is_empty(),
        "systemd-analyze verify: {}\n{}",
        verify.status,
        String::from_utf8_lossy(&said)
    );
    let security = container.run(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            "--threshold=15",
            "--no-pager",
            "/usr/lib/systemd/system/ssh-on-demand-api.service",
        ],
    );
    assert!(
        security.status.success(),
        "{}",
        String::from_utf8_lossy(&security.stdout)
    );
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
        "/usr/share/man/man5/ssh-on-demand.toml.5.gz",
        "/usr/share/doc/ssh-on-demand/docs/api.md",
    ] {
        assert!(files.lines().any(|f| f == expected), "{expected}:\n{files}");
    }
    let units: Vec<&str> = files
        .lines()
        .filter(|f| f.contains("/systemd/system/ssh-on-demand"))
        .collect();
    assert_eq!(units.len(), 6, "{files}");

    // Linked statically for musl (packaging/build-release): every login starts this program, and glibc's loader
    // and CPU probe were most of its start-up.
    let linked = container.run_ok("ldd", &["/usr/bin/ssh-on-demand"]);
    assert_eq!(linked.trim(), "statically linked", "{linked}");

    // Nothing enabled or started: port 22 is usually the host's own sshd.
    for unit in [
        "ssh-on-demand.socket",
        "ssh-on-demand-daemon.socket",
        "ssh-on-demand-sweep.timer",
    ] {
        let enabled = container.run("systemctl", &["is-enabled", unit]);
        assert_eq!(
            String::from_utf8_lossy(&enabled.stdout).trim(),
            "disabled",
            "{unit}"
        );
        assert!(!is_active(container, unit), "{unit}");
    }

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

    // Exposure of every service at most 1.5 (--threshold is in tenths: it fails above 15).
    for service in units.iter().filter(|u| u.ends_with(".service")) {
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

/// `ssh-on-demand status --json` in the container, as the operator runs it.
fn status_json(container: &Container) -> Value {
    serde_json::from_str(&container.run_ok("ssh-on-demand", &["status", "--json"])).unwrap()
}

/// The VM `key` in a `status --json` document (`Null` if it has none).
fn vm<'a>(status: &'a Value, key: &str) -> &'a Value {
    status["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|vm| vm["key"] == key))
        .unwrap_or(&Value::Null)
}

/// A property of `unit` (`systemctl show -p NAME --value`).
fn show(container: &Container, unit: &str, property: &str) -> String {
    container
        .run_ok("systemctl", &["show", "-p", property, "--value", unit])
        .trim()
        .to_owned()
}

fn is_active(container: &Container, unit: &str) -> bool {
    let output = container.run("systemctl", &["is-active", unit]);
    String::from_utf8_lossy(&output.stdout).trim() == "active"
}

/// Waits for a journal record that `matches` select, and returns the newest.
fn newest_record(container: &Container, matches: &[&str]) -> Value {
    wait_for(&format!("a journal record {matches:?}"), PATIENCE, || {
        container
            .journal(matches)
            .pop()
            .ok_or_else(|| "no such record".to_owned())
    })
}

/// The newest record of `unit` whose message contains `text`.
fn journal_says(container: &Container, unit: &str, text: &str) -> Result<Value, String> {
    container
        .journal(&[&format!("_SYSTEMD_UNIT={unit}")])
        .into_iter()
        .rev()
        .find(|record| record["MESSAGE"].as_str().is_some_and(|m| m.contains(text)))
        .ok_or_else(|| format!("no record of {unit} says {text:?}"))
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
