//! PURE: Kubernetes objects → the frontends and backends the datapath must hold, following
//! kube-proxy's rules (../shared/kube-proxy-semantics.md). No I/O, no clock.

mod eligibility;
mod endpoints;
pub mod explain;

mod incremental;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::ObjectMeta};

pub use self::eligibility::{Categorized, categorize};
pub use self::endpoints::Endpoint;
pub use self::incremental::{
    Compiler, MAX_SLOTS, Totals, Update, count_by_family, slot_chunks, slot_count, slot_turns,
    source_range_entries,
};
pub use crate::model::{Cidr, Scheduler};
use crate::objects::Slice;
use crate::snapshot::{NodeInfo, ProxyConfig, Snapshot};

/// Layer-4 protocol of a Service port.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// Parses a Kubernetes protocol name; absent means TCP (the API default).
    pub fn parse(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => proxy_common::proto::TCP,
            Proto::Udp => proxy_common::proto::UDP,
            Proto::Sctp => proxy_common::proto::SCTP,
        }
    }
    pub fn from_number(n: u8) -> Option<Proto> {
        [Proto::Tcp, Proto::Udp, Proto::Sctp]
            .into_iter()
            .find(|p| p.number() == n)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }
}

/// IP family of a proxier (semantics 1.4, 10.3).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    pub fn api_name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// A Service port in one family: kube-proxy's ServicePortName plus the family.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's name, "" when unnamed.
    pub port: String,
    pub proto: Proto,
    pub family: Family,
}

impl fmt::Display for PortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.proto.as_str())?;
        if self.family == Family::V6 {
            write!(f, "/v6")?;
        }
        Ok(())
    }
}

/// Where a frontend comes from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

/// The per-Service scheduler annotation.
pub const SCHEDULER_ANNOTATION: &str = "kube-bpf-proxy.io/scheduler";
/// The per-Service backend weights annotation: `IP=WEIGHT, ...` (default weight 1).
pub const WEIGHTS_ANNOTATION: &str = "kube-bpf-proxy.io/weights";
/// Largest weight (a backend holds one slot per unit of weight).
pub const MAX_WEIGHT: u16 = 100;

/// Which traffic a frontend serves (semantics 4.1).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Connections made on this node (pods and host processes), at the socket hooks.
    #[default]
    Internal,
    /// Packets arriving from elsewhere, at tc on the node's interfaces.
    External,
}

/// One address:port/protocol clients reach a Service port at, for one traffic scope.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

impl FrontendAddr {
    /// The first frontend of `addr` in key order, for ranges over one address.
    pub fn lowest(addr: IpAddr) -> Self {
        FrontendAddr {
            addr,
            port: 0,
            proto: Proto::Tcp,
            scope: Scope::Internal,
        }
    }

    pub fn internal(addr: IpAddr, port: u16, proto: Proto) -> Self {
        FrontendAddr {
            addr,
            port,
            proto,
            scope: Scope::Internal,
        }
    }
}

/// A `loadBalancerSourceRanges` entry as kube-proxy's ParseCIDRSloppy reads it: trimmed, a
/// prefix length required (a bare address is no CIDR and is dropped, semantics 7.8), leading
/// zeros in IPv4 octets accepted; host bits cleared.
pub fn source_range(raw: &str) -> Option<Cidr> {
    let (addr, len) = raw.trim().split_once('/')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let addr = crate::objects::parse_sloppy(addr)?;
    Cidr::parse(&format!("{addr}/{len}"))
}

/// A load balancer IP's allowed sources: the Service's ranges and, when kube-proxy's node IP
/// of the VIP's family lies inside one of them, the VIP itself (semantics 7.9: a VIP assigned
/// on the node makes host traffic loop back with the VIP as its source). That node IP is
/// `node_primary`'s of the family (`NodeInfo::node_ips`: a specific `--bind-address`, else the
/// Node object's primary address), or loopback without one, as kube-proxy assumes then
/// (semantics 10.2); not the NodePort addresses.
fn with_node_exception(ranges: &[Cidr], vip: IpAddr, node_primary: &[IpAddr]) -> Vec<Cidr> {
    let mut out = ranges.to_vec();
    let family = Family::of(&vip);
    let node_ip = node_primary
        .iter()
        .copied()
        .find(|a| Family::of(a) == family)
        .unwrap_or(match family {
            Family::V4 => IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
            Family::V6 => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        });
    if ranges.iter().any(|r| r.contains(&node_ip)) {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        let own = Cidr { addr: vip, len };
        if !out.contains(&own) {
            out.push(own);
        }
    }
    out
}

