//! When a backend goes away: connected UDP sockets that the Service sent to it are terminated,
//! so the application learns at once and reconnects through the Service; unconnected sockets
//! and sockets connected straight to a pod are never touched; TCP is cut only with
//! --terminate-tcp.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use serde_json::Value;
use tests::{harness::topology::Proto, poll_until};

fn dns_env(backends: &[usize]) -> Env {
    let env = Env::new(4);
    env.agent.write_manifest(
        "dns.yaml",
        &service_yaml("dns", &["10.96.0.53"], &[DNS], ""),
    );
    set_backends(&env, backends);
    env
}

fn set_backends(env: &Env, backends: &[usize]) {
    let eps: Vec<Ep> = backends.iter().map(|i| ep(env.topo.pods[*i].ip4)).collect();
    env.agent.write_manifest(
        "dns-slice.yaml",
        &slice_yaml("dns-1", "dns", "IPv4", &[DNS], &eps),
    );
}

fn answers(lines: &[Value]) -> Vec<(u64, String)> {
    lines
        .iter()
        .filter_map(|l| Some((l["t"].as_u64()?, l["backend"].as_str()?.to_string())))
        .collect()
}

fn errors(lines: &[Value]) -> Vec<(u64, i64)> {
    lines
        .iter()
        .filter(|l| l["event"] == "error")
        .map(|l| (l["t"].as_u64().unwrap(), l["errno"].as_i64().unwrap_or(-1)))
        .collect()
}

#[test]
fn connected_udp_socket_to_a_removed_backend_is_terminated() {
    if !privileged() {
        return;
    }
    let mut env = dns_env(&[1]);
    let vip: SocketAddr = "10.96.0.53:53".parse().unwrap();
    env.wait_for_backends(Proto::Udp, vip, &["pod-2"]);
    let direct: SocketAddr = format!("{}:{BACKEND_PORT}", env.topo.pods[1].ip4)
        .parse()
        .unwrap();
    let connected = env.topo.start_udp_stream(0, vip, 6, true);
    let unconnected = env.topo.start_udp_stream(0, vip, 6, false);
    let straight = env.topo.start_udp_stream(0, direct, 6, true);
    // Once every stream is answered by pod-2, take pod-2 out of the Service.
    for stream in [&connected, &unconnected, &straight] {
        stream.wait_for_answers("pod-2", 3);
    }
    let removed_at = now_ms();
    set_backends(&env, &[2, 3]);
    let (connected, unconnected, straight) =
        (connected.finish(), unconnected.finish(), straight.finish());
    // The connected socket talked to pod-2, got an error after the removal, and its
    // replacement is served by the remaining backends; pod-2 answers it nothing afterwards.
    let errs = errors(&connected);
    assert_eq!(
        errs.len(),
        1,
        "exactly one error for the connected socket: {connected:?}"
    );
    let (error_at, errno) = errs[0];
    // The kernel aborts the socket (ECONNABORTED) and disconnects it, so the next send may
    // report EDESTADDRREQ first; either way the application learns at once.
    assert!(
        errno == libc::ECONNABORTED as i64 || errno == libc::EDESTADDRREQ as i64,
        "{connected:?}"
    );
    eprintln!(
        "termination: connected UDP socket saw the error {} ms after the slice changed",
        error_at.saturating_sub(removed_at)
    );
    assert!(
        error_at >= removed_at,
        "error before the removal: {connected:?}"
    );
    let before: Vec<_> = answers(&connected)
        .into_iter()
        .filter(|(t, _)| *t < removed_at)
        .collect();
    assert!(
        !before.is_empty() && before.iter().all(|(_, b)| b == "pod-2"),
        "{connected:?}"
    );
    let after: Vec<_> = answers(&connected)
        .into_iter()
        .filter(|(t, _)| *t > error_at)
        .collect();
    assert!(
        after.len() > 10,
        "the client must keep getting answers: {connected:?}"
    );
    assert!(
        after.iter().all(|(_, b)| b == "pod-3" || b == "pod-4"),
        "{after:?}"
    );
    // Unconnected: never an error; its flow on pod-2 ends with pod-2's membership, and its
    // next datagram is balanced afresh.
    assert!(errors(&unconnected).is_empty(), "{unconnected:?}");
    let late: Vec<_> = answers(&unconnected)
        .into_iter()
        .filter(|(t, _)| *t > removed_at + 1500)
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|(_, b)| b != "pod-2"),
        "{late:?}"
    );
    // Straight to the pod, not through the Service: untouched, still answered by pod-2.
    assert!(errors(&straight).is_empty(), "{straight:?}");
    assert!(answers(&straight).iter().all(|(_, b)| b == "pod-2"));
    let from = 0;
    let line = env
        .agent
        .wait_for_log(from, "terminated 1 UDP socket", Duration::from_secs(5));
    assert!(line.contains("removed backends"), "{line}");
}

