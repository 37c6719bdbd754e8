//! XDP and direct server return on the two-node testbed (issue #6): NodePort and load balancer
//! traffic from an external client to a backend on node-b is translated at node-a's XDP hook;
//! in DSR mode node-b answers the client directly with the frontend's address, and the backend
//! sees the real client. Traffic that is no Service passes untouched.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use tests::{Testbed, harness::cgroup::TestCgroup, harness::topology::Proto, poll_until};

const LB_IP: &str = "10.96.200.1";

fn web_yaml() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  ports:
  - {{name: http, port: 80, nodePort: 30080, protocol: TCP}}
  - {{name: dns, port: 53, nodePort: 30053, protocol: UDP}}
status:
  loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}
"
    )
}

/// Service `web6`: IPv6 only, NodePorts and a load balancer IP.
const WEB6_YAML: &str = "apiVersion: v1
kind: Service
metadata: {name: web6, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: \"fd00:96::10\"
  clusterIPs: [\"fd00:96::10\"]
  ipFamilies: [IPv6]
  ports:
  - {name: http, port: 80, nodePort: 30080, protocol: TCP}
  - {name: dns, port: 53, nodePort: 30053, protocol: UDP}
status:
  loadBalancer: {ingress: [{ip: \"fd00:96::201\"}]}
";

/// `web6` and its EndpointSlice: node-b's pod.
fn web6_manifests(agent: &tests::Agent, tb: &Testbed) {
    agent.write_manifest("web6.yaml", WEB6_YAML);
    agent.write_manifest(
        "web6-slice.yaml",
        &slice_yaml(
            "web6-1",
            "web6",
            "IPv6",
            &[HTTP, DNS],
            &[Ep {
                addr: tb.nodes[1].pods[0].ip6.to_string(),
                node: "node-b",
                conditions: "",
            }],
        ),
    );
}

/// Both nodes run the agent in DSR mode; `web`'s only backend is node-b's pod.
#[test]
fn dsr_the_backend_node_answers_the_client_directly() {
    if !privileged() {
        return;
    }
    dsr_end_to_end(false, true);
}

/// The same with XDP off: node-a adds the option at tc.
#[test]
fn dsr_at_tc_the_backend_node_answers_the_client_directly() {
    if !privileged() {
        return;
    }
    dsr_end_to_end(false, false);
}

/// IPv6 at XDP (issue #23): NodePort and load balancer flows over IPv6 from the external
/// client to node-b's pod are balanced, masqueraded and sent back out at node-a's XDP hook,
/// and so are their replies, over TCP and UDP.
#[test]
fn ipv6_flows_to_a_remote_backend_are_translated_at_xdp() {
    // semantics 4.1, 7.5, 7.13: NodePorts on the node's IPv6 addresses and IPv6 load balancer
    // IPs, externalTrafficPolicy Cluster: masqueraded to a node-a address.
    if !privileged() {
        return;
    }
    let mut tb = Testbed::new(&[1, 1]);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    web6_manifests(&agent, &tb);
    agent.start();
    agent.wait_for_log(
        0,
        "XDP attached to eth0",
        std::time::Duration::from_secs(10),
    );
    let frontends: Vec<(Proto, SocketAddr)> = vec![
        (Proto::Tcp, "[fd00:77::1]:30080".parse().unwrap()),
        (Proto::Udp, "[fd00:77::1]:30053".parse().unwrap()),
        (Proto::Tcp, "[fd00:96::201]:80".parse().unwrap()),
        (Proto::Udp, "[fd00:96::201]:53".parse().unwrap()),
    ];
    for (proto, to) in &frontends {
        wait_answered(&tb, *proto, *to);
        for r in tb.request_ext(*proto, *to, 5) {
            assert!(r.ok, "{to}: {r:?}");
            assert_eq!(r.backend, "b-pod-1", "{r:?}");
            // Masqueraded to node-a's LAN address; the client sees the frontend.
            assert!(r.seen.starts_with("[fd00:77::1]:"), "{to}: {r:?}");
            assert_eq!(r.peer.parse::<SocketAddr>().unwrap(), *to, "{r:?}");
        }
    }
    // Only IPv6 traffic was sent: XDP forwarded it.
    assert!(datapath_events(&agent, "xdp_forwarded") > 0);
    tb.assert_no_checksum_errors();

    // XDP remembers next hops within a route generation: a neighbour change on node-a moves
    // it on at once (the agent follows the node's netlink events).
    let before = route_generation(&agent);
    tb.nodes[0].ns.ip(&[
        "-6",
        "neigh",
        "replace",
        "fd00:77::99",
        "lladdr",
        "02:00:00:00:99:99",
        "dev",
        "eth0",
    ]);
    tests::poll_until(
        "LB_ROUTE_GEN moved on by a neighbour change",
        std::time::Duration::from_secs(5),
        || match route_generation(&agent) {
            now if now != before => Ok(()),
            now => Err(format!("still {now}")),
        },
    );
    for (proto, to) in &frontends {
        for r in tb.request_ext(*proto, *to, 3) {
            assert!(r.ok, "{to}: {r:?}");
        }
    }

    // `--xdp` changed between two runs of the agent: the program pinned in generic mode (the
    // default on a veth) is attached again in driver mode, and back, tc serving meanwhile.
    for (mode, was) in [("driver", "generic"), ("generic", "driver")] {
        agent.kill();
        let args = &mut agent.extra_args;
        if let Some(i) = args.iter().position(|a| a == "--xdp") {
            args.drain(i..i + 2);
        }
        args.extend(["--xdp".to_string(), mode.to_string()]);
        let from = agent.log_position();
        agent.start();
        agent.wait_for_log(
            from,
            &format!("XDP on eth0: attached in {was} mode, {mode} asked for"),
            Duration::from_secs(20),
        );
        agent.wait_for_log(
            from,
            &format!("XDP attached to eth0 in {mode} mode"),
            Duration::from_secs(10),
        );
    }
    let forwarded = datapath_events(&agent, "xdp_forwarded");
    for (proto, to) in &frontends {
        wait_answered(&tb, *proto, *to);
        for r in tb.request_ext(*proto, *to, 3) {
            assert!(r.ok, "{to}: {r:?}");
        }
    }
    poll_until(
        "XDP forwards again",
        Duration::from_secs(10),
        || match datapath_events(&agent, "xdp_forwarded") {
            n if n > forwarded => Ok(()),
            n => Err(format!("{n} forwarded, {forwarded} before")),
        },
    );
}

/// The route generation in `agent`'s `LB_ROUTE_GEN`, read with bpftool.
fn route_generation(agent: &tests::Agent) -> u64 {
    let all = pinned_entries(agent, "LB_ROUTE_GEN");
    all.first()
        .and_then(|e| e["value"].as_u64())
        .unwrap_or_else(|| panic!("LB_ROUTE_GEN: {all:?}"))
}

/// Both nodes in DSR mode (issue #6; IPv6: issue #23); node-a balances NodePort and load
/// balancer flows (`v6`: IPv6, else IPv4) to node-b's pod without masquerading, the frontend in
/// an IPv4 option or an IPv6 Destination Options header, at XDP (`xdp`) or at tc (XDP off);
/// node-b learns it and its replies go straight to the client from the frontend's address.
/// The backend sees the client.
fn dsr_end_to_end(v6: bool, xdp: bool) {
    let mut tb = Testbed::new(&[1, 1]);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let cgroup_b = TestCgroup::new(&format!("{}-b", tb.id));
    let mut a_args = vec!["--nodeport-mode", "dsr"];
    if !xdp {
        a_args.extend(["--xdp", "off"]);
    }
    let mut a = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &a_args);
    let mut b = node_agent(
        &tb,
        1,
        &format!("{}-b", tb.id),
        &cgroup_b.path,
        &["--nodeport-mode", "dsr"],
    );
    for agent in [&mut a, &mut b] {
        if v6 {
            web6_manifests(agent, &tb);
        } else {
            agent.write_manifest("web.yaml", &web_yaml());
            agent.write_manifest(
                "web-slice.yaml",
                &slice_yaml(
                    "web-1",
                    "web",
                    "IPv4",
                    &[HTTP, DNS],
                    &[Ep {
                        addr: tb.nodes[1].pods[0].ip4.to_string(),
                        node: "node-b",
                        conditions: "",
                    }],
                ),
            );
        }
        agent.start();
    }
    b.wait_for_log(0, "DSR peers:", Duration::from_secs(10));
    let (node, lb, client) = if v6 {
        ("[fd00:77::1]", "[fd00:96::201]", "[fd00:77::100]:")
    } else {
        ("192.168.77.1", LB_IP, "192.168.77.100:")
    };
    if v6 {
        tb.ext.ip(&[
            "-6",
            "route",
            "add",
            "fd00:77::1/128",
            "dev",
            "eth0",
            "mtu",
            "1400",
        ]);
    } else {
        tb.ext.ip(&[
            "route",
            "add",
            "192.168.77.1/32",
            "dev",
            "eth0",
            "mtu",
            "1400",
        ]);
    }
    let frontends: Vec<(Proto, SocketAddr)> = vec![
        (Proto::Tcp, format!("{node}:30080").parse().unwrap()),
        (Proto::Udp, format!("{node}:30053").parse().unwrap()),
        (Proto::Tcp, format!("{lb}:80").parse().unwrap()),
        (Proto::Udp, format!("{lb}:53").parse().unwrap()),
    ];
    for (proto, to) in &frontends {
        // Answered from the frontend: learnt at node-b.
        poll_until(
            &format!("{to} answered from itself"),
            Duration::from_secs(10),
            || {
                let r = tb.request_ext(*proto, *to, 1);
                match r.first() {
                    Some(r) if r.ok && r.peer.parse::<SocketAddr>().ok() == Some(*to) => Ok(()),
                    _ => Err(format!("{r:?}")),
                }
            },
        );
        let mut replies = tb.request_ext(*proto, *to, 5);
        // A datagram larger than the MTU (issue #23), and its answer, in fragments: the first
        // carries the option (IPv6: before the fragment header), the rest follow its flow.
        // The option needs MTU headroom (README): the client's route to the node port leaves
        // 100 bytes of it.
        if *proto == Proto::Udp && to.port() == 30053 {
            replies.push(tests::harness::topology::udp_sized(&tb.ext, *to, 3000));
        }
        // Without that headroom (the load balancer IP; MTU 1500 on every link), a datagram
        // the option would make too big is answered as a router answers it (issue #23): ICMP
        // "fragmentation needed" / ICMPv6 "packet too big" naming the MTU less the option, so
        // the client's kernel lowers its path MTU to the frontend. Its later datagrams fit
        // with the option, a large one in fragments too.
        if *proto == Proto::Udp && to.port() == 53 {
            let growth: usize = if v6 { 40 } else { 12 };
            let headers: usize = if v6 { 48 } else { 28 };
            let r = tests::harness::topology::udp_unfragmented(&tb.ext, *to, 1500 - headers);
            assert!(!r.ok, "{to}: too big with the option, not delivered: {r:?}");
            assert_eq!(r.errno, Some(libc::EMSGSIZE), "{to}: {r:?}");
            assert_eq!(
                r.mtu,
                Some(1500 - growth as u32),
                "{to}: the client's path MTU: {r:?}"
            );
            let r =
                tests::harness::topology::udp_unfragmented(&tb.ext, *to, 1500 - growth - headers);
            assert!(r.ok, "{to}: {r:?}");
            replies.push(r);
            replies.push(tests::harness::topology::udp_sized(&tb.ext, *to, 3000));
        }
        for r in replies {
            assert!(r.ok, "{to}: {r:?}");
            assert_eq!(r.backend, "b-pod-1", "{r:?}");
            // No masquerading: the backend sees the client; the client sees the frontend.
            assert!(r.seen.starts_with(client), "{to}: {r:?}");
            assert_eq!(r.peer.parse::<SocketAddr>().unwrap(), *to, "{r:?}");
        }
    }
    assert!(datapath_events(&a, "dsr_sent") > 0);
    // The datagram too big with the option was answered, counted.
    assert!(datapath_events(&a, "dsr_too_big") > 0);
    if xdp {
        assert!(datapath_events(&a, "xdp_forwarded") > 0);
    }
    assert!(datapath_events(&b, "dsr_learned") > 0);
    tb.assert_no_checksum_errors();
}

#[test]
fn dsr_over_ipv6_at_xdp_the_backend_node_answers_the_client_directly() {
    if !privileged() {
        return;
    }
    dsr_end_to_end(true, true);
}

#[test]
fn dsr_over_ipv6_at_tc_the_backend_node_answers_the_client_directly() {
    if !privileged() {
        return;
    }
    dsr_end_to_end(true, false);
}

#[test]
fn traffic_that_is_no_service_passes_xdp_untouched() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::new(&[1, 1]);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    tb.serve_on_node(0, 9000);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    agent.write_manifest("web.yaml", &web_yaml());
    agent.start();
    agent.wait_for_log(
        0,
        "XDP attached to eth0",
        std::time::Duration::from_secs(10),
    );
    for proto in [Proto::Tcp, Proto::Udp] {
        // To the node itself.
        for to in ["192.168.77.1:9000", "[fd00:77::1]:9000"] {
            let r = tb.request_ext(proto, to.parse().unwrap(), 3);
            assert!(r.iter().all(|r| r.ok && r.backend == "node-a"), "{r:?}");
            assert!(
                r.iter()
                    .all(|r| r.seen.contains("77::100") || r.seen.starts_with("192.168.77.100:"))
            );
        }
        // Across the nodes, pod to pod, through node-a's external interface.
        let to: SocketAddr = format!("{}:{BACKEND_PORT}", tb.nodes[1].pods[0].ip4)
            .parse()
            .unwrap();
        let r = tb.request_from(&tb.nodes[0].pods[0].ns, false, proto, to, 3);
        let from = tb.nodes[0].pods[0].ip4.to_string();
        assert!(
            r.iter()
                .all(|r| r.ok && r.backend == "b-pod-1" && r.seen.starts_with(&from)),
            "{r:?}"
        );
    }
    tb.assert_no_checksum_errors();
}

/// The client port of forged packets: the reply entry they would teach is keyed by it.
const SPOOF_PORT: u16 = 4444;

/// One's-complement sum of `bytes` as 16-bit words.
fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> [u8; 2] {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    (!(s as u16)).to_be_bytes()
}

/// A TCP SYN from the external client (port SPOOF_PORT) to `backend`:8080 whose IPv4 header
/// carries `option`, as hex for `testhost raw4`.
fn forged_syn(backend: std::net::Ipv4Addr, option: &[u8]) -> String {
    assert_eq!(option.len() % 4, 0);
    let src = tests::harness::testbed::EXT_IP4.octets();
    let dst = backend.octets();
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&SPOOF_PORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&BACKEND_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let sum = fold(sum16(&pseudo) + sum16(&tcp));
    tcp[16..18].copy_from_slice(&sum);
    let ihl = (20 + option.len()) / 4;
    let total = (20 + option.len() + tcp.len()) as u16;
    let mut ip = vec![0x40 | ihl as u8, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(option);
    ip.extend_from_slice(&tcp);
    ip.iter().map(|b| format!("{b:02x}")).collect()
}

/// The DSR option as this version writes it: frontend `LB_IP`:80 and sending node `node`.
fn option_v2(node: std::net::Ipv4Addr) -> Vec<u8> {
    let mut o = vec![0x9a, 12, 0, 80];
    o.extend_from_slice(&LB_IP.parse::<std::net::Ipv4Addr>().unwrap().octets());
    o.extend_from_slice(&node.octets());
    o
}

/// The DSR option of earlier versions (no sending node): frontend `LB_IP`:80.
fn option_v1() -> Vec<u8> {
    let mut o = vec![0x9a, 8, 0, 80];
    o.extend_from_slice(&LB_IP.parse::<std::net::Ipv4Addr>().unwrap().octets());
    o
}

/// Sends forged SYNs from the external client to `backend` on node `node` (a route through
/// that node), with the option of earlier versions and with this version's naming node-a as
/// the sender.
fn send_forged(tb: &Testbed, node: usize, backend: std::net::Ipv4Addr) {
    let via = tb.nodes[node].ip4.to_string();
    tb.ext
        .ip(&["route", "replace", &format!("{backend}/32"), "via", &via]);
    let workspace = tests::harness::process::workspace_binary("testhost");
    let workspace = workspace.to_str().unwrap();
    for option in [option_v1(), option_v2(tb.nodes[0].ip4)] {
        for _ in 0..3 {
            tb.ext
                .exec(workspace, &["raw4", &forged_syn(backend, &option)]);
        }
    }
}

/// Reply entries of `agent`'s IPv4 connection tracking whose key is (`backend`:8080 →
/// client:SPOOF_PORT), read with bpftool.
fn spoofed_entries(agent: &tests::Agent, backend: std::net::Ipv4Addr) -> Vec<serde_json::Value> {
    let want: Vec<u8> = backend.octets().to_vec();
    ct4_entries(agent)
        .into_iter()
        .filter(|e| {
            let k = &e["key"];
            let saddr: Vec<u8> = k["saddr"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|b| b.as_u64())
                        .map(|b| b as u8)
                        .collect()
                })
                .unwrap_or_default();
            saddr == want && k["dport"].as_u64() == Some(u64::from(SPOOF_PORT))
        })
        .collect()
}

/// Writes `web` with `backend` (on node-b) as its only endpoint.
fn web_on_node_b(agent: &tests::Agent, backend: &str) {
    agent.write_manifest("web.yaml", &web_yaml());
    agent.write_manifest(
        "web-slice.yaml",
        &slice_yaml(
            "web-1",
            "web",
            "IPv4",
            &[HTTP, DNS],
            &[Ep {
                addr: backend.to_string(),
                node: "node-b",
                conditions: "",
            }],
        ),
    );
}

/// Hardening item 1: a node in SNAT mode (the default) learns nothing from packets carrying
/// the DSR option, whoever sends them: no reply entry appears, and the packets are counted as
/// refused.
/// Two nodes in DSR mode, each with its agent (node-b's with `extra_b` too), both serving the
/// Service whose backend is node-b's pod; started. Returns the testbed, node-b's socket-hook
/// cgroup and the agents of node-a and node-b.
/// `window_ns` of `client`'s entry in node `agent`'s `LB_DSR_BUDGET` (0 when it has none).
fn budget_window_ns(agent: &tests::Agent, client: [u8; 4]) -> u64 {
    let data = aya::maps::MapData::from_pin(agent.pin_dir.join("LB_DSR_BUDGET")).expect("pin");
    let map: aya::maps::HashMap<_, [u8; 4], proxy_common::dsr::DsrBudget> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("LB_DSR_BUDGET");
    map.get(&client, 0).map(|b| b.window_ns).unwrap_or(0)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec the call fills in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn dsr_nodes(extra_b: &[&str]) -> (Testbed, TestCgroup, tests::Agent, tests::Agent) {
    let mut tb = Testbed::new(&[1, 1]);
    tb.serve(1, 0, BACKEND_PORT);
    let cgroup_b = TestCgroup::new(&format!("{}-b", tb.id));
    let dsr = ["--nodeport-mode", "dsr"];
    let b_args: Vec<&str> = dsr.iter().chain(extra_b).copied().collect();
    let mut a = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &dsr);
    let mut b = node_agent(&tb, 1, &format!("{}-b", tb.id), &cgroup_b.path, &b_args);
    let backend = tb.nodes[1].pods[0].ip4.to_string();
    for agent in [&mut a, &mut b] {
        web_on_node_b(agent, &backend);
        agent.start();
    }
    (tb, cgroup_b, a, b)
}

#[test]
fn dsr_option_in_snat_mode_creates_no_conntrack_entry() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::new(&[1, 1]);
    tb.serve(1, 0, BACKEND_PORT);
    let cgroup_b = TestCgroup::new(&format!("{}-b", tb.id));
    let mut b = node_agent(&tb, 1, &format!("{}-b", tb.id), &cgroup_b.path, &[]);
    let backend = tb.nodes[1].pods[0].ip4;
    web_on_node_b(&b, &backend.to_string());
    b.start();
    b.wait_for_log(0, "synced:", std::time::Duration::from_secs(10));
    send_forged(&tb, 1, backend);
    assert!(datapath_events(&b, "dsr_refused") > 0);
    let learnt = spoofed_entries(&b, backend);
    assert!(
        learnt.is_empty(),
        "forged options taught node-b: {learnt:?}"
    );
}

/// Hardening item 1: in DSR mode, packets carrying the option from a host that is no node (the
/// external client, even naming node-a as the sender) teach nothing, and are counted as
/// refused; DSR between the nodes still works afterwards.
#[test]
fn dsr_option_from_a_non_node_source_creates_no_conntrack_entry() {
    if !privileged() {
        return;
    }
    let (tb, _cgroup_b, _a, mut b) = dsr_nodes(&[]);
    let backend = tb.nodes[1].pods[0].ip4;
    b.wait_for_log(
        0,
        "DSR peers: 1 node addresses",
        std::time::Duration::from_secs(10),
    );
    b.wait_for_log(0, "synced:", std::time::Duration::from_secs(10));
    send_forged(&tb, 1, backend);
    assert!(datapath_events(&b, "dsr_refused") > 0);
    let learnt = spoofed_entries(&b, backend);
    assert!(
        learnt.is_empty(),
        "forged options taught node-b: {learnt:?}"
    );
    // The real thing still works: node-a balances, node-b learns and answers directly.
    let to: SocketAddr = format!("{LB_IP}:80").parse().unwrap();
    wait_answered(&tb, Proto::Tcp, to);
    for r in tb.request_ext(Proto::Tcp, to, 3) {
        assert!(r.ok, "{r:?}");
        assert_eq!(r.backend, "b-pod-1");
        assert!(r.seen.starts_with("192.168.77.100:"), "{r:?}");
        assert_eq!(r.peer.parse::<SocketAddr>().unwrap(), to, "{r:?}");
    }
    assert!(datapath_events(&b, "dsr_learned") > 0);
}

/// Hardening item 1: what one client address can make a node learn is bounded
/// (`--dsr-learn-budget` new entries per second): past it, further new flows of that client
/// are not learnt (their replies go out untranslated and are lost) and are counted.
#[test]
fn dsr_learning_is_bounded_per_client_address() {
    if !privileged() {
        return;
    }
    let (tb, _cgroup_b, _a, mut b) = dsr_nodes(&["--dsr-learn-budget", "2"]);
    let to: SocketAddr = format!("{LB_IP}:53").parse().unwrap();
    // Until node-b knows node-a, it refuses the option and every reply leaves untranslated.
    b.wait_for_log(
        0,
        "DSR peers: 1 node addresses",
        std::time::Duration::from_secs(10),
    );
    poll_until("a reply from the frontend", Duration::from_secs(10), || {
        let r = tb.request_ext(Proto::Udp, to, 1);
        match r.first() {
            Some(r) if r.ok && r.peer.parse::<SocketAddr>().ok() == Some(to) => Ok(()),
            _ => Err(format!("{r:?}")),
        }
    });
    // The burst starts in a window of its own: the one the probes above opened has ended.
    let client = tests::harness::testbed::EXT_IP4.octets();
    poll_until(
        "the client's budget window to end",
        Duration::from_secs(5),
        || {
            let opened = budget_window_ns(&b, client);
            let now = monotonic_ns();
            if now.saturating_sub(opened) > proxy_common::dsr::DSR_BUDGET_WINDOW_NS {
                Ok(())
            } else {
                Err(format!("window opened {opened}, now {now}"))
            }
        },
    );
    // Each request is a new flow (a new socket); only two per second are learnt. The others'
    // replies leave node-b untranslated (from the backend's own address, which this
    // unconnected client accepts too) or not at all.
    let started = std::time::Instant::now();
    let replies = tb.request_ext(Proto::Udp, to, 6);
    let took = started.elapsed();
    let answered = replies
        .iter()
        .filter(|r| r.ok && r.peer.parse::<SocketAddr>().ok() == Some(to))
        .count();
    if took < Duration::from_secs(1) {
        // One window: exactly the budget.
        assert_eq!(answered, 2, "{replies:?}");
    } else {
        // A slow machine: the burst spanned windows, each learning at most the budget.
        let windows = took.as_secs() as usize + 1;
        assert!(
            (1..=2 * windows).contains(&answered),
            "{took:?}: {replies:?}"
        );
    }
    assert!(datapath_events(&b, "dsr_budget_exceeded") > 0);
}
