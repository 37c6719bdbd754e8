//! Several nodes on one LAN, and a client outside the cluster, as in ../shared/testbed.md: for
//! NodePort / ExternalIP / LoadBalancer traffic that arrives at a node from outside.
//!
//! - `lan`: a bridge `lan0` (no address) joining everything below.
//! - `ext`: the external client, `eth0` at 192.168.77.100/24 and fd00:77::100/64. It has no
//!   route to pod addresses; Service addresses (10.96.0.0/16, fd00:96::/112) are routed via
//!   node-a, as a cloud load balancer or a BGP announcement would.
//! - node i (`node-a`, `node-b`, ...): `eth0` at 192.168.77.(i+1)/24 and fd00:77::(i+1)/64,
//!   forwarding on, its pods (`a-pod-1`, ... at 10.244.i.(j+2) and fd00:244:i::(j+2)), routes
//!   to every other node's pod CIDRs (10.244.k.0/24, fd00:244:k::/64) via that node's LAN
//!   address. How a node reaches its own pods is the testbed's [`Shape`]:
//!   - `Bridge`: bridge `br0` at 10.244.i.1/24 and fd00:244:i::1/64; each pod's veth
//!     (`veth<j>`) is a port of it; pods have /24 and /64 addresses and default routes via the
//!     bridge addresses.
//!   - `Ptp` (kindnet, the CNI `ptp` plugin): no bridge; each pod's node-side veth
//!     (`veth` + 8 hex digits) carries the gateway 10.244.i.1/32 and fd00:244:i::1/128, the
//!     same on every one; pods have /32 and /128 addresses with a link route to the gateway and
//!     default routes via it; the node routes each pod address (/32, /128) to its veth.
//!   - `Calico`: no bridge; each pod's node-side veth (`cali` + 11 hex digits) has MAC
//!     ee:ee:ee:ee:ee:ee, no IPv4 address, proxy ARP on (without delay) and the link-local
//!     fe80::1/64; pods have /32 and /128 addresses, default routes via 169.254.1.1 (a link
//!     route; the node answers its ARP by proxy) and fe80::1; the node routes each pod address
//!     to its veth. A real node's default route makes proxy ARP answer for 169.254.1.1; nodes
//!     here have none, so they get `169.254.1.1/32 dev eth0` in its place.
//!
//!   - `AwsVpc` (the AWS VPC CNI): pods take addresses of the node's own subnet, here the LAN
//!     (192.168.77.(128 + 16i + j), fd00:77::(i+1):(j+2)), not a pod CIDR. Each pod's
//!     node-side veth (`eni` + 11 hex digits) has no IPv4 address and the link-local
//!     fe80::1/64; pods have /32 and /128 addresses, default routes via 169.254.1.1 (a link
//!     route with a permanent neighbour entry for the veth's MAC, as the CNI writes it) and
//!     fe80::1; the node routes each pod address to its veth, with the CNI's policy rules:
//!     `to <pod> lookup main` (priority 512) for every pod, and for pods on the secondary
//!     network interface (odd `j`) `from <pod> lookup 2` (priority 1536).
//!     Each node has a second network interface, `eth1` at 192.168.77.(50 + i)/24 on the LAN
//!     (`Testbed::add_vpc_interface` adds more: `eth<k>` at 192.168.77.(40 + 10k + i)), whose
//!     routes are in a table of its own (k + 1: the subnet's link route and a default route
//!     via ext); the main table has default routes via ext on `eth0`. ARP is answered only on
//!     the interface holding the address (`arp_ignore` 1, `arp_announce` 2). The VPC delivers
//!     a pod's address to the interface it belongs to: here proxy neighbour entries on that
//!     interface (IPv4: `eth0` for even `j`, `eth1` for odd; IPv6: `eth0`); nodes have no
//!     routes to pod CIDRs.
//!
//!   `Testbed::with_vxlan` connects the nodes' pod networks through a VXLAN overlay as flannel
//!   does (`flannel.1` on each node, routes to other nodes' pod CIDRs through it) instead of
//!   routes via LAN addresses.
//!
//!   `Testbed::add_pod` adds a pod later, `Testbed::recreate_pod_link` replaces a pod's veth
//!   as a pod restart with the same address would.
//!
//! Checksum offload is off on both ends of every veth, so receivers verify every checksum (a
//! veth otherwise hands packets over as CHECKSUM_PARTIAL and a bad checksum written by the
//! datapath would go unnoticed); `checksum_errors` reads the kernel's error counters.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{
    cgroup::TestCgroup,
    names,
    netns::NetNs,
    process::{ChildGuard, Reply},
    topology::{
        Held, Pod, Proto, add_bridge, add_veth, attach_to_bridge, bridge_ip4, bridge_ip6, hold_in,
        no_dad, pod_ip4, pod_ip6, request_in, spawn_echo,
    },
    tunnel::TunOverlay,
};

/// The external client's LAN addresses.
pub const EXT_IP4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);
pub const EXT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);

/// Service address ranges that `ext` routes via node-a.
pub const SERVICE_CIDR4: &str = "10.96.0.0/16";
pub const SERVICE_CIDR6: &str = "fd00:96::/112";

/// LAN address of node `i` (0-based): 192.168.77.(i+1).
pub fn lan_ip4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, lan_octet(i))
}

/// LAN address of node `i` (0-based): fd00:77::(i+1).
pub fn lan_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, lan_octet(i).into())
}

