//! Limits: the daemon's bounds on connections at once, per client address, and waiting per VM, which the
//! socket unit's `MaxConnections=`/`MaxConnectionsPerSource=` give the per-connection mode.
//!
//! Each admitted connection holds a [`Places`] that gives its place back when dropped, however the session
//! ends. The bounds are read at each admission, so a reloaded configuration applies to the next connection.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::vm::store::VmKey;

/// Why a connection was not admitted; the text ends "this host is busy: …" for the user.
pub type Busy = &'static str;

/// Counts of what is in progress.
#[derive(Debug, Default)]
pub struct Limits {
    sessions: Counter<()>,
    per_source: Counter<IpAddr>,
    pending: Counter<VmKey>,
}

impl Limits {
    /// Admits a new connection from `source` if neither the total nor its address's share is used up.
    pub fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        max_sessions: usize,
        max_per_source: usize,
    ) -> Result<Places, Busy> {
        let total = self
            .sessions
            .take((), max_sessions)
            .ok_or("too many connections at once")?;
        let mine = self
            .per_source
            .take(source, max_per_source)
            .ok_or("too many connections from your address at once")?;
        Ok(Places(vec![total, mine]))
    }

    /// A place among the connections waiting for `key` to start, if fewer than `max` wait.
    pub fn wait_for(&self, key: &VmKey, max: usize) -> Result<Places, Busy> {
        let place = self
            .pending
            .take(key.clone(), max)
            .ok_or("too many logins are waiting for this VM to start")?;
        Ok(Places(vec![place]))
    }

    /// Connections in progress.
    pub fn sessions(&self) -> usize {
        self.sessions.get(&())
    }
}

/// Places held; given back when dropped.
pub struct Places(#[allow(dead_code)] Vec<Place>);

impl std::fmt::Debug for Places {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Places({})", self.0.len())
    }
}

/// Gives one place back when dropped.
struct Place(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

/// Counts per key, entries removed at zero so that a stream of addresses does not grow the map.
#[derive(Debug)]
struct Counter<K>(Arc<Mutex<HashMap<K, usize>>>);

impl<K> Default for Counter<K> {
    fn default() -> Self {
        Counter(Arc::default())
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Counter<K> {
    fn take(&self, key: K, max: usize) -> Option<Place> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key.clone()).or_default();
        if *count >= max {
            if *count == 0 {
                counts.remove(&key);
            }
            return None;
        }
        *count += 1;
        let counts = self.0.clone();
        Some(Place(Some(Box::new(move || {
            let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = counts.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&key);
                }
            }
        }))))
    }

    fn get(&self, key: &K) -> usize {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_come_back_when_slots_drop() {
        let limits = Arc::new(Limits::default());
        let a: IpAddr = [203, 0, 113, 9].into();
        let b: IpAddr = [203, 0, 113, 10].into();
        let first = limits.admit(a, 3, 2).unwrap();
        let second = limits.admit(a, 3, 2).unwrap();
        assert_eq!(
            limits.admit(a, 3, 2).unwrap_err(),
            "too many connections from your address at once"
        );
        let third = limits.admit(b, 3, 2).unwrap();
        assert_eq!(
            limits.admit(b, 3, 2).unwrap_err(),
            "too many connections at once"
        );
        assert_eq!(limits.sessions(), 3);
        drop((first, second, third));
        assert_eq!(limits.sessions(), 0);
        assert!(limits.per_source.0.lock().unwrap().is_empty());
        assert!(limits.admit(a, 3, 2).is_ok());
    }
}
