//! Getting a session's VM: its address from the start API (or a start shared with other connections, or the
//! known address of a running VM), checked against the networks allowed, then its sshd.

use std::{net::SocketAddr, sync::Arc};

use tokio::time::{Instant, timeout_at};
use tracing::{Span, error, field, info};

use super::Host;
use crate::{
    config::Profile,
    report::{Refusal, Stats},
    vm::{
        api::{ApiError, Connection, Endpoint, StartRequest, Started},
        lifecycle::{How, Lease},
        readiness::{self, Ready, Timeouts},
        targets,
    },
};

/// Getting the VM: its address from the start API (or a start shared with other connections), then its sshd.
pub(super) struct Boot<'a> {
    pub(super) ctx: &'a Host,
    pub(super) profile: &'a Arc<Profile>,
    pub(super) lease: Option<&'a Lease>,
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) deadline: Instant,
    /// The address of the VM if it runs already and must not be started (a silent client's).
    pub(super) known: Option<SocketAddr>,
}

impl Boot<'_> {
    /// Starts the VM and waits for its sshd, all by the deadline. A VM that runs is most likely where the
    /// start API will point again: its sshd is asked at once, so that the API's answer and sshd's
    /// identification come together rather than one after the other.
    pub(super) async fn run(self, stats: &mut Stats) -> Result<Ready, Refusal> {
        let profile = self.profile;
        let timeouts = Timeouts {
            connect: profile.vm_connect_timeout,
            banner: profile.vm_banner_timeout,
        };
        let wait =
            |addr| readiness::wait_for_sshd(addr, self.deadline, profile.boot_timeout, timeouts);
        let hint = match self.known {
            Some(_) => None,
            None => self
                .lease
                .and_then(Lease::running)
                .filter(|addr| self.allowed(*addr).is_ok()),
        };
        let mut early = hint.map(|addr| Box::pin(wait(addr)));
        let mut early_ready = None;
        let started = {
            let address = self.address(stats);
            tokio::pin!(address);
            loop {
                tokio::select! {
                    // The guess first: its SYN leaves before the shared state is written for the start call,
                    // which would otherwise delay it.
                    biased;
                    ready = async { early.as_mut().expect("guarded").await },
                        if early.is_some() && early_ready.is_none() => early_ready = Some(ready),
                    started = &mut address => break started?,
                }
            }
        };
        // Known addresses (a silent client's VM) were checked when they were recorded; checked again all the same.
        self.allowed(started.addr)?;

        self.ctx
            .status(&format!("waiting for the VM at {}", started.addr));
        let waiting = Instant::now();
        let ready = match (hint == Some(started.addr), early_ready, early) {
            (true, Some(ready), _) => ready,
            (true, None, Some(early)) => early.await,
            // Another address (or none was guessed): whatever was tried is dropped.
            _ => wait(started.addr).await,
        };
        stats.vm_wait = Some(waiting.elapsed());
        let ready = ready?;
        info!(
            vm_wait_ms = waiting.elapsed().as_millis() as u64,
            attempts = ready.attempts,
            "VM answered"
        );
        Ok(ready)
    }

    /// Where the VM is: the known address, another connection's start, or the start API's answer.
    async fn address(&self, stats: &mut Stats) -> Result<Started, Refusal> {
        let profile = self.profile;
        let api = self.ctx.api(profile).map_err(|e| {
            error!("configuration unusable: {e:#}");
            Refusal::Misconfigured
        })?;
        let request = StartRequest {
            connection: Some(Connection {
                client_addr: self.peer.ip(),
                client_port: self.peer.port(),
                local_addr: self.local.ip(),
                local_port: self.local.port(),
            }),
            profile: profile.name.as_deref(),
            reason: None,
        };
        self.ctx
            .status(&format!("starting the VM for {}", self.peer));
        let asked = Instant::now();
        // An answer that points where no VM may be is a failed start: recorded and shared as one.
        let call = || async {
            let started = api
                .start(&request, self.deadline, profile.boot_timeout)
                .await?;
            self.allowed(started.addr)?;
            Ok(started)
        };
        let started = match (self.known, self.lease) {
            (Some(addr), _) => {
                info!("relaying a client that waits for the server to its running VM");
                return Ok(Started::known(addr));
            }
            (None, None) => call().await,
            (None, Some(lease)) => match timeout_at(self.deadline, lease.start(call())).await {
                Ok(start) => {
                    stats.shared_start = start.how == How::Shared;
                    stats.woke |= start.how == How::Woke;
                    if let Some(e) = start.store_error {
                        stats.store_error = Some(e.to_string());
                    }
                    start.result
                }
                Err(_) => Err(ApiError::Deadline(Endpoint::Start, profile.boot_timeout)),
            },
        };
        stats.api = Some(asked.elapsed());
        let started = started?;
        stats.vm = Some(started.addr);
        stats.start_how = started.how.as_ref().map(ToString::to_string);
        Span::current().record("vm", field::display(started.addr));
        let api_ms = asked.elapsed().as_millis() as u64;
        if stats.shared_start {
            info!(
                api_ms,
                "sharing another connection's start: {}", started.addr
            );
        } else {
            info!(
                api_ms,
                attempts = started.attempts,
                "start API answered {}",
                started.addr
            );
        }
        Ok(started)
    }

    /// The operator's `vm_networks` allow connecting to `addr`, and it is not the proxy itself.
    fn allowed(&self, addr: SocketAddr) -> Result<(), ApiError> {
        let own = self.ctx.own_listeners(self.local);
        targets::check(addr, &self.profile.vm_networks, self.local.ip(), &own)
            .map_err(|why| ApiError::NotAllowed { addr, why })
    }
}
