//! XDP on the node's external interfaces: NodePort, externalIP and load balancer flows whose
//! backend is on another node are translated and sent straight back out (`XDP_TX`) before an
//! skb exists, and so are their replies. Everything else — local backends, rejects, packets
//! whose neighbour is not resolved yet, non-Service traffic — goes on untouched (`XDP_PASS`)
//! to tc and the stack, which handle it with the same maps.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_FIB_LOOKUP_SRC, BPF_NOEXIST, bpf_fib_lookup,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head},
    },
    programs::XdpContext,
};
use proxy_common::{
    affinity::{AffinityKey, CLIENT_ADDR},
    backend::BackendValue,
    ct::{CT_DSR, CT_REPLY, CT_SNAT},
    proto::{self, ETH_P_IP},
    reason::Reason,
    service::{FLAG_LEAST_CONN, FLAG_ROUND_ROBIN, FLAG_SNAT, FLAG_SOURCE_RANGES, ServiceValue},
};

use crate::{
    dsr, lb,
    nodeport::{ct_flags_of, keeps_entry},
    packet::{ETH_HLEN, Entry, Family, Packet, Tuple, V4, V6},
    snat, stats,
};

#[inline(always)]
fn ptr<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: bounds checked by `ptr`; unaligned read of plain bytes.
    ptr::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn write<T: Copy>(ctx: &XdpContext, off: usize, v: T) -> Option<()> {
    // SAFETY: bounds checked by `ptr`.
    ptr::<T>(ctx, off).map(|p| unsafe { p.write_unaligned(v) })
}

/// RFC 1624 incremental update of a checksum field (as stored, big-endian) for bytes `old`
/// replaced by `new` (an even number of bytes at an even offset).
#[inline(always)]
pub fn csum_update<const N: usize>(check: [u8; 2], old: &[u8; N], new: &[u8; N]) -> [u8; 2] {
    let mut s: u32 = u32::from(!u16::from_be_bytes(check));
    let mut i = 0;
    while i + 1 < N {
        s += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        s += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_be_bytes()
}

/// What XDP needs per family beyond `Family`.
pub trait XdpFamily: Family {
    fn parse_xdp(ctx: &XdpContext) -> Option<Packet<Self::Addr>>;
    /// Rewrites addresses (and the IPv4 header checksum) and returns the layer-4 checksum
    /// field updated for them.
    fn set_addrs(
        ctx: &XdpContext,
        pkt: &Packet<Self::Addr>,
        to: &Tuple<Self::Addr>,
        l4sum: [u8; 2],
    ) -> Option<[u8; 2]>;
}

#[inline(always)]
fn ports_xdp(ctx: &XdpContext, l4: usize, p: u8) -> Option<(u16, u16, u8)> {
    if p != proto::TCP && p != proto::UDP {
        return None;
    }
    let ports = read::<[u8; 4]>(ctx, l4)?;
    let flags = if p == proto::TCP {
        read::<u8>(ctx, l4 + 13)?
    } else {
        0
    };
    Some((
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
        flags,
    ))
}

impl XdpFamily for V4 {
    #[inline(always)]
    fn parse_xdp(ctx: &XdpContext) -> Option<Packet<[u8; 4]>> {
        let h = read::<[u8; 20]>(ctx, ETH_HLEN)?;
        // No options (a DSR option is ours to add), no fragments.
        if h[0] != 0x45 || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
            return None;
        }
        let l4 = ETH_HLEN + 20;
        let (sport, dport, tcp_flags) = ports_xdp(ctx, l4, h[9])?;
        Some(Packet {
            t: Tuple {
                saddr: [h[12], h[13], h[14], h[15]],
                daddr: [h[16], h[17], h[18], h[19]],
                sport,
                dport,
                proto: h[9],
            },
            l3: ETH_HLEN,
            l4,
            tcp_flags,
        })
    }

    #[inline(always)]
    fn set_addrs(
        ctx: &XdpContext,
        pkt: &Packet<[u8; 4]>,
        to: &Tuple<[u8; 4]>,
        mut l4sum: [u8; 2],
    ) -> Option<[u8; 2]> {
        let mut ipsum = read::<[u8; 2]>(ctx, pkt.l3 + 10)?;
        // Forwarded here: the TTL counts down (`ingress` passed those that would expire).
        let ttl = read::<[u8; 2]>(ctx, pkt.l3 + 8)?;
        let counted_down = [ttl[0].wrapping_sub(1), ttl[1]];
        ipsum = csum_update(ipsum, &ttl, &counted_down);
        write(ctx, pkt.l3 + 8, counted_down)?;
        for (off, old, new) in [(12, pkt.t.saddr, to.saddr), (16, pkt.t.daddr, to.daddr)] {
            if old != new {
                ipsum = csum_update(ipsum, &old, &new);
                l4sum = csum_update(l4sum, &old, &new);
                write(ctx, pkt.l3 + off, new)?;
            }
        }
        write(ctx, pkt.l3 + 10, ipsum)?;
        Some(l4sum)
    }
}

