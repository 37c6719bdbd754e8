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
    capacity::{
        Capacity, changes_fit, kept_frontends, ranges_surely_fit, refusals, refuse, surely_fits,
    },
    compile::{Compiler, Desired, Family, FrontendAddr, Problem, ProblemReason, Proto, Update},
    datapath::{MapIo, Removed},
    health::Health,
    metrics::{Metrics, Series},
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
    /// Entries of the maps the agent writes, from its mirror, after each sync (for the fill
    /// metrics, which need not walk those maps in the kernel).
    pub map_counts: Option<Arc<std::sync::Mutex<BTreeMap<&'static str, u32>>>>,
}

/// How bursts of changes are coalesced, and how often the maps are read back.
#[derive(Clone, Copy, Debug)]
pub struct SyncTiming {
    /// At most one sync per this interval: a change arriving when the agent is idle (the last
    /// sync ended longer ago) is programmed at once; changes arriving closer together are
    /// coalesced into the next sync, which starts at most this long after the previous one.
    pub min_interval: Duration,
    /// Wait before retrying a failed sync.
    pub retry: Duration,
    /// Read every map back this often and repair any drift from what the agent wrote
    /// (`--sync-period`); zero: only at start-up.
    pub resync: Duration,
}

impl Default for SyncTiming {
    fn default() -> Self {
        SyncTiming {
            min_interval: Duration::from_millis(20),
            retry: Duration::from_secs(1),
            resync: Duration::from_secs(300),
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
    /// (Service-port id, backend id) whose ClientIP affinity state is to be forgotten: the
    /// backend left every set new connections of that port may choose from, or the port's
    /// affinity was turned off (`retired_affinity`, semantics 6.6).
    pub retired_affinity: Vec<(u32, u32)>,
}

/// The control plane between syncs: the compile cache (every Service's last compiled share)
/// and the mirror of the maps it plans against. One sync costs what changed, not the cluster.
pub struct Pipeline {
    compiler: Compiler,
    mirror: Mirror,
    /// Plan every frontend next time: the last sync refused Services for lack of map space or
    /// left a Maglev table unwritten, and those are retried.
    full_next: bool,
    /// A full sync is planned and written in groups of Service ports of about this many
    /// entries (`Mirror::full_groups`).
    group_entries: usize,
    /// Affinity state still to be forgotten (`affinity_candidates`): left by a sync that
    /// failed, or whose entries could not be deleted; checked again at the next sync.
    affinity_pending: Vec<(u32, u32)>,
}

/// Entries (frontends and their backends) per group of a full sync: a few MiB of writes in
/// flight. At 10,000 Services x 10 a group of 5,000 peaks 15 MiB lower than one of 50,000
/// and syncs as fast (`plan_scale`, `GROUP=`); its runs of writes are still long enough to be
/// written by two threads (`PARALLEL_BATCH`).
pub const FULL_SYNC_GROUP: usize = 5_000;

impl Pipeline {
    /// Starts from what the maps hold (an earlier agent's state, or nothing).
    pub fn new(state: MapState) -> Pipeline {
        Pipeline {
            compiler: Compiler::default(),
            mirror: Mirror::new(state),
            full_next: true,
            group_entries: FULL_SYNC_GROUP,
            affinity_pending: Vec::new(),
        }
    }

    /// Affinity state a sync named (`SyncReport::retired_affinity`) that could not be
    /// forgotten: tried again after the next sync.
    pub fn retry_affinity(&mut self, retired: Vec<(u32, u32)>) {
        self.affinity_pending.extend(retired);
    }

    /// The same, planning full syncs in groups of about `entries` entries (tests use small
    /// groups).
    pub fn with_group_entries(mut self, entries: usize) -> Pipeline {
        self.group_entries = entries.max(1);
        self
    }

    /// The maps as last written.
    pub fn state(&self) -> &MapState {
        self.mirror.state()
    }

    /// The desired state as last compiled.
    pub fn desired(&self) -> &Desired {
        self.compiler.desired()
    }

    /// The agent's copy of the maps, with its indexes.
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// Takes `truth` (the maps read back) as what the maps hold; the next sync plans every
    /// frontend against it, repairing any difference.
    pub fn adopt(&mut self, truth: MapState) {
        self.mirror = Mirror::new(truth);
        self.full_next = true;
    }
}

/// The desired state as the maps can hold it: `compiled` itself when everything fits, else a
/// copy with the Service ports that do not fit refused whole (`capacity::refusals`). The agent
/// and `verify` decide alike. The flag: it all fits.
///
/// Cheapest first: an O(1) bound on the compiler's totals (`surely_fits`, which counts every
/// entry as new); for an incremental sync after one that programmed everything (`changed`),
/// the maps' present use plus the changed frontends' (`changes_fit`); else the full check.
/// A cluster above half a map's size fails the first and must not pay the full check (and a
/// plan of every frontend) at each endpoint change.
pub fn fit_to<'a>(
    compiler: &'a Compiler,
    current: &MapState,
    capacity: Option<&Capacity>,
    changed: Option<&BTreeSet<FrontendAddr>>,
) -> (Cow<'a, Desired>, Fit) {
    let compiled = compiler.desired();
    let Some(cap) = capacity else {
        return (Cow::Borrowed(compiled), Fit::All);
    };
    let backends_now = current.backends.len() as u64;
    if (surely_fits(compiler.totals(), compiled.maglev_size, backends_now, cap)
        && ranges_surely_fit(compiler.totals(), compiled, current, cap))
        || changed.is_some_and(|changed| changes_fit(compiled, changed, current, cap))
    {
        return (Cow::Borrowed(compiled), Fit::All);
    }
    let refused = refusals(compiled, current, cap);
    if refused.is_empty() {
        return (Cow::Borrowed(compiled), Fit::All);
    }
    let kept = kept_frontends(compiled, &refused, current);
    let mut fitted = compiled.clone();
    refuse(&mut fitted, &refused);
    (Cow::Owned(fitted), Fit::Refused { kept })
}

/// Whether the compiled state fits the maps ([`fit_to`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Fit {
    All,
    /// Some Service ports were refused; the frontends the maps hold of those that were
    /// programmed are `kept` as they are.
    Refused {
        kept: BTreeSet<FrontendAddr>,
    },
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
    // After a compile of everything, or of a quarter of the frontends or more, the compiler's
    // ordered maps are rebuilt with full nodes before the writes are planned: the memory this
    // frees takes the mirror's growth, so the agent's peak stays lower.
    let compact = {
        let frontends = pipeline.compiler.desired().frontends.len();
        update.full || update.changed.len().saturating_mul(4) >= frontends.max(1)
    };
    if compact {
        pipeline.compiler.compact();
    }
    let capacity = io.capacity();
    let incremental = !update.full && !pipeline.full_next;
    let (desired, fit) = fit_to(
        &pipeline.compiler,
        pipeline.mirror.state(),
        capacity.as_ref(),
        incremental.then_some(&update.changed),
    );
    let fits = fit == Fit::All;
    let planned_all = !fits || update.full || pipeline.full_next;
    pipeline.full_next = !fits;
    let (health_checks, conflicts) = crate::healthcheck::wanted(&desired);
    let mut problems = desired.problems.clone();
    problems.extend(conflicts);
    let mut now_logged = BTreeSet::new();
    for problem in &problems {
        let line = problem.to_string();
        if !logged.contains(&line) {
            log::warn!("rejected ({}): {line}", problem.reason.as_str());
        }
        now_logged.insert(line);
    }
    *logged = now_logged;
    let mut written = Written {
        affinity: std::mem::take(&mut pipeline.affinity_pending),
        ..Written::default()
    };
    // A full plan of a large cluster is planned and written a group of Service ports at a
    // time, so that the writes in flight stay small (they were most of the agent's peak
    // memory); one plan over everything when the maps hold entries of no frontend (only
    // `plan_full` finds those) or some Services are refused for capacity.
    // A large incremental change (many Services at once) is written in groups the same way.
    let groups = if planned_all && fits {
        pipeline
            .mirror
            .full_groups(&desired, pipeline.group_entries)
    } else if !planned_all
        && pipeline
            .mirror
            .is_large(&desired, &update.changed, pipeline.group_entries)
    {
        Some(
            pipeline
                .mirror
                .changed_groups(&desired, &update.changed, pipeline.group_entries),
        )
    } else {
        None
    };
    let grouped = groups.is_some();
    let planner = |mirror: &mut Mirror, i: usize| match (&groups, &fit) {
        (Some(groups), _) => mirror.plan_changed(&desired, &groups[i]),
        // Refused Service ports that were programmed keep their entries.
        (None, Fit::Refused { kept }) => {
            let ops = mirror.plan_full(&desired);
            crate::plan::keeping(ops, mirror.state(), kept)
        }
        (None, Fit::All) if planned_all => mirror.plan_full(&desired),
        (None, Fit::All) => mirror.plan_changed(&desired, &update.changed),
    };
    let count = groups.as_ref().map_or(1, Vec::len);
    let mut result = plan_and_write(io, &mut pipeline.mirror, count, planner, &mut written);
    // The Service CIDRs (semantics 3.12) belong to no frontend: written after them.
    if result.is_ok() {
        let ops = crate::plan::service_cidr_ops(&desired, pipeline.mirror.state());
        written.writes += ops.len();
        for op in &ops {
            pipeline.mirror.apply(op);
        }
        result = ops
            .iter()
            .try_for_each(|op| io.apply(op).map_err(|e| e.context(FailedMap(op.map()))));
    }
    if result.is_err() || !written.failed.is_empty() {
        // The mirror took every planned write before the kernel did: after a failure it is
        // read back from the maps (or, if that fails too, kept and fully re-planned).
        pipeline.full_next = true;
        if let Ok(truth) = io.dump() {
            pipeline.mirror = Mirror::new(truth);
        }
    }
    if result.is_err() {
        // The writes made stay in the kernel (the mirror was read back from it): their
        // affinity state is still to be forgotten.
        pipeline.affinity_pending = std::mem::take(&mut written.affinity);
    }
    result?;
    let Written {
        removed,
        failed,
        maglev_failures,
        writes,
        affinity,
    } = written;
    let retired_affinity = retired_affinity(&affinity, &pipeline.mirror);
    for (id, why) in &failed {
        log::warn!("frontend {id}: {MAGLEV_WRITE_FAILED}: {why}");
        let name = pipeline
            .mirror
            .state()
            .infos
            .get(id)
            .map_or_else(|| format!("frontend {id}"), |i| i.name().to_string());
        problems.push(Problem {
            reason: ProblemReason::WriteFailed,
            object: format!("Service {name}"),
            message: format!(
                "{MAGLEV_WRITE_FAILED} ({why}); it keeps its previous state, other Services \
                 are programmed; retried"
            ),
        });
    }
    let no_local = no_local_endpoints(&desired);
    let frontends = desired.frontends.len();
    drop(desired);
    // After a full sync, or a change of a quarter of the frontends or more: the rebuild costs
    // a pass over everything, which a change of a few dozen Services should not pay.
    if planned_all || (grouped && compact) {
        pipeline.mirror.compact();
        crate::heap::release_freed();
    }
    Ok(SyncReport {
        removed,
        maglev_failures,
        frontends,
        writes,
        problems,
        duration: started.elapsed(),
        no_local,
        health_checks,
        update,
        planned_all,
        retired_affinity,
    })
}

