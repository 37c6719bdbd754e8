//! Next hops remembered per CPU: the packets of a tracked flow reuse the FIB's answer for the
//! flow (at XDP the egress interface and MAC addresses, at tc the egress interface, its MTU
//! and the next hop's address) instead of asking the FIB at every packet. Each CPU keeps them
//! in a direct-mapped per-CPU array per family and hook (`maps::HOP_CACHE*`,
//! `maps::TC_HOP_CACHE*`), found by index (no helper call, no lock), for at most `HOP_TTL_NS`
//! and only within the node's route generation (`maps::LB_ROUTE_GEN`), which the agent moves on
//! at every link, address, route or neighbour change it is told about on netlink. A failed
//! lookup is never remembered. The FIB lookup was half of an IPv6 packet's run time at XDP
//! (`bpf_ipv6_fib_lookup` walks the local and the main table's tries, then the neighbour
//! table).

use crate::{
    access::maps::{
        HOP_CACHE4, HOP_CACHE6, HOP_SLOTS, HopSlot, LB_ROUTE_GEN, SlotHead, TC_HOP_CACHE4,
        TC_HOP_CACHE6, TcHopSlot,
    },
    headers::{
        Tuple,
        family::{Ip, V4, V6},
    },
};

/// How long a remembered next hop is used without a FIB lookup, at most (within one route
/// generation): a change the agent did not see (while it restarts) shows within this time.
pub const HOP_TTL_NS: u64 = 1_000_000_000;

/// The per-CPU next-hop caches of a family.
pub trait Hops: Ip {
    /// XDP's slot `index`.
    fn xdp_slot(index: u32) -> Option<*mut HopSlot<Self::Addr>>;
    /// tc's slot `index`.
    fn tc_slot(index: u32) -> Option<*mut TcHopSlot<Self::Addr>>;
    /// The address's last four bytes, for a slot's index.
    fn tail(a: &Self::Addr) -> u32;
}

impl Hops for V4 {
    #[inline(always)]
    fn xdp_slot(index: u32) -> Option<*mut HopSlot<[u8; 4]>> {
        HOP_CACHE4.get_ptr_mut(index)
    }

    #[inline(always)]
    fn tc_slot(index: u32) -> Option<*mut TcHopSlot<[u8; 4]>> {
        TC_HOP_CACHE4.get_ptr_mut(index)
    }

    #[inline(always)]
    fn tail(a: &[u8; 4]) -> u32 {
        u32::from_ne_bytes(*a)
    }
}

impl Hops for V6 {
    #[inline(always)]
    fn xdp_slot(index: u32) -> Option<*mut HopSlot<[u8; 16]>> {
        HOP_CACHE6.get_ptr_mut(index)
    }

    #[inline(always)]
    fn tc_slot(index: u32) -> Option<*mut TcHopSlot<[u8; 16]>> {
        TC_HOP_CACHE6.get_ptr_mut(index)
    }

    #[inline(always)]
    fn tail(a: &[u8; 16]) -> u32 {
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
    }
}

/// Where a flow translated to `t`, arriving on interface `here`, is remembered: its slot's
/// index and key, the route generation as of before the FIB lookup whose answer would be
/// remembered (a change during the lookup moves the generation past it), and the packet's
/// time (the coarse clock).
#[derive(Clone, Copy)]
pub struct Place {
    pub index: u32,
    ports: u32,
    proto: u32,
    here: u32,
    generation: u32,
    now: u64,
}

/// The slot of the flow translated to `t` whose packet arrived on `here` at `now`, in the
/// route generation the agent last recorded.
#[inline(always)]
pub fn place<F: Hops>(t: &Tuple<F::Addr>, here: u32, now: u64) -> Place {
    place_in::<F>(t, here, now, generation())
}

/// The route generation the agent last recorded.
#[inline(always)]
pub fn generation() -> u32 {
    LB_ROUTE_GEN.get(0).copied().unwrap_or(0)
}

/// `place` in route generation `generation`.
#[inline(always)]
pub fn place_in<F: Hops>(t: &Tuple<F::Addr>, here: u32, now: u64, generation: u32) -> Place {
    let ports = (u32::from(t.sport) << 16) | u32::from(t.dport);
    let proto = u32::from(t.proto);
    let h = (F::tail(&t.daddr) ^ F::tail(&t.saddr) ^ ports ^ proto ^ here.rotate_left(8))
        .wrapping_mul(0x9e37_79b1);
    Place {
        index: (h >> 24) & (HOP_SLOTS - 1),
        ports,
        proto,
        here,
        generation,
        now,
    }
}

impl Place {
    /// The route generation the place was taken in.
    #[inline(always)]
    pub fn generation(&self) -> u32 {
        self.generation
    }
}

/// Whether `head` holds the answer for the flow translated to `t` at `at`, looked up in the
/// current generation less than `HOP_TTL_NS` before the packet's time.
#[inline(always)]
pub fn holds<A: Copy + PartialEq>(head: &SlotHead<A>, t: &Tuple<A>, at: &Place) -> bool {
    head.generation == at.generation
        && at.now.wrapping_sub(head.looked_up_ns) < HOP_TTL_NS
        && head.here == at.here
        && head.proto == at.proto
        && head.ports == at.ports
        && head.daddr == t.daddr
        && head.saddr == t.saddr
}

/// Marks `head` as holding the answer for the flow translated to `t` at `at`, looked up for
/// the packet at `at` in `at`'s generation.
#[inline(always)]
pub fn claim<A: Copy>(head: &mut SlotHead<A>, t: &Tuple<A>, at: &Place) {
    head.saddr = t.saddr;
    head.daddr = t.daddr;
    head.ports = at.ports;
    head.proto = at.proto;
    head.here = at.here;
    head.generation = at.generation;
    head.looked_up_ns = at.now;
}

/// This CPU's XDP slot at `at`.
#[inline(always)]
pub fn xdp_slot<'a, F: Hops>(at: &Place) -> Option<&'a mut HopSlot<F::Addr>> {
    let slot = F::xdp_slot(at.index)?;
    // SAFETY: this CPU's value of a per-CPU array: programs are not preempted on their CPU,
    // and only XDP uses this map, so nothing else reads or writes it meanwhile.
    Some(unsafe { &mut *slot })
}

/// This CPU's tc slot at `at`.
#[inline(always)]
pub fn tc_slot<'a, F: Hops>(at: &Place) -> Option<&'a mut TcHopSlot<F::Addr>> {
    let slot = F::tc_slot(at.index)?;
    // SAFETY: as in `xdp_slot`; only tc's ingress program uses this map.
    Some(unsafe { &mut *slot })
}
