//! Path MTU discovery through a DSR node. A packet of a DSR flow that the option (IPv4) or the
//! Destination Options header (IPv6) would make too big for the egress interface is answered
//! as a router on its path answers: ICMP "fragmentation needed" (IPv4, when the packet says
//! don't fragment) or ICMPv6 "packet too big", naming the egress MTU less the option's size.
//! The client's stack lowers its path MTU to the frontend and sends smaller packets, which
//! carry the option, so the backend's node learns the flow. The error comes from the frontend
//! address and quotes the packet as the client sent it (the frontend as its destination, the
//! translation undone in the quote), for the client's stack to find the socket it concerns.
//!
//! Not answered (the caller sends the packet without the option, as before): an IPv4 packet
//! that may be fragmented or carries IP options, an IPv6 packet with extension headers other
//! than a fragment header, and an MTU so small that the client could not go below it (IPv4
//! 576 bytes, IPv6 1280, plus the option).

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::generated::bpf_skb_load_bytes, programs::TcContext,
};
use proxy_common::{
    proto,
    reason::{Hook, Reason},
};

use crate::{
    access::skb::{set_len, store, swap_macs},
    flow::monitor,
    headers::{
        ETH_HLEN, FRAG_OFFSET, FRAG6_OFFSET, IPPROTO_FRAGMENT, IPPROTO_ICMP, IPPROTO_ICMPV6, Tuple,
        answer::{TTL, ipv4_header, pseudo6_sum},
        csum::{fold, header_checksum, sum},
        family::{V4, V6},
    },
};

/// IPv4 flags: don't fragment.
const FRAG_DF: u16 = 0x4000;
/// The smallest path MTU asked of an IPv4 client (RFC 791: every host takes 576 bytes).
const MIN_MTU4: u32 = 576;
/// The smallest IPv6 link MTU (RFC 8200).
const MIN_MTU6: u32 = 1280;

/// Turns an IPv4 packet of a DSR flow to `frontend`:`port`, too big by `growth` bytes for an
/// egress MTU of `mtu`, into ICMP "fragmentation needed" for its client, its MACs swapped for
/// the way back, and counts it dropped (`DsrTooBig`, with its monitor event). `Ok(false)`: not
/// answered, the packet untouched and not counted; `Err`: a helper failed while the packet was
/// rewritten (drop it).
#[inline(never)]
pub fn frag_needed4(
    ctx: &TcContext,
    frontend: &[u8; 4],
    port: u16,
    mtu: u32,
    growth: u32,
) -> Result<bool, i64> {
    let l3 = ETH_HLEN;
    let Ok(ip) = ctx.load::<[u8; 28]>(l3) else {
        return Ok(false);
    };
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if ip[0] != 0x45 || frag & FRAG_DF == 0 || mtu < MIN_MTU4 + growth {
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
    i = 0;
    while i < 4 {
        inner[16 + i] = frontend[i];
        i += 1;
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
    let m = ((mtu - growth) as u16).to_be_bytes();
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
    if frag & FRAG_OFFSET == 0 && (ip[9] == proto::TCP || ip[9] == proto::UDP) {
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
    let Ok(hdr) = ipv4_header(20 + 36, IPPROTO_ICMP, *frontend, client) else {
        return Ok(false);
    };
    // Counted as a drop, with its event: the flow as the client sent it.
    let t = Tuple {
        saddr: client,
        daddr: *frontend,
        sport: u16::from_be_bytes([icmp[28], icmp[29]]),
        dport: port,
        proto: ip[9],
    };
    monitor::dropped::<V4>(Hook::TcIngress, Reason::DsrTooBig, 0, &t);
    set_len(ctx, l3 + 28)?;
    ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, 0)?;
    store(ctx, l3, &hdr)?;
    store(ctx, l3 + 20, &icmp)?;
    swap_macs(ctx)?;
    Ok(true)
}

/// The IPv6 twin of `frag_needed4`: ICMPv6 "packet too big", quoting the IPv6 header and the
/// next 16 bytes (a fragment header and the ports, or the ports and more).
#[inline(never)]
pub fn too_big6(
    ctx: &TcContext,
    frontend: &[u8; 16],
    port: u16,
    mtu: u32,
    growth: u32,
) -> Result<bool, i64> {
    let l3 = ETH_HLEN;
    if mtu < MIN_MTU6 + growth {
        return Ok(false);
    }
    // Type 2 (packet too big), code 0, the next hop's MTU; then the quote, loaded in place
    // (`Q`: where the quoted IPv6 header starts).
    const Q: usize = 8;
    let mut icmp = [0u8; 64];
    // SAFETY: plain helper call on this context; the buffer has 56 bytes from offset `Q`.
    let rc =
        unsafe { bpf_skb_load_bytes(ctx.as_ptr(), l3 as u32, icmp.as_mut_ptr().add(Q).cast(), 56) };
    if rc < 0 {
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
    let m = (mtu - growth).to_be_bytes();
    icmp[4] = m[0];
    icmp[5] = m[1];
    icmp[6] = m[2];
    icmp[7] = m[3];
    // The answer's header: from the frontend to the client (the quote's source).
    let mut hdr = [0u8; 40];
    hdr[0] = 0x60;
    hdr[5] = 64;
    hdr[6] = IPPROTO_ICMPV6;
    hdr[7] = TTL;
    let mut i = 0;
    while i < 16 {
        hdr[8 + i] = frontend[i];
        hdr[24 + i] = icmp[Q + 8 + i];
        icmp[Q + 24 + i] = frontend[i];
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
    let Ok(s) = pseudo6_sum(&hdr, 64, IPPROTO_ICMPV6).and_then(|s| sum(&mut icmp, s)) else {
        return Ok(false);
    };
    let c = fold(s).to_ne_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    let mut t = Tuple {
        saddr: [0u8; 16],
        daddr: *frontend,
        sport: 0,
        dport: port,
        proto: proto::UDP,
    };
    i = 0;
    while i < 16 {
        t.saddr[i] = hdr[24 + i];
        i += 1;
    }
    if at == 42 {
        t.proto = icmp[Q + 6];
        t.sport = u16::from_be_bytes([icmp[Q + 40], icmp[Q + 41]]);
    } else {
        t.proto = icmp[Q + 40];
        if at == 50 {
            t.sport = u16::from_be_bytes([icmp[Q + 48], icmp[Q + 49]]);
        }
    }
    monitor::dropped::<V6>(Hook::TcIngress, Reason::DsrTooBig, 0, &t);
    set_len(ctx, l3 + 56)?;
    ctx.adjust_room(48, BPF_ADJ_ROOM_MAC, 0)?;
    store(ctx, l3, &hdr)?;
    store(ctx, l3 + 40, &icmp)?;
    swap_macs(ctx)?;
    Ok(true)
}
