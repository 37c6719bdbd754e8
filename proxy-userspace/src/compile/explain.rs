//! Why an endpoint is or is not used by a Service port's ClusterIP traffic, in words an operator
//! recognizes (for `kube-bpf-proxy explain`).

use super::{Endpoint, ServicePort};

/// The verdict on one endpoint for internal (ClusterIP) traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointVerdict {
    /// In the set new connections are balanced over.
    Eligible,
    /// Not used, with the reason.
    Excluded(Exclusion),
}

/// Why an endpoint is not used: the rule (`cause`) and the sentence an operator reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exclusion {
    pub cause: ExclusionCause,
    pub reason: String,
}

/// The rule that keeps an endpoint out of a frontend's backends.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ExclusionCause {
    /// On another node, and the traffic policy is Local.
    NotLocal,
    /// Not ready, not terminating.
    NotReady,
    /// Terminating and not serving: never used.
    NotServing,
    /// Serving and terminating while ready endpoints exist: only a fallback.
    FallbackOnly,
    /// Topology hints name other nodes.
    NodeHint,
    /// Topology hints name other zones.
    ZoneHint,
    /// Left out by topology otherwise.
    Topology,
    /// Local, but its pod-facing interface does not carry the tc program yet (decided by the
    /// caller, which knows the interfaces; `judge` never returns it).
    InterfaceWaiting,
}

/// Judges `ep` for the ClusterIP traffic of `sp` (`local_policy` = internalTrafficPolicy
/// Local), or for external addresses reached from this node (`local_policy` = false: they use
/// the cluster set, semantics 4.7), following the same rules as `categorize`.
pub fn judge(sp: &ServicePort, ep: &Endpoint, local_policy: bool) -> EndpointVerdict {
    let set = if local_policy {
        sp.endpoints.local()
    } else {
        sp.endpoints.cluster()
    };
    if set.iter().any(|e| e.addr == ep.addr && e.port == ep.port) {
        return EndpointVerdict::Eligible;
    }
    let fallback = ep.serving && ep.terminating;
    let (cause, reason) = if local_policy && !ep.local {
        (
            ExclusionCause::NotLocal,
            format!(
                "not local (internalTrafficPolicy: Local; endpoint on node {})",
                ep.node_name.as_deref().unwrap_or("<none>")
            ),
        )
    } else if !ep.ready && !fallback {
        if ep.terminating {
            (
                ExclusionCause::NotServing,
                "terminating and not serving".to_string(),
            )
        } else {
            (ExclusionCause::NotReady, "not ready".to_string())
        }
    } else if !ep.ready && fallback {
        (
            ExclusionCause::FallbackOnly,
            "terminating (ready endpoints exist, so terminating ones are only a fallback)"
                .to_string(),
        )
    } else if let Some(nodes) = ep.node_hints()
        && set.iter().all(|e| e.node_hints().is_some())
    {
        (
            ExclusionCause::NodeHint,
            format!("topology: hinted for nodes {nodes:?}, not this node"),
        )
    } else if let Some(zones) = ep.zone_hints() {
        (
            ExclusionCause::ZoneHint,
            format!("topology: hinted for zones {zones:?}, not this node's zone"),
        )
    } else {
        (ExclusionCause::Topology, "excluded by topology".to_string())
    };
    EndpointVerdict::Excluded(Exclusion { cause, reason })
}
