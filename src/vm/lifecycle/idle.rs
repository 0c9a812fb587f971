//! The idle wait: one process (or task) per VM waits until the machine says the VM is due, then stops it,
//! unless a session exists by then.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{Instrument, Level, info_span, warn};

use super::{DEFERRED_RETRY, decision, defer, rules, tick_holding};
use crate::{
    config::Profile,
    vm::{
        api::{Api, StopRequest},
        state::{self, Action, Event, Holder, Millis, Rules, View},
        store::{Registration, Store, StoreError, VmKey, now_ms},
    },
};

/// How often a waiter looks at the configuration again while it waits: an operator may change `idle_timeout`,
/// the keep-warm windows or the stop API meanwhile, and `status` shows the stop time by the configuration as
/// it is now. A later stop applies at once, an earlier one within this.
const RECONSIDER: Duration = Duration::from_secs(60);

/// The configuration as it is now, for a waiter: the daemon's current one, or the file read again by a
/// per-connection process, which may wait long after it read it.
pub trait Profiles: Send + Sync {
    /// The profile labelled `label` as configured now, and its API; the same `Arc` while the configuration
    /// is unchanged. `None` when it cannot be had (the profile is gone, the file is broken): the waiter keeps
    /// what it has.
    fn now(&self, label: &str) -> Option<(Arc<Profile>, Arc<Api>)>;
}

/// How an idle wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleEnd {
    Stopped,
    /// The stop API failed; it is tried again after another idle timeout.
    Failed,
    /// A session came, or the VM is not running, or another holds its stop: nothing to stop here.
    Kept,
}

/// The wait for a VM's idle timeout, and the stop at its end.
#[derive(Debug)]
pub struct IdleWatch {
    pub(super) store: Store,
    pub(super) key: VmKey,
    pub(super) profile: Arc<Profile>,
    pub(super) due: Millis,
    pub(super) _waiter: Registration,
}

impl IdleWatch {
    pub fn key(&self) -> &VmKey {
        &self.key
    }

    /// When the VM is to be stopped unless a connection comes (ms since the epoch).
    pub fn due(&self) -> Millis {
        self.due
    }

    /// Waits until the machine says the VM is due, then stops it through `api`, unless a session exists by
    /// then; the profile and its API as `profiles` has them now, once they change. Returns once the VM is
    /// stopped, kept, or its stop failed; every decision is logged.
    pub async fn run(self, api: Arc<Api>, profiles: &dyn Profiles) -> IdleEnd {
        let span = info_span!("vm", vm_key = %self.key, profile = %self.profile.label());
        match self
            .wait_and_stop(api, profiles)
            .instrument(span.clone())
            .await
        {
            Ok(stopped) => stopped,
            Err(e) => {
                span.in_scope(|| warn!("idle wait ended: {e}"));
                IdleEnd::Failed
            }
        }
    }

    async fn wait_and_stop(
        mut self,
        mut api: Arc<Api>,
        profiles: &dyn Profiles,
    ) -> Result<IdleEnd, StoreError> {
        let mut rules = rules(&self.profile);
        let mut deferred = false;
        loop {
            // A changed profile goes to the machine at once: it says when the VM is due by the new rules.
            let changed = match profiles.now(&self.key.profile) {
                Some((profile, now)) if !Arc::ptr_eq(&profile, &self.profile) => {
                    (self.profile, api) = (profile, now);
                    rules = super::rules(&self.profile);
                    true
                }
                _ => false,
            };
            if !changed && now_ms() < self.due {
                let wake = self.due.min(now_ms() + state::millis(RECONSIDER));
                tokio::time::sleep(Duration::from_millis(wake.saturating_sub(now_ms()))).await;
                continue;
            }
            if !self.store.may_decide() {
                if !deferred {
                    defer(&self.store, &self.key);
                    deferred = true;
                }
                self.due = now_ms() + state::millis(DEFERRED_RETRY);
                continue;
            }
            deferred = false;
            let (_claim, me, view, action) = tick_holding(&self.store, &self.key, &rules).await?;
            match action {
                Action::WaitUntil(due) => self.due = due,
                Action::CallStop(vm) => {
                    return self.stop(&api, &view, vm, &me, &rules).await;
                }
                _ => {
                    let why = match view.sessions {
                        Some(n) if n > 0 => format!("{n} session(s) open"),
                        _ => format!("the VM is {}", view.shown()),
                    };
                    decision(Level::INFO, &self.key, &view, "keep", &why, Duration::ZERO);
                    return Ok(IdleEnd::Kept);
                }
            }
        }
    }

    /// Calls the stop API as the holder of the VM's stop, and records how it went.
    async fn stop(
        &self,
        api: &Api,
        view: &View,
        vm: SocketAddr,
        me: &Holder,
        rules: &Rules,
    ) -> Result<IdleEnd, StoreError> {
        let Some(stop) = &self.profile.stop else {
            return Ok(IdleEnd::Kept);
        };
        let idle = Duration::from_millis(now_ms().saturating_sub(view.record.since));
        decision(Level::INFO, &self.key, view, "stop", "idle", idle);
        let request = StopRequest {
            vm_ip: vm.ip(),
            port: vm.port(),
            profile: self.profile.name.as_deref(),
            client_addr: self.key.client,
            idle_seconds: idle.as_secs(),
        };
        let began = Instant::now();
        let result = match api.stop(&request, stop.timeout).await {
            Some(Ok(_)) | None => Ok(()),
            Some(Err(error)) => Err(error.to_string()),
        };
        let event = Event::StopDone {
            me,
            result: result.as_ref().map(|_| ()).map_err(String::as_str),
            ms: began.elapsed().as_millis() as u64,
        };
        let (after, ()) = self
            .store
            .transact(&self.key, false, |view| {
                (state::step(view, event, now_ms(), rules).write, ())
            })
            .await?;
        Ok(match result {
            Ok(()) => {
                decision(Level::INFO, &self.key, &after, "stopped", "stopped", idle);
                IdleEnd::Stopped
            }
            Err(detail) => {
                decision(Level::WARN, &self.key, &after, "stop_failed", &detail, idle);
                IdleEnd::Failed
            }
        })
    }
}
