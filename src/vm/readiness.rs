//! Readiness: waits until the VM's sshd sends its identification line, and keeps the connection that saw it.
//!
//! A TCP accept proves nothing: QEMU user networking and Docker-style port forwards accept on the host before
//! the guest listens, then close or reset. Only the `SSH-` line means sshd is there. That connection is the
//! one relayed (its bytes included), so sshd sees one connection per login, not a probe and then a login.
//!
//! A booting VM either refuses connections (RST) or, before its network is up, drops SYNs; a dropped SYN is
//! only sent again a full second later (the kernel's initial retransmission timeout), so one attempt at a time
//! notices a VM that came up late by up to a second. Instead a new attempt starts every [`ATTEMPT_INTERVAL`]
//! while earlier ones are still pending, at most [`MAX_CONNECTING`] at once: the VM is seen within one
//! interval of opening its port, while a VM far away still gets each attempt's full connect timeout to answer.

use std::{
    collections::VecDeque,
    future::{Future, poll_fn},
    io,
    net::SocketAddr,
    pin::Pin,
    task::Poll,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, sleep_until, timeout, timeout_at},
};
use tracing::debug;

use crate::wire;

/// A new connection attempt starts this often while none is connected: how late, at most, we notice that
/// the VM opened its port. 50 SYNs a second are nothing to a VM or a network.
pub const ATTEMPT_INTERVAL: Duration = Duration::from_millis(20);
/// Attempts waiting for a TCP answer at once. Each waits up to `vm_connect_timeout`; with the default (1 s)
/// they are never more than this. Past it the oldest attempt is dropped, which sends nothing.
pub const MAX_CONNECTING: usize = 50;
/// A connection that has heard nothing this long may be a port forward's (QEMU user networking accepts for
/// a guest whose network is not up yet, and its SYN to the guest is lost): from then on a new attempt starts
/// this often beside it, so that the guest's sshd is found within this long of listening rather than at the
/// end of `vm_banner_timeout`. A slow sshd meanwhile gets one more connection this often, closed politely.
pub const SILENT_RETRY: Duration = Duration::from_secs(1);
/// Connections waiting for sshd's line at once; past it no new attempt starts.
const MAX_CONNECTED: usize = 8;
/// sshd may send other lines before its identification (RFC 4253 §4.2); past this it is not sshd.
const MAX_BEFORE_IDENTIFICATION: usize = 16 * 1024;
/// How long a connection that reached the VM but lost the race may take to be closed politely, in the
/// background (see [`dismiss`]).
const DISMISS_LINGER: Duration = Duration::from_secs(2);

/// Per-attempt limits; the overall deadline is passed separately.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// One TCP connect.
    pub connect: Duration,
    /// The identification line, once connected.
    pub banner: Duration,
}

/// A connection to the VM's sshd, with what it has sent so far (its identification line at least).
#[derive(Debug)]
pub struct Ready {
    pub stream: TcpStream,
    pub received: Vec<u8>,
    /// Connection attempts started, the one kept included.
    pub attempts: u32,
}

/// The VM did not answer by the deadline. The text is what the ssh user reads.
#[derive(Debug, thiserror::Error)]
#[error("VM did not answer within {} (start API said {}; last try: {last})", crate::seconds(*.waited), said(.addr))]
pub struct NotReady {
    pub addr: SocketAddr,
    pub waited: Duration,
    pub last: String,
}

fn said(addr: &SocketAddr) -> String {
    if addr.port() == 22 {
        addr.ip().to_string()
    } else {
        addr.to_string()
    }
}

/// A TCP connect in progress, with its own timeout. Dropping it closes a socket that has sent a SYN and got
/// nothing back, which sends nothing: the VM never sees it.
type Connecting = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// A connection waiting for the identification line.
struct Connected {
    stream: TcpStream,
    received: Vec<u8>,
    banner_by: Instant,
    /// Heard from in time, or too new to tell: no other attempt is needed beside it.
    since: Instant,
}

impl Connected {
    /// It may be a dead end: nothing heard for [`SILENT_RETRY`].
    fn silent(&self, now: Instant) -> bool {
        self.received.is_empty() && now >= self.since + SILENT_RETRY
    }
}

