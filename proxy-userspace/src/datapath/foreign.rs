//! Programs of others where this agent's programs run: at the socket hooks of its cgroup (and
//! of the cgroups above it, whose programs run for the same sockets), and beside its tc programs
//! on an interface under one of this build's names. Another kube-bpf-proxy whose pins are in
//! another directory (a pin path changed between two DaemonSet versions, the old links left on
//! a persistent bpffs; a second agent started by hand with another `--bpffs`) is not stopped by
//! the pin directory's lock: its programs keep translating from maps nobody updates. Another
//! service proxy's socket programs (Cilium's, Calico's) translate the same connections. Either
//! way the operator must know; the agent cannot tell which one is meant to stay, so it says
//! what it found and goes on.

use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use super::bpf::{
    BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_GET_FD_BY_ID, BPF_PROG_QUERY,
    SOCK_PROGRAMS, TC_EGRESS_PROGRAM, TC_L3_PROGRAM, TC_PROGRAM, XDP_PROGRAM, bpf_syscall, hooks,
};

/// `BPF_F_QUERY_EFFECTIVE`: the programs that run for the cgroup's sockets, its ancestors'
/// included.
const BPF_F_QUERY_EFFECTIVE: u64 = 1;
/// `BPF_TCX_INGRESS`, `BPF_TCX_EGRESS` (enum bpf_attach_type, Linux 6.6).
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// The attach type (enum bpf_attach_type) of each of `SOCK_PROGRAMS`, in its order.
const SOCK_ATTACH_TYPES: [u32; 9] = [
    10, // BPF_CGROUP_INET4_CONNECT
    14, // BPF_CGROUP_UDP4_SENDMSG
    19, // BPF_CGROUP_UDP4_RECVMSG
    29, // BPF_CGROUP_INET4_GETPEERNAME
    11, // BPF_CGROUP_INET6_CONNECT
    15, // BPF_CGROUP_UDP6_SENDMSG
    20, // BPF_CGROUP_UDP6_RECVMSG
    30, // BPF_CGROUP_INET6_GETPEERNAME
    34, // BPF_CGROUP_INET_SOCK_RELEASE
];

/// Program ids a query reads at most per hook.
const MAX_PROGRAMS: usize = 64;

/// A program that is not this agent's, where this agent's run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Foreign {
    /// Where: the socket hook (this build's program name for it) or `tc-IFNAME`/`tce-IFNAME`.
    pub hook: String,
    pub program_id: u32,
    /// The kernel's name of the program (15 bytes at most), when it could be read.
    pub name: Option<String>,
    /// Its name is one of this build's programs' and it uses a map named as this project's
    /// are (`LB_*`, `LB4_*`, `LB6_*`, `SOCK4_*`, `SOCK6_*`): another kube-bpf-proxy's.
    pub kube_bpf_proxy: bool,
}

impl Foreign {
    /// Whether it is another kube-bpf-proxy's program.
    pub fn is_ours_elsewhere(&self) -> bool {
        self.kube_bpf_proxy
    }
}

/// Whether `name` (as the kernel keeps it) is one of this build's programs'.
fn our_program_name(name: &str) -> bool {
    SOCK_PROGRAMS
        .iter()
        .chain(&[TC_PROGRAM, TC_L3_PROGRAM, TC_EGRESS_PROGRAM, XDP_PROGRAM])
        .any(|ours| kernel_name(ours) == name)
}

