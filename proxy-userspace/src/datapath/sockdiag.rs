//! Terminating sockets that still point at a removed backend: netlink sock_diag (dump the
//! connected UDP/TCP sockets of a network namespace, SOCK_DESTROY the matching ones), run in each
//! network namespace that has processes in the hooked cgroup. aya 0.14 cannot load the
//! `bpf_sock_destroy` kfunc, so this is the mechanism; `SocketTerminator` is the seam where a
//! BPF socket-iterator implementation can replace it.
//!
//! The messages are netlink-packet-sock-diag's, on a netlink-sys socket: one socket per
//! namespace and round carries the dumps and every SOCK_DESTROY, one request at a time, each
//! with a sequence number of its own. A reply counts only with that sequence number and this
//! socket's port id; any other is skipped and reported.
//!
//! The kernel filters each dump on address family, protocol and socket states and, while a round
//! has few destination ports, on the destination port (a dump request's socket id: 0 is any
//! port). The crate has no `INET_DIAG_REQ_BYTECODE`, so the destination address and the cookie
//! are matched here, as is the port again: the kernel's filter only shortens the dump.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

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

/// More distinct destination ports than this for one family and protocol: one dump of every
/// port instead of one dump per port (each dump walks the kernel's whole socket table).
const PORT_DUMPS_MAX: usize = 8;
/// How long one request may wait for its whole answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket states whose sockets can still be cut.
fn states(proto: u8) -> StateFlags {
    if proto == IPPROTO_TCP {
        // Live connections. Not TIME_WAIT, CLOSE or LISTEN: nothing is left to cut there.
        StateFlags::SYN_SENT
            | StateFlags::SYN_RECV
            | StateFlags::ESTABLISHED
            | StateFlags::FIN_WAIT1
            | StateFlags::FIN_WAIT2
            | StateFlags::CLOSE_WAIT
            | StateFlags::LAST_ACK
            | StateFlags::CLOSING
    } else {
        // A connected UDP socket reports TCP_ESTABLISHED; unconnected ones TCP_CLOSE.
        StateFlags::ESTABLISHED
    }
}

/// One SOCK_DIAG_BY_FAMILY dump, as the kernel filters it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Dump {
    family: u8,
    proto: u8,
    /// The destination port; 0 for any.
    dport: u16,
}

impl Dump {
    fn request(self) -> InetRequest {
        let mut socket_id = if self.family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        socket_id.destination_port = self.dport;
        InetRequest {
            family: self.family,
            protocol: self.proto,
            extensions: ExtensionFlags::empty(),
            states: states(self.proto),
            socket_id,
        }
    }
}

/// The dumps that together see every socket of `targets`: per protocol, IPv6 (a dual-stack
/// socket reaches an IPv4 destination as a v4-mapped address) and, for IPv4 targets, IPv4; one
/// dump per destination port while there are at most `PORT_DUMPS_MAX`, else one of every port.
fn dumps(targets: &[Target]) -> Vec<Dump> {
    let mut ports: BTreeMap<(u8, u8), BTreeSet<u16>> = BTreeMap::new();
    for t in targets {
        ports
            .entry((AF_INET6, t.proto))
            .or_default()
            .insert(t.dport);
        if t.dst.is_ipv4() {
            ports.entry((AF_INET, t.proto)).or_default().insert(t.dport);
        }
    }
    let mut out = Vec::new();
    for ((family, proto), dports) in ports {
        if dports.len() > PORT_DUMPS_MAX || dports.contains(&0) {
            out.push(Dump {
                family,
                proto,
                dport: 0,
            });
        } else {
            out.extend(dports.into_iter().map(|dport| Dump {
                family,
                proto,
                dport,
            }));
        }
    }
    out
}

/// The socket cookie, which the kernel reports as two native-endian 32-bit halves, low first.
fn cookie(id: &SocketId) -> u64 {
    let [a, b, c, d, e, f, g, h] = id.cookie;
    (u64::from(u32::from_ne_bytes([e, f, g, h])) << 32)
        | u64::from(u32::from_ne_bytes([a, b, c, d]))
}

/// Whether the socket `id`, from a dump of protocol `proto`, is one of `targets`.
fn matches(targets: &[Target], proto: u8, id: &SocketId) -> bool {
    let dst = match id.destination_address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let cookie = cookie(id);
    targets.iter().any(|t| {
        t.proto == proto
            && t.dport == id.destination_port
            && t.dst == dst
            && t.cookies.contains(&cookie)
    })
}

