//! Socket-layer translation: connect/sendmsg rewrite a Service address to a backend once per
//! connection (or per datagram flow: one unconnected socket's datagrams to one frontend);
//! recvmsg/getpeername show the Service address back. Written once over `SockFamily`; what
//! differs per family (the context's address fields, where a socket's source is known,
//! IPv4-mapped frontends on IPv6 sockets) is in its two implementations.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    affinity::{AffinityKey, CLIENT_ADDR, CLIENT_NETNS},
    backend::{BACKEND_LOCAL, BackendValue, FAMILY_V4, FAMILY_V6},
    event::{EVENT_DROPPED, EVENT_TRANSLATED, Event},
    proto,
    reason::{Hook, Reason},
    service::{
        FLAG_AFFINITY, FLAG_LEAST_CONN, FLAG_SNAT, FLAG_SOURCE_HASH, FLAG_SOURCE_RANGES,
        NETNS_HAS_V4, NETNS_HAS_V6, NETNS_POD_TC4, NETNS_POD_TC6, NetnsSource, SCOPE_EXTERNAL,
        SCOPE_INTERNAL, ServiceValue,
    },
};

use aya_log_ebpf::info;

use crate::{
    access::{debug, events, maps::LB_NETNS_SRC, socklb, stats},
    flow::{
        conns, monitor,
        records::{self, Records},
    },
    headers::{
        family::{V4, V6},
        hash, ip6_bytes, ip6_words,
    },
    services::{
        frontend::Frontends,
        lb::{self, Choice},
    },
};

/// What the socket hooks do differently per family.
pub trait SockFamily: Frontends + Records {
    /// The hooks are connect4/sendmsg4/recvmsg4/getpeername4: a program may read only its own
    /// family's context fields.
    const V4: bool;

    /// The context's user address (the destination at connect/sendmsg, the peer at
    /// recvmsg/getpeername).
    fn user_addr(sa: &bpf_sock_addr) -> Self::Addr;

    fn set_user_addr(sa: &mut bpf_sock_addr, addr: &Self::Addr);

    /// The source of this connection or datagram, where known before the kernel picks one:
    /// the address given with the datagram (sendmsg only), the socket's bound address, or the
    /// address its network namespace uses (`LB_NETNS_SRC`).
    fn source<const SEND: bool>(ctx: &SockAddrContext, out: &mut Self::Addr) -> bool;

    /// The frontend a destination names, and whether it is an IPv4 frontend reached through an
    /// IPv6 socket (`::ffff:a.b.c.d`).
    fn service(addr: &Self::Addr, port: u16, proto: u8) -> (Result<ServiceValue, Reason>, bool);

    /// Where the socket goes: the backend's address, IPv4-mapped when `mapped`.
    fn backend_to(b: &BackendValue, mapped: bool) -> Self::Addr;

    /// The source check of an IPv4 frontend reached through an IPv6 socket (`SOURCE_*`).
    fn source_code_mapped<const SEND: bool>(ctx: &SockAddrContext, svc_id: u32) -> u32;

    /// The debug line of a translation.
    fn log(ctx: &SockAddrContext, t: &Translation<Self::Addr>, to: &Self::Addr, to_port: u16);
}

/// A forward translation on its way to the backend: the frontend as the application wrote it.
pub struct Translation<A> {
    pub frontend: A,
    pub port: u16,
    pub proto: u8,
    /// An IPv4 frontend through an IPv6 socket (`SockFamily::service`).
    pub mapped: bool,
    pub svc_id: u32,
    /// The socket's cookie (its records' key).
    pub cookie: u64,
}

/// The hook of a forward translation.
#[inline(always)]
const fn hook<const SEND: bool>() -> Hook {
    if SEND { Hook::Sendmsg } else { Hook::Connect }
}

