//! Targets: where the start API's answers may send connections. A compromised or mistaken API must not turn
//! port 22 of this host into a way into the host itself, its loopback services or the cloud's metadata
//! service, so those are refused unless the operator lists them in `vm_networks`.

use std::net::IpAddr;

use ipnet::IpNet;

/// Why an address is not one the VMs may have. The text follows "the start API answered 169.254.169.254,
/// which is …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAllowed {
    #[error("outside vm_networks")]
    OutsideNetworks,
    #[error("a loopback address")]
    Loopback,
    #[error("link-local (cloud metadata services answer there)")]
    LinkLocal,
    #[error("an address of this host")]
    ThisHost,
}

/// Whether a connection to `addr` may be made: inside `allowed` if the operator listed networks, else
/// anywhere but loopback, link-local and this host's own addresses (`local`, the address the client
/// reached, is one of them; the others come from the host's interfaces).
pub fn check(addr: IpAddr, allowed: &[IpNet], local: IpAddr) -> Result<(), NotAllowed> {
    let addr = addr.to_canonical();
    if !allowed.is_empty() {
        return if allowed.iter().any(|net| net.contains(&addr)) {
            Ok(())
        } else {
            Err(NotAllowed::OutsideNetworks)
        };
    }
    if addr.is_loopback() {
        return Err(NotAllowed::Loopback);
    }
    let link_local = match addr {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if link_local {
        return Err(NotAllowed::LinkLocal);
    }
    if addr == local.to_canonical() || host_addresses().contains(&addr) {
        return Err(NotAllowed::ThisHost);
    }
    Ok(())
}

/// The addresses of this host's interfaces; none if they cannot be read (the connection's own local
/// address is still checked).
fn host_addresses() -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .map(|interfaces| interfaces.iter().map(|i| i.ip().to_canonical()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn by_default_the_host_and_its_neighbourhood_are_refused() {
        let local = ip("203.0.113.10");
        assert_eq!(check(ip("192.168.0.57"), &[], local), Ok(()));
        assert_eq!(check(ip("2001:db8::7"), &[], local), Ok(()));
        assert_eq!(
            check(ip("127.0.0.1"), &[], local),
            Err(NotAllowed::Loopback)
        );
        assert_eq!(check(ip("::1"), &[], local), Err(NotAllowed::Loopback));
        assert_eq!(
            check(ip("::ffff:127.0.0.1"), &[], local),
            Err(NotAllowed::Loopback)
        );
        assert_eq!(
            check(ip("169.254.169.254"), &[], local),
            Err(NotAllowed::LinkLocal)
        );
        assert_eq!(check(ip("fe80::1"), &[], local), Err(NotAllowed::LinkLocal));
        assert_eq!(check(local, &[], local), Err(NotAllowed::ThisHost));
    }

    #[test]
    fn listed_networks_are_all_that_is_allowed() {
        let allowed: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ];
        let local = ip("203.0.113.10");
        assert_eq!(check(ip("10.1.2.3"), &allowed, local), Ok(()));
        assert_eq!(
            check(ip("127.0.0.2"), &allowed, local),
            Ok(()),
            "listed, so allowed"
        );
        assert_eq!(
            check(ip("192.168.0.57"), &allowed, local),
            Err(NotAllowed::OutsideNetworks)
        );
        assert_eq!(
            check(ip("169.254.169.254"), &allowed, local),
            Err(NotAllowed::OutsideNetworks)
        );
    }
}
