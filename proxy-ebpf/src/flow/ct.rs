//! Connection tracking of the tc and XDP paths: one entry per direction of a translated flow
//! (the forward entry says where the client's packets go, the reply entry how the backend's
//! come back), written and read through `Tracked`, one implementation per family over
//! `LB_CT4`/`LB_CT6`.

use proxy_common::{
    ct::{CT_FIN, CT_REPLY, CT_RST, Ct4Key, Ct4Value, Ct6Key, Ct6Value},
    proto,
    service::MemberKey,
};

use crate::{
    access::maps::{LB_CT4, LB_CT6, LB_MEMBERS},
    flow::conns,
    headers::{
        Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple,
        family::{Ip, V4, V6},
    },
};

/// A connection-tracking entry, independent of the family.
#[derive(Copy, Clone)]
pub struct Entry<A> {
    pub to: Tuple<A>,
    pub flags: u32,
    pub svc_id: u32,
    pub backend_id: u32,
}

/// The connection-tracking map of a family.
pub trait Tracked: Ip {
    type CtValue;

    fn ct_lookup(t: &Tuple<Self::Addr>) -> Option<*mut Self::CtValue>;

    /// # Safety
    /// `v` must come from `ct_lookup`.
    unsafe fn ct_read(v: *mut Self::CtValue) -> Entry<Self::Addr>;

    /// Refreshes the entry's timestamp and adds `flags`.
    /// # Safety
    /// `v` must come from `ct_lookup`.
    unsafe fn ct_touch(v: *mut Self::CtValue, now: u64, flags: u32);

    fn ct_insert(
        t: &Tuple<Self::Addr>,
        e: &Entry<Self::Addr>,
        now: u64,
        map_flags: u64,
        counted: u64,
    ) -> Result<(), i64>;

    /// Gives back the active-connection count the entry holds, if it still holds one.
    /// # Safety
    /// `v` must come from `ct_lookup`.
    unsafe fn ct_give_back(v: *mut Self::CtValue);
}

impl Tracked for V4 {
    type CtValue = Ct4Value;

    #[inline(always)]
    fn ct_lookup(t: &Tuple<[u8; 4]>) -> Option<*mut Ct4Value> {
        LB_CT4.get_ptr_mut(ct4_key(t))
    }

    /// # Safety
    /// `v` must come from a lookup in the connection-tracking map during this program run.
    #[inline(always)]
    unsafe fn ct_read(v: *mut Ct4Value) -> Entry<[u8; 4]> {
        // SAFETY: the caller's contract: `v` came from a lookup in this run.
        let v = unsafe { &*v };
        Entry {
            to: Tuple {
                saddr: v.saddr,
                daddr: v.daddr,
                sport: v.sport,
                dport: v.dport,
                proto: 0,
            },
            flags: v.flags,
            svc_id: v.svc_id,
            backend_id: v.backend_id,
        }
    }

    /// # Safety
    /// `v` must come from a lookup in the connection-tracking map during this program run.
    #[inline(always)]
    unsafe fn ct_touch(v: *mut Ct4Value, now: u64, flags: u32) {
        // SAFETY: the caller's contract: `v` came from a lookup in this run.
        unsafe {
            (*v).last_seen_ns = now;
            if flags != 0 {
                (*v).flags |= flags;
            }
        }
    }

    /// # Safety
    /// `v` must come from a lookup in the connection-tracking map during this program run.
    #[inline(always)]
    unsafe fn ct_give_back(v: *mut Ct4Value) {
        // SAFETY: the caller's pointer from a lookup.
        unsafe { conns::give_back(&raw mut (*v).counted, (*v).backend_id) };
    }

    #[inline(always)]
    fn ct_insert(
        t: &Tuple<[u8; 4]>,
        e: &Entry<[u8; 4]>,
        now: u64,
        map_flags: u64,
        counted: u64,
    ) -> Result<(), i64> {
        let value = Ct4Value {
            saddr: e.to.saddr,
            daddr: e.to.daddr,
            sport: e.to.sport,
            dport: e.to.dport,
            flags: e.flags,
            svc_id: e.svc_id,
            backend_id: e.backend_id,
            last_seen_ns: now,
            counted,
        };
        LB_CT4
            .insert(ct4_key(t), value, map_flags)
            .map_err(i64::from)
    }
}

#[inline(always)]
fn ct4_key(t: &Tuple<[u8; 4]>) -> Ct4Key {
    Ct4Key {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn ct6_key(t: &Tuple<[u8; 16]>) -> Ct6Key {
    Ct6Key {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        _pad: [0; 3],
    }
}

impl Tracked for V6 {
    type CtValue = Ct6Value;

    #[inline(always)]
    fn ct_lookup(t: &Tuple<[u8; 16]>) -> Option<*mut Ct6Value> {
        LB_CT6.get_ptr_mut(ct6_key(t))
    }

    /// # Safety
    /// `v` must come from a lookup in the connection-tracking map during this program run.
    #[inline(always)]
    unsafe fn ct_read(v: *mut Ct6Value) -> Entry<[u8; 16]> {
        // SAFETY: the caller's contract: `v` came from a lookup in this run.
        let v = unsafe { &*v };
        Entry {
            to: Tuple {
                saddr: v.saddr,
                daddr: v.daddr,
                sport: v.sport,
                dport: v.dport,
                proto: 0,
            },
            flags: v.flags,
            svc_id: v.svc_id,
            backend_id: v.backend_id,
        }
    }

    /// # Safety
    /// `v` must come from a lookup in the connection-tracking map during this program run.
    #[inline(always)]
    unsafe fn ct_touch(v: *mut Ct6Value, now: u64, flags: u32) {
        // SAFETY: the caller's contract: `v` came from a lookup in this run.
        unsafe {
            (*v).last_seen_ns = now;
            if flags != 0 {
                (*v).flags |= flags;
            }
        }
    }

    /// # Safety
    /// `v` must come from a lookup in the connection-tracking map during this program run.
    #[inline(always)]
    unsafe fn ct_give_back(v: *mut Ct6Value) {
        // SAFETY: the caller's pointer from a lookup.
        unsafe { conns::give_back(&raw mut (*v).counted, (*v).backend_id) };
    }

    #[inline(always)]
    fn ct_insert(
        t: &Tuple<[u8; 16]>,
        e: &Entry<[u8; 16]>,
        now: u64,
        map_flags: u64,
        counted: u64,
    ) -> Result<(), i64> {
        let value = Ct6Value {
            saddr: e.to.saddr,
            daddr: e.to.daddr,
            sport: e.to.sport,
            dport: e.to.dport,
            flags: e.flags,
            svc_id: e.svc_id,
            backend_id: e.backend_id,
            last_seen_ns: now,
            counted,
        };
        LB_CT6
            .insert(ct6_key(t), value, map_flags)
            .map_err(i64::from)
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

/// Whether a packet of a tracked flow goes on with its entry `e` (at `ptr`); false when the
/// entry is stale and a new flow starts. A closing or replaced flow gives its least-connection
/// count back: a FIN or RST either way ends it as an active connection, as IPVS counts them.
#[inline(always)]
pub fn keeps_entry<F: Tracked>(
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
fn give_back_forward<F: Tracked>(to: &Tuple<F::Addr>) {
    if let Some(ptr) = F::ct_lookup(&to.reversed()) {
        // SAFETY: from the lookup.
        unsafe { F::ct_give_back(ptr) };
    }
}
