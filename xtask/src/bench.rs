//! `cargo xtask bench`: our socket-level load balancing against kube-proxy's iptables
//! (iptables-nft and iptables-legacy) and nftables shapes, in one run on one machine.
//!
//! The testbed is built once: five identical topologies (a node namespace with a bridge, a client
//! pod, ten backend pods served by one `loadgen serve`), one per configuration, so every rule set
//! is loaded once per Service count and never torn down between repetitions:
//! - `direct`: no rules; the client connects straight to a backend pod (the physical limit);
//! - `bpf`: our agent, its hooks on the topology's cgroup, which holds the client;
//! - `iptables-nft` / `iptables-legacy`: kube-proxy's iptables-mode nat table, one
//!   `iptables-restore` in the node namespace (PREROUTING and OUTPUT jump to KUBE-SERVICES);
//! - `nftables`: kube-proxy's nftables-mode `ip kube-proxy` table, one `nft -f`.
//!
//! Pods hang off the node's bridge (pod i = 10.244.0.(i+2), default route via 10.244.0.1), so
//! traffic to a Service address is routed through the node (PREROUTING DNAT), and replies, which
//! are bridged, pass the node's netfilter hooks through `bridge-nf-call-iptables=1` (as on a
//! real bridged node). Every node namespace gets the same sysctls, whatever its configuration.
//!
//! After them, the pod-network part (`podnet`: the external path through tc on the bridge and
//! ptp shapes, pod veth to tc attached, the agent with 500 pod veths), which `--pod-networks`
//! runs alone.
//!
//! Everything lives in namespaces and a cgroup named after this process; it is removed on exit,
//! on error and on Ctrl-C (SIGINT/SIGTERM stop the run at the next check, then everything
//! drops). Every loop is bounded in count and time.

mod maps;
mod podnet;
mod pps;
mod report;
mod workload;
mod xdpgen;

use std::{
    fs,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use proxy_common::service::{
    FLAG_LEAST_CONN, FLAG_MAGLEV, FLAG_NEVER_QUEUE, FLAG_ROUND_ROBIN, FLAG_SED, FLAG_SOURCE_HASH,
    FLAG_WEIGHTED,
};
use serde::{Deserialize, Serialize};
use tests::{
    Agent, TestCgroup, Topology,
    harness::process::{ChildGuard, Placement, command_in, workspace_binary},
    sweep,
};

use self::{
    maps::AgentMaps,
    report::{MemRow, PairedRow, PodNetReport, Report, Sample, SchedRow, Summary},
    workload::{
        BACKEND_PODS, BACKEND_PORT, CHANGE_FILE, EXTERNAL_IP, NODE_NAME, SERVICE_PORT, Workload,
        pod_ip,
    },
};
use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Short smoke run: 100 Services only, 0.5 s measurements, 1 repetition.
    #[arg(long)]
    pub quick: bool,
    /// Seconds per data-path measurement [default: 1; --quick: 0.5].
    #[arg(long)]
    pub secs: Option<f64>,
    /// Repetitions of every data-path measurement [default: 3; --quick: 1].
    #[arg(long)]
    pub reps: Option<usize>,
    /// Service counts, comma-separated [default: 100,1000,10000; --quick: 100].
    #[arg(long, value_delimiter = ',')]
    pub services: Option<Vec<usize>>,
    /// Use the release binaries already built instead of running `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
    /// Measure nothing: re-render the Markdown and the PNG of a saved bench.json (written next
    /// to it), re-evaluating the targets.
    #[arg(long, value_name = "BENCH_JSON")]
    pub render: Option<PathBuf>,
    /// Only the pod-network part (also part of a full run): the external path through tc on
    /// the bridge and ptp shapes, pod veth to tc attached, the agent with 500 pod veths,
    /// packets per second through XDP and tc; writes
    /// target/bench/pod-networks.{md,json} (a full run's bench.* are left alone).
    #[arg(long)]
    pub pod_networks: bool,
    /// With --pod-networks: only its packets-per-second part (the sender's floods, then node-a
    /// alone fed by the XDP frame generator).
    #[arg(long, requires = "pod_networks")]
    pub pps_only: bool,
    /// Only the agent's control plane at 10,000 Services x 10 and x 100 endpoints (maps sized
    /// for them with --max-backends/--max-slots): a full sync, single endpoint changes, the
    /// agent's memory and the maps' memory; writes target/bench/control-plane.md.
    #[arg(long)]
    pub control_plane: bool,
}

/// Everything derived from the options.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub quick: bool,
    pub services: Vec<usize>,
    pub endpoints: usize,
    pub secs: f64,
    pub reps: usize,
    /// Short back-to-back direct/bpf connection-rate pairs per Service count (close call).
    pub pairs: usize,
    /// Pairs of the headline close call (TCP_CRR to the middle Service): more than the other
    /// paired rows', as its target sits within a few percent of 1 (bench-method: many short
    /// paired runs for close calls). 0 in reports written before it existed.
    #[serde(default)]
    pub close_pairs: usize,
    pub pair_secs: f64,
    pub full_sync_reps: usize,
    pub change_samples: usize,
    pub client_cpu: usize,
    pub server_cpu: usize,
    /// `--pod-networks`: this run measured the pod-network part alone (absent, false, in
    /// reports written before it existed).
    #[serde(default)]
    pub only_pod_networks: bool,
    /// The control-plane part alone (`--control-plane`).
    #[serde(default)]
    pub only_control_plane: bool,
    /// `--pps-only`: of the pod-network part, packets per second alone.
    #[serde(default)]
    pub only_pps: bool,
    /// Extra arguments of the bpf node's agent.
    #[serde(default)]
    pub agent_args: Vec<String>,
}

impl Settings {
    fn new(opts: &Options, cpus: usize) -> Settings {
        let quick = opts.quick;
        let mut services = opts.services.clone().unwrap_or_else(|| {
            if quick {
                vec![100]
            } else {
                vec![100, 1000, 10_000]
            }
        });
        services.retain(|n| *n >= 4);
        services.sort_unstable();
        services.dedup();
        Settings {
            quick,
            services,
            endpoints: 10,
            secs: opts
                .secs
                .unwrap_or(if quick { 0.5 } else { 1.0 })
                .clamp(0.1, 30.0),
            reps: opts.reps.unwrap_or(if quick { 1 } else { 3 }).clamp(1, 50),
            pairs: if quick { 2 } else { 8 },
            close_pairs: if quick { 2 } else { 32 },
            pair_secs: 0.5,
            full_sync_reps: if quick { 1 } else { 3 },
            change_samples: if quick { 10 } else { 40 },
            client_cpu: 0,
            server_cpu: if cpus > 1 { 1 } else { 0 },
            only_pod_networks: opts.pod_networks,
            only_control_plane: opts.control_plane,
            only_pps: opts.pps_only,
            agent_args: if opts.control_plane {
                ["--max-backends", "2097152", "--max-slots", "2097152"]
                    .map(String::from)
                    .to_vec()
            } else {
                Vec::new()
            },
        }
    }
}

