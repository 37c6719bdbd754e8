//! Terminating sockets that still point at a removed backend: netlink sock_diag (dump the
//! connected UDP/TCP sockets of a network namespace, SOCK_DESTROY the matching ones), run in each
//! network namespace that has processes in the hooked cgroup. aya 0.14 cannot load the
//! `bpf_sock_destroy` kfunc, so this is the mechanism; `SocketTerminator` is the seam where a
//! BPF socket-iterator implementation can replace it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

/// Sockets to terminate: connected to `dst`:`dport` over `proto`, with one of `cookies` (the
/// sockets the Service translated there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub proto: u8,
    pub dst: IpAddr,
    pub dport: u16,
    pub cookies: BTreeSet<u64>,
}

/// What one termination round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Sockets destroyed, per protocol number.
    pub destroyed: BTreeMap<u8, u64>,
    pub namespaces: usize,
    pub errors: Vec<String>,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const REQ_LEN: usize = 56;
const MSG_LEN: usize = 72;
/// TCP_ESTABLISHED: a connected UDP socket reports it too; unconnected ones are TCP_CLOSE.
const STATE_ESTABLISHED: u32 = 1;

/// `inet_diag_sockid` as the kernel reports it, kept raw so it can be sent back verbatim.
#[derive(Clone, Copy)]
struct SockId([u8; 48]);

impl SockId {
    fn dport(&self) -> u16 {
        u16::from_be_bytes([self.0[2], self.0[3]])
    }
    fn dst(&self, family: u8) -> IpAddr {
        let b = &self.0[20..36];
        if family == libc::AF_INET as u8 {
            IpAddr::from([b[0], b[1], b[2], b[3]])
        } else {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            IpAddr::from(a)
        }
    }
    fn cookie(&self) -> u64 {
        let lo = u32::from_ne_bytes([self.0[40], self.0[41], self.0[42], self.0[43]]);
        let hi = u32::from_ne_bytes([self.0[44], self.0[45], self.0[46], self.0[47]]);
        (u64::from(hi) << 32) | u64::from(lo)
    }
}

fn request(kind: u16, flags: u16, family: u8, proto: u8, states: u32, id: &[u8; 48]) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + REQ_LEN) as u32;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    m.extend_from_slice(&[family, proto, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

struct DiagSocket(OwnedFd);

impl DiagSocket {
    /// A NETLINK_SOCK_DIAG socket in the calling thread's network namespace.
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let sock = DiagSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: valid option buffer.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(sock)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: an unconnected netlink socket sends to the kernel by default.
        let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives messages until DONE (dump) or one ERROR/ACK; calls `each` per payload.
    fn receive(&self, mut each: impl FnMut(u16, &[u8])) -> io::Result<i32> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: valid buffer.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + NLMSG_HDRLEN <= n {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                if len < NLMSG_HDRLEN || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad netlink length",
                    ));
                }
                let payload = &buf[off + NLMSG_HDRLEN..off + len];
                match kind {
                    NLMSG_DONE => return Ok(0),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"));
                        return Ok(-code);
                    }
                    _ => each(kind, payload),
                }
                off += (len + 3) & !3;
            }
        }
    }
}

/// Dumps the connected sockets of one family/protocol in this thread's namespace and destroys
/// those matching a target. Returns how many were destroyed.
fn destroy_matching(family: u8, proto: u8, targets: &[&Target]) -> io::Result<u64> {
    let sock = DiagSocket::open()?;
    let states = if proto == libc::IPPROTO_TCP as u8 {
        // Live connections: SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK,
        // CLOSING. Not TIME_WAIT, CLOSE or LISTEN: nothing is left to cut there.
        (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11)
    } else {
        1 << STATE_ESTABLISHED
    };
    sock.send(&request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_DUMP,
        family,
        proto,
        states,
        &[0; 48],
    ))?;
    let mut victims = Vec::new();
    sock.receive(|kind, payload| {
        if kind != SOCK_DIAG_BY_FAMILY || payload.len() < MSG_LEN {
            return;
        }
        let mut id = [0u8; 48];
        id.copy_from_slice(&payload[4..52]);
        let id = SockId(id);
        let dst = id.dst(family);
        let dst = match dst {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(dst, IpAddr::V4),
            v4 => v4,
        };
        if targets.iter().any(|t| {
            t.proto == proto
                && t.dport == id.dport()
                && t.dst == dst
                && t.cookies.contains(&id.cookie())
        }) {
            victims.push(id);
        }
    })?;
    let mut destroyed = 0;
    for id in victims {
        let destroy = DiagSocket::open()?;
        destroy.send(&request(
            SOCK_DESTROY,
            NLM_F_ACK,
            family,
            proto,
            states,
            &id.0,
        ))?;
        match destroy.receive(|_, _| {})? {
            0 => destroyed += 1,
            // Gone meanwhile.
            libc::ENOENT => {}
            code => return Err(io::Error::from_raw_os_error(code)),
        }
    }
    Ok(destroyed)
}

