//! The multi-node testbed itself, without the agent: pods on different nodes reach each other
//! by routing (no NAT), the external client reaches nodes on the LAN but not pods, checksum
//! offload is off so receivers verify checksums, the error counters see a corrupt datagram,
//! and everything goes away on drop. Each pod-network shape (bridge, ptp, calico, aws-vpc) is wired as
//! documented, and its pods answer, also after `recreate_pod_link` and `add_pod`.

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
    NetNs, Reply, Shape, Testbed,
    harness::{
        testbed::{
            CALICO_GW4, CALICO_GW6, CALICO_MAC, EXT_IP4, EXT_IP6, VPC_SECONDARY_TABLE, vpc_pod_ip4,
            vpc_pod_ip6,
        },
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

/// Checks with `ethtool -k` that rx and tx checksumming are off on every veth end of `bed`;
/// returns how many ends there are.
fn veth_ends_without_offload(bed: &Testbed) -> usize {
    let mut ends = 0;
    for ns in bed.namespaces() {
        for dev in links(ns, &["type", "veth"]) {
            let features = ns.exec("ethtool", &["-k", &dev]);
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
    ends
}

/// Names of the links of `ns` that `ip -o link show FILTER...` lists.
fn links(ns: &NetNs, filter: &[&str]) -> Vec<String> {
    let mut args = vec!["-o", "link", "show"];
    args.extend_from_slice(filter);
    ns.ip(&args)
        .lines()
        .map(|line| {
            // `12: eth0@if11: <...> ...`
            line.split(':')
                .nth(1)
                .and_then(|d| d.trim().split('@').next())
                .unwrap_or_else(|| panic!("unexpected link line {line:?}"))
                .to_string()
        })
        .collect()
}

/// `ethtool -k` reports rx and tx checksumming off on both ends of every veth.
#[test]
fn checksum_offload_is_off_on_every_veth() {
    if !privileged() {
        return;
    }
    let bed = Testbed::new(&[2, 1]);
    // Two ends each: ext and two nodes on the LAN, three pods.
    assert_eq!(veth_ends_without_offload(&bed), 2 * (1 + 2 + 3));
}

/// `/sys/class/net/DEV/FILE` in `ns`, trimmed.
fn sys_net(ns: &NetNs, dev: &str, file: &str) -> String {
    ns.exec("cat", &[&format!("/sys/class/net/{dev}/{file}")])
        .trim()
        .to_string()
}

/// Whether `name` is `prefix` followed by `digits` hex digits.
fn named_like(name: &str, prefix: &str, digits: usize) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == digits && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Pod `pod` of node `node` and the node's side of its veth are wired as `bed.shape` says:
/// interface names, addresses, MAC, sysctls, the routes on both sides.
fn assert_wired(bed: &Testbed, node: usize, pod: usize) {
    let node_ns = &bed.nodes[node].ns;
    let p = &bed.nodes[node].pods[pod];
    let dev = p.host_if.as_str();
    let what = format!("{} ({dev})", p.name);
    let pod_addrs = p.ns.ip(&["-o", "addr", "show", "dev", "eth0"]);
    let node_addrs = node_ns.ip(&["-o", "addr", "show", "dev", dev]);
    let link = node_ns.ip(&["-o", "link", "show", "dev", dev]);
    assert!(link.contains(",UP"), "{what}: {link}");
    let bridges = links(node_ns, &["type", "bridge"]);
    if bed.shape == Shape::Bridge {
        assert_eq!(bridges, ["br0"], "{what}");
        assert!(link.contains(" master br0 "), "{what}: {link}");
        assert!(
            pod_addrs.contains(&format!(" {}/24 ", p.ip4)),
            "{what}: {pod_addrs}"
        );
        assert!(
            pod_addrs.contains(&format!(" {}/64 ", p.ip6)),
            "{what}: {pod_addrs}"
        );
        return;
    }
    assert!(bridges.is_empty(), "{what}: bridges {bridges:?}");
    assert!(!link.contains(" master "), "{what}: {link}");
    for want in [format!(" {}/32 ", p.ip4), format!(" {}/128 ", p.ip6)] {
        assert!(pod_addrs.contains(&want), "{what}: no{want}in {pod_addrs}");
    }
    let route4 = node_ns.ip(&["route", "show", &format!("{}/32", p.ip4)]);
    assert!(
        route4.contains(&format!("dev {dev} scope link")),
        "{what}: {route4}"
    );
    let route6 = node_ns.ip(&["-6", "route", "show", &format!("{}/128", p.ip6)]);
    assert!(route6.contains(&format!("dev {dev} ")), "{what}: {route6}");
    let pod_routes = p.ns.ip(&["route", "show"]) + &p.ns.ip(&["-6", "route", "show"]);
    match bed.shape {
        Shape::Bridge => unreachable!(),
        Shape::Ptp => {
            assert!(named_like(dev, "veth", 8), "{what}");
            let (gw4, gw6) = (bridge_ip4(node), bridge_ip6(node));
            for want in [format!(" {gw4}/32 "), format!(" {gw6}/128 ")] {
                assert!(
                    node_addrs.contains(&want),
                    "{what}: no{want}in {node_addrs}"
                );
            }
            for want in [
                format!("default via {gw4} dev eth0"),
                format!("{gw4} dev eth0 scope link"),
                format!("default via {gw6} dev eth0"),
                format!("{gw6} dev eth0"),
            ] {
                assert!(
                    pod_routes.contains(&want),
                    "{what}: no {want} in {pod_routes}"
                );
            }
        }
        Shape::AwsVpc => {
            assert!(named_like(dev, "eni", 11), "{what}");
            assert_link_local_gateways(&what, &node_addrs, &pod_routes);
            // The pod's gateway is a permanent neighbour entry for the veth's MAC.
            let neigh = p.ns.ip(&["neigh", "show", &CALICO_GW4.to_string()]);
            let mac = sys_net(node_ns, dev, "address");
            assert!(
                neigh.contains(&format!("lladdr {mac} PERMANENT")),
                "{what}: {neigh}"
            );
            // Addresses of the node's subnet, the CNI's policy rules, proxy NDP on eth0.
            assert_eq!(
                (p.ip4, p.ip6),
                (vpc_pod_ip4(node, pod), vpc_pod_ip6(node, pod))
            );
            let rules = node_ns.ip(&["rule", "show"]);
            assert!(
                rules.contains(&format!("512:\tfrom all to {} lookup main", p.ip4)),
                "{what}: {rules}"
            );
            let secondary = format!("1536:\tfrom {} lookup {VPC_SECONDARY_TABLE}", p.ip4);
            assert_eq!(rules.contains(&secondary), pod % 2 == 1, "{what}: {rules}");
            // Answered for by proxy on the interface the VPC delivers the address to, and a
            // secondary pod's traffic to the LAN leaves through that interface.
            let nic = if pod % 2 == 1 { "eth1" } else { "eth0" };
            let proxies = node_ns.ip(&["neigh", "show", "proxy"]);
            assert!(
                proxies.contains(&format!("{} dev {nic} proxy", p.ip4)),
                "{what}: {proxies}"
            );
            let proxies6 = node_ns.ip(&["-6", "neigh", "show", "proxy"]);
            assert!(
                proxies6.contains(&format!("{} dev eth0 proxy", p.ip6)),
                "{what}: {proxies6}"
            );
            let out = node_ns.ip(&[
                "route",
                "get",
                &EXT_IP4.to_string(),
                "from",
                &p.ip4.to_string(),
                "iif",
                dev,
            ]);
            assert!(out.contains(&format!(" dev {nic} ")), "{what}: {out}");
        }
        Shape::Calico => {
            assert!(named_like(dev, "cali", 11), "{what}");
            assert_eq!(sys_net(node_ns, dev, "address"), CALICO_MAC, "{what}");
            let proxy_arp = node_ns.exec(
                "cat",
                &[&format!("/proc/sys/net/ipv4/conf/{dev}/proxy_arp")],
            );
            assert_eq!(proxy_arp.trim(), "1", "{what}");
            assert_link_local_gateways(&what, &node_addrs, &pod_routes);
        }
    }
}

/// The link-local gateways of the Calico and AWS VPC shapes: no IPv4 address on the node-side
/// veth, fe80::1/64 on it, and the pod's routes via 169.254.1.1 and fe80::1.
fn assert_link_local_gateways(what: &str, node_addrs: &str, pod_routes: &str) {
    assert!(!node_addrs.contains(" inet "), "{what}: {node_addrs}");
    assert!(
        node_addrs.contains(&format!(" {CALICO_GW6}/64 ")),
        "{what}: {node_addrs}"
    );
    for want in [
        "default via 169.254.1.1 dev eth0".to_string(),
        "169.254.1.1 dev eth0 scope link".to_string(),
        format!("default via {CALICO_GW6} dev eth0"),
    ] {
        assert!(
            pod_routes.contains(&want),
            "{what}: no {want} in {pod_routes}"
        );
    }
}

/// The address node `node` sends from to its own pods: the gateway on the pod's veth (bridge,
/// ptp), or its LAN address (calico: the veth has no address of global scope).
fn node_source(bed: &Testbed, node: usize, v6: bool) -> IpAddr {
    match (bed.shape, v6) {
        (Shape::Bridge | Shape::Ptp, false) => bridge_ip4(node).into(),
        (Shape::Bridge | Shape::Ptp, true) => bridge_ip6(node).into(),
        (Shape::Calico | Shape::AwsVpc, false) => bed.nodes[node].ip4.into(),
        (Shape::Calico | Shape::AwsVpc, true) => bed.nodes[node].ip6.into(),
    }
}

/// Waits (bounded) until pod `pod` of node `node` (with an echo server on PORT) answers TCP
/// and UDP in both families from its node's namespace, from another pod of its node if there
/// is one, and from pod 0 of the next node; then asserts who answered and whom it saw.
fn assert_pod_answers(bed: &Testbed, node: usize, pod: usize) {
    let target = &bed.nodes[node].pods[pod];
    let next = (node + 1) % bed.nodes.len();
    let mut clients: Vec<(&NetNs, IpAddr, IpAddr)> = vec![(
        &bed.nodes[node].ns,
        node_source(bed, node, false),
        node_source(bed, node, true),
    )];
    let siblings = &bed.nodes[node].pods;
    if let Some(sibling) = (0..siblings.len()).find(|j| *j != pod) {
        let s = &siblings[sibling];
        clients.push((&s.ns, s.ip4.into(), s.ip6.into()));
    }
    if next != node {
        let other = &bed.nodes[next].pods[0];
        clients.push((&other.ns, other.ip4.into(), other.ip6.into()));
    }
    for (ns, src4, src6) in clients {
        for (to, client) in [
            (SocketAddr::new(target.ip4.into(), PORT), src4),
            (SocketAddr::new(target.ip6.into(), PORT), src6),
        ] {
            for proto in [Proto::Tcp, Proto::Udp] {
                let replies = poll_until(
                    &format!("{} answering {proto:?} {to} from {}", target.name, ns.name),
                    Duration::from_secs(10),
                    || {
                        let replies = bed.request_from(ns, false, proto, to, 1);
                        if replies.iter().all(|r| r.ok) {
                            Ok(replies)
                        } else {
                            Err(format!("{replies:?}"))
                        }
                    },
                );
                assert_answered(&replies, to, &target.name, client);
            }
        }
    }
}

/// Builds a two-node testbed of `shape` and checks its wiring and reachability, then replaces a
/// pod's veth keeping its name, replaces it with a new name, and adds a pod; every pod answers
/// each time.
fn shape_works(shape: Shape) {
    let mut bed = Testbed::with_shape(&[2, 1], shape);
    assert_eq!(bed.shape, shape);
    for (n, p) in [(0, 0), (0, 1), (1, 0)] {
        bed.serve(n, p, PORT);
        assert_wired(&bed, n, p);
    }
    for node in &bed.nodes {
        let names: Vec<&str> = node.pods.iter().map(|p| p.host_if.as_str()).collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(
            unique.len(),
            names.len(),
            "{}: node-side names {names:?}",
            node.name
        );
    }
    for (n, p) in [(0, 0), (0, 1), (1, 0)] {
        assert_pod_answers(&bed, n, p);
    }

    // A new veth under the same name: a new interface (index), wired again.
    let node_ns = &bed.nodes[0].ns;
    let old = bed.nodes[0].pods[0].host_if.clone();
    let old_index = sys_net(node_ns, &old, "ifindex");
    let old_pod_index = sys_net(&bed.nodes[0].pods[0].ns, "eth0", "ifindex");
    bed.recreate_pod_link(0, 0, true);
    let pod = &bed.nodes[0].pods[0];
    assert_eq!(pod.host_if, old);
    assert_ne!(sys_net(&bed.nodes[0].ns, &old, "ifindex"), old_index);
    assert_ne!(sys_net(&pod.ns, "eth0", "ifindex"), old_pod_index);
    assert_wired(&bed, 0, 0);
    assert_pod_answers(&bed, 0, 0);

    // A new veth under a new name: the old one is gone.
    bed.recreate_pod_link(0, 0, false);
    let renamed = bed.nodes[0].pods[0].host_if.clone();
    assert_ne!(renamed, old);
    let node_links = links(&bed.nodes[0].ns, &[]);
    assert!(!node_links.contains(&old), "{old} still in {node_links:?}");
    assert!(
        node_links.contains(&renamed),
        "{renamed} not in {node_links:?}"
    );
    // The pod is wired again, the other pods are untouched (ptp: their copy of the gateway address
    // stays).
    for (n, p) in [(0, 0), (0, 1), (1, 0)] {
        assert_wired(&bed, n, p);
        assert_pod_answers(&bed, n, p);
    }

    // A pod added after construction: the plan's next addresses.
    assert_eq!(bed.add_pod(0), 2);
    let added = &bed.nodes[0].pods[2];
    assert_eq!(added.name, "a-pod-3");
    if shape == Shape::AwsVpc {
        assert_eq!(added.ip4, Ipv4Addr::new(192, 168, 77, 130));
        assert_eq!(added.ip6.to_string(), "fd00:77::1:4");
    } else {
        assert_eq!(added.ip4, Ipv4Addr::new(10, 244, 0, 4));
        assert_eq!(added.ip6.to_string(), "fd00:244::4");
    }
    bed.serve(0, 2, PORT);
    assert_wired(&bed, 0, 2);
    assert_pod_answers(&bed, 0, 2);

    // Two ends each: ext and two nodes on the LAN (AwsVpc: each with a second interface too),
    // four pods.
    let second_nics = if shape == Shape::AwsVpc { 2 } else { 0 };
    assert_eq!(
        veth_ends_without_offload(&bed),
        2 * (1 + 2 + second_nics + 4)
    );
    bed.assert_no_checksum_errors();
}

/// The bridge shape (`Testbed::new`): pods on `br0`; a recreated link is a bridge port again.
#[test]
fn bridge_shape_pods_answer_after_a_new_link_and_when_added() {
    if !privileged() {
        return;
    }
    shape_works(Shape::Bridge);
}

/// The ptp shape (kindnet): per-pod routed veths carrying the gateway, no bridge.
#[test]
fn ptp_shape_pods_answer_after_a_new_link_and_when_added() {
    if !privileged() {
        return;
    }
    shape_works(Shape::Ptp);
}

/// The calico shape: per-pod routed veths with proxy ARP and fe80::1, no bridge.
#[test]
fn calico_shape_pods_answer_after_a_new_link_and_when_added() {
    if !privileged() {
        return;
    }
    shape_works(Shape::Calico);
}

/// The AWS VPC CNI shape: pods addressed from the node's subnet on per-pod routed veths, a
/// permanent neighbour entry for the gateway, policy rules (a secondary interface's table for
/// odd pods), proxy ARP and NDP on `eth0` in place of the VPC's fabric.
#[test]
fn aws_vpc_shape_pods_answer_after_a_new_link_and_when_added() {
    if !privileged() {
        return;
    }
    shape_works(Shape::AwsVpc);
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
