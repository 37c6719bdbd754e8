//! The network namespaces whose sockets the hooks see (those of the processes in the hooked
//! cgroup), and the source address each one connects from towards load balancer IPs that have
//! loadBalancerSourceRanges: kept in `LB_NETNS_SRC`, so that the socket hooks can check a
//! source (semantics 7.8) at connect() and sendmsg(), before the kernel has picked one.
//!
//! The source is what the namespace's own routing picks (`ip route get VIP` inside it): a pod's
//! address, or the host's address towards the VIP. A namespace not seen yet (a pod started in
//! the last moments) is absent from the map; the hooks then leave its sockets untranslated and
//! the packet path, which sees the real source, checks the ranges instead.
//!
//! With pod-facing interfaces on (`PodAddresses`), every namespace but the node's own is also a
//! pod's: its addresses are handed to the pod-interface manager (their interfaces get tc), and
//! once the interface an address enters the node through carries tc, the namespace is marked
//! (`NETNS_POD_TC4`/`NETNS_POD_TC6`): the socket hooks then leave its connections to the
//! frontends kube-proxy masquerades to tc (semantics 7.13).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Service;
use proxy_common::{
    info::{IFACE_EXTERNAL, IFACE_KEPT, IFACE_REMOTE_ROUTE},
    service::{NETNS_HAS_V4, NETNS_HAS_V6, NETNS_POD_TC4, NETNS_POD_TC6, NetnsSource},
};