/// semantics 9.3: a backend that starts terminating while another is ready takes no new flows,
/// but it is still serving, so a flow already on it keeps it: kube-proxy's conntrack cleanup
/// deletes a UDP flow only when its endpoint stops serving. The connected socket is neither
/// terminated nor moved; neither is the unconnected socket's flow (its datagrams to the Service
/// are one flow, semantics 4.11); new sockets go to the ready backend.
#[test]
fn udp_flows_to_a_backend_that_starts_terminating_keep_it() {
    if !privileged() {
        return;
    }
    let mut env = dns_env(&[1]);
    let vip: SocketAddr = "10.96.0.53:53".parse().unwrap();
    env.wait_for_backends(Proto::Udp, vip, &["pod-2"]);
    let connected = env.topo.start_udp_stream(0, vip, 8, true);
    let unconnected = env.topo.start_udp_stream(0, vip, 8, false);
    for stream in [&connected, &unconnected] {
        stream.wait_for_answers("pod-2", 3);
    }
    let changed_at = now_ms();
    let terminating = Ep {
        conditions: "ready: false, serving: true, terminating: true",
        ..ep(env.topo.pods[1].ip4)
    };
    let ready = ep(env.topo.pods[2].ip4);
    env.agent.write_manifest(
        "dns-slice.yaml",
        &slice_yaml("dns-1", "dns", "IPv4", &[DNS], &[terminating, ready]),
    );
    // New sockets show when the change is programmed.
    env.wait_for_backends(Proto::Udp, vip, &["pod-3"]);
    let programmed_at = now_ms();
    // 20 more datagrams of the connected socket (one every 50 ms) after that.
    let so_far = connected.lines().len();
    poll_until("20 more lines", Duration::from_secs(5), || {
        let n = connected.lines().len();
        if n >= so_far + 20 {
            Ok(())
        } else {
            Err(format!("{n} lines"))
        }
    });
    let (connected, unconnected) = (connected.finish(), unconnected.finish());
    assert!(errors(&connected).is_empty(), "{connected:?}");
    let after: Vec<_> = answers(&connected)
        .into_iter()
        .filter(|(t, _)| *t > programmed_at)
        .collect();
    assert!(
        after.len() >= 5,
        "the flow kept being answered: {connected:?}"
    );
    assert!(after.iter().all(|(_, b)| b == "pod-2"), "{after:?}");
    assert!(errors(&unconnected).is_empty(), "{unconnected:?}");
    let late: Vec<_> = answers(&unconnected)
        .into_iter()
        .filter(|(t, _)| *t > programmed_at)
        .collect();
    assert!(
        late.len() >= 5 && late.iter().all(|(_, b)| b == "pod-2"),
        "{late:?}"
    );
    assert!(
        env.agent
            .logs_since(0)
            .iter()
            .all(|l| !l.contains("terminated")),
        "a socket was terminated"
    );
    eprintln!(
        "terminating: change programmed {} ms after the slice was written",
        programmed_at - changed_at
    );
}

fn held_env(terminate_tcp: bool) -> Env {
    let mut env = Env::new(4);
    if terminate_tcp {
        env.agent.kill();
        env.agent.extra_args = vec!["--terminate-tcp".into()];
        env.agent.start();
    }
    service_with_one_backend(&env, "web", "10.96.0.10", 1);
    env.wait_for_backends(Proto::Tcp, "10.96.0.10:80".parse().unwrap(), &["pod-2"]);
    env
}

