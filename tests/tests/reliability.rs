//! Reliability end to end: full maps, endpoint churn under load, privileges. (Restarts are in
//! restart.rs.) Figures are printed for RELIABILITY.md.

mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use tests::{harness::topology::Proto, poll_until};

/// With room for two Services, a third is refused by name (log line) while the first two keep
/// working; once one is deleted, the refused one is programmed.
#[test]
fn full_maps_refuse_what_does_not_fit_and_recover() {
    if !privileged() {
        return;
    }
    // Each ClusterIP Service takes two LB4_SERVICES entries (its frontend and the port marker).
    let (mut env, from) = Env::with_agent_args(4, &["--max-services", "4"]);
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

/// A programmed Service port that grows past a full map is not updated: it keeps the backends
/// it had instead of losing its entries (an outage for a Service that worked), `verify` finds
/// no drift, and once room frees it gets its new backends.
#[test]
fn a_programmed_service_that_no_longer_fits_keeps_its_backends() {
    if !privileged() {
        return;
    }
    let (mut env, from) = Env::with_agent_args(4, &["--max-backends", "2"]);
    let (a, b): (SocketAddr, SocketAddr) = (
        "10.96.0.10:80".parse().unwrap(),
        "10.96.0.11:80".parse().unwrap(),
    );
    service_with_one_backend(&env, "a", "10.96.0.10", 1);
    service_with_one_backend(&env, "b", "10.96.0.11", 2);
    env.wait_for_backends(Proto::Tcp, a, &["pod-2"]);
    env.wait_for_backends(Proto::Tcp, b, &["pod-3"]);
    // `a` grows to two backends: with b's, three, and the map holds two.
    let grown = |env: &Env| {
        env.agent.write_manifest(
            "a-slice.yaml",
            &slice_yaml(
                "a-1",
                "a",
                "IPv4",
                &[HTTP],
                &[ep(env.topo.pods[1].ip4), ep(env.topo.pods[3].ip4)],
            ),
        );
    };
    grown(&env);
    let line = env
        .agent
        .wait_for_log(from, "map LB_BACKENDS is full", Duration::from_secs(10));
    assert!(
        line.contains("default/a") && line.contains("it keeps its previous state"),
        "{line}"
    );
    env.wait_for_backends(Proto::Tcp, a, &["pod-2"]);
    env.wait_for_backends(Proto::Tcp, b, &["pod-3"]);
    let (code, out) = verify(&env);
    assert_eq!(code, 0, "verify: {out}");
    // Room frees: `a` gets its two backends.
    env.agent.remove_manifest("b.yaml");
    env.wait_for_backends(Proto::Tcp, a, &["pod-2", "pod-4"]);
}

fn soak_secs() -> u64 {
    std::env::var("KBP_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

/// The churn holds still for a checkpoint after this many endpoint changes.
const CHECKPOINT_EVERY: u32 = 20;

/// One batch of the churn client's connections.
struct Batch {
    started: Instant,
    backends: BTreeSet<String>,
}

/// A checkpoint of the churn, right after a slice whose ready endpoints are `pods` (by index), a
/// set no earlier change made: waits until the maps give new connections exactly these
/// (`services -o json`), then asserts that new connections reach each of them and none other,
/// and that the first batch the client under load started afterwards reached none other either.
fn checkpoint(
    agent: &tests::Agent,
    topo: &tests::Topology,
    vip: SocketAddr,
    usable: &[usize],
    batches: &Mutex<Vec<Batch>>,
    after: u32,
) {
    let addrs: BTreeSet<String> = usable
        .iter()
        .map(|i| format!("{}:{BACKEND_PORT}", topo.pods[*i].ip4))
        .collect();
    let names: BTreeSet<String> = usable.iter().map(|i| topo.pods[*i].name.clone()).collect();
    poll_until(
        &format!("the maps to hold {addrs:?} after change {after}"),
        Duration::from_secs(10),
        || {
            let got = programmed_backends(agent, "10.96.0.10:80/TCP");
            if got == addrs {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    );
    let settled = Instant::now();
    let mut seen = BTreeSet::new();
    poll_until(
        &format!("new connections to reach each of {names:?} after change {after}"),
        Duration::from_secs(10),
        || {
            for r in topo.request(0, Proto::Tcp, vip, 4 * names.len()) {
                assert!(r.ok, "after change {after}: {r:?}");
                assert!(
                    names.contains(&r.backend),
                    "after change {after} the maps hold {addrs:?}, yet a new connection reached {}",
                    r.backend
                );
                seen.insert(r.backend);
            }
            if seen == names {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    );
    let under_load = poll_until(
        &format!("a client batch started after change {after} settled"),
        Duration::from_secs(10),
        || {
            batches
                .lock()
                .expect("batches")
                .iter()
                .find(|b| b.started >= settled)
                .map(|b| b.backends.clone())
                .ok_or_else(|| "none yet".to_string())
        },
    );
    assert!(
        under_load.is_subset(&names),
        "after change {after} the client under load reached {under_load:?}; the Service has {names:?}"
    );
}

/// For a bounded time (KBP_SOAK_SECS, default 30 s) one endpoint of three flaps every 100 ms
/// (removed, added back, terminating) while a client keeps connecting: no connection fails,
/// the datapath follows the churn, and the agent's memory does not grow.
///
/// Following the churn (not only "clients succeeded"): every CHECKPOINT_EVERY-th change takes
/// pod-2 or pod-3 out instead, and the churn holds still until the maps give new connections
/// exactly the remaining endpoints, and new connections, the client's under load included,
/// reach each of those and none other; the client under load was answered by every backend, the
/// flapping one included; after the churn (only pod-2 left) the maps hold exactly pod-2 and only
/// it answers.
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
    // A slice whose ready endpoints are exactly `pods`.
    let slice_of = |pods: &[usize]| {
        let eps: Vec<Ep> = pods.iter().map(|p| ep(&ips[*p])).collect();
        slice_yaml("web-1", "web", "IPv4", &[HTTP], &eps)
    };
    // Checkpoints take pod-2 or pod-3 out in turn: sets the churn never makes (it always has
    // both), so maps showing one prove the agent processed that very write. (A churn state
    // would not: the maps can still show an earlier change that happens to give the same
    // backends, e.g. pod-4 terminating where it is now removed, and the change in between,
    // pod-4 back in, is yet to come.)
    let checkpoint_pods =
        |n: u32| -> Vec<usize> { if n % 2 == 1 { vec![2, 3] } else { vec![1, 3] } };
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
    let batches = Mutex::new(Vec::new());
    let started = Instant::now();
    let (attempted, failed, flaps, checkpoints) = std::thread::scope(|s| {
        let topo = &env.topo;
        let agent = &env.agent;
        let stop = &stop;
        let batches = &batches;
        let client = s.spawn(move || {
            let (mut attempted, mut failed) = (0usize, Vec::new());
            // Bounded by time and by count.
            while !stop.load(Ordering::Relaxed) && attempted < 5_000_000 {
                let batch_started = Instant::now();
                let mut backends = BTreeSet::new();
                for r in topo.request(0, Proto::Tcp, vip, 10) {
                    attempted += 1;
                    if r.ok {
                        backends.insert(r.backend);
                    } else {
                        failed.push(r);
                    }
                }
                batches.lock().expect("batches").push(Batch {
                    started: batch_started,
                    backends,
                });
            }
            (attempted, failed)
        });
        let (mut flaps, mut checkpoints) = (0u32, 0u32);
        while started.elapsed() < duration {
            flaps += 1;
            if flaps % CHECKPOINT_EVERY == 0 {
                checkpoints += 1;
                let pods = checkpoint_pods(checkpoints);
                agent.write_manifest("slice.yaml", &slice_of(&pods));
                checkpoint(agent, topo, vip, &pods, batches, flaps);
            } else {
                agent.write_manifest("slice.yaml", &slice(flaps));
                // The churn's pace: changes 100 ms apart are the load on the agent under test,
                // not a wait for a condition.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // The end of the churn, with the client still running: only pod-2 left, a set no
        // earlier change made.
        flaps += 1;
        agent.write_manifest("slice.yaml", &slice_of(&[1]));
        checkpoint(agent, topo, vip, &[1], batches, flaps);
        stop.store(true, Ordering::Relaxed);
        let (attempted, failed) = client.join().expect("client thread");
        (attempted, failed, flaps, checkpoints)
    });
    env.agent.assert_running();
    let rss_after = env.agent.rss_kib();
    let answered: BTreeSet<String> = batches
        .into_inner()
        .expect("batches")
        .into_iter()
        .flat_map(|b| b.backends)
        .collect();
    eprintln!(
        "churn: {:?}, {flaps} endpoint changes, {checkpoints} checkpoints, {attempted} connections, {} failed, agent RSS {rss_before} -> {rss_after} KiB",
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
    assert_eq!(
        answered,
        BTreeSet::from(["pod-2", "pod-3", "pod-4"].map(String::from)),
        "the client under load must have been answered by every backend, the flapping one too"
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
    // The socket terminator thread, and the thread learning each namespace's source address
    // (loadBalancerSourceRanges), also enter other network namespaces.
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
        let kept = if matches!(comm.trim(), "terminator" | "netns") {
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
