//! The health check set compiled from Services and EndpointSlices (semantics 8.1, 8.4, 3.13),
//! the answers (8.2, 8.3), and the servers' life cycle on real loopback sockets.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use super::*;
use crate::{compile::compile, health::DEFAULT_HEALTH_TIMEOUT, snapshot::Snapshot};
use serde_json::json;

// ---- wanted: pure ---------------------------------------------------------------------------

/// A snapshot of YAML documents, on node `node-a` (the compile tests' builder).
fn snapshot(docs: &[String]) -> Snapshot {
    crate::compile::tests::snapshot(&docs.join("\n---\n"), "node-a", None)
}

/// Service `default/<name>`, ports `http` 80/TCP and `dns` 53/UDP; `spec` adds spec entries.
fn service(name: &str, cluster_ip: &str, spec: &str) -> String {
    format!(
        "kind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{clusterIP: {cluster_ip}, ports: [{{name: http, port: 80, protocol: TCP}}, \
         {{name: dns, port: 53, protocol: UDP}}], {spec}}}"
    )
}

fn lb_local(name: &str, cluster_ip: &str, hc_port: u16) -> String {
    service(
        name,
        cluster_ip,
        &format!(
            "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: {hc_port}"
        ),
    )
}

/// An EndpointSlice of `default/<service>` with the given ports and endpoint flow mappings.
fn slice(name: &str, service: &str, family: &str, ports: &str, endpoints: &[&str]) -> String {
    format!(
        "kind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, \
         labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\n\
         ports: {ports}\nendpoints: [{}]",
        endpoints.join(", ")
    )
}

const HTTP: &str = "[{name: http, port: 8080, protocol: TCP}]";
const DNS: &str = "[{name: dns, port: 5353, protocol: UDP}]";

fn wanted_of(docs: &[String]) -> (BTreeMap<u16, ServiceHealth>, Vec<Problem>) {
    wanted(&compile(&snapshot(docs)))
}

/// An IPv4 Service's health with `n` local endpoints.
fn health(name: &str, n: usize) -> ServiceHealth {
    ServiceHealth {
        namespace: "default".into(),
        name: name.into(),
        local_v4: Some(n),
        local_v6: None,
    }
}

#[test]
fn counts_distinct_ready_local_ips_over_ports() {
    // semantics 8.4: distinct IPs of this node's ready endpoints, over all ports.
    let (w, problems) = wanted_of(&[
        lb_local("web", "10.96.0.10", 32001),
        slice(
            "web-http",
            "web",
            "IPv4",
            HTTP,
            &[
                "{addresses: [10.0.0.1], nodeName: node-a}",
                "{addresses: [10.0.0.2], nodeName: node-a}",
                // Remote: not counted.
                "{addresses: [10.0.1.1], nodeName: node-b}",
                // No node: not local.
                "{addresses: [10.0.1.2]}",
            ],
        ),
        slice(
            "web-dns",
            "web",
            "IPv4",
            DNS,
            &[
                // The same pod on the other port counts once.
                "{addresses: [10.0.0.1], nodeName: node-a}",
                "{addresses: [10.0.0.3], nodeName: node-a}",
            ],
        ),
    ]);
    assert_eq!(problems, vec![]);
    assert_eq!(w, BTreeMap::from([(32001, health("web", 3))]));
}

#[test]
fn terminating_and_unready_local_endpoints_do_not_count() {
    // semantics 3.13: a node whose local endpoints are all terminating reports 0, although
    // the Local policy still uses them (3.4); not-ready ones are never used (3.5).
    let (w, _) = wanted_of(&[
        lb_local("web", "10.96.0.10", 32001),
        slice(
            "web-http",
            "web",
            "IPv4",
            HTTP,
            &[
                "{addresses: [10.0.0.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}",
                "{addresses: [10.0.0.2], nodeName: node-a, conditions: {ready: false}}",
                "{addresses: [10.0.1.1], nodeName: node-b}",
            ],
        ),
    ]);
    assert_eq!(w, BTreeMap::from([(32001, health("web", 0))]));

    // semantics 3.2: ready and terminating (publishNotReadyAddresses) is ready.
    let (w, _) = wanted_of(&[
        lb_local("web", "10.96.0.10", 32001),
        slice(
            "web-http",
            "web",
            "IPv4",
            HTTP,
            &[
                "{addresses: [10.0.0.1], nodeName: node-a, conditions: {ready: true, serving: true, terminating: true}}",
            ],
        ),
    ]);
    assert_eq!(w, BTreeMap::from([(32001, health("web", 1))]));
}

