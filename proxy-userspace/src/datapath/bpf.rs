//! The only module that touches the kernel: loads the embedded BPF object, pins its maps, attaches
//! the socket hooks to a cgroup, and reads and writes the maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs::{self, File},
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, MapInfo, MapType,
        PerCpuArray, RingBuf, lpm_trie::Key as LpmKey,
    },
    programs::{
        CgroupAttachMode, SchedClassifier, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use aya_obj::programs::XdpAttachType;
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::BackendValue,
    config::{
        CONFIG_DEBUG_LOG, CONFIG_DSR, CONFIG_MASQUERADE_ALL, CONFIG_NO_NODE_HINTS,
        CONFIG_SOCKET_TERMINATION, ConfigValue,
    },
    ct::{Ct4Key, Ct4Value, Ct6Key, Ct6Value, CtTimeouts},
    info::{AgentState, NamespaceInfo, ServiceInfo},
    maglev::{MaglevChunk, MaglevKey},
    maps as names, proto as proto_common,
    reason::{Hook, REASON_COUNT, Reason},
    revnat::{SockRevNat4Key, SockRevNat4Value, SockRevNat6Key, SockRevNat6Value},
    service::{
        MemberKey, MemberValue, NetnsSource, Service4Key, Service6Key, ServiceValue, SlotChunk,
        SlotKey, SrcRange4, SrcRange6,
    },
};

use super::{
    MapIo, Removed, layouts,
    sockdiag::{Report, SockDiag, SocketTerminator, Target},
};
use crate::capacity::Capacity;
use crate::compile::Cidr;
use crate::plan::{MapState, Op, ServiceKey, SourceRange};
use crate::snapshot::ProxyConfig;

/// The BPF object built by build.rs (aya-build), embedded so the binary is self-contained.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy"));

/// Drops the embedded BPF object's pages from the agent's resident set once it is loaded. It
/// is read once, whole (about 3 MiB with its BTF and debug information), and its pages would
/// count in the agent's RSS for good. They are clean pages of the binary's read-only data
/// (only whole pages inside the object are given back), so a later read faults them in again
/// from the file, unchanged.
fn release_object_pages() {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => return,
    };
    let start = OBJECT.as_ptr() as usize;
    let first = start.div_ceil(page) * page;
    let last = (start + OBJECT.len()) / page * page;
    if last > first {
        // SAFETY: [first, last) lies inside OBJECT, read-only data no code writes; dropping
        // those pages only makes the next read fetch them from the binary again.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// The socket-hook programs, by their function names in proxy-ebpf.
pub const SOCK_PROGRAMS: [&str; 9] = [
    "sock4_connect",
    "sock4_sendmsg",
    "sock4_recvmsg",
    "sock4_getpeername",
    "sock6_connect",
    "sock6_sendmsg",
    "sock6_recvmsg",
    "sock6_getpeername",
    "sock_release",
];

/// The tc program, attached at ingress of the node's external and pod-facing interfaces.
pub const TC_PROGRAM: &str = "tc_ingress";
/// `TC_PROGRAM` for devices without a link-layer header (an ipip or WireGuard overlay's).
pub const TC_L3_PROGRAM: &str = "tc_ingress_l3";
/// The tc egress program: replies of host-network backends to flows tc translated.
pub const TC_EGRESS_PROGRAM: &str = "tc_egress";

/// The XDP program, attached to the node's external interfaces.
pub const XDP_PROGRAM: &str = "xdp_ingress";

/// How XDP is attached (`--xdp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpChoice {
    /// Native (driver) mode where the driver supports it, else none (tc handles everything).
    Auto,
    /// Native mode, or fail.
    Driver,
    /// Generic (skb) mode: works everywhere, slower than tc for forwarding.
    Generic,
    /// No XDP: tc handles all traffic from outside.
    Off,
}

/// Subdirectory of the pin directory holding the pinned program links.
pub const LINKS_DIR: &str = "links";

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/kube-bpf-proxy";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Typed handles on the maps the agent reads and writes.
pub struct Maps {
    services4: HashMap<MapData, Service4Key, ServiceValue>,
    services6: HashMap<MapData, Service6Key, ServiceValue>,
    slots: HashMap<MapData, SlotKey, SlotChunk>,
    members: HashMap<MapData, MemberKey, MemberValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    infos: HashMap<MapData, u32, ServiceInfo>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    stats: PerCpuArray<MapData, u64>,
    agent: Array<MapData, AgentState>,
    config: Array<MapData, ConfigValue>,
    sock4_revnat: HashMap<MapData, SockRevNat4Key, SockRevNat4Value>,
    sock6_revnat: HashMap<MapData, SockRevNat6Key, SockRevNat6Value>,
    ct4: HashMap<MapData, Ct4Key, Ct4Value>,
    ct6: HashMap<MapData, Ct6Key, Ct6Value>,
    src_ranges4: LpmTrie<MapData, SrcRange4, u8>,
    src_ranges6: LpmTrie<MapData, SrcRange6, u8>,
    maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    conns: Array<MapData, u64>,
    rr: HashMap<MapData, u32, u32>,
    drops: PerCpuArray<MapData, u64>,
    monitor: Array<MapData, u64>,
    /// `conn_release`, where it is pinned (not before the first `load`).
    release: Option<Xdp>,
}

/// Pin of `conn_release` under the pin directory: never attached, run by the agent
/// (BPF_PROG_TEST_RUN) to give back the least-connection count of a flow it expires.
const RELEASE_PIN: &str = "conn_release";
const RELEASE_PROGRAM: &str = "conn_release";

/// Loaded programs (their links are pinned) and the maps.
pub struct Datapath {
    _ebpf: Ebpf,
    logger: Option<BpfLogger>,
    terminator: Option<(Box<dyn SocketTerminator>, bool)>,
    maps: Maps,
    pin_dir: PathBuf,
    started: AgentState,
    /// Maps of an older layout version whose entries go to the new maps once the new programs
    /// run (`finish_upgrade`).
    migrations: Vec<Pending>,
}

/// A pinned map of an older layout version, or of another size than the flags ask for
/// (`resized`: its size), unpinned and held open until its entries are carried over into the
/// map pinned in its place.
struct Pending {
    map: &'static str,
    old: MapData,
    from: u32,
    steps: Vec<layouts::Step>,
    resized: Option<Resized>,
}

/// A map being resized: its old size, and for the counts of `LB_CONNS` (an array: a second
/// copy cannot tell a changed count from an unchanged one) their values when they were first
/// copied, so what the old programs counted since is added.
struct Resized {
    was: u32,
    counts: Option<Vec<u64>>,
    /// The keys the first copy wrote (of a hash map): those the old programs deleted before
    /// they were replaced (a socket released, a flow closed) are deleted from the new map too.
    copied: Option<Vec<u8>>,
}

/// Where a map being resized is pinned until its entries are all over (under the pin
/// directory): an agent stopped in between finds it there on its next start.
const RESIZING_DIR: &str = "resizing";

/// Maps only the socket programs write (tc and XDP neither read nor write them).
const SOCKET_ONLY_MAPS: [&str; 3] = [
    names::SOCK4_REVNAT,
    names::SOCK6_REVNAT,
    names::LB_DGRAM_FLOWS,
];

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// An exclusive lock (flock) on the pin directory, held while the agent runs. Two agents
/// writing the same maps would undo each other's changes: one run by hand beside the
/// DaemonSet's, or a rolling update whose old pod is still stopping.
pub struct PinLock {
    _dir: File,
}

/// How often a waiting agent tries the pin directory's lock again.
const PIN_LOCK_RETRY: Duration = Duration::from_millis(200);

/// Takes the lock on `pin_dir` (mounting the bpffs and creating the directory if needed). While
/// another agent holds it, waits (logged once) until that one exits; `None` when `stop` is set
/// meanwhile.
pub fn lock_pin_dir(
    pin_dir: &Path,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Option<PinLock>> {
    ensure_bpffs(pin_dir)?;
    let mut waiting: Option<std::time::Instant> = None;
    loop {
        fs::create_dir_all(pin_dir)
            .with_context(|| format!("create pin directory {}", pin_dir.display()))?;
        let dir = File::open(pin_dir).with_context(|| format!("open {}", pin_dir.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // `cleanup` may have removed the directory while we waited: then the lock is on a
            // directory nobody else will find; take the one at the path now.
            if !same_inode(&dir, pin_dir) {
                continue;
            }
            if let Some(since) = waiting {
                log::info!(
                    "the other agent on {} is gone (waited {:.1?}); taking over",
                    pin_dir.display(),
                    since.elapsed()
                );
            }
            return Ok(Some(PinLock { _dir: dir }));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("lock {}", pin_dir.display()));
        }
        if waiting.is_none() {
            log::warn!(
                "another agent holds the pins in {} (a lock on the directory); waiting for it to \
                 exit: two agents writing the same maps would undo each other's changes",
                pin_dir.display()
            );
            waiting = Some(std::time::Instant::now());
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        std::thread::sleep(PIN_LOCK_RETRY);
    }
}

/// Whether the open `dir` is what `path` names now.
fn same_inode(dir: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (dir.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// The pin directory's lock without waiting, for `cleanup`: Err while an agent holds it;
/// `None` when there is no directory.
pub fn try_lock_pin_dir(pin_dir: &Path) -> anyhow::Result<Option<PinLock>> {
    let dir = match File::open(pin_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("open {}", pin_dir.display())),
    };
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "an agent is running on {} (it holds the directory's lock); stop it first",
                pin_dir.display()
            );
        }
        return Err(e).with_context(|| format!("lock {}", pin_dir.display()));
    }
    Ok(Some(PinLock { _dir: dir }))
}

/// Makes sure `pin_dir` lives on a bpffs, mounting one at /sys/fs/bpf if nothing is there.
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default) && !is_bpffs(default) {
        log::info!("mounting bpffs at {}", default.display());
        fs::create_dir_all(default).ok();
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: static C strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mount bpffs at /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            );
        }
        return Ok(());
    }
    bail!(
        "{} is not on a bpf filesystem; mount one (mount -t bpf bpf /sys/fs/bpf) or pass --bpffs",
        pin_dir.display()
    )
}

/// Where a map handle comes from: the object being loaded, or a pin (for inspection).
enum MapSource<'a> {
    Object(&'a mut Ebpf),
    Pins(&'a Path),
}

impl MapSource<'_> {
    fn take<T>(&mut self, name: &str) -> anyhow::Result<T>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let map = match self {
            MapSource::Object(ebpf) => ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the BPF object"))?,
            MapSource::Pins(dir) => {
                let path = dir.join(name);
                let data = MapData::from_pin(&path).with_context(|| {
                    format!(
                        "open pinned map {} (is the agent installed here?)",
                        path.display()
                    )
                })?;
                let info = data.info()?;
                map_of_type(info.map_type()?, data)
                    .ok_or_else(|| anyhow!("{}: unexpected map type", path.display()))?
            }
        };
        T::try_from(map).with_context(|| format!("map {name}: unexpected type or layout"))
    }
}

fn map_of_type(map_type: MapType, data: MapData) -> Option<Map> {
    Some(match map_type {
        MapType::Hash => Map::HashMap(data),
        MapType::LruHash => Map::LruHashMap(data),
        MapType::PerCpuArray => Map::PerCpuArray(data),
        MapType::Array => Map::Array(data),
        MapType::LpmTrie => Map::LpmTrie(data),
        MapType::RingBuf => Map::RingBuf(data),
        _ => return None,
    })
}

/// The monitor's ring buffer pinned under `pin_dir`.
pub fn open_events(pin_dir: &Path) -> anyhow::Result<RingBuf<MapData>> {
    let path = pin_dir.join(names::LB_EVENTS);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "open pinned map {} (is an agent of this version running?)",
            path.display()
        )
    })?;
    RingBuf::try_from(Map::RingBuf(data)).context("LB_EVENTS: unexpected map type")
}

impl Maps {
    fn from_source(mut source: MapSource<'_>) -> anyhow::Result<Maps> {
        Ok(Maps {
            services4: source.take(names::LB4_SERVICES)?,
            services6: source.take(names::LB6_SERVICES)?,
            slots: source.take(names::LB_SLOTS)?,
            members: source.take(names::LB_MEMBERS)?,
            backends: source.take(names::LB_BACKENDS)?,
            infos: source.take(names::LB_SVC_INFO)?,
            affinity: source.take(names::LB_AFFINITY)?,
            stats: source.take(names::LB_STATS)?,
            agent: source.take(names::LB_AGENT)?,
            config: source.take(names::LB_CONFIG)?,
            sock4_revnat: source.take(names::SOCK4_REVNAT)?,
            sock6_revnat: source.take(names::SOCK6_REVNAT)?,
            ct4: source.take(names::LB_CT4)?,
            ct6: source.take(names::LB_CT6)?,
            src_ranges4: source.take(names::LB4_SRC_RANGES)?,
            src_ranges6: source.take(names::LB6_SRC_RANGES)?,
            maglev: source.take(names::LB_MAGLEV)?,
            conns: source.take(names::LB_CONNS)?,
            rr: source.take(names::LB_RR)?,
            drops: source.take(names::LB_DROPS)?,
            monitor: source.take(names::LB_MONITOR)?,
            release: match source {
                MapSource::Pins(dir) => {
                    Xdp::from_pin(dir.join(RELEASE_PIN), XdpAttachType::Interface).ok()
                }
                MapSource::Object(_) => None,
            },
        })
    }

    /// Opens the maps pinned under `pin_dir` without loading any program.
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Maps> {
        Maps::from_source(MapSource::Pins(pin_dir))
    }

