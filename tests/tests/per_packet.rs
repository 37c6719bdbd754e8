//! Socket-layer translation off per namespace (issue #24): the pods of a namespace labelled
//! `kube-bpf-proxy.io/socket-lb: disabled` reach Services per packet, at tc on their own
//! interface, after their own netfilter rules; a service mesh's sidecar sees the ClusterIP.

mod common;

use std::{collections::BTreeSet, net::SocketAddr, path::Path, time::Duration};

use common::*;
use proxy_common::{ct::CT_REPLY, reason::Reason};
use tests::{
    Agent, ChildGuard, Shape, TestCgroup, Testbed,
    harness::{
        cgroup::cgroup2_root,
        topology::{Proto, request_in, tcp_from_ports, testhost_in},
    },
    poll_until,
};

const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
const POD_UID: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
const LATE_UID: &str = "7a2d3b4c-5e6f-4071-9b8c-0d1e2f3a4b5c";
const MARK: &str = "1337";
/// The first of the fixed source ports the meshed pod connects from twice (outside the
/// ephemeral range, so no other connection of the pod takes them).
const REUSED_PORTS: u16 = 20000;

fn to(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().unwrap()
}

fn to6(port: u16) -> SocketAddr {
    format!("[{VIP6}]:{port}").parse().unwrap()
}

fn namespace_yaml(label: Option<&str>) -> String {
    let labels = label.map_or(String::new(), |v| {
        format!(", labels: {{kube-bpf-proxy.io/socket-lb: {v}}}")
    });
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: mesh{labels}}}\n")
}

fn per_packet_count(pins: &Path) -> u64 {
    let maps = proxy_userspace::datapath::bpf::Maps::open_pinned(pins).expect("open pins");
    maps.stats()
        .expect("stats")
        .into_iter()
        .find(|(r, _)| *r == Reason::PerPacket)
        .map_or(0, |(_, n)| n)
}

/// How many reply entries the pinned IPv4 connection tracking holds for `client`'s ports in
/// `ports` (replies to the client itself: not masqueraded).
fn replies_to(pins: &Path, client: std::net::Ipv4Addr, ports: std::ops::Range<u16>) -> usize {
    let maps = proxy_userspace::datapath::bpf::Maps::open_pinned(pins).expect("open pins");
    let ct = maps.conntrack4().expect("conntrack");
    ct.iter()
        .filter(|(k, v)| {
            v.flags & CT_REPLY != 0 && k.daddr == client.octets() && ports.contains(&k.dport)
        })
        .count()
}

