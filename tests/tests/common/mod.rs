//! Shared setup for the end-to-end tests: root check (or a recorded skip), sweep, a topology with echo servers and a
//! running agent, and YAML builders for Services and EndpointSlices.
#![allow(dead_code)]

use std::{collections::BTreeMap, net::SocketAddr, sync::Once, time::Duration};

use tests::{Agent, Reply, Topology, harness::topology::Proto, poll_until, sweep};

pub const NODE: &str = "node-a";
pub const BACKEND_PORT: u16 = 8080;

static SWEEP: Once = Once::new();

/// True when the test may run (root); sweeps leftovers of crashed runs once per process.
/// Not root: fails under `CI=true` or `KBP_REQUIRE_PRIVILEGES=1`, otherwise records the test as
/// skipped by name (`cargo xtask test` lists it and counts it as skipped) and returns false, and
/// the test returns.
pub fn privileged() -> bool {
    if !tests::require_root() {
        return false;
    }
    SWEEP.call_once(sweep);
    true
}

/// A topology with `pods` pods (pod 0 is the client), echo servers on BACKEND_PORT in every
/// other pod, and a started agent.
pub struct Env {
    pub agent: Agent,
    pub topo: Topology,
}

impl Env {
    pub fn new(pods: usize) -> Env {
        let mut topo = Topology::new(pods);
        for i in 1..pods {
            topo.serve(i, BACKEND_PORT);
        }
        let mut agent = Agent::new(&topo.id, topo.cgroup_path(), NODE);
        agent.write_manifest("node.yaml", &node_yaml(NODE, None));
        agent.start();
        Env { agent, topo }
    }

    /// [`Env::new`] whose agent runs with `args` on fresh pins (the first agent's pins go, so
    /// the maps start empty with the sizes `args` ask for); with the log position from before
    /// that agent started.
    pub fn with_agent_args(pods: usize, args: &[&str]) -> (Env, usize) {
        let mut env = Env::new(pods);
        env.agent.kill();
        env.agent.extra_args = args.iter().map(|a| a.to_string()).collect();
        let _ = std::fs::remove_dir_all(&env.agent.pin_dir);
        let from = env.agent.log_position();
        env.agent.start();
        (env, from)
    }

    pub fn request(&self, proto: Proto, to: SocketAddr, count: usize) -> Vec<Reply> {
        self.topo.request(0, proto, to, count)
    }

    /// Waits until requests to `to` are answered by exactly `backends` (each seen at least
    /// once in a probe round), i.e. the agent programmed what the manifests say.
    pub fn wait_for_backends(&mut self, proto: Proto, to: SocketAddr, backends: &[&str]) {
        let want: std::collections::BTreeSet<String> =
            backends.iter().map(|s| s.to_string()).collect();
        let agent = &mut self.agent;
        let topo = &self.topo;
        poll_until(
            &format!("{to} served by {want:?}"),
            Duration::from_secs(10),
            || {
                agent.assert_running();
                let replies = topo.request(0, proto, to, 8 * want.len().max(1));
                let seen: std::collections::BTreeSet<String> = replies
                    .iter()
                    .filter(|r| r.ok)
                    .map(|r| r.backend.clone())
                    .collect();
                if seen == want && replies.iter().all(|r| r.ok) {
                    Ok(())
                } else {
                    Err(format!("{replies:?}"))
                }
            },
        );
    }
}

