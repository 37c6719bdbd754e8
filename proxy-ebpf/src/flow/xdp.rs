//! Flows at XDP: packets of tracked flows translated and transmitted (`handle`), and a new
//! flow recorded, translated and transmitted once the services layer chose its backend
//! (`commit`).

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LOOKUP_SRC, bpf_fib_lookup,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use proxy_common::{
    ct::CT_DSR,
    proto,
    reason::{Hook, Reason},
};

use crate::{
    access::{
        stats,
        xdp::{read, write},
    },
    flow::{
        ct::{Entry, Tracked, ct_flags_of, keeps_entry},
        dsr::{self, Dsr},
        fib,
        hops::{self, Hops},
        monitor, nat,
    },
    headers::{Packet, Tuple, csum::csum_update, xdp::XdpIp},
};

/// Rewrites the packet's tuple to `to` with every checksum.
#[inline(never)]
fn rewrite<F: XdpIp + Tracked>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    to: &Tuple<F::Addr>,
) -> Option<()> {
    let csum_off = if pkt.t.proto == proto::TCP {
        pkt.l4 + 16
    } else {
        pkt.l4 + 6
    };
    let before = read::<[u8; 2]>(ctx, csum_off)?;
    // An IPv4 UDP datagram without checksum keeps none.
    let none = pkt.t.proto == proto::UDP && before == [0, 0];
    let mut sum = F::set_addrs(ctx, pkt, to, before)?;
    for (off, old, new) in [(0usize, pkt.t.sport, to.sport), (2, pkt.t.dport, to.dport)] {
        if old != new {
            sum = csum_update(sum, &old.to_be_bytes(), &new.to_be_bytes());
            write(ctx, pkt.l4 + off, new.to_be_bytes())?;
        }
    }
    if none {
        return Some(());
    }
    if pkt.t.proto == proto::UDP && sum == [0, 0] {
        sum = [0xff, 0xff];
    }
    write(ctx, csum_off, sum)
}

/// The FIB's answer for `t` arriving here: egress interface, MAC addresses, source address.
#[derive(Clone, Copy)]
pub struct Hop<A> {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub src: A,
}

/// Fills every field of `out` with the FIB's answer; false, `out` untouched, when the packet
/// is not forwardable here or its neighbour is not resolved yet (tc and the stack deal with
/// it). `out` may be uninitialised: the callers do not zero it (which compiles to calls of the
/// byte-wise `memset` on every packet). Not inlined, like `insert`: it keeps the lookup's
/// buffer out of the callers' frames.
#[inline(never)]
pub fn hop<F: Tracked>(
    ctx: &XdpContext,
    t: &Tuple<F::Addr>,
    want_src: bool,
    out: &mut MaybeUninit<Hop<F::Addr>>,
) -> bool {
    let mut buf = core::mem::MaybeUninit::uninit();
    let p = fib::zero(&mut buf);
    fib::params::<F>(p, t, ctx.ingress_ifindex() as u32);
    let flags = if want_src { BPF_FIB_LOOKUP_SRC } else { 0 };
    // SAFETY: valid context and buffer.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), p, size_of::<bpf_fib_lookup>() as i32, flags) };
    if rc != 0 {
        return false;
    }
    out.write(Hop {
        ifindex: p.ifindex,
        smac: p.smac,
        dmac: p.dmac,
        src: F::fib_src(p),
    });
    true
}

/// `recall`'s answer when it filled the next hop in.
const RECALLED: u64 = u64::MAX;

