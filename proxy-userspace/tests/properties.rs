//! Property tests of the pure pipeline: arbitrary-but-plausible and hostile Services and
//! EndpointSlices → `compile` → `plan` → `MapState::apply`.
//!
//! Properties (see each `proptest!` block):
//! (a) compile and plan never panic, and every problem names its object;
//! (b) compile does not depend on the order of its input;
//! (c) objects of other Services never change a Service's frontends;
//! (d) every backend is of its frontend's family, has a port, comes from a usable endpoint of
//!     that Service, and terminating endpoints are used only as the fallback (semantics 3.3,
//!     3.4);
//! (e) plans are idempotent and every intermediate map state is consistent;
//! (f) backend and frontend ids of what stays are stable across plans;
//! (g) 10k endpoints in one slice compile quickly (a plain test);
//! plus one test per hostile input (a problem for the bad object, nothing else changes).
//!
//! Facts are cited as `semantics N.M` (../shared/kube-proxy-semantics.md).

use std::sync::Arc;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort,
            ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{
            Endpoint as SliceEndpoint, EndpointConditions, EndpointHints, EndpointPort,
            EndpointSlice, ForNode, ForZone,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proptest::{prelude::*, sample::select};
use proxy_common::backend::{BACKEND_LOCAL, BACKEND_TERMINATING, BackendValue, FAMILY_V4};
use proxy_userspace::{
    compile::{
        Desired, Family, FrontendAddr, FrontendKind, FrontendState, PortName, Proto, Scope, compile,
    },
    objects::{Address, SliceEndpoint as KeptEndpoint},
    plan::{MAX_SLOTS, MapState, Op, ServiceKey, plan},
    snapshot::{NodeInfo, Snapshot},
};

const PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
const HEADLESS: &str = "service.kubernetes.io/headless";
const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// 128 cases per property keeps the file under ~15 s in a debug build; set PROPTEST_CASES for
/// a longer search.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(128);
    ProptestConfig {
        cases,
        // Failures are minimized and printed; no regression files next to the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- Strategies ---------------------------------------------------------------------------

/// Where a generated object's frontend addresses come from. `Isolated` addresses can never be
/// produced by the `Hostile` strategies, so Services of the two kinds never claim one frontend.
#[derive(Copy, Clone, Debug)]
enum Pool {
    Hostile,
    Isolated,
}

/// Strings that are not (usable) IP addresses.
const GARBAGE: &[&str] = &[
    "",
    "None",
    "not-an-ip",
    "10.0.0.256",
    "1.2.3",
    "::g",
    "10.0.0.1/24",
    " 10.0.0.2 ",
    "10.0.0.1:80",
    "fe80::1%eth0",
    "::ffff:10.0.0.1",
    "0.0.0.0",
    "::",
    "1.2.3.4.5",
    "0x0a.0.0.1",
    "١٠.0.0.1",
];

/// An address as an API object would carry it: mostly valid from a small pool (so objects
/// collide), sometimes the other family, leading zeros, garbage or random characters.
fn ip(pool: Pool) -> BoxedStrategy<String> {
    match pool {
        Pool::Hostile => prop_oneof![
            5 => (1u8..=6).prop_map(|n| format!("10.0.0.{n}")),
            3 => (1u8..=4).prop_map(|n| format!("fd00::{n}")),
            1 => (1u8..=3).prop_map(|n| format!("010.0.0.{n}")),
            2 => select(GARBAGE).prop_map(String::from),
            // No dots and at most 8 characters: never an `Isolated` address.
            1 => "[0-9a-f:]{0,8}",
        ]
        .boxed(),
        Pool::Isolated => prop_oneof![
            2 => (1u8..=8).prop_map(|n| format!("10.200.0.{n}")),
            1 => (1u8..=8).prop_map(|n| format!("2001:db8::{n}")),
        ]
        .boxed(),
    }
}

/// Port numbers: mostly the few the slices use, sometimes anything in -5..70000 or an edge.
fn port_number() -> BoxedStrategy<i32> {
    prop_oneof![
        12 => select(&[80, 53, 443, 8080][..]),
        2 => -5i32..70_000,
        1 => select(&[0, 1, 65_535, 65_536, -1, i32::MAX, i32::MIN][..]),
    ]
    .boxed()
}

fn port_name() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        12 => select(&["", "http", "dns", "a"][..]).prop_map(|s| Some(s.to_string())),
        1 => Just(None),
    ]
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        6 => Just(None),
        12 => select(&["TCP", "UDP", "SCTP"][..]).prop_map(|s| Some(s.to_string())),
        1 => select(&["tcp", "ICMP", "", "HTTP"][..]).prop_map(|s| Some(s.to_string())),
    ]
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    prop_oneof![1 => Just(None), 3 => s.prop_map(Some)].boxed()
}

/// Labels: usually none, sometimes ones that hide the object (semantics 1.1) or that only
/// look relevant.
fn labels() -> BoxedStrategy<Option<BTreeMap<String, String>>> {
    prop_oneof![
        12 => Just(None),
        2 => prop::collection::btree_map(
            select(&["app", PROXY_NAME, HEADLESS, SERVICE_NAME][..]).prop_map(String::from),
            select(&["", "x", "web"][..]).prop_map(String::from),
            0..3,
        )
        .prop_map(Some),
    ]
    .boxed()
}

fn service_port() -> impl Strategy<Value = ServicePort> {
    (
        port_name(),
        port_number(),
        protocol(),
        prop_oneof![3 => Just(None), 1 => (-5i32..70_000).prop_map(Some), 1 => Just(Some(30_080))],
    )
        .prop_map(|(name, port, protocol, node_port)| ServicePort {
            name,
            port,
            protocol,
            node_port,
            ..Default::default()
        })
}

/// A valid address of `family` from `pool`.
fn valid_ip(pool: Pool, family: Family) -> BoxedStrategy<String> {
    match (pool, family) {
        (Pool::Hostile, Family::V4) => (1u8..=6).prop_map(|n| format!("10.0.0.{n}")).boxed(),
        (Pool::Hostile, Family::V6) => (1u8..=4).prop_map(|n| format!("fd00::{n}")).boxed(),
        (Pool::Isolated, Family::V4) => (1u8..=8).prop_map(|n| format!("10.200.0.{n}")).boxed(),
        (Pool::Isolated, Family::V6) => (1u8..=8).prop_map(|n| format!("2001:db8::{n}")).boxed(),
    }
}

fn api_family(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

type Addressing = (Option<String>, Option<Vec<String>>, Option<Vec<String>>);

/// clusterIP, ipFamilies and clusterIPs: mostly coherent (single-stack either family, or
/// dual-stack either order), sometimes version-skew style (clusterIP only), headless, absent,
/// or any combination of anything.
fn addressing(pool: Pool) -> BoxedStrategy<Addressing> {
    let coherent = (
        valid_ip(pool, Family::V4),
        valid_ip(pool, Family::V6),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(v4, v6, v6_first, dual)| {
            let mut pairs = vec![("IPv4".to_string(), v4), ("IPv6".to_string(), v6)];
            if v6_first {
                pairs.reverse();
            }
            if !dual {
                pairs.truncate(1);
            }
            let (families, ips): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
            (Some(ips[0].clone()), Some(families), Some(ips))
        });
    prop_oneof![
        8 => coherent,
        4 => ip(pool).prop_map(|ip| (Some(ip), None, None)),
        1 => select(&["None", ""][..]).prop_map(|s| (Some(s.to_string()), None, Some(vec![s.to_string()]))),
        1 => Just((None, None, None)),
        2 => (
            opt(ip(pool)),
            opt(prop::collection::vec(select(&["IPv4", "IPv6", "IPv5"][..]).prop_map(String::from), 0..3)),
            opt(prop::collection::vec(ip(pool), 0..3)),
        ),
    ]
    .boxed()
}

/// A Service named from `names` in one of `namespaces`, with frontend addresses from `pool`.
fn service(
    pool: Pool,
    namespaces: &'static [&'static str],
    names: &'static [&'static str],
) -> impl Strategy<Value = Service> {
    let meta = (
        select(namespaces),
        select(names),
        labels(),
        opt(select(&["uid-1", "uid-2"][..])),
    );
    let kind = (
        prop_oneof![
            6 => Just(None),
            12 => select(&["ClusterIP", "NodePort", "LoadBalancer"][..]).prop_map(Some),
            1 => select(&["ExternalName", "Weird"][..]).prop_map(Some),
        ],
        addressing(pool),
    );
    let ports = prop_oneof![
        1 => Just(None),
        8 => prop::collection::vec(service_port(), 1..4).prop_map(Some),
    ];
    let policy = (
        opt(select(&["None", "ClientIP", "Sticky"][..])),
        opt(opt(prop_oneof![
            3 => 1i32..=86_400,
            1 => select(&[0, -1, 86_401, i32::MAX, i32::MIN][..]),
        ])),
        opt(select(&["Local", "Cluster", "Bogus"][..])),
        opt(select(&["Local", "Cluster", "Bogus"][..])),
        opt(prop_oneof![Just(32_000), -1i32..70_000]),
    );
    let external = (
        prop_oneof![2 => Just(None), 1 => prop::collection::vec(ip(pool), 0..3).prop_map(Some)],
        opt(prop::collection::vec(
            select(&["10.0.0.0/8", "garbage", " fd00::/8 ", "0.0.0.0/0"][..]),
            0..3,
        )),
        prop_oneof![
            2 => Just(None),
            1 => prop::collection::vec(
                (
                    opt(ip(pool)),
                    opt(select(&["VIP", "Proxy", "Bogus"][..])),
                    opt(Just("lb.example.com")),
                ),
                0..3,
            )
            .prop_map(Some),
        ],
    );
    (meta, kind, ports, policy, external).prop_map(
        |(
            (namespace, name, labels, uid),
            (type_, (cluster_ip, ip_families, cluster_ips)),
            ports,
            (affinity, timeout, itp, etp, hcnp),
            (external_ips, ranges, ingress),
        )| Service {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                labels,
                uid: uid.map(String::from),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: type_.map(String::from),
                cluster_ip,
                cluster_ips,
                ip_families,
                ports,
                session_affinity: affinity.map(String::from),
                session_affinity_config: timeout.map(|timeout_seconds| SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig { timeout_seconds }),
                }),
                internal_traffic_policy: itp.map(String::from),
                external_traffic_policy: etp.map(String::from),
                health_check_node_port: hcnp,
                external_ips,
                load_balancer_source_ranges: ranges
                    .map(|r| r.into_iter().map(String::from).collect()),
                ..Default::default()
            }),
            status: ingress.map(|ingress| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        ingress
                            .into_iter()
                            .map(|(ip, ip_mode, hostname)| LoadBalancerIngress {
                                ip,
                                ip_mode: ip_mode.map(String::from),
                                hostname: hostname.map(String::from),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }),
                ..Default::default()
            }),
        },
    )
}

