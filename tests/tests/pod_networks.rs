//! External traffic to local backends on every pod-network shape (issue: any CNI). With the
//! default `--pod-interfaces auto`, the agent must find the interfaces its local endpoints are
//! routed through (a bridge, each pod's own veth with a /32 route, calico's proxy-ARP veths),
//! put tc there, and follow pods as they come, restart on a new veth, and go.
//!
//! Each shape gets one test on a two-node testbed (node-a: 2 pods, node-b: 1 pod, the agent on
//! node-a with XDP and tc on `eth0`):
//! - from the external client, NodePort, externalIP and load balancer IP, TCP and UDP, IPv4
//!   and IPv6: a backend on node-a with externalTrafficPolicy Cluster (it sees a node-a
//!   address, semantics 7.13) and Local (it sees the client, semantics 4.7c), and a backend on
//!   node-b (masqueraded);
//! - hairpin: node-a's pods (outside the hooked cgroup, so translated at tc on their own
//!   interface) reach the NodePort and land on a node-a backend, themselves included (7.14);
//! - a pod created after the agent is up becomes reachable through a NodePort, and again after
//!   it is recreated with the same address on a new veth (same name, then a new name); a veth
//!   that goes away leaves nothing behind in `status` or the pins.
//!
//! And an overlay (flannel's VXLAN): the remote backend's replies arrive on `flannel.1`, which
//! the agent must find by the route to the remote endpoint.

mod common;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use common::*;
use tests::{
    Agent, Shape, Testbed,
    harness::{
        testbed::{
            EXT_IP4, EXT_IP6, L3_OVERLAY_DEVICE, VXLAN_DEVICE, vpc_interface_ip4, vxlan_ip4,
            vxlan_ip6,
        },
        topology::Proto,
    },
    poll_until,
};

/// Every address of node-a a masqueraded flow may carry (its LAN and pod gateway addresses,
/// and in the overlay its `flannel.1` addresses).
const NODE_A: [&str; 6] = [
    "192.168.77.1",
    "fd00:77::1",
    "10.244.0.1",
    "fd00:244::1",
    "10.244.0.0",
    "fd00:244::",
];

/// A Service of the test: one backend (node, pod), its NodePorts, its address suffix.
struct Svc {
    name: &'static str,
    /// Last group of every address: ClusterIP 10.96.0.N, externalIP 10.96.100.N, LB IP
    /// 10.96.200.N (and fd00:96::N, fd00:96::1NN, fd00:96::2NN, inside the /112 the external
    /// client routes to node-a).
    n: u8,
    node_port_tcp: u16,
    node_port_udp: u16,
    local_policy: bool,
}

const NEAR: Svc = Svc {
    name: "near",
    n: 21,
    node_port_tcp: 30021,
    node_port_udp: 30022,
    local_policy: false,
};
const NEAR_LOCAL: Svc = Svc {
    name: "near-local",
    n: 31,
    node_port_tcp: 30031,
    node_port_udp: 30032,
    local_policy: true,
};
const FAR: Svc = Svc {
    name: "far",
    n: 41,
    node_port_tcp: 30041,
    node_port_udp: 30042,
    local_policy: false,
};
const LATE: Svc = Svc {
    name: "late",
    n: 51,
    node_port_tcp: 30051,
    node_port_udp: 30052,
    local_policy: false,
};

