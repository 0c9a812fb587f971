//! The start API's answer: whatever the API sends, `parse_answer` returns a usable address or one line the
//! user can read, and never panics.
//!
//! Input: the first byte picks the Content-Type and the default port, the rest is the body.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use ssh_on_demand::vm::api::parse_answer;

const CONTENT_TYPES: [&str; 6] = [
    "",
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "text/plain; charset=utf-8",
    "text/html",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    let default_port = if selector >= 128 { 2222 } else { 22 };
    match parse_answer(content_type, body, default_port) {
        Ok(addr) => {
            let ip = addr.ip();
            assert!(!ip.is_unspecified() && !ip.is_multicast(), "{addr}");
            assert_ne!(ip, IpAddr::from([255, 255, 255, 255]));
            assert_ne!(addr.port(), 0);
            // The address, written back as either form of answer, reads as the same address.
            let text = addr.to_string();
            assert_eq!(
                parse_answer("text/plain", text.as_bytes(), default_port),
                Ok(addr),
                "{text}"
            );
            let json = format!(r#"{{"vm_ip": "{}", "port": {}}}"#, ip, addr.port());
            assert_eq!(
                parse_answer("application/json", json.as_bytes(), default_port),
                Ok(addr),
                "{json}"
            );
        }
        Err(why) => {
            // The user reads it in a DISCONNECT, whose description ssh cuts at 400 characters, after "VM failed
            // to start: the start API's answer is unusable: " (56): all of it fits. The operator reads it in one
            // journal line.
            assert!(!why.is_empty());
            assert!(
                why.chars().count() <= 400 - 56,
                "{} chars: {why}",
                why.chars().count()
            );
            assert!(!why.contains(|c: char| c.is_control()), "{why:?}");
        }
    }
});
