//! Times the agent's sync (compile + capacity + plan + writes into an in-memory map state) at
//! N Services x E endpoints: a full sync, then one changed endpoint at a time.
//!
//! `cargo run --release -p proxy-userspace --example plan_scale -- [SERVICES] [ENDPOINTS] [CHANGES]`
//! (`GROUP=N`: entries per group of a large sync, instead of the agent's `FULL_SYNC_GROUP`)
use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use k8s_openapi::api::core::v1::Service;
use proxy_userspace::{
    agent::{Pipeline, sync_once},
    capacity::Capacity,
    datapath::MapIo,
    objects::Slice,
    plan::{MapState, Op},
    snapshot::{NodeInfo, Snapshot},
};

fn service(i: usize) -> Service {
    let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
    serde_norway::from_str(&format!(
        "kind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n"
    ))
    .unwrap()
}

fn slice(i: usize, eps: usize, generation: usize) -> Slice {
    let endpoints: Vec<String> = (0..eps)
        .map(|e| {
            // Generation g moves endpoint 0 to a new address (at most 255 per Service).
            let e = if e == 0 { (eps + generation) % 255 } else { e };
            let addr = std::net::Ipv4Addr::from(0x0A00_0000 + (i as u32) * 256 + e as u32);
            format!("{{addresses: [{addr}]}}")
        })
        .collect();
    serde_norway::from_str(&format!(
        "kind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
        endpoints.join(", ")
    ))
    .unwrap()
}

/// A datapath that takes every write and keeps nothing (the agent's own memory is measured),
/// with room for 10k x 100.
struct Memory;

impl MapIo for Memory {
    fn dump(&self) -> anyhow::Result<MapState> {
        Ok(MapState::default())
    }
    fn apply(&mut self, _op: &Op) -> anyhow::Result<()> {
        Ok(())
    }
    fn capacity(&self) -> Option<Capacity> {
        Some(Capacity {
            services4: 65_536,
            services6: 65_536,
            // Room for 10k x 100 (the agent's --max-* flags).
            slot_chunks: proxy_common::maps::slot_chunks_for(1 << 21, 65_536) as u64,
            members: 1 << 21,
            backends: 1 << 21,
            infos: 65_536,
            maglev: 65_536,
            src_ranges: [
                proxy_common::maps::SRC_RANGES_MAX as u64,
                proxy_common::maps::SRC_RANGES_MAX as u64,
            ],
        })
    }
}

/// Counts the bytes the program has allocated and not freed, to say what each stage holds.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_mib() -> f64 {
    LIVE.load(Ordering::Relaxed) as f64 / 1048576.0
}

/// Heap bytes (MiB) a copy of `value` takes: what the value holds, give or take spare
/// capacity.
fn held<T: Clone>(value: &T) -> f64 {
    let before = live_mib();
    let copy = value.clone();
    let after = live_mib();
    drop(copy);
    after - before
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let n = args.first().copied().unwrap_or(10_000);
    let eps = args.get(1).copied().unwrap_or(10);
    let changes = args.get(2).copied().unwrap_or(50);
    let mut snapshot = Snapshot {
        services: (0..n).map(|i| Arc::new(service(i))).collect(),
        slices: (0..n).map(|i| Arc::new(slice(i, eps, 0))).collect(),
        node: NodeInfo {
            name: "n".into(),
            ..Default::default()
        },
        config: Default::default(),
        ..Default::default()
    };
    let objects = rss();
    let objects_heap = live_mib();
    let mut io = Memory;
    let mut pipeline = Pipeline::new(MapState::default()).with_group_entries(
        std::env::var("GROUP")
            .ok()
            .and_then(|g| g.parse().ok())
            .unwrap_or(proxy_userspace::agent::FULL_SYNC_GROUP),
    );
    let mut logged = BTreeSet::new();
    let t = Instant::now();
    let report = sync_once(&mut io, &mut pipeline, &snapshot, &mut logged).unwrap();
    println!(
        "{n} x {eps}: full sync {:.1} ms, {} writes",
        t.elapsed().as_secs_f64() * 1e3,
        report.writes
    );
    let mut times = Vec::new();
    for c in 0..changes {
        let i = (c * 7919) % n;
        snapshot.slices[i] = Arc::new(slice(i, eps, c + 1));
        let t = Instant::now();
        let report = sync_once(&mut io, &mut pipeline, &snapshot, &mut logged).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(
            !report.planned_all && report.writes > 0,
            "change {c}: planned_all {}, {} writes, {} problems",
            report.planned_all,
            report.writes,
            report.problems.len()
        );
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{n} x {eps}: one changed endpoint, sync p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({changes} changes)",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.last().unwrap()
    );
    let (now, peak) = rss();
    println!(
        "{n} x {eps}: agent memory: objects {:.0} MiB, after syncing {now:.0} MiB (peak {peak:.0} MiB)",
        objects.0
    );
    let (total, desired, mirror) = (
        live_mib(),
        held(pipeline.desired()),
        held(pipeline.mirror()),
    );
    println!(
        "{n} x {eps}: heap by stage: source objects {objects_heap:.1} MiB, compiled state \
         (merged desired) {desired:.1} MiB, map mirror {mirror:.1} MiB, compile cache and the \
         rest {:.1} MiB; heap in use {total:.1} MiB",
        total - objects_heap - desired - mirror
    );
}

/// (VmRSS, VmHWM) in MiB.
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or(0.0, |v| {
                v.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .unwrap_or(0.0)
                    / 1024.0
            })
    };
    (field("VmRSS:"), field("VmHWM:"))
}
