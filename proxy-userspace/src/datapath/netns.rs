//! The network namespaces whose sockets the hooks see (those of the processes in the hooked
//! cgroup), and the source address each one connects from towards load balancer IPs that have
//! loadBalancerSourceRanges: kept in `LB_NETNS_SRC`, so that the socket hooks can check a
//! source (semantics 7.8) at connect() and sendmsg(), before the kernel has picked one.
//!
//! The source is what the namespace's own routing picks (`ip route get VIP` inside it): a pod's
//! address, or the host's address towards the VIP. A namespace not seen yet (a pod started in
//! the last moments) is absent from the map; the hooks then leave its sockets untranslated and
//! the packet path, which sees the real source, checks the ranges instead.

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Service;
use proxy_common::service::{NETNS_HAS_V4, NETNS_HAS_V6, NetnsSource};

use super::{bpf::NetnsSources, netlink, sockdiag};
use crate::metrics::{Metrics, Series};

/// Where sources are probed towards: one load balancer IP with source ranges per family. A
/// family without one needs no sources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Targets {
    /// The lowest load balancer IP of each family among Services with
    /// loadBalancerSourceRanges (ipMode Proxy excluded: such IPs are not programmed).
    pub fn of<'a>(services: impl IntoIterator<Item = &'a Service>) -> Targets {
        let mut out = Targets::default();
        for svc in services {
            let ranged = svc
                .spec
                .as_ref()
                .and_then(|s| s.load_balancer_source_ranges.as_ref())
                .is_some_and(|r| r.iter().any(|c| !c.trim().is_empty()));
            if !ranged {
                continue;
            }
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            for i in ingress.into_iter().flatten() {
                if i.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                match i
                    .ip
                    .as_deref()
                    .and_then(|ip| ip.trim().parse::<IpAddr>().ok())
                {
                    Some(IpAddr::V4(a)) => out.v4 = Some(out.v4.map_or(a, |b| b.min(a))),
                    Some(IpAddr::V6(a)) => out.v6 = Some(out.v6.map_or(a, |b| b.min(a))),
                    None => {}
                }
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

/// The current namespace's cookie (SO_NETNS_COOKIE, the value `bpf_get_netns_cookie` gives).
fn own_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a u64 buffer with its length, as SO_NETNS_COOKIE writes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The current namespace's cookie and its source towards `targets`.
fn probe_here(targets: &Targets) -> io::Result<(u64, NetnsSource)> {
    let cookie = own_cookie()?;
    let mut rtnl = netlink::Rtnl::new()?;
    let mut source = NetnsSource::default();
    if let Some(t) = targets.v4
        && let Some(IpAddr::V4(a)) = rtnl.route_source(IpAddr::V4(t))?
    {
        source.v4 = a.octets();
        source.flags |= NETNS_HAS_V4;
    }
    if let Some(t) = targets.v6
        && let Some(IpAddr::V6(a)) = rtnl.route_source(IpAddr::V6(t))?
    {
        source.v6 = a.octets();
        source.flags |= NETNS_HAS_V6;
    }
    Ok((cookie, source))
}

/// Where container runtimes pin pod network namespaces (containerd and CRI-O under
/// /var/run/netns, Docker under /var/run/docker/netns; `ip netns` under /run/netns). A pod's
/// namespace is there from the moment its sandbox exists, before any of its processes run.
const PINNED_NETNS_DIRS: [&str; 3] = ["/run/netns", "/var/run/netns", "/var/run/docker/netns"];

/// Every network namespace whose sockets may reach the hooks, one path per namespace (by
/// inode): those of the processes in `cgroup`, and those pinned by container runtimes.
fn namespaces(cgroup: &Path) -> BTreeMap<u64, PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = BTreeMap::new();
    let pinned = PINNED_NETNS_DIRS
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()));
    let of_processes = sockdiag::namespaces_by_link(cgroup).into_values();
    for path in of_processes.chain(pinned) {
        // stat follows /proc/PID/ns/net to the namespace itself; a pinned file is one.
        if let Ok(meta) = fs::metadata(&path)
            && meta.dev() != 0
        {
            out.entry(meta.ino()).or_insert(path);
        }
    }
    out
}

/// What was found in one namespace, and when.
struct Known {
    cookie: u64,
    source: NetnsSource,
    targets: Targets,
    probed: Instant,
}

/// How often every namespace is looked for when no link event wakes the thread.
const SCAN_TICK: Duration = Duration::from_secs(2);
/// The shortest time between two scans, however many events arrive.
const SCAN_GAP: Duration = Duration::from_millis(100);
/// How often a known namespace's source is probed again (addresses and routes may change).
const REPROBE: Duration = Duration::from_secs(30);

