//! Agent restarts: the hooks and maps are pinned, so a killed agent leaves the datapath serving,
//! and a new agent swaps its programs into the pinned links and adopts the maps without
//! rewriting them.

mod common;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use common::*;
use tests::harness::topology::Proto;

/// Runs `body` while a client in pod 0 opens TCP connections to `vip`, ten a batch, for at
/// most `limit`; `body` gets the agent and a function that waits until `n` more batches are done.
/// Returns the connections attempted and the failed ones.
fn under_load(
    env: &mut Env,
    vip: SocketAddr,
    limit: Duration,
    body: impl FnOnce(&mut tests::Agent, &dyn Fn(usize)),
) -> (usize, Vec<tests::Reply>) {
    let stop = AtomicBool::new(false);
    let batches = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let topo = &env.topo;
        let (stop, batches) = (&stop, &batches);
        let client = s.spawn(move || {
            let (mut attempted, mut failed) = (0, Vec::new());
            let deadline = Instant::now() + limit;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for r in topo.request(0, Proto::Tcp, vip, 10) {
                    attempted += 1;
                    if !r.ok {
                        failed.push(r);
                    }
                }
                batches.fetch_add(1, Ordering::Relaxed);
            }
            (attempted, failed)
        });
        let wait_batches = |n: usize| {
            let target = batches.load(Ordering::Relaxed) + n;
            tests::poll_until("client batches", Duration::from_secs(30), || {
                if batches.load(Ordering::Relaxed) >= target {
                    Ok(())
                } else {
                    Err("running".into())
                }
            });
        };
        body(&mut env.agent, &wait_batches);
        stop.store(true, Ordering::Relaxed);
        client.join().expect("client thread")
    })
}

#[test]
fn sigkill_and_restart_fail_no_connection() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(3);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &["10.96.0.10"], &[HTTP], ""),
    );
    let pods = &env.topo.pods;
    env.agent.write_manifest(
        "slice.yaml",
        &slice_yaml(
            "web-1",
            "web",
            "IPv4",
            &[HTTP],
            &[ep(pods[1].ip4), ep(pods[2].ip4)],
        ),
    );
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2", "pod-3"]);

    let (attempted, failed) = under_load(
        &mut env,
        vip,
        Duration::from_secs(60),
        |agent, wait_batches| {
            wait_batches(2);
            agent.kill();
            // Agent gone: the pinned hooks keep translating.
            wait_batches(3);
            let from = agent.log_position();
            agent.start();
            agent.wait_for_log(
                from,
                "0 attached, 9 replaced in place",
                Duration::from_secs(10),
            );
            let synced = agent.wait_for_log(from, "synced:", Duration::from_secs(10));
            assert!(
                synced.contains(" 0 map writes"),
                "an unchanged cluster must not be rewritten on restart: {synced}"
            );
            wait_batches(3);
        },
    );
    eprintln!(
        "restart: {attempted} connections attempted, {} failed",
        failed.len()
    );
    assert!(
        attempted >= 80,
        "too few connections to mean anything: {attempted}"
    );
    assert!(
        failed.is_empty(),
        "{} of {attempted} failed: {failed:?}",
        failed.len()
    );
}

