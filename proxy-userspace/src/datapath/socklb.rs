//! Keeps `LB_SOCKLB_OFF` equal to the cgroups of the pods translated per packet: kubelet names
//! each pod's cgroup after the pod's uid (`socklb::is_pod_cgroup_of`), somewhere under the
//! hooked cgroup (`kubepods.slice/...` or `kubepods/...`). The thread looks again whenever the
//! decision changes, every 250 ms while a pod's cgroup is still missing (kubelet creates it
//! when it starts the pod, after the Pod object names this node), and every 2 s otherwise.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread,
    time::Duration,
};

use super::bpf::SocketLbOff;
use crate::{
    metrics::{Metrics, Series as _},
    socklb::{Decision, pod_uid_of},
};

/// How deep below the hooked cgroup pod cgroups are looked for (kubelet's are at depth 2 or 3
/// below the root: `kubepods.slice/kubepods-<qos>.slice/<pod>`).
const MAX_DEPTH: usize = 6;

/// A pod cgroup: its id (the directory's inode number) and level (depth below the root of the
/// cgroup hierarchy, as `bpf_get_current_ancestor_cgroup_id` counts).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub id: u64,
    pub level: u32,
}

/// The pod cgroups under `dir` (at `level`), by pod uid. Does not descend into a pod's cgroup.
pub fn scan(dir: &Path, level: u32) -> BTreeMap<String, PodCgroup> {
    let mut out = BTreeMap::new();
    walk(dir, level, 0, &mut out);
    out
}

fn walk(dir: &Path, level: u32, depth: usize, out: &mut BTreeMap<String, PodCgroup>) {
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match pod_uid_of(&name) {
            Some(uid) => {
                if let Ok(meta) = entry.metadata() {
                    out.insert(
                        uid,
                        PodCgroup {
                            id: meta.ino(),
                            level: level + 1,
                        },
                    );
                }
            }
            None => walk(&entry.path(), level + 1, depth + 1, out),
        }
    }
}

/// The level of cgroup directory `dir` on the cgroup2 filesystem mounted at `mount`: its depth
/// below the mount, plus the depth of the mount's own root in the hierarchy
/// (/proc/self/mountinfo; "/" for the usual mount of the whole hierarchy).
pub fn level_of(dir: &Path, mount: &Path) -> u32 {
    let below = dir
        .strip_prefix(mount)
        .map_or(0, |rel| rel.components().count());
    let root_depth = fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let fstype = f.iter().position(|x| *x == "-").and_then(|i| f.get(i + 1));
                (f.len() > 4 && Path::new(f[4]) == mount && fstype == Some(&"cgroup2"))
                    .then(|| Path::new(f[3]).components().count().saturating_sub(1))
            })
        })
        .unwrap_or(0);
    (below + root_depth) as u32
}

/// What the maps should hold, from a decision and the cgroups found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// `LB_SOCKLB_OFF`: each found pod's cgroup → 1, and key 0 → the levels in use (only when
    /// some pod is there).
    pub cgroups: BTreeMap<u64, u32>,
    /// `LB_SOCKLB_NS`: every per-packet namespace with its pods found, by name.
    pub namespaces: Vec<(String, u32)>,
    /// Pods whose cgroup was not found (`namespace/name`).
    pub missing: Vec<String>,
}

pub fn wanted(decision: &Decision, cgroups: &BTreeMap<String, PodCgroup>) -> Wanted {
    let mut out = Wanted::default();
    let mut levels = 0u32;
    let mut pods: BTreeMap<&str, u32> = decision
        .per_packet_namespaces
        .iter()
        .map(|n| (n.as_str(), 0))
        .collect();
    for pod in &decision.pods {
        match cgroups.get(&pod.uid) {
            Some(c) if c.level < 32 && c.id != 0 => {
                out.cgroups.insert(c.id, 1);
                levels |= 1 << c.level;
                *pods.entry(pod.namespace.as_str()).or_default() += 1;
            }
            _ => out.missing.push(format!("{}/{}", pod.namespace, pod.name)),
        }
    }
    if levels != 0 {
        out.cgroups.insert(0, levels);
    }
    out.namespaces = pods.into_iter().map(|(n, c)| (n.to_string(), c)).collect();
    out
}

