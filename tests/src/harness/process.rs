//! Child processes inside a namespace (and optionally the test cgroup), killed on drop.

use std::{
    ffi::CString,
    fs::File,
    io::{BufRead as _, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde::Deserialize;

/// Finds a binary of this workspace next to the running executable (`target/<profile>/` or
/// its `deps/` subdirectory), or at `$KBP_<NAME>_BIN`.
pub fn workspace_binary(name: &str) -> PathBuf {
    let var = format!("KBP_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "binary {name} not found next to {} (build it: `cargo build -p proxy-userspace -p tests --bins`, \
         which `cargo xtask test` does) or set {var}",
        exe.display()
    )
}

/// Where a child runs.
pub struct Placement<'a> {
    /// Network namespace file (`/run/netns/NAME`).
    pub netns: &'a str,
    /// `cgroup.procs` of the cgroup to join before entering the namespace.
    pub cgroup_procs: Option<&'a Path>,
}

/// Builds a command that joins the cgroup first, then the network namespace (`ip netns exec`
/// would remount /sys and hide the cgroup2 mount, so the harness does both itself).
pub fn command_in(placement: &Placement<'_>, program: &Path, args: &[&str]) -> Command {
    let netns = File::open(placement.netns)
        .unwrap_or_else(|e| panic!("open netns {}: {e}", placement.netns));
    let cgroup = placement.cgroup_procs.map(|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
    });
    let mut cmd = Command::new(program);
    cmd.args(args);
    let zero = CString::new("0").expect("no NUL");
    // SAFETY: only async-signal-safe calls (write, setns) on fds opened before fork; the Files
    // are moved into the closure so they stay open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(cgroup) = &cgroup
                && libc::write(cgroup.as_raw_fd(), zero.as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A running child that is killed and reaped on drop.
pub struct ChildGuard {
    pub name: String,
    pub child: Child,
}

impl ChildGuard {
    /// Spawns and waits (bounded) until the child prints `ready` on stdout.
    pub fn spawn_ready(name: &str, mut cmd: Command) -> ChildGuard {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let guard = ChildGuard {
            name: name.to_string(),
            child,
        };
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first.and_then(Result::ok));
            for _ in lines {} // keep the pipe drained
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(line)) if line.trim() == "ready" => guard,
            other => panic!("{name} did not become ready: {other:?}"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One reply line of `testhost request`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    /// Name of the backend that answered.
    #[serde(default)]
    pub backend: String,
    /// Client address as the backend saw it.
    #[serde(default)]
    pub seen: String,
    /// Peer address as the client saw it (getpeername / recvfrom source).
    #[serde(default)]
    pub peer: String,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub errno: Option<i32>,
    /// The client's path MTU to the destination afterwards (`testhost pmtu` only).
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// Runs a command to completion within `timeout`, returning its stdout; kills it past that.
pub fn output_within(mut cmd: Command, timeout: Duration) -> String {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(out)) => {
            if !out.status.success() {
                panic!(
                    "{cmd:?} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        Ok(Err(e)) => panic!("wait for {cmd:?}: {e}"),
        Err(_) => {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {timeout:?}")
        }
    }
}

/// Parses `testhost request` output.
pub fn parse_replies(stdout: &str) -> Vec<Reply> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad reply line {l:?}: {e}")))
        .collect()
}
