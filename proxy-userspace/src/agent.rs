//! The sync loop: snapshots in, coalesced, compiled, planned and applied to the datapath.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use crate::{
    capacity::fit,
    compile::{Family, Problem, Proto, compile},
    datapath::{MapIo, Removed},
    health::Health,
    metrics::Metrics,
    plan::{MapState, Op, ServiceKey, plan},
    snapshot::Snapshot,
};

/// Where the loop reports what it does (both optional, for tests).
#[derive(Clone, Default)]
pub struct Observers {
    pub metrics: Option<Arc<Metrics>>,
    pub health: Option<Arc<Health>>,
    /// The healthCheckNodePort servers, made to match each successful sync.
    pub health_checks: Option<Arc<crate::healthcheck::HealthChecks>>,
}

/// How bursts of changes are coalesced.
#[derive(Clone, Copy, Debug)]
pub struct SyncTiming {
    /// Sync once no new snapshot arrived for this long...
    pub quiet: Duration,
    /// ...but never later than this after the first unsynced change.
    pub max_delay: Duration,
    /// Wait before retrying a failed sync.
    pub retry: Duration,
}

impl Default for SyncTiming {
    fn default() -> Self {
        SyncTiming {
            quiet: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            retry: Duration::from_secs(1),
        }
    }
}

/// Outcome of one sync, for logs and metrics.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// Backends that stopped being eligible for a frontend in this sync.
    pub removed: Vec<Removed>,
    pub frontends: usize,
    pub writes: usize,
    pub problems: Vec<Problem>,
    pub duration: Duration,
    /// Frontends dropping ClusterIP traffic for lack of local endpoints, per family.
    pub no_local: Vec<(Family, u64)>,
    /// The healthCheckNodePort servers wanted, by port (semantics 8.1).
    pub health_checks: BTreeMap<u16, crate::healthcheck::ServiceHealth>,
}

/// Applies one snapshot: compile, plan against `current`, write. On a failed write `current` is
/// re-read from the maps so the next attempt plans from the truth.
pub fn sync_once(
    io: &mut dyn MapIo,
    current: &mut MapState,
    snapshot: &Snapshot,
    logged: &mut BTreeSet<String>,
) -> anyhow::Result<SyncReport> {
    let started = Instant::now();
    let mut desired = compile(snapshot);
    if let Some(capacity) = io.capacity() {
        fit(&mut desired, current, &capacity);
    }
    let (health_checks, conflicts) = crate::healthcheck::wanted(&desired);
    desired.problems.extend(conflicts);
    let mut now_logged = BTreeSet::new();
    for problem in &desired.problems {
        let line = problem.to_string();
        if !logged.contains(&line) {
            log::warn!("rejected: {line}");
        }
        now_logged.insert(line);
    }
    *logged = now_logged;
    let ops = plan(&desired, current);
    let removed = removed_members(&ops, current);
    for op in &ops {
        if let Err(e) = io.apply(op) {
            *current = io.dump().unwrap_or_else(|_| current.clone());
            return Err(e);
        }
        current.apply(op);
    }
    let no_local = [Family::V4, Family::V6]
        .into_iter()
        .map(|family| {
            let n = desired
                .frontends
                .values()
                .filter(|f| f.no_local && f.port.family == family)
                .count() as u64;
            (family, n)
        })
        .collect();
    Ok(SyncReport {
        removed,
        frontends: desired.frontends.len(),
        writes: ops.len(),
        problems: desired.problems,
        duration: started.elapsed(),
        no_local,
        health_checks,
    })
}

