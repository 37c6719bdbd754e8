//! Load generator of `cargo xtask bench`.
//!
//! `loadgen serve PORT CPU NETNS...` answers every 1-byte request (TCP, and UDP on the same port)
//! with one byte, the 1-based index of the namespace the request arrived in. It opens a listener
//! in each network namespace file given (sockets keep the namespace they were created in), so one
//! process pinned to CPU serves all backend pods of a topology, one TCP connection at a time.
//!
//! `loadgen crr|rr|udp ADDR:PORT SECS CPU` measures for SECS seconds, pinned to CPU, and prints
//! one JSON line: `{"ops", "errors", "secs", "rate", "cpu", "realtime", "backends",
//! "first_error"}` (`cpu`: the client's user + system CPU time over the measured wall time).
//! - `crr`: a new TCP connection per request (connect, send 1 byte, receive 1 byte, close with
//!   SO_LINGER 0 so no TIME_WAIT is left), like netperf TCP_CRR;
//! - `rr`: requests on one long TCP connection, like netperf TCP_RR;
//! - `udp`: requests on one unconnected UDP socket (sendto + recvfrom); a reply from any
//!   address other than ADDR:PORT counts as an error;
//! - `flood`: one-way 18-byte UDP datagrams from one socket, 64 per sendmmsg, as fast as the
//!   kernel takes them (`ops`: datagrams sent), for packets-per-second measurements; the
//!   receiving side counts what arrives (`loadgen sink PORT NETNS` binds the port there, so the
//!   datagrams are taken without an ICMP error back, and never reads).
//!
//! Both sides block in the kernel while they wait and run as SCHED_FIFO priority 1 (when
//! allowed), so a busy machine's other work (compilers, tests) does not sit between a wake-up and
//! the load generator; they sleep while they wait, so that work still gets the CPUs. Every wait is
//! bounded by a 1 s timeout, every measurement by its deadline and an error cap.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// A measurement stops early after this many errors (it is invalid anyway).
const MAX_ERRORS: u64 = 100;
/// Untimed requests before the clock starts (ARP, first conntrack entries, caches).
const WARMUP: usize = 20;

