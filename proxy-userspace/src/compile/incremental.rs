//! PURE: compiling snapshot after snapshot, recompiling only the Services whose Service object
//! or EndpointSlices changed (told apart by pointer: sources hand the same `Arc` for an
//! unchanged object). A change of the node-level inputs (node name, zone, addresses, pod CIDRs,
//! interfaces waited for, the agent's settings) recompiles every Service.
//!
//! The merged result is the same as compiling from scratch: every Service is compiled alone
//! (`compile_one`), and where two Services claim one frontend the first by namespace/name owns
//! it whatever the order of changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    Desired, FrontendAddr, FrontendState, Problem, ServiceOut, compile_one,
    endpoints::{Owner, owner},
    slice_problems, unique,
};
use crate::snapshot::{NodeInfo, ProxyConfig, Snapshot};

/// A Service by (namespace, name).
type Key = (String, String);

/// One Service as last compiled.
struct Cached {
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    out: ServiceOut,
}

/// What one `Compiler::update` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Every frontend was recompiled (first update, or node-level inputs changed).
    pub full: bool,
    /// Frontends whose desired state may differ from the previous update's.
    pub changed: BTreeSet<FrontendAddr>,
    /// Services compiled again (their object or slices changed, or `full`).
    pub recompiled: usize,
    /// Service objects added, changed or removed since the previous update.
    pub services_changed: u64,
    /// EndpointSlices added, changed or removed since the previous update, per address type
    /// ("IPv4", "IPv6").
    pub slices_changed: BTreeMap<String, u64>,
}

/// The compile cache and the merged desired state.
#[derive(Default)]
pub struct Compiler {
    inputs: Option<(NodeInfo, ProxyConfig)>,
    services: BTreeMap<Key, Cached>,
    /// Who claims each frontend, in name order: the first owns it.
    claims: BTreeMap<FrontendAddr, Vec<Key>>,
    /// Frontends claimed by more than one Service.
    conflicted: BTreeSet<FrontendAddr>,
    /// The slices of the previous update by (namespace, name), for counting changes.
    slices_seen: BTreeMap<Key, Arc<EndpointSlice>>,
    desired: Desired,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Compiler {
    /// The merged desired state (problems included) as of the last update.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    pub fn into_desired(self) -> Desired {
        self.desired
    }

    /// Takes in a snapshot; returns what changed.
    pub fn update(&mut self, snapshot: &Snapshot) -> Update {
        let mut update = Update::default();
        let inputs = (snapshot.node.clone(), snapshot.config.clone());
        if self.inputs.as_ref() != Some(&inputs) {
            update.full = true;
            self.inputs = Some(inputs);
            self.desired.maglev_size = snapshot.config.maglev_size;
        }
        let (node, config) = self.inputs.clone().expect("set above");
        let mut global = Vec::new();
        let services = unique(&snapshot.services, "Service", &mut global);
        let slices = unique(&snapshot.slices, "EndpointSlice", &mut global);

        // Changed slices, counted per address type.
        let mut seen: BTreeMap<Key, Arc<EndpointSlice>> = BTreeMap::new();
        for slice in &slices {
            let key = key_of(&slice.metadata);
            if self
                .slices_seen
                .get(&key)
                .is_none_or(|old| !Arc::ptr_eq(old, slice))
            {
                *update
                    .slices_changed
                    .entry(slice.address_type.clone())
                    .or_default() += 1;
            }
            seen.insert(key, Arc::clone(slice));
        }
        for (key, old) in &self.slices_seen {
            if !seen.contains_key(key) {
                *update
                    .slices_changed
                    .entry(old.address_type.clone())
                    .or_default() += 1;
            }
        }
        self.slices_seen = seen;

        // Slices by the Service they belong to, in name order.
        let mut groups: BTreeMap<(&str, &str), Vec<&Arc<EndpointSlice>>> = BTreeMap::new();
        let mut loose: Vec<&EndpointSlice> = Vec::new();
        for slice in &slices {
            match owner(slice) {
                Owner::Ignored => {}
                Owner::Service(ns, name) => groups.entry((ns, name)).or_default().push(slice),
                Owner::Nobody => loose.push(slice),
            }
        }

        let mut present: BTreeSet<Key> = BTreeSet::new();
        for svc in &services {
            let key = key_of(&svc.metadata);
            let ns: &str = svc.metadata.namespace.as_deref().unwrap_or("");
            let name: &str = svc.metadata.name.as_deref().unwrap_or("");
            let group = groups.remove(&(ns, name)).unwrap_or_default();
            present.insert(key.clone());
            let cached = self.services.get(&key);
            let same_objects = cached.is_some_and(|c| {
                Arc::ptr_eq(&c.service, svc)
                    && c.slices.len() == group.len()
                    && c.slices.iter().zip(&group).all(|(a, b)| Arc::ptr_eq(a, b))
            });
            if same_objects && !update.full {
                continue;
            }
            if cached.is_none_or(|c| !Arc::ptr_eq(&c.service, svc)) {
                update.services_changed += 1;
            }
            let refs: Vec<&EndpointSlice> = group.iter().map(|s| &***s).collect();
            let out = compile_one(svc, &refs, &node, &config);
            update.recompiled += 1;
            let new = Cached {
                service: Arc::clone(svc),
                slices: group.into_iter().cloned().collect(),
                out,
            };
            if cached.is_some_and(|c| c.out == new.out) {
                // Same result from new objects: keep them, nothing to merge.
                self.services.insert(key, new);
                continue;
            }
            self.replace(&key, Some(new), &mut update.changed);
        }
        let gone: Vec<Key> = self
            .services
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            update.services_changed += 1;
            self.replace(&key, None, &mut update.changed);
        }

