//! A real etcd cluster (Debian's `etcd-server`): three members on loopback ports, started, killed and
//! restarted by the tests, with fast elections so that a lost member or quorum shows in a second.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tempfile::TempDir;

use super::{
    PATIENCE,
    log::{Log, spawn_logged},
};

/// Raft timing for tests: a leader is elected within about a second of quorum. A lease's TTL cannot go
/// below 1.5 election timeouts, so leases of 2 s keep their TTL.
const HEARTBEAT_MS: u32 = 50;
const ELECTION_MS: u32 = 500;

pub struct Cluster {
    dir: TempDir,
    token: String,
    members: Vec<Member>,
    tls: Option<Tls>,
}

/// The files of a cluster that speaks TLS and asks its clients for a certificate.
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
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
        Cluster::start_with(n, false)
    }

    /// One member that speaks only TLS and asks clients for a certificate signed by its CA.
    pub fn start_tls() -> Cluster {
        Cluster::start_with(1, true)
    }

    fn start_with(n: usize, tls: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls.then(|| Tls::make(dir.path()));
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
            tls,
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The CA and the client certificate and key, for a cluster that speaks TLS.
    pub fn tls(&self) -> &Tls {
        self.tls.as_ref().expect("a cluster with TLS")
    }

    /// `etcdctl ARGS` against the first member (before `auth enable`: it passes no user).
    pub fn etcdctl(&self, args: &[&str]) {
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints()[0]))
            .args(
                self.tls
                    .as_ref()
                    .map(|t| t.etcdctl_args())
                    .unwrap_or_default(),
            )
            .args(args)
            .output()
            .expect("etcdctl (apt-get install etcd-client)");
        assert!(
            output.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A user `name` with `password` that may read and write the proxies' keys, and auth enabled (with a
    /// root user, which etcd needs for that).
    pub fn add_user(&self, name: &str, password: &str) {
        self.etcdctl(&["user", "add", "root:rootpw"]);
        self.etcdctl(&["user", "add", &format!("{name}:{password}")]);
        self.etcdctl(&["role", "add", "proxies"]);
        self.etcdctl(&[
            "role",
            "grant-permission",
            "proxies",
            "--prefix=true",
            "readwrite",
            "/ssh-on-demand/",
        ]);
        self.etcdctl(&["user", "grant-role", name, "proxies"]);
        self.etcdctl(&["auth", "enable"]);
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
        let client = match &self.tls {
            Some(_) => client.replace("http://", "https://"),
            None => client,
        };
        let mut etcd = Command::new("etcd");
        if let Some(tls) = &self.tls {
            etcd.arg(format!("--cert-file={}", tls.server_cert.display()))
                .arg(format!("--key-file={}", tls.server_key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg("--client-cert-auth");
        }
        etcd.arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
            .arg(format!("--election-timeout={ELECTION_MS}"));
        let (child, log) = spawn_logged(&mut etcd, "etcd", "etcd (apt-get install etcd-server)");
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

impl Tls {
    /// A CA, a certificate for 127.0.0.1 that the member serves, and a client certificate for the proxies.
    fn make(dir: &Path) -> Tls {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "ssh-on-demand test etcd CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            fs::write(&path, text).unwrap();
            path
        };
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client.distinguished_name.push(DnType::CommonName, "proxy");
        let client = client.signed_by(&client_key, &issuer).unwrap();
        Tls {
            ca: write("ca.pem", ca_cert.pem()),
            cert: write("client.pem", client.pem()),
            key: write("client.key", client_key.serialize_pem()),
            server_cert: write("server.pem", server.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
        }
    }

    /// `--etcd-ca-file=…` and the client certificate and key, as a proxy is given them.
    pub fn args(&self) -> Vec<String> {
        vec![
            format!("--etcd-ca-file={}", self.ca.display()),
            format!("--etcd-cert-file={}", self.cert.display()),
            format!("--etcd-key-file={}", self.key.display()),
        ]
    }

    fn etcdctl_args(&self) -> Vec<String> {
        vec![
            format!("--cacert={}", self.ca.display()),
            format!("--cert={}", self.cert.display()),
            format!("--key={}", self.key.display()),
        ]
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