fn lan_octet(i: usize) -> u8 {
    u8::try_from(i + 1)
        .ok()
        .filter(|o| *o < 100)
        .expect("at most 99 nodes")
}

/// Pod CIDRs of node `i`: 10.244.i.0/24 and fd00:244:i::/64.
pub fn pod_cidrs(i: usize) -> (String, String) {
    let i = u8::try_from(i).expect("at most 256 nodes");
    (
        format!("{}/24", Ipv4Addr::new(10, 244, i, 0)),
        format!(
            "{}/64",
            Ipv6Addr::new(0xfd00, 0x244, i.into(), 0, 0, 0, 0, 0)
        ),
    )
}

/// Counters of /proc/net/snmp (`Group:Name`) and /proc/net/snmp6 that count packets dropped
/// for a bad checksum, a bad IP header or a wrong destination address.
const SNMP_ERRORS: &[&str] = &[
    "Ip:InHdrErrors",
    "Ip:InAddrErrors",
    "Icmp:InCsumErrors",
    "Tcp:InCsumErrors",
    "Tcp:InErrs",
    "Udp:InCsumErrors",
    "Udp:InErrors",
];
const SNMP6_ERRORS: &[&str] = &[
    "Ip6InHdrErrors",
    "Ip6InAddrErrors",
    "Icmp6InCsumErrors",
    "Udp6InCsumErrors",
    "Udp6InErrors",
];

/// How a node's pods are connected to it (see the module documentation for addresses and
/// routes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Pods' veths are ports of bridge `br0`, which holds the gateway addresses (/24, /64);
    /// node-side names `veth<j>`.
    Bridge,
    /// kindnet / the CNI `ptp` plugin: no bridge; every pod's node-side veth (`veth` + 8 hex
    /// digits) carries the gateway 10.244.i.1/32 and fd00:244:i::1/128, and the node routes
    /// each pod's /32 and /128 to its veth.
    Ptp,
    /// Calico: no bridge; node-side veths (`cali` + 11 hex digits) with MAC ee:ee:ee:ee:ee:ee,
    /// no IPv4 address and proxy ARP (pods route via 169.254.1.1), link-local fe80::1 (pods'
    /// IPv6 gateway); the node routes each pod's /32 and /128 to its veth.
    Calico,
    /// The AWS VPC CNI: pods addressed from the node's subnet; node-side veths (`eni` + 11
    /// hex digits) without IPv4 address, pods' gateway 169.254.1.1 by a permanent neighbour
    /// entry; policy rules for the pods (secondary interface pods: their own table).
    AwsVpc,
}

/// The routing table of the secondary network interface (`eth1`) in the `AwsVpc` shape.
pub const VPC_SECONDARY_TABLE: &str = "2";

/// `AwsVpc` shape: the address of network interface `eth<k>` (k >= 1) of node `node`,
/// 192.168.77.(40 + 10k + node).
pub fn vpc_interface_ip4(node: usize, k: usize) -> Ipv4Addr {
    assert!(
        (1..=5).contains(&k) && node < 10,
        "eth1 to eth5 of nodes 0 to 9"
    );
    Ipv4Addr::new(192, 168, 77, (40 + 10 * k + node) as u8)
}

/// Address plan of the `AwsVpc` shape: pod `pod` (0-based) of node `node`, in the LAN's subnet:
/// 192.168.77.(128 + 16 node + pod).
pub fn vpc_pod_ip4(node: usize, pod: usize) -> Ipv4Addr {
    assert!(
        node < 8 && pod < 16 && 128 + 16 * node + pod < 255,
        "the AwsVpc shape has at most 8 nodes of 16 pods (the last one 15)"
    );
    Ipv4Addr::new(192, 168, 77, (128 + 16 * node + pod) as u8)
}

/// fd00:77::(node+1):(pod+2), in the LAN's /64.
pub fn vpc_pod_ip6(node: usize, pod: usize) -> Ipv6Addr {
    assert!(
        node < 8 && pod < 16,
        "the AwsVpc shape has at most 8 nodes of 16 pods"
    );
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, node as u16 + 1, pod as u16 + 2)
}

/// The MAC of every node-side veth in the Calico shape.
pub const CALICO_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The IPv4 gateway of pods in the Calico shape (answered by proxy ARP).
pub const CALICO_GW4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway of pods in the Calico shape, on every node-side veth.
pub const CALICO_GW6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// A fresh node-side interface name for pod `pod` of node `node`, the testbed's `link`-th
/// veth: node, pod and link number in hex after `veth` (8 digits, kindnet's length) or `cali`
/// (11 digits, Calico's).
fn host_if_name(shape: Shape, node: usize, pod: usize, link: u32) -> String {
    assert!(
        node < 0x100 && pod < 0x100,
        "node {node} / pod {pod} out of range"
    );
    match shape {
        Shape::Bridge | Shape::Ptp => {
            assert!(link < 0x1_0000, "at most 65536 veths per testbed");
            format!("veth{node:02x}{pod:02x}{link:04x}")
        }
        Shape::Calico => {
            assert!(link < 0x1000_0000, "at most 2^28 veths per testbed");
            format!("cali{node:02x}{pod:02x}{link:07x}")
        }
        Shape::AwsVpc => {
            assert!(link < 0x1000_0000, "at most 2^28 veths per testbed");
            format!("eni{node:02x}{pod:02x}{link:07x}")
        }
    }
}