/// Connects to `addr` again and again until sshd identifies itself or `deadline` passes. `waited` is the
/// overall budget the deadline came from, for the message.
pub async fn wait_for_sshd(
    addr: SocketAddr,
    deadline: Instant,
    waited: Duration,
    timeouts: Timeouts,
) -> Result<Ready, NotReady> {
    let mut connecting: VecDeque<Connecting> = VecDeque::new();
    let mut connected: Vec<Connected> = Vec::new();
    let mut attempts = 0;
    let mut last = NO_TCP_ANSWER.to_owned();
    let mut next_attempt = Instant::now();
    loop {
        // Checked first: past the deadline the timers below are all due, and one that is listed before the
        // deadline's would win the select again and again.
        if Instant::now() >= deadline {
            return Err(NotReady { addr, waited, last });
        }
        // While a connection waits for sshd's line, more connections would only reach sshd too, unless the
        // ones waiting have heard nothing for a while. The first attempt, and one that is due, starts here
        // rather than through a timer, which would add a tick.
        let now = Instant::now();
        let may_attempt = connected.is_empty()
            || (connected.len() < MAX_CONNECTED && connected.iter().all(|c| c.silent(now)));
        if may_attempt && now >= next_attempt {
            if connecting.len() == MAX_CONNECTING {
                connecting.pop_front();
            }
            attempts += 1;
            connecting.push_back(connect(
                addr,
                deadline.min(Instant::now() + timeouts.connect),
            ));
            let interval = if connected.is_empty() {
                ATTEMPT_INTERVAL
            } else {
                SILENT_RETRY
            };
            next_attempt = Instant::now() + interval;
        }
        // When the connections waiting turn silent, or the next attempt is due while they are.
        let retry_at = match connected.iter().map(|c| c.since + SILENT_RETRY).max() {
            None => next_attempt,
            Some(silent_at) if connected.len() < MAX_CONNECTED => silent_at.max(next_attempt),
            Some(_) => deadline,
        };
        let banner_due = connected.iter().map(|c| c.banner_by).min();
        tokio::select! {
            biased;
            (i, result) = next_finished(&mut connecting) => {
                drop(connecting.remove(i));
                match result {
                    Ok(stream) => connected.push(Connected {
                        stream,
                        received: Vec::with_capacity(256),
                        banner_by: deadline.min(Instant::now() + timeouts.banner),
                        since: Instant::now(),
                    }),
                    Err(error) => note(&mut last, attempts, error.to_string(), deadline),
                }
            }
            i = next_readable(&connected) => match read_identification(&mut connected[i]) {
                Progress::Waiting => {}
                Progress::Identified => {
                    let Connected { stream, received, .. } = connected.swap_remove(i);
                    connected.into_iter().for_each(|loser| dismiss(loser.stream));
                    return Ok(Ready { stream, received, attempts });
                }
                Progress::Failed(error) => {
                    connected.swap_remove(i);
                    note(&mut last, attempts, error, deadline);
                }
            },
            () = sleep_until(retry_at) => {}
            () = sleep_until(banner_due.unwrap_or(deadline)), if banner_due.is_some() => {
                let now = Instant::now();
                connected.retain(|c| c.banner_by > now);
                let error = "TCP connected, but no SSH identification came".to_owned();
                note(&mut last, attempts, error, deadline);
            }
            () = sleep_until(deadline) => return Err(NotReady { addr, waited, last }),
        }
    }
}

const NO_TCP_ANSWER: &str = "no TCP answer";

/// Records how an attempt failed, for the message at the deadline. An attempt the deadline itself cut short
/// says less about the VM than the one before it, which is kept.
fn note(last: &mut String, attempts: u32, error: String, deadline: Instant) {
    debug!(attempts, %error, "VM not ready yet");
    if Instant::now() < deadline || last == NO_TCP_ANSWER {
        *last = error;
    }
}

fn connect(addr: SocketAddr, by: Instant) -> Connecting {
    Box::pin(async move {
        timeout_at(by, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, NO_TCP_ANSWER)))
    })
}

