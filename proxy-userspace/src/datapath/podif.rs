//! Pod-facing interfaces: which interfaces must carry the tc program so that replies of local
//! backends (and pod traffic to external frontends) are translated, found from the kernel's
//! routes to local endpoints and the node's pod CIDRs, from names and from name patterns; and the
//! thread that keeps the program on exactly those interfaces as pods come and go.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_common::info::{
    IFACE_BRIDGE, IFACE_EXTERNAL, IFACE_KEPT, IFACE_NAMED, IFACE_NO_LINK_HEADER, IFACE_PATTERN,
    IFACE_POD_CIDR, IFACE_POD_ROUTE, IFACE_REMOTE_ROUTE,
};

use super::{
    netlink::{Events, Link, RouteHit, Rtnl},
    tclinks::{self, AttachError, TcLinks},
};
use crate::{
    compile::Cidr,
    metrics::{Metrics, Series},
};

/// One entry of `--pod-interfaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// Interfaces the kernel routes local endpoints and the pod CIDRs through.
    Auto,
    /// One interface by name.
    Name(String),
    /// Interfaces whose names match a glob (`*` and `?`), e.g. `cali*`.
    Pattern(String),
}

/// The parsed `--pod-interfaces`: empty means none (tc only on the external interfaces).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInterfaces(pub Vec<Selector>);

impl PodInterfaces {
    /// Parses the flag's values: `auto`, interface names, glob patterns; `none` or an empty
    /// value alone turns pod interfaces off.
    pub fn parse(values: &[String]) -> Result<PodInterfaces, String> {
        let mut out = Vec::new();
        for v in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
            let selector = if v == "auto" {
                Selector::Auto
            } else if v == "none" {
                continue;
            } else if v.contains(['*', '?']) {
                if v.len() > 64 {
                    return Err(format!("pattern {v:?} is too long"));
                }
                Selector::Pattern(v.to_string())
            } else if v.len() >= 16 || v.contains(['/', ' ']) {
                return Err(format!(
                    "{v:?} is not an interface name (at most 15 bytes, no '/')"
                ));
            } else {
                Selector::Name(v.to_string())
            };
            if !out.contains(&selector) {
                out.push(selector);
            }
        }
        Ok(PodInterfaces(out))
    }

    pub fn auto(&self) -> bool {
        self.0.contains(&Selector::Auto)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|s| match s {
            Selector::Name(n) => Some(n.as_str()),
            _ => None,
        })
    }

    fn patterns(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|s| match s {
            Selector::Pattern(p) => Some(p.as_str()),
            _ => None,
        })
    }
}

/// Shell-style match of `name` against `pattern` (`*` any run, `?` one byte).
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// Why an interface carries the program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    External,
    Named,
    /// The route to this local endpoint leaves here.
    Route(IpAddr),
    /// The route to the node's pod CIDR leaves here.
    PodCidr(Cidr),
    Pattern(String),
    /// This bridge has a selected port (`port`), selected because of `because`.
    Bridge {
        port: String,
        because: Box<Why>,
    },
    /// Carried the program under the previous agent; kept until the cluster has been read.
    Kept,
    /// The route to this endpoint on another node leaves here, through a device other than
    /// an external interface (an overlay's tunnel): replies of masqueraded flows to it come
    /// back here.
    RemoteRoute(IpAddr),
}

impl Why {
    /// The `LB_IFACES` record of interface `name` (index `index`), flagged when the device has
    /// no link-layer header (`l3`).
    pub fn info(&self, name: &str, index: u32, l3: bool) -> proxy_common::info::IfaceInfo {
        let (why, addr, via) = match self {
            Why::External => (IFACE_EXTERNAL, None, None),
            Why::Named => (IFACE_NAMED, None, None),
            Why::Kept => (IFACE_KEPT, None, None),
            Why::RemoteRoute(a) => (IFACE_REMOTE_ROUTE, Some((*a, full_len(a))), None),
            Why::Route(a) => (IFACE_POD_ROUTE, Some((*a, full_len(a))), None),
            Why::PodCidr(c) => (IFACE_POD_CIDR, Some((c.addr, c.len)), None),
            Why::Pattern(p) => (IFACE_PATTERN, None, Some(p.as_str())),
            Why::Bridge { port, because } => {
                let addr = match because.as_ref() {
                    Why::Route(a) => Some((*a, full_len(a))),
                    _ => None,
                };
                (IFACE_BRIDGE, addr, Some(port.as_str()))
            }
        };
        let why = if l3 { why | IFACE_NO_LINK_HEADER } else { why };
        tclinks::iface_info(name, index, why, addr, via)
    }
}

