//! `explain CLIENT ADDR:PORT/PROTO`: which frontend matches, which backends are eligible and why
//! the others are not, what affinity remembers, and where the next connection goes.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, anyhow};
use proxy_common::affinity::{
    AffinityKey, AffinityValue, CLIENT_ADDR, CLIENT_HAIRPIN, CLIENT_NETNS,
};
use serde::Serialize;

use super::{
    InspectArgs, SourceArgs,
    api::{BackendRef, BackendView, Document, EndpointState, FrontendScope, Kind, Reach},
    output::{Format, json},
    view::{self, FrontendView},
};
use crate::{
    compile::{
        Desired, Family, FrontendAddr, Proto, Scope, compile,
        explain::{EndpointVerdict, ExclusionCause, judge},
    },
    datapath::{
        MapIo as _,
        bpf::{Maps, monotonic_ns},
    },
    model::Scheduler,
    plan::MapState,
    snapshot::NodeInfo,
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

/// What happens to the client's next connection (or datagram) to the frontend.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// Translated to a backend.
    Translated,
    /// Refused: the Service has no endpoints, or the port is not one of the ClusterIP's
    /// (ECONNREFUSED at the socket layer).
    Rejected,
    /// Dropped: endpoints exist, none this traffic may use (Local traffic policy); or the
    /// address is inside a ServiceCIDR and no Service has it (semantics 3.12).
    Dropped,
    /// The source is outside loadBalancerSourceRanges (EPERM at the socket layer, dropped
    /// from outside).
    Refused,
    /// Not a Service frontend: the proxy leaves it alone.
    Untouched,
}

/// The frontend asked about.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FrontendRef {
    address: IpAddr,
    port: u16,
    protocol: Proto,
    family: Family,
    reach: Reach,
}

/// A backend new connections may go to, with its share of them.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Eligible {
    #[serde(flatten)]
    backend: BackendView,
    /// Share of new connections (slots / all slots), 0 to 1.
    probability: f64,
}

/// An endpoint of the Service port that gets no new connections, and why.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Excluded {
    address: IpAddr,
    port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    state: EndpointState,
    local: bool,
    cause: ExclusionCause,
    reason: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
enum ClientKind {
    /// A network namespace (socket layer: one pod).
    Netns,
    /// A source address (tc).
    Address,
    Unknown,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AffinityEntry {
    /// "netns:<cookie>" (socket layer: one pod) or the client address.
    client: String,
    client_kind: ClientKind,
    backend_id: u32,
    /// The backend's address, while the maps hold it.
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    last_used_seconds_ago: f64,
    expires_in_seconds: f64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
enum DecidedBy {
    /// The client's session affinity entry.
    Affinity,
    /// The frontend's scheduler.
    Scheduler,
}

/// How a translated connection's backend is chosen.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NextConnection {
    decided_by: DecidedBy,
    scheduler: Scheduler,
    /// The backend, where the maps determine it (an affinity entry, the round-robin cursor).
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<BackendRef>,
}

/// `explain -o json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    client: IpAddr,
    frontend: FrontendRef,
    verdict: Verdict,
    /// The verdict in words: the scheduler's decision, or why there is none.
    reason: String,
    /// The frontend entry the maps hold for it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    matched: Option<FrontendView>,
    eligible: Vec<Eligible>,
    /// Endpoints of the Service port that get no new connections, with the reason (needs a
    /// source: --manifests or the API server; absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    excluded: Option<Vec<Excluded>>,
    affinity: Vec<AffinityEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<NextConnection>,
    /// The client is a pod of a namespace translated per packet (needs a source, to know the
    /// pod by its address): its connections reach this frontend at tc on its interface, not
    /// at the socket layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) per_packet: Option<PerPacketClient>,
    /// The client is a pod of this node reached through a pod-facing interface carrying tc, as
    /// the agent marks pods: kube-proxy masquerades its connections to this frontend (an
    /// externalIP, load balancer IP or NodePort with externalTrafficPolicy Cluster, semantics
    /// 7.13), and so does tc on its interface once the agent has found the pod.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) masqueraded_at_tc: bool,
    /// Such a frontend, but the client's address is routed through no pod-facing interface
    /// carrying tc (`--pod-interfaces none` or without its interface, or no pod of this node):
    /// translated at the socket layer, not masqueraded. Text only.
    #[serde(skip)]
    pub(super) unmasqueraded_pod: bool,
}

/// A client pod whose Services are translated per packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PerPacketClient {
    pub namespace: String,
    pub pod: String,
}

