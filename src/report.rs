//! Report: how a connection ended, the one summary record it leaves in the journal, and every sentence its
//! user may read.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use tracing::Level;

use crate::{
    guard::Refused,
    relay::{Side, Transferred},
    vm::{api::ApiError, readiness::NotReady},
};

/// Journal `MESSAGE_ID` of the one summary record per connection: `journalctl MESSAGE_ID=…` lists connections.
pub const SUMMARY_MESSAGE_ID: &str = "4f1d2c6b8a9e4b0c9d7e3a5f6b2c1d08";

/// How a connection ended. It decides the exit status and the `OUTCOME` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Relayed to the VM until both sides finished (or one failed).
    Relayed,
    /// The client hung up before the VM was ready.
    ClientGone,
    /// The client did not open with an SSH identification, so nothing was started.
    NotSsh,
    /// The start API gave no usable address; the client was told why.
    ApiFailed,
    /// The VM did not send its SSH identification by the deadline; the client was told why.
    VmNotReady,
    /// The configuration is unusable; the client was told so.
    Misconfigured,
    /// Daemon: over one of its limits; the client was told which.
    Busy,
    /// The guard refused the client's address (`client_networks`, its start budget, a penalty).
    Refused,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Relayed,
        Outcome::ClientGone,
        Outcome::NotSsh,
        Outcome::ApiFailed,
        Outcome::VmNotReady,
        Outcome::Misconfigured,
        Outcome::Busy,
        Outcome::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::ClientGone => "client_gone",
            Outcome::NotSsh => "not_ssh",
            Outcome::ApiFailed => "api_failed",
            Outcome::VmNotReady => "vm_not_ready",
            Outcome::Misconfigured => "misconfigured",
            Outcome::Busy => "busy",
            Outcome::Refused => "refused",
        }
    }

    /// The VM could not be given to the user: worth a warning and a failed unit.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::ApiFailed
                | Outcome::VmNotReady
                | Outcome::Misconfigured
                | Outcome::Busy
                | Outcome::Refused
        )
    }

    /// 1 for a failure (systemd then marks the instance failed until it is collected), else 0.
    pub fn exit_code(self) -> ExitCode {
        if self.is_failure() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// Why the user gets no VM. The text is the one line their ssh client prints.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("VM failed to start: {0}")]
    Api(#[from] ApiError),
    #[error(transparent)]
    NotReady(#[from] NotReady),
    #[error(
        "ssh-on-demand is misconfigured on this host; its operator can read why in the journal"
    )]
    Misconfigured,
    #[error("this host is busy: {0}; try again later")]
    Busy(&'static str),
    #[error(transparent)]
    Guard(#[from] Refused),
}

impl Refusal {
    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::Api(_) => Outcome::ApiFailed,
            Refusal::NotReady(_) => Outcome::VmNotReady,
            Refusal::Misconfigured => Outcome::Misconfigured,
            Refusal::Busy(_) => Outcome::Busy,
            Refusal::Guard(_) => Outcome::Refused,
        }
    }
}

/// What the summary record reports besides the outcome.
#[derive(Debug, Default)]
pub struct Stats {
    pub vm: Option<SocketAddr>,
    pub api: Option<Duration>,
    pub vm_wait: Option<Duration>,
    /// The start was another connection's, shared.
    pub shared_start: bool,
    pub transferred: Transferred,
    pub reason: Option<String>,
    /// The end whose connection failed, when the relay ended in an error.
    pub relay_failed: Option<Side>,
    /// Why the shared state could not be used: this connection's start was its own, unshared.
    pub store_error: Option<String>,
    /// It made the start call for a VM that did not run.
    pub woke: bool,
    /// The guard's rule that refused it.
    pub refused_by: Option<&'static str>,
    /// How the platform gave the VM, when the start API says (`resumed in 397 ms`).
    pub start_how: Option<String>,
}

/// The one summary record of a connection: a warning for failures, so that `journalctl -p warning` lists
/// exactly the users who got no VM. Emitted inside the connection's span, which adds client and profile.
pub fn summarize(peer: Option<SocketAddr>, outcome: Outcome, stats: &Stats, duration: Duration) {
    let Stats {
        vm,
        api,
        vm_wait,
        shared_start,
        transferred,
        reason,
        relay_failed,
        store_error,
        woke,
        refused_by,
        start_how,
    } = stats;
    let who = peer.map_or("client".to_owned(), |p| p.to_string());
    let message = match (outcome, reason) {
        (Outcome::Relayed, _) => format!(
            "{who} <-> {}: {} bytes to VM, {} to client in {}",
            vm.map_or("VM".to_owned(), |vm| vm.to_string()),
            transferred.to_vm,
            transferred.to_client,
            crate::seconds(duration)
        ),
        (_, Some(reason)) => format!("{who} {}: {reason}", outcome.as_str()),
        (_, None) => format!("{who} {}", outcome.as_str()),
    };
    macro_rules! summary {
        ($level:expr) => {
            tracing::event!(
                $level,
                message_id = SUMMARY_MESSAGE_ID,
                outcome = outcome.as_str(),
                reason = reason.as_deref(),
                relay_failed = relay_failed.map(Side::as_str),
                store_error = store_error.as_deref(),
                refused_by = *refused_by,
                start_how = start_how.as_deref(),
                woke = *woke,
                api_ms = api.map(|d| d.as_millis() as u64),
                vm_wait_ms = vm_wait.map(|d| d.as_millis() as u64),
                shared_start = *shared_start,
                bytes_to_vm = transferred.to_vm,
                bytes_to_client = transferred.to_client,
                duration_ms = duration.as_millis() as u64,
                "{message}"
            )
        };
    }
    if outcome.is_failure() {
        summary!(Level::WARN);
    } else {
        summary!(Level::INFO);
    }
}
