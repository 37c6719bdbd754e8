//! `kube-bpf-proxy run`: load and attach the datapath, then keep it equal to the source.

use std::{
    net::{IpAddr, SocketAddr},
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
use proxy_common::{ct::CtTimeouts, maps as names, reason::Reason};

use crate::{
    agent::{self, Observers, SyncTiming},
    compile::{Family, NodePortSelection, nodeport_addresses},
    datapath::{
        bpf::{self, Datapath, MapSizes},
        caps, foreign, netdev, netlink, netns, podif,
    },
    health::{DEFAULT_HEALTH_TIMEOUT, Health},
    http::{self, HttpState, Role},
    metrics::{Metrics, Series},
    portrange::{self, PortRange},
    snapshot::{ProxyConfig, Snapshot},
    source::NodeAddresses,
};

#[derive(clap::Args)]
pub struct RunArgs {
    /// kube-proxy's configuration file: a KubeProxyConfiguration
    /// (kubeproxy.config.k8s.io/v1alpha1) in YAML or JSON, such as kubeadm's config.conf. Its
    /// fields set the flags not given on the command line; kube-proxy's own flags given next to
    /// it lose to the fields the file sets, as in kube-proxy (--hostname-override and logging
    /// excepted), this proxy's own flags win; fields without a meaning
    /// here are listed in one warning; an invalid file stops the agent with an error naming the
    /// field. When the file's content changes the agent exits (status 2), leaving the datapath
    /// serving, to be restarted with it, as kube-proxy does. The README lists how each field
    /// maps.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The kernel's own (netfilter) connection tracking, which the node's other traffic still
    /// goes through: `kube-proxy` sets it up as kube-proxy does at its start (nf_conntrack_max,
    /// its hash size and TCP timeouts, from --config or kube-proxy's --conntrack-* flags, else
    /// kube-proxy's defaults); `leave` leaves it as it is.
    #[arg(long, value_enum, default_value_t = NetfilterConntrack::KubeProxy)]
    pub netfilter_conntrack: NetfilterConntrack,
    /// How long a change may wait unsynced before /healthz answers 503: twice the sync period
    /// of the `--config` file or kube-proxy's flags (set by `main`, not a flag); else
    /// kube-proxy's default, 60 s.
    #[arg(skip)]
    pub health_timeout: Option<Duration>,
    /// kube-proxy's settings of the kernel's own connection tracking, from the `--config` file
    /// or kube-proxy's flags, else kube-proxy's defaults (set by `main`, not a flag).
    #[arg(skip)]
    pub netfilter: Option<crate::datapath::nfct::NetfilterSettings>,
    /// The `--config` file's content as it was read (set by `main`, not a flag): the agent
    /// exits when the file changes.
    #[arg(skip)]
    pub config_loaded: Option<Vec<u8>>,
    #[command(flatten)]
    pub source: SourceArgs,
    /// cgroup v2 directory to attach the socket hooks to (default: the cgroup2 root, so every
    /// process on the node, pods and host, is covered).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Pin directory on a bpffs.
    #[arg(long, default_value = bpf::DEFAULT_PIN_DIR)]
    pub bpffs: PathBuf,
    /// Capacity of the frontend maps (per family). For this and the other --max-* flags: a map
    /// pinned with another size is replaced on start by one of this size, its entries carried
    /// over.
    #[arg(long, default_value_t = MapSizes::default().services)]
    pub max_services: u32,
    /// Capacity of the backend map.
    #[arg(long, default_value_t = MapSizes::default().backends)]
    pub max_backends: u32,
    /// Capacity of the slot and member maps (backends summed over frontends, weights counted).
    /// LB_SLOTS holds 16 slots per entry: it is sized max-slots / 16 + max-services entries,
    /// room for that many slots however they are spread.
    #[arg(long, default_value_t = MapSizes::default().slots)]
    pub max_slots: u32,
    /// Capacity of the session affinity map (LRU). Default: from the node's memory
    /// (--map-memory-ratio).
    #[arg(long)]
    pub max_affinity: Option<u32>,
    /// Capacity of the socket reverse-translation maps and of the unconnected sockets' datagram
    /// flows (LRU). Default: from the node's memory.
    #[arg(long)]
    pub max_sock_revnat: Option<u32>,
    /// Share of the node's memory the per-flow maps (connection tracking, socket records,
    /// session affinity; all preallocated LRU maps) may take together when their --max-* flag
    /// is not given: 0.00035 gives 16,384 entries each up to 24 GiB of memory, 33,000 at
    /// 48 GiB, 174,000 at 256 GiB.
    #[arg(long, default_value_t = bpf::FLOW_MEMORY_RATIO)]
    pub map_memory_ratio: f64,
    /// Also cut TCP connections to a removed backend (kube-proxy leaves them; connected UDP
    /// sockets are always terminated).
    #[arg(long)]
    pub terminate_tcp: bool,
    /// Do not terminate sockets connected to removed backends at all.
    #[arg(long, conflicts_with = "terminate_tcp")]
    pub no_socket_termination: bool,
    /// Capacity of the connection-tracking maps of the tc path (LRU, per family). Default: from
    /// the node's memory (--map-memory-ratio).
    #[arg(long)]
    pub max_conntrack: Option<u32>,
    /// Interfaces where traffic from outside the node arrives; tc translates NodePort,
    /// externalIP and load balancer traffic there. Default: the interfaces of the default
    /// routes in every routing table, those holding the Node object's addresses, and those
    /// holding a NodePort address (a second network without a default route; not one facing
    /// pods or an overlay), followed as they come (each stays external until it disappears; XDP
    /// only on default-route interfaces present at the start). Named ones are attached
    /// whenever they exist. An empty value turns the tc path off.
    #[arg(long, value_delimiter = ',')]
    pub external_interfaces: Option<Vec<String>>,
    /// XDP on the external interfaces: auto (driver mode where possible, else tc alone),
    /// driver, generic, or off.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp: bpf::XdpChoice,
    /// NodePort traffic to backends on other nodes: snat (kube-proxy's masquerading) or dsr
    /// (the backend's node answers the client directly, IPv4 and IPv6; every node must run the
    /// agent).
    #[arg(long, value_enum, default_value_t = NodePortMode::Snat)]
    pub nodeport_mode: NodePortMode,
    /// Where pods' connections to Services are translated, for namespaces without the
    /// `kube-bpf-proxy.io/socket-lb` label: enabled (at connect()/sendmsg(), once per
    /// connection) or disabled (per packet at tc on the pod's interface, after the pod's own
    /// netfilter rules, as service meshes need). The label (`enabled` or `disabled`) wins.
    #[arg(long, value_enum, default_value_t = SocketLbFlag::Enabled)]
    pub socket_lb_default: SocketLbFlag,
    /// kube-proxy's --masquerade-all: every connection to a ClusterIP is masqueraded to a
    /// node address, so backends see the node, not the client pod. Pods' Services are then
    /// translated per packet at tc on their interfaces (the socket layer cannot masquerade),
    /// whatever `--socket-lb-default` and the namespace labels say; host processes keep the
    /// socket layer (their connections leave from a node address anyway).
    #[arg(long)]
    pub masquerade_all: bool,
    /// Source ports of masqueraded flows, LOW-HIGH. Must lie outside the node's ephemeral
    /// ports (net.ipv4.ip_local_port_range), or the agent refuses to start: a masqueraded flow
    /// and a connection of the node itself could claim the same tuple. Default: the ports above
    /// the ephemeral range (61000-65535 with Linux's default 32768-60999), else those below it.
    #[arg(long)]
    pub masquerade_port_range: Option<PortRange>,
    /// DSR mode: new reply entries one client address may make this node learn per second
    /// from packets carrying the DSR option (more are refused and counted as
    /// dsr_budget_exceeded).
    #[arg(long, default_value_t = proxy_common::config::DSR_BUDGET_DEFAULT)]
    pub dsr_learn_budget: u32,
    /// How often every map is read back and compared with what the agent wrote; drift is
    /// logged, counted (kube_bpf_proxy_drift_repairs_total) and repaired. kube-proxy's flag,
    /// one unit: 300s, 5m, 1h; 0 reads back at start-up only.
    #[arg(long, default_value = "5m", value_parser = parse_period)]
    pub sync_period: Duration,
    /// Pod-facing interfaces, where tc translates replies of local backends and pod traffic to
    /// external frontends: `auto` (the interfaces the kernel routes this node's endpoints and
    /// pod CIDRs through, followed as pods come and go), interface names (attached when they
    /// appear), glob patterns (`cali*`, `lxc*`, `veth*`, `eni*`, `gke*`), or `none`.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub pod_interfaces: Vec<String>,
    /// Address for /metrics (Prometheus); empty disables it. Default 127.0.0.1:10249, or
    /// [::1]:10249 with an IPv6 --bind-address.
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Address for /healthz and /livez; empty disables it. Default 0.0.0.0:10256, or
    /// [::]:10256 with an IPv6 --bind-address.
    #[arg(long)]
    pub healthz_bind_address: Option<String>,
    /// kube-proxy's deprecated --metrics-port: the port of a --metrics-bind-address given
    /// without one (default 10249); 0 disables the metrics server. Not read next to --config.
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// kube-proxy's deprecated --healthz-port: the port of a --healthz-bind-address given
    /// without one (default 10256); 0 disables the health server. Not read next to --config.
    #[arg(long, value_name = "PORT")]
    pub healthz_port: Option<u16>,
    /// Exit when the metrics or health address cannot be bound (default: log and go on
    /// without it).
    #[arg(long)]
    pub bind_address_hard_fail: bool,
    /// Write this value to /proc/self/oom_score_adj at start (-1000 to 1000), as kube-proxy
    /// does with its default, -999. A failure is a warning. [default: -999]
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub oom_score_adj: Option<i32>,
    /// Idle timeout of an open, answered TCP flow in the connection-tracking maps of the tc
    /// path (Go duration: 24h, 90m, 1h30m), kube-proxy's default; a flow never answered is
    /// kept 2 minutes (netfilter's SYN_SENT timeout). Given on the command line without
    /// --config, it also sets the kernel's own table's, as kube-proxy's flag of the same name
    /// does; 0 leaves the kernel's alone and keeps 24h here.
    #[arg(long, default_value = "24h", value_parser = super::config::parse_go_duration)]
    pub conntrack_tcp_timeout_established: Duration,
    /// Idle timeout of a UDP or SCTP flow in the connection-tracking maps, answered or not,
    /// and of an unconnected socket's datagrams to one Service address (kept on one backend
    /// until idle this long) (Go duration). kube-proxy's --conntrack-udp-timeout and
    /// --conntrack-udp-timeout-stream both map here; 0 keeps 120s.
    #[arg(long, default_value = "120s", value_parser = super::config::parse_go_duration)]
    pub conntrack_udp_timeout: Duration,
    /// kube-proxy's flags that `run` has no flag of its own for (last in the help).
    #[command(flatten)]
    pub kube_proxy: super::config::flags::KubeProxyFlags,
}

/// `--netfilter-conntrack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NetfilterConntrack {
    KubeProxy,
    Leave,
}

