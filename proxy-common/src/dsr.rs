//! Direct server return: the IPv4 option a balancing node adds, and the per-client budget of
//! what the backend's node learns from it.

use crate::pod;

/// Option type: copied on fragmentation, class 0, number 26 (unassigned by IANA).
pub const OPTION_TYPE: u8 = 0x9a;
/// Option length: type, length, frontend port (2), frontend address (4), the sending node's
/// address (4). A multiple of 4, so the header grows from 20 to 32 bytes (IHL 8) with no
/// padding.
pub const OPTION_LEN: u8 = 12;

/// Value of `LB_DSR_BUDGET`: new reply entries a client address made this node learn in the
/// window starting at `window_ns`.
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
