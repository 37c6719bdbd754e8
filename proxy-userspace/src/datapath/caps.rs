//! Dropping privileges once the datapath is loaded: the agent keeps only CAP_BPF (map reads and
//! writes go through bpf(2), which needs it when unprivileged BPF is disabled) and CAP_NET_ADMIN
//! (sock_diag socket termination). Capabilities are per thread, so this must run before the
//! agent starts its threads.

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the agent keeps.
pub const KEPT: &[Capability] = &[Capability::CAP_BPF, Capability::CAP_NET_ADMIN];

/// What the socket-termination and network-namespace threads keep: entering other network
/// namespaces needs CAP_SYS_ADMIN, opening other users' /proc/PID/ns/net needs CAP_SYS_PTRACE.
pub const TERMINATOR: &[Capability] = &[
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
];

/// Drops every capability but `KEPT` from the bounding set and the calling thread's sets.
pub fn drop_to_kept() -> std::io::Result<()> {
    drop_to(KEPT)
}

/// Drops every capability but those in `keep` from the bounding set and the calling thread's
/// effective, permitted and inheritable sets.
pub fn drop_to(keep: &[Capability]) -> std::io::Result<()> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    let fail = |e: caps::errors::CapsError| std::io::Error::other(e.to_string());
    for cap in caps::all() {
        if !keep.contains(&cap) {
            // Already dropped, or unknown to this kernel: nothing to do.
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(fail)?;
    // Effective first: it must stay within the permitted set at every step.
    let effective = caps::read(None, CapSet::Effective).map_err(fail)?;
    caps::set(
        None,
        CapSet::Effective,
        &effective.intersection(&keep).copied().collect(),
    )
    .map_err(fail)?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(fail)?;
    caps::set(
        None,
        CapSet::Permitted,
        &permitted.intersection(&keep).copied().collect(),
    )
    .map_err(fail)?;
    Ok(())
}