/// Manifest chunk size (Services per file) for the agent.
const CHUNK: usize = 1000;

/// The uid of the per-packet client pod (`Target::PerPacket`), in its cgroup's name.
const PER_PACKET_UID: &str = "0b5e7a1c-9d2f-4e3a-8b6c-1d0e9f8a7b6c";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in slices, returning early (with an error) on Ctrl-C.
fn nap(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_stop()?;
        thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Config {
    Direct,
    Bpf,
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::Bpf => "bpf",
            Config::IptablesNft => "iptables-nft",
            Config::IptablesLegacy => "iptables-legacy",
            Config::Nftables => "nftables",
        }
    }
    fn is_iptables(self) -> bool {
        matches!(self, Config::IptablesNft | Config::IptablesLegacy)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    Crr,
    Rr,
    Udp,
}

impl Test {
    pub fn name(self) -> &'static str {
        match self {
            Test::Crr => "TCP_CRR",
            Test::Rr => "TCP_RR",
            Test::Udp => "UDP_RR",
        }
    }
    fn arg(self) -> &'static str {
        match self {
            Test::Crr => "crr",
            Test::Rr => "rr",
            Test::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A backend pod's address (the `direct` baseline, and pod-to-pod elsewhere).
    Pod,
    /// `direct` only, TCP_CRR only: the middle Service's backend pods, one drawn at random per
    /// connection (`loadgen crr-spread`): the load-balanced baseline, what a Service's spread
    /// over its pods costs when nothing translates.
    PodsSpread,
    SvcFirst,
    SvcMid,
    SvcLast,
    /// The middle Service's externalIP from a client outside the hooked cgroup: bpf translates
    /// it at tc on the node's bridge (conntrack, masquerading), the peers with kube-proxy's
    /// externalIP rules (KUBE-EXT / external chains, masquerading).
    ExternalIp,
    /// The middle Service from a client pod whose namespace has socket-layer translation off
    /// (bpf; the peers translate every packet anyway): translated per packet at tc on the
    /// node's bridge.
    PerPacket,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Pod => "pod-to-pod",
            Target::PodsSpread => "pods-spread",
            Target::SvcFirst => "svc-first",
            Target::SvcMid => "svc-mid",
            Target::SvcLast => "svc-last",
            Target::ExternalIp => "external-ip",
            Target::PerPacket => "svc-mid-per-packet",
        }
    }
    fn addr(self, w: &Workload) -> SocketAddrV4 {
        let svc = |i| SocketAddrV4::new(w.vip(i), SERVICE_PORT);
        match self {
            Target::Pod | Target::PodsSpread => SocketAddrV4::new(pod_ip(1), BACKEND_PORT),
            Target::SvcFirst => svc(w.first()),
            Target::SvcMid | Target::PerPacket => svc(w.mid()),
            Target::SvcLast => svc(w.last()),
            Target::ExternalIp => SocketAddrV4::new(EXTERNAL_IP, SERVICE_PORT),
        }
    }
}

/// One configuration's topology. Fields drop in order: servers, agent, then the namespaces.
struct Node {
    config: Config,
    _servers: Vec<ChildGuard>,
    agent: Option<Agent>,
    /// bpf: a kubelet-named pod cgroup (and its parent) below the topology's, for the client
    /// of `Target::PerPacket`, whose namespace has socket-layer translation off.
    per_packet: Option<(TestCgroup, TestCgroup)>,
    topo: Topology,
    /// Program loading rules (`iptables-nft-restore`, `iptables-legacy-restore`, `nft`).
    tool: Option<String>,
    /// What the node holds now.
    loaded: Option<Workload>,
}

/// Sysctls of every node namespace (the same for all configurations).
const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
    ("net.ipv4.conf.br0.send_redirects", "0"),
];

