//! Why the datapath did what it did: one numbered list for counters, logs and the CLI.

/// Index into `LB_STATS`. Never renumber: counters and tools read these numbers.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Destination is not a Service frontend; the socket was left untouched.
    NotService = 0,
    /// A connect()/sendmsg() was translated to a backend.
    Translated = 1,
    /// Translated to the backend remembered by session affinity.
    AffinityHit = 2,
    /// The Service has no usable endpoint: rejected with ECONNREFUSED (semantics 3.7).
    NoBackends = 3,
    /// internalTrafficPolicy Local with no local endpoint: dropped (semantics 3.8).
    NoLocalBackends = 4,
    /// A slot the Service entry promised was missing (a racing update); the socket was left
    /// untouched rather than failed.
    SlotMissing = 5,
    /// A slot named a backend id that does not exist.
    BackendMissing = 6,
    /// The reverse-translation entry could not be written; the socket was left untouched.
    RevNatFailed = 7,
    /// recvmsg/getpeername showed the Service address instead of the backend's.
    RevTranslated = 8,
    /// tc: the first packet of a flow to an external frontend was translated to a backend.
    NatNew = 9,
    /// tc: a later packet of a tracked flow was translated.
    NatEstablished = 10,
    /// tc: a reply was translated back to the frontend.
    NatReply = 11,
    /// tc: the source is outside the Service's loadBalancerSourceRanges: dropped
    /// (semantics 7.8).
    SourceRangeDrop = 12,
    /// tc: no free masquerading port for this client and backend: dropped.
    SnatPortsExhausted = 13,
    /// tc: translated, but the FIB had no forwarding route: handed to the stack.
    FibPass = 14,
    /// tc: connection tracking entries could not be written: left untouched.
    CtFailed = 15,
    /// tc: an IP fragment (no ports to match): left untouched.
    Fragment = 16,
    /// tc: no usable backend: answered with a TCP reset or an ICMP unreachable
    /// (semantics 3.7).
    Rejected = 17,
    /// tc: an ICMP error about a translated flow was translated back.
    IcmpTranslated = 18,
    /// A new socket record in `SOCK4_REVNAT` (for telling evictions of the LRU map).
    RevNatNew4 = 19,
    /// A new socket record in `SOCK6_REVNAT`.
    RevNatNew6 = 20,
    /// XDP: a packet of a flow to or from a backend on another node was translated and sent
    /// back out at the driver (`XDP_TX`).
    XdpForwarded = 21,
    /// A packet left for a backend's node with the DSR option.
    DsrSent = 22,
    /// This node learnt a flow's frontend from a DSR option.
    DsrLearned = 23,
    /// A translated packet whose TTL or hop limit would expire here went to the stack, which
    /// answers with ICMP time exceeded, instead of being forwarded.
    TtlExpired = 24,
    /// A socket record in `SOCK4_REVNAT` deleted because its socket was released.
    RevNatDel4 = 25,
    /// A socket record in `SOCK6_REVNAT` deleted because its socket was released.
    RevNatDel6 = 26,
    /// A packet carrying the DSR option taught this node nothing: not in DSR mode, a malformed
    /// option, a sender that is not a peer node or not this node's neighbour for it, a frontend
    /// that is no Service frontend here, or an entry it would replace that is not a DSR entry.
    DsrRefused = 27,
    /// A packet carrying the DSR option taught this node nothing: its client address made this
    /// node learn its budget of new entries in the current second.
    DsrBudgetExceeded = 28,
    /// Socket layer: a connection or datagram to a load balancer IP from a source outside its
    /// loadBalancerSourceRanges (semantics 7.8): refused with EPERM.
    SourceRefused = 29,
    /// Socket layer: a load balancer IP with source ranges, from a socket whose source address
    /// is not known yet (unbound, in a network namespace the agent has not seen): left
    /// untranslated, for the packet path to check.
    SourceUnknown = 30,
    /// tc, XDP: a translated packet could not be rewritten or sent (a helper failed): dropped.
    RewriteFailed = 31,
    /// tc, XDP: the DSR option could not be added to a packet of a DSR flow: dropped.
    DsrFailed = 32,
    /// A monitor event was not written: the ring buffer was full (nobody reading, or reading
    /// too slowly). The packet or socket went on as without a monitor.
    EventsLost = 33,
    /// tc: a later fragment of a tracked flow's datagram was translated as its first
    /// fragment's flow (`LB_FRAG4` remembered the ports).
    FragmentTranslated = 34,
    /// Socket layer: a connect() or sendmsg() to a Service frontend from a pod whose namespace
    /// has socket-layer translation off (`LB_SOCKLB_OFF`): left untranslated, for tc on the
    /// pod's interface to translate per packet.
    PerPacket = 35,
    /// tc: a packet of a DSR flow that the option would make too big for the egress
    /// interface's MTU. Answered with ICMP "fragmentation needed" / ICMPv6 "packet too big"
    /// for the client and dropped (also counted as a drop at tc ingress); or, when it cannot be
    /// answered so (IPv4 without don't-fragment, for one), sent without the option.
    DsrTooBig = 36,
    /// tc, XDP: a new TCP connection took over the masquerading port of a closed flow (a reset
    /// either way, or a FIN both ways) instead of waiting for its closing time, as netfilter's
    /// NAT lets it; the closed flow's entries were replaced.
    SnatPortReused = 37,
    /// tc: a translated packet too big for the interface it would leave by (an overlay or a
    /// pod link with a smaller MTU than the one it came in on), with don't-fragment set (IPv4)
    /// or IPv6: answered with ICMP "fragmentation needed" / ICMPv6 "packet too big" naming
    /// that MTU, quoting the packet as its sender sent it, and dropped, as the kernel's
    /// forwarding does for kube-proxy's flows.
    FragNeeded = 38,
    /// A new connection to an address inside a ServiceCIDR that no Service has (nftables
    /// mode's drop, semantics 3.12): refused with EPERM at the socket layer (a drop there fails
    /// the call at once), dropped at tc.
    ServiceIpUnallocated = 39,
}

