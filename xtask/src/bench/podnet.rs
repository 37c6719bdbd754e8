//! `cargo xtask bench --pod-networks`: the tc path on pod-network shapes other than a bridge,
//! and how fast and at what memory cost the agent follows pods' veths (`--pod-interfaces
//! auto`). Every part runs on its own `tests::Testbed` (a LAN, the external client `ext` at
//! 192.168.77.100, node-a at 192.168.77.1 running the agent with `--external-interfaces eth0`,
//! the default `--pod-interfaces auto` and `--xdp off`, so tc alone translates):
//!
//! 1. External path per shape (bridge, ptp): one backend pod behind a NodePort Service; `ext`
//!    runs TCP_CRR to node-a's NodePort (`bpf`: tc on `eth0` translates and masquerades, tc on
//!    the pod-facing interface reverses the replies) and, as `direct`, to the pod's own address
//!    (routed through node-a by a route `ext` gets for this part, past the same tc programs,
//!    untranslated). Both shapes' testbeds run at once; short back-to-back direct/bpf pairs,
//!    shapes and order rotated per pair, each after the agent's connection tracking drained
//!    (`Bed::drain_conntrack`).
//! 2. Pod veth to tc attached, on the ptp testbed: pods added one at a time. Either the pod's
//!    EndpointSlice is written (and synced) first and the pod added after, timed from the veth's
//!    appearance (`ip -ts monitor`) to the agent's `tc attached at ingress of <veth>` line (its
//!    own timestamp), or the pod is added first and its slice written at once after, timed from
//!    the `add_pod` call (the agent finds a pod by its network namespace, slice or not).
//! 3. 500 pod veths on a fresh ptp testbed: host-side veths in node-a (peers in one extra
//!    namespace, both ends up) with `/32 scope link` routes to 10.244.100.x / 10.244.101.x, then
//!    one EndpointSlice listing all 500 addresses on node-a: time to all attached, and the
//!    agent's RSS before and after.
//! 4. Packets per second through node-a, XDP against tc against the kernel's forwarding, on a
//!    two-node testbed of its own (`pps`).
//!
//! Everything is removed on drop: on success, error, a panic in the harness, or Ctrl-C.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use tests::{
    Agent, ChildGuard, NetNs, Shape, Testbed,
    harness::{
        process::{Placement, command_in, workspace_binary},
        topology::pod_ip4,
    },
};

use super::{
    Jitter, Settings, check_stop, maps,
    report::{LatencyRow, PodNetReport, ScaleRow, ShapeRow, Summary},
    run_bounded, wait_log,
};

pub(super) const NODE: &str = "node-a";
/// node-a's LAN address (the NodePort's address from `ext`).
pub(super) const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const NODE_PORT: u16 = 30080;
pub(super) const BACKEND_PORT: u16 = 8080;
/// node-a's pod CIDR, routed via node-a in `ext` for the direct runs.
const POD_CIDR: &str = "10.244.0.0/24";
/// Part 1 measures bpf when the connection tracking holds fewer entries than this...
pub const CT_DRAINED: u64 = 1000;
/// ... or after waiting this long for it.
const CT_DRAIN_MAX: Duration = Duration::from_secs(30);
/// Pod veths of part 3.
pub const VETHS: usize = 500;

/// The parameters of this part, derived from the bench's settings.
struct Plan {
    pairs: usize,
    pair_secs: f64,
    attach_samples: usize,
    veths: usize,
    client_cpu: usize,
    server_cpu: usize,
    /// Packets per second alone (`--pps-only`).
    pps_only: bool,
}

impl Plan {
    fn new(settings: &Settings) -> Plan {
        Plan {
            pairs: if settings.quick { 3 } else { 8 },
            pair_secs: settings.pair_secs,
            attach_samples: if settings.quick { 5 } else { 20 },
            veths: VETHS,
            client_cpu: settings.client_cpu,
            server_cpu: settings.server_cpu,
            pps_only: settings.only_pps,
        }
    }
}

/// Runs the three parts, filling `out` as they go (what was measured stays there after an
/// error). A panic in the harness becomes an error; everything is dropped either way.
pub fn run(settings: &Settings, out: &mut PodNetReport) -> anyhow::Result<()> {
    let plan = Plan::new(settings);
    out.pairs = plan.pairs;
    out.pair_secs = plan.pair_secs;
    out.client_cpu = plan.client_cpu;
    out.server_cpu = plan.server_cpu;
    out.load_start = load_average();
    let result = catch_unwind(AssertUnwindSafe(|| run_parts(&plan, out)));
    out.load_end = load_average();
    match result {
        Ok(result) => result,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            bail!("pod networks: {text}")
        }
    }
}

