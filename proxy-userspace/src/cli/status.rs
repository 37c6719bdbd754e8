//! `status` and `services`: what the kernel holds, read from the pinned maps and links.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{
    InspectArgs,
    output::{Format, json, table},
    view,
};
use crate::datapath::{
    MapIo as _,
    bpf::{self, HookInfo, Maps},
    tclinks,
};

#[derive(Serialize)]
struct AgentView {
    version: String,
    pid: u32,
    running: bool,
    last_sync_unix_ms: u64,
    last_sync_age_secs: Option<f64>,
    syncs: u64,
    sync_failures: u64,
}

#[derive(Serialize)]
struct MapFill {
    map: &'static str,
    entries: u32,
    max_entries: u32,
    percent: f64,
    /// The kernel's memory accounting of the map (bpftool's `memlock`).
    memlock_bytes: u64,
}

#[derive(Serialize)]
struct Counter {
    reason: &'static str,
    count: u64,
}

/// An interface carrying the tc program, and why.
#[derive(Serialize)]
struct InterfaceView {
    interface: String,
    ifindex: u32,
    link_id: u32,
    /// `external`, `pod: route to endpoint 10.244.0.5`, `pod: name matches pattern cali*`, ...
    why: String,
}

#[derive(Serialize)]
struct StatusView {
    agent: AgentView,
    mode: &'static str,
    /// Sockets connected to removed backends are terminated (kernel support, not turned off).
    socket_termination: bool,
    pin_dir: String,
    hooks: Vec<HookInfo>,
    /// Interfaces whose tc link is live (on the interface of that name now).
    interfaces: Vec<InterfaceView>,
    /// Interfaces named in the agent's --pod-interfaces that do not exist (yet).
    interfaces_missing: Vec<String>,
    maps: Vec<MapFill>,
    counters: Vec<Counter>,
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
    let memlock: std::collections::BTreeMap<&str, u64> =
        bpf::map_memlock(&args.bpffs)?.into_iter().collect();
    let agent = maps.agent_state()?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let version_len = (agent.version_len as usize).min(agent.version.len());
    let view = StatusView {
        agent: AgentView {
            version: String::from_utf8_lossy(&agent.version[..version_len]).into_owned(),
            pid: agent.pid,
            running: agent.pid != 0
                && std::path::Path::new(&format!("/proc/{}", agent.pid)).exists(),
            last_sync_unix_ms: agent.last_sync_unix_ms,
            last_sync_age_secs: (agent.last_sync_unix_ms > 0)
                .then(|| now_ms.saturating_sub(agent.last_sync_unix_ms) as f64 / 1000.0),
            syncs: agent.syncs,
            sync_failures: agent.sync_failures,
        },
        mode: "socket (cgroup connect/sendmsg/recvmsg/getpeername hooks)",
        socket_termination: maps.socket_termination()?,
        pin_dir: args.bpffs.display().to_string(),
        hooks: bpf::hooks(&args.bpffs),
        interfaces: interfaces(&args.bpffs),
        interfaces_missing: tclinks::recorded(&args.bpffs)
            .unwrap_or_default()
            .values()
            .filter(|i| i.ifindex == 0)
            .map(tclinks::name_of)
            .collect(),
        maps: bpf::map_fill(&args.bpffs)?
            .into_iter()
            .map(|(map, entries, max_entries)| MapFill {
                map,
                entries,
                max_entries,
                memlock_bytes: memlock.get(map).copied().unwrap_or(0),
                percent: if max_entries == 0 {
                    0.0
                } else {
                    (entries as f64 * 1000.0 / max_entries as f64).round() / 10.0
                },
            })
            .collect(),
        counters: maps
            .stats()?
            .into_iter()
            .map(|(reason, count)| Counter {
                reason: reason.name(),
                count,
            })
            .collect(),
    };
    if args.output == Format::Json {
        return json(&view);
    }
    let a = &view.agent;
    println!(
        "agent:    version {}, pid {} ({}), {} syncs, {} failed, last sync {}",
        a.version,
        a.pid,
        if a.running { "running" } else { "not running" },
        a.syncs,
        a.sync_failures,
        a.last_sync_age_secs
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
                if h.link_id.is_some() {
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
                    i.why.clone(),
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
                m.map.to_string(),
                m.entries.to_string(),
                m.max_entries.to_string(),
                format!("{:.1}%", m.percent),
                format!("{:.1}", m.memlock_bytes as f64 / (1 << 20) as f64),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["MAP", "ENTRIES", "MAX", "FILL", "MEMLOCK MIB"], &maps)
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
    Ok(())
}

/// The live tc links with the reason the agent recorded for each.
fn interfaces(pin_dir: &std::path::Path) -> Vec<InterfaceView> {
    let recorded = tclinks::recorded(pin_dir).unwrap_or_default();
    tclinks::live_links(pin_dir)
        .into_iter()
        .map(|(name, link)| InterfaceView {
            interface: name,
            ifindex: link.ifindex,
            link_id: link.link_id,
            why: recorded
                .get(&link.ifindex)
                .map_or("(no reason recorded)".to_string(), tclinks::describe),
        })
        .collect()
}

pub fn services(args: &InspectArgs) -> anyhow::Result<()> {
    let maps = Maps::open_pinned(&args.bpffs)?;
    let state = maps.dump()?;
    let mut frontends = view::frontends(&state);
    // The inputs of a least-connection frontend's next decision: its backends' counts.
    for f in frontends
        .iter_mut()
        .filter(|f| f.scheduler.contains("least-connection"))
    {
        for b in &mut f.backends {
            b.connections = maps.connections(b.id).ok();
        }
    }
    if args.output == Format::Json {
        return json(&frontends);
    }
    let mut rows = Vec::new();
    for f in &frontends {
        let backends = if f.backends.is_empty() {
            "-".to_string()
        } else {
            f.backends
                .iter()
                .map(|b| {
                    let mut s = b.address.clone();
                    let mut tags = Vec::new();
                    if b.local {
                        tags.push("local");
                    }
                    if b.terminating {
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
        rows.push(vec![
            f.frontend.clone(),
            f.kind.clone(),
            f.service.clone(),
            f.action.clone(),
            f.scheduler.clone(),
            if f.policies.is_empty() {
                "-".into()
            } else {
                f.policies.join(" ")
            },
            backends,
        ]);
    }
    print!(
        "{}",
        table(
            &[
                "FRONTEND",
                "TYPE",
                "SERVICE",
                "ACTION",
                "SCHEDULER",
                "POLICIES",
                "BACKENDS"
            ],
            &rows
        )
    );
    Ok(())
}
