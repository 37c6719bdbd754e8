//! Why an endpoint is or is not used by a Service port's ClusterIP traffic, in words an operator
//! recognizes (for `kube-bpf-proxy explain`).

use super::{Endpoint, ServicePort};

/// The verdict on one endpoint for internal (ClusterIP) traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointVerdict {
    /// In the set new connections are balanced over.
    Eligible,
    /// Not used, with the reason.
    Excluded(String),
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
    let reason = if local_policy && !ep.local {
        format!(
            "not local (internalTrafficPolicy: Local; endpoint on node {})",
            ep.node_name.as_deref().unwrap_or("<none>")
        )
    } else if !ep.ready && !fallback {
        if ep.terminating {
            "terminating and not serving".to_string()
        } else {
            "not ready".to_string()
        }
    } else if !ep.ready && fallback {
        "terminating (ready endpoints exist, so terminating ones are only a fallback)".to_string()
    } else if let Some(nodes) = ep.node_hints()
        && set.iter().all(|e| e.node_hints().is_some())
    {
        format!("topology: hinted for nodes {nodes:?}, not this node")
    } else if let Some(zones) = ep.zone_hints() {
        format!("topology: hinted for zones {zones:?}, not this node's zone")
    } else {
        "excluded by topology".to_string()
    };
    EndpointVerdict::Excluded(reason)
}
