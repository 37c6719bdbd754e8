//! Table-driven tests of kube-proxy's rules: YAML in, backends per frontend out.
//!
//! Every case cites the facts of `../shared/kube-proxy-semantics.md` it checks. Unless a case
//! says otherwise, the proxy runs on node `node-a` without a zone label, and the Service is
//! `default/web` (ClusterIP 10.96.0.10, port `http` 80/TCP) whose slices expose `http` on
//! 8080/TCP.

use std::net::IpAddr;

use super::*;
use crate::snapshot::{NodeInfo, Snapshot};
use explain::{EndpointVerdict, ExclusionCause};

/// A snapshot of YAML documents (Services and EndpointSlices, separated by `---`) on node
/// `node` in zone `zone`; also used by the agent's tests.
pub(crate) fn snapshot(yaml: &str, node: &str, zone: Option<&str>) -> Snapshot {
    let mut s = Snapshot {
        node: NodeInfo {
            name: node.into(),
            zone: zone.map(String::from),
            addresses: Vec::new(),
            ..Default::default()
        },
        ..Default::default()
    };
    for doc in yaml.split("\n---\n") {
        let v: serde_norway::Value = serde_norway::from_str(doc).unwrap();
        match v["kind"].as_str() {
            Some("Service") => s
                .services
                .push(std::sync::Arc::new(serde_norway::from_value(v).unwrap())),
            Some("EndpointSlice") => s
                .slices
                .push(std::sync::Arc::new(serde_norway::from_value(v).unwrap())),
            _ => panic!("unexpected doc {doc}"),
        }
    }
    s
}

/// "IP:port" as kube-proxy prints it (IPv6 in brackets).
fn host_port(addr: &IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn frontend_of<'a>(d: &'a Desired, frontend: &str) -> Option<&'a FrontendState> {
    d.frontends
        .iter()
        .find(|(k, _)| k.to_string() == frontend)
        .map(|(_, v)| v)
}

fn backends_of(d: &Desired, frontend: &str) -> Vec<String> {
    let f = frontend_of(d, frontend)
        .unwrap_or_else(|| panic!("no frontend {frontend} in {:?}", d.frontends.keys()));
    f.backends
        .iter()
        .map(|b| host_port(&b.addr, b.port))
        .collect()
}

fn port_of<'a>(d: &'a Desired, port: &str) -> Option<&'a ServicePort> {
    d.ports.values().find(|p| p.name.to_string() == port)
}

fn strings(endpoints: &[Endpoint]) -> Vec<String> {
    endpoints
        .iter()
        .map(|e| host_port(&e.addr, e.port))
        .collect()
}

// ---- YAML builders -------------------------------------------------------------------------

/// Joins YAML documents into one snapshot.
fn docs(parts: &[&str]) -> String {
    parts.join("\n---\n")
}

/// A Service; `meta` and `spec` are YAML flow mappings without their braces.
fn service(meta: &str, spec: &str) -> String {
    format!("kind: Service\nmetadata: {{{meta}}}\nspec: {{{spec}}}")
}

/// `default/web`, ClusterIP 10.96.0.10, port `http` 80/TCP, plus `extra` spec entries.
fn web(extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { ", " };
    service(
        "name: web, namespace: default",
        &format!(
            "clusterIP: 10.96.0.10, ports: [{{name: http, port: 80, protocol: TCP}}]{sep}{extra}"
        ),
    )
}

/// An EndpointSlice; `meta` is a flow mapping without braces, `ports` a flow list, each
/// endpoint a flow mapping.
fn slice_of(meta: &str, address_type: &str, ports: &str, endpoints: &[&str]) -> String {
    format!(
        "kind: EndpointSlice\nmetadata: {{{meta}}}\naddressType: {address_type}\nports: {ports}\nendpoints: [{}]",
        endpoints.join(", ")
    )
}

/// An IPv4 slice of `default/web` exposing `http` on 8080/TCP.
fn slice(name: &str, endpoints: &[&str]) -> String {
    slice_ports(name, "[{name: http, port: 8080, protocol: TCP}]", endpoints)
}

/// An IPv4 slice of `default/web` with the given ports.
fn slice_ports(name: &str, ports: &str, endpoints: &[&str]) -> String {
    slice_of(
        &format!("name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}"),
        "IPv4",
        ports,
        endpoints,
    )
}

/// An IPv6 slice of `default/web` exposing `http` on 8080/TCP.
fn slice6(name: &str, endpoints: &[&str]) -> String {
    slice_of(
        &format!("name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}"),
        "IPv6",
        "[{name: http, port: 8080, protocol: TCP}]",
        endpoints,
    )
}

// ---- The table -----------------------------------------------------------------------------

/// The ClusterIP frontend and the Service port of `default/web`.
const FE: &str = "10.96.0.10:80/TCP";
const P: &str = "default/web:http/TCP";
const EXT: &str = "203.0.113.7:80/TCP";
const EXT_TC: &str = "external 203.0.113.7:80/TCP";

/// A ready endpoint on this node and one on another node.
const LOCAL_A: &str = "{addresses: [10.244.1.1], nodeName: node-a}";
const REMOTE_B: &str = "{addresses: [10.244.2.1], nodeName: node-b}";