/// The pod `client` is, if it is one of `pods` and its namespace is one of `per_packet`
/// (`LB_SOCKLB_NS`).
pub fn per_packet_client(
    client: IpAddr,
    pods: &[std::sync::Arc<crate::objects::PodRef>],
    per_packet: &[(String, u32)],
) -> Option<PerPacketClient> {
    let pod = pods
        .iter()
        .find(|p| !p.host_network && p.ips.contains(&client))?;
    let namespace = pod.metadata.namespace.clone()?;
    per_packet
        .iter()
        .any(|(n, _)| *n == namespace)
        .then(|| PerPacketClient {
            namespace,
            pod: pod.metadata.name.clone().unwrap_or_default(),
        })
}

impl Kind for Explanation {
    const KIND: &'static str = "Explanation";
}

/// The maps `explain` reads besides the dump: affinity entries, scheduler state.
pub trait LiveMaps {
    fn affinity(&self) -> anyhow::Result<Vec<(AffinityKey, AffinityValue)>>;
    fn rr_cursor(&self, svc_id: u32) -> anyhow::Result<u32>;
    fn connections(&self, backend_id: u32) -> anyhow::Result<u64>;
}

impl LiveMaps for Maps {
    fn affinity(&self) -> anyhow::Result<Vec<(AffinityKey, AffinityValue)>> {
        Maps::affinity(self)
    }
    fn rr_cursor(&self, svc_id: u32) -> anyhow::Result<u32> {
        Maps::rr_cursor(self, svc_id)
    }
    fn connections(&self, backend_id: u32) -> anyhow::Result<u64> {
        Maps::connections(self, backend_id)
    }
}

/// The source's side of an explanation: the compiled state and this node.
pub struct FromSource<'a> {
    pub desired: &'a Desired,
    pub node: &'a NodeInfo,
}

/// What `explain` works from.
pub struct ExplainInputs<'a> {
    pub client: IpAddr,
    pub frontend: FrontendAddr,
    pub state: &'a MapState,
    pub live: &'a dyn LiveMaps,
    /// `bpf_ktime_get_ns()` now (affinity entries' ages).
    pub now_ns: u64,
    pub source: Option<FromSource<'a>>,
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
    let mut per_packet = None;
    let source = if args.source.given() {
        let mut snapshot = args
            .source
            .first_snapshot(std::time::Duration::from_secs(30))?;
        maps.agent_compile_settings(&mut snapshot.config)?;
        per_packet = per_packet_client(
            args.client,
            &snapshot.pods,
            &crate::datapath::bpf::per_packet_namespaces(&args.inspect.bpffs)?,
        );
        let endpoints = snapshot.node.local_endpoints(&snapshot.slices);
        snapshot.node.waiting =
            crate::datapath::podif::waiting_now(&args.inspect.bpffs, &endpoints)
                .unwrap_or_default();
        let desired = compile(&snapshot);
        Some((desired, snapshot.node))
    } else {
        None
    };
    let mut out = explanation(ExplainInputs {
        client: args.client,
        frontend,
        state: &state,
        live: &maps,
        now_ns: monotonic_ns(),
        source: source
            .as_ref()
            .map(|(desired, node)| FromSource { desired, node }),
    })?;
    if out.frontend.reach == Reach::Internal {
        out.per_packet = per_packet;
        let pod = out.per_packet.is_none()
            && out.matched.as_ref().is_some_and(|f| f.masquerade)
            && !crate::datapath::netdev::local_addresses()
                .is_ok_and(|local| local.contains(&args.client));
        if pod {
            let marked =
                crate::datapath::netns::routes_to_pod_at_tc(&args.inspect.bpffs, args.client)
                    .context("route to the client")?;
            out.masqueraded_at_tc = marked;
            out.unmasqueraded_pod = !marked;
        }
    }
    if args.inspect.output == Format::Json {
        return json(&Document::of(&out));
    }
    print!("{}", text(&out));
    Ok(())
}