/// /configz's document (semantics 8.10): the settings the agent runs with, as the fields of
/// kube-proxy's KubeProxyConfiguration they stand for, under kube-proxy's key. `node`: the
/// node name; the health and metrics addresses as served.
fn configz(args: &RunArgs, node: &str, healthz: &str, metrics: &str) -> String {
    use super::config::format_go_duration as go;
    let netfilter = args.netfilter.clone().unwrap_or_default();
    let secs = |s: Option<u64>| s.map(|s| go(Duration::from_secs(s)));
    serde_json::json!({
        "kubeproxy.config.k8s.io": {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "bindAddress": args
                .source
                .bind_address
                .map_or_else(|| "0.0.0.0".to_string(), |a| a.to_string()),
            "bindAddressHardFail": args.bind_address_hard_fail,
            "clientConnection": {
                "kubeconfig": args
                    .source
                    .kubeconfig
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            },
            "configSyncPeriod": go(args.sync_period),
            "conntrack": {
                "tcpEstablishedTimeout": go(flow_timeouts(args).0),
                "tcpCloseWaitTimeout": secs(netfilter.tcp_close_wait_secs),
                "tcpBeLiberal": true,
                "udpTimeout": go(flow_timeouts(args).1),
            },
            "enableProfiling": false,
            // The gates this proxy honours, as set (the others are warned about or listed).
            "featureGates": if args.source.ignore_node_hints {
                serde_json::json!({"PreferSameTrafficDistribution": false})
            } else {
                serde_json::json!({})
            },
            "healthzBindAddress": healthz,
            "hostnameOverride": node,
            "metricsBindAddress": metrics,
            "mode": crate::http::PROXY_MODE,
            "nftables": { "masqueradeAll": args.masquerade_all },
            "nodePortAddresses": args.source.nodeport_addresses,
            "oomScoreAdj": args.oom_score_adj.unwrap_or(super::config::OOM_SCORE_ADJ),
        }
    })
    .to_string()
}

/// kube-proxy's default addresses for /healthz and /metrics: IPv6 when --bind-address is an
/// IPv6 address, else IPv4 (semantics 11.10).
pub fn default_http_addresses(bind_address: Option<IpAddr>) -> (&'static str, &'static str) {
    match bind_address {
        Some(IpAddr::V6(_)) => ("[::]:10256", "[::1]:10249"),
        _ => ("0.0.0.0:10256", "127.0.0.1:10249"),
    }
}