/// What the writes of one sync did so far.
#[derive(Default)]
struct Written {
    removed: Vec<Removed>,
    /// Frontends whose Maglev table could not be written, with the error: the rest of their
    /// writes are skipped (the frontend keeps its previous table and backends).
    failed: BTreeMap<u32, String>,
    maglev_failures: u64,
    writes: usize,
    /// Affinity state that may have to go (`affinity_candidates`).
    affinity: Vec<(u32, u32)>,
}

/// One plan's writes on their way to the kernel, each with the frontend it belongs to (read
/// from the mirror as it was before the write).
struct Batch {
    ops: Vec<Op>,
    svcs: Vec<Option<u32>>,
}

/// Plans `count` batches with `plan` (batch `i` against the mirror as the batches before it
/// left it) and writes them in order. Each plan is applied to the mirror as soon as it is
/// made, so that the next can be planned while the kernel writes this one: with more than
/// one batch the writes go to the kernel from a second thread, one batch behind the planning
/// (at 10,000 Services x 100 the kernel's 3 million hash-map updates took as long as planning
/// them). The caller reads the maps back into the mirror after an error or a failed Maglev
/// table, since the mirror holds writes that were not made.
fn plan_and_write(
    io: &mut dyn MapIo,
    mirror: &mut Mirror,
    count: usize,
    mut plan: impl FnMut(&mut Mirror, usize) -> Vec<Op>,
    written: &mut Written,
) -> anyhow::Result<()> {
    let mut stage = |mirror: &mut Mirror, i: usize, written: &mut Written| {
        let ops = plan(mirror, i);
        written.removed.extend(removed_members(&ops, mirror));
        written.affinity.extend(affinity_candidates(&ops, mirror));
        written.writes += ops.len();
        let mut svcs = Vec::with_capacity(ops.len());
        for op in &ops {
            svcs.push(op.svc_id(mirror.state()));
            mirror.apply(op);
        }
        Batch { ops, svcs }
    };
    if count <= 1 {
        let mut failed = BTreeMap::new();
        let mut maglev_failures = 0;
        let result = (0..count).try_for_each(|i| {
            let batch = stage(mirror, i, written);
            write_batch(io, &batch, &mut failed, &mut maglev_failures)
        });
        written.failed = failed;
        written.maglev_failures = maglev_failures;
        return result;
    }
    std::thread::scope(|scope| {
        // One batch queued while one is written and the next planned: three groups' writes
        // in memory at most.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(1);
        let writer = std::thread::Builder::new()
            .name("map-writer".into())
            .spawn_scoped(scope, move || {
                let mut failed = BTreeMap::new();
                let mut maglev_failures = 0;
                let result = rx.iter().try_for_each(|batch| {
                    write_batch(io, &batch, &mut failed, &mut maglev_failures)
                });
                (result, failed, maglev_failures)
            });
        let writer = match writer {
            Ok(writer) => writer,
            Err(e) => return Err(anyhow::Error::new(e).context("cannot start the map writer")),
        };
        for i in 0..count {
            let batch = stage(mirror, i, written);
            if tx.send(batch).is_err() {
                // The writer stopped at a failed write.
                break;
            }
        }
        drop(tx);
        let (result, failed, maglev_failures) = writer.join().unwrap_or_else(|_| {
            (
                Err(anyhow::anyhow!("the map writer panicked")),
                BTreeMap::new(),
                0,
            )
        });
        written.failed = failed;
        written.maglev_failures = maglev_failures;
        result
    })
}