/// The event of a refused connect()/sendmsg(): the frontend as the application wrote it, the
/// client as its network namespace's address (when the agent knows it).
#[inline(never)]
fn dropped_event<F: SockFamily>(ctx: &SockAddrContext, hook_reason: u32) {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &*ctx.sock_addr };
    let Some(mut entry) = events::reserve() else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved, writable event; every field is written before it is
    // submitted.
    unsafe {
        (*e).kind = EVENT_DROPPED;
        (*e).backend = [0; 16];
        (*e).backend_port = 0;
        (*e).backend_id = 0;
        (*e).svc_id = 0;
        (*e).frontend = F::client_bytes(&F::user_addr(sa));
        (*e).frontend_port = port_from_ctx(sa.user_port);
        fill_sock_event(ctx, e, hook_reason, F::V4);
    }
    events::submit(entry);
}

/// The event of a translated connect()/sendmsg() to `frontend` (`addr` bytes, `port`): the
/// backend as the context now holds it.
#[inline(never)]
fn translated_event<F: SockFamily>(
    ctx: &SockAddrContext,
    hook_reason: u32,
    ids: u64,
    frontend: &[u8; 16],
    port: u16,
) {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &*ctx.sock_addr };
    let Some(mut entry) = events::reserve() else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved, writable event; every field is written before it is
    // submitted.
    unsafe {
        (*e).kind = EVENT_TRANSLATED;
        (*e).svc_id = (ids >> 32) as u32;
        (*e).backend_id = ids as u32;
        (*e).frontend = *frontend;
        (*e).frontend_port = port;
        (*e).backend = F::client_bytes(&F::user_addr(sa));
        (*e).backend_port = port_from_ctx(sa.user_port);
        fill_sock_event(ctx, e, hook_reason, F::V4);
    }
    events::submit(entry);
}

/// The fields both socket events share: hook, reason, family, protocol, time, client.
///
/// # Safety
/// `e` must point at a reserved event.
#[inline(always)]
unsafe fn fill_sock_event(ctx: &SockAddrContext, e: *mut Event, hook_reason: u32, v4: bool) {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &*ctx.sock_addr };
    let ns = netns_source(ctx);
    // SAFETY: the caller's reserved event.
    unsafe {
        (*e).hook = (hook_reason >> 24) as u8;
        (*e).reason = hook_reason & 0x00ff_ffff;
        (*e).family = if v4 { FAMILY_V4 } else { FAMILY_V6 };
        (*e).proto = sa.protocol as u8;
        (*e).time_ns = bpf_ktime_get_ns();
        (*e).client = [0; 16];
        (*e).client_port = 0;
        (*e)._pad = 0;
        match ns {
            Some(ns) if v4 && ns.flags & NETNS_HAS_V4 != 0 => {
                (*e).client[0] = ns.v4[0];
                (*e).client[1] = ns.v4[1];
                (*e).client[2] = ns.v4[2];
                (*e).client[3] = ns.v4[3];
            }
            Some(ns) if !v4 && ns.flags & NETNS_HAS_V6 != 0 => (*e).client = ns.v6,
            _ => {}
        }
    }
}

const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

/// Turns the outcome of a forward translation into the program's return value, in one place.
///
/// Only the Service's own rules fail the syscall: no backends rejects with ECONNREFUSED
/// (kube-proxy's REJECT, semantics 3.7), a policy drop fails with EPERM (semantics 3.8, and an
/// unallocated address of a ServiceCIDR, 3.12: the socket layer cannot silently lose a
/// connect, so it fails fast instead of hanging). Every other
/// reason leaves the socket as the application wrote it.
/// `SEND`: the sendmsg hook (else connect), for the drop counters and events.
#[inline(always)]
pub fn verdict<F: SockFamily, const SEND: bool>(
    ctx: &SockAddrContext,
    outcome: Result<Reason, Reason>,
) -> i32 {
    let reason = match outcome {
        Ok(reason) | Err(reason) => reason,
    };
    let errno = match reason {
        Reason::NoBackends => ECONNREFUSED,
        Reason::NoLocalBackends | Reason::SourceRefused | Reason::ServiceIpUnallocated => EPERM,
        _ => {
            stats::count(reason);
            return 1;
        }
    };
    let hook = hook::<SEND>();
    stats::dropped(hook, reason);
    if events::watching() {
        dropped_event::<F>(ctx, monitor::pack(hook, reason));
    }
    if debug::enabled() {
        info!(
            ctx,
            "kbp: refused with errno {} (reason {})", errno, reason as u32
        );
    }
    // SAFETY: plain helper call; the kernel turns retval into the syscall's error.
    unsafe { bpf_set_retval(-errno) };
    0
}

