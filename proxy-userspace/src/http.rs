//! A minimal HTTP/1.1 server on std's TcpListener: /metrics, /healthz and /livez here, and the
//! per-Service health check servers of [`crate::healthcheck`] through [`Handler`].
//!
//! One thread accepts; each connection gets a short-lived thread (at most
//! [`MAX_CONNECTIONS`] at once; beyond that new connections are closed unanswered). A request
//! head may be at most [`MAX_REQUEST_HEAD`] bytes and must arrive within [`REQUEST_DEADLINE`].
//! Request bodies are never read. Every response closes the connection.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    health::{Health, Probe},
    metrics::{self, Metrics},
};

/// Largest accepted request line plus headers.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Time allowed for writing a response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, and how much, a closing connection's remaining input is drained.
const LINGER: Duration = Duration::from_millis(500);
const MAX_DRAIN: usize = 64 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// What the server answers from.
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// Binds `addr` and serves `state` on a background thread. Bind errors are returned (the
/// caller decides whether they are fatal); the thread runs for the life of the process.
pub fn serve(addr: impl ToSocketAddrs, state: Arc<HttpState>) -> io::Result<JoinHandle<()>> {
    serve_listener(TcpListener::bind(addr)?, state)
}

/// [`serve`] on an already bound listener.
pub fn serve_listener(listener: TcpListener, state: Arc<HttpState>) -> io::Result<JoinHandle<()>> {
    spawn_accept(Arc::new(listener), state, Arc::new(AtomicBool::new(false)))
}

/// One parsed request, as a [`Handler`] sees it.
pub(crate) struct Request<'a> {
    pub method: &'a str,
    /// The request target without query string or fragment.
    pub path: &'a str,
}

/// Answers requests whose head parsed; HEAD responses lose their body afterwards.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(&self, request: &Request<'_>) -> Response;
}