impl XdpFamily for V6 {
    #[inline(always)]
    fn parse_xdp(ctx: &XdpContext) -> Option<Packet<[u8; 16]>> {
        let h = read::<[u8; 8]>(ctx, ETH_HLEN)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        let saddr = read::<[u8; 16]>(ctx, ETH_HLEN + 8)?;
        let daddr = read::<[u8; 16]>(ctx, ETH_HLEN + 24)?;
        let l4 = ETH_HLEN + 40;
        let (sport, dport, tcp_flags) = ports_xdp(ctx, l4, h[6])?;
        Some(Packet {
            t: Tuple {
                saddr,
                daddr,
                sport,
                dport,
                proto: h[6],
            },
            l3: ETH_HLEN,
            l4,
            tcp_flags,
        })
    }

    #[inline(always)]
    fn set_addrs(
        ctx: &XdpContext,
        pkt: &Packet<[u8; 16]>,
        to: &Tuple<[u8; 16]>,
        mut l4sum: [u8; 2],
    ) -> Option<[u8; 2]> {
        if pkt.t.saddr != to.saddr {
            l4sum = csum_update(l4sum, &pkt.t.saddr, &to.saddr);
            write(ctx, pkt.l3 + 8, to.saddr)?;
        }
        if pkt.t.daddr != to.daddr {
            l4sum = csum_update(l4sum, &pkt.t.daddr, &to.daddr);
            write(ctx, pkt.l3 + 24, to.daddr)?;
        }
        Some(l4sum)
    }
}

/// Rewrites the packet's tuple to `to` with every checksum.
#[inline(never)]
fn rewrite<F: XdpFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    to: &Tuple<F::Addr>,
) -> Option<()> {
    let csum_off = if pkt.t.proto == proto::TCP {
        pkt.l4 + 16
    } else {
        pkt.l4 + 6
    };
    let before = read::<[u8; 2]>(ctx, csum_off)?;
    // An IPv4 UDP datagram without checksum keeps none.
    let none = pkt.t.proto == proto::UDP && before == [0, 0];
    let mut sum = F::set_addrs(ctx, pkt, to, before)?;
    for (off, old, new) in [(0usize, pkt.t.sport, to.sport), (2, pkt.t.dport, to.dport)] {
        if old != new {
            sum = csum_update(sum, &old.to_be_bytes(), &new.to_be_bytes());
            write(ctx, pkt.l4 + off, new.to_be_bytes())?;
        }
    }
    if none {
        return Some(());
    }
    if pkt.t.proto == proto::UDP && sum == [0, 0] {
        sum = [0xff, 0xff];
    }
    write(ctx, csum_off, sum)
}

/// The FIB's answer for `t` arriving here: egress interface, MAC addresses, source address.
#[derive(Clone, Copy)]
struct Hop<A> {
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
    src: A,
}

/// Fills `out` with the FIB's answer; false when the packet is not forwardable here or its
/// neighbour is not resolved yet (tc and the stack deal with it). Not inlined, like `insert`:
/// it keeps the lookup's buffer out of the callers' frames.
#[inline(never)]
fn hop<F: Family>(
    ctx: &XdpContext,
    t: &Tuple<F::Addr>,
    want_src: bool,
    out: &mut Hop<F::Addr>,
) -> bool {
    // SAFETY: plain-old-data the helper fills in.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = F::AF;
    p.l4_protocol = t.proto;
    p.sport = t.sport.to_be();
    p.dport = t.dport.to_be();
    p.ifindex = ctx.ingress_ifindex() as u32;
    F::fib_addrs(&mut p, t);
    let flags = if want_src { BPF_FIB_LOOKUP_SRC } else { 0 };
    // SAFETY: valid context and buffer.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    if rc != 0 {
        return false;
    }
    out.ifindex = p.ifindex;
    out.smac = p.smac;
    out.dmac = p.dmac;
    out.src = F::fib_src(&p);
    true
}

/// `lb::select` for a packet's client, out of line (it keeps the selection's temporaries out
/// of `new_flow`'s frame).
#[inline(never)]
fn pick<F: Family>(
    svc: &ServiceValue,
    t: &Tuple<F::Addr>,
    out: &mut lb::Choice,
) -> Result<(), Reason> {
    let client = AffinityKey {
        port_id: svc.port_id,
        client_kind: CLIENT_ADDR,
        client: F::client_bytes(&t.saddr),
    };
    *out = lb::select::<false>(svc, &client, F::hash(t), lb::NO_PICK)?;
    Ok(())
}

