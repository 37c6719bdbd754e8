//! Socket-layer translation: connect/sendmsg rewrite a Service address to a backend once per
//! connection (or datagram); recvmsg/getpeername show the Service address back.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    affinity::{AffinityKey, CLIENT_NETNS},
    backend::{FAMILY_V4, FAMILY_V6},
    proto,
    reason::Reason,
    revnat::{SockRevNat4Key, SockRevNat4Value, SockRevNat6Key, SockRevNat6Value},
    service::{FLAG_LEAST_CONN, SCOPE_INTERNAL, Service4Key, Service6Key, ServiceValue},
};

use aya_log_ebpf::info;

use crate::{
    conns, debug,
    lb::{self, Choice},
    maps::{LB4_SERVICES, LB6_SERVICES, SOCK4_REVNAT, SOCK6_REVNAT},
    packet::{ip6_bytes, ip6_words},
    stats,
};

const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

/// Turns the outcome of a forward translation into the program's return value, in one place.
///
/// Only the Service's own rules fail the syscall: no backends rejects with ECONNREFUSED
/// (kube-proxy's REJECT, semantics 3.7), a policy drop fails with EPERM (semantics 3.8: the
/// socket layer cannot silently lose a connect, so it fails fast instead of hanging). Every other
/// reason leaves the socket as the application wrote it.
#[inline(always)]
pub fn verdict(ctx: &SockAddrContext, outcome: Result<Reason, Reason>) -> i32 {
    let reason = match outcome {
        Ok(reason) | Err(reason) => reason,
    };
    stats::count(reason);
    let errno = match reason {
        Reason::NoBackends => ECONNREFUSED,
        Reason::NoLocalBackends => EPERM,
        _ => return 1,
    };
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
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    lb::finish(lb::mix(cookie as u32, (cookie >> 32) as u32))
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
#[inline(always)]
fn lookup4(key: &Service4Key) -> Result<ServiceValue, Reason> {
    if let Some(svc) = unsafe { LB4_SERVICES.get(key) } {
        return Ok(*svc);
    }
    let any_port = Service4Key {
        port: 0,
        proto: 0,
        ..*key
    };
    match unsafe { LB4_SERVICES.get(&any_port) } {
        Some(_) => Err(Reason::NoBackends),
        None => Err(Reason::NotService),
    }
}

#[inline(always)]
fn lookup6(key: &Service6Key) -> Result<ServiceValue, Reason> {
    if let Some(svc) = unsafe { LB6_SERVICES.get(key) } {
        return Ok(*svc);
    }
    let any_port = Service6Key {
        port: 0,
        proto: 0,
        ..*key
    };
    match unsafe { LB6_SERVICES.get(&any_port) } {
        Some(_) => Err(Reason::NoBackends),
        None => Err(Reason::NotService),
    }
}

/// Forward translation, IPv4. Ok(reason) when the socket was translated or is not ours.
#[inline(always)]
pub fn fwd4(ctx: &SockAddrContext) -> Result<Reason, Reason> {
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = Service4Key {
        addr: sa.user_ip4.to_ne_bytes(),
        port: port_from_ctx(sa.user_port),
        proto: sa.protocol as u8,
        scope: SCOPE_INTERNAL,
    };
    let svc = lookup4(&key)?;
    let Choice {
        backend,
        reason,
        backend_id,
    } = lb::select::<true>(&svc, &client_of(ctx, svc.port_id), socket_hash(ctx), 0)?;
    if svc.has_flag(FLAG_LEAST_CONN) && key.proto == proto::TCP {
        conns::count(ctx, backend_id);
    }
    let backend_addr = backend.addr4();
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
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = SockRevNat4Key {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: sa.user_ip4.to_ne_bytes(),
        port: port_from_ctx(sa.user_port),
        _pad: 0,
    };
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
pub fn fwd6(ctx: &SockAddrContext) -> Result<Reason, Reason> {
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
    let svc = if mapped {
        lookup4(&Service4Key {
            addr: [key.addr[12], key.addr[13], key.addr[14], key.addr[15]],
            port: key.port,
            proto: key.proto,
            scope: key.scope,
        })?
    } else {
        lookup6(&key)?
    };
    let Choice {
        backend,
        reason,
        backend_id,
    } = lb::select::<true>(&svc, &client_of(ctx, svc.port_id), socket_hash(ctx), 0)?;
    if svc.has_flag(FLAG_LEAST_CONN) && key.proto == proto::TCP {
        conns::count(ctx, backend_id);
    }
    let mut backend_addr = backend.addr;
    if mapped {
        backend_addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
        backend_addr[12] = backend.addr[0];
        backend_addr[13] = backend.addr[1];
        backend_addr[14] = backend.addr[2];
        backend_addr[15] = backend.addr[3];
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevNat6Key {
        cookie,
        addr: backend_addr,
        port: backend.port,
        _pad: [0; 6],
    };
    let rev_value = SockRevNat6Value {
        addr: key.addr,
        port: key.port,
        _pad: 0,
        svc_id: svc.id,
    };
    // A new record is counted, so the agent can tell evictions (records gone although
    // nothing deleted them) from a map that merely holds many sockets.
    match SOCK6_REVNAT.insert(&rev_key, &rev_value, BPF_NOEXIST as u64) {
        Ok(()) => stats::count(Reason::RevNatNew6),
        Err(_) => SOCK6_REVNAT
            .insert(&rev_key, &rev_value, 0)
            .map_err(|_| Reason::RevNatFailed)?,
    }
    conns::remember(ctx, FAMILY_V6, &backend_addr, backend.port);
    let w = ip6_words(&backend_addr);
    sa.user_ip6[0] = w[0];
    sa.user_ip6[1] = w[1];
    sa.user_ip6[2] = w[2];
    sa.user_ip6[3] = w[3];
    sa.user_port = port_to_ctx(backend.port);
    if debug::enabled() {
        info!(
            ctx,
            "kbp: [{:i}]:{} proto {} -> [{:i}]:{} (frontend {})",
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

/// Reverse translation, IPv6.
#[inline(always)]
pub fn rev6(ctx: &SockAddrContext) {
    let sa = unsafe { &mut *ctx.sock_addr };
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let key = SockRevNat6Key {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: ip6_bytes(&words),
        port: port_from_ctx(sa.user_port),
        _pad: [0; 6],
    };
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
