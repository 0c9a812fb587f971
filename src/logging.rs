//! Logging: native journald records under systemd, stderr elsewhere, and never a byte to the client's socket.

use std::{fs::File, os::fd::AsFd};

use anyhow::Result;
use rustix::stdio;
use socket2::{Domain, SockRef, Type};
use ssh_on_demand_common::logging::{self, Program};
use tracing::level_filters::LevelFilter;

pub use ssh_on_demand_common::logging::LogTarget;

/// Journal records carry this as `SYSLOG_IDENTIFIER`, whatever the binary is called.
pub const SYSLOG_IDENTIFIER: &str = "ssh-on-demand";

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
    // rustix's handles, not std's: std::io::stdin() sets up an 8 KiB read buffer nobody here uses, which a
    // per-connection process would carry for its session's life.
    if is_tcp(stdio::stdout()) {
        // Nothing useful can be done if /dev/null cannot be opened; the check below then finds stderr unusable.
        let _ = File::open("/dev/null").and_then(|null| Ok(rustix::stdio::dup2_stdout(&null)?));
    }
    let stderr_usable = if is_tcp(stdio::stderr()) {
        let _ = File::open("/dev/null").and_then(|null| Ok(rustix::stdio::dup2_stderr(&null)?));
        false
    } else {
        rustix::fs::fstat(stdio::stderr()).is_ok()
    };
    Stdio {
        stderr_usable,
        connection_waiting: is_tcp(stdio::stdin()) || std::env::var_os("LISTEN_FDS").is_some(),
    }
}

/// Installs the global subscriber. `stderr_usable` is false when stderr was the client's socket (see
/// [`protect_stdio`]) or is closed.
pub fn init(target: LogTarget, level: LevelFilter, stderr_usable: bool) -> Result<()> {
    let program = Program {
        syslog_identifier: SYSLOG_IDENTIFIER,
        crate_name: env!("CARGO_CRATE_NAME"),
    };
    logging::init(program, target, level, stderr_usable)
}

/// An IPv4 or IPv6 stream socket: a client's connection, never a place for our output.
pub(crate) fn is_tcp(fd: impl AsFd) -> bool {
    let socket = SockRef::from(&fd);
    matches!(socket.domain(), Ok(domain) if domain == Domain::IPV4 || domain == Domain::IPV6)
        && matches!(socket.r#type(), Ok(kind) if kind == Type::STREAM)
}
