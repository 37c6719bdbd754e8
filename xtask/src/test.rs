//! `cargo xtask test`: every check, in order, reporting all failures at the end.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use ::tests::harness::skip::{SKIP_LOG_ENV, append_skip, read_skips};
use anyhow::{Context as _, bail};

use crate::{
    exec::{BuildOptions, build, cargo, step, target_dir},
    kernels::{self, shell_word},
    setup::setup,
};

#[derive(clap::Args)]
pub struct Options {
    /// Only run tests whose name contains this (passed to the test binaries).
    pub filter: Option<String>,
    /// Leave out the BPF program tests on other kernels (qemu guests, about 4 minutes each); they
    /// are then listed as skipped.
    #[arg(long)]
    pub skip_kernels: bool,
}

pub fn test(opts: Options) -> anyhow::Result<()> {
    setup()?;
    let mut failures = Vec::new();
    let mut check = |what: &str, cmd: &mut Command| {
        if let Err(e) = step(what, cmd) {
            failures.push(format!("{e:#}"));
        }
    };
    check(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    );
    check(
        "cargo clippy -- -D warnings",
        cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]),
    );
    if let Err(e) = build(&BuildOptions::default()) {
        failures.push(format!("{e:#}"));
        bail!("build failed; tests not run:\n{}", failures.join("\n"));
    }
    let filter: Vec<String> = opts.filter.into_iter().collect();
    let mut totals = Totals::default();
    // Tests that cannot run here (no root outside CI, a kernel feature missing) record
    // themselves in this file; libtest would count them as passed.
    let skip_log = fresh_skip_log()?;
    let unit = counted(
        "unit and golden tests (unprivileged)",
        cargo()
            .args([
                "test",
                "-p",
                "proxy-common",
                "-p",
                "proxy-userspace",
                "-p",
                "xtask",
            ])
            .env(SKIP_LOG_ENV, &skip_log)
            .arg("--")
            .args(&filter),
        &mut totals,
    );
    // Shared kernel state (cgroups, bpffs, netns): end-to-end tests run one at a time.
    let e2e = counted(
        "end-to-end tests (real kernel, network namespaces)",
        cargo()
            .args(["test", "-p", "tests", "--", "--test-threads=1"])
            .env(SKIP_LOG_ENV, &skip_log)
            .args(&filter),
        &mut totals,
    );
    let kernels = if opts.skip_kernels {
        // Recorded as a test's skip is: `summary` moves it from passed, where libtest would
        // have counted it, to skipped.
        append_skip(&skip_log, "bpf_programs on other kernels", "--skip-kernels")
            .context("record a skip")?;
        totals.passed += 1;
        Ok(true)
    } else {
        other_kernels(&filter, &skip_log, &mut totals)
    };
    failures.extend(
        [unit, e2e, kernels.map(drop)]
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}"))),
    );
    let skips = read_skips(&skip_log).with_context(|| format!("read {}", skip_log.display()))?;
    // The skipped tests by name, then the closing line CI reads: every test binary's results
    // added up, a recorded skip counted as skipped and not as passed.
    print!("{}", summary(&mut totals, &skips));
    if failures.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} check(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        )
    }
}

/// The `bpf_programs` tests (every program through the verifier, the packet cases through
/// `BPF_PROG_TEST_RUN`) on each kernel of [`kernels::KERNELS`], in a qemu guest; their results
/// are added to `totals`, their skips recorded in `skip_log` with the kernel's name. A guest
/// that runs no test, or fails without a failed test, counts as one failed test. With a
/// filter that names none of those tests no guest is started (`Ok(false)`).
fn other_kernels(filter: &[String], skip_log: &Path, totals: &mut Totals) -> anyhow::Result<bool> {
    let binary = test_binary("bpf_programs")?;
    let listed = Command::new(&binary)
        .args(["--list", "--format", "terse"])
        .args(filter)
        .output()
        .with_context(|| format!("list the tests of {}", binary.display()))?;
    let matching = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count();
    if matching == 0 {
        eprintln!("\nbpf_programs on other kernels: no test matches the filter");
        return Ok(false);
    }
    let mut failed = Vec::new();
    for kernel in kernels::KERNELS {
        let what = format!("bpf_programs on Linux {} (qemu guest)", kernel.series);
        eprintln!("\n==> {what}");
        let before = (
            totals.passed + totals.failed + totals.ignored,
            totals.failed,
        );
        let prepared = match kernels::prepare(kernel) {
            Err(e) if e.is::<kernels::Unreachable>() => {
                // Not reached from this network: a skip by name (`summary` moves it from
                // passed to skipped), not a pass.
                eprintln!("{what}: skipped, {e:#}");
                append_skip(
                    skip_log,
                    &what,
                    &format!("the kernel's archive is unreachable: {e:#}"),
                )?;
                totals.passed += 1;
                continue;
            }
            prepared => prepared,
        };
        let result = prepared.and_then(|k| {
            eprintln!("kernel: {}", k.package);
            let guest_skips = k.dir().join("skipped.log");
            let _ = std::fs::remove_file(&guest_skips);
            let mut script = format!(
                "export CI=true {SKIP_LOG_ENV}={}\n\
                 modprobe -a tun veth 2>/dev/null\n\
                 {} --test-threads=2",
                shell_word(&guest_skips.display().to_string()),
                shell_word(&binary.display().to_string()),
            );
            for f in filter {
                script.push(' ');
                script.push_str(&shell_word(f));
            }
            let (rc, output) = k.run(&script)?;
            for line in output.lines() {
                println!("{line}");
                add_results(totals, line);
            }
            for (name, reason) in read_skips(&guest_skips)? {
                append_skip(
                    skip_log,
                    &format!("{name} on Linux {}", kernel.series),
                    &reason,
                )?;
            }
            if rc != 0 {
                bail!("exit code {rc}");
            }
            Ok(())
        });
        let ran = totals.passed + totals.failed + totals.ignored - before.0;
        if let Err(e) = result {
            if totals.failed == before.1 {
                totals.failed += 1;
            }
            failed.push(format!("{what} failed: {e:#}"));
        } else if ran == 0 {
            totals.failed += 1;
            failed.push(format!("{what} ran no test"));
        }
    }
    if failed.is_empty() {
        Ok(true)
    } else {
        bail!("{}", failed.join("\n"))
    }
}

