//! Every map of the datapath. Keys and values are defined in proxy-common; userspace writes the
//! LB_* maps, the programs write affinity and reverse-translation entries and counters.

use aya_ebpf::{
    bindings::bpf_redir_neigh,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SkStorage},
    macros::btf_map,
};
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::{BackendValue, SockConn},
    config::ConfigValue,
    ct::{Ct4Key, Ct4Value, Ct6Key, Ct6Value, Frag4Key, Frag6Key, FragPorts},
    dsr::DsrBudget,
    event::{EVENTS_BYTES, Event},
    info::{AgentState, IfaceInfo, NamespaceInfo, ServiceInfo},
    maglev::{MaglevChunk, MaglevKey},
    maps::*,
    reason::{DROPS_COUNT, REASON_COUNT},
    revnat::{
        DgramFlowKey, DgramFlowValue, SockRevNat4Key, SockRevNat4Value, SockRevNat6Key,
        SockRevNat6Value,
    },
    service::{
        MemberKey, MemberValue, NetnsSource, Service4Key, Service6Key, ServiceValue, SlotChunk,
        SlotKey, SrcRange4, SrcRange6,
    },
};

/// Hash maps written by userspace allocate entries on demand: they are sized for the largest
/// cluster but usually hold far fewer entries.
const NO_PREALLOC: usize = 1;

/// Frontends, IPv4. Written by the agent; read at connect4/sendmsg4.
#[btf_map]
pub static LB4_SERVICES: HashMap<Service4Key, ServiceValue, SERVICES_MAX, NO_PREALLOC> =
    HashMap::new();

/// Frontends, IPv6. Written by the agent; read at connect6/sendmsg6.
#[btf_map]
pub static LB6_SERVICES: HashMap<Service6Key, ServiceValue, SERVICES_MAX, NO_PREALLOC> =
    HashMap::new();

/// Backend slots of both generations of every frontend, `SLOT_CHUNK` per entry. Written by
/// the agent.
#[btf_map]
pub static LB_SLOTS: HashMap<SlotKey, SlotChunk, SLOT_CHUNKS_MAX, NO_PREALLOC> = HashMap::new();

/// (frontend, backend) pairs of serving endpoints: with slots, those new flows may use
/// (affinity checks its entries against them); without, those only flows already on them keep.
#[btf_map]
pub static LB_MEMBERS: HashMap<MemberKey, MemberValue, MEMBERS_MAX, NO_PREALLOC> = HashMap::new();

/// Backends by id. Written by the agent.
#[btf_map]
pub static LB_BACKENDS: HashMap<u32, BackendValue, BACKENDS_MAX, NO_PREALLOC> = HashMap::new();

/// Session affinity, written by the programs on each new connection of an affinity Service;
/// and, under `CLIENT_HAIRPIN`, the socket layer's choice for a pod's connection to itself,
/// which it leaves to tc (`lb::remember_hairpin`). LRU: an entry past its timeout is dead
/// anyway, so evicting the oldest is always safe.
#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue, AFFINITY_MAX> = LruHashMap::new();

/// Reverse translation for IPv4 sockets. LRU: entries of closed sockets age out.
#[btf_map]
pub static SOCK4_REVNAT: LruHashMap<SockRevNat4Key, SockRevNat4Value, SOCK_REVNAT_MAX> =
    LruHashMap::new();

/// Reverse translation for IPv6 sockets. LRU as above.
#[btf_map]
pub static SOCK6_REVNAT: LruHashMap<SockRevNat6Key, SockRevNat6Value, SOCK_REVNAT_MAX> =
    LruHashMap::new();

/// The backend of each unconnected socket's datagrams to each frontend, written at sendmsg:
/// later datagrams of the same socket to the same frontend go to the same backend while it
/// still serves and the flow is not idle for longer than `dgram_flow_timeout_ns`. LRU: entries
/// of closed sockets age out (socket cookies are never reused).
#[btf_map]
pub static LB_DGRAM_FLOWS: LruHashMap<DgramFlowKey, DgramFlowValue, SOCK_REVNAT_MAX> =
    LruHashMap::new();

/// Whether the agent set runtime switch `flag` (`config::CONFIG_*`) in `LB_CONFIG`.
#[inline(always)]
pub fn config_flag(flag: u32) -> bool {
    LB_CONFIG.get(0).is_some_and(|c| c.flags & flag != 0)
}

