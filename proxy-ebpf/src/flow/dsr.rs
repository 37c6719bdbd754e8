//! Direct server return (IPv4): the node that balanced a flow sends it to a backend on another
//! node without masquerading, with the frontend the client used in an IPv4 option. The backend's
//! node learns the frontend from the option (a reply-direction connection-tracking entry), so
//! the backend's replies leave that node with the frontend as their source and go straight to
//! the client. An IP option rather than encapsulation: the packet stays routable as it is, the
//! backend node's stack ignores an option it does not know, and it costs 8 bytes instead of a
//! second IP header (the catch: it needs 12 bytes of MTU headroom).
//!
//! Learning is what an attacker would aim at (a reply entry rewrites a flow's replies), so a
//! packet with the option teaches this node something only when all of these hold (else
//! `DsrRefused`, or `DsrBudgetExceeded`): this node is in DSR mode; the option is well formed
//! and names a sending node that is one of the cluster's nodes (`LB_DSR_PEERS`); the frame
//! arrived on the interface this node routes that node through, from the MAC address its
//! neighbour table holds for it (the last hop is that node, or the router towards it); the
//! frontend is a Service frontend of this node (a load balancer IP or externalIP, or a
//! NodePort when the frontend is a node address); it would not replace an entry that is not a
//! DSR one; and the client address has not made this node learn its budget of entries in the
//! current second.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_FIB_LOOKUP_SRC, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
        bpf_fib_lookup,
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_fib_lookup as fib_lookup, bpf_skb_load_bytes},
    },
    programs::TcContext,
};
use proxy_common::{
    config::{CONFIG_DSR, DSR_BUDGET_DEFAULT},
    ct::{CT_DSR, CT_REPLY},
    dsr::{DSR_BUDGET_WINDOW_NS, DsrBudget, OPTION_LEN, OPTION_TYPE},
    reason::{Hook, Reason},
    service::{SCOPE_EXTERNAL, Service4Key},
};

use crate::{
    access::{
        maps::{LB_CONFIG, LB_DSR_BUDGET, LB_DSR_PEERS, LB4_SERVICES},
        stats,
    },
    flow::{
        ct::{Entry, Tracked},
        fib::forward,
    },
    headers::{
        ETH_HLEN, Tuple,
        csum::header_checksum,
        family::{Ip, V4},
    },
};

const AF_INET: u8 = 2;
/// Version 4, IHL 8: a 20-byte header and the 12-byte option.
const VIHL_DSR: u8 = 0x48;
const HDR_LEN: usize = 20 + OPTION_LEN as usize;

/// DSR is on (`--nodeport-mode dsr`) and the flow is IPv4.
#[inline(always)]
pub fn enabled<F: Ip>() -> bool {
    F::AF == AF_INET && LB_CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_DSR != 0)
}

/// The IPv4 frontend address of an original tuple.
#[inline(always)]
pub fn frontend4<F: Ip>(orig: &Tuple<F::Addr>) -> Option<[u8; 4]> {
    F::v4(&orig.daddr)
}

/// The option's bytes: frontend port and address, then the sending node's address.
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

/// The header grown by the option: `ip` is the 20-byte header in `whole[..20]`.
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

/// tc: inserts the option after the IPv4 header of a translated packet; `node` is this node's
/// address on the way to the backend.
#[inline(never)]
pub fn add_option_tc(
    ctx: &TcContext,
    frontend: [u8; 4],
    port: u16,
    node: [u8; 4],
) -> Result<(), i64> {
    // The header is read straight into the new one's first 20 bytes (one buffer: this frame
    // sits at the end of new_flow's call chain).
    let mut whole = [0u8; HDR_LEN];
    // SAFETY: a helper call writing 20 bytes into `whole` (aya's `load_bytes` clamps the
    // length to the packet, which the verifier cannot bound away from zero).
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            ETH_HLEN as u32,
            whole.as_mut_ptr().cast(),
            20,
        )
    };
    if rc != 0 {
        return Err(rc);
    }
    if whole[0] != 0x45 {
        return Err(0);
    }
    ctx.adjust_room(i32::from(OPTION_LEN), BPF_ADJ_ROOM_NET, 0)?;
    grow_header(&mut whole, &option(frontend, port, node));
    ctx.store(ETH_HLEN, &whole, 0)?;
    stats::count(Reason::DsrSent);
    Ok(())
}

