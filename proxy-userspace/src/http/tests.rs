//! The HTTP server on loopback sockets: the answers, the size limits and deadlines, bad input,
//! and clients that hold connections without finishing a request. The client helpers are
//! shared with the health check server tests.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    sync::mpsc,
    thread::{self, JoinHandle},
    time::Instant,
};

use super::*;
use crate::{compile::Family, health::DEFAULT_HEALTH_TIMEOUT};

// ---- clients --------------------------------------------------------------------------------

/// How long a test client waits for the server, for anything.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`wait_until`] looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Time between two bytes of a [`SlowLoris`] connection.
const SLOW_LORIS_PACE: Duration = Duration::from_millis(20);

pub(crate) struct Reply {
    /// "HTTP/1.1" or "HTTP/1.0".
    pub version: String,
    pub status: u16,
    /// The status line and header lines as sent.
    pub head: String,
    /// By lowercase name.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// Parses a whole response; HEAD answers have no body whatever Content-Length says.
fn parse(bytes: &[u8], head_only: bool) -> Reply {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head/body: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let (version, rest) = status_line.split_once(' ').unwrap();
    assert!(matches!(version, "HTTP/1.1" | "HTTP/1.0"), "{status_line}");
    let status = rest[..3].parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap();
            (k.to_ascii_lowercase(), v.to_string())
        })
        .collect();
    if let Some(len) = headers.get("content-length")
        && !head_only
    {
        assert_eq!(len.parse::<usize>().unwrap(), body.len());
    }
    Reply {
        version: version.to_string(),
        status,
        head: head.to_string(),
        headers,
        body: body.to_string(),
    }
}

/// Sends raw bytes, reads until the server closes, parses the response.
pub(crate) fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT).unwrap();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    parse(&buf, request.starts_with(b"HEAD "))
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: t\r\n\r\n").as_bytes(),
    )
}

/// A GET on a fresh connection: its status and the time from connect to the end of the
/// response.
pub(crate) fn timed_get(addr: SocketAddr, path: &str) -> (u16, Duration) {
    let start = Instant::now();
    let r = raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    );
    (r.status, start.elapsed())
}

/// Sends `request` from another thread (the server may stop reading it) and reads what comes
/// back until the server closes or resets the connection: the bytes read, and whether it
/// ended in an error (a reset).
fn exchange(addr: SocketAddr, request: Vec<u8>) -> (Vec<u8>, Option<io::Error>) {
    let mut s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT).unwrap();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        match s.read(&mut chunk) {
            Ok(0) => break None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    if let Some(e) = &end {
        assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "no end of the answer within {CLIENT_TIMEOUT:?}"
        );
    }
    // Unblocks a sender stuck on a full socket.
    let _ = s.shutdown(Shutdown::Both);
    sender.join().unwrap();
    (buf, end)
}

/// The status of what [`exchange`] read, `None` if nothing.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let line = bytes.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.split(' ').nth(1)?.parse().ok()
}

/// A client connection and when it was opened.
pub(crate) struct Held {
    pub stream: TcpStream,
    /// Just before connecting, so the server accepted it later.
    pub since: Instant,
}

/// `n` connections to `addr` that send nothing.
pub(crate) fn hold_idle(addr: SocketAddr, n: usize) -> Vec<Held> {
    (0..n)
        .map(|i| {
            let since = Instant::now();
            let stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)
                .unwrap_or_else(|e| panic!("idle connection {i} to {addr}: {e}"));
            Held { stream, since }
        })
        .collect()
}

/// Connections that send a request line one byte at a time (`GET /aaaa...`, a byte on each
/// every [`SLOW_LORIS_PACE`]) and never finish it, until dropped.
pub(crate) struct SlowLoris {
    /// Clones of the driver's connections, to watch them.
    pub held: Vec<Held>,
    stop: mpsc::Sender<()>,
    driver: Option<JoinHandle<()>>,
}