/// User + system CPU time of this process so far, in seconds.
fn cpu_secs() -> f64 {
    // SAFETY: zeroed rusage is valid; getrusage fills it.
    let usage = unsafe {
        let mut usage: libc::rusage = zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// SCHED_FIFO priority 1: runs as soon as it wakes, ahead of ordinary tasks. Returns whether
/// the kernel allowed it (the kernel's RT throttling still leaves others 5% of each CPU).
fn realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: plain sched_setscheduler on this process.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "loadgen: pin to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
}

/// Dies with the process that started it, even if that one is killed.
fn die_with_parent() {
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

fn serve(port: u16, namespaces: &[String]) {
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    // SAFETY: plain epoll_create1.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        epoll >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for (i, path) in namespaces.iter().enumerate() {
        let ns = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!("setns {path}: {}", std::io::Error::last_os_error());
        }
        let l = TcpListener::bind(any).unwrap_or_else(|e| panic!("bind tcp {any} in {path}: {e}"));
        let u = UdpSocket::bind(any).unwrap_or_else(|e| panic!("bind udp {any} in {path}: {e}"));
        l.set_nonblocking(true).expect("nonblocking listener");
        u.set_nonblocking(true).expect("nonblocking udp");
        for (fd, token) in [(l.as_raw_fd(), 2 * i), (u.as_raw_fd(), 2 * i + 1)] {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: token as u64,
            };
            // SAFETY: valid epoll and socket fds.
            let rc = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            assert!(rc == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
        }
        tcp.push(l);
        udp.push(u);
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    // SAFETY: zeroed epoll_events are valid.
    let mut events: [libc::epoll_event; 16] = unsafe { zeroed() };
    let mut buf = [0u8; 64];
    // Runs until killed (the bench kills it; PR_SET_PDEATHSIG if the bench dies).
    loop {
        // SAFETY: events is a live array of 16 entries.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 16, 1000) };
        if n <= 0 {
            continue;
        }
        for ev in &events[..n as usize] {
            let token = ev.u64 as usize;
            let id = (token / 2 + 1) as u8;
            if token.is_multiple_of(2) {
                if let Ok((stream, _)) = tcp[token / 2].accept() {
                    serve_connection(stream, id);
                }
            } else {
                // Bounded: at most 64 datagrams per wake-up.
                for _ in 0..64 {
                    match udp[token / 2].recv_from(&mut buf) {
                        Ok((_, peer)) => {
                            let _ = udp[token / 2].send_to(&[id], peer);
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

/// Answers each byte of one connection until the peer closes or resets it, or it stays silent
/// for OP_TIMEOUT. One connection at a time: the bench runs one client per topology.
fn serve_connection(mut stream: TcpStream, id: u8) {
    // accept(2) does not pass O_NONBLOCK on from the listener; be explicit.
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(OP_TIMEOUT)).is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut byte = [0u8; 1];
    while matches!(stream.read(&mut byte), Ok(1)) {
        if stream.write_all(&[id]).is_err() {
            return;
        }
    }
}

/// What one measurement saw.
struct Tally {
    /// CPU seconds used when the clock started.
    cpu_start: f64,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    /// Which backend ids answered.
    seen: [bool; 256],
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            cpu_start: 0.0,
            ops: 0,
            errors: 0,
            first_error: None,
            seen: [false; 256],
        }
    }
}

impl Tally {
    fn error(&mut self, what: &str, e: std::io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {e}"));
        }
    }

    fn answered(&mut self, id: u8) {
        self.ops += 1;
        self.seen[id as usize] = true;
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn last_error<T>() -> std::io::Result<T> {
    Err(std::io::Error::last_os_error())
}

fn setsockopt<T>(fd: i32, level: i32, name: i32, value: &T) -> std::io::Result<()> {
    // SAFETY: value points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { last_error() }
}

const TIMEVAL: libc::timeval = libc::timeval {
    tv_sec: OP_TIMEOUT.as_secs() as libc::time_t,
    tv_usec: 0,
};

/// A TCP socket with send/receive (and so connect) timeouts; closed on drop.
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn tcp_connect(to: &libc::sockaddr_in, linger0: bool) -> std::io::Result<Fd> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return last_error();
    }
    let fd = Fd(fd);
    setsockopt(fd.0, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &TIMEVAL)?;
    setsockopt(fd.0, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &TIMEVAL)?;
    if linger0 {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        setsockopt(fd.0, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
    }
    // SAFETY: to is a valid sockaddr_in.
    let rc = unsafe {
        libc::connect(
            fd.0,
            (to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return last_error();
    }
    Ok(fd)
}

/// One request on a connected socket; returns the backend id.
fn ask(fd: &Fd) -> std::io::Result<u8> {
    let req = [b'x'];
    // SAFETY: one-byte buffers that outlive the calls.
    unsafe {
        if libc::send(fd.0, req.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) != 1 {
            return last_error();
        }
        let mut reply = [0u8; 1];
        match libc::recv(fd.0, reply.as_mut_ptr().cast(), 1, 0) {
            1 => Ok(reply[0]),
            0 => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed without a reply",
            )),
            _ => last_error(),
        }
    }
}

/// The peer address a connected socket reports (getpeername).
fn peer_of(fd: &Fd) -> std::io::Result<SocketAddrV4> {
    // SAFETY: zeroed sockaddr_in is valid; len matches.
    unsafe {
        let mut sa: libc::sockaddr_in = zeroed();
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::getpeername(fd.0, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) != 0 {
            return last_error();
        }
        Ok(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        ))
    }
}

fn crr_once(to: &libc::sockaddr_in, tally: &mut Tally) {
    match tcp_connect(to, true).and_then(|fd| ask(&fd)) {
        Ok(id) => tally.answered(id),
        Err(e) => tally.error("connect/request", e),
    }
}

fn crr_timed(to: SocketAddrV4, secs: f64, tally: &mut Tally) -> f64 {
    let sa = sockaddr(to);
    // The first connection also checks that the client sees the address it dialled.
    match tcp_connect(&sa, true).and_then(|fd| Ok((ask(&fd)?, peer_of(&fd)?))) {
        Ok((_, peer)) if peer != to => tally.error(
            "getpeername",
            std::io::Error::other(format!("peer is {peer}, dialled {to}")),
        ),
        Ok(_) => {}
        Err(e) => tally.error("first connection", e),
    }
    crr_loop(|| &sa, secs, tally)
}

/// The warm-up, then `secs` of connections, each to the address `next` gives.
fn crr_loop<'a>(
    mut next: impl FnMut() -> &'a libc::sockaddr_in,
    secs: f64,
    tally: &mut Tally,
) -> f64 {
    for _ in 0..WARMUP {
        crr_once(next(), &mut Tally::default());
    }
    tally.cpu_start = cpu_secs();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    while Instant::now() < deadline && tally.errors < MAX_ERRORS {
        crr_once(next(), tally);
    }
    start.elapsed().as_secs_f64()
}

/// TCP_CRR straight to several addresses, each connection to one drawn at random (xorshift):
/// what a Service's random choice among its pods costs the client and the pods when nothing
/// translates (the load-balanced baseline).
fn crr_spread_timed(to: &[SocketAddrV4], secs: f64, tally: &mut Tally) -> f64 {
    let sas: Vec<libc::sockaddr_in> = to.iter().map(|a| sockaddr(*a)).collect();
    let sas = &sas;
    let mut x: u32 = 0x9e37_79b9 ^ std::process::id();
    crr_loop(
        move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            &sas[x as usize % sas.len()]
        },
        secs,
        tally,
    )
}

fn rr_timed(to: SocketAddrV4, secs: f64, tally: &mut Tally) -> f64 {
    let sa = sockaddr(to);
    let fd = match tcp_connect(&sa, true) {
        Ok(fd) => fd,
        Err(e) => {
            tally.error("connect", e);
            return 0.0;
        }
    };
    let _ = setsockopt(fd.0, libc::IPPROTO_TCP, libc::TCP_NODELAY, &1i32);
    for _ in 0..WARMUP {
        if let Err(e) = ask(&fd) {
            tally.error("request", e);
            return 0.0;
        }
    }
    tally.cpu_start = cpu_secs();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    while Instant::now() < deadline {
        match ask(&fd) {
            Ok(id) => tally.answered(id),
            Err(e) => {
                // A broken connection ends the measurement (and invalidates it).
                tally.error("request", e);
                break;
            }
        }
    }
    start.elapsed().as_secs_f64()
}

fn udp_once(socket: &UdpSocket, to: SocketAddrV4, tally: &mut Tally) {
    let mut buf = [0u8; 16];
    let result = socket
        .send_to(b"x", to)
        .and_then(|_| socket.recv_from(&mut buf));
    match result {
        Ok((1, from)) if from == std::net::SocketAddr::V4(to) => tally.answered(buf[0]),
        Ok((n, from)) => tally.error(
            "reply",
            std::io::Error::other(format!("{n} bytes from {from}, expected 1 from {to}")),
        ),
        Err(e) => tally.error("send/receive", e),
    }
}

fn udp_timed(to: SocketAddrV4, secs: f64, tally: &mut Tally) -> f64 {
    let socket = match UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)) {
        Ok(s) => s,
        Err(e) => {
            tally.error("bind", e);
            return 0.0;
        }
    };
    if let Err(e) = socket.set_read_timeout(Some(OP_TIMEOUT)) {
        tally.error("timeout", e);
        return 0.0;
    }
    for _ in 0..WARMUP {
        udp_once(&socket, to, &mut Tally::default());
    }
    tally.cpu_start = cpu_secs();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    while Instant::now() < deadline && tally.errors < MAX_ERRORS {
        udp_once(&socket, to, tally);
    }
    start.elapsed().as_secs_f64()
}

