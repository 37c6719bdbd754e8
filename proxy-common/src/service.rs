//! Service frontends and their backend slots.
//!
//! A frontend is one (address, port, protocol) a client can reach. Its `ServiceValue` names the
//! generation of slots currently in use (`rev & 1`) and how many there are. Userspace never edits
//! the live generation: it writes the other one, flips `rev`/`count` in one map update, then
//! deletes the old slots, so a connecting socket never sees a half-written backend set.

use crate::pod;

/// Key of `LB4_SERVICES`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Service4Key {
    /// Frontend address, network byte order.
    pub addr: [u8; 4],
    /// Frontend port, host byte order.
    pub port: u16,
    /// IANA protocol number (`proto::TCP`, `UDP`, `SCTP`).
    pub proto: u8,
    /// `SCOPE_*`: which traffic class this entry serves.
    pub scope: u8,
}

/// Key of `LB6_SERVICES`; fields as in `Service4Key`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Service6Key {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// Traffic from this node (pods and host processes) at the socket hooks.
pub const SCOPE_INTERNAL: u8 = 0;
/// Packets arriving at the node (tc): NodePorts, externalIPs and load balancer IPs reached from
/// outside (semantics 4.1).
pub const SCOPE_EXTERNAL: u8 = 1;

/// Value of `LB4_SERVICES` and `LB6_SERVICES`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Frontend id: keys this frontend's slots and members. Stable across agent restarts.
    pub id: u32,
    /// Service-port id (namespace/name/port/protocol/family): the scope of session affinity,
    /// shared by every frontend of that Service port (semantics 6.2).
    pub port_id: u32,
    /// Revision, bumped on every change of the backend set; slots are read at generation
    /// `rev & 1`.
    pub rev: u32,
    /// ClientIP affinity timeout in seconds; meaningful with `FLAG_AFFINITY`.
    pub affinity_timeout_secs: u32,
    /// Number of slots in the live generation; 0 means no usable backend.
    pub count: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
}

/// Session affinity ClientIP is on.
pub const FLAG_AFFINITY: u16 = 1 << 0;
/// With no slots: the Service has endpoints but none this traffic class may use
/// (internalTrafficPolicy Local without local endpoints): drop instead of reject (semantics 3.8).
pub const FLAG_NO_LOCAL: u16 = 1 << 1;
/// Masquerade the client to a node address (externalTrafficPolicy Cluster, semantics 7.13).
pub const FLAG_SNAT: u16 = 1 << 2;
/// Only sources in `LB4_SRC_RANGES`/`LB6_SRC_RANGES` under this frontend's id may connect
/// (loadBalancerSourceRanges, semantics 7.8).
pub const FLAG_SOURCE_RANGES: u16 = 1 << 3;
/// Pick backends by the frontend's Maglev table (`LB_MAGLEV`) instead of a random slot.
pub const FLAG_MAGLEV: u16 = 1 << 4;
/// Take the slots in turn (`LB_RR` holds the frontend's cursor): round-robin, weighted when the
/// slots repeat backends by weight.
pub const FLAG_ROUND_ROBIN: u16 = 1 << 5;
/// Pick the slot by a hash of the client (its network namespace at the socket layer, its
/// address at tc/XDP): stateless persistence.
pub const FLAG_SOURCE_HASH: u16 = 1 << 6;
/// Pick the backend with the fewest active connections (`LB_CONNS`), counted by the datapath.
pub const FLAG_LEAST_CONN: u16 = 1 << 7;
/// With `FLAG_LEAST_CONN`: connections relative to the backend's weight.
pub const FLAG_WEIGHTED: u16 = 1 << 8;
/// With `FLAG_LEAST_CONN`: shortest expected delay (IPVS `sed`), each backend's load counted
/// as its connections plus the one about to come, `(C + 1) / W`: a lighter backend with a
/// higher weight wins where plain weighted least-connection (`C / W`) would tie at zero.
pub const FLAG_SED: u16 = 1 << 9;
/// With `FLAG_SED`: never queue (IPVS `nq`): a backend with no active connection is taken at
/// once; shortest expected delay decides only when every backend is busy.
pub const FLAG_NEVER_QUEUE: u16 = 1 << 10;

impl ServiceValue {
    pub const fn has_affinity(&self) -> bool {
        self.flags & FLAG_AFFINITY != 0
    }
    pub const fn is_no_local(&self) -> bool {
        self.flags & FLAG_NO_LOCAL != 0
    }
    pub const fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    /// The slot generation in use.
    pub const fn generation(&self) -> u16 {
        (self.rev & 1) as u16
    }
}

/// Slots per `LB_SLOTS` entry. A frontend's slots are stored in chunks, so a full sync writes
/// one entry per 16 slots instead of one per slot (at 10,000 Services x 100 endpoints, 70,000
/// writes instead of a million), and a frontend of a few backends costs one entry.
pub const SLOT_CHUNK: usize = 16;