/// The client as affinity and source hashing know it: the caller's pod address where the agent
/// knows its network namespace's (`LB_NETNS_SRC`), the key tc uses for the same pod
/// (`CLIENT_ADDR`), so that a pod's connections to a Service port's ClusterIP here and to its
/// externalIPs, load balancer IPs and NodePorts at tc share one entry (semantics 6.2); else
/// the network namespace. Only a frontend with affinity or source hashing pays the lookup.
#[inline(always)]
fn client_of<F: SockFamily>(
    ctx: &SockAddrContext,
    svc: &ServiceValue,
    mapped: bool,
) -> AffinityKey {
    let mut key = netns_client(ctx, svc.port_id);
    if svc.has_flag(FLAG_AFFINITY | FLAG_SOURCE_HASH) {
        by_address(ctx, F::V4 || mapped, &mut key);
    }
    key
}

/// Rewrites `key` to the caller's address of the family (`v4`), if its namespace's is known.
/// A function of its own: its frame does not add to the hook's.
#[inline(never)]
fn by_address(ctx: &SockAddrContext, v4: bool, key: &mut AffinityKey) {
    let Some(ns) = netns_source(ctx) else {
        return;
    };
    let words = if v4 {
        if ns.flags & NETNS_HAS_V4 == 0 {
            return;
        }
        [u32::from_ne_bytes(ns.v4), 0, 0, 0]
    } else {
        if ns.flags & NETNS_HAS_V6 == 0 {
            return;
        }
        ip6_words(&ns.v6)
    };
    let k: *mut AffinityKey = key;
    // Written volatile, a 32-bit word at a time, as in `netns_client` (no byte-wise `memset`).
    // SAFETY: `k` is the caller's key; `client` sits at offset 8 of a 4-byte aligned struct.
    unsafe {
        (&raw mut (*k).client_kind).write(CLIENT_ADDR);
        let w = (&raw mut (*k).client).cast::<u32>();
        w.write_volatile(words[0]);
        w.add(1).write_volatile(words[1]);
        w.add(2).write_volatile(words[2]);
        w.add(3).write_volatile(words[3]);
    }
}

