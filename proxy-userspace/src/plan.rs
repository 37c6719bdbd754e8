//! PURE: (desired frontends, what the maps hold) → the ordered map writes that turn one into
//! the other without ever exposing a half-updated Service.
//!
//! Order: backends are added first; a changed frontend gets its new slots written in the
//! generation it does not use, then its entry is flipped in one update, then the old slots and
//! members are removed; removed frontends go before unused backends. Ids are reused from the
//! maps, so an agent restart (which reads the maps back) writes only what changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use proxy_common::{
    backend::{BACKEND_LOCAL, BACKEND_TERMINATING, BackendValue, FAMILY_V4, FAMILY_V6},
    info::{
        INFO_ETP_LOCAL, INFO_ITP_LOCAL, KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER,
        KIND_NODE_PORT, ServiceInfo,
    },
    maglev::{MAGLEV_CHUNK, MaglevChunk, MaglevKey},
    service::{
        FLAG_AFFINITY, FLAG_LEAST_CONN, FLAG_MAGLEV, FLAG_NEVER_QUEUE, FLAG_NO_LOCAL,
        FLAG_ROUND_ROBIN, FLAG_SED, FLAG_SNAT, FLAG_SOURCE_HASH, FLAG_SOURCE_RANGES, FLAG_WEIGHTED,
        MemberKey, MemberValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, SLOT_CHUNK, Service4Key,
        Service6Key, ServiceValue, SlotChunk, SlotKey,
    },
};

use crate::compile::{
    Backend, Cidr, Desired, FrontendAddr, FrontendKind, FrontendState, PortName, Proto, Scheduler,
    Scope,
};

/// A frontend key of either family.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceKey {
    V4(Service4Key),
    V6(Service6Key),
}

impl ServiceKey {
    fn new(addr: IpAddr, port: u16, proto: u8, scope: Scope) -> Self {
        let scope = match scope {
            Scope::Internal => SCOPE_INTERNAL,
            Scope::External => SCOPE_EXTERNAL,
        };
        match addr {
            IpAddr::V4(a) => ServiceKey::V4(Service4Key {
                addr: a.octets(),
                port,
                proto,
                scope,
            }),
            IpAddr::V6(a) => ServiceKey::V6(Service6Key {
                addr: a.octets(),
                port,
                proto,
                scope,
            }),
        }
    }

    pub fn of(frontend: &FrontendAddr) -> Self {
        ServiceKey::new(
            frontend.addr,
            frontend.port,
            frontend.proto.number(),
            frontend.scope,
        )
    }

    /// The entry that marks `addr` as a ClusterIP: ports without a frontend of their own are
    /// rejected (nftables mode, semantics 3.12).
    pub fn any_port(addr: IpAddr) -> Self {
        ServiceKey::new(addr, 0, 0, Scope::Internal)
    }

    pub fn is_any_port(&self) -> bool {
        match self {
            ServiceKey::V4(k) => k.port == 0 && k.proto == 0,
            ServiceKey::V6(k) => k.port == 0 && k.proto == 0,
        }
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            ServiceKey::V4(k) => IpAddr::from(k.addr),
            ServiceKey::V6(k) => IpAddr::from(k.addr),
        }
    }

    /// The frontend this key stands for, if its protocol is one we know.
    pub fn frontend(&self) -> Option<FrontendAddr> {
        let (addr, port, proto, scope) = match self {
            ServiceKey::V4(k) => (IpAddr::from(k.addr), k.port, k.proto, k.scope),
            ServiceKey::V6(k) => (IpAddr::from(k.addr), k.port, k.proto, k.scope),
        };
        Some(FrontendAddr {
            addr,
            port,
            proto: Proto::from_number(proto)?,
            scope: match scope {
                SCOPE_INTERNAL => Scope::Internal,
                SCOPE_EXTERNAL => Scope::External,
                _ => return None,
            },
        })
    }
}

/// The contents of the maps the agent owns, as plain collections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Slot chunks (`SLOT_CHUNK` slots each).
    pub slots: BTreeMap<SlotKey, SlotChunk>,
    pub members: BTreeMap<MemberKey, MemberValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    /// Inspection-only: which Service port each frontend id belongs to.
    pub infos: BTreeMap<u32, ServiceInfo>,
    /// Allowed source prefixes per frontend id (loadBalancerSourceRanges).
    pub source_ranges: BTreeSet<SourceRange>,
    /// Maglev table chunks.
    pub maglev: BTreeMap<MaglevKey, Box<MaglevChunk>>,
}

