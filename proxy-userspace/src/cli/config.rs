//! `run --config FILE`: kube-proxy's configuration file, laid under `run`'s flags.
//!
//! The file is a `KubeProxyConfiguration` of `kubeproxy.config.k8s.io/v1alpha1` in YAML or JSON:
//! what kubeadm stores as `config.conf` in the `kube-proxy` ConfigMap. [`parse`] reads it into a
//! value tree, checks apiVersion and kind, takes every field this proxy acts on into
//! [`KubeProxyConfig`] with its type checked (an error names the field), and lists the other
//! keys: unknown ones always, known ones without a meaning here when they hold more than their
//! zero value (null, "", 0, false, "0s", an empty list or mapping). A zero value asks kube-proxy
//! for its default, so leaving it aside loses nothing, and kubeadm's default file draws no
//! warning. [`apply`] writes the file's settings into `run`'s flags not given on the command
//! line (those given win) and says what it did. kube-proxy's own flags ([`flags`]) describe such
//! a document too, read when no file is given. Both are pure; `cli::main` reads the file
//! and logs.
//!
//! How each field maps is listed in the README ("Configuration file").

mod duration;
pub mod flags;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::LazyLock,
    time::Duration,
};

use clap::{ArgMatches, parser::ValueSource};
use serde_json::{Map, Value};

use super::{Cli, Command, LogFormat, run::RunArgs};
use crate::{
    datapath::{
        nfct::NetfilterSettings,
        podif::{PodInterfaces, Selector},
    },
    model::{Cidr, Scheduler},
};

pub use duration::{format_go_duration, parse_go_duration};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// kube-proxy's defaults for `conntrack.maxPerCore` and `conntrack.min` (semantics 9.6), used
/// when the file sets only one of them.
pub const CONNTRACK_MAX_PER_CORE: u64 = 32 * 1024;
pub const CONNTRACK_MIN: u64 = 128 * 1024;

/// kube-proxy's `oomScoreAdj` when the file leaves it null (semantics 11.11).
pub const OOM_SCORE_ADJ: i32 = -999;

/// Why a file was refused. Every variant names what was wrong, so the message alone says what
/// to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("not YAML or JSON: {0}")]
    Syntax(String),
    #[error("expected a KubeProxyConfiguration mapping, got {0}")]
    NotAMapping(String),
    #[error("apiVersion {0} is not supported (expected {API_VERSION})")]
    ApiVersion(String),
    #[error("kind {0} is not supported (expected {KIND})")]
    Kind(String),
    #[error("{field}: expected {expected}, got {got}")]
    Type {
        field: String,
        expected: &'static str,
        got: String,
    },
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
}

/// The fields of the file this proxy acts on, typed and checked; zero values are `None`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubeProxyConfig {
    /// `featureGates`, as written.
    pub feature_gates: BTreeMap<String, bool>,
    /// `clientConnection.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `logging.format`.
    pub log_format: Option<LogFormat>,
    /// `logging.verbosity` (klog's -v).
    pub log_verbosity: Option<u32>,
    /// `hostnameOverride`, trimmed.
    pub hostname_override: Option<String>,
    /// `bindAddress`: the node's primary address when specific; its family picks the default
    /// health and metrics addresses.
    pub bind_address: Option<IpAddr>,
    /// `healthzBindAddress` as IP:port (kube-proxy's port 10256 added when missing).
    pub healthz_bind_address: Option<String>,
    /// `metricsBindAddress` as IP:port (port 10249 added when missing).
    pub metrics_bind_address: Option<String>,
    /// `bindAddressHardFail`.
    pub bind_address_hard_fail: bool,
    /// `mode`.
    pub mode: ProxyMode,
    /// `ipvs.scheduler`, with the scheduler it maps to here.
    pub ipvs_scheduler: Option<IpvsScheduler>,
    /// `ipvs.strictARP`.
    pub ipvs_strict_arp: bool,
    /// `masqueradeAll` of the mode's block (`nftables` in nftables mode, else `iptables`).
    pub masquerade_all: bool,
    /// `detectLocalMode` with the `detectLocal` field it uses.
    pub detect_local: DetectLocal,
    /// `clusterCIDR` (comma-separated, at most one per family).
    pub cluster_cidrs: Vec<Cidr>,
    /// `nodePortAddresses` as values of `--nodeport-addresses` (CIDRs and `primary`; the
    /// keywords `all` and `localhost` expanded to their CIDRs); `None` when null.
    pub nodeport_addresses: Option<Vec<String>>,
    /// `oomScoreAdj`.
    pub oom_score_adj: Option<i32>,
    /// `conntrack`.
    pub conntrack: Conntrack,
    /// `configSyncPeriod`.
    pub config_sync_period: Option<Duration>,
    /// `syncPeriod` of the mode's block (`iptables` for iptables and the empty mode, `ipvs`,
    /// `nftables`): kube-proxy's health timeout is twice it (semantics 8.6).
    pub sync_period: Option<Duration>,
}

/// `mode`: which of kube-proxy's data planes the file asked for.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum ProxyMode {
    /// "" or null: kube-proxy's default (iptables on Linux).
    #[default]
    Default,
    IpTables,
    Ipvs,
    NfTables,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Default => "\"\" (iptables)",
            ProxyMode::IpTables => "iptables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::NfTables => "nftables",
        }
    }
}

/// `ipvs.scheduler` and what it becomes here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsScheduler {
    /// The name in the file.
    pub name: String,
    pub scheduler: Scheduler,
    /// Set when the scheduler here only approximates IPVS's: why, for a warning.
    pub approximation: Option<&'static str>,
}

/// `detectLocalMode` and `detectLocal`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DetectLocal {
    /// "" or null: kube-proxy's default, ClusterCIDR.
    #[default]
    Default,
    ClusterCidr,
    NodeCidr,
    /// `detectLocal.bridgeInterface`.
    BridgeInterface(String),
    /// `detectLocal.interfaceNamePrefix`.
    InterfaceNamePrefix(String),
}

/// `conntrack`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conntrack {
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    /// Only for the kernel's table (`netfilter_settings`): half-closed TCP flows keep the
    /// established timeout in this proxy's maps.
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

