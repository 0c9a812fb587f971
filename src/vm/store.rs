//! Store: what connections share about each VM, in files under the state directory.
//!
//! In the per-connection mode every connection is its own process, so this state cannot live in memory.
//! flock(2) locks serve both modes: they conflict between separate opens of a file even inside one process,
//! and the kernel drops them when their process dies, however it dies. Per VM, a directory holds:
//!
//! - `lock`: the gate, held exclusively to change anything below (start and stop calls included);
//! - `state.json`: phase, address, last start and stop, idle clock; replaced atomically, so read without lock;
//! - `sessions/*`: one file per connection, from its identification until it ends, locked by its owner for
//!   as long as it lives: a file nobody holds was left by a process that was killed;
//! - `idle`: locked by the one process (or task) waiting out the VM's idle timeout.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    os::{fd::AsFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use rustix::fs::{FlockOperation, flock};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch: the time base of the state files, which every process shares.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Which VM: a profile's, and, unless the profile shares one VM among all its clients, a client address's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmKey {
    pub profile: String,
    pub client: Option<IpAddr>,
}

impl VmKey {
    /// The directory name: `lab` or `lab@203.0.113.9`. Profile names have no `@` (see config).
    fn dir_name(&self) -> String {
        match self.client {
            Some(ip) => format!("{}@{ip}", self.profile),
            None => self.profile.clone(),
        }
    }

    fn from_dir_name(name: &str) -> Option<VmKey> {
        if name.starts_with('.') {
            return None;
        }
        Some(match name.split_once('@') {
            Some((profile, ip)) => VmKey {
                profile: profile.to_owned(),
                client: Some(ip.parse().ok()?),
            },
            None => VmKey {
                profile: name.to_owned(),
                client: None,
            },
        })
    }
}

impl std::fmt::Display for VmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.dir_name())
    }
}

/// Where a VM is in its life, as the last process to change it left it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Never started through this host since boot.
    #[default]
    New,
    /// A start call is in flight (if the gate is held; else its process died during the call).
    Starting,
    /// The start API gave an address; sshd has not answered yet.
    Booting,
    /// sshd answered.
    Up,
    /// A stop call is in flight (if the gate is held).
    Stopping,
    Stopped,
    /// The start API gave no address.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::New => "new",
            Phase::Starting => "starting",
            Phase::Booting => "booting",
            Phase::Up => "up",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }

    /// The VM may be running, so an idle one is worth a stop. Read under the gate, `starting` and `stopping`
    /// mean that the call's process died (or its client left) during the call, which may or may not have
    /// started or stopped the VM.
    pub fn may_run(self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Booting | Phase::Up | Phase::Stopping
        )
    }
}

/// The end of one start or stop call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// When it ended (ms since the epoch).
    pub at: u64,
    pub ok: bool,
    /// The address given, or what the user or operator was told.
    pub detail: String,
    pub ms: u64,
}

/// The one waiter of a VM's idle timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleWait {
    pub pid: u32,
    /// When it will stop the VM unless a connection comes (ms since the epoch).
    pub due: u64,
}

impl IdleWait {
    /// This process's wait, until `due`.
    pub fn mine(due: u64) -> IdleWait {
        IdleWait {
            pid: std::process::id(),
            due,
        }
    }
}

/// `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmState {
    pub phase: Phase,
    /// When the phase began.
    pub since: u64,
    /// The process that set a phase with a call in flight (`starting`, `stopping`).
    pub pid: Option<u32>,
    pub vm: Option<SocketAddr>,
    /// While `booting`, new connections take `vm` without asking the start API again until then.
    pub booting_until: Option<u64>,
    pub last_start: Option<Call>,
    pub last_stop: Option<Call>,
    pub last_disconnect: Option<u64>,
    pub idle: Option<IdleWait>,
    pub starts: u64,
    pub stops: u64,
}

impl VmState {
    /// The VM may be running, and has an address to stop it by.
    pub fn may_run(&self) -> bool {
        self.vm.is_some() && self.phase.may_run()
    }

    /// The VM's address if it is up, or booting from a start whose answer others may still take.
    pub fn running(&self, now: u64) -> Option<SocketAddr> {
        (self.phase == Phase::Up || self.booting(now))
            .then_some(self.vm)
            .flatten()
    }

