//! ssh-on-demand as systemd runs it, in either mode: per connection under `systemd-socket-activate --accept`
//! exactly as with `Accept=yes` (the connection on fd 0 and 1 like `StandardInput=socket`, or as fd 3 with
//! `LISTEN_FDS=1`), or as one daemon that inherits its listening sockets through `LISTEN_FDS` (`Accept=no`).

use std::{
    net::{SocketAddr, TcpListener},
    os::{fd::OwnedFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::OnceLock,
    time::Duration,
};

use command_fds::{CommandFdExt, FdMapping};
use rustix::process::{Pid, Signal};
use socket2::{Domain, Socket, Type};
use ssh_on_demand::report::SUMMARY_MESSAGE_ID;
use tempfile::TempDir;

use super::{
    PATIENCE,
    log::{Log, spawn_logged},
};

/// ssh-on-demand as `cargo test` built it.
pub fn binary() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| super::workspace_binary("ssh-on-demand"))
}
const LOOPBACK_VMS: &str = "--vm-network=127.0.0.0/8";

/// Whether a proxy's log line says that a connection has its VM's address: from the start API, from another
/// connection's start, or from the VM's record, for a client that said nothing within the short wait a VM
/// that runs (or boots) gets: under load, an ssh client can be that slow, and it is served all the same.
pub fn found_its_vm(line: &str) -> bool {
    [
        "start API answered",
        "sharing another connection's start",
        "relaying a client that waits for the server to its running VM",
    ]
    .iter()
    .any(|said| line.contains(said))
}

/// The two ways to run ssh-on-demand; the tests that users see the same in both run in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One process per connection (`Accept=yes`).
    Activated,
    /// One process for all connections (`Accept=no`).
    Daemon,
}

/// How the connection is handed over in the per-connection mode.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// fd 0 and fd 1, stderr inherited (our pipe).
    Inetd,
    /// fd 0, fd 1 *and* fd 2 are the connection: a unit that forgot `StandardError=journal`.
    InetdWithStderrOnSocket,
    /// fd 3 with `LISTEN_FDS=1` (Accept=yes without StandardInput=socket).
    ListenFds,
}

pub struct ProxyBuilder {
    mode: Mode,
    dual_stack: bool,
    config: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    handover: Handover,
    state_dir: Option<PathBuf>,
    extra: Vec<(TcpListener, Option<String>)>,
}

impl ProxyBuilder {
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for each instance (systemd-socket-activate passes only what it is told).
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    /// The TOML file instances read; /dev/null unless set, so that /etc/ssh-on-demand never leaks in.
    pub fn config(mut self, path: impl Into<String>) -> Self {
        self.config = path.into();
        self
    }

    /// Listens like `ListenStream=22` does by default: an IPv6 socket that also takes IPv4 connections, whose
    /// peers then show as IPv4-mapped IPv6 addresses (::ffff:127.0.0.1). Bound to that mapped loopback
    /// address only, not to every address.
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    pub fn handover(mut self, handover: Handover) -> Self {
        self.handover = handover;
        self
    }

    /// No `--api-url` on the command line, where it would win over the configuration file's.
    pub fn without_api_url(mut self) -> Self {
        self.args.drain(..2);
        self
    }

    /// The default `vm_networks`, which refuses loopback VMs.
    pub fn default_vm_networks(mut self) -> Self {
        self.args.retain(|arg| arg != LOOPBACK_VMS);
        self
    }

    /// Shares the VMs' state with other proxies given the same directory (it must outlive them).
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_owned());
        self
    }

    /// One more listening socket, for a profile's port; in the daemon named `name` (`FileDescriptorName=`).
    pub fn listener(mut self, listener: TcpListener, name: Option<&str>) -> Self {
        self.extra.push((listener, name.map(str::to_owned)));
        self
    }

    pub fn start(self) -> Proxy {
        // Bound here on port 0 and inherited through LISTEN_FDS, so no fixed port and no wait for the proxy
        // to listen: connections wait in the backlog until it accepts.
        let listener = if self.dual_stack {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
            socket.set_only_v6(false).unwrap();
            socket
                .bind(&"[::ffff:127.0.0.1]:0".parse::<SocketAddr>().unwrap().into())
                .unwrap();
            socket.listen(128).unwrap();
            TcpListener::from(socket)
        } else {
            TcpListener::bind("127.0.0.1:0").unwrap()
        };
        let addr = SocketAddr::new([127, 0, 0, 1].into(), listener.local_addr().unwrap().port());
        let (state, state_dir) = match self.state_dir {
            Some(dir) => (None, dir),
            None => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().to_owned();
                (Some(dir), path)
            }
        };
        let listeners: Vec<(TcpListener, Option<String>)> =
            [(listener, None)].into_iter().chain(self.extra).collect();
        let names: Vec<String> = listeners
            .iter()
            .map(|(_, name)| name.clone().unwrap_or_else(|| "default".to_owned()))
            .collect();

        let mut command = Command::new("sh");
        command.arg("-c").arg(format!(
            r#"LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={} exec "$@""#,
            listeners.len(),
            names.join(":")
        ));
        command.arg("sh");
        match self.mode {
            Mode::Activated => {
                command.arg("systemd-socket-activate");
                match self.handover {
                    Handover::Inetd | Handover::InetdWithStderrOnSocket => {
                        command.args(["--accept", "--inetd"]);
                    }
                    Handover::ListenFds => {
                        command.arg("--accept");
                    }
                }
                for (name, value) in &self.env {
                    command.arg(format!("-E{name}={value}"));
                }
                command.arg("--");
                if self.handover == Handover::InetdWithStderrOnSocket {
                    command.args(["sh", "-c", r#"exec "$0" "$@" 2>&1"#]);
                }
                command.arg(binary());
            }
            Mode::Daemon => {
                command.arg(binary()).arg("daemon");
                // The test reads the records on stderr. The daemon inherits our environment, and with it the
                // INVOCATION_ID of a CI runner that systemd started, which would send them to the journal.
                command.env("SSH_ON_DEMAND_LOG_TARGET", "stderr");
                command.envs(self.env.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            }
        }
        command
            .arg(format!("--config={}", self.config))
            .arg(format!("--state-dir={}", state_dir.display()))
            .args(&self.args);
        let mappings = listeners
            .into_iter()
            .enumerate()
            .map(|(i, (listener, _))| FdMapping {
                parent_fd: OwnedFd::from(listener),
                child_fd: 3 + i as i32,
            })
            .collect();
        command.fd_mappings(mappings).unwrap();
        // Its own process group, so that dropping the proxy ends every process it started (instances waiting
        // out an idle timeout included) and nothing else.
        command.process_group(0);
        let (child, log) = spawn_logged(
            &mut command,
            "proxy",
            "systemd-socket-activate (apt-get install systemd)",
        );
        Proxy {
            addr,
            args: self.args,
            mode: self.mode,
            child,
            log,
            state_dir,
            _state: state,
        }
    }
}

/// The listening socket, and what the instances log on stderr.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The settings it was given on its command line.
    pub args: Vec<String>,
    pub mode: Mode,
    child: Child,
    pub log: Log,
    pub state_dir: PathBuf,
    _state: Option<TempDir>,
}

