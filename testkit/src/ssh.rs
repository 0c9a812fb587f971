//! The OpenSSH client, unmodified: the same options any user with a key would pass.

use std::{
    io::Read,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Output, Stdio},
    thread,
    time::Duration,
};

use wait_timeout::ChildExt;

/// Options that keep the client from touching ~/.ssh; nothing that changes what it prints or sends.
const OPTIONS: [&str; 8] = [
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
];

/// `ssh -p PORT root@127.0.0.1` through the proxy at `proxy`, logging in with `key`. Append the command.
pub fn ssh(proxy: SocketAddr, key: &Path) -> Command {
    ssh_with(Command::new("ssh"), proxy, key)
}

/// `ssh` (the program, or it run in a namespace) with the same options and arguments as [`ssh`].
pub fn ssh_with(mut command: Command, proxy: SocketAddr, key: &Path) -> Command {
    command
        .args(OPTIONS)
        .arg("-i")
        .arg(key)
        .args(["-p", &proxy.port().to_string()])
        .arg(format!("root@{}", proxy.ip()));
    command
}

/// Starts `command` (an [`ssh`] or [`ssh_with`]) running `true` and printing nothing: a login for a test to
/// cut off midway, by killing the client or its network, and to watch what the proxy does then.
pub fn spawn_login(mut command: Command) -> Child {
    command
        .arg("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting ssh")
}

/// `scp -P PORT` through the proxy; append the source and `root@127.0.0.1:PATH`.
pub fn scp(proxy: SocketAddr, key: &Path) -> Command {
    let mut command = Command::new("scp");
    command
        .args(OPTIONS)
        .arg("-q")
        .arg("-i")
        .arg(key)
        .args(["-P", &proxy.port().to_string()]);
    command
}

/// Logins at once, each in a thread of its own: the `i`th goes through the proxy at `via(i)` and runs
/// `echo i`, for `limit` at most.
pub struct Burst(Vec<thread::JoinHandle<Output>>);

impl Burst {
    pub fn start(
        count: usize,
        key: &Path,
        limit: Duration,
        via: impl Fn(usize) -> SocketAddr,
    ) -> Burst {
        Burst(
            (0..count)
                .map(|i| {
                    let (proxy, key) = (via(i), key.to_owned());
                    thread::spawn(move || run(ssh(proxy, &key).arg(format!("echo {i}")), limit))
                })
                .collect(),
        )
    }

    /// Waits for every login: each worked and printed its number.
    pub fn assert_all_in(self) {
        for (i, login) in self.0.into_iter().enumerate() {
            let output = login.join().unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{i}\n"));
        }
    }
}

/// A login that the proxy at `proxy` must refuse: what the user read (ssh's stderr, which says the
/// proxy disconnected), and how long it took from ssh's start.
pub fn refused_login(proxy: SocketAddr) -> (String, Duration) {
    let started = std::time::Instant::now();
    let output = run(ssh(proxy, throwaway_key()).arg("true"), super::PATIENCE);
    let took = started.elapsed();
    let seen = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(255), "{seen}");
    assert!(seen.contains("Received disconnect from"), "{seen}");
    (seen, took)
}

/// A key for logins that never get as far as authenticating.
fn throwaway_key() -> &'static Path {
    static KEY: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    let (_, path) = KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        (dir, path)
    });
    path
}

/// Logs in through the proxy at `proxy`, runs `echo WORD`, and checks that the login worked and the output
/// came back.
pub fn assert_echo(proxy: SocketAddr, key: &Path, word: &str) {
    let output = run(ssh(proxy, key).arg(format!("echo {word}")), super::PATIENCE);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{word}\n"));
}

/// An ssh session through a proxy that stays open until closed: its shell says "ready", then waits for its
/// stdin to close. Dropping it kills ssh.
pub struct Session {
    child: std::process::Child,
    stderr: super::log::Log,
}

impl Session {
    /// Logs in through `proxy` with `key` (and `args`, such as `-b 127.0.0.2`) and waits until the shell runs.
    pub fn open(proxy: SocketAddr, key: &Path, args: &[&str]) -> Session {
        Session::start(ssh(proxy, key).args(args))
    }

    /// The same with an ssh command of the caller's (in a network namespace, say).
    pub fn start(command: &mut Command) -> Session {
        let mut child = command
            .arg("echo ready; exec cat >/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = super::log::Log::collect(child.stdout.take().unwrap(), "session");
        let stderr = super::log::Log::collect(child.stderr.take().unwrap(), "session stderr");
        out.wait_for(super::PATIENCE, |l| l == "ready");
        Session { child, stderr }
    }

    /// Waits up to `limit` for ssh to exit by the other side's doing, as it does when its connection is
    /// cut (status 255); what it printed on stderr.
    pub fn wait_ended(&mut self, limit: Duration) -> Option<String> {
        let status = self.child.wait_timeout(limit).unwrap()?;
        assert_eq!(status.code(), Some(255), "ssh: {status}");
        // stderr is complete once ssh's pipe closed; ssh closed it when it exited.
        self.stderr.try_wait_until(super::PATIENCE, |_| None::<()>);
        Some(self.stderr.lines().join("\n"))
    }

    /// Logs out, and returns when ssh has exited the moment the logout began: the session ended after it.
    pub fn close(mut self) -> std::time::Instant {
        let began = std::time::Instant::now();
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "ssh: {status}");
        began
    }

    /// Waits, up to `limit`, for ssh to end by the other side's doing (its proxy killed or stopped).
    pub fn wait_closed(mut self, limit: Duration) {
        drop(self.child.stdin.take());
        let status = self.child.wait_timeout(limit).unwrap();
        assert!(
            status.is_some(),
            "the session is still open after {limit:?}"
        );
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `command` to completion with stdin closed; kills it and panics if it takes longer than `limit`.
pub fn run(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the ssh client (apt-get install openssh-client)");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let Some(status) = child.wait_timeout(limit).unwrap() else {
        let _ = child.kill();
        let _ = child.wait();
        let err = err.join().unwrap();
        panic!(
            "{command:?} still running after {limit:?}; stderr:\n{}",
            String::from_utf8_lossy(&err)
        );
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    eprintln!(
        "[ssh] {command:?} -> {status}\n[ssh stderr] {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// What a finished command printed on stdout, as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a finished command printed on stderr, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
