//! Versioned map layouts, and what an upgrade does with maps an older agent pinned.
//!
//! Every pinned map has a layout version: 1 for the layout it had when versions began (the
//! release of 2026-12-01, commit fb623f8), one more for every change since. The agent records
//! the versions it pinned in the `LB_VERSIONS` map (map name → version; `bpftool map dump`
//! shows them). At start-up each pinned map is classified (pure: [`classify`]):
//! - the layout of this build: reused as it is;
//! - an older version this build knows, with a migration for every step to the current one:
//!   kept open while its pin gets a map of the current layout, and its entries carried over:
//!   the slots before the new programs are attached (they read only the new layout), the
//!   counters once the new programs run (an agent killed in between loses them);
//! - anything else (a layout from before versions began, or from a newer build after a
//!   rollback): replaced, its entries lost, as the log says.
//!
//! A pinned map's recorded version is trusted only if its shape (type, key and value size,
//! and entries where this build does not size the map) is that version's: an older agent
//! that replaced a map after a rollback leaves a stale record, and the shape then decides.

use std::{collections::BTreeMap, fmt};

use proxy_common::{
    maps as names,
    service::{SLOT_CHUNK, SlotChunk, SlotKey},
};

/// What identifies a layout on a pinned map: the kernel's view of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key: u32,
    pub value: u32,
    /// Capacity, where it is part of the layout (arrays indexed by a fixed enumeration); `None`
    /// where the agent sizes the map by flag or node memory.
    pub entries: Option<u32>,
}

impl Shape {
    /// What differs from `now`, in words ("value size 32 -> 40").
    pub fn changes_to(&self, now: &Shape) -> Vec<String> {
        let mut changed = Vec::new();
        if self.map_type != now.map_type {
            changed.push(format!("type {} -> {}", self.map_type, now.map_type));
        }
        for (what, pinned, now) in [
            ("key size", self.key, now.key),
            ("value size", self.value, now.value),
        ] {
            if pinned != now {
                changed.push(format!("{what} {pinned} -> {now}"));
            }
        }
        if let (Some(pinned), Some(now)) = (self.entries, now.entries)
            && pinned != now
        {
            changed.push(format!("entries {pinned} -> {now}"));
        }
        changed
    }
}

/// How the entries of one layout version become entries of the next.
#[derive(Clone, Copy)]
pub enum Migration {
    /// Per-CPU `u64` counters of an array: the counter at index `i` is added to the new map's
    /// counter at `remap(i)` (none: dropped).
    Counters(fn(u32) -> Option<u32>),
    /// `LB_SLOTS` from one entry per slot (`SlotKeyV1` → backend id) to one per
    /// `SLOT_CHUNK` slots ([`chunk_slots`]). Carried over before the new programs are
    /// attached: they read only chunks, and connections go on being balanced meanwhile.
    SlotChunks,
}

impl fmt::Debug for Migration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Migration::Counters(_) => f.write_str("Counters"),
            Migration::SlotChunks => f.write_str("SlotChunks"),
        }
    }
}

/// An older layout of a map and the step from it to the next version.
#[derive(Clone, Copy, Debug)]
pub struct Older {
    pub version: u32,
    /// Type, key and value size are the current layout's unless given here.
    pub key: Option<u32>,
    pub value: Option<u32>,
    pub entries: Option<u32>,
    pub to_next: Migration,
}

/// `Reason` values before the per-packet opt-out added `per_packet` (version 1 of the counters).
const REASONS_V1: u32 = 35;
/// `Reason` values before `dsr_too_big` (version 2 of the counters).
const REASONS_V2: u32 = 36;
/// `Reason` values before `snat_port_reused` (version 3 of the counters).
const REASONS_V3: u32 = 37;
/// `Reason` values before `frag_needed` (version 4 of the counters).
const REASONS_V4: u32 = 38;
/// `Reason` values before `service_ip_unallocated` (version 5 of the counters, 6 of the drop
/// counters).
const REASONS_V5: u32 = 39;
/// `Hook` values before `tc_egress` (versions 1 to 5 of the drop counters).
const HOOKS_V5: u32 = 4;
/// `Hook` values since (version 6 of the drop counters).
const HOOKS_V6: u32 = 5;

