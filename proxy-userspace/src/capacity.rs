//! PURE: keeps the desired state within the maps' capacities. Service ports that do not fit are
//! refused whole (a `Problem` naming the full map), Service ports already programmed are kept
//! first, so a full map never costs a working Service its entries; refused ones get in once
//! space frees.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    compile::{
        Desired, FrontendAddr, FrontendKind, PortName, Problem, ProblemReason, Scheduler, Totals,
        slot_chunks,
    },
    plan::{MapState, ServiceKey, SourceRange},
};

/// Capacity (max_entries) of each map the agent writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services4: u64,
    pub services6: u64,
    /// `LB_SLOTS` entries (`SLOT_CHUNK` slots each).
    pub slot_chunks: u64,
    pub members: u64,
    pub backends: u64,
    pub infos: u64,
    /// `LB_MAGLEV` chunks (`MAGLEV_CHUNK` table entries each).
    pub maglev: u64,
    /// `LB4_SRC_RANGES`, `LB6_SRC_RANGES`.
    pub src_ranges: [u64; 2],
}

/// The source-range entries the maps hold now, [IPv4, IPv6].
fn ranges_now(current: &MapState) -> [u64; 2] {
    crate::compile::count_by_family(current.source_ranges.iter().map(|r| &r.cidr))
}

/// The ServiceCIDR ranges `desired` wants in the source-range maps, [IPv4, IPv6].
fn service_cidr_entries(desired: &Desired) -> [u64; 2] {
    crate::compile::count_by_family(&desired.service_cidrs)
}

/// Whether the source-range maps surely have room: every wanted entry counted as new beside
/// every entry they hold now (a plan adds ranges before it deletes unwanted ones). O(entries
/// held), which is small next to the frontends: ranges are per load balancer IP.
pub fn ranges_surely_fit(
    totals: &Totals,
    desired: &Desired,
    current: &MapState,
    cap: &Capacity,
) -> bool {
    let now = ranges_now(current);
    let cidrs = service_cidr_entries(desired);
    (0..2).all(|f| totals.source_ranges[f] + cidrs[f] + now[f] <= cap.src_ranges[f])
}

/// Chunks of one Maglev table of `size` entries.
pub fn maglev_chunks(size: u32) -> u64 {
    u64::from(size).div_ceil(proxy_common::maglev::MAGLEV_CHUNK as u64)
}

/// What the admitted Service ports use so far.
#[derive(Default)]
struct Usage {
    services4: BTreeSet<ServiceKey>,
    services6: BTreeSet<ServiceKey>,
    frontends: u64,
    /// Slot chunks, and those of the frontend with the most.
    chunks: u64,
    largest: u64,
    members: u64,
    largest_members: u64,
    backends: BTreeSet<(IpAddr, u16, u8)>,
    /// Admitted backends that are already in the map.
    reused: u64,
    /// Maglev chunks.
    maglev: u64,
    /// Source-range entries, [IPv4, IPv6], and those of them the maps hold already.
    ranges: [u64; 2],
    ranges_reused: [u64; 2],
}

/// What one Service port would add to `Usage`.
#[derive(Default)]
struct Addition {
    services4: BTreeSet<ServiceKey>,
    services6: BTreeSet<ServiceKey>,
    frontends: u64,
    chunks: u64,
    largest: u64,
    members: u64,
    largest_members: u64,
    backends: BTreeSet<(IpAddr, u16, u8)>,
    maglev: u64,
    ranges: [u64; 2],
    ranges_reused: [u64; 2],
}

/// A cheap upper bound of every map's use (each frontend with its own marker, every backend
/// counted as new, one frontend mid-update holding two generations): when even that fits,
/// nothing needs refusing. O(1): `totals` are kept by the compiler as frontends change.
pub fn surely_fits(totals: &Totals, maglev_size: u32, backends_now: u64, cap: &Capacity) -> bool {
    let table = maglev_chunks(maglev_size);
    2 * totals.frontends <= cap.services4.min(cap.services6)
        && totals.frontends <= cap.infos
        && totals.slot_chunks + slot_chunks(totals.largest_slots()) <= cap.slot_chunks
        && totals.members + totals.largest_members() <= cap.members
        && totals.members + backends_now <= cap.backends
        && (totals.maglev_frontends + 1) * table <= cap.maglev
}