/// A node: its namespace (where an agent would run), its LAN addresses, its pods.
pub struct Node {
    /// Dropped first: servers in the node's namespace, then the pods, then the namespace.
    servers: Vec<ChildGuard>,
    pub pods: Vec<Pod>,
    /// `node-a`, `node-b`, ...
    pub name: String,
    pub ns: NetNs,
    /// Its address on the LAN.
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Its network interfaces on the LAN (`eth0`, and in the `AwsVpc` shape `eth1`, ...).
    interfaces: usize,
}

pub struct Testbed {
    // Fields drop in declaration order: the overlay's devices, nodes (their servers, pods,
    // namespaces), then ext, then the LAN; the cgroup last.
    l3_overlay: Option<TunOverlay>,
    pub nodes: Vec<Node>,
    pub ext: NetNs,
    pub lan: NetNs,
    pub cgroup: TestCgroup,
    pub id: String,
    /// How pods are connected to their node.
    pub shape: Shape,
    /// Veths made so far (numbers the node-side names).
    links: u32,
}

/// `ethtool -K DEV rx off tx off` in `ns`: the kernel computes and verifies checksums itself.
fn no_checksum_offload(ns: &NetNs, dev: &str) {
    ns.exec("ethtool", &["-K", dev, "rx", "off", "tx", "off"]);
}

/// Creates `eth0` in `ns`, plugged into `lan0` of `lan` as port `port`; both ends up, without
/// checksum offload.
fn plug_into_lan(lan: &NetNs, ns: &NetNs, port: &str) {
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", &lan.name,
    ]);
    lan.ip(&["link", "set", port, "master", "lan0", "up"]);
    no_checksum_offload(lan, port);
    no_checksum_offload(ns, "eth0");
}

/// Adds `ip4`/24 and `ip6`/64 to `eth0` of `ns` and brings it up.
fn lan_addresses(ns: &NetNs, ip4: Ipv4Addr, ip6: Ipv6Addr) {
    ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
    ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
    ns.ip(&["link", "set", "eth0", "up"]);
}

/// The VXLAN device of node `i` in the overlay (`Testbed::with_vxlan`).
pub const VXLAN_DEVICE: &str = "flannel.1";

/// The address node `i` holds on its VXLAN device: 10.244.i.0 (and fd00:244:i::).
pub fn vxlan_ip4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, u8::try_from(i).expect("at most 256 nodes"), 0)
}

pub fn vxlan_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x244,
        u16::try_from(i).expect("at most 256 nodes"),
        0,
        0,
        0,
        0,
        0,
    )
}

fn vxlan_mac(i: usize) -> String {
    format!("0e:00:00:00:00:{:02x}", lan_octet(i))
}

/// Node `i`'s `flannel.1` and its routes to the pods of the other `count - 1` nodes.
fn add_vxlan(ns: &NetNs, i: usize, count: usize) {
    let local = lan_ip4(i).to_string();
    ns.ip(&[
        "link",
        "add",
        VXLAN_DEVICE,
        "type",
        "vxlan",
        "id",
        "1",
        "dev",
        "eth0",
        "local",
        &local,
        "dstport",
        "8472",
        "nolearning",
    ]);
    ns.ip(&[
        "link",
        "set",
        VXLAN_DEVICE,
        "address",
        &vxlan_mac(i),
        "mtu",
        "1450",
    ]);
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/32", vxlan_ip4(i)),
        "dev",
        VXLAN_DEVICE,
    ]);
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/128", vxlan_ip6(i)),
        "dev",
        VXLAN_DEVICE,
        "nodad",
    ]);
    ns.ip(&["link", "set", VXLAN_DEVICE, "up"]);
    for k in (0..count).filter(|k| *k != i) {
        let (mac, gw4, gw6) = (
            vxlan_mac(k),
            vxlan_ip4(k).to_string(),
            vxlan_ip6(k).to_string(),
        );
        for (family, gw) in [("-4", &gw4), ("-6", &gw6)] {
            ns.ip(&[
                family,
                "neigh",
                "add",
                gw,
                "lladdr",
                &mac,
                "dev",
                VXLAN_DEVICE,
                "nud",
                "permanent",
            ]);
        }
        ns.exec(
            "bridge",
            &[
                "fdb",
                "append",
                &mac,
                "dev",
                VXLAN_DEVICE,
                "dst",
                &lan_ip4(k).to_string(),
            ],
        );
        let (cidr4, cidr6) = pod_cidrs(k);
        ns.ip(&[
            "route",
            "add",
            &cidr4,
            "via",
            &gw4,
            "dev",
            VXLAN_DEVICE,
            "onlink",
        ]);
        ns.ip(&[
            "-6",
            "route",
            "add",
            &cidr6,
            "via",
            &gw6,
            "dev",
            VXLAN_DEVICE,
            "onlink",
        ]);
    }
}

/// How the nodes reach each other's pods.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Overlay {
    /// Routes via the other node's LAN address.
    None,
    Vxlan,
    /// Devices without a link-layer header (`Testbed::with_l3_overlay`).
    L3,
}

/// The overlay device of every node in `Testbed::with_l3_overlay`.
pub const L3_OVERLAY_DEVICE: &str = "wg0";

/// The node whose pod CIDR holds `ip` (10.244.i.0/24, fd00:244:i::/64), or whose LAN address
/// it is (192.168.77.(i+1), fd00:77::(i+1): a test may route one through the overlay).
fn node_of_overlay_address(ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if o[..3] == [192, 168, 77] {
                return usize::from(o[3]).checked_sub(1);
            }
            (o[0] == 10 && o[1] == 244).then_some(usize::from(o[2]))
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if s[..7] == [0xfd00, 0x77, 0, 0, 0, 0, 0] {
                return usize::from(s[7]).checked_sub(1);
            }
            (s[0] == 0xfd00 && s[1] == 0x244 && s[3] == 0).then_some(usize::from(s[2]))
        }
    }
}

