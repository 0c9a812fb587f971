//! Session: one client from accept to close: its identification, its VM's lease, the start (its own or
//! shared), the wait for sshd, the relay or the refusal, and the one summary record. Both modes run it.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout},
};
use tracing::{Instrument, Span, debug, error, field, info_span, warn};

use crate::{
    cli::SilentClients,
    config::Profile,
    guard::{Guard, SourceRecord},
    relay,
    report::{self, Outcome, Refusal, Stats},
    vm::{
        api::Api,
        lifecycle::{IdleWatch, Lease},
        readiness::Ready,
    },
    wire,
};

mod boot;
mod host;

use boot::Boot;
pub use host::Host;

/// How long a client whose VM runs gets to send its identification before it is taken for one that waits for
/// the server (ssh-keyscan): SSH clients send theirs right behind the TCP handshake, and a silent client to a
/// running VM then hears the VM about as soon as a direct connection would.
const SILENT_WAIT_WHEN_UP: Duration = Duration::from_millis(50);

/// Client bytes buffered while the VM boots. OpenSSH sends ~1.5 KiB before it hears from the server; past this
/// we stop reading (TCP flow control holds the client) and only lose early notice of a hang-up.
const MAX_EARLY_CLIENT_BYTES: usize = 64 * 1024;

/// How a session ended, and what it leaves to its caller.
pub struct Report {
    pub outcome: Outcome,
    pub stats: Stats,
    /// The VM's idle wait, when this was its last session: the caller runs it (the per-connection process
    /// before it exits, the daemon as a task).
    pub idle: Option<(IdleWatch, Arc<Api>)>,
}

/// Proxies one client connection to its VM, starting the VM first. `profile` is the listener's, if it has
/// one; otherwise the local port picks it. Every wait is bounded by a timeout of the profile, and nothing but
/// relayed bytes or a disconnect message is ever written to `client`.
pub async fn run(client: TcpStream, ctx: &Host, profile: Option<&Arc<Profile>>) -> Report {
    let mut conn = Connection::new(client);
    let profile = profile.or_else(|| {
        conn.local
            .and_then(|local| ctx.config.profile_for_port(local.port()))
    });
    let span = conn.span(profile.map(|p| p.label()));
    async move {
        let (outcome, mut lease) = match (conn.peer, profile) {
            (None, _) => {
                conn.stats.reason = Some("the client reset the connection at once".to_owned());
                (Outcome::ClientGone, None)
            }
            (Some(_), None) => {
                error!(
                    "no profile takes connections on local port {}: list it in a profile's ports, or set a \
                     top-level api_url",
                    conn.local.map_or(0, |l| l.port())
                );
                (conn.refuse(Refusal::Misconfigured).await, None)
            }
            (Some(peer), Some(profile)) => conn.proxy(ctx, profile, peer).await,
        };
        // Over before its record is written: whoever reads the record finds the session gone.
        if let Some(lease) = &mut lease {
            lease.end().await;
        }
        // Likewise its strike, if it earned one.
        if let (Some(profile), Some(peer), Some(seen)) = (profile, conn.peer, conn.source.take()) {
            let guard = Guard {
                store: ctx.lifecycle.store(),
                profile,
            };
            let strike = conn.stats.woke && conn.went_no_further(outcome);
            guard.ended(peer.ip(), conn.stats.woke, strike, &seen).await;
        }
        conn.summarize(outcome);
        let idle = match (lease, profile) {
            (Some(lease), Some(profile)) => match lease.leave().await {
                Ok(Some(watch)) => ctx.api(profile).ok().map(|api| (watch, api)),
                Ok(None) => None,
                Err(e) => {
                    warn!("recording the end of the session: {e}");
                    None
                }
            },
            _ => None,
        };
        Report {
            outcome,
            stats: conn.stats,
            idle,
        }
    }
    .instrument(span)
    .await
}

