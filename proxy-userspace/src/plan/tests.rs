//! The planner against an in-memory map state: consistency at every step, ids kept, and a
//! second plan of the same state is empty.

use super::*;
use crate::compile::{
    Backend, Desired, Family, FrontendAddr, FrontendKind, FrontendState, PortName, Proto,
};

fn frontend(ip: &str, port: u16) -> FrontendAddr {
    FrontendAddr {
        addr: ip.parse().unwrap(),
        port,
        proto: Proto::Tcp,
        scope: Default::default(),
    }
}

fn backend(ip: &str) -> Backend {
    Backend {
        addr: ip.parse().unwrap(),
        port: 8080,
        proto: Proto::Tcp,
        local: false,
        terminating: false,
        weight: 1,
    }
}

fn desired(entries: &[(&str, &[&str])]) -> Desired {
    let mut d = Desired::default();
    for (vip, backends) in entries {
        d.frontends.insert(
            frontend(vip, 80),
            FrontendState {
                port: PortName {
                    namespace: "default".into(),
                    name: vip.to_string(),
                    port: String::new(),
                    proto: Proto::Tcp,
                    family: Family::V4,
                },
                kind: FrontendKind::ClusterIp,
                backends: backends.iter().map(|b| backend(b)).collect(),
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

/// Applies a plan op by op, checking after each write that no frontend is half-written.
fn apply_checked(state: &mut MapState, desired: &Desired) {
    let ops = plan(desired, state);
    for op in &ops {
        state.apply(op);
        state
            .consistent()
            .unwrap_or_else(|e| panic!("inconsistent after {op:?}: {e}"));
    }
}

#[test]
fn plan_then_replan_is_empty() {
    let mut state = MapState::default();
    let d = desired(&[("10.96.0.1", &["10.244.0.2", "10.244.0.3"])]);
    apply_checked(&mut state, &d);
    assert_eq!(state.services.len(), 2, "frontend and its ClusterIP marker");
    assert_eq!(state.slots.len(), 1, "two slots, one chunk");
    assert_eq!(state.backends.len(), 2);
    assert!(plan(&d, &state).is_empty());
}

#[test]
fn a_live_chunk_with_ids_past_the_count_is_written_again() {
    // As an interrupted run of the per-slot layout could leave it, migrated into chunks.
    let mut state = MapState::default();
    let d = desired(&[("10.96.0.1", &["10.244.0.2", "10.244.0.3"])]);
    apply_checked(&mut state, &d);
    let stray = *state.backends.keys().next().unwrap();
    let chunk = state.slots.values_mut().next().unwrap();
    chunk.backend_ids[5] = stray;
    assert!(!plan(&d, &state).is_empty(), "the stray id is seen");
    apply_checked(&mut state, &d);
    assert_eq!(state.slots.len(), 1);
    let chunk = state.slots.values().next().unwrap();
    assert_eq!(chunk.backend_ids[2..], [0; 14]);
    assert!(plan(&d, &state).is_empty());
}

#[test]
fn slots_go_in_chunks_of_sixteen_and_shrink_with_the_backends() {
    let mut state = MapState::default();
    let addrs: Vec<String> = (0..20).map(|i| format!("10.244.1.{i}")).collect();
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    apply_checked(&mut state, &desired(&[("10.96.0.1", &all)]));
    let svc = *frontends(&state)[0];
    assert_eq!(svc.count, 20);
    assert_eq!(state.slots.len(), 2, "16 + 4 slots");
    let live = state.live_slots(&svc);
    assert!(live.iter().all(Option::is_some), "{live:?}");
    let distinct: BTreeSet<u32> = live.iter().flatten().copied().collect();
    assert_eq!(distinct.len(), 20);
    // The last chunk's slots past the count are 0.
    let last = state.slots.values().next_back().unwrap();
    assert_eq!(last.backend_ids[4..], [0; 12]);
    // Down to three backends: one chunk in the new generation, both old ones gone.
    let few = desired(&[("10.96.0.1", &all[..3])]);
    apply_checked(&mut state, &few);
    let svc = *frontends(&state)[0];
    assert_eq!(svc.count, 3);
    assert_eq!(state.slots.len(), 1);
    assert!(
        state
            .slots
            .keys()
            .all(|k| k.generation == svc.generation() && k.chunk == 0)
    );
    assert!(plan(&few, &state).is_empty());
    // And up again to 17: two chunks.
    apply_checked(&mut state, &desired(&[("10.96.0.1", &all[..17])]));
    assert_eq!(state.slots.len(), 2);
    assert_eq!(state.live_slots(frontends(&state)[0]).len(), 17);
}

fn frontends(state: &MapState) -> Vec<&ServiceValue> {
    state
        .services
        .iter()
        .filter(|(k, _)| !k.is_any_port())
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn clusterip_marker_follows_the_address() {
    // semantics 3.12: other ports of an active ClusterIP are rejected, so the address is marked.
    let mut state = MapState::default();
    apply_checked(&mut state, &desired(&[("10.96.0.1", &["10.244.0.2"])]));
    let marker = ServiceKey::any_port("10.96.0.1".parse().unwrap());
    assert_eq!(state.services[&marker].count, 0);
    apply_checked(&mut state, &desired(&[("10.96.0.2", &["10.244.0.2"])]));
    assert!(!state.services.contains_key(&marker));
    assert!(
        state
            .services
            .contains_key(&ServiceKey::any_port("10.96.0.2".parse().unwrap()))
    );
}

#[test]
fn weights_become_slots() {
    let mut d = desired(&[("10.96.0.1", &["10.244.0.2", "10.244.0.3"])]);
    d.frontends.values_mut().next().unwrap().backends[0].weight = 3;
    let mut state = MapState::default();
    apply_checked(&mut state, &d);
    let svc = frontends(&state)[0];
    assert_eq!(svc.count, 4);
    let heavy = state.members.values().map(|m| m.slots).max().unwrap();
    assert_eq!(heavy, 3);
}

#[test]
fn restart_adopts_the_maps_without_writes() {
    // The agent reads the maps back at start-up; an unchanged cluster plans no write.
    let mut state = MapState::default();
    let d = desired(&[
        ("10.96.0.1", &["10.244.0.2"]),
        ("10.96.0.2", &["10.244.0.3"]),
    ]);
    apply_checked(&mut state, &d);
    let adopted = state.clone();
    assert!(plan(&d, &adopted).is_empty());
    // One change after a restart writes only what concerns that Service.
    let d2 = desired(&[
        ("10.96.0.1", &["10.244.0.2"]),
        ("10.96.0.2", &["10.244.0.4"]),
    ]);
    let ops = plan(&d2, &adopted);
    // New backend, its slot and member, the flip, then the old slot, member and backend.
    assert_eq!(ops.len(), 7, "{ops:?}");
}

#[test]
fn changing_backends_flips_generation_and_keeps_ids() {
    let mut state = MapState::default();
    let before = desired(&[("10.96.0.1", &["10.244.0.2", "10.244.0.3"])]);
    apply_checked(&mut state, &before);
    let svc_id = frontends(&state)[0].id;
    let kept_id = *state
        .backends
        .iter()
        .find(|(_, v)| v.addr4() == [10, 244, 0, 2])
        .unwrap()
        .0;
    let after = desired(&[("10.96.0.1", &["10.244.0.2", "10.244.0.4"])]);
    apply_checked(&mut state, &after);
    let svc = frontends(&state)[0];
    assert_eq!(svc.id, svc_id);
    assert_eq!(svc.rev, 1);
    assert_eq!(state.slots.len(), 1, "old generation removed");
    assert!(state.slots.keys().all(|k| k.generation == 1));
    assert_eq!(state.backends.len(), 2, "10.244.0.3 removed");
    assert!(state.backends.contains_key(&kept_id));
    assert!(plan(&after, &state).is_empty());
}

/// semantics 9.3: an endpoint new flows may no longer use (here: it started terminating
/// while another is ready) stays a member without slots, so its flows keep it; only when it
/// stops serving is it removed.
#[test]
fn an_endpoint_kept_for_its_flows_is_a_member_without_slots() {
    let mut state = MapState::default();
    let both = desired(&[("10.96.0.1", &["10.244.0.2", "10.244.0.3"])]);
    apply_checked(&mut state, &both);
    let id_of = |state: &MapState, last: u8| {
        *state
            .backends
            .iter()
            .find(|(_, v)| v.addr4() == [10, 244, 0, last])
            .unwrap()
            .0
    };
    let leaving = id_of(&state, 3);
    let mut kept = desired(&[("10.96.0.1", &["10.244.0.2"])]);
    for f in kept.frontends.values_mut() {
        // Terminating now: another entry than the one its flows were recorded with.
        f.keep_flows.push(Backend {
            terminating: true,
            ..backend("10.244.0.3")
        });
    }
    let ops = plan(&kept, &state);
    assert!(
        !ops.iter()
            .any(|op| matches!(op, Op::DelMember(_) | Op::DelBackend(_))),
        "{ops:?}"
    );
    apply_checked(&mut state, &kept);
    let svc_id = frontends(&state)[0].id;
    let member = |state: &MapState, backend_id| {
        state
            .members
            .get(&MemberKey { svc_id, backend_id })
            .copied()
    };
    assert_eq!(member(&state, leaving), Some(MemberValue { slots: 0 }));
    assert_eq!(id_of(&state, 3), leaving, "the flows' backend entry stays");
    assert_eq!(state.backends.len(), 2, "and no other is written for it");
    assert_eq!(frontends(&state)[0].count, 1, "no slot for it");
    assert!(plan(&kept, &state).is_empty());
    // Gone from the slice: removed.
    let gone = desired(&[("10.96.0.1", &["10.244.0.2"])]);
    apply_checked(&mut state, &gone);
    assert_eq!(member(&state, leaving), None);
    assert_eq!(state.backends.len(), 1);
}

#[test]
fn removing_a_service_removes_everything_it_owned() {
    let mut state = MapState::default();
    let d = desired(&[
        ("10.96.0.1", &["10.244.0.2"]),
        ("10.96.0.2", &["10.244.0.5"]),
    ]);
    apply_checked(&mut state, &d);
    let d = desired(&[("10.96.0.2", &["10.244.0.5"])]);
    apply_checked(&mut state, &d);
    assert_eq!(frontends(&state).len(), 1);
    assert_eq!(state.slots.len(), 1);
    assert_eq!(state.members.len(), 1);
    assert_eq!(state.backends.len(), 1);
}

#[test]
fn no_backends_is_a_service_with_zero_slots() {
    let mut state = MapState::default();
    let d = desired(&[("10.96.0.1", &[])]);
    apply_checked(&mut state, &d);
    let svc = frontends(&state)[0];
    assert_eq!(svc.count, 0);
    assert!(state.slots.is_empty());
}

#[test]
fn source_ranges_exist_before_the_frontend_checks_them_and_go_last() {
    use crate::compile::{Cidr, Scope};
    let mut d = desired(&[("198.51.100.1", &["10.244.0.2"])]);
    let (key, mut state) = d.frontends.pop_first().unwrap();
    state.source_ranges = vec![Cidr::parse("192.168.77.0/24").unwrap()];
    state.kind = FrontendKind::LoadBalancer;
    let key = FrontendAddr {
        scope: Scope::External,
        ..key
    };
    d.frontends.insert(key, state);
    let ops = plan(&d, &MapState::default());
    let range = ops
        .iter()
        .position(|o| matches!(o, Op::PutSourceRange(_)))
        .expect("a range is written");
    let service = ops
        .iter()
        .position(|o| matches!(o, Op::PutService(..)))
        .expect("the frontend is written");
    assert!(range < service, "{ops:?}");
    let mut state = MapState::default();
    for op in &ops {
        state.apply(op);
    }
    // Removing the Service removes its frontend before its ranges.
    let ops = plan(&Desired::default(), &state);
    let del_service = ops.iter().position(|o| matches!(o, Op::DelService(_)));
    let del_range = ops.iter().position(|o| matches!(o, Op::DelSourceRange(_)));
    assert!(del_service.unwrap() < del_range.unwrap(), "{ops:?}");
}

#[test]
fn maglev_tables_are_written_before_the_flip_and_replaced_by_generation() {
    use crate::compile::Scheduler;
    use proxy_common::{maglev::MAGLEV_CHUNK, service::FLAG_MAGLEV};
    let maglev = |entries: &[(&str, &[&str])]| {
        let mut d = desired(entries);
        d.maglev_size = 1021;
        for state in d.frontends.values_mut() {
            state.scheduler = Scheduler::Maglev;
        }
        d
    };
    let chunks = 1021usize.div_ceil(MAGLEV_CHUNK);
    let d = maglev(&[("10.96.0.1", &["10.244.0.2", "10.244.0.3"])]);
    let ops = plan(&d, &MapState::default());
    let is_frontend = |o: &Op| matches!(o, Op::PutService(k, _) if !k.is_any_port());
    let first_service = ops.iter().position(is_frontend).unwrap();
    let puts: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Op::PutMaglev(..)))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(puts.len(), chunks);
    assert!(puts.iter().all(|i| *i < first_service));
    let mut state = MapState::default();
    for op in &ops {
        state.apply(op);
    }
    let svc = frontends(&state)[0];
    assert!(svc.flags & FLAG_MAGLEV != 0);
    // Every entry names one of the two backends.
    let ids: BTreeSet<u32> = state
        .maglev
        .values()
        .flat_map(|c| c.backend_ids.iter().copied())
        .filter(|id| *id != 0)
        .collect();
    assert_eq!(ids, state.backends.keys().copied().collect());
    // A backend more: the other generation's table, then the flip, then the old one goes.
    let d2 = maglev(&[("10.96.0.1", &["10.244.0.2", "10.244.0.3", "10.244.0.4"])]);
    let ops = plan(&d2, &state);
    let flip = ops.iter().position(is_frontend).unwrap();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::PutMaglev(k, _) => assert!(i < flip && k.generation == 1, "{op}"),
            Op::DelMaglev(k) => assert!(i > flip && k.generation == 0, "{op}"),
            _ => {}
        }
    }
    for op in &ops {
        state.apply(op);
    }
    assert_eq!(state.maglev.len(), chunks);
    assert!(plan(&d2, &state).is_empty(), "stable once written");
    // The Service goes: its table too.
    let ops = plan(&Desired::default(), &state);
    for op in &ops {
        state.apply(op);
    }
    assert!(state.maglev.is_empty());
}

#[test]
fn connection_counting_schedulers_give_each_backend_one_slot_and_name_their_rule() {
    use crate::{cli::view::scheduler_of, compile::Scheduler};
    use proxy_common::service::{FLAG_LEAST_CONN, FLAG_NEVER_QUEUE, FLAG_SED, FLAG_WEIGHTED};
    for (scheduler, flags) in [
        (Scheduler::LeastConnection, FLAG_LEAST_CONN),
        (
            Scheduler::WeightedLeastConnection,
            FLAG_LEAST_CONN | FLAG_WEIGHTED,
        ),
        (
            Scheduler::ShortestExpectedDelay,
            FLAG_LEAST_CONN | FLAG_WEIGHTED | FLAG_SED,
        ),
        (
            Scheduler::NeverQueue,
            FLAG_LEAST_CONN | FLAG_WEIGHTED | FLAG_SED | FLAG_NEVER_QUEUE,
        ),
    ] {
        assert!(scheduler.counts_connections());
        let mut d = desired(&[("10.96.0.1", &["10.244.0.2", "10.244.0.3"])]);
        for state in d.frontends.values_mut() {
            state.scheduler = scheduler;
            // Weights count in the comparison, not as slots.
            state.backends[0].weight = 5;
        }
        let mut state = MapState::default();
        apply_checked(&mut state, &d);
        let svc = frontends(&state)[0];
        let all = FLAG_LEAST_CONN | FLAG_WEIGHTED | FLAG_SED | FLAG_NEVER_QUEUE;
        assert_eq!(svc.flags & all, flags, "{scheduler:?}");
        assert_eq!(svc.count, 2, "{scheduler:?}: one slot per backend");
        // `services` reads the scheduler back from the flags alone.
        assert_eq!(scheduler_of(svc, &[]), scheduler);
    }
}

#[test]
fn weights_beyond_the_slots_are_scaled_and_every_backend_keeps_a_slot() {
    use crate::compile::{Scheduler, slot_turns};
    let weighted = |weights: &[u16], scheduler| {
        let mut d = desired(&[("10.96.0.1", &[])]);
        let state = d.frontends.values_mut().next().unwrap();
        state.scheduler = scheduler;
        state.backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Backend {
                addr: std::net::IpAddr::from(std::net::Ipv6Addr::from(i as u128 + 1)),
                weight: *w,
                ..backend("10.244.0.1")
            })
            .collect();
        slot_turns(state).collect::<Vec<u64>>()
    };
    // 700 backends at weight 100 want 70,000 slots of 65,535: scaled, every one keeps one
    // and the proportions stay.
    let turns = weighted(&[100; 700], Scheduler::WeightedRoundRobin);
    assert!(turns.iter().sum::<u64>() <= MAX_SLOTS as u64);
    assert!(turns.iter().all(|t| *t == turns[0] && *t > 90));
    let mixed = weighted(&[1, 1000, 65_000], Scheduler::WeightedRoundRobin);
    assert!(mixed.iter().sum::<u64>() <= MAX_SLOTS as u64, "{mixed:?}");
    assert_eq!(mixed[0], 1);
    assert!(mixed[2] > 60 * mixed[1], "{mixed:?}");
    // What fits is left alone; round-robin gives one turn whatever the weight.
    assert_eq!(
        weighted(&[3, 1, 2], Scheduler::WeightedRoundRobin),
        [3, 1, 2]
    );
    assert_eq!(weighted(&[3, 1, 2], Scheduler::RoundRobin), [1, 1, 1]);
    // More backends than slots: one each for the first 65,535.
    let many = weighted(&vec![5; MAX_SLOTS + 10], Scheduler::WeightedRoundRobin);
    assert_eq!(many.iter().sum::<u64>(), MAX_SLOTS as u64);
    assert!(many[..MAX_SLOTS].iter().all(|t| *t == 1));
}