#[inline(always)]
fn netns_client(ctx: &SockAddrContext, port_id: u32) -> AffinityKey {
    // SAFETY: the helper reads the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let b = cookie.to_ne_bytes();
    let mut key = core::mem::MaybeUninit::<AffinityKey>::uninit();
    let k = key.as_mut_ptr();
    // Written volatile: zeroing the second half of `client` would otherwise compile to a call
    // of the byte-wise `memset` on every connect().
    // SAFETY: every field written before `assume_init`; `client` sits at offset 8 of a 4-byte
    // aligned struct, so its 32-bit words are aligned.
    unsafe {
        (&raw mut (*k).port_id).write(port_id);
        (&raw mut (*k).client_kind).write(CLIENT_NETNS);
        let w = (&raw mut (*k).client).cast::<u32>();
        w.write_volatile(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        w.add(1)
            .write_volatile(u32::from_ne_bytes([b[4], b[5], b[6], b[7]]));
        w.add(2).write_volatile(0);
        w.add(3).write_volatile(0);
        key.assume_init()
    }
}

/// The flow hash at the socket layer: the socket's cookie (one socket, one choice).
#[inline(always)]
fn socket_hash(cookie: u64) -> u32 {
    hash::finish(hash::mix(cookie as u32, (cookie >> 32) as u32))
}

/// The port field of `bpf_sock_addr` holds the port in network order in its low 16 bits.
#[inline(always)]
fn port_from_ctx(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
fn port_to_ctx(port: u16) -> u32 {
    port.to_be() as u32
}

/// A Service frontend's lookup, unless the caller's pod has socket-layer translation off: its
/// Services (with or without endpoints) are left to tc on the pod's interface.
#[inline(always)]
fn unless_per_packet(found: Result<ServiceValue, Reason>) -> Result<ServiceValue, Reason> {
    match found {
        Err(Reason::NotService) => found,
        _ if socklb::caller_opted_out() => Err(Reason::PerPacket),
        _ => found,
    }
}

/// Whether the caller is a pod whose interface carries tc (the agent marks its network
/// namespace per family): its connections to a frontend kube-proxy masquerades (an externalIP,
/// load balancer IP or NodePort with externalTrafficPolicy Cluster, semantics 7.13) are left
/// to tc, which masquerades them. Other callers (the node's own processes, pods not marked yet)
/// are translated here, over the cluster set (4.7 a/b).
#[inline(never)]
fn pod_at_tc<F: SockFamily>(ctx: &SockAddrContext, mapped: bool) -> bool {
    let flag = if F::V4 || mapped {
        NETNS_POD_TC4
    } else {
        NETNS_POD_TC6
    };
    netns_source(ctx).is_some_and(|ns| ns.flags & flag != 0)
}

/// The frontend (`addr`, `port`, `proto`) at the socket hooks. A miss on an address that is a
/// ClusterIP (it has the port-0, protocol-0 entry) is rejected like a Service without
/// endpoints, and one on any other address inside a ServiceCIDR is dropped (nftables mode,
/// semantics 3.12); any other miss leaves the socket alone.
#[inline(always)]
fn lookup<F: Frontends>(addr: &F::Addr, port: u16, proto: u8) -> Result<ServiceValue, Reason> {
    if let Some(svc) = F::lookup(addr, port, proto, SCOPE_INTERNAL) {
        return Ok(svc);
    }
    if F::cluster_ip(addr) {
        Err(Reason::NoBackends)
    } else if F::in_service_cidr(addr) {
        Err(Reason::ServiceIpUnallocated)
    } else {
        Err(Reason::NotService)
    }
}

/// The source address this socket's network namespace connects from, as the agent found it.
#[inline(always)]
fn netns_source(ctx: &SockAddrContext) -> Option<&NetnsSource> {
    // SAFETY: the helper reads the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    unsafe { LB_NETNS_SRC.get(&cookie) }
}

/// Copies an address given as the context's four 32-bit words into `out` if it is set.
#[inline(always)]
fn put_words(w: [u32; 4], out: &mut [u8; 16]) -> bool {
    if w[0] | w[1] | w[2] | w[3] == 0 {
        return false;
    }
    // SAFETY: 16 bytes either way; unaligned writes.
    unsafe { core::ptr::write_unaligned(out.as_mut_ptr().cast::<[u32; 4]>(), w) };
    true
}

/// The IPv6 source (`SockFamily::source`); the namespace's address only when `ns_ok` (an
/// IPv4-mapped frontend wants the IPv4 one instead).
#[inline(always)]
fn source6<const SEND: bool>(ctx: &SockAddrContext, out: &mut [u8; 16], ns_ok: bool) -> bool {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &*ctx.sock_addr };
    if SEND
        && put_words(
            [
                sa.msg_src_ip6[0],
                sa.msg_src_ip6[1],
                sa.msg_src_ip6[2],
                sa.msg_src_ip6[3],
            ],
            out,
        )
    {
        return true;
    }
    // SAFETY: the kernel gives every sock_addr program its socket (never null).
    let sk = unsafe { &*sa.__bindgen_anon_1.sk };
    if put_words(
        [sk.src_ip6[0], sk.src_ip6[1], sk.src_ip6[2], sk.src_ip6[3]],
        out,
    ) {
        return true;
    }
    match netns_source(ctx) {
        Some(ns) if ns_ok && ns.flags & NETNS_HAS_V6 != 0 => {
            *out = ns.v6;
            true
        }
        _ => false,
    }
}

/// Source check verdicts, passed back from their own BPF function as a plain register value.
const SOURCE_OK: u32 = 0;
const SOURCE_REFUSED: u32 = 1;
const SOURCE_UNKNOWN: u32 = 2;

#[inline(always)]
fn from_code(code: u32) -> Result<(), Reason> {
    match code {
        SOURCE_OK => Ok(()),
        SOURCE_REFUSED => Err(Reason::SourceRefused),
        _ => Err(Reason::SourceUnknown),
    }
}

/// loadBalancerSourceRanges at the socket layer (semantics 7.8, 7.9): a frontend with ranges
/// (a load balancer IP) takes only sources inside them. A source outside is refused (EPERM,
/// the socket-layer form of kube-proxy's DROP), before any affinity is read or written; an
/// unknown source leaves the socket untranslated, so the packet path checks the real one. An
/// IPv4 frontend through an IPv6 socket is checked with the IPv4 source.
#[inline(always)]
fn check_source<F: SockFamily, const SEND: bool>(
    ctx: &SockAddrContext,
    svc: &ServiceValue,
    mapped: bool,
) -> Result<(), Reason> {
    if !svc.has_flag(FLAG_SOURCE_RANGES) {
        return Ok(());
    }
    from_code(if mapped {
        F::source_code_mapped::<SEND>(ctx, svc.id)
    } else {
        source_code::<F, SEND>(ctx, svc.id)
    })
}

/// The check itself, in a BPF function of its own: its stack does not add to the hook's.
#[inline(never)]
fn source_code<F: SockFamily, const SEND: bool>(ctx: &SockAddrContext, svc_id: u32) -> u32 {
    let mut source = F::Addr::default();
    if !F::source::<SEND>(ctx, &mut source) {
        return SOURCE_UNKNOWN;
    }
    if F::source_allowed(svc_id, &source) {
        SOURCE_OK
    } else {
        SOURCE_REFUSED
    }
}

/// Forward translation. Ok(reason) when the socket was translated or is not ours.
/// `SEND`: called from sendmsg (the datagram may carry its own source address).
#[inline(always)]
pub fn fwd<F: SockFamily, const SEND: bool>(ctx: &SockAddrContext) -> Result<Reason, Reason> {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &*ctx.sock_addr };
    // Built at once, and the frontend read from it: the translation is passed by reference to
    // BPF functions, so it stays in one place on the stack (a frontend held apart would be
    // split into its bytes, each spilled to a slot of its own).
    let mut t = Translation {
        frontend: F::user_addr(sa),
        port: port_from_ctx(sa.user_port),
        proto: sa.protocol as u8,
        mapped: false,
        svc_id: 0,
        cookie: 0,
    };
    let (port, proto_) = (t.port, t.proto);
    let (found, mapped) = F::service(&t.frontend, port, proto_);
    t.mapped = mapped;
    let svc = unless_per_packet(found)?;
    t.svc_id = svc.id;
    if svc.has_flag(FLAG_SNAT) && pod_at_tc::<F>(ctx, mapped) {
        return Err(Reason::PerPacket);
    }
    check_source::<F, SEND>(ctx, &svc, mapped)?;
    // SAFETY: the helper reads the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    t.cookie = cookie;
    let client = client_of::<F>(ctx, &svc, mapped);
    let Choice {
        backend,
        reason,
        backend_id,
    } = if SEND {
        lb::select_datagram(&svc, &client, socket_hash(cookie), cookie)?
    } else {
        lb::select::<true>(&svc, &client, socket_hash(cookie), 0)?
    };
    if backend.flags & BACKEND_LOCAL != 0
        && hairpin::<F>(
            ctx,
            &t,
            (u64::from(svc.port_id) << 32) | u64::from(backend_id),
            &backend,
        )
    {
        return Err(Reason::PerPacket);
    }
    if svc.has_flag(FLAG_LEAST_CONN) && proto_ == proto::TCP {
        conns::count(ctx, backend_id);
    }
    // A datagram flow's later datagrams find their record written (checked from here: the
    // check's frame would not fit below `commit`'s).
    let recorded = SEND && already_recorded::<F>(&t, &backend);
    commit::<F, SEND>(ctx, &t, &backend, recorded)?;
    if events::watching() {
        translated_event::<F>(
            ctx,
            monitor::pack(hook::<SEND>(), reason),
            (u64::from(svc.id) << 32) | u64::from(backend_id),
            &F::client_bytes(&t.frontend),
            port,
        );
    }
    Ok(reason)
}