/// For a connection that arrives while the configuration is unusable: logs `error` and tells the client the
/// host is misconfigured, without the details, which are the operator's business.
pub async fn refuse_misconfigured(client: TcpStream, error: &anyhow::Error) -> Outcome {
    let mut conn = Connection::new(client);
    let span = conn.span(None);
    async move {
        error!("configuration unusable: {error:#}");
        let outcome = conn.refuse(Refusal::Misconfigured).await;
        conn.summarize(outcome);
        outcome
    }
    .instrument(span)
    .await
}

/// Tells a client over one of the daemon's limits why it cannot be served, and records it.
pub async fn refuse_busy(client: TcpStream, why: &'static str) -> Outcome {
    let mut conn = Connection::new(client);
    let span = conn.span(None);
    async move {
        let outcome = conn.refuse(Refusal::Busy(why)).await;
        conn.summarize(outcome);
        outcome
    }
    .instrument(span)
    .await
}

struct Connection {
    client: TcpStream,
    /// `None` if the client reset the connection before we could ask who it is.
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    accepted: Instant,
    /// Client bytes read before the relay: its identification line, maybe more.
    early: Vec<u8>,
    stats: Stats,
    /// What the guard knew of the client's address when it let it in.
    source: Option<SourceRecord>,
}

impl Connection {
    fn new(client: TcpStream) -> Connection {
        Connection {
            peer: client.peer_addr().ok().map(canonical),
            local: client.local_addr().ok().map(canonical),
            client,
            accepted: Instant::now(),
            early: Vec::with_capacity(4096),
            stats: Stats::default(),
            source: None,
        }
    }

    /// The per-connection span; its fields go into every record of the connection (journal fields under
    /// journald). `vm` is filled in once the start API has answered.
    fn span(&self, profile: Option<&str>) -> Span {
        info_span!(
            "connection",
            client_addr = self.peer.map(|p| field::display(p.ip())),
            client_port = self.peer.map(|p| p.port()),
            profile,
            vm = field::Empty,
        )
    }

