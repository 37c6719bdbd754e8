//! Part of `cargo xtask bench --pod-networks`: packets per second through node-a, XDP against
//! tc against the kernel's own forwarding (issue #23).
//!
//! A two-node `tests::Testbed` (bridge shape): the external client `ext` floods one UDP flow
//! (`loadgen flood`: 18-byte datagrams, 64 per sendmmsg) at node-a's NodePort 192.168.77.1:30090,
//! whose one backend is node-b's pod 10.244.1.2 (externalTrafficPolicy Cluster: node-a
//! translates, masquerades and sends the packet back out of `eth0` towards node-b). What
//! arrives is counted at the backend pod's `eth0` (its `rx_packets`; `loadgen sink` binds the
//! port there and never reads, so no ICMP error and no reply goes back). Configurations:
//! - `xdp`: the agent with `--xdp driver` (native XDP on node-a's veth `eth0`; its LAN-side
//!   peer carries an XDP_PASS program, without which a veth's native XDP_TX never wakes the
//!   peer to take the frames);
//! - `tc`: the agent with `--xdp off`;
//! - `nftables`, `iptables-nft`: no agent; node-a holds kube-proxy's rules for the same
//!   Service in its nftables mode (`ip`/`ip6 kube-proxy` tables: the NodePort map, the
//!   external chain marking for masquerading, the Service and endpoint chains, DNAT, the
//!   masquerading postrouting chain) or its iptables mode (KUBE-NODEPORTS, KUBE-EXT-,
//!   KUBE-SVC-, KUBE-SEP-, KUBE-MARK-MASQ, KUBE-POSTROUTING), both families;
//! - `direct`: the pod's own address, routed by `ext` via node-a and forwarded by node-a's
//!   kernel, past the same programs or rules (untranslated), as the baseline.
//!
//! The sender and every hop run in softirq on the sender's CPU (veth has no queue of its own):
//! the figure is the whole chain's cost per packet, of which node-a's program is one part.
//!
//! Then node-a alone: the same configurations fed by an XDP frame generator (`xdpgen`) that
//! injects the frames into node-a's `eth0` from its LAN-side peer and BPF programs on that peer
//! that count and drop what node-a sends on to the backend, so the sender's socket, routing and
//! queueing and the hops after node-a no longer make up most of each packet's cost.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use tests::{
    Agent, ChildGuard, NetNs, Shape, Testbed,
    harness::{
        process::{Placement, command_in, workspace_binary},
        testbed::{EXT_IP4, EXT_IP6},
    },
};

use super::{
    check_stop,
    podnet::{BACKEND_PORT, NODE, NODE_IP, node_status, nonzero_counters},
    report::{PodNetReport, PpsRow, Summary},
    run_bounded, wait_log, xdpgen,
};

const NODE_PORT: u16 = 30090;
/// node-b's pod CIDRs, routed via node-a in `ext` for the direct runs.
const POD_CIDR_B: &str = "10.244.1.0/24";
const POD_CIDR6_B: &str = "fd00:244:1::/64";
/// node-a's IPv6 LAN address.
const NODE_IP6: &str = "fd00:77::1";

/// Runs the part: `pairs` back-to-back pairs of `secs`-second floods per configuration against
/// `direct`, the sender pinned to `cpu`.
pub fn run(pairs: usize, secs: f64, cpu: usize, out: &mut PodNetReport) -> anyhow::Result<()> {
    eprintln!(
        "    packets per second: ext floods node-a's UDP NodePort, backend on node-b; \
         {pairs} pairs of {secs} s per configuration"
    );
    // The kernel's per-program run time and count (bpftool's run_time_ns, run_cnt): off for
    // the measured pairs (it reads the clock twice per program run, which the peers' rules
    // would not pay), on for one extra NodePort run per configuration (`program_ns_over`).
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(BPF_STATS, self.0.trim());
        }
    }
    let _restore = Restore(std::fs::read_to_string(BPF_STATS).unwrap_or_default());
    let _ = std::fs::write(BPF_STATS, "0");
    measure(pairs, secs, cpu, out)
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Nanoseconds per run of each of node-a's programs (XDP, tc ingress, tc egress); `None` for a
/// program that did not run.
type ProgramNs = Vec<(String, Option<f64>)>;

