//! Which endpoints each traffic class may use: ready vs terminating fallback, node-local
//! policy, topology hints (semantics 3.1–3.6, 4.4, 5.4–5.8).

use super::Endpoint;
use crate::snapshot::NodeInfo;

/// kube-proxy's CategorizeEndpoints result (semantics 4.5).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// For Cluster traffic policy: topology-filtered ready endpoints, or cluster-wide
    /// serving-and-terminating ones when none is ready.
    pub cluster: Vec<Endpoint>,
    /// For Local traffic policy: local ready endpoints, else local serving-and-terminating.
    pub local: Vec<Endpoint>,
    /// At least one ready or serving-terminating endpoint exists anywhere (semantics 3.6).
    pub has_any: bool,
    /// Every endpoint of the port, usable or not (for inspection).
    pub all: Vec<Endpoint>,
}

fn fallback(e: &Endpoint) -> bool {
    e.serving && e.terminating
}

/// Splits the endpoints of one Service port into the sets kube-proxy computes. `want_cluster`
/// and `want_local` say which sets the port needs (semantics 4.4); an unneeded set is empty.
pub fn categorize(
    endpoints: &[Endpoint],
    node: &NodeInfo,
    want_cluster: bool,
    want_local: bool,
) -> Categorized {
    let has_any = endpoints.iter().any(|e| e.ready || fallback(e));
    let cluster = if want_cluster {
        let topo = topology_filter(endpoints, node);
        if topo.is_empty() {
            endpoints.iter().filter(|e| fallback(e)).cloned().collect()
        } else {
            topo
        }
    } else {
        Vec::new()
    };
    let local = if want_local {
        let ready: Vec<Endpoint> = endpoints
            .iter()
            .filter(|e| e.local && e.ready)
            .cloned()
            .collect();
        if ready.is_empty() {
            endpoints
                .iter()
                .filter(|e| e.local && fallback(e))
                .cloned()
                .collect()
        } else {
            ready
        }
    } else {
        Vec::new()
    };
    Categorized {
        cluster,
        local,
        has_any,
        all: endpoints.to_vec(),
    }
}

/// Ready endpoints after hints (semantics 5.4–5.7): node hints if every ready endpoint has one
/// and one names this node; else zone hints likewise with this node's zone; else all ready.
fn topology_filter(endpoints: &[Endpoint], node: &NodeInfo) -> Vec<Endpoint> {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Vec::new();
    }
    let by_hint = |hints: fn(&Endpoint) -> Option<&Vec<String>>, want: &str| {
        let all_hinted = ready.iter().all(|e| hints(e).is_some());
        let matches = |e: &&&Endpoint| hints(e).is_some_and(|h| h.iter().any(|n| n == want));
        (all_hinted && ready.iter().any(|e| matches(&e))).then(|| {
            ready
                .iter()
                .filter(matches)
                .map(|e| (*e).clone())
                .collect::<Vec<_>>()
        })
    };
    // kube-proxy's node name is lower-cased (semantics 2.8), also when matching forNodes.
    let node_name = node.name.to_lowercase();
    if !node_name.is_empty()
        && let Some(set) = by_hint(|e| e.node_hints.as_ref(), &node_name)
    {
        return set;
    }
    if let Some(zone) = node.zone.as_deref()
        && let Some(set) = by_hint(|e| e.zone_hints.as_ref(), zone)
    {
        return set;
    }
    ready.into_iter().cloned().collect()
}
