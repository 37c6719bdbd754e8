//! Traffic reaching the node from elsewhere (tc ingress on the node's external and pod-facing
//! interfaces): NodePorts, externalIPs and load balancer IPs are translated to a backend with
//! connection tracking, masqueraded where kube-proxy would (semantics 7.13, 7.14), and their
//! replies translated back. Translated packets are routed here (FIB lookup, then
//! `bpf_redirect_neigh`): a masqueraded packet carries a node address as its source, which the
//! stack's input path would refuse as a martian.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, generated::bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::{
    affinity::{AffinityKey, CLIENT_ADDR},
    ct::{CT_DSR, CT_FIN, CT_REPLY, CT_RST, CT_SNAT},
    proto::{self, ETH_P_IP, ETH_P_IPV6},
    reason::Reason,
    service::{FLAG_LEAST_CONN, FLAG_SNAT, FLAG_SOURCE_RANGES, MemberKey},
};

use crate::{
    conns, dsr, icmp, lb,
    maps::LB_MEMBERS,
    packet::{
        AF_INET, ETH_HLEN, Entry, Family, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple, V4,
        V6, count_down_ttl, rewrite, route,
    },
    reject, snat, stats,
};

#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return TC_ACT_OK as i32;
    };
    // Tracked flows first; a packet of none starts one (`start`).
    match u16::from_be(ethertype) {
        ETH_P_IP if ctx.load::<u8>(ETH_HLEN + 9) == Ok(icmp::IPPROTO_ICMP) => icmp::icmp4(ctx),
        ETH_P_IPV6 if ctx.load::<u8>(ETH_HLEN + 6) == Ok(icmp::IPPROTO_ICMPV6) => icmp::icmp6(ctx),
        ETH_P_IP => {
            dsr::learn4(ctx);
            match handle::<V4>(ctx) {
                NEW => start::<V4>(ctx),
                action => action,
            }
        }
        ETH_P_IPV6 => match handle::<V6>(ctx) {
            NEW => start::<V6>(ctx),
            action => action,
        },
        _ => TC_ACT_OK as i32,
    }
}

/// Returned by `new_flow` for a new flow to a frontend without backends: not a tc action.
const REJECT: i32 = i32::MIN;
/// Returned by `handle` for a packet of no tracked flow: not a tc action.
const NEW: i32 = i32::MIN + 1;
/// Returned by `new_flow` for a least-connection frontend before the counts were compared:
/// not a tc action.
const LEAST_CONN: i32 = i32::MIN + 2;

/// The first packet of a flow. A least-connection frontend's counts are compared in a frame
/// of their own (`least_conn`) and the answer handed to `new_flow`; the reject path runs after
/// the translation path has returned. So no two of these frames add up (the verifier allows
/// 512 bytes for a whole call chain).
#[inline(always)]
fn start<F: Family>(ctx: &TcContext) -> i32 {
    let mut action = new_flow::<F>(ctx, 0);
    if action == LEAST_CONN {
        action = new_flow::<F>(ctx, least_conn::<F>(ctx));
    }
    if action == REJECT {
        return reject::reject::<F>(ctx);
    }
    action
}

/// The least-connection choice for the packet's frontend (`lb::NO_PICK` for none).
#[inline(never)]
fn least_conn<F: Family>(ctx: &TcContext) -> u32 {
    let Ok(pkt) = F::parse(ctx) else {
        return lb::NO_PICK;
    };
    match F::frontend(&pkt.t) {
        Some(svc) if svc.count != 0 => match lb::least_conn(&svc) {
            0 => lb::NO_PICK,
            id => id,
        },
        _ => lb::NO_PICK,
    }
}

/// TCP flag bits recorded in a connection-tracking entry.
#[inline(always)]
pub fn ct_flags_of(tcp_flags: u8) -> u32 {
    let mut f = 0;
    if tcp_flags & TCP_FIN != 0 {
        f |= CT_FIN;
    }
    if tcp_flags & TCP_RST != 0 {
        f |= CT_RST;
    }
    f
}

/// A tracked forward entry is replaced by a fresh choice when a new TCP connection reuses the
/// tuple of a closed one, or when its backend is no longer one the frontend may use: a UDP
/// flow is then balanced afresh at its next datagram (kube-proxy deletes such conntrack
/// entries, semantics 9.2), while an established TCP connection keeps its backend.
#[inline(always)]
fn stale<A>(e: &Entry<A>, pkt: &Packet<A>) -> bool {
    let syn = pkt.t.proto == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn && e.flags & (CT_FIN | CT_RST) != 0 {
        return true;
    }
    if pkt.t.proto == proto::TCP && !syn {
        return false;
    }
    let member = MemberKey {
        svc_id: e.svc_id,
        backend_id: e.backend_id,
    };
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    unsafe { LB_MEMBERS.get(&member) }.is_none()
}