#[test]
fn tcp_connections_to_a_removed_backend_are_cut_only_with_the_flag() {
    if !privileged() {
        return;
    }
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    for cut in [false, true] {
        let mut env = held_env(cut);
        let (mut held, first) = env.topo.hold(0, vip);
        assert_eq!(first.backend, "pod-2");
        env.agent.write_manifest(
            "web-slice.yaml",
            &slice_yaml("web-1", "web", "IPv4", &[HTTP], &[ep(env.topo.pods[2].ip4)]),
        );
        env.wait_for_backends(Proto::Tcp, vip, &["pod-3"]);
        if cut {
            // The held connection, and possibly a probe connection still closing.
            env.agent.wait_for_log(
                0,
                "TCP socket(s) connected to removed backends",
                Duration::from_secs(5),
            );
            let again = held.again();
            assert!(
                !again.ok,
                "with --terminate-tcp the connection must be cut: {again:?}"
            );
        } else {
            let again = held.again();
            assert!(again.ok && again.backend == "pod-2", "{again:?}");
        }
    }
}

#[test]
fn socket_records_go_with_their_sockets_and_real_pressure_is_reported() {
    // Issue #12 and the hardening issue, item 7: the map that remembers which socket went
    // where is LRU. Records are deleted when their socket is released, so closed connections
    // leave nothing behind and raise no warning; only more live sockets than entries evict
    // records, and then the agent says so (log line and metric).
    if !privileged() {
        return;
    }
    // Fresh pins: the map is made with 256 entries and holds no earlier records.
    let (mut env, pos) = Env::with_agent_args(3, &["--max-sock-revnat", "256"]);
    service_with_one_backend(&env, "web", "10.96.0.10", 1);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2"]);
    // 600 connections, one after the other, in a map of 256 entries: each record goes with
    // its socket.
    let replies = env.request(Proto::Tcp, vip, 600);
    assert!(replies.iter().all(|r| r.ok), "{replies:?}");
    let deleted = datapath_events(&env.agent, "revnat4_deleted");
    poll_until(
        "records of closed sockets deleted",
        Duration::from_secs(15),
        || {
            let n = datapath_events(&env.agent, "revnat4_deleted");
            if n >= 600 {
                Ok(())
            } else {
                Err(format!("{n} deleted"))
            }
        },
    );
    assert!(deleted > 0);
    let metric = |env: &Env| -> f64 {
        let (_, body) = env.agent.get(env.agent.metrics_port, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("kube_bpf_proxy_map_evictions{map=\"SOCK4_REVNAT\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    poll_until("eviction metric at 0", Duration::from_secs(15), || {
        let e = metric(&env);
        if e == 0.0 {
            Ok(())
        } else {
            Err(format!("{e}"))
        }
    });
    assert_eq!(env.agent.count_logs(pos, "map SOCK4_REVNAT is full"), 0);
    // 300 sockets open at once: more than 256 entries, records are evicted, and said so.
    let mut cmd = tests::harness::topology::testhost_in(
        &env.topo.pods[0].ns,
        Some(&env.topo.cgroup),
        &["request", "tcp", "10.96.0.10:80", "300", "keep"],
    );
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut keeper = cmd.spawn().expect("spawn testhost keep");
    let stdout = keeper.stdout.take().expect("stdout");
    let answered = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .take(300)
        .map_while(Result::ok)
        .filter(|l| l.contains("\"ok\":true"))
        .count();
    assert_eq!(answered, 300);
    let line = env
        .agent
        .wait_for_log(pos, "map SOCK4_REVNAT is full: ", Duration::from_secs(15));
    eprintln!("{line}");
    let evicted = metric(&env);
    // 300 live sockets, 256 places: at least 44 records were evicted.
    assert!(evicted >= 44.0, "{evicted}: {line}");
    let _ = keeper.kill();
    let _ = keeper.wait();
}