/// The layout history of the maps that changed since versions began, oldest first. A map not
/// listed is at version 1. When a change to a map's layout is made, its old layout goes here
/// with the migration to the new one, and the migration gets a unit test below.
pub fn history(map: &str) -> &'static [Older] {
    match map {
        // One counter per `Reason`; `per_packet` (35), `dsr_too_big` (36),
        // `snat_port_reused` (37), `frag_needed` (38), then `service_ip_unallocated` (39) were
        // appended.
        names::LB_STATS => &[
            Older {
                version: 1,
                key: None,
                value: None,
                entries: Some(REASONS_V1),
                to_next: Migration::Counters(same_index),
            },
            Older {
                version: 2,
                key: None,
                value: None,
                entries: Some(REASONS_V2),
                to_next: Migration::Counters(same_index),
            },
            Older {
                version: 3,
                key: None,
                value: None,
                entries: Some(REASONS_V3),
                to_next: Migration::Counters(same_index),
            },
            Older {
                version: 4,
                key: None,
                value: None,
                entries: Some(REASONS_V4),
                to_next: Migration::Counters(same_index),
            },
            Older {
                version: 5,
                key: None,
                value: None,
                entries: Some(REASONS_V5),
                to_next: Migration::Counters(same_index),
            },
        ],
        // One counter per hook and reason, at hook * reasons + reason: appending a reason
        // moves every hook's counters after the first; appending a hook moves none.
        names::LB_DROPS => &[
            Older {
                version: 1,
                key: None,
                value: None,
                entries: Some(HOOKS_V5 * REASONS_V1),
                to_next: Migration::Counters(drops_v1_to_v2),
            },
            Older {
                version: 2,
                key: None,
                value: None,
                entries: Some(HOOKS_V5 * REASONS_V2),
                to_next: Migration::Counters(drops_v2_to_v3),
            },
            Older {
                version: 3,
                key: None,
                value: None,
                entries: Some(HOOKS_V5 * REASONS_V3),
                to_next: Migration::Counters(drops_v3_to_v4),
            },
            Older {
                version: 4,
                key: None,
                value: None,
                entries: Some(HOOKS_V5 * REASONS_V4),
                to_next: Migration::Counters(drops_v4_to_v5),
            },
            // `tc_egress` appended as the last hook: every counter keeps its index.
            Older {
                version: 5,
                key: None,
                value: None,
                entries: Some(HOOKS_V5 * REASONS_V5),
                to_next: Migration::Counters(same_index),
            },
            Older {
                version: 6,
                key: None,
                value: None,
                entries: Some(HOOKS_V6 * REASONS_V5),
                to_next: Migration::Counters(drops_v6_to_v7),
            },
        ],
        // One entry per slot (value: a backend id), then one per `SLOT_CHUNK` slots.
        names::LB_SLOTS => &[Older {
            version: 1,
            key: None,
            value: Some(4),
            entries: None,
            to_next: Migration::SlotChunks,
        }],
        _ => &[],
    }
}

fn same_index(i: u32) -> Option<u32> {
    Some(i)
}

/// A drop counter's index in a layout of `from` reasons per hook, in one of `to`.
fn drops_moved(i: u32, from: u32, to: u32) -> Option<u32> {
    let (hook, reason) = (i / from, i % from);
    (hook < HOOKS_V5).then_some(hook * to + reason)
}

fn drops_v1_to_v2(i: u32) -> Option<u32> {
    drops_moved(i, REASONS_V1, REASONS_V2)
}

