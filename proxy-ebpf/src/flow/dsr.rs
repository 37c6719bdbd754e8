//! Direct server return: the node that balanced a flow sends it to a backend on another node
//! without masquerading, with the frontend the client used in the packet: an IPv4 option, or an
//! IPv6 Destination Options header. The backend's node learns the frontend from it (a
//! reply-direction connection-tracking entry), so the backend's replies leave that node with
//! the frontend as their source and go straight to the client. Carried in the IP header rather
//! than by encapsulation: the packet stays routable as it is, the backend node's stack ignores
//! an option it does not know, and it costs 12 bytes (IPv4) or 40 bytes (IPv6) instead of a
//! second IP header (the catch: it needs that much MTU headroom). One implementation serves
//! both families (`Dsr`); only the header's bytes differ.
//!
//! The IPv6 header (`proxy_common::dsr`): next header, length 4 (40 bytes), option 0x1e (the
//! experimental type whose top bits say "skip if unrecognized, unchanged en route") with 34
//! bytes: frontend port, frontend address, the sending node's address; then a 2-byte PadN.
//!
//! Learning is what an attacker would aim at (a reply entry rewrites a flow's replies), so a
//! packet with the option teaches this node something only when all of these hold (else
//! `DsrRefused`, or `DsrBudgetExceeded`): this node is in DSR mode; the option is well formed
//! and names a sending node that is one of the cluster's nodes (`LB_DSR_PEERS`,
//! `LB_DSR_PEERS6`); the frame arrived on the interface this node routes that node through,
//! from the MAC address its neighbour table holds for it (the last hop is that node, or the
//! router towards it); the frontend is a Service frontend of this node (a load balancer IP or
//! externalIP, or a NodePort when the frontend is a node address); it would not replace an
//! entry that is not a DSR one; and the client address (an IPv6 client's /64) has not made this
//! node learn its budget of entries in the current second.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_RECOMPUTE_CSUM, BPF_FIB_LOOKUP_SRC, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_NET, bpf_fib_lookup,
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head},
    },
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    config::{CONFIG_DSR, DSR_BUDGET_DEFAULT},
    ct::{CT_DSR, CT_REPLY},
    dsr::{
        DSR_BUDGET_WINDOW_NS, DsrBudget, HDR6_EXT_LEN, HDR6_LEN, IPPROTO_DSTOPTS, OPTION_LEN,
        OPTION_TYPE, OPTION6_LEN, OPTION6_TYPE, PADN,
    },
    proto,
    reason::{Hook, Reason},
    service::{SCOPE_EXTERNAL, Service4Key, Service6Key},
};

use crate::{
    access::{
        maps::{
            LB_CONFIG, LB_DSR_BUDGET, LB_DSR_BUDGET6, LB_DSR_PEERS, LB_DSR_PEERS6, LB4_SERVICES,
            LB6_SERVICES, TC_DSR_SCRATCH, TC_DSR_SCRATCH_WORDS, config_flag,
        },
        skb::{self, send_back},
        stats,
        xdp::{read, write},
    },
    flow::{
        ct::{Entry, Tracked},
        fib::{route, send_routed},
        pmtu::{Answer, Outcome},
    },
    headers::{
        ETH_HLEN, FRAG6_OFFSET, IPPROTO_FRAGMENT, Tuple,
        csum::header_checksum,
        family::{V4, V6},
        ip6_words,
    },
};

/// Version 4, IHL 8: a 20-byte header and the 12-byte option.
const VIHL_DSR: u8 = 0x48;
const HDR_LEN: usize = 20 + OPTION_LEN as usize;

/// What direct server return needs of an address family: its option (added at tc and at XDP),
/// its peers, its frontends, its budget of what one client may make this node learn.
pub trait Dsr: Tracked + Answer {
    /// How much the option grows a packet.
    const GROWTH: i32;

    /// Inserts the option naming `frontend`:`port` and this node (`node`, its address on the
    /// way to the backend) into a translated packet at tc, and counts it sent.
    fn add_option_tc(
        ctx: &TcContext,
        frontend: &Self::Addr,
        port: u16,
        node: &Self::Addr,
    ) -> Result<(), i64>;

