//! IP fragments at tc and XDP. Only a datagram's first fragment carries its ports, so the first
//! fragment's ports are remembered by (source, destination, identification, protocol) in
//! `LB_FRAG4` (IPv6: `LB_FRAG6`), and each later fragment is translated as the flow those ports name (addresses
//! only: a later fragment has no layer-4 header, and the datagram's checksum, in the first
//! fragment, was updated with it). A later fragment that arrives before its first one, or whose
//! datagram belongs to no tracked flow, passes untouched (counted as `fragment`): without the
//! first fragment's ports nothing says which flow it is, and the stack's reassembly gives up on
//! it as it would without this node's translation.
//!
//! At XDP a first fragment is remembered the same way and translated as any packet; a later
//! fragment whose flow is tracked and goes back out of the interface it came in on is
//! translated and transmitted there too. The rest (a later fragment of no known flow, or of a
//! DSR flow, or routed elsewhere) passes to tc, which handles it as above.

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, xdp_action::XDP_PASS},
    helpers::bpf_ktime_get_ns,
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    ct::{CT_DSR, Frag4Key, Frag6Key, FragPorts},
    proto,
    reason::Reason,
};

use crate::{
    access::{
        maps::{LB_FRAG4, LB_FRAG6, XDP_SCRATCH, XDP_SCRATCH_WORDS},
        skb, stats,
        xdp::{bounds, read_in},
    },
    flow::{
        ct::{Entry, Tracked},
        fib::forward,
        xdp::{Hop, hop, transmit},
    },
    headers::{
        ETH_HLEN, FRAG_MORE, FRAG_OFFSET, FRAG6_OFFSET, IPPROTO_FRAGMENT, Packet, Tuple,
        family::{V4, V6},
        xdp::XdpIp,
    },
};

/// The key of the datagram of the IPv4 header `h`, if TCP or UDP.
#[inline(always)]
fn key(h: &[u8; 20]) -> Option<Frag4Key> {
    (h[9] == proto::TCP || h[9] == proto::UDP).then(|| Frag4Key {
        saddr: [h[12], h[13], h[14], h[15]],
        daddr: [h[16], h[17], h[18], h[19]],
        id: u16::from_be_bytes([h[4], h[5]]),
        proto: h[9],
        _pad: 0,
    })
}

/// The ports of a first fragment's layer-4 header bytes.
#[inline(always)]
fn ports_of(bytes: [u8; 4]) -> FragPorts {
    FragPorts {
        sport: u16::from_be_bytes([bytes[0], bytes[1]]),
        dport: u16::from_be_bytes([bytes[2], bytes[3]]),
    }
}

/// The entry of the tracked flow `t`, refreshed, if any.
#[inline(always)]
fn tracked<F: Tracked>(t: &Tuple<F::Addr>) -> Option<Entry<F::Addr>> {
    let ptr = F::ct_lookup(t)?;
    // SAFETY: `ptr` came from the lookup; a helper without arguments.
    unsafe { F::ct_touch(ptr, bpf_ktime_get_ns(), 0) };
    // SAFETY: `ptr` came from the lookup.
    Some(unsafe { F::ct_read(ptr) })
}

/// Forwards a later fragment rewritten for `to`, or passes it untouched (`None`); counted
/// either way.
#[inline(always)]
fn forward_or_pass<F: Tracked>(ctx: &TcContext, to: Option<Tuple<F::Addr>>) -> i32 {
    match to {
        Some(to) => {
            stats::count(Reason::FragmentTranslated);
            forward::<F>(ctx, &to, 0)
        }
        None => {
            stats::count(Reason::Fragment);
            TC_ACT_OK as i32
        }
    }
}

/// Remembers the ports of a first fragment (more-fragments set, offset 0).
#[inline(never)]
pub fn remember_first4(ctx: &TcContext) {
    let Ok(h) = skb::load::<[u8; 20]>(ctx, ETH_HLEN) else {
        return;
    };
    let Some(key) = key(&h) else {
        return;
    };
    let l4 = ETH_HLEN + ((h[0] & 0x0f) as usize) * 4;
    let Ok(ports) = skb::load::<[u8; 4]>(ctx, l4) else {
        return;
    };
    // Losing an entry (the LRU map full of other datagrams) loses this datagram only.
    let _ = LB_FRAG4.insert(&key, &ports_of(ports), 0);
}