/// Node `i`'s `L3_OVERLAY_DEVICE` up, its addresses, and its routes to the pods of the other
/// `count - 1` nodes.
fn add_l3_overlay(ns: &NetNs, i: usize, count: usize) {
    let dev = L3_OVERLAY_DEVICE;
    ns.ip(&["link", "set", dev, "mtu", "1420", "up"]);
    ns.ip(&["addr", "add", &format!("{}/32", vxlan_ip4(i)), "dev", dev]);
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/128", vxlan_ip6(i)),
        "dev",
        dev,
        "nodad",
    ]);
    for k in (0..count).filter(|k| *k != i) {
        let (cidr4, cidr6) = pod_cidrs(k);
        let (gw4, gw6) = (vxlan_ip4(k).to_string(), vxlan_ip6(k).to_string());
        ns.ip(&["route", "add", &cidr4, "via", &gw4, "dev", dev, "onlink"]);
        ns.ip(&[
            "-6", "route", "add", &cidr6, "via", &gw6, "dev", dev, "onlink",
        ]);
    }
}

/// `a`, `b`, ... for node 0, 1, ...
fn node_letter(i: usize) -> char {
    char::from(
        b'a' + u8::try_from(i)
            .ok()
            .filter(|i| *i < 26)
            .expect("at most 26 nodes"),
    )
}

/// Routed shapes: `eth0` of `pod` up at its /32 and /128 addresses.
fn pod_addresses(pod: &Pod) {
    pod.ns
        .ip(&["addr", "add", &format!("{}/32", pod.ip4), "dev", "eth0"]);
    pod.ns.ip(&[
        "addr",
        "add",
        &format!("{}/128", pod.ip6),
        "dev",
        "eth0",
        "nodad",
    ]);
    pod.ns.ip(&["link", "set", "eth0", "up"]);
}

/// Routed shapes: the node routes `pod`'s /32 and /128 to its node-side veth.
fn routes_to_pod(node_ns: &NetNs, pod: &Pod) {
    let dev = pod.host_if.as_str();
    node_ns.ip(&[
        "route",
        "add",
        &format!("{}/32", pod.ip4),
        "dev",
        dev,
        "scope",
        "link",
    ]);
    node_ns.ip(&[
        "-6",
        "route",
        "add",
        &format!("{}/128", pod.ip6),
        "dev",
        dev,
    ]);
}

/// The routed shapes whose pods' gateways are link-local (Calico, AWS VPC): fe80::1/64 on the
/// node-side veth, which comes up; the pod's addresses; in the pod, a link route to 169.254.1.1
/// and default routes via it and fe80::1, with a permanent neighbour entry for the veth's MAC
/// if `static_neighbour` (AWS VPC; else the node answers ARP by proxy); the node's routes to
/// the pod.
fn link_local_gateways(node_ns: &NetNs, pod: &Pod, static_neighbour: bool) {
    let dev = pod.host_if.as_str();
    node_ns.ip(&[
        "addr",
        "add",
        &format!("{CALICO_GW6}/64"),
        "dev",
        dev,
        "nodad",
    ]);
    node_ns.ip(&["link", "set", dev, "up"]);
    pod_addresses(pod);
    let gw4 = CALICO_GW4.to_string();
    pod.ns
        .ip(&["route", "add", &gw4, "dev", "eth0", "scope", "link"]);
    if static_neighbour {
        let mac = node_ns.exec("cat", &[&format!("/sys/class/net/{dev}/address")]);
        pod.ns.ip(&[
            "neigh",
            "add",
            &gw4,
            "lladdr",
            mac.trim(),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }
    pod.ns
        .ip(&["route", "add", "default", "via", &gw4, "dev", "eth0"]);
    pod.ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &CALICO_GW6.to_string(),
        "dev",
        "eth0",
    ]);
    routes_to_pod(node_ns, pod);
}

/// `AwsVpc` shape: plugs the next network interface `eth<k>` of node `i` into the LAN as
/// the CNI attaches one: its address (`vpc_interface_ip4`), its routes in table k + 1 (the
/// subnet's link route, a default route via ext), proxy neighbour answers without delay.
fn plug_vpc_interface(lan: &NetNs, i: usize, node: &mut Node) -> (String, Ipv4Addr) {
    let k = node.interfaces;
    let dev = format!("eth{k}");
    let ip4 = vpc_interface_ip4(i, k);
    let ns = &node.ns;
    let port = format!("v-{}-{k}", node.name);
    ns.ip(&[
        "link", "add", &dev, "type", "veth", "peer", "name", &port, "netns", &lan.name,
    ]);
    lan.ip(&["link", "set", &port, "master", "lan0", "up"]);
    no_checksum_offload(lan, &port);
    no_checksum_offload(ns, &dev);
    ns.sysctl(&format!("net.ipv4.neigh.{dev}.proxy_delay"), "0");
    ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", &dev]);
    ns.ip(&["link", "set", &dev, "up"]);
    let table = (k + 1).to_string();
    ns.ip(&[
        "route",
        "add",
        "192.168.77.0/24",
        "dev",
        &dev,
        "scope",
        "link",
        "table",
        &table,
    ]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        &EXT_IP4.to_string(),
        "dev",
        &dev,
        "table",
        &table,
    ]);
    node.interfaces += 1;
    (dev, ip4)
}

