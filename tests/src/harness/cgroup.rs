//! A child cgroup v2 directory for the test's clients; the socket hooks attach here, never to
//! the root. On drop its processes are moved to the parent and the directory removed.

use std::{
    fs,
    path::{Path, PathBuf},
};

pub struct TestCgroup {
    pub path: PathBuf,
}

/// The cgroup2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup2 filesystem mounted")
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }

    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

/// Moves every process of `cgroup` to its parent, then removes it.
pub fn remove_cgroup(cgroup: &Path) {
    let parent_procs = cgroup
        .parent()
        .map(|p| p.join("cgroup.procs"))
        .expect("cgroup has a parent");
    if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
        for pid in procs.lines() {
            let _ = fs::write(&parent_procs, pid);
        }
    }
    if let Err(e) = fs::remove_dir(cgroup) {
        eprintln!("cleanup: remove cgroup {}: {e}", cgroup.display());
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}
