//! Active-connection counts for least-connection scheduling. A TCP socket connected through a
//! least-connection frontend is counted against its backend at connect(), and its socket-local
//! storage remembers which; when the kernel releases the socket (closed, or its process killed),
//! the count is given back. Counts change only by atomic adds of +1 and -1, and -1 only where
//! the socket's storage proves a +1, so they never go below zero and return to exactly zero.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::generated::bpf_sk_storage_get,
    programs::{SockAddrContext, SockContext},
};
use proxy_common::backend::SockConn;

use crate::maps::{LB_CONNS, LB_SOCK};

/// Adds `delta` (wrapping: u64::MAX is -1) to backend `id`'s count.
#[inline(always)]
fn add(id: u32, delta: u64) {
    if let Some(count) = LB_CONNS.get_ptr_mut(id) {
        // SAFETY: a valid, aligned u64 in the array; the add is one atomic instruction (its
        // old value unused, so it needs no BPF_FETCH).
        let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, delta) };
    }
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
    let mut fresh = SockConn {
        backend_id: 0,
        counted: 0,
    };
    // SAFETY: the context's own socket.
    let conn = unsafe { LB_SOCK.get_or_insert_ptr_mut(ctx, Some(&mut fresh)) };
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

/// Gives the released socket's count back.
#[inline(always)]
pub fn release(ctx: &SockContext) {
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
    if conn.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket.
    let conn = unsafe { &mut *conn };
    if conn.counted != 0 {
        conn.counted = 0;
        add(conn.backend_id, u64::MAX);
    }
}