fn drops_v2_to_v3(i: u32) -> Option<u32> {
    drops_moved(i, REASONS_V2, REASONS_V3)
}

fn drops_v3_to_v4(i: u32) -> Option<u32> {
    drops_moved(i, REASONS_V3, REASONS_V4)
}

fn drops_v4_to_v5(i: u32) -> Option<u32> {
    drops_moved(i, REASONS_V4, REASONS_V5)
}

fn drops_v6_to_v7(i: u32) -> Option<u32> {
    let (from, to) = (REASONS_V5, proxy_common::reason::REASON_COUNT);
    let (hook, reason) = (i / from, i % from);
    (hook < HOOKS_V6).then_some(hook * to + reason)
}

/// This build's layout version of `map`.
pub fn current_version(map: &str) -> u32 {
    history(map).len() as u32 + 1
}

/// What to do with one pinned map.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Its layout is this build's: reuse it.
    Reuse,
    /// Version `from`, which this build migrates: `steps` in order, oldest first.
    Migrate { from: u32, steps: Vec<Step> },
    /// A layout this build does not know: replace it, entries lost; `why` lists what differs.
    Replace { why: String },
}

/// One migration step, from `from` to `from + 1`.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub from: u32,
    pub migration: Migration,
}

impl PartialEq for Step {
    fn eq(&self, other: &Step) -> bool {
        self.from == other.from
    }
}

/// The shape of version `version` of `map`, given the current shape.
fn shape_of(map: &str, version: u32, current: &Shape) -> Option<Shape> {
    if version == current_version(map) {
        return Some(*current);
    }
    let older = history(map).iter().find(|o| o.version == version)?;
    Some(Shape {
        map_type: current.map_type,
        key: older.key.unwrap_or(current.key),
        value: older.value.unwrap_or(current.value),
        entries: older.entries.or(current.entries),
    })
}

/// Decides what to do with the pinned `map` of shape `pinned` (its `entries` only where this
/// build fixes them), recorded in `LB_VERSIONS` as `recorded`, when this build's shape is
/// `current`.
pub fn classify(map: &str, pinned: &Shape, recorded: Option<u32>, current: &Shape) -> Plan {
    let now = current_version(map);
    // The recorded version, if the pinned map has its shape; else the newest version whose
    // shape it has.
    let version = recorded
        .filter(|&v| shape_of(map, v, current).as_ref() == Some(pinned))
        .or_else(|| {
            (1..=now)
                .rev()
                .find(|&v| shape_of(map, v, current).as_ref() == Some(pinned))
        });
    match version {
        Some(v) if v == now => Plan::Reuse,
        Some(v) if v < now => Plan::Migrate {
            from: v,
            steps: history(map)
                .iter()
                .filter(|o| o.version >= v)
                .map(|o| Step {
                    from: o.version,
                    migration: o.to_next,
                })
                .collect(),
        },
        _ => Plan::Replace {
            why: pinned.changes_to(current).join(", "),
        },
    }
}

/// Where a counter at `index` of version `from` ends up after `steps`.
pub fn remap_counter(steps: &[Step], index: u32) -> Option<u32> {
    steps
        .iter()
        .try_fold(index, |i, step| match step.migration {
            Migration::Counters(remap) => remap(i),
            Migration::SlotChunks => None,
        })
}

/// Key of `LB_SLOTS` at layout version 1: one slot.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SlotKeyV1 {
    pub svc_id: u32,
    pub generation: u16,
    pub slot: u16,
}

// SAFETY: repr(C), Copy, integer fields only, no padding (4 + 2 + 2 bytes).
unsafe impl aya::Pod for SlotKeyV1 {}

