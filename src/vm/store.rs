//! Store: where every process (and, with etcd, every proxy host) finds what it shares about each VM: its
//! [`Record`], its live sessions, and the registration of whoever holds a start or stop call in flight.
//! [`local`] keeps them in files under the state directory (one host; the default), [`etcd`] in an etcd
//! cluster (several hosts). The store answers who holds what, since when; [`super::state`] decides.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::state::{Millis, View, Write};

pub mod etcd;
pub mod local;

/// The time base of the shared state: milliseconds since the Unix epoch, which every process and host reads
/// alike. (Hosts sharing an etcd cluster need their clocks kept in step, as NTP does.)
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Which VM: a profile's, and, unless the profile shares one VM among all its clients, a client address's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmKey {
    pub profile: String,
    pub client: Option<IpAddr>,
}

impl VmKey {
    /// `lab` or `lab@203.0.113.9`: a directory name, an etcd key component. Profile names have no `@` or `/`
    /// (see config).
    pub fn name(&self) -> String {
        match self.client {
            Some(ip) => format!("{}@{ip}", self.profile),
            None => self.profile.clone(),
        }
    }

    pub fn from_name(name: &str) -> Option<VmKey> {
        if name.starts_with('.') || name.is_empty() || name.contains('/') {
            return None;
        }
        Some(match name.split_once('@') {
            Some((profile, ip)) => VmKey {
                profile: profile.to_owned(),
                client: Some(ip.parse().ok()?),
            },
            None => VmKey {
                profile: name.to_owned(),
                client: None,
            },
        })
    }
}

impl std::fmt::Display for VmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One connection, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub client: SocketAddr,
    pub pid: u32,
    /// When it registered.
    pub since: Millis,
    /// The proxy host that serves it (etcd store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Why the store could not be used. Whatever it is, a login goes on without it (its start is not shared)
/// and nothing is stopped on its account.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("the etcd cluster did not answer within {}", crate::seconds(*.0))]
    Timeout(Duration),
}

/// Something registered in the store (a session, a call's holder, the idle waiter) for as long as this value
/// lives: dropping it, or the death of its process (or host), ends it.
pub struct Registration {
    /// Its name in the store, for a [`super::state::Holder`].
    pub name: String,
    _guard: Box<dyn Send + Sync>,
}

impl Registration {
    fn new(name: String, guard: impl Send + Sync + 'static) -> Registration {
        Registration {
            name,
            _guard: Box::new(guard),
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({})", self.name)
    }
}

/// One of the two stores.
#[derive(Debug, Clone)]
pub enum Store {
    Local(local::Local),
    Etcd(etcd::Etcd),
}

impl Store {
    /// The proxy host's name in the store, where several hosts share it.
    pub fn host(&self) -> Option<&str> {
        match self {
            Store::Local(_) => None,
            Store::Etcd(etcd) => Some(etcd.host()),
        }
    }

    /// Whether this process may decide anything (a stop) now: with etcd, not before every session of this
    /// host is in the store under a live lease.
    pub fn may_decide(&self) -> bool {
        match self {
            Store::Local(_) => true,
            Store::Etcd(etcd) => etcd.synced(),
        }
    }

    /// Registers a session of `vm`.
    pub async fn register(
        &self,
        vm: &VmKey,
        info: &SessionInfo,
    ) -> Result<Registration, StoreError> {
        match self {
            Store::Local(local) => Ok(local.register(vm, info)?),
            Store::Etcd(etcd) => etcd.register(vm, info).await,
        }
    }

    /// Ends `session` of `vm`: gone from the store when this returns (as far as the store answers), so that
    /// what is decided next no longer counts it.
    pub async fn end(&self, vm: &VmKey, session: Registration) {
        match self {
            Store::Local(_) => drop(session),
            Store::Etcd(etcd) => etcd.end(vm, session).await,
        }
    }

    /// Registers a holder for a start or stop call of `vm`, to be named in its record.
    pub async fn claim(&self, vm: &VmKey) -> Result<Registration, StoreError> {
        match self {
            Store::Local(local) => Ok(local.claim(vm)?),
            Store::Etcd(etcd) => etcd.claim(vm).await,
        }
    }

