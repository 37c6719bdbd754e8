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
                affinity_secs: None,
                no_local: false,
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
    assert_eq!(state.services.len(), 1);
    assert_eq!(state.slots.len(), 2);
    assert_eq!(state.backends.len(), 2);
    assert!(plan(&d, &state).is_empty());
}

#[test]
fn changing_backends_flips_generation_and_keeps_ids() {
    let mut state = MapState::default();
    let before = desired(&[("10.96.0.1", &["10.244.0.2", "10.244.0.3"])]);
    apply_checked(&mut state, &before);
    let svc_id = state.services.values().next().unwrap().id;
    let kept_id = *state
        .backends
        .iter()
        .find(|(_, v)| v.addr4() == [10, 244, 0, 2])
        .unwrap()
        .0;
    let after = desired(&[("10.96.0.1", &["10.244.0.2", "10.244.0.4"])]);
    apply_checked(&mut state, &after);
    let svc = state.services.values().next().unwrap();
    assert_eq!(svc.id, svc_id);
    assert_eq!(svc.rev, 1);
    assert_eq!(state.slots.len(), 2, "old generation removed");
    assert!(state.slots.keys().all(|k| k.generation == 1));
    assert_eq!(state.backends.len(), 2, "10.244.0.3 removed");
    assert!(state.backends.contains_key(&kept_id));
    assert!(plan(&after, &state).is_empty());
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
    assert_eq!(state.services.len(), 1);
    assert_eq!(state.slots.len(), 1);
    assert_eq!(state.members.len(), 1);
    assert_eq!(state.backends.len(), 1);
}

#[test]
fn no_backends_is_a_service_with_zero_slots() {
    let mut state = MapState::default();
    let d = desired(&[("10.96.0.1", &[])]);
    apply_checked(&mut state, &d);
    let svc = state.services.values().next().unwrap();
    assert_eq!(svc.count, 0);
    assert!(state.slots.is_empty());
}
