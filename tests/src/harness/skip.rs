//! No silent skips. A test that cannot run here must not pass unnoticed:
//!
//! - missing privileges (not root): a failure under `CI=true` or `KBP_REQUIRE_PRIVILEGES=1`,
//!   otherwise a skip;
//! - a missing kernel feature (probed, never assumed): a skip.
//!
//! A skip is appended as `test: reason` to the file `$KBP_SKIP_LOG` (set by `cargo xtask test`,
//! which lists the skipped tests by name and counts them as skipped, not passed) and written to
//! the real stderr, past libtest's capture of passing tests' output.

use std::{io::Write as _, path::Path};

/// The file skips are appended to (one `test: reason` line each).
pub const SKIP_LOG_ENV: &str = "KBP_SKIP_LOG";
/// Set to `1` to make missing privileges a failure outside CI too.
pub const REQUIRE_PRIVILEGES_ENV: &str = "KBP_REQUIRE_PRIVILEGES";

/// The name of the running test: `<test binary>::<test path>`, e.g.
/// `socket_lb::clusterip_sctp_v4_balances_over_every_backend` (libtest names each test's thread
/// after the test; the binary is `<name>-<hash>`).
pub fn current_test() -> String {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unknown-test");
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| binary_name(&stem).to_string());
    match binary {
        Some(b) => format!("{b}::{test}"),
        None => test.to_string(),
    }
}

/// `socket_lb-0123abcd` -> `socket_lb` (cargo appends `-<16 hex digits>` to test binaries).
fn binary_name(stem: &str) -> &str {
    match stem.rsplit_once('-') {
        Some((name, hash)) if !hash.is_empty() && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            name
        }
        _ => stem,
    }
}

/// Records the running test as skipped because of `reason`; the caller then returns.
pub fn skip(reason: &str) {
    let name = current_test();
    let reason = one_line(reason);
    // Straight to stderr: libtest captures `eprintln!` of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIPPED {name}: {reason}");
    if let Some(log) = std::env::var_os(SKIP_LOG_ENV) {
        append_skip(Path::new(&log), &name, &reason)
            .unwrap_or_else(|e| panic!("record the skip of {name} in {log:?}: {e}"));
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Appends `name: reason` to the skip log at `log` (created if absent).
pub fn append_skip(log: &Path, name: &str, reason: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    // One write per line: test binaries run one after another, but stay safe with threads.
    f.write_all(format!("{name}: {}\n", one_line(reason)).as_bytes())
}

/// The skip log's entries, `(test, reason)`, first occurrence of each test only.
pub fn read_skips(log: &Path) -> std::io::Result<Vec<(String, String)>> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (name, reason) = line.split_once(": ").unwrap_or((line, ""));
        if !out.iter().any(|(n, _)| n == name) {
            out.push((name.to_string(), reason.to_string()));
        }
    }
    Ok(out)
}

/// What to do about privileges.
#[derive(Debug, PartialEq, Eq)]
pub enum Privileges {
    /// Root: run.
    Run,
    /// Not root where privileges are required (CI): fail with this message.
    Fail(String),
    /// Not root on a developer's machine: skip with this reason.
    Skip(String),
}

/// Whether privileges are required: `CI=true` (or `1`) or `KBP_REQUIRE_PRIVILEGES=1`.
fn required(ci: Option<&str>, require: Option<&str>) -> bool {
    let truthy = |v: Option<&str>| {
        v.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
    };
    truthy(ci) || truthy(require)
}

/// The decision for effective uid `euid` under the environment values of `CI` and
/// `KBP_REQUIRE_PRIVILEGES`.
pub fn privileges_for(euid: u32, ci: Option<&str>, require: Option<&str>) -> Privileges {
    if euid == 0 {
        return Privileges::Run;
    }
    let why = format!("end-to-end tests need root (euid is {euid}; run `sudo cargo xtask test`)");
    if required(ci, require) {
        Privileges::Fail(format!(
            "{why}; CI=true or {REQUIRE_PRIVILEGES_ENV}=1 makes a missing privilege a failure"
        ))
    } else {
        Privileges::Skip(why)
    }
}

/// True if the running test may touch the kernel (root). Otherwise panics where privileges are
/// required, or records the test as skipped and returns false (the caller returns).
pub fn require_root() -> bool {
    // SAFETY: plain getter.
    let euid = unsafe { libc::geteuid() };
    let ci = std::env::var("CI").ok();
    let require = std::env::var(REQUIRE_PRIVILEGES_ENV).ok();
    match privileges_for(euid, ci.as_deref(), require.as_deref()) {
        Privileges::Run => true,
        Privileges::Fail(msg) => panic!("{msg}"),
        Privileges::Skip(reason) => {
            skip(&reason);
            false
        }
    }
}

