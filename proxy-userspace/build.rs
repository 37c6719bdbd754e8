//! Builds proxy-ebpf for the BPF target with the nightly toolchain (`-Z build-std=core`), so
//! that the agent binary embeds its programs, and copies the object into OUT_DIR.
//!
//! The BPF build is quiet when it succeeds: its progress and the compiler's messages are kept,
//! and printed (as cargo warnings, the only way a build script can show text) only when it
//! fails, with rustc's own rendering of each error and the command that failed.
use std::{
    env,
    io::Read as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use cargo_metadata::Message;

/// The toolchain that builds the BPF crate.
const TOOLCHAIN: &str = "nightly";

fn main() {
    // An error ends the build with its message alone (no backtrace: the cause is the message).
    if let Err(e) = build() {
        eprintln!("{e:#}");
        std::process::exit(1);
    }
}

fn build() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "proxy-ebpf")
        .ok_or_else(|| anyhow!("proxy-ebpf package not found in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    println!("cargo:rerun-if-changed={root}");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    // The architecture the BPF programs are built for (their pt_regs layout, among others).
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64".to_string()
    } else {
        arch
    };

    // `rustup run nightly cargo` where rustup exists; else the cargo on PATH must be nightly.
    let mut cmd = if rustup_found() {
        let mut c = Command::new("rustup");
        c.args(["run", TOOLCHAIN, "cargo"]);
        c
    } else {
        Command::new("cargo")
    };
    let target_dir = out_dir.join("bpf-target");
    cmd.args([
        "build",
        "--package",
        ebpf.name.as_str(),
        "--bins",
        "--release",
    ])
    .args([
        "--message-format=json-render-diagnostics",
        "--target",
        target,
    ])
    .args(["-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            format!("--cfg=bpf_target_arch=\"{arch}\""),
            "-Cdebuginfo=2".to_string(),
            "-Clink-arg=--btf".to_string(),
        ]
        .join("\x1f"),
    )
    // The outer build's compiler settings are for the host, not for this build.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTC_WRAPPER")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {cmd:?} (is the {TOOLCHAIN} toolchain installed?)"))?;
    // stderr (progress, and rendered errors with json-render-diagnostics) is read on a thread
    // so that neither pipe can fill up and stall the build.
    let mut stderr = child.stderr.take().context("stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut executables = Vec::new();
    let mut messages = Vec::new();
    for message in Message::parse_stream(stdout) {
        match message.context("read the BPF build's messages")? {
            Message::CompilerArtifact(a) => {
                if let Some(exe) = a.executable {
                    executables.push((a.target.name.to_string(), exe.into_std_path_buf()));
                }
            }
            Message::CompilerMessage(m) => {
                if let Some(text) = m.message.rendered {
                    messages.push(text);
                }
            }
            Message::TextLine(line) => messages.push(line),
            _ => {}
        }
    }
    let status = child.wait().with_context(|| format!("wait for {cmd:?}"))?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        for line in messages
            .iter()
            .flat_map(|m| m.lines())
            .chain(stderr.lines().filter(|l| !is_progress(l)))
        {
            println!("cargo:warning={line}");
        }
        bail!("the BPF build failed ({status}): {cmd:?}");
    }
    if executables.is_empty() {
        bail!("the BPF build produced no program object: {cmd:?}");
    }
    for (name, path) in executables {
        let to = out_dir.join(&name);
        std::fs::copy(&path, &to)
            .with_context(|| format!("copy {} to {}", path.display(), to.display()))?;
    }
    Ok(())
}

fn rustup_found() -> bool {
    Command::new("rustup")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Cargo's progress lines ("Compiling x", "Finished ..."), left out of a failure's report.
fn is_progress(line: &str) -> bool {
    let word = line.trim_start().split(' ').next().unwrap_or("");
    matches!(
        word,
        "Compiling" | "Finished" | "Updating" | "Downloading" | "Downloaded" | "Locking"
    )
}
