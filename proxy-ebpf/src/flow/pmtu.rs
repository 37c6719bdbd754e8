//! Path MTU discovery through this node: a packet too big for the interface it would leave by
//! is answered as a router on its path answers, with ICMP "fragmentation needed" (IPv4, when the
//! packet says don't fragment) or ICMPv6 "packet too big" naming the MTU the sender must keep
//! to; the packet is dropped. The error comes from the packet's destination as its sender
//! addressed it (the frontend) and quotes the packet as its sender sent it, for the sender's
//! stack to find the socket it concerns and lower its path MTU to the frontend, as the kernel
//! does for kube-proxy's translated flows (netfilter translates the quote back). Two cases:
//!
//! - A translated packet whose egress interface has a smaller MTU than the one it came in on
//!   (an overlay, a pod's link): the FIB says so (`fib::route`) before the packet is
//!   rewritten, and `too_big` answers it untouched, naming that MTU.
//! - A DSR packet that the option (IPv4) or the Destination Options header (IPv6) would make
//!   too big: `dsr::send_remembered` answers it, naming the MTU less the option's size, the
//!   translation undone in the quote; so the client's later packets carry the option.
//!
//! Not answered: an IPv4 packet that may be fragmented or carries IP options, an IPv6 packet
//! with extension headers other than a fragment header, a packet whose TTL or hop limit
//! expires here (the stack answers "time exceeded", as the kernel checks that first). Those go
//! on as before: a translated packet to the stack (which fragments it, unless it was
//! masqueraded: the stack drops a packet with its own address as the source), a DSR packet
//! without the option. An MTU the sender could not go below (IPv4 576 bytes, IPv6 1280): a
//! DSR packet goes without the option, another is dropped, counted.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    programs::TcContext,
};
use proxy_common::{
    proto,
    reason::{Hook, Reason},
};

use crate::{
    access::{
        skb::{self, send_back, set_len, store, swap_macs},
        stats,
    },
    flow::monitor,
    headers::{
        ETH_HLEN, FRAG_OFFSET, FRAG6_OFFSET, IPPROTO_FRAGMENT, IPPROTO_ICMP, IPPROTO_ICMPV6, Tuple,
        answer::{ipv4_header, ipv6_error_header, pseudo6_sum},
        csum::{fold, header_checksum, sum},
        family::{Ip, V4, V6},
    },
};

/// IPv4 flags: don't fragment.
const FRAG_DF: u16 = 0x4000;
/// The smallest path MTU asked of an IPv4 client (RFC 791: every host takes 576 bytes).
const MIN_MTU4: u32 = 576;
/// The smallest IPv6 link MTU (RFC 8200).
const MIN_MTU6: u32 = 1280;

/// What became of a packet to answer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Turned into the ICMP error, counted dropped: send it back.
    Answered,
    /// Not answered, untouched, not counted.
    Untouched,
    /// A helper failed while the packet was rewritten: drop it.
    Failed,
}

impl Outcome {
    #[inline(always)]
    fn of(r: Result<bool, i64>) -> Outcome {
        match r {
            Ok(true) => Outcome::Answered,
            Ok(false) => Outcome::Untouched,
            Err(_) => Outcome::Failed,
        }
    }
}

/// The answers of one address family.
pub trait Answer: Ip {
    /// Turns the packet in `ctx` into the ICMP error naming `mtu` for its sender, its MACs
    /// swapped for the way back, and counts it dropped for `reason` (with its monitor event).
    /// With `frontend`, the packet was translated from `frontend`:`port`, which the quote and
    /// the error's source then carry; without, it is quoted as it is.
    fn answer(
        ctx: &TcContext,
        frontend: Option<&Self::Addr>,
        port: u16,
        mtu: u32,
        reason: Reason,
    ) -> Outcome;

    /// Whether the packet in `ctx` may be answered (`answer` checks again).
    fn answerable(ctx: &TcContext) -> bool;
}

impl Answer for V4 {
    /// ICMP "fragmentation needed", quoting the IP header and the first 8 bytes of its
    /// payload (`frag_needed4`). Out of line: it ends call chains near the stack limit.
    #[inline(never)]
    fn answer(
        ctx: &TcContext,
        frontend: Option<&[u8; 4]>,
        port: u16,
        mtu: u32,
        reason: Reason,
    ) -> Outcome {
        Outcome::of(frag_needed4(ctx, frontend, port, mtu, reason))
    }

