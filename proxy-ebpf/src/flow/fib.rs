//! Forwarding a translated packet at tc: the FIB's route (and the node's source address on
//! it, for masquerading), the TTL counted down as a router does, the redirect to the egress
//! interface.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LOOKUP_SKIP_NEIGH,
        BPF_FIB_LOOKUP_SRC, TC_ACT_OK, bpf_fib_lookup, bpf_redir_neigh,
        bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::generated::{bpf_csum_update, bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use core::mem::MaybeUninit;

use proxy_common::reason::Reason;

use crate::{
    access::{maps::no_link_header, skb, stats},
    flow::hops::{self, Hops},
    headers::{AF_INET, ETH_HLEN, Tuple, csum, family::Ip},
};

/// Where the FIB sends a packet.
pub struct Route<A> {
    pub ifindex: u32,
    /// The source address the node would use on that route (for masquerading).
    pub src: A,
    /// The next hop, for `send`: handed to `bpf_redirect_neigh`, the kernel resolves only its
    /// neighbour instead of looking the route up a second time.
    pub nh: bpf_redir_neigh,
    /// The egress interface's MTU.
    pub mtu: u32,
}

/// Counts down the TTL (IPv4, with the header checksum) or the hop limit (IPv6) of a packet
/// this program forwards itself, as a router does; false, untouched, when it would reach 0:
/// the stack must forward that one (it answers with ICMP time exceeded). Out of line: it runs
/// at the end of the translation paths' call chains.
#[inline(never)]
pub fn count_down_ttl(ctx: &TcContext, v4: bool) -> bool {
    if v4 {
        // TTL, protocol and the header checksum: one read, one write.
        if !skb::linear(ctx, ETH_HLEN + 12) {
            return false;
        }
        let Ok(h) = skb::read::<[u8; 4]>(ctx, ETH_HLEN + 8) else {
            return false;
        };
        if h[0] <= 1 {
            return false;
        }
        let (old, new) = ([h[0], h[1]], [h[0] - 1, h[1]]);
        let c = csum::apply([h[2], h[3]], csum::diff(&old, &new));
        skb::write(ctx, ETH_HLEN + 8, &[new[0], new[1], c[0], c[1]]).is_ok()
    } else {
        if !skb::linear(ctx, ETH_HLEN + 8) {
            return false;
        }
        // The next header and the hop limit: one 16-bit word of the packet's sum.
        let Ok(old) = skb::read::<[u8; 2]>(ctx, ETH_HLEN + 6) else {
            return false;
        };
        if old[1] <= 1 {
            return false;
        }
        let new = [old[0], old[1] - 1];
        if skb::write(ctx, ETH_HLEN + 6, &new).is_err() {
            return false;
        }
        // No header checksum absorbs the change: a CHECKSUM_COMPLETE skb's packet sum takes
        // it (see `Ip::complete_addrs`; the helper fails for other skbs, which need nothing).
        // SAFETY: the program's own skb.
        unsafe { bpf_csum_update(ctx.as_ptr().cast(), csum::diff(&old, &new)) };
        true
    }
}

/// Zeroes the FIB lookup buffer `buf` with sixteen 32-bit stores. Zeroing the struct as a
/// whole (64 bytes, 4-byte aligned) compiles to a call of the byte-wise `memset` function the
/// BPF target links in, a loop of 64 stores on every routed packet.
#[inline(always)]
pub fn zero(buf: &mut MaybeUninit<bpf_fib_lookup>) -> &mut bpf_fib_lookup {
    const WORDS: usize = core::mem::size_of::<bpf_fib_lookup>() / 4;
    const _: () = assert!(WORDS * 4 == core::mem::size_of::<bpf_fib_lookup>());
    let w = buf.as_mut_ptr().cast::<u32>();
    let mut i = 0;
    while i < WORDS {
        // SAFETY: inside the buffer, 4-byte aligned as the struct is; volatile, so that the
        // stores are not merged back into a `memset` call.
        unsafe { w.add(i).write_volatile(0) };
        i += 1;
    }
    // SAFETY: every byte written; all zeroes is a valid value of the plain-old-data struct.
    unsafe { buf.assume_init_mut() }
}

/// Fills the FIB lookup's input `p` (zeroed by the caller, in its own frame: returned by
/// value, the struct would be copied into a frame where the verifier has no room for it) for a
/// packet with tuple `t` arriving on `ifindex`, at tc and at XDP.
#[inline(always)]
pub fn params<F: Ip>(p: &mut bpf_fib_lookup, t: &Tuple<F::Addr>, ifindex: u32) {
    p.family = F::AF;
    p.l4_protocol = t.proto;
    p.sport = t.sport.to_be();
    p.dport = t.dport.to_be();
    p.ifindex = ifindex;
    F::fib_addrs(p, t);
}

/// Why `route` found no way on.
pub enum Unrouted {
    /// The packet is too big for the egress interface, whose MTU this is.
    TooBig(u32),
    /// The destination is this node itself (a local address): delivered by the stack.
    Local,
    /// No forwarding route, or the lookup failed.
    Other,
}

/// The action meaning "too big for an egress MTU of `mtu`: answer it (`pmtu::too_big`)", not a
/// tc action: the MTU in the low 16 bits.
const TOO_BIG: i32 = i32::MIN + 0x2_0000;

/// The not-a-tc-action a translation path returns for a packet, still untouched, too big for
/// the egress interface's `mtu`, for the hook to answer after that path's frame has returned.
#[inline(always)]
pub fn too_big_action(mtu: u32) -> i32 {
    TOO_BIG | (mtu & 0xffff) as i32
}

/// The MTU in a `too_big_action`; `None` for any other action.
#[inline(always)]
pub fn too_big_mtu(action: i32) -> Option<u32> {
    (action & !0xffff == TOO_BIG).then_some((action & 0xffff) as u32)
}

/// Looks up the route of a packet with tuple `t` arriving on this interface; with `want_src`
/// also the source address the node would use on it. The kernel checks the packet against the
/// egress interface's MTU (a GSO packet passes whatever its segments' size); a packet bigger
/// than that MTU is `Unrouted::TooBig`.
#[inline(always)]
pub fn route<F: Ip>(
    ctx: &TcContext,
    t: &Tuple<F::Addr>,
    want_src: bool,
) -> Result<Route<F::Addr>, Unrouted> {
    let mut buf = MaybeUninit::uninit();
    let p = zero(&mut buf);
    params::<F>(p, t, arrival(ctx));
    let mut flags = BPF_FIB_LOOKUP_SKIP_NEIGH;
    if want_src {
        flags |= BPF_FIB_LOOKUP_SRC;
    }
    // SAFETY: valid context and stack buffer of the right size.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    // SAFETY: a plain member of the union `zero` cleared; the helper sets it to the egress
    // interface's MTU on success and for a packet too big for it (used only then). It is 16
    // bits wide: an MTU of 65536 (loopback's) reads as 0.
    let mtu = match u32::from(unsafe { p.__bindgen_anon_1.mtu_result }) {
        0 => 1 << 16,
        mtu => mtu,
    };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // The kernel compares the frame, Ethernet header included, with the MTU plus the
        // egress device's own link header, which a tunnel or WireGuard device does not have:
        // the IP packet's length decides (the route is complete either way).
        match ip_len::<F>(ctx) {
            Some(len) if len <= mtu => {}
            Some(_) => return Err(Unrouted::TooBig(mtu)),
            None => return Err(Unrouted::Other),
        }
    } else if rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 {
        return Err(Unrouted::Local);
    } else if rc != 0 {
        return Err(Unrouted::Other);
    }
    Ok(Route {
        ifindex: p.ifindex,
        src: F::fib_src(p),
        nh: if no_link_header(p.ifindex) {
            NO_NH
        } else {
            next_hop(p)
        },
        mtu,
    })
}