    /// The same at XDP: the frame grows at its head.
    fn add_option_xdp(
        ctx: &XdpContext,
        frontend: &Self::Addr,
        port: u16,
        node: &Self::Addr,
    ) -> Option<()>;

    /// Whether `a` is a node address this node accepts the option from.
    fn is_peer(a: &Self::Addr) -> bool;

    /// Whether (`addr`, `port`, `proto`) is a frontend for traffic from outside this node.
    fn is_service(addr: &Self::Addr, port: u16, proto: u8) -> bool;

    /// Sets the FIB lookup's destination to `a`.
    fn fib_dst(p: &mut bpf_fib_lookup, a: &Self::Addr);

    /// `client`'s budget entry, if it has one.
    fn budget(client: &Self::Addr) -> Option<*mut DsrBudget>;

    /// Starts `client`'s budget entry.
    fn budget_insert(client: &Self::Addr, b: &DsrBudget) -> bool;
}

impl Dsr for V4 {
    const GROWTH: i32 = OPTION_LEN as i32;

    #[inline(always)]
    fn add_option_tc(
        ctx: &TcContext,
        frontend: &[u8; 4],
        port: u16,
        node: &[u8; 4],
    ) -> Result<(), i64> {
        add_option4_tc(ctx, *frontend, port, *node)
    }

    #[inline(always)]
    fn add_option_xdp(
        ctx: &XdpContext,
        frontend: &[u8; 4],
        port: u16,
        node: &[u8; 4],
    ) -> Option<()> {
        add_option4_xdp(ctx, *frontend, port, *node)
    }

    #[inline(always)]
    fn is_peer(a: &[u8; 4]) -> bool {
        // SAFETY: a plain lookup; the value is not kept.
        unsafe { LB_DSR_PEERS.get(a) }.is_some()
    }

    #[inline(always)]
    fn is_service(addr: &[u8; 4], port: u16, proto: u8) -> bool {
        let key = Service4Key {
            addr: *addr,
            port,
            proto,
            scope: SCOPE_EXTERNAL,
        };
        // SAFETY: a map lookup whose value is not kept.
        unsafe { LB4_SERVICES.get(&key) }.is_some()
    }

    #[inline(always)]
    fn fib_dst(p: &mut bpf_fib_lookup, a: &[u8; 4]) {
        // A nonzero length: the MTU check uses it, not the size of this packet.
        p.__bindgen_anon_1.tot_len = 20;
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*a);
    }

    #[inline(always)]
    fn budget(client: &[u8; 4]) -> Option<*mut DsrBudget> {
        LB_DSR_BUDGET.get_ptr_mut(client)
    }

    #[inline(always)]
    fn budget_insert(client: &[u8; 4], b: &DsrBudget) -> bool {
        LB_DSR_BUDGET.insert(client, b, BPF_ANY as u64).is_ok()
    }
}

impl Dsr for V6 {
    const GROWTH: i32 = HDR6_LEN as i32;

    #[inline(always)]
    fn add_option_tc(
        ctx: &TcContext,
        frontend: &[u8; 16],
        port: u16,
        node: &[u8; 16],
    ) -> Result<(), i64> {
        add_option6_tc(ctx, frontend, port, node)
    }

    #[inline(always)]
    fn add_option_xdp(
        ctx: &XdpContext,
        frontend: &[u8; 16],
        port: u16,
        node: &[u8; 16],
    ) -> Option<()> {
        add_option6_xdp(ctx, frontend, port, node)
    }

    #[inline(always)]
    fn is_peer(a: &[u8; 16]) -> bool {
        // SAFETY: a plain lookup; the value is not kept.
        unsafe { LB_DSR_PEERS6.get(a) }.is_some()
    }

    #[inline(always)]
    fn is_service(addr: &[u8; 16], port: u16, proto: u8) -> bool {
        let key = Service6Key {
            addr: *addr,
            port,
            proto,
            scope: SCOPE_EXTERNAL,
        };
        // SAFETY: a map lookup whose value is not kept.
        unsafe { LB6_SERVICES.get(&key) }.is_some()
    }

