//! What the kernel's maps say, as plain data: the model behind `services`, `explain` and
//! `status`. Built from a `MapState` dump, so it never depends on the agent's memory.

use std::net::IpAddr;

use proxy_common::{
    backend::{BACKEND_LOCAL, BACKEND_TERMINATING, BackendValue, FAMILY_V4},
    info::{
        INFO_ETP_LOCAL, INFO_ITP_LOCAL, KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER,
        KIND_NODE_PORT,
    },
    service::{FLAG_SNAT, ServiceValue},
};
use serde::Serialize;

use super::api::{
    Action, Affinity, BackendView, EndpointState, FrontendScope, Kind, Reach, ServiceRef,
    TrafficPolicies, TrafficPolicy,
};
use crate::{
    compile::{Family, FrontendAddr, Proto, Scope},
    model::Scheduler,
    plan::{MapState, ServiceKey},
};

/// One frontend (address, port, protocol, reach) and what it does, as the maps hold it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontendView {
    /// The Service port, from `LB_SVC_INFO` (absent if the frontend has no entry there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Which of the Service's addresses this is (absent without an `LB_SVC_INFO` entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<FrontendScope>,
    pub reach: Reach,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Proto,
    pub family: Family,
    pub action: Action,
    pub reason: String,
    /// The Service's policies (absent without an `LB_SVC_INFO` entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_policies: Option<TrafficPolicies>,
    /// Clients are masqueraded to a node address (external reach with externalTrafficPolicy
    /// Cluster).
    pub masquerade: bool,
    pub affinity: Affinity,
    /// How new connections pick a backend.
    pub scheduler: Scheduler,
    /// loadBalancerSourceRanges (with the VIP itself where the node exception applies): the
    /// only sources this frontend takes. Empty: every source.
    pub source_ranges: Vec<String>,
    /// Only from a source (`explain`): the maps do not hold it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    pub id: u32,
    pub revision: u32,
    pub backends: Vec<BackendView>,
    /// Service-port id: the scope of session affinity entries.
    #[serde(skip)]
    pub port_id: u32,
    /// The Service port as `LB_SVC_INFO` names it (`namespace/name:port/PROTOCOL`), "?" when
    /// it has no entry.
    #[serde(skip)]
    pub service_text: String,
}

impl FrontendView {
    pub fn frontend(&self) -> FrontendAddr {
        FrontendAddr {
            addr: self.address,
            port: self.port,
            proto: self.protocol,
            scope: match self.reach {
                Reach::Internal => Scope::Internal,
                Reach::External => Scope::External,
            },
        }
    }

    /// The TYPE column: ClusterIP, NodePort, ExternalIP, LoadBalancer, or "?".
    pub fn type_text(&self) -> &'static str {
        self.scope.map_or("?", FrontendScope::title)
    }

    /// `balance`, `reject (no endpoints)`, `drop (no local endpoints)`.
    pub fn action_text(&self) -> String {
        match self.action {
            Action::Balance => "balance".to_string(),
            Action::Reject => format!("reject ({})", self.reason),
            Action::Drop => format!("drop ({})", self.reason),
        }
    }

    /// The Service's non-default policies as `name=value` words.
    pub fn policies(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = self.traffic_policies {
            if p.internal == TrafficPolicy::Local {
                out.push("internalTrafficPolicy=Local".to_string());
            }
            if p.external == TrafficPolicy::Local {
                out.push("externalTrafficPolicy=Local".to_string());
            }
        }
        if let Some(secs) = self.affinity.timeout_seconds {
            out.push(format!("sessionAffinity=ClientIP({secs}s)"));
        }
        if !self.source_ranges.is_empty() {
            out.push(format!(
                "loadBalancerSourceRanges={}",
                self.source_ranges.join(",")
            ));
        }
        out
    }
}

/// `services -o json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceList {
    pub items: Vec<FrontendView>,
    /// Namespaces whose pods reach these frontends per packet at tc (socket-layer translation
    /// off), from `LB_SOCKLB_NS`.
    pub per_packet_namespaces: Vec<super::api::PerPacketNamespace>,
}

