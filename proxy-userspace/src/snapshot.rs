//! A consistent view of the cluster objects the proxy reads, as a source delivers them.

use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use crate::objects::{Address, Slice};

/// Everything compile needs, taken at one moment. Sources always deliver whole snapshots,
/// never deltas, so a lost delete event cannot leave stale state behind.
///
/// Objects are shared: a source hands the same `Arc` again for an object that did not change,
/// so a snapshot costs one pointer per object to copy, and the agent's compile cache tells
/// changed objects from unchanged ones by pointer (`Arc::ptr_eq`) without looking inside.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<Slice>>,
    /// This node's Pods and every Namespace: which pods have socket-layer translation off
    /// (`socklb`). Compile does not read them.
    pub pods: Vec<Arc<crate::objects::PodRef>>,
    pub namespaces: Vec<Arc<k8s_openapi::api::core::v1::Namespace>>,
    /// The source has not listed the Pods and the Namespaces yet (their lists fail, or have
    /// not come back): `pods` and `namespaces` say nothing, so the socket-layer opt-out a
    /// previous agent wrote is left as it is rather than cleared.
    pub pods_unknown: bool,
    /// The CIDRs of every ServiceCIDR object, as written, sorted without duplicates: the
    /// address ranges whose unallocated addresses are dropped (semantics 3.12).
    pub service_cidrs: Vec<String>,
    /// Services another service proxy serves (label `service.kubernetes.io/service-proxy-name`,
    /// semantics 1.1), never proxied here: their ClusterIPs are cut out of the ServiceCIDRs'
    /// ranges, left to that proxy rather than dropped as unallocated (3.12).
    pub foreign_services: Vec<Arc<Service>>,
    pub node: NodeInfo,
    /// The agent's own settings that shape the desired state.
    pub config: ProxyConfig,
    /// The Service and EndpointSlice changes the source took in since its previous snapshot.
    pub changes: Changes,
}

/// `Snapshot::foreign_services` of a source without selectors (manifests): those of
/// `services` that carry label `service.kubernetes.io/service-proxy-name`.
pub fn foreign_services_of(services: &[Arc<Service>]) -> Vec<Arc<Service>> {
    services
        .iter()
        .filter(|s| crate::objects::served_elsewhere(s))
        .cloned()
        .collect()
}

