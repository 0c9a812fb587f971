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
use ssh_on_demand_common::retry::Backoff;
use tokio::{sync::oneshot, time::Instant};

use crate::{
    backend::{Backend, Begun, How, Lookup, Power},
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

/// What a start did: the address, how it found or left the VM, and, when it booted or resumed it, how long
/// the platform took from the call to the address (the proxy measures the rest, to sshd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    ip: IpAddr,
    how: How,
    ms: Option<u64>,
}

async fn start_vm(
    backend: &Backend,
    vm: &str,
    address_timeout: Duration,
    if_resume_fails: IfResumeFails,
) -> Result<Outcome, Failure> {
    let deadline = Instant::now() + address_timeout;
    let mut power = backend.power(vm).await?;
    if power == Power::Stopping {
        tracing::info!(VM = vm, "{vm}: still stopping; starting it once it is down");
        power = wait_until_down(backend, vm, deadline).await?;
    }
    match power {
        Power::Running | Power::Starting => {
            tracing::info!(VM = vm, power = %power, "{vm}: already {power}; asking for its address");
            let ip = find_address(backend, vm, deadline).await?;
            Ok(Outcome {
                ip,
                how: How::Running,
                ms: None,
            })
        }
        Power::Suspended => resume(backend, vm, deadline, if_resume_fails).await,
        Power::Off | Power::Stopping | Power::Unknown | Power::Other(_) => {
            tracing::info!(VM = vm, backend = backend.kind(), "{vm}: starting");
            let began = Instant::now();
            let begun = backend.start(vm).await?;
            finish(backend, vm, deadline, began, begun, How::Booted).await
        }
    }
}

/// Resumes a suspended VM; if that fails and `if_resume_fails = "boot"`, boots it instead. A platform that
/// cannot be reached gets no boot: it would fail too, and the kept state is worth another try.
async fn resume(
    backend: &Backend,
    vm: &str,
    deadline: Instant,
    if_resume_fails: IfResumeFails,
) -> Result<Outcome, Failure> {
    tracing::info!(VM = vm, backend = backend.kind(), "{vm}: resuming");
    let began = Instant::now();
    match backend.resume(vm).await {
        Ok(begun) => finish(backend, vm, deadline, began, begun, How::Resumed).await,
        Err(why) if if_resume_fails == IfResumeFails::Boot && !why.is_unreachable() => {
            tracing::warn!(VM = vm, RESUME_ERROR = %why, "{vm}: resume failed: {why}; discarding the kept state and booting");
            let began = Instant::now();
            let begun = backend.boot_instead(vm).await?;
            finish(backend, vm, deadline, began, begun, How::Booted).await
        }
        Err(why) => Err(why),
    }
}

/// After a start or resume call: the address it printed, or the platform's once it names one.
async fn finish(
    backend: &Backend,
    vm: &str,
    deadline: Instant,
    began: Instant,
    begun: Begun,
    how: How,
) -> Result<Outcome, Failure> {
    let ip = match begun.ip {
        Some(ip) => ip,
        None => {
            tracing::info!(VM = vm, "{vm}: {}; waiting for its address", how.as_str());
            find_address(backend, vm, deadline).await?
        }
    };
    Ok(Outcome {
        ip,
        how: begun.how.unwrap_or(how),
        ms: Some(millis(began.elapsed())),
    })
}

/// Asks for the address until the platform names one: a guest agent or a DHCP lease takes a while.
async fn find_address(backend: &Backend, vm: &str, deadline: Instant) -> Result<IpAddr, Failure> {
    let started = Instant::now();
    let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let why = match backend.address(vm).await {
            Ok(Lookup::Found(ip)) => return Ok(ip),
            Ok(Lookup::NotYet(why)) => why,
            Err(f) if f.is_transient() => f.to_string(),
            Err(f) => return Err(f),
        };
        if Instant::now() >= deadline {
            return Err(Failure::timeout(format!(
                "no address for {vm} within {}: {why}",
                humantime::format_duration(round(started.elapsed()))
            )));
        }
        tracing::debug!(VM = vm, "{vm}: no address yet: {why}");
        // At most until the deadline, where it asks once more.
        pause.pause(deadline).await;
    }
}

/// Waits until the VM is off or suspended, and returns which.
async fn wait_until_down(backend: &Backend, vm: &str, deadline: Instant) -> Result<Power, Failure> {
    let mut pause = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let power = backend.power(vm).await?;
        if matches!(power, Power::Off | Power::Suspended) {
            return Ok(power);
        }
        if Instant::now() >= deadline {
            return Err(Failure::timeout(format!("{vm} is still {power}")));
        }
        pause.pause(deadline).await;
    }
}

type Answer = Option<oneshot::Sender<Result<Stopped, Failure>>>;

/// Tells the proxy, unless it was told already.
fn reply(answer: &mut Answer, result: Result<Stopped, Failure>) {
    if let Some(answer) = answer.take() {
        let _ = answer.send(result);
    }
}

