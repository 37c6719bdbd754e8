//! EndpointSlices → the merged, de-duplicated endpoint list of each Service port
//! (semantics 1.7, 1.8, 2.2–2.8).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use crate::objects::{Address, Hints, Slice, SliceEndpoint};

use super::{Family, PortName, Problem, ProblemReason, Proto};

/// One endpoint of one Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// `nodeName`, if set.
    pub node_name: Option<Arc<str>>,
    /// Set by `categorize` callers through `SliceIndex`: nodeName equals this node's name.
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Topology hints (shared with the slice the endpoint came from).
    pub hints: Option<Arc<Hints>>,
}

impl Endpoint {
    /// `hints.forZones[].name`; `None` when the endpoint has no zone hint.
    pub fn zone_hints(&self) -> Option<&[Arc<str>]> {
        self.hints.as_ref()?.zones.as_deref()
    }

    /// `hints.forNodes[].name`; `None` when the endpoint has no node hint.
    pub fn node_hints(&self) -> Option<&[Arc<str>]> {
        self.hints.as_ref()?.nodes.as_deref()
    }

    /// kube-proxy keys and sorts endpoints by this string (semantics 2.5).
    fn sort_key(&self) -> String {
        match self.addr {
            IpAddr::V4(a) => format!("{a}:{}", self.port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
        }
    }
}

/// Drops the endpoints' node hints, keeping their zone hints: kube-proxy without feature gate
/// PreferSameTrafficDistribution does not read `forNodes` (semantics 5.5).
pub fn without_node_hints(endpoints: &mut [Endpoint]) {
    for e in endpoints {
        let Some(hints) = e.hints.take_if(|h| h.nodes.is_some()) else {
            continue;
        };
        e.hints = hints.zones.clone().map(|zones| {
            Arc::new(Hints {
                zones: Some(zones),
                nodes: None,
            })
        });
    }
}

/// Whose slice this is, as `SliceIndex::build` decides it.
pub enum Owner<'a> {
    /// Hidden from the proxy by a label (semantics 1.1, 1.2).
    Ignored,
    /// The Service (namespace, name) its `kubernetes.io/service-name` label names.
    Service(&'a str, &'a str),
    /// No usable label, name or namespace: reported, never used.
    Nobody,
}

pub fn owner(slice: &Slice) -> Owner<'_> {
    if slice.hidden {
        return Owner::Ignored;
    }
    let service = slice.service_name.as_deref().filter(|s| !s.is_empty());
    match (
        service,
        // semantics 1.8: a slice without a name or namespace is ignored.
        slice.metadata.namespace.as_ref().filter(|n| !n.is_empty()),
        slice.metadata.name.as_ref().filter(|n| !n.is_empty()),
    ) {
        (Some(service), Some(namespace), Some(_)) => Owner::Service(namespace, service),
        _ => Owner::Nobody,
    }
}

/// The slices of each Service, by (namespace, service name).
pub struct SliceIndex<'a> {
    by_service: BTreeMap<(String, String), Vec<&'a Slice>>,
    node_name: String,
}

impl<'a> SliceIndex<'a> {
    /// Indexes `slices`, which must be in a stable order with unique namespace/name (see
    /// `compile::unique`): merging is order-sensitive for duplicates (semantics 2.6).
    pub fn build(slices: Vec<&'a Slice>, node_name: &str, problems: &mut Vec<Problem>) -> Self {
        let mut by_service: BTreeMap<(String, String), Vec<&Slice>> = BTreeMap::new();
        for slice in slices {
            let object = slice_name(slice);
            let (namespace, service) = match owner(slice) {
                // semantics 1.1, 1.2: kube-proxy's informers never see slices carrying these
                // labels (the controller copies a Service's proxy-name label onto its slices).
                Owner::Ignored => continue,
                Owner::Service(namespace, service) => (namespace, service),
                Owner::Nobody => {
                    problems.push(Problem {
                        reason: ProblemReason::InvalidObject,
                        object,
                        message: "no kubernetes.io/service-name label, name or namespace; ignored"
                            .into(),
                    });
                    continue;
                }
            };
            // semantics 1.7: only IPv4 and IPv6 slices are ever used; FQDN ones are ignored
            // silently, anything else is not a valid addressType.
            let family = match slice.address_type.as_str() {
                "IPv4" => Family::V4,
                "IPv6" => Family::V6,
                "FQDN" => continue,
                other => {
                    problems.push(Problem {
                        reason: ProblemReason::UnsupportedAddressType,
                        object,
                        message: format!(
                            "addressType {other:?} is not IPv4, IPv6 or FQDN; slice ignored"
                        ),
                    });
                    continue;
                }
            };
            check_ports(slice, &object, problems);
            check_addresses(slice, family, &object, problems);
            by_service
                .entry((namespace.to_string(), service.to_string()))
                .or_default()
                .push(slice);
        }
        SliceIndex {
            by_service,
            node_name: node_name.to_lowercase(),
        }
    }