    /// The IPv4 connection-tracking entries of the tc/XDP path (forward and reply).
    pub fn conntrack4(&self) -> anyhow::Result<Vec<(Ct4Key, Ct4Value)>> {
        Ok(self.ct4.iter().collect::<Result<_, _>>()?)
    }

    /// Datapath counters summed over CPUs.
    pub fn stats(&self) -> anyhow::Result<Vec<(Reason, u64)>> {
        let mut out = Vec::new();
        for reason in Reason::ALL {
            let index = reason as u32;
            debug_assert!(index < REASON_COUNT);
            // A counter the pinned map has no room for (it predates the reason) reads 0.
            let sum = match self.stats.get(&index, 0) {
                Ok(values) => values.iter().sum(),
                Err(MapError::OutOfBounds { .. }) => 0,
                Err(e) => return Err(e.into()),
            };
            out.push((reason, sum));
        }
        Ok(out)
    }

    /// Drop counters summed over CPUs, those above zero: (hook, reason, drops).
    pub fn drops(&self) -> anyhow::Result<Vec<(Hook, Reason, u64)>> {
        let mut out = Vec::new();
        for hook in Hook::ALL {
            for reason in Reason::ALL {
                let sum: u64 = match self.drops.get(&hook.drop_index(reason), 0) {
                    Ok(values) => values.iter().sum(),
                    Err(MapError::OutOfBounds { .. }) => 0,
                    Err(e) => return Err(e.into()),
                };
                if sum > 0 {
                    out.push((hook, reason, sum));
                }
            }
        }
        Ok(out)
    }

    /// Lets the programs write monitor events until `until_ns` (`CLOCK_MONOTONIC`, as
    /// `bpf_ktime_get_ns` reads it); 0 stops them.
    pub fn set_monitor_until(&mut self, until_ns: u64) -> anyhow::Result<()> {
        self.monitor.set(0, until_ns, 0).context("write LB_MONITOR")
    }

    /// Until when the programs write monitor events (0: they do not).
    pub fn monitor_until(&self) -> anyhow::Result<u64> {
        Ok(self.monitor.get(&0, 0)?)
    }

    /// Session affinity entries.
    pub fn affinity(&self) -> anyhow::Result<Vec<(AffinityKey, AffinityValue)>> {
        dump_map(&self.affinity, names::LB_AFFINITY)
    }

    /// `LB_AFFINITY` itself, for a test to write what a socket hook would.
    pub fn affinity_map(&mut self) -> &mut HashMap<MapData, AffinityKey, AffinityValue> {
        &mut self.affinity
    }

    /// Termination targets: for each removed (frontend, backend), the cookies of the sockets
    /// the hooks translated to that backend through that frontend.
    pub fn termination_targets(&self, removed: &[Removed]) -> anyhow::Result<Vec<Target>> {
        let mut targets: BTreeMap<(u8, IpAddr, u16), BTreeSet<u64>> = BTreeMap::new();
        let wanted: BTreeMap<(u32, IpAddr, u16), u8> = removed
            .iter()
            .map(|r| {
                let ip = if r.backend.family == proxy_common::backend::FAMILY_V4 {
                    IpAddr::from(r.backend.addr4())
                } else {
                    IpAddr::from(r.backend.addr)
                };
                ((r.svc_id, ip, r.backend.port), r.proto)
            })
            .collect();
        for entry in self.sock4_revnat.iter() {
            let Ok((k, v)) = entry else { continue };
            let key = (v.svc_id, IpAddr::from(k.addr), k.port);
            if let Some(proto) = wanted.get(&key) {
                targets
                    .entry((*proto, key.1, key.2))
                    .or_default()
                    .insert(k.cookie);
            }
        }
        for entry in self.sock6_revnat.iter() {
            let Ok((k, v)) = entry else { continue };
            let ip = std::net::Ipv6Addr::from(k.addr);
            let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
            let key = (v.svc_id, ip, k.port);
            if let Some(proto) = wanted.get(&key) {
                targets
                    .entry((*proto, key.1, key.2))
                    .or_default()
                    .insert(k.cookie);
            }
        }
        Ok(targets
            .into_iter()
            .map(|((proto, dst, dport), cookies)| Target {
                proto,
                dst,
                dport,
                cookies,
            })
            .collect())
    }

    /// The capacity of every map the agent writes.
    pub fn capacity(&self) -> Option<Capacity> {
        let max = |m: &MapData| m.info().ok().map(|i| u64::from(i.max_entries()));
        Some(Capacity {
            services4: max(self.services4.map())?,
            services6: max(self.services6.map())?,
            slot_chunks: max(self.slots.map())?,
            members: max(self.members.map())?,
            backends: max(self.backends.map())?,
            infos: max(self.infos.map())?,
            maglev: max(self.maglev.map())?,
            src_ranges: [max(self.src_ranges4.map())?, max(self.src_ranges6.map())?],
        })
    }

    /// Removes connection-tracking entry pairs idle for longer than their timeout
    /// (`timeouts`) at monotonic time `now_ns`. Returns (entries left, removed).
    pub fn collect_conntrack(
        &mut self,
        now_ns: u64,
        timeouts: &CtTimeouts,
    ) -> anyhow::Result<(u64, u64)> {
        let release = self.release.as_ref();
        let (kept4, removed4) = collect(
            &mut self.ct4,
            now_ns,
            names::LB_CT4,
            |k, v| Ct4Key {
                saddr: v.daddr,
                daddr: v.saddr,
                sport: v.dport,
                dport: v.sport,
                proto: k.proto,
                _pad: [0; 3],
            },
            |v| (v.flags, v.last_seen_ns),
            |k, fwd, rev| {
                timeouts
                    .secs(k.proto, fwd, rev)
                    .saturating_mul(1_000_000_000)
            },
            release4(release),
        )?;
        let (kept6, removed6) = collect(
            &mut self.ct6,
            now_ns,
            names::LB_CT6,
            |k, v| Ct6Key {
                saddr: v.daddr,
                daddr: v.saddr,
                sport: v.dport,
                dport: v.sport,
                proto: k.proto,
                _pad: [0; 3],
            },
            |v| (v.flags, v.last_seen_ns),
            |k, fwd, rev| {
                timeouts
                    .secs(k.proto, fwd, rev)
                    .saturating_mul(1_000_000_000)
            },
            release6(release),
        )?;
        Ok((kept4 + kept6, removed4 + removed6))
    }

    /// Turns the BPF debug logs on or off (takes effect at the next connection).
    pub fn set_debug_log(&mut self, on: bool) -> anyhow::Result<()> {
        self.set_config_flag(CONFIG_DEBUG_LOG, on)
    }

    pub fn debug_log(&self) -> anyhow::Result<bool> {
        self.config_flag(CONFIG_DEBUG_LOG)
    }

    /// The next turn of a round-robin frontend (0 before its first connection).
    pub fn rr_cursor(&self, svc_id: u32) -> anyhow::Result<u32> {
        match self.rr.get(&svc_id, 0) {
            Ok(turn) => Ok(turn),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Active connections of backend `id` (least-connection scheduling).
    pub fn connections(&self, id: u32) -> anyhow::Result<u64> {
        Ok(self.conns.get(&id, 0)?)
    }

    /// Sets the size of every Maglev table (read by the programs at each choice).
    pub fn set_maglev_size(&mut self, size: u32) -> anyhow::Result<()> {
        let mut value = self.config.get(&0, 0)?;
        value.maglev_size = size;
        self.config.set(0, value, 0).context("write LB_CONFIG")
    }

    /// Sets the masquerading source ports (`--masquerade-port-range`, inclusive).
    pub fn set_masquerade_ports(&mut self, first: u16, last: u16) -> anyhow::Result<()> {
        let mut value = self.config.get(&0, 0)?;
        value.snat_port_min = first;
        value.snat_port_max = last;
        self.config.set(0, value, 0).context("write LB_CONFIG")
    }

    /// Sets how many new DSR reply entries one client address may make this node learn per
    /// second (0: the programs' default).
    pub fn set_dsr_budget(&mut self, per_second: u32) -> anyhow::Result<()> {
        let mut value = self.config.get(&0, 0)?;
        value.dsr_budget = per_second;
        self.config.set(0, value, 0).context("write LB_CONFIG")
    }

    /// The configuration the programs read.
    pub fn config(&self) -> anyhow::Result<ConfigValue> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Records whether sockets of removed backends are being terminated (for `status`).
    pub fn set_socket_termination(&mut self, on: bool) -> anyhow::Result<()> {
        self.set_config_flag(CONFIG_SOCKET_TERMINATION, on)
    }

    pub fn socket_termination(&self) -> anyhow::Result<bool> {
        self.config_flag(CONFIG_SOCKET_TERMINATION)
    }

    /// The compile settings the agent recorded in the pins (the Maglev table size, whether
    /// node hints are read) put into `config`, so that a command compiling the cluster beside
    /// the agent compiles it as the agent does whatever its own flags say. Pins of an agent
    /// that recorded none leave `config` as it is.
    pub fn agent_compile_settings(&self, config: &mut ProxyConfig) -> anyhow::Result<()> {
        let value = self.config()?;
        if value.maglev_size != 0 {
            config.maglev_size = value.maglev_size;
        }
        config.node_hints = value.flags & CONFIG_NO_NODE_HINTS == 0;
        Ok(())
    }

    pub fn set_config_flag(&mut self, flag: u32, on: bool) -> anyhow::Result<()> {
        let mut value = self.config.get(&0, 0)?;
        if on {
            value.flags |= flag;
        } else {
            value.flags &= !flag;
        }
        self.config.set(0, value, 0).context("write LB_CONFIG")
    }

    fn config_flag(&self, flag: u32) -> anyhow::Result<bool> {
        Ok(self.config.get(&0, 0)?.flags & flag != 0)
    }

    /// What the agent last recorded about itself.
    pub fn agent_state(&self) -> anyhow::Result<AgentState> {
        Ok(self.agent.get(&0, 0)?)
    }
}

/// `LB_ROUTE_GEN`: the node's route generation, which the XDP program's remembered next hops
/// must match.
pub struct RouteGeneration {
    map: Array<MapData, u32>,
}

impl RouteGeneration {
    /// Opens the pinned map under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<RouteGeneration> {
        Ok(RouteGeneration {
            map: MapSource::Pins(pin_dir).take(names::LB_ROUTE_GEN)?,
        })
    }

    /// The generation now.
    pub fn get(&self) -> anyhow::Result<u32> {
        self.map.get(&0, 0).context("read LB_ROUTE_GEN")
    }

    /// Moves to the next generation (wrapping); returns it.
    pub fn bump(&mut self) -> anyhow::Result<u32> {
        let next = self.get()?.wrapping_add(1);
        self.map.set(0, next, 0).context("write LB_ROUTE_GEN")?;
        Ok(next)
    }
}

/// `LB_DSR_PEERS` and `LB_DSR_PEERS6`: the node addresses this node accepts the DSR option
/// from.
pub struct DsrPeers {
    v4: HashMap<MapData, [u8; 4], u8>,
    v6: HashMap<MapData, [u8; 16], u8>,
}

impl DsrPeers {
    /// Opens the pinned maps under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<DsrPeers> {
        Ok(DsrPeers {
            v4: MapSource::Pins(pin_dir).take(names::LB_DSR_PEERS)?,
            v6: MapSource::Pins(pin_dir).take(names::LB_DSR_PEERS6)?,
        })
    }

    /// The addresses in the maps.
    pub fn addresses(&self) -> anyhow::Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        for key in self.v4.keys() {
            out.insert(IpAddr::from(key.context("read LB_DSR_PEERS")?));
        }
        for key in self.v6.keys() {
            out.insert(IpAddr::from(key.context("read LB_DSR_PEERS6")?));
        }
        Ok(out)
    }

    /// Makes the maps hold exactly `wanted`; returns (added, removed).
    pub fn sync(&mut self, wanted: &BTreeSet<IpAddr>) -> anyhow::Result<(usize, usize)> {
        let current = self.addresses()?;
        let (mut added, mut removed) = (0, 0);
        for a in wanted.difference(&current) {
            match a {
                IpAddr::V4(v4) => self.v4.insert(v4.octets(), 1, 0),
                IpAddr::V6(v6) => self.v6.insert(v6.octets(), 1, 0),
            }
            .with_context(|| format!("add {a} to the DSR peers"))?;
            added += 1;
        }
        for a in current.difference(wanted) {
            let gone = match a {
                IpAddr::V4(v4) => self.v4.remove(&v4.octets()),
                IpAddr::V6(v6) => self.v6.remove(&v6.octets()),
            };
            match gone {
                Ok(()) | Err(MapError::KeyNotFound) => removed += 1,
                Err(e) => return Err(e).with_context(|| format!("remove {a} from the DSR peers")),
            }
        }
        Ok((added, removed))
    }
}

/// `LB_NETNS_SRC`: the source address of each network namespace, by netns cookie.
pub struct NetnsSources {
    map: HashMap<MapData, u64, NetnsSource>,
}

impl NetnsSources {
    /// Opens the pinned map under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<NetnsSources> {
        Ok(NetnsSources {
            map: MapSource::Pins(pin_dir).take(names::LB_NETNS_SRC)?,
        })
    }

    /// The map's entries.
    pub fn entries(&self) -> anyhow::Result<BTreeMap<u64, NetnsSource>> {
        Ok(dump_map(&self.map, names::LB_NETNS_SRC)?
            .into_iter()
            .collect())
    }

    /// Makes the map hold exactly `wanted`; returns (written, removed).
    pub fn sync(&mut self, wanted: &BTreeMap<u64, NetnsSource>) -> anyhow::Result<(usize, usize)> {
        let current = self.entries()?;
        let (mut written, mut removed) = (0, 0);
        for (cookie, source) in wanted {
            if current.get(cookie) != Some(source) {
                self.map
                    .insert(cookie, source, 0)
                    .with_context(|| format!("write netns {cookie} to LB_NETNS_SRC"))?;
                written += 1;
            }
        }
        for cookie in current.keys().filter(|c| !wanted.contains_key(c)) {
            match self.map.remove(cookie) {
                Ok(()) | Err(MapError::KeyNotFound) => removed += 1,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("remove netns {cookie} from LB_NETNS_SRC"));
                }
            }
        }
        Ok((written, removed))
    }
}

