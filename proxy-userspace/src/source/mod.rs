//! Where cluster objects come from. Every source delivers whole `Snapshot`s on a channel, so the
//! agent cannot tell them apart.

pub mod kube;
pub mod manifests;

use std::sync::mpsc::Sender;

use crate::snapshot::Snapshot;

/// A source of snapshots, run on its own thread until the receiver goes away.
pub trait Source: Send + 'static {
    /// Short name for logs ("manifests", "kubernetes").
    fn name(&self) -> String;
    /// Sends a snapshot whenever the objects change (and one at start). Returns when the
    /// receiver is dropped, or with an error the source cannot recover from.
    fn run(self: Box<Self>, tx: Sender<Snapshot>) -> anyhow::Result<()>;
    /// Where the agent of node `node` posts its Kubernetes Events (`crate::events`): nowhere
    /// unless the source has an API server.
    fn events(&self, node: &str) -> anyhow::Result<crate::events::Events> {
        Ok(crate::events::Events::off(node))
    }
}

/// The addresses of every Node object of the cluster (`status.addresses` of type InternalIP
/// and ExternalIP), as a source last saw them: the nodes allowed to send this node packets
/// carrying the DSR option (`LB_DSR_PEERS`). Filled by a source only when asked to
/// (`--nodeport-mode dsr`), read by the agent's DSR peer thread.
#[derive(Debug, Default)]
pub struct NodeAddresses {
    addresses: std::sync::Mutex<std::collections::BTreeSet<std::net::IpAddr>>,
    /// Bumped at every change; 0 until a source has set the addresses once.
    generation: std::sync::atomic::AtomicU64,
}

impl NodeAddresses {
    /// Replaces the addresses; a no-op (no new generation) when they are unchanged.
    pub fn set(&self, now: std::collections::BTreeSet<std::net::IpAddr>) {
        use std::sync::atomic::Ordering;
        let mut addresses = self.addresses.lock().expect("node addresses lock");
        if *addresses != now || self.generation.load(Ordering::Acquire) == 0 {
            *addresses = now;
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// (generation, addresses); generation 0: not known yet.
    pub fn get(&self) -> (u64, std::collections::BTreeSet<std::net::IpAddr>) {
        let addresses = self.addresses.lock().expect("node addresses lock");
        (
            self.generation.load(std::sync::atomic::Ordering::Acquire),
            addresses.clone(),
        )
    }
}

/// The InternalIP and ExternalIP addresses of `node` (unparsable ones left out).
pub fn addresses_of(
    node: &k8s_openapi::api::core::v1::Node,
) -> impl Iterator<Item = std::net::IpAddr> + '_ {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.trim().parse().ok())
}
