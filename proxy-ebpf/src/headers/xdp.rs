//! The address families on an XDP frame: parsing the tuple, rewriting addresses with their
//! checksums.

use aya_ebpf::programs::XdpContext;
use proxy_common::proto;

use aya_ebpf::helpers::generated::bpf_csum_diff;

use super::{
    ETH_HLEN, FRAG_OFFSET, FRAG6_OFFSET, IPPROTO_FRAGMENT, Packet, Tuple,
    csum::{apply, csum_update},
    family::{Ip, V4, V6},
};
use crate::access::xdp::{ptr, read, write};

/// What XDP needs per family beyond `Ip`.
pub trait XdpIp: Ip {
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

impl XdpIp for V4 {
    #[inline(always)]
    fn parse_xdp(ctx: &XdpContext) -> Option<Packet<[u8; 4]>> {
        let h = read::<[u8; 20]>(ctx, ETH_HLEN)?;
        // No options (a DSR option is ours to add), no later fragments (a first one carries
        // the ports, and its checksum, over the whole datagram, takes incremental updates).
        if h[0] != 0x45 || u16::from_be_bytes([h[6], h[7]]) & FRAG_OFFSET != 0 {
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

impl XdpIp for V6 {
    #[inline(always)]
    fn parse_xdp(ctx: &XdpContext) -> Option<Packet<[u8; 16]>> {
        let h = read::<[u8; 8]>(ctx, ETH_HLEN)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        let saddr = read::<[u8; 16]>(ctx, ETH_HLEN + 8)?;
        let daddr = read::<[u8; 16]>(ctx, ETH_HLEN + 24)?;
        let mut l4 = ETH_HLEN + 40;
        let mut next = h[6];
        // A first fragment (offset 0) carries the ports after the fragment header; a later
        // one is none of this parse's business (`flow::frag`).
        if next == IPPROTO_FRAGMENT {
            let f = read::<[u8; 4]>(ctx, l4)?;
            if u16::from_be_bytes([f[2], f[3]]) & FRAG6_OFFSET != 0 {
                return None;
            }
            next = f[0];
            l4 += 8;
        }
        let (sport, dport, tcp_flags) = ports_xdp(ctx, l4, next)?;
        Some(Packet {
            t: Tuple {
                saddr,
                daddr,
                sport,
                dport,
                proto: next,
            },
            l3: ETH_HLEN,
            l4,
            tcp_flags,
        })
    }

    /// The addresses' change to the layer-4 checksum is summed by the kernel
    /// (`bpf_csum_diff`, the frame's old addresses against the new ones): summed here, a
    /// 16-byte address takes over a hundred instructions of byte arithmetic, on every packet.
    #[inline(always)]
    fn set_addrs(
        ctx: &XdpContext,
        pkt: &Packet<[u8; 16]>,
        to: &Tuple<[u8; 16]>,
        l4sum: [u8; 2],
    ) -> Option<[u8; 2]> {
        let old_s = ptr::<[u8; 16]>(ctx, pkt.l3 + 8)?;
        let old_d = ptr::<[u8; 16]>(ctx, pkt.l3 + 24)?;
        // SAFETY: two bounds-checked 16-byte fields of the frame and two 16-byte fields of
        // `to`, read only (the helper's pointers are not const).
        let diff = unsafe {
            let s = bpf_csum_diff(old_s.cast(), 16, to.saddr.as_ptr().cast_mut().cast(), 16, 0);
            bpf_csum_diff(
                old_d.cast(),
                16,
                to.daddr.as_ptr().cast_mut().cast(),
                16,
                s as u32,
            )
        };
        if diff < 0 {
            return None;
        }
        write(ctx, pkt.l3 + 8, to.saddr)?;
        write(ctx, pkt.l3 + 24, to.daddr)?;
        // Forwarded: the hop limit counts the hop (no header checksum in IPv6).
        let hops = read::<u8>(ctx, pkt.l3 + 7)?;
        write(ctx, pkt.l3 + 7, hops.wrapping_sub(1))?;
        Some(apply(l4sum, diff as u32))
    }
}