    #[inline(always)]
    fn fib_dst(p: &mut bpf_fib_lookup, a: &[u8; 16]) {
        p.__bindgen_anon_1.tot_len = 40;
        p.__bindgen_anon_4.ipv6_dst = ip6_words(a);
    }

    #[inline(always)]
    fn budget(client: &[u8; 16]) -> Option<*mut DsrBudget> {
        LB_DSR_BUDGET6.get_ptr_mut(prefix64(client))
    }

    #[inline(always)]
    fn budget_insert(client: &[u8; 16], b: &DsrBudget) -> bool {
        LB_DSR_BUDGET6
            .insert(prefix64(client), b, BPF_ANY as u64)
            .is_ok()
    }
}

/// An IPv6 address's /64 prefix.
#[inline(always)]
fn prefix64(a: &[u8; 16]) -> [u8; 8] {
    [a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]
}

/// DSR is on (`--nodeport-mode dsr`).
#[inline(always)]
pub fn enabled() -> bool {
    config_flag(CONFIG_DSR)
}

/// The IPv4 option's bytes: frontend port and address, then the sending node's address.
#[inline(always)]
pub fn option(frontend: [u8; 4], port: u16, node: [u8; 4]) -> [u8; OPTION_LEN as usize] {
    let p = port.to_be_bytes();
    [
        OPTION_TYPE,
        OPTION_LEN,
        p[0],
        p[1],
        frontend[0],
        frontend[1],
        frontend[2],
        frontend[3],
        node[0],
        node[1],
        node[2],
        node[3],
    ]
}

/// The IPv4 header grown by the option: `ip` is the 20-byte header in `whole[..20]`.
#[inline(always)]
pub fn grow_header(whole: &mut [u8; HDR_LEN], opt: &[u8; OPTION_LEN as usize]) {
    let mut i = 20;
    while i < HDR_LEN {
        whole[i] = opt[i - 20];
        i += 1;
    }
    whole[0] = VIHL_DSR;
    let len = u16::from_be_bytes([whole[2], whole[3]])
        .wrapping_add(u16::from(OPTION_LEN))
        .to_be_bytes();
    whole[2] = len[0];
    whole[3] = len[1];
    whole[10] = 0;
    whole[11] = 0;
    let sum = header_checksum(whole);
    whole[10] = sum[0];
    whole[11] = sum[1];
}

/// tc, IPv4: inserts the option after the IPv4 header of a translated packet.
#[inline(never)]
fn add_option4_tc(ctx: &TcContext, frontend: [u8; 4], port: u16, node: [u8; 4]) -> Result<(), i64> {
    // The header is read straight into the new one's first 20 bytes (one buffer: this frame
    // sits at the end of new_flow's call chain).
    let mut whole = [0u8; HDR_LEN];
    skb::load_into(ctx, ETH_HLEN, &mut whole[..20])?;
    if whole[0] != 0x45 {
        return Err(0);
    }
    ctx.adjust_room(i32::from(OPTION_LEN), BPF_ADJ_ROOM_NET, 0)?;
    grow_header(&mut whole, &option(frontend, port, node));
    ctx.store(ETH_HLEN, &whole, 0)?;
    stats::count(Reason::DsrSent);
    Ok(())
}

/// XDP, IPv4: grows the IPv4 header by the option (the frame is moved forward by its length).
#[inline(never)]
fn add_option4_xdp(ctx: &XdpContext, frontend: [u8; 4], port: u16, node: [u8; 4]) -> Option<()> {
    const GROW: usize = OPTION_LEN as usize;
    // SAFETY: plain helper call on this context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return None;
    }
    // Ethernet and IPv4 headers back to the front.
    let hdr = read::<[u8; 34]>(ctx, GROW)?;
    write(ctx, 0, hdr)?;
    let ip = read::<[u8; 20]>(ctx, ETH_HLEN)?;
    let mut whole = [0u8; 20 + GROW];
    let mut i = 0;
    while i < 20 {
        whole[i] = ip[i];
        i += 1;
    }
    grow_header(&mut whole, &option(frontend, port, node));
    write(ctx, ETH_HLEN, whole)?;
    stats::count(Reason::DsrSent);
    Some(())
}