/// The `AwsVpc` shape's rules for `pod`, written once per pod address (they outlive its veth):
/// traffic to it looks up the main table first (priority 512); a pod on the secondary interface
/// (`secondary`) sends through that interface's table (priority 1536); its addresses are
/// answered for by proxy on the interface the VPC delivers them to (IPv4: `eth1` for a
/// secondary pod, else `eth0`; IPv6: `eth0`).
fn vpc_pod_rules(node_ns: &NetNs, pod: &Pod, secondary: bool) {
    let ip4 = pod.ip4.to_string();
    let nic = if secondary { "eth1" } else { "eth0" };
    node_ns.ip(&["neigh", "add", "proxy", &ip4, "dev", nic]);
    node_ns.ip(&[
        "rule", "add", "to", &ip4, "lookup", "main", "priority", "512",
    ]);
    if secondary {
        node_ns.ip(&[
            "rule",
            "add",
            "from",
            &ip4,
            "lookup",
            VPC_SECONDARY_TABLE,
            "priority",
            "1536",
        ]);
    }
    node_ns.ip(&[
        "-6",
        "neigh",
        "add",
        "proxy",
        &pod.ip6.to_string(),
        "dev",
        "eth0",
    ]);
}

/// Reads the error counters of one namespace: (counter, value) for every one in the lists.
fn error_counters(ns: &NetNs) -> Vec<(String, u64)> {
    let mut out = snmp_counters(&ns.exec("cat", &["/proc/net/snmp"]), SNMP_ERRORS);
    out.extend(snmp6_counters(
        &ns.exec("cat", &["/proc/net/snmp6"]),
        SNMP6_ERRORS,
    ));
    out
}

/// /proc/net/snmp: pairs of lines `Group: Name1 Name2 ...` / `Group: v1 v2 ...`.
fn snmp_counters(text: &str, wanted: &[&str]) -> Vec<(String, u64)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((group, names)), Some((_, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            let counter = format!("{group}:{name}");
            if wanted.contains(&counter.as_str()) {
                let value = value
                    .parse()
                    .unwrap_or_else(|e| panic!("bad value of {counter}: {value:?}: {e}"));
                out.push((counter, value));
            }
        }
    }
    out
}

/// /proc/net/snmp6: one `Name value` per line.
fn snmp6_counters(text: &str, wanted: &[&str]) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, value) = (f.next()?, f.next()?);
            wanted.contains(&name).then(|| {
                let value = value
                    .parse()
                    .unwrap_or_else(|e| panic!("bad value of {name}: {value:?}: {e}"));
                (name.to_string(), value)
            })
        })
        .collect()
}

impl Testbed {
    /// Builds a LAN, the external client and one node per entry, node i with
    /// `pods_per_node[i]` pods on a bridge (`Shape::Bridge`). Names are unique to this process
    /// and call.
    pub fn new(pods_per_node: &[usize]) -> Testbed {
        Testbed::with_shape(pods_per_node, Shape::Bridge)
    }

    /// Like `new`, with the pods connected to their nodes as `shape` says.
    pub fn with_shape(pods_per_node: &[usize], shape: Shape) -> Testbed {
        Testbed::build(pods_per_node, shape, Overlay::None)
    }

    /// Like `with_shape`, with the nodes reaching each other's pods through a VXLAN overlay as
    /// flannel's `vxlan` backend sets it up, instead of routes via their LAN addresses: on
    /// each node a VXLAN device `flannel.1` (VNI 1, UDP 8472 over `eth0`, MTU 1450, MAC
    /// 0e:00:00:00:00:<i+1>) holding 10.244.i.0/32 and fd00:244:i::/128; for every other node
    /// k a permanent neighbour entry for 10.244.k.0 and fd00:244:k:: with k's MAC, a
    /// forwarding entry sending that MAC to k's LAN address, and routes to k's pod CIDRs via
    /// 10.244.k.0 / fd00:244:k:: `onlink` through `flannel.1`.
    pub fn with_vxlan(pods_per_node: &[usize], shape: Shape) -> Testbed {
        Testbed::build(pods_per_node, shape, Overlay::Vxlan)
    }

    /// Like `with_vxlan`, through devices without a link-layer header instead, as an ipip or
    /// WireGuard overlay's: on each node a `tun` device `L3_OVERLAY_DEVICE` (MTU 1420)
    /// holding 10.244.i.0/32 and fd00:244:i::/128, routes to every other node k's pod CIDRs via
    /// 10.244.k.0 / fd00:244:k:: `onlink` through it (as Calico's ipip routes are), and a
    /// thread of the test carrying each packet to the node whose pod CIDR holds its
    /// destination, or whose LAN address it is (`tunnel::TunOverlay`).
    pub fn with_l3_overlay(pods_per_node: &[usize], shape: Shape) -> Testbed {
        let mut bed = Testbed::build(pods_per_node, shape, Overlay::L3);
        let nodes: Vec<&NetNs> = bed.nodes.iter().map(|n| &n.ns).collect();
        let overlay = TunOverlay::new(&nodes, L3_OVERLAY_DEVICE, node_of_overlay_address);
        let count = bed.nodes.len();
        for (i, node) in bed.nodes.iter().enumerate() {
            add_l3_overlay(&node.ns, i, count);
        }
        bed.l3_overlay = Some(overlay);
        bed
    }

