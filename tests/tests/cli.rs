//! The inspection commands against a live agent: `status`, `services`, `explain`, `verify`,
//! `cleanup`, in both output formats.

mod common;

use std::{process::Command, time::Duration};

use common::*;
use tests::harness::{process::workspace_binary, topology::Proto};

/// Runs `kube-bpf-proxy ARGS --bpffs <pins>`; returns (exit code, stdout).
fn cli(env: &Env, args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_binary("kube-bpf-proxy"))
        .args(args)
        .arg("--bpffs")
        .arg(&env.agent.pin_dir)
        .output()
        .expect("run kube-bpf-proxy");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "$ kube-bpf-proxy {}\n{stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

/// Runs `kube-bpf-proxy verify ARGS` against the agent's manifests, as its node.
fn verify(env: &Env, args: &[&str]) -> (i32, String) {
    let manifests = env.agent.manifests.display().to_string();
    let source = ["--manifests", &manifests, "--hostname-override", NODE];
    cli(env, &[&["verify"][..], args, &source].concat())
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Service `web` whose endpoints cover every reason an endpoint can be passed over:
/// pod-2 ready in zone-a, pod-3 terminating, pod-4 not ready, pod-5 ready but hinted to zone-b.
fn web(env: &mut Env) {
    write_web(
        env,
        &[
            (1, "hints: {forZones: [{name: zone-a}]}"),
            (
                2,
                "conditions: {ready: false, serving: true, terminating: true}",
            ),
            (3, "conditions: {ready: false}"),
            (4, "hints: {forZones: [{name: zone-b}]}"),
        ],
    );
    env.wait_for_backends(Proto::Tcp, "10.96.0.10:80".parse().unwrap(), &["pod-2"]);
}

/// Writes this node (in zone-a), Service `web` (10.96.0.10:80) and its slice `web-1`: one
/// endpoint on this node per `(pod, fields)`, `fields` the rest of its YAML mapping.
fn write_web(env: &mut Env, endpoints: &[(usize, &str)]) {
    env.agent
        .write_manifest("node.yaml", &node_yaml(NODE, Some("zone-a")));
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &["10.96.0.10"], &[HTTP], ""),
    );
    let lines: String = endpoints
        .iter()
        .map(|(pod, fields)| {
            let ip = env.topo.pods[*pod].ip4;
            format!("- {{addresses: [\"{ip}\"], nodeName: {NODE}, {fields}}}\n")
        })
        .collect();
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}, protocol: TCP}}]\nendpoints:\n{lines}"
    );
    env.agent.write_manifest("slice.yaml", &slice);
}

#[test]
fn status_and_services_show_the_kernel_state() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(5);
    web(&mut env);
    let (code, table) = cli(&env, &["status"]);
    assert_eq!(code, 0);
    assert!(table.contains("running"), "{table}");
    // 9 socket hooks (8 sock_addr and sock_release); no tc or XDP outside a testbed node.
    assert_eq!(table.matches("attached").count(), 9, "{table}");
    let (code, out) = cli(&env, &["status", "-o", "json"]);
    assert_eq!(code, 0);
    let status = json(&out);
    assert_eq!(status["apiVersion"], "kube-bpf-proxy.io/v1");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["agent"]["running"], true);
    assert_eq!(
        status["socketTermination"], true,
        "this kernel has SOCK_DESTROY"
    );
    assert!(status["agent"]["syncs"].as_u64().unwrap() >= 1);
    let maps = status["maps"].as_array().unwrap();
    let services = maps.iter().find(|m| m["name"] == "LB4_SERVICES").unwrap();
    assert_eq!(
        services["entries"], 2,
        "the frontend and its ClusterIP marker"
    );
    let backends = maps.iter().find(|m| m["name"] == "LB_BACKENDS").unwrap();
    assert_eq!(backends["entries"], 1);
    let translated = status["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["reason"] == "translated")
        .unwrap();
    assert!(translated["count"].as_u64().unwrap() >= 1);

    let (code, table) = cli(&env, &["services"]);
    assert_eq!(code, 0);
    let pod2 = format!("{}:{BACKEND_PORT}", env.topo.pods[1].ip4);
    let row = table
        .lines()
        .find(|l| l.starts_with("10.96.0.10:80/TCP"))
        .unwrap_or_else(|| panic!("no row for the frontend: {table}"));
    assert!(
        row.contains("ClusterIP") && row.contains("default/web:http/TCP"),
        "{row}"
    );
    assert!(row.contains(&pod2) && row.contains("balance"), "{row}");
    let (code, out) = cli(&env, &["services", "--output", "json"]);
    assert_eq!(code, 0);
    let list = json(&out);
    assert_eq!(list["kind"], "ServiceList");
    let f = &list["items"][0];
    assert_eq!(frontend_name(f), "10.96.0.10:80/TCP");
    assert_eq!(
        (&f["scope"], &f["reach"]),
        (&"clusterIP".into(), &"internal".into())
    );
    assert_eq!(
        f["service"],
        serde_json::json!({"namespace": "default", "name": "web", "port": "http"})
    );
    assert_eq!(f["action"], "balance");
    assert_eq!(host_port(&f["backends"][0]), pod2);
    assert_eq!(f["backends"][0]["local"], true);
    assert_eq!(f["backends"][0]["state"], "ready");
}

