//! Removes what a crashed earlier run left behind, by name prefix: namespaces, cgroups, pins
//! and manifest directories. Only objects whose creating process is gone are touched.

use std::{fs, path::Path};

use super::{cgroup, names::PREFIX, run_quiet};

/// `kbp<pid36>-<n>...`: the pid part of a harness name, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let pid36 = rest.split('-').next()?;
    u32::from_str_radix(pid36, 36).ok()
}

fn stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

pub fn sweep() {
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if stale(name) {
                run_quiet("ip", &["netns", "del", name]);
            }
        }
    }
    let root = cgroup::cgroup2_root();
    for dir in [
        root.as_path(),
        Path::new("/sys/fs/bpf"),
        &std::env::temp_dir(),
    ] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !stale(&name) {
                continue;
            }
            let path = entry.path();
            if dir == root {
                cgroup::remove_cgroup(&path);
            } else {
                let _ = fs::remove_dir_all(&path);
            }
        }
    }
}
