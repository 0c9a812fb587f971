//! Several proxy hosts in front of one VM share its life through a real etcd cluster (three members of
//! Debian's etcd-server on loopback ports, started and killed here): one start per burst across hosts, no
//! stop while any host has a session, exactly one stop once the VM is idle everywhere, a host that dies, and
//! members or the quorum lost. Each "host" is a daemon with its own address and `host_id`.

use testkit as common;

use std::{
    thread,
    time::{Duration, Instant},
};

use common::{
    PATIENCE,
    api::StartApi,
    etcd::Cluster,
    proxy::{Mode, Proxy, ProxyBuilder, binary, found_its_vm},
    ssh::{Burst, Session, assert_echo, run, ssh},
    vm::Vm,
};
use serde_json::Value;

/// etcd raises shorter TTLs to about 1.5 election timeouts; the test cluster's allow 2 s.
const TTL: Duration = Duration::from_secs(2);
/// The shortest idle timeout `check-config` allows with that TTL: three of them.
const IDLE: Duration = Duration::from_secs(6);
const BOOT_TIME: Duration = Duration::from_millis(300);

/// A proxy host `name` of the cluster, stopping VMs through `api` after `IDLE`.
fn host(cluster: &Cluster, api: &StartApi, name: &str) -> ProxyBuilder {
    Proxy::builder_in(Mode::Daemon, &api.url())
        .args([
            "--state-store=etcd".to_owned(),
            format!("--host-id={name}"),
            format!("--etcd-lease-ttl={}s", TTL.as_secs()),
            format!("--stop-url={}", api.stop_url()),
            format!("--idle-timeout={}s", IDLE.as_secs()),
        ])
        .args(cluster.endpoint_args())
}

fn vm_status(proxy: &Proxy) -> Value {
    let status = proxy.status();
    let vms = status["vms"].as_array().unwrap().clone();
    assert_eq!(vms.len(), 1, "{status:#}");
    vms[0].clone()
}

/// The hosts whose sessions `status` lists, one entry per session.
fn session_hosts(proxy: &Proxy) -> Vec<String> {
    vm_status(proxy)["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["host"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits until a host records that it stopped the VM.
fn wait_stopped(hosts: &[&Proxy]) {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        for host in hosts {
            if host
                .log
                .try_wait_for(Duration::from_millis(100), |l| {
                    l.contains(r#"decision="stopped""#)
                })
                .is_some()
            {
                return;
            }
        }
    }
    panic!("no host recorded the stop");
}

/// 60 logins spread over three hosts while the VM boots: one start call, and every login is a session.
#[test]
fn a_burst_over_three_hosts_makes_one_start_call() {
    const LOGINS: usize = 60;
    let cluster = Cluster::start(3);
    let vm = Vm::new();
    let api = StartApi::pointing_at(&vm); // the VM "boots" when the test says
    let hosts: Vec<Proxy> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            host(&cluster, &api, name)
                .args(["--boot-timeout=5m", "--log-level=info"])
                .start()
        })
        .collect();
    let logins = Burst::start(LOGINS, &vm.client_key(), PATIENCE * 4, |i| {
        hosts[i % hosts.len()].addr
    });
    // Every login has its address: one from the start API, all others from that start.
    let deadline = Instant::now() + PATIENCE * 4;
    loop {
        let answered: usize = hosts
            .iter()
            .map(|h| h.log.lines().iter().filter(|l| found_its_vm(l)).count())
            .sum();
        if answered == LOGINS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{answered} of {LOGINS} logins got an address"
        );
        hosts[0]
            .log
            .try_wait_for(Duration::from_millis(200), |_| false);
    }
    let by_host = session_hosts(&hosts[0]);
    assert_eq!(by_host.len(), LOGINS);
    for name in ["a", "b", "c"] {
        assert_eq!(by_host.iter().filter(|h| *h == name).count(), LOGINS / 3);
    }
    vm.start();
    logins.assert_all_in();
    assert_eq!(api.requests_to("/start").len(), 1);
    assert_eq!(vm_status(&hosts[1])["starts"], 1);
}

