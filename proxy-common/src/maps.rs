//! Map names (equal to their pin names; at most 15 bytes, the kernel's limit) and default sizes.

/// Frontends of IPv4 Services: `Service4Key` → `ServiceValue`.
pub const LB4_SERVICES: &str = "LB4_SERVICES";
/// Frontends of IPv6 Services: `Service6Key` → `ServiceValue`.
pub const LB6_SERVICES: &str = "LB6_SERVICES";
/// Backend slots of every frontend, `SLOT_CHUNK` per entry: `SlotKey` → `SlotChunk`.
pub const LB_SLOTS: &str = "LB_SLOTS";
/// Which backends belong to a frontend: `MemberKey` → `MemberValue`.
pub const LB_MEMBERS: &str = "LB_MEMBERS";
/// Backends by id: `u32` → `BackendValue`.
pub const LB_BACKENDS: &str = "LB_BACKENDS";
/// ClientIP session affinity: `AffinityKey` → `AffinityValue` (LRU).
pub const LB_AFFINITY: &str = "LB_AFFINITY";
/// Reverse translation for IPv4 sockets: `SockRevNat4Key` → `SockRevNat4Value` (LRU).
pub const SOCK4_REVNAT: &str = "SOCK4_REVNAT";
/// Reverse translation for IPv6 sockets: `SockRevNat6Key` → `SockRevNat6Value` (LRU).
pub const SOCK6_REVNAT: &str = "SOCK6_REVNAT";
/// Unconnected sockets' datagram flows: `revnat::DgramFlowKey` (socket cookie, frontend) →
/// `revnat::DgramFlowValue` (its backend) (LRU). Written by the programs at sendmsg.
pub const LB_DGRAM_FLOWS: &str = "LB_DGRAM_FLOWS";
/// Connection tracking of the packet path, IPv4: `Ct4Key` → `Ct4Value` (LRU).
pub const LB_CT4: &str = "LB_CT4";
/// Connection tracking of the packet path, IPv6: `Ct6Key` → `Ct6Value` (LRU).
pub const LB_CT6: &str = "LB_CT6";
/// loadBalancerSourceRanges, IPv4: LPM key over `SrcRange4` → `u8` (1).
pub const LB4_SRC_RANGES: &str = "LB4_SRC_RANGES";
/// loadBalancerSourceRanges, IPv6: LPM key over `SrcRange6` → `u8` (1).
pub const LB6_SRC_RANGES: &str = "LB6_SRC_RANGES";
/// Maglev tables in chunks: `MaglevKey` → `MaglevChunk`.
pub const LB_MAGLEV: &str = "LB_MAGLEV";
/// Round-robin cursors: `u32` frontend id → `u32` next turn. Written by the programs.
pub const LB_RR: &str = "LB_RR";
/// Active connections per backend id (`u32` → `u64`), for least-connection scheduling.
pub const LB_CONNS: &str = "LB_CONNS";
/// Socket-local storage of TCP sockets of least-connection frontends: `backend::SockConn`.
pub const LB_SOCK: &str = "LB_SOCK";
/// Per-CPU counters indexed by `reason::Reason`.
pub const LB_STATS: &str = "LB_STATS";

/// Ports of fragmented IPv4 datagrams by their first fragment: `ct::Frag4Key` →
/// `ct::FragPorts` (LRU). Written by the programs.
pub const LB_FRAG4: &str = "LB_FRAG4";

/// Ports of fragmented IPv6 datagrams by their first fragment: `ct::Frag6Key` →
/// `ct::FragPorts` (LRU). Written by the programs.
pub const LB_FRAG6: &str = "LB_FRAG6";

/// The node's route generation: one `u32` at key 0, bumped by the agent at every change of the
/// node's links, addresses, routes, neighbours, routing rules or forwarding settings. XDP and
/// tc remember the route of a tracked flow per CPU for at most a second, and only within the
/// generation they looked it up in.
pub const LB_ROUTE_GEN: &str = "LB_ROUTE_GEN";

/// Per-CPU drop counters indexed by `reason::Hook::drop_index` (hook × reason).
pub const LB_DROPS: &str = "LB_DROPS";
/// Flow events for `monitor`: a ring buffer of `event::Event`.
pub const LB_EVENTS: &str = "LB_EVENTS";
/// Until when (`bpf_ktime_get_ns`) the programs write events: one `u64` at key 0, renewed
/// by a running `monitor`; 0 when none watches.
pub const LB_MONITOR: &str = "LB_MONITOR";

/// Which Service each frontend belongs to: `u32` frontend id → `info::ServiceInfo`.
pub const LB_SVC_INFO: &str = "LB_SVC_INFO";
/// The agent's own state: one `info::AgentState` at key 0.
pub const LB_AGENT: &str = "LB_AGENT";

/// Runtime switches: one `config::ConfigValue` at key 0.
pub const LB_CONFIG: &str = "LB_CONFIG";

/// Interfaces carrying the tc program and why: `u32` ifindex → `info::IfaceInfo`.
pub const LB_IFACES: &str = "LB_IFACES";

/// Node addresses allowed to send packets carrying the DSR option: `[u8; 4]` IPv4 address →
/// `u8` (1). Written by the agent from the cluster's Node objects.
pub const LB_DSR_PEERS: &str = "LB_DSR_PEERS";
/// New DSR reply entries per client address in the current one-second window:
/// `[u8; 4]` → `dsr::DsrBudget` (LRU). Written by the programs.
pub const LB_DSR_BUDGET: &str = "LB_DSR_BUDGET";
/// `LB_DSR_PEERS` for IPv6: `[u8; 16]` address → `u8` (1).
pub const LB_DSR_PEERS6: &str = "LB_DSR_PEERS6";
/// `LB_DSR_BUDGET` for IPv6 clients, counted per /64 (a host holds a whole /64): `[u8; 8]`
/// prefix → `dsr::DsrBudget` (LRU).
pub const LB_DSR_BUDGET6: &str = "LB_DSR_BUDGET6";

