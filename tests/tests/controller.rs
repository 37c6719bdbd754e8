//! The controller end to end: manifests directory → agent → where new connections go. Each edit
//! of a manifest must change the datapath (bounded polling, no sleeps).

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use tests::harness::topology::Proto;

fn vip() -> SocketAddr {
    "10.96.0.10:80".parse().unwrap()
}

/// An Env with Service `web` (10.96.0.10:80/TCP) and no slice yet.
fn web_env(pods: usize, extra: &str) -> Env {
    let env = Env::new(pods);
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &["10.96.0.10"], &[HTTP], extra),
    );
    env
}

fn write_slice(env: &Env, eps: &[Ep]) {
    env.agent.write_manifest(
        "slice.yaml",
        &slice_yaml("web-1", "web", "IPv4", &[HTTP], eps),
    );
}

fn ep_with<'a>(env: &Env, pod: usize, node: &'a str, conditions: &'a str) -> Ep<'a> {
    Ep {
        addr: env.topo.pods[pod].ip4.to_string(),
        node,
        conditions,
    }
}

/// Scaling a Service down and up moves new connections accordingly.
#[test]
fn scale_down_and_up_follow_the_slice() {
    if !privileged() {
        return;
    }
    let mut env = web_env(4, "");
    let all: Vec<Ep> = (1..4).map(|i| ep(env.topo.pods[i].ip4)).collect();
    write_slice(&env, &all);
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2", "pod-3", "pod-4"]);
    write_slice(&env, &[ep(env.topo.pods[2].ip4)]);
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-3"]);
    write_slice(&env, &all);
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2", "pod-3", "pod-4"]);
}

/// semantics 3.2, 3.3: terminating endpoints get no traffic while a ready one exists; when
/// none is ready, serving-and-terminating endpoints take over.
#[test]
fn terminating_endpoints_are_only_a_fallback() {
    if !privileged() {
        return;
    }
    let mut env = web_env(3, "");
    let terminating = "ready: false, serving: true, terminating: true";
    write_slice(
        &env,
        &[
            ep_with(&env, 1, NODE, ""),
            ep_with(&env, 2, NODE, terminating),
        ],
    );
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2"]);
    write_slice(
        &env,
        &[
            ep_with(
                &env,
                1,
                NODE,
                "ready: false, serving: false, terminating: true",
            ),
            ep_with(&env, 2, NODE, terminating),
        ],
    );
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-3"]);
}

/// semantics 3.4, 4.6: switching internalTrafficPolicy to Local keeps ClusterIP traffic on
/// this node's endpoints.
#[test]
fn internal_traffic_policy_change_applies_to_new_connections() {
    if !privileged() {
        return;
    }
    let mut env = web_env(3, "");
    write_slice(
        &env,
        &[ep_with(&env, 1, NODE, ""), ep_with(&env, 2, "node-b", "")],
    );
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2", "pod-3"]);
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml(
            "web",
            &["10.96.0.10"],
            &[HTTP],
            "  internalTrafficPolicy: Local\n",
        ),
    );
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2"]);
}

/// semantics 5.3, 5.6, 5.7: with every ready endpoint hinted and this node's zone among the
/// hints, only same-zone endpoints are used; one unhinted endpoint disables the filter.
#[test]
fn zone_hints_keep_traffic_in_the_zone() {
    if !privileged() {
        return;
    }
    let mut env = web_env(4, "");
    env.agent
        .write_manifest("node.yaml", &node_yaml(NODE, Some("zone-a")));
    let ips: Vec<String> = env.topo.pods.iter().map(|p| p.ip4.to_string()).collect();
    let hinted = |pod: usize, zone: &str| {
        format!(
            "- {{addresses: [\"{}\"], nodeName: {NODE}, hints: {{forZones: [{{name: {zone}}}]}}}}",
            ips[pod]
        )
    };
    let slice = |endpoints: Vec<String>| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}, protocol: TCP}}]\nendpoints:\n{}\n",
            endpoints.join("\n")
        )
    };
    env.agent.write_manifest(
        "slice.yaml",
        &slice(vec![
            hinted(1, "zone-a"),
            hinted(2, "zone-b"),
            hinted(3, "zone-a"),
        ]),
    );
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2", "pod-4"]);
    let unhinted = format!(
        "- {{addresses: [\"{}\"], nodeName: {NODE}}}",
        env.topo.pods[2].ip4
    );
    env.agent.write_manifest(
        "slice.yaml",
        &slice(vec![hinted(1, "zone-a"), unhinted, hinted(3, "zone-a")]),
    );
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2", "pod-3", "pod-4"]);
}

/// Bad input is logged and skipped; it never disturbs what is already programmed.
#[test]
fn bad_objects_are_rejected_without_touching_others() {
    if !privileged() {
        return;
    }
    let mut env = web_env(3, "");
    write_slice(&env, &[ep(env.topo.pods[1].ip4), ep(env.topo.pods[2].ip4)]);
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2", "pod-3"]);
    let from = env.agent.log_position();
    // A file that is not YAML, a Service with an impossible port, a slice with garbage.
    env.agent
        .write_manifest("broken.yaml", "kind: Service\n  : : [unclosed\n");
    env.agent.write_manifest(
        "bad-port.yaml",
        &service_yaml(
            "bad",
            &["10.96.0.20"],
            &[Port {
                name: "x",
                port: 0,
                proto: "TCP",
            }],
            "",
        ),
    );
    env.agent.write_manifest(
        "bad-slice.yaml",
        &slice_yaml(
            "web-2",
            "web",
            "IPv4",
            &[HTTP],
            &[Ep {
                addr: "not-an-ip".into(),
                node: NODE,
                conditions: "",
            }],
        ),
    );
    env.agent
        .wait_for_log(from, "broken.yaml rejected", Duration::from_secs(10));
    env.agent
        .wait_for_log(from, "port 0 is not in 1-65535", Duration::from_secs(10));
    env.agent.assert_running();
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2", "pod-3"]);
    // Breaking a file that held a working Service keeps its last good objects.
    env.agent
        .write_manifest("web.yaml", "kind: Service\nmetadata: [\n");
    env.agent
        .wait_for_log(from, "web.yaml rejected", Duration::from_secs(10));
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2", "pod-3"]);
}

/// A deleted Service stops being translated; recreated under the same name it works again.
#[test]
fn deleted_and_recreated_service() {
    if !privileged() {
        return;
    }
    let mut env = web_env(2, "");
    write_slice(&env, &[ep(env.topo.pods[1].ip4)]);
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2"]);
    env.agent.remove_manifest("web.yaml");
    tests::poll_until("web no longer translated", Duration::from_secs(10), || {
        let r = env.request(Proto::Tcp, vip(), 1);
        // Untranslated, the VIP is routed to the node, which has no route for it.
        if !r[0].ok && r[0].errno != Some(libc::ECONNREFUSED) {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &["10.96.0.10"], &[HTTP], ""),
    );
    env.wait_for_backends(Proto::Tcp, vip(), &["pod-2"]);
}