/// `f`'s result and node-a's programs' nanoseconds per run over it, the kernel's run-time
/// statistics switched on for it alone.
fn program_ns_over<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, ProgramNs)> {
    let _ = std::fs::write(BPF_STATS, "1");
    let before = program_stats();
    let r = f();
    let after = program_stats();
    let _ = std::fs::write(BPF_STATS, "0");
    let ns = ["xdp_ingress", "tc_ingress", "tc_egress"]
        .into_iter()
        .map(|name| {
            let (t, n) = after.get(name).copied().unwrap_or((0, 0));
            let (t0, n0) = before.get(name).copied().unwrap_or((0, 0));
            let (t, n) = (t.saturating_sub(t0), n.saturating_sub(n0));
            (name.to_string(), (n > 0).then(|| t as f64 / n as f64))
        })
        .collect();
    Ok((r?, ns))
}

/// Run time (ns) and run count of every loaded BPF program, summed by program name.
fn program_stats() -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(o) = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
    else {
        return out;
    };
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    for p in list.as_array().into_iter().flatten() {
        let (Some(name), Some(t), Some(n)) = (
            p["name"].as_str(),
            p["run_time_ns"].as_u64(),
            p["run_cnt"].as_u64(),
        ) else {
            continue;
        };
        let e = out.entry(name.to_string()).or_insert((0, 0));
        e.0 += t;
        e.1 += n;
    }
    out
}

fn measure(pairs: usize, secs: f64, cpu: usize, out: &mut PodNetReport) -> anyhow::Result<()> {
    let tb = Testbed::with_shape(&[1, 1], Shape::Bridge);
    let pod = &tb.nodes[1].pods[0];
    let pod_ns = pod.ns.path();
    let _sink = ChildGuard::spawn_ready(
        "loadgen sink in node-b's pod",
        command_in(
            &Placement {
                netns: &pod_ns,
                cgroup_procs: None,
            },
            &workspace_binary("loadgen"),
            &["sink", &BACKEND_PORT.to_string(), &pod_ns],
        ),
    );
    // The direct flood goes into node-a and back out of the same interface: without these,
    // node-a would send `ext` an ICMP redirect and `ext` would send straight to node-b from
    // then on, so the baseline would not cross node-a at all.
    for key in ["all", "eth0"] {
        tb.nodes[0]
            .ns
            .sysctl(&format!("net.ipv4.conf.{key}.send_redirects"), "0");
        tb.ext
            .sysctl(&format!("net.ipv4.conf.{key}.accept_redirects"), "0");
        tb.ext
            .sysctl(&format!("net.ipv6.conf.{key}.accept_redirects"), "0");
    }
    tb.ext
        .ip(&["route", "add", POD_CIDR_B, "via", &NODE_IP.to_string()]);
    // Native XDP_TX on a veth queues the frame for the peer, whose NAPI is woken only if the
    // peer has an XDP program of its own: an XDP_PASS program on the LAN side of node-a's
    // eth0 (a real NIC has its own queues).
    xdp_pass_on(&tb.lan, &format!("v-{NODE}"), &tb.id)?;
    tb.ext
        .ip(&["-6", "route", "add", POD_CIDR6_B, "via", NODE_IP6]);
    let families = [
        (
            "IPv4",
            format!("{NODE_IP}:{NODE_PORT}"),
            format!("{}:{BACKEND_PORT}", pod.ip4),
        ),
        (
            "IPv6",
            format!("[{NODE_IP6}]:{NODE_PORT}"),
            format!("[{}]:{BACKEND_PORT}", pod.ip6),
        ),
    ];
    for (config, xdp) in CONFIGS {
        check_stop()?;
        let Some((peer, agent)) = datapath(&tb, config, xdp)? else {
            continue;
        };
        let ext = tb.ext.path();
        for (family, nodeport, direct) in &families {
            // Both paths deliver before anything is measured (tc may attach a moment after the
            // first sync).
            for to in [nodeport, direct] {
                let mut tries = 0;
                while flood(&ext, &pod.ns, to, 0.1, cpu)?.1 == 0 {
                    tries += 1;
                    if tries == 50 {
                        bail!(
                            "{config} {family}: nothing sent to {to} reached node-b's pod (the agent's \
                         counters: {:?}; node-a eth0: {}; lan side: {}; the agent's last \
                         lines: {})",
                            agent
                                .as_ref()
                                .map(|a| status_counters(&tb, a).unwrap_or_default())
                                .unwrap_or_default(),
                            tb.nodes[0]
                                .ns
                                .exec("ethtool", &["-S", "eth0"])
                                .split_whitespace()
                                .collect::<Vec<_>>()
                                .join(" "),
                            tb.lan
                                .exec("ethtool", &["-S", &format!("v-{NODE}")])
                                .split_whitespace()
                                .collect::<Vec<_>>()
                                .join(" "),
                            agent.as_ref().map_or(String::new(), |a| a
                                .logs_since(a.log_position().saturating_sub(8))
                                .join(" | "))
                        );
                    }
                    super::nap(Duration::from_millis(200))?;
                }
            }
            let once = |to: &str| {
                flood(&ext, &pod.ns, to, secs, cpu).map(|(sent, got)| Run { sent, got, secs })
            };
            let rates = pairs_of(pairs, 0, || once(direct), || once(nodeport))?;
            let (_, program_ns) = program_ns_over(|| once(nodeport))?;
            let counters = match &agent {
                Some(a) => status_counters(&tb, a)?,
                None => Vec::new(),
            };
            let row = rates.row(config, family, xdp, counters, program_ns);
            print_row(&row, "");
            out.pps.push(row);
        }
        drop(agent);
        drop(peer);
    }
    tb.ext.ip(&["route", "del", POD_CIDR_B]);
    tb.ext.ip(&["-6", "route", "del", POD_CIDR6_B]);
    if let Some(why) = xdpgen::live_frames_refused() {
        eprintln!("    packets per second, node-a alone: not measured: {why}");
        out.pps_gen_skipped = Some(why);
        return Ok(());
    }
    generated(&tb, pairs, secs, cpu, out)
}