impl Node {
    fn new(config: Config, tool: Option<String>, settings: &Settings) -> anyhow::Result<Node> {
        let topo = Topology::new(1 + BACKEND_PODS);
        for (key, value) in NODE_SYSCTLS {
            topo.node.sysctl(key, value);
        }
        topo.pods[0]
            .ns
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
        // One server process for all backend pods (a listener in each pod's namespace), so
        // only one process spins on the server CPU.
        let pod_netns: Vec<String> = topo.pods[1..].iter().map(|p| p.ns.path()).collect();
        let mut args = vec![
            "serve".to_string(),
            BACKEND_PORT.to_string(),
            settings.server_cpu.to_string(),
        ];
        args.extend(pod_netns.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = command_in(
            &Placement {
                netns: &pod_netns[0],
                cgroup_procs: None,
            },
            &workspace_binary("loadgen"),
            &args,
        );
        let servers = vec![ChildGuard::spawn_ready(
            &format!("loadgen server of {}", config.name()),
            cmd,
        )];
        let agent = if config == Config::Bpf {
            let mut agent = Agent::new(&topo.id, topo.cgroup_path(), NODE_NAME);
            agent.set_echo(false);
            // tc on the node's bridge: the external data path (Target::ExternalIp); the agent
            // runs in the node's namespace to see it.
            agent.netns = Some(topo.node.path());
            agent.extra_args = ["--pod-interfaces", "br0", "--external-interfaces", ""]
                .map(String::from)
                .to_vec();
            agent.extra_args.extend(settings.agent_args.iter().cloned());
            agent.write_manifest(
                "node.yaml",
                &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\n"),
            );
            // The per-packet client: a pod of namespace `mesh`, which has socket-layer
            // translation off (only processes in its cgroup are; the other targets' client
            // runs in the topology's cgroup).
            let client = pod_ip(0);
            agent.write_manifest(
                "per-packet.yaml",
                &format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata: {{name: mesh, labels: {{kube-bpf-proxy.io/socket-lb: disabled}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: mesh, uid: {PER_PACKET_UID}}}\nspec: {{nodeName: {NODE_NAME}}}\nstatus: {{podIP: {client}, podIPs: [{{ip: {client}}}]}}\n"
                ),
            );
            Some(agent)
        } else {
            None
        };
        let per_packet = if config == Config::Bpf {
            let rel = topo
                .cgroup
                .path
                .strip_prefix(tests::harness::cgroup::cgroup2_root())
                .context("the topology's cgroup below the cgroup2 mount")?
                .display()
                .to_string();
            let parent = TestCgroup::new(&format!("{rel}/kubepods"));
            let pod = TestCgroup::new(&format!("{rel}/kubepods/pod{PER_PACKET_UID}"));
            Some((parent, pod))
        } else {
            None
        };
        let mut node = Node {
            config,
            _servers: servers,
            agent,
            per_packet,
            topo,
            tool,
            loaded: None,
        };
        if let Some(agent) = node.agent.as_mut() {
            let pos = agent.log_position();
            agent.start();
            wait_log(agent, pos, "synced: 0 frontends", Duration::from_secs(20))?;
            wait_log(
                agent,
                pos,
                "socket-layer translation off for 1 pod(s)",
                Duration::from_secs(20),
            )?;
        }
        Ok(node)
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("the bpf node runs the agent")
    }

    fn tool(&self) -> &str {
        self.tool.as_deref().expect("a peer node has a tool")
    }

    /// Runs one load generator measurement from the client pod, inside this topology's cgroup
    /// (which only for `bpf` has the agent's hooks).
    fn measure(
        &self,
        test: Test,
        target: Target,
        w: &Workload,
        secs: f64,
        settings: &Settings,
    ) -> anyhow::Result<Sample> {
        check_stop()?;
        let spread = self.config == Config::Direct && target == Target::PodsSpread;
        let to = if spread {
            (1..=BACKEND_PODS)
                .map(|i| SocketAddrV4::new(pod_ip(i), BACKEND_PORT).to_string())
                .collect::<Vec<_>>()
                .join(",")
        } else if self.config == Config::Direct {
            Target::Pod.addr(w).to_string()
        } else {
            target.addr(w).to_string()
        };
        if spread && test != Test::Crr {
            bail!("the spread baseline is measured with TCP_CRR only");
        }
        let mode = if spread { "crr-spread" } else { test.arg() };
        let netns = self.topo.pods[0].ns.path();
        let procs = match (&self.per_packet, target) {
            (Some((_, pod)), Target::PerPacket) => pod.procs_file(),
            _ => self.topo.cgroup.procs_file(),
        };
        // Outside the cgroup the socket hooks do not see the client: tc translates.
        let in_cgroup = target != Target::ExternalIp;
        let cmd = command_in(
            &Placement {
                netns: &netns,
                cgroup_procs: in_cgroup.then_some(procs.as_path()),
            },
            &workspace_binary("loadgen"),
            &[
                mode,
                &to,
                &format!("{secs}"),
                &settings.client_cpu.to_string(),
            ],
        );
        let (_, stdout) = run_bounded(cmd, Duration::from_secs_f64(secs + 20.0))?;
        let v: serde_json::Value = serde_json::from_str(stdout.trim())
            .with_context(|| format!("loadgen output {stdout:?}"))?;
        let ops = v["ops"].as_u64().unwrap_or(0);
        let errors = v["errors"].as_u64().unwrap_or(0);
        let backends = v["backends"].as_u64().unwrap_or(0) as usize;
        let mut note = String::new();
        if errors > 0 {
            note = format!(
                "{errors} errors (first: {})",
                v["first_error"].as_str().unwrap_or("?")
            );
        } else if ops == 0 {
            note = "no requests completed".into();
        } else {
            let to_service = self.config != Config::Direct && target != Target::Pod;
            // Source hashing keeps the one client on one backend by design.
            let one_client_one_backend =
                target == Target::SvcMid && w.scheduler == Some("source-hash");
            let want = if spread || (to_service && !one_client_one_backend) {
                BACKEND_PODS
            } else {
                1
            };
            // Every backend should answer a Service's new connections (one long connection,
            // and UDP through conntrack, stay with one).
            let check = test == Test::Crr || !to_service;
            if check && ops >= 50 * want as u64 && backends != want {
                note = format!("{backends} backends answered, expected {want}");
            }
        }
        Ok(Sample {
            services: w.services,
            test: test.name().into(),
            target: target.name().into(),
            config: self.config.name().into(),
            rate: v["rate"].as_f64().unwrap_or(0.0),
            client_cpu: v["cpu"].as_f64().unwrap_or(0.0),
            realtime: v["realtime"].as_bool().unwrap_or(false),
            ops,
            errors,
            backends,
            valid: note.is_empty(),
            note,
            rep: 0,
        })
    }

    /// Runs the rules tool in the node namespace on `input` (written to a file first);
    /// returns the tool's wall time.
    fn load(&self, work: &Path, args: &[&str], input: &str) -> anyhow::Result<Duration> {
        check_stop()?;
        let file = work.join(format!("{}.rules", self.config.name()));
        fs::write(&file, input).with_context(|| format!("write {}", file.display()))?;
        let file = file.to_string_lossy().into_owned();
        let mut all: Vec<&str> = args.to_vec();
        if self.config == Config::Nftables {
            all.push("-f");
        } else {
            all.push("--wait=30");
        }
        all.push(&file);
        self.in_node(self.tool(), &all, Duration::from_secs(600))
    }

    fn in_node(&self, program: &str, args: &[&str], timeout: Duration) -> anyhow::Result<Duration> {
        let netns = self.topo.node.path();
        let cmd = command_in(
            &Placement {
                netns: &netns,
                cgroup_procs: None,
            },
            Path::new(program),
            args,
        );
        Ok(run_bounded(cmd, timeout)?.0)
    }

    fn output_in_node(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let netns = self.topo.node.path();
        let cmd = command_in(
            &Placement {
                netns: &netns,
                cgroup_procs: None,
            },
            Path::new(program),
            args,
        );
        Ok(run_bounded(cmd, Duration::from_secs(120))?.1)
    }

    /// Empties the peer's rules (untimed).
    fn flush(&self, work: &Path) -> anyhow::Result<()> {
        match self.config {
            Config::Nftables => {
                self.load(work, &[], "flush ruleset\n")?;
            }
            _ => {
                self.load(work, &[], "*nat\nCOMMIT\n")?;
            }
        }
        Ok(())
    }

    /// Full load of `w` into empty rules; returns the time of the load alone.
    fn full_load(&mut self, work: &Path, w: &Workload) -> anyhow::Result<Duration> {
        self.flush(work)?;
        self.loaded = None;
        let input = if self.config == Config::Nftables {
            w.nft_full()
        } else {
            w.iptables_full()
        };
        let took = self.load(work, &[], &input)?;
        self.loaded = Some(*w);
        Ok(took)
    }

    /// Checks that the rules hold `w`'s current endpoint of the change target.
    fn verify_change(&self, w: &Workload) -> anyhow::Result<()> {
        let want = w.changed_endpoint(w.changed).to_string();
        let listing = match self.config {
            Config::Nftables => {
                self.output_in_node("nft", &["list", "table", "ip", "kube-proxy"])?
            }
            Config::IptablesLegacy => {
                self.output_in_node("iptables-legacy-save", &["-t", "nat"])?
            }
            _ => self.output_in_node("iptables-nft-save", &["-t", "nat"])?,
        };
        let other = w.changed_endpoint(!w.changed).to_string();
        let has = |a: &str| {
            listing
                .lines()
                .any(|l| l.contains(&format!("{a}:{BACKEND_PORT}")))
        };
        if !has(&want) || has(&other) {
            bail!(
                "{}: rules do not hold the changed endpoint {want} (or still hold {other})",
                self.config.name()
            );
        }
        Ok(())
    }
}

/// Runs `cmd` to completion within `timeout` (killing it past that, or on Ctrl-C); returns its
/// wall time, from just before spawn to its exit, and its stdout. Fails if it fails.
fn run_bounded(mut cmd: Command, timeout: Duration) -> anyhow::Result<(Duration, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{:?}", cmd);
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send((Instant::now(), out));
    });
    let deadline = start + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((end, out)) => {
                let out = out.with_context(|| format!("wait for {what}"))?;
                if !out.status.success() {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    let stderr: String = stderr.chars().take(2000).collect();
                    bail!("{what} failed ({}): {}", out.status, stderr.trim());
                }
                return Ok((
                    end - start,
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                ));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let stop = STOP.load(Ordering::Relaxed);
                if stop || Instant::now() >= deadline {
                    // SAFETY: plain kill(2) of our own child, which is not reaped yet (the
                    // waiting thread has not sent).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    let _ = rx.recv_timeout(Duration::from_secs(5));
                    if stop {
                        bail!("interrupted");
                    }
                    bail!("{what} did not finish within {timeout:?}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("lost {what}"),
        }
    }
}