/// `cargo xtask kernels`: only the tests on other kernels, after a build.
pub fn kernels_only(filter: Option<String>) -> anyhow::Result<()> {
    setup()?;
    build(&BuildOptions::default())?;
    let skip_log = fresh_skip_log()?;
    let mut totals = Totals::default();
    let filter: Vec<String> = filter.into_iter().collect();
    let result = other_kernels(&filter, &skip_log, &mut totals);
    let skips = read_skips(&skip_log)?;
    print!("{}", summary(&mut totals, &skips));
    match result {
        Ok(true) => Ok(()),
        Ok(false) => bail!("no bpf_programs test matches the filter"),
        Err(e) => Err(e),
    }
}

/// The path of test binary `name` of the tests crate, built if it is not.
fn test_binary(name: &str) -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args(["test", "-p", "tests", "--test", name, "--no-run"])
        .args(["--message-format=json", "-q"])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building test binary {name} failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo named no executable for test {name}"))
}

/// Runs the churn soak test for `secs` seconds; a skipped soak is a failure.
pub fn soak(secs: u64) -> anyhow::Result<()> {
    setup()?;
    build(&BuildOptions::default())?;
    let skip_log = fresh_skip_log()?;
    step(
        &format!("endpoint churn soak, {secs} s"),
        cargo()
            .args(["test", "-p", "tests", "--test", "reliability", "--"])
            .args(["endpoint_churn", "--nocapture", "--test-threads=1"])
            .env("KBP_SOAK_SECS", secs.to_string())
            .env(SKIP_LOG_ENV, &skip_log),
    )?;
    let skips = read_skips(&skip_log)?;
    if !skips.is_empty() {
        bail!("the soak did not run:\n{}", skipped_lines(&skips));
    }
    Ok(())
}

/// `<target dir>/xtask-skipped.log`, emptied.
fn fresh_skip_log() -> anyhow::Result<PathBuf> {
    let target = target_dir();
    std::fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
    let log = target.join("xtask-skipped.log");
    match std::fs::remove_file(&log) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", log.display())),
    }
    // Absolute: the test binaries run in their own package directories.
    Ok(std::path::absolute(&log)?)
}

/// One `skipped: TEST: REASON` line per skipped test.
fn skipped_lines(skips: &[(String, String)]) -> String {
    skips
        .iter()
        .map(|(name, reason)| format!("skipped: {name}: {reason}\n"))
        .collect()
}

/// Moves the recorded skips from passed (libtest's view) to skipped and returns the listing of
/// skipped tests followed by the closing line.
fn summary(totals: &mut Totals, skips: &[(String, String)]) -> String {
    let n = skips.len() as u64;
    totals.passed = totals.passed.saturating_sub(n);
    totals.ignored += n;
    format!(
        "{}xtask: {} passed, {} failed, {} skipped\n",
        skipped_lines(skips),
        totals.passed,
        totals.failed,
        totals.ignored
    )
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Reads `N <word>` out of a libtest summary line.
fn count_of(line: &str, word: &str) -> u64 {
    let words: Vec<&str> = line.split([' ', ';']).filter(|w| !w.is_empty()).collect();
    words
        .windows(2)
        .find(|w| w[1] == word)
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0)
}

/// Adds a libtest `test result:` line's counts to `totals`; other lines change nothing.
fn add_results(totals: &mut Totals, line: &str) {
    if line.starts_with("test result:") {
        totals.passed += count_of(line, "passed");
        totals.failed += count_of(line, "failed");
        totals.ignored += count_of(line, "ignored");
    }
}

