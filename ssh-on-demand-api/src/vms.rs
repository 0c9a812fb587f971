//! The VMs behind the profiles: which VM a request means, one platform start however many requests ask at
//! once, the address within `address_timeout`, and stops that are graceful first and forced after
//! `stop_timeout`. Every decision is logged.

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
use tokio::{sync::oneshot, time::Instant};

use crate::{
    backend::{Backend, Lookup, Power},
    config::{Config, DEFAULT_PROFILE},
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
}

/// One VM's coordination: `busy` is held for a whole start or stop, so the two never interleave.
#[derive(Default)]
struct Slot {
    busy: tokio::sync::Mutex<()>,
    start: Mutex<Option<SharedStart>>,
    last_address: Mutex<Option<IpAddr>>,
}

type SharedStart = Shared<BoxFuture<'static, Result<IpAddr, Failure>>>;

/// Where the proxy should connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    AlreadyOff,
    Stopping,
}

/// What a request names: the backend's name, the backend, the VM.
struct Target {
    backend_name: String,
    backend: Arc<Backend>,
    vm: String,
    slot: Arc<Slot>,
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
        let ip = run.await?;
        Ok(Started { ip, port })
    }

    fn spawn_start(&self, target: &Target) -> SharedStart {
        let (backend, vm, slot) = (
            target.backend.clone(),
            target.vm.clone(),
            target.slot.clone(),
        );
        let backend_name = target.backend_name.clone();
        let address_timeout = self.address_timeout;
        // A task of its own: the start goes on even if the request that began it is abandoned.
        let task = tokio::spawn(async move {
            let _busy = slot.busy.lock().await;
            let result = start_vm(&backend, &vm, address_timeout).await;
            match &result {
                Ok(ip) => {
                    tracing::info!(BACKEND = backend_name, VM = vm, %ip, "{vm}: start answered with the address {ip}");
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
            joined.unwrap_or_else(|e| Err(Failure::Unavailable(format!("the start failed: {e}"))))
        })
        .boxed()
        .shared()
    }

    /// Stops the VM the request means: answers once the graceful shutdown was asked for, and forces the VM
    /// off after `stop_timeout` in the background.
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
            } = target;
            let _busy = slot.busy.lock().await;
            stop_vm(&backend, &backend_name, &vm, stop_timeout, answer).await;
        });
        answered.await.unwrap_or_else(|_| {
            Err(Failure::Unavailable(
                "the stop ended without an answer".into(),
            ))
        })
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
            .ok_or_else(|| Failure::NoSuchVm(format!("there is no VM profile named {name:?}")))?;
        let backend = self
            .backends
            .get(&profile.backend)
            .ok_or_else(|| Failure::NoSuchVm(format!("profile {name:?} has no backend")))?
            .clone();
        let vm = match (&profile.vm, client, vm_ip) {
            (Some(vm), _, _) => vm.clone(),
            (None, Some(client), _) => {
                profile.by_client.get(&client).cloned().ok_or_else(|| {
                    Failure::NoSuchVm(format!("profile {name:?} has no VM for client {client}"))
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
                    Failure::NoSuchVm(format!(
                        "no VM of profile {name:?} is known to have address {ip}"
                    ))
                })?,
            (None, None, None) => {
                return Err(Failure::NoSuchVm(format!(
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

async fn start_vm(
    backend: &Backend,
    vm: &str,
    address_timeout: Duration,
) -> Result<IpAddr, Failure> {
    let deadline = Instant::now() + address_timeout;
    let power = backend.power(vm).await?;
    match power {
        Power::Running | Power::Starting => {
            tracing::info!(VM = vm, power = %power, "{vm}: already {power}; asking for its address");
        }
        Power::Stopping => {
            tracing::info!(VM = vm, "{vm}: still stopping; starting it once it is off");
            wait_for_off(backend, vm, deadline).await?;
            return start_and_find(backend, vm, deadline).await;
        }
        Power::Off | Power::Unknown | Power::Other(_) => {
            return start_and_find(backend, vm, deadline).await;
        }
    }
    find_address(backend, vm, deadline).await
}

async fn start_and_find(backend: &Backend, vm: &str, deadline: Instant) -> Result<IpAddr, Failure> {
    tracing::info!(VM = vm, backend = backend.kind(), "{vm}: starting");
    if let Some(ip) = backend.start(vm).await? {
        return Ok(ip);
    }
    tracing::info!(VM = vm, "{vm}: started; waiting for its address");
    find_address(backend, vm, deadline).await
}

/// Asks for the address until the platform names one: a guest agent or a DHCP lease takes a while.
async fn find_address(backend: &Backend, vm: &str, deadline: Instant) -> Result<IpAddr, Failure> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        let why = match backend.address(vm).await {
            Ok(Lookup::Found(ip)) => return Ok(ip),
            Ok(Lookup::NotYet(why)) => why,
            Err(f) if f.is_transient() => f.to_string(),
            Err(f) => return Err(f),
        };
        if Instant::now() + pause >= deadline {
            return Err(Failure::Timeout(format!(
                "no address for {vm} within {}: {why}",
                humantime::format_duration(round(started.elapsed()))
            )));
        }
        tracing::debug!(VM = vm, "{vm}: no address yet: {why}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

async fn wait_for_off(backend: &Backend, vm: &str, deadline: Instant) -> Result<(), Failure> {
    let mut pause = Duration::from_millis(200);
    loop {
        let power = backend.power(vm).await?;
        if power == Power::Off {
            return Ok(());
        }
        if Instant::now() + pause >= deadline {
            return Err(Failure::Timeout(format!("{vm} is still {power}")));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Graceful shutdown, then forced off after `stop_timeout`. `answer` gets the result of the first step.
async fn stop_vm(
    backend: &Backend,
    backend_name: &str,
    vm: &str,
    stop_timeout: Duration,
    answer: oneshot::Sender<Result<Stopped, Failure>>,
) {
    if !backend.can_stop() {
        tracing::warn!(
            BACKEND = backend_name,
            VM = vm,
            "{vm}: stop refused, no stop or kill command is configured"
        );
        let _ = answer.send(Err(Failure::Refused(
            "no stop command is configured".into(),
        )));
        return;
    }
    let power = match backend.power(vm).await {
        Ok(power) => power,
        Err(why) => {
            tracing::warn!(
                BACKEND = backend_name,
                VM = vm,
                "{vm}: stop: cannot tell its state: {why}"
            );
            let _ = answer.send(Err(why));
            return;
        }
    };
    if power == Power::Off {
        tracing::info!(BACKEND = backend_name, VM = vm, "{vm}: stop: already off");
        let _ = answer.send(Ok(Stopped::AlreadyOff));
        return;
    }
    // A stop command may take as long as the shutdown: the proxy hears at once that it is under way.
    let mut answer = Some(answer);
    if power == Power::Unknown
        && let Some(answer) = answer.take()
    {
        let _ = answer.send(Ok(Stopped::Stopping));
    }
    let deadline = Instant::now() + stop_timeout;
    tracing::info!(BACKEND = backend_name, VM = vm, power = %power, "{vm}: stop: graceful shutdown");
    let graceful = backend.shutdown(vm, stop_timeout).await;
    if let Err(why) = &graceful {
        tracing::warn!(
            BACKEND = backend_name,
            VM = vm,
            "{vm}: stop: graceful shutdown failed: {why}"
        );
    } else if let Some(answer) = answer.take() {
        let _ = answer.send(Ok(Stopped::Stopping));
    }
    let off = match (&graceful, power) {
        // The stop command's success is all a command backend can know.
        (Ok(()), Power::Unknown) => true,
        (Ok(()), _) => wait_for_off(backend, vm, deadline).await.is_ok(),
        (Err(_), _) => false,
    };
    if off {
        tracing::info!(
            BACKEND = backend_name,
            VM = vm,
            "{vm}: stop: off after a graceful shutdown"
        );
        return;
    }
    tracing::warn!(
        BACKEND = backend_name,
        VM = vm,
        "{vm}: stop: forcing it off"
    );
    let forced = backend.force_off(vm).await;
    match &forced {
        Ok(true) => tracing::info!(BACKEND = backend_name, VM = vm, "{vm}: stop: forced off"),
        Ok(false) => tracing::warn!(
            BACKEND = backend_name,
            VM = vm,
            "{vm}: stop: no way to force it off is configured"
        ),
        Err(why) => tracing::error!(
            BACKEND = backend_name,
            VM = vm,
            "{vm}: stop: forcing it off failed: {why}"
        ),
    }
    if let Some(answer) = answer.take() {
        let _ = answer.send(match (forced, graceful) {
            (Ok(true), _) => Ok(Stopped::Stopping),
            (Ok(false), Err(why)) | (Err(why), _) => Err(why),
            (Ok(false), Ok(())) => Ok(Stopped::Stopping),
        });
    }
}

/// Whole seconds for messages; a wait of less than one shows as 1 s, not 0 s.
fn round(d: Duration) -> Duration {
    Duration::from_secs((d.as_secs_f64().round() as u64).max(1))
}