/// Starts the thread; send it each new decision. `cgroup` is the hooked cgroup, on the cgroup2
/// filesystem mounted at `mount`.
pub fn follow(
    pin_dir: &Path,
    cgroup: PathBuf,
    mount: PathBuf,
    metrics: Option<Arc<Metrics>>,
) -> anyhow::Result<mpsc::Sender<Decision>> {
    let mut map = SocketLbOff::open_pinned(pin_dir)?;
    let (tx, rx) = mpsc::channel::<Decision>();
    let base = level_of(&cgroup, &mount);
    thread::Builder::new()
        .name("socklb".into())
        .spawn(move || {
            // Nothing is written before the first decision: the map keeps what a previous
            // agent wrote until the Pods and the Namespaces are known.
            let Ok(mut decision) = rx.recv() else {
                return;
            };
            let mut written: Option<Wanted> = None;
            let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
            let mut missing_before: Vec<String> = Vec::new();
            let mut wait = Duration::ZERO;
            let mut last_error: Option<String> = None;
            loop {
                match rx.recv_timeout(wait) {
                    Ok(d) => decision = d,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                // Only the newest decision matters.
                while let Ok(d) = rx.try_recv() {
                    decision = d;
                }
                for p in &decision.problems {
                    if reported.insert(p.clone()) {
                        log::warn!("namespace {}: {}", p.0, p.1);
                    }
                }
                let cgroups = if decision.pods.is_empty() {
                    BTreeMap::new()
                } else {
                    scan(&cgroup, base)
                };
                let want = wanted(&decision, &cgroups);
                let missing = want.missing.clone();
                if let Some(m) = &metrics {
                    let programmed = want.cgroups.len().saturating_sub(1) as u64;
                    m.socket_lb_off_pods
                        .with(&[("state", "programmed")])
                        .set(programmed);
                    m.socket_lb_off_pods
                        .with(&[("state", "waiting")])
                        .set(missing.len() as u64);
                    m.socket_lb_label_errors
                        .with(&[])
                        .set(decision.problems.len() as u64);
                }
                if missing != missing_before {
                    if !missing.is_empty() {
                        log::info!(
                            "socket-layer translation off: no cgroup yet for {} pod(s) ({}); \
                             looking again",
                            missing.len(),
                            missing.join(", ")
                        );
                    }
                    missing_before = missing.clone();
                }
                if written.as_ref() != Some(&want) {
                    let synced = map
                        .sync(&want.cgroups)
                        .and_then(|wr| map.set_namespaces(&want.namespaces).map(|()| wr));
                    match synced {
                        Ok((w, r)) => {
                            log::info!(
                                "socket-layer translation off for {} pod(s) in namespaces [{}] \
                                 ({w} written, {r} removed)",
                                want.cgroups.len().saturating_sub(1),
                                decision.per_packet_namespaces.join(", ")
                            );
                            written = Some(want);
                            last_error = None;
                        }
                        Err(e) => {
                            // Once per different error, not at every retry.
                            let text = format!("{e:#}");
                            if last_error.as_deref() != Some(text.as_str()) {
                                log::warn!("LB_SOCKLB_OFF: {text}; retrying every 250 ms");
                                last_error = Some(text);
                            }
                            written = None;
                        }
                    }
                }
                wait = if !missing.is_empty() || written.is_none() {
                    Duration::from_millis(250)
                } else {
                    Duration::from_secs(2)
                };
            }
        })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socklb::PerPacketPod;

    #[test]
    fn finds_pod_cgroups_of_both_drivers_and_their_levels() {
        let root = std::env::temp_dir().join(format!("kbp-socklb-{}", std::process::id()));
        let uid_a = "0d9c8a4e-5b1f-4c3a-9f00-123456789abc";
        let uid_b = "11111111-2222-3333-4444-555555555555";
        let a = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid_a.replace('-', "_")
        ));
        let b = root.join(format!("kubepods/pod{uid_b}"));
        fs::create_dir_all(a.join("cri-containerd-1.scope")).unwrap();
        fs::create_dir_all(&b).unwrap();
        let found = scan(&root, 4);
        let _ = fs::remove_dir_all(&root);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[uid_a].level, 7);
        assert_eq!(found[uid_b].level, 6);
        let decision = Decision {
            pods: vec![
                PerPacketPod {
                    namespace: "mesh".into(),
                    name: "a".into(),
                    uid: uid_a.into(),
                    ips: vec![],
                },
                PerPacketPod {
                    namespace: "mesh".into(),
                    name: "late".into(),
                    uid: "nope".into(),
                    ips: vec![],
                },
            ],
            ..Decision::default()
        };
        let decision = Decision {
            per_packet_namespaces: vec!["empty".into(), "mesh".into()],
            ..decision
        };
        let w = wanted(&decision, &found);
        assert_eq!(w.cgroups.len(), 2);
        assert_eq!(w.cgroups[&0], 1 << 7);
        assert_eq!(w.cgroups[&found[uid_a].id], 1);
        assert_eq!(w.missing, ["mesh/late"]);
        assert_eq!(
            w.namespaces,
            [("empty".to_string(), 0), ("mesh".to_string(), 1)]
        );
        let w = wanted(&Decision::default(), &found);
        assert_eq!(w, Wanted::default());
    }
}