/// PURE (given `live`): the explanation of `inputs.client`'s next connection to
/// `inputs.frontend`.
pub fn explanation(inputs: ExplainInputs<'_>) -> anyhow::Result<Explanation> {
    let ExplainInputs {
        client,
        frontend,
        state,
        live,
        now_ns,
        source,
    } = inputs;
    let (matched, marked) = view::lookup(state, &frontend);
    let mut out = Explanation {
        client,
        frontend: FrontendRef {
            address: frontend.addr,
            port: frontend.port,
            protocol: frontend.proto,
            family: Family::of(&frontend.addr),
            reach: match frontend.scope {
                Scope::Internal => Reach::Internal,
                Scope::External => Reach::External,
            },
        },
        verdict: Verdict::Untouched,
        reason: String::new(),
        matched: None,
        eligible: Vec::new(),
        excluded: None,
        affinity: Vec::new(),
        next: None,
        per_packet: None,
        masqueraded_at_tc: false,
        unmasqueraded_pod: false,
    };
    let Some(mut f) = matched else {
        (out.verdict, out.reason) = if marked {
            (
                Verdict::Rejected,
                format!(
                    "{} is a ClusterIP but {}/{} is not one of its ports: rejected (ECONNREFUSED)",
                    frontend.addr,
                    frontend.port,
                    frontend.proto.as_str()
                ),
            )
        } else if let Some(range) = state
            .source_ranges
            .range(crate::plan::range_range(crate::plan::SERVICE_CIDRS))
            .find(|r| r.cidr.contains(&frontend.addr))
        {
            (
                Verdict::Dropped,
                format!(
                    "{} is inside a ServiceCIDR ({} of its ranges, other proxies' ClusterIPs cut \
                     out) but no Service has it: dropped (semantics 3.12; EPERM at the socket \
                     layer)",
                    frontend.addr, range.cidr
                ),
            )
        } else {
            (
                Verdict::Untouched,
                "not a Service frontend: the socket hooks leave this connection untouched".into(),
            )
        };
        return Ok(out);
    };
    // The source's Service port: node and zone of the backends, the excluded endpoints.
    let port = source.as_ref().and_then(|s| {
        s.desired
            .ports
            .values()
            .find(|p| p.name.to_string() == f.service_text)
            .map(|sp| (s, sp))
    });
    if let Some((s, sp)) = port {
        f.health_check_node_port = sp.health_check_node_port;
        for b in &mut f.backends {
            if let Some(ep) = sp
                .endpoints
                .all()
                .iter()
                .find(|e| e.addr == b.address && e.port == b.port)
            {
                b.node = ep.node_name.as_deref().map(str::to_string);
                b.zone = ep.local.then(|| s.node.zone.clone()).flatten();
            }
        }
    }
    // semantics 7.8: a source outside the ranges never reaches a backend.
    if !f.source_ranges.is_empty()
        && !f
            .source_ranges
            .iter()
            .filter_map(|r| crate::compile::Cidr::parse(r))
            .any(|r| r.contains(&client))
    {
        out.verdict = Verdict::Refused;
        out.reason = format!(
            "refused: {client} is outside loadBalancerSourceRanges ({}); a pod or the host gets \
             EPERM from connect()/sendmsg(), a client from outside is dropped",
            f.source_ranges.join(", ")
        );
        out.matched = Some(f);
        return Ok(out);
    }
    let total: u32 = f.backends.iter().map(|b| b.slots).sum();
    out.eligible = f
        .backends
        .iter()
        .map(|b| Eligible {
            backend: b.clone(),
            probability: b.slots as f64 / total.max(1) as f64,
        })
        .collect();
    if let Some((s, sp)) = port {
        // ClusterIP follows internalTrafficPolicy, traffic from outside the node
        // externalTrafficPolicy (semantics 4.6).
        let external = frontend.scope == Scope::External;
        let local_policy = (f.scope == Some(FrontendScope::ClusterIp) && sp.itp_local)
            || (external && sp.etp_local);
        let excluded = sp.endpoints.all().iter().filter_map(|ep| {
            let exclusion = match judge(sp, ep, local_policy) {
                EndpointVerdict::Eligible
                    if external && ep.local && s.node.waiting.contains(&ep.addr) =>
                {
                    (
                        ExclusionCause::InterfaceWaiting,
                        "local backend waiting for its interface: the tc program is not yet \
                         on the interface its route leaves through, so traffic from outside \
                         goes elsewhere"
                            .to_string(),
                    )
                }
                EndpointVerdict::Eligible => return None,
                EndpointVerdict::Excluded(e) => (e.cause, e.reason),
            };
            Some(Excluded {
                address: ep.addr,
                port: ep.port,
                node: ep.node_name.as_deref().map(str::to_string),
                zone: ep.local.then(|| s.node.zone.clone()).flatten(),
                state: EndpointState::of(ep.ready, ep.serving, ep.terminating),
                local: ep.local,
                cause: exclusion.0,
                reason: exclusion.1,
            })
        });
        out.excluded = Some(excluded.collect());
    }
    let mut client_entry = None;
    if let Some(timeout) = f.affinity.timeout_seconds {
        for (key, value) in live.affinity()? {
            // A hairpin's choice handed from the socket layer to tc is no affinity entry.
            if key.port_id != f.port_id || key.client_kind == CLIENT_HAIRPIN {
                continue;
            }
            let age = now_ns.saturating_sub(value.last_used_ns) as f64 / 1e9;
            let expires = timeout as f64 - age;
            if expires <= 0.0 {
                continue;
            }
            let (who, kind) = match key.client_kind {
                CLIENT_NETNS => {
                    let mut cookie = [0u8; 8];
                    cookie.copy_from_slice(&key.client[..8]);
                    (
                        format!("netns:{}", u64::from_ne_bytes(cookie)),
                        ClientKind::Netns,
                    )
                }
                CLIENT_ADDR => {
                    let ip = if client.is_ipv4() {
                        IpAddr::from([key.client[0], key.client[1], key.client[2], key.client[3]])
                    } else {
                        IpAddr::from(key.client)
                    };
                    (ip.to_string(), ClientKind::Address)
                }
                _ => ("?".into(), ClientKind::Unknown),
            };
            let backend = state.backends.get(&value.backend_id);
            if who == client.to_string() {
                client_entry = backend.map(|b| BackendRef {
                    id: value.backend_id,
                    address: view::backend_ip(b),
                    port: b.port,
                });
            }
            out.affinity.push(AffinityEntry {
                client: who,
                client_kind: kind,
                backend_id: value.backend_id,
                address: backend.map(view::backend_ip),
                port: backend.map(|b| b.port),
                last_used_seconds_ago: age,
                expires_in_seconds: expires,
            });
        }
    }
    (out.verdict, out.reason) = match f.action {
        super::api::Action::Balance => {
            let (reason, next) = match client_entry {
                Some(backend) => (
                    format!(
                        "{} (session affinity entry of this client)",
                        super::api::host_port(&backend.address, backend.port)
                    ),
                    NextConnection {
                        decided_by: DecidedBy::Affinity,
                        scheduler: f.scheduler,
                        backend: Some(backend),
                    },
                ),
                None => {
                    let shares: Vec<String> = out
                        .eligible
                        .iter()
                        .map(|s| format!("{} {:.0}%", s.backend.host_port(), s.probability * 100.0))
                        .collect();
                    let note = if f.affinity.timeout_seconds.is_some() {
                        "; at the socket layer affinity is per pod network namespace, so a pod with an entry above keeps its backend"
                    } else {
                        ""
                    };
                    let (decision, backend) = scheduler_inputs(live, state, &frontend, &f)?
                        .unwrap_or_else(|| (format!("random: {}", shares.join(", ")), None));
                    (
                        format!("{decision}{note}"),
                        NextConnection {
                            decided_by: DecidedBy::Scheduler,
                            scheduler: f.scheduler,
                            backend,
                        },
                    )
                }
            };
            out.next = Some(next);
            (Verdict::Translated, reason)
        }
        super::api::Action::Reject => (Verdict::Rejected, f.action_text()),
        super::api::Action::Drop => (Verdict::Dropped, f.action_text()),
    };
    out.matched = Some(f);
    Ok(out)
}

