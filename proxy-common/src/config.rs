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
    /// First source port masquerading may use (`--masquerade-port-range`), host byte order;
    /// with `snat_port_max` 0 until the agent sets them, and then `SNAT_PORT_MIN_DEFAULT` ..=
    /// `SNAT_PORT_MAX_DEFAULT` apply.
    pub snat_port_min: u16,
    /// Last source port masquerading may use (inclusive), host byte order.
    pub snat_port_max: u16,
    /// New DSR reply entries one client address may make this node learn per second
    /// (`DSR_BUDGET_DEFAULT` while 0).
    pub dsr_budget: u32,
}

/// Masquerading ports until the agent writes its range: above Linux's default ephemeral
/// range (`net.ipv4.ip_local_port_range` 32768-60999), so a masqueraded flow never takes the
/// tuple of a socket of the node itself.
pub const SNAT_PORT_MIN_DEFAULT: u16 = 61000;
pub const SNAT_PORT_MAX_DEFAULT: u16 = 65535;

/// New DSR reply entries per client address and second until the agent sets its own.
pub const DSR_BUDGET_DEFAULT: u32 = 1000;

/// Log every translation and rejection from the BPF programs (aya-log). Costs ~20 us per
/// connection, so it is off unless an operator turns it on (`kube-bpf-proxy debug-log on`).
pub const CONFIG_DEBUG_LOG: u32 = 1 << 0;

pod!(ConfigValue);

/// Set by the agent while it terminates sockets of removed backends (the kernel supports
/// SOCK_DESTROY and termination is not turned off); read by `status`. The programs ignore it.
pub const CONFIG_SOCKET_TERMINATION: u32 = 1 << 1;

/// NodePort mode DSR (`--nodeport-mode dsr`): IPv4 flows to backends on other nodes are not
/// masqueraded; the backend's node answers the client directly. Also the only mode in which
/// this node learns reply entries from the DSR option of arriving packets.
pub const CONFIG_DSR: u32 = 1 << 2;

/// `--masquerade-all` (kube-proxy's): every new flow tc translates to a ClusterIP (the pods',
/// which then reach tc untranslated) is masqueraded to the node address on the way to the
/// backend (semantics 7.12).
pub const CONFIG_MASQUERADE_ALL: u32 = 1 << 3;

/// Set by an agent that does not read endpoints' node hints (`featureGates:
/// {PreferSameTrafficDistribution: false}`), so that `verify` and `explain` compile as it
/// does. The programs ignore it.
pub const CONFIG_NO_NODE_HINTS: u32 = 1 << 4;
