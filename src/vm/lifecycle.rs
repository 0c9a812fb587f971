//! Lifecycle: one start call for a burst of connections, sessions that keep their VM up, and the idle stop,
//! the same in both modes, through the shared [`store`](super::store).
//!
//! A connection registers as a session of its VM as soon as it has identified ([`Lifecycle::join`]) and
//! stays one until it ends, relayed or not. Its start ([`Lease::start`]) is made under the VM's gate: a
//! connection that finds a start in flight, or the VM still booting from one, shares that start's answer.
//! When the last session ends ([`Lease::leave`]), one process (or task) becomes the VM's idle waiter
//! ([`IdleWatch`]): it stops the VM once `idle_timeout` has passed since the last disconnect, unless a session
//! exists by then. A connection that arrives while the stop call is in flight waits at the gate for it, then
//! starts the VM again. A process killed in the middle leaves no lock behind; what it leaves undone (an idle
//! wait, a session's disconnect) the next [`sweep`] takes over.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use tracing::{Instrument, Level, debug, info_span, warn};

use super::{
    api::{Api, ApiError, Started, StopRequest},
    store::{
        Call, Gate, IdleLock, IdleWait, Phase, SessionFile, SessionInfo, Store, VmDir, VmKey,
        VmState, now_ms,
    },
};
use crate::{cli::VmScope, config::Profile};

/// Journal `MESSAGE_ID` of every decision about a VM's life: idle wait, stop or not, and why.
pub const LIFECYCLE_MESSAGE_ID: &str = "7b0c9e52d4a84f61a3e1c05d2f96b8e4";

/// The shared state of every VM of this host.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    store: Store,
}

