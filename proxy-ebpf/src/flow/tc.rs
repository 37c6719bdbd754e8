//! Packets of tracked flows at tc: translated as their connection-tracking entry says and
//! forwarded (with the DSR option when the flow is a DSR one).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_ktime_get_coarse_ns,
    programs::TcContext,
};
use proxy_common::{
    ct::{CT_DSR, CT_HOST, CT_REPLY},
    reason::{Hook, Reason},
};

use crate::{
    access::{maps::saw_host_flow, stats},
    flow::{
        ct::{Tracked, ct_flags_of, forget_closed_reply, keeps_entry},
        dsr::{self, Dsr},
        fib::{
            NO_NH, Unrouted, arrival, recall_route, remember_route, route, send, too_big_action,
        },
        hops::{self, Hops},
        monitor,
        nat::{rewrite, rewrite_first},
    },
};

/// Returned by `handle` for a packet of no tracked flow: not a tc action.
pub const NEW: i32 = i32::MIN + 1;

/// Returned by `handle` for a translated packet of a tracked DSR flow whose option is still to
/// be added (`dsr::send_remembered`): not a tc action.
pub const DSR: i32 = i32::MIN + 5;

/// Returned by `handle` for a packet of a tracked flow that could not be rewritten: not a tc
/// action. The caller drops it through `rewrite_failed` (after `handle` returned: its frame
/// has no room for the call).
pub const REWRITE_FAILED: i32 = i32::MIN + 3;

/// Counts the drop of a packet of a tracked flow that could not be rewritten, with its event.
#[inline(never)]
pub fn rewrite_failed<F: Tracked>(ctx: &TcContext) -> i32 {
    match F::parse(ctx) {
        Ok(pkt) => {
            let svc_id = F::ct_lookup(&pkt.t).map_or(0, |ptr| {
                // SAFETY: `ptr` came from the lookup.
                unsafe { F::ct_read(ptr) }.svc_id
            });
            monitor::dropped::<F>(Hook::TcIngress, Reason::RewriteFailed, svc_id, &pkt.t);
        }
        Err(_) => stats::dropped(Hook::TcIngress, Reason::RewriteFailed),
    }
    TC_ACT_SHOT as i32
}

#[inline(never)]
pub fn handle<F: Dsr + Hops>(ctx: &TcContext) -> i32 {
    let pkt = match F::parse(ctx) {
        Ok(p) => p,
        Err(reason) => {
            if let Some(r) = reason {
                stats::count(r);
            }
            return TC_ACT_OK as i32;
        }
    };
    // The monotonic clock as of the last tick: a tracked flow's last-seen time only decides
    // its expiry, seconds away, and the exact clock costs a read of the time-stamp counter on
    // every packet. (The agent compares it with saturation.)
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(ptr) = F::ct_lookup(&pkt.t) {
        // SAFETY: `ptr` came from the lookup.
        let mut e = unsafe { F::ct_read(ptr) };
        let reply = e.flags & CT_REPLY != 0;
        if keeps_entry::<F>(ptr, &e, &pkt) {
            // SAFETY: `ptr` came from the lookup.
            unsafe { F::ct_touch(ptr, now, ct_flags_of(pkt.tcp_flags)) };
            e.to.proto = pkt.t.proto;
            let dsr = e.flags & CT_DSR != 0 && !reply;
            // The route before the rewrite: a packet too big for it is answered untouched
            // (`pmtu::too_big`, after this frame has returned). DSR finds its own (`dsr`).
            let mut ifindex = 0;
            let mut nh = NO_NH;
            if !dsr {
                let at = hops::place::<F>(&e.to, arrival(ctx), now);
                if !recall_route::<F>(ctx, &e.to, &at, &mut ifindex, &mut nh) {
                    match route::<F>(ctx, &e.to, false) {
                        Ok(r) => {
                            ifindex = r.ifindex;
                            nh = r.nh;
                            remember_route::<F>(&e.to, &at, &r);
                        }
                        Err(Unrouted::TooBig(mtu)) if F::answerable(ctx) => {
                            return too_big_action(mtu);
                        }
                        Err(_) => {}
                    }
                }
            }
            if !rewrite::<F>(ctx, &pkt, &e.to) {
                return REWRITE_FAILED;
            }
            stats::count(if reply {
                Reason::NatReply
            } else {
                Reason::NatEstablished
            });
            if dsr {
                // The option is added after this frame has returned (`dsr::send_remembered`).
                if !dsr::remember_frontend::<F>(&pkt.t) {
                    return REWRITE_FAILED;
                }
                return DSR;
            }
            // No forwarding route: the stack may still deliver it (a backend on this node's
            // own address: its replies are translated at egress, re-armed here after a
            // reload of the programs).
            if ifindex == 0 {
                if e.flags & CT_HOST != 0 {
                    saw_host_flow();
                    return TC_ACT_OK as i32;
                }
                stats::count(Reason::FibPass);
                return TC_ACT_OK as i32;
            }
            return send::<F>(ctx, ifindex, &nh);
        }
    }
    if pkt.syn() {
        forget_closed_reply::<F>(&pkt.t);
    }
    NEW
}

/// At egress: a reply of a flow tc handed to a backend on this node's own address (`CT_HOST`),
/// which the node's stack answered itself, is translated back to the frontend; every other
/// packet passes untouched. Returns a tc action.
#[inline(never)]
pub fn host_reply<F: Tracked>(ctx: &TcContext) -> i32 {
    let Ok(pkt) = F::parse(ctx) else {
        return TC_ACT_OK as i32;
    };
    let Some(ptr) = F::ct_lookup(&pkt.t) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: `ptr` came from the lookup.
    let mut e = unsafe { F::ct_read(ptr) };
    if e.flags & (CT_REPLY | CT_HOST) != CT_REPLY | CT_HOST || !keeps_entry::<F>(ptr, &e, &pkt) {
        return TC_ACT_OK as i32;
    }
    // SAFETY: a helper without arguments; `ptr` came from the lookup.
    unsafe { F::ct_touch(ptr, bpf_ktime_get_coarse_ns(), ct_flags_of(pkt.tcp_flags)) };
    e.to.proto = pkt.t.proto;
    // Through the helpers (`rewrite_first`), not `rewrite`'s direct writes: a program that
    // writes packet data straight is made to unclone every cloned skb it sees before it runs,
    // and at egress every TCP segment the node sends is a clone.
    if rewrite_first::<F>(ctx, &pkt, &e.to).is_err() {
        monitor::dropped::<F>(Hook::TcEgress, Reason::RewriteFailed, e.svc_id, &pkt.t);
        return TC_ACT_SHOT as i32;
    }
    stats::count(Reason::NatReply);
    TC_ACT_OK as i32
}
