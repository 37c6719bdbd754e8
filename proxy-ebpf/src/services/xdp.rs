//! New flows at XDP on the node's external interfaces: NodePort, externalIP and load balancer flows whose
//! backend is on another node are translated and sent straight back out (`XDP_TX`) before an
//! skb exists, and so are their replies. Everything else — local backends, rejects, packets
//! whose neighbour is not resolved yet, non-Service traffic — goes on untouched (`XDP_PASS`)
//! to tc and the stack, which handle it with the same maps.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use proxy_common::{
    ct::{CT_DSR, CT_SNAT},
    reason::{Hook, Reason},
    service::{FLAG_LEAST_CONN, FLAG_ROUND_ROBIN, SCOPE_EXTERNAL, ServiceValue},
};

use crate::{
    access::{
        maps::{XDP_SCRATCH, XDP_SCRATCH_WORDS},
        stats,
    },
    flow::{
        dsr, monitor,
        xdp::{Commit, Hop, Meta, commit, hop},
    },
    headers::{Packet, Tuple, xdp::XdpIp},
    services::{frontend::Family, lb, newflow},
};

/// `lb::select` for a packet's client, out of line (it keeps the selection's temporaries out
/// of `new_flow`'s frame).
#[inline(never)]
fn pick<F: Family>(
    svc: &ServiceValue,
    t: &Tuple<F::Addr>,
    hash: u32,
    out: &mut lb::Choice,
) -> Result<(), Reason> {
    *out = newflow::choose::<F>(svc, t, hash, lb::NO_PICK)?;
    Ok(())
}

/// The flow's hash, out of line: an IPv6 tuple's 32 address bytes would otherwise be spilled
/// into `pick`'s frame.
#[inline(never)]
fn flow_hash<F: Family>(t: &Tuple<F::Addr>) -> u32 {
    F::hash(t)
}

/// A new flow's state between its three steps (`choose`, `route`, `commit`), in
/// `XDP_SCRATCH`: the steps run one after the other from `new_flow`, so their frames never
/// add up, and none of them holds this on its stack (the parsed packet stays on `new_flow`'s).
pub struct Scratch<A> {
    svc: ServiceValue,
    choice: lb::Choice,
    c: Commit<A>,
}

const _: () = assert!(size_of::<Scratch<[u8; 16]>>() <= XDP_SCRATCH_WORDS * 8);

/// This CPU's scratch space, as the family's `Scratch`.
#[inline(always)]
fn scratch<A: 'static>() -> Option<&'static mut Scratch<A>> {
    let ptr = XDP_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value, 8-byte aligned and large enough (asserted above) for any
    // family's `Scratch`; XDP programs are not preempted on their CPU, so nothing else uses it
    // while this packet is handled, and every field is written before it is read.
    Some(unsafe { &mut *ptr.cast::<Scratch<A>>() })
}

/// A step went through: the next one goes on.
const GO_ON: u32 = u32::MAX;

/// A packet of no tracked flow: a new flow to an external frontend whose backend is on another
/// node is translated and sent back out. Three steps, each out of line: the backend's choice,
/// the route to it, then the flow's entries, the rewrite and the transmission. Out of line:
/// the parsed packet stays on this frame, not the hook's, which the tracked-flow path's
/// chain starts from too (verifiers before 6.9 count each frame rounded up to 32 bytes).
#[inline(never)]
pub fn new_flow<F: XdpIp + Family>(ctx: &XdpContext) -> u32
where
    F::Addr: 'static,
{
    let Some(s) = scratch::<F::Addr>() else {
        return XDP_PASS;
    };
    // Parsed here and kept on this frame: the verifier knows the bounds of its offsets there
    // (not in a map value), and a step given only what parsing reads would get the packet's
    // bounds as plain values, which it refuses.
    let Some(pkt) = F::parse_xdp(ctx) else {
        return XDP_PASS;
    };
    match choose::<F>(&pkt, s) {
        GO_ON => {}
        action => return action,
    }
    match route::<F>(ctx, &pkt, s) {
        GO_ON => {}
        action => return action,
    }
    commit::<F>(ctx, &pkt, &mut s.c)
}

/// The packet's frontend, its source ranges, and the backend's choice; `GO_ON`, or the
/// packet's action.
#[inline(never)]
fn choose<F: XdpIp + Family>(pkt: &Packet<F::Addr>, s: &mut Scratch<F::Addr>) -> u32 {
    let t = &pkt.t;
    let svc = match newflow::admit::<F>(t, SCOPE_EXTERNAL) {
        Ok(svc) => svc,
        Err(None) => return XDP_PASS,
        Err(Some(reason)) => {
            let svc_id = F::frontend(t, SCOPE_EXTERNAL).map_or(0, |svc| svc.id);
            monitor::dropped::<F>(Hook::Xdp, reason, svc_id, t);
            return XDP_DROP;
        }
    };
    // Flows of stateful schedulers are started at tc, and their later packets handled here:
    // least connection compares and keeps counts (a frame too many for this chain), and a
    // round-robin turn taken here for a backend tc must handle (a local one) would be lost.
    if svc.has_flag(FLAG_LEAST_CONN | FLAG_ROUND_ROBIN) {
        return XDP_PASS;
    }
    let hash = flow_hash::<F>(t);
    match pick::<F>(&svc, t, hash, &mut s.choice) {
        Ok(()) => {}
        Err(Reason::NoLocalBackends) => {
            monitor::dropped::<F>(Hook::Xdp, Reason::NoLocalBackends, svc.id, t);
            return XDP_DROP;
        }
        // No backends (tc rejects), or userspace mid-update.
        Err(_) => return XDP_PASS,
    }
    s.svc = svc;
    GO_ON
}

/// The route to the chosen backend: `GO_ON` (with `s.c` ready for `commit`) for a backend on
/// another node behind this interface; else the packet goes on to tc.
#[inline(never)]
fn route<F: XdpIp + Family>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    s: &mut Scratch<F::Addr>,
) -> u32 {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let here = ctx.ingress_ifindex() as u32;
    let t = &pkt.t;
    let (to, snat) = newflow::towards::<F>(t, &s.svc, &s.choice);
    let c = &mut s.c;
    c.to = to;
    // Not routable here, or a backend on this node (or behind another interface): tc's
    // business.
    // SAFETY: `MaybeUninit<Hop>` has `Hop`'s layout, and `hop` writes a whole `Hop` or nothing
    // (an initialised one either way).
    let h = unsafe { &mut *(&raw mut c.hop).cast::<core::mem::MaybeUninit<Hop<F::Addr>>>() };
    if !hop::<F>(ctx, &c.to, snat, h) || c.hop.ifindex != here {
        return XDP_PASS;
    }
    let dsr = snat && dsr::enabled();
    // Too big with the option: tc answers it (`dsr::send_remembered`), nothing counted here.
    if dsr && dsr::fits::<F, _>(ctx, c.hop.ifindex).is_err() {
        return XDP_PASS;
    }
    let mut flags = 0;
    if dsr {
        flags |= CT_DSR;
    } else if snat {
        c.to.saddr = c.hop.src;
        flags |= CT_SNAT;
    }
    if s.choice.reason == Reason::AffinityHit {
        stats::count(Reason::AffinityHit);
    }
    c.meta = Meta {
        flags,
        svc_id: s.svc.id,
        backend_id: s.choice.backend_id,
        reason: s.choice.reason,
        now,
    };
    GO_ON
}