impl Kind for ServiceList {
    const KIND: &'static str = "ServiceList";
}

/// PURE: the `ServiceList` of `state`; `connections` gives the active connections of a
/// backend id (read for least-connection frontends only).
pub fn service_list(state: &MapState, connections: &dyn Fn(u32) -> Option<u64>) -> ServiceList {
    let mut items = frontends(state);
    // The inputs of a least-connection frontend's next decision: its backends' counts.
    for f in items
        .iter_mut()
        .filter(|f| f.scheduler.counts_connections())
    {
        for b in &mut f.backends {
            b.connections = connections(b.id);
        }
    }
    ServiceList {
        items,
        per_packet_namespaces: Vec::new(),
    }
}

/// The scheduler a frontend's flags name. Round-robin and weighted round-robin share a flag:
/// the weighted one is told by a backend holding more than one slot (with every weight 1 the
/// two are the same).
pub fn scheduler_of(svc: &ServiceValue, backends: &[BackendView]) -> Scheduler {
    use proxy_common::service::{
        FLAG_LEAST_CONN, FLAG_MAGLEV, FLAG_NEVER_QUEUE, FLAG_ROUND_ROBIN, FLAG_SED,
        FLAG_SOURCE_HASH, FLAG_WEIGHTED,
    };
    if svc.has_flag(FLAG_MAGLEV) {
        Scheduler::Maglev
    } else if svc.has_flag(FLAG_LEAST_CONN) {
        if svc.has_flag(FLAG_NEVER_QUEUE) {
            Scheduler::NeverQueue
        } else if svc.has_flag(FLAG_SED) {
            Scheduler::ShortestExpectedDelay
        } else if svc.has_flag(FLAG_WEIGHTED) {
            Scheduler::WeightedLeastConnection
        } else {
            Scheduler::LeastConnection
        }
    } else if svc.has_flag(FLAG_ROUND_ROBIN) {
        if backends.iter().any(|b| b.slots > 1) {
            Scheduler::WeightedRoundRobin
        } else {
            Scheduler::RoundRobin
        }
    } else if svc.has_flag(FLAG_SOURCE_HASH) {
        Scheduler::SourceHash
    } else {
        Scheduler::Random
    }
}

/// A backend's address.
pub fn backend_ip(v: &BackendValue) -> IpAddr {
    if v.family == FAMILY_V4 {
        IpAddr::from(v.addr4())
    } else {
        IpAddr::from(v.addr)
    }
}

/// A backend's `ip:port`.
pub fn backend_addr(v: &BackendValue) -> String {
    super::api::host_port(&backend_ip(v), v.port)
}

/// Parses `LB_SVC_INFO`'s name, `namespace/name[:port]/PROTOCOL[/v6]`; `None` if it is not of
/// that shape (cut short, say).
pub fn parse_service(text: &str) -> Option<ServiceRef> {
    let text = text.strip_suffix("/v6").unwrap_or(text);
    let (namespace, rest) = text.split_once('/')?;
    let (name_port, proto) = rest.rsplit_once('/')?;
    Proto::parse(Some(proto))?;
    let (name, port) = name_port.split_once(':').unwrap_or((name_port, ""));
    if namespace.is_empty() || name.is_empty() {
        return None;
    }
    Some(ServiceRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
        port: port.to_string(),
    })
}

/// `LB_SVC_INFO`'s `kind` as a scope.
pub fn scope_of(kind: u8) -> Option<FrontendScope> {
    match kind {
        KIND_CLUSTER_IP => Some(FrontendScope::ClusterIp),
        KIND_EXTERNAL_IP => Some(FrontendScope::ExternalIp),
        KIND_LOAD_BALANCER => Some(FrontendScope::LoadBalancer),
        KIND_NODE_PORT => Some(FrontendScope::NodePort),
        _ => None,
    }
}

