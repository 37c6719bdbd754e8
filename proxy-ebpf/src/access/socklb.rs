//! Pods whose Services are translated per packet at tc rather than at the socket layer: their
//! namespace turned socket-layer translation off (service meshes need the Service address on
//! the wire). The agent writes their pod cgroups to `LB_SOCKLB_OFF`, and under key 0 the
//! cgroup levels they sit at.

use aya_ebpf::helpers::bpf_get_current_ancestor_cgroup_id;

use super::maps::LB_SOCKLB_OFF;

/// Bit mask of the cgroup levels of opted-out pods; 0 while no pod is opted out.
#[inline(always)]
pub fn levels() -> u32 {
    // SAFETY: a map lookup whose value is copied at once.
    unsafe { LB_SOCKLB_OFF.get(&0) }.copied().unwrap_or(0)
}

/// Whether some pod is opted out (tc then translates ClusterIPs on pod-facing interfaces).
#[inline(always)]
pub fn any() -> bool {
    levels() != 0
}

/// Whether the calling task is in an opted-out pod: its ancestor cgroup at one of the levels
/// in use is one of theirs. One lookup while no pod is opted out; otherwise one more per level
/// in use (usually one or two: kubelet's QoS classes put pod cgroups at two depths).
#[inline(never)]
pub fn caller_opted_out() -> bool {
    let mask = levels();
    if mask == 0 {
        return false;
    }
    let mut level = 1;
    while level < 32 {
        if mask & (1 << level) != 0 {
            // SAFETY: a helper that reads the current task's cgroup; 0 when there is no
            // ancestor at that level.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            // SAFETY: a map lookup whose value is not kept.
            if id != 0 && unsafe { LB_SOCKLB_OFF.get(&id) }.is_some() {
                return true;
            }
        }
        level += 1;
    }
    false
}
