//! ICMP errors about translated flows (destination unreachable, time exceeded, packet too big,
//! ...): the error quotes the translated packet (client or node → backend), which the client
//! would not recognise. Its reply-direction connection-tracking entry says what the client sent
//! to; the quoted header and the outer destination (and source, when the backend itself wrote
//! the error) are rewritten back, so the client's socket gets the error (e.g. ECONNREFUSED).

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK},
    programs::TcContext,
};
use proxy_common::{ct::CT_REPLY, proto, reason::Reason};

use crate::{
    access::{skb, stats},
    flow::{ct::Tracked, fib::forward},
    headers::{
        ETH_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6, Tuple,
        csum::diff16,
        family::{V4, V6},
    },
};

/// The reply-direction entry for an error quoting `inner` (a packet towards a backend).
#[inline(always)]
fn lookup<F: Tracked>(inner: &Tuple<F::Addr>) -> Option<Tuple<F::Addr>> {
    let ptr = F::ct_lookup(&inner.reversed())?;
    // SAFETY: the pointer came from the lookup.
    let e = unsafe { F::ct_read(ptr) };
    if e.flags & CT_REPLY == 0 {
        return None;
    }
    Some(Tuple {
        proto: inner.proto,
        ..e.to
    })
}

/// Replaces a field of at most 16 bytes, at an even offset, covered by the ICMP checksum at
/// `csum_off`.
#[inline(always)]
fn field<const N: usize>(
    ctx: &TcContext,
    off: usize,
    csum_off: usize,
    old: &[u8; N],
    new: &[u8; N],
) -> Result<(), i64> {
    let mut from = [0u8; 16];
    let mut to = [0u8; 16];
    let mut i = 0;
    while i < N && i < 16 {
        from[i] = old[i];
        to[i] = new[i];
        i += 1;
    }
    let diff = diff16(&mut from, &mut to)?;
    ctx.l4_csum_replace(csum_off, 0, diff as u64, 0)?;
    ctx.store(off, new, 0)
}

#[inline(never)]
pub fn icmp4(ctx: &TcContext) -> i32 {
    match translate4(ctx) {
        Ok(Some(client)) => {
            stats::count(Reason::IcmpTranslated);
            forward::<V4>(ctx, &client, 0)
        }
        _ => TC_ACT_OK as i32,
    }
}

/// Offsets: outer IPv4 header at 14 (no options), ICMP at 34, quoted IPv4 header at 42 (no
/// options), quoted ports at 62.
fn translate4(ctx: &TcContext) -> Result<Option<Tuple<[u8; 4]>>, i64> {
    let l3 = ETH_HLEN;
    let outer = skb::load::<[u8; 20]>(ctx, l3)?;
    if outer[0] != 0x45 {
        return Ok(None);
    }
    let icmp = l3 + 20;
    let kind = skb::load::<u8>(ctx, icmp)?;
    // Destination unreachable, time exceeded, parameter problem.
    if kind != 3 && kind != 11 && kind != 12 {
        return Ok(None);
    }
    let q = icmp + 8;
    let quoted = skb::load::<[u8; 20]>(ctx, q)?;
    if quoted[0] != 0x45 || (quoted[9] != proto::TCP && quoted[9] != proto::UDP) {
        return Ok(None);
    }
    let ports = skb::load::<[u8; 4]>(ctx, q + 20)?;
    let inner = Tuple {
        saddr: [quoted[12], quoted[13], quoted[14], quoted[15]],
        daddr: [quoted[16], quoted[17], quoted[18], quoted[19]],
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto: quoted[9],
    };
    let Some(back) = lookup::<V4>(&inner) else {
        return Ok(None);
    };
    // back: frontend → client. The quoted packet becomes client → frontend.
    let csum = icmp + 2;
    let qcsum = q + 10;
    let new_src = back.daddr;
    let new_dst = back.saddr;
    for (off, old, new) in [
        (q + 12, inner.saddr, new_src),
        (q + 16, inner.daddr, new_dst),
    ] {
        if old != new {
            // The quoted header's own checksum, then the ICMP checksum over both changes.
            let before = skb::load::<[u8; 2]>(ctx, qcsum)?;
            ctx.l3_csum_replace(
                qcsum,
                u32::from_ne_bytes(old) as u64,
                u32::from_ne_bytes(new) as u64,
                4,
            )?;
            let after = skb::load::<[u8; 2]>(ctx, qcsum)?;
            ctx.l4_csum_replace(
                csum,
                u16::from_ne_bytes(before) as u64,
                u16::from_ne_bytes(after) as u64,
                2,
            )?;
            field(ctx, off, csum, &old, &new)?;
        }
    }
    let new_ports = [back.dport.to_be_bytes(), back.sport.to_be_bytes()];
    let old_ports = [[ports[0], ports[1]], [ports[2], ports[3]]];
    for i in 0..2 {
        if old_ports[i] != new_ports[i] {
            field(ctx, q + 20 + 2 * i, csum, &old_ports[i], &new_ports[i])?;
        }
    }
    // Outer header: to the client; from the frontend when the backend wrote the error.
    let outer_src = [outer[12], outer[13], outer[14], outer[15]];
    let outer_dst = [outer[16], outer[17], outer[18], outer[19]];
    let mut to = Tuple {
        saddr: outer_src,
        daddr: new_src,
        sport: 0,
        dport: 0,
        proto: IPPROTO_ICMP,
    };
    if outer_src == inner.daddr {
        to.saddr = new_dst;
    }
    for (off, old, new) in [
        (l3 + 12, outer_src, to.saddr),
        (l3 + 16, outer_dst, to.daddr),
    ] {
        if old != new {
            ctx.l3_csum_replace(
                l3 + 10,
                u32::from_ne_bytes(old) as u64,
                u32::from_ne_bytes(new) as u64,
                4,
            )?;
            ctx.store(off, &new, 0)?;
        }
    }
    Ok(Some(to))
}

