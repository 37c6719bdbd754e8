//! Runtime switches the agent or the CLI flips without reloading the programs.

use crate::pod;

/// The single value of `LB_CONFIG` (key 0).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigValue {
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Entries of every Maglev table (a prime); 0 until the agent sets it.
    pub maglev_size: u32,
}

/// Log every translation and rejection from the BPF programs (aya-log). Costs ~20 us per
/// connection, so it is off unless an operator turns it on (`kube-bpf-proxy debug-log on`).
pub const CONFIG_DEBUG_LOG: u32 = 1 << 0;

pod!(ConfigValue);

/// Set by the agent while it terminates sockets of removed backends (the kernel supports
/// SOCK_DESTROY and termination is not turned off); read by `status`. The programs ignore it.
pub const CONFIG_SOCKET_TERMINATION: u32 = 1 << 1;

/// NodePort mode DSR (`--nodeport-mode dsr`): IPv4 flows to backends on other nodes are not
/// masqueraded; the backend's node answers the client directly.
pub const CONFIG_DSR: u32 = 1 << 2;
