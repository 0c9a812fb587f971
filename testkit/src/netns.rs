//! Network namespaces of the tests' own, each joined to the host by a veth pair: the faults loopback cannot
//! make. A peer whose link goes down, or whose packets are dropped, vanishes without a FIN or an RST; one whose
//! stack aborts its connections resets them.
//!
//! Each namespace gets a /30 of 10.199.0.0/16, claimed under a lock file so that test processes running at
//! once never share one: the host's end of the veth pair is `.1`, the namespace's `.2`. Nothing but loopback
//! and these addresses is ever connected to. Dropping a [`Netns`] kills what runs in it and deletes it, which
//! deletes its veth pair too, panics included; namespaces left by a test process that was killed are deleted
//! by the next one.

use std::{
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use socket2::{Domain, Socket, TcpKeepalive, Type};
use tempfile::TempDir;

use super::{log::Log, vm};

/// Namespace names are `PREFIX<pid>-<n>`: unique per test process and per namespace within it.
const PREFIX: &str = "sodf-";
/// Held while a subnet is chosen and its host end configured.
const LOCK: &str = "/run/lock/ssh-on-demand-tests-netns.lock";

/// A network namespace with one veth pair to the host.
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    /// The host's end of the veth pair: what the namespace reaches the host at.
    pub host_ip: Ipv4Addr,
    /// The namespace's end: what the host reaches the namespace at.
    pub ns_ip: Ipv4Addr,
}

impl Netns {
    pub fn new() -> Netns {
        super::require_root();
        static SWEEP: Once = Once::new();
        SWEEP.call_once(delete_orphans);
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("{PREFIX}{pid}-{n}");
        // Interface names have at most 15 bytes.
        let host_if = format!("sf{pid}n{n}h");
        let ns_if = format!("sf{pid}n{n}c");
        ip(&["netns", "add", &name]);
        // From here on, Drop cleans up whatever was made.
        let mut netns = Netns {
            name,
            host_if,
            ns_if,
            host_ip: Ipv4Addr::UNSPECIFIED,
            ns_ip: Ipv4Addr::UNSPECIFIED,
        };
        ip(&[
            "link",
            "add",
            &netns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &netns.ns_if,
            "netns",
            &netns.name,
        ]);
        {
            let lock = lock();
            let (host_ip, ns_ip) = free_subnet();
            ip(&[
                "addr",
                "add",
                &format!("{host_ip}/30"),
                "dev",
                &netns.host_if,
            ]);
            drop(lock);
            netns.host_ip = host_ip;
            netns.ns_ip = ns_ip;
        }
        ip(&["link", "set", &netns.host_if, "up"]);
        let n = netns.name.clone();
        ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{}/30", netns.ns_ip),
            "dev",
            &netns.ns_if,
        ]);
        ip(&["-n", &n, "link", "set", &netns.ns_if, "up"]);
        ip(&["-n", &n, "link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `program args` inside the namespace and returns its output; panics if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        super::output_ok(self.command(program).args(args))
    }

    /// The namespace's end of the link goes down: whatever it sends or is sent is lost, without a word.
    pub fn link_down(&self) {
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"]);
    }

    /// Every IP packet into or out of the namespace is dropped (nftables): a peer that vanished.
    pub fn drop_everything(&self) {
        self.nft(
            "table inet fault {\n\
               chain in { type filter hook input priority 0; policy drop; }\n\
               chain out { type filter hook output priority 0; policy drop; }\n\
             }\n",
        );
    }

    /// The namespace's TCP stack aborts its connections from or to `port` (`ss -K`), sending an RST each: a
    /// VM that reset them.
    pub fn reset_connections(&self, port: u16) {
        let filter = format!("( sport = :{port} or dport = :{port} )");
        self.run("ss", &["-K", "-t", &filter]);
    }

    fn nft(&self, ruleset: &str) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rules.nft");
        fs::write(&file, ruleset).unwrap();
        self.run("nft", &["-f", file.to_str().unwrap()]);
    }

    /// A listening socket on the host's end of the link, for clients inside the namespace, with TCP keep-alive
    /// as a socket unit would set it (`KeepAliveTimeSec=`, `KeepAliveIntervalSec=`, `KeepAliveProbes=`):
    /// connections accepted from it inherit it.
    pub fn listener_for_clients(
        &self,
        keepalive: Option<(Duration, Duration, u32)>,
    ) -> TcpListener {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        if let Some((idle, interval, probes)) = keepalive {
            let keepalive = TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(probes);
            socket.set_tcp_keepalive(&keepalive).unwrap();
        }
        socket
            .bind(&SocketAddr::from((self.host_ip, 0)).into())
            .unwrap();
        socket.listen(128).unwrap();
        socket.into()
    }

    /// The processes running in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let output = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Only processes this test started run in its namespace (sshd and its sessions, clients).
        for pid in self.pids() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        // Gone with the namespace's end, unless the namespace was never joined to it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// An OpenSSH sshd in a namespace of its own: a VM whose network the test controls. On the VMs' port
