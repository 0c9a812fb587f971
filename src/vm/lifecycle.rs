//! Lifecycle: drives each VM's [`state`](super::state) machine with a [`store`](super::store) and the APIs,
//! the same in both modes and with either store.
//!
//! A connection registers as a session of its VM as soon as it has identified ([`Lifecycle::join`]) and
//! stays one until it ends, relayed or not. Its start ([`Lease::start`]) follows the machine: it makes the
//! call itself, holding the VM's start, or shares another connection's, or waits for a stop in flight. When
//! the last session ends ([`Lease::leave`]), one process (or task) becomes the VM's idle waiter
//! ([`IdleWatch`]), which stops the VM once the machine says it is due. What a killed process leaves undone,
//! the next [`sweep`] takes over.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{Level, debug, warn};

use super::{
    api::{ApiError, Started},
    state::{self, Action, Event, Holder, Rules, View},
    store::{Registration, SessionInfo, Store, StoreError, VmKey, now_ms},
};
use crate::{cli::VmScope, config::Profile};

/// Journal `MESSAGE_ID` of every decision about a VM's life: idle wait, stop or not, and why.
pub const LIFECYCLE_MESSAGE_ID: &str = "7b0c9e52d4a84f61a3e1c05d2f96b8e4";
/// How often a due stop is looked at again while this host may not decide (its sessions are not all in the
/// store yet).
pub const DEFERRED_RETRY: Duration = Duration::from_secs(1);

