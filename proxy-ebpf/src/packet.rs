//! Packets at tc, per IP family: parsing the tuple, rewriting addresses and ports with their
//! checksums, routing through the FIB, and the family's maps. `nodeport` is written once over
//! the `Family` trait; this file holds everything that differs between IPv4 and IPv6.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC,
        bpf_fib_lookup,
    },
    helpers::generated::{bpf_csum_diff, bpf_fib_lookup as fib_lookup},
    programs::TcContext,
};
use proxy_common::{
    backend::BackendValue,
    ct::{Ct4Key, Ct4Value, Ct6Key, Ct6Value},
    proto,
    reason::Reason,
    service::{SCOPE_EXTERNAL, Service4Key, Service6Key, ServiceValue, SrcRange4, SrcRange6},
};

use crate::maps::{LB_CT4, LB_CT6, LB4_SERVICES, LB4_SRC_RANGES, LB6_SERVICES, LB6_SRC_RANGES};
use crate::{conns, lb};
use aya_ebpf::btf_maps::lpm_trie::Key as LpmKey;

pub const ETH_HLEN: usize = 14;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A flow's addresses and ports (host order) and protocol.
#[derive(Copy, Clone)]
pub struct Tuple<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl<A: Copy> Tuple<A> {
    /// The tuple of packets going the other way.
    #[inline(always)]
    pub fn reversed(&self) -> Tuple<A> {
        Tuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// A parsed TCP or UDP packet.
pub struct Packet<A> {
    pub t: Tuple<A>,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

impl<A> Packet<A> {
    /// Offset of the layer-4 checksum and the flags its updates need (a zero UDP checksum
    /// means "none" in IPv4 and must stay zero).
    #[inline(always)]
    fn csum(&self) -> Option<(usize, u64)> {
        match self.t.proto {
            proto::TCP => Some((self.l4 + 16, 0)),
            proto::UDP => Some((self.l4 + 6, BPF_F_MARK_MANGLED_0 as u64)),
            _ => None,
        }
    }
}

/// A connection-tracking entry, independent of the family.
#[derive(Copy, Clone)]
pub struct Entry<A> {
    pub to: Tuple<A>,
    pub flags: u32,
    pub svc_id: u32,
    pub backend_id: u32,
}

/// Where the FIB sends a packet.
pub struct Route<A> {
    pub ifindex: u32,
    /// The source address the node would use on that route (for masquerading).
    pub src: A,
}

pub trait Family {
    type Addr: Copy + PartialEq;
    type CtValue;

    fn parse(ctx: &TcContext) -> Result<Packet<Self::Addr>, Option<Reason>>;
    fn frontend(t: &Tuple<Self::Addr>) -> Option<ServiceValue>;
    fn source_allowed(svc_id: u32, saddr: &Self::Addr) -> bool;
    fn backend_addr(b: &BackendValue) -> Self::Addr;
    /// The address as affinity-key bytes.
    fn client_bytes(a: &Self::Addr) -> [u8; 16];

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

    /// Rewrites one address at `off` (source or destination) with its checksums.
    fn set_addr(
        ctx: &TcContext,
        pkt: &Packet<Self::Addr>,
        off: usize,
        old: &Self::Addr,
        new: &Self::Addr,
    ) -> Result<(), i64>;
    /// Offsets of the source and destination address in the IP header.
    const SADDR_OFF: usize;
    const DADDR_OFF: usize;
    const AF: u8;
    fn fib_addrs(p: &mut bpf_fib_lookup, t: &Tuple<Self::Addr>);
    fn fib_src(p: &bpf_fib_lookup) -> Self::Addr;
    /// The flow's hash (addresses, ports, protocol), the same on every node.
    fn hash(t: &Tuple<Self::Addr>) -> u32;
    /// The address, if IPv4.
    fn v4(a: &Self::Addr) -> Option<[u8; 4]>;
}

/// Hash of the ports and protocol, mixed into `h`.
#[inline(always)]
fn hash_ports<A>(h: u32, t: &Tuple<A>) -> u32 {
    let h = lb::mix(h, (u32::from(t.sport) << 16) | u32::from(t.dport));
    lb::finish(lb::mix(h, u32::from(t.proto)))
}

/// Loads the ports and TCP flags at `l4`.
#[inline(always)]
fn ports(ctx: &TcContext, l4: usize, proto_: u8) -> Result<(u16, u16, u8), Option<Reason>> {
    if proto_ != proto::TCP && proto_ != proto::UDP {
        return Err(None);
    }
    let sport = u16::from_be(ctx.load::<u16>(l4).map_err(|_| None)?);
    let dport = u16::from_be(ctx.load::<u16>(l4 + 2).map_err(|_| None)?);
    let flags = if proto_ == proto::TCP {
        ctx.load::<u8>(l4 + 13).map_err(|_| None)?
    } else {
        0
    };
    Ok((sport, dport, flags))
}

/// Rewrites `pkt` in place so that its tuple becomes `to`, fixing every checksum.
#[inline(always)]
pub fn rewrite<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    to: &Tuple<F::Addr>,
) -> Result<(), i64> {
    let (csum_off, mangled) = pkt.csum().ok_or(-1i64)?;
    if to.saddr != pkt.t.saddr {
        F::set_addr(ctx, pkt, pkt.l3 + F::SADDR_OFF, &pkt.t.saddr, &to.saddr)?;
    }
    if to.daddr != pkt.t.daddr {
        F::set_addr(ctx, pkt, pkt.l3 + F::DADDR_OFF, &pkt.t.daddr, &to.daddr)?;
    }
    for (off, old, new) in [(0usize, pkt.t.sport, to.sport), (2, pkt.t.dport, to.dport)] {
        if old != new {
            let (o, n) = (old.to_be(), new.to_be());
            ctx.l4_csum_replace(csum_off, o as u64, n as u64, mangled | 2)?;
            ctx.store(pkt.l4 + off, &n, 0)?;
        }
    }
    Ok(())
}

/// Counts down the TTL (IPv4, with the header checksum) or the hop limit (IPv6) of a packet
/// this program forwards itself, as a router does; false, untouched, when it would reach 0:
/// the stack must forward that one (it answers with ICMP time exceeded). Out of line: it runs
/// at the end of the translation paths' call chains.
#[inline(never)]
pub fn count_down_ttl(ctx: &TcContext, v4: bool) -> bool {
    if v4 {
        // TTL and protocol: one 16-bit word of the header checksum.
        let Ok(word) = ctx.load::<[u8; 2]>(ETH_HLEN + 8) else {
            return false;
        };
        if word[0] <= 1 {
            return false;
        }
        let new = [word[0] - 1, word[1]];
        let (old, new) = (u16::from_ne_bytes(word), u16::from_ne_bytes(new));
        ctx.l3_csum_replace(ETH_HLEN + 10, old as u64, new as u64, 2)
            .and_then(|()| ctx.store(ETH_HLEN + 8, &new, 0))
            .is_ok()
    } else {
        let Ok(hops) = ctx.load::<u8>(ETH_HLEN + 7) else {
            return false;
        };
        hops > 1 && ctx.store(ETH_HLEN + 7, &(hops - 1), 0).is_ok()
    }
}

/// Looks up the route of a packet with tuple `t` arriving on this interface; with `want_src`
/// also the source address the node would use on it.
#[inline(always)]
pub fn route<F: Family>(
    ctx: &TcContext,
    t: &Tuple<F::Addr>,
    want_src: bool,
) -> Result<Route<F::Addr>, i64> {
    // SAFETY: a plain-old-data struct the helper fills in.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = F::AF;
    p.l4_protocol = t.proto;
    p.sport = t.sport.to_be();
    p.dport = t.dport.to_be();
    // SAFETY: reading the context's own skb.
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    F::fib_addrs(&mut p, t);
    let mut flags = BPF_FIB_LOOKUP_SKIP_NEIGH;
    if want_src {
        flags |= BPF_FIB_LOOKUP_SRC;
    }
    // SAFETY: valid context and stack buffer of the right size.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    if rc != 0 {
        return Err(rc);
    }
    Ok(Route {
        ifindex: p.ifindex,
        src: F::fib_src(&p),
    })
}

pub struct V4;
pub struct V6;

pub const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

impl Family for V4 {
    type Addr = [u8; 4];
    type CtValue = Ct4Value;
    const SADDR_OFF: usize = 12;
    const DADDR_OFF: usize = 16;
    const AF: u8 = AF_INET;

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Result<Packet<[u8; 4]>, Option<Reason>> {
        let l3 = ETH_HLEN;
        let vihl = ctx.load::<u8>(l3).map_err(|_| None)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return Err(None);
        }
        let frag = u16::from_be(ctx.load::<u16>(l3 + 6).map_err(|_| None)?);
        // More-fragments set or a non-zero offset: no complete ports to match on.
        if frag & 0x3fff != 0 {
            return Err(Some(Reason::Fragment));
        }
        let proto_ = ctx.load::<u8>(l3 + 9).map_err(|_| None)?;
        let saddr = ctx.load::<[u8; 4]>(l3 + 12).map_err(|_| None)?;
        let daddr = ctx.load::<[u8; 4]>(l3 + 16).map_err(|_| None)?;
        let l4 = l3 + ihl;
        let (sport, dport, tcp_flags) = ports(ctx, l4, proto_)?;
        Ok(Packet {
            t: Tuple {
                saddr,
                daddr,
                sport,
                dport,
                proto: proto_,
            },
            l3,
            l4,
            tcp_flags,
        })
    }

