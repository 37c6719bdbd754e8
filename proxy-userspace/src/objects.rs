//! PURE: cluster objects as the proxy keeps them, reduced to the fields it reads.
//!
//! An EndpointSlice as the API describes it costs about 450 bytes per endpoint in memory
//! (k8s-openapi's structs carry every optional field inline: targetRef, hostname,
//! deprecatedTopology...), which at 10,000 Services x 100 endpoints is most of the agent's
//! memory. Sources convert each slice to a `Slice` when it arrives: one address (the only
//! one kube-proxy uses, semantics 2.7) parsed once, the conditions, the node name and the
//! topology hints, about 56 bytes per endpoint, with node and zone names shared
//! (`intern`). Services are few next to endpoints and are kept as the API describes them.

use std::{
    borrow::Cow,
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, LazyLock, Mutex},
};

use k8s_openapi::{
    api::discovery::v1::{
        Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// Labels whose presence hides an EndpointSlice (or Service) from kube-proxy (semantics 1.1,
/// 1.2).
pub const HIDING_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];

/// Whether another service proxy serves `svc` (it carries label
/// `service.kubernetes.io/service-proxy-name`, semantics 1.1).
pub fn served_elsewhere(svc: &k8s_openapi::api::core::v1::Service) -> bool {
    svc.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(HIDING_LABELS[0]))
}

/// The annotation of an EndpointSlice the proxy reads (the network programming latency, fact
/// 11.3); others are dropped.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// An EndpointSlice, reduced (see the module's documentation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slice {
    /// name, namespace, uid, resourceVersion, creationTimestamp. The labels and annotation the
    /// proxy reads are the fields below (a map of one entry costs a B-tree node, about 500
    /// bytes, on every slice).
    pub metadata: ObjectMeta,
    /// "IPv4", "IPv6", "FQDN", or whatever the object said.
    pub address_type: String,
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Box<[SliceEndpoint]>,
    /// The `kubernetes.io/service-name` label, if present.
    pub service_name: Option<Box<str>>,
    /// It carries one of `HIDING_LABELS`.
    pub hidden: bool,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation, if present.
    pub trigger_time: Option<Box<str>>,
}

/// One endpoint of a `Slice`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SliceEndpoint {
    /// `addresses[0]`.
    pub address: Address,
    /// `conditions.ready`, `.serving`, `.terminating` as written (unset is `None`).
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// `nodeName`, if set and not empty.
    pub node_name: Option<Arc<str>>,
    /// `hints`, if any is set and not empty.
    pub hints: Option<Arc<Hints>>,
}

/// The first address of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// `addresses` is empty.
    Missing,
    /// Parsed as `parse_lenient` does.
    Ip(IpAddr),
    /// Not an IP address (kept for the problem it is reported as).
    Invalid(Box<str>),
}

/// Topology hints of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints {
    /// `hints.forZones[].name`; `None` when absent or empty.
    pub zones: Option<Box<[Arc<str>]>>,
    /// `hints.forNodes[].name`; `None` when absent or empty.
    pub nodes: Option<Box<[Arc<str>]>>,
}

impl Slice {
    /// A slice of these parts; `metadata` is reduced to what `Slice` keeps.
    pub fn of_parts(
        m: ObjectMeta,
        address_type: String,
        ports: Option<Vec<EndpointPort>>,
        endpoints: Vec<SliceEndpoint>,
    ) -> Slice {
        let labels = m.labels.unwrap_or_default();
        Slice {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                creation_timestamp: m.creation_timestamp,
                ..ObjectMeta::default()
            },
            address_type,
            ports,
            endpoints: exactly(endpoints),
            service_name: labels
                .get("kubernetes.io/service-name")
                .map(|n| n.as_str().into()),
            hidden: HIDING_LABELS.iter().any(|l| labels.contains_key(*l)),
            trigger_time: m
                .annotations
                .and_then(|mut a| a.remove(TRIGGER_TIME_ANNOTATION))
                .map(String::into_boxed_str),
        }
    }

    /// `EndpointSlice namespace/name`, as problems name it.
    pub fn object_name(&self) -> String {
        format!(
            "EndpointSlice {}/{}",
            self.metadata.namespace.as_deref().unwrap_or(""),
            self.metadata.name.as_deref().unwrap_or("")
        )
    }
}