#[inline(never)]
fn handle<F: Family>(ctx: &TcContext) -> i32 {
    let pkt = match F::parse(ctx) {
        Ok(p) => p,
        Err(reason) => {
            if let Some(r) = reason {
                stats::count(r);
            }
            return TC_ACT_OK as i32;
        }
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(ptr) = F::ct_lookup(&pkt.t) {
        // SAFETY: `ptr` came from the lookup.
        let mut e = unsafe { F::ct_read(ptr) };
        let reply = e.flags & CT_REPLY != 0;
        if keeps_entry::<F>(ptr, &e, &pkt) {
            unsafe { F::ct_touch(ptr, now, ct_flags_of(pkt.tcp_flags)) };
            e.to.proto = pkt.t.proto;
            if rewrite::<F>(ctx, &pkt, &e.to).is_err() {
                stats::count(Reason::CtFailed);
                return TC_ACT_SHOT as i32;
            }
            stats::count(if reply {
                Reason::NatReply
            } else {
                Reason::NatEstablished
            });
            if e.flags & CT_DSR != 0 && !reply {
                return dsr_established::<F>(ctx, &e.to, &pkt.t);
            }
            return forward::<F>(ctx, &e.to, 0);
        }
    }
    NEW
}

/// Whether a packet of a tracked flow goes on with its entry `e` (at `ptr`); false when the
/// entry is stale and a new flow starts. A closing or replaced flow gives its least-connection
/// count back: a FIN or RST either way ends it as an active connection, as IPVS counts them.
#[inline(always)]
pub fn keeps_entry<F: Family>(
    ptr: *mut F::CtValue,
    e: &Entry<F::Addr>,
    pkt: &Packet<F::Addr>,
) -> bool {
    let reply = e.flags & CT_REPLY != 0;
    let stale = !reply && stale(e, pkt);
    if stale || pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        if reply {
            give_back_forward::<F>(&e.to);
        } else {
            // SAFETY: the caller's pointer from a lookup.
            unsafe { F::ct_give_back(ptr) };
        }
    }
    !stale
}

/// Gives back the count of the flow whose reply entry translates to `to` (its forward entry
/// is keyed by `to` reversed). Out of line: `handle`'s frame is near the limit.
#[inline(never)]
fn give_back_forward<F: Family>(to: &Tuple<F::Addr>) {
    if let Some(ptr) = F::ct_lookup(&to.reversed()) {
        // SAFETY: from the lookup.
        unsafe { F::ct_give_back(ptr) };
    }
}

/// A new flow: `least` is 0 until a least-connection frontend's counts were compared (then
/// `LEAST_CONN` is returned), afterwards their answer.
#[inline(never)]
fn new_flow<F: Family>(ctx: &TcContext, least: u32) -> i32 {
    let pkt = match F::parse(ctx) {
        Ok(p) => p,
        Err(_) => return TC_ACT_OK as i32,
    };
    let pkt = &pkt;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(svc) = F::frontend(&pkt.t) else {
        return TC_ACT_OK as i32;
    };
    if svc.has_flag(FLAG_SOURCE_RANGES) && !F::source_allowed(svc.id, &pkt.t.saddr) {
        stats::count(Reason::SourceRangeDrop);
        return TC_ACT_SHOT as i32;
    }
    let counted = svc.has_flag(FLAG_LEAST_CONN);
    if counted && least == 0 {
        return LEAST_CONN;
    }
    let client = AffinityKey {
        port_id: svc.port_id,
        client_kind: CLIENT_ADDR,
        client: F::client_bytes(&pkt.t.saddr),
    };
    let choice = match lb::select::<false>(&svc, &client, F::hash(&pkt.t), least) {
        Ok(c) => c,
        Err(Reason::NoBackends) => return REJECT,
        Err(Reason::NoLocalBackends) => {
            // externalTrafficPolicy Local without a local endpoint: dropped (semantics 3.9).
            stats::count(Reason::NoLocalBackends);
            return TC_ACT_SHOT as i32;
        }
        Err(r) => {
            stats::count(r);
            return TC_ACT_OK as i32;
        }
    };
    let backend = F::backend_addr(&choice.backend);
    // Masquerade for externalTrafficPolicy Cluster (semantics 7.13) and when a client lands on
    // itself (hairpin, semantics 7.14), so the reply comes back through this node.
    let snat = svc.has_flag(FLAG_SNAT) || backend == pkt.t.saddr;
    let mut to = Tuple {
        saddr: pkt.t.saddr,
        daddr: backend,
        sport: pkt.t.sport,
        dport: choice.backend.port,
        proto: pkt.t.proto,
    };
    // SAFETY: reading the context's own skb.
    let here = unsafe { (*ctx.skb.skb).ifindex };
    let mut dsr = false;
    // This node's address on the way to the backend (with masquerading or DSR).
    let mut via = pkt.t.daddr;
    let ifindex = match route::<F>(ctx, &to, snat) {
        Ok(r) => {
            via = r.src;
            // Direct server return for backends behind the interface the flow came in on.
            dsr = snat && r.ifindex == here && dsr::enabled::<F>();
            if snat && !dsr {
                to.saddr = r.src;
            }
            r.ifindex
        }
        // No forwarding route (e.g. a host-network backend on this node): without
        // masquerading the stack can still deliver it.
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
    } else {
        0
    };
    // One entry on the stack, written first as the reply entry, then as the forward one.
    let mut entry = Entry {
        to: pkt.t.reversed(),
        flags: flags | CT_REPLY,
        svc_id: svc.id,
        backend_id: choice.backend_id,
    };
    // The reply entry claims the masquerading port: the client's own if it lies in the
    // masquerading range, else (and after a collision) random ones of the range. With DSR the
    // replies never come back here: no reply entry.
    let mut claimed = dsr;
    let ports = snat::range();
    for i in 0..snat::TRIES {
        if dsr {
            break;
        }
        if snat {
            to.sport = snat::port(i, to.sport, ports);
        } else if i > 0 {
            break;
        }
        let map_flags = if snat { BPF_NOEXIST } else { BPF_ANY } as u64;
        if F::ct_insert(&to.reversed(), &entry, now, map_flags, 0).is_ok() {
            claimed = true;
            break;
        }
    }
    if !claimed {
        stats::count(if snat {
            Reason::SnatPortsExhausted
        } else {
            Reason::CtFailed
        });
        return TC_ACT_SHOT as i32;
    }
    entry.to = to;
    entry.flags = flags;
    // A least-connection frontend's flow holds a count until it closes or expires.
    if counted {
        conns::take(choice.backend_id);
    }
    if F::ct_insert(&pkt.t, &entry, now, BPF_ANY as u64, counted as u64).is_err() {
        if counted {
            conns::untake(choice.backend_id);
        }
        stats::count(Reason::CtFailed);
        return TC_ACT_SHOT as i32;
    }
    if rewrite::<F>(ctx, pkt, &to).is_err() {
        stats::count(Reason::CtFailed);
        return TC_ACT_SHOT as i32;
    }
    stats::count(Reason::NatNew);
    if choice.reason == Reason::AffinityHit {
        stats::count(Reason::AffinityHit);
    }
    if dsr {
        return dsr_forward::<F>(ctx, &to, &pkt.t, &via, ifindex);
    }
    forward::<F>(ctx, &to, ifindex)
}