/// The kernel-table settings `run` applies when neither a `--config` file nor kube-proxy's
/// flags gave them: kube-proxy's defaults, with `run`'s --conntrack-tcp-timeout-established
/// and --conntrack-udp-timeout where given on the command line without a `--config` file, as
/// kube-proxy's flags of those names set the kernel's (next to a file, kube-proxy ignores them).
pub fn kernel_timeouts_from_flags(args: &mut RunArgs, matches: &ArgMatches, cpus: u32) {
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let mut conntrack = Conntrack::default();
    if args.config.is_none() {
        if given("conntrack_tcp_timeout_established") {
            conntrack.tcp_established_timeout = Some(args.conntrack_tcp_timeout_established);
        }
        if given("conntrack_udp_timeout") {
            conntrack.udp_timeout = Some(args.conntrack_udp_timeout);
        }
    }
    match &mut args.netfilter {
        None => args.netfilter = Some(netfilter_settings(&conntrack, cpus)),
        Some(n) => {
            let from_flags = netfilter_settings(&conntrack, cpus);
            if conntrack.tcp_established_timeout.is_some() {
                n.tcp_established_secs = from_flags.tcp_established_secs;
            }
            if conntrack.udp_timeout.is_some() {
                n.udp_secs = from_flags.udp_secs;
            }
        }
    }
}

/// kube-proxy's netfilter settings from its `conntrack` section on a node of `cpus` CPUs,
/// with its defaults for what the section leaves out (v1alpha1: maxPerCore 32768, min
/// 131072, tcpEstablishedTimeout 24h, tcpCloseWaitTimeout 1h); a zero maxPerCore or timeout
/// leaves the kernel's value, and the UDP timeouts are written only when set.
pub fn netfilter_settings(c: &Conntrack, cpus: u32) -> NetfilterSettings {
    let secs = |d: Option<Duration>, default: u64| match d {
        None => Some(default),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d.as_secs().max(1)),
    };
    let max = match c.max_per_core {
        Some(0) => None,
        per_core => {
            let per_core = per_core.map_or(CONNTRACK_MAX_PER_CORE, u64::from);
            let min = c.min.map_or(CONNTRACK_MIN, u64::from);
            Some((per_core * u64::from(cpus.max(1))).max(min))
        }
    };
    NetfilterSettings {
        max,
        tcp_established_secs: secs(c.tcp_established_timeout, 24 * 3600),
        tcp_close_wait_secs: secs(c.tcp_close_wait_timeout, 3600),
        tcp_be_liberal: c.tcp_be_liberal,
        udp_secs: c
            .udp_timeout
            .filter(|d| !d.is_zero())
            .map(|d| d.as_secs().max(1)),
        udp_stream_secs: c
            .udp_stream_timeout
            .filter(|d| !d.is_zero())
            .map(|d| d.as_secs().max(1)),
    }
}

/// Feature gates whose behaviour this proxy always has (false is not honoured), with what
/// the behaviour is. Every other gate is listed among the fields not used.
const ALWAYS_ON_GATES: &[(&str, &str)] = &[
    (
        "ServiceTrafficDistribution",
        "follows topology hints whatever the Service's annotations (semantics 5.1)",
    ),
    ("TopologyAwareHints", "follows zone hints (semantics 5.11)"),
    (
        "LoadBalancerIPMode",
        "leaves load balancer IPs with ipMode Proxy alone (semantics 7.7)",
    ),
    (
        "KubeProxyDrainingTerminatingNodes",
        "answers /healthz with 503 on a deleted or to-be-deleted node (semantics 8.8)",
    ),
];

/// The feature gate without which kube-proxy does not read endpoints' `forNodes` hints
/// (semantics 5.5: alpha in 1.33, on by default since 1.34). Honoured: false turns them off.
const NODE_HINTS_GATE: &str = "PreferSameTrafficDistribution";

/// Reads and parses the file given to `--config`; returns its content too.
pub fn load(path: &Path) -> anyhow::Result<(KubeProxyConfig, Vec<String>, String)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
    let (config, unused) =
        parse(&text).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
    Ok((config, unused, text))
}

/// Parses a `KubeProxyConfiguration`; returns it with the paths of the fields not used here
/// (sorted), for one warning line.
pub fn parse(text: &str) -> Result<(KubeProxyConfig, Vec<String>), ConfigError> {
    let yaml: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
    // YAML keys that are no strings (`1: x`) are refused here.
    let tree = serde_json::to_value(&yaml).map_err(|e| ConfigError::Syntax(e.to_string()))?;
    parse_tree(&tree)
}