    fn build(pods_per_node: &[usize], shape: Shape, overlay: Overlay) -> Testbed {
        assert!(
            (1..=26).contains(&pods_per_node.len()),
            "a testbed has 1 to 26 nodes"
        );
        let id = names::unique();
        let cgroup = TestCgroup::new(&id);
        let lan = NetNs::new(format!("{id}-lan"));
        no_dad(&lan);
        lan.ip(&["link", "add", "lan0", "type", "bridge"]);
        lan.ip(&["link", "set", "lan0", "up"]);

        let ext = NetNs::new(format!("{id}-ext"));
        no_dad(&ext);
        plug_into_lan(&lan, &ext, "v-ext");
        lan_addresses(&ext, EXT_IP4, EXT_IP6);
        ext.ip(&[
            "route",
            "add",
            SERVICE_CIDR4,
            "via",
            &lan_ip4(0).to_string(),
        ]);
        ext.ip(&[
            "-6",
            "route",
            "add",
            SERVICE_CIDR6,
            "via",
            &lan_ip6(0).to_string(),
        ]);

        let mut bed = Testbed {
            l3_overlay: None,
            nodes: Vec::new(),
            ext,
            lan,
            cgroup,
            id,
            shape,
            links: 0,
        };
        for (i, &pods) in pods_per_node.iter().enumerate() {
            let node = bed.make_node(i);
            bed.nodes.push(node);
            for _ in 0..pods {
                bed.add_pod(i);
            }
        }
        let count = bed.nodes.len();
        for (i, node) in bed.nodes.iter().enumerate() {
            match overlay {
                Overlay::Vxlan => {
                    add_vxlan(&node.ns, i, count);
                    continue;
                }
                // Routes added with the devices (`with_l3_overlay`).
                Overlay::L3 => continue,
                Overlay::None => {}
            }
            if shape == Shape::AwsVpc {
                // Pods are on the LAN's subnet: no pod CIDRs to route.
                continue;
            }
            for k in (0..count).filter(|k| *k != i) {
                let (cidr4, cidr6) = pod_cidrs(k);
                node.ns
                    .ip(&["route", "add", &cidr4, "via", &lan_ip4(k).to_string()]);
                node.ns
                    .ip(&["-6", "route", "add", &cidr6, "via", &lan_ip6(k).to_string()]);
            }
        }
        bed
    }

    /// Node `i` without pods: its namespace, LAN interface and, in the bridge shape, `br0`.
    fn make_node(&self, i: usize) -> Node {
        let name = format!("node-{}", node_letter(i));
        let ns = NetNs::new(format!("{}-{name}", self.id));
        no_dad(&ns);
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        plug_into_lan(&self.lan, &ns, &format!("v-{name}"));
        let (ip4, ip6) = (lan_ip4(i), lan_ip6(i));
        lan_addresses(&ns, ip4, ip6);
        match self.shape {
            Shape::Bridge => add_bridge(&ns, i),
            Shape::Ptp => {}
            // Proxy ARP answers only for addresses the node routes out of another interface;
            // this stands in for a real node's default route.
            Shape::Calico => {
                ns.ip(&[
                    "route",
                    "add",
                    &format!("{CALICO_GW4}/32"),
                    "dev",
                    "eth0",
                    "scope",
                    "link",
                ]);
            }
            // The VPC's default gateway (ext: it drops what it does not own), the answers
            // to ARP only on the interface holding the address, and proxy neighbour entries
            // answered without delay (`vpc_pod_rules`).
            Shape::AwsVpc => {
                ns.sysctl("net.ipv4.conf.all.arp_ignore", "1");
                ns.sysctl("net.ipv4.conf.all.arp_announce", "2");
                ns.sysctl("net.ipv4.neigh.eth0.proxy_delay", "0");
                ns.sysctl("net.ipv6.conf.eth0.proxy_ndp", "1");
                // Proxy NDP answers wait up to 0.8 s by default (RFC 4861's anycast delay),
                // long enough for a SYN to be sent twice.
                ns.sysctl("net.ipv6.neigh.eth0.proxy_delay", "0");
                let gw4 = EXT_IP4.to_string();
                ns.ip(&["route", "add", "default", "via", &gw4, "dev", "eth0"]);
                let gw6 = EXT_IP6.to_string();
                ns.ip(&["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"]);
            }
        }
        let mut node = Node {
            servers: Vec::new(),
            pods: Vec::new(),
            name,
            ns,
            ip4,
            ip6,
            interfaces: 1,
        };
        if self.shape == Shape::AwsVpc {
            plug_vpc_interface(&self.lan, i, &mut node);
        }
        node
    }

    /// `AwsVpc` shape: attaches another network interface to node `node` (`eth2`, ...), as the
    /// AWS VPC CNI does when the node's pods need more addresses; returns its name and address.
    pub fn add_vpc_interface(&mut self, node: usize) -> (String, Ipv4Addr) {
        assert_eq!(
            self.shape,
            Shape::AwsVpc,
            "network interfaces of the AwsVpc shape"
        );
        plug_vpc_interface(&self.lan, node, &mut self.nodes[node])
    }

