//! What the datapath does not need but operators do: which Service each frontend belongs to,
//! and the agent's own state. Written by the agent, read by the inspection CLI; the programs
//! never touch these maps.

use crate::pod;

/// Value of `LB_SVC_INFO`, keyed by `ServiceValue::id`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `ServiceValue::port_id` of the frontend.
    pub port_id: u32,
    /// `KIND_*`: where the frontend comes from.
    pub kind: u8,
    /// `INFO_*` policy bits of the Service.
    pub flags: u8,
    /// Length of the used part of `name`.
    pub name_len: u16,
    /// `namespace/name:port/PROTOCOL` of the Service port, UTF-8, zero-padded.
    pub name: [u8; 248],
}

pub const KIND_CLUSTER_IP: u8 = 1;
pub const KIND_EXTERNAL_IP: u8 = 2;
pub const KIND_LOAD_BALANCER: u8 = 3;
pub const KIND_NODE_PORT: u8 = 4;

/// internalTrafficPolicy: Local.
pub const INFO_ITP_LOCAL: u8 = 1 << 0;
/// externalTrafficPolicy: Local.
pub const INFO_ETP_LOCAL: u8 = 1 << 1;

impl ServiceInfo {
    pub fn name(&self) -> &str {
        let len = (self.name_len as usize).min(self.name.len());
        core::str::from_utf8(&self.name[..len]).unwrap_or("?")
    }
}

/// The single value of `LB_AGENT` (key 0).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AgentState {
    /// Wall-clock time of the last successful sync, milliseconds since the Unix epoch.
    pub last_sync_unix_ms: u64,
    /// Successful syncs since the agent started.
    pub syncs: u64,
    /// Failed syncs since the agent started.
    pub sync_failures: u64,
    /// Process id of the agent that wrote this.
    pub pid: u32,
    /// Length of the used part of `version`.
    pub version_len: u32,
    /// Agent version, UTF-8, zero-padded.
    pub version: [u8; 32],
}

/// Value of `LB_IFACES`, keyed by interface index: an interface the agent attached the tc
/// program to, and why. Written by the agent when it attaches or detaches; read by `status`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct IfaceInfo {
    /// Interface index the link was made on (a recreated interface gets a new one).
    pub ifindex: u32,
    /// `IFACE_*`: why the interface carries the program.
    pub why: u8,
    /// Family of `addr`: 4, 6, or 0 when `addr` is unused.
    pub family: u8,
    /// Prefix length of `addr` (`IFACE_POD_CIDR`), or the full length for one address.
    pub prefix_len: u8,
    /// Length of the used part of `name`.
    pub name_len: u8,
    /// Interface name, zero-padded.
    pub name: [u8; 16],
    /// The pod address (`IFACE_POD_ROUTE`) or pod CIDR (`IFACE_POD_CIDR`) whose route leaves
    /// here, in network order (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// For `IFACE_BRIDGE`: the name of the bridge port that led here, zero-padded.
    pub via: [u8; 16],
}

/// Where traffic from outside the node arrives (`--external-interfaces`).
pub const IFACE_EXTERNAL: u8 = 1;
/// The kernel's route to a local endpoint leaves here.
pub const IFACE_POD_ROUTE: u8 = 2;
/// The kernel's route to the node's pod CIDR leaves here.
pub const IFACE_POD_CIDR: u8 = 3;
/// Its name matches a `--pod-interfaces` pattern.
pub const IFACE_PATTERN: u8 = 4;
/// Named in `--pod-interfaces`.
pub const IFACE_NAMED: u8 = 5;
/// A bridge one of whose ports was selected (by route or pattern): the bridge carries the
/// program for it.
pub const IFACE_BRIDGE: u8 = 6;
/// Carried the program under the previous agent; kept until this agent has read which
/// endpoints are local (so a restart never leaves local backends' replies untranslated).
pub const IFACE_KEPT: u8 = 7;
/// The kernel's route to endpoints on other nodes leaves here through a device of its own (an
/// overlay's tunnel, such as flannel's `flannel.1`): masqueraded flows to them leave, and their
/// replies come back, here. Traffic arriving here is treated as coming from outside.
pub const IFACE_REMOTE_ROUTE: u8 = 8;
/// A flag on `IfaceInfo::why`, beside the reason: the device has no link-layer header (ipip,
/// sit, ip6tnl, WireGuard, tun): it carries `tc_ingress_l3`, and packets forwarded to it are
/// sent through the kernel's route (`bpf_redirect_neigh` without a next hop), which a tunnel
/// without a fixed remote end (Calico's `tunl0`) reads its destination from.
pub const IFACE_NO_LINK_HEADER: u8 = 0x80;

impl IfaceInfo {
    /// The `IFACE_*` reason, without the `IFACE_NO_LINK_HEADER` flag.
    pub fn reason(&self) -> u8 {
        self.why & !IFACE_NO_LINK_HEADER
    }

    /// Whether the device has no link-layer header (`IFACE_NO_LINK_HEADER`).
    pub fn no_link_header(&self) -> bool {
        self.why & IFACE_NO_LINK_HEADER != 0
    }
}

/// Value of `LB_SOCKLB_NS`, keyed by a running index from 0: a namespace whose pods are
/// translated per packet (socket-layer translation off), and how many of its pods on this node
/// the socket hooks know (their cgroups found). Written by the agent, read by `services` and
/// `status`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub pods: u32,
    /// Length of the used part of `name`.
    pub name_len: u32,
    /// Namespace name (at most 63 bytes, a DNS label), zero-padded.
    pub name: [u8; 64],
}

impl NamespaceInfo {
    pub fn name(&self) -> &str {
        let len = (self.name_len as usize).min(self.name.len());
        core::str::from_utf8(&self.name[..len]).unwrap_or("?")
    }
}

pod!(ServiceInfo, AgentState, IfaceInfo, NamespaceInfo);
