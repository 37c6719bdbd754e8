//! The tc programs' links on interfaces: attached, replaced in place and detached one interface
//! at a time (pins `links/tc-IFNAME` at ingress, `links/tce-IFNAME` at egress), each checked
//! against the interface it was made on, and recorded with the reason in `LB_IFACES`.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{SchedClassifier, TcAttachType, links::FdLink},
};
use proxy_common::{info::IfaceInfo, maps as names};

use super::bpf::{BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD, LINKS_DIR, bpf_syscall, replace_pinned};

/// Pin of the loaded tc program under the pin directory, from which every attach is made.
pub const TC_PROGRAM_PIN: &str = "tc_ingress";

/// Pin of the loaded tc program for devices without a link-layer header (`tc_ingress_l3`),
/// attached at their ingress instead of `tc_ingress`.
pub const TC_L3_PROGRAM_PIN: &str = "tc_ingress_l3";

/// Pin of the loaded tc egress program (`tc_egress`), attached beside every ingress link.
pub const TC_EGRESS_PROGRAM_PIN: &str = "tc_egress";

/// Pin name prefix of the tc links (`tc-IFNAME`).
pub const TC_LINK_PREFIX: &str = "tc-";

/// Pin name prefix of the tc egress links (`tce-IFNAME`), which follow the ingress ones.
pub const TC_EGRESS_LINK_PREFIX: &str = "tce-";

/// The pin file name of the link `prefix` (`tc-`, `xdp-`) of interface `iface`. bpffs refuses
/// names with a dot, which interface names may hold (flannel's `flannel.1`, VLANs'
/// `eth0.100`): a dot is written as a colon, which no interface name holds.
pub fn link_pin_name(prefix: &str, iface: &str) -> String {
    format!("{prefix}{}", iface.replace('.', ":"))
}

/// The interface of a link pin's file name, if it has `prefix` (`link_pin_name` undone).
pub fn iface_of_pin(prefix: &str, file: &str) -> Option<String> {
    file.strip_prefix(prefix).map(|i| i.replace(':', "."))
}

/// What the kernel says about a pinned link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub link_id: u32,
    pub program_id: u32,
    /// Interface the link is on; 0 once that interface is gone (the link is then defunct).
    pub ifindex: u32,
}

/// Reads a pinned link's id, program and interface (BPF_OBJ_GET_INFO_BY_FD on the link; aya
/// 0.14's `LinkInfo` does not expose the interface).
pub fn link_state(pin: &Path) -> Option<LinkState> {
    let info = link_info(pin)?;
    Some(LinkState {
        link_id: info[1],
        program_id: info[2],
        ifindex: info[4],
    })
}

/// The kernel's `struct bpf_link_info` of the link pinned at `pin`, as 32-bit words: type, id,
/// prog_id, then at word 4 (byte offset 16) the per-type union, whose tcx and xdp members
/// start with the ifindex and whose cgroup member is the 64-bit cgroup id. Larger than any
/// kernel's struct: the kernel only requires the tail it does not know to be zero.
pub fn link_info(pin: &Path) -> Option<[u32; 64]> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).ok()?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64; // bpf_attr.pathname
    let fd = bpf_syscall(BPF_OBJ_GET, &mut attr).ok()?;
    // SAFETY: the kernel returned a fresh fd we now own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = [0u32; 64];
    let mut attr = [0u64; 16];
    // bpf_attr.info: bpf_fd (u32), info_len (u32), info (u64 pointer).
    attr[0] = (link.as_raw_fd() as u32 as u64) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
    Some(info)
}

/// Index of the interface named `name` now, if there is one.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The tc links pinned under `pin_dir` that are really attached: interface name → link, only
/// where the link's interface still exists under that name.
pub fn live_links(pin_dir: &Path) -> BTreeMap<String, LinkState> {
    let links_dir = pin_dir.join(LINKS_DIR);
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(&links_dir).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(name) = iface_of_pin(TC_LINK_PREFIX, &file) else {
            continue;
        };
        if let Some(state) = link_state(&entry.path())
            && state.ifindex != 0
            && ifindex(&name) == Some(state.ifindex)
        {
            out.insert(name, state);
        }
    }
    out
}

