//! Connection: one client from accept to close: its identification, the start API, the wait for the VM, the
//! relay or the refusal, and the one summary record.

use std::{future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use tokio::{
    io::AsyncReadExt,
    net::TcpStream,
    time::{Instant, timeout},
};
use tracing::{Instrument, Level, Span, debug, error, field, info, info_span};

use crate::{
    config::Config,
    disconnect,
    readiness::{self, NotReady, Ready, Timeouts},
    relay,
    start_api::{ApiError, StartApi, StartRequest},
};

/// Journal `MESSAGE_ID` of the one summary record per connection: `journalctl MESSAGE_ID=…` lists connections.
pub const SUMMARY_MESSAGE_ID: &str = "4f1d2c6b8a9e4b0c9d7e3a5f6b2c1d08";
/// Client bytes buffered while the VM boots. OpenSSH sends ~1.5 KiB before it hears from the server; past this
/// we stop reading (TCP flow control holds the client) and only lose early notice of a hang-up.
const MAX_EARLY_CLIENT_BYTES: usize = 64 * 1024;

/// How a connection ended. It decides the exit status and the `OUTCOME` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed to the VM until both sides finished (or one failed).
    Relayed,
    /// The client hung up before the VM was ready.
    ClientGone,
    /// The client did not open with an SSH identification, so nothing was started.
    NotSsh,
    /// The start API gave no usable address; the client was told why.
    ApiFailed,
    /// The VM did not send its SSH identification by the deadline; the client was told why.
    VmNotReady,
    /// The configuration is unusable; the client was told so.
    Misconfigured,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::ClientGone => "client_gone",
            Outcome::NotSsh => "not_ssh",
            Outcome::ApiFailed => "api_failed",
            Outcome::VmNotReady => "vm_not_ready",
            Outcome::Misconfigured => "misconfigured",
        }
    }

    /// The VM could not be given to the user: worth a warning and a failed unit.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::ApiFailed | Outcome::VmNotReady | Outcome::Misconfigured
        )
    }

    /// 1 for a failure (systemd then marks the instance failed until it is collected), else 0.
    pub fn exit_code(self) -> ExitCode {
        if self.is_failure() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// Why the user gets no VM. The text is the one line their ssh client prints.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("VM failed to start: {0}")]
    Api(#[from] ApiError),
    #[error(transparent)]
    NotReady(#[from] NotReady),
    #[error(
        "ssh-on-demand is misconfigured on this host; its operator can read why in the journal"
    )]
    Misconfigured,
}

impl Refusal {
    fn outcome(&self) -> Outcome {
        match self {
            Refusal::Api(_) => Outcome::ApiFailed,
            Refusal::NotReady(_) => Outcome::VmNotReady,
            Refusal::Misconfigured => Outcome::Misconfigured,
        }
    }
}

/// Proxies one client connection to its VM, starting the VM first. Every wait is bounded by a timeout from
/// `config`, and nothing but relayed bytes or a disconnect message is ever written to `client`.
pub async fn run(client: TcpStream, config: &Config) -> Outcome {
    let Some(mut conn) = Connection::new(client) else {
        return Outcome::ClientGone;
    };
    let span = conn.span(config.profile.as_deref());
    async move {
        let outcome = conn.proxy(config).await;
        conn.summarize(outcome);
        outcome
    }
    .instrument(span)
    .await
}