/// The first 6 bytes of the IPv6 header: next header, length, option type and length, port.
#[inline(always)]
fn head6(next: u8, port: u16) -> [u8; 6] {
    let p = port.to_be_bytes();
    [next, HDR6_EXT_LEN, OPTION6_TYPE, OPTION6_LEN, p[0], p[1]]
}

/// tc, IPv6: inserts the Destination Options header after the IPv6 header of a translated
/// packet (which has no extension header but a first fragment's fragment header: `V6::parse`
/// translates no other). The addresses are
/// stored from the caller's frame: this one sits at the end of new_flow's call chain.
#[inline(never)]
fn add_option6_tc(
    ctx: &TcContext,
    frontend: &[u8; 16],
    port: u16,
    node: &[u8; 16],
) -> Result<(), i64> {
    // Version to hop limit: payload length at 4, next header at 6.
    let ip = skb::load::<[u8; 8]>(ctx, ETH_HLEN)?;
    // TCP or UDP, or a first fragment's fragment header (ours goes before it).
    if ip[0] >> 4 != 6 || (ip[6] != proto::TCP && ip[6] != proto::UDP && ip[6] != IPPROTO_FRAGMENT)
    {
        return Err(0);
    }
    ctx.adjust_room(HDR6_LEN as i32, BPF_ADJ_ROOM_NET, 0)?;
    // Stored with a CHECKSUM_COMPLETE skb's packet sum recomputed (no header checksum
    // absorbs them; see `Ip::complete_addrs`): the packet leaves the node, where the sum no
    // longer counts, but it stays exact.
    let sum = BPF_F_RECOMPUTE_CSUM as u64;
    let at = ETH_HLEN + 40;
    ctx.store(at, &head6(ip[6], port), sum)?;
    ctx.store(at + 6, frontend, sum)?;
    ctx.store(at + 22, node, sum)?;
    ctx.store(at + 38, &[PADN, 0u8], sum)?;
    let len = u16::from_be_bytes([ip[4], ip[5]])
        .wrapping_add(HDR6_LEN as u16)
        .to_be_bytes();
    ctx.store(ETH_HLEN + 4, &[len[0], len[1], IPPROTO_DSTOPTS], sum)?;
    stats::count(Reason::DsrSent);
    Ok(())
}

/// XDP, IPv6: inserts the Destination Options header after the IPv6 header (the frame is
/// moved forward by its length).
#[inline(never)]
fn add_option6_xdp(
    ctx: &XdpContext,
    frontend: &[u8; 16],
    port: u16,
    node: &[u8; 16],
) -> Option<()> {
    const L3: usize = ETH_HLEN + 40;
    // SAFETY: plain helper call on this context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(HDR6_LEN as i32)) } != 0 {
        return None;
    }
    // Ethernet and IPv6 headers back to the front.
    let hdr = read::<[u8; L3]>(ctx, HDR6_LEN)?;
    write(ctx, 0, hdr)?;
    let next = hdr[ETH_HLEN + 6];
    write(ctx, L3, head6(next, port))?;
    write(ctx, L3 + 6, *frontend)?;
    write(ctx, L3 + 22, *node)?;
    write(ctx, L3 + 38, [PADN, 0u8])?;
    let len = u16::from_be_bytes([hdr[ETH_HLEN + 4], hdr[ETH_HLEN + 5]])
        .wrapping_add(HDR6_LEN as u16)
        .to_be_bytes();
    write(ctx, ETH_HLEN + 4, [len[0], len[1], IPPROTO_DSTOPTS])?;
    stats::count(Reason::DsrSent);
    Some(())
}

/// What a packet carrying the option says.
struct Said<A> {
    /// The sending node.
    peer: A,
    frontend: A,
    fport: u16,
    /// The packet's own tuple: client to backend.
    t: Tuple<A>,
}