/// For an incremental sync that follows one which programmed every frontend: whether the maps
/// as they are can take the changed frontends' entries counted as if every one were new (each
/// changed frontend holding its old and its new generation at once, every backend new). Exact
/// enough for a large cluster near a map's size, where `surely_fits` (which counts the whole
/// cluster as new) says no; O(changed frontends + frontends in the maps).
pub fn changes_fit(
    desired: &Desired,
    changed: &BTreeSet<FrontendAddr>,
    current: &MapState,
    cap: &Capacity,
) -> bool {
    let table = maglev_chunks(desired.maglev_size);
    let (mut services4, mut services6, mut infos) = (0u64, 0u64, 0u64);
    let (mut chunks, mut members, mut maglev) = (0u64, 0u64, 0u64);
    let mut ranges = service_cidr_entries(desired);
    for f in changed {
        let Some(state) = desired.frontends.get(f) else {
            continue;
        };
        let r = crate::compile::source_range_entries(state);
        ranges[0] += r[0];
        ranges[1] += r[1];
        let keys = 1 + u64::from(state.kind == FrontendKind::ClusterIp);
        match ServiceKey::of(f) {
            ServiceKey::V4(_) => services4 += keys,
            ServiceKey::V6(_) => services6 += keys,
        }
        infos += 1;
        chunks += slot_chunks(crate::compile::slot_count(state));
        members += (state.backends.len() + state.keep_flows.len()) as u64;
        if state.scheduler == Scheduler::Maglev && !state.backends.is_empty() {
            maglev += table;
        }
    }
    let v4_now = current
        .services
        .keys()
        .filter(|k| matches!(k, ServiceKey::V4(_)))
        .count() as u64;
    let v6_now = current.services.len() as u64 - v4_now;
    let held = |n: usize| n as u64;
    let ranges_held = ranges_now(current);
    (0..2).all(|f| ranges_held[f] + ranges[f] <= cap.src_ranges[f])
        && v4_now + services4 <= cap.services4
        && v6_now + services6 <= cap.services6
        && held(current.infos.len()) + infos <= cap.infos
        && held(current.slots.len()) + chunks <= cap.slot_chunks
        && held(current.members.len()) + members <= cap.members
        && held(current.backends.len()) + members <= cap.backends
        && held(current.maglev.len()) + maglev <= cap.maglev
}