/// An endpoint whose first address is usually a valid one of `family` (a small pool, so
/// copies collide across slices), else anything.
fn slice_endpoint(family: Option<Family>) -> impl Strategy<Value = SliceEndpoint> {
    let first = match family {
        Some(Family::V4) => prop_oneof![
            12 => (1u8..=6).prop_map(|n| vec![format!("10.244.0.{n}")]),
            1 => (1u8..=6).prop_map(|n| vec![format!("10.244.0.{n}"), "junk".to_string()]),
            2 => prop::collection::vec(ip(Pool::Hostile), 0..3),
        ]
        .boxed(),
        Some(Family::V6) => prop_oneof![
            12 => (1u8..=4).prop_map(|n| vec![format!("fd00:244::{n}")]),
            2 => prop::collection::vec(ip(Pool::Hostile), 0..3),
        ]
        .boxed(),
        None => prop::collection::vec(ip(Pool::Hostile), 0..3).boxed(),
    };
    let hints = prop_oneof![
        3 => Just(None),
        1 => (
            opt(prop::collection::vec(select(&["z1", "z2"][..]), 0..3)),
            opt(prop::collection::vec(select(&["node-a", "node-b"][..]), 0..3)),
        )
            .prop_map(Some),
    ];
    (
        first,
        // Every combination of the three conditions, each nil, true or false.
        opt((opt(any::<bool>()), opt(any::<bool>()), opt(any::<bool>()))),
        opt(select(&["node-a", "node-b", "NODE-A", ""][..])),
        hints,
    )
        .prop_map(|(addresses, conditions, node_name, hints)| SliceEndpoint {
            addresses,
            conditions: conditions.map(|(ready, serving, terminating)| EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            node_name: node_name.map(String::from),
            hints: hints.map(|(zones, nodes)| EndpointHints {
                for_zones: zones.map(|z| {
                    z.into_iter()
                        .map(|name| ForZone { name: name.into() })
                        .collect()
                }),
                for_nodes: nodes.map(|n| {
                    n.into_iter()
                        .map(|name| ForNode { name: name.into() })
                        .collect()
                }),
            }),
            ..Default::default()
        })
}

fn slice_port() -> impl Strategy<Value = EndpointPort> {
    (
        port_name(),
        prop_oneof![6 => select(&[8080, 53, 80][..]).prop_map(Some), 2 => opt(port_number())],
        protocol(),
    )
        .prop_map(|(name, port, protocol)| EndpointPort {
            name,
            port,
            protocol,
            ..Default::default()
        })
}

fn address_type_family(t: &str) -> Option<Family> {
    match t {
        "IPv4" => Some(Family::V4),
        "IPv6" => Some(Family::V6),
        _ => None,
    }
}

fn make_slice(
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    address_type: String,
    ports: Option<Vec<EndpointPort>>,
    endpoints: Option<Vec<SliceEndpoint>>,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(namespace),
            name: Some(name),
            labels: Some(labels),
            ..Default::default()
        },
        address_type,
        ports,
        endpoints,
    }
}

/// An EndpointSlice with no relation to any Service in particular: named from `names` in one
/// of `namespaces`, labelled for one of `services` ("" and absent too).
fn slice(
    namespaces: &'static [&'static str],
    names: &'static [&'static str],
    services: &'static [&'static str],
) -> impl Strategy<Value = EndpointSlice> {
    (
        select(namespaces),
        select(names),
        prop_oneof![8 => select(services).prop_map(Some), 1 => Just(None)],
        prop_oneof![9 => Just(None), 1 => Just(Some(PROXY_NAME))],
        prop_oneof![
            6 => Just("IPv4"),
            3 => Just("IPv6"),
            1 => select(&["FQDN", "ipv4", ""][..]),
        ],
        opt(prop::collection::vec(slice_port(), 0..3)),
    )
        .prop_flat_map(|(namespace, name, service, hidden, address_type, ports)| {
            let mut labels = BTreeMap::new();
            if let Some(service) = service {
                labels.insert(SERVICE_NAME.to_string(), service.to_string());
            }
            if let Some(label) = hidden {
                labels.insert(label.to_string(), "other".to_string());
            }
            let endpoints = opt(prop::collection::vec(
                slice_endpoint(address_type_family(address_type)),
                0..6,
            ));
            (
                Just((namespace, name, labels, address_type, ports)),
                endpoints,
            )
                .prop_map(
                    |((namespace, name, labels, address_type, ports), endpoints)| {
                        make_slice(
                            namespace.into(),
                            name.into(),
                            labels,
                            address_type.into(),
                            ports,
                            endpoints,
                        )
                    },
                )
        })
}

/// The families a Service has a cluster IP in (roughly; V4 when unclear).
fn families_of(svc: &Service) -> Vec<Family> {
    let spec = svc.spec.as_ref();
    let mut out: Vec<Family> = spec
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default()
        .iter()
        .chain(spec.and_then(|s| s.cluster_ip.as_ref()))
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| Family::of(&ip))
        .collect();
    out.sort();
    out.dedup();
    if out.is_empty() {
        out.push(Family::V4);
    }
    out
}