fn full_len(a: &IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::External => write!(f, "external"),
            Why::Named => write!(f, "pod: named in --pod-interfaces"),
            Why::Route(a) => write!(f, "pod: route to endpoint {a}"),
            Why::PodCidr(c) => write!(f, "pod: route to pod CIDR {c}"),
            Why::Pattern(p) => write!(f, "pod: name matches pattern {p}"),
            Why::Bridge { port, because } => write!(f, "bridge of {port} ({because})"),
            Why::Kept => write!(f, "kept from the previous agent until endpoints are read"),
            Why::RemoteRoute(a) => write!(f, "route to remote endpoint {a}"),
        }
    }
}

/// Where the external interfaces (tc for traffic from outside the node) come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum External {
    /// `--external-interfaces`: these names, attached whenever they exist (also when one
    /// appears after the start).
    Named(Vec<String>),
    /// The interfaces of the default routes, in every routing table (`Rtnl::
    /// default_route_interfaces`), and those holding the Node object's addresses, looked up
    /// again at every pass: a network interface that comes later (the AWS VPC CNI attaches one
    /// when pods need more addresses) gets tc too. One stays external until it disappears.
    DefaultRoutes,
}

/// The names of the interfaces `indexes` (those of the default routes, or holding a node
/// address) that can be external: Ethernet devices (not the loopback, not a device without an
/// Ethernet header, such as a VPN's `tun`, WireGuard or xfrm device, whose default route lives
/// in a table of its own).
pub fn default_route_names(links: &[Link], indexes: &[u32]) -> Vec<String> {
    links
        .iter()
        .filter(|l| indexes.contains(&l.index) && !l.loopback && l.ether)
        .map(|l| l.name.clone())
        .collect()
}

/// Without `--external-interfaces`: the interfaces holding one of the node's NodePort
/// addresses `nodeport`, such as a second network without a default route (kube-proxy serves a
/// NodePort on every such address, whichever interface the packet arrives on: semantics 7.1,
/// 7.2). `addresses` are (interface index, address, prefix length). Left out, as facing pods or
/// tunnels rather than a network outside the node: an address inside a pod CIDR, a host
/// prefix (/32, /128: the gateway a ptp CNI puts on every pod's veth, a VXLAN device's), an
/// address more than one interface holds, and what `may_face_outside` refuses.
pub fn nodeport_interfaces(
    links: &[Link],
    addresses: &[(u32, IpAddr, u8)],
    nodeport: &[IpAddr],
    pod_cidrs: &[Cidr],
) -> Vec<String> {
    let indexes: Vec<u32> = addresses
        .iter()
        .filter(|(index, ip, len)| {
            let host = if ip.is_ipv4() { 32 } else { 128 };
            *len < host
                && nodeport.contains(ip)
                && !pod_facing_address(*index, ip, addresses, pod_cidrs)
        })
        .map(|(index, _, _)| *index)
        .collect();
    default_route_names(links, &indexes)
        .into_iter()
        .filter(|name| {
            links
                .iter()
                .any(|l| &l.name == name && may_face_outside(l, links))
        })
        .collect()
}

/// `nodeport_interfaces`, and those of `before` (the last pass's) that still exist and neither
/// their kind and place (`may_face_outside`) nor their addresses (one inside a pod CIDR, or one
/// another interface holds too) say face pods: an address that goes for a moment (a DHCP
/// client, a network restart) must not cut the flows arriving there.
pub fn nodeport_interfaces_kept(
    links: &[Link],
    addresses: &[(u32, IpAddr, u8)],
    nodeport: &[IpAddr],
    pod_cidrs: &[Cidr],
    before: &[String],
) -> Vec<String> {
    let mut names = nodeport_interfaces(links, addresses, nodeport, pod_cidrs);
    for name in before {
        let Some(link) = links.iter().find(|l| &l.name == name) else {
            continue;
        };
        let faces_pods = addresses.iter().any(|(index, ip, _)| {
            *index == link.index && pod_facing_address(*index, ip, addresses, pod_cidrs)
        });
        if !names.contains(name) && may_face_outside(link, links) && !faces_pods {
            names.push(name.clone());
        }
    }
    names.sort();
    names
}

