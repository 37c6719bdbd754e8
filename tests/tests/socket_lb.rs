//! ClusterIP at the socket layer, end to end: the real BPF programs on a test cgroup, real
//! traffic between pod namespaces. Pod 0 is the client; pods 1.. run echo servers on 8080 and
//! answer with their names (`pod-2`, ...).

mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::*;
use tests::{harness::topology::Proto, poll_until};

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

fn addr(ip: &str, port: u16) -> SocketAddr {
    if ip.contains(':') {
        format!("[{ip}]:{port}").parse().unwrap()
    } else {
        format!("{ip}:{port}").parse().unwrap()
    }
}

/// A dual-stack Service `web` with `ports`, whose endpoints are pods 1..=backends in both
/// families.
fn dual_stack_env(backends: usize, ports: &[Port], extra: &str) -> Env {
    let env = Env::new(backends + 1);
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &[VIP4, VIP6], ports, extra),
    );
    let v4: Vec<Ep> = (1..=backends).map(|i| ep(env.topo.pods[i].ip4)).collect();
    let v6: Vec<Ep> = (1..=backends).map(|i| ep(env.topo.pods[i].ip6)).collect();
    env.agent.write_manifest(
        "web-v4.yaml",
        &slice_yaml("web-v4", "web", "IPv4", ports, &v4),
    );
    env.agent.write_manifest(
        "web-v6.yaml",
        &slice_yaml("web-v6", "web", "IPv6", ports, &v6),
    );
    env
}

fn pod_names(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("pod-{}", i + 1)).collect()
}

/// Every ready backend answers, roughly evenly; the backend sees the client pod's own address;
/// the client sees the Service address as its peer (getpeername, or the UDP reply source).
fn balanced(proto: Proto, v6: bool) {
    if !privileged() {
        return;
    }
    let port = match proto {
        Proto::Tcp | Proto::Sctp => HTTP,
        Proto::Udp | Proto::UdpConnected => DNS,
    };
    let mut env = dual_stack_env(3, &[port], "");
    let (vip, client) = if v6 {
        (addr(VIP6, port.port), env.topo.pods[0].ip6.to_string())
    } else {
        (addr(VIP4, port.port), env.topo.pods[0].ip4.to_string())
    };
    let names = pod_names(1..=3);
    env.wait_for_backends(
        proto,
        vip,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    let replies = env.request(proto, vip, 600);
    let counts = tally(&replies);
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        names,
        "{counts:?}"
    );
    assert_uniform_random(&replies, &counts);
    for r in &replies {
        assert_eq!(
            r.peer,
            vip.to_string(),
            "the client must see the Service address"
        );
        let seen: SocketAddr = r.seen.parse().unwrap();
        assert_eq!(seen.ip().to_string(), client, "backend saw {}", r.seen);
    }
    // A connected socket's record (which backend stands for the Service, for getpeername and
    // recvmsg) goes with the socket: deleted at its release, found by its destination. 600
    // closed sockets leave no record behind.
    if matches!(proto, Proto::Tcp | Proto::UdpConnected) {
        let reason = if v6 {
            "revnat6_deleted"
        } else {
            "revnat4_deleted"
        };
        poll_until(
            "records of closed sockets deleted",
            Duration::from_secs(15),
            || {
                let n = datapath_events(&env.agent, reason);
                if n >= 600 {
                    Ok(())
                } else {
                    Err(format!("{reason} {n}"))
                }
            },
        );
    }
}

/// semantics 4.11: each new connection (or connected socket, or datagram) picks a backend
/// uniformly at random, independently of the previous pick. With 600 picks over 3 backends:
///
/// - each backend's count is Binomial(600, 1/3): mean 200, sd 11.5. The bounds [140, 260] are
///   5.2 sd away: exact tails 3.4e-8 (below) and 1.4e-7 (above) per backend;
/// - consecutive picks hit the same backend with probability 1/3, independently (for uniform
///   picks the differences of successive picks are themselves uniform and independent), so the
///   repeats among 599 pairs are Binomial(599, 1/3): same bounds, same tails.
///
/// A correct scheduler fails one of the 6 tests using this with probability about 4e-6 per
/// run. A broken one fails: always the same backend (600 and 0 counts, 599 repeats), a backend
/// never chosen (0), a 1:2:2 bias (the light backend has mean 120: it passes 140 with p 0.025),
/// a round-robin or sticky pick in place of the random one (0 or 599 repeats). (The old bound,
/// at least 60 of 300, let a 1:2:2 bias pass one time in four.)
fn assert_uniform_random(
    replies: &[tests::Reply],
    counts: &std::collections::BTreeMap<String, usize>,
) {
    let n = replies.len();
    assert_eq!(n, 600, "the bounds below are computed for 600 picks");
    for (backend, c) in counts {
        assert!(
            (140..=260).contains(c),
            "{backend} got {c} of {n}, outside [140, 260]: {counts:?}"
        );
    }
    let repeats = replies
        .windows(2)
        .filter(|w| w[0].backend == w[1].backend)
        .count();
    assert!(
        (140..=260).contains(&repeats),
        "{repeats} of {} successive picks repeated the backend, outside [140, 260] (uniform \
         random expects 200): the picks are not independent",
        n - 1
    );
}

