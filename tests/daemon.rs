//! What only the daemon has: drain on SIGTERM, reload on SIGHUP, its limits, listeners named after profiles
//! or given with --listen, and its metrics. (What users see in both modes is in tests/proxy.rs and
//! tests/lifecycle.rs; the watchdog and the units under real systemd in tests/systemd/.)

use testkit as common;

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    PATIENCE,
    api::StartApi,
    log::Log,
    proxy::{Mode, Proxy, binary},
    ssh::{Session, assert_echo, run, ssh},
    vm::Vm,
};
use rustix::process::Signal;

const BOOT_TIME: Duration = Duration::from_millis(300);

/// SIGTERM with one session that ends by itself and one that does not: the first is let finish, the second
/// is closed once drain_timeout has passed, and the daemon exits 0.
#[test]
fn sigterm_drains_sessions_then_closes_the_rest() {
    let vm = Vm::new();
    let api = StartApi::booting(&vm, BOOT_TIME);
    let mut proxy = Proxy::builder_in(Mode::Daemon, &api.url())
        .arg("--drain-timeout=2s")
        .start();
    let finishing = Session::open(proxy.addr, &vm.client_key(), &[]);
    let lingering = Session::open(proxy.addr, &vm.client_key(), &[]);

    proxy.signal(Signal::TERM);
    proxy
        .log
        .wait_for(PATIENCE, |l| l.contains("stopping: draining sessions"));
    // No new connections now; the ones in progress go on.
    let refused = TcpStream::connect(proxy.addr)
        .and_then(|mut s| {
            s.write_all(b"SSH-2.0-test\r\n")?;
            let mut buf = [0u8; 1];
            s.read(&mut buf)
        })
        .unwrap_or(0);
    assert_eq!(refused, 0, "a connection was served after SIGTERM");
    finishing.close();
    let stopped_at = Instant::now();
    let status = proxy.wait_exit(PATIENCE).expect("the daemon exited");
    assert!(status.success(), "{status}");
    assert!(stopped_at.elapsed() <= Duration::from_secs(2) + Duration::from_secs(5));
    lingering.wait_closed(PATIENCE);
    let summaries = proxy.summaries();
    let closed = summaries
        .iter()
        .find(|s| s.contains("closed: the daemon stopped and its drain_timeout passed"))
        .unwrap_or_else(|| panic!("{summaries:#?}"));
    // The relay was dropped, not finished: its bytes are counted all the same (the SSH handshake at least).
    for field in ["bytes_to_vm", "bytes_to_client"] {
        let bytes: u64 = closed
            .split(&format!("{field}="))
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {closed}"));
        assert!(bytes > 1000, "{field}={bytes} in {closed}");
    }
}