impl Lifecycle {
    pub fn new(store: Store) -> Lifecycle {
        Lifecycle { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The address of the VM that `client` would get under `profile`, if it is running (or booting) as far as
    /// this host knows: for a client that says nothing, which must not start it.
    pub fn running(&self, profile: &Profile, client: SocketAddr) -> Option<SocketAddr> {
        let dir = self.store.existing(&key(profile, client))?;
        dir.state().ok()?.running(now_ms())
    }

    /// Registers the connection from `client` as a session of its VM under `profile`.
    pub fn join(&self, profile: &Arc<Profile>, client: SocketAddr) -> io::Result<Lease> {
        let key = key(profile, client);
        let dir = self.store.vm(&key)?;
        let session = dir.register(&SessionInfo {
            client,
            pid: std::process::id(),
            since: now_ms(),
        })?;
        // Registered first: a start that ends after this read is one this connection was there for.
        let seen = dir.state()?;
        Ok(Lease {
            dir,
            session: Some(session),
            starts_seen: seen.starts,
            running: seen.running(now_ms()),
            profile: profile.clone(),
        })
    }
}

/// Which connections share a VM.
pub fn key(profile: &Profile, client: SocketAddr) -> VmKey {
    VmKey {
        profile: profile.label().to_owned(),
        client: (profile.vm_scope == VmScope::Client).then_some(client.ip()),
    }
}

/// One connection's registration with its VM.
#[derive(Debug)]
pub struct Lease {
    dir: VmDir,
    /// `None` once the session has ended, before [`Lease::leave`] records it.
    session: Option<SessionFile>,
    /// Starts of the VM that had ended when this connection joined: a later one ended while it was there.
    starts_seen: u64,
    /// The VM's address when this connection joined, if it was running.
    running: Option<SocketAddr>,
    profile: Arc<Profile>,
}

impl Lease {
    pub fn key(&self) -> &VmKey {
        self.dir.key()
    }

    /// The VM's address if it was running when this connection joined: most likely where the start API
    /// will point again.
    pub fn running(&self) -> Option<SocketAddr> {
        self.running
    }

    /// The VM's address: from a start of another connection that was in flight when this one joined or is
    /// still booting, or else from `call`, made under the gate so that connections arriving meanwhile share
    /// it. `shared` tells which.
    pub async fn start<F>(&self, call: F) -> io::Result<(Result<Started, ApiError>, bool)>
    where
        F: Future<Output = Result<Started, ApiError>>,
    {
        let gate = match self.dir.try_gate()? {
            Some(gate) => gate,
            None => {
                debug!(vm_key = %self.key(), "waiting for the start or stop in progress");
                self.dir.gate().await?
            }
        };
        let mut state = gate.read()?;
        if let Some(shared) = self.shareable(&state) {
            return Ok((shared, true));
        }
        let before = state.clone();
        state.enter(Phase::Starting, now_ms());
        gate.write(&state)?;
        let began = now_ms();
        let result = call.await;
        let now = now_ms();
        let (ok, detail) = match &result {
            Ok(started) => {
                state.enter(Phase::Booting, now);
                state.vm = Some(started.addr);
                state.booting_until = Some(now + millis(self.profile.boot_timeout));
                (true, started.addr.to_string())
            }
            // A VM that ran before this failed call may run still: what was known of it stays, so that
            // it is stopped once idle.
            Err(error) if before.may_run() => {
                state.phase = before.phase;
                state.since = before.since;
                state.pid = None;
                (false, error.to_string())
            }
            Err(error) => {
                state.enter(Phase::Failed, now);
                state.booting_until = None;
                (false, error.to_string())
            }
        };
        state.starts += 1;
        state.last_start = Some(Call {
            at: now,
            ok,
            detail,
            ms: now - began,
        });
        // The call was made: its answer stands even if the others cannot share it.
        if let Err(e) = gate.write(&state) {
            warn!("recording the start in {}: {e}", self.dir.key());
        }
        Ok((result, false))
    }

    /// Another connection's start that this one may take as its own.
    fn shareable(&self, state: &VmState) -> Option<Result<Started, ApiError>> {
        let fresh = state
            .last_start
            .as_ref()
            .filter(|_| state.starts > self.starts_seen);
        let booting = state.booting(now_ms());
        match (fresh, state.vm) {
            (Some(call), _) if !call.ok => Some(Err(ApiError::Shared(call.detail.clone()))),
            (Some(_), Some(addr)) => Some(Ok(Started { addr, attempts: 0 })),
            (None, Some(addr)) if booting => Some(Ok(Started { addr, attempts: 0 })),
            _ => None,
        }
    }

    /// The VM's sshd answered: later connections ask the start API again rather than share a boot. Skipped
    /// if the gate is busy: the next connection to get through will say it.
    pub fn ready(&self) {
        let Ok(Some(gate)) = self.dir.try_gate() else {
            return;
        };
        if let Ok(mut state) = gate.read()
            && state.phase == Phase::Booting
        {
            state.enter(Phase::Up, now_ms());
            state.booting_until = None;
            let _ = gate.write(&state);
        }
    }

    /// Ends the session. If it was the VM's last one, the VM may be running and a stop API is configured,
    /// returns the idle wait for the caller to run; `None` if another process waits already, or nothing will.
    /// The session is over: from now on it keeps the VM up no more. (The rest is [`Lease::leave`]'s.)
    pub fn end(&mut self) {
        self.session = None;
    }

    pub async fn leave(mut self) -> io::Result<Option<IdleWatch>> {
        self.end();
        let Lease { dir, profile, .. } = self;
        let gate = dir.gate().await?;
        let mut state = gate.read()?;
        let now = now_ms();
        state.last_disconnect = Some(now);
        let Some(stop) = &profile.stop else {
            gate.write(&state)?;
            return Ok(None);
        };
        let due = now + millis(stop.idle_timeout);
        if let Some(idle) = &mut state.idle {
            // The waiter re-reads the clock when it wakes.
            idle.due = due;
        }
        let (live, _) = gate.live_sessions()?;
        let idle = if live == 0 && state.may_run() {
            gate.try_idle()?
        } else {
            None
        };
        let watch = idle.map(|lock| IdleWatch::begin(&mut state, &dir, lock, &profile, due));
        gate.write(&state)?;
        if watch.is_some() {
            decision(
                Level::INFO,
                &dir,
                &state,
                "idle",
                "the last session ended",
                Duration::ZERO,
            );
        }
        Ok(watch)
    }
}

/// How an idle wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Stopped,
    /// The stop API failed; the sweep tries again after another idle timeout.
    Failed,
    /// A session came, or the VM is not running: nothing to stop.
    Kept,
}

/// The one wait for a VM's idle timeout, and the stop at its end.
#[derive(Debug)]
pub struct IdleWatch {
    dir: VmDir,
    lock: IdleLock,
    profile: Arc<Profile>,
    due: u64,
}

impl IdleWatch {
    /// This process becomes the VM's waiter, holding `lock`, until `due`; `state` says so once written.
    fn begin(
        state: &mut VmState,
        dir: &VmDir,
        lock: IdleLock,
        profile: &Arc<Profile>,
        due: u64,
    ) -> IdleWatch {
        state.idle = Some(IdleWait::mine(due));
        IdleWatch {
            dir: dir.clone(),
            lock,
            profile: profile.clone(),
            due,
        }
    }

    pub fn key(&self) -> &VmKey {
        self.dir.key()
    }

    /// When the VM is to be stopped unless a connection comes (ms since the epoch).
    pub fn due(&self) -> u64 {
        self.due
    }

