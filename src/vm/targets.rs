//! Targets: where the start API's answers may send connections. This is the one place that decides it, for
//! the API's answers and for the addresses connections remember from earlier answers alike.
//!
//! A compromised or mistaken API must not turn port 22 of this host into a way into the host itself, its
//! loopback services or the cloud's metadata service. Some addresses are never a VM's, whatever the operator
//! lists: unspecified (Linux connects `0.0.0.0` and `::` to this host), multicast and broadcast. Others are
//! refused unless the operator lists a network inside them in `vm_networks`: loopback, link-local, the cloud
//! metadata services and this host's own addresses. A wide listing such as `0.0.0.0/0` opens none of those.
//! An IPv6 answer that carries an IPv4 address (`::ffff:a.b.c.d`, or the deprecated `::a.b.c.d`) is judged
//! as that IPv4 address, which is where Linux connects the mapped form.
//!
//! Nor may an answer point at one of the proxy's own listening sockets, whatever `vm_networks` says: the proxy
//! would relay the connection to itself, and the user would wait out the whole boot deadline.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why an address is not one the VMs may have. The text follows "the start API answered 169.254.169.254, "
/// and says whether the operator can allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotAllowed {
    #[error("which is unspecified (0.0.0.0/8 or ::), never a VM's address")]
    Unspecified,
    #[error("which is multicast, never a VM's address")]
    Multicast,
    #[error("which is a broadcast address, never a VM's address")]
    Broadcast,
    #[error("which is a loopback address; the operator can allow it in vm_networks")]
    Loopback,
    #[error("which is link-local; the operator can allow it in vm_networks")]
    LinkLocal,
    #[error("which is a cloud metadata service; the operator can allow it in vm_networks")]
    Metadata,
    #[error("which is an address of this host; the operator can allow it in vm_networks")]
    ThisHost,
    #[error("which is outside vm_networks")]
    OutsideNetworks,
    #[error(
        "whose port {0} is where ssh-on-demand itself listens on this host: it would relay the connection to \
         itself; the start API must name the VM's own address and port"
    )]
    OwnListener(u16),
}

/// The cloud metadata services that sit outside link-local: Alibaba Cloud's (100.100.100.200, in the shared
/// address space 100.64.0.0/10 where VMs may well live) and AWS's IPv6 one (fd00:ec2::254, in the unique
/// local space). AWS, Azure, GCP, Oracle and OpenStack answer on 169.254.169.254, which is listed too so that
/// its refusal names it.
const METADATA: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// What this host knows of itself: its addresses (the connection's local address among them) and its
/// interfaces' broadcast addresses.
#[derive(Debug, Default)]
pub struct Host {
    pub addresses: Vec<IpAddr>,
    pub broadcasts: Vec<IpAddr>,
}

impl Host {
    /// This host's interfaces, read now, and `local`, the address the client reached. Without the interfaces
    /// (they cannot be read) `local` is still known.
    pub fn now(local: IpAddr) -> Host {
        let mut host = Host {
            addresses: vec![unmapped(local)],
            broadcasts: Vec::new(),
        };
        for interface in if_addrs::get_if_addrs().unwrap_or_default() {
            host.addresses.push(unmapped(interface.ip()));
            if let if_addrs::IfAddr::V4(v4) = &interface.addr
                && let Some(broadcast) = v4.broadcast
            {
                host.broadcasts.push(IpAddr::V4(broadcast));
            }
        }
        host
    }
}

/// Whether a connection to `target` may be made, on this host as it is now; `local` is the address the
/// client reached, `listening` the proxy's own listening sockets (see [`own_listener`]).
pub fn check(
    target: SocketAddr,
    allowed: &[IpNet],
    local: IpAddr,
    listening: &[SocketAddr],
) -> Result<(), NotAllowed> {
    let host = Host::now(local);
    // First: allowing the address in vm_networks, as another refusal would suggest, cannot mend this one.
    if own_listener(&host, target, listening) {
        return Err(NotAllowed::OwnListener(target.port()));
    }
    check_on(&host, target.ip(), allowed)
}