/// The node addresses NodePorts are served on: every address of the node except loopback and
/// IPv6 link-local ones (semantics 7.1), restricted to `cidrs` where `cidrs` has prefixes of
/// the address's family (semantics 7.2).
pub fn nodeport_addresses(all: &[IpAddr], cidrs: &[Cidr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = all
        .iter()
        .copied()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| !matches!(ip, IpAddr::V6(a) if a.is_unicast_link_local()))
        .filter(|ip| {
            let mine: Vec<&Cidr> = cidrs
                .iter()
                .filter(|c| Family::of(&c.addr) == Family::of(ip))
                .collect();
            mine.is_empty() || mine.iter().any(|c| c.contains(ip))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `--nodeport-addresses`: CIDRs, and whether `primary` was named, with `--bind-address`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePortSelection {
    pub cidrs: Vec<Cidr>,
    /// `primary`: the node's primary address of each family (semantics 7.3).
    pub primary: bool,
    /// `--bind-address`: when a specific address, the primary address of its family
    /// (semantics 10.2).
    pub bind_address: Option<IpAddr>,
}

impl NodePortSelection {
    /// Parses the flag's values: CIDRs (a bare address is a host prefix) and `primary`; empty
    /// values are skipped.
    pub fn parse(values: &[String], bind_address: Option<IpAddr>) -> Result<Self, String> {
        let mut out = NodePortSelection {
            bind_address,
            ..Default::default()
        };
        for raw in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
            if raw == "primary" {
                out.primary = true;
            } else {
                out.cidrs
                    .push(Cidr::parse(raw).ok_or_else(|| format!("{raw:?} is not a CIDR"))?);
            }
        }
        // kube-proxy's validation refuses the mix (semantics 7.3).
        if out.primary && !out.cidrs.is_empty() {
            return Err("can't use both 'primary' and CIDRs".into());
        }
        Ok(out)
    }

    /// kube-proxy's node IPs (semantics 7.9, 10.2): a specific `--bind-address` stands for
    /// its family's, else the Node object's primary address (`node_primary`) of the family.
    pub fn node_ips(&self, node_primary: &[IpAddr]) -> Vec<IpAddr> {
        let Some(bind) = self.bind_address.filter(|a| !a.is_unspecified()) else {
            return node_primary.to_vec();
        };
        let mut out = vec![bind];
        out.extend(
            node_primary
                .iter()
                .filter(|a| Family::of(a) != Family::of(&bind)),
        );
        out
    }

    /// The prefixes node addresses are filtered by ([`nodeport_addresses`]). With `primary`,
    /// each family adds its primary address as a host prefix: `--bind-address` when specific,
    /// else the Node object's (`node_primary`, [`NodeInfo::primary`]); a family with neither
    /// adds its loopback address, which is never served, so it serves no NodePort (kube-proxy
    /// assumes 127.0.0.1 and ::1 then, semantics 10.2).
    pub fn prefixes(&self, node_primary: &[IpAddr]) -> Vec<Cidr> {
        let mut out = self.cidrs.clone();
        if self.primary {
            let node_ips = self.node_ips(node_primary);
            for loopback in [
                IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ] {
                let family = Family::of(&loopback);
                let primary = node_ips
                    .iter()
                    .copied()
                    .find(|a| Family::of(a) == family)
                    .unwrap_or(loopback);
                let len = if primary.is_ipv4() { 32 } else { 128 };
                out.push(Cidr { addr: primary, len });
            }
        }
        out
    }
}

impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scope == Scope::External {
            write!(f, "external ")?;
        }
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto.as_str()),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto.as_str()),
        }
    }
}

/// A backend as the datapath sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub local: bool,
    pub terminating: bool,
    /// Relative weight; Kubernetes endpoints all have 1.
    pub weight: u16,
}

/// What one frontend must do at the socket layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    pub port: PortName,
    pub kind: FrontendKind,
    /// The backends new connections may go to; empty means reject or drop.
    pub backends: Vec<Backend>,
    /// Serving endpoints of the port that new connections may not use (terminating while
    /// another is ready, another zone's by topology, a remote one under a Local policy):
    /// flows already on them keep them (semantics 9.3). The plan keeps their members (and
    /// those of `backends` under an earlier entry), without slots.
    pub keep_flows: Vec<Backend>,
    /// `Some(timeout)` with sessionAffinity ClientIP.
    pub affinity_secs: Option<u32>,
    /// Empty because of a Local traffic policy although endpoints exist elsewhere: drop, not
    /// reject (semantics 3.8, 3.9).
    pub no_local: bool,
    /// Masquerade clients to a node address (externalTrafficPolicy Cluster, semantics 7.13):
    /// every client from outside (external scope); pods reaching an externalIP, load balancer
    /// IP or NodePort of this node (internal scope: such a pod is left to tc on its interface,
    /// when it has one).
    pub snat: bool,
    /// loadBalancerSourceRanges of a load balancer frontend (semantics 7.8); empty: any source.
    pub source_ranges: Vec<Cidr>,
    pub scheduler: Scheduler,
}

/// Everything known about one Service port in one family, for every traffic class; the
/// socket-layer frontends are derived from it, the packet paths will use the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: PortName,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub lb_ips: Vec<IpAddr>,
    pub source_ranges: Vec<Cidr>,
    pub health_check_node_port: Option<u16>,
    pub itp_local: bool,
    pub etp_local: bool,
    pub affinity_secs: Option<u32>,
    pub scheduler: Scheduler,
    /// Backend weights by address (annotation `kube-bpf-proxy.io/weights`); others weigh 1.
    pub weights: BTreeMap<IpAddr, u16>,
    pub endpoints: Categorized,
}

