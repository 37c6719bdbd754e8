//! New flows reaching the node from elsewhere (tc ingress on the node's external and pod-facing
//! interfaces): NodePorts, externalIPs and load balancer IPs are translated to a backend with
//! connection tracking, masqueraded where kube-proxy would (semantics 7.13, 7.14), and their
//! replies translated back. A ClusterIP reached from outside (its Service CIDR routed to the
//! node) is translated with its own frontend and masqueraded (semantics 12.5, 7.12). On
//! pod-facing interfaces ClusterIPs too: the connections of pods with socket-layer translation
//! off (`LB_SOCKLB_OFF`) reach tc with the Service address, as under kube-proxy, and so do
//! those the socket layer leaves to tc because they land on their own pod (hairpin, 7.14).
//! Translated packets are routed here (FIB lookup, then `bpf_redirect_neigh`): a masqueraded
//! packet carries a node address as its source, which the stack's input path would refuse as a
//! martian.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use proxy_common::{
    config::CONFIG_MASQUERADE_ALL,
    ct::{CT_DSR, CT_HOST, CT_REPLY, CT_SNAT},
    info::{IFACE_EXTERNAL, IFACE_KEPT, IFACE_REMOTE_ROUTE},
    proto,
    reason::{Hook, Reason},
    service::{FLAG_LEAST_CONN, FLAG_SNAT, SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceValue},
};

use crate::{
    access::{
        events,
        maps::{LB_IFACES, config_flag, saw_host_flow},
        socklb, stats,
    },
    flow::{
        ct::Entry,
        dsr,
        fib::{Unrouted, arrival, forward, route, too_big_action, too_big_mtu},
        monitor,
        nat::{self, rewrite_first},
        pmtu,
    },
    headers::{Packet, TCP_ACK, TCP_SYN},
    services::{frontend::Family, lb, newflow, reject},
};

/// Returned by `new_flow` for a new flow to a frontend without backends: not a tc action.
const REJECT: i32 = i32::MIN;
/// Returned by `new_flow` for a least-connection frontend before the counts were compared:
/// not a tc action.
const LEAST_CONN: i32 = i32::MIN + 2;
/// Returned by `new_flow` for a translated DSR flow whose option is still to be added
/// (`dsr::remember`): not a tc action.
const DSR: i32 = i32::MIN + 4;

/// The first packet of a flow. A least-connection frontend's counts are compared in a frame
/// of their own (`least_conn`) and the answer handed to `new_flow`; the reject path runs after
/// the translation path has returned. So no two of these frames add up (the verifier allows
/// 512 bytes for a whole call chain).
#[inline(always)]
pub fn start<F: Family>(ctx: &TcContext) -> i32 {
    // The scope, and for a pod's internal flow the socket layer left here as a hairpin its
    // choice (`Scoped`).
    let scoped = if socklb::any() {
        scope::<F>(ctx)
    } else {
        outside_scope::<F>(ctx)
    };
    let (scope, hinted) = (scoped as u8, (scoped >> 32) as u32);
    if scope == SCOPE_REJECT {
        return reject::reject::<F>(ctx);
    }
    if scope == SCOPE_UNALLOCATED {
        return dropped::<F>(ctx, Reason::ServiceIpUnallocated as u32, SCOPE_EXTERNAL);
    }
    if scope == SCOPE_NONE {
        return TC_ACT_OK as i32;
    }
    let mut action = new_flow::<F>(ctx, hinted, scope);
    if action == LEAST_CONN {
        action = new_flow::<F>(ctx, least_conn::<F>(ctx, scope), scope);
    }
    if action == REJECT {
        return reject::reject::<F>(ctx);
    }
    if action == DSR {
        return dsr::send_remembered::<F>(ctx);
    }
    if let Some(mtu) = too_big_mtu(action) {
        return pmtu::too_big::<F>(ctx, mtu);
    }
    if action & !0xff == DROPPED {
        return dropped::<F>(ctx, (action & 0xff) as u32, scope);
    }
    if events::watching() {
        translated::<F>(ctx);
    }
    action
}

/// Returned by `scope` for a new flow to a ClusterIP on a port it does not serve: rejected
/// (semantics 3.12). Not a scope.
const SCOPE_REJECT: u8 = 0xff;

