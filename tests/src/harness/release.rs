//! The agent of an earlier commit of this repository, built from its own sources, for the
//! upgrade tests: the real previous release, not the current build under another name.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

/// The last commit that landed before map layouts were versioned (the release of 2026-12-01).
pub const PREVIOUS_RELEASE: &str = "fb623f87de9bd8f91e3803f6cd055d6907841540";

/// This repository's root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `kube-bpf-proxy` binary of `commit`, built on first use into
/// `target/upgrade-from/<commit>/` (its sources from `git archive`, its own target directory,
/// removed once the binary is copied out) and reused afterwards. `Err(why)` if the commit is
/// not in this clone's history (a shallow clone, or sources without git) and cannot be fetched
/// from `origin`: the caller reports the test as skipped by name. Panics if it does not build.
pub fn agent_of(commit: &str) -> Result<PathBuf, String> {
    let root = workspace_root();
    let dir = root.join("target").join("upgrade-from").join(commit);
    let binary = dir.join("kube-bpf-proxy");
    if binary.is_file() {
        return Ok(binary);
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run git: {e}"))
    };
    let present = || {
        git(&["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .status
            .success()
    };
    if !present() {
        // Bounded: an unreachable origin must not hang the test.
        let _ = Command::new("timeout")
            .args(["60", "git", "-C"])
            .arg(&root)
            .args(["fetch", "--quiet", "origin", commit])
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .output();
        if !present() {
            return Err(format!(
                "commit {commit}, the release the upgrade starts from, is not in this \
                 checkout's history and could not be fetched from origin (a shallow clone, or \
                 sources without git: git fetch --unshallow)"
            ));
        }
    }
    let src = dir.join("src");
    let target = dir.join("target");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).expect("create the source directory");
    let archive = git(&["archive", "--format=tar", commit]);
    assert!(
        archive.status.success(),
        "git archive {commit}: {}",
        String::from_utf8_lossy(&archive.stderr)
    );
    let mut tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(Stdio::piped())
        .spawn()
        .expect("run tar");
    std::io::Write::write_all(tar.stdin.as_mut().expect("tar stdin"), &archive.stdout)
        .expect("feed tar");
    drop(tar.stdin.take());
    assert!(tar.wait().expect("tar").success(), "unpack {commit}");
    eprintln!(
        "building the agent of {commit} (once, into {}; a few minutes)",
        dir.display()
    );
    let started = Instant::now();
    let status = Command::new("cargo")
        .current_dir(&src)
        .args([
            "build",
            "--locked",
            "-p",
            "proxy-userspace",
            "--bin",
            "kube-bpf-proxy",
        ])
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        // No debug info at all: this binary is only run, and it saves disk.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .stdout(Stdio::null())
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the agent of {commit} failed");
    std::fs::copy(target.join("debug").join("kube-bpf-proxy"), &binary)
        .expect("copy the built agent");
    eprintln!(
        "built the agent of {commit} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&target);
    Ok(binary)
}
