use super::*;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

/// A host with one interface, 192.0.2.2/24, besides loopback; the client reached it at 203.0.113.10.
fn host() -> Host {
    Host {
        addresses: vec![
            ip("203.0.113.10"),
            ip("127.0.0.1"),
            ip("::1"),
            ip("192.0.2.2"),
        ],
        broadcasts: vec![ip("192.0.2.255")],
    }
}

/// Every way an answer can write `v4`: as is, IPv4-mapped and IPv4-compatible.
fn forms(v4: &str) -> [String; 3] {
    [v4.to_owned(), format!("::ffff:{v4}"), format!("::{v4}")]
}

const EVERYTHING: &[&str] = &["0.0.0.0/0", "::/0"];

#[test]
fn ordinary_addresses_are_allowed_by_default() {
    for addr in [
        "192.168.0.57",
        "10.1.2.3",
        "100.64.1.1",
        "2001:db8::7",
        "fd00::7",
        "::ffff:10.1.2.3",
    ] {
        assert_eq!(check_on(&host(), ip(addr), &[]), Ok(()), "{addr}");
    }
}

#[test]
fn what_is_never_a_vm_is_refused_whatever_is_listed() {
    let cases = [
        ("0.0.0.0", NotAllowed::Unspecified),
        ("0.1.2.3", NotAllowed::Unspecified),
        ("224.0.0.1", NotAllowed::Multicast),
        ("239.255.255.250", NotAllowed::Multicast),
        ("255.255.255.255", NotAllowed::Broadcast),
        ("192.0.2.255", NotAllowed::Broadcast),
    ];
    let listings = [
        vec![],
        nets(EVERYTHING),
        nets(&["0.0.0.0/8", "224.0.0.0/4", "192.0.2.0/24"]),
    ];
    for (v4, why) in cases {
        for addr in forms(v4) {
            for allowed in &listings {
                assert_eq!(
                    check_on(&host(), ip(&addr), allowed),
                    Err(why),
                    "{addr} with {allowed:?}"
                );
            }
        }
    }
    for (addr, why) in [
        ("::", NotAllowed::Unspecified),
        ("ff02::1", NotAllowed::Multicast),
    ] {
        for allowed in [vec![], nets(EVERYTHING), nets(&["::/128", "ff00::/8"])] {
            assert_eq!(
                check_on(&host(), ip(addr), &allowed),
                Err(why),
                "{addr} with {allowed:?}"
            );
        }
    }
}

#[test]
fn the_host_and_its_neighbourhood_are_refused_by_default_and_by_wide_listings() {
    let cases = [
        ("127.0.0.1", NotAllowed::Loopback),
        ("127.3.4.5", NotAllowed::Loopback),
        ("169.254.1.2", NotAllowed::LinkLocal),
        ("169.254.169.254", NotAllowed::Metadata),
        ("100.100.100.200", NotAllowed::Metadata),
        ("192.0.2.2", NotAllowed::ThisHost),
        ("203.0.113.10", NotAllowed::ThisHost),
    ];
    let wide = [
        vec![],
        nets(EVERYTHING),
        nets(&["100.64.0.0/10", "192.0.2.0/24", "203.0.113.0/24"]),
    ];
    for (v4, why) in cases {
        for addr in forms(v4) {
            for allowed in &wide {
                assert_eq!(
                    check_on(&host(), ip(&addr), allowed),
                    Err(why),
                    "{addr} with {allowed:?}"
                );
            }
        }
    }
    for (addr, why) in [
        ("::1", NotAllowed::Loopback),
        ("fe80::1", NotAllowed::LinkLocal),
        ("fd00:ec2::254", NotAllowed::Metadata),
    ] {
        for allowed in [vec![], nets(EVERYTHING), nets(&["fd00::/8"])] {
            assert_eq!(
                check_on(&host(), ip(addr), &allowed),
                Err(why),
                "{addr} with {allowed:?}"
            );
        }
    }
}

#[test]
fn a_listing_inside_a_class_opens_it() {
    let cases = [
        ("127.0.0.2", "127.0.0.0/8"),
        ("127.0.0.2", "127.0.0.2/32"),
        ("127.0.0.1", "127.0.0.0/8"),
        ("169.254.1.2", "169.254.0.0/16"),
        ("169.254.169.254", "169.254.169.254/32"),
        ("100.100.100.200", "100.100.100.200/32"),
        ("192.0.2.2", "192.0.2.2/32"),
    ];
    for (v4, listed) in cases {
        for addr in forms(v4) {
            assert_eq!(
                check_on(&host(), ip(&addr), &nets(&[listed])),
                Ok(()),
                "{addr} with {listed}"
            );
        }
    }
    for (addr, listed) in [
        ("::1", "::1/128"),
        ("fe80::1", "fe80::/10"),
        ("fd00:ec2::254", "fd00:ec2::254/128"),
    ] {
        assert_eq!(
            check_on(&host(), ip(addr), &nets(&[listed])),
            Ok(()),
            "{addr} with {listed}"
        );
    }
    // Link-local VMs do not open the metadata service in their midst, nor loopback VMs this host's own
    // addresses elsewhere.
    let link_local = nets(&["169.254.0.0/16"]);
    assert_eq!(
        check_on(&host(), ip("169.254.169.254"), &link_local),
        Err(NotAllowed::Metadata)
    );
    let loopback = nets(&["127.0.0.0/8"]);
    assert_eq!(
        check_on(&host(), ip("192.0.2.2"), &loopback),
        Err(NotAllowed::ThisHost)
    );
}