/// An agent replaced by another binary while one of twenty Services changed: the new agent
/// swaps its programs into the pinned links, and its first sync writes only what concerns the
/// changed Service, not the whole state.
#[test]
fn upgrade_after_a_change_writes_only_the_change() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(4);
    let pods: Vec<String> = env.topo.pods.iter().map(|p| p.ip4.to_string()).collect();
    let services = |changed: bool| {
        let mut docs = Vec::new();
        for i in 0..20 {
            let name = format!("svc-{i}");
            let vip = format!("10.96.1.{}", i + 1);
            docs.push(service_yaml(&name, &[&vip], &[HTTP], ""));
            let eps = if changed && i == 7 {
                vec![ep(&pods[3])]
            } else {
                vec![ep(&pods[1]), ep(&pods[2])]
            };
            docs.push(slice_yaml(
                &format!("{name}-1"),
                &name,
                "IPv4",
                &[HTTP],
                &eps,
            ));
        }
        docs.join("---\n")
    };
    env.agent.write_manifest("services.yaml", &services(false));
    let vip7: SocketAddr = "10.96.1.8:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, vip7, &["pod-2", "pod-3"]);
    env.agent.kill();
    env.agent.write_manifest("services.yaml", &services(true));
    // The "newer build": another copy of the agent binary.
    let upgrade_dir = std::env::temp_dir().join(format!("{}-upgrade", env.topo.id));
    std::fs::create_dir_all(&upgrade_dir).unwrap();
    let upgraded = upgrade_dir.join("kube-bpf-proxy");
    std::fs::copy(
        tests::harness::process::workspace_binary("kube-bpf-proxy"),
        &upgraded,
    )
    .unwrap();
    env.agent.binary = Some(upgraded);
    let from = env.agent.log_position();
    env.agent.start();
    env.agent.wait_for_log(
        from,
        "0 attached, 9 replaced in place",
        Duration::from_secs(10),
    );
    let synced = env
        .agent
        .wait_for_log(from, "synced:", Duration::from_secs(10));
    let writes: usize = synced
        .split(" map writes")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no write count in {synced:?}"));
    eprintln!(
        "upgrade: first sync after the restart: {writes} map writes for 20 Services, 1 changed"
    );
    // Changing one Service's two backends to one: new backend, slot, member, flip, two old
    // slots and members, and the frontend's info is untouched. Far below the ~140 entries
    // the twenty Services hold.
    assert!(writes <= 10, "{synced}");
    env.wait_for_backends(Proto::Tcp, vip7, &["pod-4"]);
    let _ = std::fs::remove_dir_all(&upgrade_dir);
}

/// Attributes of a pinned map as bpftool shows them.
fn pinned_map(pin: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool map show pinned {}: {}{}",
        pin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// An upgrade that changed a map's layout (here: the conntrack value grew, a counter was
/// added): the new agent replaces those pinned maps instead of failing to load its programs
/// against them, says so, and serves.
#[test]
fn upgrade_over_maps_of_an_older_layout_replaces_them() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(2);
    service_with_one_backend(&env, "web", "10.96.2.1", 1);
    let to: SocketAddr = "10.96.2.1:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, to, &["pod-2"]);
    env.agent.kill();
    // The older layout: a 32-byte conntrack value, 24 counters.
    let pins = env.agent.pin_dir.clone();
    for (name, args) in [
        ("LB_CT4", "type lru_hash key 16 value 32 entries 256"),
        ("LB_STATS", "type percpu_array key 4 value 8 entries 24"),
    ] {
        let pin = pins.join(name);
        std::fs::remove_file(&pin).expect("remove the pin");
        let status = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&pin)
            .args(args.split(' '))
            .args(["name", name])
            .status()
            .expect("run bpftool");
        assert!(status.success(), "bpftool map create {name}");
        assert_eq!(pinned_map(&pin)["name"], name);
    }
    let from = env.agent.log_position();
    env.agent.start();
    env.agent.wait_for_log(
        from,
        "LB_CT4: the pinned map's layout differs from this version's (value size 32 -> 40)",
        Duration::from_secs(10),
    );
    env.agent.wait_for_log(
        from,
        "LB_STATS: the pinned map's layout",
        Duration::from_secs(10),
    );
    // The old links serve meanwhile; the new agent has loaded once it synced.
    env.agent
        .wait_for_log(from, "synced:", Duration::from_secs(30));
    env.wait_for_backends(Proto::Tcp, to, &["pod-2"]);
    assert_eq!(pinned_map(&pins.join("LB_CT4"))["bytes_value"], 40);
    assert!(pinned_map(&pins.join("LB_STATS"))["max_entries"].as_u64() > Some(24));
    // The counters read again (the metrics list every reason).
    let (_, body) = env.agent.get(env.agent.metrics_port, "/metrics");
    assert!(
        body.contains("kube_bpf_proxy_datapath_events_total{reason=\"translated\"}"),
        "{body}"
    );
}