/// The Service ports that would overflow a map, each with why, without changing `desired`
/// (`refuse` removes them). Runs in O(n log n) over frontends and backends.
pub fn refusals(desired: &Desired, current: &MapState, cap: &Capacity) -> Vec<(PortName, String)> {
    let table = maglev_chunks(desired.maglev_size);
    let mut by_port: BTreeMap<PortName, Vec<FrontendAddr>> = BTreeMap::new();
    for (frontend, state) in &desired.frontends {
        by_port
            .entry(state.port.clone())
            .or_default()
            .push(*frontend);
    }
    let programmed = |frontends: &Vec<FrontendAddr>| {
        frontends
            .iter()
            .any(|f| current.services.contains_key(&ServiceKey::of(f)))
    };
    let mut order: Vec<(&PortName, &Vec<FrontendAddr>)> = by_port.iter().collect();
    order.sort_by_key(|(name, frontends)| (!programmed(frontends), (*name).clone()));

    // Backends already in the map stay there until the end of a sync.
    let current_backends: BTreeSet<(IpAddr, u16, u8)> = current
        .backends
        .values()
        .map(|v| {
            let addr = if v.family == proxy_common::backend::FAMILY_V4 {
                IpAddr::from(v.addr4())
            } else {
                IpAddr::from(v.addr)
            };
            (addr, v.port, v.proto)
        })
        .collect();
    let current_count = current_backends.len() as u64;
    // Source ranges the maps hold (ServiceCIDRs' among them), and the ServiceCIDRs' wanted:
    // a plan adds ranges before it deletes unwanted ones.
    let ranges_held = ranges_now(current);
    let cidrs_wanted = service_cidr_entries(desired);

    let mut usage = Usage::default();
    let mut refused: Vec<(PortName, String)> = Vec::new();
    for (name, frontends) in order {
        let mut add = Addition::default();
        for f in frontends {
            let state = &desired.frontends[f];
            let key = ServiceKey::of(f);
            let (set, used) = match key {
                ServiceKey::V4(_) => (&mut add.services4, &usage.services4),
                ServiceKey::V6(_) => (&mut add.services6, &usage.services6),
            };
            for k in [
                Some(key),
                (state.kind == FrontendKind::ClusterIp).then(|| ServiceKey::any_port(f.addr)),
            ]
            .into_iter()
            .flatten()
            {
                if !used.contains(&k) {
                    set.insert(k);
                }
            }
            add.frontends += 1;
            let chunks = slot_chunks(crate::compile::slot_count(state));
            add.chunks += chunks;
            add.largest = add.largest.max(chunks);
            if state.scheduler == Scheduler::Maglev && !state.backends.is_empty() {
                add.maglev += table;
            }
            let members = (state.backends.len() + state.keep_flows.len()) as u64;
            add.members += members;
            add.largest_members = add.largest_members.max(members);
            // A programmed frontend keeps its id, so its ranges that stay are no new entries.
            let id = current.services.get(&key).map(|v| v.id);
            for cidr in &state.source_ranges {
                let family = usize::from(cidr.addr.is_ipv6());
                add.ranges[family] += 1;
                if id.is_some_and(|svc_id| {
                    current.source_ranges.contains(&SourceRange {
                        svc_id,
                        cidr: *cidr,
                    })
                }) {
                    add.ranges_reused[family] += 1;
                }
            }
            for b in &state.backends {
                let k = (b.addr, b.port, b.proto.number());
                if !usage.backends.contains(&k) {
                    add.backends.insert(k);
                }
            }
        }
        let reused = usage.reused
            + add
                .backends
                .iter()
                .filter(|k| current_backends.contains(*k))
                .count() as u64;
        let admitted_backends = usage.backends.len() as u64 + add.backends.len() as u64;
        let checks = [
            (
                "LB4_SERVICES",
                (usage.services4.len() + add.services4.len()) as u64,
                cap.services4,
            ),
            (
                "LB6_SERVICES",
                (usage.services6.len() + add.services6.len()) as u64,
                cap.services6,
            ),
            ("LB_SVC_INFO", usage.frontends + add.frontends, cap.infos),
            // One frontend at a time holds two generations while it is updated.
            (
                "LB_SLOTS",
                usage.chunks + add.chunks + usage.largest.max(add.largest),
                cap.slot_chunks,
            ),
            (
                "LB_MEMBERS",
                usage.members + add.members + usage.largest_members.max(add.largest_members),
                cap.members,
            ),
            // One table mid-update has both generations.
            ("LB_MAGLEV", usage.maglev + add.maglev + table, cap.maglev),
            // New backends are added before unused ones are removed.
            (
                "LB_BACKENDS",
                admitted_backends + (current_count - reused),
                cap.backends,
            ),
            // So are ranges.
            (
                "LB4_SRC_RANGES",
                range_need(&usage, &add, 0, ranges_held, cidrs_wanted),
                cap.src_ranges[0],
            ),
            (
                "LB6_SRC_RANGES",
                range_need(&usage, &add, 1, ranges_held, cidrs_wanted),
                cap.src_ranges[1],
            ),
        ];
        match checks.into_iter().find(|(_, need, cap)| need > cap) {
            None => {
                usage.services4.extend(add.services4);
                usage.services6.extend(add.services6);
                usage.frontends += add.frontends;
                usage.chunks += add.chunks;
                usage.largest = usage.largest.max(add.largest);
                usage.members += add.members;
                usage.largest_members = usage.largest_members.max(add.largest_members);
                usage.maglev += add.maglev;
                usage.backends.extend(add.backends);
                usage.reused = reused;
                for f in 0..2 {
                    usage.ranges[f] += add.ranges[f];
                    usage.ranges_reused[f] += add.ranges_reused[f];
                }
            }
            Some((map, need, capacity)) if programmed(frontends) => refused.push((
                name.clone(),
                format!(
                    "not updated: map {map} is full (would need {need} of {capacity} entries); \
                     it keeps its previous state"
                ),
            )),
            Some((map, need, capacity)) => refused.push((
                name.clone(),
                format!(
                    "not programmed: map {map} is full (would need {need} of {capacity} entries)"
                ),
            )),
        }
    }
    refused
}

