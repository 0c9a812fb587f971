//! The DISCONNECT message a refused user reads: for any reason, `wire::message` writes what the strict decoder
//! `wire::parse_disconnect` (RFC 4253 §4.2, §6, §11.1) accepts, carrying the reason as one bounded line; and
//! the decoder takes any bytes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssh_on_demand::wire::{IDENTIFICATION, message, parse_disconnect};

/// OpenSSH prints at most this many characters of the description.
const MAX_DESCRIPTION: usize = 400;

fuzz_target!(|data: &[u8]| {
    let _ = parse_disconnect(data);

    let reason = String::from_utf8_lossy(data);
    let bytes = message(&reason);
    let decoded = parse_disconnect(&bytes)
        .unwrap_or_else(|e| panic!("our own message does not decode: {e}: {bytes:?}"));
    assert_eq!(decoded.identification, IDENTIFICATION.strip_suffix(b"\r\n").unwrap());
    assert_eq!(decoded.code, 11, "SSH_DISCONNECT_BY_APPLICATION");
    assert_eq!(decoded.language, "");
    // One line, no control character, at most what ssh prints, and otherwise the reason itself.
    assert!(!decoded.description.chars().any(char::is_control));
    assert!(decoded.description.chars().count() <= MAX_DESCRIPTION);
    let expected: String = reason
        .chars()
        .take(MAX_DESCRIPTION)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    assert_eq!(decoded.description, expected);
});