/// [`parse`] for a document already read into a value tree (a file's, or the one kube-proxy's
/// command-line flags describe, [`flags`]).
pub fn parse_tree(tree: &Value) -> Result<(KubeProxyConfig, Vec<String>), ConfigError> {
    let Value::Object(map) = tree else {
        return Err(ConfigError::NotAMapping(describe(tree)));
    };
    let mut top = Fields::new("", map);
    match top.take("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        other => return Err(ConfigError::ApiVersion(describe_opt(other))),
    }
    match top.take("kind") {
        Some(Value::String(k)) if k == KIND => {}
        other => return Err(ConfigError::Kind(describe_opt(other))),
    }
    let mut config = KubeProxyConfig {
        feature_gates: top.gates("featureGates")?,
        ..Default::default()
    };
    for name in config.feature_gates.keys() {
        if name != NODE_HINTS_GATE && !ALWAYS_ON_GATES.iter().any(|(gate, _)| gate == name) {
            top.listed.push(format!("featureGates.{name}"));
        }
    }

    let mut client = top.object("clientConnection")?;
    config.kubeconfig = client.string("kubeconfig")?.map(PathBuf::from);
    // This proxy's client speaks JSON; it makes a handful of long-lived watches, so it has
    // no request rate to limit.
    match client.string("contentType")?.as_deref() {
        None | Some("application/json") => {}
        Some(_) => client.listed.push("clientConnection.contentType".into()),
    }
    client.unused("acceptContentTypes", Kind::Str)?;
    client.unused("qps", Kind::Number)?;
    client.unused("burst", Kind::Int)?;
    top.absorb(client);

    let mut logging = top.object("logging")?;
    config.log_format = match logging.string("format")?.as_deref() {
        None => None,
        Some("text") => Some(LogFormat::Text),
        Some("json") => Some(LogFormat::Json),
        Some(other) => {
            return Err(logging.invalid("format", format!("{other:?} is not text or json")));
        }
    };
    config.log_verbosity = logging.unsigned("verbosity")?;
    logging.unused("flushFrequency", Kind::Any)?;
    logging.unused("vmodule", Kind::Any)?;
    logging.unused("options", Kind::Any)?;
    top.absorb(logging);

    config.hostname_override = top
        .string("hostnameOverride")?
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    config.bind_address = match top.string("bindAddress")? {
        None => None,
        Some(a) => Some(
            a.trim()
                .parse::<IpAddr>()
                .map_err(|_| top.invalid("bindAddress", format!("{a:?} is not an IP address")))?,
        ),
    };
    config.healthz_bind_address = top.bind_address("healthzBindAddress", 10256)?;
    config.metrics_bind_address = top.bind_address("metricsBindAddress", 10249)?;
    config.bind_address_hard_fail = top.boolean("bindAddressHardFail")?;
    top.unused("enableProfiling", Kind::Bool)?;
    top.unused("showHiddenMetricsForVersion", Kind::Str)?;
    top.unused("portRange", Kind::Str)?;
    top.unused("windowsRunAsService", Kind::Bool)?;

    config.mode = match top.string("mode")?.as_deref() {
        None => ProxyMode::Default,
        Some("iptables") => ProxyMode::IpTables,
        Some("ipvs") => ProxyMode::Ipvs,
        Some("nftables") => ProxyMode::NfTables,
        Some("kernelspace") => {
            return Err(top.invalid(
                "mode",
                "kernelspace is kube-proxy's Windows mode; this proxy replaces the Linux modes \
                 (iptables, ipvs, nftables)"
                    .into(),
            ));
        }
        Some(other) => {
            return Err(top.invalid(
                "mode",
                format!("unknown mode {other:?} (iptables, ipvs, nftables or empty)"),
            ));
        }
    };

    // masqueradeAll: kube-proxy reads the block of its mode (ipvs's is iptables').
    let mut iptables = top.object("iptables")?;
    iptables.unused_pointer("masqueradeBit", Kind::Int)?;
    let nft = config.mode == ProxyMode::NfTables;
    if nft {
        iptables.unused("masqueradeAll", Kind::Bool)?;
    } else {
        config.masquerade_all = iptables.boolean("masqueradeAll")?;
    }
    iptables.unused_pointer("localhostNodePorts", Kind::Bool)?;
    iptables.unused_pointer("snatNodeInternalIP", Kind::Bool)?;
    // syncPeriod: the mode's block's (the others' are listed as not used).
    let iptables_mode = matches!(config.mode, ProxyMode::IpTables | ProxyMode::Default);
    if iptables_mode {
        config.sync_period = iptables.duration("syncPeriod")?;
    } else {
        iptables.unused("syncPeriod", Kind::Duration)?;
    }
    iptables.unused("minSyncPeriod", Kind::Duration)?;
    top.absorb(iptables);

    let mut ipvs = top.object("ipvs")?;
    config.ipvs_scheduler = match ipvs.string("scheduler")? {
        None => None,
        Some(name) => {
            Some(ipvs_scheduler(name.trim()).map_err(|why| ipvs.invalid("scheduler", why))?)
        }
    };
    config.ipvs_strict_arp = ipvs.boolean("strictARP")?;
    if config.mode == ProxyMode::Ipvs {
        config.sync_period = ipvs.duration("syncPeriod")?;
    } else {
        ipvs.unused("syncPeriod", Kind::Duration)?;
    }
    ipvs.unused("minSyncPeriod", Kind::Duration)?;
    ipvs.unused("excludeCIDRs", Kind::Strings)?;
    ipvs.unused("tcpTimeout", Kind::Duration)?;
    ipvs.unused("tcpFinTimeout", Kind::Duration)?;
    ipvs.unused("udpTimeout", Kind::Duration)?;
    top.absorb(ipvs);

    let mut nftables = top.object("nftables")?;
    nftables.unused_pointer("masqueradeBit", Kind::Int)?;
    if nft {
        config.masquerade_all = nftables.boolean("masqueradeAll")?;
    } else {
        nftables.unused("masqueradeAll", Kind::Bool)?;
    }
    if nft {
        config.sync_period = nftables.duration("syncPeriod")?;
    } else {
        nftables.unused("syncPeriod", Kind::Duration)?;
    }
    nftables.unused("minSyncPeriod", Kind::Duration)?;
    top.absorb(nftables);

    let mut winkernel = top.object("winkernel")?;
    winkernel.unused("networkName", Kind::Str)?;
    winkernel.unused("sourceVip", Kind::Str)?;
    winkernel.unused("enableDSR", Kind::Bool)?;
    winkernel.unused("rootHnsEndpointName", Kind::Str)?;
    winkernel.unused("forwardHealthCheckVip", Kind::Bool)?;
    top.absorb(winkernel);

    config.detect_local = detect_local(&mut top)?;
    config.cluster_cidrs = match top.string("clusterCIDR")? {
        None => Vec::new(),
        Some(list) => cluster_cidrs(&list).map_err(|why| top.invalid("clusterCIDR", why))?,
    };
    config.nodeport_addresses = match top.strings("nodePortAddresses")? {
        None => None,
        Some(list) => {
            Some(nodeport_addresses(&list).map_err(|why| top.invalid("nodePortAddresses", why))?)
        }
    };
    config.oom_score_adj = top.int32("oomScoreAdj")?;
    if let Some(adj) = config.oom_score_adj
        && !(-1000..=1000).contains(&adj)
    {
        return Err(top.invalid("oomScoreAdj", format!("{adj} is outside -1000..=1000")));
    }

    let mut conntrack = top.object("conntrack")?;
    config.conntrack = Conntrack {
        max_per_core: conntrack.unsigned("maxPerCore")?,
        min: conntrack.unsigned("min")?,
        tcp_established_timeout: conntrack.duration_or_zero("tcpEstablishedTimeout")?,
        tcp_close_wait_timeout: conntrack.duration_or_zero("tcpCloseWaitTimeout")?,
        tcp_be_liberal: conntrack.boolean("tcpBeLiberal")?,
        udp_timeout: conntrack.duration("udpTimeout")?,
        udp_stream_timeout: conntrack.duration("udpStreamTimeout")?,
    };
    top.absorb(conntrack);

    config.config_sync_period = top.duration("configSyncPeriod")?;

    let mut listed = top.finish();
    listed.sort();
    listed.dedup();
    Ok((config, listed))
}

/// `ipvs.scheduler` → a scheduler here. IPVS's dh, lblc and lblcr pick the backend by the
/// destination address, which is the one Service address here, so they would send every
/// client to the same backend; what they are for (the same key reaches the same backend, for
/// cache locality) is source hashing, the only stable key left being the client.
fn ipvs_scheduler(name: &str) -> Result<IpvsScheduler, String> {
    let (scheduler, approximation) = match name {
        "rr" => (Scheduler::RoundRobin, None),
        "wrr" => (Scheduler::WeightedRoundRobin, None),
        "lc" => (Scheduler::LeastConnection, None),
        "wlc" => (Scheduler::WeightedLeastConnection, None),
        "sh" => (Scheduler::SourceHash, None),
        "mh" => (Scheduler::Maglev, None),
        "sed" => (Scheduler::ShortestExpectedDelay, None),
        "nq" => (Scheduler::NeverQueue, None),
        "dh" | "lblc" | "lblcr" => (
            Scheduler::SourceHash,
            Some(
                "it picks the backend by destination address, which is the single Service \
                 address here; source-hash keeps its point (the same key reaches the same \
                 backend) with the client as the key",
            ),
        ),
        other => {
            return Err(format!(
                "{other:?} is not a scheduler this proxy can stand in for (rr, wrr, lc, wlc, sed, \
                 nq, sh, mh, dh, lblc, lblcr)"
            ));
        }
    };
    Ok(IpvsScheduler {
        name: name.to_string(),
        scheduler,
        approximation,
    })
}