/// Key of `LB_SLOTS`: one chunk of a frontend's slots.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    /// `ServiceValue::id`.
    pub svc_id: u32,
    /// 0 or 1; see `ServiceValue::rev`.
    pub generation: u16,
    /// Slots `chunk * SLOT_CHUNK ..` (slot indices run 0 .. `ServiceValue::count`; a backend
    /// with weight w holds w slots).
    pub chunk: u16,
}

impl SlotKey {
    /// The key of the chunk holding `slot` of frontend `svc_id`'s `generation`.
    pub const fn of_slot(svc_id: u32, generation: u16, slot: u16) -> SlotKey {
        SlotKey {
            svc_id,
            generation,
            chunk: slot / SLOT_CHUNK as u16,
        }
    }
}

/// Value of `LB_SLOTS`: backend ids (keys of `LB_BACKENDS`) of `SLOT_CHUNK` slots; past the
/// frontend's count, 0.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SlotChunk {
    pub backend_ids: [u32; SLOT_CHUNK],
}

impl SlotChunk {
    /// The chunk holding `ids` (at most `SLOT_CHUNK`) from its first slot on.
    pub fn of(ids: &[u32]) -> SlotChunk {
        let mut chunk = SlotChunk {
            backend_ids: [0; SLOT_CHUNK],
        };
        let n = ids.len().min(SLOT_CHUNK);
        chunk.backend_ids[..n].copy_from_slice(&ids[..n]);
        chunk
    }

    /// The backend id of `slot` (an index of the whole frontend), 0 for none.
    pub const fn backend_of(&self, slot: u16) -> u32 {
        self.backend_ids[slot as usize % SLOT_CHUNK]
    }
}

/// Key of `LB_MEMBERS`: lets the datapath check that a remembered backend (session affinity)
/// is still one this frontend may use (semantics 6.6).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberKey {
    pub svc_id: u32,
    pub backend_id: u32,
}

/// Value of `LB_MEMBERS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MemberValue {
    /// Slots this backend holds in the frontend (its weight). 0: a serving endpoint new
    /// flows may not use (terminating, another zone's, or remote under a Local policy): flows
    /// already on it keep it, affinity does not pick it (semantics 9.3, 6.6).
    pub slots: u32,
}

/// The frontend id under which `LB4_SRC_RANGES`/`LB6_SRC_RANGES` hold the ServiceCIDRs' ranges
/// (no frontend has id 0): a connection to an address inside one that is no ClusterIP is
/// dropped (nftables mode, semantics 3.12).
pub const SERVICE_CIDRS: u32 = 0;

/// Data of an `LB4_SRC_RANGES` LPM key: the frontend id (always matched in full: prefix
/// lengths count its 32 bits first) then the allowed source prefix.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange4 {
    /// Frontend id, big-endian bytes (LPM matches bytes in order).
    pub svc_id: [u8; 4],
    pub addr: [u8; 4],
}

/// Data of an `LB6_SRC_RANGES` LPM key; fields as in `SrcRange4`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange6 {
    pub svc_id: [u8; 4],
    pub addr: [u8; 16],
}

/// Value of `LB_NETNS_SRC`, keyed by a network namespace's cookie: the source address an
/// unbound socket of that namespace uses towards load balancer IPs, per family, so that the
/// socket hooks can apply loadBalancerSourceRanges before the kernel has picked one; and, for a
/// pod's namespace, whether tc translates its connections to masqueraded external frontends.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsSource {
    pub v6: [u8; 16],
    pub v4: [u8; 4],
    /// `NETNS_HAS_V4` | `NETNS_HAS_V6`: which addresses are known; `NETNS_POD_TC4` |
    /// `NETNS_POD_TC6`: whose pod addresses enter the node through an interface carrying tc.
    pub flags: u32,
}

/// `NetnsSource::v4` is set.
pub const NETNS_HAS_V4: u32 = 1;
/// `NetnsSource::v6` is set.
pub const NETNS_HAS_V6: u32 = 2;
/// A pod's namespace (not the node's) whose IPv4 address enters the node through a pod-facing
/// interface carrying the tc program: its connections to externalIPs, load balancer IPs and
/// NodePorts that kube-proxy masquerades (externalTrafficPolicy Cluster, semantics 7.13) are
/// left to tc, which masquerades them, instead of being translated at the socket layer.
pub const NETNS_POD_TC4: u32 = 4;
/// `NETNS_POD_TC4` for the namespace's IPv6 address.
pub const NETNS_POD_TC6: u32 = 8;

pod!(
    NetnsSource,
    SrcRange4,
    SrcRange6,
    Service4Key,
    Service6Key,
    ServiceValue,
    SlotKey,
    SlotChunk,
    MemberKey,
    MemberValue
);
