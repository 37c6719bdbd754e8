//! rtnetlink through netlink-packet-route: which interface the kernel's route to an address
//! leaves through (RTM_GETROUTE, so policy rules and every table count), the node's links and
//! addresses, and a subscription to link, address and route events.

use std::{
    collections::BTreeSet,
    io,
    net::IpAddr,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{
        InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage, LinkXdp,
        XdpAttached,
    },
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Where the kernel sends packets for one destination address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteHit {
    /// Delivered to this node itself (a local address: a host-network endpoint).
    Local,
    /// Out of interface `oif`, straight to the destination (no gateway, or a link-local one):
    /// the destination lives behind that interface.
    Direct { oif: u32 },
    /// Out of interface `oif` through a gateway: the destination is elsewhere.
    Gateway { oif: u32 },
    /// No usable route (unreachable, blackhole, prohibit, or an error).
    None,
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Index of the device this one is enslaved to (a bridge port's bridge).
    pub master: Option<u32>,
    /// `veth`, `bridge`, ... (IFLA_INFO_KIND), where the kernel says.
    pub kind: Option<String>,
    pub up: bool,
    pub loopback: bool,
    /// Its frames carry an Ethernet header (ARPHRD_ETHER), which the tc program reads.
    pub ether: bool,
}

/// A request/response rtnetlink socket.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    pub fn new() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        set_recv_timeout(&socket, Duration::from_secs(2))?;
        Ok(Rtnl {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends one request and collects every message answering it (until `Done` for a dump, or
    /// the first answer otherwise). A netlink error answer becomes `Err`.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        dump: bool,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.request_with(message, if dump { NLM_F_DUMP } else { 0 })
    }

    /// `request` with netlink flags `flags` (besides NLM_F_REQUEST).
    fn request_with(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let dump = flags & NLM_F_DUMP != 0;
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut packet =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = seq;
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut answers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "rtnetlink answer"));
            }
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let message: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&self.buf[offset..n])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = message.header.length as usize;
                // Answers to an earlier request that timed out are skipped.
                let ours = message.header.sequence_number == seq;
                match message.payload {
                    _ if !ours => {}
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        answers.push(m);
                        if !dump {
                            return Ok(answers);
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }

    /// Has the kernel resolve the neighbour `addr` behind interface `ifindex` as if a packet
    /// were sent to it (RTM_NEWNEIGH with NTF_USE: the entry is created if need be, and
    /// probed). The entry then ages as any other.
    pub fn use_neighbour(&mut self, ifindex: u32, addr: IpAddr) -> io::Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = ifindex;
        msg.header.flags = NeighbourFlags::Use;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(
                addr,
            )));
        self.request_with(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_ACK,
        )
        .map(|_| ())
    }

    /// The kernel's route to `addr` (`ip route get ADDR`).
    pub fn route_get(&mut self, addr: IpAddr) -> io::Result<RouteHit> {
        Ok(self
            .route_message(addr)?
            .map_or(RouteHit::None, |r| route_hit(&r)))
    }

    /// The source address the kernel picks for a socket connecting to `addr` (the `src` of
    /// `ip route get ADDR`); None without a route or a preferred source.
    pub fn route_source(&mut self, addr: IpAddr) -> io::Result<Option<IpAddr>> {
        Ok(self.route_message(addr)?.and_then(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::PrefSource(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                RouteAttribute::PrefSource(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                _ => None,
            })
        }))
    }

    /// The answer to RTM_GETROUTE for `addr`; None when the kernel has no usable route.
    fn route_message(&mut self, addr: IpAddr) -> io::Result<Option<RouteMessage>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
        msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        let answers = match self.request(RouteNetlinkMessage::GetRoute(msg), false) {
            Ok(a) => a,
            // Unreachable, no route, prohibited: not an interface.
            Err(e) if e.raw_os_error().is_some() => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(answers.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        }))
    }

    /// Every link of this network namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let answers = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_of(&l)),
                _ => None,
            })
            .collect())
    }

    /// The mode an XDP program is attached to interface `name` in (`driver`, `generic`,
    /// `offload`, `multiple`), or None when none is (or there is no such interface).
    pub fn xdp_mode(&mut self, name: &str) -> io::Result<Option<&'static str>> {
        let answers = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)?;
        Ok(answers
            .iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l)
                    if l.attributes
                        .iter()
                        .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name)) =>
                {
                    Some(l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                            LinkXdp::Attached(XdpAttached::Driver) => Some("driver"),
                            LinkXdp::Attached(XdpAttached::SocketBuffer) => Some("generic"),
                            LinkXdp::Attached(XdpAttached::Hardware) => Some("offload"),
                            LinkXdp::Attached(XdpAttached::Multiple) => Some("multiple"),
                            _ => None,
                        }),
                        _ => None,
                    }))
                }
                _ => None,
            })
            .flatten())
    }

    /// Every address of this network namespace, with its interface's index: the local end
    /// (IFA_LOCAL) where the kernel gives one, as on a point-to-point link, else IFA_ADDRESS.
    pub fn addresses(&mut self) -> io::Result<Vec<(u32, IpAddr)>> {
        Ok(self
            .prefixes()?
            .into_iter()
            .map(|(index, ip, _)| (index, ip))
            .collect())
    }

    /// `addresses` with each address's prefix length.
    pub fn prefixes(&mut self) -> io::Result<Vec<(u32, IpAddr, u8)>> {
        // AF_UNSPEC: both families.
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            true,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    address_of(&a).map(|ip| (a.header.index, ip, a.header.prefix_len))
                }
                _ => None,
            })
            .collect())
    }

    /// Every address on an interface that is up, as getifaddrs(3) lists them with IFF_UP.
    pub fn local_addresses(&mut self) -> io::Result<Vec<IpAddr>> {
        let up: BTreeSet<u32> = self
            .links()?
            .into_iter()
            .filter(|l| l.up)
            .map(|l| l.index)
            .collect();
        Ok(self
            .addresses()?
            .into_iter()
            .filter(|(index, _)| up.contains(index))
            .map(|(_, ip)| ip)
            .collect())
    }

    /// Interfaces that carry a default route, both families, in every routing table: the main
    /// one and policy-routing tables (the AWS VPC CNI gives each secondary network interface a
    /// table of its own, whose default route is the only one through that interface).
    pub fn default_route_interfaces(&mut self) -> io::Result<Vec<u32>> {
        self.default_routes(false)
    }

    /// Interfaces that carry a default route in the main table (where XDP goes at start: a
    /// policy table's interface may lack a driver that runs XDP, and `--xdp driver` would
    /// refuse to start).
    pub fn main_default_route_interfaces(&mut self) -> io::Result<Vec<u32>> {
        self.default_routes(true)
    }

    fn default_routes(&mut self, main_only: bool) -> io::Result<Vec<u32>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let answers = self.request(RouteNetlinkMessage::GetRoute(msg), true)?;
            for m in answers {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    continue;
                };
                if r.header.destination_prefix_length != 0
                    || r.header.kind != RouteType::Unicast
                    || r.header.table == RT_TABLE_LOCAL
                    || (main_only && r.header.table != RouteHeader::RT_TABLE_MAIN)
                {
                    continue;
                }
                for a in &r.attributes {
                    if let RouteAttribute::Oif(i) = a {
                        out.push(*i);
                    }
                    if let RouteAttribute::MultiPath(hops) = a {
                        out.extend(hops.iter().map(|h| h.interface_index));
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

/// The kernel's `local` table (its local and broadcast routes).
const RT_TABLE_LOCAL: u8 = 255;

fn route_hit(r: &RouteMessage) -> RouteHit {
    match r.header.kind {
        RouteType::Local => return RouteHit::Local,
        RouteType::Unicast => {}
        _ => return RouteHit::None,
    }
    let mut oif = None;
    let mut gateway = false;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            // A link-local next hop (`via fe80::1 dev vethX`, as some CNIs route IPv6 to pods)
            // only exists on that link: the destination is behind it, as with a direct route.
            RouteAttribute::Gateway(g) if is_link_local(g) => {}
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => gateway = true,
            _ => {}
        }
    }
    match (oif, gateway) {
        (Some(oif), false) => RouteHit::Direct { oif },
        (Some(oif), true) => RouteHit::Gateway { oif },
        (None, _) => RouteHit::None,
    }
}

