//! `status` and `services`: what the kernel holds, read from the pinned maps and links.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use proxy_common::{
    info::{AgentState, IfaceInfo},
    reason::{Hook, Reason},
};
use serde::Serialize;

use super::{
    InspectArgs,
    api::{Document, EndpointState, Kind, PerPacketNamespace},
    output::{Format, json, table},
    view,
};
use crate::datapath::{
    MapIo as _,
    bpf::{self, HookInfo, Maps},
    tclinks::{self, LinkState},
};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentView {
    version: String,
    pid: u32,
    running: bool,
    /// 0: never synced.
    last_sync_unix_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_sync_age_seconds: Option<f64>,
    syncs: u64,
    sync_failures: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MapFill {
    name: &'static str,
    entries: u32,
    max_entries: u32,
    percent: f64,
    /// The kernel's memory accounting of the map (bpftool's `memlock`).
    memlock_bytes: u64,
    /// The map's layout version as the agent recorded it in `LB_VERSIONS` (none before an
    /// agent of a version that records them has finished starting).
    layout_version: Option<u32>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Counter {
    /// The datapath event, as the `reason` label of `kube_bpf_proxy_datapath_events_total`.
    reason: &'static str,
    count: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DropCounter {
    /// The program, as the `hook` label of `kube_bpf_proxy_drops_total`.
    hook: &'static str,
    /// Why, as its `reason` label.
    reason: &'static str,
    count: u64,
}

/// A pinned hook link.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct HookView {
    hook: String,
    attached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    program_id: Option<u32>,
}

/// Why an interface carries the tc program (`IFACE_*` of `LB_IFACES`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
enum InterfaceCause {
    External,
    PodRoute,
    PodCidr,
    NamePattern,
    Named,
    Bridge,
    Kept,
    RemoteRoute,
    /// No `LB_IFACES` entry, or one this build does not know.
    Unknown,
}

fn cause_of(info: Option<&IfaceInfo>) -> InterfaceCause {
    use proxy_common::info::*;
    match info.map(|i| i.reason()) {
        Some(IFACE_EXTERNAL) => InterfaceCause::External,
        Some(IFACE_POD_ROUTE) => InterfaceCause::PodRoute,
        Some(IFACE_POD_CIDR) => InterfaceCause::PodCidr,
        Some(IFACE_PATTERN) => InterfaceCause::NamePattern,
        Some(IFACE_NAMED) => InterfaceCause::Named,
        Some(IFACE_BRIDGE) => InterfaceCause::Bridge,
        Some(IFACE_KEPT) => InterfaceCause::Kept,
        Some(IFACE_REMOTE_ROUTE) => InterfaceCause::RemoteRoute,
        _ => InterfaceCause::Unknown,
    }
}

/// An interface carrying the tc program, and why.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct InterfaceView {
    interface: String,
    ifindex: u32,
    link_id: u32,
    cause: InterfaceCause,
    /// A device without a link-layer header, carrying `tc_ingress_l3`.
    no_link_header: bool,
    /// `external`, `pod: route to endpoint 10.244.0.5`, `pod: name matches pattern cali*`, ...
    reason: String,
}

/// `status -o json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    agent: AgentView,
    mode: &'static str,
    /// Sockets connected to removed backends are terminated (kernel support, not turned off).
    socket_termination: bool,
    pin_dir: String,
    hooks: Vec<HookView>,
    /// Interfaces whose tc link is live (on the interface of that name now).
    interfaces: Vec<InterfaceView>,
    /// Interfaces named in the agent's --pod-interfaces that do not exist (yet).
    interfaces_missing: Vec<String>,
    maps: Vec<MapFill>,
    counters: Vec<Counter>,
    /// Drops by hook and reason (those above zero).
    drops: Vec<DropCounter>,
    /// Namespaces whose pods are translated per packet at tc (socket-layer translation off).
    per_packet_namespaces: Vec<PerPacketNamespace>,
}

impl Kind for StatusView {
    const KIND: &'static str = "Status";
}