/// Whether the connection lands on its own pod (the chosen `backend` is the caller's pod
/// address), from a pod whose interface carries tc: kube-proxy masquerades it so that the reply
/// comes back through the node (hairpin, semantics 7.14), which the socket layer cannot do. It
/// is left untranslated for tc, with the choice written for tc to take
/// (`lb::remember_hairpin`), so the pod reaches itself as often as it would have here: for a
/// frontend tc looks up as this layer did (`tc_takes_internal`), a ClusterIP or an
/// externalTrafficPolicy Local external address (short-circuited to the cluster set, 4.7a).
/// Callers whose interface has no tc keep the translation here. A BPF function of its own: only
/// a local backend pays for its lookups, and its frame does not add to the hook's. `ids`: the
/// Service port's id (`ServiceValue::port_id`) in the high half, the backend's in the low one.
#[inline(never)]
fn hairpin<F: SockFamily>(
    ctx: &SockAddrContext,
    t: &Translation<F::Addr>,
    ids: u64,
    backend: &BackendValue,
) -> bool {
    let Some(ns) = netns_source(ctx) else {
        return false;
    };
    let v4 = F::V4 || t.mapped;
    let words = if v4 {
        let wanted = NETNS_HAS_V4 | NETNS_POD_TC4;
        if ns.flags & wanted != wanted || ns.v4 != backend.addr4() {
            return false;
        }
        [u32::from_ne_bytes(ns.v4), 0, 0, 0]
    } else {
        let wanted = NETNS_HAS_V6 | NETNS_POD_TC6;
        let own = ip6_words(&ns.v6);
        if ns.flags & wanted != wanted || own != ip6_words(&backend.addr) {
            return false;
        }
        own
    };
    let takes = if t.mapped {
        let a = F::client_bytes(&t.frontend);
        tc_takes_internal::<V4>(&[a[12], a[13], a[14], a[15]], t.port, t.proto)
    } else {
        tc_takes_internal::<F>(&t.frontend, t.port, t.proto)
    };
    if !takes {
        return false;
    }
    lb::remember_hairpin((ids >> 32) as u32, &ip6_bytes(&words), ids as u32);
    true
}