/// One flood or generator run: packets sent, packets delivered, over `secs`.
struct Run {
    sent: u64,
    got: u64,
    secs: f64,
}

/// The per-second rates of back-to-back direct/NodePort pairs, and their paired ratios.
#[derive(Default)]
struct Rates {
    sent_direct: Vec<f64>,
    got_direct: Vec<f64>,
    sent: Vec<f64>,
    got: Vec<f64>,
    ratios: Vec<f64>,
}

impl Rates {
    /// Adds `other`'s pairs.
    fn extend(&mut self, other: Rates) {
        self.sent_direct.extend(other.sent_direct);
        self.got_direct.extend(other.got_direct);
        self.sent.extend(other.sent);
        self.got.extend(other.got);
        self.ratios.extend(other.ratios);
    }

    /// The row of `config`'s NodePort runs against direct (medians over the pairs).
    fn row(
        self,
        config: &str,
        family: &str,
        xdp: &str,
        counters: Vec<(String, u64)>,
        program_ns: ProgramNs,
    ) -> PpsRow {
        let median = |v: &[f64]| Summary::of(v).map(|s| s.p50);
        PpsRow {
            config: config.into(),
            family: family.into(),
            xdp: xdp.into(),
            direct_sent: median(&self.sent_direct),
            direct_delivered: median(&self.got_direct),
            sent: median(&self.sent),
            delivered: median(&self.got),
            summary: Summary::of(&self.ratios),
            delivered_runs: self.got,
            counters,
            program_ns,
        }
    }
}

/// `pairs` back-to-back pairs of a `direct` run and a `nodeport` run, which goes first
/// alternating per pair, counting pairs from `first` (a round's number when each round runs
/// one pair).
fn pairs_of(
    pairs: usize,
    first: usize,
    mut direct: impl FnMut() -> anyhow::Result<Run>,
    mut nodeport: impl FnMut() -> anyhow::Result<Run>,
) -> anyhow::Result<Rates> {
    let mut r = Rates::default();
    for pair in first..first + pairs {
        check_stop()?;
        let (d, b) = if pair % 2 == 0 {
            let d = direct()?;
            (d, nodeport()?)
        } else {
            let b = nodeport()?;
            (direct()?, b)
        };
        let per_sec = |n: u64, run: &Run| n as f64 / run.secs;
        r.sent_direct.push(per_sec(d.sent, &d));
        r.got_direct.push(per_sec(d.got, &d));
        r.sent.push(per_sec(b.sent, &b));
        r.got.push(per_sec(b.got, &b));
        if d.got > 0 {
            r.ratios.push(per_sec(b.got, &b) / per_sec(d.got, &d));
        }
    }
    Ok(r)
}