#[test]
fn both_families_count() {
    let svc = "kind: Service\nmetadata: {name: web, namespace: default}\n\
               spec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00:96::10'], \
               ipFamilies: [IPv4, IPv6], ports: [{name: http, port: 80, protocol: TCP}], \
               type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32001}";
    let (w, _) = wanted_of(&[
        svc.to_string(),
        slice(
            "web-4",
            "web",
            "IPv4",
            HTTP,
            &["{addresses: [10.0.0.1], nodeName: node-a}"],
        ),
        slice(
            "web-6",
            "web",
            "IPv6",
            HTTP,
            &[
                "{addresses: ['fd00::1'], nodeName: node-a}",
                "{addresses: ['fd00::2'], nodeName: node-b}",
            ],
        ),
    ]);
    // semantics 8.4, 10.3: each family's proxier counts its own family's addresses, so the
    // dual-stack pod counts once, whichever family the probe comes over.
    let want = ServiceHealth {
        local_v6: Some(1),
        ..health("web", 1)
    };
    assert_eq!(w, BTreeMap::from([(32001, want.clone())]));
    assert_eq!(
        (want.local_endpoints(false), want.local_endpoints(true)),
        (1, 1)
    );
    // Families that differ answer each probe with its own family's count; a single-stack
    // Service answers every probe with its one family's.
    let uneven = ServiceHealth {
        local_v6: Some(2),
        ..health("web", 1)
    };
    assert_eq!(
        (uneven.local_endpoints(false), uneven.local_endpoints(true)),
        (1, 2)
    );
    let v6_only = ServiceHealth {
        local_v4: None,
        local_v6: Some(3),
        ..health("web", 0)
    };
    assert_eq!(
        (
            v6_only.local_endpoints(false),
            v6_only.local_endpoints(true)
        ),
        (3, 3)
    );
    assert_eq!(health("web", 2).local_endpoints(true), 2);
}

#[test]
fn only_load_balancers_with_local_policy_and_a_port() {
    // semantics 8.1: NeedsHealthCheck is type LoadBalancer and ETP Local; 0 means none.
    let eps = ["{addresses: [10.0.0.1], nodeName: node-a}"];
    for spec in [
        "type: LoadBalancer, externalTrafficPolicy: Cluster, healthCheckNodePort: 32001",
        "type: LoadBalancer, healthCheckNodePort: 32001",
        "type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32001",
        "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 0",
        "type: LoadBalancer, externalTrafficPolicy: Local",
        "type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 70000",
    ] {
        let (w, _) = wanted_of(&[
            service("web", "10.96.0.10", spec),
            slice("web-http", "web", "IPv4", HTTP, &eps),
        ]);
        assert!(w.is_empty(), "{spec}: {w:?}");
    }
    // A Service that is not proxied at all (headless) has no health check either.
    let (w, _) = wanted_of(&[lb_local("web", "None", 32001)]);
    assert!(w.is_empty(), "{w:?}");
    // No endpoints at all: served, answering 0.
    let (w, _) = wanted_of(&[lb_local("web", "10.96.0.10", 32001)]);
    assert_eq!(w, BTreeMap::from([(32001, health("web", 0))]));
}

#[test]
fn one_port_two_services_first_by_name_wins() {
    let (w, problems) = wanted_of(&[
        lb_local("zeta", "10.96.0.12", 32001),
        lb_local("alpha", "10.96.0.11", 32001),
        lb_local("beta", "10.96.0.13", 32002),
        slice(
            "zeta-http",
            "zeta",
            "IPv4",
            HTTP,
            &["{addresses: [10.0.0.9], nodeName: node-a}"],
        ),
    ]);
    assert_eq!(
        w,
        BTreeMap::from([(32001, health("alpha", 0)), (32002, health("beta", 0))])
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].object, "Service default/zeta");
    assert!(
        problems[0]
            .message
            .contains("healthCheckNodePort 32001 is already used by Service default/alpha"),
        "{}",
        problems[0]
    );
}

