//! The multi-node testbed itself, without the agent: pods on different nodes reach each other
//! by routing (no NAT), the external client reaches nodes on the LAN but not pods, checksum
//! offload is off so receivers verify checksums, the error counters see a corrupt datagram,
//! and everything goes away on drop.

mod common;

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use common::privileged;
use tests::{
    NetNs, Reply, Testbed,
    harness::{
        testbed::{EXT_IP4, EXT_IP6},
        topology::{Proto, bridge_ip4, bridge_ip6},
    },
    poll_until,
};

const PORT: u16 = 8080;
const PROTOS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::UdpConnected];

/// Asserts every reply came from `backend`, which saw the client at `client`, and the client saw
/// `to` as its peer.
fn assert_answered(replies: &[Reply], to: SocketAddr, backend: &str, client: IpAddr) {
    assert!(!replies.is_empty(), "no replies from {to}");
    for r in replies {
        assert!(r.ok, "{to}: {r:?}");
        assert_eq!(r.backend, backend, "{to}: {r:?}");
        let seen: SocketAddr = r.seen.parse().unwrap_or_else(|e| panic!("{r:?}: {e}"));
        assert_eq!(seen.ip(), client, "{to}: the server saw {}", r.seen);
        assert_eq!(r.peer, to.to_string(), "{to}: {r:?}");
    }
}

/// Pods on node-a and node-b talk over TCP and UDP, both families, both ways; the server sees
/// the client pod's own address (routed between nodes, not NATed).
#[test]
fn pods_on_different_nodes_reach_each_other_without_nat() {
    if !privileged() {
        return;
    }
    let mut bed = Testbed::new(&[1, 1]);
    bed.serve(0, 0, PORT);
    bed.serve(1, 0, PORT);
    for (from, to_node) in [(0, 1), (1, 0)] {
        let client = &bed.nodes[from].pods[0];
        let server = &bed.nodes[to_node].pods[0];
        for (client_ip, server_ip) in [
            (IpAddr::from(client.ip4), IpAddr::from(server.ip4)),
            (client.ip6.into(), server.ip6.into()),
        ] {
            let to = SocketAddr::new(server_ip, PORT);
            for proto in PROTOS {
                let replies = bed.request_from(&client.ns, true, proto, to, 3);
                assert_answered(&replies, to, &server.name, client_ip);
            }
        }
    }
    assert_eq!(bed.nodes[0].pods[0].name, "a-pod-1");
    assert_eq!(bed.nodes[1].pods[0].name, "b-pod-1");
    bed.assert_no_checksum_errors();
}

/// The external client reaches a host-network server on node-a's LAN address, both families,
/// TCP and UDP, and keeps a TCP connection open.
#[test]
fn ext_reaches_a_node_on_its_lan_address() {
    if !privileged() {
        return;
    }
    let mut bed = Testbed::new(&[1, 1]);
    bed.serve_on_node(0, PORT);
    let node = &bed.nodes[0];
    for (node_ip, ext_ip) in [
        (IpAddr::from(node.ip4), IpAddr::from(EXT_IP4)),
        (node.ip6.into(), EXT_IP6.into()),
    ] {
        let to = SocketAddr::new(node_ip, PORT);
        for proto in PROTOS {
            let replies = bed.request_ext(proto, to, 3);
            assert_answered(&replies, to, "node-a", ext_ip);
        }
        let (mut held, first) = bed.hold_from(&bed.ext, false, to);
        assert_answered(&[first], to, "node-a", ext_ip);
        let again = held.again();
        assert_answered(&[again], to, "node-a", ext_ip);
    }
    bed.assert_no_checksum_errors();
}

/// The external client has no route to pod addresses: requests fail at once with
/// ENETUNREACH, while the same servers answer from a node.
#[test]
fn ext_has_no_route_to_pod_addresses() {
    if !privileged() {
        return;
    }
    let mut bed = Testbed::new(&[1, 1]);
    bed.serve(0, 0, PORT);
    bed.serve(1, 0, PORT);
    let node_a = &bed.nodes[0];
    for (i, node) in bed.nodes.iter().enumerate() {
        let pod = &node.pods[0];
        for ip in [IpAddr::from(pod.ip4), IpAddr::from(pod.ip6)] {
            let to = SocketAddr::new(ip, PORT);
            for proto in PROTOS {
                let replies = bed.request_ext(proto, to, 1);
                assert_eq!(replies.len(), 1, "{to}: {replies:?}");
                let r = &replies[0];
                assert!(!r.ok, "ext reached pod address {to}: {r:?}");
                assert_eq!(r.errno, Some(libc::ENETUNREACH), "{to}: {r:?}");
            }
            // The server is there: node-a reaches it, from its bridge address (own pod) or
            // from its LAN address (node-b's pod, routed via node-b).
            let source: IpAddr = match (ip, i) {
                (IpAddr::V4(_), 0) => bridge_ip4(0).into(),
                (IpAddr::V6(_), 0) => bridge_ip6(0).into(),
                (IpAddr::V4(_), _) => node_a.ip4.into(),
                (IpAddr::V6(_), _) => node_a.ip6.into(),
            };
            let replies = bed.request_from(&node_a.ns, false, Proto::Tcp, to, 1);
            assert_answered(&replies, to, &pod.name, source);
        }
    }
    bed.assert_no_checksum_errors();
}