/// Writes `batch` in order. Runs of slot, member and backend writes (of one frontend for
/// slots and members) go to the kernel as one batch. A failed Maglev table fails its frontend
/// alone (recorded in `failed`): that frontend's later writes are skipped, and so is every
/// later backend deletion (the frontend's previous table may still point at the backend; the
/// next sync, a full one, deletes what is left over). Any other failed write ends the writes.
fn write_batch(
    io: &mut dyn MapIo,
    batch: &Batch,
    failed: &mut BTreeMap<u32, String>,
    maglev_failures: &mut u64,
) -> anyhow::Result<()> {
    let Batch { ops, svcs } = batch;
    let skipped = |i: usize, failed: &BTreeMap<u32, String>| {
        svcs[i].is_some_and(|id| failed.contains_key(&id))
            || (!failed.is_empty() && matches!(ops[i], Op::DelBackend(_)))
    };
    let mut i = 0;
    while i < ops.len() {
        if skipped(i, failed) {
            i += 1;
            continue;
        }
        // A run holds no Maglev write, so no frontend fails in its middle.
        if let Some(kind) = ops[i].batch_kind() {
            let mut j = i + 1;
            while j < ops.len() && ops[j].batch_kind() == Some(kind) && svcs[j] == svcs[i] {
                j += 1;
            }
            if j - i > 1 {
                io.apply_run(&ops[i..j])
                    .map_err(|e| e.context(FailedMap(ops[i].map())))?;
                i = j;
                continue;
            }
        }
        let op = &ops[i];
        if let Err(e) = io.apply(op) {
            match (op, svcs[i]) {
                (Op::PutMaglev(..), Some(id)) => {
                    *maglev_failures += 1;
                    failed.insert(id, format!("{e:#}"));
                }
                _ => return Err(e.context(FailedMap(op.map()))),
            }
        }
        i += 1;
    }
    Ok(())
}

/// A snapshot waiting to be synced.
struct Pending {
    snapshot: Snapshot,
    /// When its first unsynced change arrived.
    first: Instant,
    /// Not before this (a retry waits).
    not_before: Instant,
}