/// Whether address `ip` of interface `index` says the interface faces pods: it lies inside a
/// pod CIDR (a pod bridge's gateway), or another interface holds it too (a gateway on every
/// pod's link).
fn pod_facing_address(
    index: u32,
    ip: &IpAddr,
    addresses: &[(u32, IpAddr, u8)],
    pod_cidrs: &[Cidr],
) -> bool {
    pod_cidrs.iter().any(|c| c.contains(ip))
        || addresses
            .iter()
            .any(|(other, same, _)| same == ip && *other != index)
}

/// Device kinds that face pods or carry an overlay, never a network outside the node: Open
/// vSwitch internal ports (the pod gateways of OVN-Kubernetes `ovn-k8s-mp0`, OpenShift SDN
/// `tun0`, Kube-OVN `ovn0`, Antrea `antrea-gw0`), overlay tunnels, and the ends of pods'
/// links.
const POD_OR_OVERLAY_KINDS: &[&str] = &[
    "openvswitch",
    "vxlan",
    "geneve",
    "gretap",
    "ip6gretap",
    "erspan",
    "ip6erspan",
    "bareudp",
    "netkit",
];

/// Whether `link` may be an interface where traffic from outside the node arrives, as far as
/// its kind and place say: not a device without an Ethernet header, not one of
/// `POD_OR_OVERLAY_KINDS`, not enslaved (a bridge's or a bond's port: its master is the
/// interface), not a bridge with a veth port (a pod or container bridge).
fn may_face_outside(link: &Link, links: &[Link]) -> bool {
    let kind = link.kind.as_deref();
    let pod_bridge = kind == Some("bridge")
        && links
            .iter()
            .any(|port| port.master == Some(link.index) && port.kind.as_deref() == Some("veth"));
    let refused = link.loopback
        || !link.ether
        || l3_tunnel(link)
        || kind.is_some_and(|k| POD_OR_OVERLAY_KINDS.contains(&k))
        || link.master.is_some()
        || pod_bridge;
    !refused
}

fn l3_tunnel(link: &Link) -> bool {
    link.kind
        .as_deref()
        .is_some_and(|k| L3_TUNNELS.contains(&k))
}

/// An interface that should carry the program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub index: u32,
    pub why: Why,
}

/// What the discovery found: the interfaces to carry the program (by name), and the names
/// given in `--pod-interfaces` that do not exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    pub wanted: BTreeMap<String, Wanted>,
    pub missing: Vec<String>,
}

/// Inputs of the discovery that come from the cluster: this node's endpoint addresses and pod
/// CIDRs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterInputs {
    pub endpoints: BTreeSet<IpAddr>,
    pub pod_cidrs: Vec<Cidr>,
    /// Endpoints on other nodes, one per pod-CIDR-sized prefix (`NodeInfo::remote_probes`).
    pub remote: BTreeSet<IpAddr>,
    /// This node's addresses in its Node object (`NodeInfo::primary`): without
    /// `--external-interfaces`, the interfaces holding them are external too, as those of the
    /// default routes are (a node without a default route still gets its NodePorts).
    pub node_ips: Vec<IpAddr>,
    /// The node's NodePort addresses (`--nodeport-addresses` applied to its addresses): without
    /// `--external-interfaces`, the interfaces holding them get tc too (`nodeport_interfaces`).
    pub nodeport_ips: Vec<IpAddr>,
}

/// A few addresses inside `cidr` to ask the routing table about (the network address itself
/// and the first hosts: one of them is the gateway, which is local).
fn probes(cidr: &Cidr) -> Vec<IpAddr> {
    let count: u128 = match (cidr.addr, cidr.len) {
        (IpAddr::V4(_), l) => 1u128 << (32 - l.min(32)).min(2),
        (IpAddr::V6(_), l) => 1u128 << (128 - l.min(128)).min(2),
    };
    (0..count)
        .filter_map(|i| match cidr.addr {
            IpAddr::V4(a) => u32::from(a)
                .checked_add(i as u32)
                .map(|v| IpAddr::from(std::net::Ipv4Addr::from(v))),
            IpAddr::V6(a) => u128::from(a)
                .checked_add(i)
                .map(|v| IpAddr::from(std::net::Ipv6Addr::from(v))),
        })
        .collect()
}

/// Kinds of devices without an Ethernet header whose packets start with their IP header at tc
/// ingress, which `tc_ingress_l3` reads: ipip, IPv6 tunnels, WireGuard, tun. Not GRE: one
/// without a fixed remote end keeps its outer headers in front of the packet as its link-layer
/// header; nor others of unknown shape (IPoIB's 20-byte header).
const L3_READABLE: &[&str] = &["ipip", "ip6tnl", "sit", "wireguard", "tun"];

