//! In-place upgrade from the previous release (issue #22): the agent built from that commit's
//! own sources serves ClusterIP, NodePort (Cluster, masqueraded, and Local) and UDP traffic on
//! node-a of a two-node testbed; it is killed and the current agent takes over its pins while
//! clients keep connecting. Nothing fails, an established NodePort connection keeps its
//! backend, the maps whose layout changed are migrated (the per-reason counters with their
//! counts, the slots into chunks before the new programs run), and `verify` finds no drift.

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use common::*;
use proxy_userspace::datapath::layouts::current_version;
use tests::{
    Agent, Reply, Testbed,
    harness::{release, topology::Proto},
    poll_until,
};

const CLUSTER_IP: &str = "10.96.0.10";
const NODE_A: &str = "192.168.77.1";

/// `web` (Cluster policy, TCP and UDP NodePorts), `web-local` (Local policy), and `empty`
/// (a NodePort without endpoints: its packets are rejected and counted as drops).
fn services(tb: &Testbed) -> String {
    let pod = |n: usize, p: usize| tb.nodes[n].pods[p].ip4.to_string();
    let node_of = |n: usize| if n == 0 { NODE } else { "node-b" };
    let slice = |name: &str, service: &str, pods: &[(usize, usize)], ports: &[Port]| {
        let eps: Vec<Ep> = pods
            .iter()
            .map(|&(n, p)| Ep {
                addr: pod(n, p),
                node: node_of(n),
                conditions: "",
            })
            .collect();
        slice_yaml(name, service, "IPv4", ports, &eps)
    };
    let node_port = |name: &str, ip: &str, ports: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  type: NodePort\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  \
             ipFamilies: [IPv4]\n  ports: [{ports}]\n{extra}"
        )
    };
    [
        node_port(
            "web",
            CLUSTER_IP,
            "{name: http, port: 80, nodePort: 30080, protocol: TCP}, \
             {name: dns, port: 53, nodePort: 30053, protocol: UDP}",
            "",
        ),
        slice("web-1", "web", &[(0, 0), (1, 0)], &[HTTP, DNS]),
        node_port(
            "web-local",
            "10.96.0.11",
            "{name: http, port: 80, nodePort: 30081, protocol: TCP}",
            "  externalTrafficPolicy: Local\n",
        ),
        slice("web-local-1", "web-local", &[(0, 1), (1, 0)], &[HTTP]),
        node_port(
            "empty",
            "10.96.0.12",
            "{name: http, port: 80, nodePort: 30082, protocol: TCP}",
            "",
        ),
    ]
    .join("---\n")
}