/// tc on the backend's node, IPv4: a packet carrying the option teaches this node the
/// frontend of the flow, so the backend's replies are translated back to it here (see the
/// module docs for when it is believed).
#[inline(never)]
pub fn learn4(ctx: &TcContext) {
    let Ok(vihl) = skb::load::<u8>(ctx, ETH_HLEN) else {
        return;
    };
    if vihl == 0x45 {
        return;
    }
    let Ok(ip) = skb::load::<[u8; HDR_LEN]>(ctx, ETH_HLEN) else {
        return;
    };
    // Options other than ours (first) are none of our business.
    if vihl >> 4 != 4 || ip[20] != OPTION_TYPE {
        return;
    }
    count(parse4(ctx, &ip).and_then(|said| learn::<V4>(ctx, &said)));
}

/// The option of an IPv4 packet whose first option is ours.
#[inline(always)]
fn parse4(ctx: &TcContext, ip: &[u8; HDR_LEN]) -> Result<Said<[u8; 4]>, Reason> {
    if ip[0] != VIHL_DSR || ip[21] != OPTION_LEN {
        return Err(Reason::DsrRefused);
    }
    // A later fragment has no ports.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return Err(Reason::DsrRefused);
    }
    let Ok(ports) = skb::load::<[u8; 4]>(ctx, ETH_HLEN + HDR_LEN) else {
        return Err(Reason::DsrRefused);
    };
    Ok(Said {
        peer: [ip[28], ip[29], ip[30], ip[31]],
        frontend: [ip[24], ip[25], ip[26], ip[27]],
        fport: u16::from_be_bytes([ip[22], ip[23]]),
        t: Tuple {
            saddr: [ip[12], ip[13], ip[14], ip[15]],
            daddr: [ip[16], ip[17], ip[18], ip[19]],
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            proto: ip[9],
        },
    })
}

/// tc on the backend's node, IPv6: as `learn4`, for a packet whose first extension header is a
/// Destination Options header starting with our option.
#[inline(never)]
pub fn learn6(ctx: &TcContext) {
    if skb::load::<u8>(ctx, ETH_HLEN + 6) != Ok(IPPROTO_DSTOPTS) {
        return;
    }
    // Next header, length, option type and length, port.
    let Ok(head) = skb::load::<[u8; 6]>(ctx, ETH_HLEN + 40) else {
        return;
    };
    if head[2] != OPTION6_TYPE {
        return;
    }
    let mut said = Said {
        peer: [0u8; 16],
        frontend: [0u8; 16],
        fport: u16::from_be_bytes([head[4], head[5]]),
        t: Tuple {
            saddr: [0u8; 16],
            daddr: [0u8; 16],
            sport: 0,
            dport: 0,
            proto: head[0],
        },
    };
    count(parse6(ctx, &head, &mut said).and_then(|()| learn::<V6>(ctx, &said)));
}

/// Fills `said` from an IPv6 packet whose first option is ours (`head`: the header's first 6
/// bytes), loading straight into it: `learn6`'s frame holds one copy of the addresses.
#[inline(never)]
fn parse6(ctx: &TcContext, head: &[u8; 6], said: &mut Said<[u8; 16]>) -> Result<(), Reason> {
    let at = ETH_HLEN + 40;
    if head[1] != HDR6_EXT_LEN || head[3] != OPTION6_LEN {
        return Err(Reason::DsrRefused);
    }
    // Ours is followed by TCP or UDP, or by a first fragment's fragment header; a later
    // fragment (without ports) or any other header is refused.
    let mut l4 = at + HDR6_LEN;
    let mut next = head[0];
    if next == IPPROTO_FRAGMENT {
        let f = skb::load::<[u8; 4]>(ctx, l4).map_err(|_| Reason::DsrRefused)?;
        if u16::from_be_bytes([f[2], f[3]]) & FRAG6_OFFSET != 0 {
            return Err(Reason::DsrRefused);
        }
        next = f[0];
        l4 += 8;
    }
    if next != proto::TCP && next != proto::UDP {
        return Err(Reason::DsrRefused);
    }
    said.t.proto = next;
    skb::load_into(ctx, at + 6, &mut said.frontend).map_err(|_| Reason::DsrRefused)?;
    skb::load_into(ctx, at + 22, &mut said.peer).map_err(|_| Reason::DsrRefused)?;
    skb::load_into(ctx, ETH_HLEN + 8, &mut said.t.saddr).map_err(|_| Reason::DsrRefused)?;
    skb::load_into(ctx, ETH_HLEN + 24, &mut said.t.daddr).map_err(|_| Reason::DsrRefused)?;
    let ports = skb::load::<[u8; 4]>(ctx, l4).map_err(|_| Reason::DsrRefused)?;
    said.t.sport = u16::from_be_bytes([ports[0], ports[1]]);
    said.t.dport = u16::from_be_bytes([ports[2], ports[3]]);
    Ok(())
}