/// Source-range entries of family `f` with `add` admitted beside `usage`: the admitted
/// ranges and ServiceCIDRs, plus the entries held now that they do not reuse (held until the
/// plan's deletions). ServiceCIDR entries held are counted as not reused: a bound.
fn range_need(usage: &Usage, add: &Addition, f: usize, held: [u64; 2], cidrs: [u64; 2]) -> u64 {
    let reused = usage.ranges_reused[f] + add.ranges_reused[f];
    usage.ranges[f] + add.ranges[f] + cidrs[f] + held[f].saturating_sub(reused)
}

/// The frontends of `refused` Service ports that the maps hold now: a programmed port that no
/// longer fits (it grew, or others grew first) keeps these as they are, so a full map never
/// takes a working Service's entries away. `desired` is the state before `refuse`.
pub fn kept_frontends(
    desired: &Desired,
    refused: &[(PortName, String)],
    current: &MapState,
) -> BTreeSet<FrontendAddr> {
    let refused_names: BTreeSet<&PortName> = refused.iter().map(|(n, _)| n).collect();
    desired
        .frontends
        .iter()
        .filter(|(f, state)| {
            refused_names.contains(&state.port) && current.services.contains_key(&ServiceKey::of(f))
        })
        .map(|(f, _)| *f)
        .collect()
}