/// Datagrams per sendmmsg call of `flood`.
const FLOOD_BATCH: usize = 64;

/// `flood`: sends 18-byte UDP datagrams to `to` from one socket (one flow) as fast as it can,
/// FLOOD_BATCH per sendmmsg, for `secs`; `ops` counts the datagrams the kernel took. A full
/// device queue (ENOBUFS) is counted as an error and retried, not fatal: a flood overruns.
fn flood_timed(to: SocketAddr, secs: f64, tally: &mut Tally) -> f64 {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = match UdpSocket::bind(any).and_then(|s| s.connect(to).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            tally.error("bind/connect", e);
            return 0.0;
        }
    };
    let payload = [0x5au8; 18];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: all-zero mmsghdrs are valid; each then points at the one iovec.
    let mut msgs: [libc::mmsghdr; FLOOD_BATCH] = unsafe { zeroed() };
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    tally.cpu_start = cpu_secs();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut calls = 0u32;
    loop {
        // The clock is read every 64 calls (4,096 datagrams): a flood must not be mostly clock.
        calls = calls.wrapping_add(1);
        if calls.is_multiple_of(64) && Instant::now() >= deadline {
            break;
        }
        // SAFETY: a connected socket and FLOOD_BATCH valid headers pointing at live buffers.
        let n =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), FLOOD_BATCH as u32, 0) };
        if n > 0 {
            tally.ops += n as u64;
        } else {
            let e = std::io::Error::last_os_error();
            tally.errors += 1;
            if tally.first_error.is_none() {
                tally.first_error = Some(format!("sendmmsg: {e}"));
            }
        }
    }
    start.elapsed().as_secs_f64()
}