/// What `status` reads from the pins, the maps and /proc.
pub struct StatusInputs {
    pub agent: AgentState,
    /// The agent's process exists.
    pub running: bool,
    /// Wall clock, milliseconds since the Unix epoch.
    pub now_ms: u64,
    pub socket_termination: bool,
    pub pin_dir: String,
    pub hooks: Vec<HookInfo>,
    /// Live tc links by interface name.
    pub links: BTreeMap<String, LinkState>,
    /// `LB_IFACES` by interface index (0: named but missing).
    pub recorded: BTreeMap<u32, IfaceInfo>,
    /// (map, entries, max entries).
    pub fill: Vec<(&'static str, u32, u32)>,
    pub memlock: BTreeMap<&'static str, u64>,
    /// `LB_VERSIONS`: each map's recorded layout version.
    pub layouts: BTreeMap<&'static str, u32>,
    pub stats: Vec<(Reason, u64)>,
    pub drops: Vec<(Hook, Reason, u64)>,
    /// `LB_SOCKLB_NS`: (namespace, pods).
    pub per_packet: Vec<(String, u32)>,
}

/// PURE: the `Status` document of what `status` read.
pub fn status_view(inputs: StatusInputs) -> StatusView {
    let agent = &inputs.agent;
    let version_len = (agent.version_len as usize).min(agent.version.len());
    StatusView {
        agent: AgentView {
            version: String::from_utf8_lossy(&agent.version[..version_len]).into_owned(),
            pid: agent.pid,
            running: inputs.running,
            last_sync_unix_ms: agent.last_sync_unix_ms,
            last_sync_age_seconds: (agent.last_sync_unix_ms > 0)
                .then(|| inputs.now_ms.saturating_sub(agent.last_sync_unix_ms) as f64 / 1000.0),
            syncs: agent.syncs,
            sync_failures: agent.sync_failures,
        },
        mode: "socket (cgroup connect/sendmsg/recvmsg/getpeername hooks)",
        socket_termination: inputs.socket_termination,
        pin_dir: inputs.pin_dir,
        hooks: inputs
            .hooks
            .into_iter()
            .map(|h| HookView {
                attached: h.link_id.is_some(),
                hook: h.hook,
                link_id: h.link_id,
                program_id: h.program_id,
            })
            .collect(),
        interfaces: inputs
            .links
            .into_iter()
            .map(|(name, link)| {
                let info = inputs.recorded.get(&link.ifindex);
                InterfaceView {
                    interface: name,
                    ifindex: link.ifindex,
                    link_id: link.link_id,
                    cause: cause_of(info),
                    no_link_header: info.is_some_and(IfaceInfo::no_link_header),
                    reason: info.map_or("(no reason recorded)".to_string(), tclinks::describe),
                }
            })
            .collect(),
        interfaces_missing: inputs
            .recorded
            .values()
            .filter(|i| i.ifindex == 0)
            .map(tclinks::name_of)
            .collect(),
        maps: inputs
            .fill
            .into_iter()
            .map(|(name, entries, max_entries)| MapFill {
                name,
                entries,
                max_entries,
                memlock_bytes: inputs.memlock.get(name).copied().unwrap_or(0),
                layout_version: inputs.layouts.get(name).copied(),
                percent: if max_entries == 0 {
                    0.0
                } else {
                    (entries as f64 * 1000.0 / max_entries as f64).round() / 10.0
                },
            })
            .collect(),
        counters: inputs
            .stats
            .into_iter()
            .map(|(reason, count)| Counter {
                reason: reason.name(),
                count,
            })
            .collect(),
        drops: inputs
            .drops
            .into_iter()
            .map(|(hook, reason, count)| DropCounter {
                hook: hook.name(),
                reason: reason.name(),
                count,
            })
            .collect(),
        per_packet_namespaces: PerPacketNamespace::list(inputs.per_packet),
    }
}

/// `status`'s arguments.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// Wait until a running agent has programmed its first sync, then print the status; exit
    /// 1 if it has not within `--timeout` (for scripts and readiness probes).
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits (a duration: 90s, 5m, 1h30m).
    #[arg(long, default_value = "60s", value_parser = super::config::parse_go_duration)]
    pub timeout: std::time::Duration,
}

