//! Results of `cargo xtask bench`: raw samples, the summaries the issue asks for (ratios to
//! direct, control-plane percentiles, memory, targets), rendered as Markdown, JSON and a PNG.

use std::{fmt::Write as _, path::Path};

use anyhow::anyhow;
use serde::{Deserialize, Serialize};

use super::{Settings, Test};

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub cpu_model: String,
}

impl Machine {
    pub fn probe() -> Machine {
        // SAFETY: plain sysconf.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus,
            kernel,
            cpu_model,
        }
    }
}

/// Order statistics of a set of samples (nearest-rank percentiles).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1]
        };
        let p50 = if v.len().is_multiple_of(2) {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        } else {
            v[v.len() / 2]
        };
        Some(Summary {
            n: v.len(),
            p50,
            p99: rank(99.0),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// One load-generator run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub services: usize,
    pub test: String,
    pub target: String,
    pub config: String,
    pub rep: usize,
    /// Requests (or connections) per second.
    pub rate: f64,
    /// The client's CPU time (user + system) over wall time.
    pub client_cpu: f64,
    /// Whether the client ran as SCHED_FIFO.
    pub realtime: bool,
    pub ops: u64,
    pub errors: u64,
    pub backends: usize,
    pub valid: bool,
    pub note: String,
}

/// A configuration's rate relative to direct, over the repetitions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DpRow {
    pub services: usize,
    pub test: String,
    pub target: String,
    pub config: String,
    pub rate_median: Option<f64>,
    pub direct_rate_median: Option<f64>,
    /// The client's CPU use (user + system over wall time), median.
    pub client_cpu_median: Option<f64>,
    /// Per-repetition ratio to the direct run of the same repetition.
    pub ratios: Vec<f64>,
    pub ratio: Option<Summary>,
    pub valid_reps: usize,
    pub reps: usize,
    pub note: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PairedRow {
    pub services: usize,
    pub test: String,
    pub target: String,
    pub ratios: Vec<f64>,
    pub summary: Option<Summary>,
    pub invalid: usize,
}

/// One scheduler's connect cost: bpf/direct TCP_CRR ratios to the middle Service scheduled by
/// it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SchedRow {
    pub services: usize,
    pub scheduler: String,
    pub ratios: Vec<f64>,
    pub summary: Option<Summary>,
    pub invalid: usize,
}

impl PairedRow {
    /// "median [min-max] over n pairs (k invalid)".
    fn line(&self) -> String {
        self.summary.as_ref().map_or("no valid pair".into(), |x| {
            format!(
                "{:.3} [{:.3}-{:.3}] over {} pairs{}",
                x.p50,
                x.min,
                x.max,
                x.n,
                if self.invalid > 0 {
                    format!(" ({} invalid)", self.invalid)
                } else {
                    String::new()
                }
            )
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CpRow {
    pub services: usize,
    pub endpoints: usize,
    pub peer: String,
    pub what: String,
    /// Milliseconds.
    pub samples: Vec<f64>,
    pub summary: Option<Summary>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemRow {
    pub services: usize,
    pub endpoints: usize,
    pub agent_rss_bytes: u64,
    pub agent_peak_rss_bytes: u64,
    pub bpf_map_memlock_bytes: u64,
    pub maps: usize,
}

/// `cargo xtask bench --pod-networks`: the external path per pod-network shape, pod veth to
/// tc attached, and the agent with many pod veths.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PodNetReport {
    /// Back-to-back direct/bpf TCP_CRR pairs per shape, and their length.
    pub pairs: usize,
    pub pair_secs: f64,
    pub client_cpu: usize,
    pub server_cpu: usize,
    /// /proc/loadavg's 1-minute figure at the start and at the end of this part (the machine's
    /// other work).
    pub load_start: Option<f64>,
    pub load_end: Option<f64>,
    pub external: Vec<ShapeRow>,
    /// Seconds waited before each pair for the connection tracking to drain.
    pub ct_drain_secs: Vec<f64>,
    pub attach: Vec<LatencyRow>,
    pub scale: Option<ScaleRow>,
    /// Packets per second through node-a: tc and XDP (`pps`).
    #[serde(default)]
    pub pps: Vec<PpsRow>,
    /// The same, node-a alone: fed by the XDP frame generator (`xdpgen`), counted where node-a
    /// sends the packets.
    #[serde(default)]
    pub pps_gen: Vec<PpsRow>,
    /// How `pps_gen`'s packets were counted where node-a sends them: `bpf` (tc and XDP
    /// programs on the LAN side, GRO off there), or empty for reports written before, whose
    /// sink was an nftables `netdev` rule behind GRO.
    #[serde(default)]
    pub pps_gen_sink: String,
    /// Why `pps_gen` was not measured (`xdpgen::live_frames_refused`), if it was not.
    #[serde(default)]
    pub pps_gen_skipped: Option<String>,
}

/// One configuration of the packets-per-second part: a UDP flood to a NodePort whose backend is
/// on the other node, against the same flood to the pod's own address (`direct`), in pairs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PpsRow {
    /// `tc` or `xdp` (the agent), `nftables` or `iptables-nft` (kube-proxy's rules).
    pub config: String,
    /// `IPv4` or `IPv6`.
    #[serde(default)]
    pub family: String,
    /// The agent's `--xdp`.
    pub xdp: String,
    /// Medians over the pairs, datagrams per second: sent by `ext` and delivered to the pod.
    pub direct_sent: Option<f64>,
    pub direct_delivered: Option<f64>,
    pub sent: Option<f64>,
    pub delivered: Option<f64>,
    pub delivered_runs: Vec<f64>,
    /// Delivered through the NodePort / delivered direct, per pair.
    pub summary: Option<Summary>,
    /// The agent's nonzero datapath counters after the runs.
    pub counters: Vec<(String, u64)>,
    /// Nanoseconds per run of node-a's programs over the pairs (the kernel's BPF run-time
    /// statistics, over the NodePort floods): (program, ns).
    #[serde(default)]
    pub program_ns: Vec<(String, Option<f64>)>,
}

/// One pod-network shape's external path: NodePort (tc) vs the pod's own address.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShapeRow {
    pub shape: String,
    /// What `status` listed as carrying tc: `interface (why)`.
    pub tc_interfaces: Vec<String>,
    /// The agent's nonzero datapath counters after the runs (`status`): (reason, count).
    pub counters: Vec<(String, u64)>,
    pub direct_rate_median: Option<f64>,
    pub bpf_rate_median: Option<f64>,
    pub direct_cpu_median: Option<f64>,
    pub bpf_cpu_median: Option<f64>,
    /// bpf/direct rate of each valid pair.
    pub ratios: Vec<f64>,
    pub summary: Option<Summary>,
    pub invalid: usize,
    /// Why the first invalid pair was.
    pub note: String,
}

/// A latency in milliseconds, sampled.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencyRow {
    pub what: String,
    pub samples: Vec<f64>,
    pub summary: Option<Summary>,
}

/// The agent with many pod veths.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScaleRow {
    pub veths: usize,
    /// Making the veths, both ends up, and their routes (`ip -batch`).
    pub create_ms: f64,
    /// `tc attached at ingress of` lines of those veths after the slice was written.
    pub attached: usize,
    /// Pod interfaces `status` listed afterwards.
    pub status_pod_interfaces: usize,
    /// From the slice's rename to the first / the last attach line (the agent's timestamps).
    pub first_attached_ms: Option<f64>,
    pub all_attached_ms: Option<f64>,
    /// From the slice's rename until the harness had seen every attach line.
    pub observed_ms: f64,
    /// The agent's own time per attach (`in ...` of the lines), in the order of the lines.
    pub per_attach_ms: Vec<f64>,
    pub per_attach: Option<Summary>,
    /// Agent RSS: started, no veths; the veths exist, none attached; all attached.
    pub rss_start_bytes: u64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub peak_rss_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetRow {
    pub target: String,
    pub value: String,
    /// None: not measured.
    pub met: Option<bool>,
    pub why: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub settings: Settings,
    pub bpf_logging: String,
    pub external_datapath: String,
    pub skipped: Vec<String>,
    pub datapath: Vec<DpRow>,
    pub paired: Vec<PairedRow>,
    /// The close call against the load-balanced baseline: `direct` to the middle Service's
    /// pods, one drawn at random per connection (absent from reports written before it
    /// existed).
    #[serde(default)]
    pub paired_spread: Vec<PairedRow>,
    /// Per-scheduler connect cost (absent from reports written before it existed).
    #[serde(default)]
    pub schedulers: Vec<SchedRow>,
    /// The external data path (tc): bpf to the middle Service's externalIP vs direct.
    #[serde(default)]
    pub external: Vec<PairedRow>,
    /// The close call again while `kube-bpf-proxy monitor` reads every event (absent from
    /// reports written before it existed).
    #[serde(default)]
    pub monitored: Vec<PairedRow>,
    /// The middle Service from a pod whose namespace has socket-layer translation off (per
    /// packet at tc), and nftables to it in the same kind of pairs (absent from reports
    /// written before they existed).
    #[serde(default)]
    pub per_packet: Vec<PairedRow>,
    #[serde(default)]
    pub per_packet_nftables: Vec<PairedRow>,
    pub control_plane: Vec<CpRow>,
    pub memory: Vec<MemRow>,
    pub targets: Vec<TargetRow>,
    pub samples: Vec<Sample>,
    /// `--pod-networks` (absent from reports written before it existed).
    #[serde(default)]
    pub pod_networks: Option<PodNetReport>,
    pub total_secs: f64,
    pub error: Option<String>,
}

pub const PEERS: [&str; 4] = ["bpf", "iptables-nft", "iptables-legacy", "nftables"];

impl Report {
    pub fn new(machine: Machine, settings: Settings) -> Report {
        Report {
            machine,
            settings,
            bpf_logging: "off (the BPF programs make no log calls)".into(),
            external_datapath: "a client pod outside the agent's cgroup connects to the middle \
                                Service's externalIP: tc on the node's bridge translates it \
                                (conntrack, masquerading) both ways for bpf, kube-proxy's \
                                externalIP rules (marked for masquerading, then the Service's \
                                chain) for the peers; rows `external-ip` in the table above"
                .into(),
            skipped: Vec::new(),
            datapath: Vec::new(),
            paired: Vec::new(),
            paired_spread: Vec::new(),
            schedulers: Vec::new(),
            external: Vec::new(),
            monitored: Vec::new(),
            per_packet: Vec::new(),
            per_packet_nftables: Vec::new(),
            control_plane: Vec::new(),
            memory: Vec::new(),
            targets: Vec::new(),
            samples: Vec::new(),
            pod_networks: None,
            total_secs: 0.0,
            error: None,
        }
    }