    async fn proxy(
        &mut self,
        ctx: &Host,
        profile: &Arc<Profile>,
        peer: SocketAddr,
    ) -> (Outcome, Option<Lease>) {
        // A client whose VM runs starts nothing: it need not be told apart from a silent one for long.
        let running = match profile.silent_clients {
            SilentClients::Close => None,
            SilentClients::IfRunning | SilentClients::Start => {
                ctx.lifecycle.running(profile, peer).await
            }
        };
        let wait = match running {
            Some(_) => SILENT_WAIT_WHEN_UP.min(profile.client_banner_timeout),
            None => profile.client_banner_timeout,
        };
        let identified = match self.read_client_identification(wait).await {
            Ok(identified) => identified,
            Err(outcome) => return (outcome, None),
        };
        // A client that says nothing is served only if its VM runs, or if the operator said to start it.
        let known = match (identified, profile.silent_clients, running) {
            (Identified::Ssh, ..) => None,
            (Identified::Silent, _, Some(vm)) => Some(vm),
            (Identified::Silent, SilentClients::Start, None) => None,
            (Identified::Silent, SilentClients::IfRunning, None) => {
                return (self.silent(profile, "and its VM is not running"), None);
            }
            (Identified::Silent, SilentClients::Close, _) => {
                return (self.silent(profile, "and is closed"), None);
            }
        };
        let guard = Guard {
            store: ctx.lifecycle.store(),
            profile,
        };
        let seen = match guard.admit(peer.ip()).await {
            Ok(seen) => seen,
            Err(refused) => return (self.refuse(refused.into()).await, None),
        };
        // From here on the connection counts as a session of its VM: no stop while it waits or relays.
        let lease = match ctx.lifecycle.join(profile, peer).await {
            Ok(lease) => {
                if let Some(e) = lease.unshared() {
                    warn!(
                        "the shared state is unusable ({e}); this connection's start is not shared"
                    );
                    self.stats.store_error = Some(e.to_string());
                }
                Some(lease)
            }
            Err(e) => {
                error!(
                    "the shared state is unusable ({e}); this connection's start is not shared, and its VM \
                     is not stopped on its account"
                );
                self.stats.store_error = Some(e.to_string());
                None
            }
        };
        // A connection that would wake its VM spends its address's budget; one to a VM that runs does not.
        let wakes = known.is_none() && lease.as_ref().and_then(Lease::running).is_none();
        if wakes && let Err(refused) = guard.may_start(&seen) {
            return (self.refuse(refused.into()).await, lease);
        }
        self.source = Some(seen);
        let waiting = match ctx.wait_slot(lease.as_ref()) {
            Ok(waiting) => waiting,
            Err(busy) => return (self.refuse(Refusal::Busy(busy)).await, lease),
        };
        let deadline = Instant::now() + profile.boot_timeout;
        let local = self.local.unwrap_or(peer);
        let boot = Boot {
            ctx,
            profile,
            lease: lease.as_ref(),
            peer,
            local,
            deadline,
            known,
        };
        let (client, early) = (&mut self.client, &mut self.early);
        let stats = &mut self.stats;
        let work = async {
            tokio::select! {
                booted = boot.run(stats) => booted,
                () = ctx.closed() => Err(Refusal::Busy("ssh-on-demand is restarting")),
            }
        };
        // On the heap, and gone once the VM answers: the start call's and the readiness probe's state (12 KiB)
        // would otherwise stay part of this future, and resident, for all of a per-connection relay.
        let booted = until_client_leaves(client, early, Box::pin(work)).await;
        drop(waiting);
        self.stats.woke |= lease.as_ref().is_some_and(Lease::woke);
        if self.stats.woke {
            guard.started(peer.ip()).await;
        }
        let outcome = match booted {
            None => {
                self.stats.reason = Some("client hung up before the VM was ready".to_owned());
                Outcome::ClientGone
            }
            Some(Err(refusal)) => self.refuse(refusal).await,
            Some(Ok(ready)) => self.relay(ctx, ready, lease.as_ref()).await,
        };
        (outcome, lease)
    }

    /// Waits for the `SSH-` that SSH clients send first (RFC 4253 §4.2), so that a port scan or a stray
    /// HTTP request does not boot a VM. A client that sends nothing at all may be one that waits for the
    /// server first (ssh-keyscan): `Silent`, for the caller to decide.
    async fn read_client_identification(&mut self, limit: Duration) -> Result<Identified, Outcome> {
        let read = async {
            loop {
                if let Some(ssh) = wire::client_identification(&self.early) {
                    return Ok::<_, std::io::Error>(Some(ssh));
                }
                if self.client.read_buf(&mut self.early).await? == 0 {
                    return Ok(None);
                }
            }
        };
        match timeout(limit, read).await {
            Ok(Ok(Some(true))) => Ok(Identified::Ssh),
            Err(_) if self.early.is_empty() => Ok(Identified::Silent),
            Ok(Ok(Some(false))) => {
                self.stats.reason = Some(format!(
                    "client sent {:?} instead of an SSH-2.0 identification",
                    String::from_utf8_lossy(&self.early[..self.early.len().min(16)])
                ));
                Err(Outcome::NotSsh)
            }
            Err(_) => {
                self.stats.reason = Some(format!(
                    "client sent no SSH identification within {}",
                    crate::seconds(limit)
                ));
                Err(Outcome::NotSsh)
            }
            Ok(Ok(None) | Err(_)) => {
                self.stats.reason = Some("client hung up before identifying".to_owned());
                Err(Outcome::ClientGone)
            }
        }
    }