/// The progress line of a measured row (`what`: which part).
fn print_row(row: &PpsRow, what: &str) {
    eprintln!(
        "    {} {}{what}: delivered {:.0}/s (sent {:.0}/s), direct {:.0}/s; paired ratio {}",
        row.config,
        row.family,
        row.delivered.unwrap_or(0.0),
        row.sent.unwrap_or(0.0),
        row.direct_delivered.unwrap_or(0.0),
        row.summary.as_ref().map_or("-".into(), |s| format!(
            "{:.3} [{:.3}-{:.3}]",
            s.p50, s.min, s.max
        ))
    );
}

/// The configurations of `measure`, in one list.
const CONFIGS: [(&str, &str); 4] = [
    ("tc", "off"),
    ("xdp", "driver"),
    ("nftables", "-"),
    ("iptables-nft", "-"),
];

/// kube-proxy's rules (`nftables`, `iptables-nft`) or the agent (`tc`, `xdp`) on node-a for
/// `config`; `Ok(None)` when a peer's tools are missing (said on stderr).
fn datapath(
    tb: &Testbed,
    config: &str,
    xdp: &str,
) -> anyhow::Result<Option<(Option<PeerRules>, Option<Agent>)>> {
    let pod = &tb.nodes[1].pods[0];
    Ok(Some(match config {
        "nftables" | "iptables-nft" => match PeerRules::load(tb, config, pod.ip4, pod.ip6) {
            Ok(rules) => (Some(rules), None),
            Err(e) => {
                eprintln!("    {config}: skipped: {e:#}");
                return Ok(None);
            }
        },
        _ => (None, Some(start_agent(tb, xdp, pod.ip4, pod.ip6)?)),
    }))
}

/// Frames per generator run while calibrating, and the least a run may send.
const GEN_CALIBRATE: u64 = 64 * 1024;

