//! `kube-bpf-proxy monitor`: the data path's translations and drops as they happen, from the
//! `LB_EVENTS` ring buffer. The programs write events only while a monitor's lease in
//! `LB_MONITOR` runs (renewed every second, `MONITOR_LEASE_NS` long); when the last monitor
//! stops, or is killed, they stop within the lease and the data path pays one map lookup per
//! event site again.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use proxy_common::{
    backend::FAMILY_V4,
    event::{EVENT_DROPPED, EVENT_TRANSLATED, Event, MONITOR_LEASE_NS},
    proto,
    reason::{Hook, Reason},
};
use serde::Serialize;

use super::{
    api::{Document, FrontendScope, Kind, ServiceRef},
    view,
};
use crate::{
    compile::{Family, Proto},
    datapath::{MapIo as _, bpf},
    model::Scheduler,
    plan::ServiceKey,
};

#[derive(clap::Args)]
pub struct MonitorArgs {
    /// Pin directory on a bpffs.
    #[arg(long, default_value = bpf::DEFAULT_PIN_DIR)]
    pub bpffs: PathBuf,
    /// Only events of this Service (`namespace/name`, or `namespace/name:port`).
    #[arg(long)]
    pub service: Option<String>,
    /// Only events whose client, frontend or backend address is this one.
    #[arg(long)]
    pub address: Option<IpAddr>,
    /// Only events of these reasons (`translated`, `affinity_hit`, or a drop reason such as
    /// `no_backends`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub reason: Vec<String>,
    /// Only translations, or only drops.
    #[arg(long, value_enum)]
    pub kind: Option<KindFilter>,
    /// Output: one line of text, or one JSON object, per event.
    #[arg(long, short, value_enum, default_value_t = MonitorFormat::Text)]
    pub output: MonitorFormat,
    /// Stop after this many events (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Stop after this many seconds (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    pub seconds: u64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KindFilter {
    Translated,
    Dropped,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MonitorFormat {
    Text,
    Json,
}

/// What happened to the packet or connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EventKind {
    Translated,
    Dropped,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Translated => "translated",
            EventKind::Dropped => "dropped",
        }
    }
}

/// One event as printed: a line of text, or (`--output json`) an `Event` document per line
/// (`schema/event.v1.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    /// RFC 3339, from the event's monotonic time.
    pub time: String,
    pub event: EventKind,
    /// `connect`, `sendmsg`, `tc_ingress`, `xdp` or `tc_egress`.
    pub hook: &'static str,
    /// `None` for a protocol the proxy does not translate (never written by the programs).
    pub protocol: Option<Proto>,
    pub family: Family,
    pub client: Option<IpAddr>,
    pub client_port: u16,
    pub frontend: Option<IpAddr>,
    pub frontend_port: u16,
    /// `namespace/name:port/PROTOCOL` of the frontend's Service port, when known (text output
    /// and `--service`).
    #[serde(skip)]
    pub service_name: Option<String>,
    /// The frontend's Service port, when known.
    pub service: Option<ServiceRef>,
    /// Which of the Service's addresses the frontend is, when known.
    pub scope: Option<FrontendScope>,
    /// The frontend's scheduler, when known.
    pub scheduler: Option<Scheduler>,
    pub backend: Option<IpAddr>,
    pub backend_port: u16,
    pub backend_id: u32,
    /// `translated`, `affinity_hit`, or why it was dropped.
    pub reason: &'static str,
}

impl Kind for EventView {
    const KIND: &'static str = "Event";
}

/// A frontend's Service port as the maps name it.
#[derive(Clone, Debug)]
struct Named {
    name: String,
    scheduler: Scheduler,
    scope: Option<FrontendScope>,
}

/// What the maps say about frontends, for naming events: refreshed when an event names a
/// frontend id not in it (at most once a second).
#[derive(Default)]
pub struct Names {
    by_id: BTreeMap<u32, Named>,
    by_frontend: BTreeMap<(IpAddr, u16, u8), u32>,
    refreshed: Option<Instant>,
}