/// An object (or part of one) that was not programmed, and why. Logged and counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `Kind namespace/name`.
    pub object: String,
    /// What is wrong, as a value to count and match on.
    pub reason: ProblemReason,
    /// What is wrong and what is done instead, for people.
    pub message: String,
}

/// Why an object (or part of one) is not programmed as written. Each has a stable name (the
/// metrics' `reason` label, `status` and the logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemReason {
    /// Missing metadata or spec, or a malformed object.
    InvalidObject,
    /// Another object of the same kind and name (a different uid) wins.
    DuplicateObject,
    /// clusterIP/clusterIPs do not give an address of a family the Service lists.
    InvalidClusterIp,
    /// An externalIP or load balancer ingress IP that is not an IP address.
    InvalidAddress,
    /// A port with an impossible number, an unknown protocol or a duplicate name.
    InvalidPort,
    /// A loadBalancerSourceRanges entry that is not a CIDR.
    InvalidSourceRange,
    /// sessionAffinityConfig out of range.
    InvalidAffinity,
    /// A kube-bpf-proxy.io annotation that cannot be read.
    InvalidAnnotation,
    /// LoadBalancer with externalTrafficPolicy Local and no healthCheckNodePort.
    MissingHealthCheck,
    /// An EndpointSlice addressType this proxy does not serve.
    UnsupportedAddressType,
    /// Endpoints without an address, or with one that is not an IP of the slice's family.
    InvalidEndpoint,
    /// The same endpoint twice for one port.
    DuplicateEndpoint,
    /// A frontend address or health check port another Service holds.
    Conflict,
    /// The maps have no room for the Service.
    Capacity,
    /// The maps refused a write for this Service (it keeps its previous state).
    WriteFailed,
    /// A port of a protocol the data path does not translate (SCTP): programmed, not served.
    UnsupportedProtocol,
}

impl ProblemReason {
    pub const ALL: [ProblemReason; 16] = [
        ProblemReason::InvalidObject,
        ProblemReason::DuplicateObject,
        ProblemReason::InvalidClusterIp,
        ProblemReason::InvalidAddress,
        ProblemReason::InvalidPort,
        ProblemReason::InvalidSourceRange,
        ProblemReason::InvalidAffinity,
        ProblemReason::InvalidAnnotation,
        ProblemReason::MissingHealthCheck,
        ProblemReason::UnsupportedAddressType,
        ProblemReason::InvalidEndpoint,
        ProblemReason::DuplicateEndpoint,
        ProblemReason::Conflict,
        ProblemReason::Capacity,
        ProblemReason::WriteFailed,
        ProblemReason::UnsupportedProtocol,
    ];

    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemReason::InvalidObject => "invalid_object",
            ProblemReason::DuplicateObject => "duplicate_object",
            ProblemReason::InvalidClusterIp => "invalid_cluster_ip",
            ProblemReason::InvalidAddress => "invalid_address",
            ProblemReason::InvalidPort => "invalid_port",
            ProblemReason::InvalidSourceRange => "invalid_source_range",
            ProblemReason::InvalidAffinity => "invalid_affinity",
            ProblemReason::InvalidAnnotation => "invalid_annotation",
            ProblemReason::MissingHealthCheck => "missing_health_check",
            ProblemReason::UnsupportedAddressType => "unsupported_address_type",
            ProblemReason::InvalidEndpoint => "invalid_endpoint",
            ProblemReason::DuplicateEndpoint => "duplicate_endpoint",
            ProblemReason::Conflict => "conflict",
            ProblemReason::Capacity => "capacity",
            ProblemReason::WriteFailed => "write_failed",
            ProblemReason::UnsupportedProtocol => "unsupported_protocol",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// The result of compiling a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendAddr, FrontendState>,
    pub ports: BTreeMap<PortName, ServicePort>,
    pub problems: Vec<Problem>,
    /// Entries of every Maglev table.
    pub maglev_size: u32,
    /// The ServiceCIDRs' ranges: an address inside one that is no ClusterIP is dropped
    /// (nftables mode, semantics 3.12).
    pub service_cidrs: Vec<Cidr>,
}

/// PURE: the ranges of `Snapshot::service_cidrs` without the addresses in `foreign`; a CIDR
/// that does not parse is logged and left out (the others still count), as kube-proxy skips
/// what it cannot parse (semantics 12.8).
pub fn service_cidrs(raw: &[String], foreign: &BTreeSet<IpAddr>) -> Vec<Cidr> {
    let mut out = Vec::new();
    for text in raw {
        match Cidr::parse(text) {
            Some(c) if text.contains('/') => out.push(c),
            _ => log::warn!("ServiceCIDR range {text:?} is not a CIDR; left out"),
        }
    }
    out.sort();
    out.dedup();
    // Another service proxy's ClusterIPs are cut out: kube-proxy drops unallocated addresses
    // only after DNAT, so the other proxy's rules have translated its own ones by then.
    let mut cut = Vec::new();
    for family in [true, false] {
        let mut ranges: Vec<Cidr> = out
            .iter()
            .filter(|c| c.addr.is_ipv4() == family)
            .copied()
            .collect();
        ranges.dedup_by(|b, a| a.len <= b.len && a.contains(&b.addr));
        for ip in foreign.iter().filter(|ip| ip.is_ipv4() == family) {
            ranges = ranges.iter().flat_map(|c| c.without(ip)).collect();
            if ranges.len() > MAX_SERVICE_CIDR_RANGES {
                break;
            }
        }
        if ranges.len() > MAX_SERVICE_CIDR_RANGES {
            log::warn!(
                "ServiceCIDRs of IPv{}: {} ClusterIPs of other service proxies would need more \
                 than {MAX_SERVICE_CIDR_RANGES} ranges; unallocated addresses of this family \
                 are not dropped",
                if family { 4 } else { 6 },
                foreign.iter().filter(|ip| ip.is_ipv4() == family).count(),
            );
            continue;
        }
        cut.extend(ranges);
    }
    cut.sort();
    cut
}