/// The next hop this CPU remembers (`flow::hops`) for a tracked flow's packet, translated to
/// `t`, that arrived on `here` at `now` (the coarse clock): filled into `out` if there is one
/// (`RECALLED`); otherwise the route generation as of now, for `remember` to keep the FIB's
/// answer under (a change during the lookup moves the generation past it). Out of line, and
/// `hop` is not called from here: the two frames never add up (the place is not kept in the
/// caller's frame either, which is at the stack's limit).
#[inline(never)]
fn recall<F: Hops>(
    t: &Tuple<F::Addr>,
    here: u32,
    now: u64,
    out: &mut MaybeUninit<Hop<F::Addr>>,
) -> u64 {
    let at = hops::place::<F>(t, here, now);
    let Some(s) = hops::xdp_slot::<F>(&at) else {
        return u64::from(at.generation());
    };
    if !hops::holds(&s.head, t, &at) {
        return u64::from(at.generation());
    }
    out.write(Hop {
        ifindex: s.ifindex,
        smac: s.smac,
        dmac: s.dmac,
        src: t.saddr,
    });
    RECALLED
}

/// Keeps `h`, the FIB's answer for a tracked flow's packet translated to `t` that arrived on
/// `here` at `now`, in route generation `generation` (`recall`'s), for `recall`.
#[inline(never)]
fn remember<F: Hops>(t: &Tuple<F::Addr>, here: u32, now: u64, generation: u64, h: &Hop<F::Addr>) {
    let at = hops::place_in::<F>(t, here, now, generation as u32);
    let Some(s) = hops::xdp_slot::<F>(&at) else {
        return;
    };
    hops::claim(&mut s.head, t, &at);
    s.ifindex = h.ifindex;
    s.smac = h.smac;
    s.dmac = h.dmac;
}

/// `F::ct_insert`, out of line.
#[inline(never)]
fn insert<F: Tracked>(t: &Tuple<F::Addr>, e: &Entry<F::Addr>, now: u64, map_flags: u64) -> bool {
    F::ct_insert(t, e, now, map_flags, 0).is_ok()
}

/// Sends the rewritten frame back out of this interface to the next hop.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, smac: [u8; 6], dmac: [u8; 6]) -> u32 {
    if write(ctx, 0, dmac).is_none() || write(ctx, 6, smac).is_none() {
        stats::dropped(Hook::Xdp, Reason::RewriteFailed);
        return XDP_DROP;
    }
    XDP_TX
}

/// Packets of tracked flows; `None` for the first packet of a flow.
#[inline(never)]
pub fn handle<F: XdpIp + Dsr + Hops>(ctx: &XdpContext) -> Option<u32> {
    let Some(pkt) = F::parse_xdp(ctx) else {
        return Some(XDP_PASS);
    };
    // The clock as of the last tick, as at tc (`flow::tc::handle`).
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let here = ctx.ingress_ifindex() as u32;
    if let Some(ptr) = F::ct_lookup(&pkt.t) {
        // SAFETY: from the lookup.
        let mut e = unsafe { F::ct_read(ptr) };
        if keeps_entry::<F>(ptr, &e, &pkt) {
            e.to.proto = pkt.t.proto;
            let mut h = MaybeUninit::uninit();
            // DSR names this node in the option: its address on the way is needed (looked up
            // each time; the others' next hop is remembered).
            let dsr = e.flags & CT_DSR != 0;
            let recalled = if dsr {
                0
            } else {
                recall::<F>(&e.to, here, now, &mut h)
            };
            if recalled != RECALLED && !hop::<F>(ctx, &e.to, dsr, &mut h) {
                return Some(XDP_PASS);
            }
            // SAFETY: `recall` or `hop` filled every field when it said so.
            let h = unsafe { h.assume_init_ref() };
            if recalled != RECALLED && !dsr {
                remember::<F>(&e.to, here, now, recalled, h);
            }
            if h.ifindex != here {
                return Some(XDP_PASS);
            }
            // Too big with the option: tc answers it (`dsr::send_remembered`).
            if dsr && dsr::fits::<F, _>(ctx, h.ifindex).is_err() {
                return Some(XDP_PASS);
            }
            // SAFETY: `ptr` came from the lookup above.
            unsafe { F::ct_touch(ptr, now, ct_flags_of(pkt.tcp_flags)) };
            if rewrite::<F>(ctx, &pkt, &e.to).is_none() {
                monitor::dropped::<F>(Hook::Xdp, Reason::RewriteFailed, e.svc_id, &pkt.t);
                return Some(XDP_DROP);
            }
            stats::count(Reason::XdpForwarded);
            if dsr {
                return Some(dsr_out::<F>(ctx, &pkt.t, h));
            }
            return Some(transmit(ctx, h.smac, h.dmac));
        }
    }
    None
}