impl Svc {
    fn yaml(&self) -> String {
        let n = self.n;
        let etp = if self.local_policy {
            "  externalTrafficPolicy: Local\n"
        } else {
            ""
        };
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.{n}
  clusterIPs: [10.96.0.{n}, \"fd00:96::{n}\"]
  ipFamilies: [IPv4, IPv6]
  externalIPs: [10.96.100.{n}, \"fd00:96::1{n:02}\"]
  ports:
  - {{name: http, port: 80, nodePort: {tcp}, protocol: TCP}}
  - {{name: dns, port: 53, nodePort: {udp}, protocol: UDP}}
{etp}status:
  loadBalancer: {{ingress: [{{ip: 10.96.200.{n}}}, {{ip: \"fd00:96::2{n:02}\"}}]}}
",
            name = self.name,
            tcp = self.node_port_tcp,
            udp = self.node_port_udp,
        )
    }

    /// Writes the Service and its slices (both families) with pod `pod` of node `node` as the
    /// one endpoint.
    fn program(&self, agent: &Agent, tb: &Testbed, node: usize, pod: usize) {
        agent.write_manifest(&format!("{}.yaml", self.name), &self.yaml());
        let p = &tb.nodes[node].pods[pod];
        for (family, addr) in [("IPv4", p.ip4.to_string()), ("IPv6", p.ip6.to_string())] {
            let eps = [Ep {
                addr,
                node: if node == 0 { NODE } else { "node-b" },
                conditions: "",
            }];
            agent.write_manifest(
                &format!("{}-{family}.yaml", self.name),
                &slice_yaml(
                    &format!("{}-{family}", self.name),
                    self.name,
                    family,
                    &[HTTP, DNS],
                    &eps,
                ),
            );
        }
    }

    /// Every external frontend for `proto`: NodePorts on node-a, externalIPs, LB IPs.
    fn frontends(&self, proto: Proto) -> Vec<SocketAddr> {
        let n = self.n;
        let (node_port, port) = match proto {
            Proto::Tcp => (self.node_port_tcp, 80),
            _ => (self.node_port_udp, 53),
        };
        [
            format!("192.168.77.1:{node_port}"),
            format!("[fd00:77::1]:{node_port}"),
            format!("10.96.100.{n}:{port}"),
            format!("[fd00:96::1{n:02}]:{port}"),
            format!("10.96.200.{n}:{port}"),
            format!("[fd00:96::2{n:02}]:{port}"),
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
    }
}

fn seen_ip(seen: &str) -> IpAddr {
    seen.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("seen {seen:?}: {e}"))
        .ip()
}

/// Polls until `to` answers the external client from `backend`.
fn wait_from_ext(tb: &Testbed, proto: Proto, to: SocketAddr, backend: &str) {
    wait_from(tb, &tb.ext, proto, to, backend);
}

/// Polls until a request from namespace `ns` (not in the hooked cgroup) to `to` is answered
/// by `backend`.
fn wait_from(tb: &Testbed, ns: &tests::NetNs, proto: Proto, to: SocketAddr, backend: &str) {
    poll_until(
        &format!("{to} answered by {backend} from {}", ns.name),
        Duration::from_secs(15),
        || {
            let r = tb.request_from(ns, false, proto, to, 1);
            if r.iter().all(|r| r.ok && r.backend == backend) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
}

/// Asserts 3 requests from outside to every frontend of `svc` are answered by `backend`,
/// which sees the client (`local_policy`) or a node-a address.
fn check_from_outside(tb: &Testbed, svc: &Svc, backend: &str) {
    for proto in [Proto::Tcp, Proto::Udp] {
        for to in svc.frontends(proto) {
            wait_from_ext(tb, proto, to, backend);
            for r in tb.request_ext(proto, to, 3) {
                assert!(r.ok, "{to} {proto:?}: {r:?}");
                assert_eq!(r.backend, backend, "{to} {proto:?}: {r:?}");
                let seen = seen_ip(&r.seen);
                if svc.local_policy {
                    // semantics 4.7c: Local keeps the client address.
                    let client: IpAddr = if to.is_ipv4() {
                        EXT_IP4.into()
                    } else {
                        EXT_IP6.into()
                    };
                    assert_eq!(seen, client, "{to} {proto:?}: {r:?}");
                } else {
                    // semantics 7.13: Cluster masquerades to a node address.
                    assert!(
                        NODE_A.contains(&seen.to_string().as_str()),
                        "{to} {proto:?} not masqueraded to node-a: {r:?}"
                    );
                }
                assert_eq!(
                    seen_ip(&r.peer),
                    to.ip(),
                    "{to} {proto:?}: reply source {r:?}"
                );
            }
        }
    }
}

/// `status -o json` in node-a's namespace.
fn status(tb: &Testbed, agent: &Agent) -> serde_json::Value {
    let out = cli_in_node(tb, agent, &["status", "-o", "json"]);
    assert!(out.status.success(), "status: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(v["kind"], "Status", "{v}");
    v
}

/// The interfaces `status` lists as carrying tc, with their reasons.
fn tc_interfaces(status: &serde_json::Value) -> Vec<(String, String)> {
    status["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .map(|i| {
            (
                i["interface"].as_str().unwrap().to_string(),
                i["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn hooks(status: &serde_json::Value) -> BTreeSet<String> {
    status["hooks"]
        .as_array()
        .expect("hooks")
        .iter()
        .map(|h| h["hook"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `status` and the pins show no trace of interface `name`.
fn wait_forgotten(tb: &Testbed, agent: &Agent, name: &str) {
    // Its ingress link and the egress link beside it.
    let pins = ["tc", "tce"].map(|p| agent.pin_dir.join("links").join(format!("{p}-{name}")));
    poll_until(
        &format!("{name} forgotten"),
        Duration::from_secs(10),
        || {
            let s = status(tb, agent);
            let listed = tc_interfaces(&s).iter().any(|(i, _)| i == name)
                || hooks(&s).contains(&format!("tc-{name}"))
                || hooks(&s).contains(&format!("tce-{name}"));
            if listed || pins.iter().any(|p| Path::new(p).exists()) {
                Err(format!("still there: {s}"))
            } else {
                Ok(())
            }
        },
    );
}

/// Requests from `pod`, inside the hooked cgroup, to `to` until one is answered as `expected`
/// says (within 15 s: until then the pod's interface may not carry tc, or the pod not be
/// marked), then 3 more that must all be.
fn answered_as(
    tb: &Testbed,
    pod: &tests::harness::topology::Pod,
    proto: Proto,
    to: SocketAddr,
    expected: impl Fn(&tests::Reply) -> bool,
) {
    poll_until(
        &format!("{to} {proto:?} from {}", pod.name),
        Duration::from_secs(15),
        || {
            let r = tb.request_from(&pod.ns, true, proto, to, 1);
            if expected(&r[0]) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
    for r in tb.request_from(&pod.ns, true, proto, to, 3) {
        assert!(expected(&r), "{to} {proto:?} from {}: {r:?}", pod.name);
    }
}

/// Hairpin (semantics 7.14): node-a's two pods, outside the hooked cgroup (so translated at
/// tc on their own interface), reach `NEAR`'s NodePort `to` and land on a-pod-1, a-pod-1
/// included, masqueraded to a node-a address.
fn check_hairpin(tb: &Testbed, to: SocketAddr) {
    for client in 0..2 {
        let ns = &tb.nodes[0].pods[client].ns;
        poll_until(
            &format!("hairpin {to} from a-pod-{}", client + 1),
            Duration::from_secs(10),
            || {
                let r = tb.request_from(ns, false, Proto::Tcp, to, 1);
                if r[0].ok {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        );
        for r in tb.request_from(ns, false, Proto::Tcp, to, 3) {
            assert!(r.ok, "{r:?}");
            assert_eq!(r.backend, "a-pod-1", "{r:?}");
            assert!(
                NODE_A.contains(&seen_ip(&r.seen).to_string().as_str()),
                "hairpin not masqueraded: {r:?}"
            );
        }
    }
}

/// Echo servers in a-pod-1, a-pod-2 and b-pod-1, and node-a's agent (started, the default
/// `--pod-interfaces auto`: nothing named) serving `NEAR`, `NEAR_LOCAL` and `FAR` from them.
fn serve_near_and_far(tb: &mut Testbed) -> Agent {
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(0, 1, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let mut agent = node_agent(tb, 0, &tb.id, tb.cgroup_path(), &[]);
    agent.start();
    NEAR.program(&agent, tb, 0, 0);
    NEAR_LOCAL.program(&agent, tb, 0, 1);
    FAR.program(&agent, tb, 1, 0);
    agent
}

fn pod_network(shape: Shape) {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_shape(&[2, 1], shape);
    let mut agent = serve_near_and_far(&mut tb);

    check_from_outside(&tb, &NEAR, "a-pod-1");
    check_from_outside(&tb, &NEAR_LOCAL, "a-pod-2");
    check_from_outside(&tb, &FAR, "b-pod-1");
    // semantics 11.6: three dual-stack Services and a slice per family each, every object
    // written once: three events per family, however often the node's state made the agent
    // look at the same objects again (here one more NodePort address).
    let queued = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"}";
    let before = metric(&agent, queued).unwrap_or(0.0);
    tb.nodes[0]
        .ns
        .ip(&["addr", "add", "192.168.77.120/24", "dev", "eth0"]);
    // Once the agent has taken the snapshot passed again with the new address (the time a
    // change was last queued moves on).
    poll_until(
        "the snapshot with the new address taken",
        Duration::from_secs(10),
        || match metric(&agent, queued) {
            Some(t) if t > before => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    for family in ["IPv4", "IPv6"] {
        for name in ["service", "endpoint"] {
            let counter = format!(
                "kubeproxy_sync_proxy_rules_{name}_changes_total{{ip_family=\"{family}\"}}"
            );
            assert_eq!(metric(&agent, &counter), Some(3.0), "{counter}");
        }
    }

    // What carries tc, and why: the external interface, and where the routes to the local
    // endpoints leave (the bridge, or each pod's own veth).
    let s = status(&tb, &agent);
    let tc = tc_interfaces(&s);
    assert!(
        tc.contains(&("eth0".to_string(), "external".to_string())),
        "{tc:?}"
    );
    let pods = &tb.nodes[0].pods;
    match shape {
        Shape::Bridge => assert!(
            tc.iter()
                .any(|(i, why)| i == "br0" && why.contains("route to endpoint")),
            "{tc:?}"
        ),
        Shape::Ptp | Shape::Calico | Shape::AwsVpc => {
            for pod in pods {
                assert!(
                    tc.iter()
                        .any(|(i, why)| *i == pod.host_if && why.contains("route to endpoint")),
                    "{} not listed: {tc:?}",
                    pod.host_if
                );
            }
        }
    }
    // XDP runs in front of tc on eth0 and hands local-backend flows to tc: they were answered.
    assert!(hooks(&s).contains("xdp-eth0"), "{s}");
    // tc's egress program sits beside every ingress link.
    for (interface, _) in &tc {
        assert!(hooks(&s).contains(&format!("tce-{interface}")), "{s}");
    }
    // verify agrees: the maps match and every pod-facing interface carries the program.
    assert_verified(
        &tb,
        &agent,
        NODE,
        "with every pod-facing interface attached",
    );

    // Hairpin: node-a's pods, outside the hooked cgroup, to node-a's NodePort; answered by
    // a-pod-1, including a-pod-1 itself, masqueraded (semantics 7.14).
    for to in [
        format!("192.168.77.1:{}", NEAR.node_port_tcp),
        format!("[fd00:77::1]:{}", NEAR.node_port_tcp),
    ] {
        check_hairpin(&tb, to.parse().unwrap());
    }

    // An endpoint in the hooked cgroup reaching itself through its ClusterIP: left by the
    // socket layer to tc on its interface, masqueraded (semantics 7.14).
    for stack in [Stack::V4, Stack::V6] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let to = NEAR.cluster_ip(stack, proto);
            let pod = &pods[0];
            let expected = |r: &tests::Reply| {
                r.ok && r.backend == pod.name
                    && seen_ip(&r.peer) == to.ip()
                    && NODE_A.contains(&seen_ip(&r.seen).to_string().as_str())
            };
            answered_as(&tb, pod, proto, to, expected);
        }
    }

    // A pod of node-a that is no endpoint, in the hooked cgroup (so translated at the socket
    // layer), reaching node-a's external frontends: with Cluster kube-proxy masquerades it
    // (semantics 7.13), so the agent finds the pod by its network namespace, puts tc on its
    // interface (on ptp and calico its own veth, which nothing else selects) and leaves those
    // connections to tc; with Local it keeps its address (4.7a, 7.13).
    let client = tb.add_pod(0);
    {
        let pod = &tb.nodes[0].pods[client];
        for (svc, backend) in [
            (&FAR, "b-pod-1"),
            (&NEAR, "a-pod-1"),
            (&NEAR_LOCAL, "a-pod-2"),
        ] {
            for proto in [Proto::Tcp, Proto::Udp] {
                for to in svc.frontends(proto) {
                    let own: IpAddr = if to.is_ipv4() {
                        pod.ip4.into()
                    } else {
                        pod.ip6.into()
                    };
                    let expected = |r: &tests::Reply| {
                        let seen = seen_ip(&r.seen);
                        r.ok && r.backend == backend
                            && seen_ip(&r.peer) == to.ip()
                            && if svc.local_policy {
                                seen == own
                            } else {
                                NODE_A.contains(&seen.to_string().as_str())
                            }
                    };
                    answered_as(&tb, pod, proto, to, expected);
                }
            }
        }
    }

    // A pod created after the agent is up, behind its own Service.
    let late = tb.add_pod(0);
    tb.serve(0, late, BACKEND_PORT);
    LATE.program(&agent, &tb, 0, late);
    let backend = tb.nodes[0].pods[late].name.clone();
    let node_port: SocketAddr = format!("192.168.77.1:{}", LATE.node_port_tcp)
        .parse()
        .unwrap();
    let node_port6: SocketAddr = format!("[fd00:77::1]:{}", LATE.node_port_udp)
        .parse()
        .unwrap();
    let reachable = |tb: &Testbed| {
        wait_from_ext(tb, Proto::Tcp, node_port, &backend);
        wait_from_ext(tb, Proto::Udp, node_port6, &backend);
    };
    reachable(&tb);

    // Restarted with the same address on a new veth of the same name, then of a new name.
    let first_if = tb.nodes[0].pods[late].host_if.clone();
    tb.recreate_pod_link(0, late, true);
    assert_eq!(tb.nodes[0].pods[late].host_if, first_if);
    reachable(&tb);
    tb.recreate_pod_link(0, late, false);
    let second_if = tb.nodes[0].pods[late].host_if.clone();
    assert_ne!(second_if, first_if);
    reachable(&tb);
    if shape != Shape::Bridge {
        // The old veth left nothing behind; the new one is listed.
        wait_forgotten(&tb, &agent, &first_if);
        let tc = tc_interfaces(&status(&tb, &agent));
        assert!(tc.iter().any(|(i, _)| *i == second_if), "{tc:?}");
        // The veth goes away for good (the pod is deleted): forgotten too.
        tb.nodes[0].ns.ip(&["link", "del", &second_if]);
        wait_forgotten(&tb, &agent, &second_if);
    }
    // The older backends were not disturbed by any of it.
    check_from_outside(&tb, &NEAR, "a-pod-1");
    agent.assert_running();
    tb.assert_no_checksum_errors();
}

#[test]
fn pod_network_bridge_external_traffic_reaches_local_backends() {
    pod_network(Shape::Bridge);
}

#[test]
fn pod_network_ptp_external_traffic_reaches_local_backends() {
    pod_network(Shape::Ptp);
}

#[test]
fn pod_network_calico_external_traffic_reaches_local_backends() {
    pod_network(Shape::Calico);
}

/// The AWS VPC CNI: pods hold addresses of the node's own subnet (the external client's too),
/// the node reaches them through `eni…` veths under policy rules, and a pod on a secondary
/// interface sends through that interface's table.
#[test]
fn pod_network_aws_vpc_external_traffic_reaches_local_backends() {
    pod_network(Shape::AwsVpc);
}

/// `serve_near_and_far`, then every frontend of the three Services checked from outside: the
/// remote backend's first.
fn served_across_nodes(tb: &mut Testbed) -> Agent {
    let agent = serve_near_and_far(tb);
    check_from_outside(tb, &FAR, "b-pod-1");
    check_from_outside(tb, &NEAR, "a-pod-1");
    check_from_outside(tb, &NEAR_LOCAL, "a-pod-2");
    agent
}

/// flannel's `vxlan` backend (Calico's VXLAN alike): node-a reaches node-b's pods through its
/// VXLAN device `flannel.1`, so a masqueraded flow to b-pod-1 leaves with `flannel.1`'s
/// address and b-pod-1's replies come back through `flannel.1`. The agent finds that device
/// by the route to the remote endpoint and puts tc there, treated as an external interface.
#[test]
fn pod_network_vxlan_overlay_external_traffic_reaches_remote_backends() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_vxlan(&[2, 1], Shape::Bridge);
    let mut agent = served_across_nodes(&mut tb);
    let tc = tc_interfaces(&status(&tb, &agent));
    assert!(
        tc.iter()
            .any(|(i, why)| i == VXLAN_DEVICE && why.contains("route to remote endpoint")),
        "{tc:?}"
    );
    assert_verified(
        &tb,
        &agent,
        NODE,
        "with every pod-facing interface attached",
    );
    agent.assert_running();
    tb.assert_no_checksum_errors();
}

/// Calico's ipip mode, WireGuard (Calico's, Cilium's, flannel's `wireguard` backend): node-a
/// reaches node-b's pods through a device without a link-layer header, so a masqueraded flow
/// to b-pod-1 leaves with that device's address and b-pod-1's replies come back through it,
/// as IP packets with no Ethernet header. The agent puts `tc_ingress_l3` there, which
/// translates them back and sends them on to the external client (semantics 7.13).
#[test]
fn pod_network_l3_overlay_external_traffic_reaches_remote_backends() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_l3_overlay(&[2, 1], Shape::Bridge);
    let mut agent = served_across_nodes(&mut tb);
    let s = status(&tb, &agent);
    let tc = tc_interfaces(&s);
    assert!(
        tc.iter().any(|(i, why)| i == L3_OVERLAY_DEVICE
            && why.contains("route to remote endpoint")
            && why.contains("no link-layer header")),
        "{tc:?}"
    );
    let flagged: Vec<&str> = s["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["noLinkHeader"] == true)
        .filter_map(|i| i["interface"].as_str())
        .collect();
    assert_eq!(flagged, [L3_OVERLAY_DEVICE], "{s}");
    // No egress program there: it reads Ethernet frames.
    let hooked = hooks(&s);
    assert!(
        hooked.contains(&format!("tc-{L3_OVERLAY_DEVICE}"))
            && !hooked.contains(&format!("tce-{L3_OVERLAY_DEVICE}")),
        "{s}"
    );
    assert_verified(
        &tb,
        &agent,
        NODE,
        "with every pod-facing interface attached",
    );
    // A restart keeps the device's link and puts the program for devices without a link-layer
    // header back into it in place (below, after the wrong one went in), and an open
    // connection through it lives on.
    let link_before = link_id(&s, L3_OVERLAY_DEVICE).expect("overlay device listed");
    let to: SocketAddr = format!("192.168.77.1:{}", FAR.node_port_tcp)
        .parse()
        .unwrap();
    let (mut held, first) = tb.hold_from(&tb.ext, false, to);
    assert!(first.ok && first.backend == "b-pod-1", "{first:?}");
    // The Ethernet program swapped into the device's link (by hand): verify says so.
    let links = agent.pin_dir.join("links");
    swap_link_program(
        &links.join(format!("tc-{L3_OVERLAY_DEVICE}")),
        &agent.pin_dir.join("tc_ingress"),
    );
    let out = verify_in_node(&tb, &agent, NODE);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success()
            && text.contains(&format!("interface {L3_OVERLAY_DEVICE}"))
            && text.contains("instead of tc_ingress_l3"),
        "{text}"
    );
    restart_holding(&mut agent, &mut held, "b-pod-1");
    let s = status(&tb, &agent);
    assert_eq!(
        link_id(&s, L3_OVERLAY_DEVICE),
        Some(link_before),
        "link kept: {s}"
    );
    assert_verified(
        &tb,
        &agent,
        NODE,
        "after the restart put the right program back",
    );
    check_from_outside(&tb, &FAR, "b-pod-1");
    agent.assert_running();
    tb.assert_no_checksum_errors();
}

/// A device without a link-layer header named an external interface (NodePort traffic arrives
/// through a WireGuard or ipip device): it gets `tc_ingress_l3` and no XDP, a new flow arriving
/// there is translated, and its replies are sent back into the device through the kernel's
/// route. node-b reaches node-a's NodePort address through the overlay here.
#[test]
fn an_external_interface_without_a_link_layer_header_gets_tc_and_no_xdp() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_l3_overlay(&[1, 0], Shape::Bridge);
    tb.serve(0, 0, BACKEND_PORT);
    let mut agent = node_agent(
        &tb,
        0,
        &tb.id,
        tb.cgroup_path(),
        &["--external-interfaces", L3_OVERLAY_DEVICE],
    );
    agent.start();
    NEAR.program(&agent, &tb, 0, 0);
    let node_b = &tb.nodes[1].ns;
    for (family, node_port, via) in [
        ("-4", "192.168.77.1/32", vxlan_ip4(0).to_string()),
        ("-6", "fd00:77::1/128", vxlan_ip6(0).to_string()),
    ] {
        node_b.ip(&[
            family,
            "route",
            "replace",
            node_port,
            "via",
            &via,
            "dev",
            L3_OVERLAY_DEVICE,
            "onlink",
        ]);
    }
    for to in [
        format!("192.168.77.1:{}", NEAR.node_port_tcp),
        format!("[fd00:77::1]:{}", NEAR.node_port_tcp),
    ] {
        let to: SocketAddr = to.parse().unwrap();
        wait_from(&tb, node_b, Proto::Tcp, to, "a-pod-1");
        for r in tb.request_from(node_b, false, Proto::Tcp, to, 3) {
            assert!(r.ok && r.backend == "a-pod-1", "{to}: {r:?}");
            assert_eq!(seen_ip(&r.peer), to.ip(), "{to}: reply source {r:?}");
        }
    }
    let s = status(&tb, &agent);
    let hooked = hooks(&s);
    assert!(
        hooked.contains(&format!("tc-{L3_OVERLAY_DEVICE}"))
            && !hooked.contains(&format!("xdp-{L3_OVERLAY_DEVICE}"))
            && hooked.contains("xdp-eth0"),
        "{s}"
    );
    let tc = tc_interfaces(&s);
    assert!(
        tc.iter().any(|(i, why)| i == L3_OVERLAY_DEVICE
            && why.starts_with("external")
            && why.contains("no link-layer header")),
        "{tc:?}"
    );
    agent.assert_running();
    tb.assert_no_checksum_errors();
}

/// The link id `status` (its JSON, `s`) gives the tc link on `interface`.
fn link_id(s: &serde_json::Value, interface: &str) -> Option<serde_json::Value> {
    s["interfaces"]
        .as_array()?
        .iter()
        .find(|i| i["interface"] == interface)
        .map(|i| i["linkId"].clone())
}

/// Kills the agent and starts it again; once it has synced, the connection `held` asks five
/// more times, each answered by `backend`.
fn restart_holding(agent: &mut Agent, held: &mut tests::harness::topology::Held, backend: &str) {
    agent.kill();
    let pos = agent.log_position();
    agent.start();
    agent.wait_for_log(pos, "synced", Duration::from_secs(20));
    for _ in 0..5 {
        let r = held.again();
        assert!(r.ok && r.backend == backend, "after the restart: {r:?}");
    }
}

/// Swaps the program pinned at `program` into the link pinned at `link` (BPF_LINK_UPDATE), as
/// a mistaken hand or an older agent would.
fn swap_link_program(link: &std::path::Path, program: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt as _;
    let get = |p: &std::path::Path| {
        let path = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // BPF_OBJ_GET's attribute: pathname, bpf_fd, file_flags, path_fd.
        let mut attr = [0u64; 3];
        attr[0] = path.as_ptr() as u64;
        // SAFETY: BPF_OBJ_GET (7) reads the attribute (24 bytes) and the string it points to.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, attr.as_mut_ptr(), 24) };
        assert!(
            fd >= 0,
            "BPF_OBJ_GET {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
        fd as i32
    };
    let (link_fd, program_fd) = (get(link), get(program));
    // BPF_LINK_UPDATE's attribute: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [link_fd as u32, program_fd as u32, 0, 0];
    // SAFETY: BPF_LINK_UPDATE (29) reads the attribute (16 bytes).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 29, attr.as_mut_ptr(), 16) };
    let error = std::io::Error::last_os_error();
    // SAFETY: descriptors this function opened.
    unsafe {
        libc::close(link_fd);
        libc::close(program_fd);
    }
    assert_eq!(rc, 0, "BPF_LINK_UPDATE {}: {error}", link.display());
}

/// Waits until the interfaces `status` lists as external are exactly `want`.
fn wait_external_interfaces(tb: &Testbed, agent: &Agent, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    poll_until(
        &format!("external interfaces {want:?}"),
        Duration::from_secs(15),
        || {
            let now: BTreeSet<String> = tc_interfaces(&status(tb, agent))
                .into_iter()
                .filter(|(_, why)| why == "external")
                .map(|(i, _)| i)
                .collect();
            if now == want {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        },
    );
}

/// A node without a default route (as in this testbed) and without `--external-interfaces`
/// finds its external interface as the one holding its Node object's address (kube-proxy's
/// NodePorts answer on every node address, semantics 7.1).
#[test]
fn without_a_default_route_the_interface_of_the_node_address_is_external() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_shape(&[2], Shape::Ptp);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(0, 1, BACKEND_PORT);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    agent.extra_args.clear();
    agent.write_manifest(
        "node.yaml",
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {}}}\n  - {{type: InternalIP, address: \"{}\"}}\n",
            tb.nodes[0].ip4, tb.nodes[0].ip6
        ),
    );
    agent.start();
    NEAR.program(&agent, &tb, 0, 0);
    NEAR_LOCAL.program(&agent, &tb, 0, 1);
    wait_external_interfaces(&tb, &agent, &["eth0"]);
    check_from_outside(&tb, &NEAR, "a-pod-1");
    check_from_outside(&tb, &NEAR_LOCAL, "a-pod-2");
    agent.assert_running();
    tb.assert_no_checksum_errors();
}

/// Without `--external-interfaces`, the external interfaces are those of the default routes in
/// every routing table, followed as they come and go. On the AWS VPC CNI a node's secondary
/// network interface has its default route only in its own table, and the CNI attaches more
/// interfaces while the node runs; kube-proxy answers a NodePort on any node address, whichever
/// interface it arrives on (semantics 7.1, 7.2). A VPN's L3 device with a default route in its own
/// table is no external interface (the program reads Ethernet frames).
#[test]
fn external_interfaces_follow_the_default_routes_of_every_table() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_shape(&[2, 1], Shape::AwsVpc);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let node = &tb.nodes[0].ns;
    node.ip(&["tuntap", "add", "mode", "tun", "name", "vpn0"]);
    node.ip(&["link", "set", "vpn0", "up"]);
    node.ip(&["route", "add", "default", "dev", "vpn0", "table", "52"]);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    // The default: no --external-interfaces.
    agent.extra_args.clear();
    agent.start();
    NEAR.program(&agent, &tb, 0, 0);
    FAR.program(&agent, &tb, 1, 0);

    // eth0 (main table) and eth1 (table 2); not vpn0.
    wait_external_interfaces(&tb, &agent, &["eth0", "eth1"]);
    // XDP in front of the main table's default route only (a policy table's interface may
    // have no driver that runs XDP); tc serves eth1 alone.
    let s = status(&tb, &agent);
    assert!(hooks(&s).contains("xdp-eth0"), "{s}");
    assert!(!hooks(&s).contains("xdp-eth1"), "{s}");
    // A NodePort on eth1's address arrives on eth1 (ARP is answered only there): translated,
    // to the local backend and to the one on node-b, masqueraded.
    let eth1 = vpc_interface_ip4(0, 1);
    for (svc, backend) in [(&NEAR, "a-pod-1"), (&FAR, "b-pod-1")] {
        for (proto, port) in [
            (Proto::Tcp, svc.node_port_tcp),
            (Proto::Udp, svc.node_port_udp),
        ] {
            let to = SocketAddr::new(eth1.into(), port);
            wait_from_ext(&tb, proto, to, backend);
            for r in tb.request_ext(proto, to, 3) {
                assert!(r.ok && r.backend == backend, "{to} {proto:?}: {r:?}");
                let seen = seen_ip(&r.seen);
                assert!(
                    NODE_A.contains(&seen.to_string().as_str()) || seen == IpAddr::from(eth1),
                    "{to} {proto:?} not masqueraded: {r:?}"
                );
                assert_eq!(seen_ip(&r.peer), to.ip(), "{to} {proto:?}: {r:?}");
            }
        }
    }

    // The CNI attaches a third interface while the agent runs: tc follows, and its address
    // serves the NodePorts.
    let (eth2, eth2_ip) = tb.add_vpc_interface(0);
    wait_external_interfaces(&tb, &agent, &["eth0", "eth1", &eth2]);
    for (proto, port) in [
        (Proto::Tcp, NEAR.node_port_tcp),
        (Proto::Udp, NEAR.node_port_udp),
    ] {
        wait_from_ext(&tb, proto, SocketAddr::new(eth2_ip.into(), port), "a-pod-1");
    }
    assert_verified(&tb, &agent, NODE, "with an interface attached at run time");

    // Its default route goes for a while (a network restart): it stays external, seen over
    // more than one of the agent's 5 s rescans. Then the interface goes (detached from the
    // node): forgotten.
    tb.nodes[0]
        .ns
        .ip(&["route", "del", "default", "table", "3"]);
    std::thread::sleep(Duration::from_secs(6));
    wait_external_interfaces(&tb, &agent, &["eth0", "eth1", &eth2]);
    tb.nodes[0].ns.ip(&["link", "del", &eth2]);
    wait_forgotten(&tb, &agent, &eth2);
    wait_external_interfaces(&tb, &agent, &["eth0", "eth1"]);
    check_from_outside(&tb, &NEAR, "a-pod-1");
    assert_eq!(agent.count_logs(0, "ERROR"), 0);
    agent.assert_running();
    tb.assert_no_checksum_errors();
}

/// A node on a second network that has no default route (a storage or management network),
/// and no `--external-interfaces`: kube-proxy answers a NodePort on every node address,
/// whichever interface it arrives on (semantics 7.1), so the interface holding such an address
/// gets tc. The ptp pod veths, which all hold the pods' gateway as a host prefix, stay
/// pod-facing. Clients on the second network reach both Services' NodePorts on its address and
/// on eth0's (routed through node-a); Cluster masquerades (7.13), Local keeps the client (4.7c).
/// The interface stays external while its address is away for a moment, until it goes.
#[test]
fn a_second_network_without_a_default_route_serves_node_ports() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_shape(&[2], Shape::Ptp);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(0, 1, BACKEND_PORT);
    let node = &tb.nodes[0].ns;
    let net2 = tests::NetNs::new(format!("{}-net2", tb.id));
    node.ip(&[
        "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &net2.name,
    ]);
    for (ns, dev, last) in [(node, "eth1", "1"), (&net2, "eth0", "100")] {
        ns.exec("ethtool", &["-K", dev, "rx", "off", "tx", "off"]);
        ns.ip(&["addr", "add", &format!("192.168.78.{last}/24"), "dev", dev]);
        ns.ip(&[
            "addr",
            "add",
            &format!("fd00:78::{last}/64"),
            "dev",
            dev,
            "nodad",
        ]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    net2.ip(&["route", "add", "192.168.77.0/24", "via", "192.168.78.1"]);
    net2.ip(&["-6", "route", "add", "fd00:77::/64", "via", "fd00:78::1"]);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    // The default: no --external-interfaces; the Node object names no address either, and the
    // testbed's nodes have no default route: eth0 is external by its address too.
    agent.extra_args.clear();
    agent.start();
    NEAR.program(&agent, &tb, 0, 0);
    NEAR_LOCAL.program(&agent, &tb, 0, 1);
    wait_external_interfaces(&tb, &agent, &["eth0", "eth1"]);
    for (svc, backend) in [(&NEAR, "a-pod-1"), (&NEAR_LOCAL, "a-pod-2")] {
        for (proto, port) in [
            (Proto::Tcp, svc.node_port_tcp),
            (Proto::Udp, svc.node_port_udp),
        ] {
            for ip in ["192.168.78.1", "fd00:78::1", "192.168.77.1", "fd00:77::1"] {
                let to = SocketAddr::new(ip.parse().unwrap(), port);
                wait_from(&tb, &net2, proto, to, backend);
                for r in tb.request_from(&net2, false, proto, to, 3) {
                    assert!(r.ok && r.backend == backend, "{to} {proto:?}: {r:?}");
                    let seen = seen_ip(&r.seen).to_string();
                    if svc.local_policy {
                        let client = if to.is_ipv4() {
                            "192.168.78.100"
                        } else {
                            "fd00:78::100"
                        };
                        assert_eq!(seen, client, "{to} {proto:?}: {r:?}");
                    } else {
                        assert!(
                            NODE_A.contains(&seen.as_str()),
                            "{to} {proto:?} not masqueraded to node-a: {r:?}"
                        );
                    }
                    assert_eq!(seen_ip(&r.peer), to.ip(), "{to} {proto:?}: {r:?}");
                }
            }
        }
    }
    // The second network's addresses go for a while (a DHCP client, a network restart): eth1
    // stays external, seen over more than one of the agent's 5 s rescans. Then the interface
    // goes: forgotten, its links removed.
    node.ip(&["addr", "flush", "dev", "eth1"]);
    std::thread::sleep(Duration::from_secs(6));
    wait_external_interfaces(&tb, &agent, &["eth0", "eth1"]);
    node.ip(&["link", "del", "eth1"]);
    wait_forgotten(&tb, &agent, "eth1");
    wait_external_interfaces(&tb, &agent, &["eth0"]);
    check_from_outside(&tb, &NEAR, "a-pod-1");
    assert_eq!(agent.count_logs(0, "ERROR"), 0);
    agent.assert_running();
    tb.assert_no_checksum_errors();
}

/// A metric of `agent` (polled; the agent refreshes gauges as it attaches).
fn metric(agent: &Agent, name: &str) -> Option<f64> {
    let (_, body) = agent.get(agent.metrics_port, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn named_interfaces_appearing_later_and_patterns_are_followed() {
    // Bad input of --pod-interfaces: a name that does not exist yet (a warning once, shown as
    // missing, attached when it appears), a pattern matching nothing (no error), a pattern
    // matching interfaces created later.
    if !privileged() {
        return;
    }
    let tb = Testbed::with_shape(&[1], Shape::Ptp);
    let mut agent = node_agent(
        &tb,
        0,
        &tb.id,
        tb.cgroup_path(),
        &["--pod-interfaces", "auto,late0,lxc*,vethq*"],
    );
    let pos = agent.log_position();
    agent.start();
    agent.wait_for_log(pos, "synced", Duration::from_secs(20));
    poll_until("late0 shown missing", Duration::from_secs(10), || {
        let s = status(&tb, &agent);
        if s["interfacesMissing"] == serde_json::json!(["late0"]) {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let node = &tb.nodes[0].ns;
    node.ip(&[
        "link", "add", "late0", "type", "veth", "peer", "name", "late0p",
    ]);
    node.ip(&[
        "link", "add", "vethq1", "type", "veth", "peer", "name", "vethq1p",
    ]);
    for dev in ["late0", "late0p", "vethq1", "vethq1p"] {
        node.ip(&["link", "set", dev, "up"]);
    }
    poll_until("late0 and vethq1 attached", Duration::from_secs(10), || {
        let s = status(&tb, &agent);
        let tc = tc_interfaces(&s);
        let named = tc
            .iter()
            .any(|(i, why)| i == "late0" && why == "pod: named in --pod-interfaces");
        let pattern = tc
            .iter()
            .any(|(i, why)| i == "vethq1" && why == "pod: name matches pattern vethq*");
        let missing = s["interfacesMissing"]
            .as_array()
            .is_some_and(|m| m.is_empty());
        if named && pattern && missing {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    // eth0 is external; the two new ones are pod interfaces.
    poll_until(
        "pod interface gauge",
        Duration::from_secs(10),
        || match metric(&agent, "kube_bpf_proxy_pod_interfaces") {
            Some(v) if v >= 2.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(
        agent.count_logs(pos, "late0 (--pod-interfaces) does not exist yet"),
        1
    );
    let complaints: Vec<String> = agent
        .logs_since(pos)
        .into_iter()
        .filter(|l| l.contains("lxc") && (l.contains("WARN") || l.contains("ERROR")))
        .collect();
    assert!(
        complaints.is_empty(),
        "a pattern matching nothing is no error: {complaints:?}"
    );
    assert_eq!(agent.count_logs(pos, "ERROR"), 0);
    // Gone again: forgotten without an error.
    node.ip(&["link", "del", "vethq1"]);
    wait_forgotten(&tb, &agent, "vethq1");
    agent.assert_running();
}

#[test]
fn restart_keeps_pod_interface_links_and_connections() {
    // A restarted agent swaps its program into the links the previous one pinned on pod
    // veths, and keeps them before it has read the cluster: an external connection to a
    // local backend (translated at tc on eth0, its replies at tc on the pod's veth) survives.
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_shape(&[1], Shape::Ptp);
    tb.serve(0, 0, BACKEND_PORT);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    agent.start();
    NEAR.program(&agent, &tb, 0, 0);
    let to: SocketAddr = format!("192.168.77.1:{}", NEAR.node_port_tcp)
        .parse()
        .unwrap();
    wait_from_ext(&tb, Proto::Tcp, to, "a-pod-1");
    let veth = tb.nodes[0].pods[0].host_if.clone();
    let (mut held, first) = tb.hold_from(&tb.ext, false, to);
    assert!(first.ok && first.backend == "a-pod-1", "{first:?}");
    let link_before = link_id(&status(&tb, &agent), &veth).expect("pod veth listed");
    restart_holding(&mut agent, &mut held, "a-pod-1");
    let s = status(&tb, &agent);
    let link_after = link_id(&s, &veth);
    assert_eq!(
        link_after,
        Some(link_before),
        "link kept, program replaced: {s}"
    );
    assert!(
        tc_interfaces(&s)
            .iter()
            .any(|(i, why)| *i == veth && why.contains("route to endpoint")),
        "{s}"
    );
    tb.assert_no_checksum_errors();
}

#[test]
fn without_tc_on_its_interface_a_local_backend_waits_and_verify_says_why() {
    // The agent is told not to touch pod interfaces: the local backend is then never sent
    // traffic translated at tc (its replies could not be translated back), explain says so,
    // and verify (which looks for pod-facing interfaces itself) reports the missing program.
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_shape(&[1, 1], Shape::Ptp);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let mut agent = node_agent(
        &tb,
        0,
        &tb.id,
        tb.cgroup_path(),
        &["--pod-interfaces", "none"],
    );
    agent.start();
    // Two endpoints: a-pod-1 (local, its veth without tc) and b-pod-1 (remote).
    NEAR.program(&agent, &tb, 0, 0);
    let p = &tb.nodes[0].pods[0];
    let q = &tb.nodes[1].pods[0];
    for (family, a, b) in [
        ("IPv4", p.ip4.to_string(), q.ip4.to_string()),
        ("IPv6", p.ip6.to_string(), q.ip6.to_string()),
    ] {
        let eps = [
            Ep {
                addr: a,
                node: NODE,
                conditions: "",
            },
            Ep {
                addr: b,
                node: "node-b",
                conditions: "",
            },
        ];
        agent.write_manifest(
            &format!("near-{family}.yaml"),
            &slice_yaml(
                &format!("near-{family}"),
                "near",
                family,
                &[HTTP, DNS],
                &eps,
            ),
        );
    }
    let to: SocketAddr = format!("192.168.77.1:{}", NEAR.node_port_tcp)
        .parse()
        .unwrap();
    wait_from_ext(&tb, Proto::Tcp, to, "b-pod-1");
    for r in tb.request_ext(Proto::Tcp, to, 20) {
        assert!(
            r.ok && r.backend == "b-pod-1",
            "only the remote backend: {r:?}"
        );
    }
    let manifests = agent.manifests.display().to_string();
    let source = ["--manifests", &manifests, "--hostname-override", NODE];
    let out = cli_in_node(
        &tb,
        &agent,
        &[
            &["explain", "203.0.113.9", &format!("external {to}/TCP")][..],
            &source,
        ]
        .concat(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "explain: {text}{out:?}");
    assert!(
        text.contains("10.244.0.2:8080")
            && text.contains("local backend waiting for its interface"),
        "{text}"
    );
    let out = cli_in_node(&tb, &agent, &[&["verify"][..], &source].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "verify: {text}");
    assert!(
        text.contains(&format!(
            "{}: should carry the tc program (pod: route to endpoint 10.244.0.2)",
            p.host_if
        )),
        "{text}"
    );
    // The map part of verify agrees with the agent: only the interface is reported.
    assert!(!text.contains("DRIFT: 1 difference"), "{text}");
}

/// One address family, for the single-stack clusters below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stack {
    V4,
    V6,
}

impl Stack {
    fn name(self) -> &'static str {
        match self {
            Stack::V4 => "IPv4",
            Stack::V6 => "IPv6",
        }
    }

    fn is(self, addr: &SocketAddr) -> bool {
        addr.is_ipv4() == (self == Stack::V4)
    }
}

/// Health check node port of a `Svc` with externalTrafficPolicy Local in the single-stack test.
fn health_port(svc: &Svc) -> u16 {
    32000 + u16::from(svc.n)
}

impl Svc {
    /// The Service single-stack in `stack` (semantics 1.4, 10.3): ClusterIP, externalIP and load
    /// balancer IP of that family only; with Local, a health check node port.
    fn yaml_single(&self, stack: Stack) -> String {
        let n = self.n;
        let (cluster, external, lb) = match stack {
            Stack::V4 => (
                format!("10.96.0.{n}"),
                format!("10.96.100.{n}"),
                format!("10.96.200.{n}"),
            ),
            Stack::V6 => (
                format!("\"fd00:96::{n}\""),
                format!("\"fd00:96::1{n:02}\""),
                format!("\"fd00:96::2{n:02}\""),
            ),
        };
        let etp = if self.local_policy {
            format!(
                "  externalTrafficPolicy: Local\n  healthCheckNodePort: {}\n",
                health_port(self)
            )
        } else {
            String::new()
        };
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: {cluster}
  clusterIPs: [{cluster}]
  ipFamilies: [{family}]
  ipFamilyPolicy: SingleStack
  externalIPs: [{external}]
  ports:
  - {{name: http, port: 80, nodePort: {tcp}, protocol: TCP}}
  - {{name: dns, port: 53, nodePort: {udp}, protocol: UDP}}
{etp}status:
  loadBalancer: {{ingress: [{{ip: {lb}}}]}}
",
            name = self.name,
            family = stack.name(),
            tcp = self.node_port_tcp,
            udp = self.node_port_udp,
        )
    }

    /// `yaml_single` and one slice of `stack` with pod `pod` of node `node` as the endpoint.
    fn program_single(&self, agent: &Agent, tb: &Testbed, stack: Stack, node: usize, pod: usize) {
        agent.write_manifest(&format!("{}.yaml", self.name), &self.yaml_single(stack));
        let p = &tb.nodes[node].pods[pod];
        let addr = match stack {
            Stack::V4 => p.ip4.to_string(),
            Stack::V6 => p.ip6.to_string(),
        };
        let eps = [Ep {
            addr,
            node: if node == 0 { NODE } else { "node-b" },
            conditions: "",
        }];
        let name = format!("{}-{}", self.name, stack.name());
        agent.write_manifest(
            &format!("{name}.yaml"),
            &slice_yaml(&name, self.name, stack.name(), &[HTTP, DNS], &eps),
        );
    }

    fn cluster_ip(&self, stack: Stack, proto: Proto) -> SocketAddr {
        let port = if proto == Proto::Tcp { 80 } else { 53 };
        match stack {
            Stack::V4 => format!("10.96.0.{}:{port}", self.n),
            Stack::V6 => format!("[fd00:96::{}]:{port}", self.n),
        }
        .parse()
        .unwrap()
    }
}

/// Makes every namespace of the testbed single-stack, as a node of a single-stack cluster is:
/// IPv4 only by `disable_ipv6` (every IPv6 address goes, new interfaces get none), IPv6 only
/// by removing every IPv4 address but the loopback's (the routes through them go with them).
fn make_single_stack(tb: &Testbed, stack: Stack) {
    for ns in tb.namespaces() {
        match stack {
            Stack::V4 => {
                ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
                ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
            }
            Stack::V6 => {
                ns.ip(&["-4", "addr", "flush", "scope", "global"]);
            }
        }
        let other = ns.ip(&[
            match stack {
                Stack::V4 => "-6",
                Stack::V6 => "-4",
            },
            "addr",
            "show",
            "scope",
            "global",
        ]);
        assert!(
            other.trim().is_empty(),
            "{}: addresses of the other family left: {other}",
            ns.name
        );
    }
}

/// A single-stack cluster (most clusters are IPv4 only; some IPv6 only): the nodes, pods and
/// the external client have addresses of one family; the Services and slices are of that
/// family; node-a's agent runs with no interface named (its external interface is found by its
/// Node object's address of that family). Everything the dual-stack tests check of that family
/// works: NodePort, externalIP and load balancer IP from outside, TCP and UDP, Cluster
/// (masqueraded, semantics 7.13) and Local (client kept, 4.7c) to node-a's pods, Cluster to
/// node-b's pod; hairpin from node-a's pods (7.14); ClusterIP from a pod in the hooked cgroup;
/// the health check node port of the Local Service (8.1) over that family; `verify` clean and
/// no ERROR in the agent's log.
fn single_stack(stack: Stack, shape: Shape) {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::with_shape(&[2, 1], shape);
    make_single_stack(&tb, stack);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(0, 1, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    agent.extra_args.clear();
    let node_ip = match stack {
        Stack::V4 => IpAddr::from(tb.nodes[0].ip4),
        Stack::V6 => IpAddr::from(tb.nodes[0].ip6),
    };
    agent.write_manifest(
        "node.yaml",
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: \"{node_ip}\"}}\n"
        ),
    );
    agent.start();
    NEAR.program_single(&agent, &tb, stack, 0, 0);
    NEAR_LOCAL.program_single(&agent, &tb, stack, 0, 1);
    FAR.program_single(&agent, &tb, stack, 1, 0);
    wait_external_interfaces(&tb, &agent, &["eth0"]);

    for (svc, backend) in [
        (&NEAR, "a-pod-1"),
        (&NEAR_LOCAL, "a-pod-2"),
        (&FAR, "b-pod-1"),
    ] {
        for proto in [Proto::Tcp, Proto::Udp] {
            for to in svc.frontends(proto).into_iter().filter(|a| stack.is(a)) {
                wait_from_ext(&tb, proto, to, backend);
                for r in tb.request_ext(proto, to, 3) {
                    assert!(r.ok && r.backend == backend, "{to} {proto:?}: {r:?}");
                    let seen = seen_ip(&r.seen);
                    if svc.local_policy {
                        let client: IpAddr = match stack {
                            Stack::V4 => EXT_IP4.into(),
                            Stack::V6 => EXT_IP6.into(),
                        };
                        assert_eq!(seen, client, "{to} {proto:?}: {r:?}");
                    } else {
                        assert!(
                            NODE_A.contains(&seen.to_string().as_str()),
                            "{to} {proto:?} not masqueraded to node-a: {r:?}"
                        );
                    }
                    assert_eq!(seen_ip(&r.peer), to.ip(), "{to} {proto:?}: {r:?}");
                }
            }
            // The ClusterIP from a pod of node-a inside the hooked cgroup (socket layer);
            // node-b's pod through the pod network. The pod keeps its address (7.12), except
            // where it reaches itself (a-pod-2 through `NEAR_LOCAL`): masqueraded (7.14).
            let pod = &tb.nodes[0].pods[1];
            let to = svc.cluster_ip(stack, proto);
            let own: IpAddr = match stack {
                Stack::V4 => pod.ip4.into(),
                Stack::V6 => pod.ip6.into(),
            };
            let expected = |r: &tests::Reply| {
                r.ok && r.backend == backend
                    && seen_ip(&r.peer) == to.ip()
                    && if backend == pod.name {
                        NODE_A.contains(&seen_ip(&r.seen).to_string().as_str())
                    } else {
                        seen_ip(&r.seen) == own
                    }
            };
            answered_as(&tb, pod, proto, to, expected);
        }
    }

    // Hairpin: node-a's pods, outside the hooked cgroup, to node-a's NodePort.
    check_hairpin(&tb, SocketAddr::new(node_ip, NEAR.node_port_tcp));

    // The Local Service's health check node port answers a load balancer of this family with
    // its one local endpoint (semantics 8.1).
    let hc = SocketAddr::new(node_ip, health_port(&NEAR_LOCAL));
    let ext = tb.ext.path();
    poll_until(
        &format!("health check {hc}"),
        Duration::from_secs(10),
        || match tests::harness::agent::try_http_get_in(Some(&ext), hc, "/") {
            Ok(r)
                if r.status == 200
                    && serde_json::from_str::<serde_json::Value>(&r.body)
                        .is_ok_and(|v| v["localEndpoints"] == 1) =>
            {
                Ok(())
            }
            Ok(r) => Err(format!("{r:?}")),
            Err(e) => Err(e.to_string()),
        },
    );

    assert_verified(&tb, &agent, NODE, "single-stack");
    assert_eq!(agent.count_logs(0, "ERROR"), 0, "{:?}", agent.logs_since(0));
    agent.assert_running();
    tb.assert_no_checksum_errors();
}

#[test]
fn single_stack_ipv4_cluster_on_a_bridge() {
    single_stack(Stack::V4, Shape::Bridge);
}

#[test]
fn single_stack_ipv6_cluster_on_ptp() {
    single_stack(Stack::V6, Shape::Ptp);
}
