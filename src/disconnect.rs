//! Disconnect: our SSH identification line and a DISCONNECT packet, which an unmodified ssh client prints as
//! `Received disconnect from …: <reason>`, so that a user learns why the VM is not there.
//!
//! This only works before any byte of the VM's was relayed: after the VM's identification line the client
//! speaks to the VM, and our packet would be garbage to it.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Sent in place of the VM's identification line (RFC 4253 §4.2).
pub const IDENTIFICATION: &[u8] = b"SSH-2.0-ssh-on-demand\r\n";

const SSH_MSG_DISCONNECT: u8 = 1;
/// RFC 4253 §11.1. OpenSSH prints the description whatever the code; "by application" claims no more than we know.
const SSH_DISCONNECT_BY_APPLICATION: u32 = 11;
/// OpenSSH prints at most 400 characters of the description.
const MAX_DESCRIPTION: usize = 400;
/// How long we wait, after sending the packet, for the client to read it and hang up. Closing while the client's
/// next packet sits unread in our receive queue makes the kernel send an RST, which can destroy our packet
/// before ssh reads it.
pub const LINGER: Duration = Duration::from_secs(2);

/// Tells the client `reason`, then closes our side and waits up to [`LINGER`] for the client to close its own.
pub async fn send(client: &mut TcpStream, reason: &str) -> std::io::Result<()> {
    client.write_all(&message(reason)).await?;
    client.shutdown().await?;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

/// Our identification line followed by an unencrypted binary packet (RFC 4253 §6) carrying
/// `SSH_MSG_DISCONNECT` with `reason` as its one-line description.
pub fn message(reason: &str) -> Vec<u8> {
    let description = one_line(reason);
    let mut payload = vec![SSH_MSG_DISCONNECT];
    payload.extend_from_slice(&SSH_DISCONNECT_BY_APPLICATION.to_be_bytes());
    put_string(&mut payload, description.as_bytes());
    put_string(&mut payload, b""); // language tag
    [IDENTIFICATION, &binary_packet(&payload)].concat()
}

/// An unencrypted binary packet (RFC 4253 §6): no keys are agreed yet, so no MAC. packet_length,
/// padding_length, payload and padding add up to a multiple of 8, with at least 4 bytes of padding.
pub fn binary_packet(payload: &[u8]) -> Vec<u8> {
    let unpadded = 4 + 1 + payload.len();
    let mut padding = 8 - unpadded % 8;
    if padding < 4 {
        padding += 8;
    }
    let packet_length = 1 + payload.len() + padding;
    let mut packet = Vec::with_capacity(4 + packet_length);
    packet.extend_from_slice(&(packet_length as u32).to_be_bytes());
    packet.push(padding as u8);
    packet.extend_from_slice(payload);
    packet.resize(packet.len() + padding, 0);
    packet
}

/// An SSH `string`: a length, then the bytes.
pub fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Control characters become spaces (ssh would print them escaped, and a reason is one line); long reasons are
/// cut where ssh would cut them anyway.
fn one_line(reason: &str) -> String {
    reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_DESCRIPTION)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back the packet after our identification line: (reason code, description).
    fn parse(message: &[u8]) -> (u32, String) {
        let packet = message.strip_prefix(IDENTIFICATION).unwrap();
        let length = u32::from_be_bytes(packet[..4].try_into().unwrap()) as usize;
        assert_eq!(packet.len(), 4 + length, "nothing after the packet");
        assert_eq!(packet.len() % 8, 0, "whole packet is a multiple of 8");
        let padding = packet[4] as usize;
        assert!(padding >= 4);
        let payload = &packet[5..packet.len() - padding];
        assert_eq!(payload[0], SSH_MSG_DISCONNECT);
        let code = u32::from_be_bytes(payload[1..5].try_into().unwrap());
        let len = u32::from_be_bytes(payload[5..9].try_into().unwrap()) as usize;
        let description = String::from_utf8(payload[9..9 + len].to_vec()).unwrap();
        assert_eq!(&payload[9 + len..], &[0, 0, 0, 0], "empty language tag");
        (code, description)
    }

    #[test]
    fn packet_is_well_formed_for_every_length() {
        for n in 0..40 {
            let reason = "x".repeat(n);
            assert_eq!(
                parse(&message(&reason)),
                (SSH_DISCONNECT_BY_APPLICATION, reason)
            );
        }
    }

    #[test]
    fn reason_is_one_bounded_line() {
        let (_, description) = parse(&message("a\r\nb\0c"));
        assert_eq!(description, "a  b c");
        let (_, description) = parse(&message(&"é".repeat(1000)));
        assert_eq!(description.chars().count(), MAX_DESCRIPTION);
    }
}