/// Whether tc on a pod's interface translates a pod's new flow to `addr`:`port` with the
/// internal frontend this layer found, taking its hairpin choice (`nodeport::outside_scope`
/// decides so): a ClusterIP's (no external frontend at that address and port), or an external
/// address's whose external frontend does not masquerade (externalTrafficPolicy Local). The
/// external addresses of a Service with policy Cluster never get here: their internal
/// frontends masquerade, so `fwd` left the pod's connection to tc before drawing.
#[inline(always)]
fn tc_takes_internal<F: Frontends>(addr: &F::Addr, port: u16, proto: u8) -> bool {
    match F::lookup(addr, port, proto, SCOPE_EXTERNAL) {
        Some(ext) => !ext.has_flag(FLAG_SNAT),
        None => F::cluster_ip(addr),
    }
}

/// The end of a forward translation, in a BPF function of its own (the hooks' stacks are near
/// the verifier's 512 bytes): records the socket and rewrites the destination to the backend.
/// A connected socket's record is found again at its release from the socket's destination
/// (`conns::release`); a datagram's (`SEND`) is remembered in the socket's storage, created
/// only then: a connect() pays for no storage unless least-connection counts it.
#[inline(never)]
fn commit<F: SockFamily, const SEND: bool>(
    ctx: &SockAddrContext,
    t: &Translation<F::Addr>,
    backend: &BackendValue,
    recorded: bool,
) -> Result<(), Reason> {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &mut *ctx.sock_addr };
    let to = F::backend_to(backend, t.mapped);
    if !recorded {
        records::record::<F>(t.cookie, &to, backend.port, &t.frontend, t.port, t.svc_id)?;
    }
    if SEND {
        conns::remember(ctx, F::FAMILY, &F::client_bytes(&to), backend.port);
    }
    F::set_user_addr(sa, &to);
    sa.user_port = port_to_ctx(backend.port);
    if debug::enabled() {
        F::log(ctx, t, &to, backend.port);
    }
    Ok(())
}

