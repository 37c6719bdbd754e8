//! kube-proxy's per-Service health checks (semantics 8.1-8.4): for every LoadBalancer Service
//! with externalTrafficPolicy Local, an HTTP server on its healthCheckNodePort telling cloud
//! load balancers whether this node has a local endpoint to send the Service's traffic to.
//!
//! [`wanted`] is PURE: the compiled state in, the servers that should run out. [`HealthChecks`]
//! owns the listeners and makes them match that set after each successful sync: new ports are
//! bound, ports no longer wanted are closed, and the endpoint counts of running ones are updated
//! in place, without rebinding.
//!
//! Addresses (semantics 8.1): without `--nodeport-addresses`, kube-proxy listens on the
//! wildcard address, which Go turns into one dual-stack socket. Likewise, each port here is then
//! one `[::]:port` socket with IPV6_V6ONLY explicitly off, so it answers IPv4 (as v4-mapped)
//! and IPv6 whatever `net.ipv6.bindv6only` says; on a kernel without IPv6 it is
//! `0.0.0.0:port`. A family that `--nodeport-addresses` narrows (its own CIDRs, or `primary`)
//! is served on the node's NodePort addresses of that family only, one socket each, and
//! follows them as they change; a family it leaves alone keeps its wildcard socket
//! ([`listens`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use socket2::{Domain, Socket, Type};

use crate::{
    compile::{Desired, NodePortSelection, Problem, ProblemReason},
    health::Health,
    http::{Handler, Request, Response, Server},
    metrics::{Metrics, Series},
};

/// What one health check server answers about its Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// Distinct IPs of this node's ready endpoints over all ports (semantics 8.4), per family
    /// the Service has (None: not of that family).
    pub local_v4: Option<usize>,
    pub local_v6: Option<usize>,
}

impl ServiceHealth {
    /// The count a request to an address of the given family is answered with: its family's,
    /// as kube-proxy's proxier of that family counts only its own addresses (semantics 8.4,
    /// 10.3), so a dual-stack pod counts once; the Service's one family's for a single-stack
    /// Service, whichever family the probe came over (kube-proxy's one server for the port
    /// answers both).
    pub fn local_endpoints(&self, v6: bool) -> usize {
        let (own, other) = if v6 {
            (self.local_v6, self.local_v4)
        } else {
            (self.local_v4, self.local_v6)
        };
        own.or(other).unwrap_or(0)
    }
}

/// PURE: the health check servers `desired` asks for, by port, and the Services that cannot
/// have theirs because another one claims the same port (the first by namespace/name wins).
///
/// Only Service ports whose `health_check_node_port` compile set count: type LoadBalancer
/// with externalTrafficPolicy Local and a valid port (semantics 8.1).
pub fn wanted(desired: &Desired) -> (BTreeMap<u16, ServiceHealth>, Vec<Problem>) {
    // Per Service, in namespace/name order: its port and, per family it has, the IPs of its
    // local ready endpoints.
    type Ips = [Option<BTreeSet<IpAddr>>; 2];
    let mut services: BTreeMap<(&str, &str), (u16, Ips)> = BTreeMap::new();
    for sp in desired.ports.values() {
        let Some(port) = sp.health_check_node_port else {
            continue;
        };
        let (_, by_family) = services
            .entry((&sp.name.namespace, &sp.name.name))
            .or_insert((port, [None, None]));
        let ips = by_family[usize::from(sp.name.family == crate::compile::Family::V6)]
            .get_or_insert_with(BTreeSet::new);
        // semantics 8.4, 3.13: ready ones only; a terminating endpoint (ready false) does not
        // count even while the Local policy still sends traffic to it (3.4).
        ips.extend(
            sp.endpoints
                .all()
                .iter()
                .filter(|e| e.local && e.ready)
                .map(|e| e.addr),
        );
    }
    let mut out: BTreeMap<u16, ServiceHealth> = BTreeMap::new();
    let mut problems = Vec::new();
    for ((namespace, name), (port, [v4, v6])) in services {
        if let Some(first) = out.get(&port) {
            problems.push(Problem {
                reason: ProblemReason::Conflict,
                object: format!("Service {namespace}/{name}"),
                message: format!(
                    "healthCheckNodePort {port} is already used by Service {}/{}; no health check served for this one",
                    first.namespace, first.name
                ),
            });
            continue;
        }
        out.insert(
            port,
            ServiceHealth {
                namespace: namespace.to_string(),
                name: name.to_string(),
                local_v4: v4.map(|ips| ips.len()),
                local_v6: v6.map(|ips| ips.len()),
            },
        );
    }
    (out, problems)
}

