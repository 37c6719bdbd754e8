//! Reading the agent's pinned maps directly (bpf(2): BPF_OBJ_GET, BPF_MAP_LOOKUP_ELEM), cheap
//! enough to poll every half millisecond, and their memory (bpftool's `bytes_memlock`).

use std::{
    ffi::CString,
    mem::{size_of, zeroed},
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
    process::Command,
};

use anyhow::{Context as _, bail};
use proxy_common::{
    backend::BackendValue,
    maps, proto,
    service::{SCOPE_INTERNAL, Service4Key, ServiceValue, SlotChunk, SlotKey},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A map opened from its pin.
pub struct PinnedMap {
    fd: OwnedFd,
}

impl PinnedMap {
    pub fn open(path: &Path) -> anyhow::Result<PinnedMap> {
        let c = CString::new(path.as_os_str().as_bytes())?;
        let attr = ObjGetAttr {
            pathname: c.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        // SAFETY: attr is a valid bpf_attr prefix for BPF_OBJ_GET; the path outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET,
                &attr as *const ObjGetAttr,
                size_of::<ObjGetAttr>() as u32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("open pinned map {}", path.display()));
        }
        // SAFETY: the kernel returned a fresh descriptor that we own.
        Ok(PinnedMap {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Looks `key` up; `V` must be the map's plain-data value type.
    pub fn lookup<K: Copy, V: Copy>(&self, key: &K) -> anyhow::Result<Option<V>> {
        // SAFETY: V is a repr(C) plain-data map value from proxy-common; all-zero is valid.
        let mut value: V = unsafe { zeroed() };
        let attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: &mut value as *mut V as u64,
            flags: 0,
        };
        // SAFETY: key and value point to live buffers of the map's key and value sizes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &attr as *const MapElemAttr,
                size_of::<MapElemAttr>() as u32,
            )
        };
        if rc == 0 {
            return Ok(Some(value));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e).context("bpf map lookup")
        }
    }
}

/// The frontend and backend maps of one agent.
pub struct AgentMaps {
    services: PinnedMap,
    slots: PinnedMap,
    backends: PinnedMap,
}

impl AgentMaps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<AgentMaps> {
        Ok(AgentMaps {
            services: PinnedMap::open(&pin_dir.join(maps::LB4_SERVICES))?,
            slots: PinnedMap::open(&pin_dir.join(maps::LB_SLOTS))?,
            backends: PinnedMap::open(&pin_dir.join(maps::LB_BACKENDS))?,
        })
    }

    /// The frontend of `vip:port/TCP` (in-cluster scope).
    pub fn frontend(&self, vip: Ipv4Addr, port: u16) -> anyhow::Result<Option<ServiceValue>> {
        self.services.lookup(&Service4Key {
            addr: vip.octets(),
            port,
            proto: proto::TCP,
            scope: SCOPE_INTERNAL,
        })
    }

    /// Backend addresses of the live slot generation of `frontend`.
    pub fn backends(&self, frontend: &ServiceValue) -> anyhow::Result<Vec<Ipv4Addr>> {
        let mut out = Vec::with_capacity(frontend.count as usize);
        for slot in 0..frontend.count {
            let key = SlotKey::of_slot(frontend.id, frontend.generation(), slot);
            let Some(chunk) = self.slots.lookup::<_, SlotChunk>(&key)? else {
                bail!("slot {slot} of frontend {} missing", frontend.id);
            };
            let id = chunk.backend_of(slot);
            let Some(b) = self.backends.lookup::<_, BackendValue>(&id)? else {
                bail!("backend {id} of slot {slot} missing");
            };
            out.push(Ipv4Addr::from(b.addr4()));
        }
        Ok(out)
    }
}

/// Total `bytes_memlock` of the maps pinned in `pin_dir` (bpftool), and how many there were.
pub fn memlock(pin_dir: &Path) -> anyhow::Result<(u64, usize)> {
    let mut total = 0;
    let mut count = 0;
    for name in maps::ALL {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .context("run bpftool")?;
        if !out.status.success() {
            bail!(
                "bpftool map show pinned {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool json")?;
        total += v["bytes_memlock"].as_u64().unwrap_or(0);
        count += 1;
    }
    Ok((total, count))
}

/// Fields of `/proc/PID/status` given in kB, in bytes (0 for a missing one).
fn status_fields<const N: usize>(pid: u32, names: [&str; N]) -> anyhow::Result<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    Ok(names.map(|name| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }))
}

/// VmRSS and VmHWM of a process, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let [rss, hwm] = status_fields(pid, ["VmRSS:", "VmHWM:"])?;
    Ok((rss, hwm))
}

/// The resident set split: anonymous memory (heap, stacks) and file-backed pages (the binary
/// and its libraries), in bytes.
pub fn rss_split(pid: u32) -> anyhow::Result<(u64, u64)> {
    let [anon, file] = status_fields(pid, ["RssAnon:", "RssFile:"])?;
    Ok((anon, file))
}
