//! Waiting for a booting VM, with the faults made for real: each test runs in a network namespace of its own
//! (`unshare --net`), where nftables drops the SYNs to the "VM" or nothing listens yet, as while a VM boots.

use testkit as common;

use std::{
    env,
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    process::Command,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use common::PATIENCE;
use ssh_on_demand::vm::readiness::{Ready, Timeouts, wait_for_sshd};

/// Set in the copy of the test binary that runs inside the namespace.
const INSIDE: &str = "SSH_ON_DEMAND_TEST_IN_NETNS";
const BANNER: &[u8] = b"SSH-2.0-OpenSSH_9.2p1 test-vm\r\n";
const TABLE: &str = "ssh_on_demand_readiness_test";

/// Runs the test named `name` again, alone, in a fresh network namespace, and passes if it passes there.
/// Inside, `body` runs with loopback up.
fn in_own_netns(name: &str, body: impl FnOnce()) {
    if env::var_os(INSIDE).is_some() {
        run(&["ip", "link", "set", "lo", "up"]);
        body();
        return;
    }
    common::require_root();
    let status = Command::new("unshare")
        .args(["--net", "--"])
        .arg(env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .status()
        .expect("running unshare (util-linux)");
    assert!(status.success(), "{name} failed in its network namespace");
}

fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {argv:?}: {e} (nft: apt-get install nftables)"));
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An input rule on SYNs to `port` that counts them and, if `verdict` is "drop", drops them.
fn syn_rule(port: u16, verdict: &str) {
    run(&["nft", "add", "table", "inet", TABLE]);
    run(&[
        "nft",
        "add chain inet ssh_on_demand_readiness_test input { type filter hook input priority 0; }",
    ]);
    let rule = format!(
        "add rule inet {TABLE} input tcp dport {port} tcp flags & (syn | ack) == syn counter {verdict}"
    );
    run(&["nft", &rule]);
}

fn syns_seen() -> u64 {
    let listing = run(&["nft", "list", "chain", "inet", TABLE, "input"]);
    let (_, after) = listing
        .split_once("counter packets ")
        .expect("the rule has a counter");
    after.split_whitespace().next().unwrap().parse().unwrap()
}

fn wait_for_syns(at_least: u64) {
    let started = Instant::now();
    while syns_seen() < at_least {
        assert!(started.elapsed() < PATIENCE, "fewer than {at_least} SYNs");
        thread::sleep(Duration::from_millis(5)); // polling a counter, not waiting for time to pass
    }
}

/// The VM's sshd, as far as readiness can tell: sends its identification line at once, then records what
/// each connection sent until it closed.
fn serve(listener: TcpListener) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let record = record.clone();
            thread::spawn(move || {
                let _ = conn.write_all(BANNER);
                let mut got = Vec::new();
                let _ = conn.read_to_end(&mut got);
                record.lock().unwrap().push(got);
            });
        }
    });
    seen
}

/// Waits in the background, as the proxy does, with a connect timeout far above the test's duration: an
/// attempt that waited for its own SYN to be retransmitted would take seconds.
fn wait_in_background(addr: SocketAddr) -> thread::JoinHandle<Ready> {
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let timeouts = Timeouts {
                connect: Duration::from_secs(60),
                banner: Duration::from_secs(60),
            };
            let deadline = tokio::time::Instant::now() + PATIENCE;
            wait_for_sshd(addr, deadline, PATIENCE, timeouts)
                .await
                .unwrap()
        })
    })
}

/// Hands the kept connection to a "client": sshd must see exactly this one login.
fn log_in(ready: Ready) {
    assert_eq!(ready.received, BANNER);
    let mut stream = ready.stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.write_all(b"SSH-2.0-client\r\n").unwrap();
}

#[test]
fn vm_dropping_syns_is_seen_by_a_newer_attempt() {
    in_own_netns("vm_dropping_syns_is_seen_by_a_newer_attempt", || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        syn_rule(addr.port(), "drop");
        let seen = serve(listener);
        let waiter = wait_in_background(addr);
        // Several SYNs dropped, then the VM's network comes up.
        wait_for_syns(3);
        run(&["nft", "delete", "table", "inet", TABLE]);
        let ready = waiter.join().unwrap();
        // One attempt at a time would still be waiting for its first SYN's retransmission (and would then be
        // the only attempt): it is a newer one that got through.
        assert!(ready.attempts >= 3, "{} attempts", ready.attempts);
        log_in(ready);
        wait_for_logins(&seen, 1);
    });
}

#[test]
fn vm_refusing_then_listening_is_seen() {
    in_own_netns("vm_refusing_then_listening_is_seen", || {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap(); // closed again: connections are refused
        syn_rule(addr.port(), "accept");
        let waiter = wait_in_background(addr);
        wait_for_syns(3);
        let seen = serve(TcpListener::bind(addr).unwrap());
        let ready = waiter.join().unwrap();
        assert!(ready.attempts >= 3, "{} attempts", ready.attempts);
        log_in(ready);
        wait_for_logins(&seen, 1);
    });
}

/// Every connection the VM saw ended; exactly `logins` of them carried a client's identification, and any
/// other got our polite disconnect, not a bare close.
fn wait_for_logins(seen: &Mutex<Vec<Vec<u8>>>, logins: usize) {
    let started = Instant::now();
    while !seen
        .lock()
        .unwrap()
        .iter()
        .any(|got| got.starts_with(b"SSH-2.0-client"))
    {
        assert!(started.elapsed() < PATIENCE, "the login never ended");
        thread::sleep(Duration::from_millis(5)); // polling what the VM recorded
    }
    let seen = seen.lock().unwrap();
    let clients = seen
        .iter()
        .filter(|got| got.starts_with(b"SSH-2.0-client"))
        .count();
    assert_eq!(clients, logins, "{seen:?}");
    for got in seen
        .iter()
        .filter(|got| !got.starts_with(b"SSH-2.0-client"))
    {
        assert!(
            got.starts_with(ssh_on_demand::wire::IDENTIFICATION),
            "a losing connection was closed without a word: {got:?}"
        );
    }
}