/// Whether `link`, a device without an Ethernet header, is of a kind `tc_ingress_l3` reads
/// (`L3_READABLE`).
fn readable_l3(link: &Link) -> bool {
    link.kind
        .as_deref()
        .is_some_and(|k| L3_READABLE.contains(&k))
}

/// Device kinds without an Ethernet header: never external interfaces.
const L3_TUNNELS: &[&str] = &["ipip", "ip6tnl", "sit", "gre", "ip6gre", "wireguard", "tun"];

/// Decides which interfaces carry the program, first reason first: `external` ones (named, or
/// those of the default routes and the Node's addresses), the named ones, `by_address` ones
/// (external too: holding a NodePort address, `nodeport_interfaces`) unless a pattern names
/// them, those the kernel routes local endpoints and pod CIDRs through directly (`auto`;
/// routes via a gateway lead elsewhere, local routes to the node itself), and those matching a
/// pattern. A selected bridge port is replaced by its bridge. `route` answers `ip route get`.
pub fn discover(
    spec: &PodInterfaces,
    links: &[Link],
    external: &[String],
    by_address: &[String],
    inputs: &ClusterInputs,
    route: &mut dyn FnMut(IpAddr) -> RouteHit,
) -> Discovery {
    let by_index: BTreeMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
    let by_name: BTreeMap<&str, &Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
    let mut out = Discovery::default();
    let add = |out: &mut Discovery, link: &Link, why: Why| {
        if link.loopback {
            return;
        }
        let (link, why) = match link.master.and_then(|m| by_index.get(&m)) {
            Some(bridge) if bridge.kind.as_deref() == Some("bridge") => (
                *bridge,
                Why::Bridge {
                    port: link.name.clone(),
                    because: Box::new(why),
                },
            ),
            _ => (link, why),
        };
        out.wanted.entry(link.name.clone()).or_insert(Wanted {
            index: link.index,
            why,
        });
    };
    for name in external {
        if let Some(link) = by_name.get(name.as_str()) {
            out.wanted.entry(name.clone()).or_insert(Wanted {
                index: link.index,
                why: Why::External,
            });
        }
    }
    for name in spec.names() {
        match by_name.get(name) {
            Some(link) => {
                out.wanted.entry(name.to_string()).or_insert(Wanted {
                    index: link.index,
                    why: Why::Named,
                });
            }
            None => out.missing.push(name.to_string()),
        }
    }
    for name in by_address {
        if let Some(link) = by_name.get(name.as_str())
            && !spec.patterns().any(|p| glob(p, name))
        {
            out.wanted.entry(name.clone()).or_insert(Wanted {
                index: link.index,
                why: Why::External,
            });
        }
    }
    if spec.auto() {
        for ep in &inputs.endpoints {
            if let RouteHit::Direct { oif } = route(*ep)
                && let Some(link) = by_index.get(&oif)
            {
                add(&mut out, link, Why::Route(*ep));
            }
        }
        for cidr in &inputs.pod_cidrs {
            for probe in probes(cidr) {
                if let RouteHit::Direct { oif } = route(probe)
                    && let Some(link) = by_index.get(&oif)
                {
                    add(&mut out, link, Why::PodCidr(*cidr));
                    break;
                }
            }
        }
        // Overlays: the masquerading address of a flow to a remote backend is the tunnel
        // device's, so the replies arrive there. A device without an Ethernet header gets
        // `tc_ingress_l3` (`TcLinks::attach`) if it is of a kind whose packets start with their
        // IP header at tc (`L3_READABLE`).
        for ep in &inputs.remote {
            if let RouteHit::Direct { oif } | RouteHit::Gateway { oif } = route(*ep)
                && let Some(link) = by_index.get(&oif)
                && !out.wanted.contains_key(&link.name)
                && (link.ether || readable_l3(link))
            {
                add(&mut out, link, Why::RemoteRoute(*ep));
            }
        }
    }
    for pattern in spec.patterns() {
        for link in links.iter().filter(|l| glob(pattern, &l.name)) {
            add(&mut out, link, Why::Pattern(pattern.to_string()));
        }
    }
    out
}

