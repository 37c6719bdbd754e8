//! Entry points only: each program is named after its hook and returns what the inner
//! function decided.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

// Layers, each importing only those above it in this list (checked by the xtask test
// `ebpf_layers`): access → headers → flow → services → hooks.
mod access;
mod flow;
mod headers;
mod hooks;
mod services;

use access::maps;
use flow::conns;
use headers::family::{V4, V6};
use services::sock;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier, socket_filter, xdp},
    programs::{SkBuffContext, SockAddrContext, SockContext, TcContext, XdpContext},
};

/// connect() of TCP, UDP and SCTP sockets to an IPv4 address. Returns 1 (proceed) unless the
/// Service has no usable backend, then 0 with ECONNREFUSED (or EPERM for a policy drop).
#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    sock::verdict::<V4, false>(&ctx, sock::fwd::<V4, false>(&ctx))
}

/// sendmsg()/sendto() with a destination on unconnected UDP sockets, IPv4. Verdicts as connect4.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    sock::verdict::<V4, true>(&ctx, sock::fwd::<V4, true>(&ctx))
}

/// recvmsg()/recvfrom() on UDP, IPv4: the source shown is the Service address. Always 1.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::rev::<V4>(&ctx);
    1
}

/// getpeername(), IPv4: the peer shown is the Service address. Always 1.
#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    sock::rev::<V4>(&ctx);
    1
}

/// connect(), IPv6 (and IPv4-mapped IPv6). Verdicts as connect4.
#[cgroup_sock_addr(connect6)]
pub fn sock6_connect(ctx: SockAddrContext) -> i32 {
    sock::verdict::<V6, false>(&ctx, sock::fwd::<V6, false>(&ctx))
}

/// sendmsg(), IPv6. Verdicts as connect4.
#[cgroup_sock_addr(sendmsg6)]
pub fn sock6_sendmsg(ctx: SockAddrContext) -> i32 {
    sock::verdict::<V6, true>(&ctx, sock::fwd::<V6, true>(&ctx))
}

/// recvmsg(), IPv6. Always 1.
#[cgroup_sock_addr(recvmsg6)]
pub fn sock6_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::rev::<V6>(&ctx);
    1
}

/// getpeername(), IPv6. Always 1.
#[cgroup_sock_addr(getpeername6)]
pub fn sock6_getpeername(ctx: SockAddrContext) -> i32 {
    sock::rev::<V6>(&ctx);
    1
}

/// A socket of the hooked cgroup is released: a connection counted for least-connection
/// scheduling is given back. Always 1.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    conns::release(&ctx);
    1
}

/// Never attached: the agent runs it (BPF_PROG_TEST_RUN) to give back the least-connection
/// count of a flow it expires. `XDP_PASS` when a count was given back.
#[xdp]
pub fn conn_release(ctx: XdpContext) -> u32 {
    conns::release_flow(&ctx)
}

/// tc ingress on the node's external and pod-facing interfaces: NodePort, externalIP and load
/// balancer traffic from elsewhere, with connection tracking. Returns a tc action.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    hooks::tc::ingress(&ctx)
}

/// tc ingress on devices without a link-layer header (an ipip or WireGuard overlay's device): what `tc_ingress` does, mostly replies of flows masqueraded to backends on other
/// nodes. Returns a tc action.
#[classifier]
pub fn tc_ingress_l3(ctx: TcContext) -> i32 {
    hooks::tc::ingress_l3(&ctx)
}

/// tc egress on the same interfaces as `tc_ingress`: replies of backends on the node's own
/// address (host-network pods) to flows `tc_ingress` translated. Returns a tc action.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    hooks::tc::egress(&ctx)
}

/// XDP on the node's external interfaces: flows to and from backends on other nodes are
/// translated and sent back out before the stack; everything else passes to tc.
#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    hooks::xdp::ingress(&ctx)
}

/// Never loaded or attached. It references the inspection-only maps, which no hook reads, so
/// that the linker keeps them in the object and the agent creates and pins them with the rest.
#[socket_filter]
pub fn maps_anchor(_ctx: SkBuffContext) -> i64 {
    let _ = maps::LB_SVC_INFO.get_ptr(0u32);
    let _ = maps::LB_AGENT.get_ptr(0);
    let _ = maps::LB_IFACES.get_ptr(0u32);
    let _ = maps::LB_MONITOR.get_ptr(0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