/// Whether the agent recorded interface `ifindex` as a device without a link-layer header
/// (`IFACE_NO_LINK_HEADER` in `LB_IFACES`): a packet sent into it goes through the kernel's
/// route rather than to a next hop (`bpf_redirect_neigh` without parameters), as a tunnel
/// without a fixed remote end (Calico's ipip `tunl0`) reads the remote end from the route and
/// drops a packet that has none.
#[inline(always)]
pub fn no_link_header(ifindex: u32) -> bool {
    // SAFETY: a map lookup whose value is read at once.
    unsafe { LB_IFACES.get(&ifindex) }.is_some_and(|i| i.no_link_header())
}

/// Idle time after which an unconnected socket's datagrams to a frontend are balanced afresh,
/// in nanoseconds: the agent sets it at load from `--conntrack-udp-timeout` (a read-only
/// global; this default is that flag's).
#[unsafe(no_mangle)]
static DGRAM_FLOW_TIMEOUT_NS: u64 = 120_000_000_000;

/// `DGRAM_FLOW_TIMEOUT_NS` as loaded.
#[inline(always)]
pub fn dgram_flow_timeout_ns() -> u64 {
    // SAFETY: a read of a global of the object; volatile so that the compiler does not fold
    // in the default the loader overrides.
    unsafe { core::ptr::read_volatile(&raw const DGRAM_FLOW_TIMEOUT_NS) }
}

/// Nonzero once a flow to a backend on this node's own address (`CT_HOST`) was started or
/// seen since the programs were loaded: until then `tc_egress` passes every packet at once.
#[unsafe(no_mangle)]
static mut HOST_FLOWS: u32 = 0;

/// Whether `tc_egress` has replies to translate (`HOST_FLOWS`).
#[inline(always)]
pub fn host_flows() -> bool {
    // SAFETY: a read of a global of the object (its .bss map's value).
    unsafe { core::ptr::read_volatile(&raw const HOST_FLOWS) != 0 }
}

/// Records that a `CT_HOST` flow exists (`HOST_FLOWS`); a racing write writes the same value.
#[inline(always)]
pub fn saw_host_flow() {
    // SAFETY: a write of a global of the object (its .bss map's value).
    unsafe { core::ptr::write_volatile(&raw mut HOST_FLOWS, 1) }
}

/// Connection tracking of the tc path, IPv4. Written by the programs, expired by the agent.
/// LRU: when full, the least recently used flow is forgotten rather than a new one refused.
#[btf_map]
pub static LB_CT4: LruHashMap<Ct4Key, Ct4Value, CT_MAX> = LruHashMap::new();

/// Connection tracking of the tc path, IPv6.
#[btf_map]
pub static LB_CT6: LruHashMap<Ct6Key, Ct6Value, CT_MAX> = LruHashMap::new();

/// loadBalancerSourceRanges per frontend, IPv4. Written by the agent.
#[btf_map]
pub static LB4_SRC_RANGES: LpmTrie<SrcRange4, u8, SRC_RANGES_MAX> = LpmTrie::new();

/// loadBalancerSourceRanges per frontend, IPv6.
#[btf_map]
pub static LB6_SRC_RANGES: LpmTrie<SrcRange6, u8, SRC_RANGES_MAX> = LpmTrie::new();

/// Maglev tables of the frontends using that scheduler. Written by the agent.
#[btf_map]
pub static LB_MAGLEV: HashMap<MaglevKey, MaglevChunk, MAGLEV_CHUNKS_MAX, NO_PREALLOC> =
    HashMap::new();

/// Round-robin cursors per frontend id, advanced at each new connection of a round-robin
/// frontend. Unlocked: two connects racing on two CPUs may take the same turn.
#[btf_map]
pub static LB_RR: HashMap<u32, u32, SERVICES_MAX, NO_PREALLOC> = HashMap::new();

/// Active connections per backend id. Incremented at connect() of a TCP socket to a
/// least-connection frontend, decremented when that socket is released; atomic adds only.
#[btf_map]
pub static LB_CONNS: Array<u64, BACKENDS_MAX> = Array::new();

/// Which backend a counted socket's connection is counted against.
#[btf_map]
pub static LB_SOCK: SkStorage<SockConn> = SkStorage::new();

/// Counters per `Reason`, per CPU.
#[btf_map]
pub static LB_STATS: PerCpuArray<u64, { REASON_COUNT as usize }> = PerCpuArray::new();

/// Ports of fragmented IPv4 datagrams, remembered from their first fragment for the later
/// ones (which carry none). LRU: a datagram's fragments arrive within moments.
#[btf_map]
pub static LB_FRAG4: LruHashMap<Frag4Key, FragPorts, FRAG_MAX> = LruHashMap::new();

