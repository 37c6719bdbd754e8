//! Connection tracking of the packet path (tc): every translated flow has two entries, one per
//! direction, each keyed by the tuple a packet arrives with and holding the tuple it leaves
//! with. The forward entry (client → frontend) rewrites to the backend (and the node address
//! when masquerading); the reply entry (backend → client or node) rewrites back to the
//! frontend. Swapping the addresses and ports of either value gives the other entry's key.

use crate::pod;

/// Key of `LB_CT4`/`LB_CT6`: a packet's tuple as it arrives. `A` is the address: `[u8; 4]`
/// or `[u8; 16]`; one definition serves both families.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey<A> {
    /// Network byte order.
    pub saddr: A,
    pub daddr: A,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// IANA protocol number.
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `LB_CT4`/`LB_CT6`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CtValue<A> {
    /// The tuple the packet is rewritten to; fields as in the key.
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    /// `CT_*` bits.
    pub flags: u32,
    /// Frontend id (`ServiceValue::id`).
    pub svc_id: u32,
    /// Backend id (`LB_BACKENDS`).
    pub backend_id: u32,
    /// CLOCK_MONOTONIC of the last packet through this entry: exact when the flow is created,
    /// then the coarse clock (`bpf_ktime_get_coarse_ns`, as of the last tick), so it may step
    /// back by up to a tick; only expiry reads it, with saturation.
    pub last_seen_ns: u64,
    /// Non-zero while this forward entry holds one active-connection count of `backend_id`
    /// (least-connection frontends). Whoever swaps it to 0 — the datapath when the flow
    /// closes or is replaced, the agent's release program when it expires — gives the count
    /// back, so it is given back exactly once.
    pub counted: u64,
}

/// Key of `LB_CT4`.
pub type Ct4Key = CtKey<[u8; 4]>;
/// Value of `LB_CT4`.
pub type Ct4Value = CtValue<[u8; 4]>;
/// Key of `LB_CT6`.
pub type Ct6Key = CtKey<[u8; 16]>;
/// Value of `LB_CT6`.
pub type Ct6Value = CtValue<[u8; 16]>;

/// The entry translates replies (backend → client) back to the frontend.
pub const CT_REPLY: u32 = 1 << 0;
/// The flow's source was masqueraded to a node address (externalTrafficPolicy Cluster,
/// semantics 7.13, or hairpin, 7.14).
pub const CT_SNAT: u32 = 1 << 1;
/// A TCP FIN was seen in this entry's direction.
pub const CT_FIN: u32 = 1 << 2;
/// A TCP RST was seen in this entry's direction.
pub const CT_RST: u32 = 1 << 3;
/// Direct server return: sent to the backend's node with the frontend in an IP option (on the
/// balancing node), or learnt from that option (on the backend's node). One direction only.
pub const CT_DSR: u32 = 1 << 4;
/// The backend is on this node's own address (a host-network pod): the flow is handed to the
/// node's stack, which answers it itself; the replies leave through an interface's egress,
/// where `tc_egress` translates them back. Never masqueraded (a masqueraded client would be
/// answered on the loopback device, past every program).
pub const CT_HOST: u32 = 1 << 5;
/// Set on a reply entry by the first packet through it: the flow was answered.
pub const CT_ANSWERED: u32 = 1 << 6;
/// Set on every entry the datapath writes since `CT_ANSWERED` exists: without it (an entry of
/// an older release's programs) whether the flow was answered is unknown, so it counts as
/// answered.
pub const CT_TRACKS_ANSWER: u32 = 1 << 7;
/// `CT_ANSWERED` is `CT_REPLY` moved by this many bits (the datapath derives it by a shift).
pub const CT_ANSWERED_SHIFT: u32 = 6;

/// Idle timeouts, seconds. An entry pair is removed by the agent's collector once the newer of
/// its two `last_seen_ns` is older than this; LRU eviction covers a full table. An answered,
/// open TCP flow: kube-proxy's 24 h for the kernel's established connections (semantics 9.6).
pub const CT_TIMEOUT_TCP_SECS: u64 = 24 * 3600;
/// A TCP flow never answered (netfilter's SYN_SENT timeout): it holds its masquerading port
/// no longer than that.
pub const CT_TIMEOUT_TCP_UNANSWERED_SECS: u64 = 120;
/// TCP after a RST, or FINs in both directions.
pub const CT_TIMEOUT_TCP_CLOSING_SECS: u64 = 10;
/// UDP and SCTP.
pub const CT_TIMEOUT_OTHER_SECS: u64 = 120;

/// The agent's idle timeouts, seconds: the constants above by default, the TCP and UDP ones
/// set by `run --conntrack-tcp-timeout-established` and `--conntrack-udp-timeout`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// An open TCP flow, answered.
    pub tcp_secs: u64,
    /// A TCP flow never answered.
    pub tcp_unanswered_secs: u64,
    /// TCP after a RST, or FINs in both directions.
    pub tcp_closing_secs: u64,
    /// UDP and SCTP.
    pub other_secs: u64,
}