/// `detectLocalMode` with the `detectLocal` field its mode needs; a `detectLocal` field the
/// mode does not use is listed.
fn detect_local(top: &mut Fields<'_>) -> Result<DetectLocal, ConfigError> {
    let mode = top.string("detectLocalMode")?;
    let mut fields = top.object("detectLocal")?;
    let bridge = fields.string("bridgeInterface")?;
    let prefix = fields.string("interfaceNamePrefix")?;
    let detect = match mode.as_deref() {
        None => DetectLocal::Default,
        Some("ClusterCIDR") => DetectLocal::ClusterCidr,
        Some("NodeCIDR") => DetectLocal::NodeCidr,
        Some("BridgeInterface") => {
            let Some(name) = bridge.clone() else {
                return Err(fields.invalid(
                    "bridgeInterface",
                    "required with detectLocalMode BridgeInterface".into(),
                ));
            };
            match PodInterfaces::parse(std::slice::from_ref(&name)) {
                Ok(p) if matches!(p.0.as_slice(), [Selector::Name(_)]) => {}
                _ => {
                    return Err(fields.invalid(
                        "bridgeInterface",
                        format!("{name:?} is not an interface name"),
                    ));
                }
            }
            DetectLocal::BridgeInterface(name)
        }
        Some("InterfaceNamePrefix") => {
            let Some(p) = prefix.clone() else {
                return Err(fields.invalid(
                    "interfaceNamePrefix",
                    "required with detectLocalMode InterfaceNamePrefix".into(),
                ));
            };
            if p.len() > 15 || p.contains(['*', '?', '/', ' ']) {
                return Err(fields.invalid(
                    "interfaceNamePrefix",
                    format!("{p:?} is not the start of an interface name"),
                ));
            }
            DetectLocal::InterfaceNamePrefix(p)
        }
        Some(other) => {
            return Err(top.invalid(
                "detectLocalMode",
                format!(
                    "unknown mode {other:?} (ClusterCIDR, NodeCIDR, BridgeInterface, \
                     InterfaceNamePrefix or empty)"
                ),
            ));
        }
    };
    if bridge.is_some() && !matches!(detect, DetectLocal::BridgeInterface(_)) {
        fields.listed.push("detectLocal.bridgeInterface".into());
    }
    if prefix.is_some() && !matches!(detect, DetectLocal::InterfaceNamePrefix(_)) {
        fields.listed.push("detectLocal.interfaceNamePrefix".into());
    }
    top.absorb(fields);
    Ok(detect)
}

/// `clusterCIDR`: comma-separated CIDRs, at most one per family.
fn cluster_cidrs(list: &str) -> Result<Vec<Cidr>, String> {
    let mut out: Vec<Cidr> = Vec::new();
    for raw in list.split(',').map(str::trim) {
        let cidr = Cidr::parse(raw)
            .filter(|_| raw.contains('/'))
            .ok_or_else(|| format!("{raw:?} is not a CIDR"))?;
        if out.iter().any(|c| c.addr.is_ipv4() == cidr.addr.is_ipv4()) {
            return Err(format!("{list:?} has more than one CIDR of a family"));
        }
        out.push(cidr);
    }
    Ok(out)
}

/// `nodePortAddresses` → values of `--nodeport-addresses`: CIDRs and `primary` as they are,
/// `all` as 0.0.0.0/0 and ::/0, `localhost` as 127.0.0.0/8 and ::1/128.
fn nodeport_addresses(list: &[String]) -> Result<Vec<String>, String> {
    if list.len() > 1 && list.iter().any(|r| r.trim() == "primary") {
        return Err("can't use both 'primary' and CIDRs".into());
    }
    let mut out = Vec::new();
    for raw in list.iter().map(|r| r.trim()) {
        match raw {
            "primary" => out.push("primary".to_string()),
            "all" => out.extend(["0.0.0.0/0".to_string(), "::/0".to_string()]),
            "localhost" => out.extend(["127.0.0.0/8".to_string(), "::1/128".to_string()]),
            cidr => match Cidr::parse(cidr) {
                Some(c) if cidr.contains('/') => out.push(c.to_string()),
                _ => {
                    return Err(format!(
                        "{raw:?} is not a CIDR or one of primary, all, localhost"
                    ));
                }
            },
        }
    }
    Ok(out)
}

/// What [`apply`] did or refused, to be logged at `level`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub level: log::Level,
    pub text: String,
}

impl Note {
    fn info(text: String) -> Note {
        Note {
            level: log::Level::Info,
            text: format!("config: {text}"),
        }
    }
    fn warn(text: String) -> Note {
        Note {
            level: log::Level::Warn,
            text: format!("config: {text}"),
        }
    }
    fn debug(text: String) -> Note {
        Note {
            level: log::Level::Debug,
            text: format!("config: {text}"),
        }
    }
}

/// The one warning line listing what [`parse`] left aside.
pub fn unused_line(unused: &[String]) -> Option<Note> {
    (!unused.is_empty()).then(|| {
        Note::warn(format!(
            "fields not used by kube-bpf-proxy: {}",
            unused.join(", ")
        ))
    })
}

/// kube-proxy's settings for `run`, from a file or from its flags.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub config: KubeProxyConfig,
    /// Fields (or flags) not used here.
    pub unused: Vec<String>,
    /// What to log first.
    pub notes: Vec<Note>,
    /// The `--config` file's content as read: the agent exits when it changes (11.13).
    pub loaded: Option<Vec<u8>>,
}

