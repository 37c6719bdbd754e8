//! `kube-bpf-proxy run --config FILE` as a user meets it: a bad file stops the agent before
//! anything privileged, with an error naming the field (no root needed).

use std::{path::PathBuf, process::Command};

/// A file in the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("kbp-config-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the binary with `args` to its end.
fn binary(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kube-bpf-proxy"))
        .args(args)
        .output()
        .expect("run kube-bpf-proxy")
}

/// Runs the agent with `args`; returns (exit code, stderr).
fn agent(args: &[&str]) -> (i32, String) {
    let out = binary(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

/// `run --help`.
fn run_help() -> String {
    String::from_utf8_lossy(&binary(&["run", "--help"]).stdout).into_owned()
}

#[test]
fn config_file_with_a_wrong_type_stops_the_agent_naming_the_field() {
    let file = TempFile::new(
        "bad.yaml",
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         conntrack:\n  maxPerCore: x\n",
    );
    let path = file.0.to_str().unwrap();
    let (code, stderr) = agent(&["run", "--config", path]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--config {path}: conntrack.maxPerCore: expected an integer, got \"x\""
        )),
        "{stderr}"
    );
}

#[test]
fn config_file_of_another_kind_or_missing_stops_the_agent() {
    let file = TempFile::new(
        "kubelet.yaml",
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n",
    );
    let (code, stderr) = agent(&["run", "--config", file.0.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("apiVersion \"kubelet.config.k8s.io/v1beta1\" is not supported"),
        "{stderr}"
    );
    let (code, stderr) = agent(&["run", "--config", "/nonexistent/config.conf"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--config /nonexistent/config.conf: "),
        "{stderr}"
    );
}

#[test]
fn config_flag_is_in_the_help() {
    let help = run_help();
    assert!(help.contains("--config <FILE>"), "{help}");
    assert!(help.contains("KubeProxyConfiguration"), "{help}");
}

#[test]
fn kube_proxy_flags_with_a_bad_value_stop_the_agent_naming_the_flag() {
    let (code, stderr) = agent(&[
        "run",
        "--cluster-cidr=10.244.0.0/16",
        "--conntrack-max-per-core=lots",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--conntrack-max-per-core: \"lots\" is not an integer"),
        "{stderr}"
    );
}

#[test]
fn kube_proxy_init_only_and_cleanup_exit_without_running() {
    // --init-only: nothing to prepare; exits at once.
    let (code, stderr) = agent(&["run", "--init-only", "--v=2"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("--init-only: nothing to prepare"),
        "{stderr}"
    );
    // --cleanup: `cleanup` of the pin directory, here one that holds nothing.
    let dir = std::env::temp_dir().join(format!("kbp-cleanup-{}", std::process::id()));
    let out = binary(&["run", "--cleanup", "--bpffs", dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("removed 0 pins"), "{stdout}");
}

#[test]
fn kube_proxy_flags_are_in_the_help() {
    let help = run_help();
    for flag in [
        "--proxy-mode <proxy-mode>",
        "--cluster-cidr",
        "--conntrack-max-per-core <N>",
        "--feature-gates <NAME=BOOL,...>",
        "-v, --v <LEVEL>",
        "--cleanup[=<BOOL>]",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
}