/// Number of `Reason` values: the size of `LB_STATS`.
pub const REASON_COUNT: u32 = 40;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::NotService,
        Reason::Translated,
        Reason::AffinityHit,
        Reason::NoBackends,
        Reason::NoLocalBackends,
        Reason::SlotMissing,
        Reason::BackendMissing,
        Reason::RevNatFailed,
        Reason::RevTranslated,
        Reason::NatNew,
        Reason::NatEstablished,
        Reason::NatReply,
        Reason::SourceRangeDrop,
        Reason::SnatPortsExhausted,
        Reason::FibPass,
        Reason::CtFailed,
        Reason::Fragment,
        Reason::Rejected,
        Reason::IcmpTranslated,
        Reason::RevNatNew4,
        Reason::RevNatNew6,
        Reason::XdpForwarded,
        Reason::DsrSent,
        Reason::DsrLearned,
        Reason::TtlExpired,
        Reason::RevNatDel4,
        Reason::RevNatDel6,
        Reason::DsrRefused,
        Reason::DsrBudgetExceeded,
        Reason::SourceRefused,
        Reason::SourceUnknown,
        Reason::RewriteFailed,
        Reason::DsrFailed,
        Reason::EventsLost,
        Reason::FragmentTranslated,
        Reason::PerPacket,
        Reason::DsrTooBig,
        Reason::SnatPortReused,
        Reason::FragNeeded,
        Reason::ServiceIpUnallocated,
    ];

    /// Stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotService => "not_service",
            Reason::Translated => "translated",
            Reason::AffinityHit => "affinity_hit",
            Reason::NoBackends => "no_backends",
            Reason::NoLocalBackends => "no_local_backends",
            Reason::SlotMissing => "slot_missing",
            Reason::BackendMissing => "backend_missing",
            Reason::RevNatFailed => "revnat_failed",
            Reason::RevTranslated => "rev_translated",
            Reason::NatNew => "nat_new",
            Reason::NatEstablished => "nat_established",
            Reason::NatReply => "nat_reply",
            Reason::SourceRangeDrop => "source_range_drop",
            Reason::SnatPortsExhausted => "snat_ports_exhausted",
            Reason::FibPass => "fib_pass",
            Reason::CtFailed => "ct_failed",
            Reason::Fragment => "fragment",
            Reason::Rejected => "rejected",
            Reason::IcmpTranslated => "icmp_translated",
            Reason::RevNatNew4 => "revnat4_new",
            Reason::RevNatNew6 => "revnat6_new",
            Reason::XdpForwarded => "xdp_forwarded",
            Reason::DsrSent => "dsr_sent",
            Reason::DsrLearned => "dsr_learned",
            Reason::TtlExpired => "ttl_expired",
            Reason::RevNatDel4 => "revnat4_deleted",
            Reason::RevNatDel6 => "revnat6_deleted",
            Reason::DsrRefused => "dsr_refused",
            Reason::DsrBudgetExceeded => "dsr_budget_exceeded",
            Reason::SourceRefused => "source_refused",
            Reason::SourceUnknown => "source_unknown",
            Reason::RewriteFailed => "rewrite_failed",
            Reason::DsrFailed => "dsr_failed",
            Reason::EventsLost => "events_lost",
            Reason::FragmentTranslated => "fragment_translated",
            Reason::PerPacket => "per_packet",
            Reason::DsrTooBig => "dsr_too_big",
            Reason::SnatPortReused => "snat_port_reused",
            Reason::FragNeeded => "frag_needed",
            Reason::ServiceIpUnallocated => "service_ip_unallocated",
        }
    }

    /// The reason of counter `index`, if any.
    pub fn from_index(index: u32) -> Option<Reason> {
        Reason::ALL.get(index as usize).copied()
    }
}

/// The program a drop happened in: the `hook` label of `kube_bpf_proxy_drops_total`.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Hook {
    /// connect() at the socket layer (the syscall fails).
    Connect = 0,
    /// sendmsg() of an unconnected UDP socket at the socket layer (the syscall fails).
    Sendmsg = 1,
    /// tc ingress on an external or pod-facing interface.
    TcIngress = 2,
    /// XDP on an external interface.
    Xdp = 3,
    /// tc egress beside tc ingress (`tc_egress`: replies of flows handed to a backend on the
    /// node's own address). Appended last, so the other hooks' counters keep their indexes.
    TcEgress = 4,
}

/// Number of `Hook` values.
pub const HOOK_COUNT: u32 = 5;

/// Size of `LB_DROPS`: one counter per hook and reason.
pub const DROPS_COUNT: u32 = HOOK_COUNT * REASON_COUNT;

impl Hook {
    pub const ALL: [Hook; HOOK_COUNT as usize] = [
        Hook::Connect,
        Hook::Sendmsg,
        Hook::TcIngress,
        Hook::Xdp,
        Hook::TcEgress,
    ];

    /// Stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Sendmsg => "sendmsg",
            Hook::TcIngress => "tc_ingress",
            Hook::Xdp => "xdp",
            Hook::TcEgress => "tc_egress",
        }
    }

    /// The index of this hook's counter for `reason` in `LB_DROPS`.
    pub const fn drop_index(self, reason: Reason) -> u32 {
        self as u32 * REASON_COUNT + reason as u32
    }

    /// The hook of `value`, if any.
    pub fn from_u8(value: u8) -> Option<Hook> {
        Hook::ALL.get(value as usize).copied()
    }
}