/// The operator changes the flags that size maps (`--max-services`, `--max-sock-revnat`,
/// `--max-conntrack`) and restarts the agent: the new sizes take effect at once, without
/// `cleanup`, and what the old maps held is carried over, so no connection fails while the
/// maps are replaced, a connection opened before still shows the Service as its peer (its
/// socket record went over), and `verify` finds the maps equal to the objects.
#[test]
fn changed_map_sizes_take_effect_on_restart_and_keep_connections() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(3);
    service_with_one_backend(&env, "web", "10.96.0.10", 1);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2"]);
    let pins = env.agent.pin_dir.clone();
    let size = |name: &str| {
        pinned_map(&pins.join(name))["max_entries"]
            .as_u64()
            .unwrap()
    };
    // New sizes, each unlike the one pinned: smaller for the Services, larger for the records
    // and the connection tracking.
    let services = 2048;
    let records = size("SOCK4_REVNAT") + 4096;
    let conntrack = size("LB_CT4") + 4096;
    let services_before = size("LB4_SERVICES");
    assert_ne!(services_before, services);
    let (mut held, first) = env.topo.hold(0, vip);
    assert!(first.ok, "{first:?}");
    assert_eq!(first.peer, vip.to_string());

    let (attempted, failed) = under_load(
        &mut env,
        vip,
        Duration::from_secs(120),
        |agent, wait_batches| {
            wait_batches(2);
            agent.kill();
            agent.extra_args = [
                "--max-services".to_string(),
                services.to_string(),
                "--max-sock-revnat".into(),
                records.to_string(),
                "--max-conntrack".into(),
                conntrack.to_string(),
            ]
            .into();
            let from = agent.log_position();
            agent.start();
            agent.wait_for_log(
                from,
                &format!(
                    "LB4_SERVICES: pinned with {services_before} entries, {services} asked for"
                ),
                Duration::from_secs(10),
            );
            // The held connection's record at least went over.
            let carried = agent.wait_for_log(
                from,
                "SOCK4_REVNAT: entries carried over into the new map",
                Duration::from_secs(20),
            );
            let n: u64 = carried
                .split("entries): ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no count in {carried:?}"));
            assert!(n >= 1, "{carried}");
            agent.wait_for_log(from, "SOCK4_REVNAT: resized; ", Duration::from_secs(20));
            agent.wait_for_log(from, "synced:", Duration::from_secs(20));
            for needle in ["did not fit", "not carried", "not removed", "not read"] {
                assert_eq!(agent.count_logs(from, needle), 0, "{needle}");
            }
            wait_batches(3);
        },
    );
    assert!(
        attempted >= 50,
        "too few connections to mean anything: {attempted}"
    );
    assert!(
        failed.is_empty(),
        "{} of {attempted} failed: {failed:?}",
        failed.len()
    );
    // Closed connections left no record behind: the held one (and one in flight at most when
    // the hooks were swapped). The old and new programs run side by side for a moment only,
    // so a record is written and deleted by one build.
    let records_left = pinned_entries(&env.agent, "SOCK4_REVNAT").len();
    assert!(records_left <= 5, "{records_left} records left");
    assert_eq!(size("LB4_SERVICES"), services);
    assert_eq!(size("LB6_SERVICES"), services);
    assert_eq!(size("SOCK4_REVNAT"), records);
    assert_eq!(size("LB_CT4"), conntrack);
    // The connection opened before the restart: its record was carried into the new map.
    let again = held.again();
    assert!(again.ok, "{again:?}");
    assert_eq!(
        (again.backend.as_str(), again.peer.as_str()),
        ("pod-2", "10.96.0.10:80")
    );
    let (code, out) = verify(&env);
    assert_eq!(code, 0, "{out}");
    // The metrics show the sizes in effect.
    let (_, body) = env.agent.get(env.agent.metrics_port, "/metrics");
    assert!(
        body.contains(&format!(
            "kube_bpf_proxy_map_max_entries{{map=\"LB4_SERVICES\"}} {services}"
        )),
        "{body}"
    );

    // An agent stopped in the middle of a resize leaves the old map pinned aside. Whether the
    // new map was pinned (here an empty one made by hand) or not, while no program uses it the
    // next start puts the old one back in its place and resizes from there.
    let aside = pins.join("resizing");
    for new_pinned in [true, false] {
        env.agent.kill();
        std::fs::create_dir_all(&aside).expect("mkdir resizing");
        let revnat = pinned_map(&pins.join("SOCK4_REVNAT"));
        std::fs::rename(pins.join("SOCK4_REVNAT"), aside.join("SOCK4_REVNAT")).expect("move aside");
        if new_pinned {
            let status = std::process::Command::new("bpftool")
                .args(["map", "create"])
                .arg(pins.join("SOCK4_REVNAT"))
                .args(["type", "lru_hash", "key"])
                .arg(revnat["bytes_key"].to_string())
                .arg("value")
                .arg(revnat["bytes_value"].to_string())
                .arg("entries")
                .arg(records.to_string())
                .args(["name", "SOCK4_REVNAT"])
                .status()
                .expect("run bpftool");
            assert!(status.success(), "bpftool map create");
        }
        let from = env.agent.log_position();
        env.agent.start();
        let line = env.agent.wait_for_log(
            from,
            "SOCK4_REVNAT: an earlier start stopped while resizing it",
            Duration::from_secs(10),
        );
        // No program uses the map made by hand: the resize starts over from the old one.
        assert!(
            line.contains("the old map is pinned back in its place"),
            "{line}"
        );
        env.agent
            .wait_for_log(from, "synced:", Duration::from_secs(20));
        assert!(!aside.exists(), "{} left", aside.display());
        let again = held.again();
        assert_eq!(
            (again.backend.as_str(), again.peer.as_str()),
            ("pod-2", "10.96.0.10:80"),
            "new map pinned: {new_pinned}"
        );
    }
}

