//! Socket-layer translation: connect/sendmsg rewrite a Service address to a backend once per
//! connection (or datagram); recvmsg/getpeername show the Service address back.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_NOEXIST, bpf_sock_addr},
    btf_maps::lpm_trie::Key as LpmKey,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    affinity::{AffinityKey, CLIENT_NETNS},
    backend::{BackendValue, FAMILY_V4, FAMILY_V6},
    event::{EVENT_DROPPED, EVENT_TRANSLATED, Event},
    proto,
    reason::{Hook, Reason},
    revnat::{SockRevNat4Key, SockRevNat4Value, SockRevNat6Key, SockRevNat6Value},
    service::{
        FLAG_LEAST_CONN, FLAG_SOURCE_RANGES, NETNS_HAS_V4, NETNS_HAS_V6, NetnsSource,
        SCOPE_INTERNAL, Service4Key, Service6Key, ServiceValue, SrcRange4, SrcRange6,
    },
};

use aya_log_ebpf::info;

use crate::{
    access::{
        debug, events,
        maps::{
            LB_NETNS_SRC, LB4_SERVICES, LB4_SRC_RANGES, LB6_SERVICES, LB6_SRC_RANGES, SOCK4_REVNAT,
            SOCK6_REVNAT,
        },
        socklb, stats,
    },
    flow::{conns, monitor},
    headers::{hash, ip6_bytes, ip6_words},
    services::lb::{self, Choice},
};

/// The hook of a forward translation.
#[inline(always)]
const fn hook<const SEND: bool>() -> Hook {
    if SEND { Hook::Sendmsg } else { Hook::Connect }
}

/// The event of a refused connect()/sendmsg(): the frontend as the application wrote it, the
/// client as its network namespace's address (when the agent knows it).
/// `V4`: the hook is connect4/sendmsg4 (each family's hooks may read only its own context
/// fields).
#[inline(never)]
fn dropped_event<const V4: bool>(ctx: &SockAddrContext, hook_reason: u32) {
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
        user_addr::<V4>(sa, &raw mut (*e).frontend);
        (*e).frontend_port = port_from_ctx(sa.user_port);
        fill_sock_event(ctx, e, hook_reason, V4);
    }
    entry.submit(0);
}

/// The event of a translated connect()/sendmsg() to `frontend` (`addr` bytes, `port`): the
/// backend as the context now holds it.
#[inline(never)]
fn translated_event<const V4: bool>(
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
        user_addr::<V4>(sa, &raw mut (*e).backend);
        (*e).backend_port = port_from_ctx(sa.user_port);
        fill_sock_event(ctx, e, hook_reason, V4);
    }
    entry.submit(0);
}