    /// A silent client not served: recorded as not speaking SSH, with what was decided.
    fn silent(&mut self, profile: &Profile, what: &str) -> Outcome {
        self.stats.reason = Some(format!(
            "client sent nothing within {} (as ssh-keyscan does) {what} (silent_clients = \"{}\")",
            crate::seconds(profile.client_banner_timeout),
            profile.silent_clients.as_str()
        ));
        Outcome::NotSsh
    }

    /// A connection that woke its VM and went no further than its identification line: it left before the
    /// VM answered, or sent the VM nothing more.
    fn went_no_further(&self, outcome: Outcome) -> bool {
        let identification = self
            .early
            .iter()
            .position(|&b| b == b'\n')
            .map_or(0, |end| end + 1);
        match outcome {
            Outcome::ClientGone => true,
            Outcome::Relayed => self.stats.transferred.to_vm <= identification as u64,
            _ => false,
        }
    }

    async fn refuse(&mut self, refusal: Refusal) -> Outcome {
        if let Refusal::Guard(refused) = &refusal {
            self.stats.refused_by = Some(refused.rule());
        }
        let reason = refusal.to_string();
        if let Err(e) = wire::send_disconnect(&mut self.client, &reason).await {
            debug!("could not tell the client: {e}");
        }
        self.stats.reason = Some(reason);
        refusal.outcome()
    }

    async fn relay(&mut self, ctx: &Host, ready: Ready, lease: Option<&Lease>) -> Outcome {
        let Ready {
            stream: mut vm,
            received,
            ..
        } = ready;
        // The user's ssh waits for the VM's identification: it goes first, the bookkeeping after.
        if let Err(e) = self.client.write_all(&received).await {
            self.stats.reason = Some(format!("relay ended: {e}"));
            return Outcome::Relayed;
        }
        if let (Some(lease), Some(vm)) = (lease, self.stats.vm) {
            lease.ready(vm).await;
        }
        if let (Some(peer), Some(vm)) = (self.peer, self.stats.vm) {
            ctx.status(&format!("relaying {peer} <-> {vm}"));
        }
        ctx.before_relay();
        // Counted as they go: when the daemon closes the session, the relay is dropped, not finished.
        let counters = relay::Counters::default();
        let relayed = relay::relay_counted(&mut self.client, &mut vm, &self.early, &[], &counters);
        tokio::select! {
            result = relayed => {
                if let Err(e) = result {
                    self.stats.reason = Some(format!("relay ended: {e}"));
                    self.stats.relay_failed = Some(e.side);
                }
            }
            () = ctx.closed() => {
                self.stats.reason =
                    Some("closed: the daemon stopped and its drain_timeout passed".to_owned());
            }
        }
        let mut transferred = counters.get();
        transferred.to_client += received.len() as u64;
        self.stats.transferred = transferred;
        Outcome::Relayed
    }

    fn summarize(&self, outcome: Outcome) {
        report::summarize(self.peer, outcome, &self.stats, self.accepted.elapsed());
    }
}

/// What the client sent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identified {
    /// Its `SSH-` line.
    Ssh,
    /// Nothing, for all of `client_banner_timeout`.
    Silent,
}

/// Runs `work` while reading what the client sends into `early`. `None` if the client hangs up first, which
/// drops `work` (its HTTP request or VM connection) at once: nobody is waiting for the VM any more.
async fn until_client_leaves<T>(
    client: &mut TcpStream,
    early: &mut Vec<u8>,
    mut work: impl Future<Output = T> + Unpin,
) -> Option<T> {
    loop {
        tokio::select! {
            out = &mut work => return Some(out),
            read = client.read_buf(early), if early.len() < MAX_EARLY_CLIENT_BYTES => match read {
                // An SSH client never half-closes before the server spoke: EOF here means it is gone.
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
        }
    }
}

/// `ListenStream=22` listens on IPv6 and IPv4 at once, and shows IPv4 peers as `::ffff:203.0.113.9`; the
/// start API and the journal get `203.0.113.9`, which is what an operator knows and searches for.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