/// For a connection that arrives while the configuration is unusable: logs `error` and tells the client the
/// host is misconfigured, without the details, which are the operator's business.
pub async fn refuse_misconfigured(client: TcpStream, error: &anyhow::Error) -> Outcome {
    let Some(mut conn) = Connection::new(client) else {
        return Outcome::ClientGone;
    };
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

struct Connection {
    client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    accepted: Instant,
    /// Client bytes read before the relay: its identification line, maybe more.
    early: Vec<u8>,
    stats: Stats,
}

/// What the summary record reports besides the outcome.
#[derive(Debug, Default)]
struct Stats {
    vm: Option<SocketAddr>,
    api: Option<Duration>,
    vm_wait: Option<Duration>,
    transferred: relay::Transferred,
    reason: Option<String>,
}

impl Connection {
    /// `None` if the client reset the connection between accept and now: nobody to serve, nothing to record.
    fn new(client: TcpStream) -> Option<Connection> {
        Some(Connection {
            peer: canonical(client.peer_addr().ok()?),
            local: canonical(client.local_addr().ok()?),
            client,
            accepted: Instant::now(),
            early: Vec::with_capacity(4096),
            stats: Stats::default(),
        })
    }

    /// The per-connection span; its fields go into every record of the connection (journal fields under
    /// journald). `vm` is filled in once the start API has answered.
    fn span(&self, profile: Option<&str>) -> Span {
        info_span!(
            "connection",
            client_addr = %self.peer.ip(),
            client_port = self.peer.port(),
            profile,
            vm = field::Empty,
        )
    }

    async fn proxy(&mut self, config: &Config) -> Outcome {
        if let Err(outcome) = self
            .read_client_identification(config.client_banner_timeout)
            .await
        {
            return outcome;
        }
        let deadline = Instant::now() + config.boot_timeout;
        let (client, early) = (&mut self.client, &mut self.early);
        let booted = until_client_leaves(
            client,
            early,
            boot(config, self.peer, self.local, deadline, &mut self.stats),
        )
        .await;
        match booted {
            None => {
                self.stats.reason = Some("client hung up before the VM was ready".to_owned());
                Outcome::ClientGone
            }
            Some(Err(refusal)) => self.refuse(refusal).await,
            Some(Ok(ready)) => self.relay(ready).await,
        }
    }

    /// Waits for the `SSH-` that every SSH client sends first (RFC 4253 §4.2), so that a port scan or a stray
    /// HTTP request does not boot a VM.
    async fn read_client_identification(&mut self, limit: Duration) -> Result<(), Outcome> {
        let read = async {
            while self.early.len() < 4 {
                if self.client.read_buf(&mut self.early).await? == 0 {
                    return Ok(false);
                }
            }
            Ok::<_, std::io::Error>(true)
        };
        match timeout(limit, read).await {
            Ok(Ok(true)) if self.early.starts_with(b"SSH-") => Ok(()),
            Ok(Ok(true)) => {
                self.stats.reason = Some(format!(
                    "client sent {:?} instead of an SSH identification",
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
            Ok(Ok(false) | Err(_)) => {
                self.stats.reason = Some("client hung up before identifying".to_owned());
                Err(Outcome::ClientGone)
            }
        }
    }

    async fn refuse(&mut self, refusal: Refusal) -> Outcome {
        let reason = refusal.to_string();
        if let Err(e) = disconnect::send(&mut self.client, &reason).await {
            debug!("could not tell the client: {e}");
        }
        self.stats.reason = Some(reason);
        refusal.outcome()
    }

    async fn relay(&mut self, ready: Ready) -> Outcome {
        let Ready {
            stream: mut vm,
            received,
            ..
        } = ready;
        if let Some(vm) = self.stats.vm {
            status(&format!("relaying {} <-> {vm}", self.peer));
        }
        let (transferred, result) =
            relay::relay(&mut self.client, &mut vm, &self.early, &received).await;
        self.stats.transferred = transferred;
        if let Err(e) = result {
            self.stats.reason = Some(format!("relay ended: {e}"));
        }
        Outcome::Relayed
    }

    /// The one summary record of the connection: a warning for failures, so that `journalctl -p warning`
    /// lists exactly the users who got no VM.
    fn summarize(&self, outcome: Outcome) {
        let Stats {
            vm,
            api,
            vm_wait,
            transferred,
            reason,
        } = &self.stats;
        let duration = self.accepted.elapsed();
        let message = match (outcome, reason) {
            (Outcome::Relayed, _) => format!(
                "{} <-> {}: {} bytes to VM, {} to client in {}",
                self.peer,
                vm.map_or("VM".to_owned(), |vm| vm.to_string()),
                transferred.to_vm,
                transferred.to_client,
                crate::seconds(duration)
            ),
            (_, Some(reason)) => format!("{} {}: {reason}", self.peer, outcome.as_str()),
            (_, None) => format!("{} {}", self.peer, outcome.as_str()),
        };
        macro_rules! summary {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    message_id = SUMMARY_MESSAGE_ID,
                    outcome = outcome.as_str(),
                    reason = reason.as_deref(),
                    api_ms = api.map(|d| d.as_millis() as u64),
                    vm_wait_ms = vm_wait.map(|d| d.as_millis() as u64),
                    bytes_to_vm = transferred.to_vm,
                    bytes_to_client = transferred.to_client,
                    duration_ms = duration.as_millis() as u64,
                    "{message}"
                )
            };
        }
        if outcome.is_failure() {
            summary!(Level::WARN);
        } else {
            summary!(Level::INFO);
        }
    }
}

/// Starts the VM and waits for its sshd, all by `deadline`.
async fn boot(
    config: &Config,
    peer: SocketAddr,
    local: SocketAddr,
    deadline: Instant,
    stats: &mut Stats,
) -> Result<Ready, Refusal> {
    let api = StartApi::new(&config.api, config.vm_port).map_err(|e| {
        error!("configuration unusable: {e:#}");
        Refusal::Misconfigured
    })?;
    let request = StartRequest {
        client_addr: peer.ip(),
        client_port: peer.port(),
        local_addr: local.ip(),
        local_port: local.port(),
        profile: config.profile.as_deref(),
    };
    status(&format!("starting the VM for {peer}"));
    let asked = Instant::now();
    let started = api.start(&request, deadline).await;
    stats.api = Some(asked.elapsed());
    let started = started?;
    stats.vm = Some(started.addr);
    Span::current().record("vm", field::display(started.addr));
    info!(
        api_ms = asked.elapsed().as_millis() as u64,
        attempts = started.attempts,
        "start API answered {}",
        started.addr
    );

    status(&format!("waiting for the VM at {}", started.addr));
    let waiting = Instant::now();
    let timeouts = Timeouts {
        connect: config.vm_connect_timeout,
        banner: config.vm_banner_timeout,
    };
    let ready =
        readiness::wait_for_sshd(started.addr, deadline, config.boot_timeout, timeouts).await;
    stats.vm_wait = Some(waiting.elapsed());
    let ready = ready?;
    info!(
        vm_wait_ms = waiting.elapsed().as_millis() as u64,
        attempts = ready.attempts,
        "VM answered"
    );
    Ok(ready)
}

/// Runs `work` while reading what the client sends into `early`. `None` if the client hangs up first, which
/// drops `work` (its HTTP request or VM connection) at once: nobody is waiting for the VM any more.
async fn until_client_leaves<T>(
    client: &mut TcpStream,
    early: &mut Vec<u8>,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::pin!(work);
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

/// Shown by `systemctl status` for the connection's unit; a no-op outside systemd.
fn status(text: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(text)]);
}