    /// The endpoints of one Service port, merged over all its slices of that family,
    /// de-duplicated by IP:port and sorted as kube-proxy sorts them. Copies of one IP:port
    /// that disagree (conditions, node, hints) are reported: only one of them is used.
    pub fn endpoints_for(&self, port: &PortName, problems: &mut Vec<Problem>) -> Vec<Endpoint> {
        let key = (port.namespace.clone(), port.name.clone());
        let Some(slices) = self.by_service.get(&key) else {
            return Vec::new();
        };
        let address_type = match port.family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        // IP:port → (endpoint, the slice it came from).
        let mut merged: BTreeMap<String, (Endpoint, &Slice)> = BTreeMap::new();
        for slice in slices.iter().filter(|s| s.address_type == address_type) {
            for slice_port in slice.ports.iter().flatten() {
                // semantics 2.3: a nil name or a nil/zero port number is skipped (reported
                // once per slice by `check_ports`).
                let (Some(name), Some(number)) = (slice_port.name.as_ref(), slice_port.port) else {
                    continue;
                };
                if *name != port.port
                    || Proto::parse(slice_port.protocol.as_deref()) != Some(port.proto)
                {
                    continue;
                }
                let Some(number) = u16::try_from(number).ok().filter(|n| *n != 0) else {
                    continue;
                };
                for ep in slice.endpoints.iter() {
                    let Some(endpoint) = self.endpoint(ep, number, port.family) else {
                        continue;
                    };
                    let key = endpoint.sort_key();
                    match merged.get(&key) {
                        Some((first, _)) if *first == endpoint => {}
                        // semantics 2.6: keep the first unless a later copy is not
                        // terminating, which replaces it (whether or not the first is).
                        Some((first, from)) => {
                            let replace = !endpoint.terminating;
                            let (used, unused) = if replace {
                                ((&endpoint, *slice), (first, *from))
                            } else {
                                ((first, *from), (&endpoint, *slice))
                            };
                            // A terminating copy losing to a running one is the normal case of
                            // a reused pod IP: not a problem worth a log line.
                            if !unused.0.terminating || used.0.terminating {
                                problems.push(Problem {
                                reason: ProblemReason::DuplicateEndpoint,
                                object: slice_name(unused.1),
                                message: format!(
                                    "endpoint {key} of port {port} is also in {} with {}; that copy is used",
                                    slice_name(used.1),
                                    differences(unused.0, used.0)
                                ),
                            });
                            }
                            if replace {
                                merged.insert(key, (endpoint, slice));
                            }
                        }
                        None => {
                            merged.insert(key, (endpoint, slice));
                        }
                    }
                }
            }
        }
        merged.into_values().map(|(e, _)| e).collect()
    }

    fn endpoint(&self, ep: &SliceEndpoint, port: u16, family: Family) -> Option<Endpoint> {
        // semantics 2.7: only addresses[0]; parsed leniently (leading zeros) and re-printed.
        let Address::Ip(addr) = ep.address else {
            return None;
        };
        if Family::of(&addr) != family {
            return None;
        }
        let node_name = ep.node_name.clone();
        let local = !self.node_name.is_empty() && node_name.as_deref() == Some(&self.node_name);
        Some(Endpoint {
            addr,
            port,
            local,
            node_name,
            // semantics 3.1
            ready: ep.ready != Some(false),
            serving: ep.serving != Some(false),
            terminating: ep.terminating == Some(true),
            hints: ep.hints.clone(),
        })
    }
}