/// The entries of `LB_IFACES` under `pin_dir` (why each interface carries the program).
pub fn recorded(pin_dir: &Path) -> anyhow::Result<BTreeMap<u32, IfaceInfo>> {
    let map = ifaces_map(pin_dir)?;
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (k, v) = item?;
        out.insert(k, v);
    }
    Ok(out)
}

fn ifaces_map(pin_dir: &Path) -> anyhow::Result<HashMap<MapData, u32, IfaceInfo>> {
    let path = pin_dir.join(names::LB_IFACES);
    let data =
        MapData::from_pin(&path).with_context(|| format!("open pinned map {}", path.display()))?;
    HashMap::try_from(Map::HashMap(data)).context("map LB_IFACES: unexpected type or layout")
}

/// Why an attach failed, for the log line and the `{reason}` of the failure metric.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The interface went away (or was renamed) before or while the program was attached.
    #[error("the interface is gone")]
    Gone,
    /// The kernel refused the link (an interface type without tc, a full TCX chain, ...).
    #[error("the kernel refused the tc link: {0}")]
    Refused(String),
    /// The link was made but could not be pinned or recorded.
    #[error("{0}")]
    Pin(String),
}

impl AttachError {
    pub fn reason(&self) -> &'static str {
        match self {
            AttachError::Gone => "gone",
            AttachError::Refused(_) => "refused",
            AttachError::Pin(_) => "pin",
        }
    }
}

/// Attaches and detaches the pinned tc program interface by interface; usable from any
/// thread (it holds its own handles, opened from the pins).
pub struct TcLinks {
    program: SchedClassifier,
    program_l3: SchedClassifier,
    egress: SchedClassifier,
    links_dir: PathBuf,
    ifaces: HashMap<MapData, u32, IfaceInfo>,
}

impl TcLinks {
    /// Opens the program pinned by `Datapath::pin_tc_program` and `LB_IFACES`.
    pub fn open(pin_dir: &Path) -> anyhow::Result<TcLinks> {
        let open = |file: &str| {
            let pin = pin_dir.join(file);
            SchedClassifier::from_pin(&pin)
                .with_context(|| format!("open the tc program pinned at {}", pin.display()))
        };
        let program = open(TC_PROGRAM_PIN)?;
        let program_l3 = open(TC_L3_PROGRAM_PIN)?;
        let egress = open(TC_EGRESS_PROGRAM_PIN)?;
        let links_dir = pin_dir.join(LINKS_DIR);
        fs::create_dir_all(&links_dir)
            .with_context(|| format!("create {}", links_dir.display()))?;
        Ok(TcLinks {
            program,
            program_l3,
            egress,
            links_dir,
            ifaces: ifaces_map(pin_dir)?,
        })
    }

    fn pin(&self, name: &str) -> PathBuf {
        self.links_dir.join(link_pin_name(TC_LINK_PREFIX, name))
    }

    fn egress_pin(&self, name: &str) -> PathBuf {
        self.links_dir
            .join(link_pin_name(TC_EGRESS_LINK_PREFIX, name))
    }

