//! `explain CLIENT ADDR:PORT/PROTO`: which frontend matches, which backends are eligible and why
//! the others are not, what affinity remembers, and where the next connection goes.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, anyhow};
use proxy_common::affinity::{CLIENT_ADDR, CLIENT_NETNS};
use serde::Serialize;

use super::{
    InspectArgs, SourceArgs,
    output::{Format, json},
    view::{self, FrontendView},
};
use crate::{
    compile::{
        FrontendAddr, Proto, Scope, compile,
        explain::{EndpointVerdict, judge},
    },
    datapath::{
        MapIo as _,
        bpf::{Maps, monotonic_ns},
    },
};

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// Client address (a pod IP, or the node's).
    pub client: IpAddr,
    /// Frontend as ADDRESS:PORT/PROTOCOL, e.g. 10.96.0.10:80/TCP or [fd00:96::10]:53/UDP.
    pub frontend: String,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub inspect: InspectArgs,
}

#[derive(Serialize)]
struct Share {
    backend: String,
    probability: f64,
}

#[derive(Serialize)]
struct Excluded {
    endpoint: String,
    reason: String,
}

#[derive(Serialize)]
struct AffinityEntry {
    /// "netns:<cookie>" (socket layer: one pod) or the client address.
    client: String,
    backend: String,
    last_used_secs_ago: f64,
    expires_in_secs: f64,
}

#[derive(Serialize)]
struct ExplainView {
    client: String,
    frontend: String,
    matched: Option<FrontendView>,
    eligible: Vec<Share>,
    /// Endpoints of the Service port that get no new connections, with the reason (needs a
    /// source: --manifests or the API server).
    excluded: Option<Vec<Excluded>>,
    affinity: Vec<AffinityEntry>,
    next_connection: String,
}

/// Parses `ADDR:PORT/PROTO`, or `external ADDR:PORT/PROTO` for the tc path's frontends.
fn parse_frontend(s: &str) -> anyhow::Result<FrontendAddr> {
    let (scope, s) = match s.trim().strip_prefix("external ") {
        Some(rest) => (Scope::External, rest.trim()),
        None => (Scope::Internal, s.trim()),
    };
    let (addr, proto) = s
        .rsplit_once('/')
        .ok_or_else(|| anyhow!("expected ADDRESS:PORT/PROTOCOL, got {s:?}"))?;
    let proto = Proto::parse(Some(&proto.to_uppercase()))
        .ok_or_else(|| anyhow!("unknown protocol {proto:?} (TCP, UDP or SCTP)"))?;
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("{addr:?} is not ADDRESS:PORT"))?;
    Ok(FrontendAddr {
        addr: addr.ip(),
        port: addr.port(),
        proto,
        scope,
    })
}