/// Counts what learning gave.
#[inline(always)]
fn count(learnt: Result<bool, Reason>) {
    match learnt {
        Ok(true) => stats::count(Reason::DsrLearned),
        Ok(false) => {}
        Err(reason) => stats::count(reason),
    }
}

/// Learns the frontend of the flow `said` describes, if believed: true when a new entry was
/// learnt, false when the flow's entry was only refreshed. Out of line: one frame for both
/// families' parsing callers.
#[inline(never)]
fn learn<F: Dsr>(ctx: &TcContext, said: &Said<F::Addr>) -> Result<bool, Reason> {
    if !enabled() || !F::is_peer(&said.peer) {
        return Err(Reason::DsrRefused);
    }
    let mut here = said.peer;
    if !from_peer::<F>(ctx, &said.peer, &mut here) {
        return Err(Reason::DsrRefused);
    }
    let t = &said.t;
    if !is_frontend::<F>(&said.frontend, said.fport, t.proto, &here) {
        return Err(Reason::DsrRefused);
    }
    // Replies: backend:dport → client:sport, shown as frontend:fport → client:sport.
    let reply_key = t.reversed();
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(ptr) = F::ct_lookup(&reply_key) {
        // SAFETY: from the lookup; plain reads of the map value.
        let (flags, same) = unsafe {
            (
                (*ptr).flags,
                (*ptr).saddr == said.frontend && (*ptr).sport == said.fport,
            )
        };
        // Never replace what this node tracks itself.
        if flags & CT_DSR == 0 {
            return Err(Reason::DsrRefused);
        }
        if same {
            // SAFETY: from the lookup.
            unsafe { F::ct_touch(ptr, now, 0) };
            return Ok(false);
        }
    }
    if !within_budget::<F>(&t.saddr, now) {
        return Err(Reason::DsrBudgetExceeded);
    }
    insert_learnt::<F>(&reply_key, said, now)?;
    Ok(true)
}

/// Writes the reply entry `learn` learnt for the flow `said` describes, under `reply_key`.
/// Out of line: the entry and its map key and value stay out of `learn`'s frame, whose chain
/// is near the stack limit of verifiers before 6.9 (frames rounded up to 32 bytes).
#[inline(never)]
fn insert_learnt<F: Dsr>(
    reply_key: &Tuple<F::Addr>,
    said: &Said<F::Addr>,
    now: u64,
) -> Result<(), Reason> {
    let t = &said.t;
    let entry = Entry {
        to: Tuple {
            saddr: said.frontend,
            daddr: t.saddr,
            sport: said.fport,
            dport: t.sport,
            proto: t.proto,
        },
        flags: CT_REPLY | CT_DSR,
        svc_id: 0,
        backend_id: 0,
    };
    F::ct_insert(reply_key, &entry, now, BPF_ANY as u64, 0).map_err(|_| Reason::CtFailed)
}

/// Whether (`frontend`, `port`, `proto`) is a Service frontend for traffic from outside here:
/// a load balancer IP or externalIP as it is, or a NodePort when `frontend` is a node address
/// (then looked up on `here`, this node's own address towards the sender).
#[inline(always)]
fn is_frontend<F: Dsr>(frontend: &F::Addr, port: u16, proto: u8, here: &F::Addr) -> bool {
    F::is_service(frontend, port, proto)
        || (F::is_peer(frontend) && F::is_service(here, port, proto))
}