    /// Booting from a start whose answer others may still take as theirs.
    pub fn booting(&self, now: u64) -> bool {
        self.phase == Phase::Booting && self.booting_until.is_some_and(|until| now < until)
    }

    pub fn enter(&mut self, phase: Phase, now: u64) {
        self.phase = phase;
        self.since = now;
        self.pid = matches!(phase, Phase::Starting | Phase::Stopping).then(std::process::id);
    }
}

/// One connection as `status` shows it (`sessions/*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub client: SocketAddr,
    pub pid: u32,
    /// When it joined (ms since the epoch).
    pub since: u64,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The VM's directory, made if missing.
    pub fn vm(&self, key: &VmKey) -> io::Result<VmDir> {
        let path = self.root.join(key.dir_name());
        fs::create_dir_all(path.join("sessions"))?;
        Ok(VmDir {
            path,
            key: key.clone(),
        })
    }

    /// The VM's directory if it has one: the VM has been started through this host since boot.
    pub fn existing(&self, key: &VmKey) -> Option<VmDir> {
        let path = self.root.join(key.dir_name());
        path.is_dir().then(|| VmDir {
            path,
            key: key.clone(),
        })
    }

    /// Every VM with a directory, sorted; none if the state directory does not exist yet.
    pub fn vms(&self) -> io::Result<Vec<VmDir>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut vms = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let key = name.to_str().and_then(VmKey::from_dir_name);
            if let (Some(key), true) = (key, entry.file_type()?.is_dir()) {
                vms.push(VmDir {
                    path: entry.path(),
                    key,
                });
            }
        }
        vms.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(vms)
    }
}

/// One VM's directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    path: PathBuf,
    key: VmKey,
}

impl VmDir {
    pub fn key(&self) -> &VmKey {
        &self.key
    }

    /// Waits for the gate. A holder is bounded by its own deadlines; callers bound the wait with theirs.
    /// Dropping the future before the lock is had is safe: the lock, if it comes, is released at once.
    pub async fn gate(&self) -> io::Result<Gate> {
        let file = self.open("lock")?;
        let file = lock(file, FlockOperation::LockExclusive).await?;
        Ok(Gate {
            dir: self.clone(),
            _lock: file,
        })
    }

    /// The gate if nobody holds it.
    pub fn try_gate(&self) -> io::Result<Option<Gate>> {
        let file = self.open("lock")?;
        Ok(
            try_lock(&file, FlockOperation::NonBlockingLockExclusive)?.then(|| Gate {
                dir: self.clone(),
                _lock: file,
            }),
        )
    }

    /// Whether a start or stop call (or a decision) is being made right now. Takes a shared lock for an
    /// instant, which only ever delays a process that blocks for the gate anyway.
    pub fn gate_busy(&self) -> io::Result<bool> {
        let file = self.open("lock")?;
        Ok(!try_lock(&file, FlockOperation::NonBlockingLockShared)?)
    }

    /// The state as last written; the default for a VM never written.
    pub fn state(&self) -> io::Result<VmState> {
        match fs::read(self.path.join("state.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(VmState::default()),
            Err(e) => Err(e),
        }
    }

    /// Registers a connection: its file appears only once locked, so nobody ever takes it for a dead one.
    pub fn register(&self, info: &SessionInfo) -> io::Result<SessionFile> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("{}.{}", info.pid, NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = self.path.join("sessions");
        let partial = dir.join(format!(".{name}"));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        flock(file.as_fd(), FlockOperation::LockExclusive)?;
        file.write_all(&serde_json::to_vec(info).map_err(io::Error::other)?)?;
        let path = dir.join(name);
        fs::rename(&partial, &path)?;
        Ok(SessionFile {
            path: Some(path),
            _lock: file,
        })
    }

    /// Every registered session, live or not.
    pub fn sessions(&self) -> io::Result<Vec<Session>> {
        let mut sessions = Vec::new();
        for entry in fs::read_dir(self.path.join("sessions"))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            // Gone between the listing and now: that session just ended.
            let Ok(file) = File::open(entry.path()) else {
                continue;
            };
            // A shared probe: it never fails another prober, and fails exactly while the owner lives.
            let live = !try_lock(&file, FlockOperation::NonBlockingLockShared)?;
            let info = fs::read(entry.path())
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            sessions.push(Session {
                path: entry.path(),
                info,
                live,
            });
        }
        sessions.sort_by_key(|s| s.info.as_ref().map(|i| i.since));
        Ok(sessions)
    }

