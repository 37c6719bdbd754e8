//! An in-process stand-in for the Kubernetes API server, just enough for list + watch of
//! Services, EndpointSlices and Nodes, over plain HTTP/1.1 on 127.0.0.1.
//!
//! It behaves like the real one where the source can tell: a list returns the objects and the
//! current resourceVersion; `?watch=true&resourceVersion=N` streams (chunked, one JSON event per
//! line) every change after N and then live ones; a resourceVersion older than the last
//! compaction gets an ERROR event with a 410 `Expired` Status. Faults are injected by the test:
//! failing every request, holding lists, expiring or cutting live watches, changing objects
//! without telling anyone (as if those events had been compacted away), and outages in which the
//! server is gone (connections refused) or resets every connection it accepts. Objects are
//! JSON values stored as given, so a test can serve one the client cannot decode.

#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Res {
    Services,
    Slices,
    Nodes,
    Pods,
    Namespaces,
    ServiceCidrs,
}

impl Res {
    /// The kinds the first snapshot waits for.
    pub const ALL: [Res; 3] = [Res::Services, Res::Slices, Res::Nodes];

    fn from_path(path: &str) -> Option<Res> {
        match path {
            "/api/v1/services" => Some(Res::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Res::Slices),
            "/api/v1/nodes" => Some(Res::Nodes),
            "/api/v1/pods" => Some(Res::Pods),
            "/api/v1/namespaces" => Some(Res::Namespaces),
            "/apis/networking.k8s.io/v1/servicecidrs" => Some(Res::ServiceCidrs),
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Res::Services => ("ServiceList", "v1"),
            Res::Slices => ("EndpointSliceList", "discovery.k8s.io/v1"),
            Res::Nodes => ("NodeList", "v1"),
            Res::Pods => ("PodList", "v1"),
            Res::Namespaces => ("NamespaceList", "v1"),
            Res::ServiceCidrs => ("ServiceCIDRList", "networking.k8s.io/v1"),
        }
    }

