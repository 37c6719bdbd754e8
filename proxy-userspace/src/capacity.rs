//! PURE: keeps the desired state within the maps' capacities. Service ports that do not fit are
//! refused whole (a `Problem` naming the full map), Service ports already programmed are kept
//! first, so a full map never costs a working Service its entries; refused ones get in once
//! space frees.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    compile::{Desired, FrontendAddr, FrontendKind, PortName, Problem},
    plan::{MapState, ServiceKey},
};

/// Capacity (max_entries) of each map the agent writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services4: u64,
    pub services6: u64,
    pub slots: u64,
    pub members: u64,
    pub backends: u64,
    pub infos: u64,
}

#[derive(Default, Clone)]
struct Usage {
    services4: BTreeSet<ServiceKey>,
    services6: BTreeSet<ServiceKey>,
    slots: u64,
    members: u64,
    largest: u64,
    largest_members: u64,
    backends: BTreeSet<(std::net::IpAddr, u16, u8)>,
    frontends: u64,
}

impl Usage {
    /// The first map this usage would overflow, with (needed, capacity).
    fn overflow(&self, cap: &Capacity, current_backends: u64) -> Option<(&'static str, u64, u64)> {
        let checks = [
            ("LB4_SERVICES", self.services4.len() as u64, cap.services4),
            ("LB6_SERVICES", self.services6.len() as u64, cap.services6),
            ("LB_SVC_INFO", self.frontends, cap.infos),
            // One frontend at a time holds two generations while it is updated.
            ("LB_SLOTS", self.slots + self.largest, cap.slots),
            (
                "LB_MEMBERS",
                self.members + self.largest_members,
                cap.members,
            ),
            // New backends are added before unused ones are removed.
            (
                "LB_BACKENDS",
                self.backends.len() as u64 + current_backends,
                cap.backends,
            ),
        ];
        checks.into_iter().find(|(_, need, cap)| need > cap)
    }
}

/// Removes from `desired` the Service ports that would overflow a map; records why.
pub fn fit(desired: &mut Desired, current: &MapState, cap: &Capacity) {
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

    // Backends already in the map stay there until the end of a sync: count those that the
    // desired state will not reuse.
    let current_backend_ids: BTreeSet<_> = current
        .backends
        .values()
        .map(|v| {
            let addr = if v.family == proxy_common::backend::FAMILY_V4 {
                std::net::IpAddr::from(v.addr4())
            } else {
                std::net::IpAddr::from(v.addr)
            };
            (addr, v.port, v.proto)
        })
        .collect();

    let mut usage = Usage::default();
    let mut refused: Vec<(PortName, String)> = Vec::new();
    for (name, frontends) in order {
        let mut next = usage.clone();
        for f in frontends {
            let state = &desired.frontends[f];
            let key = ServiceKey::of(f);
            let set = match key {
                ServiceKey::V4(_) => &mut next.services4,
                ServiceKey::V6(_) => &mut next.services6,
            };
            set.insert(key);
            if state.kind == FrontendKind::ClusterIp {
                set.insert(ServiceKey::any_port(f.addr));
            }
            next.frontends += 1;
            let slots: u64 = state
                .backends
                .iter()
                .map(|b| u64::from(b.weight.max(1)))
                .sum();
            next.slots += slots;
            next.largest = next.largest.max(slots);
            let members = state.backends.len() as u64;
            next.members += members;
            next.largest_members = next.largest_members.max(members);
            for b in &state.backends {
                next.backends.insert((b.addr, b.port, b.proto.number()));
            }
        }
        let stale = current_backend_ids.difference(&next.backends).count() as u64;
        match next.overflow(cap, stale) {
            None => usage = next,
            Some((map, need, capacity)) => refused.push((
                name.clone(),
                format!(
                    "not programmed: map {map} is full (would need {need} of {capacity} entries)"
                ),
            )),
        }
    }
    for (name, message) in refused {
        desired.frontends.retain(|_, state| state.port != name);
        desired.problems.push(Problem {
            object: format!("Service {}/{} port {name}", name.namespace, name.name),
            message,
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
                    affinity_secs: None,
                    no_local: false,
                },
            );
        }
        d
    }

    const ROOMY: Capacity = Capacity {
        services4: 1000,
        services6: 1000,
        slots: 1000,
        members: 1000,
        backends: 1000,
        infos: 1000,
    };

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
        fit(&mut first, &state, &cap);
        for op in plan(&first, &state) {
            state.apply(&op);
        }
        let mut all = desired(5, 2);
        fit(&mut all, &state, &cap);
        let kept: Vec<String> = all
            .frontends
            .values()
            .map(|f| f.port.name.clone())
            .collect();
        assert_eq!(kept, ["svc-000", "svc-003", "svc-004"]);
        for op in plan(&all, &state) {
            state.apply(&op);
        }
        assert!(state.backends.len() <= 6);
        // svc-004 is deleted: its space goes to the next refused Service.
        let mut fewer = desired(4, 2);
        fit(&mut fewer, &state, &cap);
        let kept: Vec<String> = fewer
            .frontends
            .values()
            .map(|f| f.port.name.clone())
            .collect();
        assert_eq!(
            kept,
            ["svc-000", "svc-003"],
            "stale backends still occupy the map"
        );
        for op in plan(&fewer, &state) {
            state.apply(&op);
        }
        let mut again = desired(4, 2);
        fit(&mut again, &state, &cap);
        let kept: Vec<String> = again
            .frontends
            .values()
            .map(|f| f.port.name.clone())
            .collect();
        assert_eq!(kept, ["svc-000", "svc-001", "svc-003"]);
    }
}