/// The first attempt to finish, and how it finished.
async fn next_finished(connecting: &mut VecDeque<Connecting>) -> (usize, io::Result<TcpStream>) {
    poll_fn(|cx| {
        for (i, attempt) in connecting.iter_mut().enumerate() {
            if let Poll::Ready(result) = attempt.as_mut().poll(cx) {
                return Poll::Ready((i, result));
            }
        }
        Poll::Pending
    })
    .await
}

/// The first connection with something to read (or an error to report).
async fn next_readable(connected: &[Connected]) -> usize {
    poll_fn(|cx| {
        for (i, c) in connected.iter().enumerate() {
            if c.stream.poll_read_ready(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    })
    .await
}

enum Progress {
    Waiting,
    Identified,
    Failed(String),
}

/// Reads what has arrived, without waiting.
fn read_identification(c: &mut Connected) -> Progress {
    loop {
        match c.stream.try_read_buf(&mut c.received) {
            Ok(0) => {
                return Progress::Failed(
                    "TCP connected, then closed before any SSH identification".to_owned(),
                );
            }
            Ok(_) if wire::has_identification(&c.received) => return Progress::Identified,
            Ok(_) if c.received.len() > MAX_BEFORE_IDENTIFICATION => {
                return Progress::Failed("TCP connected, but what came back is not SSH".to_owned());
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Progress::Waiting,
            Err(e) => return Progress::Failed(format!("TCP connected, then {e}")),
        }
    }
}

/// Closes a connection that lost the race after reaching the VM, in the background. Dropping it would make
/// sshd log an error (`kex_exchange_identification: Connection closed by remote host`); instead it gets an
/// identification line and an SSH disconnect "by application", which sshd logs as a normal disconnect at
/// INFO level. We then read until sshd closes, because closing with its bytes unread would send an RST.
fn dismiss(mut stream: TcpStream) {
    tokio::spawn(async move {
        let _ = timeout(DISMISS_LINGER, async {
            let message = crate::wire::message("another connection was faster");
            stream.write_all(&message).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? != 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM that accepts and says nothing until the deadline: the wait ends at the deadline (it once
    /// spun past it, its attempt timer due and winning the select over the deadline's).
    #[tokio::test]
    async fn a_silent_vm_is_given_up_at_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut accepted = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                accepted.push(stream);
            }
        });
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            banner: Duration::from_secs(60),
        };
        let waited = Duration::from_millis(200);
        let wait = wait_for_sshd(addr, Instant::now() + waited, waited, timeouts);
        let result = tokio::time::timeout(Duration::from_secs(10), wait).await;
        let error = result.expect("the wait ended").unwrap_err();
        assert_eq!(error.waited, waited);
        held.abort();
    }

    /// A port forward that accepts for a guest whose network is not up (QEMU user networking) holds the first
    /// connection silent: a later attempt reaches the guest's sshd, long before the first's banner timeout.
    #[tokio::test]
    async fn a_connection_that_stays_silent_does_not_hold_the_next_attempt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let forward = tokio::spawn(async move {
            let (dead_end, _) = listener.accept().await.unwrap();
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(b"SSH-2.0-guest\r\n").await;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(stream)
                });
            }
            drop(dead_end);
        });
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            banner: Duration::from_secs(60),
        };
        let waited = Duration::from_secs(20);
        let ready = wait_for_sshd(addr, Instant::now() + waited, waited, timeouts)
            .await
            .expect("the guest's sshd answered a later attempt");
        assert_eq!(ready.received, b"SSH-2.0-guest\r\n");
        assert!(ready.attempts >= 2);
        forward.abort();
    }

    #[test]
    fn message_names_what_the_api_said() {
        let error = NotReady {
            addr: "192.168.0.57:22".parse().unwrap(),
            waited: Duration::from_secs(120),
            last: "connection refused".into(),
        };
        assert_eq!(
            error.to_string(),
            "VM did not answer within 120 s (start API said 192.168.0.57; last try: connection refused)"
        );
    }
}