/// Ports of fragmented IPv6 datagrams, as `LB_FRAG4`.
#[btf_map]
pub static LB_FRAG6: LruHashMap<Frag6Key, FragPorts, FRAG_MAX> = LruHashMap::new();

/// Drop counters per hook and reason (`Hook::drop_index`), per CPU.
#[btf_map]
pub static LB_DROPS: PerCpuArray<u64, { DROPS_COUNT as usize }> = PerCpuArray::new();

/// Per-CPU scratch space of a new flow at XDP, between its two halves (the backend's choice,
/// then the translation and transmission): they run one after the other from the hook, so their
/// stack frames never add up to the verifier's 512 bytes per call chain. Not pinned: it holds
/// nothing between packets.
#[btf_map]
pub static XDP_SCRATCH: PerCpuArray<[u64; XDP_SCRATCH_WORDS], 1> = PerCpuArray::new();

/// Size of an `XDP_SCRATCH` value, in 8-byte words.
pub const XDP_SCRATCH_WORDS: usize = 48;

/// Per-CPU scratch space of a new DSR flow at tc: what its option says, from the translation
/// (`nodeport::new_flow`) to the option's insertion, which runs after it from `start` so the
/// two frames never add up. Not pinned: it holds nothing between packets.
#[btf_map]
pub static TC_DSR_SCRATCH: PerCpuArray<[u64; TC_DSR_SCRATCH_WORDS], 1> = PerCpuArray::new();

/// Size of a `TC_DSR_SCRATCH` value, in 8-byte words.
pub const TC_DSR_SCRATCH_WORDS: usize = 5;

/// Per-CPU scratch space for two conntrack keys (`flow::ct::take_over_closed`), whose
/// lookups run at the bottom of the new-flow call chains, where no stack is left. Not pinned:
/// it holds nothing between packets.
#[btf_map]
pub static CT_KEY_SCRATCH: PerCpuArray<[u64; CT_KEY_SCRATCH_WORDS], 1> = PerCpuArray::new();

/// Size of a `CT_KEY_SCRATCH` value, in 8-byte words: two IPv6 conntrack keys.
pub const CT_KEY_SCRATCH_WORDS: usize = 10;

/// Per-CPU scratch space for a masquerading port claim (`flow::nat::claim_ports`): the
/// translated tuple and the reply entry a global BPF function, whose arguments can only be
/// scalars, works on. Not pinned: it holds nothing between packets.
#[btf_map]
pub static CLAIM_SCRATCH: PerCpuArray<[u64; CLAIM_SCRATCH_WORDS], 1> = PerCpuArray::new();

/// Size of a `CLAIM_SCRATCH` value, in 8-byte words: an IPv6 tuple, conntrack key and value.
pub const CLAIM_SCRATCH_WORDS: usize = 19;

/// Flow events for `kube-bpf-proxy monitor`, written only while `LB_MONITOR`'s deadline runs.
#[btf_map]
pub static LB_EVENTS: RingBuf<Event, EVENTS_BYTES> = RingBuf::new();

/// Until when (`bpf_ktime_get_ns`) a monitor watches; 0: nobody. Written by `monitor`.
#[btf_map]
pub static LB_MONITOR: Array<u64, 1> = Array::new();

/// Which Service each frontend belongs to, for inspection only (no program reads it). Defined
/// here so it is created and pinned with the others.
#[btf_map]
pub static LB_SVC_INFO: HashMap<u32, ServiceInfo, SERVICES_MAX, NO_PREALLOC> = HashMap::new();

/// The agent's own state, for inspection only.
#[btf_map]
pub static LB_AGENT: Array<AgentState, 1> = Array::new();

/// Runtime switches (`config::CONFIG_*`), read by every hook.
#[btf_map]
pub static LB_CONFIG: Array<ConfigValue, 1> = Array::new();

/// Interfaces carrying the tc program and why, for inspection only: ifindex → `IfaceInfo`.
/// Written by the agent as it attaches and detaches.
#[btf_map]
pub static LB_IFACES: HashMap<u32, IfaceInfo, IFACES_MAX, NO_PREALLOC> = HashMap::new();

/// Node addresses allowed to send packets with the DSR option (IPv4, network order → 1).
/// Written by the agent from the cluster's Node objects; read by `dsr::learn4`.
#[btf_map]
pub static LB_DSR_PEERS: HashMap<[u8; 4], u8, DSR_PEERS_MAX, NO_PREALLOC> = HashMap::new();