/// Which families `--nodeport-addresses` narrows (semantics 8.1, 7.2, 7.3): a family with CIDRs
/// of its own, or both with `primary`. A narrowed family's health checks listen on the node's
/// NodePort addresses of that family only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Narrowed {
    pub v4: bool,
    pub v6: bool,
}

impl Narrowed {
    /// PURE: the families `selection` narrows.
    pub fn of(selection: &NodePortSelection) -> Narrowed {
        // A zero-length prefix matches every address of its family: no narrowing, as in
        // kube-proxy.
        let has = |v4: bool| {
            let mut mine = selection.cidrs.iter().filter(|c| c.addr.is_ipv4() == v4);
            selection.primary || mine.clone().next().is_some() && mine.all(|c| c.len > 0)
        };
        Narrowed {
            v4: has(true),
            v6: has(false),
        }
    }

    fn covers(&self, addr: &IpAddr) -> bool {
        if addr.is_ipv4() { self.v4 } else { self.v6 }
    }
}

/// One listening socket of a health check port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Listen {
    /// `[::]` with IPV6_V6ONLY off: every address of both families (`0.0.0.0` without IPv6).
    Everywhere,
    /// `0.0.0.0`: every IPv4 address.
    AnyV4,
    /// `[::]` with IPV6_V6ONLY on: every IPv6 address (nothing on a kernel without IPv6).
    AnyV6,
    /// One node address.
    At(IpAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Everywhere => f.write_str("every address"),
            Listen::AnyV4 => f.write_str("0.0.0.0"),
            Listen::AnyV6 => f.write_str("[::]"),
            Listen::At(IpAddr::V4(a)) => write!(f, "{a}"),
            Listen::At(IpAddr::V6(a)) => write!(f, "[{a}]"),
        }
    }
}

/// PURE: the sockets every health check port listens on, given the families `narrowed` and
/// the node's NodePort addresses (already chosen by `--nodeport-addresses`). Sorted, no
/// duplicates; empty when every family is narrowed and the node has no address in it.
pub fn listens(narrowed: Narrowed, addresses: &[IpAddr]) -> Vec<Listen> {
    if narrowed == Narrowed::default() {
        return vec![Listen::Everywhere];
    }
    let mut out: Vec<Listen> = addresses
        .iter()
        .filter(|a| narrowed.covers(a))
        .map(|a| Listen::At(*a))
        .collect();
    if !narrowed.v4 {
        out.push(Listen::AnyV4);
    }
    if !narrowed.v6 {
        out.push(Listen::AnyV6);
    }
    out.sort();
    out.dedup();
    out
}

/// PURE: kube-proxy's answer to any request on a health check port (semantics 8.2, 8.3), for
/// a request to an address of family `v6` (`ServiceHealth::local_endpoints`).
fn response(service: &ServiceHealth, proxy_healthy: bool, v6: bool) -> Response {
    let local_endpoints = service.local_endpoints(v6);
    let status = if local_endpoints > 0 && proxy_healthy {
        200
    } else {
        503
    };
    // Byte for byte as kube-proxy writes it (a dedented template: tabs, this key order, no
    // final newline), for checks that compare the text.
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
         \"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quoted(&service.namespace),
        quoted(&service.name)
    );
    Response {
        status,
        content_type: "application/json",
        extra_headers: vec![(
            "X-Load-Balancing-Endpoint-Weight",
            local_endpoints.to_string(),
        )],
        body: body.into_bytes(),
    }
}

/// Locks, ignoring poisoning: every critical section leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the server of one port answers from; updated in place by [`HealthChecks::update`].
struct PortHandler {
    service: Mutex<ServiceHealth>,
    health: Arc<Health>,
}

impl Handler for PortHandler {
    /// Every path and method gets the same answer (semantics 8.2).
    fn handle(&self, request: &Request<'_>) -> Response {
        let service = lock(&self.service).clone();
        // A v4-mapped address (an IPv4 client of a dual-stack socket) is IPv4.
        let v6 = request
            .local
            .is_some_and(|a| a.ip().to_canonical().is_ipv6());
        response(&service, self.health.is_healthy(SystemTime::now()), v6)
    }
}

struct Running {
    handler: Arc<PortHandler>,
    /// The sockets bound so far (a port some of whose sockets fail is served on the others).
    servers: BTreeMap<Listen, Server>,
}