/// `Snapshot::service_cidrs` of these ServiceCIDR objects: their `spec.cidrs`, trimmed, sorted,
/// without duplicates (an object being deleted still counts, as for kube-proxy's informer).
pub fn service_cidrs_of<'a>(
    objects: impl IntoIterator<Item = &'a k8s_openapi::api::networking::v1::ServiceCIDR>,
) -> Vec<String> {
    let mut out: Vec<String> = objects
        .into_iter()
        .filter_map(|o| o.spec.as_ref()?.cidrs.clone())
        .flatten()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The Services and EndpointSlices a source saw change (added, changed in what the proxy
/// reads, or deleted), by namespace and name (`change_key`), per IP family, for kube-proxy's
/// `*_changes_pending` gauges (semantics 11.4): each object counts once however often it
/// changed until a sync programs it; a Service counts in the families it has a cluster IP of,
/// a slice in its address type's.
///
/// Also the events behind them, for the `*_changes_total` counters (semantics 11.6: every
/// add, update and delete counts, however many times one object changes before a sync).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Indexed IPv4, IPv6.
    pub services: [BTreeSet<u64>; 2],
    pub slices: [BTreeSet<u64>; 2],
    /// Service events (each proxier of kube-proxy sees every one).
    pub service_events: u64,
    /// EndpointSlice events, by the slice's address type (indexed IPv4, IPv6).
    pub slice_events: [u64; 2],
}

/// The family index (`Changes`) of an address or family name.
fn family_index(family: &str) -> Option<usize> {
    match family {
        "IPv4" => Some(0),
        "IPv6" => Some(1),
        _ => None,
    }
}

/// An object's key in `Changes`: a 64-bit hash of its namespace and name. Sets of the names
/// themselves held two strings per object between syncs, tens of thousands after a full load,
/// and their small allocations left the heap fragmented (6 MiB more RSS at 10,000 Services x 10
/// endpoints). A collision (about one in 10^10 at 100,000 objects) would count two objects as
/// one pending change.
pub fn change_key(namespace: &str, name: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    // SipHash with fixed keys: the same key for the same object in every source and snapshot.
    let mut h = std::hash::DefaultHasher::new();
    (namespace, name).hash(&mut h);
    h.finish()
}

fn key_of(meta: &ObjectMeta) -> u64 {
    change_key(
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

impl Changes {
    /// Notes a change of `svc` (either version: a change of families counts in both).
    pub fn service(&mut self, svc: &Service) {
        let spec = svc.spec.as_ref();
        let families: Vec<usize> = match spec.and_then(|s| s.ip_families.as_ref()) {
            Some(f) if !f.is_empty() => f.iter().filter_map(|f| family_index(f)).collect(),
            // Version skew: the cluster IP's own family (semantics 1.4).
            _ => spec
                .and_then(|s| s.cluster_ip.as_deref())
                .and_then(crate::objects::parse_lenient)
                .map(|ip| vec![usize::from(ip.is_ipv6())])
                .unwrap_or_default(),
        };
        for f in families {
            self.services[f].insert(key_of(&svc.metadata));
        }
    }

    /// Notes a change of `slice` (nothing for an address type the proxy does not use).
    pub fn slice(&mut self, slice: &Slice) {
        if let Some(f) = family_index(&slice.address_type) {
            self.slices[f].insert(key_of(&slice.metadata));
        }
    }

    /// Counts an add, update or delete event of a Service.
    pub fn service_event(&mut self) {
        self.service_events += 1;
    }

    /// Counts an add, update or delete event of `slice` (nothing for an address type the
    /// proxy does not use).
    pub fn slice_event(&mut self, slice: &Slice) {
        if let Some(f) = family_index(&slice.address_type) {
            self.slice_events[f] += 1;
        }
    }

    /// Takes in `other`'s changes.
    pub fn add(&mut self, other: Changes) {
        self.service_events += other.service_events;
        for (mine, theirs) in self.slice_events.iter_mut().zip(other.slice_events) {
            *mine += theirs;
        }
        for (mine, theirs) in self.services.iter_mut().zip(other.services) {
            mine.extend(theirs);
        }
        for (mine, theirs) in self.slices.iter_mut().zip(other.slices) {
            mine.extend(theirs);
        }
    }

    /// Services and slices changed, per family: ([IPv4, IPv6], [IPv4, IPv6]).
    pub fn counts(&self) -> ([u64; 2], [u64; 2]) {
        let n = |s: &[BTreeSet<u64>; 2]| [s[0].len() as u64, s[1].len() as u64];
        (n(&self.services), n(&self.slices))
    }

    pub fn is_empty(&self) -> bool {
        self.services
            .iter()
            .chain(&self.slices)
            .all(BTreeSet::is_empty)
    }
}

/// Whether two versions of a Service differ in what the proxy reads: its spec, its load
/// balancer status, its labels and annotations (a change of resourceVersion or of another
/// field alone is no change, semantics 1.6).
pub fn service_differs(a: &Service, b: &Service) -> bool {
    a.spec != b.spec
        || a.status.as_ref().and_then(|s| s.load_balancer.as_ref())
            != b.status.as_ref().and_then(|s| s.load_balancer.as_ref())
        || a.metadata.labels != b.metadata.labels
        || a.metadata.annotations != b.metadata.annotations
}

/// Whether two versions of a slice differ in what the proxy reads (its reduced fields, not
/// its metadata: semantics 2.9).
pub fn slice_differs(a: &Slice, b: &Slice) -> bool {
    a.address_type != b.address_type
        || a.ports != b.ports
        || a.endpoints != b.endpoints
        || a.service_name != b.service_name
        || a.hidden != b.hidden
        || a.metadata.namespace != b.metadata.namespace
        || a.metadata.name != b.metadata.name
}

/// Settings from the agent's command line that compile needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Scheduler of Services without the scheduler annotation (`--scheduler`).
    pub scheduler: crate::model::Scheduler,
    /// Entries of every Maglev table (`--maglev-table-size`, a prime).
    pub maglev_size: u32,
    /// Whether endpoints' `hints.forNodes` are read (semantics 5.5: kube-proxy reads them only
    /// with feature gate PreferSameTrafficDistribution, on by default since 1.34); false
    /// with `featureGates: {PreferSameTrafficDistribution: false}`.
    pub node_hints: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            scheduler: crate::model::Scheduler::Random,
            maglev_size: crate::model::DEFAULT_MAGLEV_SIZE,
            node_hints: true,
        }
    }
}