#[test]
fn explain_names_the_reason_for_every_excluded_endpoint() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(5);
    web(&mut env);
    let manifests = env.agent.manifests.display().to_string();
    let client = env.topo.pods[0].ip4.to_string();
    let args = [
        "explain",
        client.as_str(),
        "10.96.0.10:80/TCP",
        "--manifests",
        manifests.as_str(),
        "--hostname-override",
        NODE,
    ];
    let (code, out) = cli(&env, &[&args[..], &["-o", "json"]].concat());
    assert_eq!(code, 0);
    let v = json(&out);
    assert_eq!(v["kind"], "Explanation");
    assert_eq!(v["verdict"], "translated");
    assert_eq!(v["matched"]["service"]["name"], "web");
    assert_eq!(v["matched"]["backends"][0]["node"], NODE);
    let eligible = v["eligible"].as_array().unwrap();
    assert_eq!(eligible.len(), 1);
    assert_eq!(eligible[0]["probability"], 1.0);
    let reasons: Vec<(String, String)> = v["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (host_port(e), e["reason"].as_str().unwrap().to_string()))
        .collect();
    let causes: std::collections::BTreeSet<&str> = v["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cause"].as_str().unwrap())
        .collect();
    assert_eq!(
        causes,
        ["fallbackOnly", "notReady", "zoneHint"]
            .into_iter()
            .collect()
    );
    let reason_of = |pod: usize| {
        let ep = format!("{}:{BACKEND_PORT}", env.topo.pods[pod].ip4);
        reasons
            .iter()
            .find(|(e, _)| *e == ep)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{ep} not listed as excluded: {reasons:?}"))
    };
    assert!(reason_of(2).starts_with("terminating"), "{reasons:?}");
    assert_eq!(reason_of(3), "not ready");
    assert!(reason_of(4).contains("zone"), "{reasons:?}");
    assert_eq!(reasons.len(), 3);
    assert!(v["reason"].as_str().unwrap().contains("100%"));
    assert_eq!(v["next"]["decidedBy"], "scheduler");

    let (code, table) = cli(&env, &args);
    assert_eq!(code, 0);
    assert!(
        table.contains("not ready") && table.contains("next connection: random"),
        "{table}"
    );
    // An undefined port of the ClusterIP, and an address that is no Service.
    let (_, out) = cli(&env, &["explain", &client, "10.96.0.10:81/TCP"]);
    assert!(out.contains("rejected (ECONNREFUSED)"), "{out}");
    let (_, out) = cli(&env, &["explain", &client, "10.96.0.99:80/TCP"]);
    assert!(out.contains("untouched"), "{out}");
    for (frontend, verdict) in [
        ("10.96.0.10:81/TCP", "rejected"),
        ("10.96.0.99:80/TCP", "untouched"),
    ] {
        let (_, out) = cli(&env, &["explain", &client, frontend, "-o", "json"]);
        let v = json(&out);
        assert_eq!(v["verdict"], verdict, "{v}");
        assert!(v.get("matched").is_none(), "{v}");
    }
}