    #[inline(always)]
    fn answerable(ctx: &TcContext) -> bool {
        // Version and header length, flags and fragment offset, TTL.
        matches!(skb::load::<[u8; 9]>(ctx, ETH_HLEN), Ok(h) if h[0] == 0x45
            && u16::from_be_bytes([h[6], h[7]]) & FRAG_DF != 0 && h[8] > 1)
    }
}

impl Answer for V6 {
    /// ICMPv6 "packet too big", quoting the IPv6 header and the next 16 bytes (a fragment
    /// header and the ports, or the ports and more) (`too_big6`). Out of line, as for IPv4.
    #[inline(never)]
    fn answer(
        ctx: &TcContext,
        frontend: Option<&[u8; 16]>,
        port: u16,
        mtu: u32,
        reason: Reason,
    ) -> Outcome {
        Outcome::of(too_big6(ctx, frontend, port, mtu, reason))
    }

    #[inline(always)]
    fn answerable(ctx: &TcContext) -> bool {
        // Next header, hop limit.
        matches!(skb::load::<[u8; 2]>(ctx, ETH_HLEN + 6), Ok([next, hops]) if hops > 1
            && (next == proto::TCP || next == proto::UDP || next == IPPROTO_FRAGMENT))
    }
}

/// Answers a packet, untouched, that is too big for the egress interface's `mtu` (a tc
/// action): counted as `FragNeeded`; dropped without an answer when it cannot be answered.
#[inline(never)]
pub fn too_big<F: Answer>(ctx: &TcContext, mtu: u32) -> i32 {
    match F::answer(ctx, None, 0, mtu, Reason::FragNeeded) {
        Outcome::Answered => send_back(ctx),
        Outcome::Untouched => {
            stats::dropped(Hook::TcIngress, Reason::FragNeeded);
            TC_ACT_SHOT as i32
        }
        Outcome::Failed => TC_ACT_SHOT as i32,
    }
}

/// `Answer::answer` for IPv4.
#[inline(always)]
fn frag_needed4(
    ctx: &TcContext,
    frontend: Option<&[u8; 4]>,
    port: u16,
    mtu: u32,
    reason: Reason,
) -> Result<bool, i64> {
    let l3 = ETH_HLEN;
    let Ok(ip) = skb::load::<[u8; 28]>(ctx, l3) else {
        return Ok(false);
    };
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if ip[0] != 0x45 || frag & FRAG_DF == 0 || ip[8] <= 1 || !(MIN_MTU4..=0xffff).contains(&mtu) {
        return Ok(false);
    }
    // The quote: the IP header as the client sent it (the frontend its destination, its
    // checksum again right) and the first 8 bytes of its payload, the frontend port back in a
    // first fragment's (or whole datagram's) ports.
    let mut inner = [0u8; 20];
    let mut i = 0;
    while i < 20 {
        inner[i] = ip[i];
        i += 1;
    }
    if let Some(f) = frontend {
        i = 0;
        while i < 4 {
            inner[16 + i] = f[i];
            i += 1;
        }
    }
    inner[10] = 0;
    inner[11] = 0;
    let c = header_checksum(&inner);
    inner[10] = c[0];
    inner[11] = c[1];
    // Type 3 (destination unreachable), code 4 (fragmentation needed), the next hop's MTU.
    let mut icmp = [0u8; 36];
    icmp[0] = 3;
    icmp[1] = 4;
    let m = (mtu as u16).to_be_bytes();
    icmp[6] = m[0];
    icmp[7] = m[1];
    i = 0;
    while i < 20 {
        icmp[8 + i] = inner[i];
        i += 1;
    }
    i = 0;
    while i < 8 {
        icmp[28 + i] = ip[20 + i];
        i += 1;
    }
    let ported = frag & FRAG_OFFSET == 0 && (ip[9] == proto::TCP || ip[9] == proto::UDP);
    if ported && frontend.is_some() {
        let p = port.to_be_bytes();
        icmp[30] = p[0];
        icmp[31] = p[1];
    }
    let Ok(s) = sum(&mut icmp, 0) else {
        return Ok(false);
    };
    let c = fold(s).to_ne_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    let client = [ip[12], ip[13], ip[14], ip[15]];
    let to = [inner[16], inner[17], inner[18], inner[19]];
    let Ok(hdr) = ipv4_header(20 + 36, IPPROTO_ICMP, to, client) else {
        return Ok(false);
    };
    // Counted as a drop, with its event: the flow as the client sent it.
    let t = Tuple {
        saddr: client,
        daddr: to,
        sport: u16::from_be_bytes([icmp[28], icmp[29]]),
        dport: u16::from_be_bytes([icmp[30], icmp[31]]),
        proto: ip[9],
    };
    monitor::dropped::<V4>(Hook::TcIngress, reason, 0, &t);
    set_len(ctx, l3 + 28)?;
    ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, 0)?;
    store(ctx, l3, &hdr)?;
    store(ctx, l3 + 20, &icmp)?;
    swap_macs(ctx)?;
    Ok(true)
}

