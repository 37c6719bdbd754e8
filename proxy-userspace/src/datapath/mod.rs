//! The datapath behind one trait: the BPF maps in the kernel (`bpf`, the only module that
//! touches the kernel) or an in-memory `MapState` for unprivileged tests.

pub mod bpf;
pub mod caps;
pub mod foreign;
pub mod kernel;
pub mod layouts;
pub mod netdev;
pub mod netlink;
pub mod netns;
pub mod nfct;
pub mod podif;
pub mod resize;
pub mod sockdiag;
pub mod socklb;
pub mod tclinks;

/// A backend that stopped being eligible for a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removed {
    pub proto: u8,
    pub svc_id: u32,
    pub backend_id: u32,
    pub backend: proxy_common::backend::BackendValue,
}

use crate::{
    capacity::Capacity,
    plan::{MapState, Op},
};

/// Reads and writes the maps the agent owns.
/// `Send`: the agent writes a large sync from a second thread while it plans the next group.
pub trait MapIo: Send {
    /// Reads everything back (at start-up, to adopt what an earlier agent left).
    fn dump(&self) -> anyhow::Result<MapState>;
    /// Performs one write. Deleting a missing key is not an error.
    fn apply(&mut self, op: &Op) -> anyhow::Result<()>;
    /// Performs a run of writes of one kind (`Op::batch_kind`) in order, as `apply` would one
    /// by one; the kernel datapath makes one batch syscall of them. On an error, some of the
    /// run may be written.
    fn apply_run(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        ops.iter().try_for_each(|op| self.apply(op))
    }
    /// Told after every sync attempt (the kernel datapath records it for `status`).
    fn synced(&mut self, _ok: bool) {}
    /// Terminates the sockets still connected to backends that left a frontend (`removed`:
    /// frontend protocol, backend, frontend id). `None` when this datapath cannot.
    fn terminate(&mut self, _removed: &[Removed]) -> Option<sockdiag::Report> {
        None
    }
    /// Deletes the connection-tracking entries of the tc path's UDP flows to backends that
    /// left a frontend (kube-proxy's conntrack cleanup, semantics 9.2). Returns the number
    /// deleted per family (4, 6).
    fn forget_flows(&mut self, _removed: &[Removed]) -> anyhow::Result<Vec<(u8, u64)>> {
        Ok(Vec::new())
    }
    /// Deletes the ClientIP affinity entries of `retired` (Service-port id, backend id) pairs
    /// (`SyncReport::retired_affinity`). Returns how many were deleted.
    fn forget_affinity(&mut self, _retired: &[(u32, u32)]) -> anyhow::Result<u64> {
        Ok(0)
    }
    /// The maps' capacities; `None` means unlimited (in-memory tests).
    fn capacity(&self) -> Option<Capacity> {
        None
    }
}

impl MapIo for MapState {
    fn dump(&self) -> anyhow::Result<MapState> {
        Ok(self.clone())
    }
    fn apply(&mut self, op: &Op) -> anyhow::Result<()> {
        MapState::apply(self, op);
        Ok(())
    }
}