// ---- answers: pure --------------------------------------------------------------------------

#[test]
fn answer_is_200_only_with_local_endpoints_and_a_healthy_proxy() {
    // semantics 8.2, 8.3
    for (n, healthy, status) in [
        (2, true, 200),
        (0, true, 503),
        (2, false, 503),
        (0, false, 503),
    ] {
        let r = response(&health("web", n), healthy, false);
        assert_eq!(r.status, status, "{n} {healthy}");
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            r.extra_headers,
            vec![("X-Load-Balancing-Endpoint-Weight", n.to_string())]
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            json!({
                "service": {"namespace": "default", "name": "web"},
                "localEndpoints": n,
                "serviceProxyHealthy": healthy,
            })
        );
    }
    // The text itself, as kube-proxy's template writes it.
    assert_eq!(
        String::from_utf8(response(&health("web", 2), true, false).body).unwrap(),
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\
         \"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
}

// ---- servers: loopback sockets --------------------------------------------------------------

/// A port that was free on both families a moment ago.
fn free_port() -> u16 {
    bind(0, Listen::Everywhere)
        .unwrap()
        .expect("a socket")
        .local_addr()
        .unwrap()
        .port()
}

fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

fn request(addr: SocketAddr, request: &str) -> io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap();
            (k.to_ascii_lowercase(), v.to_string())
        })
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

fn get(port: u16, path: &str) -> io::Result<Reply> {
    request(
        SocketAddr::from(([127, 0, 0, 1], port)),
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
}

fn servers() -> (HealthChecks, Arc<Health>, Arc<Metrics>) {
    let health = Arc::new(Health::new(DEFAULT_HEALTH_TIMEOUT, &[], SystemTime::now()));
    let metrics = Arc::new(Metrics::new("v", &[]));
    (
        HealthChecks::new(Arc::clone(&health), Some(Arc::clone(&metrics))),
        health,
        metrics,
    )
}

#[test]
fn serves_any_path_and_method_on_both_families_and_updates_in_place() {
    let (hc, proxy, metrics) = servers();
    let port = free_port();
    hc.update(&BTreeMap::from([(port, health("web", 2))]), &[]);
    assert_eq!(hc.serving(), vec![port]);

    let r = get(port, "/").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "2");
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["service"]["name"], "web");
    assert_eq!(body["localEndpoints"], 2);
    assert_eq!(body["serviceProxyHealthy"], true);

    // semantics 8.2: any path, any method.
    assert_eq!(get(port, "/healthz?x=1").unwrap().status, 200);
    let post = request(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "POST /anything HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(post.status, 200);
    assert!(post.body.contains("\"localEndpoints\": 2"), "{}", post.body);
    let head = request(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "HEAD / HTTP/1.1\r\n\r\n",
    )
    .unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    if ipv6_loopback() {
        let r = request(
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            "GET / HTTP/1.1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 200);
    }

    // semantics 8.4, 10.3: a dual-stack Service answers each probe with the count of the
    // family it came over (each kube-proxy proxier counts its own family).
    if ipv6_loopback() {
        let dual = ServiceHealth {
            local_v6: Some(3),
            ..health("web", 2)
        };
        hc.update(&BTreeMap::from([(port, dual)]), &[]);
        let v6 = request(
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            "GET / HTTP/1.1\r\n\r\n",
        )
        .unwrap();
        assert_eq!(v6.headers["x-load-balancing-endpoint-weight"], "3");
        assert_eq!(
            get(port, "/").unwrap().headers["x-load-balancing-endpoint-weight"],
            "2"
        );
    }

    // Counts change in place.
    hc.update(&BTreeMap::from([(port, health("web", 0))]), &[]);
    let r = get(port, "/").unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "0");
    assert!(r.body.contains("\"localEndpoints\": 0"), "{}", r.body);

    // An unhealthy proxy fails the check whatever the endpoints (semantics 8.2, 8.6).
    hc.update(&BTreeMap::from([(port, health("web", 1))]), &[]);
    assert_eq!(get(port, "/").unwrap().status, 200);
    proxy.queued(SystemTime::now() - DEFAULT_HEALTH_TIMEOUT - Duration::from_secs(1));
    let r = get(port, "/").unwrap();
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("\"serviceProxyHealthy\": false"),
        "{}",
        r.body
    );
    proxy.synced(SystemTime::now());
    assert_eq!(get(port, "/").unwrap().status, 200);

    assert!(
        metrics
            .render()
            .contains("kube_bpf_proxy_healthcheck_ports{state=\"serving\"} 1\n")
    );

    // Not wanted any more: the port is closed by the time update returns.
    hc.update(&BTreeMap::new(), &[]);
    assert_eq!(hc.serving(), Vec::<u16>::new());
    let e = get(port, "/").err().expect("connection refused");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    // And can be bound again at once.
    hc.update(&BTreeMap::from([(port, health("web", 1))]), &[]);
    assert_eq!(get(port, "/").unwrap().status, 200);
}