/// Waits (up to `timeout`) until a TCP request from the client pod (`ns`, cgroup `cg`) to
/// `dest` is answered: `what` names the wait.
fn wait_answered(
    what: &str,
    ns: &tests::harness::netns::NetNs,
    cg: &TestCgroup,
    dest: SocketAddr,
    timeout: Duration,
) {
    poll_until(what, timeout, || {
        let r = request_in(ns, Some(cg), Proto::Tcp, dest, 1);
        if r[0].ok {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
}

/// A cgroup directory below the testbed's, named as kubelet (cgroupfs driver) names a pod's.
fn pod_cgroups(tb: &Testbed) -> (TestCgroup, TestCgroup) {
    let rel = tb
        .cgroup
        .path
        .strip_prefix(cgroup2_root())
        .expect("test cgroup below the cgroup2 mount")
        .to_path_buf();
    let kubepods = TestCgroup::new(&format!("{}/kubepods", rel.display()));
    let pod = TestCgroup::new(&format!("{}/kubepods/pod{POD_UID}", rel.display()));
    (kubepods, pod)
}

/// The testbed both tests use: node a with the client pod (a-pod-1, in namespace `mesh`,
/// labelled `label`, its cgroup named as kubelet names it), backends a-pod-2, a-pod-3 and
/// b-pod-1 on node b (no agent there) of Services `web` (`VIP`, `web_extra` added to its spec)
/// and `web6` (`VIP6`), ports 80/TCP and 53/UDP; `pods` pods on node a. The agent (`flags`)
/// is started and has found the client pod. Returns the testbed, the agent and the pod's
/// cgroup (with its parent: both are removed on drop).
fn meshed_testbed(
    shape: Shape,
    pods: usize,
    label: Option<&str>,
    flags: &[&str],
    web_extra: &str,
) -> (Testbed, Agent, (TestCgroup, TestCgroup)) {
    meshed_testbed_on(
        Testbed::with_shape(&[pods, 1], shape),
        label,
        flags,
        web_extra,
    )
}

/// `meshed_testbed` on testbed `tb` (at least three pods on node a, one on node b).
fn meshed_testbed_on(
    mut tb: Testbed,
    label: Option<&str>,
    flags: &[&str],
    web_extra: &str,
) -> (Testbed, Agent, (TestCgroup, TestCgroup)) {
    tb.serve(0, 1, BACKEND_PORT);
    tb.serve(0, 2, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let remote = (tb.nodes[1].pods[0].ip4, tb.nodes[1].pods[0].ip6);
    let cgroups = pod_cgroups(&tb);
    let node_name = tb.nodes[0].name.clone();
    let local = &tb.nodes[0].pods;
    let (client, client6) = (local[0].ip4, local[0].ip6);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), flags);
    agent.write_manifest("ns.yaml", &namespace_yaml(label));
    agent.write_manifest(
        "pod.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: mesh, uid: {POD_UID}}}\nspec: {{nodeName: {node_name}, containers: [{{name: app, image: app}}]}}\nstatus: {{podIP: {client}, podIPs: [{{ip: {client}}}, {{ip: {client6}}}]}}\n"
        ),
    );
    agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &[VIP], &[HTTP, DNS], web_extra),
    );
    agent.write_manifest(
        "web6.yaml",
        &service_yaml("web6", &[VIP6], &[HTTP, DNS], ""),
    );
    agent.write_manifest(
        "web-slice.yaml",
        &slice_yaml(
            "web-1",
            "web",
            "IPv4",
            &[HTTP, DNS],
            &[ep(local[1].ip4), ep(local[2].ip4), ep(remote.0)],
        ),
    );
    agent.write_manifest(
        "web6-slice.yaml",
        &slice_yaml(
            "web6-1",
            "web6",
            "IPv6",
            &[HTTP, DNS],
            &[ep(local[1].ip6), ep(local[2].ip6), ep(remote.1)],
        ),
    );
    let from = agent.log_position();
    agent.start();
    agent.wait_for_log(
        from,
        "socket-layer translation off for 1 pod(s) in namespaces [mesh]",
        Duration::from_secs(20),
    );
    (tb, agent, cgroups)
}

#[test]
fn per_pod_veths_a_namespace_with_socket_lb_off_is_translated_per_packet_for_its_sidecar() {
    per_packet(Shape::Ptp, false);
}

/// `--socket-lb-default disabled`: the namespace without the label is per packet, and the label
/// `enabled` brings it back to the socket layer.
#[test]
fn by_default_a_namespace_without_the_label_is_translated_per_packet() {
    per_packet(Shape::Ptp, true);
}

/// On a bridge, a backend behind the same bridge would answer the client pod through the
/// bridge, past tc: those flows are masqueraded to the node's bridge address.
#[test]
fn bridge_a_namespace_with_socket_lb_off_is_translated_per_packet_for_its_sidecar() {
    per_packet(Shape::Bridge, false);
}