    #[inline(always)]
    fn frontend(t: &Tuple<[u8; 4]>) -> Option<ServiceValue> {
        let key = Service4Key {
            addr: t.daddr,
            port: t.dport,
            proto: t.proto,
            scope: SCOPE_EXTERNAL,
        };
        // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
        unsafe { LB4_SERVICES.get(&key) }.copied()
    }

    #[inline(always)]
    fn source_allowed(svc_id: u32, saddr: &[u8; 4]) -> bool {
        let key = LpmKey::new(
            64,
            SrcRange4 {
                svc_id: svc_id.to_be_bytes(),
                addr: *saddr,
            },
        );
        LB4_SRC_RANGES.get(&key).is_some()
    }

    #[inline(always)]
    fn backend_addr(b: &BackendValue) -> [u8; 4] {
        b.addr4()
    }

    #[inline(always)]
    fn client_bytes(a: &[u8; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0] = a[0];
        out[1] = a[1];
        out[2] = a[2];
        out[3] = a[3];
        out
    }

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

    #[inline(always)]
    fn set_addr(
        ctx: &TcContext,
        pkt: &Packet<[u8; 4]>,
        off: usize,
        old: &[u8; 4],
        new: &[u8; 4],
    ) -> Result<(), i64> {
        let (csum_off, mangled) = pkt.csum().ok_or(-1i64)?;
        let (o, n) = (
            u32::from_ne_bytes(*old) as u64,
            u32::from_ne_bytes(*new) as u64,
        );
        ctx.l4_csum_replace(csum_off, o, n, BPF_F_PSEUDO_HDR as u64 | mangled | 4)?;
        ctx.l3_csum_replace(pkt.l3 + 10, o, n, 4)?;
        ctx.store(off, new, 0)
    }

