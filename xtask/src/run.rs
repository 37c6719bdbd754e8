//! `cargo xtask run`: the proxy on its embedded default. Builds a sandbox (a node namespace,
//! four pods on a bridge, echo servers in pods 2-4, a cgroup for the client), starts the agent on
//! examples/manifests, and shows which backend answers requests to each Service address until
//! Ctrl-C; then removes everything it made.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tests::{Agent, Topology, harness::topology::Proto, poll_until, sweep};

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Stop after this many rounds of requests (default: run until Ctrl-C).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Pause between rounds, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

const TARGETS: [(&str, Proto, &str); 3] = [
    ("web  10.96.0.10:80/TCP     ", Proto::Tcp, "10.96.0.10:80"),
    (
        "web  [fd00:96::10]:80/TCP  ",
        Proto::Tcp,
        "[fd00:96::10]:80",
    ),
    ("dns  10.96.0.53:53/UDP     ", Proto::Udp, "10.96.0.53:53"),
];

pub fn run(opts: Options) -> anyhow::Result<()> {
    setup::setup()?;
    exec::build(&exec::BuildOptions::default())?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    sweep();
    eprintln!("\n==> building the sandbox: node namespace, 4 pods on bridge br0, test cgroup");
    let mut topo = Topology::new(4);
    for i in 1..4 {
        topo.serve(i, 8080);
    }
    let mut agent = Agent::new(&topo.id, topo.cgroup_path(), "node-a");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
    for entry in fs::read_dir(&examples).with_context(|| format!("read {}", examples.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        agent.write_manifest(&name, &fs::read_to_string(&path)?);
    }
    agent.start();
    let web: SocketAddr = TARGETS[0].2.parse().expect("valid address");
    poll_until(
        "the agent to program the example Services",
        Duration::from_secs(15),
        || {
            agent.assert_running();
            let replies = topo.request(0, Proto::Tcp, web, 1);
            if replies.iter().all(|r| r.ok) {
                Ok(())
            } else {
                Err(format!("{replies:?}"))
            }
        },
    );
    eprintln!(
        "==> agent running; manifests in {} (edit them to see changes live)",
        agent.manifests.display()
    );
    eprintln!(
        "    client: pod-1 ({}); backends: pod-2, pod-3, pod-4\n",
        topo.pods[0].ip4
    );
    let mut round = 0;
    while !STOP.load(Ordering::Relaxed) && opts.rounds.is_none_or(|r| round < r) {
        round += 1;
        for (label, proto, addr) in TARGETS {
            let to: SocketAddr = addr.parse().expect("valid address");
            let replies = topo.request(0, proto, to, 12);
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            let mut failed = 0;
            for r in &replies {
                if r.ok {
                    *counts.entry(r.backend.clone()).or_default() += 1;
                } else {
                    failed += 1;
                }
            }
            let shown: Vec<String> = counts.iter().map(|(b, n)| format!("{b}: {n:>2}")).collect();
            let failed = if failed > 0 {
                format!("  ({failed} failed)")
            } else {
                String::new()
            };
            println!("round {round:>3}  {label} -> {}{failed}", shown.join("  "));
        }
        let mut slept = 0;
        while slept < opts.interval_ms && !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            slept += 50;
        }
    }
    eprintln!("\n==> cleaning up the sandbox");
    drop(agent);
    drop(topo);
    eprintln!("==> done");
    Ok(())
}