#[test]
fn clusterip_tcp_v4_balances_over_every_backend() {
    balanced(Proto::Tcp, false);
}

#[test]
fn clusterip_tcp_v6_balances_over_every_backend() {
    balanced(Proto::Tcp, true);
}

#[test]
fn clusterip_udp_v4_balances_and_replies_come_from_the_vip() {
    balanced(Proto::Udp, false);
}

#[test]
fn clusterip_udp_v6_balances_and_replies_come_from_the_vip() {
    balanced(Proto::Udp, true);
}

#[test]
fn clusterip_connected_udp_v4_balances_per_socket() {
    balanced(Proto::UdpConnected, false);
}

#[test]
fn clusterip_connected_udp_v6_balances_per_socket() {
    balanced(Proto::UdpConnected, true);
}

/// The backends that answered a `udp-stream`, in order; panics on anything but an answer (an
/// unconnected socket never gets an error, and a timeout is a lost datagram).
fn stream_backends(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| match l["backend"].as_str() {
            Some(b) => b.to_string(),
            None => panic!("not an answer: {l} in {lines:?}"),
        })
        .collect()
}

/// semantics 4.11, 9.2, 9.3: kube-proxy's conntrack sees the datagrams one unconnected socket
/// sends to one Service address and port as one flow: balanced once, then kept on its backend
/// while that backend serves (sockets are still balanced one by one: the tests above send each
/// datagram from a fresh socket). Here one socket per family sends a datagram every 50 ms: all
/// reach one backend. When that backend leaves the Service, the flow is balanced afresh once
/// and stays on its new backend.
#[test]
fn unconnected_udp_datagrams_of_one_socket_stay_on_one_backend() {
    if !privileged() {
        return;
    }
    let mut env = dual_stack_env(3, &[DNS], "");
    let all = ["pod-2", "pod-3", "pod-4"];
    for (family, vip) in [("IPv4", addr(VIP4, 53)), ("IPv6", addr(VIP6, 53))] {
        env.wait_for_backends(Proto::Udp, vip, &all);
        let stream = env.topo.start_udp_stream(0, vip, 15, false);
        let wait_lines = |n: usize| {
            poll_until(
                &format!("{n} datagrams answered"),
                Duration::from_secs(10),
                || {
                    let lines = stream.lines();
                    if lines.len() >= n {
                        Ok(lines)
                    } else {
                        Err(format!("{lines:?}"))
                    }
                },
            )
        };
        let before = stream_backends(&wait_lines(30));
        let first = before[0].clone();
        assert!(
            before.iter().all(|b| *b == first),
            "{family}: one socket's datagrams went to several backends: {before:?}"
        );
        // Take the flow's backend out of this family's slice.
        let rest: Vec<usize> = (1..=3)
            .filter(|i| format!("pod-{}", i + 1) != first)
            .collect();
        let eps: Vec<Ep> = rest
            .iter()
            .map(|i| {
                let p = &env.topo.pods[*i];
                if family == "IPv6" {
                    ep(p.ip6)
                } else {
                    ep(p.ip4)
                }
            })
            .collect();
        let slice = if family == "IPv6" { "web-v6" } else { "web-v4" };
        env.agent.write_manifest(
            &format!("{slice}.yaml"),
            &slice_yaml(slice, "web", family, &[DNS], &eps),
        );
        let moved_at = poll_until("the flow moved", Duration::from_secs(10), || {
            let b = stream_backends(&stream.lines());
            match b.iter().position(|b| *b != first) {
                Some(i) => Ok(i),
                None => Err(format!("{} answers, all from {first}", b.len())),
            }
        });
        let after = stream_backends(&wait_lines(moved_at + 20))[moved_at..].to_vec();
        let second = after[0].clone();
        assert!(
            after.iter().all(|b| *b == second),
            "{family}: balanced afresh once, then kept: {after:?}"
        );
        // Restore the slice for the next family's run (and every backend for a fresh socket).
        env.agent.write_manifest(
            &format!("{slice}.yaml"),
            &slice_yaml(
                slice,
                "web",
                family,
                &[DNS],
                &(1..=3)
                    .map(|i| {
                        let p = &env.topo.pods[i];
                        if family == "IPv6" {
                            ep(p.ip6)
                        } else {
                            ep(p.ip4)
                        }
                    })
                    .collect::<Vec<_>>(),
            ),
        );
        env.wait_for_backends(Proto::Udp, vip, &all);
    }
}

