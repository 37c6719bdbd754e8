//! The `-o json` documents against their JSON Schemas (`schema/*.json`): built the way the
//! commands build them, from a compiled snapshot planned into an in-memory `MapState`, so no
//! kernel and no root are needed.

use std::{collections::BTreeMap, net::IpAddr};

use proxy_common::{
    affinity::{AffinityKey, AffinityValue, CLIENT_ADDR, CLIENT_NETNS},
    info::{
        AgentState, IFACE_EXTERNAL, IFACE_NAMED, IFACE_NO_LINK_HEADER, IFACE_PATTERN,
        IFACE_POD_ROUTE, IFACE_REMOTE_ROUTE,
    },
    reason::Reason,
};
use serde_json::{Value, json};

use super::{
    api::{Kind, to_value},
    explain::{ExplainInputs, Explanation, FromSource, LiveMaps, explanation},
    status::{StatusInputs, status_view},
    verify::verification,
    view::service_list,
};
use crate::{
    compile::{Desired, FrontendAddr, Proto, Scope, compile},
    datapath::{bpf::HookInfo, tclinks},
    plan::{MapState, plan},
    snapshot::Snapshot,
};

const SERVICE_LIST: &str = include_str!("../../../schema/service-list.v1.json");
const STATUS: &str = include_str!("../../../schema/status.v1.json");
const EXPLANATION: &str = include_str!("../../../schema/explanation.v1.json");
const VERIFICATION: &str = include_str!("../../../schema/verification.v2.json");
/// The earlier releases' `Verification` (one `LB_SLOTS` entry per slot), kept for their output.
const VERIFICATION_V1: &str = include_str!("../../../schema/verification.v1.json");
pub(super) const EVENT: &str = include_str!("../../../schema/event.v1.json");

pub(super) fn schema(text: &str) -> Value {
    serde_json::from_str(text).expect("schema files are JSON")
}

fn validator(text: &str) -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema(text))
        .expect("schema compiles")
}

/// Panics with every violation of `doc` against `schema`.
#[track_caller]
pub(super) fn assert_valid(schema: &str, doc: &Value) {
    let errors: Vec<String> = validator(schema)
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{}\nin {}",
        errors.join("\n"),
        serde_json::to_string_pretty(doc).unwrap()
    );
}

#[track_caller]
pub(super) fn assert_invalid(schema: &str, doc: &Value, what: &str) {
    assert!(
        !validator(schema).is_valid(doc),
        "the schema accepts {what}: {doc}"
    );
}

/// Services covering what the documents can say: affinity, every scheduler family, both
/// families, Local policies, source ranges, a health check node port, no endpoints, no local
/// endpoints, and endpoints passed over for each reason.
const CLUSTER: &str = r#"kind: Service
metadata: {name: web, namespace: default, annotations: {kube-bpf-proxy.io/scheduler: rr}}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, protocol: TCP}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
---
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.0.5], nodeName: node-a, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.1.5], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.1.6], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.1.7], nodeName: node-b, conditions: {ready: false}}
- {addresses: [10.244.1.8], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.244.1.9], nodeName: node-b, conditions: {ready: false, serving: false, terminating: true}}
---
kind: Service
metadata:
  name: lb
  namespace: default
  annotations: {kube-bpf-proxy.io/scheduler: wlc, kube-bpf-proxy.io/weights: "10.244.0.6=3"}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  ports: [{port: 443, protocol: TCP, nodePort: 30443}]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [203.0.113.0/24]
status: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}
---
kind: EndpointSlice
metadata: {name: lb-1, namespace: default, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: "", port: 8443, protocol: TCP}]
endpoints:
- {addresses: [10.244.0.6], nodeName: node-a}
- {addresses: [10.244.0.7], nodeName: node-a}
- {addresses: [10.244.1.10], nodeName: node-b}
---
kind: Service
metadata: {name: dns, namespace: kube-system, annotations: {kube-bpf-proxy.io/scheduler: maglev}}
spec:
  clusterIP: fd00:96::a
  ipFamilies: [IPv6]
  clusterIPs: [fd00:96::a]
  ports: [{name: dns, port: 53, protocol: UDP}]
