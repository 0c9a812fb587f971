//! Real systemd as PID 1: a throwaway copy of a cached Debian rootfs (`rootfs.rs`, made by debootstrap)
//! booted with `systemd-nspawn -b` per test. The container shares the host's network namespace unless told
//! otherwise, so its sockets and the host's test servers (start API, VMs) reach each other over loopback.

mod rootfs;

use std::{
    fs,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal};
use tempfile::TempDir;
use wait_timeout::ChildExt;

pub use rootfs::{cached_rootfs, copy, enable_ssh};

use super::{PATIENCE, log::Log};

/// The PATH of commands run in the container; ours would be the host's.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Polling interval for conditions that have no event to wait on (systemd's state seen from outside).
const POLL: Duration = Duration::from_millis(50);

/// Why containers cannot run on this machine, if they cannot; `None` means the test must run. Booting can
/// still fail later, which [`Container::preflight`] tells apart from a failure of the test.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root: systemd-nspawn needs root".into());
    }
    match Command::new("systemd-nspawn").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "systemd-nspawn --version failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Some(format!(
            "no systemd-nspawn ({e}); apt-get install systemd-container"
        )),
    }
}

/// The container's network: the host's (its sockets and the host's test servers reach each other over
/// loopback), or its own with loopback only, where it may listen on any port, 22 included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Host,
    Private,
}

/// A booted container: systemd-nspawn (our child) running systemd from a private copy of the rootfs.
pub struct Container {
    nspawn: Child,
    /// The container's PID 1 as the host sees it, for nsenter.
    pid1: u32,
    console: Log,
    /// systemd-nspawn's own messages.
    errors: Log,
    /// Dropped after nspawn has exited, which ends the thread that started it (see [`Container::boot_on`]).
    _keeper: mpsc::Sender<()>,
    root: TempDir,
}