impl MapState {
    /// Rebuilds every ordered map from its sorted entries, which fills the B-tree nodes
    /// (`Mirror::compact`). One map at a time, so the extra memory is one map's entries.
    pub fn compact(&mut self) {
        fn rebuild<K: Ord, V>(map: &mut BTreeMap<K, V>) {
            *map = std::mem::take(map).into_iter().collect();
        }
        rebuild(&mut self.services);
        rebuild(&mut self.slots);
        rebuild(&mut self.members);
        rebuild(&mut self.backends);
        rebuild(&mut self.infos);
        rebuild(&mut self.maglev);
        self.source_ranges = std::mem::take(&mut self.source_ranges)
            .into_iter()
            .collect();
    }
}

/// One allowed source prefix of a frontend.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub svc_id: u32,
    pub cidr: Cidr,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, BackendValue),
    PutSlot(SlotKey, Box<SlotChunk>),
    PutMember(MemberKey, MemberValue),
    PutService(ServiceKey, ServiceValue),
    DelService(ServiceKey),
    DelSlot(SlotKey),
    DelMember(MemberKey),
    DelBackend(u32),
    PutInfo(u32, Box<ServiceInfo>),
    DelInfo(u32),
    PutSourceRange(SourceRange),
    DelSourceRange(SourceRange),
    PutMaglev(MaglevKey, Box<MaglevChunk>),
    DelMaglev(MaglevKey),
}

/// Writes that may go to the kernel as one batch when they follow each other: slots, members
/// and backends (the bulk of every plan).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKind {
    PutSlots,
    DelSlots,
    PutMembers,
    DelMembers,
    PutBackends,
    DelBackends,
}

impl Op {
    /// The batch this write can join, if any.
    pub fn batch_kind(&self) -> Option<BatchKind> {
        Some(match self {
            Op::PutSlot(..) => BatchKind::PutSlots,
            Op::DelSlot(..) => BatchKind::DelSlots,
            Op::PutMember(..) => BatchKind::PutMembers,
            Op::DelMember(..) => BatchKind::DelMembers,
            Op::PutBackend(..) => BatchKind::PutBackends,
            Op::DelBackend(..) => BatchKind::DelBackends,
            _ => return None,
        })
    }

    /// The map this write goes to (its pin name).
    pub fn map(&self) -> &'static str {
        use proxy_common::maps as m;
        match self {
            Op::PutBackend(..) | Op::DelBackend(_) => m::LB_BACKENDS,
            Op::PutSlot(..) | Op::DelSlot(_) => m::LB_SLOTS,
            Op::PutMember(..) | Op::DelMember(_) => m::LB_MEMBERS,
            Op::PutService(ServiceKey::V4(_), _) | Op::DelService(ServiceKey::V4(_)) => {
                m::LB4_SERVICES
            }
            Op::PutService(ServiceKey::V6(_), _) | Op::DelService(ServiceKey::V6(_)) => {
                m::LB6_SERVICES
            }
            Op::PutInfo(..) | Op::DelInfo(_) => m::LB_SVC_INFO,
            Op::PutSourceRange(r) | Op::DelSourceRange(r) => match r.cidr.addr {
                std::net::IpAddr::V4(_) => m::LB4_SRC_RANGES,
                std::net::IpAddr::V6(_) => m::LB6_SRC_RANGES,
            },
            Op::PutMaglev(..) | Op::DelMaglev(_) => m::LB_MAGLEV,
        }
    }

    /// The frontend id this write belongs to, where it belongs to one (`current` resolves the
    /// id of a deleted frontend); backends are shared and belong to none, nor do the ClusterIP
    /// markers (id 0).
    pub fn svc_id(&self, current: &MapState) -> Option<u32> {
        let id = match self {
            Op::PutBackend(..) | Op::DelBackend(_) => None,
            Op::PutSlot(k, _) | Op::DelSlot(k) => Some(k.svc_id),
            Op::PutMember(k, _) | Op::DelMember(k) => Some(k.svc_id),
            Op::PutService(_, v) => Some(v.id),
            Op::DelService(k) => current.services.get(k).map(|v| v.id),
            Op::PutInfo(id, _) | Op::DelInfo(id) => Some(*id),
            Op::PutSourceRange(r) | Op::DelSourceRange(r) => Some(r.svc_id),
            Op::PutMaglev(k, _) | Op::DelMaglev(k) => Some(k.svc_id),
        };
        id.filter(|id| *id != 0)
    }
}

/// A chunk's backend ids up to its last slot in use.
struct SlotIds<'a>(&'a SlotChunk);