/// SIGHUP: a good file applies to the next connection and leaves a live session alone; a broken one is
/// refused with an error and the one before stays in use.
#[test]
fn sighup_reloads_for_new_connections_and_keeps_the_old_on_a_broken_file() {
    let (first, second) = (Vm::new(), Vm::new());
    let (first_api, second_api) = (
        StartApi::booting(&first, BOOT_TIME),
        StartApi::booting(&second, BOOT_TIME),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    fs::write(&config, format!("api_url = \"{}\"\n", first_api.url())).unwrap();
    // No --api-url on the command line: it would win over the file.
    let proxy = Proxy::builder_in(Mode::Daemon, "unused")
        .without_api_url()
        .config(config.display().to_string())
        .start();
    let live = Session::open(proxy.addr, &first.client_key(), &[]);

    fs::write(&config, format!("api_url = \"{}\"\n", second_api.url())).unwrap();
    proxy.signal(Signal::HUP);
    proxy
        .log
        .wait_for(PATIENCE, |l| l.contains("configuration reloaded"));
    assert_echo(proxy.addr, &second.client_key(), "second");

    fs::write(&config, "api_url = 5\n").unwrap();
    proxy.signal(Signal::HUP);
    proxy.log.wait_for(PATIENCE, |l| {
        l.contains("ERROR") && l.contains("configuration not reloaded")
    });
    assert_echo(proxy.addr, &second.client_key(), "still second");

    // The session that began before both reloads is untouched.
    live.close();
    assert_eq!(first_api.requests().len(), 1);
    assert_eq!(second_api.requests().len(), 2);
}

/// Over max_sessions_per_source, and over max_pending_per_vm, the client reads why and the summary says busy.
#[test]
fn clients_over_a_limit_are_told_why() {
    let vm = Vm::new();
    let api = StartApi::pointing_at(&vm); // the VM "boots" when the test says
    let proxy = Proxy::builder_in(Mode::Daemon, &api.url())
        .args(["--max-sessions-per-source=2", "--max-pending-per-vm=1"])
        .start();
    let waiting = {
        let (addr, key) = (proxy.addr, vm.client_key());
        std::thread::spawn(move || run(ssh(addr, &key).arg("echo first"), PATIENCE))
    };
    proxy
        .log
        .wait_for(PATIENCE, |l| l.contains("start API answered"));

    let second = run(ssh(proxy.addr, &vm.client_key()).arg("true"), PATIENCE);
    let seen = String::from_utf8_lossy(&second.stderr);
    assert!(
        seen.contains("this host is busy: too many logins are waiting for this VM to start"),
        "{seen}"
    );

    vm.start();
    let first = waiting.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&first.stdout), "first\n");
    let one = Session::open(proxy.addr, &vm.client_key(), &[]);
    let two = Session::open(proxy.addr, &vm.client_key(), &[]);
    let third = run(ssh(proxy.addr, &vm.client_key()).arg("true"), PATIENCE);
    let seen = String::from_utf8_lossy(&third.stderr);
    assert!(
        seen.contains("this host is busy: too many connections from your address at once"),
        "{seen}"
    );
    one.close();
    two.close();
    let busy = proxy
        .summaries()
        .into_iter()
        .filter(|s| s.contains(r#"outcome="busy""#) && s.contains("WARN"))
        .count();
    assert_eq!(busy, 2);
}

/// A socket systemd names after a profile (FileDescriptorName=ci) serves that profile, whatever its port.
#[test]
fn a_listener_named_after_a_profile_serves_it() {
    let (lab, ci) = (Vm::new(), Vm::new());
    let (lab_api, ci_api) = (
        StartApi::booting(&lab, BOOT_TIME),
        StartApi::booting(&ci, BOOT_TIME),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ci_addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    // Its ports name another port: the listener's name decides.
    fs::write(
        &config,
        format!(
            "[profiles.ci]\nports = [1]\napi_url = \"{}\"\n",
            ci_api.url()
        ),
    )
    .unwrap();
    let proxy = Proxy::builder_in(Mode::Daemon, &lab_api.url())
        .config(config.display().to_string())
        .listener(listener, Some("ci"))
        .start();
    assert_echo(ci_addr, &ci.client_key(), "ci");
    assert_echo(proxy.addr, &lab.client_key(), "lab");
    assert_eq!(ci_api.requests()[0].json()["profile"], "ci");
    assert!(lab_api.requests()[0].json().get("profile").is_none());
}

/// Without systemd: `--listen ADDR`, and the metrics endpoint counting what happened.
#[test]
fn listen_flag_and_metrics() {
    let vm = Vm::new();
    let api = StartApi::booting(&vm, BOOT_TIME);
    let (addr, metrics) = (free_port(), free_port());
    let state = tempfile::tempdir().unwrap();
    let mut daemon = Command::new(binary())
        .args(["daemon", "--config=/dev/null", "--log-target=stderr"])
        .arg(format!("--listen={addr}"))
        .arg(format!("--metrics-listen={metrics}"))
        .arg(format!("--api-url={}", api.url()))
        .arg("--vm-network=127.0.0.0/8")
        .arg(format!("--state-dir={}", state.path().display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::collect(daemon.stderr.take().unwrap(), "daemon");
    log.wait_for(PATIENCE, |l| l.contains("serving metrics"));
    assert_echo(addr, &vm.client_key(), "listening");
    log.wait_for(PATIENCE, |l| l.contains(r#"outcome="relayed""#));

    let text = scrape(metrics);
    for expected in [
        "ssh_on_demand_connections_total{outcome=\"relayed\"} 1",
        "ssh_on_demand_starts_total{shared=\"false\"} 1",
        "ssh_on_demand_sessions 0",
        "ssh_on_demand_api_seconds_count 1",
        "ssh_on_demand_relayed_bytes_total{direction=\"to_vm\"}",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// A port nobody listens on now, for a daemon to bind.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One HTTP GET of the metrics, as Prometheus would.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}