/// Waits (bounded) until `to` answers one request from the testbed's external client: the
/// agent has programmed it.
pub fn wait_answered(tb: &tests::Testbed, proto: Proto, to: SocketAddr) {
    poll_until(&format!("{to} answered"), Duration::from_secs(10), || {
        let r = tb.request_ext(proto, to, 1);
        if r.iter().all(|r| r.ok) {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
}

/// Counts replies per backend; panics on any failed request.
pub fn tally(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in replies {
        assert!(r.ok, "request failed: {r:?}");
        *out.entry(r.backend.clone()).or_insert(0) += 1;
    }
    out
}

pub fn node_yaml(name: &str, zone: Option<&str>) -> String {
    let labels = zone
        .map(|z| format!("\n  labels: {{topology.kubernetes.io/zone: {z}}}"))
        .unwrap_or_default();
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}{labels}\n")
}

/// A Service port for `service_yaml`.
#[derive(Clone, Copy)]
pub struct Port<'a> {
    pub name: &'a str,
    pub port: u16,
    pub proto: &'a str,
}

pub const HTTP: Port<'static> = Port {
    name: "http",
    port: 80,
    proto: "TCP",
};
pub const DNS: Port<'static> = Port {
    name: "dns",
    port: 53,
    proto: "UDP",
};

/// A Service with the given cluster IPs (one per family) and ports; `extra` is appended to spec.
pub fn service_yaml(name: &str, cluster_ips: &[&str], ports: &[Port], extra: &str) -> String {
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    let ports: Vec<String> = ports
        .iter()
        .map(|p| {
            format!(
                "{{name: {}, port: {}, protocol: {}}}",
                p.name, p.port, p.proto
            )
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  ports: [{}]\n{extra}",
        cluster_ips[0],
        cluster_ips.join(", "),
        families.join(", "),
        ports.join(", ")
    )
}

/// An endpoint for `slice_yaml`: (address, node name, conditions YAML or "").
pub struct Ep<'a> {
    pub addr: String,
    pub node: &'a str,
    pub conditions: &'a str,
}

pub fn ep(addr: impl ToString) -> Ep<'static> {
    Ep {
        addr: addr.to_string(),
        node: NODE,
        conditions: "",
    }
}