#[derive(Debug)]
enum Expect {
    /// The frontend exists; new connections go to exactly these backends, in this order.
    Backends(&'static str, &'static [&'static str]),
    /// Exactly these frontends are programmed.
    Frontends(&'static [&'static str]),
    /// Exactly these Service ports are known.
    Ports(&'static [&'static str]),
    /// `ServicePort.endpoints.cluster` of the port.
    Cluster(&'static str, &'static [&'static str]),
    /// `ServicePort.endpoints.local` of the port.
    Local(&'static str, &'static [&'static str]),
    /// `ServicePort.endpoints.all` of the port (after merging and de-duplication).
    All(&'static str, &'static [&'static str]),
    /// `FrontendState.no_local` of the frontend (drop instead of reject).
    NoLocal(&'static str, bool),
    /// `ServicePort.endpoints.has_any` of the port.
    HasAny(&'static str, bool),
    /// `ServicePort.etp_local` of the port.
    EtpLocal(&'static str, bool),
    /// `ServicePort.health_check_node_port` of the port.
    HealthCheck(&'static str, Option<u16>),
    /// `FrontendState.affinity_secs` of the frontend.
    Affinity(&'static str, Option<u32>),
    /// Some problem's text contains this.
    Problem(&'static str),
    /// No problem was recorded.
    NoProblems,
}
use Expect::*;

struct Case {
    name: &'static str,
    yaml: String,
    node: &'static str,
    zone: Option<&'static str>,
    expect: Vec<Expect>,
}

fn case(name: &'static str, yaml: String, expect: Vec<Expect>) -> Case {
    Case {
        name,
        yaml,
        node: "node-a",
        zone: None,
        expect,
    }
}

impl Case {
    fn on(mut self, node: &'static str, zone: Option<&'static str>) -> Case {
        self.node = node;
        self.zone = zone;
        self
    }
}

fn cases() -> Vec<Case> {
    vec![
        // ---- 1. Which Services and EndpointSlices are ignored ----
        // semantics 1.1
        case(
            "service-proxy-name label hides the Service",
            docs(&[
                &service(
                    "name: web, namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
                ),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Frontends(&[]), Ports(&[]), NoProblems],
        ),
        // semantics 1.1
        case(
            "headless label hides the Service",
            docs(&[
                &service(
                    "name: web, namespace: default, labels: {service.kubernetes.io/headless: ''}",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
                ),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Frontends(&[]), NoProblems],
        ),
        // semantics 1.3
        case(
            "clusterIP None is headless",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: None, clusterIPs: [None], ports: [{name: http, port: 80}]",
                ),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Frontends(&[]), NoProblems],
        ),
        // semantics 1.3
        case(
            "empty or missing clusterIP is skipped",
            docs(&[
                &service("name: web, namespace: default", "clusterIP: '', ports: [{name: http, port: 80}]"),
                &service("name: api, namespace: default", "ports: [{name: http, port: 80}]"),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Frontends(&[]), Ports(&[]), NoProblems],
        ),
        // semantics 1.3
        case(
            "ExternalName is skipped even with a clusterIP",
            docs(&[
                &web("type: ExternalName, externalName: db.example.com"),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Frontends(&[]), NoProblems],
        ),
        // semantics 1.1, 1.2
        case(
            "slices labelled service-proxy-name or headless are invisible",
            docs(&[
                &web(""),
                &slice("web-1", &[LOCAL_A]),
                &slice_of(
                    "name: web-2, namespace: default, labels: {kubernetes.io/service-name: web, service.kubernetes.io/service-proxy-name: other}",
                    "IPv4",
                    "[{name: http, port: 8080, protocol: TCP}]",
                    &[REMOTE_B],
                ),
                &slice_of(
                    "name: web-3, namespace: default, labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: ''}",
                    "IPv4",
                    "[{name: http, port: 8080, protocol: TCP}]",
                    &["{addresses: [10.244.3.1]}"],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        ),
        // semantics 1.5, 7.7, 12.6
        case(
            "LoadBalancer type proxied; spec.loadBalancerIP, class and selector not read",
            docs(&[
                &(web(
                    "type: LoadBalancer, loadBalancerIP: 198.51.100.9, loadBalancerClass: example.com/lb, selector: {app: nope}",
                ) + "\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}"),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![
                Frontends(&[FE, "198.51.100.1:80/TCP", "external 198.51.100.1:80/TCP"]),
                Backends(FE, &["10.244.1.1:8080"]),
                Backends("198.51.100.1:80/TCP", &["10.244.1.1:8080"]),
            ],
        ),
        // semantics 1.4, 10.3
        case(
            "dual-stack: each family uses its own clusterIPs entry and slices",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 10.96.0.10], ipFamilies: [IPv6, IPv4], ports: [{name: http, port: 80}]",
                ),
                &slice("web-4", &[LOCAL_A]),
                &slice6("web-6", &["{addresses: ['fd00:244::1'], nodeName: node-a}"]),
            ]),
            vec![
                Ports(&[P, "default/web:http/TCP/v6"]),
                Backends(FE, &["10.244.1.1:8080"]),
                Backends("[fd00::10]:80/TCP", &["[fd00:244::1]:8080"]),
            ],
        ),
        // semantics 1.4
        case(
            "empty ipFamilies: clusterIP serves its own family only",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 'fd00::10', ports: [{name: http, port: 80}]",
                ),
                &slice("web-4", &[LOCAL_A]),
                &slice6("web-6", &["{addresses: ['fd00:244::1']}"]),
            ]),
            vec![
                Frontends(&["[fd00::10]:80/TCP"]),
                Backends("[fd00::10]:80/TCP", &["[fd00:244::1]:8080"]),
            ],
        ),
        // semantics 1.4
        case(
            "ipFamilies without a clusterIPs entry: that family is absent (no clusterIP fallback)",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10], ipFamilies: [IPv4, IPv6], ports: [{name: http, port: 80}]",
                ),
                &service(
                    "name: api, namespace: default",
                    "clusterIP: 10.96.0.11, ipFamilies: [IPv4], ports: [{name: http, port: 80}]",
                ),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Frontends(&[FE]), Ports(&[P])],
        ),
        // semantics 1.4, 7.6, 7.7, 10.3
        case(
            "single-stack IPv4: IPv6 externalIPs, LB IPs and slices unused",
            docs(&[
                &(web("type: LoadBalancer, externalIPs: [203.0.113.7, '2001:db8::7']")
                    + "\nstatus: {loadBalancer: {ingress: [{ip: '2001:db8::8'}]}}"),
                &slice("web-4", &[LOCAL_A]),
                &slice6("web-6", &["{addresses: ['fd00:244::1']}"]),
            ]),
            vec![Frontends(&[FE, EXT, EXT_TC]), Ports(&[P]), NoProblems],
        ),
        // semantics 1.7
        case(
            "slices of another addressType (IPv6, FQDN) are ignored",
            docs(&[
                &web(""),
                &slice("web-4", &[LOCAL_A]),
                &slice6("web-6", &["{addresses: ['fd00:244::1']}"]),
                &slice_of(
                    "name: web-f, namespace: default, labels: {kubernetes.io/service-name: web}",
                    "FQDN",
                    "[{name: http, port: 8080, protocol: TCP}]",
                    &["{addresses: [pod.example.com]}"],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"]), NoProblems],
        ),
        // semantics 1.7, 2.7
        case(
            "endpoint with an address of the wrong family is ignored",
            docs(&[
                &web(""),
                &slice("web-1", &["{addresses: ['fd00:244::1'], nodeName: node-a}", LOCAL_A]),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        ),
        // semantics 1.8
        case(
            "slice without (or with empty) service-name label is ignored",
            docs(&[
                &web(""),
                &slice("web-1", &[LOCAL_A]),
                &slice_of(
                    "name: web-2, namespace: default",
                    "IPv4",
                    "[{name: http, port: 8080}]",
                    &[REMOTE_B],
                ),
                &slice_of(
                    "name: web-3, namespace: default, labels: {kubernetes.io/service-name: ''}",
                    "IPv4",
                    "[{name: http, port: 8080}]",
                    &["{addresses: [10.244.3.1]}"],
                ),
            ]),
            vec![
                Backends(FE, &["10.244.1.1:8080"]),
                Problem("EndpointSlice default/web-2"),
                Problem("EndpointSlice default/web-3"),
            ],
        ),
        // semantics 1.8
        case(
            "selector-less Service with a hand-made slice from any manager",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
                ),
                &slice_of(
                    "name: handmade, namespace: default, labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: my-operator}",
                    "IPv4",
                    "[{name: http, port: 8080}]",
                    &["{addresses: [192.0.2.10]}"],
                ),
            ]),
            vec![Backends(FE, &["192.0.2.10:8080"])],
        ),
        // semantics 1.8
        case(
            "slice of a same-named Service in another namespace is not used",
            docs(&[
                &web(""),
                &slice_of(
                    "name: web-1, namespace: other, labels: {kubernetes.io/service-name: web}",
                    "IPv4",
                    "[{name: http, port: 8080}]",
                    &[LOCAL_A],
                ),
            ]),
            vec![Backends(FE, &[]), HasAny(P, false)],
        ),
        // ---- 2. Port matching, merging and de-duplication ----
        // semantics 2.2
        case(
            "unnamed Service port matches slice port named \"\" only",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{port: 80}]",
                ),
                &slice_ports("web-1", "[{name: '', port: 8080}]", &[LOCAL_A]),
                &slice_ports("web-2", "[{name: http, port: 9090}]", &[REMOTE_B]),
            ]),
            vec![Ports(&["default/web/TCP"]), Backends(FE, &["10.244.1.1:8080"])],
        ),
        // semantics 2.2, 2.4, 12.2
        case(
            "port name must match; Service port number and targetPort play no part",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 9999}]",
                ),
                &slice_ports("web-1", "[{name: http, port: 8080}]", &[LOCAL_A]),
                &slice_ports("web-2", "[{name: web, port: 80}]", &[REMOTE_B]),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        ),
        // semantics 2.1, 2.2, 12.1
        case(
            "same port number on UDP and TCP are independent; protocol must match",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]",
                ),
                &slice_ports(
                    "web-1",
                    "[{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354, protocol: TCP}, {name: dns, port: 6000, protocol: TCP}]",
                    &[LOCAL_A],
                ),
            ]),
            vec![
                Frontends(&["10.96.0.10:53/TCP", "10.96.0.10:53/UDP"]),
                Backends("10.96.0.10:53/UDP", &["10.244.1.1:5353"]),
                Backends("10.96.0.10:53/TCP", &["10.244.1.1:5354"]),
            ],
        ),
        // semantics 12.1
        case(
            "SCTP ports are programmed like TCP and UDP (and reported as not served)",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{name: sig, port: 3868, protocol: SCTP}]",
                ),
                &slice_ports("web-1", "[{name: sig, port: 3868, protocol: SCTP}]", &[LOCAL_A]),
            ]),
            vec![Backends("10.96.0.10:3868/SCTP", &["10.244.1.1:3868"])],
        ),
        // semantics 2.3
        case(
            "slice port with a nil name is skipped (it does not match an unnamed port)",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{port: 80}]",
                ),
                &slice_ports("web-1", "[{port: 8080}]", &[LOCAL_A]),
            ]),
            vec![Backends(FE, &[]), HasAny("default/web/TCP", false)],
        ),
        // semantics 2.3
        case(
            "slice port with a nil or zero number is skipped",
            docs(&[
                &web(""),
                &slice_ports("web-1", "[{name: http}]", &[REMOTE_B]),
                &slice_ports("web-2", "[{name: http, port: 0}]", &["{addresses: [10.244.3.1]}"]),
                &slice("web-3", &[LOCAL_A]),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        ),
        // semantics 2.3
        case(
            "slice port without protocol is TCP",
            docs(&[&web(""), &slice_ports("web-1", "[{name: http, port: 8080}]", &[LOCAL_A])]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        ),
        // semantics 2.4
        case(
            "backend port comes from each slice",
            docs(&[
                &web(""),
                &slice_ports("web-1", "[{name: http, port: 8080}]", &[LOCAL_A]),
                &slice_ports("web-2", "[{name: http, port: 9090}]", &[REMOTE_B]),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.2.1:9090"])],
        ),
        // semantics 2.5
        case(
            "slices merged and sorted by the IP:port string",
            docs(&[
                &web(""),
                &slice("web-a", &["{addresses: [10.244.0.9]}"]),
                &slice("web-b", &["{addresses: [10.244.0.10]}", "{addresses: [10.244.0.100]}"]),
            ]),
            vec![Backends(
                FE,
                &["10.244.0.100:8080", "10.244.0.10:8080", "10.244.0.9:8080"],
            )],
        ),
        // semantics 2.5
        case(
            "same IP on two backend ports is two endpoints",
            docs(&[
                &web(""),
                &slice_ports("web-1", "[{name: http, port: 8080}]", &[LOCAL_A]),
                &slice_ports("web-2", "[{name: http, port: 9090}]", &[LOCAL_A]),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.1.1:9090"])],
        ),
        // semantics 2.6: a later copy that is not terminating replaces the first, whichever
        // node either names (not because it is this node's, as pre-1.36 code let it).
        case(
            "duplicate IP:port: a later non-terminating copy replaces the first",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice("web-1", &["{addresses: [10.244.0.5], nodeName: node-b}"]),
                &slice("web-2", &["{addresses: [10.244.0.5], nodeName: node-a}"]),
            ]),
            vec![
                All(P, &["10.244.0.5:8080"]),
                Local(P, &["10.244.0.5:8080"]),
                Backends(FE, &["10.244.0.5:8080"]),
            ],
        ),
        // semantics 2.6
        case(
            "duplicate IP:port: a later non-terminating copy replaces a local first one",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice("web-1", &["{addresses: [10.244.0.5], nodeName: node-a}"]),
                &slice("web-2", &["{addresses: [10.244.0.5], nodeName: node-b}"]),
            ]),
            vec![
                All(P, &["10.244.0.5:8080"]),
                Local(P, &[]),
                Backends(FE, &[]),
                NoLocal(FE, true),
            ],
        ),
        // semantics 2.6
        case(
            "duplicate IP:port: a non-terminating copy replaces a terminating one",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice(
                    "web-1",
                    &["{addresses: [10.244.0.5], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}"],
                ),
                &slice("web-2", &["{addresses: [10.244.0.5], nodeName: node-a}"]),
            ]),
            vec![
                All(P, &["10.244.0.5:8080"]),
                Local(P, &["10.244.0.5:8080"]),
                Backends(FE, &["10.244.0.5:8080"]),
            ],
        ),
        // semantics 2.6
        case(
            "duplicate IP:port in one slice: a terminating copy does not replace",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.0.5], nodeName: node-b}",
                        "{addresses: [10.244.0.5], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                    ],
                ),
            ]),
            vec![All(P, &["10.244.0.5:8080"]), Local(P, &[]), NoLocal(FE, true)],
        ),
        // semantics 2.7
        case(
            "only addresses[0] is used; endpoints without addresses skipped",
            docs(&[
                &web(""),
                &slice("web-1", &["{addresses: [10.244.1.1, 10.244.1.2]}", "{addresses: []}"]),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        ),
        // semantics 2.7
        case(
            "IPv4 with leading zeros parsed leniently and printed canonically",
            docs(&[&web(""), &slice("web-1", &["{addresses: ['010.244.001.007']}"])]),
            vec![Backends(FE, &["10.244.1.7:8080"])],
        ),
        // semantics 2.7: ParseIPSloppy files an IPv4-mapped IPv6 address as IPv4.
        case(
            "an IPv4-mapped IPv6 address in an IPv4 slice is its IPv4 address",
            docs(&[
                &web(""),
                &slice("web-1", &["{addresses: ['::ffff:10.244.1.7']}"]),
            ]),
            vec![Backends(FE, &["10.244.1.7:8080"])],
        ),
        // semantics 2.8
        case(
            "local iff nodeName equals the lower-cased node name",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], nodeName: node-a}",
                        "{addresses: [10.244.1.2], nodeName: Node-A}",
                        "{addresses: [10.244.1.3]}",
                        "{addresses: [10.244.1.4], nodeName: node-b}",
                    ],
                ),
            ]),
            vec![Local(P, &["10.244.1.1:8080"]), Backends(FE, &["10.244.1.1:8080"])],
        )
        .on("Node-A", None),
        // semantics 2.8
        case(
            "without a node name nothing is local; endpoint.zone is not read",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice("web-1", &["{addresses: [10.244.1.3], zone: zone-a}"]),
            ]),
            vec![Local(P, &[]), NoLocal(FE, true)],
        )
        .on("", Some("zone-a")),
        // semantics 2.10, 3.7
        case(
            "Service port without a matching slice port has no endpoints",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: metrics, port: 9100}]",
                ),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![
                Backends(FE, &["10.244.1.1:8080"]),
                Backends("10.96.0.10:9100/TCP", &[]),
                NoLocal("10.96.0.10:9100/TCP", false),
                HasAny("default/web:metrics/TCP", false),
            ],
        ),
        // ---- 3. Endpoint conditions and terminating fallback ----
        // semantics 3.1
        case(
            "missing conditions mean ready",
            docs(&[
                &web(""),
                &slice("web-1", &["{addresses: [10.244.1.1]}", "{addresses: [10.244.1.2], conditions: {}}"]),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.1.2:8080"])],
        ),
        // semantics 3.1, 3.5, 3.6
        case(
            "ready=false serving=true not terminating is never used",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &["{addresses: [10.244.1.1], conditions: {ready: false, serving: true, terminating: false}}"],
                ),
            ]),
            vec![Backends(FE, &[]), HasAny(P, false), All(P, &["10.244.1.1:8080"])],
        ),
        // semantics 1.5, 12.2
        case(
            "publishNotReadyAddresses is not read by the proxy",
            docs(&[
                &web("publishNotReadyAddresses: true"),
                &slice("web-1", &["{addresses: [10.244.1.1], conditions: {ready: false}}"]),
            ]),
            vec![Backends(FE, &[])],
        ),
        // semantics 3.2
        case(
            "ready and terminating counts as ready, alongside other ready endpoints",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], conditions: {ready: true, serving: true, terminating: true}}",
                        "{addresses: [10.244.1.2], conditions: {ready: true}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.1.2:8080"])],
        ),
        // semantics 3.3, 3.6
        case(
            "terminating fallback: serving and terminating when nothing is ready",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                        "{addresses: [10.244.2.1], nodeName: node-b, conditions: {ready: false, serving: false, terminating: true}}",
                        "{addresses: [10.244.3.1], nodeName: node-c, conditions: {ready: false, serving: true, terminating: true}}",
                    ],
                ),
            ]),
            vec![
                Backends(FE, &["10.244.1.1:8080", "10.244.3.1:8080"]),
                HasAny(P, true),
            ],
        ),
        // semantics 3.1, 3.3
        case(
            "terminating with serving unset counts as serving",
            docs(&[
                &web(""),
                &slice("web-1", &["{addresses: [10.244.1.1], conditions: {ready: false, terminating: true}}"]),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        ),
        // semantics 3.3
        case(
            "no terminating fallback while any endpoint is ready",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                        REMOTE_B,
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.2.1:8080"])],
        ),
        // ---- internalTrafficPolicy Local ----
        // semantics 3.4, 4.4, 4.6, 4.9
        case(
            "ITP Local: ClusterIP uses local ready endpoints only",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice(
                    "web-1",
                    &[
                        LOCAL_A,
                        REMOTE_B,
                        "{addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                    ],
                ),
            ]),
            vec![
                Backends(FE, &["10.244.1.1:8080"]),
                Local(P, &["10.244.1.1:8080"]),
                Cluster(P, &[]),
                NoLocal(FE, false),
            ],
        ),
        // semantics 3.4
        case(
            "ITP Local: local serving-terminating fallback although remote ready exist",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.2], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                        "{addresses: [10.244.1.3], nodeName: node-a, conditions: {ready: false, serving: false, terminating: true}}",
                        REMOTE_B,
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.2:8080"]), NoLocal(FE, false)],
        ),
        // semantics 3.8, 3.6
        case(
            "ITP Local: endpoints elsewhere but none local -> drop (no_local)",
            docs(&[&web("internalTrafficPolicy: Local"), &slice("web-1", &[REMOTE_B])]),
            vec![Backends(FE, &[]), NoLocal(FE, true), HasAny(P, true)],
        ),
        // semantics 3.7, 3.8
        case(
            "ITP Local: no usable endpoint anywhere -> reject, not drop",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.2.1], nodeName: node-b, conditions: {ready: false, serving: true}}",
                        "{addresses: [10.244.1.1], nodeName: node-a, conditions: {ready: false, serving: false, terminating: true}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &[]), NoLocal(FE, false), HasAny(P, false)],
        ),
        // semantics 3.7, 3.8
        case(
            "ITP Local: no slices at all -> reject",
            web("internalTrafficPolicy: Local"),
            vec![Backends(FE, &[]), NoLocal(FE, false)],
        ),
        // semantics 4.4, 4.10
        case(
            "ITP Local + ETP Cluster: ClusterIP local set, externalIP cluster set",
            docs(&[
                &web("internalTrafficPolicy: Local, externalIPs: [203.0.113.7]"),
                &slice("web-1", &[LOCAL_A, REMOTE_B]),
            ]),
            vec![
                Backends(FE, &["10.244.1.1:8080"]),
                Backends(EXT, &["10.244.1.1:8080", "10.244.2.1:8080"]),
                Cluster(P, &["10.244.1.1:8080", "10.244.2.1:8080"]),
                NoLocal(EXT, false),
            ],
        ),
        // ---- externalTrafficPolicy Local ----
        // semantics 4.2, 4.4
        case(
            "ETP Local on a plain ClusterIP Service has no effect",
            docs(&[
                &web("externalTrafficPolicy: Local"),
                &slice("web-1", &[LOCAL_A, REMOTE_B]),
            ]),
            vec![
                EtpLocal(P, false),
                Local(P, &[]),
                Backends(FE, &["10.244.1.1:8080", "10.244.2.1:8080"]),
            ],
        ),
        // semantics 4.2, 4.3, 4.4, 4.6
        case(
            "ETP Local on NodePort: local set computed, ClusterIP keeps the cluster set",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "type: NodePort, externalTrafficPolicy: Local, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, nodePort: 30080}]",
                ),
                &slice("web-1", &[LOCAL_A, REMOTE_B]),
            ]),
            vec![
                EtpLocal(P, true),
                Local(P, &["10.244.1.1:8080"]),
                Cluster(P, &["10.244.1.1:8080", "10.244.2.1:8080"]),
                Backends(FE, &["10.244.1.1:8080", "10.244.2.1:8080"]),
                HealthCheck(P, None),
            ],
        ),
        // semantics 4.2, 4.7
        case(
            "ETP Local with externalIPs on a ClusterIP Service: node-local clients use the cluster set",
            docs(&[
                &web("externalTrafficPolicy: Local, externalIPs: [203.0.113.7]"),
                &slice("web-1", &[LOCAL_A, REMOTE_B]),
            ]),
            vec![
                EtpLocal(P, true),
                Local(P, &["10.244.1.1:8080"]),
                Backends(EXT, &["10.244.1.1:8080", "10.244.2.1:8080"]),
            ],
        ),
        // semantics 3.9, 4.7
        case(
            "ETP Local, no local endpoint: local set empty, short-circuit still served",
            docs(&[
                &web("externalTrafficPolicy: Local, externalIPs: [203.0.113.7]"),
                &slice("web-1", &[REMOTE_B]),
            ]),
            vec![
                Local(P, &[]),
                Backends(EXT, &["10.244.2.1:8080"]),
                Backends(FE, &["10.244.2.1:8080"]),
                NoLocal(FE, false),
                NoLocal(EXT, false),
            ],
        ),
        // semantics 8.1
        case(
            "LoadBalancer with ETP Local has its healthCheckNodePort",
            docs(&[
                &(web("type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000")
                    + "\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}"),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![HealthCheck(P, Some(32000)), EtpLocal(P, true)],
        ),
        // ---- 5. Topology ----
        // semantics 5.6, 5.8
        case(
            "zone hints: every ready endpoint hinted and this zone present -> same zone",
            docs(&[
                &web("externalIPs: [203.0.113.7]"),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], nodeName: node-x, hints: {forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1], nodeName: node-y, hints: {forZones: [{name: zone-b}]}}",
                        "{addresses: [10.244.1.2], nodeName: node-z, hints: {forZones: [{name: zone-b}, {name: zone-a}]}}",
                    ],
                ),
            ]),
            vec![
                Backends(FE, &["10.244.1.1:8080", "10.244.1.2:8080"]),
                Backends(EXT, &["10.244.1.1:8080", "10.244.1.2:8080"]),
            ],
        )
        .on("node-a", Some("zone-a")),
        // semantics 5.7
        case(
            "partial zone hints -> all ready endpoints",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1]}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.2.1:8080"])],
        )
        .on("node-a", Some("zone-a")),
        // semantics 5.7
        case(
            "empty forZones list counts as no hint",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1], hints: {forZones: []}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.2.1:8080"])],
        )
        .on("node-a", Some("zone-a")),
        // semantics 5.6, 5.7
        case(
            "this zone not among the hints -> all ready endpoints",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1], hints: {forZones: [{name: zone-b}]}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.2.1:8080"])],
        )
        .on("node-a", Some("zone-c")),
        // semantics 5.3, 5.6
        case(
            "node without a zone label ignores zone hints",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1], hints: {forZones: [{name: zone-b}]}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.2.1:8080"])],
        ),
        // semantics 5.4
        case(
            "non-ready endpoints are ignored when checking that all are hinted",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1], hints: {forZones: [{name: zone-b}]}}",
                        "{addresses: [10.244.3.1], conditions: {ready: false}}",
                        "{addresses: [10.244.3.2], conditions: {ready: false, serving: true, terminating: true}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        )
        .on("node-a", Some("zone-a")),
        // semantics 5.5
        case(
            "node hints are preferred over zone hints",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forNodes: [{name: node-a}], forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.1.2], hints: {forNodes: [{name: node-b}], forZones: [{name: zone-a}]}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        )
        .on("node-a", Some("zone-a")),
        // semantics 5.5, 5.7
        case(
            "partial node hints fall back to zone hints",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forNodes: [{name: node-a}], forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.1.2], hints: {forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1], hints: {forNodes: [{name: node-c}], forZones: [{name: zone-b}]}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.1.2:8080"])],
        )
        .on("node-a", Some("zone-a")),
        // semantics 5.5, 5.6
        case(
            "node hints not naming this node fall back to zone hints",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forNodes: [{name: node-a}], forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1], hints: {forNodes: [{name: node-b}], forZones: [{name: zone-b}]}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        )
        .on("node-c", Some("zone-a")),
        // semantics 2.8, 5.5
        case(
            "node hints are matched against the lower-cased node name",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forNodes: [{name: node-a}]}}",
                        "{addresses: [10.244.2.1], hints: {forNodes: [{name: node-b}]}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        )
        .on("Node-A", None),
        // semantics 5.8, 3.4
        case(
            "topology does not filter the local set",
            docs(&[
                &web("internalTrafficPolicy: Local"),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], nodeName: node-a, hints: {forZones: [{name: zone-b}]}}",
                        "{addresses: [10.244.2.1], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}",
                    ],
                ),
            ]),
            vec![Local(P, &["10.244.1.1:8080"]), Backends(FE, &["10.244.1.1:8080"])],
        )
        .on("node-a", Some("zone-a")),
        // semantics 5.4, 5.8, 3.3
        case(
            "topology does not filter the terminating fallback",
            docs(&[
                &web(""),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1], conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-b}]}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080", "10.244.2.1:8080"])],
        )
        .on("node-a", Some("zone-a")),
        // semantics 5.1
        case(
            "hints are used whatever the annotation or trafficDistribution say",
            docs(&[
                &service(
                    "name: web, namespace: default, annotations: {service.kubernetes.io/topology-mode: Disabled}",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
                ),
                &slice(
                    "web-1",
                    &[
                        "{addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}}",
                        "{addresses: [10.244.2.1], hints: {forZones: [{name: zone-b}]}}",
                    ],
                ),
            ]),
            vec![Backends(FE, &["10.244.1.1:8080"])],
        )
        .on("node-a", Some("zone-a")),
        // ---- 6. Session affinity ----
        // semantics 6.1, 6.2
        case(
            "ClientIP affinity defaults to 10800 s on every frontend of the port",
            docs(&[
                &web("sessionAffinity: ClientIP, externalIPs: [203.0.113.7]"),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Affinity(FE, Some(DEFAULT_AFFINITY_SECS)), Affinity(EXT, Some(10_800))],
        ),
        // semantics 6.1
        case(
            "ClientIP affinity with an explicit timeout",
            docs(&[
                &web("sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}"),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Affinity(FE, Some(60))],
        ),
        // semantics 6.1
        case(
            "sessionAffinity None ignores sessionAffinityConfig",
            docs(&[
                &web("sessionAffinity: None, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}"),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Affinity(FE, None)],
        ),
        // ---- 7. externalIPs and load balancer IPs ----
        // semantics 7.6, 12.8
        case(
            "externalIPs: own family only, unparsable ones are a problem and skipped",
            docs(&[
                &web("externalIPs: [203.0.113.7, '2001:db8::7', not-an-ip]"),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![
                Frontends(&[FE, EXT, EXT_TC]),
                Backends(EXT, &["10.244.1.1:8080"]),
                Problem("not-an-ip"),
            ],
        ),
        // semantics 7.7, 4.1
        case(
            "LB ingress: nil and VIP ipMode programmed, Proxy and hostname-only not",
            docs(&[
                &(web("type: LoadBalancer")
                    + "\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2, ipMode: VIP}, {ip: 198.51.100.3, ipMode: Proxy}, {hostname: lb.example.com}]}}"),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![
                Frontends(&[
                    FE,
                    "198.51.100.1:80/TCP",
                    "198.51.100.2:80/TCP",
                    "external 198.51.100.1:80/TCP",
                    "external 198.51.100.2:80/TCP",
                ]),
                Backends("198.51.100.2:80/TCP", &["10.244.1.1:8080"]),
                NoProblems,
            ],
        ),
        // ---- invalid input never aborts (12.8) ----
        // semantics 12.8
        case(
            "Service port 0 is a problem; other ports still programmed",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{name: bad, port: 0}, {name: http, port: 80}]",
                ),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Problem("port 0"), Ports(&[P]), Backends(FE, &["10.244.1.1:8080"])],
        ),
        // semantics 12.8
        case(
            "Service port above 65535 is a problem",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{name: big, port: 70000}, {name: http, port: 80}]",
                ),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Problem("port 70000"), Ports(&[P])],
        ),
        // semantics 12.1, 12.8
        case(
            "unknown protocol is a problem",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{name: icmp, port: 81, protocol: ICMP}, {name: http, port: 80}]",
                ),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![Problem("ICMP"), Ports(&[P]), Frontends(&[FE])],
        ),
        // semantics 2.1, 12.8
        case(
            "duplicate port name and protocol: the later one kept, problem recorded",
            docs(&[
                &service(
                    "name: web, namespace: default",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: http, port: 81}]",
                ),
                &slice("web-1", &[LOCAL_A]),
            ]),
            vec![
                Problem("duplicate port name \"http\"/TCP: port 80 ignored"),
                Ports(&[P]),
                Frontends(&["10.96.0.10:81/TCP"]),
            ],
        ),
        // semantics 12.8
        case(
            "two Services claim one frontend: first by namespace/name wins",
            docs(&[
                &web(""),
                &service(
                    "name: zeta, namespace: apps",
                    "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
                ),
                &slice("web-1", &[LOCAL_A]),
                &slice_of(
                    "name: zeta-1, namespace: apps, labels: {kubernetes.io/service-name: zeta}",
                    "IPv4",
                    "[{name: http, port: 8080}]",
                    &[REMOTE_B],
                ),
            ]),
            vec![
                Frontends(&[FE]),
                Backends(FE, &["10.244.2.1:8080"]),
                Problem("already used by apps/zeta:http/TCP"),
            ],
        ),
    ]
}