/// What `new_flow` decided, for `commit`.
pub struct Meta {
    /// `CT_SNAT`, `CT_DSR` or 0.
    pub flags: u32,
    pub svc_id: u32,
    pub backend_id: u32,
    /// `Translated` or `AffinityHit`, for the monitor.
    pub reason: Reason,
    pub now: u64,
}

/// A new flow's translation at XDP: filled by the services layer (`to`, `meta`, `hop`),
/// completed by `commit` (`entry`). Kept by the caller in per-CPU scratch space,
/// not on the stack: the IPv6 entries would not fit the call chain's 512 bytes.
pub struct Commit<A> {
    /// The translated tuple (its source port is the masquerading port once claimed).
    pub to: Tuple<A>,
    pub meta: Meta,
    pub hop: Hop<A>,
    /// The flow's entry: written as the reply entry, then as the forward one (`nat::record`).
    pub entry: Entry<A>,
}

/// Records the flow (reply entry first: it claims the masquerading port), rewrites the packet
/// and transmits it. Out of line so its work does not add to the new flow's frame.
#[inline(never)]
pub fn commit<F: XdpIp + Dsr>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    c: &mut Commit<F::Addr>,
) -> u32 {
    let dsr = c.meta.flags & CT_DSR != 0;
    let now = c.meta.now;
    c.entry = Entry {
        to: c.to,
        flags: c.meta.flags,
        svc_id: c.meta.svc_id,
        backend_id: c.meta.backend_id,
    };
    // Flows that hold least-connection counts are started at tc: none is counted here.
    match nat::record::<F>(
        &pkt.t,
        &mut c.to,
        &mut c.entry,
        false,
        pkt.syn(),
        now,
        |k, e, mf, _| insert::<F>(k, e, now, mf),
    ) {
        Ok(()) => {}
        // A full conntrack map: tc, which tries again, drops and counts it if it fails too.
        Err(Reason::CtFailed) => {
            stats::count(Reason::CtFailed);
            return XDP_PASS;
        }
        Err(reason) => {
            monitor::dropped::<F>(Hook::Xdp, reason, c.meta.svc_id, &pkt.t);
            return XDP_DROP;
        }
    }
    if rewrite::<F>(ctx, pkt, &c.to).is_none() {
        monitor::dropped::<F>(Hook::Xdp, Reason::RewriteFailed, c.meta.svc_id, &pkt.t);
        return XDP_DROP;
    }
    stats::count(Reason::NatNew);
    stats::count(Reason::XdpForwarded);
    monitor::translated::<F>(Hook::Xdp, c.meta.reason, &pkt.t, &c.entry);
    if dsr {
        return dsr_out::<F>(ctx, &pkt.t, &c.hop);
    }
    transmit(ctx, c.hop.smac, c.hop.dmac)
}

/// Adds the DSR option carrying the frontend (`orig.daddr`, `orig.dport`) and this node's
/// address on the way (`hop.src`), and transmits (the frame fits with it: `dsr::fits`).
#[inline(always)]
fn dsr_out<F: XdpIp + Dsr>(ctx: &XdpContext, orig: &Tuple<F::Addr>, hop: &Hop<F::Addr>) -> u32 {
    // The callers (`handle`, the services layer's route for `commit`) passed what the option
    // would make too big on to tc.
    if F::add_option_xdp(ctx, &orig.daddr, orig.dport, &hop.src).is_none() {
        monitor::dropped::<F>(Hook::Xdp, Reason::DsrFailed, 0, orig);
        return XDP_DROP;
    }
    transmit(ctx, hop.smac, hop.dmac)
}