/// The `LB_SLOTS` entries of the current layout holding `slots` (version 1 entries: a slot and
/// its backend id): each slot's backend id at its place in its chunk, 0 where no slot was.
pub fn chunk_slots(
    slots: impl IntoIterator<Item = (SlotKeyV1, u32)>,
) -> BTreeMap<SlotKey, SlotChunk> {
    let mut chunks = BTreeMap::new();
    for (k, backend_id) in slots {
        let key = SlotKey::of_slot(k.svc_id, k.generation, k.slot);
        let chunk = chunks.entry(key).or_insert(SlotChunk {
            backend_ids: [0; SLOT_CHUNK],
        });
        chunk.backend_ids[k.slot as usize % SLOT_CHUNK] = backend_id;
    }
    chunks
}

/// Key of `LB_VERSIONS`: the map's name, NUL-padded.
pub fn version_key(map: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    let n = map.len().min(15);
    key[..n].copy_from_slice(&map.as_bytes()[..n]);
    key
}

#[cfg(test)]
mod tests {
    use proxy_common::reason::{Hook, REASON_COUNT, Reason};

    use super::*;

    const PERCPU_ARRAY: u32 = 6;
    const LRU_HASH: u32 = 9;

    fn counters(entries: u32) -> Shape {
        Shape {
            map_type: PERCPU_ARRAY,
            key: 4,
            value: 8,
            entries: Some(entries),
        }
    }

    #[test]
    fn every_map_names_its_current_version() {
        for map in names::ALL {
            assert!(current_version(map) >= 1);
            for (i, o) in history(map).iter().enumerate() {
                assert_eq!(
                    o.version,
                    i as u32 + 1,
                    "{map}: versions count from 1 in order"
                );
            }
            assert!(version_key(map).ends_with(&[0]), "{map}: name fits the key");
        }
        assert_eq!(current_version(names::LB_CT4), 1);
        assert_eq!(current_version(names::LB_DROPS), 7);
        assert_eq!(current_version(names::LB_STATS), 6);
        assert_eq!(current_version(names::LB_SLOTS), 2);
    }

    #[test]
    fn the_current_layout_is_reused_whatever_the_record_says() {
        let now = counters(REASON_COUNT);
        for recorded in [None, Some(1), Some(2), Some(7)] {
            assert_eq!(
                classify(names::LB_STATS, &now, recorded, &now),
                Plan::Reuse,
                "{recorded:?}"
            );
        }
    }

    #[test]
    fn counters_of_the_first_version_are_migrated() {
        let now = counters(DROPS);
        let plan = classify(names::LB_DROPS, &counters(HOOKS_V5 * 35), None, &now);
        let Plan::Migrate { from: 1, steps } = plan else {
            panic!("{plan:?}")
        };
        // Each hook's counters keep their reason: the xdp hook's no_backends, say.
        for hook in Hook::ALL.into_iter().filter(|h| (*h as u32) < HOOKS_V5) {
            for reason in Reason::ALL.iter().filter(|r| (**r as u32) < 35) {
                assert_eq!(
                    remap_counter(&steps, hook as u32 * 35 + *reason as u32),
                    Some(hook.drop_index(*reason)),
                    "{hook:?} {reason:?}"
                );
            }
        }
        assert_eq!(remap_counter(&steps, HOOKS_V5 * 35), None);
        let stats = classify(
            names::LB_STATS,
            &counters(35),
            Some(1),
            &counters(REASON_COUNT),
        );
        let Plan::Migrate { from: 1, steps } = stats else {
            panic!("{stats:?}")
        };
        assert_eq!(remap_counter(&steps, 34), Some(34));
    }

    #[test]
    fn counters_of_the_second_version_are_migrated() {
        let now = counters(DROPS);
        let plan = classify(names::LB_DROPS, &counters(HOOKS_V5 * 36), Some(2), &now);
        let Plan::Migrate { from: 2, steps } = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(steps.len(), 5);
        for hook in Hook::ALL.into_iter().filter(|h| (*h as u32) < HOOKS_V5) {
            for reason in Reason::ALL.iter().filter(|r| (**r as u32) < 36) {
                assert_eq!(
                    remap_counter(&steps, hook as u32 * 36 + *reason as u32),
                    Some(hook.drop_index(*reason)),
                    "{hook:?} {reason:?}"
                );
            }
        }
        let stats = classify(
            names::LB_STATS,
            &counters(36),
            None,
            &counters(REASON_COUNT),
        );
        assert!(matches!(stats, Plan::Migrate { from: 2, .. }), "{stats:?}");
    }

