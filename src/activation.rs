//! Activation: the client connection systemd hands over, and stdout/stderr kept off it.

use std::{
    fs::File,
    io,
    net::TcpStream,
    os::fd::{AsFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, bail, ensure};
use listenfd::ListenFd;
use socket2::{Domain, SockRef, Type};

/// What [`protect_stdio`] found.
#[derive(Debug, Clone, Copy)]
pub struct Stdio {
    /// stderr is open and is not a TCP socket, so log lines written there reach a person, not a client.
    pub stderr_usable: bool,
    /// systemd handed us a connection (on fd 0, or announced by `LISTEN_FDS`): someone is waiting for an answer.
    pub connection_waiting: bool,
}

/// Points stdout and stderr at `/dev/null` where they are TCP sockets.
///
/// Under `Accept=yes` with `StandardInput=socket`, systemd's default `StandardOutput=inherit` makes fd 1 the
/// client's connection, and `StandardError=inherit` fd 2 as well. Any byte written there (a log line, clap's
/// usage text, a panic message) would reach the ssh client, which then aborts. No TCP socket is ever a place
/// for our output, so this runs first thing in `main`, before any mode is known.
pub fn protect_stdio() -> Stdio {
    if is_tcp(io::stdout().as_fd()) {
        // Nothing useful can be done if /dev/null cannot be opened; the check below then finds stderr unusable.
        let _ = File::open("/dev/null").and_then(|null| Ok(rustix::stdio::dup2_stdout(&null)?));
    }
    let stderr_usable = if is_tcp(io::stderr().as_fd()) {
        let _ = File::open("/dev/null").and_then(|null| Ok(rustix::stdio::dup2_stderr(&null)?));
        false
    } else {
        rustix::fs::fstat(io::stderr().as_fd()).is_ok()
    };
    Stdio {
        stderr_usable,
        connection_waiting: is_tcp(io::stdin().as_fd()) || std::env::var_os("LISTEN_FDS").is_some(),
    }
}

/// Takes the client's connection the way systemd passes it with `Accept=yes`: as fd 3 with `LISTEN_FDS=1`, or
/// else as fd 0 (`StandardInput=socket`). Call it before any thread starts: it reads and clears `LISTEN_*`.
pub fn take_client() -> Result<TcpStream> {
    let mut listen_fds = ListenFd::from_env();
    let fd = match listen_fds.len() {
        0 => {
            let fd = io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .context("fd 0 is not open")?;
            check_connected_tcp(&fd).context(
                "fd 0 is not a connected TCP socket; ssh-on-demand serves one connection handed over by a \
                 systemd socket unit with Accept=yes (see README.md), or run `ssh-on-demand check-config`",
            )?;
            // With fd 0 on /dev/null our duplicate is the only handle on the connection, so dropping it closes
            // the connection rather than leaving it half-open until exit.
            let null = File::open("/dev/null").context("opening /dev/null")?;
            rustix::stdio::dup2_stdin(&null).context("pointing fd 0 at /dev/null")?;
            fd
        }
        1 => {
            let raw = listen_fds
                .take_raw_fd(0)?
                .context("the LISTEN_FDS socket was already taken")?;
            // SAFETY: under the sd_listen_fds protocol fd 3 is ours, and ListenFd hands each fd out only once.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            check_connected_tcp(&fd).context(
                "LISTEN_FDS passed a socket that is not a connected TCP socket: the socket unit needs Accept=yes",
            )?;
            fd
        }
        n => bail!(
            "systemd passed {n} sockets (LISTEN_FDS={n}); with Accept=yes it passes exactly one connection"
        ),
    };
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    Ok(stream)
}

fn is_tcp(fd: impl AsFd) -> bool {
    let socket = SockRef::from(&fd);
    matches!(socket.domain(), Ok(domain) if domain == Domain::IPV4 || domain == Domain::IPV6)
        && matches!(socket.r#type(), Ok(kind) if kind == Type::STREAM)
}

fn check_connected_tcp(fd: &OwnedFd) -> Result<()> {
    ensure!(is_tcp(fd), "not a TCP socket");
    SockRef::from(fd)
        .peer_addr()
        .context("the socket has no peer")?;
    Ok(())
}