/// What the proxy needs to know about its own node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// This node's name (`--hostname-override`, lower-cased, or the hostname); endpoints whose
    /// `nodeName` equals it are local (semantics 2.8).
    pub name: String,
    /// Label `topology.kubernetes.io/zone` of this node's Node object (semantics 5.3).
    pub zone: Option<String>,
    /// The node addresses NodePorts are served on (as the agent chooses them from its interfaces), found by the
    /// agent on its interfaces; empty: no NodePort frontends.
    pub addresses: Vec<std::net::IpAddr>,
    /// `spec.podCIDRs` of this node's Node object (unparsable entries left out).
    pub pod_cidrs: Vec<crate::model::Cidr>,
    /// The primary address of each family of this node's Node object (kube-proxy's
    /// GetNodeHostIPs: InternalIP addresses before ExternalIP ones, the first of each family),
    /// for `--nodeport-addresses primary` (semantics 7.3, 10.2).
    pub primary: Vec<std::net::IpAddr>,
    /// kube-proxy's node IPs (semantics 7.9's node exception, 10.2): a specific
    /// `--bind-address` for its family, else `primary`'s (`NodePortSelection::node_ips`); empty
    /// until the agent completes the snapshot, then `primary` stands in.
    pub node_ips: Vec<std::net::IpAddr>,
    /// Local endpoints whose pod-facing interface does not carry the tc program yet, found by
    /// the agent: they serve the socket layer only until it does (a packet translated at tc for
    /// them would get no translated reply).
    pub waiting: std::collections::BTreeSet<std::net::IpAddr>,
    /// Whether this node may receive load balancer traffic (semantics 8.8): its Node object
    /// exists, has no deletionTimestamp and no ToBeDeletedByClusterAutoscaler taint. /healthz
    /// answers 503 while it is false.
    pub eligible: bool,
}

/// The first InternalIP, else ExternalIP, address of each family of `node`, in that order.
fn primary_addresses(node: &k8s_openapi::api::core::v1::Node) -> Vec<std::net::IpAddr> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let of_type = |kind: &'static str| {
        addresses
            .iter()
            .filter(move |a| a.type_ == kind)
            .filter_map(|a| a.address.trim().parse::<std::net::IpAddr>().ok())
    };
    let mut out: Vec<std::net::IpAddr> = Vec::new();
    for ip in of_type("InternalIP").chain(of_type("ExternalIP")) {
        if !out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            out.push(ip);
        }
    }
    out
}

/// The local endpoint addresses of each slice object last seen, for
/// `NodeInfo::local_endpoints_cached` (each slice is looked into once, not at every snapshot).
#[derive(Default)]
pub struct LocalEndpoints {
    node: String,
    /// Per slice (by pointer): the slice, its local addresses, its remote probes.
    #[allow(clippy::type_complexity)]
    slices: std::collections::HashMap<
        usize,
        (Arc<Slice>, Vec<std::net::IpAddr>, Vec<std::net::IpAddr>),
    >,
    /// The remote probes of the last call.
    remote: std::collections::BTreeSet<std::net::IpAddr>,
}

/// Taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// A Node is eligible for load balancer traffic unless it is being deleted (a deletionTimestamp)
/// or the cluster autoscaler marked it for deletion (semantics 8.8).
pub fn node_eligible(node: &k8s_openapi::api::core::v1::Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !tainted
}