/// Checks one case; returns what did not match.
fn check(case: &Case) -> Vec<String> {
    let d = compile(&snapshot(&case.yaml, case.node, case.zone));
    let mut errors = Vec::new();
    let mut expect = |ok: bool, e: &Expect, got: String| {
        if !ok {
            errors.push(format!("{e:?}: got {got}"));
        }
    };
    let want = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    for e in &case.expect {
        match e {
            Backends(fe, list) => match frontend_of(&d, fe) {
                Some(_) => {
                    let got = backends_of(&d, fe);
                    expect(got == want(list), e, format!("{got:?}"));
                }
                None => expect(
                    false,
                    e,
                    format!("no such frontend in {:?}", d.frontends.keys()),
                ),
            },
            Frontends(list) => {
                let mut got: Vec<String> = d.frontends.keys().map(|k| k.to_string()).collect();
                got.sort();
                let mut want = want(list);
                want.sort();
                expect(got == want, e, format!("{got:?}"));
            }
            Ports(list) => {
                let mut got: Vec<String> = d.ports.keys().map(|k| k.to_string()).collect();
                got.sort();
                let mut want = want(list);
                want.sort();
                expect(got == want, e, format!("{got:?}"));
            }
            Cluster(port, list) | Local(port, list) | All(port, list) => match port_of(&d, port) {
                Some(sp) => {
                    let set = match e {
                        Cluster(..) => sp.endpoints.cluster().to_vec(),
                        Local(..) => sp.endpoints.local().to_vec(),
                        _ => sp.endpoints.all().to_vec(),
                    };
                    let set = &set;
                    let got = strings(set);
                    expect(got == want(list), e, format!("{got:?}"));
                }
                None => expect(false, e, "no such port".into()),
            },
            NoLocal(fe, want) => match frontend_of(&d, fe) {
                Some(f) => expect(f.no_local == *want, e, format!("{}", f.no_local)),
                None => expect(false, e, "no such frontend".into()),
            },
            Affinity(fe, want) => match frontend_of(&d, fe) {
                Some(f) => expect(
                    f.affinity_secs == *want,
                    e,
                    format!("{:?}", f.affinity_secs),
                ),
                None => expect(false, e, "no such frontend".into()),
            },
            HasAny(port, want) => match port_of(&d, port) {
                Some(sp) => expect(
                    sp.endpoints.has_any == *want,
                    e,
                    format!("{}", sp.endpoints.has_any),
                ),
                None => expect(false, e, "no such port".into()),
            },
            EtpLocal(port, want) => match port_of(&d, port) {
                Some(sp) => expect(sp.etp_local == *want, e, format!("{}", sp.etp_local)),
                None => expect(false, e, "no such port".into()),
            },
            HealthCheck(port, want) => match port_of(&d, port) {
                Some(sp) => expect(
                    sp.health_check_node_port == *want,
                    e,
                    format!("{:?}", sp.health_check_node_port),
                ),
                None => expect(false, e, "no such port".into()),
            },
            Problem(text) => expect(
                d.problems.iter().any(|p| p.to_string().contains(text)),
                e,
                format!("{:?}", d.problems),
            ),
            NoProblems => expect(d.problems.is_empty(), e, format!("{:?}", d.problems)),
        }
    }
    errors
}

