//! Running commands with a step banner and context.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Prints a banner and runs `cmd`, failing with the command line if it fails.
pub fn step(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("\n==> {what}");
    let status = cmd
        .status()
        .with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns whether it succeeded and its stdout.
pub fn probe(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace's target directory: `$CARGO_TARGET_DIR`, or `target/` at the workspace root.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
            xtask.parent().expect("xtask/ has a parent").join("target")
        })
}

/// A `cargo` command. Under CI (`CI` set), incremental compilation is off unless
/// `CARGO_INCREMENTAL` says otherwise: a fresh clone builds each crate once, and the
/// incremental caches would only add gigabytes to the runner's disk.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    if std::env::var_os("CI").is_some() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

#[derive(clap::Args, Default)]
pub struct BuildOptions {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
}

/// Builds the agent (build.rs builds and embeds the BPF object) and the test peer binary.
pub fn build(opts: &BuildOptions) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "proxy-userspace", "-p", "tests", "--bins"]);
    if opts.release {
        cmd.arg("--release");
    }
    step("build the agent and test binaries", &mut cmd)
}
