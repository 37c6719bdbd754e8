//! Masquerading source ports: the range the agent configured (`--masquerade-port-range`),
//! kept apart from the node's ephemeral ports so a masqueraded flow never takes the tuple of
//! one of the node's own connections.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::config::{SNAT_PORT_MAX_DEFAULT, SNAT_PORT_MIN_DEFAULT};

use crate::maps::LB_CONFIG;

/// Attempts at finding a free masquerading port before giving up on a flow.
pub const TRIES: u32 = 8;

/// The configured range as (first port, number of ports); the defaults until the agent wrote
/// one.
#[inline(always)]
pub fn range() -> (u32, u32) {
    match LB_CONFIG.get(0) {
        Some(c) if c.snat_port_max != 0 && c.snat_port_max >= c.snat_port_min => (
            u32::from(c.snat_port_min),
            u32::from(c.snat_port_max - c.snat_port_min) + 1,
        ),
        _ => (
            u32::from(SNAT_PORT_MIN_DEFAULT),
            u32::from(SNAT_PORT_MAX_DEFAULT - SNAT_PORT_MIN_DEFAULT) + 1,
        ),
    }
}

/// The port of attempt `i` for a flow whose current source port is `port`: the client's own
/// port first if it lies in the range (as kube-proxy's MASQUERADE keeps it when it can), a
/// random one of the range otherwise.
#[inline(always)]
pub fn port(i: u32, port: u16, (first, count): (u32, u32)) -> u16 {
    let p = u32::from(port);
    if i == 0 && p >= first && p - first < count {
        return port;
    }
    // SAFETY: plain helper call.
    (first + unsafe { bpf_get_prandom_u32() } % count) as u16
}