impl Names {
    pub fn read(maps: &bpf::Maps) -> anyhow::Result<Names> {
        let state = maps.dump()?;
        let mut names = Names {
            refreshed: Some(Instant::now()),
            ..Names::default()
        };
        for (id, info) in &state.infos {
            names.by_id.insert(
                *id,
                Named {
                    name: info.name().to_string(),
                    scheduler: Scheduler::Random,
                    scope: view::scope_of(info.kind),
                },
            );
        }
        for (key, svc) in &state.services {
            if let Some(entry) = names.by_id.get_mut(&svc.id) {
                entry.scheduler = view::scheduler_of(svc, &[]);
            }
            let (addr, port, proto_) = match key {
                ServiceKey::V4(k) => (IpAddr::from(k.addr), k.port, k.proto),
                ServiceKey::V6(k) => (IpAddr::from(k.addr), k.port, k.proto),
            };
            names.by_frontend.insert((addr, port, proto_), svc.id);
        }
        Ok(names)
    }

    fn stale(&self) -> bool {
        self.refreshed
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    }
}

/// Reasons an event can carry, by name (for `--reason`).
fn reason_named(name: &str) -> Option<Reason> {
    Reason::ALL.into_iter().find(|r| r.name() == name)
}

fn address(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    let ip = if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    };
    (!ip.is_unspecified()).then_some(ip)
}

fn protocol(p: u8) -> Option<Proto> {
    match p {
        proto::TCP => Some(Proto::Tcp),
        proto::UDP => Some(Proto::Udp),
        proto::SCTP => Some(Proto::Sctp),
        _ => None,
    }
}

/// The event as printed; `mono_to_wall` turns its monotonic time into wall-clock nanoseconds.
pub fn view(e: &Event, names: &Names, mono_to_wall: impl Fn(u64) -> i128) -> EventView {
    let frontend = address(e.family, &e.frontend);
    // A refused connect() does not know its frontend's id: the address names it.
    let svc_id = match (e.svc_id, frontend) {
        (0, Some(ip)) => names
            .by_frontend
            .get(&(ip, e.frontend_port, e.proto))
            .copied()
            .or_else(|| {
                // An IPv4-mapped IPv6 frontend is an IPv4 Service's.
                let IpAddr::V6(v6) = ip else { return None };
                let v4 = v6.to_ipv4_mapped()?;
                names
                    .by_frontend
                    .get(&(IpAddr::V4(v4), e.frontend_port, e.proto))
                    .copied()
            })
            .unwrap_or(0),
        (id, _) => id,
    };
    let named = names.by_id.get(&svc_id);
    let time = jiff::Timestamp::from_nanosecond(mono_to_wall(e.time_ns))
        .map(|t| t.to_string())
        .unwrap_or_default();
    EventView {
        time,
        event: if e.kind == EVENT_DROPPED {
            EventKind::Dropped
        } else {
            EventKind::Translated
        },
        hook: Hook::from_u8(e.hook).map_or("unknown", Hook::name),
        protocol: protocol(e.proto),
        family: if e.family == FAMILY_V4 {
            Family::V4
        } else {
            Family::V6
        },
        client: address(e.family, &e.client),
        client_port: e.client_port,
        frontend,
        frontend_port: e.frontend_port,
        service_name: named.map(|n| n.name.clone()),
        service: named.and_then(|n| view::parse_service(&n.name)),
        scope: named.and_then(|n| n.scope),
        scheduler: named.map(|n| n.scheduler),
        backend: address(e.family, &e.backend),
        backend_port: e.backend_port,
        backend_id: e.backend_id,
        reason: Reason::from_index(e.reason).map_or("unknown", Reason::name),
    }
}

/// The filters of the command line.
pub struct Filter {
    pub service: Option<String>,
    pub address: Option<IpAddr>,
    pub reasons: Vec<Reason>,
    pub kind: Option<KindFilter>,
}

impl Filter {
    pub fn from_args(args: &MonitorArgs) -> anyhow::Result<Filter> {
        let mut reasons = Vec::new();
        for name in &args.reason {
            match reason_named(name) {
                Some(r) => reasons.push(r),
                None => bail!(
                    "unknown reason {name:?}; reasons: {}",
                    Reason::ALL.map(Reason::name).join(", ")
                ),
            }
        }
        Ok(Filter {
            service: args.service.clone(),
            address: args.address,
            reasons,
            kind: args.kind,
        })
    }

