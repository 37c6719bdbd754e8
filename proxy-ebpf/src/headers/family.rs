//! The address families as one trait: parsing the tuple at tc, rewriting addresses with
//! their checksums, the FIB lookup's address fields. The flow engine (`flow::ct::Tracked`) and
//! the services (`services::frontend::Frontends`) extend it with their maps.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, bpf_fib_lookup},
    helpers::generated::bpf_csum_update,
    programs::TcContext,
};
use proxy_common::{backend::BackendValue, proto, reason::Reason};

use crate::access::skb;

use super::{
    AF_INET, AF_INET6, ETH_HLEN, FRAG_OFFSET, FRAG6_OFFSET, IPPROTO_FRAGMENT, Packet, Tuple, csum,
    hash, ip6_bytes, ip6_words,
};

/// What differs between IPv4 and IPv6 in a packet's headers.
pub trait Ip {
    type Addr: Copy + PartialEq + Default;

    fn parse(ctx: &TcContext) -> Result<Packet<Self::Addr>, Option<Reason>>;

    fn backend_addr(b: &BackendValue) -> Self::Addr;

    /// The address as affinity-key bytes.
    fn client_bytes(a: &Self::Addr) -> [u8; 16];

    /// Writes `to`'s addresses over the packet's (`skb::write`), IPv4's header checksum with
    /// them, and returns their difference (`csum::diff`) for the layer-4 checksum, which the
    /// caller updates. An address that stays adds nothing (its difference is a negative zero).
    fn write_addrs(
        ctx: &TcContext,
        pkt: &Packet<Self::Addr>,
        to: &Tuple<Self::Addr>,
    ) -> Result<u32, i64>;

    /// Brings a CHECKSUM_COMPLETE skb's packet sum (`skb->csum`, what the device summed) up to
    /// date after `write_addrs` changed the addresses by `diff`: a direct write leaves the sum
    /// alone, and the layer-4 checksum's pseudo-header update accounts only for the checksum
    /// field's own change. IPv4's header checksum cancels the addresses' change; IPv6 has none,
    /// so the sum takes `diff`. Otherwise the stack of a pod this packet is delivered to
    /// reports a hardware checksum failure and verifies the packet again in software. Nothing
    /// for other skbs.
    fn complete_addrs(ctx: &TcContext, diff: u32);

    /// Rewrites one address at `off` (source or destination) with its checksums, through the
    /// kernel's helpers (`nat::rewrite_first`).
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
}

pub struct V4;
pub struct V6;

/// Loads the ports and TCP flags at `l4`: one load (a TCP header's first 14 bytes, a UDP
/// header's 4 port bytes; every load is a helper call on the per-packet path).
#[inline(always)]
fn ports(ctx: &TcContext, l4: usize, proto_: u8) -> Result<(u16, u16, u8), Option<Reason>> {
    if proto_ == proto::TCP {
        let h = skb::load::<[u8; 14]>(ctx, l4).map_err(|_| None)?;
        return Ok((
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
            h[13],
        ));
    }
    if proto_ != proto::UDP {
        return Err(None);
    }
    let h = skb::load::<[u8; 4]>(ctx, l4).map_err(|_| None)?;
    Ok((
        u16::from_be_bytes([h[0], h[1]]),
        u16::from_be_bytes([h[2], h[3]]),
        0,
    ))
}

impl Ip for V4 {
    type Addr = [u8; 4];

    const SADDR_OFF: usize = 12;

    const DADDR_OFF: usize = 16;

    const AF: u8 = AF_INET;

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Result<Packet<[u8; 4]>, Option<Reason>> {
        let l3 = ETH_HLEN;
        // The fixed header in one load.
        let h = skb::load::<[u8; 20]>(ctx, l3).map_err(|_| None)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if h[0] >> 4 != 4 || ihl < 20 {
            return Err(None);
        }
        let frag = u16::from_be_bytes([h[6], h[7]]);
        // A later fragment (non-zero offset) carries no ports: `flow::frag` handles it. A first
        // fragment carries them and is translated as any packet (its checksum covers the whole
        // datagram, which the incremental updates keep right).
        if frag & FRAG_OFFSET != 0 {
            return Err(Some(Reason::Fragment));
        }
        let proto_ = h[9];
        let saddr = [h[12], h[13], h[14], h[15]];
        let daddr = [h[16], h[17], h[18], h[19]];
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
    fn write_addrs(
        ctx: &TcContext,
        pkt: &Packet<[u8; 4]>,
        to: &Tuple<[u8; 4]>,
    ) -> Result<u32, i64> {
        let diff = csum::diff(&pkt.t.saddr, &to.saddr) + csum::diff(&pkt.t.daddr, &to.daddr);
        // The header checksum and both addresses, bytes 10 to 19: one write.
        let c = csum::apply(skb::read::<[u8; 2]>(ctx, pkt.l3 + 10)?, diff);
        let (s, d) = (to.saddr, to.daddr);
        skb::write(
            ctx,
            pkt.l3 + 10,
            &[c[0], c[1], s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]],
        )?;
        Ok(diff)
    }