#[test]
fn verify_reports_injected_drift_and_nothing_otherwise() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(5);
    web(&mut env);
    let (code, out) = verify(&env, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("in sync"), "{out}");
    let (code, out) = verify(&env, &["-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["kind"], "Verification");
    assert_eq!(json(&out)["inSync"], true);

    // Change the only backend's port behind the agent's back, with bpftool.
    let (_, services) = cli(&env, &["services", "-o", "json"]);
    let backend_id = json(&services)["items"][0]["backends"][0]["id"]
        .as_u64()
        .unwrap() as u32;
    let map = env.agent.pin_dir.join("LB_BACKENDS");
    let key: Vec<String> = backend_id
        .to_le_bytes()
        .iter()
        .map(|b| b.to_string())
        .collect();
    let mut value = [0u8; 24];
    value[..4].copy_from_slice(&env.topo.pods[1].ip4.octets());
    value[16..18].copy_from_slice(&9999u16.to_le_bytes());
    value[18] = 6; // TCP
    value[19] = 4; // IPv4
    value[22..24].copy_from_slice(&1u16.to_le_bytes());
    let value: Vec<String> = value.iter().map(|b| b.to_string()).collect();
    let status = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&map)
        .arg("key")
        .args(&key)
        .arg("value")
        .args(&value)
        .status()
        .expect("run bpftool");
    assert!(status.success());
    let (code, out) = verify(&env, &[]);
    assert_eq!(code, 1, "drift must exit 1: {out}");
    assert!(out.contains("DRIFT") && out.contains("PutBackend"), "{out}");
    let (code, out) = verify(&env, &["-o", "json"]);
    assert_eq!(code, 1);
    let v = json(&out);
    assert_eq!(v["inSync"], false);
    let put = v["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["map"] == "LB_BACKENDS" && d["operation"] == "put")
        .unwrap_or_else(|| panic!("no LB_BACKENDS put: {v}"));
    // The backend as the source wants it (under the id the planner picks: the altered entry
    // no longer has the wanted value, so it gets a new one and the altered one goes).
    assert!(put["key"]["backendId"].is_u64(), "{put}");
    assert_eq!(put["value"]["port"], BACKEND_PORT);
}

/// semantics 5.5: an agent run with kube-proxy's `--feature-gates
/// PreferSameTrafficDistribution=false` does not read node hints: a PreferSameNode Service is
/// served over its zone hints; it records that in its pins, so `verify` (run without the
/// flag) finds no drift and `explain` gives the zone as the reason.
#[test]
fn without_the_prefer_same_node_gate_node_hints_are_not_read() {
    if !privileged() {
        return;
    }
    let (mut env, _) =
        Env::with_agent_args(4, &["--feature-gates=PreferSameTrafficDistribution=false"]);
    // pod-2 is hinted for this node, pod-3 for another node of this zone, pod-4 for a node
    // of zone-b: node hints would pick pod-2 alone, zone hints pick pod-2 and pod-3.
    let hints = |node: &str, zone: &str| {
        format!("hints: {{forNodes: [{{name: {node}}}], forZones: [{{name: {zone}}}]}}")
    };
    write_web(
        &mut env,
        &[
            (1, &hints(NODE, "zone-a")),
            (2, &hints("node-b", "zone-a")),
            (3, &hints("node-c", "zone-b")),
        ],
    );
    env.wait_for_backends(
        Proto::Tcp,
        "10.96.0.10:80".parse().unwrap(),
        &["pod-2", "pod-3"],
    );
    let (code, out) = verify(&env, &[]);
    assert_eq!(code, 0, "{out}");
    let manifests = env.agent.manifests.display().to_string();
    let client = env.topo.pods[0].ip4.to_string();
    let (code, out) = cli(
        &env,
        &[
            "explain",
            &client,
            "10.96.0.10:80/TCP",
            "--manifests",
            &manifests,
            "--hostname-override",
            NODE,
            "-o",
            "json",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let v = json(&out);
    assert_eq!(v["eligible"].as_array().unwrap().len(), 2, "{v}");
    let causes: Vec<&str> = v["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cause"].as_str().unwrap())
        .collect();
    assert_eq!(causes, ["zoneHint"], "{v}");
    // /configz shows the gate as set.
    let (_, body) = tests::harness::agent::http_get(env.agent.metrics_port, "/configz");
    let configz: serde_json::Value = serde_json::from_str(&body).expect("/configz is JSON");
    assert_eq!(
        configz["kubeproxy.config.k8s.io"]["featureGates"],
        serde_json::json!({"PreferSameTrafficDistribution": false}),
        "{body}"
    );
}

/// A change large enough that the agent writes its members and backends in batches of
/// thousands, each batch by two threads at once (and its slots, 16 to an entry, in hundreds): read back, the maps hold exactly what the
/// manifests ask for, and removing it all leaves no entry of it.
#[test]
fn large_batches_are_written_whole() {
    if !privileged() {
        return;
    }
    let env = Env::new(1);
    let (services, endpoints) = (60usize, 100usize);
    let mut text = String::new();
    for i in 0..services {
        text.push_str(&service_yaml(
            &format!("bulk-{i}"),
            &[&format!("10.96.7.{}", i + 1)],
            &[HTTP],
            "",
        ));
        text.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: bulk-{i}-1, namespace: default, labels: {{kubernetes.io/service-name: bulk-{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}, protocol: TCP}}]\nendpoints:\n"
        ));
        for e in 0..endpoints {
            text.push_str(&format!("- {{addresses: [\"10.250.{i}.{}\"]}}\n", e + 1));
        }
        text.push_str("---\n");
    }
    env.agent.write_manifest("bulk.yaml", &text);
    // The entries of the three maps, once the agent has pinned them.
    let counts = |env: &Env| {
        let (code, out) = cli(env, &["status", "-o", "json"]);
        if code != 0 {
            return None;
        }
        let v = json(&out);
        let count = |map: &str| {
            v["maps"]
                .as_array()
                .and_then(|maps| maps.iter().find(|m| m["name"] == map))
                .and_then(|m| m["entries"].as_u64())
                .unwrap_or_else(|| panic!("no entry count of {map}: {v}"))
        };
        Some((count("LB_SLOTS"), count("LB_MEMBERS"), count("LB_BACKENDS")))
    };
    let want = (services * endpoints) as u64;
    // Slots go 16 to an LB_SLOTS entry.
    let chunks = (services * endpoints.div_ceil(proxy_common::service::SLOT_CHUNK)) as u64;
    tests::poll_until(
        "the change programmed whole",
        Duration::from_secs(60),
        || {
            let (code, out) = verify(&env, &[]);
            let now = counts(&env);
            if code == 0 && now == Some((chunks, want, want)) {
                assert!(out.contains("in sync"), "{out}");
                Ok(())
            } else {
                Err(format!("verify {code}, entries {now:?}: {out}"))
            }
        },
    );
    env.agent.remove_manifest("bulk.yaml");
    tests::poll_until(
        "the change removed whole",
        Duration::from_secs(60),
        || match counts(&env) {
            Some((0, 0, 0)) => Ok(()),
            now => Err(format!("entries {now:?}")),
        },
    );
    let (code, out) = verify(&env, &[]);
    assert_eq!(code, 0, "{out}");
}