/// `LB_SOCKLB_OFF`: the pod cgroups with socket-layer translation off, and (key 0) their levels.
/// Also `LB_SOCKLB_NS`, the namespaces it stands for.
pub struct SocketLbOff {
    map: HashMap<MapData, u64, u32>,
    namespaces: HashMap<MapData, u32, NamespaceInfo>,
}

/// The namespaces whose pods are translated per packet, with their pods known to the socket
/// hooks, as the agent last wrote them (`LB_SOCKLB_NS`); none when the pins predate the map.
pub fn per_packet_namespaces(pin_dir: &Path) -> anyhow::Result<Vec<(String, u32)>> {
    if !pin_dir.join(names::LB_SOCKLB_NS).exists() {
        return Ok(Vec::new());
    }
    let map: HashMap<MapData, u32, NamespaceInfo> =
        MapSource::Pins(pin_dir).take(names::LB_SOCKLB_NS)?;
    let by_index: BTreeMap<u32, NamespaceInfo> =
        dump_map(&map, names::LB_SOCKLB_NS)?.into_iter().collect();
    Ok(by_index
        .into_values()
        .map(|v| (v.name().to_string(), v.pods))
        .collect())
}

impl SocketLbOff {
    /// Opens the pinned maps under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<SocketLbOff> {
        Ok(SocketLbOff {
            map: MapSource::Pins(pin_dir).take(names::LB_SOCKLB_OFF)?,
            namespaces: MapSource::Pins(pin_dir).take(names::LB_SOCKLB_NS)?,
        })
    }

    /// Makes `LB_SOCKLB_NS` list exactly `namespaces` (name, pods), in order.
    pub fn set_namespaces(&mut self, namespaces: &[(String, u32)]) -> anyhow::Result<()> {
        let current: BTreeMap<u32, NamespaceInfo> =
            dump_map(&self.namespaces, names::LB_SOCKLB_NS)?
                .into_iter()
                .collect();
        for (i, (name, pods)) in namespaces.iter().enumerate() {
            let mut info = NamespaceInfo {
                pods: *pods,
                name_len: 0,
                name: [0; 64],
            };
            let bytes = &name.as_bytes()[..name.len().min(info.name.len())];
            info.name[..bytes.len()].copy_from_slice(bytes);
            info.name_len = bytes.len() as u32;
            if current.get(&(i as u32)) != Some(&info) {
                self.namespaces
                    .insert(i as u32, info, 0)
                    .with_context(|| format!("write namespace {name} to LB_SOCKLB_NS"))?;
            }
        }
        for k in current.keys().filter(|k| **k as usize >= namespaces.len()) {
            match self.namespaces.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("remove from LB_SOCKLB_NS"),
            }
        }
        Ok(())
    }

    /// The map's entries.
    pub fn entries(&self) -> anyhow::Result<BTreeMap<u64, u32>> {
        Ok(dump_map(&self.map, names::LB_SOCKLB_OFF)?
            .into_iter()
            .collect())
    }

    /// Makes the map hold exactly `wanted`; returns (written, removed). The pod entries are
    /// written before the levels entry and removed after it, so the programs never see a level
    /// without its pods' entries being complete for what they were told.
    pub fn sync(&mut self, wanted: &BTreeMap<u64, u32>) -> anyhow::Result<(usize, usize)> {
        let current = self.entries()?;
        let (mut written, mut removed) = (0, 0);
        let keys = wanted
            .keys()
            .filter(|k| **k != 0)
            .chain(wanted.keys().filter(|k| **k == 0));
        for key in keys {
            let value = wanted[key];
            if current.get(key) != Some(&value) {
                self.map
                    .insert(key, value, 0)
                    .with_context(|| format!("write cgroup {key} to LB_SOCKLB_OFF"))?;
                written += 1;
            }
        }
        let gone = current.keys().filter(|k| !wanted.contains_key(k));
        let gone: Vec<u64> = gone
            .clone()
            .filter(|k| **k == 0)
            .chain(gone.filter(|k| **k != 0))
            .copied()
            .collect();
        for key in gone {
            match self.map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => removed += 1,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("remove cgroup {key} from LB_SOCKLB_OFF"));
                }
            }
        }
        Ok((written, removed))
    }
}

/// Entries in use and capacity of every pinned map, for `status` and metrics.
pub fn map_fill(pin_dir: &Path) -> anyhow::Result<Vec<(&'static str, u32, u32)>> {
    map_fill_known(pin_dir, &BTreeMap::new())
}

/// As `map_fill`, taking the entry counts of the maps in `known` (the agent's mirror of what it
/// wrote) instead of walking them key by key: a million slots would cost a million syscalls.
pub fn map_fill_known(
    pin_dir: &Path,
    known: &BTreeMap<&'static str, u32>,
) -> anyhow::Result<Vec<(&'static str, u32, u32)>> {
    let mut out = Vec::new();
    for name in names::ALL {
        let path = pin_dir.join(name);
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("read map info of {}", path.display()))?;
        if let Some(used) = known.get(name) {
            out.push((name, *used, info.max_entries()));
            continue;
        }
        let used = match info.map_type()? {
            // Arrays always hold max_entries entries.
            MapType::Array | MapType::PerCpuArray => info.max_entries(),
            // Socket storage lives in the sockets, events in the ring: nothing to count here.
            MapType::SkStorage | MapType::RingBuf => 0,
            _ => {
                let data = MapData::from_pin(&path)?;
                count_entries(data.fd().as_fd(), info.key_size(), info.max_entries())?
            }
        };
        out.push((name, used, info.max_entries()));
    }
    Ok(out)
}

/// The kernel's memory accounting of every pinned map (`memlock` in the fdinfo of an open map,
/// what `bpftool map show` prints): (map, bytes).
pub fn map_memlock(pin_dir: &Path) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let mut out = Vec::new();
    for name in names::ALL {
        let data =
            MapData::from_pin(pin_dir.join(name)).with_context(|| format!("open map {name}"))?;
        let fdinfo = fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            data.fd().as_fd().as_raw_fd()
        ))?;
        let bytes = fdinfo
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.push((name, bytes));
    }
    Ok(out)
}

/// Counts the keys of a hash map by walking BPF_MAP_GET_NEXT_KEY (bounded by `max`).
fn count_entries(map: BorrowedFd<'_>, key_size: u32, max: u32) -> anyhow::Result<u32> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0u32;
    let mut first = true;
    while count <= max {
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u32 as u64;
        attr[1] = if first { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        match bpf_syscall(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                count += 1;
                first = false;
                key.copy_from_slice(&next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
        }
    }
    Ok(count)
}

/// Capacities of the maps. A pinned map of another size is replaced on start by one of this
/// size, its entries carried over (`resize`).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
    pub affinity: u32,
    pub sock_revnat: u32,
    pub conntrack: u32,
    /// The per-flow sizes (`affinity`, `sock_revnat`, `conntrack`) come from the node's memory,
    /// no flag: a pinned map within half and twice that size keeps its size (no resize, which
    /// for the connection tracking of busy NodePorts is not free) when a release's formula or
    /// the node's memory moved a little.
    pub flows_from_memory: [bool; 3],
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: names::SERVICES_MAX as u32,
            backends: names::BACKENDS_MAX as u32,
            slots: names::SLOTS_MAX as u32,
            affinity: names::AFFINITY_MAX as u32,
            sock_revnat: names::SOCK_REVNAT_MAX as u32,
            conntrack: names::CT_MAX as u32,
            flows_from_memory: [false; 3],
        }
    }
}

/// The programs' global holding the idle timeout of unconnected sockets' datagram flows (ns).
const DGRAM_FLOW_TIMEOUT: &str = "DGRAM_FLOW_TIMEOUT_NS";

/// Default share of the node's memory for the per-flow LRU maps (`flow_entries`).
pub const FLOW_MEMORY_RATIO: f64 = 0.000_35;

/// Bytes one entry costs in each per-flow map together (kernel element header, key and
/// value): LB_CT4 104, LB_CT6 152, SOCK4_REVNAT 80, SOCK6_REVNAT 104, LB_AFFINITY 88,
/// LB_DGRAM_FLOWS 80.
const FLOW_ENTRY_BYTES: u64 = 608;

/// Entries of each per-flow map (LRU, preallocated: their memory is taken when they are
/// created) for `memory` bytes of node memory: `ratio` of it, at least 16,384 and at most
/// 2,097,152 entries per map.
pub fn flow_entries(memory: u64, ratio: f64) -> u32 {
    let budget = (memory as f64 * ratio.clamp(0.0, 0.5)) as u64;
    (budget / FLOW_ENTRY_BYTES).clamp(16_384, 2_097_152) as u32
}

/// The node's memory (MemTotal), or 8 GiB when it cannot be read.
pub fn node_memory() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024)
}

impl MapSizes {
    /// Whether a map pinned with `pinned` entries is replaced by one of the size asked for.
    fn resizes(&self, map: &str, pinned: u32) -> bool {
        let Some(size) = self.of(map) else {
            return false;
        };
        let from_memory = match map {
            names::LB_AFFINITY => self.flows_from_memory[0],
            names::SOCK4_REVNAT | names::SOCK6_REVNAT | names::LB_DGRAM_FLOWS => {
                self.flows_from_memory[1]
            }
            names::LB_CT4 | names::LB_CT6 => self.flows_from_memory[2],
            _ => false,
        };
        let (pinned, size) = (u64::from(pinned), u64::from(size));
        pinned != size && !(from_memory && pinned * 2 >= size && pinned <= size * 2)
    }

    fn of(&self, map: &str) -> Option<u32> {
        Some(match map {
            names::LB4_SERVICES | names::LB6_SERVICES | names::LB_SVC_INFO => self.services,
            names::LB_BACKENDS | names::LB_CONNS => self.backends,
            names::LB_SLOTS => names::slot_chunks_for(self.slots, self.services),
            names::LB_MEMBERS => self.slots,
            names::LB_AFFINITY => self.affinity,
            names::SOCK4_REVNAT | names::SOCK6_REVNAT | names::LB_DGRAM_FLOWS => self.sock_revnat,
            names::LB_CT4 | names::LB_CT6 => self.conntrack,
            _ => return None,
        })
    }
}

