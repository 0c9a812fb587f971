//! Status: what `ssh-on-demand status` shows an operator of every VM this host knows, read from the shared
//! state without changing it, while connections go on in other processes.

use std::{fmt::Write, path::Path, time::Duration};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::vm::store::{Call, Phase, Store, VmDir, now_ms};

/// One VM as `status --json` shows it; the text form says the same in words.
#[derive(Debug, Serialize)]
pub struct VmStatus {
    pub key: String,
    pub profile: String,
    /// The client address the VM belongs to, unless the profile shares one VM.
    pub client: Option<String>,
    pub vm: Option<String>,
    /// `new`, `starting`, `booting`, `up`, `idle`, `stopping`, `stopped`, `failed`, or `interrupted` for a
    /// start or stop whose process died.
    pub state: &'static str,
    /// When that state began (ms since the epoch).
    pub since: u64,
    pub sessions: Vec<SessionStatus>,
    /// When the idle VM will be stopped (ms since the epoch), if a stop is due.
    pub stop_due: Option<u64>,
    /// The process that waits to stop it, if one is alive.
    pub idle_waiter: Option<u32>,
    pub last_start: Option<Call>,
    pub last_stop: Option<Call>,
    pub starts: u64,
    pub stops: u64,
}

#[derive(Debug, Serialize)]
pub struct SessionStatus {
    pub client: String,
    pub pid: u32,
    pub since: u64,
}

/// Every VM under `state_dir`.
pub fn collect(state_dir: &Path) -> Result<Vec<VmStatus>> {
    let store = Store::new(state_dir);
    let vms = store
        .vms()
        .with_context(|| format!("reading {}", state_dir.display()))?;
    vms.iter()
        .map(|dir| vm_status(dir).with_context(|| format!("reading {}", dir.key())))
        .collect()
}

fn vm_status(dir: &VmDir) -> Result<VmStatus> {
    let state = dir.state()?;
    let sessions: Vec<SessionStatus> = dir
        .sessions()?
        .into_iter()
        .filter(|s| s.live)
        .filter_map(|s| s.info)
        .map(|info| SessionStatus {
            client: info.client.to_string(),
            pid: info.pid,
            since: info.since,
        })
        .collect();
    let busy = dir.gate_busy()?;
    let idle_waiter = state
        .idle
        .as_ref()
        .map(|idle| idle.pid)
        .filter(|pid| Path::new("/proc").join(pid.to_string()).exists());
    let (label, since) = match state.phase {
        Phase::Starting | Phase::Stopping if !busy => ("interrupted", state.since),
        Phase::Up | Phase::Booting if sessions.is_empty() => (
            "idle",
            state
                .last_disconnect
                .unwrap_or(state.since)
                .max(state.since),
        ),
        phase => (phase.as_str(), state.since),
    };
    let key = dir.key();
    Ok(VmStatus {
        key: key.to_string(),
        profile: key.profile.clone(),
        client: key.client.map(|c| c.to_string()),
        vm: state.vm.map(|vm| vm.to_string()),
        state: label,
        since,
        stop_due: (label == "idle")
            .then(|| state.idle.as_ref().map(|idle| idle.due))
            .flatten(),
        idle_waiter: idle_waiter.filter(|_| label == "idle"),
        sessions,
        last_start: state.last_start,
        last_stop: state.last_stop,
        starts: state.starts,
        stops: state.stops,
    })
}

/// The text an operator reads.
pub fn render(vms: &[VmStatus], state_dir: &Path) -> String {
    let now = now_ms();
    let mut out = String::new();
    if vms.is_empty() {
        let _ = writeln!(
            out,
            "No VM has been started through this host yet ({}).",
            state_dir.display()
        );
    }
    for vm in vms {
        let _ = writeln!(
            out,
            "{}: {}{}",
            vm.key,
            vm.vm.as_deref().unwrap_or("no address yet"),
            match &vm.client {
                Some(client) => format!(" (for {client})"),
                None => format!(" (profile {}, every client)", vm.profile),
            }
        );
        let mut state = format!("{} since {}", vm.state, when(vm.since, now));
        if !vm.sessions.is_empty() {
            let _ = write!(state, ", {} session(s)", vm.sessions.len());
        }
        match (vm.stop_due, vm.idle_waiter) {
            (Some(due), Some(_)) => {
                let _ = write!(state, ", stop due {}", when(due, now));
            }
            (Some(due), None) => {
                let _ = write!(
                    state,
                    ", stop was due {} but its waiter is gone: the next sweep stops it",
                    when(due, now)
                );
            }
            (None, _) => {}
        }
        let _ = writeln!(out, "  state: {state}");
        for session in &vm.sessions {
            let _ = writeln!(
                out,
                "    {}  for {}  (pid {})",
                session.client,
                age(session.since, now),
                session.pid
            );
        }
        for (what, call, count) in [
            ("start", &vm.last_start, vm.starts),
            ("stop", &vm.last_stop, vm.stops),
        ] {
            if let Some(call) = call {
                let _ = writeln!(
                    out,
                    "  last {what}: {} {}, after {} ms: {} ({count} in all)",
                    when(call.at, now),
                    if call.ok { "ok" } else { "failed" },
                    call.ms,
                    call.detail
                );
            }
        }
    }
    out
}

/// `2026-12-02T09:00:00Z (5m 3s ago)` or `(in 14m)`.
fn when(at: u64, now: u64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(at);
    let stamp = humantime::format_rfc3339_seconds(time);
    if at <= now {
        format!("{stamp} ({} ago)", age(at, now))
    } else {
        format!("{stamp} (in {})", age(now, at))
    }
}

fn age(since: u64, now: u64) -> String {
    let seconds = now.saturating_sub(since) / 1000;
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}