    fn open(&self, name: &str) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.path.join(name))
    }
}

/// A registered session, as found in the directory.
#[derive(Debug)]
pub struct Session {
    path: PathBuf,
    /// `None` if the file could not be read (it is written before it appears, so only if damaged).
    pub info: Option<SessionInfo>,
    /// Its process holds it: the connection is in progress.
    pub live: bool,
}

/// The held gate of one VM.
#[derive(Debug)]
pub struct Gate {
    dir: VmDir,
    _lock: File,
}

impl Gate {
    pub fn dir(&self) -> &VmDir {
        &self.dir
    }

    pub fn read(&self) -> io::Result<VmState> {
        self.dir.state()
    }

    /// Replaces `state.json` whole: readers without the gate see the old state or the new, never half.
    pub fn write(&self, state: &VmState) -> io::Result<()> {
        let partial = self.dir.path.join(".state.json");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&partial)?;
        file.write_all(&serde_json::to_vec_pretty(state).map_err(io::Error::other)?)?;
        fs::rename(&partial, self.dir.path.join("state.json"))
    }

    /// Counts live sessions and removes the files of dead ones. Returns (live, dead).
    pub fn live_sessions(&self) -> io::Result<(usize, usize)> {
        let (mut live, mut dead) = (0, 0);
        for session in self.dir.sessions()? {
            if session.live {
                live += 1;
            } else {
                dead += 1;
                let _ = fs::remove_file(&session.path);
            }
        }
        Ok((live, dead))
    }

    /// Removes the VM's directory, state and all. Only for a VM without sessions, whose gate this is: a
    /// connection that joins meanwhile finds its files gone and goes on without sharing.
    pub fn forget(self) -> io::Result<()> {
        fs::remove_dir_all(&self.dir.path)
    }

    /// The idle lock, unless another waiter holds it. Only ever tried under the gate, so that taking it and
    /// a waiter giving it up (also under the gate) never cross.
    pub fn try_idle(&self) -> io::Result<Option<IdleLock>> {
        let file = self.dir.open("idle")?;
        Ok(try_lock(&file, FlockOperation::NonBlockingLockExclusive)?.then_some(IdleLock(file)))
    }
}

/// Held by the one waiter of a VM's idle timeout.
#[derive(Debug)]
pub struct IdleLock(#[allow(dead_code)] File);

/// A connection's registration: removed when dropped; left behind, unlocked, if its process is killed.
#[derive(Debug)]
pub struct SessionFile {
    /// `None` once abandoned.
    path: Option<PathBuf>,
    _lock: File,
}

impl SessionFile {
    /// Closes the file without removing it, as a killed process would.
    #[cfg(test)]
    pub fn abandon(mut self) -> PathBuf {
        self.path.take().unwrap_or_default()
    }
}

impl Drop for SessionFile {
    fn drop(&mut self) {
        // Removed before the lock goes (with the file, after this), so nobody sees it dead.
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
    }
}

/// `Ok(true)` if locked, `Ok(false)` if someone else holds a conflicting lock.
fn try_lock(file: &File, operation: FlockOperation) -> io::Result<bool> {
    match flock(file.as_fd(), operation) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Blocks for `operation` on a blocking-pool thread, so the runtime goes on. The thread owns `file`: if the
/// waiting future is dropped, the lock is released the moment it is had, when the result is dropped.
async fn lock(file: File, operation: FlockOperation) -> io::Result<File> {
    let nonblocking = match operation {
        FlockOperation::LockExclusive => FlockOperation::NonBlockingLockExclusive,
        _ => FlockOperation::NonBlockingLockShared,
    };
    if try_lock(&file, nonblocking)? {
        return Ok(file);
    }
    tokio::task::spawn_blocking(move || {
        flock(file.as_fd(), operation)?;
        Ok(file)
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests;
