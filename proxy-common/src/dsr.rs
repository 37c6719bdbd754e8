//! Direct server return: the IPv4 option, or the IPv6 Destination Options header, a balancing
//! node adds, and the per-client budget of what the backend's node learns from it.

use crate::pod;

/// Option type: copied on fragmentation, class 0, number 26 (unassigned by IANA).
pub const OPTION_TYPE: u8 = 0x9a;
/// Option length: type, length, frontend port (2), frontend address (4), the sending node's
/// address (4). A multiple of 4, so the header grows from 20 to 32 bytes (IHL 8) with no
/// padding.
pub const OPTION_LEN: u8 = 12;

/// IPv6: the option's type in the Destination Options header: 0x1e, the type RFC 4727 sets
/// aside for experiments with "skip if unrecognized" and "does not change en route", so a
/// backend's stack that does not know it ignores it.
pub const OPTION6_TYPE: u8 = 0x1e;
/// IPv6: the option's data length: frontend port (2), frontend address (16), the sending
/// node's address (16).
pub const OPTION6_LEN: u8 = 34;
/// IPv6: the whole Destination Options header: next header, header length, the option (2 +
/// 34 bytes) and a 2-byte PadN, 40 bytes (a multiple of 8).
pub const HDR6_LEN: usize = 40;
/// IPv6: the header's length field, in 8-byte units after the first 8.
pub const HDR6_EXT_LEN: u8 = (HDR6_LEN / 8 - 1) as u8;
/// IPv6: the Destination Options extension header's protocol number.
pub const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6: the PadN option's type.
pub const PADN: u8 = 1;

/// Value of `LB_DSR_BUDGET` and `LB_DSR_BUDGET6`: new reply entries a client address (an IPv6
/// client's /64) made this node learn in the window starting at `window_ns`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DsrBudget {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the window's start.
    pub window_ns: u64,
    /// Entries learnt in the window.
    pub count: u32,
    pub _pad: u32,
}

/// Length of a budget window.
pub const DSR_BUDGET_WINDOW_NS: u64 = 1_000_000_000;

pod!(DsrBudget);