/// tc on the backend's node: a packet carrying the option teaches this node the frontend of
/// the flow, so the backend's replies are translated back to it here (see the module docs for
/// when it is believed).
#[inline(never)]
pub fn learn4(ctx: &TcContext) {
    let Ok(vihl) = ctx.load::<u8>(ETH_HLEN) else {
        return;
    };
    if vihl == 0x45 {
        return;
    }
    let Ok(ip) = ctx.load::<[u8; HDR_LEN]>(ETH_HLEN) else {
        return;
    };
    // Options other than ours (first) are none of our business.
    if vihl >> 4 != 4 || ip[20] != OPTION_TYPE {
        return;
    }
    match learn(ctx, &ip) {
        Ok(true) => stats::count(Reason::DsrLearned),
        Ok(false) => {}
        Err(reason) => stats::count(reason),
    }
}

/// `learn4` for a packet whose first option is ours: true when a new entry was learnt, false
/// when the flow's entry was only refreshed.
#[inline(always)]
fn learn(ctx: &TcContext, ip: &[u8; HDR_LEN]) -> Result<bool, Reason> {
    if !enabled::<V4>() || ip[0] != VIHL_DSR || ip[21] != OPTION_LEN {
        return Err(Reason::DsrRefused);
    }
    // A later fragment has no ports.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return Err(Reason::DsrRefused);
    }
    let peer = [ip[28], ip[29], ip[30], ip[31]];
    // SAFETY: a plain lookup; the value is not kept.
    if unsafe { LB_DSR_PEERS.get(&peer) }.is_none() {
        return Err(Reason::DsrRefused);
    }
    let mut here = [0u8; 4];
    if !from_peer(ctx, &peer, &mut here) {
        return Err(Reason::DsrRefused);
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(ETH_HLEN + HDR_LEN) else {
        return Err(Reason::DsrRefused);
    };
    let proto = ip[9];
    let frontend = [ip[24], ip[25], ip[26], ip[27]];
    let fport = u16::from_be_bytes([ip[22], ip[23]]);
    if !is_frontend(frontend, fport, proto, here) {
        return Err(Reason::DsrRefused);
    }
    let client = [ip[12], ip[13], ip[14], ip[15]];
    let backend = [ip[16], ip[17], ip[18], ip[19]];
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    // Replies: backend:dport → client:sport, shown as frontend:fport → client:sport.
    let reply_key = Tuple {
        saddr: backend,
        daddr: client,
        sport: dport,
        dport: sport,
        proto,
    };
    let to = Tuple {
        saddr: frontend,
        daddr: client,
        sport: fport,
        dport: sport,
        proto,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(ptr) = V4::ct_lookup(&reply_key) {
        // SAFETY: from the lookup.
        let e = unsafe { V4::ct_read(ptr) };
        // Never replace what this node tracks itself.
        if e.flags & CT_DSR == 0 {
            return Err(Reason::DsrRefused);
        }
        if e.to.saddr == to.saddr && e.to.sport == to.sport {
            // SAFETY: from the lookup.
            unsafe { V4::ct_touch(ptr, now, 0) };
            return Ok(false);
        }
    }
    if !within_budget(client, now) {
        return Err(Reason::DsrBudgetExceeded);
    }
    let entry = Entry {
        to,
        flags: CT_REPLY | CT_DSR,
        svc_id: 0,
        backend_id: 0,
    };
    V4::ct_insert(&reply_key, &entry, now, BPF_ANY as u64, 0).map_err(|_| Reason::CtFailed)?;
    Ok(true)
}

/// Whether (`frontend`, `port`, `proto`) is a Service frontend for traffic from outside here:
/// a load balancer IP or externalIP as it is, or a NodePort when `frontend` is a node address
/// (then looked up on `here`, this node's own address towards the sender).
#[inline(always)]
fn is_frontend(frontend: [u8; 4], port: u16, proto: u8, here: [u8; 4]) -> bool {
    let mut key = Service4Key {
        addr: frontend,
        port,
        proto,
        scope: SCOPE_EXTERNAL,
    };
    // SAFETY: plain lookups; the values are not kept.
    if unsafe { LB4_SERVICES.get(&key) }.is_some() {
        return true;
    }
    // SAFETY: as above.
    if unsafe { LB_DSR_PEERS.get(&frontend) }.is_none() {
        return false;
    }
    key.addr = here;
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    unsafe { LB4_SERVICES.get(&key) }.is_some()
}

/// Whether the frame came from `peer`: this node routes `peer` out of the interface the frame
/// arrived on, and the frame's source MAC is the next hop's the neighbour table holds for it.
/// Sets `here` to this node's source address towards `peer`. Out of line: the FIB lookup's
/// buffer stays out of `learn4`'s frame.
#[inline(never)]
fn from_peer(ctx: &TcContext, peer: &[u8; 4], here: &mut [u8; 4]) -> bool {
    let Ok(smac) = ctx.load::<[u8; 6]>(6) else {
        return false;
    };
    // SAFETY: reading the context's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain-old-data the helper fills in.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    // A nonzero length: the MTU check uses it, not the size of this packet.
    p.__bindgen_anon_1.tot_len = 20;
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*peer);
    // SAFETY: valid context and buffer.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    if rc != 0 || p.ifindex != ifindex || p.dmac != smac {
        return false;
    }
    // SAFETY: the IPv4 member of a union the helper filled for AF_INET.
    *here = unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
    true
}