fn run_parts(plan: &Plan, out: &mut PodNetReport) -> anyhow::Result<()> {
    eprintln!(
        "\n==> pod networks: the agent on node-a with --external-interfaces eth0, \
         --pod-interfaces auto, --xdp off (the tc path alone; the packets-per-second part also \
         with --xdp driver); BPF logging off"
    );
    if !plan.pps_only {
        let ptp = external(plan, out)?;
        attach_latency(ptp, plan, out)?;
        many_veths(plan, out)?;
    }
    super::pps::run(
        plan.pairs,
        if plan.pairs > 3 { 2.0 } else { 1.0 },
        plan.client_cpu,
        out,
    )?;
    eprintln!("==> pod networks: testbeds removed");
    Ok(())
}

/// A testbed with the agent on node-a. Fields drop in order: the server, the agent (killed,
/// its pins and so its tc links removed), then the testbed's namespaces.
struct Bed {
    shape: Shape,
    server: Option<ChildGuard>,
    agent: Agent,
    tb: Testbed,
}

impl Bed {
    /// A one-node testbed of `shape` with `pods` pods, and a started agent that synced its
    /// (empty) state.
    fn new(shape: Shape, pods: usize) -> anyhow::Result<Bed> {
        let tb = Testbed::with_shape(&[pods], shape);
        let mut agent = Agent::new(&tb.id, tb.cgroup_path(), NODE);
        agent.set_echo(false);
        agent.netns = Some(tb.node_ns_path(0));
        agent.extra_args = ["--external-interfaces", "eth0", "--xdp", "off"]
            .map(String::from)
            .to_vec();
        agent.write_manifest(
            "node.yaml",
            &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n"),
        );
        let mut bed = Bed {
            shape,
            server: None,
            agent,
            tb,
        };
        let pos = bed.agent.log_position();
        bed.agent.start();
        wait_log(
            &bed.agent,
            pos,
            "synced: 0 frontends",
            Duration::from_secs(20),
        )?;
        Ok(bed)
    }

    fn name(&self) -> &'static str {
        shape_name(self.shape)
    }

    fn node_ns(&self) -> &NetNs {
        &self.tb.nodes[0].ns
    }

    /// `kube-bpf-proxy status -o json` in node-a's namespace.
    fn status(&self) -> anyhow::Result<serde_json::Value> {
        node_status(&self.tb, &self.agent)
    }

    /// The interfaces `status` lists as carrying tc: (interface, why).
    fn tc_interfaces(&self) -> anyhow::Result<Vec<(String, String)>> {
        interfaces(&self.status()?)
    }

    /// Entries in the agent's IPv4 connection tracking (`LB_CT4`).
    fn conntrack_entries(&self) -> anyhow::Result<u64> {
        let status = self.status()?;
        status["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["name"] == "LB_CT4"))
            .and_then(|m| m["entries"].as_u64())
            .context("no LB_CT4 in status")
    }

    /// Waits (bounded) until the earlier runs' flows are out of the connection tracking; returns
    /// the seconds waited. A flow closed by a reset keeps its entries, and with them its
    /// masquerading port, for 10 s after its last packet, until the agent's next collection
    /// (every 10 s); a 0.5 s TCP_CRR run makes thousands, and all share one client and one
    /// backend. New connections take their ports over (`snat_port_reused`); the wait keeps
    /// every pair's starting state the same.
    fn drain_conntrack(&self) -> anyhow::Result<f64> {
        let start = Instant::now();
        while self.conntrack_entries()? >= CT_DRAINED {
            if start.elapsed() >= CT_DRAIN_MAX {
                eprintln!(
                    "    {}: conntrack not drained after {CT_DRAIN_MAX:?}; measuring anyway",
                    self.name()
                );
                break;
            }
            super::nap(Duration::from_millis(500))?;
        }
        Ok(start.elapsed().as_secs_f64())
    }

    fn rss(&mut self) -> anyhow::Result<(u64, u64)> {
        self.agent.assert_running();
        maps::rss(self.agent.pid().context("agent not running")?)
    }
}

/// `kube-bpf-proxy status -o json` of `agent`, run in node-a's namespace of `tb`.
pub(super) fn node_status(tb: &Testbed, agent: &Agent) -> anyhow::Result<serde_json::Value> {
    let netns = tb.node_ns_path(0);
    let pin = agent.pin_dir.to_string_lossy().into_owned();
    let cmd = command_in(
        &Placement {
            netns: &netns,
            cgroup_procs: None,
        },
        &workspace_binary("kube-bpf-proxy"),
        &["status", "-o", "json", "--bpffs", &pin],
    );
    let (_, stdout) = run_bounded(cmd, Duration::from_secs(30))?;
    serde_json::from_str(&stdout).context("status JSON")
}