    /// Adds the next pod of node `node` (`<letter>-pod-<n>`, the plan's next addresses),
    /// connected as the testbed's shape says; returns its index in `nodes[node].pods`.
    pub fn add_pod(&mut self, node: usize) -> usize {
        let index = self.nodes[node].pods.len();
        let host_if = match self.shape {
            Shape::Bridge => format!("veth{index}"),
            Shape::Ptp | Shape::Calico | Shape::AwsVpc => self.new_host_if(node, index),
        };
        let name = format!("{}-pod-{}", node_letter(node), index + 1);
        let addrs = match self.shape {
            Shape::AwsVpc => (vpc_pod_ip4(node, index), vpc_pod_ip6(node, index)),
            _ => (pod_ip4(node, index), pod_ip6(node, index)),
        };
        let pod = Pod::unlinked(&self.id, name, addrs, host_if);
        self.link_pod(node, &pod);
        if self.shape == Shape::AwsVpc {
            vpc_pod_rules(&self.nodes[node].ns, &pod, index % 2 == 1);
        }
        self.nodes[node].pods.push(pod);
        index
    }

    /// Simulates a restart of pod `pod` of node `node` that keeps its addresses but gets a new
    /// veth: deletes the node-side interface (and with it the pod's `eth0`), makes a new pair
    /// (the same node-side name if `same_name`, else a fresh one) and configures it as at
    /// creation. Servers in the pod keep running (they listen on wildcard addresses);
    /// connections through the old veth are gone.
    ///
    /// The new `eth0` has a new MAC. In the routed shapes nobody remembers the old one (the
    /// node's neighbour entries went with its old veth, other pods talk through the node). On a
    /// bridge the node and the other pods still hold it; the CNI bridge plugin announces the
    /// new one with a gratuitous ARP, here their entries for the pod's addresses are flushed.
    pub fn recreate_pod_link(&mut self, node: usize, pod: usize, same_name: bool) {
        let old = self.nodes[node].pods[pod].host_if.clone();
        self.nodes[node].ns.ip(&["link", "del", &old]);
        let host_if = if same_name {
            old
        } else {
            self.new_host_if(node, pod)
        };
        self.nodes[node].pods[pod].host_if = host_if;
        let n = &self.nodes[node];
        let p = &n.pods[pod];
        self.link_pod(node, p);
        if self.shape == Shape::Bridge {
            let (ip4, ip6) = (p.ip4.to_string(), p.ip6.to_string());
            let others = n.pods.iter().filter(|o| o.name != p.name).map(|o| &o.ns);
            for ns in std::iter::once(&n.ns).chain(others) {
                ns.ip(&["neigh", "flush", "to", &ip4]);
                ns.ip(&["-6", "neigh", "flush", "to", &ip6]);
            }
        }
    }

    /// A node-side interface name not used before in this testbed.
    fn new_host_if(&mut self, node: usize, pod: usize) -> String {
        let name = host_if_name(self.shape, node, pod, self.links);
        self.links += 1;
        name
    }

    /// Makes `pod`'s veth (`eth0` and `pod.host_if` in node `node`) and configures both ends
    /// for the testbed's shape: addresses, routes, sysctls, no checksum offload.
    fn link_pod(&self, node: usize, pod: &Pod) {
        let node_ns = &self.nodes[node].ns;
        let dev = pod.host_if.as_str();
        add_veth(&pod.ns, node_ns, dev);
        match self.shape {
            Shape::Bridge => attach_to_bridge(node_ns, pod, node),
            Shape::Ptp => {
                let (gw4, gw6) = (bridge_ip4(node).to_string(), bridge_ip6(node).to_string());
                node_ns.ip(&["addr", "add", &format!("{gw4}/32"), "dev", dev]);
                node_ns.ip(&["addr", "add", &format!("{gw6}/128"), "dev", dev, "nodad"]);
                node_ns.ip(&["link", "set", dev, "up"]);
                pod_addresses(pod);
                pod.ns
                    .ip(&["route", "add", &gw4, "dev", "eth0", "scope", "link"]);
                pod.ns
                    .ip(&["route", "add", "default", "via", &gw4, "dev", "eth0"]);
                pod.ns.ip(&["-6", "route", "add", &gw6, "dev", "eth0"]);
                pod.ns
                    .ip(&["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"]);
                routes_to_pod(node_ns, pod);
            }
            Shape::Calico => {
                node_ns.ip(&["link", "set", dev, "address", CALICO_MAC]);
                node_ns.sysctl(&format!("net.ipv4.conf.{dev}.proxy_arp"), "1");
                node_ns.sysctl(&format!("net.ipv4.neigh.{dev}.proxy_delay"), "0");
                link_local_gateways(node_ns, pod, false);
            }
            Shape::AwsVpc => link_local_gateways(node_ns, pod, true),
        }
        no_checksum_offload(&pod.ns, "eth0");
        no_checksum_offload(node_ns, dev);
    }

    /// Starts an echo server on `port` in pod `pod` of node `node`; it answers with the pod's
    /// name (`b-pod-1`, ...).
    pub fn serve(&mut self, node: usize, pod: usize, port: u16) {
        self.nodes[node].pods[pod].serve(port);
    }

    /// Starts an echo server on `port` in node `node`'s own namespace (a host-network
    /// process); it answers with the node's name.
    pub fn serve_on_node(&mut self, node: usize, port: u16) {
        let node = &mut self.nodes[node];
        let server = spawn_echo(&node.ns, &node.name, port);
        node.servers.push(server);
    }

    /// Sends `count` requests from namespace `ns`, inside the test cgroup or not.
    pub fn request_from(
        &self,
        ns: &NetNs,
        in_cgroup: bool,
        proto: Proto,
        to: SocketAddr,
        count: usize,
    ) -> Vec<Reply> {
        request_in(ns, in_cgroup.then_some(&self.cgroup), proto, to, count)
    }