    pub fn cp(
        &mut self,
        services: usize,
        endpoints: usize,
        peer: &str,
        what: &str,
        samples: Vec<f64>,
    ) {
        self.control_plane.push(CpRow {
            services,
            endpoints,
            peer: peer.into(),
            what: what.into(),
            summary: Summary::of(&samples),
            samples,
        });
    }

    /// Summarizes one Service count's samples: each configuration's rate over the direct rate
    /// of the same test in the same repetition.
    pub fn add_datapath(&mut self, services: usize, samples: &[Sample], reps: usize) {
        let direct = |test: &str, rep: usize| {
            samples
                .iter()
                .find(|s| s.config == "direct" && s.test == test && s.rep == rep && s.valid)
                .map(|s| s.rate)
        };
        let mut keys: Vec<(&str, &str, &str)> = Vec::new();
        for s in samples {
            let key = (s.test.as_str(), s.target.as_str(), s.config.as_str());
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        for (test, target, config) in keys {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.test == test && s.target == target && s.config == config)
                .collect();
            let valid: Vec<&&Sample> = mine.iter().filter(|s| s.valid).collect();
            let ratios: Vec<f64> = valid
                .iter()
                .filter_map(|s| direct(test, s.rep).map(|d| s.rate / d))
                .collect();
            let rates: Vec<f64> = valid.iter().map(|s| s.rate).collect();
            let directs: Vec<f64> = (0..reps).filter_map(|r| direct(test, r)).collect();
            let note = mine
                .iter()
                .find(|s| !s.valid)
                .map(|s| format!("invalid rep {}: {}", s.rep + 1, s.note))
                .unwrap_or_default();
            self.datapath.push(DpRow {
                services,
                test: test.into(),
                target: target.into(),
                config: config.into(),
                rate_median: Summary::of(&rates).map(|s| s.p50),
                client_cpu_median: Summary::of(
                    &valid.iter().map(|s| s.client_cpu).collect::<Vec<_>>(),
                )
                .map(|s| s.p50),
                direct_rate_median: Summary::of(&directs).map(|s| s.p50),
                ratio: Summary::of(&ratios),
                ratios,
                valid_reps: valid.len(),
                reps: mine.len(),
                note,
            });
        }
    }

    fn dp(&self, services: usize, test: Test, target: &str, config: &str) -> Option<&DpRow> {
        self.datapath.iter().find(|r| {
            r.services == services
                && r.test == test.name()
                && r.target == target
                && r.config == config
        })
    }

    fn cp_row(&self, services: usize, endpoints: usize, peer: &str, what: &str) -> Option<&CpRow> {
        self.control_plane.iter().find(|r| {
            r.services == services && r.endpoints == endpoints && r.peer == peer && r.what == what
        })
    }