/// Whether the socket's record for this translation is there already (`Records::holds`).
#[inline(never)]
fn already_recorded<F: SockFamily>(t: &Translation<F::Addr>, backend: &BackendValue) -> bool {
    let to = F::backend_to(backend, t.mapped);
    F::holds(t.cookie, &to, backend.port, &t.frontend, t.port, t.svc_id)
}

/// Reverse translation: backend address → Service address, if this socket was translated.
#[inline(always)]
pub fn rev<F: SockFamily>(ctx: &SockAddrContext) {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the helper reads the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some((frontend, port, _)) =
        F::read(cookie, &F::user_addr(sa), port_from_ctx(sa.user_port))
    {
        F::set_user_addr(sa, &frontend);
        sa.user_port = port_to_ctx(port);
        stats::count(Reason::RevTranslated);
    }
}

/// `::ffff:a.b.c.d`: an IPv4 peer reached through an IPv6 socket.
#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[0]
        | addr[1]
        | addr[2]
        | addr[3]
        | addr[4]
        | addr[5]
        | addr[6]
        | addr[7]
        | addr[8]
        | addr[9]
        == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

impl SockFamily for V4 {
    const V4: bool = true;

    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> [u8; 4] {
        sa.user_ip4.to_ne_bytes()
    }

    #[inline(always)]
    fn set_user_addr(sa: &mut bpf_sock_addr, addr: &[u8; 4]) {
        sa.user_ip4 = u32::from_ne_bytes(*addr);
    }

    #[inline(always)]
    fn source<const SEND: bool>(ctx: &SockAddrContext, out: &mut [u8; 4]) -> bool {
        // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
        let sa = unsafe { &*ctx.sock_addr };
        let mut addr = 0u32;
        if SEND {
            addr = sa.msg_src_ip4;
        }
        if addr == 0 {
            // SAFETY: the kernel gives every sock_addr program its socket (never null).
            addr = unsafe { (*sa.__bindgen_anon_1.sk).src_ip4 };
        }
        if addr != 0 {
            *out = addr.to_ne_bytes();
            return true;
        }
        match netns_source(ctx) {
            Some(ns) if ns.flags & NETNS_HAS_V4 != 0 => {
                *out = ns.v4;
                true
            }
            _ => false,
        }
    }

    #[inline(always)]
    fn service(addr: &[u8; 4], port: u16, proto: u8) -> (Result<ServiceValue, Reason>, bool) {
        (lookup::<V4>(addr, port, proto), false)
    }

