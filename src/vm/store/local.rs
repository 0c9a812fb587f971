//! The local store: files under the state directory, for the processes of one host.
//!
//! In the per-connection mode every connection is its own process, so nothing shared can live in memory.
//! flock(2) locks serve both modes: they conflict between separate opens of a file even inside one process,
//! and the kernel drops them when their process dies, however it dies. Per VM, a directory holds:
//!
//! - `lock`: held exclusively for the instant of a read-decide-write ([`Local::transact`]);
//! - `state.json`: the [`Record`]; replaced whole by a rename, so it is read without the lock;
//! - `sessions/*`, `claims/*`: one file per session and per start or stop call in flight, locked by its owner
//!   for as long as it lives: a file nobody holds was left by a process that was killed;
//! - `idle`: locked by the one process (or task) waiting out the VM's idle timeout.
//!
//! The directory may be reachable by others than root (an operator's mistake, a shared `/run`), so nothing
//! in it is trusted: every name is opened relative to its directory without following symlinks, new files
//! are created exclusively, anything that is not a plain file or directory is refused, and a record that
//! does not parse is reset with a warning rather than left to block its VM's stop forever.

use std::{
    ffi::CStr,
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use rustix::{
    fs::{
        AtFlags, CWD, Dir, FileType, FlockOperation, Mode, OFlags, RenameFlags, flock, fstat,
        mkdirat, openat, renameat_with, unlinkat,
    },
    io::Errno,
};
use tracing::warn;

use super::{Registration, SessionInfo, VmKey};
use crate::vm::state::{View, Write};

const STATE: &str = "state.json";
const STATE_PARTIAL: &str = ".state.json";
/// The client addresses' records; a dot name, which no VM has.
const SOURCES: &str = ".sources";
/// A source's record is a few timestamps; anything longer was not written by us.
const MAX_SOURCE_RECORD: u64 = 64 * 1024;

/// The state directory.
#[derive(Debug, Clone)]
pub struct Local {
    root: PathBuf,
}

impl Local {
    pub fn new(root: impl Into<PathBuf>) -> Local {
        Local { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn register(&self, vm: &VmKey, info: &SessionInfo) -> io::Result<Registration> {
        let dir = self.dir(vm, true)?.ok_or_else(not_found)?;
        let body = serde_json::to_vec(info).map_err(io::Error::other)?;
        dir.hold("sessions", &body)
    }

    pub fn claim(&self, vm: &VmKey) -> io::Result<Registration> {
        let dir = self.dir(vm, true)?.ok_or_else(not_found)?;
        dir.hold("claims", b"")
    }

    /// Under the VM's lock: read, decide, write. The lock is waited for on a blocking thread; each holder
    /// keeps it only for file operations, never across a call to an API.
    pub async fn transact<T>(
        &self,
        vm: &VmKey,
        count_sessions: bool,
        mut decide: impl FnMut(&View) -> (Write, T),
    ) -> Result<(View, T), super::StoreError> {
        let dir = self.dir(vm, true)?.ok_or_else(not_found)?;
        let lock = dir.open_file("lock", OFlags::RDWR | OFlags::CREATE)?;
        let lock = lock_blocking(lock, FlockOperation::LockExclusive).await?;
        let (mut view, damaged) = dir.read_view(count_sessions, true)?;
        view.sessions = view.sessions.or(count_sessions.then_some(0));
        let (write, out) = decide(&view);
        match write {
            Write::Put(record) => dir.write_record(&record)?,
            Write::Keep if damaged => dir.write_record(&view.record)?,
            Write::Keep => {}
            Write::Forget => dir.forget(vm, &self.root)?,
        }
        drop(lock);
        Ok((view, out))
    }

    pub fn view(&self, vm: &VmKey, count_sessions: bool) -> io::Result<Option<View>> {
        let Some(dir) = self.dir(vm, false)? else {
            return Ok(None);
        };
        Ok(Some(dir.read_view(count_sessions, false)?.0))
    }

    /// Waits for the holder of the call in flight to let go of its registration: the call ended (its record is
    /// written first) or its process died.
    pub async fn wait(&self, vm: &VmKey, seen: &View) -> io::Result<()> {
        let (Some(dir), Some(holder)) = (self.dir(vm, false)?, seen.record.phase.holder()) else {
            return Ok(());
        };
        let file = match dir.open_entry("claims", &holder.claim) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        drop(lock_blocking(file, FlockOperation::LockShared).await?);
        Ok(())
    }

    pub fn try_idle_waiter(&self, vm: &VmKey) -> io::Result<Option<Registration>> {
        let dir = self.dir(vm, true)?.ok_or_else(not_found)?;
        let file = dir.open_file("idle", OFlags::RDWR | OFlags::CREATE)?;
        Ok(try_lock(&file, FlockOperation::NonBlockingLockExclusive)?
            .then(|| Registration::new("idle".to_owned(), file)))
    }

    /// Every VM with a directory, sorted; none if the state directory does not exist yet.
    pub fn vms(&self) -> io::Result<Vec<VmKey>> {
        let root = match open_root(&self.root) {
            Ok(root) => root,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut vms: Vec<VmKey> = entries(&root)?
            .into_iter()
            .filter(|(_, kind)| *kind == FileType::Directory)
            .filter_map(|(name, _)| VmKey::from_name(&name))
            .collect();
        vms.sort();
        Ok(vms)
    }

    pub fn sessions(&self, vm: &VmKey) -> io::Result<Vec<SessionInfo>> {
        let Some(dir) = self.dir(vm, false)? else {
            return Ok(Vec::new());
        };
        let mut sessions: Vec<SessionInfo> = dir
            .registrations("sessions", false)?
            .into_iter()
            .filter_map(|(body, live)| live.then(|| serde_json::from_slice(&body).ok()).flatten())
            .collect();
        sessions.sort_by_key(|s| s.since);
        Ok(sessions)
    }

    /// The state directory, made if `create`; `None` if it does not exist.
    fn open(&self, create: bool) -> io::Result<Option<OwnedFd>> {
        match open_root(&self.root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                std::fs::create_dir_all(&self.root)?;
                open_root(&self.root).map(Some)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            other => other.map(Some),
        }
    }

    /// The VM's directory, made (with its subdirectories) if `create`; `None` if it does not exist.
    fn dir(&self, vm: &VmKey, create: bool) -> io::Result<Option<VmDir>> {
        let Some(root) = self.open(create)? else {
            return Ok(None);
        };
        let name = vm.name();
        let fd = match open_dir(&root, &name) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                make_vm_dir(&root, &name)?;
                open_dir(&root, &name).map_err(|e| refused(&self.root.join(&name), e))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(refused(&self.root.join(&name), e)),
        };
        Ok(Some(VmDir {
            fd,
            path: self.root.join(name),
        }))
    }
}

fn open_dir(dir: impl AsFd, name: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(openat(dir, name, flags, Mode::empty())?)
}

/// A VM's directory with its subdirectories, made under a temporary name and renamed into place, so that
/// nobody (a sweep deciding to forget it, a second connection) ever sees it half made. If another process
/// made it meanwhile, its directory stays and ours goes.
fn make_vm_dir(root: &OwnedFd, name: &str) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let partial = format!(
        ".new.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    mkdirat(root, partial.as_str(), Mode::from_raw_mode(0o755))?;
    let fd = open_dir(root, partial.as_str())?;
    make_dir(&fd, "sessions")?;
    make_dir(&fd, "claims")?;
    match renameat_with(root, partial.as_str(), root, name, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => {
            for sub in ["sessions", "claims"] {
                let _ = unlinkat(&fd, sub, AtFlags::REMOVEDIR);
            }
            let _ = unlinkat(root, partial.as_str(), AtFlags::REMOVEDIR);
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The state directory itself: the operator's path, symlinks in it included.
fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(openat(CWD, path, flags, Mode::empty())?)
}

fn make_dir(dir: impl AsFd, name: &str) -> io::Result<()> {
    match mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A plain file, never through a symlink; a FIFO or device planted under the name is refused (opening it
/// non-blocking, so that a FIFO cannot hold us).
fn open_regular(dir: impl AsFd, name: &str, flags: OFlags) -> io::Result<File> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = openat(dir, name, flags, Mode::from_raw_mode(0o600))?;
    if FileType::from_raw_mode(fstat(&fd)?.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a plain file",
        ));
    }
    Ok(File::from(fd))
}

/// Names and kinds in a directory, `.` and `..` left out.
fn entries(dir: &OwnedFd) -> io::Result<Vec<(String, FileType)>> {
    let mut found = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        let Ok(name) = name.to_str() else { continue };
        if name == "." || name == ".." {
            continue;
        }
        found.push((name.to_owned(), entry.file_type()));
    }
    Ok(found)
}

/// An error that names the file, and says so plainly when a symlink was refused.
fn refused(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(Errno::LOOP.raw_os_error())
        || e.raw_os_error() == Some(Errno::NOTDIR.raw_os_error())
    {
        warn!(
            "{} is a symlink or not what it should be; refused",
            path.display()
        );
        return io::Error::new(
            e.kind(),
            format!(
                "{} is a symlink or not what it should be; refused",
                path.display()
            ),
        );
    }
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "the VM's directory vanished")
}

/// `Ok(true)` if locked, `Ok(false)` if someone else holds a conflicting lock.
fn try_lock(file: &impl AsFd, operation: FlockOperation) -> io::Result<bool> {
    match flock(file, operation) {
        Ok(()) => Ok(true),
        Err(Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Blocks for `operation` on a blocking-pool thread, so the runtime goes on. The thread owns `file`: if the
/// waiting future is dropped, the lock is released the moment it is had, when the result is dropped.
async fn lock_blocking(file: File, operation: FlockOperation) -> io::Result<File> {
    let nonblocking = match operation {
        FlockOperation::LockExclusive => FlockOperation::NonBlockingLockExclusive,
        _ => FlockOperation::NonBlockingLockShared,
    };
    if try_lock(&file, nonblocking)? {
        return Ok(file);
    }
    tokio::task::spawn_blocking(move || {
        flock(&file, operation)?;
        Ok(file)
    })
    .await
    .map_err(io::Error::other)?
}

mod sources;
#[cfg(test)]
mod tests;
mod vm_dir;

use vm_dir::VmDir;
