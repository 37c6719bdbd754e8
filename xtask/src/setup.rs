//! Idempotent set-up of everything a fresh machine lacks. Each step checks first and says what
//! it found; a second run changes nothing and says so.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::exec::{cargo, probe, step};

/// bpf-linker version known to work with the nightly's LLVM and the kernel's BTF checks.
const BPF_LINKER_VERSION: &str = "0.10.4";
/// BPF programs are built with this toolchain (it needs rust-src for -Z build-std=core).
const BPF_TOOLCHAIN: &str = "nightly";
/// Debian packages the tests, the demo and the benchmarks use. umoci and skopeo check the
/// images `cargo xtask image` writes (unpack and run it; read both archives).
const APT_PACKAGES: &[&str] = &[
    "bpftool", "ethtool", "iproute2", "iptables", "nftables", "procps", "skopeo", "umoci",
];

pub fn setup() -> anyhow::Result<()> {
    let mut changed = 0;
    changed += nightly_rust_src()? as usize;
    changed += bpf_linker()? as usize;
    changed += apt_packages()? as usize;
    changed += bpffs()? as usize;
    if changed == 0 {
        eprintln!("setup: nothing to do, everything is already in place");
    } else {
        eprintln!("setup: done ({changed} step(s) changed this machine)");
    }
    Ok(())
}

fn ok(what: &str) -> anyhow::Result<bool> {
    eprintln!("setup: {what}: already in place");
    Ok(false)
}

fn nightly_rust_src() -> anyhow::Result<bool> {
    let installed = probe(
        "rustup",
        &[
            "component",
            "list",
            "--toolchain",
            BPF_TOOLCHAIN,
            "--installed",
        ],
    );
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => {
            ok("rust-src for the nightly toolchain")
        }
        Some(_) => {
            step(
                "setup: installing rust-src for the nightly toolchain (builds core for BPF)",
                Command::new("rustup").args([
                    "component",
                    "add",
                    "rust-src",
                    "--toolchain",
                    BPF_TOOLCHAIN,
                ]),
            )?;
            Ok(true)
        }
        None => bail!(
            "the `{BPF_TOOLCHAIN}` toolchain is missing: it builds the BPF programs \
             (`rustup toolchain install {BPF_TOOLCHAIN} --component rust-src`)"
        ),
    }
}

fn bpf_linker() -> anyhow::Result<bool> {
    let want = format!("bpf-linker {BPF_LINKER_VERSION}");
    match probe("bpf-linker", &["--version"]) {
        Some(v) if v.trim() == want => ok(&want),
        found => {
            let found = found.map_or("not installed".to_string(), |v| v.trim().to_string());
            step(
                &format!("setup: installing {want} (found: {found}; takes about a minute)"),
                cargo().args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--locked",
                    "--force",
                ]),
            )?;
            Ok(true)
        }
    }
}

fn apt_packages() -> anyhow::Result<bool> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(crate::kernels::APT_PACKAGES)
        .copied()
        .filter(|p| {
            probe("dpkg-query", &["-W", "-f=${Status}", p])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return ok(&format!(
            "Debian packages ({}, {})",
            APT_PACKAGES.join(", "),
            crate::kernels::APT_PACKAGES.join(", ")
        ));
    }
    step(
        "setup: apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    step(
        &format!("setup: installing Debian packages: {}", missing.join(", ")),
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(true)
}

fn bpffs() -> anyhow::Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if mounted {
        return ok("bpffs at /sys/fs/bpf");
    }
    if !Path::new("/sys/fs/bpf").exists() {
        std::fs::create_dir_all("/sys/fs/bpf").context("create /sys/fs/bpf")?;
    }
    step(
        "setup: mounting bpffs at /sys/fs/bpf (pinned maps live there)",
        Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
    )?;
    Ok(true)
}
