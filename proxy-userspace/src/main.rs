//! `kube-bpf-proxy`: parse the command line, set up logging, dispatch.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proxy_userspace::{
    agent::{self, SyncTiming},
    datapath::bpf::{self, Datapath},
    source::{Source, kube::KubeSource, manifests::ManifestSource},
};

#[derive(Parser)]
#[command(
    name = "kube-bpf-proxy",
    version,
    about = "A Kubernetes service proxy in BPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: watch a source and keep the BPF maps equal to it.
    Run(RunArgs),
    /// Remove every pinned map the agent created.
    Cleanup {
        /// Pin directory on a bpffs.
        #[arg(long, default_value = bpf::DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Read Services, EndpointSlices and Nodes from YAML files in this directory (re-read on
    /// change) instead of an API server.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// API server URL, e.g. https://192.0.2.10:6443 (the real address, not the `kubernetes`
    /// Service's ClusterIP, which this proxy programs), or http://127.0.0.1:8001 through
    /// `kubectl proxy`. Overrides the kubeconfig's server. With https and a mounted service
    /// account, the pod's token and CA are used.
    #[arg(long, conflicts_with = "manifests")]
    master: Option<String>,
    /// Kubeconfig file for the API server (default: in-cluster config, then $KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// cgroup v2 directory to attach the socket hooks to (default: the cgroup2 root, so every
    /// process on the node, pods and host, is covered).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Pin directory on a bpffs.
    #[arg(long, default_value = bpf::DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    /// This node's name, as in EndpointSlice nodeName (default: the hostname, lower-cased).
    #[arg(long)]
    hostname_override: Option<String>,
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

fn node_name(arg: Option<String>) -> String {
    arg.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    })
    .to_lowercase()
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let node = node_name(args.hostname_override);
    let source: Box<dyn Source> = match args.manifests {
        Some(dir) => Box::new(ManifestSource::new(dir, node.clone())),
        None => Box::new(KubeSource::from_flags(
            args.master.as_deref(),
            args.kubeconfig,
            node.clone(),
        )?),
    };
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => cgroup2_root()?,
    };
    install_signal_handlers();
    let mut datapath = Datapath::load(&args.bpffs, &cgroup)?;
    log::info!("node {node:?}, source {}", source.name());
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            if let Err(e) = source.run(tx) {
                log::error!("source stopped: {e:#}");
            }
        })?;
    agent::run(&mut datapath, rx, SyncTiming::default(), &STOP)?;
    log::info!("stopping: detaching hooks; pinned maps stay for the next agent");
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Cleanup { bpffs } => bpf::remove_pins(&bpffs).map(|n| {
            println!("removed {n} pinned maps from {}", bpffs.display());
        }),
    };
    if let Err(e) = result {
        log::error!("{e:#}");
        std::process::exit(1);
    }
}
