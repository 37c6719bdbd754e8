//! The monitor's switch and ring buffer: the data path writes events only while a monitor
//! watches (`LB_MONITOR` holds a deadline the monitor renews), and a full ring loses the event,
//! counted, never the packet.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, bpf_ringbuf_query},
    maps::ring_buf::RingBufEntry,
};
use proxy_common::{
    event::{EVENTS_BYTES, Event},
    reason::Reason,
};

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

/// Unread bytes past which a submit wakes the reader.
const WAKE_AT: u64 = (EVENTS_BYTES / 4) as u64;

/// Submits a reserved event without waking the reader, unless a quarter of the ring is unread.
/// A wake-up is an interrupt to the reader's CPU (an inter-processor interrupt, and a VM exit
/// on a virtual machine: about 1 µs per event); the monitor polls the ring every 200 ms
/// anyway, so a watched flow pays it once per quarter ring instead of once per event.
#[inline(always)]
pub fn submit(entry: RingBufEntry<Event>) {
    // SAFETY: the helper takes the map's own address (what aya-ebpf's RingBuf passes to
    // bpf_ringbuf_reserve; the loader relocates it to the map) and only reads its counters.
    let unread = unsafe {
        bpf_ringbuf_query(
            core::ptr::from_ref(&LB_EVENTS).cast_mut().cast(),
            BPF_RB_AVAIL_DATA as u64,
        )
    };
    let wake = if unread >= WAKE_AT {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
}