/// A later fragment (non-zero offset): translated and forwarded as its datagram's tracked
/// flow, or passed untouched.
#[inline(never)]
pub fn later4(ctx: &TcContext) -> i32 {
    forward_or_pass::<V4>(ctx, translate4(ctx))
}

#[inline(always)]
fn translate4(ctx: &TcContext) -> Option<Tuple<[u8; 4]>> {
    let h = skb::load::<[u8; 20]>(ctx, ETH_HLEN).ok()?;
    let key = key(&h)?;
    // SAFETY: a map lookup whose value is used at once.
    let ports = *unsafe { LB_FRAG4.get(&key) }?;
    let t = Tuple {
        saddr: key.saddr,
        daddr: key.daddr,
        sport: ports.sport,
        dport: ports.dport,
        proto: key.proto,
    };
    let e = tracked::<V4>(&t)?;
    for (off, old, new) in [(12, t.saddr, e.to.saddr), (16, t.daddr, e.to.daddr)] {
        if old != new {
            ctx.l3_csum_replace(
                ETH_HLEN + 10,
                u32::from_ne_bytes(old) as u64,
                u32::from_ne_bytes(new) as u64,
                4,
            )
            .ok()?;
            ctx.store(ETH_HLEN + off, &new, 0).ok()?;
        }
    }
    Some(Tuple {
        proto: key.proto,
        ..e.to
    })
}

/// The key of the IPv6 datagram whose fixed header is `h` and fragment header `f`, if TCP or
/// UDP.
#[inline(always)]
fn key6(h: &[u8; 40], f: &[u8; 8]) -> Option<Frag6Key> {
    if f[0] != proto::TCP && f[0] != proto::UDP {
        return None;
    }
    let mut key = Frag6Key {
        saddr: [0; 16],
        daddr: [0; 16],
        id: u32::from_be_bytes([f[4], f[5], f[6], f[7]]),
        proto: f[0],
        _pad: [0; 3],
    };
    let mut i = 0;
    while i < 16 {
        key.saddr[i] = h[8 + i];
        key.daddr[i] = h[24 + i];
        i += 1;
    }
    Some(key)
}

/// Remembers the ports of an IPv6 first fragment (offset 0, more fragments).
#[inline(never)]
pub fn remember_first6(ctx: &TcContext) {
    let (Ok(h), Ok(f)) = (
        skb::load::<[u8; 40]>(ctx, ETH_HLEN),
        skb::load::<[u8; 8]>(ctx, ETH_HLEN + 40),
    ) else {
        return;
    };
    let Some(key) = key6(&h, &f) else {
        return;
    };
    let Ok(ports) = skb::load::<[u8; 4]>(ctx, ETH_HLEN + 48) else {
        return;
    };
    let _ = LB_FRAG6.insert(&key, &ports_of(ports), 0);
}

/// An IPv6 later fragment: as `later4` (IPv6 has no header checksum; a later fragment no
/// layer-4 one).
#[inline(never)]
pub fn later6(ctx: &TcContext) -> i32 {
    forward_or_pass::<V6>(ctx, translate6(ctx))
}

#[inline(always)]
fn translate6(ctx: &TcContext) -> Option<Tuple<[u8; 16]>> {
    let h = skb::load::<[u8; 40]>(ctx, ETH_HLEN).ok()?;
    let f = skb::load::<[u8; 8]>(ctx, ETH_HLEN + 40).ok()?;
    let key = key6(&h, &f)?;
    // SAFETY: a map lookup whose value is used at once.
    let ports = *unsafe { LB_FRAG6.get(&key) }?;
    let t = Tuple {
        saddr: key.saddr,
        daddr: key.daddr,
        sport: ports.sport,
        dport: ports.dport,
        proto: key.proto,
    };
    let e = tracked::<V6>(&t)?;
    // No header checksum absorbs the addresses' change (and a later fragment has no layer-4
    // one): a CHECKSUM_COMPLETE skb's packet sum takes it, recomputed by the store.
    if t.saddr != e.to.saddr {
        ctx.store(ETH_HLEN + 8, &e.to.saddr, BPF_F_RECOMPUTE_CSUM as u64)
            .ok()?;
    }
    if t.daddr != e.to.daddr {
        ctx.store(ETH_HLEN + 24, &e.to.daddr, BPF_F_RECOMPUTE_CSUM as u64)
            .ok()?;
    }
    Some(Tuple {
        proto: key.proto,
        ..e.to
    })
}

