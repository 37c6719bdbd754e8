//! PURE: the agent's copy of what the maps hold, with the indexes that let a change of a few
//! frontends be planned by looking at those frontends only: backend ids by identity, how many
//! member entries point at each backend, and the id pools.
//!
//! `plan_changed` plans the changed frontends against their own entries (and the backends they
//! use or want) with the same `plan_with` a full plan uses, then drops what would touch
//! entries other frontends still need: a backend another frontend points at, a ClusterIP
//! marker another frontend of that address keeps.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::BuildHasher,
};

use proxy_common::backend::BackendValue;

use super::{
    BackendIdentity, Ids, MapState, Op, ServiceKey, backend_value, identity_of, maglev_range,
    member_range, plan_with, range_range, slot_range,
};
use crate::compile::{Desired, FrontendAddr, FrontendKind, Scope};

/// Backend ids by identity. Holds each id with 32 bits of its identity's hash (8 bytes per
/// backend, against 28 for a map keyed by identity); the identity itself is read from the
/// backends it indexes when the hashes match.
#[derive(Clone, Default)]
struct ByIdentity {
    /// (id, hash).
    table: hashbrown::HashTable<(u32, u32)>,
    hasher: std::hash::RandomState,
}

impl std::fmt::Debug for ByIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ByIdentity({} ids)", self.table.len())
    }
}

/// The table's hash of an entry: its 32 bits spread over 64 (the table reads the top bits).
fn spread(hash: u32) -> u64 {
    u64::from(hash).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl ByIdentity {
    fn hash(&self, identity: &BackendIdentity) -> u32 {
        self.hasher.hash_one(identity) as u32
    }

    fn get(
        &self,
        identity: &BackendIdentity,
        backends: &BTreeMap<u32, BackendValue>,
    ) -> Option<u32> {
        let hash = self.hash(identity);
        let same = |(id, h): &(u32, u32)| {
            *h == hash && backends.get(id).map(identity_of).as_ref() == Some(identity)
        };
        self.table.find(spread(hash), same).map(|(id, _)| *id)
    }

    /// Indexes `id`, which `backends` holds already; it replaces an id of the same identity.
    fn insert(&mut self, id: u32, backends: &BTreeMap<u32, BackendValue>) {
        let Some(identity) = backends.get(&id).map(identity_of) else {
            return;
        };
        let hash = self.hash(&identity);
        let same = |(other, h): &(u32, u32)| {
            *h == hash && backends.get(other).map(identity_of) == Some(identity)
        };
        match self.table.find_mut(spread(hash), same) {
            Some(entry) => entry.0 = id,
            None => {
                self.table
                    .insert_unique(spread(hash), (id, hash), |(_, h)| spread(*h));
            }
        }
    }

    /// Forgets `id`, whose identity is `identity`, if it is the one indexed for it.
    fn remove(&mut self, id: u32, identity: &BackendIdentity) {
        let hash = self.hash(identity);
        if let Ok(entry) = self
            .table
            .find_entry(spread(hash), |(other, _)| *other == id)
        {
            entry.remove();
        }
    }

    /// As a plain map, to compare.
    fn to_map(&self, backends: &BTreeMap<u32, BackendValue>) -> HashMap<BackendIdentity, u32> {
        self.table
            .iter()
            .filter_map(|(id, _)| Some((identity_of(backends.get(id)?), *id)))
            .collect()
    }
}

/// The maps as the agent last wrote them, indexed.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    state: MapState,
    ids: Ids,
    by_identity: ByIdentity,
    /// Member entries per backend id, by id (ids are handed out lowest first, so dense).
    backend_refs: Vec<u32>,
    /// Frontend entries per Service-port id.
    port_refs: HashMap<u32, u32>,
    /// The frontend entry of each frontend id.
    keys: HashMap<u32, ServiceKey>,
}

impl Mirror {
    /// Indexes `state` (read from the maps).
    pub fn new(state: MapState) -> Mirror {
        let mut m = Mirror {
            ids: Ids::of(&state),
            ..Mirror::default()
        };
        // The first id of an identity is indexed.
        for id in state.backends.keys().rev() {
            m.by_identity.insert(*id, &state.backends);
        }
        for k in state.members.keys() {
            *m.backend_ref(k.backend_id) += 1;
        }
        for (k, v) in &state.services {
            if !k.is_any_port() {
                *m.port_refs.entry(v.port_id).or_default() += 1;
                m.keys.insert(v.id, *k);
            }
        }
        m.state = state;
        m
    }

