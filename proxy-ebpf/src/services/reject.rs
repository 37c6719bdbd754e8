//! Answers for new flows to a frontend without any usable backend (semantics 3.7: kube-proxy
//! rejects them), or to a port a ClusterIP does not serve (3.12): ICMP port unreachable (ICMPv6
//! port unreachable), as kube-proxy's REJECT and nftables' `reject` answer by default, for TCP
//! segments and UDP datagrams alike; a client's connect() fails with ECONNREFUSED at once. The
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
        AF_INET, ETH_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6, TCP_RST,
        answer::{ipv4_header, ipv6_error_header, pseudo6_sum},
        csum::{fold, sum},
        family::Ip,
    },
};

/// Rejects the packet; a packet that cannot be answered (a TCP reset, IP options, a helper
/// failure) is dropped. Counted either way.
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
    // A lone TCP reset is not answered: conntrack sees it as INVALID, not NEW, so
    // kube-proxy's reject rule does not match it (3.10).
    let answered = match pkt.t.proto {
        proto::TCP if pkt.tcp_flags & TCP_RST != 0 => Err(0),
        proto::TCP | proto::UDP => {
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
    // offending IPv6 header + 8 bytes, loaded in place (no copy: this frame ends call chains
    // near the verifier's stack limit).
    let mut icmp = [0u8; 56];
    skb::load_into(ctx, l3, &mut icmp[8..])?;
    icmp[0] = 1;
    icmp[1] = 4;
    let mut hdr = [0u8; 40];
    ipv6_error_header(&mut hdr, &icmp[8..], 56);
    let c = fold(sum(&mut icmp, pseudo6_sum(&hdr, 56, IPPROTO_ICMPV6)?)?).to_ne_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    set_len(ctx, l3 + 48)?;
    ctx.adjust_room(48, BPF_ADJ_ROOM_MAC, 0)?;
    store(ctx, l3, &hdr)?;
    store(ctx, l3 + 40, &icmp)
}
