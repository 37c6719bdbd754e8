//! Network address translation of a tc packet (`rewrite`), and masquerading source ports: the range the agent configured (`--masquerade-port-range`),
//! kept apart from the node's ephemeral ports so a masqueraded flow never takes the tuple of
//! one of the node's own connections.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use proxy_common::{
    config::{SNAT_PORT_MAX_DEFAULT, SNAT_PORT_MIN_DEFAULT},
    ct::{CT_DSR, CT_REPLY, CT_SNAT, CtKey, CtValue},
    reason::Reason,
};

use super::{
    conns,
    ct::{self, Entry, Tracked},
};
use crate::{
    access::{
        maps::{CLAIM_SCRATCH, CLAIM_SCRATCH_WORDS, LB_CONFIG},
        skb, stats,
    },
    headers::{
        AF_INET, Packet, Tuple, csum,
        family::{Ip, V4, V6},
    },
};

/// Attempts at finding a free masquerading port before giving up on a flow. With 8, a range
/// about 40% held (flows in their 10 s closing time under a connection-per-request load, as in
/// the bench's TCP_CRR runs) dropped about one SYN in 2,000; 32 tries make that 40% hold
/// about 10^-13 (netfilter's NAT tries up to 128 ports).
pub const TRIES: u32 = 32;

/// The configured range as (first port, number of ports); the defaults until the agent wrote
/// one.
#[inline(always)]
pub fn range() -> (u32, u32) {
    match LB_CONFIG.get(0) {
        Some(c) if c.snat_port_max != 0 && c.snat_port_max >= c.snat_port_min => (
            u32::from(c.snat_port_min),
            u32::from(c.snat_port_max - c.snat_port_min) + 1,
        ),
        _ => (
            u32::from(SNAT_PORT_MIN_DEFAULT),
            u32::from(SNAT_PORT_MAX_DEFAULT - SNAT_PORT_MIN_DEFAULT) + 1,
        ),
    }
}

/// The port of attempt `i` for a flow whose current source port is `port`: the client's own
/// port first if it lies in the range (as kube-proxy's MASQUERADE keeps it when it can), a
/// random one of the range otherwise.
#[inline(always)]
pub fn port(i: u32, port: u16, (first, count): (u32, u32)) -> u16 {
    let p = u32::from(port);
    if i == 0 && p >= first && p - first < count {
        return port;
    }
    // SAFETY: plain helper call. (`range` never gives 0 ports; `max` shows the compiler.)
    (first + unsafe { bpf_get_prandom_u32() } % count.max(1)) as u16
}

/// Rewrites `pkt` in place so that its tuple becomes `to`, fixing every checksum: the
/// addresses and the ports each written at once (`skb::write`), the layer-4 checksum through
/// the kernel's helper (by difference: once for the addresses, which are in the pseudo-header,
/// once for the ports), which knows what the skb's checksum state asks (a checksum the device
/// will finish, one the device verified); a packet sum the device computed takes an IPv6
/// address change from `Ip::complete_addrs`. False when the packet could not be rewritten.
/// Out of line, so that its values take no room in the callers' frames (returning a `bool`: a
/// `Result` would come back through a pointer to the caller's stack, which the verifier
/// refuses).
#[inline(never)]
pub fn rewrite<F: Ip>(ctx: &TcContext, pkt: &Packet<F::Addr>, to: &Tuple<F::Addr>) -> bool {
    rewrite_in::<F>(ctx, pkt, to).is_ok()
}

#[inline(always)]
fn rewrite_in<F: Ip>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    to: &Tuple<F::Addr>,
) -> Result<(), i64> {
    let (csum_off, mangled) = pkt.csum().ok_or(-1i64)?;
    // The headers up to the ports in the linear data, for the writes.
    if !skb::linear(ctx, pkt.l4 + 4) {
        return Err(-1);
    }
    if to.saddr != pkt.t.saddr || to.daddr != pkt.t.daddr {
        let diff = F::write_addrs(ctx, pkt, to)?;
        ctx.l4_csum_replace(
            csum_off,
            0,
            u64::from(diff),
            BPF_F_PSEUDO_HDR as u64 | mangled,
        )?;
        F::complete_addrs(ctx, diff);
    }
    if to.sport != pkt.t.sport || to.dport != pkt.t.dport {
        let (o, n) = (pkt.t.sport.to_be_bytes(), pkt.t.dport.to_be_bytes());
        let old = [o[0], o[1], n[0], n[1]];
        let (o, n) = (to.sport.to_be_bytes(), to.dport.to_be_bytes());
        let new = [o[0], o[1], n[0], n[1]];
        skb::write(ctx, pkt.l4, &new)?;
        ctx.l4_csum_replace(csum_off, 0, u64::from(csum::diff(&old, &new)), mangled)?;
    }
    Ok(())
}