        // Slices no Service takes are still checked and reported.
        for group in groups.values() {
            loose.extend(group.iter().map(|s| &***s));
        }
        global.extend(slice_problems(&loose, &node));
        self.desired.problems = self.problems(global);
        if update.full {
            update.changed = self.desired.frontends.keys().copied().collect();
        }
        update
    }

    /// Replaces a Service's share of the merged state (None: the Service is gone), recording
    /// the frontends whose state may have changed.
    fn replace(&mut self, key: &Key, new: Option<Cached>, changed: &mut BTreeSet<FrontendAddr>) {
        if let Some(old) = self.services.remove(key) {
            for name in old.out.ports.keys() {
                self.desired.ports.remove(name);
            }
            for addr in old.out.frontends.keys() {
                changed.insert(*addr);
                let Some(claims) = self.claims.get_mut(addr) else {
                    continue;
                };
                let owned = claims.first() == Some(key);
                claims.retain(|k| k != key);
                if claims.len() < 2 {
                    self.conflicted.remove(addr);
                }
                match claims.first() {
                    None => {
                        self.claims.remove(addr);
                        self.desired.frontends.remove(addr);
                    }
                    Some(next) if owned => {
                        // The next claimant owns it now. Its Service port's other frontends
                        // count as changed too: a plan settles a port's id over all of them.
                        let next = &self.services[next].out;
                        let state = next.frontends[addr].clone();
                        changed.extend(
                            next.frontends
                                .iter()
                                .filter(|(_, s)| s.port == state.port)
                                .map(|(f, _)| *f),
                        );
                        self.desired.frontends.insert(*addr, state);
                    }
                    Some(_) => {}
                }
            }
        }
        let Some(new) = new else {
            return;
        };
        for (name, port) in &new.out.ports {
            self.desired.ports.insert(name.clone(), port.clone());
        }
        for (addr, state) in &new.out.frontends {
            changed.insert(*addr);
            let claims = self.claims.entry(*addr).or_default();
            let at = claims.partition_point(|k| k < key);
            claims.insert(at, key.clone());
            if claims.len() > 1 {
                self.conflicted.insert(*addr);
            }
            if at == 0 {
                self.desired.frontends.insert(*addr, state.clone());
            }
        }
        self.services.insert(key.clone(), new);
    }

    /// Every problem: the snapshot-wide ones, each Service's in name order, then frontends
    /// claimed twice; one line per fault.
    fn problems(&self, global: Vec<Problem>) -> Vec<Problem> {
        let mut out = global;
        for cached in self.services.values() {
            out.extend(cached.out.problems.iter().cloned());
        }
        for addr in &self.conflicted {
            let claims = &self.claims[addr];
            let owner: &FrontendState = &self.services[&claims[0]].out.frontends[addr];
            for other in &claims[1..] {
                out.push(Problem {
                    object: self.services[other].out.object.clone(),
                    message: format!("{addr} is already used by {}; not programmed", owner.port),
                });
            }
        }
        let mut seen = BTreeSet::new();
        out.retain(|p| seen.insert(p.to_string()));
        out
    }
}