/// One message of a datagram from the sock_diag socket, as the request it should answer sees
/// it.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// A socket of a dump, with its address family.
    Socket(u8, SocketId),
    /// NLMSG_DONE: the dump is complete (0) or failed (an errno).
    Done(i32),
    /// NLMSG_ERROR: an acknowledgement (0) or the errno the request failed with.
    Ack(i32),
    /// Not an answer to this request: another sequence number or port id.
    Stray,
    /// An answer with nothing to act on (NLMSG_NOOP, a socket of another kind).
    Ignored,
    /// An answer that could not be decoded.
    Bad(String),
}

/// Splits one datagram into its netlink messages and classifies each for the request with
/// sequence number `seq` from the socket with port id `port`.
fn replies(datagram: &[u8], port: u32, seq: u32) -> Vec<Reply> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let header = match NetlinkBuffer::new_checked(rest) {
            Ok(h) => h,
            Err(e) => {
                // The rest of the datagram cannot be framed.
                out.push(Reply::Bad(e.to_string()));
                break;
            }
        };
        let len = header.length() as usize;
        let reply = if header.sequence_number() != seq || header.port_number() != port {
            Reply::Stray
        } else {
            match NetlinkMessage::<SockDiagMessage>::deserialize(&rest[..len]) {
                Err(e) => Reply::Bad(e.to_string()),
                Ok(m) => match m.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        Reply::Socket(r.header.family, r.header.socket_id)
                    }
                    NetlinkPayload::Done(d) => Reply::Done(-d.code),
                    NetlinkPayload::Error(e) => Reply::Ack(-e.raw_code()),
                    _ => Reply::Ignored,
                },
            }
        };
        out.push(reply);
        // Each message starts 4-byte aligned.
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    out
}

/// Whether a SOCK_DESTROY failed only because the socket is gone: ENOENT, or ESTALE when
/// another socket now has its addresses and ports (the cookie differs).
fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE))
}

/// A NETLINK_SOCK_DIAG socket, for one request at a time.
struct DiagSocket {
    socket: Socket,
    port: u32,
    seq: u32,
    buf: Vec<u8>,
    /// Messages skipped for another sequence number or port id.
    stray: u64,
    /// Answers that could not be decoded.
    bad: Vec<String>,
}

