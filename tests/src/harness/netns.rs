//! A named network namespace (`ip netns`), deleted on drop together with its interfaces.

use super::{run, run_quiet};

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: String) -> Self {
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec <ns> PROGRAM ARGS...`, which must succeed; returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `sysctl -w` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
    }

    /// Path of the namespace file, for setns(2).
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread of its own that entered this namespace (setns(2)), e.g. to probe
    /// what the kernel offers there; a panic in `f` is resumed in the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd as _;
        let ns = std::fs::File::open(self.path())
            .unwrap_or_else(|e| panic!("open netns {}: {e}", self.path()));
        std::thread::scope(|s| {
            let worker = s.spawn(move || {
                // SAFETY: setns(2) on a file we hold; it changes this thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!("setns {}: {}", self.name, std::io::Error::last_os_error());
                }
                f()
            });
            worker
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        run_quiet("ip", &["netns", "del", &self.name]);
    }
}
