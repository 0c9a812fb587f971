//! Daemon mode: one long-lived process for every connection (`Accept=no`). It takes its listening sockets
//! from systemd or `--listen`, admits connections within its limits, tells systemd how it is doing (`READY=1`,
//! `STATUS=`, `WATCHDOG=1`), reloads its configuration on SIGHUP and drains its sessions on SIGTERM.

mod admission;
mod housekeeping;
mod listeners;

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock, atomic::AtomicU64},
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures_util::StreamExt;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::time::timeout;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    cli::Cli,
    config::{Config, Profile, StoreConfig},
    limits::Limits,
    metrics::{self, Metrics},
    session::Host,
    vm::{
        api::Api,
        lifecycle::Profiles,
        store::{Store, etcd::Etcd, local::Local, now_ms},
    },
};
use listeners::{Listener, bind, inherited_listeners, raise_open_files_limit};

/// After the drain timeout, sessions are told to close; this is how long they get to say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves until SIGTERM or SIGINT: Ok after a drain, an error if it could not start or serve.
pub fn run(cli: &Cli, listen: &[(SocketAddr, Option<String>)]) -> anyhow::Result<()> {
    // listenfd reads and clears LISTEN_*: before the runtime starts any thread.
    let inherited = inherited_listeners()?;
    let config = Config::load(cli).context("configuration unusable")?;
    raise_open_files_limit();
    let runtime = crate::runtime(true)?;
    let result = runtime.block_on(async {
        let store = match &config.store {
            StoreConfig::Local => Store::Local(Local::new(&config.state_dir)),
            StoreConfig::Etcd(etcd) => Store::Etcd(Etcd::connect(etcd, true).await?),
        };
        let listeners = bind(inherited, listen).await?;
        let listening = listeners
            .iter()
            .map(|l| l.socket.local_addr())
            .collect::<Result<_, _>>()?;
        let daemon = Daemon::new(cli.clone(), config, store, listening);
        daemon.serve(listeners).await
    });
    // Idle waits still pending end with the process; the next start's sweep takes them over.
    runtime.shutdown_timeout(Duration::from_millis(100));
    if result.is_err() {
        let _ = sd_notify::notify(&[NotifyState::Errno(1)]);
    }
    result
}

/// The daemon's state across connections and reloads: what every session is served with, its limits and
/// metrics, and the sessions themselves, for the drain. Its parts: [`admission`] (accepting and admitting
/// connections), [`housekeeping`] (sweeps, `STATUS=`, the watchdog), [`listeners`] (its sockets).
struct Daemon {
    cli: Cli,
    /// Replaced whole by a reload; sessions keep the one they started with.
    current: RwLock<Arc<Host>>,
    /// Outlives reloads: the etcd store holds this host's lease and sessions.
    store: Store,
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    refusing: Arc<tokio::sync::Semaphore>,
    /// Cancelled once the drain timeout has passed: every session closes.
    close: CancellationToken,
    sessions: TaskTracker,
    /// The listening sockets' addresses: no start API answer may point back at them.
    listening: Vec<SocketAddr>,
}

impl Daemon {
    fn new(cli: Cli, config: Config, store: Store, listening: Vec<SocketAddr>) -> Arc<Daemon> {
        let limits = Arc::new(Limits::default());
        let close = CancellationToken::new();
        let ctx = Host::for_daemon(
            Arc::new(config),
            store.clone(),
            limits.clone(),
            close.clone(),
            listening.clone(),
        );
        let metrics = Arc::new(Metrics::new(&store));
        Arc::new(Daemon {
            cli,
            current: RwLock::new(Arc::new(ctx)),
            store,
            limits,
            metrics,
            refusing: Arc::new(tokio::sync::Semaphore::new(admission::MAX_REFUSING)),
            close,
            sessions: TaskTracker::new(),
            listening,
        })
    }

    fn current(&self) -> Arc<Host> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn serve(self: Arc<Self>, listeners: Vec<Listener>) -> Result<()> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).context("handling signals")?;
        let stop_accepting = CancellationToken::new();
        let heartbeats: Vec<Arc<AtomicU64>> = listeners
            .iter()
            .map(|_| Arc::new(AtomicU64::new(now_ms())))
            .collect();
        let mut accepting = Vec::new();
        for (listener, heartbeat) in listeners.into_iter().zip(&heartbeats) {
            let addr = listener.socket.local_addr()?;
            info!(listen = %addr, name = listener.name.as_deref(), "listening");
            accepting.push(tokio::spawn(self.clone().accept_loop(
                listener,
                heartbeat.clone(),
                stop_accepting.clone(),
            )));
        }
        if let Some(listen) = &self.current().config.daemon.metrics_listen {
            let (listen, metrics) = (listen.clone(), self.metrics.clone());
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(&listen, metrics).await {
                    error!("{e:#}");
                }
            });
        }
        if let Some(every) = sd_notify::watchdog_enabled() {
            tokio::spawn(housekeeping::watchdog(every, heartbeats));
        }
        tokio::spawn(self.clone().housekeeping());
        let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);

        // SIGHUP reloads; SIGTERM or SIGINT ends the loop, and the drain begins.
        while let Some(SIGHUP) = signals.next().await {
            self.reload();
        }
        // Closed before the drain: from here on, new connections are refused (or wait for a successor in
        // systemd's socket), never half-served.
        stop_accepting.cancel();
        for loop_ in accepting {
            let _ = loop_.await;
        }
        self.drain().await;
        Ok(())
    }

    /// Reads the configuration again for new connections; a broken one is refused and the old one kept.
    fn reload(&self) {
        let _ = sd_notify::notify(&[NotifyState::Reloading]);
        match Config::load(&self.cli) {
            Ok(config) => {
                if std::mem::discriminant(&config.store)
                    != std::mem::discriminant(&self.current().config.store)
                    || matches!(config.store, StoreConfig::Etcd(_))
                {
                    warn!(
                        "the store's settings (state_store, etcd_*) apply at the next restart only"
                    );
                }
                let ctx = Host::for_daemon(
                    Arc::new(config),
                    self.store.clone(),
                    self.limits.clone(),
                    self.close.clone(),
                    self.listening.clone(),
                );
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ctx);
                info!("configuration reloaded; it applies to new connections");
            }
            Err(e) => error!("configuration not reloaded, the previous one stays in use: {e:#}"),
        }
        let _ = sd_notify::notify(&[NotifyState::Ready]);
    }

    /// Lets sessions finish for `drain_timeout`, then closes those left.
    async fn drain(&self) {
        let drain = self.current().config.daemon.drain_timeout;
        self.sessions.close();
        let left = self.limits.sessions();
        info!(
            sessions = left,
            "stopping: draining sessions for up to {drain:?}"
        );
        let status = format!("stopping: draining {left} sessions");
        let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(&status)]);
        if timeout(drain, self.sessions.wait()).await.is_err() {
            warn!(
                sessions = self.limits.sessions(),
                "drain_timeout passed; closing the sessions left"
            );
            self.close.cancel();
            let _ = timeout(CLOSE_GRACE, self.sessions.wait()).await;
        }
    }
}

/// An idle wait follows reloads: its profile as the configuration now has it.
impl Profiles for Daemon {
    fn now(&self, label: &str) -> Option<(Arc<Profile>, Arc<Api>)> {
        self.current().now(label)
    }
}