/// A datagram flow ends when it is idle for `--conntrack-udp-timeout` (kube-proxy's conntrack
/// forgets an idle UDP flow): the socket's next datagram is a new flow, balanced afresh. With
/// round-robin (a new flow takes the next backend) and a 1 s timeout: datagrams 50 ms apart
/// stay on one backend; datagrams 1.3 s apart take the backends in turn.
#[test]
fn an_idle_datagram_flow_is_balanced_afresh() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(4);
    env.agent.kill();
    env.agent
        .extra_args
        .extend(["--conntrack-udp-timeout".to_string(), "1s".to_string()]);
    env.agent.start();
    let svc = service_yaml("dns", &[VIP4], &[DNS], "").replacen(
        "metadata: {name: dns, namespace: default}",
        "metadata: {name: dns, namespace: default, annotations: {kube-bpf-proxy.io/scheduler: rr}}",
        1,
    );
    env.agent.write_manifest("dns.yaml", &svc);
    let eps: Vec<Ep> = (1..=3).map(|i| ep(env.topo.pods[i].ip4)).collect();
    env.agent.write_manifest(
        "dns-slice.yaml",
        &slice_yaml("dns-1", "dns", "IPv4", &[DNS], &eps),
    );
    let vip = addr(VIP4, 53);
    env.wait_for_backends(Proto::Udp, vip, &["pod-2", "pod-3", "pod-4"]);
    let fast = stream_backends(&env.topo.start_slow_udp_stream(0, vip, 2, 50).finish());
    assert!(fast.len() >= 20, "{fast:?}");
    assert!(fast.iter().all(|b| *b == fast[0]), "{fast:?}");
    let slow = stream_backends(&env.topo.start_slow_udp_stream(0, vip, 5, 1300).finish());
    assert!(slow.len() >= 3, "{slow:?}");
    assert!(
        slow.windows(2).all(|w| w[0] != w[1]),
        "each datagram after an idle second is a new flow, the next backend's: {slow:?}"
    );
}

/// With tc attached nowhere (`--external-interfaces= --pod-interfaces=none`, as here) no pod
/// can be translated per packet: `--masquerade-all` is then said to have no effect, and pods
/// keep reaching their Services through the socket layer.
#[test]
fn without_tc_masquerade_all_leaves_pods_on_the_socket_layer() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(3);
    env.agent.kill();
    env.agent.extra_args.push("--masquerade-all".to_string());
    let from = env.agent.log_position();
    env.agent.start();
    env.agent.wait_for_log(
        from,
        "tc is attached nowhere, so no pod can be translated per packet",
        Duration::from_secs(20),
    );
    env.agent
        .write_manifest("web.yaml", &service_yaml("web", &[VIP4], &[HTTP], ""));
    let eps: Vec<Ep> = (1..=2).map(|i| ep(env.topo.pods[i].ip4)).collect();
    env.agent.write_manifest(
        "web-slice.yaml",
        &slice_yaml("web-1", "web", "IPv4", &[HTTP], &eps),
    );
    env.wait_for_backends(Proto::Tcp, addr(VIP4, 80), &["pod-2", "pod-3"]);
}

/// SCTP frontends are translated like TCP ones (semantics 12.1). Not yet: SCTP sockets run no
/// cgroup socket hooks (`net/sctp` has no `pre_connect`), and tc does not translate SCTP; on a
/// kernel with SCTP (Debian's 6.12 in a guest) this fails with the connect() untranslated.
#[test]
#[ignore = "SCTP is not translated: the kernel runs no socket hooks for SCTP, and tc has no SCTP (README, 12.1)"]
fn clusterip_sctp_v4_balances_over_every_backend() {
    if !privileged() {
        return;
    }
    // A kernel feature: probed (socket(2) in a namespace of the test's own), and a kernel
    // without it makes this test a skip by name in `cargo xtask test`'s summary, never a pass.
    let probe_ns = tests::NetNs::new(tests::harness::names::unique());
    if let Err(why) = probe_ns.run(|| tests::probe_sctp(libc::AF_INET)) {
        tests::skip(&why);
        return;
    }
    drop(probe_ns);
    let sctp = Port {
        name: "sctp",
        port: 80,
        proto: "SCTP",
    };
    let mut env = dual_stack_env(2, &[sctp], "");
    env.wait_for_backends(Proto::Sctp, addr(VIP4, 80), &["pod-2", "pod-3"]);
}

/// An IPv6 socket connecting to an IPv4-mapped ClusterIP is translated too.
#[test]
fn clusterip_v4_mapped_on_ipv6_socket_is_translated() {
    if !privileged() {
        return;
    }
    let mut env = dual_stack_env(2, &[HTTP], "");
    let mapped: SocketAddr = format!("[::ffff:{VIP4}]:80").parse().unwrap();
    env.wait_for_backends(Proto::Tcp, mapped, &["pod-2", "pod-3"]);
    for r in env.request(Proto::Tcp, mapped, 10) {
        assert_eq!(r.peer, format!("{VIP4}:80"));
    }
}

