//! `cargo xtask run`: the proxy on its embedded default. Builds a sandbox (the testbed of
//! ../shared/testbed.md with one node, `node-a`, whose four pods are connected as `--shape`
//! says — per-pod routed veths as kindnet (`ptp`, the default) or Calico (`calico`) make them,
//! or a bridge (`bridge`) — echo servers in pods 2-4, a cgroup for the in-cluster client, and
//! the external client `ext` on the node's LAN), starts the agent in node-a's namespace on
//! examples/manifests with the LAN interface as its external interface (pod-facing interfaces
//! are found by the agent itself), and shows until Ctrl-C, each round, which backend answers
//! requests to each Service address and which client address it saw: pod 1 to the ClusterIPs
//! (no NAT: the pod's own address), `ext` to the NodePort on node-a's LAN addresses
//! (masqueraded to the node). Then it removes everything it made.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tests::{Agent, Reply, Shape, Testbed, harness::topology::Proto, poll_until, sweep};

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Stop after this many rounds of requests (default: run until Ctrl-C).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Pause between rounds, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// How the pods are connected to the node.
    #[arg(long, value_enum, default_value_t = ShapeArg::Ptp)]
    pub shape: ShapeArg,
}

/// `--shape`: the testbed's pod-network shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ShapeArg {
    /// A routed veth per pod carrying the pods' gateway address (kindnet, the CNI ptp plugin).
    Ptp,
    /// The pods' veths on bridge br0, which holds the gateway address.
    Bridge,
    /// A routed veth per pod with proxy ARP and fe80::1 as the gateways (Calico).
    Calico,
    /// Pods addressed from the node's subnet on routed `eni*` veths, policy rules and a second
    /// network interface with its own routing table (the AWS VPC CNI).
    AwsVpc,
}