impl Datapath {
    /// Loads the programs, creates or reuses the pinned maps under `pin_dir`, and attaches the
    /// socket hooks to the cgroup v2 directory `cgroup`.
    /// `udp_timeout`: idle time after which an unconnected socket's datagrams to a frontend
    /// are balanced afresh (`--conntrack-udp-timeout`).
    pub fn load(
        pin_dir: &Path,
        cgroup: &Path,
        sizes: &MapSizes,
        udp_timeout: Duration,
    ) -> anyhow::Result<Self> {
        raise_memlock();
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir)
            .with_context(|| format!("create pin directory {}", pin_dir.display()))?;
        // Pins are 0600 (the kernel's default); the directory is root-only too.
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(pin_dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restrict {}", pin_dir.display()))?;
        let migrations = prepare_pins(pin_dir, sizes)?;
        let mut loader = EbpfLoader::new();
        let udp_timeout_ns = u64::try_from(udp_timeout.as_nanos()).unwrap_or(u64::MAX);
        loader.override_global(DGRAM_FLOW_TIMEOUT, &udp_timeout_ns, true);
        for name in names::ALL {
            let pin = pin_dir.join(name);
            if let Some(size) = sizes.of(name) {
                loader.map_max_entries(name, size);
            }
            loader.map_pin_path(name, pin);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("load the BPF object (is this kernel >= 6.8 with BTF, and are we root?)")?;
        release_object_pages();
        // Slots move over before the programs that read the new layout are attached.
        let migrations = carry_before_attach(&mut ebpf, pin_dir, migrations);
        let cgroup_dir =
            File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
        let links_dir = pin_dir.join(LINKS_DIR);
        fs::create_dir_all(&links_dir)
            .with_context(|| format!("create {}", links_dir.display()))?;
        let (mut attached, mut replaced) = (0, 0);
        let verifying = std::time::Instant::now();
        // Every socket program is verified before any link changes; then the links are swapped
        // in a row, the release hook first and connect last (readers of the socket records
        // before their writers). So the old and new programs run side by side for
        // microseconds, not for the verifier's time: with maps resized, a record written by
        // one build's connect() and deleted by the other's release would stay behind.
        for name in SOCK_PROGRAMS {
            match ebpf.program_mut(name) {
                Some(aya::programs::Program::CgroupSockAddr(p)) => load_retrying(|| p.load()),
                Some(aya::programs::Program::CgroupSock(p)) => load_retrying(|| p.load()),
                Some(_) => bail!("program {name} is not a cgroup socket program"),
                None => bail!("program {name} missing from the BPF object"),
            }
            .with_context(|| super::kernel::rejected(name))?;
        }
        for name in SOCK_PROGRAMS.iter().rev() {
            let pin = links_dir.join(name);
            let program = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the BPF object"))?;
            let was_replaced = match program {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let fd = p.fd()?.try_clone()?;
                    pin_or_replace(&pin, fd.as_fd(), || {
                        let id = p.attach(&cgroup_dir, CgroupAttachMode::Single)?;
                        Ok(p.take_link(id)?.try_into()?)
                    })
                }
                aya::programs::Program::CgroupSock(p) => {
                    let fd = p.fd()?.try_clone()?;
                    pin_or_replace(&pin, fd.as_fd(), || {
                        let id = p.attach(&cgroup_dir, CgroupAttachMode::Single)?;
                        Ok(p.take_link(id)?.try_into()?)
                    })
                }
                _ => bail!("program {name} is not a cgroup socket program"),
            }
            .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
            if was_replaced {
                replaced += 1;
            } else {
                attached += 1;
            }
        }
        log::info!(
            "socket hooks on {}: {attached} attached, {replaced} replaced in place (loaded and \
             verified in {} ms)",
            cgroup.display(),
            verifying.elapsed().as_millis()
        );
        // The socket programs are this build's now, and the socket records are written by
        // them alone: a resized record map gets what the old ones wrote meanwhile at once, so
        // getpeername() finds every record from here.
        let migrations: Vec<Pending> = migrations
            .into_iter()
            .filter_map(|p| match p.resized {
                Some(resized) if SOCKET_ONLY_MAPS.contains(&p.map) => {
                    top_up_resized(pin_dir, p.map, &p.old, resized);
                    None
                }
                resized => Some(Pending { resized, ..p }),
            })
            .collect();
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("BPF debug logs unavailable: {e}");
                None
            }
        };
        let mut maps = Maps::from_source(MapSource::Object(&mut ebpf))?;
        log::info!("maps pinned under {}", pin_dir.display());
        maps.release = Some(pin_release(&mut ebpf, pin_dir)?);
        let mut version = [0u8; 32];
        let v = env!("CARGO_PKG_VERSION").as_bytes();
        let n = v.len().min(version.len());
        version[..n].copy_from_slice(&v[..n]);
        let started = AgentState {
            last_sync_unix_ms: 0,
            syncs: 0,
            sync_failures: 0,
            pid: std::process::id(),
            version_len: n as u32,
            version,
        };
        let mut datapath = Datapath {
            _ebpf: ebpf,
            logger,
            terminator: None,
            maps,
            pin_dir: pin_dir.to_path_buf(),
            started,
            migrations,
        };
        datapath.write_agent_state()?;
        Ok(datapath)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Ends an upgrade, once every program of this build is attached (the socket hooks, tc and
    /// XDP): the entries of the maps of older layout versions left for now (the slots went over
    /// before the programs were attached) are carried over into this build's maps (counters are
    /// added, so what the new programs counted meanwhile stays),
    /// the old maps are freed, and every map's layout version is recorded in `LB_VERSIONS`.
    /// A map that cannot be migrated is logged and left as it is: it serves, its older entries
    /// lost.
    pub fn finish_upgrade(&mut self) -> anyhow::Result<()> {
        for pending in std::mem::take(&mut self.migrations) {
            let Pending {
                map,
                old,
                from,
                steps,
                resized,
            } = pending;
            if let Some(resized) = resized {
                top_up_resized(&self.pin_dir, map, &old, resized);
                continue;
            }
            let new = match map {
                names::LB_STATS => &mut self.maps.stats,
                names::LB_DROPS => &mut self.maps.drops,
                _ => {
                    log::warn!("{map}: no migration from layout version {from}; entries lost");
                    continue;
                }
            };
            match carry_counters(old, new, &steps) {
                Ok(n) => log::info!(
                    "{map}: migrated from layout version {from} to {}: {n} counters carried over",
                    layouts::current_version(map)
                ),
                Err(e) => log::warn!("{map}: migration from layout version {from} failed: {e:#}"),
            }
        }
        write_versions(&self.pin_dir)
    }

    /// Sets the size of every Maglev table.
    pub fn set_maglev_size(&mut self, size: u32) -> anyhow::Result<()> {
        self.maps.set_maglev_size(size)
    }

    /// Turns direct server return for NodePort traffic on or off.
    pub fn set_dsr(&mut self, on: bool) -> anyhow::Result<()> {
        self.maps.set_config_flag(CONFIG_DSR, on)
    }

    /// `--masquerade-all`: tc masquerades every new flow to a ClusterIP it translates.
    pub fn set_masquerade_all(&mut self, on: bool) -> anyhow::Result<()> {
        self.maps.set_config_flag(CONFIG_MASQUERADE_ALL, on)
    }

    /// Records whether the agent reads endpoints' node hints (for the other commands).
    pub fn set_node_hints(&mut self, on: bool) -> anyhow::Result<()> {
        self.maps.set_config_flag(CONFIG_NO_NODE_HINTS, !on)
    }

    /// Sets the masquerading source ports (inclusive).
    pub fn set_masquerade_ports(&mut self, first: u16, last: u16) -> anyhow::Result<()> {
        self.maps.set_masquerade_ports(first, last)
    }

    /// Sets the DSR learning budget per client address and second.
    pub fn set_dsr_budget(&mut self, per_second: u32) -> anyhow::Result<()> {
        self.maps.set_dsr_budget(per_second)
    }

    /// Attaches the XDP program to `interfaces` as `choice` says (pinned links `xdp-IFNAME`,
    /// swapped in place on restart). Returns (interface, mode) for each attached one; where it
    /// cannot attach, tc alone handles the interface, and the log says so.
    pub fn attach_xdp(
        &mut self,
        interfaces: &[String],
        choice: XdpChoice,
    ) -> anyhow::Result<Vec<(String, &'static str)>> {
        let links_dir = self.pin_dir.join(LINKS_DIR);
        let wanted: BTreeSet<String> = if choice == XdpChoice::Off {
            BTreeSet::new()
        } else {
            interfaces
                .iter()
                .map(|i| super::tclinks::link_pin_name("xdp-", i))
                .collect()
        };
        prune_links(&links_dir, "xdp-", &wanted);
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let program: &mut Xdp = self
            ._ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing from the BPF object"))?
            .try_into()
            .with_context(|| format!("program {XDP_PROGRAM} is not an XDP program"))?;
        let verifying = std::time::Instant::now();
        load_retrying(|| program.load()).with_context(|| super::kernel::rejected(XDP_PROGRAM))?;
        log::info!(
            "XDP program loaded and verified in {} ms",
            verifying.elapsed().as_millis()
        );
        let mut attached = Vec::new();
        for interface in interfaces {
            let pin = links_dir.join(super::tclinks::link_pin_name("xdp-", interface));
            // A veth forwards XDP_TX frames in driver mode only into a peer that runs NAPI,
            // which we cannot know from here; generic mode always works there.
            let veth = super::netdev::driver(interface).as_deref() == Some("veth");
            let modes: &[(XdpMode, &'static str)] = match choice {
                XdpChoice::Auto if veth => &[(XdpMode::Skb, "generic")],
                XdpChoice::Auto | XdpChoice::Driver => &[(XdpMode::Driver, "driver")],
                XdpChoice::Generic => &[(XdpMode::Skb, "generic")],
                XdpChoice::Off => &[],
            };
            // An earlier agent's program attached in another mode than this one's flags ask
            // for (`--xdp` changed): detached and attached again, tc serving meanwhile.
            if pin.exists() {
                let now = super::netlink::Rtnl::new().and_then(|mut r| r.xdp_mode(interface));
                if let Err(e) = &now {
                    log::warn!(
                        "XDP on {interface}: its mode not read ({e}); the program is swapped in \
                         place, in whatever mode it is"
                    );
                }
                // Only our two modes are changed; anything else (offload, programs in several
                // modes) is left as it is.
                if let Ok(Some(mode @ ("driver" | "generic"))) = now
                    && !modes.iter().any(|(_, label)| *label == mode)
                {
                    log::info!(
                        "XDP on {interface}: attached in {mode} mode, {} asked for; attaching \
                         it again (tc handles the interface meanwhile)",
                        modes.first().map_or("none", |(_, l)| *l)
                    );
                    let _ = fs::remove_file(&pin);
                    wait_xdp_detached(interface);
                }
            }
            if replace_pinned(&pin, program.fd()?.as_fd()) {
                log::info!("XDP on {interface}: program replaced in place");
                attached.push((interface.clone(), "kept"));
                continue;
            }
            let mut done = false;
            for (mode, label) in modes {
                match program.attach(interface, *mode) {
                    Ok(id) => {
                        let link: FdLink = program
                            .take_link(id)?
                            .try_into()
                            .with_context(|| format!("XDP link on {interface}: not an fd link"))?;
                        link.pin(&pin)
                            .with_context(|| format!("pin link {}", pin.display()))?;
                        log::info!("XDP attached to {interface} in {label} mode");
                        attached.push((interface.clone(), *label));
                        done = true;
                        break;
                    }
                    Err(e) => log::warn!("XDP cannot attach to {interface} in {label} mode: {e}"),
                }
            }
            if !done {
                if choice == XdpChoice::Driver {
                    bail!("XDP could not attach to {interface} in driver mode (--xdp driver)");
                }
                log::warn!("no XDP on {interface}: tc handles its NodePort traffic");
            }
        }
        Ok(attached)
    }

    /// Loads the tc programs (ingress and egress) and pins them (replacing an earlier agent's
    /// pins) so that `tclinks::TcLinks` can attach them to interfaces from another thread.
    pub fn pin_tc_program(&mut self) -> anyhow::Result<()> {
        for (name, file) in [
            (TC_PROGRAM, super::tclinks::TC_PROGRAM_PIN),
            (TC_L3_PROGRAM, super::tclinks::TC_L3_PROGRAM_PIN),
            (TC_EGRESS_PROGRAM, super::tclinks::TC_EGRESS_PROGRAM_PIN),
        ] {
            let program: &mut SchedClassifier = self
                ._ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the BPF object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a tc classifier"))?;
            let verifying = std::time::Instant::now();
            load_retrying(|| program.load()).with_context(|| super::kernel::rejected(name))?;
            log::info!(
                "{name} loaded and verified in {} ms",
                verifying.elapsed().as_millis()
            );
            let pin = self.pin_dir.join(file);
            unpin(&pin)?;
            program
                .pin(&pin)
                .with_context(|| format!("pin {}", pin.display()))?;
        }
        Ok(())
    }

    /// Terminates sockets of removed backends from now on: connected UDP sockets, and TCP
    /// connections too with `tcp`. Must be called before capabilities are dropped.
    pub fn enable_termination(&mut self, cgroup: PathBuf, tcp: bool) -> anyhow::Result<()> {
        let started = SockDiag::start(cgroup);
        self.maps.set_socket_termination(started.is_ok())?;
        let diag = started.context("start the socket terminator")?;
        self.terminator = Some((Box::new(diag), tcp));
        Ok(())
    }

    /// Records that socket termination is off (turned off by flag).
    pub fn disable_termination(&mut self) -> anyhow::Result<()> {
        self.terminator = None;
        self.maps.set_socket_termination(false)
    }

    /// Starts forwarding the programs' debug logs to the agent's log (a thread).
    pub fn forward_logs(&mut self) {
        if let Some(logger) = self.logger.take() {
            forward_bpf_logs(logger);
        }
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    fn write_agent_state(&mut self) -> anyhow::Result<()> {
        self.maps
            .agent
            .set(0, self.started, 0)
            .context("write LB_AGENT")
    }

    /// Records a sync outcome in `LB_AGENT` for `status`.
    pub fn record_sync(&mut self, ok: bool) -> anyhow::Result<()> {
        if ok {
            self.started.syncs += 1;
            self.started.last_sync_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
        } else {
            self.started.sync_failures += 1;
        }
        self.write_agent_state()
    }
}

/// Removes the pinned links `PREFIXIFNAME` under `links_dir` that are not `wanted`, which
/// detaches their programs from interfaces no longer configured.
fn prune_links(links_dir: &Path, prefix: &str, wanted: &BTreeSet<String>) {
    for entry in fs::read_dir(links_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(interface) = super::tclinks::iface_of_pin(prefix, &name)
            && !wanted.contains(&name)
        {
            log::info!(
                "detaching {} from {interface}",
                prefix.trim_end_matches('-')
            );
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Swaps `prog` into the link an earlier agent pinned at `pin`, if there is one: true when it
/// did. A pin that cannot take it is removed (with a warning), so the caller attaches afresh.
pub(super) fn replace_pinned(pin: &Path, prog: BorrowedFd<'_>) -> bool {
    if !pin.exists() {
        return false;
    }
    match replace_program(pin, prog) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("{}: {e:#}; attaching afresh", pin.display());
            let _ = fs::remove_file(pin);
            false
        }
    }
}

/// Waits (at most 2 s) until no XDP program is attached to `interface`: a link whose last pin
/// went is released by the kernel a moment later, and a program in the other mode cannot be
/// attached before.
fn wait_xdp_detached(interface: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        match super::netlink::Rtnl::new().and_then(|mut r| r.xdp_mode(interface)) {
            Ok(Some(_)) => std::thread::sleep(Duration::from_millis(20)),
            _ => return,
        }
    }
    log::warn!("XDP on {interface}: the earlier program is still attached after 2 s");
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`, which the programs'
/// timestamps (affinity, connection tracking) use.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Swaps `prog` into the link pinned at `pin` if an earlier agent left one (so there is no
/// instant without the hook; returns true), else attaches afresh with `attach` and pins the link
/// (pinned, the hook outlives this process: `kube-bpf-proxy cleanup` removes it).
fn pin_or_replace(
    pin: &Path,
    prog: BorrowedFd<'_>,
    attach: impl FnOnce() -> anyhow::Result<FdLink>,
) -> anyhow::Result<bool> {
    if replace_pinned(pin, prog) {
        return Ok(true);
    }
    let link = attach()?;
    link.pin(pin)
        .with_context(|| format!("pin link {}", pin.display()))?;
    Ok(false)
}

// The bpf(2) commands the datapath's modules make themselves (enum bpf_cmd), for
// `bpf_syscall`.
pub(super) const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
pub(super) const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
pub(super) const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
pub(super) const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
pub(super) const BPF_OBJ_GET: libc::c_long = 7;
pub(super) const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
pub(super) const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
pub(super) const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub(super) const BPF_PROG_QUERY: libc::c_long = 16;
pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(super) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub(super) const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
pub(super) const BPF_LINK_UPDATE: libc::c_long = 29;

/// `bpf(cmd, attr)` with a zeroed, 128-byte attribute buffer the caller has filled.
pub(super) fn bpf_syscall(
    cmd: libc::c_long,
    attr: &mut [u64; 16],
) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a zero-filled 128-byte bpf_attr the caller filled for `cmd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Replaces the program of the pinned link at `pin` with `prog` (BPF_LINK_UPDATE; aya 0.14 does
/// not expose it for cgroup links).
fn replace_program(pin: &Path, prog: BorrowedFd<'_>) -> anyhow::Result<()> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64; // bpf_attr.pathname
    let fd = bpf_syscall(BPF_OBJ_GET, &mut attr).context("BPF_OBJ_GET")?;
    // SAFETY: the kernel returned a fresh fd we now own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 16];
    // bpf_attr.link_update: link_fd (u32), new_prog_fd (u32), flags (u32), old_prog_fd (u32).
    attr[0] = (link.as_raw_fd() as u32 as u64) | ((prog.as_raw_fd() as u32 as u64) << 32);
    bpf_syscall(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
    Ok(())
}

type BpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Forwards the programs' aya-log records (only written while `CONFIG_DEBUG_LOG` is on) to
/// the agent's log, from a thread that waits on the ring buffer.
fn forward_bpf_logs(mut logger: BpfLogger) {
    let spawned = std::thread::Builder::new()
        .name("bpf-log".into())
        .spawn(move || {
            loop {
                let mut pfd = libc::pollfd {
                    fd: logger.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let rc = unsafe { libc::poll(&mut pfd, 1, 1000) };
                if rc < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    log::warn!(
                        "BPF debug logs stopped: {}",
                        std::io::Error::last_os_error()
                    );
                    return;
                }
                logger.flush();
            }
        });
    if let Err(e) = spawned {
        log::warn!("BPF debug logs unavailable: {e}");
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lifting it is harmless on newer ones.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!("could not lift RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

fn dump_map<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    what: &str,
) -> anyhow::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for entry in map.iter() {
        match entry {
            Ok(kv) => out.push(kv),
            // An entry deleted while we iterate is simply gone.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e).with_context(|| format!("read map {what}")),
        }
    }
    Ok(out)
}

/// Gives back, through the datapath's own exchange, the least-connection count a forward
/// conntrack entry holds (`key`, of the family `ethertype` names). True if one was given back;
/// false when it held none any more or `conn_release` is not pinned.
fn give_back(program: Option<&Xdp>, ethertype: u16, key: &[u8]) -> bool {
    let Some(program) = program else {
        return false;
    };
    // An Ethernet header naming the family, then the key (conns::release_flow).
    let mut frame = vec![0u8; 14];
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(key);
    let mut out = vec![0u8; frame.len()];
    let opts = TestRunOptions {
        data_in: Some(&frame),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    };
    match program.test_run(opts) {
        Ok(r) => r.return_value == XDP_PASS,
        Err(e) => {
            log::warn!("conn_release failed: {e}");
            false
        }
    }
}

const XDP_PASS: u32 = 2;
/// `give_back` for an `LB_CT4` entry: true when it held no count or gave it back.
fn release4(program: Option<&Xdp>) -> impl Fn(&Ct4Key, &Ct4Value) -> bool + '_ {
    move |k, v| v.counted == 0 || give_back(program, proto_common::ETH_P_IP, &k.to_bytes())
}

/// `give_back` for an `LB_CT6` entry, as `release4`.
fn release6(program: Option<&Xdp>) -> impl Fn(&Ct6Key, &Ct6Value) -> bool + '_ {
    move |k, v| v.counted == 0 || give_back(program, proto_common::ETH_P_IPV6, &k.to_bytes())
}

/// One collection pass over a conntrack map. `other` gives the key of an entry's partner
/// (the other direction), `meta` an entry's flags and last-seen time, `timeout_ns` a pair's idle
/// timeout from its key and the flags of both directions, `release` gives back an entry's
/// least-connection count before it goes (see `give_back`).
fn collect<K, V>(
    map: &mut HashMap<MapData, K, V>,
    now_ns: u64,
    what: &str,
    other: impl Fn(&K, &V) -> K,
    meta: impl Fn(&V) -> (u32, u64),
    timeout_ns: impl Fn(&K, u32, u32) -> u64,
    release: impl Fn(&K, &V) -> bool,
) -> anyhow::Result<(u64, u64)>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    use proxy_common::ct::CT_REPLY;
    let entries: BTreeMap<K, V> = dump_map(map, what)?.into_iter().collect();
    let mut expired = Vec::new();
    for (k, v) in &entries {
        let (flags, seen) = meta(v);
        let partner = entries.get(&other(k, v)).map(&meta);
        let (fwd, rev) = match partner {
            Some((pf, _)) if flags & CT_REPLY != 0 => (pf, flags),
            Some((pf, _)) => (flags, pf),
            None => (flags, flags),
        };
        let last = partner.map_or(seen, |(_, ps)| ps.max(seen));
        if now_ns.saturating_sub(last) > timeout_ns(k, fwd, rev) {
            expired.push(*k);
        }
    }
    let mut removed = 0u64;
    for k in &expired {
        if let Some(v) = entries.get(k) {
            release(k, v);
        }
        if ignore_missing(map.remove(k)).is_ok() {
            removed += 1;
        }
    }
    Ok((entries.len() as u64 - removed, removed))
}

/// Deletes the UDP entries (both directions) whose (frontend id, backend id) is in `gone`.
fn forget<K, V>(
    map: &mut HashMap<MapData, K, V>,
    what: &str,
    gone: &BTreeSet<(u32, u32)>,
    meta: impl Fn(&K, &V) -> (u8, u32, u32),
    release: impl Fn(&K, &V) -> bool,
) -> anyhow::Result<u64>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    let doomed: Vec<(K, V)> = dump_map(map, what)?
        .into_iter()
        .filter(|(k, v)| {
            let (proto, svc_id, backend_id) = meta(k, v);
            proto == proto_common::UDP && gone.contains(&(svc_id, backend_id))
        })
        .collect();
    let mut deleted = 0;
    for (k, v) in &doomed {
        release(k, v);
        if ignore_missing(map.remove(k)).is_ok() {
            deleted += 1;
        }
    }
    Ok(deleted)
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

impl MapIo for Maps {
    fn dump(&self) -> anyhow::Result<MapState> {
        let mut state = MapState::default();
        for (k, v) in dump_map(&self.services4, names::LB4_SERVICES)? {
            state.services.insert(ServiceKey::V4(k), v);
        }
        for (k, v) in dump_map(&self.services6, names::LB6_SERVICES)? {
            state.services.insert(ServiceKey::V6(k), v);
        }
        state.slots.extend(dump_map(&self.slots, names::LB_SLOTS)?);
        state
            .members
            .extend(dump_map(&self.members, names::LB_MEMBERS)?);
        state
            .backends
            .extend(dump_map(&self.backends, names::LB_BACKENDS)?);
        state
            .infos
            .extend(dump_map(&self.infos, names::LB_SVC_INFO)?);
        for (k, v) in dump_map(&self.maglev, names::LB_MAGLEV)? {
            state.maglev.insert(k, Box::new(v));
        }
        for key in self.src_ranges4.keys() {
            let key = key.with_context(|| format!("read map {}", names::LB4_SRC_RANGES))?;
            let data = key.data();
            state.source_ranges.insert(SourceRange {
                svc_id: u32::from_be_bytes(data.svc_id),
                cidr: Cidr {
                    addr: IpAddr::from(data.addr),
                    len: (key.prefix_len().saturating_sub(32)) as u8,
                },
            });
        }
        for key in self.src_ranges6.keys() {
            let key = key.with_context(|| format!("read map {}", names::LB6_SRC_RANGES))?;
            let data = key.data();
            state.source_ranges.insert(SourceRange {
                svc_id: u32::from_be_bytes(data.svc_id),
                cidr: Cidr {
                    addr: IpAddr::from(data.addr),
                    len: (key.prefix_len().saturating_sub(32)) as u8,
                },
            });
        }
        Ok(state)
    }

    fn apply(&mut self, op: &Op) -> anyhow::Result<()> {
        let result = match op {
            Op::PutBackend(k, v) => self.backends.insert(k, v, 0),
            Op::PutSlot(k, v) => self.slots.insert(k, **v, 0),
            Op::PutMember(k, v) => self.members.insert(k, v, 0),
            Op::PutService(ServiceKey::V4(k), v) => self.services4.insert(k, v, 0),
            Op::PutService(ServiceKey::V6(k), v) => self.services6.insert(k, v, 0),
            Op::DelService(ServiceKey::V4(k)) => ignore_missing(self.services4.remove(k)),
            Op::DelService(ServiceKey::V6(k)) => ignore_missing(self.services6.remove(k)),
            Op::DelSlot(k) => ignore_missing(self.slots.remove(k)),
            Op::DelMember(k) => ignore_missing(self.members.remove(k)),
            Op::DelBackend(k) => ignore_missing(self.backends.remove(k)),
            Op::PutInfo(k, v) => self.infos.insert(k, **v, 0),
            Op::DelInfo(k) => ignore_missing(self.infos.remove(k)),
            Op::PutSourceRange(r) => match lpm_key(r) {
                LpmRange::V4(k) => self.src_ranges4.insert(&k, 1, 0),
                LpmRange::V6(k) => self.src_ranges6.insert(&k, 1, 0),
            },
            Op::PutMaglev(k, v) => self.maglev.insert(k, **v, 0),
            Op::DelMaglev(k) => ignore_missing(self.maglev.remove(k)),
            Op::DelSourceRange(r) => match lpm_key(r) {
                LpmRange::V4(k) => ignore_missing(self.src_ranges4.remove(&k)),
                LpmRange::V6(k) => ignore_missing(self.src_ranges6.remove(&k)),
            },
        };
        result.with_context(|| format!("map write {op:?}"))
    }
    fn apply_run(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        self.apply_batch(ops)
    }
}

/// Entries of a batch from which it is written by two threads at once, each half in its own
/// syscalls: the kernel's hash-map updates (bucket locks, no map-wide lock) are most of a
/// full sync's time, and the second CPU is otherwise idle then.
const PARALLEL_BATCH: usize = 4096;

/// Writes `keys` → `values` (or deletes `keys` when `values` is None) as `batch_one` does,
/// a large batch in two halves written at once (`PARALLEL_BATCH`). The keys of one batch are
/// distinct (one plan writes a key once), so the halves' order does not matter.
fn batch<K: Sync, V: Sync>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
) -> std::io::Result<()> {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if keys.len() < PARALLEL_BATCH || cpus < 2 {
        return batch_one(map, keys, values);
    }
    let half = keys.len() / 2;
    let (k1, k2) = keys.split_at(half);
    let (v1, v2) = match values {
        Some(v) => {
            let (a, b) = v.split_at(half);
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    std::thread::scope(|scope| {
        let other = std::thread::Builder::new()
            .name("map-writes".into())
            .spawn_scoped(scope, || batch_one(map, k2, v2));
        let first = batch_one(map, k1, v1);
        let second = match other {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("map writer panicked"))),
            // No thread to be had: the second half here too.
            Err(_) => batch_one(map, k2, v2),
        };
        first.and(second)
    })
}

/// Writes `keys` → `values` (or deletes `keys` when `values` is None) in one
/// BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH call per chunk. A key missing from a delete is
/// skipped (as `ignore_missing` does one by one).
fn batch_one<K, V>(map: BorrowedFd<'_>, keys: &[K], values: Option<&[V]>) -> std::io::Result<()> {
    let mut done = 0;
    while done < keys.len() {
        let left = &keys[done..];
        let mut attr = [0u64; 16];
        attr[2] = left.as_ptr() as u64;
        if let Some(values) = values {
            attr[3] = values[done..].as_ptr() as u64;
        }
        attr[4] = (left.len() as u64) | ((map.as_raw_fd() as u32 as u64) << 32);
        let cmd = if values.is_some() {
            BPF_MAP_UPDATE_BATCH
        } else {
            BPF_MAP_DELETE_BATCH
        };
        let result = bpf_syscall(cmd, &mut attr);
        // The kernel says in `count` how many it processed, error or not.
        let processed = (attr[4] & 0xffff_ffff) as usize;
        match result {
            Ok(_) => done += processed.max(left.len()),
            Err(e) if values.is_none() && e.raw_os_error() == Some(libc::ENOENT) => {
                // Deleted up to the missing key; skip it.
                done += processed + 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Maps {
    /// `MapIo::apply_run` for the kernel maps: one batch syscall per run.
    fn apply_batch(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        let first = &ops[0];
        let result = match first {
            Op::PutSlot(..) => {
                let (k, v): (Vec<SlotKey>, Vec<SlotChunk>) = ops
                    .iter()
                    .filter_map(|o| match o {
                        Op::PutSlot(k, v) => Some((*k, **v)),
                        _ => None,
                    })
                    .unzip();
                batch(self.slots.map().fd().as_fd(), &k, Some(&v))
            }
            Op::DelSlot(_) => {
                let k: Vec<SlotKey> = ops
                    .iter()
                    .filter_map(|o| match o {
                        Op::DelSlot(k) => Some(*k),
                        _ => None,
                    })
                    .collect();
                batch::<SlotKey, ()>(self.slots.map().fd().as_fd(), &k, None)
            }
            Op::PutMember(..) => {
                let (k, v): (Vec<MemberKey>, Vec<MemberValue>) = ops
                    .iter()
                    .filter_map(|o| match o {
                        Op::PutMember(k, v) => Some((*k, *v)),
                        _ => None,
                    })
                    .unzip();
                batch(self.members.map().fd().as_fd(), &k, Some(&v))
            }
            Op::DelMember(_) => {
                let k: Vec<MemberKey> = ops
                    .iter()
                    .filter_map(|o| match o {
                        Op::DelMember(k) => Some(*k),
                        _ => None,
                    })
                    .collect();
                batch::<MemberKey, ()>(self.members.map().fd().as_fd(), &k, None)
            }
            Op::PutBackend(..) => {
                let (k, v): (Vec<u32>, Vec<BackendValue>) = ops
                    .iter()
                    .filter_map(|o| match o {
                        Op::PutBackend(k, v) => Some((*k, *v)),
                        _ => None,
                    })
                    .unzip();
                batch(self.backends.map().fd().as_fd(), &k, Some(&v))
            }
            Op::DelBackend(_) => {
                let k: Vec<u32> = ops
                    .iter()
                    .filter_map(|o| match o {
                        Op::DelBackend(k) => Some(*k),
                        _ => None,
                    })
                    .collect();
                batch::<u32, ()>(self.backends.map().fd().as_fd(), &k, None)
            }
            _ => return ops.iter().try_for_each(|op| MapIo::apply(self, op)),
        };
        result.with_context(|| format!("batch of {} map writes from {first:?}", ops.len()))
    }
}

enum LpmRange {
    V4(LpmKey<SrcRange4>),
    V6(LpmKey<SrcRange6>),
}

/// The LPM key of a source range: the frontend id's 32 bits, then the prefix.
fn lpm_key(r: &SourceRange) -> LpmRange {
    let svc_id = r.svc_id.to_be_bytes();
    let len = 32 + u32::from(r.cidr.len);
    match r.cidr.addr {
        IpAddr::V4(a) => LpmRange::V4(LpmKey::new(
            len,
            SrcRange4 {
                svc_id,
                addr: a.octets(),
            },
        )),
        IpAddr::V6(a) => LpmRange::V6(LpmKey::new(
            len,
            SrcRange6 {
                svc_id,
                addr: a.octets(),
            },
        )),
    }
}

/// Sorts the pinned maps by layout version (`layouts`) before this build's object is loaded
/// over them: a map of this build's layout stays; one of an older version this build migrates
/// is unpinned and held open (returned), so that loading pins a map of the current layout in
/// its place; one of a layout it does not know is unpinned and dropped, its entries lost, which
/// the log says. Either way the programs are never loaded against a map they do not fit.
fn prepare_pins(pin_dir: &Path, sizes: &MapSizes) -> anyhow::Result<Vec<Pending>> {
    let object = aya_obj::Object::parse(OBJECT).context("parse the BPF object")?;
    recover_resizes(pin_dir);
    let recorded = read_versions(pin_dir);
    let mut pending = Vec::new();
    // Maps a newer release laid out: this is a downgrade over its pins.
    let mut newer = Vec::new();
    for name in names::ALL {
        let pin = pin_dir.join(name);
        let (Ok(info), Some(def)) = (MapInfo::from_pin(&pin), object.maps.get(name)) else {
            continue;
        };
        let fixed = sizes.of(name).is_none();
        let current = layouts::Shape {
            map_type: def.map_type(),
            key: def.key_size(),
            value: def.value_size(),
            entries: fixed.then(|| def.max_entries()),
        };
        let pinned = layouts::Shape {
            map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            key: info.key_size(),
            value: info.value_size(),
            entries: fixed.then(|| info.max_entries()),
        };
        let recorded = recorded.get(&layouts::version_key(name)).copied();
        if let Some(v) = recorded.filter(|v| *v > layouts::current_version(name)) {
            newer.push(format!("{name} (version {v})"));
        }
        match layouts::classify(name, &pinned, recorded, &current) {
            layouts::Plan::Reuse => match sizes.of(name) {
                Some(size) if sizes.resizes(name, info.max_entries()) => {
                    let old = MapData::from_pin(&pin)
                        .with_context(|| format!("open {} to resize it", pin.display()))?;
                    log::info!(
                        "{name}: pinned with {} entries, {size} asked for; a map of the new size \
                         takes its place and its entries are carried over",
                        info.max_entries()
                    );
                    // Kept pinned aside, not removed, until its entries are all over: an
                    // agent stopped before that (a failed load, a crash) finds them again.
                    let aside = pin_dir.join(RESIZING_DIR);
                    fs::create_dir_all(&aside)
                        .with_context(|| format!("create {}", aside.display()))?;
                    fs::rename(&pin, aside.join(name))
                        .with_context(|| format!("move {} aside", pin.display()))?;
                    pending.push(Pending {
                        map: name,
                        old,
                        from: layouts::current_version(name),
                        steps: Vec::new(),
                        resized: Some(Resized {
                            was: info.max_entries(),
                            counts: None,
                            copied: None,
                        }),
                    });
                    continue;
                }
                _ => continue,
            },
            layouts::Plan::Migrate { from, steps } => {
                let old = MapData::from_pin(&pin)
                    .with_context(|| format!("open {} to migrate it", pin.display()))?;
                log::info!(
                    "{name}: pinned at layout version {from}, this version's is {}; its entries \
                     are carried over",
                    layouts::current_version(name)
                );
                pending.push(Pending {
                    map: name,
                    old,
                    from,
                    steps,
                    resized: None,
                });
            }
            layouts::Plan::Replace { why } => log::warn!(
                "{name}: the pinned map's layout differs from this version's ({why}); replacing \
                 it, its entries are lost"
            ),
        }
        fs::remove_file(&pin).with_context(|| format!("remove {}", pin.display()))?;
    }
    if !newer.is_empty() {
        log::warn!(
            "the pins in {} were written by a newer kube-bpf-proxy (map layouts this version \
             does not know: {}); running an older version over them is not supported: hooks \
             the newer one attached may stay attached. To go back, run `kube-bpf-proxy \
             cleanup` with the newer version first",
            pin_dir.display(),
            newer.join(", ")
        );
    }
    Ok(pending)
}

/// The layout versions recorded in `LB_VERSIONS` (none when it is missing or unreadable: the
/// shapes of the maps decide then).
fn read_versions(pin_dir: &Path) -> BTreeMap<[u8; 16], u32> {
    let Ok(data) = MapData::from_pin(pin_dir.join(names::LB_VERSIONS)) else {
        return BTreeMap::new();
    };
    match HashMap::<_, [u8; 16], u32>::try_from(Map::HashMap(data)) {
        Ok(map) => map.iter().filter_map(Result::ok).collect(),
        Err(e) => {
            log::warn!(
                "{}: unreadable ({e}); layouts are told by their shapes",
                names::LB_VERSIONS
            );
            BTreeMap::new()
        }
    }
}

/// Each map's layout version as recorded in `LB_VERSIONS` under `pin_dir` (for `status`).
pub fn layout_versions(pin_dir: &Path) -> BTreeMap<&'static str, u32> {
    let recorded = read_versions(pin_dir);
    names::ALL
        .into_iter()
        .filter_map(|name| Some((name, *recorded.get(&layouts::version_key(name))?)))
        .collect()
}

/// Records every map's layout version in `LB_VERSIONS`, creating and pinning it if needed.
fn write_versions(pin_dir: &Path) -> anyhow::Result<()> {
    let pin = pin_dir.join(names::LB_VERSIONS);
    let data = match MapData::from_pin(&pin) {
        Ok(data) => data,
        Err(_) => {
            const BPF_MAP_TYPE_HASH: u32 = 1;
            let def = aya_obj::Map::new_from_params(
                BPF_MAP_TYPE_HASH,
                16,
                4,
                names::VERSIONS_MAX as u32,
                0,
            );
            let data = MapData::create(def, names::LB_VERSIONS, None)
                .with_context(|| format!("create {}", names::LB_VERSIONS))?;
            data.pin(&pin)
                .with_context(|| format!("pin {}", pin.display()))?;
            data
        }
    };
    let mut map = HashMap::<_, [u8; 16], u32>::try_from(Map::HashMap(data))
        .with_context(|| format!("{}: not the expected map", names::LB_VERSIONS))?;
    for name in names::ALL {
        map.insert(
            layouts::version_key(name),
            layouts::current_version(name),
            0,
        )
        .with_context(|| format!("record the layout version of {name}"))?;
    }
    Ok(())
}

/// Carries over the entries of the maps whose programs cannot do without them (the slots:
/// without them a new connection finds no backend) from their older layout, before this
/// build's programs are attached; returns the migrations left for `finish_upgrade`. A map
/// that fails is logged: its entries are written again by the first sync.
fn carry_before_attach(ebpf: &mut Ebpf, pin_dir: &Path, migrations: Vec<Pending>) -> Vec<Pending> {
    let mut later = Vec::new();
    for mut pending in migrations {
        if let Some(resized) = &mut pending.resized {
            // All of it now, while the old programs still serve from the old map; what they
            // write until this build's programs replace them follows (`top_up_resized`).
            let carried = if pending.map == names::LB_CONNS {
                // The counts read once: what is written is what later changes are taken from.
                carry_counts(&pending.old, pin_dir).map(|(counts, c)| {
                    resized.counts = Some(counts);
                    c
                })
            } else {
                let mut copied = Vec::new();
                let c = carry_resized(&pending.old, pin_dir, pending.map, false, Some(&mut copied));
                resized.copied = Some(copied);
                c
            };
            match carried {
                Ok(c) => log::info!(
                    "{}: entries carried over into the new map ({} -> {} entries): {}{}",
                    pending.map,
                    resized.was,
                    resized_to(pin_dir, pending.map),
                    c.written,
                    refused_note(&c)
                ),
                Err(e) => log::warn!(
                    "{}: entries not carried over into the resized map: {e:#}",
                    pending.map
                ),
            }
            later.push(pending);
            continue;
        }
        let is_slots = pending.map == names::LB_SLOTS
            && pending.from == 1
            && matches!(
                pending.steps[..],
                [layouts::Step {
                    migration: layouts::Migration::SlotChunks,
                    ..
                }]
            );
        if !is_slots {
            later.push(pending);
            continue;
        }
        match carry_slots(ebpf, pending.old) {
            Ok((slots, chunks)) => log::info!(
                "{}: migrated from layout version 1 to {}: {slots} slots carried over in \
                 {chunks} entries",
                names::LB_SLOTS,
                layouts::current_version(names::LB_SLOTS)
            ),
            Err(e) => log::warn!(
                "{}: migration from layout version 1 failed ({e:#}); the first sync writes \
                 the slots again",
                names::LB_SLOTS
            ),
        }
    }
    later
}

/// Copies the entries of `old` into the map pinned as `name` under `pin_dir` (`only_new`:
/// leaving the keys it holds alone).
fn carry_resized(
    old: &MapData,
    pin_dir: &Path,
    name: &str,
    only_new: bool,
    written_keys: Option<&mut Vec<u8>>,
) -> anyhow::Result<super::resize::Copied> {
    let info = old.info().context("read the old map's info")?;
    let new = MapData::from_pin(pin_dir.join(name)).context("open the new map")?;
    let map_type = info.map_type().ok();
    let mut copied = super::resize::copy_entries(
        old.fd().as_fd(),
        new.fd().as_fd(),
        info.key_size(),
        info.value_size(),
        super::resize::Mode {
            only_new,
            skip_zero: matches!(map_type, Some(MapType::Array)),
        },
        written_keys,
    )
    .context("copy the entries")?;
    // An LRU map takes every write and evicts to make room: what is past its size is gone.
    let room = u64::from(new.info()?.max_entries());
    if matches!(map_type, Some(MapType::LruHash)) && !only_new && copied.written > room {
        copied.refused += copied.written - room;
        copied.written = room;
    }
    Ok(copied)
}

/// Second copy of a resized map, once the old programs no longer write it: what they wrote
/// since the first (keys the new map lacks; for `LB_CONNS`, the counts' changes). Then the old
/// map's pin aside goes, and the map with it.
fn top_up_resized(pin_dir: &Path, map: &str, old: &MapData, resized: Resized) {
    let done = match resized.counts {
        Some(before) => add_count_changes(old, pin_dir, map, &before).map(|n| {
            log::info!("{map}: resized; {n} counts changed meanwhile carried over");
        }),
        None => {
            reconcile(old, pin_dir, map, resized.copied.as_deref().unwrap_or(&[])).and_then(|r| {
                let c = carry_resized(old, pin_dir, map, true, None)?;
                log::info!(
                    "{map}: resized; the old programs' changes since the first copy carried \
                     over: {} new entries, {} deleted, {} changed{}",
                    c.written,
                    r.deleted,
                    r.updated,
                    refused_note(&c)
                );
                Ok(())
            })
        }
    };
    if let Err(e) = done {
        log::warn!("{map}: last entries of the old map not carried: {e:#}");
    }
    let aside = pin_dir.join(RESIZING_DIR);
    if let Err(e) = fs::remove_file(aside.join(map)) {
        log::warn!("{map}: old map's pin aside not removed: {e}");
    }
    let _ = fs::remove_dir(aside);
}

/// Brings the entries the first copy wrote (`copied`) into the map pinned as `name` up to date
/// with the old map (`resize::reconcile`).
fn reconcile(
    old: &MapData,
    pin_dir: &Path,
    name: &str,
    copied: &[u8],
) -> anyhow::Result<super::resize::Reconciled> {
    if copied.is_empty() {
        return Ok(super::resize::Reconciled::default());
    }
    let info = old.info()?;
    let new = MapData::from_pin(pin_dir.join(name)).context("open the new map")?;
    super::resize::reconcile(
        old.fd().as_fd(),
        new.fd().as_fd(),
        copied,
        info.key_size(),
        info.value_size(),
    )
    .context("bring the copied entries up to date")
}

/// Old maps found pinned aside by an agent stopped in the middle of a resize: one whose new map
/// was never pinned goes back to its place (and is resized again, or not, as the flags say now);
/// otherwise what it holds and the new map lacks is carried over, and it goes.
fn recover_resizes(pin_dir: &Path) {
    let aside = pin_dir.join(RESIZING_DIR);
    if !aside.exists() {
        return;
    }
    for name in names::ALL {
        let old_pin = aside.join(name);
        if !old_pin.exists() {
            continue;
        }
        let pin = pin_dir.join(name);
        if !pin.exists() {
            match fs::rename(&old_pin, &pin) {
                Ok(()) => log::warn!(
                    "{name}: an earlier start stopped while resizing it; the old map is pinned \
                     back in its place"
                ),
                Err(e) => log::warn!("{name}: could not pin the old map back: {e}"),
            }
            continue;
        }
        // No program uses the new map yet (the earlier start stopped before attaching any):
        // it goes, the old one goes back, and the resize starts over, whole.
        if !in_use(&pin) {
            let back = fs::remove_file(&pin).and_then(|()| fs::rename(&old_pin, &pin));
            match back {
                Ok(()) => log::warn!(
                    "{name}: an earlier start stopped while resizing it, before any program \
                     used the new map; the old map is pinned back in its place"
                ),
                Err(e) => log::warn!("{name}: could not pin the old map back: {e}"),
            }
            continue;
        }
        let carried = MapData::from_pin(&old_pin)
            .context("open the old map")
            .and_then(|old| carry_resized(&old, pin_dir, name, true, None));
        match carried {
            Ok(c) => log::warn!(
                "{name}: an earlier start stopped while resizing it; {} entries of the old map \
                 carried over now{}",
                c.written,
                refused_note(&c)
            ),
            Err(e) => log::warn!("{name}: an earlier start stopped while resizing it: {e:#}"),
        }
        let _ = fs::remove_file(&old_pin);
    }
    let _ = fs::remove_dir(&aside);
}

/// First copy of `LB_CONNS`: its counts, read once, written into the new map. Returns them
/// (what the second copy takes changes from) with what was written.
fn carry_counts(
    old: &MapData,
    pin_dir: &Path,
) -> anyhow::Result<(Vec<u64>, super::resize::Copied)> {
    let counts = read_counts(old)?;
    let new = MapData::from_pin(pin_dir.join(names::LB_CONNS)).context("open the new map")?;
    let room = new.info()?.max_entries();
    let refused = super::resize::write_array_u64(new.fd().as_fd(), room, &counts)?;
    let nonzero = counts.iter().filter(|c| **c != 0).count() as u64;
    let copied = super::resize::Copied {
        read: counts.len() as u64,
        written: nonzero - refused,
        present: 0,
        refused,
    };
    Ok((counts, copied))
}

/// Whether a loaded program uses the map pinned at `pin`.
fn in_use(pin: &Path) -> bool {
    let Ok(id) = MapInfo::from_pin(pin).map(|i| i.id()) else {
        return false;
    };
    aya::programs::loaded_programs().flatten().any(|p| {
        p.map_ids()
            .ok()
            .flatten()
            .is_some_and(|ids| ids.contains(&id))
    })
}

/// Every count of a `LB_CONNS` map, by index.
fn read_counts(map: &MapData) -> anyhow::Result<Vec<u64>> {
    let info = map.info()?;
    let counts = super::resize::read_array_u64(map.fd().as_fd(), info.max_entries())?;
    Ok(counts)
}

/// Adds to the new `LB_CONNS` what each count of the old one changed by since `before`.
/// Returns how many counts changed.
fn add_count_changes(
    old: &MapData,
    pin_dir: &Path,
    map: &str,
    before: &[u64],
) -> anyhow::Result<usize> {
    let now = read_counts(old)?;
    let new = MapData::from_pin(pin_dir.join(map)).context("open the new map")?;
    let changes: Vec<(u32, u64)> = now
        .iter()
        .zip(before)
        .enumerate()
        .filter(|(_, (n, b))| n != b)
        .map(|(i, (n, b))| (i as u32, n.wrapping_sub(*b)))
        .collect();
    let room = new.info()?.max_entries();
    super::resize::add_to_array_u64(new.fd().as_fd(), room, &changes)?;
    Ok(changes.len())
}

/// The size of the map pinned as `name`, for a log line.
fn resized_to(pin_dir: &Path, name: &str) -> String {
    MapInfo::from_pin(pin_dir.join(name))
        .map_or_else(|_| "?".into(), |i| i.max_entries().to_string())
}

/// ", N did not fit" when a smaller map refused entries.
fn refused_note(c: &super::resize::Copied) -> String {
    if c.refused == 0 {
        String::new()
    } else {
        format!(
            "; {} did not fit in the smaller map and are lost (connections tracked by them may \
             be balanced afresh)",
            c.refused
        )
    }
}

/// Writes the slots of `old` (one entry per slot) into this build's `LB_SLOTS` (chunks).
/// Returns (slots, chunks written).
fn carry_slots(ebpf: &mut Ebpf, old: MapData) -> anyhow::Result<(usize, usize)> {
    let old = HashMap::<_, layouts::SlotKeyV1, u32>::try_from(Map::HashMap(old))?;
    let mut slots = Vec::new();
    for entry in old.iter() {
        slots.push(entry.context("read the old slots")?);
    }
    let count = slots.len();
    let chunks = layouts::chunk_slots(slots);
    let map = ebpf
        .map_mut(names::LB_SLOTS)
        .ok_or_else(|| anyhow!("{} missing from the BPF object", names::LB_SLOTS))?;
    let mut new = HashMap::<_, SlotKey, SlotChunk>::try_from(map)?;
    for (k, v) in &chunks {
        new.insert(k, v, 0)
            .with_context(|| format!("write {k:?}"))?;
    }
    Ok((count, chunks.len()))
}

/// Adds the per-CPU counters of `old` into `new` at the indices `steps` give them. Returns
/// how many counters were carried over.
fn carry_counters(
    old: MapData,
    new: &mut PerCpuArray<MapData, u64>,
    steps: &[layouts::Step],
) -> anyhow::Result<usize> {
    let old = PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(old))?;
    let mut carried = 0;
    for i in 0..old.len() {
        let values = old.get(&i, 0)?;
        if values.iter().all(|v| *v == 0) {
            continue;
        }
        let Some(j) = layouts::remap_counter(steps, i) else {
            continue;
        };
        let sums: Vec<u64> = new
            .get(&j, 0)?
            .iter()
            .zip(values.iter())
            .map(|(n, o)| n.saturating_add(*o))
            .collect();
        new.set(j, aya::maps::PerCpuValues::try_from(sums)?, 0)?;
        carried += 1;
    }
    Ok(carried)
}

/// Removes the program pin an earlier agent left at `pin`, if any, so this agent's can go there.
fn unpin(pin: &Path) -> anyhow::Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", pin.display())),
    }
}

/// Loads `conn_release` and pins it (replacing an earlier agent's), for the conntrack
/// collector; returns it opened from that pin.
fn pin_release(ebpf: &mut Ebpf, pin_dir: &Path) -> anyhow::Result<Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(RELEASE_PROGRAM)
        .ok_or_else(|| anyhow!("program {RELEASE_PROGRAM} missing from the BPF object"))?
        .try_into()?;
    load_retrying(|| program.load()).with_context(|| super::kernel::rejected(RELEASE_PROGRAM))?;
    let pin = pin_dir.join(RELEASE_PIN);
    unpin(&pin)?;
    program
        .pin(&pin)
        .with_context(|| format!("pin {}", pin.display()))?;
    Xdp::from_pin(&pin, XdpAttachType::Interface).with_context(|| format!("open {}", pin.display()))
}

/// The programs and maps loaded with nothing pinned and nothing attached, for running the
/// programs on crafted input through BPF_PROG_TEST_RUN (the datapath's unit tests). Everything
/// is freed when it is dropped.
pub struct Detached {
    ebpf: Ebpf,
    pub maps: Maps,
}

/// What the verifier spent on one program (`Detached::verify_all`).
#[derive(Clone, Debug)]
pub struct VerifierCost {
    pub program: String,
    /// Instructions the verifier processed (`verified_insns`; 0 when the kernel does not say).
    pub instructions: u32,
    /// Time `BPF_PROG_LOAD` took (verification is nearly all of it).
    pub took: std::time::Duration,
}

/// What one BPF_PROG_TEST_RUN of a packet program gave: its return value and the packet after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub verdict: u32,
    pub packet: Vec<u8>,
}