/// Keeps `LB_NETNS_SRC` equal to the sources of the namespaces of `cgroup`'s processes towards
/// the current `targets`, on a thread started now. Must be called before the agent drops its
/// capabilities: entering namespaces needs CAP_SYS_ADMIN and CAP_SYS_PTRACE, which this thread
/// keeps (as the socket-termination thread does) while the others drop them.
pub fn follow(
    pin_dir: PathBuf,
    cgroup: PathBuf,
    targets: Arc<Mutex<Targets>>,
    metrics: Option<Arc<Metrics>>,
) -> io::Result<()> {
    let mut map = NetnsSources::open_pinned(&pin_dir).map_err(io::Error::other)?;
    thread::Builder::new().name("netns".into()).spawn(move || {
        if let Err(e) = super::caps::drop_to(super::caps::TERMINATOR) {
            log::warn!("netns thread could not drop capabilities: {e}");
        }
        let home = match fs::File::open("/proc/thread-self/ns/net") {
            Ok(f) => f,
            Err(e) => {
                log::error!("loadBalancerSourceRanges for pods and the host disabled: {e}");
                return;
            }
        };
        let mut events = netlink::Events::subscribe()
            .inspect_err(|e| log::warn!("netns thread: no link events ({e}); polling only"))
            .ok();
        let mut known: BTreeMap<u64, Known> = BTreeMap::new();
        let mut written: Option<BTreeMap<u64, NetnsSource>> = None;
        loop {
            let scanned = Instant::now();
            let wanted_targets = *targets.lock().expect("targets lock");
            if wanted_targets.is_empty() {
                known.clear();
            } else {
                let namespaces = namespaces(&cgroup);
                known.retain(|ino, _| namespaces.contains_key(ino));
                for (ino, path) in &namespaces {
                    let fresh = known.get(ino).is_some_and(|k| {
                        k.targets == wanted_targets && k.probed.elapsed() < REPROBE
                    });
                    if fresh {
                        continue;
                    }
                    match probe_in(path, &wanted_targets, &home) {
                        Ok((cookie, source)) => {
                            known.insert(
                                *ino,
                                Known {
                                    cookie,
                                    source,
                                    targets: wanted_targets,
                                    probed: Instant::now(),
                                },
                            );
                        }
                        Err(Fatal::Namespace(e)) => {
                            // Gone meanwhile, or not enterable: tried again next time.
                            log::debug!("netns {}: {e}", path.display());
                        }
                        Err(Fatal::Home(e)) => {
                            log::error!(
                                "netns thread cannot return to the agent's network namespace \
                                 ({e}); loadBalancerSourceRanges for pods are no longer followed"
                            );
                            return;
                        }
                    }
                }
            }
            let wanted: BTreeMap<u64, NetnsSource> = known
                .values()
                .filter(|k| k.source.flags != 0)
                .map(|k| (k.cookie, k.source))
                .collect();
            if written.as_ref() != Some(&wanted) {
                match map.sync(&wanted) {
                    Ok((w, r)) => {
                        if w + r > 0 {
                            log::debug!(
                                "LB_NETNS_SRC: {} namespaces ({w} written, {r} removed)",
                                wanted.len()
                            );
                        }
                        if let Some(m) = &metrics {
                            m.netns_sources.with(&[]).set(wanted.len() as u64);
                        }
                        written = Some(wanted);
                    }
                    Err(e) => log::warn!("{e:#}; retrying"),
                }
            }
            match &mut events {
                Some(ev) => {
                    ev.wait(SCAN_TICK);
                }
                None => thread::sleep(SCAN_TICK),
            }
            thread::sleep(SCAN_GAP.saturating_sub(scanned.elapsed()));
        }
    })?;
    Ok(())
}

enum Fatal {
    /// This namespace could not be probed.
    Namespace(io::Error),
    /// The thread is stuck in another namespace.
    Home(io::Error),
}

/// Enters the namespace at `path`, probes it and comes back to `home`.
fn probe_in(path: &Path, targets: &Targets, home: &fs::File) -> Result<(u64, NetnsSource), Fatal> {
    sockdiag::enter(path).map_err(Fatal::Namespace)?;
    let found = probe_here(targets);
    // SAFETY: our own namespace fd; affects only this thread.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Fatal::Home(io::Error::last_os_error()));
    }
    found.map_err(Fatal::Namespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus,
    };

    fn lb(ranges: &[&str], ips: &[(&str, Option<&str>)]) -> Service {
        Service {
            spec: Some(ServiceSpec {
                load_balancer_source_ranges: Some(ranges.iter().map(|r| r.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        ips.iter()
                            .map(|(ip, mode)| LoadBalancerIngress {
                                ip: Some(ip.to_string()),
                                ip_mode: mode.map(str::to_string),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn targets_are_the_lowest_ranged_vip_of_each_family() {
        let services = [
            lb(&[], &[("192.0.2.1", None)]),
            lb(
                &["10.0.0.0/8"],
                &[("198.51.100.9", None), ("fd00::9", None)],
            ),
            lb(
                &[" 10.0.0.0/8 "],
                &[("198.51.100.7", None), ("203.0.113.1", Some("Proxy"))],
            ),
            lb(&["10.0.0.0/8"], &[("not an ip", None)]),
        ];
        let t = Targets::of(&services);
        assert_eq!(t.v4, Some("198.51.100.7".parse().unwrap()));
        assert_eq!(t.v6, Some("fd00::9".parse().unwrap()));
        assert!(Targets::of(&services[..1]).is_empty());
    }

    #[test]
    fn own_namespace_has_a_cookie() {
        // SO_NETNS_COOKIE exists since Linux 5.14; every kernel this agent supports has it.
        assert_ne!(own_cookie().expect("SO_NETNS_COOKIE"), 0);
    }
}