#[test]
fn semantics_table() {
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        for error in check(case) {
            failures.push(format!("[{}] {error}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed expectation(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn table_has_enough_distinct_cases() {
    let cases = cases();
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "duplicate case names");
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    assert!(cases.iter().all(|c| !c.expect.is_empty()));
}

const SVC: &str = "kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, protocol: TCP}]
---
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.2]
  nodeName: node-a
- addresses: [10.244.0.3]
  nodeName: node-b
  conditions: {ready: false}";

#[test]
fn clusterip_ready_endpoints_only() {
    // semantics 3.1, 3.2, 3.5
    let d = compile(&snapshot(SVC, "node-a", None));
    assert_eq!(backends_of(&d, "10.96.0.10:80/TCP"), ["10.244.0.2:8080"]);
}

#[test]
fn backends_carry_protocol_locality_and_terminating() {
    // semantics 2.8, 3.3: the fallback set is flagged terminating; locality per nodeName.
    let yaml = docs(&[
        &web(""),
        &slice(
            "web-1",
            &[
                "{addresses: [10.244.1.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                "{addresses: [10.244.2.1], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}",
            ],
        ),
    ]);
    let d = compile(&snapshot(&yaml, "node-a", None));
    let f = frontend_of(&d, FE).unwrap();
    assert_eq!(f.kind, FrontendKind::ClusterIp);
    let flags: Vec<_> = f
        .backends
        .iter()
        .map(|b| (b.proto, b.local, b.terminating, b.weight))
        .collect();
    assert_eq!(
        flags,
        [(Proto::Tcp, true, true, 1), (Proto::Tcp, false, true, 1)]
    );
}

fn keep_flows_of(d: &Desired, frontend: &str) -> Vec<String> {
    let f = frontend_of(d, frontend)
        .unwrap_or_else(|| panic!("no frontend {frontend} in {:?}", d.frontends.keys()));
    f.keep_flows
        .iter()
        .map(|b| host_port(&b.addr, b.port))
        .collect()
}

#[test]
fn serving_endpoints_new_flows_may_not_use_keep_their_flows() {
    // semantics 9.3: kube-proxy's conntrack cleanup counts every serving endpoint, whatever
    // the terminating state, topology and traffic policy say; an endpoint that is not
    // serving is not kept.
    let endpoints = [
        "{addresses: [10.244.0.1], nodeName: node-a, conditions: {ready: true}}",
        "{addresses: [10.244.0.2], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
        "{addresses: [10.244.1.1], nodeName: node-b, conditions: {ready: true}}",
        "{addresses: [10.244.1.2], nodeName: node-b, conditions: {ready: false, serving: false, terminating: true}}",
    ];
    let ports = "[{name: http, port: 8080, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]";
    let spec = |policy: &str| {
        format!(
            "clusterIP: 10.96.0.10, internalTrafficPolicy: {policy}, \
             ports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]"
        )
    };
    let yaml = |policy: &str| {
        docs(&[
            &service("name: web, namespace: default", &spec(policy)),
            &slice_ports("web-1", ports, &endpoints),
        ])
    };
    // Cluster: the terminating endpoint keeps its flows, for both protocols.
    let d = compile(&snapshot(&yaml("Cluster"), "node-a", None));
    for (fe, port) in [("10.96.0.10:80/TCP", 8080), ("10.96.0.10:53/UDP", 53)] {
        assert_eq!(
            backends_of(&d, fe),
            [format!("10.244.0.1:{port}"), format!("10.244.1.1:{port}")],
            "{fe}"
        );
        assert_eq!(
            keep_flows_of(&d, fe),
            [format!("10.244.0.2:{port}")],
            "{fe}"
        );
    }
    // Local: the remote endpoint too (a policy change does not cut flows).
    let d = compile(&snapshot(&yaml("Local"), "node-a", None));
    assert_eq!(backends_of(&d, "10.96.0.10:80/TCP"), ["10.244.0.1:8080"]);
    assert_eq!(
        keep_flows_of(&d, "10.96.0.10:80/TCP"),
        ["10.244.0.2:8080", "10.244.1.1:8080"]
    );
    // Every endpoint in use: nothing more to keep.
    let yaml = docs(&[&web(""), &slice("web-1", &[LOCAL_A, REMOTE_B])]);
    let d = compile(&snapshot(&yaml, "node-a", None));
    assert_eq!(backends_of(&d, FE).len(), 2);
    assert!(keep_flows_of(&d, FE).is_empty());
}

#[test]
fn compile_is_deterministic_whatever_the_input_order() {
    // semantics 2.5, 2.6: merging and frontend claims do not depend on list order.
    let yaml = docs(&[
        &web(""),
        &service(
            "name: zeta, namespace: apps",
            "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
        ),
        &slice("web-2", &["{addresses: [10.244.0.5], nodeName: node-a}"]),
        &slice(
            "web-1",
            &["{addresses: [10.244.0.5], nodeName: node-b}", REMOTE_B],
        ),
    ]);
    let forward = snapshot(&yaml, "node-a", None);
    let mut reversed = forward.clone();
    reversed.services.reverse();
    reversed.slices.reverse();
    assert_eq!(compile(&forward), compile(&reversed));
}

// ---- External scope (tc): NodePorts, externalIPs, load balancer IPs -------------------------

/// `default/web` of type `svc_type` with NodePort 30080, externalIP 203.0.113.7, load balancer
/// IP 198.51.100.1 and `extra` spec entries; one local and one remote endpoint.
fn external_web(svc_type: &str, extra: &str) -> Snapshot {
    let svc = format!(
        "kind: Service\nmetadata: {{name: web, namespace: default}}\nspec: {{type: {svc_type}, \
         clusterIP: 10.96.0.10, externalIPs: [203.0.113.7], \
         ports: [{{name: http, port: 80, nodePort: 30080, protocol: TCP}}]{extra}}}\n\
         status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.1}}]}}}}"
    );
    let yaml = docs(&[
        &svc,
        &slice(
            "web-1",
            &[
                "{addresses: [10.244.0.2], nodeName: node-a}",
                "{addresses: [10.244.1.2], nodeName: node-b}",
            ],
        ),
    ]);
    let mut s = snapshot(&yaml, "node-a", None);
    s.node.addresses = vec![
        "192.168.77.1".parse().unwrap(),
        "10.244.0.1".parse().unwrap(),
        "fd00:77::1".parse().unwrap(),
    ];
    s.node.primary = vec![
        "192.168.77.1".parse().unwrap(),
        "fd00:77::1".parse().unwrap(),
    ];
    s
}

#[test]
fn external_frontends_for_nodeports_external_ips_and_lb_ips() {
    // semantics 4.1, 7.5-7.7: NodePorts on every node address of the family, externalIPs and
    // LB IPs, each for traffic from this node (socket) and from elsewhere (tc).
    let d = compile(&external_web("LoadBalancer", ""));
    let mut got: Vec<String> = d.frontends.keys().map(|k| k.to_string()).collect();
    got.sort();
    let mut want = vec![
        "10.96.0.10:80/TCP",
        "203.0.113.7:80/TCP",
        "198.51.100.1:80/TCP",
        "192.168.77.1:30080/TCP",
        "10.244.0.1:30080/TCP",
        "external 203.0.113.7:80/TCP",
        "external 198.51.100.1:80/TCP",
        "external 192.168.77.1:30080/TCP",
        "external 10.244.0.1:30080/TCP",
    ];
    want.sort();
    assert_eq!(got, want);
    let ext = frontend_of(&d, "external 192.168.77.1:30080/TCP").unwrap();
    assert_eq!(ext.kind, FrontendKind::NodePort);
    // semantics 7.13: externalTrafficPolicy Cluster masquerades, over the cluster set.
    assert!(ext.snat);
    assert_eq!(
        backends_of(&d, "external 192.168.77.1:30080/TCP"),
        ["10.244.0.2:8080", "10.244.1.2:8080"]
    );
    // The socket-layer frontends of this node's clients use the cluster set too (4.7 a/b) and
    // are marked to masquerade (7.13: pods are left to tc); the ClusterIP never is (7.12).
    for fe in [
        "192.168.77.1:30080/TCP",
        "203.0.113.7:80/TCP",
        "198.51.100.1:80/TCP",
    ] {
        assert!(frontend_of(&d, fe).unwrap().snat, "{fe}");
    }
    assert!(!frontend_of(&d, "10.96.0.10:80/TCP").unwrap().snat);
}

#[test]
fn pods_are_left_to_tc_for_a_service_with_a_host_network_backend_here() {
    // semantics 7.13: a backend on the node's own address changes nothing here. tc hands a
    // pod's flow to it to the stack unmasqueraded (kube-proxy's masquerading applies only to
    // packets leaving the node) and masquerades its flows to the other backends.
    let mut s = external_web("LoadBalancer", "");
    // The local endpoint's address is the node's own (primary, say: from its Node object).
    s.node.primary = vec!["10.244.0.2".parse().unwrap()];
    let d = compile(&s);
    for fe in [
        "192.168.77.1:30080/TCP",
        "203.0.113.7:80/TCP",
        "198.51.100.1:80/TCP",
        "external 203.0.113.7:80/TCP",
    ] {
        assert!(frontend_of(&d, fe).unwrap().snat, "{fe}");
    }
    assert!(!frontend_of(&d, "10.96.0.10:80/TCP").unwrap().snat);
}

#[test]
fn external_traffic_policy_local_uses_local_endpoints_without_snat() {
    // semantics 4.6, 4.7c, 7.13
    let d = compile(&external_web(
        "LoadBalancer",
        ", externalTrafficPolicy: Local",
    ));
    for fe in [
        "external 192.168.77.1:30080/TCP",
        "external 203.0.113.7:80/TCP",
        "external 198.51.100.1:80/TCP",
    ] {
        assert_eq!(backends_of(&d, fe), ["10.244.0.2:8080"], "{fe}");
        let state = frontend_of(&d, fe).unwrap();
        assert!(!state.snat && !state.no_local, "{fe}");
    }
    // semantics 4.7 a/b: this node's own clients are short-circuited to the cluster set,
    // without masquerading (7.13).
    assert_eq!(
        backends_of(&d, "198.51.100.1:80/TCP"),
        ["10.244.0.2:8080", "10.244.1.2:8080"]
    );
    assert!(!frontend_of(&d, "198.51.100.1:80/TCP").unwrap().snat);
}

#[test]
fn local_endpoint_waiting_for_its_interface_serves_the_socket_layer_only() {
    // The tc program is not yet on the interface the route to 10.244.0.2 leaves through: its
    // replies would not be translated, so tc-translated traffic goes elsewhere meanwhile.
    let mut s = external_web("LoadBalancer", "");
    s.node.waiting = ["10.244.0.2".parse().unwrap()].into();
    let d = compile(&s);
    assert_eq!(
        backends_of(&d, "external 192.168.77.1:30080/TCP"),
        ["10.244.1.2:8080"]
    );
    assert_eq!(
        backends_of(&d, "10.96.0.10:80/TCP"),
        ["10.244.0.2:8080", "10.244.1.2:8080"]
    );
    assert_eq!(
        backends_of(&d, "192.168.77.1:30080/TCP"),
        ["10.244.0.2:8080", "10.244.1.2:8080"]
    );
    // With externalTrafficPolicy Local the only local endpoint waits: dropped, as with no
    // local endpoint (semantics 3.9), until its interface carries the program.
    let mut s = external_web("LoadBalancer", ", externalTrafficPolicy: Local");
    s.node.waiting = ["10.244.0.2".parse().unwrap()].into();
    let d = compile(&s);
    let ext = frontend_of(&d, "external 203.0.113.7:80/TCP").unwrap();
    assert!(ext.backends.is_empty() && ext.no_local);
    s.node.waiting.clear();
    let d = compile(&s);
    assert_eq!(
        backends_of(&d, "external 203.0.113.7:80/TCP"),
        ["10.244.0.2:8080"]
    );
    // externalTrafficPolicy Cluster whose only endpoint is the waiting local one: dropped too,
    // not rejected (kube-proxy would send the client there; its retransmission finds the
    // endpoint once the interface carries the program).
    let mut s = external_web("NodePort", "");
    s.slices
        .retain(|sl| sl.metadata.name.as_deref() != Some("web-1"));
    let only_local = snapshot(
        &docs(&[&slice(
            "web-1",
            &["{addresses: [10.244.0.2], nodeName: node-a}"],
        )]),
        "node-a",
        None,
    );
    s.slices.extend(only_local.slices);
    s.node.waiting = ["10.244.0.2".parse().unwrap()].into();
    let d = compile(&s);
    let ext = frontend_of(&d, "external 192.168.77.1:30080/TCP").unwrap();
    assert!(ext.backends.is_empty() && ext.no_local);
    assert_eq!(
        backends_of(&d, "192.168.77.1:30080/TCP"),
        ["10.244.0.2:8080"]
    );
    s.node.waiting.clear();
    let d = compile(&s);
    let ext = frontend_of(&d, "external 192.168.77.1:30080/TCP").unwrap();
    assert!(!ext.no_local);
    assert_eq!(
        backends_of(&d, "external 192.168.77.1:30080/TCP"),
        ["10.244.0.2:8080"]
    );
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops() {
    // semantics 3.9: endpoints exist elsewhere only: drop (not reject) external traffic.
    let mut s = external_web("NodePort", ", externalTrafficPolicy: Local");
    s.node.name = "node-c".into();
    let d = compile(&s);
    let ext = frontend_of(&d, "external 192.168.77.1:30080/TCP").unwrap();
    assert!(ext.backends.is_empty() && ext.no_local);
}

#[test]
fn the_vip_is_an_allowed_source_only_when_the_node_is() {
    // semantics 7.9: the node exception follows the node's address, not the client's.
    for (ranges, vip_allowed) in [
        ("[10.1.0.0/16]", false),
        ("[192.168.77.1/32]", true),
        ("[0.0.0.0/0]", true),
        ("['fd00:77::/64']", false),
        // 10.244.0.1 serves NodePorts but is not kube-proxy's node IP (the primary address).
        ("[10.244.0.0/16]", false),
    ] {
        let d = compile(&external_web(
            "LoadBalancer",
            &format!(", loadBalancerSourceRanges: {ranges}"),
        ));
        let lb = frontend_of(&d, "external 198.51.100.1:80/TCP").unwrap();
        let own = lb
            .source_ranges
            .iter()
            .any(|c| c.to_string() == "198.51.100.1/32");
        assert_eq!(own, vip_allowed, "{ranges}: {:?}", lb.source_ranges);
    }
    // A specific --bind-address is kube-proxy's node IP of its family (10.2): the node IPs
    // the agent completes the snapshot with win over the Node object's primary address.
    let mut s = external_web(
        "LoadBalancer",
        ", loadBalancerSourceRanges: [10.244.0.0/16]",
    );
    s.node.node_ips = vec!["10.244.0.1".parse().unwrap()];
    let d = compile(&s);
    let lb = frontend_of(&d, "external 198.51.100.1:80/TCP").unwrap();
    assert!(
        lb.source_ranges
            .iter()
            .any(|c| c.to_string() == "198.51.100.1/32"),
        "{:?}",
        lb.source_ranges
    );
}

#[test]
fn source_ranges_only_on_load_balancer_ips() {
    // semantics 7.5, 7.6, 7.8: trimmed, invalid and other-family ranges dropped; NodePorts
    // and externalIPs are not filtered.
    let d = compile(&external_web(
        "LoadBalancer",
        ", loadBalancerSourceRanges: [' 192.168.77.0/25 ', 'fd00::/8', 'nonsense', 10.1.2.3/16]",
    ));
    let lb = frontend_of(&d, "external 198.51.100.1:80/TCP").unwrap();
    let ranges: Vec<String> = lb.source_ranges.iter().map(|c| c.to_string()).collect();
    // The node (192.168.77.1) is inside a range: the VIP itself is allowed too (7.9).
    assert_eq!(
        ranges,
        ["192.168.77.0/25", "10.1.0.0/16", "198.51.100.1/32"]
    );
    // Pods and the host reach the VIP through its internal frontend, checked at the socket
    // layer with the same ranges (7.9: pods and the host by their own source IP).
    let internal = frontend_of(&d, "198.51.100.1:80/TCP").unwrap();
    assert_eq!(internal.source_ranges, lb.source_ranges);
    for fe in [
        "external 192.168.77.1:30080/TCP",
        "external 203.0.113.7:80/TCP",
        "203.0.113.7:80/TCP",
        "192.168.77.1:30080/TCP",
    ] {
        assert!(
            frontend_of(&d, fe).unwrap().source_ranges.is_empty(),
            "{fe}"
        );
    }
    assert!(
        d.problems
            .iter()
            .any(|p| p.message.contains("\"nonsense\""))
    );
}

#[test]
fn an_address_both_external_ip_and_load_balancer_ip_is_one_frontend_with_the_ranges() {
    // semantics 7.6, 7.8: no conflict of the Service with itself; the ranges are checked.
    let svc = "kind: Service\nmetadata: {name: web, namespace: default}\nspec: {type: \
               LoadBalancer, clusterIP: 10.96.0.10, externalIPs: [198.51.100.1], \
               loadBalancerSourceRanges: [10.1.0.0/16], \
               ports: [{name: http, port: 80, nodePort: 30080, protocol: TCP}]}\n\
               status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}";
    let yaml = docs(&[
        svc,
        &slice("web-1", &["{addresses: [10.244.0.2], nodeName: node-a}"]),
    ]);
    let d = compile(&snapshot(&yaml, "node-a", None));
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    for fe in ["198.51.100.1:80/TCP", "external 198.51.100.1:80/TCP"] {
        let state = frontend_of(&d, fe).unwrap();
        assert_eq!(state.kind, FrontendKind::LoadBalancer, "{fe}");
        assert_eq!(
            state
                .source_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.1.0.0/16"],
            "{fe}"
        );
    }
}

#[test]
fn source_ranges_are_read_as_kube_proxy_reads_them() {
    // semantics 7.8: ParseCIDRSloppy needs a prefix length (a bare address is dropped) and
    // takes IPv4 octets with leading zeros; host bits are cleared.
    for (raw, want) in [
        ("10.0.0.0/8", Some("10.0.0.0/8")),
        (" 010.001.0.0/16 ", Some("10.1.0.0/16")),
        ("10.1.2.3/24", Some("10.1.2.0/24")),
        ("fd00::1/64", Some("fd00::/64")),
        ("10.1.2.3", None),
        ("fd00::1", None),
        ("10.0.0.0/33", None),
        ("10.0.0.0/+8", None),
        ("10.0.0.0/", None),
        ("/8", None),
    ] {
        assert_eq!(
            source_range(raw).map(|c| c.to_string()).as_deref(),
            want,
            "{raw:?}"
        );
    }
    // A bare address alone: no valid range, so no firewall at all, as in kube-proxy.
    let d = compile(&external_web(
        "LoadBalancer",
        ", loadBalancerSourceRanges: [10.1.2.3]",
    ));
    let lb = frontend_of(&d, "external 198.51.100.1:80/TCP").unwrap();
    assert!(lb.source_ranges.is_empty(), "{:?}", lb.source_ranges);
    assert!(
        d.problems
            .iter()
            .any(|p| p.message.contains("\"10.1.2.3\" is not a CIDR"))
    );
}

#[test]
fn service_addresses_are_read_as_kube_proxy_reads_them() {
    // semantics 7.6, 7.7: addresses parsed as ParseIPSloppy does (leading zeros accepted);
    // empty externalIPs and ingress IPs skipped without a problem; only ipMode nil or VIP
    // programmed.
    let svc = "kind: Service\nmetadata: {name: web, namespace: default}\nspec: {type: \
               LoadBalancer, clusterIP: 010.096.000.010, externalIPs: ['', 203.0.113.007], \
               ports: [{name: http, port: 80, nodePort: 30080, protocol: TCP}]}\n\
               status: {loadBalancer: {ingress: [{ip: ''}, {ip: 198.51.100.1, ipMode: Other}, \
               {ip: 198.51.100.2, ipMode: VIP}]}}";
    let yaml = docs(&[
        svc,
        &slice("web-1", &["{addresses: [10.244.0.2], nodeName: node-a}"]),
    ]);
    let d = compile(&snapshot(&yaml, "node-a", None));
    let mut got: Vec<String> = d.frontends.keys().map(|k| k.to_string()).collect();
    got.sort();
    assert_eq!(
        got,
        [
            "10.96.0.10:80/TCP",
            "198.51.100.2:80/TCP",
            "203.0.113.7:80/TCP",
            "external 198.51.100.2:80/TCP",
            "external 203.0.113.7:80/TCP",
        ]
    );
    assert!(d.problems.is_empty(), "{:?}", d.problems);
}

/// A prefix without one of its addresses is covered by one prefix per bit below its length,
/// which together hold every other address of it and not that one.
#[test]
fn a_prefix_without_an_address() {
    let c = |s: &str| Cidr::parse(s).unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        c("10.96.0.0/16").without(&ip("10.97.0.1")),
        [c("10.96.0.0/16")]
    );
    assert_eq!(
        c("10.96.0.0/16").without(&ip("fd00::1")),
        [c("10.96.0.0/16")]
    );
    assert_eq!(
        c("10.0.0.0/30").without(&ip("10.0.0.2")),
        [c("10.0.0.0/31"), c("10.0.0.3/32")]
    );
    assert!(c("10.0.0.7/32").without(&ip("10.0.0.7")).is_empty());
    let parts = c("10.96.0.0/12").without(&ip("10.96.7.7"));
    assert_eq!(parts.len(), 20);
    for probe in [
        "10.96.0.0",
        "10.96.7.6",
        "10.96.7.8",
        "10.111.255.255",
        "10.100.1.1",
    ] {
        let n = parts.iter().filter(|p| p.contains(&ip(probe))).count();
        assert_eq!(n, 1, "{probe} in exactly one of {parts:?}");
    }
    assert!(!parts.iter().any(|p| p.contains(&ip("10.96.7.7"))));
    let parts = c("fd00:96::/112").without(&ip("fd00:96::7"));
    assert_eq!(parts.len(), 16);
    assert!(!parts.iter().any(|p| p.contains(&ip("fd00:96::7"))));
    assert!(parts.iter().any(|p| p.contains(&ip("fd00:96::ffff"))));
}

/// semantics 1.1 with 3.12: the ClusterIPs of Services another service proxy serves are cut
/// out of the ServiceCIDRs' ranges (kube-proxy drops unallocated addresses only after DNAT,
/// which the other proxy does), in each family; taken back when the Service goes or loses its
/// label.
#[test]
fn cluster_ips_of_other_proxies_are_not_unallocated() {
    let other = "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: default, \
                 labels: {service.kubernetes.io/service-proxy-name: x}}\nspec: {clusterIP: 10.96.7.7, \
                 clusterIPs: [10.96.7.7, 'fd00:96::7'], ports: [{port: 80}]}";
    let cidrs = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: k}\n\
                 spec: {cidrs: [10.96.0.0/16, 'fd00:96::/112']}";
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let mut compiler = Compiler::default();
    let snap =
        |yaml: &str| crate::source::manifests::snapshot_of(yaml, NodeInfo::default()).unwrap();
    let covered = |d: &Desired, s: &str| d.service_cidrs.iter().any(|c| c.contains(&ip(s)));
    compiler.update(&snap(&docs(&[cidrs, other])));
    let d = compiler.desired();
    assert!(
        !covered(d, "10.96.7.7") && !covered(d, "fd00:96::7"),
        "{:?}",
        d.service_cidrs
    );
    assert!(covered(d, "10.96.7.6") && covered(d, "fd00:96::8"));
    assert_eq!(d.service_cidrs.len(), 16 + 16);
    // Not proxied here.
    assert!(d.frontends.is_empty(), "{:?}", d.frontends);
    compiler.update(&snap(&docs(&[
        cidrs,
        &other.replace("service-proxy-name", "other"),
    ])));
    let d = compiler.desired();
    assert!(covered(d, "10.96.7.7") && covered(d, "fd00:96::7"));
    assert_eq!(d.service_cidrs.len(), 2);
    compiler.update(&snap(&docs(&[cidrs, other])));
    compiler.update(&snap(cidrs));
    assert_eq!(compiler.desired().service_cidrs.len(), 2);
    // Overlapping ServiceCIDRs (a /16 inside a /12): the cut is made once.
    let foreign: std::collections::BTreeSet<IpAddr> = [ip("10.96.7.7")].into();
    let raw = ["10.96.0.0/12".to_string(), "10.96.0.0/16".to_string()];
    assert_eq!(service_cidrs(&raw, &foreign).len(), 20);
}

