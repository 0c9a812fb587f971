//! Choosing the VM's address among the interfaces a platform reports (guest agent, DHCP lease, ARP).

use std::net::IpAddr;

/// One guest interface and its addresses, as a platform reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub addrs: Vec<IpAddr>,
}

/// The address the proxy should connect to: the first IPv4 address, else the first IPv6 one, of any
/// interface but the guest's own loopback (`lo`), leaving out link-local and unspecified addresses, which
/// are no use from the host.
pub fn pick(interfaces: &[Interface]) -> Option<IpAddr> {
    let usable = || {
        interfaces
            .iter()
            .filter(|i| i.name != "lo")
            .flat_map(|i| i.addrs.iter().copied())
            .filter(|a| !a.is_unspecified() && !is_link_local(a))
    };
    usable()
        .find(IpAddr::is_ipv4)
        .or_else(|| usable().find(IpAddr::is_ipv6))
}

fn is_link_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, addrs: &[&str]) -> Interface {
        Interface {
            name: name.into(),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn ipv4_of_a_real_interface_first() {
        let ifaces = [
            iface("lo", &["127.0.0.1", "::1"]),
            iface("eth0", &["fe80::1", "2001:db8::7", "192.0.2.10"]),
        ];
        assert_eq!(pick(&ifaces), Some("192.0.2.10".parse().unwrap()));
    }

    #[test]
    fn ipv6_when_there_is_no_ipv4_and_nothing_from_lo_or_link_local() {
        let ifaces = [
            iface("lo", &["127.0.0.1"]),
            iface("eth0", &["169.254.1.1", "fe80::1", "2001:db8::7"]),
        ];
        assert_eq!(pick(&ifaces), Some("2001:db8::7".parse().unwrap()));
        assert_eq!(pick(&[iface("lo", &["127.0.0.1"])]), None);
        assert_eq!(pick(&[]), None);
    }
}