    /// Evaluates the targets at the largest Service count measured.
    pub fn finish(&mut self) {
        if self.settings.only_pod_networks {
            return;
        }
        let Some(n) = self.settings.services.iter().copied().max() else {
            return;
        };
        let at = if n == 10_000 {
            String::new()
        } else {
            format!(" (measured at {n} Services; the target is for 10000)")
        };
        let e = self.settings.endpoints;
        let mut targets = Vec::new();

        // 1. Connection rate to a Service vs direct (the close call: paired runs).
        let paired = self
            .paired
            .iter()
            .find(|p| p.services == n)
            .and_then(|p| p.summary.clone());
        let interleaved = self
            .dp(n, Test::Crr, "svc-mid", "bpf")
            .and_then(|r| r.ratio.clone());
        let spread = self
            .paired_spread
            .iter()
            .find(|p| p.services == n)
            .and_then(|p| p.summary.as_ref())
            .map_or("-".into(), |s| format!("{:.3}", s.p50));
        targets.push(match paired {
            Some(s) => TargetRow {
                target: format!("Service connect rate >= 0.97 x direct{at}"),
                value: format!(
                    "{:.3} (median of {} paired runs, range {:.3}-{:.3}; interleaved: {}; \
                     against direct spread over the Service's pods: {spread})",
                    s.p50,
                    s.n,
                    s.min,
                    s.max,
                    interleaved.map_or("-".into(), |i| format!("{:.3}", i.p50))
                ),
                met: Some(s.p50 >= 0.97),
                why: if s.p50 >= 0.97 {
                    String::new()
                } else {
                    "connect4 runs three map lookups (frontend, slot, backend) and one \
                     reverse-NAT map update per connection, on the client's CPU, which a \
                     connect-per-request client saturates"
                        .into()
                },
            },
            None => not_measured("Service connect rate >= 0.97 x direct"),
        });

        // 2. >= 2x iptables.
        for ipt in ["iptables-nft", "iptables-legacy"] {
            let name = format!("Service connect rate >= 2 x {ipt}{at}");
            let bpf = self.dp(n, Test::Crr, "svc-mid", "bpf");
            let theirs = self.dp(n, Test::Crr, "svc-mid", ipt);
            let row = match (bpf, theirs) {
                (Some(b), Some(t)) if b.ratio.is_some() && t.ratio.is_some() => {
                    let (b, t) = (b.ratio.clone().unwrap(), t.ratio.clone().unwrap());
                    let x = b.p50 / t.p50;
                    let last = self
                        .dp(n, Test::Crr, "svc-last", ipt)
                        .and_then(|r| r.ratio.clone());
                    let x_last = last.as_ref().map(|l| b.p50 / l.p50);
                    let met = x >= 2.0;
                    TargetRow {
                        target: name,
                        value: format!(
                            "{x:.2}x (svc-mid: bpf {:.2}, {ipt} {:.2} of direct){}",
                            b.p50,
                            t.p50,
                            x_last.map_or(String::new(), |xl| format!(
                                "; {xl:.2}x vs the last Service's rule"
                            ))
                        ),
                        met: Some(met),
                        why: if met {
                            String::new()
                        } else if 2.0 * t.p50 > 1.0 {
                            format!(
                                "{ipt} reaches {:.2} of direct on this test, so 2x would need \
                                 bpf at {:.2} of direct, above the physical limit (direct): \
                                 the whole cost of {ipt}'s rules is the {:.2} gap to direct; \
                                 connection setup and teardown in the client are the rest",
                                t.p50,
                                2.0 * t.p50,
                                1.0 - t.p50
                            )
                        } else {
                            format!("bpf reaches {:.2} of direct, {ipt} {:.2}", b.p50, t.p50)
                        },
                    }
                }
                _ => not_measured(&name),
            };
            targets.push(row);
        }

        // The external path (issue #23): tc >= 0.95 x direct and >= 1.2 x the best peer.
        let ext = |config: &str| {
            self.dp(n, Test::Crr, "external-ip", config)
                .and_then(|r| r.ratio.clone())
        };
        let name = format!("external path (tc) connect rate >= 0.95 x direct{at}");
        targets.push(match ext("bpf") {
            Some(b) => TargetRow {
                target: name,
                value: format!("{:.3} (TCP_CRR to the externalIP)", b.p50),
                met: Some(b.p50 >= 0.95),
                why: if b.p50 >= 0.95 {
                    String::new()
                } else {
                    "tc translates every packet of the flow (conntrack lookup and rewrite both \
                     ways, masquerading), where the socket path translates once per connection"
                        .into()
                },
            },
            None => not_measured(&name),
        });
        let name = format!("external path connect rate >= 1.2 x the best peer{at}");
        let best = ["iptables-nft", "iptables-legacy", "nftables"]
            .into_iter()
            .filter_map(|c| ext(c).map(|r| (c, r.p50)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        targets.push(match (ext("bpf"), best) {
            (Some(b), Some((peer, p))) => {
                let x = b.p50 / p;
                TargetRow {
                    target: name,
                    value: format!(
                        "{x:.2}x (bpf {:.3}, best peer {peer} {p:.3} of direct)",
                        b.p50
                    ),
                    met: Some(x >= 1.2),
                    why: if x >= 1.2 {
                        String::new()
                    } else if 1.2 * p > 1.0 {
                        format!(
                            "{peer} reaches {p:.2} of direct here, so 1.2x would need bpf above \
                             direct"
                        )
                    } else {
                        format!("bpf reaches {:.2} of direct, {peer} {p:.2}", b.p50)
                    },
                }
            }
            _ => not_measured(&name),
        });

        // 3. Single-change programming latency.
        let name = format!("single-change programming p99 < 50 ms{at}");
        let wall = self.cp_row(
            n,
            e,
            "bpf",
            "single change: manifest written -> maps hold it",
        );
        let sync = self.cp_row(n, e, "bpf", "single change: agent's sync duration");
        let prog = self.cp_row(n, e, "bpf", "single change: agent's change to programmed");
        targets.push(match wall.and_then(|w| w.summary.clone()) {
            Some(s) => {
                let sync = sync.and_then(|r| r.summary.clone());
                let prog = prog.and_then(|r| r.summary.clone());
                let met = s.p99 < 50.0;
                TargetRow {
                    target: name,
                    value: format!(
                        "p99 {:.1} ms (p50 {:.1}) file write -> maps; agent's change to \
                         programmed p99 {}; agent's sync p99 {}",
                        s.p99,
                        s.p50,
                        fmt_ms(prog.map(|p| p.p99)),
                        fmt_ms(sync.as_ref().map(|p| p.p99))
                    ),
                    met: Some(met),
                    why: match sync.map(|p| p.p99) {
                        _ if met => String::new(),
                        Some(sync) if sync >= 50.0 => format!(
                            "the agent's sync itself (compile, plan, map writes) takes p99 \
                             {sync:.0} ms at this size, for one changed endpoint; on top of \
                             it the manifests source polls every 100 ms and the sync loop waits \
                             for 50 ms without a further change (SyncTiming::quiet)"
                        ),
                        sync => format!(
                            "by design of the source and the sync loop, not the map writes: \
                             the manifests source polls every 100 ms and the sync loop waits \
                             for 50 ms without a further change (SyncTiming::quiet) before it \
                             syncs, so source -> maps is >= 50 ms plus up to 100 ms; the sync \
                             itself (compile, plan, write) took p99 {}",
                            fmt_ms(sync)
                        ),
                    },
                }
            }
            None => not_measured(&name),
        });

        // 4. Full sync.
        let name = format!("full sync of N x 10 < 2 s{at}");
        let wall = self.cp_row(n, e, "bpf", "full sync: manifests written -> maps hold all");
        let sync = self.cp_row(n, e, "bpf", "full sync: agent's sync duration");
        targets.push(match wall.and_then(|w| w.summary.clone()) {
            Some(s) => {
                let sync = sync.and_then(|r| r.summary.clone());
                let met = s.max < 2000.0;
                TargetRow {
                    target: name,
                    value: format!(
                        "{:.0} ms median, {:.0} ms max (n={}) file write -> maps; agent's sync \
                         {}",
                        s.p50,
                        s.max,
                        s.n,
                        fmt_ms(sync.as_ref().map(|p| p.p50))
                    ),
                    met: Some(met),
                    why: if met {
                        String::new()
                    } else {
                        format!(
                            "the agent's sync (compile, plan, map writes) took {} of it; the \
                             rest is the source (100 ms poll, YAML parsing of every manifest) \
                             and the 50 ms quiet period",
                            fmt_ms(sync.map(|p| p.p50))
                        )
                    },
                }
            }
            None => not_measured(&name),
        });

        // 5. RSS.
        let name = format!("agent RSS < 100 MiB at N x 10{at}");
        targets.push(
            match self
                .memory
                .iter()
                .find(|m| m.services == n && m.endpoints == e)
            {
                Some(m) => {
                    let rss = m.agent_rss_bytes as f64 / MIB;
                    let met = rss < 100.0;
                    TargetRow {
                        target: name,
                        value: format!(
                            "{rss:.1} MiB (peak {:.1} MiB)",
                            m.agent_peak_rss_bytes as f64 / MIB
                        ),
                        met: Some(met),
                        why: if met {
                            String::new()
                        } else {
                            "the agent's memory grows with the objects it holds (the \
                             source's parsed Services and EndpointSlices, the last snapshot, \
                             the compiled and the map state it plans against); not broken \
                             down further here"
                                .into()
                        },
                    }
                }
                None => not_measured(&name),
            },
        );
        self.targets = targets;
    }

    pub fn markdown(&self) -> String {
        if self.settings.only_pod_networks {
            return self.pod_networks_markdown(true);
        }
        let mut out = String::new();
        let s = &self.settings;
        let m = &self.machine;
        let _ = writeln!(out, "## Performance\n");
        let _ = writeln!(
            out,
            "Generated by `cargo xtask bench{}` on {} CPUs (`nproc`), kernel `{}`, CPU \"{}\"; \
             the run took {:.0} s.\n",
            if s.quick { " --quick" } else { "" },
            m.cpus,
            m.kernel,
            m.cpu_model,
            self.total_secs
        );
        let _ = writeln!(
            out,
            "- BPF logging: {}.\n\
             - Each configuration has its own identical topology: a node namespace with bridge \
             `br0`, a client pod and {} backend pods (`bridge-nf-call-iptables=1`, forwarding on, \
             in every node). Rule sets are loaded once per Service count; {} Services x {} \
             endpoints; the measured Services' endpoints are the backend pods, the others' are \
             addresses that carry no traffic.\n\
             - Client pinned to CPU {}, servers to CPU {}, both SCHED_FIFO priority 1{} so the \
             machine's other work does not queue ahead of them; they block while they wait. A \
             connect-per-request client nearly saturates its CPU (see \"% CPU\"): TCP_CRR \
             rates are bound by the client's CPU and the wake-ups between the two CPUs.\n\
             - {} s per measurement, {} repetition(s), configurations interleaved (direct first, \
             then the others in an order rotated per repetition). Cells: rate relative to \
             `direct` (client straight to a backend pod) in the same repetition, median \
             [min-max]. TCP_CRR: connect, 1-byte request, 1-byte reply, close with SO_LINGER 0. \
             TCP_RR: 1-byte request/reply on one connection. UDP_RR: 1-byte request/reply on \
             one unconnected UDP socket.\n\
             - `bpf`: the client is in the agent's cgroup; iptables and nftables clients are \
             not (their cgroup has no programs).",
            self.bpf_logging,
            super::workload::BACKEND_PODS,
            s.services
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join("/"),
            s.endpoints,
            s.client_cpu,
            s.server_cpu,
            if self.samples.iter().all(|x| x.realtime) {
                ""
            } else {
                " (where allowed: some runs were not)"
            },
            s.secs,
            s.reps
        );
        for skipped in &self.skipped {
            let _ = writeln!(out, "- Not measured: {skipped}.");
        }
        if let Some(e) = &self.error {
            let _ = writeln!(out, "- **The run stopped early: {e}**");
        }

        let _ = writeln!(
            out,
            "\n### Data path, in-cluster (client pod -> Service), ratio to direct\n"
        );
        let _ = writeln!(
            out,
            "| Services | test | target | direct (/s) | {} |",
            PEERS.join(" | ")
        );
        let _ = writeln!(out, "|---:|---|---|---:|{}", "---:|".repeat(PEERS.len()));
        let mut notes = Vec::new();
        let mut keys: Vec<(usize, &str, &str)> = Vec::new();
        for r in &self.datapath {
            let key = (r.services, r.test.as_str(), r.target.as_str());
            if r.config != "direct" && !keys.contains(&key) {
                keys.push(key);
            }
        }
        for (n, test, target) in keys {
            let rows: Vec<&DpRow> = self
                .datapath
                .iter()
                .filter(|r| r.services == n && r.test == test && r.target == target)
                .collect();
            let direct = rows.iter().find_map(|r| r.direct_rate_median);
            let direct_cpu = self
                .datapath
                .iter()
                .find(|r| r.services == n && r.test == test && r.config == "direct")
                .and_then(|r| r.client_cpu_median);
            let cells: Vec<String> = PEERS
                .iter()
                .map(|p| match rows.iter().find(|r| r.config == *p) {
                    Some(r) => {
                        if !r.note.is_empty() {
                            notes.push(format!("{n} {test} {target} {p}: {}", r.note));
                        }
                        match &r.ratio {
                            Some(s) => {
                                let mark = if r.valid_reps < r.reps { "*" } else { "" };
                                format!("{:.2} [{:.2}-{:.2}]{mark}", s.p50, s.min, s.max)
                            }
                            None => "invalid".into(),
                        }
                    }
                    None => "-".into(),
                })
                .collect();
            let _ = writeln!(
                out,
                "| {n} | {test} | {target} | {}{} | {} |",
                direct.map_or("-".into(), |d| format!("{d:.0}")),
                direct_cpu.map_or(String::new(), |c| format!(" ({:.0}% CPU)", c * 100.0)),
                cells.join(" | ")
            );
        }
        let _ = writeln!(
            out,
            "\n`pod-to-pod`: the client to a backend pod's address through a node carrying the \
             Services' rules (no Service involved). `svc-first`/`svc-last`: the Service whose \
             KUBE-SERVICES rule comes first/last (iptables only: nftables and bpf look Services \
             up in a hash). `*`: some repetitions invalid (errors), excluded. \"% CPU\": the \
             direct client's user + system time over wall time; below 100% the rate is bound \
             by round trips (wake-ups across the two CPUs), not by the client's CPU."
        );
        for note in notes {
            let _ = writeln!(out, "- {note}");
        }
        if !self.paired.is_empty() {
            let _ = writeln!(
                out,
                "\nClose call, bpf vs direct (TCP_CRR to the middle Service, back-to-back pairs \
                 of {} s, alternating which runs first), median paired ratio [min-max]:",
                s.pair_secs
            );
            for p in &self.paired {
                let _ = writeln!(out, "- {} Services: {}", p.services, p.line());
            }
        }
        if !self.paired_spread.is_empty() {
            let _ = writeln!(
                out,
                "\nThe same close call against the load-balanced baseline: `direct` connects \
                 straight to the middle Service's {} backend pods, one drawn at \
                 random per connection (as the Service's random scheduler spreads them), so \
                 the ratio leaves out what spreading connections over several pods costs \
                 the client and the pods whoever does it, and keeps what translating costs:",
                super::workload::BACKEND_PODS
            );
            for p in &self.paired_spread {
                let _ = writeln!(out, "- {} Services: {}", p.services, p.line());
            }
        }
        if !self.schedulers.is_empty() {
            let _ = writeln!(
                out,
                "\nConnect cost per scheduler (the middle Service annotated with each in turn; \
                 bpf/direct TCP_CRR back-to-back pairs as above). \"vs random\": the \
                 scheduler's median ratio over random's; below 1 it costs connections per \
                 second.\n\n| Services | scheduler | bpf/direct, median [min-max] | vs random |\n\
                 |---:|---|---|---:|"
            );
            for r in &self.schedulers {
                let random = self
                    .schedulers
                    .iter()
                    .find(|x| x.services == r.services && x.scheduler == "random")
                    .and_then(|x| x.summary.as_ref())
                    .map(|x| x.p50);
                let (ratio, vs) = match (&r.summary, random) {
                    (Some(x), Some(base)) if base > 0.0 => (
                        format!("{:.3} [{:.3}-{:.3}] over {}", x.p50, x.min, x.max, x.n),
                        format!("{:.3}", x.p50 / base),
                    ),
                    (Some(x), _) => (
                        format!("{:.3} [{:.3}-{:.3}] over {}", x.p50, x.min, x.max, x.n),
                        "n/a".into(),
                    ),
                    (None, _) => ("no valid pair".into(), "n/a".into()),
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {ratio}{} | {vs} |",
                    r.services,
                    r.scheduler,
                    if r.invalid > 0 {
                        format!(" ({} invalid)", r.invalid)
                    } else {
                        String::new()
                    }
                );
            }
        }
        let _ = writeln!(
            out,
            "\n### Data path, external (through tc)\n\n{}.",
            self.external_datapath
        );
        if !self.external.is_empty() {
            let _ = writeln!(
                out,
                "\nbpf (external IP)/direct, TCP_CRR back-to-back pairs of {} s, median paired \
                 ratio [min-max]:",
                s.pair_secs
            );
            for p in &self.external {
                let _ = writeln!(out, "- {} Services: {}", p.services, p.line());
            }
        }
        if !self.monitored.is_empty() {
            let _ = writeln!(
                out,
                "\n### Data path with a monitor watching\n\nbpf/direct to the middle Service \
                 while `kube-bpf-proxy monitor --output json` reads every event (one per \
                 connect), TCP_CRR back-to-back pairs of {} s, median paired ratio [min-max]; \
                 compare with the close call above, where no monitor watches and the programs \
                 write no event:",
                s.pair_secs
            );
            for p in &self.monitored {
                let _ = writeln!(out, "- {} Services: {}", p.services, p.line());
            }
        }

        if !self.per_packet.is_empty() {
            let _ = writeln!(
                out,
                "\n### Data path per packet (socket-layer translation off)\n\nThe middle \
                 Service from a client pod whose namespace has `kube-bpf-proxy.io/socket-lb: \
                 disabled`: its connect() is left alone and tc on the node's bridge translates \
                 every packet (conntrack both ways; backends on the same bridge, so \
                 masqueraded). Compare with the close call above (the socket path) and with \
                 nftables/direct to the same Service in the same kind of pairs; TCP_CRR \
                 back-to-back pairs of {} s, median paired ratio [min-max]:",
                s.pair_secs
            );
            for p in &self.per_packet {
                let _ = writeln!(
                    out,
                    "- bpf per packet, {} Services: {}",
                    p.services,
                    p.line()
                );
            }
            for p in &self.per_packet_nftables {
                let _ = writeln!(out, "- nftables, {} Services: {}", p.services, p.line());
            }
        }

        let _ = writeln!(out, "\n### Control plane (ms)\n");
        let _ = writeln!(
            out,
            "The agent reads manifests (polled every 100 ms) and syncs after 50 ms without a \
             further change. \"written -> maps\" is measured from the manifest file's rename to \
             the pinned map holding the new state (polled every 0.5 ms); \"change to \
             programmed\" is the agent's own figure (from the snapshot's arrival in the sync \
             loop); \"sync duration\" is compile + plan + map writes. Peers: wall time of the \
             one `iptables-restore` / `nft -f` (kube-proxy's own sync period not included).\n"
        );
        let _ = writeln!(
            out,
            "| Services x endpoints | who | what | p50 | p99 | max | n |"
        );
        let _ = writeln!(out, "|---|---|---|---:|---:|---:|---:|");
        for r in &self.control_plane {
            let (p50, p99, max, n) =
                r.summary
                    .as_ref()
                    .map_or(("-".into(), "-".into(), "-".into(), 0), |s| {
                        (
                            format!("{:.1}", s.p50),
                            format!("{:.1}", s.p99),
                            format!("{:.1}", s.max),
                            s.n,
                        )
                    });
            let _ = writeln!(
                out,
                "| {} x {} | {} | {} | {p50} | {p99} | {max} | {n} |",
                r.services, r.endpoints, r.peer, r.what
            );
        }

        let _ = writeln!(out, "\n### Memory\n");
        let _ = writeln!(
            out,
            "| Services x endpoints | agent RSS (MiB) | agent peak RSS (MiB) | BPF maps, memlock (MiB) |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|");
        for m in &self.memory {
            let _ = writeln!(
                out,
                "| {} x {} | {:.1} | {:.1} | {:.1} ({} maps) |",
                m.services,
                m.endpoints,
                m.agent_rss_bytes as f64 / MIB,
                m.agent_peak_rss_bytes as f64 / MIB,
                m.bpf_map_memlock_bytes as f64 / MIB,
                m.maps
            );
        }
        let _ = writeln!(
            out,
            "\nBPF map memory: the sum of `bytes_memlock` of the agent's pinned maps as bpftool \
             reports it (the kernel's own accounting of each map's memory)."
        );

        let _ = writeln!(out, "\n### Targets\n");
        let _ = writeln!(out, "| target | measured | met | why |");
        let _ = writeln!(out, "|---|---|---|---|");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "met",
                Some(false) => "missed",
                None => "n/a",
            };
            let _ = writeln!(out, "| {} | {} | {met} | {} |", t.target, t.value, t.why);
        }
        if self.pod_networks.is_some() {
            out.push('\n');
            out.push_str(&self.pod_networks_markdown(false));
        }
        out
    }