/// `ethtool -k` reports rx and tx checksumming off on both ends of every veth.
#[test]
fn checksum_offload_is_off_on_every_veth() {
    if !privileged() {
        return;
    }
    let bed = Testbed::new(&[2, 1]);
    let mut ends = 0;
    for ns in bed.namespaces() {
        let links = ns.ip(&["-o", "link", "show", "type", "veth"]);
        for line in links.lines() {
            // `12: eth0@if11: <...> ...`
            let dev = line
                .split(':')
                .nth(1)
                .and_then(|d| d.trim().split('@').next())
                .unwrap_or_else(|| panic!("unexpected link line {line:?}"));
            let features = ns.exec("ethtool", &["-k", dev]);
            for feature in ["rx-checksumming", "tx-checksumming"] {
                let state = features
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{feature}: ")))
                    .unwrap_or_else(|| panic!("{}/{dev}: no {feature} in {features}", ns.name));
                assert!(
                    state.starts_with("off"),
                    "{}/{dev}: {feature}: {state}",
                    ns.name
                );
            }
            ends += 1;
        }
    }
    // Two ends each: ext and two nodes on the LAN, three pods.
    assert_eq!(ends, 2 * (1 + 2 + 3));
}

/// Ones' complement sum of 16-bit big-endian words.
fn csum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    for chunk in bytes.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        let lo = chunk.get(1).copied().map_or(0, u32::from);
        sum += hi | lo;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP datagram from `from` to `to` whose checksum is deliberately wrong.
fn corrupt_udp(from: IpAddr, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("small datagram");
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&to.port().to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    match (from, to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, libc::IPPROTO_UDP as u8]);
            pseudo.extend_from_slice(&len.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, libc::IPPROTO_UDP as u8]);
        }
        _ => panic!("mixed families"),
    }
    let good = csum_fold(csum_add(csum_add(0, &pseudo), &udp));
    // Any other nonzero value is wrong (zero would mean "no checksum" over IPv4).
    let bad: u16 = if good == 0x1111 { 0x2222 } else { 0x1111 };
    udp[6..8].copy_from_slice(&bad.to_be_bytes());
    udp
}

/// Runs `f` on a thread moved into the network namespace at `netns` (setns(2) moves only the
/// calling thread), so the sockets it opens live there.
fn in_netns<T: Send + 'static>(
    netns: String,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> T {
    let path = netns.clone();
    std::thread::spawn(move || -> io::Result<T> {
        let ns = File::open(&path)?;
        // SAFETY: setns on a valid fd; it moves only this short-lived thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .expect("thread in namespace")
    .unwrap_or_else(|e| panic!("in {netns}: {e}"))
}

fn socket(family: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right after.
    let fd = unsafe { libc::socket(family, ty, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// sendto(2) of `buf` to the address `T` (a sockaddr_* of the socket's family).
fn send_to<T>(fd: &OwnedFd, buf: &[u8], addr: &T) -> io::Result<()> {
    // SAFETY: valid fd, buffer and address of the given size.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (addr as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `datagram` (UDP header and payload) to `to` through a raw socket created inside the
/// namespace at `netns`; the kernel adds the IP header and leaves the UDP checksum alone.
fn send_raw_udp(netns: String, to: SocketAddr, datagram: Vec<u8>) {
    in_netns(netns, move || match to {
        SocketAddr::V4(a) => {
            let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP)?;
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            send_to(&fd, &datagram, &sin)
        }
        SocketAddr::V6(a) => {
            let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_UDP)?;
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                // Raw IPv6: the port field is the protocol, or 0 for the socket's.
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            send_to(&fd, &datagram, &sin6)
        }
    });
}

/// The MAC address of `eth0` in `ns`.
fn mac_of_eth0(ns: &NetNs) -> [u8; 6] {
    let text = ns.exec("cat", &["/sys/class/net/eth0/address"]);
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("MAC {text:?}: {e}")))
        .collect();
    bytes.try_into().unwrap_or_else(|_| panic!("MAC {text:?}"))
}

/// Sends an Ethernet frame out of `eth0` of the namespace at `netns` through a packet socket
/// with a virtio-net header that says "needs checksum": the kernel takes the frame as
/// CHECKSUM_PARTIAL, with the checksum at `csum_start + csum_offset` still to be completed.
fn send_partial(netns: String, frame: Vec<u8>, csum_start: u16, csum_offset: u16) {
    in_netns(netns, move || {
        let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
        let on: libc::c_int = 1;
        // SAFETY: valid fd and option value.
        if unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let mut sll_addr = [0u8; 8];
        sll_addr[..6].copy_from_slice(&frame[..6]);
        let sll = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: (libc::ETH_P_IP as u16).to_be(),
            sll_ifindex: ifindex as i32,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr,
        };
        // struct virtio_net_hdr (little-endian): flags NEEDS_CSUM, gso_type NONE, hdr_len,
        // gso_size, csum_start, csum_offset.
        let mut buf = vec![1u8, 0, 0, 0, 0, 0];
        buf.extend_from_slice(&csum_start.to_le_bytes());
        buf.extend_from_slice(&csum_offset.to_le_bytes());
        buf.extend_from_slice(&frame);
        send_to(&fd, &buf, &sll)
    });
}

/// An Ethernet frame with an IPv4 UDP datagram from `from` to `to`, with `udp_csum` in the UDP
/// checksum field as it is.
fn udp4_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    from: Ipv4Addr,
    to: SocketAddrV4,
    udp_csum: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = u16::try_from(8 + payload.len()).expect("small datagram");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.ip().octets());
    let ip_csum = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&to.port().to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&udp_csum.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Waits until `checksum_errors` is exactly `counters` (each 1) in `ns`.