/// `sink`: a UDP socket bound to `port` in the namespace `netns`, never read: datagrams for
/// it are delivered to the socket (no ICMP port unreachable goes back) and dropped there once
/// its buffer is full. Runs until killed.
fn sink(port: u16, netns: &str) -> ! {
    let ns = File::open(netns).unwrap_or_else(|e| panic!("open {netns}: {e}"));
    // SAFETY: a valid namespace fd; this process is single-threaded.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        panic!("setns {netns}: {}", std::io::Error::last_os_error());
    }
    // [::] takes both families (IPv4 as mapped addresses).
    let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let _socket = UdpSocket::bind(any).unwrap_or_else(|e| panic!("bind udp {any}: {e}"));
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen serve PORT CPU NETNS... | loadgen sink PORT NETNS | \
         loadgen crr|rr|udp|flood ADDR:PORT SECS CPU | loadgen crr-spread ADDR:PORT,... SECS CPU"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    die_with_parent();
    if args.first().map(String::as_str) == Some("serve") {
        if args.len() < 4 || args.len() > 3 + 255 {
            usage();
        }
        pin(arg(&args, 2));
        realtime();
        serve(arg(&args, 1), &args[3..]);
        return;
    }
    if args.first().map(String::as_str) == Some("sink") {
        if args.len() != 3 {
            usage();
        }
        sink(arg(&args, 1), &args[2]);
    }
    if args.len() != 4 {
        usage();
    }
    pin(arg(&args, 3));
    let rt = realtime();
    let secs: f64 = arg(&args, 2);
    if !(0.0..=60.0).contains(&secs) {
        usage();
    }
    let mut tally = Tally::default();
    let elapsed = match args[0].as_str() {
        "crr" => crr_timed(arg(&args, 1), secs, &mut tally),
        "crr-spread" => {
            let to: Vec<SocketAddrV4> = args[1]
                .split(',')
                .map(|a| a.parse().unwrap_or_else(|_| usage()))
                .collect();
            crr_spread_timed(&to, secs, &mut tally)
        }
        "rr" => rr_timed(arg(&args, 1), secs, &mut tally),
        "udp" => udp_timed(arg(&args, 1), secs, &mut tally),
        // Either family.
        "flood" => flood_timed(arg(&args, 1), secs, &mut tally),
        _ => usage(),
    };
    let (rate, cpu) = if elapsed > 0.0 {
        (
            tally.ops as f64 / elapsed,
            (cpu_secs() - tally.cpu_start) / elapsed,
        )
    } else {
        (0.0, 0.0)
    };
    let line = serde_json::json!({
        "ops": tally.ops,
        "errors": tally.errors,
        "secs": elapsed,
        "rate": rate,
        "cpu": cpu,
        "realtime": rt,
        "backends": tally.seen.iter().filter(|s| **s).count(),
        "first_error": tally.first_error,
    });
    println!("{line}");
}