impl SlowLoris {
    pub fn start(addr: SocketAddr, n: usize) -> SlowLoris {
        let conns = hold_idle(addr, n);
        let held = conns
            .iter()
            .map(|h| Held {
                stream: h.stream.try_clone().unwrap(),
                since: h.since,
            })
            .collect();
        for h in &conns {
            h.stream.set_nodelay(true).unwrap();
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let driver = thread::spawn(move || {
            let mut open = vec![true; conns.len()];
            let mut sent = 0;
            // The wait for the stop signal is also the pace of the bytes.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(SLOW_LORIS_PACE) {
                let byte = b"GET /".get(sent).copied().unwrap_or(b'a');
                sent += 1;
                for (h, open) in conns.iter().zip(open.iter_mut()) {
                    // The server closes it at its deadline; then writing fails.
                    *open = *open && (&h.stream).write_all(&[byte]).is_ok();
                }
            }
        });
        SlowLoris {
            held,
            stop,
            driver: Some(driver),
        }
    }
}

impl Drop for SlowLoris {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(driver) = self.driver.take() {
            let _ = driver.join();
        }
    }
}

/// Waits until the server has closed every connection of `held` (end of stream or reset), at
/// most `within`; returns how long after its opening each was seen closed, in order.
pub(crate) fn wait_closed(held: &[&Held], within: Duration) -> Vec<Duration> {
    let deadline = Instant::now() + within;
    let mut closed: Vec<Option<Duration>> = vec![None; held.len()];
    for h in held {
        h.stream.set_nonblocking(true).unwrap();
    }
    let mut buf = [0u8; 4096];
    loop {
        let pending: Vec<usize> = (0..held.len()).filter(|&i| closed[i].is_none()).collect();
        if pending.is_empty() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{} of {} connections still open {within:?} later",
            pending.len(),
            held.len()
        );
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|&i| libc::pollfd {
                fd: held[i].stream.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        let timeout_ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
        // SAFETY: poll(2) on a vector of pollfd and its length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.kind(), ErrorKind::Interrupted, "poll: {e}");
            continue;
        }
        let now = Instant::now();
        for (fd, &i) in fds.iter().zip(&pending) {
            if fd.revents == 0 {
                continue;
            }
            loop {
                match (&held[i].stream).read(&mut buf) {
                    Ok(0) => {}
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {}
                }
                closed[i] = Some(now - held[i].since);
                break;
            }
        }
    }
    closed.into_iter().flatten().collect()
}

/// Polls `check` until it says done, at most `within`; panics with its last report.
pub(crate) fn wait_until(within: Duration, mut check: impl FnMut() -> (bool, String)) {
    let deadline = Instant::now() + within;
    loop {
        let (done, report) = check();
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "not after {within:?}: {report}");
        thread::sleep(POLL_INTERVAL);
    }
}

/// Held by the tests that open thousands of connections, so two of them never run at once:
/// together they could pass the open-files limit, and each slows the other's probes on the
/// shared runtime.
pub(crate) fn flood_alone() -> std::sync::MutexGuard<'static, ()> {
    static FLOOD: Mutex<()> = Mutex::new(());
    FLOOD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises this process's RLIMIT_NOFILE soft limit to the hard limit; panics if that is still
/// below `needed`.
pub(crate) fn raise_nofile_limit(needed: u64) {
    let (_, now) = super::raise_open_files_limit().expect("RLIMIT_NOFILE");
    assert!(
        now >= needed,
        "this test needs {needed} file descriptors; RLIMIT_NOFILE allows {now}"
    );
}

// ---- servers --------------------------------------------------------------------------------

fn state() -> Arc<HttpState> {
    state_as(Role::Health)
}

fn state_as(role: Role) -> Arc<HttpState> {
    Arc::new(HttpState {
        role,
        metrics: Arc::new(Metrics::new("1.2.3", &[Family::V4])),
        health: Arc::new(Health::new(
            DEFAULT_HEALTH_TIMEOUT,
            &[Family::V4],
            SystemTime::now(),
        )),
        configz: r#"{"kubeproxy.config.k8s.io":{"mode":"nftables"}}"#.into(),
    })
}

/// A health server (`Role::Health`).
fn start() -> (SocketAddr, Arc<HttpState>) {
    start_as(Role::Health)
}

fn start_as(role: Role) -> (SocketAddr, Arc<HttpState>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let state = state_as(role);
    let addr = serve_listener(listener, state.clone()).unwrap();
    (addr, state)
}

/// A server of [`HttpState`] with the given deadlines, stopped on drop.
fn start_with(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    Server::start_with(listener, state(), limits).unwrap()
}