fn wait_for_errors(bed: &Testbed, ns: &NetNs, counters: &[&str]) {
    let want: Vec<(String, String, u64)> = counters
        .iter()
        .map(|c| (ns.name.clone(), c.to_string(), 1))
        .collect();
    poll_until(&format!("{want:?} counted"), Duration::from_secs(5), || {
        let got = bed.checksum_errors();
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
}

/// The counters `checksum_errors` reads do see a datagram with a bad UDP checksum, in the
/// receiving node's namespace only.
#[test]
fn checksum_errors_counts_a_corrupt_datagram() {
    if !privileged() {
        return;
    }
    let bed = Testbed::new(&[1, 1]);
    bed.assert_no_checksum_errors();
    let node = &bed.nodes[0];
    for (from, to) in [
        (IpAddr::from(EXT_IP4), IpAddr::from(node.ip4)),
        (EXT_IP6.into(), node.ip6.into()),
    ] {
        let to = SocketAddr::new(to, 9999);
        send_raw_udp(bed.ext.path(), to, corrupt_udp(from, to, b"hello\n"));
    }
    wait_for_errors(
        &bed,
        &node.ns,
        &[
            "Udp:InErrors",
            "Udp:InCsumErrors",
            "Udp6InErrors",
            "Udp6InCsumErrors",
        ],
    );
}

/// Why offload is off: a frame that leaves `ext` as CHECKSUM_PARTIAL with garbage where the
/// pseudo-header sum belongs. With checksum offload on along the path, veths hand it over still
/// PARTIAL and node-a takes it as good; with offload off, the sender's veth completes the
/// checksum in software over the garbage and node-a's UDP rejects the datagram.
#[test]
fn a_partial_checksum_is_completed_by_the_sender_and_verified_by_the_receiver() {
    if !privileged() {
        return;
    }
    let bed = Testbed::new(&[1]);
    let node = &bed.nodes[0];
    let to = SocketAddrV4::new(node.ip4, 9999);
    let frame = udp4_frame(
        mac_of_eth0(&node.ns),
        mac_of_eth0(&bed.ext),
        EXT_IP4,
        to,
        0x1234,
        b"hello\n",
    );
    // The UDP header starts after Ethernet (14) and IPv4 (20); its checksum is 6 bytes in.
    send_partial(bed.ext.path(), frame, 14 + 20, 6);
    wait_for_errors(&bed, &node.ns, &["Udp:InErrors", "Udp:InCsumErrors"]);
}

/// Dropping a testbed (here while unwinding from a panic) kills its servers and removes its
/// namespaces and cgroup.
#[test]
fn teardown_removes_everything_even_on_panic() {
    if !privileged() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let built = std::thread::spawn(move || {
        let mut bed = Testbed::new(&[1, 1]);
        bed.serve(0, 0, PORT);
        bed.serve_on_node(1, PORT);
        tx.send((bed.id.clone(), bed.cgroup_path().to_path_buf()))
            .unwrap();
        panic!("deliberate panic with a live testbed");
    })
    .join();
    assert!(built.is_err(), "the builder thread was meant to panic");
    let (id, cgroup) = rx.recv().expect("testbed was built");
    let left: Vec<String> = tests::harness::run("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{id}-")))
        .map(String::from)
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
}