/// ([`vm::port`]) like the others, so that the proxies find it there.
pub struct NsVm {
    sshd: Child,
    log: Log,
    dir: TempDir,
    /// Dropped after sshd is killed (fields drop in order, after `Drop::drop`).
    pub ns: Netns,
}

impl NsVm {
    pub fn start() -> NsVm {
        NsVm::start_with("")
    }

    /// With `config` first in sshd_config (sshd takes the first value of each keyword).
    pub fn start_with(config: &str) -> NsVm {
        let ns = Netns::new();
        let dir = vm::sshd_dir((ns.ns_ip, vm::port()).into(), config);
        let (sshd, log) = vm::spawn_sshd(ns.command("/usr/sbin/sshd"), dir.path(), "ns sshd");
        NsVm { sshd, log, dir, ns }
    }

    pub fn addr(&self) -> SocketAddr {
        (self.ns.ns_ip, vm::port()).into()
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    pub fn log(&self) -> &Log {
        &self.log
    }
}

impl Drop for NsVm {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

/// `ssh` with the tests' usual options (nothing of ~/.ssh touched), run inside `ns`, to `addr`.
pub fn ssh_in(ns: &Netns, addr: SocketAddr, key: &Path) -> Command {
    super::ssh::ssh_with(ns.command("ssh"), addr, key)
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running ip (apt-get install iproute2)");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The lock under which subnets are chosen, across test processes; released when dropped.
fn lock() -> File {
    fs::create_dir_all(Path::new(LOCK).parent().unwrap()).unwrap();
    let file = File::create(LOCK).unwrap();
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
    file
}

/// A /30 of 10.199.0.0/16 that no interface of the host uses and no route covers: (host end, namespace end).
fn free_subnet() -> (Ipv4Addr, Ipv4Addr) {
    let text = |args: &[&str]| {
        let output = Command::new("ip").args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let used =
        text(&["-4", "-o", "addr", "show"]) + &text(&["-4", "route", "show", "table", "all"]);
    for _ in 0..1000 {
        let (c, d) = (fastrand::u8(..), fastrand::u8(..64) * 4);
        let taken = (0..4).any(|k| {
            let addr = format!("10.199.{c}.{}", d + k);
            used.split(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
                .any(|word| word == addr)
        });
        if !taken {
            return (
                Ipv4Addr::new(10, 199, c, d + 1),
                Ipv4Addr::new(10, 199, c, d + 2),
            );
        }
    }
    panic!("no free /30 in 10.199.0.0/16");
}

/// Namespaces of test processes that no longer run (killed before their Drop ran).
fn delete_orphans() {
    let output = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Connections of this host (its network namespace) to `addr` in any state but TIME_WAIT.
pub fn tcp_connections_to(addr: SocketAddr) -> Vec<String> {
    let SocketAddr::V4(addr) = addr else {
        unreachable!("IPv4 only here")
    };
    let wanted = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(addr.ip().octets()),
        addr.port()
    );
    fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2) == Some(&wanted.as_str()) && fields.get(3) != Some(&"06")
        })
        .map(str::to_owned)
        .collect()
}
