//! The agent against an API server (the in-process double of proxy-userspace's source tests,
//! speaking list/watch): while the server is away, refusing or resetting connections, the
//! datapath keeps serving what was programmed, also when the agent is restarted meanwhile; what
//! changed in the cluster during the outage is programmed soon after the server is back.

mod common;
#[path = "../../proxy-userspace/tests/support/mod.rs"]
mod double;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::*;
use double::{ApiServer, Outage, Res};
use tests::{Agent, Topology, harness::topology::Proto, poll_until};

/// A kubeconfig naming the double, removed on drop.
struct Kubeconfig(PathBuf);

impl Kubeconfig {
    fn new(id: &str, server: &str) -> Kubeconfig {
        let path = std::env::temp_dir().join(format!("{id}-kubeconfig.yaml"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
             users:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    \
             user: u\ncurrent-context: x\n"
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        Kubeconfig(path)
    }
}

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const VIP: &str = "10.96.0.10:80";

/// Sends `count` requests to the Service from pod 0; returns the backends that answered and
/// the failed requests.
fn round(topo: &Topology, count: usize) -> (BTreeSet<String>, Vec<tests::Reply>) {
    let vip: SocketAddr = VIP.parse().unwrap();
    let replies = topo.request(0, Proto::Tcp, vip, count);
    let failed = replies.iter().filter(|r| !r.ok).cloned().collect();
    let seen = replies
        .into_iter()
        .filter(|r| r.ok)
        .map(|r| r.backend)
        .collect();
    (seen, failed)
}

/// Polls until the Service is answered by `backend` alone; returns how long it took.
fn wait_served_by(topo: &Topology, agent: &mut Agent, backend: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    poll_until(&format!("{VIP} served by {backend}"), limit, || {
        agent.assert_running();
        match round(topo, 4) {
            (seen, failed) if failed.is_empty() && seen.len() == 1 && seen.contains(backend) => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    started.elapsed()
}

/// semantics 12.8: a sync never aborts on the way the source fails; the proxy keeps its rules
/// while the API server is away (kube-proxy's iptables/nftables rules stay in the kernel), and
/// its informers relist or resume when it is back.
#[test]
fn outages_and_a_restart_meanwhile_keep_serving_and_converge_after() {
    if !privileged() {
        return;
    }
    let server = ApiServer::start();
    let mut topo = Topology::new(4);
    for i in 1..4 {
        topo.serve(i, BACKEND_PORT);
    }
    let pod_ip = |i: usize| topo.pods[i].ip4.to_string();
    server.apply(Res::Nodes, double::node(NODE, "zone-1"));
    server.apply(
        Res::Services,
        double::service("default", "web", "10.96.0.10", 80),
    );
    server.apply(
        Res::Slices,
        double::slice("default", "web", "web-1", &[&pod_ip(1)]),
    );
    // A second Service, whose slice goes away during the last outage.
    server.apply(
        Res::Services,
        double::service("default", "other", "10.96.0.11", 80),
    );
    server.apply(
        Res::Slices,
        double::slice("default", "other", "other-1", &[&pod_ip(1)]),
    );
    let kubeconfig = Kubeconfig::new(&topo.id, &server.url());
    let mut agent = Agent::new(&topo.id, topo.cgroup_path(), NODE);
    agent.kubeconfig = Some(kubeconfig.0.clone());
    agent.start();
    wait_served_by(&topo, &mut agent, "pod-2", Duration::from_secs(20));

    let other: SocketAddr = "10.96.0.11:80".parse().unwrap();
    assert!(topo.request(0, Proto::Tcp, other, 3).iter().all(|r| r.ok));

    let mut serving = "pod-2";
    // The last outage also loses the watch history (compacted): the agent's resumed watches
    // get 410 Gone and relist, and so learn of a change and a deletion they never saw.
    for (mode, compacted, next_pod, next) in [
        (Outage::Refuse, false, 2, "pod-3"),
        (Outage::Reset, false, 3, "pod-4"),
        (Outage::Refuse, true, 1, "pod-2"),
    ] {
        server.outage(Some(mode));
        // Away: everything programmed keeps being served.
        let (seen, failed) = round(&topo, 20);
        assert!(failed.is_empty(), "{mode:?}: {failed:?}");
        assert_eq!(seen, BTreeSet::from([serving.to_string()]), "{mode:?}");
        // The agent is restarted during the outage: its programs take over the pinned links
        // and maps, and it writes nothing before it has read the cluster.
        agent.kill();
        let pos = agent.log_position();
        agent.start();
        agent.wait_for_log(pos, "replaced in place", Duration::from_secs(15));
        for _ in 0..3 {
            let (seen, failed) = round(&topo, 10);
            assert!(failed.is_empty(), "{mode:?}, restarted: {failed:?}");
            assert_eq!(seen, BTreeSet::from([serving.to_string()]), "{mode:?}");
        }
        agent.assert_running();
        assert_eq!(
            agent.count_logs(pos, "synced:"),
            0,
            "synced without the cluster"
        );

        // The cluster changes while the agent cannot see it; then the server comes back.
        let moved = double::slice("default", "web", "web-1", &[&pod_ip(next_pod)]);
        if compacted {
            server.apply_unseen(Res::Slices, moved);
            server.delete_unseen(Res::Slices, "default/other-1");
            server.compact(Res::Slices);
        } else {
            server.apply(Res::Slices, moved);
        }
        server.outage(None);
        let took = wait_served_by(&topo, &mut agent, next, Duration::from_secs(30));
        eprintln!("{mode:?}: the change made during the outage served {took:?} after it ended");
        serving = next;
    }
    // The slice deleted unseen is gone after the relist: no endpoints, so connections to its
    // Service are refused (semantics 3.7).
    poll_until("10.96.0.11 refused", Duration::from_secs(10), || {
        let r = topo.request(0, Proto::Tcp, other, 1);
        if r.iter()
            .all(|r| !r.ok && r.errno == Some(libc::ECONNREFUSED))
        {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    let (_, failed) = round(&topo, 20);
    assert!(failed.is_empty(), "{failed:?}");
    agent.assert_running();
}

/// kube-proxy's Events, posted to the API server (events.k8s.io/v1, reporting controller
/// kube-proxy, instance the node): `Starting` on the Node at start, and semantics 8.1's
/// `FailedToStartServiceHealthcheck` on a Service whose healthCheckNodePort cannot be bound
/// (here the test holds the port).
#[test]
fn events_tell_the_start_and_a_health_check_port_that_cannot_be_bound() {
    if !privileged() {
        return;
    }
    let server = ApiServer::start();
    let mut topo = Topology::new(2);
    topo.serve(1, BACKEND_PORT);
    let held = std::net::TcpListener::bind("[::]:0").expect("a port to hold");
    let port = held.local_addr().unwrap().port();
    server.apply(Res::Nodes, double::node(NODE, "zone-1"));
    let mut svc = double::service("default", "web", "10.96.0.10", 80);
    svc["spec"]["type"] = serde_json::json!("LoadBalancer");
    svc["spec"]["externalTrafficPolicy"] = serde_json::json!("Local");
    svc["spec"]["healthCheckNodePort"] = serde_json::json!(port);
    svc["spec"]["ports"][0]["nodePort"] = serde_json::json!(30080);
    server.apply(Res::Services, svc);
    server.apply(
        Res::Slices,
        double::slice("default", "web", "web-1", &[&topo.pods[1].ip4.to_string()]),
    );
    let kubeconfig = Kubeconfig::new(&topo.id, &server.url());
    let mut agent = Agent::new(&topo.id, topo.cgroup_path(), NODE);
    agent.kubeconfig = Some(kubeconfig.0.clone());
    agent.start();
    wait_served_by(&topo, &mut agent, "pod-2", Duration::from_secs(20));
    let find = |reason: &str| {
        server
            .events()
            .into_iter()
            .find(|e| e["reason"] == reason)
            .ok_or_else(|| format!("{:?}", server.events()))
    };
    poll_until("the agent's events", Duration::from_secs(15), || {
        find("Starting").and(find("FailedToStartServiceHealthcheck").map(|_| ()))
    });
    let starting = find("Starting").unwrap();
    assert_eq!(starting["type"], "Normal", "{starting}");
    assert_eq!(starting["action"], "StartKubeProxy", "{starting}");
    assert_eq!(starting["regarding"]["kind"], "Node", "{starting}");
    assert_eq!(starting["regarding"]["name"], NODE, "{starting}");
    assert_eq!(starting["reportingController"], "kube-proxy", "{starting}");
    assert_eq!(
        starting["reportingInstance"],
        format!("kube-proxy-{NODE}"),
        "{starting}"
    );
    assert_eq!(starting["metadata"]["namespace"], "default", "{starting}");
    let failed = find("FailedToStartServiceHealthcheck").unwrap();
    assert_eq!(failed["type"], "Warning", "{failed}");
    assert_eq!(failed["regarding"]["kind"], "Service", "{failed}");
    assert_eq!(failed["regarding"]["namespace"], "default", "{failed}");
    assert_eq!(failed["regarding"]["name"], "web", "{failed}");
    let note = failed["note"].as_str().unwrap_or_default();
    assert!(
        note.starts_with(&format!(
            "node {NODE} failed to start healthcheck \"default/web\" on port {port}: "
        )),
        "{failed}"
    );
    agent.assert_running();
    drop(held);
}