    fn kind(self) -> (&'static str, &'static str) {
        match self {
            Res::Services => ("Service", "v1"),
            Res::Slices => ("EndpointSlice", "discovery.k8s.io/v1"),
            Res::Nodes => ("Node", "v1"),
            Res::Pods => ("Pod", "v1"),
            Res::Namespaces => ("Namespace", "v1"),
            Res::ServiceCidrs => ("ServiceCIDR", "networking.k8s.io/v1"),
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub res: Option<Res>,
    pub watch: bool,
    pub resource_version: Option<String>,
    pub bookmarks: bool,
    /// `?labelSelector=`, decoded.
    pub label_selector: Option<String>,
    /// HTTP status sent (0: a list that arrived while lists were held); for watches, 200 even
    /// when the stream then carries a 410 ERROR.
    pub status: u16,
    /// For watches: the stream began with a 410 ERROR event.
    pub expired: bool,
    /// When the request's head was read.
    pub at: std::time::Instant,
}

enum Msg {
    /// One JSON line to send.
    Line(String),
    /// End the stream cleanly (terminating chunk).
    End,
    /// Write half an event, then close the socket without ending the chunked body.
    Cut,
    /// Abort the connection (RST), as a server that goes away does.
    Reset,
    /// Forget the connection without a word (no FIN, no RST), as a server that reboots or whose
    /// address moves to another machine does: the client learns of it only by sending something.
    Forget,
}

/// How the server is unavailable during an outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// Nothing listens on the port: connections are refused.
    Refuse,
    /// Connections are accepted and reset at once, before a request is read.
    Reset,
}

struct Watch {
    tx: mpsc::UnboundedSender<Msg>,
    /// The watch's field and label selectors.
    selector: Selector,
    bookmarks: bool,
}

/// One change of an object, as the watch cache keeps it: the object before a modification
/// decides what a watch with a selector sees.
struct Change {
    rv: u64,
    kind: &'static str,
    object: Value,
    /// The object before a MODIFIED.
    prev: Option<Value>,
}

/// What `?fieldSelector=` and `?labelSelector=` ask for: the field selectors the source uses
/// (`metadata.name=X`, `spec.nodeName=X`) and equality-based label selectors (`key`, `!key`,
/// `key=value`, `key==value`, `key!=value`, comma-separated, all must hold).
#[derive(Clone, Debug, Default)]
struct Selector {
    field: Option<(String, String)>,
    labels: Vec<LabelTerm>,
}

#[derive(Clone, Debug)]
enum LabelTerm {
    Exists(String),
    Absent(String),
    Equals(String, String),
    Differs(String, String),
}

impl Selector {
    fn parse(field: Option<&String>, labels: Option<&String>) -> Result<Selector, &'static str> {
        let field = match field {
            None => None,
            Some(sel) => match sel.split_once('=') {
                Some((f @ ("metadata.name" | "spec.nodeName"), value)) => {
                    Some((f.to_string(), value.to_string()))
                }
                _ => return Err("unsupported field selector"),
            },
        };
        let mut terms = Vec::new();
        for term in labels
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let term = if let Some((k, v)) = term.split_once("!=") {
                LabelTerm::Differs(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelTerm::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelTerm::Absent(k.trim().into())
            } else if term.contains(' ') || term.contains('(') {
                return Err("set-based label selectors are not supported");
            } else {
                LabelTerm::Exists(term.into())
            };
            terms.push(term);
        }
        Ok(Selector {
            field,
            labels: terms,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let field_ok = match &self.field {
            None => true,
            Some((f, v)) if f == "metadata.name" => object["metadata"]["name"].as_str() == Some(v),
            Some((_, v)) => object["spec"]["nodeName"].as_str() == Some(v),
        };
        let label = |k: &str| object["metadata"]["labels"][k].as_str();
        field_ok
            && self.labels.iter().all(|t| match t {
                LabelTerm::Exists(k) => label(k).is_some(),
                LabelTerm::Absent(k) => label(k).is_none(),
                LabelTerm::Equals(k, v) => label(k) == Some(v),
                LabelTerm::Differs(k, v) => label(k) != Some(v),
            })
    }

    /// The event a watch with this selector gets for `change`, as the API server's watch
    /// cache makes it: an object that starts to match is ADDED, one that stops matching is
    /// DELETED (its previous content at the change's resourceVersion), one that matches
    /// neither before nor after is not sent.
    fn event(&self, change: &Change) -> Option<String> {
        let now = change.kind != "DELETED" && self.matches(&change.object);
        let before = match (&change.prev, change.kind) {
            (Some(prev), _) => self.matches(prev),
            (None, "DELETED") => self.matches(&change.object),
            (None, _) => false,
        };
        match (before, now) {
            (false, true) => Some(event_line(
                if change.kind == "MODIFIED" {
                    "ADDED"
                } else {
                    change.kind
                },
                &change.object,
            )),
            (true, true) => Some(event_line(change.kind, &change.object)),
            (true, false) if change.kind == "DELETED" => {
                Some(event_line("DELETED", &change.object))
            }
            (true, false) => {
                let mut gone = change.prev.clone().expect("a modification");
                gone["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                Some(event_line("DELETED", &gone))
            }
            (false, false) => None,
        }
    }
}

#[derive(Default)]
struct Collection {
    /// Keyed by "namespace/name" ("name" for cluster-scoped objects).
    objects: BTreeMap<String, Value>,
    /// Every change since the last compaction.
    log: Vec<Change>,
    /// Watches from a resourceVersion below this get 410.
    compacted: u64,
    watches: Vec<Watch>,
}

#[derive(Default)]
struct State {
    rv: u64,
    collections: BTreeMap<Res, Collection>,
    fail: Option<u16>,
    /// `retryAfterSeconds` (and a `Retry-After` header) with the failures of `fail`.
    retry_after: Option<u32>,
    /// The failures of `fail` as a proxy in front of the API server sends them: a plain-text
    /// body, the wait in the `Retry-After` header only.
    plain_failures: bool,
    /// Watches from a compacted resourceVersion are answered with HTTP 410 instead of a 200
    /// whose stream holds a 410 ERROR event (both happen with real API servers).
    gone_as_http: bool,
    held: HashSet<Res>,
    /// Kinds this server does not serve (404 NotFound, as an API server that predates them).
    unserved: HashSet<Res>,
    requests: Vec<Request>,
    /// Connections reset during an `Outage::Reset`.
    resets: usize,
    /// The outage under way: a connection accepted just before the listener went away (or
    /// while it resets) is reset before its request is answered, so no watch outlives the
    /// start of an outage.
    outage: Option<Outage>,
    /// Watch connections `forget_watches` could not forget silently (no CAP_NET_ADMIN).
    unforgotten: Vec<String>,
    /// Events (events.k8s.io/v1) created, in order, as last patched.
    events: Vec<Value>,
}

impl State {
    fn collection(&mut self, res: Res) -> &mut Collection {
        self.collections.entry(res).or_default()
    }
}

/// How long a watch from a version the server has not reached waits for it (the real watch
/// cache waits 3 s) before "Too large resource version".
const TOO_LARGE_WAIT: Duration = Duration::from_millis(500);

pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    outage: watch::Sender<Option<Outage>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn key_of(object: &Value) -> String {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().expect("object without a name");
    match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn event_line(kind: &str, object: &Value) -> String {
    let mut line = serde_json::to_string(&json!({"type": kind, "object": object})).unwrap();
    line.push('\n');
    line
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..State::default()
        }));
        let (outage, outage_rx) = watch::channel(None);
        runtime.spawn(accept(listener, state.clone(), outage_rx));
        ApiServer {
            addr,
            state,
            outage,
            runtime: Some(runtime),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Creates or replaces an object; live watches see ADDED or MODIFIED.
    pub fn apply(&self, res: Res, object: Value) {
        self.change(res, object, true);
    }

    /// Stops serving `res` (404 NotFound), as an API server from before that kind existed.
    pub fn unserve(&self, res: Res) {
        self.lock().unserved.insert(res);
    }

    /// Deletes an object; live watches see DELETED.
    pub fn delete(&self, res: Res, key: &str) {
        self.remove(res, key, true);
    }

    /// Creates or replaces an object without an event anyone could watch (call `compact`
    /// after, or a resumed watch would miss it, which the real server never allows).
    pub fn apply_unseen(&self, res: Res, object: Value) {
        self.change(res, object, false);
    }

    pub fn delete_unseen(&self, res: Res, key: &str) {
        self.remove(res, key, false);
    }

    fn change(&self, res: Res, mut object: Value, seen: bool) {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        let (kind, api_version) = res.kind();
        object["kind"] = json!(kind);
        object["apiVersion"] = json!(api_version);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&object);
        let c = state.collection(res);
        let prev = c.objects.insert(key, object.clone());
        if seen {
            let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
            broadcast(
                c,
                Change {
                    rv,
                    kind,
                    object,
                    prev,
                },
            );
        }
    }