impl fmt::Debug for SlotIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids = &self.0.backend_ids;
        let used = ids.iter().rposition(|id| *id != 0).map_or(0, |i| i + 1);
        f.debug_list().entries(&ids[..used]).finish()
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::PutMaglev(k, _) => write!(f, "PutMaglev({k:?})"),
            Op::PutSlot(k, v) => write!(f, "PutSlot({k:?}, {:?})", SlotIds(v)),
            Op::PutInfo(id, info) => write!(
                f,
                "PutInfo({id}, {} kind {} flags {:#x} port_id {})",
                info.name(),
                info.kind,
                info.flags,
                info.port_id
            ),
            other => write!(f, "{other:?}"),
        }
    }
}

impl MapState {
    /// Applies one write, as the kernel would.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutBackend(id, v) => {
                self.backends.insert(id, v);
            }
            Op::PutSlot(k, ref v) => {
                self.slots.insert(k, **v);
            }
            Op::PutMember(k, v) => {
                self.members.insert(k, v);
            }
            Op::PutService(k, v) => {
                self.services.insert(k, v);
            }
            Op::DelService(k) => {
                self.services.remove(&k);
            }
            Op::DelSlot(k) => {
                self.slots.remove(&k);
            }
            Op::DelMember(k) => {
                self.members.remove(&k);
            }
            Op::DelBackend(id) => {
                self.backends.remove(&id);
            }
            Op::PutInfo(id, ref v) => {
                self.infos.insert(id, **v);
            }
            Op::DelInfo(id) => {
                self.infos.remove(&id);
            }
            Op::PutSourceRange(r) => {
                self.source_ranges.insert(r);
            }
            Op::DelSourceRange(r) => {
                self.source_ranges.remove(&r);
            }
            Op::PutMaglev(k, ref v) => {
                self.maglev.insert(k, v.clone());
            }
            Op::DelMaglev(k) => {
                self.maglev.remove(&k);
            }
        }
    }

    /// Entries per map the agent writes, by map name.
    pub fn counts(&self) -> BTreeMap<&'static str, u32> {
        use proxy_common::maps as names;
        let v4 = self
            .services
            .keys()
            .filter(|k| matches!(k, ServiceKey::V4(_)))
            .count();
        let ranges4 = self
            .source_ranges
            .iter()
            .filter(|r| r.cidr.addr.is_ipv4())
            .count();
        [
            (names::LB4_SERVICES, v4),
            (names::LB6_SERVICES, self.services.len() - v4),
            (names::LB_SLOTS, self.slots.len()),
            (names::LB_MEMBERS, self.members.len()),
            (names::LB_BACKENDS, self.backends.len()),
            (names::LB_SVC_INFO, self.infos.len()),
            (names::LB_MAGLEV, self.maglev.len()),
            (names::LB4_SRC_RANGES, ranges4),
            (names::LB6_SRC_RANGES, self.source_ranges.len() - ranges4),
        ]
        .into_iter()
        .map(|(name, n)| (name, n as u32))
        .collect()
    }

    /// The backend ids of a frontend's live slots, in slot order; `None` for a slot that is
    /// missing or names a missing backend.
    pub fn live_slots(&self, svc: &ServiceValue) -> Vec<Option<u32>> {
        let mut chunk = None;
        (0..svc.count)
            .map(|slot| {
                if (slot as usize).is_multiple_of(SLOT_CHUNK) {
                    chunk = self
                        .slots
                        .get(&SlotKey::of_slot(svc.id, svc.generation(), slot));
                }
                chunk
                    .map(|c| c.backend_of(slot))
                    .filter(|id| *id != 0 && self.backends.contains_key(id))
            })
            .collect()
    }

    /// Every frontend's live slots exist and name existing backends: what a connecting socket
    /// relies on at every instant.
    pub fn consistent(&self) -> Result<(), String> {
        for (key, svc) in &self.services {
            if let Some(i) = self.live_slots(svc).iter().position(Option::is_none) {
                return Err(format!("{key:?}: live slot {i} missing or dangling"));
            }
        }
        Ok(())
    }
}

/// Identity of a backend in `LB_BACKENDS`: its whole value. Frontends share an entry when
/// they want the same value; an endpoint that two Services see differently (terminating in
/// one slice, not yet in the other; different weights) gets one entry per value, so no
/// frontend's view overrides another's, and planning one frontend never rewrites an entry
/// another frontend uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct BackendIdentity {
    addr: IpAddr,
    port: u16,
    proto: u8,
    flags: u8,
    weight: u16,
}

fn identity_of(v: &BackendValue) -> BackendIdentity {
    let addr = if v.family == FAMILY_V4 {
        IpAddr::from(v.addr4())
    } else {
        IpAddr::from(v.addr)
    };
    BackendIdentity {
        addr,
        port: v.port,
        proto: v.proto,
        flags: v.flags,
        weight: v.weight,
    }
}