/// semantics 7.12, 11.11: `--masquerade-all` masquerades every ClusterIP connection, pods'
/// included: the backends (on this node, and on another) see an address of the client's node,
/// never the pod; so does a connection to an externalIP (7.13). The pod is translated per packet
/// although its namespace asks for the socket layer (the socket layer cannot masquerade); the
/// client still sees the Service address as its peer.
#[test]
fn masquerade_all_masquerades_pods_connections_to_cluster_ips() {
    if !privileged() {
        return;
    }
    let (tb, agent, (_kubepods, pod_cg)) = meshed_testbed(
        Shape::Ptp,
        3,
        Some("enabled"),
        &["--masquerade-all"],
        "  externalIPs: [203.0.113.10]\n",
    );
    let node_name = tb.nodes[0].name.clone();
    let (client, client6) = (tb.nodes[0].pods[0].ip4, tb.nodes[0].pods[0].ip6);
    // node-a's own addresses, any interface.
    let node_addrs: BTreeSet<String> = tb.nodes[0]
        .ns
        .ip(&["-br", "addr", "show"])
        .lines()
        .flat_map(|l| {
            l.split_whitespace()
                .skip(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|a| a.split('/').next().map(str::to_string))
        .collect();
    let client_ns = &tb.nodes[0].pods[0].ns;
    wait_answered(
        "the pod's ClusterIP answered",
        client_ns,
        &pod_cg,
        to(80),
        Duration::from_secs(20),
    );
    let before = per_packet_count(&agent.pin_dir);
    let backends: BTreeSet<String> = ["a-pod-2", "a-pod-3", "b-pod-1"].map(String::from).into();
    for (proto, dest, pod) in [
        (Proto::Tcp, to(80), client.to_string()),
        (Proto::Udp, to(53), client.to_string()),
        (Proto::Tcp, to6(80), client6.to_string()),
        (Proto::Udp, to6(53), client6.to_string()),
        // An externalIP of the same Service (externalTrafficPolicy Cluster, 7.13).
        (
            Proto::Tcp,
            "203.0.113.10:80".parse().unwrap(),
            client.to_string(),
        ),
    ] {
        let replies = request_in(client_ns, Some(&pod_cg), proto, dest, 30);
        let mut seen = BTreeSet::new();
        for r in &replies {
            assert!(r.ok, "{proto:?} {dest}: {r:?}");
            let ip = r
                .seen
                .rsplit_once(':')
                .map(|(ip, _)| ip.trim_matches(['[', ']']).to_string())
                .expect("the address the backend saw");
            assert_ne!(ip, pod, "{dest}: not masqueraded: {r:?}");
            assert!(
                node_addrs.contains(&ip),
                "{dest}: {ip} is no address of node-a {node_addrs:?}: {r:?}"
            );
            assert_eq!(r.peer, dest.to_string(), "{r:?}");
            seen.insert(r.backend.clone());
        }
        // Random over three backends: one missing from 30 has probability 3 (2/3)^30.
        assert_eq!(seen, backends, "{proto:?} {dest} not balanced: {replies:?}");
    }
    assert!(
        per_packet_count(&agent.pin_dir) >= before + 150,
        "the pod's connects were not left to tc"
    );
    assert_verified(&tb, &agent, &node_name, "masquerade-all");
}

/// semantics 4.7a, 3.9: a pod on this node that reaches an externalIP of a Service with
/// externalTrafficPolicy Local is short-circuited to the cluster set, unmasqueraded, as the
/// socket layer does for other pods: a pod translated per packet too reaches the endpoint on
/// another node, not only this node's two (the external set), and the backends see the pod's
/// own address.
#[test]
fn a_pod_translated_per_packet_reaches_the_whole_cluster_through_an_etp_local_external_ip() {
    etp_local_external_ip_per_packet(&[]);
}

/// The same with `--masquerade-all` (semantics 7.12): it masquerades ClusterIP traffic only
/// (kube-proxy's rule matches the ClusterIP as destination), so the short-circuited pod still
/// reaches the backends with its own address.
#[test]
fn masquerade_all_leaves_a_pods_etp_local_external_ip_unmasqueraded() {
    etp_local_external_ip_per_packet(&["--masquerade-all"]);
}

fn etp_local_external_ip_per_packet(agent_args: &[&str]) {
    if !privileged() {
        return;
    }
    let (tb, mut agent, (_kubepods, pod_cg)) = meshed_testbed(
        Shape::Ptp,
        3,
        Some("disabled"),
        agent_args,
        "  externalIPs: [203.0.113.10]\n  externalTrafficPolicy: Local\n",
    );
    let node_name = tb.nodes[0].name.clone();
    let remote_node = tb.nodes[1].name.clone();
    let local = &tb.nodes[0].pods;
    let pos = agent.log_position();
    agent.write_manifest(
        "web-slice.yaml",
        &slice_yaml(
            "web-1",
            "web",
            "IPv4",
            &[HTTP, DNS],
            &[
                ep(local[1].ip4),
                ep(local[2].ip4),
                Ep {
                    node: &remote_node,
                    ..ep(tb.nodes[1].pods[0].ip4)
                },
            ],
        ),
    );
    agent.wait_for_log(pos, "synced", Duration::from_secs(20));
    let client = local[0].ip4.to_string();
    let client_ns = &local[0].ns;
    let dest: SocketAddr = "203.0.113.10:80".parse().unwrap();
    wait_answered(
        "the pod's externalIP answered",
        client_ns,
        &pod_cg,
        dest,
        Duration::from_secs(20),
    );
    let before = per_packet_count(&agent.pin_dir);
    let replies = request_in(client_ns, Some(&pod_cg), Proto::Tcp, dest, 30);
    let mut seen = BTreeSet::new();
    for r in &replies {
        assert!(r.ok, "{r:?}");
        assert_eq!(
            r.seen.rsplit_once(':').map(|(ip, _)| ip),
            Some(client.as_str()),
            "the backend sees the pod: {r:?}"
        );
        assert_eq!(r.peer, dest.to_string(), "{r:?}");
        seen.insert(r.backend.clone());
    }
    // Random over three backends: one missing from 30 has probability 3 (2/3)^30.
    let cluster: BTreeSet<String> = ["a-pod-2", "a-pod-3", "b-pod-1"].map(String::from).into();
    assert_eq!(seen, cluster, "the cluster set: {replies:?}");
    assert!(
        per_packet_count(&agent.pin_dir) >= before + 30,
        "the pod's connects were not left to tc"
    );
    assert_verified(&tb, &agent, &node_name, "etp-local-external-ip");
}

/// Over an overlay whose devices have no link-layer header (Calico's ipip, WireGuard): the
/// pod's flows translated per packet to b-pod-1 leave through the overlay device with the
/// pod's own address, and b-pod-1's replies come back there, where `tc_ingress_l3` translates
/// them back to the ClusterIP before they reach the pod.
#[test]
fn l3_overlay_a_pod_translated_per_packet_reaches_a_remote_backend() {
    if !privileged() {
        return;
    }
    let (tb, mut agent, (_kubepods, pod_cg)) = meshed_testbed_on(
        Testbed::with_l3_overlay(&[3, 1], Shape::Ptp),
        Some("disabled"),
        &[],
        "",
    );
    let local = &tb.nodes[0].pods;
    let remote = &tb.nodes[1];
    // b-pod-1 on node b, as its slice says in a cluster: the agent learns the overlay device
    // from the route to it.
    let pos = agent.log_position();
    for (name, service, family, addrs) in [
        (
            "web-1",
            "web",
            "IPv4",
            [
                local[1].ip4.to_string(),
                local[2].ip4.to_string(),
                remote.pods[0].ip4.to_string(),
            ],
        ),
        (
            "web6-1",
            "web6",
            "IPv6",
            [
                local[1].ip6.to_string(),
                local[2].ip6.to_string(),
                remote.pods[0].ip6.to_string(),
            ],
        ),
    ] {
        let eps = [
            ep(&addrs[0]),
            ep(&addrs[1]),
            Ep {
                node: &remote.name,
                ..ep(&addrs[2])
            },
        ];
        agent.write_manifest(
            &format!("{service}-slice.yaml"),
            &slice_yaml(name, service, family, &[HTTP, DNS], &eps),
        );
    }
    agent.wait_for_log(pos, "synced", Duration::from_secs(20));
    let client_ns = &local[0].ns;
    for (dest, client) in [
        (to(80), local[0].ip4.to_string()),
        (to6(80), local[0].ip6.to_string()),
    ] {
        wait_answered(
            "the pod's ClusterIP answered",
            client_ns,
            &pod_cg,
            dest,
            Duration::from_secs(20),
        );
        let replies = request_in(client_ns, Some(&pod_cg), Proto::Tcp, dest, 30);
        let mut seen = BTreeSet::new();
        for r in &replies {
            assert!(r.ok, "{dest}: {r:?}");
            let ip = r
                .seen
                .rsplit_once(':')
                .map(|(ip, _)| ip.trim_matches(['[', ']']));
            assert_eq!(ip, Some(client.as_str()), "the backend sees the pod: {r:?}");
            assert_eq!(r.peer, dest.to_string(), "{r:?}");
            seen.insert(r.backend.clone());
        }
        // Random over three backends: one missing from 30 has probability 3 (2/3)^30.
        let all: BTreeSet<String> = ["a-pod-2", "a-pod-3", "b-pod-1"].map(String::from).into();
        assert_eq!(seen, all, "{dest}: {replies:?}");
    }
    assert_verified(
        &tb,
        &agent,
        &tb.nodes[0].name,
        "per packet over an L3 overlay",
    );
    tb.assert_no_checksum_errors();
}

/// semantics 12.3: `default/kubernetes` has the apiserver's own address as its endpoint (a
/// host-network process). A pod translated per packet reaches it: tc on the pod's interface
/// hands the flow to the node's stack (only the destination translated) and translates the
/// node's reply back at egress, so the pod sees the ClusterIP answer; the apiserver sees the
/// pod. Both shapes: the reply leaves through the pod's own veth, or through the bridge.
#[test]
fn per_pod_veths_a_pod_translated_per_packet_reaches_a_host_network_backend() {
    per_packet_host_backend(Shape::Ptp);
}

#[test]
fn bridge_a_pod_translated_per_packet_reaches_a_host_network_backend() {
    per_packet_host_backend(Shape::Bridge);
}

fn per_packet_host_backend(shape: Shape) {
    if !privileged() {
        return;
    }
    let (mut tb, agent, (_kubepods, pod_cg)) = meshed_testbed(shape, 3, Some("disabled"), &[], "");
    tb.serve_on_node(0, BACKEND_PORT);
    let node = (tb.nodes[0].ip4, tb.nodes[0].ip6);
    for (name, ip, family, addr) in [
        ("kubernetes", "10.96.0.1", "IPv4", node.0.to_string()),
        ("kubernetes6", "fd00:96::1", "IPv6", node.1.to_string()),
    ] {
        agent.write_manifest(
            &format!("{name}.yaml"),
            &service_yaml(name, &[ip], &[HTTP], ""),
        );
        agent.write_manifest(
            &format!("{name}-slice.yaml"),
            &slice_yaml(&format!("{name}-1"), name, family, &[HTTP], &[ep(addr)]),
        );
    }
    let client_ns = &tb.nodes[0].pods[0].ns;
    let (client, client6) = (tb.nodes[0].pods[0].ip4, tb.nodes[0].pods[0].ip6);
    for (dest, own) in [
        ("10.96.0.1:80", client.to_string()),
        ("[fd00:96::1]:80", client6.to_string()),
    ] {
        let dest: SocketAddr = dest.parse().unwrap();
        wait_answered(
            &format!("{dest} answered"),
            client_ns,
            &pod_cg,
            dest,
            Duration::from_secs(15),
        );
        let before = per_packet_count(&agent.pin_dir);
        for r in request_in(client_ns, Some(&pod_cg), Proto::Tcp, dest, 5) {
            assert!(r.ok, "{dest}: {r:?}");
            assert_eq!(r.backend, "node-a", "{r:?}");
            assert_eq!(
                r.peer,
                dest.to_string(),
                "the pod sees the ClusterIP: {r:?}"
            );
            let ip = r
                .seen
                .rsplit_once(':')
                .map(|(ip, _)| ip.trim_matches(['[', ']']).to_string());
            assert_eq!(ip.as_deref(), Some(own.as_str()), "{r:?}");
        }
        assert!(
            per_packet_count(&agent.pin_dir) >= before + 5,
            "not per packet"
        );
    }
    tb.assert_no_checksum_errors();
}

/// `by_default`: per packet through `--socket-lb-default disabled` rather than the label.
fn per_packet(shape: Shape, by_default: bool) {
    let (label_off, label_back) = if by_default {
        (None, Some("enabled"))
    } else {
        (Some("disabled"), None)
    };
    let flags: &[&str] = if by_default {
        &["--socket-lb-default", "disabled"]
    } else {
        &[]
    };
    if !privileged() {
        return;
    }
    // a-pod-1: the meshed client; a-pod-2, a-pod-3: backends; a-pod-4: a client in a namespace
    // that keeps socket-layer translation.
    // b-pod-1, on node b (no agent there): a backend elsewhere.
    let (tb, mut agent, (_kubepods, pod_cg)) = meshed_testbed(shape, 4, label_off, flags, "");
    let node_name = tb.nodes[0].name.clone();
    let (client, client6) = (tb.nodes[0].pods[0].ip4, tb.nodes[0].pods[0].ip6);
    let client_ns = &tb.nodes[0].pods[0].ns;
    let backends: BTreeSet<String> = ["a-pod-2", "a-pod-3", "b-pod-1"].map(String::from).into();
    let meshed = |proto: Proto, port: u16, count: usize| {
        request_in(client_ns, Some(&pod_cg), proto, to(port), count)
    };
    wait_answered(
        "the meshed pod's ClusterIP answered",
        client_ns,
        &pod_cg,
        to(80),
        Duration::from_secs(20),
    );

    // Per packet: the connect() is left alone (counted as per_packet), tc on the pod's veth
    // translates, the backend sees the pod's own address (no masquerading for pod to
    // ClusterIP, semantics 7.12) and the client sees the ClusterIP as its peer.
    let before = per_packet_count(&agent.pin_dir);
    // The address the backends see: the pod's own, or on a bridge the node's bridge address.
    let bridge = |v6: bool| {
        tb.nodes[0]
            .ns
            .ip(&[if v6 { "-6" } else { "-4" }, "-br", "addr", "show", "br0"])
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.split('/').next())
            .map(str::to_string)
            .expect("br0 has an address")
    };
    // Local backends on a bridge see the bridge's address; the others the pod's own.
    let (bridged4, bridged6) = match shape {
        Shape::Bridge => (bridge(false), bridge(true)),
        _ => (client.to_string(), client6.to_string()),
    };
    let (source4, source6) = (client.to_string(), client6.to_string());
    for (proto, dest, source, bridged) in [
        (Proto::Tcp, to(80), &source4, &bridged4),
        (Proto::Udp, to(53), &source4, &bridged4),
        (Proto::Tcp, to6(80), &source6, &bridged6),
        (Proto::Udp, to6(53), &source6, &bridged6),
    ] {
        let replies = request_in(client_ns, Some(&pod_cg), proto, dest, 30);
        let mut seen = BTreeSet::new();
        for r in &replies {
            assert!(r.ok, "{proto:?} {dest}: {r:?}");
            assert!(backends.contains(&r.backend), "{r:?}");
            let ip = r
                .seen
                .rsplit_once(':')
                .map(|(ip, _)| ip.trim_matches(['[', ']']));
            let want = if r.backend.starts_with("a-") {
                bridged
            } else {
                source
            };
            assert_eq!(ip, Some(want.as_str()), "{dest}: {r:?}");
            assert_eq!(r.peer, dest.to_string(), "{r:?}");
            seen.insert(r.backend.clone());
        }
        // Random over three backends: one of them missing from 30 has probability 3 (2/3)^30,
        // about 1.5e-5.
        assert_eq!(seen, backends, "{proto:?} {dest} not balanced: {replies:?}");
    }
    assert!(
        per_packet_count(&agent.pin_dir) >= before + 120,
        "connects of the meshed pod not left to tc"
    );
    // The operator's view: `services` lists the per-packet namespace, `explain` (with the
    // source, to know the client pod by its address) says which path the client takes.
    let cli = |args: &[&str]| -> serde_json::Value {
        let out = cli_in_node(&tb, &agent, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let services = cli(&["services", "-o", "json"]);
    assert_eq!(
        services["perPacketNamespaces"],
        serde_json::json!([{"namespace": "mesh", "pods": 1}]),
        "{services}"
    );
    let manifests = agent.manifests.display().to_string();
    let frontend = format!("{VIP}:80/TCP");
    let explained = cli(&[
        "explain",
        &client.to_string(),
        &frontend,
        "--manifests",
        &manifests,
        "--hostname-override",
        &node_name,
        "-o",
        "json",
    ]);
    assert_eq!(
        explained["perPacket"],
        serde_json::json!({"namespace": "mesh", "pod": "client"}),
        "{explained}"
    );
    assert_eq!(explained["verdict"], "translated", "{explained}");

    // A port the ClusterIP does not serve is rejected per packet too (semantics 3.12).
    let r = meshed(Proto::Tcp, 81, 1);
    assert!(!r[0].ok && r[0].error.contains("refused"), "{r:?}");

    // A mesh: the pod's own nftables redirect its outbound TCP to port 80 to a sidecar, which
    // reads the original destination and connects on (its socket marked, as meshes exclude
    // their own traffic).
    client_ns.exec("nft", &["add", "table", "ip", "mesh"]);
    client_ns.exec(
        "nft",
        &[
            "add", "chain", "ip", "mesh", "out", "{", "type", "nat", "hook", "output", "priority",
            "-100", ";", "}",
        ],
    );
    client_ns.exec(
        "nft",
        &[
            "add", "rule", "ip", "mesh", "out", "meta", "mark", MARK, "return",
        ],
    );
    client_ns.exec(
        "nft",
        &[
            "add", "rule", "ip", "mesh", "out", "tcp", "dport", "80", "redirect", "to", ":15001",
        ],
    );
    let log = std::env::temp_dir().join(format!("{}-sidecar.log", tb.id));
    let _ = std::fs::remove_file(&log);
    let log_arg = log.display().to_string();
    let _sidecar = ChildGuard::spawn_ready(
        "sidecar",
        testhost_in(
            client_ns,
            Some(&pod_cg),
            &["sidecar", "15001", MARK, &log_arg],
        ),
    );
    for r in meshed(Proto::Tcp, 80, 10) {
        assert!(r.ok, "through the sidecar: {r:?}");
        assert!(backends.contains(&r.backend), "{r:?}");
    }
    let originals = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let lines: Vec<&str> = originals.lines().collect();
    assert_eq!(lines.len(), 10, "{originals}");
    assert!(
        lines.iter().all(|l| *l == to(80).to_string()),
        "the sidecar saw a backend, not the ClusterIP: {originals}"
    );

    // A pod of another namespace keeps socket-layer translation.
    let plain = &tb.nodes[0].pods[3].ns;
    let before = per_packet_count(&agent.pin_dir);
    for r in tb.request_from(plain, true, Proto::Tcp, to(80), 10) {
        assert!(r.ok && backends.contains(&r.backend), "{r:?}");
    }
    assert_eq!(per_packet_count(&agent.pin_dir), before);

    // A pod that joins the namespace later: its Pod object first, its cgroup only afterwards
    // (kubelet creates it when it starts the pod); per packet once the cgroup exists.
    let late_ip = tb.nodes[0].pods[3].ip4;
    let from = agent.log_position();
    agent.write_manifest(
        "late.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: late, namespace: mesh, uid: {LATE_UID}}}\nspec: {{nodeName: {node_name}}}\nstatus: {{podIP: {late_ip}, podIPs: [{{ip: {late_ip}}}]}}\n"
        ),
    );
    agent.wait_for_log(
        from,
        "no cgroup yet for 1 pod(s) (mesh/late)",
        Duration::from_secs(20),
    );
    // The metric says so too: one pod waiting for its cgroup, one programmed.
    let metric = |series: &str| {
        let (_, body) = agent.get(agent.metrics_port, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{series} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    poll_until(
        "socket_lb_off_pods by state",
        Duration::from_secs(10),
        || {
            let waiting = metric("kube_bpf_proxy_socket_lb_off_pods{state=\"waiting\"}");
            let programmed = metric("kube_bpf_proxy_socket_lb_off_pods{state=\"programmed\"}");
            if (waiting, programmed) == (Some(1.0), Some(1.0)) {
                Ok(())
            } else {
                Err(format!("waiting {waiting:?}, programmed {programmed:?}"))
            }
        },
    );
    let rel = tb
        .cgroup
        .path
        .strip_prefix(cgroup2_root())
        .unwrap()
        .display()
        .to_string();
    let late_cg = TestCgroup::new(&format!("{rel}/kubepods/pod{LATE_UID}"));
    agent.wait_for_log(
        from,
        "socket-layer translation off for 2 pod(s) in namespaces [mesh]",
        Duration::from_secs(20),
    );
    let before = per_packet_count(&agent.pin_dir);
    for r in request_in(plain, Some(&late_cg), Proto::Tcp, to(80), 10) {
        assert!(r.ok && backends.contains(&r.backend), "{r:?}");
    }
    assert!(per_packet_count(&agent.pin_dir) >= before + 10);
    drop(late_cg);

    // The mesh gone, connections from fixed ports, per packet and closed again: the same ports
    // connect once more when the socket layer translates (below).
    client_ns.exec("nft", &["delete", "table", "ip", "mesh"]);
    let before = per_packet_count(&agent.pin_dir);
    for r in tcp_from_ports(client_ns, Some(&pod_cg), to(80), REUSED_PORTS, 30) {
        assert!(r.ok && backends.contains(&r.backend), "{r:?}");
    }
    assert!(per_packet_count(&agent.pin_dir) >= before + 30);

    // The label removed (or `enabled` over a disabled default): back at the socket layer.
    let from = agent.log_position();
    agent.write_manifest("ns.yaml", &namespace_yaml(label_back));
    agent.wait_for_log(
        from,
        "socket-layer translation off for 0 pod(s)",
        Duration::from_secs(20),
    );
    // Those flows' entries are still tracked (closed flows keep theirs for 10 s after their
    // last packet): without them the step below would test nothing.
    let held = replies_to(&agent.pin_dir, client, REUSED_PORTS..REUSED_PORTS + 30);
    assert!(held > 0, "no tracked reply entry of the fixed ports left");
    let before = per_packet_count(&agent.pin_dir);
    for r in meshed(Proto::Tcp, 80, 10) {
        assert!(r.ok && backends.contains(&r.backend), "{r:?}");
    }
    // The ports of the per-packet connections above, now connected at the socket layer
    // straight to a backend: for about one in three, the backend an earlier flow from the port
    // was translated to. That flow is closed; its replies' translation must not catch the new
    // connection's (a flake of CI's, when the kernel happened to pick such a port).
    for r in tcp_from_ports(client_ns, Some(&pod_cg), to(80), REUSED_PORTS, 30) {
        assert!(r.ok && backends.contains(&r.backend), "{r:?}");
    }
    assert_eq!(per_packet_count(&agent.pin_dir), before);
    agent.assert_running();
    tb.assert_no_checksum_errors();
}

/// semantics 3.12: a pod translated per packet that opens a connection to an address inside a
/// ServiceCIDR that no Service has is dropped at tc on its interface (no answer: the connect
/// times out, as under nftables mode), while its Services keep answering; `verify` sees no
/// drift with the ServiceCIDR's ranges programmed.
#[test]
fn a_pod_translated_per_packet_is_dropped_at_an_unallocated_service_address() {
    if !privileged() {
        return;
    }
    let (tb, mut agent, (_kubepods, pod_cg)) =
        meshed_testbed(Shape::Ptp, 3, Some("disabled"), &[], "");
    let node_name = tb.nodes[0].name.clone();
    let pos = agent.log_position();
    agent.write_manifest(
        "cidrs.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\n\
         spec: {cidrs: [10.96.0.0/16, 'fd00:96::/112']}\n",
    );
    agent.wait_for_log(pos, "synced", Duration::from_secs(20));
    let client_ns = &tb.nodes[0].pods[0].ns;
    let vip: SocketAddr = to(80);
    wait_answered(
        "the pod's Service",
        client_ns,
        &pod_cg,
        vip,
        Duration::from_secs(20),
    );
    let unallocated: SocketAddr = "10.96.99.99:80".parse().unwrap();
    let r = request_in(client_ns, Some(&pod_cg), Proto::Tcp, unallocated, 1);
    assert!(!r[0].ok, "{r:?}");
    assert_ne!(
        r[0].errno,
        Some(libc::EPERM),
        "left to tc, not refused at the socket: {r:?}"
    );
    assert!(datapath_events(&agent, "service_ip_unallocated") >= 1);
    let (_, metrics) = agent.get(agent.metrics_port, "/metrics");
    assert!(
        metrics.contains(
            "kube_bpf_proxy_drops_total{hook=\"tc_ingress\",reason=\"service_ip_unallocated\"}"
        ),
        "{metrics}"
    );
    assert_verified(&tb, &agent, &node_name, "service-cidrs");
}