/// `Answer::answer` for IPv6.
#[inline(always)]
fn too_big6(
    ctx: &TcContext,
    frontend: Option<&[u8; 16]>,
    port: u16,
    mtu: u32,
    reason: Reason,
) -> Result<bool, i64> {
    let l3 = ETH_HLEN;
    if mtu < MIN_MTU6 {
        return Ok(false);
    }
    // Type 2 (packet too big), code 0, the next hop's MTU; then the quote, loaded in place
    // (`Q`: where the quoted IPv6 header starts).
    const Q: usize = 8;
    let mut icmp = [0u8; 64];
    if skb::load_into(ctx, l3, &mut icmp[Q..]).is_err() {
        return Ok(false);
    }
    // Expiring here: the stack answers "time exceeded".
    if icmp[Q + 7] <= 1 {
        return Ok(false);
    }
    let ported = |next: u8| next == proto::TCP || next == proto::UDP;
    // Where the quote's destination port is: after the IPv6 header, or after a first
    // fragment's header; none in a later fragment.
    let next = icmp[Q + 6];
    let at = if ported(next) {
        40 + 2
    } else if next == IPPROTO_FRAGMENT && ported(icmp[Q + 40]) {
        if u16::from_be_bytes([icmp[Q + 42], icmp[Q + 43]]) & FRAG6_OFFSET == 0 {
            48 + 2
        } else {
            0
        }
    } else {
        return Ok(false);
    };
    icmp[0] = 2;
    let m = mtu.to_be_bytes();
    icmp[4] = m[0];
    icmp[5] = m[1];
    icmp[6] = m[2];
    icmp[7] = m[3];
    let mut i = 0;
    if let Some(f) = frontend {
        while i < 16 {
            icmp[Q + 24 + i] = f[i];
            i += 1;
        }
        let p = port.to_be_bytes();
        if at == 42 {
            icmp[Q + 42] = p[0];
            icmp[Q + 43] = p[1];
        } else if at == 50 {
            icmp[Q + 50] = p[0];
            icmp[Q + 51] = p[1];
        }
    }
    // The answer's header: from the frontend to the client (the quote's source).
    let mut hdr = [0u8; 40];
    ipv6_error_header(&mut hdr, &icmp[Q..], 64);
    let Ok(s) = pseudo6_sum(&hdr, 64, IPPROTO_ICMPV6).and_then(|s| sum(&mut icmp, s)) else {
        return Ok(false);
    };
    let c = fold(s).to_ne_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    let mut t = Tuple {
        saddr: [0u8; 16],
        daddr: [0u8; 16],
        sport: 0,
        dport: 0,
        proto: proto::UDP,
    };
    i = 0;
    while i < 16 {
        t.saddr[i] = hdr[24 + i];
        t.daddr[i] = hdr[8 + i];
        i += 1;
    }
    if at == 42 {
        t.proto = icmp[Q + 6];
        t.sport = u16::from_be_bytes([icmp[Q + 40], icmp[Q + 41]]);
        t.dport = u16::from_be_bytes([icmp[Q + 42], icmp[Q + 43]]);
    } else {
        t.proto = icmp[Q + 40];
        if at == 50 {
            t.sport = u16::from_be_bytes([icmp[Q + 48], icmp[Q + 49]]);
            t.dport = u16::from_be_bytes([icmp[Q + 50], icmp[Q + 51]]);
        }
    }
    monitor::dropped::<V6>(Hook::TcIngress, reason, 0, &t);
    set_len(ctx, l3 + 56)?;
    ctx.adjust_room(48, BPF_ADJ_ROOM_MAC, 0)?;
    store(ctx, l3, &hdr)?;
    store(ctx, l3 + 40, &icmp)?;
    swap_macs(ctx)?;
    Ok(true)
}