/// Whether two backend entries are the same endpoint (address, port, protocol), whatever
/// their flags and weight.
pub fn same_endpoint(a: &BackendValue, b: &BackendValue) -> bool {
    endpoint_of(a) == endpoint_of(b)
}

/// A backend entry's endpoint: family, address, port, protocol.
type Endpoint = (u8, [u8; 16], u16, u8);

fn endpoint_of(v: &BackendValue) -> Endpoint {
    (v.family, v.addr, v.port, v.proto)
}

fn backend_value(b: &Backend) -> BackendValue {
    let (addr, family) = match b.addr {
        IpAddr::V4(a) => {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&a.octets());
            (addr, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    };
    let mut flags = 0;
    if b.local {
        flags |= BACKEND_LOCAL;
    }
    if b.terminating {
        flags |= BACKEND_TERMINATING;
    }
    BackendValue {
        addr,
        port: b.port,
        proto: b.proto.number(),
        family,
        flags,
        _pad: 0,
        weight: b.weight.max(1),
    }
}

/// Ids of one kind: those in use, and the gaps below the highest, handed out lowest first. Ids
/// stay below the number in use plus the churn of one sync, so arrays indexed by id
/// (`LB_CONNS` by backend id) never run out however long the agent churns. 0 is never used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdPool {
    pub(crate) used: BTreeSet<u32>,
    free: BTreeSet<u32>,
}

impl IdPool {
    /// The pool whose used ids are `used` (every gap below the highest is free).
    pub fn of(used: BTreeSet<u32>) -> IdPool {
        let mut free = BTreeSet::new();
        let mut next = 1;
        for &id in &used {
            free.extend(next..id);
            next = id.saturating_add(1);
        }
        free.remove(&0);
        IdPool { used, free }
    }

    /// The lowest free id, now used.
    pub fn allocate(&mut self) -> u32 {
        let id = match self.free.pop_first() {
            Some(id) => id,
            None => self.used.last().map_or(1, |m| m.saturating_add(1)),
        };
        self.used.insert(id);
        id
    }

    /// Marks `id` used (found in the maps, or written).
    pub fn take(&mut self, id: u32) {
        if id == 0 || !self.used.insert(id) {
            return;
        }
        if !self.free.remove(&id) {
            // Above the highest so far: the ids skipped become gaps.
            let below = self.used.range(..id).next_back().copied().unwrap_or(0);
            self.free.extend(below + 1..id);
        }
    }

    /// Gives `id` back.
    pub fn release(&mut self, id: u32) {
        if !self.used.remove(&id) {
            return;
        }
        match self.used.last() {
            // The highest went: the gaps above the new highest are no gaps any more.
            Some(&top) if top < id => {
                let _ = self.free.split_off(&(top + 1));
            }
            None => self.free.clear(),
            Some(_) => {
                self.free.insert(id);
            }
        }
    }

    pub fn contains(&self, id: u32) -> bool {
        self.used.contains(&id)
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// The highest id in use (0 when none).
    pub fn highest(&self) -> u32 {
        self.used.last().copied().unwrap_or(0)
    }
}

/// The id pools a plan allocates from: frontends, Service ports, backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    pub svc: IdPool,
    pub port: IdPool,
    pub backend: IdPool,
}

impl Ids {
    /// The ids `state` uses. A frontend id seen anywhere in the maps (an entry, slots, members
    /// or info, even leftovers of an interrupted run) is never handed out again while it is.
    pub fn of(state: &MapState) -> Ids {
        let mut svc: BTreeSet<u32> = state.services.values().map(|v| v.id).collect();
        svc.extend(state.slots.keys().map(|k| k.svc_id));
        svc.extend(state.members.keys().map(|k| k.svc_id));
        svc.extend(state.infos.keys().copied());
        svc.extend(state.maglev.keys().map(|k| k.svc_id));
        svc.remove(&0);
        let mut port: BTreeSet<u32> = state.services.values().map(|v| v.port_id).collect();
        port.remove(&0);
        Ids {
            svc: IdPool::of(svc),
            port: IdPool::of(port),
            backend: IdPool::of(state.backends.keys().copied().collect()),
        }
    }
}

/// Room for the port's name in `ServiceInfo`.
const INFO_NAME_LEN: usize = 248;

/// A port's name as its frontends' `ServiceInfo` holds it (cut at a character boundary).
fn info_text(port: &PortName) -> String {
    let mut text = port.to_string();
    let mut len = text.len().min(INFO_NAME_LEN);
    while !text.is_char_boundary(len) {
        len -= 1;
    }
    text.truncate(len);
    text
}