    /// Whether the indexes say what indexing the state afresh says (ids free below the highest
    /// aside, which depend on history). For tests and `verify`.
    pub fn check(&self) -> Result<(), String> {
        let fresh = Mirror::new(self.state.clone());
        let backends = &self.state.backends;
        if fresh.by_identity.to_map(backends) != self.by_identity.to_map(backends) {
            return Err("backend identities differ from the state's".into());
        }
        let refs = |r: &[u32]| -> Vec<u32> {
            let used = r.iter().rposition(|n| *n != 0).map_or(0, |i| i + 1);
            r[..used].to_vec()
        };
        if refs(&fresh.backend_refs) != refs(&self.backend_refs) {
            return Err("backend reference counts differ from the state's".into());
        }
        if fresh.port_refs != self.port_refs {
            return Err("port reference counts differ from the state's".into());
        }
        if fresh.keys != self.keys {
            return Err("frontend keys by id differ from the state's".into());
        }
        for (what, a, b) in [
            ("frontend", &fresh.ids.svc, &self.ids.svc),
            ("port", &fresh.ids.port, &self.ids.port),
            ("backend", &fresh.ids.backend, &self.ids.backend),
        ] {
            if a.used != b.used {
                return Err(format!("{what} ids in use differ from the state's"));
            }
        }
        Ok(())
    }

    /// The protocol of the frontend with id `id`.
    pub fn proto_of(&self, id: u32) -> Option<u8> {
        self.keys.get(&id).map(|k| match k {
            ServiceKey::V4(k) => k.proto,
            ServiceKey::V6(k) => k.proto,
        })
    }

    pub fn state(&self) -> &MapState {
        &self.state
    }

    /// The frontend entry of frontend `id`, if it has one.
    pub fn service_of(&self, id: u32) -> Option<&proxy_common::service::ServiceValue> {
        self.keys.get(&id).and_then(|k| self.state.services.get(k))
    }

    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    /// Rebuilds the copy's ordered maps with full nodes (after a full sync). Entries written
    /// one at a time in key order leave every B-tree node a little over half full; built from
    /// the sorted entries at once, the nodes are full: at 10,000 Services x 100 endpoints the
    /// copy shrinks by about a third. The entries and the indexes are unchanged.
    pub fn compact(&mut self) {
        self.state.compact();
    }