/// Node-a alone: the configurations of `measure` fed by the XDP frame generator (`xdpgen`),
/// `pairs` rounds in which every configuration runs one back-to-back direct/NodePort pair of
/// about `secs` seconds per family, on `cpu`.
fn generated(
    tb: &Testbed,
    pairs: usize,
    secs: f64,
    cpu: usize,
    out: &mut PodNetReport,
) -> anyhow::Result<()> {
    eprintln!(
        "    packets per second, node-a alone: frames injected into node-a's eth0 by an XDP \
         generator, counted and dropped where node-a sends them; {pairs} pairs of about {secs} \
         s per configuration"
    );
    let lan_dev = format!("v-{NODE}");
    // GRO on gives node-a's `eth0` (a veth without XDP program in most configurations) the
    // NAPI instance that takes the generator's frames. Off first: adding an XDP program turned
    // GRO on without asking for it, so asking now would change nothing, and NAPI would go with
    // the program. The LAN side keeps GRO off: what node-a sends on is counted and dropped
    // there by the sink's programs before any stack processing (`xdpgen::Sink`: at tc for
    // skbs, at XDP for the frames of node-a's XDP), so no configuration pays for aggregating
    // packets nobody receives.
    tb.lan
        .ip(&["link", "set", "dev", &lan_dev, "xdpdrv", "off"]);
    tb.lan.exec("ethtool", &["-K", &lan_dev, "gro", "off"]);
    let node_ns = &tb.nodes[0].ns;
    node_ns.exec("ethtool", &["-K", "eth0", "gro", "off"]);
    node_ns.exec("ethtool", &["-K", "eth0", "gro", "on"]);
    let pod = &tb.nodes[1].pods[0];
    out.pps_gen_sink = "bpf".into();
    let sink = xdpgen::Sink::install(
        &tb.lan,
        &lan_dev,
        &tb.id,
        &[
            (pod.ip4.into(), BACKEND_PORT),
            (pod.ip6.into(), BACKEND_PORT),
        ],
    )?;
    let node_mac = xdpgen::mac_of(&tb.nodes[0].ns, "eth0")?;
    let lan_mac = xdpgen::mac_of(&tb.lan, &lan_dev)?;
    let frame = |src: std::net::IpAddr, dst: std::net::IpAddr, port: u16| {
        xdpgen::udp_frame(node_mac, lan_mac, src, dst, 40000, port, 18)
    };
    let node_ip6: std::net::Ipv6Addr = NODE_IP6.parse()?;
    let families = [
        (
            "IPv4",
            0,
            frame(EXT_IP4.into(), NODE_IP.into(), NODE_PORT)?,
            frame(EXT_IP4.into(), pod.ip4.into(), BACKEND_PORT)?,
        ),
        (
            "IPv6",
            1,
            frame(EXT_IP6.into(), node_ip6.into(), NODE_PORT)?,
            frame(EXT_IP6.into(), pod.ip6.into(), BACKEND_PORT)?,
        ),
    ];
    // One run of `count` frames, counted at the sink.
    let run = |frame: &[u8], counter: usize, count: u64| -> anyhow::Result<Run> {
        let before = sink.count(counter)?;
        let took = xdpgen::send(&tb.lan, &lan_dev, cpu, frame, count)?;
        super::nap(Duration::from_millis(50))?;
        Ok(Run {
            sent: count.div_ceil(xdpgen::BATCH) * xdpgen::BATCH,
            got: sink.count(counter)?.saturating_sub(before),
            secs: took.as_secs_f64(),
        })
    };
    // The configurations take turns, one pair per family each per round (their order rotated
    // per round): this VM's speed drifts by tens of percent over minutes, which would otherwise
    // land between configurations and decide their comparison.
    let mut configs: Vec<(&str, &str)> = CONFIGS.to_vec();
    let mut counts: std::collections::HashMap<(&str, &str), u64> = Default::default();
    let mut rates: std::collections::HashMap<(&str, &str), Rates> = Default::default();
    // The agent's counters and the programs' nanoseconds per run, from the last round.
    type Last = (Vec<(String, u64)>, ProgramNs);
    let mut last: std::collections::HashMap<(&str, &str), Last> = Default::default();
    // The rounds; what they measured is reported below even if one fails or is stopped.
    let mut rounds = || -> anyhow::Result<()> {
        for round in 0..pairs {
            let mut order = configs.clone();
            order.rotate_left(round % configs.len().max(1));
            eprintln!(
                "    round {} of {pairs}: {}",
                round + 1,
                order.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
            );
            for (config, xdp) in order {
                check_stop()?;
                let Some((peer, agent)) = datapath(tb, config, xdp)? else {
                    // A peer's tools are missing (said on stderr): not a transient state.
                    configs.retain(|c| c.0 != config);
                    continue;
                };
                // node-a's XDP sends frames back out with XDP_TX, and a veth's XDP_TX wakes
                // its peer only if that has an XDP program too: the sink's.
                sink.xdp(xdp == "driver")?;
                // Attaching it turned the LAN side's GRO on.
                tb.lan.exec("ethtool", &["-K", &lan_dev, "gro", "off"]);
                for (family, counter, nodeport, direct) in &families {
                    let key = (config, *family);
                    if let std::collections::hash_map::Entry::Vacant(slot) = counts.entry(key) {
                        let count = calibrate(
                            tb,
                            config,
                            family,
                            &agent,
                            &lan_dev,
                            |f, n| run(f, *counter, n),
                            [nodeport, direct],
                            secs,
                        )?;
                        slot.insert(count);
                    }
                    let count = counts[&key];
                    let pair = pairs_of(
                        1,
                        round,
                        || run(direct, *counter, count),
                        || run(nodeport, *counter, count),
                    )?;
                    rates.entry(key).or_default().extend(pair);
                    if round + 1 == pairs {
                        let (_, program_ns) = program_ns_over(|| run(nodeport, *counter, count))?;
                        let counters = match &agent {
                            Some(a) => status_counters(tb, a)?,
                            None => Vec::new(),
                        };
                        last.insert(key, (counters, program_ns));
                    }
                }
                drop(agent);
                drop(peer);
            }
        }
        Ok(())
    };
    let result = rounds();
    for (config, xdp) in CONFIGS {
        for (family, ..) in &families {
            let key = (config, *family);
            let Some(r) = rates.remove(&key) else {
                continue;
            };
            let (counters, program_ns) = last.remove(&key).unwrap_or_default();
            let row = r.row(config, family, xdp, counters, program_ns);
            print_row(&row, ", generated");
            out.pps_gen.push(row);
        }
    }
    result
}