/// Removes the `refused` Service ports (`refusals`) from `desired`, each with its problem.
pub fn refuse(desired: &mut Desired, refused: &[(PortName, String)]) {
    if refused.is_empty() {
        return;
    }
    let refused_names: BTreeSet<&PortName> = refused.iter().map(|(n, _)| n).collect();
    desired
        .frontends
        .retain(|_, state| !refused_names.contains(&state.port));
    for (name, message) in refused {
        desired.problems.push(Problem {
            reason: ProblemReason::Capacity,
            object: format!("Service {}/{} port {name}", name.namespace, name.name),
            message: message.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        compile::{Backend, Family, FrontendState, Proto},
        plan::plan,
    };

    /// Removes from `desired` the Service ports that would overflow a map; records why.
    fn fit(desired: &mut Desired, current: &MapState, cap: &Capacity) {
        let refused = refusals(desired, current, cap);
        refuse(desired, &refused);
    }

    fn desired(n: usize, backends_each: usize) -> Desired {
        let mut d = Desired::default();
        for i in 0..n {
            let port = PortName {
                namespace: "default".into(),
                name: format!("svc-{i:03}"),
                port: String::new(),
                proto: Proto::Tcp,
                family: Family::V4,
            };
            d.frontends.insert(
                FrontendAddr {
                    addr: format!("10.96.0.{}", i + 1).parse().unwrap(),
                    port: 80,
                    proto: Proto::Tcp,
                    scope: Default::default(),
                },
                FrontendState {
                    port,
                    kind: FrontendKind::ClusterIp,
                    backends: (0..backends_each)
                        .map(|b| Backend {
                            addr: format!("10.244.{i}.{}", b + 2).parse().unwrap(),
                            port: 8080,
                            proto: Proto::Tcp,
                            local: false,
                            terminating: false,
                            weight: 1,
                        })
                        .collect(),
                    keep_flows: Vec::new(),
                    affinity_secs: None,
                    no_local: false,
                    snat: false,
                    source_ranges: Vec::new(),
                    scheduler: Default::default(),
                },
            );
        }
        d
    }

    const ROOMY: Capacity = Capacity {
        services4: 1000,
        services6: 1000,
        slot_chunks: 1000,
        members: 1000,
        backends: 1000,
        infos: 1000,
        maglev: 1000,
        src_ranges: [1000, 1000],
    };

    /// `desired(n, 1)` as load balancer frontends with `ranges` allowed prefixes each.
    fn ranged(n: usize, ranges: usize) -> Desired {
        let mut d = desired(n, 1);
        for state in d.frontends.values_mut() {
            state.kind = FrontendKind::LoadBalancer;
            state.source_ranges = (0..ranges)
                .map(|r| crate::model::Cidr::parse(&format!("192.0.{r}.0/24")).unwrap())
                .collect();
        }
        d
    }

    #[test]
    fn source_ranges_are_counted_and_a_programmed_port_keeps_its_place() {
        // 3 ranges each, 10 entries: three ports fit, a fourth would need 12.
        let cap = Capacity {
            src_ranges: [10, 10],
            ..ROOMY
        };
        let mut d = ranged(4, 3);
        let refused = refusals(&d, &MapState::default(), &cap);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].1.contains("LB4_SRC_RANGES is full"),
            "{refused:?}"
        );
        refuse(&mut d, &refused);
        let mut state = MapState::default();
        for op in plan(&d, &state) {
            state.apply(&op);
        }
        assert_eq!(state.source_ranges.len(), 9);
        // A programmed port's ranges that stay are no new entries: one more range for the
        // first port fits (9 held + 1 new = 10), not one more for each.
        let mut grown = ranged(3, 3);
        let first = *grown.frontends.keys().next().unwrap();
        grown
            .frontends
            .get_mut(&first)
            .unwrap()
            .source_ranges
            .push(crate::model::Cidr::parse("198.51.100.0/24").unwrap());
        assert!(refusals(&grown, &state, &cap).is_empty());
        let wider = ranged(3, 4);
        let refused = refusals(&wider, &state, &cap);
        assert!(!refused.is_empty(), "{refused:?}");
        assert!(
            refused
                .iter()
                .all(|(_, why)| why.contains("keeps its previous state")),
            "{refused:?}"
        );
        // The cheap checks count ranges too.
        assert!(!changes_fit(
            &wider,
            &wider.frontends.keys().copied().collect(),
            &state,
            &cap
        ));
    }

    #[test]
    fn everything_fits_in_roomy_maps() {
        let mut d = desired(5, 2);
        fit(&mut d, &MapState::default(), &ROOMY);
        assert_eq!(d.frontends.len(), 5);
        assert!(d.problems.is_empty());
    }

    #[test]
    fn services_that_do_not_fit_are_refused_by_name_with_the_map() {
        // Each Service needs 2 LB4_SERVICES entries (frontend and ClusterIP marker).
        let cap = Capacity {
            services4: 6,
            ..ROOMY
        };
        let mut d = desired(5, 2);
        fit(&mut d, &MapState::default(), &cap);
        assert_eq!(d.frontends.len(), 3);
        assert_eq!(d.problems.len(), 2);
        assert!(d.problems[0].to_string().contains("svc-003"));
        assert!(d.problems[0].message.contains("LB4_SERVICES is full"));
    }

    #[test]
    fn slots_are_counted_in_chunks_of_sixteen() {
        // 20 backends each: two chunks per frontend, and two more while one is updated.
        let cap = Capacity {
            slot_chunks: 7,
            ..ROOMY
        };
        let mut d = desired(4, 20);
        fit(&mut d, &MapState::default(), &cap);
        assert_eq!(
            d.frontends.len(),
            2,
            "2 x 2 chunks + 2 in flight fit 7, 3 x 2 + 2 do not"
        );
        assert!(
            d.problems[0].message.contains("LB_SLOTS is full"),
            "{:?}",
            d.problems
        );
        // Three backends each take one chunk: six frontends and one in flight fit 7 entries
        // (18 slots, which took 18 entries when a slot was an entry).
        let mut d = desired(6, 3);
        fit(&mut d, &MapState::default(), &cap);
        assert_eq!(d.frontends.len(), 6);
        let mut state = MapState::default();
        for op in plan(&d, &state) {
            state.apply(&op);
        }
        assert_eq!(state.slots.len(), 6);
    }

    #[test]
    fn programmed_services_keep_their_place_and_refused_ones_get_in_when_space_frees() {
        let cap = Capacity {
            backends: 6,
            ..ROOMY
        };
        // svc-003 and svc-004 are programmed first; then all five are wanted.
        let mut state = MapState::default();
        let mut first = desired(5, 2);
        first
            .frontends
            .retain(|f, _| f.addr >= "10.96.0.4".parse::<std::net::IpAddr>().unwrap());
        fit_and_apply(first, &mut state, &cap);
        let kept = fit_and_apply(desired(5, 2), &mut state, &cap);
        assert_eq!(kept, ["svc-000", "svc-003", "svc-004"]);
        assert!(state.backends.len() <= 6);
        // svc-004 is deleted: its space goes to the next refused Service.
        let kept = fit_and_apply(desired(4, 2), &mut state, &cap);
        assert_eq!(
            kept,
            ["svc-000", "svc-003"],
            "stale backends still occupy the map"
        );
        let kept = fit_and_apply(desired(4, 2), &mut state, &cap);
        assert_eq!(kept, ["svc-000", "svc-001", "svc-003"]);
    }

    #[test]
    fn changed_frontends_fit_beside_what_the_maps_hold() {
        // Five Services of two backends programmed: 10 backends, 10 members, 5 slot chunks.
        let mut state = MapState::default();
        for op in plan(&desired(5, 2), &state) {
            state.apply(&op);
        }
        let cap = Capacity {
            backends: 13,
            ..ROOMY
        };
        let mut next = desired(5, 2);
        let changed: BTreeSet<FrontendAddr> = next.frontends.keys().take(1).copied().collect();
        // (The whole-cluster bound says no: 10 members + 10 backends in the map > 13.)
        // One frontend's 2 (or 3) backends beside the 10 in the map fit 13; 4 do not.
        assert!(changes_fit(&next, &changed, &state, &cap));
        let grow = |d: &mut Desired| {
            let first = d.frontends.values_mut().next().unwrap();
            first.backends.push(first.backends[0].clone());
        };
        grow(&mut next);
        assert!(changes_fit(&next, &changed, &state, &cap));
        grow(&mut next);
        assert!(!changes_fit(&next, &changed, &state, &cap));
        // Every map is checked: LB4_SERVICES holds 10 (5 frontends, 5 ClusterIP markers);
        // a changed ClusterIP frontend may add two.
        let tight = Capacity {
            services4: 11,
            ..ROOMY
        };
        assert!(!changes_fit(&desired(5, 2), &changed, &state, &tight));
        let roomy_enough = Capacity {
            services4: 12,
            ..ROOMY
        };
        assert!(changes_fit(&desired(5, 2), &changed, &state, &roomy_enough));
        // A removed frontend adds nothing.
        let mut fewer = desired(5, 2);
        fewer.frontends.retain(|f, _| !changed.contains(f));
        assert!(changes_fit(&fewer, &changed, &state, &tight));
    }

    /// Fits `d` into `state`, applies the plan, and returns the Services that got in.
    fn fit_and_apply(mut d: Desired, state: &mut MapState, cap: &Capacity) -> Vec<String> {
        fit(&mut d, state, cap);
        for op in plan(&d, state) {
            state.apply(&op);
        }
        d.frontends.values().map(|f| f.port.name.clone()).collect()
    }
}