---
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv6
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: ["fd00:244::5"], nodeName: node-a}
---
kind: Service
metadata: {name: weighted, namespace: default, annotations: {kube-bpf-proxy.io/scheduler: wrr, kube-bpf-proxy.io/weights: "10.244.0.8=2"}}
spec:
  clusterIP: 10.96.0.60
  ports: [{port: 80, protocol: TCP}]
---
kind: EndpointSlice
metadata: {name: weighted-1, namespace: default, labels: {kubernetes.io/service-name: weighted}}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.0.8], nodeName: node-a}
- {addresses: [10.244.1.11], nodeName: node-b}
---
kind: Service
metadata: {name: hashed, namespace: default, annotations: {kube-bpf-proxy.io/scheduler: sh}}
spec:
  clusterIP: 10.96.0.70
  ports: [{port: 80, protocol: SCTP}]
---
kind: EndpointSlice
metadata: {name: hashed-1, namespace: default, labels: {kubernetes.io/service-name: hashed}}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: SCTP}]
endpoints:
- {addresses: [10.244.0.9], nodeName: node-a}
---
kind: Service
metadata: {name: plain, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.80
  ports: [{port: 80, protocol: TCP, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: plain-1, namespace: default, labels: {kubernetes.io/service-name: plain}}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.0.10], nodeName: node-a}
- {addresses: [10.244.1.13], nodeName: node-b}
---
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.30
  ports: [{port: 80, protocol: TCP}]
---
kind: Service
metadata: {name: elsewhere, namespace: default}
spec:
  clusterIP: 10.96.0.40
  internalTrafficPolicy: Local
  ports: [{port: 80, protocol: TCP}]
---
kind: EndpointSlice
metadata: {name: elsewhere-1, namespace: default, labels: {kubernetes.io/service-name: elsewhere}}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.12], nodeName: node-b}"#;

const NODE_V4: &str = "192.168.1.10";

/// The cluster above on node-a (zone-a), with 10.244.0.7's interface not carrying tc yet.
fn cluster() -> (Snapshot, Desired, MapState) {
    let mut snapshot = crate::compile::tests::snapshot(CLUSTER, "node-a", Some("zone-a"));
    snapshot.node.addresses = vec![NODE_V4.parse().unwrap(), "fd00::10".parse().unwrap()];
    snapshot.node.waiting.insert("10.244.0.7".parse().unwrap());
    snapshot.service_cidrs = vec!["10.96.1.0/24".into()];
    let desired = compile(&snapshot);
    // Only the SCTP port's: programmed, not served (semantics 12.1, README).
    let reasons: Vec<_> = desired.problems.iter().map(|p| p.reason).collect();
    assert_eq!(
        reasons,
        vec![crate::compile::ProblemReason::UnsupportedProtocol],
        "{:?}",
        desired.problems
    );
    let mut state = MapState::default();
    for op in plan(&desired, &state) {
        state.apply(&op);
    }
    (snapshot, desired, state)
}

fn doc<T: Kind>(body: &T) -> Value {
    to_value(body)
}

#[test]
fn schemas_are_draft_2020_12_documents() {
    use super::{
        api::API_VERSION, explain::Explanation, monitor::EventView, status::StatusView,
        verify::Verification, view::ServiceList,
    };
    for (name, text, version) in [
        ("service-list", SERVICE_LIST, ServiceList::API_VERSION),
        ("status", STATUS, StatusView::API_VERSION),
        ("explanation", EXPLANATION, Explanation::API_VERSION),
        ("verification", VERIFICATION, Verification::API_VERSION),
        ("event", EVENT, EventView::API_VERSION),
        ("verification v1", VERIFICATION_V1, API_VERSION),
    ] {
        let s = schema(text);
        assert!(
            jsonschema::draft202012::meta::is_valid(&s),
            "{name}: not a valid 2020-12 schema"
        );
        assert_eq!(s["properties"]["apiVersion"]["const"], version, "{name}");
    }
    assert_eq!(Verification::API_VERSION, "kube-bpf-proxy.io/v2");
}