fn frontend_view(state: &MapState, frontend: FrontendAddr, svc: &ServiceValue) -> FrontendView {
    let info = state.infos.get(&svc.id);
    let scope = info.and_then(|i| scope_of(i.kind));
    let traffic_policies = info.map(|i| TrafficPolicies {
        internal: TrafficPolicy::local(i.flags & INFO_ITP_LOCAL != 0),
        external: TrafficPolicy::local(i.flags & INFO_ETP_LOCAL != 0),
    });
    let source_ranges: Vec<String> = state
        .source_ranges
        .iter()
        .filter(|r| r.svc_id == svc.id)
        .map(|r| r.cidr.to_string())
        .collect();
    let mut backends: Vec<BackendView> = Vec::new();
    for id in state.live_slots(svc).into_iter().flatten() {
        if let Some(b) = backends.iter_mut().find(|b| b.id == id) {
            b.slots += 1;
            continue;
        }
        let Some(v) = state.backends.get(&id) else {
            continue;
        };
        backends.push(BackendView {
            id,
            address: backend_ip(v),
            port: v.port,
            slots: 1,
            weight: v.weight,
            // Terminating backends are programmed only while they serve (the fallback).
            state: if v.flags & BACKEND_TERMINATING != 0 {
                EndpointState::ServingTerminating
            } else {
                EndpointState::Ready
            },
            local: v.flags & BACKEND_LOCAL != 0,
            connections: None,
            node: None,
            zone: None,
        });
    }
    let (action, reason) = if svc.count > 0 {
        let slots: u32 = backends.iter().map(|b| b.slots).sum();
        (
            Action::Balance,
            format!("{} backend(s) in {slots} slot(s)", backends.len()),
        )
    } else if svc.is_no_local() {
        (Action::Drop, "no local endpoints".to_string())
    } else {
        (Action::Reject, "no endpoints".to_string())
    };
    let service_text = info.map_or("?".to_string(), |i| i.name().to_string());
    FrontendView {
        service: parse_service(&service_text),
        scope,
        reach: match frontend.scope {
            Scope::Internal => Reach::Internal,
            Scope::External => Reach::External,
        },
        address: frontend.addr,
        port: frontend.port,
        protocol: frontend.proto,
        family: Family::of(&frontend.addr),
        action,
        reason,
        traffic_policies,
        masquerade: svc.has_flag(FLAG_SNAT),
        affinity: Affinity::of(svc.has_affinity().then_some(svc.affinity_timeout_secs)),
        scheduler: scheduler_of(svc, &backends),
        source_ranges,
        health_check_node_port: None,
        id: svc.id,
        revision: svc.rev,
        backends,
        port_id: svc.port_id,
        service_text,
    }
}

/// Every frontend in the maps (ClusterIP port markers excluded), in key order. A key of a
/// protocol or scope this build does not know is left out (`verify` reports it).
pub fn frontends(state: &MapState) -> Vec<FrontendView> {
    state
        .services
        .iter()
        .filter(|(k, _)| !k.is_any_port())
        .filter_map(|(k, v)| Some(frontend_view(state, k.frontend()?, v)))
        .collect()
}

/// The frontend for `frontend`, and whether its address is a ClusterIP at all.
pub fn lookup(state: &MapState, frontend: &FrontendAddr) -> (Option<FrontendView>, bool) {
    let key = ServiceKey::of(frontend);
    let view = state
        .services
        .get(&key)
        .map(|v| frontend_view(state, *frontend, v));
    let marked = state
        .services
        .contains_key(&ServiceKey::any_port(frontend.addr));
    (view, marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_parse_with_and_without_a_port_name() {
        let web = parse_service("default/web:http/TCP").unwrap();
        assert_eq!(
            (&*web.namespace, &*web.name, &*web.port),
            ("default", "web", "http")
        );
        let dns = parse_service("kube-system/dns/UDP/v6").unwrap();
        assert_eq!((&*dns.name, &*dns.port), ("dns", ""));
        assert_eq!(parse_service("?"), None);
        assert_eq!(parse_service("default/web:ht"), None, "cut short");
    }
}
