//! IP fragments at tc. Only a datagram's first fragment carries its ports, so the first
//! fragment's ports are remembered by (source, destination, identification, protocol) in
//! `LB_FRAG4` (IPv6: `LB_FRAG6`), and each later fragment is translated as the flow those ports name (addresses
//! only: a later fragment has no layer-4 header, and the datagram's checksum, in the first
//! fragment, was updated with it). A later fragment that arrives before its first one, or whose
//! datagram belongs to no tracked flow, passes untouched (counted as `fragment`): without the
//! first fragment's ports nothing says which flow it is, and the stack's reassembly gives up on
//! it as it would without this node's translation.

use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_ktime_get_ns, programs::TcContext};
use proxy_common::{
    ct::{Frag4Key, Frag6Key, FragPorts},
    proto,
    reason::Reason,
};

use crate::{
    access::{
        maps::{LB_FRAG4, LB_FRAG6},
        stats,
    },
    flow::{
        ct::{Entry, Tracked},
        fib::forward,
    },
    headers::{
        ETH_HLEN, Tuple,
        family::{V4, V6},
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
    let Ok(h) = ctx.load::<[u8; 20]>(ETH_HLEN) else {
        return;
    };
    let Some(key) = key(&h) else {
        return;
    };
    let l4 = ETH_HLEN + ((h[0] & 0x0f) as usize) * 4;
    let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
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
    let h = ctx.load::<[u8; 20]>(ETH_HLEN).ok()?;
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
        ctx.load::<[u8; 40]>(ETH_HLEN),
        ctx.load::<[u8; 8]>(ETH_HLEN + 40),
    ) else {
        return;
    };
    let Some(key) = key6(&h, &f) else {
        return;
    };
    let Ok(ports) = ctx.load::<[u8; 4]>(ETH_HLEN + 48) else {
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
    let h = ctx.load::<[u8; 40]>(ETH_HLEN).ok()?;
    let f = ctx.load::<[u8; 8]>(ETH_HLEN + 40).ok()?;
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
    if t.saddr != e.to.saddr {
        ctx.store(ETH_HLEN + 8, &e.to.saddr, 0).ok()?;
    }
    if t.daddr != e.to.daddr {
        ctx.store(ETH_HLEN + 24, &e.to.daddr, 0).ok()?;
    }
    Some(Tuple {
        proto: key.proto,
        ..e.to
    })
}