    /// The "Pod networks" section: on its own (`--pod-networks`) or after a full run's.
    fn pod_networks_markdown(&self, standalone: bool) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(out, "## Pod networks\n");
        if standalone {
            let _ = writeln!(
                out,
                "Generated by `cargo xtask bench --pod-networks{}` on {} CPUs (`nproc`), kernel \
                 `{}`, CPU \"{}\"; the run took {:.0} s.\n",
                if self.settings.quick { " --quick" } else { "" },
                m.cpus,
                m.kernel,
                m.cpu_model,
                self.total_secs
            );
        } else {
            let _ = writeln!(
                out,
                "Measured in the same run as the sections above, after them.\n"
            );
        }
        let Some(p) = &self.pod_networks else {
            let _ = writeln!(out, "Not measured.");
            return out;
        };
        let _ = writeln!(
            out,
            "- BPF logging: {}.\n\
             - Each part has its own `tests::Testbed`: a LAN, the external client `ext` \
             (192.168.77.100), node-a (192.168.77.1, pods 10.244.0.x) running the agent with \
             `--external-interfaces eth0`, the default `--pod-interfaces auto` and `--xdp off` \
             (the tc path alone). Shapes: `bridge`, pods' veths are ports of `br0` \
             (10.244.0.1/24); `ptp` (kindnet, the CNI ptp plugin), every pod's node-side veth \
             carries 10.244.0.1/32 and node-a routes each pod's /32 to it.",
            self.bpf_logging
        );
        if let (Some(a), Some(b)) = (p.load_start, p.load_end) {
            let _ = writeln!(
                out,
                "- The machine's load average (1 min) was {a:.1} at the start of this part and \
                 {b:.1} at its end."
            );
        }
        if standalone && let Some(e) = &self.error {
            let _ = writeln!(out, "- **The run stopped early: {e}**");
        }