    /// Interfaces with a pinned tc link (live or not): name → link state.
    pub fn pinned(&self) -> BTreeMap<String, Option<LinkState>> {
        fs::read_dir(&self.links_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let name = iface_of_pin(TC_LINK_PREFIX, &file)?;
                Some((name, link_state(&e.path())))
            })
            .collect()
    }

    /// Puts the program on interface `name`, whose index is `index`, at ingress and the egress
    /// program at egress: swaps each into a live link an earlier agent pinned there, else
    /// attaches afresh (TCX) and pins the link. Returns true when the ingress link was kept
    /// from an earlier agent. Records `info` in `LB_IFACES`. A device without a link-layer
    /// header (`l3`) gets `tc_ingress_l3` at ingress and nothing at egress (the egress program
    /// reads Ethernet frames; the node's own replies to translated flows do not leave there).
    pub fn attach(
        &mut self,
        name: &str,
        index: u32,
        info: IfaceInfo,
        l3: bool,
    ) -> Result<bool, AttachError> {
        let ingress_pin = self.pin(name);
        let program = if l3 {
            &mut self.program_l3
        } else {
            &mut self.program
        };
        let kept = attach_one(program, &ingress_pin, name, index, TcAttachType::Ingress)?;
        let egress_pin = self.egress_pin(name);
        if l3 {
            let _ = fs::remove_file(&egress_pin);
        } else {
            attach_one(
                &mut self.egress,
                &egress_pin,
                name,
                index,
                TcAttachType::Egress,
            )?;
        }
        self.ifaces
            .insert(index, info, 0)
            .map_err(|e| AttachError::Pin(format!("record in LB_IFACES: {e}")))?;
        Ok(kept)
    }

    /// Removes the programs from interface `name` (their pins; the kernel detaches the links)
    /// and forgets `index` in `LB_IFACES`.
    pub fn detach(&mut self, name: &str, index: Option<u32>) {
        let _ = fs::remove_file(self.pin(name));
        let _ = fs::remove_file(self.egress_pin(name));
        if let Some(index) = index {
            let _ = self.ifaces.remove(&index);
        }
    }

    /// Replaces the `LB_IFACES` record of `info.ifindex` (its reason changed).
    pub fn record(&mut self, info: IfaceInfo) {
        if let Err(e) = self.ifaces.insert(info.ifindex, info, 0) {
            log::debug!("LB_IFACES: cannot record {}: {e}", name_of(&info));
        }
    }

    /// Drops `LB_IFACES` entries of interfaces that no longer carry a link of ours.
    pub fn forget_stale(&mut self, live: &BTreeMap<String, u32>) {
        let keep: std::collections::BTreeSet<u32> = live.values().copied().collect();
        let stale: Vec<u32> = self
            .ifaces
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k) && *k < MISSING_KEYS)
            .collect();
        for k in stale {
            let _ = self.ifaces.remove(&k);
        }
    }
}

/// Puts `program` on interface `name` (index `index`) at `side`, its link pinned at `pin`:
/// swapped into a live link an earlier agent pinned there (returns true), else attached afresh.
fn attach_one(
    program: &mut SchedClassifier,
    pin: &Path,
    name: &str,
    index: u32,
    side: TcAttachType,
) -> Result<bool, AttachError> {
    let kept = match link_state(pin) {
        Some(s) if s.ifindex == index => {
            let fd = program.fd().map_err(|e| AttachError::Pin(e.to_string()))?;
            replace_pinned(pin, fd.as_fd())
        }
        Some(_) => {
            // A link on an interface of the same name that is gone (a pod restart).
            let _ = fs::remove_file(pin);
            false
        }
        None => false,
    };
    if kept {
        return Ok(true);
    }
    if ifindex(name) != Some(index) {
        return Err(AttachError::Gone);
    }
    let id = match program.attach(name, side) {
        Ok(id) => id,
        Err(_) if ifindex(name) != Some(index) => return Err(AttachError::Gone),
        Err(e) => return Err(AttachError::Refused(format!("{e:#}"))),
    };
    let link: FdLink = program
        .take_link(id)
        .map_err(|e| AttachError::Pin(e.to_string()))?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| AttachError::Pin(e.to_string()))?;
    link.pin(pin)
        .map_err(|e| AttachError::Pin(format!("pin {}: {e}", pin.display())))?;
    // The name may have moved to another interface between the lookup and the attach.
    match link_state(pin) {
        Some(s) if s.ifindex == index => Ok(false),
        _ => {
            let _ = fs::remove_file(pin);
            Err(AttachError::Gone)
        }
    }
}

/// Keys of `LB_IFACES` from here on record interfaces named in `--pod-interfaces` that do not
/// exist (their `ifindex` is 0); real interface indexes stay far below.
pub const MISSING_KEYS: u32 = 0xffff_0000;

impl TcLinks {
    /// Records the named interfaces that do not exist, replacing the previous record.
    pub fn record_missing(&mut self, names: &[String]) {
        let old: Vec<u32> = self
            .ifaces
            .keys()
            .filter_map(Result::ok)
            .filter(|k| *k >= MISSING_KEYS)
            .collect();
        for k in old {
            let _ = self.ifaces.remove(&k);
        }
        for (i, name) in names.iter().take(0xffff).enumerate() {
            let info = iface_info(name, 0, proxy_common::info::IFACE_NAMED, None, None);
            if let Err(e) = self.ifaces.insert(MISSING_KEYS + i as u32, info, 0) {
                log::debug!("LB_IFACES: cannot record missing {name}: {e}");
            }
        }
    }
}