impl Pending {
    /// When it is due: at once when idle, else `min_interval` after the last sync ended.
    fn due(&self, last_end: Option<Instant>, min_interval: Duration) -> Instant {
        let spaced = last_end.map_or(self.not_before, |t| t + min_interval);
        spaced.max(self.not_before)
    }
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
    let mut pending: Option<Pending> = None;
    // The last snapshot synced, for repairing drift found by a read-back.
    let mut last_synced: Option<Snapshot> = None;
    let mut last_end: Option<Instant> = None;
    let mut last_readback = Instant::now();
    // Service and EndpointSlice changes taken in and not yet programmed (semantics 11.4).
    let mut changes_pending = crate::snapshot::Changes::default();
    let tick = Duration::from_millis(20);
    while !stop.load(Ordering::Relaxed) {
        let wait = match &pending {
            Some(p) => p
                .due(last_end, timing.min_interval)
                .saturating_duration_since(Instant::now())
                .min(tick),
            None => tick,
        };
        if let Some(hc) = &observers.health_checks {
            hc.retry_failing();
        }
        match rx.recv_timeout(wait) {
            Ok(mut snapshot) => {
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
                let changes = std::mem::take(&mut snapshot.changes);
                if let Some(m) = &observers.metrics {
                    // Counted as they arrive, as kube-proxy counts each event (semantics
                    // 11.6), whether or not a sync programs them.
                    m.add_change_events(&changes);
                }
                changes_pending.add(changes);
                if let Some(m) = &observers.metrics {
                    m.observe_queued(SystemTime::now());
                    m.set_changes_pending(&changes_pending);
                }
                let now = Instant::now();
                // A new change is programmed at once (a retry's wait does not hold it up).
                let first = pending.as_ref().map_or(now, |p| p.first);
                pending = Some(Pending {
                    snapshot,
                    first,
                    not_before: now,
                });
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if pending.is_none() {
                    log::warn!("source ended; keeping the programmed state");
                    return Ok(());
                }
            }
        }
        if pending.is_none()
            && !timing.resync.is_zero()
            && last_readback.elapsed() >= timing.resync
            && let Some(snapshot) = &last_synced
        {
            last_readback = Instant::now();
            match io.dump() {
                Ok(truth) if &truth != pipeline.state() => {
                    log::warn!(
                        "read-back: the maps differ from what this agent wrote (changed by \
                         something else, or a write lost); repairing"
                    );
                    if let Some(m) = &observers.metrics {
                        m.drift_repairs.with(&[]).inc();
                    }
                    pipeline.adopt(truth);
                    let now = Instant::now();
                    pending = Some(Pending {
                        snapshot: snapshot.clone(),
                        first: now,
                        not_before: now,
                    });
                }
                Ok(_) => log::debug!("read-back: the maps hold what this agent wrote"),
                Err(e) => log::warn!("read-back of the maps failed: {e:#}"),
            }
        }
        let due = pending
            .as_ref()
            .is_some_and(|p| p.due(last_end, timing.min_interval) <= Instant::now());
        if !due {
            continue;
        }
        let Pending {
            snapshot, first, ..
        } = pending.take().expect("due implies pending");
        let attempt = Instant::now();
        let result = sync_once(io, &mut pipeline, &snapshot, &mut logged);
        last_end = Some(Instant::now());
        io.synced(result.is_ok());
        if let Some(m) = &observers.metrics {
            m.observe_sync(attempt.elapsed(), result.is_ok());
            if let Ok(report) = &result {
                m.observe_sync_kind(attempt.elapsed(), report.planned_all);
            }
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
                // The sync took the newest snapshot, so every change taken in so far.
                changes_pending = crate::snapshot::Changes::default();
                if let Some(m) = &observers.metrics {
                    m.set_changes_pending(&changes_pending);
                }
                last_synced = Some(snapshot.clone());
                if let Some(counts) = &observers.map_counts {
                    *counts.lock().expect("map counts") = pipeline.state().counts();
                }
                if let Some(hc) = &observers.health_checks {
                    hc.update(&report.health_checks, &snapshot.node.addresses);
                }
                let reconcile = Instant::now();
                let forgotten = io.forget_flows(&report.removed);
                if let Some(m) = &observers.metrics {
                    m.observe_conntrack_reconciler(reconcile.elapsed());
                }
                match forgotten {
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
                match io.forget_affinity(&report.retired_affinity) {
                    Ok(0) => {}
                    Ok(n) => log::info!(
                        "session affinity: forgot {n} client(s) of endpoints that left their \
                         Service port"
                    ),
                    Err(e) => {
                        log::warn!(
                            "session affinity cleanup: {e:#}; tried again after the next sync"
                        );
                        pipeline.retry_affinity(report.retired_affinity.clone());
                    }
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
                    pending = Some(Pending {
                        snapshot,
                        first: later,
                        not_before: later,
                    });
                }
            }
            Err(e) => {
                if let Some(m) = &observers.metrics {
                    m.map_update_error(map_of_error(&e));
                }
                log::error!("sync failed: {e:#}; keeping the programmed state, retrying");
                // kube-proxy's trackers hand their changes to a sync when it starts, so its
                // pending gauges read 0 whether or not the sync then fails (semantics 11.4).
                changes_pending = crate::snapshot::Changes::default();
                if let Some(m) = &observers.metrics {
                    m.set_changes_pending(&changes_pending);
                }
                pending = Some(Pending {
                    snapshot,
                    first,
                    not_before: Instant::now() + timing.retry,
                });
            }
        }
    }
    Ok(())
}

/// The (frontend, backend) pairs a plan removes, read from the mirror before it is applied:
/// every deleted member is a backend that stopped serving its frontend's port (one that only
/// new flows may not use stays a member without slots, semantics 9.3), unless the same plan
/// gives that frontend a new entry for the same endpoint (its flags or weight changed: it is
/// still used).
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

/// PURE: (Service-port id, backend id) pairs whose ClientIP affinity state `ops` may make
/// stale, read from the mirror before they are applied: a choosable member (slots) of a
/// frontend with affinity deleted or left without slots, and every choosable member of a
/// frontend whose affinity is turned off or whose port id changes. `retired_affinity` keeps
/// those no frontend of the port still offers once every write is made.
fn affinity_candidates(ops: &[Op], mirror: &Mirror) -> Vec<(u32, u32)> {
    let state = mirror.state();
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::DelMember(k)
            | Op::PutMember(k, proxy_common::service::MemberValue { slots: 0 }) => {
                if let Some(svc) = mirror.service_of(k.svc_id)
                    && svc.has_affinity()
                    && state.members.get(k).is_some_and(|m| m.slots > 0)
                {
                    out.push((svc.port_id, k.backend_id));
                }
            }
            Op::PutService(key, new) => {
                let Some(old) = state.services.get(key) else {
                    continue;
                };
                if old.has_affinity() && (!new.has_affinity() || new.port_id != old.port_id) {
                    out.extend(choosable(state, old.id).map(|b| (old.port_id, b)));
                }
            }
            _ => {}
        }
    }
    out
}

/// The backend ids new connections to frontend `id` may choose (its members with slots).
fn choosable(state: &MapState, id: u32) -> impl Iterator<Item = u32> + '_ {
    state
        .members
        .range(crate::plan::member_range(id))
        .filter(|(_, m)| m.slots > 0)
        .map(|(k, _)| k.backend_id)
}

