//! The monitor's switch and ring buffer: the data path writes events only while a monitor
//! watches (`LB_MONITOR` holds a deadline the monitor renews), and a full ring loses the event,
//! counted, never the packet.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::ring_buf::RingBufEntry};
use proxy_common::{event::Event, reason::Reason};

use super::{
    maps::{LB_EVENTS, LB_MONITOR},
    stats,
};

/// Whether a monitor watches: its deadline has not passed. One map lookup when nobody does.
#[inline(always)]
pub fn watching() -> bool {
    match LB_MONITOR.get(0) {
        // SAFETY: a helper without arguments.
        Some(&until) if until != 0 => (unsafe { bpf_ktime_get_ns() }) < until,
        _ => false,
    }
}

/// Room for one event, or `None` (counted as `EventsLost`) when the ring buffer is full.
#[inline(always)]
pub fn reserve() -> Option<RingBufEntry<Event>> {
    let entry = LB_EVENTS.reserve(0);
    if entry.is_none() {
        stats::count(Reason::EventsLost);
    }
    entry
}
