//! Counter bumps over the per-CPU `LB_STATS` map.

use proxy_common::reason::Reason;

use super::maps::LB_STATS;

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(counter) = LB_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, and programs do not preempt each other on one CPU.
        unsafe { *counter += 1 };
    }
}