/// Runs until `stop` is set or the source ends.
pub fn run(
    io: &mut dyn MapIo,
    rx: Receiver<Snapshot>,
    timing: SyncTiming,
    stop: &AtomicBool,
    observers: &Observers,
) -> anyhow::Result<()> {
    let agent_started = SystemTime::now();
    let mut previous = Fingerprints::default();
    let mut triggers = TriggerTimes::default();
    let mut current = io.dump()?;
    log::info!(
        "adopted {} frontends and {} backends from the pinned maps",
        current.services.len(),
        current.backends.len()
    );
    let mut logged = BTreeSet::new();
    let mut pending: Option<(Snapshot, Instant, Instant)> = None; // (latest, first, last)
    let tick = Duration::from_millis(20);
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(tick) {
            Ok(snapshot) => {
                if let Some(h) = &observers.health {
                    h.queued(SystemTime::now());
                }
                if let Some(m) = &observers.metrics {
                    m.observe_queued(SystemTime::now());
                }
                let now = Instant::now();
                let first = pending.as_ref().map_or(now, |p| p.1);
                pending = Some((snapshot, first, now));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if pending.is_none() {
                    log::warn!("source ended; keeping the programmed state");
                    return Ok(());
                }
            }
        }
        let due = pending.as_ref().is_some_and(|(_, first, last)| {
            last.elapsed() >= timing.quiet || first.elapsed() >= timing.max_delay
        });
        if !due {
            continue;
        }
        let (snapshot, first, _) = pending.take().expect("due implies pending");
        let attempt = Instant::now();
        let result = sync_once(io, &mut current, &snapshot, &mut logged);
        io.synced(result.is_ok());
        if let Some(m) = &observers.metrics {
            m.observe_sync(attempt.elapsed(), result.is_ok());
        }
        match result {
            Ok(report) => {
                log::info!(
                    "synced: {} frontends, {} map writes, {} rejected objects, {:?} (change to programmed {:?})",
                    report.frontends,
                    report.writes,
                    report.problems.len(),
                    report.duration,
                    first.elapsed()
                );
                if let Some(h) = &observers.health {
                    h.synced(SystemTime::now());
                }
                if let Some(hc) = &observers.health_checks {
                    hc.update(&report.health_checks);
                }
                match io.forget_flows(&report.removed) {
                    Ok(deleted) => {
                        for (family, n) in deleted.into_iter().filter(|(_, n)| *n > 0) {
                            log::info!(
                                "conntrack: deleted {n} IPv{family} UDP entries of removed backends"
                            );
                            if let Some(m) = &observers.metrics {
                                let family = if family == 4 { "IPv4" } else { "IPv6" };
                                m.conntrack_deleted.with(&[("ip_family", family)]).inc_by(n);
                            }
                        }
                    }
                    Err(e) => log::warn!("conntrack cleanup of removed backends: {e:#}"),
                }
                if let Some(t) = io.terminate(&report.removed) {
                    for (proto, n) in &t.destroyed {
                        let proto = Proto::from_number(*proto).map_or("?", Proto::as_str);
                        log::info!(
                            "terminated {n} {proto} socket(s) connected to removed backends"
                        );
                        if let Some(m) = &observers.metrics {
                            m.sockets_terminated.with(&[("protocol", proto)]).inc_by(*n);
                        }
                    }
                    for e in &t.errors {
                        log::warn!("socket termination: {e}");
                        if let Some(m) = &observers.metrics {
                            m.socket_termination_errors.with(&[]).inc();
                        }
                    }
                }
                if let Some(m) = &observers.metrics {
                    m.set_rejected_problems(&report.problems);
                    for (family, n) in &report.no_local {
                        m.set_no_local_endpoints(*family, *n, 0);
                    }
                    let now = Fingerprints::of(&snapshot);
                    let (services, endpoints) = previous.changes(&now);
                    previous = now;
                    m.add_service_changes(services);
                    for (family, n) in endpoints {
                        m.add_endpoint_changes(family, n);
                    }
                    for (family, latency) in triggers.new_latencies(&snapshot, agent_started) {
                        m.observe_programming_latency(family, latency);
                    }
                }
                // Refused for lack of map space: try again shortly, space may have freed.
                if report
                    .problems
                    .iter()
                    .any(|p| p.message.contains("is full"))
                {
                    let later = Instant::now() + timing.retry;
                    pending = Some((snapshot.clone(), later, later));
                }
            }
            Err(e) => {
                if let Some(m) = &observers.metrics {
                    m.map_update_error(map_of_error(&e));
                }
                log::error!("sync failed: {e:#}; keeping the programmed state, retrying");
                std::thread::sleep(timing.retry);
                pending = Some((snapshot, first, Instant::now()));
            }
        }
    }
    Ok(())
}

/// The (frontend, backend) pairs a plan removes, read from the state before it is applied:
/// every deleted member is a backend that stopped being eligible for its frontend.
fn removed_members(ops: &[Op], before: &MapState) -> Vec<Removed> {
    let mut proto_of: Option<BTreeMap<u32, u8>> = None;
    let mut out = Vec::new();
    for op in ops {
        let Op::DelMember(member) = op else { continue };
        let protos = proto_of.get_or_insert_with(|| {
            before
                .services
                .iter()
                .map(|(k, v)| {
                    let proto = match k {
                        ServiceKey::V4(k) => k.proto,
                        ServiceKey::V6(k) => k.proto,
                    };
                    (v.id, proto)
                })
                .collect()
        });
        if let (Some(proto), Some(backend)) = (
            protos.get(&member.svc_id),
            before.backends.get(&member.backend_id),
        ) {
            out.push(Removed {
                proto: *proto,
                svc_id: member.svc_id,
                backend_id: member.backend_id,
                backend: *backend,
            });
        }
    }
    out
}