/// PURE: of `candidates` (`affinity_candidates`), the pairs no frontend with affinity of that
/// Service port offers any more in `mirror` (every write made): kube-proxy deletes the
/// affinity set of an endpoint that left the port's chains (semantics 6.6), so a client
/// whose endpoint left gets a fresh pick, even when the endpoint comes back or its id is
/// reused for another endpoint. Sorted, no duplicates.
fn retired_affinity(candidates: &[(u32, u32)], mirror: &Mirror) -> Vec<(u32, u32)> {
    if candidates.is_empty() {
        return Vec::new();
    }
    let ports: BTreeSet<u32> = candidates.iter().map(|(p, _)| *p).collect();
    let state = mirror.state();
    let mut offered: BTreeSet<(u32, u32)> = BTreeSet::new();
    for svc in state
        .services
        .values()
        .filter(|v| v.has_affinity() && ports.contains(&v.port_id))
    {
        offered.extend(choosable(state, svc.id).map(|b| (svc.port_id, b)));
    }
    let retired: BTreeSet<(u32, u32)> = candidates
        .iter()
        .copied()
        .filter(|c| !offered.contains(c))
        .collect();
    retired.into_iter().collect()
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
/// with internalTrafficPolicy Local, external with externalTrafficPolicy Local (4.2: by the
/// Service's type, whether or not a NodePort, externalIP or load balancer IP exists yet, as
/// kube-proxy counts); each when no local endpoint is known but endpoints exist. As in
/// kube-proxy, a port with no external address has no local set (4.4), so it counts whenever
/// it has endpoints.
pub fn no_local_endpoints(desired: &crate::compile::Desired) -> Vec<(Family, u64, u64)> {
    [Family::V4, Family::V6]
        .into_iter()
        .map(|family| {
            let ports = desired.ports.values().filter(|p| p.name.family == family);
            let (mut internal, mut external) = (0, 0);
            for p in ports {
                let none_here = p.endpoints.local().is_empty() && p.endpoints.has_any;
                internal += u64::from(p.itp_local && none_here);
                external += u64::from(p.etp_local && none_here);
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
            // FQDN and unknown address types program nothing (semantics 1.7): no latency.
            let family = match slice.address_type.as_str() {
                "IPv4" => Family::V4,
                "IPv6" => Family::V6,
                _ => continue,
            };
            let Some(raw) = slice.trigger_time.as_deref() else {
                continue;
            };
            let key = (
                slice.metadata.namespace.clone().unwrap_or_default(),
                slice.metadata.name.clone().unwrap_or_default(),
            );
            if self.seen.get(&key).map(String::as_str) != Some(raw)
                && let Some(t) = parse_rfc3339(raw)
                && t >= started
                && let Ok(latency) = now.duration_since(t)
            {
                out.push((family, latency));
            }
            self.seen.insert(key, raw.to_string());
        }
        out
    }
}

/// Parses an RFC 3339 time (`2024-02-29T12:34:56.5Z`, `...+02:00`), as the API writes
/// `endpoints.kubernetes.io/last-change-trigger-time`.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    s.trim()
        .parse::<jiff::Timestamp>()
        .ok()
        .map(SystemTime::from)
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

    impl Faulty {
        /// Empty maps; every write to `fail_map` fails, no Maglev write does (yet).
        fn failing(fail_map: Option<&'static str>) -> Faulty {
            Faulty {
                state: MapState::default(),
                fail: BTreeSet::new(),
                fail_map,
            }
        }
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
        services_a_b_with(
            ", annotations: {kube-bpf-proxy.io/scheduler: maglev}",
            eps,
            eps,
        )
    }

    /// Services `a` (10.96.0.1) and `b` (10.96.0.2) with their endpoints.
    fn services_a_b(a: &[&str], b: &[&str]) -> Snapshot {
        services_a_b_with("", a, b)
    }

    /// `services_a_b`, with `meta` added to each Service's metadata.
    fn services_a_b_with(meta: &str, a: &[&str], b: &[&str]) -> Snapshot {
        let mut docs = Vec::new();
        for (name, vip, eps) in [("a", "10.96.0.1", a), ("b", "10.96.0.2", b)] {
            docs.push(format!(
                "kind: Service\nmetadata: {{name: {name}, namespace: default{meta}}}\nspec: \
                 {{clusterIP: {vip}, ports: [{{name: http, port: 80, protocol: TCP}}]}}"
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
        a_failed_maglev_table_fails_its_service_alone_in(Pipeline::new(MapState::default()));
    }

    #[test]
    fn a_failed_maglev_table_fails_its_service_alone_when_written_by_the_map_writer() {
        // Groups of one entry: every sync plans and writes in groups, the writes from the
        // second thread.
        a_failed_maglev_table_fails_its_service_alone_in(
            Pipeline::new(MapState::default()).with_group_entries(1),
        );
    }

    fn a_failed_maglev_table_fails_its_service_alone_in(mut pipeline: Pipeline) {
        let mut io = Faulty::failing(None);
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
    fn a_read_back_that_finds_drift_repairs_it() {
        let mut io = Faulty::failing(None);
        let mut pipeline = Pipeline::new(MapState::default());
        let mut logged = BTreeSet::new();
        let snap = two_maglev_services(&["10.244.0.2", "10.244.0.3"]);
        sync_once(&mut io, &mut pipeline, &snap, &mut logged).unwrap();
        let good = io.state.clone();
        // Something else deletes a slot and a backend behind the agent's back.
        let slot = *io.state.slots.keys().next().unwrap();
        io.state.slots.remove(&slot);
        let backend = *io.state.backends.keys().next().unwrap();
        io.state.backends.remove(&backend);
        // Nothing changed in the cluster, so the incremental sync would write nothing...
        let report = sync_once(&mut io, &mut pipeline, &snap, &mut logged).unwrap();
        assert_eq!(report.writes, 0);
        // ...but the periodic read-back sees the difference and the next sync repairs it.
        assert_ne!(&io.state, pipeline.state());
        pipeline.adopt(io.dump().unwrap());
        let report = sync_once(&mut io, &mut pipeline, &snap, &mut logged).unwrap();
        assert!(report.planned_all && report.writes >= 2, "{report:?}");
        // Repaired: consistent, and nothing left to write (ids and generations may differ
        // from before: the deleted backend comes back under a new id).
        assert!(io.state.consistent().is_ok(), "{:?}", io.state.consistent());
        assert_eq!(
            crate::plan::plan(&crate::compile::compile(&snap), &io.state),
            Vec::new()
        );
        assert_eq!(io.state.services.len(), good.services.len());
        assert_eq!(&io.state, pipeline.state());
    }

    /// Maps of a fixed capacity (in memory).
    struct Sized(MapState, Capacity);

    impl MapIo for Sized {
        fn dump(&self) -> anyhow::Result<MapState> {
            Ok(self.0.clone())
        }
        fn apply(&mut self, op: &Op) -> anyhow::Result<()> {
            self.0.apply(op);
            Ok(())
        }
        fn capacity(&self) -> Option<Capacity> {
            Some(self.1)
        }
    }

    #[test]
    fn an_endpoint_change_in_a_cluster_above_half_the_backend_map_is_planned_alone() {
        // 4 backends in a map of 7. The O(1) bound counts the cluster as new (4 members + 4
        // backends in the map > 7), so before the incremental check every endpoint change
        // planned the whole cluster (200 ms at 10,000 Services x 10 with the default sizes).
        let cap = Capacity {
            services4: 100,
            services6: 100,
            slot_chunks: 100,
            members: 100,
            backends: 7,
            infos: 100,
            maglev: 100,
            src_ranges: [100, 100],
        };
        let mut io = Sized(MapState::default(), cap);
        let mut pipeline = Pipeline::new(MapState::default());
        let mut logged = BTreeSet::new();
        let b = ["10.244.1.2", "10.244.1.3"];
        let first = services_a_b(&["10.244.0.2", "10.244.0.3"], &b);
        let report = sync_once(&mut io, &mut pipeline, &first, &mut logged).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(!surely_fits(
            pipeline.compiler.totals(),
            pipeline.desired().maglev_size,
            io.0.backends.len() as u64,
            &cap
        ));
        let programmed = |io: &Sized, pipeline: &Pipeline, snap: &Snapshot| {
            assert_eq!(
                crate::plan::plan(&crate::compile::compile(snap), &io.0),
                Vec::new()
            );
            assert_eq!(&io.0, pipeline.state());
            assert!(io.0.backends.len() <= 7);
        };
        // One endpoint of `a` replaced: 4 in the map + 2 of the changed frontend fit 7.
        let next = services_a_b(&["10.244.0.2", "10.244.0.4"], &b);
        let report = sync_once(&mut io, &mut pipeline, &next, &mut logged).unwrap();
        assert!(!report.planned_all, "{report:?}");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        programmed(&io, &pipeline, &next);
        // Four new endpoints for `a` would not fit beside the old ones: the full check
        // refuses what does not fit, and plans everything until it fits again.
        let wide = services_a_b(
            &["10.244.0.5", "10.244.0.6", "10.244.0.7", "10.244.0.8"],
            &b,
        );
        let report = sync_once(&mut io, &mut pipeline, &wide, &mut logged).unwrap();
        assert!(report.planned_all, "{report:?}");
        assert!(!report.problems.is_empty(), "{report:?}");
        assert_eq!(&io.0, pipeline.state());
        assert!(io.0.backends.len() <= 7);
        // `a` was programmed: refused, it keeps what it had (kube-proxy would serve the new
        // endpoints; taking its entries away would be an outage), rather than losing them.
        assert!(
            report
                .problems
                .iter()
                .all(|p| p.message.contains("it keeps its previous state")),
            "{:?}",
            report.problems
        );
        programmed(&io, &pipeline, &next);
        let report = sync_once(&mut io, &mut pipeline, &next, &mut logged).unwrap();
        assert!(report.planned_all, "{report:?}");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        programmed(&io, &pipeline, &next);
        // Everything programmed again: the next endpoint change is planned alone.
        let report = sync_once(&mut io, &mut pipeline, &first, &mut logged).unwrap();
        assert!(!report.planned_all, "{report:?}");
        programmed(&io, &pipeline, &first);
    }

    /// The endpoints of the affinity tests (address, node): one here, two on node-b.
    const AFFINITY_ENDPOINTS: [(&str, &str); 3] = [
        ("10.244.0.5", "node-a"),
        ("10.244.1.5", "node-b"),
        ("10.244.1.6", "node-b"),
    ];

    /// One ClientIP Service (ClusterIP 10.96.0.1 and externalIP 192.0.2.1, port 80) with
    /// `spec` added and endpoints `eps` (address, node).
    fn affinity_service(spec: &str, eps: &[(&str, &str)]) -> Snapshot {
        let eps = eps
            .iter()
            .map(|(a, n)| format!("{{addresses: [{a}], nodeName: {n}}}"))
            .collect::<Vec<_>>()
            .join(", ");
        snapshot(&format!(
            "kind: Service\nmetadata: {{name: a, namespace: default}}\nspec: {{clusterIP: \
             10.96.0.1, externalIPs: [192.0.2.1], ports: [{{name: http, port: 80, protocol: \
             TCP}}]{spec}}}\n---\nkind: EndpointSlice\nmetadata: {{name: a-1, namespace: \
             default, labels: {{kubernetes.io/service-name: a}}}}\naddressType: IPv4\nports: \
             [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{eps}]"
        ))
    }

    /// semantics 6.6: an endpoint that leaves every set of a ClientIP Service port loses its
    /// affinity state (kube-proxy deletes its endpoint chain's set with the chain), even if it
    /// comes back or its id goes to another endpoint; one still offered by another frontend
    /// of the port keeps it (the frontends share the sets, 6.2, 6.7); turning affinity off
    /// drops the port's state.
    #[test]
    fn affinity_state_is_retired_with_the_endpoints_that_leave() {
        let [l, r, x] = AFFINITY_ENDPOINTS;
        let aff = ", sessionAffinity: ClientIP";
        let mut io = MapState::default();
        let mut pipeline = Pipeline::new(MapState::default());
        let mut logged = BTreeSet::new();
        let first = sync_once(
            &mut io,
            &mut pipeline,
            &affinity_service(aff, &[l, r, x]),
            &mut logged,
        )
        .unwrap();
        assert_eq!(first.retired_affinity, vec![]);
        let state = pipeline.state().clone();
        let mut sync = |snap: &Snapshot| {
            sync_once(&mut io, &mut pipeline, snap, &mut logged)
                .unwrap()
                .retired_affinity
        };
        let port = state
            .services
            .get(&crate::plan::ServiceKey::of(
                &crate::compile::FrontendAddr {
                    addr: "10.96.0.1".parse().unwrap(),
                    port: 80,
                    proto: crate::compile::Proto::Tcp,
                    scope: crate::compile::Scope::Internal,
                },
            ))
            .unwrap()
            .port_id;
        let id = |ip: &str| {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            *state
                .backends
                .iter()
                .find(|(_, b)| std::net::Ipv4Addr::from(b.addr4()) == ip)
                .unwrap()
                .0
        };
        let (id_l, id_r, id_x) = (id(l.0), id(r.0), id(x.0));
        // x leaves: its state goes.
        assert_eq!(sync(&affinity_service(aff, &[l, r])), vec![(port, id_x)]);
        // Back again (its state was dropped when it left): nothing more to drop.
        assert_eq!(sync(&affinity_service(aff, &[l, r, x])), vec![]);
        // Not ready: out of every set, so its state goes, as when deleted.
        let mut snap = affinity_service(aff, &[l, r, x]);
        let yaml_unready = "kind: EndpointSlice\nmetadata: {name: a-1, namespace: default, \
             labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nports: [{name: http, \
             port: 8080, protocol: TCP}]\nendpoints: [{addresses: [10.244.0.5], nodeName: \
             node-a}, {addresses: [10.244.1.5], nodeName: node-b}, {addresses: [10.244.1.6], \
             nodeName: node-b, conditions: {ready: false}}]";
        snap.slices = vec![std::sync::Arc::new(
            serde_norway::from_str(yaml_unready).unwrap(),
        )];
        let retired = sync(&snap);
        assert_eq!(retired.len(), 1, "{retired:?}");
        assert_eq!(retired[0].0, port);
        // internalTrafficPolicy Local: the ClusterIP no longer offers the remote r, the
        // externalIP still does: its state stays.
        assert_eq!(
            sync(&affinity_service(
                &format!("{aff}, internalTrafficPolicy: Local"),
                &[l, r]
            )),
            vec![]
        );
        // Affinity turned off: the port's state goes, for every endpoint.
        let retired = sync(&affinity_service("", &[l, r]));
        assert!(
            retired.contains(&(port, id_l)) && retired.contains(&(port, id_r)),
            "{retired:?} ({id_l}, {id_r})"
        );
        // Without affinity nothing is ever retired.
        assert_eq!(sync(&affinity_service("", &[l])), vec![]);
    }

    /// A sync that fails after an endpoint's member entries were deleted (its backend's
    /// deletion failed) still has that endpoint's affinity state forgotten: by the next sync,
    /// which finds nothing left to delete itself.
    #[test]
    fn affinity_state_of_a_failed_sync_is_retired_by_the_next() {
        let [l, r, x] = AFFINITY_ENDPOINTS;
        let aff = ", sessionAffinity: ClientIP";
        let mut io = MapState::default();
        let mut pipeline = Pipeline::new(MapState::default());
        let mut logged = BTreeSet::new();
        let all = affinity_service(aff, &[l, r, x]);
        sync_once(&mut io, &mut pipeline, &all, &mut logged).unwrap();
        let x_id = *io
            .backends
            .iter()
            .find(|(_, b)| std::net::Ipv4Addr::from(b.addr4()).to_string() == x.0)
            .unwrap()
            .0;
        let mut faulty = Faulty {
            state: io.clone(),
            ..Faulty::failing(Some(proxy_common::maps::LB_BACKENDS))
        };
        let without = affinity_service(aff, &[l, r]);
        assert!(sync_once(&mut faulty, &mut pipeline, &without, &mut logged).is_err());
        let mut io = faulty.state;
        assert!(
            io.members.keys().all(|k| k.backend_id != x_id),
            "members gone"
        );
        let report = sync_once(&mut io, &mut pipeline, &without, &mut logged).unwrap();
        assert_eq!(
            report
                .retired_affinity
                .iter()
                .map(|(_, b)| *b)
                .collect::<Vec<_>>(),
            vec![x_id]
        );
        // Once retired, it is not named again.
        let report = sync_once(&mut io, &mut pipeline, &without, &mut logged).unwrap();
        assert_eq!(report.retired_affinity, vec![]);
    }

    /// semantics 3.12: the ServiceCIDRs' ranges go to the source-range maps under id 0 (no
    /// frontend's), whatever the sync plans (incremental, full), and leave with their objects;
    /// a range that does not parse is left out, the others kept.
    #[test]
    fn service_cidrs_are_written_under_their_own_id() {
        use crate::plan::{SERVICE_CIDRS, SourceRange};
        let cidr = |s: &str| SourceRange {
            svc_id: SERVICE_CIDRS,
            cidr: crate::compile::Cidr::parse(s).unwrap(),
        };
        let ranges = |io: &MapState| -> Vec<SourceRange> {
            io.source_ranges
                .iter()
                .filter(|r| r.svc_id == SERVICE_CIDRS)
                .copied()
                .collect()
        };
        let mut io = MapState::default();
        let mut pipeline = Pipeline::new(MapState::default());
        let mut logged = BTreeSet::new();
        let mut snap = services_a_b(&["10.244.0.1"], &["10.244.0.2"]);
        snap.service_cidrs = vec![
            "10.96.0.0/16".into(),
            "fd00:96::/112".into(),
            "bogus".into(),
        ];
        sync_once(&mut io, &mut pipeline, &snap, &mut logged).unwrap();
        let both = vec![cidr("10.96.0.0/16"), cidr("fd00:96::/112")];
        assert_eq!(ranges(&io), both);
        // An endpoint change (an incremental plan) and a full plan keep them.
        let mut changed = services_a_b(&["10.244.0.1", "10.244.0.3"], &["10.244.0.2"]);
        changed.service_cidrs = snap.service_cidrs.clone();
        let report = sync_once(&mut io, &mut pipeline, &changed, &mut logged).unwrap();
        assert!(!report.planned_all);
        assert_eq!(ranges(&io), both);
        let mut full = Pipeline::new(io.clone());
        full.full_next = true;
        sync_once(&mut io, &mut full, &changed, &mut logged).unwrap();
        assert_eq!(ranges(&io), both);
        assert_eq!(&io, full.state());
        // One range gone with its object.
        changed.service_cidrs = vec!["10.96.0.0/16".into()];
        sync_once(&mut io, &mut full, &changed, &mut logged).unwrap();
        assert_eq!(ranges(&io), vec![cidr("10.96.0.0/16")]);
        assert_eq!(&io, full.state());
    }

    #[test]
    fn ids_stay_bounded_under_endpoint_churn() {
        // 300,000 backend add/remove cycles: one Service's endpoint is replaced each sync. Ids
        // are handed out lowest first, so they never grow past a few however long the churn
        // (LB_CONNS is an array indexed by backend id), and the maps hold one Service's worth.
        let slices: Vec<std::sync::Arc<crate::objects::Slice>> = (0..1000u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0af4_0000 + i);
                let yaml = format!(
                    "kind: EndpointSlice\nmetadata: {{name: a-1, namespace: default, labels: \
                     {{kubernetes.io/service-name: a}}}}\naddressType: IPv4\nports: [{{name: \
                     http, port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: [{ip}]}}]"
                );
                std::sync::Arc::new(serde_norway::from_str(&yaml).unwrap())
            })
            .collect();
        let mut snap = snapshot(
            "kind: Service\nmetadata: {name: a, namespace: default}\nspec: {clusterIP: \
             10.96.0.1, ports: [{name: http, port: 80, protocol: TCP}]}",
        );
        let mut io = MapState::default();
        let mut pipeline = Pipeline::new(MapState::default());
        let mut logged = BTreeSet::new();
        let mut highest = (0, 0, 0);
        for cycle in 0..300_000 {
            snap.slices = vec![std::sync::Arc::clone(&slices[cycle % slices.len()])];
            sync_once(&mut io, &mut pipeline, &snap, &mut logged).unwrap();
            let ids = pipeline.mirror.ids();
            highest = (
                highest.0.max(ids.backend.highest()),
                highest.1.max(ids.svc.highest()),
                highest.2.max(ids.port.highest()),
            );
        }
        assert!(highest.0 <= 2, "backend ids reached {}", highest.0);
        assert_eq!((highest.1, highest.2), (1, 1), "frontend and port ids");
        assert_eq!(io.backends.len(), 1);
        assert_eq!(io.members.len(), 1);
        assert_eq!(io.slots.len(), 1);
        assert_eq!(&io, pipeline.state());
    }

    #[test]
    fn a_failed_write_names_its_map() {
        for entries in [FULL_SYNC_GROUP, 1] {
            let mut io = Faulty::failing(Some(proxy_common::maps::LB_SLOTS));
            let mut pipeline = Pipeline::new(MapState::default()).with_group_entries(entries);
            let err = sync_once(
                &mut io,
                &mut pipeline,
                &two_maglev_services(&["10.244.0.2"]),
                &mut BTreeSet::new(),
            )
            .unwrap_err();
            assert_eq!(map_of_error(&err), "LB_SLOTS");
            // The mirror is what the maps hold, not what was planned.
            assert_eq!(&io.state, pipeline.state(), "groups of {entries}");
        }
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
            // external Local on a load balancer without node ports whose address is pending:
            // counted external all the same (kube-proxy's ExternalPolicyLocal goes by type).
            "kind: Service\nmetadata: {name: lb-pending, namespace: default}\nspec: {clusterIP: \
             10.96.0.5, type: LoadBalancer, externalTrafficPolicy: Local, \
             allocateLoadBalancerNodePorts: false, ports: [{name: http, port: 80, protocol: TCP}]}"
                .to_string(),
            slice("lb-pending", "node-b"),
        ];
        let d = crate::compile::compile(&snapshot(&docs.join("\n---\n")));
        assert_eq!(
            no_local_endpoints(&d),
            vec![(Family::V4, 1, 2), (Family::V6, 0, 0)]
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

    /// kube-proxy's `*_changes_pending` gauges (semantics 11.4): the objects a source saw change
    /// are pending until a sync programs them. A sync at once when idle leaves nothing pending;
    /// changes arriving within `min_interval` of it wait and add up (an object changed twice
    /// counts once, in each of its families), then the next sync takes them all.
    #[test]
    fn changes_are_pending_until_a_sync_takes_them() {
        let metrics = Arc::new(Metrics::new("test", &[Family::V4, Family::V6]));
        let observers = Observers {
            metrics: Some(metrics.clone()),
            ..Observers::default()
        };
        let pending = |family: &str| {
            let l = [("ip_family", family)];
            (
                metrics.service_changes_pending.with(&l).get(),
                metrics.endpoint_changes_pending.with(&l).get(),
            )
        };
        let wait = |what: &str, want: [(u64, u64); 2]| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let now = [pending("IPv4"), pending("IPv6")];
                if now == want {
                    return;
                }
                assert!(Instant::now() < deadline, "{what}: {now:?}, want {want:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // (name, family index) of the Services and slices noted as changed.
        let with = |mut s: Snapshot, services: &[(&str, usize)], slices: &[(&str, usize)]| {
            for (name, f) in services {
                s.changes.services[*f].insert(crate::snapshot::change_key("default", name));
            }
            for (name, f) in slices {
                s.changes.slices[*f].insert(crate::snapshot::change_key("default", name));
            }
            s
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = AtomicBool::new(false);
        let timing = SyncTiming {
            min_interval: Duration::from_secs(10),
            ..SyncTiming::default()
        };
        let mut io = Faulty::failing(None);
        std::thread::scope(|scope| {
            let agent = scope.spawn(|| run(&mut io, rx, timing, &stop, &observers));
            tx.send(with(
                services_a_b(&["10.244.0.2"], &[]),
                &[("a", 0), ("b", 0)],
                &[("a-1", 0)],
            ))
            .unwrap();
            let last_sync = || {
                metrics
                    .last_sync_timestamp
                    .with(&[("ip_family", "IPv4")])
                    .get()
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while last_sync() == 0.0 {
                assert!(Instant::now() < deadline, "no first sync");
                std::thread::sleep(Duration::from_millis(5));
            }
            wait("after the first sync", [(0, 0), (0, 0)]);
            // Within min_interval of that sync: held, and added up.
            let synced = last_sync();
            tx.send(with(
                services_a_b(&["10.244.0.3"], &[]),
                &[("a", 0), ("a", 1)],
                &[("a-1", 0)],
            ))
            .unwrap();
            tx.send(with(
                services_a_b(&["10.244.0.3"], &["10.244.0.4"]),
                &[("a", 0), ("a", 1)],
                &[("b-6", 1)],
            ))
            .unwrap();
            wait("two changes held", [(1, 1), (1, 1)]);
            assert_eq!(last_sync(), synced, "held changes were synced early");
            wait("after the next sync", [(0, 0), (0, 0)]);
            stop.store(true, Ordering::Relaxed);
            agent.join().unwrap().unwrap();
        });
    }
}