/// A server started by [`Server::start`] that can be stopped: the health check servers come
/// and go with Services, unlike /metrics and /healthz.
pub(crate) struct Server {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `handler` on `listener` until [`Server::stop`] (or drop).
    pub fn start(listener: TcpListener, handler: Arc<dyn Handler>) -> io::Result<Server> {
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = spawn_accept(Arc::clone(&listener), handler, Arc::clone(&stop))?;
        Ok(Server {
            listener,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and closes the listening socket before returning, so the port is free
    /// again (connections being answered finish on their own threads).
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::Release);
        // Shutting a listening socket down makes a blocked accept() fail at once (Linux); the
        // loop then sees the flag.
        // SAFETY: shutdown(2) on a descriptor this Server keeps open.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = thread.join();
        // The accept thread's reference is gone; dropping ours closes the socket.
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shut();
    }
}

fn spawn_accept(
    listener: Arc<TcpListener>,
    handler: Arc<dyn Handler>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let name = match listener.local_addr() {
        Ok(a) => format!("http {a}"),
        Err(_) => "http".into(),
    };
    thread::Builder::new()
        .name(name)
        .spawn(move || accept_loop(&listener, handler, &stop))
}

fn accept_loop(listener: &TcpListener, handler: Arc<dyn Handler>, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // E.g. EMFILE; don't spin.
                log::debug!("http accept: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            drop(stream);
            continue;
        }
        let handler = handler.clone();
        let guard = ActiveGuard(active.clone());
        let spawned = thread::Builder::new()
            .name("http conn".into())
            .spawn(move || {
                let _guard = guard;
                if let Err(e) = handle_connection(stream, handler.as_ref()) {
                    log::debug!("http connection: {e}");
                }
            });
        if let Err(e) = spawned {
            // The closure, stream and guard were dropped with the error.
            log::warn!("http: cannot start a connection thread: {e}");
        }
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response about to be written. Content-Length, `X-Content-Type-Options: nosniff` and
/// `Connection: close` are always added.
pub(crate) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub extra_headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    TimedOut,
    Closed,
}

/// Reads until the blank line ending the request head, within the size and time limits.
fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = vec![0u8; MAX_REQUEST_HEAD];
    let mut len = 0;
    loop {
        if let Some(end) = head_end(&buf[..len]) {
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        if len == buf.len() {
            return Ok(Head::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Head::TimedOut);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Head::TimedOut);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Length of the head including its terminating blank line (CRLF CRLF, or bare LF LF).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn handle_connection(mut stream: TcpStream, handler: &dyn Handler) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let (response, head_only) = match read_head(&mut stream)? {
        Head::Closed => return Ok(()),
        Head::TimedOut => (Response::text(408, "request timeout\n"), false),
        Head::TooLarge => (Response::text(431, "request head too large\n"), false),
        Head::Complete(head) => respond(&head, handler),
    };
    write_response(&mut stream, &response, head_only)?;
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Write);
    drain(&mut stream);
    Ok(())
}

/// Reads (and discards) what the client still sends, briefly, before closing: closing a
/// socket with unread input sends a reset, which can destroy the response in flight.
fn drain(stream: &mut TcpStream) {
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < MAX_DRAIN {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// Parses one request head and asks `handler`; the bool is true for HEAD (headers only).
fn respond(head: &[u8], handler: &dyn Handler) -> (Response, bool) {
    let Ok(head) = std::str::from_utf8(head) else {
        return (Response::text(400, "bad request\n"), false);
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (Response::text(400, "bad request\n"), false);
    };
    if !version.starts_with("HTTP/") {
        return (Response::text(400, "bad request\n"), false);
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return (Response::text(505, "HTTP version not supported\n"), false);
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    let response = handler.handle(&Request { method, path });
    (response, method == "HEAD")
}

impl Handler for HttpState {
    /// GET (and HEAD) of /metrics, /healthz and /livez.
    fn handle(&self, request: &Request<'_>) -> Response {
        let path = request.path;
        if !matches!(request.method, "GET" | "HEAD") {
            let mut r = Response::text(405, "method not allowed\n");
            r.extra_headers.push(("Allow", "GET, HEAD".into()));
            return r;
        }
        match path {
            "/metrics" => Response {
                status: 200,
                content_type: metrics::CONTENT_TYPE,
                extra_headers: Vec::new(),
                body: self.metrics.render().into_bytes(),
            },
            "/healthz" | "/livez" => {
                let probe = if path == "/livez" {
                    Probe::Livez
                } else {
                    Probe::Healthz
                };
                let (status, body) = self.health.probe(probe, SystemTime::now());
                self.metrics
                    .count_health_request(probe == Probe::Livez, status);
                Response {
                    status,
                    content_type: "application/json",
                    extra_headers: Vec::new(),
                    body: body.into_bytes(),
                }
            }
            _ => Response::text(404, "404 page not found\n"),
        }
    }
}

fn write_response(stream: &mut TcpStream, r: &Response, head_only: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    for (k, v) in &r.extra_headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&r.body);
    }
    stream.write_all(&bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{compile::Family, health::DEFAULT_HEALTH_TIMEOUT};

    struct Reply {
        status: u16,
        headers: BTreeMap<String, String>,
        body: String,
    }

    fn start() -> (std::net::SocketAddr, Arc<HttpState>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(HttpState {
            metrics: Arc::new(Metrics::new("1.2.3", &[Family::V4])),
            health: Arc::new(Health::new(
                DEFAULT_HEALTH_TIMEOUT,
                &[Family::V4],
                SystemTime::now(),
            )),
        });
        serve_listener(listener, state.clone()).unwrap();
        (addr, state)
    }

    /// Sends raw bytes, reads until the server closes, parses the response.
    fn raw(addr: std::net::SocketAddr, request: &[u8]) -> Reply {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(request).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("head/body");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status = status_line[9..12].parse().unwrap();
        let headers: BTreeMap<String, String> = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap();
                (k.to_ascii_lowercase(), v.to_string())
            })
            .collect();
        if let Some(len) = headers.get("content-length")
            && !request.starts_with(b"HEAD ")
        {
            assert_eq!(len.parse::<usize>().unwrap(), body.len());
        }
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> Reply {
        raw(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: t\r\n\r\n").as_bytes(),
        )
    }

    #[test]
    fn metrics_endpoint() {
        let (addr, state) = start();
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

    #[test]
    fn errors_and_methods() {
        let (addr, _) = start();
        assert_eq!(get(addr, "/nope").status, 404);

        let r = raw(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(r.status, 405);
        assert_eq!(r.headers["allow"], "GET, HEAD");

        let r = raw(addr, b"HEAD /livez HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(r.body.is_empty());
        assert!(r.headers["content-length"].parse::<usize>().unwrap() > 0);

        // HTTP/1.0 and bare LF line ends are accepted.
        assert_eq!(raw(addr, b"GET /livez HTTP/1.0\n\n").status, 200);

        assert_eq!(raw(addr, b"garbage\r\n\r\n").status, 400);
        assert_eq!(raw(addr, b"GET /livez HTTP/2.0\r\n\r\n").status, 505);

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
        let (addr, _) = start();
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

    #[test]
    fn bind_failure_is_returned() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let state = Arc::new(HttpState {
            metrics: Arc::new(Metrics::new("v", &[])),
            health: Arc::new(Health::new(Duration::from_secs(1), &[], SystemTime::now())),
        });
        assert!(serve(taken.local_addr().unwrap(), state).is_err());
    }

    #[test]
    fn head_end_detection() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }
}