#[test]
fn bind_failure_is_counted_and_retried() {
    let (hc, _, metrics) = servers();
    let port = free_port();
    let taken = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).unwrap();
    let other = free_port();
    let wanted = BTreeMap::from([(port, health("web", 1)), (other, health("api", 1))]);
    hc.update(&wanted, &[]);
    hc.update(&wanted, &[]);
    // The other port is unaffected.
    assert_eq!(hc.serving(), vec![other]);
    assert_eq!(get(other, "/").unwrap().status, 200);
    let text = metrics.render();
    assert!(
        text.contains("kube_bpf_proxy_healthcheck_bind_failures_total 2\n"),
        "{text}"
    );
    assert!(text.contains("kube_bpf_proxy_healthcheck_ports{state=\"failing\"} 1\n"));

    // Freed: tried again by `retry_failing` once BIND_RETRY has passed, with no update
    // (a quiet cluster has no sync to retry at); not before.
    drop(taken);
    hc.retry_failing();
    assert_eq!(hc.serving(), vec![other]);
    let freed = std::time::Instant::now();
    while hc.serving().len() < 2 {
        assert!(
            freed.elapsed() < BIND_RETRY * 3,
            "port {port} not retried: {:?}",
            hc.serving()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        hc.retry_failing();
    }
    assert!(freed.elapsed() >= BIND_RETRY / 2, "retried too soon");
    assert_eq!(hc.serving(), vec![port.min(other), port.max(other)]);
    let r = get(port, "/").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains("\"name\": \"web\""), "{}", r.body);
    let text = metrics.render();
    assert!(text.contains("kube_bpf_proxy_healthcheck_ports{state=\"failing\"} 0\n"));
    assert!(text.contains("kube_bpf_proxy_healthcheck_ports{state=\"serving\"} 2\n"));
}