    #[inline(always)]
    fn complete_addrs(_: &TcContext, _: u32) {}

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
    fn hash(t: &Tuple<[u8; 4]>) -> u32 {
        let h = hash::mix(0, u32::from_be_bytes(t.saddr));
        hash::ports(hash::mix(h, u32::from_be_bytes(t.daddr)), t)
    }

    #[inline(always)]
    fn fib_src(p: &bpf_fib_lookup) -> [u8; 4] {
        // SAFETY: the IPv4 member of a union the helper filled for AF_INET.
        unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes()
    }
}

impl Ip for V6 {
    type Addr = [u8; 16];

    const SADDR_OFF: usize = 8;

    const DADDR_OFF: usize = 24;

    const AF: u8 = AF_INET6;

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Result<Packet<[u8; 16]>, Option<Reason>> {
        let l3 = ETH_HLEN;
        let version = skb::load::<u8>(ctx, l3).map_err(|_| None)? >> 4;
        if version != 6 {
            return Err(None);
        }
        // Extension headers other than a fragment header are not followed: such packets pass.
        let mut next = skb::load::<u8>(ctx, l3 + 6).map_err(|_| None)?;
        let mut l4 = l3 + 40;
        if next == IPPROTO_FRAGMENT {
            // A later fragment (non-zero offset) carries no ports: `flow::frag` handles it. A
            // first one carries them after the fragment header, and is translated as any packet.
            let frag = skb::load::<[u8; 4]>(ctx, l4).map_err(|_| None)?;
            if u16::from_be_bytes([frag[2], frag[3]]) & FRAG6_OFFSET != 0 {
                return Err(Some(Reason::Fragment));
            }
            next = frag[0];
            l4 += 8;
        }
        let saddr = skb::load::<[u8; 16]>(ctx, l3 + 8).map_err(|_| None)?;
        let daddr = skb::load::<[u8; 16]>(ctx, l3 + 24).map_err(|_| None)?;
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
    fn backend_addr(b: &BackendValue) -> [u8; 16] {
        b.addr
    }

    #[inline(always)]
    fn client_bytes(a: &[u8; 16]) -> [u8; 16] {
        *a
    }

    #[inline(always)]
    fn write_addrs(
        ctx: &TcContext,
        pkt: &Packet<[u8; 16]>,
        to: &Tuple<[u8; 16]>,
    ) -> Result<u32, i64> {
        skb::write(ctx, pkt.l3 + 8, &to.saddr)?;
        skb::write(ctx, pkt.l3 + 24, &to.daddr)?;
        Ok(csum::diff(&pkt.t.saddr, &to.saddr) + csum::diff(&pkt.t.daddr, &to.daddr))
    }

    #[inline(always)]
    fn complete_addrs(ctx: &TcContext, diff: u32) {
        // SAFETY: the program's own skb; a helper that changes only `skb->csum`, and only of a
        // CHECKSUM_COMPLETE skb (it fails for any other, which has nothing to update).
        unsafe { bpf_csum_update(ctx.as_ptr().cast(), diff) };
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
        let (mut from, mut to) = (*old, *new);
        let diff = csum::diff16(&mut from, &mut to)?;
        ctx.l4_csum_replace(csum_off, 0, diff as u64, BPF_F_PSEUDO_HDR as u64 | mangled)?;
        // Stored with a CHECKSUM_COMPLETE skb's packet sum recomputed: the pseudo-header
        // update accounts only for the checksum field's change (`complete_addrs`).
        ctx.store(off, new, BPF_F_RECOMPUTE_CSUM as u64)
    }

    #[inline(always)]
    fn fib_addrs(p: &mut bpf_fib_lookup, t: &Tuple<[u8; 16]>) {
        p.__bindgen_anon_3.ipv6_src = ip6_words(&t.saddr);
        p.__bindgen_anon_4.ipv6_dst = ip6_words(&t.daddr);
    }

    #[inline(always)]
    fn hash(t: &Tuple<[u8; 16]>) -> u32 {
        let mut h = 0;
        let mut i = 0;
        while i < 16 {
            h = hash::mix(
                h,
                u32::from_be_bytes([t.saddr[i], t.saddr[i + 1], t.saddr[i + 2], t.saddr[i + 3]]),
            );
            h = hash::mix(
                h,
                u32::from_be_bytes([t.daddr[i], t.daddr[i + 1], t.daddr[i + 2], t.daddr[i + 3]]),
            );
            i += 4;
        }
        hash::ports(h, t)
    }

    #[inline(always)]
    fn fib_src(p: &bpf_fib_lookup) -> [u8; 16] {
        // SAFETY: the IPv6 member of a union the helper filled for AF_INET6.
        ip6_bytes(&unsafe { p.__bindgen_anon_3.ipv6_src })
    }
}
