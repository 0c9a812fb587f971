//! The etcd store: the VMs' shared state in an etcd cluster, for several proxy hosts in front of the same VMs
//! (an HA pair, DNS round-robin, a load balancer). Keys, under `etcd_prefix`:
//!
//! - `hosts/HOST`: each proxy host, bound to its lease (which hosts are alive, for `status`);
//! - `vms/VM/record`: the VM's [`Record`], only ever replaced by a transaction that compares the revision it
//!   was decided from, so that of two hosts deciding at once (the one start of a burst, the one stop of an
//!   idle VM) exactly one wins and the other decides again on what the winner wrote;
//! - `vms/VM/sessions/HOST/N`, `vms/VM/claims/HOST/N`: each live session and each start or stop call in
//!   flight, bound to its host's lease.
//!
//! Each daemon holds one lease ([`lease`]); [`kv`] has etcd's calls and the key layout. A host that dies (or is cut off) loses it after its TTL, and with
//! it its sessions and calls: the other hosts see its VMs idle from then. When the store cannot be reached,
//! logins go on without it (their starts are not shared) and nothing is stopped.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use etcd_client::{TxnOp, WatchOptions};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::{Registration, SessionInfo, StoreError, VmKey};
use crate::{
    config::EtcdConfig,
    vm::state::{View, Write},
};

mod kv;
mod lease;
mod members;
mod sources;

use members::Members;

/// Attempts of one read-decide-write before giving up: each failed attempt means another host changed the
/// VM's record meanwhile, which a burst of logins does a few times at most.
const MAX_ATTEMPTS: u32 = 32;

/// A connection to the cluster; clones share it (and its lease).
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Etcd({}, host {})", self.inner.prefix, self.inner.host)
    }
}

struct Inner {
    members: Members,
    prefix: String,
    host: String,
    ttl: std::time::Duration,
    /// The lease this host's keys are bound to, once granted.
    lease: Mutex<Option<i64>>,
    /// Every registration this host holds, key to value: written again under a new lease.
    registry: Mutex<HashMap<String, Vec<u8>>>,
    /// Every registration is in the store under the current lease: decisions may be made.
    synced: AtomicBool,
    /// VMs whose idle timeout a task of this process waits out.
    waiting: Mutex<HashSet<VmKey>>,
    next: AtomicU64,
    /// Starts made while the store could not be reached: told to it when it is back.
    unrecorded: Mutex<HashMap<VmKey, std::net::SocketAddr>>,
    /// Wakes the daemon's sweep: a session key vanished (a host's lease expired) or this host re-synced.
    changes: Mutex<Option<mpsc::UnboundedSender<Option<VmKey>>>>,
    counters: Counters,
}

/// What the daemon's metrics count of the store (clones share their counts).
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub errors: Counter,
    pub leases_lost: Counter,
    pub leases_granted: Counter,
    pub deferred: Counter,
}

impl Etcd {
    /// Connects to the cluster. With `lease`, this process takes part as a host: it is granted a lease
    /// (now, or as soon as the cluster can), keeps it alive and registers its sessions under it. Without,
    /// it only reads (`status`).
    pub async fn connect(config: &EtcdConfig, lease: bool) -> anyhow::Result<Etcd> {
        let etcd = Etcd {
            inner: Arc::new(Inner {
                members: Members::new(config)?,
                prefix: config.prefix.clone(),
                host: config.host_id.clone(),
                ttl: config.lease_ttl,
                lease: Mutex::new(None),
                registry: Mutex::default(),
                synced: AtomicBool::new(false),
                waiting: Mutex::default(),
                unrecorded: Mutex::default(),
                next: AtomicU64::new(0),
                changes: Mutex::new(None),
                counters: Counters::default(),
            }),
        };
        if lease {
            lease::start(&etcd).await;
        }
        Ok(etcd)
    }

    /// For `check-config`: a member answers, with these credentials.
    pub async fn check(config: &EtcdConfig) -> anyhow::Result<()> {
        let etcd = Etcd::connect(config, false).await?;
        etcd.hosts().await.map_err(anyhow::Error::from)?;
        Ok(())
    }

    pub fn host(&self) -> &str {
        &self.inner.host
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// This host's registrations are all in the store under a live lease: it may decide.
    pub fn synced(&self) -> bool {
        self.inner.synced.load(Ordering::Relaxed)
    }

    /// The VMs worth a look now, `None` for all of them: sent when a session's key vanishes without its
    /// host saying so (its lease expired), and when this host has written its sessions again.
    pub fn changes(&self) -> mpsc::UnboundedReceiver<Option<VmKey>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *lock(&self.inner.changes) = Some(tx);
        tokio::spawn(lease::watch_sessions(Arc::downgrade(&self.inner)));
        rx
    }

    /// Registers a session. It is kept in memory first, so that it is written (again) whenever the store
    /// takes it; failing to write it now only means the store does not know it yet.
    pub async fn register(
        &self,
        vm: &VmKey,
        info: &SessionInfo,
    ) -> Result<Registration, StoreError> {
        let body = serde_json::to_vec(info).map_err(|e| StoreError::Etcd(e.to_string()))?;
        let (name, key) = self.name(vm, "sessions");
        lock(&self.inner.registry).insert(key.clone(), body.clone());
        let registration = Registration::new(
            name,
            Unregister {
                inner: self.inner.clone(),
                key: key.clone(),
            },
        );
        if let Err(e) = self.put_leased(&key, body).await {
            self.inner.synced.store(false, Ordering::Relaxed);
            self.error(&e);
        }
        Ok(registration)
    }