/// Why the agent under `bpffs` has not programmed a sync yet, or `None` once it has: its pins
/// exist, the process that wrote them runs, and it has completed a sync.
fn not_ready(bpffs: &std::path::Path) -> Option<String> {
    let agent = match Maps::open_pinned(bpffs).and_then(|m| m.agent_state()) {
        Ok(agent) => agent,
        Err(e) => return Some(format!("no agent state under {}: {e:#}", bpffs.display())),
    };
    if agent.pid == 0 || !std::path::Path::new(&format!("/proc/{}", agent.pid)).exists() {
        return Some(format!("the agent (pid {}) is not running", agent.pid));
    }
    if agent.syncs == 0 {
        return Some(match agent.sync_failures {
            0 => format!("the agent (pid {}) has not completed a sync yet", agent.pid),
            n => format!(
                "the agent (pid {}) has failed {n} sync(s) and completed none",
                agent.pid
            ),
        });
    }
    None
}

pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    if args.wait {
        let deadline = std::time::Instant::now() + args.timeout;
        loop {
            match not_ready(&args.inspect.bpffs) {
                None => break,
                Some(why) if std::time::Instant::now() >= deadline => {
                    // Exit 1, as a readiness probe reads it (2 is for errors).
                    log::error!("not ready after {:?}: {why}", args.timeout);
                    std::process::exit(1);
                }
                Some(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }
    show(&args.inspect)
}

fn show(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = Maps::open_pinned(&args.bpffs)?;
    let agent = maps.agent_state()?;
    let view = status_view(StatusInputs {
        running: agent.pid != 0 && std::path::Path::new(&format!("/proc/{}", agent.pid)).exists(),
        agent,
        now_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        socket_termination: maps.socket_termination()?,
        pin_dir: args.bpffs.display().to_string(),
        hooks: bpf::hooks(&args.bpffs),
        links: tclinks::live_links(&args.bpffs),
        recorded: tclinks::recorded(&args.bpffs).unwrap_or_default(),
        fill: bpf::map_fill(&args.bpffs)?,
        memlock: bpf::map_memlock(&args.bpffs)?.into_iter().collect(),
        layouts: bpf::layout_versions(&args.bpffs),
        stats: maps.stats()?,
        drops: maps.drops()?,
        per_packet: bpf::per_packet_namespaces(&args.bpffs)?,
    });
    if args.output == Format::Json {
        return json(&Document::of(&view));
    }
    let a = &view.agent;
    println!(
        "agent:    version {}, pid {} ({}), {} syncs, {} failed, last sync {}",
        a.version,
        a.pid,
        if a.running { "running" } else { "not running" },
        a.syncs,
        a.sync_failures,
        a.last_sync_age_seconds
            .map_or("never".to_string(), |s| format!("{s:.1} s ago"))
    );
    println!("mode:     {}", view.mode);
    println!(
        "sockets of removed backends: {}",
        if view.socket_termination {
            "terminated"
        } else {
            "NOT terminated (kernel without SOCK_DESTROY, or --no-socket-termination)"
        }
    );
    println!("pins:     {}\n", view.pin_dir);
    let hooks: Vec<Vec<String>> = view
        .hooks
        .iter()
        .map(|h| {
            vec![
                h.hook.to_string(),
                h.link_id.map_or("-".into(), |i| i.to_string()),
                h.program_id.map_or("-".into(), |i| i.to_string()),
                if h.attached {
                    "attached"
                } else {
                    "NOT ATTACHED"
                }
                .to_string(),
            ]
        })
        .collect();
    print!("{}", table(&["HOOK", "LINK", "PROGRAM", "STATE"], &hooks));
    println!();
    if view.interfaces.is_empty() {
        println!("tc: on no interface\n");
    } else {
        let rows: Vec<Vec<String>> = view
            .interfaces
            .iter()
            .map(|i| {
                vec![
                    i.interface.clone(),
                    i.ifindex.to_string(),
                    i.link_id.to_string(),
                    i.reason.clone(),
                ]
            })
            .collect();
        print!(
            "{}",
            table(&["TC INTERFACE", "IFINDEX", "LINK", "WHY"], &rows)
        );
        println!();
    }
    let maps: Vec<Vec<String>> = view
        .maps
        .iter()
        .map(|m| {
            vec![
                m.name.to_string(),
                m.entries.to_string(),
                m.max_entries.to_string(),
                format!("{:.1}%", m.percent),
                format!("{:.1}", m.memlock_bytes as f64 / (1 << 20) as f64),
                m.layout_version.map_or("-".into(), |v| v.to_string()),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["MAP", "ENTRIES", "MAX", "FILL", "MEMLOCK MIB", "LAYOUT"],
            &maps
        )
    );
    let total: u64 = view.maps.iter().map(|m| m.memlock_bytes).sum();
    println!(
        "maps take {:.1} MiB of kernel memory",
        total as f64 / (1 << 20) as f64
    );
    println!();
    let counters: Vec<Vec<String>> = view
        .counters
        .iter()
        .map(|c| vec![c.reason.to_string(), c.count.to_string()])
        .collect();
    print!("{}", table(&["DATAPATH EVENT", "COUNT"], &counters));
    if !view.drops.is_empty() {
        println!();
        let drops: Vec<Vec<String>> = view
            .drops
            .iter()
            .map(|d| {
                vec![
                    d.hook.to_string(),
                    d.reason.to_string(),
                    d.count.to_string(),
                ]
            })
            .collect();
        print!("{}", table(&["DROPPED AT", "REASON", "COUNT"], &drops));
    }
    if !view.per_packet_namespaces.is_empty() {
        println!();
        println!(
            "translated per packet at tc (socket-layer translation off): {}",
            PerPacketNamespace::text(&view.per_packet_namespaces)
        );
    }
    Ok(())
}

pub fn services(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = Maps::open_pinned(&args.bpffs)?;
    let state = maps.dump()?;
    let mut list = view::service_list(&state, &|id| maps.connections(id).ok());
    list.per_packet_namespaces = PerPacketNamespace::list(bpf::per_packet_namespaces(&args.bpffs)?);
    if args.output == Format::Json {
        return json(&Document::of(&list));
    }
    print!("{}", services_table(&list));
    if !list.per_packet_namespaces.is_empty() {
        println!(
            "\npods of these namespaces reach Services per packet at tc (socket-layer translation \
             off): {}",
            PerPacketNamespace::text(&list.per_packet_namespaces)
        );
    }
    Ok(())
}

/// The table of `services`.
fn services_table(list: &view::ServiceList) -> String {
    let mut rows = Vec::new();
    for f in &list.items {
        let backends = if f.backends.is_empty() {
            "-".to_string()
        } else {
            f.backends
                .iter()
                .map(|b| {
                    let mut s = b.host_port();
                    let mut tags = Vec::new();
                    if b.local {
                        tags.push("local");
                    }
                    if b.state != EndpointState::Ready {
                        tags.push("terminating");
                    }
                    if b.slots != 1 {
                        s.push_str(&format!(" x{}", b.slots));
                    }
                    if let Some(n) = b.connections {
                        s.push_str(&format!(" [{n} conn]"));
                    }
                    if !tags.is_empty() {
                        s.push_str(&format!(" ({})", tags.join(",")));
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let policies = f.policies();
        rows.push(vec![
            f.frontend().to_string(),
            f.type_text().to_string(),
            f.service_text.clone(),
            f.action_text(),
            f.scheduler.as_str().to_string(),
            if policies.is_empty() {
                "-".into()
            } else {
                policies.join(" ")
            },
            backends,
        ]);
    }
    table(
        &[
            "FRONTEND",
            "TYPE",
            "SERVICE",
            "ACTION",
            "SCHEDULER",
            "POLICIES",
            "BACKENDS",
        ],
        &rows,
    )
}