/// `rewrite` for a flow's first packet, and at tc egress: field by field through the kernel's
/// helpers (a store and its checksum updates per changed address or port), which costs more
/// calls but keeps the new-flow paths' frames, at the verifier's limit, as small as they are,
/// and keeps direct packet writes out of `tc_egress` (see `host_reply`). The packets of a
/// tracked flow at ingress, which are most of them, take `rewrite`.
#[inline(always)]
pub fn rewrite_first<F: Ip>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    to: &Tuple<F::Addr>,
) -> Result<(), i64> {
    let (csum_off, mangled) = pkt.csum().ok_or(-1i64)?;
    if to.saddr != pkt.t.saddr {
        F::set_addr(ctx, pkt, pkt.l3 + F::SADDR_OFF, &pkt.t.saddr, &to.saddr)?;
    }
    if to.daddr != pkt.t.daddr {
        F::set_addr(ctx, pkt, pkt.l3 + F::DADDR_OFF, &pkt.t.daddr, &to.daddr)?;
    }
    for (off, old, new) in [(0usize, pkt.t.sport, to.sport), (2, pkt.t.dport, to.dport)] {
        if old != new {
            let (o, n) = (old.to_be(), new.to_be());
            ctx.l4_csum_replace(csum_off, o as u64, n as u64, mangled | 2)?;
            ctx.store(pkt.l4 + off, &n, 0)?;
        }
    }
    Ok(())
}

/// Writes the reply entry `reply` of a new flow whose translated tuple is `to`, claiming its
/// masquerading port when `snat` (`claim_ports`; `to.sport` is the port claimed). Without
/// masquerading the entry is written once (`insert`, given the reply key and the map flags),
/// over any stale one. False when it could not be written.
#[inline(always)]
pub fn claim_reply<F: Tracked>(
    to: &mut Tuple<F::Addr>,
    reply: &Entry<F::Addr>,
    snat: bool,
    syn: bool,
    now: u64,
    mut insert: impl FnMut(&Tuple<F::Addr>, u64) -> bool,
) -> bool {
    if !snat {
        return insert(&to.reversed(), BPF_ANY as u64);
    }
    let Some(c) = CLAIM_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the per-CPU value holds a `Claim` of either family (asserted at `claim_ports`),
    // 8-byte aligned, and is this program's alone while it runs (programs do not nest on a CPU
    // at tc and XDP); written in full before the claim reads it.
    let c = unsafe { &mut *c.cast::<Claim<F::Addr>>() };
    c.to = *to;
    c.key = ct::ct_key(&to.reversed());
    c.value = ct::ct_value(reply, now, 0);
    let syn = u32::from(syn);
    let got = if F::AF == AF_INET {
        kbp_claim_port4(syn)
    } else {
        kbp_claim_port6(syn)
    };
    if got & CLAIMED == 0 {
        return false;
    }
    to.sport = got as u16;
    true
}

/// What a port claim works on (`claim_ports`), in `CLAIM_SCRATCH`: no room is left on the
/// stack of the new-flow paths that call it.
struct Claim<A> {
    /// The flow's translated tuple; its source port is the one being tried.
    to: Tuple<A>,
    /// The reply entry's key (`to` reversed) and value, as `Tracked::ct_insert` writes them.
    key: CtKey<A>,
    value: CtValue<A>,
    /// The masquerading range (`range`), kept here rather than in registers the loop's helper
    /// calls would make the compiler spill to the stack.
    first: u32,
    count: u32,
}

/// In `kbp_claim_port4`'s and `kbp_claim_port6`'s answer: a port was claimed (the low 16 bits).
const CLAIMED: u32 = 1 << 16;

