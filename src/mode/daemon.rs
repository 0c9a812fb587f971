//! Daemon mode: one long-lived process for every connection (`Accept=no`). It takes its listening sockets
//! from systemd or `--listen`, admits connections within its limits, tells systemd how it is doing (`READY=1`,
//! `STATUS=`, `WATCHDOG=1`), reloads its configuration on SIGHUP and drains its sessions on SIGTERM.

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use listenfd::ListenFd;
use sd_notify::NotifyState;
use socket2::{SockRef, TcpKeepalive};
use ssh_on_demand_common::retry::Backoff;
use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval, sleep, timeout},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    cli::Cli,
    config::{Config, Profile, StoreConfig},
    limits::Limits,
    metrics::{self, Metrics},
    report::Outcome,
    session::{self, Host},
    vm::{
        api::Api,
        lifecycle::{self, Due, Profiles},
        state::Shown,
        store::{Store, etcd::Etcd, local::Local, now_ms},
    },
};

/// Keep-alive on client connections, as the per-connection socket unit sets it (`KeepAliveTimeSec=120`,
/// `KeepAliveIntervalSec=30`, `KeepAliveProbes=4`): a client that vanished is noticed in 4 minutes.
const CLIENT_KEEPALIVE_IDLE: Duration = Duration::from_secs(120);
const CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const CLIENT_KEEPALIVE_PROBES: u32 = 4;
/// Pause after an accept error such as EMFILE, doubling up to [`MAX_ACCEPT_PAUSE`]: retrying at once would
/// spin on the same error.
const FIRST_ACCEPT_PAUSE: Duration = Duration::from_millis(10);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);
/// Refusals being told at once (each lingers up to [`crate::wire::LINGER`]); past this, excess connections
/// are closed without a word rather than let a flood grow tasks without bound.
const MAX_REFUSING: usize = 256;
/// How often VMs whose idle waiter died are looked for, and `STATUS=` refreshed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const STATUS_EVERY: Duration = Duration::from_secs(5);
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

/// A listening socket, and the profile it is for if systemd named it after one (`FileDescriptorName=`).
struct Listener {
    socket: TcpListener,
    name: Option<String>,
}

fn inherited_listeners() -> Result<Vec<(StdListener, Option<String>)>> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|names| names.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = ListenFd::from_env();
    (0..fds.len())
        .map(|i| {
            let listener = fds
                .take_tcp_listener(i)
                .with_context(|| format!("LISTEN_FDS socket {i} is not a TCP listening socket"))?
                .context("LISTEN_FDS socket taken twice")?;
            Ok((listener, names.get(i).cloned()))
        })
        .collect()
}

async fn bind(
    inherited: Vec<(StdListener, Option<String>)>,
    listen: &[(SocketAddr, Option<String>)],
) -> Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for (listener, name) in inherited {
        listener.set_nonblocking(true)?;
        listeners.push(Listener {
            socket: TcpListener::from_std(listener)?,
            name,
        });
    }
    for (addr, name) in listen {
        let socket = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        listeners.push(Listener {
            socket,
            name: name.clone(),
        });
    }
    if listeners.is_empty() {
        bail!(
            "no socket to listen on: give --listen ADDR, or start the daemon from a socket unit (Accept=no)"
        );
    }
    Ok(listeners)
}