/// The route this CPU remembers (`flow::hops`) at `at` for a tracked flow's packet translated
/// to `t`: its egress interface and next hop into `ifindex` and
/// `nh` if there is one and the packet fits the interface's MTU (or is a GSO packet, which the
/// kernel segments to fit); false otherwise, and the caller asks the FIB (`route`), which
/// also answers a packet too big, and has `remember_route` keep a route. Out of line, and
/// `route` is not called from here: the two frames never add up.
#[inline(never)]
pub fn recall_route<F: Hops>(
    ctx: &TcContext,
    t: &Tuple<F::Addr>,
    at: &hops::Place,
    ifindex: &mut u32,
    nh: &mut bpf_redir_neigh,
) -> bool {
    let Some(s) = hops::tc_slot::<F>(at) else {
        return false;
    };
    if !hops::holds(&s.head, t, at) {
        return false;
    }
    // SAFETY: reading the context's own skb.
    let gso = unsafe { (*ctx.skb.skb).gso_size };
    if gso == 0 && !ip_len::<F>(ctx).is_some_and(|len| len <= s.mtu) {
        return false;
    }
    *ifindex = s.ifindex;
    *nh = s.nh;
    true
}

/// Keeps `r`, the FIB's route for a tracked flow's packet translated to `t`, at `at` (placed
/// before the lookup) for `recall_route`.
#[inline(never)]
pub fn remember_route<F: Hops>(t: &Tuple<F::Addr>, at: &hops::Place, r: &Route<F::Addr>) {
    let Some(s) = hops::tc_slot::<F>(at) else {
        return;
    };
    hops::claim(&mut s.head, t, at);
    s.ifindex = r.ifindex;
    s.mtu = r.mtu;
    s.nh = r.nh;
}