impl From<EndpointSlice> for Slice {
    fn from(s: EndpointSlice) -> Slice {
        Slice::of_parts(
            s.metadata,
            s.address_type,
            s.ports,
            endpoints_of(s.endpoints),
        )
    }
}

/// Reads an EndpointSlice as the API writes it, keeping what `Slice` keeps; its endpoints
/// straight into `SliceEndpoint`s.
impl<'de> serde::Deserialize<'de> for Slice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Slice, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Fields {
            #[serde(default)]
            metadata: Option<ObjectMeta>,
            #[serde(default)]
            address_type: Option<String>,
            #[serde(default)]
            endpoints: Option<Vec<SliceEndpoint>>,
            #[serde(default)]
            ports: Option<Vec<EndpointPort>>,
        }
        let f = Fields::deserialize(d)?;
        Ok(Slice::of_parts(
            f.metadata.unwrap_or_default(),
            f.address_type.unwrap_or_default(),
            f.ports,
            f.endpoints.unwrap_or_default(),
        ))
    }
}

impl From<&EndpointSlice> for Slice {
    fn from(s: &EndpointSlice) -> Slice {
        Slice::from(s.clone())
    }
}

// k8s-openapi's newest API versions make `endpoints` optional.
trait IntoEndpoints {
    fn into_list(self) -> Vec<Endpoint>;
}

impl IntoEndpoints for Vec<Endpoint> {
    fn into_list(self) -> Vec<Endpoint> {
        self
    }
}

impl IntoEndpoints for Option<Vec<Endpoint>> {
    fn into_list(self) -> Vec<Endpoint> {
        self.unwrap_or_default()
    }
}

/// The endpoints in an allocation of their own. `collect` would convert them in place, in the
/// parsed list's allocation (about 450 bytes per endpoint), and shrink it: each slice then kept
/// its endpoints at the start of a block whose freed rest was too small for the next slice's
/// list. Parsing 10,000 slices of 100 endpoints left about 300 MiB of such holes in the heap.
fn endpoints_of(list: impl IntoEndpoints) -> Vec<SliceEndpoint> {
    let list = list.into_list();
    let mut out = Vec::with_capacity(list.len());
    out.extend(list.into_iter().map(SliceEndpoint::from));
    out
}

/// `list` moved into an allocation of its exact size (a list read with unknown length has
/// room to spare; shrinking it in place would leave the rest as a hole, as above).
fn exactly(list: Vec<SliceEndpoint>) -> Box<[SliceEndpoint]> {
    if list.len() == list.capacity() {
        return list.into_boxed_slice();
    }
    let mut out = Vec::with_capacity(list.len());
    out.extend(list);
    out.into_boxed_slice()
}

impl From<Endpoint> for SliceEndpoint {
    fn from(e: Endpoint) -> SliceEndpoint {
        let address = match e.addresses.into_iter().next() {
            None => Address::Missing,
            Some(raw) => Address::of(&raw),
        };
        SliceEndpoint::of_parts(address, e.conditions, e.node_name, e.hints)
    }
}

impl SliceEndpoint {
    fn of_parts(
        address: Address,
        conditions: Option<EndpointConditions>,
        node_name: Option<String>,
        hints: Option<EndpointHints>,
    ) -> SliceEndpoint {
        let names = |list: Option<Vec<String>>| -> Option<Box<[Arc<str>]>> {
            let list = list.filter(|l| !l.is_empty())?;
            Some(list.iter().map(|n| intern(n)).collect())
        };
        let hints = hints.and_then(|h| {
            let hints = Hints {
                zones: names(h.for_zones.map(|z| z.into_iter().map(|z| z.name).collect())),
                nodes: names(h.for_nodes.map(|n| n.into_iter().map(|n| n.name).collect())),
            };
            (hints.zones.is_some() || hints.nodes.is_some()).then(|| Arc::new(hints))
        });
        let conditions = conditions.unwrap_or_default();
        SliceEndpoint {
            address,
            ready: conditions.ready,
            serving: conditions.serving,
            terminating: conditions.terminating,
            node_name: node_name.filter(|n| !n.is_empty()).map(|n| intern(&n)),
            hints,
        }
    }
}

