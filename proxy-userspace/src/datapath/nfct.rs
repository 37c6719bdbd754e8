//! The kernel's own (netfilter) connection tracking, which this proxy does not use for Service
//! traffic but the node's other traffic still goes through (a CNI's masquerading, host
//! firewalls, connections to and from host processes): kube-proxy tunes it at its start
//! (semantics 9.6), and a node that replaces kube-proxy keeps the same settings.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
};

/// What kube-proxy writes to the kernel's own (netfilter) connection tracking at its start
/// (semantics 9.6), which other traffic of the node still goes through with this proxy in
/// its place: `None` leaves a setting as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetfilterSettings {
    /// `nf_conntrack_max` (and the hash table's size, a quarter of it): raised to this.
    pub max: Option<u64>,
    pub tcp_established_secs: Option<u64>,
    pub tcp_close_wait_secs: Option<u64>,
    /// `nf_conntrack_tcp_be_liberal` set to 1.
    pub tcp_be_liberal: bool,
    pub udp_secs: Option<u64>,
    pub udp_stream_secs: Option<u64>,
}

/// Where the settings live: `/` on a node, a directory of stand-in files in tests.
pub struct Kernel {
    root: PathBuf,
}

/// One setting's outcome, to log.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written (the value it had before).
    Set { name: String, from: u64, to: u64 },
    /// Already so, or (`nf_conntrack_max`, the hash size) already larger: kube-proxy's value is
    /// a floor, an administrator's larger one stays.
    Kept { name: String, value: u64 },
    /// Could not be read or written: a warning, never fatal (kube-proxy too goes on when
    /// /sys is read-only, as it is in some container runtimes, or in a network namespace
    /// other than the node's, where `nf_conntrack_max` is read-only).
    Failed { name: String, error: String },
}

const NETFILTER: &str = "proc/sys/net/netfilter";
const HASHSIZE: &str = "sys/module/nf_conntrack/parameters/hashsize";
/// The hash size's name in outcomes.
const HASHSIZE_NAME: &str = "nf_conntrack hashsize";
/// What a failed write's error says when the file is read-only.
const READ_ONLY: &str = "is read-only here";
/// What it says when the file system is mounted read-only (EROFS): kube-proxy's
/// `readOnlySysFS` case.
const READ_ONLY_FS: &str = "is on a read-only file system";

impl Kernel {
    pub fn node() -> Self {
        Self::at("/")
    }

    pub fn at(root: impl AsRef<Path>) -> Self {
        Kernel {
            root: root.as_ref().to_path_buf(),
        }
    }

    fn sysctl(&self, name: &str) -> PathBuf {
        self.root.join(NETFILTER).join(name)
    }

    /// Whether netfilter's connection tracking is loaded at all: when it is not, nothing on
    /// the node tracks connections through it and there is nothing to tune (whatever loads it
    /// later sets it up its own way).
    pub fn loaded(&self) -> bool {
        self.sysctl("nf_conntrack_max").exists()
    }

    /// Applies `s`; what happened to each setting, in order.
    pub fn apply(&self, s: &NetfilterSettings) -> Vec<Outcome> {
        let mut out = Vec::new();
        if let Some(max) = s.max {
            out.push(self.raise(self.sysctl("nf_conntrack_max"), "nf_conntrack_max", max));
            // As kube-proxy: a table of `max` entries in a quarter as many buckets.
            out.push(self.raise(self.root.join(HASHSIZE), HASHSIZE_NAME, max / 4));
        }
        let exact = [
            (
                "nf_conntrack_tcp_timeout_established",
                s.tcp_established_secs,
            ),
            ("nf_conntrack_tcp_timeout_close_wait", s.tcp_close_wait_secs),
            ("nf_conntrack_tcp_be_liberal", s.tcp_be_liberal.then_some(1)),
            ("nf_conntrack_udp_timeout", s.udp_secs),
            ("nf_conntrack_udp_timeout_stream", s.udp_stream_secs),
        ];
        for (name, value) in exact {
            if let Some(value) = value {
                out.push(self.set(self.sysctl(name), name, value, |now| now == value));
            }
        }
        out
    }