/// What a non-random scheduler will decide next, from its inputs in the maps, and the backend
/// where that is determined.
fn scheduler_inputs(
    live: &dyn LiveMaps,
    state: &MapState,
    frontend: &FrontendAddr,
    f: &FrontendView,
) -> anyhow::Result<Option<(String, Option<BackendRef>)>> {
    let Some(svc) = state.services.get(&crate::plan::ServiceKey::of(frontend)) else {
        return Ok(None);
    };
    let name_of = |id: u32| {
        state
            .backends
            .get(&id)
            .map_or_else(|| format!("backend {id}"), view::backend_addr)
    };
    Ok(Some(match f.scheduler {
        Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => {
            let slots: Vec<u32> = state.live_slots(svc).into_iter().flatten().collect();
            if slots.is_empty() {
                return Ok(None);
            }
            let turn = live.rr_cursor(svc.id)?;
            let next = slots[turn as usize % slots.len()];
            (
                format!(
                    "{}: turn {turn}, slot {} of {}: {}",
                    f.scheduler.as_str(),
                    turn as usize % slots.len(),
                    slots.len(),
                    name_of(next)
                ),
                state.backends.get(&next).map(|b| BackendRef {
                    id: next,
                    address: view::backend_ip(b),
                    port: b.port,
                }),
            )
        }
        scheduler @ (Scheduler::LeastConnection
        | Scheduler::WeightedLeastConnection
        | Scheduler::ShortestExpectedDelay
        | Scheduler::NeverQueue) => {
            let counts: Vec<String> = f
                .backends
                .iter()
                .map(|b| {
                    let n = live.connections(b.id).unwrap_or(0);
                    format!(
                        "{} {n} connections (weight {})",
                        b.host_port(),
                        b.weight
                    )
                })
                .collect();
            let rule = match scheduler {
                Scheduler::ShortestExpectedDelay => {
                    "the least (active connections + 1) / weight among"
                }
                Scheduler::NeverQueue => {
                    "a backend without active connections, else the least (active connections + 1) / weight, among"
                }
                _ => "the fewest active connections among",
            };
            (
                format!("{}: {rule} {}", scheduler.as_str(), counts.join(", ")),
                None,
            )
        }
        Scheduler::SourceHash => (
            format!(
                "source-hash over {} slots: each client (its network namespace here, its address at tc/XDP) always gets the same one",
                f.backends.iter().map(|b| b.slots).sum::<u32>()
            ),
            None,
        ),
        Scheduler::Maglev => (
            "maglev: the flow's hash picks an entry of the frontend's table (the same on every node)"
                .to_string(),
            None,
        ),
        Scheduler::Random => return Ok(None),
    }))
}