#[test]
fn listed_networks_are_all_that_is_allowed() {
    let allowed = nets(&["10.0.0.0/8", "2001:db8::/32"]);
    for addr in ["10.1.2.3", "::ffff:10.1.2.3", "::10.1.2.3", "2001:db8::7"] {
        assert_eq!(check_on(&host(), ip(addr), &allowed), Ok(()), "{addr}");
    }
    for addr in ["192.168.0.57", "::ffff:192.168.0.57", "2001:db9::7"] {
        assert_eq!(
            check_on(&host(), ip(addr), &allowed),
            Err(NotAllowed::OutsideNetworks),
            "{addr}"
        );
    }
    assert_eq!(
        check_on(&host(), ip("127.0.0.1"), &allowed),
        Err(NotAllowed::Loopback)
    );
}

#[test]
fn ipv4_in_ipv6_is_judged_as_the_ipv4_address() {
    assert_eq!(unmapped(ip("::ffff:0.0.0.0")), ip("0.0.0.0"));
    assert_eq!(unmapped(ip("::ffff:127.0.0.1")), ip("127.0.0.1"));
    assert_eq!(unmapped(ip("::127.0.0.1")), ip("127.0.0.1"));
    assert_eq!(unmapped(ip("::")), ip("::"));
    assert_eq!(unmapped(ip("::1")), ip("::1"));
    assert_eq!(unmapped(ip("2001:db8::7")), ip("2001:db8::7"));
}

#[test]
fn this_host_as_it_is_now() {
    // The connection's local address counts even when the interfaces say nothing of it, in either form.
    let host = Host::now(ip("::ffff:203.0.113.10"));
    assert!(host.addresses.contains(&ip("203.0.113.10")));
    assert!(host.addresses.contains(&ip("127.0.0.1")), "{host:?}");
    let listening = [SocketAddr::new(ip("::"), 22)];
    assert_eq!(
        check(
            sock("203.0.113.10:2222"),
            &[],
            ip("203.0.113.10"),
            &listening
        ),
        Err(NotAllowed::ThisHost)
    );
    assert_eq!(
        check(
            sock("[::ffff:0.0.0.0]:2222"),
            &nets(EVERYTHING),
            ip("203.0.113.10"),
            &listening
        ),
        Err(NotAllowed::Unspecified)
    );
    // The proxy's own port is refused first: listing the address in vm_networks would not help.
    for allowed in [vec![], nets(&["127.0.0.0/8"])] {
        assert_eq!(
            check(
                sock("127.0.0.1:22"),
                &allowed,
                ip("203.0.113.10"),
                &listening
            ),
            Err(NotAllowed::OwnListener(22))
        );
    }
}

fn sock(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A listener on every address (`ListenStream=22`, and what a per-connection process must assume) takes its
/// port on each of the host's addresses, loopback included, however written; other ports, and other hosts,
/// are not the proxy.
#[test]
fn a_listener_on_every_address_is_this_port_on_every_address_of_the_host() {
    for listening in [sock("[::]:22"), sock("0.0.0.0:22")] {
        for target in [
            "127.0.0.1:22",
            "127.3.4.5:22",
            "[::1]:22",
            "203.0.113.10:22",
            "[::ffff:192.0.2.2]:22",
        ] {
            assert!(
                own_listener(&host(), sock(target), &[listening]),
                "{target} on {listening}"
            );
        }
        for target in ["127.0.0.1:2222", "192.0.2.7:22", "[2001:db8::7]:22"] {
            assert!(
                !own_listener(&host(), sock(target), &[listening]),
                "{target} on {listening}"
            );
        }
    }
}

/// A listener on one address (the daemon knows its own) is that address and port only.
#[test]
fn a_listener_on_one_address_is_that_address_only() {
    let listening = [sock("127.0.0.5:2222"), sock("[::ffff:203.0.113.10]:22")];
    for target in [
        "127.0.0.5:2222",
        "[::ffff:127.0.0.5]:2222",
        "203.0.113.10:22",
    ] {
        assert!(own_listener(&host(), sock(target), &listening), "{target}");
    }
    for target in ["127.0.0.1:2222", "127.0.0.5:22", "192.0.2.2:22"] {
        assert!(!own_listener(&host(), sock(target), &listening), "{target}");
    }
}