/// `IfaceInfo` for interface `name` with reason `why`, naming `addr`/`prefix_len` and the
/// bridge port `via` where they apply.
pub fn iface_info(
    name: &str,
    index: u32,
    why: u8,
    addr: Option<(std::net::IpAddr, u8)>,
    via: Option<&str>,
) -> IfaceInfo {
    let mut info = IfaceInfo {
        ifindex: index,
        why,
        family: 0,
        prefix_len: 0,
        name_len: 0,
        name: [0; 16],
        addr: [0; 16],
        via: [0; 16],
    };
    let n = name.len().min(16);
    info.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    info.name_len = n as u8;
    if let Some((addr, len)) = addr {
        info.prefix_len = len;
        match addr {
            std::net::IpAddr::V4(a) => {
                info.family = 4;
                info.addr[..4].copy_from_slice(&a.octets());
            }
            std::net::IpAddr::V6(a) => {
                info.family = 6;
                info.addr = a.octets();
            }
        }
    }
    if let Some(via) = via {
        let n = via.len().min(16);
        info.via[..n].copy_from_slice(&via.as_bytes()[..n]);
    }
    info
}

/// The name recorded in an `LB_IFACES` entry.
pub fn name_of(info: &IfaceInfo) -> String {
    let n = (info.name_len as usize).min(16);
    String::from_utf8_lossy(&info.name[..n]).into_owned()
}

/// A readable reason of an `LB_IFACES` entry: `external`, `pod: route to 10.244.0.5`, ...
pub fn describe(info: &IfaceInfo) -> String {
    use proxy_common::info::*;
    let addr = match info.family {
        4 => Some(std::net::IpAddr::from([
            info.addr[0],
            info.addr[1],
            info.addr[2],
            info.addr[3],
        ])),
        6 => Some(std::net::IpAddr::from(info.addr)),
        _ => None,
    };
    let text = |b: &[u8; 16]| {
        let end = b.iter().position(|c| *c == 0).unwrap_or(16);
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    let addr = addr.map_or("?".to_string(), |a| a.to_string());
    if info.ifindex == 0 {
        return "named in --pod-interfaces, does not exist (attached when it appears)".into();
    }
    let why = match info.reason() {
        IFACE_EXTERNAL => "external".into(),
        IFACE_POD_ROUTE => format!("pod: route to endpoint {addr}"),
        IFACE_POD_CIDR => format!("pod: route to pod CIDR {addr}/{}", info.prefix_len),
        IFACE_PATTERN => format!("pod: name matches pattern {}", text(&info.via)),
        IFACE_NAMED => "pod: named in --pod-interfaces".into(),
        IFACE_BRIDGE if info.family != 0 => format!(
            "bridge: its port {} carries the route to endpoint {addr}",
            text(&info.via)
        ),
        IFACE_BRIDGE => format!("bridge: its port {} was selected", text(&info.via)),
        IFACE_KEPT => "kept from the previous agent until this node's endpoints are read".into(),
        IFACE_REMOTE_ROUTE => format!("route to remote endpoint {addr}"),
        other => format!("unknown reason {other}"),
    };
    if info.no_link_header() {
        format!("{why}; no link-layer header (tc_ingress_l3)")
    } else {
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bpffs refuses a pin name with a dot: interface names with dots are pinned with colons,
    /// and read back as they are named.
    #[test]
    fn link_pin_names_hold_no_dot_and_give_the_interface_back() {
        for iface in ["eth0", "flannel.1", "eth0.100", "cali1234567890a"] {
            let pin = link_pin_name(TC_LINK_PREFIX, iface);
            assert!(!pin.contains('.'), "{pin}");
            assert_eq!(iface_of_pin(TC_LINK_PREFIX, &pin).as_deref(), Some(iface));
        }
        assert_eq!(link_pin_name("xdp-", "flannel.1"), "xdp-flannel:1");
        assert_eq!(iface_of_pin("tc-", "xdp-eth0"), None);
    }
}
