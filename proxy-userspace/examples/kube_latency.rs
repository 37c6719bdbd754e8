//! "Watch event on the API server double -> maps hold it" at 10,000 Services x 10 endpoints,
//! through the Kubernetes source and the agent's sync (compile cache, plan, writes into
//! in-memory maps): `cargo xtask bench --control-plane` runs it. Each change is one
//! EndpointSlice update on the double (`tests/support`, the kube source tests' API double); the
//! clock stops when the sync has programmed it.
//!
//! `cargo run --release -p proxy-userspace --example kube_latency`

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use proxy_userspace::source::{Source, kube::KubeSource};
use support::{ApiServer, NODE, Res, node, service, slice};

const WAIT: Duration = Duration::from_secs(60);

fn start_source(server: &ApiServer) -> mpsc::Receiver<proxy_userspace::snapshot::Snapshot> {
    let config = kube::Config::new(server.url().parse().unwrap());
    let source = Box::new(KubeSource::with_config(config, NODE.into()));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = source.run(tx);
    });
    rx
}

fn main() {
    use proxy_userspace::{
        agent::{Pipeline, sync_once},
        compile::{FrontendAddr, Proto},
        plan::MapState,
    };
    const SERVICES: usize = 10_000;
    const CHANGES: usize = 40;
    let server = ApiServer::start();
    let vip = |i: usize| format!("10.96.{}.{}", i / 250, i % 250 + 1);
    let endpoints = |i: usize, moved: usize| -> Vec<String> {
        (0..10)
            .map(|e| {
                let e = if e == 0 { 10 + moved % 200 } else { e };
                std::net::Ipv4Addr::from(0x0a00_0000 + (i as u32) * 256 + e as u32).to_string()
            })
            .collect()
    };
    for i in 0..SERVICES {
        server.apply(
            Res::Services,
            service("default", &format!("s{i}"), &vip(i), 80),
        );
        let eps = endpoints(i, 0);
        let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
        server.apply(
            Res::Slices,
            slice("default", &format!("s{i}"), &format!("s{i}-1"), &eps),
        );
    }
    server.apply(Res::Nodes, node(NODE, "zone-1"));
    let rx = start_source(&server);
    let mut io = MapState::default();
    let mut pipeline = Pipeline::new(MapState::default());
    let mut logged = std::collections::BTreeSet::new();
    let first = rx.recv_timeout(WAIT).expect("first snapshot");
    let t = Instant::now();
    sync_once(&mut io, &mut pipeline, &first, &mut logged).unwrap();
    println!(
        "kube source, {SERVICES} x 10: full sync {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut latencies = Vec::new();
    for c in 1..=CHANGES {
        let i = (c * 7919) % SERVICES;
        let eps = endpoints(i, c);
        let want: std::net::IpAddr = eps[0].parse().unwrap();
        let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
        let frontend = FrontendAddr::internal(vip(i).parse().unwrap(), 80, Proto::Tcp);
        let t = Instant::now();
        server.apply(
            Res::Slices,
            slice("default", &format!("s{i}"), &format!("s{i}-1"), &eps),
        );
        loop {
            let snapshot = rx.recv_timeout(WAIT).expect("a snapshot with the change");
            sync_once(&mut io, &mut pipeline, &snapshot, &mut logged).unwrap();
            let programmed = pipeline
                .desired()
                .frontends
                .get(&frontend)
                .is_some_and(|f| f.backends.iter().any(|b| b.addr == want));
            if programmed {
                break;
            }
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let pick = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "kube source, {SERVICES} x 10: watch event -> maps p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({CHANGES} changes)",
        pick(0.5),
        pick(0.99),
        latencies.last().unwrap()
    );
}