/// kube-proxy's settings for `run`: the `--config` file (with kube-proxy's logging flags over
/// it, and its other flags ignored as kube-proxy ignores them then, semantics 11.13), else the
/// document kube-proxy's flags describe ([`flags`]); `None` with neither.
pub fn kube_proxy_settings(args: &RunArgs) -> anyhow::Result<Option<Settings>> {
    let given = &args.kube_proxy;
    let Some(path) = &args.config else {
        let Some((config, unused)) = flags::parse(given).map_err(|e| anyhow::anyhow!("{e}"))?
        else {
            return Ok(None);
        };
        let note = Note::info(format!(
            "kube-proxy's flags read as its configuration: {}",
            given.given().join(" ")
        ));
        return Ok(Some(Settings {
            config,
            unused,
            notes: vec![note],
            loaded: None,
        }));
    };
    let (mut config, unused, text) = load(path)?;
    let ignored = flags::over_file(given, &mut config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut notes = Vec::new();
    if !ignored.is_empty() {
        notes.push(Note::warn(format!(
            "kube-proxy's flags ignored, as kube-proxy ignores them when --config is given (the \
             file's settings apply; logging flags excepted): {}",
            ignored.join(" ")
        )));
    }
    Ok(Some(Settings {
        config,
        unused,
        notes,
        loaded: Some(text.into_bytes()),
    }))
}

/// Lays the file given to `run --config` under the command line `cli` parsed from `matches`:
/// the global logging flags and `run`'s flags not given on the command line take the file's
/// values. `cpus` scales `conntrack.maxPerCore`. Returns what to log.
pub fn lay_under(
    cli: &mut Cli,
    matches: &ArgMatches,
    config: &KubeProxyConfig,
    unused: &[String],
    cpus: u32,
) -> Vec<Note> {
    let Some(run_matches) = matches.subcommand_matches("run") else {
        return Vec::new();
    };
    let given = |id: &str| run_matches.value_source(id) == Some(ValueSource::CommandLine);
    let mut notes = apply_logging(config, &mut cli.log_level, &mut cli.log_format, &given);
    if let Command::Run(args) = &mut cli.command {
        notes.extend(apply(config, unused, args, &given, cpus));
    }
    notes
}

/// `logging` → `--log-level`, `--log-format`, unless given. klog's verbosity 0-3 is this
/// proxy's info level, 4-5 debug, 6 and more trace.
pub fn apply_logging(
    config: &KubeProxyConfig,
    level: &mut String,
    format: &mut LogFormat,
    given: &dyn Fn(&str) -> bool,
) -> Vec<Note> {
    let mut notes = Vec::new();
    if let Some(f) = config.log_format {
        if given("log_format") {
            notes.push(overridden("logging.format", "log-format"));
        } else {
            *format = f;
        }
    }
    if let Some(v) = config.log_verbosity {
        let mapped = match v {
            0..=3 => "info",
            4..=5 => "debug",
            _ => "trace",
        };
        if given("log_level") {
            notes.push(overridden("logging.verbosity", "log-level"));
        } else {
            *level = mapped.to_string();
            notes.push(Note::debug(format!(
                "logging.verbosity {v}: --log-level {mapped}"
            )));
        }
    }
    notes
}

fn overridden(field: &str, flag: &str) -> Note {
    Note::debug(format!("{field}: --{flag} given on the command line wins"))
}

/// `run`'s flags that kube-proxy has too (clap ids). kube-proxy ignores its flags when a
/// `--config` file is given, but for `--hostname-override` and the logging flags (semantics
/// 11.13): next to the file, these lose to the file's field. `run`'s own flags (`--scheduler`,
/// `--pod-interfaces`, `--sync-period`, `--max-conntrack`) win over the fields they stand for.
const KUBE_PROXY_FLAGS: &[&str] = &[
    "kubeconfig",
    "bind_address",
    "healthz_bind_address",
    "metrics_bind_address",
    "bind_address_hard_fail",
    "masquerade_all",
    "nodeport_addresses",
    "oom_score_adj",
    "conntrack_tcp_timeout_established",
    "conntrack_udp_timeout",
];

/// Whether flag `id`, if `given`, keeps its value over the field of a configuration read
/// `from_file` (`--config`) or from kube-proxy's flags; else `set` takes the field's value.
/// Either way the choice is noted.
fn flag_wins(
    given: &dyn Fn(&str) -> bool,
    from_file: bool,
    field: &str,
    id: &str,
    notes: &mut Vec<Note>,
) -> bool {
    if !given(id) {
        return false;
    }
    let flag = id.replace('_', "-");
    if from_file && KUBE_PROXY_FLAGS.contains(&id) {
        notes.push(Note::warn(format!(
            "--{flag} ignored: the --config file sets {field}, and kube-proxy ignores its flags \
             next to --config"
        )));
        return false;
    }
    notes.push(overridden(field, &flag));
    true
}

/// The field of a `--config` file that kube-proxy's flag `id` (in `KUBE_PROXY_FLAGS`) stands
/// for, and whether `config` sets it (a zero TCP timeout counts as unset: it keeps the
/// default here).
fn file_field(config: &KubeProxyConfig, id: &str) -> (&'static str, bool) {
    let c = &config.conntrack;
    match id {
        "kubeconfig" => ("clientConnection.kubeconfig", config.kubeconfig.is_some()),
        "bind_address" => ("bindAddress", config.bind_address.is_some()),
        "healthz_bind_address" => ("healthzBindAddress", config.healthz_bind_address.is_some()),
        "metrics_bind_address" => ("metricsBindAddress", config.metrics_bind_address.is_some()),
        "bind_address_hard_fail" => ("bindAddressHardFail", config.bind_address_hard_fail),
        "masquerade_all" if config.mode == ProxyMode::NfTables => {
            ("nftables.masqueradeAll", config.masquerade_all)
        }
        "masquerade_all" => ("iptables.masqueradeAll", config.masquerade_all),
        "nodeport_addresses" => ("nodePortAddresses", config.nodeport_addresses.is_some()),
        "oom_score_adj" => ("oomScoreAdj", config.oom_score_adj.is_some()),
        "conntrack_tcp_timeout_established" => (
            "conntrack.tcpEstablishedTimeout",
            c.tcp_established_timeout.is_some_and(|t| !t.is_zero()),
        ),
        "conntrack_udp_timeout" => (
            "conntrack.udpTimeout/udpStreamTimeout",
            c.udp_timeout.max(c.udp_stream_timeout).is_some(),
        ),
        _ => ("", false),
    }
}

/// Next to a `--config` file kube-proxy ignores its flags (semantics 11.13): where the file
/// leaves a field unset, kube-proxy takes its default, not the flag. So a kube-proxy flag
/// given with `run --config` whose field the file leaves unset goes back to its default here,
/// with a warning; where the file sets the field, `flag_wins` says the same.
fn ignore_flags_the_file_leaves_unset(
    config: &KubeProxyConfig,
    args: &mut RunArgs,
    given: &dyn Fn(&str) -> bool,
    notes: &mut Vec<Note>,
) {
    for &id in KUBE_PROXY_FLAGS {
        let (field, set) = file_field(config, id);
        if !given(id) || set {
            continue;
        }
        match id {
            "kubeconfig" => args.source.kubeconfig = None,
            "bind_address" => args.source.bind_address = None,
            "healthz_bind_address" => args.healthz_bind_address = None,
            "metrics_bind_address" => args.metrics_bind_address = None,
            "bind_address_hard_fail" => args.bind_address_hard_fail = false,
            "masquerade_all" => args.masquerade_all = false,
            "nodeport_addresses" => args.source.nodeport_addresses.clear(),
            "oom_score_adj" => args.oom_score_adj = None,
            "conntrack_tcp_timeout_established" => {
                args.conntrack_tcp_timeout_established = super::run::TCP_ESTABLISHED_DEFAULT
            }
            "conntrack_udp_timeout" => args.conntrack_udp_timeout = super::run::UDP_TIMEOUT_DEFAULT,
            _ => continue,
        }
        notes.push(Note::warn(format!(
            "--{} ignored: kube-proxy ignores its flags next to --config, and the file leaves \
             {field} unset, so the default applies",
            id.replace('_', "-")
        )));
    }
}

/// Lays the file's settings under `args`: a setting whose flag was given on the command line
/// (`given(id)` with clap's argument id) keeps the flag's value, unless it is one of
/// kube-proxy's flags next to a `--config` file (`KUBE_PROXY_FLAGS`). `cpus`
/// scales `conntrack.maxPerCore`. Returns what to log, the unused-fields line included.
pub fn apply(
    config: &KubeProxyConfig,
    unused: &[String],
    args: &mut RunArgs,
    given: &dyn Fn(&str) -> bool,
    cpus: u32,
) -> Vec<Note> {
    let mut notes = Vec::new();
    let from_file = args.config.is_some();
    if from_file {
        ignore_flags_the_file_leaves_unset(config, args, given, &mut notes);
    }
    // Sets `$target` from the file unless flag `$id` wins (`flag_wins`).
    macro_rules! set {
        ($field:expr, $id:literal, $target:expr, $value:expr) => {
            if !flag_wins(given, from_file, $field, $id, &mut notes) {
                $target = $value;
            }
        };
    }

    notes.push(Note::info(format!(
        "mode {}: replaced by this proxy (BPF programs and maps instead of kube-proxy's rules)",
        config.mode.as_str()
    )));
    if let Some(h) = &config.hostname_override {
        set!(
            "hostnameOverride",
            "hostname_override",
            args.source.hostname_override,
            Some(h.clone())
        );
    }
    if let Some(k) = &config.kubeconfig {
        if args.source.manifests.is_some() {
            notes.push(Note::info(
                "clientConnection.kubeconfig not used: --manifests is the source".into(),
            ));
        } else {
            set!(
                "clientConnection.kubeconfig",
                "kubeconfig",
                args.source.kubeconfig,
                Some(k.clone())
            );
        }
    }
    if let Some(a) = config.bind_address {
        set!(
            "bindAddress",
            "bind_address",
            args.source.bind_address,
            Some(a)
        );
    }
    if let Some(a) = &config.healthz_bind_address {
        set!(
            "healthzBindAddress",
            "healthz_bind_address",
            args.healthz_bind_address,
            Some(a.clone())
        );
    }
    if let Some(a) = &config.metrics_bind_address {
        set!(
            "metricsBindAddress",
            "metrics_bind_address",
            args.metrics_bind_address,
            Some(a.clone())
        );
    }
    if config.bind_address_hard_fail {
        set!(
            "bindAddressHardFail",
            "bind_address_hard_fail",
            args.bind_address_hard_fail,
            true
        );
    }
    if config.masquerade_all {
        let field = if config.mode == ProxyMode::NfTables {
            "nftables.masqueradeAll"
        } else {
            "iptables.masqueradeAll"
        };
        set!(field, "masquerade_all", args.masquerade_all, true);
    }

    if let Some(s) = &config.ipvs_scheduler {
        if given("scheduler") {
            notes.push(overridden("ipvs.scheduler", "scheduler"));
        } else {
            args.source.scheduler = s.scheduler.into();
            let mode = if config.mode == ProxyMode::Ipvs {
                ""
            } else {
                " (kube-proxy itself reads it in ipvs mode only)"
            };
            notes.push(match s.approximation {
                None => Note::info(format!(
                    "ipvs.scheduler {}: --scheduler {}{mode}",
                    s.name,
                    s.scheduler.as_str()
                )),
                Some(why) => Note::warn(format!(
                    "ipvs.scheduler {}: --scheduler {} instead: {why}{mode}",
                    s.name,
                    s.scheduler.as_str()
                )),
            });
        }
    }
    if config.ipvs_strict_arp {
        notes.push(Note::info(
            "ipvs.strictARP: not applicable, this proxy assigns no Service address to an \
             interface, so the node answers no ARP for one"
                .into(),
        ));
    }

    apply_detect_local(config, args, given, &mut notes);

    // kube-proxy's nftables mode defaults an empty nodePortAddresses to [primary] (its
    // platformApplyDefaults; semantics 7.3); the other modes serve every local address.
    let nft_primary = config.mode == ProxyMode::NfTables
        && config.nodeport_addresses.as_ref().is_none_or(Vec::is_empty)
        && (from_file || !given("nodeport_addresses"));
    if nft_primary {
        args.source.nodeport_addresses = vec!["primary".to_string()];
        notes.push(Note::info(
            "mode nftables without nodePortAddresses: NodePorts on the node's primary \
             addresses only, kube-proxy's nftables default (nodePortAddresses [primary])"
                .into(),
        ));
    } else if let Some(list) = &config.nodeport_addresses {
        if list.iter().any(|a| a == "127.0.0.0/8" || a == "::1/128") {
            notes.push(Note::warn(
                "nodePortAddresses localhost: NodePorts are never served on loopback addresses \
                 here"
                    .into(),
            ));
        }
        set!(
            "nodePortAddresses",
            "nodeport_addresses",
            args.source.nodeport_addresses,
            list.clone()
        );
    }
    // kube-proxy's configSyncPeriod (default 15m) is how often its informers resync; ours is
    // how often the maps are read back and repaired. A zero or empty period keeps our own
    // default (5m) rather than kube-proxy's 15m: it is a different activity's default.
    if let Some(p) = config.config_sync_period {
        set!("configSyncPeriod", "sync_period", args.sync_period, p);
    }
    apply_conntrack(&config.conntrack, args, given, cpus, &mut notes);

    // semantics 8.6: kube-proxy's health timeout is twice its sync period.
    if let Some(p) = config.sync_period {
        let timeout = p.saturating_mul(2);
        args.health_timeout = Some(timeout);
        notes.push(Note::info(format!(
            "syncPeriod {}: /healthz answers 503 once a change has waited {} without a \
             sync (kube-proxy's 2 x syncPeriod); syncs here follow every change",
            format_go_duration(p),
            format_go_duration(timeout)
        )));
    }

    if let Some(adj) = config.oom_score_adj {
        set!(
            "oomScoreAdj",
            "oom_score_adj",
            args.oom_score_adj,
            Some(adj)
        );
    }

    if config.feature_gates.get(NODE_HINTS_GATE) == Some(&false) {
        args.source.ignore_node_hints = true;
        notes.push(Note::info(format!(
            "featureGates.{NODE_HINTS_GATE}=false: endpoints' forNodes hints are not read \
             (trafficDistribution PreferSameNode falls back to zone hints)"
        )));
    }
    for (name, on) in &config.feature_gates {
        if let Some((_, what)) = ALWAYS_ON_GATES.iter().find(|(g, _)| g == name)
            && !on
        {
            notes.push(Note::warn(format!(
                "featureGates.{name}=false: not honoured, this proxy always {what}"
            )));
        }
    }
    notes.extend(unused_line(unused));
    notes
}

/// `detectLocalMode`: this proxy needs no cluster CIDR to recognise local pods, since their
/// connections pass through the socket hooks and their packets enter through their
/// pod-facing interface; so BridgeInterface and InterfaceNamePrefix name pod-facing
/// interfaces (`--pod-interfaces`, next to `auto`), and ClusterCIDR and NodeCIDR are what
/// `auto` does already (it follows the routes to local endpoints and to the node's pod CIDRs).
fn apply_detect_local(
    config: &KubeProxyConfig,
    args: &mut RunArgs,
    given: &dyn Fn(&str) -> bool,
    notes: &mut Vec<Note>,
) {
    let interfaces = match &config.detect_local {
        DetectLocal::BridgeInterface(name) => Some(("BridgeInterface", name.clone())),
        DetectLocal::InterfaceNamePrefix(prefix) => {
            Some(("InterfaceNamePrefix", format!("{prefix}*")))
        }
        DetectLocal::Default | DetectLocal::ClusterCidr | DetectLocal::NodeCidr => None,
    };
    let named = interfaces.is_some();
    match interfaces {
        Some((mode, selector)) => {
            if given("pod_interfaces") {
                notes.push(overridden("detectLocalMode", "pod-interfaces"));
            } else {
                notes.push(Note::info(format!(
                    "detectLocalMode {mode}: --pod-interfaces auto,{selector}"
                )));
                args.pod_interfaces = vec!["auto".to_string(), selector];
            }
        }
        None => {
            let mode = match config.detect_local {
                DetectLocal::NodeCidr => "NodeCIDR",
                _ => "ClusterCIDR",
            };
            let cidrs: Vec<String> = config.cluster_cidrs.iter().map(|c| c.to_string()).collect();
            let cidrs = if cidrs.is_empty() {
                String::new()
            } else {
                format!(" and clusterCIDR {}", cidrs.join(","))
            };
            notes.push(Note::info(format!(
                "detectLocalMode {mode}{cidrs}: not needed, local pods are recognised by the \
                 socket hooks and their interfaces (--pod-interfaces)"
            )));
        }
    }
    if !config.cluster_cidrs.is_empty() && named {
        notes.push(Note::info(
            "clusterCIDR: not needed, local pods are recognised by the socket hooks and their \
             interfaces"
                .into(),
        ));
    }
}

/// `conntrack`: the size of the connection-tracking maps (per family here; kube-proxy sizes
/// the kernel's table for both) and the idle timeouts of our collector.
fn apply_conntrack(
    c: &Conntrack,
    args: &mut RunArgs,
    given: &dyn Fn(&str) -> bool,
    cpus: u32,
    notes: &mut Vec<Note>,
) {
    let from_file = args.config.is_some();
    macro_rules! set {
        ($field:expr, $id:literal, $target:expr, $value:expr) => {
            if !flag_wins(given, from_file, $field, $id, notes) {
                $target = $value;
            }
        };
    }
    match (c.max_per_core, c.min) {
        // Both null: our default, from the node's memory (--map-memory-ratio); kube-proxy's
        // defaults size a table the whole node shares.
        (None, None) => {}
        (Some(0), _) => notes.push(Note::info(
            "conntrack.maxPerCore 0: the connection-tracking maps keep their size from the \
             node's memory"
                .into(),
        )),
        (per_core, min) => {
            let per_core = per_core.map_or(CONNTRACK_MAX_PER_CORE, u64::from);
            let min = min.map_or(CONNTRACK_MIN, u64::from);
            let entries = (per_core * u64::from(cpus.max(1))).max(min);
            let entries = u32::try_from(entries).unwrap_or(u32::MAX);
            set!(
                "conntrack.maxPerCore",
                "max_conntrack",
                args.max_conntrack,
                Some(entries)
            );
        }
    }
    // 0 leaves the kernel's timeout alone (`netfilter_settings`); ours keeps its own.
    if let Some(t) = c.tcp_established_timeout.filter(|t| !t.is_zero()) {
        set!(
            "conntrack.tcpEstablishedTimeout",
            "conntrack_tcp_timeout_established",
            args.conntrack_tcp_timeout_established,
            t
        );
    }
    // One idle timeout for every UDP flow here, answered or not: the longer of the two, so no
    // flow is forgotten sooner than kube-proxy's kernel would forget it.
    if let Some(t) = c.udp_timeout.max(c.udp_stream_timeout) {
        set!(
            "conntrack.udpTimeout/udpStreamTimeout",
            "conntrack_udp_timeout",
            args.conntrack_udp_timeout,
            t
        );
    }
    if c.tcp_be_liberal {
        notes.push(Note::debug(
            "conntrack.tcpBeLiberal: always so here, connection tracking does not check TCP \
             windows"
                .into(),
        ));
    }
}

/// The kind of value a field holds, for fields read only to be type-checked and listed.
#[derive(Copy, Clone)]
enum Kind {
    Bool,
    Str,
    Int,
    Number,
    Duration,
    Strings,
    Any,
}

static EMPTY: LazyLock<Map<String, Value>> = LazyLock::new(Map::new);

/// The keys of one mapping of the file as they are taken: each read marks its key, and
/// [`Fields::finish`] lists the keys nobody read.
struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
    taken: BTreeSet<&'static str>,
    /// Field paths not used here.
    listed: Vec<String>,
}