/// The frontend and backend shapes are defined twice (each schema file stands alone): they
/// must not differ.
#[test]
fn shared_definitions_agree() {
    let list = schema(SERVICE_LIST);
    let explanation = schema(EXPLANATION);
    for (name, def) in list["$defs"].as_object().unwrap() {
        assert_eq!(&explanation["$defs"][name], def, "$defs/{name} differs");
    }
    let verification = schema(VERIFICATION);
    for name in [
        "ip",
        "cidr",
        "port",
        "protocol",
        "reach",
        "scope",
        "endpointState",
    ] {
        assert_eq!(
            verification["$defs"][name], list["$defs"][name],
            "$defs/{name} differs"
        );
    }
    let event = schema(EVENT);
    for (name, def) in event["$defs"].as_object().unwrap() {
        assert_eq!(&list["$defs"][name], def, "event's $defs/{name} differs");
    }
}

#[test]
fn services_json_follows_its_schema() {
    let (_, _, state) = cluster();
    let list = service_list(&state, &|id| Some(u64::from(id) % 3));
    let v = doc(&list);
    assert_valid(SERVICE_LIST, &v);
    assert_eq!(v["apiVersion"], "kube-bpf-proxy.io/v1");
    assert_eq!(v["kind"], "ServiceList");
    let items = v["items"].as_array().unwrap();
    let find = |address: &str, port: u64, reach: &str| {
        items
            .iter()
            .find(|f| f["address"] == address && f["port"] == port && f["reach"] == reach)
            .unwrap_or_else(|| panic!("no {address}:{port} {reach} in {v}"))
    };
    let web = find("10.96.0.10", 80, "internal");
    assert_eq!(
        web["service"],
        json!({"namespace": "default", "name": "web", "port": "http"})
    );
    assert_eq!(web["scope"], "clusterIP");
    assert_eq!(web["protocol"], "TCP");
    assert_eq!(web["family"], "IPv4");
    assert_eq!(web["action"], "balance");
    assert_eq!(web["scheduler"], "round-robin");
    assert_eq!(
        web["affinity"],
        json!({"mode": "ClientIP", "timeoutSeconds": 600})
    );
    assert_eq!(
        web["trafficPolicies"],
        json!({"internal": "Cluster", "external": "Cluster"})
    );
    assert_eq!(web["sourceRanges"], json!([]));
    let backends: Vec<(&str, u64, &str)> = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap(),
                b["port"].as_u64().unwrap(),
                b["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        backends,
        [("10.244.0.5", 8080, "ready"), ("10.244.1.5", 8080, "ready")]
    );
    assert!(web["backends"][0].get("node").is_none(), "not in the maps");
    assert!(web.get("healthCheckNodePort").is_none(), "not in the maps");

    let lb = find("198.51.100.7", 443, "external");
    assert_eq!(lb["scope"], "loadBalancer");
    assert_eq!(lb["service"]["port"], "");
    assert_eq!(lb["scheduler"], "weighted-least-connection");
    assert_eq!(lb["sourceRanges"], json!(["203.0.113.0/24"]));
    assert_eq!(lb["trafficPolicies"]["external"], "Local");
    assert_eq!(lb["masquerade"], false);
    assert!(lb["backends"][0]["connections"].is_u64(), "{lb}");
    let node_port = find(NODE_V4, 30443, "external");
    assert_eq!(node_port["scope"], "nodePort");
    assert_eq!(
        find(NODE_V4, 30443, "internal")["masquerade"],
        false,
        "externalTrafficPolicy Local: this node's pods keep their address (7.13)"
    );
    assert_eq!(find(NODE_V4, 30080, "external")["masquerade"], true);
    assert_eq!(
        find(NODE_V4, 30080, "internal")["masquerade"],
        true,
        "Cluster: this node's pods are masqueraded too (7.13)"
    );
    assert!(
        !items.iter().any(|f| f["address"] == "fd00::10"),
        "no IPv6 Service has a NodePort"
    );
    assert_eq!(find("fd00:96::a", 53, "internal")["scheduler"], "maglev");
    assert_eq!(
        find("10.96.0.60", 80, "internal")["scheduler"],
        "weighted-round-robin"
    );
    assert_eq!(find("10.96.0.70", 80, "internal")["protocol"], "SCTP");
    let empty = find("10.96.0.30", 80, "internal");
    assert_eq!(
        (&empty["action"], &empty["reason"]),
        (&json!("reject"), &json!("no endpoints"))
    );
    assert_eq!(find("10.96.0.40", 80, "internal")["action"], "drop");
}