impl Container {
    /// Runs `true` in a container without booting it. Failing here means this machine cannot run containers
    /// at all (e.g. inside an unprivileged container); the error says why.
    pub fn preflight(rootfs: &Path) -> Result<(), String> {
        let output = Command::new("systemd-nspawn")
            .args([
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--read-only",
                "--pipe",
            ])
            .arg(format!("--directory={}", rootfs.display()))
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running systemd-nspawn: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "systemd-nspawn cannot run a container here ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// Copies `rootfs`, lets `prepare` write into the copy (files the container should find at boot), then
    /// boots it on the host's network and returns once systemd reports the boot finished.
    pub fn boot(rootfs: &Path, prepare: impl FnOnce(&Path)) -> Container {
        Container::boot_on(rootfs, Network::Host, prepare)
    }

    /// The same on `network`.
    pub fn boot_on(rootfs: &Path, network: Network, prepare: impl FnOnce(&Path)) -> Container {
        let root = copy(rootfs);
        prepare(root.path());

        let machine = root
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut command = Command::new("systemd-nspawn");
        command
            // --register=no and --keep-unit: there is no systemd (machined) on the host to register with.
            // --link-journal=no: the container's journal stays in its own /var/log/journal.
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--link-journal=no",
            ])
            .args(["--console=read-only", "--resolv-conf=off", "--timezone=off"])
            .args((network == Network::Private).then_some("--private-network"))
            .arg(format!("--machine={machine}"))
            .arg(format!("--directory={}", root.path().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // If this test process is killed before it drops the Container, nspawn gets SIGTERM and powers the
        // container off instead of leaving it running. That signal follows the thread that spawned nspawn, not
        // the process: a thread of the container's own spawns it and lives until the Container is dropped,
        // whichever test's thread holds it then (the steps of tests/common/steps.rs share one container across
        // libtest's threads, and a thread that runs out of tests exits).
        // SAFETY: prctl is async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(Signal::TERM))
                    .map_err(Into::into)
            });
        }
        let (spawned, nspawn) = mpsc::channel();
        let (keeper, dropped) = mpsc::channel::<()>();
        thread::spawn(move || {
            let _ = spawned.send(command.spawn());
            let _ = dropped.recv();
        });
        let mut nspawn = nspawn
            .recv()
            .expect("the keeper thread sends nspawn")
            .expect("starting systemd-nspawn (apt-get install systemd-container)");
        let console = Log::collect(nspawn.stdout.take().unwrap(), "container");
        let errors = Log::collect(nspawn.stderr.take().unwrap(), "nspawn");
        // From here on, dropping `container` (also when a wait below panics) stops nspawn before the copy
        // is removed.
        let mut container = Container {
            nspawn,
            pid1: 0,
            console,
            errors,
            _keeper: keeper,
            root,
        };
        let pid1 = wait_for("the container's systemd to start", PATIENCE, || {
            container.exited("starting");
            systemd_child(container.nspawn.id()).ok_or("no child running systemd".to_owned())
        });
        container.pid1 = pid1;
        container.wait_for_boot();
        container
    }

    /// The container's root directory, as seen from the host.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// What the container printed on its console so far (systemd's boot and shutdown messages).
    pub fn console(&self) -> Vec<String> {
        self.console.lines()
    }

    /// `program args…` inside the container (all its namespaces, its root, a clean environment).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--target={}", self.pid1))
            .args(["--all", "--"])
            .arg(program)
            .env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::null());
        command
    }

    /// Runs `program args…` in the container to completion (bounded by [`PATIENCE`]).
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut child = self
            .command(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running nsenter (util-linux)");
        // Read both pipes while waiting, so that a chatty command cannot block on a full pipe.
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let stdout = thread::spawn(move || read_all(stdout));
        let stderr = thread::spawn(move || read_all(stderr));
        let status = child.wait_timeout(PATIENCE).unwrap().unwrap_or_else(|| {
            let _ = child.kill();
            panic!("{program} {args:?} still running in the container after {PATIENCE:?}")
        });
        Output {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        }
    }

    /// Like [`Container::run`], but panics unless the command succeeds; returns its stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let output = self.run(program, args);
        assert!(
            output.status.success(),
            "{program} {args:?} in the container: {}\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The journal records that `matches` (journalctl FIELD=value arguments) select, oldest first.
    pub fn journal(&self, matches: &[&str]) -> Vec<serde_json::Value> {
        let args = [&["--no-pager", "--output=json"], matches].concat();
        self.run_ok("journalctl", &args)
            .lines()
            .map(|line| serde_json::from_str(line).expect("journalctl -o json prints JSON lines"))
            .collect()
    }

    /// Panics if systemd-nspawn has exited: the container is gone, and its console says why.
    fn exited(&mut self, while_: &str) {
        if let Some(status) = self.nspawn.try_wait().unwrap() {
            panic!(
                "systemd-nspawn exited with {status} while {while_}:\n{}\nconsole:\n{}",
                self.errors.lines().join("\n"),
                self.console().join("\n")
            );
        }
    }

    /// Waits until systemd has finished booting: `systemctl is-system-running --wait` once systemd listens.
    fn wait_for_boot(&mut self) {
        let state = wait_for("the container's boot to finish", PATIENCE, || {
            self.exited("booting");
            // Fails until systemd's private socket exists; then waits for the boot and prints the state.
            let output = self.run("systemctl", &["is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if state.is_empty() || state == "offline" {
                Err(String::from_utf8_lossy(&output.stderr).into_owned())
            } else {
                Ok(state)
            }
        });
        if state != "running" {
            // "degraded": some unit of the base system failed. Not ours to fix, but worth seeing.
            let failed = self.run("systemctl", &["--failed", "--no-pager"]);
            eprintln!(
                "container booted {state}:\n{}",
                String::from_utf8_lossy(&failed.stdout)
            );
        }
    }

    /// Powers the container off the way `machinectl poweroff` does (SIGTERM to nspawn, which tells systemd to
    /// shut down), and waits for nspawn to exit; SIGKILL if that takes too long.
    fn stop(&mut self) {
        let pid = Pid::from_child(&self.nspawn);
        let _ = rustix::process::kill_process(pid, Signal::TERM);
        if self.nspawn.wait_timeout(PATIENCE).unwrap().is_none() {
            eprintln!(
                "the container did not shut down within {PATIENCE:?}; killing systemd-nspawn"
            );
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.stop();
        // `root` (the copy) is removed after this, once nothing runs from it.
    }
}

/// The child of systemd-nspawn that runs systemd: the container's PID 1.
fn systemd_child(nspawn: u32) -> Option<u32> {
    let tasks = fs::read_dir(format!("/proc/{nspawn}/task")).ok()?;
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<u32>>()
        })
        .find(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "systemd")
        })
}

/// Polls `check` until it returns `Ok`, at most `limit`; after that, panics naming `what` and the last `Err`
/// (what was seen instead). For states that only systemd knows, which no event of ours announces.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(found) => return found,
            Err(seen) if Instant::now() >= deadline => {
                panic!("gave up waiting for {what} after {limit:?}; last seen: {seen}")
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

fn read_all(mut source: impl std::io::Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = source.read_to_end(&mut buf);
    buf
}