#[test]
fn nodeport_addresses_follow_the_cidrs_per_family() {
    // semantics 7.1, 7.2
    let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
    let all = ips(&[
        "127.0.0.1",
        "::1",
        "fe80::1",
        "192.168.77.1",
        "10.244.0.1",
        "fd00:77::1",
    ]);
    assert_eq!(
        nodeport_addresses(&all, &[]),
        ips(&["10.244.0.1", "192.168.77.1", "fd00:77::1"])
    );
    let cidrs = [Cidr::parse("192.168.77.0/24").unwrap()];
    assert_eq!(
        nodeport_addresses(&all, &cidrs),
        ips(&["192.168.77.1", "fd00:77::1"])
    );
    assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    assert_eq!(Cidr::parse("fd00::5").unwrap().to_string(), "fd00::5/128");
    assert!(Cidr::parse("10.0.0.0/33").is_none());
    assert!(Cidr::parse("10.0.0.0/x").is_none());
}

#[test]
fn nodeport_addresses_primary_is_the_primary_address_of_each_family() {
    // semantics 7.3, 10.2: --bind-address wins for its family, then the Node object's address;
    // a family with neither serves no NodePort.
    let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
    let all = ips(&["192.168.77.1", "10.244.0.1", "fd00:77::1", "fd00:77::2"]);
    let values = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    let primary = NodePortSelection::parse(&values(&["primary"]), None).unwrap();
    assert_eq!(
        nodeport_addresses(&all, &primary.prefixes(&ips(&["10.244.0.1", "fd00:77::2"]))),
        ips(&["10.244.0.1", "fd00:77::2"])
    );
    // No IPv6 primary address: no IPv6 NodePorts.
    assert_eq!(
        nodeport_addresses(&all, &primary.prefixes(&ips(&["10.244.0.1"]))),
        ips(&["10.244.0.1"])
    );
    // Nothing known: nothing served.
    assert_eq!(nodeport_addresses(&all, &primary.prefixes(&[])), ips(&[]));
    let bound =
        NodePortSelection::parse(&values(&["primary"]), Some("192.168.77.1".parse().unwrap()))
            .unwrap();
    assert_eq!(
        nodeport_addresses(&all, &bound.prefixes(&ips(&["10.244.0.1", "fd00:77::1"]))),
        ips(&["192.168.77.1", "fd00:77::1"])
    );
    // The node IPs (semantics 7.9's node exception, 10.2): the bind address stands for its
    // family's; the other family keeps the Node object's; unspecified or none changes nothing.
    assert_eq!(
        bound.node_ips(&ips(&["10.244.0.1", "fd00:77::1"])),
        ips(&["192.168.77.1", "fd00:77::1"])
    );
    assert_eq!(bound.node_ips(&[]), ips(&["192.168.77.1"]));
    assert_eq!(
        primary.node_ips(&ips(&["10.244.0.1"])),
        ips(&["10.244.0.1"])
    );
    // kube-proxy's validation refuses `primary` next to CIDRs.
    assert!(NodePortSelection::parse(&values(&["primary", "fd00:77::1/128"]), None).is_err());
    // An unspecified --bind-address names no address.
    let unspecified =
        NodePortSelection::parse(&values(&["primary"]), Some("0.0.0.0".parse().unwrap())).unwrap();
    assert_eq!(
        nodeport_addresses(&all, &unspecified.prefixes(&ips(&["10.244.0.1"]))),
        ips(&["10.244.0.1"])
    );
    // Without primary the selection is its CIDRs.
    let cidrs = NodePortSelection::parse(&values(&["192.168.77.0/24", ""]), None).unwrap();
    assert_eq!(
        cidrs.prefixes(&[]),
        [Cidr::parse("192.168.77.0/24").unwrap()]
    );
    assert!(NodePortSelection::parse(&values(&["primary", "nonsense"]), None).is_err());
}

