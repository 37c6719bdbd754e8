//! Debug logging through aya-log (at info level: it only exists while switched on), behind the `CONFIG_DEBUG_LOG` runtime switch (off by default:
//! a log call costs more than the whole translation).

use proxy_common::config::CONFIG_DEBUG_LOG;

use super::maps::config_flag;

/// Whether an operator turned BPF debug logs on.
#[inline(always)]
pub fn enabled() -> bool {
    config_flag(CONFIG_DEBUG_LOG)
}