/// The local endpoints whose replies cannot be translated yet: the kernel routes them
/// directly out of an interface (or a bridge port) that does not carry the program.
/// Endpoints on the node itself, behind a gateway, or unreachable are never waiting.
pub fn waiting(
    endpoints: &BTreeSet<IpAddr>,
    attached: &BTreeSet<u32>,
    links: &[Link],
    route: &mut dyn FnMut(IpAddr) -> RouteHit,
) -> BTreeSet<IpAddr> {
    let master: BTreeMap<u32, Option<u32>> = links.iter().map(|l| (l.index, l.master)).collect();
    endpoints
        .iter()
        .copied()
        .filter(|ep| match route(*ep) {
            RouteHit::Direct { oif } => {
                let bridge = master.get(&oif).copied().flatten();
                !attached.contains(&oif) && !bridge.is_some_and(|b| attached.contains(&b))
            }
            _ => false,
        })
        .collect()
}

/// What the manager thread shares with the rest of the agent without taking its lock.
#[derive(Default)]
pub struct Shared {
    /// Bumped whenever the interfaces carrying the program or the waiting endpoints change.
    pub generation: AtomicU64,
}

/// The routing tables are dumped for their default routes at most this often.
const DEFAULT_ROUTES_EVERY: Duration = Duration::from_secs(1);

/// How often everything is looked at again even without a netlink event (a lost event, an
/// attach that failed for a transient reason).
const RESCAN: Duration = Duration::from_secs(5);

/// Keeps the tc program on the wanted interfaces: attaches on new ones, re-attaches on
/// interfaces recreated under the same name, detaches from interfaces no longer wanted, and
/// forgets interfaces that disappeared.
pub struct Manager {
    spec: PodInterfaces,
    external: External,
    /// The external interfaces of the last pass (kept when the routes cannot be read).
    external_now: Vec<String>,
    /// The default routes' interfaces as last read, and when (read at most once per
    /// `DEFAULT_ROUTES_EVERY`: a burst of route events on a node with large routing tables
    /// must not dump every table at each one).
    default_routes: Option<(Instant, Vec<u32>)>,
    /// The interfaces holding a NodePort address (`nodeport_interfaces`) as of the last pass.
    by_address: Vec<String>,
    links: TcLinks,
    rtnl: Rtnl,
    /// What is attached: name → (index, why).
    state: BTreeMap<String, (u32, Why)>,
    inputs: ClusterInputs,
    shared: Arc<Shared>,
    metrics: Option<Arc<Metrics>>,
    /// (interface, reason) pairs already logged, so a failing interface logs once.
    logged: BTreeSet<(String, String)>,
    /// Named interfaces already reported missing.
    missing_logged: BTreeSet<String>,
    /// Named interfaces recorded as missing in `LB_IFACES`.
    missing_recorded: Vec<String>,
    /// Whether the cluster inputs have been set once (until then, earlier links are kept).
    have_inputs: bool,
    /// The local endpoints whose interface does not carry the program, as of the last pass.
    waiting: BTreeSet<IpAddr>,
}

impl Manager {
    pub fn new(
        pin_dir: &std::path::Path,
        spec: PodInterfaces,
        external: External,
        metrics: Option<Arc<Metrics>>,
    ) -> anyhow::Result<Manager> {
        Ok(Manager {
            spec,
            external,
            external_now: Vec::new(),
            default_routes: None,
            by_address: Vec::new(),
            links: TcLinks::open(pin_dir)?,
            rtnl: Rtnl::new()?,
            state: BTreeMap::new(),
            inputs: ClusterInputs::default(),
            shared: Arc::default(),
            metrics,
            logged: BTreeSet::new(),
            missing_logged: BTreeSet::new(),
            // Not a name: the first pass replaces whatever an earlier agent recorded.
            missing_recorded: vec!["/".into()],
            have_inputs: false,
            waiting: BTreeSet::new(),
        })
    }

    /// The external interfaces found at start (the default routes' ones), kept until a pass
    /// reads them again: a failed first read must not detach what an earlier agent attached.
    pub fn seed_external(&mut self, names: &[String]) {
        self.external_now = names.to_vec();
    }

