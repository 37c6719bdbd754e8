//! Reliability end to end: full maps, endpoint churn under load, privileges. (Restarts are in
//! restart.rs.) Figures are printed for RELIABILITY.md.

mod common;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use common::*;
use tests::harness::topology::Proto;

/// With room for two Services, a third is refused by name (log line) while the first two keep
/// working; once one is deleted, the refused one is programmed.
#[test]
fn full_maps_refuse_what_does_not_fit_and_recover() {
    if !privileged() {
        return;
    }
    let mut topo_env = Env::new(4);
    // Each ClusterIP Service takes two LB4_SERVICES entries (its frontend and the port marker).
    topo_env.agent.kill();
    topo_env.agent.extra_args = vec!["--max-services".into(), "4".into()];
    let _ = std::fs::remove_dir_all(&topo_env.agent.pin_dir);
    let from = topo_env.agent.log_position();
    topo_env.agent.start();
    let mut env = topo_env;
    service_with_one_backend(&env, "a", "10.96.0.10", 1);
    service_with_one_backend(&env, "b", "10.96.0.11", 2);
    env.wait_for_backends(Proto::Tcp, "10.96.0.10:80".parse().unwrap(), &["pod-2"]);
    env.wait_for_backends(Proto::Tcp, "10.96.0.11:80".parse().unwrap(), &["pod-3"]);
    service_with_one_backend(&env, "c", "10.96.0.12", 3);
    let line = env
        .agent
        .wait_for_log(from, "map LB4_SERVICES is full", Duration::from_secs(10));
    assert!(line.contains("default/c"), "{line}");
    // The Services already there are untouched.
    env.wait_for_backends(Proto::Tcp, "10.96.0.10:80".parse().unwrap(), &["pod-2"]);
    env.wait_for_backends(Proto::Tcp, "10.96.0.11:80".parse().unwrap(), &["pod-3"]);
    env.agent.remove_manifest("a.yaml");
    env.wait_for_backends(Proto::Tcp, "10.96.0.12:80".parse().unwrap(), &["pod-4"]);
    env.wait_for_backends(Proto::Tcp, "10.96.0.11:80".parse().unwrap(), &["pod-3"]);
}