/// The text form of an explanation.
fn text(out: &Explanation) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let frontend = FrontendAddr {
        addr: out.frontend.address,
        port: out.frontend.port,
        proto: out.frontend.protocol,
        scope: match out.frontend.reach {
            Reach::Internal => Scope::Internal,
            Reach::External => Scope::External,
        },
    };
    let _ = writeln!(s, "client:     {}", out.client);
    let _ = writeln!(s, "frontend:   {frontend}");
    if let Some(p) = &out.per_packet {
        let _ = writeln!(
            s,
            "path:       per packet at tc on the pod's interface (pod {}/{}: its namespace has \
             socket-layer translation off); same backends and scheduler",
            p.namespace, p.pod
        );
    }
    if out.masqueraded_at_tc {
        let _ = writeln!(
            s,
            "path:       per packet at tc on the pod's interface, masqueraded to a node address \
             (externalTrafficPolicy Cluster, semantics 7.13), once the agent has found the pod, \
             but not towards a backend on this node's own address, which sees the pod (kube-proxy \
             masquerades only what leaves the node); same backends and scheduler"
        );
    }
    if out.unmasqueraded_pod {
        let _ = writeln!(
            s,
            "path:       at the socket layer, not masqueraded: kube-proxy masquerades this \
             (externalTrafficPolicy Cluster, semantics 7.13), but this node routes the address \
             through no pod-facing interface carrying tc (--pod-interfaces none or without its \
             interface, or no pod of this node)"
        );
    }
    if let Some(f) = &out.matched {
        let policies = f.policies();
        let _ = writeln!(
            s,
            "matches:    {} ({}, frontend id {}, revision {}){}",
            f.service_text,
            f.type_text(),
            f.id,
            f.revision,
            if policies.is_empty() {
                String::new()
            } else {
                format!(" [{}]", policies.join(" "))
            }
        );
        let _ = writeln!(s, "eligible backends (kernel maps):");
        if out.eligible.is_empty() {
            let _ = writeln!(s, "  none: {}", f.action_text());
        }
        for e in &out.eligible {
            let _ = writeln!(
                s,
                "  {:<28} {:>5.1}% of new connections",
                e.backend.host_port(),
                e.probability * 100.0
            );
        }
        match &out.excluded {
            Some(excluded) if excluded.is_empty() => {
                let _ = writeln!(s, "endpoints not used (source): none");
            }
            Some(excluded) => {
                let _ = writeln!(s, "endpoints not used (source):");
                for e in excluded {
                    let _ = writeln!(
                        s,
                        "  {:<28} {}",
                        super::api::host_port(&e.address, e.port),
                        e.reason
                    );
                }
            }
            None => {
                let _ = writeln!(
                    s,
                    "endpoints not used: pass --manifests DIR (or the API server) to see them and why"
                );
            }
        }
        if f.affinity.timeout_seconds.is_some() {
            let _ = writeln!(s, "session affinity entries:");
            if out.affinity.is_empty() {
                let _ = writeln!(s, "  none live");
            }
            for a in &out.affinity {
                let backend = match (a.address, a.port) {
                    (Some(address), Some(port)) => super::api::host_port(&address, port),
                    _ => "?".to_string(),
                };
                let _ = writeln!(
                    s,
                    "  {} -> {backend} (used {:.1} s ago, expires in {:.1} s)",
                    a.client, a.last_used_seconds_ago, a.expires_in_seconds
                );
            }
        }
    }
    let _ = writeln!(s, "next connection: {}", out.reason);
    s
}
