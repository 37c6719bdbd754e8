//! XDP and direct server return on the two-node testbed (issue #6): NodePort and load balancer
//! traffic from an external client to a backend on node-b is translated at node-a's XDP hook;
//! in DSR mode node-b answers the client directly with the frontend's address, and the backend
//! sees the real client. Traffic that is no Service passes untouched.

mod common;

use std::net::SocketAddr;

use common::*;
use tests::{Testbed, harness::cgroup::TestCgroup, harness::topology::Proto};

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

/// Both nodes run the agent in DSR mode; `web`'s only backend is node-b's pod.
#[test]
fn dsr_the_backend_node_answers_the_client_directly() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::new(&[1, 1]);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let cgroup_b = TestCgroup::new(&format!("{}-b", tb.id));
    let dsr = ["--nodeport-mode", "dsr"];
    let mut a = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &dsr);
    let mut b = node_agent(&tb, 1, &format!("{}-b", tb.id), &cgroup_b.path, &dsr);
    let backend = tb.nodes[1].pods[0].ip4.to_string();
    for agent in [&mut a, &mut b] {
        agent.write_manifest("web.yaml", &web_yaml());
        agent.write_manifest(
            "web-slice.yaml",
            &slice_yaml(
                "web-1",
                "web",
                "IPv4",
                &[HTTP, DNS],
                &[Ep {
                    addr: backend.clone(),
                    node: "node-b",
                    conditions: "",
                }],
            ),
        );
        agent.start();
    }
    let frontends: Vec<(Proto, SocketAddr)> = vec![
        (Proto::Tcp, "192.168.77.1:30080".parse().unwrap()),
        (Proto::Udp, "192.168.77.1:30053".parse().unwrap()),
        (Proto::Tcp, format!("{LB_IP}:80").parse().unwrap()),
        (Proto::Udp, format!("{LB_IP}:53").parse().unwrap()),
    ];
    for (proto, to) in &frontends {
        tests::poll_until(
            &format!("{to} answered"),
            std::time::Duration::from_secs(10),
            || {
                let r = tb.request_ext(*proto, *to, 1);
                if r[0].ok {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        );
        for r in tb.request_ext(*proto, *to, 5) {
            assert!(r.ok, "{to}: {r:?}");
            assert_eq!(r.backend, "b-pod-1");
            // No masquerading: the backend sees the client; the client sees the frontend.
            assert!(r.seen.starts_with("192.168.77.100:"), "{to}: {r:?}");
            assert_eq!(r.peer.parse::<SocketAddr>().unwrap(), *to, "{r:?}");
        }
    }
    // node-a balanced at XDP and sent with the option; node-b learnt the frontends.
    assert!(datapath_events(&a, "xdp_forwarded") > 0);
    assert!(datapath_events(&a, "dsr_sent") > 0);
    assert!(datapath_events(&b, "dsr_learned") > 0);
    tb.assert_no_checksum_errors();
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