    pub fn admits(&self, v: &EventView) -> bool {
        if let Some(kind) = self.kind {
            let want = match kind {
                KindFilter::Translated => EventKind::Translated,
                KindFilter::Dropped => EventKind::Dropped,
            };
            if v.event != want {
                return false;
            }
        }
        if !self.reasons.is_empty() && !self.reasons.iter().any(|r| r.name() == v.reason) {
            return false;
        }
        if let Some(a) = self.address
            && ![v.client, v.frontend, v.backend].contains(&Some(a))
        {
            return false;
        }
        if let Some(s) = &self.service {
            // `namespace/name` matches every port of the Service; `namespace/name:port` one.
            let Some(name) = &v.service_name else {
                return false;
            };
            let matches = name == s
                || name
                    .strip_prefix(s.as_str())
                    .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('/'));
            if !matches {
                return false;
            }
        }
        true
    }
}

/// The text line of an event.
pub fn text(v: &EventView) -> String {
    let ip = |a: Option<IpAddr>, port: u16| match (a, port) {
        (None, 0) => "?".to_string(),
        (None, p) => format!("?:{p}"),
        (Some(IpAddr::V6(a)), 0) => a.to_string(),
        (Some(IpAddr::V6(a)), p) => format!("[{a}]:{p}"),
        (Some(a), 0) => a.to_string(),
        (Some(a), p) => format!("{a}:{p}"),
    };
    let service = v.service_name.as_deref().unwrap_or("-");
    let mut line = format!(
        "{} {} {} {} {} -> {} ({service})",
        v.time,
        v.event.as_str(),
        v.hook,
        v.protocol.map_or("?", Proto::as_str),
        ip(v.client, v.client_port),
        ip(v.frontend, v.frontend_port),
    );
    if v.event == EventKind::Translated {
        line.push_str(&format!(
            " -> {} backend {} scheduler {} reason {}",
            ip(v.backend, v.backend_port),
            v.backend_id,
            v.scheduler.map_or("-", Scheduler::as_str),
            v.reason
        ));
    } else {
        line.push_str(&format!(" reason {}", v.reason));
    }
    line
}

static STOP: AtomicBool = AtomicBool::new(false);

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn events_lost(maps: &bpf::Maps) -> u64 {
    maps.stats()
        .ok()
        .and_then(|s| s.into_iter().find(|(r, _)| *r == Reason::EventsLost))
        .map_or(0, |(_, n)| n)
}