/// Slices as the EndpointSlice controller would write them for `svc` (same namespace, its
/// name as label, its port names and protocols, an address type of its families), each
/// property sometimes off: another namespace or Service, another family or address type,
/// random ports.
fn slices_for(
    svc: &Service,
    namespaces: &'static [&'static str],
    targets: &'static [&'static str],
    generic_names: &'static [&'static str],
) -> impl Strategy<Value = Vec<EndpointSlice>> + use<> {
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let svc_ports: Vec<(Option<String>, Option<String>)> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name, p.protocol))
        .collect();
    let families: Vec<&'static str> = families_of(svc).into_iter().map(api_family).collect();
    let n_ports = svc_ports.len();
    let mirrored = prop::collection::vec(
        prop_oneof![6 => select(&[8080, 53, 80][..]).prop_map(Some), 1 => opt(port_number())],
        n_ports..=n_ports,
    )
    .prop_map(move |numbers| {
        Some(
            svc_ports
                .iter()
                .zip(numbers)
                .map(|((name, protocol), port)| EndpointPort {
                    name: Some(name.clone().unwrap_or_default()),
                    port,
                    protocol: protocol.clone(),
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
    });
    let one = (
        prop_oneof![15 => Just(namespace), 1 => select(namespaces).prop_map(String::from)],
        prop_oneof![
            8 => (1u8..=3).prop_map({
                let name = name.clone();
                move |n| format!("{name}-{n}")
            }),
            1 => select(generic_names).prop_map(String::from),
        ],
        prop_oneof![
            15 => Just(Some(name)),
            1 => select(targets).prop_map(|t| Some(t.to_string())),
            1 => Just(None),
        ],
        prop_oneof![
            12 => select(families),
            2 => select(&["IPv4", "IPv6"][..]),
            1 => select(&["FQDN", "ipv4", ""][..]),
        ],
        prop_oneof![
            12 => mirrored,
            1 => opt(prop::collection::vec(slice_port(), 0..3)),
        ],
    )
        .prop_flat_map(|(namespace, name, service, address_type, ports)| {
            let mut labels = BTreeMap::new();
            if let Some(service) = service {
                labels.insert(SERVICE_NAME.to_string(), service);
            }
            let endpoints = prop_oneof![
                1 => Just(None),
                6 => prop::collection::vec(
                    slice_endpoint(address_type_family(address_type)),
                    1..6,
                )
                .prop_map(Some),
            ];
            (
                Just((namespace, name, labels, address_type, ports)),
                endpoints,
            )
                .prop_map(
                    |((namespace, name, labels, address_type, ports), endpoints)| {
                        make_slice(
                            namespace,
                            name,
                            labels,
                            address_type.into(),
                            ports,
                            endpoints,
                        )
                    },
                )
        });
    prop_oneof![1 => Just(Vec::new()), 6 => prop::collection::vec(one, 1..3)]
}

fn node() -> impl Strategy<Value = NodeInfo> {
    (
        select(&["node-a", "node-b", "", "NODE-A"][..]),
        opt(select(&["z1", "z2"][..])),
    )
        .prop_map(|(name, zone)| NodeInfo {
            name: name.into(),
            zone: zone.map(String::from),
            // NodePorts on both families, so external frontends are exercised too.
            addresses: vec![
                "192.168.77.1".parse().unwrap(),
                "fd00:77::1".parse().unwrap(),
            ],
            ..Default::default()
        })
}

/// Up to `max - 1` Services, each with its own (sometimes wrong) slices.
fn objects(
    pool: Pool,
    namespaces: &'static [&'static str],
    names: &'static [&'static str],
    targets: &'static [&'static str],
    generic_slice_names: &'static [&'static str],
    max: usize,
) -> impl Strategy<Value = (Vec<Service>, Vec<EndpointSlice>)> {
    prop::collection::vec(
        service(pool, namespaces, names).prop_flat_map(move |svc| {
            let slices = slices_for(&svc, namespaces, targets, generic_slice_names);
            (Just(svc), slices)
        }),
        0..max,
    )
    .prop_map(|pairs| {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for (svc, s) in pairs {
            services.push(svc);
            slices.extend(s);
        }
        (services, slices)
    })
}

const NAMESPACES: &[&str] = &["default", "apps"];
const SERVICES: &[&str] = &["web", "api", "db", "dns", "mail", "www"];
const SLICES: &[&str] = &["s1", "s2", "web-1"];
const SLICE_TARGETS: &[&str] = &["web", "api", "db", "", "ghost"];
const GOOD_NAMES: &[&str] = &["good-a", "good-b", "good-c"];

/// Hostile objects: Services with their slices, plus stray slices.
fn hostile_objects(
    namespaces: &'static [&'static str],
) -> impl Strategy<Value = (Vec<Service>, Vec<EndpointSlice>)> {
    (
        objects(
            Pool::Hostile,
            namespaces,
            SERVICES,
            SLICE_TARGETS,
            SLICES,
            6,
        ),
        prop::collection::vec(slice(namespaces, SLICES, SLICE_TARGETS), 0..2),
    )
        .prop_map(|((services, mut slices), stray)| {
            slices.extend(stray);
            (services, slices)
        })
}

fn snapshot() -> impl Strategy<Value = Snapshot> {
    (hostile_objects(NAMESPACES), node()).prop_map(|((services, slices), node)| Snapshot {
        services: arcs(services),
        slices: arcs(slices),
        node,
        config: Default::default(),
        ..Default::default()
    })
}

/// Two snapshots where the second usually keeps part of the first (and adds its own), so
/// objects persist, change and disappear between them.
fn two_snapshots() -> impl Strategy<Value = (Snapshot, Snapshot)> {
    (
        snapshot(),
        prop::collection::vec(any::<bool>(), 6),
        prop::collection::vec(any::<bool>(), 8),
        hostile_objects(NAMESPACES),
        prop_oneof![3 => Just(None), 1 => node().prop_map(Some)],
    )
        .prop_map(|(a, keep_svc, keep_slice, (more_svc, more_slices), node)| {
            let keep = |mask: &[bool], i: usize| mask[i % mask.len()];
            let mut b = Snapshot {
                services: a
                    .services
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| keep(&keep_svc, *i))
                    .map(|(_, s)| s.clone())
                    .collect(),
                slices: a
                    .slices
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| keep(&keep_slice, *i))
                    .map(|(_, s)| s.clone())
                    .collect(),
                node: node.unwrap_or_else(|| a.node.clone()),
                config: a.config.clone(),
                ..Default::default()
            };
            b.services
                .extend(arcs(more_svc.into_iter().take(2).collect()));
            b.slices
                .extend(arcs(more_slices.into_iter().take(4).collect()));
            (a, b)
        })
}

/// Objects as a snapshot holds them.
fn arcs<T, U: From<T>>(objects: Vec<T>) -> Vec<Arc<U>> {
    objects.into_iter().map(|o| Arc::new(o.into())).collect()
}

// ---- Oracles --------------------------------------------------------------------------------

/// An endpoint address as kube-proxy reads it: leading zeros allowed (semantics 2.7).
fn parse_endpoint_addr(raw: &str) -> Option<IpAddr> {
    // Go's sloppy parse: each IPv4 octet's digits summed up while the value stays <= 255
    // (leading zeros, any number of them, add nothing), also as an IPv6 address's tail; then
    // To4: an IPv4-mapped address is IPv4.
    fn quad(s: &str) -> Option<[u8; 4]> {
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() != 4 {
            return None;
        }
        let mut octets = [0u8; 4];
        for (o, p) in octets.iter_mut().zip(parts) {
            if p.is_empty() {
                return None;
            }
            let mut n: u32 = 0;
            for b in p.bytes() {
                if !b.is_ascii_digit() {
                    return None;
                }
                n = n * 10 + u32::from(b - b'0');
                if n > 255 {
                    return None;
                }
            }
            *o = n as u8;
        }
        Some(octets)
    }
    let raw = raw.trim();
    let ip: IpAddr = if let Ok(ip) = raw.parse() {
        ip
    } else if let Some(i) = raw.rfind(':') {
        let [a, b, c, d] = quad(&raw[i + 1..])?;
        format!("{}:{a}.{b}.{c}.{d}", &raw[..i]).parse().ok()?
    } else {
        IpAddr::from(quad(raw)?)
    };
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    })
}

/// Conditions of a raw endpoint as kube-proxy reads them (semantics 3.1, 2.8):
/// (ready, serving, terminating, local).
fn conditions(ep: &KeptEndpoint, node: &NodeInfo) -> (bool, bool, bool, bool) {
    let node_name = node.name.to_lowercase();
    (
        ep.ready != Some(false),
        ep.serving != Some(false),
        ep.terminating == Some(true),
        !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name.as_str()),
    )
}

/// Every raw copy of `addr:port` in the slices that may feed Service port `port` (semantics
/// 1.1, 1.7, 1.8, 2.2, 2.7), with its conditions.
fn raw_copies(
    snap: &Snapshot,
    port: &PortName,
    addr: IpAddr,
    number: u16,
) -> Vec<(bool, bool, bool, bool)> {
    let family = match port.family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    let mut out = Vec::new();
    for s in &snap.slices {
        // The labels as the source reads them (`objects::Slice`): the Service's name, and
        // whether a hiding label (PROXY_NAME, HEADLESS) is present.
        if s.metadata.namespace.as_deref() != Some(port.namespace.as_str())
            || s.service_name.as_deref() != Some(port.name.as_str())
            || s.hidden
            || s.address_type != family
        {
            continue;
        }
        let port_matches = s.ports.iter().flatten().any(|p| {
            p.name.as_deref() == Some(port.port.as_str())
                && Proto::parse(p.protocol.as_deref()) == Some(port.proto)
                && p.port == Some(i32::from(number))
        });
        if !port_matches {
            continue;
        }
        for ep in s.endpoints.iter() {
            if ep.address == Address::Ip(addr) {
                out.push(conditions(ep, &snap.node));
            }
        }
    }
    out
}