/// The most ServiceCIDR ranges of one family, ClusterIPs of other proxies cut out (each cut
/// adds up to 32 or 128).
const MAX_SERVICE_CIDR_RANGES: usize = 8192;

/// The ClusterIPs of `svc` if another service proxy serves it (label
/// `service.kubernetes.io/service-proxy-name`, semantics 1.1): their traffic is left to that
/// proxy, not dropped as unallocated (3.12).
pub fn foreign_cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let elsewhere = crate::objects::served_elsewhere(svc);
    let Some(spec) = svc.spec.as_ref().filter(|_| elsewhere) else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| crate::objects::parse_lenient(ip))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// One Service's share of the desired state (`compile_one`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceOut {
    /// `Service namespace/name`, for problems found when merging.
    pub object: String,
    pub frontends: BTreeMap<FrontendAddr, FrontendState>,
    pub ports: BTreeMap<PortName, ServicePort>,
    pub problems: Vec<Problem>,
}

/// Default ClientIP affinity timeout (semantics 6.1).
pub const DEFAULT_AFFINITY_SECS: u32 = 10_800;

/// Compiles a snapshot into the desired datapath state, from scratch: what an incremental
/// `Compiler` fed any sequence of snapshots ending in this one holds.
pub fn compile(snapshot: &Snapshot) -> Desired {
    let mut compiler = Compiler::default();
    compiler.update(snapshot);
    compiler.into_desired()
}

/// One Service compiled alone: from the Service, its EndpointSlices (in name order) and the
/// node-level inputs, nothing else. Frontends another Service claimed first are resolved when
/// the outputs are merged (`Compiler`).
pub fn compile_one(
    svc: &Service,
    slices: &[&Slice],
    node: &NodeInfo,
    config: &ProxyConfig,
) -> ServiceOut {
    let mut desired = Desired::default();
    let index = endpoints::SliceIndex::build(slices.to_vec(), &node.name, &mut desired.problems);
    compile_service(svc, &index, node, config, &mut desired);
    ServiceOut {
        object: object_name("Service", &svc.metadata),
        frontends: desired.frontends,
        ports: desired.ports,
        problems: desired.problems,
    }
}

/// Problems of EndpointSlices that belong to no Service (or name none): found by the same
/// checks as a Service's slices.
fn slice_problems(slices: &[&Slice], node: &NodeInfo) -> Vec<Problem> {
    let mut problems = Vec::new();
    endpoints::SliceIndex::build(slices.to_vec(), &node.name, &mut problems);
    problems
}

/// The objects sorted by namespace/name with one object per name. A snapshot can hold two
/// objects of one name (a manifest directory with an old and a new copy, a Service deleted and
/// recreated while a source still holds the old one): the newest by creationTimestamp is kept,
/// ties broken by uid and then by content, so the input order never matters; the others are
/// reported.
fn unique<'a, K: Object>(
    objects: &'a [Arc<K>],
    kind: &str,
    problems: &mut Vec<Problem>,
) -> Vec<&'a Arc<K>> {
    let same_name = |a: &K, b: &K| {
        let (ma, mb) = (a.object_meta(), b.object_meta());
        ma.namespace == mb.namespace && ma.name == mb.name
    };
    let mut sorted: Vec<&Arc<K>> = objects.iter().collect();
    sorted.sort_by(|a, b| {
        let (ma, mb) = (a.object_meta(), b.object_meta());
        (&ma.namespace, &ma.name)
            .cmp(&(&mb.namespace, &mb.name))
            // Newest first.
            .then_with(|| mb.creation_timestamp.cmp(&ma.creation_timestamp))
            .then_with(|| ma.uid.cmp(&mb.uid))
            .then_with(|| {
                if Arc::ptr_eq(a, b) {
                    return std::cmp::Ordering::Equal;
                }
                a.content().cmp(&b.content())
            })
    });
    let mut out: Vec<&Arc<K>> = Vec::with_capacity(sorted.len());
    for object in sorted {
        match out.last() {
            Some(kept) if same_name(kept, object) => {
                // Identical copies (the same file read twice) are harmless.
                if !Arc::ptr_eq(kept, object) && kept.content() != object.content() {
                    let uid = |o: &K| o.object_meta().uid.clone().unwrap_or_else(|| "none".into());
                    let why = if kept.object_meta().creation_timestamp
                        == object.object_meta().creation_timestamp
                    {
                        "same creationTimestamp, first by uid and content"
                    } else {
                        "the newest"
                    };
                    problems.push(Problem {
                        reason: ProblemReason::DuplicateObject,
                        object: object_name(kind, object.object_meta()),
                        message: format!(
                            "another object of this name exists (uid {} ignored, uid {} used: {why})",
                            uid(object),
                            uid(kept)
                        ),
                    });
                }
            }
            _ => out.push(object),
        }
    }
    out
}