/// A session on host A keeps the VM up while B's sessions come and go; the stop comes once, `idle_timeout`
/// after the last session on any host ends.
#[test]
fn a_session_on_one_host_keeps_the_vm_up_for_all() {
    let cluster = Cluster::start(3);
    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let a = host(&cluster, &api, "a").start();
    let b = host(&cluster, &api, "b").start();

    let held = Session::open(a.addr, &vm.client_key(), &[]);
    for _ in 0..3 {
        assert_echo(b.addr, &vm.client_key(), "via-b");
    }
    b.wait_for_summary(3);
    thread::sleep(IDLE * 2); // the time under test: B has had no session for longer than idle_timeout
    assert!(
        api.requests_to("/stop").is_empty(),
        "stopped under a session on another host"
    );
    assert_eq!(session_hosts(&b), ["a"]);
    let hosts = &b.status()["hosts"];
    assert_eq!(hosts["alive"], serde_json::json!(["a", "b"]), "{hosts}");
    assert_eq!(hosts["this_host_alive"], true);

    let logout = held.close();
    let stops = api.wait_for_requests_to("/stop", 1, PATIENCE);
    let waited = stops[0].at.duration_since(logout);
    assert!(waited >= IDLE, "stopped {waited:?} after the last logout");
    wait_stopped(&[&a, &b]);
    thread::sleep(IDLE); // the time under test: no second host stops it again
    assert_eq!(api.requests_to("/stop").len(), 1);
    assert_eq!(vm_status(&a)["state"], "stopped");
}

/// A host killed with a live session: its session keeps the VM until its lease expires, and the VM is
/// stopped once, `idle_timeout` after that, by a host that lives.
#[test]
fn a_killed_host_keeps_its_vm_for_its_lease_then_it_is_stopped_once() {
    let cluster = Cluster::start(3);
    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let a = host(&cluster, &api, "a").start();
    let b = host(&cluster, &api, "b").start();

    let session = Session::open(a.addr, &vm.client_key(), &[]);
    assert_eq!(session_hosts(&b), ["a"]);
    let killed = Instant::now();
    drop(a); // SIGKILL, lease and all
    session.wait_closed(PATIENCE);

    let stops = api.wait_for_requests_to("/stop", 1, PATIENCE);
    let waited = stops[0].at.duration_since(killed);
    assert!(
        waited >= TTL + IDLE,
        "stopped {waited:?} after the host died"
    );
    wait_stopped(&[&b]);
    thread::sleep(IDLE); // the time under test
    assert_eq!(api.requests_to("/stop").len(), 1);
    assert_eq!(b.status()["hosts"]["alive"], serde_json::json!(["b"]));
}

/// One member lost changes nothing for users. Without a quorum, logins still go through (each asks the
/// start API itself) and nothing is stopped; once the quorum is back the hosts write their sessions again
/// and the idle VM is stopped once.
#[test]
fn members_and_quorum_lost_and_back() {
    let mut cluster = Cluster::start(3);
    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let a = host(&cluster, &api, "a").start();
    let b = host(&cluster, &api, "b").start();

    cluster.kill(2);
    assert_echo(a.addr, &vm.client_key(), "one-member-down");
    assert_echo(b.addr, &vm.client_key(), "still");
    assert_eq!(api.requests_to("/start").len(), 2);
    let stops = api.wait_for_requests_to("/stop", 1, PATIENCE);
    assert_eq!(stops.len(), 1);
    wait_stopped(&[&a, &b]);

    // Quorum lost.
    cluster.kill(1);
    let session = Session::open(a.addr, &vm.client_key(), &[]);
    assert_echo(b.addr, &vm.client_key(), "no-quorum");
    a.log
        .wait_for(PATIENCE, |l| l.contains("shared state is unusable"));
    let logout = session.close();
    thread::sleep(IDLE * 2); // the time under test: nothing is stopped without the store
    assert_eq!(
        api.requests_to("/stop").len(),
        1,
        "stopped without the store"
    );

    // Quorum back: the VM, idle everywhere, is stopped once.
    cluster.restart(1);
    let stops = api.wait_for_requests_to("/stop", 2, PATIENCE);
    assert!(stops[1].at.duration_since(logout) >= IDLE);
    thread::sleep(IDLE); // the time under test
    assert_eq!(api.requests_to("/stop").len(), 2);
    cluster.restart(2);
}