use super::{
    bpf::NetnsSources,
    netlink::{self, RouteHit},
    sockdiag, tclinks,
};
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
                match i.ip.as_deref().and_then(crate::objects::parse_lenient) {
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

/// The addresses of this node's pods, as found in their network namespaces: the node thread
/// hands them to the pod-interface manager, so that their interfaces carry tc.
#[derive(Debug, Default)]
pub struct PodAddresses {
    /// Bumped whenever `addresses` changes.
    pub generation: AtomicU64,
    pub addresses: Mutex<BTreeSet<IpAddr>>,
}

impl PodAddresses {
    /// The addresses and their generation.
    pub fn get(&self) -> (u64, BTreeSet<IpAddr>) {
        let addresses = self.addresses.lock().expect("pod addresses lock");
        (self.generation.load(Ordering::Acquire), addresses.clone())
    }

    fn set(&self, wanted: BTreeSet<IpAddr>) {
        let mut addresses = self.addresses.lock().expect("pod addresses lock");
        if *addresses != wanted {
            *addresses = wanted;
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// A pod's own addresses: unicast, neither loopback nor link-local (a pod reaches the node's
/// frontends from these).
fn pod_address(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !(a.is_loopback() || a.is_link_local() || a.is_unspecified()),
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unicast_link_local()
                || a.is_unspecified()
                || a.is_multicast())
        }
    }
}

/// PURE: a pod namespace's address of each family its route to a target did not give
/// (no Service has loadBalancerSourceRanges): its own (the first, sorted). The socket hooks key
/// a pod's session affinity by it, as tc keys the pod's packets (semantics 6.2), and name the
/// pod in monitor events.
fn own_address_source(source: &mut NetnsSource, addresses: &[IpAddr]) {
    for ip in addresses {
        match ip {
            IpAddr::V4(a) if source.flags & NETNS_HAS_V4 == 0 => {
                source.v4 = a.octets();
                source.flags |= NETNS_HAS_V4;
            }
            IpAddr::V6(a) if source.flags & NETNS_HAS_V6 == 0 => {
                source.v6 = a.octets();
                source.flags |= NETNS_HAS_V6;
            }
            _ => {}
        }
    }
}

/// Whether an interface carrying tc for reason `why` (`IFACE_*`) faces pods (not where traffic
/// from outside the node arrives).
fn faces_pods(why: u8) -> bool {
    !matches!(why, IFACE_EXTERNAL | IFACE_KEPT | IFACE_REMOTE_ROUTE)
}

/// `NETNS_POD_TC4` | `NETNS_POD_TC6` for a pod with `addresses`: the families in which the
/// kernel routes an address of the pod straight out of a pod-facing interface carrying tc (or
/// out of a port of such a bridge). `route` answers `ip route get` in the node's namespace;
/// `master` gives a bridge port's bridge.
fn pod_flags(
    addresses: &[IpAddr],
    pod_facing: &BTreeSet<u32>,
    master: &BTreeMap<u32, u32>,
    route: &mut dyn FnMut(IpAddr) -> RouteHit,
) -> u32 {
    let mut flags = 0;
    for ip in addresses {
        let covered = match route(*ip) {
            RouteHit::Direct { oif } => {
                pod_facing.contains(&oif)
                    || master.get(&oif).is_some_and(|m| pod_facing.contains(m))
            }
            _ => false,
        };
        if covered {
            flags |= if ip.is_ipv4() {
                NETNS_POD_TC4
            } else {
                NETNS_POD_TC6
            };
        }
    }
    flags
}

/// Whether a pod of this node with address `ip` is one the netns thread marks for tc
/// ([`pod_flags`]): the node routes `ip` straight out of a pod-facing interface carrying tc
/// (or a port of such a bridge). For `explain`, which knows the client by its address only.
pub fn routes_to_pod_at_tc(pin_dir: &Path, ip: IpAddr) -> io::Result<bool> {
    let mut rtnl = netlink::Rtnl::new()?;
    let (facing, master) = pod_facing(pin_dir, &mut rtnl);
    let flags = pod_flags(&[ip], &facing, &master, &mut |a| {
        rtnl.route_get(a).unwrap_or(RouteHit::None)
    });
    Ok(flags != 0)
}

/// The pod-facing interfaces carrying tc (from `LB_IFACES`) and every bridge port's bridge.
fn pod_facing(pin_dir: &Path, rtnl: &mut netlink::Rtnl) -> (BTreeSet<u32>, BTreeMap<u32, u32>) {
    let facing = match tclinks::recorded(pin_dir) {
        Ok(m) => m
            .into_iter()
            .filter(|(_, info)| faces_pods(info.reason()))
            .map(|(index, _)| index)
            .collect(),
        Err(e) => {
            log::debug!("netns thread: {e:#}");
            BTreeSet::new()
        }
    };
    let master = match rtnl.links() {
        Ok(links) => links
            .into_iter()
            .filter_map(|l| Some((l.index, l.master?)))
            .collect(),
        Err(e) => {
            log::debug!("netns thread: cannot list links: {e}");
            BTreeMap::new()
        }
    };
    (facing, master)
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

/// What was found inside one namespace.
struct Probe {
    cookie: u64,
    source: NetnsSource,
    /// Its own addresses (`pod_address`), when asked for.
    addresses: Vec<IpAddr>,
}

/// The current namespace's cookie, its source towards `targets`, and with `pods` its addresses.
fn probe_here(targets: &Targets, pods: bool) -> io::Result<Probe> {
    let cookie = own_cookie()?;
    let mut rtnl = netlink::Rtnl::new()?;
    let addresses = if pods {
        let mut a: Vec<IpAddr> = rtnl
            .local_addresses()?
            .into_iter()
            .filter(pod_address)
            .collect();
        a.sort();
        a.dedup();
        a
    } else {
        Vec::new()
    };
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
    Ok(Probe {
        cookie,
        source,
        addresses,
    })
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
    probe: Probe,
    targets: Targets,
    probed: Instant,
    /// When the namespace was first seen.
    seen: Instant,
}

impl Known {
    /// Whether the namespace is due for another probe: every `REPROBE`, and at every scan while
    /// it is young (a pod's namespace exists before the CNI has given it its addresses).
    fn stale(&self, targets: &Targets) -> bool {
        let every = if self.seen.elapsed() < YOUNG {
            Duration::ZERO
        } else {
            REPROBE
        };
        self.targets != *targets || self.probed.elapsed() >= every
    }
}

/// What is lost when the thread cannot start: the sources of pods and the host (their
/// loadBalancerSourceRanges at the socket layer) and the marking of pods for tc.
const STOPPED: &str = "netns thread not started: no loadBalancerSourceRanges for pods and the host \
                       at the socket layer, no masquerading of pods' connections to external \
                       frontends";

/// How often every namespace is looked for when no link event wakes the thread.
const SCAN_TICK: Duration = Duration::from_secs(2);
/// The shortest time between two scans, however many events arrive.
const SCAN_GAP: Duration = Duration::from_millis(100);
/// How often a known namespace's source is probed again (addresses and routes may change).
const REPROBE: Duration = Duration::from_secs(30);
/// How long a new namespace is probed at every scan.
const YOUNG: Duration = Duration::from_secs(30);

/// Keeps `LB_NETNS_SRC` equal to the sources of the namespaces of `cgroup`'s processes towards
/// the current `targets` and, with `pods`, to which of them are pods whose interface carries
/// tc (their addresses published in `pods`), on a thread started now. Must be called before the
/// agent drops its capabilities: entering namespaces needs CAP_SYS_ADMIN and CAP_SYS_PTRACE,
/// which this thread keeps (as the socket-termination thread does) while the others drop them.
pub fn follow(
    pin_dir: PathBuf,
    cgroup: PathBuf,
    targets: Arc<Mutex<Targets>>,
    pods: Option<Arc<PodAddresses>>,
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
                log::error!("{STOPPED}: {e}");
                return;
            }
        };
        // The node's own namespace (never a pod's), and a netlink socket that stays in it.
        let (home_cookie, mut home_rtnl) = match (own_cookie(), netlink::Rtnl::new()) {
            (Ok(c), Ok(r)) => (c, r),
            (Err(e), _) | (_, Err(e)) => {
                log::error!("{STOPPED}: {e}");
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
            if wanted_targets.is_empty() && pods.is_none() {
                known.clear();
            } else {
                let namespaces = namespaces(&cgroup);
                known.retain(|ino, _| namespaces.contains_key(ino));
                for (ino, path) in &namespaces {
                    let fresh = known.get(ino).is_some_and(|k| !k.stale(&wanted_targets));
                    if fresh {
                        continue;
                    }
                    let seen = known.get(ino).map_or_else(Instant::now, |k| k.seen);
                    match probe_in(path, &wanted_targets, pods.is_some(), &home) {
                        Ok(mut probe) => {
                            if probe.cookie == home_cookie {
                                probe.addresses.clear();
                            } else {
                                own_address_source(&mut probe.source, &probe.addresses);
                            }
                            known.insert(
                                *ino,
                                Known {
                                    probe,
                                    targets: wanted_targets,
                                    probed: Instant::now(),
                                    seen,
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
            let mut wanted: BTreeMap<u64, NetnsSource> = BTreeMap::new();
            let facing = pods.as_ref().map(|p| {
                p.set(
                    known
                        .values()
                        .flat_map(|k| k.probe.addresses.iter().copied())
                        .collect(),
                );
                pod_facing(&pin_dir, &mut home_rtnl)
            });
            for k in known.values() {
                let mut source = k.probe.source;
                if let Some((facing, master)) = &facing {
                    source.flags |= pod_flags(&k.probe.addresses, facing, master, &mut |ip| {
                        home_rtnl.route_get(ip).unwrap_or(RouteHit::None)
                    });
                }
                if source.flags != 0 {
                    wanted.insert(k.probe.cookie, source);
                }
            }
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
                            let count = |flags| {
                                wanted.values().filter(|s| s.flags & flags != 0).count() as u64
                            };
                            m.netns_sources
                                .with(&[])
                                .set(count(NETNS_HAS_V4 | NETNS_HAS_V6));
                            m.pod_namespaces_at_tc
                                .with(&[])
                                .set(count(NETNS_POD_TC4 | NETNS_POD_TC6));
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
fn probe_in(path: &Path, targets: &Targets, pods: bool, home: &fs::File) -> Result<Probe, Fatal> {
    sockdiag::enter(path).map_err(Fatal::Namespace)?;
    let found = probe_here(targets, pods);
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
    fn a_pod_is_marked_per_family_when_its_address_enters_through_a_pod_facing_tc_interface() {
        // semantics 7.13: only then can tc masquerade the pod's connections. Interface 5
        // carries tc (a pod veth), 7 is a port of bridge 9 (which carries it), 3 is external.
        let facing: BTreeSet<u32> = [5, 9].into();
        let master: BTreeMap<u32, u32> = [(7, 9)].into();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut route = |a: IpAddr| match a.to_string().as_str() {
            "10.244.0.5" | "fd00:244::5" => RouteHit::Direct { oif: 5 },
            "10.244.0.7" => RouteHit::Direct { oif: 7 },
            "10.244.0.8" => RouteHit::Direct { oif: 8 },
            "192.168.77.2" => RouteHit::Direct { oif: 3 },
            "10.244.1.5" => RouteHit::Gateway { oif: 5 },
            _ => RouteHit::None,
        };
        let mut flags = |addrs: &[&str]| {
            let addrs: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
            pod_flags(&addrs, &facing, &master, &mut route)
        };
        assert_eq!(
            flags(&["10.244.0.5", "fd00:244::5"]),
            NETNS_POD_TC4 | NETNS_POD_TC6
        );
        assert_eq!(
            flags(&["10.244.0.7"]),
            NETNS_POD_TC4,
            "a bridge port's bridge"
        );
        // An interface without tc, an external one (another node's namespace, an outside
        // client), a gateway route and no route: not marked.
        for a in ["10.244.0.8", "192.168.77.2", "10.244.1.5", "10.0.0.1"] {
            assert_eq!(flags(&[a]), 0, "{a}");
        }
        assert_eq!(flags(&["10.244.0.8", "fd00:244::5"]), NETNS_POD_TC6);
        assert!(!faces_pods(IFACE_EXTERNAL) && !faces_pods(IFACE_REMOTE_ROUTE));
        assert!(faces_pods(proxy_common::info::IFACE_POD_ROUTE));
    }

    #[test]
    fn a_pods_own_addresses_exclude_loopback_and_link_local() {
        for a in [
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "0.0.0.0",
            "ff02::1",
        ] {
            assert!(!pod_address(&a.parse().unwrap()), "{a}");
        }
        for a in ["10.244.0.5", "fd00:244::5", "2001:db8::5"] {
            assert!(pod_address(&a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn pod_addresses_bump_their_generation_only_on_change() {
        let p = PodAddresses::default();
        let one: BTreeSet<IpAddr> = ["10.244.0.5".parse().unwrap()].into();
        p.set(one.clone());
        p.set(one.clone());
        assert_eq!(p.get(), (1, one));
        p.set(BTreeSet::new());
        assert_eq!(p.get().0, 2);
    }

    #[test]
    fn a_pods_own_addresses_fill_the_families_no_route_gave() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut source = NetnsSource::default();
        own_address_source(
            &mut source,
            &[ip("10.244.0.5"), ip("10.244.0.6"), ip("fd00:244::5")],
        );
        assert_eq!(source.flags, NETNS_HAS_V4 | NETNS_HAS_V6);
        assert_eq!(source.v4, [10, 244, 0, 5]);
        assert_eq!(IpAddr::from(source.v6), ip("fd00:244::5"));
        // A family the route to a target gave keeps that source.
        let mut routed = NetnsSource {
            v4: [10, 244, 0, 9],
            flags: NETNS_HAS_V4,
            ..NetnsSource::default()
        };
        own_address_source(&mut routed, &[ip("10.244.0.5")]);
        assert_eq!((routed.v4, routed.flags), ([10, 244, 0, 9], NETNS_HAS_V4));
    }

    #[test]
    fn own_namespace_has_a_cookie() {
        // SO_NETNS_COOKIE exists since Linux 5.14; every kernel this agent supports has it.
        assert_ne!(own_cookie().expect("SO_NETNS_COOKIE"), 0);
    }
}
