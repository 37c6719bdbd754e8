//! Which endpoints each traffic class may use: ready vs terminating fallback, node-local
//! policy, topology hints (semantics 3.1–3.6, 4.4, 5.4–5.8).

use std::sync::Arc;

use super::Endpoint;
use crate::snapshot::NodeInfo;

/// kube-proxy's CategorizeEndpoints result (semantics 4.5). The sets are kept as positions in
/// `all` (one copy of each endpoint, whatever the number of sets it is in).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// For Cluster traffic policy: topology-filtered ready endpoints, or cluster-wide
    /// serving-and-terminating ones when none is ready.
    cluster: Subset,
    /// For Local traffic policy: local ready endpoints, else local serving-and-terminating.
    local: Subset,
    /// At least one ready or serving-terminating endpoint exists anywhere (semantics 3.6).
    pub has_any: bool,
    /// Every endpoint of the port, usable or not (for inspection).
    all: Vec<Endpoint>,
}

/// Endpoints of `Categorized::all` by position, in its order. `All` when every one is in
/// (the common case, and the only way to say it: equal sets compare equal).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Subset {
    #[default]
    All,
    Some(Box<[u32]>),
}

impl Subset {
    fn of(positions: Vec<u32>, all: usize) -> Subset {
        if positions.len() == all {
            Subset::All
        } else {
            Subset::Some(positions.into_boxed_slice())
        }
    }
}

/// One set of a `Categorized`, to iterate.
#[derive(Clone, Copy, Debug)]
pub struct EndpointSet<'a> {
    all: &'a [Endpoint],
    subset: &'a Subset,
}

impl<'a> EndpointSet<'a> {
    pub fn iter(self) -> impl Iterator<Item = &'a Endpoint> + use<'a> {
        let all = self.all;
        let (every, some): (Option<&'a [Endpoint]>, &'a [u32]) = match self.subset {
            Subset::All => (Some(all), &[]),
            Subset::Some(p) => (None, p),
        };
        every
            .into_iter()
            .flatten()
            .chain(some.iter().map(move |&i| &all[i as usize]))
    }

    pub fn len(self) -> usize {
        match self.subset {
            Subset::All => self.all.len(),
            Subset::Some(p) => p.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    pub fn to_vec(self) -> Vec<Endpoint> {
        self.iter().cloned().collect()
    }
}

impl Categorized {
    /// For Cluster traffic policy.
    pub fn cluster(&self) -> EndpointSet<'_> {
        EndpointSet {
            all: &self.all,
            subset: &self.cluster,
        }
    }

    /// For Local traffic policy.
    pub fn local(&self) -> EndpointSet<'_> {
        EndpointSet {
            all: &self.all,
            subset: &self.local,
        }
    }

    /// Every endpoint of the port.
    pub fn all(&self) -> &[Endpoint] {
        &self.all
    }
}

fn fallback(e: &Endpoint) -> bool {
    e.serving && e.terminating
}

/// Positions in `endpoints` of those `keep` keeps.
fn positions(endpoints: &[Endpoint], keep: impl Fn(&Endpoint) -> bool) -> Vec<u32> {
    (0u32..)
        .zip(endpoints)
        .filter(|(_, e)| keep(e))
        .map(|(i, _)| i)
        .collect()
}

/// Splits the endpoints of one Service port into the sets kube-proxy computes. `want_cluster`
/// and `want_local` say which sets the port needs (semantics 4.4); an unneeded set is empty.
pub fn categorize(
    endpoints: Vec<Endpoint>,
    node: &NodeInfo,
    want_cluster: bool,
    want_local: bool,
) -> Categorized {
    let has_any = endpoints.iter().any(|e| e.ready || fallback(e));
    let cluster = if want_cluster {
        let topo = topology_filter(&endpoints, node);
        if topo.is_empty() {
            positions(&endpoints, fallback)
        } else {
            topo
        }
    } else {
        Vec::new()
    };
    let local = if want_local {
        let ready = positions(&endpoints, |e| e.local && e.ready);
        if ready.is_empty() {
            positions(&endpoints, |e| e.local && fallback(e))
        } else {
            ready
        }
    } else {
        Vec::new()
    };
    Categorized {
        cluster: Subset::of(cluster, endpoints.len()),
        local: Subset::of(local, endpoints.len()),
        has_any,
        all: endpoints,
    }
}

/// Ready endpoints after hints (semantics 5.4–5.7): node hints if every ready endpoint has one
/// and one names this node; else zone hints likewise with this node's zone; else all ready.
fn topology_filter(endpoints: &[Endpoint], node: &NodeInfo) -> Vec<u32> {
    let ready = positions(endpoints, |e| e.ready);
    if ready.is_empty() {
        return Vec::new();
    }
    let by_hint = |hints: fn(&Endpoint) -> Option<&[Arc<str>]>, want: &str| {
        let hinted = |i: &u32| hints(&endpoints[*i as usize]);
        let all_hinted = ready.iter().all(|i| hinted(i).is_some());
        let matches = |i: &&u32| hinted(i).is_some_and(|h| h.iter().any(|n| &**n == want));
        (all_hinted && ready.iter().any(|i| matches(&i)))
            .then(|| ready.iter().filter(matches).copied().collect::<Vec<_>>())
    };
    // kube-proxy's node name is lower-cased (semantics 2.8), also when matching forNodes.
    let node_name = node.name.to_lowercase();
    if !node_name.is_empty()
        && let Some(set) = by_hint(|e| e.node_hints(), &node_name)
    {
        return set;
    }
    if let Some(zone) = node.zone.as_deref()
        && let Some(set) = by_hint(|e| e.zone_hints(), zone)
    {
        return set;
    }
    ready
}
