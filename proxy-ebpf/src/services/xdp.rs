//! New flows at XDP on the node's external interfaces: NodePort, externalIP and load balancer flows whose
//! backend is on another node are translated and sent straight back out (`XDP_TX`) before an
//! skb exists, and so are their replies. Everything else — local backends, rejects, packets
//! whose neighbour is not resolved yet, non-Service traffic — goes on untouched (`XDP_PASS`)
//! to tc and the stack, which handle it with the same maps.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use proxy_common::{
    affinity::{AffinityKey, CLIENT_ADDR},
    backend::BackendValue,
    ct::{CT_DSR, CT_SNAT},
    reason::{Hook, Reason},
    service::{
        FLAG_LEAST_CONN, FLAG_ROUND_ROBIN, FLAG_SNAT, FLAG_SOURCE_RANGES, SCOPE_EXTERNAL,
        ServiceValue,
    },
};

use crate::{
    access::stats,
    flow::{
        dsr, monitor,
        xdp::{Hop, Meta, commit, hop},
    },
    headers::{Tuple, xdp::XdpIp},
    services::{frontend::Family, lb},
};

/// `lb::select` for a packet's client, out of line (it keeps the selection's temporaries out
/// of `new_flow`'s frame).
#[inline(never)]
fn pick<F: Family>(
    svc: &ServiceValue,
    t: &Tuple<F::Addr>,
    out: &mut lb::Choice,
) -> Result<(), Reason> {
    let client = AffinityKey {
        port_id: svc.port_id,
        client_kind: CLIENT_ADDR,
        client: F::client_bytes(&t.saddr),
    };
    *out = lb::select::<false>(svc, &client, F::hash(t), lb::NO_PICK)?;
    Ok(())
}

#[inline(never)]
pub fn new_flow<F: XdpIp + Family>(ctx: &XdpContext) -> u32 {
    let Some(pkt) = F::parse_xdp(ctx) else {
        return XDP_PASS;
    };
    let pkt = &pkt;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let here = ctx.ingress_ifindex() as u32;
    let Some(svc) = F::frontend(&pkt.t, SCOPE_EXTERNAL) else {
        return XDP_PASS;
    };
    if svc.has_flag(FLAG_SOURCE_RANGES) && !F::source_allowed(svc.id, &pkt.t.saddr) {
        monitor::dropped::<F>(Hook::Xdp, Reason::SourceRangeDrop, svc.id, &pkt.t);
        return XDP_DROP;
    }
    // Flows of stateful schedulers are started at tc, and their later packets handled here:
    // least connection compares and keeps counts (a frame too many for this chain), and a
    // round-robin turn taken here for a backend tc must handle (a local one) would be lost.
    if svc.has_flag(FLAG_LEAST_CONN | FLAG_ROUND_ROBIN) {
        return XDP_PASS;
    }
    let mut choice = lb::Choice {
        backend_id: 0,
        backend: BackendValue {
            addr: [0; 16],
            port: 0,
            proto: 0,
            family: 0,
            flags: 0,
            _pad: 0,
            weight: 0,
        },
        reason: Reason::Translated,
    };
    match pick::<F>(&svc, &pkt.t, &mut choice) {
        Ok(()) => {}
        Err(Reason::NoLocalBackends) => {
            monitor::dropped::<F>(Hook::Xdp, Reason::NoLocalBackends, svc.id, &pkt.t);
            return XDP_DROP;
        }
        // No backends (tc rejects), or userspace mid-update.
        Err(_) => return XDP_PASS,
    }
    let backend = F::backend_addr(&choice.backend);
    let mut to = Tuple {
        saddr: pkt.t.saddr,
        daddr: backend,
        sport: pkt.t.sport,
        dport: choice.backend.port,
        proto: pkt.t.proto,
    };
    let snat = svc.has_flag(FLAG_SNAT) || backend == pkt.t.saddr;
    let mut h = Hop {
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        src: pkt.t.saddr,
    };
    // Not routable here, or a backend on this node (or behind another interface): tc's
    // business.
    if !hop::<F>(ctx, &to, snat, &mut h) || h.ifindex != here {
        return XDP_PASS;
    }
    let dsr = snat && dsr::enabled::<F>();
    let mut flags = 0;
    if dsr {
        flags |= CT_DSR;
    } else if snat {
        to.saddr = h.src;
        flags |= CT_SNAT;
    }
    if choice.reason == Reason::AffinityHit {
        stats::count(Reason::AffinityHit);
    }
    let meta = Meta {
        flags,
        svc_id: svc.id,
        backend_id: choice.backend_id,
        reason: choice.reason,
        now,
    };
    commit::<F>(ctx, pkt, &mut to, &meta, &h)
}