    /// Waits until the VM has been idle for its `idle_timeout`, then stops it through `api`, unless a session
    /// exists by then. Returns once the VM is stopped, kept, or its stop failed; every decision is logged.
    pub async fn run(self, api: &Api) -> Stopped {
        let span = info_span!("vm", vm_key = %self.dir.key(), profile = %self.profile.label());
        match self.wait_and_stop(api).instrument(span.clone()).await {
            Ok(stopped) => stopped,
            Err(e) => {
                span.in_scope(|| warn!("idle wait ended: {e}"));
                Stopped::Failed
            }
        }
    }

    async fn wait_and_stop(mut self, api: &Api) -> io::Result<Stopped> {
        let Some(stop) = &self.profile.stop else {
            return Ok(Stopped::Kept);
        };
        loop {
            let wait = self.due.saturating_sub(now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let gate = self.dir.gate().await?;
            let mut state = gate.read()?;
            let now = now_ms();
            let (live, dead) = gate.live_sessions()?;
            if dead > 0 {
                // Their processes died at some time before now: count the idle time from now.
                state.last_disconnect = Some(now);
            }
            let reason = if live > 0 {
                Some(format!("{live} session(s) open"))
            } else if !state.may_run() {
                Some(format!("the VM is {}", state.phase.as_str()))
            } else {
                None
            };
            if let Some(reason) = reason {
                state.idle = None;
                gate.write(&state)?;
                decision(
                    Level::INFO,
                    &self.dir,
                    &state,
                    "keep",
                    &reason,
                    Duration::ZERO,
                );
                return Ok(Stopped::Kept);
            }
            let idle_since = state.last_disconnect.unwrap_or(now);
            let due = idle_since + millis(stop.idle_timeout);
            if now < due {
                self.due = due;
                state.idle = Some(IdleWait::mine(due));
                gate.write(&state)?;
                continue;
            }
            let idle = Duration::from_millis(now - idle_since);
            return stop_vm(&gate, &mut state, &self.profile, api, idle, self.lock).await;
        }
    }
}

/// Stops the VM under `gate`, then lets the idle lock go before the gate does (so that whoever takes the gate
/// next can become the waiter).
async fn stop_vm(
    gate: &Gate,
    state: &mut VmState,
    profile: &Profile,
    api: &Api,
    idle: Duration,
    idle_lock: IdleLock,
) -> io::Result<Stopped> {
    let dir = gate.dir().clone();
    let (Some(stop), Some(vm)) = (&profile.stop, state.vm) else {
        state.idle = None;
        gate.write(state)?;
        return Ok(Stopped::Kept);
    };
    state.enter(Phase::Stopping, now_ms());
    state.idle = None;
    gate.write(state)?;
    decision(Level::INFO, &dir, state, "stop", "idle", idle);
    let request = StopRequest {
        vm_ip: vm.ip(),
        port: vm.port(),
        profile: profile.name.as_deref(),
        client_addr: dir.key().client,
        idle_seconds: idle.as_secs(),
    };
    let began = now_ms();
    let result = api.stop(&request, stop.timeout).await;
    let now = now_ms();
    let (ok, detail) = match &result {
        Some(Ok(_)) | None => (true, "stopped".to_owned()),
        Some(Err(error)) => (false, error.to_string()),
    };
    state.last_stop = Some(Call {
        at: now,
        ok,
        detail: detail.clone(),
        ms: now - began,
    });
    let stopped = if ok {
        state.enter(Phase::Stopped, now);
        state.stops += 1;
        gate.write(state)?;
        decision(Level::INFO, &dir, state, "stopped", &detail, idle);
        Stopped::Stopped
    } else {
        // Still up, as far as anyone knows: the next try comes after another idle timeout, by the sweep.
        state.enter(Phase::Up, now);
        state.last_disconnect = Some(now);
        gate.write(state)?;
        decision(Level::WARN, &dir, state, "stop_failed", &detail, idle);
        Stopped::Failed
    };
    drop(idle_lock);
    Ok(stopped)
}

/// One journal record per decision, with the fields an operator filters on.
fn decision(level: Level, dir: &VmDir, state: &VmState, decision: &str, why: &str, idle: Duration) {
    let vm = state.vm.map(|vm| vm.to_string());
    macro_rules! record {
        ($level:expr) => {
            tracing::event!(
                $level,
                message_id = LIFECYCLE_MESSAGE_ID,
                vm_key = %dir.key(),
                profile = %dir.key().profile,
                vm = vm.as_deref(),
                decision,
                why,
                idle_s = idle.as_secs(),
                "{}: {decision} ({why})",
                dir.key()
            )
        };
    }
    if level == Level::WARN {
        record!(Level::WARN);
    } else {
        record!(Level::INFO);
    }
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

mod sweep;
#[cfg(test)]
mod tests;

pub use sweep::sweep;
