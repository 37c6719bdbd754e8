//! tc ingress on the node's external and pod-facing interfaces: ICMP errors about translated
//! flows, DSR options, packets of tracked flows, then new flows to NodePorts, externalIPs and
//! load balancer IPs. tc egress there: replies of the node's own stack to translated flows.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::proto::{ETH_P_IP, ETH_P_IPV6};

use crate::{
    access::{maps::host_flows, skb},
    flow::{
        dsr,
        fib::too_big_mtu,
        frag, icmp, pmtu,
        tc::{DSR, NEW, REWRITE_FAILED, handle, host_reply, rewrite_failed},
    },
    headers::{
        ETH_HLEN, FRAG_MORE, FRAG_OFFSET, FRAG6_MORE, FRAG6_OFFSET, IPPROTO_FRAGMENT, IPPROTO_ICMP,
        IPPROTO_ICMPV6,
        family::{V4, V6},
    },
    services::nodeport::start,
};

#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Ok(ethertype) = skb::load::<u16>(ctx, 12) else {
        return TC_ACT_OK as i32;
    };
    // Tracked flows first; a packet of none starts one (`start`).
    match u16::from_be(ethertype) {
        ETH_P_IP if skb::load::<u8>(ctx, ETH_HLEN + 9) == Ok(IPPROTO_ICMP) => icmp::icmp4(ctx),
        ETH_P_IPV6 if skb::load::<u8>(ctx, ETH_HLEN + 6) == Ok(IPPROTO_ICMPV6) => icmp::icmp6(ctx),
        ETH_P_IP => {
            let frag = skb::load::<u16>(ctx, ETH_HLEN + 6).map_or(0, u16::from_be);
            if frag & FRAG_OFFSET != 0 {
                return frag::later4(ctx);
            }
            if frag & FRAG_MORE != 0 {
                frag::remember_first4(ctx);
            }
            dsr::learn4(ctx);
            match handle::<V4>(ctx) {
                NEW => start::<V4>(ctx),
                REWRITE_FAILED => rewrite_failed::<V4>(ctx),
                DSR => dsr::send_remembered::<V4>(ctx),
                action => match too_big_mtu(action) {
                    Some(mtu) => pmtu::too_big::<V4>(ctx, mtu),
                    None => action,
                },
            }
        }
        ETH_P_IPV6 if skb::load::<u8>(ctx, ETH_HLEN + 6) == Ok(IPPROTO_FRAGMENT) => {
            let frag = skb::load::<u16>(ctx, ETH_HLEN + 42).map_or(0, u16::from_be);
            if frag & FRAG6_OFFSET != 0 {
                return frag::later6(ctx);
            }
            if frag & FRAG6_MORE != 0 {
                frag::remember_first6(ctx);
            }
            v6(ctx)
        }
        ETH_P_IPV6 => {
            dsr::learn6(ctx);
            v6(ctx)
        }
        _ => TC_ACT_OK as i32,
    }
}

/// tc ingress on a device without a link-layer header (ipip, sit, ip6tnl, WireGuard, tun): the
/// packet starts with its IP header. An Ethernet header is put in front of it (zeroed, with
/// the ethertype of the skb's protocol) and `ingress` reads it as on any other interface: the
/// replies of flows masqueraded to the device's address, to backends the overlay reaches, are
/// translated back and sent on towards their clients (`bpf_redirect_neigh`, which needs a
/// link-layer header to take off). A packet passed on keeps the header outside its data: the
/// kernel takes the link-layer length the helper set off again after the program.
#[inline(always)]
pub fn ingress_l3(ctx: &TcContext) -> i32 {
    // SAFETY: reading the context's own skb.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    if (protocol != ETH_P_IP && protocol != ETH_P_IPV6)
        || skb::push_link_header(ctx, ETH_HLEN, protocol).is_err()
    {
        return TC_ACT_OK as i32;
    }
    ingress(ctx)
}

/// tc egress on the same interfaces: replies the node's own stack sends for flows tc handed to
/// a backend on the node's address (a host-network pod) are translated back to the frontend.
/// Nothing else is looked at; until such a flow exists, nothing at all.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    if !host_flows() {
        return TC_ACT_OK as i32;
    }
    match skb::load::<u16>(ctx, 12).map(u16::from_be) {
        Ok(ETH_P_IP) => host_reply::<V4>(ctx),
        Ok(ETH_P_IPV6) => host_reply::<V6>(ctx),
        _ => TC_ACT_OK as i32,
    }
}

/// IPv6 packets that are not ICMPv6 errors or later fragments.
#[inline(always)]
fn v6(ctx: &TcContext) -> i32 {
    match handle::<V6>(ctx) {
        NEW => start::<V6>(ctx),
        REWRITE_FAILED => rewrite_failed::<V6>(ctx),
        DSR => dsr::send_remembered::<V6>(ctx),
        action => match too_big_mtu(action) {
            Some(mtu) => pmtu::too_big::<V6>(ctx, mtu),
            None => action,
        },
    }
}