/// Source addresses of network namespaces, for loadBalancerSourceRanges at the socket layer:
/// `u64` netns cookie → `service::NetnsSource`. Written by the agent.
pub const LB_NETNS_SRC: &str = "LB_NETNS_SRC";

/// Pods whose Services are translated per packet at tc instead of at the socket layer (their
/// namespace has socket-layer translation off): `u64` cgroup id of the pod's cgroup → `u32` 1.
/// Key 0 (no cgroup has id 0) holds the bit mask of the cgroup levels those cgroups sit at
/// (bit n: level n, counted from the root) and is present only while the map holds any pod:
/// the socket hooks check the caller's ancestor cgroup at each of those levels, and tc
/// translates ClusterIPs on pod-facing interfaces only while it is present. Written by the
/// agent.
pub const LB_SOCKLB_OFF: &str = "LB_SOCKLB_OFF";

/// The namespaces whose pods are translated per packet, for `services` and `status`: `u32`
/// index → `info::NamespaceInfo`. Written by the agent; the programs never read it.
pub const LB_SOCKLB_NS: &str = "LB_SOCKLB_NS";

/// Each pinned map's layout version: the map's name (NUL-padded to 16 bytes) → `u32`
/// version. Written by the agent after an upgrade (not part of the BPF object; its own layout
/// never changes).
pub const LB_VERSIONS: &str = "LB_VERSIONS";
/// Entries of `LB_VERSIONS`.
pub const VERSIONS_MAX: usize = 64;

/// Every map the agent pins, in the order `cleanup` and `status` list them.
pub const ALL: [&str; 35] = [
    LB4_SERVICES,
    LB6_SERVICES,
    LB_SLOTS,
    LB_MEMBERS,
    LB_BACKENDS,
    LB_AFFINITY,
    SOCK4_REVNAT,
    SOCK6_REVNAT,
    LB_CT4,
    LB_CT6,
    LB4_SRC_RANGES,
    LB6_SRC_RANGES,
    LB_MAGLEV,
    LB_RR,
    LB_CONNS,
    LB_SOCK,
    LB_STATS,
    LB_SVC_INFO,
    LB_AGENT,
    LB_CONFIG,
    LB_IFACES,
    LB_DSR_PEERS,
    LB_DSR_BUDGET,
    LB_NETNS_SRC,
    LB_DROPS,
    LB_EVENTS,
    LB_MONITOR,
    LB_FRAG4,
    LB_FRAG6,
    LB_SOCKLB_OFF,
    LB_SOCKLB_NS,
    LB_DSR_PEERS6,
    LB_DSR_BUDGET6,
    LB_DGRAM_FLOWS,
    LB_ROUTE_GEN,
];

/// Default capacities (entries), chosen so that a node with 100 Services takes well under
/// 32 MiB of map memory: the per-flow LRU maps (conntrack, socket records, affinity) are
/// preallocated, and a hash map's bucket array (16 bytes per entry of capacity) is taken
/// when it is created, however empty. The agent overrides them at load time: the per-flow
/// maps from the node's memory, the others by flag (--max-services, --max-backends,
/// --max-slots) for bigger clusters.
pub const SERVICES_MAX: usize = 65_536;
/// Slots (--max-slots); `LB_SLOTS` holds them in chunks (`slot_chunks_for`).
pub const SLOTS_MAX: usize = 262_144;
/// `LB_SLOTS` entries for the default slots and frontends.
pub const SLOT_CHUNKS_MAX: usize = slot_chunks_for(SLOTS_MAX as u32, SERVICES_MAX as u32) as usize;
pub const MEMBERS_MAX: usize = 262_144;
pub const BACKENDS_MAX: usize = 131_072;
pub const AFFINITY_MAX: usize = 16_384;
pub const SOCK_REVNAT_MAX: usize = 16_384;
pub const CT_MAX: usize = 16_384;
pub const SRC_RANGES_MAX: usize = 65_536;
pub const MAGLEV_CHUNKS_MAX: usize = 65_536;
/// Interfaces the agent attaches tc to (external and pod-facing).
pub const IFACES_MAX: usize = 16_384;
/// Node addresses (every address of every Node object).
pub const DSR_PEERS_MAX: usize = 16_384;
/// Client addresses whose DSR learning is counted at one time (LRU).
pub const DSR_BUDGET_MAX: usize = 16_384;
/// IPv6 client prefixes (/64) whose DSR learning is counted at one time (LRU).
pub const DSR_BUDGET6_MAX: usize = 4_096;
/// Network namespaces on the node (pods, and the host's own).
pub const NETNS_MAX: usize = 16_384;
/// Fragmented datagrams in flight whose later fragments can be translated (LRU).
pub const FRAG_MAX: usize = 4_096;
/// Pods with socket-layer translation off (their pod cgroups), plus the levels entry.
pub const SOCKLB_OFF_MAX: usize = 16_384;
/// Namespaces listed in `LB_SOCKLB_NS`.
pub const SOCKLB_NS_MAX: usize = 4_096;

/// `LB_SLOTS` entries (chunks of `SLOT_CHUNK` slots) that hold `slots` slots however they are
/// spread over up to `frontends` frontends: a frontend of n slots takes n / `SLOT_CHUNK`
/// chunks, rounded up, so at most one chunk more than its share.
pub const fn slot_chunks_for(slots: u32, frontends: u32) -> u32 {
    (slots / crate::service::SLOT_CHUNK as u32).saturating_add(frontends)
}