/// What `unique` needs of an object kind.
pub trait Object {
    fn object_meta(&self) -> &ObjectMeta;
    /// The object's content as text: copies of one name are told apart and ordered by it.
    fn content(&self) -> String;
}

impl Object for Service {
    fn object_meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn content(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Object for Slice {
    fn object_meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn content(&self) -> String {
        format!("{self:?}")
    }
}

fn object_name(kind: &str, meta: &ObjectMeta) -> String {
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// Why a Service is not proxied at all, if it is not (semantics 1.1, 1.3).
fn skip_reason(svc: &Service) -> Option<&'static str> {
    let labels = svc.metadata.labels.as_ref();
    if let Some(label) = crate::objects::HIDING_LABELS
        .into_iter()
        .find(|k| labels.is_some_and(|l| l.contains_key(*k)))
    {
        return Some(label);
    }
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some("type ExternalName");
    }
    match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => Some("headless (no cluster IP)"),
        Some(_) => None,
    }
}

/// The cluster IP of `family`, if the Service has one (semantics 1.4).
fn cluster_ip_of(svc: &Service, family: Family, problems: &mut Vec<Problem>) -> Option<IpAddr> {
    let spec = svc.spec.as_ref()?;
    let families = spec.ip_families.as_deref().unwrap_or_default();
    let problem = |message: String| Problem {
        reason: ProblemReason::InvalidClusterIp,
        object: object_name("Service", &svc.metadata),
        message,
    };
    let (raw, what) = if families.is_empty() {
        (spec.cluster_ip.clone()?, "cluster IP".to_string())
    } else {
        // Only the clusterIPs entry at the family's index counts; no fallback to clusterIP
        // when clusterIPs is shorter (kube-proxy's GetClusterIPByFamily).
        let idx = families.iter().position(|f| f == family.api_name())?;
        match spec.cluster_ips.as_ref().and_then(|ips| ips.get(idx)) {
            Some(raw) => (raw.clone(), format!("clusterIPs[{idx}]")),
            None => {
                problems.push(problem(format!(
                    "ipFamilies[{idx}] is {} but clusterIPs has no entry {idx}; not proxied in {}",
                    family.api_name(),
                    family.api_name()
                )));
                return None;
            }
        }
    };
    // Parsed as kube-proxy's ParseIPSloppy does (leading zeros accepted).
    match crate::objects::parse_lenient(&raw).ok_or(()) {
        Ok(ip) if Family::of(&ip) == family => Some(ip),
        // A single-stack Service of the other family (empty ipFamilies): not ours.
        Ok(_) if families.is_empty() => None,
        Ok(ip) => {
            problems.push(problem(format!(
                "{what} {ip} is not {} as ipFamilies says; not proxied in {}",
                family.api_name(),
                family.api_name()
            )));
            None
        }
        Err(_) => {
            problems.push(problem(format!(
                "{what} {raw:?} is not an IP address; not proxied in {}",
                if families.is_empty() {
                    "any family"
                } else {
                    family.api_name()
                }
            )));
            None
        }
    }
}

/// Parses a list of addresses, keeping those of `family`; unparsable ones are problems
/// (semantics 7.6, 12.8).
fn ips_of_family<'a>(
    raw: impl Iterator<Item = &'a str>,
    family: Family,
    what: &str,
    object: &str,
    problems: &mut Vec<Problem>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    // Empty entries are skipped without a word, as kube-proxy's MapIPsByIPFamily does; the
    // others are parsed as its ParseIPSloppy does (leading zeros accepted).
    for s in raw.filter(|s| !s.trim().is_empty()) {
        match crate::objects::parse_lenient(s).ok_or(()) {
            Ok(ip) if Family::of(&ip) == family => {
                if !out.contains(&ip) {
                    out.push(ip)
                }
            }
            Ok(_) => {}
            Err(_) => problems.push(Problem {
                reason: ProblemReason::InvalidAddress,
                object: object.to_string(),
                message: format!("{what} {s:?} is not an IP address; ignored"),
            }),
        }
    }
    out
}