/// Runs `run(frame, count)` until both `frames` (NodePort, direct) get through (and their
/// neighbours are resolved): the frames per run for about `secs` seconds at the slower one's
/// rate.
#[allow(clippy::too_many_arguments)]
fn calibrate(
    tb: &Testbed,
    config: &str,
    family: &str,
    agent: &Option<Agent>,
    lan_dev: &str,
    mut run: impl FnMut(&[u8], u64) -> anyhow::Result<Run>,
    frames: [&Vec<u8>; 2],
    secs: f64,
) -> anyhow::Result<u64> {
    let mut count = u64::MAX;
    for f in frames {
        let mut tries = 0;
        loop {
            let Run {
                sent,
                got,
                secs: took,
            } = run(f, GEN_CALIBRATE)?;
            if got * 2 >= sent {
                count = count.min(((sent as f64 / took) * secs) as u64);
                break;
            }
            tries += 1;
            if tries == 50 {
                let stats = |ns: &NetNs, dev: &str| {
                    ns.exec("ethtool", &["-S", dev])
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                bail!(
                    "{config} {family}: {got} of {sent} generated frames reached the sink (the \
                     agent's counters: {:?}; node-a eth0: {}; lan side: {})",
                    agent
                        .as_ref()
                        .map(|a| status_counters(tb, a).unwrap_or_default())
                        .unwrap_or_default(),
                    stats(&tb.nodes[0].ns, "eth0"),
                    stats(&tb.lan, lan_dev),
                );
            }
            super::nap(Duration::from_millis(200))?;
        }
    }
    Ok(count.max(GEN_CALIBRATE))
}

/// kube-proxy's rules for the flood Service in node-a's namespace, removed on drop.
struct PeerRules {
    ns: String,
    dir: std::path::PathBuf,
}

impl PeerRules {
    /// Loads `config`'s rules (`nftables` or `iptables-nft`) for NodePort `NODE_PORT` to
    /// `backend`/`backend6`, both families.
    fn load(
        tb: &Testbed,
        config: &str,
        backend: Ipv4Addr,
        backend6: std::net::Ipv6Addr,
    ) -> anyhow::Result<PeerRules> {
        let tools: &[&str] = match config {
            "nftables" => &["nft"],
            _ => &["iptables-nft-restore", "ip6tables-nft-restore"],
        };
        for tool in tools {
            if !super::has_program(tool) {
                bail!("{tool} is not installed (cargo xtask setup installs it)");
            }
        }
        let dir = std::env::temp_dir().join(format!("{}-pps-{config}", tb.id));
        std::fs::create_dir_all(&dir)?;
        let rules = PeerRules {
            ns: tb.node_ns_path(0),
            dir,
        };
        let ep4 = backend.to_string();
        let ep6 = backend6.to_string();
        let files: Vec<(&str, String)> = if config == "nftables" {
            vec![(
                "nft",
                format!(
                    "{}{}",
                    nft_rules("ip", &ep4, &ep4),
                    nft_rules("ip6", &ep6, &format!("[{ep6}]"))
                ),
            )]
        } else {
            vec![
                (
                    "iptables-nft-restore",
                    iptables_rules(&format!("{ep4}/32"), &ep4),
                ),
                (
                    "ip6tables-nft-restore",
                    iptables_rules(&format!("{ep6}/128"), &format!("[{ep6}]")),
                ),
            ]
        };
        for (tool, text) in files {
            let file = rules.dir.join(format!("{tool}.rules"));
            std::fs::write(&file, text)?;
            let file = file.display().to_string();
            let args: Vec<&str> = if tool == "nft" {
                vec!["-f", &file]
            } else {
                vec![&file]
            };
            rules.run(tool, &args)?;
        }
        Ok(rules)
    }

    /// Runs `tool` in node-a's namespace.
    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.ns))
            .arg(tool)
            .args(args)
            .output()
            .with_context(|| format!("run {tool}"))?;
        if !out.status.success() {
            bail!("{tool}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

impl Drop for PeerRules {
    fn drop(&mut self) {
        // Both peers' rules live in node-a's nftables ruleset (iptables-nft included), which
        // holds nothing else.
        let _ = self.run("nft", &["flush", "ruleset"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// kube-proxy's nftables-mode rules for the flood Service in table `family kube-proxy`
/// (`ip` or `ip6`): endpoint `ep` (`ep_port`: the address as DNAT writes it with a port).
fn nft_rules(family: &str, ep: &str, ep_port: &str) -> String {
    let t = format!("{family} kube-proxy");
    let (addr, loopback) = if family == "ip" {
        ("ip", "127.0.0.0/8")
    } else {
        ("ip6", "::1")
    };
    // kube-proxy names its chains after the Service port and endpoint (with characters nft
    // does not take in a bare name from a file); the names cost nothing per packet.
    let chain = "default-flood-udp";
    format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {t} mark-for-masquerade\n\
         add rule {t} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {t} masquerading\n\
         add rule {t} masquerading mark and 0x4000 == 0 return\n\
         add rule {t} masquerading mark set mark xor 0x4000\n\
         add rule {t} masquerading masquerade fully-random\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; }}\n\
         add chain {t} services\n\
         add rule {t} services fib daddr type local {addr} daddr != {loopback} meta l4proto . th dport vmap @service-nodeports\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule {t} nat-prerouting jump services\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add rule {t} nat-postrouting jump masquerading\n\
         add chain {t} endpoint-{chain}-1\n\
         add rule {t} endpoint-{chain}-1 {addr} saddr {ep} jump mark-for-masquerade\n\
         add rule {t} endpoint-{chain}-1 meta l4proto udp dnat to {ep_port}:{BACKEND_PORT}\n\
         add chain {t} service-{chain}\n\
         add rule {t} service-{chain} numgen random mod 1 vmap {{ 0 : goto endpoint-{chain}-1 }}\n\
         add chain {t} external-{chain}\n\
         add rule {t} external-{chain} jump mark-for-masquerade\n\
         add rule {t} external-{chain} goto service-{chain}\n\
         add element {t} service-nodeports {{ udp . {NODE_PORT} : goto external-{chain} }}\n"
    )
}

/// kube-proxy's iptables-mode nat table for the flood Service (`iptables-restore` input):
/// endpoint `source` (as `-s` takes it), `ep_port` as DNAT writes it with a port.
fn iptables_rules(source: &str, ep_port: &str) -> String {
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-SVC-FLOOD - [0:0]\n\
         :KUBE-EXT-FLOOD - [0:0]\n:KUBE-SEP-FLOOD - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-NODEPORTS -p udp -m udp --dport {NODE_PORT} -j KUBE-EXT-FLOOD\n\
         -A KUBE-EXT-FLOOD -j KUBE-MARK-MASQ\n\
         -A KUBE-EXT-FLOOD -j KUBE-SVC-FLOOD\n\
         -A KUBE-SVC-FLOOD -j KUBE-SEP-FLOOD\n\
         -A KUBE-SEP-FLOOD -s {source} -j KUBE-MARK-MASQ\n\
         -A KUBE-SEP-FLOOD -p udp -m udp -j DNAT --to-destination {ep_port}:{BACKEND_PORT}\n\
         COMMIT\n"
    )
}

/// The agent on node-a with `--xdp xdp`, the NodePort Service programmed and tc attached.
fn start_agent(
    tb: &Testbed,
    xdp: &str,
    backend: Ipv4Addr,
    backend6: std::net::Ipv6Addr,
) -> anyhow::Result<Agent> {
    let mut agent = Agent::new(&format!("{}-{xdp}", tb.id), tb.cgroup_path(), NODE);
    agent.set_echo(false);
    agent.netns = Some(tb.node_ns_path(0));
    agent.extra_args = ["--external-interfaces", "eth0", "--xdp", xdp]
        .map(String::from)
        .to_vec();
    agent.write_manifest(
        "node.yaml",
        &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n"),
    );
    agent.write_manifest(
        "svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: flood, namespace: default}}\n\
             spec:\n  type: NodePort\n  clusterIP: 10.96.0.90\n  clusterIPs: [10.96.0.90, \
             \"fd00:96::90\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  \
             ports:\n  - {{name: udp, port: 53, targetPort: \
             {BACKEND_PORT}, protocol: UDP, nodePort: {NODE_PORT}}}\n"
        ),
    );
    for (file, name, family, addr) in [
        ("slice.yaml", "flood-1", "IPv4", backend.to_string()),
        ("slice6.yaml", "flood-2", "IPv6", backend6.to_string()),
    ] {
        agent.write_manifest(
            file,
            &format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
                 namespace: default\n  labels: {{kubernetes.io/service-name: flood}}\n\
                 addressType: {family}\nports: [{{name: udp, port: {BACKEND_PORT}, protocol: UDP}}]\n\
                 endpoints:\n- {{addresses: [\"{addr}\"], nodeName: node-b}}\n"
            ),
        );
    }
    let pos = agent.log_position();
    agent.start();
    wait_log(&agent, pos, "synced:", Duration::from_secs(30))
        .context("the agent did not sync the flood Service")?;
    Ok(agent)
}

/// `rx_packets` of `eth0` in `ns`.
fn rx_packets(ns: &NetNs) -> anyhow::Result<u64> {
    let json = ns.ip(&["-s", "-j", "link", "show", "eth0"]);
    let v: serde_json::Value = serde_json::from_str(&json).context("ip -j link JSON")?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packet count")
}

/// One flood of `secs` from `ext` to `to`: (datagrams sent, datagrams that reached `sink`'s
/// `eth0`), the latter read once the flood is over and the last packets had time to land.
fn flood(ext: &str, sink: &NetNs, to: &str, secs: f64, cpu: usize) -> anyhow::Result<(u64, u64)> {
    let before = rx_packets(sink)?;
    let cmd = command_in(
        &Placement {
            netns: ext,
            cgroup_procs: None,
        },
        &workspace_binary("loadgen"),
        &["flood", to, &format!("{secs}"), &cpu.to_string()],
    );
    let (_, stdout) = run_bounded(cmd, Duration::from_secs_f64(secs + 20.0))?;
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("loadgen output {stdout:?}"))?;
    let sent = v["ops"].as_u64().unwrap_or(0);
    super::nap(Duration::from_millis(100))?;
    Ok((sent, rx_packets(sink)?.saturating_sub(before)))
}

/// The agent's nonzero datapath counters (`status -o json`): (reason, count).
fn status_counters(tb: &Testbed, agent: &Agent) -> anyhow::Result<Vec<(String, u64)>> {
    Ok(nonzero_counters(&node_status(tb, agent)?))
}

/// Attaches a two-instruction XDP program that passes every packet (native mode) to `dev` in
/// `ns`: loaded with BPF_PROG_LOAD, pinned for `ip link set ... xdpdrv pinned`, unpinned once
/// attached (the attachment holds it; it goes with the interface).
fn xdp_pass_on(ns: &NetNs, dev: &str, id: &str) -> anyhow::Result<()> {
    // r0 = XDP_PASS (2); exit.
    let prog = xdpgen::load_xdp(&[
        xdpgen::insn(0xb7, 0, 0, 0, 2),
        xdpgen::insn(0x95, 0, 0, 0, 0),
    ])
    .context("an XDP_PASS program")?;
    let pin = format!("/sys/fs/bpf/{id}-xdp-pass");
    xdpgen::attach_pinned(
        ns,
        &prog,
        &pin,
        &["ip", "link", "set", "dev", dev, "xdpdrv", "pinned", &pin],
    )
    .with_context(|| format!("attach an XDP_PASS program to {dev}"))
}
