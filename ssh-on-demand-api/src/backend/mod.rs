//! The platforms: what each can tell about a VM's power and address, and how it starts and stops one.
//!
//! Each backend answers in the platform's own words ([`Failure`]); [`crate::vms`] decides when to call
//! which, so that every backend is idempotent, shares concurrent starts and stops gracefully first.

pub mod command;
pub mod ec2;
pub mod ec2_credentials;
// The libvirt backend links libvirt: a cargo feature, so that hosts that never use libvirt need not install it.
// Without it, a stand-in refuses `type = "libvirt"` when the configuration is read.
#[cfg(feature = "libvirt")]
pub mod libvirt;
#[cfg(not(feature = "libvirt"))]
#[path = "libvirt_absent.rs"]
pub mod libvirt;
pub mod proxmox;

use std::{fmt, net::IpAddr};

use anyhow::Result;

use crate::{config::BackendConfig, error::Failure};

/// What the platform says about a VM's power.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Power {
    Running,
    /// On its way up: started, not yet running (EC2's `pending`).
    Starting,
    /// On its way down: a start must wait until it is off (libvirt's "in shutdown", EC2's `stopping`).
    Stopping,
    Off,
    /// The backend cannot tell (a command backend): start and stop run their commands every time.
    Unknown,
    /// Anything else, in the platform's word (paused, crashed, …): a start is attempted.
    Other(String),
}

impl fmt::Display for Power {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Power::Running => f.write_str("running"),
            Power::Starting => f.write_str("starting"),
            Power::Stopping => f.write_str("stopping"),
            Power::Off => f.write_str("off"),
            Power::Unknown => f.write_str("unknown"),
            Power::Other(word) => f.write_str(word),
        }
    }
}

/// The answer to "what is its address?" while a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(IpAddr),
    /// Not yet, and why, in the platform's words (the last one is what the user reads if it never comes).
    NotYet(String),
}

/// One configured platform connection.
pub enum Backend {
    Command(command::Command),
    Libvirt(libvirt::Libvirt),
    Proxmox(proxmox::Proxmox),
    Ec2(ec2::Ec2),
}

impl Backend {
    /// Builds the client, reading the secrets it needs now, so that `check-config` finds a missing key.
    pub fn new(config: &BackendConfig) -> Result<Backend> {
        Ok(match config {
            BackendConfig::Command(c) => Backend::Command(command::Command::new(c.clone())),
            BackendConfig::Libvirt(c) => Backend::Libvirt(libvirt::Libvirt::new(c.clone())),
            BackendConfig::Proxmox(c) => Backend::Proxmox(proxmox::Proxmox::new(c)?),
            BackendConfig::Ec2(c) => Backend::Ec2(ec2::Ec2::new(c)?),
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Command(_) => "command",
            Backend::Libvirt(_) => "libvirt",
            Backend::Proxmox(_) => "proxmox",
            Backend::Ec2(_) => "ec2",
        }
    }

    /// False for a command backend with neither a stop nor a kill command: stops are refused.
    pub fn can_stop(&self) -> bool {
        match self {
            Backend::Command(b) => b.can_stop(),
            _ => true,
        }
    }

    pub async fn power(&self, vm: &str) -> Result<Power, Failure> {
        match self {
            // A command backend has no state to ask; its start command is idempotent by contract.
            Backend::Command(_) => Ok(Power::Unknown),
            Backend::Libvirt(b) => b.power(vm).await,
            Backend::Proxmox(b) => b.power(vm).await,
            Backend::Ec2(b) => b.power(vm).await,
        }
    }

    /// Starts the VM. The command backend's start command prints the address, which it returns.
    pub async fn start(&self, vm: &str) -> Result<Option<IpAddr>, Failure> {
        match self {
            Backend::Command(b) => b.start(vm).await.map(Some),
            Backend::Libvirt(b) => b.start(vm).await.map(|()| None),
            Backend::Proxmox(b) => b.start(vm).await.map(|()| None),
            Backend::Ec2(b) => b.start(vm).await.map(|()| None),
        }
    }

    pub async fn address(&self, vm: &str) -> Result<Lookup, Failure> {
        match self {
            Backend::Command(_) => Ok(Lookup::NotYet(
                "the start command printed no address".into(),
            )),
            Backend::Libvirt(b) => b.address(vm).await,
            Backend::Proxmox(b) => b.address(vm).await,
            Backend::Ec2(b) => b.address(vm).await,
        }
    }

    /// Asks the guest to shut down (ACPI, guest agent, the stop command).
    /// `limit` bounds a stop command; the platforms take the request and work on their own.
    pub async fn shutdown(&self, vm: &str, limit: std::time::Duration) -> Result<(), Failure> {
        match self {
            Backend::Command(b) => b.stop(vm, limit).await,
            Backend::Libvirt(b) => b.shutdown(vm).await,
            Backend::Proxmox(b) => b.shutdown(vm).await,
            Backend::Ec2(b) => b.stop(vm, false).await,
        }
    }

    /// Powers the VM off at once. Returns false when the backend has no way to (a command backend without
    /// a `kill` command).
    pub async fn force_off(&self, vm: &str) -> Result<bool, Failure> {
        match self {
            Backend::Command(b) => b.kill(vm).await,
            Backend::Libvirt(b) => b.destroy(vm).await.map(|()| true),
            Backend::Proxmox(b) => b.stop(vm).await.map(|()| true),
            Backend::Ec2(b) => b.stop(vm, true).await.map(|()| true),
        }
    }
}