/// The map named in a failed write's error, for the map_update_errors metric.
fn map_of_error(e: &anyhow::Error) -> &'static str {
    let text = format!("{e:#}");
    proxy_common::maps::ALL
        .into_iter()
        .find(|name| text.contains(name))
        .unwrap_or("unknown")
}

/// A fingerprint per Service and EndpointSlice of the last synced snapshot, to count what
/// changed without keeping a copy of every object.
#[derive(Default)]
struct Fingerprints {
    services: BTreeMap<(String, String), u64>,
    slices: BTreeMap<(String, String), (u64, Family)>,
}

type Meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn object_key(m: &Meta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// The resourceVersion where the object has one (API server), else a hash of its content.
fn fingerprint<T: serde::Serialize>(meta: &Meta, object: &T) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match meta.resource_version.as_deref() {
        Some(rv) if !rv.is_empty() => rv.hash(&mut h),
        _ => serde_json::to_vec(object).unwrap_or_default().hash(&mut h),
    }
    h.finish()
}

impl Fingerprints {
    fn of(snapshot: &Snapshot) -> Fingerprints {
        Fingerprints {
            services: snapshot
                .services
                .iter()
                .map(|s| (object_key(&s.metadata), fingerprint(&s.metadata, s)))
                .collect(),
            slices: snapshot
                .slices
                .iter()
                .map(|s| {
                    let family = if s.address_type == "IPv6" {
                        Family::V6
                    } else {
                        Family::V4
                    };
                    (
                        object_key(&s.metadata),
                        (fingerprint(&s.metadata, s), family),
                    )
                })
                .collect(),
        }
    }

    /// Services, and EndpointSlices per family, added, changed or removed since `self`.
    fn changes(&self, now: &Fingerprints) -> (u64, Vec<(Family, u64)>) {
        let services = now
            .services
            .iter()
            .filter(|(k, v)| self.services.get(*k) != Some(*v))
            .count()
            + self
                .services
                .keys()
                .filter(|k| !now.services.contains_key(*k))
                .count();
        let mut per_family: BTreeMap<Family, u64> = BTreeMap::new();
        for (k, v) in &now.slices {
            if self.slices.get(k) != Some(v) {
                *per_family.entry(v.1).or_default() += 1;
            }
        }
        for (k, v) in &self.slices {
            if !now.slices.contains_key(k) {
                *per_family.entry(v.1).or_default() += 1;
            }
        }
        (services as u64, per_family.into_iter().collect())
    }
}

/// EndpointSlice trigger times already observed, so each change is measured once (fact 11.3).
#[derive(Default)]
struct TriggerTimes {
    seen: BTreeMap<(String, String), String>,
}

const TRIGGER_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl TriggerTimes {
    /// Latencies from each new trigger time to now, skipping those before the agent started.
    fn new_latencies(
        &mut self,
        snapshot: &Snapshot,
        started: SystemTime,
    ) -> Vec<(Family, Duration)> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        let mut seen = BTreeMap::new();
        for slice in &snapshot.slices {
            let key = (
                slice.metadata.namespace.clone().unwrap_or_default(),
                slice.metadata.name.clone().unwrap_or_default(),
            );
            let Some(raw) = slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_ANNOTATION))
            else {
                continue;
            };
            if self.seen.get(&key) != Some(raw)
                && let Some(t) = parse_rfc3339(raw)
                && t >= started
                && let Ok(latency) = now.duration_since(t)
            {
                let family = if slice.address_type == "IPv6" {
                    Family::V6
                } else {
                    Family::V4
                };
                out.push((family, latency));
            }
            seen.insert(key, raw.clone());
        }
        self.seen = seen;
        out
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)`.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let mut n: u64 = frac[..digits].parse().ok()?;
        for _ in digits..9 {
            n *= 10;
        }
        for _ in 9..digits {
            n /= 10;
        }
        nanos = n as u32;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::parse_rfc3339;

    #[test]
    fn rfc3339_parses_utc_fractions_and_offsets() {
        let t = |s| parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap());
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(Duration::ZERO));
        assert_eq!(
            t("2024-02-29T12:34:56Z"),
            Some(Duration::from_secs(1_709_210_096))
        );
        assert_eq!(
            t("2024-02-29T12:34:56.5Z"),
            Some(Duration::new(1_709_210_096, 500_000_000))
        );
        assert_eq!(
            t("2024-02-29T14:34:56+02:00"),
            Some(Duration::from_secs(1_709_210_096))
        );
        assert_eq!(t("not a time"), None);
    }
}