/// The counters of `agent`'s /metrics whose name starts with `metric`, by their labels.
fn counters(agent: &Agent, metric: &str) -> BTreeMap<String, u64> {
    let (_, body) = agent.get(agent.metrics_port, "/metrics");
    body.lines()
        .filter_map(|l| l.strip_prefix(metric))
        .filter_map(|l| l.strip_prefix('{'))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            Some((labels.to_string(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// One round of every client: (what, replies).
fn round(tb: &Testbed) -> Vec<(&'static str, Vec<Reply>)> {
    let at = |port: u16| SocketAddr::new(NODE_A.parse().unwrap(), port);
    let pod = &tb.nodes[0].pods[1];
    vec![
        (
            "ClusterIP at the socket layer",
            tb.request_from(
                &pod.ns,
                true,
                Proto::Tcp,
                SocketAddr::new(CLUSTER_IP.parse().unwrap(), 80),
                5,
            ),
        ),
        (
            "NodePort, Cluster policy",
            tb.request_ext(Proto::Tcp, at(30080), 5),
        ),
        (
            "NodePort, Local policy",
            tb.request_ext(Proto::Tcp, at(30081), 5),
        ),
        ("NodePort, UDP", tb.request_ext(Proto::Udp, at(30053), 5)),
    ]
}

#[test]
fn upgrade_from_the_previous_release_fails_no_connection_and_keeps_counts() {
    if !privileged() {
        return;
    }
    let previous = match release::agent_of(release::PREVIOUS_RELEASE) {
        Ok(binary) => binary,
        Err(why) => {
            tests::harness::skip::skip(&why);
            return;
        }
    };
    let mut tb = Testbed::new(&[2, 1]);
    tb.serve(0, 0, BACKEND_PORT);
    tb.serve(0, 1, BACKEND_PORT);
    tb.serve(1, 0, BACKEND_PORT);
    let mut agent = node_agent(&tb, 0, &tb.id, tb.cgroup_path(), &[]);
    agent.binary = Some(previous);
    agent.start();
    agent.write_manifest("services.yaml", &services(&tb));
    let at = |port: u16| SocketAddr::new(NODE_A.parse().unwrap(), port);
    for port in [30080, 30081] {
        wait_answered(&tb, Proto::Tcp, at(port));
    }
    wait_answered(&tb, Proto::Udp, at(30053));
    // A connection through the NodePort, established before the upgrade.
    let (mut held, first) = tb.hold_from(&tb.ext, false, at(30080));
    assert!(first.ok, "{first:?}");
    // Rejected packets: counted as no_backends drops by the hook that saw them.
    let refused = tb.request_ext(Proto::Tcp, at(30082), 3);
    assert!(refused.iter().all(|r| !r.ok), "{refused:?}");
    let drops_before = poll_until(
        "the previous release counts the refused packets",
        Duration::from_secs(15),
        || {
            let drops: BTreeMap<String, u64> = counters(&agent, "kube_bpf_proxy_drops_total")
                .into_iter()
                .filter(|(k, v)| k.contains("reason=\"no_backends\"") && *v > 0)
                .collect();
            if drops.is_empty() {
                Err("none yet".to_string())
            } else {
                Ok(drops)
            }
        },
    );
    let events_before = counters(&agent, "kube_bpf_proxy_datapath_events_total");
    assert!(
        events_before
            .get("reason=\"nat_new\"")
            .is_some_and(|v| *v > 0),
        "{events_before:?}"
    );

    let stop = AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    let (attempted, failed) = std::thread::scope(|s| {
        let tb = &tb;
        let (stop, rounds) = (&stop, &rounds);
        let clients = s.spawn(move || {
            let (mut attempted, mut failed) = (0usize, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (what, replies) in round(tb) {
                    for r in replies {
                        attempted += 1;
                        if !r.ok {
                            failed.push((what, r));
                        }
                    }
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            (attempted, failed)
        });
        let wait_rounds = |n: usize| {
            let target = rounds.load(Ordering::Relaxed) + n;
            poll_until("client rounds", Duration::from_secs(60), || {
                if rounds.load(Ordering::Relaxed) >= target {
                    Ok(())
                } else {
                    Err("running".to_string())
                }
            });
        };
        wait_rounds(2);
        agent.kill();
        wait_rounds(1);
        agent.binary = None;
        let from = agent.log_position();
        agent.start();
        // The counters migrate with their counts; the slots go over from one entry per slot
        // to chunks before the new programs are attached (the clients above never stop).
        for map in [
            proxy_common::maps::LB_DROPS,
            proxy_common::maps::LB_STATS,
            proxy_common::maps::LB_SLOTS,
        ] {
            agent.wait_for_log(
                from,
                &format!(
                    "{map}: migrated from layout version 1 to {}",
                    current_version(map)
                ),
                Duration::from_secs(20),
            );
        }
        let synced = agent.wait_for_log(from, "synced:", Duration::from_secs(20));
        eprintln!("upgrade: first sync of the new agent: {synced}");
        wait_rounds(3);
        stop.store(true, Ordering::Relaxed);
        clients.join().expect("client thread")
    });
    eprintln!(
        "upgrade: {attempted} requests across the upgrade, {} failed",
        failed.len()
    );
    assert!(
        attempted >= 100,
        "too few requests to mean anything: {attempted}"
    );
    assert!(failed.is_empty(), "{failed:?}");
    // The established connection kept its backend.
    for _ in 0..3 {
        let r = held.again();
        assert!(r.ok, "{r:?}");
        assert_eq!(r.backend, first.backend, "the held connection moved");
    }
    // The counters went on from where the previous release left them, each at its own hook
    // and reason (LB_DROPS's indices moved when a reason was added).
    poll_until("the counters carried over", Duration::from_secs(15), || {
        let drops = counters(&agent, "kube_bpf_proxy_drops_total");
        let events = counters(&agent, "kube_bpf_proxy_datapath_events_total");
        let behind: Vec<String> = drops_before
            .iter()
            .filter(|(k, v)| drops.get(*k).copied().unwrap_or(0) < **v)
            .chain(
                events_before
                    .iter()
                    .filter(|(k, v)| events.get(*k).copied().unwrap_or(0) < **v),
            )
            .map(|(k, v)| format!("{k}: was {v}"))
            .collect();
        if behind.is_empty() {
            Ok(())
        } else {
            Err(format!("{behind:?}; now {drops:?} {events:?}"))
        }
    });
    // The versions are recorded for the next upgrade.
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(agent.pin_dir.join("LB_VERSIONS"))
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "{out:?}");
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    assert_eq!(
        dump.as_array().map(Vec::len),
        Some(proxy_common::maps::ALL.len()),
        "{dump}"
    );
    // status shows each map's layout version.
    let out = cli_in_node(&tb, &agent, &["status", "-o", "json"]);
    assert!(out.status.success(), "status: {out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let layout = |map: &str| {
        status["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["name"] == map))
            .map(|m| m["layoutVersion"].clone())
    };
    assert_eq!(
        layout("LB_DROPS"),
        Some(serde_json::json!(current_version(
            proxy_common::maps::LB_DROPS
        ))),
        "{status}"
    );
    assert_eq!(layout("LB_CT4"), Some(serde_json::json!(1)), "{status}");
    // verify finds the maps equal to the objects.
    assert_verified(&tb, &agent, NODE, "after the upgrade");
    tb.assert_no_checksum_errors();
}