/// Property (d) for every frontend of `d`.
fn check_backends(snap: &Snapshot, d: &Desired) -> Result<(), TestCaseError> {
    for (fe, state) in &d.frontends {
        let family = Family::of(&fe.addr);
        prop_assert_eq!(state.port.family, family, "{}", fe);
        prop_assert_eq!(state.port.proto, fe.proto);
        let sp = d.ports.get(&state.port);
        prop_assert!(sp.is_some(), "{} has no Service port", fe);
        let sp = sp.unwrap();
        if state.kind == FrontendKind::NodePort {
            prop_assert_eq!(sp.node_port, Some(fe.port));
        } else {
            prop_assert_eq!(sp.port, fe.port);
        }
        // ClusterIP traffic follows internalTrafficPolicy, external addresses reached from
        // this node use the cluster set, traffic from elsewhere follows
        // externalTrafficPolicy (semantics 4.6, 4.7).
        let local_policy = (state.kind == FrontendKind::ClusterIp && sp.itp_local)
            || (fe.scope == Scope::External && sp.etp_local);
        let all = sp.endpoints.all();
        let mut seen = BTreeSet::new();
        for b in &state.backends {
            prop_assert_eq!(Family::of(&b.addr), family, "{}: backend {:?}", fe, b);
            prop_assert_ne!(b.port, 0, "{}: backend {:?}", fe, b);
            prop_assert_eq!(b.proto, fe.proto);
            prop_assert!(
                seen.insert((b.addr, b.port)),
                "{}: duplicate backend {:?}",
                fe,
                b
            );
            let merged = all.iter().find(|e| e.addr == b.addr && e.port == b.port);
            prop_assert!(
                merged.is_some(),
                "{}: backend {:?} not among the endpoints",
                fe,
                b
            );
            let e = merged.unwrap();
            let copies = raw_copies(snap, &state.port, b.addr, b.port);
            prop_assert!(
                copies.contains(&(e.ready, e.serving, e.terminating, e.local)),
                "{}: backend {:?} has no source endpoint with its conditions (copies {:?})",
                fe,
                b,
                copies
            );
            prop_assert_eq!(b.terminating, e.terminating);
            prop_assert_eq!(b.local, e.local);
            // semantics 3.5: never an endpoint that is neither ready nor serving-terminating.
            prop_assert!(
                e.ready || (e.serving && e.terminating),
                "{}: unusable {:?}",
                fe,
                e
            );
            if local_policy {
                prop_assert!(e.local, "{}: remote backend {:?} with ITP Local", fe, e);
            }
            if !e.ready {
                // semantics 3.3, 3.4: the terminating fallback only when nothing is ready.
                let ready_exists = all.iter().any(|o| o.ready && (o.local || !local_policy));
                prop_assert!(
                    !ready_exists,
                    "{}: terminating {:?} used although ready endpoints exist",
                    fe,
                    e
                );
            }
        }
        let domain = |o: &&proxy_userspace::compile::Endpoint| o.local || !local_policy;
        let ready = all.iter().filter(domain).filter(|o| o.ready).count();
        let fallback: BTreeSet<(IpAddr, u16)> = all
            .iter()
            .filter(domain)
            .filter(|o| !o.ready && o.serving && o.terminating)
            .map(|o| (o.addr, o.port))
            .collect();
        if ready > 0 {
            // Topology may narrow the ready set but never empties it (semantics 5.5-5.7).
            prop_assert!(!state.backends.is_empty(), "{}: ready endpoints unused", fe);
        } else {
            // The fallback set is every serving-terminating endpoint, ignoring topology.
            let got: BTreeSet<(IpAddr, u16)> =
                state.backends.iter().map(|b| (b.addr, b.port)).collect();
            prop_assert_eq!(&got, &fallback, "{}: fallback set", fe);
        }
        if state.no_local {
            // semantics 3.8: drop only with ITP Local when endpoints exist elsewhere.
            prop_assert!(local_policy && state.backends.is_empty() && sp.endpoints.has_any);
        }
    }
    Ok(())
}

fn identity(v: &BackendValue) -> (IpAddr, u16, u8) {
    let addr = if v.family == FAMILY_V4 {
        IpAddr::from(v.addr4())
    } else {
        IpAddr::from(v.addr)
    };
    (addr, v.port, v.proto)
}

/// The maps hold exactly `d`: every frontend with its backends in order, ClusterIP markers,
/// and nothing else.
fn check_state_matches(d: &Desired, state: &MapState) -> Result<(), TestCaseError> {
    prop_assert!(state.consistent().is_ok(), "{:?}", state.consistent());
    let mut keys = BTreeSet::new();
    for (fe, f) in &d.frontends {
        let key = ServiceKey::of(fe);
        keys.insert(key);
        let value = state.services.get(&key);
        prop_assert!(value.is_some(), "{} not programmed", fe);
        let value = value.unwrap();
        let live: Vec<(IpAddr, u16, u8)> = state
            .live_slots(value)
            .into_iter()
            .map(|id| identity(&state.backends[&id.unwrap()]))
            .collect();
        let want: Vec<(IpAddr, u16, u8)> = f
            .backends
            .iter()
            .take(MAX_SLOTS)
            .map(|b| (b.addr, b.port, b.proto.number()))
            .collect();
        prop_assert_eq!(live, want, "{}", fe);
        prop_assert_eq!(value.affinity_timeout_secs, f.affinity_secs.unwrap_or(0));
    }
    let cluster_ips: BTreeSet<IpAddr> = d
        .frontends
        .iter()
        .filter(|(_, f)| f.kind == FrontendKind::ClusterIp)
        .map(|(fe, _)| fe.addr)
        .collect();
    for key in state.services.keys() {
        if key.is_any_port() {
            prop_assert!(cluster_ips.contains(&key.addr()), "stale marker {:?}", key);
        } else {
            prop_assert!(keys.contains(key), "stale frontend {:?}", key);
        }
    }
    // One entry per backend value: an endpoint two Services see differently (terminating in
    // one slice only, other weights) has one entry per view.
    let wanted: BTreeSet<((IpAddr, u16, u8), u8, u16)> = d
        .frontends
        .values()
        .flat_map(|f| &f.backends)
        .map(|b| {
            let flags = if b.local { BACKEND_LOCAL } else { 0 }
                | if b.terminating {
                    BACKEND_TERMINATING
                } else {
                    0
                };
            ((b.addr, b.port, b.proto.number()), flags, b.weight.max(1))
        })
        .collect();
    check_kept_members(d, state)?;
    let kept = kept_only(state);
    let have: BTreeSet<((IpAddr, u16, u8), u8, u16)> = state
        .backends
        .iter()
        .filter(|(id, _)| !kept.contains(id))
        .map(|(_, v)| (identity(v), v.flags, v.weight))
        .collect();
    prop_assert_eq!(
        have.len(),
        state.backends.len() - kept.len(),
        "one backend value under two ids"
    );
    prop_assert_eq!(have, wanted);
    let ids: BTreeSet<u32> = state.services.values().map(|v| v.id).collect();
    prop_assert!(
        state.slots.keys().all(|k| ids.contains(&k.svc_id)),
        "orphan slots"
    );
    prop_assert!(
        state.members.keys().all(|k| ids.contains(&k.svc_id)),
        "orphan members"
    );
    Ok(())
}

/// Plans `d` against `state` and applies the ops one by one, checking consistency after each.
fn apply_checked(state: &mut MapState, d: &Desired) -> Result<(), TestCaseError> {
    let ops = plan(d, state);
    for (i, op) in ops.iter().enumerate() {
        state.apply(op);
        if let Err(e) = state.consistent() {
            return Err(TestCaseError::fail(format!(
                "inconsistent after op {i} ({op}) of {}: {e}",
                ops.len()
            )));
        }
    }
    Ok(())
}

/// The frontends of the Services selected by `keep`.
fn frontends_of(
    d: &Desired,
    keep: impl Fn(&PortName) -> bool,
) -> BTreeMap<FrontendAddr, FrontendState> {
    d.frontends
        .iter()
        .filter(|(_, f)| keep(&f.port))
        .map(|(k, v)| (*k, v.clone()))
        .collect()
}

