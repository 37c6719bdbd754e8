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

use std::borrow::Cow;

use proxy_common::backend::BackendValue;

use crate::{
    capacity::{fit, surely_fits},
    compile::{Compiler, Desired, Family, Problem, Proto, Update},
    datapath::{MapIo, Removed},
    health::Health,
    metrics::Metrics,
    plan::{MapState, Mirror, Op},
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
    /// Frontends left as they were because their Maglev table could not be written.
    pub maglev_failures: u64,
    pub frontends: usize,
    pub writes: usize,
    pub problems: Vec<Problem>,
    pub duration: Duration,
    /// Service ports dropping traffic for lack of local endpoints although endpoints exist
    /// elsewhere (semantics 3.8, 3.9, 11.5), per family: (family, internal, external).
    pub no_local: Vec<(Family, u64, u64)>,
    /// The healthCheckNodePort servers wanted, by port (semantics 8.1).
    pub health_checks: BTreeMap<u16, crate::healthcheck::ServiceHealth>,
    /// What changed in the objects, and how the sync planned it.
    pub update: Update,
    /// Planned over every frontend (first sync, node-level change, capacity refusals, a retry
    /// after a failed write) rather than the changed ones only.
    pub planned_all: bool,
}

/// The control plane between syncs: the compile cache (every Service's last compiled share)
/// and the mirror of the maps it plans against. One sync costs what changed, not the cluster.
pub struct Pipeline {
    compiler: Compiler,
    mirror: Mirror,
    /// Plan every frontend next time: the last sync refused Services for lack of map space or
    /// left a Maglev table unwritten, and those are retried.
    full_next: bool,
}

impl Pipeline {
    /// Starts from what the maps hold (an earlier agent's state, or nothing).
    pub fn new(state: MapState) -> Pipeline {
        Pipeline {
            compiler: Compiler::default(),
            mirror: Mirror::new(state),
            full_next: true,
        }
    }

    /// The maps as last written.
    pub fn state(&self) -> &MapState {
        self.mirror.state()
    }

    /// The desired state as last compiled.
    pub fn desired(&self) -> &Desired {
        self.compiler.desired()
    }
}