/// kube-proxy's default ports of the health and metrics servers.
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

/// The addresses the health and metrics servers listen on ("" when off), as kube-proxy
/// completes its flags (semantics 8.7, 8.10, 11.10): the address given, else the default; an
/// address given as an IP alone gets the port, kube-proxy's AppendPortIfNeeded; without
/// `--config`, the deprecated `--healthz-port`/`--metrics-port` give that port, and 0 turns
/// the server off.
pub fn http_addresses(args: &RunArgs) -> (String, String) {
    let (healthz, metrics) = default_http_addresses(args.source.bind_address);
    let complete = |given: &Option<String>, default: &str, port: Option<u16>, fallback: u16| {
        let port = if args.config.is_none() {
            port.unwrap_or(fallback)
        } else {
            fallback
        };
        if port == 0 {
            return String::new();
        }
        append_port_if_needed(given.as_deref().unwrap_or(default), port)
    };
    (
        complete(
            &args.healthz_bind_address,
            healthz,
            args.healthz_port,
            HEALTHZ_PORT,
        ),
        complete(
            &args.metrics_bind_address,
            metrics,
            args.metrics_port,
            METRICS_PORT,
        ),
    )
}

/// `addr` with `port` when it is an IP address alone (`0.0.0.0`, `::`, `[::1]`); anything
/// else as it is (an address with a port; "" turns the server off; anything else fails to
/// bind, with its own error).
fn append_port_if_needed(addr: &str, port: u16) -> String {
    let addr = addr.trim();
    if addr.parse::<SocketAddr>().is_ok() {
        return addr.to_string();
    }
    let bare = addr
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(addr);
    match bare.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => addr.to_string(),
    }
}

/// The tc path's idle timeouts (TCP established, UDP): 0, which to kube-proxy's flags means
/// "leave the kernel's value alone" (semantics 11.12), keeps this proxy's defaults for its
/// own maps.
pub fn flow_timeouts(args: &RunArgs) -> (Duration, Duration) {
    let or = |d: Duration, default: Duration| if d.is_zero() { default } else { d };
    (
        or(
            args.conntrack_tcp_timeout_established,
            TCP_ESTABLISHED_DEFAULT,
        ),
        or(args.conntrack_udp_timeout, UDP_TIMEOUT_DEFAULT),
    )
}

/// The defaults of --conntrack-tcp-timeout-established and --conntrack-udp-timeout.
pub const TCP_ESTABLISHED_DEFAULT: Duration = Duration::from_secs(24 * 3600);
pub const UDP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(120);

/// The collector's timeouts from the flags, in whole seconds (at least 1).
fn ct_timeouts(tcp: Duration, udp: Duration) -> CtTimeouts {
    let secs = |d: Duration| (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1);
    CtTimeouts {
        tcp_secs: secs(tcp),
        other_secs: secs(udp),
        ..CtTimeouts::DEFAULT
    }
}

/// `http::raise_open_files_limit`, logged.
fn raise_nofile_limit() {
    match crate::http::raise_open_files_limit() {
        Ok((before, after)) if before < after => {
            log::debug!("open files: soft limit raised from {before} to {after}")
        }
        Ok(_) => {}
        Err(e) => log::warn!("open files: cannot raise the soft limit: {e}"),
    }
}

/// Writes `adj` to /proc/self/oom_score_adj; a failure (no CAP_SYS_RESOURCE to lower it) is a
/// warning, as in kube-proxy.
fn set_oom_score_adj(adj: i32) {
    match std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
        Ok(()) => log::info!("oom_score_adj set to {adj}"),
        Err(e) => log::warn!("cannot set oom_score_adj to {adj}: {e}"),
    }
}

/// Serves one of the HTTP servers; an address that cannot be bound is logged and tried again
/// every 5 s until it can (kube-proxy's behaviour, semantics 8.10: the kube-proxy this agent
/// replaces may hold it for a while), unless `hard_fail` (--bind-address-hard-fail).
fn serve(what: &str, addr: &str, state: &Arc<HttpState>, hard_fail: bool) -> anyhow::Result<()> {
    if addr.is_empty() {
        return Ok(());
    }
    match http::serve(addr, Arc::clone(state)) {
        Ok(_) => log::info!("serving {what} on {addr}"),
        Err(e) if hard_fail => anyhow::bail!("cannot serve {what} on {addr}: {e}"),
        Err(e) => {
            log::error!(
                "cannot serve {what} on {addr}: {e}; trying again every {} s",
                http::BIND_RETRY.as_secs()
            );
            let what = what.to_string();
            http::serve_when_free(
                addr.to_string(),
                Arc::clone(state),
                http::BIND_RETRY,
                move |local, attempts| {
                    log::info!("serving {what} on {local} (bound at attempt {attempts})");
                },
            );
        }
    }
    Ok(())
}

