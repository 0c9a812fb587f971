//! The client addresses' records (see [`crate::guard`]): a key each under `sources/`, replaced only by
//! transactions on the revision they were decided from.

use std::net::IpAddr;

use etcd_client::TxnOp;

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
            let current = self.get_one(&key).await?;
            let seen = current.as_ref().map_or(0, |kv| kv.mod_revision());
            let (next, out) = decide(current.as_ref().map(|kv| kv.value()));
            let then = match next {
                Some(body) => TxnOp::put(key.clone(), body, None),
                None if current.is_none() => return Ok(out),
                None => TxnOp::delete(key.clone(), None),
            };
            if self.commit(&key, seen, then).await? {
                return Ok(out);
            }
        }
        Err(StoreError::Etcd(format!(
            "the record of {source} changed under {MAX_ATTEMPTS} decisions in a row"
        )))
    }

    pub async fn source(&self, source: IpAddr) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(&format!("sources/{source}"));
        Ok(self.get_one(&key).await?.map(|kv| kv.value().to_vec()))
    }

    pub async fn sources(&self) -> Result<Vec<(IpAddr, Vec<u8>)>, StoreError> {
        let found = self.get(&self.key("sources/"), false).await?;
        Ok(found
            .into_iter()
            .filter_map(|(name, body)| Some((name.parse().ok()?, body)))
            .collect())
    }
}