impl<'a> Fields<'a> {
    fn new(path: &str, map: &'a Map<String, Value>) -> Self {
        Fields {
            path: path.to_string(),
            map,
            taken: BTreeSet::new(),
            listed: Vec::new(),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value of `key`, marked as read; `None` when absent or null.
    fn take(&mut self, key: &'static str) -> Option<&'a Value> {
        self.taken.insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, expected: &'static str, got: &Value) -> ConfigError {
        ConfigError::Type {
            field: self.name(key),
            expected,
            got: describe(got),
        }
    }

    fn invalid(&self, key: &str, why: String) -> ConfigError {
        ConfigError::Invalid {
            field: self.name(key),
            why,
        }
    }

    /// A string; "" is `None`.
    fn string(&mut self, key: &'static str) -> Result<Option<String>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok((!s.is_empty()).then(|| s.clone())),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    fn boolean(&mut self, key: &'static str) -> Result<bool, ConfigError> {
        match self.take(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong(key, "a boolean", v)),
        }
    }

    /// A Go int32.
    fn int32(&mut self, key: &'static str) -> Result<Option<i32>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(v @ Value::Number(n)) => match n.as_i64() {
                Some(i) => i32::try_from(i).map(Some).map_err(|_| {
                    self.invalid(key, format!("{i} is out of range for a 32-bit integer"))
                }),
                None if n.is_u64() => {
                    Err(self.invalid(key, format!("{n} is out of range for a 32-bit integer")))
                }
                None => Err(self.wrong(key, "an integer", v)),
            },
            Some(v) => Err(self.wrong(key, "an integer", v)),
        }
    }