/// `status --wait` returns 0 once the running agent has programmed a sync, and 1 with the
/// reason when it has not within `--timeout` (here: no agent runs any more).
#[test]
fn status_wait_exits_once_a_sync_is_programmed() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(2);
    // Started, maybe not synced yet: --wait waits for it.
    let (code, out) = cli(&env, &["status", "--wait", "--timeout", "30s"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("running"), "{out}");
    assert!(!out.contains(" 0 syncs"), "waited for a sync: {out}");
    env.agent.kill();
    let started = std::time::Instant::now();
    let out = Command::new(workspace_binary("kube-bpf-proxy"))
        .args(["status", "--wait", "--timeout", "500ms", "--bpffs"])
        .arg(&env.agent.pin_dir)
        .output()
        .expect("run kube-bpf-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not running"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the timeout bounds the wait"
    );
}

#[test]
fn cleanup_leaves_nothing_behind() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(2);
    service_with_one_backend(&env, "web", "10.96.0.10", 1);
    let vip = "10.96.0.10:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2"]);
    env.agent.kill();
    // The hooks outlive the agent...
    assert!(env.request(Proto::Tcp, vip, 1)[0].ok);
    let (code, out) = cli(&env, &["cleanup"]);
    assert_eq!(code, 0, "{out}");
    // ...until cleanup: no pin, no program on the cgroup, no translation.
    assert!(!env.agent.pin_dir.exists(), "pin directory left behind");
    let attached = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(env.topo.cgroup_path())
        .output()
        .expect("bpftool cgroup show");
    let attached = String::from_utf8_lossy(&attached.stdout);
    assert!(
        attached.trim().is_empty(),
        "programs still attached: {attached}"
    );
    tests::poll_until("VIP no longer translated", Duration::from_secs(5), || {
        let r = env.request(Proto::Tcp, vip, 1);
        if r[0].ok {
            Err(format!("{r:?}"))
        } else {
            Ok(())
        }
    });
}

