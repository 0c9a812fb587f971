//! The client addresses' records (see [`crate::guard`]): a key each under `sources/`, replaced only by
//! transactions on the revision they were decided from.

use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{Etcd, MAX_ATTEMPTS};
use crate::vm::store::StoreError;

impl Etcd {
    pub async fn transact_source<T>(
        &self,
        source: IpAddr,
        mut decide: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, T),
    ) -> Result<T, StoreError> {
        let key = self.key(&format!("sources/{source}"));
        for _ in 0..MAX_ATTEMPTS {
            let found = self
                .inner
                .members
                .call(|mut c| {
                    let key = key.clone();
                    async move { c.get(key, None).await }
                })
                .await
                .inspect_err(|e| self.error(e))?;
            let current = found.kvs().first();
            let seen = current.map_or(0, |kv| kv.mod_revision());
            let (next, out) = decide(current.map(|kv| kv.value()));
            let then = match next {
                Some(body) => TxnOp::put(key.clone(), body, None),
                None if current.is_none() => return Ok(out),
                None => TxnOp::delete(key.clone(), None),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, seen)])
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
            if response.succeeded() {
                return Ok(out);
            }
        }
        Err(StoreError::Etcd(format!(
            "the record of {source} changed under {MAX_ATTEMPTS} decisions in a row"
        )))
    }

    pub async fn source(&self, source: IpAddr) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(&format!("sources/{source}"));
        let found = self
            .inner
            .members
            .call(|mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(found.kvs().first().map(|kv| kv.value().to_vec()))
    }

    pub async fn sources(&self) -> Result<Vec<(IpAddr, Vec<u8>)>, StoreError> {
        let found = self.get(&self.key("sources/"), false).await?;
        Ok(found
            .into_iter()
            .filter_map(|(name, body)| Some((name.parse().ok()?, body)))
            .collect())
    }
}
