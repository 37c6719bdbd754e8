//! Test peer run inside pod namespaces: `serve` answers every TCP connection and UDP datagram
//! with its name and the client address it saw; `request` sends requests and prints one JSON
//! line per reply (backend, address seen by the backend, peer address the client saw).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    thread,
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn canonical(addr: SocketAddr) -> String {
    let ip = addr.ip().to_canonical();
    SocketAddr::new(ip, addr.port()).to_string()
}

fn serve(name: String, port: u16) {
    // [::] with IPV6_V6ONLY off (Linux default) accepts both families.
    let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let tcp = TcpListener::bind(any).unwrap_or_else(|e| panic!("bind tcp {any}: {e}"));
    // SCTP (one-to-one style) behaves like TCP at the socket API; only where the kernel has it.
    if let Ok(sctp) = sctp_listener(port) {
        let name = name.clone();
        thread::spawn(move || accept_loop(sctp, name));
    }
    let udp = UdpSocket::bind(any).unwrap_or_else(|e| panic!("bind udp {any}: {e}"));
    let udp_name = name.clone();
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                continue;
            };
            let mut reply = format!("{udp_name} {}\n", canonical(peer)).into_bytes();
            // A large request (one that was fragmented on the way) gets as large an answer,
            // so the reply is fragmented too.
            if n > 1000 && reply.len() < n {
                reply.resize(n, b' ');
            }
            let _ = udp.send_to(&reply, peer);
        }
    });
    println!("ready");
    accept_loop(tcp, name);
}

/// Answers every line of every connection with the server's name and the peer it saw.
fn accept_loop(listener: TcpListener, name: String) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.clone();
        thread::spawn(move || {
            let Ok(peer) = stream.peer_addr() else { return };
            let Ok(reader) = stream.try_clone() else {
                return;
            };
            let mut reader = BufReader::new(reader);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                line.clear();
                let reply = format!("{name} {}\n", canonical(peer));
                if stream.write_all(reply.as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
}

fn sctp_socket(v6: bool) -> std::io::Result<OwnedFd> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn sctp_listener(port: u16) -> std::io::Result<TcpListener> {
    let fd = sctp_socket(true)?;
    let (addr, len) = sockaddr_of(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    // SAFETY: valid fd and sockaddr.
    unsafe {
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_storage).cast(),
            len,
        ) != 0
            || libc::listen(fd.as_raw_fd(), 128) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(TcpListener::from(fd))
}

fn sctp_connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let fd = sctp_socket(to.is_ipv6())?;
    let (addr, len) = sockaddr_of(to);
    // SAFETY: valid fd and sockaddr.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_storage).cast(),
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(fd))
}

fn parse_reply(text: &str) -> (String, String) {
    let mut parts = text.split_whitespace();
    (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    )
}

type Answer = (String, String, String);

/// One request on an open stream: (backend, address it saw, our peer address).
fn ask(stream: &mut TcpStream) -> std::io::Result<Answer> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = canonical(stream.peer_addr()?);
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    // Byte by byte, so nothing past the newline is consumed (the stream may be asked again).
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 {
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0] as char);
    }
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no reply",
        ));
    }
    let (backend, seen) = parse_reply(&line);
    Ok((backend, seen, peer))
}

fn stream_connect(proto: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    match proto {
        "sctp" => sctp_connect(to),
        _ => TcpStream::connect_timeout(&to, TIMEOUT),
    }
}