        let _ = writeln!(
            out,
            "\n### External path by pod-network shape (TCP_CRR, ratio to direct)\n\n\
             `bpf`: `ext` to node-a's NodePort 192.168.77.1:30080 (externalTrafficPolicy \
             Cluster); tc on `eth0` translates and masquerades, tc on the pod-facing interface \
             reverses the replies. `direct`: `ext` to the pod's own address 10.244.0.2:8080, \
             routed through node-a (a route `ext` has for this part only), past the same tc \
             programs, untranslated. `ext` is in no hooked cgroup. Client pinned to CPU {}, the \
             server to CPU {} (SCHED_FIFO where allowed); a connect-per-request client nearly \
             saturates its CPU. {} back-to-back direct/bpf pairs of {} s per shape, which runs \
             first alternating per pair, both shapes' testbeds up at once and their order \
             rotated per pair. Before each pair the run waits until the agent's connection \
             tracking (`LB_CT4`) holds fewer than {} entries (waits: {}), so that every pair starts from \
             the same state: flows closed by a reset keep their entries for 10 s after their \
             last packet until the agent's next collection (every 10 s). Their masquerading \
             ports are taken over by new connections (`snat_port_reused` below), as \
             netfilter's NAT does.\n",
            p.client_cpu,
            p.server_cpu,
            p.pairs,
            p.pair_secs,
            super::podnet::CT_DRAINED,
            Summary::of(&p.ct_drain_secs).map_or("none".into(), |w| format!(
                "median {:.1} s, max {:.1} s",
                w.p50, w.max
            ))
        );
        let _ = writeln!(
            out,
            "| shape | direct (/s, % CPU) | bpf (/s, % CPU) | bpf/direct, median paired \
             [min-max] | tc on |"
        );
        let _ = writeln!(out, "|---|---:|---:|---|---|");
        let rate = |r: Option<f64>, c: Option<f64>| {
            r.map_or("-".into(), |r| {
                format!(
                    "{r:.0}{}",
                    c.map_or(String::new(), |c| format!(" ({:.0}%)", c * 100.0))
                )
            })
        };
        for r in &p.external {
            let ratio = r.summary.as_ref().map_or("no valid pair".into(), |s| {
                format!(
                    "{:.3} [{:.3}-{:.3}] over {} pairs{}",
                    s.p50,
                    s.min,
                    s.max,
                    s.n,
                    if r.invalid > 0 {
                        format!(" ({} invalid)", r.invalid)
                    } else {
                        String::new()
                    }
                )
            });
            let _ = writeln!(
                out,
                "| {} | {} | {} | {ratio} | {} |",
                r.shape,
                rate(r.direct_rate_median, r.direct_cpu_median),
                rate(r.bpf_rate_median, r.bpf_cpu_median),
                r.tc_interfaces.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "\nA run with errors is not a result: its pair is left out and counted as invalid. \
             The errors seen are connects that did not complete within the load generator's 1 s \
             timeout; the agent's `snat_ports_exhausted` counter (below) counts SYNs tc dropped \
             because none of the masquerading ports it tried for this client and backend was \
             free."
        );
        for r in &p.external {
            if !r.note.is_empty() {
                // "config: why" of every invalid run, each kind once with its count.
                let mut kinds: Vec<(&str, usize)> = Vec::new();
                for n in r.note.split("; ") {
                    match kinds.iter_mut().find(|(k, _)| *k == n) {
                        Some((_, c)) => *c += 1,
                        None => kinds.push((n, 1)),
                    }
                }
                let list: Vec<String> = kinds.iter().map(|(k, c)| format!("{c}x {k}")).collect();
                let _ = writeln!(out, "- {}: invalid runs: {}.", r.shape, list.join("; "));
            }
            if !r.counters.is_empty() {
                let list: Vec<String> =
                    r.counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
                let _ = writeln!(
                    out,
                    "- {}: datapath counters after the runs: {}.",
                    r.shape,
                    list.join(", ")
                );
            }
        }
        if let [a, b] = &p.external[..]
            && let (Some(x), Some(y)) = (&a.summary, &b.summary)
            && x.p50 > 0.0
        {
            let _ = writeln!(
                out,
                "\n{} vs {}: {:.3} (ratio of the median paired ratios).",
                b.shape,
                a.shape,
                y.p50 / x.p50
            );
        }

        let _ = writeln!(
            out,
            "\n### Pod veth to tc attached (ptp)\n\n\
             Pods added one at a time on the ptp testbed (`Testbed::add_pod`: a namespace, a veth \
             whose node side is `veth` + 8 hex digits, addresses, the node's /32 route to it). \
             \"slice first\": the pod's EndpointSlice (its address, nodeName node-a) is written \
             and synced before the pod is added, so the kernel's events alone trigger the \
             attach; the veth's and the route's appearance are the timestamps of `ip -ts \
             monitor link route` in node-a. \"pod first\": the slice is written as soon as \
             `add_pod` returns, timed from the `add_pod` call: the agent finds a pod by its \
             network namespace (and gives its veth tc) whether or not a slice names it. The \
             end is the timestamp of the agent's \
             `tc attached at ingress of <veth>` line. Milliseconds:\n"
        );
        let _ = writeln!(out, "| from -> to | p50 | p99 | max | n |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        for r in &p.attach {
            let (p50, p99, max, n) =
                r.summary
                    .as_ref()
                    .map_or(("-".into(), "-".into(), "-".into(), 0), |s| {
                        (
                            format!("{:.1}", s.p50),
                            format!("{:.1}", s.p99),
                            format!("{:.1}", s.max),
                            s.n,
                        )
                    });
            let _ = writeln!(out, "| {} | {p50} | {p99} | {max} | {n} |", r.what);
        }

        if !p.pps.is_empty() {
            let _ = writeln!(
                out,
                "\n### Packets per second: XDP, tc, kube-proxy's rules and the kernel's forwarding\n\n\
                 A two-node testbed (bridge shape). `ext` floods one UDP flow (18-byte \
                 datagrams, 64 per sendmmsg, client pinned to CPU {}) at node-a's NodePort \
                 192.168.77.1:30090 or [fd00:77::1]:30090, whose one backend is node-b's pod \
                 10.244.1.2 / fd00:244:1::2 \
                 (externalTrafficPolicy Cluster: node-a translates, masquerades and sends the \
                 packet back out of `eth0` towards node-b). Delivered: datagrams counted at the \
                 backend pod's `eth0` (a socket is bound there and never read, so nothing goes \
                 back). `nftables` and `iptables-nft`: no agent, kube-proxy's rules for the \
                 same Service in node-a (its nftables and iptables modes: NodePort, \
                 masquerading mark, DNAT, masquerade). \
                 `direct`: the same flood to the pod's own address, routed by `ext` via \
                 node-a and forwarded by node-a's kernel past the same programs, untranslated \
                 (node-a sends no ICMP redirects and `ext` takes none, so it stays on that \
                 way). \
                 Back-to-back direct/NodePort pairs, order alternating. On veth the sender and \
                 every hop run in softirq on the sender's CPU, so each figure is the whole \
                 chain's cost per packet, node-a's program being one part of it.\n",
                p.client_cpu
            );
            pps_table(&mut out, &p.pps);
        }

        if let Some(why) = &p.pps_gen_skipped {
            let _ = writeln!(
                out,
                "\n### Packets per second through node-a alone: an XDP frame generator\n\n\
                 Not measured: {why}.\n"
            );
        }
        if !p.pps_gen.is_empty() {
            let _ = writeln!(
                out,
                "\n### Packets per second through node-a alone: an XDP frame generator\n\n\
                 The same testbed, Service and configurations. Instead of `ext`'s socket, the \
                 kernel's XDP live-frame test mode (BPF_PROG_TEST_RUN with \
                 BPF_F_TEST_XDP_LIVE_FRAMES, batches of 64, pinned to CPU {}) redirects copies \
                 of one prepared frame (18-byte UDP datagram from `ext`'s address) from the LAN \
                 side of node-a's veth into node-a's `eth0`. {} Sent: frames generated per \
                 second; delivered: counted at the sink per second.\n",
                p.client_cpu,
                if p.pps_gen_sink == "bpf" {
                    "What node-a sends on is counted and dropped on that LAN side, before any \
                     stack processing, by BPF programs matching the backend's address and port \
                     (a mistranslated packet is not counted): at tc ingress for the skbs \
                     node-a sends, and at XDP while node-a runs XDP (veth's XDP_TX wakes a peer \
                     only if it has an XDP program): for the frames node-a's XDP sends back \
                     out before any skb exists, as a NIC would put them on the wire, and then \
                     also for the skbs of the direct runs. The configurations take turns: \
                     each round runs one direct/NodePort pair per family in every \
                     configuration, their order rotated per round (this VM's speed drifts by \
                     tens of percent within minutes). GRO is off on the LAN side, on on node-a's `eth0` (it \
                     gives a veth without an XDP program the NAPI instance redirected frames \
                     need). So node-b, the sender's own stack and the receiving side's stack \
                     are no part of the figure."
                } else {
                    "What node-a sends on is counted and dropped on that LAN side by an \
                     nftables `netdev` ingress rule matching the backend's address and port (a \
                     mistranslated packet is not counted), so node-b and the sender's own stack \
                     are no part of the figure. Both veth ends have GRO on, which gives a veth \
                     without an XDP program the NAPI instance redirected frames need; the LAN \
                     side has an XDP_PASS program only while node-a runs XDP (veth's XDP_TX \
                     wakes a peer only if it has one), so the XDP configuration pays an skb \
                     build on the LAN side that the others pay inside node-a."
                }
            );
            pps_table(&mut out, &p.pps_gen);
        }

        if let Some(s) = &p.scale {
            let _ = writeln!(
                out,
                "\n### {} pod veths\n\n\
                 A fresh ptp testbed without pods: {} host-side veths in node-a (`pveth<i>`; \
                 peers in one extra namespace, both ends up), each with a route \
                 `10.244.100.x/32` or `10.244.101.x/32 dev pveth<i> scope link` (outside the \
                 pod CIDRs in use); made with `ip -batch` in {:.1} s. Then one EndpointSlice \
                 listing the {} addresses on node-a (its Service written before), written at \
                 once.\n",
                s.veths,
                s.veths,
                s.create_ms / 1e3,
                s.veths
            );
            let _ = writeln!(out, "| what | value |\n|---|---:|");
            let opt_ms = |v: Option<f64>| v.map_or("not reached".into(), |v| format!("{v:.0} ms"));
            let _ = writeln!(
                out,
                "| slice written -> all {} attached (the last attach line) | {} |",
                s.veths,
                opt_ms(s.all_attached_ms)
            );
            let _ = writeln!(
                out,
                "| slice written -> first attached | {} |",
                opt_ms(s.first_attached_ms)
            );
            let _ = writeln!(
                out,
                "| slice written -> the harness saw every attach line | {:.0} ms |",
                s.observed_ms
            );
            if let Some(a) = &s.per_attach {
                let _ = writeln!(
                    out,
                    "| one attach, the agent's own figure: p50 / p99 / max | {:.1} / {:.1} / \
                     {:.1} ms |",
                    a.p50, a.p99, a.max
                );
            }
            let k = s.per_attach_ms.len() / 5;
            if k > 0 {
                let first = Summary::of(&s.per_attach_ms[..k]);
                let last = Summary::of(&s.per_attach_ms[s.per_attach_ms.len() - k..]);
                if let (Some(first), Some(last)) = (first, last) {
                    let _ = writeln!(
                        out,
                        "| one attach, p50 of the first {k} / of the last {k} | {:.1} / {:.1} ms |",
                        first.p50, last.p50
                    );
                }
            }
            let _ = writeln!(
                out,
                "| attach lines / pod interfaces `status` lists | {} / {} |",
                s.attached, s.status_pod_interfaces
            );
            let mib = |b: u64| b as f64 / MIB;
            let _ = writeln!(
                out,
                "| agent RSS: started, no veths | {:.1} MiB |\n\
                 | agent RSS: {} veths, none attached (just before the slice) | {:.1} MiB |\n\
                 | agent RSS: {} attached | {:.1} MiB (peak {:.1} MiB) |",
                mib(s.rss_start_bytes),
                s.veths,
                mib(s.rss_before_bytes),
                s.veths,
                mib(s.rss_after_bytes),
                mib(s.peak_rss_bytes)
            );
        }
        out
    }
}

fn not_measured(name: &str) -> TargetRow {
    TargetRow {
        target: name.to_string(),
        value: "not measured".into(),
        met: None,
        why: "the run did not get that far".into(),
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} ms"))
}

/// Looks for a TrueType font for the plot's labels; without one the plot has no text.
fn font() -> Option<&'static [u8]> {
    [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ]
    .iter()
    .find_map(|p| std::fs::read(p).ok())
    .map(|bytes| &*Box::leak(bytes.into_boxed_slice()))
}

