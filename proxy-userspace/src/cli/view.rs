//! What the kernel's maps say, as plain data: the model behind `services`, `explain` and
//! `status`. Built from a `MapState` dump, so it never depends on the agent's memory.

use std::net::IpAddr;

use proxy_common::{
    backend::{BACKEND_LOCAL, BACKEND_TERMINATING, BackendValue, FAMILY_V4},
    info::{
        INFO_ETP_LOCAL, INFO_ITP_LOCAL, KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER,
        KIND_NODE_PORT,
    },
    service::ServiceValue,
};
use serde::Serialize;

use crate::{
    compile::FrontendAddr,
    plan::{MapState, ServiceKey},
};

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendView {
    pub id: u32,
    pub address: String,
    /// Slots this backend holds in the frontend (its share of new connections).
    pub slots: u32,
    pub local: bool,
    pub terminating: bool,
    pub weight: u16,
    /// Active connections counted for least-connection scheduling (lc/wlc frontends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FrontendView {
    pub frontend: String,
    pub service: String,
    pub kind: String,
    pub id: u32,
    pub revision: u32,
    /// What a new connection gets: "balance", "reject (no endpoints)" or
    /// "drop (no local endpoints)".
    pub action: String,
    pub policies: Vec<String>,
    /// How new connections pick a backend.
    pub scheduler: String,
    pub backends: Vec<BackendView>,
    /// loadBalancerSourceRanges (with the VIP itself where the node exception applies): the
    /// only sources this frontend takes. Empty: every source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    #[serde(skip)]
    pub port_id: u32,
    #[serde(skip)]
    pub affinity_secs: Option<u32>,
}

/// The scheduler a frontend's flags name.
pub fn scheduler_of(svc: &ServiceValue) -> &'static str {
    use proxy_common::service::{
        FLAG_LEAST_CONN, FLAG_MAGLEV, FLAG_ROUND_ROBIN, FLAG_SOURCE_HASH, FLAG_WEIGHTED,
    };
    if svc.has_flag(FLAG_MAGLEV) {
        "maglev"
    } else if svc.has_flag(FLAG_LEAST_CONN) {
        if svc.has_flag(FLAG_WEIGHTED) {
            "weighted-least-connection"
        } else {
            "least-connection"
        }
    } else if svc.has_flag(FLAG_ROUND_ROBIN) {
        "round-robin"
    } else if svc.has_flag(FLAG_SOURCE_HASH) {
        "source-hash"
    } else {
        "random"
    }
}

pub fn backend_addr(v: &BackendValue) -> String {
    let ip = if v.family == FAMILY_V4 {
        IpAddr::from(v.addr4())
    } else {
        IpAddr::from(v.addr)
    };
    match ip {
        IpAddr::V4(a) => format!("{a}:{}", v.port),
        IpAddr::V6(a) => format!("[{a}]:{}", v.port),
    }
}

fn frontend_view(state: &MapState, key: &ServiceKey, svc: &ServiceValue) -> FrontendView {
    let frontend = key
        .frontend()
        .map_or_else(|| format!("{key:?}"), |f: FrontendAddr| f.to_string());
    let info = state.infos.get(&svc.id);
    let kind = match info.map(|i| i.kind) {
        Some(KIND_CLUSTER_IP) => "ClusterIP",
        Some(KIND_EXTERNAL_IP) => "ExternalIP",
        Some(KIND_LOAD_BALANCER) => "LoadBalancer",
        Some(KIND_NODE_PORT) => "NodePort",
        _ => "?",
    };
    let mut policies = Vec::new();
    if info.is_some_and(|i| i.flags & INFO_ITP_LOCAL != 0) {
        policies.push("internalTrafficPolicy=Local".to_string());
    }
    if info.is_some_and(|i| i.flags & INFO_ETP_LOCAL != 0) {
        policies.push("externalTrafficPolicy=Local".to_string());
    }
    if svc.has_affinity() {
        policies.push(format!(
            "sessionAffinity=ClientIP({}s)",
            svc.affinity_timeout_secs
        ));
    }
    let source_ranges: Vec<String> = state
        .source_ranges
        .iter()
        .filter(|r| r.svc_id == svc.id)
        .map(|r| r.cidr.to_string())
        .collect();
    if !source_ranges.is_empty() {
        policies.push(format!(
            "loadBalancerSourceRanges={}",
            source_ranges.join(",")
        ));
    }
    let action = if svc.count > 0 {
        "balance"
    } else if svc.is_no_local() {
        "drop (no local endpoints)"
    } else {
        "reject (no endpoints)"
    };
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
            address: backend_addr(v),
            slots: 1,
            local: v.flags & BACKEND_LOCAL != 0,
            terminating: v.flags & BACKEND_TERMINATING != 0,
            weight: v.weight,
            connections: None,
        });
    }
    FrontendView {
        frontend,
        service: info.map_or("?".to_string(), |i| i.name().to_string()),
        kind: kind.to_string(),
        id: svc.id,
        revision: svc.rev,
        action: action.to_string(),
        policies,
        scheduler: scheduler_of(svc).to_string(),
        backends,
        source_ranges,
        port_id: svc.port_id,
        affinity_secs: svc.has_affinity().then_some(svc.affinity_timeout_secs),
    }
}

/// Every frontend in the maps (ClusterIP port markers excluded), in key order.
pub fn frontends(state: &MapState) -> Vec<FrontendView> {
    state
        .services
        .iter()
        .filter(|(k, _)| !k.is_any_port())
        .map(|(k, v)| frontend_view(state, k, v))
        .collect()
}

/// The frontend for `frontend`, and whether its address is a ClusterIP at all.
pub fn lookup(state: &MapState, frontend: &FrontendAddr) -> (Option<FrontendView>, bool) {
    let key = ServiceKey::of(frontend);
    let view = state
        .services
        .get(&key)
        .map(|v| frontend_view(state, &key, v));
    let marked = state
        .services
        .contains_key(&ServiceKey::any_port(frontend.addr));
    (view, marked)
}