    /// Reads `vm`'s view (its live sessions counted if `count_sessions`), lets `decide` choose what to write,
    /// and writes it unless someone changed the record meanwhile, in which case it reads and decides again.
    /// Returns the view `decide` last saw and what it returned.
    pub async fn transact<T>(
        &self,
        vm: &VmKey,
        count_sessions: bool,
        decide: impl FnMut(&View) -> (Write, T),
    ) -> Result<(View, T), StoreError> {
        match self {
            Store::Local(local) => local.transact(vm, count_sessions, decide).await,
            Store::Etcd(etcd) => etcd.transact(vm, decide).await,
        }
    }

    /// `vm`'s view as it is now, changing nothing; `None` if the store knows no such VM.
    pub async fn view(&self, vm: &VmKey, count_sessions: bool) -> Result<Option<View>, StoreError> {
        match self {
            Store::Local(local) => Ok(local.view(vm, count_sessions)?),
            Store::Etcd(etcd) => etcd.view(vm).await,
        }
    }

    /// Waits until the call in flight that `seen` shows ends (or its holder dies), or the record changes.
    /// Callers bound it with their own deadlines.
    pub async fn wait(&self, vm: &VmKey, seen: &View) -> Result<(), StoreError> {
        match self {
            Store::Local(local) => Ok(local.wait(vm, seen).await?),
            Store::Etcd(etcd) => etcd.wait(vm, seen).await,
        }
    }

    /// Notes a start of `vm` made while the store could not be used, which answered `addr`: the store learns
    /// that the VM runs once it is back (etcd), so that it is stopped when idle.
    pub fn unrecorded_start(&self, vm: &VmKey, addr: std::net::SocketAddr) {
        if let Store::Etcd(etcd) = self {
            etcd.unrecorded_start(vm, addr);
        }
    }

    /// Becomes the one waiter of `vm`'s idle timeout in this process (and, for the local store, on this host),
    /// unless there is one.
    pub fn try_idle_waiter(&self, vm: &VmKey) -> Result<Option<Registration>, StoreError> {
        match self {
            Store::Local(local) => Ok(local.try_idle_waiter(vm)?),
            Store::Etcd(etcd) => Ok(etcd.try_idle_waiter(vm)),
        }
    }

    /// Reads the record of client address `source` (`None` if it has none), lets `decide` choose the new one
    /// (`None` removes it), and writes it unless someone changed it meanwhile (then it decides again). The
    /// record is opaque here; [`crate::guard`] gives it its meaning.
    pub async fn transact_source<T>(
        &self,
        source: IpAddr,
        decide: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, T),
    ) -> Result<T, StoreError> {
        match self {
            Store::Local(local) => Ok(local.transact_source(source, decide).await?),
            Store::Etcd(etcd) => etcd.transact_source(source, decide).await,
        }
    }

    /// The record of client address `source`, if it has one.
    pub async fn source(&self, source: IpAddr) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Local(local) => Ok(local.source(source)?),
            Store::Etcd(etcd) => etcd.source(source).await,
        }
    }

    /// Every client address's record.
    pub async fn sources(&self) -> Result<Vec<(IpAddr, Vec<u8>)>, StoreError> {
        match self {
            Store::Local(local) => Ok(local.sources()?),
            Store::Etcd(etcd) => etcd.sources().await,
        }
    }

    /// Every VM the store knows, sorted.
    pub async fn vms(&self) -> Result<Vec<VmKey>, StoreError> {
        match self {
            Store::Local(local) => Ok(local.vms()?),
            Store::Etcd(etcd) => etcd.vms().await,
        }
    }

    /// The live sessions of `vm`, oldest first.
    pub async fn sessions(&self, vm: &VmKey) -> Result<Vec<SessionInfo>, StoreError> {
        match self {
            Store::Local(local) => Ok(local.sessions(vm)?),
            Store::Etcd(etcd) => etcd.sessions(vm).await,
        }
    }
}