/// Grouped bars: ratio to direct per Service count and configuration, whiskers min-max; and
/// single-change latency per peer.
pub fn plot(report: &Report, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let text = match font() {
        Some(bytes) => plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map(|()| true)
            .unwrap_or(false),
        None => false,
    };
    let err = |e: &dyn std::fmt::Debug| anyhow!("{e:?}");
    let panels = [
        (Test::Crr, "svc-mid", "TCP_CRR, middle Service"),
        (Test::Crr, "svc-last", "TCP_CRR, last Service"),
        (Test::Crr, "pod-to-pod", "TCP_CRR, pod to pod via node"),
        (Test::Rr, "svc-mid", "TCP_RR, middle Service"),
        (Test::Udp, "svc-mid", "UDP_RR, middle Service"),
    ];
    let colors = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xd6, 0x27, 0x28),
    ];
    let ns: Vec<usize> = report.settings.services.clone();
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, body) = root.split_vertically(60);
    if text {
        top.draw(&Text::new(
            format!(
                "Rate relative to direct (1.0 = client straight to a backend), median and \
                 min-max; {} CPUs, kernel {}",
                report.machine.cpus, report.machine.kernel
            ),
            (20, 10),
            ("sans-serif", 20),
        ))
        .map_err(|e| err(&e))?;
        for (i, peer) in PEERS.iter().enumerate() {
            let x = 20 + 220 * i as i32;
            top.draw(&Rectangle::new([(x, 38), (x + 16, 54)], colors[i].filled()))
                .map_err(|e| err(&e))?;
            top.draw(&Text::new(
                peer.to_string(),
                (x + 22, 38),
                ("sans-serif", 16),
            ))
            .map_err(|e| err(&e))?;
        }
    }
    let areas = body.split_evenly((2, 3));
    for (area, (test, target, title)) in areas.iter().zip(panels) {
        let max = report
            .datapath
            .iter()
            .filter(|r| r.test == test.name() && r.target == target)
            .filter_map(|r| r.ratio.as_ref().map(|s| s.max))
            .fold(1.2f64, f64::max);
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if text {
            builder
                .caption(title, ("sans-serif", 18))
                .x_label_area_size(30)
                .y_label_area_size(45);
        }
        let mut chart = builder
            .build_cartesian_2d(0f64..ns.len() as f64, 0f64..max * 1.05)
            .map_err(|e| err(&e))?;
        if text {
            let labels = ns.clone();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(ns.len() * 2 + 1)
                .x_label_formatter(&move |x| {
                    let i = (*x - 0.5).round();
                    if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                        format!("{} Services", labels[i as usize])
                    } else {
                        String::new()
                    }
                })
                .y_labels(8)
                .draw()
                .map_err(|e| err(&e))?;
        } else {
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_labels(0)
                .draw()
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series(LineSeries::new(
                [(0.0, 1.0), (ns.len() as f64, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
        let width = 0.8 / PEERS.len() as f64;
        for (g, n) in ns.iter().enumerate() {
            for (i, peer) in PEERS.iter().enumerate() {
                let Some(s) = report
                    .datapath
                    .iter()
                    .find(|r| {
                        r.services == *n
                            && r.test == test.name()
                            && r.target == target
                            && r.config == *peer
                    })
                    .and_then(|r| r.ratio.clone())
                else {
                    continue;
                };
                let x0 = g as f64 + 0.1 + width * i as f64;
                let x1 = x0 + width * 0.9;
                let xm = (x0 + x1) / 2.0;
                chart
                    .draw_series([Rectangle::new([(x0, 0.0), (x1, s.p50)], colors[i].filled())])
                    .map_err(|e| err(&e))?;
                chart
                    .draw_series(LineSeries::new(
                        [(xm, s.min), (xm, s.max)],
                        BLACK.stroke_width(2),
                    ))
                    .map_err(|e| err(&e))?;
            }
        }
    }
    if let Some(area) = areas.get(panels.len()) {
        plot_changes(report, area, &ns, &colors, text)?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Single-change latency per peer (p50 bars, whiskers to p99), log scale, milliseconds.
fn plot_changes<DB: plotters::prelude::DrawingBackend>(
    report: &Report,
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    ns: &[usize],
    colors: &[plotters::prelude::RGBColor],
    text: bool,
) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let err = |e: &dyn std::fmt::Debug| anyhow!("{e:?}");
    let what = |peer: &str| match peer {
        "bpf" => "single change: manifest written -> maps hold it",
        "nftables" => "single change: nft -f (partial transaction)",
        _ => "single change: iptables-restore --noflush (partial)",
    };
    let e = report.settings.endpoints;
    let find = |n: usize, peer: &str| {
        report
            .control_plane
            .iter()
            .find(|r| r.services == n && r.endpoints == e && r.peer == peer && r.what == what(peer))
            .and_then(|r| r.summary.clone())
    };
    let max = ns
        .iter()
        .flat_map(|n| PEERS.iter().filter_map(move |p| find(*n, p).map(|s| s.p99)))
        .fold(10.0f64, f64::max);
    let floor = 1.0;
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(
                "single change, ms (log): bpf file -> maps, others the restore",
                ("sans-serif", 18),
            )
            .x_label_area_size(30)
            .y_label_area_size(45);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..ns.len() as f64, (floor..max * 2.0).log_scale())
        .map_err(|e| err(&e))?;
    let labels = ns.to_vec();
    let x_label = move |x: &f64| {
        let i = (*x - 0.5).round();
        if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
            format!("{} Services", labels[i as usize])
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        mesh.x_labels(ns.len() * 2 + 1).x_label_formatter(&x_label);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(&e))?;
    let width = 0.8 / PEERS.len() as f64;
    for (g, n) in ns.iter().enumerate() {
        for (i, peer) in PEERS.iter().enumerate() {
            let Some(s) = find(*n, peer) else { continue };
            let x0 = g as f64 + 0.1 + width * i as f64;
            let x1 = x0 + width * 0.9;
            let xm = (x0 + x1) / 2.0;
            chart
                .draw_series([Rectangle::new(
                    [(x0, floor), (x1, s.p50.max(floor))],
                    colors[i].filled(),
                )])
                .map_err(|e| err(&e))?;
            chart
                .draw_series(LineSeries::new(
                    [(xm, s.p50.max(floor)), (xm, s.p99.max(floor))],
                    BLACK.stroke_width(2),
                ))
                .map_err(|e| err(&e))?;
        }
    }
    Ok(())
}

/// The packets-per-second table of `rows`, the ratios against #23's targets per family, and
/// each row's program run times and datapath counters.
fn pps_table(out: &mut String, rows: &[PpsRow]) {
    let _ = writeln!(
        out,
        "| node-a's datapath | family | NodePort: sent / delivered (/s) | direct: sent / \
         delivered (/s) | delivered NodePort / direct, median paired [min-max] |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---|");
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} | {} / {} | {} |",
            if r.xdp == "-" {
                format!("{} (kube-proxy's rules)", r.config)
            } else {
                format!("{} (`--xdp {}`)", r.config, r.xdp)
            },
            r.family,
            f(r.sent),
            f(r.delivered),
            f(r.direct_sent),
            f(r.direct_delivered),
            r.summary.as_ref().map_or("-".into(), |s| format!(
                "{:.3} [{:.3}-{:.3}] over {}",
                s.p50, s.min, s.max, s.n
            ))
        );
    }
    for family in ["IPv4", "IPv6"] {
        let by = |c: &str| {
            rows.iter()
                .find(|r| r.config == c && (r.family == family || r.family.is_empty()))
                .and_then(|r| r.delivered)
        };
        if let (Some(x), Some(t)) = (by("xdp"), by("tc")) {
            let _ = writeln!(
                out,
                "\n{family}: XDP / tc, delivered packets per second: {:.2} (target >= 2).",
                x / t
            );
        }
        let best_peer = ["nftables", "iptables-nft"]
            .into_iter()
            .filter_map(|c| Some((c, by(c)?)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((peer, best)) = best_peer {
            for ours in ["tc", "xdp"] {
                if let Some(v) = by(ours) {
                    let _ = writeln!(
                        out,
                        "{family}: {ours} / the best peer ({peer}), delivered packets per \
                         second: {:.2}.",
                        v / best
                    );
                }
            }
        }
    }
    for r in rows {
        let ns: Vec<String> = r
            .program_ns
            .iter()
            .filter_map(|(name, ns)| Some(format!("{name} {:.0} ns", (*ns)?)))
            .collect();
        if !ns.is_empty() {
            let _ = writeln!(
                out,
                "- {} {}: node-a's programs per run (the kernel's BPF run-time statistics, \
                 on for one more NodePort run after the pairs, off during them): {}.",
                r.config,
                r.family,
                ns.join(", ")
            );
        }
        if !r.counters.is_empty() {
            let list: Vec<String> = r.counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                out,
                "- {} {}: datapath counters after the runs: {}.",
                r.config,
                r.family,
                list.join(", ")
            );
        }
    }
}
