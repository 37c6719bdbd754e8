//! `kube-bpf-proxy run`: load and attach the datapath, then keep it equal to the source.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;

use super::SourceArgs;
use crate::{
    agent::{self, Observers, SyncTiming},
    compile::Family,
    datapath::{
        bpf::{self, Datapath, MapSizes},
        caps,
    },
    health::{DEFAULT_HEALTH_TIMEOUT, Health},
    http::{self, HttpState},
    metrics::Metrics,
};

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// cgroup v2 directory to attach the socket hooks to (default: the cgroup2 root, so every
    /// process on the node, pods and host, is covered).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Pin directory on a bpffs.
    #[arg(long, default_value = bpf::DEFAULT_PIN_DIR)]
    pub bpffs: PathBuf,
    /// Capacity of the frontend maps (per family) when they are created.
    #[arg(long, default_value_t = MapSizes::default().services)]
    pub max_services: u32,
    /// Capacity of the backend map.
    #[arg(long, default_value_t = MapSizes::default().backends)]
    pub max_backends: u32,
    /// Capacity of the slot and member maps (backends summed over frontends, weights counted).
    #[arg(long, default_value_t = MapSizes::default().slots)]
    pub max_slots: u32,
    /// Capacity of the session affinity map (LRU).
    #[arg(long, default_value_t = MapSizes::default().affinity)]
    pub max_affinity: u32,
    /// Capacity of the socket reverse-translation maps (LRU).
    #[arg(long, default_value_t = MapSizes::default().sock_revnat)]
    pub max_sock_revnat: u32,
    /// Also cut TCP connections to a removed backend (kube-proxy leaves them; connected UDP
    /// sockets are always terminated).
    #[arg(long)]
    pub terminate_tcp: bool,
    /// Do not terminate sockets connected to removed backends at all.
    #[arg(long, conflicts_with = "terminate_tcp")]
    pub no_socket_termination: bool,
    /// Address for /metrics (Prometheus); empty disables it.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// Address for /healthz and /livez; empty disables it.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
}

/// Serves the HTTP endpoints; a bind failure is logged, not fatal (kube-proxy retries too).
fn serve(what: &str, addr: &str, state: &Arc<HttpState>) {
    if addr.is_empty() {
        return;
    }
    match http::serve(addr, Arc::clone(state)) {
        Ok(_) => log::info!("serving {what} on {addr}"),
        Err(e) => log::error!("cannot serve {what} on {addr}: {e}"),
    }
}

/// Refreshes map fill levels and datapath counters in the metrics every few seconds.
fn poll_kernel_counters(pin_dir: PathBuf, metrics: Arc<Metrics>) {
    thread::spawn(move || {
        loop {
            match bpf::map_fill(&pin_dir) {
                Ok(fill) => {
                    for (map, used, max) in fill {
                        metrics.set_map_fill(map, used.into(), max.into());
                    }
                }
                Err(e) => log::debug!("map fill: {e:#}"),
            }
            match bpf::Maps::open_pinned(&pin_dir).and_then(|m| m.stats()) {
                Ok(stats) => {
                    let totals: Vec<(&str, u64)> =
                        stats.iter().map(|(r, n)| (r.name(), *n)).collect();
                    metrics.set_datapath_totals(&totals);
                }
                Err(e) => log::debug!("datapath counters: {e:#}"),
            }
            thread::sleep(Duration::from_secs(5));
        }
    });
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Finds the cgroup v2 mount point in /proc/mounts.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .next()
        .context("no cgroup2 filesystem is mounted")
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let node = args.source.node_name();
    let source = args.source.source()?;
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => cgroup2_root()?,
    };
    install_signal_handlers();
    let sizes = MapSizes {
        services: args.max_services,
        backends: args.max_backends,
        slots: args.max_slots,
        affinity: args.max_affinity,
        sock_revnat: args.max_sock_revnat,
    };
    let mut datapath = Datapath::load(&args.bpffs, &cgroup, &sizes)?;
    let terminating = if args.no_socket_termination {
        datapath.disable_termination()?;
        false
    } else {
        match datapath.enable_termination(cgroup.clone(), args.terminate_tcp) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("sockets of removed backends will not be terminated: {e:#}");
                false
            }
        }
    };
    // Everything privileged is done; capabilities are per thread, so drop them before any
    // thread is started.
    match caps::drop_to_kept() {
        Ok(()) => log::info!("capabilities dropped to CAP_BPF and CAP_NET_ADMIN"),
        Err(e) => log::warn!("could not drop capabilities: {e}"),
    }
    datapath.forward_logs();
    log::info!("node {node:?}, source {}", source.name());
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            if let Err(e) = source.run(tx) {
                log::error!("source stopped: {e:#}");
            }
        })?;
    let families = [Family::V4, Family::V6];
    let metrics = Arc::new(Metrics::new(env!("CARGO_PKG_VERSION"), &families));
    let health = Arc::new(Health::new(
        DEFAULT_HEALTH_TIMEOUT,
        &families,
        SystemTime::now(),
    ));
    let http_state = Arc::new(HttpState {
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
    });
    serve("metrics", &args.metrics_bind_address, &http_state);
    serve("health checks", &args.healthz_bind_address, &http_state);
    poll_kernel_counters(args.bpffs.clone(), Arc::clone(&metrics));
    metrics
        .socket_termination_active
        .with(&[])
        .set(if terminating { 1.0 } else { 0.0 });
    let health_checks =
        crate::healthcheck::HealthChecks::new(Arc::clone(&health), Some(Arc::clone(&metrics)));
    let observers = Observers {
        metrics: Some(metrics),
        health: Some(health),
        health_checks: Some(Arc::new(health_checks)),
    };
    agent::run(&mut datapath, rx, SyncTiming::default(), &STOP, &observers)?;
    log::info!(
        "stopping; the hooks and maps stay pinned for the next agent (`kube-bpf-proxy cleanup` removes them)"
    );
    Ok(())
}
