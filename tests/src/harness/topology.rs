//! One node with pods on a bridge, as in ../shared/testbed.md: namespace `node` holds bridge
//! `br0` (10.244.0.1/24, fd00:244::1/64); pod i has `eth0` at 10.244.0.(i+2) and
//! fd00:244::(i+2) with default routes via the bridge. A test cgroup holds the clients.
//!
//! The pieces are shared with the multi-node `testbed`: the address plan, the pod bridge, pod
//! creation, echo servers and request clients (`request_in`, `hold_in`) work in any namespace.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{ChildStdin, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use super::{
    cgroup::TestCgroup,
    names,
    netns::NetNs,
    process::{
        ChildGuard, Placement, Reply, command_in, output_within, parse_replies, workspace_binary,
    },
    wait::poll_until,
};

/// A pod: a namespace with one interface, and the echo servers running in it.
pub struct Pod {
    /// Dropped first: servers die before their namespace goes.
    servers: Vec<ChildGuard>,
    pub name: String,
    pub ns: NetNs,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The node-side end of the pod's veth: on the node's bridge `br0` in the bridge shape,
    /// routed to (`veth…`, `cali…`, `eni…`) in the routed shapes of `testbed::Shape`.
    pub host_if: String,
}

pub struct Topology {
    pub id: String,
    pub pods: Vec<Pod>,
    pub node: NetNs,
    pub cgroup: TestCgroup,
}

/// Protocol of a test request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    /// Unconnected UDP: sendto + recvfrom.
    Udp,
    /// Connected UDP: connect + send + recv.
    UdpConnected,
    /// SCTP, one-to-one style (where the kernel has SCTP).
    Sctp,
}

/// Turns IPv6 duplicate address detection off for interfaces created from now on.
pub(crate) fn no_dad(ns: &NetNs) {
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
}

/// Address plan: the gateway of node `node`'s pods, on its bridge `br0` (bridge shape) or on
/// every pod's node-side veth (ptp shape).
pub fn bridge_ip4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node_octet(node), 1)
}

pub fn bridge_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, node_octet(node).into(), 0, 0, 0, 0, 1)
}

/// Address plan: pod `pod` (0-based) of node `node`, 10.244.<node>.<pod+2>.
pub fn pod_ip4(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node_octet(node), pod_octet(pod))
}

pub fn pod_ip6(node: usize, pod: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x244,
        node_octet(node).into(),
        0,
        0,
        0,
        0,
        pod_octet(pod).into(),
    )
}

fn node_octet(node: usize) -> u8 {
    u8::try_from(node).expect("at most 256 nodes")
}

fn pod_octet(pod: usize) -> u8 {
    u8::try_from(pod + 2)
        .ok()
        .filter(|o| *o < 255)
        .expect("at most 253 pods per node")
}

/// Creates the pods' bridge `br0` of node `node` in namespace `ns`, with the gateway addresses.
pub(crate) fn add_bridge(ns: &NetNs, node: usize) {
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", bridge_ip4(node)),
        "dev",
        "br0",
    ]);
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/64", bridge_ip6(node)),
        "dev",
        "br0",
        "nodad",
    ]);
    ns.ip(&["link", "set", "br0", "up"]);
}

/// Creates a veth pair: `eth0` in `pod_ns`, its peer `host_if` in `node_ns`; both down and
/// without addresses.
pub(crate) fn add_veth(pod_ns: &NetNs, node_ns: &NetNs, host_if: &str) {
    pod_ns.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        host_if,
        "netns",
        &node_ns.name,
    ]);
}

/// The bridge shape's plumbing of `pod` (pod of node `node`, its veth made by `add_veth`):
/// its node side enslaved to `br0` and up; in the pod `eth0` at the plan's addresses (/24,
/// /64) and default routes via the bridge.
pub(crate) fn attach_to_bridge(node_ns: &NetNs, pod: &Pod, node: usize) {
    node_ns.ip(&["link", "set", &pod.host_if, "master", "br0", "up"]);
    let ns = &pod.ns;
    ns.ip(&["addr", "add", &format!("{}/24", pod.ip4), "dev", "eth0"]);
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/64", pod.ip6),
        "dev",
        "eth0",
        "nodad",
    ]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        &bridge_ip4(node).to_string(),
    ]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &bridge_ip6(node).to_string(),
    ]);
}

impl Pod {
    /// Creates pod `index` (0-based) of node `node` (whose namespace is `node_ns`, with `br0`):
    /// namespace `<id>-<name>`, `eth0` veth to `veth<index>` on the bridge, addresses from the
    /// plan, default routes via the bridge.
    pub(crate) fn create(
        node_ns: &NetNs,
        node: usize,
        id: &str,
        name: String,
        index: usize,
    ) -> Pod {
        let addrs = (pod_ip4(node, index), pod_ip6(node, index));
        let pod = Pod::unlinked(id, name, addrs, format!("veth{index}"));
        add_veth(&pod.ns, node_ns, &pod.host_if);
        attach_to_bridge(node_ns, &pod, node);
        pod
    }

