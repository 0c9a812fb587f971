//! Socket → pipe → socket with splice(2), one pipe per direction, as systemd-socket-proxyd does.

use std::{
    io::{self, Read},
    os::fd::OwnedFd,
    sync::atomic::{AtomicU64, Ordering},
};

use rustix::{
    io::Errno,
    pipe::{PipeFlags, SpliceFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice},
};
use tokio::{io::Interest, net::TcpStream};

use super::Failed;

/// Pipe capacity for bulk transfers: each splice then moves up to this much, so a GiB costs ~1k round
/// trips through the loop instead of ~16k with the default 64 KiB. A pipe starts at the default size and
/// grows to this the first time one read fills it, so idle and interactive sessions stay small: the kernel
/// counts pipe capacity per user (`pipe-user-pages-soft`, 64 MiB by default), and past that it refuses
/// to grow pipes (they then keep their size, which only costs more system calls). The kernel also
/// refuses more than /proc/sys/fs/pipe-max-size (1 MiB by default); the pipe then keeps its size too.
pub const PIPE_SIZE: usize = 1024 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
    /// Bytes in the pipe: spliced in, not yet out. The kernel does not say; we count.
    full: usize,
    grown: bool,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        Ok(Pipe {
            size: fcntl_getpipe_size(&write)?,
            read,
            write,
            full: 0,
            grown: false,
        })
    }

    /// Called when a read filled the pipe: the sender has more, so move more per system call.
    fn grow(&mut self) {
        self.grown = true;
        if let Ok(size) = fcntl_setpipe_size(&self.write, PIPE_SIZE.max(self.size)) {
            self.size = size;
        }
    }
}

/// Moves bytes from `from` to `to` until `from` reaches EOF and everything read has been written. Returns
/// `false` when splice cannot be used here (no pipe to be had, or a kernel or socket that does not
/// splice): whatever had been read was written first, and the caller copies the rest.
pub(super) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
) -> Result<bool, Failed> {
    // Out of file descriptors, say: copying needs none.

    let Ok(mut pipe) = Pipe::new() else {
        return Ok(false);
    };
    let mut eof = false;
    // The last splice in said EAGAIN while the pipe held bytes. That may have been the pipe, not the
    // socket: a pipe has `size / 4096` slots, and small socket buffers each take one, so it can be full
    // with fewer than `size` bytes in it. Then the socket may still hold data, and its readiness must not
    // be cleared, or nothing would wake us to read it. So we wait for the pipe to drain instead.
    let mut pipe_maybe_full = false;
    loop {
        let want_in = !eof && !pipe_maybe_full && pipe.full < pipe.size;
        let want_out = pipe.full > 0;
        if !want_in && !want_out {
            return Ok(true); // EOF, and the pipe is empty
        }
        // These return at once while the socket is known ready; awaiting them even then gives the other
        // direction and other connections their turn (tokio's cooperative budget).
        tokio::select! {
            biased;
            ready = to.writable(), if want_out => ready.map_err(Failed::Writing)?,
            ready = from.readable(), if want_in => ready.map_err(Failed::Reading)?,
        }
        if want_in {
            let room = pipe.size - pipe.full;
            let filled = from.try_io(Interest::READABLE, || {
                match splice(from, None, &pipe.write, None, room, SpliceFlags::NONBLOCK) {
                    Err(Errno::AGAIN) if pipe.full > 0 => Ok(None),
                    result => Ok(Some(result?)),
                }
            });
            match filled {
                Ok(Some(0)) => eof = true,
                Ok(Some(n)) => {
                    pipe.full += n;
                    if n < super::QUICK_ACK_BELOW {
                        super::quick_ack(from);
                    }
                    if pipe.full == pipe.size && !pipe.grown {
                        pipe.grow();
                    }
                }
                Ok(None) => pipe_maybe_full = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if unsupported(&e) => return give_up(pipe, to, count).await,
                Err(e) => return Err(Failed::Reading(e)),
            }
        }
        if pipe.full > 0 {
            let full = pipe.full;
            let emptied = to.try_io(Interest::WRITABLE, || {
                Ok(splice(
                    &pipe.read,
                    None,
                    to,
                    None,
                    full,
                    SpliceFlags::NONBLOCK,
                )?)
            });
            match emptied {
                Ok(n) => {
                    pipe.full -= n;
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    pipe_maybe_full = false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if unsupported(&e) => return give_up(pipe, to, count).await,
                Err(e) => return Err(Failed::Writing(e)),
            }
        }
    }
}

/// The errors of a kernel or file that cannot splice, as opposed to a connection that failed.
fn unsupported(e: &io::Error) -> bool {
    [Errno::INVAL, Errno::NOSYS, Errno::OPNOTSUPP]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

/// Writes out what is still in the pipe, so that the copy loop can take over without losing a byte.
async fn give_up(pipe: Pipe, to: &TcpStream, count: &AtomicU64) -> Result<bool, Failed> {
    let mut left = vec![0u8; pipe.full];
    std::fs::File::from(pipe.read)
        .read_exact(&mut left)
        .map_err(Failed::Writing)?;
    super::write_all(to, &left, count).await?;
    Ok(false)
}
