//! etcd's side of the store: the key layout under `etcd_prefix`, the reads and compare-and-swap writes the
//! store's operations are made of, each through [`super::members`] (which fails over between the members),
//! and the count of etcd's failures for the metrics.

use std::{collections::HashSet, sync::atomic::Ordering};

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp};
use tracing::warn;

use super::{Etcd, lock};
use crate::vm::{
    state::{Record, View},
    store::{StoreError, VmKey},
};

impl Etcd {
    /// `key`, if it exists.
    pub(super) async fn get_one(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let found = self
            .inner
            .members
            .call(|mut c| {
                let key = key.to_owned();
                async move { c.get(key, None).await }
            })
            .await
            .inspect_err(|e| self.error(e))?;
        Ok(found.kvs().first().cloned())
    }

    /// Does `then` if `key` is still at revision `seen` (0: absent): whether it was done.
    pub(super) async fn commit(
        &self,
        key: &str,
        seen: i64,
        then: TxnOp,
    ) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, seen)])
            .and_then([then]);
        let response = self
            .inner
            .members
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .inspect_err(|e| self.error(e))?;
        Ok(response.succeeded())
    }

    /// Keys under `prefix` (without it), with their values unless `keys_only`.
    pub(super) async fn get(
        &self,
        prefix: &str,
        keys_only: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut options = GetOptions::new().with_prefix();
        if keys_only {
            options = options.with_keys_only();
        }
        let response = self
            .inner
            .members
            .call(|mut c| {
                let (prefix, options) = (prefix.to_owned(), options.clone());
                async move { c.get(prefix, Some(options)).await }
            })
            .await?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key()).ok()?.get(prefix.len()..)?;
                Some((key.to_owned(), kv.value().to_vec()))
            })
            .collect())
    }

    /// Everything under the VM's keys, at one revision: its record (and the revision it was written at, 0 if
    /// none), its live sessions, and whether the holder it names is alive.
    pub(super) async fn read(&self, vm: &VmKey) -> Result<(View, i64), StoreError> {
        let prefix = self.vm_key(vm, "");
        let response = self
            .inner
            .members
            .call(|mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await
            .inspect_err(|e| self.error(e))?;
        let revision = response.header().map_or(0, |h| h.revision());
        let (mut record, mut seen) = (Record::default(), 0);
        let (mut sessions, mut claims) = (0, HashSet::new());
        for kv in response.kvs() {
            let Some(rest) = kv.key().strip_prefix(prefix.as_bytes()) else {
                continue;
            };
            if rest == b"record" {
                seen = kv.mod_revision();
                record = serde_json::from_slice(kv.value()).unwrap_or_else(|e| {
                    warn!("{prefix}record is damaged ({e}); taking the VM as new");
                    Record::default()
                });
            } else if rest.starts_with(b"sessions/") {
                sessions += 1;
            } else if let Some(claim) = rest.strip_prefix(b"claims/") {
                claims.insert(claim.to_vec());
            }
        }
        let holder_alive = record.phase.holder().is_some_and(|holder| {
            let host = holder.host.as_deref().unwrap_or_default();
            claims.contains(format!("{host}/{}", holder.claim).as_bytes())
        });
        let view = View {
            record,
            sessions: Some(sessions),
            holder_alive,
            revision,
        };
        Ok((view, seen))
    }

    /// Writes `key` bound to this host's lease.
    pub(super) async fn put_leased(&self, key: &str, body: Vec<u8>) -> Result<(), StoreError> {
        let Some(lease) = *lock(&self.inner.lease) else {
            return Err(StoreError::Etcd("this host holds no lease yet".to_owned()));
        };
        self.inner
            .members
            .call(|mut c| {
                let (key, body) = (key.to_owned(), body.clone());
                async move {
                    c.put(key, body, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await
            .map(drop)
    }

    pub(super) fn error(&self, e: &StoreError) {
        self.inner.counters.errors.inc();
        warn!(store_error = %e, "{e}");
    }

    /// A new registration's name (what a record's holder names) and key.
    pub(super) fn name(&self, vm: &VmKey, kind: &str) -> (String, String) {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}.{n}", std::process::id());
        let key = self.vm_key(vm, &format!("{kind}/{}/{name}", self.inner.host));
        (name, key)
    }

    pub(super) fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.inner.prefix)
    }

    pub(super) fn vm_key(&self, vm: &VmKey, rest: &str) -> String {
        format!("{}vms/{}/{rest}", self.inner.prefix, vm.name())
    }
}