/// The inspection record of a frontend.
pub fn service_info(desired: &Desired, state: &FrontendState, port_id: u32) -> ServiceInfo {
    let mut name = [0u8; INFO_NAME_LEN];
    let text = info_text(&state.port);
    let len = text.len();
    name[..len].copy_from_slice(text.as_bytes());
    let port = desired.ports.get(&state.port);
    let mut flags = 0;
    if port.is_some_and(|p| p.itp_local) {
        flags |= INFO_ITP_LOCAL;
    }
    if port.is_some_and(|p| p.etp_local) {
        flags |= INFO_ETP_LOCAL;
    }
    ServiceInfo {
        port_id,
        kind: match state.kind {
            FrontendKind::ClusterIp => KIND_CLUSTER_IP,
            FrontendKind::ExternalIp => KIND_EXTERNAL_IP,
            FrontendKind::LoadBalancer => KIND_LOAD_BALANCER,
            FrontendKind::NodePort => KIND_NODE_PORT,
        },
        flags,
        name_len: len as u16,
        name,
    }
}

/// A frontend's Maglev table (`size` entries) in chunks, by backend id.
fn maglev_chunks(
    state: &FrontendState,
    backend_ids: &BTreeMap<BackendIdentity, u32>,
    size: u32,
) -> Vec<(u16, MaglevChunk)> {
    let named: Vec<(String, u32, u32)> = state
        .backends
        .iter()
        .map(|b| {
            let name = match b.addr {
                IpAddr::V4(a) => format!("{a}:{}", b.port),
                IpAddr::V6(a) => format!("[{a}]:{}", b.port),
            };
            let id = backend_ids[&identity_of(&backend_value(b))];
            (name, u32::from(b.weight.max(1)), id)
        })
        .collect();
    let members: Vec<crate::maglev::Member<'_>> = named
        .iter()
        .map(|(name, weight, id)| crate::maglev::Member {
            name: name.as_bytes(),
            weight: *weight,
            id: *id,
        })
        .collect();
    crate::maglev::table(&members, size)
        .chunks(MAGLEV_CHUNK)
        .enumerate()
        .map(|(i, ids)| {
            let mut chunk = MaglevChunk {
                backend_ids: [0; MAGLEV_CHUNK],
            };
            chunk.backend_ids[..ids.len()].copy_from_slice(ids);
            (i as u16, chunk)
        })
        .collect()
}

pub use crate::compile::MAX_SLOTS;

/// `ops` (a plan of a `desired` without the frontends in `keep`) without the writes that would
/// take away those frontends' entries: refused Service ports that were programmed
/// (`capacity::kept_frontends`) keep their entries, the backends their members point at and the
/// ClusterIP marker of their address.
pub fn keeping(ops: Vec<Op>, current: &MapState, keep: &BTreeSet<FrontendAddr>) -> Vec<Op> {
    if keep.is_empty() {
        return ops;
    }
    let ids: BTreeSet<u32> = keep
        .iter()
        .filter_map(|f| current.services.get(&ServiceKey::of(f)))
        .map(|v| v.id)
        .collect();
    let backends: BTreeSet<u32> = ids
        .iter()
        .flat_map(|id| {
            current
                .members
                .range(member_range(*id))
                .map(|(k, _)| k.backend_id)
        })
        .collect();
    let markers: BTreeSet<IpAddr> = keep
        .iter()
        .filter(|f| f.scope == Scope::Internal)
        .map(|f| f.addr)
        .collect();
    ops.into_iter()
        .filter(|op| match op {
            Op::DelBackend(id) => !backends.contains(id),
            Op::DelService(k) if k.is_any_port() => !markers.contains(&k.addr()),
            _ => !op.svc_id(current).is_some_and(|id| ids.contains(&id)),
        })
        .collect()
}

/// Computes the writes that turn `current` into `desired`.
pub fn plan(desired: &Desired, current: &MapState) -> Vec<Op> {
    let mut ops = plan_with(desired, current, &mut Ids::of(current));
    ops.extend(service_cidr_ops(desired, current));
    ops
}