    pub fn unrecorded_start(&self, vm: &VmKey, addr: std::net::SocketAddr) {
        lock(&self.inner.unrecorded).insert(vm.clone(), addr);
    }

    /// Ends a session now rather than when its registration is dropped.
    pub async fn end(&self, vm: &VmKey, session: Registration) {
        let key = self.vm_key(
            vm,
            &format!("sessions/{}/{}", self.inner.host, session.name),
        );
        lock(&self.inner.registry).remove(&key);
        let deleted = self
            .inner
            .members
            .call(|mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await;
        if let Err(e) = deleted {
            self.error(&e);
        }
        drop(session);
    }

    /// Registers a holder of a call: it must be in the store before the record names it.
    pub async fn claim(&self, vm: &VmKey) -> Result<Registration, StoreError> {
        let (name, key) = self.name(vm, "claims");
        self.put_leased(&key, Vec::new())
            .await
            .inspect_err(|e| self.error(e))?;
        lock(&self.inner.registry).insert(key.clone(), Vec::new());
        Ok(Registration::new(
            name,
            Unregister {
                inner: self.inner.clone(),
                key,
            },
        ))
    }

    pub async fn transact<T>(
        &self,
        vm: &VmKey,
        mut decide: impl FnMut(&View) -> (Write, T),
    ) -> Result<(View, T), StoreError> {
        let record_key = self.vm_key(vm, "record");
        for _ in 0..MAX_ATTEMPTS {
            let (view, seen) = self.read(vm).await?;
            let (write, out) = decide(&view);
            let then = match write {
                Write::Keep => return Ok((view, out)),
                Write::Put(record) => {
                    let body =
                        serde_json::to_vec(&record).map_err(|e| StoreError::Etcd(e.to_string()))?;
                    TxnOp::put(record_key.clone(), body, None)
                }
                // Only the record: a session registering this very moment keeps its key.
                Write::Forget => TxnOp::delete(record_key.clone(), None),
            };
            if self.commit(&record_key, seen, then).await? {
                return Ok((view, out));
            }
        }
        Err(StoreError::Etcd(format!(
            "{vm}'s record changed under {MAX_ATTEMPTS} decisions in a row"
        )))
    }

    pub async fn view(&self, vm: &VmKey) -> Result<Option<View>, StoreError> {
        let (view, seen) = self.read(vm).await?;
        Ok((seen != 0 || view.sessions.unwrap_or(0) > 0).then_some(view))
    }

    /// Waits for a change of the VM's record or calls after what `seen` was read at. Sessions that come and
    /// go (a burst registering) change nothing a waiter waits for.
    pub async fn wait(&self, vm: &VmKey, seen: &View) -> Result<(), StoreError> {
        let key = self.vm_key(vm, "");
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(seen.revision + 1);
        let mut stream = self
            .inner
            .members
            .call(|mut c| {
                let (key, options) = (key.clone(), options.clone());
                async move { c.watch(key, Some(options)).await }
            })
            .await?;
        let sessions = format!("{key}sessions/");
        loop {
            match stream.message().await {
                Ok(Some(response)) if !response.canceled() => {
                    let news = response.events().iter().any(|event| {
                        event
                            .kv()
                            .is_some_and(|kv| !kv.key().starts_with(sessions.as_bytes()))
                    });
                    if news {
                        return Ok(());
                    }
                }
                Ok(_) => return Ok(()),
                Err(e) => return Err(StoreError::Etcd(e.to_string())),
            }
        }
    }

    pub fn try_idle_waiter(&self, vm: &VmKey) -> Option<Registration> {
        let mut waiting = lock(&self.inner.waiting);
        if !waiting.insert(vm.clone()) {
            return None;
        }
        Some(Registration::new(
            "idle".to_owned(),
            Waiter {
                inner: self.inner.clone(),
                vm: vm.clone(),
            },
        ))
    }

    pub async fn vms(&self) -> Result<Vec<VmKey>, StoreError> {
        let keys = self.get(&self.key("vms/"), true).await?;
        let mut vms: Vec<VmKey> = keys
            .iter()
            .filter_map(|(key, _)| VmKey::from_name(key.strip_suffix("/record")?))
            .collect();
        vms.sort();
        vms.dedup();
        Ok(vms)
    }

    pub async fn sessions(&self, vm: &VmKey) -> Result<Vec<SessionInfo>, StoreError> {
        let found = self.get(&self.vm_key(vm, "sessions/"), false).await?;
        let mut sessions: Vec<SessionInfo> = found
            .iter()
            .filter_map(|(_, value)| serde_json::from_slice(value).ok())
            .collect();
        sessions.sort_by_key(|s| s.since);
        Ok(sessions)
    }

    /// The hosts whose leases are alive.
    pub async fn hosts(&self) -> Result<Vec<String>, StoreError> {
        let found = self.get(&self.key("hosts/"), true).await?;
        Ok(found.into_iter().map(|(host, _)| host).collect())
    }
}

/// Removes a registration: from memory at once, from the store as soon as it answers (or by the lease's end).
struct Unregister {
    inner: Arc<Inner>,
    key: String,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        if lock(&self.inner.registry).remove(&self.key).is_none() {
            return; // ended already
        }
        let (inner, key) = (self.inner.clone(), std::mem::take(&mut self.key));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = inner
                    .members
                    .call(|mut c| {
                        let key = key.clone();
                        async move { c.delete(key, None).await }
                    })
                    .await;
            });
        }
    }
}

struct Waiter {
    inner: Arc<Inner>,
    vm: VmKey,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        lock(&self.inner.waiting).remove(&self.vm);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
