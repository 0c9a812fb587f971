//! Readiness: waits until the VM's sshd sends its identification line, and keeps the connection that saw it.
//!
//! A TCP accept proves nothing: QEMU user networking and Docker-style port forwards accept on the host before
//! the guest listens, then close or reset. Only the `SSH-` line means sshd is there. That connection is the
//! one relayed (its bytes included), so sshd sees one connection per login, not a probe and then a login.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::AsyncReadExt,
    net::TcpStream,
    time::{Instant, timeout_at},
};
use tracing::debug;

use crate::retry::Backoff;

/// First pause between attempts: a VM that is almost up should cost tens of milliseconds, not seconds. It
/// doubles (with jitter) up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(20);
const MAX_RETRY_DELAY: Duration = Duration::from_millis(500);
/// sshd may send other lines before its identification (RFC 4253 §4.2); past this it is not sshd.
const MAX_BEFORE_IDENTIFICATION: usize = 16 * 1024;

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

/// Connects to `addr` again and again until sshd identifies itself or `deadline` passes. `waited` is the
/// overall budget the deadline came from, for the message.
pub async fn wait_for_sshd(
    addr: SocketAddr,
    deadline: Instant,
    waited: Duration,
    timeouts: Timeouts,
) -> Result<Ready, NotReady> {
    let mut backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let last = match attempt(addr, deadline, timeouts).await {
            Ok((stream, received)) => {
                return Ok(Ready {
                    stream,
                    received,
                    attempts,
                });
            }
            Err(last) => last,
        };
        debug!(attempt = attempts, error = %last, "VM not ready yet");
        if !backoff.pause(deadline).await {
            return Err(NotReady { addr, waited, last });
        }
    }
}

/// One connection: TCP connect, then read until a complete line starting with `SSH-`.
async fn attempt(
    addr: SocketAddr,
    deadline: Instant,
    timeouts: Timeouts,
) -> Result<(TcpStream, Vec<u8>), String> {
    let connect_by = deadline.min(Instant::now() + timeouts.connect);
    let mut stream = timeout_at(connect_by, TcpStream::connect(addr))
        .await
        .map_err(|_| "no TCP answer".to_owned())?
        .map_err(|e| e.to_string())?;

    let banner_by = deadline.min(Instant::now() + timeouts.banner);
    let mut received = Vec::with_capacity(256);
    loop {
        let n = timeout_at(banner_by, stream.read_buf(&mut received))
            .await
            .map_err(|_| "TCP connected, but no SSH identification came".to_owned())?
            .map_err(|e| format!("TCP connected, then {e}"))?;
        if n == 0 {
            return Err("TCP connected, then closed before any SSH identification".to_owned());
        }
        if has_identification(&received) {
            return Ok((stream, received));
        }
        if received.len() > MAX_BEFORE_IDENTIFICATION {
            return Err("TCP connected, but what came back is not SSH".to_owned());
        }
    }
}

/// A complete line (ended by LF) that starts with `SSH-`.
fn has_identification(received: &[u8]) -> bool {
    let Some(end) = received.iter().rposition(|&b| b == b'\n') else {
        return false;
    };
    received[..end]
        .split(|&b| b == b'\n')
        .any(|line| line.starts_with(b"SSH-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identification_needs_a_whole_ssh_line() {
        assert!(has_identification(b"SSH-2.0-OpenSSH_9.2\r\n"));
        assert!(has_identification(b"booting\r\nSSH-2.0-x\r\n\0\0\0\x14"));
        assert!(!has_identification(b"SSH-2.0-OpenSS"));
        assert!(!has_identification(b"HTTP/1.1 400 Bad Request\r\n"));
        assert!(!has_identification(b""));
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
