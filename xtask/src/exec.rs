//! Running commands with a step banner and context.

use std::process::Command;

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

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
