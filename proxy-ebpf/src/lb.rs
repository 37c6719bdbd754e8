//! Backend selection for a frontend: session affinity first, then a random slot.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::BackendValue,
    reason::Reason,
    service::{MemberKey, ServiceValue, SlotKey},
};

use crate::maps::{LB_AFFINITY, LB_BACKENDS, LB_MEMBERS, LB_SLOTS};

/// A chosen backend.
pub struct Choice {
    pub backend_id: u32,
    pub backend: BackendValue,
    pub reason: Reason,
}

/// Picks the backend for a new connection (or datagram) of `client` to the frontend `svc`.
///
/// Errors: `NoBackends` / `NoLocalBackends` when the frontend has no slot (the caller rejects or
/// drops), `SlotMissing` / `BackendMissing` when userspace is mid-update (the caller leaves the
/// socket untouched).
#[inline(always)]
pub fn select(svc: &ServiceValue, client: &AffinityKey) -> Result<Choice, Reason> {
    if svc.count == 0 {
        return Err(if svc.is_no_local() {
            Reason::NoLocalBackends
        } else {
            Reason::NoBackends
        });
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if svc.has_affinity()
        && let Some(choice) = affinity_hit(svc, client, now)
    {
        return Ok(choice);
    }
    let slot = unsafe { bpf_get_prandom_u32() } % svc.count as u32;
    let key = SlotKey {
        svc_id: svc.id,
        generation: svc.generation(),
        slot: slot as u16,
    };
    let backend_id = unsafe { LB_SLOTS.get(&key) }
        .ok_or(Reason::SlotMissing)?
        .backend_id;
    let backend = *unsafe { LB_BACKENDS.get(&backend_id) }.ok_or(Reason::BackendMissing)?;
    if svc.has_affinity() {
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        // Losing an affinity entry (map full is impossible for LRU) only costs stickiness.
        let _ = LB_AFFINITY.insert(client, &value, 0);
    }
    Ok(Choice {
        backend_id,
        backend,
        reason: Reason::Translated,
    })
}

/// The remembered backend, if the entry is younger than the timeout and the backend is still
/// one this frontend may use (semantics 6.6). Refreshes the timestamp (semantics 6.5).
#[inline(always)]
fn affinity_hit(svc: &ServiceValue, client: &AffinityKey, now: u64) -> Option<Choice> {
    let entry = LB_AFFINITY.get_ptr_mut(client)?;
    // SAFETY: the pointer came from a successful lookup; a concurrent update from another CPU
    // can only tear `last_used_ns`, which at worst extends or shortens stickiness by one update.
    let (backend_id, last_used_ns) = unsafe { ((*entry).backend_id, (*entry).last_used_ns) };
    let timeout_ns = svc.affinity_timeout_secs as u64 * 1_000_000_000;
    if now.wrapping_sub(last_used_ns) > timeout_ns {
        return None;
    }
    let member = MemberKey {
        svc_id: svc.id,
        backend_id,
    };
    unsafe { LB_MEMBERS.get(&member) }?;
    let backend = *unsafe { LB_BACKENDS.get(&backend_id) }?;
    unsafe { (*entry).last_used_ns = now };
    Some(Choice {
        backend_id,
        backend,
        reason: Reason::AffinityHit,
    })
}