    /// Applies one write, keeping the indexes.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, _) => {
                if let Some(old) = self.state.backends.get(id) {
                    self.by_identity.remove(*id, &identity_of(old));
                }
                self.ids.backend.take(*id);
                self.state.apply(op);
                self.by_identity.insert(*id, &self.state.backends);
                return;
            }
            Op::DelBackend(id) => {
                if let Some(old) = self.state.backends.get(id) {
                    self.by_identity.remove(*id, &identity_of(old));
                }
                self.ids.backend.release(*id);
            }
            Op::PutMember(k, _) if !self.state.members.contains_key(k) => {
                *self.backend_ref(k.backend_id) += 1;
            }
            Op::DelMember(k) if self.state.members.contains_key(k) => {
                self.unref_backend(k.backend_id);
            }
            Op::PutService(k, v) if !k.is_any_port() => {
                match self.state.services.get(k) {
                    Some(old) if old.port_id == v.port_id => {}
                    Some(old) => {
                        let old = old.port_id;
                        self.unref_port(old);
                        *self.port_refs.entry(v.port_id).or_default() += 1;
                    }
                    None => *self.port_refs.entry(v.port_id).or_default() += 1,
                }
                self.ids.port.take(v.port_id);
                self.ids.svc.take(v.id);
                self.keys.insert(v.id, *k);
            }
            Op::DelService(k) if !k.is_any_port() => {
                if let Some(old) = self.state.services.get(k) {
                    let (port, id) = (old.port_id, old.id);
                    self.unref_port(port);
                    if self.keys.get(&id) == Some(k) {
                        self.keys.remove(&id);
                    }
                }
            }
            Op::PutInfo(id, _) => self.ids.svc.take(*id),
            // A frontend's info goes last of its entries (`plan_with`): its id is free again.
            Op::DelInfo(id) => self.ids.svc.release(*id),
            _ => {}
        }
        self.state.apply(op);
    }

    fn backend_ref(&mut self, id: u32) -> &mut u32 {
        let i = id as usize;
        if self.backend_refs.len() <= i {
            self.backend_refs.resize(i + 1, 0);
        }
        &mut self.backend_refs[i]
    }

    fn unref_backend(&mut self, id: u32) {
        if let Some(n) = self.backend_refs.get_mut(id as usize) {
            *n = n.saturating_sub(1);
        }
    }

    /// Member entries that point at backend `id`.
    fn refs_of(&self, id: u32) -> u32 {
        self.backend_refs.get(id as usize).copied().unwrap_or(0)
    }

    fn unref_port(&mut self, id: u32) {
        if let Some(n) = self.port_refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.port_refs.remove(&id);
                self.ids.port.release(id);
            }
        }
    }

    /// The writes that make the maps hold `desired`, looking at everything.
    pub fn plan_full(&mut self, desired: &Desired) -> Vec<Op> {
        // Ids allocated here are taken in the pools at once (applying the writes takes them
        // again); after a failed write the agent reads the maps back into a new mirror.
        plan_with(desired, &self.state, &mut self.ids)
    }

    /// The frontends a full plan covers, in groups of about `entries` entries (a frontend and
    /// each of its backends count one; the frontends of one Service port are always in one
    /// group), to plan and write one group at a time with `plan_changed`: first those
    /// `desired` wants, by port, then those the maps hold that it does not want. Applied in
    /// order, the groups' writes leave the maps as `plan_full`'s would. `None` when the maps
    /// hold entries that belong to no frontend (left by an interrupted run or another agent):
    /// only `plan_full` finds and removes those.
    pub fn full_groups(
        &self,
        desired: &Desired,
        entries: usize,
    ) -> Option<Vec<BTreeSet<FrontendAddr>>> {
        if !self.tidy(desired) {
            return None;
        }
        let gone = self
            .keys
            .values()
            .filter_map(ServiceKey::frontend)
            .filter(|f| !desired.frontends.contains_key(f));
        Some(self.groups(
            desired,
            desired.frontends.keys().copied().chain(gone),
            entries,
        ))
    }

    /// `changed` (the frontends an incremental sync plans) in groups as `full_groups` makes
    /// them, to plan and write one group at a time with `plan_changed`: a change of many
    /// Services at once (a namespace created or deleted, every Service re-listed) then holds
    /// one group's writes in memory, not the whole change's. Applied in order, the groups'
    /// writes leave the maps as one `plan_changed` over `changed` would.
    pub fn changed_groups(
        &self,
        desired: &Desired,
        changed: &BTreeSet<FrontendAddr>,
        entries: usize,
    ) -> Vec<BTreeSet<FrontendAddr>> {
        self.groups(desired, changed.iter().copied(), entries)
    }

    /// Whether planning `changed` at once would hold more than about `entries` entries' writes
    /// (see `changed_groups`).
    pub fn is_large(
        &self,
        desired: &Desired,
        changed: &BTreeSet<FrontendAddr>,
        entries: usize,
    ) -> bool {
        let mut size = 0;
        changed.iter().any(|f| {
            size += self.entries_of(desired, f);
            size > entries
        })
    }

    /// Entries a plan of frontend `f` writes about: the frontend and each of its backends,
    /// wanted or (for a frontend going away) programmed.
    fn entries_of(&self, desired: &Desired, f: &FrontendAddr) -> usize {
        match desired.frontends.get(f) {
            Some(state) => 1 + state.backends.len() + state.keep_flows.len(),
            None => {
                1 + self
                    .state
                    .services
                    .get(&ServiceKey::of(f))
                    .map_or(0, |v| self.state.members.range(member_range(v.id)).count())
            }
        }
    }

    /// `frontends` in groups of about `entries` entries: those `desired` wants by Service port
    /// (the frontends of one port always in one group), then those it does not want.
    fn groups(
        &self,
        desired: &Desired,
        frontends: impl Iterator<Item = FrontendAddr>,
        entries: usize,
    ) -> Vec<BTreeSet<FrontendAddr>> {
        let mut by_port: BTreeMap<&crate::compile::PortName, Vec<FrontendAddr>> = BTreeMap::new();
        let mut gone: Vec<FrontendAddr> = Vec::new();
        for f in frontends {
            match desired.frontends.get(&f) {
                Some(state) => by_port.entry(&state.port).or_default().push(f),
                None => gone.push(f),
            }
        }
        gone.sort();
        let mut groups = Vec::new();
        let mut group = BTreeSet::new();
        let mut size = 0;
        let mut close = |group: &mut BTreeSet<FrontendAddr>, size: &mut usize, force: bool| {
            if (force || *size >= entries) && !group.is_empty() {
                groups.push(std::mem::take(group));
                *size = 0;
            }
        };
        for frontends in by_port.values() {
            for f in frontends {
                size += self.entries_of(desired, f);
                group.insert(*f);
            }
            close(&mut group, &mut size, false);
        }
        for f in gone {
            size += self.entries_of(desired, &f);
            group.insert(f);
            close(&mut group, &mut size, false);
        }
        close(&mut group, &mut size, true);
        groups
    }

    /// Whether every entry of the maps belongs to a frontend the mirror knows (so that
    /// planning frontend by frontend reaches all of them), given what `desired` wants.
    fn tidy(&self, desired: &Desired) -> bool {
        let s = &self.state;
        let known = |id: &u32| self.keys.contains_key(id);
        let internal: std::collections::HashSet<std::net::IpAddr> = self
            .keys
            .values()
            .filter_map(ServiceKey::frontend)
            .filter(|f| f.scope == Scope::Internal)
            .map(|f| f.addr)
            .collect();
        let internal_at = |addr: std::net::IpAddr| internal.contains(&addr);
        s.services.iter().all(|(k, v)| {
            if k.is_any_port() {
                has_cluster_ip(desired, k.addr()) || internal_at(k.addr())
            } else {
                self.keys.get(&v.id) == Some(k)
            }
        }) && s.slots.keys().all(|k| known(&k.svc_id))
            && s.members.keys().all(|k| known(&k.svc_id))
            && s.infos.keys().all(known)
            && s.source_ranges
                .iter()
                .all(|r| r.svc_id == super::SERVICE_CIDRS || known(&r.svc_id))
            && s.maglev.keys().all(|k| known(&k.svc_id))
            && s.backends.keys().all(|id| self.refs_of(*id) > 0)
    }

    /// The writes that make the maps hold `desired` for the frontends in `changed`, every other
    /// frontend being programmed already. Equal, once applied, to what `plan_full` leads to.
    pub fn plan_changed(&mut self, desired: &Desired, changed: &BTreeSet<FrontendAddr>) -> Vec<Op> {
        let mut sub = Desired {
            maglev_size: desired.maglev_size,
            ..Desired::default()
        };
        let mut cur = MapState::default();
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        for f in changed {
            if let Some(state) = desired.frontends.get(f) {
                sub.frontends.insert(*f, state.clone());
                if let Some(p) = desired.ports.get(&state.port) {
                    sub.ports.insert(state.port.clone(), p.clone());
                }
            }
            let key = ServiceKey::of(f);
            if let Some(v) = self.state.services.get(&key) {
                cur.services.insert(key, *v);
                touched.insert(v.id);
            }
            if f.scope == Scope::Internal {
                let marker = ServiceKey::any_port(f.addr);
                if let Some(v) = self.state.services.get(&marker) {
                    cur.services.insert(marker, *v);
                }
            }
        }
        for &id in &touched {
            cur.slots.extend(
                self.state
                    .slots
                    .range(slot_range(id))
                    .map(|(k, v)| (*k, *v)),
            );
            cur.members.extend(
                self.state
                    .members
                    .range(member_range(id))
                    .map(|(k, v)| (*k, *v)),
            );
            cur.maglev.extend(
                self.state
                    .maglev
                    .range(maglev_range(id))
                    .map(|(k, v)| (*k, v.clone())),
            );
            if let Some(info) = self.state.infos.get(&id) {
                cur.infos.insert(id, *info);
            }
            cur.source_ranges
                .extend(self.state.source_ranges.range(range_range(id)).copied());
        }
        // The backends these frontends point at, and those they want that exist already.
        let mut refs_here: HashMap<u32, u32> = HashMap::new();
        for k in cur.members.keys() {
            *refs_here.entry(k.backend_id).or_default() += 1;
        }
        for id in refs_here.keys() {
            if let Some(v) = self.state.backends.get(id) {
                cur.backends.insert(*id, *v);
            }
        }
        for state in sub.frontends.values() {
            for b in &state.backends {
                let identity = identity_of(&backend_value(b));
                if let Some(id) = self.by_identity.get(&identity, &self.state.backends)
                    && let Some(v) = self.state.backends.get(&id)
                {
                    cur.backends.insert(id, *v);
                }
            }
        }
        let mut ops = plan_with(&sub, &cur, &mut self.ids);
        let used_elsewhere = |id: &u32| self.refs_of(*id) > refs_here.get(id).copied().unwrap_or(0);
        ops.retain(|op| match op {
            // Another frontend still points at it.
            Op::DelBackend(id) => !used_elsewhere(id),
            // Another frontend uses it as it is (the first frontend's value wins in a full
            // plan; here the one already written stays).
            Op::PutBackend(id, _) => !(self.state.backends.contains_key(id) && used_elsewhere(id)),
            // Another ClusterIP frontend of this address is still wanted.
            Op::DelService(k) if k.is_any_port() => !has_cluster_ip(desired, k.addr()),
            _ => true,
        });
        ops
    }
}

/// Whether `desired` has a ClusterIP frontend (internal scope) on `addr`.
fn has_cluster_ip(desired: &Desired, addr: std::net::IpAddr) -> bool {
    desired
        .frontends
        .range(FrontendAddr::lowest(addr)..)
        .take_while(|(f, _)| f.addr == addr)
        .any(|(f, s)| f.scope == Scope::Internal && s.kind == FrontendKind::ClusterIp)
}