    fn remove(&self, res: Res, key: &str, seen: bool) {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        let c = state.collection(res);
        let mut object = c.objects.remove(key).expect("delete of a missing object");
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if seen {
            broadcast(
                c,
                Change {
                    rv,
                    kind: "DELETED",
                    object,
                    prev: None,
                },
            );
        }
    }

    /// Forgets the event history: any watch from an older resourceVersion gets 410.
    pub fn compact(&self, res: Res) {
        let mut state = self.lock();
        let rv = state.rv;
        let c = state.collection(res);
        c.compacted = rv;
        c.log.clear();
    }

    /// Sends a BOOKMARK at the current resourceVersion to live watches that asked for them;
    /// returns that resourceVersion.
    pub fn bookmark(&self, res: Res) -> u64 {
        let mut state = self.lock();
        let rv = state.rv;
        let (kind, api_version) = res.kind();
        let object = json!({
            "kind": kind,
            "apiVersion": api_version,
            "metadata": {"resourceVersion": rv.to_string()},
        });
        let line = event_line("BOOKMARK", &object);
        for w in &state.collection(res).watches {
            if w.bookmarks {
                let _ = w.tx.send(Msg::Line(line.clone()));
            }
        }
        rv
    }

    /// Ends live watches with a 410 ERROR event, as the server does when a watcher falls too
    /// far behind.
    pub fn expire_watches(&self, res: Res) {
        let mut state = self.lock();
        let line = event_line("ERROR", &status(410, "Expired", "too old resource version"));
        for w in state.collection(res).watches.drain(..) {
            let _ = w.tx.send(Msg::Line(line.clone()));
            let _ = w.tx.send(Msg::End);
        }
    }

