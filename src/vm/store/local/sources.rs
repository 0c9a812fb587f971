//! The client addresses' records (see [`crate::guard`]): one file each under `.sources`, a name no VM has,
//! replaced whole under one lock for all of them (held for the instant of a read-decide-write).

use std::{
    fs::File,
    io::{self, Read, Write as _},
    net::IpAddr,
};

use rustix::fs::{AtFlags, FlockOperation, OFlags, renameat, unlinkat};

use super::{
    Local, MAX_SOURCE_RECORD, SOURCES, VmDir, entries, lock_blocking, make_dir, not_found,
    open_dir, open_regular, refused,
};

impl Local {
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
        let Some(root) = self.open(create)? else {
            return Ok(None);
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
}