/// semantics 5.5: without feature gate PreferSameTrafficDistribution kube-proxy does not read
/// forNodes hints, so a PreferSameNode Service is served over its zone hints; `explain` says
/// so too.
#[test]
fn node_hints_are_not_read_without_their_feature_gate() {
    let yaml = docs(&[
        &web(""),
        &slice(
            "web-1",
            &[
                "{addresses: [10.244.1.1], hints: {forNodes: [{name: node-a}], forZones: [{name: zone-a}]}}",
                "{addresses: [10.244.1.2], hints: {forNodes: [{name: node-b}], forZones: [{name: zone-a}]}}",
                "{addresses: [10.244.2.1], hints: {forNodes: [{name: node-c}], forZones: [{name: zone-b}]}}",
            ],
        ),
    ]);
    let mut s = snapshot(&yaml, "node-a", Some("zone-a"));
    assert_eq!(backends_of(&compile(&s), FE), ["10.244.1.1:8080"]);
    s.config.node_hints = false;
    let d = compile(&s);
    assert_eq!(backends_of(&d, FE), ["10.244.1.1:8080", "10.244.1.2:8080"]);
    let sp = d.ports.values().next().unwrap();
    let far = sp
        .endpoints
        .all()
        .iter()
        .find(|e| e.port == 8080 && e.addr.to_string() == "10.244.2.1");
    let verdict = explain::judge(sp, far.unwrap(), false);
    let EndpointVerdict::Excluded(why) = verdict else {
        panic!("{verdict:?}");
    };
    assert_eq!(why.cause, ExclusionCause::ZoneHint, "{why:?}");
}