// ---- Properties -----------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// (a) Whatever the objects, compile and plan return; every problem names a Service or
    /// EndpointSlice and says something.
    #[test]
    fn compile_and_plan_never_panic(snap in snapshot()) {
        let d = compile(&snap);
        for p in &d.problems {
            prop_assert!(
                p.object.starts_with("Service ") || p.object.starts_with("EndpointSlice "),
                "{}", p
            );
            prop_assert!(!p.message.trim().is_empty(), "{}", p);
        }
        let mut state = MapState::default();
        for op in plan(&d, &state) {
            state.apply(&op);
        }
    }

    /// What the sources keep of an endpoint (`objects::SliceEndpoint`) is what kube-proxy
    /// reads of it: the first address parsed leniently (semantics 2.7), the conditions as
    /// written, a non-empty nodeName, non-empty hints.
    #[test]
    fn kept_endpoints_read_as_kube_proxy_reads_them(
        any_family in slice_endpoint(None),
        v4 in slice_endpoint(Some(Family::V4)),
        v6 in slice_endpoint(Some(Family::V6)),
    ) {
        for raw in [any_family, v4, v6] {
            let kept = KeptEndpoint::from(raw.clone());
            let want = match raw.addresses.first() {
                None => Address::Missing,
                Some(a) => match parse_endpoint_addr(a) {
                    Some(ip) => Address::Ip(ip),
                    None => Address::Invalid(a.as_str().into()),
                },
            };
            prop_assert_eq!(&kept.address, &want);
            let c = raw.conditions.clone().unwrap_or_default();
            prop_assert_eq!((kept.ready, kept.serving, kept.terminating), (c.ready, c.serving, c.terminating));
            prop_assert_eq!(
                kept.node_name.as_deref(),
                raw.node_name.as_deref().filter(|n| !n.is_empty())
            );
            let names = |l: Option<Vec<String>>| l.filter(|l| !l.is_empty());
            let hints = raw.hints.clone();
            let zones = names(hints.as_ref().and_then(|h| h.for_zones.clone()).map(|z| z.into_iter().map(|z| z.name).collect()));
            let nodes = names(hints.as_ref().and_then(|h| h.for_nodes.clone()).map(|n| n.into_iter().map(|n| n.name).collect()));
            let kept_names = |l: Option<&[Arc<str>]>| l.map(|l| l.iter().map(|n| n.to_string()).collect::<Vec<_>>());
            let kept_hints = kept.hints.as_deref();
            prop_assert_eq!(kept_names(kept_hints.and_then(|h| h.zones.as_deref())), zones);
            prop_assert_eq!(kept_names(kept_hints.and_then(|h| h.nodes.as_deref())), nodes);
        }
    }

    /// (b) The same objects in any order compile to the same result, problems included.
    #[test]
    fn compile_is_deterministic(
        (snap, shuffled) in snapshot().prop_flat_map(|s| {
            let services = Just(s.services.clone()).prop_shuffle();
            let slices = Just(s.slices.clone()).prop_shuffle();
            (Just(s.clone()), services, slices).prop_map(|(s, services, slices)| {
                let shuffled = Snapshot { services, slices, node: s.node.clone(), config: s.config.clone(), ..Default::default() };
                (s, shuffled)
            })
        })
    ) {
        prop_assert_eq!(compile(&snap), compile(&shuffled));
    }

    /// (c) Hostile Services and slices (for other Services, in the same namespace too) never
    /// change another Service's frontends or ports. The unrelated Services use addresses the
    /// hostile ones cannot produce: a frontend collision is legitimately won by name.
    #[test]
    fn other_services_objects_never_change_a_service(
        (good_services, good_slices) in objects(Pool::Isolated, &["iso"], GOOD_NAMES, GOOD_NAMES, &["good-x"], 4),
        (bad_services, bad_slices) in hostile_objects(&["default", "iso"]),
        node in node(),
    ) {
        let good = Snapshot { services: arcs(good_services), slices: arcs(good_slices), node, config: Default::default(), ..Default::default() };
        let mut mixed = good.clone();
        mixed.services.extend(arcs(bad_services));
        mixed.slices.extend(arcs(bad_slices));
        let is_good = |p: &PortName| p.namespace == "iso" && p.name.starts_with("good-");
        let (alone, together) = (compile(&good), compile(&mixed));
        // NodePorts share one number space across Services (the API allocates them uniquely);
        // a hostile Service reusing one legitimately wins by name, so they are left out.
        let no_node_ports = |d: &Desired| {
            let mut f = frontends_of(d, is_good);
            f.retain(|_, s| s.kind != FrontendKind::NodePort);
            f
        };
        prop_assert_eq!(no_node_ports(&alone), no_node_ports(&together));
        let ports = |d: &Desired| d.ports.iter()
            .filter(|(k, _)| is_good(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>();
        prop_assert_eq!(ports(&alone), ports(&together));
        // Problems of the good objects are the same too: hostile objects are reported under
        // their own names.
        let good_problems = |d: &Desired| d.problems.iter()
            .filter(|p| p.object.contains(" iso/good-"))
            .filter(|p| !p.message.contains(":30080/"))
            .cloned()
            .collect::<Vec<_>>();
        prop_assert_eq!(good_problems(&alone), good_problems(&together));
    }

    /// (d) Backends are of the frontend's family, have a port, come from a usable endpoint of
    /// that Service, and terminating endpoints are only the fallback.
    #[test]
    fn backends_come_from_usable_endpoints(snap in snapshot()) {
        let d = compile(&snap);
        check_backends(&snap, &d)?;
    }

    /// (e) + (f) Planning from empty, then to another state op by op: every intermediate state
    /// is consistent, each plan leaves exactly the desired state (a second plan is empty), and
    /// backends and frontends present before and after keep their ids.
    #[test]
    fn plans_are_consistent_idempotent_and_keep_ids((a, b) in two_snapshots()) {
        let (da, db) = (compile(&a), compile(&b));
        let mut state = MapState::default();
        apply_checked(&mut state, &da)?;
        prop_assert_eq!(plan(&da, &state), vec![]);
        check_state_matches(&da, &state)?;

        let backend_ids = |s: &MapState| s.backends.iter()
            .map(|(id, v)| ((identity(v), v.flags, v.weight), *id))
            .collect::<BTreeMap<_, _>>();
        let frontend_ids = |s: &MapState| s.services.iter()
            .filter(|(k, _)| !k.is_any_port())
            .map(|(k, v)| (*k, v.id))
            .collect::<BTreeMap<_, _>>();
        let (before, fe_before) = (backend_ids(&state), frontend_ids(&state));

        apply_checked(&mut state, &db)?;
        prop_assert_eq!(plan(&db, &state), vec![]);
        check_state_matches(&db, &state)?;

        for (identity, id) in backend_ids(&state) {
            if let Some(old) = before.get(&identity) {
                prop_assert_eq!(*old, id, "backend {:?} changed id", identity);
            }
        }
        for (key, id) in frontend_ids(&state) {
            if let Some(old) = fe_before.get(&key) {
                prop_assert_eq!(*old, id, "frontend {:?} changed id", key);
            }
        }

        // And back: the same holds on the way from B to A.
        apply_checked(&mut state, &da)?;
        prop_assert_eq!(plan(&da, &state), vec![]);
        check_state_matches(&da, &state)?;
    }
}

// ---- (g) Scale --------------------------------------------------------------------------------

fn big_slice(namespace: &str, service: &str, name: &str, n: usize) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(SERVICE_NAME.into(), service.into())])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: Some(
            (0..n)
                .map(|i| SliceEndpoint {
                    addresses: vec![format!(
                        "10.{}.{}.{}",
                        100 + i / 65_536,
                        i / 256 % 256,
                        i % 256
                    )],
                    node_name: Some(if i % 3 == 0 { "node-a" } else { "node-b" }.into()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

fn simple_service(namespace: &str, name: &str, cluster_ip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// (g) A Service with 10k endpoints in one slice compiles, plans and re-plans quickly.
#[test]
fn ten_thousand_endpoints_in_one_slice() {
    let snap = Snapshot {
        services: vec![Arc::new(simple_service("default", "big", "10.96.0.50"))],
        slices: vec![Arc::new(
            big_slice("default", "big", "big-1", 10_000).into(),
        )],
        node: NodeInfo {
            name: "node-a".into(),
            zone: None,
            addresses: Vec::new(),
            ..Default::default()
        },
        config: Default::default(),
        ..Default::default()
    };
    let started = Instant::now();
    let d = compile(&snap);
    let compiled = started.elapsed();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let fe = d.frontends.values().next().expect("one frontend");
    assert_eq!(d.frontends.len(), 1);
    assert_eq!(fe.backends.len(), 10_000);
    let mut state = MapState::default();
    let ops = plan(&d, &state);
    for op in &ops {
        state.apply(op);
    }
    state.consistent().unwrap();
    assert!(plan(&d, &state).is_empty());
    let total = started.elapsed();
    // Debug build on a shared 2-core machine: generous bounds, still catching quadratic
    // behaviour (which takes minutes at this size).
    assert!(
        compiled < Duration::from_secs(15),
        "compile took {compiled:?}"
    );
    assert!(
        total < Duration::from_secs(60),
        "compile+plan took {total:?}"
    );
}

// ---- Hostile objects, one by one ------------------------------------------------------------
//
// Each case adds a bad object (or a bad part of one) next to `default/good` and checks that
// (1) a problem names the bad object with a clear message, (2) `default/good` compiles
// exactly as without it, (3) nothing panics and the plan stays consistent.

mod hostile {
    use super::*;

    fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
        let (mut services, mut slices) = (Vec::new(), Vec::new());
        for doc in yaml.split("\n---\n").filter(|d| !d.trim().is_empty()) {
            let v: serde_norway::Value = serde_norway::from_str(doc).unwrap();
            match v["kind"].as_str() {
                Some("Service") => services.push(serde_norway::from_value(v).unwrap()),
                Some("EndpointSlice") => slices.push(serde_norway::from_value(v).unwrap()),
                _ => panic!("unexpected doc {doc}"),
            }
        }
        (services, slices)
    }

    const GOOD: &str = "kind: Service
metadata: {name: good, namespace: default}
spec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: good-1, namespace: default, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.1], nodeName: node-a}, {addresses: [10.244.0.2]}]";

    fn snap(yaml: &str) -> Snapshot {
        let (services, slices) = objects(yaml);
        Snapshot {
            services: arcs(services),
            slices: arcs(slices),
            node: NodeInfo {
                name: "node-a".into(),
                zone: None,
                addresses: Vec::new(),
                ..Default::default()
            },
            config: Default::default(),
            ..Default::default()
        }
    }

    fn good_only(d: &Desired) -> BTreeMap<FrontendAddr, FrontendState> {
        frontends_of(d, |p| p.namespace == "default" && p.name == "good")
    }

    /// Compiles GOOD plus `bad`; asserts a problem on `object` containing `text`, GOOD
    /// unchanged, a consistent plan. Returns the result for further checks.
    fn check(bad: &str, object: &str, text: &str) -> Desired {
        let alone = compile(&snap(GOOD));
        assert!(alone.problems.is_empty(), "{:?}", alone.problems);
        let with_bad = snap(&format!("{GOOD}\n---\n{bad}"));
        let d = compile(&with_bad);
        assert!(
            d.problems
                .iter()
                .any(|p| p.object == object && p.message.contains(text)),
            "no problem on {object} containing {text:?} in {:#?}",
            d.problems
        );
        assert!(
            d.problems.iter().all(|p| p.object != "Service default/good"
                && p.object != "EndpointSlice default/good-1"),
            "{:#?}",
            d.problems
        );
        assert_eq!(good_only(&alone), good_only(&d));
        assert_eq!(good_only(&d).len(), 1);
        // Any order, same result.
        let mut reversed = with_bad.clone();
        reversed.services.reverse();
        reversed.slices.reverse();
        assert_eq!(d, compile(&reversed));
        let mut state = MapState::default();
        for op in plan(&d, &state) {
            state.apply(&op);
            state.consistent().unwrap();
        }
        assert!(plan(&d, &state).is_empty());
        d
    }

    fn problems_of<'a>(d: &'a Desired, object: &str) -> Vec<&'a str> {
        d.problems
            .iter()
            .filter(|p| p.object == object)
            .map(|p| p.message.as_str())
            .collect()
    }

    // semantics 1.4, 12.8
    #[test]
    fn unparsable_cluster_ip() {
        let d = check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {clusterIP: 10.96.0.300, ports: [{name: http, port: 80}]}",
            "Service default/bad",
            "cluster IP \"10.96.0.300\" is not an IP address",
        );
        // Reported once, although both families looked at it.
        assert_eq!(problems_of(&d, "Service default/bad").len(), 1);
    }

    // semantics 1.4
    #[test]
    fn cluster_ip_of_the_wrong_family() {
        check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {clusterIP: 'fd00::1', clusterIPs: ['fd00::1'], ipFamilies: [IPv4], ports: [{name: http, port: 80}]}",
            "Service default/bad",
            "clusterIPs[0] fd00::1 is not IPv4",
        );
        check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {clusterIP: 10.96.0.9, ipFamilies: [IPv4, IPv6], clusterIPs: [10.96.0.9], ports: [{name: http, port: 80}]}",
            "Service default/bad",
            "ipFamilies[1] is IPv6 but clusterIPs has no entry 1",
        );
    }

    // semantics 7.6, 7.7, 12.8
    #[test]
    fn unparsable_external_and_load_balancer_ips() {
        let d = check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {type: LoadBalancer, clusterIP: 10.96.0.9, externalIPs: [203.0.113.300, 203.0.113.9], ports: [{name: http, port: 80}]}
status: {loadBalancer: {ingress: [{ip: lb!}, {ip: 198.51.100.9}]}}",
            "Service default/bad",
            "externalIP \"203.0.113.300\" is not an IP address",
        );
        assert!(
            problems_of(&d, "Service default/bad")
                .iter()
                .any(|m| m.contains("load balancer IP \"lb!\""))
        );
        // The valid addresses of the same Service are still programmed (the externalIP and
        // the LB IP once per scope).
        assert_eq!(
            frontends_of(&d, |p| p.name == "bad").len(),
            5,
            "{:?}",
            d.frontends.keys()
        );
    }

    // semantics 12.8
    #[test]
    fn service_port_zero_negative_and_too_big() {
        for port in ["0", "-1", "70000"] {
            let d = check(
                &format!(
                    "kind: Service
metadata: {{name: bad, namespace: default}}
spec: {{clusterIP: 10.96.0.9, ports: [{{name: x, port: {port}}}, {{name: http, port: 80}}]}}"
                ),
                "Service default/bad",
                &format!("port {port} is not in 1-65535"),
            );
            // The valid port of the same Service is still programmed.
            assert_eq!(frontends_of(&d, |p| p.name == "bad").len(), 1);
        }
    }

    // semantics 2.3, 12.8
    #[test]
    fn slice_port_zero_too_big_missing_or_unnamed() {
        for (port, text) in [
            (
                "{name: http, port: 0}",
                "port \"http\" number 0 is not in 1-65535",
            ),
            (
                "{name: http, port: 70000}",
                "port \"http\" number 70000 is not in 1-65535",
            ),
            ("{name: http}", "port \"http\" has no port number"),
            ("{port: 8080}", "port #0 has no name"),
        ] {
            check(
                &format!(
                    "kind: Service
metadata: {{name: bad, namespace: default}}
spec: {{clusterIP: 10.96.0.9, ports: [{{name: http, port: 80}}]}}
---
kind: EndpointSlice
metadata: {{name: bad-1, namespace: default, labels: {{kubernetes.io/service-name: bad}}}}
addressType: IPv4
ports: [{port}]
endpoints: [{{addresses: [10.244.9.1]}}]"
                ),
                "EndpointSlice default/bad-1",
                text,
            );
        }
    }

    // semantics 2.1, 12.8
    #[test]
    fn duplicate_ports() {
        let d = check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80}, {name: http, port: 81}, {name: http, port: 82, protocol: UDP}]}",
            "Service default/bad",
            "duplicate port name \"http\"/TCP",
        );
        // The last TCP port (kube-proxy fills its port map in spec order, so the later one
        // replaces the earlier) and the UDP port (another key) are programmed.
        let ports: Vec<String> = frontends_of(&d, |p| p.name == "bad")
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(ports, ["10.96.0.9:81/TCP", "10.96.0.9:82/UDP"]);
    }

    // semantics 12.1, 12.8
    #[test]
    fn unknown_protocols() {
        check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80, protocol: ICMP}]}",
            "Service default/bad",
            "unknown protocol \"ICMP\"",
        );
        // Protocol names are case-sensitive in the API: "tcp" is not TCP.
        check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: bad-1, namespace: default, labels: {kubernetes.io/service-name: bad}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: tcp}]