pub fn run(args: MonitorArgs) -> anyhow::Result<()> {
    let filter = Filter::from_args(&args)?;
    let mut maps = bpf::Maps::open_pinned(&args.bpffs)?;
    let mut ring = bpf::open_events(&args.bpffs)?;
    let mut names = Names::read(&maps)?;
    let lost_before = events_lost(&maps);
    super::signals::stop_on_signals(&STOP)?;
    let started = Instant::now();
    let mut renewed: Option<Instant> = None;
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let result = (|| -> anyhow::Result<()> {
        while !STOP.load(Ordering::Relaxed) {
            if args.seconds > 0 && started.elapsed() >= Duration::from_secs(args.seconds) {
                break;
            }
            if renewed.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                maps.set_monitor_until(monotonic_ns() + MONITOR_LEASE_NS)
                    .context("switch the data path's events on")?;
                renewed = Some(Instant::now());
            }
            let mut pfd = libc::pollfd {
                fd: ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; an interrupted poll returns -1 and the loop goes on.
            unsafe { libc::poll(&mut pfd, 1, 200) };
            let mono = monotonic_ns();
            let wall = jiff::Timestamp::now().as_nanosecond();
            while let Some(item) = ring.next() {
                if item.len() < size_of::<Event>() {
                    continue;
                }
                // SAFETY: the item holds an `Event` the programs wrote (length checked).
                let event = unsafe { item.as_ptr().cast::<Event>().read_unaligned() };
                drop(item);
                if event.kind != EVENT_TRANSLATED && event.kind != EVENT_DROPPED {
                    continue;
                }
                if event.svc_id != 0 && !names.by_id.contains_key(&event.svc_id) && names.stale() {
                    names = Names::read(&maps)?;
                }
                let v = view(&event, &names, |t| {
                    wall - i128::from(mono.saturating_sub(t))
                });
                if !filter.admits(&v) {
                    continue;
                }
                let line = match args.output {
                    MonitorFormat::Text => text(&v),
                    MonitorFormat::Json => serde_json::to_string(&Document::of(&v))?,
                };
                let mut out = stdout.lock();
                writeln!(out, "{line}")?;
                out.flush()?;
                printed += 1;
                if args.count > 0 && printed >= args.count {
                    return Ok(());
                }
            }
        }
        Ok(())
    })();
    // Events off (another monitor renews its own lease within a second).
    let off = maps.set_monitor_until(0);
    let lost = events_lost(&maps).saturating_sub(lost_before);
    eprintln!(
        "monitor: {printed} events shown{}",
        if lost > 0 {
            format!(", {lost} lost (the ring buffer was full)")
        } else {
            String::new()
        }
    );
    result?;
    off
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u8, hook: Hook, reason: Reason) -> Event {
        let mut client = [0u8; 16];
        client[..4].copy_from_slice(&[10, 244, 0, 5]);
        let mut frontend = [0u8; 16];
        frontend[..4].copy_from_slice(&[10, 96, 0, 10]);
        let mut backend = [0u8; 16];
        if kind == EVENT_TRANSLATED {
            backend[..4].copy_from_slice(&[10, 244, 1, 7]);
        }
        Event {
            kind,
            hook: hook as u8,
            family: FAMILY_V4,
            proto: proto::TCP,
            reason: reason as u32,
            svc_id: 0,
            backend_id: if kind == EVENT_TRANSLATED { 12 } else { 0 },
            time_ns: 1_000,
            client,
            frontend,
            backend,
            client_port: 0,
            frontend_port: 80,
            backend_port: if kind == EVENT_TRANSLATED { 8080 } else { 0 },
            _pad: 0,
        }
    }

    fn names() -> Names {
        let mut n = Names::default();
        n.by_id.insert(
            3,
            Named {
                name: "default/web:http/TCP".into(),
                scheduler: Scheduler::RoundRobin,
                scope: Some(FrontendScope::ClusterIp),
            },
        );
        n.by_frontend
            .insert((IpAddr::from([10, 96, 0, 10]), 80, proto::TCP), 3);
        n
    }

    #[test]
    fn an_event_is_named_by_its_frontend_when_its_id_is_unknown() {
        let v = view(
            &event(EVENT_DROPPED, Hook::Connect, Reason::NoBackends),
            &names(),
            i128::from,
        );
        assert_eq!(v.service_name.as_deref(), Some("default/web:http/TCP"));
        assert_eq!(v.event, EventKind::Dropped);
        assert_eq!(v.hook, "connect");
        assert_eq!(v.reason, "no_backends");
        assert_eq!(v.backend, None);
        assert_eq!(v.client, Some(IpAddr::from([10, 244, 0, 5])));
        assert_eq!(
            text(&v),
            "1970-01-01T00:00:00.000001Z dropped connect TCP 10.244.0.5 -> 10.96.0.10:80 \
             (default/web:http/TCP) reason no_backends"
        );
    }

    #[test]
    fn filters_take_kind_reason_address_and_service() {
        let n = names();
        let t = view(
            &event(EVENT_TRANSLATED, Hook::TcIngress, Reason::Translated),
            &n,
            i128::from,
        );
        assert_eq!(
            text(&t),
            "1970-01-01T00:00:00.000001Z translated tc_ingress TCP 10.244.0.5 -> 10.96.0.10:80 \
             (default/web:http/TCP) -> 10.244.1.7:8080 backend 12 scheduler round-robin reason \
             translated"
        );
        let f =
            |service: Option<&str>, address: Option<[u8; 4]>, reasons: &[Reason], kind| Filter {
                service: service.map(str::to_string),
                address: address.map(IpAddr::from),
                reasons: reasons.to_vec(),
                kind,
            };
        assert!(f(None, None, &[], None).admits(&t));
        assert!(f(Some("default/web"), None, &[], None).admits(&t));
        assert!(f(Some("default/web:http"), None, &[], None).admits(&t));
        assert!(!f(Some("default/we"), None, &[], None).admits(&t));
        assert!(!f(Some("other/web"), None, &[], None).admits(&t));
        assert!(f(None, Some([10, 244, 1, 7]), &[], None).admits(&t));
        assert!(!f(None, Some([10, 244, 1, 8]), &[], None).admits(&t));
        assert!(f(None, None, &[Reason::Translated], None).admits(&t));
        assert!(!f(None, None, &[Reason::NoBackends], None).admits(&t));
        assert!(!f(None, None, &[], Some(KindFilter::Dropped)).admits(&t));
        assert!(f(None, None, &[], Some(KindFilter::Translated)).admits(&t));
        let json = super::super::api::to_value(&t);
        assert_eq!(json["apiVersion"], "kube-bpf-proxy.io/v1");
        assert_eq!(json["kind"], "Event");
        assert_eq!(json["event"], "translated");
        assert_eq!(json["protocol"], "TCP");
        assert_eq!(json["backend"], "10.244.1.7");
        assert_eq!(json["backendPort"], 8080);
        assert_eq!(json["scope"], "clusterIP");
        assert_eq!(json["scheduler"], "round-robin");
        assert_eq!(
            json["service"],
            serde_json::json!({"namespace": "default", "name": "web", "port": "http"})
        );
    }

    /// `-o json` lines against `schema/event.v1.json`: both kinds, both families, every hook
    /// and reason, named and unnamed frontends.
    #[test]
    fn json_events_follow_their_schema() {
        use super::super::schema_tests::{EVENT, assert_invalid, assert_valid, schema};
        let names = names();
        let mut seen = 0;
        for hook in Hook::ALL {
            for reason in Reason::ALL {
                for kind in [EVENT_TRANSLATED, EVENT_DROPPED] {
                    let mut e = event(kind, hook, reason);
                    let v4 = view(&e, &names, i128::from);
                    assert_valid(EVENT, &super::super::api::to_value(&v4));
                    e.family = proxy_common::backend::FAMILY_V6;
                    e.client = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5).octets();
                    e.frontend = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 10).octets();
                    e.svc_id = 99;
                    let v6 = view(&e, &names, i128::from);
                    assert_eq!(v6.service, None);
                    assert_valid(EVENT, &super::super::api::to_value(&v6));
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, Hook::ALL.len() * Reason::ALL.len() * 2);
        let mut odd = event(EVENT_DROPPED, Hook::Xdp, Reason::Fragment);
        odd.hook = 200;
        odd.reason = 999;
        odd.proto = 47;
        let v = view(&odd, &names, i128::from);
        assert_eq!((v.hook, v.reason, v.protocol), ("unknown", "unknown", None));
        let doc = super::super::api::to_value(&v);
        assert_valid(EVENT, &doc);
        // Every reason the programs can write is one the schema names.
        let reasons = schema(EVENT)["properties"]["reason"]["enum"].clone();
        for r in Reason::ALL {
            assert!(
                reasons.as_array().unwrap().contains(&r.name().into()),
                "{} missing from the schema",
                r.name()
            );
        }
        let mut bad = doc.clone();
        bad["protocol"] = "tcp".into();
        assert_invalid(EVENT, &bad, "a protocol in lower case");
        let mut bad = doc;
        bad["service"] = "default/web:http/TCP".into();
        assert_invalid(EVENT, &bad, "the service as one string");
    }

    #[test]
    fn unknown_reasons_are_refused_with_the_list() {
        let args = MonitorArgs {
            bpffs: PathBuf::from("/nonexistent"),
            service: None,
            address: None,
            reason: vec!["nope".into()],
            kind: None,
            output: MonitorFormat::Text,
            count: 0,
            seconds: 0,
        };
        let err = Filter::from_args(&args).err().unwrap().to_string();
        assert!(err.contains("unknown reason \"nope\""), "{err}");
        assert!(err.contains("source_range_drop"), "{err}");
    }
}