/// An agent killed with SIGKILL in the middle of a burst of changes (200 Services whose
/// endpoints move every round, rounds written back to back): a Service the burst does not
/// touch fails no connection, before, during and after; the burst goes on while no agent runs,
/// and the restarted agent converges on the last round: `verify` finds the maps equal to the
/// objects, and a churned Service answers from its last backends.
#[test]
fn sigkill_in_a_burst_of_changes_converges_on_restart() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(4);
    let pods: Vec<String> = env.topo.pods.iter().map(|p| p.ip4.to_string()).collect();
    env.agent.write_manifest(
        "steady.yaml",
        &[
            service_yaml("steady", &["10.96.0.10"], &[HTTP], ""),
            slice_yaml(
                "steady-1",
                "steady",
                "IPv4",
                &[HTTP],
                &[ep(&pods[1]), ep(&pods[2])],
            ),
        ]
        .join("---\n"),
    );
    let steady: SocketAddr = "10.96.0.10:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, steady, &["pod-2", "pod-3"]);
    // Round r: Service i has pod-2, or pod-3 and pod-4, or pod-4, turn by turn.
    let churn = |round: usize| -> String {
        let mut docs = Vec::new();
        for i in 0..200 {
            let name = format!("churn-{i}");
            let vip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
            docs.push(service_yaml(&name, &[&vip], &[HTTP], ""));
            let eps = match (round + i) % 3 {
                0 => vec![ep(&pods[1])],
                1 => vec![ep(&pods[2]), ep(&pods[3])],
                _ => vec![ep(&pods[3])],
            };
            docs.push(slice_yaml(
                &format!("{name}-1"),
                &name,
                "IPv4",
                &[HTTP],
                &eps,
            ));
        }
        docs.join("---\n")
    };
    const ROUNDS: usize = 12;
    const KILLED_AT: usize = 5;
    let (attempted, failed) = under_load(
        &mut env,
        steady,
        Duration::from_secs(90),
        |agent, wait_batches| {
            wait_batches(2);
            for round in 0..ROUNDS {
                agent.write_manifest("churn.yaml", &churn(round));
                if round == KILLED_AT {
                    // The agent is woken by the write and syncing 200 Services: killed mid-burst.
                    std::thread::sleep(Duration::from_millis(5));
                    agent.kill();
                    wait_batches(2);
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let from = agent.log_position();
            agent.start();
            agent.wait_for_log(from, "synced:", Duration::from_secs(20));
            wait_batches(3);
        },
    );
    eprintln!(
        "burst: {attempted} connections to the untouched Service, {} failed",
        failed.len()
    );
    assert!(
        attempted >= 70,
        "too few connections to mean anything: {attempted}"
    );
    assert!(
        failed.is_empty(),
        "{} of {attempted} failed: {failed:?}",
        failed.len()
    );
    // The maps hold the last round, nothing of the earlier ones.
    tests::poll_until(
        "verify finds the maps in sync",
        Duration::from_secs(30),
        || {
            let (code, out) = verify(&env);
            if code == 0 && out.contains("in sync") {
                Ok(())
            } else {
                Err(out)
            }
        },
    );
    // Service 0 in the last round: (ROUNDS - 1) % 3 == 2, pod-4 alone.
    let churned: SocketAddr = "10.97.0.1:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, churned, &["pod-4"]);
}

/// A ConfigMap-mounted file: `config.conf` → `..data/config.conf`, `..data` → the current
/// version's directory; `update` swaps `..data` to a new one in one rename, as the kubelet does.
struct ConfigMapDir {
    dir: std::path::PathBuf,
    version: usize,
}

impl ConfigMapDir {
    fn new(id: &str, content: &str) -> ConfigMapDir {
        let dir = std::env::temp_dir().join(format!("{id}-configmap"));
        std::fs::create_dir_all(&dir).expect("configmap dir");
        std::os::unix::fs::symlink("..data/config.conf", dir.join("config.conf"))
            .expect("config.conf link");
        let mut c = ConfigMapDir { dir, version: 0 };
        c.update(content);
        c
    }

    fn update(&mut self, content: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).expect("version dir");
        std::fs::write(self.dir.join(&version).join("config.conf"), content).expect("write");
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).expect("..data_tmp link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }

    fn path(&self) -> String {
        self.dir.join("config.conf").display().to_string()
    }
}

impl Drop for ConfigMapDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The file for `agent`: its HTTP addresses are in it, since next to `--config` the agent
/// ignores the harness's `--healthz-bind-address` and `--metrics-bind-address` as kube-proxy
/// would (semantics 11.13).
fn kube_proxy_config(agent: &tests::Agent) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
healthzBindAddress: 127.0.0.1:{}
metricsBindAddress: 127.0.0.1:{}
conntrack:
  udpTimeout: 120s
",
        agent.health_port, agent.metrics_port
    )
}