/// issue #21: a cloud load balancer's probes of /healthz and of a healthCheckNodePort are
/// answered at once while 1,000 idle connections and some slow-loris ones (a request line one
/// byte at a time) are open to each port; those are all closed at the header deadline, and a
/// health check server still stops promptly. The servers run as the agent runs them.
#[test]
fn idle_and_slow_loris_connections_delay_no_probe() {
    use std::time::Instant;

    use crate::http::{
        HEADER_DEADLINE, HttpState,
        tests::{
            Held, SlowLoris, flood_alone, hold_idle, raise_nofile_limit, timed_get, wait_closed,
            wait_until,
        },
    };

    const IDLE: usize = 1000;
    const SLOW: usize = 20;
    const PROBES: usize = 5;
    // Far below the 1 s of a SYN retry or the header deadline a held-up probe would show, and
    // far above a busy machine's scheduling delays.
    const BOUND: Duration = Duration::from_millis(800);
    let _flood = flood_alone();
    // Both ends of every connection, in this process, plus room for the other tests.
    raise_nofile_limit(4 * (IDLE + SLOW) as u64 + 1000);

    let (hc, proxy, metrics) = servers();
    let healthz = crate::http::Server::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Arc::new(HttpState {
            role: crate::http::Role::Health,
            metrics,
            health: proxy,
            configz: String::new(),
        }),
    )
    .unwrap();
    let healthz_addr = healthz.local_addr();
    let port = free_port();
    hc.update(&BTreeMap::from([(port, health("web", 2))]), &[]);
    let hc_addr = SocketAddr::from(([127, 0, 0, 1], port));

    let idle: Vec<Held> = [healthz_addr, hc_addr]
        .iter()
        .flat_map(|&addr| hold_idle(addr, IDLE))
        .collect();
    let slow = [
        SlowLoris::start(healthz_addr, SLOW),
        SlowLoris::start(hc_addr, SLOW),
    ];
    // Every connection is accepted and held by the servers before the probes.
    let open = |port| {
        lock(&hc.state).running[&port]
            .servers
            .values()
            .map(Server::open_connections)
            .sum::<usize>()
    };
    wait_until(Duration::from_secs(10), || {
        let (a, b) = (healthz.open_connections(), open(port));
        (
            a >= IDLE + SLOW && b >= IDLE + SLOW,
            format!("/healthz holds {a}, the health check port {b}"),
        )
    });

    let mut took = Vec::new();
    for (addr, path, status) in [(healthz_addr, "/healthz", 200), (hc_addr, "/", 200)] {
        let mut times: Vec<Duration> = (0..PROBES)
            .map(|_| {
                let (got, t) = timed_get(addr, path);
                assert_eq!(got, status, "{addr}{path}");
                t
            })
            .collect();
        times.sort();
        eprintln!("{path} on {addr} with {IDLE} idle and {SLOW} slow-loris connections: {times:?}");
        took.push((path, times[PROBES - 1]));
    }
    for (path, worst) in took {
        assert!(worst < BOUND, "{path} took {worst:?}");
    }

    // Stopping a health check server closes its port at once, connections held or not.
    let stop = Instant::now();
    hc.update(&BTreeMap::new(), &[]);
    let stopped = stop.elapsed();
    eprintln!("health check server stopped in {stopped:?}");
    let e = get(port, "/").err().expect("connection refused");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    assert!(stopped < Duration::from_secs(5), "{stopped:?}");

    // Every held connection is closed by the server at the header deadline, not before.
    let held: Vec<&Held> = idle
        .iter()
        .chain(slow.iter().flat_map(|s| &s.held))
        .collect();
    let closed = wait_closed(&held, HEADER_DEADLINE + Duration::from_secs(10));
    let (first, last) = (closed.iter().min().unwrap(), closed.iter().max().unwrap());
    eprintln!(
        "{} held connections closed {first:?} to {last:?} after opening",
        held.len()
    );
    assert!(*first >= HEADER_DEADLINE, "closed after {first:?}");
    wait_until(Duration::from_secs(5), || {
        let n = healthz.open_connections();
        (n == 0, format!("/healthz holds {n}"))
    });
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// semantics 8.1, 7.2, 7.3: `--nodeport-addresses` narrows the families it names (its own
/// CIDRs, or both with `primary`); a narrowed family listens on its NodePort addresses, the
/// others on every address.
#[test]
fn health_checks_listen_where_nodeport_addresses_say() {
    let sel = |values: &[&str]| {
        let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        Narrowed::of(&NodePortSelection::parse(&values, None).unwrap())
    };
    let (none, both) = (Narrowed::default(), Narrowed { v4: true, v6: true });
    assert_eq!(sel(&[]), none);
    assert_eq!(
        sel(&["192.0.2.0/24"]),
        Narrowed {
            v4: true,
            v6: false
        }
    );
    assert_eq!(
        sel(&["2001:db8::/64"]),
        Narrowed {
            v4: false,
            v6: true
        }
    );
    assert_eq!(sel(&["primary"]), both);
    assert_eq!(sel(&["192.0.2.0/24", "2001:db8::/64"]), both);
    // A zero-length prefix matches the whole family, as kube-proxy's does.
    assert_eq!(sel(&["0.0.0.0/0", "::/0"]), none);
    assert_eq!(sel(&["0.0.0.0/0", "192.0.2.0/24"]), none);
    assert_eq!(
        sel(&["::/0", "192.0.2.0/24"]),
        Narrowed {
            v4: true,
            v6: false
        }
    );

    let addrs = [ip("192.0.2.7"), ip("2001:db8::7"), ip("192.0.2.1")];
    assert_eq!(listens(none, &addrs), [Listen::Everywhere]);
    assert_eq!(
        listens(
            Narrowed {
                v4: true,
                v6: false
            },
            &addrs
        ),
        [
            Listen::AnyV6,
            Listen::At(ip("192.0.2.1")),
            Listen::At(ip("192.0.2.7"))
        ]
    );
    assert_eq!(
        listens(
            Narrowed {
                v4: false,
                v6: true
            },
            &addrs
        ),
        [Listen::AnyV4, Listen::At(ip("2001:db8::7"))]
    );
    assert_eq!(
        listens(both, &addrs),
        [
            Listen::At(ip("192.0.2.1")),
            Listen::At(ip("192.0.2.7")),
            Listen::At(ip("2001:db8::7"))
        ]
    );
    // Nothing matches: nothing to listen on.
    assert_eq!(listens(both, &[]), []);
}

