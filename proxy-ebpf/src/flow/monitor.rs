//! Drops and translations at tc and XDP: counted per hook and reason, and written as events
//! for `kube-bpf-proxy monitor` while one watches.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use proxy_common::{
    backend::{FAMILY_V4, FAMILY_V6},
    event::{EVENT_DROPPED, EVENT_TRANSLATED},
    reason::{Hook, Reason},
};

use crate::{
    access::{events, stats},
    flow::ct::Entry,
    headers::{AF_INET, Tuple, family::Ip},
};

/// Counts the drop of a packet of flow `t` (to frontend `svc_id`, 0 when not known) for
/// `reason` at `hook`, and writes its event while a monitor watches. Out of line: drops end
/// call chains that are near the verifier's stack limit.
#[inline(never)]
pub fn dropped<F: Ip>(hook: Hook, reason: Reason, svc_id: u32, t: &Tuple<F::Addr>) {
    stats::dropped(hook, reason);
    if events::watching() {
        write::<F>(EVENT_DROPPED, pack(hook, reason), svc_id, 0, t, None);
    }
}

/// `dropped` for the packet in `ctx` at tc, parsed here (frontend id unknown).
#[inline(never)]
pub fn dropped_packet<F: Ip>(ctx: &TcContext, hook: Hook, reason: Reason) {
    match F::parse(ctx) {
        Ok(pkt) => dropped::<F>(hook, reason, 0, &pkt.t),
        Err(_) => stats::dropped(hook, reason),
    }
}

/// Writes the event of a new flow `orig` translated as its forward entry `e` says (`reason`:
/// `Translated` or `AffinityHit`) while a monitor watches. Out of line, the check included:
/// it is called from frames near the verifier's stack limit.
#[inline(never)]
pub fn translated<F: Ip>(hook: Hook, reason: Reason, orig: &Tuple<F::Addr>, e: &Entry<F::Addr>) {
    if events::watching() {
        let (svc_id, backend_id) = (e.svc_id, e.backend_id);
        write::<F>(
            EVENT_TRANSLATED,
            pack(hook, reason),
            svc_id,
            backend_id,
            orig,
            Some(&e.to),
        );
    }
}

/// Hook and reason in one argument (a BPF function takes five at most).
#[inline(always)]
pub fn pack(hook: Hook, reason: Reason) -> u32 {
    ((hook as u32) << 24) | reason as u32
}

#[inline(always)]
fn write<F: Ip>(
    kind: u8,
    hook_reason: u32,
    svc_id: u32,
    backend_id: u32,
    orig: &Tuple<F::Addr>,
    to: Option<&Tuple<F::Addr>>,
) {
    let Some(mut entry) = events::reserve() else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved, writable event; every field is written before the
    // event is submitted.
    unsafe {
        (*e).kind = kind;
        (*e).hook = (hook_reason >> 24) as u8;
        (*e).family = if F::AF == AF_INET {
            FAMILY_V4
        } else {
            FAMILY_V6
        };
        (*e).proto = orig.proto;
        (*e).reason = hook_reason & 0x00ff_ffff;
        (*e).svc_id = svc_id;
        (*e).backend_id = backend_id;
        (*e).time_ns = bpf_ktime_get_ns();
        (*e).client = F::client_bytes(&orig.saddr);
        (*e).client_port = orig.sport;
        (*e).frontend = F::client_bytes(&orig.daddr);
        (*e).frontend_port = orig.dport;
        match to {
            Some(to) => {
                (*e).backend = F::client_bytes(&to.daddr);
                (*e).backend_port = to.dport;
            }
            None => {
                (*e).backend = [0; 16];
                (*e).backend_port = 0;
            }
        }
        (*e)._pad = 0;
    }
    events::submit(entry);
}