/// New DSR reply entries per client address in the current window, written by `dsr::learn4`.
/// LRU: a client not seen for long loses its window, which only resets its count.
#[btf_map]
pub static LB_DSR_BUDGET: LruHashMap<[u8; 4], DsrBudget, DSR_BUDGET_MAX> = LruHashMap::new();

/// `LB_DSR_PEERS` for IPv6. Read by `dsr::learn6`.
#[btf_map]
pub static LB_DSR_PEERS6: HashMap<[u8; 16], u8, DSR_PEERS_MAX, NO_PREALLOC> = HashMap::new();

/// `LB_DSR_BUDGET` for IPv6 clients, per /64 prefix (a host can use any address of its /64).
#[btf_map]
pub static LB_DSR_BUDGET6: LruHashMap<[u8; 8], DsrBudget, DSR_BUDGET6_MAX> = LruHashMap::new();

/// Source addresses of network namespaces, by netns cookie: what an unbound socket of a pod (or
/// of the host) connects from, for loadBalancerSourceRanges at the socket layer. Written by the
/// agent as namespaces come and go.
#[btf_map]
pub static LB_NETNS_SRC: HashMap<u64, NetnsSource, NETNS_MAX, NO_PREALLOC> = HashMap::new();

/// Pods with socket-layer translation off, by pod cgroup id; key 0 holds the levels those
/// cgroups sit at (`maps::LB_SOCKLB_OFF`). Written by the agent; read at the socket hooks and
/// by tc for new flows on pod-facing interfaces.
#[btf_map]
pub static LB_SOCKLB_OFF: HashMap<u64, u32, SOCKLB_OFF_MAX, NO_PREALLOC> = HashMap::new();

/// The namespaces translated per packet, for `services` and `status` (`maps::LB_SOCKLB_NS`).
/// Written by the agent; no program reads it.
#[btf_map]
pub static LB_SOCKLB_NS: HashMap<u32, NamespaceInfo, SOCKLB_NS_MAX, NO_PREALLOC> = HashMap::new();

/// The node's route generation (`maps::LB_ROUTE_GEN`), bumped by the agent at every change of
/// its links, addresses, routes or neighbours.
#[btf_map]
pub static LB_ROUTE_GEN: Array<u32, 1> = Array::new();

/// What identifies a remembered next hop (`flow::hops`): the translated tuple and the interface
/// its packets arrived on, with the route generation and clock of the FIB lookup. All zero:
/// empty.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct SlotHead<A> {
    pub saddr: A,
    pub daddr: A,
    /// Source and destination ports, as `(sport << 16) | dport`.
    pub ports: u32,
    pub proto: u32,
    /// The interface the flow's packets arrive on.
    pub here: u32,
    pub generation: u32,
    pub looked_up_ns: u64,
}

/// A next hop remembered at XDP: the FIB's egress interface and MAC addresses.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct HopSlot<A> {
    pub head: SlotHead<A>,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// A next hop remembered at tc: the FIB's egress interface, its MTU, and the next hop's
/// address for `bpf_redirect_neigh`.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct TcHopSlot<A> {
    pub head: SlotHead<A>,
    pub ifindex: u32,
    pub mtu: u32,
    pub nh: bpf_redir_neigh,
}

/// Slots of each CPU's next-hop cache (a power of two: a flow's slot is its hash's low bits).
pub const HOP_SLOTS: u32 = 256;

/// Each CPU's remembered next hops of IPv4 flows at XDP, direct-mapped by the flow's hash. Not
/// pinned: a cache, empty after a reload.
#[btf_map]
pub static HOP_CACHE4: PerCpuArray<HopSlot<[u8; 4]>, { HOP_SLOTS as usize }> = PerCpuArray::new();

/// `HOP_CACHE4` for IPv6 flows.
#[btf_map]
pub static HOP_CACHE6: PerCpuArray<HopSlot<[u8; 16]>, { HOP_SLOTS as usize }> = PerCpuArray::new();

/// Each CPU's remembered next hops of IPv4 flows at tc (`HOP_CACHE4` for tc).
#[btf_map]
pub static TC_HOP_CACHE4: PerCpuArray<TcHopSlot<[u8; 4]>, { HOP_SLOTS as usize }> =
    PerCpuArray::new();

/// `TC_HOP_CACHE4` for IPv6 flows.
#[btf_map]
pub static TC_HOP_CACHE6: PerCpuArray<TcHopSlot<[u8; 16]>, { HOP_SLOTS as usize }> =
    PerCpuArray::new();