/// Refreshes map fill levels and datapath counters in the metrics every few seconds.
fn poll_kernel_counters(
    pin_dir: PathBuf,
    metrics: Arc<Metrics>,
    counts: Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, u32>>>,
) {
    thread::spawn(move || {
        let mut evicted_seen = [0u64; 2];
        let mut refused_seen = [0u64; 2];
        loop {
            report_dsr_refusals(&pin_dir, &mut refused_seen);
            // Counters are read before and after the entries are counted: evictions are then
            // bounded from below (see `evicted_at_least`), never overestimated by sockets
            // created or released meanwhile.
            let before = bpf::Maps::open_pinned(&pin_dir).and_then(|m| m.stats());
            if let Ok(memlock) = bpf::map_memlock(&pin_dir) {
                for (map, bytes) in memlock {
                    metrics.map_memlock.with(&[("map", map)]).set(bytes);
                }
            }
            let known = counts.lock().expect("map counts").clone();
            match bpf::map_fill_known(&pin_dir, &known) {
                Ok(fill) => {
                    for (map, used, max) in &fill {
                        metrics.set_map_fill(map, (*used).into(), (*max).into());
                    }
                    if let Ok(before) = &before
                        && let Ok(after) = bpf::Maps::open_pinned(&pin_dir).and_then(|m| m.stats())
                    {
                        report_evictions(before, &after, &fill, &metrics, &mut evicted_seen);
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
            match bpf::Maps::open_pinned(&pin_dir).and_then(|m| m.drops()) {
                Ok(drops) => {
                    let totals: Vec<(&str, &str, u64)> = drops
                        .iter()
                        .map(|(hook, reason, n)| (hook.name(), reason.name(), *n))
                        .collect();
                    metrics.set_drop_totals(&totals);
                }
                Err(e) => log::debug!("drop counters: {e:#}"),
            }
            thread::sleep(Duration::from_secs(5));
        }
    });
}

/// Socket records evicted from an LRU map, at least: records created (read first) minus
/// records deleted at release (read last) minus records present (counted in between). Every
/// term errs towards fewer evictions, so a socket opened or closed during the reading is never
/// taken for an eviction.
pub fn evicted_at_least(created_before: u64, deleted_after: u64, present: u64) -> u64 {
    created_before
        .saturating_sub(deleted_after)
        .saturating_sub(present)
}

/// Packets carrying the DSR option that taught this node nothing (`dsr_refused`,
/// `dsr_budget_exceeded`, also in the metrics): a log line whenever their number grew.
fn report_dsr_refusals(pin_dir: &std::path::Path, seen: &mut [u64; 2]) {
    let Ok(stats) = bpf::Maps::open_pinned(pin_dir).and_then(|m| m.stats()) else {
        return;
    };
    let total = |reason: Reason| stats.iter().find(|(r, _)| *r == reason).map_or(0, |s| s.1);
    let refused = total(Reason::DsrRefused);
    if refused > seen[0] {
        log::warn!(
            "refused {} packets carrying the DSR option ({refused} so far): this node is not in \
             DSR mode, or the sender is no peer node (LB_DSR_PEERS) or not its neighbour on the \
             arrival interface, or the frontend is no Service frontend here, or the option is \
             malformed",
            refused - seen[0]
        );
        seen[0] = refused;
    }
    let over = total(Reason::DsrBudgetExceeded);
    if over > seen[1] {
        log::warn!(
            "refused {} packets carrying the DSR option because their client address exceeded \
             --dsr-learn-budget ({over} so far)",
            over - seen[1]
        );
        seen[1] = over;
    }
}

/// `N`, `Ns`, `Nm` or `Nh` (whole numbers).
fn parse_period(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.trim().find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.trim().split_at(i),
        None => (s.trim(), "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a whole number with s, m or h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// How often the DSR peer thread looks for new node addresses.
const PEERS_TICK: Duration = Duration::from_millis(200);
/// How often the DSR peer thread has the kernel resolve its IPv6 peers' neighbour entries.
const PEERS_NEIGHBOURS: Duration = Duration::from_secs(30);

/// Has the kernel resolve the neighbour entry of every IPv6 peer this node reaches directly.
/// A node that receives DSR packets believes them only from the MAC address its neighbour
/// table holds for the sending node (`dsr::from_peer`). IPv4 fills that entry by itself (the
/// sender's ARP request names its address), IPv6 does not: the sender solicits from its
/// link-local address, so the entry for its global address exists only once this node has
/// sent it something. Entries age as usual; this runs again every `PEERS_NEIGHBOURS`.
fn resolve_peer_neighbours(addresses: &std::collections::BTreeSet<IpAddr>) {
    let mut rtnl = match netlink::Rtnl::new() {
        Ok(r) => r,
        Err(e) => {
            log::warn!("DSR peers: rtnetlink: {e}");
            return;
        }
    };
    for addr in addresses.iter().filter(|a| a.is_ipv6()) {
        if let Ok(netlink::RouteHit::Direct { oif }) = rtnl.route_get(*addr)
            && let Err(e) = rtnl.use_neighbour(oif, *addr)
        {
            log::debug!("DSR peers: resolve the neighbour {addr}: {e}");
        }
    }
}

/// Moves `LB_ROUTE_GEN` on at every link, address, route, neighbour, routing-rule or
/// forwarding-setting change of the node's network namespace (and once at start): XDP and tc
/// remember a tracked flow's route per CPU, for at most a second, only within the generation
/// they looked it up in, so a change is followed at once while the agent runs. A lost event
/// (the socket's buffer overran) counts as a change.
fn follow_route_changes(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let mut generation = bpf::RouteGeneration::open_pinned(pin_dir)?;
    let mut events = crate::datapath::netlink::Events::subscribe_with_neighbours()
        .context("subscribe to the node's route and neighbour changes")?;
    generation.bump()?;
    thread::Builder::new()
        .name("route-changes".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                if !events.wait(Duration::from_secs(3600)) {
                    continue;
                }
                match generation.bump() {
                    Ok(_) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        log::warn!("route changes: {e:#}; followed within a second instead");
                    }
                    Err(_) => {}
                }
            }
        })?;
    Ok(())
}

/// Keeps `LB_DSR_PEERS`/`LB_DSR_PEERS6` equal to the addresses of the cluster's Node objects as the
/// source reports them in `book`; with no book (not in DSR mode) empties it once.
fn follow_dsr_peers(pin_dir: PathBuf, book: Option<Arc<NodeAddresses>>) -> anyhow::Result<()> {
    let Some(book) = book else {
        bpf::DsrPeers::open_pinned(&pin_dir)?.sync(&Default::default())?;
        return Ok(());
    };
    thread::Builder::new()
        .name("dsr-peers".into())
        .spawn(move || {
            let mut done = 0;
            let mut resolved = std::time::Instant::now();
            loop {
                let (generation, addresses) = book.get();
                if generation != 0 && (generation != done || resolved.elapsed() >= PEERS_NEIGHBOURS)
                {
                    resolve_peer_neighbours(&addresses);
                    resolved = std::time::Instant::now();
                }
                if generation != 0 && generation != done {
                    match bpf::DsrPeers::open_pinned(&pin_dir).and_then(|mut m| m.sync(&addresses))
                    {
                        Ok((added, removed)) => {
                            let v4 = addresses.iter().filter(|a| a.is_ipv4()).count();
                            log::info!(
                                "DSR peers: {v4} node addresses ({added} added, {removed} \
                                 removed), {} IPv6",
                                addresses.len() - v4
                            );
                            done = generation;
                        }
                        Err(e) => log::warn!("DSR peers: {e:#}; retrying"),
                    }
                }
                thread::sleep(PEERS_TICK);
            }
        })?;
    Ok(())
}

/// The socket records (`SOCK4_REVNAT`, `SOCK6_REVNAT`) are LRU maps: records are deleted when
/// their socket is released, and when the map is full the kernel evicts the oldest record, whose
/// socket can then no longer show its Service address or be found for termination. Reported as
/// a metric, and as a warning whenever the (conservative) count of evictions grew: only more
/// live sockets than entries evict, closed sockets leave no records behind.
fn report_evictions(
    before: &[(Reason, u64)],
    after: &[(Reason, u64)],
    fill: &[(&'static str, u32, u32)],
    metrics: &Metrics,
    seen: &mut [u64; 2],
) {
    let count = |stats: &[(Reason, u64)], reason: Reason| {
        stats.iter().find(|(r, _)| *r == reason).map_or(0, |s| s.1)
    };
    let maps = [
        (names::SOCK4_REVNAT, Reason::RevNatNew4, Reason::RevNatDel4),
        (names::SOCK6_REVNAT, Reason::RevNatNew6, Reason::RevNatDel6),
    ];
    for (i, (map, new, deleted)) in maps.into_iter().enumerate() {
        let Some((_, used, max)) = fill.iter().find(|(m, _, _)| *m == map) else {
            continue;
        };
        let evicted = evicted_at_least(count(before, new), count(after, deleted), u64::from(*used));
        metrics.map_evictions.with(&[("map", map)]).set(evicted);
        if evicted > seen[i] {
            log::warn!(
                "map {map} is full: {evicted} socket records evicted so far ({used} of {max} \
                 entries in use); those sockets no longer show their Service address and cannot \
                 be terminated; raise --max-sock-revnat"
            );
        }
        seen[i] = seen[i].max(evicted);
    }
}

/// How often the node's addresses are re-read (semantics 7.2: kube-proxy reads them at each
/// sync).
const ADDRESS_POLL: Duration = Duration::from_secs(2);

/// How often the node thread looks for news from the pod-interface manager.
const NODE_TICK: Duration = Duration::from_millis(50);

/// The pod-interface manager as the node thread sees it.
struct PodInterfaceLink {
    manager: Arc<std::sync::Mutex<podif::Manager>>,
    shared: Arc<podif::Shared>,
    metrics: Arc<Metrics>,
    local: crate::snapshot::LocalEndpoints,
    /// The pods the netns thread found (their interfaces carry tc too), and the generation
    /// last handed to the manager.
    pods: Option<Arc<netns::PodAddresses>>,
    pods_generation: u64,
}

impl PodInterfaceLink {
    /// Tells the manager this node's endpoints and pod CIDRs; returns the endpoints whose
    /// interface does not carry the program yet.
    /// `per_packet`: addresses of pods translated per packet, whose interfaces carry tc too,
    /// as do those of every pod the netns thread found.
    fn waiting(
        &mut self,
        snapshot: &Snapshot,
        per_packet: &[IpAddr],
    ) -> std::collections::BTreeSet<IpAddr> {
        let mut manager = self.manager.lock().expect("manager lock");
        let mut endpoints = snapshot
            .node
            .local_endpoints_cached(&snapshot.slices, &mut self.local);
        endpoints.extend(per_packet.iter().copied());
        if let Some(pods) = &self.pods {
            let (generation, addresses) = pods.get();
            self.pods_generation = generation;
            endpoints.extend(addresses);
        }
        manager.set_inputs(podif::ClusterInputs {
            endpoints,
            pod_cidrs: snapshot.node.pod_cidrs.clone(),
            remote: self.local.remote_probes().clone(),
            node_ips: snapshot.node.primary.clone(),
            nodeport_ips: snapshot.node.addresses.clone(),
        });
        let waiting = manager.waiting().clone();
        self.metrics
            .pod_endpoints_waiting
            .with(&[])
            .set(waiting.len() as u64);
        waiting
    }
}

/// Passes snapshots on with the node's NodePort addresses, the command line's settings and the
/// local endpoints still waiting for their interface filled in; passes the latest snapshot again
/// whenever those addresses change or the pod-interface manager attached or detached.
fn add_node_state(
    rx: mpsc::Receiver<Snapshot>,
    tx: mpsc::Sender<Snapshot>,
    selection: NodePortSelection,
    config: ProxyConfig,
    mut pods: Option<PodInterfaceLink>,
    ranged: Arc<std::sync::Mutex<netns::Targets>>,
    mut socklb: SocketLbLink,
) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("node-state".into())
        .spawn(move || {
            let mut latest: Option<Snapshot> = None;
            let mut addresses: Vec<IpAddr> = Vec::new();
            let mut read_at: Option<std::time::Instant> = None;
            let mut generation = 0;
            loop {
                let fresh = match rx.recv_timeout(NODE_TICK) {
                    Ok(s) => {
                        *ranged.lock().expect("targets lock") =
                            netns::Targets::of(s.services.iter().map(|s| &**s));
                        latest = Some(s);
                        true
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => false,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                let mut changed = false;
                if fresh || read_at.is_none_or(|t| t.elapsed() >= ADDRESS_POLL) {
                    read_at = Some(std::time::Instant::now());
                    let primary = latest.as_ref().map_or(&[][..], |s| &s.node.primary[..]);
                    let now = match netdev::local_addresses() {
                        Ok(all) => nodeport_addresses(&all, &selection.prefixes(primary)),
                        Err(e) => {
                            log::warn!(
                                "cannot read the node's addresses: {e}; keeping the last ones"
                            );
                            addresses.clone()
                        }
                    };
                    changed = now != addresses;
                    if changed {
                        log::info!("NodePort addresses: {now:?}");
                        addresses = now;
                    }
                }
                if let Some(p) = &pods {
                    let g = p.shared.generation.load(Ordering::Acquire);
                    changed |= g != generation;
                    generation = g;
                    changed |= p
                        .pods
                        .as_ref()
                        .is_some_and(|a| a.generation.load(Ordering::Acquire) != p.pods_generation);
                }
                if let Some(kept) = latest.as_mut().filter(|_| fresh || changed) {
                    let mut snapshot = kept.clone();
                    // The source's changes go on once: passed again for the node's sake, the
                    // snapshot carries none (the agent counts every change it receives,
                    // semantics 11.6).
                    kept.changes = Default::default();
                    snapshot.node.addresses = addresses.clone();
                    snapshot.node.node_ips = selection.node_ips(&snapshot.node.primary);
                    snapshot.config = config.clone();
                    let per_packet = socklb.update(&snapshot);
                    if let Some(p) = &mut pods {
                        snapshot.node.waiting = p.waiting(&snapshot, &per_packet);
                        // What that attached is in this snapshot already.
                        generation = p.shared.generation.load(Ordering::Acquire);
                    }
                    if tx.send(snapshot).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

/// How often idle connection-tracking entries are collected.
const CONNTRACK_GC: Duration = Duration::from_secs(10);

/// Removes idle connection-tracking entries every few seconds.
fn collect_conntrack(pin_dir: PathBuf, timeouts: CtTimeouts) {
    thread::spawn(move || {
        loop {
            thread::sleep(CONNTRACK_GC);
            let result = bpf::Maps::open_pinned(&pin_dir)
                .and_then(|mut m| m.collect_conntrack(bpf::monotonic_ns(), &timeouts));
            match result {
                Ok((_, 0)) => {}
                Ok((left, removed)) => {
                    log::debug!("conntrack: {removed} idle entries removed, {left} left")
                }
                Err(e) => log::warn!("conntrack collection failed: {e:#}"),
            }
        }
    });
}

static STOP: AtomicBool = AtomicBool::new(false);

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

/// `--socket-lb-default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLbFlag {
    Enabled,
    Disabled,
}

impl From<SocketLbFlag> for crate::model::SocketLb {
    fn from(f: SocketLbFlag) -> Self {
        match f {
            SocketLbFlag::Enabled => crate::model::SocketLb::Enabled,
            SocketLbFlag::Disabled => crate::model::SocketLb::Disabled,
        }
    }
}

/// The socket-layer opt-out as the node thread sees it: where decisions go, and the default.
struct SocketLbLink {
    tx: mpsc::Sender<crate::socklb::Decision>,
    default: crate::model::SocketLb,
    /// `--masquerade-all`: every pod per packet.
    masquerade_all: bool,
    /// Whether pods can be translated per packet at all (tc is attached somewhere); if not,
    /// none is, whatever the labels and flags say.
    per_packet: bool,
    last: Option<crate::socklb::Decision>,
}

impl SocketLbLink {
    /// Decides from `snapshot` and tells the socklb thread if that changed; returns the
    /// addresses of the pods translated per packet (their interfaces must carry tc).
    fn update(&mut self, snapshot: &Snapshot) -> Vec<IpAddr> {
        let decision = if self.per_packet && snapshot.pods_unknown {
            // Nothing known yet (an agent started while the API server does not answer the
            // Pods' or the Namespaces' lists): what a previous agent wrote stays, and so do
            // the pods the last decision translated per packet.
            match &self.last {
                Some(last) => last.clone(),
                None => return Vec::new(),
            }
        } else if !self.per_packet {
            crate::socklb::Decision::default()
        } else if self.masquerade_all {
            crate::socklb::decide_every_pod(
                &snapshot.namespaces,
                &snapshot.pods,
                &snapshot.node.name,
            )
        } else {
            crate::socklb::decide(
                &snapshot.namespaces,
                &snapshot.pods,
                &snapshot.node.name,
                self.default,
            )
        };
        let ips = decision
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        if self.last.as_ref() != Some(&decision) {
            let _ = self.tx.send(decision.clone());
            self.last = Some(decision);
        }
        ips
    }
}

/// `--nodeport-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NodePortMode {
    /// kube-proxy's masquerading.
    Snat,
    /// The backend's node answers the client directly (IPv4 and IPv6; every node runs the agent).
    Dsr,
}

/// Two heap arenas at most, unless `MALLOC_ARENA_MAX` says otherwise: glibc gives every thread
/// that allocates its own arena (up to 8 per CPU), and memory freed in one (the sources parsing
/// objects) is not reused by another (the sync); measured at 10,000 Services x 100 endpoints,
/// the agent's RSS was 565 MiB with the default and 332 MiB with two. Before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt changes an allocator setting; no allocation is in flight in another
        // thread (none runs yet).
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    limit_malloc_arenas();
    if let Some(why) = crate::datapath::kernel::release()
        .as_deref()
        .and_then(crate::datapath::kernel::too_old)
    {
        log::warn!("{why}; starting anyway");
    }
    set_oom_score_adj(args.oom_score_adj.unwrap_or(super::config::OOM_SCORE_ADJ));
    raise_nofile_limit();
    // semantics 9.6: the node's other traffic keeps the connection tracking kube-proxy gave it.
    let read_only_sysfs = args.netfilter_conntrack == NetfilterConntrack::KubeProxy
        && crate::datapath::nfct::apply_on_node(&args.netfilter.clone().unwrap_or_default());
    let node = args.source.node_name();
    let (healthz_address, metrics_address) = http_addresses(&args);
    let configz = configz(&args, &node, &healthz_address, &metrics_address);
    let (tcp_timeout, udp_timeout) = flow_timeouts(&args);
    let families = [Family::V4, Family::V6];
    let metrics = Arc::new(Metrics::new(env!("CARGO_PKG_VERSION"), &families));
    let dsr = args.nodeport_mode == NodePortMode::Dsr;
    // Refused before anything is loaded: a range that collides with the node's own sockets.
    let ephemeral = portrange::read_ephemeral().map_err(|e| anyhow::anyhow!(e))?;
    let masquerade =
        portrange::choose(args.masquerade_port_range, ephemeral).map_err(|e| anyhow::anyhow!(e))?;
    let peers = dsr.then(|| Arc::new(NodeAddresses::default()));
    let source = args
        .source
        .source_with(Some(Arc::clone(&metrics)), peers.clone())?;
    // kube-proxy's Events (crate::events), posted when the source has an API server.
    let events = source.events(&node).unwrap_or_else(|e| {
        log::warn!("no events are posted: {e:#}");
        crate::events::Events::off(&node)
    });
    events.starting();
    if read_only_sysfs {
        events.read_only_sysfs();
    }
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => cgroup2_root()?,
    };
    // SIGTERM/SIGINT: the agent stops syncing and leaves the datapath pinned and serving.
    super::signals::stop_on_signals(&STOP)?;
    if let (Some(path), Some(loaded)) = (&args.config, args.config_loaded.clone()) {
        watch_config(path.clone(), loaded)?;
    }
    // One agent per pin directory: a second one waits here until the first exits.
    let Some(_pin_lock) = bpf::lock_pin_dir(&args.bpffs, &STOP)? else {
        config_changed(args.config.as_deref())?;
        log::info!("stopped while waiting for the other agent");
        return Ok(());
    };
    let flows = bpf::flow_entries(bpf::node_memory(), args.map_memory_ratio);
    let sizes = MapSizes {
        services: args.max_services,
        backends: args.max_backends,
        slots: args.max_slots,
        affinity: args.max_affinity.unwrap_or(flows),
        sock_revnat: args.max_sock_revnat.unwrap_or(flows),
        conntrack: args.max_conntrack.unwrap_or(flows),
        flows_from_memory: [
            args.max_affinity.is_none(),
            args.max_sock_revnat.is_none(),
            args.max_conntrack.is_none(),
        ],
    };
    let nodeport_selection = args.source.nodeport_selection()?;
    // semantics 8.1: the health checks of a narrowed family listen on its NodePort addresses.
    let hc_narrowed = crate::healthcheck::Narrowed::of(&nodeport_selection);
    let config = args.source.config()?;
    let mut datapath = Datapath::load(&args.bpffs, &cgroup, &sizes, udp_timeout)?;
    datapath.set_maglev_size(config.maglev_size)?;
    datapath.set_dsr(dsr)?;
    datapath.set_masquerade_all(args.masquerade_all)?;
    datapath.set_node_hints(config.node_hints)?;
    datapath.set_dsr_budget(args.dsr_learn_budget)?;
    datapath.set_masquerade_ports(masquerade.first, masquerade.last)?;
    // Named external interfaces are attached whenever they exist; without names, those of the
    // default routes are, as they are now and as they come and go. XDP goes on the named ones
    // present now, or on those of the main table's default routes.
    let (external_spec, external, xdp_on) = match &args.external_interfaces {
        Some(list) => {
            let names: Vec<String> = list.iter().filter(|i| !i.is_empty()).cloned().collect();
            let mut here = names.clone();
            here.retain(|i| {
                let exists = netdev::exists(i);
                if !exists {
                    log::warn!(
                        "external interface {i} does not exist yet; tc is attached when it \
                         appears (XDP only on interfaces present at the start)"
                    );
                }
                exists
            });
            // XDP reads Ethernet frames: a named device without that header (a WireGuard
            // or ipip device where external traffic arrives) gets tc only (`tc_ingress_l3`).
            let xdp_on = here
                .iter()
                .filter(|i| {
                    let ethernet = netdev::ethernet(i);
                    if !ethernet {
                        log::info!(
                            "no XDP on {i}: it has no Ethernet header; tc handles its NodePort \
                             traffic"
                        );
                    }
                    ethernet
                })
                .cloned()
                .collect();
            (podif::External::Named(names), here, xdp_on)
        }
        None => (
            podif::External::DefaultRoutes,
            netdev::default_route_interfaces(false),
            netdev::default_route_interfaces(true),
        ),
    };
    // The tc programs are verified before XDP's is swapped, so that this build's XDP and tc
    // programs replace the earlier ones within moments of each other (with resized maps, the
    // two builds write connection tracking to different maps meanwhile).
    datapath.pin_tc_program()?;
    let xdp = datapath.attach_xdp(&xdp_on, args.xdp)?;
    log::info!(
        "NodePort mode {:?}; external interfaces {:?}, XDP {:?}; masquerading ports \
         {masquerade} (ephemeral ports {ephemeral})",
        args.nodeport_mode,
        external,
        xdp
    );
    let pod_spec = podif::PodInterfaces::parse(&args.pod_interfaces)
        .map_err(|e| anyhow::anyhow!("--pod-interfaces: {e}"))?;
    let (no_external, following) = match &external_spec {
        podif::External::Named(names) => (names.is_empty(), false),
        podif::External::DefaultRoutes => (external.is_empty(), true),
    };
    // Per-packet translation needs tc on pods' interfaces (or at least somewhere).
    let tc_nowhere = no_external && pod_spec.is_empty();
    let mut manager = if tc_nowhere && !following {
        log::warn!(
            "tc is attached nowhere: NodePort, externalIP and load balancer traffic from outside \
             the node is not translated (see --external-interfaces and --pod-interfaces)"
        );
        // Links an earlier agent left on interfaces are removed.
        podif::Manager::new(
            &args.bpffs,
            pod_spec.clone(),
            podif::External::Named(Vec::new()),
            None,
        )?
        .reconcile();
        None
    } else {
        if tc_nowhere {
            log::warn!(
                "no external interface yet (no default route, no interface with the Node's \
                 address): tc goes on one when it appears"
            );
        }
        let mut m = podif::Manager::new(
            &args.bpffs,
            pod_spec.clone(),
            external_spec,
            Some(Arc::clone(&metrics)),
        )?;
        m.seed_external(&external);
        if let Ok(all) = netdev::local_addresses() {
            m.seed_nodeport_ips(nodeport_addresses(&all, &nodeport_selection.prefixes(&[])));
        }
        m.reconcile();
        log::info!(
            "tc at ingress of {:?} (pod interfaces: {:?}; followed as they come and go)",
            m.attached_names(),
            args.pod_interfaces
        );
        Some(m)
    };
    // Programs of others where ours run (another kube-bpf-proxy with pins elsewhere, another
    // service proxy's socket programs): found while the capabilities to name them are held.
    let foreign = foreign::find(&args.bpffs, Some(&cgroup));
    let count = foreign::report(&foreign, &args.bpffs, &cgroup);
    metrics.foreign_programs.with(&[]).set(count as u64);
    // Every program of this build is attached (socket hooks, XDP, tc): the entries of maps
    // pinned in an older layout move over, and the layout versions are recorded.
    if let Err(e) = datapath.finish_upgrade() {
        log::warn!("map layout versions not recorded: {e:#}");
    }
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
    // The sources of pods and of the host, for loadBalancerSourceRanges at the socket layer:
    // its thread keeps what entering namespaces needs, so it starts before the others drop it.
    let ranged = Arc::new(std::sync::Mutex::new(netns::Targets::default()));
    // And, with pod-facing interfaces, the pods found there: their interfaces get tc, which
    // then masquerades their connections to externalIPs, LB IPs and NodePorts (7.13).
    let pod_addresses = (manager.is_some() && !pod_spec.is_empty())
        .then(|| Arc::new(netns::PodAddresses::default()));
    netns::follow(
        args.bpffs.clone(),
        cgroup.clone(),
        Arc::clone(&ranged),
        pod_addresses.clone(),
        Some(Arc::clone(&metrics)),
    )?;
    // Everything privileged is done; capabilities are per thread, so drop them before any
    // thread is started.
    match caps::drop_to_kept() {
        Ok(()) => log::info!("capabilities dropped to CAP_BPF and CAP_NET_ADMIN"),
        Err(e) => log::warn!("could not drop capabilities: {e}"),
    }
    // Per-packet translation needs tc on pods' interfaces: with tc attached nowhere every pod
    // keeps the socket layer, else its Services would not be translated at all.
    let per_packet = !tc_nowhere;
    if !per_packet && (args.masquerade_all || args.socket_lb_default == SocketLbFlag::Disabled) {
        log::warn!(
            "tc is attached nowhere, so no pod can be translated per packet: every pod keeps \
             socket-layer translation (--masquerade-all and --socket-lb-default disabled have \
             no effect)"
        );
    }
    // Pods with socket-layer translation off: their cgroups in LB_SOCKLB_OFF. Its thread
    // needs no more than the kept capabilities (map writes, reading cgroupfs).
    let mut socklb = SocketLbLink {
        tx: crate::datapath::socklb::follow(
            &args.bpffs,
            cgroup.clone(),
            cgroup2_root()?,
            Some(Arc::clone(&metrics)),
        )?,
        default: args.socket_lb_default.into(),
        masquerade_all: args.masquerade_all,
        per_packet,
        last: None,
    };
    if !per_packet {
        // No pod can be translated per packet here, whatever the cluster says: what a
        // previous agent opted out is cleared at once, not after the first snapshot.
        socklb.update(&Snapshot::default());
    }
    datapath.forward_logs();
    follow_dsr_peers(args.bpffs.clone(), peers)?;
    if let Err(e) = follow_route_changes(&args.bpffs) {
        log::warn!(
            "route changes: {e:#}; remembered next hops are followed within a second instead"
        );
    }
    log::info!("node {node:?}, source {}", source.name());
    let (source_tx, source_rx) = mpsc::channel();
    thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            if let Err(e) = source.run(source_tx) {
                log::error!("source stopped: {e:#}");
            }
        })?;
    let pods = match manager.take() {
        Some(m) => {
            let shared = m.shared();
            let manager = Arc::new(std::sync::Mutex::new(m));
            podif::Manager::follow(Arc::clone(&manager))?;
            Some(PodInterfaceLink {
                manager,
                shared,
                metrics: Arc::clone(&metrics),
                local: Default::default(),
                pods: pod_addresses,
                pods_generation: 0,
            })
        }
        None => None,
    };
    let (tx, rx) = mpsc::channel();
    add_node_state(
        source_rx,
        tx,
        nodeport_selection,
        config,
        pods,
        ranged,
        socklb,
    )?;
    collect_conntrack(args.bpffs.clone(), ct_timeouts(tcp_timeout, udp_timeout));
    let health = Arc::new(Health::new(
        args.health_timeout.unwrap_or(DEFAULT_HEALTH_TIMEOUT),
        &families,
        SystemTime::now(),
    ));
    let http_state = |role| {
        Arc::new(HttpState {
            role,
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
            configz: configz.clone(),
        })
    };
    serve(
        "metrics",
        &metrics_address,
        &http_state(Role::Metrics),
        args.bind_address_hard_fail,
    )?;
    serve(
        "health checks",
        &healthz_address,
        &http_state(Role::Health),
        args.bind_address_hard_fail,
    )?;
    let map_counts = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    poll_kernel_counters(
        args.bpffs.clone(),
        Arc::clone(&metrics),
        Arc::clone(&map_counts),
    );
    metrics
        .socket_termination_active
        .with(&[])
        .set(u64::from(terminating));
    let health_checks =
        crate::healthcheck::HealthChecks::new(Arc::clone(&health), Some(Arc::clone(&metrics)))
            .narrowed(hc_narrowed)
            .with_events(events);
    let observers = Observers {
        metrics: Some(metrics),
        health: Some(health),
        health_checks: Some(Arc::new(health_checks)),
        map_counts: Some(map_counts),
    };
    let timing = SyncTiming {
        resync: args.sync_period,
        ..SyncTiming::default()
    };
    agent::run(&mut datapath, rx, timing, &STOP, &observers)?;
    log::info!(
        "stopping; the hooks and maps stay pinned for the next agent (`kube-bpf-proxy cleanup` removes them)"
    );
    config_changed(args.config.as_deref())
}

/// Err when the agent stops because its `--config` file changed.
fn config_changed(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    if CONFIG_CHANGED.load(Ordering::SeqCst) {
        anyhow::bail!(
            "the configuration file {} changed; exiting so that it is read again",
            config.unwrap_or(std::path::Path::new("?")).display()
        );
    }
    Ok(())
}

/// Set when the `--config` file changed: the agent then stops as on SIGTERM (the datapath stays
/// pinned and serving) and exits with an error, so that it is restarted and reads the file
/// again, as kube-proxy exits when its configuration file changes (semantics 11.13). A
/// ConfigMap's new content arrives by a swap of its `..data` link, which content comparison
/// sees like an edit in place.
static CONFIG_CHANGED: AtomicBool = AtomicBool::new(false);

/// How often the `--config` file is read again.
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Watches the `--config` file on a thread of its own (without capabilities) against `loaded`,
/// the content the agent runs with. A file that cannot be read is logged once and the running
/// configuration stays.
fn watch_config(path: PathBuf, loaded: Vec<u8>) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            if let Err(e) = caps::drop_to(&[]) {
                log::warn!("config-watch thread: dropping capabilities failed: {e}");
            }
            let mut unreadable = false;
            loop {
                thread::sleep(CONFIG_POLL);
                // Stopping for another reason (SIGTERM) is no change of the file.
                if STOP.load(Ordering::SeqCst) {
                    return;
                }
                match std::fs::read(&path) {
                    Ok(now) if now != loaded => {
                        log::warn!(
                            "the configuration file {} changed; stopping (the datapath keeps \
                             serving) to be restarted with it",
                            path.display()
                        );
                        CONFIG_CHANGED.store(true, Ordering::SeqCst);
                        STOP.store(true, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => unreadable = false,
                    Err(e) if !unreadable => {
                        log::warn!(
                            "cannot read the configuration file {}: {e}; the running \
                             configuration stays",
                            path.display()
                        );
                        unreadable = true;
                    }
                    Err(_) => {}
                }
            }
        })
        .context("start the config-watch thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{SocketLbLink, evicted_at_least};
    use crate::snapshot::Snapshot;
    use std::sync::{Arc, mpsc};

    fn opted_out_pod() -> Snapshot {
        let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mesh", "labels": {"kube-bpf-proxy.io/socket-lb": "disabled"}}
        }))
        .unwrap();
        let pod = crate::objects::PodRef {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("client".into()),
                namespace: Some("mesh".into()),
                uid: Some("uid-client".into()),
                ..Default::default()
            },
            node_name: "node-a".into(),
            host_network: false,
            ips: vec!["10.244.0.9".parse().unwrap()],
        };
        let mut s = Snapshot::default();
        s.namespaces.push(Arc::new(ns));
        s.pods.push(Arc::new(pod));
        s.node.name = "node-a".into();
        s
    }

    fn new_link(per_packet: bool) -> (SocketLbLink, mpsc::Receiver<crate::socklb::Decision>) {
        let (tx, rx) = mpsc::channel();
        let link = SocketLbLink {
            tx,
            default: crate::model::SocketLb::Enabled,
            masquerade_all: false,
            per_packet,
            last: None,
        };
        (link, rx)
    }

    #[test]
    fn the_socket_layer_opt_out_is_decided_only_once_pods_and_namespaces_are_known() {
        let (mut link, rx) = new_link(true);
        // Started while the API server does not answer: nothing decided, nothing cleared.
        let unknown = Snapshot {
            pods_unknown: true,
            ..Snapshot::default()
        };
        assert!(link.update(&unknown).is_empty());
        assert!(rx.try_recv().is_err());
        // Known: the opted-out pod is translated per packet.
        let known = opted_out_pod();
        assert_eq!(
            link.update(&known),
            ["10.244.0.9".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(rx.try_recv().unwrap().pods.len(), 1);
        // Unknown again (a snapshot passed on without them): the last decision holds.
        assert_eq!(link.update(&unknown).len(), 1);
        assert!(rx.try_recv().is_err());
        // Where no pod can be translated per packet, the decision is none, known or not.
        let (mut link, rx) = new_link(false);
        assert!(link.update(&unknown).is_empty());
        assert!(rx.try_recv().unwrap().pods.is_empty());
    }

    #[test]
    fn evictions_are_never_overestimated() {
        // 1000 records created, 700 deleted at release, 250 present: 50 evicted.
        assert_eq!(evicted_at_least(1000, 700, 250), 50);
        // Sockets created after the first read and released before the second: no eviction.
        assert_eq!(evicted_at_least(1000, 760, 250), 0);
        // Records created between the reads are present but not counted as created yet.
        assert_eq!(evicted_at_least(1000, 700, 300), 0);
    }
}
