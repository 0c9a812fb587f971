//! Relay: bytes both ways until both directions are finished, passing each half-close on.
//!
//! On Linux the bytes never enter this process: splice(2) moves them from one socket into a pipe and from the
//! pipe into the other socket, as page references. That halves the CPU a relayed GiB costs compared with
//! reading into a buffer and writing it out again. Where splice is not available, a copy loop does the same
//! job.

use std::{
    io,
    net::Shutdown,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

#[cfg(any(target_os = "linux", target_os = "android"))]
pub use splice::PIPE_SIZE;

/// Per direction, for the copy loop. SSH sends packets of up to 32 KiB of payload; 64 KiB moves a full one
/// in one read.
pub const BUFFER_SIZE: usize = 64 * 1024;
/// The VM side's keep-alive: idle time before the kernel probes a silent VM, the pause between probes, and the
/// probes left unanswered before the relay ends. A VM that vanished without a reset (destroyed, network gone)
/// would otherwise keep the relay forever; this way it is given up on after 60 s + 6 × 10 s = 2 min. The client
/// side's keep-alive is not ours to set: the socket unit sets it (per-connection mode), or the daemon when it
/// accepts.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;
/// `TCP_USER_TIMEOUT` on a side whose keep-alive is off. Keep-alive only probes an idle connection: a peer that
/// stops acknowledging while data waits for it would hold the relay through 15 minutes of retransmissions, and
/// one that stops reading (its receive window shut, probes still answered) forever. The user timeout ends the
/// connection once sent data or a shut window has gone unacknowledged this long. Each side gets its keep-alive's
/// own budget (idle + interval × probes: 2 min on the VM side, 4 min on the client side with the socket unit's or
/// the daemon's settings), so a peer is given up on after the same time however it failed; this where a side
/// has no keep-alive.
pub const USER_TIMEOUT: Duration = Duration::from_secs(120);

/// Which end of the relay failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Vm,
}

impl Side {
    /// As the summary record's `RELAY_FAILED` field and the metrics' `side` label have it.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Vm => "vm",
        }
    }
}

/// How a relay failed: which end, and what the kernel said. An operator reading "connection timed out"
/// must know whether the user's network or the VM went away.
#[derive(Debug, thiserror::Error)]
#[error("{} failed: {source}", match .side { Side::Client => "the client's connection", Side::Vm => "the VM's connection" })]
pub struct RelayError {
    pub side: Side,
    #[source]
    pub source: io::Error,
}

/// A failure of one direction, before it is known which end that is.
enum Failed {
    /// Reading from the sending end.
    Reading(io::Error),
    /// Writing to (or half-closing) the receiving end.
    Writing(io::Error),
}

impl Failed {
    fn on(self, from: Side, to: Side) -> RelayError {
        match self {
            Failed::Reading(source) => RelayError { side: from, source },
            Failed::Writing(source) => RelayError { side: to, source },
        }
    }
}

/// Bytes that went each way, the pre-relay buffers included.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub to_vm: u64,
    pub to_client: u64,
}

/// Bytes handed to each receiving socket so far, counted as the relay goes: a relay that is dropped (the
/// daemon closing its sessions after `drain_timeout`) has moved bytes all the same, and its summary says how
/// many.
#[derive(Debug, Default)]
pub struct Counters {
    to_vm: AtomicU64,
    to_client: AtomicU64,
}

impl Counters {
    pub fn get(&self) -> Transferred {
        Transferred {
            to_vm: self.to_vm.load(Ordering::Relaxed),
            to_client: self.to_client.load(Ordering::Relaxed),
        }
    }
}

/// Relays until both directions reached EOF, or until either fails. `to_vm` and `to_client` are bytes read
/// before the relay began (the client's and the VM's identification lines) and go first. The counts are kept
/// even when the relay ends in an error: they are the bytes handed to the receiving socket.
pub async fn relay(
    client: &mut TcpStream,
    vm: &mut TcpStream,
    to_vm: &[u8],
    to_client: &[u8],
) -> (Transferred, Result<(), RelayError>) {
    let counters = Counters::default();
    let result = relay_counted(client, vm, to_vm, to_client, &counters).await;
    (counters.get(), result)
}

/// [`relay`], counting into `counters`, which stay readable if this future is dropped before it ends.
pub async fn relay_counted(
    client: &mut TcpStream,
    vm: &mut TcpStream,
    to_vm: &[u8],
    to_client: &[u8],
    counters: &Counters,
) -> Result<(), RelayError> {
    tune(client, None);
    let vm_keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    tune(vm, Some(&vm_keepalive));
    let (client, vm) = (&*client, &*vm);
    tokio::try_join!(
        async {
            one_way(to_vm, client, vm, &counters.to_vm)
                .await
                .map_err(|e| e.on(Side::Client, Side::Vm))
        },
        async {
            one_way(to_client, vm, client, &counters.to_client)
                .await
                .map_err(|e| e.on(Side::Vm, Side::Client))
        },
    )
    .map(|_| ())
}