/// Waits (bounded) for an agent log line after `from` containing `needle`.
fn wait_log(agent: &Agent, from: usize, needle: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = agent.logs_since(from);
        if let Some(line) = lines.iter().find(|l| l.contains(needle)) {
            return Ok(line.clone());
        }
        if Instant::now() >= deadline {
            let tail: Vec<&String> = lines.iter().rev().take(10).collect();
            bail!(
                "no agent log line containing {needle:?} within {timeout:?}; last lines: {tail:?}"
            );
        }
        nap(Duration::from_millis(5))?;
    }
}

/// Parses a Rust `Duration` debug string (`12.3ms`, `1.2s`, `850µs`, `40ns`) to milliseconds.
fn parse_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let (num, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("µs") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ns") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// (sync duration, change to programmed) in ms from a `synced: ...` agent log line.
fn parse_synced(line: &str) -> (Option<f64>, Option<f64>) {
    let sync = line
        .split("rejected objects, ")
        .nth(1)
        .and_then(|rest| rest.split(" (").next())
        .and_then(parse_duration_ms);
    let programmed = line
        .split("change to programmed ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(parse_duration_ms);
    (sync, programmed)
}

/// A small xorshift generator for jitter (no dependency needed).
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Jitter(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Samples until `max`, or until at least `min` and `time` has passed.
fn sample_within(
    min: usize,
    max: usize,
    time: Duration,
    mut f: impl FnMut(usize) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<f64>> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < max && (out.len() < min || start.elapsed() < time) {
        check_stop()?;
        out.push(f(out.len())?);
    }
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Services whose frontends show that the whole workload is (or is not) programmed: the last
/// of every manifest chunk and the measured ones.
fn representatives(w: &Workload) -> Vec<usize> {
    let mut out: Vec<usize> = (0..w.services)
        .step_by(CHUNK)
        .map(|s| (s + CHUNK).min(w.services) - 1)
        .collect();
    out.extend([w.first(), w.mid(), w.last(), w.change_target()]);
    out.sort_unstable();
    out.dedup();
    out
}

/// Polls (every 0.5 ms, bounded) until `done` says the maps hold what is expected.
fn poll_maps(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        check_stop()?;
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_micros(500));
    }
}

/// One agent sync from a source change to the maps: (wall ms, sync ms, programmed ms).
type AgentTiming = (f64, Option<f64>, Option<f64>);

/// Removes every Service manifest (the Node and the per-packet client's objects stay) and waits until the maps hold none of `w`'s frontends.
fn agent_clear(node: &mut Node, maps: &AgentMaps) -> anyhow::Result<()> {
    let Some(w) = node.loaded.take() else {
        return Ok(());
    };
    let agent = node.agent();
    let pos = agent.log_position();
    for entry in fs::read_dir(&agent.manifests)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n != "node.yaml" && n != "per-packet.yaml") {
            fs::remove_file(&path)?;
        }
    }
    let reps = representatives(&w);
    poll_maps("the frontends to go", Duration::from_secs(300), || {
        for i in &reps {
            if maps.frontend(w.vip(*i), SERVICE_PORT)?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    wait_log(agent, pos, "synced: 0 frontends", Duration::from_secs(300))?;
    Ok(())
}

/// Writes all of `w`'s manifests at once (renames of files written beforehand) and times until
/// the maps hold every representative frontend with all its endpoints.
fn agent_load(node: &mut Node, maps: &AgentMaps, w: &Workload) -> anyhow::Result<AgentTiming> {
    agent_clear(node, maps)?;
    let agent = node.agent();
    let files = w.manifest_files(CHUNK);
    let mut staged = Vec::new();
    for (name, text) in &files {
        let tmp = agent.manifests.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        staged.push((tmp, agent.manifests.join(name)));
    }
    let pos = agent.log_position();
    let start = Instant::now();
    for (tmp, dst) in &staged {
        fs::rename(tmp, dst)?;
    }
    let reps = representatives(w);
    poll_maps(
        &format!("{} Services to be programmed", w.services),
        Duration::from_secs(600),
        || {
            for i in &reps {
                match maps.frontend(w.vip(*i), SERVICE_PORT)? {
                    Some(f) if usize::from(f.count) == w.endpoints => {}
                    _ => return Ok(false),
                }
            }
            Ok(true)
        },
    )?;
    let wall = ms(start.elapsed());
    let line = wait_log(
        agent,
        pos,
        &format!("synced: {} frontends", w.frontends()),
        Duration::from_secs(120),
    )?;
    let (sync, programmed) = parse_synced(&line);
    node.loaded = Some(*w);
    Ok((wall, sync, programmed))
}

/// One single-endpoint change of the change target, timed from the file rename to the maps
/// holding the new endpoint in the live slot generation.
fn agent_change(
    node: &mut Node,
    maps: &AgentMaps,
    next: &Workload,
    jitter: &mut Jitter,
) -> anyhow::Result<AgentTiming> {
    let target = next.change_target();
    let vip = next.vip(target);
    let new = next.changed_endpoint(next.changed);
    let old = next.changed_endpoint(!next.changed);
    let before = maps
        .frontend(vip, SERVICE_PORT)?
        .context("the change target has no frontend")?;
    // Start at a random phase of the source's 100 ms poll.
    nap(Duration::from_millis(jitter.below(100)))?;
    let agent = node.agent();
    let tmp = agent.manifests.join(format!(".{CHANGE_FILE}.tmp"));
    fs::write(&tmp, next.slice_yaml(target))?;
    let pos = agent.log_position();
    let start = Instant::now();
    fs::rename(&tmp, agent.manifests.join(CHANGE_FILE))?;
    poll_maps("the changed endpoint", Duration::from_secs(120), || {
        let Some(now) = maps.frontend(vip, SERVICE_PORT)? else {
            return Ok(false);
        };
        if now.rev == before.rev {
            return Ok(false);
        }
        let backends = maps.backends(&now)?;
        Ok(backends.contains(&new) && !backends.contains(&old))
    })?;
    let wall = ms(start.elapsed());
    let line = wait_log(agent, pos, "synced:", Duration::from_secs(60))?;
    let (sync, programmed) = parse_synced(&line);
    node.loaded = Some(*next);
    Ok((wall, sync, programmed))
}

/// Where binaries and results go: `<target dir>/release`, `<target dir>/bench`.
fn target_dir() -> anyhow::Result<PathBuf> {
    let out = exec::cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(PathBuf::from(
        v["target_directory"]
            .as_str()
            .context("no target_directory in cargo metadata")?,
    ))
}

pub(crate) fn has_program(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// The rules tools, and why one is missing.
fn peer_tools() -> Vec<(Config, Result<String, String>)> {
    let ipt_nft = if has_program("iptables-nft-restore") {
        Ok("iptables-nft-restore".to_string())
    } else {
        Err("iptables-nft-restore not installed".to_string())
    };
    let legacy = if has_program("iptables-legacy-restore") {
        Ok("iptables-legacy-restore".to_string())
    } else {
        Err("iptables-legacy-restore not installed".to_string())
    };
    let nft = if has_program("nft") {
        Ok("nft".to_string())
    } else {
        Err("nft not installed".to_string())
    };
    vec![
        (Config::IptablesNft, ipt_nft),
        (Config::IptablesLegacy, legacy),
        (Config::Nftables, nft),
    ]
}

/// A scratch directory for rule files, removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Re-renders a saved run (no root, no testbed).
fn render(json: &Path) -> anyhow::Result<()> {
    let text = fs::read_to_string(json).with_context(|| format!("read {}", json.display()))?;
    let mut report: Report =
        serde_json::from_str(&text).with_context(|| format!("parse {}", json.display()))?;
    report.finish();
    let dir = json.parent().unwrap_or(Path::new("."));
    let markdown = report.markdown();
    println!("{markdown}");
    if report.settings.only_pod_networks {
        fs::write(dir.join("pod-networks.md"), &markdown)?;
        eprintln!("==> wrote {}/pod-networks.md", dir.display());
        return Ok(());
    }
    fs::write(dir.join("bench.md"), &markdown)?;
    report::plot(&report, &dir.join("bench.png"))?;
    eprintln!("==> wrote {}/bench.{{md,png}}", dir.display());
    Ok(())
}

pub fn bench(opts: Options) -> anyhow::Result<()> {
    if let Some(json) = &opts.render {
        return render(json);
    }
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (network namespaces, cgroups, BPF)");
    }
    let target = target_dir()?;
    if !opts.no_build {
        setup::setup()?;
        exec::build(&exec::BuildOptions { release: true })?;
    }
    let started = Instant::now();
    let release = target.join("release");
    for (var, bin) in [
        ("KBP_KUBE_BPF_PROXY_BIN", "kube-bpf-proxy"),
        ("KBP_TESTHOST_BIN", "testhost"),
        ("KBP_LOADGEN_BIN", "loadgen"),
    ] {
        let path = release.join(bin);
        if !path.is_file() {
            bail!(
                "{} missing: build with `cargo build --release -p proxy-userspace -p tests --bins`",
                path.display()
            );
        }
        // SAFETY: still single-threaded: no other thread reads the environment.
        unsafe { std::env::set_var(var, &path) };
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    sweep();
    let machine = report::Machine::probe();
    let settings = Settings::new(&opts, machine.cpus);
    if settings.only_control_plane {
        let out_dir = target.join("bench");
        fs::create_dir_all(&out_dir)?;
        let markdown = control_plane(&settings)?;
        println!("{markdown}");
        fs::write(out_dir.join("control-plane.md"), &markdown)?;
        eprintln!(
            "==> wrote {}/control-plane.md in {:.0} s; testbed removed",
            out_dir.display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    if settings.services.is_empty() && !settings.only_pod_networks {
        bail!("no Service count >= 4 given");
    }
    let out_dir = target.join("bench");
    fs::create_dir_all(&out_dir)?;
    let work =
        WorkDir(std::env::temp_dir().join(format!("{}-bench", tests::harness::names::unique())));
    fs::create_dir_all(&work.0)?;
    if settings.only_pod_networks {
        eprintln!(
            "\n==> bench --pod-networks: {} CPUs, kernel {}, {}",
            machine.cpus, machine.kernel, machine.cpu_model
        );
    } else {
        eprintln!(
            "\n==> bench: {} CPUs, kernel {}, {}; Services {:?} x {} endpoints; {} s per measurement, {} repetition(s)",
            machine.cpus,
            machine.kernel,
            machine.cpu_model,
            settings.services,
            settings.endpoints,
            settings.secs,
            settings.reps
        );
    }
    let mut report = Report::new(machine, settings.clone());
    let result = if settings.only_pod_networks {
        Ok(())
    } else {
        run(&settings, &work.0, &mut report)
    };
    // The pod-network part: alone, or after the rest of a full run.
    let result = result.and_then(|()| {
        let mut pods = PodNetReport::default();
        let result = podnet::run(&settings, &mut pods);
        report.pod_networks = Some(pods);
        result
    });
    report.total_secs = started.elapsed().as_secs_f64();
    if let Err(e) = &result {
        let text = format!("{e:#}");
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        report.error = Some(lines.join(" / "));
    }
    // Whatever was measured is written, even after an error or Ctrl-C.
    report.finish();
    let markdown = report.markdown();
    println!("{markdown}");
    // The pod-network part alone has its own files: a full run's bench.* stay as they were.
    let stem = if settings.only_pod_networks {
        "pod-networks"
    } else {
        "bench"
    };
    fs::write(out_dir.join(format!("{stem}.md")), &markdown)?;
    fs::write(
        out_dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&report)?,
    )?;
    if settings.only_pod_networks {
        eprintln!("==> wrote {}/{stem}.{{md,json}}", out_dir.display());
    } else {
        match report::plot(&report, &out_dir.join("bench.png")) {
            Ok(()) => eprintln!("==> wrote {}/bench.{{md,json,png}}", out_dir.display()),
            Err(e) => eprintln!(
                "==> wrote {}/bench.{{md,json}}; plot failed: {e:#}",
                out_dir.display()
            ),
        }
    }
    eprintln!(
        "==> bench took {:.0} s; testbed removed",
        started.elapsed().as_secs_f64()
    );
    result
}

fn run(settings: &Settings, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("==> building the testbed: 5 topologies (node + client + 10 backend pods each)");
    let mut nodes = vec![
        Node::new(Config::Direct, None, settings)?,
        Node::new(Config::Bpf, None, settings)?,
    ];
    for (config, tool) in peer_tools() {
        match tool {
            Ok(tool) => nodes.push(Node::new(config, Some(tool), settings)?),
            Err(why) => {
                eprintln!("==> skipping {}: {why}", config.name());
                report.skipped.push(format!("{}: {why}", config.name()));
            }
        }
    }
    let bpf_pin = nodes[1].agent().pin_dir.clone();
    let maps = AgentMaps::open(&bpf_pin)?;
    let mut jitter = Jitter::new();
    let mut last_n = None;
    for &n in &settings.services {
        check_stop()?;
        let w = Workload::new(n, settings.endpoints);
        eprintln!("\n==> {n} Services x {} endpoints", w.endpoints);

        // Control plane: full sync / full load (this also programs the data path).
        eprintln!("    agent: full sync (up to {}x)", settings.full_sync_reps);
        let mut syncs = Vec::new();
        let mut programmed = Vec::new();
        let walls = sample_within(1, settings.full_sync_reps, Duration::from_secs(20), |_| {
            let (wall, sync, prog) = agent_load(&mut nodes[1], &maps, &w)?;
            syncs.extend(sync);
            programmed.extend(prog);
            Ok(wall)
        })?;
        report.cp(
            n,
            w.endpoints,
            "bpf",
            "full sync: manifests written -> maps hold all",
            walls,
        );
        report.cp(
            n,
            w.endpoints,
            "bpf",
            "full sync: agent's sync duration",
            syncs,
        );
        report.cp(
            n,
            w.endpoints,
            "bpf",
            "full sync: agent's change to programmed",
            programmed,
        );
        for node in nodes.iter_mut().skip(2) {
            eprintln!("    {}: full load", node.config.name());
            let name = node.config.name();
            let samples = sample_within(1, 5, Duration::from_secs(10), |_| {
                Ok(ms(node.full_load(work, &w)?))
            })?;
            report.cp(n, w.endpoints, name, "full load into empty rules", samples);
        }

        // Data path.
        datapath(&nodes, &w, settings, report)?;
        if Some(&n) == settings.services.first() {
            schedulers(&mut nodes, &maps, &w, settings, report)?;
        }

        // Control plane: single endpoint changes.
        eprintln!(
            "    agent: up to {} single-endpoint changes",
            settings.change_samples
        );
        let (mut syncs, mut programmed) = (Vec::new(), Vec::new());
        let walls = sample_within(5, settings.change_samples, Duration::from_secs(20), |k| {
            let next = w.with_change(k % 2 == 0);
            let (wall, sync, prog) = agent_change(&mut nodes[1], &maps, &next, &mut jitter)?;
            syncs.extend(sync);
            programmed.extend(prog);
            Ok(wall)
        })?;
        report.cp(
            n,
            w.endpoints,
            "bpf",
            "single change: manifest written -> maps hold it",
            walls,
        );
        report.cp(
            n,
            w.endpoints,
            "bpf",
            "single change: agent's sync duration",
            syncs,
        );
        report.cp(
            n,
            w.endpoints,
            "bpf",
            "single change: agent's change to programmed",
            programmed,
        );
        for node in nodes.iter_mut().skip(2) {
            let name = node.config.name();
            eprintln!("    {name}: single-endpoint changes");
            let mut state = node.loaded.context("peer rules not loaded")?;
            if node.config == Config::Nftables {
                let samples = sample_within(3, 20, Duration::from_secs(10), |_| {
                    let next = state.with_change(!state.changed);
                    let took = node.load(work, &[], &next.nft_change())?;
                    state = next;
                    Ok(ms(took))
                })?;
                report.cp(
                    n,
                    w.endpoints,
                    name,
                    "single change: nft -f (partial transaction)",
                    samples,
                );
            } else {
                let samples = sample_within(3, 20, Duration::from_secs(10), |_| {
                    let next = state.with_change(!state.changed);
                    let took = node.load(work, &["--noflush"], &next.iptables_change())?;
                    state = next;
                    Ok(ms(took))
                })?;
                report.cp(
                    n,
                    w.endpoints,
                    name,
                    "single change: iptables-restore --noflush (partial)",
                    samples,
                );
                let samples = sample_within(1, 5, Duration::from_secs(10), |_| {
                    let next = state.with_change(!state.changed);
                    let took = node.load(work, &[], &next.iptables_full())?;
                    state = next;
                    Ok(ms(took))
                })?;
                report.cp(
                    n,
                    w.endpoints,
                    name,
                    "single change: iptables-restore (full, no --noflush)",
                    samples,
                );
            }
            node.verify_change(&state)?;
            node.loaded = Some(state);
        }

        // Memory.
        memory(&mut nodes[1], &w, report)?;
        last_n = Some(n);
    }

    // Memory (and a full sync) at the largest N with 100 endpoints per Service, where the
    // agent's maps hold it: with the default sizes (no --max-* flags) 10,000 x 100 is more
    // members (`LB_MEMBERS`, sized by --max-slots) and backends than they hold, and every
    // Service would be refused for capacity. One frontend's worth more for the update in
    // flight, as the agent's own fit counts.
    let fits = |n: usize| {
        let entries = (n + 1) * 100;
        !settings.agent_args.is_empty()
            || entries <= proxy_common::maps::SLOTS_MAX.min(proxy_common::maps::BACKENDS_MAX)
    };
    if let Some(n) = last_n.filter(|n| !fits(*n)) {
        let why = format!(
            "{n} Services x 100 endpoints (more members than the maps hold at their default \
             sizes; `cargo xtask bench --control-plane` measures it with maps sized for it)"
        );
        eprintln!("\n==> skipped: {why}");
        report.skipped.push(why);
    }
    if let Some(n) = last_n.filter(|n| fits(*n)) {
        let w = Workload::new(n, 100);
        eprintln!("\n==> {n} Services x 100 endpoints (memory)");
        let (wall, sync, prog) = agent_load(&mut nodes[1], &maps, &w)?;
        report.cp(
            n,
            100,
            "bpf",
            "full sync: manifests written -> maps hold all",
            vec![wall],
        );
        report.cp(
            n,
            100,
            "bpf",
            "full sync: agent's sync duration",
            sync.into_iter().collect(),
        );
        report.cp(
            n,
            100,
            "bpf",
            "full sync: agent's change to programmed",
            prog.into_iter().collect(),
        );
        memory(&mut nodes[1], &w, report)?;
    }
    eprintln!("\n==> removing the testbed");
    drop(maps);
    drop(nodes);
    Ok(())
}

/// The control-plane figures of issue #20 at 10,000 Services x 10 and x 100: a full sync, 40
/// single endpoint changes (manifest written -> maps; the agent's sync; its change to
/// programmed), the agent's memory and the maps' memory. Returns the Markdown.
fn control_plane(settings: &Settings) -> anyhow::Result<String> {
    eprintln!("==> building the bpf node (node + client + 10 backend pods)");
    let mut node = Node::new(Config::Bpf, None, settings)?;
    let maps = AgentMaps::open(&node.agent().pin_dir.clone())?;
    let mut jitter = Jitter::new();
    let mut rows = String::from(
        "| Services x endpoints | what | p50 | p99 | max | n |\n|---|---|---:|---:|---:|---:|\n",
    );
    let mut memory = String::from(
        "| Services x endpoints | agent RSS (MiB) | of it anonymous (MiB) | of it file-backed (MiB) | agent peak RSS (MiB) | BPF maps, memlock (MiB) |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for (n, eps) in [(10_000, 10), (10_000, 100)] {
        check_stop()?;
        let w = Workload::new(n, eps);
        eprintln!("    {n} x {eps}: full sync");
        let (wall, sync, programmed) = agent_load(&mut node, &maps, &w)?;
        let mut row = |what: &str, values: &[f64]| {
            if let Some(s) = report::Summary::of(values) {
                rows.push_str(&format!(
                    "| {n} x {eps} | {what} | {:.1} | {:.1} | {:.1} | {} |\n",
                    s.p50, s.p99, s.max, s.n
                ));
            }
        };
        row(
            "full sync: manifests written -> maps hold all (ms)",
            &[wall],
        );
        row(
            "full sync: agent's sync duration (ms)",
            &sync.into_iter().collect::<Vec<_>>(),
        );
        row(
            "full sync: agent's change to programmed (ms)",
            &programmed.into_iter().collect::<Vec<_>>(),
        );
        let agent = node.agent();
        let pid = agent.pid().context("agent not running")?;
        let (rss, hwm) = maps::rss(pid)?;
        let (anon, file) = maps::rss_split(pid)?;
        let (memlock, _) = maps::memlock(&agent.pin_dir)?;
        memory.push_str(&format!(
            "| {n} x {eps} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            mib(rss),
            mib(anon),
            mib(file),
            mib(hwm),
            mib(memlock)
        ));
        eprintln!(
            "    {n} x {eps}: {} single-endpoint changes",
            settings.change_samples
        );
        let (mut walls, mut syncs, mut programmed) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..settings.change_samples {
            check_stop()?;
            let next = w.with_change(k % 2 == 0);
            let (wall, sync, prog) = agent_change(&mut node, &maps, &next, &mut jitter)?;
            walls.push(wall);
            syncs.extend(sync);
            programmed.extend(prog);
        }
        row(
            "one changed endpoint: manifest written -> maps hold it (ms)",
            &walls,
        );
        row("one changed endpoint: agent's sync duration (ms)", &syncs);
        row(
            "one changed endpoint: agent's change to programmed (ms)",
            &programmed,
        );
    }
    // Through the Kubernetes source: the API server double of proxy-userspace's tests, the
    // agent's sync into in-memory maps (proxy-userspace/examples/kube_latency.rs).
    eprintln!("    10000 x 10 through the Kubernetes source (API server double)");
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "run",
            "--release",
            "-p",
            "proxy-userspace",
            "--example",
            "kube_latency",
        ])
        .stderr(Stdio::null())
        .output()?;
    let kube: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("kube source"))
        .map(|l| format!("- {l}"))
        .collect();
    // The agent's sync alone, into in-memory maps, with the heap each stage holds
    // (proxy-userspace/examples/plan_scale.rs).
    let mut stages = Vec::new();
    for size in ["10", "100"] {
        eprintln!("    10000 x {size}: the sync into in-memory maps, heap by stage");
        let out = std::process::Command::new(env!("CARGO"))
            .args(["run", "--release", "-p", "proxy-userspace", "--example"])
            .args(["plan_scale", "--", "10000", size, "40"])
            .stderr(Stdio::null())
            .output()?;
        stages.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| format!("- {l}")),
        );
    }
    Ok(format!(
        "### Control plane at 10,000 Services (`cargo xtask bench --control-plane`)\n\n{rows}\n{memory}\nThrough the Kubernetes source (the tests' API server double, the agent's sync into in-memory maps):\n{}\n\nThe sync alone into in-memory maps, and the heap each stage holds (`plan_scale`; a stage's heap is what a copy of it allocates):\n{}\n",
        kube.join("\n"),
        stages.join("\n")
    ))
}

