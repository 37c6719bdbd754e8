//! Unique, short names: `kbp<pid36>-<n36>`. Interface names must fit in 15 bytes.

use std::sync::atomic::{AtomicU32, Ordering};

/// Every object the harness creates starts with this; `sweep` removes leftovers by it.
pub const PREFIX: &str = "kbp";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// A fresh name unique to this process and call, e.g. `kbp1k2f-3`.
pub fn unique() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}-{}", base36(std::process::id()), base36(n))
}
