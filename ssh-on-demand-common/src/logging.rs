use std::{
    io::{self, IsTerminal},
    os::fd::AsFd,
};

use anyhow::{Context, Result, ensure};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal under systemd or when stderr cannot be used; stderr otherwise.
    Auto,
    /// The journal, with structured fields; an error if journald is not running.
    Journald,
    /// Standard error, one line per record; an error if stderr cannot be used (closed, or a client's
    /// connection).
    Stderr,
}

/// Who logs: the journal's `SYSLOG_IDENTIFIER`, and the crate whose records are kept at the chosen level.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    pub syslog_identifier: &'static str,
    /// `env!("CARGO_CRATE_NAME")` of the program's crate.
    pub crate_name: &'static str,
}

/// Installs the global subscriber. `stderr_usable` is false where stderr is closed or is a client's
/// connection, which no log line may reach.
pub fn init(
    program: Program,
    target: LogTarget,
    level: LevelFilter,
    stderr_usable: bool,
) -> Result<()> {
    // Our records at `level`; the libraries we use only when they warn, however verbose we are.
    let filter = Targets::new()
        .with_target(program.crate_name, level)
        .with_default(level.min(LevelFilter::WARN));

    let use_journald = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => {
            ensure!(
                stderr_usable,
                "cannot log to stderr: it is a client's connection or closed"
            );
            false
        }
        LogTarget::Auto => !stderr_usable || under_systemd(),
    };
    let journald = if use_journald {
        match journald_layer(program) {
            Ok(layer) => Some(layer),
            Err(e) if target == LogTarget::Journald => return Err(e),
            // Auto: fall back to stderr if we can, else log nowhere rather than into a client's socket.
            Err(_) => None,
        }
    } else {
        None
    };
    let stderr = (journald.is_none() && stderr_usable).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(io::stderr)
            .with_ansi(io::stderr().is_terminal())
    });

    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init()
        .context("installing the log subscriber")
}

fn journald_layer(program: Program) -> Result<tracing_journald::Layer> {
    Ok(tracing_journald::layer()
        .context("connecting to journald")?
        // Our field names are chosen not to collide with journald's (CLIENT_ADDR, OUTCOME, VM, …), and
        // unprefixed they are what an operator types: `journalctl CLIENT_ADDR=203.0.113.9`.
        .with_field_prefix(None)
        .with_syslog_identifier(program.syslog_identifier.to_owned()))
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
    match rustix::fs::fstat(io::stderr().as_fd()) {
        Ok(stat) => dev.parse() == Ok(stat.st_dev) && ino.parse() == Ok(stat.st_ino),
        Err(_) => false,
    }
}