/// Reads an endpoint as the API writes it straight into a `SliceEndpoint`: no k8s-openapi
/// `Endpoint` (with every optional field, and each address a `String`) in between, which made
/// up much of the time to read a large manifest. The fields the proxy does not read
/// (hostname, targetRef, zone, deprecatedTopology) are skipped without checking their types.
impl<'de> serde::Deserialize<'de> for SliceEndpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SliceEndpoint, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Fields {
            #[serde(default)]
            addresses: Option<FirstAddress>,
            #[serde(default)]
            conditions: Option<EndpointConditions>,
            #[serde(default)]
            node_name: Option<String>,
            #[serde(default)]
            hints: Option<EndpointHints>,
        }
        let f = Fields::deserialize(d)?;
        let address = f.addresses.map_or(Address::Missing, |a| a.0);
        Ok(SliceEndpoint::of_parts(
            address,
            f.conditions,
            f.node_name,
            f.hints,
        ))
    }
}

impl Address {
    /// `raw` parsed as `parse_lenient` does, or kept as invalid.
    fn of(raw: &str) -> Address {
        match parse_lenient(raw) {
            Some(ip) => Address::Ip(ip),
            None => Address::Invalid(raw.into()),
        }
    }
}

/// An endpoint's `addresses` list as its first address (the only one kube-proxy reads,
/// semantics 2.7); the others are read past. An empty list is `Address::Missing`.
struct FirstAddress(Address);

impl<'de> serde::Deserialize<'de> for FirstAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FirstAddress, D::Error> {
        struct List;
        impl<'de> serde::de::Visitor<'de> for List {
            type Value = FirstAddress;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of addresses")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<FirstAddress, A::Error> {
                let first = seq.next_element_seed(One)?.unwrap_or(Address::Missing);
                while seq.next_element::<String>()?.is_some() {}
                Ok(FirstAddress(first))
            }
        }
        /// One address, parsed from the text as the parser lends it (no `String` made).
        struct One;
        impl<'de> serde::de::DeserializeSeed<'de> for One {
            type Value = Address;
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Address, D::Error> {
                d.deserialize_str(self)
            }
        }
        impl serde::de::Visitor<'_> for One {
            type Value = Address;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address")
            }
            fn visit_str<E: serde::de::Error>(self, raw: &str) -> Result<Address, E> {
                Ok(Address::of(raw))
            }
        }
        d.deserialize_seq(List)
    }
}

/// Parses an IP address as kube-proxy's ParseIPSloppy reads one (semantics 2.7): leading zeros
/// in IPv4 octets accepted ("010.0.0.1" is 10.0.0.1, also as the tail of an IPv6 address), and
/// an IPv4-mapped IPv6 address ("::ffff:10.0.0.1") is the IPv4 address, which is how kube-proxy
/// files it (Go keeps both in one 16-byte form): an endpoint of an IPv4 slice, an IPv4
/// externalIP or clusterIP.
pub fn parse_lenient(raw: &str) -> Option<IpAddr> {
    parse_sloppy(raw).map(|ip| ip.to_canonical())
}

/// `parse_lenient` without the IPv4-mapped form's mapping (a CIDR's prefix length counts in
/// the family it is written in).
pub fn parse_sloppy(raw: &str) -> Option<IpAddr> {
    let raw = raw.trim();
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Some(ip);
    }
    match raw.rsplit_once(':') {
        Some((head, tail)) if tail.contains('.') => {
            let v4 = sloppy_v4(tail)?;
            format!("{head}:{v4}")
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        }
        Some(_) => None,
        None => sloppy_v4(raw).map(IpAddr::V4),
    }
}

/// A dotted quad whose octets may carry leading zeros (any number of them).
fn sloppy_v4(raw: &str) -> Option<Ipv4Addr> {
    let mut out = [0u8; 4];
    let mut parts = raw.split('.');
    for o in &mut out {
        let s = parts.next()?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = s.trim_start_matches('0');
        *o = if digits.is_empty() {
            0
        } else if digits.len() > 3 {
            return None;
        } else {
            digits.parse().ok()?
        };
    }
    parts.next().is_none().then_some(Ipv4Addr::from(out))
}

/// Names shared by every object that carries them (node and zone names repeat across
/// thousands of endpoints). Names no object holds any more are dropped whenever the set has
/// doubled since the last time.
struct Names {
    set: HashSet<Arc<str>>,
    prune_at: usize,
}

