//! The libvirt backend: start, shut down and destroy a domain through the libvirt library; the address
//! from the DHCP lease, the guest agent or the host's ARP table, in the configured order. A suspend is a
//! managed save (the guest's memory to a file on the host, the domain shut off), which the next create
//! restores; a paused domain counts as suspended too.
//!
//! One connection is opened on first use and kept (libvirt's test driver keeps its state per connection),
//! and opened again if it died. libvirt's calls block, so they run on tokio's blocking threads.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};
use virt::{
    connect::Connect,
    domain::{Domain, DomainState},
    enumutil::Enum,
    error::{Error as VirtError, ErrorNumber},
    sys,
};

use super::{Lookup, Power};
use crate::{
    address::{self, Interface},
    error::Failure,
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// The hypervisor connection, e.g. `qemu:///system` or `qemu+ssh://root@host/system`.
    #[serde(default = "default_uri")]
    pub uri: String,
    /// Where to look for the address, first to last.
    #[serde(default = "default_sources")]
    pub address_sources: Vec<AddressSource>,
}

fn default_uri() -> String {
    "qemu:///system".into()
}

fn default_sources() -> Vec<AddressSource> {
    vec![
        AddressSource::Lease,
        AddressSource::Agent,
        AddressSource::Arp,
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressSource {
    /// The lease libvirt's own DHCP server gave the domain (libvirt-managed networks).
    Lease,
    /// The QEMU guest agent inside the VM.
    Agent,
    /// The host's ARP table (bridged networks; the guest must have sent a packet).
    Arp,
}

impl AddressSource {
    fn raw(self) -> sys::virDomainInterfaceAddressesSource {
        match self {
            AddressSource::Lease => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            AddressSource::Agent => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
            AddressSource::Arp => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
        }
    }
}

impl LibvirtConfig {
    pub fn check(&self) -> Result<()> {
        ensure!(!self.uri.is_empty(), "uri is empty");
        ensure!(!self.address_sources.is_empty(), "address_sources is empty");
        Ok(())
    }
}

pub struct Libvirt {
    config: LibvirtConfig,
    connection: Arc<Mutex<Option<Connect>>>,
}

impl Libvirt {
    pub fn new(config: LibvirtConfig) -> Libvirt {
        // libvirt prints every error on stderr by default; ours go to the log, once, with context.
        virt::error::clear_error_callback();
        Libvirt {
            config,
            connection: Arc::default(),
        }
    }

    pub async fn power(&self, vm: &str) -> Result<Power, Failure> {
        self.with_domain(vm, |dom| {
            let (state, _) = dom.state()?;
            Ok(match state {
                Enum::Known(DomainState::Running | DomainState::Blocked) => Power::Running,
                Enum::Known(DomainState::Shutdown) => Power::Stopping,
                Enum::Known(DomainState::Shutoff) if dom.has_managed_save(0)? => Power::Suspended,
                Enum::Known(DomainState::Shutoff) => Power::Off,
                Enum::Known(DomainState::Paused) => Power::Suspended,
                Enum::Known(DomainState::Crashed) => Power::Other("crashed".into()),
                Enum::Known(DomainState::PMSuspended) => Power::Other("suspended".into()),
                Enum::Known(DomainState::NoState) | Enum::Unknown(_) => {
                    Power::Other("no state".into())
                }
            })
        })
        .await
    }

    pub async fn start(&self, vm: &str) -> Result<(), Failure> {
        self.with_domain(vm, Domain::create)
            .await
            .map_err(|f| f.context(format_args!("starting domain '{vm}'")))
    }

    /// Continues a paused domain, or creates one from its managed save, which libvirt restores.
    pub async fn resume(&self, vm: &str) -> Result<(), Failure> {
        self.with_domain(vm, |dom| match dom.state()?.0 {
            Enum::Known(DomainState::Paused) => dom.resume(),
            _ => dom.create(),
        })
        .await
        .map_err(|f| f.context(format_args!("resuming domain '{vm}'")))
    }

    /// Drops the kept state (a paused domain's memory, a managed save image), then boots.
    pub async fn boot_instead(&self, vm: &str) -> Result<(), Failure> {
        self.with_domain(vm, |dom| {
            if dom.state()?.0 == Enum::Known(DomainState::Paused) {
                dom.destroy()?;
            }
            if dom.has_managed_save(0)? {
                dom.managed_save_remove(0)?;
            }
            dom.create()
        })
        .await
        .map_err(|f| f.context(format_args!("booting domain '{vm}'")))
    }

    pub async fn managed_save(&self, vm: &str) -> Result<(), Failure> {
        self.with_domain(vm, |dom| dom.managed_save(0))
            .await
            .map_err(|f| f.context(format_args!("saving domain '{vm}'")))
    }

    pub async fn address(&self, vm: &str) -> Result<Lookup, Failure> {
        let sources = self.config.address_sources.clone();
        let name = vm.to_owned();
        self.with_domain(vm, move |dom| {
            let mut why = Vec::new();
            for source in sources {
                match dom.interface_addresses(source.raw(), 0) {
                    Ok(found) => {
                        let interfaces: Vec<Interface> = found
                            .into_iter()
                            .map(|i| Interface {
                                name: i.name,
                                addrs: i.addrs.iter().filter_map(|a| a.addr.parse::<IpAddr>().ok()).collect(),
                            })
                            .collect();
                        if let Some(ip) = address::pick(&interfaces) {
                            tracing::debug!(VM = name, source = ?source, %ip, "libvirt named the address");
                            return Ok(Lookup::Found(ip));
                        }
                        why.push(format!("{source:?}: no address yet").to_lowercase());
                    }
                    Err(e) => why.push(format!("{}: {}", format!("{source:?}").to_lowercase(), e.message())),
                }
            }
            Ok(Lookup::NotYet(why.join("; ")))
        })
        .await
    }

    pub async fn shutdown(&self, vm: &str) -> Result<(), Failure> {
        self.with_domain(vm, Domain::shutdown).await
    }

    pub async fn destroy(&self, vm: &str) -> Result<(), Failure> {
        self.with_domain(vm, Domain::destroy).await
    }

    /// Runs `op` on the domain named `vm` on a blocking thread, opening the connection if needed.
    async fn with_domain<T: Send + 'static>(
        &self,
        vm: &str,
        op: impl FnOnce(&Domain) -> Result<T, VirtError> + Send + 'static,
    ) -> Result<T, Failure> {
        let connection = self.connection.clone();
        let uri = self.config.uri.clone();
        let vm = vm.to_owned();
        tokio::task::spawn_blocking(move || {
            let conn = connect(&connection, &uri)?;
            let dom = conn
                .lookup_domain_by_name(&vm)
                .map_err(|e| failure(e).context(format_args!("domain '{vm}'")))?;
            op(&dom).map_err(failure)
        })
        .await
        .map_err(|e| Failure::unavailable(format!("the libvirt call failed: {e}")))?
    }
}

fn connect(slot: &Mutex<Option<Connect>>, uri: &str) -> Result<Connect, Failure> {
    let mut slot = slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(conn) = slot.as_ref()
        && conn.is_alive().unwrap_or(false)
    {
        return Ok(conn.clone());
    }
    let conn = Connect::open(Some(uri)).map_err(|e| {
        Failure::unavailable(format!(
            "cannot connect to libvirt at {uri}: {}",
            e.message()
        ))
    })?;
    tracing::info!(uri, "connected to libvirt");
    *slot = Some(conn.clone());
    Ok(conn)
}

/// libvirt's message is what the user reads; whether the proxy should retry depends on its code.
fn failure(e: VirtError) -> Failure {
    let message = e.message().to_owned();
    match e.code() {
        Enum::Known(
            ErrorNumber::NoConnect
            | ErrorNumber::SystemError
            | ErrorNumber::Rpc
            | ErrorNumber::OperationTimeout
            | ErrorNumber::AgentUnresponsive,
        ) => Failure::unavailable(message),
        _ => Failure::refused(message),
    }
}
