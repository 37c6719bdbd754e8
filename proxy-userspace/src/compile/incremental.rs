//! PURE: compiling snapshot after snapshot, recompiling only the Services whose Service object
//! or EndpointSlices changed (told apart by pointer: sources hand the same `Arc` for an
//! unchanged object). A change of the node-level inputs (node name, zone, addresses, pod CIDRs,
//! interfaces waited for, the agent's settings) recompiles every Service.
//!
//! The merged result is the same as compiling from scratch: every Service is compiled alone
//! (`compile_one`), and where two Services claim one frontend the first by namespace/name owns
//! it whatever the order of changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Service;

use super::{
    Desired, FrontendAddr, FrontendState, Object, Problem, ProblemReason, ServiceOut, compile_one,
    endpoints::{Owner, owner},
    slice_problems, unique,
};
use crate::{
    objects::Slice,
    snapshot::{NodeInfo, ProxyConfig, Snapshot},
};

/// A Service (or EndpointSlice) by (namespace, name), shared: the compiler files one object
/// under its name in several indexes, and a clone costs no allocation.
pub type Key = Arc<(String, String)>;

/// One Service as last compiled.
/// The frontend and port states themselves live in the merged `Desired` only (one copy);
/// a Service whose frontend another Service owns is compiled again when it takes it over.
struct Cached {
    service: Arc<Service>,
    slices: Vec<Arc<Slice>>,
    object: String,
    frontends: Vec<FrontendAddr>,
    ports: Vec<super::PortName>,
    problems: Vec<Problem>,
}

impl Cached {
    fn new(service: Arc<Service>, slices: Vec<Arc<Slice>>, out: &ServiceOut) -> Cached {
        Cached {
            service,
            slices,
            object: out.object.clone(),
            frontends: out.frontends.keys().copied().collect(),
            ports: out.ports.keys().cloned().collect(),
            problems: out.problems.clone(),
        }
    }
}

/// What one `Compiler::update` changed.
#[derive(Clone, Debug, Default)]
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
    /// EndpointSlices added or changed since the previous update.
    pub new_slices: Vec<Arc<Slice>>,
    /// EndpointSlices removed since the previous update, by (namespace, name).
    pub removed_slices: Vec<Key>,
}

/// What the merged frontends need of the maps, kept up to date as frontends come and go, so
/// that a sync can tell in O(1) whether everything surely fits (`capacity::surely_fits`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub frontends: u64,
    /// `LB_SLOTS` entries of every frontend's slots (`SLOT_CHUNK` slots each; a backend's
    /// weight counts in slots).
    pub slot_chunks: u64,
    /// Member entries (one per backend of a frontend, and per endpoint it keeps flows on).
    pub members: u64,
    /// Frontends with a Maglev table (Maglev scheduler, at least one backend).
    pub maglev_frontends: u64,
    /// Source-range entries (`LB4_SRC_RANGES`, `LB6_SRC_RANGES`): a load balancer frontend's
    /// allowed prefixes, by family.
    pub source_ranges: [u64; 2],
    /// How many frontends have each slot count / member count, for the largest.
    slot_sizes: BTreeMap<u64, u64>,
    member_sizes: BTreeMap<u64, u64>,
}

/// Largest number of slots one frontend may have (the slot index is 16 bits).
pub const MAX_SLOTS: usize = u16::MAX as usize;

/// The slots (turns) each backend of `state` gets, in order. Round-robin gives every backend
/// one turn, whatever its weight, and least-connection compares every backend once (weights
/// count in the comparison, not in slots); the other schedulers give a backend its weight.
/// When those exceed [`MAX_SLOTS`], every backend keeps one and the turns above one are
/// scaled down in proportion; with more backends than slots, each gets one and those past
/// the last slot none (the compiler reports it).
pub fn slot_turns(state: &FrontendState) -> impl Iterator<Item = u64> + '_ {
    let weighted =
        !(state.scheduler == super::Scheduler::RoundRobin || state.scheduler.counts_connections());
    let wanted = move |b: &super::Backend| {
        if weighted {
            u64::from(b.weight.max(1))
        } else {
            1
        }
    };
    let (n, total) = state
        .backends
        .iter()
        .fold((0u64, 0u64), |(n, t), b| (n + 1, t + wanted(b)));
    let max = MAX_SLOTS as u64;
    state.backends.iter().enumerate().map(move |(i, b)| {
        let w = wanted(b);
        if total <= max {
            w
        } else if n < max {
            1 + (w - 1) * (max - n) / (total - n)
        } else {
            u64::from((i as u64) < max)
        }
    })
}

