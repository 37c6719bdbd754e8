//! Connection tracking of the tc and XDP paths: one entry per direction of a translated flow
//! (the forward entry says where the client's packets go, the reply entry how the backend's
//! come back), written and read through `Tracked`, one implementation per family over
//! `LB_CT4`/`LB_CT6`.

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{
    ct::{
        CT_ANSWERED_SHIFT, CT_FIN, CT_REPLY, CT_RST, CT_SNAT, CT_TRACKS_ANSWER, Ct4Key, Ct4Value,
        Ct6Key, Ct6Value, CtKey, CtValue,
    },
    proto,
    service::MemberKey,
};

use crate::{
    access::maps::{CT_KEY_SCRATCH, CT_KEY_SCRATCH_WORDS, LB_CT4, LB_CT6, LB_MEMBERS},
    flow::conns,
    headers::{
        Packet, TCP_FIN, TCP_RST, Tuple,
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

/// The connection-tracking map of a family: its lookup and insert; what is read and written
/// through them is the same for both families.
pub trait Tracked: Ip {
    fn ct_get(k: &CtKey<Self::Addr>) -> Option<*mut CtValue<Self::Addr>>;

    fn ct_put(k: &CtKey<Self::Addr>, v: &CtValue<Self::Addr>, map_flags: u64) -> Result<(), i64>;

    fn ct_del(k: &CtKey<Self::Addr>);

    #[inline(always)]
    fn ct_lookup(t: &Tuple<Self::Addr>) -> Option<*mut CtValue<Self::Addr>> {
        Self::ct_get(&ct_key(t))
    }

    /// # Safety
    /// `v` must come from `ct_lookup` during this program run.
    #[inline(always)]
    unsafe fn ct_read(v: *mut CtValue<Self::Addr>) -> Entry<Self::Addr> {
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

    /// Refreshes the entry's timestamp and adds `flags`; a reply entry is marked answered
    /// (`CT_ANSWERED`, from its `CT_REPLY` bit).
    /// # Safety
    /// `v` must come from `ct_lookup` during this program run.
    #[inline(always)]
    unsafe fn ct_touch(v: *mut CtValue<Self::Addr>, now: u64, flags: u32) {
        // SAFETY: the caller's contract: `v` came from a lookup in this run.
        unsafe {
            (*v).last_seen_ns = now;
            let old = (*v).flags;
            let new = old | flags | ((old & CT_REPLY) << CT_ANSWERED_SHIFT);
            // Written only when it changes (a reply entry's first packet, a FIN, a RST): a
            // write of a value read before another CPU's mark would undo that mark.
            if new != old {
                (*v).flags = new;
            }
        }
    }

    #[inline(always)]
    fn ct_insert(
        t: &Tuple<Self::Addr>,
        e: &Entry<Self::Addr>,
        now: u64,
        map_flags: u64,
        counted: u64,
    ) -> Result<(), i64> {
        let value = ct_value(e, now, counted);
        let key = ct_key(t);
        if counted != 0 {
            // A counted forward entry is written as new. If another CPU recorded the same flow
            // since this packet found none (a SYN and its retransmission on two CPUs), that
            // entry's count is given back before it is replaced: the flow holds one count.
            if Self::ct_put(&key, &value, BPF_NOEXIST as u64).is_ok() {
                return Ok(());
            }
            if let Some(old) = Self::ct_get(&key) {
                // SAFETY: from the lookup just above.
                unsafe { Self::ct_give_back(old) };
            }
        }
        Self::ct_put(&key, &value, map_flags)
    }

    /// Gives back the active-connection count the entry holds, if it still holds one.
    /// # Safety
    /// `v` must come from `ct_lookup` during this program run.
    #[inline(always)]
    unsafe fn ct_give_back(v: *mut CtValue<Self::Addr>) {
        // SAFETY: the caller's pointer from a lookup.
        unsafe { conns::give_back(&raw mut (*v).counted, (*v).backend_id) };
    }
}

/// The conntrack value of entry `e` last seen at `now`, holding a least-connection count when
/// `counted`.
#[inline(always)]
pub fn ct_value<A: Copy>(e: &Entry<A>, now: u64, counted: u64) -> CtValue<A> {
    CtValue {
        saddr: e.to.saddr,
        daddr: e.to.daddr,
        sport: e.to.sport,
        dport: e.to.dport,
        flags: e.flags | CT_TRACKS_ANSWER,
        svc_id: e.svc_id,
        backend_id: e.backend_id,
        last_seen_ns: now,
        counted,
    }
}

/// The conntrack key of tuple `t`.
#[inline(always)]
pub fn ct_key<A: Copy>(t: &Tuple<A>) -> CtKey<A> {
    let mut k = core::mem::MaybeUninit::<CtKey<A>>::uninit();
    let k_ptr = k.as_mut_ptr();
    // SAFETY: every field written through the pointer before `assume_init`: the protocol and
    // its three padding bytes as one 32-bit store (`proto` is followed by `_pad: [u8; 3]`, so
    // the four bytes are the key's; zeroing the padding alone compiles to a `memset` call).
    unsafe {
        (&raw mut (*k_ptr).saddr).write(t.saddr);
        (&raw mut (*k_ptr).daddr).write(t.daddr);
        (&raw mut (*k_ptr).sport).write(t.sport);
        (&raw mut (*k_ptr).dport).write(t.dport);
        (&raw mut (*k_ptr).proto)
            .cast::<[u8; 4]>()
            .write_unaligned([t.proto, 0, 0, 0]);
        k.assume_init()
    }
}

impl Tracked for V4 {
    #[inline(always)]
    fn ct_get(k: &Ct4Key) -> Option<*mut Ct4Value> {
        LB_CT4.get_ptr_mut(k)
    }

    #[inline(always)]
    fn ct_put(k: &Ct4Key, v: &Ct4Value, map_flags: u64) -> Result<(), i64> {
        LB_CT4.insert(k, v, map_flags).map_err(i64::from)
    }

    #[inline(always)]
    fn ct_del(k: &Ct4Key) {
        // A missing entry (already collected) is not an error.
        let _ = LB_CT4.remove(k);
    }
}

impl Tracked for V6 {
    #[inline(always)]
    fn ct_get(k: &Ct6Key) -> Option<*mut Ct6Value> {
        LB_CT6.get_ptr_mut(k)
    }

    #[inline(always)]
    fn ct_put(k: &Ct6Key, v: &Ct6Value, map_flags: u64) -> Result<(), i64> {
        LB_CT6.insert(k, v, map_flags).map_err(i64::from)
    }

    #[inline(always)]
    fn ct_del(k: &Ct6Key) {
        // A missing entry (already collected) is not an error.
        let _ = LB_CT6.remove(k);
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
/// tuple of a closed one, or when its backend is no longer a member of the frontend (no longer
/// a serving endpoint of the port; a member without slots still keeps its flows): a UDP flow
/// is then balanced afresh at its next datagram (kube-proxy deletes such conntrack entries,
/// semantics 9.2, 9.3), while an established TCP connection keeps its backend.
#[inline(always)]
fn stale<A>(e: &Entry<A>, pkt: &Packet<A>) -> bool {
    let syn = pkt.syn();
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
    ptr: *mut CtValue<F::Addr>,
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

/// Whether the masqueraded flow whose reply entry is keyed by `reply` (a new flow's reply key,
/// with the port it tries) is closed, so that a new TCP connection may take its port over; if
/// so, its forward entry is deleted (giving back any least-connection count) and the caller
/// overwrites the reply entry. Closed: a reset either way, or a FIN both ways, the states in
/// which netfilter's NAT lets a new SYN reuse a tuple (`nf_nat_used_tuple_harder`, Linux 6.4)
/// instead of holding the port for the closing time. A reply entry whose forward entry now
/// points elsewhere (its client reused the tuple for a new flow) belongs to no flow and is
/// taken over as well; one without a forward entry is not (a flow being recorded on another
/// CPU writes its reply entry first). Out of line: it keeps its values out of the port
/// claim's frame.
#[inline(never)]
pub fn take_over_closed<F: Tracked>(reply: &CtKey<F::Addr>) -> bool {
    close_reply::<F>(reply, CT_SNAT) != HELD
}

/// A new TCP connection's first packet `t` that tc found no flow of: a reply entry keyed by
/// `t` reversed belongs to an earlier flow that was translated *to* `t` (a pod's connection to
/// a ClusterIP, translated per packet, from the port the pod now connects from straight to
/// that backend, as it does once its socket layer translates again). The new connection's
/// replies would be translated back to the old flow's frontend and never reach their socket.
/// The entry is deleted when its flow is closed (as `take_over_closed` decides; the forward
/// entry goes with it) or its forward entry translates elsewhere now; an open flow keeps it
/// (its replies cannot be told from the new connection's, nor at the backend), and so does one
/// whose forward entry is gone (evicted, or a flow being recorded on another CPU: the same
/// window `take_over_closed` leaves). Out of line: `handle`'s frame is near the limit.
#[inline(never)]
pub fn forget_closed_reply<F: Tracked>(t: &Tuple<F::Addr>) {
    // The reply key in the first half of the scratch space (`close_reply` uses the second).
    let Some(reply) = CT_KEY_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU value holds two keys (asserted at `close_reply`), 8-byte aligned,
    // and is this program's alone while it runs (programs do not nest on a CPU at tc and XDP).
    let reply = unsafe { &mut *reply.cast::<CtKey<F::Addr>>() };
    *reply = ct_key(&t.reversed());
    if close_reply::<F>(reply, 0) == TAKEN {
        F::ct_del(reply);
    }
}

/// `close_reply`: no reply entry at the key.
const FREE: u8 = 0;
/// `close_reply`: the reply entry's flow is closed (its forward entry deleted) or gone.
const TAKEN: u8 = 1;
/// `close_reply`: the reply entry is another's, or its flow is open.
const HELD: u8 = 2;

/// Whether the reply entry keyed by `reply` may be taken over (`take_over_closed`): `FREE`,
/// `TAKEN` (a closed flow's forward entry is deleted here) or `HELD`. `need`: flags the reply
/// entry must carry besides `CT_REPLY`. `reply` may be map memory (per-CPU scratch space): the
/// forward key is built in the second half of `CT_KEY_SCRATCH`.
#[inline(always)]
fn close_reply<F: Tracked>(reply: &CtKey<F::Addr>, need: u32) -> u8 {
    const { assert!(2 * core::mem::size_of::<CtKey<F::Addr>>() <= CT_KEY_SCRATCH_WORDS * 8) };
    let Some(r) = F::ct_get(reply) else {
        // Collected since the insert failed: free now.
        return FREE;
    };
    // SAFETY: from the lookup just above; read at once.
    let r = unsafe { &*r };
    let reply_flags = r.flags;
    if reply_flags & (CT_REPLY | need) != CT_REPLY | need {
        return HELD;
    }
    let Some(key) = CT_KEY_SCRATCH.get_ptr_mut(0) else {
        return HELD;
    };
    // SAFETY: the second key of the per-CPU value (two fit, asserted above), 8-byte aligned
    // (a key's size is a multiple of 4 and its fields are at most 4-byte aligned), and this
    // program's alone while it runs.
    let key = unsafe { &mut *key.cast::<CtKey<F::Addr>>().add(1) };
    // The forward entry is keyed by the client's tuple, which the reply entry translates to
    // reversed.
    // SAFETY: addresses of a map value and of the scratch key, both 4-byte aligned.
    unsafe {
        copy_addr(&mut key.saddr, &r.daddr);
        copy_addr(&mut key.daddr, &r.saddr);
    }
    key.sport = r.dport;
    key.dport = r.sport;
    // The protocol and its padding as one 32-bit store (see `ct_key`), in memory order
    // whatever the byte order.
    // SAFETY: `proto` and `_pad` are the four bytes at a 4-byte aligned offset.
    unsafe {
        (&raw mut key.proto)
            .cast::<u32>()
            .write(u32::from_ne_bytes([reply.proto, 0, 0, 0]))
    };
    let Some(f) = F::ct_get(key) else {
        return HELD;
    };
    // SAFETY: from the lookup just above.
    let fv = unsafe { &*f };
    // Ours: the forward entry translates to the tuple the reply key is of, reversed.
    let ours = fv.flags & CT_REPLY == 0
        && fv.sport == reply.dport
        && fv.dport == reply.sport
        && fv.saddr == reply.daddr
        && fv.daddr == reply.saddr;
    if ours {
        let closed = (reply_flags | fv.flags) & CT_RST != 0
            || (reply_flags & CT_FIN != 0 && fv.flags & CT_FIN != 0);
        if !closed {
            return HELD;
        }
        // SAFETY: from the lookup above.
        unsafe { F::ct_give_back(f) };
        F::ct_del(key);
    }
    TAKEN
}

/// Copies an address word by word: an assignment between two pointers the compiler cannot
/// tell apart (map memory) compiles to a call of the byte-wise `memmove`.
/// # Safety
/// Both pointers valid and 4-byte aligned; the address's size a multiple of 4.
#[inline(always)]
unsafe fn copy_addr<A>(dst: *mut A, src: *const A) {
    const { assert!(core::mem::size_of::<A>() % 4 == 0) };
    let (d, s) = (dst.cast::<u32>(), src.cast::<u32>());
    for i in 0..core::mem::size_of::<A>() / 4 {
        // SAFETY: the caller's contract; `i` stays inside the address.
        unsafe { d.add(i).write(s.add(i).read()) };
    }
}