fn udp_once(to: SocketAddr, connected: bool) -> std::io::Result<(String, String, String)> {
    // $TESTHOST_SOURCE_PORT pins the source port, so a test can send the same flow twice.
    let port: u16 = std::env::var("TESTHOST_SOURCE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let bind: SocketAddr = if to.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], port))
    } else {
        SocketAddr::from(([0u16; 8], port))
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    // $TESTHOST_TTL sets the TTL (IPv4) or hop limit (IPv6) of the datagram.
    if let Some(ttl) = std::env::var("TESTHOST_TTL")
        .ok()
        .and_then(|t| t.parse::<u32>().ok())
    {
        set_hops(&socket, to.is_ipv4(), ttl)?;
    }
    // $TESTHOST_UDP_SIZE pads the datagram to that many bytes (past the MTU: fragmented).
    let mut request = b"hello\n".to_vec();
    if let Some(size) = std::env::var("TESTHOST_UDP_SIZE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        request.resize(size.max(request.len()), b' ');
    }
    let mut buf = vec![0u8; 65536];
    let (n, peer) = if connected {
        socket.connect(to)?;
        socket.send(&request)?;
        let n = socket.recv(&mut buf)?;
        (n, socket.peer_addr()?)
    } else {
        socket.send_to(&request, to)?;
        socket.recv_from(&mut buf)?
    };
    if request.len() > 1000 && n < request.len() {
        return Err(std::io::Error::other(format!(
            "a reply of {n} bytes to a request of {}",
            request.len()
        )));
    }
    let (backend, seen) = parse_reply(&String::from_utf8_lossy(&buf[..n]));
    Ok((backend, seen, canonical(peer)))
}

fn set_hops(socket: &UdpSocket, v4: bool, hops: u32) -> std::io::Result<()> {
    if v4 {
        return socket.set_ttl(hops);
    }
    use std::os::fd::AsRawFd as _;
    let value = hops as libc::c_int;
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_HOPS,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn print_answer(result: std::io::Result<Answer>) {
    let line = match result {
        Ok((backend, seen, peer)) => serde_json::json!({
            "ok": true, "backend": backend, "seen": seen, "peer": peer,
        }),
        Err(e) => serde_json::json!({
            "ok": false, "error": e.to_string(), "errno": e.raw_os_error(),
        }),
    };
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn request(proto: &str, to: SocketAddr, count: usize, mode: &str) {
    if mode == "hold" {
        // One connection: answer once, then again for every line on stdin.
        let mut stream = match stream_connect(proto, to) {
            Ok(s) => s,
            Err(e) => return print_answer(Err(e)),
        };
        print_answer(ask(&mut stream));
        for _ in std::io::stdin().lines() {
            print_answer(ask(&mut stream));
        }
        return;
    }
    if mode == "keep" {
        // `count` connections, each answered once, all kept open until stdin closes.
        let mut open = Vec::new();
        for _ in 0..count {
            let result = stream_connect(proto, to).and_then(|mut s| {
                let answer = ask(&mut s)?;
                open.push(s);
                Ok(answer)
            });
            print_answer(result);
        }
        for _ in std::io::stdin().lines() {}
        return;
    }
    // $TESTHOST_SOURCE_PORT: TCP connection `i` from that port plus `i`.
    let first_port: Option<u16> = std::env::var("TESTHOST_SOURCE_PORT")
        .ok()
        .and_then(|p| p.parse().ok());
    for i in 0..count {
        let result = match (proto, first_port) {
            ("tcp", Some(first)) => {
                tcp_from_port(to, first.wrapping_add(i as u16)).and_then(|mut s| ask(&mut s))
            }
            ("tcp" | "sctp", _) => stream_connect(proto, to).and_then(|mut s| ask(&mut s)),
            ("udp", _) => udp_once(to, mode == "connected"),
            (other, _) => panic!("unknown protocol {other}"),
        };
        print_answer(result);
    }
}

/// A TCP connection to `to` from source port `port` (bound explicitly), bounded by TIMEOUT.
fn tcp_from_port(to: SocketAddr, port: u16) -> std::io::Result<TcpStream> {
    let family = if to.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, libc::IPPROTO_TCP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let timeout = libc::timeval {
        tv_sec: TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    let local = if to.is_ipv6() {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    } else {
        SocketAddr::from(([0, 0, 0, 0], port))
    };
    let (local, local_len) = sockaddr_of(local);
    let (remote, remote_len) = sockaddr_of(to);
    // SAFETY: valid fd, option values of the right sizes and sockaddrs.
    unsafe {
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
            // Bounds connect() too.
            || libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) != 0
            || libc::bind(
                fd.as_raw_fd(),
                (&local as *const libc::sockaddr_storage).cast(),
                local_len,
            ) != 0
            || libc::connect(
                fd.as_raw_fd(),
                (&remote as *const libc::sockaddr_storage).cast(),
                remote_len,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(TcpStream::from(fd))
}

/// One TCP request from each source port of `first..=last` to `to`, one answer line each. With
/// `hold`, the connections stay open: every line on stdin asks each of them again.
fn from_ports(to: SocketAddr, first: u16, last: u16, hold: bool) {
    let mut streams = Vec::new();
    for port in first..=last {
        let mut stream = tcp_from_port(to, port);
        let answer = stream
            .as_mut()
            .map_err(|e| std::io::Error::new(e.kind(), e.to_string()));
        print_answer(answer.and_then(ask));
        if let Ok(s) = stream {
            streams.push(s);
        }
        if !hold {
            streams.clear();
        }
    }
    if hold {
        for _ in std::io::stdin().lines() {
            for s in &mut streams {
                print_answer(ask(s));
            }
        }
    }
}

/// Sends one IPv4 packet, header included as given (the kernel fills in the header checksum
/// and total length), to the packet's destination over a raw socket.
fn raw4(packet_hex: &str) {
    let bytes: Vec<u8> = (0..packet_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&packet_hex[i..i + 2], 16).unwrap_or_else(|_| usage()))
        .collect();
    if bytes.len() < 20 {
        usage();
    }
    let dst = SocketAddr::from(([bytes[16], bytes[17], bytes[18], bytes[19]], 0));
    let (addr, len) = sockaddr_of(dst);
    // SAFETY: plain socket(2); IPPROTO_RAW implies IP_HDRINCL.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: valid fd, buffer and sockaddr.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&addr as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    assert!(
        sent == bytes.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Sends a datagram every `every` (after the previous one's answer or timeout) for `secs`
/// seconds over one socket (connected, or unconnected with sendto), printing each answer or
/// error with a timestamp. On an error other than a timeout the socket is replaced, as a
/// resolver would do.
fn udp_stream(to: SocketAddr, secs: u64, connected: bool, every: Duration) {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let open = || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        if connected {
            s.connect(to)?;
        }
        Ok(s)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut socket = open().expect("udp socket");
    let mut buf = [0u8; 1500];
    while std::time::Instant::now() < deadline {
        let sent = if connected {
            socket.send(b"hello\n")
        } else {
            socket.send_to(b"hello\n", to)
        };
        let result = sent.and_then(|_| {
            if connected {
                socket.recv(&mut buf)
            } else {
                socket.recv_from(&mut buf).map(|(n, _)| n)
            }
        });
        let line = match result {
            Ok(n) => {
                let (backend, _) = parse_reply(&String::from_utf8_lossy(&buf[..n]));
                serde_json::json!({"t": now_ms() as u64, "backend": backend})
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                serde_json::json!({"t": now_ms() as u64, "event": "timeout"})
            }
            Err(e) => {
                let line = serde_json::json!({"t": now_ms() as u64, "event": "error", "errno": e.raw_os_error()});
                if let Ok(s) = open() {
                    socket = s;
                }
                line
            }
        };
        println!("{line}");
        let _ = std::io::stdout().flush();
        thread::sleep(every);
    }
}

/// Path MTU discovery from a client's side: one datagram of `size` bytes (UDP payload) on a
/// connected UDP socket that never fragments (IP_PMTUDISC_DO), then the path MTU its kernel
/// holds for `to` (IP_MTU). Prints the answer as `request` does, with `"mtu"` added: an error
/// "message too long" when a router on the way asked for smaller packets.
fn pmtu(to: SocketAddr, size: usize) {
    use std::os::fd::AsRawFd as _;
    let run = || -> std::io::Result<(std::io::Result<Answer>, u32)> {
        let bind: SocketAddr = if to.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        let (level, option, value, mtu_option) = if to.is_ipv4() {
            (
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
                libc::IP_MTU,
            )
        } else {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
                libc::IPV6_MTU,
            )
        };
        // SAFETY: a valid socket and an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                option,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        socket.connect(to)?;
        let mut request = b"hello\n".to_vec();
        request.resize(size.max(request.len()), b' ');
        let answer = socket.send(&request).and_then(|_| {
            let mut buf = vec![0u8; 65536];
            let n = socket.recv(&mut buf)?;
            let (backend, seen) = parse_reply(&String::from_utf8_lossy(&buf[..n]));
            Ok((backend, seen, canonical(socket.peer_addr()?)))
        });
        let mut mtu: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket and an int buffer of the given length.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                mtu_option,
                (&raw mut mtu).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((answer, mtu as u32))
    };
    // The MTU is read whether or not the datagram was answered.
    let line = match run() {
        Ok((Ok((backend, seen, peer)), mtu)) => serde_json::json!({
            "ok": true, "backend": backend, "seen": seen, "peer": peer, "mtu": mtu,
        }),
        Ok((Err(e), mtu)) => serde_json::json!({
            "ok": false, "error": e.to_string(), "errno": e.raw_os_error(), "mtu": mtu,
        }),
        Err(e) => serde_json::json!({
            "ok": false, "error": e.to_string(), "errno": e.raw_os_error(),
        }),
    };
    println!("{line}");
}

fn usage() -> ! {
    eprintln!(
        "usage: testhost serve NAME PORT | testhost request tcp|udp|sctp ADDR:PORT COUNT [connected|hold|keep] | testhost udp-stream ADDR:PORT SECS [connected|unconnected [EVERY_MS]] | testhost from-ports ADDR:PORT FIRST LAST [hold] | testhost raw4 HEX | testhost pmtu ADDR:PORT SIZE"
    );
    std::process::exit(2)
}

/// A service mesh's sidecar, for the socket-layer opt-out tests: accepts the connections the
/// pod's netfilter rules redirect to `port`, appends each one's original destination
/// (SO_ORIGINAL_DST) to `log`, connects there with socket mark `mark` (which the redirect rule
/// skips) and relays both ways.
fn sidecar(port: u16, mark: u32, log: String) {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .unwrap_or_else(|e| panic!("bind sidecar port {port}: {e}"));
    println!("ready");
    let _ = std::io::stdout().flush();
    for stream in listener.incoming() {
        let Ok(client) = stream else { continue };
        let log = log.clone();
        thread::spawn(move || {
            let Some(orig) = original_dst(&client) else {
                return;
            };
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
            {
                let _ = writeln!(f, "{orig}");
            }
            let Ok(upstream) = connect_marked(orig, mark) else {
                return;
            };
            let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
                return;
            };
            let mut c1 = client;
            let mut u1 = upstream;
            thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut u2);
                let _ = u2.shutdown(std::net::Shutdown::Write);
            });
            let _ = std::io::copy(&mut u1, &mut c1);
            let _ = c1.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// SO_ORIGINAL_DST of a redirected IPv4 connection.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: zeroed sockaddr_in is a valid value to be filled.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of the given length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| {
        SocketAddr::from((
            u32::from_be(addr.sin_addr.s_addr).to_be_bytes(),
            u16::from_be(addr.sin_port),
        ))
    })
}

/// A TCP connection to `to` (IPv4) from a socket carrying `mark`.
fn connect_marked(to: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh, valid descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes(to.ip().octets()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid socket and sockaddr_in of the given length.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(owned))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") if args.len() == 3 => {
            serve(args[1].clone(), args[2].parse().unwrap_or_else(|_| usage()))
        }
        Some("request") if args.len() >= 4 => request(
            &args[1],
            args[2].parse().unwrap_or_else(|_| usage()),
            args[3].parse().unwrap_or_else(|_| usage()),
            args.get(4).map_or("", String::as_str),
        ),
        Some("udp-stream") if args.len() >= 3 => udp_stream(
            args[1].parse().unwrap_or_else(|_| usage()),
            args[2].parse().unwrap_or_else(|_| usage()),
            args.get(3).is_none_or(|a| a != "unconnected"),
            Duration::from_millis(
                args.get(4)
                    .map_or(50, |ms| ms.parse().unwrap_or_else(|_| usage())),
            ),
        ),
        Some("from-ports") if args.len() >= 4 => from_ports(
            args[1].parse().unwrap_or_else(|_| usage()),
            args[2].parse().unwrap_or_else(|_| usage()),
            args[3].parse().unwrap_or_else(|_| usage()),
            args.get(4).is_some_and(|a| a == "hold"),
        ),
        Some("raw4") if args.len() == 2 => raw4(&args[1]),
        Some("pmtu") if args.len() == 3 => pmtu(
            args[1].parse().unwrap_or_else(|_| usage()),
            args[2].parse().unwrap_or_else(|_| usage()),
        ),
        Some("sidecar") if args.len() == 4 => sidecar(
            args[1].parse().unwrap_or_else(|_| usage()),
            args[2].parse().unwrap_or_else(|_| usage()),
            args[3].clone(),
        ),
        _ => usage(),
    }
}
