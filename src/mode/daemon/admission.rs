//! Taking connections in: the accept loops, and admitting each connection within the daemon's limits or
//! telling its client which limit it hit.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use ssh_on_demand_common::retry::Backoff;
use tokio::{
    net::TcpStream,
    time::{MissedTickBehavior, interval, sleep},
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Daemon, Listener};
use crate::{report::Outcome, session, vm::store::now_ms};

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
pub(super) const MAX_REFUSING: usize = 256;
impl Daemon {
    pub(super) async fn accept_loop(
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