/// /metrics carries kube-proxy's sync metrics, map fill levels and datapath counters;
/// /healthz and /livez answer 200 once the agent has synced.
#[test]
fn metrics_and_health_endpoints() {
    if !privileged() {
        return;
    }
    use tests::harness::agent::http_get;
    let mut env = Env::new(5);
    web(&mut env);
    let (code, body) = http_get(env.agent.health_port, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["healthy"], true);
    let (code, _) = http_get(env.agent.health_port, "/livez");
    assert_eq!(code, 200);
    let port = env.agent.metrics_port;
    let body = tests::poll_until(
        "datapath counters in /metrics",
        Duration::from_secs(15),
        || {
            let (code, body) = http_get(port, "/metrics");
            let translated = body
                .lines()
                .find(|l| {
                    l.starts_with("kube_bpf_proxy_datapath_events_total{reason=\"translated\"}")
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if code == 200 && translated >= 1.0 {
                Ok(body)
            } else {
                Err(body)
            }
        },
    );
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        // semantics 11.7: the nftables proxier's failure counters; the first sync is full.
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"} 0",
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family=\"IPv4\"} 0",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket",
        // semantics 11.4: nothing pending once synced.
        "kubeproxy_sync_proxy_rules_service_changes_pending{ip_family=\"IPv4\"} 0",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending{ip_family=\"IPv4\"} 0",
        "kube_bpf_proxy_map_entries{map=\"LB_BACKENDS\"} 1",
        "kube_bpf_proxy_socket_termination_active 1",
        "kube_bpf_proxy_map_max_entries{map=\"LB_BACKENDS\"}",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    // semantics 11.6: one Service and one EndpointSlice, each written once: one event each,
    // however often the node's state (its addresses, the pods' interfaces) made the agent
    // look at the same objects again.
    for counter in [
        "kubeproxy_sync_proxy_rules_service_changes_total{ip_family=\"IPv4\"} 1\n",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total{ip_family=\"IPv4\"} 1\n",
    ] {
        assert!(body.contains(counter), "/metrics lacks {counter}:\n{body}");
    }
    // semantics 8.10: the metrics server's own /healthz and /proxyMode; 8.7: the health
    // server answers its two paths only (the metrics stay on the loopback address).
    assert_eq!(http_get(port, "/healthz"), (200, "ok".to_string()));
    assert_eq!(http_get(port, "/proxyMode"), (200, "nftables".to_string()));
    // /configz: the settings the agent runs with, under kube-proxy's key.
    let (status, body) = http_get(port, "/configz");
    assert_eq!(status, 200);
    let configz: serde_json::Value = serde_json::from_str(&body).expect("/configz is JSON");
    let config = &configz["kubeproxy.config.k8s.io"];
    assert_eq!(config["mode"], "nftables", "{body}");
    assert_eq!(config["hostnameOverride"], NODE, "{body}");
    assert_eq!(
        config["metricsBindAddress"],
        format!("127.0.0.1:{port}"),
        "{body}"
    );
    assert_eq!(
        config["conntrack"]["tcpEstablishedTimeout"], "24h0m0s",
        "{body}"
    );
    assert_eq!(
        config["conntrack"]["tcpCloseWaitTimeout"], "1h0m0s",
        "{body}"
    );
    assert_eq!(http_get(env.agent.health_port, "/configz").0, 404);
    assert_eq!(http_get(env.agent.health_port, "/metrics").0, 404);
}

/// semantics 8.10: an address taken when the agent starts (the kube-proxy it replaces still
/// holds 10256) is logged and tried again every 5 s; once free, it is served without a restart.
#[test]
fn a_taken_health_address_is_served_once_free() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(2);
    env.agent.wait_for_log(0, "synced", Duration::from_secs(20));
    env.agent.kill();
    let taken = std::net::TcpListener::bind(("127.0.0.1", env.agent.health_port))
        .expect("take the health port");
    let from = env.agent.log_position();
    env.agent.start();
    env.agent.wait_for_log(
        from,
        "cannot serve health checks on",
        Duration::from_secs(20),
    );
    env.agent
        .wait_for_log(from, "synced", Duration::from_secs(20));
    drop(taken);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], env.agent.health_port));
    tests::poll_until("/healthz served", Duration::from_secs(15), || {
        match tests::harness::agent::try_http_get_in(None, addr, "/healthz") {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("{} {}", r.status, r.body)),
            Err(e) => Err(e.to_string()),
        }
    });
    env.agent.assert_running();
    let line = env
        .agent
        .wait_for_log(from, "serving health checks on", Duration::from_secs(1));
    assert!(line.contains("bound at attempt"), "{line}");
}