/// semantics 3.7: no usable endpoint: connect() and sendto() fail at once with ECONNREFUSED.
#[test]
fn clusterip_without_endpoints_is_refused_immediately() {
    if !privileged() {
        return;
    }
    let env = Env::new(2);
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &[VIP4, VIP6], &[HTTP, DNS], ""),
    );
    // One endpoint that is not ready and not terminating: unusable (semantics 3.5).
    let not_ready = Ep {
        addr: env.topo.pods[1].ip4.to_string(),
        node: NODE,
        conditions: "ready: false",
    };
    env.agent.write_manifest(
        "web-v4.yaml",
        &slice_yaml("web-v4", "web", "IPv4", &[HTTP, DNS], &[not_ready]),
    );
    for (proto, to) in [
        (Proto::Tcp, addr(VIP4, 80)),
        (Proto::Udp, addr(VIP4, 53)),
        (Proto::Tcp, addr(VIP6, 80)),
        (Proto::UdpConnected, addr(VIP6, 53)),
    ] {
        let replies = tests::poll_until(
            &format!("{to} {proto:?} refused"),
            Duration::from_secs(10),
            || {
                let r = env.request(proto, to, 1);
                if r[0].errno == Some(libc::ECONNREFUSED) {
                    Ok(r)
                } else {
                    Err(format!("{r:?}"))
                }
            },
        );
        assert!(!replies[0].ok);
    }
    // Refusal is immediate: 20 attempts finish far below one client timeout (2 s) each.
    let started = Instant::now();
    let replies = env.request(Proto::Tcp, addr(VIP4, 80), 20);
    assert!(
        replies.iter().all(|r| r.errno == Some(libc::ECONNREFUSED)),
        "{replies:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2 * 20),
        "refusals must not wait for timeouts"
    );
}

/// semantics 3.12 (nftables mode): a port the Service does not define on an active ClusterIP
/// is rejected.
#[test]
fn clusterip_undefined_port_is_rejected() {
    if !privileged() {
        return;
    }
    let mut env = dual_stack_env(1, &[HTTP], "");
    env.wait_for_backends(Proto::Tcp, addr(VIP4, 80), &["pod-2"]);
    for to in [addr(VIP4, 81), addr(VIP6, 8080)] {
        let r = env.request(Proto::Tcp, to, 1);
        assert_eq!(r[0].errno, Some(libc::ECONNREFUSED), "{to}: {r:?}");
    }
}