/// The tuple a later fragment's datagram had before translation: its addresses and protocol,
/// and the ports its first fragment left in `ports`.
#[inline(always)]
fn tuple_of<A>(saddr: A, daddr: A, proto: u8, ports: &FragPorts) -> Tuple<A> {
    Tuple {
        saddr,
        daddr,
        sport: ports.sport,
        dport: ports.dport,
        proto,
    }
}

/// Returned by `fragments4_xdp`/`fragments6_xdp` for a packet that is no later fragment: not
/// an XDP action.
pub const NOT_LATER: u32 = u32::MAX;

/// XDP, IPv4: a later fragment's verdict; else `NOT_LATER`, the ports of a first fragment
/// remembered.
#[inline(never)]
pub fn fragments4_xdp(ctx: &XdpContext) -> u32 {
    let frag = read_in::<[u8; 2]>(bounds(ctx), ETH_HLEN + 6).map_or(0, u16::from_be_bytes);
    if frag & FRAG_OFFSET != 0 {
        return later4_xdp(ctx);
    }
    if frag & FRAG_MORE != 0 {
        remember_first4_xdp(ctx);
    }
    NOT_LATER
}

/// XDP, IPv6: as `fragments4_xdp`.
#[inline(never)]
pub fn fragments6_xdp(ctx: &XdpContext) -> u32 {
    let b = bounds(ctx);
    if read_in::<u8>(b, ETH_HLEN + 6) != Some(IPPROTO_FRAGMENT) {
        return NOT_LATER;
    }
    let frag = read_in::<[u8; 2]>(b, ETH_HLEN + 42).map_or(0, u16::from_be_bytes);
    if frag & FRAG6_OFFSET != 0 {
        return later6_xdp(ctx);
    }
    remember_first6_xdp(ctx);
    NOT_LATER
}

/// XDP: remembers the ports of an IPv4 first fragment (more-fragments set, offset 0).
#[inline(never)]
fn remember_first4_xdp(ctx: &XdpContext) {
    let b = bounds(ctx);
    let Some(h) = read_in::<[u8; 20]>(b, ETH_HLEN) else {
        return;
    };
    let Some(key) = key(&h) else {
        return;
    };
    let l4 = ETH_HLEN + ((h[0] & 0x0f) as usize) * 4;
    let Some(ports) = read_in::<[u8; 4]>(b, l4) else {
        return;
    };
    let _ = LB_FRAG4.insert(&key, &ports_of(ports), 0);
}

/// XDP: an IPv4 later fragment, translated and transmitted as its datagram's tracked flow, or
/// passed to tc.
#[inline(always)]
fn later4_xdp(ctx: &XdpContext) -> u32 {
    if later_tuple4(ctx) {
        later_xdp::<V4>(ctx)
    } else {
        XDP_PASS
    }
}

/// Writes the tuple of the IPv4 later fragment's datagram (its first fragment's ports) to the
/// scratch space; false when there is none.
#[inline(never)]
fn later_tuple4(ctx: &XdpContext) -> bool {
    let b = bounds(ctx);
    let Some(h) = read_in::<[u8; 20]>(b, ETH_HLEN) else {
        return false;
    };
    // Options: tc's (`XdpIp::set_addrs` knows a 20-byte header only).
    if h[0] != 0x45 {
        return false;
    }
    let Some(key) = key(&h) else {
        return false;
    };
    // SAFETY: a map lookup whose value is copied at once.
    let Some(ports) = (unsafe { LB_FRAG4.get(&key) }).copied() else {
        return false;
    };
    let Some(t) = scratch_tuple::<[u8; 4]>() else {
        return false;
    };
    // SAFETY: the per-CPU scratch value, large enough (checked in `scratch_tuple`).
    unsafe { *t = tuple_of(key.saddr, key.daddr, key.proto, &ports) };
    true
}

/// XDP: remembers the ports of an IPv6 first fragment (offset 0, more fragments).
#[inline(never)]
fn remember_first6_xdp(ctx: &XdpContext) {
    let b = bounds(ctx);
    let (Some(key), Some(ports)) = (key6_xdp(b), read_in::<[u8; 4]>(b, ETH_HLEN + 48)) else {
        return;
    };
    let _ = LB_FRAG6.insert(&key, &ports_of(ports), 0);
}