impl Detached {
    /// Loads the object with maps of `sizes` (the agent's defaults when `None`).
    pub fn load(sizes: Option<&MapSizes>) -> anyhow::Result<Detached> {
        raise_memlock();
        let default = MapSizes::default();
        let sizes = sizes.unwrap_or(&default);
        let mut loader = EbpfLoader::new();
        for name in names::ALL {
            if let Some(size) = sizes.of(name) {
                loader.map_max_entries(name, size);
            }
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("load the BPF object (is this kernel >= 6.8 with BTF, and are we root?)")?;
        let maps = Maps::from_source(MapSource::Object(&mut ebpf))?;
        Ok(Detached { ebpf, maps })
    }

    /// Loads every program the agent loads (the socket hooks, tc and XDP) that is not loaded
    /// yet, and reports what the verifier spent on each, by program name.
    pub fn verify_all(&mut self) -> anyhow::Result<Vec<VerifierCost>> {
        use aya::programs::Program;
        let mut costs = Vec::new();
        let mut rejected = Vec::new();
        for (name, program) in self.ebpf.programs_mut() {
            let started = std::time::Instant::now();
            let loaded = match program {
                Program::CgroupSockAddr(p) => {
                    load_once(p.fd().is_ok(), || load_retrying(|| p.load()))
                }
                Program::CgroupSock(p) => load_once(p.fd().is_ok(), || load_retrying(|| p.load())),
                Program::SchedClassifier(p) => {
                    load_once(p.fd().is_ok(), || load_retrying(|| p.load()))
                }
                Program::Xdp(p) => load_once(p.fd().is_ok(), || load_retrying(|| p.load())),
                // Never loaded by the agent (`maps_anchor`).
                _ => Ok(false),
            };
            let loaded = match loaded {
                Ok(loaded) => loaded,
                Err(e) => {
                    // Every program is tried: a kernel's verifier may reject several.
                    rejected.push(format!(
                        "{}: {}",
                        super::kernel::rejected(name),
                        last_lines(&e)
                    ));
                    continue;
                }
            };
            if !loaded {
                continue;
            }
            let took = started.elapsed();
            let info = program
                .info()
                .with_context(|| format!("information of {name}"))?;
            costs.push(VerifierCost {
                program: name.to_string(),
                instructions: info.verified_instruction_count().unwrap_or(0),
                took,
            });
        }
        if !rejected.is_empty() {
            bail!("{}", rejected.join("\n"));
        }
        costs.sort_by(|a, b| a.program.cmp(&b.program));
        Ok(costs)
    }

    /// The monitor's ring buffer (taken once: a second call fails).
    pub fn events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::LB_EVENTS)
            .ok_or_else(|| anyhow!("LB_EVENTS: not in the object, or taken already"))?;
        RingBuf::try_from(map).context("LB_EVENTS: unexpected map type")
    }

    /// The tc program `name`, loaded (through the verifier) on first use.
    fn classifier(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the BPF object"))?
            .try_into()?;
        if program.fd().is_err() {
            load_retrying(|| program.load()).with_context(|| super::kernel::rejected(name))?;
        }
        Ok(program)
    }

    /// The object's map `name`, for a test to write what the agent's other parts would (an
    /// interface's record in `LB_IFACES`, a socket hook's entry in `LB_AFFINITY`).
    pub fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the BPF object"))
    }

    /// Runs the tc ingress program on `frame` (an Ethernet frame), which it sees as arriving on
    /// the calling thread's network namespace's loopback device.
    pub fn tc_ingress(&mut self, frame: &[u8]) -> anyhow::Result<RunResult> {
        let program = self.classifier(TC_PROGRAM)?;
        run_packet(|opts| program.test_run(opts), frame, None)
    }

    /// `tc_ingress` with the skb's checksum state CHECKSUM_COMPLETE, as a NIC that sums every
    /// packet (mlx5, for one) hands it over: the kernel sums the packet into `skb->csum`
    /// before the run and fails the run with EBADMSG when `skb->csum` disagrees with the
    /// packet after it (BPF_F_TEST_SKB_CHECKSUM_COMPLETE, Linux 6.11). Errors carry the
    /// kernel's errno (`std::io::Error`): EINVAL from a kernel without the flag.
    pub fn tc_ingress_complete(&mut self, frame: &[u8]) -> anyhow::Result<RunResult> {
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;
        let fd = self.classifier(TC_PROGRAM)?.fd()?.as_fd().as_raw_fd();
        let mut out = vec![0u8; frame.len() + 256];
        // bpf_attr.test as 64-bit words (little-endian halves): prog_fd | retval,
        // data_size_in | data_size_out, data_in, data_out, repeat | duration, ctx sizes,
        // ctx_in, ctx_out, flags | cpu, batch_size.
        let mut attr = [0u64; 10];
        attr[0] = fd as u32 as u64;
        attr[1] = frame.len() as u64 | (out.len() as u64) << 32;
        attr[2] = frame.as_ptr() as u64;
        attr[3] = out.as_mut_ptr() as u64;
        attr[4] = 1;
        attr[8] = u64::from(BPF_F_TEST_SKB_CHECKSUM_COMPLETE);
        // SAFETY: a zero-padded bpf_attr for BPF_PROG_TEST_RUN whose buffers outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr) as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        out.truncate((attr[1] >> 32) as usize);
        Ok(RunResult {
            verdict: (attr[0] >> 32) as u32,
            packet: out,
        })
    }

    /// Runs the tc egress program on `frame` (an Ethernet frame) as leaving through the
    /// calling thread's network namespace's loopback device.
    pub fn tc_egress(&mut self, frame: &[u8]) -> anyhow::Result<RunResult> {
        let program = self.classifier(TC_EGRESS_PROGRAM)?;
        run_packet(|opts| program.test_run(opts), frame, None)
    }

    /// The XDP program, loaded (through the verifier) on first use.
    fn xdp_program(&mut self) -> anyhow::Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing from the BPF object"))?
            .try_into()?;
        if program.fd().is_err() {
            load_retrying(|| program.load())
                .with_context(|| super::kernel::rejected(XDP_PROGRAM))?;
        }
        Ok(program)
    }

    /// Runs the XDP program on `frame` as received on interface `ifindex` of the calling
    /// thread's network namespace (0: loopback).
    pub fn xdp_ingress(&mut self, frame: &[u8], ifindex: u32) -> anyhow::Result<RunResult> {
        let program = self.xdp_program()?;
        let md = xdp_md(frame, ifindex);
        run_packet(
            |opts| program.test_run(opts),
            frame,
            (ifindex != 0).then_some(&md[..]),
        )
    }

    /// Moves `LB_ROUTE_GEN` on, as the agent does at a route or neighbour change; returns the
    /// new generation.
    pub fn bump_route_generation(&mut self) -> anyhow::Result<u32> {
        let map = self
            .ebpf
            .map_mut(names::LB_ROUTE_GEN)
            .ok_or_else(|| anyhow!("map {} missing from the BPF object", names::LB_ROUTE_GEN))?;
        let mut map: Array<&mut MapData, u32> = Array::try_from(map)?;
        let next = map.get(&0, 0)?.wrapping_add(1);
        map.set(0, next, 0)?;
        Ok(next)
    }

    /// The kernel's mean run time of the XDP program on `frame` (as `xdp_ingress`) over
    /// `runs` BPF_PROG_TEST_RUNs (`mean_run_time`).
    pub fn xdp_ingress_cost(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        runs: u32,
    ) -> anyhow::Result<std::time::Duration> {
        let program = self.xdp_program()?;
        let md = xdp_md(frame, ifindex);
        mean_run_time(
            |opts| program.test_run(opts),
            frame,
            (ifindex != 0).then_some(&md[..]),
            runs,
        )
    }

    /// `xdp_ingress_cost` for the tc ingress program (`tc_ingress`).
    pub fn tc_ingress_cost(
        &mut self,
        frame: &[u8],
        runs: u32,
    ) -> anyhow::Result<std::time::Duration> {
        let program = self.classifier(TC_PROGRAM)?;
        mean_run_time(|opts| program.test_run(opts), frame, None, runs)
    }
}