impl From<ShapeArg> for Shape {
    fn from(s: ShapeArg) -> Shape {
        match s {
            ShapeArg::Ptp => Shape::Ptp,
            ShapeArg::Bridge => Shape::Bridge,
            ShapeArg::Calico => Shape::Calico,
            ShapeArg::AwsVpc => Shape::AwsVpc,
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The echo servers' port in pods 2-4.
const BACKEND_PORT: u16 = 8080;
/// Service web-nodeport's NodePort (examples/manifests/web-nodeport.yaml).
const NODE_PORT: u16 = 30080;

/// Who sends a row's requests.
#[derive(Clone, Copy)]
enum Client {
    /// Pod 1 (`a-pod-1`), inside the hooked cgroup.
    Pod,
    /// The external client, outside the cluster.
    Ext,
}

/// One row of a round: a Service address and who asks it.
struct Target {
    service: &'static str,
    proto: Proto,
    to: SocketAddr,
    from: Client,
}

impl Target {
    fn label(&self) -> String {
        let proto = match self.proto {
            Proto::Tcp => "TCP",
            Proto::Udp | Proto::UdpConnected => "UDP",
            Proto::Sctp => "SCTP",
        };
        let from = match self.from {
            Client::Pod => "a-pod-1",
            Client::Ext => "ext",
        };
        format!(
            "{:<12} {:<26} from {from:<7}",
            self.service,
            format!("{}/{proto}", self.to)
        )
    }

    fn request(&self, tb: &Testbed, count: usize) -> Vec<Reply> {
        match self.from {
            Client::Pod => {
                tb.request_from(&tb.nodes[0].pods[0].ns, true, self.proto, self.to, count)
            }
            Client::Ext => tb.request_ext(self.proto, self.to, count),
        }
    }
}

fn targets(tb: &Testbed) -> Vec<Target> {
    let node = &tb.nodes[0];
    let addr = |s: &str| -> SocketAddr { s.parse().expect("valid address") };
    vec![
        Target {
            service: "web",
            proto: Proto::Tcp,
            to: addr("10.96.0.10:80"),
            from: Client::Pod,
        },
        Target {
            service: "web",
            proto: Proto::Tcp,
            to: addr("[fd00:96::10]:80"),
            from: Client::Pod,
        },
        Target {
            service: "dns",
            proto: Proto::Udp,
            to: addr("10.96.0.53:53"),
            from: Client::Pod,
        },
        Target {
            service: "web-nodeport",
            proto: Proto::Tcp,
            to: SocketAddr::new(node.ip4.into(), NODE_PORT),
            from: Client::Ext,
        },
        Target {
            service: "web-nodeport",
            proto: Proto::Tcp,
            to: SocketAddr::new(node.ip6.into(), NODE_PORT),
            from: Client::Ext,
        },
    ]
}

/// The client address a reply says the backend saw, without the port.
fn seen_ip(r: &Reply) -> String {
    r.seen
        .parse::<SocketAddr>()
        .map_or_else(|_| r.seen.clone(), |a| a.ip().to_string())
}

/// `backend: n` per backend, then the client address the backends saw (once if they all saw
/// the same, else per backend), then failures.
fn summary(replies: &[Reply]) -> String {
    let mut per_backend: BTreeMap<&str, (usize, BTreeSet<String>)> = BTreeMap::new();
    let mut failed = 0;
    for r in replies {
        if r.ok {
            let entry = per_backend.entry(&r.backend).or_default();
            entry.0 += 1;
            entry.1.insert(seen_ip(r));
        } else {
            failed += 1;
        }
    }
    let all_seen: BTreeSet<&String> = per_backend.values().flat_map(|(_, s)| s).collect();
    let uniform = all_seen.len() <= 1;
    let mut out: Vec<String> = per_backend
        .iter()
        .map(|(b, (n, seen))| {
            if uniform {
                format!("{b}: {n:>2}")
            } else {
                let seen: Vec<&str> = seen.iter().map(String::as_str).collect();
                format!("{b}: {n:>2} (saw {})", seen.join(", "))
            }
        })
        .collect();
    if uniform && let Some(seen) = all_seen.first() {
        out.push(format!("client seen as {seen}"));
    }
    if failed > 0 {
        let why: BTreeSet<&str> = replies
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.error.as_str())
            .collect();
        let why: Vec<&str> = why.into_iter().collect();
        out.push(format!("({failed} failed: {})", why.join("; ")));
    }
    out.join("  ")
}

/// The example manifests name node-a's pods by the usual plan (10.244.0.<j+2>,
/// fd00:244::<j+2>); in a shape whose pods are addressed otherwise (AWS VPC: the node's
/// subnet) their addresses are put in.
fn pod_addresses(tb: &Testbed, manifest: &str) -> String {
    let mut out = manifest.to_string();
    for (j, pod) in tb.nodes[0].pods.iter().enumerate() {
        let plan4 = tests::harness::topology::pod_ip4(0, j);
        let plan6 = tests::harness::topology::pod_ip6(0, j);
        if pod.ip4 != plan4 {
            out = out.replace(&plan4.to_string(), &pod.ip4.to_string());
        }
        if pod.ip6 != plan6 {
            out = out.replace(&plan6.to_string(), &pod.ip6.to_string());
        }
    }
    out
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    setup::setup()?;
    exec::build(&exec::BuildOptions::default())?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    sweep();
    let shape = Shape::from(opts.shape);
    let wiring = match shape {
        Shape::Ptp => "a routed veth each (kindnet's ptp)",
        Shape::Calico => "a routed veth each (Calico's proxy ARP)",
        Shape::Bridge => "bridge br0",
        Shape::AwsVpc => "a routed veth each (the AWS VPC CNI)",
    };
    eprintln!(
        "\n==> building the sandbox: node-a with 4 pods on {wiring}, the external client ext \
         on the LAN, a test cgroup"
    );
    let mut tb = Testbed::with_shape(&[4], shape);
    for i in 1..4 {
        tb.serve(0, i, BACKEND_PORT);
    }
    let mut agent = Agent::new(&tb.id, tb.cgroup_path(), "node-a");
    agent.netns = Some(tb.node_ns_path(0));
    // Pod-facing interfaces: the agent's default, `auto`, finds them in any shape.
    agent.extra_args = ["--external-interfaces", "eth0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
    for entry in fs::read_dir(&examples).with_context(|| format!("read {}", examples.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        agent.write_manifest(&name, &pod_addresses(&tb, &fs::read_to_string(&path)?));
    }
    agent.start();
    let targets = targets(&tb);
    let web = &targets[0];
    poll_until(
        "the agent to program the example Services",
        Duration::from_secs(15),
        || {
            agent.assert_running();
            let replies = web.request(&tb, 1);
            if replies.iter().all(|r| r.ok) {
                Ok(())
            } else {
                Err(format!("{replies:?}"))
            }
        },
    );
    // The NodePort is not waited for as a condition: if it does not answer, the rounds show why.
    let node_port = targets
        .iter()
        .find(|t| matches!(t.from, Client::Ext))
        .expect("an external target");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let replies = node_port.request(&tb, 1);
        if replies.iter().all(|r| r.ok) {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "==> warning: NodePort {} does not answer ext yet: {replies:?}",
                node_port.to
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let node = &tb.nodes[0];
    let backends: Vec<String> = node.pods[1..]
        .iter()
        .map(|p| format!("{} ({})", p.name, p.ip4))
        .collect();
    eprintln!(
        "==> agent running in node-a ({}, {}); manifests in {} (edit them to see changes live)",
        node.ip4,
        node.ip6,
        agent.manifests.display()
    );
    eprintln!(
        "    in-cluster client: {} ({}, hooked cgroup); external client: ext ({}, {})",
        node.pods[0].name,
        node.pods[0].ip4,
        tests::harness::testbed::EXT_IP4,
        tests::harness::testbed::EXT_IP6
    );
    eprintln!(
        "    backends: {}; node-side pod interfaces: {}\n",
        backends.join(", "),
        node.pods
            .iter()
            .map(|p| p.host_if.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut round = 0;
    while !STOP.load(Ordering::Relaxed) && opts.rounds.is_none_or(|r| round < r) {
        round += 1;
        for target in &targets {
            let replies = target.request(&tb, 12);
            println!(
                "round {round:>3}  {} -> {}",
                target.label(),
                summary(&replies)
            );
        }
        let mut slept = 0;
        while slept < opts.interval_ms && !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            slept += 50;
        }
    }
    eprintln!("\n==> cleaning up the sandbox");
    drop(agent);
    drop(tb);
    eprintln!("==> done");
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    fn reply(backend: &str, seen: &str) -> Reply {
        Reply {
            ok: true,
            backend: backend.into(),
            seen: seen.into(),
            peer: String::new(),
            error: String::new(),
            errno: None,
            mtu: None,
        }
    }

    #[test]
    fn summary_counts_backends_and_shows_the_client_address() {
        let same = [
            reply("a-pod-2", "10.244.0.1:40000"),
            reply("a-pod-3", "10.244.0.1:40001"),
            reply("a-pod-2", "10.244.0.1:40002"),
        ];
        assert_eq!(
            summary(&same),
            "a-pod-2:  2  a-pod-3:  1  client seen as 10.244.0.1"
        );
        let mut mixed = vec![
            reply("a-pod-2", "[fd00:77::100]:40000"),
            reply("a-pod-3", "[fd00:77::1]:40001"),
        ];
        mixed.push(Reply {
            ok: false,
            error: "connection timed out".into(),
            ..reply("", "")
        });
        assert_eq!(
            summary(&mixed),
            "a-pod-2:  1 (saw fd00:77::100)  a-pod-3:  1 (saw fd00:77::1)  \
             (1 failed: connection timed out)"
        );
    }
}