/// `debug-log on` makes the programs log each translation into the agent's log at runtime;
/// `off` stops it.
#[test]
fn bpf_debug_logs_switch_at_runtime() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(2);
    service_with_one_backend(&env, "web", "10.96.0.10", 1);
    let vip = "10.96.0.10:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2"]);
    let quiet = env.agent.log_position();
    let (code, _) = cli(&env, &["debug-log", "on"]);
    assert_eq!(code, 0);
    assert!(env.request(Proto::Tcp, vip, 1)[0].ok);
    let backend = format!("-> {}:{BACKEND_PORT}", env.topo.pods[1].ip4);
    let line = env
        .agent
        .wait_for_log(quiet, "kbp: 10.96.0.10:80 proto 6", Duration::from_secs(10));
    assert!(line.contains(&backend), "{line}");
    let (code, _) = cli(&env, &["debug-log", "off"]);
    assert_eq!(code, 0);
    let off = env.agent.log_position();
    for r in env.request(Proto::Tcp, vip, 5) {
        assert!(r.ok);
    }
    // Turn it back on and make one marker connection: records are delivered in order, so
    // anything logged while off would show up before the marker's line.
    cli(&env, &["debug-log", "on"]);
    assert!(env.request(Proto::Tcp, vip, 1)[0].ok);
    env.agent
        .wait_for_log(off, "kbp: 10.96.0.10:80", Duration::from_secs(10));
    let count = env.agent.count_logs(off, "kbp: 10.96.0.10:80");
    assert_eq!(
        count, 1,
        "translations were logged while debug logs were off"
    );
}

/// semantics 8.8, 8.9: /healthz answers 503 with `nodeEligible: false` while the Node is
/// marked for deletion by the cluster autoscaler or has a deletionTimestamp; /livez ignores
/// eligibility.
#[test]
fn healthz_follows_node_eligibility() {
    if !privileged() {
        return;
    }
    use tests::harness::agent::http_get;
    let mut env = Env::new(2);
    env.agent.wait_for_log(0, "synced", Duration::from_secs(20));
    let port = env.agent.health_port;
    let wait = |code: u16, eligible: bool| {
        tests::poll_until(
            &format!("/healthz {code} nodeEligible {eligible}"),
            Duration::from_secs(10),
            || {
                let (got, body) = http_get(port, "/healthz");
                let v: serde_json::Value =
                    serde_json::from_str(&body).map_err(|e| e.to_string())?;
                if got == code && v["nodeEligible"] == eligible {
                    Ok(())
                } else {
                    Err(format!("{got} {body}"))
                }
            },
        );
        let (live, body) = http_get(port, "/livez");
        assert_eq!(live, 200, "{body}");
    };
    wait(200, true);
    let tainted = format!(
        "{}spec:\n  taints: [{{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}}]\n",
        node_yaml(NODE, None)
    );
    env.agent.write_manifest("node.yaml", &tainted);
    wait(503, false);
    env.agent
        .write_manifest("node.yaml", &node_yaml(NODE, None));
    wait(200, true);
    let deleting = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n"
    );
    env.agent.write_manifest("node.yaml", &deleting);
    wait(503, false);
    env.agent
        .write_manifest("node.yaml", &node_yaml(NODE, None));
    wait(200, true);
}