static NAMES: LazyLock<Mutex<Names>> = LazyLock::new(|| {
    Mutex::new(Names {
        set: HashSet::new(),
        prune_at: 1024,
    })
});

/// The shared copy of `name`.
pub fn intern(name: &str) -> Arc<str> {
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = names.set.get(name) {
        return Arc::clone(shared);
    }
    if names.set.len() >= names.prune_at {
        names.set.retain(|n| Arc::strong_count(n) > 1);
        names.prune_at = (names.set.len() * 2).max(1024);
    }
    let shared: Arc<str> = Arc::from(name);
    names.set.insert(Arc::clone(&shared));
    shared
}

impl kube::Resource for Slice {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        <EndpointSlice as kube::Resource>::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        <EndpointSlice as kube::Resource>::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        <EndpointSlice as kube::Resource>::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        <EndpointSlice as kube::Resource>::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A Pod on this node, reduced to what the socket-layer opt-out reads: name, namespace, uid,
/// resourceVersion (metadata), the node it runs on, whether it uses the host's network, and
/// its addresses (`status.podIPs`, parsed; unparsable ones left out).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodRef {
    pub metadata: ObjectMeta,
    pub node_name: String,
    pub host_network: bool,
    pub ips: Vec<IpAddr>,
}

impl From<k8s_openapi::api::core::v1::Pod> for PodRef {
    fn from(p: k8s_openapi::api::core::v1::Pod) -> PodRef {
        let m = p.metadata;
        let spec = p.spec.unwrap_or_default();
        let status = p.status.unwrap_or_default();
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .unwrap_or_default()
            .into_iter()
            .filter_map(|ip| ip.ip.trim().parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.pod_ip.and_then(|ip| ip.trim().parse().ok())
        {
            ips.push(ip);
        }
        PodRef {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                ..ObjectMeta::default()
            },
            node_name: spec.node_name.unwrap_or_default(),
            host_network: spec.host_network.unwrap_or(false),
            ips,
        }
    }
}

impl<'de> serde::Deserialize<'de> for PodRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PodRef, D::Error> {
        k8s_openapi::api::core::v1::Pod::deserialize(d).map(PodRef::from)
    }
}

impl kube::Resource for PodRef {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        <k8s_openapi::api::core::v1::Pod as kube::Resource>::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        <k8s_openapi::api::core::v1::Pod as kube::Resource>::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        <k8s_openapi::api::core::v1::Pod as kube::Resource>::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        <k8s_openapi::api::core::v1::Pod as kube::Resource>::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(yaml: &str) -> Slice {
        Slice::from(serde_norway::from_str::<EndpointSlice>(yaml).unwrap())
    }

    #[test]
    fn addresses_are_read_as_parse_ip_sloppy_reads_them() {
        // semantics 2.7: leading zeros in IPv4 octets, also after an IPv6 prefix; an
        // IPv4-mapped IPv6 address is its IPv4 address (kube-proxy files it as IPv4).
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (raw, want) in [
            ("10.0.0.1", "10.0.0.1"),
            (" 010.000.0.01 ", "10.0.0.1"),
            ("0010.0.0.1", "10.0.0.1"),
            ("::ffff:10.244.1.5", "10.244.1.5"),
            ("::FFFF:010.244.1.5", "10.244.1.5"),
            ("::ffff:a00:1", "10.0.0.1"),
            ("fd00::1", "fd00::1"),
            ("64:ff9b::010.0.0.1", "64:ff9b::a00:1"),
        ] {
            assert_eq!(parse_lenient(raw), Some(ip(want)), "{raw}");
        }
        for raw in [
            "256.0.0.1",
            "1.2.3",
            "1.2.3.4.5",
            "1..2.3",
            "0x1.0.0.1",
            "10.0.0.1/8",
            "",
            "fd00::1::2",
        ] {
            assert_eq!(parse_lenient(raw), None, "{raw}");
        }
        // The mapped form kept as written where a prefix length counts in its family.
        assert_eq!(parse_sloppy("::ffff:10.0.0.0"), Some(ip("::ffff:10.0.0.0")));
    }

