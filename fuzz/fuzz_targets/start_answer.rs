//! The start API's answer: whatever the API sends, `parse_answer` returns a usable address or one line the
//! user can read, and never panics; and `targets` refuses an address that reaches this host or no VM, in any
//! form, even with every network listed.
//!
//! Input: the first byte picks the Content-Type and the default port, the rest is the body.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use ssh_on_demand::vm::{
    api::parse_answer,
    targets::{Host, check_on},
};

const CONTENT_TYPES: [&str; 6] = [
    "",
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "text/plain; charset=utf-8",
    "text/html",
];

/// Where Linux connects `ip`: the IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`) or IPv4-compatible
/// (`::a.b.c.d`, but not `::` or `::1`) IPv6 address, else `ip` itself. Written from RFC 4291 §2.5.5.
fn reference_target(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    let s = v6.segments();
    let mapped = s[..5] == [0; 5] && s[5] == 0xffff;
    let compatible = s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1);
    if mapped || compatible {
        let [.., a, b, c, d] = v6.octets();
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        ip
    }
}

/// Never a VM, or this host's loopback, whatever the operator lists.
fn reference_refused_under_any_listing(ip: IpAddr) -> bool {
    match reference_target(ip) {
        IpAddr::V4(v4) => {
            v4.octets()[0] == 0 || v4.is_multicast() || v4.is_broadcast() || v4.is_loopback()
        }
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast() || v6.is_loopback(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    let default_port = if selector >= 128 { 2222 } else { 22 };
    match parse_answer(content_type, body, default_port) {
        Ok(addr) => {
            let ip = addr.ip();
            assert_ne!(addr.port(), 0);
            let everything = ["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
            if reference_refused_under_any_listing(ip) {
                assert!(check_on(&Host::default(), ip, &everything).is_err(), "{addr} allowed");
            }
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
