//! What the host gives every session: its configuration, the VMs' shared state, its HTTP clients, and the
//! bounds of its mode.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, Profile},
    limits::{Limits, Places},
    vm::{
        api::Api,
        lifecycle::{Lease, Lifecycle, Profiles},
        store::{Store, local::Local},
    },
};

/// What the host gives every session, in either mode: the configuration, the VMs' shared state, one HTTP
/// client per profile, and the mode's own bounds. The modes differ only in how they fill it.
pub struct Host {
    pub config: Arc<Config>,
    pub lifecycle: Lifecycle,
    apis: Mutex<HashMap<String, Arc<Api>>>,
    /// Per-connection processes report their progress to systemd (`STATUS=`); the daemon has its own.
    notify_status: bool,
    /// Cancelled when every session must close: by the daemon, once its drain timeout has passed; never in
    /// a per-connection process, which ends with its one session.
    close: CancellationToken,
    /// The daemon's bound on the connections waiting for each VM; a per-connection process waits alone.
    limits: Option<Arc<Limits>>,
    /// The proxy's listening sockets, where no answer may send a connection: the daemon's own. A
    /// per-connection process has only its connection, not the socket unit's listener: it knows the port the
    /// client reached, not whether the listener takes it on one address or, as the shipped unit does, on
    /// every address. So `None` there, read as every address on the connection's port, which refuses a
    /// service on the same port of another of this host's addresses too.
    listening: Option<Vec<SocketAddr>>,
}

impl Host {
    /// A per-connection process's host (and the sweep's): its VMs in the local store, in the configured
    /// state directory.
    pub fn new(config: Arc<Config>, notify_status: bool) -> Host {
        let store = Store::Local(Local::new(&config.state_dir));
        Host {
            lifecycle: Lifecycle::new(store),
            config,
            apis: Mutex::default(),
            notify_status,
            close: CancellationToken::new(),
            limits: None,
            listening: None,
        }
    }

    /// The daemon's: `limits` bound the connections waiting per VM, cancelling `close` ends every session,
    /// and `listening` are its listening sockets.
    pub fn for_daemon(
        config: Arc<Config>,
        store: Store,
        limits: Arc<Limits>,
        close: CancellationToken,
        listening: Vec<SocketAddr>,
    ) -> Host {
        Host {
            lifecycle: Lifecycle::new(store),
            config,
            apis: Mutex::default(),
            notify_status: false,
            close,
            limits: Some(limits),
            listening: Some(listening),
        }
    }

    /// Where no answer may send the connection that arrived at `local`.
    pub(super) fn own_listeners(&self, local: SocketAddr) -> Vec<SocketAddr> {
        self.listening.clone().unwrap_or_else(|| {
            vec![SocketAddr::new(
                std::net::Ipv6Addr::UNSPECIFIED.into(),
                local.port(),
            )]
        })
    }

    /// Resolves when every session must close.
    pub(super) async fn closed(&self) {
        self.close.cancelled().await
    }

    /// A place among the connections waiting for their VM, where the host bounds them.
    pub(super) fn wait_slot(&self, lease: Option<&Lease>) -> Result<Option<Places>, &'static str> {
        match (&self.limits, lease) {
            (Some(limits), Some(lease)) => limits
                .wait_for(lease.key(), self.config.daemon.max_pending_per_vm)
                .map(Some),
            _ => Ok(None),
        }
    }

    /// The HTTP client of `profile`'s APIs, built on first use: a per-connection process builds the one it
    /// needs, the daemon one per profile and configuration.
    pub fn api(&self, profile: &Profile) -> anyhow::Result<Arc<Api>> {
        let mut apis = self.apis.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(api) = apis.get(profile.label()) {
            return Ok(api.clone());
        }
        let api = Arc::new(Api::new(profile)?);
        apis.insert(profile.label().to_owned(), api.clone());
        Ok(api)
    }

    /// Before a relay: a per-connection process, which holds its memory for the session's whole life, gives
    /// back what its login needed and its relay does not (the HTTP clients, built again if the idle wait needs
    /// one; the stack the start call touched). The daemon's clients serve its next logins.
    pub(super) fn before_relay(&self) {
        if self.limits.is_none() {
            self.apis.lock().unwrap_or_else(|e| e.into_inner()).clear();
            crate::memory::release_unused_stack();
        }
    }

    pub(super) fn status(&self, text: &str) {
        if self.notify_status {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(text)]);
        }
    }
}

/// Its configuration, as it stays: an idle waiter asks the daemon's current context, or the sweep's.
impl Profiles for Host {
    fn now(&self, label: &str) -> Option<(Arc<Profile>, Arc<Api>)> {
        let profile = self.config.profile_labeled(label)?.clone();
        let api = self.api(&profile).ok()?;
        Some((profile, api))
    }
}
