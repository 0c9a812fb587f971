//! A real etcd cluster (Debian's `etcd-server`): three members on loopback ports, started, killed and
//! restarted by the tests, with fast elections so that a lost member or quorum shows in a second.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use tempfile::TempDir;

use super::{PATIENCE, log::Log};

/// Raft timing for tests: a leader is elected within about a second of quorum. A lease's TTL cannot go
/// below 1.5 election timeouts, so leases of 2 s keep their TTL.
const HEARTBEAT_MS: u32 = 50;
const ELECTION_MS: u32 = 500;

pub struct Cluster {
    dir: TempDir,
    token: String,
    members: Vec<Member>,
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    process: Option<(Child, Log)>,
}

impl Cluster {
    /// `n` members, all started; returns once each serves clients.
    pub fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                process: None,
            })
            .collect();
        let mut cluster = Cluster {
            dir,
            token: format!("ssh-on-demand-test-{}", fastrand::u64(..)),
            members,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_serving(i);
        }
        cluster
    }

    /// The client URLs of every member, running or not, as a proxy is configured with them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// `--etcd-endpoint=…` for each member.
    pub fn endpoint_args(&self) -> Vec<String> {
        self.endpoints()
            .into_iter()
            .map(|e| format!("--etcd-endpoint={e}"))
            .collect()
    }

    /// Kills member `i` (SIGKILL, as a crash or a power cut would).
    pub fn kill(&mut self, i: usize) {
        if let Some((mut child, _)) = self.members[i].process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data; returns once it serves clients, which needs a quorum.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Waits until member `i` says it serves clients (after it joined a cluster with a leader).
    pub fn wait_serving(&self, i: usize) {
        let (_, log) = self.members[i].process.as_ref().expect("member runs");
        log.wait_for(PATIENCE, |l| l.contains("ready to serve client requests"));
    }

    /// `etcdctl get PREFIX --prefix --keys-only` against the running members.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.process.is_some())
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect();
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["get", prefix, "--prefix", "--keys-only"])
            .output()
            .expect("etcdctl (apt-get install etcd-client)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let member = &self.members[i];
        let data: PathBuf = self.dir.path().join(&member.name);
        let client = format!("http://127.0.0.1:{}", member.client);
        let peer = format!("http://127.0.0.1:{}", member.peer);
        let mut child = Command::new("etcd")
            .arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
            .arg(format!("--election-timeout={ELECTION_MS}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting etcd (apt-get install etcd-server)");
        let log = Log::collect(child.stderr.take().unwrap(), "etcd");
        self.members[i].process = Some((child, log));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A port nothing listens on now. etcd must be given its ports, so the test picks them: the kernel's next
/// ephemeral port, released at once (no other test binds ports explicitly, so nothing takes it meanwhile).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
