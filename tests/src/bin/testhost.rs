//! Test peer run inside pod namespaces: `serve` answers every TCP connection and UDP datagram
//! with its name and the client address it saw; `request` sends requests and prints one JSON
//! line per reply (backend, address seen by the backend, peer address the client saw).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
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
    let udp = UdpSocket::bind(any).unwrap_or_else(|e| panic!("bind udp {any}: {e}"));
    let udp_name = name.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((_, peer)) = udp.recv_from(&mut buf) else {
                continue;
            };
            let reply = format!("{udp_name} {}\n", canonical(peer));
            let _ = udp.send_to(reply.as_bytes(), peer);
        }
    });
    println!("ready");
    for stream in tcp.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.clone();
        thread::spawn(move || {
            let Ok(peer) = stream.peer_addr() else { return };
            let _ = stream.set_read_timeout(Some(TIMEOUT));
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let _ = stream.write_all(format!("{name} {}\n", canonical(peer)).as_bytes());
        });
    }
}

fn parse_reply(text: &str) -> (String, String) {
    let mut parts = text.split_whitespace();
    (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    )
}

fn tcp_once(to: SocketAddr) -> std::io::Result<(String, String, String)> {
    let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = canonical(stream.peer_addr()?);
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let (backend, seen) = parse_reply(&line);
    Ok((backend, seen, peer))
}

fn udp_once(to: SocketAddr, connected: bool) -> std::io::Result<(String, String, String)> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 1500];
    let (n, peer) = if connected {
        socket.connect(to)?;
        socket.send(b"hello\n")?;
        let n = socket.recv(&mut buf)?;
        (n, socket.peer_addr()?)
    } else {
        socket.send_to(b"hello\n", to)?;
        socket.recv_from(&mut buf)?
    };
    let (backend, seen) = parse_reply(&String::from_utf8_lossy(&buf[..n]));
    Ok((backend, seen, canonical(peer)))
}

fn request(proto: &str, to: SocketAddr, count: usize, connected: bool) {
    for _ in 0..count {
        let result = match proto {
            "tcp" => tcp_once(to),
            "udp" => udp_once(to, connected),
            other => panic!("unknown protocol {other}"),
        };
        let line = match result {
            Ok((backend, seen, peer)) => serde_json::json!({
                "ok": true, "backend": backend, "seen": seen, "peer": peer,
            }),
            Err(e) => serde_json::json!({
                "ok": false, "error": e.to_string(), "errno": e.raw_os_error(),
            }),
        };
        println!("{line}");
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: testhost serve NAME PORT | testhost request tcp|udp ADDR:PORT COUNT [connected]"
    );
    std::process::exit(2)
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
            args.get(4).is_some_and(|a| a == "connected"),
        ),
        _ => usage(),
    }
}
