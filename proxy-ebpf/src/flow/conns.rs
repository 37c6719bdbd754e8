//! Active-connection counts for least-connection scheduling. A TCP socket connected through a
//! least-connection frontend is counted against its backend at connect(), and its socket-local
//! storage remembers which; when the kernel releases the socket (closed, or its process killed),
//! the count is given back. Counts change only by atomic adds of +1 and -1, and -1 only where
//! the socket's storage proves a +1, so they never go below zero and return to exactly zero.

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xchg};

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::{bpf_get_socket_cookie, generated::bpf_sk_storage_get},
    programs::{SockAddrContext, SockContext, XdpContext},
};
use proxy_common::{
    backend::SockConn,
    ct::{Ct4Key, Ct6Key},
    proto::{ETH_P_IP, ETH_P_IPV6},
};

use super::records;
use crate::{
    access::{
        maps::{LB_CONNS, LB_CT4, LB_CT6, LB_SOCK},
        xdp,
    },
    headers::{
        AF_INET, AF_INET6, ETH_HLEN,
        family::{V4, V6},
        ip6_bytes,
    },
};

/// Adds `delta` (wrapping: u64::MAX is -1) to backend `id`'s count.
#[inline(always)]
fn add(id: u32, delta: u64) {
    if let Some(count) = LB_CONNS.get_ptr_mut(id) {
        // SAFETY: a valid, aligned u64 in the array; the add is one atomic instruction (its
        // old value unused, so it needs no BPF_FETCH).
        let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, delta) };
    }
}

/// Counts a new connection-tracked flow against backend `id` (before its entry exists, so
/// a count is never given back before it was taken).
#[inline(always)]
pub fn take(id: u32) {
    add(id, 1);
}

/// Undoes `take` for a flow whose entry could not be written.
#[inline(always)]
pub fn untake(id: u32) {
    add(id, u64::MAX);
}

/// Gives back the count a conntrack entry holds: whoever swaps `counted` from non-zero to 0
/// (one atomic exchange) gives it back, so a count is given back exactly once however the
/// close, the replacement and the agent's expiry race.
///
/// # Safety
/// `counted` must point into a live conntrack entry (from a lookup).
#[inline(always)]
pub unsafe fn give_back(counted: *mut u64, id: u32) -> bool {
    // SAFETY: the caller's pointer; 64-bit exchange (32-bit ones need ALU32).
    let was = unsafe { atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(counted, 0) };
    if was != 0 {
        add(id, u64::MAX);
    }
    was != 0
}

/// Active connections of backend `id`.
#[inline(always)]
pub fn of(id: u32) -> u64 {
    LB_CONNS.get(id).copied().unwrap_or(0)
}

/// Counts the connecting socket against backend `id` (moving the count if it was counted
/// against another one).
#[inline(always)]
pub fn count(ctx: &SockAddrContext, id: u32) {
    let conn = storage(ctx);
    if conn.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket; only this socket's hooks touch it.
    let conn = unsafe { &mut *conn };
    if conn.counted != 0 {
        add(conn.backend_id, u64::MAX);
    }
    conn.backend_id = id;
    conn.counted = 1;
    add(id, 1);
}

/// The socket-local storage of the connecting socket, created empty if it has none.
#[inline(always)]
fn storage(ctx: &SockAddrContext) -> *mut SockConn {
    let mut fresh = SockConn {
        backend_id: 0,
        counted: 0,
        rev_addr: [0; 16],
        rev_port: 0,
        rev_family: 0,
        _pad: 0,
    };
    // SAFETY: the context's own socket.
    unsafe { LB_SOCK.get_or_insert_ptr_mut(ctx, Some(&mut fresh)) }
}

/// Remembers the key of the socket record just written (`family`, backend address and port),
/// so the record is deleted when the socket is released. A socket that sends to several
/// Services (unconnected UDP) has several records; the older ones age out of the LRU map.
#[inline(always)]
pub fn remember(ctx: &SockAddrContext, family: u8, addr: &[u8; 16], port: u16) {
    let conn = storage(ctx);
    if conn.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket; only this socket's hooks touch it.
    let conn = unsafe { &mut *conn };
    conn.rev_addr = *addr;
    conn.rev_port = port;
    conn.rev_family = family;
}

/// Gives a released socket's count back and deletes its socket records: the one its storage
/// remembers (its latest datagram's, `remember`), and a connected socket's, keyed by the
/// destination the socket is connected to (the backend connect() gave it).
#[inline(always)]
pub fn release(ctx: &SockContext) {
    // SAFETY: plain helper call on the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: lookup only (no create) on the context's socket.
    let conn = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&LB_SOCK).cast_mut().cast(),
            ctx.sock.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockConn>();
    if !conn.is_null() {
        // SAFETY: non-null storage of this socket.
        let conn = unsafe { &mut *conn };
        if conn.counted != 0 {
            conn.counted = 0;
            add(conn.backend_id, u64::MAX);
        }
        if conn.rev_family != 0 {
            records::forget(cookie, conn.rev_family, &conn.rev_addr, conn.rev_port);
            conn.rev_family = 0;
        }
    }
    // SAFETY: the program's own socket, valid while it runs; fields read one at a time, as
    // the context allows.
    let (family, port, v4, v6) = unsafe {
        let sk = &*ctx.sock;
        (sk.family, sk.dst_port, sk.dst_ip4, sk.dst_ip6)
    };
    if port == 0 {
        return;
    }
    let port = u16::from_be(port as u16);
    match family as u8 {
        AF_INET => records::forget_in::<V4>(cookie, &v4.to_ne_bytes(), port),
        AF_INET6 => records::forget_in::<V6>(cookie, &ip6_bytes(&v6), port),
        _ => {}
    }
}

/// The agent's release of a flow it expires (`conn_release`, run through BPF_PROG_TEST_RUN):
/// the frame is an Ethernet header whose type names the family, then the forward entry's key
/// (`Ct4Key` or `Ct6Key`). `XDP_PASS` when a count was given back, `XDP_DROP` when the entry
/// held none or is gone. Going through the datapath's own exchange keeps the agent's give-back
/// exactly-once against a close racing with it.
#[inline(always)]
pub fn release_flow(ctx: &XdpContext) -> u32 {
    let released = match xdp::read::<[u8; 2]>(ctx, 12).map(u16::from_be_bytes) {
        Some(ETH_P_IP) => xdp::read::<Ct4Key>(ctx, ETH_HLEN)
            .and_then(|key| LB_CT4.get_ptr_mut(&key))
            // SAFETY: from the lookup.
            .is_some_and(|v| unsafe { give_back(&raw mut (*v).counted, (*v).backend_id) }),
        Some(ETH_P_IPV6) => xdp::read::<Ct6Key>(ctx, ETH_HLEN)
            .and_then(|key| LB_CT6.get_ptr_mut(&key))
            // SAFETY: from the lookup.
            .is_some_and(|v| unsafe { give_back(&raw mut (*v).counted, (*v).backend_id) }),
        _ => false,
    };
    if released { XDP_PASS } else { XDP_DROP }
}
