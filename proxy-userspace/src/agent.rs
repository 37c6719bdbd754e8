//! The sync loop: snapshots in, coalesced, compiled, planned and applied to the datapath.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use crate::{
    compile::compile,
    datapath::MapIo,
    plan::{MapState, plan},
    snapshot::Snapshot,
};

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
    pub frontends: usize,
    pub writes: usize,
    pub problems: usize,
    pub duration: Duration,
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
    let desired = compile(snapshot);
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
    for op in &ops {
        if let Err(e) = io.apply(op) {
            *current = io.dump().unwrap_or_else(|_| current.clone());
            return Err(e);
        }
        current.apply(op);
    }
    Ok(SyncReport {
        frontends: desired.frontends.len(),
        writes: ops.len(),
        problems: desired.problems.len(),
        duration: started.elapsed(),
    })
}

/// Runs until `stop` is set or the source ends.
pub fn run(
    io: &mut dyn MapIo,
    rx: Receiver<Snapshot>,
    timing: SyncTiming,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
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
        let result = sync_once(io, &mut current, &snapshot, &mut logged);
        io.synced(result.is_ok());
        match result {
            Ok(report) => log::info!(
                "synced: {} frontends, {} map writes, {} rejected objects, {:?} (change to programmed {:?})",
                report.frontends,
                report.writes,
                report.problems,
                report.duration,
                first.elapsed()
            ),
            Err(e) => {
                log::error!("sync failed: {e:#}; keeping the programmed state, retrying");
                std::thread::sleep(timing.retry);
                pending = Some((snapshot, first, Instant::now()));
            }
        }
    }
    Ok(())
}