/// As `plan`, allocating new ids from `ids` (which must hold at least every id `current` uses).
pub fn plan_with(desired: &Desired, current: &MapState, ids: &mut Ids) -> Vec<Op> {
    let mut adds = Vec::new(); // backends

    // Backends: reuse ids by identity.
    let mut backend_ids: BTreeMap<BackendIdentity, u32> = BTreeMap::new();
    for (id, v) in &current.backends {
        backend_ids.entry(identity_of(v)).or_insert(*id);
    }
    let mut wanted_backends: BTreeMap<u32, BackendValue> = BTreeMap::new();
    for state in desired.frontends.values() {
        for b in &state.backends {
            let value = backend_value(b);
            let identity = identity_of(&value);
            let id = *backend_ids
                .entry(identity)
                .or_insert_with(|| ids.backend.allocate());
            // The same endpoint can be local in one set and not another: flags are the same
            // for one node, so the first value wins.
            wanted_backends.entry(id).or_insert(value);
        }
    }
    for (id, value) in &wanted_backends {
        if current.backends.get(id) != Some(value) {
            adds.push(Op::PutBackend(*id, *value));
        }
    }

    // Frontend and Service-port ids. Ids seen anywhere in the maps are never handed out again
    // (`Ids::of`), so leftovers of an interrupted run cannot be mistaken for a new frontend's
    // entries.
    let mut port_ids: BTreeMap<&PortName, u32> = BTreeMap::new();
    for (frontend, state) in &desired.frontends {
        if let Some(v) = current.services.get(&ServiceKey::of(frontend)) {
            // Only a frontend that belonged to this port before hands its port id on: one
            // that moved here from another Service's port (a frontend two Services claim)
            // carries that port's id.
            let same_port = current
                .infos
                .get(&v.id)
                .is_some_and(|i| i.name() == info_text(&state.port));
            if same_port {
                port_ids.entry(&state.port).or_insert(v.port_id);
            }
        }
    }
    // A port id may only be kept by one port: if two ports claim one (frontends moved between
    // Services), the later one gets a fresh id.
    let mut claimed = BTreeSet::new();
    for id in port_ids.values_mut() {
        if !claimed.insert(*id) {
            *id = ids.port.allocate();
        }
    }

    // Ids that stay: frontends present now and still wanted.
    let kept_ids: BTreeSet<u32> = current
        .services
        .iter()
        .filter(|(k, _)| !k.is_any_port())
        .filter(|(k, _)| {
            k.frontend()
                .is_some_and(|f| desired.frontends.contains_key(&f))
        })
        .map(|(_, v)| v.id)
        .collect();

    // ClusterIP markers (no id, no slots: every lookup that lands on one is rejected).
    let cluster_ips: BTreeSet<IpAddr> = desired
        .frontends
        .iter()
        .filter(|(f, state)| state.kind == FrontendKind::ClusterIp && f.scope == Scope::Internal)
        .map(|(frontend, _)| frontend.addr)
        .collect();

    // First what goes away, which frees map space for what comes: unwanted frontends stop
    // being reachable before their slots, members and info are removed.
    let mut gone = Vec::new();
    for (key, value) in &current.services {
        let unwanted = if key.is_any_port() {
            !cluster_ips.contains(&key.addr())
        } else {
            !kept_ids.contains(&value.id)
        };
        if unwanted {
            gone.push(Op::DelService(*key));
        }
    }
    gone.extend(
        current
            .slots
            .keys()
            .filter(|k| !kept_ids.contains(&k.svc_id))
            .map(|k| Op::DelSlot(*k)),
    );
    gone.extend(
        current
            .members
            .keys()
            .filter(|k| !kept_ids.contains(&k.svc_id))
            .map(|k| Op::DelMember(*k)),
    );
    gone.extend(
        current
            .maglev
            .keys()
            .filter(|k| !kept_ids.contains(&k.svc_id))
            .map(|k| Op::DelMaglev(*k)),
    );
    gone.extend(
        current
            .infos
            .keys()
            .filter(|id| !kept_ids.contains(id))
            .map(|id| Op::DelInfo(*id)),
    );

    let marker = ServiceValue {
        id: 0,
        port_id: 0,
        rev: 0,
        affinity_timeout_secs: 0,
        count: 0,
        flags: 0,
    };
    let mut updates = Vec::new();
    let mut wanted_ranges: BTreeSet<SourceRange> = BTreeSet::new();
    // Backends only members without slots point at (kept for their flows).
    let mut kept_backends: BTreeSet<u32> = BTreeSet::new();
    for ip in &cluster_ips {
        let key = ServiceKey::any_port(*ip);
        if current.services.get(&key) != Some(&marker) {
            updates.push(Op::PutService(key, marker));
        }
    }

    // Then each wanted frontend, one at a time: new slots in the generation it does not use,
    // members, info, the flip, and only then its old slots and stale members.
    for (frontend, state) in &desired.frontends {
        let key = ServiceKey::of(frontend);
        let existing = current.services.get(&key);
        let port_id = *port_ids
            .entry(&state.port)
            .or_insert_with(|| ids.port.allocate());
        let mut slots: Vec<u32> = Vec::new();
        for (b, turns) in state.backends.iter().zip(crate::compile::slot_turns(state)) {
            let id = backend_ids[&identity_of(&backend_value(b))];
            for _ in 0..turns {
                slots.push(id);
            }
        }
        // More backends than slots (the compiler reports it): the first ones.
        slots.truncate(MAX_SLOTS);
        let mut flags = 0;
        if state.affinity_secs.is_some() {
            flags |= FLAG_AFFINITY;
        }
        if state.no_local {
            flags |= FLAG_NO_LOCAL;
        }
        if state.snat {
            flags |= FLAG_SNAT;
        }
        if !state.source_ranges.is_empty() {
            flags |= FLAG_SOURCE_RANGES;
        }
        let maglev = state.scheduler == Scheduler::Maglev && !slots.is_empty();
        flags |= match state.scheduler {
            Scheduler::Maglev if maglev => FLAG_MAGLEV,
            Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => FLAG_ROUND_ROBIN,
            Scheduler::SourceHash => FLAG_SOURCE_HASH,
            Scheduler::LeastConnection => FLAG_LEAST_CONN,
            Scheduler::WeightedLeastConnection => FLAG_LEAST_CONN | FLAG_WEIGHTED,
            Scheduler::ShortestExpectedDelay => FLAG_LEAST_CONN | FLAG_WEIGHTED | FLAG_SED,
            Scheduler::NeverQueue => FLAG_LEAST_CONN | FLAG_WEIGHTED | FLAG_SED | FLAG_NEVER_QUEUE,
            _ => 0,
        };
        let id = existing.map_or_else(|| ids.svc.allocate(), |v| v.id);
        // Allowed sources exist before the frontend says to check them.
        for cidr in &state.source_ranges {
            let range = SourceRange {
                svc_id: id,
                cidr: *cidr,
            };
            wanted_ranges.insert(range);
            if !current.source_ranges.contains(&range) {
                updates.push(Op::PutSourceRange(range));
            }
        }
        let mut value = ServiceValue {
            id,
            port_id,
            rev: existing.map_or(0, |v| v.rev),
            affinity_timeout_secs: state.affinity_secs.unwrap_or(0),
            count: slots.len() as u16,
            flags,
        };
        let live: Vec<Option<u32>> = existing.map_or_else(Vec::new, |v| current.live_slots(v));
        // The live chunks whole, padding included: one with ids past the count (left by an
        // interrupted run of the per-slot layout, migrated) is written again.
        let slots_same = existing.is_some_and(|v| {
            live.iter().copied().eq(slots.iter().copied().map(Some))
                && slots.chunks(SLOT_CHUNK).enumerate().all(|(chunk, ids)| {
                    let k = SlotKey {
                        svc_id: v.id,
                        generation: v.generation(),
                        chunk: chunk as u16,
                    };
                    current.slots.get(&k) == Some(&SlotChunk::of(ids))
                })
        });
        let mut wanted_members: BTreeMap<u32, u32> =
            slots.iter().fold(BTreeMap::new(), |mut m, id| {
                *m.entry(*id).or_insert(0) += 1;
                m
            });
        // A member whose endpoint still serves this port stays, without slots if new flows
        // may not use it (`FrontendState::keep_flows`, or an earlier entry of an endpoint whose
        // flags or weight changed): flows already on it keep it (semantics 9.3). Only
        // members that exist are kept: no flow can be on any other.
        // The set of serving endpoints is built only for a frontend that has such a member
        // (a plan of an unchanged frontend, the common case, builds none).
        if let Some(v) = existing {
            let mut serving: Option<BTreeSet<Endpoint>> = None;
            for (k, _) in current.members.range(member_range(v.id)) {
                if wanted_members.contains_key(&k.backend_id) {
                    continue;
                }
                let serving = serving.get_or_insert_with(|| {
                    state
                        .backends
                        .iter()
                        .chain(&state.keep_flows)
                        .map(|b| endpoint_of(&backend_value(b)))
                        .collect()
                });
                if let Some(b) = current.backends.get(&k.backend_id)
                    && serving.contains(&endpoint_of(b))
                {
                    wanted_members.insert(k.backend_id, 0);
                    kept_backends.insert(k.backend_id);
                }
            }
        }
        if !slots_same {
            if existing.is_some() {
                value.rev = value.rev.wrapping_add(1);
            }
            let generation = value.generation();
            for (chunk, ids) in slots.chunks(SLOT_CHUNK).enumerate() {
                let k = SlotKey {
                    svc_id: id,
                    generation,
                    chunk: chunk as u16,
                };
                let v = SlotChunk::of(ids);
                if current.slots.get(&k) != Some(&v) {
                    updates.push(Op::PutSlot(k, Box::new(v)));
                }
            }
        }
        for (backend_id, count) in &wanted_members {
            let k = MemberKey {
                svc_id: id,
                backend_id: *backend_id,
            };
            let v = MemberValue { slots: *count };
            if current.members.get(&k) != Some(&v) {
                updates.push(Op::PutMember(k, v));
            }
        }
        // The Maglev table of the generation about to be live, before the flip.
        let mut wanted_chunks: BTreeSet<MaglevKey> = BTreeSet::new();
        if maglev {
            let generation = value.generation();
            for (chunk, ids) in maglev_chunks(state, &backend_ids, desired.maglev_size) {
                let k = MaglevKey {
                    svc_id: id,
                    generation,
                    chunk,
                };
                wanted_chunks.insert(k);
                if current.maglev.get(&k).map(|c| &**c) != Some(&ids) {
                    updates.push(Op::PutMaglev(k, Box::new(ids)));
                }
            }
        }
        let info = service_info(desired, state, port_id);
        if current.infos.get(&id) != Some(&info) {
            updates.push(Op::PutInfo(id, Box::new(info)));
        }
        if existing != Some(&value) {
            updates.push(Op::PutService(key, value));
        }
        if existing.is_none() {
            continue;
        }
        let own_chunks = current.maglev.range(maglev_range(id));
        for (k, _) in own_chunks {
            if !wanted_chunks.contains(k) {
                updates.push(Op::DelMaglev(*k));
            }
        }
        let generation = value.generation();
        let own_slots = current.slots.range(slot_range(id));
        let chunks = slots.len().div_ceil(SLOT_CHUNK);
        for (k, _) in own_slots {
            if k.generation != generation || k.chunk as usize >= chunks {
                updates.push(Op::DelSlot(*k));
            }
        }
        let own_members = current.members.range(member_range(id));
        for (k, _) in own_members {
            if !wanted_members.contains_key(&k.backend_id) {
                updates.push(Op::DelMember(*k));
            }
        }
    }

    // Last, backends nothing points at any more.
    let backend_removes = current
        .backends
        .keys()
        .filter(|id| !wanted_backends.contains_key(id) && !kept_backends.contains(id))
        .map(|id| Op::DelBackend(*id));

    // Prefixes no frontend allows any more go last: until then they only allow a little more.
    // The Service CIDRs (id 0) are no frontend's: `service_cidr_ops` keeps them.
    let range_removes = current
        .source_ranges
        .difference(&wanted_ranges)
        .filter(|r| r.svc_id != SERVICE_CIDRS)
        .map(|r| Op::DelSourceRange(*r));

    adds.into_iter()
        .chain(gone)
        .chain(updates)
        .chain(backend_removes)
        .chain(range_removes)
        .collect()
}