/// The `struct xdp_md` context of a frame received on interface `ifindex`: data, data_end,
/// data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
fn xdp_md(frame: &[u8], ifindex: u32) -> [u8; 24] {
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    md
}

/// The kernel's mean run time of a packet program on `frame` over `runs` BPF_PROG_TEST_RUNs
/// of one repetition each: a repetition within one run would see the packet the previous one
/// rewrote.
fn mean_run_time(
    mut run: impl FnMut(
        TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError>,
    frame: &[u8],
    ctx_in: Option<&[u8]>,
    runs: u32,
) -> anyhow::Result<std::time::Duration> {
    let runs = runs.max(1);
    let mut out = vec![0u8; frame.len() + 256];
    let mut total = std::time::Duration::ZERO;
    for _ in 0..runs {
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in,
            ..TestRunOptions::new()
        };
        total += run(opts).context("BPF_PROG_TEST_RUN")?.duration;
    }
    Ok(total / runs)
}

/// Loads a program unless it is `loaded` already; true when it is loaded afterwards.
fn load_once(
    loaded: bool,
    load: impl FnOnce() -> Result<(), aya::programs::ProgramError>,
) -> Result<bool, aya::programs::ProgramError> {
    if !loaded {
        load()?;
    }
    Ok(true)
}