fn compile_service(
    svc: &Service,
    index: &endpoints::SliceIndex,
    node: &NodeInfo,
    config: &ProxyConfig,
    desired: &mut Desired,
) {
    let object = object_name("Service", &svc.metadata);
    if skip_reason(svc).is_some() {
        return;
    }
    let (Some(spec), Some(namespace), Some(name)) = (
        svc.spec.as_ref(),
        svc.metadata.namespace.as_deref(),
        svc.metadata.name.as_deref(),
    ) else {
        desired.problems.push(Problem {
            reason: ProblemReason::InvalidObject,
            object,
            message: "no spec, namespace or name".into(),
        });
        return;
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    // semantics 6.1: the API defaults the timeout and rejects values outside 1-86400.
    let affinity_secs = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match timeout {
            None => DEFAULT_AFFINITY_SECS,
            Some(t @ 1..=86_400) => t as u32,
            Some(t) => {
                desired.problems.push(Problem {
                    reason: ProblemReason::InvalidAffinity,
                    object: object.clone(),
                    message: format!(
                        "sessionAffinity timeoutSeconds {t} is not in 1-86400; using {DEFAULT_AFFINITY_SECS}"
                    ),
                });
                DEFAULT_AFFINITY_SECS
            }
        }
    });
    let annotation = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SCHEDULER_ANNOTATION));
    let scheduler = match annotation.map(|a| Scheduler::parse(a)) {
        None => config.scheduler,
        Some(Ok(s)) => s,
        Some(Err(why)) => {
            desired.problems.push(Problem {
                reason: ProblemReason::InvalidAnnotation,
                object: object.clone(),
                message: format!(
                    "annotation {SCHEDULER_ANNOTATION}: {why}; using the default, {}",
                    config.scheduler.as_str()
                ),
            });
            config.scheduler
        }
    };
    let weights = weights_of(svc, &object, &mut desired.problems);
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let has_external_ips = spec.external_ips.as_ref().is_some_and(|e| !e.is_empty());
    // semantics 4.2
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local")
        && (matches!(svc_type, "LoadBalancer" | "NodePort") || has_external_ips);
    // semantics 8.1, 12.8: a missing or invalid healthCheckNodePort is logged; the Service is
    // still served, without a health check.
    let needs_health_check = svc_type == "LoadBalancer" && etp_local;
    let health_check_node_port = needs_health_check
        .then_some(spec.health_check_node_port)
        .flatten()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    if needs_health_check && health_check_node_port.is_none() {
        desired.problems.push(Problem {
            reason: ProblemReason::MissingHealthCheck,
            object: object.clone(),
            message: match spec.health_check_node_port {
                None => "LoadBalancer with externalTrafficPolicy Local has no \
                         healthCheckNodePort; served without a health check"
                    .to_string(),
                Some(p) => format!(
                    "healthCheckNodePort {p} is not in 1-65535; served without a health check"
                ),
            },
        });
    }

    for family in [Family::V4, Family::V6] {
        let Some(cluster_ip) = cluster_ip_of(svc, family, &mut desired.problems) else {
            continue;
        };
        let external_ips = ips_of_family(
            spec.external_ips.iter().flatten().map(String::as_str),
            family,
            "externalIP",
            &object,
            &mut desired.problems,
        );
        // semantics 7.7: status IPs only, hostname-only entries ignored; only ipMode nil or VIP
        // is programmed (kube-proxy's IsVIPMode), so Proxy and unknown modes are skipped.
        let lb_ips = ips_of_family(
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter(|i| matches!(i.ip_mode.as_deref(), None | Some("VIP")))
                .filter_map(|i| i.ip.as_deref()),
            family,
            "load balancer IP",
            &object,
            &mut desired.problems,
        );
        // semantics 7.8: trimmed; invalid and other-family prefixes dropped.
        let mut source_ranges = Vec::new();
        for raw in spec.load_balancer_source_ranges.iter().flatten() {
            match source_range(raw) {
                Some(c) if Family::of(&c.addr) == family => source_ranges.push(c),
                Some(_) => {}
                None => desired.problems.push(Problem {
                    reason: ProblemReason::InvalidSourceRange,
                    object: object.clone(),
                    message: format!(
                        "loadBalancerSourceRanges entry {raw:?} is not a CIDR; ignored"
                    ),
                }),
            }
        }
        // kube-proxy keys a Service's ports by (name, protocol) in a map filled in spec order,
        // so of two ports with one key the later one is programmed (semantics 2.1).
        let ports: &[k8s_openapi::api::core::v1::ServicePort] =
            spec.ports.as_deref().unwrap_or(&[]);
        let last_of_key: std::collections::HashMap<(&str, Option<Proto>), usize> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let key = (
                    p.name.as_deref().unwrap_or(""),
                    Proto::parse(p.protocol.as_deref()),
                );
                (key, i)
            })
            .collect();
        for (i, port) in ports.iter().enumerate() {
            let Some(proto) = Proto::parse(port.protocol.as_deref()) else {
                desired.problems.push(Problem {
                    reason: ProblemReason::InvalidPort,
                    object: object.clone(),
                    message: format!(
                        "port {:?}: unknown protocol {:?}; port ignored",
                        port.name.as_deref().unwrap_or(""),
                        port.protocol.as_deref().unwrap_or("")
                    ),
                });
                continue;
            };
            let Ok(number) = u16::try_from(port.port)
                .map_err(|_| ())
                .and_then(|p| if p == 0 { Err(()) } else { Ok(p) })
            else {
                desired.problems.push(Problem {
                    reason: ProblemReason::InvalidPort,
                    object: object.clone(),
                    message: format!("port {} is not in 1-65535; port ignored", port.port),
                });
                continue;
            };
            let port_name = port.name.clone().unwrap_or_default();
            if proto == Proto::Sctp {
                // semantics 12.1: kube-proxy serves SCTP; this data path cannot (README).
                desired.problems.push(Problem {
                    reason: ProblemReason::UnsupportedProtocol,
                    object: object.clone(),
                    message: format!(
                        "port {port_name:?} ({number}/SCTP) is not served: the kernel runs no \
                         socket hooks for SCTP sockets and tc does not translate SCTP; its \
                         frontends are programmed, but connections to them leave untranslated"
                    ),
                });
            }
            if last_of_key.get(&(port_name.as_str(), Some(proto))) != Some(&i) {
                desired.problems.push(Problem {
                    reason: ProblemReason::InvalidPort,
                    object: object.clone(),
                    message: format!(
                        "duplicate port name {port_name:?}/{}: port {number} ignored, the later \
                         one is used",
                        proto.as_str()
                    ),
                });
                continue;
            }
            let name = PortName {
                namespace: namespace.to_string(),
                name: name.to_string(),
                port: port_name,
                proto,
                family,
            };
            let node_port = match port.node_port.unwrap_or(0) {
                0 => None,
                p => {
                    let valid = u16::try_from(p).ok();
                    if valid.is_none() {
                        desired.problems.push(Problem {
                            reason: ProblemReason::InvalidPort,
                            object: object.clone(),
                            message: format!(
                                "port {:?}: nodePort {p} is not in 1-65535; no NodePort",
                                name.port
                            ),
                        });
                    }
                    valid
                }
            };
            let externally_accessible =
                node_port.is_some() || !lb_ips.is_empty() || !external_ips.is_empty();
            let mut endpoints = index.endpoints_for(&name, &mut desired.problems);
            if !config.node_hints {
                endpoints::without_node_hints(&mut endpoints);
            }
            let categorized = categorize(
                endpoints,
                node,
                !itp_local || externally_accessible,
                itp_local || (etp_local && externally_accessible),
            );
            let service_port = ServicePort {
                name: name.clone(),
                cluster_ip,
                port: number,
                node_port,
                external_ips: external_ips.clone(),
                lb_ips: lb_ips.clone(),
                source_ranges: source_ranges.clone(),
                health_check_node_port,
                itp_local,
                etp_local,
                affinity_secs,
                scheduler,
                weights: weights.clone(),
                endpoints: categorized,
            };
            add_frontends(&service_port, &object, node, desired);
            desired.ports.insert(name, service_port);
        }
    }
}