/// `claim_ports` for IPv4, as a global BPF function (exported by `build.rs`), like
/// `services::lb::kbp_least_conn`: the verifier checks its 32 tries once, not again for every
/// path of every new flow that reaches them. Scalars in and out, as a global function's
/// interface must be; the tuple and entry are in `CLAIM_SCRATCH`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn kbp_claim_port4(syn: u32) -> u32 {
    claim_ports::<V4>(syn != 0)
}

/// `claim_ports` for IPv6 (see `kbp_claim_port4`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn kbp_claim_port6(syn: u32) -> u32 {
    claim_ports::<V6>(syn != 0)
}

/// Writes the reply entry in `CLAIM_SCRATCH` at the first free masquerading port for its
/// translated tuple: the client's own port if it lies in the masquerading range, else (and
/// after a collision) random ones of the range, `TRIES` at most. A new TCP connection (`syn`)
/// may take over a port a closed flow holds (`ct::take_over_closed`) at every try, as
/// netfilter's NAT lets it reuse a closed connection's tuple. `CLAIMED` and the port, or 0.
#[inline(always)]
fn claim_ports<F: Tracked>(syn: bool) -> u32 {
    const { assert!(core::mem::size_of::<Claim<F::Addr>>() <= CLAIM_SCRATCH_WORDS * 8) };
    let Some(c) = CLAIM_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: as in `claim_reply`, which wrote it in full for this family before the call.
    let c = unsafe { &mut *c.cast::<Claim<F::Addr>>() };
    (c.first, c.count) = range();
    for i in 0..TRIES {
        c.to.sport = port(i, c.to.sport, (c.first, c.count));
        c.key.dport = c.to.sport;
        if F::ct_put(&c.key, &c.value, BPF_NOEXIST as u64).is_ok() {
            return CLAIMED | u32::from(c.to.sport);
        }
        if syn
            && ct::take_over_closed::<F>(&c.key)
            && F::ct_put(&c.key, &c.value, BPF_ANY as u64).is_ok()
        {
            stats::count(Reason::SnatPortReused);
            return CLAIMED | u32::from(c.to.sport);
        }
    }
    0
}

/// Why a new flow whose reply entry `claim_reply` could not write is dropped.
#[inline(always)]
pub fn claim_failure(snat: bool) -> Reason {
    if snat {
        Reason::SnatPortsExhausted
    } else {
        Reason::CtFailed
    }
}

/// Records a new flow, at tc and at XDP alike: the reply entry first (it claims the
/// masquerading port, so `to.sport` may change; a DSR flow has none: its replies never come
/// back here), then the forward entry. `entry` comes in with the flow's `flags` (`CT_SNAT`,
/// `CT_DSR` or 0), `svc_id` and `backend_id`, and is left as the forward entry. A
/// least-connection flow (`counted`) takes its count before its forward entry exists, so the
/// count is never given back before it was taken; an entry its forward entry replaces gives
/// its own count back first (`Tracked::ct_insert`). `insert` writes one entry (key, entry, map
/// flags, counted); it and the port claim write entries as `Tracked::ct_insert` would at time
/// `now`. Err: why the flow could not be recorded.
#[inline(always)]
pub fn record<F: Tracked>(
    t: &Tuple<F::Addr>,
    to: &mut Tuple<F::Addr>,
    entry: &mut Entry<F::Addr>,
    counted: bool,
    syn: bool,
    now: u64,
    insert: impl Fn(&Tuple<F::Addr>, &Entry<F::Addr>, u64, u64) -> bool,
) -> Result<(), Reason> {
    let flags = entry.flags;
    let snat = flags & CT_SNAT != 0;
    if flags & CT_DSR == 0 {
        entry.to = t.reversed();
        entry.flags = flags | CT_REPLY;
        let reply = &*entry;
        if !claim_reply::<F>(to, reply, snat, syn, now, |key, map_flags| {
            insert(key, reply, map_flags, 0)
        }) {
            return Err(claim_failure(snat));
        }
    }
    entry.to = *to;
    entry.flags = flags;
    if counted {
        conns::take(entry.backend_id);
    }
    if !insert(t, entry, BPF_ANY as u64, counted as u64) {
        if counted {
            conns::untake(entry.backend_id);
        }
        return Err(Reason::CtFailed);
    }
    Ok(())
}