/// The key of the IPv6 fragment in the frame within `b`, if TCP or UDP, read straight from the
/// frame (no copy of the whole header: the callers' frames must stay small).
#[inline(always)]
fn key6_xdp(b: (usize, usize)) -> Option<Frag6Key> {
    let f = read_in::<[u8; 8]>(b, ETH_HLEN + 40)?;
    if f[0] != proto::TCP && f[0] != proto::UDP {
        return None;
    }
    Some(Frag6Key {
        saddr: read_in::<[u8; 16]>(b, ETH_HLEN + 8)?,
        daddr: read_in::<[u8; 16]>(b, ETH_HLEN + 24)?,
        id: u32::from_be_bytes([f[4], f[5], f[6], f[7]]),
        proto: f[0],
        _pad: [0; 3],
    })
}

/// XDP: an IPv6 later fragment, as `later4_xdp`.
#[inline(always)]
fn later6_xdp(ctx: &XdpContext) -> u32 {
    if later_tuple6(ctx) {
        later_xdp::<V6>(ctx)
    } else {
        XDP_PASS
    }
}

/// As `later_tuple4`, for IPv6.
#[inline(never)]
fn later_tuple6(ctx: &XdpContext) -> bool {
    let Some(key) = key6_xdp(bounds(ctx)) else {
        return false;
    };
    // SAFETY: a map lookup whose value is copied at once.
    let Some(ports) = (unsafe { LB_FRAG6.get(&key) }).copied() else {
        return false;
    };
    let Some(t) = scratch_tuple::<[u8; 16]>() else {
        return false;
    };
    // SAFETY: the per-CPU scratch value, large enough (checked in `scratch_tuple`).
    unsafe { *t = tuple_of(key.saddr, key.daddr, key.proto, &ports) };
    true
}

/// The per-CPU `XDP_SCRATCH` value as a tuple: a later fragment's, from `later_tuple4`/`6` to
/// `later_xdp` (the new-flow path, its other user, does not run for the same packet).
#[inline(always)]
fn scratch_tuple<A>() -> Option<*mut Tuple<A>> {
    const { assert!(core::mem::size_of::<Tuple<A>>() <= XDP_SCRATCH_WORDS * 8) };
    XDP_SCRATCH.get_ptr_mut(0).map(|p| p.cast())
}

/// XDP: a later fragment of the datagram whose tuple `later_tuple4`/`6` left in the scratch
/// space: its addresses rewritten (with the IPv4 header checksum and the TTL or hop limit) as
/// its tracked flow says, and transmitted, when that flow goes back out of this interface;
/// else passed to tc. Out of line: the FIB's answer stays out of the hook's frame.
#[inline(never)]
fn later_xdp<F: XdpIp + Tracked>(ctx: &XdpContext) -> u32 {
    let Some(t) = scratch_tuple::<F::Addr>() else {
        return XDP_PASS;
    };
    // SAFETY: the per-CPU scratch value `later_tuple4`/`6` filled for this packet.
    let t = unsafe { &*t };
    let Some(e) = tracked::<F>(t) else {
        return XDP_PASS;
    };
    // A DSR flow's packets carry its option, added at tc for later fragments.
    if e.flags & CT_DSR != 0 {
        return XDP_PASS;
    }
    let mut h = core::mem::MaybeUninit::uninit();
    if !hop::<F>(ctx, &e.to, false, &mut h) {
        return XDP_PASS;
    }
    // SAFETY: `hop` filled every field when it returned true.
    let h: &Hop<F::Addr> = unsafe { h.assume_init_ref() };
    if h.ifindex != ctx.ingress_ifindex() as u32 {
        return XDP_PASS;
    }
    let pkt = Packet {
        t: *t,
        l3: ETH_HLEN,
        l4: 0,
        tcp_flags: 0,
    };
    // A later fragment has no layer-4 header: the checksum `set_addrs` returns is unused.
    if F::set_addrs(ctx, &pkt, &e.to, [0, 0]).is_none() {
        return XDP_PASS;
    }
    stats::count(Reason::FragmentTranslated);
    stats::count(Reason::XdpForwarded);
    transmit(ctx, h.smac, h.dmac)
}
