//! Status: what `ssh-on-demand status` shows an operator of every VM the store knows, read without changing
//! anything while connections go on in other processes (or on other hosts).

use std::{fmt::Write, net::IpAddr, time::Duration};

use serde::Serialize;

use crate::{
    config::Config,
    guard::SourceRecord,
    vm::{
        lifecycle::rules,
        state::{CallEnd, Holder, Millis, Phase, Shown},
        store::{SessionInfo, Store, StoreError, VmKey, now_ms},
    },
};

/// What `status` shows: the store, the hosts sharing it (etcd), every VM in it, and the client addresses
/// the guard refuses or watches.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The state directory, or `etcd PREFIX`.
    pub store: String,
    pub hosts: Option<Hosts>,
    pub vms: Vec<VmStatus>,
    pub sources: Vec<SourceStatus>,
}

/// A client address that is penalized, or has strikes.
#[derive(Debug, Serialize)]
pub struct SourceStatus {
    pub addr: IpAddr,
    pub penalized_until: Option<Millis>,
    pub strikes: usize,
    /// Penalties in a row so far.
    pub penalties: u32,
}

/// The addresses worth an operator's look, from the store's records.
pub async fn sources(store: &Store) -> Result<Vec<SourceStatus>, StoreError> {
    let now = now_ms();
    let mut found: Vec<SourceStatus> = store
        .sources()
        .await?
        .into_iter()
        .filter_map(|(addr, body)| {
            let record: SourceRecord = serde_json::from_slice(&body).ok()?;
            let penalized_until = record.penalized_until.filter(|&until| until > now);
            (penalized_until.is_some() || !record.strikes.is_empty()).then_some(SourceStatus {
                addr,
                penalized_until,
                strikes: record.strikes.len(),
                penalties: record.penalties,
            })
        })
        .collect();
    found.sort_by_key(|s| s.addr);
    Ok(found)
}

/// The proxy hosts whose leases are alive, and whether this host's is.
#[derive(Debug, Serialize)]
pub struct Hosts {
    pub alive: Vec<String>,
    pub this_host: String,
    pub this_host_alive: bool,
}

impl Hosts {
    pub fn new(alive: Vec<String>, this_host: &str) -> Hosts {
        Hosts {
            this_host_alive: alive.iter().any(|h| h == this_host),
            this_host: this_host.to_owned(),
            alive,
        }
    }
}

/// One VM as `status --json` shows it; the text form says the same in words.
#[derive(Debug, Serialize)]
pub struct VmStatus {
    pub key: String,
    pub profile: String,
    /// The client address the VM belongs to, unless the profile shares one VM.
    pub client: Option<String>,
    pub vm: Option<String>,
    pub state: Shown,
    /// When that state began (ms since the epoch); `None` for a VM never started.
    pub since: Option<Millis>,
    pub sessions: Vec<SessionInfo>,
    /// Who makes the start or stop call in flight.
    pub holder: Option<Holder>,
    /// When the idle VM will be stopped (ms since the epoch), if a stop is due: after its idle timeout,
    /// outside keep-warm windows, and not before its min_run_time.
    pub stop_due: Option<Millis>,
    /// The end of the keep-warm window the VM is in, if it is in one.
    pub kept_warm_until: Option<Millis>,
    pub last_start: Option<CallEnd>,
    pub last_stop: Option<CallEnd>,
    pub starts: u64,
    pub stops: u64,
}

/// Every VM in `store`; `config` (when usable) gives each profile's idle timeout.
pub async fn collect(store: &Store, config: Option<&Config>) -> Result<Vec<VmStatus>, StoreError> {
    let mut vms = Vec::new();
    for key in store.vms().await? {
        if let Some(status) = vm_status(store, config, &key).await? {
            vms.push(status);
        }
    }
    Ok(vms)
}

async fn vm_status(
    store: &Store,
    config: Option<&Config>,
    key: &VmKey,
) -> Result<Option<VmStatus>, StoreError> {
    let Some(view) = store.view(key, false).await? else {
        return Ok(None);
    };
    let sessions = store.sessions(key).await?;
    let record = view.record.clone();
    let state = view.shown();
    let rules = config
        .and_then(|c| c.profile_labeled(&key.profile))
        .map(|p| rules(p));
    let now = now_ms();
    let stop_due = match record.phase {
        Phase::Idle { .. } => rules.as_ref().and_then(|r| r.may_stop_at(&record, now)),
        _ => None,
    };
    let kept_warm_until = rules.as_ref().and_then(|r| r.keep_warm.covering(now));
    Ok(Some(VmStatus {
        key: key.to_string(),
        profile: key.profile.clone(),
        client: key.client.map(|c| c.to_string()),
        vm: record.phase.vm().map(|vm| vm.to_string()),
        state,
        since: (state != Shown::New).then_some(record.since),
        holder: record.phase.holder().cloned(),
        sessions,
        stop_due,
        kept_warm_until,
        last_start: record.last_start,
        last_stop: record.last_stop,
        starts: record.starts,
        stops: record.stops,
    }))
}

/// The text an operator reads.
pub fn render(report: &Report) -> String {
    let now = now_ms();
    let mut out = String::new();
    if let Some(hosts) = &report.hosts {
        let _ = writeln!(
            out,
            "Hosts sharing {}: {}",
            report.store,
            if hosts.alive.is_empty() {
                "none".to_owned()
            } else {
                hosts.alive.join(", ")
            }
        );
        if !hosts.this_host_alive {
            let _ = writeln!(
                out,
                "This host ({}) holds no lease: its daemon is not running, or cannot reach the cluster.",
                hosts.this_host
            );
        }
    }
    if report.vms.is_empty() {
        let _ = writeln!(out, "No VM has been started through {} yet.", report.store);
    }
    for source in &report.sources {
        let mut line = format!("{}: {} strike(s)", source.addr, source.strikes);
        if let Some(until) = source.penalized_until {
            let _ = write!(
                line,
                ", refused until {} (penalty {} in a row)",
                when(until, now),
                source.penalties
            );
        }
        let _ = writeln!(out, "Client {line}");
    }
    for vm in &report.vms {
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
        let mut state = vm.state.to_string();
        if let Some(since) = vm.since {
            let _ = write!(state, " since {}", when(since, now));
        }
        if let Some(holder) = &vm.holder {
            let _ = write!(state, ", held by {}", holder_text(holder));
        }
        if !vm.sessions.is_empty() {
            let _ = write!(state, ", {} session(s)", vm.sessions.len());
        }
        match vm.stop_due {
            Some(due) if due >= now => {
                let _ = write!(state, ", stop due {}", when(due, now));
            }
            Some(due) => {
                let _ = write!(
                    state,
                    ", stop was due {}: the next sweep stops it",
                    when(due, now)
                );
            }
            None => {}
        }
        if let Some(until) = vm.kept_warm_until {
            let _ = write!(state, ", kept warm until {}", when(until, now));
        }
        let _ = writeln!(out, "  state: {state}");
        for session in &vm.sessions {
            let host = session
                .host
                .as_deref()
                .map(|h| format!("host {h}, "))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "    {}  for {}  ({host}pid {})",
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

fn holder_text(holder: &Holder) -> String {
    match &holder.host {
        Some(host) => format!("host {host} (pid {})", holder.pid),
        None => format!("pid {}", holder.pid),
    }
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