fn is_link_local(a: &RouteAddress) -> bool {
    match a {
        RouteAddress::Inet(v4) => v4.is_link_local(),
        RouteAddress::Inet6(v6) => v6.is_unicast_link_local(),
        _ => false,
    }
}

fn link_of(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        master: None,
        kind: None,
        up: l.header.flags.contains(LinkFlags::Up),
        loopback: l.header.flags.contains(LinkFlags::Loopback),
        ether: l.header.link_layer_type == LinkLayerType::Ether,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Controller(m) => link.master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(kind_name(k));
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn address_of(a: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attribute in &a.attributes {
        match attribute {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// The kernel's name of a device kind (IFLA_INFO_KIND): `veth`, `bridge`, `gre`,
/// `openvswitch`, ...
fn kind_name(k: &InfoKind) -> String {
    k.to_string()
}

pub(crate) fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A subscription to link, address and route (and, if asked for, neighbour) changes of this
/// network namespace.
pub struct Events {
    socket: Socket,
    buf: Vec<u8>,
}

/// The groups of `Events::subscribe`.
const LINKS_ADDRESSES_ROUTES: [u32; 5] = [
    libc::RTNLGRP_LINK,
    libc::RTNLGRP_IPV4_IFADDR,
    libc::RTNLGRP_IPV6_IFADDR,
    libc::RTNLGRP_IPV4_ROUTE,
    libc::RTNLGRP_IPV6_ROUTE,
];

impl Events {
    pub fn subscribe() -> io::Result<Events> {
        Events::of(&LINKS_ADDRESSES_ROUTES)
    }

    /// `subscribe`, and every other change a route lookup's answer depends on: neighbours (a
    /// next hop's link-layer address or state), policy-routing rules, next-hop objects, and
    /// the interfaces' forwarding settings.
    pub fn subscribe_with_neighbours() -> io::Result<Events> {
        let mut groups = LINKS_ADDRESSES_ROUTES.to_vec();
        groups.extend([
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_RULE,
            libc::RTNLGRP_IPV6_RULE,
            libc::RTNLGRP_IPV4_NETCONF,
            libc::RTNLGRP_IPV6_NETCONF,
            // Next-hop objects, whose replacement no route notification reports.
            libc::RTNLGRP_NEXTHOP,
        ]);
        Events::of(&groups)
    }

    fn of(groups: &[u32]) -> io::Result<Events> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        for &group in groups {
            socket.add_membership(group)?;
        }
        Ok(Events {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Waits up to `timeout` for events; true when at least one arrived (all that are queued
    /// are consumed). An overrun (ENOBUFS: events were lost) counts as an event, so the caller
    /// looks at everything again.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let mut any = false;
        let mut wait_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        loop {
            let mut pfd = libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if rc <= 0 {
                return any;
            }
            // SAFETY: a valid socket; the buffer is ours.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                return any;
            }
            any = true;
            // Drain what else is queued without waiting.
            wait_ms = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(kind: RouteType, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.kind = kind;
        r.attributes = attributes;
        r
    }

    #[test]
    fn route_answers_classify_where_the_destination_lives() {
        let oif = RouteAttribute::Oif(5);
        let gw =
            |a: &str| RouteAttribute::Gateway(RouteAddress::from(a.parse::<IpAddr>().unwrap()));
        assert_eq!(
            route_hit(&route(RouteType::Unicast, vec![oif.clone()])),
            RouteHit::Direct { oif: 5 }
        );
        assert_eq!(
            route_hit(&route(
                RouteType::Unicast,
                vec![oif.clone(), gw("192.168.77.2")]
            )),
            RouteHit::Gateway { oif: 5 }
        );
        // A link-local next hop on a pod's veth: the pod is behind it.
        assert_eq!(
            route_hit(&route(RouteType::Unicast, vec![oif.clone(), gw("fe80::1")])),
            RouteHit::Direct { oif: 5 }
        );
        assert_eq!(
            route_hit(&route(
                RouteType::Unicast,
                vec![oif.clone(), gw("169.254.1.1")]
            )),
            RouteHit::Direct { oif: 5 }
        );
        assert_eq!(
            route_hit(&route(RouteType::Local, vec![oif])),
            RouteHit::Local
        );
        assert_eq!(
            route_hit(&route(RouteType::BlackHole, vec![])),
            RouteHit::None
        );
    }

    /// What getifaddrs(3) lists: every IPv4 and IPv6 address of an interface that is up.
    fn getifaddrs_up() -> Vec<IpAddr> {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: an out pointer; the list is freed below with freeifaddrs.
        assert_eq!(unsafe { libc::getifaddrs(&mut head) }, 0);
        let mut out = Vec::new();
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: a node of the list getifaddrs returned.
            let ifa = unsafe { &*cur };
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
                continue;
            }
            // SAFETY: ifa_addr points at a sockaddr whose family says which kind it is.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    // s_addr holds the address in network order.
                    out.push(IpAddr::from(sa.sin_addr.s_addr.to_ne_bytes()));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::from(sa.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        // SAFETY: the list getifaddrs allocated, freed once.
        unsafe { libc::freeifaddrs(head) };
        out.sort();
        out
    }

    #[test]
    fn local_addresses_are_what_getifaddrs_lists() {
        // In the namespace the test runs in. Other programs may add or remove addresses
        // meanwhile: compare only when getifaddrs says the same before and after.
        let mut rtnl = Rtnl::new().unwrap();
        let mut compared = false;
        for _ in 0..20 {
            let before = getifaddrs_up();
            let mut ours = rtnl.local_addresses().unwrap();
            ours.sort();
            if getifaddrs_up() != before {
                continue;
            }
            assert_eq!(ours, before);
            assert!(ours.contains(&IpAddr::from([127, 0, 0, 1])), "{ours:?}");
            // ::1 where lo has it (/proc/net/if_inet6 lists it: address, index, prefix, scope,
            // flags, name).
            let inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
            let lo_has_v6 = inet6.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&"00000000000000000000000000000001") && f.last() == Some(&"lo")
            });
            if lo_has_v6 {
                assert!(
                    ours.contains(&IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
                    "{ours:?}"
                );
            }
            compared = true;
            break;
        }
        assert!(compared, "the addresses kept changing");
    }
}
