//! The identification checks: the client's first bytes (`wire::client_identification`) and the VM's lines
//! until its `SSH-` line (`wire::has_identification`), against plain reference implementations, and as bytes
//! arrive in pieces, the way the proxy reads them.
//!
//! Input: the first byte says where to cut the rest into two reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssh_on_demand::wire::{client_identification, has_identification};

/// RFC 4253 §4.2 and §5.1: a client's first bytes are `SSH-2.0-`; after eight bytes the answer is known.
fn client_reference(bytes: &[u8]) -> Option<bool> {
    let ssh = b"SSH-2.0-";
    if bytes.len() >= 8 {
        Some(bytes.starts_with(ssh))
    } else if ssh.starts_with(bytes) {
        None
    } else {
        Some(false)
    }
}

/// A complete line (LF-terminated) that starts with `SSH-`.
fn server_reference(bytes: &[u8]) -> bool {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            if bytes[start..i].starts_with(b"SSH-") {
                return true;
            }
            start = i + 1;
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(bytes.len());

    let client = client_identification(bytes);
    assert_eq!(client, client_reference(bytes), "{bytes:?}");
    // Once decided, more bytes never change the decision.
    if let Some(decided) = client_identification(&bytes[..cut]) {
        assert_eq!(client, Some(decided));
    }

    let server = has_identification(bytes);
    assert_eq!(server, server_reference(bytes), "{bytes:?}");
    // Found in the first read means found after the second: the proxy stops reading at the first yes.
    if has_identification(&bytes[..cut]) {
        assert!(server);
    }
});