    /// A pod's namespace `<id>-<name>` (DAD off), with its addresses `(ip4, ip6)` recorded but
    /// no interface yet: `add_veth` and a shape's plumbing follow.
    pub(crate) fn unlinked(
        id: &str,
        name: String,
        (ip4, ip6): (Ipv4Addr, Ipv6Addr),
        host_if: String,
    ) -> Pod {
        let ns = NetNs::new(format!("{id}-{name}"));
        no_dad(&ns);
        Pod {
            servers: Vec::new(),
            name,
            ns,
            ip4,
            ip6,
            host_if,
        }
    }

    /// Starts an echo server (TCP and UDP, both families) on `port`; it answers with the
    /// pod's name. It is stopped when the pod is dropped.
    pub fn serve(&mut self, port: u16) {
        let server = spawn_echo(&self.ns, &self.name, port);
        self.servers.push(server);
    }
}

/// `testhost ARGS` to run in namespace `ns`, inside `cgroup` when given (the socket hooks then
/// see its sockets).
pub fn testhost_in(
    ns: &NetNs,
    cgroup: Option<&TestCgroup>,
    args: &[&str],
) -> std::process::Command {
    let netns = ns.path();
    let procs = cgroup.map(TestCgroup::procs_file);
    command_in(
        &Placement {
            netns: &netns,
            cgroup_procs: procs.as_deref(),
        },
        &workspace_binary("testhost"),
        args,
    )
}

/// Starts an echo server (`testhost serve`) in `ns` answering with `name`; waits until it
/// listens.
pub(crate) fn spawn_echo(ns: &NetNs, name: &str, port: u16) -> ChildGuard {
    let cmd = testhost_in(ns, None, &["serve", name, &port.to_string()]);
    ChildGuard::spawn_ready(&format!("echo server {name} in {}", ns.name), cmd)
}

/// Sends `count` requests from namespace `ns`, inside `cgroup` if given, to `to`.
pub fn request_in(
    ns: &NetNs,
    cgroup: Option<&TestCgroup>,
    proto: Proto,
    to: SocketAddr,
    count: usize,
) -> Vec<Reply> {
    request_with(ns, cgroup, proto, to, count, &[])
}

/// One UDP request from `ns` (outside the cgroup) whose socket is bound to `source_port`: the
/// same flow every time.
pub fn udp_from_port(ns: &NetNs, to: SocketAddr, source_port: u16) -> Reply {
    let port = source_port.to_string();
    let mut replies = request_with(
        ns,
        None,
        Proto::Udp,
        to,
        1,
        &[("TESTHOST_SOURCE_PORT", &port)],
    );
    replies.pop().expect("one reply")
}

/// `count` TCP requests from `ns` (in `cgroup`), connection `i` from source port `first + i`.
pub fn tcp_from_ports(
    ns: &NetNs,
    cgroup: Option<&TestCgroup>,
    to: SocketAddr,
    first: u16,
    count: usize,
) -> Vec<Reply> {
    let port = first.to_string();
    request_with(
        ns,
        cgroup,
        Proto::Tcp,
        to,
        count,
        &[("TESTHOST_SOURCE_PORT", &port)],
    )
}

/// One UDP request of `size` bytes from `ns` (outside the cgroup): past the path's MTU it
/// leaves in fragments, and the server answers with as many bytes (fragmented too).
pub fn udp_sized(ns: &NetNs, to: SocketAddr, size: usize) -> Reply {
    let size = size.to_string();
    let mut replies = request_with(ns, None, Proto::Udp, to, 1, &[("TESTHOST_UDP_SIZE", &size)]);
    replies.pop().expect("one reply")
}

/// One UDP datagram of `size` bytes from `ns` (outside the cgroup) that must not be
/// fragmented (`testhost pmtu`): its answer, or the error, and the client's path MTU to `to`
/// afterwards.
pub fn udp_unfragmented(ns: &NetNs, to: SocketAddr, size: usize) -> Reply {
    let to = to.to_string();
    let size = size.to_string();
    let cmd = testhost_in(ns, None, &["pmtu", &to, &size]);
    // Bounded by testhost's 2 s timeout.
    let stdout = output_within(cmd, Duration::from_secs(8));
    parse_replies(&stdout).pop().expect("one reply")
}

/// One UDP request from `ns` (outside the cgroup) sent with TTL (hop limit) `ttl`.
pub fn udp_with_ttl(ns: &NetNs, to: SocketAddr, ttl: u8) -> Reply {
    let ttl = ttl.to_string();
    let mut replies = request_with(ns, None, Proto::Udp, to, 1, &[("TESTHOST_TTL", &ttl)]);
    replies.pop().expect("one reply")
}

