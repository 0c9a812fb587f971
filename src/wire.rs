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
pub async fn send_disconnect(client: &mut TcpStream, reason: &str) -> std::io::Result<()> {
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

/// The longest identification line a peer may send (RFC 4253 §4.2: 255 bytes, CR LF included).
pub const MAX_IDENTIFICATION_LINE: usize = 255;

/// What a client's first bytes say: `Some(true)` once they start with `SSH-2.0-` (every SSH client opens with
/// its identification, RFC 4253 §4.2), `Some(false)` as soon as they cannot, `None` while too few have arrived
/// to tell. A port scanner or an HTTP request is told apart from the first byte that differs.
///
/// Only protocol 2.0 starts a VM: no VM's sshd speaks SSH-1 (`SSH-1.5-`), and `SSH-1.99-` is what a server
/// that also speaks SSH-1 says of itself (RFC 4253 §5.1), never what a client sends.
pub fn client_identification(early: &[u8]) -> Option<bool> {
    const SSH: &[u8] = b"SSH-2.0-";
    let seen = &early[..early.len().min(SSH.len())];
    if !SSH.starts_with(seen) {
        Some(false)
    } else if seen.len() == SSH.len() {
        Some(true)
    } else {
        None
    }
}

/// `received`, what a server sent so far, holds a complete line (ended by LF) that starts with `SSH-`: its
/// identification. Lines before it are allowed (RFC 4253 §4.2); an unfinished last line does not count.
pub fn has_identification(received: &[u8]) -> bool {
    let Some(end) = received.iter().rposition(|&b| b == b'\n') else {
        return false;
    };
    received[..end]
        .split(|&b| b == b'\n')
        .any(|line| line.starts_with(b"SSH-"))
}

/// A DISCONNECT message as a client reads it, decoded by [`parse_disconnect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// The identification line, without its line end.
    pub identification: Vec<u8>,
    pub code: u32,
    pub description: String,
    pub language: String,
}

/// Decodes what [`message`] writes, strictly: one identification line ended by CR LF, then exactly one
/// well-formed unencrypted binary packet carrying `SSH_MSG_DISCONNECT` with UTF-8 strings, and nothing after
/// it. Says what is wrong otherwise. For tests and fuzzing: it checks the encoder against RFC 4253.
pub fn parse_disconnect(bytes: &[u8]) -> Result<Disconnect, &'static str> {
    let line_end = bytes
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or("no CR LF ends the identification line")?;
    let identification = &bytes[..line_end];
    if !identification.starts_with(b"SSH-2.0-") {
        return Err("the identification line does not start with SSH-2.0-");
    }
    if line_end + 2 > MAX_IDENTIFICATION_LINE {
        return Err("the identification line is longer than 255 bytes");
    }
    if identification
        .iter()
        .any(|&b| b == b'\0' || b == b'\r' || b == b'\n')
    {
        return Err("the identification line holds NUL, CR or LF");
    }
    let packet = &bytes[line_end + 2..];
    let (length, rest) = take_u32(packet).ok_or("no packet length")?;
    let length = length as usize;
    if rest.len() != length {
        return Err("the packet length does not match the bytes that follow");
    }
    if (4 + length) % 8 != 0 {
        return Err("the packet is not a multiple of 8 bytes");
    }
    // RFC 4253 §6.1: implementations must take packets of 35000 bytes; ours are far smaller.
    if length > 35_000 {
        return Err("the packet is longer than 35000 bytes");
    }
    let (&padding, rest) = rest.split_first().ok_or("no padding length")?;
    let padding = padding as usize;
    if padding < 4 {
        return Err("less than 4 bytes of padding");
    }
    let payload_len = rest
        .len()
        .checked_sub(padding)
        .ok_or("the padding is longer than the packet")?;
    let payload = &rest[..payload_len];
    let (&number, payload) = payload.split_first().ok_or("an empty payload")?;
    if number != SSH_MSG_DISCONNECT {
        return Err("the message is not SSH_MSG_DISCONNECT");
    }
    let (code, payload) = take_u32(payload).ok_or("no reason code")?;
    let (description, payload) = take_string(payload).ok_or("no description")?;
    let (language, payload) = take_string(payload).ok_or("no language tag")?;
    if !payload.is_empty() {
        return Err("bytes after the language tag");
    }
    Ok(Disconnect {
        identification: identification.to_vec(),
        code,
        description: String::from_utf8(description.to_vec())
            .map_err(|_| "the description is not UTF-8")?,
        language: String::from_utf8(language.to_vec())
            .map_err(|_| "the language tag is not UTF-8")?,
    })
}

fn take_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*head), rest))
}

fn take_string(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (length, rest) = take_u32(bytes)?;
    let length = usize::try_from(length).ok()?;
    (length <= rest.len()).then(|| rest.split_at(length))
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

    /// Reads back our message: (reason code, description).
    fn parse(message: &[u8]) -> (u32, String) {
        let decoded = parse_disconnect(message).unwrap();
        assert_eq!(
            decoded.identification,
            IDENTIFICATION.strip_suffix(b"\r\n").unwrap()
        );
        assert_eq!(decoded.language, "", "empty language tag");
        (decoded.code, decoded.description)
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

    #[test]
    fn client_identification_is_told_from_the_first_differing_byte() {
        assert_eq!(client_identification(b""), None);
        assert_eq!(client_identification(b"SS"), None);
        assert_eq!(client_identification(b"SSH-"), None);
        assert_eq!(client_identification(b"SSH-2.0"), None);
        assert_eq!(client_identification(b"SSH-2.0-"), Some(true));
        assert_eq!(
            client_identification(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Some(true)
        );
        assert_eq!(client_identification(b"SSH-1.5-x\r\n"), Some(false));
        assert_eq!(client_identification(b"SSH-1"), Some(false));
        assert_eq!(client_identification(b"SSH-1.99-x\r\n"), Some(false));
        assert_eq!(client_identification(b"SSH-2.00-x"), Some(false));
        assert_eq!(client_identification(b"G"), Some(false));
        assert_eq!(client_identification(b"SSH2"), Some(false));
        assert_eq!(client_identification(b"\x16\x03\x01"), Some(false));
    }

    #[test]
    fn identification_needs_a_whole_ssh_line() {
        assert!(has_identification(b"SSH-2.0-OpenSSH_9.2\r\n"));
        assert!(has_identification(b"booting\r\nSSH-2.0-x\r\n\0\0\0\x14"));
        assert!(!has_identification(b"SSH-2.0-OpenSS"));
        assert!(!has_identification(b"HTTP/1.1 400 Bad Request\r\n"));
        assert!(!has_identification(b""));
    }

    #[test]
    fn decoder_says_what_is_wrong() {
        let good = message("why");
        assert!(parse_disconnect(&good).is_ok());
        assert_eq!(
            parse_disconnect(b""),
            Err("no CR LF ends the identification line")
        );
        assert_eq!(
            parse_disconnect(&good[..good.len() - 1]),
            Err("the packet length does not match the bytes that follow")
        );
        let mut longer = good.clone();
        longer.push(0);
        assert!(parse_disconnect(&longer).is_err());
        let mut other = good.clone();
        other[IDENTIFICATION.len() + 5] = 2; // SSH_MSG_IGNORE
        assert_eq!(
            parse_disconnect(&other),
            Err("the message is not SSH_MSG_DISCONNECT")
        );
    }
}