/// semantics 8.7: kube-proxy's default 0.0.0.0:10256 is Go's one dual-stack socket, which
/// answers IPv6 clients too; so is ours. A specific address is bound as given.
#[test]
fn the_ipv4_wildcard_listens_on_both_families_as_in_go() {
    let state = state();
    let addr = serve("0.0.0.0:0", state.clone()).unwrap();
    assert!(addr.is_ipv6() && addr.ip().is_unspecified(), "{addr}");
    for ip in ["127.0.0.1", "::1"] {
        let to = SocketAddr::new(ip.parse().unwrap(), addr.port());
        assert_eq!(get(to, "/livez").status, 200, "{to}");
    }
    let specific = serve("127.0.0.1:0", state).unwrap();
    assert_eq!(specific.ip(), std::net::Ipv4Addr::LOCALHOST);
}

#[test]
fn metrics_endpoint() {
    let (addr, state) = start_as(Role::Metrics);
    state.metrics.map_update_error("services");
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], metrics::CONTENT_TYPE);
    assert_eq!(r.headers["connection"], "close");
    assert!(
        r.body
            .contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n")
    );
    assert!(
        r.body
            .contains("kube_bpf_proxy_map_update_errors_total{map=\"services\"} 1\n")
    );
    assert!(
        r.body
            .contains("kube_bpf_proxy_build_info{version=\"1.2.3\"} 1\n")
    );
    // Query strings are ignored.
    assert_eq!(get(addr, "/metrics?x=1").status, 200);
}

