//! One node with pods on a bridge, as in ../shared/testbed.md: namespace `node` holds bridge
//! `br0` (10.244.0.1/24, fd00:244::1/64); pod i has `eth0` at 10.244.0.(i+2) and
//! fd00:244::(i+2) with default routes via the bridge. A test cgroup holds the clients.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{ChildStdin, Stdio},
    sync::mpsc,
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
};

/// A pod: a namespace with one interface, and the echo servers running in it.
pub struct Pod {
    /// Dropped first: servers die before their namespace goes.
    servers: Vec<ChildGuard>,
    pub name: String,
    pub ns: NetNs,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
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

fn no_dad(ns: &NetNs) {
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
}

impl Topology {
    /// Builds a node with `pods` pods. Names are unique to this process and call.
    pub fn new(pods: usize) -> Topology {
        let id = names::unique();
        let cgroup = TestCgroup::new(&id);
        let node = NetNs::new(format!("{id}-node"));
        no_dad(&node);
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&["addr", "add", "10.244.0.1/24", "dev", "br0"]);
        node.ip(&["addr", "add", "fd00:244::1/64", "dev", "br0", "nodad"]);
        node.ip(&["link", "set", "br0", "up"]);
        let mut topo = Topology {
            id,
            pods: Vec::new(),
            node,
            cgroup,
        };
        for i in 0..pods {
            topo.add_pod(i);
        }
        topo
    }

    fn add_pod(&mut self, i: usize) {
        let name = format!("pod-{}", i + 1);
        let ns = NetNs::new(format!("{}-{name}", self.id));
        no_dad(&ns);
        let host_if = format!("veth{i}");
        ns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &host_if,
            "netns",
            &self.node.name,
        ]);
        self.node
            .ip(&["link", "set", &host_if, "master", "br0", "up"]);
        let ip4 = Ipv4Addr::new(10, 244, 0, (i + 2) as u8);
        let ip6: Ipv6Addr = format!("fd00:244::{:x}", i + 2).parse().expect("valid v6");
        ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
        ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", "10.244.0.1"]);
        ns.ip(&["-6", "route", "add", "default", "via", "fd00:244::1"]);
        self.pods.push(Pod {
            servers: Vec::new(),
            name,
            ns,
            ip4,
            ip6,
        });
    }

    /// Starts an echo server (TCP and UDP, both families) on `port` in pod `i`; it answers
    /// with the pod's name.
    pub fn serve(&mut self, i: usize, port: u16) {
        let pod = &mut self.pods[i];
        let netns = pod.ns.path();
        let cmd = command_in(
            &Placement {
                netns: &netns,
                cgroup_procs: None,
            },
            &workspace_binary("testhost"),
            &["serve", &pod.name, &port.to_string()],
        );
        let server = ChildGuard::spawn_ready(&format!("echo server in {}", pod.name), cmd);
        pod.servers.push(server);
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
        let netns = ns.path();
        let procs = self.cgroup.procs_file();
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
        let cmd = command_in(
            &Placement {
                netns: &netns,
                cgroup_procs: in_cgroup.then_some(procs.as_path()),
            },
            &workspace_binary("testhost"),
            &args,
        );
        // Each request is bounded by testhost's 2 s timeouts.
        let stdout = output_within(cmd, Duration::from_secs(5 + 3 * count as u64));
        parse_replies(&stdout)
    }

    /// Opens one TCP connection from pod `from` (in the test cgroup) to `to` and keeps it;
    /// returns it with the first reply.
    pub fn hold(&self, from: usize, to: SocketAddr) -> (Held, Reply) {
        let netns = self.pods[from].ns.path();
        let procs = self.cgroup.procs_file();
        let to = to.to_string();
        let mut cmd = command_in(
            &Placement {
                netns: &netns,
                cgroup_procs: Some(procs.as_path()),
            },
            &workspace_binary("testhost"),
            &["request", "tcp", &to, "1", "hold"],
        );
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn testhost hold");
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
        let mut held = Held {
            guard: ChildGuard {
                name: "held connection".into(),
                child,
            },
            stdin,
            lines: rx,
        };
        let first = held.next_reply();
        (held, first)
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
        let netns = self.pods[from].ns.path();
        let procs = self.cgroup.procs_file();
        let to = to.to_string();
        let secs_arg = secs.to_string();
        let mut args = vec!["udp-stream", to.as_str(), secs_arg.as_str()];
        if !connected {
            args.push("unconnected");
        }
        let cmd = command_in(
            &Placement {
                netns: &netns,
                cgroup_procs: Some(procs.as_path()),
            },
            &workspace_binary("testhost"),
            &args,
        );
        let stdout = output_within(cmd, Duration::from_secs(secs + 10));
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }

    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup.path
    }
}

/// A long-lived TCP connection made through `Topology::hold`.
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
