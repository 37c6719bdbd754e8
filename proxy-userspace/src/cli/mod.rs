//! The `kube-bpf-proxy` command line: the agent (`run`) and the inspection commands, which read
//! the pinned maps and need no API server (`explain` and `verify` also read the source).

pub mod api;
mod config;
mod explain;
mod monitor;
pub mod output;
mod run;
#[cfg(test)]
mod schema_tests;
mod signals;
mod status;
mod verify;
pub mod view;

use std::{path::PathBuf, sync::mpsc, time::Duration};

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use self::output::Format;
use crate::{
    datapath::bpf,
    snapshot::Snapshot,
    source::{Source, kube::KubeSource, manifests::ManifestSource},
};

#[derive(Parser)]
#[command(
    name = "kube-bpf-proxy",
    version,
    about = "A Kubernetes service proxy in BPF"
)]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace, or a filter such as
    /// `info,proxy_userspace::agent=debug` (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log format: text for people, json for log pipelines (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Structured logging through `tracing`; `log` records (ours and aya's) are forwarded to it.
fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging not initialised: {e}");
    }
}

// Parsed once per process: the size of `run`'s options costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the agent: watch a source and keep the BPF maps equal to it.
    Run(run::RunArgs),
    /// Attached hooks, map fill levels, agent version and last sync, datapath counters.
    Status(status::StatusArgs),
    /// Every frontend with its backends, as the kernel's maps hold them.
    Services(InspectArgs),
    /// Why a client's next connection to a frontend goes where it goes.
    Explain(explain::ExplainArgs),
    /// Compare the kernel's maps with the state computed from the source; exit 1 on drift.
    Verify(verify::VerifyArgs),
    /// Stream the data path's translations and drops as they happen (text or JSON lines),
    /// filtered by Service, address, reason or kind; events are on only while a monitor runs.
    Monitor(monitor::MonitorArgs),
    /// Turn the BPF programs' debug logs on or off at runtime (they appear in the agent's log).
    DebugLog {
        #[arg(value_enum)]
        state: OnOff,
        /// Pin directory on a bpffs.
        #[arg(long, default_value = bpf::DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
    },
    /// Detach every hook and remove every pinned map and link the agent created.
    Cleanup {
        /// Pin directory on a bpffs.
        #[arg(long, default_value = bpf::DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// Options of the commands that read the pinned maps.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// Pin directory on a bpffs.
    #[arg(long, default_value = bpf::DEFAULT_PIN_DIR)]
    pub bpffs: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// `--scheduler`: the scheduler names, kube-proxy's IPVS names as aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulerFlag {
    Random,
    #[value(alias = "rr")]
    RoundRobin,
    #[value(alias = "wrr")]
    WeightedRoundRobin,
    #[value(alias = "sh")]
    SourceHash,
    #[value(alias = "lc")]
    LeastConnection,
    #[value(alias = "wlc")]
    WeightedLeastConnection,
    #[value(alias = "sed")]
    ShortestExpectedDelay,
    #[value(alias = "nq")]
    NeverQueue,
    #[value(alias = "mh")]
    Maglev,
}

impl From<SchedulerFlag> for crate::model::Scheduler {
    fn from(flag: SchedulerFlag) -> Self {
        use crate::model::Scheduler as S;
        match flag {
            SchedulerFlag::Random => S::Random,
            SchedulerFlag::RoundRobin => S::RoundRobin,
            SchedulerFlag::WeightedRoundRobin => S::WeightedRoundRobin,
            SchedulerFlag::SourceHash => S::SourceHash,
            SchedulerFlag::LeastConnection => S::LeastConnection,
            SchedulerFlag::WeightedLeastConnection => S::WeightedLeastConnection,
            SchedulerFlag::ShortestExpectedDelay => S::ShortestExpectedDelay,
            SchedulerFlag::NeverQueue => S::NeverQueue,
            SchedulerFlag::Maglev => S::Maglev,
        }
    }
}

impl From<crate::model::Scheduler> for SchedulerFlag {
    fn from(s: crate::model::Scheduler) -> Self {
        use crate::model::Scheduler as S;
        match s {
            S::Random => SchedulerFlag::Random,
            S::RoundRobin => SchedulerFlag::RoundRobin,
            S::WeightedRoundRobin => SchedulerFlag::WeightedRoundRobin,
            S::SourceHash => SchedulerFlag::SourceHash,
            S::LeastConnection => SchedulerFlag::LeastConnection,
            S::WeightedLeastConnection => SchedulerFlag::WeightedLeastConnection,
            S::ShortestExpectedDelay => SchedulerFlag::ShortestExpectedDelay,
            S::NeverQueue => SchedulerFlag::NeverQueue,
            S::Maglev => SchedulerFlag::Maglev,
        }
    }
}