/// The nonzero datapath counters a `status` lists: (reason, count).
pub(super) fn nonzero_counters(status: &serde_json::Value) -> Vec<(String, u64)> {
    status["counters"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|c| Some((c["reason"].as_str()?.to_string(), c["count"].as_u64()?)))
                .filter(|(_, n)| *n > 0)
                .collect()
        })
        .unwrap_or_default()
}

/// The interfaces a `status` lists as carrying tc: (interface, why).
fn interfaces(status: &serde_json::Value) -> anyhow::Result<Vec<(String, String)>> {
    let list = status["interfaces"]
        .as_array()
        .context("no interfaces in status")?;
    Ok(list
        .iter()
        .map(|i| {
            (
                i["interface"].as_str().unwrap_or("?").to_string(),
                i["reason"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect())
}

fn shape_name(shape: Shape) -> &'static str {
    match shape {
        Shape::Bridge => "bridge",
        Shape::Ptp => "ptp",
        Shape::Calico => "calico",
        Shape::AwsVpc => "aws-vpc",
    }
}

fn service_yaml(name: &str, cluster_ip: Ipv4Addr, node_port: Option<u16>) -> String {
    let (kind, node_port) = match node_port {
        Some(p) => ("NodePort", format!(", nodePort: {p}")),
        None => ("ClusterIP", String::new()),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  type: {kind}\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  \
         ipFamilies: [IPv4]\n  ports:\n  - {{name: tcp, port: 80, targetPort: {BACKEND_PORT}, \
         protocol: TCP{node_port}}}\n"
    )
}

/// EndpointSlice `name` of Service `service`: `addrs`, all on node-a.
fn slice_yaml(name: &str, service: &str, addrs: &[Ipv4Addr]) -> String {
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: IPv4\nports: [{{name: tcp, port: {BACKEND_PORT}, protocol: TCP}}]\n\
         endpoints:\n"
    );
    for a in addrs {
        out.push_str(&format!("- {{addresses: [\"{a}\"], nodeName: {NODE}}}\n"));
    }
    out
}

/// Part 3's pod address `i`: 10.244.100.1 .. 10.244.100.250, 10.244.101.1, ...
fn veth_ip(i: usize) -> Ipv4Addr {
    let third = u8::try_from(100 + i / 250).expect("at most 38750 veths");
    Ipv4Addr::new(10, 244, third, (1 + i % 250) as u8)
}

/// One TCP_CRR run of `loadgen` from `netns` (outside any hooked cgroup).
struct Crr {
    rate: f64,
    cpu: f64,
    valid: bool,
    note: String,
}

fn crr(netns: &str, to: SocketAddrV4, secs: f64, cpu: usize) -> anyhow::Result<Crr> {
    check_stop()?;
    let cmd = command_in(
        &Placement {
            netns,
            cgroup_procs: None,
        },
        &workspace_binary("loadgen"),
        &["crr", &to.to_string(), &format!("{secs}"), &cpu.to_string()],
    );
    let (_, stdout) = run_bounded(cmd, Duration::from_secs_f64(secs + 20.0))?;
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("loadgen output {stdout:?}"))?;
    let ops = v["ops"].as_u64().unwrap_or(0);
    let errors = v["errors"].as_u64().unwrap_or(0);
    let note = if errors > 0 {
        format!(
            "{errors} errors (first: {})",
            v["first_error"].as_str().unwrap_or("?")
        )
    } else if ops == 0 {
        "no connections completed".into()
    } else {
        String::new()
    };
    Ok(Crr {
        rate: v["rate"].as_f64().unwrap_or(0.0),
        cpu: v["cpu"].as_f64().unwrap_or(0.0),
        valid: note.is_empty(),
        note,
    })
}

/// Part 1: builds the bridge and ptp testbeds (one backend pod behind a NodePort each), runs
/// the paired measurements, removes the bridge testbed and `ext`'s direct route, and returns
/// the ptp testbed for part 2.
fn external(plan: &Plan, out: &mut PodNetReport) -> anyhow::Result<Bed> {
    let mut beds = Vec::new();
    for shape in [Shape::Bridge, Shape::Ptp] {
        eprintln!(
            "    {}: testbed, agent, a NodePort Service with one node-a pod",
            shape_name(shape)
        );
        beds.push(external_bed(shape, plan)?);
    }
    let nodeport = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let pod = SocketAddrV4::new(pod_ip4(0, 0), BACKEND_PORT);
    eprintln!(
        "    {} paired direct/bpf TCP_CRR runs of {} s per shape (client CPU {}, server CPU {})",
        plan.pairs, plan.pair_secs, plan.client_cpu, plan.server_cpu
    );
    // (ratios, direct rates, bpf rates, direct cpu, bpf cpu, invalid, first note) per bed.
    let mut acc: Vec<Acc> = beds.iter().map(|_| Acc::default()).collect();
    for pair in 0..plan.pairs {
        for i in 0..beds.len() {
            let k = (i + pair) % beds.len();
            let waited = beds[k].drain_conntrack()?;
            out.ct_drain_secs.push(waited);
            let ext = beds[k].tb.ext.path();
            let run = |to| crr(&ext, to, plan.pair_secs, plan.client_cpu);
            let (d, b) = if pair % 2 == 0 {
                let d = run(pod)?;
                (d, run(nodeport)?)
            } else {
                let b = run(nodeport)?;
                (run(pod)?, b)
            };
            let a = &mut acc[k];
            if d.valid && b.valid && d.rate > 0.0 {
                a.ratios.push(b.rate / d.rate);
                a.direct.push(d.rate);
                a.bpf.push(b.rate);
                a.direct_cpu.push(d.cpu);
                a.bpf_cpu.push(b.cpu);
            } else {
                a.invalid += 1;
                for (what, r) in [("direct", &d), ("bpf", &b)] {
                    if !r.valid {
                        eprintln!(
                            "    {} pair {}: {what} invalid: {}",
                            beds[k].name(),
                            pair + 1,
                            r.note
                        );
                        a.notes.push(format!("{what}: {}", r.note));
                    }
                }
            }
        }
    }
    for (bed, a) in beds.iter().zip(acc) {
        let status = bed.status()?;
        let tc = interfaces(&status)?
            .into_iter()
            .map(|(i, why)| format!("{i} ({why})"))
            .collect();
        let counters = nonzero_counters(&status);
        let median = |v: &[f64]| Summary::of(v).map(|s| s.p50);
        let row = ShapeRow {
            shape: bed.name().into(),
            tc_interfaces: tc,
            counters,
            direct_rate_median: median(&a.direct),
            bpf_rate_median: median(&a.bpf),
            direct_cpu_median: median(&a.direct_cpu),
            bpf_cpu_median: median(&a.bpf_cpu),
            summary: Summary::of(&a.ratios),
            ratios: a.ratios,
            invalid: a.invalid,
            note: a.notes.join("; "),
        };
        eprintln!(
            "    {}: bpf/direct {}",
            row.shape,
            row.summary
                .as_ref()
                .map_or("no valid pair".into(), |s| format!(
                    "{:.3} [{:.3}-{:.3}] over {}",
                    s.p50, s.min, s.max, s.n
                ))
        );
        out.external.push(row);
    }
    let ptp = beds.pop().context("the ptp testbed")?;
    drop(beds);
    ptp.tb.ext.ip(&["route", "del", POD_CIDR]);
    Ok(ptp)
}

#[derive(Default)]
struct Acc {
    ratios: Vec<f64>,
    direct: Vec<f64>,
    bpf: Vec<f64>,
    direct_cpu: Vec<f64>,
    bpf_cpu: Vec<f64>,
    invalid: usize,
    /// `config: why` of every invalid run.
    notes: Vec<String>,
}

/// One shape's testbed for part 1: its pod served by `loadgen`, the NodePort programmed and
/// answering, `ext` routing the pod CIDR via node-a.
fn external_bed(shape: Shape, plan: &Plan) -> anyhow::Result<Bed> {
    let mut bed = Bed::new(shape, 1)?;
    let pod_ns = bed.tb.nodes[0].pods[0].ns.path();
    let cmd = command_in(
        &Placement {
            netns: &pod_ns,
            cgroup_procs: None,
        },
        &workspace_binary("loadgen"),
        &[
            "serve",
            &BACKEND_PORT.to_string(),
            &plan.server_cpu.to_string(),
            &pod_ns,
        ],
    );
    bed.server = Some(ChildGuard::spawn_ready(
        &format!("loadgen server in the {} testbed", bed.name()),
        cmd,
    ));
    let ext = &bed.tb.ext;
    ext.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    ext.ip(&["route", "add", POD_CIDR, "via", &NODE_IP.to_string()]);
    let pod = &bed.tb.nodes[0].pods[0];
    let (pod_ip, host_if) = (pod.ip4, pod.host_if.clone());
    bed.agent.write_manifest(
        "svc.yaml",
        &service_yaml("podnet", Ipv4Addr::new(10, 96, 0, 10), Some(NODE_PORT)),
    );
    bed.agent
        .write_manifest("slice.yaml", &slice_yaml("podnet-1", "podnet", &[pod_ip]));
    let interface = match shape {
        Shape::Bridge => "br0".to_string(),
        _ => host_if,
    };
    // From the agent's start: it may have found the pod by its network namespace (and put tc
    // on its interface) before the slice named it.
    wait_log(
        &bed.agent,
        0,
        &format!("attached at ingress of {interface} "),
        Duration::from_secs(20),
    )?;
    // Both paths answer (the sync may follow the attach by a moment).
    let ext = bed.tb.ext.path();
    for to in [
        SocketAddrV4::new(NODE_IP, NODE_PORT),
        SocketAddrV4::new(pod_ip, BACKEND_PORT),
    ] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Short: its flows stay in the connection tracking for 10-20 s (see `drain_conntrack`).
            let r = crr(&ext, to, 0.05, plan.client_cpu)?;
            if r.valid {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{}: {to} does not answer `ext`: {}", bed.name(), r.note);
            }
            super::nap(Duration::from_millis(200))?;
        }
    }
    Ok(bed)
}