    /// Sends `line` (a newline is added) as it is to the live watches of `res`: a malformed
    /// event, or one of a type the client does not know.
    pub fn send_raw(&self, res: Res, line: &str) {
        let mut state = self.lock();
        for w in &state.collection(res).watches {
            let _ = w.tx.send(Msg::Line(format!("{line}\n")));
        }
    }

    /// Starts again with a younger history, as an API server whose etcd was restored from a
    /// backup (or replaced) does: live watches are reset, the resourceVersion goes back to
    /// `rv`, every object is stamped with it and the event history starts afresh. A watch
    /// from a version above `rv` gets "Too large resource version".
    pub fn restart_with_versions_from(&self, rv: u64) {
        let mut state = self.lock();
        state.rv = rv;
        for c in state.collections.values_mut() {
            for w in c.watches.drain(..) {
                let _ = w.tx.send(Msg::Reset);
            }
            c.log.clear();
            c.compacted = 0;
            for o in c.objects.values_mut() {
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
            }
        }
    }

    /// Cuts live watch connections in the middle of an event.
    pub fn cut_watches(&self, res: Res) {
        let mut state = self.lock();
        for w in state.collection(res).watches.drain(..) {
            let _ = w.tx.send(Msg::Cut);
        }
    }

    /// Starts an outage (`Some`): live watch connections are reset, and new connections refused
    /// or reset as `mode` says, until `outage(None)`. Objects can still be changed meanwhile;
    /// the port stays the same.
    pub fn outage(&self, mode: Option<Outage>) {
        self.lock().outage = mode;
        if mode.is_some() {
            let mut state = self.lock();
            for c in state.collections.values_mut() {
                for w in c.watches.drain(..) {
                    let _ = w.tx.send(Msg::Reset);
                }
            }
        }
        self.outage.send_replace(mode);
    }

    /// Drops every live watch connection silently, as a rebooted API server's kernel has: the
    /// socket is put in repair mode (`TCP_REPAIR`, needs CAP_NET_ADMIN) before it is closed, so
    /// the kernel sends neither FIN nor RST and forgets it. The client's end stays established
    /// until the client sends something, which the kernel then answers with a reset. The server
    /// goes on serving new connections.
    pub fn forget_watches(&self) {
        let mut state = self.lock();
        for c in state.collections.values_mut() {
            for w in c.watches.drain(..) {
                let _ = w.tx.send(Msg::Forget);
            }
        }
    }

    /// Watch connections `forget_watches` failed to forget silently, with the error.
    pub fn unforgotten(&self) -> Vec<String> {
        self.lock().unforgotten.clone()
    }

    /// Connections reset by an `Outage::Reset` so far.
    pub fn resets(&self) -> usize {
        self.lock().resets
    }

    /// Answers every request with this HTTP status (None: serve normally again).
    pub fn fail_with(&self, code: Option<u16>) {
        self.lock().fail = code;
    }

    /// Sends `retryAfterSeconds` (and the `Retry-After` header) with the failures of
    /// `fail_with`, as the API server's priority and fairness does with a 429.
    pub fn retry_after(&self, seconds: Option<u32>) {
        self.lock().retry_after = seconds;
    }

    /// Sends the failures of `fail_with` as a proxy or load balancer in front of the API server
    /// does: a plain-text body (no Status), `retry_after` in the `Retry-After` header alone.
    pub fn plain_failures(&self, on: bool) {
        self.lock().plain_failures = on;
    }

    /// Answers watches from a compacted resourceVersion with HTTP 410 (`true`) or, as by
    /// default, with a 410 ERROR event in a 200 stream.
    pub fn gone_as_http(&self, on: bool) {
        self.lock().gone_as_http = on;
    }

    /// Holds list requests for `res` until `release`.
    pub fn hold_lists(&self, res: Res) {
        self.lock().held.insert(res);
    }

