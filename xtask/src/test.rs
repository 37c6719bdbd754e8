//! `cargo xtask test`: every check, in order, reporting all failures at the end.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    exec::{BuildOptions, build, cargo, step},
    setup::setup,
};

#[derive(clap::Args)]
pub struct Options {
    /// Only run tests whose name contains this (passed to the test binaries).
    pub filter: Option<String>,
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
            .arg("--")
            .args(&filter),
        &mut totals,
    );
    // Shared kernel state (cgroups, bpffs, netns): end-to-end tests run one at a time.
    let e2e = counted(
        "end-to-end tests (real kernel, network namespaces)",
        cargo()
            .args(["test", "-p", "tests", "--", "--test-threads=1"])
            .args(&filter),
        &mut totals,
    );
    failures.extend(
        [unit, e2e]
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}"))),
    );
    // The closing line CI reads: every test binary's results added up.
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
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

/// Runs the churn soak test for `secs` seconds.
pub fn soak(secs: u64) -> anyhow::Result<()> {
    setup()?;
    build(&BuildOptions::default())?;
    step(
        &format!("endpoint churn soak, {secs} s"),
        cargo()
            .args(["test", "-p", "tests", "--test", "reliability", "--"])
            .args(["endpoint_churn", "--nocapture", "--test-threads=1"])
            .env("KBP_SOAK_SECS", secs.to_string()),
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
        if line.starts_with("test result:") {
            totals.passed += count_of(&line, "passed");
            totals.failed += count_of(&line, "failed");
            totals.ignored += count_of(&line, "ignored");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::count_of;

    #[test]
    fn reads_libtest_summary() {
        let line = "test result: ok. 5 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out";
        assert_eq!(count_of(line, "passed"), 5);
        assert_eq!(count_of(line, "failed"), 1);
        assert_eq!(count_of(line, "ignored"), 2);
    }
}