#[inline(never)]
pub fn icmp6(ctx: &TcContext) -> i32 {
    match translate6(ctx) {
        Ok(Some(client)) => {
            stats::count(Reason::IcmpTranslated);
            forward::<V6>(ctx, &client, 0)
        }
        _ => TC_ACT_OK as i32,
    }
}

/// Offsets: outer IPv6 header at 14, ICMPv6 at 54, quoted IPv6 header at 62, quoted ports at
/// 102. The ICMPv6 checksum covers the outer addresses too (pseudo header).
fn translate6(ctx: &TcContext) -> Result<Option<Tuple<[u8; 16]>>, i64> {
    let l3 = ETH_HLEN;
    let icmp = l3 + 40;
    let kind = skb::load::<u8>(ctx, icmp)?;
    // Destination unreachable, packet too big, time exceeded, parameter problem.
    if !(1..=4).contains(&kind) {
        return Ok(None);
    }
    let q = icmp + 8;
    let next = skb::load::<u8>(ctx, q + 6)?;
    if next != proto::TCP && next != proto::UDP {
        return Ok(None);
    }
    let qsrc = skb::load::<[u8; 16]>(ctx, q + 8)?;
    let qdst = skb::load::<[u8; 16]>(ctx, q + 24)?;
    let ports = skb::load::<[u8; 4]>(ctx, q + 40)?;
    let inner = Tuple {
        saddr: qsrc,
        daddr: qdst,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto: next,
    };
    let Some(back) = lookup::<V6>(&inner) else {
        return Ok(None);
    };
    let csum = icmp + 2;
    let new_src = back.daddr;
    let new_dst = back.saddr;
    if qsrc != new_src {
        field(ctx, q + 8, csum, &qsrc, &new_src)?;
    }
    if qdst != new_dst {
        field(ctx, q + 24, csum, &qdst, &new_dst)?;
    }
    let new_ports = [back.dport.to_be_bytes(), back.sport.to_be_bytes()];
    let old_ports = [[ports[0], ports[1]], [ports[2], ports[3]]];
    for i in 0..2 {
        if old_ports[i] != new_ports[i] {
            field(ctx, q + 40 + 2 * i, csum, &old_ports[i], &new_ports[i])?;
        }
    }
    let outer_src = skb::load::<[u8; 16]>(ctx, l3 + 8)?;
    let outer_dst = skb::load::<[u8; 16]>(ctx, l3 + 24)?;
    let mut to = Tuple {
        saddr: outer_src,
        daddr: new_src,
        sport: 0,
        dport: 0,
        proto: IPPROTO_ICMPV6,
    };
    if outer_src == qdst {
        to.saddr = new_dst;
    }
    for (off, old, new) in [
        (l3 + 8, outer_src, to.saddr),
        (l3 + 24, outer_dst, to.daddr),
    ] {
        if old != new {
            let diff = diff16(&mut { old }, &mut { new })?;
            ctx.l4_csum_replace(csum, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)?;
            // Stored with a CHECKSUM_COMPLETE skb's packet sum recomputed: the pseudo-header
            // update accounts only for the checksum field's change (`Ip::complete_addrs`).
            ctx.store(off, &new, BPF_F_RECOMPUTE_CSUM as u64)?;
        }
    }
    Ok(Some(to))
}