    pub fn release_lists(&self, res: Res) {
        self.lock().held.remove(&res);
    }

    pub fn live_watches(&self, res: Res) -> usize {
        self.lock().collection(res).watches.len()
    }

    /// The Events created so far (events.k8s.io/v1), as last patched (a series' count).
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Polls the request log until `done` holds; panics after `timeout`.
    pub fn wait_for_requests(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Request]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.lock().requests) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; requests: {:#?}",
                    self.lock().requests
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Accepts connections, following the outage switch: the listener is closed while connections
/// are to be refused and bound again (same address) after.
async fn accept(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    mut outage: watch::Receiver<Option<Outage>>,
) {
    let addr = listener.local_addr().unwrap();
    let mut listener = Some(listener);
    loop {
        let mode = *outage.borrow_and_update();
        if mode == Some(Outage::Refuse) {
            listener = None;
        } else if listener.is_none() {
            listener = Some(
                TcpListener::bind(addr)
                    .await
                    .expect("bind the API port again"),
            );
        }
        let Some(l) = &listener else {
            if outage.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                let Ok((socket, _)) = accepted else {
                    return;
                };
                if mode == Some(Outage::Reset) {
                    state.lock().unwrap().resets += 1;
                    reset(socket);
                } else {
                    tokio::spawn(handle(socket, state.clone()));
                }
            }
            changed = outage.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Closes `socket` with a RST.
fn reset(socket: TcpStream) {
    // SO_LINGER 0 on a non-blocking socket: the close does not block, it aborts.
    #[allow(deprecated)]
    let _ = socket.set_linger(Some(Duration::ZERO));
    drop(socket);
}

/// Closes `socket` without telling the peer: repair mode first (see `forget_watches`). A
/// socket that cannot enter it is reset instead, and the error returned.
fn forget(socket: TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is the open socket `socket` owns, and the option value is a live
    // c_int of the length given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_REPAIR,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let result = if r == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        #[allow(deprecated)]
        let _ = socket.set_linger(Some(Duration::ZERO));
        Err(e)
    };
    drop(socket);
    result
}

/// Sends `change` to the live watches, each as its selector sees it, and logs it.
fn broadcast(c: &mut Collection, change: Change) {
    c.watches.retain(|w| match w.selector.event(&change) {
        None => !w.tx.is_closed(),
        Some(line) => w.tx.send(Msg::Line(line)).is_ok(),
    });
    c.log.push(change);
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn query_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

async fn write_response(socket: &mut TcpStream, code: u16, body: &Value) {
    write_response_with(socket, code, body, "").await;
}

/// `write_response` with `headers` (complete lines) added.
async fn write_response_with(socket: &mut TcpStream, code: u16, body: &Value, headers: &str) {
    let body = serde_json::to_vec(body).unwrap();
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         {headers}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(&body).await;
    let _ = socket.shutdown().await;
}

/// A plain-text answer (no Status), as a proxy in front of the API server sends.
async fn write_text(socket: &mut TcpStream, code: u16, body: &str, headers: &str) {
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         {headers}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(body.as_bytes()).await;
    let _ = socket.shutdown().await;
}

async fn write_chunk(socket: &mut TcpStream, data: &str) -> std::io::Result<()> {
    let chunk = format!("{:x}\r\n{data}\r\n", data.len());
    socket.write_all(chunk.as_bytes()).await?;
    socket.flush().await
}

async fn handle(mut socket: TcpStream, state: Arc<Mutex<State>>) {
    // Read the request head (GET only, so no body).
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if state.lock().unwrap().outage.is_some() {
        return reset(socket);
    }
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut body = head.split_off(end);
    let head = String::from_utf8_lossy(&head).to_string();
    let method = head.split_whitespace().next().unwrap_or("GET").to_string();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if method != "GET" {
        // Writes: Events only (POST creates, PATCH updates a series), as a real API server
        // takes them from kube-proxy; any other write is refused.
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while body.len() < length {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => body.extend_from_slice(&buf[..n]),
            }
        }
        let object: Option<Value> = serde_json::from_slice(&body).ok();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let answer = match (method.as_str(), parts.as_slice(), object) {
            (
                "POST",
                ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"],
                Some(mut event),
            ) => {
                event["metadata"]["namespace"] = json!(ns);
                event["kind"] = json!("Event");
                event["apiVersion"] = json!("events.k8s.io/v1");
                state.lock().unwrap().events.push(event.clone());
                (201, event)
            }
            (
                "PATCH",
                [
                    "apis",
                    "events.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "events",
                    name,
                ],
                Some(patch),
            ) => {
                let mut state = state.lock().unwrap();
                let found = state.events.iter_mut().rev().find(|e| {
                    e["metadata"]["name"] == json!(name) && e["metadata"]["namespace"] == json!(ns)
                });
                match found {
                    Some(event) => {
                        if let (Some(to), Some(from)) = (event.as_object_mut(), patch.as_object()) {
                            for (k, v) in from {
                                if k != "metadata" {
                                    to.insert(k.clone(), v.clone());
                                }
                            }
                        }
                        (200, event.clone())
                    }
                    None => (404, status(404, "NotFound", "no such event")),
                }
            }
            (_, _, None) => (400, status(400, "BadRequest", "the body is not JSON")),
            _ => (
                405,
                status(
                    405,
                    "MethodNotAllowed",
                    "this double takes writes of Events only",
                ),
            ),
        };
        return write_response(&mut socket, answer.0, &answer.1).await;
    }
    let params = query_params(query);
    let res = Res::from_path(path);
    let watch = params.get("watch").is_some_and(|w| w == "true");
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|w| w == "true");
    let resource_version = params.get("resourceVersion").cloned();
    let mut request = Request {
        res,
        watch,
        resource_version: resource_version.clone(),
        bookmarks,
        label_selector: params.get("labelSelector").cloned(),
        status: 200,
        expired: false,
        at: std::time::Instant::now(),
    };

    let record = |request: Request| state.lock().unwrap().requests.push(request);

    let (fail, retry_after, plain, unserved) = {
        let state = state.lock().unwrap();
        let unserved = res.is_some_and(|r| state.unserved.contains(&r));
        (
            state.fail,
            state.retry_after,
            state.plain_failures,
            unserved,
        )
    };
    if unserved {
        request.status = 404;
        record(request);
        return write_response(
            &mut socket,
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        )
        .await;
    }
    if let Some(code) = fail {
        request.status = code;
        record(request);
        if plain {
            let header = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
            return write_text(
                &mut socket,
                code,
                "Too many requests, try again later.\n",
                &header,
            )
            .await;
        }
        let mut body = status(code, "InternalError", "etcdserver: request timed out");
        if let Some(seconds) = retry_after {
            body["reason"] = json!("TooManyRequests");
            body["details"] = json!({"retryAfterSeconds": seconds});
            let header = format!("Retry-After: {seconds}\r\n");
            return write_response_with(&mut socket, code, &body, &header).await;
        }
        return write_response(&mut socket, code, &body).await;
    }
    let Some(res) = res else {
        request.status = 404;
        record(request);
        return write_response(&mut socket, 404, &status(404, "NotFound", "no such path")).await;
    };
    let selector = match Selector::parse(params.get("fieldSelector"), params.get("labelSelector")) {
        Ok(selector) => selector,
        Err(why) => {
            request.status = 400;
            record(request);
            return write_response(&mut socket, 400, &status(400, "BadRequest", why)).await;
        }
    };
    let matches = |object: &Value| selector.matches(object);

    if !watch {
        let mut recorded = false;
        while state.lock().unwrap().held.contains(&res) {
            if !std::mem::replace(&mut recorded, true) {
                // Status 0: arrived and held.
                record(Request {
                    status: 0,
                    ..request.clone()
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let body = {
            let mut state = state.lock().unwrap();
            let rv = state.rv;
            let items: Vec<Value> = state
                .collection(res)
                .objects
                .values()
                .filter(|o| matches(o))
                .map(|o| {
                    // Items of a typed list carry no kind/apiVersion.
                    let mut o = o.clone();
                    let map = o.as_object_mut().unwrap();
                    map.remove("kind");
                    map.remove("apiVersion");
                    o
                })
                .collect();
            let (kind, api_version) = res.list_kind();
            state.requests.push(request);
            json!({
                "kind": kind,
                "apiVersion": api_version,
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items,
            })
        };
        return write_response(&mut socket, 200, &body).await;
    }

    // A watch: replay what happened after the requested version, then follow live changes.
    let from: u64 = match resource_version.as_deref().map(str::parse) {
        Some(Ok(v)) => v,
        _ => {
            request.status = 400;
            record(request);
            let body = status(400, "BadRequest", "watch needs a numeric resourceVersion");
            return write_response(&mut socket, 400, &body).await;
        }
    };
    // A version the server has not reached: as the watch cache, wait a while for it, then end
    // the watch with a 504 ERROR event whose cause is ResourceVersionTooLarge.
    let deadline = tokio::time::Instant::now() + TOO_LARGE_WAIT;
    loop {
        let current = state.lock().unwrap().rv;
        if from <= current {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            record(request);
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let mut error = status(
                504,
                "Timeout",
                &format!("Too large resource version: {from}, current: {current}"),
            );
            error["details"] = json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            });
            let _ = write_chunk(&mut socket, &event_line("ERROR", &error)).await;
            let _ = socket.write_all(b"0\r\n\r\n").await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let replay: Result<Vec<String>, u64> = {
        let mut state = state.lock().unwrap();
        // An outage began since the request was read: no watch outlives its start.
        if state.outage.is_some() {
            drop(state);
            return reset(socket);
        }
        let c = state.collection(res);
        let replay = if from < c.compacted {
            Err(c.compacted)
        } else {
            let lines = c
                .log
                .iter()
                .filter(|change| change.rv > from)
                .filter_map(|change| selector.event(change))
                .collect();
            c.watches.push(Watch {
                tx,
                selector: selector.clone(),
                bookmarks,
            });
            Ok(lines)
        };
        request.expired = replay.is_err();
        if replay.is_err() && state.gone_as_http {
            request.status = 410;
        }
        state.requests.push(request);
        replay
    };
    if let Err(compacted) = replay
        && state.lock().unwrap().gone_as_http
    {
        let message = format!("too old resource version: {from} ({compacted})");
        return write_response(&mut socket, 410, &status(410, "Expired", &message)).await;
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let lines = match replay {
        Ok(lines) => lines,
        Err(compacted) => {
            let message = format!("too old resource version: {from} ({compacted})");
            let line = event_line("ERROR", &status(410, "Expired", &message));
            let _ = write_chunk(&mut socket, &line).await;
            let _ = socket.write_all(b"0\r\n\r\n").await;
            return;
        }
    };
    for line in lines {
        if write_chunk(&mut socket, &line).await.is_err() {
            return;
        }
    }
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Line(line) => {
                if write_chunk(&mut socket, &line).await.is_err() {
                    return;
                }
            }
            Msg::End => {
                let _ = socket.write_all(b"0\r\n\r\n").await;
                let _ = socket.shutdown().await;
                return;
            }
            Msg::Cut => {
                let _ = socket
                    .write_all(b"40\r\n{\"type\":\"MODIFIED\",\"obj")
                    .await;
                let _ = socket.flush().await;
                return;
            }
            Msg::Reset => return reset(socket),
            Msg::Forget => {
                if let Err(e) = forget(socket) {
                    state.lock().unwrap().unforgotten.push(e.to_string());
                }
                return;
            }
        }
    }
}

// ---- Objects as the API server serves them ---------------------------------------------------

/// The node the sources under test run on.
pub const NODE: &str = "node-a";

/// A ClusterIP Service with one TCP port.
pub fn service(ns: &str, name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-svc-{ns}-{name}")},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": name},
        },
        "status": {"loadBalancer": {}},
    })
}

/// An IPv4 EndpointSlice of `service` with ready endpoints on `NODE`.
pub fn slice(ns: &str, service: &str, name: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| {
            json!({
                "addresses": [a],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": NODE,
                "zone": "zone-1",
            })
        })
        .collect();
    json!({
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

/// A Node with a zone label and a pod CIDR.
pub fn node(name: &str, zone: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone},
        },
        "spec": {"podCIDR": "10.244.0.0/24"},
    })
}
