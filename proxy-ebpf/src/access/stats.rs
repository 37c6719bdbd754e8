//! Counter bumps over the per-CPU `LB_STATS` (per reason) and `LB_DROPS` (per hook and
//! reason) maps.

use proxy_common::reason::{Hook, Reason};

use super::maps::{LB_DROPS, LB_STATS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(counter) = LB_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, and programs do not preempt each other on one CPU.
        unsafe { *counter += 1 };
    }
}

/// Counts a drop for `reason` at `hook`: its reason's counter and its (hook, reason) counter.
#[inline(always)]
pub fn dropped(hook: Hook, reason: Reason) {
    count(reason);
    if let Some(counter) = LB_DROPS.get_ptr_mut(hook.drop_index(reason)) {
        // SAFETY: per-CPU slot, and programs do not preempt each other on one CPU.
        unsafe { *counter += 1 };
    }
}