endpoints: [{addresses: [10.244.9.1]}]",
            "EndpointSlice default/bad-1",
            "port \"http\" has unknown protocol \"tcp\"",
        );
    }

    // semantics 2.5, 2.6
    #[test]
    fn slices_that_disagree_about_an_endpoint() {
        let d = check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: bad-1, namespace: default, labels: {kubernetes.io/service-name: bad}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.9.1], nodeName: node-b}, {addresses: [10.244.9.2]}]
---
kind: EndpointSlice
metadata: {name: bad-2, namespace: default, labels: {kubernetes.io/service-name: bad}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.9.1], nodeName: node-a, conditions: {ready: false}}, {addresses: [10.244.9.2]}]",
            "EndpointSlice default/bad-1",
            "endpoint 10.244.9.1:8080 of port default/bad:http/TCP is also in EndpointSlice default/bad-2 \
             with ready true here, false there, nodeName node-b here, node-a there; that copy is used",
        );
        // The identical copy of 10.244.9.2 is no problem; the later copy of .1, not
        // terminating, replaces the first (semantics 2.6): not ready, it serves nothing.
        assert_eq!(problems_of(&d, "EndpointSlice default/bad-1").len(), 1);
        assert!(problems_of(&d, "EndpointSlice default/bad-2").is_empty());
        let fe = &frontends_of(&d, |p| p.name == "bad")
            .into_values()
            .next()
            .unwrap();
        let backends: Vec<(String, bool)> = fe
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.local))
            .collect();
        assert_eq!(backends, [("10.244.9.2".into(), false)]);
    }

    // semantics 2.6: a non-terminating copy replaces a terminating one; the replaced copy is
    // the one reported.
    #[test]
    fn slices_disagree_and_the_later_copy_wins() {
        // Two running copies that disagree (different nodes): the later one is used and the
        // first is reported (semantics 2.6).
        check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: bad-1, namespace: default, labels: {kubernetes.io/service-name: bad}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.9.1], nodeName: node-a}]
