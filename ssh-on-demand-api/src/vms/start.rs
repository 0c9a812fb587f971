//! A start: the platform's start or resume, then the VM's address within `address_timeout`.

use std::{net::IpAddr, time::Duration};

use ssh_on_demand_common::retry::Backoff;
use tokio::time::Instant;

use super::{millis, round, stop::wait_until_down};
use crate::{
    backend::{Backend, Begun, How, Lookup, Power},
    config::IfResumeFails,
    error::Failure,
};

/// What a start did: the address, how it found or left the VM, and, when it booted or resumed it, how long
/// the platform took from the call to the address (the proxy measures the rest, to sshd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Outcome {
    pub(super) ip: IpAddr,
    pub(super) how: How,
    pub(super) ms: Option<u64>,
}

pub(super) async fn start_vm(
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
pub(super) async fn resume(
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
pub(super) async fn finish(
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
pub(super) async fn find_address(
    backend: &Backend,
    vm: &str,
    deadline: Instant,
) -> Result<IpAddr, Failure> {
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