/// The verifier's verdict out of a load error: the last lines of its log (the reason, and the
/// instruction count), on one line.
fn last_lines(e: &aya::programs::ProgramError) -> String {
    let text = format!("{e:#}");
    let mut lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .rev()
        .take(4)
        .collect();
    lines.reverse();
    lines.join(" | ")
}

/// One BPF_PROG_TEST_RUN of a packet program; room is left for the packet to grow (IP
/// options, encapsulation, a reply built in place).
fn run_packet<'a>(
    run: impl FnOnce(
        TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError>,
    frame: &'a [u8],
    ctx_in: Option<&'a [u8]>,
) -> anyhow::Result<RunResult> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in,
        ..TestRunOptions::new()
    };
    let r = run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok(RunResult {
        verdict: r.return_value,
        packet: out,
    })
}

/// Runs a program's `load` again while the kernel answers EAGAIN, up to 10 times: the verifier
/// gives up with EAGAIN when a signal is pending for the loading thread, and a SIGCHLD of
/// another thread's child lands on any thread while the child's parent thread blocks it (as
/// `posix_spawn` does). libbpf retries the same way.
fn load_retrying(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut tries = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 10 =>
            {
                tries += 1;
            }
            done => return done,
        }
    }
}

/// Removes every pin the agent created under `pin_dir`: link pins first (which detaches the
/// hooks once no process holds them), then the maps (freed once no program uses them). Every
/// pin in the links directory goes, whatever its name: one a newer or older release pinned
/// there would keep its program attached.
pub fn remove_pins(pin_dir: &Path) -> anyhow::Result<usize> {
    let links_dir = pin_dir.join(LINKS_DIR);
    let links: Vec<String> = fs::read_dir(&links_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let links: Vec<&str> = links.iter().map(String::as_str).collect();
    let mut removed = remove_files_and_dir(&links_dir, &links)?;
    // Old maps of a resize a stopped agent did not finish.
    removed += remove_files_and_dir(&pin_dir.join(RESIZING_DIR), &names::ALL)?;
    let mut files = names::ALL.to_vec();
    files.push(names::LB_VERSIONS);
    files.push(RELEASE_PIN);
    files.push(super::tclinks::TC_PROGRAM_PIN);
    files.push(super::tclinks::TC_L3_PROGRAM_PIN);
    files.push(super::tclinks::TC_EGRESS_PROGRAM_PIN);
    removed += remove_files_and_dir(pin_dir, &files)?;
    Ok(removed)
}

/// Removes the files `names` in `dir` (missing ones are fine), then `dir` if it is empty.
fn remove_files_and_dir(dir: &Path, names: &[&str]) -> anyhow::Result<usize> {
    let mut removed = 0;
    for name in names {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("could not remove {}: {e}", dir.display()),
    }
    Ok(removed)
}

impl MapIo for Datapath {
    fn dump(&self) -> anyhow::Result<MapState> {
        self.maps.dump()
    }
    fn terminate(&mut self, removed: &[Removed]) -> Option<Report> {
        let (terminator, tcp) = self.terminator.as_mut()?;
        let removed: Vec<Removed> = removed
            .iter()
            .filter(|r| r.proto == proto_common::UDP || (*tcp && r.proto == proto_common::TCP))
            .copied()
            .collect();
        if removed.is_empty() {
            return None;
        }
        let targets = match self.maps.termination_targets(&removed) {
            Ok(t) => t,
            Err(e) => {
                return Some(Report {
                    errors: vec![format!("read the reverse-translation maps: {e:#}")],
                    ..Report::default()
                });
            }
        };
        if targets.is_empty() {
            return None;
        }
        Some(terminator.terminate(targets))
    }
    fn capacity(&self) -> Option<Capacity> {
        self.maps.capacity()
    }
    fn forget_flows(&mut self, removed: &[Removed]) -> anyhow::Result<Vec<(u8, u64)>> {
        let gone: BTreeSet<(u32, u32)> = removed
            .iter()
            .filter(|r| r.proto == proto_common::UDP)
            .map(|r| (r.svc_id, r.backend_id))
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let maps = &mut self.maps;
        let release = maps.release.as_ref();
        let v4 = forget(
            &mut maps.ct4,
            names::LB_CT4,
            &gone,
            |k, v| (k.proto, v.svc_id, v.backend_id),
            release4(release),
        )?;
        let v6 = forget(
            &mut maps.ct6,
            names::LB_CT6,
            &gone,
            |k, v| (k.proto, v.svc_id, v.backend_id),
            release6(release),
        )?;
        Ok(vec![(4, v4), (6, v6)])
    }
    fn forget_affinity(&mut self, retired: &[(u32, u32)]) -> anyhow::Result<u64> {
        if retired.is_empty() {
            return Ok(0);
        }
        let retired: BTreeSet<(u32, u32)> = retired.iter().copied().collect();
        let map = &mut self.maps.affinity;
        let doomed: Vec<AffinityKey> = dump_map(map, names::LB_AFFINITY)?
            .into_iter()
            .filter(|(k, v)| retired.contains(&(k.port_id, v.backend_id)))
            .map(|(k, _)| k)
            .collect();
        let mut deleted = 0;
        for k in &doomed {
            // Looked at again: a client that picked afresh since the dump keeps its new entry.
            match map.get(k, 0) {
                Ok(v) if retired.contains(&(k.port_id, v.backend_id)) => {}
                _ => continue,
            }
            ignore_missing(map.remove(k))
                .with_context(|| format!("delete from {}", names::LB_AFFINITY))?;
            deleted += 1;
        }
        Ok(deleted)
    }
    fn apply(&mut self, op: &Op) -> anyhow::Result<()> {
        self.maps.apply(op)
    }
    fn apply_run(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        self.maps.apply_run(ops)
    }
    fn synced(&mut self, ok: bool) {
        if let Err(e) = self.record_sync(ok) {
            log::warn!("could not record the sync in LB_AGENT: {e:#}");
        }
    }
}

/// One socket hook as its pinned link shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HookInfo {
    pub hook: String,
    /// Kernel link id, if the link pin exists and opens.
    pub link_id: Option<u32>,
    /// Id of the program running in the link.
    pub program_id: Option<u32>,
}