/// Returned by `scope` for a new connection to an address inside a ServiceCIDR that no Service
/// has: dropped (semantics 3.12). Not a scope.
const SCOPE_UNALLOCATED: u8 = 0xfd;

/// Returned by `scope` for a packet to no frontend: not Service traffic, passed on.
/// Not a scope.
const SCOPE_NONE: u8 = 0xfc;

/// Whether the packet opens a connection to an address inside a ServiceCIDR (the caller knows
/// it is no frontend: nftables mode drops it, semantics 3.12). A TCP flow is checked at its
/// SYN only, so the established traffic of other flows (which reaches this path at every
/// packet) pays nothing for it.
#[inline(always)]
fn opening_in_service_cidr<F: Family>(pkt: &Packet<F::Addr>) -> bool {
    let opening = pkt.t.proto != proto::TCP || pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    opening && F::in_service_cidr(&pkt.t.daddr)
}

/// Returned by `scope` for a new flow from outside the node (an external interface) to a
/// ClusterIP: translated with the ClusterIP's (internal) frontend and masqueraded (semantics
/// 12.5: every source; 7.12: a source that is no local pod is masqueraded). Looked up as
/// `SCOPE_INTERNAL`.
const SCOPE_FROM_OUTSIDE: u8 = 0xfe;

/// The scope a frontend of `scope` is looked up in.
#[inline(always)]
fn lookup_scope(scope: u8) -> u8 {
    if scope == SCOPE_FROM_OUTSIDE {
        SCOPE_INTERNAL
    } else {
        scope
    }
}

/// `--masquerade-all`: every ClusterIP flow is masqueraded (semantics 7.12).
#[inline(always)]
fn masquerade_all() -> bool {
    config_flag(CONFIG_MASQUERADE_ALL)
}

/// Whether interface `why` (`IFACE_*`) is where traffic from outside the node arrives.
#[inline(always)]
fn outside(why: u8) -> bool {
    why == IFACE_EXTERNAL || why == IFACE_KEPT || why == IFACE_REMOTE_ROUTE
}

/// Whether interface `ifindex` is one where traffic from outside the node arrives (an
/// interface the agent has not recorded counts as external).
#[inline(never)]
fn arrived_outside(ifindex: u32) -> bool {
    // SAFETY: a map lookup whose value is copied at once.
    outside(unsafe { LB_IFACES.get(&ifindex) }.map_or(IFACE_EXTERNAL, |i| i.reason()))
}

/// The scope of a new flow to a ClusterIP arriving from outside (the interface says so): its
/// internal frontend, or rejected when the ClusterIP does not serve that port (3.12). A
/// ClusterIP's own frontends are internal only: from outside it is reached only by a route
/// to the Service CIDR (a router, a BGP announcement).
#[inline(always)]
fn cluster_ip_from_outside<F: Family>(t: &crate::headers::Tuple<F::Addr>) -> u8 {
    if F::frontend(t, SCOPE_INTERNAL).is_some() {
        SCOPE_FROM_OUTSIDE
    } else {
        SCOPE_REJECT
    }
}

/// `scope` while no pod has socket-layer translation off: external, except a ClusterIP
/// reached from outside or from a pod (`pod_cluster_ip`) and a pod's flow to an
/// externalTrafficPolicy Local external address (`pod_external`); `SCOPE_NONE` for a packet to
/// no frontend. Two lookups for a packet that is no Service's: an external frontend, a
/// ClusterIP (then `new_flow` is not called, which would look the frontend up again). The
/// socket layer leaves a pod's flow that lands on the pod itself here exactly when this takes
/// the internal frontend (`sock::tc_takes_internal`).
#[inline(never)]
fn outside_scope<F: Family>(ctx: &TcContext) -> Scoped {
    let Ok(pkt) = F::parse(ctx) else {
        return SCOPE_EXTERNAL.into();
    };
    match F::frontend(&pkt.t, SCOPE_EXTERNAL) {
        Some(ext) if !ext.has_flag(FLAG_SNAT) => return pod_external::<F>(ctx, &pkt.t),
        Some(_) => return SCOPE_EXTERNAL.into(),
        None => {}
    }
    if !F::cluster_ip(&pkt.t.daddr) {
        return if opening_in_service_cidr::<F>(&pkt) {
            SCOPE_UNALLOCATED
        } else {
            SCOPE_NONE
        }
        .into();
    }
    let here = arrival(ctx);
    if arrived_outside(here) {
        cluster_ip_from_outside::<F>(&pkt.t).into()
    } else {
        pod_cluster_ip::<F>(&pkt.t)
    }
}