/// One direction. At EOF it shuts down the writing side (a half-close) and returns, while the other
/// direction goes on.
async fn one_way(
    first: &[u8],
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
) -> Result<(), Failed> {
    write_all(to, first, count).await?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let spliced = splice::pump(from, to, count).await?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let spliced = false;
    if !spliced {
        copy(from, to, count).await?;
    }
    SockRef::from(to)
        .shutdown(Shutdown::Write)
        .map_err(Failed::Writing)
}

/// The portable way: read into a buffer, write it out.
async fn copy(from: &TcpStream, to: &TcpStream, count: &AtomicU64) -> Result<(), Failed> {
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        from.readable().await.map_err(Failed::Reading)?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Failed::Reading(e)),
        };
        if n < QUICK_ACK_BELOW {
            quick_ack(from);
        }
        write_all(to, &buf[..n], count).await?;
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8], count: &AtomicU64) -> Result<(), Failed> {
    while !data.is_empty() {
        to.writable().await.map_err(Failed::Writing)?;
        match to.try_write(data) {
            Ok(0) => return Err(Failed::Writing(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                data = &data[n..];
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Failed::Writing(e)),
        }
    }
    Ok(())
}

/// Quick-ACK is re-armed after reads smaller than this. Handshake packets and keystrokes are far smaller;
/// bulk transfers read more at once, and there the kernel ACKs promptly by itself (at least every second
/// full-sized segment), so re-arming would only cost a system call and an extra ACK per read.
const QUICK_ACK_BELOW: usize = 16 * 1024;

/// ssh and sshd keep Nagle on outside interactive sessions, so each small handshake packet waits for the ACK
/// of the previous one, and a relay in both directions looks interactive to Linux, which then delays its ACKs
/// by up to 40 ms. Quick-ACK mode ends by itself; re-arming it after every small read (one cheap syscall)
/// sends the pending ACK now and makes logins faster than without a proxy.
fn quick_ack(from: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = SockRef::from(from).set_tcp_quickack(true);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = from;
}

/// Interactive keystrokes must not wait for Nagle; dead peers must be noticed: `keepalive` if given, else the
/// socket's own, and [`USER_TIMEOUT`] to match. Failures only cost latency, or leave the kernel's defaults.
fn tune(stream: &TcpStream, keepalive: Option<&TcpKeepalive>) {
    let _ = stream.set_nodelay(true);
    let socket = SockRef::from(stream);
    if let Some(keepalive) = keepalive {
        let _ = socket.set_tcp_keepalive(keepalive);
    }
    let budget = keepalive_budget(&socket).unwrap_or(USER_TIMEOUT);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket.set_tcp_user_timeout(Some(budget));
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = budget;
}

/// How long the socket's keep-alive takes to give up on a silent peer; `None` when it is off.
fn keepalive_budget(socket: &SockRef<'_>) -> Option<Duration> {
    if !socket.keepalive().ok()? {
        return None;
    }
    let idle = socket.tcp_keepalive_time().ok()?;
    let interval = socket.tcp_keepalive_interval().ok()?;
    let probes = socket.tcp_keepalive_retries().ok()?;
    Some(idle + interval * probes)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod splice;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn half_close_one_way_keeps_the_other_way_open() {
        let (mut client, mut client_side) = pair().await;
        let (mut vm_side, mut vm) = pair().await;
        let relay = tokio::spawn(async move {
            relay(&mut client_side, &mut vm_side, b"hello ", b"SSH-2.0-vm\r\n").await
        });

        client.write_all(b"world").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        vm.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");

        // The client has finished sending; the VM's answer must still reach it.
        vm.write_all(b"reply").await.unwrap();
        vm.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"SSH-2.0-vm\r\nreply");

        let (transferred, result) = relay.await.unwrap();
        result.unwrap();
        assert_eq!(
            transferred,
            Transferred {
                to_vm: 11,
                to_client: 17
            }
        );
    }

    /// A reset says which end it came from, whichever direction noticed it.
    #[tokio::test]
    async fn a_failure_names_the_end_that_failed() {
        for failing in [Side::Client, Side::Vm] {
            let (client, mut client_side) = pair().await;
            let (mut vm_side, vm) = pair().await;
            let relay =
                tokio::spawn(async move { relay(&mut client_side, &mut vm_side, b"", b"").await });
            let (gone, _kept) = match failing {
                Side::Client => (client, vm),
                Side::Vm => (vm, client),
            };
            // A linger of zero turns the close into a reset.
            SockRef::from(&gone)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(gone);
            let (_, result) = relay.await.unwrap();
            let error = result.expect_err("a reset ends the relay");
            assert_eq!(error.side, failing);
            assert_eq!(error.source.kind(), io::ErrorKind::ConnectionReset);
        }
    }
}