#[derive(Default)]
struct State {
    running: BTreeMap<u16, Running>,
    /// Wanted ports not served on every socket after the last update (logged once until they
    /// are, or stop being wanted).
    failing: BTreeSet<u16>,
    /// The sockets of the last update ([`listens`]).
    listens: Vec<Listen>,
    /// What the last update was asked for, and when: ports still failing are tried again
    /// every [`BIND_RETRY`] ([`HealthChecks::retry_failing`]), whether or not a sync happens.
    last: Option<(
        BTreeMap<u16, ServiceHealth>,
        Vec<IpAddr>,
        std::time::Instant,
    )>,
}

/// How often a health check port that could not be bound (taken by another process, say) is
/// tried again while nothing else changes.
pub const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// The health check servers of the node.
pub struct HealthChecks {
    health: Arc<Health>,
    metrics: Option<Arc<Metrics>>,
    narrowed: Narrowed,
    /// Where a port that cannot be served is reported (FailedToStartServiceHealthcheck).
    events: Option<crate::events::Events>,
    state: Mutex<State>,
}

impl HealthChecks {
    /// `health` is the proxy's own health (semantics 8.6), part of every answer. Every family
    /// listens on every address until [`HealthChecks::narrowed`] says otherwise.
    pub fn new(health: Arc<Health>, metrics: Option<Arc<Metrics>>) -> HealthChecks {
        HealthChecks {
            health,
            metrics,
            narrowed: Narrowed::default(),
            events: None,
            state: Mutex::default(),
        }
    }

    /// Reports a port that cannot be served as kube-proxy's `FailedToStartServiceHealthcheck`
    /// event on its Service (semantics 8.1), once until it is served again.
    pub fn with_events(mut self, events: crate::events::Events) -> HealthChecks {
        self.events = Some(events);
        self
    }

    /// The families `--nodeport-addresses` narrows to the node's NodePort addresses.
    pub fn narrowed(mut self, narrowed: Narrowed) -> HealthChecks {
        self.narrowed = narrowed;
        self
    }

    /// Tries the ports that could not be served again, once [`BIND_RETRY`] has passed since the
    /// last update: a port another process held at the first try is served once it is free,
    /// without waiting for a change of the cluster. Cheap to call often.
    pub fn retry_failing(&self) {
        let last = {
            let state = lock(&self.state);
            match &state.last {
                Some((wanted, addresses, at))
                    if !state.failing.is_empty() && at.elapsed() >= BIND_RETRY =>
                {
                    Some((wanted.clone(), addresses.clone()))
                }
                _ => None,
            }
        };
        if let Some((wanted, addresses)) = last {
            self.update(&wanted, &addresses);
        }
    }

