//! Answers for new flows to a frontend without any usable backend (semantics 3.7: kube-proxy
//! rejects them): a TCP segment gets a reset, a UDP datagram an ICMP port unreachable. The
//! packet is turned into the answer in place and sent back out of the interface it came in on.

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
        AF_INET, ETH_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
        answer::{TTL, ipv4_header, ipv6_header, pseudo6_sum},
        csum::{fold, sum},
        family::Ip,
    },
};

/// Rejects the packet; a packet that cannot be answered (a RST, IP options, a helper failure)
/// is dropped. Counted either way.
#[inline(never)]
pub fn reject<F: Ip>(ctx: &TcContext) -> i32 {
    let Ok(pkt) = F::parse(ctx) else {
        stats::dropped(Hook::TcIngress, Reason::NoBackends);
        return TC_ACT_SHOT as i32;
    };
    // Not delivered either way: a drop for no backends, answered or not (counted in a frame
    // of its own, which reads the addresses again: this one has room for the answer only).
    monitor::dropped_packet::<F>(ctx, Hook::TcIngress, Reason::NoBackends);
    let v4 = F::AF == AF_INET;
    let answered = match pkt.t.proto {
        proto::TCP if pkt.tcp_flags & TCP_RST == 0 => {
            if v4 {
                tcp_reset_v4(ctx, pkt.l4)
            } else {
                tcp_reset_v6(ctx)
            }
        }
        proto::UDP => {
            if v4 {
                unreachable_v4(ctx, pkt.l4)
            } else {
                unreachable_v6(ctx)
            }
        }
        _ => Err(0),
    };
    if answered.is_err() {
        return TC_ACT_SHOT as i32;
    }
    if swap_macs(ctx).is_err() {
        return TC_ACT_SHOT as i32;
    }
    stats::count(Reason::Rejected);
    send_back(ctx)
}