    /// The node's NodePort addresses as read at start, until the first `set_inputs`: the
    /// interfaces holding them are external from the first pass on (an earlier agent's links
    /// there stay).
    pub fn seed_nodeport_ips(&mut self, ips: Vec<IpAddr>) {
        self.inputs.nodeport_ips = ips;
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// One pass: discover, then make the links match. Returns whether the attached set or the
    /// waiting endpoints changed (then `Shared::generation` was bumped).
    pub fn reconcile(&mut self) -> bool {
        let links = match self.rtnl.links() {
            Ok(l) => l,
            Err(e) => {
                log::warn!("pod interfaces: cannot list links: {e}");
                return false;
            }
        };
        // The node's addresses, once per pass (without `--external-interfaces` only).
        let addresses = match &self.external {
            External::Named(_) => Ok(Vec::new()),
            External::DefaultRoutes => self.rtnl.prefixes(),
        };
        let external = match &self.external {
            External::Named(names) => names.clone(),
            External::DefaultRoutes => match self.default_route_or_node_ip_interfaces(&addresses) {
                Ok(indexes) => {
                    let mut names = default_route_names(&links, &indexes);
                    // Once external, an interface stays so while it exists: a network restart
                    // or a DHCP client takes the default route away for a moment, and without
                    // tc meanwhile the replies of translated flows arriving there would not be
                    // translated back.
                    for name in &self.external_now {
                        if !names.contains(name) && links.iter().any(|l| &l.name == name) {
                            names.push(name.clone());
                        }
                    }
                    names.sort();
                    names
                }
                Err(e) => {
                    log::warn!("external interfaces: cannot read the default routes: {e}");
                    self.external_now.clone()
                }
            },
        };
        if external != self.external_now {
            if self.external == External::DefaultRoutes {
                log::info!("external interfaces (default routes, every table): {external:?}");
            }
            self.external_now = external;
        }
        // Interfaces holding a NodePort address, kept while their address is away a moment
        // (`nodeport_interfaces_kept`).
        let by_address = match (&self.external, &addresses) {
            (External::Named(_), _) => Vec::new(),
            (External::DefaultRoutes, Ok(addresses)) => nodeport_interfaces_kept(
                &links,
                addresses,
                &self.inputs.nodeport_ips,
                &self.inputs.pod_cidrs,
                &self.by_address,
            ),
            (External::DefaultRoutes, Err(e)) => {
                log::warn!("external interfaces: cannot read the node's addresses: {e}");
                self.by_address.clone()
            }
        };
        let rtnl = &mut self.rtnl;
        // Each address's route is asked once per pass, for the discovery and for `waiting`.
        let mut routes: BTreeMap<IpAddr, RouteHit> = BTreeMap::new();
        let mut route = |a: IpAddr| {
            *routes
                .entry(a)
                .or_insert_with(|| rtnl.route_get(a).unwrap_or(RouteHit::None))
        };
        let mut found = discover(
            &self.spec,
            &links,
            &self.external_now,
            &by_address,
            &self.inputs,
            &mut route,
        );
        if by_address != self.by_address {
            log::info!("external interfaces (holding a NodePort address): {by_address:?}");
            self.by_address = by_address;
        }
        if !self.have_inputs && self.spec.auto() {
            // Until this node's endpoints are known, the links an earlier agent left on live
            // interfaces stay (with this agent's program swapped in): dropping them would cut
            // the replies of local backends during a restart.
            for (name, state) in self.links.pinned() {
                if let Some(s) = state
                    && s.ifindex != 0
                    && links.iter().any(|l| l.index == s.ifindex && l.name == name)
                {
                    found.wanted.entry(name).or_insert(Wanted {
                        index: s.ifindex,
                        why: Why::Kept,
                    });
                }
            }
        }
        for name in &found.missing {
            if self.missing_logged.insert(name.clone()) {
                log::warn!(
                    "interface {name} (--pod-interfaces) does not exist yet; tc is attached when \
                     it appears"
                );
            }
        }
        if found.missing != self.missing_recorded {
            self.links.record_missing(&found.missing);
            self.missing_recorded = found.missing.clone();
        }
        self.missing_logged.retain(|n| found.missing.contains(n));
        let before: BTreeSet<u32> = self.state.values().map(|(i, _)| *i).collect();
        // Links of earlier agents or of interfaces that are gone or no longer wanted.
        for (name, link) in self.links.pinned() {
            if !self.state.contains_key(&name) && !found.wanted.contains_key(&name) {
                log::info!("tc: removing the stale link on {name}");
                self.links.detach(&name, link.map(|s| s.ifindex));
            }
        }
        // Devices without an Ethernet header, by index: those `tc_ingress_l3` reads, and the
        // others (GRE, IPoIB), which get no program (a name or pattern may select them).
        let without_header = |readable: bool| -> BTreeSet<u32> {
            links
                .iter()
                .filter(|l| !l.ether && !l.loopback && readable_l3(l) == readable)
                .map(|l| l.index)
                .collect()
        };
        let (l3, unreadable) = (without_header(true), without_header(false));
        let attached: Vec<(String, (u32, Why))> =
            std::mem::take(&mut self.state).into_iter().collect();
        for (name, (index, why)) in attached {
            match found.wanted.get(&name) {
                Some(w) if w.index == index => {
                    if w.why != why {
                        self.links
                            .record(w.why.info(&name, index, l3.contains(&index)));
                    }
                    self.state.insert(name, (index, w.why.clone()));
                }
                Some(_) => {
                    log::info!(
                        "tc: {name} was recreated (index {index} is gone); attaching to the new one"
                    );
                    self.links.detach(&name, Some(index));
                }
                None => {
                    let gone = !links.iter().any(|l| l.index == index);
                    if gone {
                        log::info!("tc: {name} is gone ({why}); forgetting it");
                    } else {
                        log::info!("tc: detaching from {name}: no longer wanted");
                    }
                    self.links.detach(&name, Some(index));
                }
            }
        }
        for (name, w) in &found.wanted {
            if self.state.contains_key(name) {
                continue;
            }
            if unreadable.contains(&w.index) {
                if let Some(m) = &self.metrics {
                    m.interface_attach_failures
                        .with(&[("reason", "unreadable")])
                        .inc();
                }
                if self.logged.insert((name.clone(), "unreadable".to_string())) {
                    log::warn!(
                        "not attaching tc to {name} ({}): a device without an Ethernet header \
                         whose packets the programs cannot read (only ipip, ip6tnl, sit, \
                         WireGuard and tun are); NodePort, externalIP and load balancer traffic \
                         through it is not translated",
                        w.why
                    );
                }
                continue;
            }
            let started = Instant::now();
            let no_link_header = l3.contains(&w.index);
            let info = w.why.info(name, w.index, no_link_header);
            match self.links.attach(name, w.index, info, no_link_header) {
                Ok(kept) => {
                    log::info!(
                        "tc {} {name} ({}) in {:?}",
                        if kept {
                            "kept on, program replaced in place:"
                        } else {
                            "attached at ingress of"
                        },
                        w.why,
                        started.elapsed()
                    );
                    self.logged.retain(|(n, _)| n != name);
                    self.state.insert(name.clone(), (w.index, w.why.clone()));
                }
                Err(AttachError::Gone) => {
                    log::debug!("tc: {name} went away before the program was attached");
                }
                Err(e) => {
                    if let Some(m) = &self.metrics {
                        m.interface_attach_failures
                            .with(&[("reason", e.reason())])
                            .inc();
                    }
                    if self.logged.insert((name.clone(), e.reason().to_string())) {
                        log::warn!(
                            "cannot attach tc to {name} ({}): {e}; NodePort, externalIP and load \
                             balancer traffic through it is not translated",
                            w.why
                        );
                    }
                }
            }
        }
        let live: BTreeMap<String, u32> = self
            .state
            .iter()
            .map(|(n, (i, _))| (n.clone(), *i))
            .collect();
        self.links.forget_stale(&live);
        let after: BTreeSet<u32> = live.values().copied().collect();
        let waiting = waiting(&self.inputs.endpoints, &after, &links, &mut route);
        let waiting_changed = waiting != self.waiting;
        self.waiting = waiting;
        if let Some(m) = &self.metrics {
            let pods = self
                .state
                .values()
                .filter(|(_, w)| *w != Why::External)
                .count();
            m.pod_interfaces.with(&[]).set(pods as u64);
        }
        if after != before || waiting_changed {
            self.shared.generation.fetch_add(1, Ordering::Release);
            true
        } else {
            false
        }
    }

    /// The interfaces of the default routes and those holding one of the Node object's
    /// addresses (`addresses`: the node's, with their interfaces and prefix lengths).
    fn default_route_or_node_ip_interfaces(
        &mut self,
        addresses: &std::io::Result<Vec<(u32, IpAddr, u8)>>,
    ) -> std::io::Result<Vec<u32>> {
        let mut indexes = match &self.default_routes {
            Some((at, indexes)) if at.elapsed() < DEFAULT_ROUTES_EVERY => indexes.clone(),
            _ => {
                let indexes = self.rtnl.default_route_interfaces()?;
                self.default_routes = Some((Instant::now(), indexes.clone()));
                indexes
            }
        };
        if !self.inputs.node_ips.is_empty() {
            let addresses = addresses
                .as_ref()
                .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
            indexes.extend(
                addresses
                    .iter()
                    .filter(|(_, ip, _)| self.inputs.node_ips.contains(ip))
                    .map(|(index, _, _)| *index),
            );
        }
        Ok(indexes)
    }

    /// The names attached now, for the start-up log line.
    pub fn attached_names(&self) -> Vec<String> {
        self.state.keys().cloned().collect()
    }

    /// Sets this node's endpoints and pod CIDRs; reconciles at once when they changed, so a
    /// new local endpoint's interface carries the program before the endpoint is programmed.
    pub fn set_inputs(&mut self, inputs: ClusterInputs) -> bool {
        if inputs == self.inputs && self.have_inputs {
            return false;
        }
        self.inputs = inputs;
        self.have_inputs = true;
        self.reconcile()
    }

    /// The local endpoints (of the last `set_inputs`) whose interface does not carry the
    /// program yet, as of the last pass (which every change of the inputs, and every netlink
    /// event, triggers).
    pub fn waiting(&self) -> &BTreeSet<IpAddr> {
        &self.waiting
    }

    /// Reconciles `manager` on its own thread at every netlink link, address or route event,
    /// and every few seconds.
    pub fn follow(manager: Arc<Mutex<Manager>>) -> anyhow::Result<()> {
        let mut events = Events::subscribe()?;
        std::thread::Builder::new()
            .name("pod-interfaces".into())
            .spawn(move || {
                loop {
                    events.wait(RESCAN);
                    manager.lock().expect("manager lock").reconcile();
                }
            })?;
        Ok(())
    }
}

/// Computes `waiting` with a fresh netlink socket (for `verify` and `explain`, which read what
/// the agent attached from its pins).
pub fn waiting_now(
    pin_dir: &std::path::Path,
    endpoints: &BTreeSet<IpAddr>,
) -> anyhow::Result<BTreeSet<IpAddr>> {
    let mut rtnl = Rtnl::new()?;
    let links = rtnl.links()?;
    let attached: BTreeSet<u32> = tclinks::live_links(pin_dir)
        .values()
        .map(|s| s.ifindex)
        .collect();
    if attached.is_empty() {
        // tc runs nowhere: nothing is translated at tc, so nothing waits for it.
        return Ok(BTreeSet::new());
    }
    Ok(waiting(endpoints, &attached, &links, &mut |a| {
        rtnl.route_get(a).unwrap_or(RouteHit::None)
    }))
}

/// A node-side view for `verify`: interfaces that should carry the program (by `spec`) but
/// do not, with why they should; also those whose link carries this agent's program for the
/// other kind of device (`tc_ingress` on a device without a link-layer header, or
/// `tc_ingress_l3` on an Ethernet one), which misreads every packet there.
pub fn unattached(
    pin_dir: &std::path::Path,
    spec: &PodInterfaces,
    inputs: &ClusterInputs,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut rtnl = Rtnl::new()?;
    let links = rtnl.links()?;
    let found = discover(spec, &links, &[], &[], inputs, &mut |a| {
        rtnl.route_get(a).unwrap_or(RouteHit::None)
    });
    let live = tclinks::live_links(pin_dir);
    let program = |file: &str| {
        aya::programs::ProgramInfo::from_pin(pin_dir.join(file))
            .ok()
            .map(|i| i.id())
    };
    let (ether, l3) = (
        program(tclinks::TC_PROGRAM_PIN),
        program(tclinks::TC_L3_PROGRAM_PIN),
    );
    let no_link_header: BTreeSet<u32> =
        links.iter().filter(|l| !l.ether).map(|l| l.index).collect();
    Ok(found
        .wanted
        .into_iter()
        .filter_map(|(name, w)| match live.get(&name) {
            // Only this agent's program of the other kind counts: right after a start or an
            // upgrade, links still run the earlier agent's programs for a moment.
            Some(s) if s.ifindex == w.index => {
                let (other, runs, needs) = if no_link_header.contains(&w.index) {
                    (ether, tclinks::TC_PROGRAM_PIN, tclinks::TC_L3_PROGRAM_PIN)
                } else {
                    (l3, tclinks::TC_L3_PROGRAM_PIN, tclinks::TC_PROGRAM_PIN)
                };
                other.is_some_and(|id| id == s.program_id).then(|| {
                    let why = format!("{}; its link runs {runs} instead of {needs}", w.why);
                    (name, why)
                })
            }
            _ => Some((name, w.why.to_string())),
        })
        .collect())
}

#[cfg(test)]
mod tests;