/// Whether `target` reaches one of `listening`, the proxy's own listening sockets on `host`. A listener on
/// an unspecified address (`0.0.0.0`, `::`) takes its port on every address of the host, loopback included;
/// `::` is taken to take IPv4 too, as systemd's `ListenStream=22` does.
pub fn own_listener(host: &Host, target: SocketAddr, listening: &[SocketAddr]) -> bool {
    let ip = unmapped(target.ip());
    let this_host = ip.is_loopback() || host.addresses.contains(&ip);
    listening.iter().any(|listener| {
        let on = unmapped(listener.ip());
        listener.port() == target.port() && (on == ip || (on.is_unspecified() && this_host))
    })
}

/// Whether a connection to `addr` may be made from `host`: never to an address no VM has; to one of the
/// classes in [`sensitive`] only if a listed network lies inside that class (it is what the operator
/// meant, not a side effect of `0.0.0.0/0`); to anything else if `allowed` is empty or holds it.
pub fn check_on(host: &Host, addr: IpAddr, allowed: &[IpNet]) -> Result<(), NotAllowed> {
    let addr = unmapped(addr);
    if let Some(never) = never_a_vm(host, addr) {
        return Err(never);
    }
    let mut listed = allowed.iter().filter(|net| net.contains(&addr));
    match sensitive(host, addr) {
        Some((_, class)) if listed.any(|net| class.iter().any(|c| c.contains(net))) => Ok(()),
        Some((why, _)) => Err(why),
        None if allowed.is_empty() || listed.next().is_some() => Ok(()),
        None => Err(NotAllowed::OutsideNetworks),
    }
}

/// The IPv4 address an IPv6 one carries, mapped (`::ffff:a.b.c.d`) or compatible (`::a.b.c.d`, deprecated
/// by RFC 4291 but still parsed), else the address itself. `::` and `::1` are IPv6's own.
pub fn unmapped(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) if !v6.is_unspecified() && !v6.is_loopback() => {
            v6.to_ipv4().map_or(addr, IpAddr::V4)
        }
        _ => addr,
    }
}

/// Addresses that are never a VM's, whatever the operator lists.
fn never_a_vm(host: &Host, addr: IpAddr) -> Option<NotAllowed> {
    let (unspecified, multicast, broadcast) = match addr {
        // 0.0.0.0/8 is "this network" (RFC 1122 §3.2.1.3), a source only; Linux connects 0.0.0.0 locally.
        IpAddr::V4(v4) => (
            v4.octets()[0] == 0,
            v4.is_multicast(),
            v4.is_broadcast() || host.broadcasts.contains(&addr),
        ),
        IpAddr::V6(v6) => (v6.is_unspecified(), v6.is_multicast(), false),
    };
    if unspecified {
        Some(NotAllowed::Unspecified)
    } else if multicast {
        Some(NotAllowed::Multicast)
    } else if broadcast {
        Some(NotAllowed::Broadcast)
    } else {
        None
    }
}

/// The class of addresses `addr` belongs to that only a listing inside it opens, with that class as
/// networks. The most specific class first: 169.254.169.254 is link-local too, 127.0.0.1 an address of this
/// host too.
fn sensitive(host: &Host, addr: IpAddr) -> Option<(NotAllowed, Vec<IpNet>)> {
    if METADATA.contains(&addr) {
        return Some((NotAllowed::Metadata, vec![IpNet::from(addr)]));
    }
    if LOOPBACK.iter().any(|net| net.contains(&addr)) {
        return Some((NotAllowed::Loopback, LOOPBACK.to_vec()));
    }
    if LINK_LOCAL.iter().any(|net| net.contains(&addr)) {
        return Some((NotAllowed::LinkLocal, LINK_LOCAL.to_vec()));
    }
    if host.addresses.contains(&addr) {
        return Some((NotAllowed::ThisHost, vec![IpNet::from(addr)]));
    }
    None
}

const LOOPBACK: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
];

const LINK_LOCAL: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16)),
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
    )),
];

#[cfg(test)]
mod tests;