    /// A Go int32 that must not be negative.
    fn unsigned(&mut self, key: &'static str) -> Result<Option<u32>, ConfigError> {
        match self.int32(key)? {
            None => Ok(None),
            Some(i) => u32::try_from(i)
                .map(Some)
                .map_err(|_| self.invalid(key, format!("{i} is negative"))),
        }
    }

    /// A Go duration string; null, "" and zero durations are `None` (kube-proxy's "unset").
    fn duration(&mut self, key: &'static str) -> Result<Option<Duration>, ConfigError> {
        Ok(self.duration_or_zero(key)?.filter(|d| !d.is_zero()))
    }

    /// A duration where zero is a value of its own (kube-proxy's pointer fields whose 0 means
    /// "leave the kernel's setting as it is"); `None` when null, empty or absent.
    fn duration_or_zero(&mut self, key: &'static str) -> Result<Option<Duration>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => match parse_go_duration(s) {
                Ok(d) => Ok(Some(d)),
                Err(why) => Err(self.invalid(key, why)),
            },
            Some(v) => Err(self.wrong(key, "a duration such as \"15m0s\"", v)),
        }
    }

    /// A list of strings; `None` when null or absent.
    fn strings(&mut self, key: &'static str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.wrong(key, "a list of strings", other)),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(v) => Err(self.wrong(key, "a list of strings", v)),
        }
    }

    /// `featureGates`: names to booleans.
    fn gates(&mut self, key: &'static str) -> Result<BTreeMap<String, bool>, ConfigError> {
        match self.take(key) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(name, v)| match v {
                    Value::Bool(b) => Ok((name.clone(), *b)),
                    other => Err(ConfigError::Type {
                        field: format!("{}.{name}", self.name(key)),
                        expected: "a boolean",
                        got: describe(other),
                    }),
                })
                .collect(),
            Some(v) => Err(self.wrong(key, "a mapping of gate names to booleans", v)),
        }
    }

    /// A nested mapping (empty when null or absent); hand it back with [`Fields::absorb`].
    fn object(&mut self, key: &'static str) -> Result<Fields<'a>, ConfigError> {
        let path = self.name(key);
        match self.take(key) {
            None => Ok(Fields::new(&path, &EMPTY)),
            Some(Value::Object(map)) => Ok(Fields::new(&path, map)),
            Some(v) => Err(self.wrong(key, "a mapping", v)),
        }
    }

    /// Takes over what a nested mapping left aside.
    fn absorb(&mut self, child: Fields<'_>) {
        self.listed.extend(child.finish());
    }

    /// A field kube-proxy has and this proxy does not use: type-checked, listed when it holds
    /// more than its zero value.
    fn unused(&mut self, key: &'static str, kind: Kind) -> Result<(), ConfigError> {
        if let Some(v) = self.check(key, kind)?
            && !is_zero(v)
        {
            self.listed.push(self.name(key));
        }
        Ok(())
    }

    /// [`Fields::unused`] for one of kube-proxy's pointer fields, where any value but null
    /// (false and 0 too) differs from the default.
    fn unused_pointer(&mut self, key: &'static str, kind: Kind) -> Result<(), ConfigError> {
        if self.check(key, kind)?.is_some() {
            self.listed.push(self.name(key));
        }
        Ok(())
    }

    fn check(&mut self, key: &'static str, kind: Kind) -> Result<Option<&'a Value>, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        let (ok, expected) = match kind {
            Kind::Bool => (v.is_boolean(), "a boolean"),
            Kind::Str => (v.is_string(), "a string"),
            Kind::Int => (v.is_i64() || v.is_u64(), "an integer"),
            Kind::Number => (v.is_number(), "a number"),
            Kind::Duration => match v {
                Value::String(s) if s.is_empty() => (true, ""),
                Value::String(s) => {
                    parse_go_duration(s).map_err(|why| self.invalid(key, why))?;
                    (true, "")
                }
                _ => (false, "a duration such as \"15m0s\""),
            },
            Kind::Strings => (
                v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
                "a list of strings",
            ),
            Kind::Any => (true, ""),
        };
        if ok {
            Ok(Some(v))
        } else {
            Err(self.wrong(key, expected, v))
        }
    }

    /// What was left aside: listed fields, then every key nobody read.
    fn finish(self) -> Vec<String> {
        let mut listed = self.listed;
        for key in self.map.keys() {
            if !self.taken.contains(key.as_str()) {
                listed.push(if self.path.is_empty() {
                    key.clone()
                } else {
                    format!("{}.{key}", self.path)
                });
            }
        }
        listed
    }

    /// `IP:port`, or an IP alone with kube-proxy's `port` added (its AppendPortIfNeeded).
    fn bind_address(
        &mut self,
        key: &'static str,
        port: u16,
    ) -> Result<Option<String>, ConfigError> {
        let Some(raw) = self.string(key)? else {
            return Ok(None);
        };
        let raw = raw.trim();
        if let Ok(a) = raw.parse::<SocketAddr>() {
            return Ok(Some(a.to_string()));
        }
        match raw.parse::<IpAddr>() {
            Ok(ip) => Ok(Some(SocketAddr::new(ip, port).to_string())),
            Err(_) => Err(self.invalid(key, format!("{raw:?} is not IP:port or an IP address"))),
        }
    }
}

/// A value's zero: what kube-proxy treats as "not set".
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || parse_go_duration(s).is_ok_and(|d| d.is_zero()),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.values().all(is_zero),
    }
}

/// A value as an error message shows it: strings quoted and cut at 40 characters.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            if short.len() < s.len() {
                format!("{short:?}...")
            } else {
                format!("{s:?}")
            }
        }
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
    }
}

fn describe_opt(v: Option<&Value>) -> String {
    match v {
        None => "(missing)".to_string(),
        Some(Value::String(s)) if s.is_empty() => "\"\" (missing)".to_string(),
        Some(v) => describe(v),
    }
}
