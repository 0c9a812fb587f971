//! One VM's directory: its record, its sessions' and calls' registrations, and removing it all.

use std::{
    fs::File,
    io::{self, Read, Write as _},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use rustix::{
    fs::{
        AtFlags, FileType, FlockOperation, Mode, OFlags, flock, fstat, openat, renameat, unlinkat,
    },
    io::Errno,
};
use tracing::warn;

use super::{STATE, STATE_PARTIAL, entries, open_dir, open_regular, open_root, refused, try_lock};
use crate::vm::{
    state::{Record, View},
    store::{Registration, VmKey},
};

/// One VM's directory, opened.
pub(super) struct VmDir {
    pub(super) fd: OwnedFd,
    pub(super) path: PathBuf,
}

impl VmDir {
    /// The record and what surrounds it; `damaged` if the record could not be read and was taken as new.
    pub(super) fn read_view(
        &self,
        count_sessions: bool,
        clean_up: bool,
    ) -> io::Result<(View, bool)> {
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
    pub(super) fn write_record(&self, record: &Record) -> io::Result<()> {
        let body = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        let mut file = File::from(self.create_exclusive(&self.fd, STATE_PARTIAL, 0o644)?);
        file.write_all(&body)?;
        renameat(&self.fd, STATE_PARTIAL, &self.fd, STATE)?;
        Ok(())
    }

    /// Creates `sub/NAME`, locked, holding `body`; it appears under its name only once locked, so that nobody
    /// ever takes it for one left by a dead process. Removed when the registration is dropped.
    pub(super) fn hold(&self, sub: &str, body: &[u8]) -> io::Result<Registration> {
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
    pub(super) fn is_held(&self, sub: &str, name: &str) -> io::Result<bool> {
        match self.open_entry(sub, name) {
            Ok(file) => Ok(!try_lock(&file, FlockOperation::NonBlockingLockShared)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every registration in `sub`: its contents, and whether it is live. Dead ones are removed if `clean_up`
    /// (only under the lock, where nobody creates one with the same name).
    pub(super) fn registrations(
        &self,
        sub: &str,
        clean_up: bool,
    ) -> io::Result<Vec<(Vec<u8>, bool)>> {
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
    pub(super) fn forget(&self, vm: &VmKey, root: &Path) -> io::Result<()> {
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

    pub(super) fn open_subdir(&self, sub: &str) -> io::Result<OwnedFd> {
        open_dir(&self.fd, sub).map_err(|e| refused(&self.path.join(sub), e))
    }

    pub(super) fn open_entry(&self, sub: &str, name: &str) -> io::Result<File> {
        let dir = self.open_subdir(sub)?;
        open_regular(&dir, name, OFlags::RDONLY)
    }

    pub(super) fn open_file(&self, name: &str, flags: OFlags) -> io::Result<File> {
        open_regular(&self.fd, name, flags).map_err(|e| refused(&self.path.join(name), e))
    }

    /// A new file that nothing else (a planted symlink included) stands in for: one left over from a killed
    /// process is removed first.
    pub(super) fn create_exclusive(
        &self,
        dir: &OwnedFd,
        name: &str,
        mode: u32,
    ) -> io::Result<OwnedFd> {
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