/// `explain`'s maps besides the dump, made up.
struct FakeLive {
    affinity: Vec<(AffinityKey, AffinityValue)>,
}

impl LiveMaps for FakeLive {
    fn affinity(&self) -> anyhow::Result<Vec<(AffinityKey, AffinityValue)>> {
        Ok(self.affinity.clone())
    }
    fn rr_cursor(&self, _: u32) -> anyhow::Result<u32> {
        Ok(3)
    }
    fn connections(&self, backend_id: u32) -> anyhow::Result<u64> {
        Ok(u64::from(backend_id))
    }
}

fn explain_one(
    client: &str,
    addr: &str,
    port: u16,
    proto: Proto,
    scope: Scope,
    with_source: bool,
    live: &FakeLive,
) -> Explanation {
    let (snapshot, desired, state) = cluster();
    explanation(ExplainInputs {
        client: client.parse().unwrap(),
        frontend: FrontendAddr {
            addr: addr.parse().unwrap(),
            port,
            proto,
            scope,
        },
        state: &state,
        live,
        now_ns: 10_000_000_000,
        source: with_source.then_some(FromSource {
            desired: &desired,
            node: &snapshot.node,
        }),
    })
    .expect("explanation")
}

#[test]
fn explain_json_follows_its_schema_for_every_verdict() {
    let (_, _, state) = cluster();
    let web = state
        .services
        .values()
        .find(|v| v.affinity_timeout_secs == 600)
        .unwrap();
    let client: [u8; 4] = [10, 244, 0, 2];
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&client);
    let backend_id = *state.backends.keys().next().unwrap();
    let entry = |kind, client| {
        (
            AffinityKey {
                port_id: web.port_id,
                client_kind: kind,
                client,
            },
            AffinityValue {
                backend_id,
                _pad: 0,
                last_used_ns: 4_000_000_000,
            },
        )
    };
    let mut netns = [0u8; 16];
    netns[..8].copy_from_slice(&4242u64.to_ne_bytes());
    let live = FakeLive {
        affinity: vec![entry(CLIENT_ADDR, addr), entry(CLIENT_NETNS, netns)],
    };
    let none = FakeLive {
        affinity: Vec::new(),
    };
    let (tcp, udp) = (Proto::Tcp, Proto::Udp);
    let (int, ext) = (Scope::Internal, Scope::External);
    let cases: [(&str, Explanation, &str); 11] = [
        (
            "affinity",
            explain_one("10.244.0.2", "10.96.0.10", 80, tcp, int, true, &live),
            "translated",
        ),
        (
            "round-robin",
            explain_one("10.244.0.3", "10.96.0.10", 80, tcp, int, true, &live),
            "translated",
        ),
        (
            "lc, waiting interface",
            explain_one("203.0.113.9", "198.51.100.7", 443, tcp, ext, true, &none),
            "translated",
        ),
        (
            "maglev v6",
            explain_one("fd00:244::9", "fd00:96::a", 53, udp, int, false, &none),
            "translated",
        ),
        (
            "ranges",
            explain_one("192.0.2.1", "198.51.100.7", 443, tcp, ext, true, &none),
            "refused",
        ),
        (
            "no endpoints",
            explain_one("10.244.0.2", "10.96.0.30", 80, tcp, int, true, &none),
            "rejected",
        ),
        (
            "no local endpoints",
            explain_one("10.244.0.2", "10.96.0.40", 80, tcp, int, true, &none),
            "dropped",
        ),
        (
            "undefined port",
            explain_one("10.244.0.2", "10.96.0.10", 81, tcp, int, false, &none),
            "rejected",
        ),
        (
            "no Service",
            explain_one("10.244.0.2", "10.96.0.99", 80, tcp, int, false, &none),
            "untouched",
        ),
        (
            "unallocated",
            explain_one("10.244.0.2", "10.96.1.99", 80, tcp, int, false, &none),
            "dropped",
        ),
        (
            "random",
            explain_one("10.244.0.2", "10.96.0.80", 80, tcp, int, false, &none),
            "translated",
        ),
    ];
    let mut docs = BTreeMap::new();
    for (name, out, verdict) in &cases {
        let v = doc(out);
        assert_valid(EXPLANATION, &v);
        assert_eq!(v["kind"], "Explanation");
        assert_eq!(v["verdict"], *verdict, "{name}: {v}");
        docs.insert(*name, v);
    }
    let unallocated = docs["unallocated"]["reason"].as_str().unwrap();
    assert!(
        unallocated.contains("inside a ServiceCIDR (10.96.1.0/24 of its ranges"),
        "{unallocated}"
    );
    let affinity = &docs["affinity"];
    assert_eq!(affinity["next"]["decidedBy"], "affinity");
    assert_eq!(affinity["next"]["backend"]["id"], backend_id);
    assert_eq!(affinity["affinity"][1]["client"], "netns:4242");
    assert_eq!(affinity["affinity"][0]["expiresInSeconds"], 594.0);
    assert_eq!(affinity["matched"]["backends"][0]["node"], "node-a");
    assert_eq!(affinity["matched"]["backends"][0]["zone"], "zone-a");
    let causes: BTreeMap<&str, &str> = affinity["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["address"].as_str().unwrap(), e["cause"].as_str().unwrap()))
        .collect();
    assert_eq!(
        causes,
        BTreeMap::from([
            ("10.244.1.6", "fallbackOnly"),
            ("10.244.1.7", "notReady"),
            ("10.244.1.8", "zoneHint"),
            ("10.244.1.9", "notServing"),
        ])
    );
    let rr = &docs["round-robin"];
    assert_eq!(rr["next"]["decidedBy"], "scheduler");
    assert!(
        rr["reason"]
            .as_str()
            .unwrap()
            .starts_with("round-robin: turn 3"),
        "{rr}"
    );
    assert!(rr["next"]["backend"]["address"].is_string(), "{rr}");
    let lc = &docs["lc, waiting interface"];
    assert_eq!(lc["matched"]["healthCheckNodePort"], 32000);
    assert_eq!(lc["excluded"][0]["cause"], "interfaceWaiting", "{lc}");
    assert_eq!(lc["excluded"][0]["address"], "10.244.0.7");
    assert!(lc["next"].get("backend").is_none());
    assert!(
        docs["maglev v6"].get("excluded").is_none(),
        "no source read"
    );
    assert_eq!(docs["ranges"]["eligible"], json!([]));
    assert!(docs["no Service"].get("matched").is_none());
    assert!(
        docs["random"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("random: ")
    );
    let probabilities: f64 = docs["random"]["eligible"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["probability"].as_f64().unwrap())
        .sum();
    assert!((probabilities - 1.0).abs() < 1e-9);
}

#[test]
fn status_json_follows_its_schema() {
    let mut agent = AgentState {
        last_sync_unix_ms: 1_700_000_000_000,
        syncs: 12,
        sync_failures: 1,
        pid: 4321,
        version_len: 5,
        version: [0; 32],
    };
    agent.version[..5].copy_from_slice(b"0.1.0");
    let links = BTreeMap::from([
        (
            "eth0".to_string(),
            tclinks::LinkState {
                link_id: 7,
                program_id: 70,
                ifindex: 2,
            },
        ),
        (
            "veth1".to_string(),
            tclinks::LinkState {
                link_id: 8,
                program_id: 70,
                ifindex: 3,
            },
        ),
        (
            "cali9".to_string(),
            tclinks::LinkState {
                link_id: 9,
                program_id: 70,
                ifindex: 4,
            },
        ),
        (
            "tunl0".to_string(),
            tclinks::LinkState {
                link_id: 10,
                program_id: 71,
                ifindex: 5,
            },
        ),
    ]);
    let pod: IpAddr = "10.244.0.5".parse().unwrap();
    let recorded = BTreeMap::from([
        (
            2,
            tclinks::iface_info("eth0", 2, IFACE_EXTERNAL, None, None),
        ),
        (
            3,
            tclinks::iface_info("veth1", 3, IFACE_POD_ROUTE, Some((pod, 32)), None),
        ),
        (
            5,
            tclinks::iface_info(
                "tunl0",
                5,
                IFACE_REMOTE_ROUTE | IFACE_NO_LINK_HEADER,
                Some(("10.244.1.9".parse().unwrap(), 32)),
                None,
            ),
        ),
        (0, tclinks::iface_info("late0", 0, IFACE_NAMED, None, None)),
        (
            9,
            tclinks::iface_info("old0", 9, IFACE_PATTERN, None, Some("old*")),
        ),
    ]);
    let view = status_view(StatusInputs {
        agent,
        running: true,
        now_ms: 1_700_000_002_500,
        socket_termination: true,
        pin_dir: "/sys/fs/bpf/kube-bpf-proxy".into(),
        hooks: vec![
            HookInfo {
                hook: "sock4_connect".into(),
                link_id: Some(3),
                program_id: Some(30),
            },
            HookInfo {
                hook: "sock6_connect".into(),
                link_id: None,
                program_id: None,
            },
        ],
        links,
        recorded,
        fill: proxy_common::maps::ALL
            .iter()
            .map(|name| (*name, 3, 1000))
            .chain([("LB_RR", 0, 0)])
            .collect(),
        memlock: BTreeMap::from([("LB4_SERVICES", 4096)]),
        layouts: BTreeMap::from([("LB4_SERVICES", 1), ("LB_DROPS", 2)]),
        stats: Reason::ALL.iter().map(|r| (*r, 5)).collect(),
        drops: vec![(proxy_common::reason::Hook::Connect, Reason::NoBackends, 2)],
        per_packet: vec![("mesh".into(), 2)],
    });
    let v = doc(&view);
    assert_valid(STATUS, &v);
    assert_eq!(v["kind"], "Status");
    assert_eq!(
        v["perPacketNamespaces"],
        json!([{"namespace": "mesh", "pods": 2}])
    );
    assert_eq!(v["agent"]["lastSyncAgeSeconds"], 2.5);
    assert_eq!(v["maps"][0]["percent"], 0.3);
    assert_eq!(v["maps"][0]["memlockBytes"], 4096);
    assert_eq!(v["maps"][0]["layoutVersion"], 1);
    assert_eq!(v["maps"][1]["layoutVersion"], serde_json::Value::Null);
    assert_eq!(v["interfacesMissing"], json!(["late0"]));
    let causes: Vec<(&str, &str, bool)> = v["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["interface"].as_str().unwrap(),
                i["cause"].as_str().unwrap(),
                i["noLinkHeader"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        causes,
        [
            ("cali9", "unknown", false),
            ("eth0", "external", false),
            ("tunl0", "remoteRoute", true),
            ("veth1", "podRoute", false)
        ]
    );
    assert_eq!(
        v["hooks"][1],
        json!({"hook": "sock6_connect", "attached": false})
    );
    // Never synced: no age.
    agent.last_sync_unix_ms = 0;
    let fresh = doc(&status_view(StatusInputs {
        agent,
        running: false,
        now_ms: 5,
        socket_termination: false,
        pin_dir: String::new(),
        hooks: Vec::new(),
        links: BTreeMap::new(),
        recorded: BTreeMap::new(),
        fill: Vec::new(),
        memlock: BTreeMap::new(),
        layouts: BTreeMap::new(),
        stats: Vec::new(),
        drops: Vec::new(),
        per_packet: Vec::new(),
    }));
    assert_valid(STATUS, &fresh);
    assert!(fresh["agent"].get("lastSyncAgeSeconds").is_none());
}

#[test]
fn verify_json_follows_its_schema() {
    let (_, desired, state) = cluster();
    // Everything to write (puts of every map), everything to remove (deletes), in sync.
    let puts = plan(&desired, &MapState::default());
    let deletes = plan(&Desired::default(), &state);
    let missing = vec![(
        "veth9".to_string(),
        "pod: route to endpoint 10.244.0.9".to_string(),
    )];
    let v = doc(&verification(desired.frontends.len(), &puts, missing, &[]));
    assert_valid(VERIFICATION, &v);
    assert_eq!(v["kind"], "Verification");
    assert_eq!(v["inSync"], false);
    let maps: std::collections::BTreeSet<&str> = v["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["map"].as_str().unwrap())
        .collect();
    for map in [
        "LB4_SERVICES",
        "LB6_SERVICES",
        "LB_SLOTS",
        "LB_MEMBERS",
        "LB_BACKENDS",
        "LB_SVC_INFO",
        "LB4_SRC_RANGES",
        "LB_MAGLEV",
    ] {
        assert!(maps.contains(map), "no put to {map}: {maps:?}");
    }
    let backend = v["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["map"] == "LB_BACKENDS")
        .unwrap();
    assert_eq!(backend["operation"], "put");
    assert!(backend["key"]["backendId"].is_u64(), "{backend}");
    assert!(backend["value"]["address"].is_string(), "{backend}");
    assert!(backend["text"].as_str().unwrap().starts_with("PutBackend"));
    assert_eq!(v["interfacesMissing"][0]["interface"], "veth9");

    let v = doc(&verification(0, &deletes, Vec::new(), &[]));
    assert_valid(VERIFICATION, &v);
    assert!(
        v["differences"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["operation"] == "delete" && d.get("value").is_none())
    );
    let v = doc(&verification(desired.frontends.len(), &[], Vec::new(), &[]));
    assert_valid(VERIFICATION, &v);
    assert_eq!(v["inSync"], true);

    // Another program at a socket hook is listed and is no drift; another kube-bpf-proxy's is.
    use crate::datapath::foreign::Foreign;
    let other = Foreign {
        hook: "sock4_connect".into(),
        program_id: 7,
        name: Some("cil_sock4_conne".into()),
        kube_bpf_proxy: false,
    };
    let v = doc(&verification(
        0,
        &[],
        Vec::new(),
        std::slice::from_ref(&other),
    ));
    assert_valid(VERIFICATION, &v);
    assert_eq!(v["inSync"], true);
    assert_eq!(v["foreignPrograms"][0]["anotherKubeBpfProxy"], false);
    let ours = Foreign {
        hook: "tc-eth0".into(),
        program_id: 8,
        name: Some("tc_ingress".into()),
        kube_bpf_proxy: true,
    };
    let unnamed = Foreign {
        hook: "sock_release".into(),
        program_id: 9,
        name: None,
        kube_bpf_proxy: false,
    };
    let v = doc(&verification(0, &[], Vec::new(), &[other, ours, unnamed]));
    assert_valid(VERIFICATION, &v);
    assert_eq!(v["inSync"], false);
    assert_eq!(v["foreignPrograms"][1]["programId"], 8);
    assert_eq!(v["foreignPrograms"][1]["anotherKubeBpfProxy"], true);
    assert!(v["foreignPrograms"][2].get("name").is_none());
}

/// The schemas catch drift: unknown fields, misspelt enums, missing fields and a key of the
/// wrong map are rejected.
#[test]
fn schemas_reject_what_the_commands_do_not_write() {
    let (_, desired, state) = cluster();
    let good = doc(&service_list(&state, &|_| None));
    let mut bad = good.clone();
    bad["extra"] = json!(1);
    assert_invalid(SERVICE_LIST, &bad, "an unknown top-level field");
    let mut bad = good.clone();
    bad["items"][0]["frontend"] = json!("10.96.0.10:80/TCP");
    assert_invalid(SERVICE_LIST, &bad, "the old frontend string");
    let mut bad = good.clone();
    bad["items"][0]["backends"][0]["terminating"] = json!(false);
    assert_invalid(SERVICE_LIST, &bad, "an unknown backend field");
    let mut bad = good.clone();
    bad["items"][0]["scope"] = json!("ClusterIP");
    assert_invalid(SERVICE_LIST, &bad, "a scope in the wrong case");
    let mut bad = good.clone();
    bad["items"][0]["address"] = json!("fd00::1");
    assert_invalid(SERVICE_LIST, &bad, "an IPv6 address in an IPv4 frontend");
    let mut bad = good.clone();
    bad["items"][0]["affinity"] = json!({"mode": "None", "timeoutSeconds": 5});
    assert_invalid(SERVICE_LIST, &bad, "a timeout without ClientIP");
    let mut bad = good.clone();
    bad["apiVersion"] = json!("kube-bpf-proxy.io/v2");
    assert_invalid(SERVICE_LIST, &bad, "another apiVersion");
    let mut bad = good;
    bad.as_object_mut().unwrap().remove("kind");
    assert_invalid(SERVICE_LIST, &bad, "a document without kind");

    let good = doc(&verification(
        1,
        &plan(&desired, &MapState::default()),
        Vec::new(),
        &[],
    ));
    let mut bad = good.clone();
    let slot = bad["differences"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|d| d["map"] == "LB_SLOTS")
        .unwrap();
    slot["key"] = json!({"backendId": 1});
    assert_invalid(VERIFICATION, &bad, "a backend key in LB_SLOTS");
    let mut bad = good;
    bad["differences"][0]["operation"] = json!("delete");
    assert_invalid(VERIFICATION, &bad, "a delete with a value");
}

/// A client pod of a per-packet namespace: `perPacket` in the explanation, found by address.
#[test]
fn explain_json_names_a_per_packet_client() {
    use std::sync::Arc;

    use super::explain::{PerPacketClient, per_packet_client};
    use crate::objects::PodRef;

    let mut pod = PodRef {
        ips: vec!["10.244.0.2".parse().unwrap()],
        ..PodRef::default()
    };
    pod.metadata.namespace = Some("mesh".into());
    pod.metadata.name = Some("client".into());
    let pods = [Arc::new(pod)];
    let listed = [("mesh".to_string(), 1)];
    let client: IpAddr = "10.244.0.2".parse().unwrap();
    let found = per_packet_client(client, &pods, &listed);
    assert_eq!(
        found,
        Some(PerPacketClient {
            namespace: "mesh".into(),
            pod: "client".into()
        })
    );
    assert_eq!(per_packet_client(client, &pods, &[]), None);
    assert_eq!(
        per_packet_client("10.244.0.3".parse().unwrap(), &pods, &listed),
        None
    );
    let mut out = explain_one(
        "10.244.0.2",
        "10.96.0.10",
        80,
        Proto::Tcp,
        Scope::Internal,
        true,
        &FakeLive {
            affinity: Vec::new(),
        },
    );
    out.per_packet = found;
    let v = doc(&out);
    assert_valid(EXPLANATION, &v);
    assert_eq!(v["perPacket"]["namespace"], "mesh");
}