fn memory(node: &mut Node, w: &Workload, report: &mut Report) -> anyhow::Result<()> {
    let agent = node.agent();
    let pid = agent.pid().context("agent not running")?;
    agent.assert_running();
    let (rss, hwm) = maps::rss(pid)?;
    let (memlock, count) = maps::memlock(&agent.pin_dir)?;
    report.memory.push(MemRow {
        services: w.services,
        endpoints: w.endpoints,
        agent_rss_bytes: rss,
        agent_peak_rss_bytes: hwm,
        bpf_map_memlock_bytes: memlock,
        maps: count,
    });
    Ok(())
}

/// A data-path test, its target, and which configurations run it.
type Case = (Test, Target, fn(Config) -> bool);

/// The data-path measurements at one Service count: every repetition measures the direct
/// baseline of each test, then each configuration (in an order rotated per repetition).
fn datapath(
    nodes: &[Node],
    w: &Workload,
    settings: &Settings,
    report: &mut Report,
) -> anyhow::Result<()> {
    let direct = &nodes[0];
    let candidates: Vec<&Node> = nodes[1..].iter().collect();
    let cases: Vec<Case> = vec![
        (Test::Crr, Target::SvcMid, |_| true),
        (Test::Crr, Target::SvcFirst, Config::is_iptables),
        (Test::Crr, Target::SvcLast, Config::is_iptables),
        (Test::Crr, Target::Pod, |_| true),
        (Test::Rr, Target::SvcMid, |_| true),
        (Test::Udp, Target::SvcMid, |_| true),
        // The external path: the middle Service's externalIP from a client outside the hooked
        // cgroup; bpf translates it at tc, the peers with kube-proxy's externalIP rules.
        (Test::Crr, Target::ExternalIp, |_| true),
        (Test::Rr, Target::ExternalIp, |_| true),
        (Test::Udp, Target::ExternalIp, |_| true),
    ];
    let mut samples: Vec<Sample> = Vec::new();
    for rep in 0..settings.reps {
        eprintln!("    data path, repetition {}/{}", rep + 1, settings.reps);
        for test in [Test::Crr, Test::Rr, Test::Udp] {
            let mut s = direct.measure(test, Target::Pod, w, settings.secs, settings)?;
            s.rep = rep;
            samples.push(s);
            for (case_test, target, applies) in &cases {
                if *case_test != test {
                    continue;
                }
                let k = candidates.len();
                for i in 0..k {
                    let node = candidates[(i + rep) % k];
                    if !applies(node.config) {
                        continue;
                    }
                    let mut s = node.measure(test, *target, w, settings.secs, settings)?;
                    s.rep = rep;
                    samples.push(s);
                }
            }
        }
    }
    // The close call (bpf vs direct, connection rate): short back-to-back pairs, alternating
    // which goes first.
    eprintln!(
        "    paired bpf/direct TCP_CRR runs: {}",
        settings.close_pairs
    );
    let bpf = nodes
        .iter()
        .find(|n| n.config == Config::Bpf)
        .context("bpf node")?;
    let close = Settings {
        pairs: settings.close_pairs.max(1),
        ..settings.clone()
    };
    report
        .paired
        .push(paired(direct, bpf, Target::SvcMid, w, &close)?);
    eprintln!(
        "    paired bpf/direct spread over the Service's pods TCP_CRR runs: {}",
        settings.pairs
    );
    report.paired_spread.push(paired_to(
        direct,
        Target::PodsSpread,
        bpf,
        Target::SvcMid,
        w,
        settings,
    )?);
    eprintln!(
        "    paired bpf (external IP, tc)/direct TCP_CRR runs: {}",
        settings.pairs
    );
    report
        .external
        .push(paired(direct, bpf, Target::ExternalIp, w, settings)?);
    // Socket-layer translation off (issue #24): the same Service per packet at tc, next to
    // kube-proxy nftables (which translates every packet) in the same pairs.
    eprintln!(
        "    paired bpf (per packet, tc)/direct and nftables/direct TCP_CRR runs: {}",
        settings.pairs
    );
    report
        .per_packet
        .push(paired(direct, bpf, Target::PerPacket, w, settings)?);
    if let Some(nft) = nodes.iter().find(|n| n.config == Config::Nftables) {
        report
            .per_packet_nftables
            .push(paired(direct, nft, Target::SvcMid, w, settings)?);
    }
    // The monitor's cost: the same close call while a `monitor` reads every event.
    eprintln!(
        "    paired bpf (monitor watching)/direct TCP_CRR runs: {}",
        settings.pairs
    );
    let agent = bpf.agent.as_ref().context("the bpf node runs the agent")?;
    let binary = agent
        .binary
        .clone()
        .unwrap_or_else(|| workspace_binary("kube-bpf-proxy"));
    let mut monitor = Command::new(binary)
        .args(["monitor", "--output", "json", "--bpffs"])
        .arg(&agent.pin_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start kube-bpf-proxy monitor")?;
    let watched = paired(direct, bpf, Target::SvcMid, w, settings);
    // SIGTERM: the monitor switches the events off as it leaves.
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(monitor.id() as i32, libc::SIGTERM) };
    let _ = monitor.wait();
    report.monitored.push(watched?);
    report.add_datapath(w.services, &samples, settings.reps);
    report.samples.extend(samples);
    Ok(())
}