/// The scope of a pod's new flow to a ClusterIP on a pod-facing interface while no pod has
/// socket-layer translation off. The socket layer translates the pods' other connections, so
/// this is one it left here as a hairpin (its choice was the pod itself, which it cannot
/// masquerade, semantics 7.14; `internal` looks its choice up) or could not translate (a
/// frontend mid-update, a pod outside the hooked cgroup, a hairpin's first datagram sent after
/// the choice expired): translated here with the ClusterIP's frontend, internal; rejected on a
/// port the ClusterIP does not serve.
#[inline(always)]
fn pod_cluster_ip<F: Family>(t: &crate::headers::Tuple<F::Addr>) -> Scoped {
    match F::frontend(t, SCOPE_INTERNAL) {
        Some(svc) => internal::<F>(t, &svc),
        // A port the ClusterIP does not serve: rejected (semantics 3.12), as `scope` does.
        None => SCOPE_REJECT.into(),
    }
}

/// The scope of a new flow to an externalTrafficPolicy Local external address while no pod has
/// socket-layer translation off: from outside, external (local endpoints only, unmasqueraded,
/// semantics 4.7c); on a pod-facing interface, its internal frontend, as the socket layer looks
/// it up: the pod is short-circuited to the cluster set, unmasqueraded (4.7a), unless it lands
/// on itself (7.14). Such a flow is one the socket layer left here as a hairpin (its choice is
/// taken, `internal`) or could not translate (a pod outside the hooked cgroup, a frontend
/// mid-update).
#[inline(always)]
fn pod_external<F: Family>(ctx: &TcContext, t: &crate::headers::Tuple<F::Addr>) -> Scoped {
    let here = arrival(ctx);
    if arrived_outside(here) {
        return SCOPE_EXTERNAL.into();
    }
    match F::frontend(t, SCOPE_INTERNAL) {
        Some(svc) => internal::<F>(t, &svc),
        None => SCOPE_EXTERNAL.into(),
    }
}

/// What `scope` and `outside_scope` answer: the scope in the low byte; for an internal flow,
/// the socket layer's choice in the high half when it left the flow here as a hairpin
/// (`newflow::hairpin_choice`), else 0.
type Scoped = u64;

/// `SCOPE_INTERNAL` for the pod flow `t` to the internal frontend `svc`, with the socket
/// layer's hairpin choice (`Scoped`).
#[inline(always)]
fn internal<F: Family>(t: &crate::headers::Tuple<F::Addr>, svc: &ServiceValue) -> Scoped {
    let hint = newflow::hairpin_choice::<F>(t, svc.port_id, svc.id);
    (u64::from(hint) << 32) | u64::from(SCOPE_INTERNAL)
}

/// Which frontends a new flow is looked up in, while some pod has socket-layer translation
/// off. From outside: the external ones, or a ClusterIP's (`cluster_ip_from_outside`). On a
/// pod-facing interface (a pod translated per packet): the internal ones, as the socket layer
/// would look up, for ClusterIPs (the connections of pods whose socket layer translates never
/// reach tc with one) and for the external addresses of a Service with externalTrafficPolicy
/// Local (its external frontend does not masquerade), whose pods are short-circuited to the
/// cluster set, unmasqueraded (semantics 4.7a); the external ones for the external addresses
/// of a Service with externalTrafficPolicy Cluster (masqueraded, 7.13, which only tc does).
/// The address of a ClusterIP on a port it does not serve is rejected.
#[inline(never)]
fn scope<F: Family>(ctx: &TcContext) -> Scoped {
    let Ok(pkt) = F::parse(ctx) else {
        return SCOPE_EXTERNAL.into();
    };
    let external = F::frontend(&pkt.t, SCOPE_EXTERNAL);
    let here = arrival(ctx);
    if arrived_outside(here) {
        if external.is_some() {
            return SCOPE_EXTERNAL.into();
        }
        if F::cluster_ip(&pkt.t.daddr) {
            return cluster_ip_from_outside::<F>(&pkt.t).into();
        }
        if opening_in_service_cidr::<F>(&pkt) {
            return SCOPE_UNALLOCATED.into();
        }
        return SCOPE_NONE.into();
    }
    let internal_svc = F::frontend(&pkt.t, SCOPE_INTERNAL);
    match (external, internal_svc) {
        (Some(ext), Some(svc)) if !ext.has_flag(FLAG_SNAT) => return internal::<F>(&pkt.t, &svc),
        (Some(_), _) => return SCOPE_EXTERNAL.into(),
        (None, Some(svc)) => return internal::<F>(&pkt.t, &svc),
        (None, None) => {}
    }
    if F::cluster_ip(&pkt.t.daddr) {
        return SCOPE_REJECT.into();
    }
    if opening_in_service_cidr::<F>(&pkt) {
        return SCOPE_UNALLOCATED.into();
    }
    SCOPE_NONE.into()
}