#[test]
fn health_endpoints() {
    let (addr, state) = start();
    for path in ["/healthz", "/livez"] {
        let r = get(addr, path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["healthy"], true);
        assert_eq!(v["status"]["IPv4"]["healthy"], true);
        assert!(v["currentTime"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v.get("nodeEligible").is_some(), path == "/healthz");
    }

    // A change queued long ago and never synced: both 503.
    state
        .health
        .queued(SystemTime::now() - DEFAULT_HEALTH_TIMEOUT - Duration::from_secs(1));
    for path in ["/healthz", "/livez"] {
        let r = get(addr, path);
        assert_eq!(r.status, 503, "{path}");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["healthy"], false);
    }

    // Synced, but the Node is going away: only /healthz fails.
    state.health.synced(SystemTime::now());
    state.health.set_node_eligible(false);
    assert_eq!(get(addr, "/healthz").status, 503);
    assert_eq!(get(addr, "/livez").status, 200);

    let text = state.metrics.render();
    assert!(text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 1\n"));
    assert!(text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 2\n"));
    assert!(text.contains("kubeproxy_proxy_livez_total{code=\"200\"} 2\n"));
    assert!(text.contains("kubeproxy_proxy_livez_total{code=\"503\"} 1\n"));
}

/// semantics 8.10: the metrics server's /configz, JSON; the health server has none.
#[test]
fn configz_on_the_metrics_server() {
    let (metrics, _) = start_as(Role::Metrics);
    let r = get(metrics, "/configz");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.body, r#"{"kubeproxy.config.k8s.io":{"mode":"nftables"}}"#);
    let (health, _) = start();
    assert_eq!(get(health, "/configz").status, 404);
}

#[test]
fn errors_and_methods() {
    let (addr, _) = start();
    assert_eq!(get(addr, "/nope").status, 404);

    // Any method, as kube-proxy's handlers (semantics 8.7, 8.10).
    let (metrics, _) = start_as(Role::Metrics);
    let r = raw(
        metrics,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let r = raw(addr, b"POST /livez HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(raw(addr, b"DELETE /nope HTTP/1.1\r\n\r\n").status, 404);

    let r = raw(addr, b"HEAD /livez HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(r.body.is_empty());
    assert!(r.headers["content-length"].parse::<usize>().unwrap() > 0);

    // HTTP/1.0 (answered in kind) and bare LF line ends are accepted.
    let r = raw(addr, b"GET /livez HTTP/1.0\n\n");
    assert_eq!((r.version.as_str(), r.status), ("HTTP/1.0", 200));
    assert!(!r.headers.contains_key("connection"));

    assert_eq!(raw(addr, b"garbage\r\n\r\n").status, 400);
    // hyper refuses any other version as malformed (the old server said 505).
    assert_eq!(raw(addr, b"GET /livez HTTP/2.0\r\n\r\n").status, 400);

    // An over-long head is refused without waiting for its end.
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(MAX_REQUEST_HEAD + 100, b'a');
    assert_eq!(raw(addr, &big).status, 431);
}

#[test]
fn partial_request_then_close_is_dropped_and_server_keeps_going() {
    let (addr, _) = start();
    {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metr").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty());
    }
    // Requests split over several writes are reassembled.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /livez HT").unwrap();
    thread::sleep(Duration::from_millis(50));
    s.write_all(b"TP/1.1\r\nHost: x\r\n").unwrap();
    thread::sleep(Duration::from_millis(50));
    s.write_all(b"\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    assert!(buf.starts_with("HTTP/1.1 200 OK\r\n"), "{buf}");
}

#[test]
fn concurrent_clients() {
    let (addr, _) = start_as(Role::Metrics);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..10 {
                    assert_eq!(get(addr, "/metrics").status, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// semantics 8.7, 8.10: the metrics server answers /metrics, a plain /healthz and /proxyMode;
/// the health server /healthz and /livez as JSON. Neither answers the other's other paths, so
/// metrics never show on the health server's (usually public) address.
#[test]
fn each_server_answers_its_own_paths() {
    let (metrics, state) = start_as(Role::Metrics);
    let r = get(metrics, "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    let r = get(metrics, "/proxyMode");
    assert_eq!((r.status, r.body.as_str()), (200, PROXY_MODE));
    assert_eq!(get(metrics, "/livez").status, 404);
    // component-base's healthz handler: its one check, `ping`, by name and verbosely.
    let r = get(metrics, "/healthz/ping");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let r = get(metrics, "/healthz?verbose");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "[+]ping ok\nhealthz check passed\n")
    );
    let r = get(
        metrics,
        "/healthz?verbose=1&exclude=ping&exclude=etcd&exclude=a%20b",
    );
    assert_eq!(
        r.body,
        "[+]ping excluded: ok\nwarn: some health checks cannot be excluded: no matches for \
         \"a b\",\"etcd\"\nhealthz check passed\n"
    );
    assert_eq!(get(metrics, "/healthz?exclude=ping").body, "ok");
    assert_eq!(get(metrics, "/healthz/log").status, 404);
    // The metrics server's /healthz says the process serves, not the proxy's health.
    state
        .health
        .queued(SystemTime::now() - DEFAULT_HEALTH_TIMEOUT - Duration::from_secs(1));
    assert_eq!(get(metrics, "/healthz").status, 200);

    let (health, _) = start();
    for path in ["/metrics", "/proxyMode", "/configz"] {
        assert_eq!(get(health, path).status, 404, "{path}");
    }
    assert_eq!(get(health, "/livez").status, 200);
}

#[test]
fn bind_failure_is_returned() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let state = Arc::new(HttpState {
        role: Role::Health,
        metrics: Arc::new(Metrics::new("v", &[])),
        health: Arc::new(Health::new(Duration::from_secs(1), &[], SystemTime::now())),
        configz: String::new(),
    });
    assert!(serve(taken.local_addr().unwrap(), state).is_err());
}

/// semantics 8.10: an address taken at start-up is tried again until it is free, then served.
#[test]
fn a_taken_address_is_served_once_it_is_free() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    assert!(serve(addr, state()).is_err());
    let (tx, rx) = std::sync::mpsc::channel();
    serve_when_free(
        addr.to_string(),
        state(),
        Duration::from_millis(20),
        move |local, attempts| tx.send((local, attempts)).unwrap(),
    );
    // Still taken: not served, and the holder keeps the port.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    drop(taken);
    let (local, attempts) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(local, addr);
    // Tried at least once while taken and once after (a starved retry thread may have tried
    // only once in the 200 ms).
    assert!(attempts >= 2, "{attempts}");
    assert_eq!(get(addr, "/livez").status, 200);
}

#[test]
fn header_names_are_written_as_go_writes_them() {
    // kube-proxy's answers come from Go's net/http: canonical header names.
    let (addr, _) = start();
    let r = get(addr, "/healthz");
    assert!(r.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", r.head);
    for line in [
        "Content-Type: application/json",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
        &format!("Content-Length: {}", r.body.len()),
    ] {
        assert!(
            r.head.contains(&format!("\r\n{line}")),
            "{line}:\n{}",
            r.head
        );
    }
    assert!(r.head.contains("\r\nDate: "), "{}", r.head);
}

#[test]
fn a_client_that_shuts_its_sending_side_is_answered() {
    let (addr, _) = start();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert_eq!(parse(&buf, false).status, 200);
}

/// Idle connections and connections that dribble an endless request line are closed once the
/// header deadline has passed since their accept, not before; meanwhile others are answered.
#[test]
fn idle_and_slow_loris_connections_are_closed_after_the_header_deadline() {
    const HEADER: Duration = Duration::from_millis(1500);
    let server = start_with(Limits {
        header: HEADER,
        connection: Duration::from_secs(30),
    });
    let addr = server.local_addr();
    let idle = hold_idle(addr, 50);
    let slow = SlowLoris::start(addr, 10);
    let (status, took) = timed_get(addr, "/livez");
    assert_eq!(status, 200);
    eprintln!("/livez with 60 connections waiting for their head: {took:?}");

    let held: Vec<&Held> = idle.iter().chain(&slow.held).collect();
    let closed = wait_closed(&held, HEADER + Duration::from_secs(10));
    let (first, last) = (closed.iter().min().unwrap(), closed.iter().max().unwrap());
    eprintln!("closed {first:?} to {last:?} after opening");
    assert!(
        *first >= HEADER,
        "closed after {first:?}, before the deadline"
    );
    // The server forgot them too.
    wait_until(Duration::from_secs(5), || {
        let n = server.open_connections();
        (n == 0, format!("{n} connections open"))
    });
    assert_eq!(get(addr, "/livez").status, 200);
}

/// A request whose body never arrives ends at the connection deadline.
#[test]
fn a_stalled_body_is_cut_at_the_connection_deadline() {
    const CONNECTION: Duration = Duration::from_secs(4);
    let server = start_with(Limits {
        header: Duration::from_secs(2),
        connection: CONNECTION,
    });
    let stalled = hold_idle(server.local_addr(), 1);
    (&stalled[0].stream)
        .write_all(b"POST /livez HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        .unwrap();
    let closed = wait_closed(&[&stalled[0]], CONNECTION + Duration::from_secs(10));
    assert!(closed[0] >= CONNECTION, "closed after {:?}", closed[0]);
}

#[test]
fn oversized_requests_are_refused() {
    let (addr, _) = start();
    // Within the limits: read, dropped, and answered.
    let mut small = b"POST /livez HTTP/1.1\r\nContent-Length: 1000\r\n\r\n".to_vec();
    small.resize(small.len() + 1000, b'x');
    assert_eq!(raw(addr, &small).status, 200);

    // A declared body over the limit is refused without reading it.
    let r = raw(
        addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n",
    );
    assert_eq!(r.status, 413);

    // More than 100 header lines.
    let mut many = b"GET /livez HTTP/1.1\r\n".to_vec();
    for i in 0..101 {
        many.extend_from_slice(format!("X-{i}: a\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(raw(addr, &many).status, 431);

    // Too large to be read: either the 431 arrives or the connection is reset under it, never
    // an answer from a handler.
    let mut huge_header = b"GET /livez HTTP/1.1\r\nX-Big: ".to_vec();
    huge_header.resize(1024 * 1024, b'a');
    let mut chunked = b"POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    chunked.extend_from_slice(format!("{:x}\r\n", 2 * MAX_REQUEST_BODY).as_bytes());
    chunked.resize(chunked.len() + 2 * MAX_REQUEST_BODY, b'x');
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    for (request, refusal) in [(huge_header, 431), (chunked, 413)] {
        let (answer, end) = exchange(addr, request);
        match status_of(&answer) {
            Some(status) => assert_eq!(status, refusal),
            None => assert_eq!(
                end.as_ref().map(io::Error::kind),
                Some(ErrorKind::ConnectionReset)
            ),
        }
    }
    assert_eq!(get(addr, "/livez").status, 200);
}

/// Nothing a client sends makes the server panic or stop answering; what each input gets.
#[test]
fn malformed_requests_are_answered_or_dropped() {
    // Deadlines far above a busy machine's scheduling delays: each request is written by a
    // thread of its own, which must get its turn before the header deadline.
    let server = start_with(Limits {
        header: Duration::from_secs(2),
        connection: Duration::from_secs(5),
    });
    let addr = server.local_addr();
    let cases: &[(&[u8], Option<u16>)] = &[
        (b"\x00\x01\x02\xff\xfe\r\n\r\n", Some(400)),
        (b"GET /\xff\xfe HTTP/1.1\r\n\r\n", Some(400)),
        (b"GET /livez HTTP/1.1\r\nHost: a\rb\r\n\r\n", Some(400)),
        (b"GET /livez HTTP/1.1\r\n: empty\r\n\r\n", Some(400)),
        (
            b"GET /livez HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            Some(400),
        ),
        (
            b"POST /livez HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            Some(400),
        ),
        (
            b"POST /livez HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
            Some(400),
        ),
        // An HTTP/2 client: closed, no HTTP/1 answer.
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None),
        // Blank lines only, then nothing: the header deadline.
        (b"\r\n\r\n\r\n", None),
        (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", Some(404)),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", Some(200)),
        (
            b"GET http://example.com/livez?x HTTP/1.1\r\n\r\n",
            Some(200),
        ),
    ];
    for (request, expected) in cases {
        let (answer, _) = exchange(addr, request.to_vec());
        assert_eq!(
            status_of(&answer),
            *expected,
            "{:?} got {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(get(addr, "/livez").status, 200);
}

#[test]
fn a_response_hyper_cannot_send_becomes_a_500() {
    let mut bad_header = Response::text(200, "x");
    bad_header
        .extra_headers
        .push(("X-Weight", "1\r\nInjected: yes".into()));
    for r in [bad_header, Response::text(1000, "x")] {
        assert_eq!(into_hyper(r).status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}

/// A flood of connections that send nothing, more than one listener keeps: the oldest are
/// closed to take new ones, so the listener never holds more than its cap and a probe is
/// still answered at once.
#[test]
fn beyond_the_cap_the_oldest_silent_connections_make_room() {
    const EXTRA: usize = 50;
    let _flood = flood_alone();
    raise_nofile_limit(4 * (MAX_OPEN_PER_LISTENER + EXTRA) as u64 + 1000);
    let server = start_with(Limits::DEFAULT);
    let addr = server.local_addr();
    let idle = hold_idle(addr, MAX_OPEN_PER_LISTENER + EXTRA);
    wait_until(Duration::from_secs(10), || {
        let open = server.open_connections();
        (
            open == MAX_OPEN_PER_LISTENER,
            format!("{open} open of {}", idle.len()),
        )
    });
    // The first ones went (closed by the server), the last ones are still held.
    let first: Vec<&Held> = idle.iter().take(EXTRA).collect();
    wait_closed(&first, Duration::from_secs(5));
    // A probe is answered at once (a second's SYN retry, or waiting for the header deadline
    // of a held connection, would show).
    let (status, took) = timed_get(addr, "/healthz");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(server.open_connections() <= MAX_OPEN_PER_LISTENER);
}

/// Probes every second for months leave no more tasks behind than the cap allows: finished
/// connections are dropped as new ones come, also behind a long-lived one.
#[test]
fn finished_connections_are_not_kept() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut tracked = Tracked::default();
        let long_lived = tokio::spawn(std::future::pending::<()>());
        tracked.push(long_lived, Arc::new(AtomicBool::new(true)));
        for _ in 0..5 * MAX_OPEN_PER_LISTENER {
            let task = tokio::spawn(async {});
            while !task.is_finished() {
                tokio::task::yield_now().await;
            }
            tracked.push(task, Arc::new(AtomicBool::new(true)));
            assert!(
                tracked.len() <= 2 * MAX_OPEN_PER_LISTENER,
                "{}",
                tracked.len()
            );
        }
    });
}

/// At the cap the oldest connection still silent is closed, and gone (its count with it) when
/// the call returns; connections whose request came in are left alone.
#[test]
fn the_oldest_silent_connection_is_gone_when_room_is_made() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let open = Arc::new(AtomicUsize::new(0));
        let mut tracked = Tracked::default();
        for answering in [true, false, false] {
            let guard = OpenGuard::new(&open);
            let task = tokio::spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await
            });
            tracked.push(task, Arc::new(AtomicBool::new(answering)));
        }
        assert!(tracked.close_oldest_silent().await);
        assert_eq!(open.load(Ordering::Acquire), 2);
        assert!(tracked.close_oldest_silent().await);
        assert_eq!(open.load(Ordering::Acquire), 1);
        // Only the one being answered is left.
        assert!(!tracked.close_oldest_silent().await);
        assert_eq!(open.load(Ordering::Acquire), 1);
        assert_eq!(tracked.len(), 1);
    });
}
