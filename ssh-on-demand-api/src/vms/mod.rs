//! The VMs behind the profiles: which VM a request means, one platform start however many requests ask at
//! once, the address within `address_timeout`, and stops that are graceful first and forced after
//! `stop_timeout`, or suspends that a later start resumes. Every decision is logged, and a start says how it
//! went (`HOW`: running, booted, resumed) and how long the platform took (`BOOT_MS`, `RESUME_MS`).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context, Result};
use futures_util::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use tokio::sync::oneshot;

mod start;
mod stop;

use start::{Outcome, start_vm};
use stop::stop_vm;

use crate::{
    backend::{Backend, How},
    config::{Config, DEFAULT_PROFILE, IfResumeFails, IfSuspendFails, StopMode},
    error::Failure,
};

pub struct Vms {
    profiles: BTreeMap<String, Profile>,
    backends: BTreeMap<String, Arc<Backend>>,
    address_timeout: Duration,
    stop_timeout: Duration,
    slots: Mutex<HashMap<(String, String), Arc<Slot>>>,
}

struct Profile {
    backend: String,
    vm: Option<String>,
    by_client: BTreeMap<IpAddr, String>,
    port: u16,
    policy: Policy,
}

/// A profile's choices for stops and resumes.
#[derive(Debug, Clone, Copy)]
struct Policy {
    stop_mode: StopMode,
    if_suspend_fails: IfSuspendFails,
    if_resume_fails: IfResumeFails,
}

/// One VM's coordination: `busy` is held for a whole start or stop, so the two never interleave.
#[derive(Default)]
struct Slot {
    busy: tokio::sync::Mutex<()>,
    start: Mutex<Option<SharedStart>>,
    last_address: Mutex<Option<IpAddr>>,
}

type SharedStart = Shared<BoxFuture<'static, Result<Outcome, Failure>>>;

/// Where the proxy should connect, and how the start went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub ip: IpAddr,
    pub port: u16,
    pub how: How,
    pub ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    AlreadyOff,
    AlreadySuspended,
    Stopping,
    Suspending,
}

/// What a request names: the backend's name, the backend, the VM, and the profile's policy.
struct Target {
    backend_name: String,
    backend: Arc<Backend>,
    vm: String,
    slot: Arc<Slot>,
    policy: Policy,
}

impl Vms {
    pub fn new(config: &Config) -> Result<Vms> {
        let mut backends = BTreeMap::new();
        for (name, backend) in &config.backends {
            let built = Backend::new(backend).with_context(|| format!("backend {name:?}"))?;
            backends.insert(name.clone(), Arc::new(built));
        }
        let profiles = config
            .profiles
            .iter()
            .map(|(name, p)| {
                let profile = Profile {
                    backend: p.backend.clone(),
                    vm: p.vm.clone(),
                    by_client: p.by_client.clone(),
                    port: p.port,
                    policy: Policy {
                        stop_mode: p.stop_mode,
                        if_suspend_fails: p.if_suspend_fails,
                        if_resume_fails: p.if_resume_fails,
                    },
                };
                (name.clone(), profile)
            })
            .collect();
        Ok(Vms {
            profiles,
            backends,
            address_timeout: config.address_timeout,
            stop_timeout: config.stop_timeout,
            slots: Mutex::default(),
        })
    }

