//! HTTP/1 for kube-proxy's two servers (/metrics, /healthz, /livez, /proxyMode: [`Role`]), and
//! for the per-Service health check servers of [`crate::healthcheck`] through [`Handler`]:
//! hyper on one small tokio runtime owned by this module, so the thread-based rest of the agent
//! only hands it bound listeners.
//!
//! Each listener has an accept task and each connection a task of its own, up to
//! [`MAX_OPEN_PER_LISTENER`] open at once per listener: beyond, the oldest connection that has
//! sent no request is closed for the new one. So a flood of connections to one port (/healthz
//! on every address, say) neither holds off a load balancer's probes there nor uses up the
//! process's file descriptors for the other ports (the health check ports).
//! Per connection: the request head must arrive within [`HEADER_DEADLINE`] of the accept and
//! fit in [`MAX_REQUEST_HEAD`] bytes (else 431); a request body is read and dropped, up to
//! [`MAX_REQUEST_BODY`] bytes (else 413); the whole exchange must be over within
//! [`CONNECTION_DEADLINE`]. A connection carries one request: responses to HTTP/1.1 say
//! `Connection: close`, so no connection sits idle between requests.

use std::{
    convert::Infallible,
    io,
    net::{SocketAddr, TcpListener, ToSocketAddrs},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    StatusCode,
    body::{Body as _, Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::runtime::{Handle, Runtime};

use crate::{
    health::{Health, Probe},
    metrics::{self, Metrics},
};

/// Largest accepted request line plus headers.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Largest request body read (and dropped); nothing here needs one.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Time a client has, from the accept, to send its request head.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(10);
/// Time a connection may live, from the accept to the end of the response.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// Connections one listener keeps open at once (see the module's documentation). A load
/// balancer's probes need a handful.
pub const MAX_OPEN_PER_LISTENER: usize = 1024;
/// Least time between two warnings of failed accepts on one listener.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);
/// Pause after a failed accept (e.g. EMFILE), so the accept task does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Worker threads of the runtime: two, so rendering /metrics never holds up /healthz.
const WORKER_THREADS: usize = 2;

/// What the server answers from.
pub struct HttpState {
    pub role: Role,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// What /configz answers on the metrics server: a JSON document of the settings the
    /// agent runs with (semantics 8.10).
    pub configz: String,
}

/// Which of kube-proxy's two servers a listener is (semantics 8.7, 8.10): each answers its own
/// paths only, so the metrics stay on the (loopback) metrics address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `--metrics-bind-address`: /metrics, /healthz (plain `ok` while the process serves),
    /// /proxyMode and /configz.
    Metrics,
    /// `--healthz-bind-address`: /healthz and /livez, the proxy's health as JSON, 200 or 503.
    Health,
}

/// What /proxyMode answers: the kube-proxy mode whose Service behaviour this proxy follows
/// where the modes differ (tools such as the Kubernetes e2e suite read it to know what to
/// expect).
pub const PROXY_MODE: &str = "nftables";

/// Pause between attempts to bind an address that was taken (kube-proxy's, semantics 8.10).
pub const BIND_RETRY: Duration = Duration::from_secs(5);

/// Binds `addr` and serves `state` on it for the life of the process. Bind errors are
/// returned (the caller decides whether they are fatal); the address bound is returned.
pub fn serve(addr: impl ToSocketAddrs, state: Arc<HttpState>) -> io::Result<SocketAddr> {
    serve_listener(bind_like_go(addr)?, state)
}

/// A listening socket on `addr` as Go's `net.Listen("tcp", addr)` (so kube-proxy) makes it:
/// the IPv4 wildcard `0.0.0.0:port` becomes one dual-stack `[::]:port` socket (IPV6_V6ONLY
/// off), so kube-proxy's default `0.0.0.0:10256` answers over IPv6 as well (semantics 8.7); a
/// kernel without IPv6 gets `0.0.0.0:port`. Any other address is bound as given.
pub fn bind_like_go(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        let bound = match a {
            SocketAddr::V4(v4) if v4.ip().is_unspecified() => {
                dual_stack(v4.port()).or_else(|_| TcpListener::bind(a))
            }
            _ => TcpListener::bind(a),
        };
        match bound {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind")))
}

/// `[::]:port` with IPV6_V6ONLY off, whatever `net.ipv6.bindv6only` says.
pub(crate) fn dual_stack(port: u16) -> io::Result<TcpListener> {
    let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    socket.set_only_v6(false)?;
    // As std's TcpListener::bind: a restarted agent can rebind while old connections linger.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// [`serve`] once `addr` can be bound: tries every `every` from a thread of its own, and calls
/// `bound` with the address and the number of attempts it took (the caller's first failed one
/// included). For an address taken at start-up, for example by the kube-proxy this proxy
/// replaces, until it exits.
pub fn serve_when_free(
    addr: String,
    state: Arc<HttpState>,
    every: Duration,
    bound: impl FnOnce(SocketAddr, u32) + Send + 'static,
) {
    std::thread::spawn(move || {
        let mut attempts = 1;
        loop {
            std::thread::sleep(every);
            attempts += 1;
            match serve(addr.as_str(), Arc::clone(&state)) {
                Ok(local) => return bound(local, attempts),
                Err(e) if attempts % 12 == 0 => {
                    log::warn!("http: still cannot bind {addr} after {attempts} attempts: {e}");
                }
                Err(_) => {}
            }
        }
    });
}

/// [`serve`] on an already bound listener.
pub fn serve_listener(listener: TcpListener, state: Arc<HttpState>) -> io::Result<SocketAddr> {
    let server = Server::start(listener, state)?;
    let addr = server.local_addr();
    server.detach();
    Ok(addr)
}

/// One request, as a [`Handler`] sees it.
pub(crate) struct Request<'a> {
    pub method: &'a str,
    /// The request target's path, without query string.
    pub path: &'a str,
    /// The query string (after `?`), if any.
    pub query: Option<&'a str>,
    /// The address the client connected to (an IPv4 one as v4-mapped on a dual-stack socket).
    pub local: Option<SocketAddr>,
}

/// Answers requests whose head parsed (and whose body, if any, was within the limit); HEAD
/// responses lose their body on the way out.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(&self, request: &Request<'_>) -> Response;
}

/// A response about to be written. Content-Length and `X-Content-Type-Options: nosniff` are
/// always added, and `Connection: close` in answer to HTTP/1.1.
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

/// How long a connection may take; [`Limits::DEFAULT`] everywhere but in tests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// From the accept until the request head has been read.
    pub header: Duration,
    /// From the accept until the response has been written.
    pub connection: Duration,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        header: HEADER_DEADLINE,
        connection: CONNECTION_DEADLINE,
    };
}