/// An EndpointSlice of `service` with the given ports (all to BACKEND_PORT) and endpoints.
pub fn slice_yaml(name: &str, service: &str, family: &str, ports: &[Port], eps: &[Ep]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| {
            format!(
                "{{name: {}, port: {BACKEND_PORT}, protocol: {}}}",
                p.name, p.proto
            )
        })
        .collect();
    let eps: Vec<String> = eps
        .iter()
        .map(|e| {
            let cond = if e.conditions.is_empty() {
                String::new()
            } else {
                format!(", conditions: {{{}}}", e.conditions)
            };
            format!(
                "- {{addresses: [\"{}\"], nodeName: {}{cond}}}",
                e.addr, e.node
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {family}\nports: [{}]\nendpoints:\n{}\n",
        ports.join(", "),
        eps.join("\n")
    )
}

/// Service `name` (ClusterIP `vip`, port `http` 80/TCP) whose one endpoint is pod `pod`, written
/// as two manifests (`<name>.yaml`, `<name>-slice.yaml`).
pub fn service_with_one_backend(env: &Env, name: &str, vip: &str, pod: usize) {
    env.agent.write_manifest(
        &format!("{name}.yaml"),
        &service_yaml(name, &[vip], &[HTTP], ""),
    );
    env.agent.write_manifest(
        &format!("{name}-slice.yaml"),
        &slice_yaml(
            &format!("{name}-1"),
            name,
            "IPv4",
            &[HTTP],
            &[ep(env.topo.pods[pod].ip4)],
        ),
    );
}

/// An agent on testbed node `node` (in its namespace, tc on `eth0` and on the pod-facing
/// interfaces it finds itself, `--pod-interfaces auto`), with its own pin directory `id` and
/// socket-hook cgroup, its Node manifest written, not yet started.
pub fn node_agent(
    tb: &tests::Testbed,
    node: usize,
    id: &str,
    cgroup: &std::path::Path,
    extra: &[&str],
) -> Agent {
    let name = &tb.nodes[node].name;
    let mut agent = Agent::new(id, cgroup, name);
    agent.netns = Some(tb.node_ns_path(node));
    agent.extra_args = ["--external-interfaces", "eth0"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    agent.write_manifest("node.yaml", &node_yaml(name, None));
    agent.write_manifest("peer-nodes.yaml", &peer_nodes_yaml(tb, node));
    agent
}

/// The Node objects of the testbed's other nodes, with their LAN addresses as InternalIPs (as
/// a cluster's API server would hold them): the peers a node in DSR mode accepts the option
/// from.
pub fn peer_nodes_yaml(tb: &tests::Testbed, except: usize) -> String {
    tb.nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != except)
        .map(|(_, n)| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {}}}\n  - {{type: InternalIP, address: \"{}\"}}\n",
                n.name, n.ip4, n.ip6
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A datapath counter of `agent` (polled: the agent refreshes them every 5 s); the first
/// nonzero value.
pub fn datapath_events(agent: &Agent, reason: &str) -> u64 {
    datapath_events_reach(agent, reason, 1)
}

/// The counter `kube_bpf_proxy_datapath_events_total` for `reason` as `agent` reports it now
/// (0 while it has none).
pub fn datapath_count(agent: &Agent, reason: &str) -> u64 {
    let (_, body) = agent.get(agent.metrics_port, "/metrics");
    count_in(&body, reason)
}

/// Every datapath event and drop counter `agent` reports now that is not zero, one per line:
/// for a failure message.
pub fn datapath_counters(agent: &Agent) -> String {
    let (_, body) = agent.get(agent.metrics_port, "/metrics");
    body.lines()
        .filter(|l| {
            (l.starts_with("kube_bpf_proxy_datapath_events_total")
                || l.starts_with("kube_bpf_proxy_drops_total"))
                && !l.ends_with(" 0")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `reason`'s datapath counter in a metrics page (0 when absent).
fn count_in(body: &str, reason: &str) -> u64 {
    let needle = format!("kube_bpf_proxy_datapath_events_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Polls `agent`'s counter for `reason` until it reaches `n` (the agent samples the datapath's
/// counters every 5 s); its value then. On a time-out, every datapath counter is shown.
pub fn datapath_events_reach(agent: &Agent, reason: &str, n: u64) -> u64 {
    poll_until(
        &format!("datapath counter {reason} at {n} or more"),
        Duration::from_secs(15),
        || {
            let (_, body) = agent.get(agent.metrics_port, "/metrics");
            let v = count_in(&body, reason);
            if v >= n {
                Ok(v)
            } else {
                Err(body
                    .lines()
                    .filter(|l| l.starts_with("kube_bpf_proxy_datapath_events_total"))
                    .collect::<Vec<_>>()
                    .join("\n"))
            }
        },
    )
}

/// `kube-bpf-proxy services -o json` of `agent`: the frontends (`items` of the ServiceList).
pub fn services_json(agent: &Agent) -> Vec<serde_json::Value> {
    let out =
        std::process::Command::new(tests::harness::process::workspace_binary("kube-bpf-proxy"))
            .args(["services", "-o", "json", "--bpffs"])
            .arg(&agent.pin_dir)
            .output()
            .expect("run services");
    assert!(
        out.status.success(),
        "services: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("services JSON");
    assert_eq!(v["kind"], "ServiceList", "{v}");
    v["items"].as_array().expect("a list of frontends").clone()
}

/// `ip:port` (`[ip6]:port`) of an object with `address` and `port` (a backend, a frontend).
pub fn host_port(v: &serde_json::Value) -> String {
    let address = v["address"].as_str().expect("address");
    let port = v["port"].as_u64().expect("port");
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// A frontend of `services -o json` as the table names it: `10.96.0.10:80/TCP`, with
/// `external ` in front for the tc path's.
pub fn frontend_name(f: &serde_json::Value) -> String {
    let external = if f["reach"] == "external" {
        "external "
    } else {
        ""
    };
    format!(
        "{external}{}/{}",
        host_port(f),
        f["protocol"].as_str().expect("protocol")
    )
}

/// The entries of `agent`'s IPv4 connection tracking (`LB_CT4`), as `pinned_entries`.
pub fn ct4_entries(agent: &Agent) -> Vec<serde_json::Value> {
    pinned_entries(agent, "LB_CT4")
}

/// The entries of `agent`'s pinned map `map` as bpftool prints them, each as its
/// BTF-formatted `{key, value}` where bpftool gives one.
pub fn pinned_entries(agent: &Agent, map: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(agent.pin_dir.join(map))
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool: {out:?}");
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    all.into_iter()
        .map(
            |mut e| match e.get_mut("formatted").map(serde_json::Value::take) {
                Some(formatted) if !formatted.is_null() => formatted,
                _ => e,
            },
        )
        .collect()
}

/// Active connections per backend address of a least-connection frontend (`services -o json`
/// of `agent`; `frontend` as `services` names it, e.g. `10.96.0.46:80/TCP`).
pub fn lc_connections(agent: &Agent, frontend: &str) -> BTreeMap<String, u64> {
    counted_connections(agent, frontend, "least-connection")
}

/// Like `lc_connections`, for a frontend whose scheduler (as `services` names it) is
/// `scheduler`, one of those that count connections.
pub fn counted_connections(
    agent: &Agent,
    frontend: &str,
    scheduler: &str,
) -> BTreeMap<String, u64> {
    let items = services_json(agent);
    let f = items
        .iter()
        .find(|f| frontend_name(f) == frontend)
        .unwrap_or_else(|| panic!("no {frontend} in {items:?}"));
    assert_eq!(f["scheduler"], scheduler);
    f["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (host_port(b), b["connections"].as_u64().unwrap()))
        .collect()
}

/// The backend addresses (`ip:port`) the maps give new connections of `frontend` (`services -o
/// json` of `agent`: backends holding slots); empty if the frontend is not in the maps.
pub fn programmed_backends(agent: &Agent, frontend: &str) -> std::collections::BTreeSet<String> {
    services_json(agent)
        .iter()
        .filter(|f| frontend_name(f) == frontend)
        .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["slots"].as_u64().unwrap_or(0) > 0)
        .map(|b| host_port(&b))
        .collect()
}

/// Wall-clock milliseconds, comparable with the `t` of `testhost udp-stream` lines.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `kube-bpf-proxy ARGS --bpffs PIN_DIR` in node-a's namespace (the pins of `agent`).
pub fn cli_in_node(tb: &tests::Testbed, agent: &Agent, args: &[&str]) -> std::process::Output {
    use tests::harness::process::{Placement, command_in, workspace_binary};
    let netns = tb.node_ns_path(0);
    command_in(
        &Placement {
            netns: &netns,
            cgroup_procs: None,
        },
        &workspace_binary("kube-bpf-proxy"),
        args,
    )
    .arg("--bpffs")
    .arg(&agent.pin_dir)
    .output()
    .expect("run kube-bpf-proxy")
}

/// `kube-bpf-proxy verify` of `agent`'s manifests against its pins, in node-a's namespace, as
/// node `node`.
/// Asserts that `verify` in node `node`'s namespace finds no drift (`what` names the moment).
pub fn assert_verified(tb: &tests::Testbed, agent: &Agent, node: &str, what: &str) {
    let out = verify_in_node(tb, agent, node);
    assert!(
        out.status.success(),
        "verify {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn verify_in_node(tb: &tests::Testbed, agent: &Agent, node: &str) -> std::process::Output {
    let manifests = agent.manifests.display().to_string();
    cli_in_node(
        tb,
        agent,
        &[
            "verify",
            "--manifests",
            &manifests,
            "--hostname-override",
            node,
        ],
    )
}

/// `verify` against the agent's manifests and pins, as its node: (exit code, output).
pub fn verify(env: &Env) -> (i32, String) {
    let out =
        std::process::Command::new(tests::harness::process::workspace_binary("kube-bpf-proxy"))
            .arg("verify")
            .arg("--manifests")
            .arg(&env.agent.manifests)
            .args(["--hostname-override", NODE, "--bpffs"])
            .arg(&env.agent.pin_dir)
            .output()
            .expect("run verify");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