/// A packet of a tracked DSR flow: the route to the backend names this node's address on the
/// way, which the option carries. Out of line: `handle`'s frame has no room for the lookup.
#[inline(never)]
fn dsr_established<F: Family>(ctx: &TcContext, to: &Tuple<F::Addr>, orig: &Tuple<F::Addr>) -> i32 {
    match route::<F>(ctx, to, true) {
        Ok(r) => dsr_forward::<F>(ctx, to, orig, &r.src, r.ifindex),
        Err(_) => {
            stats::count(Reason::FibPass);
            TC_ACT_OK as i32
        }
    }
}

/// Adds the DSR option naming the frontend of `orig` and this node (`node`, its address on
/// the way to the backend) and sends the packet out of `ifindex`. Inlined: `new_flow`'s frame
/// leaves room for `add_option_tc`'s and no more.
#[inline(always)]
fn dsr_forward<F: Family>(
    ctx: &TcContext,
    to: &Tuple<F::Addr>,
    orig: &Tuple<F::Addr>,
    node: &F::Addr,
    ifindex: u32,
) -> i32 {
    let (Some(frontend), Some(node)) = (dsr::frontend4::<F>(orig), F::v4(node)) else {
        return TC_ACT_SHOT as i32;
    };
    if dsr::add_option_tc(ctx, frontend, orig.dport, node).is_err() {
        return TC_ACT_SHOT as i32;
    }
    forward::<F>(ctx, to, ifindex)
}

/// Sends a translated packet on its way: straight to the egress interface the FIB names
/// (`ifindex`, or looked up when 0), or to the stack when the FIB has no forwarding route for
/// it. An index rather than an `Option`: a `None`'s undefined payload made LLVM store an
/// unset register, which the verifier refuses ("R1 !read_ok").
#[inline(always)]
pub fn forward<F: Family>(ctx: &TcContext, t: &Tuple<F::Addr>, ifindex: u32) -> i32 {
    let ifindex = match ifindex {
        0 => match route::<F>(ctx, t, false) {
            Ok(r) => r.ifindex,
            Err(_) => {
                stats::count(Reason::FibPass);
                return TC_ACT_OK as i32;
            }
        },
        i => i,
    };
    // Forwarded here, not by the stack: the TTL is counted down here too.
    if !count_down_ttl(ctx, F::AF == AF_INET) {
        stats::count(Reason::TtlExpired);
        return TC_ACT_OK as i32;
    }
    // SAFETY: plain helper call; NULL params make the kernel resolve the next hop itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
