//! ssh-on-demand, launched per connection by `systemd-socket-activate` exactly as systemd does with
//! `Accept=yes`: the connection on fd 0 and 1 (`--inetd`, like `StandardInput=socket`), or as fd 3 with
//! `LISTEN_FDS=1`.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::OwnedFd,
    process::{Child, Command, Stdio},
    time::Duration,
};

use command_fds::{CommandFdExt, FdMapping};
use socket2::{Domain, Socket, Type};

use super::{PATIENCE, log::Log};

pub const BINARY: &str = env!("CARGO_BIN_EXE_ssh-on-demand");

/// How the connection is handed over.
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
    dual_stack: bool,
    config: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    handover: Handover,
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

    pub fn start(self) -> Proxy {
        // Bound here on port 0 and inherited by systemd-socket-activate through LISTEN_FDS, so no fixed
        // port and no wait for the proxy to listen.
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
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec systemd-socket-activate "$@""#)
            .arg("sh");
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
        command
            .arg(BINARY)
            .arg(format!("--config={}", self.config))
            .args(&self.args);
        command
            .fd_mappings(vec![FdMapping {
                parent_fd: OwnedFd::from(listener),
                child_fd: 3,
            }])
            .unwrap();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting systemd-socket-activate (apt-get install systemd)");
        let log = Log::collect(child.stderr.take().unwrap(), "proxy");
        Proxy { addr, child, log }
    }
}

/// The listening socket, and what the instances log on stderr.
pub struct Proxy {
    pub addr: SocketAddr,
    child: Child,
    pub log: Log,
}

impl Proxy {
    /// Instances of ssh-on-demand use the start API at `api_url`, log at debug level to stderr, and run
    /// with a boot deadline long enough for any test machine.
    pub fn builder(api_url: &str) -> ProxyBuilder {
        ProxyBuilder {
            dual_stack: false,
            config: "/dev/null".into(),
            args: vec!["--api-url".into(), api_url.into()],
            env: vec![("SSH_ON_DEMAND_LOG_LEVEL".into(), "debug".into())],
            handover: Handover::Inetd,
        }
    }

    pub fn start(api_url: &str) -> Proxy {
        Proxy::builder(api_url).start()
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

    /// Waits until systemd-socket-activate reports that an instance exited; `limit` is part of the test.
    pub fn wait_for_instance_exit(&self, limit: Duration) -> Option<String> {
        self.log
            .try_wait_for(limit, |l| l.contains(" died with code "))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn summaries(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains("message_id="))
        .cloned()
        .collect()
}