/// Runs a `cargo test` command, echoing its output and adding up its `test result:` lines.
fn counted(what: &str, cmd: &mut Command, totals: &mut Totals) -> anyhow::Result<()> {
    eprintln!("\n==> {what}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        add_results(totals, &line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Totals, count_of, summary};

    #[test]
    fn recorded_skips_are_listed_and_counted_as_skipped_not_passed() {
        // 70 passed by libtest's count, 2 of which only recorded a skip; 1 ignored.
        let mut totals = Totals {
            passed: 70,
            failed: 0,
            ignored: 1,
        };
        let skips = vec![
            (
                "socket_lb::clusterip_sctp_v4_balances_over_every_backend".to_string(),
                "this kernel has no SCTP (socket(IPPROTO_SCTP): Protocol not supported)"
                    .to_string(),
            ),
            ("cli::status_json".to_string(), "need root".to_string()),
        ];
        let out = summary(&mut totals, &skips);
        assert_eq!(
            out,
            "skipped: socket_lb::clusterip_sctp_v4_balances_over_every_backend: this kernel has \
             no SCTP (socket(IPPROTO_SCTP): Protocol not supported)\n\
             skipped: cli::status_json: need root\n\
             xtask: 68 passed, 0 failed, 3 skipped\n"
        );
        // Without skips the closing line is libtest's sum, in the format CI reads.
        let mut totals = Totals {
            passed: 5,
            failed: 1,
            ignored: 2,
        };
        assert_eq!(
            summary(&mut totals, &[]),
            "xtask: 5 passed, 1 failed, 2 skipped\n"
        );
    }

    #[test]
    fn the_skip_log_written_by_tests_is_read_back() {
        let log = std::env::temp_dir().join(format!(
            "{}-xtask-skiplog",
            ::tests::harness::names::unique()
        ));
        ::tests::harness::skip::append_skip(&log, "a::b", "no SCTP").unwrap();
        ::tests::harness::skip::append_skip(&log, "a::b", "no SCTP").unwrap();
        let skips = ::tests::harness::skip::read_skips(&log).unwrap();
        std::fs::remove_file(&log).unwrap();
        let mut totals = Totals {
            passed: 3,
            failed: 0,
            ignored: 0,
        };
        assert_eq!(
            summary(&mut totals, &skips),
            "skipped: a::b: no SCTP\nxtask: 2 passed, 0 failed, 1 skipped\n"
        );
    }

    #[test]
    fn reads_libtest_summary() {
        let line = "test result: ok. 5 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out";
        assert_eq!(count_of(line, "passed"), 5);
        assert_eq!(count_of(line, "failed"), 1);
        assert_eq!(count_of(line, "ignored"), 2);
    }
}

/// Every `unsafe` block, function and impl in the workspace's own sources (the BPF crate
/// included) carries a `SAFETY:` comment (or a `# Safety` doc section) on its line or within
/// the four lines above it.
#[cfg(test)]
mod safety_comments {
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    rust_files(&path, out);
                }
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }

    /// Lines (1-based) of `text` opening an `unsafe` block, fn or impl without a safety note.
    fn unexplained(text: &str) -> Vec<usize> {
        let lines: Vec<&str> = text.lines().collect();
        let opens_unsafe = |l: &str| {
            let code = l.split("//").next().unwrap_or("");
            // The keyword is split so that this check does not find itself.
            let keyword = concat!("uns", "afe");
            ["{", "fn ", "impl "]
                .iter()
                .any(|k| code.contains(&format!("{keyword} {k}")))
                || code.trim_end().ends_with(keyword)
        };
        (0..lines.len())
            .filter(|&i| opens_unsafe(lines[i]))
            .filter(|&i| {
                !lines[i.saturating_sub(4)..=i]
                    .iter()
                    .any(|l| l.contains("SAFETY") || l.contains("# Safety"))
            })
            .map(|i| i + 1)
            .collect()
    }

    #[test]
    fn the_check_finds_what_it_should() {
        let open = concat!("uns", "afe {");
        let function = concat!("uns", "afe fn f() {}");
        let cases = [
            (format!("let a = 1;\nlet b = {open} f() }};\n"), vec![2]),
            (format!("// SAFETY: why.\nlet b = {open} f() }};\n"), vec![]),
            (
                format!("/// # Safety\n/// why\n#[inline]\n{function}\n"),
                vec![],
            ),
            (format!("#[inline]\n{function}\n"), vec![2]),
            (format!("// an {open} in a comment\n"), vec![]),
        ];
        for (text, want) in cases {
            assert_eq!(unexplained(&text), want, "{text}");
        }
    }

    #[test]
    fn every_unsafe_has_a_safety_comment() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut files = Vec::new();
        for dir in [
            "proxy-common",
            "proxy-ebpf",
            "proxy-userspace",
            "tests",
            "xtask",
        ] {
            rust_files(&root.join(dir), &mut files);
        }
        assert!(files.len() > 50, "found only {} files", files.len());
        let missing: Vec<String> = files
            .iter()
            .flat_map(|f| {
                let text = std::fs::read_to_string(f).unwrap();
                unexplained(&text)
                    .into_iter()
                    .map(move |line| format!("{}:{line}", f.display()))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "unsafe without a SAFETY comment:\n{}",
            missing.join("\n")
        );
    }
}