/// The arrival interface of the packet in `ctx`, as the FIB lookup takes it.
#[inline(always)]
pub fn arrival(ctx: &TcContext) -> u32 {
    // SAFETY: reading the context's own skb.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The next hop a successful FIB lookup left in `p`: the gateway, or on a connected route the
/// destination itself, of the family the lookup says (an IPv4 route through an IPv6 gateway
/// answers AF_INET6). The same bytes for both families, with no branch (a branch on the family
/// would split the verifier's states on every path that forwards): the IPv4 address is the
/// first word of the IPv6 member, the other three zero as `zero` left them.
#[inline(always)]
fn next_hop(p: &bpf_fib_lookup) -> bpf_redir_neigh {
    bpf_redir_neigh {
        nh_family: u32::from(p.family),
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
            // SAFETY: plain words of a union `zero` cleared and the helper filled.
            ipv6_nh: unsafe { p.__bindgen_anon_4.ipv6_dst },
        },
    }
}

/// The length of the IP packet in `ctx` (its header's).
#[inline(always)]
fn ip_len<F: Ip>(ctx: &TcContext) -> Option<u32> {
    if F::AF == AF_INET {
        let l = skb::load::<[u8; 2]>(ctx, ETH_HLEN + 2).ok()?;
        Some(u32::from(u16::from_be_bytes(l)))
    } else {
        let l = skb::load::<[u8; 2]>(ctx, ETH_HLEN + 4).ok()?;
        Some(u32::from(u16::from_be_bytes(l)) + 40)
    }
}

/// Sends a translated packet on its way: straight to the egress interface the FIB names
/// (`ifindex`, whose next hop the kernel finds, as for a flow's first packet; or looked up
/// here when 0), or to the stack when the FIB has no forwarding route for it. An index rather
/// than an `Option`: a `None`'s undefined payload made LLVM store an unset register, which the
/// verifier refuses ("R1 !read_ok").
#[inline(always)]
pub fn forward<F: Ip>(ctx: &TcContext, t: &Tuple<F::Addr>, ifindex: u32) -> i32 {
    if ifindex != 0 {
        return send_routed::<F>(ctx, ifindex);
    }
    match route::<F>(ctx, t, false) {
        Ok(r) => send::<F>(ctx, r.ifindex, &r.nh),
        Err(_) => {
            stats::count(Reason::FibPass);
            TC_ACT_OK as i32
        }
    }
}

/// No next hop: the initial value of a `Route::nh` to be filled, and the one of a route to a
/// device without a link-layer header (`send` has the kernel route it).
pub const NO_NH: bpf_redir_neigh = bpf_redir_neigh {
    nh_family: 0,
    __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv6_nh: [0; 4] },
};

/// Sends a translated packet out of `ifindex` (nonzero) to the next hop `nh` of its route,
/// the TTL counted down; without a next hop (`NO_NH`) as `send_routed`.
#[inline(always)]
pub fn send<F: Ip>(ctx: &TcContext, ifindex: u32, nh: &bpf_redir_neigh) -> i32 {
    if nh.nh_family == 0 {
        return send_routed::<F>(ctx, ifindex);
    }
    // Forwarded here, not by the stack: the TTL is counted down here too.
    if !count_down_ttl(ctx, F::AF == AF_INET) {
        stats::count(Reason::TtlExpired);
        return TC_ACT_OK as i32;
    }
    // SAFETY: plain helper call; the kernel only reads the struct (its whole size).
    unsafe {
        bpf_redirect_neigh(
            ifindex,
            (nh as *const bpf_redir_neigh).cast_mut(),
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}

/// `send` without a next hop: the kernel looks the route up again for it (a flow's first
/// packet, whose frame has no room for the next hop).
#[inline(always)]
pub fn send_routed<F: Ip>(ctx: &TcContext, ifindex: u32) -> i32 {
    if !count_down_ttl(ctx, F::AF == AF_INET) {
        stats::count(Reason::TtlExpired);
        return TC_ACT_OK as i32;
    }
    // SAFETY: plain helper call; NULL params make the kernel resolve the next hop itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