pub fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let frontend = parse_frontend(&args.frontend)?;
    let maps = Maps::open_pinned(&args.inspect.bpffs)?;
    let state = maps.dump()?;
    let (matched, marked) = view::lookup(&state, &frontend);
    let mut out = ExplainView {
        client: args.client.to_string(),
        frontend: frontend.to_string(),
        matched: None,
        eligible: Vec::new(),
        excluded: None,
        affinity: Vec::new(),
        next_connection: String::new(),
    };
    let Some(f) = matched else {
        out.next_connection = if marked {
            format!(
                "{} is a ClusterIP but {}/{} is not one of its ports: rejected (ECONNREFUSED)",
                frontend.addr,
                frontend.port,
                frontend.proto.as_str()
            )
        } else {
            "not a Service frontend: the socket hooks leave this connection untouched".into()
        };
        return print(args.inspect.output, &out);
    };
    // semantics 7.8: a source outside the ranges never reaches a backend.
    if !f.source_ranges.is_empty()
        && !f
            .source_ranges
            .iter()
            .filter_map(|r| crate::compile::Cidr::parse(r))
            .any(|r| r.contains(&args.client))
    {
        out.next_connection = format!(
            "refused: {} is outside loadBalancerSourceRanges ({}); a pod or the host gets EPERM \
             from connect()/sendmsg(), a client from outside is dropped",
            args.client,
            f.source_ranges.join(", ")
        );
        out.matched = Some(f);
        return print(args.inspect.output, &out);
    }
    let total: u32 = f.backends.iter().map(|b| b.slots).sum();
    out.eligible = f
        .backends
        .iter()
        .map(|b| Share {
            backend: b.address.clone(),
            probability: b.slots as f64 / total.max(1) as f64,
        })
        .collect();
    if args.source.given() {
        let mut snapshot = args
            .source
            .first_snapshot(std::time::Duration::from_secs(30))?;
        let endpoints = snapshot.node.local_endpoints(&snapshot.slices);
        snapshot.node.waiting =
            crate::datapath::podif::waiting_now(&args.inspect.bpffs, &endpoints)
                .unwrap_or_default();
        let desired = compile(&snapshot);
        if let Some(sp) = desired
            .ports
            .values()
            .find(|p| p.name.to_string() == f.service)
        {
            // ClusterIP follows internalTrafficPolicy, traffic from outside the node
            // externalTrafficPolicy (semantics 4.6).
            let local_policy = (f.kind == "ClusterIP" && sp.itp_local)
                || (frontend.scope == Scope::External && sp.etp_local);
            out.excluded = Some(
                sp.endpoints
                    .all()
                    .iter()
                    .filter_map(|ep| match judge(sp, ep, local_policy) {
                        EndpointVerdict::Eligible
                            if frontend.scope == Scope::External
                                && ep.local
                                && snapshot.node.waiting.contains(&ep.addr) =>
                        {
                            Some(Excluded {
                                endpoint: match ep.addr {
                                    IpAddr::V4(a) => format!("{a}:{}", ep.port),
                                    IpAddr::V6(a) => format!("[{a}]:{}", ep.port),
                                },
                                reason: "local backend waiting for its interface: the tc \
                                         program is not yet on the interface its route leaves \
                                         through, so traffic from outside goes elsewhere"
                                    .to_string(),
                            })
                        }
                        EndpointVerdict::Eligible => None,
                        EndpointVerdict::Excluded(reason) => Some(Excluded {
                            endpoint: match ep.addr {
                                IpAddr::V4(a) => format!("{a}:{}", ep.port),
                                IpAddr::V6(a) => format!("[{a}]:{}", ep.port),
                            },
                            reason,
                        }),
                    })
                    .collect(),
            );
        }
    }
    let now = monotonic_ns();
    let mut client_entry = None;
    if let Some(timeout) = f.affinity_secs {
        for (key, value) in maps.affinity()? {
            if key.port_id != f.port_id {
                continue;
            }
            let age = now.saturating_sub(value.last_used_ns) as f64 / 1e9;
            let expires = timeout as f64 - age;
            if expires <= 0.0 {
                continue;
            }
            let client = match key.client_kind {
                CLIENT_NETNS => {
                    let mut cookie = [0u8; 8];
                    cookie.copy_from_slice(&key.client[..8]);
                    format!("netns:{}", u64::from_ne_bytes(cookie))
                }
                CLIENT_ADDR => {
                    let ip = if args.client.is_ipv4() {
                        IpAddr::from([key.client[0], key.client[1], key.client[2], key.client[3]])
                    } else {
                        IpAddr::from(key.client)
                    };
                    ip.to_string()
                }
                _ => "?".into(),
            };
            let backend = state
                .backends
                .get(&value.backend_id)
                .map_or("?".into(), view::backend_addr);
            if client == args.client.to_string() {
                client_entry = Some(backend.clone());
            }
            out.affinity.push(AffinityEntry {
                client,
                backend,
                last_used_secs_ago: age,
                expires_in_secs: expires,
            });
        }
    }
    out.next_connection = match (f.action.as_str(), &client_entry) {
        ("balance", Some(backend)) => format!("{backend} (session affinity entry of this client)"),
        ("balance", None) => {
            let shares: Vec<String> = out
                .eligible
                .iter()
                .map(|s| format!("{} {:.0}%", s.backend, s.probability * 100.0))
                .collect();
            let note = if f.affinity_secs.is_some() {
                "; at the socket layer affinity is per pod network namespace, so a pod with an entry above keeps its backend"
            } else {
                ""
            };
            let decision = scheduler_inputs(&maps, &state, &frontend, &f)?
                .unwrap_or_else(|| format!("random: {}", shares.join(", ")));
            format!("{decision}{note}")
        }
        (action, _) => action.to_string(),
    };
    out.matched = Some(f);
    print(args.inspect.output, &out)
}