---
kind: EndpointSlice
metadata: {name: bad-2, namespace: default, labels: {kubernetes.io/service-name: bad}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.9.1], nodeName: node-b}]",
            "EndpointSlice default/bad-1",
            "is also in EndpointSlice default/bad-2",
        );
        // semantics 2.6: a running copy replaces a terminating one (a reused pod IP); that is
        // normal and not reported.
        let d = compile(&snap(&format!(
            "{GOOD}\n---\nkind: Service
metadata: {{name: reused, namespace: default}}
spec: {{clusterIP: 10.96.0.9, ports: [{{name: http, port: 80}}]}}
---
kind: EndpointSlice
metadata: {{name: reused-1, namespace: default, labels: {{kubernetes.io/service-name: reused}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.9.1], conditions: {{ready: false, serving: true, terminating: true}}}}]
---
kind: EndpointSlice
metadata: {{name: reused-2, namespace: default, labels: {{kubernetes.io/service-name: reused}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.9.1]}}]"
        )));
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        let fe = frontends_of(&d, |p| p.name == "reused")
            .into_values()
            .next()
            .unwrap();
        assert!(!fe.backends[0].terminating);
    }

    // semantics 1.7, 2.7
    #[test]
    fn endpoint_addresses_of_the_wrong_family_or_unparsable() {
        let d = check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: bad-1, namespace: default, labels: {kubernetes.io/service-name: bad}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ['fd00::1']}, {addresses: [pod-1]}, {addresses: []}, {addresses: [010.244.9.1]}]",
            "EndpointSlice default/bad-1",
            "1 endpoint address(es) are not IPv4 like the slice's addressType (\"fd00::1\")",
        );
        let bad = problems_of(&d, "EndpointSlice default/bad-1");
        assert!(
            bad.iter()
                .any(|m| m.contains("are not IP addresses (\"pod-1\")"))
        );
        assert!(
            bad.iter()
                .any(|m| m.contains("1 endpoint(s) without an address"))
        );
        // The leading-zero address is fine (semantics 2.7).
        let fe = frontends_of(&d, |p| p.name == "bad")
            .into_values()
            .next()
            .unwrap();
        assert_eq!(fe.backends.len(), 1);
        assert_eq!(fe.backends[0].addr.to_string(), "10.244.9.1");
    }

    // semantics 1.7
    #[test]
    fn unknown_address_type() {
        check(
            "kind: EndpointSlice
metadata: {name: bad-1, namespace: default, labels: {kubernetes.io/service-name: good}}
addressType: IPv5
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.9.1]}]",
            "EndpointSlice default/bad-1",
            "addressType \"IPv5\" is not IPv4, IPv6 or FQDN",
        );
    }

    // semantics 6.1, 7.5, 8.1, 12.8
    #[test]
    fn odd_affinity_node_port_and_health_check_port() {
        let d = check(
            "kind: Service
metadata: {name: bad, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.9
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}
  ports: [{name: http, port: 80, nodePort: 70000}]",
            "Service default/bad",
            "sessionAffinity timeoutSeconds 0 is not in 1-86400; using 10800",
        );
        let bad = problems_of(&d, "Service default/bad");
        assert!(
            bad.iter()
                .any(|m| m.contains("nodePort 70000 is not in 1-65535"))
        );
        assert!(bad.iter().any(|m| m.contains("has no healthCheckNodePort")));
        let fe = frontends_of(&d, |p| p.name == "bad")
            .into_values()
            .next()
            .unwrap();
        assert_eq!(fe.affinity_secs, Some(10_800));
    }

    // A Service with 10k endpoints next to a small one: the small one is not affected.
    #[test]
    fn ten_thousand_endpoints_next_to_a_small_service() {
        let mut s = snap(GOOD);
        let alone = compile(&s);
        s.services
            .push(Arc::new(simple_service("default", "big", "10.96.0.50")));
        s.slices.push(Arc::new(
            big_slice("default", "big", "big-1", 10_000).into(),
        ));
        let d = compile(&s);
        assert_eq!(good_only(&alone), good_only(&d));
        let big = frontends_of(&d, |p| p.name == "big");
        assert_eq!(big.values().next().unwrap().backends.len(), 10_000);
    }

    fn copy(uid: &str, created: &str, cluster_ip: &str, endpoint: &str) -> String {
        format!(
            "kind: Service
metadata: {{name: bad, namespace: default, uid: {uid}, creationTimestamp: '{created}'}}
spec: {{clusterIP: {cluster_ip}, ports: [{{name: http, port: 80}}]}}
---
kind: EndpointSlice
metadata: {{name: bad-{uid}, namespace: default, labels: {{kubernetes.io/service-name: bad}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [{endpoint}]}}]"
        )
    }

    // Deleted and recreated with the same name, both copies in one snapshot (a manifest
    // directory holding the old and the new file): the newest is used, the other reported.
    #[test]
    fn same_name_twice_in_one_snapshot() {
        let old = copy("old", "2024-01-01T00:00:00Z", "10.96.0.9", "10.244.9.1");
        let new = copy("new", "2024-06-01T00:00:00Z", "10.96.0.19", "10.244.9.2");
        let d = check(
            &format!("{old}\n---\n{new}"),
            "Service default/bad",
            "another object of this name exists (uid old ignored, uid new used: the newest)",
        );
        let bad: Vec<String> = frontends_of(&d, |p| p.name == "bad")
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(bad, ["10.96.0.19:80/TCP"]);
        // Same in the other order.
        let d2 = check(
            &format!("{new}\n---\n{old}"),
            "Service default/bad",
            "uid old ignored",
        );
        assert_eq!(d, d2);
        // Identical copies (the same file read twice) are silently one object.
        let d3 = compile(&snap(&format!("{GOOD}\n---\n{old}\n---\n{old}")));
        assert!(d3.problems.is_empty(), "{:?}", d3.problems);
    }

    // Deleted and recreated with the same name across syncs: old frontend and backends go,
    // new ones come, every step consistent, the neighbour untouched.
    #[test]
    fn deleted_and_recreated_across_syncs() {
        let old = copy("old", "2024-01-01T00:00:00Z", "10.96.0.9", "10.244.9.1");
        let new = copy("new", "2024-06-01T00:00:00Z", "10.96.0.19", "10.244.9.2");
        let steps = [
            format!("{GOOD}\n---\n{old}"),
            GOOD.to_string(),
            format!("{GOOD}\n---\n{new}"),
            // Recreated with the old address again, and a new uid.
            format!(
                "{GOOD}\n---\n{}",
                copy("newer", "2024-07-01T00:00:00Z", "10.96.0.9", "10.244.9.2")
            ),
        ];
        let mut state = MapState::default();
        let mut good_state = None;
        for yaml in &steps {
            let d = compile(&snap(yaml));
            assert!(d.problems.is_empty(), "{:?}", d.problems);
            for op in plan(&d, &state) {
                state.apply(&op);
                state.consistent().unwrap();
            }
            assert!(plan(&d, &state).is_empty());
            // The neighbour's map entry never changes.
            let good = state
                .services
                .iter()
                .find(|(k, _)| {
                    k.frontend()
                        .is_some_and(|f| f.addr.to_string() == "10.96.0.1")
                })
                .map(|(k, v)| (*k, *v));
            assert!(good.is_some());
            assert!(good_state.is_none() || good_state == good);
            good_state = good;
        }
    }
}

// ---- (h) Incremental compile and plan ----------------------------------------------------------

/// A map state without its ids (which depend on history): each frontend with its flags,
/// counts, live slots and Maglev table as backend identities, members, info and source
/// ranges; the ClusterIP markers; the backends.
#[derive(Debug, PartialEq, Eq)]
struct Normal {
    frontends: BTreeMap<ServiceKey, String>,
    markers: BTreeSet<ServiceKey>,
    backends: BTreeSet<String>,
}

/// Backends only members without slots point at: entries an earlier state recorded flows
/// with, kept while their endpoint serves (semantics 9.3), so they depend on history.
fn kept_only(state: &MapState) -> BTreeSet<u32> {
    let used: BTreeSet<u32> = state
        .members
        .iter()
        .filter(|(_, m)| m.slots != 0)
        .map(|(k, _)| k.backend_id)
        .collect();
    state
        .members
        .iter()
        .filter(|(k, m)| m.slots == 0 && !used.contains(&k.backend_id))
        .map(|(k, _)| k.backend_id)
        .collect()
}