/// Writes the context's user address (IPv4 in the first four bytes) to `out`.
///
/// # Safety
/// `out` must be valid for a 16-byte write.
#[inline(always)]
unsafe fn user_addr<const V4: bool>(sa: &bpf_sock_addr, out: *mut [u8; 16]) {
    // SAFETY: the caller's 16 writable bytes; the context's fields read one 32-bit word at a
    // time (volatile: the context allows no wider access, which LLVM would otherwise merge
    // into).
    unsafe {
        if V4 {
            *out = [0; 16];
            core::ptr::write_unaligned(out.cast::<u32>(), sa.user_ip4);
        } else {
            let words = [
                core::ptr::read_volatile(&sa.user_ip6[0]),
                core::ptr::read_volatile(&sa.user_ip6[1]),
                core::ptr::read_volatile(&sa.user_ip6[2]),
                core::ptr::read_volatile(&sa.user_ip6[3]),
            ];
            core::ptr::write_unaligned(out.cast::<[u32; 4]>(), words);
        }
    }
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
/// (kube-proxy's REJECT, semantics 3.7), a policy drop fails with EPERM (semantics 3.8: the
/// socket layer cannot silently lose a connect, so it fails fast instead of hanging). Every other
/// reason leaves the socket as the application wrote it.
/// `SEND`: the sendmsg hook (else connect), for the drop counters and events; `V4`: an IPv4
/// hook.
#[inline(always)]
pub fn verdict<const SEND: bool, const V4: bool>(
    ctx: &SockAddrContext,
    outcome: Result<Reason, Reason>,
) -> i32 {
    let reason = match outcome {
        Ok(reason) | Err(reason) => reason,
    };
    let errno = match reason {
        Reason::NoBackends => ECONNREFUSED,
        Reason::NoLocalBackends | Reason::SourceRefused => EPERM,
        _ => {
            stats::count(reason);
            return 1;
        }
    };
    let hook = hook::<SEND>();
    stats::dropped(hook, reason);
    if events::watching() {
        dropped_event::<V4>(ctx, monitor::pack(hook, reason));
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

#[inline(always)]
fn client_of(ctx: &SockAddrContext, port_id: u32) -> AffinityKey {
    // SAFETY: the helper reads the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut client = [0u8; 16];
    let bytes = cookie.to_ne_bytes();
    let mut i = 0;
    while i < 8 {
        client[i] = bytes[i];
        i += 1;
    }
    AffinityKey {
        port_id,
        client_kind: CLIENT_NETNS,
        client,
    }
}

/// The flow hash at the socket layer: the socket's cookie (one socket, one choice).
#[inline(always)]
fn socket_hash(ctx: &SockAddrContext) -> u32 {
    // SAFETY: the helper reads the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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

/// The frontend for `key`. A miss on an address that is a ClusterIP (it has the port-0,
/// protocol-0 entry) is rejected like a Service without endpoints (nftables mode,
/// semantics 3.12); any other miss leaves the socket alone.
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

#[inline(always)]
fn lookup4(key: &Service4Key) -> Result<ServiceValue, Reason> {
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    if let Some(svc) = unsafe { LB4_SERVICES.get(key) } {
        return Ok(*svc);
    }
    let any_port = Service4Key {
        port: 0,
        proto: 0,
        ..*key
    };
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    match unsafe { LB4_SERVICES.get(&any_port) } {
        Some(_) => Err(Reason::NoBackends),
        None => Err(Reason::NotService),
    }
}

#[inline(always)]
fn lookup6(key: &Service6Key) -> Result<ServiceValue, Reason> {
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    if let Some(svc) = unsafe { LB6_SERVICES.get(key) } {
        return Ok(*svc);
    }
    let any_port = Service6Key {
        port: 0,
        proto: 0,
        ..*key
    };
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    match unsafe { LB6_SERVICES.get(&any_port) } {
        Some(_) => Err(Reason::NoBackends),
        None => Err(Reason::NotService),
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

/// Writes the IPv4 source of this connection or datagram into `out`, where known before the
/// kernel picks one: the address given with the datagram (IP_PKTINFO, sendmsg only), the
/// socket's bound address, or the address its network namespace uses (`LB_NETNS_SRC`).
#[inline(always)]
fn source4<const SEND: bool>(ctx: &SockAddrContext, out: &mut [u8; 4]) -> bool {
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

/// The IPv6 source, found as `source4` finds the IPv4 one; the namespace's address only when
/// `ns_ok` (an IPv4-mapped frontend wants the IPv4 one instead).
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
    // SAFETY: as in `source4`.
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

/// loadBalancerSourceRanges at the socket layer (semantics 7.8, 7.9): a frontend with ranges
/// (a load balancer IP) takes only sources inside them. A source outside is refused (EPERM,
/// the socket-layer form of kube-proxy's DROP), before any affinity is read or written; an
/// unknown source leaves the socket untranslated, so the packet path checks the real one.
#[inline(always)]
fn check_source4<const SEND: bool>(
    ctx: &SockAddrContext,
    svc: &ServiceValue,
) -> Result<(), Reason> {
    if !svc.has_flag(FLAG_SOURCE_RANGES) {
        return Ok(());
    }
    from_code(source_code4::<SEND>(ctx, svc.id))
}

/// As `check_source4`, for an IPv6 socket: an IPv4-mapped frontend is checked with the IPv4
/// source (the mapped bound address, or the namespace's IPv4 address).
#[inline(always)]
fn check_source6<const SEND: bool>(
    ctx: &SockAddrContext,
    flags: u16,
    svc_id: u32,
    mapped: bool,
) -> Result<(), Reason> {
    if flags & FLAG_SOURCE_RANGES == 0 {
        return Ok(());
    }
    let code = if mapped {
        source_code6_mapped::<SEND>(ctx, svc_id)
    } else {
        source_code6::<SEND>(ctx, svc_id)
    };
    from_code(code)
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

/// The IPv4 check, in a BPF function of its own with the LPM key filled in place: its stack
/// does not add to the hook's, which is close to the verifier's 512 bytes already.
#[inline(never)]
fn source_code4<const SEND: bool>(ctx: &SockAddrContext, svc_id: u32) -> u32 {
    let mut key = LpmKey::new(
        64,
        SrcRange4 {
            svc_id: svc_id.to_be_bytes(),
            addr: [0; 4],
        },
    );
    if !source4::<SEND>(ctx, &mut key.data.addr) {
        return SOURCE_UNKNOWN;
    }
    if LB4_SRC_RANGES.get(&key).is_some() {
        SOURCE_OK
    } else {
        SOURCE_REFUSED
    }
}

/// The IPv6 check, as `source_code4`.
#[inline(never)]
fn source_code6<const SEND: bool>(ctx: &SockAddrContext, svc_id: u32) -> u32 {
    let mut key = LpmKey::new(
        160,
        SrcRange6 {
            svc_id: svc_id.to_be_bytes(),
            addr: [0; 16],
        },
    );
    if !source6::<SEND>(ctx, &mut key.data.addr, true) {
        return SOURCE_UNKNOWN;
    }
    if LB6_SRC_RANGES.get(&key).is_some() {
        SOURCE_OK
    } else {
        SOURCE_REFUSED
    }
}

/// An IPv4 frontend through an IPv6 socket: the IPv4-mapped bound address, else the namespace's
/// IPv4 address.
#[inline(never)]
fn source_code6_mapped<const SEND: bool>(ctx: &SockAddrContext, svc_id: u32) -> u32 {
    let mut key = LpmKey::new(
        64,
        SrcRange4 {
            svc_id: svc_id.to_be_bytes(),
            addr: [0; 4],
        },
    );
    let mut bound = [0u8; 16];
    let known = if source6::<SEND>(ctx, &mut bound, false) && is_v4_mapped(&bound) {
        key.data.addr = [bound[12], bound[13], bound[14], bound[15]];
        true
    } else {
        match netns_source(ctx) {
            Some(ns) if ns.flags & NETNS_HAS_V4 != 0 => {
                key.data.addr = ns.v4;
                true
            }
            _ => false,
        }
    };
    if !known {
        return SOURCE_UNKNOWN;
    }
    if LB4_SRC_RANGES.get(&key).is_some() {
        SOURCE_OK
    } else {
        SOURCE_REFUSED
    }
}

/// Forward translation, IPv4. Ok(reason) when the socket was translated or is not ours.
/// `SEND`: called from sendmsg (the datagram may carry its own source address).
#[inline(always)]
pub fn fwd4<const SEND: bool>(ctx: &SockAddrContext) -> Result<Reason, Reason> {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = Service4Key {
        addr: sa.user_ip4.to_ne_bytes(),
        port: port_from_ctx(sa.user_port),
        proto: sa.protocol as u8,
        scope: SCOPE_INTERNAL,
    };
    let svc = unless_per_packet(lookup4(&key))?;
    check_source4::<SEND>(ctx, &svc)?;
    let Choice {
        backend,
        reason,
        backend_id,
    } = lb::select::<true>(&svc, &client_of(ctx, svc.port_id), socket_hash(ctx), 0)?;
    if svc.has_flag(FLAG_LEAST_CONN) && key.proto == proto::TCP {
        conns::count(ctx, backend_id);
    }
    let backend_addr = backend.addr4();
    // SAFETY: the helper reads the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevNat4Key {
        cookie,
        addr: backend_addr,
        port: backend.port,
        _pad: 0,
    };
    let rev_value = SockRevNat4Value {
        addr: key.addr,
        port: key.port,
        _pad: 0,
        svc_id: svc.id,
    };
    // Without a reverse entry the application would see the backend's address in replies;
    // better to leave this socket untranslated than half translated.
    // A new record is counted, so the agent can tell evictions (records gone although
    // nothing deleted them) from a map that merely holds many sockets.
    match SOCK4_REVNAT.insert(&rev_key, &rev_value, BPF_NOEXIST as u64) {
        Ok(()) => stats::count(Reason::RevNatNew4),
        Err(_) => SOCK4_REVNAT
            .insert(&rev_key, &rev_value, 0)
            .map_err(|_| Reason::RevNatFailed)?,
    }
    let mut remembered = [0u8; 16];
    remembered[0] = backend_addr[0];
    remembered[1] = backend_addr[1];
    remembered[2] = backend_addr[2];
    remembered[3] = backend_addr[3];
    conns::remember(ctx, FAMILY_V4, &remembered, backend.port);
    sa.user_ip4 = u32::from_ne_bytes(backend_addr);
    sa.user_port = port_to_ctx(backend.port);
    if events::watching() {
        let mut frontend = [0u8; 16];
        frontend[0] = key.addr[0];
        frontend[1] = key.addr[1];
        frontend[2] = key.addr[2];
        frontend[3] = key.addr[3];
        translated_event::<true>(
            ctx,
            monitor::pack(hook::<SEND>(), reason),
            (u64::from(svc.id) << 32) | u64::from(backend_id),
            &frontend,
            key.port,
        );
    }
    if debug::enabled() {
        info!(
            ctx,
            "kbp: {:i}:{} proto {} -> {:i}:{} (frontend {})",
            key.addr,
            key.port,
            key.proto,
            backend_addr,
            backend.port,
            svc.id
        );
    }
    Ok(reason)
}

/// Reverse translation, IPv4: backend address → Service address, if this socket was translated.
#[inline(always)]
pub fn rev4(ctx: &SockAddrContext) {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = SockRevNat4Key {
        // SAFETY: the helper reads the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: sa.user_ip4.to_ne_bytes(),
        port: port_from_ctx(sa.user_port),
        _pad: 0,
    };
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    if let Some(frontend) = unsafe { SOCK4_REVNAT.get(&key) } {
        sa.user_ip4 = u32::from_ne_bytes(frontend.addr);
        sa.user_port = port_to_ctx(frontend.port);
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

/// Forward translation, IPv6. An IPv4-mapped destination is looked up among the IPv4
/// frontends and translated to the IPv4-mapped backend address. Verdicts as `fwd4`.
#[inline(always)]
pub fn fwd6<const SEND: bool>(ctx: &SockAddrContext) -> Result<Reason, Reason> {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &mut *ctx.sock_addr };
    // The context's user_ip6 must be read one 32-bit word at a time.
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let key = Service6Key {
        addr: ip6_bytes(&words),
        port: port_from_ctx(sa.user_port),
        proto: sa.protocol as u8,
        scope: SCOPE_INTERNAL,
    };
    let mapped = is_v4_mapped(&key.addr);
    let svc = unless_per_packet(if mapped {
        lookup4(&Service4Key {
            addr: [key.addr[12], key.addr[13], key.addr[14], key.addr[15]],
            port: key.port,
            proto: key.proto,
            scope: key.scope,
        })
    } else {
        lookup6(&key)
    })?;
    check_source6::<SEND>(ctx, svc.flags, svc.id, mapped)?;
    let Choice {
        backend,
        reason,
        backend_id,
    } = lb::select::<true>(&svc, &client_of(ctx, svc.port_id), socket_hash(ctx), 0)?;
    if svc.has_flag(FLAG_LEAST_CONN) && key.proto == proto::TCP {
        conns::count(ctx, backend_id);
    }
    commit6(ctx, &key, &backend, svc.id, mapped)?;
    if events::watching() {
        translated_event::<false>(
            ctx,
            monitor::pack(hook::<SEND>(), reason),
            (u64::from(svc.id) << 32) | u64::from(backend_id),
            &key.addr,
            key.port,
        );
    }
    Ok(reason)
}

/// The end of an IPv6 forward translation, in a BPF function of its own (the hook's stack is
/// near the verifier's 512 bytes): records the socket's reverse entry, remembers the backend
/// for least-connection, and rewrites the destination to `backend` (IPv4-mapped when `mapped`).
#[inline(never)]
fn commit6(
    ctx: &SockAddrContext,
    key: &Service6Key,
    backend: &BackendValue,
    svc_id: u32,
    mapped: bool,
) -> Result<(), Reason> {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &mut *ctx.sock_addr };
    // Addresses move as 32-bit words: byte-wise copies make the compiler spill every byte.
    let words: [u32; 4] = if mapped {
        // SAFETY: the first 4 of the backend's 16 address bytes, read unaligned.
        let v4 = unsafe { core::ptr::read_unaligned(backend.addr.as_ptr().cast::<u32>()) };
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4]
    } else {
        // SAFETY: 16 bytes read as four words, unaligned.
        unsafe { core::ptr::read_unaligned(backend.addr.as_ptr().cast::<[u32; 4]>()) }
    };
    let mut rev_key = SockRevNat6Key {
        // SAFETY: the helper reads the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: [0; 16],
        port: backend.port,
        _pad: [0; 6],
    };
    // SAFETY: 16 bytes written as four words, unaligned.
    unsafe { core::ptr::write_unaligned(rev_key.addr.as_mut_ptr().cast::<[u32; 4]>(), words) };
    let rev_value = SockRevNat6Value {
        addr: key.addr,
        port: key.port,
        _pad: 0,
        svc_id,
    };
    // A new record is counted, so the agent can tell evictions (records gone although
    // nothing deleted them) from a map that merely holds many sockets.
    match SOCK6_REVNAT.insert(&rev_key, &rev_value, BPF_NOEXIST as u64) {
        Ok(()) => stats::count(Reason::RevNatNew6),
        Err(_) => SOCK6_REVNAT
            .insert(&rev_key, &rev_value, 0)
            .map_err(|_| Reason::RevNatFailed)?,
    }
    conns::remember(ctx, FAMILY_V6, &rev_key.addr, backend.port);
    sa.user_ip6[0] = words[0];
    sa.user_ip6[1] = words[1];
    sa.user_ip6[2] = words[2];
    sa.user_ip6[3] = words[3];
    sa.user_port = port_to_ctx(backend.port);
    if debug::enabled() {
        log6(ctx, key, &rev_key, svc_id);
    }
    Ok(())
}

/// The debug line of an IPv6 translation; its formatting stack is kept out of the hook's.
#[inline(never)]
fn log6(ctx: &SockAddrContext, key: &Service6Key, to: &SockRevNat6Key, svc_id: u32) {
    info!(
        ctx,
        "kbp: [{:i}]:{} proto {} -> [{:i}]:{} (frontend {})",
        key.addr,
        key.port,
        key.proto,
        to.addr,
        to.port,
        svc_id
    );
}

/// Reverse translation, IPv6.
#[inline(always)]
pub fn rev6(ctx: &SockAddrContext) {
    // SAFETY: the kernel's bpf_sock_addr of this call, valid while the program runs.
    let sa = unsafe { &mut *ctx.sock_addr };
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let key = SockRevNat6Key {
        // SAFETY: the helper reads the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: ip6_bytes(&words),
        port: port_from_ctx(sa.user_port),
        _pad: [0; 6],
    };
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    if let Some(frontend) = unsafe { SOCK6_REVNAT.get(&key) } {
        let w = ip6_words(&frontend.addr);
        sa.user_ip6[0] = w[0];
        sa.user_ip6[1] = w[1];
        sa.user_ip6[2] = w[2];
        sa.user_ip6[3] = w[3];
        sa.user_port = port_to_ctx(frontend.port);
        stats::count(Reason::RevTranslated);
    }
}
