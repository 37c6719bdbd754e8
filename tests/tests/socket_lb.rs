//! ClusterIP at the socket layer, end to end: real BPF programs on a test cgroup, real traffic
//! between pod namespaces.

mod common;

use std::net::SocketAddr;

use common::*;
use tests::harness::topology::Proto;

/// A ClusterIP:port is rewritten at connect() to one of the ready backends; every backend
/// answers, the backend sees the client pod's own address, and getpeername shows the
/// Service address (semantics 4.1, 4.11).
#[test]
fn clusterip_tcp_v4_reaches_every_backend() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(4);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &["10.96.0.10"], &[HTTP], ""),
    );
    let pods: Vec<String> = (1..4).map(|i| env.topo.pods[i].ip4.to_string()).collect();
    env.agent.write_manifest(
        "web-slice.yaml",
        &slice_yaml(
            "web-1",
            "web",
            "IPv4",
            &[HTTP],
            &pods.iter().map(ep).collect::<Vec<_>>(),
        ),
    );
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2", "pod-3", "pod-4"]);

    let replies = env.request(Proto::Tcp, vip, 300);
    let counts = tally(&replies);
    assert_eq!(counts.len(), 3, "{counts:?}");
    // Uniform random over 3 backends, 300 draws: each count is Binomial(300, 1/3), mean 100,
    // sd 8.2; below 60 is a 4.9-sigma event (p < 1e-6 per backend).
    for (backend, n) in &counts {
        assert!(*n >= 60, "{backend} got only {n} of 300: {counts:?}");
    }
    let client = env.topo.pods[0].ip4.to_string();
    for r in &replies {
        assert_eq!(
            r.peer, "10.96.0.10:80",
            "getpeername shows the Service address"
        );
        assert!(
            r.seen.starts_with(&format!("{client}:")),
            "backend saw {}",
            r.seen
        );
    }
}