/// Applies one snapshot: compile what changed, plan it against the mirror, write. On a failed
/// write the mirror is read back from the maps so the next attempt plans from the truth.
pub fn sync_once(
    io: &mut dyn MapIo,
    pipeline: &mut Pipeline,
    snapshot: &Snapshot,
    logged: &mut BTreeSet<String>,
) -> anyhow::Result<SyncReport> {
    let started = Instant::now();
    let update = pipeline.compiler.update(snapshot);
    let compiled = pipeline.compiler.desired();
    let capacity = io.capacity();
    let fits = capacity.as_ref().is_none_or(|cap| {
        surely_fits(
            pipeline.compiler.totals(),
            compiled.maglev_size,
            pipeline.mirror.state().backends.len() as u64,
            cap,
        )
    });
    let planned_all = !fits || update.full || pipeline.full_next;
    let (desired, ops): (Cow<Desired>, Vec<Op>) = if fits {
        let ops = if planned_all {
            pipeline.mirror.plan_full(compiled)
        } else {
            pipeline.mirror.plan_changed(compiled, &update.changed)
        };
        (Cow::Borrowed(compiled), ops)
    } else {
        // Near a map's capacity: Service ports that do not fit are refused whole.
        let mut fitted = compiled.clone();
        fit(
            &mut fitted,
            pipeline.mirror.state(),
            capacity.as_ref().expect("not fits"),
        );
        let ops = pipeline.mirror.plan_full(&fitted);
        (Cow::Owned(fitted), ops)
    };
    pipeline.full_next = !fits;
    let (health_checks, conflicts) = crate::healthcheck::wanted(&desired);
    let mut problems = desired.problems.clone();
    problems.extend(conflicts);
    let mut now_logged = BTreeSet::new();
    for problem in &problems {
        let line = problem.to_string();
        if !logged.contains(&line) {
            log::warn!("rejected: {line}");
        }
        now_logged.insert(line);
    }
    *logged = now_logged;
    let removed = removed_members(&ops, &pipeline.mirror);
    // Frontends whose Maglev table could not be written: the rest of their writes are skipped
    // (the frontend keeps its previous table and backends), every other frontend goes on.
    let mut failed: BTreeMap<u32, String> = BTreeMap::new();
    let mut maglev_failures = 0;
    for op in &ops {
        let svc = op.svc_id(pipeline.mirror.state());
        if svc.is_some_and(|id| failed.contains_key(&id)) {
            continue;
        }
        if let Op::DelBackend(id) = op
            && !failed.is_empty()
            && pipeline
                .mirror
                .state()
                .slots
                .iter()
                .any(|(k, v)| failed.contains_key(&k.svc_id) && v.backend_id == *id)
        {
            // Still in the previous table of a frontend left as it was.
            continue;
        }
        if let Err(e) = io.apply(op) {
            if let (Op::PutMaglev(..), Some(id)) = (op, svc) {
                maglev_failures += 1;
                failed.insert(id, format!("{e:#}"));
                continue;
            }
            let truth = io
                .dump()
                .unwrap_or_else(|_| pipeline.mirror.state().clone());
            pipeline.mirror = Mirror::new(truth);
            pipeline.full_next = true;
            return Err(e.context(FailedMap(op.map())));
        }
        pipeline.mirror.apply(op);
    }
    if !failed.is_empty() {
        pipeline.full_next = true;
    }
    for (id, why) in &failed {
        log::warn!("frontend {id}: {MAGLEV_WRITE_FAILED}: {why}");
        let name = pipeline
            .mirror
            .state()
            .infos
            .get(id)
            .map_or_else(|| format!("frontend {id}"), |i| i.name().to_string());
        problems.push(Problem {
            object: format!("Service {name}"),
            message: format!(
                "{MAGLEV_WRITE_FAILED} ({why}); it keeps its previous state, other Services \
                 are programmed; retried"
            ),
        });
    }
    let no_local = no_local_endpoints(&desired);
    let frontends = desired.frontends.len();
    Ok(SyncReport {
        removed,
        maglev_failures,
        frontends,
        writes: ops.len(),
        problems,
        duration: started.elapsed(),
        no_local,
        health_checks,
        update,
        planned_all,
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
    let mut triggers = TriggerTimes::default();
    let mut pipeline = Pipeline::new(io.dump()?);
    log::info!(
        "adopted {} frontends and {} backends from the pinned maps",
        pipeline.state().services.len(),
        pipeline.state().backends.len()
    );
    let mut logged = BTreeSet::new();
    let mut pending: Option<(Snapshot, Instant, Instant)> = None; // (latest, first, last)
    let tick = Duration::from_millis(20);
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(tick) {
            Ok(snapshot) => {
                if let Some(h) = &observers.health {
                    h.queued(SystemTime::now());
                    let eligible = snapshot.node.eligible;
                    if h.node_eligible() != eligible {
                        if eligible {
                            log::info!(
                                "node {} is eligible again: /healthz follows the proxy's health",
                                snapshot.node.name
                            );
                        } else {
                            log::warn!(
                                "node {} is not eligible for load balancer traffic (deleted, \
                                 marked by the cluster autoscaler, or no Node object): /healthz \
                                 answers 503",
                                snapshot.node.name
                            );
                        }
                        h.set_node_eligible(eligible);
                    }
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
        let result = sync_once(io, &mut pipeline, &snapshot, &mut logged);
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
                    for (family, internal, external) in &report.no_local {
                        m.set_no_local_endpoints(*family, *internal, *external);
                    }
                    for _ in 0..report.maglev_failures {
                        m.map_update_error(proxy_common::maps::LB_MAGLEV);
                    }
                    m.add_service_changes(report.update.services_changed);
                    for (kind, n) in &report.update.slices_changed {
                        let family = if kind == "IPv6" {
                            Family::V6
                        } else {
                            Family::V4
                        };
                        m.add_endpoint_changes(family, *n);
                    }
                    for (family, latency) in triggers.new_latencies(&report.update, agent_started) {
                        m.observe_programming_latency(family, latency);
                    }
                }
                // Refused for lack of map space, or a Maglev table not written: try again
                // shortly, space may have freed.
                if report.maglev_failures > 0
                    || report
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

/// The (frontend, backend) pairs a plan removes, read from the mirror before it is applied:
/// every deleted member is a backend that stopped being eligible for its frontend, unless the
/// same plan gives that frontend a new entry for the same endpoint (its flags or weight
/// changed: it is still used).
fn removed_members(ops: &[Op], mirror: &Mirror) -> Vec<Removed> {
    let state = mirror.state();
    let mut new_values: BTreeMap<u32, BackendValue> = BTreeMap::new();
    let mut added: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for op in ops {
        match op {
            Op::PutBackend(id, v) => {
                new_values.insert(*id, *v);
            }
            Op::PutMember(k, _) => added.entry(k.svc_id).or_default().push(k.backend_id),
            _ => {}
        }
    }
    let value_of = |id: &u32| new_values.get(id).or_else(|| state.backends.get(id));
    let mut out = Vec::new();
    for op in ops {
        let Op::DelMember(member) = op else { continue };
        let (Some(proto), Some(backend)) = (
            mirror.proto_of(member.svc_id),
            state.backends.get(&member.backend_id),
        ) else {
            continue;
        };
        let still_used = added.get(&member.svc_id).is_some_and(|ids| {
            ids.iter()
                .filter_map(value_of)
                .any(|v| crate::plan::same_endpoint(v, backend))
        });
        if !still_used {
            out.push(Removed {
                proto,
                svc_id: member.svc_id,
                backend_id: member.backend_id,
                backend: *backend,
            });
        }
    }
    out
}

/// The map a failed sync's write went to (context of the error `sync_once` returns).
#[derive(Debug, Clone, Copy)]
pub struct FailedMap(pub &'static str);

impl std::fmt::Display for FailedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "write to {}", self.0)
    }
}

/// What the problem of a frontend whose Maglev table failed to be written says.
pub const MAGLEV_WRITE_FAILED: &str = "its Maglev table could not be written";

/// The map named in a failed write's error, for the map_update_errors metric.
fn map_of_error(e: &anyhow::Error) -> &'static str {
    e.downcast_ref::<FailedMap>().map_or("unknown", |m| m.0)
}

/// Service ports hit by the drop cases of a Local traffic policy (semantics 11.5): internal
/// with internalTrafficPolicy Local, external with externalTrafficPolicy Local on an externally
/// reachable port; each when no local endpoint exists but endpoints exist elsewhere.
pub fn no_local_endpoints(desired: &crate::compile::Desired) -> Vec<(Family, u64, u64)> {
    [Family::V4, Family::V6]
        .into_iter()
        .map(|family| {
            let ports = desired.ports.values().filter(|p| p.name.family == family);
            let (mut internal, mut external) = (0, 0);
            for p in ports {
                let none_here = p.endpoints.local.is_empty() && p.endpoints.has_any;
                let reachable =
                    p.node_port.is_some() || !p.external_ips.is_empty() || !p.lb_ips.is_empty();
                internal += u64::from(p.itp_local && none_here);
                external += u64::from(p.etp_local && reachable && none_here);
            }
            (family, internal, external)
        })
        .collect()
}

/// EndpointSlice trigger times already observed, so each change is measured once (fact 11.3).
#[derive(Default)]
struct TriggerTimes {
    seen: BTreeMap<(String, String), String>,
}

const TRIGGER_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl TriggerTimes {
    /// Latencies from each new trigger time of the slices that changed to now, skipping those
    /// before the agent started.
    fn new_latencies(&mut self, update: &Update, started: SystemTime) -> Vec<(Family, Duration)> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        for key in &update.removed_slices {
            self.seen.remove(key);
        }
        for slice in &update.new_slices {
            let Some(raw) = slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_ANNOTATION))
            else {
                continue;
            };
            let key = (
                slice.metadata.namespace.clone().unwrap_or_default(),
                slice.metadata.name.clone().unwrap_or_default(),
            );
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
            self.seen.insert(key, raw.clone());
        }
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

    use super::*;
    use crate::snapshot::Snapshot;

    /// A datapath whose Maglev writes for frontend ids in `fail` fail (a full LB_MAGLEV), and
    /// whose `fail_map` writes fail altogether.
    struct Faulty {
        state: MapState,
        fail: BTreeSet<u32>,
        fail_map: Option<&'static str>,
    }

    impl MapIo for Faulty {
        fn dump(&self) -> anyhow::Result<MapState> {
            Ok(self.state.clone())
        }
        fn apply(&mut self, op: &Op) -> anyhow::Result<()> {
            if let Op::PutMaglev(k, _) = op
                && self.fail.contains(&k.svc_id)
            {
                anyhow::bail!("map is full");
            }
            if self.fail_map == Some(op.map()) {
                anyhow::bail!("no space left on device");
            }
            self.state.apply(op);
            Ok(())
        }
    }

    fn snapshot(yaml: &str) -> Snapshot {
        crate::compile::tests::snapshot(yaml, "node-a", None)
    }

    /// Two Maglev Services, `a` (10.96.0.1) and `b` (10.96.0.2), with `eps` endpoints each.
    fn two_maglev_services(eps: &[&str]) -> Snapshot {
        let mut docs = Vec::new();
        for (name, vip) in [("a", "10.96.0.1"), ("b", "10.96.0.2")] {
            docs.push(format!(
                "kind: Service\nmetadata: {{name: {name}, namespace: default, annotations: \
                 {{kube-bpf-proxy.io/scheduler: maglev}}}}\nspec: {{clusterIP: {vip}, ports: \
                 [{{name: http, port: 80, protocol: TCP}}]}}"
            ));
            docs.push(format!(
                "kind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: \
                 {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: \
                 http, port: 8080, protocol: TCP}}]\nendpoints: [{}]",
                eps.iter()
                    .map(|e| format!("{{addresses: [{e}]}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        snapshot(&docs.join("\n---\n"))
    }

    fn frontend_id(state: &MapState, vip: &str) -> Option<u32> {
        state.services.iter().find_map(|(k, v)| match k {
            crate::plan::ServiceKey::V4(k)
                if k.port == 80
                    && std::net::Ipv4Addr::from(k.addr)
                        == vip.parse::<std::net::Ipv4Addr>().unwrap() =>
            {
                Some(v.id)
            }
            _ => None,
        })
    }

    #[test]
    fn a_failed_maglev_table_fails_its_service_alone() {
        let mut io = Faulty {
            state: MapState::default(),
            fail: BTreeSet::new(),
            fail_map: None,
        };
        let mut pipeline = Pipeline::new(MapState::default());
        let mut logged = BTreeSet::new();
        sync_once(
            &mut io,
            &mut pipeline,
            &two_maglev_services(&["10.244.0.2"]),
            &mut logged,
        )
        .unwrap();
        let a = frontend_id(pipeline.state(), "10.96.0.1").unwrap();
        let b = frontend_id(pipeline.state(), "10.96.0.2").unwrap();
        let before_a = pipeline
            .state()
            .services
            .iter()
            .find(|(_, v)| v.id == a)
            .map(|(_, v)| *v);
        // a's new table cannot be written: a keeps its old backends, b gets its new ones.
        io.fail.insert(a);
        let next = two_maglev_services(&["10.244.0.2", "10.244.0.3"]);
        let report = sync_once(&mut io, &mut pipeline, &next, &mut logged).unwrap();
        assert_eq!(report.maglev_failures, 1);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.object == "Service default/a:http/TCP"
                    && p.message.contains(MAGLEV_WRITE_FAILED)),
            "{:?}",
            report.problems
        );
        assert_eq!(
            &io.state,
            pipeline.state(),
            "the mirror follows what was written"
        );
        let after_a = pipeline
            .state()
            .services
            .iter()
            .find(|(_, v)| v.id == a)
            .map(|(_, v)| *v);
        assert_eq!(after_a, before_a, "a is left as it was");
        let b_value = pipeline
            .state()
            .services
            .iter()
            .find(|(_, v)| v.id == b)
            .unwrap()
            .1;
        assert_eq!(b_value.count, 2, "b moved on");
        assert_eq!(pipeline.state().live_slots(&before_a.unwrap()).len(), 1);
        // Space again: the next sync programs a too, and nothing else is left to do.
        io.fail.clear();
        let report = sync_once(&mut io, &mut pipeline, &next, &mut logged).unwrap();
        assert_eq!(report.maglev_failures, 0);
        let a_value = pipeline
            .state()
            .services
            .iter()
            .find(|(_, v)| v.id == a)
            .unwrap()
            .1;
        assert_eq!(a_value.count, 2);
        assert_eq!(
            crate::plan::plan(&crate::compile::compile(&next), pipeline.state()),
            Vec::new()
        );
    }

    #[test]
    fn a_failed_write_names_its_map() {
        let mut io = Faulty {
            state: MapState::default(),
            fail: BTreeSet::new(),
            fail_map: Some(proxy_common::maps::LB_SLOTS),
        };
        let mut pipeline = Pipeline::new(MapState::default());
        let err = sync_once(
            &mut io,
            &mut pipeline,
            &two_maglev_services(&["10.244.0.2"]),
            &mut BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(map_of_error(&err), "LB_SLOTS");
    }

    #[test]
    fn no_local_endpoints_counts_service_ports_per_policy() {
        // semantics 11.5: ports hit by the drops of 3.8 (internal) and 3.9 (external).
        let svc = |name: &str, vip: &str, spec: &str| {
            format!(
                "kind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: \
                 {vip}, ports: [{{name: http, port: 80, protocol: TCP, nodePort: 30080}}]{spec}}}"
            )
        };
        let slice = |name: &str, node: &str| {
            format!(
                "kind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: \
                 {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: \
                 http, port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: [10.244.9.9], \
                 nodeName: {node}}}]"
            )
        };
        let docs = [
            // internal Local, endpoint elsewhere: counted internal.
            svc("itp", "10.96.0.1", ", internalTrafficPolicy: Local"),
            slice("itp", "node-b"),
            // external Local on a NodePort, endpoint elsewhere: counted external.
            svc(
                "etp",
                "10.96.0.2",
                ", type: NodePort, externalTrafficPolicy: Local",
            ),
            slice("etp", "node-b"),
            // external Local with a local endpoint: not counted.
            svc(
                "etp-here",
                "10.96.0.3",
                ", type: NodePort, externalTrafficPolicy: Local",
            ),
            slice("etp-here", "node-a"),
            // internal Local without any endpoint: rejected, not dropped: not counted.
            svc("itp-none", "10.96.0.4", ", internalTrafficPolicy: Local"),
        ];
        let d = crate::compile::compile(&snapshot(&docs.join("\n---\n")));
        assert_eq!(
            no_local_endpoints(&d),
            vec![(Family::V4, 1, 1), (Family::V6, 0, 0)]
        );
    }

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