    /// Sends `count` requests from the external client (not in the test cgroup).
    pub fn request_ext(&self, proto: Proto, to: SocketAddr, count: usize) -> Vec<Reply> {
        self.request_from(&self.ext, false, proto, to, count)
    }

    /// Opens one TCP connection from namespace `ns` (inside the test cgroup or not) to `to`
    /// and keeps it; returns it with the first reply.
    pub fn hold_from(&self, ns: &NetNs, in_cgroup: bool, to: SocketAddr) -> (Held, Reply) {
        hold_in(ns, in_cgroup.then_some(&self.cgroup), to)
    }

    /// Path of node `i`'s namespace file (for `Agent::netns`).
    pub fn node_ns_path(&self, i: usize) -> String {
        self.nodes[i].ns.path()
    }

    /// Every namespace of the testbed: lan, ext, then each node followed by its pods.
    pub fn namespaces(&self) -> Vec<&NetNs> {
        let mut all = vec![&self.lan, &self.ext];
        for node in &self.nodes {
            all.push(&node.ns);
            all.extend(node.pods.iter().map(|p| &p.ns));
        }
        all
    }

    /// Panics unless `checksum_errors` is empty: no receiver dropped a packet as malformed.
    pub fn assert_no_checksum_errors(&self) {
        let errors = self.checksum_errors();
        assert!(errors.is_empty(), "receivers dropped packets: {errors:?}");
    }

    /// Every nonzero checksum, IP header and IP address error counter, in every namespace:
    /// (namespace, counter, value). Empty when no receiver dropped anything as malformed.
    pub fn checksum_errors(&self) -> Vec<(String, String, u64)> {
        self.namespaces()
            .into_iter()
            .flat_map(|ns| {
                error_counters(ns)
                    .into_iter()
                    .filter(|(_, value)| *value != 0)
                    .map(|(counter, value)| (ns.name.clone(), counter, value))
            })
            .collect()
    }

    pub fn cgroup_path(&self) -> &std::path::Path {
        &self.cgroup.path
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn snmp_counters_pair_names_with_values() {
        let text = "Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors\n\
                    Ip: 1 64 10 2 0\n\
                    Tcp: RtoAlgorithm MaxConn InErrs InCsumErrors\n\
                    Tcp: 1 -1 0 3\n\
                    Udp: InDatagrams InErrors InCsumErrors\n\
                    Udp: 5 1 1\n\
                    UdpLite: InDatagrams InErrors InCsumErrors\n\
                    UdpLite: 0 9 9\n";
        let got = snmp_counters(text, SNMP_ERRORS);
        let want: Vec<(String, u64)> = [
            ("Ip:InHdrErrors", 2),
            ("Ip:InAddrErrors", 0),
            ("Tcp:InErrs", 0),
            ("Tcp:InCsumErrors", 3),
            ("Udp:InErrors", 1),
            ("Udp:InCsumErrors", 1),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn snmp6_counters_read_name_value_lines() {
        let text = "Ip6InReceives                   \t12\nIp6InHdrErrors                  \t1\nUdp6InCsumErrors                \t0\nUdpLite6InCsumErrors            \t4\n";
        let got = snmp6_counters(text, SNMP6_ERRORS);
        assert_eq!(
            got,
            vec![
                ("Ip6InHdrErrors".to_string(), 1),
                ("Udp6InCsumErrors".to_string(), 0)
            ]
        );
    }

    #[test]
    fn host_if_names_fit_and_look_like_the_cnis() {
        assert_eq!(host_if_name(Shape::Ptp, 1, 2, 3), "veth01020003");
        assert_eq!(host_if_name(Shape::Bridge, 0, 0, 0x1f), "veth0000001f");
        assert_eq!(host_if_name(Shape::Calico, 25, 252, 7), "cali19fc0000007");
        assert_eq!(host_if_name(Shape::AwsVpc, 1, 0, 9), "eni01000000009");
        for (shape, prefix, digits) in [
            (Shape::Ptp, "veth", 8),
            (Shape::Calico, "cali", 11),
            (Shape::AwsVpc, "eni", 11),
        ] {
            let name = host_if_name(shape, 25, 252, 0xffff);
            assert!(name.len() <= 15, "{name}");
            let hex = name.strip_prefix(prefix).expect(prefix);
            assert_eq!(hex.len(), digits, "{name}");
            assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
        }
    }

    #[test]
    fn address_plan() {
        assert_eq!(lan_ip4(1).to_string(), "192.168.77.2");
        assert_eq!(lan_ip6(0).to_string(), "fd00:77::1");
        assert_eq!(EXT_IP6.to_string(), "fd00:77::100");
        assert_eq!(vpc_pod_ip4(0, 1).to_string(), "192.168.77.129");
        assert_eq!(vpc_pod_ip4(1, 0).to_string(), "192.168.77.144");
        assert_eq!(vpc_pod_ip6(1, 0).to_string(), "fd00:77::2:2");
        assert_eq!(vpc_interface_ip4(0, 1).to_string(), "192.168.77.50");
        assert_eq!(vpc_interface_ip4(1, 2).to_string(), "192.168.77.61");
        assert_eq!(
            pod_cidrs(0),
            ("10.244.0.0/24".to_string(), "fd00:244::/64".to_string())
        );
        assert_eq!(
            pod_cidrs(1),
            ("10.244.1.0/24".to_string(), "fd00:244:1::/64".to_string())
        );
    }
}