/// kube-proxy exits when the file given by --config changes, to be restarted with it
/// (semantics 11.13): so does the agent, leaving the datapath pinned and serving, when its
/// ConfigMap is updated; an unchanged file (the same content written again) is no change.
#[test]
fn a_changed_config_file_stops_the_agent_and_the_datapath_keeps_serving() {
    if !privileged() {
        return;
    }
    let mut topo = tests::Topology::new(2);
    topo.serve(1, BACKEND_PORT);
    let mut agent = tests::Agent::new(&topo.id, topo.cgroup_path(), NODE);
    let content = kube_proxy_config(&agent);
    let mut config = ConfigMapDir::new(&topo.id, &content);
    agent.write_manifest("node.yaml", &node_yaml(NODE, None));
    agent.extra_args = vec!["--config".into(), config.path()];
    let pos = agent.log_position();
    agent.start();
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &["10.96.0.10"], &[HTTP], ""),
    );
    agent.write_manifest(
        "slice.yaml",
        &slice_yaml("web-1", "web", "IPv4", &[HTTP], &[ep(topo.pods[1].ip4)]),
    );
    let answered = |topo: &tests::Topology| {
        let r = topo.request(0, Proto::Tcp, vip, 3);
        if r.iter().all(|r| r.ok && r.backend == "pod-2") {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    };
    tests::poll_until("web served", Duration::from_secs(10), || answered(&topo));
    agent.wait_for_log(pos, "synced", Duration::from_secs(10));

    // The same content again: the agent keeps running.
    config.update(&content);
    std::thread::sleep(Duration::from_secs(5));
    agent.assert_running();

    // A new content: the agent stops with an error naming the file.
    config.update(&content.replace("120s", "90s"));
    let status = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(2), "{status:?}");
    agent.wait_for_log(
        pos,
        &format!("the configuration file {} changed", config.path()),
        Duration::from_secs(1),
    );
    // The datapath keeps serving without it.
    tests::poll_until(
        "web served without the agent",
        Duration::from_secs(5),
        || answered(&topo),
    );
    // Restarted (as the kubelet would), it reads the file again and takes over.
    let pos = agent.log_position();
    agent.start();
    agent.wait_for_log(pos, "synced", Duration::from_secs(15));
    tests::poll_until(
        "web served after the restart",
        Duration::from_secs(10),
        || answered(&topo),
    );
    agent.assert_running();
}

