//! kube-proxy's per-Service health check on `healthCheckNodePort` (semantics 8.1-8.4, 3.13):
//! the agent runs in the node's network namespace and a pod asks the node, as a cloud load
//! balancer would, whether the node has local endpoints for the Service.

mod common;

use std::{
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use common::*;
use tests::{
    Agent, Topology,
    harness::agent::{HttpReply, try_http_get_in},
    poll_until,
};

const HC_PORT: u16 = 32001;
const REMOTE: &str = "node-b";

/// A topology with 3 pods (pod 0 asks) and an agent running in the node's namespace.
fn setup() -> (Topology, Agent) {
    setup_with(&[])
}

/// `setup`, the agent started with `args`.
fn setup_with(args: &[&str]) -> (Topology, Agent) {
    let topo = Topology::new(3);
    let mut agent = Agent::new(&topo.id, topo.cgroup_path(), NODE);
    agent.netns = Some(topo.node.path());
    agent.extra_args = args.iter().map(|a| a.to_string()).collect();
    agent.write_manifest("node.yaml", &node_yaml(NODE, None));
    agent.start();
    (topo, agent)
}

/// Service `name`: LoadBalancer, ports `http` and `dns`, with `policy` as its
/// externalTrafficPolicy and health check port `hc_port`.
fn lb_service(name: &str, vip: &str, policy: &str, hc_port: u16) -> String {
    service_yaml(
        name,
        &[vip],
        &[HTTP, DNS],
        &format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: {policy}\n  healthCheckNodePort: {hc_port}\n"
        ),
    )
}

/// The slice of `service`, every endpoint on both ports.
fn endpoints(agent: &Agent, service: &str, eps: &[Ep]) {
    agent.write_manifest(
        &format!("{service}-slice.yaml"),
        &slice_yaml(&format!("{service}-1"), service, "IPv4", &[HTTP, DNS], eps),
    );
}

/// The node's bridge address on `port`, as pods reach it.
fn node_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 244, 0, 1], port))
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Waits until `addr`, asked from pod 0, answers `status` with `local` localEndpoints.
fn wait_for_answer(
    topo: &Topology,
    agent: &mut Agent,
    addr: SocketAddr,
    status: u16,
    local: u64,
) -> HttpReply {
    let ns = topo.pods[0].ns.path();
    poll_until(
        &format!("{addr} answering {status} with localEndpoints {local}"),
        Duration::from_secs(10),
        || {
            agent.assert_running();
            match try_http_get_in(Some(&ns), addr, "/") {
                Ok(r) if r.status == status && json(&r.body)["localEndpoints"] == local => Ok(r),
                Ok(r) => Err(format!("{r:?}")),
                Err(e) => Err(e.to_string()),
            }
        },
    )
}

