//! Soak: 2,000 sequential and then 200 concurrent sessions through the proxy, in each mode, to a real sshd in a
//! network namespace of the test's own. None may be lost, and what the proxy and the VM hold (processes, open
//! files, memory, connections) must be the same before and after; the host's figures are printed beside them.
//!
//! Most sessions are raw TCP: the client's identification line, the VM's read back through the proxy, a
//! half-close each way. That is the proxy's whole path (accept, identification, start API, readiness, relay,
//! summary) at a pace real logins cannot reach; one in 50 is a real `ssh` login that runs a command.
//!
//! Minutes long, so `#[ignore]`d: `cargo test --test soak -- --ignored --nocapture` (CI runs it so).

use testkit as common;

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::Path,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use common::{
    PATIENCE,
    api::{Answer, StartApi},
    netns::{NsVm, tcp_connections_to},
    proxy::{Mode, Proxy, binary},
    ssh::{run, ssh},
};

const SEQUENTIAL: usize = 2000;
const CONCURRENT: usize = 200;
/// One session in this many is a real ssh login.
const REAL_LOGIN_EVERY: usize = 50;
/// The daemon's memory may grow this much over the soak (allocator caches, the metrics' label sets); a leak of a
/// few KiB per session, 2,200 sessions, shows well above it.
const RSS_GROWTH_LIMIT_KIB: i64 = 4 * 1024;

#[test]
#[ignore = "minutes long; cargo test --test soak -- --ignored --nocapture"]
fn soak_per_connection() {
    soak(Mode::Activated);
}

#[test]
#[ignore = "minutes long; cargo test --test soak -- --ignored --nocapture"]
fn soak_daemon() {
    soak(Mode::Daemon);
}