impl CtTimeouts {
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_secs: CT_TIMEOUT_TCP_SECS,
        tcp_unanswered_secs: CT_TIMEOUT_TCP_UNANSWERED_SECS,
        tcp_closing_secs: CT_TIMEOUT_TCP_CLOSING_SECS,
        other_secs: CT_TIMEOUT_OTHER_SECS,
    };

    /// The idle timeout of an entry pair with protocol `proto` and the flags of both entries.
    pub const fn secs(&self, proto: u8, forward_flags: u32, reply_flags: u32) -> u64 {
        if proto != crate::proto::TCP {
            return self.other_secs;
        }
        let rst = (forward_flags | reply_flags) & CT_RST != 0;
        // A DSR entry sees one direction only: its own FIN closes it.
        let dsr = (forward_flags | reply_flags) & CT_DSR != 0;
        let fins = if dsr {
            (forward_flags | reply_flags) & CT_FIN != 0
        } else {
            forward_flags & reply_flags & CT_FIN != 0
        };
        // Answered: its reply entry saw a packet; a DSR entry (one direction) or one whose
        // programs did not track it counts as answered.
        let tracked = (forward_flags | reply_flags) & CT_TRACKS_ANSWER != 0;
        let answered = dsr || !tracked || reply_flags & CT_ANSWERED != 0;
        if rst || fins {
            self.tcp_closing_secs
        } else if !answered {
            // Never longer than the answered timeout (set lower by a flag).
            if self.tcp_unanswered_secs < self.tcp_secs {
                self.tcp_unanswered_secs
            } else {
                self.tcp_secs
            }
        } else {
            self.tcp_secs
        }
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        CtTimeouts::DEFAULT
    }
}

/// The default idle timeout of an entry pair with protocol `proto` and the flags of both
/// entries ([`CtTimeouts::DEFAULT`]).
pub const fn ct_timeout_secs(proto: u8, forward_flags: u32, reply_flags: u32) -> u64 {
    CtTimeouts::DEFAULT.secs(proto, forward_flags, reply_flags)
}

impl Ct4Key {
    /// The key as the datapath lays it out (for the agent's release program).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.saddr);
        b[4..8].copy_from_slice(&self.daddr);
        b[8..10].copy_from_slice(&self.sport.to_ne_bytes());
        b[10..12].copy_from_slice(&self.dport.to_ne_bytes());
        b[12] = self.proto;
        b
    }
}

impl Ct6Key {
    /// The key as the datapath lays it out (for the agent's release program).
    pub fn to_bytes(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0..16].copy_from_slice(&self.saddr);
        b[16..32].copy_from_slice(&self.daddr);
        b[32..34].copy_from_slice(&self.sport.to_ne_bytes());
        b[34..36].copy_from_slice(&self.dport.to_ne_bytes());
        b[36] = self.proto;
        b
    }
}

/// Key of `LB_FRAG4`: one fragmented IPv4 datagram (its source, destination, identification
/// and protocol).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frag4Key {
    /// Network byte order.
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// The IP header's identification, host byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `LB_FRAG4`: the ports the datagram's first fragment carried (host byte order),
/// for its later fragments, which carry none.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Key of `LB_FRAG6`: one fragmented IPv6 datagram.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frag6Key {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The fragment header's identification, host byte order.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

pod!(
    Ct4Key, Ct4Value, Ct6Key, Ct6Value, Frag4Key, Frag6Key, FragPorts
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{TCP, UDP};

    /// semantics 9.6: an answered TCP flow idles 24 h, as kube-proxy's established timeout; one
    /// never answered 120 s; one an older release's programs wrote (no `CT_TRACKS_ANSWER`), a
    /// DSR one (one direction seen), 24 h; closing ones 10 s; UDP 120 s.
    #[test]
    fn timeouts_follow_what_the_flow_saw() {
        let t = CtTimeouts::DEFAULT;
        let fwd = CT_TRACKS_ANSWER;
        let rev = CT_TRACKS_ANSWER | CT_REPLY;
        assert_eq!(t.secs(TCP, fwd, rev | CT_ANSWERED), 24 * 3600);
        assert_eq!(t.secs(TCP, fwd, rev), 120);
        assert_eq!(t.secs(TCP, 0, CT_REPLY), 24 * 3600);
        assert_eq!(t.secs(TCP, fwd | CT_DSR, fwd | CT_DSR), 24 * 3600);
        assert_eq!(t.secs(TCP, fwd | CT_RST, rev), 10);
        assert_eq!(t.secs(TCP, fwd | CT_FIN, rev | CT_FIN | CT_ANSWERED), 10);
        assert_eq!(t.secs(UDP, fwd, rev), 120);
        // A timeout set below 120 s bounds the unanswered one too.
        let short = CtTimeouts { tcp_secs: 60, ..t };
        assert_eq!(short.secs(TCP, fwd, rev), 60);
        // The datapath's branch-free mark lands on the answered bit.
        assert_eq!(CT_REPLY << CT_ANSWERED_SHIFT, CT_ANSWERED);
    }
}