    #[test]
    fn counters_of_the_third_version_are_migrated() {
        let now = counters(DROPS);
        let plan = classify(names::LB_DROPS, &counters(HOOKS_V5 * 37), Some(3), &now);
        let Plan::Migrate { from: 3, steps } = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(steps.len(), 4);
        for hook in Hook::ALL.into_iter().filter(|h| (*h as u32) < HOOKS_V5) {
            for reason in Reason::ALL.iter().filter(|r| (**r as u32) < 37) {
                assert_eq!(
                    remap_counter(&steps, hook as u32 * 37 + *reason as u32),
                    Some(hook.drop_index(*reason)),
                    "{hook:?} {reason:?}"
                );
            }
        }
        let stats = classify(
            names::LB_STATS,
            &counters(37),
            None,
            &counters(REASON_COUNT),
        );
        assert!(matches!(stats, Plan::Migrate { from: 3, .. }), "{stats:?}");
    }

    #[test]
    fn counters_of_the_fourth_version_are_migrated() {
        let now = counters(DROPS);
        let plan = classify(names::LB_DROPS, &counters(HOOKS_V5 * 38), Some(4), &now);
        let Plan::Migrate { from: 4, steps } = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(steps.len(), 3);
        for hook in Hook::ALL.into_iter().filter(|h| (*h as u32) < HOOKS_V5) {
            for reason in Reason::ALL.iter().filter(|r| (**r as u32) < 38) {
                assert_eq!(
                    remap_counter(&steps, hook as u32 * 38 + *reason as u32),
                    Some(hook.drop_index(*reason)),
                    "{hook:?} {reason:?}"
                );
            }
        }
        let stats = classify(
            names::LB_STATS,
            &counters(38),
            None,
            &counters(REASON_COUNT),
        );
        assert!(matches!(stats, Plan::Migrate { from: 4, .. }), "{stats:?}");
    }

    #[test]
    fn drop_counters_of_the_fifth_version_gain_the_tc_egress_hook() {
        let now = counters(DROPS);
        let before = counters(HOOKS_V5 * REASONS_V5);
        let plan = classify(names::LB_DROPS, &before, Some(5), &now);
        let Plan::Migrate { from: 5, steps } = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(steps.len(), 2);
        // Every hook of version 5 keeps each counter's reason; tc_egress starts at 0.
        for hook in Hook::ALL.into_iter().filter(|h| *h != Hook::TcEgress) {
            for reason in Reason::ALL.iter().filter(|r| (**r as u32) < REASONS_V5) {
                assert_eq!(
                    remap_counter(&steps, hook as u32 * REASONS_V5 + *reason as u32),
                    Some(hook.drop_index(*reason)),
                    "{hook:?} {reason:?}"
                );
            }
        }
        // The record may be missing (a map pinned before LB_VERSIONS): the shape says 5.
        assert!(matches!(
            classify(names::LB_DROPS, &before, None, &now),
            Plan::Migrate { from: 5, .. }
        ));
    }