    /// Makes the running servers match `wanted` (from [`wanted`]) on the sockets `addresses`
    /// (the node's NodePort addresses) call for ([`listens`]): stops the unwanted ones and
    /// those on sockets no longer called for, updates the others in place and binds the
    /// missing ones. A socket that cannot be bound is logged (once while its port keeps
    /// failing) and counted, and tried again at the next update.
    pub fn update(&self, wanted: &BTreeMap<u16, ServiceHealth>, addresses: &[IpAddr]) {
        let listens = listens(self.narrowed, addresses);
        let mut state = lock(&self.state);
        state.last = Some((
            wanted.clone(),
            addresses.to_vec(),
            std::time::Instant::now(),
        ));
        if state.listens != listens {
            if self.narrowed != Narrowed::default() {
                let shown: Vec<String> = listens.iter().map(|l| l.to_string()).collect();
                log::info!(
                    "health checks listen on: {} (--nodeport-addresses)",
                    if shown.is_empty() {
                        "nothing, no node address matches".to_string()
                    } else {
                        shown.join(", ")
                    }
                );
            }
            for r in state.running.values_mut() {
                let (keep, stale): (BTreeMap<_, _>, BTreeMap<_, _>) =
                    std::mem::take(&mut r.servers)
                        .into_iter()
                        .partition(|(l, _)| listens.contains(l));
                r.servers = keep;
                stale.into_values().for_each(Server::stop);
            }
            state.listens = listens.clone();
        }
        let gone: Vec<u16> = state
            .running
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(r) = state.running.remove(&port) {
                let service = lock(&r.handler.service).clone();
                for server in r.servers.into_values() {
                    server.stop();
                }
                log::info!(
                    "health check of Service {}/{} on port {port} stopped",
                    service.namespace,
                    service.name
                );
            }
        }
        state.failing.retain(|p| wanted.contains_key(p));
        for (&port, service) in wanted {
            let State {
                running, failing, ..
            } = &mut *state;
            let r = running.entry(port).or_insert_with(|| Running {
                handler: Arc::new(PortHandler {
                    service: Mutex::new(service.clone()),
                    health: Arc::clone(&self.health),
                }),
                servers: BTreeMap::new(),
            });
            *lock(&r.handler.service) = service.clone();
            let mut started = Vec::new();
            let mut errors = Vec::new();
            let nowhere = listens.is_empty();
            if nowhere {
                errors.push("no node address matches --nodeport-addresses".to_string());
            }
            for &l in &listens {
                if r.servers.contains_key(&l) {
                    continue;
                }
                let handler: Arc<dyn Handler> = r.handler.clone();
                match bind(port, l).and_then(|b| b.map(|s| Server::start(s, handler)).transpose()) {
                    Ok(Some(server)) => {
                        r.servers.insert(l, server);
                        started.push(l.to_string());
                    }
                    // A family the kernel does not have: nothing of it to serve.
                    Ok(None) => {}
                    Err(e) => errors.push(format!("{l}: {e}")),
                }
            }
            if !started.is_empty() {
                log::info!(
                    "serving the health check of Service {}/{} on port {port} ({})",
                    service.namespace,
                    service.name,
                    started.join(", ")
                );
            }
            if errors.is_empty() {
                failing.remove(&port);
                continue;
            }
            // Nothing to bind is no bind failure: `healthcheck_ports{state="failing"}` counts it.
            if let Some(m) = self.metrics.as_ref().filter(|_| !nowhere) {
                m.healthcheck_bind_failures.with(&[]).inc();
            }
            if failing.insert(port) {
                if !nowhere && let Some(events) = &self.events {
                    events.health_check_failed(
                        &service.namespace,
                        &service.name,
                        port,
                        &errors.join("; "),
                    );
                }
                log::error!(
                    "cannot serve the health check of Service {}/{} on port {port}: {}; retrying \
                     every {BIND_RETRY:?}",
                    service.namespace,
                    service.name,
                    errors.join("; ")
                );
            } else {
                log::debug!(
                    "health check port {port} still cannot be served: {}",
                    errors.join("; ")
                );
            }
        }
        if let Some(m) = &self.metrics {
            let serving = state
                .running
                .values()
                .filter(|r| !r.servers.is_empty())
                .count();
            m.set_healthcheck_ports(serving as u64, state.failing.len() as u64);
        }
    }

    /// The ports served now (on at least one socket).
    pub fn serving(&self) -> Vec<u16> {
        lock(&self.state)
            .running
            .iter()
            .filter(|(_, r)| !r.servers.is_empty())
            .map(|(p, _)| *p)
            .collect()
    }
}

/// A listening TCP socket for `port` where `at` says; None for a family the kernel does not
/// have (IPv6 turned off: `Everywhere` is then `0.0.0.0:port`). A node address is bound with
/// the FREEBIND option: an IPv6 address still in duplicate address detection (tentative)
/// cannot be bound otherwise, and the agent sees no change when it stops being tentative.
fn bind(port: u16, at: Listen) -> io::Result<Option<TcpListener>> {
    let (addr, v6only) = match at {
        Listen::Everywhere => (SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), Some(false)),
        Listen::AnyV4 => (SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), None),
        Listen::AnyV6 => (SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), Some(true)),
        Listen::At(ip) => (SocketAddr::new(ip, port), ip.is_ipv6().then_some(true)),
    };
    let socket = match Socket::new(Domain::for_address(addr), Type::STREAM, None) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) && addr.is_ipv6() => {
            return match at {
                Listen::Everywhere => bind(port, Listen::AnyV4),
                _ => Ok(None),
            };
        }
        socket => socket?,
    };
    if let Some(only) = v6only {
        socket.set_only_v6(only)?;
    }
    // As std's TcpListener::bind: a restarted agent can rebind while old connections linger.
    socket.set_reuse_address(true)?;
    match at {
        Listen::At(IpAddr::V4(_)) => socket.set_freebind_v4(true)?,
        Listen::At(IpAddr::V6(_)) => socket.set_freebind_v6(true)?,
        _ => {}
    }
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(Some(socket.into()))
}

#[cfg(test)]
mod tests;