    #[inline(always)]
    fn fib_addrs(p: &mut bpf_fib_lookup, t: &Tuple<[u8; 4]>) {
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(t.saddr);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(t.daddr);
    }

    #[inline(always)]
    fn v4(a: &[u8; 4]) -> Option<[u8; 4]> {
        Some(*a)
    }

    #[inline(always)]
    fn hash(t: &Tuple<[u8; 4]>) -> u32 {
        let h = lb::mix(0, u32::from_be_bytes(t.saddr));
        hash_ports(lb::mix(h, u32::from_be_bytes(t.daddr)), t)
    }

    #[inline(always)]
    fn fib_src(p: &bpf_fib_lookup) -> [u8; 4] {
        // SAFETY: the IPv4 member of a union the helper filled for AF_INET.
        unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes()
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

impl Family for V6 {
    type Addr = [u8; 16];
    type CtValue = Ct6Value;
    const SADDR_OFF: usize = 8;
    const DADDR_OFF: usize = 24;
    const AF: u8 = AF_INET6;

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Result<Packet<[u8; 16]>, Option<Reason>> {
        let l3 = ETH_HLEN;
        let version = ctx.load::<u8>(l3).map_err(|_| None)? >> 4;
        if version != 6 {
            return Err(None);
        }
        // Extension headers (fragments included) are not followed: such packets pass.
        let next = ctx.load::<u8>(l3 + 6).map_err(|_| None)?;
        if next == 44 {
            return Err(Some(Reason::Fragment));
        }
        let saddr = ctx.load::<[u8; 16]>(l3 + 8).map_err(|_| None)?;
        let daddr = ctx.load::<[u8; 16]>(l3 + 24).map_err(|_| None)?;
        let l4 = l3 + 40;
        let (sport, dport, tcp_flags) = ports(ctx, l4, next)?;
        Ok(Packet {
            t: Tuple {
                saddr,
                daddr,
                sport,
                dport,
                proto: next,
            },
            l3,
            l4,
            tcp_flags,
        })
    }

    #[inline(always)]
    fn frontend(t: &Tuple<[u8; 16]>) -> Option<ServiceValue> {
        let key = Service6Key {
            addr: t.daddr,
            port: t.dport,
            proto: t.proto,
            scope: SCOPE_EXTERNAL,
        };
        // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
        unsafe { LB6_SERVICES.get(&key) }.copied()
    }

    #[inline(always)]
    fn source_allowed(svc_id: u32, saddr: &[u8; 16]) -> bool {
        let key = LpmKey::new(
            160,
            SrcRange6 {
                svc_id: svc_id.to_be_bytes(),
                addr: *saddr,
            },
        );
        LB6_SRC_RANGES.get(&key).is_some()
    }

    #[inline(always)]
    fn backend_addr(b: &BackendValue) -> [u8; 16] {
        b.addr
    }

    #[inline(always)]
    fn client_bytes(a: &[u8; 16]) -> [u8; 16] {
        *a
    }

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

    #[inline(always)]
    fn set_addr(
        ctx: &TcContext,
        pkt: &Packet<[u8; 16]>,
        off: usize,
        old: &[u8; 16],
        new: &[u8; 16],
    ) -> Result<(), i64> {
        let (csum_off, mangled) = pkt.csum().ok_or(-1i64)?;
        let mut from = *old;
        let mut to = *new;
        // SAFETY: two 16-byte stack buffers.
        let diff =
            unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
        if diff < 0 {
            return Err(diff);
        }
        ctx.l4_csum_replace(csum_off, 0, diff as u64, BPF_F_PSEUDO_HDR as u64 | mangled)?;
        ctx.store(off, new, 0)
    }

    #[inline(always)]
    fn fib_addrs(p: &mut bpf_fib_lookup, t: &Tuple<[u8; 16]>) {
        p.__bindgen_anon_3.ipv6_src = ip6_words(&t.saddr);
        p.__bindgen_anon_4.ipv6_dst = ip6_words(&t.daddr);
    }

    #[inline(always)]
    fn v4(_: &[u8; 16]) -> Option<[u8; 4]> {
        None
    }

    #[inline(always)]
    fn hash(t: &Tuple<[u8; 16]>) -> u32 {
        let mut h = 0;
        let mut i = 0;
        while i < 16 {
            h = lb::mix(
                h,
                u32::from_be_bytes([t.saddr[i], t.saddr[i + 1], t.saddr[i + 2], t.saddr[i + 3]]),
            );
            h = lb::mix(
                h,
                u32::from_be_bytes([t.daddr[i], t.daddr[i + 1], t.daddr[i + 2], t.daddr[i + 3]]),
            );
            i += 4;
        }
        hash_ports(h, t)
    }

    #[inline(always)]
    fn fib_src(p: &bpf_fib_lookup) -> [u8; 16] {
        // SAFETY: the IPv6 member of a union the helper filled for AF_INET6.
        ip6_bytes(&unsafe { p.__bindgen_anon_3.ipv6_src })
    }
}

/// An IPv6 address from the four native-order words of its memory layout (as `bpf_sock_addr`
/// and the FIB lookup hold it).
#[inline(always)]
pub fn ip6_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// The four native-order words of an IPv6 address's memory layout.
#[inline(always)]
pub fn ip6_words(bytes: &[u8; 16]) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        out[i] = u32::from_ne_bytes([
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ]);
        i += 1;
    }
    out
}