/// Whether the kernel supports SCTP sockets (socket(2) of `family`, SOCK_STREAM, IPPROTO_SCTP,
/// in the calling thread's network namespace). `Err` names why not; errors that do not mean
/// "no SCTP" (EPERM, EMFILE, ...) panic: they are not a missing kernel feature.
pub fn probe_sctp(family: libc::c_int) -> Result<(), String> {
    // SAFETY: plain socket(2); the fd is closed right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd >= 0 {
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match missing_feature(err.raw_os_error()) {
        true => Err(format!(
            "this kernel has no SCTP (socket(IPPROTO_SCTP): {err})"
        )),
        false => panic!("SCTP probe failed for another reason than a missing protocol: {err}"),
    }
}

/// Whether a socket(2) errno means the kernel lacks the protocol or family.
fn missing_feature(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::EPROTONOSUPPORT | libc::ESOCKTNOSUPPORT | libc::EAFNOSUPPORT)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh path for a skip log.
    fn scratch(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("{}-skiplog-{tag}", crate::harness::names::unique()))
    }

    #[test]
    fn root_runs_whatever_the_environment() {
        for (ci, req) in [(None, None), (Some("true"), None), (None, Some("1"))] {
            assert_eq!(privileges_for(0, ci, req), Privileges::Run);
        }
    }

    #[test]
    fn non_root_fails_under_ci_or_when_required() {
        for (ci, req) in [
            (Some("true"), None),
            (Some("1"), None),
            (Some("TRUE"), None),
            (None, Some("1")),
            (Some("false"), Some("1")),
        ] {
            match privileges_for(1000, ci, req) {
                Privileges::Fail(msg) => assert!(msg.contains("need root"), "{msg}"),
                other => panic!("CI={ci:?} require={req:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn non_root_skips_on_a_developer_machine() {
        for (ci, req) in [(None, None), (Some("false"), None), (None, Some("0"))] {
            match privileges_for(1000, ci, req) {
                Privileges::Skip(why) => assert!(why.contains("need root"), "{why}"),
                other => panic!("CI={ci:?} require={req:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn skips_are_appended_by_name_and_read_back_once_each() {
        let log = scratch("append");
        let _ = std::fs::remove_file(&log);
        assert_eq!(read_skips(&log).unwrap(), vec![]);
        append_skip(&log, "socket_lb::sctp", "this kernel has no SCTP").unwrap();
        append_skip(&log, "cli::status", "need root:\n run as root").unwrap();
        append_skip(&log, "socket_lb::sctp", "again").unwrap();
        let got = read_skips(&log).unwrap();
        std::fs::remove_file(&log).unwrap();
        assert_eq!(
            got,
            vec![
                (
                    "socket_lb::sctp".to_string(),
                    "this kernel has no SCTP".to_string()
                ),
                (
                    "cli::status".to_string(),
                    "need root: run as root".to_string()
                ),
            ]
        );
    }

    #[test]
    fn the_test_name_comes_from_the_test_thread_and_binary() {
        let name = current_test();
        // This unit test runs in the `tests` library's test binary, on a thread libtest names
        // after the test.
        assert_eq!(
            name,
            "tests::harness::skip::tests::the_test_name_comes_from_the_test_thread_and_binary",
        );
        assert_eq!(binary_name("socket_lb-0123456789abcdef"), "socket_lb");
        assert_eq!(binary_name("pod_networks-9f"), "pod_networks");
        assert_eq!(binary_name("testhost"), "testhost");
    }

    #[test]
    fn only_missing_protocols_count_as_missing_features() {
        assert!(missing_feature(Some(libc::EPROTONOSUPPORT)));
        assert!(missing_feature(Some(libc::ESOCKTNOSUPPORT)));
        assert!(!missing_feature(Some(libc::EPERM)));
        assert!(!missing_feature(Some(libc::EMFILE)));
        assert!(!missing_feature(None));
    }

    /// Today's way to miss a test: a test file deciding on its own that it cannot run
    /// (`geteuid`, printing "SKIPPED" and returning). Only this module may decide that.
    #[test]
    fn no_test_file_skips_on_its_own() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
        let mut files = vec![];
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    files.push(p);
                }
            }
        }
        assert!(files.len() > 5, "{files:?}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for needle in ["geteuid", "\"SKIPPED", "IPPROTO_SCTP"] {
                assert!(
                    !text.contains(needle),
                    "{} contains {needle}: skip through tests::harness::skip instead",
                    f.display()
                );
            }
        }
    }
}
