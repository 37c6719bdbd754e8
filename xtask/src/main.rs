//! `cargo xtask <command>`: one subcommand per module, dispatch only.

mod bench;
mod exec;
mod image;
mod kernels;
mod layers;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build and tests need (idempotent): rust-src for nightly, bpf-linker,
    /// Debian packages, a bpffs at /sys/fs/bpf.
    Setup,
    /// Build the agent (with its embedded BPF object) and the test binaries.
    Build(exec::BuildOptions),
    /// Run the proxy on its embedded default: a sandbox of namespaces and example manifests.
    Run(run::Options),
    /// Run every check and test: fmt, clippy, unit tests, end-to-end tests.
    Test(test::Options),
    /// Only the BPF program tests on other kernels than this machine's (qemu guests).
    Kernels {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// The endpoint-churn soak for longer than CI runs it (default 5 minutes).
    Soak {
        /// Duration in seconds.
        #[arg(long, default_value_t = 300)]
        secs: u64,
    },
    /// Write an OCI image of the release agent without a container daemon: an OCI layout,
    /// an oci-archive and a docker-archive under target/image (podman, skopeo, ctr load them).
    Image(image::Options),
    /// Benchmark the data path, control plane and memory against kube-proxy's iptables and
    /// nftables shapes; prints a table, writes target/bench/bench.{md,json,png}.
    Bench(bench::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None => {
            eprintln!(
                "usage: cargo xtask <setup|build|run|test|kernels|image|bench>  (cargo xtask --help)"
            );
            std::process::exit(2);
        }
        Some(Command::Setup) => setup::setup(),
        Some(Command::Build(opts)) => setup::setup().and_then(|()| exec::build(&opts)),
        Some(Command::Run(opts)) => run::run(opts),
        Some(Command::Test(opts)) => test::test(opts),
        Some(Command::Soak { secs }) => test::soak(secs),
        Some(Command::Kernels { filter }) => test::kernels_only(filter),
        Some(Command::Image(opts)) => setup::setup().and_then(|()| image::image(opts)),
        Some(Command::Bench(opts)) => bench::bench(opts),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