/// `F::ct_insert`, out of line.
#[inline(never)]
fn insert<F: Family>(t: &Tuple<F::Addr>, e: &Entry<F::Addr>, now: u64, map_flags: u64) -> bool {
    F::ct_insert(t, e, now, map_flags, 0).is_ok()
}

/// Sends the rewritten frame back out of this interface to the next hop.
#[inline(always)]
fn transmit(ctx: &XdpContext, smac: [u8; 6], dmac: [u8; 6]) -> u32 {
    if write(ctx, 0, dmac).is_none() || write(ctx, 6, smac).is_none() {
        return XDP_DROP;
    }
    XDP_TX
}

#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    // A new flow is handled after the tracked-flow path has returned, so their stack frames
    // never add up (the verifier allows 512 bytes per call chain).
    match read::<[u8; 2]>(ctx, 12).map(u16::from_be_bytes) {
        // A TTL about to expire: tc and the stack answer it (ICMP time exceeded).
        Some(ETH_P_IP) if read::<u8>(ctx, ETH_HLEN + 8).is_some_and(|ttl| ttl <= 1) => XDP_PASS,
        Some(ETH_P_IP) => handle::<V4>(ctx).unwrap_or_else(|| new_flow::<V4>(ctx)),
        // IPv6 is translated at tc: the IPv6 path's frames do not fit the verifier's 512-byte
        // stack per call chain yet.
        _ => XDP_PASS,
    }
}