#[test]
fn scheduler_from_annotation_flag_or_default() {
    // Issue #6: Maglev per Service (annotation) or globally (--scheduler); a bad value is
    // reported and falls back to the global scheduler.
    let with = |annotation: &str, global: Scheduler| {
        let meta = if annotation.is_empty() {
            "name: web, namespace: default".to_string()
        } else {
            format!(
                "name: web, namespace: default, annotations: {{{SCHEDULER_ANNOTATION}: {annotation}}}"
            )
        };
        let yaml = docs(&[
            &service(
                &meta,
                "clusterIP: 10.96.0.10, ports: [{name: http, port: 80, protocol: TCP}]",
            ),
            &slice("web-1", &["{addresses: [10.244.0.2]}"]),
        ]);
        let mut s = snapshot(&yaml, "node-a", None);
        s.config.scheduler = global;
        let d = compile(&s);
        let scheduler = frontend_of(&d, FE).unwrap().scheduler;
        (scheduler, d.problems)
    };
    assert_eq!(with("", Scheduler::Random).0, Scheduler::Random);
    assert_eq!(with("", Scheduler::Maglev).0, Scheduler::Maglev);
    assert_eq!(with("maglev", Scheduler::Random).0, Scheduler::Maglev);
    assert_eq!(with("mh", Scheduler::Random).0, Scheduler::Maglev);
    assert_eq!(with("random", Scheduler::Maglev).0, Scheduler::Random);
    let (scheduler, problems) = with("fastest", Scheduler::Maglev);
    assert_eq!(scheduler, Scheduler::Maglev);
    assert!(
        problems
            .iter()
            .any(|p| p.message.contains("unknown scheduler \"fastest\"")),
        "{problems:?}"
    );
}

