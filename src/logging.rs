//! Logging: native journald records under systemd, stderr elsewhere, and never a byte to the client's socket.

use std::{io::IsTerminal, os::fd::AsFd};

use anyhow::{Context, Result, ensure};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

/// Journal records carry this as `SYSLOG_IDENTIFIER`, whatever the binary is called.
pub const SYSLOG_IDENTIFIER: &str = "ssh-on-demand";

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
/// [`crate::activation::protect_stdio`]) or is closed.
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