/// A stop as the profile's `stop_mode` says: a suspend (with a shutdown instead if it fails and the profile
/// allows), or a graceful shutdown, forced after `stop_timeout`. `answer` gets the first step's result.
async fn stop_vm(
    backend: &Backend,
    backend_name: &str,
    vm: &str,
    policy: Policy,
    stop_timeout: Duration,
    answer: oneshot::Sender<Result<Stopped, Failure>>,
) {
    let mut answer = Some(answer);
    if policy.stop_mode == StopMode::Shutdown && !backend.can_stop() {
        tracing::warn!(
            BACKEND = backend_name,
            VM = vm,
            "{vm}: stop refused, no stop or kill command is configured"
        );
        let why = Failure::refused("no stop command is configured");
        return reply(&mut answer, Err(why));
    }
    let power = match backend.power(vm).await {
        Ok(power) => power,
        Err(why) => {
            tracing::warn!(
                BACKEND = backend_name,
                VM = vm,
                "{vm}: stop: cannot tell its state: {why}"
            );
            return reply(&mut answer, Err(why));
        }
    };
    match power {
        Power::Off => {
            tracing::info!(BACKEND = backend_name, VM = vm, "{vm}: stop: already off");
            return reply(&mut answer, Ok(Stopped::AlreadyOff));
        }
        Power::Suspended => {
            tracing::info!(
                BACKEND = backend_name,
                VM = vm,
                "{vm}: stop: already suspended"
            );
            return reply(&mut answer, Ok(Stopped::AlreadySuspended));
        }
        _ => {}
    }
    if policy.stop_mode != StopMode::Shutdown {
        let mode = policy.stop_mode;
        match suspend(backend, backend_name, vm, mode, stop_timeout, &mut answer).await {
            Ok(()) => return,
            Err(why) if policy.if_suspend_fails == IfSuspendFails::Shutdown => {
                tracing::warn!(
                    BACKEND = backend_name,
                    VM = vm,
                    SUSPEND_ERROR = %why,
                    "{vm}: stop: cannot suspend: {why}; shutting it down instead"
                );
            }
            Err(why) => {
                tracing::error!(
                    BACKEND = backend_name,
                    VM = vm,
                    SUSPEND_ERROR = %why,
                    "{vm}: stop: suspend failed, the VM runs on: {why}"
                );
                return reply(&mut answer, Err(why));
            }
        }
    }
    shut_down(backend, backend_name, vm, power, stop_timeout, answer).await
}

/// Suspends or hibernates the VM. The proxy hears first where the platform's call lasts as long as the
/// save, which may be longer than it waits for an answer.
async fn suspend(
    backend: &Backend,
    backend_name: &str,
    vm: &str,
    mode: StopMode,
    stop_timeout: Duration,
    answer: &mut Answer,
) -> Result<(), Failure> {
    let (doing, done) = match mode {
        StopMode::Hibernate => ("hibernating", "hibernated"),
        _ => ("suspending", "suspended"),
    };
    tracing::info!(BACKEND = backend_name, VM = vm, "{vm}: stop: {doing}");
    if backend.suspend_takes_long() {
        reply(answer, Ok(Stopped::Suspending));
    }
    let began = Instant::now();
    backend.suspend(vm, mode, stop_timeout).await?;
    tracing::info!(
        BACKEND = backend_name,
        VM = vm,
        HOW = done,
        SUSPEND_MS = millis(began.elapsed()),
        "{vm}: stop: {done}"
    );
    reply(answer, Ok(Stopped::Suspending));
    Ok(())
}

/// Graceful shutdown, then forced off after `stop_timeout`.
async fn shut_down(
    backend: &Backend,
    backend_name: &str,
    vm: &str,
    power: Power,
    stop_timeout: Duration,
    mut answer: Answer,
) {
    // A stop command may take as long as the shutdown: the proxy hears at once that it is under way.
    if power == Power::Unknown {
        reply(&mut answer, Ok(Stopped::Stopping));
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
    } else {
        reply(&mut answer, Ok(Stopped::Stopping));
    }
    let off = match (&graceful, &power) {
        // The stop command's success is all a command backend can know.
        (Ok(()), Power::Unknown) => true,
        (Ok(()), _) => wait_until_down(backend, vm, deadline).await.is_ok(),
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
    reply(
        &mut answer,
        match (forced, graceful) {
            (Ok(true), _) => Ok(Stopped::Stopping),
            (Ok(false), Err(why)) | (Err(why), _) => Err(why),
            (Ok(false), Ok(())) => Ok(Stopped::Stopping),
        },
    );
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whole seconds for messages; a wait of less than one shows as 1 s, not 0 s.
fn round(d: Duration) -> Duration {
    Duration::from_secs((d.as_secs_f64().round() as u64).max(1))
}
