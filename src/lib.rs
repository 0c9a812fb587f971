//! ssh-on-demand: boots a VM when someone connects to it with plain `ssh`, then relays the connection, and
//! stops the VM again once nobody has used it for a while.
//!
//! A connection comes in through one of two [`mode`]s and is served by [`session`]: the client's
//! identification ([`wire`]), its VM's lease and shared start ([`vm::lifecycle`]), the start API
//! ([`vm::api`]), the wait for the VM's sshd ([`vm::readiness`]), and the relay ([`relay`]), or a refusal the
//! user can read ([`report`]). [`guard`] decides who may wake VMs at all.

// Public: what the binary, the tests, the fuzz targets and the examples use; the rest is the crate's own.
pub mod cli;
pub mod commands;
pub mod config;
mod guard;
mod limits;
pub mod logging;
mod memory;
mod metrics;
pub mod mode;
pub mod relay;
pub mod report;
mod secret;
mod session;
mod status;
pub mod vm;
pub mod wire;

use std::time::Duration;

use anyhow::{Context, Result};

/// The async runtime of each mode: one thread for a single connection, which starts fastest and is all its
/// relay needs; all cores for the daemon.
pub fn runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        // Room for the events of one connection's few sockets, not tokio's default 1,024 (12 KiB that a
        // per-connection process would hold for the session's life).
        builder.max_io_events_per_tick(16);
        builder
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// "120 s", "1.5 s": durations in the words users read.
pub(crate) fn seconds(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs:.0} s")
    } else {
        format!("{secs:.1} s")
    }
}