/// Lines of `ip -ts monitor link route` in a namespace, with their timestamps (UTC), while it
/// lives; the monitor is killed on drop.
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(ns: &NetNs) -> anyhow::Result<Monitor> {
        let mut child = Command::new("ip")
            .args(["-ts", "-n", &ns.name, "monitor", "link", "route"])
            .env("TZ", "UTC")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn ip monitor")?;
        let stdout = child.stdout.take().context("ip monitor stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("monitor lock").push(line);
            }
        });
        // Let it subscribe before anything it should see happens.
        super::nap(Duration::from_millis(300))?;
        Ok(Monitor { child, lines })
    }

    /// The timestamp of the first line satisfying `matches`, waiting up to `timeout` for it.
    fn find(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .lines
                .lock()
                .expect("monitor lock")
                .iter()
                .find(|l| matches(l))
                .and_then(|l| parse_utc(l));
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Part 2 on the ptp testbed: `plan.attach_samples` pods whose slice comes first (timed from
/// the veth's appearance) and as many whose slice comes right after the pod (timed from the
/// slice), interleaved.
fn attach_latency(mut bed: Bed, plan: &Plan, out: &mut PodNetReport) -> anyhow::Result<()> {
    eprintln!(
        "    ptp: {} pods added one at a time (slice first, then the pod; and the pod, then its \
         slice)",
        2 * plan.attach_samples
    );
    let monitor = Monitor::start(bed.node_ns())?;
    let pos = bed.agent.log_position();
    bed.agent.write_manifest(
        "churn.yaml",
        &service_yaml("churn", Ipv4Addr::new(10, 96, 0, 11), None),
    );
    wait_log(&bed.agent, pos, "synced:", Duration::from_secs(10))?;
    let mut jitter = Jitter::new();
    let (mut veth, mut route, mut call, mut add, mut slice) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for k in 0..2 * plan.attach_samples {
        check_stop()?;
        let slice_first = k % 2 == 0;
        let index = bed.tb.nodes[0].pods.len();
        let ip = pod_ip4(0, index);
        let name = format!("churn-{index}");
        let yaml = slice_yaml(&name, "churn", &[ip]);
        let file = format!("{name}.yaml");
        if slice_first {
            let pos = bed.agent.log_position();
            bed.agent.write_manifest(&file, &yaml);
            wait_log(&bed.agent, pos, "synced:", Duration::from_secs(10))?;
        }
        // A random phase of the manifests source's 100 ms poll.
        super::nap(Duration::from_millis(jitter.below(100)))?;
        let pos = bed.agent.log_position();
        let called = now();
        let started = Instant::now();
        let got = bed.tb.add_pod(0);
        let add_ms = started.elapsed().as_secs_f64() * 1e3;
        let pod = &bed.tb.nodes[0].pods[got];
        if pod.ip4 != ip {
            bail!("pod {got} got {} (expected {ip})", pod.ip4);
        }
        let host_if = pod.host_if.clone();
        if !slice_first {
            bed.agent.write_manifest(&file, &yaml);
        }
        let line = wait_log(
            &bed.agent,
            pos,
            &format!("attached at ingress of {host_if} "),
            Duration::from_secs(10),
        )?;
        let attached = parse_utc(&line).unwrap_or_else(now);
        if slice_first {
            call.push((attached - called) * 1e3);
            add.push(add_ms);
            let appeared = monitor.find(Duration::from_secs(2), |l| {
                !l.contains("Deleted") && l.contains(&format!(": {host_if}@"))
            });
            let routed = monitor.find(Duration::from_secs(2), |l| {
                !l.contains("Deleted") && l.contains(&format!("{ip} dev {host_if} "))
            });
            if let Some(t) = appeared {
                veth.push((attached - t) * 1e3);
            }
            if let Some(t) = routed {
                route.push((attached - t) * 1e3);
            }
        } else {
            // The agent finds the pod by its network namespace, slice or not.
            slice.push((attached - called) * 1e3);
        }
    }
    drop(monitor);
    let mut row = |what: &str, samples: Vec<f64>| {
        let summary = Summary::of(&samples);
        if let Some(s) = &summary {
            eprintln!(
                "    {what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
                s.p50, s.p99, s.max, s.n
            );
        }
        out.attach.push(LatencyRow {
            what: what.into(),
            samples,
            summary,
        });
    };
    row(
        "slice first: the pod's veth appears -> tc attached at ingress of it",
        veth,
    );
    row(
        "slice first: the pod's /32 route appears -> tc attached",
        route,
    );
    row(
        "slice first: add_pod called (namespace, veth, addresses, routes) -> tc attached",
        call,
    );
    row(
        "(add_pod itself: namespace, veth, addresses, routes, ethtool)",
        add,
    );
    row(
        "pod first (its slice written after): add_pod called -> tc attached at ingress of its \
         veth (the agent finds the pod by its network namespace)",
        slice,
    );
    Ok(())
}

/// Part 3: `plan.veths` host-side veths with /32 routes, then one slice listing all their
/// addresses.
fn many_veths(plan: &Plan, out: &mut PodNetReport) -> anyhow::Result<()> {
    let n = plan.veths;
    eprintln!("    ptp: {n} pod veths (peers in one extra namespace), one slice listing them");
    let mut bed = Bed::new(Shape::Ptp, 0)?;
    let peers = NetNs::new(format!("{}-peers", bed.tb.id));
    let (rss_start, _) = bed.rss()?;
    let pos = bed.agent.log_position();
    bed.agent.write_manifest(
        "many.yaml",
        &service_yaml("many", Ipv4Addr::new(10, 96, 0, 12), None),
    );
    wait_log(&bed.agent, pos, "synced:", Duration::from_secs(10))?;

    let node = bed.node_ns().name.clone();
    let started = Instant::now();
    let mut links = String::new();
    let mut ups = String::new();
    let mut routes = String::new();
    for i in 0..n {
        links.push_str(&format!(
            "link add pveth{i} type veth peer name p{i} netns {}\n",
            peers.name
        ));
        ups.push_str(&format!("link set p{i} up\n"));
        routes.push_str(&format!(
            "link set pveth{i} up\nroute add {}/32 dev pveth{i} scope link\n",
            veth_ip(i)
        ));
    }
    ip_batch(&node, &links)?;
    ip_batch(&peers.name, &ups)?;
    ip_batch(&node, &routes)?;
    let create_ms = started.elapsed().as_secs_f64() * 1e3;
    // Let the agent digest the link and route events (nothing to attach: no endpoints yet).
    super::nap(Duration::from_secs(2))?;
    let needle = "attached at ingress of pveth";
    if bed.agent.count_logs(pos, needle) != 0 {
        bail!("tc attached to a pod veth before any endpoint named it");
    }
    let (rss_before, _) = bed.rss()?;

    let addrs: Vec<Ipv4Addr> = (0..n).map(veth_ip).collect();
    let yaml = slice_yaml("many-1", "many", &addrs);
    let tmp = bed.agent.manifests.join(".many-1.yaml.tmp");
    fs::write(&tmp, yaml).context("write the slice")?;
    let pos = bed.agent.log_position();
    let written = now();
    let clock = Instant::now();
    fs::rename(&tmp, bed.agent.manifests.join("many-1.yaml")).context("rename the slice")?;
    let deadline = clock + Duration::from_secs(90);
    let mut attached = 0;
    while attached < n {
        check_stop()?;
        attached = bed.agent.count_logs(pos, needle);
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let observed_ms = clock.elapsed().as_secs_f64() * 1e3;
    let lines: Vec<String> = bed
        .agent
        .logs_since(pos)
        .into_iter()
        .filter(|l| l.contains(needle))
        .collect();
    let times: Vec<f64> = lines.iter().filter_map(|l| parse_utc(l)).collect();
    let per_attach: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.rsplit(" in ").next())
        .filter_map(super::parse_duration_ms)
        .collect();
    let first = times.iter().copied().reduce(f64::min);
    let last = times.iter().copied().reduce(f64::max);
    // Settle (the sync after the attaches), then count what `status` lists and read the RSS.
    super::nap(Duration::from_millis(500))?;
    let listed = bed
        .tc_interfaces()?
        .iter()
        .filter(|(i, why)| i.starts_with("pveth") && why.starts_with("pod"))
        .count();
    let (rss_after, peak) = bed.rss()?;
    let row = ScaleRow {
        veths: n,
        create_ms,
        attached: lines.len(),
        status_pod_interfaces: listed,
        first_attached_ms: first.map(|t| (t - written) * 1e3),
        all_attached_ms: last
            .filter(|_| lines.len() >= n)
            .map(|t| (t - written) * 1e3),
        observed_ms,
        per_attach: Summary::of(&per_attach),
        per_attach_ms: per_attach,
        rss_start_bytes: rss_start,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        peak_rss_bytes: peak,
    };
    eprintln!(
        "    {n} veths: {} attached ({} listed by status), slice -> all attached {}; RSS {:.1} -> \
         {:.1} MiB",
        row.attached,
        row.status_pod_interfaces,
        row.all_attached_ms
            .map_or("not reached".into(), |v| format!("{v:.0} ms")),
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    out.scale = Some(row);
    if lines.len() < n {
        bail!("only {} of {n} pod veths attached within 90 s", lines.len());
    }
    // The agent first, then the peers' namespace, then the testbed.
    drop(bed);
    drop(peers);
    Ok(())
}

/// `ip -n NS -batch FILE` with `commands` (one a line).
fn ip_batch(ns: &str, commands: &str) -> anyhow::Result<()> {
    let file = std::env::temp_dir().join(format!("{}-ip-batch", tests::harness::names::unique()));
    fs::write(&file, commands).with_context(|| format!("write {}", file.display()))?;
    let result = run_bounded(ip_command(ns, &file), Duration::from_secs(120));
    let _ = fs::remove_file(&file);
    result.map(|_| ())
}

fn ip_command(ns: &str, file: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns, "-batch"]).arg(file);
    cmd
}

/// The 1-minute load average of /proc/loadavg.
fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Seconds since the epoch, now.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds since the epoch of the UTC timestamp that starts `line`: the agent's log lines
/// (`2026-01-02T03:04:05.123456Z  INFO ...`) and `ip -ts monitor` under TZ=UTC
/// (`[2026-01-02T03:04:05.123456] ...`).
fn parse_utc(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let stamp = stamp.trim_start_matches('[').trim_end_matches(']');
    let stamp = stamp.strip_suffix('Z').unwrap_or(stamp);
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 {
        return None;
    }
    // Days from 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn utc_timestamps_of_the_agent_and_ip_monitor() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z x"), Some(0.0));
        let agent = parse_utc(
            "2026-12-03T05:31:52.580053Z  INFO kube_bpf_proxy::datapath::podif: tc attached",
        )
        .unwrap();
        // date -u -d 2026-12-03T05:31:52Z +%s
        assert!((agent - 1_796_275_912.580053).abs() < 1e-5, "{agent}");
        let ip = parse_utc("[2024-02-29T23:59:59.5] 3: va@vb: <UP>").unwrap();
        assert!((ip - 1_709_251_199.5).abs() < 1e-6, "{ip}");
        assert_eq!(parse_utc("agent: no timestamp"), None);
    }

    #[test]
    fn veth_addresses_stay_out_of_the_pod_cidrs_in_use() {
        assert_eq!(veth_ip(0), Ipv4Addr::new(10, 244, 100, 1));
        assert_eq!(veth_ip(249), Ipv4Addr::new(10, 244, 100, 250));
        assert_eq!(veth_ip(250), Ipv4Addr::new(10, 244, 101, 1));
        assert_eq!(veth_ip(VETHS - 1), Ipv4Addr::new(10, 244, 101, 250));
        let all: std::collections::BTreeSet<_> = (0..VETHS).map(veth_ip).collect();
        assert_eq!(all.len(), VETHS);
    }

    fn report(only: bool) -> super::super::report::Report {
        let settings = Settings {
            quick: false,
            services: if only { Vec::new() } else { vec![100] },
            endpoints: 10,
            secs: 1.0,
            reps: 3,
            pairs: 8,
            close_pairs: 32,
            pair_secs: 0.5,
            full_sync_reps: 3,
            change_samples: 40,
            client_cpu: 0,
            server_cpu: 1,
            only_pod_networks: only,
            only_control_plane: false,
            only_pps: false,
            agent_args: Vec::new(),
        };
        let machine = super::super::report::Machine {
            cpus: 2,
            kernel: "6.1".into(),
            cpu_model: "test".into(),
        };
        super::super::report::Report::new(machine, settings)
    }

    #[test]
    fn pod_networks_section_alone_and_in_a_full_report() {
        let mut pods = PodNetReport {
            pairs: 2,
            pair_secs: 0.5,
            ..PodNetReport::default()
        };
        for (shape, r) in [("bridge", 0.9), ("ptp", 0.99)] {
            pods.external.push(ShapeRow {
                shape: shape.into(),
                tc_interfaces: vec!["eth0 (external)".into()],
                counters: Vec::new(),
                direct_rate_median: Some(7000.0),
                bpf_rate_median: Some(7000.0 * r),
                direct_cpu_median: Some(0.8),
                bpf_cpu_median: Some(0.8),
                ratios: vec![r, r],
                summary: Summary::of(&[r, r]),
                invalid: 0,
                note: String::new(),
            });
        }
        pods.attach.push(LatencyRow {
            what: "veth -> attached".into(),
            samples: vec![10.0, 20.0],
            summary: Summary::of(&[10.0, 20.0]),
        });
        for (config, xdp, rate) in [("tc", "off", 1.0e6), ("xdp", "driver", 2.5e6)] {
            pods.pps_gen.push(super::super::report::PpsRow {
                config: config.into(),
                family: "IPv4".into(),
                xdp: xdp.into(),
                direct_sent: Some(1.2e6),
                direct_delivered: Some(1.2e6),
                sent: Some(rate),
                delivered: Some(rate),
                delivered_runs: vec![rate],
                summary: Summary::of(&[rate / 1.2e6]),
                counters: Vec::new(),
                program_ns: Vec::new(),
            });
        }
        let mut alone = report(true);
        alone.pod_networks = Some(pods.clone());
        alone.finish();
        assert!(alone.targets.is_empty());
        let md = alone.markdown();
        assert!(md.starts_with("## Pod networks\n"), "{md}");
        assert!(md.contains("--pod-networks"));
        assert!(
            md.contains("| ptp | 7000 (80%) | 6930 (80%) | 0.990 [0.990-0.990] over 2 pairs |")
        );
        assert!(md.contains("ptp vs bridge: 1.100"));
        assert!(md.contains("| veth -> attached | 15.0 | 20.0 | 20.0 | 2 |"));
        assert!(md.contains("### Packets per second through node-a alone"));
        assert!(
            md.contains("IPv4: XDP / tc, delivered packets per second: 2.50 (target >= 2)."),
            "{md}"
        );
        assert!(!md.contains("### Targets"));

        let mut full = report(false);
        full.pod_networks = Some(pods);
        full.finish();
        let md = full.markdown();
        assert!(md.starts_with("## Performance\n"));
        let targets = md.find("### Targets").unwrap();
        let pods = md.find("## Pod networks").unwrap();
        assert!(pods > targets);
        assert!(md.contains("Measured in the same run"));
    }

    /// A kernel that refuses the generator's live-frame mode: its part says so, the rest of the
    /// report stands.
    #[test]
    fn a_refused_frame_generator_is_reported_as_not_measured() {
        let pods = PodNetReport {
            pairs: 2,
            pair_secs: 0.5,
            pps_gen_skipped: Some("this kernel refuses it (EPERM)".into()),
            ..PodNetReport::default()
        };
        let mut alone = report(true);
        alone.pod_networks = Some(pods);
        alone.finish();
        let md = alone.markdown();
        assert!(
            md.contains(
                "### Packets per second through node-a alone: an XDP frame generator\n\n\
                 Not measured: this kernel refuses it (EPERM)."
            ),
            "{md}"
        );
    }

    #[test]
    fn reports_written_before_the_pod_networks_render() {
        let mut v = serde_json::to_value(report(false)).unwrap();
        v.as_object_mut().unwrap().remove("pod_networks");
        v["settings"]
            .as_object_mut()
            .unwrap()
            .remove("only_pod_networks");
        let mut old: super::super::report::Report = serde_json::from_value(v).unwrap();
        assert!(old.pod_networks.is_none() && !old.settings.only_pod_networks);
        old.finish();
        let md = old.markdown();
        assert!(md.contains("### Targets") && !md.contains("Pod networks"));
    }

    #[test]
    fn slice_lists_every_address_on_this_node() {
        let y = slice_yaml("s", "svc", &[veth_ip(0), veth_ip(1)]);
        assert!(y.contains("kubernetes.io/service-name: svc"));
        assert_eq!(y.matches("nodeName: node-a").count(), 2);
        assert!(y.contains("\"10.244.100.2\""));
        let s = service_yaml("svc", Ipv4Addr::new(10, 96, 0, 10), Some(NODE_PORT));
        assert!(s.contains("type: NodePort") && s.contains("nodePort: 30080"));
    }
}