/// Whether `name` is named as this project's maps are.
fn our_map_name(name: &str) -> bool {
    ["LB_", "LB4_", "LB6_", "SOCK4_", "SOCK6_"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A program name as the kernel keeps it (`BPF_OBJ_NAME_LEN` 16 with its NUL).
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// The programs of others at the socket hooks of `cgroup` (its own and its ancestors': an
/// effective query; programs of cgroups below it are not seen) and another kube-bpf-proxy's
/// beside this agent's tc programs on the interfaces its links are on (TCX, Linux 6.6). Needs
/// CAP_NET_ADMIN for the queries; names need CAP_SYS_ADMIN (without it, every program at a
/// socket hook that is not this agent's is listed unnamed, and tc's are not listed). A failed
/// query is logged at debug and skipped.
pub fn find(pin_dir: &Path, cgroup: Option<&Path>) -> Vec<Foreign> {
    let hooked = hooks(pin_dir);
    let ours: Vec<u32> = hooked.iter().filter_map(|h| h.program_id).collect();
    let mut found = Vec::new();
    match cgroup.map(File::open) {
        None => {}
        Some(Ok(dir)) => {
            for (name, attach_type) in SOCK_PROGRAMS.iter().zip(SOCK_ATTACH_TYPES) {
                let ids = match query(dir.as_raw_fd() as u32, attach_type, BPF_F_QUERY_EFFECTIVE) {
                    Ok(ids) => ids,
                    Err(e) => {
                        log::debug!("programs at {name} of the hooked cgroup: {e}");
                        continue;
                    }
                };
                found.extend(
                    ids.into_iter()
                        .filter(|id| !ours.contains(id))
                        .map(|id| foreign(name, id)),
                );
            }
        }
        Some(Err(e)) => log::debug!("open the hooked cgroup: {e}"),
    }
    for hook in &hooked {
        let (prefix, attach_type) = if hook.hook.starts_with("tc-") {
            ("tc-", BPF_TCX_INGRESS)
        } else if hook.hook.starts_with("tce-") {
            ("tce-", BPF_TCX_EGRESS)
        } else {
            continue;
        };
        let Some(ifindex) = hook
            .hook
            .strip_prefix(prefix)
            .and_then(super::tclinks::ifindex)
        else {
            continue;
        };
        let ids = match query(ifindex, attach_type, 0) {
            Ok(ids) => ids,
            Err(e) => {
                log::debug!("programs at {}: {e}", hook.hook);
                continue;
            }
        };
        // Other tools' programs beside tc are normal (a CNI's); only this build's names are
        // another kube-bpf-proxy's.
        found.extend(
            ids.into_iter()
                .filter(|id| !ours.contains(id))
                .map(|id| foreign(&hook.hook, id))
                .filter(Foreign::is_ours_elsewhere),
        );
    }
    found
}

/// What can be read of program `id` found at `hook`.
fn foreign(hook: &str, id: u32) -> Foreign {
    let info = program_info(id);
    let name = info.as_ref().map(|(name, _)| name.clone());
    let kube_bpf_proxy = info.is_some_and(|(name, maps)| {
        our_program_name(&name) && maps.iter().any(|m| our_map_name(m))
    });
    Foreign {
        hook: hook.to_string(),
        program_id: id,
        name,
        kube_bpf_proxy,
    }
}

/// BPF_PROG_QUERY: the ids of the programs attached at `attach_type` of `target` (a cgroup's
/// descriptor, or an interface index for TCX).
fn query(target: u32, attach_type: u32, flags: u64) -> std::io::Result<Vec<u32>> {
    let mut ids = [0u32; MAX_PROGRAMS];
    let mut attr = [0u64; 16];
    // bpf_attr.query: target_fd/target_ifindex (u32), attach_type (u32), query_flags (u32),
    // attach_flags (u32, out), prog_ids (u64 pointer), prog_cnt (u32, in and out).
    attr[0] = u64::from(target) | (u64::from(attach_type) << 32);
    attr[1] = flags;
    attr[2] = ids.as_mut_ptr() as u64;
    attr[3] = MAX_PROGRAMS as u64;
    match bpf_syscall(BPF_PROG_QUERY, &mut attr) {
        Ok(_) => {}
        // More than fit: the kernel copied the first `MAX_PROGRAMS`.
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
        Err(e) => return Err(e),
    }
    let count = (attr[3] & 0xffff_ffff) as usize;
    Ok(ids[..count.min(MAX_PROGRAMS)].to_vec())
}

/// The kernel's name of program `id` and the names of the maps it uses (BPF_PROG_GET_FD_BY_ID
/// and BPF_MAP_GET_FD_BY_ID, which need CAP_SYS_ADMIN).
fn program_info(id: u32) -> Option<(String, Vec<String>)> {
    let prog = fd_by_id(BPF_PROG_GET_FD_BY_ID, id)?;
    // struct bpf_prog_info: nr_map_ids (u32) at byte offset 52, map_ids (u64 pointer) at 56,
    // name[16] at 64. Larger than the part read: the kernel fills what fits and wants the
    // tail it does not know zeroed.
    let mut map_ids = [0u32; 64];
    let mut info = [0u8; 256];
    info[52..56].copy_from_slice(&(map_ids.len() as u32).to_ne_bytes());
    info[56..64].copy_from_slice(&(map_ids.as_mut_ptr() as u64).to_ne_bytes());
    object_info(&prog, &mut info)?;
    let name = c_string(&info[64..80]);
    let count = u32::from_ne_bytes(info[52..56].try_into().ok()?) as usize;
    let maps = map_ids[..count.min(map_ids.len())]
        .iter()
        .filter_map(|&id| {
            let map = fd_by_id(BPF_MAP_GET_FD_BY_ID, id)?;
            // struct bpf_map_info: name[16] at byte offset 24.
            let mut info = [0u8; 128];
            object_info(&map, &mut info)?;
            Some(c_string(&info[24..40]))
        })
        .collect();
    Some((name, maps))
}

/// A descriptor of the program or map `id` (`cmd`: BPF_PROG_GET_FD_BY_ID or
/// BPF_MAP_GET_FD_BY_ID; bpf_attr's id at offset 0 for both).
fn fd_by_id(cmd: libc::c_long, id: u32) -> Option<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf_syscall(cmd, &mut attr).ok()?;
    // SAFETY: the kernel returned a fresh fd we now own.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_OBJ_GET_INFO_BY_FD of `fd` into `info`.
fn object_info(fd: &OwnedFd, info: &mut [u8]) -> Option<()> {
    let mut attr = [0u64; 16];
    // bpf_attr.info: bpf_fd (u32), info_len (u32), info (u64 pointer).
    attr[0] = (fd.as_raw_fd() as u32 as u64) | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
    Some(())
}

/// The NUL-terminated string in `bytes`.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Logs what `find` found, once each, and returns how many.
pub fn report(found: &[Foreign], pin_dir: &Path, cgroup: &Path) -> usize {
    let cgroup = cgroup.display();
    for f in found {
        let name = f.name.as_deref().unwrap_or("(name not readable)");
        if f.is_ours_elsewhere() {
            log::error!(
                "another kube-bpf-proxy's program {name} (id {}) runs at {} beside this agent's \
                 (for the sockets of cgroup {cgroup}, or on that interface) with pins \
                 elsewhere than {}: two proxies translate the same traffic, and once its agent \
                 has stopped its maps are kept up to date by nobody; stop that agent, or \
                 remove its pins with `kube-bpf-proxy cleanup --bpffs <its directory>`",
                f.program_id,
                f.hook,
                pin_dir.display()
            );
        } else {
            log::warn!(
                "another program, {name} (id {}), runs at the socket hook {} for the sockets of \
                 cgroup {cgroup} (attached to it or to a cgroup above) beside this agent's: if \
                 it translates Service addresses (another service proxy's socket load \
                 balancing), the two translate the same connections",
                f.program_id,
                f.hook
            );
        }
    }
    found.len()
}

/// Cgroup directories `cgroup_of` looks at, at most.
const MAX_CGROUPS: usize = 100_000;

/// The cgroup directory the socket hooks pinned under `pin_dir` are attached to (for `verify`,
/// which is not told it): on a 64-bit kernel the link's cgroup id is the directory's inode
/// number on the cgroup2 filesystem. None when there is no such link, or no cgroup2 mount
/// holds it.
pub fn cgroup_of(pin_dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let pin = pin_dir.join(super::bpf::LINKS_DIR).join(SOCK_PROGRAMS[0]);
    let id = link_cgroup_id(&pin).filter(|id| *id != 0)?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let roots = mounts.lines().filter_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    });
    let mut seen = 0;
    for root in roots {
        let Ok(dev) = std::fs::metadata(&root).map(|m| m.dev()) else {
            continue;
        };
        let mut todo = vec![root];
        while let Some(dir) = todo.pop() {
            seen += 1;
            if seen > MAX_CGROUPS {
                return None;
            }
            if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id && m.dev() == dev) {
                return Some(dir);
            }
            todo.extend(
                std::fs::read_dir(&dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

/// The cgroup id of the pinned cgroup link at `pin` (`tclinks::link_info`: the type in word 0,
/// the cgroup member's 64-bit `cgroup_id` in words 4 and 5, low half first on the
/// little-endian machines this runs on).
fn link_cgroup_id(pin: &Path) -> Option<u64> {
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    let info = super::tclinks::link_info(pin)?;
    (info[0] == BPF_LINK_TYPE_CGROUP).then(|| u64::from(info[4]) | (u64::from(info[5]) << 32))
}