fn request_with(
    ns: &NetNs,
    cgroup: Option<&TestCgroup>,
    proto: Proto,
    to: SocketAddr,
    count: usize,
    env: &[(&str, &str)],
) -> Vec<Reply> {
    let (proto_arg, connected) = match proto {
        Proto::Tcp => ("tcp", ""),
        Proto::Udp => ("udp", ""),
        Proto::UdpConnected => ("udp", "connected"),
        Proto::Sctp => ("sctp", ""),
    };
    let to = to.to_string();
    let count_arg = count.to_string();
    let mut args = vec!["request", proto_arg, to.as_str(), count_arg.as_str()];
    if !connected.is_empty() {
        args.push(connected);
    }
    let mut cmd = testhost_in(ns, cgroup, &args);
    for (name, value) in env {
        cmd.env(name, value);
    }
    // Each request is bounded by testhost's 2 s timeouts.
    let stdout = output_within(cmd, Duration::from_secs(5 + 3 * count as u64));
    parse_replies(&stdout)
}

/// Starts `cmd` with its stdin and stdout piped: the child (killed on drop, named `name`), its
/// stdin, and its stdout's lines as they come.
pub fn spawn_talking(
    mut cmd: std::process::Command,
    name: String,
) -> (ChildGuard, ChildStdin, mpsc::Receiver<String>) {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (ChildGuard { name, child }, stdin, rx)
}

/// Opens one TCP connection from namespace `ns` (inside `cgroup` if given) to `to` and keeps
/// it; returns it with the first reply.
pub fn hold_in(ns: &NetNs, cgroup: Option<&TestCgroup>, to: SocketAddr) -> (Held, Reply) {
    let to = to.to_string();
    let (guard, stdin, lines) = spawn_talking(
        testhost_in(ns, cgroup, &["request", "tcp", &to, "1", "hold"]),
        format!("held connection from {} to {to}", ns.name),
    );
    let mut held = Held {
        guard,
        stdin,
        lines,
    };
    let first = held.next_reply();
    (held, first)
}

impl Topology {
    /// Builds a node with `pods` pods. Names are unique to this process and call.
    pub fn new(pods: usize) -> Topology {
        let id = names::unique();
        let cgroup = TestCgroup::new(&id);
        let node = NetNs::new(format!("{id}-node"));
        no_dad(&node);
        add_bridge(&node, 0);
        let mut topo = Topology {
            id,
            pods: Vec::new(),
            node,
            cgroup,
        };
        for i in 0..pods {
            let pod = Pod::create(&topo.node, 0, &topo.id, format!("pod-{}", i + 1), i);
            topo.pods.push(pod);
        }
        topo
    }

    /// Starts an echo server (TCP and UDP, both families) on `port` in pod `i`; it answers
    /// with the pod's name.
    pub fn serve(&mut self, i: usize, port: u16) {
        self.pods[i].serve(port);
    }

    /// Sends `count` requests from pod `from` (inside the test cgroup) to `to`.
    pub fn request(&self, from: usize, proto: Proto, to: SocketAddr, count: usize) -> Vec<Reply> {
        self.request_from(&self.pods[from].ns, true, proto, to, count)
    }

    /// Sends `count` requests from namespace `ns`, inside the test cgroup or not.
    pub fn request_from(
        &self,
        ns: &NetNs,
        in_cgroup: bool,
        proto: Proto,
        to: SocketAddr,
        count: usize,
    ) -> Vec<Reply> {
        request_in(ns, in_cgroup.then_some(&self.cgroup), proto, to, count)
    }

    /// Opens one TCP connection from pod `from` (in the test cgroup) to `to` and keeps it;
    /// returns it with the first reply.
    pub fn hold(&self, from: usize, to: SocketAddr) -> (Held, Reply) {
        self.hold_from(&self.pods[from].ns, true, to)
    }

    /// Like `hold`, from namespace `ns`, inside the test cgroup or not.
    pub fn hold_from(&self, ns: &NetNs, in_cgroup: bool, to: SocketAddr) -> (Held, Reply) {
        hold_in(ns, in_cgroup.then_some(&self.cgroup), to)
    }

    /// Runs `testhost udp-stream` from pod `from` (in the test cgroup) for `secs` seconds and
    /// returns its lines: `{"t", "backend"}` per answer, `{"t", "event", "errno"}` otherwise.
    pub fn udp_stream(
        &self,
        from: usize,
        to: SocketAddr,
        secs: u64,
        connected: bool,
    ) -> Vec<serde_json::Value> {
        udp_stream_in(&self.pods[from].ns, Some(&self.cgroup), to, secs, connected)
    }