fn soak(mode: Mode) {
    let vm = NsVm::start_with("MaxStartups 1000:30:2000\n");
    let api = StartApi::serve({
        let ip = vm.addr().ip().to_string();
        move |_| Answer::json(serde_json::json!({ "vm_ip": ip }))
    });
    let proxy = Proxy::builder_in(mode, &api.url())
        .arg("--vm-network=10.199.0.0/16")
        // Every client is 127.0.0.1: the daemon's per-source and per-VM limits must let 200 through at once.
        .args([
            "--max-sessions-per-source=1000",
            "--max-pending-per-vm=1000",
        ])
        // Info, not debug: 2,200 sessions' worth of debug lines would only slow the log's reader.
        .env("SSH_ON_DEMAND_LOG_LEVEL", "info")
        .start();
    let key = vm.client_key();

    // Warm-up, as busy as the soak gets: the daemon's allocator and thread pool reach the high-water mark of
    // 200 sessions at once, sshd forks its first children, the API has its first requests.
    sequential(proxy.addr, &key, 20);
    concurrent(proxy.addr, &key);
    let warm_up = 20 + CONCURRENT;
    settle(&proxy, &vm, warm_up);
    let before = Figures::take(&proxy, &vm);

    let started = Instant::now();
    sequential(proxy.addr, &key, SEQUENTIAL / 2);
    settle(&proxy, &vm, warm_up + SEQUENTIAL / 2);
    let halfway = Figures::take(&proxy, &vm);
    sequential(proxy.addr, &key, SEQUENTIAL - SEQUENTIAL / 2);
    let sequential = started.elapsed();

    let started = Instant::now();
    concurrent(proxy.addr, &key);
    let concurrent = started.elapsed();

    let total = warm_up + SEQUENTIAL + CONCURRENT;
    settle(&proxy, &vm, total);
    let after = Figures::take(&proxy, &vm);
    println!(
        "soak, {mode:?}: {SEQUENTIAL} sequential sessions in {sequential:.1?} ({:.1} ms each), {CONCURRENT} \
         concurrent in {concurrent:.1?}, after a warm-up of {warm_up}\n  before:  {before}\n  halfway: \
         {halfway}\n  after:   {after}",
        sequential.as_secs_f64() * 1000.0 / SEQUENTIAL as f64
    );

    // None lost: each ended with a summary, relayed, and sshd saw each connection.
    let summaries = proxy.summaries();
    assert_eq!(summaries.len(), total, "summary records");
    let not_relayed: Vec<&String> = summaries
        .iter()
        .filter(|s| !s.contains(r#"outcome="relayed""#) || s.contains("relay ended"))
        .collect();
    assert!(
        not_relayed.is_empty(),
        "{} sessions not relayed cleanly, e.g. {}",
        not_relayed.len(),
        not_relayed[0]
    );
    let accepted = vm
        .log()
        .lines()
        .iter()
        .filter(|l| l.contains("Connection from"))
        .count();
    assert_eq!(accepted, total, "connections sshd accepted");

    // Nothing left: the same processes, open files and connections, and no more memory than allocator noise.
    assert_eq!(
        after.proxy_processes, before.proxy_processes,
        "proxy processes"
    );
    assert_eq!(after.proxy_fds, before.proxy_fds, "the proxy's open files");
    assert_eq!(after.vm_processes, before.vm_processes, "sshd processes");
    assert_eq!(after.connections_to_vm, 0, "connections to the VM");
    assert_eq!(
        after.state_files, before.state_files,
        "files in the state directory"
    );
    assert!(
        after.proxy_rss_kib - before.proxy_rss_kib <= RSS_GROWTH_LIMIT_KIB,
        "the proxy grew from {} KiB to {} KiB",
        before.proxy_rss_kib,
        after.proxy_rss_kib
    );
}

/// `n` sessions, one after the other.
fn sequential(proxy: SocketAddr, key: &Path, n: usize) {
    for i in 0..n {
        session(proxy, key, i);
    }
}

/// `CONCURRENT` sessions at once.
fn concurrent(proxy: SocketAddr, key: &Path) {
    let barrier = Arc::new(Barrier::new(CONCURRENT));
    let threads: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let (barrier, key) = (barrier.clone(), key.to_owned());
            thread::spawn(move || {
                barrier.wait();
                session(proxy, &key, i);
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a concurrent session failed");
    }
}

/// One session: the `i`th of a run. A raw one reads the VM's identification back and half-closes; every
/// `REAL_LOGIN_EVERY`th is an ssh login running `echo`.
fn session(proxy: SocketAddr, key: &Path, i: usize) {
    if i % REAL_LOGIN_EVERY == REAL_LOGIN_EVERY - 1 {
        let output = run(ssh(proxy, key).arg(format!("echo soak {i}")), PATIENCE);
        assert!(
            output.status.success(),
            "login {i}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("soak {i}\n")
        );
        return;
    }
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"SSH-2.0-soak\r\n").unwrap();
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("SSH-2.0-OpenSSH"), "session {i}: {line:?}");
    // Done: our half-close reaches sshd through the proxy; sshd closes too, and its close reaches us.
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
}

/// Waits until the proxy has recorded `sessions` and sshd has no session process left.
fn settle(proxy: &Proxy, vm: &NsVm, sessions: usize) {
    proxy.wait_for_summary(sessions);
    let started = Instant::now();
    while vm_processes(vm) > 1
        || !instances(proxy).is_empty()
        || !tcp_connections_to(vm.addr()).is_empty()
    {
        assert!(
            started.elapsed() < PATIENCE,
            "still running {PATIENCE:?} after the last summary: {} sshd processes, instances {:?}, {} \
             connections to the VM",
            vm_processes(vm),
            instances(proxy),
            tcp_connections_to(vm.addr()).len()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// What the proxy, the VM and the host hold at one moment.
struct Figures {
    /// The daemon, or systemd-socket-activate and the per-connection instances.
    proxy_processes: usize,
    proxy_fds: usize,
    proxy_rss_kib: i64,
    /// sshd and its session processes.
    vm_processes: usize,
    connections_to_vm: usize,
    /// Files and directories under the state directory.
    state_files: usize,
    host_processes: usize,
    host_open_files: u64,
    host_available_kib: u64,
}

impl Figures {
    fn take(proxy: &Proxy, vm: &NsVm) -> Figures {
        let main = main_process(proxy);
        let file_nr = fs::read_to_string("/proc/sys/fs/file-nr").unwrap();
        Figures {
            proxy_processes: 1 + instances(proxy).len(),
            proxy_fds: fs::read_dir(format!("/proc/{main}/fd")).unwrap().count(),
            proxy_rss_kib: status_field(main, "VmRSS:"),
            vm_processes: vm_processes(vm),
            connections_to_vm: tcp_connections_to(vm.addr()).len(),
            state_files: count_files(&proxy.state_dir),
            host_processes: pids().len(),
            host_open_files: file_nr.split_whitespace().next().unwrap().parse().unwrap(),
            host_available_kib: fs::read_to_string("/proc/meminfo")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
                .unwrap(),
        }
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "proxy: {} processes, {} open files, {} KiB resident, {} state files; VM: {} sshd processes, {} \
             connections to it; host (shared, for reference): {} processes, {} open files, {} MiB available",
            self.proxy_processes,
            self.proxy_fds,
            self.proxy_rss_kib,
            self.state_files,
            self.vm_processes,
            self.connections_to_vm,
            self.host_processes,
            self.host_open_files,
            self.host_available_kib / 1024
        )
    }
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                1 + if e.path().is_dir() {
                    count_files(&e.path())
                } else {
                    0
                }
            })
            .sum()
    })
}

fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

fn status_field(pid: u32, name: &str) -> i64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The daemon, or in the per-connection mode systemd-socket-activate: the process that lives throughout.
fn main_process(proxy: &Proxy) -> u32 {
    let state_dir = format!("--state-dir={}", proxy.state_dir.display());
    pids()
        .into_iter()
        .find(|&pid| {
            let args = cmdline(pid);
            let first = args.first().map(String::as_str);
            args.contains(&state_dir)
                && match proxy.mode {
                    Mode::Daemon => first == Some(binary()) && args.iter().any(|a| a == "daemon"),
                    Mode::Activated => first == Some("systemd-socket-activate"),
                }
        })
        .expect("the proxy's main process")
}

/// The per-connection processes still running.
fn instances(proxy: &Proxy) -> Vec<u32> {
    if proxy.mode == Mode::Daemon {
        return Vec::new();
    }
    let state_dir = format!("--state-dir={}", proxy.state_dir.display());
    pids()
        .into_iter()
        .filter(|&pid| {
            let args = cmdline(pid);
            args.first().map(String::as_str) == Some(binary()) && args.contains(&state_dir)
        })
        .collect()
}

/// sshd and its session processes: everything in its namespace.
fn vm_processes(vm: &NsVm) -> usize {
    vm.ns.pids().len()
}
