//! XDP on the node's external interfaces, IPv4 and IPv6: NodePort, externalIP and load
//! balancer flows whose backend is on another node are translated and sent straight back out (`XDP_TX`) before an
//! skb exists, and so are their replies. Everything else — local backends, rejects, packets
//! whose neighbour is not resolved yet, non-Service traffic — goes on untouched (`XDP_PASS`)
//! to tc and the stack, which handle it with the same maps.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use proxy_common::proto::{ETH_P_IP, ETH_P_IPV6};

use crate::{
    access::xdp::read,
    flow::{frag, xdp::handle},
    headers::{
        ETH_HLEN,
        family::{V4, V6},
    },
    services::xdp::new_flow,
};

#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    // A new flow is handled after the tracked-flow path has returned, so their stack frames
    // never add up (the verifier allows 512 bytes per call chain).
    match read::<[u8; 2]>(ctx, 12).map(u16::from_be_bytes) {
        // A TTL about to expire: tc and the stack answer it (ICMP time exceeded).
        Some(ETH_P_IP) if read::<u8>(ctx, ETH_HLEN + 8).is_some_and(|ttl| ttl <= 1) => XDP_PASS,
        // Fragments first: a later one is translated or passed (out of line, so this frame
        // stays as small as the tracked-flow path needs).
        Some(ETH_P_IP) => match frag::fragments4_xdp(ctx) {
            frag::NOT_LATER => handle::<V4>(ctx).unwrap_or_else(|| new_flow::<V4>(ctx)),
            verdict => verdict,
        },
        // A hop limit about to run out: likewise (ICMPv6 time exceeded).
        Some(ETH_P_IPV6) if read::<u8>(ctx, ETH_HLEN + 7).is_some_and(|hops| hops <= 1) => XDP_PASS,
        // Both families: ICMP errors and extension headers other than a fragment header are
        // tc's (the parse takes TCP and UDP right after the fixed header, or after a first
        // fragment's fragment header).
        Some(ETH_P_IPV6) => match frag::fragments6_xdp(ctx) {
            frag::NOT_LATER => handle::<V6>(ctx).unwrap_or_else(|| new_flow::<V6>(ctx)),
            verdict => verdict,
        },
        _ => XDP_PASS,
    }
}