    /// Starts the VM the request means, or joins the start already under way, and returns its address.
    pub async fn start(
        &self,
        profile: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Started, Failure> {
        let name = profile.unwrap_or(DEFAULT_PROFILE);
        let (target, port) = self.resolve(name, client, None)?;
        let run = {
            let mut start = target
                .slot
                .start
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match start.as_ref() {
                Some(run) => {
                    tracing::info!(
                        PROFILE = name,
                        VM = target.vm,
                        "{}: joining the start already under way",
                        target.vm
                    );
                    run.clone()
                }
                None => {
                    let run = self.spawn_start(&target);
                    *start = Some(run.clone());
                    run
                }
            }
        };
        let Outcome { ip, how, ms } = run.await?;
        Ok(Started { ip, port, how, ms })
    }

    fn spawn_start(&self, target: &Target) -> SharedStart {
        let (backend, vm, slot) = (
            target.backend.clone(),
            target.vm.clone(),
            target.slot.clone(),
        );
        let backend_name = target.backend_name.clone();
        let address_timeout = self.address_timeout;
        let if_resume_fails = target.policy.if_resume_fails;
        // A task of its own: the start goes on even if the request that began it is abandoned.
        let task = tokio::spawn(async move {
            let _busy = slot.busy.lock().await;
            let result = start_vm(&backend, &vm, address_timeout, if_resume_fails).await;
            match &result {
                Ok(Outcome { ip, how, ms }) => {
                    let (boot_ms, resume_ms) = match how {
                        How::Resumed => (None, *ms),
                        _ => (*ms, None),
                    };
                    tracing::info!(
                        BACKEND = backend_name,
                        VM = vm,
                        %ip,
                        HOW = how.as_str(),
                        BOOT_MS = boot_ms,
                        RESUME_MS = resume_ms,
                        "{vm}: start answered with the address {ip}"
                    );
                    *slot
                        .last_address
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(*ip);
                }
                Err(why) => {
                    tracing::warn!(BACKEND = backend_name, VM = vm, status = %why.status(), "{vm}: start failed: {why}")
                }
            }
            *slot.start.lock().unwrap_or_else(PoisonError::into_inner) = None;
            result
        });
        task.map(|joined| {
            joined.unwrap_or_else(|e| Err(Failure::unavailable(format!("the start failed: {e}"))))
        })
        .boxed()
        .shared()
    }

    /// Stops the VM the request means: answers once the graceful shutdown was asked for, and forces the VM
    /// off after `stop_timeout` in the background; or, as the profile's `stop_mode` says, suspends it.
    pub async fn stop(
        &self,
        profile: Option<&str>,
        client: Option<IpAddr>,
        vm_ip: Option<IpAddr>,
    ) -> Result<Stopped, Failure> {
        let name = profile.unwrap_or(DEFAULT_PROFILE);
        let (target, _) = self.resolve(name, client, vm_ip)?;
        let (answer, answered) = oneshot::channel();
        let stop_timeout = self.stop_timeout;
        tokio::spawn(async move {
            let Target {
                backend_name,
                backend,
                vm,
                slot,
                policy,
            } = target;
            let _busy = slot.busy.lock().await;
            stop_vm(&backend, &backend_name, &vm, policy, stop_timeout, answer).await;
        });
        answered
            .await
            .unwrap_or_else(|_| Err(Failure::unavailable("the stop ended without an answer")))
    }

    /// The VM a request means: the profile's one VM, or the one its table gives the client address; for a
    /// stop without a client address, the one that last started with `vm_ip`.
    fn resolve(
        &self,
        name: &str,
        client: Option<IpAddr>,
        vm_ip: Option<IpAddr>,
    ) -> Result<(Target, u16), Failure> {
        let profile = self
            .profiles
            .get(name)
            .ok_or_else(|| Failure::no_such_vm(format!("there is no VM profile named {name:?}")))?;
        let backend = self
            .backends
            .get(&profile.backend)
            .ok_or_else(|| Failure::no_such_vm(format!("profile {name:?} has no backend")))?
            .clone();
        let vm = match (&profile.vm, client, vm_ip) {
            (Some(vm), _, _) => vm.clone(),
            (None, Some(client), _) => {
                profile.by_client.get(&client).cloned().ok_or_else(|| {
                    Failure::no_such_vm(format!("profile {name:?} has no VM for client {client}"))
                })?
            }
            (None, None, Some(ip)) => profile
                .by_client
                .values()
                .find(|vm| {
                    self.slot(&profile.backend, vm)
                        .last_address
                        .lock()
                        .ok()
                        .and_then(|a| *a)
                        == Some(ip)
                })
                .cloned()
                .ok_or_else(|| {
                    Failure::no_such_vm(format!(
                        "no VM of profile {name:?} is known to have address {ip}"
                    ))
                })?,
            (None, None, None) => {
                return Err(Failure::no_such_vm(format!(
                    "profile {name:?} picks the VM by client address, and the request has none"
                )));
            }
        };
        let slot = self.slot(&profile.backend, &vm);
        let target = Target {
            backend_name: profile.backend.clone(),
            backend,
            vm,
            slot,
            policy: profile.policy,
        };
        Ok((target, profile.port))
    }

    fn slot(&self, backend: &str, vm: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .entry((backend.to_owned(), vm.to_owned()))
            .or_default()
            .clone()
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whole seconds for messages; a wait of less than one shows as 1 s, not 0 s.
pub(crate) fn round(d: Duration) -> Duration {
    Duration::from_secs((d.as_secs_f64().round() as u64).max(1))
}