/// A host restarted after a crash takes up the VM's idle clock where the store has it: the stop comes
/// `idle_timeout` after the last logout, not after the restart.
#[test]
fn a_restarted_host_picks_up_where_it_was() {
    let cluster = Cluster::start(3);
    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let a = host(&cluster, &api, "a").start();
    let logout = Session::open(a.addr, &vm.client_key(), &[]).close();
    a.log
        .wait_for(PATIENCE, |l| l.contains(r#"decision="idle""#));
    drop(a); // SIGKILL, its idle wait with it
    let a = host(&cluster, &api, "a").start();
    let stops = api.wait_for_requests_to("/stop", 1, PATIENCE);
    let waited = stops[0].at.duration_since(logout);
    assert!(
        waited >= IDLE && waited < IDLE + TTL * 3,
        "stopped {waited:?} after the logout"
    );
    wait_stopped(&[&a]);
}

/// The per-connection mode cannot hold a lease between connections: it refuses etcd, and says why.
#[test]
fn per_connection_instances_refuse_the_etcd_store() {
    let cluster = Cluster::start(1);
    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let proxy = Proxy::builder_in(Mode::Activated, &api.url())
        .arg("--state-store=etcd")
        .args(cluster.endpoint_args())
        .start();
    let output = run(ssh(proxy.addr, &vm.client_key()).arg("true"), PATIENCE);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("misconfigured"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    proxy.log.wait_for(PATIENCE, |l| {
        l.contains(r#"state_store = "etcd" needs the daemon"#)
    });
    assert!(api.requests().is_empty());
}

/// `check-config` reaches the cluster, and refuses an idle timeout shorter than three lease TTLs.
#[test]
fn check_config_reaches_the_cluster_and_checks_the_idle_timeout() {
    let cluster = Cluster::start(1);
    let check = |extra: &[&str]| {
        std::process::Command::new(binary())
            .args([
                "check-config",
                "--config=/dev/null",
                "--api-url=http://127.0.0.1:9/start",
            ])
            .args([
                "--state-store=etcd",
                "--host-id=a",
                "--stop-url=http://127.0.0.1:9/stop",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let endpoint = cluster.endpoint_args().remove(0);
    let ok = check(&[&endpoint, "--idle-timeout=30s"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let printed = String::from_utf8_lossy(&ok.stdout);
    // check-config shows the store's settings (tests/cli.rs checks the others).
    for shown in [
        "state_store = \"etcd\"",
        "host_id = \"a\"",
        "etcd_endpoints = [",
        "etcd_prefix = ",
        "etcd_lease_ttl = ",
    ] {
        assert!(printed.contains(shown), "{shown} missing in:\n{printed}");
    }

    let short = check(&[&endpoint, "--idle-timeout=20s"]);
    assert!(!short.status.success());
    assert!(
        String::from_utf8_lossy(&short.stderr).contains("shorter than 3 etcd lease TTLs"),
        "{}",
        String::from_utf8_lossy(&short.stderr)
    );

    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = format!("--etcd-endpoint=http://{}", nobody.local_addr().unwrap());
    drop(nobody);
    let down = check(&[&unreachable, "--idle-timeout=30s"]);
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("etcd"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// TLS to the cluster, with a client certificate: check-config reaches it with the CA, certificate and key,
/// and not without the certificate; a daemon's logins share the store through it.
#[test]
fn etcd_over_tls_with_a_client_certificate() {
    let cluster = Cluster::start_tls();
    let tls = cluster.tls().args();
    let check = |extra: &[String]| {
        std::process::Command::new(binary())
            .args([
                "check-config",
                "--config=/dev/null",
                "--api-url=http://127.0.0.1:9/start",
            ])
            .args(["--state-store=etcd", "--host-id=a"])
            .args(cluster.endpoint_args())
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = check(&tls);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let without_cert = check(&tls[..1]);
    assert!(
        !without_cert.status.success(),
        "the cluster took a client without a certificate"
    );

    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let proxy = host(&cluster, &api, "a").args(tls).start();
    assert_echo(proxy.addr, &vm.client_key(), "over-tls");
    assert_eq!(vm_status(&proxy)["starts"], 1);
}

/// An etcd user, its password from a file: check-config and the daemon authenticate; a wrong password is
/// refused by check-config with etcd's reason.
#[test]
fn etcd_user_and_password() {
    let cluster = Cluster::start(1);
    cluster.add_user("proxy", "s3cret");
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("etcd-password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess\n").unwrap();
    let user = |file: &std::path::Path| {
        vec![
            "--etcd-user=proxy".to_owned(),
            format!("--etcd-password-file={}", file.display()),
        ]
    };
    let check = |extra: Vec<String>| {
        std::process::Command::new(binary())
            .args([
                "check-config",
                "--config=/dev/null",
                "--api-url=http://127.0.0.1:9/start",
            ])
            .args(["--state-store=etcd", "--host-id=a"])
            .args(cluster.endpoint_args())
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = check(user(&password));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("# password: ***"),
        "the password is masked"
    );
    let refused = check(user(&wrong));
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("authentication failed"), "{said}");
    assert!(!said.contains("guess"), "{said}");

    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let proxy = host(&cluster, &api, "a").args(user(&password)).start();
    assert_echo(proxy.addr, &vm.client_key(), "as-a-user");
    assert_eq!(vm_status(&proxy)["starts"], 1);
}