/// Waits until nothing listens on `addr` any more (connection refused).
fn wait_for_refused(topo: &Topology, agent: &mut Agent, addr: SocketAddr) {
    let ns = topo.pods[0].ns.path();
    poll_until(
        &format!("{addr} refusing connections"),
        Duration::from_secs(10),
        || {
            agent.assert_running();
            match try_http_get_in(Some(&ns), addr, "/") {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
}

/// Checks the answer's headers and body against kube-proxy's (semantics 8.3).
fn check_answer(r: &HttpReply, service: &str, local: u64, healthy: bool) {
    assert_eq!(r.headers["content-type"], "application/json", "{r:?}");
    assert_eq!(r.headers["x-content-type-options"], "nosniff", "{r:?}");
    assert_eq!(
        r.headers["x-load-balancing-endpoint-weight"],
        local.to_string(),
        "{r:?}"
    );
    assert_eq!(
        json(&r.body),
        serde_json::json!({
            "service": {"namespace": "default", "name": service},
            "localEndpoints": local,
            "serviceProxyHealthy": healthy,
        })
    );
}

#[test]
fn health_check_follows_local_ready_endpoints() {
    if !privileged() {
        return;
    }
    let (topo, mut agent) = setup();
    let ip = |i: usize| topo.pods[i].ip4.to_string();
    let local = |i: usize| Ep {
        addr: ip(i),
        node: NODE,
        conditions: "",
    };
    let remote = || Ep {
        addr: "10.244.1.9".into(),
        node: REMOTE,
        conditions: "",
    };
    let hc = node_addr(HC_PORT);

    // semantics 8.1, 8.4: two local ready pods (each on both ports: counted once) and a remote
    // one: 200, localEndpoints 2.
    agent.write_manifest(
        "web.yaml",
        &lb_service("web", "10.96.0.20", "Local", HC_PORT),
    );
    endpoints(&agent, "web", &[local(1), local(2), remote()]);
    let r = wait_for_answer(&topo, &mut agent, hc, 200, 2);
    check_answer(&r, "web", 2, true);
    // semantics 8.2: any path gets the same answer; the server listens on IPv6 too.
    let ns = topo.pods[0].ns.path();
    let other = try_http_get_in(Some(&ns), hc, "/some/other/path").unwrap();
    assert_eq!(other.status, 200);
    let v6 = SocketAddr::from((
        "fd00:244::1".parse::<std::net::Ipv6Addr>().unwrap(),
        HC_PORT,
    ));
    let r6 = try_http_get_in(Some(&ns), v6, "/").unwrap();
    assert_eq!(r6.status, 200, "{r6:?}");
    check_answer(&r6, "web", 2, true);
    let (code, metrics) = agent.get(agent.metrics_port, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kube_bpf_proxy_healthcheck_ports{state=\"serving\"} 1\n"),
        "{metrics}"
    );

    // semantics 3.13: the only local endpoint is terminating (still used by the Local policy,
    // 3.4): 503 and 0.
    let terminating = Ep {
        addr: ip(1),
        node: NODE,
        conditions: "ready: false, serving: true, terminating: true",
    };
    endpoints(&agent, "web", &[terminating, remote()]);
    let r = wait_for_answer(&topo, &mut agent, hc, 503, 0);
    check_answer(&r, "web", 0, true);

    // A local ready endpoint returns: 200 again.
    endpoints(&agent, "web", &[local(2), remote()]);
    let r = wait_for_answer(&topo, &mut agent, hc, 200, 1);
    check_answer(&r, "web", 1, true);

    // Endpoints only on other nodes: 503 and 0 (semantics 8.2).
    endpoints(&agent, "web", &[remote()]);
    let r = wait_for_answer(&topo, &mut agent, hc, 503, 0);
    check_answer(&r, "web", 0, true);
    endpoints(&agent, "web", &[local(1), remote()]);
    wait_for_answer(&topo, &mut agent, hc, 200, 1);

    // semantics 8.1: externalTrafficPolicy Cluster needs no health check: the port closes.
    agent.write_manifest(
        "web.yaml",
        &lb_service("web", "10.96.0.20", "Cluster", HC_PORT),
    );
    wait_for_refused(&topo, &mut agent, hc);

    // Local again, then the Service is deleted: served, then closed.
    agent.write_manifest(
        "web.yaml",
        &lb_service("web", "10.96.0.20", "Local", HC_PORT),
    );
    wait_for_answer(&topo, &mut agent, hc, 200, 1);
    agent.remove_manifest("web.yaml");
    wait_for_refused(&topo, &mut agent, hc);
    agent.assert_running();
}

/// A TCP listener on `addr` inside network namespace `netns` (a thread enters it; the socket
/// stays in that namespace).
fn listen_in(netns: &str, addr: SocketAddr) -> TcpListener {
    let ns = std::fs::File::open(netns).unwrap_or_else(|e| panic!("open netns {netns}: {e}"));
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on an open namespace fd, for this thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
    })
    .join()
    .unwrap()
}

#[test]
fn port_conflicts_and_bind_failures_are_reported_and_retried() {
    if !privileged() {
        return;
    }
    let (topo, mut agent) = setup();
    let local = Ep {
        addr: topo.pods[1].ip4.to_string(),
        node: NODE,
        conditions: "",
    };
    let from = agent.log_position();

    // Something else holds the port on the node: an error line and a metric, no crash.
    let squatter = listen_in(&topo.node.path(), SocketAddr::from(([0, 0, 0, 0], HC_PORT)));
    agent.write_manifest(
        "web.yaml",
        &lb_service("web", "10.96.0.20", "Local", HC_PORT),
    );
    endpoints(&agent, "web", &[local]);
    agent.wait_for_log(
        from,
        "cannot serve the health check of Service default/web on port 32001",
        Duration::from_secs(10),
    );
    let (_, metrics) = agent.get(agent.metrics_port, "/metrics");
    assert!(
        metrics.contains("kube_bpf_proxy_healthcheck_ports{state=\"failing\"} 1\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("kube_bpf_proxy_healthcheck_bind_failures_total 0\n"),
        "{metrics}"
    );

    // The port is freed; the next sync (here: a second Service claiming the same port, which
    // loses to default/web by name) binds it.
    drop(squatter);
    agent.write_manifest(
        "zeta.yaml",
        &lb_service("zeta", "10.96.0.21", "Local", HC_PORT),
    );
    agent.wait_for_log(
        from,
        "Service default/zeta: healthCheckNodePort 32001 is already used by Service default/web",
        Duration::from_secs(10),
    );
    let r = wait_for_answer(&topo, &mut agent, node_addr(HC_PORT), 200, 1);
    check_answer(&r, "web", 1, true);
    agent.assert_running();
}

/// semantics 8.1: with --nodeport-addresses the health check listens on the node addresses
/// it selects (here one IPv4 address of two on the node's bridge); IPv6, which the flag does
/// not narrow, is served on every address as before.
#[test]
fn health_check_listens_on_the_nodeport_addresses_only() {
    if !privileged() {
        return;
    }
    let topo = Topology::new(3);
    // A second IPv4 address on the node, outside the selection, before the agent starts.
    topo.node
        .ip(&["addr", "add", "10.244.0.250/24", "dev", "br0"]);
    let mut agent = Agent::new(&topo.id, topo.cgroup_path(), NODE);
    agent.netns = Some(topo.node.path());
    agent.extra_args = vec!["--nodeport-addresses".into(), "10.244.0.1/32".into()];
    agent.write_manifest("node.yaml", &node_yaml(NODE, None));
    agent.start();
    agent.write_manifest(
        "web.yaml",
        &lb_service("web", "10.96.0.20", "Local", HC_PORT),
    );
    let local = Ep {
        addr: topo.pods[1].ip4.to_string(),
        node: NODE,
        conditions: "",
    };
    endpoints(&agent, "web", &[local]);
    let r = wait_for_answer(&topo, &mut agent, node_addr(HC_PORT), 200, 1);
    check_answer(&r, "web", 1, true);
    let v6 = SocketAddr::from((
        "fd00:244::1".parse::<std::net::Ipv6Addr>().unwrap(),
        HC_PORT,
    ));
    wait_for_answer(&topo, &mut agent, v6, 200, 1);
    // The node's other IPv4 address is not selected: nothing listens there.
    let ns = topo.pods[0].ns.path();
    let other = SocketAddr::from(([10, 244, 0, 250], HC_PORT));
    match try_http_get_in(Some(&ns), other, "/") {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        r => panic!("{other}: {r:?}"),
    }
    // The agent's log names the sockets.
    agent.wait_for_log(
        0,
        "health checks listen on: [::], 10.244.0.1",
        Duration::from_secs(5),
    );
}