/// The slots `state` takes ([`slot_turns`], at most [`MAX_SLOTS`]).
pub fn slot_count(state: &FrontendState) -> u64 {
    slot_turns(state).sum()
}

/// A frontend's entries in the source-range maps, [IPv4, IPv6].
pub fn source_range_entries(state: &FrontendState) -> [u64; 2] {
    count_by_family(&state.source_ranges)
}

/// How many of `cidrs` are IPv4 and IPv6 prefixes, [IPv4, IPv6].
pub fn count_by_family<'a>(cidrs: impl IntoIterator<Item = &'a super::Cidr>) -> [u64; 2] {
    let mut counts = [0u64; 2];
    for c in cidrs {
        counts[usize::from(c.addr.is_ipv6())] += 1;
    }
    counts
}

/// `LB_SLOTS` entries of a frontend of `slots` slots.
pub fn slot_chunks(slots: u64) -> u64 {
    slots.div_ceil(proxy_common::service::SLOT_CHUNK as u64)
}

impl Totals {
    fn count(&mut self, state: &FrontendState, add: bool) {
        let slots = slot_count(state);
        let members = (state.backends.len() + state.keep_flows.len()) as u64;
        let maglev =
            u64::from(state.scheduler == super::Scheduler::Maglev && !state.backends.is_empty());
        let bump = |sizes: &mut BTreeMap<u64, u64>, size: u64| {
            if add {
                *sizes.entry(size).or_default() += 1;
            } else if let Some(n) = sizes.get_mut(&size) {
                *n -= 1;
                if *n == 0 {
                    sizes.remove(&size);
                }
            }
        };
        bump(&mut self.slot_sizes, slots);
        bump(&mut self.member_sizes, members);
        let ranges = source_range_entries(state);
        if add {
            self.frontends += 1;
            self.slot_chunks += slot_chunks(slots);
            self.members += members;
            self.maglev_frontends += maglev;
            self.source_ranges[0] += ranges[0];
            self.source_ranges[1] += ranges[1];
        } else {
            self.frontends -= 1;
            self.slot_chunks -= slot_chunks(slots);
            self.members -= members;
            self.maglev_frontends -= maglev;
            self.source_ranges[0] -= ranges[0];
            self.source_ranges[1] -= ranges[1];
        }
    }

    /// Slots of the frontend with the most.
    pub fn largest_slots(&self) -> u64 {
        self.slot_sizes.keys().next_back().copied().unwrap_or(0)
    }

    /// Members of the frontend with the most.
    pub fn largest_members(&self) -> u64 {
        self.member_sizes.keys().next_back().copied().unwrap_or(0)
    }
}