    fn raise(&self, path: PathBuf, name: &str, value: u64) -> Outcome {
        self.set(path, name, value, |now| now >= value)
    }

    /// Writes `value` to `path` unless `enough` says the value there will do.
    fn set(&self, path: PathBuf, name: &str, value: u64, enough: impl Fn(u64) -> bool) -> Outcome {
        let failed = |error: String| Outcome::Failed {
            name: name.to_string(),
            error,
        };
        let now = match std::fs::read_to_string(&path) {
            Ok(text) => match text.trim().parse::<u64>() {
                Ok(n) => n,
                Err(_) => return failed(format!("{} holds {:?}", path.display(), text.trim())),
            },
            Err(e) => return failed(format!("read {}: {e}", path.display())),
        };
        if enough(now) {
            return Outcome::Kept {
                name: name.to_string(),
                value: now,
            };
        }
        match std::fs::write(&path, value.to_string()) {
            Ok(()) => Outcome::Set {
                name: name.to_string(),
                from: now,
                to: value,
            },
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                failed(format!("{} {READ_ONLY_FS} ({e})", path.display()))
            }
            Err(e) if e.kind() == ErrorKind::PermissionDenied => failed(format!(
                "{} {READ_ONLY} ({e}; a network namespace other than the node's)",
                path.display()
            )),
            Err(e) => failed(format!("write {}: {e}", path.display())),
        }
    }
}

/// Applies `s` on this node and logs what was done. Returns whether the hash size could not
/// be set because /sys is read-only (kube-proxy's `readOnlySysFS` event).
pub fn apply_on_node(s: &NetfilterSettings) -> bool {
    let kernel = Kernel::node();
    if !kernel.loaded() {
        log::info!(
            "netfilter connection tracking is not loaded: kube-proxy's settings of it \
             (nf_conntrack_max, TCP timeouts) have nothing to apply to"
        );
        return false;
    }
    let outcomes = kernel.apply(s);
    let read_only = read_only_sysfs(&outcomes);
    for outcome in outcomes {
        match outcome {
            Outcome::Set { name, from, to } => {
                log::info!(
                    "netfilter connection tracking: {name} set to {to} (was {from}), as kube-proxy sets it"
                )
            }
            Outcome::Kept { name, value } => {
                log::debug!("netfilter connection tracking: {name} left at {value}")
            }
            Outcome::Failed { name, error } => {
                log::warn!("netfilter connection tracking: {name} not set: {error}")
            }
        }
    }
    read_only
}