fn to_backends(
    endpoints: &[&Endpoint],
    proto: Proto,
    weights: &BTreeMap<IpAddr, u16>,
) -> Vec<Backend> {
    endpoints
        .iter()
        .map(|e| Backend {
            addr: e.addr,
            port: e.port,
            proto,
            local: e.local,
            terminating: e.terminating,
            weight: weights.get(&e.addr).copied().unwrap_or(1),
        })
        .collect()
}

/// Backend weights from the annotation; malformed entries are problems and weigh 1.
fn weights_of(svc: &Service, object: &str, problems: &mut Vec<Problem>) -> BTreeMap<IpAddr, u16> {
    let mut out = BTreeMap::new();
    let Some(raw) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(WEIGHTS_ANNOTATION))
    else {
        return out;
    };
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parsed = entry.split_once('=').and_then(|(ip, w)| {
            let ip = crate::objects::parse_lenient(ip)?;
            let w = w
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|w| (1..=MAX_WEIGHT).contains(w))?;
            Some((ip, w))
        });
        match parsed {
            Some((ip, w)) => {
                out.insert(ip, w);
            }
            None => problems.push(Problem {
                reason: ProblemReason::InvalidAnnotation,
                object: object.to_string(),
                message: format!(
                    "annotation {WEIGHTS_ANNOTATION}: {entry:?} is not IP=WEIGHT with a weight \
                     in 1-{MAX_WEIGHT}; ignored"
                ),
            }),
        }
    }
    out
}

/// The serving endpoints of `sp` outside `chosen` (a frontend's backends): kube-proxy's
/// conntrack cleanup deletes a UDP flow only when its endpoint stops serving, whatever the
/// traffic policy, topology or terminating state say (semantics 9.2, 9.3), so a flow already
/// on one keeps it (the plan keeps such endpoints' members, without slots).
fn keep_flows<'a>(sp: &'a ServicePort, chosen: &[&Endpoint]) -> Vec<&'a Endpoint> {
    let all = sp.endpoints.all();
    if chosen.len() == all.len() {
        return Vec::new();
    }
    let chosen: std::collections::HashSet<(IpAddr, u16)> =
        chosen.iter().map(|c| (c.addr, c.port)).collect();
    all.iter()
        .filter(|e| e.serving && !chosen.contains(&(e.addr, e.port)))
        .collect()
}