/// semantics 3.12 (nftables mode): an address inside a ServiceCIDR that no Service has is
/// dropped; at the socket layer connect() and sendto() fail with EPERM at once (a drop there
/// does not leave the client waiting). The ClusterIPs keep working, an undefined port of one is
/// still rejected, and once the ServiceCIDR is gone the address is left alone again.
#[test]
fn unallocated_addresses_of_a_service_cidr_are_dropped() {
    if !privileged() {
        return;
    }
    let mut env = dual_stack_env(1, &[HTTP], "");
    env.wait_for_backends(Proto::Tcp, addr(VIP4, 80), &["pod-2"]);
    env.agent.write_manifest(
        "cidrs.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\n\
         spec: {cidrs: [10.96.0.0/16, 'fd00:96::/112']}\n",
    );
    let unallocated = [addr("10.96.99.99", 80), addr("fd00:96::99", 80)];
    for to in unallocated {
        poll_until(&format!("{to} dropped"), Duration::from_secs(10), || {
            let r = env.request(Proto::Tcp, to, 1);
            if r[0].errno == Some(libc::EPERM) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        });
        let r = env.request(Proto::Udp, to, 1);
        assert_eq!(r[0].errno, Some(libc::EPERM), "UDP {to}: {r:?}");
    }
    env.wait_for_backends(Proto::Tcp, addr(VIP6, 80), &["pod-2"]);
    let r = env.request(Proto::Tcp, addr(VIP4, 81), 1);
    assert_eq!(r[0].errno, Some(libc::ECONNREFUSED), "{r:?}");
    assert!(datapath_events(&env.agent, "service_ip_unallocated") >= 4);

    // semantics 1.1 with 3.12: a Service another service proxy serves is not proxied here, and
    // its ClusterIP is not dropped as unallocated either: kube-proxy drops after DNAT, so the
    // other proxy's translation (here nftables in the client pod, DNAT to pod-2) wins.
    let other = "10.96.7.7";
    env.agent.write_manifest(
        "other.yaml",
        &service_yaml("other", &[other], &[HTTP], "").replace(
            "metadata: {name: other, namespace: default}",
            "metadata: {name: other, namespace: default, labels: \
             {service.kubernetes.io/service-proxy-name: other-proxy}}",
        ),
    );
    let client = &env.topo.pods[0].ns;
    client.exec("nft", &["add", "table", "ip", "other"]);
    client.exec(
        "nft",
        &[
            "add", "chain", "ip", "other", "out", "{", "type", "nat", "hook", "output", "priority",
            "-100", ";", "}",
        ],
    );
    let pod2 = format!("{}:{BACKEND_PORT}", env.topo.pods[1].ip4);
    client.exec(
        "nft",
        &[
            "add", "rule", "ip", "other", "out", "ip", "daddr", other, "tcp", "dport", "80",
            "dnat", "to", &pod2,
        ],
    );
    poll_until(
        "the other proxy's ClusterIP served",
        Duration::from_secs(10),
        || {
            let r = env.request(Proto::Tcp, addr(other, 80), 1);
            if r[0].ok && r[0].backend == "pod-2" {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
    let refused_with = |what: &str, errno: i32| {
        poll_until(what, Duration::from_secs(10), || {
            let r = env.request(Proto::Tcp, addr(other, 80), 1);
            if r[0].errno == Some(errno) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        })
    };
    // Its label removed: a Service of this proxy without endpoints, rejected at connect().
    env.agent
        .write_manifest("other.yaml", &service_yaml("other", &[other], &[HTTP], ""));
    refused_with("the ClusterIP rejected here", libc::ECONNREFUSED);
    env.agent.remove_manifest("other.yaml");
    // Gone: unallocated again, dropped before the pod's own rules see it.
    refused_with("unallocated again", libc::EPERM);
    // The ServiceCIDR deleted: no longer dropped here.
    env.agent.remove_manifest("cidrs.yaml");
    for to in unallocated {
        poll_until(&format!("{to} left alone"), Duration::from_secs(10), || {
            let r = env.request(Proto::Udp, to, 1);
            if r[0].errno != Some(libc::EPERM) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        });
    }
}

/// Traffic to addresses that are not Services is left alone: straight to a pod, the client
/// sees the pod as its peer and the pod sees the client.
#[test]
fn non_service_traffic_is_untouched() {
    if !privileged() {
        return;
    }
    let mut env = dual_stack_env(2, &[HTTP], "");
    env.wait_for_backends(Proto::Tcp, addr(VIP4, 80), &["pod-2", "pod-3"]);
    let client = env.topo.pods[0].ip4;
    for (pod, ip) in [
        (1, env.topo.pods[1].ip4.to_string()),
        (2, env.topo.pods[2].ip6.to_string()),
    ] {
        let to = addr(&ip, BACKEND_PORT);
        for r in env.request(Proto::Tcp, to, 10) {
            assert!(r.ok, "{r:?}");
            assert_eq!(r.backend, format!("pod-{}", pod + 1));
            assert_eq!(r.peer, to.to_string());
        }
    }
    let r = env.request(
        Proto::Udp,
        addr(&env.topo.pods[1].ip4.to_string(), BACKEND_PORT),
        1,
    );
    assert_eq!(r[0].backend, "pod-2");
    assert!(r[0].seen.starts_with(&format!("{client}:")));
}

/// semantics 12.1, 2.2: one address, the same port number over TCP and UDP and another port:
/// three independent frontends with their own endpoints.
#[test]
fn same_address_ports_and_protocols_stay_separate() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(4);
    let tcp80 = Port {
        name: "a",
        port: 80,
        proto: "TCP",
    };
    let udp80 = Port {
        name: "b",
        port: 80,
        proto: "UDP",
    };
    let tcp81 = Port {
        name: "c",
        port: 81,
        proto: "TCP",
    };
    env.agent.write_manifest(
        "svc.yaml",
        &service_yaml("multi", &[VIP4], &[tcp80, udp80, tcp81], ""),
    );
    let pods = &env.topo.pods;
    let slices = [
        slice_yaml("multi-a", "multi", "IPv4", &[tcp80], &[ep(pods[1].ip4)]),
        slice_yaml("multi-b", "multi", "IPv4", &[udp80], &[ep(pods[2].ip4)]),
        slice_yaml("multi-c", "multi", "IPv4", &[tcp81], &[ep(pods[3].ip4)]),
    ];
    env.agent
        .write_manifest("slices.yaml", &slices.join("---\n"));
    env.wait_for_backends(Proto::Tcp, addr(VIP4, 80), &["pod-2"]);
    env.wait_for_backends(Proto::Udp, addr(VIP4, 80), &["pod-3"]);
    env.wait_for_backends(Proto::Tcp, addr(VIP4, 81), &["pod-4"]);
}

/// Waits until `vip` answers over TCP, whichever backend (an affinity Service keeps the client
/// on one, so `wait_for_backends` cannot see them all).
fn wait_any_backend(env: &Env, vip: SocketAddr) {
    tests::poll_until("the Service programmed", Duration::from_secs(10), || {
        let r = env.request(Proto::Tcp, vip, 1);
        if r[0].ok {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
}

/// semantics 6.1-6.5: ClientIP affinity keeps a client on one backend; after timeoutSeconds
/// without a new connection, the next one is balanced afresh.
#[test]
fn session_affinity_pins_a_client_until_the_timeout() {
    if !privileged() {
        return;
    }
    let affinity =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n";
    let mut env = dual_stack_env(3, &[HTTP], affinity);
    let vip = addr(VIP4, 80);
    // Probe until programmed, then check stickiness.
    wait_any_backend(&env, vip);
    env.agent.assert_running();
    let pinned = tally(&env.request(Proto::Tcp, vip, 40));
    assert_eq!(pinned.len(), 1, "one client, one backend: {pinned:?}");
    // The timer runs from the last new connection; wait it out (the condition is time itself).
    std::thread::sleep(Duration::from_millis(2600));
    // After expiry each connection starts a fresh entry; a new pick differs from the old one
    // with probability 2/3 per expiry. Expire up to 8 times: P(never moving) = (1/3)^8 < 2e-4.
    let old = pinned.keys().next().unwrap().clone();
    let mut moved = false;
    for _ in 0..8 {
        let r = env.request(Proto::Tcp, vip, 1);
        assert!(r[0].ok, "{r:?}");
        if r[0].backend != old {
            moved = true;
            break;
        }
        // Again the timeout itself (2 s) is what is waited for, not a condition to poll.
        std::thread::sleep(Duration::from_millis(2600));
    }
    assert!(moved, "affinity never expired");
}

/// semantics 6.6: an endpoint that leaves its Service port's sets loses its affinity state with
/// it (kube-proxy deletes the endpoint chain and its set): back again, its clients are balanced
/// afresh instead of being sent to it by a remembered entry.
#[test]
fn affinity_state_goes_with_an_endpoint_that_leaves() {
    if !privileged() {
        return;
    }
    let mut env = dual_stack_env(3, &[HTTP], "  sessionAffinity: ClientIP\n");
    let vip = addr(VIP4, 80);
    wait_any_backend(&env, vip);
    let all: Vec<Ep> = (1..=3).map(|i| ep(env.topo.pods[i].ip4)).collect();
    // Each round, the pinned endpoint leaves and comes back while the client makes no
    // connection; its next one is a fresh pick, another backend with probability 2/3.
    // P(the same backend 8 rounds running) = (1/3)^8 < 2e-4.
    let mut moved = false;
    for _ in 0..8 {
        let pinned = tally(&env.request(Proto::Tcp, vip, 10));
        assert_eq!(pinned.len(), 1, "one client, one backend: {pinned:?}");
        let old = pinned.keys().next().unwrap().clone();
        let victim = old.trim_start_matches("pod-").parse::<usize>().unwrap() - 1;
        let keep: Vec<Ep> = (1..=3)
            .filter(|i| *i != victim)
            .map(|i| ep(env.topo.pods[i].ip4))
            .collect();
        let pos = env.agent.log_position();
        env.agent.write_manifest(
            "web-v4.yaml",
            &slice_yaml("web-v4", "web", "IPv4", &[HTTP], &keep),
        );
        env.agent.wait_for_log(
            pos,
            "session affinity: forgot 1 client(s) of endpoints that left",
            Duration::from_secs(10),
        );
        let pos = env.agent.log_position();
        env.agent.write_manifest(
            "web-v4.yaml",
            &slice_yaml("web-v4", "web", "IPv4", &[HTTP], &all),
        );
        env.agent
            .wait_for_log(pos, "synced", Duration::from_secs(10));
        let r = env.request(Proto::Tcp, vip, 1);
        assert!(r[0].ok, "{r:?}");
        if r[0].backend != old {
            moved = true;
            break;
        }
    }
    assert!(moved, "a returning endpoint kept its old clients");
}

/// Removing a backend stops new connections to it, while a connection established before keeps
/// working (kube-proxy never cuts TCP flows, semantics 9.1).
#[test]
fn removed_backend_gets_no_new_connections_but_established_ones_survive() {
    if !privileged() {
        return;
    }
    let mut env = dual_stack_env(3, &[HTTP], "");
    let vip = addr(VIP4, 80);
    env.wait_for_backends(Proto::Tcp, vip, &["pod-2", "pod-3", "pod-4"]);
    let (mut held, first) = env.topo.hold(0, vip);
    assert!(first.ok, "{first:?}");
    let victim: usize = first
        .backend
        .trim_start_matches("pod-")
        .parse::<usize>()
        .unwrap()
        - 1;
    let keep: Vec<Ep> = (1..=3)
        .filter(|i| *i != victim)
        .map(|i| ep(env.topo.pods[i].ip4))
        .collect();
    env.agent.write_manifest(
        "web-v4.yaml",
        &slice_yaml("web-v4", "web", "IPv4", &[HTTP], &keep),
    );
    let remaining: Vec<String> = (1..=3)
        .filter(|i| *i != victim)
        .map(|i| format!("pod-{}", i + 1))
        .collect();
    env.wait_for_backends(
        Proto::Tcp,
        vip,
        &remaining.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let seen: BTreeSet<String> = env
        .request(Proto::Tcp, vip, 60)
        .into_iter()
        .map(|r| r.backend)
        .collect();
    assert!(
        !seen.contains(&first.backend),
        "new connections still reach {}",
        first.backend
    );
    let again = held.again();
    assert!(again.ok, "{again:?}");
    assert_eq!(
        again.backend, first.backend,
        "the established connection stays on its backend"
    );
    assert_eq!(again.peer, vip.to_string());
}

/// Processes in the node's own namespace (kubelet, host-network pods) reach ClusterIPs like
/// pods do; the backend sees the node's address.
#[test]
fn host_processes_reach_clusterips() {
    if !privileged() {
        return;
    }
    let mut env = dual_stack_env(2, &[HTTP], "");
    env.wait_for_backends(Proto::Tcp, addr(VIP4, 80), &["pod-2", "pod-3"]);
    for vip in [addr(VIP4, 80), addr(VIP6, 80)] {
        let replies = env
            .topo
            .request_from(&env.topo.node, true, Proto::Tcp, vip, 40);
        let counts = tally(&replies);
        assert_eq!(counts.len(), 2, "{vip}: {counts:?}");
        for r in &replies {
            assert_eq!(r.peer, vip.to_string());
            let seen: SocketAddr = r.seen.parse().unwrap();
            let node_ip = if vip.is_ipv4() {
                "10.244.0.1"
            } else {
                "fd00:244::1"
            };
            assert_eq!(seen.ip().to_string(), node_ip);
        }
    }
}

/// semantics 3.8: internalTrafficPolicy Local with endpoints only on other nodes: the ClusterIP
/// drops new connections; at the socket layer the connect() fails with EPERM instead of
/// hanging until the client's timeout.
#[test]
fn internal_traffic_policy_local_without_local_endpoints_drops() {
    if !privileged() {
        return;
    }
    let env = Env::new(2);
    env.agent.write_manifest(
        "web.yaml",
        &service_yaml("web", &[VIP4], &[HTTP], "  internalTrafficPolicy: Local\n"),
    );
    let remote = Ep {
        addr: env.topo.pods[1].ip4.to_string(),
        node: "node-b",
        conditions: "",
    };
    env.agent.write_manifest(
        "web-v4.yaml",
        &slice_yaml("web-v4", "web", "IPv4", &[HTTP], &[remote]),
    );
    tests::poll_until("ITP Local drop programmed", Duration::from_secs(10), || {
        let r = env.request(Proto::Tcp, addr(VIP4, 80), 1);
        if r[0].errno == Some(libc::EPERM) {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
}

const LB4: &str = "10.96.200.1";
const LB6: &str = "fd00:96::201";

/// `web` as a LoadBalancer with ClientIP affinity, LB IPs `LB4` and `LB6`, and `ranges` as its
/// loadBalancerSourceRanges.
fn ranged_lb_yaml(ranges: &str) -> String {
    service_yaml(
        "web",
        &[VIP4, VIP6],
        &[HTTP, DNS],
        &format!(
            "  type: LoadBalancer\n  sessionAffinity: ClientIP\n  \
             loadBalancerSourceRanges: [{ranges}]\nstatus:\n  \
             loadBalancer: {{ingress: [{{ip: {LB4}}}, {{ip: \"{LB6}\"}}]}}\n"
        ),
    )
}

/// One request from `ns` (in the test cgroup) to `to`, until `want` says it went as expected.
fn poll_request(
    env: &Env,
    ns: &tests::harness::netns::NetNs,
    proto: Proto,
    to: SocketAddr,
    what: &str,
    want: impl Fn(&tests::Reply) -> bool,
) {
    tests::poll_until(
        &format!("{what}: {proto:?} to {to}"),
        Duration::from_secs(15),
        || {
            let r = env.topo.request_from(ns, true, proto, to, 1);
            if want(&r[0]) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
}

/// semantics 7.8, 7.9: loadBalancerSourceRanges apply to pods and to the host too, each checked
/// by its own source address; at the socket layer a source outside the ranges gets EPERM from
/// connect() (TCP, connected UDP) and sendmsg() (unconnected UDP), in both families. Session
/// affinity keeps working for the allowed client; the ClusterIP of the same Service is not
/// filtered (7.8: LB IPs only); `services` and `explain` show the ranges.
#[test]
fn load_balancer_source_ranges_apply_to_pods_and_the_host() {
    if !privileged() {
        return;
    }
    // pod-1 connects from inside the ranges, pod-4 from outside; pod-2 and pod-3 are backends.
    let env = Env::new(4);
    let (inside, outside) = (&env.topo.pods[0], &env.topo.pods[3]);
    let ranges = format!("{}/32, \"{}/128\"", inside.ip4, inside.ip6);
    env.agent
        .write_manifest("web.yaml", &ranged_lb_yaml(&ranges));
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let eps: Vec<Ep> = (1..=2)
            .map(|i| {
                let p = &env.topo.pods[i];
                if v6 { ep(p.ip6) } else { ep(p.ip4) }
            })
            .collect();
        env.agent.write_manifest(
            &format!("web-{family}.yaml"),
            &slice_yaml(&format!("web-{family}"), "web", family, &[HTTP, DNS], &eps),
        );
    }
    // The node reaches the LB IPs through its pod bridge (its source there: 10.244.0.1).
    env.topo
        .node
        .ip(&["route", "add", "10.96.200.0/24", "dev", "br0"]);
    env.topo
        .node
        .ip(&["-6", "route", "add", "fd00:96::200/120", "dev", "br0"]);
    let frontends = [
        (Proto::Tcp, addr(LB4, 80)),
        (Proto::Tcp, addr(LB6, 80)),
        (Proto::Udp, addr(LB4, 53)),
        (Proto::Udp, addr(LB6, 53)),
        (Proto::UdpConnected, addr(LB4, 53)),
        (Proto::UdpConnected, addr(LB6, 53)),
    ];
    for (proto, to) in frontends {
        poll_request(
            &env,
            &inside.ns,
            proto,
            to,
            "pod inside the ranges answered",
            |r| r.ok,
        );
        let replies = env.topo.request_from(&inside.ns, true, proto, to, 10);
        let backends = tally(&replies);
        assert_eq!(
            backends.values().sum::<usize>(),
            10,
            "{proto:?} {to}: {replies:?}"
        );
        assert_eq!(
            backends.len(),
            1,
            "{proto:?} {to}: affinity keeps one backend: {backends:?}"
        );
        for r in &replies {
            assert_eq!(
                r.peer,
                to.to_string(),
                "the client sees the LB IP as its peer"
            );
            let seen: SocketAddr = r.seen.parse().unwrap();
            let own = if to.is_ipv4() {
                inside.ip4.to_string()
            } else {
                inside.ip6.to_string()
            };
            assert_eq!(seen.ip().to_string(), own, "the backend sees the pod");
        }
        poll_request(
            &env,
            &outside.ns,
            proto,
            to,
            "pod outside the ranges refused",
            |r| !r.ok && r.errno == Some(1),
        );
        poll_request(
            &env,
            &env.topo.node,
            proto,
            to,
            "host outside the ranges refused",
            |r| !r.ok && r.errno == Some(1),
        );
    }
    // The ClusterIP is not filtered (semantics 7.8).
    for to in [addr(VIP4, 80), addr(VIP6, 80)] {
        let r = env.topo.request_from(&outside.ns, true, Proto::Tcp, to, 1);
        assert!(r[0].ok, "{to} from outside the ranges: {r:?}");
    }
    assert!(datapath_events(&env.agent, "source_refused") >= 12);
    // What the operator sees.
    let cli = |args: &[&str]| -> serde_json::Value {
        let out =
            std::process::Command::new(tests::harness::process::workspace_binary("kube-bpf-proxy"))
                .args(args)
                .args(["-o", "json", "--bpffs"])
                .arg(&env.agent.pin_dir)
                .output()
                .expect("run the CLI");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let services = cli(&["services"]);
    let lb = services["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| frontend_name(f) == format!("{LB4}:80/TCP"))
        .unwrap_or_else(|| panic!("no {LB4}:80/TCP in {services}"));
    assert_eq!(lb["scope"], "loadBalancer");
    assert_eq!(
        lb["sourceRanges"],
        serde_json::json!([format!("{}/32", inside.ip4)])
    );
    let refused = cli(&[
        "explain",
        &outside.ip4.to_string(),
        &format!("{LB4}:80/TCP"),
    ]);
    assert_eq!(refused["verdict"], "refused", "{refused}");
    assert!(
        refused["reason"].as_str().unwrap().starts_with("refused"),
        "{refused}"
    );
    let allowed = cli(&["explain", &inside.ip4.to_string(), &format!("{LB4}:80/TCP")]);
    assert_eq!(allowed["verdict"], "translated", "{allowed}");
    // The node's own address in the ranges: the host is let through, by its source address.
    let ranges = format!("{ranges}, 10.244.0.1/32, \"fd00:244::1/128\"");
    env.agent
        .write_manifest("web.yaml", &ranged_lb_yaml(&ranges));
    for (proto, to) in frontends {
        poll_request(
            &env,
            &env.topo.node,
            proto,
            to,
            "host inside the ranges answered",
            |r| r.ok,
        );
        let r = env.topo.request_from(&outside.ns, true, proto, to, 1);
        assert_eq!(
            r[0].errno,
            Some(1),
            "{proto:?} {to}: still refused for pod-4: {r:?}"
        );
    }
}
