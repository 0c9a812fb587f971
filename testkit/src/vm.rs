//! The "VM": a real OpenSSH sshd on its own loopback address, started when the test's start API says so.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::Duration,
};

use tempfile::TempDir;

use super::{PATIENCE, log::Log};

/// A handle on one sshd; clones share it. Dropping the last handle stops sshd.
#[derive(Clone)]
pub struct Vm {
    inner: Arc<Inner>,
}

struct Inner {
    ip: Ipv4Addr,
    port: u16,
    dir: TempDir,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    booting: bool,
    sshd: Option<(Child, Log)>,
}

/// The port of every VM of this test process (each has its own address), and the `--vm-port` of every
/// proxy it starts: the start APIs need not name it, as a real one need not name 22.
pub fn port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(super::reserved_port)
}

impl Vm {
    /// An sshd on [`port`] of a fresh 127.x.y.z address, configured but not started.
    pub fn new() -> Vm {
        Vm::with_port(port())
    }

    /// On another port than the proxies expect: for the start API's answer to name.
    pub fn with_port(port: u16) -> Vm {
        // Each VM gets its own address, so tests running in parallel never share one, even on the same port.
        let ip = Ipv4Addr::new(
            127,
            fastrand::u8(100..200),
            fastrand::u8(1..255),
            fastrand::u8(1..255),
        );
        Vm::at_port(ip, port)
    }

    /// An sshd on [`port`] of `ip`, a loopback address the platform chose (e.g. a DHCP lease), configured but
    /// not started.
    pub fn at(ip: Ipv4Addr) -> Vm {
        Vm::at_port(ip, port())
    }

    fn at_port(ip: Ipv4Addr, port: u16) -> Vm {
        assert!(
            ip.is_loopback(),
            "{ip}: the VM's sshd listens on loopback only"
        );
        super::require_root();
        let dir = sshd_dir(
            (ip, port).into(),
            "AllowTcpForwarding yes\nSubsystem sftp /usr/lib/openssh/sftp-server\n",
        );
        Vm {
            inner: Arc::new(Inner {
                ip,
                port,
                dir,
                state: Mutex::default(),
            }),
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.inner.ip
    }

    pub fn addr(&self) -> SocketAddr {
        (self.inner.ip, self.inner.port).into()
    }

    /// A scratch directory on the "VM" (the same filesystem as the test).
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// The private key the VM's sshd accepts for root.
    pub fn client_key(&self) -> PathBuf {
        self.dir().join("client_key")
    }

    /// Starts sshd and returns once it listens (it says so on stderr).
    pub fn start(&self) {
        let mut state = self.inner.state.lock().unwrap();
        if state.sshd.is_some() {
            return;
        }
        let (child, log) = spawn_sshd(Command::new("/usr/sbin/sshd"), self.dir(), "sshd");
        state.sshd = Some((child, log));
    }

    /// Starts sshd `delay` from now, in the background, the way a VM boots after its start API answered.
    /// Later calls do nothing.
    pub fn boot_after(&self, delay: Duration) {
        {
            let mut state = self.inner.state.lock().unwrap();
            if state.booting || state.sshd.is_some() {
                return;
            }
            state.booting = true;
        }
        let vm = self.clone();
        thread::spawn(move || {
            thread::sleep(delay); // the VM's boot time, not a synchronisation
            vm.start();
        });
    }

    /// Stops sshd, as a VM's shutdown would; a later start or boot brings it back.
    pub fn stop(&self) {
        let mut state = self.inner.state.lock().unwrap();
        state.booting = false;
        if let Some((mut child, _)) = state.sshd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// sshd runs.
    pub fn is_up(&self) -> bool {
        self.inner.state.lock().unwrap().sshd.is_some()
    }

    /// Connections sshd has accepted so far (from its VERBOSE log).
    pub fn connections(&self) -> usize {
        let state = self.inner.state.lock().unwrap();
        state.sshd.as_ref().map_or(0, |(_, log)| {
            log.lines()
                .iter()
                .filter(|l| l.contains("Connection from"))
                .count()
        })
    }

    pub fn log(&self) -> Option<Log> {
        let state = self.inner.state.lock().unwrap();
        state.sshd.as_ref().map(|(_, log)| log.clone())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some((mut child, _)) = self.state.get_mut().unwrap().sshd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A directory holding host and client keys, `authorized_keys` for the client key, and an `sshd_config` for
/// root logins on `listen`, with `first` lines before the rest (sshd takes the first value of each keyword).
pub fn sshd_dir(listen: SocketAddr, first: &str) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    keygen(&dir.path().join("host_key"));
    keygen(&dir.path().join("client_key"));
    fs::copy(
        dir.path().join("client_key.pub"),
        dir.path().join("authorized_keys"),
    )
    .unwrap();
    let d = dir.path().display();
    fs::write(
        dir.path().join("sshd_config"),
        format!(
            "{first}ListenAddress {listen}\n\
             HostKey {d}/host_key\n\
             PidFile none\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             StrictModes no\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             MaxStartups 200:30:400\n\
             LogLevel VERBOSE\n"
        ),
    )
    .unwrap();
    dir
}

/// Runs `sshd` (the program, or it run in a namespace) with `dir`'s sshd_config, and returns once it listens.
pub fn spawn_sshd(mut sshd: Command, dir: &Path, name: &'static str) -> (Child, Log) {
    // sshd refuses to start without its privilege separation directory, which a fresh machine lacks.
    fs::create_dir_all("/run/sshd").unwrap();
    let mut child = sshd
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting /usr/sbin/sshd (apt-get install openssh-server)");
    let log = Log::collect(child.stderr.take().unwrap(), name);
    let line = log.wait_for(PATIENCE, |l| {
        l.contains("Server listening on") || l.contains("Cannot bind") || l.contains("fatal")
    });
    assert!(line.contains("Server listening on"), "sshd failed: {line}");
    (child, log)
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("running ssh-keygen");
    assert!(status.success());
}