/// The VMs of this host, in their store.
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
    /// the store knows: for a client that says nothing, which must not start it.
    pub async fn running(&self, profile: &Profile, client: SocketAddr) -> Option<SocketAddr> {
        let view = self.store.view(&key(profile, client), false).await.ok()??;
        view.record.phase.running(now_ms())
    }

    /// Registers the connection from `client` as a session of its VM under `profile`.
    pub async fn join(
        &self,
        profile: &Arc<Profile>,
        client: SocketAddr,
    ) -> Result<Lease, StoreError> {
        let key = key(profile, client);
        let info = SessionInfo {
            client,
            pid: std::process::id(),
            since: now_ms(),
            host: self.store.host().map(str::to_owned),
        };
        let session = self.store.register(&key, &info).await?;
        // Registered first: a start that ends after this read is one this connection was there for. Without
        // it the session still counts (it is written when the store is back), but shares no start.
        let (starts_seen, running, unshared) = match self.store.view(&key, false).await {
            Ok(Some(seen)) => (
                seen.record.starts,
                seen.record.phase.running(now_ms()),
                None,
            ),
            Ok(None) => (0, None, None),
            Err(e) => (u64::MAX, None, Some(e)),
        };
        Ok(Lease {
            store: self.store.clone(),
            key,
            session: Some(session),
            starts_seen,
            running,
            unshared,
            booting: AtomicBool::new(false),
            woke: AtomicBool::new(false),
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

/// The machine's rules of `profile`.
pub fn rules(profile: &Profile) -> Rules {
    Rules {
        boot_timeout: profile.boot_timeout,
        idle_timeout: profile.stop.as_ref().map(|stop| stop.idle_timeout),
        min_run_time: profile.min_run_time,
        keep_warm: profile.keep_warm.clone(),
        pre_wake: profile.pre_wake,
    }
}

/// One connection's registration with its VM.
#[derive(Debug)]
pub struct Lease {
    store: Store,
    key: VmKey,
    /// `None` once the session has ended, before [`Lease::leave`] records it.
    session: Option<Registration>,
    /// Starts of the VM that had ended when this connection joined: a later one ended while it was there.
    starts_seen: u64,
    /// The VM's address when this connection joined, if it was running.
    running: Option<SocketAddr>,
    /// Why the store could not be read when this connection joined: its start will not be shared.
    unshared: Option<StoreError>,
    /// This connection's VM was booting (its own start, or a shared one): its sshd's answer is news.
    booting: AtomicBool,
    /// This connection made the start call for a VM that did not run (set before the call, so that it
    /// holds even if the connection leaves during it).
    woke: AtomicBool,
    profile: Arc<Profile>,
}

impl Lease {
    pub fn key(&self) -> &VmKey {
        &self.key
    }

    /// This connection made (or is making) the start call for a VM that did not run.
    pub fn woke(&self) -> bool {
        self.woke.load(Ordering::Relaxed)
    }

    /// Why the store could not be read when the connection joined, if it could not.
    pub fn unshared(&self) -> Option<&StoreError> {
        self.unshared.as_ref()
    }

    /// The VM's address if it was running when this connection joined: most likely where the start API
    /// will point again.
    pub fn running(&self) -> Option<SocketAddr> {
        self.running
    }

    /// The VM's address: shared from another connection's start, or from `call`, made by this connection as
    /// the holder of the VM's start (or, for a VM that runs, holding nothing). A stop in flight is waited for
    /// first. If the store cannot be used, `call` is made alone, and the store learns of its answer once it
    /// is back.
    pub async fn start<F>(&self, call: F) -> Start
    where
        F: Future<Output = Result<Started, ApiError>>,
    {
        let mut call = Some(call);
        match self.start_in_store(&mut call).await {
            Ok((result, how)) => Start {
                result,
                how,
                store_error: None,
            },
            Err(e) => {
                warn!("the shared state is unusable ({e}); asking the start API alone");
                let result = match call.take() {
                    Some(call) => call.await,
                    None => Err(ApiError::Shared(e.to_string())),
                };
                if let Ok(started) = &result {
                    self.store.unrecorded_start(&self.key, started.addr);
                }
                // Unknown whether the VM ran: it counts as woken, as the costlier guess.
                Start {
                    result,
                    how: How::Woke,
                    store_error: Some(e),
                }
            }
        }
    }

    /// [`Lease::start`] through the store; `call` is taken only once nothing can fail any more.
    async fn start_in_store<F>(
        &self,
        call: &mut Option<F>,
    ) -> Result<(Result<Started, ApiError>, How), StoreError>
    where
        F: Future<Output = Result<Started, ApiError>>,
    {
        let rules = rules(&self.profile);
        let mut call = || {
            call.take()
                .ok_or_else(|| StoreError::Etcd("the start was made already".to_owned()))
        };
        let mut claim: Option<Registration> = None;
        loop {
            let me = holder(&self.store, claim.as_ref());
            let (view, (action, cancels_idle)) = self
                .store
                .transact(&self.key, false, |view| {
                    let event = Event::Login {
                        me: &me,
                        starts_seen: self.starts_seen,
                    };
                    let step = state::step(view, event, now_ms(), &rules);
                    let idle = matches!(view.record.phase, state::Phase::Idle { .. });
                    match step.action {
                        // Holding a start takes a registration: made now, then decided again.
                        Action::CallStart if claim.is_none() => {
                            (state::Write::Keep, (step.action, false))
                        }
                        _ => (step.write, (step.action, idle)),
                    }
                })
                .await?;
            if cancels_idle {
                // Said now, where it happens: the waiter notices only when it wakes.
                let idle = Duration::from_millis(now_ms().saturating_sub(view.record.since));
                decision(
                    Level::INFO,
                    &self.key,
                    &view,
                    "kept",
                    "a login came during the idle wait; no stop",
                    idle,
                );
            }
            match action {
                Action::CallStart if claim.is_none() => {
                    claim = Some(self.store.claim(&self.key).await?);
                }
                Action::CallStart => {
                    let began = Instant::now();
                    self.woke.store(true, Ordering::Relaxed);
                    let result = call()?.await;
                    let answer = result.as_ref().map(|s| s.addr).map_err(|e| e.to_string());
                    let event = Event::Started {
                        me: &me,
                        answer: answer.as_ref().map(|a| *a).map_err(String::as_str),
                        ms: began.elapsed().as_millis() as u64,
                    };
                    // The call was made: its answer stands even if the others cannot share it.
                    if let Err(e) = self.apply(event, &rules).await {
                        warn!("recording the start of {}: {e}", self.key);
                    }
                    self.booting.store(result.is_ok(), Ordering::Relaxed);
                    return Ok((result, How::Woke));
                }
                Action::Warm(known) => {
                    let result = call()?.await;
                    if let Ok(started) = &result
                        && started.addr != known
                        && let Err(e) = self
                            .apply(Event::Answered { vm: started.addr }, &rules)
                            .await
                    {
                        warn!("recording the VM's new address for {}: {e}", self.key);
                    }
                    return Ok((result, How::Warm));
                }
                Action::Share(vm) => {
                    self.booting.store(true, Ordering::Relaxed);
                    return Ok((Ok(Started::known(vm)), How::Shared));
                }
                Action::ShareFailure(detail) => {
                    return Ok((Err(ApiError::Shared(detail)), How::Shared));
                }
                Action::Wait => {
                    debug!(vm_key = %self.key, "waiting for the start or stop in progress");
                    self.store.wait(&self.key, &view).await?;
                }
                // A login is never told to stop or wait for a time; asked anyway, it asks the API alone.
                Action::Nothing | Action::CallStop(_) | Action::WaitUntil(_) => {
                    return Ok((call()?.await, How::Warm));
                }
            }
        }
    }

    /// The VM's sshd answered at `vm`: later connections ask the start API again rather than share a boot.
    pub async fn ready(&self, vm: SocketAddr) {
        if !self.booting.load(Ordering::Relaxed) {
            return;
        }
        let rules = rules(&self.profile);
        if let Err(e) = self.apply(Event::Ready { vm }, &rules).await {
            debug!("recording that {} is up: {e}", self.key);
        }
    }

    async fn apply(&self, event: Event<'_>, rules: &Rules) -> Result<(), StoreError> {
        self.store
            .transact(&self.key, false, |view| {
                (state::step(view, event, now_ms(), rules).write, ())
            })
            .await
            .map(drop)
    }

    /// The session is over: from now on it keeps the VM up no more. (Recording it is [`Lease::leave`]'s.)
    pub async fn end(&mut self) {
        if let Some(session) = self.session.take() {
            self.store.end(&self.key, session).await;
        }
    }

    /// Ends the session and records it. If it was the VM's last one and a stop is due some day, returns the
    /// idle wait for the caller to run; `None` if another process (or task) waits already, or nothing will.
    pub async fn leave(mut self) -> Result<Option<IdleWatch>, StoreError> {
        self.end().await;
        let rules = rules(&self.profile);
        let (view, action) = self
            .store
            .transact(&self.key, true, |view| {
                let step = state::step(view, Event::Left, now_ms(), &rules);
                (step.write, step.action)
            })
            .await?;
        let Action::WaitUntil(due) = action else {
            return Ok(None);
        };
        let Some(waiter) = self.store.try_idle_waiter(&self.key)? else {
            return Ok(None);
        };
        decision(
            Level::INFO,
            &self.key,
            &view,
            "idle",
            "the last session ended",
            Duration::ZERO,
        );
        Ok(Some(IdleWatch {
            store: self.store,
            key: self.key,
            profile: self.profile,
            due,
            _waiter: waiter,
        }))
    }
}

/// A connection's start: the VM's address or why not, how it came, and why the store could not be used if
/// it could not.
pub struct Start {
    pub result: Result<Started, ApiError>,
    pub how: How,
    pub store_error: Option<StoreError>,
}

/// How a connection got its VM's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// It made the start call for a VM that did not run: it woke the VM.
    Woke,
    /// It asked the start API about a VM that runs.
    Warm,
    /// It took another connection's start.
    Shared,
}

/// Says that a decision about `key` waits for the store (journal record and metric).
pub(crate) fn defer(store: &Store, key: &VmKey) {
    if let Store::Etcd(etcd) = store {
        etcd.counters().deferred.inc();
    }
    tracing::event!(
        Level::WARN,
        message_id = LIFECYCLE_MESSAGE_ID,
        vm_key = %key,
        profile = %key.profile,
        decision = "deferred",
        why = "the store is not reachable, or this host's sessions are not all in it yet",
        "{key}: deferred (the store is not reachable, or this host's sessions are not all in it yet)"
    );
}

/// Steps `key`'s machine with a tick as the holder of a new claim, which the caller keeps if the machine made
/// it the holder of a start or stop: what the idle wait and the start ahead of logins both begin with.
async fn tick_holding(
    store: &Store,
    key: &VmKey,
    rules: &Rules,
) -> Result<(Registration, Holder, View, Action), StoreError> {
    let claim = store.claim(key).await?;
    let me = holder(store, Some(&claim));
    let (view, action) = store
        .transact(key, true, |view| {
            let step = state::step(view, Event::Tick { me: &me }, now_ms(), rules);
            (step.write, step.action)
        })
        .await?;
    Ok((claim, me, view, action))
}

/// This process as the holder of a call, by its registration (none yet: a placeholder that holds nothing).
fn holder(store: &Store, claim: Option<&Registration>) -> Holder {
    Holder {
        host: store.host().map(str::to_owned),
        pid: std::process::id(),
        claim: claim.map(|c| c.name.clone()).unwrap_or_default(),
    }
}

/// One journal record per decision, with the fields an operator filters on.
fn decision(level: Level, key: &VmKey, view: &View, decision: &str, why: &str, idle: Duration) {
    let vm = view.record.phase.vm().map(|vm| vm.to_string());
    macro_rules! record {
        ($level:expr) => {
            tracing::event!(
                $level,
                message_id = LIFECYCLE_MESSAGE_ID,
                vm_key = %key,
                profile = %key.profile,
                vm = vm.as_deref(),
                decision,
                why,
                idle_s = idle.as_secs(),
                "{key}: {decision} ({why})"
            )
        };
    }
    if level == Level::WARN {
        record!(Level::WARN);
    } else {
        record!(Level::INFO);
    }
}

mod idle;
mod sweep;
#[cfg(test)]
mod tests;
mod wake;

pub use idle::{IdleEnd, IdleWatch, Profiles};
pub use sweep::{Due, sweep, sweep_one};
pub use wake::PreWake;
