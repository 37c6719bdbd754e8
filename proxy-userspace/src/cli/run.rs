//! `kube-bpf-proxy run`: load and attach the datapath, then keep it equal to the source.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
};

use anyhow::Context as _;

use super::SourceArgs;
use crate::{
    agent::{self, SyncTiming},
    datapath::bpf::{self, Datapath},
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
    log::info!(
        "stopping; the hooks and maps stay pinned for the next agent (`kube-bpf-proxy cleanup` removes them)"
    );
    Ok(())
}