/// `settings.pairs` short back-to-back TCP_CRR runs, `direct` to a pod and `bpf` to `target`,
/// alternating which goes first: the rate ratios bpf/direct of the valid pairs, and how many
/// pairs were invalid.
fn paired(
    direct: &Node,
    bpf: &Node,
    target: Target,
    w: &Workload,
    settings: &Settings,
) -> anyhow::Result<PairedRow> {
    paired_to(direct, Target::Pod, bpf, target, w, settings)
}

/// `paired`, with `direct` measured to `baseline` (`Target::Pod` or `Target::PodsSpread`).
fn paired_to(
    direct: &Node,
    baseline: Target,
    bpf: &Node,
    target: Target,
    w: &Workload,
    settings: &Settings,
) -> anyhow::Result<PairedRow> {
    let mut ratios = Vec::new();
    let mut invalid = 0;
    for pair in 0..settings.pairs {
        let ((a, ta), (b, tb)) = if pair % 2 == 0 {
            ((direct, baseline), (bpf, target))
        } else {
            ((bpf, target), (direct, baseline))
        };
        let sa = a.measure(Test::Crr, ta, w, settings.pair_secs, settings)?;
        let sb = b.measure(Test::Crr, tb, w, settings.pair_secs, settings)?;
        let (d, c) = if pair % 2 == 0 { (sa, sb) } else { (sb, sa) };
        if d.valid && c.valid && d.rate > 0.0 {
            ratios.push(c.rate / d.rate);
        } else {
            invalid += 1;
        }
    }
    Ok(PairedRow {
        services: w.services,
        test: Test::Crr.name().into(),
        target: target.name().into(),
        summary: Summary::of(&ratios),
        ratios,
        invalid,
    })
}