impl DiagSocket {
    /// A socket in the calling thread's network namespace.
    fn open() -> io::Result<DiagSocket> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        let port = socket.bind_auto()?.port_number();
        // Connected to the kernel: no other socket can send to this one.
        socket.connect(&SocketAddr::new(0, 0))?;
        super::netlink::set_recv_timeout(&socket, Duration::from_secs(2))?;
        Ok(DiagSocket {
            socket,
            port,
            seq: 0,
            buf: vec![0; 64 * 1024],
            stray: 0,
            bad: Vec::new(),
        })
    }

    /// Sends one request; returns its sequence number.
    fn send(&mut self, message: impl NetlinkSerializable, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;
        Ok(self.seq)
    }

    /// Receives the answer to request `seq`, calling `each` for every socket a dump reports,
    /// until NLMSG_DONE or NLMSG_ERROR: Ok when the dump completed or the request was
    /// acknowledged, else the errno the kernel answered.
    fn answer(&mut self, seq: u32, mut each: impl FnMut(u8, SocketId)) -> io::Result<()> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no sock_diag answer",
                ));
            }
            let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no sock_diag answer",
                    ));
                }
                Err(e) => return Err(e),
            };
            for reply in replies(&self.buf[..n], self.port, seq) {
                match reply {
                    Reply::Socket(family, id) => each(family, id),
                    Reply::Done(0) | Reply::Ack(0) => return Ok(()),
                    Reply::Done(errno) | Reply::Ack(errno) => {
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    Reply::Stray => self.stray += 1,
                    Reply::Ignored => {}
                    Reply::Bad(e) => self.bad.push(e),
                }
            }
        }
    }

    /// Dumps the sockets `dump` selects, calling `each` for every one.
    fn dump(&mut self, dump: Dump, each: impl FnMut(u8, SocketId)) -> io::Result<()> {
        let seq = self.send(SockDiagMessage::InetRequest(dump.request()), NLM_F_DUMP)?;
        self.answer(seq, each)
    }

    /// SOCK_DESTROY of one socket: true when destroyed, false when it was already gone.
    fn destroy(&mut self, family: u8, proto: u8, socket_id: SocketId) -> io::Result<bool> {
        let request = InetRequest {
            family,
            protocol: proto,
            extensions: ExtensionFlags::empty(),
            states: states(proto),
            socket_id,
        };
        let seq = self.send(
            SockDiagDestroy::new(SockDiagMessage::InetRequest(request)),
            NLM_F_ACK,
        )?;
        match self.answer(seq, |_, _| {}) {
            Ok(()) => Ok(true),
            Err(e) if gone(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Destroys the sockets of `targets` in this thread's network namespace (`ns`, for messages):
/// adds what it destroyed to `report.destroyed` and each problem to `report.errors`.
fn terminate_here(targets: &[Target], ns: &Path, report: &mut Report) {
    let ns = ns.display();
    let mut sock = match DiagSocket::open() {
        Ok(s) => s,
        Err(e) => {
            report.errors.push(format!("{ns}: sock_diag socket: {e}"));
            return;
        }
    };
    // Failed destroys, counted per family, protocol and error.
    let mut failed: BTreeMap<(u8, u8, String), u64> = BTreeMap::new();
    for dump in dumps(targets) {
        report.destroyed.entry(dump.proto).or_default();
        let mut victims = Vec::new();
        let dumped = sock.dump(dump, |family, id| {
            if matches(targets, dump.proto, &id) {
                victims.push((family, id));
            }
        });
        if let Err(e) = dumped {
            // The sockets found before the failure are still destroyed.
            report.errors.push(format!(
                "{ns}: sock_diag dump of family {} protocol {} port {}: {e}",
                dump.family, dump.proto, dump.dport
            ));
        }
        for (family, id) in victims {
            match sock.destroy(family, dump.proto, id) {
                Ok(true) => *report.destroyed.entry(dump.proto).or_default() += 1,
                Ok(false) => {}
                Err(e) => {
                    *failed
                        .entry((family, dump.proto, e.to_string()))
                        .or_default() += 1
                }
            }
        }
    }
    for ((family, proto, e), n) in failed {
        report.errors.push(format!(
            "{ns}: SOCK_DESTROY of {n} socket(s) of family {family} protocol {proto}: {e}"
        ));
    }
    if sock.stray > 0 {
        report.errors.push(format!(
            "{ns}: skipped {} sock_diag message(s) with another sequence number or port id",
            sock.stray
        ));
    }
    for e in sock.bad {
        report
            .errors
            .push(format!("{ns}: undecodable sock_diag answer: {e}"));
    }
}

/// Whether this kernel can destroy sockets: SOCK_DESTROY of a socket that does not exist
/// answers ENOENT where it can, EOPNOTSUPP without CONFIG_INET_DIAG_DESTROY.
fn probe() -> io::Result<()> {
    let mut sock = DiagSocket::open()?;
    match sock.destroy(AF_INET, IPPROTO_UDP, SocketId::new_v4()) {
        Ok(_) => Ok(()),
        Err(e) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "this kernel cannot destroy sockets (SOCK_DESTROY: {e}; needs CONFIG_INET_DIAG_DESTROY)"
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
                        terminate_here(&targets, &ns, &mut report);
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

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket},
        num::NonZeroI32,
        os::fd::AsRawFd,
    };

    use netlink_packet_core::{DoneMessage, ErrorMessage};
    use netlink_packet_sock_diag::{
        SOCK_DESTROY, SOCK_DIAG_BY_FAMILY,
        inet::{InetResponse, InetResponseHeader},
    };

    use super::*;

    const UDP: u8 = IPPROTO_UDP;

    fn target(proto: u8, dst: &str, dport: u16, cookies: &[u64]) -> Target {
        Target {
            proto,
            dst: dst.parse().unwrap(),
            dport,
            cookies: cookies.iter().copied().collect(),
        }
    }

    fn socket_id(dst: &str, dport: u16, cookie: u64) -> SocketId {
        let dst: IpAddr = dst.parse().unwrap();
        let mut id = if dst.is_ipv4() {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        id.source_port = 40000;
        id.destination_address = dst;
        id.destination_port = dport;
        let (lo, hi) = (cookie as u32, (cookie >> 32) as u32);
        id.cookie[..4].copy_from_slice(&lo.to_ne_bytes());
        id.cookie[4..].copy_from_slice(&hi.to_ne_bytes());
        id
    }

    fn dump(family: u8, proto: u8, dport: u16) -> Dump {
        Dump {
            family,
            proto,
            dport,
        }
    }

    #[test]
    fn dumps_are_filtered_by_family_protocol_and_port() {
        // IPv4 destinations: both families (dual-stack sockets hold v4-mapped addresses).
        // IPv6 destinations: IPv6 only. One dump per port.
        let targets = [
            target(UDP, "10.0.0.1", 53, &[1]),
            target(UDP, "10.0.0.2", 53, &[2]),
            target(IPPROTO_TCP, "fd00::1", 80, &[3]),
        ];
        assert_eq!(
            dumps(&targets),
            vec![
                dump(AF_INET, UDP, 53),
                dump(AF_INET6, IPPROTO_TCP, 80),
                dump(AF_INET6, UDP, 53),
            ]
        );
        // Many ports: one dump of every port.
        let many: Vec<Target> = (1..=PORT_DUMPS_MAX as u16 + 1)
            .map(|p| target(UDP, "fd00::1", p, &[1]))
            .collect();
        assert_eq!(dumps(&many), vec![dump(AF_INET6, UDP, 0)]);
        let few = &many[..PORT_DUMPS_MAX];
        assert_eq!(dumps(few).len(), PORT_DUMPS_MAX);
        assert!(dumps(&[]).is_empty());
    }

    #[test]
    fn dump_requests_carry_the_kernel_side_filter() {
        let r = dump(AF_INET, UDP, 53).request();
        assert_eq!((r.family, r.protocol), (AF_INET, UDP));
        assert_eq!(r.states, StateFlags::ESTABLISHED);
        assert_eq!(r.socket_id.destination_port, 53);
        assert_eq!(r.socket_id.destination_address, IpAddr::from([0, 0, 0, 0]));
        let r = dump(AF_INET6, IPPROTO_TCP, 0).request();
        assert_eq!(r.socket_id.destination_port, 0);
        assert!(
            r.states
                .contains(StateFlags::ESTABLISHED | StateFlags::SYN_SENT)
        );
        assert!(
            !r.states
                .intersects(StateFlags::LISTEN | StateFlags::TIME_WAIT)
        );
    }

    #[test]
    fn sockets_match_by_destination_port_and_cookie() {
        let targets = [
            target(UDP, "10.0.0.1", 53, &[7, 8]),
            target(UDP, "fd00::1", 53, &[9]),
        ];
        assert!(matches(&targets, UDP, &socket_id("10.0.0.1", 53, 7)));
        assert!(matches(&targets, UDP, &socket_id("10.0.0.1", 53, 8)));
        // A dual-stack socket's v4-mapped destination is the IPv4 target.
        assert!(matches(&targets, UDP, &socket_id("::ffff:10.0.0.1", 53, 7)));
        assert!(matches(&targets, UDP, &socket_id("fd00::1", 53, 9)));
        // Another cookie (a socket the Service did not send there), port, address or protocol.
        assert!(!matches(&targets, UDP, &socket_id("10.0.0.1", 53, 9)));
        assert!(!matches(&targets, UDP, &socket_id("10.0.0.1", 54, 7)));
        assert!(!matches(&targets, UDP, &socket_id("10.0.0.2", 53, 7)));
        assert!(!matches(
            &targets,
            IPPROTO_TCP,
            &socket_id("10.0.0.1", 53, 7)
        ));
        assert_eq!(
            cookie(&socket_id("10.0.0.1", 53, 0x1234_5678_9abc_def0)),
            0x1234_5678_9abc_def0
        );
    }

    /// One kernel message as the socket with port id `port` receives it.
    fn message<I: NetlinkSerializable>(seq: u32, port: u32, payload: NetlinkPayload<I>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.port_number = port;
        let mut m = NetlinkMessage::new(header, payload);
        m.finalize();
        let mut out = vec![0; m.buffer_len()];
        m.serialize(&mut out);
        out
    }

    fn response(id: SocketId) -> NetlinkPayload<SockDiagMessage> {
        let family = if id.destination_address.is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        };
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(InetResponse {
            header: InetResponseHeader {
                family,
                state: 1,
                timer: None,
                socket_id: id,
                recv_queue: 0,
                send_queue: 0,
                uid: 0,
                inode: 1,
            },
            nlas: Default::default(),
        })))
    }

    fn done(code: i32) -> NetlinkPayload<SockDiagMessage> {
        let mut d = DoneMessage::default();
        d.code = code;
        NetlinkPayload::Done(d)
    }

    fn ack(code: i32) -> NetlinkPayload<SockDiagMessage> {
        let mut e = ErrorMessage::default();
        e.code = NonZeroI32::new(code);
        NetlinkPayload::Error(e)
    }

    #[test]
    fn replies_count_only_with_their_sequence_number_and_port_id() {
        let (port, seq) = (4242, 7);
        let id = socket_id("10.0.0.1", 53, 5);
        let datagram = [
            message(seq, port, response(id.clone())),
            // Late answers to an earlier request, and a message for another socket.
            message(seq - 1, port, response(socket_id("10.0.0.2", 53, 6))),
            message(seq - 1, port, done(0)),
            message(seq, port + 1, response(socket_id("10.0.0.3", 53, 6))),
            message(seq, port, done(0)),
        ]
        .concat();
        assert_eq!(
            replies(&datagram, port, seq),
            vec![
                Reply::Socket(AF_INET, id),
                Reply::Stray,
                Reply::Stray,
                Reply::Stray,
                Reply::Done(0),
            ]
        );
    }

    #[test]
    fn error_acks_and_failed_dumps_carry_the_errno() {
        let (port, seq) = (1, 2);
        let datagram = [
            message(seq, port, ack(0)),
            message(seq, port, ack(-libc::ENOENT)),
            message(seq, port, ack(-libc::EOPNOTSUPP)),
            message(seq, port, done(-libc::EINTR)),
            message::<SockDiagMessage>(seq, port, NetlinkPayload::Noop),
        ]
        .concat();
        assert_eq!(
            replies(&datagram, port, seq),
            vec![
                Reply::Ack(0),
                Reply::Ack(libc::ENOENT),
                Reply::Ack(libc::EOPNOTSUPP),
                Reply::Done(libc::EINTR),
                Reply::Ignored,
            ]
        );
        assert!(gone(&io::Error::from_raw_os_error(libc::ENOENT)));
        assert!(!gone(&io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
        // A truncated message, and one whose payload does not decode.
        let whole = message(seq, port, ack(0));
        assert!(matches!(
            replies(&whole[..whole.len() - 2], port, seq)[..],
            [Reply::Bad(_)]
        ));
        let mut short = message(seq, port, response(socket_id("10.0.0.1", 53, 5)));
        short.truncate(16 + 20);
        short[..4].copy_from_slice(&36u32.to_ne_bytes());
        assert!(matches!(replies(&short, port, seq)[..], [Reply::Bad(_)]));
    }

    #[test]
    fn destroy_sends_back_the_socket_id_the_dump_reported() {
        // What the kernel reports for a socket (inet_diag_msg), byte for byte.
        let mut payload = vec![AF_INET, 1, 0, 0];
        payload.extend_from_slice(&40000u16.to_be_bytes());
        payload.extend_from_slice(&53u16.to_be_bytes());
        payload.extend_from_slice(&[10, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&3u32.to_ne_bytes()); // interface
        payload.extend_from_slice(&0x0bad_cafeu32.to_ne_bytes()); // cookie, low half
        payload.extend_from_slice(&0x1u32.to_ne_bytes()); // cookie, high half
        payload.extend_from_slice(&[0; 20]); // expires, queues, uid, inode
        let sent_id = payload[4..52].to_vec();
        let mut kernel = vec![0u8; 16];
        kernel[..4].copy_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
        kernel[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        kernel[8..12].copy_from_slice(&9u32.to_ne_bytes());
        kernel[12..16].copy_from_slice(&77u32.to_ne_bytes());
        kernel.extend_from_slice(&payload);
        let [Reply::Socket(family, id)] = &replies(&kernel, 77, 9)[..] else {
            panic!("one socket expected");
        };
        assert_eq!(*family, AF_INET);
        assert_eq!(id.destination_address, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(id.destination_port, 53);
        assert_eq!(cookie(id), 0x1_0bad_cafe);
        let request = InetRequest {
            family: *family,
            protocol: UDP,
            extensions: ExtensionFlags::empty(),
            states: states(UDP),
            socket_id: id.clone(),
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut m = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(SockDiagDestroy::new(SockDiagMessage::InetRequest(
                request,
            ))),
        );
        m.finalize();
        let mut wire = vec![0; m.buffer_len()];
        m.serialize(&mut wire);
        // nlmsghdr, then inet_diag_req_v2 whose socket id is the one reported.
        assert_eq!(wire.len(), 16 + 56);
        assert_eq!(u16::from_ne_bytes([wire[4], wire[5]]), SOCK_DESTROY);
        assert_eq!(&wire[16..18], &[AF_INET, UDP]);
        assert_eq!(&wire[24..], &sent_id[..]);
    }

    fn socket_cookie(fd: &impl AsRawFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: a valid socket, and an out buffer of the size given.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    fn connected_udp(to: std::net::SocketAddr) -> UdpSocket {
        let any: std::net::SocketAddr = if to.is_ipv4() {
            (Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(any).unwrap();
        s.connect(to).unwrap();
        s
    }

    /// Every socket a dump in this namespace reports, as (local port, destination port).
    fn dumped(sock: &mut DiagSocket, d: Dump) -> BTreeSet<(u16, u16)> {
        let mut seen = BTreeSet::new();
        sock.dump(d, |_, id| {
            seen.insert((id.source_port, id.destination_port));
        })
        .unwrap();
        seen
    }

    #[test]
    fn the_kernel_filters_dumps_on_the_destination_port() {
        // Loopback sockets of this test's own, in the namespace it runs in (no privilege needed
        // to dump).
        let server_a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let server_b = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let (pa, pb) = (
            server_a.local_addr().unwrap().port(),
            server_b.local_addr().unwrap().port(),
        );
        let a = connected_udp(server_a.local_addr().unwrap());
        let b = connected_udp(server_b.local_addr().unwrap());
        let (la, lb) = (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        );
        let mut sock = DiagSocket::open().unwrap();
        let only_a = dumped(&mut sock, dump(AF_INET, UDP, pa));
        assert!(only_a.contains(&(la, pa)), "{only_a:?}");
        assert!(only_a.iter().all(|(_, d)| *d == pa), "{only_a:?}");
        let all = dumped(&mut sock, dump(AF_INET, UDP, 0));
        assert!(
            all.contains(&(la, pa)) && all.contains(&(lb, pb)),
            "{all:?}"
        );
        // Unconnected sockets are not ESTABLISHED: not dumped.
        assert!(all.iter().all(|(l, _)| *l != pa && *l != pb), "{all:?}");
        // TCP: the connecting side matches the listener's port, the accepted side does not.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let pl = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let lc = client.local_addr().unwrap().port();
        let tcp = dumped(&mut sock, dump(AF_INET, IPPROTO_TCP, pl));
        assert_eq!(tcp, BTreeSet::from([(lc, pl)]));
        // Every request had its own sequence number and was answered on it.
        assert_eq!(sock.seq, 3);
        assert_eq!((sock.stray, sock.bad.len()), (0, 0));
    }

    #[test]
    fn only_targeted_sockets_are_destroyed() {
        // SOCK_DESTROY needs CAP_NET_ADMIN; this destroys only sockets the test made. Without
        // root: a failure under CI, a skip recorded by name elsewhere.
        if !::tests::harness::skip::require_root() {
            return;
        }
        let server = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let to = server.local_addr().unwrap();
        let doomed = connected_udp(to);
        let spared = connected_udp(to);
        let mut sockets = vec![(&doomed, socket_cookie(&doomed))];
        // A dual-stack IPv6 socket connected to the same IPv4 address (v4-mapped), where the
        // machine has IPv6.
        let v4 = Ipv4Addr::LOCALHOST;
        let mapped = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
            .ok()
            .filter(|s| s.connect((v4.to_ipv6_mapped(), to.port())).is_ok());
        if let Some(m) = &mapped {
            sockets.push((m, socket_cookie(m)));
        }
        let targets = [Target {
            proto: UDP,
            dst: to.ip(),
            dport: to.port(),
            cookies: sockets.iter().map(|(_, c)| *c).collect(),
        }];
        let mut report = Report::default();
        terminate_here(&targets, Path::new("this namespace"), &mut report);
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(report.destroyed.get(&UDP), Some(&(sockets.len() as u64)));
        for (s, _) in &sockets {
            let err = s.send(b"x").unwrap_err();
            assert!(
                matches!(
                    err.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EDESTADDRREQ)
                ),
                "{err}"
            );
        }
        spared.send(b"x").unwrap();
        // Again: nothing left to destroy.
        let mut again = Report::default();
        terminate_here(&targets, Path::new("this namespace"), &mut again);
        assert!(again.errors.is_empty(), "{again:?}");
        assert_eq!(again.destroyed.get(&UDP), Some(&0));
        probe().unwrap();
    }
}