/// Where Services, EndpointSlices and the Node come from.
#[derive(clap::Args, Clone)]
pub struct SourceArgs {
    /// Read Services, EndpointSlices and Nodes from YAML files in this directory (re-read on
    /// change) instead of an API server.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// API server URL, e.g. https://192.0.2.10:6443 (the real address, not the `kubernetes`
    /// Service's ClusterIP, which this proxy programs), or http://127.0.0.1:8001 through
    /// `kubectl proxy`. Overrides the kubeconfig's server. With https and a mounted service
    /// account, the pod's token and CA are used.
    #[arg(long, conflicts_with = "manifests")]
    pub master: Option<String>,
    /// Kubeconfig file for the API server (default: in-cluster config, then $KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as in EndpointSlice nodeName (default: the hostname), trimmed and
    /// lower-cased as kube-proxy takes it; empty means the hostname, blanks are refused.
    #[arg(long, value_parser = parse_hostname_override)]
    pub hostname_override: Option<String>,
    /// CIDRs of the node addresses NodePorts are served on (kube-proxy's
    /// --nodeport-addresses); a family without any CIDR uses all its addresses. `primary`
    /// stands for the node's primary address of each family (--bind-address, else the Node
    /// object's first InternalIP, then ExternalIP); a family without one serves no NodePort.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// kube-proxy's --bind-address: binds nothing; a specific address is the node's primary
    /// address of its family (for --nodeport-addresses primary), and an IPv6 one makes the
    /// default health and metrics addresses IPv6.
    #[arg(long)]
    pub bind_address: Option<std::net::IpAddr>,
    /// Scheduler of Services without the `kube-bpf-proxy.io/scheduler` annotation: random
    /// (kube-proxy's), round-robin (rr), weighted-round-robin (wrr), source-hash (sh) or
    /// maglev (mh).
    #[arg(long, value_enum, default_value_t = SchedulerFlag::Random)]
    pub scheduler: SchedulerFlag,
    /// Entries of each Maglev table: a prime, well above 100 x the backends of a Service.
    #[arg(long, default_value_t = crate::maglev::DEFAULT_SIZE)]
    pub maglev_table_size: u32,
    /// Set by `--config`/`--feature-gates` with PreferSameTrafficDistribution=false:
    /// endpoints' node hints are not read (semantics 5.5).
    #[arg(skip)]
    pub ignore_node_hints: bool,
}

/// `--hostname-override` as kube-proxy reads it: trimmed and lower-cased; "" stands for no
/// override (the hostname), while blanks alone are an error ("empty hostname-override is
/// invalid").
fn parse_hostname_override(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    if name.is_empty() && !raw.is_empty() {
        return Err("empty hostname-override is invalid".into());
    }
    Ok(name.to_lowercase())
}

impl SourceArgs {
    pub fn node_name(&self) -> String {
        self.hostname_override
            .clone()
            .filter(|h| !h.trim().is_empty())
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_default()
            })
            .to_lowercase()
    }

    /// The manifests source with --manifests, else the API server (--master, --kubeconfig,
    /// in-cluster configuration, $KUBECONFIG, in that order).
    pub fn source(&self) -> anyhow::Result<Box<dyn Source>> {
        self.source_with(None, None)
    }

    /// [`SourceArgs::source`] for the agent: the API source counts its list/watch errors and
    /// undecodable objects in `metrics`, and either source keeps `node_addresses` equal to the
    /// addresses of every Node object when given (the agent in DSR mode).
    pub fn source_with(
        &self,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
        node_addresses: Option<std::sync::Arc<crate::source::NodeAddresses>>,
    ) -> anyhow::Result<Box<dyn Source>> {
        Ok(match &self.manifests {
            Some(dir) => {
                let source = ManifestSource::new(dir.clone(), self.node_name());
                Box::new(match node_addresses {
                    Some(book) => source.with_node_addresses(book),
                    None => source,
                })
            }
            None => {
                let mut source = KubeSource::from_flags(
                    self.master.as_deref(),
                    self.kubeconfig.clone(),
                    self.node_name(),
                )?;
                if let Some(m) = metrics {
                    source = source.with_metrics(m);
                }
                if let Some(book) = node_addresses {
                    source = source.with_node_addresses(book);
                }
                Box::new(source)
            }
        })
    }

    /// Whether a source was named explicitly (for commands where it is optional).
    pub fn given(&self) -> bool {
        self.manifests.is_some() || self.master.is_some() || self.kubeconfig.is_some()
    }

    /// The settings compile takes from the command line.
    pub fn config(&self) -> anyhow::Result<crate::snapshot::ProxyConfig> {
        let scheduler = self.scheduler.into();
        if !crate::maglev::is_prime(self.maglev_table_size) {
            anyhow::bail!(
                "--maglev-table-size {} is not a prime (e.g. {:?})",
                self.maglev_table_size,
                crate::maglev::SIZES
            );
        }
        Ok(crate::snapshot::ProxyConfig {
            scheduler,
            maglev_size: self.maglev_table_size,
            node_hints: !self.ignore_node_hints,
        })
    }

    /// --nodeport-addresses with --bind-address.
    pub fn nodeport_selection(&self) -> anyhow::Result<crate::compile::NodePortSelection> {
        crate::compile::NodePortSelection::parse(&self.nodeport_addresses, self.bind_address)
            .map_err(|why| anyhow::anyhow!("--nodeport-addresses: {why}"))
    }

    /// Runs the source until its first complete snapshot, completed with this node's NodePort
    /// addresses and the command line's settings, as the agent completes its snapshots.
    pub fn first_snapshot(&self, timeout: Duration) -> anyhow::Result<Snapshot> {
        let mut snapshot = self.source_snapshot(timeout)?;
        snapshot.config = self.config()?;
        let all = crate::datapath::netdev::local_addresses().unwrap_or_default();
        let selection = self.nodeport_selection()?;
        let prefixes = selection.prefixes(&snapshot.node.primary);
        snapshot.node.addresses = crate::compile::nodeport_addresses(&all, &prefixes);
        snapshot.node.node_ips = selection.node_ips(&snapshot.node.primary);
        Ok(snapshot)
    }

    fn source_snapshot(&self, timeout: Duration) -> anyhow::Result<Snapshot> {
        let source = self.source()?;
        let name = source.name();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            if let Err(e) = source.run(tx) {
                log::error!("source stopped: {e:#}");
            }
        });
        rx.recv_timeout(timeout)
            .with_context(|| format!("no snapshot from {name} within {timeout:?}"))
    }
}

