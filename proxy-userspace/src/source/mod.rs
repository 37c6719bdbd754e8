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
}
