//! kube-proxy's per-Service health checks (semantics 8.1-8.4): for every LoadBalancer Service
//! with externalTrafficPolicy Local, an HTTP server on its healthCheckNodePort telling cloud
//! load balancers whether this node has a local endpoint to send the Service's traffic to.
//!
//! [`wanted`] is PURE: the compiled state in, the servers that should run out. [`HealthChecks`]
//! owns the listeners and makes them match that set after each successful sync: new ports are
//! bound, ports no longer wanted are closed, and the endpoint counts of running ones are updated
//! in place, without rebinding.
//!
//! Addresses: kube-proxy (without --nodeport-addresses, which this agent does not have)
//! listens on the wildcard address, which Go turns into one dual-stack socket. Likewise, each
//! port here is one `[::]:port` socket with IPV6_V6ONLY explicitly off, so it answers IPv4
//! (as v4-mapped) and IPv6 whatever `net.ipv6.bindv6only` says; on a kernel without IPv6 it is
//! `0.0.0.0:port`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use serde_json::json;

use crate::{
    compile::{Desired, Problem, ProblemReason},
    health::Health,
    http::{Handler, Request, Response, Server},
    metrics::{Metrics, Series},
};

/// What one health check server answers about its Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// Distinct IPs of this node's ready endpoints, over all ports and both families
    /// (semantics 8.4).
    pub local_endpoints: usize,
}

/// PURE: the health check servers `desired` asks for, by port, and the Services that cannot
/// have theirs because another one claims the same port (the first by namespace/name wins).
///
/// Only Service ports whose `health_check_node_port` compile set count: type LoadBalancer
/// with externalTrafficPolicy Local and a valid port (semantics 8.1).
pub fn wanted(desired: &Desired) -> (BTreeMap<u16, ServiceHealth>, Vec<Problem>) {
    // Per Service, in namespace/name order: its port and the IPs of its local ready endpoints.
    let mut services: BTreeMap<(&str, &str), (u16, BTreeSet<IpAddr>)> = BTreeMap::new();
    for sp in desired.ports.values() {
        let Some(port) = sp.health_check_node_port else {
            continue;
        };
        let (_, ips) = services
            .entry((&sp.name.namespace, &sp.name.name))
            .or_insert((port, BTreeSet::new()));
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
    for ((namespace, name), (port, ips)) in services {
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
                local_endpoints: ips.len(),
            },
        );
    }
    (out, problems)
}

/// PURE: kube-proxy's answer to any request on a health check port (semantics 8.2, 8.3).
fn response(service: &ServiceHealth, proxy_healthy: bool) -> Response {
    let status = if service.local_endpoints > 0 && proxy_healthy {
        200
    } else {
        503
    };
    let body = json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": service.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    Response {
        status,
        content_type: "application/json",
        extra_headers: vec![(
            "X-Load-Balancing-Endpoint-Weight",
            service.local_endpoints.to_string(),
        )],
        body: format!("{body}\n").into_bytes(),
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
    fn handle(&self, _: &Request<'_>) -> Response {
        let service = lock(&self.service).clone();
        response(&service, self.health.is_healthy(SystemTime::now()))
    }
}

struct Running {
    handler: Arc<PortHandler>,
    server: Server,
}

#[derive(Default)]
struct State {
    running: BTreeMap<u16, Running>,
    /// Wanted ports whose last bind failed (logged once until they bind or stop being wanted).
    failing: BTreeSet<u16>,
}

/// The health check servers of the node.
pub struct HealthChecks {
    health: Arc<Health>,
    metrics: Option<Arc<Metrics>>,
    state: Mutex<State>,
}

impl HealthChecks {
    /// `health` is the proxy's own health (semantics 8.6), part of every answer.
    pub fn new(health: Arc<Health>, metrics: Option<Arc<Metrics>>) -> HealthChecks {
        HealthChecks {
            health,
            metrics,
            state: Mutex::default(),
        }
    }

    /// Makes the running servers match `wanted` (from [`wanted`]): stops the unwanted ones,
    /// updates the others in place and binds the missing ones. A port that cannot be bound is
    /// logged (once while it keeps failing) and counted, and tried again at the next update.
    pub fn update(&self, wanted: &BTreeMap<u16, ServiceHealth>) {
        let mut state = lock(&self.state);
        let gone: Vec<u16> = state
            .running
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(r) = state.running.remove(&port) {
                let service = lock(&r.handler.service).clone();
                r.server.stop();
                log::info!(
                    "health check of Service {}/{} on port {port} stopped",
                    service.namespace,
                    service.name
                );
            }
        }
        state.failing.retain(|p| wanted.contains_key(p));
        for (&port, service) in wanted {
            if let Some(r) = state.running.get(&port) {
                *lock(&r.handler.service) = service.clone();
                continue;
            }
            let handler = Arc::new(PortHandler {
                service: Mutex::new(service.clone()),
                health: Arc::clone(&self.health),
            });
            match bind(port).and_then(|l| Server::start(l, handler.clone())) {
                Ok(server) => {
                    state.failing.remove(&port);
                    log::info!(
                        "serving the health check of Service {}/{} on port {port}",
                        service.namespace,
                        service.name
                    );
                    state.running.insert(port, Running { handler, server });
                }
                Err(e) => {
                    if let Some(m) = &self.metrics {
                        m.healthcheck_bind_failures.with(&[]).inc();
                    }
                    if state.failing.insert(port) {
                        log::error!(
                            "cannot serve the health check of Service {}/{} on port {port}: {e}; retrying at every sync",
                            service.namespace,
                            service.name
                        );
                    } else {
                        log::debug!("health check port {port} still cannot be bound: {e}");
                    }
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.set_healthcheck_ports(state.running.len() as u64, state.failing.len() as u64);
        }
    }

    /// The ports served now.
    pub fn serving(&self) -> Vec<u16> {
        lock(&self.state).running.keys().copied().collect()
    }
}

/// A listening TCP socket on every address of both families, `[::]:port` dual-stack, or
/// `0.0.0.0:port` when the kernel has no IPv6.
fn bind(port: u16) -> io::Result<TcpListener> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
            return TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)));
        }
        return Err(e);
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |level, name, value: libc::c_int| {
        // SAFETY: setsockopt(2) with a pointer to a c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    // As std's TcpListener::bind: a restarted agent can rebind while old connections linger.
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    // SAFETY: all-zero is a valid sockaddr_in6 (the unspecified address).
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    // SAFETY: bind(2) and listen(2) on our socket with a sockaddr_in6 and its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

#[cfg(test)]
mod tests;