/// Packets of tracked flows; `None` for the first packet of a flow.
#[inline(never)]
fn handle<F: XdpFamily>(ctx: &XdpContext) -> Option<u32> {
    let Some(pkt) = F::parse_xdp(ctx) else {
        return Some(XDP_PASS);
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let here = ctx.ingress_ifindex() as u32;
    if let Some(ptr) = F::ct_lookup(&pkt.t) {
        // SAFETY: from the lookup.
        let mut e = unsafe { F::ct_read(ptr) };
        if keeps_entry::<F>(ptr, &e, &pkt) {
            e.to.proto = pkt.t.proto;
            let mut h = Hop {
                ifindex: 0,
                smac: [0; 6],
                dmac: [0; 6],
                src: pkt.t.saddr,
            };
            // DSR names this node in the option: its address on the way is needed.
            let dsr = e.flags & CT_DSR != 0;
            if !hop::<F>(ctx, &e.to, dsr, &mut h) || h.ifindex != here {
                return Some(XDP_PASS);
            }
            // SAFETY: `ptr` came from the lookup above.
            unsafe { F::ct_touch(ptr, now, ct_flags_of(pkt.tcp_flags)) };
            if rewrite::<F>(ctx, &pkt, &e.to).is_none() {
                return Some(XDP_DROP);
            }
            stats::count(Reason::XdpForwarded);
            if dsr {
                return Some(dsr_out::<F>(ctx, &pkt.t, &h));
            }
            return Some(transmit(ctx, h.smac, h.dmac));
        }
    }
    None
}

#[inline(never)]
fn new_flow<F: XdpFamily>(ctx: &XdpContext) -> u32 {
    let Some(pkt) = F::parse_xdp(ctx) else {
        return XDP_PASS;
    };
    let pkt = &pkt;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let here = ctx.ingress_ifindex() as u32;
    let Some(svc) = F::frontend(&pkt.t) else {
        return XDP_PASS;
    };
    if svc.has_flag(FLAG_SOURCE_RANGES) && !F::source_allowed(svc.id, &pkt.t.saddr) {
        stats::count(Reason::SourceRangeDrop);
        return XDP_DROP;
    }
    // Flows of stateful schedulers are started at tc, and their later packets handled here:
    // least connection compares and keeps counts (a frame too many for this chain), and a
    // round-robin turn taken here for a backend tc must handle (a local one) would be lost.
    if svc.has_flag(FLAG_LEAST_CONN | FLAG_ROUND_ROBIN) {
        return XDP_PASS;
    }
    let mut choice = lb::Choice {
        backend_id: 0,
        backend: BackendValue {
            addr: [0; 16],
            port: 0,
            proto: 0,
            family: 0,
            flags: 0,
            _pad: 0,
            weight: 0,
        },
        reason: Reason::Translated,
    };
    match pick::<F>(&svc, &pkt.t, &mut choice) {
        Ok(()) => {}
        Err(Reason::NoLocalBackends) => {
            stats::count(Reason::NoLocalBackends);
            return XDP_DROP;
        }
        // No backends (tc rejects), or userspace mid-update.
        Err(_) => return XDP_PASS,
    }
    let backend = F::backend_addr(&choice.backend);
    let mut to = Tuple {
        saddr: pkt.t.saddr,
        daddr: backend,
        sport: pkt.t.sport,
        dport: choice.backend.port,
        proto: pkt.t.proto,
    };
    let snat = svc.has_flag(FLAG_SNAT) || backend == pkt.t.saddr;
    let mut h = Hop {
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        src: pkt.t.saddr,
    };
    // Not routable here, or a backend on this node (or behind another interface): tc's
    // business.
    if !hop::<F>(ctx, &to, snat, &mut h) || h.ifindex != here {
        return XDP_PASS;
    }
    let dsr = snat && dsr::enabled::<F>();
    let mut flags = 0;
    if dsr {
        flags |= CT_DSR;
    } else if snat {
        to.saddr = h.src;
        flags |= CT_SNAT;
    }
    if choice.reason == Reason::AffinityHit {
        stats::count(Reason::AffinityHit);
    }
    let meta = Meta {
        flags,
        svc_id: svc.id,
        backend_id: choice.backend_id,
        now,
    };
    commit::<F>(ctx, pkt, &mut to, &meta, &h)
}

/// What `new_flow` decided, for `commit`.
struct Meta {
    /// `CT_SNAT`, `CT_DSR` or 0.
    flags: u32,
    svc_id: u32,
    backend_id: u32,
    now: u64,
}

/// Records the flow (reply entry first: it claims the masquerading port), rewrites the packet
/// and transmits it. Out of line so its entries do not add to `new_flow`'s frame.
#[inline(never)]
fn commit<F: XdpFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    to: &mut Tuple<F::Addr>,
    meta: &Meta,
    hop: &Hop<F::Addr>,
) -> u32 {
    let snat = meta.flags & CT_SNAT != 0;
    let dsr = meta.flags & CT_DSR != 0;
    // With DSR the replies never come back here: no reply entry.
    if !dsr {
        let reply = Entry {
            to: pkt.t.reversed(),
            flags: meta.flags | CT_REPLY,
            svc_id: meta.svc_id,
            backend_id: meta.backend_id,
        };
        let mut claimed = false;
        let ports = snat::range();
        for i in 0..snat::TRIES {
            if snat {
                to.sport = snat::port(i, to.sport, ports);
            } else if i > 0 {
                break;
            }
            let map_flags = if snat { BPF_NOEXIST } else { BPF_ANY } as u64;
            if insert::<F>(&to.reversed(), &reply, meta.now, map_flags) {
                claimed = true;
                break;
            }
        }
        if !claimed {
            stats::count(Reason::SnatPortsExhausted);
            return XDP_DROP;
        }
    }
    let forward = Entry {
        to: *to,
        flags: meta.flags,
        svc_id: meta.svc_id,
        backend_id: meta.backend_id,
    };
    if !insert::<F>(&pkt.t, &forward, meta.now, BPF_ANY as u64) {
        stats::count(Reason::CtFailed);
        return XDP_PASS;
    }
    if rewrite::<F>(ctx, pkt, to).is_none() {
        return XDP_DROP;
    }
    stats::count(Reason::NatNew);
    stats::count(Reason::XdpForwarded);
    if dsr {
        return dsr_out::<F>(ctx, &pkt.t, hop);
    }
    transmit(ctx, hop.smac, hop.dmac)
}

/// Adds the DSR option carrying the frontend (`orig.daddr`, `orig.dport`) and this node's
/// address on the way (`hop.src`), and transmits.
#[inline(always)]
fn dsr_out<F: XdpFamily>(ctx: &XdpContext, orig: &Tuple<F::Addr>, hop: &Hop<F::Addr>) -> u32 {
    let (Some(frontend), Some(node)) = (dsr::frontend4::<F>(orig), F::v4(&hop.src)) else {
        return XDP_DROP;
    };
    if add_option(ctx, frontend, orig.dport, node).is_none() {
        return XDP_DROP;
    }
    stats::count(Reason::DsrSent);
    transmit(ctx, hop.smac, hop.dmac)
}

/// Grows the IPv4 header by the DSR option (the frame is moved forward by its length).
#[inline(never)]
fn add_option(ctx: &XdpContext, frontend: [u8; 4], port: u16, node: [u8; 4]) -> Option<()> {
    const GROW: usize = proxy_common::dsr::OPTION_LEN as usize;
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
    dsr::grow_header(&mut whole, &dsr::option(frontend, port, node));
    write(ctx, ETH_HLEN, whole)
}