/// Whether `outcomes` say the hash size could not be written because /sys is mounted
/// read-only (EROFS; a permission refused is not that).
fn read_only_sysfs(outcomes: &[Outcome]) -> bool {
    outcomes.iter().any(|o| {
        matches!(o, Outcome::Failed { name, error }
            if name == HASHSIZE_NAME && error.contains(READ_ONLY_FS))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of stand-in files, removed on drop.
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn kernel(files: &[(&str, &str)]) -> (Dir, Kernel) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = Dir(std::env::temp_dir().join(format!(
            "kbp-nfct-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )));
        for (path, value) in files {
            let p = dir.0.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, value).unwrap();
        }
        let k = Kernel::at(&dir.0);
        (dir, k)
    }

    fn read(dir: &Dir, path: &str) -> String {
        std::fs::read_to_string(dir.0.join(path)).unwrap()
    }

    /// kube-proxy's settings on a 2-CPU node (`config::netfilter_settings`).
    const DEFAULTS_2_CPUS: NetfilterSettings = NetfilterSettings {
        max: Some(131072),
        tcp_established_secs: Some(86400),
        tcp_close_wait_secs: Some(3600),
        tcp_be_liberal: false,
        udp_secs: None,
        udp_stream_secs: None,
    };

    const MAX: &str = "proc/sys/net/netfilter/nf_conntrack_max";
    const ESTABLISHED: &str = "proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established";
    const CLOSE_WAIT: &str = "proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait";

    /// semantics 9.6: kube-proxy's defaults on a 2-CPU node: the table raised to 131072 (the
    /// hash to a quarter), TCP timeouts 24 h and 1 h, the rest left alone.
    #[test]
    fn kube_proxy_defaults_are_written() {
        let (dir, k) = kernel(&[
            (MAX, "65536\n"),
            (HASHSIZE, "16384\n"),
            (ESTABLISHED, "432000\n"),
            (CLOSE_WAIT, "60\n"),
            ("proc/sys/net/netfilter/nf_conntrack_udp_timeout", "30\n"),
        ]);
        assert!(k.loaded());
        let s = DEFAULTS_2_CPUS;
        let out = k.apply(&s);
        assert!(
            out.iter().all(|o| matches!(o, Outcome::Set { .. })),
            "{out:?}"
        );
        assert_eq!(read(&dir, MAX), "131072");
        assert_eq!(read(&dir, HASHSIZE), "32768");
        assert_eq!(read(&dir, ESTABLISHED), "86400");
        assert_eq!(read(&dir, CLOSE_WAIT), "3600");
        assert_eq!(
            read(&dir, "proc/sys/net/netfilter/nf_conntrack_udp_timeout"),
            "30\n"
        );
    }

    /// A larger table an administrator set stays; an unreadable setting is a failure to log,
    /// and the others are still written.
    #[test]
    fn a_larger_table_stays_and_failures_do_not_stop_the_rest() {
        let (dir, k) = kernel(&[
            (MAX, "1048576\n"),
            (HASHSIZE, "262144\n"),
            (CLOSE_WAIT, "x"),
        ]);
        let s = DEFAULTS_2_CPUS;
        let out = k.apply(&s);
        assert_eq!(
            out[..2],
            [
                Outcome::Kept {
                    name: "nf_conntrack_max".into(),
                    value: 1048576
                },
                Outcome::Kept {
                    name: "nf_conntrack hashsize".into(),
                    value: 262144
                }
            ]
        );
        assert!(
            matches!(&out[2], Outcome::Failed { name, .. } if name == "nf_conntrack_tcp_timeout_established")
        );
        assert!(
            matches!(&out[3], Outcome::Failed { name, .. } if name == "nf_conntrack_tcp_timeout_close_wait")
        );
        assert_eq!(read(&dir, MAX), "1048576\n");
    }

    /// kube-proxy's `readOnlySysFS` event is for the hash size under a read-only /sys only.
    #[test]
    fn a_read_only_hash_size_is_told_apart() {
        let failed = |name: &str, error: String| Outcome::Failed {
            name: name.into(),
            error,
        };
        assert!(read_only_sysfs(&[failed(
            HASHSIZE_NAME,
            format!("/sys/x {READ_ONLY_FS} (Read-only file system (os error 30))")
        )]));
        // A permission refused (a network namespace other than the node's) is not it.
        assert!(!read_only_sysfs(&[failed(
            HASHSIZE_NAME,
            format!("/sys/x {READ_ONLY} (Permission denied (os error 13))")
        )]));
        assert!(!read_only_sysfs(&[failed(
            HASHSIZE_NAME,
            "read /sys/x: No such file or directory".into()
        )]));
        assert!(!read_only_sysfs(&[failed(
            "nf_conntrack_max",
            format!("/proc/x {READ_ONLY_FS}")
        )]));
    }

    /// Without netfilter's connection tracking there is nothing to tune.
    #[test]
    fn not_loaded_without_its_sysctls() {
        let (_dir, k) = kernel(&[]);
        assert!(!k.loaded());
    }
}
