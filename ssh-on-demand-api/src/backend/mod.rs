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

use std::{fmt, net::IpAddr, time::Duration};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::{
    config::{BackendConfig, StopMode},
    error::Failure,
};

/// What the platform says about a VM's power.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Power {
    Running,
    /// On its way up: started, not yet running (EC2's `pending`).
    Starting,
    /// On its way down: a start must wait until it is off (libvirt's "in shutdown", EC2's `stopping`).
    Stopping,
    Off,
    /// Stopped with its state kept (a managed save, a paused or hibernated VM, a suspend command's): a start
    /// resumes it.
    Suspended,
    /// The backend cannot tell (a command backend): start and stop run their commands every time.
    Unknown,
    /// Anything else, in the platform's word (crashed, …): a start is attempted.
    Other(String),
}

impl fmt::Display for Power {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Power::Running => f.write_str("running"),
            Power::Starting => f.write_str("starting"),
            Power::Stopping => f.write_str("stopping"),
            Power::Off => f.write_str("off"),
            Power::Suspended => f.write_str("suspended"),
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

/// How a start found or left the VM: in the journal (`HOW`) and in the start answer (`"how"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    /// It ran already.
    Running,
    /// It booted.
    Booted,
    /// It came back from a suspend or a hibernation.
    Resumed,
    /// A start command ran and did not say which (it may print `"how"`).
    Started,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Running => "running",
            How::Booted => "booted",
            How::Resumed => "resumed",
            How::Started => "started",
        }
    }
}

/// What a start or a resume told at once: a command prints the address and may say how it went; the
/// platforms name the address later.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Begun {
    pub ip: Option<IpAddr>,
    pub how: Option<How>,
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
            // A command backend has no state to ask (its start command is idempotent by contract), but knows
            // which VMs it suspended.
            Backend::Command(b) => Ok(b.power(vm)),
            Backend::Libvirt(b) => b.power(vm).await,
            Backend::Proxmox(b) => b.power(vm).await,
            Backend::Ec2(b) => b.power(vm).await,
        }
    }

    /// Starts the VM (boots it).
    pub async fn start(&self, vm: &str) -> Result<Begun, Failure> {
        match self {
            Backend::Command(b) => b.start(vm).await,
            Backend::Libvirt(b) => b.start(vm).await.map(|()| Begun::default()),
            Backend::Proxmox(b) => b.start(vm).await.map(|()| Begun::default()),
            Backend::Ec2(b) => b.start(vm).await.map(|()| Begun::default()),
        }
    }

    /// Brings a [`Power::Suspended`] VM back from its kept state.
    pub async fn resume(&self, vm: &str) -> Result<Begun, Failure> {
        match self {
            Backend::Command(b) => b.resume(vm).await,
            Backend::Libvirt(b) => b.resume(vm).await.map(|()| Begun::default()),
            Backend::Proxmox(b) => b.resume(vm).await.map(|()| Begun::default()),
            // A start is a resume for a hibernated instance: EC2 restores it itself.
            Backend::Ec2(b) => b.start(vm).await.map(|()| Begun::default()),
        }
    }

    /// Discards a suspended VM's kept state and boots it (`if_resume_fails = "boot"`), where the platform
    /// can; the configuration refuses the setting where it cannot.
    pub async fn boot_instead(&self, vm: &str) -> Result<Begun, Failure> {
        match self {
            Backend::Command(b) => b.boot_instead(vm).await,
            Backend::Libvirt(b) => b.boot_instead(vm).await.map(|()| Begun::default()),
            Backend::Proxmox(b) => b.boot_instead(vm).await.map(|()| Begun::default()),
            Backend::Ec2(_) => Err(Failure::refused(
                "EC2 offers no boot instead of a hibernated instance's resume",
            )),
        }
    }

    /// Stops the VM keeping its state, as `mode` (`Suspend` or `Hibernate`) says. `limit` bounds a suspend
    /// command.
    pub async fn suspend(&self, vm: &str, mode: StopMode, limit: Duration) -> Result<(), Failure> {
        match self {
            Backend::Command(b) => b.suspend(vm, limit).await,
            Backend::Libvirt(b) => b.managed_save(vm).await,
            Backend::Proxmox(b) => b.suspend(vm, mode == StopMode::Hibernate).await,
            Backend::Ec2(b) => b.hibernate(vm).await,
        }
    }

    /// Whether [`Backend::suspend`] returns only once the state is saved (a command, libvirt's managed
    /// save, a Proxmox VE task), which may take longer than the proxy waits for an answer; EC2 takes the
    /// request and hibernates on its own.
    pub fn suspend_takes_long(&self) -> bool {
        !matches!(self, Backend::Ec2(_))
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
    pub async fn shutdown(&self, vm: &str, limit: Duration) -> Result<(), Failure> {
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