/// The reset answering a TCP segment with sequence `seq`, acknowledgment `ack`, `flags` and
/// `payload` bytes (RFC 9293 3.10.7.1): source and destination ports swapped.
#[inline(always)]
fn reset_header(hdr: &[u8; 20], payload: u32) -> [u8; 20] {
    let flags = hdr[13];
    let seq = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let ack = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let (new_seq, new_ack, new_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let mut len = payload;
        if flags & TCP_SYN != 0 {
            len += 1;
        }
        if flags & TCP_FIN != 0 {
            len += 1;
        }
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let s = new_seq.to_be_bytes();
    let a = new_ack.to_be_bytes();
    [
        hdr[2],
        hdr[3],
        hdr[0],
        hdr[1],
        s[0],
        s[1],
        s[2],
        s[3],
        a[0],
        a[1],
        a[2],
        a[3],
        5 << 4,
        new_flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

#[inline(never)]
fn tcp_reset_v4(ctx: &TcContext, l4: usize) -> Result<(), i64> {
    let l3 = ETH_HLEN;
    if l4 != l3 + 20 {
        return Err(0); // IP options: not answered
    }
    let ip = skb::load::<[u8; 20]>(ctx, l3)?;
    let tcp = skb::load::<[u8; 20]>(ctx, l4)?;
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as u32;
    let doff = ((tcp[12] >> 4) as u32) * 4;
    let payload = tot_len.saturating_sub(20 + doff);
    let saddr = [ip[16], ip[17], ip[18], ip[19]];
    let daddr = [ip[12], ip[13], ip[14], ip[15]];
    let mut rst = reset_header(&tcp, payload);
    // Pseudo header: source, destination, zero, protocol, TCP length.
    let mut pseudo = [
        saddr[0],
        saddr[1],
        saddr[2],
        saddr[3],
        daddr[0],
        daddr[1],
        daddr[2],
        daddr[3],
        0,
        proto::TCP,
        0,
        20,
    ];
    let c = fold(sum(&mut rst, sum(&mut pseudo, 0)?)?).to_ne_bytes();
    rst[16] = c[0];
    rst[17] = c[1];
    set_len(ctx, l4 + 20)?;
    store(ctx, l3, &ipv4_header(40, proto::TCP, saddr, daddr)?)?;
    store(ctx, l4, &rst)
}

#[inline(never)]
fn tcp_reset_v6(ctx: &TcContext) -> Result<(), i64> {
    let l3 = ETH_HLEN;
    let l4 = l3 + 40;
    let ip = skb::load::<[u8; 40]>(ctx, l3)?;
    let tcp = skb::load::<[u8; 20]>(ctx, l4)?;
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as u32;
    let doff = ((tcp[12] >> 4) as u32) * 4;
    let mut rst = reset_header(&tcp, payload_len.saturating_sub(doff));
    let mut hdr = ip;
    // Swap the addresses, 20 bytes of payload, hop limit.
    let mut i = 0;
    while i < 16 {
        hdr[8 + i] = ip[24 + i];
        hdr[24 + i] = ip[8 + i];
        i += 1;
    }
    hdr[4] = 0;
    hdr[5] = 20;
    hdr[7] = TTL;
    let c = fold(sum(&mut rst, pseudo6_sum(&hdr, 20, proto::TCP)?)?).to_ne_bytes();
    rst[16] = c[0];
    rst[17] = c[1];
    set_len(ctx, l4 + 20)?;
    store(ctx, l3, &hdr)?;
    store(ctx, l4, &rst)
}

#[inline(never)]
fn unreachable_v4(ctx: &TcContext, l4: usize) -> Result<(), i64> {
    let l3 = ETH_HLEN;
    if l4 != l3 + 20 {
        return Err(0);
    }
    // ICMP header (type 3 port unreachable, code 3) and the offending IP header + 8 bytes.
    let mut icmp = [0u8; 36];
    icmp[0] = 3;
    icmp[1] = 3;
    let orig = skb::load::<[u8; 28]>(ctx, l3)?;
    let mut i = 0;
    while i < 28 {
        icmp[8 + i] = orig[i];
        i += 1;
    }
    let saddr = [icmp[24], icmp[25], icmp[26], icmp[27]];
    let daddr = [icmp[20], icmp[21], icmp[22], icmp[23]];
    let c = fold(sum(&mut icmp, 0)?).to_ne_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    set_len(ctx, l3 + 28)?;
    ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, 0)?;
    store(ctx, l3, &ipv4_header(20 + 36, IPPROTO_ICMP, saddr, daddr)?)?;
    store(ctx, l3 + 20, &icmp)
}

#[inline(never)]
fn unreachable_v6(ctx: &TcContext) -> Result<(), i64> {
    let l3 = ETH_HLEN;
    // ICMPv6 header (type 1 destination unreachable, code 4 port unreachable) and the
    // offending IPv6 header + 8 bytes.
    let mut icmp = [0u8; 56];
    icmp[0] = 1;
    icmp[1] = 4;
    let orig = skb::load::<[u8; 48]>(ctx, l3)?;
    let mut i = 0;
    while i < 48 {
        icmp[8 + i] = orig[i];
        i += 1;
    }
    let hdr = ipv6_header(56, IPPROTO_ICMPV6, &addr16(&orig, 24), &addr16(&orig, 8));
    let c = fold(sum(&mut icmp, pseudo6_sum(&hdr, 56, IPPROTO_ICMPV6)?)?).to_ne_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    set_len(ctx, l3 + 48)?;
    ctx.adjust_room(48, BPF_ADJ_ROOM_MAC, 0)?;
    store(ctx, l3, &hdr)?;
    store(ctx, l3 + 40, &icmp)
}

/// The 16 bytes of `buf` at `off`.
#[inline(always)]
fn addr16<const N: usize>(buf: &[u8; N], off: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        a[i] = buf[off + i];
        i += 1;
    }
    a
}