/// The pinned hook links under `pin_dir`: the socket hooks, then tc on each interface
/// (`tc-IFNAME` at ingress, `tce-IFNAME` at egress) and XDP (`xdp-IFNAME`).
pub fn hooks(pin_dir: &Path) -> Vec<HookInfo> {
    let links_dir = pin_dir.join(LINKS_DIR);
    let mut tc: Vec<String> = fs::read_dir(&links_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tc-") || n.starts_with("tce-") || n.starts_with("xdp-"))
        .collect();
    tc.sort();
    SOCK_PROGRAMS
        .iter()
        .map(|n| n.to_string())
        .chain(tc)
        .filter(|name| {
            // tc and XDP links count only while they are on the interface of their name (a
            // recreated interface has a new index and none of our programs).
            let interface = super::tclinks::iface_of_pin("tc-", name)
                .or_else(|| super::tclinks::iface_of_pin("tce-", name))
                .or_else(|| super::tclinks::iface_of_pin("xdp-", name));
            interface.is_none_or(|i| {
                super::tclinks::link_state(&links_dir.join(name)).is_some_and(|s| {
                    s.ifindex != 0 && super::tclinks::ifindex(&i) == Some(s.ifindex)
                })
            })
        })
        .map(|name| {
            let info = PinnedLink::from_pin(links_dir.join(&name))
                .ok()
                .and_then(|l| FdLink::from(l).info().ok());
            HookInfo {
                // As the interface is named (a pin name writes its dots as colons).
                hook: name.replace(':', "."),
                link_id: info.as_ref().map(|i| i.id()),
                program_id: info.as_ref().map(|i| i.program_id()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flag's size is followed exactly; a size from the node's memory only when the pinned
    /// one is off by more than a factor of two.
    #[test]
    fn which_pinned_sizes_are_resized() {
        let sizes = MapSizes {
            conntrack: 16_384,
            sock_revnat: 16_384,
            affinity: 16_384,
            flows_from_memory: [true, true, false],
            ..MapSizes::default()
        };
        // Flags: any difference.
        assert!(sizes.resizes(names::LB4_SERVICES, 65_535));
        assert!(!sizes.resizes(names::LB4_SERVICES, names::SERVICES_MAX as u32));
        assert!(sizes.resizes(names::LB_CT4, 16_787));
        assert!(!sizes.resizes(names::LB_CT4, 16_384));
        // From memory: within half and twice, kept.
        for (map, pinned, resized) in [
            (names::LB_AFFINITY, 16_787, false),
            (names::SOCK4_REVNAT, 8_192, false),
            (names::LB_DGRAM_FLOWS, 32_768, false),
            (names::SOCK6_REVNAT, 8_191, true),
            (names::LB_AFFINITY, 32_769, true),
        ] {
            assert_eq!(sizes.resizes(map, pinned), resized, "{map} {pinned}");
        }
        // Maps no flag sizes are never resized.
        assert!(!sizes.resizes(names::LB_STATS, 1));
    }
}