fn soak_secs() -> u64 {
    std::env::var("KBP_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

/// For a bounded time (KBP_SOAK_SECS, default 30 s) one endpoint of three flaps every 100 ms
/// (removed, added back, terminating) while a client keeps connecting: no connection fails
/// and the agent's memory does not grow.
#[test]
fn endpoint_churn_under_load_fails_no_connection() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(4);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &["10.96.0.10"], &[HTTP], ""),
    );
    let ips: Vec<String> = env.topo.pods.iter().map(|p| p.ip4.to_string()).collect();
    let slice = |flap: u32| {
        let mut eps = vec![ep(&ips[1]), ep(&ips[2])];
        match flap % 3 {
            0 => eps.push(ep(&ips[3])),
            1 => {}
            _ => eps.push(Ep {
                addr: ips[3].clone(),
                node: NODE,
                conditions: "ready: false, serving: true, terminating: true",
            }),
        }
        slice_yaml("web-1", "web", "IPv4", &[HTTP], &eps)
    };
    env.agent.write_manifest("slice.yaml", &slice(0));
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2", "pod-3", "pod-4"]);
    // Let the agent settle before the baseline.
    for _ in 0..5 {
        env.agent.write_manifest("slice.yaml", &slice(1));
        env.agent.write_manifest("slice.yaml", &slice(0));
    }
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2", "pod-3", "pod-4"]);
    let rss_before = env.agent.rss_kib();
    let duration = Duration::from_secs(soak_secs());
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (attempted, failed, flaps) = std::thread::scope(|s| {
        let topo = &env.topo;
        let stop = &stop;
        let client = s.spawn(move || {
            let (mut attempted, mut failed) = (0usize, Vec::new());
            // Bounded by time and by count.
            while !stop.load(Ordering::Relaxed) && attempted < 200_000 {
                for r in topo.request(0, Proto::Tcp, vip, 20) {
                    attempted += 1;
                    if !r.ok {
                        failed.push(r);
                    }
                }
            }
            (attempted, failed)
        });
        let mut flaps = 0u32;
        while started.elapsed() < duration {
            flaps += 1;
            env.agent.write_manifest("slice.yaml", &slice(flaps));
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        let (attempted, failed) = client.join().expect("client thread");
        (attempted, failed, flaps)
    });
    env.agent.assert_running();
    let rss_after = env.agent.rss_kib();
    eprintln!(
        "churn: {:?}, {flaps} endpoint changes, {attempted} connections, {} failed, agent RSS {rss_before} -> {rss_after} KiB",
        duration,
        failed.len()
    );
    assert!(attempted > 100, "too few connections: {attempted}");
    assert!(
        failed.is_empty(),
        "{} of {attempted} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "agent memory grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// The agent keeps only CAP_BPF and CAP_NET_ADMIN in every thread once loaded (the socket
/// terminator thread also CAP_SYS_ADMIN and CAP_SYS_PTRACE); pins are root-only.
#[test]
fn agent_drops_capabilities_and_pins_are_root_only() {
    if !privileged() {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mut env = Env::new(2);
    service_with_one_backend(&env, "a", "10.96.0.10", 1);
    env.wait_for_backends(Proto::Tcp, "10.96.0.10:80".parse().unwrap(), &["pod-2"]);
    let kept: u64 = (1 << 39) | (1 << 12);
    // The socket terminator thread also enters other network namespaces.
    let terminator: u64 = kept | (1 << 21) | (1 << 19);
    let tasks = std::fs::read_dir(format!(
        "/proc/{}/task",
        env.agent.pid().expect("agent running")
    ))
    .expect("tasks");
    let mut threads = 0;
    for task in tasks {
        let task = task.expect("task").path();
        let status = std::fs::read_to_string(task.join("status")).expect("task status");
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let kept = if comm.trim() == "terminator" {
            terminator
        } else {
            kept
        };
        for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let value = status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex caps"))
                .expect("cap field");
            assert_eq!(
                value & !kept,
                0,
                "{field} {value:#x} keeps more than CAP_BPF|CAP_NET_ADMIN"
            );
        }
        threads += 1;
    }
    assert!(threads > 1, "the agent runs several threads");
    let dir = std::fs::metadata(&env.agent.pin_dir).expect("pin dir");
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    for entry in std::fs::read_dir(&env.agent.pin_dir).expect("pins") {
        let entry = entry.expect("pin");
        let mode = entry.metadata().expect("meta").permissions().mode() & 0o777;
        if entry.file_type().expect("type").is_file() {
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.path().display());
        }
    }
    env.agent.assert_running();
}

/// Mixed traffic from one client: Service and non-Service destinations interleaved, over TCP and
/// UDP. Every non-Service exchange reaches exactly the addressed pod with both addresses
/// unaltered, compared against what the same exchange gives with no agent at all.
#[test]
fn mixed_traffic_leaves_non_service_destinations_unaltered() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(3);
    service_with_one_backend(&env, "a", "10.96.0.10", 1);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2"]);
    let direct: Vec<SocketAddr> = [
        format!("{}:{BACKEND_PORT}", env.topo.pods[1].ip4),
        format!("{}:{BACKEND_PORT}", env.topo.pods[2].ip4),
        format!("[{}]:{BACKEND_PORT}", env.topo.pods[2].ip6),
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let strip_port = |r: &tests::Reply| {
        let seen: SocketAddr = r.seen.parse().unwrap();
        (r.ok, r.backend.clone(), seen.ip(), r.peer.clone())
    };
    let mut with_agent = Vec::new();
    for round in 0..10 {
        let proto = if round % 2 == 0 {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        assert!(env.request(Proto::Tcp, vip, 1)[0].ok);
        for to in &direct {
            let r = &env.request(proto, *to, 1)[0];
            assert!(r.ok, "{to}: {r:?}");
            assert_eq!(r.peer, to.to_string());
            with_agent.push((proto, *to, strip_port(r)));
        }
    }
    // The same exchanges with the hooks gone.
    env.agent.kill();
    let (code, _) = {
        let out =
            std::process::Command::new(tests::harness::process::workspace_binary("kube-bpf-proxy"))
                .args(["cleanup", "--bpffs"])
                .arg(&env.agent.pin_dir)
                .output()
                .expect("cleanup");
        (out.status.code(), out.stdout)
    };
    assert_eq!(code, Some(0));
    for (proto, to, seen_with_agent) in with_agent {
        let r = &env.request(proto, to, 1)[0];
        assert_eq!(
            strip_port(r),
            seen_with_agent,
            "{to} {proto:?} differs without the agent"
        );
    }
}
