//! Traffic from outside the node (tc): an external client reaches NodePort, externalIP and load
//! balancer frontends on node-a of a two-node testbed; backends run on node-a (local) and
//! node-b (remote). Checksum offload is off on every veth, so a wrong checksum would be dropped
//! and counted; every test ends by checking that no namespace counted one.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use common::*;
use tests::{
    Agent, Reply, Testbed,
    harness::topology::{Proto, UdpStream, udp_sized, udp_with_ttl},
    poll_until,
};

const NODE_PORT_HTTP: u16 = 30080;
const NODE_PORT_DNS: u16 = 30053;
const EXTERNAL_IP4: &str = "10.96.100.1";
const EXTERNAL_IP6: &str = "fd00:96::101";
const LB_IP4: &str = "10.96.200.1";
const LB_IP6: &str = "fd00:96::201";
/// node-a's addresses: on the LAN, and on its pod bridge.
const NODE_A: [&str; 4] = ["192.168.77.1", "fd00:77::1", "10.244.0.1", "fd00:244::1"];

/// A testbed with 2 pods on node-a and 1 on node-b, echo servers everywhere, and the agent on
/// node-a with tc on its LAN and bridge interfaces.
fn setup() -> (Testbed, Agent) {
    let mut tb = Testbed::new(&[2, 1]);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(0, 1, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    agent.start();
    (tb, agent)
}

/// Service `web`: LoadBalancer with NodePorts, externalIPs and LB IPs in both families;
/// `extra` is appended to its spec.
fn web_yaml(extra: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, \"fd00:96::10\"]
  ipFamilies: [IPv4, IPv6]
  externalIPs: [{EXTERNAL_IP4}, \"{EXTERNAL_IP6}\"]
  ports:
  - {{name: http, port: 80, nodePort: {NODE_PORT_HTTP}, protocol: TCP}}
  - {{name: dns, port: 53, nodePort: {NODE_PORT_DNS}, protocol: UDP}}
{extra}status:
  loadBalancer: {{ingress: [{{ip: {LB_IP4}}}, {{ip: \"{LB_IP6}\"}}]}}
"
    )
}

/// Slices of `web` in both families over the pods `pods` ((node, pod) pairs).
fn web_endpoints(agent: &Agent, tb: &Testbed, pods: &[(usize, usize)]) {
    let pods: Vec<_> = pods.iter().map(|&(n, p)| (n, p, "")).collect();
    web_endpoints_with(agent, tb, &pods);
}

/// `web_endpoints` with each endpoint's conditions (a flow mapping's entries, "" for ready).
fn web_endpoints_with(agent: &Agent, tb: &Testbed, pods: &[(usize, usize, &str)]) {
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let eps: Vec<Ep> = pods
            .iter()
            .map(|&(n, p, conditions)| {
                let pod = &tb.nodes[n].pods[p];
                let addr = if v6 {
                    pod.ip6.to_string()
                } else {
                    pod.ip4.to_string()
                };
                Ep {
                    addr,
                    node: if n == 0 { NODE } else { "node-b" },
                    conditions,
                }
            })
            .collect();
        agent.write_manifest(
            &format!("web-{family}.yaml"),
            &slice_yaml(&format!("web-{family}"), "web", family, &[HTTP, DNS], &eps),
        );
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Every external frontend of `web` for TCP (`http`) or UDP (`dns`).
fn frontends(udp: bool) -> Vec<SocketAddr> {
    let (node_port, port) = if udp {
        (NODE_PORT_DNS, 53)
    } else {
        (NODE_PORT_HTTP, 80)
    };
    vec![
        addr("192.168.77.1", node_port),
        addr("fd00:77::1", node_port),
        addr(EXTERNAL_IP4, port),
        addr(EXTERNAL_IP6, port),
        addr(LB_IP4, port),
        addr(LB_IP6, port),
    ]
}

/// The address of a reply's `peer` or `seen` (`address:port`), if it parses.
fn seen_ip_of(s: &str) -> Option<IpAddr> {
    s.parse::<SocketAddr>().ok().map(|a| a.ip())
}

fn seen_ip(r: &Reply) -> IpAddr {
    r.seen
        .parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("seen {:?}: {e}", r.seen))
        .ip()
}

#[test]
fn external_clients_reach_every_frontend_with_cluster_policy() {
    // semantics 4.1, 4.6, 7.5-7.7, 7.13: NodePorts on node addresses, externalIPs and LB IPs
    // are served over TCP and UDP in both families; externalTrafficPolicy Cluster spreads
    // over local and remote endpoints and masquerades the client to a node-a address.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0), (0, 1), (1, 0)]);
    let all: BTreeSet<String> = ["a-pod-1", "a-pod-2", "b-pod-1"].map(String::from).into();
    for udp in [false, true] {
        let proto = if udp { Proto::Udp } else { Proto::Tcp };
        for to in frontends(udp) {
            wait_answered(&tb, proto, to);
            let replies = tb.request_ext(proto, to, 45);
            let mut backends = BTreeSet::new();
            for r in &replies {
                assert!(r.ok, "{to}: {r:?}");
                // The answer comes from the frontend address the client used.
                assert_eq!(r.peer.parse::<SocketAddr>().unwrap(), to, "{r:?}");
                // Masqueraded to a node-a address, whichever node the backend is on.
                let seen = seen_ip(r);
                assert!(NODE_A.contains(&seen.to_string().as_str()), "{to}: {r:?}");
                backends.insert(r.backend.clone());
            }
            // 45 random picks over 3 backends miss one with probability 3 * (2/3)^45 < 4e-8,
            // under 5e-7 for the 12 frontends of a run (30 picks: 2e-5 each, 2e-4 a run).
            assert_eq!(backends, all, "{to}\n{}", datapath_counters(&agent));
        }
    }
    assert!(datapath_events(&agent, "nat_new") > 0);
    // The flows to node-b's backend were forwarded at XDP (generic mode on veth).
    assert!(datapath_events(&agent, "xdp_forwarded") > 0);
    tb.assert_no_checksum_errors();
}

#[test]
fn local_policy_keeps_the_client_address_and_drops_without_local_endpoints() {
    // semantics 4.7c, 7.13: only node-a's endpoints, client address preserved; 3.9: with
    // endpoints only elsewhere the packets are dropped, not rejected.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml("  externalTrafficPolicy: Local\n"));
    web_endpoints(&agent, &tb, &[(0, 0), (0, 1), (1, 0)]);
    let local: BTreeSet<String> = ["a-pod-1", "a-pod-2"].map(String::from).into();
    for udp in [false, true] {
        let proto = if udp { Proto::Udp } else { Proto::Tcp };
        for to in frontends(udp) {
            wait_answered(&tb, proto, to);
            let replies = tb.request_ext(proto, to, 20);
            for r in &replies {
                assert!(r.ok, "{to}: {r:?}");
                assert!(local.contains(&r.backend), "{to}: {r:?}");
                let client = if to.is_ipv4() {
                    "192.168.77.100"
                } else {
                    "fd00:77::100"
                };
                assert_eq!(seen_ip(r).to_string(), client, "{to}: {r:?}");
            }
        }
    }
    // Only the remote endpoint left: dropped (the client times out), never refused.
    web_endpoints(&agent, &tb, &[(1, 0)]);
    let to = addr("192.168.77.1", NODE_PORT_HTTP);
    poll_until("NodePort dropped", Duration::from_secs(10), || {
        let r = tb.request_ext(Proto::Tcp, to, 1);
        if r.iter().all(|r| !r.ok) {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    let r = tb.request_ext(Proto::Tcp, to, 1);
    assert_ne!(r[0].errno, Some(111), "dropped, not rejected: {r:?}");
    assert!(datapath_events(&agent, "no_local_backends") > 0);
    tb.assert_no_checksum_errors();
}

#[test]
fn no_backends_gets_port_unreachable() {
    // semantics 3.7: TCP and UDP get an ICMP port unreachable (kube-proxy's REJECT), from
    // every frontend in both families; the client sees ECONNREFUSED at once.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0)]);
    wait_answered(&tb, Proto::Tcp, addr(EXTERNAL_IP4, 80));
    web_endpoints(&agent, &tb, &[]);
    for (proto, udp) in [(Proto::Tcp, false), (Proto::UdpConnected, true)] {
        for to in frontends(udp) {
            poll_until(&format!("{to} refused"), Duration::from_secs(10), || {
                let r = tb.request_ext(proto, to, 1);
                if r[0].errno == Some(111) {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            });
        }
    }
    datapath_events_reach(&agent, "rejected", 12);
    tb.assert_no_checksum_errors();
}

#[test]
fn source_ranges_filter_load_balancer_ips_only() {
    // semantics 7.8: outside loadBalancerSourceRanges the LB IP drops; 7.5, 7.6: NodePorts
    // and externalIPs are not filtered.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    let ranges = |r: &str| format!("  loadBalancerSourceRanges: [{r}]\n");
    agent.write_manifest(
        "web.yaml",
        &web_yaml(&ranges("192.168.77.0/30, \"fd00:77::/126\"")),
    );
    web_endpoints(&agent, &tb, &[(0, 0)]);
    for to in [addr(EXTERNAL_IP4, 80), addr(EXTERNAL_IP6, 80)] {
        wait_answered(&tb, Proto::Tcp, to);
    }
    for to in [
        addr("192.168.77.1", NODE_PORT_HTTP),
        addr("fd00:77::1", NODE_PORT_HTTP),
    ] {
        wait_answered(&tb, Proto::Tcp, to);
    }
    for to in [addr(LB_IP4, 80), addr(LB_IP6, 80)] {
        let r = tb.request_ext(Proto::Tcp, to, 1);
        assert!(!r[0].ok && r[0].errno != Some(111), "{to}: dropped: {r:?}");
    }
    assert!(datapath_events(&agent, "source_range_drop") > 0);
    // The client's own address allowed: the LB IPs answer.
    agent.write_manifest(
        "web.yaml",
        &web_yaml(&ranges("192.168.77.100/32, \"fd00:77::100/128\"")),
    );
    for to in [addr(LB_IP4, 80), addr(LB_IP6, 80)] {
        wait_answered(&tb, Proto::Tcp, to);
    }
    tb.assert_no_checksum_errors();
}

#[test]
fn long_lived_connections_keep_their_backend_when_backends_change() {
    // semantics 3.10, 9.3: established flows keep their backend through changes, even its
    // removal from the Service (kube-proxy leaves conntrack entries of TCP alone).
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0), (1, 0)]);
    let to = addr("192.168.77.1", NODE_PORT_HTTP);
    wait_answered(&tb, Proto::Tcp, to);
    let (mut held, first) = tb.hold_from(&tb.ext, false, to);
    assert!(first.ok, "{first:?}");
    let mine = first.backend.clone();
    let other = if mine == "a-pod-1" { (1, 0) } else { (0, 0) };
    let other_name = if mine == "a-pod-1" {
        "b-pod-1"
    } else {
        "a-pod-1"
    };
    // Its backend leaves the Service, a new one (a-pod-2) joins.
    web_endpoints(&agent, &tb, &[other, (0, 1)]);
    let want: BTreeSet<String> = [other_name, "a-pod-2"].map(String::from).into();
    poll_until(
        "new connections avoid the removed backend",
        Duration::from_secs(10),
        || {
            let seen: BTreeSet<String> = tb
                .request_ext(Proto::Tcp, to, 20)
                .into_iter()
                .filter(|r| r.ok)
                .map(|r| r.backend)
                .collect();
            if seen == want {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    );
    for _ in 0..3 {
        let r = held.again();
        assert!(r.ok, "{r:?}");
        assert_eq!(r.backend, mine, "the held connection moved");
    }
    tb.assert_no_checksum_errors();
}

#[test]
fn hairpin_a_pod_reaching_itself_through_an_external_ip() {
    // semantics 7.14: a pod (outside the hooked cgroup, so tc handles it) that lands on itself
    // through the Service is masqueraded, so the reply comes back through the node.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml("  externalTrafficPolicy: Local\n"));
    web_endpoints(&agent, &tb, &[(0, 0)]);
    let pod = &tb.nodes[0].pods[0];
    for to in [addr(EXTERNAL_IP4, 80), addr(EXTERNAL_IP6, 80)] {
        poll_until(
            &format!("{to} from the pod"),
            Duration::from_secs(10),
            || {
                let r = tb.request_from(&pod.ns, false, Proto::Tcp, to, 1);
                if r[0].ok {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        );
        for r in tb.request_from(&pod.ns, false, Proto::Tcp, to, 5) {
            assert!(r.ok, "{r:?}");
            assert_eq!(r.backend, "a-pod-1");
            let seen = seen_ip(&r).to_string();
            assert!(NODE_A.contains(&seen.as_str()), "not masqueraded: {r:?}");
        }
    }
    tb.assert_no_checksum_errors();
}

/// a-pod-1 (node-a's first pod, in the hooked cgroup) reaching `to`, whose backends are itself,
/// a-pod-2 and b-pod-1: each connection is answered with `to` as the peer, masqueraded to a
/// node-a address when it lands on the pod itself (semantics 7.14), else from the pod's own
/// address (7.12, 7.13); all three backends answer, TCP as often as each other (4.11; 150
/// connections, 50 each, standard deviation 5.8: a pod that drew itself twice, at the socket
/// layer and again at tc, would get 1/9 of them). Polled first: until the pod's interface
/// carries tc and the pod is marked (within seconds) its connections to itself are translated
/// at the socket layer, unmasqueraded; one may come back masqueraded before (a connection the
/// socket layer could not translate while the maps were written, translated by tc), so the
/// condition is a batch answered all right, the pod among the backends.
fn check_self_masqueraded_among_three(tb: &Testbed, proto: Proto, to: SocketAddr) {
    let pod = &tb.nodes[0].pods[0];
    let own: IpAddr = if to.is_ipv4() {
        pod.ip4.into()
    } else {
        pod.ip6.into()
    };
    let right = |r: &Reply| {
        r.ok && seen_ip_of(&r.peer) == Some(to.ip())
            && if r.backend == pod.name {
                NODE_A.contains(&seen_ip(r).to_string().as_str())
            } else {
                seen_ip(r) == own
            }
    };
    poll_until(
        &format!("{to} {proto:?} from {} to itself, masqueraded", pod.name),
        Duration::from_secs(15),
        || {
            let rs = tb.request_from(&pod.ns, true, proto, to, 9);
            if rs.iter().all(right) && rs.iter().any(|r| r.backend == pod.name) {
                Ok(())
            } else {
                Err(format!("{rs:?}"))
            }
        },
    );
    let count = if proto == Proto::Tcp { 150 } else { 30 };
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for r in tb.request_from(&pod.ns, true, proto, to, count) {
        assert!(right(&r), "{to} {proto:?}: {r:?}");
        *answered.entry(r.backend).or_default() += 1;
    }
    assert_eq!(answered.len(), 3, "{to} {proto:?}: {answered:?}");
    if proto == Proto::Tcp {
        for (backend, n) in &answered {
            assert!((28..=72).contains(n), "{to}: {backend} {n} of {answered:?}");
        }
    }
}

#[test]
fn a_pod_reaching_itself_through_its_cluster_ip_is_masqueraded_and_chosen_as_often_as_any() {
    // semantics 7.14: a pod whose connection to a ClusterIP lands on itself is masqueraded, so
    // the reply comes back through the node; its connections to other backends keep its
    // address (7.12); every backend is as likely as the others (4.11). A pod in the hooked
    // cgroup is translated at the socket layer, which cannot masquerade: a connection it sends
    // to the pod itself is left to tc on the pod's interface with that choice.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0), (0, 1), (1, 0)]);
    let pod = &tb.nodes[0].pods[0];
    for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
        for to in [addr("10.96.0.10", port), addr("fd00:96::10", port)] {
            check_self_masqueraded_among_three(&tb, proto, to);
        }
    }
    // An IPv6 socket reaching the IPv4 ClusterIP through its IPv4-mapped address: the same.
    let mapped: SocketAddr = "[::ffff:10.96.0.10]:80".parse().unwrap();
    let own = IpAddr::from(pod.ip4);
    let right = |r: &Reply| {
        r.ok && r.peer == "10.96.0.10:80"
            && if r.backend == pod.name {
                NODE_A.contains(&seen_ip(r).to_string().as_str())
            } else {
                seen_ip(r) == own
            }
    };
    let mut answered = BTreeSet::new();
    for r in tb.request_from(&pod.ns, true, Proto::Tcp, mapped, 30) {
        assert!(right(&r), "{mapped}: {r:?}");
        answered.insert(r.backend);
    }
    assert_eq!(answered.len(), 3, "{mapped}: {answered:?}");
    assert!(datapath_events(&agent, "per_packet") > 0);
    tb.assert_no_checksum_errors();
}

#[test]
fn a_pod_reaching_itself_through_a_local_policy_external_address_is_masqueraded() {
    // semantics 4.7a: a pod reaching an externalTrafficPolicy Local NodePort, externalIP or LB
    // IP is short-circuited to the cluster set (b-pod-1 on node-b too), unmasqueraded (7.13);
    // 7.14: when it lands on itself it is masqueraded, so the reply comes back through the node;
    // 4.11: every backend as likely as the others. The pod is in the hooked cgroup: the socket
    // layer, which cannot masquerade, leaves a connection to itself to tc on its interface
    // with its choice.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml("  externalTrafficPolicy: Local\n"));
    web_endpoints(&agent, &tb, &[(0, 0), (0, 1), (1, 0)]);
    // All three answer: the cluster set, node-b's backend included (4.7a), not the local one
    // (which a draw at tc from the external frontend would give).
    for (proto, udp) in [(Proto::Tcp, false), (Proto::Udp, true)] {
        for to in frontends(udp) {
            check_self_masqueraded_among_three(&tb, proto, to);
        }
    }
    assert!(datapath_events(&agent, "per_packet") > 0);
    tb.assert_no_checksum_errors();
}

#[test]
fn pods_reaching_their_nodes_external_frontends_are_masqueraded_with_cluster_policy() {
    // semantics 7.13: kube-proxy masquerades every connection to a NodePort, externalIP or LB
    // IP with externalTrafficPolicy Cluster, a pod's too (4.7 a/b: over the cluster set). A pod
    // in the hooked cgroup (no Pod object: the agent finds it by its network namespace) is left
    // to tc on its interface, which masquerades; the backend, here or on node-b, sees a node-a
    // address and the pod its frontend as the peer. With Local (4.7a) the pod is short-circuited
    // to the cluster set at the socket layer and keeps its own address (7.13).
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 1), (1, 0)]);
    let pod = &tb.nodes[0].pods[0];
    let backends: BTreeSet<String> = ["a-pod-2", "b-pod-1"].map(String::from).into();
    for (proto, udp) in [(Proto::Tcp, false), (Proto::Udp, true)] {
        for to in frontends(udp) {
            // The pod is marked once its interface carries tc (within seconds).
            poll_until(
                &format!("{to} from the pod masqueraded"),
                Duration::from_secs(15),
                || {
                    let r = tb.request_from(&pod.ns, true, proto, to, 1);
                    if r[0].ok && NODE_A.contains(&seen_ip(&r[0]).to_string().as_str()) {
                        Ok(())
                    } else {
                        Err(format!("{r:?}"))
                    }
                },
            );
            let replies = tb.request_from(&pod.ns, true, proto, to, 20);
            let mut seen = BTreeSet::new();
            for r in &replies {
                assert!(r.ok, "{proto:?} {to}: {r:?}");
                let ip = seen_ip(r).to_string();
                assert!(NODE_A.contains(&ip.as_str()), "{to} not masqueraded: {r:?}");
                assert_eq!(r.peer, to.to_string(), "{r:?}");
                seen.insert(r.backend.clone());
            }
            // Random over two backends: one missing from 20 has probability 2^-19.
            assert_eq!(seen, backends, "{proto:?} {to}: {replies:?}");
        }
    }
    // Every connect was left to tc: as a pod marked for tc (`per_packet`), or, before the agent
    // has learnt the pod's network namespace, as a source not known yet (`source_unknown`,
    // which tc on the pod's interface serves the same way). The agent samples the counters
    // every few seconds: polled.
    assert!(datapath_events(&agent, "per_packet") > 0);
    poll_until(
        "every connect of the pod counted as left to tc",
        Duration::from_secs(30),
        || {
            let (marked, unknown) = (
                datapath_count(&agent, "per_packet"),
                datapath_count(&agent, "source_unknown"),
            );
            if marked + unknown >= 240 {
                Ok(())
            } else {
                Err(format!("per_packet {marked}, source_unknown {unknown}"))
            }
        },
    );
    let (_, metrics) = agent.get(agent.metrics_port, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kube_bpf_proxy_pod_namespaces_at_tc ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // explain says so for the pod's address, not for the node's own.
    let explain = |client: &str| -> serde_json::Value {
        let to = format!("192.168.77.1:{NODE_PORT_HTTP}/TCP");
        let out = cli_in_node(&tb, &agent, &["explain", client, &to, "-o", "json"]);
        assert!(out.status.success(), "explain: {out:?}");
        serde_json::from_slice(&out.stdout).expect("explain JSON")
    };
    let from_pod = explain(&pod.ip4.to_string());
    assert_eq!(from_pod["masqueradedAtTc"], true, "{from_pod}");
    let from_node = explain("192.168.77.1");
    assert!(from_node.get("masqueradedAtTc").is_none(), "{from_node}");
    // An address no pod of node-a has: no namespace marked for tc, so not masqueraded.
    let from_nobody = explain("198.51.100.7");
    assert!(
        from_nobody.get("masqueradedAtTc").is_none(),
        "{from_nobody}"
    );

    agent.write_manifest("web.yaml", &web_yaml("  externalTrafficPolicy: Local\n"));
    for (proto, udp) in [(Proto::Tcp, false), (Proto::Udp, true)] {
        for to in frontends(udp) {
            let own = if to.is_ipv4() {
                pod.ip4.to_string()
            } else {
                pod.ip6.to_string()
            };
            poll_until(
                &format!("{to} from the pod keeps its address"),
                Duration::from_secs(15),
                || {
                    let r = tb.request_from(&pod.ns, true, proto, to, 1);
                    if r[0].ok && seen_ip(&r[0]).to_string() == own {
                        Ok(())
                    } else {
                        Err(format!("{r:?}"))
                    }
                },
            );
            let replies = tb.request_from(&pod.ns, true, proto, to, 20);
            let mut seen = BTreeSet::new();
            for r in &replies {
                assert!(r.ok, "{proto:?} {to}: {r:?}");
                assert_eq!(seen_ip(r).to_string(), own, "{to}: {r:?}");
                assert_eq!(r.peer, to.to_string(), "{r:?}");
                seen.insert(r.backend.clone());
            }
            // The cluster set, the remote backend included (4.7a).
            assert_eq!(seen, backends, "{proto:?} {to}: {replies:?}");
        }
    }
    let from_pod = explain(&pod.ip4.to_string());
    assert!(from_pod.get("masqueradedAtTc").is_none(), "{from_pod}");
    tb.assert_no_checksum_errors();
}

#[test]
fn host_network_backends_of_this_node_answer_from_outside() {
    // A backend on node-a's own address (a host-network pod: an ingress controller, or the
    // apiserver behind default/kubernetes, semantics 12.3) behind NodePorts, externalIPs and LB
    // IPs: tc hands the flows to node-a's stack with only the destination translated (kube-
    // proxy's masquerading applies to packets leaving the node; these never do), and
    // translates node-a's replies back at egress: the client sees the frontend answer, the
    // backend sees the client. Cluster and Local alike, TCP and UDP, both families. node-a's
    // pods are answered too: with policy Cluster through tc on their interface, unmasqueraded
    // to node-a's address (below).
    if !privileged() {
        return;
    }
    let (mut tb, agent) = setup();
    tb.serve_on_node(0, BACKEND_PORT);
    for (family, ip) in [("IPv4", "192.168.77.1"), ("IPv6", "fd00:77::1")] {
        let eps = [Ep {
            addr: ip.to_string(),
            node: NODE,
            conditions: "",
        }];
        agent.write_manifest(
            &format!("web-{family}.yaml"),
            &slice_yaml(&format!("web-{family}"), "web", family, &[HTTP, DNS], &eps),
        );
    }
    for policy in ["", "  externalTrafficPolicy: Local\n"] {
        agent.write_manifest("web.yaml", &web_yaml(policy));
        for (proto, udp) in [(Proto::Tcp, false), (Proto::Udp, true)] {
            for to in frontends(udp) {
                let client = if to.is_ipv4() {
                    "192.168.77.100"
                } else {
                    "fd00:77::100"
                };
                wait_answered(&tb, proto, to);
                for r in tb.request_ext(proto, to, 5) {
                    assert!(r.ok, "{policy:?} {proto:?} {to}: {r:?}");
                    assert_eq!(r.backend, "node-a", "{r:?}");
                    assert_eq!(seen_ip(&r).to_string(), client, "{to}: {r:?}");
                    assert_eq!(r.peer, to.to_string(), "{to}: {r:?}");
                }
                // (TCP only: the echo server answers UDP from the address the node routes
                // the pod through, its bridge address, not the backend address the socket
                // layer sent to; a UDP server on several addresses must answer from the one
                // asked, IP_PKTINFO, under kube-proxy too.)
                if udp {
                    continue;
                }
                let pod = &tb.nodes[0].pods[0];
                for r in tb.request_from(&pod.ns, true, proto, to, 3) {
                    assert!(r.ok, "from {}: {policy:?} {proto:?} {to}: {r:?}", pod.name);
                    assert_eq!(r.backend, "node-a", "{r:?}");
                    assert_eq!(r.peer, to.to_string(), "{to}: {r:?}");
                }
            }
        }
    }
    // A connection held open across more packets keeps working through the node's stack.
    let to = addr("192.168.77.1", NODE_PORT_HTTP);
    let (mut held, first) = tb.hold_from(&tb.ext, false, to);
    assert!(first.ok && first.backend == "node-a", "{first:?}");
    for _ in 0..3 {
        let r = held.again();
        assert!(r.ok && r.backend == "node-a", "{r:?}");
    }
    // The pod itself and node-b's pod beside node-a's address, policy Cluster (semantics
    // 7.13, 7.14): the pod's connections are left to tc on its interface, which masquerades
    // those to the other pods (the pod itself included, so its reply comes back through the
    // node) and hands those to node-a's address to the stack unmasqueraded, as kube-proxy's
    // masquerading applies only to packets leaving the node: node-a sees the pod.
    agent.write_manifest("web.yaml", &web_yaml(""));
    let pod = &tb.nodes[0].pods[0];
    let far = &tb.nodes[1].pods[0];
    let eps = [
        Ep {
            addr: "192.168.77.1".to_string(),
            node: NODE,
            conditions: "",
        },
        Ep {
            addr: pod.ip4.to_string(),
            node: NODE,
            conditions: "",
        },
        Ep {
            addr: far.ip4.to_string(),
            node: "node-b",
            conditions: "",
        },
    ];
    agent.write_manifest(
        "web-IPv4.yaml",
        &slice_yaml("web-IPv4", "web", "IPv4", &[HTTP, DNS], &eps),
    );
    let own = IpAddr::from(pod.ip4);
    let masqueraded = |r: &Reply| NODE_A.contains(&seen_ip(r).to_string().as_str());
    for to in [
        addr(EXTERNAL_IP4, 80),
        addr(LB_IP4, 80),
        addr("192.168.77.1", NODE_PORT_HTTP),
    ] {
        let right = |r: &Reply| {
            r.ok && r.peer == to.to_string()
                && if r.backend == "node-a" {
                    seen_ip(r) == own
                } else {
                    (r.backend == pod.name || r.backend == far.name) && masqueraded(r)
                }
        };
        // Until the agent has the new endpoints and has marked the pod for tc.
        poll_until(
            &format!("{to} from {} reaches all three backends", pod.name),
            Duration::from_secs(15),
            || {
                let rs = tb.request_from(&pod.ns, true, Proto::Tcp, to, 15);
                let all = [pod.name.as_str(), far.name.as_str(), "node-a"]
                    .iter()
                    .all(|b| rs.iter().any(|r| r.backend == *b));
                if rs.iter().all(right) && all {
                    Ok(())
                } else {
                    Err(format!("{rs:?}"))
                }
            },
        );
        let mut answered: BTreeMap<String, usize> = BTreeMap::new();
        for r in tb.request_from(&pod.ns, true, Proto::Tcp, to, 60) {
            assert!(right(&r), "{to}: {r:?}");
            *answered.entry(r.backend).or_default() += 1;
        }
        // semantics 4.11: all three drawn, none far off a third (each bound about 5 standard
        // deviations away: a chance failure under 1e-6 per frontend).
        assert_eq!(answered.len(), 3, "{to}: {answered:?}");
        for (backend, n) in &answered {
            assert!((3..=37).contains(n), "{to}: {backend} {n} of {answered:?}");
        }
    }
    tb.assert_no_checksum_errors();
}

#[test]
fn external_clients_spread_evenly_over_local_and_remote_backends() {
    // semantics 4.11: each new connection picks uniformly among the endpoints, local or not.
    // XDP on eth0 forwards the flows it gives to node-b's backend and hands those to node-a's
    // backends to tc: the two must make one draw, not one each (a second draw at tc would
    // send 5/9 of the connections to node-b's single backend).
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0), (0, 1), (1, 0)]);
    for to in [
        addr("192.168.77.1", NODE_PORT_HTTP),
        addr("fd00:77::1", NODE_PORT_HTTP),
    ] {
        wait_answered(&tb, Proto::Tcp, to);
        let mut answered: BTreeMap<String, usize> = BTreeMap::new();
        for r in tb.request_ext(Proto::Tcp, to, 300) {
            assert!(r.ok, "{to}: {r:?}");
            *answered.entry(r.backend).or_default() += 1;
        }
        // 100 expected each, standard deviation 8.2: 5 of them either way.
        assert_eq!(answered.len(), 3, "{to}: {answered:?}");
        for (backend, n) in &answered {
            assert!(
                (59..=141).contains(n),
                "{to}: {backend} {n} of {answered:?}\n{}",
                datapath_counters(&agent)
            );
        }
    }
    assert!(datapath_events(&agent, "xdp_forwarded") > 0);
}

#[test]
fn cluster_ips_reached_from_outside_are_translated_and_masqueraded() {
    // semantics 12.5: traffic to a Service address is handled for every source, forwarded
    // packets too (ext routes the Service CIDR via node-a); 7.12: a source that is no local
    // pod is masqueraded; 3.12 (nftables): a port the ClusterIP does not serve is rejected.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(1, 0)]);
    for ip in ["10.96.0.10", "fd00:96::10"] {
        for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
            let to = addr(ip, port);
            wait_answered(&tb, proto, to);
            for r in tb.request_ext(proto, to, 3) {
                assert!(r.ok, "{to} {proto:?}: {r:?}");
                assert_eq!(r.backend, "b-pod-1", "{r:?}");
                let seen = r.seen.parse::<SocketAddr>().expect("seen").ip();
                assert!(
                    NODE_A.contains(&seen.to_string().as_str()),
                    "{to} {proto:?} not masqueraded: {r:?}"
                );
                assert_eq!(r.peer.parse::<SocketAddr>().expect("peer"), to, "{r:?}");
            }
        }
        let r = tb.request_ext(Proto::Tcp, addr(ip, 81), 1);
        assert_eq!(r[0].errno, Some(111), "port 81 of {ip}: {r:?}");
    }
    tb.assert_no_checksum_errors();
}

#[test]
fn udp_flow_to_a_removed_backend_is_balanced_afresh() {
    // semantics 9.2 (issue #12 on the packet path): a UDP flow from outside keeps its tuple,
    // so only connection tracking ties it to a backend; when that backend leaves the Service
    // the next datagram goes to a remaining one and the removed backend gets nothing more.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0)]);
    let to = addr("192.168.77.1", NODE_PORT_DNS);
    wait_answered(&tb, Proto::Udp, to);
    let stream = UdpStream::start(&tb.ext, None, to, 5, true);
    // Once the flow is answered by a-pod-1: a-pod-1 leaves, a-pod-2 and b-pod-1 join.
    stream.wait_for_answers("a-pod-1", 3);
    let removed_at = now_ms();
    web_endpoints(&agent, &tb, &[(0, 1), (1, 0)]);
    let lines = stream.finish();
    let answers: Vec<(u64, String)> = lines
        .iter()
        .filter_map(|l| Some((l["t"].as_u64()?, l["backend"].as_str()?.to_string())))
        .collect();
    let before: Vec<_> = answers.iter().filter(|(t, _)| *t < removed_at).collect();
    assert!(
        !before.is_empty() && before.iter().all(|(_, b)| b == "a-pod-1"),
        "{lines:?}"
    );
    // Within a second of the change every answer comes from a remaining backend.
    let late: Vec<_> = answers
        .iter()
        .filter(|(t, _)| *t > removed_at + 1000)
        .collect();
    assert!(late.len() >= 5, "the flow kept being answered: {lines:?}");
    assert!(
        late.iter().all(|(_, b)| b == "a-pod-2" || b == "b-pod-1"),
        "the removed backend still answered: {lines:?}"
    );
    let moved_at = answers
        .iter()
        .find(|(t, b)| *t >= removed_at && b != "a-pod-1")
        .map(|(t, _)| *t)
        .expect("moved");
    eprintln!(
        "nodeport udp: flow moved {} ms after the slice changed",
        moved_at - removed_at
    );
    tb.assert_no_checksum_errors();
}

#[test]
fn udp_flow_to_a_backend_that_starts_terminating_keeps_it() {
    // semantics 9.3: kube-proxy deletes a UDP flow's conntrack entry only when its endpoint
    // stops serving; one that starts terminating while another is ready takes no new flows
    // but keeps those it has.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0)]);
    let to = addr("192.168.77.1", NODE_PORT_DNS);
    wait_answered(&tb, Proto::Udp, to);
    let stream = UdpStream::start(&tb.ext, None, to, 6, true);
    stream.wait_for_answers("a-pod-1", 3);
    let terminating = "ready: false, serving: true, terminating: true";
    web_endpoints_with(&agent, &tb, &[(0, 0, terminating), (0, 1, "")]);
    // New flows go to the ready backend once the change is programmed.
    poll_until("new flows on a-pod-2", Duration::from_secs(10), || {
        let t = tally(&tb.request_ext(Proto::Udp, to, 4));
        if t.keys().all(|b| b == "a-pod-2") {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    });
    let programmed_at = now_ms();
    let so_far = stream.lines().len();
    poll_until("20 more answers", Duration::from_secs(5), || {
        let n = stream.lines().len();
        if n >= so_far + 20 {
            Ok(())
        } else {
            Err(format!("{n} lines"))
        }
    });
    let lines = stream.finish();
    let after: Vec<String> = lines
        .iter()
        .filter(|l| l["t"].as_u64().is_some_and(|t| t > programmed_at))
        .map(|l| l["backend"].as_str().unwrap_or("(error)").to_string())
        .collect();
    assert!(
        after.len() >= 20 && after.iter().all(|b| b == "a-pod-1"),
        "{after:?}"
    );
    tb.assert_no_checksum_errors();
}

#[test]
fn icmp_errors_of_a_translated_flow_reach_the_client() {
    // Issue #5: an ICMP error about a translated flow is translated back. The backend pod has
    // nothing listening on the slice's port, so it answers a datagram with ICMP port
    // unreachable; the client's connected socket gets ECONNREFUSED instead of a timeout.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    for (family, ip) in [
        ("IPv4", tb.nodes[0].pods[0].ip4.to_string()),
        ("IPv6", tb.nodes[0].pods[0].ip6.to_string()),
    ] {
        agent.write_manifest(
            &format!("web-{family}.yaml"),
            &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-{family}\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\nports: [{{name: dns, port: 9999, protocol: UDP}}, {{name: http, port: {BACKEND_PORT}, protocol: TCP}}]\nendpoints:\n- {{addresses: [\"{ip}\"], nodeName: {NODE}}}\n"
            ),
        );
    }
    wait_answered(&tb, Proto::Tcp, addr("192.168.77.1", NODE_PORT_HTTP));
    for to in frontends(true) {
        poll_until(&format!("{to} refused"), Duration::from_secs(10), || {
            let r = tb.request_ext(Proto::UdpConnected, to, 1);
            if r[0].errno == Some(111) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        });
    }
    datapath_events_reach(&agent, "icmp_translated", 6);
    tb.assert_no_checksum_errors();
}

#[test]
fn client_ip_affinity_holds_on_the_packet_path() {
    // semantics 6.2, 6.4: ClientIP affinity by the client's address, shared by the Service
    // port's frontends.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml("  sessionAffinity: ClientIP\n"));
    web_endpoints(&agent, &tb, &[(0, 0), (0, 1), (1, 0)]);
    let mut chosen = BTreeSet::new();
    for to in [
        addr("192.168.77.1", NODE_PORT_HTTP),
        addr(EXTERNAL_IP4, 80),
        addr(LB_IP4, 80),
    ] {
        wait_answered(&tb, Proto::Tcp, to);
        for r in tb.request_ext(Proto::Tcp, to, 15) {
            assert!(r.ok, "{r:?}");
            chosen.insert(r.backend);
        }
    }
    assert_eq!(chosen.len(), 1, "one backend for the client: {chosen:?}");
    assert!(datapath_events(&agent, "affinity_hit") > 0);
}

#[test]
fn a_pods_affinity_is_shared_by_its_cluster_ip_and_the_frontends_tc_serves() {
    // semantics 6.2: affinity is by the client's address, one per Service port and family,
    // shared by all of its frontends. A pod's connections to the ClusterIP are translated at
    // the socket layer; those to the port's NodePort, externalIP and LB IP are left to tc on
    // its interface, which masquerades them (7.13): they reach one backend all the same.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest(
        "web.yaml",
        &web_yaml(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n",
        ),
    );
    // Three backends, the client pod among them (hairpin).
    web_endpoints(&agent, &tb, &[(0, 0), (0, 1), (1, 0)]);
    let pod = &tb.nodes[0].pods[0];
    let cluster_ips = [addr("10.96.0.10", 80), addr("fd00:96::10", 80)];
    let external = frontends(false);
    // The pod is left to tc once its interface carries it (within seconds).
    for to in [external[0], external[1]] {
        poll_until(
            &format!("{to} from the pod masqueraded"),
            Duration::from_secs(15),
            || {
                let r = tb.request_from(&pod.ns, true, Proto::Tcp, to, 1);
                if r[0].ok && NODE_A.contains(&seen_ip(&r[0]).to_string().as_str()) {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        );
    }
    // Each round starts after the entries expired (a fresh pick), alternately at the ClusterIP
    // and at tc. Unshared entries would agree by chance with probability 1/3 per family and
    // round: (1/3)^8 over the 4 rounds.
    for round in 0..4 {
        // The timeout itself (2 s) is what is waited for, not a condition to poll.
        std::thread::sleep(Duration::from_millis(2600));
        for (v6, cluster_ip) in cluster_ips.iter().enumerate() {
            let mut order: Vec<SocketAddr> = external
                .iter()
                .copied()
                .filter(|a| a.is_ipv6() == (v6 == 1))
                .collect();
            if round % 2 == 0 {
                order.insert(0, *cluster_ip);
            } else {
                order.push(*cluster_ip);
            }
            let mut chosen = BTreeSet::new();
            for to in &order {
                for r in tb.request_from(&pod.ns, true, Proto::Tcp, *to, 3) {
                    assert!(r.ok, "{to}: {r:?}");
                    chosen.insert(r.backend);
                }
            }
            assert_eq!(chosen.len(), 1, "round {round}, {order:?}: {chosen:?}");
        }
    }
    assert!(datapath_events(&agent, "per_packet") > 0);
    assert!(datapath_events(&agent, "affinity_hit") > 0);
}

#[test]
fn closed_connections_leave_the_conntrack_table() {
    // Issue #5: entries expire on TCP close (10 s after FINs both ways), collected by the
    // agent (every 10 s); the table's fill is in the metrics.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0)]);
    let to = addr("192.168.77.1", NODE_PORT_HTTP);
    wait_answered(&tb, Proto::Tcp, to);
    assert!(tb.request_ext(Proto::Tcp, to, 5).iter().all(|r| r.ok));
    let entries = |agent: &Agent| -> Option<u64> {
        let (_, body) = agent.get(agent.metrics_port, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("kube_bpf_proxy_map_entries{map=\"LB_CT4\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    poll_until("conntrack entries counted", Duration::from_secs(10), || {
        entries(&agent)
            .filter(|n| *n > 0)
            .ok_or_else(|| "none yet".to_string())
    });
    poll_until(
        "conntrack emptied",
        Duration::from_secs(40),
        || match entries(&agent) {
            Some(0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}

/// `web` scheduled by `scheduler` (the annotation's value).
fn web_yaml_scheduled(scheduler: &str) -> String {
    web_yaml("").replace(
        "metadata: {name: web, namespace: default}",
        &format!(
            "metadata: {{name: web, namespace: default, annotations: \
             {{kube-bpf-proxy.io/scheduler: {scheduler}}}}}"
        ),
    )
}

#[test]
fn round_robin_and_source_hash_hold_on_the_packet_path() {
    // Issue #11: the socket path's schedulers behave alike for traffic from outside (tc, and
    // XDP for the remote backend's flows).
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml_scheduled("rr"));
    web_endpoints(&agent, &tb, &[(0, 0), (0, 1), (1, 0)]);
    let to = addr("192.168.77.1", NODE_PORT_HTTP);
    wait_answered(&tb, Proto::Tcp, to);
    // Every backend exactly its turn, in a fixed cycle.
    let order: Vec<String> = tb
        .request_ext(Proto::Tcp, to, 9)
        .into_iter()
        .map(|r| r.backend)
        .collect();
    let cycle: BTreeSet<&String> = order[..3].iter().collect();
    assert_eq!(cycle.len(), 3, "{order:?}");
    for (i, b) in order.iter().enumerate() {
        assert_eq!(b, &order[i % 3], "{order:?}");
    }
    // Source hashing: the one external client always lands on one backend.
    agent.write_manifest("web.yaml", &web_yaml_scheduled("sh"));
    poll_until(
        "one backend for the client",
        Duration::from_secs(10),
        || {
            let t = tally(&tb.request_ext(Proto::Tcp, to, 12));
            if t.len() == 1 && t.values().sum::<usize>() == 12 {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        },
    );
    tb.assert_no_checksum_errors();
}

#[test]
fn least_connection_on_the_packet_path_counts_flows_until_they_close() {
    // Issue #11: a least-connection frontend reached from outside is balanced on counts the
    // datapath keeps per conntrack flow — taken when tc creates the flow, given back at the
    // flow's first FIN or RST (or its expiry). The remote backend's packets go through XDP.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml_scheduled("lc"));
    web_endpoints(&agent, &tb, &[(0, 0)]);
    let to = addr("192.168.77.1", NODE_PORT_HTTP);
    let frontend = "192.168.77.1:30080/TCP";
    wait_answered(&tb, Proto::Tcp, to);
    // Three long connections on a-pod-1, then b-pod-1 (on node-b) joins.
    let mut held: Vec<_> = (0..3).map(|_| tb.hold_from(&tb.ext, false, to)).collect();
    let first: Vec<_> = held.iter().map(|(_, r)| r.backend.clone()).collect();
    assert!(first.iter().all(|b| b == "a-pod-1"), "{first:?}");
    web_endpoints(&agent, &tb, &[(0, 0), (1, 0)]);
    let busy = format!("{}:{BACKEND_PORT}", tb.nodes[0].pods[0].ip4);
    let idle = format!("{}:{BACKEND_PORT}", tb.nodes[1].pods[0].ip4);
    poll_until("b-pod-1 in the Service", Duration::from_secs(10), || {
        let c = lc_connections(&agent, frontend);
        if c.len() == 2 {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        }
    });
    assert_eq!(lc_connections(&agent, frontend)[&busy], 3);
    // One count per held flow, each in its forward conntrack entry.
    let flows = counted_flows(&agent);
    assert_eq!(flows.len(), 3, "{flows:?}");
    // New connections, each closed before the next, all avoid the busy backend.
    let t = tally(&tb.request_ext(Proto::Tcp, to, 20));
    assert_eq!(t.get("b-pod-1"), Some(&20), "{t:?}");
    for (h, _) in &mut held {
        assert_eq!(h.again().backend, "a-pod-1");
    }
    assert!(datapath_events(&agent, "xdp_forwarded") > 0);
    // Hundreds more, then the held clients are killed without closing their sockets.
    let replies = tb.request_ext(Proto::Tcp, to, 300);
    assert!(replies.iter().all(|r| r.ok), "{replies:?}");
    held.clear();
    poll_until("counts back to zero", Duration::from_secs(10), || {
        let c = lc_connections(&agent, frontend);
        if c[&busy] == 0 && c[&idle] == 0 {
            Ok(())
        } else {
            // The flows still holding a count, to tell a leak from a flow still closing (this
            // wait once ended with one count left, not reproduced since).
            Err(format!(
                "{c:?}; flows holding counts: {:?}",
                counted_flows(&agent)
            ))
        }
    });
    // Idle again: new connections spread over both.
    let t = tally(&tb.request_ext(Proto::Tcp, to, 40));
    assert_eq!(t.len(), 2, "{t:?}");
    tb.assert_no_checksum_errors();
}

/// The IPv4 connection-tracking entries of `agent` that hold a least-connection count (key
/// and value).
fn counted_flows(agent: &Agent) -> Vec<String> {
    ct4_entries(agent)
        .iter()
        .filter(|e| e["value"]["counted"].as_u64().is_some_and(|c| c != 0))
        .map(|e| format!("{} -> {}", e["key"], e["value"]))
        .collect()
}

#[test]
fn least_connection_udp_flows_hold_counts_until_their_backend_goes() {
    // Issue #11: a UDP flow holds its count until its conntrack entry goes: here the agent
    // removes the flows of a backend that left the Service (semantics 9.2) and gives their
    // counts back through the datapath (the same path as the collector's expiry).
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml_scheduled("lc"));
    web_endpoints(&agent, &tb, &[(0, 0), (1, 0)]);
    let to = addr("192.168.77.1", NODE_PORT_DNS);
    let frontend = "192.168.77.1:30053/UDP";
    wait_answered(&tb, Proto::Udp, to);
    let local = format!("{}:{BACKEND_PORT}", tb.nodes[0].pods[0].ip4);
    let remote = format!("{}:{BACKEND_PORT}", tb.nodes[1].pods[0].ip4);
    // Each request is a new flow (a new source port) that stays counted: they alternate.
    let replies = tb.request_ext(Proto::Udp, to, 10);
    assert!(replies.iter().all(|r| r.ok), "{replies:?}");
    let c = lc_connections(&agent, frontend);
    // 11 flows, or 10 when the client's ephemeral port repeated (then the later request
    // continued the earlier flow); either way one count per tracked flow.
    let flows = counted_flows(&agent).len() as u64;
    assert!((10..=11).contains(&flows), "{flows} flows");
    assert_eq!(c[&local] + c[&remote], flows, "{c:?}");
    assert!(c[&local].abs_diff(c[&remote]) <= 1, "{c:?}");
    let local_flows = c[&local];
    // b-pod-1 leaves: its flows are forgotten and their counts given back; a-pod-1 keeps its.
    web_endpoints(&agent, &tb, &[(0, 0)]);
    poll_until(
        "the removed backend's counts given back",
        Duration::from_secs(10),
        || {
            let c = lc_connections(&agent, frontend);
            if c.len() == 1 && c[&local] == local_flows {
                Ok(())
            } else {
                Err(format!("{c:?}"))
            }
        },
    );
    // Nothing leaked: the counts over every backend are a-pod-1's.
    assert_eq!(conns_total(&agent), local_flows);
    tb.assert_no_checksum_errors();
}

/// The sum of every backend's active-connection count (`LB_CONNS`, read with bpftool).
fn conns_total(agent: &Agent) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(agent.pin_dir.join("LB_CONNS"))
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array()
        .expect("entries")
        .iter()
        .map(|e| match &e["value"] {
            serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
            // Without BTF: the value's bytes, little-endian, as hex strings.
            serde_json::Value::Array(bytes) => bytes.iter().rev().fold(0, |acc, b| {
                let b = b
                    .as_str()
                    .and_then(|s| u64::from_str_radix(&s[2..], 16).ok());
                (acc << 8) | b.unwrap_or(0)
            }),
            other => panic!("LB_CONNS value {other}"),
        })
        .sum()
}

#[test]
fn forwarded_packets_count_their_ttl_down() {
    // A node forwarding NodePort traffic is a router: kube-proxy's DNATed packets are forwarded
    // by the stack, which counts the TTL (hop limit) down and answers an expiring one. Ours are
    // forwarded at tc (local backend, both families) and XDP (remote backend, IPv4).
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0)]);
    for ip in ["192.168.77.1", "fd00:77::1"] {
        let to = addr(ip, NODE_PORT_DNS);
        wait_answered(&tb, Proto::Udp, to);
        // One hop to a-pod-1: node-a's.
        let r = udp_with_ttl(&tb.ext, to, 2);
        assert!(r.ok && r.backend == "a-pod-1", "{to} TTL 2: {r:?}");
        let r = udp_with_ttl(&tb.ext, to, 1);
        assert!(!r.ok, "{to}: TTL 1 forwarded: {r:?}");
    }
    assert!(datapath_events(&agent, "ttl_expired") > 0);
    // b-pod-1 is two hops away (node-a's XDP, node-b's stack).
    web_endpoints(&agent, &tb, &[(1, 0)]);
    let to = addr("192.168.77.1", NODE_PORT_DNS);
    poll_until("b-pod-1 answers", Duration::from_secs(10), || {
        let r = udp_with_ttl(&tb.ext, to, 3);
        if r.ok && r.backend == "b-pod-1" {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    let r = udp_with_ttl(&tb.ext, to, 2);
    assert!(!r.ok, "TTL 2 reached a backend two hops away: {r:?}");
    assert!(datapath_events(&agent, "xdp_forwarded") > 0);
    // The expired packets count as header errors where the stack dropped them (node-a for
    // the hop limit of 1, node-b for the TTL XDP counted down to 1); nothing else may.
    let errors: Vec<_> = tb
        .checksum_errors()
        .into_iter()
        .filter(|(ns, counter, n)| {
            let expired = (ns.ends_with("node-a") && counter == "Ip6InHdrErrors")
                || (ns.ends_with("node-b") && counter == "Ip:InHdrErrors");
            !(expired && *n <= 2)
        })
        .collect();
    assert!(errors.is_empty(), "receivers dropped packets: {errors:?}");
}

/// IP fragments (issue #23): a UDP datagram larger than the MTU reaches a node port in
/// fragments; every fragment is translated as its first (the backend reassembles the datagram
/// and answers), and the answer, as large and fragmented too, is translated back to the client.
/// A local backend (tc on the pod's interface) and a remote one (masqueraded through tc), over
/// IPv4 and IPv6.
#[test]
fn fragmented_datagrams_reach_the_backend_and_come_back() {
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    for (pod, name) in [((0, 0), "a-pod-1"), ((1, 0), "b-pod-1")] {
        web_endpoints(&agent, &tb, &[pod]);
        for ip in ["192.168.77.1", "fd00:77::1"] {
            let to = addr(ip, NODE_PORT_DNS);
            poll_until(
                &format!("{name} answers at {to}"),
                Duration::from_secs(10),
                || {
                    let r = &tb.request_ext(Proto::Udp, to, 1)[0];
                    if r.ok && r.backend == name {
                        Ok(())
                    } else {
                        Err(format!("{r:?}"))
                    }
                },
            );
            for size in [3000, 8000] {
                let r = udp_sized(&tb.ext, to, size);
                assert!(
                    r.ok && r.backend == name,
                    "{size} bytes to {name} at {to}: {r:?}"
                );
            }
        }
    }
    assert!(datapath_events(&agent, "fragment_translated") > 0);
}

#[test]
fn a_datagram_too_big_for_the_pod_network_is_answered_with_the_mtu_as_the_kernel_does() {
    // Semantics 12.5 (external traffic to a NodePort is forwarded by the node): under
    // kube-proxy, a packet with don't-fragment set (IPv4) or any IPv6 packet too big for the
    // link towards the endpoint gets ICMP "fragmentation needed" / "packet too big" from the
    // node's forwarding, its quote translated back by netfilter, and the client's kernel
    // lowers its path MTU to the node port. The pod network here has MTU 1400 (an overlay's
    // or a CNI's smaller MTU), the LAN 1500.
    if !privileged() {
        return;
    }
    let (tb, agent) = setup();
    agent.write_manifest("web.yaml", &web_yaml(""));
    web_endpoints(&agent, &tb, &[(0, 0)]);
    tb.nodes[0].ns.ip(&["link", "set", "br0", "mtu", "1400"]);
    for (node, headers) in [("192.168.77.1", 28), ("fd00:77::1", 48)] {
        let to = addr(node, NODE_PORT_DNS);
        wait_answered(&tb, Proto::Udp, to);
        // A datagram that fills the LAN's MTU: answered with the pod network's.
        let r = tests::harness::topology::udp_unfragmented(&tb.ext, to, 1500 - headers);
        assert!(!r.ok, "{to}: too big for the pod network: {r:?}");
        assert_eq!(r.errno, Some(libc::EMSGSIZE), "{to}: {r:?}");
        assert_eq!(r.mtu, Some(1400), "{to}: the client's path MTU: {r:?}");
        // At that MTU, answered from the node port.
        let r = tests::harness::topology::udp_unfragmented(&tb.ext, to, 1400 - headers);
        assert!(r.ok && r.backend == "a-pod-1", "{to}: {r:?}");
        assert_eq!(r.peer.parse::<SocketAddr>().unwrap(), to, "{r:?}");
    }
    datapath_events_reach(&agent, "frag_needed", 2);
    tb.assert_no_checksum_errors();
}

/// semantics 9.6: at its start the agent sets the kernel's own (netfilter) connection tracking
/// up as kube-proxy does, for the node's other traffic: TCP established and close-wait
/// timeouts of 24 h and 1 h (in the node's namespace, here a testbed node's). The table's size
/// is the machine's, read-only from such a namespace: that is a warning, not a failure.
#[test]
fn the_agent_sets_netfilter_conntrack_timeouts_as_kube_proxy_does() {
    if !privileged() {
        return;
    }
    // Loaded by kube-proxy's rules on a node; here, if nothing loaded it yet.
    let _ = std::process::Command::new("modprobe")
        .args(["-q", "nf_conntrack"])
        .status();
    let tb = Testbed::new(&[1]);
    let ns = &tb.nodes[0].ns;
    let read = |name: &str| {
        ns.exec("cat", &[&format!("/proc/sys/net/netfilter/{name}")])
            .trim()
            .to_string()
    };
    if ns
        .exec("ls", &["/proc/sys/net/netfilter"])
        .lines()
        .all(|l| l.trim() != "nf_conntrack_max")
    {
        tests::skip("netfilter connection tracking (nf_conntrack) is not available");
        return;
    }
    ns.sysctl(
        "net.netfilter.nf_conntrack_tcp_timeout_established",
        "432000",
    );
    ns.sysctl("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "60");
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    let from = agent.log_position();
    agent.start();
    agent.wait_for_log(
        from,
        "nf_conntrack_tcp_timeout_established set to 86400 (was 432000)",
        Duration::from_secs(20),
    );
    assert_eq!(read("nf_conntrack_tcp_timeout_established"), "86400");
    assert_eq!(read("nf_conntrack_tcp_timeout_close_wait"), "3600");
}