/// The frontends of one Service port.
///
/// Socket layer (internal scope): the ClusterIP uses the internal set (semantics 4.6);
/// externalIPs, load balancer IPs and NodePorts on node addresses reached from this node use
/// the cluster set (semantics 4.7 a/b: pods and the host are short-circuited to it); with
/// externalTrafficPolicy Cluster they are marked to masquerade, and pods whose interface
/// carries tc are left to it (7.13).
///
/// tc (external scope): NodePorts on `node_addresses`, externalIPs and load balancer IPs use the
/// external set: the local set with externalTrafficPolicy Local (no masquerading, dropped when
/// empty while endpoints exist elsewhere, semantics 3.9, 4.7c), else the cluster set with
/// masquerading (semantics 7.13). Only load balancer IPs carry source ranges (semantics 7.5,
/// 7.6, 7.8). Local endpoints whose pod-facing interface does not carry the tc program yet
/// (`NodeInfo::waiting`) are left out of the external set until it does: their replies would
/// not be translated back.
fn add_frontends(sp: &ServicePort, object: &str, node: &NodeInfo, desired: &mut Desired) {
    let node_addresses = &node.addresses[..];
    let proto = sp.name.proto;
    let family = sp.name.family;
    let internal: Vec<&Endpoint> = if sp.itp_local {
        sp.endpoints.local().iter().collect()
    } else {
        sp.endpoints.cluster().iter().collect()
    };
    let external = if sp.etp_local {
        sp.endpoints.local()
    } else {
        sp.endpoints.cluster()
    };
    let external_all = external.len();
    let external: Vec<&Endpoint> = external
        .iter()
        .filter(|e| !(e.local && node.waiting.contains(&e.addr)))
        .collect();
    let cluster: Vec<&Endpoint> = sp.endpoints.cluster().iter().collect();
    // A frontend has at most 65,535 slots (a 16-bit index): beyond that many endpoints, the
    // first ones (by address) are used.
    let most = internal.len().max(external.len()).max(cluster.len());
    if most > MAX_SLOTS {
        desired.problems.push(Problem {
            reason: ProblemReason::Capacity,
            object: object.to_string(),
            message: format!(
                "port {:?}: {most} endpoints, more than the {} a frontend can choose from; \
                 the first {} by address are used",
                sp.name.port, MAX_SLOTS, MAX_SLOTS
            ),
        });
    }
    // Dropped, not rejected, while endpoints exist elsewhere (3.9), and while every endpoint
    // of the external set is a local one waiting for tc on its interface: kube-proxy would
    // send the client there, so its retransmission finds the endpoint once tc is attached.
    let external_no_local =
        external.is_empty() && sp.endpoints.has_any && (sp.etp_local || external_all > 0);
    let mut add = |addr: IpAddr, port: u16, kind: FrontendKind, scope: Scope| {
        let key = FrontendAddr {
            addr,
            port,
            proto,
            scope,
        };
        if let Some(existing) = desired.frontends.get(&key) {
            desired.problems.push(Problem {
                reason: ProblemReason::Conflict,
                object: object.to_string(),
                message: format!("{key} is already used by {}; not programmed", existing.port),
            });
            return;
        }
        let (backends, no_local) = match (scope, kind) {
            (Scope::Internal, FrontendKind::ClusterIp) => (
                &internal,
                sp.itp_local && internal.is_empty() && sp.endpoints.has_any,
            ),
            (Scope::Internal, _) => (&cluster, false),
            (Scope::External, _) => (&external, external_no_local),
        };
        let external_scope = scope == Scope::External;
        let keep_flows = keep_flows(sp, backends);
        desired.frontends.insert(
            key,
            FrontendState {
                port: sp.name.clone(),
                kind,
                backends: to_backends(backends, proto, &sp.weights),
                keep_flows: to_backends(&keep_flows, proto, &sp.weights),
                affinity_secs: sp.affinity_secs,
                no_local,
                // From outside at tc; at the socket layer, pods whose interface carries tc
                // are left to it for an external frontend (the socket layer cannot
                // masquerade); the ClusterIP is never masqueraded (7.12).
                snat: !sp.etp_local && (external_scope || kind != FrontendKind::ClusterIp),
                // Both scopes: traffic from outside at tc, pods and the host at the socket
                // layer (semantics 7.8, 7.9).
                source_ranges: if kind == FrontendKind::LoadBalancer {
                    let node_ips = if node.node_ips.is_empty() {
                        &node.primary
                    } else {
                        &node.node_ips
                    };
                    with_node_exception(&sp.source_ranges, addr, node_ips)
                } else {
                    Vec::new()
                },
                scheduler: sp.scheduler,
            },
        );
    };
    add(
        sp.cluster_ip,
        sp.port,
        FrontendKind::ClusterIp,
        Scope::Internal,
    );
    for scope in [Scope::Internal, Scope::External] {
        for ip in &sp.lb_ips {
            add(*ip, sp.port, FrontendKind::LoadBalancer, scope);
        }
        // An address that is both an externalIP and a load balancer IP of this Service is one
        // frontend, the load balancer's: kube-proxy puts it in its Service map once and still
        // checks the source ranges on it (7.6, 7.8).
        for ip in sp.external_ips.iter().filter(|ip| !sp.lb_ips.contains(ip)) {
            add(*ip, sp.port, FrontendKind::ExternalIp, scope);
        }
        if let Some(node_port) = sp.node_port {
            for ip in node_addresses.iter().filter(|ip| Family::of(ip) == family) {
                add(*ip, node_port, FrontendKind::NodePort, scope);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
