//! Rebuild the BPF object when the `bpf-linker` binary changes (a new linker can emit different
//! BTF). Does not notice a different `bpf-linker` put earlier on `PATH` than the one recorded.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
}
