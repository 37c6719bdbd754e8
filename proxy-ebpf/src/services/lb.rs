//! Backend selection for a frontend: session affinity first, then a random slot.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use proxy_common::{
    affinity::{AffinityKey, AffinityValue, CLIENT_HAIRPIN},
    backend::BackendValue,
    maglev::{MAGLEV_CHUNK, MaglevKey},
    reason::Reason,
    revnat::{DgramFlowKey, DgramFlowValue},
    service::{
        FLAG_LEAST_CONN, FLAG_MAGLEV, FLAG_NEVER_QUEUE, FLAG_ROUND_ROBIN, FLAG_SED,
        FLAG_SOURCE_HASH, FLAG_WEIGHTED, MemberKey, ServiceValue, SlotKey,
    },
};

use crate::{
    flow::conns,
    headers::hash::{finish, mix},
};

/// Backends a least-connection choice compares (from a random slot on): all of them up to
/// this many.
const LC_SCAN: u32 = 32;

/// The backend with the fewest active connections (relative to its weight with
/// `FLAG_WEIGHTED`) among up to `LC_SCAN` slots; ties go to the first from a random start.
/// With `FLAG_SED` a backend's load is its connections plus one (shortest expected delay);
/// with `FLAG_NEVER_QUEUE` the first idle backend is taken at once. 0 for none.
#[inline(always)]
pub fn least_conn(svc: &ServiceValue) -> u32 {
    kbp_least_conn(
        svc.id,
        u32::from(svc.generation()),
        u32::from(svc.count),
        u32::from(svc.flags),
    )
}

/// `least_conn`'s scan, as a global BPF function (exported by `build.rs`, so it keeps global
/// linkage): the verifier checks a global function once per program, from its arguments'
/// types alone, where a static one is checked again for every distinct state of every path
/// that reaches it. Checked as a static function, this 32-step loop was 95% of the socket
/// hooks' verification and 70% of tc's: the agent spent 7 s of its start in the verifier,
/// about 1 s with this. Plain scalars in and out, as a global function's interface must be.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn kbp_least_conn(svc_id: u32, generation: u32, count: u32, flags: u32) -> u32 {
    // Narrowed to their real ranges: the verifier then knows them too.
    let (count, generation, flags) = (count as u16 as u32, generation as u16 & 1, flags as u16);
    let has = |flag: u16| flags & flag != 0;
    // SAFETY: a helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    let weighted = has(FLAG_WEIGHTED);
    let expected = u64::from(has(FLAG_SED));
    let never_queue = has(FLAG_NEVER_QUEUE);
    let (mut best, mut best_conns, mut best_weight) = (0u32, 0u64, 1u64);
    for i in 0..LC_SCAN {
        if i >= count {
            break;
        }
        let slot = (start.wrapping_add(i) % count) as u16;
        let Some(id) = slot_backend_of(svc_id, generation, slot) else {
            continue;
        };
        let active = conns::of(id);
        if never_queue && active == 0 {
            return id;
        }
        let conns = active + expected;
        let weight = if weighted {
            // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
            unsafe { LB_BACKENDS.get(&id) }.map_or(1, |b| u64::from(b.weight.max(1)))
        } else {
            1
        };
        if best == 0 || conns * best_weight < best_conns * weight {
            (best, best_conns, best_weight) = (id, conns, weight);
        }
    }
    best
}

use crate::access::maps::{
    LB_AFFINITY, LB_BACKENDS, LB_CONFIG, LB_DGRAM_FLOWS, LB_MAGLEV, LB_MEMBERS, LB_RR, LB_SLOTS,
    dgram_flow_timeout_ns,
};

/// The backend id in `slot` of the frontend's live generation, if its chunk is there.
#[inline(always)]
fn slot_backend(svc: &ServiceValue, slot: u16) -> Option<u32> {
    slot_backend_of(svc.id, svc.generation(), slot)
}

/// The backend id in `slot` of generation `generation` of frontend `svc_id`.
#[inline(always)]
fn slot_backend_of(svc_id: u32, generation: u16, slot: u16) -> Option<u32> {
    let key = SlotKey::of_slot(svc_id, generation, slot);
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    let id = unsafe { LB_SLOTS.get(&key) }?.backend_of(slot);
    (id != 0).then_some(id)
}

/// The next turn of a round-robin frontend.
#[inline(always)]
fn next_turn(svc_id: u32) -> u32 {
    match LB_RR.get_ptr_mut(svc_id) {
        Some(cursor) => {
            // SAFETY: from the lookup; see LB_RR for the (benign) race.
            let turn = unsafe { *cursor };
            unsafe { *cursor = turn.wrapping_add(1) };
            turn
        }
        None => {
            let _ = LB_RR.insert(svc_id, 1, 0);
            0
        }
    }
}

/// A hash of the client's identity (source hashing).
#[inline(always)]
fn client_hash(client: &AffinityKey) -> u32 {
    let c = &client.client;
    let mut h = 0;
    let mut i = 0;
    while i < 16 {
        h = mix(h, u32::from_ne_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]));
        i += 4;
    }
    finish(h)
}