/// The runtime every server runs on, started at first use. Its threads inherit the
/// capabilities of the thread that starts it; `cli::run` starts the servers after dropping
/// capabilities, so they hold the reduced set.
fn runtime() -> io::Result<Handle> {
    static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(runtime) = &*slot {
        return Ok(runtime.handle().clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name("http")
        .enable_io()
        .enable_time()
        .build()?;
    Ok(slot.insert(runtime).handle().clone())
}

/// A listener being served, stopped by [`Server::stop`] or drop: the health check servers come
/// and go with Services, unlike /metrics and /healthz.
pub(crate) struct Server {
    runtime: Handle,
    accept: Option<tokio::task::JoinHandle<()>>,
    addr: SocketAddr,
    /// Connections accepted and not closed yet.
    #[cfg_attr(not(test), expect(dead_code, reason = "only tests read it"))]
    open: Arc<AtomicUsize>,
}

impl Server {
    /// Serves `handler` on `listener` until [`Server::stop`] (or drop).
    pub fn start(listener: TcpListener, handler: Arc<dyn Handler>) -> io::Result<Server> {
        Server::start_with(listener, handler, Limits::DEFAULT)
    }

    /// [`Server::start`] with other deadlines.
    pub(crate) fn start_with(
        listener: TcpListener,
        handler: Arc<dyn Handler>,
        limits: Limits,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        // An accept queue as long as the system allows (net.core.somaxconn), as Go's listeners
        // (so kube-proxy's) have: with std's 128, a burst of connections has SYNs dropped, and
        // a probe among them waits a second for its retry.
        // SAFETY: listen(2) again on a listening socket only sets its backlog, which the kernel
        // caps at somaxconn.
        if unsafe { libc::listen(listener.as_raw_fd(), libc::c_int::MAX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        listener.set_nonblocking(true)?;
        let runtime = runtime()?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let open = Arc::new(AtomicUsize::new(0));
        let accept = runtime.spawn(accept_loop(listener, handler, limits, Arc::clone(&open)));
        Ok(Server {
            runtime,
            accept: Some(accept),
            addr,
            open,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted and not closed yet.
    #[cfg(test)]
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Keeps serving for the life of the process.
    fn detach(mut self) {
        // Dropping a task's JoinHandle leaves the task running.
        self.accept = None;
    }

    /// Stops accepting and closes the listening socket before returning, so the port is free
    /// again. Connections already accepted finish on their own, within their deadlines.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        accept.abort();
        // The task's JoinHandle completes once the task, and the listener it owns, has been
        // dropped. Waiting for that from inside a runtime would block one of its threads;
        // there the port closes a moment later instead.
        if Handle::try_current().is_err() {
            let _ = self.runtime.block_on(accept);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> OpenGuard {
        open.fetch_add(1, Ordering::AcqRel);
        OpenGuard(Arc::clone(open))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    handler: Arc<dyn Handler>,
    limits: Limits,
    open: Arc<AtomicUsize>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header)
        .max_header_size(MAX_REQUEST_HEAD)
        .keep_alive(false)
        // A client that shuts its sending side after the request still gets the answer.
        .half_close(true)
        // Header names as Go's net/http (kube-proxy) writes them.
        .title_case_headers(true);
    // Failed accepts (out of file descriptors, say) and a full listener are warned about once
    // a minute at most.
    let mut warned: Option<tokio::time::Instant> = None;
    let mut crowded: Option<tokio::time::Instant> = None;
    let mut tracked = Tracked::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if warned.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                    warned = Some(tokio::time::Instant::now());
                    log::warn!(
                        "http: accept on {:?} failed: {e}",
                        listener.local_addr().ok()
                    );
                } else {
                    log::debug!("http accept: {e}");
                }
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        // At the cap, the oldest connection that has not sent its request yet makes room: a
        // probe sends its request at once and is answered within milliseconds, so the
        // connections a flood holds open go first. With none such (every one being answered),
        // the new one is closed.
        if open.load(Ordering::Acquire) >= MAX_OPEN_PER_LISTENER {
            let taken = tracked.close_oldest_silent().await;
            if crowded.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                crowded = Some(tokio::time::Instant::now());
                log::warn!(
                    "http: {MAX_OPEN_PER_LISTENER} connections open on {:?}; {}",
                    listener.local_addr().ok(),
                    if taken {
                        "closing the oldest that sent no request to take new ones"
                    } else {
                        "every one is being answered: new ones are closed"
                    }
                );
            }
            if !taken {
                drop(stream);
                continue;
            }
        }
        let asked = Arc::new(AtomicBool::new(false));
        let handler = Arc::clone(&handler);
        let local = stream.local_addr().ok();
        let service = {
            let asked = Arc::clone(&asked);
            service_fn(move |request| {
                answer(Arc::clone(&handler), request, local, Arc::clone(&asked))
            })
        };
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let guard = OpenGuard::new(&open);
        let task = tokio::spawn(async move {
            let _guard = guard;
            match tokio::time::timeout(limits.connection, connection).await {
                Ok(Ok(())) => {}
                // Header deadline, malformed or too large head (answered 400 or 431 first),
                // client gone.
                Ok(Err(e)) => log::debug!("http connection: {e}"),
                Err(_) => log::debug!(
                    "http connection: not done after {:?}, closed",
                    limits.connection
                ),
            }
            // Dropping the connection closes the socket.
        });
        tracked.push(task, asked);
    }
}

/// Raises the soft limit of open files to the hard one, as Go's runtime does for kube-proxy:
/// the health check servers, the API connections, netlink sockets and map file descriptors
/// all count against it, and a container's usual soft limit (1,024) is soon reached by a flood
/// of connections. Returns the soft limit before and after.
pub fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) and setrlimit(2) with a pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        let before = limit.rlim_cur;
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok((before, limit.rlim_cur))
    }
}

/// A connection's task, and whether its request has arrived.
/// The connection tasks of one listener, oldest first, each with whether its request has
/// come in. Finished tasks are dropped as new ones come, so a listener probed every second for
/// months holds no more than its open connections and as many finished ones.
#[derive(Default)]
struct Tracked(std::collections::VecDeque<(tokio::task::JoinHandle<()>, Arc<AtomicBool>)>);

impl Tracked {
    fn push(&mut self, task: tokio::task::JoinHandle<()>, asked: Arc<AtomicBool>) {
        while self.0.front().is_some_and(|(t, _)| t.is_finished()) {
            self.0.pop_front();
        }
        // A long-lived connection at the front keeps finished ones behind it; sweeping them
        // all when the queue has doubled past the cap costs O(1) per connection.
        if self.0.len() >= 2 * MAX_OPEN_PER_LISTENER {
            self.0.retain(|(t, _)| !t.is_finished());
        }
        self.0.push_back((task, asked));
    }

    /// Closes the oldest connection that has not sent its request yet and returns once it is
    /// gone; false when every open one has sent its request.
    async fn close_oldest_silent(&mut self) -> bool {
        self.0.retain(|(t, _)| !t.is_finished());
        let oldest = self
            .0
            .iter()
            .position(|(_, asked)| !asked.load(Ordering::Acquire));
        let Some((task, _)) = oldest.and_then(|i| self.0.remove(i)) else {
            return false;
        };
        // Aborting only asks: the task (its socket and its count) goes at its next poll.
        // Waiting for that keeps the count, and the descriptors, within the cap at every
        // moment, not just a moment later.
        task.abort();
        let _ = task.await;
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Reads and drops the request body (closing a socket with unread input sends a reset, which
/// can destroy the response in flight), then asks `handler`.
async fn answer(
    handler: Arc<dyn Handler>,
    request: hyper::Request<Incoming>,
    local: Option<SocketAddr>,
    asked: Arc<AtomicBool>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let (head, body) = request.into_parts();
    let too_large = || Response::text(413, "request body too large\n");
    let response = if body.size_hint().lower() > MAX_REQUEST_BODY as u64 {
        too_large()
    } else {
        let body = Limited::new(body, MAX_REQUEST_BODY).collect().await;
        // The whole request is in: from here the answer is immediate, so this connection is
        // not one to close for room (a body trickled in slowly leaves it closable till now).
        asked.store(true, Ordering::Release);
        match body {
            Ok(_) => handler.handle(&Request {
                method: head.method.as_str(),
                path: head.uri.path(),
                query: head.uri.query(),
                local,
            }),
            Err(e) if e.is::<LengthLimitError>() => too_large(),
            // A broken body (bad chunk, client gone): nobody may be reading, but say why.
            Err(_) => Response::text(400, "bad request\n"),
        }
    };
    Ok(into_hyper(response))
}

fn into_hyper(r: Response) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder()
        .status(r.status)
        .header(header::CONTENT_TYPE, r.content_type)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    for (name, value) in r.extra_headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::from(r.body)))
        .unwrap_or_else(|e| {
            // An invalid status or header value: a bug here, not the client's fault.
            log::warn!("http: cannot send a response: {e}");
            let mut fallback =
                hyper::Response::new(Full::new(Bytes::from_static(b"internal server error\n")));
            *fallback.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            fallback
        })
}

/// The metrics server's /healthz, as kube-proxy's (component-base's healthz handler with its
/// one check, `ping`, which always passes; semantics 8.10): `ok`, or with `verbose` in the
/// query each check's line and the verdict; `exclude=NAME` (once per name) marks a check
/// excluded and warns about names that match none.
fn metrics_healthz(query: Option<&str>) -> String {
    let mut verbose = false;
    let mut excluded: Vec<String> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "verbose" => verbose = true,
            "exclude" => excluded.push(value.into_owned()),
            _ => {}
        }
    }
    if !verbose {
        return "ok".into();
    }
    let mut out = String::new();
    let ping_excluded = excluded.iter().any(|e| e == "ping");
    excluded.retain(|e| e != "ping");
    excluded.sort();
    excluded.dedup();
    if ping_excluded {
        out.push_str("[+]ping excluded: ok\n");
    } else {
        out.push_str("[+]ping ok\n");
    }
    if !excluded.is_empty() {
        let names: Vec<String> = excluded.iter().map(|e| format!("{e:?}")).collect();
        out.push_str(&format!(
            "warn: some health checks cannot be excluded: no matches for {}\n",
            names.join(",")
        ));
    }
    out.push_str("healthz check passed\n");
    out
}

impl Handler for HttpState {
    /// The paths of the server's [`Role`], whatever the method, as kube-proxy's handlers answer
    /// any (semantics 8.7, 8.10); a HEAD's answer goes without its body.
    fn handle(&self, request: &Request<'_>) -> Response {
        let path = request.path;
        if request.method == "OPTIONS" && path == "*" {
            // Answered by Go's server itself, before any handler.
            return Response::text(200, "");
        }
        match (self.role, path) {
            (Role::Metrics, "/metrics") => Response {
                status: 200,
                content_type: metrics::CONTENT_TYPE,
                extra_headers: Vec::new(),
                body: self.metrics.render().into_bytes(),
            },
            (Role::Metrics, "/healthz") => Response::text(200, &metrics_healthz(request.query)),
            (Role::Metrics, "/healthz/ping") => Response::text(200, "ok"),
            (Role::Metrics, "/proxyMode") => Response::text(200, PROXY_MODE),
            (Role::Metrics, "/configz") => Response {
                status: 200,
                content_type: "application/json",
                extra_headers: Vec::new(),
                body: self.configz.clone().into_bytes(),
            },
            (Role::Health, "/healthz" | "/livez") => {
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

#[cfg(test)]
pub(crate) mod tests;
