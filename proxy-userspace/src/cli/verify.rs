//! `verify`: the kernel's maps against the state computed from the source. Prints every
//! difference as the write that would repair it; exits 1 on drift. Another kube-bpf-proxy's
//! programs beside this one's (pins elsewhere: `datapath::foreign`) are drift too.

use std::{net::IpAddr, time::Duration};

use proxy_common::{
    backend::{BACKEND_LOCAL, BACKEND_TERMINATING},
    info::{
        INFO_ETP_LOCAL, INFO_ITP_LOCAL, KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER,
        KIND_NODE_PORT,
    },
    service::{SCOPE_EXTERNAL, SCOPE_INTERNAL},
};
use serde::Serialize;

use super::{
    InspectArgs, SourceArgs,
    api::{Document, EndpointState, FrontendScope, Kind, Reach, TrafficPolicies, TrafficPolicy},
    output::{Format, json},
    view,
};
use crate::{
    agent::{Fit, fit_to},
    compile::{Compiler, Proto},
    datapath::{
        MapIo as _,
        bpf::Maps,
        foreign::{self, Foreign},
        podif::{self, PodInterfaces},
    },
    plan::{Op, ServiceKey, keeping, plan},
};

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// The agent's `--pod-interfaces`: pod-facing interfaces it finds that do not carry the tc
    /// program are reported as drift.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub pod_interfaces: Vec<String>,
}

/// The maps differ from the source (exit status 1).
#[derive(Debug, thiserror::Error)]
#[error("{0} difference(s) between the kernel maps and the source")]
pub struct Drift(pub usize);

/// `verify -o json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    in_sync: bool,
    /// Frontends the source asks for.
    frontends: usize,
    /// The writes that would repair the maps, in the order the agent would make them.
    differences: Vec<Difference>,
    /// Pod-facing interfaces that should carry the tc program but do not.
    interfaces_missing: Vec<MissingInterface>,
    /// Programs that are not this agent's at its socket hooks, or beside its tc programs
    /// under its programs' names. Another kube-bpf-proxy's are drift.
    foreign_programs: Vec<ForeignProgram>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ForeignProgram {
    /// The socket hook (this build's program name for it), or `tc-IFNAME`/`tce-IFNAME`.
    hook: String,
    program_id: u32,
    /// The kernel's name of the program, if it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// Its name is one of this build's programs': another kube-bpf-proxy, pins elsewhere.
    another_kube_bpf_proxy: bool,
}

