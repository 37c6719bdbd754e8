//! SIGTERM and SIGINT for the long-running commands (`run`, `monitor`): tokio's signal
//! handling on a small runtime of its own, on the thread `signals`, which sets a stop flag the
//! command polls.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;

use crate::datapath::caps;

/// Sets `stop` on the first SIGTERM or SIGINT. The handlers are registered before this
/// returns, so no signal is missed. The thread drops every capability first: it needs none
/// (`run` calls this before it drops its own).
pub fn stop_on_signals(stop: &'static AtomicBool) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("start the signal runtime")?;
    let (mut term, mut int) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .context("install the SIGTERM and SIGINT handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Err(e) = caps::drop_to(&[]) {
                log::warn!("signals thread: dropping capabilities failed: {e}");
            }
            runtime.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            stop.store(true, Ordering::Relaxed);
        })
        .context("start the signals thread")?;
    Ok(())
}
