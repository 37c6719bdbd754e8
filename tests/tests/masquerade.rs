//! Masquerading source ports and the node's own sockets (hardening item 3): a masqueraded flow
//! leaves the node from a node address, as the node's own connections do, so its source port
//! must never be one the kernel hands to the node's sockets (`net.ipv4.ip_local_port_range`),
//! or both can claim the same tuple towards a backend.

mod common;

use std::{io::Write as _, time::Duration};

use common::*;
use tests::{
    Testbed,
    harness::{
        process::{Placement, command_in, output_within, parse_replies, workspace_binary},
        topology::{Proto, spawn_talking},
    },
};

/// node-a's ephemeral ports in these tests: small, so host sockets can occupy every one.
const EPHEMERAL: (u16, u16) = (40000, 40063);
const NODEPORT: u16 = 30080;

fn nodeport_yaml() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {{name: http, port: 80, nodePort: {NODEPORT}, protocol: TCP}}
"
    )
}

/// `testhost from-ports TO FIRST LAST [hold]` in namespace file `netns`.
fn from_ports(netns: &str, to: &str, hold: bool) -> std::process::Command {
    let (first, last) = (EPHEMERAL.0.to_string(), EPHEMERAL.1.to_string());
    let mut args = vec!["from-ports", to, first.as_str(), last.as_str()];
    if hold {
        args.push("hold");
    }
    command_in(
        &Placement {
            netns,
            cgroup_procs: None,
        },
        &workspace_binary("testhost"),
        &args,
    )
}

/// The port of a `seen` address (`IP:PORT`).
fn port_of(seen: &str) -> u16 {
    seen.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {seen:?}"))
}

/// Host connections on node-a from every one of its ephemeral ports to a backend stay open
/// while the external client reaches the same backend through a NodePort with masquerading,
/// from the very same port numbers: every connection of both kinds is answered, and the
/// backend sees the masqueraded ones come from ports of the masquerading range (61000-65535,
/// the default outside the ephemeral ports), never from one a host socket could hold.
#[test]
fn masquerade_ports_stay_clear_of_the_nodes_own_connections() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::new(&[1]);
    tb.serve(0, 0, BACKEND_PORT);
    let node = &tb.nodes[0];
    node.ns.sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("{} {}", EPHEMERAL.0, EPHEMERAL.1),
    );
    let backend = node.pods[0].ip4;
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    // The agent listens in node-a's namespace: on kube-proxy's own ports there, not on ports
    // picked free in the test's namespace, which may fall inside the narrowed ephemeral range
    // the node's connections below bind one by one.
    agent.metrics_port = 10249;
    agent.health_port = 10256;
    agent.write_manifest("web.yaml", &nodeport_yaml());
    agent.write_manifest(
        "web-slice.yaml",
        &slice_yaml(
            "web-1",
            "web",
            "IPv4",
            &[HTTP],
            &[Ep {
                addr: backend.to_string(),
                node: "node-a",
                conditions: "",
            }],
        ),
    );
    agent.start();
    let line = agent.wait_for_log(0, "masquerading ports", Duration::from_secs(10));
    assert!(
        line.contains("masquerading ports 61000-65535 (ephemeral ports 40000-40063)"),
        "{line}"
    );
    let frontend = format!("{}:{NODEPORT}", node.ip4);
    wait_answered(&tb, Proto::Tcp, frontend.parse().unwrap());

    // The node's own connections, one from each of its ephemeral ports, held open.
    let count = usize::from(EPHEMERAL.1 - EPHEMERAL.0) + 1;
    let cmd = from_ports(&node.ns.path(), &format!("{backend}:{BACKEND_PORT}"), true);
    let (_guard, mut stdin, rx) = spawn_talking(cmd, "host connections from node-a".into());
    let next_round = |what: &str| {
        let lines: Vec<String> = (0..count)
            .map(|i| {
                rx.recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("{what}: answer {i} of {count}: {e}"))
            })
            .collect();
        parse_replies(&lines.join("\n"))
    };
    let host = next_round("host connections");
    for (i, r) in host.iter().enumerate() {
        assert!(r.ok, "host connection {i}: {r:?}");
        assert_eq!(port_of(&r.seen), EPHEMERAL.0 + i as u16, "{r:?}");
    }

    // The external client, from the same port numbers, through the NodePort.
    let out = output_within(
        from_ports(&tb.ext.path(), &frontend, false),
        Duration::from_secs(10 + 3 * count as u64),
    );
    let external = parse_replies(&out);
    assert_eq!(external.len(), count, "{out}");
    for r in &external {
        assert!(r.ok, "external connection: {r:?}");
        assert_eq!(r.backend, "a-pod-1");
        let port = port_of(&r.seen);
        assert!(
            (61000..=65535).contains(&port),
            "masqueraded from port {port}, outside 61000-65535: {r:?}"
        );
    }

    // The node's connections were not disturbed.
    stdin
        .write_all(b"again\n")
        .expect("ask the host connections again");
    for (i, r) in next_round("host connections, again").iter().enumerate() {
        assert!(r.ok, "host connection {i} after the external ones: {r:?}");
    }
}

/// An agent asked for a masquerading range that overlaps the node's ephemeral ports refuses to
/// start, naming both ranges and the sysctl, before it loads anything.
#[test]
fn masquerade_range_overlapping_the_ephemeral_ports_is_refused() {
    if !privileged() {
        return;
    }
    let tb = Testbed::new(&[0]);
    tb.nodes[0].ns.sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("{} {}", EPHEMERAL.0, EPHEMERAL.1),
    );
    let mut agent = node_agent(
        &tb,
        0,
        &tb.id,
        tb.cgroup_path(),
        &["--masquerade-port-range", "40050-40200"],
    );
    agent.start();
    let status = agent.wait_exit(Duration::from_secs(15));
    assert!(!status.success(), "agent exited with {status}");
    let line = agent.wait_for_log(0, "overlaps", Duration::from_secs(1));
    for part in [
        "--masquerade-port-range 40050-40200",
        "ephemeral ports 40000-40063",
        "net.ipv4.ip_local_port_range",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    assert!(
        !agent.pin_dir.join("LB4_SERVICES").exists(),
        "maps were pinned before the refusal"
    );
}