/// The compile cache and the merged desired state.
#[derive(Default)]
pub struct Compiler {
    totals: Totals,
    inputs: Option<(NodeInfo, ProxyConfig)>,
    /// `Snapshot::service_cidrs` as last taken in (`Desired::service_cidrs` holds them parsed).
    service_cidrs: Vec<String>,
    /// ClusterIPs of the Services another service proxy serves (cut out of the ServiceCIDRs'
    /// ranges), as last taken in.
    foreign_ips: BTreeSet<IpAddr>,
    services: BTreeMap<Key, Cached>,
    /// Who claims each frontend, in name order: the first owns it.
    claims: BTreeMap<FrontendAddr, Vec<Key>>,
    /// Frontends claimed by more than one Service.
    conflicted: BTreeSet<FrontendAddr>,
    /// Every object of the last snapshot by (namespace, name): usually one, more when a
    /// snapshot holds several copies (`unique` picks one).
    svc_objects: HashMap<Key, Vec<Arc<Service>>>,
    slice_objects: HashMap<Key, Vec<Arc<Slice>>>,
    /// The objects of the last snapshot by address, to find what a new snapshot changed by
    /// pointer alone.
    svc_ptrs: PtrMap<Seen>,
    slice_ptrs: PtrMap<Seen>,
    /// Updates so far.
    round: u64,
    /// The slice used for each slice name, and which Service it belongs to.
    slices: HashMap<Key, (Arc<Slice>, Option<Key>)>,
    /// Slice names per Service, in name order (usually one: a sorted `Vec`, not a set, whose
    /// smallest node holds eleven).
    groups: HashMap<Key, Vec<Key>>,
    /// Problems of duplicate names, per kind and name.
    dup_problems: BTreeMap<(&'static str, Key), Vec<Problem>>,
    /// Problems of slices no Service takes (no label, or no such Service).
    loose_problems: BTreeMap<Key, Vec<Problem>>,
    /// Whether the merged problem list must be assembled again.
    problems_stale: bool,
    desired: Desired,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    Arc::new((
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    ))
}

fn ptr<T>(object: &Arc<T>) -> usize {
    Arc::as_ptr(object) as usize
}

/// The object `unique` keeps among copies of one name, with its problems.
fn pick<K: Object>(copies: &[Arc<K>], kind: &str) -> (Option<Arc<K>>, Vec<Problem>) {
    let mut problems = Vec::new();
    let kept = unique(copies, kind, &mut problems)
        .first()
        .map(|o| Arc::clone(o));
    (kept, problems)
}

/// Hashes object addresses (already unique, well spread) with one multiplication.
#[derive(Clone, Copy, Default)]
pub struct PtrHash(u64);

impl std::hash::Hasher for PtrHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64 ^ (n as u64 >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type PtrMap<V> = HashMap<usize, V, std::hash::BuildHasherDefault<PtrHash>>;

/// An object of the last snapshots, by address: its name, and the update that last saw it.
struct Seen {
    key: Key,
    round: u64,
}

/// Diffs a snapshot's objects against the last ones by pointer: updates `objects` and `ptrs`,
/// returns the names whose objects were added, replaced or removed. No allocation for an
/// object that did not change.
fn diff<K: Object>(
    now: &[Arc<K>],
    objects: &mut HashMap<Key, Vec<Arc<K>>>,
    ptrs: &mut PtrMap<Seen>,
    round: u64,
) -> BTreeSet<Key> {
    let mut touched = BTreeSet::new();
    let mut fresh = 0;
    for object in now {
        match ptrs.get_mut(&ptr(object)) {
            Some(seen) => {
                if seen.round != round {
                    seen.round = round;
                    fresh += 1;
                }
            }
            None => {
                let key = key_of(object.object_meta());
                objects
                    .entry(key.clone())
                    .or_default()
                    .push(Arc::clone(object));
                touched.insert(key.clone());
                ptrs.insert(ptr(object), Seen { key, round });
                fresh += 1;
            }
        }
    }
    // Objects not seen this round are gone.
    if ptrs.len() > fresh {
        ptrs.retain(|p, seen| {
            if seen.round == round {
                return true;
            }
            if let Some(copies) = objects.get_mut(&seen.key) {
                copies.retain(|o| ptr(o) != *p);
                if copies.is_empty() {
                    objects.remove(&seen.key);
                }
            }
            touched.insert(seen.key.clone());
            false
        });
    }
    touched
}

impl Compiler {
    /// The merged desired state (problems included) as of the last update.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    pub fn into_desired(self) -> Desired {
        self.desired
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// Rebuilds the ordered maps that hold an entry per Service or frontend from their sorted
    /// entries. Filled one entry at a time (a full compile, a change of many Services) their
    /// nodes are left about half full; rebuilt, they are full: at 10,000 Services a few MiB.
    /// The agent calls it after the syncs that compile much.
    pub fn compact(&mut self) {
        fn rebuild<K: Ord, V>(map: &mut BTreeMap<K, V>) {
            *map = std::mem::take(map).into_iter().collect();
        }
        rebuild(&mut self.services);
        rebuild(&mut self.claims);
        rebuild(&mut self.desired.frontends);
        rebuild(&mut self.desired.ports);
    }

    /// Sets (or with None removes) one merged frontend, keeping the totals.
    fn set_frontend(&mut self, addr: FrontendAddr, state: Option<FrontendState>) {
        let old = match state {
            Some(state) => {
                self.totals.count(&state, true);
                self.desired.frontends.insert(addr, state)
            }
            None => self.desired.frontends.remove(&addr),
        };
        if let Some(old) = old {
            self.totals.count(&old, false);
        }
    }

    /// Takes in a snapshot; returns what changed. Costs a pointer comparison per object plus
    /// the work for what changed; a change of the node-level inputs recompiles everything.
    pub fn update(&mut self, snapshot: &Snapshot) -> Update {
        let mut update = Update::default();
        let inputs = (snapshot.node.clone(), snapshot.config.clone());
        if self.inputs.as_ref() != Some(&inputs) {
            update.full = true;
            self.inputs = Some(inputs);
            self.desired.maglev_size = snapshot.config.maglev_size;
        }
        let (node, config) = self.inputs.clone().expect("set above");
        let foreign: BTreeSet<IpAddr> = snapshot
            .foreign_services
            .iter()
            .flat_map(|s| super::foreign_cluster_ips(s))
            .collect();
        if snapshot.service_cidrs != self.service_cidrs || foreign != self.foreign_ips {
            self.service_cidrs = snapshot.service_cidrs.clone();
            self.foreign_ips = foreign;
            self.desired.service_cidrs =
                super::service_cidrs(&self.service_cidrs, &self.foreign_ips);
        }
        self.round += 1;
        let mut touched_services = diff(
            &snapshot.services,
            &mut self.svc_objects,
            &mut self.svc_ptrs,
            self.round,
        );
        update.services_changed = touched_services.len() as u64;
        let touched_slices = diff(
            &snapshot.slices,
            &mut self.slice_objects,
            &mut self.slice_ptrs,
            self.round,
        );

        // The slice used for each touched name, and the Services that gain or lose it.
        let mut recheck_loose: BTreeSet<Key> = BTreeSet::new();
        for key in &touched_slices {
            let (kept, dups) = match self.slice_objects.get(key) {
                Some(copies) => pick(copies, "EndpointSlice"),
                None => (None, Vec::new()),
            };
            self.set_dup_problems("EndpointSlice", key, dups);
            let old = self.slices.remove(key);
            if let Some((_, Some(owner))) = &old
                && let Some(group) = self.groups.get_mut(owner)
            {
                group.retain(|k| k != key);
                if group.is_empty() {
                    self.groups.remove(owner);
                }
                touched_services.insert(owner.clone());
            }
            let kind = kept
                .as_ref()
                .or(old.as_ref().map(|(s, _)| s))
                .map(|s| s.address_type.clone())
                .unwrap_or_default();
            if old.as_ref().map(|(s, _)| ptr(s)) != kept.as_ref().map(ptr) {
                *update.slices_changed.entry(kind).or_default() += 1;
                match &kept {
                    Some(slice) => update.new_slices.push(Arc::clone(slice)),
                    None => update.removed_slices.push(key.clone()),
                }
            }
            recheck_loose.insert(key.clone());
            let Some(slice) = kept else {
                continue;
            };
            let owner = match owner(&slice) {
                Owner::Ignored => {
                    self.slices.insert(key.clone(), (slice, None));
                    recheck_loose.remove(key);
                    self.set_loose_problems(key, Vec::new());
                    continue;
                }
                Owner::Service(ns, name) => {
                    // The Service's own key when it exists, shared rather than copied.
                    let name = (ns.to_string(), name.to_string());
                    Some(match self.svc_objects.get_key_value(&name) {
                        Some((key, _)) => Arc::clone(key),
                        None => Arc::new(name),
                    })
                }
                Owner::Nobody => None,
            };
            if let Some(owner) = &owner {
                let group = self.groups.entry(owner.clone()).or_default();
                if let Err(at) = group.binary_search(key) {
                    group.insert(at, key.clone());
                }
                touched_services.insert(owner.clone());
            }
            self.slices.insert(key.clone(), (slice, owner));
        }

        let keys: Vec<Key> = if update.full {
            let mut all: BTreeSet<Key> = self.svc_objects.keys().cloned().collect();
            all.extend(self.services.keys().cloned());
            all.into_iter().collect()
        } else {
            touched_services.into_iter().collect()
        };
        for key in keys {
            let (kept, dups) = match self.svc_objects.get(&key) {
                Some(copies) => pick(copies, "Service"),
                None => (None, Vec::new()),
            };
            self.set_dup_problems("Service", &key, dups);
            // A Service coming or going changes whether its slices are loose.
            let had = self.services.contains_key(&key);
            if had != kept.is_some()
                && let Some(group) = self.groups.get(&key)
            {
                recheck_loose.extend(group.iter().cloned());
            }
            let Some(svc) = kept else {
                if had {
                    self.replace(&key, None, &mut update.changed);
                }
                continue;
            };
            let group: Vec<Arc<Slice>> = self
                .groups
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|k| self.slices.get(k).map(|(s, _)| Arc::clone(s)))
                .collect();
            let cached = self.services.get(&key);
            let same_objects = cached.is_some_and(|c| {
                Arc::ptr_eq(&c.service, &svc)
                    && c.slices.len() == group.len()
                    && c.slices.iter().zip(&group).all(|(a, b)| Arc::ptr_eq(a, b))
            });
            if same_objects && !update.full {
                continue;
            }
            let refs: Vec<&Slice> = group.iter().map(|s| &**s).collect();
            let out = compile_one(&svc, &refs, &node, &config);
            update.recompiled += 1;
            let same = cached.is_some_and(|c| self.merged_equals(&key, c, &out));
            let new = Cached::new(svc, group, &out);
            if same {
                // Same result from new objects: keep them, nothing to merge.
                self.services.insert(key, new);
                continue;
            }
            self.replace(&key, Some((new, out)), &mut update.changed);
        }

        // Slices no Service takes are still checked and reported.
        for key in recheck_loose {
            let loose = self.slices.get(&key).and_then(|(slice, owner)| {
                let taken = owner
                    .as_ref()
                    .is_some_and(|o| self.services.contains_key(o));
                (!taken).then(|| slice_problems(&[&**slice], &node))
            });
            self.set_loose_problems(&key, loose.unwrap_or_default());
        }
        if update.full {
            // The node's name can change what a loose slice's checks say.
            let loose: Vec<Key> = self.loose_problems.keys().cloned().collect();
            for key in loose {
                let problems = self
                    .slices
                    .get(&key)
                    .map(|(slice, _)| slice_problems(&[&**slice], &node))
                    .unwrap_or_default();
                self.set_loose_problems(&key, problems);
            }
        }
        if self.problems_stale {
            self.desired.problems = self.problems();
            self.problems_stale = false;
        }
        if update.full {
            update.changed = self.desired.frontends.keys().copied().collect();
        }
        update
    }

    fn set_dup_problems(&mut self, kind: &'static str, key: &Key, problems: Vec<Problem>) {
        let slot = (kind, key.clone());
        let old = if problems.is_empty() {
            self.dup_problems.remove(&slot)
        } else {
            self.dup_problems.insert(slot, problems.clone())
        };
        if old.unwrap_or_default() != problems {
            self.problems_stale = true;
        }
    }

    fn set_loose_problems(&mut self, key: &Key, problems: Vec<Problem>) {
        let old = if problems.is_empty() {
            self.loose_problems.remove(key)
        } else {
            self.loose_problems.insert(key.clone(), problems.clone())
        };
        if old.unwrap_or_default() != problems {
            self.problems_stale = true;
        }
    }

    /// Replaces a Service's share of the merged state (None: the Service is gone), recording
    /// the frontends whose state may have changed.
    /// Whether `out` is what the merged state holds for this Service already (a frontend it
    /// claims without owning counts as different: rare, and then merged again).
    fn merged_equals(&self, key: &Key, cached: &Cached, out: &ServiceOut) -> bool {
        cached.problems == out.problems
            && cached.frontends.iter().eq(out.frontends.keys())
            && cached.ports.iter().eq(out.ports.keys())
            && out.frontends.iter().all(|(addr, state)| {
                self.claims.get(addr).and_then(|c| c.first()) == Some(key)
                    && self.desired.frontends.get(addr) == Some(state)
            })
            && out
                .ports
                .iter()
                .all(|(name, port)| self.desired.ports.get(name) == Some(port))
    }

    /// The state Service `key` wants for frontend `addr`: compiled again from its cached
    /// objects (only when it takes over a frontend another Service owned).
    fn state_of(
        &self,
        key: &Key,
        addr: &FrontendAddr,
    ) -> Option<(FrontendState, Vec<FrontendAddr>)> {
        let cached = self.services.get(key)?;
        let (node, config) = self.inputs.as_ref()?;
        let refs: Vec<&Slice> = cached.slices.iter().map(|s| &**s).collect();
        let out = compile_one(&cached.service, &refs, node, config);
        let state = out.frontends.get(addr)?.clone();
        let same_port = out
            .frontends
            .iter()
            .filter(|(_, s)| s.port == state.port)
            .map(|(f, _)| *f)
            .collect();
        Some((state, same_port))
    }

    fn replace(
        &mut self,
        key: &Key,
        new: Option<(Cached, ServiceOut)>,
        changed: &mut BTreeSet<FrontendAddr>,
    ) {
        let conflicts = self.conflicted.len();
        self.replace_inner(key, new, changed);
        // Conflicts name their owner's port: any conflict change, or a Service with problems
        // coming or going, makes the list stale.
        if self.conflicted.len() != conflicts || !self.conflicted.is_empty() {
            self.problems_stale = true;
        }
    }

    fn replace_inner(
        &mut self,
        key: &Key,
        new: Option<(Cached, ServiceOut)>,
        changed: &mut BTreeSet<FrontendAddr>,
    ) {
        if let Some(old) = self.services.remove(key) {
            if !old.problems.is_empty() {
                self.problems_stale = true;
            }
            for name in &old.ports {
                self.desired.ports.remove(name);
            }
            for addr in &old.frontends {
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
                        self.set_frontend(*addr, None);
                    }
                    Some(next) if owned => {
                        // The next claimant owns it now. Its Service port's other frontends
                        // count as changed too: a plan settles a port's id over all of them.
                        let next = next.clone();
                        if let Some((state, same_port)) = self.state_of(&next, addr) {
                            changed.extend(same_port);
                            self.set_frontend(*addr, Some(state));
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        let Some((new, out)) = new else {
            return;
        };
        if !new.problems.is_empty() {
            self.problems_stale = true;
        }
        for (name, port) in out.ports {
            self.desired.ports.insert(name, port);
        }
        for (addr, state) in out.frontends {
            changed.insert(addr);
            let claims = self.claims.entry(addr).or_default();
            let at = claims.partition_point(|k| k < key);
            claims.insert(at, key.clone());
            if claims.len() > 1 {
                self.conflicted.insert(addr);
            }
            if at == 0 {
                self.set_frontend(addr, Some(state));
            }
        }
        self.services.insert(key.clone(), new);
    }

    /// Every problem: duplicate names (Services, then slices), slices no Service takes, each
    /// Service's in name order, then frontends claimed twice; one line per fault.
    fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = Vec::new();
        for kind in ["Service", "EndpointSlice"] {
            out.extend(
                self.dup_problems
                    .iter()
                    .filter(|((k, _), _)| *k == kind)
                    .flat_map(|(_, p)| p.iter().cloned()),
            );
        }
        out.extend(self.loose_problems.values().flatten().cloned());
        for cached in self.services.values() {
            out.extend(cached.problems.iter().cloned());
        }
        for addr in &self.conflicted {
            let claims = &self.claims[addr];
            let Some(owner) = self.desired.frontends.get(addr) else {
                continue;
            };
            for other in &claims[1..] {
                out.push(Problem {
                    reason: ProblemReason::Conflict,
                    object: self.services[other].object.clone(),
                    message: format!("{addr} is already used by {}; not programmed", owner.port),
                });
            }
        }
        let mut seen = BTreeSet::new();
        out.retain(|p| seen.insert(p.to_string()));
        out
    }
}