/// Two agents on the same pins would undo each other's writes: a second one (run by hand, or
/// a rolling update's new pod while the old one is still stopping) waits, changing nothing,
/// until the first exits, then takes over the pinned datapath and follows the cluster.
#[test]
fn a_second_agent_on_the_same_pins_waits_for_the_first_to_exit() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(4);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let serve = |env: &Env, pod: usize| {
        env.agent.write_manifest(
            "web.yaml",
            &service_yaml("web", &["10.96.0.10"], &[HTTP], ""),
        );
        env.agent.write_manifest(
            "slice.yaml",
            &slice_yaml(
                "web-1",
                "web",
                "IPv4",
                &[HTTP],
                &[ep(env.topo.pods[pod].ip4)],
            ),
        );
    };
    serve(&env, 1);
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2"]);
    // `cleanup` refuses to pull the pins from under a running agent.
    let out =
        std::process::Command::new(tests::harness::process::workspace_binary("kube-bpf-proxy"))
            .args(["cleanup", "--bpffs"])
            .arg(&env.agent.pin_dir)
            .output()
            .expect("run cleanup");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("an agent is running on"), "{stderr}");
    assert!(env.agent.pin_dir.join("LB_BACKENDS").exists());
    // Same test id: the same pin directory and manifests.
    let mut second = tests::Agent::new(&env.topo.id, env.topo.cgroup_path(), NODE);
    second.start();
    second.wait_for_log(0, "another agent holds the pins", Duration::from_secs(10));
    // The first one still does the work; the second one wrote nothing.
    serve(&env, 2);
    env.wait_for_backends(Proto::Tcp, vip, &["pod-3"]);
    second.assert_running();
    assert_eq!(
        second.count_logs(0, "synced"),
        0,
        "the waiting agent synced"
    );
    assert_eq!(
        second.count_logs(0, "attached"),
        0,
        "the waiting agent attached"
    );
    // The first one goes: the second takes over the pinned links and maps.
    env.agent.kill();
    second.wait_for_log(0, "taking over", Duration::from_secs(5));
    second.wait_for_log(0, "replaced in place", Duration::from_secs(15));
    second.wait_for_log(0, "synced", Duration::from_secs(15));
    let replies = env.request(Proto::Tcp, vip, 10);
    assert!(
        replies.iter().all(|r| r.ok && r.backend == "pod-3"),
        "{replies:?}"
    );
    // And follows changes.
    serve(&env, 3);
    tests::poll_until("pod-4 serves", Duration::from_secs(10), || {
        let r = env.request(Proto::Tcp, vip, 6);
        if r.iter().all(|r| r.ok && r.backend == "pod-4") {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    second.assert_running();
}

/// Another agent on the same cgroup with its pins in another directory (a pin path changed
/// between two DaemonSet versions, leaving the old links on a persistent bpffs; or a second
/// agent run by hand with another `--bpffs`) is not held back by the pin directory's lock: the
/// agent that starts second finds the first one's nine socket programs beside its own, says so
/// in an error naming them and what to do, and counts them in
/// `kube_bpf_proxy_foreign_programs`. The first found none of its own at its start, and
/// neither does a restart of it (its own programs, replaced in place, are not foreign).
#[test]
fn an_agent_with_pins_elsewhere_on_the_same_cgroup_is_reported() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(2);
    let foreign = |agent: &tests::Agent| -> Option<f64> {
        let (_, body) = agent.get(agent.metrics_port, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("kube_bpf_proxy_foreign_programs "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let counted = |agent: &tests::Agent, want: f64| match foreign(agent) {
        Some(n) if n == want => Ok(()),
        other => Err(format!("{other:?}, not {want}")),
    };
    tests::poll_until("the first agent's metrics", Duration::from_secs(10), || {
        counted(&env.agent, 0.0)
    });
    let mut second = tests::Agent::new(
        &format!("{}-elsewhere", env.topo.id),
        env.topo.cgroup_path(),
        NODE,
    );
    second.start();
    second.wait_for_log(
        0,
        "another kube-bpf-proxy's program sock4_connect",
        Duration::from_secs(15),
    );
    assert!(
        second.count_logs(0, "remove its pins with `kube-bpf-proxy cleanup --bpffs") >= 9,
        "one error per socket hook"
    );
    tests::poll_until(
        "the foreign programs counted",
        Duration::from_secs(10),
        || counted(&second, 9.0),
    );
    // `verify` of either says so (it finds the cgroup from the pinned links) and exits 1.
    let (code, out) = verify(&env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("DRIFT: sock4_connect: another kube-bpf-proxy's program sock4_connect"),
        "{out}"
    );
    // Gone with its pins (the harness removes them): a restart of the first finds nothing.
    drop(second);
    // Its links go once the kernel has released them (after a grace period).
    tests::poll_until(
        "verify in sync again",
        Duration::from_secs(10),
        || match verify(&env) {
            (0, _) => Ok(()),
            (code, out) => Err(format!("exit {code}: {out}")),
        },
    );
    let pos = env.agent.log_position();
    env.agent.kill();
    env.agent.start();
    env.agent
        .wait_for_log(pos, "synced", Duration::from_secs(15));
    assert_eq!(
        env.agent
            .count_logs(pos, "another kube-bpf-proxy's program"),
        0,
        "its own programs counted as foreign"
    );
    tests::poll_until("no foreign programs", Duration::from_secs(10), || {
        counted(&env.agent, 0.0)
    });
}

/// `resize::copy_entries` on maps made here: every entry of a hash map (more than one batch)
/// goes into an LRU map of another size with its value; into a smaller hash map what fits goes
/// and the rest is counted as refused; a second pass that leaves present keys alone writes
/// nothing again; an array's zero counts are skipped and its changes added.
#[test]
fn map_entries_are_copied_into_a_map_of_another_size() {
    use proxy_userspace::datapath::resize::{
        Copied, Mode, Reconciled, add_to_array_u64, copy_entries, read_array_u64, reconcile,
        write_array_u64,
    };
    use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
    if !privileged() {
        return;
    }
    const HASH: u32 = 1;
    const ARRAY: u32 = 2;
    const LRU_HASH: u32 = 9;
    const ENTRIES: u64 = 10_000;
    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
        // SAFETY: a zero-filled 128-byte bpf_attr the caller filled for `cmd`.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
    fn create(map_type: u32, key: u32, value: u32, entries: u32) -> OwnedFd {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(map_type) | (u64::from(key) << 32);
        attr[1] = u64::from(value) | (u64::from(entries) << 32);
        let fd = bpf(0, &mut attr).expect("BPF_MAP_CREATE");
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }
    fn update(map: &OwnedFd, key: &[u8], value: &[u8]) {
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.as_ptr() as u64;
        bpf(2, &mut attr).expect("BPF_MAP_UPDATE_ELEM");
    }
    fn lookup(map: &OwnedFd, key: &[u8], value_size: usize) -> Option<Vec<u8>> {
        let mut value = vec![0u8; value_size];
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.as_mut_ptr() as u64;
        bpf(1, &mut attr).ok().map(|_| value)
    }
    let key_of = |i: u64| (i * 7919).to_le_bytes();
    let value_of = |i: u64| [i.to_le_bytes(), (!i).to_le_bytes()].concat();
    // 10,000 entries (three batches of reads), 8-byte keys, 16-byte values.
    let old = create(HASH, 8, 16, 12_000);
    for i in 0..ENTRIES {
        update(&old, &key_of(i), &value_of(i));
    }
    let copy = |to: &OwnedFd, only_new| {
        let mode = Mode {
            only_new,
            skip_zero: false,
        };
        copy_entries(old.as_fd(), to.as_fd(), 8, 16, mode, None).expect("copy")
    };
    let larger = create(LRU_HASH, 8, 16, 20_000);
    let mut written = Vec::new();
    let mode = Mode {
        only_new: false,
        skip_zero: false,
    };
    assert_eq!(
        copy_entries(old.as_fd(), larger.as_fd(), 8, 16, mode, Some(&mut written)).expect("copy"),
        Copied {
            read: ENTRIES,
            written: ENTRIES,
            ..Copied::default()
        }
    );
    for i in 0..ENTRIES {
        assert_eq!(
            lookup(&larger, &key_of(i), 16),
            Some(value_of(i)),
            "entry {i}"
        );
    }
    assert_eq!(written.len() as u64, ENTRIES * (8 + 16));
    // After the copy the old programs go on: ten entries deleted, two changed (one of which
    // the new programs changed in the new map too). The deleted ones go from the new map, the
    // changed one the new programs left alone is written again, theirs stays, and a key the new
    // map got from elsewhere stays.
    for i in 0..10 {
        let key = key_of(i);
        let mut attr = [0u64; 16];
        attr[0] = old.as_raw_fd() as u64;
        attr[1] = key.as_ptr() as u64;
        bpf(3, &mut attr).expect("BPF_MAP_DELETE_ELEM");
    }
    update(&old, &key_of(20), &value_of(2020));
    update(&old, &key_of(21), &value_of(2121));
    update(&larger, &key_of(21), &value_of(4242));
    update(&larger, &key_of(ENTRIES + 1), &value_of(1));
    assert_eq!(
        reconcile(old.as_fd(), larger.as_fd(), &written, 8, 16).expect("reconcile"),
        Reconciled {
            deleted: 10,
            updated: 1
        }
    );
    assert_eq!(lookup(&larger, &key_of(3), 16), None);
    assert_eq!(lookup(&larger, &key_of(10), 16), Some(value_of(10)));
    assert_eq!(lookup(&larger, &key_of(20), 16), Some(value_of(2020)));
    assert_eq!(lookup(&larger, &key_of(21), 16), Some(value_of(4242)));
    assert_eq!(lookup(&larger, &key_of(ENTRIES + 1), 16), Some(value_of(1)));
    // Put back for what follows.
    for i in 0..10 {
        update(&old, &key_of(i), &value_of(i));
    }
    update(&old, &key_of(20), &value_of(20));
    update(&old, &key_of(21), &value_of(21));
    let smaller = create(HASH, 8, 16, 32);
    assert_eq!(
        copy(&smaller, false),
        Copied {
            read: ENTRIES,
            written: 32,
            present: 0,
            refused: ENTRIES - 32
        }
    );
    assert_eq!(
        copy(&smaller, true),
        Copied {
            read: ENTRIES,
            written: 0,
            present: 32,
            refused: ENTRIES - 32
        }
    );
    // An empty map copies nothing.
    let empty = create(HASH, 8, 16, 8);
    assert_eq!(
        copy_entries(empty.as_fd(), larger.as_fd(), 8, 16, Mode::default(), None).expect("copy"),
        Copied::default()
    );
    // An array of 10 counts (index 7 at zero) into one of 5: the first five indices go, the
    // zero is no loss.
    let counts = create(ARRAY, 4, 8, 10);
    for i in (0..10u32).filter(|i| *i != 7) {
        update(&counts, &i.to_le_bytes(), &u64::from(i + 100).to_le_bytes());
    }
    let fewer = create(ARRAY, 4, 8, 5);
    let mode = Mode {
        only_new: false,
        skip_zero: true,
    };
    assert_eq!(
        copy_entries(counts.as_fd(), fewer.as_fd(), 4, 8, mode, None).expect("copy"),
        Copied {
            read: 10,
            written: 5,
            present: 0,
            refused: 4
        }
    );
    assert_eq!(
        read_array_u64(fewer.as_fd(), 5).expect("read"),
        [100, 101, 102, 103, 104]
    );
    // Changes counted meanwhile are added: +5 to index 2, -1 to index 3; one past the end is
    // skipped.
    add_to_array_u64(fewer.as_fd(), 5, &[(2, 5), (3, u64::MAX), (7, 1)]).expect("add");
    assert_eq!(
        read_array_u64(fewer.as_fd(), 5).expect("read"),
        [100, 101, 107, 102, 104]
    );
    // Counts written by index: the non-zero ones that fit; the rest counted.
    let again = create(ARRAY, 4, 8, 3);
    assert_eq!(
        write_array_u64(again.as_fd(), 3, &[0, 9, 8, 0, 7]).expect("write"),
        1
    );
    assert_eq!(read_array_u64(again.as_fd(), 3).expect("read"), [0, 9, 8]);
}