/// The schedulers whose connect cost is measured (annotation value, the frontend flags that
/// show it is programmed); random, the default, first.
const SCHEDULERS: [(&str, u16); 9] = [
    ("random", 0),
    ("round-robin", FLAG_ROUND_ROBIN),
    ("weighted-round-robin", FLAG_ROUND_ROBIN),
    ("least-connection", FLAG_LEAST_CONN),
    ("weighted-least-connection", FLAG_LEAST_CONN | FLAG_WEIGHTED),
    (
        "shortest-expected-delay",
        FLAG_LEAST_CONN | FLAG_WEIGHTED | FLAG_SED,
    ),
    (
        "never-queue",
        FLAG_LEAST_CONN | FLAG_WEIGHTED | FLAG_SED | FLAG_NEVER_QUEUE,
    ),
    ("source-hash", FLAG_SOURCE_HASH),
    ("maglev", FLAG_MAGLEV),
];
const SCHEDULER_FLAGS: u16 = FLAG_ROUND_ROBIN
    | FLAG_LEAST_CONN
    | FLAG_WEIGHTED
    | FLAG_SED
    | FLAG_NEVER_QUEUE
    | FLAG_SOURCE_HASH
    | FLAG_MAGLEV;

/// The per-connect cost of each scheduler: the middle Service is re-annotated with each in
/// turn (a full load of `w`), then measured in bpf/direct TCP_CRR pairs like the close call.
/// `w` is loaded again at the end.
fn schedulers(
    nodes: &mut [Node],
    maps: &AgentMaps,
    w: &Workload,
    settings: &Settings,
    report: &mut Report,
) -> anyhow::Result<()> {
    for (name, flags) in SCHEDULERS {
        check_stop()?;
        eprintln!(
            "    scheduler {name}: {} paired TCP_CRR runs",
            settings.pairs
        );
        let ws = w.with_scheduler(name);
        agent_load(&mut nodes[1], maps, &ws)?;
        poll_maps(
            &format!("the middle Service to use {name}"),
            Duration::from_secs(30),
            || {
                Ok(maps
                    .frontend(ws.vip(ws.mid()), SERVICE_PORT)?
                    .is_some_and(|f| f.flags & SCHEDULER_FLAGS == flags))
            },
        )?;
        let p = paired(&nodes[0], &nodes[1], Target::SvcMid, &ws, settings)?;
        report.schedulers.push(SchedRow {
            services: w.services,
            scheduler: name.into(),
            summary: p.summary,
            ratios: p.ratios,
            invalid: p.invalid,
        });
    }
    agent_load(&mut nodes[1], maps, w)?;
    Ok(())
}