/// The servers follow the node's addresses of a narrowed family: bound on each, closed on the
/// ones that went, while the other family keeps its wildcard socket. A port with nothing to
/// listen on is failing, not served.
#[test]
fn narrowed_health_checks_follow_the_node_addresses() {
    let (hc, _, metrics) = servers();
    let hc = hc.narrowed(Narrowed {
        v4: true,
        v6: false,
    });
    let port = free_port();
    let at = |a: &str| SocketAddr::from((ip(a), port));
    let wanted = BTreeMap::from([(port, health("web", 1))]);
    let refused = |a: &str| {
        let e = request(at(a), "GET / HTTP/1.1\r\n\r\n")
            .err()
            .unwrap_or_else(|| panic!("{a} answered"));
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{a}: {e}");
    };

    hc.update(&wanted, &[ip("127.0.0.2"), ip("2001:db8::7")]);
    assert_eq!(hc.serving(), vec![port]);
    assert_eq!(
        request(at("127.0.0.2"), "GET / HTTP/1.1\r\n\r\n")
            .unwrap()
            .status,
        200
    );
    refused("127.0.0.1");
    if ipv6_loopback() {
        assert_eq!(
            request(at("::1"), "GET / HTTP/1.1\r\n\r\n").unwrap().status,
            200
        );
    }

    // The address moved: the old socket is closed, the new one serves.
    hc.update(&wanted, &[ip("127.0.0.3")]);
    refused("127.0.0.2");
    assert_eq!(
        request(at("127.0.0.3"), "GET / HTTP/1.1\r\n\r\n")
            .unwrap()
            .status,
        200
    );

    // An address the node does not have (yet: an IPv6 one in duplicate address detection) is
    // bound all the same (FREEBIND), and serves once it is there.
    hc.update(&wanted, &[ip("192.0.2.123")]);
    assert_eq!(hc.serving(), vec![port]);
    let failures = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("kube_bpf_proxy_healthcheck_bind_failures_total "))
            .map(str::to_string)
    };
    let before = failures(&metrics.render());

    // Both families narrowed, no address left: failing, nothing served.
    let both = HealthChecks::new(
        Arc::new(Health::new(DEFAULT_HEALTH_TIMEOUT, &[], SystemTime::now())),
        Some(Arc::clone(&metrics)),
    )
    .narrowed(Narrowed { v4: true, v6: true });
    let other = free_port();
    both.update(&BTreeMap::from([(other, health("api", 1))]), &[]);
    assert_eq!(both.serving(), Vec::<u16>::new());
    let text = metrics.render();
    assert!(
        text.contains("kube_bpf_proxy_healthcheck_ports{state=\"failing\"} 1\n"),
        "{text}"
    );
    // Nothing to bind is no bind failure.
    assert_eq!(failures(&text), before, "{text}");
    drop(hc);
}
