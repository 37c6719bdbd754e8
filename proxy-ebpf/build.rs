//! Rebuild the BPF object when the `bpf-linker` binary changes (a new linker can emit different
//! BTF). Does not notice a different `bpf-linker` put earlier on `PATH` than the one recorded.
//!
//! Also tells the linker which functions stay global: bpf-linker makes every symbol but the
//! programs internal, and the verifier checks an internal (static) BPF function again on every
//! path that calls it, a global one once (see `services::lb::kbp_least_conn`).

/// Functions the programs call that the verifier is to check once, on their own.
const GLOBAL_FUNCTIONS: &[&str] = &["kbp_least_conn", "kbp_claim_port4", "kbp_claim_port6"];

fn main() {
    println!(
        "cargo:rustc-link-arg-bins=--export={}",
        GLOBAL_FUNCTIONS.join(",")
    );
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
}