/// Every slot chunk key of frontend `id`.
pub(crate) fn slot_range(id: u32) -> std::ops::RangeInclusive<SlotKey> {
    SlotKey {
        svc_id: id,
        generation: 0,
        chunk: 0,
    }..=SlotKey {
        svc_id: id,
        generation: u16::MAX,
        chunk: u16::MAX,
    }
}

/// Every member key of frontend `id`.
pub(crate) fn member_range(id: u32) -> std::ops::RangeInclusive<MemberKey> {
    MemberKey {
        svc_id: id,
        backend_id: 0,
    }..=MemberKey {
        svc_id: id,
        backend_id: u32::MAX,
    }
}

/// Every Maglev chunk key of frontend `id`.
pub(crate) fn maglev_range(id: u32) -> std::ops::RangeInclusive<MaglevKey> {
    MaglevKey {
        svc_id: id,
        generation: 0,
        chunk: 0,
    }..=MaglevKey {
        svc_id: id,
        generation: u16::MAX,
        chunk: u16::MAX,
    }
}

pub use proxy_common::service::SERVICE_CIDRS;

/// PURE: the writes that make the Service CIDR entries (`SERVICE_CIDRS`) of `current` those of
/// `desired`: new ones first, then the ones gone.
pub fn service_cidr_ops(desired: &Desired, current: &MapState) -> Vec<Op> {
    let wanted: BTreeSet<SourceRange> = desired
        .service_cidrs
        .iter()
        .map(|cidr| SourceRange {
            svc_id: SERVICE_CIDRS,
            cidr: *cidr,
        })
        .collect();
    let have: BTreeSet<SourceRange> = current
        .source_ranges
        .range(range_range(SERVICE_CIDRS))
        .copied()
        .collect();
    wanted
        .difference(&have)
        .map(|r| Op::PutSourceRange(*r))
        .chain(have.difference(&wanted).map(|r| Op::DelSourceRange(*r)))
        .collect()
}

/// Every source range of frontend `id`.
pub(crate) fn range_range(id: u32) -> std::ops::Range<SourceRange> {
    let lowest = |svc_id| SourceRange {
        svc_id,
        cidr: crate::compile::Cidr {
            addr: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            len: 0,
        },
    };
    lowest(id)..lowest(id.saturating_add(1))
}

mod mirror;

pub use mirror::Mirror;

#[cfg(test)]
mod tests;
