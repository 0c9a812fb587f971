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
    io::{self, Read, Write as _},
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use rustix::{
    fs::{
        AtFlags, CWD, Dir, FileType, FlockOperation, Mode, OFlags, RenameFlags, flock, fstat,
        mkdirat, openat, renameat, renameat_with, unlinkat,
    },
    io::Errno,
};
use tracing::warn;

use super::{Registration, SessionInfo, VmKey};
use crate::vm::state::{Record, View, Write};

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

    /// Under the lock of every source: reads `source`'s record (`None` if it has none), lets `decide` choose
    /// the new one (`None` to remove it) and writes it.
    pub async fn transact_source<T>(
        &self,
        source: IpAddr,
        decide: impl FnOnce(Option<&[u8]>) -> (Option<Vec<u8>>, T),
    ) -> io::Result<T> {
        let dir = self.sources_dir(true)?.ok_or_else(not_found)?;
        let lock = open_regular(&dir.fd, ".lock", OFlags::RDWR | OFlags::CREATE)?;
        let lock = lock_blocking(lock, FlockOperation::LockExclusive).await?;
        let name = source.to_string();
        let current = match open_regular(&dir.fd, &name, OFlags::RDONLY) {
            Ok(mut file) => {
                let mut body = Vec::new();
                (&mut file).take(MAX_SOURCE_RECORD).read_to_end(&mut body)?;
                Some(body)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            // Something planted in its place: replaced by the record written below.
            Err(e) => {
                let _ = refused(&dir.path.join(&name), e);
                None
            }
        };
        let (next, out) = decide(current.as_deref());
        match next {
            Some(body) => {
                let partial = format!(".{name}");
                let mut file = File::from(dir.create_exclusive(&dir.fd, &partial, 0o644)?);
                file.write_all(&body)?;
                renameat(&dir.fd, partial.as_str(), &dir.fd, name.as_str())?;
            }
            None if current.is_some() => unlinkat(&dir.fd, name.as_str(), AtFlags::empty())?,
            None => {}
        }
        drop(lock);
        Ok(out)
    }

    /// One source's record, read without the lock (records are replaced whole).
    pub fn source(&self, source: IpAddr) -> io::Result<Option<Vec<u8>>> {
        let Some(dir) = self.sources_dir(false)? else {
            return Ok(None);
        };
        match open_regular(&dir.fd, &source.to_string(), OFlags::RDONLY) {
            Ok(mut file) => {
                let mut body = Vec::new();
                (&mut file).take(MAX_SOURCE_RECORD).read_to_end(&mut body)?;
                Ok(Some(body))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // Something planted in its place counts as no record; the next write replaces it.
            Err(_) => Ok(None),
        }
    }

    /// Every source's record, read without the lock (records are replaced whole).
    pub fn sources(&self) -> io::Result<Vec<(IpAddr, Vec<u8>)>> {
        let Some(dir) = self.sources_dir(false)? else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for (name, _) in entries(&dir.fd)? {
            let Ok(source) = name.parse::<IpAddr>() else {
                continue;
            };
            if let Ok(mut file) = open_regular(&dir.fd, &name, OFlags::RDONLY) {
                let mut body = Vec::new();
                if (&mut file)
                    .take(MAX_SOURCE_RECORD)
                    .read_to_end(&mut body)
                    .is_ok()
                {
                    found.push((source, body));
                }
            }
        }
        Ok(found)
    }

    /// `.sources`, the records of client addresses (a name no VM can have).
    fn sources_dir(&self, create: bool) -> io::Result<Option<VmDir>> {
        let root = match open_root(&self.root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                std::fs::create_dir_all(&self.root)?;
                open_root(&self.root)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            other => other?,
        };
        let path = self.root.join(SOURCES);
        let fd = match open_dir(&root, SOURCES) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                make_dir(&root, SOURCES)?;
                open_dir(&root, SOURCES).map_err(|e| refused(&path, e))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(refused(&path, e)),
        };
        Ok(Some(VmDir { fd, path }))
    }

    /// The VM's directory, made (with its subdirectories) if `create`; `None` if it does not exist.
    fn dir(&self, vm: &VmKey, create: bool) -> io::Result<Option<VmDir>> {
        let root = match open_root(&self.root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                std::fs::create_dir_all(&self.root)?;
                open_root(&self.root)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            other => other?,
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

/// One VM's directory, opened.
struct VmDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl VmDir {
    /// The record and what surrounds it; `damaged` if the record could not be read and was taken as new.
    fn read_view(&self, count_sessions: bool, clean_up: bool) -> io::Result<(View, bool)> {
        let (record, damaged) = match self.open_file(STATE, OFlags::RDONLY) {
            Ok(file) => match read_record(file) {
                Ok(record) => (record, false),
                Err(e) => {
                    warn!(
                        "{}/{STATE} is damaged ({e}); taking the VM as new: its next login starts it again",
                        self.path.display()
                    );
                    (Record::default(), true)
                }
            },
            // Nothing written yet: new since its directory was made, which a sweep's age counts from.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let made = fstat(&self.fd)?;
                let since =
                    (made.st_mtime.max(0) as u64) * 1000 + made.st_mtime_nsec as u64 / 1_000_000;
                (
                    Record {
                        since,
                        ..Record::default()
                    },
                    false,
                )
            }
            Err(e) => return Err(e),
        };
        let holder_alive = match record.phase.holder() {
            Some(holder) => self.is_held("claims", &holder.claim)?,
            None => false,
        };
        let sessions = if count_sessions {
            let all = self.registrations("sessions", clean_up)?;
            Some(all.iter().filter(|(_, live)| *live).count())
        } else {
            None
        };
        let view = View {
            record,
            sessions,
            holder_alive,
            revision: 0,
        };
        Ok((view, damaged))
    }

    /// Replaces the record whole: readers without the lock see the old one or the new, never half.
    fn write_record(&self, record: &Record) -> io::Result<()> {
        let body = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        let mut file = File::from(self.create_exclusive(&self.fd, STATE_PARTIAL, 0o644)?);
        file.write_all(&body)?;
        renameat(&self.fd, STATE_PARTIAL, &self.fd, STATE)?;
        Ok(())
    }

    /// Creates `sub/NAME`, locked, holding `body`; it appears under its name only once locked, so that nobody
    /// ever takes it for one left by a dead process. Removed when the registration is dropped.
    fn hold(&self, sub: &str, body: &[u8]) -> io::Result<Registration> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.open_subdir(sub)?;
        let partial = format!(".{name}");
        let fd = self.create_exclusive(&dir, &partial, 0o600)?;
        flock(&fd, FlockOperation::LockExclusive)?;
        let mut file = File::from(fd);
        file.write_all(body)?;
        renameat(&dir, &partial, &dir, &name)?;
        let held = Held {
            dir,
            name: name.clone(),
            _lock: file,
        };
        Ok(Registration::new(name, held))
    }

    /// Whether `sub/name`'s owner still holds it. A shared probe never fails another prober, and fails exactly
    /// while the owner lives.
    fn is_held(&self, sub: &str, name: &str) -> io::Result<bool> {
        match self.open_entry(sub, name) {
            Ok(file) => Ok(!try_lock(&file, FlockOperation::NonBlockingLockShared)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every registration in `sub`: its contents, and whether it is live. Dead ones are removed if `clean_up`
    /// (only under the lock, where nobody creates one with the same name).
    fn registrations(&self, sub: &str, clean_up: bool) -> io::Result<Vec<(Vec<u8>, bool)>> {
        let dir = self.open_subdir(sub)?;
        let mut found = Vec::new();
        for (name, _) in entries(&dir)? {
            if name.starts_with('.') {
                continue;
            }
            let mut file = match open_regular(&dir, &name, OFlags::RDONLY) {
                Ok(file) => file,
                // Gone between the listing and now: it just ended.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    warn!("{}/{sub}/{name}: {e}; ignored", self.path.display());
                    continue;
                }
            };
            let live = !try_lock(&file, FlockOperation::NonBlockingLockShared)?;
            let mut body = Vec::new();
            let _ = (&mut file).take(64 * 1024).read_to_end(&mut body);
            if !live && clean_up {
                let _ = unlinkat(&dir, name.as_str(), AtFlags::empty());
            }
            found.push((body, live));
        }
        Ok(found)
    }

    /// Removes the VM's directory, state and all. Only for a VM without sessions, under its lock: a connection
    /// that registers meanwhile finds its files gone and goes on without sharing.
    fn forget(&self, vm: &VmKey, root: &Path) -> io::Result<()> {
        for sub in ["sessions", "claims"] {
            if let Ok(dir) = self.open_subdir(sub) {
                for (name, _) in entries(&dir)? {
                    let _ = unlinkat(&dir, name.as_str(), AtFlags::empty());
                }
            }
        }
        for (name, kind) in entries(&self.fd)? {
            let flags = if kind == FileType::Directory {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            let _ = unlinkat(&self.fd, name.as_str(), flags);
        }
        let root = open_root(root)?;
        unlinkat(&root, vm.name().as_str(), AtFlags::REMOVEDIR)?;
        Ok(())
    }

    fn open_subdir(&self, sub: &str) -> io::Result<OwnedFd> {
        open_dir(&self.fd, sub).map_err(|e| refused(&self.path.join(sub), e))
    }

    fn open_entry(&self, sub: &str, name: &str) -> io::Result<File> {
        let dir = self.open_subdir(sub)?;
        open_regular(&dir, name, OFlags::RDONLY)
    }

    fn open_file(&self, name: &str, flags: OFlags) -> io::Result<File> {
        open_regular(&self.fd, name, flags).map_err(|e| refused(&self.path.join(name), e))
    }

    /// A new file that nothing else (a planted symlink included) stands in for: one left over from a killed
    /// process is removed first.
    fn create_exclusive(&self, dir: &OwnedFd, name: &str, mode: u32) -> io::Result<OwnedFd> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match openat(dir, name, flags, Mode::from_raw_mode(mode)) {
            Err(Errno::EXIST) => {
                unlinkat(dir, name, AtFlags::empty())?;
                Ok(openat(dir, name, flags, Mode::from_raw_mode(mode))?)
            }
            other => Ok(other?),
        }
    }
}

/// A registration's file: removed, then unlocked (closed), when dropped; so nobody ever sees it dead.
struct Held {
    dir: OwnedFd,
    name: String,
    _lock: File,
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = unlinkat(&self.dir, self.name.as_str(), AtFlags::empty());
    }
}

fn read_record(mut file: File) -> io::Result<Record> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
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

#[cfg(test)]
mod tests;