impl Proxy {
    /// Per connection, using the start API at `api_url`, logging at debug level to stderr, with a boot
    /// deadline long enough for any test machine.
    pub fn builder(api_url: &str) -> ProxyBuilder {
        ProxyBuilder {
            mode: Mode::Activated,
            dual_stack: false,
            config: "/dev/null".into(),
            // The VMs are 127.x.y.z addresses, which ssh-on-demand only connects to when told to, and their
            // sshd is on the test process's VM port, not 22.
            args: vec![
                "--api-url".into(),
                api_url.into(),
                LOOPBACK_VMS.into(),
                format!("--vm-port={}", super::vm::port()),
            ],
            env: vec![("SSH_ON_DEMAND_LOG_LEVEL".into(), "debug".into())],
            handover: Handover::Inetd,
            state_dir: None,
            extra: Vec::new(),
        }
    }

    /// The same in `mode`.
    pub fn builder_in(mode: Mode, api_url: &str) -> ProxyBuilder {
        ProxyBuilder {
            mode,
            ..Proxy::builder(api_url)
        }
    }

    pub fn start(api_url: &str) -> Proxy {
        Proxy::builder(api_url).start()
    }

    pub fn start_in(mode: Mode, api_url: &str) -> Proxy {
        Proxy::builder_in(mode, api_url).start()
    }

    /// The summary records written so far (one per finished connection).
    pub fn summaries(&self) -> Vec<String> {
        summaries(&self.log.lines())
    }

    /// Waits for the `n`th summary record and returns it.
    pub fn wait_for_summary(&self, n: usize) -> String {
        self.log
            .wait_until(PATIENCE, |lines| summaries(lines).get(n - 1).cloned())
    }

    /// Waits up to `limit` for the `n`th summary record; `limit` is part of the test.
    pub fn try_wait_for_summary(&self, n: usize, limit: Duration) -> Option<String> {
        self.log
            .try_wait_until(limit, |lines| summaries(lines).get(n - 1).cloned())
    }

    /// `ssh-on-demand status --json` with this proxy's settings: its state directory, or its etcd store.
    pub fn status(&self) -> serde_json::Value {
        status_with(&self.state_dir, &self.args)
    }

    /// `ssh-on-demand sweep` with this proxy's settings, as ssh-on-demand-sweep.timer runs it.
    pub fn sweep(&self) {
        super::output_ok(
            Command::new(binary())
                .args(["sweep", "--config=/dev/null"])
                .arg(format!("--state-dir={}", self.state_dir.display()))
                .args(&self.args),
        );
    }

    /// Sends `signal` to the daemon (or to systemd-socket-activate).
    pub fn signal(&self, signal: Signal) {
        rustix::process::kill_process(Pid::from_child(&self.child), signal).unwrap();
    }

    /// Waits up to `limit` for the daemon to exit; `limit` is part of the test.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        use wait_timeout::ChildExt;
        self.child.wait_timeout(limit).unwrap()
    }
}

/// `ssh-on-demand status --json` of `state_dir`, as an operator would run it.
pub fn status(state_dir: &Path) -> serde_json::Value {
    status_with(state_dir, &[])
}

/// The same with more settings (a proxy's own, to read its etcd store).
pub fn status_with(state_dir: &Path, args: &[String]) -> serde_json::Value {
    let output = super::output_ok(
        Command::new(binary())
            .args(["status", "--json", "--config=/dev/null"])
            .arg(format!("--state-dir={}", state_dir.display()))
            .args(args),
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let group = Pid::from_child(&self.child);
        let _ = rustix::process::kill_process_group(group, Signal::KILL);
        let _ = self.child.wait();
    }
}

fn summaries(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains(&format!("message_id=\"{SUMMARY_MESSAGE_ID}\"")))
        .cloned()
        .collect()
}
