//! Dropping privileges once the datapath is loaded: the agent keeps only CAP_BPF (map reads and
//! writes go through bpf(2), which needs it when unprivileged BPF is disabled) and CAP_NET_ADMIN
//! (sock_diag socket termination). Capabilities are per thread, so this must run before the
//! agent starts its threads.

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_BPF: u32 = 39;
const CAP_LAST: u32 = 40;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The capabilities the agent keeps, as a 64-bit mask.
pub const KEPT: u64 = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN);

/// What the socket-termination thread keeps: entering other network namespaces needs
/// CAP_SYS_ADMIN, opening other users' /proc/PID/ns/net needs CAP_SYS_PTRACE.
pub const TERMINATOR: u64 = KEPT | (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE);

/// Drops every capability but `KEPT` from the bounding set and the calling thread's sets.
pub fn drop_to_kept() -> std::io::Result<()> {
    drop_to(KEPT)
}

/// Drops every capability but those in `keep` from the calling thread.
pub fn drop_to(keep: u64) -> std::io::Result<()> {
    for cap in 0..=CAP_LAST {
        if keep & (1 << cap) == 0 {
            // SAFETY: plain prctl; EINVAL for caps this kernel does not know is fine.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let low = keep as u32;
    let high = (keep >> 32) as u32;
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: valid header and two data structs, as capset(2) with version 3 expects.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
