//! This host's lease: granted (with every registration written under it), kept alive at a third of its TTL,
//! and granted anew, every registration written again, when it is lost. Until it is, this host decides
//! nothing. Also the watch that tells the daemon which VMs lost a session without its host saying so.

use std::{
    net::SocketAddr,
    sync::{Arc, Weak, atomic::Ordering},
    time::{Duration, Instant},
};

use etcd_client::{EventType, WatchOptions};
use tracing::{info, warn};

use super::{Etcd, Inner, lock};
use crate::vm::{
    state::{self, Event, Rules},
    store::{StoreError, VmKey, now_ms},
};

/// Pause between tries to get a lease, or to watch, while the cluster cannot answer.
const RETRY: Duration = Duration::from_millis(500);

/// Grants this host's first lease, if the cluster answers now (sessions registered before it cannot be
/// shared), and keeps leases from then on.
pub(super) async fn start(etcd: &Etcd) {
    let first = match etcd.grant().await {
        Ok(id) => Some(id),
        Err(e) => {
            warn!(store_error = %e, "no etcd lease yet ({e}); logins go on without the store, and nothing is stopped, until the cluster answers");
            None
        }
    };
    tokio::spawn(keep_lease(Arc::downgrade(&etcd.inner), first));
}

async fn keep_lease(inner: Weak<Inner>, mut first: Option<i64>) {
    let mut failing = first.is_none();
    loop {
        let Some(etcd) = inner.upgrade().map(|inner| Etcd { inner }) else {
            return;
        };
        let granted = match first.take() {
            Some(id) => Ok(id),
            None => etcd.grant().await,
        };
        let id = match granted {
            Ok(id) => id,
            Err(e) => {
                if !failing {
                    warn!(store_error = %e, "no etcd lease ({e}); retrying");
                    failing = true;
                }
                drop(etcd);
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        failing = false;
        etcd.keep(id).await;
        // The lease is gone: every session of this host vanished from the store with it.
        etcd.inner.synced.store(false, Ordering::Relaxed);
        *lock(&etcd.inner.lease) = None;
        etcd.inner.counters.leases_lost.inc();
        warn!(
            lease = format!("{id:x}"),
            "this host's etcd lease is lost; its sessions are written again under a new one as soon as the \
             cluster grants it, and no stop is decided meanwhile"
        );
    }
}

impl Etcd {
    /// A new lease, with this host's key and every registration written under it.
    async fn grant(&self) -> Result<i64, StoreError> {
        let ttl = granted_ttl(self.inner.ttl);
        let id = self
            .inner
            .members
            .call(|mut c| async move { c.lease_grant(ttl, None).await })
            .await?
            .id();
        *lock(&self.inner.lease) = Some(id);
        let host =
            serde_json::json!({ "pid": std::process::id(), "version": env!("CARGO_PKG_VERSION") });
        let key = self.key(&format!("hosts/{}", self.inner.host));
        self.put_leased(&key, host.to_string().into_bytes()).await?;
        let written = self.resync().await?;
        self.inner.counters.leases_granted.inc();
        info!(
            lease = format!("{id:x}"),
            ttl_s = ttl,
            sessions = written,
            "etcd lease granted, {written} registration(s) of this host written under it"
        );
        Ok(id)
    }

    /// Writes every registration of this host under the current lease; then decisions may be made again.
    async fn resync(&self) -> Result<usize, StoreError> {
        let registrations: Vec<(String, Vec<u8>)> = lock(&self.inner.registry)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, body) in &registrations {
            self.put_leased(key, body.clone()).await?;
        }
        let unrecorded: Vec<(VmKey, SocketAddr)> = lock(&self.inner.unrecorded).drain().collect();
        for (vm, addr) in unrecorded {
            let told = self
                .transact(&vm, |view| {
                    let event = Event::Unrecorded { vm: addr };
                    // It needs nothing of a profile's rules.
                    (
                        state::step(view, event, now_ms(), &Rules::default()).write,
                        (),
                    )
                })
                .await;
            if let Err(e) = told {
                lock(&self.inner.unrecorded).entry(vm).or_insert(addr);
                return Err(e);
            }
            info!(vm_key = %vm, vm = %addr, "etcd learns of a start made while it could not be reached");
        }
        self.inner.synced.store(true, Ordering::Relaxed);
        if let Some(changes) = &*lock(&self.inner.changes) {
            let _ = changes.send(None);
        }
        Ok(registrations.len())
    }

    /// Keeps lease `id` alive until it is lost: not renewed for a whole TTL, or expired in the cluster.
    async fn keep(&self, id: i64) {
        let every = self.inner.ttl / 3;
        let mut renewed = Instant::now();
        let mut failing = false;
        while renewed.elapsed() < self.inner.ttl {
            let result = async {
                let (mut keeper, mut stream) = self
                    .inner
                    .members
                    .call(|mut c| async move { c.lease_keep_alive(id).await })
                    .await?;
                loop {
                    let answer = tokio::time::timeout(every, async {
                        keeper.keep_alive().await?;
                        stream.message().await
                    })
                    .await
                    .map_err(|_| StoreError::Timeout(every))?
                    .map_err(|e| StoreError::Etcd(e.to_string()))?
                    .ok_or_else(|| StoreError::Etcd("the keep-alive stream ended".to_owned()))?;
                    if answer.ttl() <= 0 {
                        return Ok(Expired);
                    }
                    renewed = Instant::now();
                    if failing || !self.synced() {
                        let written = self.resync().await?;
                        if failing {
                            info!(
                                sessions = written,
                                "etcd answers again; this host's registrations are written"
                            );
                        }
                        failing = false;
                    }
                    tokio::time::sleep(every).await;
                }
            }
            .await;
            match result {
                Ok(Expired) => return,
                Err(e) => {
                    if !failing {
                        self.error(&e);
                        warn!(
                            "renewing the etcd lease failed ({e}); retrying until its TTL runs out"
                        );
                    }
                    failing = true;
                    tokio::time::sleep(RETRY.min(every)).await;
                }
            }
        }
    }
}

/// The TTL asked of etcd: `etcd_lease_ttl` plus one renewal interval (in whole seconds, as etcd counts), so
/// that the sessions of a host that dies outlive it by at least `etcd_lease_ttl` whenever it last renewed.
fn granted_ttl(ttl: Duration) -> i64 {
    (ttl + ttl / 3).as_secs_f64().ceil() as i64
}

/// The cluster says the lease has expired.
struct Expired;

/// Tells the daemon's sweep which VM lost a session without its host saying so (the host's lease expired);
/// a session this host ends is recorded by its own leave.
pub(super) async fn watch_sessions(inner: Weak<Inner>) {
    loop {
        let Some(etcd) = inner.upgrade().map(|inner| Etcd { inner }) else {
            return;
        };
        let prefix = etcd.key("vms/");
        let watched = etcd
            .inner
            .members
            .call(|mut c| {
                let prefix = prefix.clone();
                async move {
                    c.watch(prefix, Some(WatchOptions::new().with_prefix()))
                        .await
                }
            })
            .await;
        let Ok(mut stream) = watched else {
            drop(etcd);
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let mine = format!("sessions/{}/", etcd.inner.host);
        drop(etcd);
        while let Ok(Some(response)) = stream.message().await {
            let Some(inner) = inner.upgrade() else { return };
            for event in response.events() {
                if event.event_type() != EventType::Delete {
                    continue;
                }
                let key = event.kv().and_then(|kv| std::str::from_utf8(kv.key()).ok());
                let Some((vm, rest)) = key
                    .and_then(|k| k.get(prefix.len()..))
                    .and_then(|k| k.split_once('/'))
                else {
                    continue;
                };
                if rest.starts_with("sessions/") && !rest.starts_with(&mine) {
                    if let (Some(vm), Some(changes)) =
                        (VmKey::from_name(vm), &*lock(&inner.changes))
                    {
                        let _ = changes.send(Some(vm));
                    }
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}