impl Kind for Verification {
    const KIND: &'static str = "Verification";
    /// v2: `LB_SLOTS` keys name a chunk of 16 slots (`chunk`, was `slot`) and values carry
    /// its 16 backend ids (`backendIds`, was `backendId`), as the map holds them since layout
    /// version 2.
    const API_VERSION: &'static str = "kube-bpf-proxy.io/v2";
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MissingInterface {
    interface: String,
    /// Why it should carry the program.
    reason: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
enum Operation {
    Put,
    Delete,
}

/// One map write that would repair a difference.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Difference {
    /// The map's pin name.
    map: &'static str,
    operation: Operation,
    key: MapKey,
    /// The value a put writes (absent for deletes, source ranges and Maglev chunks).
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<MapValue>,
    /// The write as `verify` prints it.
    text: String,
}

/// A key, by map (the `map` field says which).
#[derive(Debug, Serialize)]
#[serde(untagged, rename_all_fields = "camelCase")]
enum MapKey {
    /// `LB4_SERVICES`, `LB6_SERVICES`; port 0 without protocol: a ClusterIP's marker.
    Frontend {
        address: IpAddr,
        port: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        protocol: Option<Proto>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reach: Option<Reach>,
    },
    /// `LB_SLOTS`: slots `chunk * 16 ..` of a frontend's generation.
    Slot {
        frontend_id: u32,
        generation: u16,
        chunk: u16,
    },
    /// `LB_MEMBERS`.
    Member { frontend_id: u32, backend_id: u32 },
    /// `LB_BACKENDS`.
    Backend { backend_id: u32 },
    /// `LB_SVC_INFO`.
    Info { frontend_id: u32 },
    /// `LB4_SRC_RANGES`, `LB6_SRC_RANGES`.
    SourceRange { frontend_id: u32, cidr: String },
    /// `LB_MAGLEV`.
    Maglev {
        frontend_id: u32,
        generation: u16,
        chunk: u16,
    },
}

/// A value, by map.
#[derive(Debug, Serialize)]
#[serde(untagged, rename_all_fields = "camelCase")]
enum MapValue {
    Frontend {
        id: u32,
        port_id: u32,
        revision: u32,
        /// Live slots; 0: no usable backend.
        count: u16,
        affinity_timeout_seconds: u32,
        flags: Vec<&'static str>,
    },
    /// The backend ids of a chunk's slots, in slot order (0: past the frontend's slots).
    Slot {
        backend_ids: Vec<u32>,
    },
    Member {
        slots: u32,
    },
    Backend {
        address: IpAddr,
        port: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        protocol: Option<Proto>,
        state: EndpointState,
        local: bool,
        weight: u16,
    },
    Info {
        service: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        scope: Option<FrontendScope>,
        traffic_policies: TrafficPolicies,
        port_id: u32,
    },
}

/// Names of a frontend's `FLAG_*` bits.
fn flag_names(flags: u16) -> Vec<&'static str> {
    use proxy_common::service::*;
    [
        (FLAG_AFFINITY, "affinity"),
        (FLAG_NO_LOCAL, "noLocal"),
        (FLAG_SNAT, "masquerade"),
        (FLAG_SOURCE_RANGES, "sourceRanges"),
        (FLAG_MAGLEV, "maglev"),
        (FLAG_ROUND_ROBIN, "roundRobin"),
        (FLAG_SOURCE_HASH, "sourceHash"),
        (FLAG_LEAST_CONN, "leastConnection"),
        (FLAG_WEIGHTED, "weighted"),
        (FLAG_SED, "shortestExpectedDelay"),
        (FLAG_NEVER_QUEUE, "neverQueue"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

fn frontend_key(key: &ServiceKey) -> MapKey {
    let (port, proto, scope) = match key {
        ServiceKey::V4(k) => (k.port, k.proto, k.scope),
        ServiceKey::V6(k) => (k.port, k.proto, k.scope),
    };
    MapKey::Frontend {
        address: key.addr(),
        port,
        protocol: Proto::from_number(proto),
        reach: match scope {
            SCOPE_INTERNAL => Some(Reach::Internal),
            SCOPE_EXTERNAL => Some(Reach::External),
            _ => None,
        },
    }
}

fn difference(op: &Op) -> Difference {
    let (operation, key, value) = match op {
        Op::PutService(k, v) => (
            Operation::Put,
            frontend_key(k),
            Some(MapValue::Frontend {
                id: v.id,
                port_id: v.port_id,
                revision: v.rev,
                count: v.count,
                affinity_timeout_seconds: v.affinity_timeout_secs,
                flags: flag_names(v.flags),
            }),
        ),
        Op::DelService(k) => (Operation::Delete, frontend_key(k), None),
        Op::PutSlot(k, v) => (
            Operation::Put,
            MapKey::Slot {
                frontend_id: k.svc_id,
                generation: k.generation,
                chunk: k.chunk,
            },
            Some(MapValue::Slot {
                backend_ids: v.backend_ids.to_vec(),
            }),
        ),
        Op::DelSlot(k) => (
            Operation::Delete,
            MapKey::Slot {
                frontend_id: k.svc_id,
                generation: k.generation,
                chunk: k.chunk,
            },
            None,
        ),
        Op::PutMember(k, v) => (
            Operation::Put,
            MapKey::Member {
                frontend_id: k.svc_id,
                backend_id: k.backend_id,
            },
            Some(MapValue::Member { slots: v.slots }),
        ),
        Op::DelMember(k) => (
            Operation::Delete,
            MapKey::Member {
                frontend_id: k.svc_id,
                backend_id: k.backend_id,
            },
            None,
        ),
        Op::PutBackend(id, v) => (
            Operation::Put,
            MapKey::Backend { backend_id: *id },
            Some(MapValue::Backend {
                address: view::backend_ip(v),
                port: v.port,
                protocol: Proto::from_number(v.proto),
                state: if v.flags & BACKEND_TERMINATING != 0 {
                    EndpointState::ServingTerminating
                } else {
                    EndpointState::Ready
                },
                local: v.flags & BACKEND_LOCAL != 0,
                weight: v.weight,
            }),
        ),
        Op::DelBackend(id) => (Operation::Delete, MapKey::Backend { backend_id: *id }, None),
        Op::PutInfo(id, info) => (
            Operation::Put,
            MapKey::Info { frontend_id: *id },
            Some(MapValue::Info {
                service: info.name().to_string(),
                scope: match info.kind {
                    KIND_CLUSTER_IP => Some(FrontendScope::ClusterIp),
                    KIND_EXTERNAL_IP => Some(FrontendScope::ExternalIp),
                    KIND_LOAD_BALANCER => Some(FrontendScope::LoadBalancer),
                    KIND_NODE_PORT => Some(FrontendScope::NodePort),
                    _ => None,
                },
                traffic_policies: TrafficPolicies {
                    internal: TrafficPolicy::local(info.flags & INFO_ITP_LOCAL != 0),
                    external: TrafficPolicy::local(info.flags & INFO_ETP_LOCAL != 0),
                },
                port_id: info.port_id,
            }),
        ),
        Op::DelInfo(id) => (Operation::Delete, MapKey::Info { frontend_id: *id }, None),
        Op::PutSourceRange(r) | Op::DelSourceRange(r) => (
            if matches!(op, Op::PutSourceRange(_)) {
                Operation::Put
            } else {
                Operation::Delete
            },
            MapKey::SourceRange {
                frontend_id: r.svc_id,
                cidr: r.cidr.to_string(),
            },
            None,
        ),
        Op::PutMaglev(k, _) | Op::DelMaglev(k) => (
            if matches!(op, Op::PutMaglev(..)) {
                Operation::Put
            } else {
                Operation::Delete
            },
            MapKey::Maglev {
                frontend_id: k.svc_id,
                generation: k.generation,
                chunk: k.chunk,
            },
            None,
        ),
    };
    Difference {
        map: op.map(),
        operation,
        key,
        value,
        text: op.to_string(),
    }
}

/// PURE: the `Verification` of a plan (`ops`, the writes from the maps to the source's state
/// of `frontends` frontends), of the interfaces missing the tc program (name, why) and of the
/// programs of others where this agent's run.
pub fn verification(
    frontends: usize,
    ops: &[Op],
    interfaces_missing: Vec<(String, String)>,
    foreign: &[Foreign],
) -> Verification {
    Verification {
        in_sync: ops.is_empty()
            && interfaces_missing.is_empty()
            && !foreign.iter().any(Foreign::is_ours_elsewhere),
        frontends,
        differences: ops.iter().map(difference).collect(),
        interfaces_missing: interfaces_missing
            .into_iter()
            .map(|(interface, reason)| MissingInterface { interface, reason })
            .collect(),
        foreign_programs: foreign
            .iter()
            .map(|f| ForeignProgram {
                hook: f.hook.clone(),
                program_id: f.program_id,
                name: f.name.clone(),
                another_kube_bpf_proxy: f.is_ours_elsewhere(),
            })
            .collect(),
    }
}

pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let spec = PodInterfaces::parse(&args.pod_interfaces)
        .map_err(|e| anyhow::anyhow!("--pod-interfaces: {e}"))?;
    let mut snapshot = args.source.first_snapshot(Duration::from_secs(30))?;
    let endpoints = snapshot.node.local_endpoints(&snapshot.slices);
    snapshot.node.waiting = podif::waiting_now(&args.inspect.bpffs, &endpoints)?;
    let maps = Maps::open_pinned(&args.inspect.bpffs)?;
    maps.agent_compile_settings(&mut snapshot.config)?;
    let mut compiler = Compiler::default();
    compiler.update(&snapshot);
    let current = maps.dump()?;
    // What the agent programs: Service ports that do not fit the maps are refused alike, so
    // they are no drift.
    let (desired, fit) = fit_to(&compiler, &current, maps.capacity().as_ref(), None);
    let ops = match &fit {
        // Refused ports that were programmed keep their entries in the agent too.
        Fit::Refused { kept } => keeping(plan(&desired, &current), &current, kept),
        Fit::All => plan(&desired, &current),
    };
    let inputs = podif::ClusterInputs {
        endpoints,
        pod_cidrs: snapshot.node.pod_cidrs.clone(),
        remote: snapshot.node.remote_probes(&snapshot.slices),
        node_ips: snapshot.node.primary.clone(),
        // External interfaces are not checked here (`unattached`).
        nodeport_ips: Vec::new(),
    };
    let interfaces_missing: Vec<(String, String)> =
        podif::unattached(&args.inspect.bpffs, &spec, &inputs)?;
    let cgroup = foreign::cgroup_of(&args.inspect.bpffs);
    if cgroup.is_none() && args.inspect.output != Format::Json {
        println!(
            "NOTE: the cgroup of the socket hooks pinned under {} was not found: programs of \
             others at them are not checked",
            args.inspect.bpffs.display()
        );
    }
    let foreign = foreign::find(&args.inspect.bpffs, cgroup.as_deref());
    let view = verification(desired.frontends.len(), &ops, interfaces_missing, &foreign);
    let drift = view.differences.len()
        + view.interfaces_missing.len()
        + view
            .foreign_programs
            .iter()
            .filter(|f| f.another_kube_bpf_proxy)
            .count();
    if args.inspect.output == Format::Json {
        json(&Document::of(&view))?;
    } else if view.in_sync {
        println!("in sync: {} frontends match the source", view.frontends);
    } else {
        if !view.differences.is_empty() {
            println!(
                "DRIFT: {} difference(s); the writes that would repair them:",
                view.differences.len()
            );
            for d in &view.differences {
                println!("  {}", d.text);
            }
        }
        for m in &view.interfaces_missing {
            println!(
                "DRIFT: interface {}: should carry the tc program ({}) but does not",
                m.interface, m.reason
            );
        }
    }
    if args.inspect.output != Format::Json {
        for f in &view.foreign_programs {
            let name = f.name.as_deref().unwrap_or("(name not readable)");
            if f.another_kube_bpf_proxy {
                println!(
                    "DRIFT: {}: another kube-bpf-proxy's program {name} (id {}) runs beside this \
                     one's, with pins elsewhere (stop that agent, or `cleanup --bpffs` its \
                     directory)",
                    f.hook, f.program_id
                );
            } else {
                println!(
                    "NOTE: {}: another program, {name} (id {}), runs for the same sockets",
                    f.hook, f.program_id
                );
            }
        }
    }
    if drift == 0 {
        Ok(())
    } else {
        Err(Drift(drift).into())
    }
}