/// Returned by `new_flow` for a packet to drop, with the `Reason` in the low byte: not a tc
/// action. The drop is counted and its event written by `dropped`, after `new_flow` returned:
/// `new_flow`'s frame has no room for the call.
const DROPPED: i32 = i32::MIN + 0x100;

#[inline(always)]
fn drop(reason: Reason) -> i32 {
    DROPPED | reason as i32
}

/// Counts the drop of the packet for reason `code` and writes its event (the frontend looked
/// up again: drops are rare).
#[inline(never)]
fn dropped<F: Family>(ctx: &TcContext, code: u32, scope: u8) -> i32 {
    let reason = Reason::from_index(code).unwrap_or(Reason::CtFailed);
    match F::parse(ctx) {
        Ok(pkt) => {
            let svc_id = F::frontend(&pkt.t, lookup_scope(scope)).map_or(0, |svc| svc.id);
            monitor::dropped::<F>(Hook::TcIngress, reason, svc_id, &pkt.t);
        }
        Err(_) => stats::dropped(Hook::TcIngress, reason),
    }
    TC_ACT_SHOT as i32
}

/// The event of a new flow `new_flow` translated, while a monitor watches: the packet holds the
/// translated tuple now, and the flow's reply entry (keyed by it, reversed) what the client
/// sent. A DSR flow has no reply entry here and no event.
#[inline(never)]
fn translated<F: Family>(ctx: &TcContext) {
    let Ok(pkt) = F::parse(ctx) else {
        return;
    };
    let Some(ptr) = F::ct_lookup(&pkt.t.reversed()) else {
        return;
    };
    // SAFETY: `ptr` came from the lookup.
    let reply = unsafe { F::ct_read(ptr) };
    if reply.flags & CT_REPLY == 0 {
        return;
    }
    let mut orig = reply.to.reversed();
    orig.proto = pkt.t.proto;
    let forward = Entry {
        to: pkt.t,
        flags: reply.flags & !CT_REPLY,
        svc_id: reply.svc_id,
        backend_id: reply.backend_id,
    };
    monitor::translated::<F>(Hook::TcIngress, Reason::Translated, &orig, &forward);
}

/// The least-connection choice for the packet's frontend (`lb::NO_PICK` for none).
#[inline(never)]
fn least_conn<F: Family>(ctx: &TcContext, scope: u8) -> u32 {
    let Ok(pkt) = F::parse(ctx) else {
        return lb::NO_PICK;
    };
    match F::frontend(&pkt.t, lookup_scope(scope)) {
        Some(svc) if svc.count != 0 => match lb::least_conn(&svc) {
            0 => lb::NO_PICK,
            id => id,
        },
        _ => lb::NO_PICK,
    }
}