/// Whether the frame came from `peer`: this node routes `peer` out of the interface the frame
/// arrived on, and the frame's source MAC is the next hop's the neighbour table holds for it.
/// Sets `here` to this node's source address towards `peer`. Out of line: the FIB lookup's
/// buffer stays out of `learn`'s frame.
#[inline(never)]
fn from_peer<F: Dsr>(ctx: &TcContext, peer: &F::Addr, here: &mut F::Addr) -> bool {
    let Ok(smac) = skb::load::<[u8; 6]>(ctx, 6) else {
        return false;
    };
    let ifindex = super::fib::arrival(ctx);
    let mut buf = core::mem::MaybeUninit::uninit();
    let p = super::fib::zero(&mut buf);
    p.family = F::AF;
    p.ifindex = ifindex;
    F::fib_dst(p, peer);
    // SAFETY: valid context and buffer.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    if rc != 0 || p.ifindex != ifindex || p.dmac != smac {
        return false;
    }
    *here = F::fib_src(p);
    true
}

/// Counts one new entry against `client`'s budget; false when the budget of the current
/// window is spent. Unlocked: two CPUs racing may each count one over, which keeps the bound.
#[inline(never)]
fn within_budget<F: Dsr>(client: &F::Addr, now: u64) -> bool {
    let budget = match LB_CONFIG.get(0) {
        Some(c) if c.dsr_budget != 0 => c.dsr_budget,
        _ => DSR_BUDGET_DEFAULT,
    };
    match F::budget(client) {
        // SAFETY: from the lookup; plain stores into the map value.
        Some(b) => unsafe {
            if now.wrapping_sub((*b).window_ns) >= DSR_BUDGET_WINDOW_NS {
                (*b).window_ns = now;
                (*b).count = 1;
                return true;
            }
            if (*b).count >= budget {
                return false;
            }
            (*b).count += 1;
            true
        },
        None => F::budget_insert(
            client,
            &DsrBudget {
                window_ns: now,
                count: 1,
                _pad: 0,
            },
        ),
    }
}

/// A DSR flow's option at tc, between `remember` (or `remember_frontend`) and
/// `send_remembered`.
#[repr(C)]
struct Remembered<A> {
    frontend: A,
    node: A,
    port: u16,
    /// The egress interface, 0 when still to be looked up (with `node`).
    ifindex: u32,
}

/// The per-CPU `TC_DSR_SCRATCH` value as a `Remembered`.
#[inline(always)]
fn remembered<F: Dsr>() -> Option<*mut Remembered<F::Addr>> {
    const { assert!(core::mem::size_of::<Remembered<F::Addr>>() <= TC_DSR_SCRATCH_WORDS * 8) };
    TC_DSR_SCRATCH.get_ptr_mut(0).map(|p| p.cast())
}

/// tc, a new flow to a backend behind the interface it came in on: remembers its option
/// (`orig`'s frontend, this node's address `node` on the way) and the egress interface, for
/// `send_remembered` once `new_flow` has translated the packet and returned.
#[inline(always)]
pub fn remember<F: Dsr>(orig: &Tuple<F::Addr>, node: &F::Addr, ifindex: u32) -> bool {
    let Some(r) = remembered::<F>() else {
        return false;
    };
    // SAFETY: a per-CPU map value large enough for it (checked above); plain stores.
    unsafe {
        (*r).frontend = orig.daddr;
        (*r).node = *node;
        (*r).port = orig.dport;
        (*r).ifindex = ifindex;
    }
    true
}

/// tc, a packet of a tracked DSR flow: remembers its frontend (`orig`'s destination) for
/// `send_remembered`, which finds the route, once `handle` has translated the packet and
/// returned.
#[inline(always)]
pub fn remember_frontend<F: Dsr>(orig: &Tuple<F::Addr>) -> bool {
    let Some(r) = remembered::<F>() else {
        return false;
    };
    // SAFETY: a per-CPU map value large enough for it (checked above); plain stores.
    unsafe {
        (*r).frontend = orig.daddr;
        (*r).port = orig.dport;
        (*r).ifindex = 0;
    }
    true
}

