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

/// Removes `cgroup`'s child cgroups the same way, moves every process of `cgroup` to its
/// parent, then removes it. A process killed just
/// before stays in the cgroup until it has exited (it cannot be moved), and the directory is
/// busy until then: the removal is retried for up to 5 s.
pub fn remove_cgroup(cgroup: &Path) {
    // Child cgroups first (a testbed's `kubepods`): a cgroup with children is busy for good.
    if let Ok(entries) = fs::read_dir(cgroup) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let parent_procs = cgroup
        .parent()
        .map(|p| p.join("cgroup.procs"))
        .expect("cgroup has a parent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = fs::write(&parent_procs, pid);
            }
        }
        match fs::remove_dir(cgroup) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("cleanup: remove cgroup {}: {e}", cgroup.display());
                return;
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}