/// How two copies of one endpoint differ, "here" being `this`.
fn differences(this: &Endpoint, that: &Endpoint) -> String {
    let mut out = Vec::new();
    let mut compare = |what: &str, here: String, there: String| {
        if here != there {
            out.push(format!("{what} {here} here, {there} there"));
        }
    };
    compare("ready", this.ready.to_string(), that.ready.to_string());
    compare(
        "serving",
        this.serving.to_string(),
        that.serving.to_string(),
    );
    compare(
        "terminating",
        this.terminating.to_string(),
        that.terminating.to_string(),
    );
    let node = |e: &Endpoint| e.node_name.as_deref().unwrap_or("<none>").to_string();
    compare("nodeName", node(this), node(that));
    compare(
        "zone hints",
        format!("{:?}", this.zone_hints()),
        format!("{:?}", that.zone_hints()),
    );
    compare(
        "node hints",
        format!("{:?}", this.node_hints()),
        format!("{:?}", that.node_hints()),
    );
    out.join(", ")
}

fn slice_name(slice: &Slice) -> String {
    slice.object_name()
}

/// Reports the ports of a slice that can never match (semantics 2.3, 12.8: skipped with an
/// error log).
fn check_ports(slice: &Slice, object: &str, problems: &mut Vec<Problem>) {
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let what = match &p.name {
            Some(name) => format!("port {name:?}"),
            None => format!("port #{i}"),
        };
        let message = match (&p.name, p.port) {
            (None, _) => "has no name (not even \"\"); skipped".to_string(),
            _ if Proto::parse(p.protocol.as_deref()).is_none() => format!(
                "has unknown protocol {:?}; skipped",
                p.protocol.as_deref().unwrap_or("")
            ),
            (_, None) => "has no port number; skipped".to_string(),
            (_, Some(n)) if !(1..=65535).contains(&n) => {
                format!("number {n} is not in 1-65535; skipped")
            }
            _ => continue,
        };
        problems.push(Problem {
            reason: ProblemReason::InvalidPort,
            object: object.to_string(),
            message: format!("{what} {message}"),
        });
    }
}

/// Reports endpoints whose first address cannot be used in a slice of `family`: missing,
/// unparsable or of the other family (semantics 1.7, 2.7). One line per kind of fault, so a
/// slice of 10k bad endpoints does not flood the log.
fn check_addresses(slice: &Slice, family: Family, object: &str, problems: &mut Vec<Problem>) {
    let (mut missing, mut garbage, mut wrong) = (0usize, Vec::new(), Vec::new());
    for ep in slice.endpoints.iter() {
        match &ep.address {
            Address::Missing => missing += 1,
            Address::Invalid(raw) => garbage.push(raw.to_string()),
            Address::Ip(ip) if Family::of(ip) != family => wrong.push(ip.to_string()),
            Address::Ip(_) => {}
        }
    }
    if missing > 0 {
        problems.push(Problem {
            reason: ProblemReason::InvalidEndpoint,
            object: object.to_string(),
            message: format!("{missing} endpoint(s) without an address; skipped"),
        });
    }
    let examples = |list: &[String]| {
        let shown: Vec<String> = list.iter().take(3).map(|s| format!("{s:?}")).collect();
        let more = if list.len() > 3 { ", ..." } else { "" };
        format!("{}{more}", shown.join(", "))
    };
    if !garbage.is_empty() {
        problems.push(Problem {
            reason: ProblemReason::InvalidEndpoint,
            object: object.to_string(),
            message: format!(
                "{} endpoint address(es) are not IP addresses ({}); skipped",
                garbage.len(),
                examples(&garbage)
            ),
        });
    }
    if !wrong.is_empty() {
        problems.push(Problem {
            reason: ProblemReason::InvalidEndpoint,
            object: object.to_string(),
            message: format!(
                "{} endpoint address(es) are not {} like the slice's addressType ({}); skipped",
                wrong.len(),
                family.api_name(),
                examples(&wrong)
            ),
        });
    }
}