    #[test]
    fn counters_of_the_version_before_service_ip_unallocated_are_migrated() {
        let now = counters(DROPS);
        let before = counters(HOOKS_V6 * REASONS_V5);
        let plan = classify(names::LB_DROPS, &before, Some(6), &now);
        let Plan::Migrate { from: 6, steps } = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(steps.len(), 1);
        for hook in Hook::ALL {
            for reason in Reason::ALL.iter().filter(|r| (**r as u32) < REASONS_V5) {
                assert_eq!(
                    remap_counter(&steps, hook as u32 * REASONS_V5 + *reason as u32),
                    Some(hook.drop_index(*reason)),
                    "{hook:?} {reason:?}"
                );
            }
        }
        let stats = classify(
            names::LB_STATS,
            &counters(REASONS_V5),
            Some(5),
            &counters(REASON_COUNT),
        );
        let Plan::Migrate { from: 5, steps } = stats else {
            panic!("{stats:?}")
        };
        assert_eq!(remap_counter(&steps, 38), Some(38));
    }

    const DROPS: u32 = proxy_common::reason::DROPS_COUNT;

    #[test]
    fn slots_of_the_first_version_are_migrated_into_chunks() {
        let now = Shape {
            map_type: 1,
            key: 8,
            value: 64,
            entries: None,
        };
        let plan = classify(names::LB_SLOTS, &Shape { value: 4, ..now }, None, &now);
        let Plan::Migrate { from: 1, steps } = plan else {
            panic!("{plan:?}")
        };
        assert!(matches!(
            steps[..],
            [Step {
                from: 1,
                migration: Migration::SlotChunks
            }]
        ));
        assert_eq!(classify(names::LB_SLOTS, &now, Some(2), &now), Plan::Reuse);
        // Frontend 7 with 18 slots in generation 1 (two chunks), frontend 9 with 2 in
        // generation 0; one slot of frontend 7 is missing (an interrupted write).
        let old = (0..18u16)
            .filter(|slot| *slot != 5)
            .map(|slot| {
                (
                    SlotKeyV1 {
                        svc_id: 7,
                        generation: 1,
                        slot,
                    },
                    100 + u32::from(slot),
                )
            })
            .chain((0..2u16).map(|slot| {
                (
                    SlotKeyV1 {
                        svc_id: 9,
                        generation: 0,
                        slot,
                    },
                    3,
                )
            }));
        let chunks = chunk_slots(old);
        assert_eq!(chunks.len(), 3);
        let first = chunks[&SlotKey {
            svc_id: 7,
            generation: 1,
            chunk: 0,
        }];
        assert_eq!(first.backend_of(0), 100);
        assert_eq!(first.backend_of(5), 0);
        assert_eq!(first.backend_of(15), 115);
        let second = chunks[&SlotKey {
            svc_id: 7,
            generation: 1,
            chunk: 1,
        }];
        assert_eq!(second.backend_ids[..3], [116, 117, 0]);
        let other = chunks[&SlotKey {
            svc_id: 9,
            generation: 0,
            chunk: 0,
        }];
        assert_eq!(other.backend_ids[..3], [3, 3, 0]);
    }

    #[test]
    fn unknown_layouts_are_replaced_with_what_differs() {
        let ct = Shape {
            map_type: LRU_HASH,
            key: 16,
            value: 40,
            entries: None,
        };
        let old = Shape { value: 32, ..ct };
        assert_eq!(
            classify(names::LB_CT4, &old, None, &ct),
            Plan::Replace {
                why: "value size 32 -> 40".into()
            }
        );
        // Counters from before versions began (24 reasons), or from a newer build.
        for entries in [24, REASON_COUNT + 1] {
            assert!(matches!(
                classify(
                    names::LB_STATS,
                    &counters(entries),
                    None,
                    &counters(REASON_COUNT)
                ),
                Plan::Replace { .. }
            ));
        }
    }

    #[test]
    fn a_stale_record_after_a_rollback_yields_to_the_shape() {
        // A newer agent recorded version 2; the older one it was rolled back to replaced the
        // map with its own layout (version 1): the shape says version 1.
        let plan = classify(
            names::LB_STATS,
            &counters(35),
            Some(2),
            &counters(REASON_COUNT),
        );
        assert!(matches!(plan, Plan::Migrate { from: 1, .. }), "{plan:?}");
    }
}
