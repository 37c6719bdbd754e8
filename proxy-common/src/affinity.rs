//! ClientIP session affinity entries.

use crate::pod;

/// Key of `LB_AFFINITY`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityKey {
    /// `ServiceValue::port_id`: affinity is per Service port, across its frontends.
    pub port_id: u32,
    /// `CLIENT_*`: how `client` identifies the client.
    pub client_kind: u32,
    /// `CLIENT_ADDR`: the source address, network byte order (IPv4 in the first 4 bytes); at
    /// the socket layer, the caller's pod address where the agent knows its namespace's.
    /// `CLIENT_NETNS`: the network namespace cookie in the first 8 bytes (native order): at the
    /// socket layer, a namespace whose address is not known (yet).
    pub client: [u8; 16],
}

pub const CLIENT_NETNS: u32 = 1;
pub const CLIENT_ADDR: u32 = 2;
/// Not an affinity entry: the backend the socket layer chose for a pod's connection that
/// landed on the pod itself (`client`: the pod's address, as with `CLIENT_ADDR`). The socket
/// layer leaves such a connection to tc, which masquerades it (hairpin, semantics 7.14) and
/// takes this choice for it instead of drawing again. `last_used_ns`: when it was chosen.
pub const CLIENT_HAIRPIN: u32 = 3;

/// Value of `LB_AFFINITY`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` at the last new connection through this entry (semantics 6.5).
    pub last_used_ns: u64,
}

pod!(AffinityKey, AffinityValue);