/// `cleanup`, and kube-proxy's `run --cleanup`: every pin removed.
fn cleanup(bpffs: &std::path::Path) -> anyhow::Result<()> {
    // Held while the pins go: an agent starting meanwhile waits, then makes them afresh.
    let _lock = bpf::try_lock_pin_dir(bpffs)?;
    bpf::remove_pins(bpffs).map(|n| {
        println!(
            "removed {n} pins (hooks detached, maps freed) from {}",
            bpffs.display()
        );
    })
}

pub fn main() {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `run --config` is read before logging starts: its `logging` section can set the level
    // and format. What it did is logged once logging runs.
    let mut notes = Vec::new();
    let mut config_error = None;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
    if let Command::Run(args) = &cli.command {
        match config::kube_proxy_settings(args) {
            Ok(Some(settings)) => {
                let loaded = settings.loaded;
                notes = settings.notes;
                notes.extend(config::lay_under(
                    &mut cli,
                    &matches,
                    &settings.config,
                    &settings.unused,
                    cpus,
                ));
                if let Command::Run(args) = &mut cli.command {
                    args.config_loaded = loaded;
                    args.netfilter =
                        Some(config::netfilter_settings(&settings.config.conntrack, cpus));
                }
            }
            Ok(None) => {}
            Err(e) => config_error = Some(e),
        }
    }
    if let Some(run_matches) = matches.subcommand_matches("run")
        && let Command::Run(args) = &mut cli.command
    {
        config::kernel_timeouts_from_flags(args, run_matches, cpus);
    }
    init_logging(&cli.log_level, cli.log_format);
    for note in notes {
        log::log!(note.level, "{}", note.text);
    }
    if let Some(e) = config_error {
        log::error!("{e:#}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Run(args) => match args.kube_proxy.instead() {
            Ok(None) => run::run(args),
            Ok(Some(config::flags::Instead::Cleanup)) => cleanup(&args.bpffs),
            Ok(Some(config::flags::Instead::InitOnly)) => {
                log::info!(
                    "--init-only: nothing to prepare ahead of the agent (it mounts the bpffs \
                     and attaches its hooks itself when it runs); exiting"
                );
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!("{e}")),
        },
        Command::Status(args) => status::status(&args),
        Command::Services(args) => status::services(&args),
        Command::Explain(args) => explain::explain(&args),
        Command::Verify(args) => verify::verify(&args),
        Command::Monitor(args) => monitor::run(args),
        Command::DebugLog { state, bpffs } => bpf::Maps::open_pinned(&bpffs)
            .and_then(|mut maps| maps.set_debug_log(state == OnOff::On))
            .map(|()| {
                println!(
                    "BPF debug logs {}",
                    if state == OnOff::On { "on" } else { "off" }
                )
            }),
        Command::Cleanup { bpffs } => cleanup(&bpffs),
    };
    match result {
        Ok(()) => {}
        Err(e) => {
            log::error!("{e:#}");
            std::process::exit(if e.is::<verify::Drift>() { 1 } else { 2 });
        }
    }
}
