//! Relay: bytes both ways until both directions are finished, passing each half-close on.

use std::{io, time::Duration};

use socket2::{SockRef, TcpKeepalive};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

/// Per direction. SSH sends packets of up to 32 KiB of payload; 64 KiB moves a full one in one read.
pub const BUFFER_SIZE: usize = 64 * 1024;
/// Idle time before the kernel probes a silent peer, and the pause between probes. A VM that vanished
/// without a reset (destroyed, network gone) would otherwise keep this process alive forever.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Bytes that went each way, the pre-relay buffers included.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub to_vm: u64,
    pub to_client: u64,
}

/// Relays until both directions reached EOF, or until either fails. `to_vm` and `to_client` are bytes read
/// before the relay began (the client's and the VM's identification lines) and go first. The counts are kept
/// even when the relay ends in an error.
pub async fn relay(
    client: &mut TcpStream,
    vm: &mut TcpStream,
    to_vm: &[u8],
    to_client: &[u8],
) -> (Transferred, io::Result<()>) {
    tune(client);
    tune(vm);
    let mut transferred = Transferred::default();
    let (client_read, client_write) = client.split();
    let (vm_read, vm_write) = vm.split();
    let result = tokio::try_join!(
        pipe(to_vm, client_read, vm_write, &mut transferred.to_vm),
        pipe(to_client, vm_read, client_write, &mut transferred.to_client),
    );
    (transferred, result.map(|_| ()))
}

/// One direction. At EOF it shuts down the writing side (a half-close) and returns, while the other
/// direction goes on.
async fn pipe(
    first: &[u8],
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    count: &mut u64,
) -> io::Result<()> {
    to.write_all(first).await?;
    *count += first.len() as u64;
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        // ssh and sshd keep Nagle on outside interactive sessions, so each small handshake packet waits for
        // the ACK of the previous one, and a relay in both directions looks interactive to Linux, which then
        // delays its ACKs by up to 40 ms. Quick-ACK mode ends by itself; re-arming it after every read (one
        // cheap syscall) sends the pending ACK now and makes logins faster than without a proxy.
        let _ = SockRef::from(from.as_ref()).set_tcp_quickack(true);
        to.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
    to.shutdown().await
}

/// Interactive keystrokes must not wait for Nagle; dead peers must be noticed. Failures only cost latency.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

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
}