    /// Starts `testhost udp-stream` from pod `from` (in the test cgroup) for `secs` seconds;
    /// its lines can be read while it runs (`UdpStream`).
    pub fn start_udp_stream(
        &self,
        from: usize,
        to: SocketAddr,
        secs: u64,
        connected: bool,
    ) -> UdpStream {
        UdpStream::start(&self.pods[from].ns, Some(&self.cgroup), to, secs, connected)
    }

    /// [`Topology::start_udp_stream`] of an unconnected socket sending a datagram every
    /// `every_ms` milliseconds.
    pub fn start_slow_udp_stream(
        &self,
        from: usize,
        to: SocketAddr,
        secs: u64,
        every_ms: u64,
    ) -> UdpStream {
        UdpStream::start_every(
            &self.pods[from].ns,
            Some(&self.cgroup),
            to,
            secs,
            false,
            every_ms,
        )
    }

    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup.path
    }
}

/// Runs `testhost udp-stream` in `ns` (inside `cgroup` if given) for `secs` seconds and returns
/// its lines: `{"t", "backend"}` per answer, `{"t", "event", "errno"}` otherwise.
pub fn udp_stream_in(
    ns: &NetNs,
    cgroup: Option<&TestCgroup>,
    to: SocketAddr,
    secs: u64,
    connected: bool,
) -> Vec<serde_json::Value> {
    UdpStream::start(ns, cgroup, to, secs, connected).finish()
}

/// A running `testhost udp-stream` (one datagram every 50 ms), its lines collected as they
/// come so that a test can wait on what the stream has seen instead of sleeping. Killed on
/// drop.
pub struct UdpStream {
    guard: ChildGuard,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    reader: Option<thread::JoinHandle<()>>,
    secs: u64,
}

impl UdpStream {
    /// Starts the stream in `ns` (inside `cgroup` if given) for `secs` seconds.
    pub fn start(
        ns: &NetNs,
        cgroup: Option<&TestCgroup>,
        to: SocketAddr,
        secs: u64,
        connected: bool,
    ) -> UdpStream {
        UdpStream::start_every(ns, cgroup, to, secs, connected, 50)
    }

    /// [`UdpStream::start`] with a datagram every `every_ms` milliseconds.
    pub fn start_every(
        ns: &NetNs,
        cgroup: Option<&TestCgroup>,
        to: SocketAddr,
        secs: u64,
        connected: bool,
        every_ms: u64,
    ) -> UdpStream {
        let to = to.to_string();
        let secs_arg = secs.to_string();
        let every = every_ms.to_string();
        let kind = if connected {
            "connected"
        } else {
            "unconnected"
        };
        let args = vec![
            "udp-stream",
            to.as_str(),
            secs_arg.as_str(),
            kind,
            every.as_str(),
        ];
        let mut cmd = testhost_in(ns, cgroup, &args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn udp-stream in {}: {e}", ns.name));
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad udp-stream line {line:?}: {e}"));
                sink.lock().expect("udp-stream lines").push(v);
            }
        });
        UdpStream {
            guard: ChildGuard {
                name: format!("udp-stream {to} in {}", ns.name),
                child,
            },
            lines,
            reader: Some(reader),
            secs,
        }
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.lines.lock().expect("udp-stream lines").clone()
    }

    /// Waits (bounded) until the stream got `n` answers from `backend`; returns the lines.
    pub fn wait_for_answers(&self, backend: &str, n: usize) -> Vec<serde_json::Value> {
        poll_until(
            &format!("{n} answers from {backend} on {}", self.guard.name),
            Duration::from_secs(5),
            || {
                let lines = self.lines();
                let got = lines.iter().filter(|l| l["backend"] == backend).count();
                if got >= n {
                    Ok(lines)
                } else {
                    Err(format!("{lines:?}"))
                }
            },
        )
    }

    /// Waits (bounded: its duration plus 10 s) for the stream to end; returns all its lines.
    pub fn finish(mut self) -> Vec<serde_json::Value> {
        let child = &mut self.guard.child;
        let status = poll_until(
            &format!("{} to end", self.guard.name),
            Duration::from_secs(self.secs + 10),
            || match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".to_string()),
                Err(e) => panic!("wait: {e}"),
            },
        );
        assert!(status.success(), "{} failed: {status}", self.guard.name);
        if let Some(reader) = self.reader.take() {
            reader.join().expect("udp-stream reader");
        }
        self.lines()
    }
}

/// A long-lived TCP connection made through `hold_in` (`Topology::hold`, `Testbed::hold_from`).
pub struct Held {
    guard: ChildGuard,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Held {
    fn next_reply(&mut self) -> Reply {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{}: no reply within 5 s: {e}", self.guard.name));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }

    /// Sends one more request over the same connection.
    pub fn again(&mut self) -> Reply {
        writeln!(self.stdin).expect("write to held connection");
        self.stdin.flush().expect("flush");
        self.next_reply()
    }
}