    #[inline(always)]
    fn backend_to(b: &BackendValue, _mapped: bool) -> [u8; 4] {
        b.addr4()
    }

    #[inline(always)]
    fn source_code_mapped<const SEND: bool>(_ctx: &SockAddrContext, _svc_id: u32) -> u32 {
        // An IPv4 socket never reaches a mapped frontend.
        SOURCE_UNKNOWN
    }

    #[inline(never)]
    fn log(ctx: &SockAddrContext, t: &Translation<[u8; 4]>, to: &[u8; 4], to_port: u16) {
        info!(
            ctx,
            "kbp: {:i}:{} proto {} -> {:i}:{} (frontend {})",
            t.frontend,
            t.port,
            t.proto,
            *to,
            to_port,
            t.svc_id
        );
    }
}

impl SockFamily for V6 {
    const V4: bool = false;

    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> [u8; 16] {
        // SAFETY: the context's fields read one 32-bit word at a time (volatile: the context
        // allows no wider access, which LLVM would otherwise merge into).
        let words = unsafe {
            [
                core::ptr::read_volatile(&sa.user_ip6[0]),
                core::ptr::read_volatile(&sa.user_ip6[1]),
                core::ptr::read_volatile(&sa.user_ip6[2]),
                core::ptr::read_volatile(&sa.user_ip6[3]),
            ]
        };
        ip6_bytes(&words)
    }

    #[inline(always)]
    fn set_user_addr(sa: &mut bpf_sock_addr, addr: &[u8; 16]) {
        let w = ip6_words(addr);
        sa.user_ip6[0] = w[0];
        sa.user_ip6[1] = w[1];
        sa.user_ip6[2] = w[2];
        sa.user_ip6[3] = w[3];
    }

    #[inline(always)]
    fn source<const SEND: bool>(ctx: &SockAddrContext, out: &mut [u8; 16]) -> bool {
        source6::<SEND>(ctx, out, true)
    }

    #[inline(always)]
    fn service(addr: &[u8; 16], port: u16, proto: u8) -> (Result<ServiceValue, Reason>, bool) {
        if is_v4_mapped(addr) {
            let v4 = [addr[12], addr[13], addr[14], addr[15]];
            (lookup::<V4>(&v4, port, proto), true)
        } else {
            (lookup::<V6>(addr, port, proto), false)
        }
    }

    #[inline(always)]
    fn backend_to(b: &BackendValue, mapped: bool) -> [u8; 16] {
        if !mapped {
            return b.addr;
        }
        let mut to = [0u8; 16];
        to[10] = 0xff;
        to[11] = 0xff;
        to[12] = b.addr[0];
        to[13] = b.addr[1];
        to[14] = b.addr[2];
        to[15] = b.addr[3];
        to
    }

    /// The IPv4-mapped bound address, else the namespace's IPv4 address.
    #[inline(never)]
    fn source_code_mapped<const SEND: bool>(ctx: &SockAddrContext, svc_id: u32) -> u32 {
        let mut bound = [0u8; 16];
        let source = if source6::<SEND>(ctx, &mut bound, false) && is_v4_mapped(&bound) {
            [bound[12], bound[13], bound[14], bound[15]]
        } else {
            match netns_source(ctx) {
                Some(ns) if ns.flags & NETNS_HAS_V4 != 0 => ns.v4,
                _ => return SOURCE_UNKNOWN,
            }
        };
        if V4::source_allowed(svc_id, &source) {
            SOURCE_OK
        } else {
            SOURCE_REFUSED
        }
    }

    #[inline(never)]
    fn log(ctx: &SockAddrContext, t: &Translation<[u8; 16]>, to: &[u8; 16], to_port: u16) {
        info!(
            ctx,
            "kbp: [{:i}]:{} proto {} -> [{:i}]:{} (frontend {})",
            t.frontend,
            t.port,
            t.proto,
            *to,
            to_port,
            t.svc_id
        );
    }
}