/// The /24 (IPv4) or /64 (IPv6) an address is in, as bytes.
fn probe_prefix(ip: &std::net::IpAddr) -> (u8, [u8; 8]) {
    match ip {
        std::net::IpAddr::V4(a) => {
            let o = a.octets();
            (4, [o[0], o[1], o[2], 0, 0, 0, 0, 0])
        }
        std::net::IpAddr::V6(a) => {
            let o = a.octets();
            (6, [o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
        }
    }
}

impl LocalEndpoints {
    /// `NodeInfo::remote_probes` of the slices of the last `local_endpoints_cached` call.
    pub fn remote_probes(&self) -> &std::collections::BTreeSet<std::net::IpAddr> {
        &self.remote
    }
}

impl NodeInfo {
    /// Addresses of this node's endpoints (EndpointSlice endpoints whose `nodeName` is this
    /// node), every Service and family.
    pub fn local_endpoints(
        &self,
        slices: &[Arc<Slice>],
    ) -> std::collections::BTreeSet<std::net::IpAddr> {
        if self.name.is_empty() {
            return Default::default();
        }
        slices
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.node_name.as_deref() == Some(self.name.as_str()))
            .filter_map(|e| match e.address {
                Address::Ip(ip) => Some(ip),
                _ => None,
            })
            .collect()
    }

    /// As `local_endpoints`, looking only at the slices not seen by `cache` before: a slice
    /// object's local addresses are kept while the snapshot holds it (by pointer).
    pub fn local_endpoints_cached(
        &self,
        slices: &[Arc<Slice>],
        cache: &mut LocalEndpoints,
    ) -> std::collections::BTreeSet<std::net::IpAddr> {
        if cache.node != self.name {
            *cache = LocalEndpoints {
                node: self.name.clone(),
                ..LocalEndpoints::default()
            };
        }
        let mut next = std::collections::HashMap::with_capacity(cache.slices.len());
        let mut out = std::collections::BTreeSet::new();
        let mut remote = std::collections::BTreeMap::new();
        for slice in slices {
            let p = Arc::as_ptr(slice) as usize;
            let addresses = match cache.slices.remove(&p) {
                Some(known) => known,
                None => {
                    let one = std::slice::from_ref(slice);
                    (
                        Arc::clone(slice),
                        self.local_endpoints(one).into_iter().collect(),
                        self.remote_probes(one).into_iter().collect(),
                    )
                }
            };
            out.extend(addresses.1.iter().copied());
            for ip in &addresses.2 {
                remote.entry(probe_prefix(ip)).or_insert(*ip);
            }
            next.insert(p, addresses);
        }
        cache.slices = next;
        cache.remote = remote.into_values().collect();
        out
    }

    /// One endpoint address on another node per /24 (IPv4) or /64 (IPv6), the size of a
    /// node's pod CIDR: where the kernel routes these, the replies of masqueraded flows to
    /// remote backends come back (an overlay's tunnel device, for one).
    pub fn remote_probes(
        &self,
        slices: &[Arc<Slice>],
    ) -> std::collections::BTreeSet<std::net::IpAddr> {
        let mut by_prefix = std::collections::BTreeMap::new();
        for e in slices.iter().flat_map(|s| s.endpoints.iter()) {
            let remote = e
                .node_name
                .as_deref()
                .is_some_and(|n| !n.is_empty() && n != self.name);
            if let (true, Address::Ip(ip)) = (remote, &e.address) {
                by_prefix.entry(probe_prefix(ip)).or_insert(*ip);
            }
        }
        by_prefix.into_values().collect()
    }

    /// Reads the zone label from this node's Node object.
    pub fn with_node(name: String, node: Option<&k8s_openapi::api::core::v1::Node>) -> Self {
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .filter(|z| !z.is_empty())
            .cloned();
        let pod_cidrs = node
            .and_then(|n| n.spec.as_ref())
            .map(|s| {
                s.pod_cidrs
                    .iter()
                    .flatten()
                    .chain(s.pod_cidr.iter())
                    .filter_map(|c| crate::model::Cidr::parse(c))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect()
            })
            .unwrap_or_default();
        NodeInfo {
            name,
            zone,
            addresses: Vec::new(),
            pod_cidrs,
            primary: node.map(primary_addresses).unwrap_or_default(),
            node_ips: Vec::new(),
            waiting: Default::default(),
            eligible: node.is_some_and(node_eligible),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, eps: &[(&str, &str)]) -> Arc<Slice> {
        let eps: Vec<String> = eps
            .iter()
            .map(|(ip, node)| format!("{{addresses: [{ip}], nodeName: {node}}}"))
            .collect();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_norway::from_str(&format!(
            "metadata: {{name: {name}, namespace: default}}\naddressType: IPv4\nendpoints: [{}]",
            eps.join(", ")
        ))
        .unwrap();
        Arc::new(slice.into())
    }

    #[test]
    fn cached_local_endpoints_equal_a_full_scan() {
        let node = NodeInfo {
            name: "node-a".into(),
            ..NodeInfo::default()
        };
        let mut cache = LocalEndpoints::default();
        let a = slice("a", &[("10.0.0.1", "node-a"), ("10.0.0.2", "node-b")]);
        let b = slice("b", &[("10.0.0.3", "node-a")]);
        let c = slice("a", &[("10.0.0.4", "node-a")]);
        for slices in [
            vec![a.clone(), b.clone()],
            vec![a.clone()],
            vec![c.clone(), b.clone()],
            vec![],
            vec![a, b, c],
        ] {
            assert_eq!(
                node.local_endpoints_cached(&slices, &mut cache),
                node.local_endpoints(&slices)
            );
            assert_eq!(cache.remote_probes(), &node.remote_probes(&slices));
        }
    }

    #[test]
    fn remote_probes_are_one_endpoint_per_pod_cidr_sized_prefix_of_other_nodes() {
        let node = NodeInfo {
            name: "node-a".into(),
            ..NodeInfo::default()
        };
        let a = slice(
            "a",
            &[
                ("10.244.0.5", "node-a"),
                ("10.244.1.5", "node-b"),
                ("10.244.1.6", "node-b"),
                ("10.244.2.5", "node-c"),
            ],
        );
        let probes: Vec<String> = node
            .remote_probes(&[a])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(probes, ["10.244.1.5", "10.244.2.5"]);
    }

    #[test]
    fn node_primary_addresses_are_the_first_internal_then_external_of_each_family() {
        let node: k8s_openapi::api::core::v1::Node = serde_norway::from_str(
            "metadata: {name: node-a}
status:
  addresses:
  - {type: Hostname, address: node-a}
  - {type: ExternalIP, address: 203.0.113.7}
  - {type: ExternalIP, address: '2001:db8::7'}
  - {type: InternalIP, address: 192.0.2.10}
  - {type: InternalIP, address: 192.0.2.11}
",
        )
        .unwrap();
        let info = NodeInfo::with_node("node-a".into(), Some(&node));
        assert_eq!(
            info.primary,
            [
                "192.0.2.10".parse::<std::net::IpAddr>().unwrap(),
                "2001:db8::7".parse().unwrap()
            ]
        );
        assert!(
            NodeInfo::with_node("node-a".into(), None)
                .primary
                .is_empty()
        );
    }
}

#[cfg(test)]
mod changes_tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_norway::from_str(yaml).unwrap()
    }

    /// semantics 11.4: a Service counts in the families it has a cluster IP of (its
    /// `ipFamilies`, or its cluster IP's family without them), once however often it changes;
    /// an edit of its metadata alone is no change (1.6).
    #[test]
    fn a_service_counts_once_in_each_of_its_families() {
        let single = svc("metadata: {name: a, namespace: d}\nspec: {clusterIP: 10.96.0.1}");
        let dual = svc(
            "metadata: {name: b, namespace: d}\nspec: {clusterIP: 10.96.0.2, clusterIPs: \
             [10.96.0.2, 'fd00::2'], ipFamilies: [IPv4, IPv6]}",
        );
        let v6 = svc("metadata: {name: c, namespace: d}\nspec: {clusterIP: 'fd00::3'}");
        let headless = svc("metadata: {name: h, namespace: d}\nspec: {clusterIP: None}");
        let mut c = Changes::default();
        for s in [&single, &dual, &v6, &headless, &single, &dual] {
            c.service(s);
        }
        assert_eq!(c.counts(), ([2, 2], [0, 0]));
        let mut bumped = single.clone();
        bumped.metadata.resource_version = Some("7".into());
        assert!(!service_differs(&single, &bumped));
        bumped.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
        assert!(service_differs(&single, &bumped));
    }
}