#[test]
fn scheduler_names_and_ipvs_aliases() {
    // Issue #11: kube-proxy's --ipvs-scheduler names are aliases.
    for (names, want) in [
        (&["random"][..], Scheduler::Random),
        (&["round-robin", "rr"], Scheduler::RoundRobin),
        (
            &["weighted-round-robin", "wrr"],
            Scheduler::WeightedRoundRobin,
        ),
        (&["source-hash", "sh"], Scheduler::SourceHash),
        (&["maglev", "mh"], Scheduler::Maglev),
    ] {
        for n in names {
            assert_eq!(Scheduler::parse(n), Ok(want), "{n}");
        }
    }
    assert_eq!(Scheduler::parse("lc"), Ok(Scheduler::LeastConnection));
    assert_eq!(
        Scheduler::parse("wlc"),
        Ok(Scheduler::WeightedLeastConnection)
    );
    for (names, want) in [
        (
            ["sed", "shortest-expected-delay"],
            Scheduler::ShortestExpectedDelay,
        ),
        (["nq", "never-queue"], Scheduler::NeverQueue),
    ] {
        for n in names {
            assert_eq!(Scheduler::parse(n), Ok(want), "{n}");
            assert_eq!(Scheduler::parse(want.as_str()), Ok(want));
        }
    }
    assert!(
        Scheduler::parse("fifo")
            .unwrap_err()
            .contains("unknown scheduler")
    );
}

#[test]
fn weights_from_the_annotation() {
    let yaml = docs(&[
        &service(
            "name: web, namespace: default, annotations: {kube-bpf-proxy.io/weights: '10.244.0.2=3, 10.244.0.3=0, junk, 10.244.0.4=1000'}",
            "clusterIP: 10.96.0.10, ports: [{name: http, port: 80, protocol: TCP}]",
        ),
        &slice(
            "web-1",
            &[
                "{addresses: [10.244.0.2]}",
                "{addresses: [10.244.0.3]}",
                "{addresses: [10.244.0.4]}",
            ],
        ),
    ]);
    let d = compile(&snapshot(&yaml, "node-a", None));
    let weights: Vec<(String, u16)> = frontend_of(&d, FE)
        .unwrap()
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("10.244.0.2".to_string(), 3),
            ("10.244.0.3".to_string(), 1),
            ("10.244.0.4".to_string(), 1)
        ]
    );
    let bad = d
        .problems
        .iter()
        .filter(|p| p.message.contains("IP=WEIGHT"))
        .count();
    assert_eq!(bad, 3, "{:?}", d.problems);
}

#[test]
fn problems_carry_a_typed_reason() {
    use super::ProblemReason as R;
    for (yaml, object, reason) in [
        (
            web("").replace("port: 80,", "port: 70000,"),
            "Service default/web",
            R::InvalidPort,
        ),
        (
            web("type: LoadBalancer, loadBalancerSourceRanges: [not-a-cidr]"),
            "Service default/web",
            R::InvalidSourceRange,
        ),
        (
            web("externalIPs: [not-an-ip]"),
            "Service default/web",
            R::InvalidAddress,
        ),
        (
            web("ipFamilies: [IPv6]"),
            "Service default/web",
            R::InvalidClusterIp,
        ),
        (
            docs(&[
                &web(""),
                &slice_of(
                    "name: w-1, namespace: default, labels: {kubernetes.io/service-name: web}",
                    "AppleTalk",
                    "[{name: http, port: 8080, protocol: TCP}]",
                    &["{addresses: [\"10.244.0.2\"]}"],
                ),
            ]),
            "EndpointSlice default/w-1",
            R::UnsupportedAddressType,
        ),
        (
            docs(&[&web(""), &slice("w-1", &["{addresses: [\"ten.one\"]}"])]),
            "EndpointSlice default/w-1",
            R::InvalidEndpoint,
        ),
        // semantics 12.1: programmed, but not served by this data path (README).
        (
            web("").replace("protocol: TCP", "protocol: SCTP"),
            "Service default/web",
            R::UnsupportedProtocol,
        ),
    ] {
        let d = compile(&snapshot(&yaml, "n1", None));
        assert!(
            d.problems
                .iter()
                .any(|p| p.reason == reason && p.object == object),
            "{reason:?} for {object}: {:?}",
            d.problems
        );
    }
    let names: std::collections::BTreeSet<&str> = R::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), R::ALL.len(), "distinct names");
}
