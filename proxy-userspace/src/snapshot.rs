//! A consistent view of the cluster objects the proxy reads, as a source delivers them.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;

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
    pub node: NodeInfo,
    /// The agent's own settings that shape the desired state.
    pub config: ProxyConfig,
    /// The Service and EndpointSlice changes the source took in since its previous snapshot.
    pub changes: Changes,
}

/// Service and EndpointSlice changes (an object added, changed or deleted) a source took in,
/// for kube-proxy's `*_changes_pending` gauges (semantics 11.4): counted as they arrive, and
/// no longer pending once a sync has programmed them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: u64,
    /// EndpointSlice changes by address type: IPv4, IPv6 (FQDN and others are never used).
    pub slices: [u64; 2],
}

impl Changes {
    /// One change of a Service.
    pub const SERVICE: Changes = Changes {
        services: 1,
        slices: [0, 0],
    };

    /// One change of `slice` (nothing for an address type the proxy does not use).
    pub fn slice(slice: &Slice) -> Changes {
        let mut slices = [0, 0];
        match slice.address_type.as_str() {
            "IPv4" => slices[0] = 1,
            "IPv6" => slices[1] = 1,
            _ => {}
        }
        Changes {
            services: 0,
            slices,
        }
    }

    pub fn add(&mut self, other: Changes) {
        self.services += other.services;
        self.slices[0] += other.slices[0];
        self.slices[1] += other.slices[1];
    }

    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// Settings from the agent's command line that compile needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Scheduler of Services without the scheduler annotation (`--scheduler`).
    pub scheduler: crate::model::Scheduler,
    /// Entries of every Maglev table (`--maglev-table-size`, a prime).
    pub maglev_size: u32,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            scheduler: crate::model::Scheduler::Random,
            maglev_size: crate::model::DEFAULT_MAGLEV_SIZE,
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