/// Whether this kernel can destroy sockets: SOCK_DESTROY of a socket that does not exist
/// answers ENOENT where it can, EOPNOTSUPP without CONFIG_INET_DIAG_DESTROY.
fn probe() -> io::Result<()> {
    let sock = DiagSocket::open()?;
    let udp = libc::IPPROTO_UDP as u8;
    sock.send(&request(
        SOCK_DESTROY,
        NLM_F_ACK,
        libc::AF_INET as u8,
        udp,
        1 << STATE_ESTABLISHED,
        &[0; 48],
    ))?;
    match sock.receive(|_, _| {})? {
        0 | libc::ENOENT => Ok(()),
        code => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "this kernel cannot destroy sockets (SOCK_DESTROY: {}; needs CONFIG_INET_DIAG_DESTROY)",
                io::Error::from_raw_os_error(code)
            ),
        )),
    }
}

/// One network namespace per inode, with a process in it, for every process in `cgroup` and
/// its descendants.
fn namespaces_of_cgroup(cgroup: &Path) -> Vec<PathBuf> {
    namespaces_by_link(cgroup).into_values().collect()
}

/// As `namespaces_of_cgroup`, keyed by what /proc/PID/ns/net links to (`net:[INODE]`, one key
/// per namespace).
pub(crate) fn namespaces_by_link(cgroup: &Path) -> BTreeMap<PathBuf, PathBuf> {
    let mut seen = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = dirs.pop() {
        visited += 1;
        if visited > 100_000 {
            break;
        }
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(link) = fs::read_link(&ns) {
                    seen.entry(link).or_insert(ns);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    seen
}

pub(crate) fn enter(ns: &Path) -> io::Result<()> {
    let file = fs::File::open(ns)?;
    // SAFETY: valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Terminates sockets pointing at removed backends.
pub trait SocketTerminator: Send {
    fn terminate(&mut self, targets: Vec<Target>) -> Report;
}

type Job = (Vec<Target>, mpsc::Sender<Report>);

/// The sock_diag implementation. Its work runs on a thread started before the agent drops its
/// capabilities, which keeps what entering other network namespaces needs (CAP_SYS_ADMIN,
/// CAP_SYS_PTRACE to open /proc/PID/ns/net of other users' processes, CAP_NET_ADMIN).
pub struct SockDiag {
    jobs: mpsc::Sender<Job>,
}

impl SockDiag {
    /// Starts the worker for the processes of `cgroup`. Must be called before capabilities
    /// are dropped. Says once whether this kernel can destroy sockets.
    pub fn start(cgroup: PathBuf) -> io::Result<SockDiag> {
        probe()?;
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("terminator".into())
            .spawn(move || {
                if let Err(e) = super::caps::drop_to(super::caps::TERMINATOR) {
                    log::warn!("terminator thread could not drop capabilities: {e}");
                }
                let home = match fs::File::open("/proc/thread-self/ns/net") {
                    Ok(f) => f,
                    Err(e) => {
                        log::error!("socket termination disabled: {e}");
                        return;
                    }
                };
                for (targets, reply) in rx {
                    let mut report = Report::default();
                    let namespaces = namespaces_of_cgroup(&cgroup);
                    report.namespaces = namespaces.len();
                    for ns in namespaces {
                        if let Err(e) = enter(&ns) {
                            report.errors.push(format!("enter {}: {e}", ns.display()));
                            continue;
                        }
                        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                            for proto in targets.iter().map(|t| t.proto).collect::<BTreeSet<_>>() {
                                let matching: Vec<&Target> =
                                    targets.iter().filter(|t| t.proto == proto).collect();
                                match destroy_matching(family, proto, &matching) {
                                    Ok(n) => *report.destroyed.entry(proto).or_default() += n,
                                    Err(e) => report.errors.push(format!(
                                        "{}: sock_diag family {family} protocol {proto}: {e}",
                                        ns.display()
                                    )),
                                }
                            }
                        }
                    }
                    // SAFETY: our own namespace fd.
                    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        log::error!(
                            "cannot return to the agent's network namespace; stopping termination"
                        );
                        let _ = reply.send(report);
                        return;
                    }
                    let _ = reply.send(report);
                }
            })?;
        Ok(SockDiag { jobs: tx })
    }
}

impl SocketTerminator for SockDiag {
    fn terminate(&mut self, targets: Vec<Target>) -> Report {
        let (tx, rx) = mpsc::channel();
        if self.jobs.send((targets, tx)).is_err() {
            return Report {
                errors: vec!["terminator thread is gone".into()],
                ..Report::default()
            };
        }
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| Report {
                errors: vec!["socket termination timed out".into()],
                ..Report::default()
            })
    }
}
