//! A stop: graceful first and forced after `stop_timeout`, or a suspend that a later start resumes.

use std::time::Duration;

use ssh_on_demand_common::retry::Backoff;
use tokio::{sync::oneshot, time::Instant};

use super::{Policy, Stopped, millis};
use crate::{
    backend::{Backend, Power},
    config::{IfSuspendFails, StopMode},
    error::Failure,
};

/// Waits until the VM is off or suspended, and returns which.
pub(super) async fn wait_until_down(
    backend: &Backend,
    vm: &str,
    deadline: Instant,
) -> Result<Power, Failure> {
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
pub(super) fn reply(answer: &mut Answer, result: Result<Stopped, Failure>) {
    if let Some(answer) = answer.take() {
        let _ = answer.send(result);
    }
}

/// A stop as the profile's `stop_mode` says: a suspend (with a shutdown instead if it fails and the profile
/// allows), or a graceful shutdown, forced after `stop_timeout`. `answer` gets the first step's result.
pub(super) async fn stop_vm(
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
pub(super) async fn suspend(
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
pub(super) async fn shut_down(
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
