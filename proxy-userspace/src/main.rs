//! `kube-bpf-proxy`: everything lives in the library's `cli` module.

fn main() {
    proxy_userspace::cli::main();
}