/// `monitor` (issue #23): switches the programs' events on while it runs and prints them as
/// JSON lines: a translated connect() names frontend, Service, scheduler and backend; a
/// connect() to a Service without endpoints is a drop at the connect hook for `no_backends`
/// (semantics 3.7), which `/metrics` counts by hook and reason. When it exits, events stop.
#[test]
fn monitor_streams_translations_and_refusals() {
    if !privileged() {
        return;
    }
    use std::{
        io::{BufRead as _, BufReader},
        process::Stdio,
    };
    use tests::harness::agent::http_get;
    let mut env = Env::new(2);
    service_with_one_backend(&env, "web", "10.96.0.10", 1);
    env.agent.write_manifest(
        "empty.yaml",
        &service_yaml("empty", &["10.96.0.11"], &[HTTP], ""),
    );
    let vip = "10.96.0.10:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2"]);
    let empty = "10.96.0.11:80".parse().unwrap();
    tests::poll_until("the empty Service refuses", Duration::from_secs(15), || {
        let r = &env.request(Proto::Tcp, empty, 1)[0];
        if r.ok {
            Err("answered".to_string())
        } else {
            Ok(())
        }
    });
    let pins = env.agent.pin_dir.clone();
    let watching = || {
        proxy_userspace::datapath::bpf::Maps::open_pinned(&pins)
            .and_then(|m| m.monitor_until())
            .unwrap_or(0)
    };
    assert_eq!(watching(), 0, "events are off while nobody watches");
    // `monitor ARGS`, once it has switched the events on.
    let start_monitor = |args: &[&str], stdout: Stdio| {
        let monitor = Command::new(workspace_binary("kube-bpf-proxy"))
            .arg("monitor")
            .args(args)
            .arg("--bpffs")
            .arg(&pins)
            .stdout(stdout)
            .spawn()
            .expect("start monitor");
        tests::poll_until(
            "monitor switched events on",
            Duration::from_secs(10),
            || {
                if watching() > 0 {
                    Ok(())
                } else {
                    Err(String::new())
                }
            },
        );
        monitor
    };
    let mut monitor = start_monitor(
        &["--output", "json", "--count", "2", "--seconds", "60"],
        Stdio::piped(),
    );
    assert!(env.request(Proto::Tcp, vip, 1)[0].ok);
    assert!(!env.request(Proto::Tcp, empty, 1)[0].ok);
    let lines: Vec<serde_json::Value> = BufReader::new(monitor.stdout.take().unwrap())
        .lines()
        .map(|l| json(&l.expect("monitor output")))
        .collect();
    let status = monitor.wait().expect("monitor exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let (t, d) = (&lines[0], &lines[1]);
    // Each line is a versioned document (schema/event.v1.json).
    assert_eq!(t["apiVersion"], "kube-bpf-proxy.io/v1", "{t}");
    assert_eq!(t["kind"], "Event", "{t}");
    assert_eq!(t["event"], "translated", "{t}");
    assert_eq!(t["hook"], "connect");
    assert_eq!(t["protocol"], "TCP");
    assert_eq!(t["family"], "IPv4");
    assert_eq!(t["frontend"], "10.96.0.10");
    assert_eq!(t["frontendPort"], 80);
    assert_eq!(t["backend"], env.topo.pods[1].ip4.to_string());
    assert_eq!(t["backendPort"], BACKEND_PORT);
    assert_eq!(t["scheduler"], "random");
    assert_eq!(t["scope"], "clusterIP");
    assert_eq!(t["reason"], "translated");
    assert_eq!(t["service"]["namespace"], "default", "{t}");
    assert_eq!(t["service"]["name"], "web", "{t}");
    // The client is its network namespace's address, where the agent knows it.
    if !t["client"].is_null() {
        assert_eq!(t["client"], env.topo.pods[0].ip4.to_string(), "{t}");
    }
    assert_eq!(d["event"], "dropped", "{d}");
    assert_eq!(d["hook"], "connect");
    assert_eq!(d["reason"], "no_backends");
    assert_eq!(d["frontend"], "10.96.0.11");
    assert_eq!(d["service"]["name"], "empty", "{d}");
    assert_eq!(d["backend"], serde_json::Value::Null, "{d}");
    assert_eq!(watching(), 0, "a monitor that exits switches events off");
    // Interrupted (Ctrl-C or SIGTERM), a monitor also exits cleanly and switches events off.
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let mut monitor = start_monitor(&["--seconds", "60"], Stdio::null());
        // SAFETY: signals a child this test started and has not reaped.
        assert_eq!(
            unsafe { libc::kill(monitor.id() as libc::pid_t, signal) },
            0
        );
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = monitor.try_wait().expect("wait for monitor") {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "monitor ignored signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "signal {signal}: {status:?}");
        assert_eq!(watching(), 0, "an interrupted monitor switches events off");
    }
    let port = env.agent.metrics_port;
    tests::poll_until("drops in /metrics", Duration::from_secs(15), || {
        let (_, body) = http_get(port, "/metrics");
        let drops = body
            .lines()
            .find(|l| {
                l.starts_with("kube_bpf_proxy_drops_total{hook=\"connect\",reason=\"no_backends\"}")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if drops >= 2.0 { Ok(()) } else { Err(body) }
    });
}