    #[test]
    fn read_directly_as_through_the_api_types() {
        // The direct reading (`Slice: Deserialize`) gives what converting k8s-openapi's
        // EndpointSlice gives, in YAML and JSON.
        let yaml = concat!(
            "metadata: {name: a-1, namespace: ns, labels: {kubernetes.io/service-name: a}}\n",
            "addressType: IPv4\n",
            "ports: [{name: http, port: 80, protocol: TCP}]\n",
            "endpoints:\n",
            "- {addresses: [010.0.0.1, 10.0.0.9], conditions: {ready: false, serving: null}, nodeName: n1,\n",
            "   hostname: h, zone: z, targetRef: {kind: Pod, name: p}, deprecatedTopology: {a: b},\n",
            "   hints: {forZones: [{name: z1}], forNodes: [{name: n1}]}}\n",
            "- {addresses: [], nodeName: ''}\n",
            "- {addresses: null, conditions: null, hints: null}\n",
            "- {conditions: {terminating: true}}\n",
            "- {addresses: ['fd00::1'], hints: {forZones: []}}\n",
            "- {addresses: [nope]}\n",
        );
        let direct: Slice = serde_norway::from_str(yaml).unwrap();
        assert_eq!(direct, slice(yaml));
        assert_eq!(direct.endpoints.len(), 6);
        let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
        let json: Slice = serde_json::from_value(value).unwrap();
        assert_eq!(json, direct);
        // Wrong types of the fields read are errors, as they are to the API types.
        for bad in [
            "endpoints: [{addresses: 5}]",
            "endpoints: [{addresses: [[1]]}]",
            "endpoints: [{addresses: [10.0.0.1, [2]]}]",
            "endpoints: [{conditions: {ready: maybe}}]",
            "endpoints: [{nodeName: [n1]}]",
            "endpoints: {a: 1}",
        ] {
            assert!(
                serde_norway::from_str::<EndpointSlice>(bad).is_err(),
                "{bad}"
            );
            assert!(serde_norway::from_str::<Slice>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keeps_what_the_proxy_reads_and_drops_the_rest() {
        let s = slice(concat!(
            "metadata: {name: a-1, namespace: ns, uid: u1, resourceVersion: '7', generateName: a-,\n",
            "  labels: {kubernetes.io/service-name: a, endpointslice.kubernetes.io/managed-by: x},\n",
            "  annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2026-01-01T00:00:00Z', other: y}}\n",
            "addressType: IPv4\n",
            "ports: [{name: http, port: 80}]\n",
            "endpoints:\n",
            "- {addresses: [010.0.0.1, 10.0.0.9], conditions: {ready: false}, nodeName: n1,\n",
            "   hostname: h, targetRef: {kind: Pod, name: p, namespace: ns, uid: pu},\n",
            "   hints: {forZones: [{name: z1}]}}\n",
            "- {addresses: [], nodeName: ''}\n",
            "- {addresses: [nope], hints: {forZones: []}}\n",
        ));
        assert_eq!(s.metadata.name.as_deref(), Some("a-1"));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(s.metadata.generate_name, None);
        assert_eq!(s.metadata.labels, None);
        assert_eq!(s.metadata.annotations, None);
        assert_eq!(s.service_name.as_deref(), Some("a"));
        assert!(!s.hidden);
        assert_eq!(s.trigger_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        let [a, b, c] = &*s.endpoints else {
            panic!("{:?}", s.endpoints)
        };
        assert_eq!(a.address, Address::Ip("10.0.0.1".parse().unwrap()));
        assert_eq!(
            (a.ready, a.serving, a.terminating),
            (Some(false), None, None)
        );
        assert_eq!(a.node_name.as_deref(), Some("n1"));
        let zones = a.hints.as_ref().unwrap().zones.as_ref().unwrap();
        assert_eq!(zones.iter().map(|z| &**z).collect::<Vec<_>>(), ["z1"]);
        assert_eq!(b.address, Address::Missing);
        assert_eq!(b.node_name, None);
        assert_eq!(c.address, Address::Invalid("nope".into()));
        assert_eq!(c.hints, None);
    }

    #[test]
    fn node_names_are_shared() {
        let a = intern("node-shared-test");
        let b = intern("node-shared-test");
        assert!(Arc::ptr_eq(&a, &b));
    }
}