/// Every member without slots is justified: its endpoint still serves the frontend's port
/// (one of the frontend's backends or `keep_flows`).
fn check_kept_members(d: &Desired, state: &MapState) -> Result<(), TestCaseError> {
    for (fe, f) in &d.frontends {
        let Some(v) = state.services.get(&ServiceKey::of(fe)) else {
            continue;
        };
        let serving: BTreeSet<(IpAddr, u16, u8)> = f
            .backends
            .iter()
            .chain(&f.keep_flows)
            .map(|b| (b.addr, b.port, b.proto.number()))
            .collect();
        for (k, m) in state.members.iter().filter(|(k, _)| k.svc_id == v.id) {
            if m.slots == 0 {
                let b = &state.backends[&k.backend_id];
                prop_assert!(
                    serving.contains(&identity(b)),
                    "{} keeps a member for {:?}, which does not serve it",
                    fe,
                    identity(b)
                );
            }
        }
    }
    Ok(())
}

fn normal(state: &MapState) -> Normal {
    let kept = kept_only(state);
    let name = |id: &u32| {
        state.backends.get(id).map_or("?".to_string(), |v| {
            format!(
                "{:?}:{}/{} f{} w{}",
                v.addr, v.port, v.proto, v.flags, v.weight
            )
        })
    };
    let mut out = Normal {
        frontends: BTreeMap::new(),
        markers: BTreeSet::new(),
        backends: state
            .backends
            .keys()
            .filter(|id| !kept.contains(id))
            .map(name)
            .collect(),
    };
    for (key, v) in &state.services {
        if key.is_any_port() {
            out.markers.insert(*key);
            continue;
        }
        let slots: Vec<String> = state
            .live_slots(v)
            .iter()
            .map(|s| s.as_ref().map_or("-".into(), name))
            .collect();
        let members: BTreeMap<String, u32> = state
            .members
            .iter()
            // Members without slots depend on history (`kept_only`).
            .filter(|(k, m)| k.svc_id == v.id && m.slots != 0)
            .map(|(k, m)| (name(&k.backend_id), m.slots))
            .collect();
        let maglev: Vec<String> = state
            .maglev
            .iter()
            .filter(|(k, _)| k.svc_id == v.id && k.generation == v.generation())
            .flat_map(|(_, c)| c.backend_ids.iter().map(name).collect::<Vec<_>>())
            .collect();
        let ranges: Vec<String> = state
            .source_ranges
            .iter()
            .filter(|r| r.svc_id == v.id)
            .map(|r| r.cidr.to_string())
            .collect();
        let info = state
            .infos
            .get(&v.id)
            .map(|i| (i.kind, i.flags, i.name().to_string()));
        out.frontends.insert(
            *key,
            format!(
                "flags {} affinity {} count {} slots {slots:?} members {members:?} maglev \
                 {maglev:?} ranges {ranges:?} info {info:?}",
                v.flags, v.affinity_timeout_secs, v.count
            ),
        );
    }
    out
}

/// Feeds `snapshots` one after another to a `Compiler` and a `Mirror` planning only what changed,
/// checking after each that both equal a compile and a plan from scratch.
/// With `group`, every update is planned and written in groups of about that many entries
/// (`Mirror::full_groups`, `Mirror::changed_groups`), as the agent does with large ones.
fn incremental_equals_scratch(
    snapshots: &[&Snapshot],
    group: Option<usize>,
) -> Result<(), TestCaseError> {
    use proxy_userspace::{compile::Compiler, plan::Mirror};
    let mut compiler = Compiler::default();
    let mut mirror = Mirror::default();
    for (step, snapshot) in snapshots.iter().enumerate() {
        let update = compiler.update(snapshot);
        let groups = match group {
            Some(n) if update.full => {
                let groups = mirror.full_groups(compiler.desired(), n);
                prop_assert!(
                    groups.is_some(),
                    "step {step}: the agent's own maps are tidy"
                );
                groups
            }
            // An incremental update in groups, as the agent writes a change of many Services.
            Some(n) => Some(mirror.changed_groups(compiler.desired(), &update.changed, n)),
            None => None,
        };
        let applied = groups.is_some();
        let ops: Vec<Op> = match groups {
            // Each group is planned against the maps as the groups before it left them.
            Some(groups) => {
                let mut ops = Vec::new();
                for g in groups {
                    let planned = mirror.plan_changed(compiler.desired(), &g);
                    for op in &planned {
                        mirror.apply(op);
                        prop_assert!(
                            mirror.state().consistent().is_ok(),
                            "step {step}: {op} left {:?}",
                            mirror.state().consistent()
                        );
                    }
                    ops.extend(planned);
                }
                ops
            }
            None if update.full => mirror.plan_full(compiler.desired()),
            None => mirror.plan_changed(compiler.desired(), &update.changed),
        };
        for op in ops.iter().filter(|_| !applied) {
            mirror.apply(op);
            prop_assert!(
                mirror.state().consistent().is_ok(),
                "step {step}: {op} left {:?}",
                mirror.state().consistent()
            );
        }
        prop_assert_eq!(mirror.check(), Ok(()), "step {}", step);
        let scratch = compile(snapshot);
        prop_assert_eq!(
            compiler.desired(),
            &scratch,
            "step {}: compiled state",
            step
        );
        let mut fresh = MapState::default();
        for op in plan(&scratch, &fresh) {
            fresh.apply(&op);
        }
        prop_assert_eq!(
            normal(mirror.state()),
            normal(&fresh),
            "step {}: maps",
            step
        );
        check_kept_members(&scratch, mirror.state())?;
        // Planning again finds nothing to do.
        let again = mirror.plan_full(compiler.desired());
        prop_assert!(
            again.is_empty(),
            "step {step}: writes left: {:?}\nchanged {:?}\nfrontends {:?}\nmaps {:?}",
            again.iter().map(ToString::to_string).collect::<Vec<_>>(),
            update.changed,
            compiler
                .desired()
                .frontends
                .iter()
                .map(|(f, s)| format!("{f} {}", s.port))
                .collect::<Vec<_>>(),
            mirror
                .state()
                .services
                .iter()
                .map(|(k, v)| format!("{:?} id {} port {}", k.frontend(), v.id, v.port_id))
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Feeds `snapshots` to the agent's own sync (`agent::sync_once`) writing into in-memory maps,
/// in groups of about `group` entries: with more than one group the writes go through the
/// agent's writer thread, one group behind the planning. After each, the maps equal a plan
/// from scratch and the agent's mirror equals the maps.
fn agent_sync_equals_scratch(snapshots: &[&Snapshot], group: usize) -> Result<(), TestCaseError> {
    use proxy_userspace::agent::{Pipeline, sync_once};
    let mut io = MapState::default();
    let mut pipeline = Pipeline::new(MapState::default()).with_group_entries(group);
    let mut logged = std::collections::BTreeSet::new();
    for (step, snapshot) in snapshots.iter().enumerate() {
        let report = sync_once(&mut io, &mut pipeline, snapshot, &mut logged);
        prop_assert!(report.is_ok(), "step {}: {:?}", step, report.err());
        prop_assert_eq!(
            &io,
            pipeline.state(),
            "step {}: the mirror is the maps",
            step
        );
        prop_assert_eq!(pipeline.mirror().check(), Ok(()), "step {}", step);
        let mut fresh = MapState::default();
        for op in plan(&compile(snapshot), &fresh) {
            fresh.apply(&op);
        }
        prop_assert_eq!(normal(&io), normal(&fresh), "step {}: maps", step);
        check_kept_members(&compile(snapshot), &io)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// (h) Snapshot after snapshot, recompiling only the Services whose objects changed and
    /// planning only the frontends that changed gives the maps a from-scratch compile and plan
    /// give, map by map (ids aside); the mirror's indexes stay those of its state.
    #[test]
    fn incremental_compile_and_plan_equal_from_scratch((a, b) in two_snapshots()) {
        incremental_equals_scratch(&[&a, &b, &a, &b], None)?;
    }

    /// (h') The same with every update planned and written a few Service ports at a time
    /// (`Mirror::full_groups` and `Mirror::changed_groups`, as the agent writes a large full
    /// sync or a change of many Services), the node changing in between so that later updates
    /// are full too.
    #[test]
    fn full_syncs_in_groups_equal_from_scratch(
        (a, b) in two_snapshots(),
        group in 1usize..12,
        other in node(),
    ) {
        let mut a2 = a.clone();
        a2.node = other;
        incremental_equals_scratch(&[&a, &b, &a2, &b], Some(group))?;
    }

    /// (h'') The agent's sync itself, its large syncs written by its writer thread while it
    /// plans the next group, leaves the maps a from-scratch plan gives, and its mirror equal
    /// to them.
    #[test]
    fn the_agents_grouped_writes_equal_from_scratch(
        (a, b) in two_snapshots(),
        group in 1usize..12,
        other in node(),
    ) {
        let mut a2 = a.clone();
        a2.node = other;
        agent_sync_equals_scratch(&[&a, &b, &a2, &b, &Snapshot::default()], group)?;
    }
}