/// Returned by `add_remembered` for a packet the option would make too big: not a tc action.
const TOO_BIG: i32 = i32::MIN + 7;

/// tc: adds the option `remember` or `remember_frontend` kept to the translated packet and
/// sends it out; the route to the backend (and this node's address on it, which the option
/// names) is looked up here when it is not known yet. A packet the option would make too big
/// is answered in a frame of its own (`too_big`), after this one has returned: the verifier
/// would not have room for the two in one call chain.
#[inline(always)]
pub fn send_remembered<F: Dsr>(ctx: &TcContext) -> i32 {
    match add_remembered::<F>(ctx) {
        TOO_BIG => too_big::<F>(ctx),
        action => action,
    }
}

#[inline(never)]
fn add_remembered<F: Dsr>(ctx: &TcContext) -> i32 {
    let Some(r) = remembered::<F>() else {
        stats::dropped(Hook::TcIngress, Reason::DsrFailed);
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: the map value `remember` filled on this CPU for this packet; no other program
    // runs on this CPU until this one returns.
    let r = unsafe { &mut *r };
    if r.ifindex == 0 {
        let Ok(pkt) = F::parse(ctx) else {
            stats::dropped(Hook::TcIngress, Reason::DsrFailed);
            return TC_ACT_SHOT as i32;
        };
        match route::<F>(ctx, &pkt.t, true) {
            Ok(route) => {
                r.node = route.src;
                r.ifindex = route.ifindex;
            }
            Err(_) => {
                stats::count(Reason::FibPass);
                return TC_ACT_OK as i32;
            }
        }
    }
    if fits::<F, _>(ctx, r.ifindex).is_err() {
        return TOO_BIG;
    }
    if F::add_option_tc(ctx, &r.frontend, r.port, &r.node).is_err() {
        stats::dropped(Hook::TcIngress, Reason::DsrFailed);
        return TC_ACT_SHOT as i32;
    }
    send_routed::<F>(ctx, r.ifindex)
}

/// tc: a translated packet of a DSR flow that the option would make too big for the egress
/// interface. The client is asked for smaller packets, as a router on its path would ask
/// (`pmtu`), and this one is dropped; one that cannot be answered so goes on without the
/// option (dropped, it would be lost without a trace; its backend's node learns the flow from
/// a packet that fits, or the backend answers from its own address).
#[inline(never)]
fn too_big<F: Dsr>(ctx: &TcContext) -> i32 {
    let Some(r) = remembered::<F>() else {
        stats::dropped(Hook::TcIngress, Reason::DsrFailed);
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: as in `add_remembered`, which filled it for this packet.
    let r = unsafe { &*r };
    let mtu = match fits::<F, _>(ctx, r.ifindex) {
        Err(mtu) => mtu,
        Ok(()) => 0,
    };
    match F::answer(
        ctx,
        Some(&r.frontend),
        r.port,
        mtu.saturating_sub(F::GROWTH as u32),
        Reason::DsrTooBig,
    ) {
        Outcome::Answered => send_back(ctx),
        Outcome::Untouched => {
            stats::count(Reason::DsrTooBig);
            send_routed::<F>(ctx, r.ifindex)
        }
        // Half rewritten: dropped (counted as such already).
        Outcome::Failed => {
            stats::count(Reason::DsrFailed);
            TC_ACT_SHOT as i32
        }
    }
}

/// Whether the packet (an skb at tc, a frame at XDP), grown by the option, still fits
/// `ifindex`'s MTU (a GSO packet always does: it is segmented for the MTU after the option was
/// added); the interface's MTU when it does not.
#[inline(always)]
pub fn fits<F: Dsr, C: EbpfContext>(ctx: &C, ifindex: u32) -> Result<(), u32> {
    let mut mtu = 0u32;
    // SAFETY: plain helper call on this context with a stack word for the answer.
    let rc = unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut mtu, F::GROWTH, 0) };
    if rc == 0 { Ok(()) } else { Err(mtu) }
}