/// The soft limit of open files is 1024 by default; every session holds two sockets and more. Raised to
/// the hard limit, which systemd sets high.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!("raising the open files limit: {e}");
        }
    }
}

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
            refusing: Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING)),
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
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
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
            tokio::spawn(watchdog(every, heartbeats));
        }
        tokio::spawn(self.clone().housekeeping());
        let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);

        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => self.reload(),
            }
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

    async fn accept_loop(
        self: Arc<Self>,
        listener: Listener,
        heartbeat: Arc<AtomicU64>,
        stop: CancellationToken,
    ) {
        let mut pause = Backoff::new(FIRST_ACCEPT_PAUSE, MAX_ACCEPT_PAUSE);
        // The watchdog trusts the loop only while it keeps coming round, busy or not.
        let mut tick = interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            heartbeat.store(now_ms(), Ordering::Relaxed);
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
                accepted = listener.socket.accept() => match accepted {
                    Ok((stream, peer)) => {
                        pause = Backoff::new(FIRST_ACCEPT_PAUSE, MAX_ACCEPT_PAUSE);
                        self.admit(stream, peer, listener.name.as_deref());
                    }
                    Err(e) if is_fleeting(&e) => {}
                    Err(e) => {
                        let delay = pause.next_delay();
                        warn!(listen = ?listener.socket.local_addr().ok(), "accepting: {e}; pausing {delay:?}");
                        sleep(delay).await;
                    }
                },
            }
        }
    }

    /// Starts a session for the connection, or tells the client which limit it hit.
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, listener: Option<&str>) {
        let ctx = self.current();
        tune_client(&stream);
        let limits = &ctx.config.daemon;
        let admitted = self.limits.admit(
            peer.ip().to_canonical(),
            limits.max_sessions,
            limits.max_sessions_per_source,
        );
        let slot = match admitted {
            Ok(slot) => slot,
            Err(busy) => {
                self.metrics.refused(Outcome::Busy);
                // Past MAX_REFUSING, the socket just closes: a flood must not cost unbounded tasks.
                if let Ok(permit) = self.refusing.clone().try_acquire_owned() {
                    self.sessions.spawn(async move {
                        session::refuse_busy(stream, busy).await;
                        drop(permit);
                    });
                } else {
                    warn!(client = %peer, "{busy}; closed without a word: too many refusals at once");
                }
                return;
            }
        };
        self.metrics.set_sessions(self.limits.sessions());
        let profile = listener
            .and_then(|name| ctx.config.profile_named(name))
            .cloned();
        let daemon = self.clone();
        self.sessions.spawn(async move {
            let report = session::run(stream, &ctx, profile.as_ref()).await;
            drop(slot);
            daemon.metrics.set_sessions(daemon.limits.sessions());
            daemon.metrics.session(&report);
            if let Some((watch, api)) = report.idle {
                tokio::spawn(async move {
                    let stopped = watch.run(api, &*daemon).await;
                    daemon.metrics.stop(stopped);
                });
            }
        });
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

    /// Stops VMs whose idle waiter died (at start, and then every minute; with etcd also as soon as another
    /// host's sessions vanish, or this host's are back in the store), and keeps `STATUS=` current.
    async fn housekeeping(self: Arc<Self>) {
        let mut sweep = interval(SWEEP_EVERY);
        let mut status = interval(STATUS_EVERY);
        let mut changes = match &self.store {
            Store::Etcd(etcd) => Some(etcd.changes()),
            Store::Local(_) => None,
        };
        loop {
            tokio::select! {
                _ = sweep.tick() => {
                    let ctx = self.current();
                    let watches = lifecycle::sweep(&ctx.lifecycle, &ctx.config, u64::MAX).await;
                    Daemon::run_due(&self, &ctx, watches);
                }
                Some(change) = async { changes.as_mut()?.recv().await } => {
                    let ctx = self.current();
                    let watches = match change {
                        Some(key) => lifecycle::sweep_one(&ctx.lifecycle, &ctx.config, &key).await.into_iter().collect(),
                        None => lifecycle::sweep(&ctx.lifecycle, &ctx.config, u64::MAX).await,
                    };
                    Daemon::run_due(&self, &ctx, watches);
                }
                _ = status.tick() => {
                    let text = self.status_text().await;
                    let _ = sd_notify::notify(&[NotifyState::Status(&text)]);
                }
            }
        }
    }

    /// Runs what the sweep found due: idle waits, and starts ahead of logins.
    fn run_due(self: &Arc<Self>, ctx: &Host, due: Vec<Due>) {
        for due in due {
            let Some(profile) = ctx.config.profile_labeled(&due.key().profile) else {
                continue;
            };
            match ctx.api(profile) {
                Ok(api) => {
                    let daemon = self.clone();
                    tokio::spawn(async move {
                        if let Some(stopped) = due.run(api, &*daemon).await {
                            daemon.metrics.stop(stopped);
                        }
                    });
                }
                Err(e) => error!("{e:#}"),
            }
        }
    }

    /// `12 sessions; lab: up, 3 sessions; ci@203.0.113.9: idle, stop due in 240 s`, for `systemctl status`.
    async fn status_text(&self) -> String {
        let sessions = self.limits.sessions();
        let mut text = format!("{sessions} session{}", if sessions == 1 { "" } else { "s" });
        let ctx = self.current();
        if let Ok(vms) = crate::status::collect(&self.store, Some(&ctx.config)).await {
            self.metrics.set_vms(&vms);
            let now = now_ms();
            for vm in vms.iter().filter(|vm| vm.state != Shown::Stopped).take(8) {
                text.push_str(&format!("; {}: {}", vm.key, vm.state));
                if !vm.sessions.is_empty() {
                    let n = vm.sessions.len();
                    text.push_str(&format!(", {n} session{}", if n == 1 { "" } else { "s" }));
                }
                if let Some(due) = vm.stop_due {
                    text.push_str(&format!(
                        ", stop due in {} s",
                        due.saturating_sub(now) / 1000
                    ));
                }
            }
        }
        text
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

/// Pings systemd's watchdog at half its interval, but only while every accept loop keeps coming round: a
/// stuck loop stops the pings, and systemd restarts the daemon.
async fn watchdog(every: Duration, heartbeats: Vec<Arc<AtomicU64>>) {
    let mut tick = interval(every / 2);
    loop {
        tick.tick().await;
        let now = now_ms();
        let stale = (every.as_millis() as u64).max(2000);
        if heartbeats
            .iter()
            .all(|beat| now.saturating_sub(beat.load(Ordering::Relaxed)) < stale)
        {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        } else {
            warn!("an accept loop has not come round for {stale} ms; not pinging the watchdog");
        }
    }
}

/// Errors of one connection that was already gone, rather than of the listener.
fn is_fleeting(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

fn tune_client(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(CLIENT_KEEPALIVE_IDLE)
        .with_interval(CLIENT_KEEPALIVE_INTERVAL)
        .with_retries(CLIENT_KEEPALIVE_PROBES);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}