/// The backend id of entry `hash % M` of the frontend's Maglev table, if it has one. Not
/// inlined: the socket hooks' frames are near the verifier's 512-byte limit.
#[inline(never)]
fn maglev_pick(svc: &ServiceValue, hash: u32) -> Option<u32> {
    let size = LB_CONFIG.get(0)?.maglev_size;
    if size == 0 {
        return None;
    }
    let index = hash % size;
    let key = MaglevKey {
        svc_id: svc.id,
        generation: svc.generation(),
        chunk: (index / MAGLEV_CHUNK as u32) as u16,
    };
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    let chunk = unsafe { LB_MAGLEV.get(&key) }?;
    let id = chunk.backend_ids[(index as usize) % MAGLEV_CHUNK];
    (id != 0).then_some(id)
}

/// `select`'s `least` when the caller has no least-connection answer (the frontend is not one,
/// or its scan found nothing): a random slot then.
pub const NO_PICK: u32 = u32::MAX;

/// A chosen backend.
pub struct Choice {
    pub backend_id: u32,
    pub backend: BackendValue,
    pub reason: Reason,
}

/// Picks the backend for a new connection (or datagram) of `client` to the frontend `svc`;
/// `hash` identifies the flow (the Maglev scheduler's input, and without `SCAN` the random
/// scheduler's draw).
///
/// Errors: `NoBackends` / `NoLocalBackends` when the frontend has no slot (the caller rejects or
/// drops), `SlotMissing` / `BackendMissing` when userspace is mid-update (the caller leaves the
/// socket untouched).
#[inline(always)]
///
/// Least-connection frontends: with `SCAN` the counts are compared here (the socket hooks);
/// without, `least` is the caller's earlier `least_conn` answer (the tc path runs it in a
/// frame of its own: its frames are near the verifier's limit), `NO_PICK` for none. Without
/// `SCAN`, a `least` that names a backend (not 0, not `NO_PICK`) is taken for any frontend:
/// tc passes the socket layer's hairpin choice that way (`hairpin_choice`).
pub fn select<const SCAN: bool>(
    svc: &ServiceValue,
    client: &AffinityKey,
    hash: u32,
    least: u32,
) -> Result<Choice, Reason> {
    if svc.count == 0 {
        return Err(if svc.is_no_local() {
            Reason::NoLocalBackends
        } else {
            Reason::NoBackends
        });
    }
    // The clock is read only for affinity (reading it is a measurable part of a connect() in a
    // VM): here for the hit, again below for a new entry.
    if svc.has_affinity()
        // SAFETY: a helper without arguments.
        && let Some(choice) = affinity_hit(svc, client, unsafe { bpf_ktime_get_ns() })
    {
        return Ok(choice);
    }
    let picked = if !SCAN && least != 0 && least != NO_PICK {
        // Chosen before: a least-connection answer, or the socket layer's choice for a
        // hairpin (`hairpin_choice`).
        Some(least)
    } else if svc.has_flag(FLAG_MAGLEV) {
        maglev_pick(svc, hash)
    } else if SCAN && svc.has_flag(FLAG_LEAST_CONN) {
        Some(least_conn(svc)).filter(|id| *id != 0)
    } else {
        None
    };
    let backend_id = match picked {
        Some(id) => id,
        // Random, and the fallback of a Maglev frontend whose table is not (yet) there.
        None => {
            let draw = if svc.has_flag(FLAG_ROUND_ROBIN) {
                next_turn(svc.id)
            } else if svc.has_flag(FLAG_SOURCE_HASH) {
                client_hash(client)
            } else if SCAN {
                // SAFETY: a helper without arguments.
                unsafe { bpf_get_prandom_u32() }
            } else {
                // A packet's new flow (tc, XDP): the flow's hash, as random as its ports, and
                // the same at XDP and at tc, which both draw for a packet whose backend XDP
                // leaves to tc (one on this node): one draw per connection (semantics 4.11),
                // not a second one at tc that would favour the backends XDP forwards.
                hash
            };
            slot_backend(svc, (draw % svc.count as u32) as u16).ok_or(Reason::SlotMissing)?
        }
    };
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    let backend = *unsafe { LB_BACKENDS.get(&backend_id) }.ok_or(Reason::BackendMissing)?;
    if svc.has_affinity() {
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            // SAFETY: a helper without arguments.
            last_used_ns: unsafe { bpf_ktime_get_ns() },
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
    // A member without slots only keeps its flows (semantics 9.3): no new choice of it.
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    if unsafe { LB_MEMBERS.get(&member) }?.slots == 0 {
        return None;
    }
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    let backend = *unsafe { LB_BACKENDS.get(&backend_id) }?;
    // SAFETY: `entry` came from the lookup above; a racing write of a timestamp is benign.
    unsafe { (*entry).last_used_ns = now };
    Some(Choice {
        backend_id,
        backend,
        reason: Reason::AffinityHit,
    })
}

/// [`select`] for a datagram of an unconnected socket (sendmsg). kube-proxy's conntrack sees the
/// datagrams one socket sends to one Service address and port as one flow, balanced once
/// (semantics 4.11) and kept on its backend until it is idle for the UDP timeout or the backend
/// stops serving (9.2, 9.3); so are they here, by (socket, frontend). Session affinity and the
/// schedulers apply to the flow's first datagram only, as to a connection's first packet.
#[inline(always)]
pub fn select_datagram(
    svc: &ServiceValue,
    client: &AffinityKey,
    hash: u32,
    cookie: u64,
) -> Result<Choice, Reason> {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let kept = dgram_flow_backend(cookie, svc.id, now);
    if kept != 0 {
        // SAFETY: a map lookup whose value is used at once; an update racing it gives either
        // version.
        if let Some(backend) = unsafe { LB_BACKENDS.get(&kept) } {
            return Ok(Choice {
                backend_id: kept,
                backend: *backend,
                reason: Reason::Translated,
            });
        }
    }
    let choice = select::<true>(svc, client, hash, 0)?;
    remember_dgram_flow(cookie, svc.id, choice.backend_id, now);
    Ok(choice)
}

/// The backend id of a datagram flow (0: none), if the flow was active within the timeout and
/// the backend still serves the frontend: a member with or without slots (a member without
/// slots takes no new flows but keeps its own, semantics 9.3). Refreshes the flow's time. A
/// BPF function of its own, scalars in and out: the sendmsg hooks' frames are near the
/// verifier's 512 bytes.
#[inline(never)]
fn dgram_flow_backend(cookie: u64, svc_id: u32, now: u64) -> u32 {
    let key = DgramFlowKey {
        cookie,
        svc_id,
        _pad: 0,
    };
    let Some(entry) = LB_DGRAM_FLOWS.get_ptr_mut(&key) else {
        return 0;
    };
    // SAFETY: the pointer came from a successful lookup; only this socket's sends write the
    // entry, and a torn timestamp at worst shortens or extends the flow by one datagram.
    let (backend_id, last_used_ns) = unsafe { ((*entry).backend_id, (*entry).last_used_ns) };
    if now.wrapping_sub(last_used_ns) > dgram_flow_timeout_ns() {
        return 0;
    }
    let member = MemberKey { svc_id, backend_id };
    // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
    if unsafe { LB_MEMBERS.get(&member) }.is_none() {
        return 0;
    }
    // SAFETY: `entry` came from the lookup above.
    unsafe { (*entry).last_used_ns = now };
    backend_id
}

/// Records a datagram flow's new backend. Losing the entry (evicted) only costs the flow its
/// backend: its next datagram is balanced afresh.
#[inline(never)]
fn remember_dgram_flow(cookie: u64, svc_id: u32, backend_id: u32, now: u64) {
    let key = DgramFlowKey {
        cookie,
        svc_id,
        _pad: 0,
    };
    let value = DgramFlowValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    let _ = LB_DGRAM_FLOWS.insert(&key, &value, 0);
}

/// How long the socket layer's hairpin choice waits for the connection's first packet at tc.
const HAIRPIN_WAIT_NS: u64 = 5_000_000_000;

/// Writes the socket layer's choice of `backend_id` for a connection of the pod at `client` (its
/// address, `AffinityKey::client` form) to Service port `port_id` that lands on the pod itself:
/// the connection is left to tc, which masquerades it (semantics 7.14) and finds the choice
/// with `hairpin_choice`. Losing the entry (evicted) only costs the connection a choice of its
/// own at tc.
#[inline(always)]
pub fn remember_hairpin(port_id: u32, client: &[u8; 16], backend_id: u32) {
    let key = AffinityKey {
        port_id,
        client_kind: CLIENT_HAIRPIN,
        client: *client,
    };
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        // SAFETY: a helper without arguments.
        last_used_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = LB_AFFINITY.insert(&key, &value, 0);
}

/// The backend the socket layer chose for a new flow from `client` to Service port `port_id`
/// of frontend `svc_id`, when it left the flow to tc as a hairpin (`remember_hairpin`) within
/// the last `HAIRPIN_WAIT_NS` and the backend is still one new flows of the frontend may take
/// (a member with slots); 0 for none.
#[inline(always)]
pub fn hairpin_choice(port_id: u32, svc_id: u32, client: &[u8; 16]) -> u32 {
    let key = AffinityKey {
        port_id,
        client_kind: CLIENT_HAIRPIN,
        client: *client,
    };
    // SAFETY: a map lookup whose value is copied at once.
    let Some(hint) = (unsafe { LB_AFFINITY.get(&key) }).copied() else {
        return 0;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(hint.last_used_ns) > HAIRPIN_WAIT_NS {
        return 0;
    }
    let member = MemberKey {
        svc_id,
        backend_id: hint.backend_id,
    };
    // A member without slots takes no new flows (semantics 9.3); the hairpin's own later
    // packets follow its conntrack entry.
    // SAFETY: a map lookup whose value is copied at once.
    if unsafe { LB_MEMBERS.get(&member) }.is_none_or(|m| m.slots == 0) {
        return 0;
    }
    hint.backend_id
}
