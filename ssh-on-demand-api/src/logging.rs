//! Logging: native journald records under systemd (fields such as `PROFILE`, `VM`, `CLIENT_ADDR`), stderr
//! elsewhere.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

pub const SYSLOG_IDENTIFIER: &str = "ssh-on-demand-api";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal under systemd, stderr otherwise.
    Auto,
    /// The journal; an error if journald is not running.
    Journald,
    /// Standard error.
    Stderr,
}

pub fn init(target: LogTarget, level: LevelFilter) -> Result<()> {
    // Our records at `level`; the libraries' only when they warn.
    let filter = Targets::new()
        .with_target(env!("CARGO_CRATE_NAME"), level)
        .with_default(level.min(LevelFilter::WARN));
    let journald = match target {
        LogTarget::Journald => Some(journald_layer()?),
        LogTarget::Auto if under_systemd() => journald_layer().ok(),
        _ => None,
    };
    let stderr = journald.is_none().then(|| {
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
        // Unprefixed, the fields are what an operator types: `journalctl VM=dev`.
        .with_field_prefix(None)
        .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned()))
}

fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some() || std::env::var_os("JOURNAL_STREAM").is_some()
}