/// Counts one new entry against `client`'s budget; false when the budget of the current
/// window is spent. Unlocked: two CPUs racing may each count one over, which keeps the bound.
#[inline(never)]
fn within_budget(client: [u8; 4], now: u64) -> bool {
    let budget = match LB_CONFIG.get(0) {
        Some(c) if c.dsr_budget != 0 => c.dsr_budget,
        _ => DSR_BUDGET_DEFAULT,
    };
    match LB_DSR_BUDGET.get_ptr_mut(client) {
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
        None => {
            let fresh = DsrBudget {
                window_ns: now,
                count: 1,
                _pad: 0,
            };
            LB_DSR_BUDGET.insert(client, fresh, BPF_ANY as u64).is_ok()
        }
    }
}

/// Adds the DSR option naming the frontend of `orig` and this node (`node`, its address on
/// the way to the backend) and sends the packet out of `ifindex`. Inlined: `new_flow`'s frame
/// leaves room for `add_option_tc`'s and no more.
#[inline(always)]
pub fn dsr_forward<F: Ip>(
    ctx: &TcContext,
    to: &Tuple<F::Addr>,
    orig: &Tuple<F::Addr>,
    node: &F::Addr,
    ifindex: u32,
) -> i32 {
    // Counted without an event: this frame ends the longest call chains of tc.
    let (Some(frontend), Some(node)) = (frontend4::<F>(orig), F::v4(node)) else {
        stats::dropped(Hook::TcIngress, Reason::DsrFailed);
        return TC_ACT_SHOT as i32;
    };
    if add_option_tc(ctx, frontend, orig.dport, node).is_err() {
        stats::dropped(Hook::TcIngress, Reason::DsrFailed);
        return TC_ACT_SHOT as i32;
    }
    forward::<F>(ctx, to, ifindex)
}