/// What a non-random scheduler will decide next, from its inputs in the maps.
fn scheduler_inputs(
    maps: &Maps,
    state: &crate::plan::MapState,
    frontend: &FrontendAddr,
    f: &view::FrontendView,
) -> anyhow::Result<Option<String>> {
    let Some(svc) = state.services.get(&crate::plan::ServiceKey::of(frontend)) else {
        return Ok(None);
    };
    let name_of = |id: u32| {
        state
            .backends
            .get(&id)
            .map_or_else(|| format!("backend {id}"), view::backend_addr)
    };
    Ok(Some(match f.scheduler.as_str() {
        "round-robin" => {
            let slots: Vec<u32> = state.live_slots(svc).into_iter().flatten().collect();
            if slots.is_empty() {
                return Ok(None);
            }
            let turn = maps.rr_cursor(svc.id)?;
            let next = slots[turn as usize % slots.len()];
            format!(
                "round-robin: turn {turn}, slot {} of {}: {}",
                turn as usize % slots.len(),
                slots.len(),
                name_of(next)
            )
        }
        scheduler @ ("least-connection" | "weighted-least-connection") => {
            let counts: Vec<String> = f
                .backends
                .iter()
                .map(|b| {
                    let n = maps.connections(b.id).unwrap_or(0);
                    format!("{} {n} connections (weight {})", b.address, b.weight)
                })
                .collect();
            format!(
                "{scheduler}: the fewest active connections among {}",
                counts.join(", ")
            )
        }
        "source-hash" => format!(
            "source-hash over {} slots: each client (its network namespace here, its address at tc/XDP) always gets the same one",
            f.backends.iter().map(|b| b.slots).sum::<u32>()
        ),
        "maglev" => "maglev: the flow's hash picks an entry of the frontend's table (the same on every node)".to_string(),
        _ => return Ok(None),
    }))
}

fn print(format: Format, out: &ExplainView) -> anyhow::Result<()> {
    if format == Format::Json {
        return json(out);
    }
    println!("client:     {}", out.client);
    println!("frontend:   {}", out.frontend);
    if let Some(f) = &out.matched {
        println!(
            "matches:    {} ({}, frontend id {}, revision {}){}",
            f.service,
            f.kind,
            f.id,
            f.revision,
            if f.policies.is_empty() {
                String::new()
            } else {
                format!(" [{}]", f.policies.join(" "))
            }
        );
        println!("eligible backends (kernel maps):");
        if out.eligible.is_empty() {
            println!("  none: {}", f.action);
        }
        for s in &out.eligible {
            println!(
                "  {:<28} {:>5.1}% of new connections",
                s.backend,
                s.probability * 100.0
            );
        }
        match &out.excluded {
            Some(excluded) if excluded.is_empty() => {
                println!("endpoints not used (source): none")
            }
            Some(excluded) => {
                println!("endpoints not used (source):");
                for e in excluded {
                    println!("  {:<28} {}", e.endpoint, e.reason);
                }
            }
            None => println!(
                "endpoints not used: pass --manifests DIR (or the API server) to see them and why"
            ),
        }
        if f.affinity_secs.is_some() {
            println!("session affinity entries:");
            if out.affinity.is_empty() {
                println!("  none live");
            }
            for a in &out.affinity {
                println!(
                    "  {} -> {} (used {:.1} s ago, expires in {:.1} s)",
                    a.client, a.backend, a.last_used_secs_ago, a.expires_in_secs
                );
            }
        }
    }
    println!("next connection: {}", out.next_connection);
    Ok(())
}
