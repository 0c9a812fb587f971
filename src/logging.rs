//! Logging: native journald records under systemd, stderr elsewhere, and never a byte to the client's socket.

use std::{
    fs::File,
    io::{self, IsTerminal},
    os::fd::AsFd,
};

use anyhow::{Context, Result, ensure};
use socket2::{Domain, SockRef, Type};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal under systemd or when stderr cannot be used; stderr otherwise.
    Auto,
    /// The journal, with structured fields; an error if journald is not running.
    Journald,
    /// Standard error, one line per record; an error if stderr is the client's socket.
    Stderr,
}

/// Installs the global subscriber. `stderr_usable` is false when stderr was the client's socket (see
/// [`protect_stdio`]) or is closed.
pub fn init(target: LogTarget, level: LevelFilter, stderr_usable: bool) -> Result<()> {
    // Our records at `level`; the libraries we use only when they warn, however verbose we are.
    let filter = Targets::new()
        .with_target(env!("CARGO_CRATE_NAME"), level)
        .with_default(level.min(LevelFilter::WARN));

    let use_journald = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => {
            ensure!(
                stderr_usable,
                "cannot log to stderr: it is the client's connection or closed"
            );
            false
        }
        LogTarget::Auto => !stderr_usable || under_systemd(),
    };
    let journald = if use_journald {
        match journald_layer() {
            Ok(layer) => Some(layer),
            Err(e) if target == LogTarget::Journald => return Err(e),
            // Auto: fall back to stderr if we can, else log nowhere rather than into the client's socket.
            Err(_) => None,
        }
    } else {
        None
    };
    let stderr = (journald.is_none() && stderr_usable).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });

    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init()
        .context("installing the log subscriber")
}

fn journald_layer() -> Result<tracing_journald::Layer> {
    Ok(tracing_journald::layer()
        .context("connecting to journald")?
        // Our field names are chosen not to collide with journald's (CLIENT_ADDR, OUTCOME, …), and unprefixed
        // they are what an operator types: `journalctl CLIENT_ADDR=203.0.113.9`.
        .with_field_prefix(None)
        .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned()))
}

/// Started by systemd, or with stderr connected to the journal (`StandardError=journal`).
fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some() || stderr_is_journal()
}

/// `JOURNAL_STREAM` names the journal stream's device and inode; it only counts if stderr is still that file,
/// since a child of a service inherits the variable even when its stderr goes elsewhere.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let stderr = std::io::stderr();
    match rustix::fs::fstat(stderr.as_fd()) {
        Ok(stat) => dev.parse() == Ok(stat.st_dev) && ino.parse() == Ok(stat.st_ino),
        Err(_) => false,
    }
}

/// An IPv4 or IPv6 stream socket: a client's connection, never a place for our output.
pub(crate) fn is_tcp(fd: impl AsFd) -> bool {
    let socket = SockRef::from(&fd);
    matches!(socket.domain(), Ok(domain) if domain == Domain::IPV4 || domain == Domain::IPV6)
        && matches!(socket.r#type(), Ok(kind) if kind == Type::STREAM)
}