/// A new flow: `least` is 0 until a least-connection frontend's counts were compared (then
/// `LEAST_CONN` is returned), afterwards their answer; or, for a hairpin the socket layer left
/// here, its choice (`Scoped`). `scope`: which frontends (`scope`).
#[inline(never)]
fn new_flow<F: Family>(ctx: &TcContext, least: u32, scope: u8) -> i32 {
    let pkt = match F::parse(ctx) {
        Ok(p) => p,
        Err(_) => return TC_ACT_OK as i32,
    };
    let pkt = &pkt;
    let from_outside = scope == SCOPE_FROM_OUTSIDE;
    let internal = scope == SCOPE_INTERNAL;
    let svc = match newflow::admit::<F>(&pkt.t, lookup_scope(scope)) {
        Ok(svc) => svc,
        Err(None) => return TC_ACT_OK as i32,
        Err(Some(reason)) => return drop(reason),
    };
    let counted = svc.has_flag(FLAG_LEAST_CONN);
    if counted && least == 0 {
        return LEAST_CONN;
    }
    let choice = match newflow::choose::<F>(&svc, &pkt.t, F::hash(&pkt.t), least) {
        Ok(c) => c,
        Err(Reason::NoBackends) => return REJECT,
        Err(Reason::NoLocalBackends) => {
            // externalTrafficPolicy Local without a local endpoint: dropped (semantics 3.9).
            return drop(Reason::NoLocalBackends);
        }
        Err(r) => {
            stats::count(r);
            return TC_ACT_OK as i32;
        }
    };
    let (mut to, mut snat) = newflow::towards::<F>(&pkt.t, &svc, &choice);
    // `--masquerade-all` masquerades ClusterIP flows only (kube-proxy's rule matches the
    // ClusterIP as destination, semantics 7.12): not a pod's short-circuited flow to an
    // externalTrafficPolicy Local external address (4.7a), also looked up as internal.
    snat |= from_outside || (internal && masquerade_all() && F::cluster_ip(&pkt.t.daddr));
    let here = arrival(ctx);
    let mut dsr = false;
    // A backend on this node's own address (a host-network pod): handed to the stack.
    let mut host = false;
    let ifindex = match route::<F>(ctx, &to, snat || internal) {
        Ok(r) => {
            // A pod's ClusterIP flow to a backend behind the interface it came in on (pods on
            // one bridge): the backend would answer the pod straight, past tc. Masqueraded, so
            // the reply comes back here.
            snat |= internal && r.ifindex == here;
            // Direct server return for backends behind the interface the flow came in on
            // from outside (a pod's flow, to a ClusterIP or an external frontend, is
            // masqueraded, never DSR).
            dsr = snat && !internal && r.ifindex == here && dsr::enabled() && arrived_outside(here);
            // The option is added after this frame has returned (`start`), with this node's
            // address on the way to the backend, remembered while it is at hand.
            if dsr && !dsr::remember::<F>(&pkt.t, &r.src, r.ifindex) {
                return drop(Reason::DsrFailed);
            }
            if snat && !dsr {
                to.saddr = r.src;
            }
            r.ifindex
        }
        // Too big for the way to the backend: answered untouched (`pmtu::too_big`, after
        // this frame has returned), nothing recorded.
        Err(Unrouted::TooBig(mtu)) if F::answerable(ctx) => return too_big_action(mtu),
        // Delivered here, not masqueraded (as under kube-proxy, whose masquerading applies
        // only to packets leaving the node); the replies leave through an interface's
        // egress, where `tc_egress` translates them back.
        Err(Unrouted::Local) => {
            host = true;
            snat = false;
            0
        }
        // No forwarding route: without masquerading the stack may still deliver it.
        Err(_) if !snat => 0,
        Err(_) => {
            stats::count(Reason::FibPass);
            return TC_ACT_OK as i32;
        }
    };
    let flags = if dsr {
        CT_DSR
    } else if snat {
        CT_SNAT
    } else if host {
        saw_host_flow();
        CT_HOST
    } else {
        0
    };
    // The clock only for a flow that is recorded: every packet of traffic that is no Service's
    // comes through here too.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // One entry on the stack, written first as the reply entry, then as the forward one.
    let mut entry = Entry {
        to,
        flags,
        svc_id: svc.id,
        backend_id: choice.backend_id,
    };
    if let Err(reason) = nat::record::<F>(
        &pkt.t,
        &mut to,
        &mut entry,
        counted,
        pkt.syn(),
        now,
        |k, e, mf, c| F::ct_insert(k, e, now, mf, c).is_ok(),
    ) {
        return drop(reason);
    }
    if rewrite_first::<F>(ctx, pkt, &to).is_err() {
        return drop(Reason::RewriteFailed);
    }
    stats::count(Reason::NatNew);
    if choice.reason == Reason::AffinityHit {
        stats::count(Reason::AffinityHit);
    }
    if dsr {
        return DSR;
    }
    if host {
        // Up the stack, to the backend on this node.
        return TC_ACT_OK as i32;
    }
    forward::<F>(ctx, &to, ifindex)
}
